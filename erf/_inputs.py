"""Where the inputs of a run come from.

``"gaussian"`` N(0, 1) and ``"uniform"`` U(0, 1) inputs are generated in blocks of 32 keyed
by ``(seed, draw, block)``, ``"images:DIR|LIST.txt|GLOB"`` reads the first ``n_inputs`` readable
image files (:mod:`erf._images`: order, preprocessing, unreadable files), a Tensor
``(N, *input_shape)`` is used whole, and any re-iterable of batches (a DataLoader; ``(x, y)``
pairs accepted) is streamed.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import torch

from erf._rng import BLOCK, generator

from erf._images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, ImageInputs  # noqa: F401 - re-exported


class InputSource:
    """Random access to the inputs of each draw: ``get(draw, start, stop)``."""

    n: int
    random_access = True

    def get(self, draw: int, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class GeneratedInputs(InputSource):
    """N(0,1) or U(0,1) inputs keyed by ``(seed, draw, block)``; independent of the batch size."""

    def __init__(self, kind: str, n: int, shape: tuple[int, ...], seed: int):
        self.kind, self.n, self.shape, self.seed = kind, n, shape, seed
        self._cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def _block(self, draw: int, block: int) -> torch.Tensor:
        key = (draw, block)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        g = generator(self.seed, "inputs", draw, block)
        size = (BLOCK,) + self.shape
        x = torch.randn(size, generator=g) if self.kind == "gaussian" else torch.rand(size, generator=g)
        self._cache = (key, x)
        return x

    def get(self, draw: int, start: int, stop: int) -> torch.Tensor:
        parts = []
        i = start
        while i < stop:
            b = i // BLOCK
            hi = min(stop, (b + 1) * BLOCK)
            parts.append(self._block(draw, b)[i - b * BLOCK: hi - b * BLOCK])
            i = hi
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def describe(self) -> str:
        return self.kind


class TensorInputs(InputSource):
    """A given tensor ``(N, *input_shape)``, the same for every draw."""

    def __init__(self, x: torch.Tensor):
        self.x = x.detach()
        self.n = x.shape[0]

    def get(self, draw: int, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop]

    def describe(self) -> str:
        return f"tensor{tuple(self.x.shape)}"



class IterableInputs:
    """A re-iterable of batches (``x`` or ``(x, y)``), streamed once per draw."""

    random_access = False

    def __init__(self, iterable: Any, shape: tuple[int, ...]):
        self.iterable, self.shape = iterable, shape
        try:
            self.n = len(iterable.dataset)  # DataLoader
        except (AttributeError, TypeError):
            self.n = None

    def batches(self) -> Iterator[torch.Tensor]:
        for item in self.iterable:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"inputs: batches must be tensors or (x, y) pairs, got {type(x).__name__}")
            if tuple(x.shape[1:]) != self.shape:
                raise ValueError(f"inputs: a batch has shape {tuple(x.shape)}, expected (N, *{self.shape})")
            yield x

    def describe(self) -> str:
        return type(self.iterable).__name__


def make_source(inputs: Any, n_inputs: int, shape: tuple[int, ...], seed: int, draws: int,
                preprocess: Any = None):
    """Validate ``inputs`` and return an input source (see module docstring).

    ``preprocess`` (images only): see :func:`erf._images.resolve_preprocess`.
    """
    if preprocess is not None and not (isinstance(inputs, str) and inputs.startswith("images:")):
        raise ValueError("preprocess applies to inputs='images:...' only; pass images or drop preprocess")
    if isinstance(inputs, str):
        if inputs in ("gaussian", "uniform"):
            return GeneratedInputs(inputs, n_inputs, shape, seed)
        if inputs.startswith("images:"):
            return ImageInputs(inputs[len("images:"):], shape, n_inputs, preprocess)
        raise ValueError(f"inputs must be 'gaussian', 'uniform', 'images:DIR', a Tensor or an iterable "
                         f"of batches, got {inputs!r}")
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != len(shape) + 1 or tuple(inputs.shape[1:]) != shape:
            raise ValueError(f"inputs tensor must have shape (N, *{shape}), got {tuple(inputs.shape)}")
        if inputs.shape[0] == 0:
            raise ValueError("inputs tensor is empty (N = 0)")
        if not torch.is_floating_point(inputs):
            raise TypeError(f"inputs tensor must be floating point, got {inputs.dtype}")
        if not bool(torch.isfinite(inputs).all()):
            raise ValueError("inputs tensor holds NaN or Inf values; pass finite inputs")
        return TensorInputs(inputs)
    if hasattr(inputs, "__iter__") and not isinstance(inputs, (bytes, dict)):
        if iter(inputs) is inputs and draws > 1:
            raise ValueError("inputs is a one-shot iterator but draws > 1 needs to read it once per draw: "
                             "pass a re-iterable (a list or a DataLoader)")
        return IterableInputs(inputs, shape)
    raise TypeError(f"inputs must be 'gaussian', 'uniform', 'images:DIR', a Tensor or an iterable of "
                    f"batches, got {type(inputs).__name__}")
