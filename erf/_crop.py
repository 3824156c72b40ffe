"""Cone cropping: run the network on the smallest input crop that holds the unit's TRF.

A unit sees only its theoretical receptive field (Araujo, Norris & Sim, "Computing Receptive
Fields of Convolutional Neural Networks", Distill 2019, https://distill.pub/2019/computing-receptive-fields/):
``u * jump - padding`` through ``u * jump - padding + size - 1`` per axis. Outside it the input
gradient is exactly zero, so the network can run on a crop ``[a, b)`` of the input and the gradient
be placed back into the full-size map (``RunningMoments.update(window=...)``). The crop gives the
same unit value as the full input when, per spatial axis,

- ``a`` is a multiple of the unit's total jump (then every intermediate grid of the crop is the
  full grid shifted by a whole number of positions, and the unit lands on output ``u - a / jump``);
- ``[a, b)`` holds the part of the TRF inside the input;
- where the TRF crosses an input edge, the crop reaches that edge (the padding the unit sees at
  every layer is then the same padding as in the full network).

Conservative by design: the plan needs the TRF analyser (:mod:`erf.trf`) to call the unit
``croppable`` (finite, aligned, no global or batch-coupled layer before it), and at setup one probe
input checks that the unit exists in the cropped output and that the cropped gradient equals the
full one (the full gradient must be exactly zero outside the crop). Anything unexpected: no crop.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from erf._target import Target

log = logging.getLogger("erf")

#: crop only when it keeps at most this share of the input volume (the setup check costs one sample)
MAX_FRACTION = 0.9
#: crop only runs whose work (activation bytes per sample x samples) is at least this: the TRF
#: analysis (0.1-4 s) and the setup check (two samples) must pay off
MIN_WORK_BYTES = 256 << 20
#: relative tolerance of the setup check (float32 rounding differs between grid sizes)
CHECK_RTOL = 1e-4


@dataclass(frozen=True)
class CropPlan:
    """Where to crop the inputs of a run and which output units the crop holds.

    Attributes:
        window: one ``slice(a, b)`` per spatial axis, in input coordinates; also the window of the
            map that the cropped gradients fill (``RunningMoments.update(window=...)``).
        targets: the run's targets with their units moved into the cropped output.
        fraction: cropped input volume / full input volume.
    """

    window: tuple[slice, ...]
    targets: tuple[Target, ...]
    fraction: float

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The crop of a batch ``x`` (shape ``(B, C, *spatial)``), a view."""
        return x[(slice(None), slice(None)) + self.window]


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is a finite integral number, else ``None``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or f != int(f):
        return None
    return int(f)


