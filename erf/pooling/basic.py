"""Max, average and max+average pooling.

- max / avg: the torch built-ins (Boureau, Ponce & LeCun, "A Theoretical Analysis of Feature
  Pooling in Visual Recognition", ICML 2010. https://icml.cc/Conferences/2010/papers/638.pdf).
- maxavg: ``0.5 (max + avg)`` or their channel concatenation, as timm's ``adaptive_avgmax_pool``
  (https://github.com/huggingface/pytorch-image-models/blob/main/timm/layers/adaptive_avgmax_pool.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rfrule import RFRule
from ._registry import register
from ._utils import WindowPool2d


class MaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` that declares its receptive-field rule. ``y = max_R x``."""

    def rf_rule(self) -> RFRule:
        return RFRule.make(self.kernel_size, self.stride, self.padding, self.dilation)


class AvgPool2d(nn.AvgPool2d):
    """:class:`torch.nn.AvgPool2d` that declares its receptive-field rule. ``y = mean_R x``."""

    def rf_rule(self) -> RFRule:
        return RFRule.make(self.kernel_size, self.stride, self.padding)


def max_avg_pool2d(x: torch.Tensor, kernel_size=2, stride=None, padding=0,
                   concat: bool = False) -> torch.Tensor:
    """``0.5 (max_R x + mean_R x)``; with ``concat`` the two maps stacked on channels.

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C, H', W'] (``2C`` channels with ``concat``).
    """
    stride = kernel_size if stride is None else stride
    mx = F.max_pool2d(x, kernel_size, stride, padding)
    av = F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)
    return torch.cat([mx, av], 1) if concat else 0.5 * (mx + av)


class MaxAvgPool2d(WindowPool2d):
    """See :func:`max_avg_pool2d`."""

    def __init__(self, kernel_size=2, stride=None, padding=0, concat: bool = False) -> None:
        super().__init__(kernel_size, stride, padding)
        self.concat = concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.concat)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, concat={self.concat}"


_BOUREAU = ("Boureau, Ponce & LeCun, A Theoretical Analysis of Feature Pooling in Visual "
            "Recognition, ICML 2010. https://icml.cc/Conferences/2010/papers/638.pdf")


@register("max", kind="data-dependent", locality="local", paper=_BOUREAU, rf="k2 s2")
def _make_max(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Max pooling, k2 s2: y = max over the window."""
    kw.setdefault("kernel_size", 2)
    return MaxPool2d(stride=stride, **kw)


@register("avg", kind="fixed", locality="local", paper=_BOUREAU, rf="k2 s2")
def _make_avg(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Average pooling, k2 s2: y = mean over the window."""
    kw.setdefault("kernel_size", 2)
    return AvgPool2d(stride=stride, **kw)


@register("maxavg", kind="data-dependent", locality="local", rf="k2 s2",
          paper="timm adaptive_avgmax_pool. https://github.com/huggingface/pytorch-image-models")
def _make_maxavg(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Max + average pooling, k2 s2: y = (max + mean) / 2."""
    kw.setdefault("kernel_size", 2)
    return MaxAvgPool2d(stride=stride, **kw)
