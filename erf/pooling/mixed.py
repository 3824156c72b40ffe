"""Mixed, gated and tree pooling: combinations of max and average (or learned) pooling.

- Yu, Wang, Chen & Wei, "Mixed Pooling for Convolutional Neural Networks", RSKT 2014.
  https://doi.org/10.1007/978-3-319-11740-9_34
- Lee, Gallagher & Tu, "Generalizing Pooling Functions in Convolutional Neural Networks:
  Mixed, Gated, and Tree", AISTATS 2016. https://arxiv.org/abs/1509.08985
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _rng
from ._registry import register
from ._utils import WindowPool2d, pair


def _max_avg(x, kernel_size, stride, padding):
    mx = F.max_pool2d(x, kernel_size, stride, padding)
    av = F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)
    return mx, av


def _shared_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """``weight (K, 1, kh, kw)`` applied to every channel: ``(N, C, H, W) -> (N, C, K, H', W')``."""
    n, c, h, w = x.shape
    y = F.conv2d(x.reshape(n * c, 1, h, w), weight, stride=stride, padding=padding)
    return y.reshape(n, c, weight.shape[0], *y.shape[-2:])


class MixedPool2d(WindowPool2d):
    """Mixed pooling: ``y = lam max_R x + (1 - lam) mean_R x``.

    Train: ``lam`` in {0, 1} drawn per (sample, channel) with probability ``p_max`` of max, from
    :func:`erf._rng.rand`. Eval: the fixed mix ``lam = p_max`` (0.5 by default, the expected
    value of the training choice, i.e. ``maxavg``). Yu et al. 2014,
    https://doi.org/10.1007/978-3-319-11740-9_34
    """

    def __init__(self, kernel_size=2, stride=None, padding=0, p_max: float = 0.5) -> None:
        super().__init__(kernel_size, stride, padding)
        if not 0.0 <= p_max <= 1.0:
            raise ValueError(f"p_max must be in [0, 1], got {p_max}")
        self.p_max = p_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx, av = _max_avg(x, self.kernel_size, self.stride, self.padding)
        if self.training:
            lam = (_rng.rand(x.shape[0], x.shape[1], 1, 1, device=x.device, dtype=x.dtype, batch=True)
                   < self.p_max).to(x.dtype)
        else:
            lam = self.p_max
        return lam * mx + (1 - lam) * av

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p_max={self.p_max}"


class GatedPool2d(WindowPool2d):
    """Gated pooling: ``g = sigmoid(w . x_R)``, ``y = g max_R x + (1 - g) mean_R x``.

    One gating mask ``w`` of ``k x k`` per layer, shared across channels (Lee et al. 2016,
    "responsive" gating; https://arxiv.org/abs/1509.08985). ``w`` starts U(-1/k, 1/k).
    """

    def __init__(self, kernel_size=2, stride=None, padding=0) -> None:
        super().__init__(kernel_size, stride, padding)
        self.weight = nn.Parameter(torch.empty(1, 1, *pair(kernel_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.numel())
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx, av = _max_avg(x, self.kernel_size, self.stride, self.padding)
        g = torch.sigmoid(_shared_conv(x, self.weight, self.stride, self.padding)[:, :, 0])
        return g * mx + (1 - g) * av


class TreePool2d(WindowPool2d):
    """Tree pooling (depth 2): ``g = sigmoid(w . x_R)``, ``y = g v1 . x_R + (1 - g) v2 . x_R``.

    Leaf filters ``v1, v2`` and gate ``w`` (each ``k x k``) learned, shared across channels
    (Lee et al. 2016, https://arxiv.org/abs/1509.08985). Leaves start near the average filter,
    ``1/k^2 (1 + U(-1/2, 1/2))``; the gate U(-1/k, 1/k).
    """

    #: the engine keeps nets holding this module in contiguous memory: channels_last ran its
    #: pooling_net at 0.80x the speed (2 CPU cores, 16 inputs of 3x128x128)
    prefers_contiguous = True

    def __init__(self, kernel_size=2, stride=None, padding=0) -> None:
        super().__init__(kernel_size, stride, padding)
        # rows: v1, v2, w
        self.weight = nn.Parameter(torch.empty(3, 1, *pair(kernel_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kk = self.weight[0].numel()
        with torch.no_grad():
            self.weight[:2].uniform_(0.5 / kk, 1.5 / kk)
            self.weight[2].uniform_(-1 / math.sqrt(kk), 1 / math.sqrt(kk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _shared_conv(x, self.weight, self.stride, self.padding)
        g = torch.sigmoid(y[:, :, 2])
        return g * y[:, :, 0] + (1 - g) * y[:, :, 1]


_YU = ("Yu et al., Mixed Pooling for Convolutional Neural Networks, RSKT 2014. "
       "https://doi.org/10.1007/978-3-319-11740-9_34")
_LEE = ("Lee, Gallagher & Tu, Generalizing Pooling Functions in CNNs: Mixed, Gated, and Tree, "
        "AISTATS 2016. https://arxiv.org/abs/1509.08985")


@register("mixed", kind="stochastic", locality="local", paper=_YU, rf="k2 s2")
def _make_mixed(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Mixed pooling: random max or avg per channel in training, 0.5 max + 0.5 avg at eval."""
    kw.setdefault("kernel_size", 2)
    return MixedPool2d(stride=stride, **kw)


@register("gated", kind="learnable", locality="local", paper=_LEE, rf="k2 s2")
def _make_gated(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Gated pooling: sigmoid(w . x) max + (1 - sigmoid(w . x)) avg, w learned."""
    kw.setdefault("kernel_size", 2)
    return GatedPool2d(stride=stride, **kw)


@register("tree", kind="learnable", locality="local", paper=_LEE, rf="k2 s2")
def _make_tree(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Tree pooling: two learned pooling filters mixed by a learned sigmoid gate."""
    kw.setdefault("kernel_size", 2)
    return TreePool2d(stride=stride, **kw)
