"""An independent, slow reference for the ERF engine, written from the definitions.

Nothing here imports from ``erf``: one sample at a time, the model (a float64 deep copy in eval
mode) runs forward in full, the unit's value is read off the layer output by hand (``select``,
token ``grid``, unit index with negative indices, channel selection, ``unit_relu``),
``torch.autograd.grad`` gives that sample's input gradient g (shape ``(C_in, *S)``), and g is
reduced channel by channel with an explicit loop:

    mean: sum_c g_c      abs: sum_c |g_c|      square: sum_c g_c^2      relu: sum_c max(g_c, 0)
    relu_of_mean (OpenERF): max((1/C) sum_c g_c, 0)

The map is the arithmetic mean of the per-sample maps, its standard error the sample standard
deviation over sqrt(n) (two passes). Luo et al. 2016, https://arxiv.org/abs/1701.04128.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

REDUCES = ("mean", "abs", "square", "relu", "relu_of_mean")


def prepare(model: nn.Module) -> nn.Module:
    """A float64 deep copy in eval mode whose parameters need no gradient."""
    ref = copy.deepcopy(model).double().eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def layer_output(model: nn.Module, x: torch.Tensor, layer: str | None) -> Any:
    """The output of module ``layer`` (dotted path; ``None``: the model) for input ``x``."""
    if not layer:
        return model(x)
    module = model.get_submodule(layer)
    seen = []  # a clone: later in-place ops (ResNet's ``out += identity``, inplace ReLU) must not change it
    handle = module.register_forward_hook(
        lambda _m, _i, out: seen.append(out.clone() if isinstance(out, torch.Tensor) else out))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def _feature_vector(out: torch.Tensor, grid: Sequence[int] | None, unit: Sequence[int] | None) -> torch.Tensor:
    """The channel vector of one sample's output at ``unit`` (``out`` has batch size 1)."""
    if grid is not None:
        h, w = grid
        tokens = out[0]                       # (L, D)
        first = tokens.shape[0] - h * w       # leading class/register tokens are dropped
        r, c = (h // 2, w // 2) if unit is None else unit
        r, c = r % h, c % w
        return tokens[first + r * w + c]      # token r*w+c of the grid, row-major
    fmap = out[0]                              # (C, *S)
    spatial = fmap.shape[1:]
    u = tuple(s // 2 for s in spatial) if unit is None else tuple(int(i) % s for i, s in zip(unit, spatial))
    vec = fmap
    for i in u:                                # index one spatial axis at a time
        vec = vec[:, i]
    return vec


def unit_value(out: Any, *, select: Callable | None = None, grid: Sequence[int] | None = None,
               unit: Sequence[int] | None = None, channel: int | Sequence[int] | None = None,
               unit_relu: bool = False) -> torch.Tensor:
    """The scalar value of the unit: the sum over the selected channels (after ReLU if asked)."""
    if select is not None:
        out = select(out)
    vec = _feature_vector(out, grid, unit)
    chans = range(vec.shape[0]) if channel is None else ([channel] if isinstance(channel, int) else channel)
    total = torch.zeros((), dtype=vec.dtype)
    for c in chans:
        v = vec[c]
        total = total + (torch.clamp(v, min=0.0) if unit_relu else v)
    return total


def reduce_channels(g: torch.Tensor, reduce: str) -> torch.Tensor:
    """One sample's gradient ``(C_in, *S)`` reduced to a map ``S`` by a loop over input channels."""
    m = torch.zeros_like(g[0])
    for c in range(g.shape[0]):
        gc = g[c]
        if reduce == "mean":
            m = m + gc
        elif reduce == "abs":
            m = m + gc.abs()
        elif reduce == "square":
            m = m + gc * gc
        elif reduce == "relu":
            m = m + torch.where(gc > 0, gc, torch.zeros_like(gc))
        elif reduce == "relu_of_mean":
            m = m + gc / g.shape[0]
        else:
            raise ValueError(reduce)
    if reduce == "relu_of_mean":
        m = torch.where(m > 0, m, torch.zeros_like(m))
    return m


def gradients(model: nn.Module, x: torch.Tensor, *, layer: str | None = None, **target) -> list[torch.Tensor]:
    """Per-sample input gradients of the unit, one ``(C_in, *S)`` tensor per row of ``x``."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach().clone().double().requires_grad_(True)
        value = unit_value(layer_output(model, xi, layer), **target)
        if value.requires_grad:
            g, = torch.autograd.grad(value, xi, allow_unused=True)
        else:
            g = None
        out.append(torch.zeros_like(xi[0]) if g is None else g[0].detach())
    return out


def maps_of(grads: Sequence[torch.Tensor], reduce: str) -> np.ndarray:
    """Stack of the per-sample reduced maps, float64 ndarray ``(n, *S)``."""
    return np.stack([reduce_channels(g, reduce).numpy() for g in grads]).astype(np.float64)


def mean_and_stderr(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass mean and standard error of the mean over axis 0."""
    n = maps.shape[0]
    mean = maps.sum(0) / n
    var = ((maps - mean) ** 2).sum(0) / (n - 1)
    return mean, np.sqrt(var / n)


def assert_maps_equal(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-9) -> None:
    """Equal to float64 rounding: relative to each value and to the map's scale."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max())
    assert scale > 0, "the reference map is all zeros: the test would not see a wrong map"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
