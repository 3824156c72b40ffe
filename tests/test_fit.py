"""erf.fit: moments, Gaussian fit and metrics on exact multinomial maps and synthetic Gaussians."""
from __future__ import annotations

import math
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from erf.fit import FitWarning, GaussianFit, Moments, fit_gaussian, metrics, moments
from erf.theory import Layer, binomial_profile, gaussian_sigma, linear_erf


def multinomial_map(n: int, pad: int = 0, ndim: int = 2) -> np.ndarray:
    """Outer product of the 3-tap profile, normalised to peak 1, zero-padded by ``pad``."""
    prof = binomial_profile(n, 3)
    peak = prof[n]
    q = np.pad(np.array([c / peak for c in prof]), pad)
    out = q
    for _ in range(ndim - 1):
        out = np.multiply.outer(out, q)
    return out


def rotated_gaussian(shape, center, s_major, s_minor, theta_deg, amp=1.0):
    """2-D Gaussian with major axis at theta from +col towards +row."""
    t = math.radians(theta_deg)
    major = np.array([math.sin(t), math.cos(t)])  # (row, col)
    minor = np.array([math.cos(t), -math.sin(t)])
    cov = s_major**2 * np.outer(major, major) + s_minor**2 * np.outer(minor, minor)
    return gaussian_nd(shape, center, cov, amp), cov


def gaussian_nd(shape, center, cov, amp=1.0):
    grid = np.stack(np.indices(shape), axis=-1).astype(float) - np.asarray(center, dtype=float)
    q = np.einsum("...i,ij,...j->...", grid, np.linalg.inv(cov), grid)
    return amp * np.exp(-0.5 * q)


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + 90.0) % 180.0 - 90.0)


# ------------------------------------------------------------------ moments
@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_moments_sigma_is_exact_for_uniform_stacks(n):
    m = moments(multinomial_map(n, pad=3))
    assert isinstance(m, Moments)
    np.testing.assert_allclose(m.sigma, math.sqrt(2 * n / 3), rtol=1e-9)
    np.testing.assert_allclose(m.center, [n + 3, n + 3], atol=1e-9)
    assert abs(m.cov[0, 1]) < 1e-9
    assert m.anisotropy == pytest.approx(1.0, abs=1e-9)


def test_moments_accept_exact_integer_maps_and_match_theory():
    layers = [Layer.uniform(3, ndim=2)] * 4 + [Layer.avgpool(2, ndim=2)] + [Layer([[1, 2, 1], [1, 1, 1]])] * 2
    erf = linear_erf(layers)  # object array of Fractions
    m = moments(erf)
    np.testing.assert_allclose(m.sigma, gaussian_sigma(layers), rtol=1e-12)
    assert m.total == pytest.approx(float(erf.sum()))


def test_moments_of_rotated_gaussian_and_1d_3d():
    g, cov = rotated_gaussian((101, 121), (47.3, 60.8), 9.0, 4.0, 35.0)
    m = moments(g)
    np.testing.assert_allclose(m.center, [47.3, 60.8], atol=1e-6)
    np.testing.assert_allclose(m.cov, cov, rtol=1e-5, atol=1e-5)
    assert m.theta_deg == pytest.approx(35.0, abs=1e-4)
    assert moments(np.array([0.0, 1.0, 2.0, 1.0])).center[0] == pytest.approx(2.0)
    assert moments([1, 2, 1]).sigma[0] == pytest.approx(math.sqrt(0.5))
    m3 = moments(multinomial_map(6, pad=1, ndim=3))
    np.testing.assert_allclose(m3.sigma, math.sqrt(4.0), rtol=1e-9)


# ------------------------------------------------------------------ Gaussian fit
@pytest.mark.parametrize("n,tol", [(5, 0.04), (10, 0.02), (20, 0.02), (40, 0.02)])
def test_fit_sigma_of_multinomial_maps(n, tol):
    fit = fit_gaussian(multinomial_map(n, pad=10))
    assert isinstance(fit, GaussianFit)
    np.testing.assert_allclose(fit.sigma, math.sqrt(2 * n / 3), rtol=tol)
    np.testing.assert_allclose(fit.center, [n + 10, n + 10], atol=1e-6)
    assert fit.sigma_major / fit.sigma_minor == pytest.approx(1.0, abs=1e-6)
    assert fit.r2 > 0.99


