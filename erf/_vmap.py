"""Weight draws in one pass: ``torch.func`` over stacked draws.

The models of K draws are stacked (``torch.func.stack_module_state``) and one
``vmap(functional_call)`` with ``randomness="different"`` runs all of them on their own inputs,
followed by one ``torch.autograd.grad`` for the whole group. Every draw keeps its keyed inputs
(``source.get(draw, lo, hi)``), so the map equals the loop over draws up to float rounding.
Measured (ENGINEERING.md): 3-6x faster than the loop on an H100; on CPU vmap runs grouped
convolutions and is slower, so ``vmap_draws=None`` turns it on for CUDA only.

Not for: ``train_mode`` (stochastic modules draw keyed noise per draw and block), captum methods,
checkpoints and ``until_stderr`` (both work per draw). A module vmap cannot run is found at setup
with a two-draw trial; the run then loops over draws and says which module forced it.

This module plans stacking (:func:`plan_stacking`) and computes the maps of one stacked step
(:func:`stacked_maps`); the draw/batch loop itself is :mod:`erf._work`'s, shared with the plain path.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from erf import _batch

log = logging.getLogger("erf")

#: most draws stacked in one group
MAX_GROUP = 64


class _Functional:
    """``module`` called with substituted parameters and buffers (for :meth:`erf._maps.Mapper.forward`)."""

    def __init__(self, module: nn.Module, params: dict, buffers: dict):
        self.module, self.params, self.buffers = module, params, buffers

    def get_submodule(self, path: str) -> nn.Module:
        return self.module.get_submodule(path)

    def __call__(self, x: torch.Tensor) -> Any:
        return functional_call(self.module, (self.params, self.buffers), (x,))


def blocker(*, train_mode: bool, method: str, checkpoint: Any, until_stderr: Any, draws: int) -> str | None:
    """Why a run with these options cannot stack its draws, or ``None``."""
    if train_mode:
        return "train_mode=True (stochastic modules draw keyed noise per draw)"
    if method != "gradient":
        return f"method={method!r}"
    if checkpoint is not None:
        return "checkpoint=... (checkpoints are per draw)"
    if until_stderr is not None:
        return "until_stderr=... (the stopping rule is checked per draw)"
    if draws < 2:
        return "draws=1"
    return None


def stack(models: Sequence[nn.Module]) -> tuple[dict, dict]:
    """Parameters and buffers of ``models`` stacked along a new leading axis (detached)."""
    params, buffers = stack_module_state(list(models))
    return ({k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in buffers.items()})


def _module_at_fault(mapper: Any, model: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> str:
    """Rerun the failing trial with hooks and name the innermost module that was running."""
    stack_: list[str] = []
    culprit = [type(model).__name__]
    handles = []
    for name, m in model.named_modules():
        label = f"{name} ({type(m).__name__})" if name else type(m).__name__

        def pre(_m, _i, label=label):
            stack_.append(label)

        def post(_m, _i, _o):
            if stack_:
                stack_.pop()

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        group_maps(mapper, model, params, buffers, x)
    except Exception:
        if stack_:
            culprit[0] = stack_[-1]
    finally:
        for h in handles:
            h.remove()
    return culprit[0]


def _group_scalars(mapper: Any, model: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """Unit values ``(K, T, B)`` of every stacked draw, target and input (a vmapped forward)."""
    targets = mapper.unit_targets

    def unit(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        outs = mapper.forward(_Functional(model, p, b), xb, stop=True)
        return torch.stack([t.scalar(outs[t.layer]).float() for t in targets])

    return vmap(unit, in_dims=(0, 0, 0), randomness="different")(params, buffers, x)


def group_maps(mapper: Any, model: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Reduced maps ``(K, B, *map)`` per target for stacked draws and inputs ``x`` ``(K, B, C, *S)``.

    ``model`` is any draw (its structure is called with the stacked ``params`` and ``buffers``).
    """
    x = x.to(mapper.device, dtype=torch.float64 if mapper.dtype == torch.float64 else torch.float32,
             non_blocking=True)
    if mapper.crop is not None:
        x = x[(slice(None),) * 3 + mapper.crop.window]
    x = x.contiguous()
    x.requires_grad_(True)
    with torch.enable_grad(), mapper.autocast():
        scalars = _group_scalars(mapper, model, params, buffers, x)
    fn = mapper.reduce_fn
    maps = []
    n_t = scalars.shape[1]
    for i in range(n_t):
        s = scalars[:, i]
        g = None
        if s.requires_grad:
            g, = torch.autograd.grad(s.sum(), x, retain_graph=i < n_t - 1, allow_unused=True)
        g = torch.zeros_like(x) if g is None else g
        if g.dtype != torch.float64:
            g = g.float()
        flat = fn(g.reshape((-1,) + tuple(g.shape[2:])))
        maps.append(flat.reshape((g.shape[0], g.shape[1]) + tuple(flat.shape[1:])))
    return maps


