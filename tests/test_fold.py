"""Folding eval-mode BatchNorm into the convolution before it: the same map as without folding
(float64: to 1e-12; float32: to 1e-5 of the maximum), and only where it is safe."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import erf
from erf._fold import fold_batchnorms, plan_folding

OPTS = dict(progress=False, n_inputs=6, crop=False)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g))
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return model


class _Block(nn.Module):
    """Residual block with attribute-called conv/bn pairs (torchvision ResNet style)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(y)))


def _resnetish() -> nn.Module:
    return _randomise_bn(nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                       _Block(4), _Block(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))


def _maps(model, shape, **kw):
    a = erf.effective_rf(model, shape, fold_bn=False, **OPTS, **kw)
    b = erf.effective_rf(model, shape, fold_bn=True, **OPTS, **kw)
    return a, b


def _close(a, b, rtol):
    scale = float(np.abs(a).max())
    assert scale > 0
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_folded_map_equals_unfolded(dtype, rtol):
    model = _resnetish()
    a, b = _maps(model, (2, 20, 20), dtype=dtype, reduce="mean")
    assert a.meta["folded_batchnorms"] == 0 and b.meta["folded_batchnorms"] == 6
    _close(a.map, b.map, rtol)
    assert a.config == b.config  # folding is a speed path, not part of the result's identity
    # the caller's model is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6


@pytest.mark.parametrize("shape,make", [
    ((2, 30), lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Conv1d(3, 3, 3),
                                    nn.BatchNorm1d(3))),
    ((1, 9, 9, 9), lambda: nn.Sequential(nn.Conv3d(1, 2, 3, groups=1), nn.BatchNorm3d(2), nn.ReLU(),
                                         nn.Conv3d(2, 4, 3, groups=2, bias=False), nn.BatchNorm3d(4))),
])
def test_folding_in_1d_and_3d(shape, make):
    a, b = _maps(_randomise_bn(make()), shape, dtype=torch.float64, reduce="mean")
    assert b.meta["folded_batchnorms"] == 2
    _close(a.map, b.map, 1e-12)


def test_draws_and_layers_and_a_batchnorm_target():
    model = _resnetish()
    kw = dict(layer=["3.bn2", "4", "6"], draws=3, dtype=torch.float64, reduce="square")
    a, b = _maps(model, (2, 16, 16), **kw)
    for k in a:
        _close(a[k].map, b[k].map, 1e-12)
    # "3.bn2" is read, so it stays a layer (an nn.Identity after folding); its conv still folds
    assert b["6"].meta["folded_batchnorms"] == 6


def test_vmap_draws_with_folding():
    model = _resnetish()
    loop = erf.effective_rf(model, (2, 16, 16), draws=4, vmap_draws=False, fold_bn=False, **OPTS)
    vm = erf.effective_rf(model, (2, 16, 16), draws=4, vmap_draws=True, batch_size=12, **OPTS)
    assert vm.meta["vmap_draws"] and vm.meta["folded_batchnorms"] == 6
    _close(loop.map, vm.map, 1e-5)


def test_no_folding_in_train_mode():
    with pytest.warns(UserWarning, match="train_mode=True with BatchNorm"):
        r = erf.effective_rf(_resnetish(), (2, 16, 16), train_mode=True, **OPTS)
    assert r.meta["folded_batchnorms"] == 0


def test_torchvision_resnet18_folds_every_pair():
    tv = pytest.importorskip("torchvision")
    model = _randomise_bn(tv.models.resnet18())
    a, b = _maps(model, (3, 64, 64), layer="layer2", dtype=torch.float64)
    assert b.meta["folded_batchnorms"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    _close(a.map, b.map, 1e-12)


# --------------------------------------------------------------------------- what is not folded

class _StdConv(nn.Conv2d):
    """Weight standardisation in the forward (timm's StdConv2d): folding would change it."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.other = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.other(y)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class _ReadsBN(nn.Module):
    """Uses the BatchNorm's parameters outside its call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.view(1, -1, 1, 1)


class _Untraceable(nn.Module):
    """Python control flow on values: fx cannot trace it; the Sequential inside still folds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh())

    def forward(self, x):
        y = self.body(x)
        return y * 2 if float(y.detach().sum()) > -1e30 else y


def _plan(model, keep=()):
    return plan_folding(_randomise_bn(model).eval(), keep)


def test_plan_finds_only_safe_pairs():
    assert _plan(nn.Sequential(_StdConv(2, 2, 3), nn.BatchNorm2d(2))) == []
    assert _plan(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))) == []
    assert _plan(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))) == [("0", "1")]
    assert _plan(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), keep=["0"]) == []
    assert _plan(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), keep=["1"]) == [("0", "1")]
    assert _plan(nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 3)), nn.BatchNorm2d(3)), keep=["0"]) == []
    assert _plan(_TwoUsers()) == []
    assert _plan(_Shared()) == []
    assert _plan(_ReadsBN()) == []
    assert _plan(_Untraceable()) == [("body.0", "body.1")]
    hooked = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    hooked[1].register_forward_hook(lambda *a: None)
    assert _plan(hooked) == []
    pool = _PoolWithNorm()
    assert _plan(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), pool)) == [("0", "1")]


class _PoolWithNorm(nn.Module):
    """Stands for an erf.pooling module: its insides are its own and are never folded."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        return nn.functional.avg_pool2d(x * torch.sigmoid(self.logit(x)), 2)


_PoolWithNorm.__module__ = "erf.pooling.test"


@pytest.mark.parametrize("make", [_TwoUsers, _Shared, _ReadsBN, _Untraceable])
def test_unsafe_models_keep_their_maps(make):
    a, b = _maps(_randomise_bn(make()), (2, 12, 12), dtype=torch.float64)
    _close(a.map, b.map, 1e-12)


def test_fold_batchnorms_replaces_the_norm_with_identity():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3))).eval().double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    ref = model(x)
    fold_batchnorms(model, plan_folding(model, []))
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_fold_bn_must_be_a_bool():
    with pytest.raises(TypeError, match="fold_bn"):
        erf.effective_rf(_resnetish(), (2, 12, 12), fold_bn="yes")


@pytest.mark.parametrize("name,layer,expected", [
    ("mobilenet_v2", "features", "all"),        # Conv2dNormActivation blocks (nn.Sequential subclasses)
    ("googlenet", "inception4a", "all"),        # BasicConv2d: attribute-called conv and bn
    ("shufflenet_v2_x0_5", "stage3", "all"),    # channel shuffle between branches
    ("densenet121", "features", 1 + 6 + 12 + 24 + 16),  # pre-activation: only the stem and conv1 -> norm2
])
def test_torchvision_architectures(name, layer, expected):
    tv = pytest.importorskip("torchvision")
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = _randomise_bn(getattr(tv.models, name)(**kw))
    if expected == "all":
        expected = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = erf.effective_rf(model, (3, 64, 64), layer=layer, inputs=x, dtype=torch.float64, fold_bn=False, **OPTS)
    b = erf.effective_rf(model, (3, 64, 64), layer=layer, inputs=x, dtype=torch.float64, **OPTS)
    assert b.meta["folded_batchnorms"] == expected
    _close(a.map, b.map, 1e-12)
