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
from erf._inputs import GeneratedInputs

log = logging.getLogger("erf")

#: most draws stacked in one group
MAX_GROUP = 64


class _Functional:
    """``module`` called with substituted parameters and buffers, for ``_Run._forward``."""

    def __init__(self, module: nn.Module, params: dict, buffers: dict):
        self.module, self.params, self.buffers = module, params, buffers

    def get_submodule(self, path: str) -> nn.Module:
        return self.module.get_submodule(path)

    def __call__(self, x: torch.Tensor) -> Any:
        return functional_call(self.module, (self.params, self.buffers), (x,))


def _blocker(run: Any) -> str | None:
    """Why this run cannot stack its draws, or ``None``."""
    if run.train_mode:
        return "train_mode=True (stochastic modules draw keyed noise per draw)"
    if run.method != "gradient":
        return f"method={run.method!r}"
    if run.checkpoint is not None:
        return "checkpoint=... (checkpoints are per draw)"
    if run.until_stderr is not None:
        return "until_stderr=... (the stopping rule is checked per draw)"
    if run.draws < 2:
        return "draws=1"
    return None


def _module_at_fault(run: Any, params: dict, buffers: dict, x: torch.Tensor) -> str:
    """Rerun the failing trial with hooks and name the innermost module that was running."""
    stack: list[str] = []
    culprit = [type(run.model0).__name__]
    handles = []
    for name, m in run.model0.named_modules():
        label = f"{name} ({type(m).__name__})" if name else type(m).__name__

        def pre(_m, _i, label=label):
            stack.append(label)

        def post(_m, _i, _o):
            if stack:
                stack.pop()

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        group_maps(run, params, buffers, x)
    except Exception:
        if stack:
            culprit[0] = stack[-1]
    finally:
        for h in handles:
            h.remove()
    return culprit[0]


