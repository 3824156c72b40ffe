"""erf._stats: two-level (clustered) statistics and the per-map test, against textbook formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from erf._stats import ClusteredMoments, ClusterStats, map_test, welch_z

SHAPE = (5, 6)


def _samples(seed: int, sizes, shape=SHAPE, between=1.0):
    """Per-draw samples x[d] of shape (n_d, *shape): a draw effect plus input noise."""
    rng = np.random.default_rng(seed)
    return [between * rng.normal(size=shape) + rng.normal(size=(n,) + shape) * (1 + d)
            for d, n in enumerate(sizes)]


def _textbook(xs):
    """Cluster-robust (CR1) variance of the mean: the sandwich of an intercept-only regression,
    (X'X)^-1 [sum_g (X_g' u_g)(u_g' X_g)] (X'X)^-1 times G / (G - 1); and the one-way ANOVA."""
    allx = np.concatenate(xs)
    N, G = len(allx), len(xs)
    m = allx.mean(0)
    meat = sum((x - m).sum(0) ** 2 for x in xs)
    var = meat / N ** 2 * G / (G - 1)
    ssw = sum(((x - x.mean(0)) ** 2).sum(0) for x in xs)
    msw = ssw / (N - G)
    msb = sum(len(x) * (x.mean(0) - m) ** 2 for x in xs) / (G - 1)
    n0 = (N - sum(len(x) ** 2 for x in xs) / N) / (G - 1)
    return m, np.sqrt(var), msw, np.maximum((msb - msw) / n0, 0), ((allx - m) ** 2).sum(0)


def _accumulate(xs, first_draw=3, draws=None, seed=0, window_pad=0):
    rng = np.random.default_rng(seed)
    draws = draws or len(xs)
    shape = xs[0].shape[1:]
    acc = ClusteredMoments.zeros(shape, first_draw, draws)
    for d, x in enumerate(xs):
        i = 0
        while i < len(x):  # batches of random size
            j = min(len(x), i + int(rng.integers(1, 4)))
            acc.update(torch.from_numpy(x[i:j]), first_draw + d)
            i = j
    return acc


def test_clustered_stderr_equals_textbook_sandwich():
    xs = _samples(0, [4, 7, 5, 9])
    m, se, msw, between, m2 = _textbook(xs)
    host = _accumulate(xs).to_host()
    np.testing.assert_allclose(host.mean, m, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(host.stderr, se, rtol=1e-10)
    n, mean, M2 = host.moments()
    assert n == 25 and host.draws == 4 and host.df == 3
    np.testing.assert_allclose(M2, m2, rtol=1e-10)
    vc = host.variance_components()
    np.testing.assert_allclose(vc["within"], msw, rtol=1e-10)
    np.testing.assert_allclose(vc["between"], between, rtol=1e-10, atol=1e-12)
    assert vc["draws"] == 4 and vc["n"] == 25
    # equal draw sizes: the sample variance of the draw means over D
    eq = _samples(1, [6, 6, 6])
    means = np.stack([x.mean(0) for x in eq])
    np.testing.assert_allclose(_accumulate(eq).to_host().stderr, means.std(0, ddof=1) / math.sqrt(3), rtol=1e-10)


def test_one_draw_gives_the_input_level_error():
    (x,) = _samples(2, [11])
    host = _accumulate([x]).to_host()
    np.testing.assert_allclose(host.stderr, x.std(0, ddof=1) / math.sqrt(11), rtol=1e-10)
    assert host.df == 10 and host.variance_components()["between"] is None


def test_merge_of_disjoint_draws_and_of_parts_of_one_draw_is_exact():
    xs = _samples(3, [5, 3, 8, 6, 2])
    whole = _accumulate(xs, first_draw=0).to_host()
    a = _accumulate(xs[:2], first_draw=0).to_host()
    b = _accumulate(xs[2:], first_draw=2).to_host()
    for merged in (a.merge(b), b.merge(a)):
        np.testing.assert_array_equal(merged.draw_index, [0, 1, 2, 3, 4])
        np.testing.assert_allclose(merged.stderr, whole.stderr, rtol=1e-10)
        np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(merged.moments()[2], whole.moments()[2], rtol=1e-10)
    # two processes holding parts of the same draws (torch.distributed), same dense layout
    p = ClusteredMoments.zeros(SHAPE, 0, 5)
    q = ClusteredMoments.zeros(SHAPE, 0, 5)
    for d, x in enumerate(xs):
        cut = len(x) // 2
        p.update(torch.from_numpy(x[:cut]), d)
        if cut < len(x):
            q.update(torch.from_numpy(x[cut:]), d)
    both = p.merge(q).to_host()
    np.testing.assert_allclose(both.stderr, whole.stderr, rtol=1e-10)
    np.testing.assert_allclose(both.within_ss, whole.within_ss, rtol=1e-10)
    # host-side merge of parts of a draw too
    np.testing.assert_allclose(p.to_host().merge(q.to_host()).stderr, whole.stderr, rtol=1e-10)
    # the flat form (what all_gather moves) round-trips
    back = p.from_flat(p.flat())
    np.testing.assert_array_equal(back.mean_draw.numpy(), p.mean_draw.numpy())
    assert p.flat().numel() == p.numel_flat()


def test_windows_and_masks_match_the_full_maps():
    xs = _samples(4, [6, 4, 5])
    win = (slice(1, 4), slice(2, 5))
    cut = [np.zeros_like(x) for x in xs]
    for c, x in zip(cut, xs):
        c[(slice(None),) + win] = x[(slice(None),) + win]
    full = _accumulate(cut).to_host()
    acc = ClusteredMoments.zeros(SHAPE, 3, 3)
    for d, x in enumerate(xs):
        bad = np.full((2,) + SHAPE[:0] + x.shape[1:], np.nan)[:, win[0], win[1]]
        batch = np.concatenate([x[(slice(None),) + win], bad])
        weight = torch.tensor([1.0] * len(x) + [0.0, 0.0])
        acc.update(torch.from_numpy(batch), 3 + d, weight=weight, window=win)
    got = acc.to_host()
    np.testing.assert_allclose(got.stderr, full.stderr, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got.within_ss, full.within_ss, rtol=1e-10, atol=1e-15)
    assert got.n == 15


def test_device_stderr_and_saved_arrays_agree_with_host():
    xs = _samples(5, [3, 4, 4])
    acc = _accumulate(xs)
    mean, se = acc.mean_and_stderr()
    host = acc.to_host()
    np.testing.assert_allclose(se.numpy(), host.stderr, rtol=1e-12)
    np.testing.assert_allclose(mean.numpy(), host.mean, rtol=1e-12)
    again = ClusterStats.from_arrays(host.arrays())
    np.testing.assert_array_equal(again.stderr, host.stderr)
    assert ClusterStats.from_arrays({"map": host.mean}) is None  # an older file
    state = acc.state("t0_")
    fresh = ClusteredMoments.zeros(SHAPE, 3, 3)
    fresh.load_state(state, "t0_")
    np.testing.assert_array_equal(fresh.to_host().stderr, host.stderr)
    with pytest.raises(ValueError, match="layout"):
        ClusteredMoments.zeros(SHAPE, 0, 3).load_state(state, "t0_")
    with pytest.raises(ValueError, match="inconsistent"):
        ClusterStats([0, 1], [1.0], np.zeros((2,) + SHAPE), np.zeros(SHAPE))


def test_normalized_stderr_is_the_clustered_error_of_the_ratio():
    """Reference: the textbook CR1 sandwich of the linearised ratio, from the samples themselves."""
    xs = [np.abs(x) for x in _samples(8, [5, 6, 4, 7])]
    win = (slice(1, 4), slice(0, 5))
    host = _accumulate(xs).to_host()
    allx = np.concatenate(xs)[(slice(None),) + win]
    N, G = len(allx), len(xs)
    m = allx.mean(0)
    T = m.sum()
    r = m / T
    u = (allx - r * allx.reshape(N, -1).sum(1)[:, None, None]) / T  # influence of each sample
    cuts = np.cumsum([0] + [len(x) for x in xs])
    meat = sum(u[a:b].sum(0) ** 2 for a, b in zip(cuts[:-1], cuts[1:]))
    ref = np.sqrt(meat / N ** 2 * G / (G - 1))
    np.testing.assert_allclose(host.normalized_stderr(win), ref, rtol=1e-10)
    # the total's uncertainty matters: the naive stderr / T differs
    assert not np.allclose(host.stderr[win] / T, ref, rtol=0.05)


def test_welch_z_matches_scipy():
    rng = np.random.default_rng(6)
    d, sa, sb = rng.normal(size=50) * 3, rng.uniform(0.5, 2, 50), rng.uniform(0.5, 2, 50)
    z, se, df = welch_z(d, sa, 3.0, sb, 7.0)
    ref_df = (sa ** 2 + sb ** 2) ** 2 / (sa ** 4 / 3 + sb ** 4 / 7)
    np.testing.assert_allclose(df, ref_df, rtol=1e-12)
    p = 2 * scipy.stats.t.sf(np.abs(d / se), ref_df)
    np.testing.assert_allclose(2 * scipy.stats.norm.sf(np.abs(z)), p, rtol=1e-8)
    # far tails stay finite (log-space), and zero/zero is 0
    z, _, _ = welch_z(np.array([1e3, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), 3, np.array([1.0, 0.0, 0.0]), 3)
    assert np.isfinite(z[0]) and z[0] > 5 and z[1] == 0 and z[2] == np.inf


# ------------------------------------------------------------------ the per-map test
def _field(rng, D, n, shape=(24, 24), gain_sd=0.4, shift=0.0, width=4.0):
    """Per-draw mean maps of a spatially correlated random field: each draw has a log-normal gain
    (weights change a network's overall scale) and smooth noise; inputs add smooth noise."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.indices(shape) - (np.array(shape)[:, None, None] - 1) / 2
    base = np.exp(-0.5 * ((yy - shift) ** 2 + xx ** 2) / width ** 2)
    means = []
    for _ in range(D):
        gain = math.exp(gain_sd * rng.normal())
        draw = gain * base * (1 + gaussian_filter(rng.normal(size=shape), 3) * 2)
        noise = gaussian_filter(rng.normal(size=shape), 2) * base / math.sqrt(n)
        means.append(draw + noise)
    return ClusterStats(np.arange(D), np.full(D, float(n)), np.stack(means), np.ones(shape))


@pytest.mark.parametrize("da,na,db,nb", [(4, 16, 4, 16), pytest.param(16, 4, 16, 4, marks=pytest.mark.slow),
                                         pytest.param(6, 16, 12, 2, marks=pytest.mark.slow)])
def test_map_test_is_calibrated_under_the_null(da, na, db, nb):
    """Two samples of the same random field (draws x inputs as given; the last pair has unequal
    covariances): p-values are uniform or conservative, never too small."""
    rng = np.random.default_rng(100 + da + db)
    ps = np.array([map_test(_field(rng, da, na, (16, 16)), _field(rng, db, nb, (16, 16))).p_value
                   for _ in range(300)])
    assert np.all(np.isfinite(ps))
    # binomial(300, 0.05): mean 15, sd 3.8; (300, 0.01): mean 3, sd 1.7
    assert (ps < 0.05).sum() <= 26
    assert (ps < 0.01).sum() <= 9
    assert (ps < 0.5).sum() >= 120  # not absurdly conservative either


def test_map_test_detects_a_wider_field_and_reports_why_it_cannot_run():
    rng = np.random.default_rng(7)
    t = map_test(_field(rng, 16, 16), _field(rng, 16, 16, width=5.0))
    assert t.p_value < 1e-6 and t.df[0] == 6 and "Hotelling" in t.note
    assert t.features == ["log_mass", "spread", "shift0", "shift1", "aniso01", "tilt01"]
    one = _field(rng, 1, 16)
    assert math.isnan(map_test(one, _field(rng, 4, 16)).p_value)
    assert "2 weight draws" in map_test(one, _field(rng, 4, 16)).note
    assert "older version" in map_test(None, one).note


# ------------------------------------------------------------------ through the engine
def _engine_run(**kw):
    import erf
    from erf.nets import conv_stack

    base = dict(n_inputs=6, draws=4, init="normal", batch_size=4, dtype=torch.float64, progress=False,
                device="cpu", seed=3)
    base.update(kw)
    return erf.effective_rf(lambda: conv_stack(3, width=2, act="tanh", in_channels=1), (1, 12, 12), **base)


def test_engine_stderr_is_the_textbook_cluster_robust_value():
    r = _engine_run()
    per = [_engine_run(draws=1, first_draw=d) for d in range(4)]  # the draws one by one
    means = np.stack([p.map for p in per])
    n_d = np.array([p.n for p in per], dtype=float)
    N, G = n_d.sum(), len(per)
    m = np.tensordot(n_d / N, means, axes=1)
    ref = np.sqrt(G / (G - 1) * np.tensordot((n_d / N) ** 2, (means - m) ** 2, axes=1))
    scale = np.abs(ref).max()
    assert r.stderr_kind == "clustered" and r.stderr_df == 3 and r.n == 24
    np.testing.assert_allclose(r.map, m, rtol=1e-12, atol=1e-15 * np.abs(m).max())
    np.testing.assert_allclose(r.stderr, ref, rtol=1e-10, atol=1e-12 * scale)
    # variance components from the one-draw runs' own sums of squares
    msw = sum(p.m2 for p in per) / (N - G)
    msb = np.tensordot(n_d, (means - m) ** 2, axes=1) / (G - 1)
    vc = r.variance_components
    np.testing.assert_allclose(vc["within"], msw, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(vc["between"], np.maximum((msb - msw) / 6, 0), rtol=1e-9, atol=1e-14)
    # one draw: the input-level error, as before
    one = per[0]
    assert one.stderr_kind == "inputs" and one.stderr_df == 5 and one.variance_components["between"] is None
    np.testing.assert_allclose(one.stderr, np.sqrt(one.m2 / 5 / 6), rtol=1e-12)
    # stacked draws (torch.func.vmap) update the same per-draw sums
    stacked = _engine_run(vmap_draws=True)
    np.testing.assert_allclose(stacked.stderr, r.stderr, rtol=1e-9, atol=1e-12 * scale)


def test_merge_save_and_load_keep_the_clustered_stderr(tmp_path):
    import erf

    r = _engine_run()
    a, b = _engine_run(draws=1), _engine_run(draws=3, first_draw=1)
    merged = b.merge(a)
    scale = np.abs(r.stderr).max()
    np.testing.assert_allclose(merged.stderr, r.stderr, rtol=1e-10, atol=1e-12 * scale)
    np.testing.assert_array_equal(merged.clusters.draw_index, [0, 1, 2, 3])
    assert merged.stderr_df == 3
    back = erf.load(merged.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(back.stderr, merged.stderr)
    assert back.stderr_kind == "clustered"
    np.testing.assert_array_equal(back.shape_stderr(), merged.shape_stderr())


def test_older_result_files_fall_back_to_the_input_level_error_and_say_so(tmp_path):
    import erf

    r = _engine_run()
    path = r.save(tmp_path / "new.npz")
    with np.load(path) as z:
        old = {k: z[k] for k in z.files if k not in ("draw_index", "draw_n", "draw_mean", "within_ss")}
    np.savez(tmp_path / "old.npz", **old)
    with pytest.warns(UserWarning, match="without per-draw statistics"):
        back = erf.load(tmp_path / "old.npz")
    assert back.clusters is None and "no per-draw statistics" in back.stderr_kind
    np.testing.assert_allclose(back.stderr, np.sqrt(r.m2 / (r.n - 1) / r.n), rtol=1e-12)
    assert back.variance_components is None and math.isnan(erf.diff(back, r).p_value)
