"""erf.theory against brute-force references and the derived numbers of REFERENCES.md §1."""
from __future__ import annotations

import math
from fractions import Fraction
from functools import reduce

import numpy as np
import pytest

from erf.theory import (
    ERF_THRESHOLD,
    Layer,
    binomial_profile,
    erf_variance,
    gaussian_erf_size,
    gaussian_sigma,
    jumps,
    linear_erf,
    trf_size,
    uniform_erf_size,
    uniform_sigma,
)


# ------------------------------------------------------------------ slow references
def poly_power(coefs: list[int], n: int) -> list[int]:
    """(sum_i coefs[i] x^i)^n by schoolbook multiplication."""
    out = [1]
    for _ in range(n):
        prod = [0] * (len(out) + len(coefs) - 1)
        for i, a in enumerate(out):
            for j, b in enumerate(coefs):
                prod[i + j] += a * b
        out = prod
    return out


def forward_1d(x: np.ndarray, w: np.ndarray, stride: int, dilation: int) -> np.ndarray:
    """PyTorch-style cross-correlation without padding: y[u] = sum_i w[i] x[u s + i d]."""
    span = dilation * (len(w) - 1)
    n_out = (len(x) - span - 1) // stride + 1
    return np.array([sum(w[i] * x[u * stride + i * dilation] for i in range(len(w))) for u in range(n_out)])


