"""Moments, Gaussian fit and summary metrics of an ERF map.

Luo, Li, Urtasun, Zemel, "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks", NIPS 2016. https://arxiv.org/abs/1701.04128
  (ERF size: positions above (1 - 0.9545) of the centre value; size = count^(1/d)).
Ding, Zhang, Zhou, Han, Ding, Sun, "Scaling Up Your Kernels to 31x31: Revisiting Large
Kernel Design in CNNs" (RepLKNet), CVPR 2022. https://arxiv.org/abs/2203.06717
  (high-contribution area ratio of centred squares, on log10(map + 1) / max).

:func:`moments` and :func:`metrics` take a non-negative 1-, 2- or 3-D array-like on the
input grid (callers pass ``abs`` of signed maps); :func:`fit_gaussian` takes any finite map. Axes are in array order, ``(row, col)`` / ``(depth, row, col)``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Sequence

import numpy as np

from erf.theory import ERF_MASS, ERF_THRESHOLD

__all__ = ["AREA_THRESHOLDS", "FitWarning", "GaussianFit", "Moments", "fit_gaussian", "metrics", "moments"]

#: The fractions of RepLKNet's high-contribution area ratio.
AREA_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)

_MAX_FIT_POINTS = 1 << 17
_MAX_NFEV = 200
_MAX_SIGMA_FACTOR = 10.0  # a fitted sigma beyond 10 map sides means there is no peak


class FitWarning(UserWarning):
    """A Gaussian fit could not be made; :func:`fit_gaussian` returned None."""


# ------------------------------------------------------------------------ validation
def _as_map(value: Any, name: str = "map") -> np.ndarray:
    """float64 copy of a 1-3-D array-like of real numbers (torch tensors accepted)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    if value is None or isinstance(value, (str, bytes, dict)):
        raise TypeError(f"{name} must be a 1-3-D array-like of numbers, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a rectangular 1-3-D array-like of numbers") from exc
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must hold real numbers (got object entries)") from exc
    elif arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2, 3):
        raise ValueError(f"{name} must be 1-, 2- or 3-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return np.array(arr, dtype=np.float64)


def _require_finite_nonneg(arr: np.ndarray, name: str = "map") -> None:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must hold finite numbers (found NaN or Inf)")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative (pass abs() of a signed map); min {arr.min():g}")


# --------------------------------------------------------------------------- moments
def _principal(cov: np.ndarray) -> tuple[float, float, float | None]:
    """(sigma_major, sigma_minor, theta_deg) of a covariance; theta only in 2-D."""
    w, v = np.linalg.eigh(cov)
    w = np.clip(w, 0.0, None)
    major, minor = math.sqrt(w[-1]), math.sqrt(w[0])
    if cov.shape[0] != 2:
        return major, minor, None
    if w[-1] - w[0] <= 1e-12 * max(w[-1], 1e-300):
        return major, minor, 0.0
    vec = v[:, -1]  # (row, col) components of the major axis
    theta = math.degrees(math.atan2(vec[0], vec[1]))
    return major, minor, _wrap_angle(theta)


def _wrap_angle(theta: float) -> float:
    """Map an axis angle in degrees into (-90, 90]."""
    theta = math.fmod(theta, 180.0)
    if theta <= -90.0:
        theta += 180.0
    elif theta > 90.0:
        theta -= 180.0
    return theta


