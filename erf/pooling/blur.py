"""Anti-aliased (blur) pooling.

Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019.
https://arxiv.org/abs/1904.11486 (reference code: https://github.com/adobe/antialiased-cnns)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..rfrule import RFRule
from ._registry import register


def binomial_filter(size: int) -> torch.Tensor:
    """Normalised 2-D binomial filter: row ``C(size-1, i)`` outer itself / ``4^(size-1)``."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    return torch.outer(row, row) / row.sum() ** 2


def blur_pool2d(x: torch.Tensor, filt_size: int = 4, stride: int = 2,
                pad_mode: str = "reflect") -> torch.Tensor:
    """Depthwise binomial blur then subsampling: ``y = (B * pad(x))[s i, s j]``.

    Padding ``(filt_size-1)//2`` before and ``ceil((filt_size-1)/2)`` after (reflect by
    default), as the reference code; output ``ceil(H / stride)``.

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C, ceil(H/s), ceil(W/s)].
    """
    a, b = (filt_size - 1) // 2, math.ceil((filt_size - 1) / 2)
    c = x.shape[1]
    if a or b:
        x = F.pad(x, (a, b, a, b), mode=pad_mode)
    k = binomial_filter(filt_size).to(x.dtype).to(x.device).expand(c, 1, filt_size, filt_size)
    return F.conv2d(x, k, stride=stride, groups=c)


def _padded_span(first: int, last: int, n: int, mode: str) -> tuple[int, int]:
    """The input indices that padded positions ``first..last`` (input coordinates) read, as a range."""
    idx = range(first, last + 1)
    if mode == "reflect" and n > 1:
        period = 2 * (n - 1)
        mapped = [abs(((i % period) + period) % period) for i in idx]
        mapped = [m if m < n else period - m for m in mapped]
    elif mode == "replicate":
        mapped = [min(max(i, 0), n - 1) for i in idx]
    elif mode == "circular":
        mapped = [i % n for i in idx]
    else:  # zeros: positions outside the input read nothing (reported as the plain window)
        return first, last
    return min(mapped), max(mapped)


class BlurPool2d(nn.Module):
    """See :func:`blur_pool2d`."""

    def __init__(self, channels: int | None = None, filt_size: int = 4, stride: int = 2,
                 pad_mode: str = "reflect") -> None:
        super().__init__()
        if not isinstance(filt_size, int) or filt_size < 1:
            raise ValueError(f"filt_size must be a positive int, got {filt_size!r}")
        self.channels, self.filt_size, self.stride, self.pad_mode = channels, filt_size, stride, pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur_pool2d(x, self.filt_size, self.stride, self.pad_mode)

    def rf_rule(self) -> RFRule:
        return RFRule.make(self.filt_size, self.stride, (self.filt_size - 1) // 2,
                           note=f"{self.pad_mode} padding: exact spans via rf_input_span")

    def rf_input_span(self, axis: int, lo: int, hi: int, in_size: int, out_size: int) -> tuple[int, int]:
        """Exact inclusive input range of outputs ``lo..hi``: the padded taps mapped back into the input
        (reflect padding at the end reaches ``2(n-1) - i``, inside the rule's window's left edge for
        odd sizes, so the plain rule missed a pixel of the border units)."""
        return _padded_span(lo * self.stride - (self.filt_size - 1) // 2,
                            hi * self.stride - (self.filt_size - 1) // 2 + self.filt_size - 1, in_size, self.pad_mode)

    def extra_repr(self) -> str:
        return f"filt_size={self.filt_size}, stride={self.stride}, pad_mode={self.pad_mode!r}"


class MaxBlurPool2d(nn.Module):
    """MaxBlurPool: ``max_pool(k, s=1)`` then :func:`blur_pool2d` (Zhang 2019)."""

    def __init__(self, channels: int | None = None, kernel_size: int = 2, filt_size: int = 4,
                 stride: int = 2, pad_mode: str = "reflect") -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.max = nn.MaxPool2d(kernel_size, 1)
        self.blur = BlurPool2d(channels, filt_size, stride, pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blur(self.max(x))

    def rf_rule(self) -> RFRule:
        b = self.blur
        return RFRule.make(b.filt_size + self.kernel_size - 1, b.stride, (b.filt_size - 1) // 2,
                           note=f"{b.pad_mode} padding: exact spans via rf_input_span")

    def rf_input_span(self, axis: int, lo: int, hi: int, in_size: int, out_size: int) -> tuple[int, int]:
        """Exact inclusive input range: the blur's span on the max map (``n - k + 1`` long), widened by ``k - 1``."""
        mid = in_size - self.kernel_size + 1
        first, last = self.blur.rf_input_span(axis, lo, hi, mid, out_size)
        return first, last + self.kernel_size - 1


_ZHANG = ("Zhang, Making Convolutional Networks Shift-Invariant Again, ICML 2019. "
          "https://arxiv.org/abs/1904.11486")


@register("blur", kind="fixed", locality="local", paper=_ZHANG, rf="k4 s2 p1")
def _make_blur(channels: int, stride: int = 2, **kw) -> nn.Module:
    """BlurPool: binomial 4x4 blur, reflect padding, stride 2."""
    return BlurPool2d(channels, stride=stride, **kw)


@register("maxblur", kind="data-dependent", locality="local", paper=_ZHANG, rf="k5 s2 p1")
def _make_maxblur(channels: int, stride: int = 2, **kw) -> nn.Module:
    """MaxBlurPool: max k2 s1, then binomial 4x4 blur with stride 2."""
    return MaxBlurPool2d(channels, stride=stride, **kw)