def group_sizes(n_inputs: int | None, draws: int, batch_size: int) -> tuple[int, int]:
    """``(draws per group, inputs per draw and step)`` within a batch of ``batch_size`` samples."""
    n = n_inputs if n_inputs is not None else batch_size
    per_draw = max(1, min(n, batch_size))
    group = max(1, min(draws, MAX_GROUP, batch_size // per_draw))
    return group, per_draw


def stacked_maps(mapper: Any, model: nn.Module, params: dict, buffers: dict, x: torch.Tensor, lo: int, hi: int,
                 batch: Any) -> list[tuple[slice, int, int, list[torch.Tensor]]]:
    """Maps of one step: inputs ``lo .. hi - 1`` (``x``, shape ``(K, hi - lo, C, *S)``) for K stacked draws.

    On out-of-memory the inputs are halved (:func:`erf._batch.run_split`, shrinking ``batch``), then
    the draws. Returns ``[(draw slice, a, b, maps (k, b - a, *map) per target), ...]`` in order.
    """
    out: list[tuple[slice, int, int, list[torch.Tensor]]] = []

    def attempt(first: int, last: int) -> None:
        sub = slice(first, last)

        def compute(a: int, b: int) -> list[torch.Tensor]:
            return group_maps(mapper, model, {n: v[sub] for n, v in params.items()},
                              {n: v[sub] for n, v in buffers.items()}, x[sub, a - lo: b - lo])

        try:
            parts = _batch.run_split(compute, lo, hi, mapper.device, batch)
        except Exception as exc:  # out of memory even with one input per draw: split the draws
            if not _batch.is_oom(exc) or last - first < 2:
                raise
            _batch.release(mapper.device)
            mid = first + (last - first) // 2
            attempt(first, mid)
            attempt(mid, last)
            return
        out.extend((sub, a, b, maps) for a, b, maps in parts)

    attempt(0, x.shape[0])
    return out


def plan_stacking(vmap_draws: bool | None, reason: str | None, mapper: Any, model: nn.Module,
                  input_shape: Sequence[int]) -> bool:
    """Whether to stack draws (``torch.func.vmap``) or loop over them.

    ``vmap_draws=None`` stacks on CUDA only; ``True`` forces it where possible (warns when not:
    ``reason`` is :func:`blocker`'s answer for the run). A two-draw trial of ``model`` on a probe input
    checks that vmap runs it and gives the loop's map (``mapper``: the run's planned mapper).
    """
    if vmap_draws is False or (vmap_draws is None and mapper.device.type != "cuda"):
        return False
    if reason is not None:
        if vmap_draws:
            warnings.warn(f"vmap_draws=True: looping over draws instead, because of {reason}", stacklevel=4)
        return False
    params, buffers = stack([model, model])
    gen = torch.Generator().manual_seed(54321)
    x = torch.randn((2, 1) + tuple(input_shape), generator=gen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback-kernel performance warnings
            stacked = group_maps(mapper, model, params, buffers, x)
    except Exception as exc:
        where = _module_at_fault(mapper, model, params, buffers, x)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _loop_instead(f"torch.func.vmap cannot run module {where} ({first})", vmap_draws)
    loop_maps = mapper.maps(model, x[0])  # the plain path's maps of the first trial draw, once
    for m, loop in zip(stacked, loop_maps):
        scale = float(loop.abs().max())
        diff = float((m[0] - loop).abs().max())
        if not math.isfinite(diff) or diff > 1e-4 * max(scale, 1e-30):
            return _loop_instead(f"the vmapped map differs from the loop's by {diff:.3g}", vmap_draws)
    return True


def _loop_instead(reason: str, vmap_draws: bool | None) -> bool:
    """Give up stacking: a warning when it was asked for (``vmap_draws=True``), else a log line."""
    msg = f"weight draws run in a loop: {reason}"
    if vmap_draws:
        warnings.warn(msg, stacklevel=5)
    else:
        log.info("erf: %s", msg)
    return False