@dataclass(frozen=True, eq=False)
class Moments:
    """Second moments of a non-negative map, seen as a distribution over positions.

    Attributes:
        center: (d,) centroid in array order. cov: (d, d) covariance (pixels^2).
        sigma: (d,) per-axis sqrt of the covariance diagonal. total: sum of the map.
    """

    center: np.ndarray
    cov: np.ndarray
    sigma: np.ndarray
    total: float

    @property
    def sigma_major(self) -> float:
        """sqrt of the largest covariance eigenvalue."""
        return _principal(self.cov)[0]

    @property
    def sigma_minor(self) -> float:
        """sqrt of the smallest covariance eigenvalue."""
        return _principal(self.cov)[1]

    @property
    def theta_deg(self) -> float | None:
        """Major-axis angle from +col towards +row, in (-90, 90]; None unless 2-D."""
        return _principal(self.cov)[2]

    @property
    def anisotropy(self) -> float:
        """sigma_major / sigma_minor (inf when the minor sigma is 0)."""
        major, minor, _ = _principal(self.cov)
        return major / minor if minor > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return {"center": self.center.tolist(), "cov": self.cov.tolist(),
                "sigma": self.sigma.tolist(), "total": self.total}


def _moments(arr: np.ndarray) -> Moments:
    total = float(arr.sum())
    d = arr.ndim
    w = arr / total
    idx = [np.arange(n, dtype=np.float64) for n in arr.shape]
    center = np.empty(d)
    for a in range(d):
        marg = w.sum(axis=tuple(b for b in range(d) if b != a))
        center[a] = float(idx[a] @ marg)
    cov = np.empty((d, d))
    for a in range(d):
        for b in range(a, d):
            others = tuple(c for c in range(d) if c not in (a, b))
            marg = w.sum(axis=others) if others else w
            ya, yb = idx[a] - center[a], idx[b] - center[b]
            cov[a, b] = cov[b, a] = float((ya * ya) @ marg) if a == b else float(ya @ marg @ yb)
    return Moments(center=center, cov=cov, sigma=np.sqrt(np.clip(np.diag(cov), 0, None)), total=total)


def moments(map: Any) -> Moments:
    """Centre, covariance and per-axis sigma from the second moments of a non-negative map.

    center = sum x m(x) / sum m, cov = sum (x - center)(x - center)^T m(x) / sum m. For a
    uniform-weight linear stack this equals :func:`erf.theory.gaussian_sigma` exactly
    (3x3, n layers: sigma = sqrt(2n/3)). Luo et al. 2016, https://arxiv.org/abs/1701.04128

    Args:
        map: non-negative 1-, 2- or 3-D array-like (callers pass abs of signed maps).
    Returns:
        :class:`Moments`.
    Raises:
        TypeError: map is not an array-like of real numbers.
        ValueError: wrong dimensionality, NaN/Inf, negative values, or an all-zero map.
    """
    arr = _as_map(map)
    _require_finite_nonneg(arr)
    if not arr.any():
        raise ValueError("map is all zeros: its moments are undefined")
    return _moments(arr)


# ----------------------------------------------------------------------- Gaussian fit
@dataclass(frozen=True, eq=False)
class GaussianFit:
    """Least-squares Gaussian A exp(-1/2 (x - mu)^T Sigma^-1 (x - mu)) + c (c = 0 unless asked).

    Attributes:
        center: (d,) mu in array order. cov: (d, d) Sigma. sigma: (d,) sqrt of diag(Sigma).
        sigma_major / sigma_minor: sqrt of the largest / smallest eigenvalue of Sigma.
        theta_deg: major axis from +col towards +row, in (-90, 90]; None unless 2-D.
        amplitude: A, in the map's units (negative for a trough of a signed map).
        offset: c, the constant background (0.0 unless fitted with ``offset=True``).
        r2: coefficient of determination on the whole map. rmse: root-mean-square residual on
            the whole map, in the map's units (for a good fit, the noise level of the map).
        stderr: standard errors from the fit's parameter covariance (keys ``center``,
            ``sigma``, ``cov``, ``sigma_major``, ``sigma_minor``, ``amplitude``, in 2-D
            ``theta_deg``, with an offset ``offset``), assuming i.i.d. residuals.
        n_points: number of map positions the optimiser used (after cropping/subsampling).
    """

    center: np.ndarray
    cov: np.ndarray
    sigma: np.ndarray
    sigma_major: float
    sigma_minor: float
    theta_deg: float | None
    amplitude: float
    r2: float
    stderr: dict[str, Any] = field(default_factory=dict)
    n_points: int = 0
    offset: float = 0.0
    rmse: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        se = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.stderr.items()}
        return {"center": self.center.tolist(), "cov": self.cov.tolist(), "sigma": self.sigma.tolist(),
                "sigma_major": self.sigma_major, "sigma_minor": self.sigma_minor,
                "theta_deg": self.theta_deg, "amplitude": self.amplitude, "offset": self.offset,
                "r2": self.r2, "rmse": self.rmse, "stderr": se, "n_points": self.n_points}


