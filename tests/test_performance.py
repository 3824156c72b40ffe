"""Every speed path gives the plain path's map: cone crop, stacked draws (vmap), automatic batch
and out-of-memory back-off, channels_last. Small CPU sizes; no timings."""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import erf
import erf._batch as batch_mod
import erf._crop as crop_mod
import erf._maps as maps_mod
import erf._plan as plan_mod
from erf.nets import conv_stack, pooling_net
from erf.pooling._registry import REGISTRY

OPTS = dict(progress=False, n_inputs=4, reduce="abs")


@pytest.fixture(autouse=True)
def _crop_small_runs(monkeypatch):
    """The test runs are tiny: let the crop planner consider them anyway."""
    monkeypatch.setattr(crop_mod, "MIN_WORK_BYTES", 0)


# --------------------------------------------------------------------------- a reference TRF

def _rule(m: nn.Module, nd: int):
    """(kernel, stride, padding, dilation) per axis of a leaf of a chain, or None for pointwise."""
    if hasattr(m, "rf_rule"):
        r = m.rf_rule()
        return r.kernel, r.stride, r.padding, r.dilation
    if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        t = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
        k, d = t(m.kernel_size), t(getattr(m, "dilation", 1))
        p = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d)) if m.padding == "same" else t(m.padding)
        return k, t(m.stride), p, d
    return None


def chain_report(model: nn.Module, input_shape, unit):
    """Region and jump of ``unit`` for a chain of convs/pools (Araujo et al. 2019), by hand."""
    nd = len(input_shape) - 1
    jump, pad, size = [1] * nd, [0] * nd, [1] * nd
    for m in model.modules():
        if list(m.children()) and not hasattr(m, "rf_rule"):
            continue
        rule = _rule(m, nd)
        if rule is None:
            continue
        k, s, p, d = rule
        for ax in range(nd):
            pad[ax] += p[ax] * jump[ax]
            size[ax] += d[ax] * (k[ax] - 1) * jump[ax]
            jump[ax] *= int(s[ax])
    region = tuple((u * j - p, u * j - p + r - 1) for u, j, p, r in zip(unit, jump, pad, size))
    return SimpleNamespace(region=region, jump=tuple(jump), croppable=True, aligned=True, is_global=False)


def _patch_reports(monkeypatch, fn=chain_report):
    def reports(model, input_shape, targets):
        return [fn(model, input_shape, t.unit) for t in targets]
    monkeypatch.setattr(crop_mod, "trf_reports", reports)


def _close(a, b, rtol=1e-5):
    scale = max(float(np.abs(a).max()), 1e-30)
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


# --------------------------------------------------------------------------- cone cropping

@pytest.mark.parametrize("unit", [None, (0, 0), (-1, -1), (1, -2), (3, 30)])
@pytest.mark.parametrize("net", ["stack", "strided", "dilated"])
def test_crop_equals_uncropped(monkeypatch, net, unit):
    _patch_reports(monkeypatch)
    model = {"stack": lambda: conv_stack(6, k=3, width=4, act="relu", bias=True),
             "strided": lambda: conv_stack(4, k=3, width=4, act="tanh", stride=2),
             "dilated": lambda: conv_stack(4, k=3, width=4, act="relu", dilation=2)}[net]()
    shape = (4, 64, 48)
    if net == "strided" and unit == (3, 30):
        unit = (3, 2)
    a = erf.effective_rf(model, shape, unit=unit, crop=False, **OPTS)
    b = erf.effective_rf(model, shape, unit=unit, crop=True, **OPTS)
    assert b.meta["crop"] is not None and a.meta["crop"] is None
    assert a.n == b.n
    _close(a.map, b.map)
    _close(a.stderr, b.stderr, 1e-4)


def _local_pools():
    return sorted(n for n, e in REGISTRY.items() if e.locality == "local" and not e.head
                  and not hasattr(e.make(4), "rf_input_span"))


