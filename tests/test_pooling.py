"""Tests of erf.pooling: every module against a slow, obviously correct reference.

Parametrized over the registry (as timm's tests/test_layers_pool.py); loops are fine here.
"""
from __future__ import annotations

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F

from erf import _rng
from erf.pooling import (REGISTRY, DPPool2d, DynOPool2d, FractionalMaxPool2d, GatedPool2d,
                         LIP2d, LpPool2d, MedianPool2d, MixedPool2d, RankPool2d, S3Pool2d,
                         SoftPool2d, StochasticPool2d, TreePool2d, fractional_starts, get_pool,
                         list_pools, spectral_pool2d)
from erf.pooling import dynopool_size_loss
from erf.rfrule import RFRule

try:
    import torchvision  # noqa: F401
    HAS_TV = True
except ImportError:  # pragma: no cover
    HAS_TV = False

NAMES = list(REGISTRY)
DOWN = list_pools(downsampling=True)
EXPECTED = ("max avg maxavg mixed gated tree lp gem fractional stochastic s3 dpp lip softpool "
            "dynopool median rank spectral blur maxblur strided dilated gap spp yolo_spp roi_pool "
            "roi_align covariance bilinear netvlad").split()
STOCHASTIC = ["mixed", "fractional", "stochastic", "s3"]
C = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _skip_vision(name):
    if name.startswith("roi") and not HAS_TV:
        pytest.skip("torchvision missing")


def _make(name, **kw):
    _skip_vision(name)
    torch.manual_seed(0)
    return get_pool(name, C, **kw)


def _input(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- registry

def test_registry_names_and_attributes():
    assert NAMES == EXPECTED
    for name, e in REGISTRY.items():
        assert e.name == name and name == name.lower()
        assert e.kind in {"fixed", "data-dependent", "learnable", "stochastic"}
        assert e.locality in {"local", "global"}
        assert "http" in e.paper and e.rf and e.description
    assert sorted(list_pools(kind="stochastic")) == sorted(STOCHASTIC)
    assert set(list_pools(locality="global")) >= {"lip", "spectral", "gap", "netvlad"}
    assert "dilated" not in DOWN and "gap" not in DOWN and "max" in DOWN
    assert list_pools(head=False) == DOWN + ["dilated"] or set(list_pools(head=False)) == set(DOWN) | {"dilated"}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="softpool"):
        get_pool("nope", 4)
    with pytest.raises(ValueError):
        REGISTRY["max"].make(0)
    with pytest.raises(ValueError):
        list_pools(kind="weird")


def test_make_returns_fresh_modules():
    a, b = REGISTRY["gem"].make(4), REGISTRY["gem"].make(4)
    assert a is not b and a.p is not b.p


# ---------------------------------------------------------------- common checks

@pytest.mark.parametrize("name", DOWN)
@pytest.mark.parametrize("train", [False, True])
def test_stride2_halves_even_input(name, train):
    m = _make(name).train(train)
    for h, w in [(16, 16), (12, 20)]:
        y = m(_input(2, C, h, w))
        assert y.shape == (2, C, h // 2, w // 2)
    y = m(_input(2, C, 15, 13))  # odd sizes run and stay finite
    assert y.shape[:2] == (2, C) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1.0, 1000.0])
@pytest.mark.parametrize("train", [False, True])
def test_finite_outputs_and_gradients(name, scale, train):
    m = _make(name).train(train)
    x = (_input(2, C, 16, 16, seed=1) * scale).requires_grad_(True)
    with _rng.use_generator(_rng.generator(0, 0, 0)):
        y = m(x)
    assert torch.isfinite(y).all()
    (y * _input(*y.shape, seed=2)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    params = [p for p in m.parameters() if p.requires_grad]
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if params and scale == 1.0:
        assert any(p.grad.abs().sum() > 0 for p in params), name


@pytest.mark.parametrize("name", NAMES)
def test_rf_rule_and_locality(name):
    m = _make(name).eval()
    rule = m.rf_rule()
    assert isinstance(rule, RFRule) and rule.ndim == 2
    assert rule.is_global == (REGISTRY[name].locality == "global")


def _support(m, x, u, v):
    """Exact gradient support (rows, cols) of output unit (u, v), union over batch and channels."""
    x = x.clone().requires_grad_(True)
    y = m(x)
    y[:, :, u, v].sum().backward()
    nz = (x.grad != 0).any(0).any(0)
    rows = nz.any(1).nonzero().flatten()
    cols = nz.any(0).nonzero().flatten()
    return (int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max()))


