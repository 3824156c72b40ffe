"""Running mean and variance that merge exactly (Chan, Golub & LeVeque 1979).

Statistics are kept in float64 on the device of the run; a batch contributes its own
mean and sum of squared deviations, combined with the running ones by

    n = na + nb,  mean = ma + d nb / n,  M2 = M2a + M2b + d^2 na nb / n,  d = mb - ma,

which is numerically stable and associative up to rounding, so runs over disjoint
draws, batches or processes merge into the run over their union.

:class:`ClusteredMoments` / :class:`ClusterStats` keep the same sums per weight draw, for the
cluster-robust standard error (draws as clusters, inputs nested; Liang & Zeger 1986,
Cameron & Miller 2015) and the within/between-draw variance components.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class RunningMoments:
    """Count, mean and M2 (sum of squared deviations) of maps, per position."""

    n: torch.Tensor      # scalar float64 (a tensor: updates never synchronise with the host)
    mean: torch.Tensor   # float64, shape of the map
    m2: torch.Tensor     # float64, shape of the map

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: torch.device | str = "cpu") -> "RunningMoments":
        z = torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(torch.zeros((), dtype=torch.float64, device=device), z, z.clone())

    def update(self, batch: torch.Tensor, weight: torch.Tensor | None = None,
               window: tuple[slice, ...] | None = None) -> None:
        """Add the maps ``batch[i]`` (shape ``(B, *map_shape)``).

        ``weight`` (shape ``(B,)``, 0 or 1) masks samples out (non-finite ones);
        ``window`` places maps that cover only part of the grid (cone cropping): positions
        outside the window are known to be exactly zero for every sample.
        """
        batch = batch.to(torch.float64)
        if weight is None:
            nb = torch.tensor(float(batch.shape[0]), dtype=torch.float64, device=batch.device)
            mb = batch.mean(0)
            m2b = ((batch - mb) ** 2).sum(0)
        else:
            w = weight.to(torch.float64).reshape((-1,) + (1,) * (batch.dim() - 1))
            batch = torch.where(w > 0, batch, torch.zeros((), dtype=batch.dtype, device=batch.device))
            nb = w.sum()
            safe = torch.clamp(nb, min=1.0)
            mb = (batch * w).sum(0) / safe
            m2b = (w * (batch - mb) ** 2).sum(0)
        if window is None:
            self._combine(nb, mb, m2b)
            return
        # Outside the window every sample is exactly 0: mean_b = 0 and M2_b = 0 there.
        full_mb = torch.zeros_like(self.mean)
        full_m2b = torch.zeros_like(self.m2)
        full_mb[window] = mb
        full_m2b[window] = m2b
        self._combine(nb, full_mb, full_m2b)

    def _combine(self, nb: torch.Tensor, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        na = self.n
        n = na + nb
        safe = torch.clamp(n, min=1.0)
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / safe)
        self.m2 = self.m2 + m2b + delta * delta * (na * nb / safe)
        self.n = n

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        """A new accumulator holding both (``self`` first)."""
        out = RunningMoments(self.n.clone(), self.mean.clone(), self.m2.clone())
        out._combine(other.n.to(out.n.device), other.mean.to(out.mean.device), other.m2.to(out.m2.device))
        return out

    def to_numpy(self) -> tuple[int, np.ndarray, np.ndarray]:
        """``(n, mean, m2)`` on the host (the one transfer at the end of a run)."""
        return int(round(self.n.item())), self.mean.cpu().numpy(), self.m2.cpu().numpy()

    @classmethod
    def from_numpy(cls, n: int, mean: np.ndarray, m2: np.ndarray,
                   device: torch.device | str = "cpu") -> "RunningMoments":
        return cls(torch.tensor(float(n), dtype=torch.float64, device=device),
                   torch.as_tensor(np.asarray(mean, dtype=np.float64), device=device).clone(),
                   torch.as_tensor(np.asarray(m2, dtype=np.float64), device=device).clone())


def merge_numpy(a: tuple[int, np.ndarray, np.ndarray],
                b: tuple[int, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan's combination of two ``(n, mean, m2)`` triples on the host."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return 0, ma.copy(), m2a.copy()
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


def stderr_of(n: int, m2: np.ndarray) -> np.ndarray:
    """Standard error of the mean per position: sqrt(M2 / (n - 1) / n); NaN for n < 2."""
    if n < 2:
        return np.full_like(m2, np.nan)
    return np.sqrt(np.maximum(m2, 0.0) / (n - 1) / n)


# ----------------------------------------------------------------- two-level (clustered) statistics
#
# Maps x_{d,i}: weight draw d = 1..D, input i = 1..n_d within it, N = sum n_d. Inputs of one draw
# share the weights and are correlated; the draw is the independent unit (a cluster). Kept per
# draw: n_d and the draw mean xbar_d; over all draws: W = sum_d sum_i (x_{d,i} - xbar_d)^2, the
# within-draw sum of squares. Everything else follows exactly:
#
#   m = sum_d n_d xbar_d / N                         (the mean map)
#   M2 = W + sum_d n_d (xbar_d - m)^2                (total sum of squares, as RunningMoments)
#   Var_c(m) = D / (D - 1) sum_d (n_d / N)^2 (xbar_d - m)^2     (cluster-robust, D >= 2; D - 1 df)
#   Var(m) = W / (N - 1) / N                         (D = 1: inputs independent; N - 1 df)
#
# Var_c is the sandwich (Liang & Zeger 1986) variance of an intercept-only regression with the
# small-sample factor G / (G - 1) (Cameron & Miller 2015, "A Practitioner's Guide to
# Cluster-Robust Inference", J. Human Resources 50(2)); with equal n_d it is the sample variance
# of the D draw means over D. The variance components are the one-way random-effects ANOVA
# estimates: within = W / (N - D), between = max(0, (MSB - within) / n0), MSB = sum_d n_d
# (xbar_d - m)^2 / (D - 1), n0 = (N - sum n_d^2 / N) / (D - 1).


def _combine_draw(n: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, nb: torch.Tensor, mb: torch.Tensor,
                  m2b: torch.Tensor) -> torch.Tensor:
    """Chan's step for one draw, in place on ``mean`` and ``w``; returns the new count."""
    tot = n + nb
    safe = torch.clamp(tot, min=1.0)
    delta = mb - mean
    mean.add_(delta * (nb / safe))
    w.add_(m2b + delta * delta * (n * nb / safe))
    return tot


