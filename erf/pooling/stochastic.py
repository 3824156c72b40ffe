"""Stochastic pooling and S3 (stochastic spatial sampling) pooling.

- Zeiler & Fergus, "Stochastic Pooling for Regularization of Deep Convolutional Neural
  Networks", ICLR 2013. https://arxiv.org/abs/1301.3557
- Zhai, Wu, Kumar, Zhang & Zhang, "S3Pool: Pooling with Stochastic Spatial Sampling",
  CVPR 2017. https://arxiv.org/abs/1611.05138

Training-mode noise comes only from :mod:`erf._rng` (keyed streams); eval is deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _rng
from ..rfrule import RFRule
from ._registry import register
from ._utils import WindowPool2d, windows


def stochastic_pool2d(x: torch.Tensor, kernel_size=2, stride=None, padding=0,
                      training: bool = False) -> torch.Tensor:
    """Stochastic pooling on ``a = relu(x)``.

    Train: one element of each window sampled with ``p_i = a_i / sum_R a`` (0 for an all-zero
    window). Eval: the probability-weighted mean ``sum_R a^2 / sum_R a`` (0 when ``sum_R a = 0``).

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C, H', W'].
    """
    stride = kernel_size if stride is None else stride
    a = F.relu(x)
    if not training:
        s1 = F.avg_pool2d(a, kernel_size, stride, padding, divisor_override=1)
        s2 = F.avg_pool2d(a * a, kernel_size, stride, padding, divisor_override=1)
        pos = s1 > 0
        return torch.where(pos, s2 / torch.where(pos, s1, torch.ones_like(s1)), torch.zeros_like(s1))
    win = windows(a, kernel_size, stride, padding)  # (N, C, H', W', K)
    cum = win.detach().cumsum(-1)
    u = _rng.rand(*win.shape[:4], 1, device=x.device, dtype=x.dtype, batch=True) * cum[..., -1:]
    idx = (cum <= u).sum(-1, keepdim=True).clamp_max(win.shape[-1] - 1)
    return win.gather(-1, idx).squeeze(-1)


class StochasticPool2d(WindowPool2d):
    """See :func:`stochastic_pool2d` (samples in train mode, weighted mean in eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_pool2d(x, self.kernel_size, self.stride, self.padding, self.training)


def _s3_indices(n: int, grid: int, device) -> torch.Tensor:
    """Sorted indices keeping half of every block of ``grid`` positions (``ceil(rest/2)`` of the last)."""
    full, rest = divmod(n, grid)
    parts = []
    if full:
        keys = _rng.rand(full, grid)
        pick = keys.argsort(1)[:, : grid // 2].sort(1).values
        parts.append((pick + grid * torch.arange(full).unsqueeze(1)).reshape(-1))
    if rest:
        parts.append(_rng.randperm(rest)[: (rest + 1) // 2].sort().values + full * grid)
    return torch.cat(parts).to(device)


class S3Pool2d(nn.Module):
    """S3Pool: max pool k2 s1, then stochastic spatial sampling of rows and columns.

    Train: on the k2 s1 max map (padded at the end to keep ``H x W``), each block of ``grid``
    rows (columns) keeps ``grid/2`` distinct rows (columns) drawn at random, shared over batch
    and channels; output ``ceil(H/2) x ceil(W/2)``. Eval: ``avg_pool(k2, s2, pad 1,
    count_include_pad=False)`` of the unpadded k2 s1 max map (the expectation used by the
    reference code), the same output size. Zhai et al. 2017, https://arxiv.org/abs/1611.05138
    """

    def __init__(self, grid_size: int = 4, pool_size: int = 2) -> None:
        super().__init__()
        if pool_size != 2:
            raise ValueError(f"S3Pool2d supports pool_size=2 only, got {pool_size!r}")
        if not isinstance(grid_size, int) or grid_size < 2 or grid_size % 2:
            raise ValueError(f"grid_size must be an even int >= 2, got {grid_size!r}")
        self.grid_size, self.pool_size = grid_size, pool_size
        self.last_indices: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            # an axis of size 1 is kept as it is (training keeps its one row/column too)
            k = tuple(2 if n > 1 else 1 for n in x.shape[-2:])
            m = F.max_pool2d(x, k, 1)
            return F.avg_pool2d(m, k, k, tuple(v - 1 for v in k),
                                count_include_pad=False)
        m = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)
        rows = _s3_indices(x.shape[-2], self.grid_size, x.device)
        cols = _s3_indices(x.shape[-1], self.grid_size, x.device)
        self.last_indices = (rows.cpu(), cols.cpu())
        return m.index_select(-2, rows).index_select(-1, cols)

    def rf_rule(self) -> RFRule:
        return RFRule.make(3, 2, 1, note="eval rule; training samples rows/cols (rf_input_span)")

    def rf_input_span(self, axis: int, lo: int, hi: int, in_size: int, out_size: int) -> tuple[int, int]:
        """Inclusive input range of outputs ``lo..hi``: eval ``2lo-1 .. 2hi+1``; train from the last samples."""
        if self.training and self.last_indices is not None and len(self.last_indices[axis]) == out_size:
            idx = self.last_indices[axis]
            return int(idx[lo]), int(idx[hi]) + 1
        return 2 * lo - 1, 2 * hi + 1

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, pool_size={self.pool_size}"


@register("stochastic", kind="stochastic", locality="local", rf="k2 s2",
          paper="Zeiler & Fergus, ICLR 2013. https://arxiv.org/abs/1301.3557")
def _make_stochastic(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Stochastic pooling on relu(x): sample by p = a/sum a in training, sum a^2/sum a at eval."""
    kw.setdefault("kernel_size", 2)
    return StochasticPool2d(stride=stride, **kw)


@register("s3", kind="stochastic", locality="local", rf="eval k3 s2 p1; train 2 + jitter",
          paper="Zhai et al., S3Pool, CVPR 2017. https://arxiv.org/abs/1611.05138")
def _make_s3(channels: int, stride: int = 2, **kw) -> nn.Module:
    """S3Pool: max k2 s1 then random row/column sampling (grid 4); avg k2 s2 p1 at eval."""
    if stride != 2:
        raise ValueError(f"s3 supports stride 2 only, got {stride!r}")
    return S3Pool2d(**kw)
