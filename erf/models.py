"""Model specifications of the command line: ``pool:NAME``, ``stack:N``, ``torchvision:NAME``, ...

``parse_model(spec)`` validates a spec and returns a :class:`ModelSpec`; its ``factory(in_channels)``
is a zero-argument callable building a fresh model (so the engine can draw new weights), and
:func:`load_weights` loads a state dict with ``torch.load(weights_only=True)``. Every bad input
raises ``ValueError`` with one line saying what is wrong.

- ``pool:NAME``: :func:`erf.nets.pooling_net` of a downsampling module of ``erf.pooling``.
- ``stack:N`` or ``stack:N:ACT``: ``erf.nets.conv_stack(N)``, 3x3, one channel per layer, no bias,
  linear unless ``ACT`` (relu, tanh, ...) is given; with ``--init ones`` the multinomial theory.
- ``torchvision:NAME`` (random weights, ``torchvision.models.get_model(NAME, weights=None)``).
- ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``; needs the ``timm`` extra).
- ``FILE.py:FACTORY`` and ``package.module:FACTORY``: a callable returning an ``nn.Module``.
- ``SPEC@WEIGHTS``: any of these with a weights file loaded (:mod:`erf.weights`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["ModelSpec", "parse_model", "with_weights", "load_weights", "parse_input_shape", "parse_unit"]


@dataclass(frozen=True)
class ModelSpec:
    """A validated model spec.

    Attributes:
        spec: the text given. kind: pool / stack / torchvision / timm / file / module.
        default_input_shape: a shape that suits the model when the user gives none.
        build: ``build(in_channels) -> nn.Module`` (a fresh model: default initialisation, or the
            weights file of ``SPEC@WEIGHTS`` loaded).
        weights: the weights file of ``SPEC@WEIGHTS`` (``None``: random weights).
    """

    spec: str
    kind: str
    default_input_shape: tuple[int, ...]
    build: Callable[[int], nn.Module]
    weights: str | None = None

    def factory(self, in_channels: int) -> Callable[[], nn.Module]:
        """A zero-argument factory for :func:`erf.effective_rf` (named after the spec)."""
        build = self.build

        def make() -> nn.Module:
            return build(in_channels)

        make.__qualname__ = make.__name__ = self.spec
        return make

    @property
    def slug(self) -> str:
        """The spec as a file-name part: ``pool:max`` -> ``pool-max``; ``timm:resnet18@run/ep10.pth`` ->
        ``timm-resnet18@ep10``."""
        base = self.spec.split("@", 1)[0] if self.weights else self.spec
        text = re.sub(r"[^A-Za-z0-9_.-]+", "-", base.replace(".py:", ":")).strip("-")[:80] or "model"
        if self.weights:
            stem = os.path.basename(self.weights).split(".", 1)[0]
            text += "@" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-")[:40] or "weights")
        return text


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3x64x64"`` (or ``3,64,64``) -> ``(3, 64, 64)``: 2 to 4 positive ints."""
    parts = re.split(r"[x,×]", str(text).strip().lower())
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--input-shape must look like 3x64x64 (C x H x W, 2 to 4 positive ints), got {text!r}") from None
    if not 2 <= len(shape) <= 4 or any(s < 1 for s in shape):
        raise ValueError(f"--input-shape must look like 3x64x64 (C x H x W, 2 to 4 positive ints), got {text!r}")
    return shape


