"""Output layouts of a target: ``nchw`` (channels first), ``nhwc`` (channels last), ``tokens``.

The engine measures the unit on a tensor ``(N, C, *spatial)``. Vision transformers give token
sequences ``(N, L, D)`` (a grid of patch tokens after ``p`` prefix tokens: class, distillation,
register tokens), timm's Swin stages (and the MLPs inside ConvNeXt blocks) give channels-last maps
``(N, H, W, C)``. :func:`plan_layout` decides, from the output's shape, the input's spatial shape
and what the model says about itself, which layout a target's output has, and never guesses
silently: an output that fits several readings without a hint from the model is refused with a
message asking for ``layout=`` / ``grid=``.

Shape test: a feature map of an input ``(S_1, ..., S_d)`` has a spatial shape ``(s_1, ..., s_d)``
with one common downsampling factor ``f`` such that ``|S_a / f - s_a| <= 1`` on every axis
(convolutions, pooling and patch embeddings all round by less than one position).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

LAYOUTS = ("nchw", "nhwc", "tokens")
#: the most leading (prefix) tokens searched for when the model does not say how many it has
MAX_PREFIX = 8


def check_layout(layout: Any) -> str | None:
    """``None`` or one of :data:`LAYOUTS` (``"nhwc"`` etc. also for 1-D/3-D: channels first/last)."""
    if layout is None:
        return None
    if not isinstance(layout, str):
        raise TypeError(f"layout must be None or one of {list(LAYOUTS)}, got {type(layout).__name__} {layout!r}")
    low = layout.lower()
    if low not in LAYOUTS:
        raise ValueError(f"layout must be None or one of {list(LAYOUTS)}, got {layout!r}")
    return low


def fits(spatial_in: Sequence[int], spatial_out: Sequence[int]) -> bool:
    """Whether ``spatial_out`` is ``spatial_in`` downsampled (or upsampled) by one common factor.

    There is an ``f > 0`` with ``|S_a / f - s_a| <= 1`` on every axis: the intervals
    ``[S_a / (s_a + 1), S_a / (s_a - 1)]`` of admissible ``f`` intersect.
    """
    if len(spatial_in) != len(spatial_out) or any(s < 1 for s in spatial_out):
        return False
    lo, hi = 0.0, math.inf
    for big, s in zip(spatial_in, spatial_out):
        lo = max(lo, big / (s + 1))
        if s > 1:
            hi = min(hi, big / (s - 1))
    return lo <= hi


@dataclass(frozen=True)
class Hints:
    """What a model says about its layout (timm attributes; ``None`` when it says nothing).

    ``prefix_tokens``: timm ``num_prefix_tokens``; ``patch``: the patch embedding's stride per axis;
    ``channels_last``: timm ``output_fmt == "NHWC"`` (Swin); ``lastdim_ops``: the model holds
    layer norms over the last axis (``nn.LayerNorm``, not a ``LayerNorm2d``), the sign of
    channels-last stretches inside it (ConvNeXt blocks, transformers).
    """

    prefix_tokens: int | None = None
    patch: tuple[int, ...] | None = None
    channels_last: bool = False
    lastdim_ops: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> "Hints":
        prefix = getattr(model, "num_prefix_tokens", None)
        prefix = int(prefix) if isinstance(prefix, int) and not isinstance(prefix, bool) and prefix >= 0 else None
        patch = None
        pe = getattr(model, "patch_embed", None)
        ps = getattr(pe, "patch_size", None) if pe is not None else None
        if ps is None and pe is not None and isinstance(getattr(pe, "proj", None), nn.modules.conv._ConvNd):
            ps = pe.proj.stride
        if isinstance(ps, int):
            ps = (ps, ps)
        if isinstance(ps, (tuple, list)) and all(isinstance(v, int) and v > 0 for v in ps):
            patch = tuple(ps)
        fmt = getattr(model, "output_fmt", None)
        fmt = str(getattr(fmt, "value", fmt) or "").upper()
        lastdim = any(isinstance(m, nn.LayerNorm) and "2d" not in type(m).__name__.lower() for m in model.modules())
        return cls(prefix, patch, fmt == "NHWC", lastdim)


@dataclass(frozen=True)
class LayoutPlan:
    """How to turn a target's output into ``(N, C, *spatial)``.

    ``layout``: nchw / nhwc / tokens; ``grid`` and ``prefix`` for tokens (the first ``prefix``
    tokens are dropped, the rest read row-major as ``grid``); ``source``: why this reading.
    """

    layout: str
    ndim: int
    grid: tuple[int, ...] | None = None
    prefix: int = 0
    source: str = ""
    extra: dict = field(default_factory=dict)

    def apply(self, out: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            return out
        if self.layout == "nhwc":
            nd = out.dim() - 2
            return out.permute(0, nd + 1, *range(1, nd + 1))
        tokens = out[:, self.prefix:, :]
        return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], *self.grid)

    def describe(self) -> dict:
        d = {"layout": self.layout, "source": self.source}
        if self.layout == "tokens":
            d.update(grid=list(self.grid), prefix_tokens=self.prefix)
        return d

    def token_stride(self, spatial_in: Sequence[int]) -> tuple[float, ...] | None:
        """Input pixels per token (per axis) of a token grid."""
        if self.grid is None:
            return None
        return tuple(s / g for s, g in zip(spatial_in, self.grid))


def _shape(out: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in out.shape)


def _module_hint(module: nn.Module | None, out: torch.Tensor) -> str | None:
    """``nhwc`` for modules working on the last axis, ``nchw`` for convolution-family modules."""
    if module is None:
        return None
    if type(module) in (nn.Linear, nn.LayerNorm) or type(module).__name__ in ("Mlp", "GluMlp", "SwiGLU"):
        shape = getattr(module, "normalized_shape", None)
        if shape is not None and tuple(shape) != (out.shape[-1],):
            return None
        return "nhwc"
    conv_like = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd,
                 nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.GroupNorm)
    if isinstance(module, conv_like):
        return "nchw"
    return None


def _token_candidates(n_tokens: int, spatial_in: Sequence[int], hints: Hints) -> list[tuple[int, tuple[int, ...], str]]:
    """``(prefix, grid, source)`` readings of ``n_tokens`` tokens on an input of ``spatial_in``."""
    found: list[tuple[int, tuple[int, ...], str]] = []
    if hints.patch is not None and len(hints.patch) == len(spatial_in):
        grid = tuple(math.ceil(s / p) for s, p in zip(spatial_in, hints.patch))
        prefix = n_tokens - math.prod(grid)
        if (hints.prefix_tokens is None and 0 <= prefix <= MAX_PREFIX) or prefix == hints.prefix_tokens:
            pt = "x".join(map(str, hints.patch))
            return [(prefix, grid, f"model patch_embed (patch {pt}, {prefix} prefix tokens)")]
    prefixes = [hints.prefix_tokens] if hints.prefix_tokens is not None else range(MAX_PREFIX + 1)
    exact, rounded = [], []
    for stride in range(1, max(spatial_in) + 1):
        grid = tuple(math.ceil(s / stride) for s in spatial_in)
        prefix = n_tokens - math.prod(grid)
        if prefix in prefixes and all(g >= 1 for g in grid):
            entry = (prefix, grid, f"grid of stride {stride} after {prefix} prefix tokens"
                     + (" (model num_prefix_tokens)" if hints.prefix_tokens is not None else ""))
            (exact if all(s % stride == 0 for s in spatial_in) else rounded).append(entry)
    seen, out = set(), []
    for entry in exact or rounded:
        if entry[1] not in seen:
            seen.add(entry[1])
            out.append(entry)
    found.extend(out)
    return found


def plan_layout(out: torch.Tensor, input_shape: Sequence[int], *, layout: str | None, grid: Sequence[int] | None,
                hints: Hints, module: nn.Module | None, where: str) -> LayoutPlan:
    """The :class:`LayoutPlan` of a target output (see the module docstring).

    Raises:
        ValueError: the output fits no layout, or several without a hint (asks for layout=/grid=).
    """
    spatial_in = tuple(input_shape[1:])
    nd = len(spatial_in)
    shape = _shape(out)
    if grid is not None:
        if layout not in (None, "tokens"):
            raise ValueError(f"layout={layout!r} contradicts grid={tuple(grid)} (a grid reads a token sequence)")
        if out.dim() != 3:
            raise ValueError(f"grid: {where} has shape {shape}; grid expects a token sequence (N, L, D)")
        n_grid = math.prod(grid)
        if shape[1] < n_grid:
            raise ValueError(f"grid {tuple(grid)} needs {n_grid} tokens but {where} has {shape[1]}")
        if len(grid) != nd:
            raise ValueError(f"grid {tuple(grid)} must have {nd} entries, one per spatial axis of the input")
        return LayoutPlan("tokens", nd, tuple(grid), shape[1] - n_grid, "grid= given")
    if layout == "tokens" or (layout is None and out.dim() == 3 and nd >= 2):
        if out.dim() != 3:
            raise ValueError(f"layout: {where} has shape {shape}, not a token sequence (N, L, D)")
        cands = _token_candidates(shape[1], spatial_in, hints)
        if len(cands) == 1:
            prefix, g, source = cands[0]
            return LayoutPlan("tokens", nd, g, prefix, source)
        if not cands:
            raise ValueError(f"grid: {where} is a token sequence {shape} whose {shape[1]} tokens fit no grid of "
                             f"the {'x'.join(map(str, spatial_in))} input (after up to {MAX_PREFIX} prefix tokens); "
                             "pass grid=(h, w) (CLI --grid HxW)")
        opts = "; ".join(f"{'x'.join(map(str, g))} after {p} prefix tokens" for p, g, _ in cands)
        raise ValueError(f"grid: {where} is a token sequence {shape} that fits several grids ({opts}); "
                         "pass grid=(h, w) (CLI --grid HxW)")
    if out.dim() != nd + 2 and layout is not None:
        axes = ", ".join("S" * nd)
        raise ValueError(f"layout={layout!r}: {where} has shape {shape}, not "
                         f"{'(N, C, ' + axes + ')' if layout == 'nchw' else '(N, ' + axes + ', C)'}")
    if out.dim() != nd + 2:
        raise ValueError(
            f"layer: {where} has shape {shape}, which has no {nd} spatial axes "
            f"(expected (N, C, {', '.join('S' * nd)}), (N, {', '.join('S' * nd)}, C) or tokens (N, L, D)); "
            "pass layer=... to pick a spatial layer, grid=(h, w) for token sequences, or select=... for "
            "tuple/dict outputs")
    first = fits(spatial_in, shape[2:])
    last = fits(spatial_in, shape[1:-1])
    if layout is not None:
        return LayoutPlan(layout, nd, source="layout= given")
    if nd == 1:
        return LayoutPlan("nchw", nd, source="PyTorch convention (1-D: pass layout='nhwc' for (N, L, C))")
    if first and not last:
        return LayoutPlan("nchw", nd, source="shape (channels first)")
    if last and not first:
        return LayoutPlan("nhwc", nd, source="shape (channels last)")
    mod = _module_hint(module, out)
    if mod is not None:
        return LayoutPlan(mod, nd, source=f"layer type {type(module).__name__}")
    if hints.channels_last:
        return LayoutPlan("nhwc", nd, source="model output_fmt NHWC")
    if not hints.lastdim_ops:
        why = "both layouts fit the shape" if first else "neither layout fits the input's aspect"
        return LayoutPlan("nchw", nd, source=f"PyTorch convention ({why}; the model has no channels-last layers)")
    raise ValueError(f"layout: cannot tell whether {where} of shape {shape} is channels-first (N, C, "
                     f"{', '.join('S' * nd)}) or channels-last (N, {', '.join('S' * nd)}, C) on a "
                     f"{'x'.join(map(str, spatial_in))} input; pass layout='nchw' or layout='nhwc' "
                     "(CLI --layout)")


def interpretable(out: Any, input_shape: Sequence[int], hints: Hints, module: nn.Module | None = None) -> bool:
    """Whether ``out`` reads as a feature map of the input with more than one position."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return False
    try:
        plan = plan_layout(out, input_shape, layout=None, grid=None, hints=hints, module=module, where="output")
    except ValueError:
        return False
    shape = _shape(out)
    if plan.layout == "tokens":
        spatial = plan.grid
    elif plan.layout == "nhwc":
        spatial = shape[1:-1]
    else:
        spatial = shape[2:]
        if not fits(tuple(input_shape[1:]), spatial):
            return False
    return math.prod(spatial) > 1
