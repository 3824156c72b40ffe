"""The ERF engine against the closed-form theory of Luo et al. (2016), and its contracts."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import erf
from erf import theory
from erf.theory import Layer


def _ones_stack(spec, dim=2):
    """A linear stack with unpadded layers: ('conv', k, stride, dilation) or ('avg', k, stride)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    avg = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dim]
    mods, layers = [], []
    for item in spec:
        if item[0] == "conv":
            _, k, s, d = item
            ks = (k,) * dim if isinstance(k, int) else tuple(k)
            mods.append(conv(1, 1, ks, stride=s, dilation=d, bias=False))
            layers.append(Layer([[1] * kk for kk in ks], stride=s, dilation=d))
        else:
            _, k, s = item
            mods.append(avg(k, s))
            layers.append(Layer.avgpool(k, s, ndim=dim))
    return nn.Sequential(*mods), layers


def _engine_window(model, layers, size, dim=2):
    shape = (1,) + (size,) * dim
    r = erf.effective_rf(model, shape, init="ones", reduce="mean", n_inputs=2, dtype=torch.float64,
                         progress=False, device="cpu")
    expected = np.asarray(theory.linear_erf(layers, ndim=dim), dtype=np.float64)
    jump = np.prod([l.strides(dim) for l in layers], axis=0)
    start = [u * j for u, j in zip(r.unit, jump)]  # no padding: unit u starts at u * J
    window = r.map[tuple(slice(s, s + e) for s, e in zip(start, expected.shape))]
    return r, window, expected


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_uniform_stack_equals_multinomial_theory(k, n):
    model, layers = _ones_stack([("conv", k, 1, 1)] * n)
    trf = n * (k - 1) + 1
    r, window, expected = _engine_window(model, layers, trf + 8)
    np.testing.assert_allclose(window, expected, rtol=1e-6)
    assert r.map.sum() == pytest.approx(expected.sum(), rel=1e-9)  # nothing outside the TRF window
    prof = np.array(theory.binomial_profile(n, k), dtype=np.float64)
    np.testing.assert_allclose(expected, np.outer(prof, prof), rtol=1e-12)


@pytest.mark.parametrize("spec", [
    [("conv", (3, 5), 1, 1)] * 4,                                   # non-square kernels
    [("conv", 3, 1, 1), ("avg", 2, 2), ("conv", 3, 1, 1)],          # REFERENCES §1 example
    [("conv", 3, 1, 1), ("conv", 3, 1, 2), ("conv", 3, 1, 4)],      # dilations 1, 2, 4
    [("conv", 3, 2, 1), ("conv", (2, 3), 1, 1), ("avg", 3, 2), ("conv", 5, 1, 2), ("conv", 3, 2, 1)],
])
def test_mixed_linear_stacks_equal_linear_erf(spec):
    model, layers = _ones_stack(spec)
    size = int(max(theory.trf_size(layers))) * 2 + 9
    r, window, expected = _engine_window(model, layers, size)
    np.testing.assert_allclose(window, expected, rtol=1e-6)
    assert r.map.sum() == pytest.approx(float(expected.sum()), rel=1e-9)


def test_references_example_profile():
    model, layers = _ones_stack([("conv", 3, 1, 1), ("avg", 2, 2), ("conv", 3, 1, 1)], dim=1)
    r, window, expected = _engine_window(model, layers, 21, dim=1)
    np.testing.assert_allclose(window, [0.5, 1, 1.5, 1.5, 1.5, 1.5, 1, 0.5], rtol=1e-12)


