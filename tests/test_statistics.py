"""Statistics against two-pass references, and the checkpoint fingerprint field by field.

Running moments (Chan, Golub & LeVeque 1979) and the per-draw (clustered) statistics are fed
batches of unequal sizes, 0/1 weights (skipped non-finite samples) and cropped windows, merged
with unequal counts, and compared with the textbook two-pass formulas on the raw samples:
mean = sum x / n, M2 = sum (x - mean)^2, and with draws d as clusters W = sum_d sum_i
(x_di - xbar_d)^2, Var_c(mean) = D / (D - 1) sum_d (n_d / N)^2 (xbar_d - mean)^2 (Cameron &
Miller 2015). Then the engine: merge of runs over unequal numbers of draws, and resume after
interruptions, against the slow reference (tests/_reference.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import erf
import _reference as ref
from erf._stats import ClusteredMoments, ClusterStats, RunningMoments, merge_numpy, stderr_of

F64 = dict(dtype=torch.float64, device="cpu", progress=False)


def _samples(n, shape=(3, 4), seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n,) + shape) * g.uniform(0.5, 3.0, size=shape) + g.normal(size=shape)


def _two_pass(x):
    mean = x.sum(0) / x.shape[0]
    return x.shape[0], mean, ((x - mean) ** 2).sum(0)


# ------------------------------------------------------------------------------- running moments


def test_running_moments_unequal_batches_weights_and_windows():
    x = _samples(23, (5, 6))
    keep = np.ones(23, bool)
    keep[[2, 3, 11, 19]] = False  # skipped samples (non-finite maps in the engine)
    window = (slice(1, 4), slice(2, 6))
    xw = np.zeros_like(x)
    xw[(slice(None),) + window] = x[(slice(None),) + window]  # cropped maps are 0 outside the window
    acc = RunningMoments.zeros((5, 6))
    lo = 0
    for size in (1, 7, 2, 13):  # unequal batches
        b = torch.from_numpy(x[lo:lo + size][(slice(None),) + window].copy())
        w = torch.from_numpy(keep[lo:lo + size].astype(np.float64))
        acc.update(b, weight=w if size != 1 else None, window=window)
        lo += size
    n, mean, m2 = acc.to_numpy()
    n_ref, mean_ref, m2_ref = _two_pass(xw[keep])
    assert n == n_ref == 19
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(stderr_of(n, m2), np.sqrt(m2_ref / (n_ref - 1) / n_ref), rtol=1e-11)


def test_a_weighted_batch_with_one_kept_sample():
    """Weights that keep a single sample of a batch: its map is the batch mean, M2 = 0."""
    x = _samples(3, seed=9)
    acc = RunningMoments.zeros((3, 4))
    acc.update(torch.from_numpy(x), weight=torch.tensor([0.0, 1.0, 0.0]))
    n, mean, m2 = acc.to_numpy()
    assert n == 1
    np.testing.assert_allclose(mean, x[1], rtol=1e-14)
    np.testing.assert_allclose(m2, 0.0, atol=1e-14)
    cm = ClusteredMoments.zeros((3, 4), first_draw=0, draws=1)
    cm.update(torch.from_numpy(x), draw=0, weight=torch.tensor([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(cm.mean_and_stderr()[0].numpy(), x[2], rtol=1e-14)


@pytest.mark.parametrize("split", [1, 2, 5, 17])
def test_chan_merge_with_unequal_counts_equals_two_pass(split):
    x = _samples(19, seed=split)
    a, b = _two_pass(x[:split]), _two_pass(x[split:])
    n, mean, m2 = merge_numpy(a, b)
    n_ref, mean_ref, m2_ref = _two_pass(x)
    assert n == n_ref
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-11, atol=1e-12)
    # the torch accumulators, merged in either order
    ra, rb = (RunningMoments.from_numpy(*t) for t in (a, b))
    for merged in (ra.merge(rb), rb.merge(ra)):
        n2, mean2, m22 = merged.to_numpy()
        assert n2 == n_ref
        np.testing.assert_allclose(mean2, mean_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(m22, m2_ref, rtol=1e-11, atol=1e-12)
    # merging with an empty accumulator is the identity
    empty = (0, np.zeros_like(mean), np.zeros_like(m2))
    for pair in ((empty, a), (a, empty)):
        n3, mean3, m23 = merge_numpy(*pair)
        assert n3 == a[0]
        np.testing.assert_allclose(mean3, a[1], rtol=1e-14)
        np.testing.assert_allclose(m23, a[2], rtol=1e-14)


# ------------------------------------------------------------------------------ clustered statistics


def _cluster_reference(groups):
    """Two-pass clustered statistics of ``{draw: samples}``."""
    allx = np.concatenate(list(groups.values()))
    N, D = allx.shape[0], len(groups)
    m = allx.mean(0)
    W = sum(((g - g.mean(0)) ** 2).sum(0) for g in groups.values())
    var = D / (D - 1) * sum((len(g) / N) ** 2 * (g.mean(0) - m) ** 2 for g in groups.values())
    return N, m, W, ((allx - m) ** 2).sum(0), np.sqrt(var)


def test_clustered_moments_unequal_draws_weights_and_merge():
    groups = {3: _samples(1, seed=1), 4: _samples(6, seed=2), 5: _samples(11, seed=3), 6: _samples(4, seed=4)}
    skip = {5: [0, 7]}  # samples of draw 5 masked out (weight 0)
    # two accumulators (two processes) each hold parts of draws, batches of unequal size
    a = ClusteredMoments.zeros((3, 4), first_draw=3, draws=4)
    b = ClusteredMoments.zeros((3, 4), first_draw=3, draws=4)
    for d, x in groups.items():
        w = np.ones(len(x))
        w[skip.get(d, [])] = 0.0
        cut = len(x) // 3
        for acc, sl in ((a, slice(0, cut)), (b, slice(cut, None))):
            if len(x[sl]):
                acc.update(torch.from_numpy(x[sl]), draw=d, weight=torch.from_numpy(w[sl]))
    got = a.merge(b)
    kept = {d: np.delete(x, skip.get(d, []), axis=0) for d, x in groups.items()}
    N, m, W, M2, se = _cluster_reference(kept)
    mean, stderr = (t.numpy() for t in got.mean_and_stderr())
    np.testing.assert_allclose(mean, m, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stderr, se, rtol=1e-10)
    host = got.to_host()
    assert host.n == N == 20 and host.draws == 4 and host.df == 3
    np.testing.assert_allclose(host.within_ss, W, rtol=1e-11, atol=1e-12)
    n2, mean2, m22 = host.moments()
    np.testing.assert_allclose(m22, M2, rtol=1e-11)
    np.testing.assert_allclose(host.stderr, se, rtol=1e-10)
    # host-side merge of disjoint draws (unequal counts) equals the two-pass statistics as well
    parts = [ClusterStats([d], [len(x)], [x.mean(0)], ((x - x.mean(0)) ** 2).sum(0)) for d, x in kept.items()]
    merged = parts[0].merge(parts[2]).merge(parts[1].merge(parts[3]))
    np.testing.assert_allclose(merged.mean, m, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(merged.stderr, se, rtol=1e-10)
    np.testing.assert_allclose(merged.within_ss, W, rtol=1e-11, atol=1e-12)


def test_one_draw_stderr_is_the_input_level_error():
    x = _samples(9, seed=5)
    acc = ClusteredMoments.zeros((3, 4), first_draw=0, draws=1)
    acc.update(torch.from_numpy(x[:4]), draw=0)
    acc.update(torch.from_numpy(x[4:]), draw=0)
    _, stderr = acc.mean_and_stderr()
    np.testing.assert_allclose(stderr.numpy(), x.std(0, ddof=1) / 3.0, rtol=1e-11)


# ------------------------------------------------------------------------------------ the engine


class _RootAbs(nn.Module):
    """sqrt(|z|): its derivative at z = 0 is NaN, so an all-zero input gives a non-finite map."""

    def forward(self, z):
        return torch.sqrt(z.abs())


def _factory():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), _RootAbs(), nn.Conv2d(4, 3, 3, padding=1))


def _ref_draw_maps(x, draws, seed, reduce="abs", **target):
    from erf._rng import key_seed

    out = {}
    for d in draws:
        torch.manual_seed(key_seed(seed, "weights", d))
        out[d] = ref.maps_of(ref.gradients(ref.prepare(_factory()), x, **target), reduce)
    return out


def _x(n=5, zero_rows=(1,)):
    x = torch.randn((n, 3, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x[list(zero_rows)] = 0.0  # skipped by nonfinite="skip": its gradient is NaN
    return x


def test_merge_of_unequal_draw_ranges_equals_reference():
    """1 draw merged with 3 draws (counts 4 and 12 after one skipped input per draw)."""
    x = _x()
    kw = dict(inputs=x, seed=3, reduce="abs", channel=[0, 2], unit=(1, 5), nonfinite="skip", **F64)
    with pytest.warns(UserWarning, match="skipped"):
        a = erf.effective_rf(_factory, (3, 8, 8), draws=1, first_draw=0, **kw)
    with pytest.warns(UserWarning, match="skipped"):
        b = erf.effective_rf(_factory, (3, 8, 8), draws=3, first_draw=1, **kw)
    merged = b.merge(a)
    maps = _ref_draw_maps(x[[0, 2, 3, 4]], range(4), 3, channel=[0, 2], unit=(1, 5))
    allmaps = np.concatenate(list(maps.values()))
    assert (a.n, b.n, merged.n) == (4, 12, 16)
    ref.assert_maps_equal(merged.map, allmaps.mean(0))
    with pytest.warns(UserWarning, match="skipped"):
        whole = erf.effective_rf(_factory, (3, 8, 8), draws=4, **kw)
    ref.assert_maps_equal(merged.map, whole.map, rtol=1e-12)
    np.testing.assert_allclose(merged.stderr, whole.stderr, rtol=1e-9)
    assert merged.config["draw_ranges"] == [[0, 4]]


_CALLS = {"n": 0}


class _InterruptAt(nn.Module):
    """Identity that raises KeyboardInterrupt on its ``k``-th forward call (a simulated Ctrl-C)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        _CALLS["n"] += 1
        if _CALLS["n"] == self.k:
            raise KeyboardInterrupt
        return x