class ClusteredMoments:
    """Per-draw counts and means plus the within-draw sum of squares, on the run's device.

    A dense block of ``draws`` slots (draw ``first_draw + k`` in slot ``k``; a slot with count 0
    is a draw not seen here), so that accumulators of different processes have the same layout
    and combine slot by slot (:meth:`merge`), even when they hold parts of the same draw.
    Memory: ``draws + 1`` maps in float64.
    """

    def __init__(self, n: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, first_draw: int):
        self.n_draw = n          # (D,) float64 counts
        self.mean_draw = mean    # (D, *shape) float64 draw means
        self.w = w               # (*shape) float64 within-draw sum of squares
        self.first_draw = int(first_draw)

    @classmethod
    def zeros(cls, shape: tuple[int, ...], first_draw: int, draws: int,
              device: torch.device | str = "cpu") -> "ClusteredMoments":
        return cls(torch.zeros(draws, dtype=torch.float64, device=device),
                   torch.zeros((draws,) + tuple(shape), dtype=torch.float64, device=device),
                   torch.zeros(tuple(shape), dtype=torch.float64, device=device), first_draw)

    def update(self, batch: torch.Tensor, draw: int, weight: torch.Tensor | None = None,
               window: tuple[slice, ...] | None = None) -> None:
        """Add the maps ``batch[i]`` (shape ``(B, *map_shape)``) of weight draw ``draw``.

        ``weight`` (``(B,)``, 0 or 1) masks samples out; ``window`` places maps that cover only part
        of the grid (cone cropping; outside it every sample is exactly 0). Same arithmetic as
        :meth:`RunningMoments.update`, into the draw's slot.
        """
        batch = batch.to(torch.float64)
        if weight is None:
            nb = torch.tensor(float(batch.shape[0]), dtype=torch.float64, device=batch.device)
            mb = batch.mean(0)
            m2b = ((batch - mb) ** 2).sum(0)
        else:
            wt = weight.to(torch.float64).reshape((-1,) + (1,) * (batch.dim() - 1))
            batch = torch.where(wt > 0, batch, torch.zeros((), dtype=batch.dtype, device=batch.device))
            nb = wt.sum()
            mb = (batch * wt).sum(0) / torch.clamp(nb, min=1.0)
            m2b = (wt * (batch - mb) ** 2).sum(0)
        if window is not None:  # outside the window every sample is exactly 0
            full_mb = torch.zeros_like(self.w)
            full_m2b = torch.zeros_like(self.w)
            full_mb[window] = mb
            full_m2b[window] = m2b
            mb, m2b = full_mb, full_m2b
        k = int(draw) - self.first_draw
        self.n_draw[k] = _combine_draw(self.n_draw[k], self.mean_draw[k], self.w, nb, mb, m2b)

    def merge(self, other: "ClusteredMoments") -> "ClusteredMoments":
        """A new accumulator holding both (same layout; slots of the same draw combine exactly)."""
        out = ClusteredMoments(self.n_draw.clone(), self.mean_draw.clone(), self.w.clone(), self.first_draw)
        dev = out.w.device
        na, nb = out.n_draw, other.n_draw.to(dev)
        tot = na + nb
        safe = torch.clamp(tot, min=1.0).reshape((-1,) + (1,) * out.w.dim())
        delta = other.mean_draw.to(dev) - out.mean_draw
        scale = lambda v: v.reshape((-1,) + (1,) * out.w.dim())  # noqa: E731
        out.mean_draw += delta * scale(nb) / safe
        out.w += other.w.to(dev) + (delta * delta * scale(na * nb) / safe).sum(0)
        out.n_draw = tot
        return out

    # -- what the loop reads while running
    @property
    def n(self) -> torch.Tensor:
        """Total count (a tensor: no host synchronisation)."""
        return self.n_draw.sum()

    def mean_and_stderr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean map and its clustered standard error on the device (see the module notes)."""
        n_d, n = self.n_draw, self.n_draw.sum()
        shape = (-1,) + (1,) * self.w.dim()
        safe = torch.clamp(n, min=1.0)
        mean = (self.mean_draw * (n_d / safe).reshape(shape)).sum(0)
        seen = n_d > 0
        D = int(seen.sum().item())
        if D >= 2:
            dev = self.mean_draw - mean
            var = (dev * dev * ((n_d / safe) ** 2).reshape(shape)).sum(0) * (D / (D - 1))
        elif float(n.item()) >= 2:
            var = torch.clamp(self.w, min=0) / (n - 1) / n
        else:
            var = torch.full_like(self.w, math.nan)
        return mean, torch.sqrt(torch.clamp(var, min=0))

    # -- flat form (torch.distributed) and host form
    def flat(self) -> torch.Tensor:
        """``[n_draw, mean_draw, w]`` as one float64 vector."""
        return torch.cat([self.n_draw.reshape(-1), self.mean_draw.reshape(-1), self.w.reshape(-1)])

    def numel_flat(self) -> int:
        return self.n_draw.numel() + self.mean_draw.numel() + self.w.numel()

    def from_flat(self, buf: torch.Tensor) -> "ClusteredMoments":
        """An accumulator of this layout read from :meth:`flat` output."""
        D, k = self.n_draw.numel(), self.w.numel()
        return ClusteredMoments(buf[:D].clone(), buf[D:D + D * k].reshape(self.mean_draw.shape).clone(),
                                buf[D + D * k:D + D * k + k].reshape(self.w.shape).clone(), self.first_draw)

    def to_host(self) -> "ClusterStats":
        """The draws seen (count > 0), on the host (one transfer at the end of a run)."""
        n = self.n_draw.cpu().numpy()
        seen = np.flatnonzero(n > 0)
        return ClusterStats(seen + self.first_draw, n[seen], self.mean_draw.cpu().numpy()[seen],
                            self.w.cpu().numpy())

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays for a checkpoint."""
        return {f"{prefix}n_draw": self.n_draw.cpu().numpy(), f"{prefix}mean_draw": self.mean_draw.cpu().numpy(),
                f"{prefix}w": self.w.cpu().numpy(), f"{prefix}first_draw": np.array(self.first_draw)}

    def load_state(self, z: Any, prefix: str) -> None:
        """Restore from :meth:`state` arrays (same layout)."""
        dev = self.w.device
        if int(z[f"{prefix}first_draw"]) != self.first_draw or tuple(z[f"{prefix}mean_draw"].shape) != \
                tuple(self.mean_draw.shape):
            raise ValueError("per-draw statistics of another layout")
        self.n_draw = torch.as_tensor(np.asarray(z[f"{prefix}n_draw"], dtype=np.float64), device=dev).clone()
        self.mean_draw = torch.as_tensor(np.asarray(z[f"{prefix}mean_draw"], dtype=np.float64), device=dev).clone()
        self.w = torch.as_tensor(np.asarray(z[f"{prefix}w"], dtype=np.float64), device=dev).clone()

    def to_numpy(self) -> tuple[int, np.ndarray, np.ndarray]:
        """``(n, mean, M2)`` like :meth:`RunningMoments.to_numpy`."""
        return self.to_host().moments()


