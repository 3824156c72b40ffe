"""Per-sample maps of a batch: the computation every stage shares (probe, plans, the work loop).

For a batch ``x``, one forward pass stopped at the targets' layers and one
``torch.autograd.grad(unit(x).sum(), x)`` per target give every sample's input gradient ``g``,
reduced over channels (``mean``: sum_c g, ``abs``: sum_c |g|, ``square``: sum_c g^2, ``relu``:
sum_c max(g, 0), ``relu_of_mean``: max(mean_c g, 0)); captum methods replace the plain gradient (Luo et al. 2016, NIPS).

A :class:`Mapper` is built at setup (targets, device, dtype, method) and gets the plan's crop and
memory layout with :meth:`Mapper.with_plan`; it never changes after that.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from erf._fold import fold_batchnorms
from erf._integrity import OverflowGuard

LOW_PRECISION = (torch.bfloat16, torch.float16)


class _StopForward(Exception):
    """Raised by a hook once every target layer has produced its output."""


def reduce_fn(reduce: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The channel reduction of a gradient ``(B, C, *S) -> (B, *S)``."""
    if reduce == "mean":
        return lambda g: g.sum(1)
    if reduce == "abs":
        return lambda g: g.abs().sum(1)
    if reduce == "square":
        return lambda g: (g * g).sum(1)
    if reduce == "relu_of_mean":  # OpenERF: max(mean_c g, 0)
        return lambda g: torch.relu(g.mean(1))
    return lambda g: torch.relu(g).sum(1)


