"""Box-based heads: RoI Pool and RoI Align (torchvision.ops, the ``vision`` extra).

- Girshick, "Fast R-CNN", ICCV 2015. https://arxiv.org/abs/1504.08083
- He, Gkioxari, Dollar & Girshick, "Mask R-CNN", ICCV 2017. https://arxiv.org/abs/1703.06870

Without boxes, each image contributes one box covering the whole feature map.
"""
from __future__ import annotations

import torch
from torch import nn

from ..rfrule import RFRule
from ._registry import register


def _ops():
    try:
        import torchvision.ops as ops
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("RoI pooling needs torchvision: pip install erf-toolkit[vision]") from exc
    return ops


def _whole_boxes(x: torch.Tensor, inclusive: bool) -> torch.Tensor:
    n, _, h, w = x.shape
    x2, y2 = (w - 1, h - 1) if inclusive else (w, h)
    idx = torch.arange(n, dtype=x.dtype, device=x.device).unsqueeze(1)
    box = torch.tensor([0.0, 0.0, x2, y2], dtype=x.dtype, device=x.device).expand(n, 4)
    return torch.cat([idx, box], 1)


def _low_precision_safe(op, x, boxes, *args):
    """Run ``op`` in float32 for bfloat16/float16 inputs on CPU (no kernels there)."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        if isinstance(boxes, torch.Tensor):
            boxes = boxes.float()
        else:
            boxes = [b.float() for b in boxes]
        return op(x.float(), boxes, *args).to(x.dtype)
    return op(x, boxes, *args)


class RoIPool2d(nn.Module):
    """RoI max pooling (``torchvision.ops.roi_pool``): max into ``output_size`` bins of each box.

    ``forward(x, boxes=None)``; boxes ``Tensor[K, 5]`` (batch index, x1, y1, x2, y2) or a list
    of ``Tensor[L, 4]``; returns ``Tensor[K, C, h, w]``. Raises ImportError without torchvision.
    """

    def __init__(self, output_size=7, spatial_scale: float = 1.0) -> None:
        super().__init__()
        self._op = _ops().roi_pool
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, x: torch.Tensor, boxes=None) -> torch.Tensor:
        if boxes is None:
            boxes = _whole_boxes(x, inclusive=True)
        return _low_precision_safe(self._op, x, boxes, self.output_size, self.spatial_scale)

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="box-based: the unit's field is its box (default whole map)")


class RoIAlign2d(nn.Module):
    """RoI Align (``torchvision.ops.roi_align``, ``aligned=True``): bilinear bin averages per box.

    Same calling convention as :class:`RoIPool2d`.
    """

    def __init__(self, output_size=7, spatial_scale: float = 1.0, sampling_ratio: int = 2,
                 aligned: bool = True) -> None:
        super().__init__()
        self._op = _ops().roi_align
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, x: torch.Tensor, boxes=None) -> torch.Tensor:
        if boxes is None:
            boxes = _whole_boxes(x, inclusive=not self.aligned)
        return _low_precision_safe(self._op, x, boxes, self.output_size, self.spatial_scale,
                                   self.sampling_ratio, self.aligned)

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="box-based: the unit's field is its box (default whole map)")


@register("roi_pool", kind="data-dependent", locality="global", rf="its box", downsampling=False,
          head=True, paper="Girshick, Fast R-CNN, ICCV 2015. https://arxiv.org/abs/1504.08083")
def _make_roi_pool(channels: int, stride: int = 2, **kw) -> nn.Module:
    """RoI Pool (torchvision.ops): max into 7x7 bins of each box (needs the vision extra)."""
    return RoIPool2d(**kw)


@register("roi_align", kind="fixed", locality="global", rf="its box", downsampling=False,
          head=True, paper="He et al., Mask R-CNN, ICCV 2017. https://arxiv.org/abs/1703.06870")
def _make_roi_align(channels: int, stride: int = 2, **kw) -> nn.Module:
    """RoI Align (torchvision.ops): bilinear 7x7 bin averages of each box (needs the vision extra)."""
    return RoIAlign2d(**kw)