LOCAL_DOWN = [n for n in DOWN if REGISTRY[n].locality == "local"] + ["dilated", "yolo_spp"]


@pytest.mark.parametrize("name", LOCAL_DOWN)
@pytest.mark.parametrize("size", [(12, 12), (13, 11)])
def test_rf_rule_is_exact_gradient_support(name, size):
    m = _make(name).eval().double()
    x = _input(64, C, *size, seed=3, dtype=torch.float64)
    with torch.no_grad():
        out = m(x).shape[-2:]
    u, v = out[0] // 2, out[1] // 2
    got = _support(m, x, u, v)
    rule = m.rf_rule()
    for axis, idx in enumerate((u, v)):
        n_in = size[axis]
        if hasattr(m, "rf_input_span"):
            lo, hi = m.rf_input_span(axis, idx, idx, n_in, out[axis])
        else:
            lo, hi = rule.input_span(axis, idx, idx)
        assert got[axis] == (max(0, int(lo)), min(n_in - 1, int(hi))), (name, axis)
        if not hasattr(m, "rf_input_span") or name == "s3":
            lo, hi = rule.input_span(axis, idx, idx)
            assert got[axis] == (max(0, int(lo)), min(n_in - 1, int(hi))), (name, axis)


@pytest.mark.parametrize("name", ["lip", "spectral", "gap", "spp", "covariance", "bilinear", "netvlad"])
def test_global_modules_see_everything(name):
    m = _make(name).eval().double()
    if name == "lip":
        torch.nn.init.normal_(m.logit.conv.weight)
    x = _input(64, C, 10, 10, seed=4, dtype=torch.float64).requires_grad_(True)
    y = m(x).reshape(64, -1)
    y[:, -C:].sum().backward()  # spp: the last C entries are the 1x1 level
    nz = (x.grad != 0).any(0).any(0)
    # the support's bounding box is the whole input (spectral pooling's Dirichlet kernel has
    # exact zeros, so not every pixel is reached)
    for line in (nz.any(1), nz.any(0)):
        assert line[0] and line[-1]


def test_lip_local_rule():
    rule = LIP2d(4).rf_rule()
    assert rule.is_global and rule.local == RFRule.make(5, 2, 2, note=rule.local.note)


# ---------------------------------------------------------------- determinism of stochastic modules

@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_modules_follow_keyed_generator(name):
    m = _make(name).train()
    x = _input(4, C, 16, 16, seed=5)
    with _rng.use_generator(_rng.generator(0, 0, 0)):
        a = m(x)
    with _rng.use_generator(_rng.generator(0, 0, 0)):
        b = m(x)
    assert torch.equal(a, b)
    outs = []
    for seed in range(1, 6):
        with _rng.use_generator(_rng.generator(seed, 0, 0)):
            outs.append(m(x))
    assert any(not torch.equal(a, o) for o in outs)
    m.eval()
    torch.manual_seed(1)
    e1 = m(x)
    torch.manual_seed(2)
    assert torch.equal(e1, m(x))  # eval is deterministic


# ---------------------------------------------------------------- formulas vs slow references

def _loop_pool(x, k, s, p, fn, pad_value=float("nan")):
    """Reference: apply ``fn`` to the list of valid values of each window (loops)."""
    n, c, h, w = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = torch.empty(n, c, ho, wo, dtype=x.dtype)
    for b, ch, i, j in itertools.product(range(n), range(c), range(ho), range(wo)):
        vals = [x[b, ch, r, q] for r in range(i * s - p, i * s - p + k)
                for q in range(j * s - p, j * s - p + k) if 0 <= r < h and 0 <= q < w]
        out[b, ch, i, j] = fn(torch.stack(vals))
    return out


SIZES = [(2, 2, 8, 8), (2, 2, 7, 9)]


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1)])
def test_softpool_matches_softmax_weighted_sum(shape, k, s, p):
    x = _input(*shape, seed=6, dtype=torch.float64)
    ref = _loop_pool(x, k, s, p, lambda v: (torch.exp(v) * v).sum() / torch.exp(v).sum())
    torch.testing.assert_close(SoftPool2d(k, s, p)(x), ref)
    big = SoftPool2d(k, s, p)((x * 100).float().requires_grad_(True))
    assert torch.isfinite(big).all()


