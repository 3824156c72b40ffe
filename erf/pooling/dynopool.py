"""DynOPool: dynamically optimized pooling with a learnable output scale and query offsets.

Jang, Lee & Kim, "Pooling Revisited: Your Receptive Field is Suboptimal", CVPR 2022.
https://arxiv.org/abs/2205.15254 (no official code: constants below are this library's choice).

Definition used here (per spatial axis, input pixel centres at 0 .. H-1):
- learnable ``alpha = 1/r`` (the paper's reparameterisation), initial ``stride``;
- output size ``H_out = floor(H / alpha + 1/2)`` (the paper's rounding, half up: 5, 7, 9 -> 3, 4, 5
  at alpha 2, where ``torch.round``'s half-to-even gave 2, 4, 4) with a straight-through estimator
  ``H_out + H/alpha - sg(H/alpha)`` so ``alpha`` gets a gradient;
- cell centres ``p_i = (i + 1/2) H / H_out - 1/2``; learnable offset ``delta`` (in input pixels),
  initial ``alpha / 4 = 1/(4r)``;
- four bilinear queries ``(p_h +- delta_h, p_w +- delta_w)``, coordinates clamped to the input
  (border mode), and their max. Bilinear sampling is separable here (two gathers instead of
  ``F.grid_sample``): exact at integer coordinates, so r = 1/2 on an even input is exactly
  2x2 stride-2 max pooling and the gradient never leaks to a neighbour with weight 1e-7.
- the GMACs term: :meth:`DynOPool2d.size_ratio` and :func:`dynopool_size_loss`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..rfrule import RFRule
from ._registry import register
from ._utils import pair


def _bilinear_axis(x: torch.Tensor, q: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at float coordinates ``q`` (clamped)."""
    n = x.shape[dim]
    if n == 1:
        return x.index_select(dim, torch.zeros(q.numel(), dtype=torch.long, device=x.device))
    qc = q.clamp(0, n - 1)
    i0 = qc.detach().floor().long().clamp(max=n - 2)
    f = (qc - i0.to(qc.dtype)).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    f = f.reshape(shape)
    return x.index_select(dim, i0) * (1 - f) + x.index_select(dim, i0 + 1) * f


def _round_half_up(v: torch.Tensor) -> torch.Tensor:
    """``floor(v + 1/2)``: rounding as the paper writes it (``torch.round`` rounds half to even)."""
    return torch.floor(v + 0.5)


