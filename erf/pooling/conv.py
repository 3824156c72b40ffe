"""Convolutional baselines: strided convolution and dilated convolution.

- Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for Simplicity: The All
  Convolutional Net", ICLR 2015 workshop. https://arxiv.org/abs/1412.6806
- Yu & Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions", ICLR 2016.
  https://arxiv.org/abs/1511.07122
"""
from __future__ import annotations

from torch import nn

from ..rfrule import RFRule
from ._registry import register


class StridedConv2d(nn.Conv2d):
    """A ``channels -> channels`` convolution used as the downsampling layer (k3 s2 p1 default)."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 2, padding: int | None = None,
                 bias: bool = True) -> None:
        padding = (kernel_size - 1) // 2 if padding is None else padding
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, bias=bias)

    def rf_rule(self) -> RFRule:
        return RFRule.make(self.kernel_size, self.stride, self.padding, self.dilation)


class DilatedConv2d(nn.Conv2d):
    """A ``channels -> channels`` dilated convolution, k3 d2 p2 s1 (no downsampling)."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 2,
                 padding: int | None = None, bias: bool = True) -> None:
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        super().__init__(channels, channels, kernel_size, stride=1, padding=padding,
                         dilation=dilation, bias=bias)

    def rf_rule(self) -> RFRule:
        return RFRule.make(self.kernel_size, self.stride, self.padding, self.dilation)


@register("strided", kind="learnable", locality="local", rf="k3 s2 p1",
          paper="Springenberg et al., The All Convolutional Net, 2015. https://arxiv.org/abs/1412.6806")
def _make_strided(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Strided convolution k3 s2 p1 in place of pooling."""
    return StridedConv2d(channels, stride=stride, **kw)


@register("dilated", kind="learnable", locality="local", rf="k3 d2 p2 s1 (k_eff 5)", downsampling=False,
          paper="Yu & Koltun, Dilated Convolutions, ICLR 2016. https://arxiv.org/abs/1511.07122")
def _make_dilated(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Dilated convolution k3 d2 p2, stride 1 (no downsampling; ``stride`` is ignored)."""
    return DilatedConv2d(channels, **kw)
