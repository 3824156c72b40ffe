"""Optional test dependencies, skipped per test (not per module) when missing."""
from __future__ import annotations

import importlib
from typing import Any

import pytest


class _Lazy:
    """A module imported on first attribute access, or a skip of the test that touches it.

    ``timm = lazy("timm")`` at module level keeps the module's other tests running when timm is
    missing; a module-level ``pytest.importorskip`` would report the whole file as one skip.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        try:
            module = importlib.import_module(self._name)
        except ImportError as exc:
            pytest.skip(f"{self._name} is needed for this test ({exc})")
        return getattr(module, attr)


def lazy(name: str) -> Any:
    """The module ``name``, imported when a test first uses it (that test is skipped without it)."""
    return _Lazy(name)
