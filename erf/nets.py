"""Networks whose receptive fields the toolkit studies.

- :func:`conv_stack`: the plain convolution stacks of Luo et al. (NIPS 2016).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def make_activation(act: str | None) -> nn.Module | None:
    """Return a fresh activation module for a name (``None``/``"none"``/``"linear"`` gives ``None``)."""
    if act is None or act in ("none", "linear", "identity"):
        return None
    if not isinstance(act, str):
        raise TypeError(f"act must be a string or None, got {type(act).__name__}")
    if act not in _ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)} or None, got {act!r}")
    return _ACTIVATIONS[act]()


def conv_stack(n: int, k: int | tuple[int, ...] = 3, width: int = 1, act: str | None = None,
               padding: str | int = "same", bias: bool = False, dim: int = 2,
               in_channels: int | None = None, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """``n`` convolutions of kernel ``k`` with ``width`` channels: the stacks of Luo et al. 2016.

    With ``init="ones"`` and no activation the ERF of the centre unit is the multinomial
    profile (1 + x + ... + x^(k-1))^n per axis; TRF = n (k - 1) + 1.

    Args:
        n: number of convolutions (>= 1).
        k: kernel size, an int or one per spatial axis.
        width: channels of every layer (the input has ``in_channels``, default ``width``).
        act: activation after each conv (``"relu"``, ``"tanh"``, ...) or ``None`` (linear).
        padding: ``"same"`` (keeps the size; needs stride 1), ``"valid"`` or an int.
        bias: whether convs have a bias.
        dim: number of spatial axes (1, 2 or 3).
    Returns:
        ``nn.Sequential`` with children ``conv0, act0, conv1, ...``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if dim not in _CONV:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    ks = (k,) * dim if isinstance(k, int) else tuple(k)
    if len(ks) != dim or any((not isinstance(v, int)) or v < 1 for v in ks):
        raise ValueError(f"k must be a positive int or {dim} positive ints, got {k!r}")
    if padding == "same" and stride != 1:
        padding = tuple((dilation * (v - 1)) // 2 for v in ks)
    layers: list[tuple[str, nn.Module]] = []
    cin = width if in_channels is None else in_channels
    for i in range(n):
        layers.append((f"conv{i}", _CONV[dim](cin, width, ks, stride=stride, padding=padding,
                                              dilation=dilation, bias=bias)))
        a = make_activation(act)
        if a is not None:
            layers.append((f"act{i}", a))
        cin = width
    return nn.Sequential(OrderedDict(layers))
