"""The receptive-field rule a layer declares to the TRF analyser.

Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural
Networks", Distill 2019. https://distill.pub/2019/computing-receptive-fields/

For a local operator with kernel k, dilation d, stride s and padding p on one axis,
output index u sees input indices ``u*s - p`` through ``u*s - p + d*(k-1)``; composed over
layers: r_out = r_in + (k_eff - 1) j_in, j_out = s j_in, P_out = P_in + p j_in.

Any module (in particular every module of :mod:`erf.pooling`) may declare its rule by
defining ``rf_rule(self) -> RFRule``. Modules whose windows are irregular (fractional
max pooling, DynOPool, S3) additionally define
``rf_input_span(self, axis, lo, hi, in_size, out_size) -> (first, last)``: the inclusive
input index range seen by output indices ``lo..hi`` on spatial ``axis`` (0-based among the
spatial axes). The TRF analyser treats a module with ``rf_rule`` as a leaf.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def _tuple(value: int | float | Sequence[int | float], ndim: int) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"expected {ndim} values, got {value}")
    return value


@dataclass(frozen=True)
class RFRule:
    """Per-axis receptive-field arithmetic of one layer.

    Attributes:
        kernel: taps per axis (before dilation).
        stride: stride per axis; may be fractional (fractional pooling, DynOPool).
        padding: leading padding per axis (input index of tap 0 of output 0 is ``-padding``).
        dilation: dilation per axis; ``k_eff = dilation * (kernel - 1) + 1``.
        is_global: the output at one position depends on the whole input (global
            pooling, spectral pooling, InstanceNorm-based gates, attention).
        local: for a global layer, the rule when its global statistics are held constant.
        note: free text shown in tables (e.g. "logit branch 5x5").
    """

    kernel: tuple[int, ...]
    stride: tuple[float, ...]
    padding: tuple[float, ...]
    dilation: tuple[int, ...] = field(default=())
    is_global: bool = False
    local: "RFRule | None" = None
    note: str = ""

    def __post_init__(self) -> None:
        if not self.dilation:
            object.__setattr__(self, "dilation", (1,) * len(self.kernel))

    @classmethod
    def make(cls, kernel, stride=1, padding=0, dilation=1, ndim: int = 2, **kw) -> "RFRule":
        """Build a rule from scalars or per-axis sequences (torch-style arguments)."""
        return cls(_tuple(kernel, ndim), _tuple(stride, ndim), _tuple(padding, ndim),
                   _tuple(dilation, ndim), **kw)

    @classmethod
    def identity(cls, ndim: int = 2) -> "RFRule":
        """The rule of a pointwise layer (activation, 1x1 conv, BatchNorm)."""
        return cls.make(1, 1, 0, 1, ndim)

    @classmethod
    def global_(cls, ndim: int = 2, local: "RFRule | None" = None, note: str = "") -> "RFRule":
        """The rule of a layer whose every output sees the whole input."""
        return cls.make(1, 1, 0, 1, ndim, is_global=True, local=local, note=note)

    @property
    def ndim(self) -> int:
        """Number of spatial axes the rule covers."""
        return len(self.kernel)

    @property
    def kernel_eff(self) -> tuple[int, ...]:
        """Effective kernel ``d (k - 1) + 1`` per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    def input_span(self, axis: int, lo: int, hi: int) -> tuple[float, float]:
        """Inclusive input range seen by output indices ``lo..hi`` on ``axis``."""
        s, p = self.stride[axis], self.padding[axis]
        return lo * s - p, hi * s - p + self.kernel_eff[axis] - 1
