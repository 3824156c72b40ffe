"""Power-mean pooling: Lp pooling and generalized-mean (GeM) pooling.

- Lp: Sermanet, Chintala & LeCun, "Convolutional Neural Networks Applied to House Numbers Digit
  Classification", ICPR 2012. https://arxiv.org/abs/1204.3968 (on ``abs(x)``: torch's
  ``LPPool2d`` raises ``x`` itself to ``p`` and is NaN on signed input for odd/fractional ``p``).
- GeM: Radenovic, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation",
  TPAMI 2018. https://arxiv.org/abs/1711.02512
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register
from ._utils import WindowPool2d


def lp_pool2d(x: torch.Tensor, p: float = 2.0, kernel_size=2, stride=None, padding=0) -> torch.Tensor:
    """``y = (sum_R |x|^p)^(1/p)`` (``p = 1``: sum pooling; ``p -> inf``: max of ``|x|``).

    Computed as ``m (sum_R (|x|/m)^p)^(1/p)`` with ``m`` the per-map max of ``|x|`` (held
    constant; exact by homogeneity), so large ``p`` or large inputs do not overflow.

    Args:
        x (Tensor[N, C, H, W]): input.
        p: the power, > 0.
    Returns:
        Tensor[N, C, H', W'].
    """
    stride = kernel_size if stride is None else stride
    a = x.abs()
    tiny = torch.finfo(x.dtype).tiny
    m = a.detach().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    t = a / m
    # |x|^p has an infinite slope at 0 for p < 1: pow's gradient there (inf) times abs's (0) was NaN
    # on post-ReLU zeros; the subgradient 0 is taken instead (the power is only evaluated where t > 0)
    tp = torch.where(t > 0, t.clamp_min(tiny) ** p, torch.zeros_like(t)) if p < 1 else t ** p
    s = F.avg_pool2d(tp, kernel_size, stride, padding, count_include_pad=True, divisor_override=1)
    return m * s.clamp_min(tiny) ** (1.0 / p)


class LpPool2d(WindowPool2d):
    """See :func:`lp_pool2d`."""

    def __init__(self, p: float = 2.0, kernel_size=2, stride=None, padding=0) -> None:
        if not isinstance(p, (int, float)) or p <= 0:
            raise ValueError(f"p must be a positive number, got {p!r}")
        super().__init__(kernel_size, stride, padding)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lp_pool2d(x, self.p, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"p={self.p}, {super().extra_repr()}"


def gem_pool2d(x: torch.Tensor, p: torch.Tensor | float = 3.0, kernel_size=2, stride=None,
               padding=0, eps: float = 1e-6) -> torch.Tensor:
    """``y = (mean_R clamp(x, eps)^p)^(1/p)`` (generalized mean; p=1 avg, p -> inf max).

    Args:
        x (Tensor[N, C, H, W]): input.
        p: power (a tensor for a learnable one).
    Returns:
        Tensor[N, C, H', W'].
    """
    stride = kernel_size if stride is None else stride
    y = F.avg_pool2d(x.clamp(min=eps) ** p, kernel_size, stride, padding, count_include_pad=False)
    return y ** (1.0 / p)


class GeMPool2d(WindowPool2d):
    """See :func:`gem_pool2d`; ``p`` is a learnable scalar (initial 3)."""

    def __init__(self, p: float = 3.0, kernel_size=2, stride=None, padding=0,
                 eps: float = 1e-6, learnable: bool = True) -> None:
        if not isinstance(p, (int, float)) or p <= 0:
            raise ValueError(f"p must be a positive number, got {p!r}")
        super().__init__(kernel_size, stride, padding)
        self.eps = eps
        pt = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(pt)
        else:
            self.register_buffer("p", pt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem_pool2d(x, self.p.to(x.dtype), self.kernel_size, self.stride, self.padding, self.eps)


@register("lp", kind="data-dependent", locality="local", rf="k2 s2",
          paper="Sermanet et al., ICPR 2012. https://arxiv.org/abs/1204.3968")
def _make_lp(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Lp pooling on abs(x), p=2: (sum |x|^p)^(1/p)."""
    kw.setdefault("kernel_size", 2)
    return LpPool2d(stride=stride, **kw)


@register("gem", kind="learnable", locality="local", rf="k2 s2",
          paper="Radenovic et al., TPAMI 2018. https://arxiv.org/abs/1711.02512")
def _make_gem(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Generalized-mean pooling, learnable p=3: (mean clamp(x)^p)^(1/p)."""
    kw.setdefault("kernel_size", 2)
    return GeMPool2d(stride=stride, **kw)