def test_softpool_gradient_is_true_gradient():
    x = _input(1, 2, 6, 6, seed=7, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(SoftPool2d(2), (x,), fast_mode=True)


@pytest.mark.parametrize("shape", SIZES)
def test_lip_zero_logit_is_valid_average(shape):
    x = _input(*shape, seed=8)
    m = LIP2d(shape[1])
    torch.testing.assert_close(m(x), F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))


@pytest.mark.parametrize("shape", SIZES)
def test_stochastic_eval_formula_and_sampling(shape):
    x = _input(*shape, seed=9, dtype=torch.float64)
    x[0, 0, :2, :2] = -1.0  # an all-negative window -> 0
    ref = _loop_pool(F.relu(x), 2, 2, 0,
                     lambda v: (v * v).sum() / v.sum() if v.sum() > 0 else v.sum() * 0)
    m = StochasticPool2d(2)
    torch.testing.assert_close(m.eval()(x), ref)
    assert ref[0, 0, 0, 0] == 0
    m.train()
    with _rng.use_generator(_rng.generator(1, 2, 3)):
        draws = torch.stack([m(x) for _ in range(3000)])
    assert draws.shape[1:] == ref.shape
    # every draw is an element of its window, and the mean tends to sum a^2 / sum a
    pos = F.relu(x)
    for i, j in [(0, 0), (1, 2), (2, 2)]:
        window = pos[1, 1, 2 * i:2 * i + 2, 2 * j:2 * j + 2].flatten()
        assert all(bool((window == d).any()) for d in draws[:50, 1, 1, i, j])
    assert (draws[:, 0, 0, 0, 0] == 0).all()
    torch.testing.assert_close(draws.mean(0), ref, atol=0.08, rtol=0.05)


