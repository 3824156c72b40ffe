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
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U(0, 1) samples from the current keyed stream, on ``device``."""
    g = _CURRENT.get()
    if g is None:
        return torch.rand(*shape, device=device, dtype=dtype)
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