@pytest.mark.parametrize("theta", [-60.0, 0.0, 30.0, 75.0, 90.0])
def test_fit_recovers_rotated_anisotropic_gaussian_with_noise(theta):
    rng = np.random.default_rng(1234)
    g, cov = rotated_gaussian((96, 112), (50.4, 57.7), 11.0, 4.5, theta, amp=2.5)
    noisy = np.abs(g + rng.normal(0.0, 0.03, g.shape))
    fit = fit_gaussian(noisy)
    assert fit is not None
    np.testing.assert_allclose(fit.center, [50.4, 57.7], atol=0.1)
    assert fit.sigma_major == pytest.approx(11.0, rel=0.02)
    assert fit.sigma_minor == pytest.approx(4.5, rel=0.02)
    assert -90.0 < fit.theta_deg <= 90.0
    assert angle_diff(fit.theta_deg, theta) < 2.0
    np.testing.assert_allclose(fit.sigma, np.sqrt(np.diag(cov)), rtol=0.02)
    assert fit.amplitude == pytest.approx(2.5, rel=0.03)
    assert fit.r2 > 0.95
    for key in ("center", "sigma", "cov", "sigma_major", "sigma_minor", "amplitude", "theta_deg"):
        se = np.asarray(fit.stderr[key])
        assert np.all(np.isfinite(se)) and np.all(se >= 0), key
    assert 0 < fit.stderr["theta_deg"] < 2.0


def test_fit_stderr_scales_with_noise():
    g, _ = rotated_gaussian((64, 64), (32, 31), 8.0, 5.0, 20.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 1.0, g.shape)
    small = fit_gaussian(np.abs(g + 0.002 * noise))
    large = fit_gaussian(np.abs(g + 0.05 * noise))
    assert small.stderr["sigma_major"] * 5 < large.stderr["sigma_major"]
    assert np.all(small.stderr["center"] < large.stderr["center"])


def test_fit_1d():
    x = np.arange(80)
    rng = np.random.default_rng(5)
    y = 3.0 * np.exp(-0.5 * ((x - 37.6) / 6.5) ** 2) + np.abs(rng.normal(0, 0.01, x.shape))
    fit = fit_gaussian(y)
    assert fit.center[0] == pytest.approx(37.6, abs=0.1)
    assert fit.sigma[0] == pytest.approx(6.5, rel=0.02)
    assert fit.sigma_major == fit.sigma_minor == pytest.approx(fit.sigma[0])
    assert fit.theta_deg is None and "theta_deg" not in fit.stderr
    assert fit.cov.shape == (1, 1)


def test_fit_3d_full_covariance():
    cov = np.array([[16.0, 4.0, -2.0], [4.0, 9.0, 3.0], [-2.0, 3.0, 6.25]])
    g = gaussian_nd((40, 36, 34), (19.2, 17.5, 16.1), cov, amp=1.7)
    rng = np.random.default_rng(2)
    fit = fit_gaussian(np.abs(g + rng.normal(0, 0.01, g.shape)))
    np.testing.assert_allclose(fit.center, [19.2, 17.5, 16.1], atol=0.1)
    np.testing.assert_allclose(fit.cov, cov, rtol=0.03, atol=0.15)
    np.testing.assert_allclose(fit.sigma, np.sqrt(np.diag(cov)), rtol=0.02)
    assert fit.theta_deg is None
    assert fit.sigma_major == pytest.approx(math.sqrt(np.linalg.eigvalsh(cov)[-1]), rel=0.02)