def forward_2d(x: np.ndarray, w: np.ndarray, stride: tuple, dilation: tuple) -> np.ndarray:
    span = [d * (k - 1) for d, k in zip(dilation, w.shape)]
    n_out = [(x.shape[a] - span[a] - 1) // stride[a] + 1 for a in range(2)]
    y = np.zeros(n_out)
    for u in range(n_out[0]):
        for v in range(n_out[1]):
            for i in range(w.shape[0]):
                for j in range(w.shape[1]):
                    y[u, v] += w[i, j] * x[u * stride[0] + i * dilation[0], v * stride[1] + j * dilation[1]]
    return y


def erf_by_forward(kernels, strides, dilations, size):
    """ERF of output unit 0 by definition: its response to each input basis vector."""
    ndim = len(size)
    erf = np.zeros(size)
    for p in np.ndindex(*size):
        x = np.zeros(size)
        x[p] = 1.0
        for w, s, d in zip(kernels, strides, dilations):
            x = forward_1d(x, w, s, d) if ndim == 1 else forward_2d(x, w, s, d)
        erf[p] = x.flat[0]
    return erf


def erf_by_convolve(kernels, strides, dilations):
    """Composite kernel with np.convolve: spread each kernel by J_l d_l, convolve in order."""
    out, jump = np.ones(1), 1
    for w, s, d in zip(kernels, strides, dilations):
        spread = np.zeros((len(w) - 1) * jump * d + 1)
        spread[:: jump * d] = w
        out = np.convolve(out, spread)
        jump *= s
    return out


def random_stack(rng, ndim=1):
    layers, kernels, strides, dilations = [], [], [], []
    for _ in range(rng.integers(1, 5)):
        kind = rng.integers(3)
        if kind == 0:  # average pooling
            k = int(rng.integers(2, 4))
            s = int(rng.integers(1, 3))
            layers.append(Layer.avgpool(k, s))
            kernels.append(np.full(k, 1.0 / k))
            strides.append(s)
            dilations.append(1)
        else:
            k = int(rng.integers(1, 5))
            w = rng.uniform(0.1, 1.0, k)
            s, d = int(rng.integers(1, 3)), int(rng.integers(1, 3))
            layers.append(Layer(w, stride=s, dilation=d))
            kernels.append(w)
            strides.append(s)
            dilations.append(d)
    return layers, kernels, strides, dilations


# ------------------------------------------------------------------ binomial profile
@pytest.mark.parametrize("n", range(0, 31))
def test_binomial_k2_is_pascal(n):
    assert binomial_profile(n, 2) == [math.comb(n, i) for i in range(n + 1)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
def test_binomial_matches_polynomial_power(n, k):
    assert binomial_profile(n, k) == poly_power([1] * k, n)


def test_binomial_known_and_exact():
    assert binomial_profile(5, 3) == [1, 5, 15, 30, 45, 51, 45, 30, 15, 5, 1]
    big = binomial_profile(60, 3)
    assert all(type(c) is int for c in big)
    assert sum(big) == 3**60  # exact beyond float64 and int64
    assert big[60] > 2**63


@pytest.mark.parametrize("n,k,exc", [(-1, 3, ValueError), (2.0, 3, TypeError), (2, 0, ValueError), (2, "3", TypeError)])
def test_binomial_bad_input(n, k, exc):
    with pytest.raises(exc, match="n|k"):
        binomial_profile(n, k)


# ------------------------------------------------------------------ linear ERF
def test_conv_avgpool_conv_example():
    layers = [Layer.uniform(3), Layer.avgpool(2, stride=2), Layer.uniform(3)]
    erf = linear_erf(layers)
    assert erf.dtype == object
    assert erf.tolist() == [Fraction(1, 2), 1, Fraction(3, 2), Fraction(3, 2), Fraction(3, 2), Fraction(3, 2), 1,
                            Fraction(1, 2)]
    assert trf_size(layers) == (8,)
    assert erf_variance(layers) == (Fraction(43, 12),)
    assert gaussian_sigma(layers)[0] == pytest.approx(math.sqrt(3.5833333333333335), rel=1e-15)


def test_dilation_example_is_gridded():
    layers = [Layer([1, 1, 1], dilation=d) for d in (1, 2, 4)]
    assert linear_erf(layers).tolist() == [1, 1, 2, 1, 3, 2, 3, 1, 3, 2, 3, 1, 2, 1, 1]
    assert trf_size(layers) == (15,)
    assert erf_variance(layers) == (Fraction(2, 3) * (1 + 4 + 16),)


@pytest.mark.parametrize("n", [1, 2, 5, 10])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_uniform_stack_is_binomial(n, k):
    prof = binomial_profile(n, k)
    erf = linear_erf([Layer.uniform(k)] * n)
    assert erf.tolist() == prof
    erf2 = linear_erf([Layer.uniform(k, ndim=2)] * n)
    assert erf2.shape == (len(prof), len(prof))
    assert erf2.tolist() == np.multiply.outer(np.array(prof, dtype=object), np.array(prof, dtype=object)).tolist()
    assert gaussian_sigma([Layer.uniform(k)] * n)[0] == pytest.approx(uniform_sigma(n, k), rel=1e-14)


def test_deep_uniform_stack_stays_exact():
    erf = linear_erf([Layer.uniform(3, ndim=2)] * 40)
    c = binomial_profile(40, 3)[40]
    assert erf[40, 40] == c * c  # > 2^53: float64 would round it
    assert c * c > 2**53


@pytest.mark.parametrize("seed", range(12))
def test_linear_erf_matches_forward_pass_1d(seed):
    rng = np.random.default_rng(seed)
    layers, kernels, strides, dilations = random_stack(rng)
    erf = linear_erf(layers)
    size = trf_size(layers)
    assert erf.shape == size
    ref_fwd = erf_by_forward(kernels, strides, dilations, size)
    ref_conv = erf_by_convolve(kernels, strides, dilations)
    np.testing.assert_allclose(np.asarray(erf, dtype=float), ref_fwd, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(erf, dtype=float), ref_conv, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_linear_erf_matches_forward_pass_2d_full_kernels(seed):
    rng = np.random.default_rng(100 + seed)
    layers, kernels, strides, dilations = [], [], [], []
    for _ in range(3):
        w = rng.uniform(0.1, 1.0, tuple(rng.integers(1, 4, 2)))
        s = tuple(int(v) for v in rng.integers(1, 3, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        layers.append(Layer(w, stride=s, dilation=d))
        kernels.append(w)
        strides.append(s)
        dilations.append(d)
    erf = linear_erf(layers)
    assert erf.dtype == np.float64 and erf.shape == trf_size(layers)
    np.testing.assert_allclose(erf, erf_by_forward(kernels, strides, dilations, erf.shape), rtol=1e-12)


def test_separable_2d_is_outer_product_of_axes():
    rng = np.random.default_rng(7)
    wr, wc = rng.uniform(0.1, 1, 3), rng.uniform(0.1, 1, 2)
    layers = [Layer([wr, wc], stride=(2, 1)), Layer.avgpool(2, ndim=2), Layer([[1, 2, 1], [1, 1]], dilation=(1, 3))]
    erf = linear_erf(layers)
    rows = linear_erf([Layer(wr, 2), Layer.avgpool(2), Layer([1, 2, 1])])
    cols = linear_erf([Layer(wc, 1), Layer.avgpool(2), Layer([1, 1], dilation=3)])
    np.testing.assert_allclose(erf, np.outer(rows, cols), rtol=1e-13)
    # the same stack given as full (non-separable path) kernels
    full = [Layer(np.outer(wr, wc), stride=(2, 1)), Layer(np.full((2, 2), 0.25), stride=2),
            Layer(np.outer([1, 2, 1], [1, 1]).astype(float), dilation=(1, 3))]
    np.testing.assert_allclose(linear_erf(full), erf, rtol=1e-13)
    assert jumps(layers) == [(1, 1), (2, 1), (4, 2)]


def test_layers_1d_kernel_broadcasts_to_ndim():
    layers = [Layer.uniform(3), Layer.avgpool(2)]
    assert linear_erf(layers, ndim=3).shape == (4, 4, 4)
    assert trf_size(layers, ndim=3) == (4, 4, 4)


# ------------------------------------------------------------------ moments
def _exact_variance(erf: np.ndarray, axis: int) -> Fraction:
    marg = erf.sum(axis=tuple(a for a in range(erf.ndim) if a != axis)) if erf.ndim > 1 else erf
    m0 = sum(marg.tolist())
    m1 = sum(i * v for i, v in enumerate(marg.tolist()))
    m2 = sum(i * i * v for i, v in enumerate(marg.tolist()))
    return Fraction(m2) / m0 - (Fraction(m1) / m0) ** 2


@pytest.mark.parametrize("seed", range(6))
def test_erf_variance_equals_moments_of_linear_erf_exactly(seed):
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(rng.integers(1, 5)):
        w = [int(v) for v in rng.integers(1, 6, rng.integers(1, 5))]
        if rng.random() < 0.3:
            layers.append(Layer.avgpool(int(rng.integers(2, 4)), int(rng.integers(1, 3))))
        else:
            layers.append(Layer(w, stride=int(rng.integers(1, 3)), dilation=int(rng.integers(1, 3))))
    erf = linear_erf(layers)
    assert erf.dtype == object
    assert erf_variance(layers) == (_exact_variance(erf, 0),)


def test_erf_variance_2d_full_integer_kernel_exact():
    w = np.array([[1, 2, 0], [3, 1, 4]])
    layers = [Layer(w, stride=(1, 2)), Layer(np.array([[2, 1], [1, 1]]), dilation=2)]
    erf = linear_erf(layers)
    assert erf_variance(layers) == (_exact_variance(erf, 0), _exact_variance(erf, 1))


def test_gaussian_sigma_float_kernels_matches_moments():
    rng = np.random.default_rng(3)
    layers = [Layer(rng.uniform(0.1, 1, 4), stride=2), Layer(rng.uniform(0.1, 1, 3), dilation=2), Layer.avgpool(3)]
    erf = linear_erf(layers)
    x = np.arange(len(erf))
    mean = (x * erf).sum() / erf.sum()
    assert gaussian_sigma(layers)[0] == pytest.approx(math.sqrt(((x - mean) ** 2 * erf).sum() / erf.sum()), rel=1e-12)


def test_gaussian_sigma_zero_sum_kernel_raises():
    with pytest.raises(ValueError, match="sums to zero"):
        gaussian_sigma([Layer([1, -1])])


# ------------------------------------------------------------------ ERF size
@pytest.mark.parametrize("n,size,count", [(5, 8.307, 69), (10, 11.705, 137), (20, 16.155, 261), (40, 22.738, 517)])
def test_uniform_erf_size(n, size, count):
    got = uniform_erf_size(n, 3, ndim=2)
    assert got == pytest.approx(size, abs=5e-4)
    assert got == pytest.approx(math.sqrt(count), rel=1e-15)
    # the same count by brute force on the exact integer map
    prof = binomial_profile(n, 3)
    c = prof[len(prof) // 2]
    brute = sum(1 for a in prof for b in prof if a * b > ERF_THRESHOLD * c * c)
    assert brute == count


def test_gaussian_erf_size_approaches_uniform_stack():
    s = uniform_sigma(40, 3)
    assert gaussian_erf_size([s, s]) == pytest.approx(uniform_erf_size(40), rel=0.01)
    assert gaussian_erf_size(2.0) == pytest.approx(2 * 2.0 * math.sqrt(-2 * math.log(ERF_THRESHOLD)))


# ------------------------------------------------------------------ validation
def test_layer_validation():
    with pytest.raises(ValueError, match="stride"):
        Layer([1, 1], stride=0)
    with pytest.raises(TypeError, match="dilation"):
        Layer([1, 1], dilation=1.5)
    with pytest.raises(TypeError, match="kernel"):
        Layer(["a", "b"])
    with pytest.raises(ValueError, match="kernel"):
        Layer([])
    with pytest.raises(ValueError, match="stride"):
        Layer([[1, 1], [1, 1]], stride=(1, 1, 1))
    with pytest.raises(ValueError, match="finite"):
        Layer([1.0, float("nan")])


def test_stack_validation():
    with pytest.raises(TypeError, match="layers"):
        linear_erf([Layer([1, 1]), [1, 1]])
    with pytest.raises(ValueError, match="axes"):
        linear_erf([Layer.uniform(3, ndim=2), Layer.uniform(3, ndim=3)])
    with pytest.raises(ValueError, match="ndim"):
        trf_size([Layer.uniform(3, ndim=2)], ndim=3)
    assert reduce(lambda a, b: a * b, trf_size([Layer.uniform(3, ndim=2)])) == 9
