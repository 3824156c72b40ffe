"""captum attributions (method=...) pinned to their definitions.

1. Against captum's own single-sample classes: ``NeuronGuidedBackprop``, ``NeuronDeconvolution``
   and ``NeuronIntegratedGradients`` called one input at a time (the engine batches them), then
   reduced channel by channel and averaged (tests/_reference.py).
2. Against rules written by hand on a two-layer ReLU net x -> conv1 -> ReLU -> conv2, whose
   backward pass through the ReLU is (Springenberg et al. 2015, https://arxiv.org/abs/1412.6806;
   Zeiler & Fergus 2014): gradient dz = dh * [z > 0]; guided backprop dz = max(dh, 0) * [z > 0];
   deconvolution dz = max(dh, 0). The convolutions are transposed by ``conv_transpose2d``.
3. Integrated gradients (Sundararajan et al. 2017) of a linear network equals x * grad exactly
   (the path integral of a constant gradient), for any quadrature whose weights sum to 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import erf
import _reference as ref

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")  # captum's notes on hooks
F64 = dict(dtype=torch.float64, device="cpu", progress=False)
METHODS = ("guided_backprop", "deconvolution", "integrated_gradients")


def _inputs(shape, n=3, seed=0):
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _captum_maps(model, x, method, layer, reduce, **target):
    """Per-sample captum attributions of the unit, reduced; ``(n, *S)``."""
    captum_attr = pytest.importorskip("captum.attr")
    cls = {"guided_backprop": captum_attr.NeuronGuidedBackprop, "deconvolution": captum_attr.NeuronDeconvolution,
           "integrated_gradients": captum_attr.NeuronIntegratedGradients}[method]
    model = ref.prepare(model)
    algo = cls(model, model.get_submodule(layer) if layer else model)
    maps = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone()
        def selector(out):  # integrated gradients passes a batch of n_steps points on the path
            return torch.stack([ref.unit_value(out[j:j + 1], **target) for j in range(out.shape[0])])

        kw = dict(baselines=torch.zeros_like(xi), n_steps=16) if method == "integrated_gradients" else {}
        a = algo.attribute(xi, neuron_selector=selector, **kw)
        maps.append(ref.reduce_channels(a[0].detach(), reduce).numpy())
    return np.stack(maps)


def _mobilenet():
    tv = pytest.importorskip("torchvision", reason="torchvision is needed for this architecture")
    torch.manual_seed(2)
    return tv.models.mobilenet_v3_small().eval()


def _two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1))


CASES = [  # (net, layer, shape, reduce, target)
    ("two_layer", None, (3, 9, 9), "mean", dict(channel=[0, 2], unit=(4, 4))),
    ("mobilenet_v3", "features.1", (3, 32, 32), "abs", dict(channel=[1, 5, 9], unit=(-1, 2))),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_methods_equal_captum_one_sample_at_a_time(method, case):
    name, layer, shape, reduce, target = CASES[case]
    model = _two_layer() if name == "two_layer" else _mobilenet()
    x = _inputs(shape)
    r = erf.effective_rf(model, shape, layer=layer, inputs=x, method=method, reduce=reduce, **target, **F64)
    maps = _captum_maps(model, x, method, layer, reduce, **target)
    ref.assert_maps_equal(r.map, maps.mean(0), rtol=1e-8)


def _hand_rules(model, x, unit, channels):
    """Per-sample input maps (signed, summed over input channels) of gradient, guided backprop and
    deconvolution on conv1 -> ReLU -> conv2, from the rules above."""
    model = ref.prepare(model)  # float64 copy, no parameter gradients
    conv1, conv2 = model[0], model[2]
    out = {"gradient": [], "guided_backprop": [], "deconvolution": []}
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        z = F.conv2d(xi, conv1.weight, conv1.bias, padding=1)
        seed = torch.zeros((1, conv2.out_channels) + z.shape[2:], dtype=torch.float64)
        for c in channels:
            seed[0, c, unit[0], unit[1]] = 1.0
        dh = F.conv_transpose2d(seed, conv2.weight, padding=1)          # d unit / d h (conv2 is linear)
        rules = {"gradient": dh * (z > 0), "guided_backprop": dh.clamp(min=0) * (z > 0),
                 "deconvolution": dh.clamp(min=0)}
        for k, dz in rules.items():
            out[k].append(F.conv_transpose2d(dz, conv1.weight, padding=1)[0].sum(0).numpy())
    return {k: np.mean(v, 0) for k, v in out.items()}


def test_two_layer_relu_net_equals_hand_written_rules():
    pytest.importorskip("captum.attr")
    model, shape, unit, channels = _two_layer(), (3, 9, 9), (4, 3), [1, 3]
    x = _inputs(shape, n=4, seed=3)
    want = _hand_rules(model, x, unit, channels)
    got = {m: erf.effective_rf(model, shape, inputs=x, method=m, reduce="mean", unit=unit, channel=channels,
                               **F64).map for m in want}
    for m in want:
        ref.assert_maps_equal(got[m], want[m])
    # the three rules differ on this net: a swap of two methods cannot pass
    assert not np.allclose(want["guided_backprop"], want["deconvolution"], rtol=1e-3)
    assert not np.allclose(want["guided_backprop"], want["gradient"], rtol=1e-3)


def test_integrated_gradients_of_a_linear_net_is_input_times_gradient():
    pytest.importorskip("captum.attr")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(4, 3, 3, padding=1))
    shape, x = (3, 10, 10), _inputs((3, 10, 10), n=3, seed=4)
    r = erf.effective_rf(model, shape, inputs=x, method="integrated_gradients", reduce="mean", channel=[0, 2],
                         unit=(2, 3), **F64)
    grads = ref.gradients(ref.prepare(model), x, unit=(2, 3), channel=[0, 2])
    want = np.mean([(xi * g).sum(0).numpy() for xi, g in zip(x, grads)], 0)
    ref.assert_maps_equal(r.map, want)
