"""Closed forms for the effective receptive field of linear networks.

Luo, Li, Urtasun, Zemel, "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks", NIPS 2016. https://arxiv.org/abs/1701.04128

A stack of linear layers (convolutions, average pooling, strides, dilations, no
nonlinearity) has an exact ERF: the gradient of one output unit with respect to the input
is the composite kernel

    K = v_1 * (v_2 spread by J_2) * ... * (v_L spread by J_L),

with ``J_l`` the product of the strides before layer ``l`` (the layer's *jump*) and a
dilation ``d`` spreading the taps of its own kernel by ``d`` more. Tap ``i`` of layer ``l``
lands at offset ``J_l d_l i`` from the start of the window, in PyTorch's cross-correlation
convention (no flip). Convolution adds the kernels' variances, so per axis

    Var(K) = sum_l (J_l d_l)^2 Var(v_l),     TRF = 1 + sum_l d_l (k_l - 1) J_l,

where ``Var(v)`` is the variance of ``v`` normalised as a distribution ((k^2 - 1)/12 for a
uniform k-tap kernel). For uniform weights and stride 1 the 1-D profile is the coefficient
list of (1 + x + ... + x^(k-1))^n (:func:`binomial_profile`), and by the central limit
theorem every such profile tends to a Gaussian whose sigma grows as sqrt(n).

Arithmetic: integer and :class:`fractions.Fraction` kernels are kept exact (NumPy object
arrays of Python ints / Fractions; :meth:`Layer.avgpool` uses Fraction(1, k)), so the
results are exact at any depth. A stack with any float kernel is computed in float64.
Everything here is pure NumPy: no torch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ERF_MASS",
    "ERF_THRESHOLD",
    "Layer",
    "binomial_profile",
    "erf_variance",
    "gaussian_erf_size",
    "gaussian_sigma",
    "jumps",
    "linear_erf",
    "trf_size",
    "uniform_erf_size",
    "uniform_sigma",
]

#: Luo et al.'s mass fraction within 2 sigma of a Gaussian (the "95.45%").
ERF_MASS: float = 0.9545
#: A position belongs to the ERF when its value exceeds this fraction of the centre value.
ERF_THRESHOLD: float = 1.0 - ERF_MASS

_Exact = (int, np.integer, Fraction)


# --------------------------------------------------------------------------- kernels
def _kernel_array(value: Any, what: str) -> np.ndarray:
    """A numeric array: object dtype of Python ints/Fractions when exact, else float64."""
    try:
        arr = np.asarray(value, dtype=object)
    except (TypeError, ValueError) as exc:  # ragged nesting
        raise ValueError(f"{what} must be a rectangular array of numbers, got {value!r}") from exc
    if arr.size == 0:
        raise ValueError(f"{what} must not be empty")
    flat = arr.ravel()
    for x in flat:
        if not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_)):
            raise TypeError(f"{what} must hold real numbers, got {type(x).__name__} {x!r}")
    if all(isinstance(x, _Exact) for x in flat):
        out = np.empty(arr.shape, dtype=object)
        out.ravel()[:] = [x if isinstance(x, Fraction) else int(x) for x in flat]
        return out
    out = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what} must hold finite numbers")
    return out


def _is_exact(arr: np.ndarray) -> bool:
    return arr.dtype == object


def _per_axis_int(value: Any, name: str) -> int | tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return int(value)
    if isinstance(value, (list, tuple)) and value:
        return tuple(_per_axis_int(v, name) for v in value)  # type: ignore[misc]
    raise TypeError(f"{name} must be a positive int or a non-empty tuple of them, got {value!r}")


@dataclass(frozen=True, eq=False)
class Layer:
    """One linear layer of a stack: kernel taps, stride and dilation.

    ``kernel`` is one of
      * a 1-D sequence: used on every axis (separable; the stack's ``ndim`` decides);
      * a list/tuple of 1-D sequences: one factor per axis (separable, outer product);
      * an N-D ``numpy.ndarray`` (ndim >= 2): a full, possibly non-separable kernel.
    A nested *list* is always read as per-axis factors; pass an ndarray for a full kernel.
    ``stride`` and ``dilation`` are an int (every axis) or a tuple with one int per axis.
    Integer / Fraction kernels stay exact; see the module docstring.

    Raises:
        TypeError / ValueError: for kernels that are not arrays of finite real numbers,
            strides or dilations that are not positive ints, or mismatched axis counts.
    """

    kernel: Any
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1

    def __post_init__(self) -> None:
        k = self.kernel
        if isinstance(k, Layer):
            raise TypeError("kernel must be an array, not a Layer")
        per_axis = (
            isinstance(k, (list, tuple))
            and len(k) > 0
            and all(isinstance(f, (list, tuple, np.ndarray)) for f in k)
        )
        if per_axis:
            factors = tuple(_kernel_array(f, f"kernel factor {i}") for i, f in enumerate(k))
            for i, f in enumerate(factors):
                if f.ndim != 1:
                    raise ValueError(f"kernel factor {i} must be 1-D, got shape {f.shape}")
            kern: Any = factors
            kdim: int | None = len(factors)
        else:
            arr = _kernel_array(k, "kernel")
            kern = arr
            kdim = None if arr.ndim == 1 else arr.ndim
        stride = _per_axis_int(self.stride, "stride")
        dilation = _per_axis_int(self.dilation, "dilation")
        for name, v in (("stride", stride), ("dilation", dilation)):
            if isinstance(v, tuple):
                if kdim is None:
                    kdim = len(v)
                elif len(v) != kdim:
                    raise ValueError(f"{name} has {len(v)} axes but the kernel has {kdim}")
        object.__setattr__(self, "kernel", kern)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "_ndim", kdim)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, k: int, ndim: int | None = None, stride: int = 1, dilation: int = 1) -> "Layer":
        """All-ones k-tap kernel (the uniform-weight convolution of the theory)."""
        k = _positive_int(k, "k")
        kern = [1] * k if ndim is None else [[1] * k for _ in range(_positive_int(ndim, "ndim"))]
        return cls(kern, stride, dilation)

    @classmethod
    def avgpool(cls, k: int, stride: int | None = None, ndim: int | None = None) -> "Layer":
        """Average pooling: uniform kernel Fraction(1, k) per axis, stride defaults to k."""
        k = _positive_int(k, "k")
        tap = [Fraction(1, k)] * k
        kern = tap if ndim is None else [list(tap) for _ in range(_positive_int(ndim, "ndim"))]
        return cls(kern, k if stride is None else stride)

    # ----------------------------------------------------------------- per-axis views
    @property
    def ndim(self) -> int | None:
        """Number of axes this layer fixes; None for a 1-D kernel usable on any axis count."""
        return self._ndim  # type: ignore[attr-defined]

    @property
    def exact(self) -> bool:
        """True when every tap is a Python int or Fraction (exact arithmetic)."""
        parts = self.kernel if isinstance(self.kernel, tuple) else (self.kernel,)
        return all(_is_exact(p) for p in parts)

    def _axis(self, value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
        return value if isinstance(value, tuple) else (value,) * ndim

    def _factors(self, ndim: int) -> tuple[np.ndarray, ...] | None:
        k = self.kernel
        if isinstance(k, tuple):
            return k
        if k.ndim == 1:
            return (k,) * ndim
        return None

    def _full(self, ndim: int) -> np.ndarray:
        f = self._factors(ndim)
        return self.kernel if f is None else reduce(np.multiply.outer, f)

    def _marginal(self, axis: int, ndim: int) -> np.ndarray:
        f = self._factors(ndim)
        if f is not None:
            return f[axis]
        other = tuple(a for a in range(ndim) if a != axis)
        return self.kernel.sum(axis=other) if other else self.kernel

    def spacing(self, ndim: int) -> tuple[int, ...]:
        """Dilation per axis for a stack of ``ndim`` axes."""
        return self._axis(self.dilation, ndim)

    def strides(self, ndim: int) -> tuple[int, ...]:
        """Stride per axis for a stack of ``ndim`` axes."""
        return self._axis(self.stride, ndim)

    def taps(self, ndim: int) -> tuple[int, ...]:
        """Kernel taps per axis (before dilation)."""
        f = self._factors(ndim)
        return tuple(len(v) for v in f) if f is not None else tuple(self.kernel.shape)


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _layers(layers: Any, ndim: int | None) -> tuple[list[Layer], int]:
    if isinstance(layers, Layer):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of erf.theory.Layer, got {type(layers).__name__}")
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"layers[{i}] must be an erf.theory.Layer, got {type(layer).__name__}")
    fixed = {layer.ndim for layer in layers} - {None}
    if len(fixed) > 1:
        raise ValueError(f"layers disagree on the number of axes: {sorted(fixed)}")
    if ndim is not None:
        ndim = _positive_int(ndim, "ndim")
        if fixed and fixed != {ndim}:
            raise ValueError(f"ndim={ndim} but the layers have {fixed.pop()} axes")
    else:
        ndim = fixed.pop() if fixed else 1
    return layers, ndim


def jumps(layers: Sequence[Layer], ndim: int | None = None) -> list[tuple[int, ...]]:
    """Jump of each layer per axis: J_l = product of the strides of the layers before l.

    Args:
        layers: the stack, input side first. ndim: axes (default: inferred, else 1).
    Returns:
        One tuple of ints per layer.
    """
    layers, ndim = _layers(layers, ndim)
    out, j = [], (1,) * ndim
    for layer in layers:
        out.append(j)
        j = tuple(a * s for a, s in zip(j, layer.strides(ndim)))
    return out


def trf_size(layers: Sequence[Layer], ndim: int | None = None) -> tuple[int, ...]:
    """Theoretical receptive field per axis: TRF = 1 + sum_l d_l (k_l - 1) J_l.

    Araujo et al., Distill 2019, https://distill.pub/2019/computing-receptive-fields/
    Returns a tuple of ints, one per axis.
    """
    layers, ndim = _layers(layers, ndim)
    size = [1] * ndim
    for layer, j in zip(layers, jumps(layers, ndim)):
        for a, (k, d) in enumerate(zip(layer.taps(ndim), layer.spacing(ndim))):
            size[a] += d * (k - 1) * j[a]
    return tuple(size)


# ----------------------------------------------------------------------- exact ERF
def _spread(v: np.ndarray, step: Sequence[int]) -> np.ndarray:
    shape = tuple((n - 1) * s + 1 for n, s in zip(v.shape, step))
    out = np.zeros(shape, dtype=v.dtype)
    if v.dtype == object:
        out[...] = 0
    out[tuple(slice(None, None, s) for s in step)] = v
    return out


def _convolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full N-D convolution by shifted adds over the non-zero taps of the sparser operand."""
    if np.count_nonzero(a != 0) < np.count_nonzero(b != 0):
        a, b = b, a
    shape = tuple(m + n - 1 for m, n in zip(a.shape, b.shape))
    dtype = object if (a.dtype == object and b.dtype == object) else np.float64
    out = np.zeros(shape, dtype=dtype)
    if dtype is object:
        out[...] = 0
    else:
        a, b = a.astype(np.float64), b.astype(np.float64)
    for idx in np.argwhere(b != 0):
        sl = tuple(slice(i, i + n) for i, n in zip(idx, a.shape))
        out[sl] += b[tuple(idx)] * a
    return out


def linear_erf(layers: Sequence[Layer], ndim: int | None = None) -> np.ndarray:
    """Exact ERF of a linear stack on its TRF window, unnormalised.

    K = v_1 * (v_2 spread by J_2 d_2) * ... (full convolutions, no flip: tap i of layer l
    sits at offset J_l d_l i). Luo et al. 2016, https://arxiv.org/abs/1701.04128

    Args:
        layers: sequence of :class:`Layer`, input side first (a single Layer is accepted).
        ndim: number of spatial axes; default inferred from the layers, else 1.
    Returns:
        Array of shape ``trf_size(layers)``: object dtype of Python ints / Fractions when
        every kernel is exact, else float64. Separable stacks are built as outer products.
    Raises:
        TypeError / ValueError: for non-Layer items or layers with different axis counts.
    """
    layers, ndim = _layers(layers, ndim)
    exact = all(layer.exact for layer in layers)
    js = jumps(layers, ndim)
    if all(layer._factors(ndim) is not None for layer in layers):
        profiles = []
        for a in range(ndim):
            prof = np.array([1], dtype=object) if exact else np.ones(1)
            for layer, j in zip(layers, js):
                v = layer._factors(ndim)[a]
                v = v if exact else v.astype(np.float64)
                prof = _convolve(prof, _spread(v, (j[a] * layer.spacing(ndim)[a],)))
            profiles.append(prof)
        out = reduce(np.multiply.outer, profiles)
        return out if exact else np.asarray(out, dtype=np.float64)
    out = np.ones((1,) * ndim, dtype=object if exact else np.float64)
    for layer, j in zip(layers, js):
        v = layer._full(ndim)
        if not exact:
            v = v.astype(np.float64)
        step = tuple(ja * d for ja, d in zip(j, layer.spacing(ndim)))
        out = _convolve(out, _spread(v, step))
    return out


def binomial_profile(n: int, k: int = 2) -> list[int]:
    """Coefficients of (1 + x + ... + x^(k-1))^n as exact Python ints.

    The 1-D ERF of n uniform k-tap convolutions (binomial for k = 2, multinomial for k > 2);
    length n (k - 1) + 1. Luo et al. 2016, https://arxiv.org/abs/1701.04128

    Raises:
        TypeError / ValueError: n must be an int >= 0, k an int >= 1.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)):
        raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    k = _positive_int(k, "k")
    coef = [1]
    for _ in range(int(n)):
        # new[i] = sum_{j < k} old[i - j]: a sliding-window sum over the padded list
        prefix = [0]
        for c in coef:
            prefix.append(prefix[-1] + c)
        m = len(coef)
        coef = [prefix[min(i, m - 1) + 1] - prefix[max(i - k + 1, 0)] for i in range(m + k - 1)]
    return coef


# ------------------------------------------------------------------------- moments
def _kernel_variance(v: np.ndarray) -> Fraction | float:
    idx = np.arange(len(v))
    if _is_exact(v):
        m0 = sum(v.tolist())
        if m0 == 0:
            raise ValueError("a kernel sums to zero: its variance as a distribution is undefined")
        m1 = sum(int(i) * x for i, x in zip(idx, v.tolist()))
        m2 = sum(int(i) ** 2 * x for i, x in zip(idx, v.tolist()))
        return Fraction(m2) / m0 - (Fraction(m1) / m0) ** 2
    m0 = float(v.sum())
    if m0 == 0.0:
        raise ValueError("a kernel sums to zero: its variance as a distribution is undefined")
    mean = float((idx * v).sum()) / m0
    return float(((idx - mean) ** 2 * v).sum()) / m0


def erf_variance(layers: Sequence[Layer], ndim: int | None = None) -> tuple[Fraction | float, ...]:
    """Per-axis variance of the normalised linear ERF: sum_l (J_l d_l)^2 Var(v_l).

    Exact (Fractions) when every kernel is integer/Fraction, else float. The kernels are
    normalised as distributions (divided by their sum; a zero-sum kernel raises
    ValueError); for a full N-D kernel ``v_l`` is its marginal on the axis.
    """
    layers, ndim = _layers(layers, ndim)
    exact = all(layer.exact for layer in layers)
    total: list[Any] = [Fraction(0) if exact else 0.0] * ndim
    for layer, j in zip(layers, jumps(layers, ndim)):
        for a in range(ndim):
            step = j[a] * layer.spacing(ndim)[a]
            var = _kernel_variance(layer._marginal(a, ndim))
            total[a] = total[a] + step * step * (var if exact else float(var))
    return tuple(total)


def gaussian_sigma(layers: Sequence[Layer], ndim: int | None = None) -> tuple[float, ...]:
    """Per-axis sigma of the linear ERF: sqrt(sum_l J_l^2 d_l^2 Var(v_l)).

    Exact for the second moments of :func:`linear_erf` (not an approximation); a uniform
    k-tap kernel has Var = (k^2 - 1)/12. Luo et al. 2016, https://arxiv.org/abs/1701.04128

    Raises:
        ValueError: a kernel sums to zero, or (signed kernels) the variance is negative.
    """
    var = erf_variance(layers, ndim)
    if any(v < 0 for v in var):
        raise ValueError(f"negative ERF variance {tuple(float(v) for v in var)}: signed kernels")
    return tuple(math.sqrt(float(v)) for v in var)


def uniform_sigma(n: int, k: int = 3) -> float:
    """Sigma per axis of n uniform k-tap stride-1 layers: sqrt(n (k^2 - 1) / 12)."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    k = _positive_int(k, "k")
    return math.sqrt(n * (k * k - 1) / 12)


def uniform_erf_size(n: int, k: int = 3, ndim: int = 2) -> float:
    """Luo et al.'s ERF size of n uniform k-tap layers: count^(1/ndim) above the threshold.

    count = number of positions of the outer product of ``binomial_profile(n, k)`` whose value
    exceeds ``ERF_THRESHOLD`` (1 - 0.9545) times the centre value. 3x3 stacks with n = 5, 10,
    20, 40 give 8.307, 11.705, 16.155, 22.738 (counts 69, 137, 261, 517).
    The comparison is done on the float64 profile normalised to its peak, exactly as
    :func:`erf.fit.metrics` does on a map.
    """
    prof = binomial_profile(n, k)
    ndim = _positive_int(ndim, "ndim")
    peak = prof[len(prof) // 2]
    q = np.array([c / peak for c in prof])
    full = reduce(np.multiply.outer, [q] * ndim)
    count = int(np.count_nonzero(full > ERF_THRESHOLD * full[(len(prof) // 2,) * ndim]))
    return count ** (1.0 / ndim)


def gaussian_erf_size(sigma: Sequence[float] | float) -> float:
    """Continuous ERF size of a Gaussian with per-axis sigma (principal axes).

    The positions above t = 1 - 0.9545 of the peak form an ellipsoid of radius
    r = sqrt(-2 ln t) = 2.486 sigma; size = volume^(1/d), volume = V_d(r) prod(sigma), with
    V_d the unit d-ball volume (2-D: size = sqrt(pi) r sigma). Luo et al. 2016.
    """
    s = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    if s.ndim != 1 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"sigma must be positive finite numbers, got {sigma!r}")
    d = len(s)
    r = math.sqrt(-2.0 * math.log(ERF_THRESHOLD))
    ball = math.pi ** (d / 2) / math.gamma(d / 2 + 1)
    return (ball * r**d * float(np.prod(s))) ** (1.0 / d)
