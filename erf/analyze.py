"""Re-scoring saved maps under a protocol's metrics (``erf analyze FILE``).

Kept apart from :mod:`erf.protocols` (the presets, which :mod:`erf.plot` uses) because it loads
results (:mod:`erf.result`), which plot: together they would close an import cycle.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from erf.protocols import as_2d_map, get_protocol, score

__all__ = ["analyze", "load_map"]


def load_map(path: Any) -> tuple[Any, np.ndarray]:
    """A saved map for re-scoring: ``(result, raw)``.

    ``.npz`` written by :meth:`erf.ERFResult.save` gives the restored result and its map;
    a bare ``.npy`` (RepLKNet's ``visualize_erf.py`` or OpenERF's saved matrix) gives a minimal
    :class:`erf.ERFResult` around it and the array exactly as stored (RepLKNet's float32), so
    :func:`replknet_area_ratio` on it equals ``analyze_erf.py`` on the same file.
    """
    import os

    from erf.result import ERFResult, load

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    if path.endswith(".npz"):
        result = load(path)
        return result, np.asarray(result.map)
    if not path.endswith(".npy"):
        raise ValueError(f"path: {path!r} must be an erf result (.npz) or a bare map (.npy)")
    try:
        raw = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"path: {path!r} is not a readable .npy array ({exc})") from None
    raw = as_2d_map(raw, name=f"the array in {os.path.basename(path)}")
    h, w = raw.shape
    mean = raw.astype(np.float64)
    config = {"reduce": "relu" if raw.min() >= 0 else "mean", "protocol": None, "source_file": os.path.abspath(path)}
    result = ERFResult(1, mean, np.zeros_like(mean), unit=(h // 2, w // 2), layer=os.path.basename(path),
                       input_shape=(1, h, w), config=config,
                       meta={"provenance": {"inputs": {"kind": f"saved map {os.path.basename(path)}", "n": None}}})
    return result, raw


def analyze(path: Any, protocol: Any = None) -> tuple[dict[str, Any], Any]:
    """Re-score a saved map under a protocol's metrics: ``(summary, result)`` (``erf analyze FILE``).

    ``protocol`` defaults to the one the result was made with (``.npz``), else none: the summary
    then holds erf's own metrics (:func:`erf.metrics` around the array centre, raw map) and every
    protocol's metrics that apply (RepLKNet's and OpenERF's need a non-negative 2-D map).
    """
    result, raw = load_map(path)
    made = result.config.get("protocol")
    made = made.get("name") if isinstance(made, dict) else made
    name = get_protocol(protocol).name if protocol is not None else made
    summary: dict[str, Any] = {"file": str(path), "shape": list(raw.shape), "dtype": str(raw.dtype),
                               "made_with_protocol": made, "protocol": name}
    arr64 = np.asarray(raw, dtype=np.float64)
    if np.any(arr64 < 0):
        if name in ("replknet", "openerf"):
            raise ValueError(f"protocol {name!r} needs a non-negative map; {path} holds negative values (a signed "
                             "'mean' map?): re-score it with --protocol luo2016 or without --protocol")
        arr64 = np.abs(arr64)
    if not arr64.any():
        raise ValueError(f"{path}: the map is all zeros; nothing to score")
    if raw.ndim == 2:
        from erf.fit import metrics

        met = metrics(arr64, center=tuple(n // 2 for n in arr64.shape))
        summary["erf_metrics"] = {"erf_size": met["erf_size"], "mass_radius": met["mass_radius"],
                                  "raw_area_ratio": met["area_ratio"], "anisotropy": met["anisotropy"]}
    names = [name] if name else [n for n in ("replknet", "openerf") if raw.ndim == 2 and raw.min() >= 0]
    summary["metrics"] = {n: score(raw if n != "luo2016" else result, n) for n in names}
    if name:
        cfg = dict(result.config)
        cfg["protocol"] = {"name": name}
        result.config = cfg
    return summary, result