def _n_core(d: int) -> int:
    """Parameters of the Gaussian itself: amplitude, d centre, d(d+1)/2 precision factors."""
    return 1 + d + d * (d + 1) // 2


def _unpack(p: np.ndarray, d: int) -> tuple[float, np.ndarray, np.ndarray]:
    """params -> (A, mu, L) with precision P = L L^T, L lower triangular, log diagonal.

    A trailing parameter beyond :func:`_n_core` is the constant offset (ignored here)."""
    amp, mu = p[0], p[1:1 + d]
    L = np.zeros((d, d))
    L[np.diag_indices(d)] = np.exp(p[1 + d:1 + 2 * d])
    L[np.tril_indices(d, -1)] = p[1 + 2 * d:_n_core(d)]
    return amp, mu, L


def _pack(amp: float, mu: np.ndarray, L: np.ndarray) -> np.ndarray:
    d = len(mu)
    return np.concatenate([[amp], mu, np.log(np.diag(L)), L[np.tril_indices(d, -1)]])


def _model(p: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, ...]:
    """(prediction, exp part, x - mu, L^T (x - mu), Gaussian part without the offset)."""
    d = X.shape[1]
    amp, mu, L = _unpack(p, d)
    Y = X - mu
    Z = Y @ L  # z = L^T (x - mu), so q = |z|^2
    e = np.exp(-0.5 * np.einsum("ij,ij->i", Z, Z))
    f = amp * e
    if len(p) > _n_core(d):  # constant offset
        return f + p[-1], e, Y, Z, f
    return f, e, Y, Z, f


def _jacobian(p: np.ndarray, X: np.ndarray) -> np.ndarray:
    d = X.shape[1]
    amp, _, L = _unpack(p, d)
    _, e, Y, Z, f = _model(p, X)
    cols = [e, *(f[:, None] * (Z @ L.T)).T]
    cols += [-f * Z[:, i] * Y[:, i] * L[i, i] for i in range(d)]
    rows, colsj = np.tril_indices(d, -1)
    cols += [-f * Z[:, j] * Y[:, i] for i, j in zip(rows, colsj)]
    if len(p) > _n_core(d):
        cols.append(np.ones_like(e))
    return np.stack(cols, axis=1)


def _derived(p: np.ndarray, d: int, theta_ref: float | None) -> np.ndarray:
    """Reported quantities as one vector (for the delta-method standard errors)."""
    amp, mu, L = _unpack(p, d)
    cov = np.linalg.inv(L @ L.T)
    major, minor, theta = _principal(cov)
    out = [amp, *mu, *np.sqrt(np.diag(cov)), major, minor, *cov[np.triu_indices(d)]]
    if d == 2:
        out.append(theta_ref + _wrap_angle(theta - theta_ref))
    if len(p) > _n_core(d):
        out.append(p[-1])
    return np.asarray(out, dtype=np.float64)