class DynOPool2d(nn.Module):
    """DynOPool: ``y_ij = max`` of 4 bilinear samples at ``(p_i +- delta_h, p_j +- delta_w)``.

    Args:
        stride: initial ``1/r`` per axis (2 halves the input).
        delta: initial query offset in input pixels (default ``stride / 4``).
        learnable: learn ``alpha = 1/r`` and ``delta``.
    Jang et al. 2022, https://arxiv.org/abs/2205.15254
    """

    #: the engine keeps nets holding this module in contiguous memory: channels_last ran its
    #: pooling_net at 0.82x the speed (2 CPU cores, 16 inputs of 3x128x128)
    prefers_contiguous = True

    def __init__(self, stride=2.0, delta=None, learnable: bool = True) -> None:
        super().__init__()
        alpha = torch.tensor([float(v) for v in pair(stride)])
        if (alpha <= 0).any():
            raise ValueError(f"stride must be positive, got {stride!r}")
        d = alpha / 4 if delta is None else torch.tensor([float(v) for v in pair(delta)])
        self.register_buffer("alpha0", alpha.clone(), persistent=False)
        if learnable:
            self.alpha = nn.Parameter(alpha)
            self.delta = nn.Parameter(d)
        else:
            self.register_buffer("alpha", alpha)
            self.register_buffer("delta", d)
        self.last_input_size: tuple[int, int] | None = None

    def _out_size(self, in_size: int, axis: int) -> torch.Tensor:
        """Straight-through output size: value ``floor(H / alpha + 1/2)`` (>= 1), gradient of ``H / alpha``."""
        cont = in_size / self.alpha[axis]
        return cont + (_round_half_up(cont.detach()).clamp_min(1) - cont).detach()

    def _queries(self, in_size: int, axis: int, dtype: torch.dtype) -> torch.Tensor:
        """Query coordinates ``(H_out, 2)``: ``p_i - delta``, ``p_i + delta``."""
        size = self._out_size(in_size, axis).to(dtype)
        n_out = int(size.detach().round())
        i = torch.arange(n_out, dtype=dtype, device=size.device)
        p = (i + 0.5) * (in_size / size) - 0.5
        d = self.delta[axis].to(dtype)
        return torch.stack([p - d, p + d], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        self.last_input_size = (h, w)
        qr = self._queries(h, 0, x.dtype).to(x.device)
        qc = self._queries(w, 1, x.dtype).to(x.device)
        s = _bilinear_axis(_bilinear_axis(x, qr.reshape(-1), -2), qc.reshape(-1), -1)
        return torch.nn.functional.max_pool2d(s, 2, 2)

    def size_ratio(self, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(H_out W_out) / (H_out^0 W_out^0)``: output area now over the area at initialisation.

        Differentiable in ``alpha`` (straight-through); uses the last forward's input size.
        """
        size = input_size or self.last_input_size
        if size is None:
            raise ValueError("size_ratio needs input_size or a previous forward pass")
        now = self._out_size(size[0], 0) * self._out_size(size[1], 1)
        init = [max(1.0, math.floor(size[a] / float(self.alpha0[a]) + 0.5)) for a in (0, 1)]
        return now / (init[0] * init[1])

    def rf_rule(self) -> RFRule:
        a = [float(v) for v in self.alpha.detach()]
        d = [float(v) for v in self.delta.detach()]
        k = tuple(int(math.ceil(2 * v - 1e-9)) + 1 for v in d)
        p = tuple(v + 0.5 - s / 2 for v, s in zip(d, a))
        return RFRule.make(k, tuple(a), p, note="learned scale; exact spans via rf_input_span")

    @torch.no_grad()
    def rf_input_span(self, axis: int, lo: int, hi: int, in_size: int, out_size: int) -> tuple[int, int]:
        """Exact inclusive input range of outputs ``lo..hi`` on ``axis`` (float32 queries)."""
        q = self._queries(in_size, axis, torch.float32).clamp(0, in_size - 1)
        return int(q[lo, 0].floor()), int(q[hi, 1].ceil())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.tolist()}, delta={self.delta.tolist()}"


def dynopool_size_loss(model: nn.Module, gmacs=None) -> torch.Tensor:
    """The GMACs loss ``sum_l size_ratio_l * GMACs[l]`` over the model's :class:`DynOPool2d` layers.

    Args:
        model: a network that ran a forward pass.
        gmacs: one cost per DynOPool layer (module order), or ``None`` for 1 each.
    Returns:
        a scalar tensor (0 when the model has no DynOPool layer).
    """
    layers = [m for m in model.modules() if isinstance(m, DynOPool2d)]
    costs = [1.0] * len(layers) if gmacs is None else list(gmacs)
    if len(costs) != len(layers):
        raise ValueError(f"gmacs has {len(costs)} entries for {len(layers)} DynOPool layers")
    total = torch.zeros(())
    for m, c in zip(layers, costs):
        total = total + m.size_ratio() * c
    return total


@register("dynopool", kind="learnable", locality="local", rf="k2 s2 at init (r=1/2, delta=1/2)",
          paper="Jang et al., Pooling Revisited (DynOPool), CVPR 2022. https://arxiv.org/abs/2205.15254")
def _make_dynopool(channels: int, stride: int = 2, **kw) -> nn.Module:
    """DynOPool: learned output scale r=1/2 and offset delta=1/(4r); max of 4 bilinear queries."""
    return DynOPool2d(stride=stride, **kw)