def _clone_tensors(out: Any) -> Any:
    """``out`` with its tensors cloned (a tensor, or a tuple/list/dict of them)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_tensors(o) for o in out) if type(out) in (tuple, list) else out
    if isinstance(out, dict):
        return {k: _clone_tensors(v) for k, v in out.items()}
    return out


def freeze(model: nn.Module) -> None:
    """No parameter needs a gradient: autograd then saves nothing for weight gradients."""
    for p in model.parameters():
        if not isinstance(p, nn.parameter.UninitializedParameter):
            p.requires_grad_(False)


def prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, train_mode: bool,
            fold: Sequence[tuple[str, str]] = (), channels_last: bool = False) -> nn.Module:
    """A built draw ready to run: on ``device``, float64 when asked, train/eval mode, frozen, folded."""
    model = model.to(device)
    if dtype == torch.float64:
        model = model.double()
    else:  # float16/bfloat16/float64 parameters run in float32 (low precision through autocast)
        kinds = {p.dtype for p in list(model.parameters()) + list(model.buffers()) if p.is_floating_point()}
        if kinds - {torch.float32}:
            warnings.warn(f"the model's parameters are {', '.join(sorted(str(k) for k in kinds))}: the run casts "
                          f"its copy to float32 (dtype={str(dtype).replace('torch.', '')}); pass dtype=torch.float64 "
                          "to measure a float64 model in float64", stacklevel=5)
            model = model.float()
    model.train(train_mode)
    freeze(model)
    if fold:
        fold_batchnorms(model, list(fold))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype inputs are cast to: float64 for float64 runs, else float32 (autocast lowers it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Mapper:
    """How a batch becomes per-sample maps for every target.

    Attributes:
        paths: the targets' layer paths (``""``: the model output); targets: the resolved targets.
        device, dtype, method, reduce, train_mode: from the options (device after process-group setup).
        crop: the plan's :class:`erf._crop.CropPlan` or ``None``; channels_last: the plan's layout;
        fold: the plan's BatchNorm folding pairs (applied by :meth:`prepare` to every new draw).
    """

    paths: tuple[str, ...]
    targets: tuple[Any, ...]
    device: torch.device
    dtype: torch.dtype
    method: str
    reduce: str
    train_mode: bool
    crop: Any = None
    channels_last: bool = False
    fold: tuple[tuple[str, str], ...] = ()

    def with_plan(self, *, crop: Any = None, channels_last: bool = False,
                  fold: Sequence[tuple[str, str]] = ()) -> "Mapper":
        """The same mapper following a plan's crop, layout and folding."""
        return dataclasses.replace(self, crop=crop, channels_last=channels_last, fold=tuple(fold))

    @property
    def unit_targets(self) -> tuple[Any, ...]:
        """The targets as the network sees them (units moved into the crop when cropping)."""
        return tuple(self.crop.targets) if self.crop is not None else self.targets

    @property
    def reduce_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return reduce_fn(self.reduce)

    def prepare(self, model: nn.Module) -> nn.Module:
        """A freshly built draw ready to run (:func:`prepare` with this mapper's plan)."""
        return prepare(model, self.device, self.dtype, self.train_mode, self.fold, self.channels_last)

    def autocast(self):
        """Autocast to the run's low precision dtype, or off."""
        if self.dtype in LOW_PRECISION:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return torch.autocast(self.device.type, enabled=False)

    def forward(self, model: Any, x: torch.Tensor, stop: bool = True) -> dict[str, Any]:
        """Outputs of the target layers for ``x``; with ``stop`` the forward ends at the last one."""
        outs: dict[str, Any] = {}
        wanted = [p for p in self.paths if p]
        handles = []

        def make_hook(path):
            def hook(_m, _i, out):
                outs[path] = out
                if stop and len(outs) == len(wanted) and "" not in self.paths:
                    raise _StopForward
                # the forward goes on: later in-place ops (ResNet's ``out += identity``, inplace ReLU)
                # must not change the value read here (clone is differentiable)
                outs[path] = _clone_tensors(out)
            return hook

        for p in wanted:
            handles.append(model.get_submodule(p).register_forward_hook(make_hook(p)))
        try:
            result = model(x)
            if "" in self.paths:
                outs[""] = result
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return outs

    def maps(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Reduced maps ``(B, *map)`` of every target for a batch ``x`` (cropped when planned)."""
        if self.crop is not None:
            x = self.crop.crop(x)
        x = x.to(self.device, dtype=compute_dtype(self.dtype), non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.method != "gradient":
            return self._captum_maps(model, x)
        x.requires_grad_(True)
        x_leaf = x
        if getattr(self, "clone_input", False):  # the model modifies its input in place (ReLU(inplace=True))
            x = x.clone()
        fn = self.reduce_fn
        low = self.dtype in LOW_PRECISION  # activations that overflow are caught, not averaged
        with torch.enable_grad(), self.autocast(), \
                (OverflowGuard(model, x.shape[0], x.device) if low else contextlib.nullcontext()) as guard:
            try:
                outs = self.forward(model, x, stop=True)
            except RuntimeError as exc:
                if "in-place operation" not in str(exc) or x is not x_leaf:
                    raise
                object.__setattr__(self, "clone_input", True)  # once: from now on the model gets a copy
                x = x_leaf.clone()
                outs = self.forward(model, x, stop=True)
            values = [t.scalar(outs[t.layer]) for t in self.unit_targets]
            scalars = [(v.float() if v.dtype in LOW_PRECISION else v).sum() for v in values]
        bad = ~torch.stack([torch.isfinite(v) for v in values]).all(0)  # the unit's value itself (no sync here)
        if guard is not None:
            bad |= guard.bad
        maps = []
        for i, s in enumerate(scalars):
            if not s.requires_grad:
                g = torch.zeros_like(x)
            else:
                g, = torch.autograd.grad(s, x_leaf, retain_graph=i < len(scalars) - 1, allow_unused=True)
                if g is None:
                    g = torch.zeros_like(x)
            m = fn(g.float() if g.dtype in LOW_PRECISION else g)
            maps.append(m.masked_fill_(bad.view((-1,) + (1,) * (m.dim() - 1)), float("nan")))
        return maps

    def _captum_maps(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop, NeuronIntegratedGradients

        cls = {"guided_backprop": NeuronGuidedBackprop, "deconvolution": NeuronDeconvolution,
               "integrated_gradients": NeuronIntegratedGradients}[self.method]
        fn = self.reduce_fn
        maps = []
        for t in self.targets:
            layer_module = model.get_submodule(t.layer) if t.layer else model
            algo = cls(model, layer_module)
            with self.autocast(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.method == "integrated_gradients":
                    a = algo.attribute(x, neuron_selector=t.scalar, baselines=torch.zeros_like(x),
                                       n_steps=16, internal_batch_size=x.shape[0])
                else:
                    a = algo.attribute(x, neuron_selector=t.scalar)
            maps.append(fn(a.detach()))
        return maps
