"""Local importance-based pooling (LIP).

Gao, Wang & Wu, "LIP: Local Importance-based Pooling", ICCV 2019.
https://arxiv.org/abs/1908.04156 (reference code: https://github.com/sebgao/LIP)
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..rfrule import RFRule
from ._registry import register
from ._utils import pair


def lip2d(x: torch.Tensor, logit: torch.Tensor, kernel_size=3, stride=2, padding=1) -> torch.Tensor:
    """``y = avg_pool(x e^logit) / avg_pool(e^logit)`` (zero padding cancels: valid pixels only).

    Args:
        x (Tensor[N, C, H, W]): input.
        logit (Tensor[N, C, H, W]): importance logits (bounded, e.g. in [0, 12]).
    Returns:
        Tensor[N, C, H', W'].
    """
    w = torch.exp(logit)
    return (F.avg_pool2d(x * w, kernel_size, stride, padding)
            / F.avg_pool2d(w, kernel_size, stride, padding))


class SoftGate(nn.Module):
    """``coeff * sigmoid(x)`` (coeff 12 as in the reference code)."""

    def __init__(self, coeff: float = 12.0) -> None:
        super().__init__()
        self.coeff = coeff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coeff * torch.sigmoid(x)


class ZeroInitConv2d(nn.Conv2d):
    """A ``Conv2d`` whose ``reset_parameters`` sets the weight (and bias) to zero."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LIP2d(nn.Module):
    """LIP: ``logit = 12 sigmoid(IN(conv3x3(x)))``, ``y = lip2d(x, logit, 3, 2, 1)``.

    The logit conv starts at zero, so the module starts as 3x3 s2 average pooling over the
    valid pixels. InstanceNorm makes every output depend on the whole map (global); with the IN
    statistics held the field is conv3x3 then k3 s2 p1, i.e. k5 s2 p2.
    Gao et al. 2019, https://arxiv.org/abs/1908.04156
    """

    def __init__(self, channels: int, kernel_size=3, stride=2, padding=1, coeff: float = 12.0) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.logit = nn.Sequential(OrderedDict([
            ("conv", ZeroInitConv2d(channels, channels, 3, padding=1, bias=False)),
            ("norm", nn.InstanceNorm2d(channels, affine=True)),
            ("gate", SoftGate(coeff)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lip2d(x, self.logit(x), self.kernel_size, self.stride, self.padding)

    def rf_rule(self) -> RFRule:
        k, p = pair(self.kernel_size), pair(self.padding)
        local = RFRule.make((k[0] + 2, k[1] + 2), self.stride, (p[0] + 1, p[1] + 1),
                            note="logit conv3x3 + pooling window")
        return RFRule.global_(local=local, note="InstanceNorm in the logit branch")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@register("lip", kind="learnable", locality="global", rf="k3 s2 p1 (+ logit conv: local k5 s2 p2); global (IN)",
          paper="Gao et al., LIP, ICCV 2019. https://arxiv.org/abs/1908.04156")
def _make_lip(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Local importance pooling: exp(12 sigmoid(IN(conv(x))))-weighted 3x3 average."""
    return LIP2d(channels, stride=stride, **kw)
