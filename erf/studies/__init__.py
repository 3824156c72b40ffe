"""Studies: experiments that answer one question each, with a figure and a table.

- :func:`luo2016` — the claims of Luo et al. (NIPS 2016) that can be checked without their data sets.
- :func:`trained_pools` — ``pooling_net`` with each downsampling module, trained: accuracy and ERF
  before and after training.
- :func:`dynopool` — DynOPool trained on ``shapes``/``stretched``/``tiled``/``zoomed``: learned r and
  the ERF's anisotropy, against max pooling (Jang et al., CVPR 2022).
- :func:`theory`, :func:`growth` — the linear-stack checks behind ``erf theory`` and ``erf growth``.

Each returns a :class:`StudyResult` (``.tables``, ``.claims``, ``.figure()``, ``.to_markdown()``,
``.to_csv``, ``.to_json``); ``quick=True`` runs the small variant used by the tests.
"""
from __future__ import annotations

from ._common import StudyResult
from .linear import growth, theory
from .luo import luo2016
from .pools import dynopool, trained_pools

__all__ = ["StudyResult", "luo2016", "trained_pools", "dynopool", "theory", "growth", "run", "NAMES"]

NAMES = ("luo2016", "trained-pools", "dynopool", "theory", "growth")


def run(name: str, quick: bool = False, seed: int = 0, progress: bool = False) -> StudyResult:
    """Run a study by its CLI name (``luo2016``, ``trained-pools``, ``dynopool``, ``theory``, ``growth``)."""
    if name not in NAMES:
        raise ValueError(f"unknown study {name!r}; valid: {', '.join(NAMES)}")
    if name == "theory":
        return theory(draws=16 if quick else 128, seed=seed, progress=progress)
    if name == "growth":
        return growth(depths=(5, 10, 20) if quick else (8, 16, 32, 64), seed=seed, progress=progress)
    fn = {"luo2016": luo2016, "trained-pools": trained_pools, "dynopool": dynopool}[name]
    return fn(quick=quick, seed=seed, progress=progress)
