"""The TRF of a unit on a token or channels-last output (:mod:`erf._layout`), for ``ERFResult.trf``.

Kept apart from :mod:`erf._layout` so that the layout logic does not import the TRF analyser.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from erf._layout import LayoutPlan


def fallback_trf(input_shape: Sequence[int], layer: str | None, unit: Sequence[int], plan: LayoutPlan | None,
                 out_spatial: Sequence[int], reason: str):
    """An :class:`erf.trf.RFReport` for a unit the graph analyser cannot follow (token mixing).

    Attention mixes every token with every other, so the field is the whole input
    (``is_global``); the *local* field is the unit's own patch: ``u * J .. u * J + J - 1`` per
    axis, ``J`` = input size / grid size (the patch embedding's stride, times any patch merging).
    """
    from erf.trf import RFReport

    spatial_in = tuple(int(s) for s in input_shape[1:])
    jumps = [s / max(g, 1) for s, g in zip(spatial_in, out_spatial)]
    local = []
    for u, j, s in zip(unit, jumps, spatial_in):
        a = int(math.floor(u * j))
        b = min(int(math.ceil((u + 1) * j)) - 1, s - 1)
        local.append((a, max(a, b)))
    jumps_num = tuple(int(j) if float(j).is_integer() else float(j) for j in jumps)
    return RFReport(input_shape=tuple(input_shape), layer=layer, unit=tuple(unit), size=spatial_in,
                    jump=jumps_num, padding=(0,) * len(spatial_in),
                    region=tuple((0, s - 1) for s in spatial_in),
                    center=tuple((s - 1) / 2 if (s - 1) % 2 else (s - 1) // 2 for s in spatial_in),
                    is_global=True, local_size=tuple(b - a + 1 for a, b in local), local_region=tuple(local),
                    aligned=True, croppable=False, global_layers=[reason], method="layout")


def layout_trf(analyse, model: nn.Module, input_shape: Sequence[int], layer: str | None, unit: Sequence[int],
               layout: dict | None):
    """The TRF of a result's unit: the graph analyser's (``analyse`` = :func:`erf.trf.theoretical_rf`),
    or, for a token / channels-last output it cannot follow, :func:`fallback_trf`."""
    kind = (layout or {}).get("layout", "nchw")
    if getattr(model, "_erf_scripted", False):
        import warnings

        warnings.warn("TorchScript model: the TRF analyser cannot read its graph, so trf is None and "
                      "erf_trf_ratio is not computed", stacklevel=3)
        return None
    if kind == "nchw":
        return analyse(model, input_shape, layer=layer, unit=unit)
    out_spatial = (layout or {}).get("output_spatial") or (layout or {}).get("grid")
    attention = kind == "tokens" or (layout or {}).get("model_output_fmt") == "NHWC"
    try:
        if attention and out_spatial:  # token mixing: the graph analyser loses the grid axes anyway
            raise ValueError("attention")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = analyse(model, input_shape, layer=layer, unit=unit)
        if len(rep.size) == len(input_shape) - 1 and rep.region is not None:
            return rep
    except (ValueError, TypeError):
        pass
    if not out_spatial:
        return None
    reason = ("attention/token mixing (assumed global; local field = the unit's patch)" if kind == "tokens"
              else "channels-last layers the analyser cannot follow (assumed global; local field = the unit's patch)")
    return fallback_trf(input_shape, layer, unit, None, out_spatial, reason)