class ClusterStats:
    """Per-draw counts and means and the within-draw sum of squares of a result, on the host.

    Attributes:
        draw_index: (D,) int, the weight draws. draw_n: (D,) float counts. draw_mean: (D, *shape)
        draw means. within_ss: (*shape) within-draw sum of squares W. See the notes above the
        class for the formulas; :meth:`merge` is exact for disjoint draws (and combines parts of
        the same draw by Chan's formula).
    """

    def __init__(self, draw_index: Any, draw_n: Any, draw_mean: Any, within_ss: Any):
        self.draw_index = np.asarray(draw_index, dtype=np.int64).reshape(-1)
        self.draw_n = np.asarray(draw_n, dtype=np.float64).reshape(-1)
        self.draw_mean = np.asarray(draw_mean, dtype=np.float64)
        self.within_ss = np.asarray(within_ss, dtype=np.float64)
        if self.draw_mean.shape != (len(self.draw_index),) + self.within_ss.shape or \
                len(self.draw_n) != len(self.draw_index):
            raise ValueError(f"inconsistent per-draw statistics: {len(self.draw_index)} draws, counts "
                             f"{self.draw_n.shape}, means {self.draw_mean.shape}, map {self.within_ss.shape}")

    @property
    def draws(self) -> int:
        """Number of draws with at least one map."""
        return int(np.count_nonzero(self.draw_n > 0))

    @property
    def n(self) -> int:
        return int(round(float(self.draw_n.sum())))

    @property
    def mean(self) -> np.ndarray:
        N = float(self.draw_n.sum())
        if N == 0:
            return np.zeros_like(self.within_ss)
        return np.tensordot(self.draw_n / N, self.draw_mean, axes=1)

    def moments(self) -> tuple[int, np.ndarray, np.ndarray]:
        """``(n, mean, M2)``: M2 = W + sum_d n_d (xbar_d - m)^2, the total sum of squares."""
        m = self.mean
        dev = self.draw_mean - m
        between = np.tensordot(self.draw_n, dev * dev, axes=1)
        return self.n, m, self.within_ss + between

    @property
    def df(self) -> int:
        """Degrees of freedom of :attr:`stderr`: D - 1 with D >= 2 draws, else N - 1."""
        return self.draws - 1 if self.draws >= 2 else max(self.n - 1, 0)

    @property
    def stderr(self) -> np.ndarray:
        """Clustered standard error of the mean map (input-level with one draw; NaN below 2 maps)."""
        D, N = self.draws, float(self.draw_n.sum())
        if D >= 2:
            dev = self.draw_mean - self.mean
            var = np.tensordot((self.draw_n / N) ** 2, dev * dev, axes=1) * (D / (D - 1))
            return np.sqrt(np.maximum(var, 0.0))
        return stderr_of(self.n, self.within_ss)

    def variance_components(self) -> dict[str, Any]:
        """One-way random-effects ANOVA: ``within`` (between inputs of a draw) and ``between``
        (between draws) variance per position, with ``draws`` and ``n``; ``between`` is None with
        one draw (not identifiable)."""
        D, N = self.draws, float(self.draw_n.sum())
        within = self.within_ss / (N - D) if N > D else np.full_like(self.within_ss, np.nan)
        between = None
        if D >= 2:
            m = self.mean
            dev = self.draw_mean - m
            msb = np.tensordot(self.draw_n, dev * dev, axes=1) / (D - 1)
            n0 = (N - float((self.draw_n ** 2).sum()) / N) / (D - 1)
            msw = np.nan_to_num(within, nan=0.0)
            between = np.maximum((msb - msw) / n0, 0.0)
        return {"within": within, "between": between, "draws": D, "n": self.n}

    def normalized_stderr(self, window: tuple[slice, ...] | None = None) -> np.ndarray:
        """Clustered standard error of the shape ``r = m / T``, ``T = sum |m|`` over ``window``.

        Delta method per draw (the ratio estimator of survey sampling): with T_d = sum sign(m)
        xbar_d, the draw's residual is u_d = (xbar_d - r T_d) / T, and Var(r) = D / (D - 1)
        sum_d (n_d / N)^2 u_d^2, so the uncertainty of the total is included. With one draw:
        stderr / T (the total's own uncertainty neglected). Positions outside ``window`` are 0.
        """
        win = window if window is not None else (slice(None),) * self.within_ss.ndim
        m = self.mean[win]
        T = float(np.abs(m).sum())
        if T == 0:
            return np.full_like(m, np.nan)
        if self.draws < 2:
            return self.stderr[win] / T
        r = m / T
        means = self.draw_mean[(slice(None),) + win]
        sgn = np.sign(m)
        Td = (means * sgn).reshape(len(means), -1).sum(1)
        u = (means - r * Td.reshape((-1,) + (1,) * m.ndim)) / T
        N, D = float(self.draw_n.sum()), self.draws
        var = np.tensordot((self.draw_n / N) ** 2, u * u, axes=1) * (D / (D - 1))
        return np.sqrt(np.maximum(var, 0.0))

    def merge(self, other: "ClusterStats") -> "ClusterStats":
        """Both sets of draws (draws present in both are combined by Chan's formula)."""
        idx = np.union1d(self.draw_index, other.draw_index)
        shape = self.within_ss.shape
        n = np.zeros(len(idx))
        mean = np.zeros((len(idx),) + shape)
        w = self.within_ss + other.within_ss
        for part in (self, other):
            for j, d in enumerate(part.draw_index):
                k = int(np.searchsorted(idx, d))
                na, nb = n[k], part.draw_n[j]
                tot = na + nb
                if tot == 0:
                    continue
                delta = part.draw_mean[j] - mean[k]
                mean[k] = mean[k] + delta * (nb / tot)
                w = w + delta * delta * (na * nb / tot)
                n[k] = tot
        return ClusterStats(idx, n, mean, w)

    def arrays(self) -> dict[str, np.ndarray]:
        """Arrays for a saved result (:meth:`from_arrays` reads them back)."""
        return {"draw_index": self.draw_index, "draw_n": self.draw_n, "draw_mean": self.draw_mean,
                "within_ss": self.within_ss}

    @classmethod
    def from_arrays(cls, z: Any) -> "ClusterStats | None":
        """From saved arrays; None when they are absent (a result saved before per-draw statistics)."""
        try:
            return cls(z["draw_index"], z["draw_n"], z["draw_mean"], z["within_ss"])
        except KeyError:
            return None


