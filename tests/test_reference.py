"""The engine against an independent slow reference (tests/_reference.py), in float64.

Third-party architectures with random weights at small inputs (torchvision ResNet-18,
MobileNetV3-small, a dict-returning feature extractor, timm ConvNeXt-atto and a timm vision
transformer read as a token grid), 3 input channels, every reduce mode, every target option
(all channels, an int, a list, ``unit_relu``), units at the centre, the corner and the border
(negative index). The speed paths (cone crop, BatchNorm folding, batch sizes, stacked draws,
several layers at once) must give the same map as the reference.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import erf
import _reference as ref

F64 = dict(dtype=torch.float64, device="cpu", progress=False)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters: BatchNorm is then not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model


def _tv():
    return pytest.importorskip("torchvision", reason="torchvision is needed for this architecture")


def _timm():
    return pytest.importorskip("timm")  # the reason names timm and why its import failed


def _resnet18():
    torch.manual_seed(1)
    return _randomise_bn(_tv().models.resnet18())


def _mobilenet():
    torch.manual_seed(2)
    return _randomise_bn(_tv().models.mobilenet_v3_small())


def _feature_dict():
    """torchvision's IntermediateLayerGetter: the model returns a dict, the unit needs select=."""
    tv = _tv()
    from torchvision.models._utils import IntermediateLayerGetter

    torch.manual_seed(3)
    return IntermediateLayerGetter(_randomise_bn(tv.models.resnet18()), {"layer1": "c2", "layer2": "c3"})


def _convnext():
    torch.manual_seed(4)
    return _timm().create_model("convnext_atto", pretrained=False)


def _vit():
    _timm()
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)


# name -> (builder, input shape, target keywords)
NETS = {
    "tv_resnet18": (_resnet18, (3, 24, 24), dict(layer="layer1.1.bn2")),
    "tv_mobilenet_v3": (_mobilenet, (3, 32, 32), dict(layer="features.2")),
    "tv_feature_dict": (_feature_dict, (3, 24, 24), dict(layer=None, select=lambda out: out["c3"])),
    "timm_convnext": (_convnext, (3, 32, 32), dict(layer="stages.1")),
    "timm_vit_tokens": (_vit, (3, 16, 16), dict(layer="blocks.1", grid=(4, 4))),
}
TARGETS = {  # every option of the unit's value
    "all": dict(channel=None, unit_relu=False),
    "int": dict(channel=3, unit_relu=False),
    "list": dict(channel=[5, 0, 2], unit_relu=False),
    "relu_all": dict(channel=None, unit_relu=True),
    "relu_list": dict(channel=[1, 4, 7, 9], unit_relu=True),
}
UNITS = [None, (0, 0), (-1, 1)]  # centre, corner, border by a negative index


@functools.lru_cache(maxsize=None)
def _net(name):
    builder, shape, kw = NETS[name]
    return builder(), shape, kw


@functools.lru_cache(maxsize=None)
def _ref_model(name):
    return ref.prepare(_net(name)[0])


def _inputs(shape, n=4, seed=0):
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _ref_grads(name, target, unit):
    _, shape, kw = _net(name)
    return ref.gradients(_ref_model(name), _inputs(shape), unit=unit, **kw, **TARGETS[target])


def _engine(name, reduce, target, unit, **extra):
    model, shape, kw = _net(name)
    opts = dict(kw, **TARGETS[target])
    return erf.effective_rf(model, shape, unit=unit, inputs=_inputs(shape), reduce=reduce, **opts, **F64,
                            **extra)


FULL = ("tv_resnet18", "timm_vit_tokens")  # every reduce x every target option
CASES = [(net, reduce, target, UNITS[(i + j + k) % len(UNITS)])
         for i, net in enumerate(NETS) for j, reduce in enumerate(ref.REDUCES) for k, target in enumerate(TARGETS)
         if net in FULL or (j - k) % len(ref.REDUCES) == 0]  # others: each reduce and each target option


@pytest.mark.parametrize("net,reduce,target,unit", CASES,
                         ids=[f"{n}-{r}-{t}-{u}" for n, r, t, u in CASES])
def test_engine_equals_slow_reference(net, reduce, target, unit):
    r = _engine(net, reduce, target, unit)
    maps = ref.maps_of(_ref_grads(net, target, unit), reduce)
    mean, stderr = ref.mean_and_stderr(maps)
    assert r.n == maps.shape[0]
    ref.assert_maps_equal(r.map, mean)
    ref.assert_maps_equal(r.stderr, stderr, rtol=1e-7)