def test_resume_after_interruptions_equals_reference(tmp_path):
    """Batches of 3 over 5 inputs (unequal: 3 + 2), 3 draws, a skipped input per draw; interrupted
    twice, resumed from the checkpoint each time; the map equals the two-pass reference."""
    from erf.engine import RunInterrupted

    x = _x()
    ckpt = tmp_path / "c.npz"
    kw = dict(inputs=x, seed=5, draws=3, reduce="square", channel=1, batch_size=3, nonfinite="skip",
              checkpoint=ckpt, checkpoint_every=1, resume=True, **F64)

    def factory(k):
        return lambda: nn.Sequential(_factory(), _InterruptAt(k))

    for k in (3, 3):  # the probe is call 1: call 3 is the second batch of the run
        _CALLS["n"] = 0
        with pytest.raises(RunInterrupted):
            erf.effective_rf(factory(k), (3, 8, 8), **kw)
    _CALLS["n"] = 0
    with pytest.warns(UserWarning, match="skipped"):
        r = erf.effective_rf(factory(10 ** 9), (3, 8, 8), **kw)
    maps = np.concatenate(list(_ref_draw_maps(x[[0, 2, 3, 4]], range(3), 5, reduce="square", channel=1).values()))
    assert r.n == 12
    ref.assert_maps_equal(r.map, maps.mean(0))