@pytest.mark.parametrize("pool", _local_pools())
def test_crop_pooling_nets(monkeypatch, pool):
    """Every local pooling module with a regular rule: the crop (when the probe accepts it) equals no crop."""
    _patch_reports(monkeypatch)
    model = pooling_net(pool, depth=2, width=4)
    unit = None if _local_pools().index(pool) % 2 else (1, -2)  # centre, or near two borders
    a = erf.effective_rf(model, (3, 64, 64), unit=unit, crop=False, n_inputs=2, progress=False)
    b = erf.effective_rf(model, (3, 64, 64), unit=unit, crop=True, n_inputs=2, progress=False)
    if pool in ("max", "avg", "strided", "median", "softpool", "lp"):
        assert b.meta["crop"] is not None, pool
    _close(a.map, b.map)


def test_crop_3d_and_1d(monkeypatch):
    _patch_reports(monkeypatch)
    for dim, shape in ((1, (2, 80)), (3, (2, 20, 24, 28))):
        model = conv_stack(3, k=3, width=2, act="relu", dim=dim)
        a = erf.effective_rf(model, shape, crop=False, **OPTS)
        b = erf.effective_rf(model, shape, crop=True, **OPTS)
        assert b.meta["crop"] is not None
        _close(a.map, b.map)


def test_wrong_report_is_caught_and_not_cropped(monkeypatch):
    def too_small(model, shape, unit):
        r = chain_report(model, shape, unit)
        r.region = tuple((f + 3, l - 3) for f, l in r.region)
        return r
    _patch_reports(monkeypatch, too_small)
    model = conv_stack(6, k=3, width=2, act="relu")
    a = erf.effective_rf(model, (2, 48, 48), crop=False, **OPTS)
    b = erf.effective_rf(model, (2, 48, 48), crop=True, **OPTS)
    assert b.meta["crop"] is None
    np.testing.assert_array_equal(a.map, b.map)


def test_no_crop_for_global_units_or_without_analyser(monkeypatch):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.AdaptiveAvgPool2d(4))
    monkeypatch.setattr(crop_mod, "trf_reports", lambda model, shape, targets: [SimpleNamespace(
        region=((0, 47), (0, 47)), jump=(12, 12), croppable=False)])
    assert erf.effective_rf(model, (2, 48, 48), **OPTS).meta["crop"] is None
    monkeypatch.undo()
    monkeypatch.setitem(__import__("sys").modules, "erf.trf", None)  # import fails
    assert erf.effective_rf(conv_stack(2, width=2), (2, 48, 48), **OPTS).meta["crop"] is None


def test_axis_window_rules():
    assert crop_mod.axis_window(10, 20, 64, 4) == (8, 21)     # aligned down to the jump
    assert crop_mod.axis_window(-3, 20, 64, 4) == (0, 21)     # crosses the leading edge
    assert crop_mod.axis_window(40, 70, 64, 8) == (40, 64)    # crosses the trailing edge


def test_crop_with_real_analyser():
    trf = pytest.importorskip("erf.trf")
    model = pooling_net("max", depth=2, width=4)
    rep = trf.theoretical_rf(model, (3, 96, 96))
    a = erf.effective_rf(model, (3, 96, 96), crop=False, n_inputs=2, progress=False)
    b = erf.effective_rf(model, (3, 96, 96), crop=True, n_inputs=2, progress=False)
    assert (b.meta["crop"] is not None) == bool(getattr(rep, "croppable", False))
    _close(a.map, b.map)


# --------------------------------------------------------------------------- stacked draws

def _bn_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.GELU(),
                         nn.Conv2d(4, 3, 3, padding=1))


@pytest.mark.parametrize("make,shape,kw", [
    (lambda: conv_stack(4, width=3, act="relu", bias=True), (3, 20, 20), {"init": "normal"}),
    (_bn_net, (2, 16, 16), {"layer": ["3", "6"]}),
    (lambda: pooling_net("softpool", depth=1, width=4), (3, 24, 24), {"reduce": "square"}),
])
def test_vmap_equals_loop(make, shape, kw):
    model = make()
    base = dict(OPTS, draws=5, crop=False, **kw)
    loop = erf.effective_rf(model, shape, vmap_draws=False, **base)
    vm = erf.effective_rf(model, shape, vmap_draws=True, batch_size=8, **base)
    if isinstance(loop, dict):
        pairs = [(loop[k], vm[k]) for k in loop]
    else:
        pairs = [(loop, vm)]
    for a, b in pairs:
        assert b.meta["vmap_draws"] and not a.meta["vmap_draws"]
        assert a.n == b.n == 20
        _close(a.map, b.map)


