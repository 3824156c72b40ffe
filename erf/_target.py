"""The unit whose effective receptive field is measured: which tensor, position and channels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from erf._layout import Hints, LayoutPlan, plan_layout
from erf._validate import check_channels, check_index


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"dict with keys {list(obj)[:8]}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of {len(obj)} items"
    return type(obj).__name__


#: ``unit=TOKEN_CENTRE`` (protocol ``openerf``): ``(n - 1) // 2`` per axis for token and channels-last
#: outputs (the upper-left of the four central tokens of an even grid), ``n // 2`` for NCHW maps.
TOKEN_CENTRE = "token_centre"


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
    layout: str | None = None       # requested layout (None: inferred, erf._layout.plan_layout)
    hints: Hints | None = None      # what the model says about its layout
    input_shape: tuple[int, ...] | None = None
    module: Any = None              # the layer's module (a hint for the layout), dropped after planning
    plan: LayoutPlan | None = None  # the layout, decided on the first output seen

    def prepare(self, out: Any) -> torch.Tensor:
        """Apply ``select`` and the layout (tokens / channels-last -> ``(N, C, *S)``) and check the axes."""
        where = f"the output of layer {self.layer!r}" if self.layer else "the model output"
        if self.select is not None:
            out = self.select(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"select: {where} is a {_describe(out)}, not a tensor; pass select=... "
                            "(e.g. select=lambda out: out[0] or out['features']) to pick one, "
                            "or layer=... to read an inner layer")
        if self.plan is None:
            shape = self.input_shape if self.input_shape is not None else (1,) + tuple(out.shape[2:])
            self.plan = plan_layout(out, shape, layout=self.layout, grid=self.grid,
                                    hints=self.hints or Hints(), module=self.module, where=where)
            self.module = None  # only needed for planning; do not keep the model alive
        out = self.plan.apply(out)
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
        if isinstance(unit, str) and unit == TOKEN_CENTRE:  # OpenERF: upper-left central token of even grids
            tokens = self.plan is not None and self.plan.layout in ("tokens", "nhwc")
            unit = tuple((n - 1) // 2 if tokens else n // 2 for n in spatial)
        self.unit = tuple(s // 2 for s in spatial) if unit is None else check_index("unit", unit, spatial)
        self.channels = check_channels(channel, out.shape[1])

    def describe(self, chosen: tuple[str, str] | None = None, warnings: list[str] | None = None) -> dict:
        """What was inferred for this target, for the result's ``meta``: layout, default layer, warnings."""
        d: dict[str, Any] = {}
        if self.plan is not None:
            d["layout"] = dict(self.plan.describe(), output_spatial=list(self.out_shape[1:]))
            if self.hints is not None and self.hints.channels_last:
                d["layout"]["model_output_fmt"] = "NHWC"
        if chosen is not None and chosen[0] == self.layer:
            d["default_layer"] = {"layer": chosen[0], "reason": chosen[1]}
        if warnings:
            d["warnings"] = list(warnings)
        return d

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