@pytest.mark.parametrize("hw", [(16, 16), (10, 14)])
def test_dynopool_half_equals_max_pool(hw):
    x = _input(2, 3, *hw, seed=10)
    m = DynOPool2d(2)
    torch.testing.assert_close(m(x), F.max_pool2d(x, 2, 2), rtol=0, atol=0)
    assert m.rf_rule() == RFRule.make(2, 2.0, 0.0, note=m.rf_rule().note)
    for lo in range(hw[0] // 2):
        assert m.rf_input_span(0, lo, lo, hw[0], hw[0] // 2) == (2 * lo, 2 * lo + 1)


def test_dynopool_learns_scale_and_size_loss():
    m = DynOPool2d(2, delta=0.3)
    x = _input(1, 2, 12, 12, seed=11).requires_grad_(True)
    m(x).square().sum().backward()
    assert m.alpha.grad.abs().sum() > 0 and m.delta.grad.abs().sum() > 0
    m.zero_grad()
    net = torch.nn.Sequential(m)
    loss = dynopool_size_loss(net)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    loss.backward()
    assert (m.alpha.grad < 0).all()  # a larger 1/r shrinks the output
    with torch.no_grad():
        m.alpha.fill_(3.0)
    assert m(x).shape[-2:] == (4, 4)


def test_dynopool_gradcheck_smooth_offsets():
    m = DynOPool2d(2, delta=0.3).double()
    x = _input(1, 1, 6, 6, seed=12, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


@pytest.mark.parametrize("n,h", [(16, 8), (15, 7), (12, 6)])
def test_spectral_pooling_is_exact_on_low_frequencies(n, h):
    rows = torch.arange(n, dtype=torch.float64)
    sig = torch.zeros(n, dtype=torch.float64)
    for f in range(0, (h + 1) // 2):  # frequencies strictly below the output Nyquist
        sig += torch.cos(2 * torch.pi * f * rows / n + 0.3 * f) / (1 + f)
    if h % 2 == 0:
        sig += 0.7 * torch.cos(torch.pi * h * rows / n)  # the output's Nyquist frequency
    x = (sig[:, None] * sig[None, :] + sig[:, None]).expand(2, 3, n, n)
    y = spectral_pool2d(x, (h, h))
    step = n / h
    idx = torch.tensor([round(i * step) for i in range(h)]) if step == int(step) else None
    if idx is not None:
        torch.testing.assert_close(y, x[:, :, idx][:, :, :, idx])
    else:  # non-integer step: compare with the continuous band-limited signal
        t = torch.arange(h, dtype=torch.float64) * step
        s2 = torch.zeros(h, dtype=torch.float64)
        for f in range(0, (h + 1) // 2):
            s2 += torch.cos(2 * torch.pi * f * t / n + 0.3 * f) / (1 + f)
        torch.testing.assert_close(y[0, 0], s2[:, None] * s2[None, :] + s2[:, None])


def test_spectral_gradcheck():
    x = _input(1, 1, 6, 5, seed=13, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: spectral_pool2d(t, (3, 2)), (x,), fast_mode=True)


@pytest.mark.parametrize("shape", SIZES)
def test_lp_pooling(shape):
    x = _input(*shape, seed=14, dtype=torch.float64)
    torch.testing.assert_close(LpPool2d(1, 2)(x), F.avg_pool2d(x.abs(), 2) * 4)
    ref = _loop_pool(x, 3, 2, 1, lambda v: v.abs().pow(3).sum().pow(1 / 3))
    torch.testing.assert_close(LpPool2d(3, 3, 2, 1)(x), ref)
    assert torch.isfinite(LpPool2d(2.5)(x * 1e20)).all()


@pytest.mark.parametrize("shape", SIZES)
def test_gem(shape):
    x = _input(*shape, seed=15, dtype=torch.float64)
    m = get_pool("gem", shape[1]).double()
    ref = _loop_pool(x, 2, 2, 0, lambda v: v.clamp(min=1e-6).pow(3).mean().pow(1 / 3))
    torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize("shape", SIZES)
def test_rank_and_median(shape):
    x = _input(*shape, seed=16, dtype=torch.float64)
    torch.testing.assert_close(RankPool2d(t=1)(x), F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(RankPool2d(t=9)(x), F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))
    ref = _loop_pool(x, 3, 2, 1, lambda v: v.sort(descending=True).values[:4].mean())
    torch.testing.assert_close(RankPool2d(t=4)(x), ref)
    ref = _loop_pool(x, 3, 2, 1, lambda v: (v.sort(descending=True).values
                                            * 0.5 ** torch.arange(1, len(v) + 1)).sum())
    torch.testing.assert_close(RankPool2d(mode="rwp")(x), ref)
    ref = _loop_pool(x, 3, 2, 1, lambda v: v.sort().values[(len(v) - 1) // 2])
    torch.testing.assert_close(MedianPool2d()(x), ref)
    ref = _loop_pool(x, 2, 2, 0, lambda v: v.sort().values[1])  # lower median of 4
    torch.testing.assert_close(MedianPool2d(2, 2, 0)(x), ref)


@pytest.mark.parametrize("shape", SIZES)
def test_mixed_gated_tree(shape):
    x = _input(*shape, seed=17, dtype=torch.float64)
    mx, av = F.max_pool2d(x, 2), F.avg_pool2d(x, 2)
    m = MixedPool2d(2)
    torch.testing.assert_close(m.eval()(x), 0.5 * (mx + av))
    with _rng.use_generator(_rng.generator(0, 0, 0)):
        y = m.train()(x)
    for b, c in itertools.product(range(shape[0]), range(shape[1])):
        assert torch.equal(y[b, c], mx[b, c]) or torch.equal(y[b, c], av[b, c])
    torch.manual_seed(0)
    g = GatedPool2d(2).double()
    w = g.weight.detach().flatten()
    gate = _loop_pool(x, 2, 2, 0, lambda v: torch.sigmoid((v * w).sum()))
    torch.testing.assert_close(g(x), gate * mx + (1 - gate) * av)
    t = TreePool2d(2).double()
    v1, v2, wt = (t.weight.detach()[i].flatten() for i in range(3))
    ref = _loop_pool(x, 2, 2, 0, lambda v: torch.sigmoid((v * wt).sum()) * (v * v1).sum()
                     + (1 - torch.sigmoid((v * wt).sum())) * (v * v2).sum())
    torch.testing.assert_close(t(x), ref)


def _dpp_reference(x, alpha, lam, asym=False):
    n, c, h, w = x.shape
    out = torch.empty(n, c, h // 2, w // 2, dtype=x.dtype)
    for b, ch, i, j in itertools.product(range(n), range(c), range(h // 2), range(w // 2)):
        v = x[b, ch, 2 * i:2 * i + 2, 2 * j:2 * j + 2].flatten()
        d = v - v.mean()
        if asym:
            d = d.clamp(min=0)
        q = d * d + 1e-3
        q = q / q.mean()
        wt = q ** (lam / 2) + alpha
        out[b, ch, i, j] = (v * wt).sum() / wt.sum()
    return out


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_dpp_lite(shape, symmetric):
    x = _input(*shape, seed=18, dtype=torch.float64)
    m = DPPool2d(shape[1], symmetric=symmetric).double()
    with torch.no_grad():
        m.log_alpha.fill_(0.2)
        m.log_lambda.fill_(-0.3)
    ref = _dpp_reference(x, torch.exp(torch.tensor(0.2)), torch.exp(torch.tensor(-0.3)), not symmetric)
    torch.testing.assert_close(m(x), ref)


def test_dpp_full_rule_and_shape():
    m = DPPool2d(3, variant="full")
    assert m(_input(2, 3, 8, 8)).shape == (2, 3, 4, 4)
    assert m.rf_rule() == RFRule.make(3, 2, 1)


def test_fractional_windows_match_torch():
    x = _input(2, 3, 17, 15, seed=19)
    m = FractionalMaxPool2d(3, 0.5)
    samples = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x, _random_samples=samples),
                               F.fractional_max_pool2d(x, 3, output_size=(8, 7), _random_samples=samples))
    m.eval()
    ramp = torch.arange(17 * 15, dtype=torch.float32).reshape(1, 1, 17, 15)
    _, idx = F.fractional_max_pool2d(ramp, 3, output_size=(8, 7), return_indices=True,
                                     _random_samples=torch.full((1, 1, 2), 0.5))
    torch.testing.assert_close(m(ramp), ramp.flatten()[idx])
    rows, cols = idx[0, 0, :, 0] // 15 - 2, idx[0, 0, 0, :] % 15 - 2
    assert rows.tolist() == fractional_starts(0.5, 17, 8, 3).tolist()
    assert cols.tolist() == fractional_starts(0.5, 15, 7, 3).tolist()
    assert m.rf_input_span(0, 1, 3, 17, 8) == (int(rows[1]), int(rows[3]) + 2)


def test_s3_eval_and_train():
    x = _input(2, 3, 16, 12, seed=20)
    m = S3Pool2d()
    mp = F.max_pool2d(x, 2, 1)
    torch.testing.assert_close(m.eval()(x), F.avg_pool2d(mp, 2, 2, 1, count_include_pad=False))
    m.train()
    with _rng.use_generator(_rng.generator(0, 0, 0)):
        y = m(x)
    rows, cols = m.last_indices
    assert y.shape == (2, 3, 8, 6)
    for r in (rows, cols):
        assert (r.diff() > 0).all()
        for g in range(0, len(r), 2):  # two rows from each grid of 4
            assert len(set((r[g:g + 2] // 4).tolist())) == 1
    padded = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)
    torch.testing.assert_close(y, padded[:, :, rows][:, :, :, cols])
    assert m.rf_input_span(0, 1, 1, 16, 8) == (int(rows[1]), int(rows[1]) + 1)


def test_blur_and_maxblur():
    x = _input(2, 2, 9, 8, seed=21, dtype=torch.float64)
    filt = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    filt = torch.outer(filt, filt) / 64
    xp = F.pad(x, (1, 2, 1, 2), mode="reflect")
    ho, wo = (xp.shape[-2] - 4) // 2 + 1, (xp.shape[-1] - 4) // 2 + 1
    ref = torch.empty(2, 2, ho, wo, dtype=torch.float64)
    for i, j in itertools.product(range(ho), range(wo)):
        ref[:, :, i, j] = (xp[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4] * filt).sum((-1, -2))
    blur = get_pool("blur", 2)
    torch.testing.assert_close(blur(x), ref)
    torch.testing.assert_close(get_pool("maxblur", 2)(x), blur(F.max_pool2d(x, 2, 1)))


def test_second_order_heads():
    x = _input(2, 3, 5, 4, seed=22, dtype=torch.float64)
    f = x.reshape(2, 3, -1)
    cov = torch.stack([torch.cov(fi, correction=0) for fi in f])
    ev, vec = torch.linalg.eigh(cov)
    root = vec @ torch.diag_embed(ev.clamp(min=0).sqrt()) @ vec.transpose(1, 2)
    iu = torch.triu_indices(3, 3)
    y = get_pool("covariance", 3, iterations=40).double()(x)
    torch.testing.assert_close(y, root[:, iu[0], iu[1]], atol=1e-6, rtol=1e-5)
    assert get_pool("covariance", 3)(x).shape == (2, 6)
    b = sum(torch.outer(f[:, :, m][0], f[:, :, m][0]) for m in range(20)) / 20
    b = torch.sign(b) * torch.sqrt(b.abs() + 1e-10)
    torch.testing.assert_close(get_pool("bilinear", 3)(x)[0], (b / b.norm()).flatten())
    torch.manual_seed(0)
    nv = get_pool("netvlad", 3, clusters=4).double()
    xn = F.normalize(x, dim=1).reshape(2, 3, -1)
    logits = torch.einsum("kc,ncm->nkm", nv.assign.weight[:, :, 0, 0], xn) + nv.assign.bias[None, :, None]
    a = logits.softmax(1)
    v = torch.zeros(2, 4, 3, dtype=torch.float64)
    for n, k, m in itertools.product(range(2), range(4), range(20)):
        v[n, k] += a[n, k, m] * (xn[n, :, m] - nv.centroids[k])
    v = F.normalize(F.normalize(v, dim=2).reshape(2, -1), dim=1)
    torch.testing.assert_close(nv(x), v)


def test_global_heads_shapes():
    x = _input(2, 4, 9, 8, seed=23)
    torch.testing.assert_close(get_pool("gap", 4)(x), x.mean((-2, -1), keepdim=True))
    spp = get_pool("spp", 4)(x)
    assert spp.shape == (2, 4 * 21)
    torch.testing.assert_close(spp[:, -4:], x.amax((-2, -1)))
    assert get_pool("yolo_spp", 4)(x).shape == x.shape


@pytest.mark.skipif(not HAS_TV, reason="torchvision missing")
def test_roi_heads_whole_box():
    x = _input(2, 4, 8, 8, seed=24)
    torch.testing.assert_close(get_pool("roi_pool", 4, output_size=2)(x), F.adaptive_max_pool2d(x, 2))
    torch.testing.assert_close(get_pool("roi_align", 4, output_size=2)(x), F.avg_pool2d(x, 4),
                               atol=1e-5, rtol=1e-5)


def test_roi_without_torchvision_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"erf-toolkit\[vision\]"):
        get_pool("roi_align", 4)


SMOOTH = ["avg", "lp", "gem", "gated", "tree", "dpp", "lip", "softpool", "blur", "strided",
          "dilated", "stochastic", "mixed", "maxavg", "gap", "covariance", "bilinear", "netvlad"]


@pytest.mark.parametrize("name", SMOOTH)
def test_gradcheck(name):
    m = _make(name).eval().double()
    if name == "lip":
        torch.nn.init.normal_(m.logit.conv.weight, std=0.3)
    x = _input(1, C, 6, 6, seed=25, dtype=torch.float64)
    if name in ("gem", "stochastic"):
        x = x.abs() + 0.5
    x.requires_grad_(True)
    params = tuple(p for p in m.parameters() if p.requires_grad)
    if sum(p.numel() for p in params) > 60:  # keep it fast: inputs only
        params = ()
    assert torch.autograd.gradcheck(lambda t, *ps: m(t), (x,) + params, fast_mode=True)


def test_validation_errors():
    with pytest.raises(ValueError):
        LpPool2d(p=-1)
    with pytest.raises(ValueError):
        RankPool2d(t=10)
    with pytest.raises(ValueError):
        DPPool2d(3, variant="huge")
    with pytest.raises(ValueError):
        S3Pool2d(grid_size=3)
    with pytest.raises(ValueError):
        MixedPool2d(p_max=2.0)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_runs(name):
    m = _make(name).to(torch.bfloat16)
    x = (_input(2, C, 16, 16, seed=26) * 1000).to(torch.bfloat16).requires_grad_(True)
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
