"""SoftPool: softmax-weighted pooling.

Stergiou, Poppe & Kalliatakis, "Refining activation downsampling with SoftPool", ICCV 2021.
https://arxiv.org/abs/2101.00440 (reference code: https://github.com/alexandrosstergiou/SoftPool;
its CUDA backward drops a term: here autograd gives the true gradient).
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register
from ._utils import WindowPool2d, windows


def soft_pool2d(x: torch.Tensor, kernel_size=2, stride=None, padding=0) -> torch.Tensor:
    """``y = sum_R e^a a / sum_R e^a = sum_R softmax_R(a) a`` (per-window max subtracted).

    Padded positions are excluded (weight 0).

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C, H', W'].
    """
    stride = kernel_size if stride is None else stride
    win = windows(x, kernel_size, stride, padding, pad_value=float("-inf"))
    w = torch.softmax(win, dim=-1)  # subtracts the window max internally
    if padding:
        win = torch.where(torch.isinf(win), torch.zeros_like(win), win)
    return (w * win).sum(-1)


class SoftPool2d(WindowPool2d):
    """See :func:`soft_pool2d`."""

    #: the engine keeps nets holding this module in contiguous memory: channels_last ran its
    #: pooling_net at 0.86x the speed (2 CPU cores, 16 inputs of 3x128x128)
    prefers_contiguous = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_pool2d(x, self.kernel_size, self.stride, self.padding)


@register("softpool", kind="data-dependent", locality="local", rf="k2 s2",
          paper="Stergiou et al., SoftPool, ICCV 2021. https://arxiv.org/abs/2101.00440")
def _make_softpool(channels: int, stride: int = 2, **kw) -> nn.Module:
    """SoftPool: softmax(x)-weighted sum over each window."""
    kw.setdefault("kernel_size", 2)
    return SoftPool2d(stride=stride, **kw)
