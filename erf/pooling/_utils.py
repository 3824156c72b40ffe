"""Small helpers shared by the pooling families (private)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..rfrule import RFRule


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``(v, v)`` for an int, the pair itself for a 2-sequence."""
    if isinstance(value, (int, float)):
        return (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"expected an int or 2 values, got {value}")
    return value


def check_positive(name: str, value) -> None:
    """``ValueError`` unless every entry of ``value`` is a positive number."""
    vals = pair(value)
    if any((not isinstance(v, (int, float))) or isinstance(v, bool) or v <= 0 for v in vals):
        raise ValueError(f"{name} must be positive, got {value!r}")


def check_4d(x: torch.Tensor, name: str = "input") -> None:
    """``ValueError`` unless ``x`` is a ``(N, C, H, W)`` tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, C, H, W), got {shape}")


def check_padding(padding, kernel_size) -> None:
    """``ValueError`` unless ``0 <= padding <= kernel_size / 2`` per axis (torch's rule for pooling):
    a larger padding gives windows that lie wholly in the padding (NaN / -inf outputs)."""
    pads, ks = pair(padding), pair(kernel_size)
    for p, k in zip(pads, ks):
        if isinstance(p, bool) or not isinstance(p, int) or p < 0 or 2 * p > k:
            raise ValueError(f"padding must be an int between 0 and kernel_size/2 = {k / 2:g} (windows wholly "
                             f"in the padding have no input), got padding={padding!r} for kernel_size={kernel_size!r}")


def windows(x: torch.Tensor, kernel_size, stride, padding=0, pad_value: float = 0.0) -> torch.Tensor:
    """Pooling windows of ``x`` as a ``(N, C, H_out, W_out, kh * kw)`` tensor (row-major taps).

    ``x`` is padded with ``pad_value`` (``nan`` / ``-inf`` mark positions outside the input).
    """
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    check_padding(padding, kernel_size)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
    u = x.unfold(2, kh, sh).unfold(3, kw, sw)
    return u.reshape(*u.shape[:4], kh * kw)


class WindowPool2d(nn.Module):
    """Base of the pooling modules that slide a ``kernel_size`` window with ``stride`` and ``padding``.

    Holds and checks the three torch-style arguments (``stride`` defaults to ``kernel_size``) and
    declares the receptive-field rule of such a window: ``RFRule.make(kernel_size, stride, padding)``.
    """

    def __init__(self, kernel_size=2, stride=None, padding=0) -> None:
        super().__init__()
        check_positive("kernel_size", kernel_size)
        check_padding(padding, kernel_size)
        self.kernel_size, self.padding = kernel_size, padding
        self.stride = kernel_size if stride is None else stride

    def rf_rule(self) -> RFRule:
        return RFRule.make(self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
