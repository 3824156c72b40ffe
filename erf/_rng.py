"""Keyed random streams.

Every random stream of a run (weights of a draw, generated inputs, stochastic modules)
is keyed by ``(seed, draw index, block of 32 inputs)`` so results do not depend on the
batch size, the device, or how the work is split across processes.

Stochastic modules (``erf.pooling``) draw their noise with :func:`rand` / :func:`randint`
/ :func:`randperm`: inside :func:`use_generator` (which the engine enters once per block)
they use the engine's CPU generator, so the same seed gives the same samples on CPU and GPU;
outside it they fall back to torch's global RNG.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Iterator

import torch

BLOCK = 32  #: inputs per random block

_CURRENT: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "erf_generator", default=None)
#: (offset, batch size, block size) of the batch being run inside its block of inputs
_SLICE: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("erf_slice", default=None)


@contextlib.contextmanager
def batch_slice(offset: int, n: int, block: int) -> Iterator[None]:
    """Inputs ``offset .. offset+n-1`` of a block of ``block`` inputs run as one batch: per-sample noise
    (``rand(..., batch=True)``) is drawn for the whole block and sliced, so a block split across
    batches gets the noise it gets as one batch."""
    token = _SLICE.set((offset, n, block))
    try:
        yield
    finally:
        _SLICE.reset(token)


def key_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs, platforms and Python hashes)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with ``key_seed(*parts)``."""
    g = torch.Generator()
    g.manual_seed(key_seed(*parts))
    return g


@contextlib.contextmanager
def use_generator(gen: torch.Generator | None) -> Iterator[torch.Generator | None]:
    """Make ``gen`` the generator of stochastic modules inside the ``with`` block."""
    token = _CURRENT.set(gen)
    try:
        yield gen
    finally:
        _CURRENT.reset(token)


def current_generator() -> torch.Generator | None:
    """The generator set by :func:`use_generator`, or ``None`` (torch's global RNG)."""
    return _CURRENT.get()


def rand(*shape: int, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32, batch: bool = False) -> torch.Tensor:
    """U(0, 1) samples from the current keyed stream, on ``device``.

    ``batch=True``: the first axis is the batch; inside :func:`batch_slice` the samples of the whole
    block are drawn and this batch's rows returned (independent of how the block is split)."""
    g = _CURRENT.get()
    if g is None:
        return torch.rand(*shape, device=device, dtype=dtype)
    sl = _SLICE.get()
    if batch and sl is not None and shape and shape[0] == sl[1] and sl[2] > sl[1]:
        full = torch.rand(sl[2], *shape[1:], generator=g, dtype=dtype)
        return full[sl[0]: sl[0] + sl[1]].to(device)
    return torch.rand(*shape, generator=g, dtype=dtype).to(device)


def randint(high: int, shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """Integers in ``[0, high)`` from the current keyed stream, on ``device``."""
    g = _CURRENT.get()
    if g is None:
        return torch.randint(high, shape, device=device)
    return torch.randint(high, shape, generator=g).to(device)


def randperm(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of ``0..n-1`` from the current keyed stream, on ``device``."""
    g = _CURRENT.get()
    if g is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=g).to(device)