def test_fit_large_3d_map_is_subsampled_and_still_accurate():
    g = gaussian_nd((72, 72, 72), (36, 35, 37), np.diag([30.0, 20.0, 12.0]))
    fit = fit_gaussian(g)
    assert fit.n_points <= 1 << 17
    np.testing.assert_allclose(fit.sigma, np.sqrt([30.0, 20.0, 12.0]), rtol=1e-4)
    assert fit.r2 > 0.9999


def test_fit_is_fast_on_256_maps():
    g, _ = rotated_gaussian((256, 256), (130.2, 120.9), 30.0, 12.0, -40.0)
    noisy = np.abs(g + np.random.default_rng(0).normal(0, 0.02, g.shape))
    fit_gaussian(noisy)  # warm imports
    start = time.perf_counter()
    fit = fit_gaussian(noisy)
    assert time.perf_counter() - start < 1.0
    assert angle_diff(fit.theta_deg, -40.0) < 1.0


# ------------------------------------------------------------------ signed maps
@pytest.mark.parametrize("offset", [False, True])
def test_fit_signed_noisy_rotated_gaussian(offset):
    """Issue 14: sigmas 6 and 2.5 at 30 degrees plus N(0, 0.01) noise (signed), within 2 % / 2 deg."""
    rng = np.random.default_rng(14)
    g, cov = rotated_gaussian((64, 64), (31.3, 32.6), 6.0, 2.5, 30.0)
    noisy = g + rng.normal(0.0, 0.01, g.shape)
    assert noisy.min() < -0.02  # really signed
    fit = fit_gaussian(noisy, offset=offset)
    assert fit is not None
    assert fit.sigma_major == pytest.approx(6.0, rel=0.02)
    assert fit.sigma_minor == pytest.approx(2.5, rel=0.02)
    assert angle_diff(fit.theta_deg, 30.0) < 2.0
    np.testing.assert_allclose(fit.center, [31.3, 32.6], atol=0.05)
    assert fit.amplitude == pytest.approx(1.0, rel=0.02)
    # goodness of fit: the residual is the noise
    assert fit.rmse == pytest.approx(0.01, rel=0.05)
    assert fit.r2 > 0.99
    if offset:
        assert abs(fit.offset) < 3 * fit.stderr["offset"] + 1e-4
        assert 0 < fit.stderr["offset"] < 1e-3
    else:
        assert fit.offset == 0.0 and "offset" not in fit.stderr


def test_fit_offset_recovers_background_and_trough():
    rng = np.random.default_rng(3)
    g, _ = rotated_gaussian((48, 56), (20.0, 30.0), 5.0, 3.0, -45.0, amp=2.0)
    fit = fit_gaussian(g + 0.7 + rng.normal(0, 0.005, g.shape), offset=True)
    assert fit.offset == pytest.approx(0.7, abs=2e-3)
    assert fit.amplitude == pytest.approx(2.0, rel=0.01)
    assert fit.sigma_major == pytest.approx(5.0, rel=0.01)
    # without the offset the background is absorbed into a wider, worse fit
    plain = fit_gaussian(g + 0.7)
    assert plain.rmse > 10 * fit.rmse
    # a signed map dominated by a trough: negative amplitude
    trough = fit_gaussian(-g + rng.normal(0, 0.01, g.shape))
    assert trough.amplitude == pytest.approx(-2.0, rel=0.01)
    assert angle_diff(trough.theta_deg, -45.0) < 1.0
    assert trough.to_dict()["offset"] == 0.0


def test_fit_of_exact_gaussian_has_zero_residual():
    g, cov = rotated_gaussian((40, 40), (19.5, 20.25), 4.0, 2.0, 60.0, amp=3.0)
    for fit in (fit_gaussian(g), fit_gaussian(g, offset=True)):
        np.testing.assert_allclose(fit.cov, cov, rtol=1e-7)
        assert fit.rmse < 1e-8 and fit.r2 == pytest.approx(1.0, abs=1e-12)
        assert abs(fit.offset) < 1e-9


