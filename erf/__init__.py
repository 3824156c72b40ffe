"""erf — effective receptive field analysis of neural networks.

Luo, Li, Urtasun, Zemel, "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks", NIPS 2016. https://arxiv.org/abs/1701.04128

Public names are imported lazily, so ``import erf`` stays cheap (no scipy or
matplotlib until they are needed).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "effective_rf": "erf.engine",
    "ERFResult": "erf.result",
    "load": "erf.result",
    "theoretical_rf": "erf.trf",
    "empirical_trf": "erf.trf",
    "RFReport": "erf.trf",
    "fit_gaussian": "erf.fit",
    "moments": "erf.fit",
    "metrics": "erf.fit",
    "GaussianFit": "erf.fit",
    "Moments": "erf.fit",
    "compare": "erf.compare",
    "Comparison": "erf.compare",
    "diff": "erf.compare",
    "load_weights": "erf.weights",
    "train": "erf.training",
    "TrainingRun": "erf.training",
    "load_run": "erf.training",
}
_SUBMODULES = {"theory", "pooling", "nets", "fit", "trf", "engine", "plot", "cli", "compare", "protocols", "tasks",
               "training", "studies"}

__all__ = sorted(list(_LAZY) + sorted(_SUBMODULES - {"cli", "engine", "plot", "compare", "fit", "trf", "training"})
                 + ["__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"erf.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'erf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
