"""Fractional max pooling.

Graham, "Fractional Max-Pooling", 2014. https://arxiv.org/abs/1412.6071

Wraps :func:`torch.nn.functional.fractional_max_pool2d` (pseudo-random overlapping windows).
Train: one sample ``u`` per (sample, channel, axis) from :func:`erf._rng.rand`. Eval: torch does
not switch, so this module uses the fixed midpoint sample ``u = 0.5`` on both axes (the buffer
``eval_samples``), making the windows deterministic and shared by every sample and channel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _rng
from ..rfrule import RFRule
from ._registry import register
from ._utils import check_positive, pair


def fractional_starts(u: float, in_size: int, out_size: int, kernel: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Window starts of torch's fractional max pooling on one axis (ATen ``generate_intervals``).

    ``alpha = (in - k) / (out - 1)``; ``start_i = int((i + u) alpha) - int(u alpha)`` for
    ``i < out - 1``, ``start_{out-1} = in - k``; computed in ``dtype`` as torch does.
    """
    starts = torch.empty(out_size, dtype=torch.long)
    if out_size > 1:
        alpha = torch.tensor(in_size - kernel, dtype=dtype) / torch.tensor(out_size - 1, dtype=dtype)
        uu = torch.tensor(u, dtype=dtype)
        i = torch.arange(out_size - 1, dtype=dtype)
        starts[:-1] = ((i + uu) * alpha).trunc().long() - (uu * alpha).trunc().long()
    starts[-1] = in_size - kernel
    return starts


class FractionalMaxPool2d(nn.Module):
    """Fractional max pooling: ``y_ij = max`` over the ``k x k`` window at pseudo-random starts.

    Output size ``int(H * output_ratio)`` per axis (or ``output_size``). ``_random_samples``
    (Tensor[N, C, 2] in [0, 1), column 0 for W and 1 for H, as torch) overrides the samples.
    Graham 2014, https://arxiv.org/abs/1412.6071. Needs ``H >= k + out - 1``.
    """

    #: the engine keeps nets holding this module in contiguous memory: channels_last ran its
    #: pooling_net at 0.90x the speed (2 CPU cores, 16 inputs of 3x128x128)
    prefers_contiguous = True

    def __init__(self, kernel_size=3, output_ratio=0.5, output_size=None,
                 eval_sample: float = 0.5) -> None:
        super().__init__()
        check_positive("kernel_size", kernel_size)
        if output_size is None:
            r = pair(output_ratio)
            if any(not (0 < v < 1) for v in r):
                raise ValueError(f"output_ratio must be in (0, 1), got {output_ratio!r}")
        self.kernel_size, self.output_ratio, self.output_size = kernel_size, output_ratio, output_size
        self.register_buffer("eval_samples", torch.tensor([eval_sample, eval_sample]), persistent=False)
        self._dtype = torch.float32

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        if self.output_size is not None:
            return pair(self.output_size)
        rh, rw = pair(self.output_ratio)
        return int(h * rh), int(w * rw)

    def forward(self, x: torch.Tensor, _random_samples: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        out = self._out_size(h, w)
        if _random_samples is None:
            if self.training:
                _random_samples = _rng.rand(n, c, 2, device=x.device, dtype=x.dtype, batch=True)
            else:
                _random_samples = self.eval_samples.to(x.device, x.dtype).expand(n, c, 2)
        self._dtype = x.dtype
        self._sizes = ((h, out[0]), (w, out[1]))
        return F.fractional_max_pool2d(x, self.kernel_size, output_size=out,
                                       _random_samples=_random_samples.to(x.dtype))

    def rf_rule(self) -> RFRule:
        if self.output_size is not None:  # the mean stride is in/out of the last forward
            sizes = getattr(self, "_sizes", None)
            if sizes is None:
                raise ValueError("FractionalMaxPool2d(output_size=...): the stride depends on the input size; "
                                 "run a forward pass first (the TRF analyser does)")
            stride = tuple(i / o for i, o in sizes)
        else:
            rh, rw = pair(self.output_ratio)
            stride = (1 / rh, 1 / rw)
        return RFRule.make(self.kernel_size, stride, 0, note="irregular windows: see rf_input_span")

    def rf_input_span(self, axis: int, lo: int, hi: int, in_size: int, out_size: int) -> tuple[int, int]:
        """Exact inclusive input range of output indices ``lo..hi`` on ``axis`` (eval samples)."""
        k = pair(self.kernel_size)[axis]
        u = float(self.eval_samples[1 - axis])  # torch: sample 0 drives W, sample 1 drives H
        starts = fractional_starts(u, in_size, out_size, k, self._dtype)
        return int(starts[lo]), int(starts[hi]) + k - 1

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, output_ratio={self.output_ratio}"


@register("fractional", kind="stochastic", locality="local", rf="k3, jump ~2 (irregular)",
          paper="Graham, Fractional Max-Pooling, 2014. https://arxiv.org/abs/1412.6071")
def _make_fractional(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Fractional max pooling, k3, output ratio 1/stride; random window starts in training."""
    kw.setdefault("kernel_size", 3)
    kw.setdefault("output_ratio", 1.0 / stride)
    return FractionalMaxPool2d(**kw)