def test_fit_offset_must_be_bool():
    with pytest.raises(TypeError, match="offset"):
        fit_gaussian(multinomial_map(3), offset=1)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((16, 16)),
        np.full((8, 8), np.nan),
        np.where(np.eye(8) > 0, np.inf, 1.0),
        np.pad(np.ones((1, 1)), 4),  # a single point
        np.pad(np.ones((1, 9)), 4),  # one row: degenerate along the rows
        np.array([0.0, 1.0, 2.0, 0.0]),  # fewer non-zero points than a handful
        -np.ones((4, 4)),  # constant: no peak
    ],
)
def test_fit_returns_none_with_warning(bad):
    with pytest.warns(FitWarning):
        assert fit_gaussian(bad) is None


@pytest.mark.parametrize("seed", range(4))
def test_fit_never_raises_on_awkward_maps(seed):
    rng = np.random.default_rng(seed)
    maps = [rng.random((20, 20)), np.ones((10, 10)), rng.random((6, 7, 5))]
    two = np.zeros((40, 40))
    two[3, 3] = two[36, 36] = two[3, 4] = two[36, 35] = two[4, 3] = two[35, 36] = 1.0
    maps.append(two)
    for m in maps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitWarning)
            fit = fit_gaussian(m)
        assert fit is None or (isinstance(fit, GaussianFit) and np.all(np.isfinite(fit.cov)))


# ------------------------------------------------------------------ metrics
@pytest.mark.parametrize("n,size,count", [(5, 8.307, 69), (10, 11.705, 137), (20, 16.155, 261)])
def test_erf_size_of_uniform_stacks(n, size, count):
    pad = 4
    res = metrics(multinomial_map(n, pad=pad))
    assert res["erf_size"] == pytest.approx(size, abs=5e-4)
    assert res["erf_size"] ** 2 == pytest.approx(count, rel=1e-12)
    q = multinomial_map(n, ndim=1)
    assert res["erf_extent"] == (int((q > 0.0455).sum()),) * 2
    assert res["center"] == (n + pad, n + pad)
    assert res["erf_trf_ratio"] is None
    assert res["anisotropy"] == pytest.approx(1.0, abs=1e-9)


def test_erf_trf_ratio_and_trf_centre():
    n, pad = 5, 6
    m = np.pad(multinomial_map(n), ((pad, 0), (2, 9)))  # TRF centre off the array centre
    trf = SimpleNamespace(size=(11, 11), center=(pad + 5, 2 + 5))
    res = metrics(m, trf=trf)
    assert res["center"] == (11.0, 7.0)
    assert res["erf_size"] == pytest.approx(math.sqrt(69))
    assert res["erf_trf_ratio"]["per_axis"] == (9 / 11, 9 / 11)
    assert res["erf_trf_ratio"]["overall"] == pytest.approx(math.sqrt(69) / 11)
    # an explicit centre wins over the TRF's
    off = metrics(m, center=(11, 10), trf=trf)
    assert off["center"] == (11.0, 10.0) and off["erf_size"] > res["erf_size"]


def test_half_integer_centre_interpolates():
    m = np.array([0.0, 0.05, 1.0, 1.0, 0.05, 0.0])
    res = metrics(m, center=2.5)
    assert res["erf_size"] == 4.0  # 0.05 > 0.0455 x 1.0
    assert res["erf_extent"] == (4,)
    assert metrics(m, center=(2.5,))["mass_radius"] == pytest.approx(1.5)  # 2 / 2.1 < 0.9545
    assert metrics(m * [1, 0.8, 1, 1, 0.8, 1], center=(2.5,))["mass_radius"] == pytest.approx(0.5)


def test_mass_radius_hand_checked():
    assert metrics(np.array([0, 0, 1, 96, 3, 0, 0.0]))["mass_radius"] == 0.0
    assert metrics(np.array([0, 1, 2, 90, 4, 3, 0.0]))["mass_radius"] == 1.0
    m = np.zeros((5, 5))
    m[2, 2], m[2, 3], m[3, 3] = 50.0, 30.0, 20.0  # need the diagonal neighbour
    assert metrics(m)["mass_radius"] == pytest.approx(math.sqrt(2))