def test_vmap_with_tensor_inputs_and_crop(monkeypatch):
    _patch_reports(monkeypatch)
    model = conv_stack(3, width=2, act="relu")
    x = torch.randn(6, 2, 40, 40)
    loop = erf.effective_rf(model, (2, 40, 40), inputs=x, draws=3, vmap_draws=False, progress=False)
    vm = erf.effective_rf(model, (2, 40, 40), inputs=x, draws=3, vmap_draws=True, batch_size=12, progress=False)
    assert vm.meta["vmap_draws"] and vm.meta["crop"] is not None
    _close(loop.map, vm.map)


class _ItemGate(nn.Module):
    """Data-dependent Python control flow: vmap cannot run it."""

    def forward(self, x):
        return x * 2 if float(x.mean()) > -1e9 else x


def test_vmap_fallback_names_the_module():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), _ItemGate(), nn.Conv2d(2, 2, 3, padding=1))
    with pytest.warns(UserWarning, match=r"_ItemGate"):
        r = erf.effective_rf(model, (2, 12, 12), draws=3, vmap_draws=True, **OPTS)
    assert not r.meta["vmap_draws"]
    ref = erf.effective_rf(model, (2, 12, 12), draws=3, vmap_draws=False, **OPTS)
    np.testing.assert_array_equal(r.map, ref.map)


def test_vmap_auto_is_off_on_cpu():
    r = erf.effective_rf(conv_stack(2, width=2), (2, 12, 12), draws=3, **OPTS)
    assert not r.meta["vmap_draws"]


# --------------------------------------------------------------------------- batch sizes

def test_auto_batch_equals_batch_one():
    model = pooling_net("max", depth=1, width=2)
    a = erf.effective_rf(model, (3, 16, 16), n_inputs=36, batch_size=1, progress=False)
    b = erf.effective_rf(model, (3, 16, 16), n_inputs=36, progress=False)
    assert b.config["batch_size"] > 1
    _close(a.map, b.map)


def test_out_of_memory_halves_and_retries(monkeypatch):
    model = conv_stack(3, width=2, act="relu")
    ref = erf.effective_rf(model, (2, 16, 16), n_inputs=12, batch_size=12, progress=False)
    real = maps_mod.Mapper.maps
    sizes = []

    def fake(self, m, x):
        sizes.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, m, x)

    monkeypatch.setattr(maps_mod.Mapper, "maps", fake)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        r = erf.effective_rf(model, (2, 16, 16), n_inputs=12, batch_size=12, progress=False)
    assert max(s for s in sizes if s <= 3) == 3 and r.n == 12
    _close(ref.map, r.map)


def test_too_large_cpu_request_is_reduced(monkeypatch):
    monkeypatch.setattr(batch_mod, "free_memory", lambda device: 1 << 20)
    with pytest.warns(UserWarning, match="free RAM"):
        r = erf.effective_rf(conv_stack(2, width=2), (2, 32, 32), n_inputs=8, batch_size=10**6, progress=False)
    assert 1 <= r.config["batch_size"] < 10**6 and r.n == 8


# --------------------------------------------------------------------------- channels_last

def test_channels_last_equals_contiguous(monkeypatch):
    model = pooling_net("avg", depth=2, width=8)
    runs = {}
    for flag in (False, True):
        monkeypatch.setattr(plan_mod, "use_channels_last", lambda *args, flag=flag: flag)
        runs[flag] = erf.effective_rf(model, (3, 32, 32), crop=False, **OPTS)
    _close(runs[False].map, runs[True].map)


def test_gather_based_pooling_keeps_contiguous_memory():
    """Modules declaring ``prefers_contiguous`` (slower in channels_last) keep the net contiguous."""
    layouts = [erf.effective_rf(pooling_net(name, depth=1, width=4), (3, 24, 24), crop=False, **OPTS
                                ).meta["channels_last"] for name in ("dynopool", "softpool", "tree", "max")]
    assert layouts == [False, False, False, True]