def _fit_points(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (N, d) and values used by the optimiser: crop to the mass, then subsample."""
    sub = arr
    offset = np.zeros(arr.ndim)
    step = 1
    if arr.size > _MAX_FIT_POINTS:
        keep = np.argwhere(np.abs(arr) > 1e-4 * np.abs(arr).max())
        lo = np.maximum(keep.min(axis=0) - 2, 0)
        hi = np.minimum(keep.max(axis=0) + 3, arr.shape)
        sub = arr[tuple(slice(a, b) for a, b in zip(lo, hi))]
        offset = lo.astype(np.float64)
        if sub.size > _MAX_FIT_POINTS:
            step = math.ceil((sub.size / _MAX_FIT_POINTS) ** (1.0 / arr.ndim))
            sub = sub[(slice(None, None, step),) * arr.ndim]
    grids = np.indices(sub.shape).reshape(arr.ndim, -1).T.astype(np.float64) * step + offset
    return grids, sub.ravel()


def _warn(reason: str) -> None:
    warnings.warn(f"fit_gaussian: no fit ({reason}); returning None", FitWarning, stacklevel=3)


def fit_gaussian(map: Any, *, offset: bool = False) -> GaussianFit | None:
    """Least-squares Gaussian fit A exp(-1/2 (x - mu)^T Sigma^-1 (x - mu)) [+ c], full covariance.

    Any finite map, signed or not: least squares needs no non-negativity, so a noisy Gaussian
    or a signed ``mean`` map is fitted as it is (a map dominated by negative values gets a
    negative amplitude, a trough). ``offset=True`` adds a constant background c. Sigma^-1 =
    L L^T with L lower triangular and a log-parametrised diagonal (always positive definite);
    analytic Jacobian; scipy.optimize.least_squares, initialised from the second moments of
    the peak. Maps above 2^17 positions are cropped to their mass and subsampled for the
    optimiser; ``r2`` and ``rmse`` (goodness of fit) are computed on the whole map. Luo et
    al. 2016 (ERF as a Gaussian), https://arxiv.org/abs/1701.04128

    Args:
        map: finite 1-, 2- or 3-D array-like. offset: fit a constant background too.
    Returns:
        :class:`GaussianFit`, or None with a :class:`FitWarning` when the map cannot be
        fitted (NaN/Inf, all zeros or constant, too few non-zero points, a support one position
        wide on some axis, optimiser failure, no peak). No scipy exception escapes.
    Raises:
        TypeError / ValueError: map is not a 1-3-D array-like of reals; offset not a bool.
    """
    if not isinstance(offset, bool):
        raise TypeError(f"offset must be True or False, got {offset!r}")
    arr = _as_map(map)
    if not np.all(np.isfinite(arr)):
        _warn("map holds NaN or Inf")
        return None
    d = arr.ndim
    n_params = _n_core(d) + int(offset)
    nnz = int(np.count_nonzero(arr))
    if nnz == 0:
        _warn("map is all zeros")
        return None
    if nnz < max(5, n_params + 1):
        _warn(f"only {nnz} non-zero positions for {n_params} parameters")
        return None
    for a in range(d):
        support = np.count_nonzero(arr.any(axis=tuple(b for b in range(d) if b != a)))
        if support < 2:
            _warn(f"the support is one position wide on axis {a}")
            return None
    try:
        with np.errstate(all="ignore"):
            return _fit(arr, offset)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError) as exc:
        _warn(f"{type(exc).__name__}: {exc}")
        return None


def _fit(arr: np.ndarray, offset: bool) -> GaussianFit | None:
    from scipy.optimize import least_squares

    d = arr.ndim
    # Work on y = sign (arr - b0) / scale: a peak of height about 1 on a background near 0.
    plain = not offset and not np.any(arr < 0)  # the non-negative map without offset: as it always was
    b0 = float(np.median(arr)) if offset else 0.0
    y = arr - b0
    sign = 1.0 if plain or y.max() >= -y.min() else -1.0
    scale = float(np.abs(y).max())
    if scale == 0:
        _warn("map is constant: no peak")
        return None
    y = y * (sign / scale)
    # Initial guess from the second moments of the peak: noise and background below 10 % of it
    # would widen the moments (and the negative part has none).
    weights = y if plain else np.clip(y - 0.1, 0.0, None)
    mom = _moments(weights)
    cov0 = mom.cov + np.eye(d) / 12.0  # a pixel's own variance keeps it positive definite
    L0 = np.linalg.cholesky(np.linalg.inv(cov0))
    p0 = _pack(1.0, mom.center, L0)
    if offset:
        p0 = np.append(p0, 0.0)
    X, yv = _fit_points(y)

    def residual(p: np.ndarray) -> np.ndarray:
        return _model(p, X)[0] - yv

    def jac(p: np.ndarray) -> np.ndarray:
        return _jacobian(p, X)

    res = least_squares(residual, p0, jac=jac, method="lm", xtol=1e-10, ftol=1e-10, gtol=1e-10,
                        max_nfev=_MAX_NFEV)
    if res.status <= 0 or not np.all(np.isfinite(res.x)):
        res = least_squares(residual, p0, jac=jac, method="trf", x_scale="jac", max_nfev=_MAX_NFEV)
    p = res.x
    if res.status <= 0 or not np.all(np.isfinite(p)):
        _warn(f"optimiser failed: {res.message}")
        return None
    amp, mu, L = _unpack(p, d)
    cov = np.linalg.inv(L @ L.T)
    if not (np.all(np.isfinite(cov)) and amp > 0 and np.all(np.linalg.eigvalsh(cov) > 0)):
        _warn("the optimum is not a finite Gaussian peak")
        return None
    major, minor, theta = _principal(cov)
    if major > _MAX_SIGMA_FACTOR * max(arr.shape) or not np.all(np.abs(mu) < 10 * max(arr.shape)):
        _warn(f"the fit diverged (sigma_major {major:.3g} px on a map of shape {arr.shape}): no peak")
        return None

    # goodness of fit on the whole map, in its own units
    Xall = np.indices(arr.shape).reshape(d, -1).T.astype(np.float64)
    pred = b0 + _model(p, Xall)[0] * (sign * scale)
    flat = arr.ravel()
    ss_tot = float(((flat - flat.mean()) ** 2).sum())
    ss_res = float(((flat - pred) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    rmse = math.sqrt(ss_res / flat.size)

    stderr = _stderr(res, p, d, theta, scale)
    return GaussianFit(center=mu.copy(), cov=cov, sigma=np.sqrt(np.diag(cov)), sigma_major=major,
                       sigma_minor=minor, theta_deg=theta, amplitude=float(sign * amp * scale), r2=r2,
                       stderr=stderr, n_points=len(yv),
                       offset=float(b0 + sign * scale * p[-1]) if offset else 0.0, rmse=rmse)


def _stderr(res: Any, p: np.ndarray, d: int, theta: float | None, scale: float) -> dict[str, Any]:
    """Delta-method standard errors: s^2 (J^T J)^-1 pushed through the reported quantities."""
    J = res.jac
    dof = max(J.shape[0] - J.shape[1], 1)
    s2 = float(res.fun @ res.fun) / dof
    cov_p = s2 * np.linalg.pinv(J.T @ J)
    g0 = _derived(p, d, theta)
    G = np.empty((len(g0), len(p)))
    for i in range(len(p)):
        h = 1e-6 * max(1.0, abs(p[i]))
        dp = np.zeros_like(p)
        dp[i] = h
        G[:, i] = (_derived(p + dp, d, theta) - _derived(p - dp, d, theta)) / (2 * h)
    se = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", G, cov_p, G), 0, None))
    cov_se = np.zeros((d, d))
    iu = np.triu_indices(d)
    cov_se[iu] = se[3 + 2 * d:3 + 2 * d + len(iu[0])]
    cov_se = cov_se + np.triu(cov_se, 1).T
    out: dict[str, Any] = {
        "amplitude": float(se[0] * scale),
        "center": se[1:1 + d].copy(),
        "sigma": se[1 + d:1 + 2 * d].copy(),
        "sigma_major": float(se[1 + 2 * d]),
        "sigma_minor": float(se[2 + 2 * d]),
        "cov": cov_se,
    }
    if d == 2:
        out["theta_deg"] = float(se[3 + 2 * d + len(iu[0])])
    if len(p) > _n_core(d):
        out["offset"] = float(se[-1] * scale)
    return out


# --------------------------------------------------------------------------- metrics
def _resolve_center(arr: np.ndarray, center: Any, trf: Any) -> np.ndarray:
    d = arr.ndim
    if center is not None:
        name = "center"
        try:
            c = np.atleast_1d(np.asarray(center, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"center must be a sequence of {d} numbers, got {center!r}") from exc
    elif trf is not None:
        name = "trf"
        for attr in ("size", "center"):
            if not hasattr(trf, attr):
                raise TypeError(f"trf must have tuple attributes .size and .center (e.g. an RFReport); "
                                f"{type(trf).__name__} has no .{attr}")
        try:
            c = np.atleast_1d(np.asarray(trf.center, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"trf.center must be numbers, got {trf.center!r}") from exc
    else:
        return np.array([n // 2 for n in arr.shape], dtype=np.float64)
    if c.shape != (d,):
        raise ValueError(f"{name} must give {d} coordinate(s) for a {d}-D map, got {c.tolist()}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name} must be finite, got {c.tolist()}")
    if np.any(c < 0) or np.any(c > np.array(arr.shape) - 1):
        raise ValueError(f"{name} {c.tolist()} lies outside the map of shape {arr.shape}")
    return c


def _trf_sizes(trf: Any, d: int) -> np.ndarray:
    try:
        size = np.atleast_1d(np.asarray(trf.size, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trf.size must be numbers, got {trf.size!r}") from exc
    if size.shape != (d,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise ValueError(f"trf.size must be {d} positive number(s), got {trf.size!r}")
    return size


def _value_at(arr: np.ndarray, c: np.ndarray) -> float:
    """Multilinear interpolation at c (exact at integer positions)."""
    lo = np.floor(c).astype(int)
    frac = c - lo
    val = 0.0
    for corner in np.ndindex(*(2,) * arr.ndim):
        pos = lo + np.array(corner)
        w = float(np.prod(np.where(np.array(corner) == 1, frac, 1 - frac)))
        if w > 0:
            val += w * float(arr[tuple(np.minimum(pos, np.array(arr.shape) - 1))])
    return val


def _area_ratio(arr: np.ndarray, c: np.ndarray, thresholds: Sequence[float]) -> dict[float, float | None]:
    ci = np.floor(c + 0.5).astype(int)
    total = float(arr.sum())
    if total <= 0:
        return {t: None for t in thresholds}
    axes = [np.abs(np.arange(n) - ci[a]) for a, n in enumerate(arr.shape)]
    cheb = np.broadcast_to(reduce(np.maximum, np.ix_(*axes)), arr.shape)
    imax = int(min(min(ci[a], n - 1 - ci[a]) for a, n in enumerate(arr.shape)))
    rings = np.bincount(cheb.ravel(), weights=arr.ravel())
    held = np.cumsum(rings)[: imax + 1] / total
    out: dict[float, float | None] = {}
    for t in thresholds:
        hit = np.nonzero(held >= t * (1 - 1e-12))[0]
        out[t] = None if len(hit) == 0 else float((2 * hit[0] + 1) ** arr.ndim / arr.size)
    return out


def metrics(map: Any, center: Any = None, trf: Any = None, log_scale: bool = False) -> dict[str, Any]:
    """Summary metrics of a non-negative ERF map around a centre.

    erf_size = count^(1/d) of positions with value > (1 - 0.9545) x value at the centre
    (Luo et al. 2016, https://arxiv.org/abs/1701.04128); area_ratio[t] = (2i+1)^d / map size
    for the smallest centred square (side 2i+1 from side 1, inside the map) holding >= t of the
    total of the RAW map around ``center`` (the TRF centre in ``ERFResult.metrics``). This is a
    mass-concentration measure in the spirit of RepLKNet's high-contribution area ratio, NOT that
    ratio: RepLKNet's ``analyze_erf.py`` scales the map to log10(map + 1) / max, measures around
    (H // 2, W // 2), tries sides 3, 5, ... only and needs a strict ``>``; on the same map the two
    differ by about 2x. For RepLKNet's numbers use :func:`erf.protocols.replknet_area_ratio`
    (``protocol="replknet"``, ``erf analyze FILE --protocol replknet``).

    Args:
        map: non-negative 1-, 2- or 3-D array-like.
        center: d coordinates (array order, half-integers allowed: the centre value is then
            interpolated); default the TRF centre if ``trf`` is given, else ``size // 2``.
        trf: any object with per-axis tuples ``.size`` and ``.center`` (e.g. ``erf.RFReport``).
        log_scale: apply RepLKNet's log10(map + 1) / max before ``area_ratio`` only.
    Returns:
        dict: ``center``; ``erf_size`` (None if the centre value is 0); ``erf_extent`` (tuple,
        last - first + 1 per axis); ``erf_trf_ratio`` ({"per_axis": extent / TRF size,
        "overall": erf_size / TRF geometric-mean side}, None without trf); ``mass_radius``
        (smallest Euclidean radius around the centre holding 95.45% of the mass);
        ``area_ratio`` ({0.2, 0.3, 0.5, 0.99} -> share or None; raw map, see above); ``anisotropy``
        (sigma_major / sigma_minor of the moments' covariance).
    Raises:
        TypeError / ValueError naming ``map``, ``center`` or ``trf`` for bad inputs.
    """
    arr = _as_map(map)
    _require_finite_nonneg(arr)
    if not arr.any():
        raise ValueError("map is all zeros: its metrics are undefined")
    if not isinstance(log_scale, (bool, np.bool_)):
        raise TypeError(f"log_scale must be a bool, got {log_scale!r}")
    d = arr.ndim
    c = _resolve_center(arr, center, trf)
    trf_size = _trf_sizes(trf, d) if trf is not None else None

    v_c = _value_at(arr, c)
    erf_size: float | None = None
    extent: tuple[int, ...] | None = None
    if v_c > 0:
        mask = arr > ERF_THRESHOLD * v_c
        erf_size = float(np.count_nonzero(mask)) ** (1.0 / d)
        extent = tuple(
            int(idx[-1] - idx[0] + 1)
            for idx in (np.nonzero(mask.any(axis=tuple(b for b in range(d) if b != a)))[0] for a in range(d))
        )
    ratio = None
    if trf_size is not None and erf_size is not None and extent is not None:
        ratio = {"per_axis": tuple(float(e / s) for e, s in zip(extent, trf_size)),
                 "overall": float(erf_size / np.prod(trf_size) ** (1.0 / d))}

    sq = sum(((np.arange(n) - c[a]) ** 2).reshape([-1 if b == a else 1 for b in range(d)])
             for a, n in enumerate(arr.shape))
    dist = np.sqrt(np.broadcast_to(sq, arr.shape)).ravel()
    order = np.argsort(dist, kind="stable")
    held = np.cumsum(arr.ravel()[order])
    k = int(np.searchsorted(held, ERF_MASS * held[-1], side="left"))
    mass_radius = float(dist[order[min(k, len(order) - 1)]])

    area_map = arr
    if log_scale:
        area_map = np.log10(arr + 1.0)
        area_map = area_map / area_map.max()
    mom = _moments(arr)
    return {
        "center": tuple(float(x) for x in c),
        "erf_size": erf_size,
        "erf_extent": extent,
        "erf_trf_ratio": ratio,
        "mass_radius": mass_radius,
        "area_ratio": _area_ratio(area_map, c, AREA_THRESHOLDS),
        "anisotropy": 1.0 if d == 1 else mom.anisotropy,
    }