def test_area_ratio_hand_checked():
    # 5x5: centre 20, ring 1 (8 cells) 5 each = 40, ring 2 (16 cells) 2.5 each = 40; total 100
    m = np.full((5, 5), 2.5)
    m[1:4, 1:4] = 5.0
    m[2, 2] = 20.0
    res = metrics(m)["area_ratio"]
    assert res == {0.2: 1 / 25, 0.3: 9 / 25, 0.5: 9 / 25, 0.99: 1.0}
    # off-centre: only squares with i <= 1 fit inside the map around (1, 2)
    # (i = 0 holds 5/100, i = 1 holds 7.5 + 15 + 30 = 52.5/100)
    off = metrics(m, center=(1, 2))["area_ratio"]
    assert off == {0.2: 9 / 25, 0.3: 9 / 25, 0.5: 9 / 25, 0.99: None}
    # RepLKNet preprocessing, computed by hand
    a = np.log10(m + 1.0)
    a /= a.max()
    held = [a[2, 2], a[1:4, 1:4].sum(), a.sum()]
    expect = {t: [1, 9, 25][next(i for i, h in enumerate(held) if h >= t * a.sum())] / 25 for t in (0.2, 0.3, 0.5, 0.99)}
    assert metrics(m, log_scale=True)["area_ratio"] == expect
    assert metrics(m, log_scale=True)["area_ratio"] != res


def test_area_ratio_3d_and_anisotropy():
    m = multinomial_map(3, pad=2, ndim=3)
    res = metrics(m)
    assert set(res["area_ratio"]) == {0.2, 0.3, 0.5, 0.99}
    assert all(r is None or 0 < r <= 1 for r in res["area_ratio"].values())
    g, _ = rotated_gaussian((80, 80), (40, 40), 8.0, 4.0, 25.0)
    assert metrics(g)["anisotropy"] == pytest.approx(2.0, rel=1e-3)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("func", [moments, fit_gaussian, metrics])
@pytest.mark.parametrize(
    "bad,exc",
    [
        ("abc", TypeError),
        (None, TypeError),
        ([[1, 2], [3]], TypeError),
        (np.array([1 + 2j, 3]), TypeError),
        (np.ones((2, 2, 2, 2)), ValueError),
        (np.float64(3.0), ValueError),
        (np.zeros((0, 3)), ValueError),
    ],
)
def test_bad_maps_raise_naming_map(func, bad, exc):
    with pytest.raises(exc, match="map"):
        func(bad)


@pytest.mark.parametrize("func", [moments, metrics])
def test_moments_and_metrics_keep_requiring_non_negative_maps(func):
    with pytest.raises(ValueError, match="map must be non-negative"):
        func(-np.ones((4, 4)))


def test_moments_and_metrics_reject_nan_and_zero():
    for func in (moments, metrics):
        with pytest.raises(ValueError, match="map"):
            func(np.array([1.0, np.nan, 1.0]))
        with pytest.raises(ValueError, match="map"):
            func(np.zeros((3, 3)))


def test_metrics_bad_center_and_trf():
    m = multinomial_map(3)
    with pytest.raises(ValueError, match="center"):
        metrics(m, center=(3,))
    with pytest.raises(ValueError, match="center"):
        metrics(m, center=(3, 99))
    with pytest.raises(TypeError, match="center"):
        metrics(m, center=("a", "b"))
    with pytest.raises(TypeError, match="trf"):
        metrics(m, trf=object())
    with pytest.raises(ValueError, match="trf"):
        metrics(m, trf=SimpleNamespace(size=(7,), center=(3, 3)))
    with pytest.raises(ValueError, match="trf"):
        metrics(m, trf=SimpleNamespace(size=(7, 7), center=(3, 30)))
    with pytest.raises(TypeError, match="log_scale"):
        metrics(m, log_scale="yes")


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    t = torch.tensor(multinomial_map(5), requires_grad=True)
    assert moments(t).sigma[0] == pytest.approx(math.sqrt(10 / 3), rel=1e-9)
