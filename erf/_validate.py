"""Argument checks for the public boundary.

Every check raises ``ValueError`` or ``TypeError`` whose message starts with the
argument's name and lists the accepted values. Private helpers trust their inputs.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` must be one of ``choices`` (strings)."""
    choices = list(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` must be an int (not bool), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__} {value!r}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float range (10**400)
        raise ValueError(f"{name} must be a positive finite number, got an int of {len(str(value))} digits") from None
    if not (as_float > 0) or value != value or as_float == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return as_float


def check_input_shape(input_shape: Any) -> tuple[int, ...]:
    """``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)`` of positive ints."""
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) and not isinstance(
            input_shape, torch.Size):
        raise TypeError("input_shape must be a tuple (C, L), (C, H, W) or (C, D, H, W) of positive ints, "
                        f"got {type(input_shape).__name__} {input_shape!r}")
    shape = tuple(input_shape)
    if not 2 <= len(shape) <= 4:
        raise ValueError("input_shape must be (C, L), (C, H, W) or (C, D, H, W): 2 to 4 entries, "
                         f"got {len(shape)} in {shape!r}")
    for v in shape:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"input_shape must hold ints, got {shape!r}")
        if v < 1:
            raise ValueError(f"input_shape entries must be positive, got {shape!r}")
    return tuple(int(v) for v in shape)


def check_conv_rank(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """``input_shape`` must have as many spatial axes as some convolution of ``model`` (when it has any).

    (A 2-D conv given a batch of 1-D inputs reads it as one unbatched image and runs without error.)
    """
    dims = sorted({len(m.kernel_size) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)})
    ndim = len(input_shape) - 1
    if dims and ndim not in dims:
        raise ValueError(f"input_shape {tuple(input_shape)} has {ndim} spatial axes but the model's convolutions "
                         f"are {'/'.join(map(str, dims))}-D: give (C, {', '.join('S' * dims[0])})")


def check_index(name: str, value: Any, sizes: Sequence[int]) -> tuple[int, ...]:
    """A spatial index with one int per axis, negative counting from the end; returns it normalised."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and len(sizes) == 1:
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a tuple of {len(sizes)} ints (one per spatial axis), got {value!r}")
    value = tuple(value)
    if len(value) != len(sizes):
        raise ValueError(f"{name} must have {len(sizes)} entries (one per spatial axis of an output of "
                         f"spatial size {tuple(sizes)}), got {value!r}")
    out = []
    for v, n in zip(value, sizes):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {value!r}")
        if not -n <= v < n:
            raise ValueError(f"{name} {value!r} is outside the output of spatial size {tuple(sizes)}")
        out.append(int(v) % n)
    return tuple(out)


def check_channels(channel: Any, n_channels: int) -> list[int] | None:
    """``None``, an int or a list of ints in ``[-n, n)``; returns normalised indices."""
    if channel is None:
        return None
    items = [channel] if isinstance(channel, numbers.Integral) and not isinstance(channel, bool) else channel
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
        raise TypeError(f"channel must be None, an int or a non-empty list of ints, got {channel!r}")
    out = []
    for c in items:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"channel must hold ints, got {channel!r}")
        if not -n_channels <= c < n_channels:
            raise ValueError(f"channel {c} is outside the {n_channels} channels of the unit's output")
        out.append(int(c) % n_channels)
    return out


def resolve_layer(model: nn.Module, layer: Any) -> str:
    """A module path of ``model`` for ``layer`` (a path string or a submodule); ``""`` is the model."""
    if layer is None:
        return ""
    if isinstance(layer, str):
        try:
            model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            hint = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"layer {layer!r} is not a submodule of the model; known paths: {hint}") from None
        return layer
    if isinstance(layer, nn.Module):
        for name, mod in model.named_modules():
            if mod is layer:
                return name
        raise ValueError("layer is a module that is not part of the model")
    raise TypeError(f"layer must be None, a module path string or an nn.Module, got {type(layer).__name__}")


@contextlib.contextmanager
def model_accepts(input_shape: Sequence[int]) -> Iterator[None]:
    """Turns the model's own error on a probe input into one ``ValueError`` naming ``input_shape``
    (a RuntimeError from torch usually means too small an input or the wrong channel count)."""
    try:
        yield
    except (ValueError, TypeError, AssertionError) as exc:  # timm asserts its fixed image size
        raise ValueError(f"input_shape {tuple(input_shape)} is not accepted by the model: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except RuntimeError as exc:
        raise ValueError(f"input_shape {tuple(input_shape)} is not accepted by the model (too small or wrong "
                         f"number of channels?): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