@pytest.mark.parametrize("dim", [1, 3])
def test_1d_and_3d_stacks(dim):
    n = 4
    model, layers = _ones_stack([("conv", 3, 1, 1)] * n, dim=dim)
    r, window, expected = _engine_window(model, layers, 13, dim=dim)
    prof = np.array(theory.binomial_profile(n, 3), dtype=float)
    outer = prof if dim == 1 else np.multiply.outer(np.multiply.outer(prof, prof), prof)
    np.testing.assert_allclose(window, outer, rtol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_moments_sigma_exact_for_uniform_stack(n):
    r = erf.effective_rf(erf.nets.conv_stack(n), (1, 4 * n + 11, 4 * n + 11), init="ones",
                         dtype=torch.float64, n_inputs=1, progress=False)
    expected = math.sqrt(2 * n / 3)
    np.testing.assert_allclose(r.moments.sigma, [expected, expected], rtol=1e-9)


@pytest.mark.parametrize("n,tol", [(5, 0.04), (10, 0.02), (20, 0.02)])
def test_fit_and_erf_size_of_uniform_stack(n, tol):
    r = erf.effective_rf(erf.nets.conv_stack(n), (1, 4 * n + 11, 4 * n + 11), init="ones",
                         dtype=torch.float64, n_inputs=1, progress=False)
    expected = math.sqrt(2 * n / 3)
    np.testing.assert_allclose(r.fit.sigma, [expected, expected], rtol=tol)
    size = {5: 8.307, 10: 11.705, 20: 16.155}[n]
    assert r.metrics["erf_size"] == pytest.approx(size, abs=1e-3)


def test_readme_example_prints_2_58():
    r = erf.effective_rf(erf.nets.conv_stack(10), (1, 64, 64), init="ones", progress=False)
    assert np.round(r.moments.sigma, 2).tolist() == [2.58, 2.58]


@pytest.mark.slow
def test_random_weights_square_map_is_multinomial():
    """E[sum_c g_c^2] over random zero-mean weights is the uniform profile (REFERENCES §1)."""
    n = 4
    # Per-draw maps are products of Gaussian weights (heavy tailed): 8 channels and 800 draws bring
    # the normalised L1 distance to about 0.03 (measured 0.026 with 1000 draws).
    model = erf.nets.conv_stack(n, width=8, in_channels=1)
    kw = dict(init="normal", n_inputs=1, draws=800, seed=3, progress=False, dtype=torch.float64)
    sq = erf.effective_rf(model, (1, 17, 17), reduce="square", **kw)
    prof = np.array(theory.binomial_profile(n, 3), dtype=float)
    expected = np.zeros((17, 17))
    expected[4:13, 4:13] = np.outer(prof, prof)
    l1 = np.abs(sq.map / sq.map.sum() - expected / expected.sum()).sum()
    assert l1 <= 0.05
    mean = erf.effective_rf(model, (1, 17, 17), reduce="mean", **kw)
    # E[g] = 0: the mean map is within a few standard errors of zero, and far below the RMS map.
    assert np.abs(mean.map).max() < 0.15 * np.sqrt(sq.map).max()
    centre = (mean.map / np.where(mean.stderr > 0, mean.stderr, np.inf))[8, 8]
    assert abs(centre) < 4


def test_merge_equals_single_run():
    model = erf.nets.conv_stack(3, width=2, act="relu")
    kw = dict(n_inputs=8, seed=5, progress=False, init="normal")
    a = erf.effective_rf(model, (2, 15, 15), draws=10, first_draw=0, **kw)
    b = erf.effective_rf(model, (2, 15, 15), draws=10, first_draw=10, **kw)
    full = erf.effective_rf(model, (2, 15, 15), draws=20, first_draw=0, **kw)
    merged = a.merge(b)
    assert merged.n == full.n == 160
    np.testing.assert_allclose(merged.map, full.map, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(merged.stderr, full.stderr, rtol=1e-9, atol=1e-15)
    assert merged.config["draw_ranges"] == [[0, 20]]
    with pytest.raises(ValueError, match="overlap"):
        a.merge(a)
    other = erf.effective_rf(model, (2, 15, 15), draws=10, first_draw=10, reduce="square",
                             **{k: v for k, v in kw.items()})
    with pytest.raises(ValueError, match="reduce"):
        a.merge(other)


def test_same_seed_identical_and_batch_size_independent():
    model = erf.nets.conv_stack(3, width=3, act="tanh", in_channels=2)
    kw = dict(n_inputs=40, draws=2, seed=11, progress=False, init="normal")
    maps = [erf.effective_rf(model, (2, 16, 16), batch_size=bs, **kw).map for bs in (1, 7, 32)]
    again = erf.effective_rf(model, (2, 16, 16), batch_size=7, **kw).map
    assert np.array_equal(maps[1], again)
    for m in maps[1:]:
        np.testing.assert_allclose(m, maps[0], rtol=1e-6, atol=1e-9)
    auto = erf.effective_rf(model, (2, 16, 16), **kw).map
    np.testing.assert_allclose(auto, maps[0], rtol=1e-6, atol=1e-9)


def test_save_load_roundtrip(tmp_path):
    r = erf.effective_rf(erf.nets.conv_stack(3, width=2), (2, 12, 12), n_inputs=4, progress=False)
    path = r.save(tmp_path / "result.npz")
    back = erf.load(path)
    assert np.array_equal(back.map, r.map) and np.array_equal(back.stderr, r.stderr)
    assert back.n == r.n and back.unit == r.unit and back.config == r.config
    assert back.meta["versions"]["torch"] == torch.__version__
    assert back.merge  # the loaded result can still merge
    assert not list(tmp_path.glob("*.tmp"))


def test_callers_model_is_unchanged():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    model.train()
    state = copy.deepcopy(model.state_dict())
    erf.effective_rf(model, (1, 16, 16), draws=3, init="normal", n_inputs=4, progress=False)
    erf.effective_rf(model, (1, 16, 16), n_inputs=4, progress=False, train_mode=True)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_layers_units_channels_and_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
    res = erf.effective_rf(model, (1, 16, 16), layer=["0", "2"], n_inputs=4, progress=False)
    assert set(res) == {"0", "2"}
    assert np.count_nonzero(res["0"].map) <= 9 and np.count_nonzero(res["2"].map) <= 25
    r = erf.effective_rf(model, (1, 16, 16), layer="2", unit=(-1, 0), channel=[0, 2], unit_relu=True,
                         n_inputs=4, progress=False)
    assert r.unit == (15, 0)
    assert r.map[:13, :].sum() == 0 and r.map[:, 3:].sum() == 0
    single = erf.effective_rf(model, (1, 16, 16), layer=model[0], n_inputs=4, progress=False)
    assert single.layer == "0"


def test_forward_stops_at_layer():
    calls = []

    class Tail(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    model = nn.Sequential(nn.Conv2d(1, 1, 3), Tail())
    erf.effective_rf(model, (1, 9, 9), layer="0", n_inputs=4, progress=False)
    assert not calls


def test_select_and_grid_vision_transformer():
    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, stride=4)
            self.cls = nn.Parameter(torch.zeros(1, 1, 8))
            self.block = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
            return {"tokens": self.block(t), "logits": t.mean(1)}

    r = erf.effective_rf(TinyViT, (3, 32, 32), select=lambda o: o["tokens"], grid=(8, 8), n_inputs=4,
                         progress=False)
    assert r.unit == (4, 4) and r.map.shape == (32, 32)
    assert np.count_nonzero(r.map) > 16 * 16  # attention: the unit sees far beyond its patch
    with pytest.raises(TypeError, match="select"):
        erf.effective_rf(TinyViT, (3, 32, 32), n_inputs=2, progress=False)


def test_inputs_kinds(tmp_path):
    from PIL import Image

    model = erf.nets.conv_stack(2, width=3, act="relu")
    kw = dict(progress=False, init="normal")
    x = torch.randn(10, 3, 12, 12)
    t = erf.effective_rf(model, (3, 12, 12), inputs=x, **kw)
    assert t.n == 10
    it = erf.effective_rf(model, (3, 12, 12), inputs=[(x[:6], None), (x[6:], None)], batch_size=4, **kw)
    np.testing.assert_allclose(it.map, t.map, rtol=1e-6)
    u = erf.effective_rf(model, (3, 12, 12), inputs="uniform", n_inputs=5, **kw)
    assert u.n == 5
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((20, 30, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"im{i}.png")
    im = erf.effective_rf(model, (3, 12, 12), inputs=f"images:{tmp_path}", **kw)
    assert im.n == 3 and np.isfinite(im.map).all()


def test_factory_draws_use_the_model_init():
    r1 = erf.effective_rf(lambda: erf.nets.conv_stack(2, width=2, act="relu"), (2, 10, 10), draws=3,
                          n_inputs=4, progress=False)
    r2 = erf.effective_rf(lambda: erf.nets.conv_stack(2, width=2, act="relu"), (2, 10, 10), draws=3,
                          n_inputs=4, progress=False)
    assert np.array_equal(r1.map, r2.map) and r1.n == 12


def test_custom_init_callable():
    def init(m, g):
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.fill_(2.0)

    r = erf.effective_rf(erf.nets.conv_stack(2), (1, 9, 9), init=init, reduce="mean", n_inputs=1,
                         progress=False)
    assert r.map.max() == pytest.approx(4 * 9.0 / 9 * 9)  # centre: sum of (2*ones3x3 * 2*ones3x3)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvolution", "integrated_gradients"])
def test_captum_methods(method):
    model = erf.nets.conv_stack(3, width=2, act="relu", in_channels=1)
    r = erf.effective_rf(model, (1, 15, 15), method=method, n_inputs=4, progress=False, init="normal")
    assert r.map.shape == (15, 15) and np.isfinite(r.map).all()
    assert r.map[:, :1].sum() == 0 and r.map.sum() > 0  # inside the 7x7 TRF only


def test_nonfinite_raise_and_skip():
    class Blowup(nn.Module):
        def forward(self, x):
            return torch.sqrt(x)  # gradient inf/NaN at and below zero

    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), Blowup())
    x = torch.ones(6, 1, 8, 8)
    x[2] = -1
    with pytest.raises(ValueError, match="non-finite gradients"):
        erf.effective_rf(model, (1, 8, 8), inputs=x, init="ones", progress=False)
    with pytest.warns(UserWarning, match="skipped"):
        r = erf.effective_rf(model, (1, 8, 8), inputs=x, init="ones", progress=False, nonfinite="skip")
    assert r.n == 5 and np.isfinite(r.map).all()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(reduce="median"), ValueError, "reduce"),
    (dict(init="xavier"), ValueError, "init"),
    (dict(inputs="noise"), ValueError, "inputs"),
    (dict(inputs=42), TypeError, "inputs"),
    (dict(unit=(40, 0)), ValueError, "unit"),
    (dict(unit=(1, 2, 3)), ValueError, "unit"),
    (dict(channel=9), ValueError, "channel"),
    (dict(method="saliency"), ValueError, "method"),
    (dict(n_inputs=0), ValueError, "n_inputs"),
    (dict(draws=1.5), TypeError, "draws"),
    (dict(layer="nope"), ValueError, "layer"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(grid=(0, 4)), ValueError, "grid"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        erf.effective_rf(erf.nets.conv_stack(2, width=2), (2, 12, 12), progress=False, **kwargs)


def test_bad_shapes_and_models():
    with pytest.raises(ValueError, match="input_shape"):
        erf.effective_rf(nn.Conv2d(1, 1, 7), (1, 4, 4), progress=False)  # smaller than the kernel
    with pytest.raises(ValueError, match="input_shape"):
        erf.effective_rf(nn.Conv2d(1, 1, 3), (1, 0, 4), progress=False)
    with pytest.raises(TypeError, match="input_shape"):
        erf.effective_rf(nn.Conv2d(1, 1, 3), "1x8x8", progress=False)
    with pytest.raises(ValueError, match="spatial"):  # a layer without spatial axes, named explicitly
        erf.effective_rf(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)), (1, 8, 8),
                         layer="2", progress=False)
    with pytest.raises(TypeError, match="model"):
        erf.effective_rf("resnet", (1, 8, 8), progress=False)
