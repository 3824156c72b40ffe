"""Random weight draws: how draw ``d`` of a run initialises its copy of the model.

- ``"default"``: a factory is called under the draw's seed (the model's own
  initialisation); a module gets ``reset_parameters()`` of every submodule under the
  draw's seed. With ``draws=1`` and a module the given weights are used as they are.
- ``"ones"``: weights of convolution and linear layers 1, biases 0 (Luo et al.'s uniform case).
- ``"normal"``: those weights N(0, 1/fan_in), biases 0.
- ``"kaiming_all"``: those weights He-normal N(0, 2/fan_in), biases 0, and every scale that may
  start at zero or at a constant drawn from U(0.5, 1.5): normalisation weights (BatchNorm,
  GroupNorm, LayerNorm, InstanceNorm) and layer-scale parameters (``gamma``, ``ls1.gamma``,
  ``layer_scale``, ``skipinit_gain``). timm zero-initialises the last BatchNorm of every ResNet
  block and starts ConvNeXt's layer scale at 1e-6, so with ``"default"`` weights residual branches
  add nothing (see :mod:`erf._degenerate`); this mode gives every branch a share.
- a callable ``(module, generator) -> None`` applied to every submodule (like ``Module.apply``).
Modules of :mod:`erf.pooling` and normalisation layers keep their own initialisation under
``"ones"`` and ``"normal"``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from erf._copy import check_script, match_dtype, safe_deepcopy, wrap_script
from erf._rng import generator, key_seed

INITS = ("default", "ones", "normal", "kaiming_all")
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)



def _is_pooling(module: nn.Module) -> bool:
    return type(module).__module__.startswith("erf.pooling")


def inside_pooling(model: nn.Module) -> set[int]:
    """ids of modules that live inside an erf.pooling module (e.g. LIP's logit conv)."""
    inside: set[int] = set()
    for m in model.modules():
        if _is_pooling(m):
            inside.update(id(c) for c in m.modules())
    return inside


def set_uniform_weights(model: nn.Module, value: float = 1.0) -> None:
    """Conv/linear weights ``value``, biases 0 (outside erf.pooling modules)."""
    skip = inside_pooling(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _WEIGHTED) and id(m) not in skip:
                m.weight.fill_(value)
                if m.bias is not None:
                    m.bias.zero_()


def set_normal_weights(model: nn.Module, gen: torch.Generator) -> None:
    """Conv/linear weights N(0, 1/fan_in), biases 0 (outside erf.pooling modules)."""
    skip = inside_pooling(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _WEIGHTED) and id(m) not in skip:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                w = torch.randn(m.weight.shape, generator=gen, dtype=torch.float32)
                m.weight.copy_(w / math.sqrt(max(fan_in, 1)))
                if m.bias is not None:
                    m.bias.zero_()


def set_kaiming_all(model: nn.Module, gen: torch.Generator) -> None:
    """``init="kaiming_all"``: He-normal conv/linear weights, zero biases, scales ~ U(0.5, 1.5).

    He et al., "Delving Deep into Rectifiers", ICCV 2015 (std sqrt(2 / fan_in)). Modules of
    erf.pooling keep their own initialisation.
    """
    from erf._degenerate import scale_params

    skip = inside_pooling(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _WEIGHTED) and id(m) not in skip and \
                    not isinstance(m.weight, nn.parameter.UninitializedParameter):
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                w = torch.randn(m.weight.shape, generator=gen, dtype=torch.float32)
                m.weight.copy_(w * math.sqrt(2.0 / max(fan_in, 1)))
                if m.bias is not None:
                    m.bias.zero_()
        inside = {name for name, m in model.named_modules() if id(m) in skip}
        for path, _pname, p, _kind in list(scale_params(model)):
            if path in inside:
                continue
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float32))


class DrawMaker:
    """Builds the model of each draw on the host, deterministically from ``(seed, draw)``."""

    def __init__(self, model: nn.Module | Callable[[], nn.Module], init: Any, seed: int, draws: int,
                 input_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32):
        self.is_factory = not isinstance(model, nn.Module)
        self.model, self.init, self.seed, self.draws = model, init, seed, draws
        self.input_shape, self.dtype = input_shape, dtype
        self.notes: list[str] = []  # what was done to the copies (dtype cast), for the result's meta
        check_script(model, init, draws)
        if not self.is_factory:
            self.template = safe_deepcopy(model)  # the caller's model is never touched

    @property
    def reinitialises(self) -> bool:
        return self.is_factory or self.init != "default" or self.draws > 1

    def build(self, draw: int) -> nn.Module:
        """The model of draw ``draw`` (a fresh module on the CPU)."""
        s = key_seed(self.seed, "weights", draw)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            if self.is_factory:
                try:
                    model = self.model()
                except SystemExit as exc:  # user code must not end the process (nor pass as a success)
                    raise ValueError(f"model factory called sys.exit({exc.code!r})") from None
                if not isinstance(model, nn.Module):
                    raise TypeError(f"model factory must return an nn.Module, got {type(model).__name__}")
                if isinstance(model, torch.jit.ScriptModule):
                    check_script(model, self.init, 1 if self.init == "default" else 2)
                    model = wrap_script(model)
            else:
                model = safe_deepcopy(self.template)
                if self.init == "default" and self.draws > 1:
                    for m in model.modules():
                        reset = getattr(m, "reset_parameters", None)
                        if callable(reset):
                            reset()
        note = match_dtype(model, self.dtype)
        if note and note not in self.notes:
            self.notes.append(note)
        if self.init != "default" and self.input_shape is not None and any(
                isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
            with torch.no_grad():  # lazy modules: materialise their parameters before initialising them
                model(torch.zeros((1,) + tuple(self.input_shape)))
        if self.init == "ones":
            set_uniform_weights(model)
        elif self.init == "normal":
            set_normal_weights(model, generator(self.seed, "normal", draw))
        elif self.init == "kaiming_all":
            set_kaiming_all(model, generator(self.seed, "kaiming_all", draw))
        elif callable(self.init):
            g = generator(self.seed, "init", draw)
            for m in model.modules():
                self.init(m, g)
        return model


def describe_init(init: Any) -> str:
    if isinstance(init, str):
        return init
    return getattr(init, "__qualname__", type(init).__name__)
