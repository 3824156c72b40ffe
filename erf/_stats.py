"""Running mean and variance that merge exactly (Chan, Golub & LeVeque 1979).

Statistics are kept in float64 on the device of the run; a batch contributes its own
mean and sum of squared deviations, combined with the running ones by

    n = na + nb,  mean = ma + d nb / n,  M2 = M2a + M2b + d^2 na nb / n,  d = mb - ma,

which is numerically stable and associative up to rounding, so runs over disjoint
draws, batches or processes merge into the run over their union.
"""
from __future__ import annotations

from dataclasses import dataclass

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
