"""Order-statistic pooling: median pooling and rank-based pooling (RAP, RWP).

- Median pooling: the window median (a classic robust filter; timm ``MedianPool2d``).
- Shi, Ye & Wu, "Rank-based pooling for deep convolutional neural networks", Neural Networks
  2016. https://doi.org/10.1016/j.neunet.2016.07.003

Padded positions are excluded from every window (order statistics over the valid pixels).
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register
from ._utils import WindowPool2d, pair, windows

_MODES = ("rap", "rwp")


def median_pool2d(x: torch.Tensor, kernel_size=3, stride=2, padding=1) -> torch.Tensor:
    """``y = median_R x`` over the valid pixels of each window (lower median for even counts).

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C, H', W'].
    """
    win = windows(x, kernel_size, stride, padding, pad_value=float("nan"))
    return win.nanmedian(dim=-1).values


class MedianPool2d(WindowPool2d):
    """See :func:`median_pool2d`."""

    def __init__(self, kernel_size=3, stride=2, padding=1) -> None:
        super().__init__(kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return median_pool2d(x, self.kernel_size, self.stride, self.padding)


def rank_pool2d(x: torch.Tensor, kernel_size=3, stride=2, padding=1, mode: str = "rap",
                t: int = 4, alpha: float = 0.5) -> torch.Tensor:
    """Rank-based pooling over the valid pixels of each window, ranks by decreasing value.

    RAP: ``y = mean of the top-t a`` (t=1: max, t=k^2: average; fewer valid pixels: all of
    them). RWP: ``y = sum_r alpha (1 - alpha)^(r - 1) a_(r)``.

    Args:
        x (Tensor[N, C, H, W]): input.
        mode: ``"rap"`` or ``"rwp"``.
    Returns:
        Tensor[N, C, H', W'].
    """
    win = windows(x, kernel_size, stride, padding, pad_value=float("-inf"))
    if mode == "rap":
        vals = win.topk(min(t, win.shape[-1]), dim=-1).values
    else:
        vals = win.sort(dim=-1, descending=True).values
    valid = torch.isfinite(vals)
    vals = torch.where(valid, vals, torch.zeros_like(vals))
    if mode == "rap":
        return vals.sum(-1) / valid.sum(-1).clamp_min(1).to(vals.dtype)
    r = torch.arange(vals.shape[-1], device=x.device, dtype=x.dtype)
    return (vals * (alpha * (1 - alpha) ** r)).sum(-1)


class RankPool2d(WindowPool2d):
    """See :func:`rank_pool2d` (``mode="rap"`` with ``t``, or ``mode="rwp"`` with ``alpha``)."""

    def __init__(self, kernel_size=3, stride=2, padding=1, mode: str = "rap", t: int = 4,
                 alpha: float = 0.5) -> None:
        super().__init__(kernel_size, stride, padding)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        kk = pair(kernel_size)[0] * pair(kernel_size)[1]
        if not isinstance(t, int) or not 1 <= t <= kk:
            raise ValueError(f"t must be an int in [1, {kk}], got {t!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.mode, self.t, self.alpha = mode, t, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rank_pool2d(x, self.kernel_size, self.stride, self.padding, self.mode, self.t, self.alpha)

    def extra_repr(self) -> str:
        extra = f"t={self.t}" if self.mode == "rap" else f"alpha={self.alpha}"
        return f"{super().extra_repr()}, mode={self.mode!r}, {extra}"


@register("median", kind="data-dependent", locality="local", rf="k3 s2 p1",
          paper="Median filtering as pooling (timm MedianPool2d). "
                "https://github.com/huggingface/pytorch-image-models/blob/main/timm/layers/median_pool.py")
def _make_median(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Median pooling, k3 s2 p1: lower median of the valid pixels of each window."""
    return MedianPool2d(stride=stride, **kw)


@register("rank", kind="data-dependent", locality="local", rf="k3 s2 p1",
          paper="Shi et al., Rank-based pooling, Neural Networks 2016. "
                "https://doi.org/10.1016/j.neunet.2016.07.003")
def _make_rank(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Rank-average pooling (RAP), t=4, k3 s2 p1: mean of the 4 largest (RWP via mode='rwp')."""
    return RankPool2d(stride=stride, **kw)
