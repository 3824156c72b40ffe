"""Name -> pooling-module registry (timm-style decorator registry).

``REGISTRY`` maps a short lowercase name to an :class:`Entry` whose ``make(channels, stride=2,
**overrides)`` returns a fresh module with the defaults of SPEC's table.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

KINDS = ("fixed", "data-dependent", "learnable", "stochastic")
LOCALITIES = ("local", "global")


@dataclass(frozen=True)
class Entry:
    """One registered pooling module.

    Attributes:
        name: short lowercase key.
        factory: ``factory(channels, stride=2, **overrides) -> nn.Module``.
        kind: ``fixed`` / ``data-dependent`` / ``learnable`` / ``stochastic``.
        locality: ``local`` or ``global`` (the unit sees the whole input).
        paper: citation with a link.
        rf: short text of the receptive-field rule (e.g. ``"k2 s2"``).
        description: one line.
        downsampling: whether ``make(stride=2)`` halves an even input.
        head: a global or box-based head (gap, spp, ...), not part of the comparison set
            (the comparison set is every non-head entry: the downsampling modules and ``dilated``).
    """

    name: str
    factory: Callable[..., nn.Module] = field(repr=False)
    kind: str
    locality: str
    paper: str
    rf: str
    description: str
    downsampling: bool
    head: bool = False

    def make(self, channels: int, stride: int = 2, **overrides) -> nn.Module:
        """A fresh module for ``channels`` channels (``stride`` is ignored by non-downsampling ones)."""
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        return self.factory(channels, stride=stride, **overrides)


REGISTRY: dict[str, Entry] = {}


def register(name: str, *, kind: str, locality: str, paper: str, rf: str,
             downsampling: bool = True, head: bool = False, description: str | None = None):
    """Decorator registering ``factory(channels, stride=2, **overrides)`` under ``name``.

    The description defaults to the first line of the factory's docstring.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if locality not in LOCALITIES:
        raise ValueError(f"locality must be one of {LOCALITIES}, got {locality!r}")

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in REGISTRY:
            warnings.warn(f"pooling module {name!r} registered twice; the last one wins",
                          stacklevel=2)
        doc = description or (factory.__doc__ or name).strip().splitlines()[0]
        REGISTRY[name] = Entry(name, factory, kind, locality, paper, rf, doc, downsampling, head)
        return factory

    return deco


def get_entry(name: str) -> Entry:
    """The registry entry of ``name``; ``ValueError`` listing the valid names when unknown."""
    if not isinstance(name, str) or name.lower() not in REGISTRY:
        raise ValueError(f"unknown pooling module {name!r}; valid names: {', '.join(REGISTRY)}")
    return REGISTRY[name.lower()]


def get_pool(name: str, channels: int, **kw) -> nn.Module:
    """A fresh module of the registered ``name`` for ``channels`` channels (``stride=2`` default)."""
    return get_entry(name).make(channels, **kw)


def list_pools(kind: str | None = None, locality: str | None = None,
               downsampling: bool | None = None, head: bool | None = None) -> list[str]:
    """Registered names, in registration order, optionally filtered.

    ``list_pools(head=False)`` is the comparison set of ``pooling_net``/``compare``: every
    downsampling module plus ``dilated``.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if locality is not None and locality not in LOCALITIES:
        raise ValueError(f"locality must be one of {LOCALITIES}, got {locality!r}")
    return [n for n, e in REGISTRY.items()
            if (kind is None or e.kind == kind)
            and (locality is None or e.locality == locality)
            and (downsampling is None or e.downsampling == downsampling)
            and (head is None or e.head == head)]