def axis_window(first: int, last: int, size: int, jump: int) -> tuple[int, int]:
    """The crop ``[a, b)`` of one axis for a TRF ``first..last`` (inclusive) on an input of ``size``.

    ``a`` is the largest multiple of ``jump`` not after the TRF's first index inside the input
    (0 when the TRF crosses the leading edge); ``b`` is one past the TRF's last index, or ``size``
    when the TRF crosses the trailing edge.
    """
    lo = 0 if first <= 0 else min(first, size - 1)
    a = (lo // jump) * jump
    b = size if last >= size - 1 else max(last + 1, a + 1)
    return a, b


def plan_from_reports(reports: Sequence[Any], targets: Sequence[Target],
                      input_shape: Sequence[int]) -> CropPlan | None:
    """A crop plan from one TRF report per target, or ``None`` when a report does not allow it.

    Each report needs ``croppable`` (or ``aligned`` and not ``is_global``), an integral ``jump``
    and a finite integral ``region`` per axis.
    """
    spatial = tuple(input_shape[1:])
    nd = len(spatial)
    firsts, lasts, jumps = [None] * nd, [None] * nd, [1] * nd
    for rep, t in zip(reports, targets):
        croppable = getattr(rep, "croppable", None)
        if croppable is None:
            croppable = bool(getattr(rep, "aligned", False)) and not bool(getattr(rep, "is_global", True))
        if not croppable:
            return None
        region, jump = getattr(rep, "region", None), getattr(rep, "jump", None)
        if region is None or jump is None or len(region) != nd or len(jump) != nd:
            return None
        for ax in range(nd):
            first, last, j = _as_int(region[ax][0]), _as_int(region[ax][1]), _as_int(jump[ax])
            if first is None or last is None or j is None or j < 1 or last < first:
                return None
            firsts[ax] = first if firsts[ax] is None else min(firsts[ax], first)
            lasts[ax] = last if lasts[ax] is None else max(lasts[ax], last)
            jumps[ax] = math.lcm(jumps[ax], j)
    window = []
    for ax in range(nd):
        a, b = axis_window(firsts[ax], lasts[ax], spatial[ax], jumps[ax])
        window.append(slice(a, b))
    moved = []
    for rep, t in zip(reports, targets):
        unit = []
        for ax in range(nd):
            j = _as_int(rep.jump[ax])
            unit.append(t.unit[ax] - window[ax].start // j)
        moved.append(dataclasses.replace(t, unit=tuple(unit)))
    fraction = math.prod((w.stop - w.start) / s for w, s in zip(window, spatial))
    return CropPlan(tuple(window), tuple(moved), fraction)


def trf_reports(model: Any, input_shape: Sequence[int], targets: Sequence[Target]) -> list[Any] | None:
    """One TRF report (:func:`erf.trf.theoretical_rf`) per target, or ``None`` when the analyser is
    missing, fails or warns (then no crop)."""
    try:
        from erf.trf import theoretical_rf
    except ImportError:
        log.info("erf: no crop (the TRF analyser erf.trf is not available)")
        return None
    reports = []
    for t in targets:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                reports.append(theoretical_rf(model, input_shape, layer=t.layer or None, unit=t.unit))
        except Exception as exc:  # the analyser does not handle every model: then no crop
            log.info("erf: no crop (TRF analysis failed: %s)", exc)
            return None
        if caught:  # the analyser was unsure of something: when in doubt, do not crop
            log.info("erf: no crop (TRF analysis warned: %s)", caught[0].message)
            return None
    return reports


def _unit_grads(mapper: Any, model: Any, x: torch.Tensor, targets: Sequence[Target]) -> list[torch.Tensor]:
    """Raw input gradients of every target's unit for a batch ``x`` (float32 or float64, no autocast)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(mapper.device.type, enabled=False):
        outs = mapper.forward(model, x, stop=True)
        scalars = [t.scalar(outs[t.layer]).sum() for t in targets]
    grads = []
    for i, s in enumerate(scalars):
        g = None
        if s.requires_grad:
            g, = torch.autograd.grad(s, x, retain_graph=i < len(scalars) - 1, allow_unused=True)
        grads.append(torch.zeros_like(x) if g is None else g.detach())
    return grads


def verify(mapper: Any, model: Any, input_shape: Sequence[int], plan: CropPlan) -> str | None:
    """Check ``plan`` on one probe input; ``None`` when it holds, else the reason it does not.

    ``mapper`` (:class:`erf._maps.Mapper`) runs ``model`` stopped at the targets' layers.
    """
    dtype = torch.float64 if mapper.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(12345)
    x = torch.randn((1,) + tuple(input_shape), generator=gen, dtype=dtype).to(mapper.device)
    xc = plan.crop(x)
    with torch.no_grad():
        outs = mapper.forward(model, xc, stop=True)
    for t in plan.targets:
        out = t.prepare(outs[t.layer])
        spatial = tuple(out.shape[2:])
        if any(u < 0 or u >= s for u, s in zip(t.unit, spatial)):
            return f"unit {t.unit} is not in the cropped output of shape {spatial}"
    full = _unit_grads(mapper, model, x, mapper.targets)
    cropped = _unit_grads(mapper, model, xc, plan.targets)
    inside = (slice(None), slice(None)) + plan.window
    for gf, gc in zip(full, cropped):
        outside = gf.clone()
        outside[inside] = 0
        if bool((outside != 0).any()):
            return "the gradient is not zero outside the TRF"
        scale = float(gf.abs().max())
        diff = float((gf[inside] - gc).abs().max())
        if not math.isfinite(diff) or diff > CHECK_RTOL * scale:
            return f"the cropped gradient differs from the full one by {diff:.3g} (max {scale:.3g})"
    return None


def plan_crop(mapper: Any, model: Any, input_shape: Sequence[int], *, samples: int, per_sample_bytes: int,
              select: Any = None, grid: Any = None) -> tuple[CropPlan | None, dict[str, Any]]:
    """The crop plan of a run, or ``None`` (no crop) with the reason logged; and the TRF reports.

    ``mapper`` (:class:`erf._maps.Mapper`, unplanned) gives the targets, method and mode; ``model`` is
    the first draw; ``samples`` the maps the run computes. The reports (``{layer: RFReport}``, empty
    when there are none) are reused as the results' ``.trf``: the analysis is done once per run.

    No crop for train mode (stochastic modules draw noise of the tensor's shape), captum methods,
    ``select``/``grid`` targets, runs too small to pay for the analysis (:data:`MIN_WORK_BYTES`), or
    when the crop would keep more than :data:`MAX_FRACTION` of the input.
    """
    if mapper.train_mode or mapper.method != "gradient" or select is not None or grid is not None:
        return None, {}
    if per_sample_bytes * samples < MIN_WORK_BYTES:
        return None, {}  # too little work for the analysis to pay off
    reports = trf_reports(model, input_shape, mapper.targets)
    if reports is None:
        return None, {}
    by_layer = {t.layer: r for t, r in zip(mapper.targets, reports)}
    plan = plan_from_reports(reports, mapper.targets, input_shape)
    if plan is None:
        log.info("erf: no crop (the unit's TRF is not finite and aligned)")
        return None, by_layer
    if plan.fraction > MAX_FRACTION:
        return None, by_layer
    try:
        reason = verify(mapper, model, input_shape, plan)
    except Exception as exc:  # the model refuses the crop size, or anything else: no crop
        reason = f"the cropped forward failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if reason is not None:
        log.info("erf: no crop (%s)", reason)
        return None, by_layer
    log.info("erf: cone crop %s keeps %.1f%% of the input", [(w.start, w.stop) for w in plan.window],
             100 * plan.fraction)
    return plan, by_layer
