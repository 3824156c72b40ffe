"""Degenerate measurements, called out: warnings the engine raises and records in ``meta["warnings"]``.

- The unit is identically zero, or constant over inputs: its gradient map is then zero or rounding
  noise (e.g. the channel sum of a LayerNorm output with its initial affine, gamma 1 and beta 0:
  ``sum_c (x_c - mean) / std = 0`` at every position, as in a randomly initialised ViT's final norm).
- Residual branches that contribute nothing because their last scale starts at zero: timm's
  ``zero_init_last`` (the last BatchNorm weight of every ResNet block is 0), layer-scale ``gamma``
  at 1e-6 (ConvNeXt, CaiT, DeiT-3), NFNet ``skipinit_gain`` 0. With such weights only the shortcut
  path carries gradient and the map is far narrower than for a trained network.
- The TRF is larger than the input: ERF/TRF then divides by the TRF clipped to the input
  (:func:`clip_trf`).

The fix for the first two with random weights: ``init="kaiming_all"`` (He-normal convolution and
linear weights, and every normalisation / layer-scale scale drawn from U(0.5, 1.5), see
:func:`erf._draws.set_kaiming_all`), or trained weights (``erf.load_weights`` / ``--weights``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import torch
from torch import nn

from erf import _rng

#: a normalisation weight counts as zero at or below this (absolute)
ZERO_NORM = 1e-6
#: a layer-scale parameter counts as (near) zero when all its entries are at or below this
ZERO_SCALE = 1e-4
#: the unit is constant when its spread over inputs is below this share of its channels' size
CONSTANT_RTOL = 1e-5
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_SCALE_NAME = re.compile(r"^(gamma\w*|layer_?scale\w*|ls\d*|skipinit_gain|res_scale)$")
FIX = ("use init='kaiming_all' (CLI --init kaiming_all: He-normal weights and random normalisation/"
       "layer-scale scales) or load trained weights (erf.load_weights / --weights)")


def scale_params(model: nn.Module, names: set[str] | None = None):
    """``(module path, parameter name, parameter, kind)`` of every normalisation and layer-scale scale."""
    for path, mod in model.named_modules():
        if names is not None and path not in names:
            continue
        if isinstance(mod, _NORMS):
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and not isinstance(w, nn.parameter.UninitializedParameter):
                yield path, "weight", w, f"{type(mod).__name__} weight"
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if _SCALE_NAME.match(pname) and p.dim() <= 1 and not isinstance(p, nn.parameter.UninitializedParameter):
                yield path, pname, p, "layer-scale"


def zero_scales(model: nn.Module, ran: set[str]) -> list[str]:
    """Names of scales (among the modules that ran) that are all zero / near zero."""
    found = []
    for path, pname, p, kind in scale_params(model, ran):
        limit = ZERO_SCALE if kind == "layer-scale" else ZERO_NORM
        if p.numel() and float(p.detach().abs().max()) <= limit:
            found.append(f"{path}.{pname}" if path else pname)
    return found


def _at_init_layernorm(module: nn.Module | None) -> bool:
    if not isinstance(module, nn.LayerNorm) or module.weight is None:
        return False
    w, b = module.weight.detach(), module.bias
    return bool(torch.all(w == w.flatten()[0])) and (b is None or bool(torch.all(b.detach() == 0)))


def check_run(model: nn.Module, targets: Sequence[Any], input_shape: Sequence[int], device: torch.device,
              dtype: torch.dtype, seed: int, n: int = 3, x: torch.Tensor | None = None) -> dict[str, list[str]]:
    """Warnings per target layer path from one forward of the run's first inputs ``x`` (``n`` Gaussian
    inputs when ``None``), without gradient.

    The forward stops once every target has produced its output; the modules that finished
    before are the ones the unit depends on (for the zero-scale test).
    """
    paths = [t.layer for t in targets]
    ran: list[str] = []
    outs: dict[str, Any] = {}
    handles = []

    class _Stop(Exception):
        pass

    wanted = {p for p in paths if p}

    def hook_for(name):
        def hook(_m, _i, out):
            ran.append(name)
            if name in wanted:
                outs[name] = out
                if len(outs) == len(wanted) and "" not in paths:
                    raise _Stop
        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook_for(name)))
    if x is None:
        x = torch.randn((n,) + tuple(input_shape), generator=_rng.generator(seed, "degenerate-check", 0))
    x = x.to(device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    try:
        with torch.no_grad():
            try:
                res = model(x)
                outs[""] = res
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    found: dict[str, list[str]] = {}
    zeros = zero_scales(model, set(ran)) if ran else []
    for t in targets:
        msgs = []
        where = f"layer {t.layer!r}" if t.layer else "the model output"
        if t.layer not in outs:
            continue
        out = t.prepare(outs[t.layer])
        vals = t.scalar(outs[t.layer]).double()
        at = out[(slice(None), slice(None)) + tuple(t.unit)].double()
        if t.channels is not None:
            at = at[:, t.channels]
        size = float(at.abs().mean()) * math.sqrt(at.shape[1])
        rtol = CONSTANT_RTOL  # the check runs in float32 (float64 for dtype=float64), never under autocast
        if bool(torch.all(vals == 0)) and size == 0:
            msgs.append(f"the unit {tuple(t.unit)} of {where} is identically zero on random inputs: its ERF map "
                        f"will be all zeros; pick another layer, unit or channel, or {FIX}")
        elif vals.numel() > 1 and float(vals.std()) <= rtol * size:
            detail = ""
            mod = model.get_submodule(t.layer) if t.layer else None
            if _at_init_layernorm(mod) and t.channels is None:
                detail = (" (a LayerNorm with its initial affine, gamma constant and beta 0: its channels sum "
                          "to 0 at every position, so the channel-summed unit is rounding noise; pass channel=... "
                          "or analyse the layer before the norm)")
            msgs.append(f"the unit {tuple(t.unit)} of {where} is constant over inputs (spread "
                        f"{float(vals.std()):.3g} against channel values of size {size:.3g}){detail}: the ERF map "
                        f"is rounding noise; {FIX}")
        if zeros:
            shown = ", ".join(zeros[:4]) + (f", ... ({len(zeros)} in all)" if len(zeros) > 4 else "")
            msgs.append(f"{len(zeros)} residual-branch scales before {where} are zero-initialised ({shown}): those "
                        f"branches contribute nothing and the map is the shortcut path's alone, much narrower than "
                        f"a trained network's; {FIX}")
        if msgs:
            found[t.layer] = msgs
    return found


def clip_trf(trf: Any, input_shape: Sequence[int]) -> tuple[Any, str | None]:
    """The TRF report ERF/TRF divides by: clipped to the input when it is larger (with a message)."""
    if trf is None or getattr(trf, "is_global", False) or getattr(trf, "region", None) is None:
        return trf, None
    spatial = tuple(input_shape[1:])
    try:
        clipped = tuple(max(0, min(int(b), n - 1) - max(int(a), 0) + 1) for (a, b), n in zip(trf.region, spatial))
        size = tuple(int(s) for s in trf.size)
    except (TypeError, ValueError):
        return trf, None
    if all(s <= n for s, n in zip(size, spatial)) or any(c < 1 for c in clipped):
        return trf, None
    msg = (f"the TRF ({'x'.join(map(str, size))}) is larger than the "
           f"{'x'.join(map(str, spatial))} input: erf_trf_ratio uses the TRF clipped to the input "
           f"({'x'.join(map(str, clipped))}); use a larger input to see the whole field")
    try:
        return dataclasses.replace(trf, size=clipped), msg
    except TypeError:  # not a dataclass: a plain object with .size / .center
        class _Clipped:
            pass

        c = _Clipped()
        c.size, c.center = clipped, trf.center
        return c, msg