def _group_scalars(run: Any, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """Unit values ``(K, T, B)`` of every stacked draw, target and input (a vmapped forward)."""
    targets = run.crop_plan.targets if run.crop_plan is not None else run.targets

    def unit(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        outs = run._forward(_Functional(run.model0, p, b), xb, stop=True)
        return torch.stack([t.scalar(outs[t.layer]).float() for t in targets])

    return vmap(unit, in_dims=(0, 0, 0), randomness="different")(params, buffers, x)


def group_maps(run: Any, params: dict, buffers: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Reduced maps ``(K, B, *map)`` per target for stacked draws and inputs ``x`` ``(K, B, C, *S)``."""
    x = x.to(run.device, dtype=torch.float64 if run.dtype == torch.float64 else torch.float32, non_blocking=True)
    if run.crop_plan is not None:
        x = x[(slice(None),) * 3 + run.crop_plan.window]
    x = x.contiguous()
    x.requires_grad_(True)
    with torch.enable_grad(), run._autocast():
        scalars = _group_scalars(run, params, buffers, x)
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
        flat = run.reduce_fn(g.reshape((-1,) + tuple(g.shape[2:])))
        maps.append(flat.reshape((g.shape[0], g.shape[1]) + tuple(flat.shape[1:])))
    return maps


class DrawStacker:
    """Runs a run's draws in stacked groups; ``handle(draw, bar)`` is called by the draw loop."""

    def __init__(self, run: Any):
        self.run = run
        self.done_until = -1

    def sizes(self) -> tuple[int, int]:
        """``(draws per group, inputs per draw and step)`` within ``run.batch_size_used``."""
        run = self.run
        n = run.source.n if run.source.n is not None else run.batch_size_used
        per_draw = max(1, min(n, run.batch_size_used))
        group = max(1, min(run.draws, MAX_GROUP, run.batch_size_used // per_draw))
        return group, per_draw

    def handle(self, draw: int, bar: Any) -> bool:
        """Process the group starting at ``draw``; True when ``draw`` was (or now is) done here."""
        run = self.run
        if draw < self.done_until:
            return True
        end = run.first_draw + run.draws
        group, per_draw = self.sizes()
        draws = list(range(draw, min(draw + group, end)))
        if len(draws) < 2:
            return False
        models = [run.model0 if d == run.first_draw else run._prepare(run.maker.build(d)) for d in draws]
        params, buffers = stack_module_state(models)
        del models
        params = {k: v.detach() for k, v in params.items()}
        buffers = {k: v.detach() for k, v in buffers.items()}
        self._run_group(draws, params, buffers, per_draw, bar)
        self.done_until = draws[-1] + 1
        return True

    def _run_group(self, draws: Sequence[int], params: dict, buffers: dict, per_draw: int, bar: Any) -> None:
        run = self.run
        source = run.source
        k = len(draws)
        if getattr(source, "random_access", False) and source.n is not None:
            keyed = isinstance(source, GeneratedInputs)  # other sources give every draw the same inputs
            for lo in range(0, source.n, per_draw):
                hi = min(lo + per_draw, source.n)
                if keyed:
                    get = lambda a, b: torch.stack([source.get(d, a, b) for d in draws])  # noqa: E731
                else:
                    get = lambda a, b: source.get(draws[0], a, b).unsqueeze(0).expand((k,) + (-1,) * (1 + len(run.input_shape)))  # noqa: E731,E501
                self._step(draws, params, buffers, lo, hi, get, bar)
            return
        seen = 0
        for xb in source.batches():
            lo_b = seen
            seen += xb.shape[0]
            for lo in range(lo_b, seen, per_draw):
                hi = min(lo + per_draw, seen)
                get = lambda a, b, xb=xb, o=lo_b: xb[a - o: b - o].unsqueeze(0).expand(  # noqa: E731
                    (k,) + (-1,) * (1 + len(run.input_shape)))
                self._step(draws, params, buffers, lo, hi, get, bar)

    def _step(self, draws: Sequence[int], params: dict, buffers: dict, lo: int, hi: int, get: Any,
              bar: Any) -> None:
        """One range of inputs for every draw of the group; halves inputs, then draws, on out-of-memory."""
        run = self.run

        def attempt(first: int, last: int) -> None:
            sub = slice(first, last)

            def compute(a: int, b: int) -> list[torch.Tensor]:
                return group_maps(run, {n: v[sub] for n, v in params.items()},
                                  {n: v[sub] for n, v in buffers.items()}, get(a, b)[sub])

            try:
                parts = _batch.run_split(compute, lo, hi, run)
            except Exception as exc:  # out of memory even with one input per draw: split the draws
                if not _batch.is_oom(exc) or last - first < 2:
                    raise
                _batch.release(run.device)
                mid = first + (last - first) // 2
                attempt(first, mid)
                attempt(mid, last)
                return
            for a, b, maps in parts:
                self._accumulate(maps, draws[sub], a, b)

        attempt(0, len(draws))
        bar.update(len(draws) * (hi - lo))

    def _accumulate(self, maps: list[torch.Tensor], draws: Sequence[int], lo: int, hi: int) -> None:
        run = self.run
        flat = [m.reshape((-1,) + tuple(m.shape[2:])) for m in maps]
        finite = all(bool(torch.isfinite(f).all()) for f in flat)
        if finite:
            window = run.crop_plan.window if run.crop_plan is not None else None
            for st, f in zip(run.stats, flat):
                st.update(f, window=window)
            return
        for k, d in enumerate(draws):  # the engine's own check names the draw and samples
            run._accumulate([m[k] for m in maps], d, lo, hi)


def plan_stacking(run: Any, vmap_draws: bool | None) -> DrawStacker | None:
    """A :class:`DrawStacker` when draws should be stacked, else ``None`` (the loop).

    ``vmap_draws=None`` stacks on CUDA only; ``True`` forces it where possible (warns when not).
    A two-draw trial on the probe input checks that vmap runs the model and gives the loop's map.
    """
    if vmap_draws is False or (vmap_draws is None and run.device.type != "cuda"):
        return None
    reason = _blocker(run)
    if reason is not None:
        if vmap_draws:
            warnings.warn(f"vmap_draws=True: looping over draws instead, because of {reason}", stacklevel=4)
        return None
    models = [run.model0, run.model0]
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in buffers.items()}
    gen = torch.Generator().manual_seed(54321)
    x = torch.randn((2, 1) + tuple(run.input_shape), generator=gen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback-kernel performance warnings
            stacked = group_maps(run, params, buffers, x)
    except Exception as exc:
        where = _module_at_fault(run, params, buffers, x)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _loop_instead(f"torch.func.vmap cannot run module {where} ({first})", vmap_draws)
    loop_maps = run._maps(run.model0, x[0])  # the plain path's maps of the first trial draw, once
    for m, loop in zip(stacked, loop_maps):
        scale = float(loop.abs().max())
        diff = float((m[0] - loop).abs().max())
        if not math.isfinite(diff) or diff > 1e-4 * max(scale, 1e-30):
            return _loop_instead(f"the vmapped map differs from the loop's by {diff:.3g}", vmap_draws)
    return DrawStacker(run)


def _loop_instead(reason: str, vmap_draws: bool | None) -> None:
    """Give up stacking: a warning when it was asked for (``vmap_draws=True``), else a log line."""
    msg = f"weight draws run in a loop: {reason}"
    if vmap_draws:
        warnings.warn(msg, stacklevel=5)
    else:
        log.info("erf: %s", msg)
    return None
