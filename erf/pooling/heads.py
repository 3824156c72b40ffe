"""Global and size-keeping heads: global average pooling, SPP and YOLO-style SPP.

- Lin, Chen & Yan, "Network In Network", ICLR 2014 (global average pooling).
  https://arxiv.org/abs/1312.4400
- He, Zhang, Ren & Sun, "Spatial Pyramid Pooling in Deep Convolutional Networks for Visual
  Recognition", ECCV 2014. https://arxiv.org/abs/1406.4729
- YOLO-style SPP: Redmon & Farhadi, "YOLOv3", 2018 (https://arxiv.org/abs/1804.02767), the
  ``SPP`` block of ultralytics YOLOv5 (https://github.com/ultralytics/yolov5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rfrule import RFRule
from ._registry import register


class GlobalAvgPool2d(nn.Module):
    """``y_c = mean_{h,w} x_{c,h,w}``; output ``(N, C, 1, 1)``, or ``(N, C)`` with ``flatten``."""

    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(-2, -1), keepdim=not self.flatten)
        return y

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="global average")


def spp2d(x: torch.Tensor, levels=(4, 2, 1)) -> torch.Tensor:
    """Spatial pyramid pooling: ``cat_n flatten(adaptive_max_pool(x, n))`` over the levels.

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C * sum(n^2)].
    """
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in levels], 1)


class SPP2d(nn.Module):
    """See :func:`spp2d` (levels 4, 2, 1 by default)."""

    def __init__(self, levels=(4, 2, 1)) -> None:
        super().__init__()
        if not levels or any((not isinstance(n, int)) or n < 1 for n in levels):
            raise ValueError(f"levels must be positive ints, got {levels!r}")
        self.levels = tuple(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spp2d(x, self.levels)

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="pyramid bins; the 1x1 level is global")


class YoloSPP2d(nn.Module):
    """YOLO SPP: ``cv2(cat[z, max_5(z), max_9(z), max_13(z)])``, ``z = cv1(x)``; size kept.

    ``cv1``: 1x1 conv ``C -> C/2`` + SiLU; max pools stride 1, padding k//2; ``cv2``: 1x1 conv
    ``4 C/2 -> C`` + SiLU. Local: the field grows by the largest kernel - 1.
    """

    def __init__(self, channels: int, kernels=(5, 9, 13)) -> None:
        super().__init__()
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be odd, got {kernels!r}")
        hidden = max(1, channels // 2)
        self.kernels = tuple(kernels)
        self.cv1 = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.SiLU())
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in self.kernels)
        self.cv2 = nn.Sequential(nn.Conv2d(hidden * (len(self.kernels) + 1), channels, 1), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.cv1(x)
        return self.cv2(torch.cat([z] + [p(z) for p in self.pools], 1))

    def rf_rule(self) -> RFRule:
        k = max(self.kernels)
        return RFRule.make(k, 1, k // 2)


@register("gap", kind="fixed", locality="global", rf="global", downsampling=False, head=True,
          paper="Lin et al., Network In Network, ICLR 2014. https://arxiv.org/abs/1312.4400")
def _make_gap(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Global average pooling to (N, C, 1, 1)."""
    return GlobalAvgPool2d(**kw)


@register("spp", kind="data-dependent", locality="global", rf="global (bins 4, 2, 1)",
          downsampling=False, head=True,
          paper="He et al., Spatial Pyramid Pooling, ECCV 2014. https://arxiv.org/abs/1406.4729")
def _make_spp(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Spatial pyramid pooling: max into 4x4, 2x2, 1x1 bins, concatenated (N, 21 C)."""
    return SPP2d(**kw)


@register("yolo_spp", kind="learnable", locality="local", rf="k13 s1 p6", downsampling=False,
          head=True, paper="Redmon & Farhadi, YOLOv3, 2018 (ultralytics SPP). https://arxiv.org/abs/1804.02767")
def _make_yolo_spp(channels: int, stride: int = 2, **kw) -> nn.Module:
    """YOLO SPP: 1x1 conv, concat with stride-1 max pools 5, 9, 13, 1x1 conv; size kept."""
    return YoloSPP2d(channels, **kw)
