"""The unit whose effective receptive field is measured: which tensor, position and channels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from erf._validate import check_channels, check_index


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"dict with keys {list(obj)[:8]}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of {len(obj)} items"
    return type(obj).__name__


@dataclass
class Target:
    """How to turn a layer's output into the per-sample value of one unit.

    ``scalar(out)`` returns a tensor of shape ``(B,)``: the unit's activation at ``unit``,
    summed over ``channels`` (all when ``None``), after ReLU when ``unit_relu``.
    """

    layer: str
    select: Callable[[Any], Any] | None
    grid: tuple[int, ...] | None
    ndim: int                       # spatial axes of the input
    unit: tuple[int, ...] | None = None
    channels: list[int] | None = None
    unit_relu: bool = False
    out_shape: tuple[int, ...] | None = None  # (C, *spatial) of the prepared output

    def prepare(self, out: Any) -> torch.Tensor:
        """Apply ``select`` and ``grid`` and check the output has channel and spatial axes."""
        where = f"the output of layer {self.layer!r}" if self.layer else "the model output"
        if self.select is not None:
            out = self.select(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"select: {where} is a {_describe(out)}, not a tensor; pass select=... "
                            "(e.g. select=lambda out: out[0] or out['features']) to pick one, "
                            "or layer=... to read an inner layer")
        if self.grid is not None:
            if out.dim() != 3:
                raise ValueError(f"grid: {where} has shape {tuple(out.shape)}; grid expects a token "
                                 "sequence (N, L, D)")
            n_grid = 1
            for g in self.grid:
                n_grid *= g
            if out.shape[1] < n_grid:
                raise ValueError(f"grid {self.grid} needs {n_grid} tokens but {where} has {out.shape[1]}")
            tokens = out[:, out.shape[1] - n_grid:, :]
            out = tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], *self.grid)
        if out.dim() != self.ndim + 2:
            raise ValueError(
                f"layer: {where} has shape {tuple(out.shape)}, which has no {self.ndim} spatial axes "
                f"(expected (N, C, {', '.join('S' * self.ndim)})); pass layer=... to pick a spatial "
                "layer, grid=(h, w) for token sequences, or select=... for tuple/dict outputs")
        return out

    def configure(self, out: torch.Tensor, unit: Any, channel: Any) -> None:
        """Validate ``unit`` and ``channel`` against a prepared output (shape ``(N, C, *S)``)."""
        spatial = tuple(out.shape[2:])
        self.out_shape = tuple(out.shape[1:])
        self.unit = tuple(s // 2 for s in spatial) if unit is None else check_index("unit", unit, spatial)
        self.channels = check_channels(channel, out.shape[1])

    def scalar(self, out: Any) -> torch.Tensor:
        out = self.prepare(out)
        idx = (slice(None), slice(None)) + self.unit
        vals = out[idx]  # (B, C)
        if self.channels is not None:
            vals = vals[:, self.channels]
        if self.unit_relu:
            vals = torch.relu(vals)
        return vals.sum(1)


def check_grid(grid: Any) -> tuple[int, ...] | None:
    if grid is None:
        return None
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise TypeError(f"grid must be None or a tuple of positive ints like (14, 14), got {grid!r}")
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid must hold positive ints, got {grid!r}")
    return tuple(grid)