def parse_unit(text: str) -> tuple[int, ...]:
    """``"8,8"`` -> ``(8, 8)`` (negative indices count from the end)."""
    try:
        return tuple(int(p) for p in str(text).replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--unit must be comma-separated ints such as 8,8, got {text!r}") from None


def _pool(name: str) -> ModelSpec:
    from erf.nets import pooling_net
    from erf.pooling import get_entry, list_pools

    try:
        entry = get_entry(name)
    except ValueError:
        raise ValueError(f"unknown pooling module {name!r} in pool:{name}; valid: {', '.join(list_pools(head=False))}") from None
    if entry.head:
        raise ValueError(f"pool:{name} is a head, not a downsampling module; valid: {', '.join(list_pools(head=False))}")
    return ModelSpec(f"pool:{entry.name}", "pool", (3, 128, 128),
                     lambda c: pooling_net(entry.name, in_channels=c))


def _stack(rest: str) -> ModelSpec:
    from erf.nets import ACTIVATIONS, conv_stack

    parts = rest.split(":")
    if not re.fullmatch(r"[0-9]+", parts[0]) or int(parts[0]) < 1 or len(parts) > 2:
        raise ValueError(f"stack spec must be stack:N or stack:N:ACT with N a positive int, got 'stack:{rest}'")
    n = int(parts[0])
    act = parts[1] if len(parts) == 2 else None
    if act is not None and act not in ACTIVATIONS and act not in ("linear", "none"):
        raise ValueError(f"stack activation must be one of {sorted(ACTIVATIONS)} or linear, got {act!r}")
    side = max(32, 2 * (2 * n + 1) + 1)
    return ModelSpec(f"stack:{rest}", "stack", (1, side, side),
                     lambda c: conv_stack(n, act=act, in_channels=c))


def _torchvision(name: str) -> ModelSpec:
    try:
        import torchvision
    except Exception as exc:  # ImportError, or a broken torch/torchvision pair
        raise ValueError(f"torchvision:{name} needs torchvision (pip install 'erf-toolkit[vision]'): {exc}") from None
    names = torchvision.models.list_models()
    if name not in names:
        close = [n for n in names if name.lower() in n][:8]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ValueError(f"unknown torchvision model {name!r}{hint}")
    return ModelSpec(f"torchvision:{name}", "torchvision", (3, 224, 224),
                     lambda c: torchvision.models.get_model(name, weights=None))


def _timm(name: str) -> ModelSpec:
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm:{name} needs timm, which is not installed: pip install 'erf-toolkit[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    return ModelSpec(f"timm:{name}", "timm", (3, 224, 224), lambda c: timm.create_model(name, pretrained=False))


def _call_factory(obj, spec: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    try:
        model = obj()
    except TypeError as exc:  # e.g. a function or class that needs arguments
        raise ValueError(f"{spec}: the factory must be callable with no arguments, but calling it raised "
                         f"TypeError: {exc}") from None
    except SystemExit as exc:  # user code must not end the process (nor pass as a success)
        raise ValueError(f"{spec}: the factory called sys.exit({exc.code!r})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _from_object(obj, spec: str, kind: str) -> ModelSpec:
    if not callable(obj) and not isinstance(obj, nn.Module):
        raise ValueError(f"{spec}: {type(obj).__name__} is neither an nn.Module nor a factory returning one")
    probe = _call_factory(obj, spec)
    shape = tuple(getattr(obj, "input_shape", ()) or ())
    if not shape:
        first = next((m for m in probe.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        dim = 2 if first is None else len(first.kernel_size)
        shape = (first.in_channels if first is not None else 3,) + (64,) * dim
    from erf._copy import safe_deepcopy

    if isinstance(obj, nn.Module):
        return ModelSpec(spec, kind, shape, lambda c: safe_deepcopy(obj))
    return ModelSpec(spec, kind, shape, lambda c: _call_factory(obj, spec))


def _file(path: str, attr: str, spec: str) -> ModelSpec:
    if not os.path.isfile(path):
        raise ValueError(f"model file {path!r} does not exist (spec {spec!r})")
    mod_name = "_erf_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ValueError(f"model file {path!r} has a syntax error at line {exc.lineno}: {exc.msg} "
                         f"(spec {spec!r})") from None
    except SystemExit as exc:
        raise ValueError(f"model file {path!r} called sys.exit({exc.code!r}) while being imported "
                         f"(spec {spec!r})") from None
    except Exception as exc:  # the file's own error, named with the file
        line = ""
        tb = exc.__traceback__
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
                line = f" at line {tb.tb_lineno}"
            tb = tb.tb_next
        raise ValueError(f"model file {path!r} raised {type(exc).__name__}{line} while being imported: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''} (spec {spec!r})") from None
    if not hasattr(module, attr):
        raise ValueError(f"{path!r} defines no {attr!r} (spec {spec!r})")
    return _from_object(getattr(module, attr), spec, "file")


def _module(modname: str, attr: str, spec: str) -> ModelSpec:
    try:
        module = importlib.import_module(modname)
    except ImportError as exc:
        raise ValueError(f"cannot import {modname!r} (spec {spec!r}): {exc}") from None
    if not hasattr(module, attr):
        raise ValueError(f"module {modname!r} has no {attr!r} (spec {spec!r})")
    return _from_object(getattr(module, attr), spec, "module")


_HELP = ("pool:NAME, stack:N[:ACT], torchvision:NAME, timm:NAME, FILE.py:FACTORY or package.module:FACTORY")


def with_weights(spec: ModelSpec, weights: str | os.PathLike, *, arg: str = "weights") -> ModelSpec:
    """``spec`` whose models load ``weights`` (read and unwrapped once, :func:`erf.weights.read_state_dict`;
    each build loads them strictly and carries the report as ``model.erf_weights``)."""
    import copy

    from erf.weights import timm_converters, apply_state_dict, read_state_dict

    state, report = read_state_dict(weights, arg=arg)
    build = spec.build

    def build_loaded(c: int) -> nn.Module:
        model = build(c)
        apply_state_dict(model, state, copy.deepcopy(report), arg=arg, alternatives=timm_converters(model))
        return model

    return ModelSpec(f"{spec.spec}@{os.fspath(weights)}", spec.kind, spec.default_input_shape, build_loaded,
                     weights=os.fspath(weights))


def parse_model(spec: str, weights: str | os.PathLike | None = None) -> ModelSpec:
    """Validate a model spec and return its :class:`ModelSpec` (see the module docstring).

    ``SPEC@WEIGHTS`` (or ``weights=``) loads a weights file into every model the spec builds
    (:func:`erf.weights.load_weights`: ``.pt/.pth/.bin`` or ``.safetensors``, training-checkpoint
    wrappers unwrapped). timm and torchvision models are never downloaded.

    Raises:
        ValueError: an unknown prefix, pooling module, torchvision/timm name, file or factory; a
            missing or unreadable weights file.
    """
    if isinstance(spec, str) and "@" in spec:
        base, _, path = spec.partition("@")
        if not path:
            raise ValueError(f"model spec {spec!r} names no weights file after '@' (SPEC@WEIGHTS)")
        if weights is not None:
            raise ValueError(f"model spec {spec!r} names a weights file and --weights/weights= gives another; "
                             "give one")
        return with_weights(parse_model(base), path, arg=f"{base}@WEIGHTS")
    if weights is not None:
        return with_weights(parse_model(spec), weights)
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"unknown model spec {spec!r}; expected {_HELP}")
    prefix, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"model spec {spec!r} names nothing after {prefix + ':'!r}; expected {_HELP}")
    if prefix == "pool":
        return _pool(rest)
    if prefix == "stack":
        return _stack(rest)
    if prefix == "torchvision":
        return _torchvision(rest)
    if prefix == "timm":
        return _timm(rest)
    head, _, attr = spec.rpartition(":")
    if head.endswith(".py"):
        return _file(head, attr, spec)
    if re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", head) and attr.isidentifier():
        return _module(head, attr, spec)
    raise ValueError(f"unknown model spec {spec!r}; expected {_HELP}")


def load_weights(model: nn.Module, path: str, *, key: str | None = None):
    """Load a weights file into ``model`` (see :func:`erf.weights.load_weights`); returns the
    :class:`erf.weights.WeightsReport` (also kept as ``model.erf_weights``)."""
    from erf.weights import load_weights as _load

    return _load(model, path, key=key)