# ------------------------------------------------------------------------------ the fingerprint


def _module(kernel=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, kernel, padding=kernel // 2), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1))


_BASE = dict(n_inputs=6, seed=1, reduce="abs", batch_size=4, checkpoint_every=1, progress=False)
_X = torch.randn((6, 3, 8, 8), generator=torch.Generator().manual_seed(3))
MUST_CHANGE = {  # what changes the numbers -> (what the refusal names, the change)
    "model structure": ("model_hash", dict(model=_module(kernel=5))),  # modules, draws=1: weights as they are
    "weights": ("fingerprint.weights", dict(model=_module(seed=1))),
    "input values": ("fingerprint.inputs", dict(inputs=_X + 1e-3 * (torch.arange(_X.numel()).reshape(_X.shape) == 7))),
    "seed": ("seed", dict(seed=2)),
    "reduce": ("reduce", dict(reduce="square")),
    "unit": ("units", dict(unit=(2, 3))),
    "channel": ("channel", dict(channel=1)),
    "unit_relu": ("unit_relu", dict(unit_relu=True)),
    "layer": ("layers", dict(layer="1")),
    "n_inputs": ("n_inputs", dict(n_inputs=7)),
    "init": ("init", dict(init="normal")),
    "draws": ("draws", dict(draws=2)),
    "dtype": ("dtype", dict(dtype=torch.float64)),
    "method": ("method", dict(method="guided_backprop")),
}
MUST_NOT = {"batch size": dict(batch_size=2), "progress": dict(progress=True)}


def _run(ckpt, resume, **change):
    kw = dict(_BASE, **change)
    model = kw.pop("model", None) or _module()
    if "inputs" not in kw and change.get("n_inputs") is None and "seed" not in change:
        kw["inputs"] = _X
    return erf.effective_rf(model, (3, 8, 8), checkpoint=ckpt, resume=resume, **kw)


@pytest.mark.parametrize("field", list(MUST_CHANGE))
def test_fingerprint_refuses_a_checkpoint_of_another_run(field, tmp_path):
    ckpt = tmp_path / "c.npz"
    named, change = MUST_CHANGE[field]
    base = {"inputs": "gaussian"} if "seed" in change or "n_inputs" in change else {}
    _run(ckpt, False, **base)
    with pytest.raises(ValueError, match="another configuration") as info:
        _run(ckpt, True, **dict(base, **change))
    assert f" {named}" in str(info.value).split("differs in")[1]  # resuming across it is refused, and why


@pytest.mark.parametrize("field", list(MUST_NOT))
def test_fingerprint_ignores_batch_size_and_progress(field, tmp_path, capsys):
    ckpt = tmp_path / "c.npz"
    first = _run(ckpt, False)
    again = _run(ckpt, True, **MUST_NOT[field])
    assert again.n == first.n and np.array_equal(again.map, first.map)


def test_merge_refuses_results_of_other_weights():
    kw = dict(inputs=_X, draws=1, progress=False)
    a = erf.effective_rf(lambda: _module(seed=0), (3, 8, 8), first_draw=0, **kw)
    b = erf.effective_rf(lambda: _module(seed=1), (3, 8, 8), first_draw=1, **kw)
    with pytest.raises(ValueError, match="differ"):
        a.merge(b)