@pytest.mark.parametrize("net", ["tv_resnet18", "timm_vit_tokens"])
def test_reductions_and_channel_options_are_distinct(net):
    """Guard on the references themselves: each option changes the map, so a swapped or ignored
    option cannot pass by coincidence (sum_c g^2 != (sum_c g)^2, sum_c |g| != |sum_c g|, ...)."""
    grads = _ref_grads(net, "all", None)
    maps = {r: ref.mean_and_stderr(ref.maps_of(grads, r))[0] for r in ref.REDUCES}
    g = np.stack([x.numpy() for x in grads])
    wrong = {"square": (g.sum(1) ** 2).mean(0), "abs": np.abs(g.sum(1)).mean(0),
             "relu": np.maximum(g.sum(1), 0).mean(0), "relu_of_mean": np.maximum(g.mean(1).mean(0), 0)}
    for r, w in wrong.items():
        assert not np.allclose(maps[r], w, rtol=1e-3), r
    targets = {t: ref.maps_of(_ref_grads(net, t, None), "abs").mean(0) for t in TARGETS}
    names = list(targets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(targets[a], targets[b], rtol=1e-3), (a, b)


@pytest.mark.parametrize("protocol", ["replknet", "openerf"])
@pytest.mark.parametrize("net", ["tv_resnet18", "timm_vit_tokens"])
def test_protocols_equal_reference(protocol, net):
    """RepLKNet: unit sum_c relu(out_c) at (h // 2, w // 2), map sum_c relu(g). OpenERF: unit
    sum_c out_c at (h // 2, w // 2) of a feature map, at ((g - 1) // 2, (g - 1) // 2) of a token
    grid (the upper-left of the four central tokens of an even grid), map relu(mean_c g)."""
    model, shape, kw = _net(net)
    x = _inputs(shape)
    r = erf.effective_rf(model, shape, inputs=x, protocol=protocol, **kw, **F64)
    out = ref.layer_output(_ref_model(net), x[:1].double(), kw["layer"])
    side = (kw["grid"] if "grid" in kw else out.shape[2:])
    if protocol == "replknet":
        unit, target, reduce = tuple(s // 2 for s in side), dict(unit_relu=True), "relu"
    else:
        unit = tuple((s - 1) // 2 if "grid" in kw else s // 2 for s in side)
        target, reduce = dict(unit_relu=False), "relu_of_mean"
    assert tuple(r.unit) == unit
    grads = ref.gradients(_ref_model(net), x, unit=unit, **kw, **target)
    ref.assert_maps_equal(r.map, ref.mean_and_stderr(ref.maps_of(grads, reduce))[0])


# ----------------------------------------------------------------------------- speed paths


SPEED = [  # (crop, fold_bn, batch_size, unit)
    (True, True, None, None), (False, True, None, (0, -1)), (True, False, 1, (0, -1)), (False, False, 3, None),
    (True, True, 2, (0, -1)),
]


@pytest.mark.parametrize("crop,fold_bn,batch_size,unit", SPEED)
def test_speed_paths_equal_reference(crop, fold_bn, batch_size, unit, monkeypatch):
    """ResNet-18 layer1 at 56x56: the unit's field (43 px) is smaller than the input, so the cone
    crop runs (its work threshold lowered for this tiny run); BatchNorms are folded unless fold_bn=False."""
    monkeypatch.setattr("erf._crop.MIN_WORK_BYTES", 0)
    model = _resnet18()
    shape = (3, 56, 56)
    x = _inputs(shape, n=4, seed=1)
    r = erf.effective_rf(model, shape, layer="layer1", unit=unit, channel=[2, 7, 11], inputs=x, reduce="square",
                         crop=crop, fold_bn=fold_bn, batch_size=batch_size, **F64)
    assert (r.meta["crop"] is not None) == crop  # the path under test ran
    assert (r.meta["folded_batchnorms"] > 0) == fold_bn
    grads = ref.gradients(ref.prepare(model), x, layer="layer1", unit=unit, channel=[2, 7, 11])
    mean, stderr = ref.mean_and_stderr(ref.maps_of(grads, "square"))
    ref.assert_maps_equal(r.map, mean)
    ref.assert_maps_equal(r.stderr, stderr, rtol=1e-7)


def test_several_layers_at_once_equal_reference():
    model, shape, _ = _net("tv_resnet18")
    x = _inputs(shape)
    layers = ["layer1.1.bn2", "layer1", "layer2"]  # bn2 output is later changed in place (out += identity)
    out = erf.effective_rf(model, shape, layer=layers, unit=(-1, 0), channel=[3, 1], inputs=x, reduce="relu",
                           **F64)
    assert set(out) == set(layers)
    for layer in layers:
        grads = ref.gradients(_ref_model("tv_resnet18"), x, layer=layer, unit=(-1, 0), channel=[3, 1])
        ref.assert_maps_equal(out[layer].map, ref.mean_and_stderr(ref.maps_of(grads, "relu"))[0])


def _small_factory():
    """A small third-party-style block (conv-BN-ReLU, depthwise, pointwise) built by its own init."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.GELU(), nn.Conv2d(6, 5, 1))


@pytest.mark.parametrize("vmap_draws", [False, True])
def test_weight_draws_equal_reference(vmap_draws):
    """Draw d calls the factory under the seed keyed by (seed, "weights", d) (SPEC: keyed streams);
    the map is the mean over every (draw, input) pair, stacked (vmap) or looped."""
    from erf._rng import key_seed

    shape, seed, draws = (3, 12, 12), 7, 3
    x = _inputs(shape, n=3, seed=2)
    r = erf.effective_rf(_small_factory, shape, inputs=x, draws=draws, first_draw=1, seed=seed, reduce="abs",
                         channel=[0, 4], unit=(1, -2), vmap_draws=vmap_draws, **F64)
    maps = []
    for d in range(1, 1 + draws):
        torch.manual_seed(key_seed(seed, "weights", d))
        model = _small_factory()
        maps.append(ref.maps_of(ref.gradients(ref.prepare(model), x, unit=(1, -2), channel=[0, 4]), "abs"))
    maps = np.concatenate(maps)
    assert r.n == maps.shape[0] == 9
    ref.assert_maps_equal(r.map, maps.mean(0))


def test_theoretical_rf_of_a_float64_model_with_biases():
    """Found by the speed-path test: the TRF probe was float32, so a float64 model with biases
    (or with BatchNorms folded into biased convolutions) could not be analysed and the crop never ran."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2, padding=1))
    want = erf.theoretical_rf(model, (3, 19, 19))
    got = erf.theoretical_rf(model.double(), (3, 19, 19))
    assert got.size == want.size == (5, 5) and got.region == want.region
