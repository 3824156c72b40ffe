"""Detail-preserving pooling (DPP).

Saeedan, Weber, Goesele & Roth, "Detail-Preserving Pooling in Deep Networks", CVPR 2018.
https://arxiv.org/abs/1804.04076 (reference code: https://github.com/visinf/dpp)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rfrule import RFRule
from ._registry import register

_VARIANTS = ("lite", "full")


def _up(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.repeat_interleave(s, -2).repeat_interleave(s, -1)


class DPPool2d(nn.Module):
    """Detail-preserving pooling: an inverse-bilateral weighted average over ``s x s`` windows.

    ``I~ = up(avg_s(I))`` (lite) or ``up(dwconv3x3_s(I))`` (full, learned, binomial init);
    ``x = (I - I~)^2 + 1e-3`` (asymmetric: ``relu(I - I~)^2 + 1e-3``); ``x /= up(avg_s(x))``;
    ``w = x^(lambda/2) + alpha``; ``y = avg_s(I w) / avg_s(w)``, with ``alpha = exp(a)``,
    ``lambda = exp(l)`` learned per channel (a = l = 0 at init). Odd trailing rows/cols are
    dropped, as by ``avg_pool2d``. https://arxiv.org/abs/1804.04076
    """

    def __init__(self, channels: int, stride: int = 2, variant: str = "lite",
                 symmetric: bool = True, eps: float = 1e-3) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.channels, self.stride, self.variant, self.symmetric, self.eps = (
            channels, stride, variant, symmetric, eps)
        self.log_alpha = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_lambda = nn.Parameter(torch.zeros(1, channels, 1, 1))
        if variant == "full":
            self.weight = nn.Parameter(torch.empty(channels, 1, 3, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_alpha.zero_()
            self.log_lambda.zero_()
            if self.variant == "full":
                b = torch.tensor([1.0, 2.0, 1.0])
                self.weight.copy_((torch.outer(b, b) / 16).expand_as(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        h, w = (x.shape[-2] // s) * s, (x.shape[-1] // s) * s
        x = x[..., :h, :w]
        if self.variant == "lite":
            smooth = F.avg_pool2d(x, s)
        else:
            smooth = F.conv2d(x, self.weight.to(x.dtype), stride=s, padding=1, groups=self.channels)
        d = x - _up(smooth, s)
        if not self.symmetric:
            d = F.relu(d)
        q = d * d + self.eps
        q = q / _up(F.avg_pool2d(q, s), s)
        wgt = q ** (torch.exp(self.log_lambda) / 2) + torch.exp(self.log_alpha)
        return F.avg_pool2d(x * wgt, s) / F.avg_pool2d(wgt, s)

    def rf_rule(self) -> RFRule:
        if self.variant == "lite":
            return RFRule.make(self.stride, self.stride, 0)
        return RFRule.make(max(3, self.stride + 1), self.stride, 1)

    def extra_repr(self) -> str:
        return (f"{self.channels}, stride={self.stride}, variant={self.variant!r}, "
                f"symmetric={self.symmetric}")


@register("dpp", kind="learnable", locality="local", rf="k2 s2 (lite); full k3 s2 p1",
          paper="Saeedan et al., Detail-Preserving Pooling, CVPR 2018. https://arxiv.org/abs/1804.04076")
def _make_dpp(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Detail-preserving pooling (lite, symmetric, 2x2 s2): inverse-bilateral weighted average."""
    return DPPool2d(channels, stride=stride, **kw)