# ------------------------------------------------------------------- comparing two mean maps
def t_to_z(t: np.ndarray, df: Any) -> np.ndarray:
    """The normal quantile with the same tail probability as Student's t: ``sign(t) Phi^-1(F_t(|t|; df))``
    (computed in log space, finite far into the tails)."""
    from scipy import special, stats

    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -special.ndtri_exp(stats.t.logsf(np.abs(t), df)) * np.sign(t)


def welch_z(d: np.ndarray, se_a: np.ndarray, df_a: float, se_b: np.ndarray,
            df_b: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z-equivalents of ``t = d / sqrt(se_a^2 + se_b^2)`` under Student's t with the
    Welch-Satterthwaite degrees of freedom ``(va + vb)^2 / (va^2 / df_a + vb^2 / df_b)``.

    ``z = sign(t) Phi^-1(1 - F_t(|t|; df))``: the same two-sided p-value as the t, so |z| > 3
    means p < 0.27 % even with few draws (a t with 3 df has |t| > 3 about 6 % of the time).
    Returns ``(z, se, df)``; z is 0 where d = 0 and se = 0, +-inf where only se = 0.
    """
    va, vb = se_a ** 2, se_b ** 2
    v = va + vb
    se = np.sqrt(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = v * v / (np.where(df_a > 0, va * va / max(df_a, 1e-300), 0.0)
                      + np.where(df_b > 0, vb * vb / max(df_b, 1e-300), 0.0))
        df = np.where(np.isfinite(df) & (df > 0), df, max(df_a, df_b, 1.0))
        t = np.where(se > 0, d / np.where(se > 0, se, 1.0), 0.0)
    z = t_to_z(t, df)
    z = np.where(se > 0, z, np.where(d > 0, np.inf, np.where(d < 0, -np.inf, 0.0)))
    return z, se, df


def _moment_basis(shape: tuple[int, ...]) -> tuple[np.ndarray, list[str]]:
    """Polynomials of degree <= 2 in coordinates scaled to [-1, 1], as (k, P) rows: r^2 (spread),
    u_a (shift), u_a^2 - u_b^2 and u_a u_b (anisotropy)."""
    d = len(shape)
    u = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    grids = np.meshgrid(*u, indexing="ij")
    rows, names = [sum(g * g for g in grids)], ["spread"]
    for a in range(d):
        rows.append(grids[a])
        names.append(f"shift{a}")
    for a in range(d - 1):
        rows.append(grids[a] ** 2 - grids[a + 1] ** 2)
        names.append(f"aniso{a}{a + 1}")
    for a in range(d):
        for b in range(a + 1, d):
            rows.append(grids[a] * grids[b])
            names.append(f"tilt{a}{b}")
    return np.stack([r.reshape(-1) for r in rows]), names


def draw_features(stats: "ClusterStats", shape_only: bool = False) -> tuple[np.ndarray, list[str]]:
    """Per-draw summary of each draw's mean map x_d, with w = |x_d|: log of the mass sum w, then
    the normalised moments sum B w / sum w (:func:`_moment_basis`): insensitive to the overall gain
    of a draw's weights, which varies most between draws. ``shape_only`` drops the log mass."""
    basis, names = _moment_basis(stats.within_ss.shape)
    w = np.abs(stats.draw_mean[stats.draw_n > 0]).reshape(stats.draws, -1)
    mass = w.sum(1)
    w = w[mass > 0]
    mass = mass[mass > 0]
    feats = (w @ basis.T) / mass[:, None]
    if not shape_only:
        feats = np.concatenate([np.log(mass)[:, None], feats], axis=1)
        names = ["log_mass"] + names
    return feats, names


@dataclass
class MapTest:
    """A test of whether two mean maps differ, from their per-draw maps.

    Attributes:
        statistic: Hotelling's T^2 of the per-draw moment features (see :func:`map_test`).
        p_value: its p-value (NaN when the test is not available). features: the moments used.
        df: ``(k, nu - k + 1)``, the F distribution's degrees of freedom. note: how it was
        computed, or why it is not available.
    """

    statistic: float
    p_value: float
    features: list
    df: tuple
    note: str


def map_test(a: "ClusterStats | None", b: "ClusterStats | None", shape_only: bool = False) -> MapTest:
    """Do two mean maps differ? A two-sample Hotelling T^2 over weight draws.

    Neighbouring positions are strongly correlated, so a sum of z^2 over positions has no
    chi-square law; the draw is the independent unit. Each draw's mean map is reduced to k
    features (:func:`draw_features`: log mass, spread, shift, anisotropy), k <= (D_a + D_b) / 4,
    and T^2 = (fbar_a - fbar_b)^T (S_a / D_a + S_b / D_b)^-1 (fbar_a - fbar_b) is referred to
    nu k / (nu - k + 1) F(k, nu - k + 1) with Krishnamoorthy & Yu's (2004, Stat. Probab. Lett. 69)
    nu, which allows unequal covariances. Draws weigh equally; draws whose map is all zero (a
    dead network) have no shape and are left out. It detects differences in the mass,
    size, position or elongation of the maps, not changes that leave all of them unchanged.
    """
    from scipy import stats

    if a is None or b is None:
        return MapTest(math.nan, math.nan, [], (), "not available: a result has no per-draw statistics "
                       "(saved by an older version)")
    if min(a.draws, b.draws) < 2:
        return MapTest(math.nan, math.nan, [], (), f"not available: needs at least 2 weight draws in each "
                       f"result (got {a.draws} and {b.draws})")
    fa, names = draw_features(a, shape_only)
    fb, _ = draw_features(b, shape_only)
    Da, Db = len(fa), len(fb)
    k = min(len(names), Da - 1, Db - 1, max(1, (Da + Db) // 4))  # keep >= ~3 draws per feature
    if k < 1:
        return MapTest(math.nan, math.nan, [], (), "not available: fewer than 2 draws with a non-zero map")
    fa, fb, names = fa[:, :k], fb[:, :k], names[:k]
    Va = np.atleast_2d(np.cov(fa, rowvar=False)) / Da
    Vb = np.atleast_2d(np.cov(fb, rowvar=False)) / Db
    S = Va + Vb
    scale = np.sqrt(np.clip(np.diag(S), 1e-300, None))
    S_n, Va_n, Vb_n = (M / np.outer(scale, scale) for M in (S, Va, Vb))
    delta = (fa.mean(0) - fb.mean(0)) / scale
    if not np.all(np.isfinite(S_n)) or np.linalg.matrix_rank(S_n) < k:
        return MapTest(math.nan, math.nan, names, (), "not available: the per-draw moments do not vary")
    Sinv = np.linalg.inv(S_n)
    t2 = float(delta @ Sinv @ delta)
    denom = 0.0
    for V, D in ((Va_n, Da), (Vb_n, Db)):
        M = V @ Sinv
        denom += (np.trace(M @ M) + np.trace(M) ** 2) / (D - 1)
    nu = (k + k * k) / denom
    df2 = nu - k + 1
    if df2 <= 0:
        return MapTest(t2, math.nan, names, (k, df2), "not available: too few draws for the features")
    f = t2 * df2 / (nu * k)
    p = float(stats.f.sf(f, k, df2))
    return MapTest(t2, p, names, (k, float(df2)),
                   f"Hotelling T^2 over {Da} + {Db} draws of {k} moment features (Krishnamoorthy-Yu)")
