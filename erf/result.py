"""Results: the averaged map of one unit with its lazily computed analyses, saved and loaded.

The last stage of a run (see README "Architecture"): :func:`erf.engine.effective_rf` hands the
accumulated ``(n, mean, M2)`` of each target to :class:`ERFResult`; :meth:`ERFResult.save` writes
an ``.npz`` with JSON metadata and :func:`load` reads it back (format :data:`FORMAT_VERSION`).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
from torch import nn

from erf import _io
from erf._degenerate import clip_trf
from erf._integrity import check_result_arrays, differences
from erf._stats import ClusterStats, merge_numpy, stderr_of

FORMAT_VERSION = 1


def atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` atomically (:func:`erf._io.atomic_write`)."""
    _io.atomic_savez(path, arrays)


class ERFResult:
    """The averaged ERF map of one unit, with lazily computed analyses.

    Attributes:
        map: ndarray on the input grid (float64), the mean reduced gradient.
        stderr: standard error of that mean per position, weight draws as clusters (inputs nested in
            draws): with D >= 2 draws sqrt(D / (D - 1) sum_d (n_d / N)^2 (xbar_d - m)^2), with one
            draw the input-level sqrt(M2 / (N - 1) / N). stderr_df: its degrees of freedom (D - 1,
            or N - 1). stderr_kind: ``"clustered"``, ``"inputs"``, or why the input level was used.
        clusters: the per-draw statistics (:class:`erf._stats.ClusterStats`), None for results
            saved before they existed. variance_components: within/between-draw variances.
        n: number of maps averaged (inputs x draws, non-finite ones skipped).
        unit, layer, input_shape, config: what was measured and how (``config`` is JSON-able).
    """

    def __init__(self, n: int, mean: np.ndarray, m2: np.ndarray, *, unit: tuple[int, ...], layer: str,
                 input_shape: tuple[int, ...], config: dict, meta: dict | None = None,
                 model: nn.Module | None = None, trf: Any = None, clusters: ClusterStats | None = None):
        self.n = int(n)
        self.map = mean
        self.m2 = m2
        self.clusters = clusters
        if clusters is not None:
            self.stderr = clusters.stderr
            self.stderr_df = clusters.df
            self.stderr_kind = "clustered" if clusters.draws >= 2 else "inputs"
        else:
            self.stderr = stderr_of(self.n, m2)
            self.stderr_df = max(self.n - 1, 0)
            self.stderr_kind = "inputs"
            if int(config.get("draws", 1)) > 1:
                self.stderr_kind = "inputs (no per-draw statistics: maps treated as independent, too small)"
        self.unit = tuple(unit)
        self.layer = layer
        self.input_shape = tuple(input_shape)
        self.config = config
        self.meta = dict(meta or {})
        self._model = model
        self._trf = trf
        #: why ``trf`` is ``None`` for a model the analyser cannot follow (else ``None``)
        self.trf_reason: str | None = self.meta.get("trf_reason")
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"ERFResult(layer={self.layer!r}, unit={self.unit}, input_shape={self.input_shape}, "
                f"n={self.n}, reduce={self.config.get('reduce')!r})")

    # -- uncertainty
    @property
    def variance_components(self) -> dict[str, Any] | None:
        """Per-position variance of single maps split into ``within`` (between inputs of one draw)
        and ``between`` (between weight draws; None with one draw), one-way random-effects ANOVA
        (:meth:`erf._stats.ClusterStats.variance_components`); None without per-draw statistics."""
        return None if self.clusters is None else self.clusters.variance_components()

    def shape_stderr(self, window: tuple[slice, ...] | None = None) -> np.ndarray:
        """Clustered standard error of ``map / sum |map|`` (over ``window``), the total's uncertainty
        included (delta method over draws); ``stderr / total`` without per-draw statistics."""
        if self.clusters is not None:
            return self.clusters.normalized_stderr(window)
        win = window if window is not None else (slice(None),) * self.map.ndim
        return self.stderr[win] / float(np.abs(self.map[win]).sum())

    # -- lazy analyses
    @property
    def ndim_spatial(self) -> int:
        """Number of spatial axes of the input (1, 2 or 3)."""
        return len(self.input_shape) - 1

    @property
    def nonnegative_map(self) -> np.ndarray:
        """The map the analyses use: ``|map|`` for ``reduce="mean"``, else the map itself."""
        return np.abs(self.map) if self.config.get("reduce") == "mean" else np.maximum(self.map, 0.0)

    @property
    def trf(self):
        """Theoretical receptive field of the unit (:class:`erf.trf.RFReport`), computed once."""
        if self._trf is None and self._model is not None and self.trf_reason is None:
            from erf.trf import TRFUnavailable, theoretical_rf

            from erf._layout_trf import layout_trf

            try:  # token / channels-last outputs: erf._layout (attention: global, the patch as local field)
                self._trf = layout_trf(theoretical_rf, self._model, self.input_shape, self.layer or None, self.unit,
                                       self.meta.get("layout"))
            except TRFUnavailable as exc:  # no field rather than a wrong one; ERF/TRF is then absent
                self.trf_reason = str(exc)
                warnings.warn(f"trf is None: {exc}", stacklevel=2)
        return self._trf

    @property
    def moments(self):
        """Centre, covariance and per-axis sigma from second moments (:func:`erf.moments`)."""
        if "moments" not in self._cache:
            from erf.fit import moments

            self._cache["moments"] = moments(self.nonnegative_map)
        return self._cache["moments"]

    @property
    def fit(self):
        """Least-squares Gaussian fit (:func:`erf.fit_gaussian`); ``None`` when it cannot be fitted."""
        if "fit" not in self._cache:
            from erf.fit import fit_gaussian

            self._cache["fit"] = fit_gaussian(self.nonnegative_map)
        return self._cache["fit"]

    @property
    def metrics(self) -> dict:
        """ERF size, extent, ERF/TRF ratio, mass radius, area ratios, anisotropy (:func:`erf.metrics`)."""
        if "metrics" not in self._cache:
            from erf.fit import metrics

            trf, note = clip_trf(self.trf, self.input_shape)  # a TRF larger than the input: clipped
            if note is not None:
                warnings.warn(note, stacklevel=2)
                if note not in self.meta.get("warnings", []):
                    self.meta["warnings"] = list(self.meta.get("warnings", [])) + [note]
            self._cache["metrics"] = metrics(self.nonnegative_map, trf=trf)
        return self._cache["metrics"]

    def plot(self, ax=None, log: bool = False, show_trf: bool = True, show_fit: bool = True,
             title: str | None = None):
        """Heatmap with the TRF box and the 1- and 2-sigma ellipses of the fit; returns the Axes."""
        from erf.plot import plot_result

        return plot_result(self, ax=ax, log=log, show_trf=show_trf, show_fit=show_fit, title=title)

    # -- persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write ``.npz`` arrays with JSON metadata inside (atomic: temp file, fsync, rename)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike ending in .npz, got {type(path).__name__} {path!r}")
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"path must be a text path, got {path!r}")
        if not os.path.basename(path) or os.path.isdir(path):
            raise ValueError(f"path must name a file (such as result.npz), got {path!r}")
        if not path.endswith(".npz"):
            path += ".npz"
        meta = dict(self.meta)
        meta.update({"format": FORMAT_VERSION, "n": self.n, "unit": list(self.unit), "layer": self.layer,
                     "input_shape": list(self.input_shape), "config": self.config})
        try:
            trf = self.trf
        except Exception:  # the analyser may not support every model; the map is still worth saving
            trf = None
        if trf is not None and hasattr(trf, "to_dict"):
            meta["trf"] = trf.to_dict()
        if self.trf_reason:
            meta["trf_reason"] = self.trf_reason
        arrays = {"map": self.map, "stderr": self.stderr, "m2": self.m2,
                  "meta": np.array(json.dumps(meta))}
        if self.clusters is not None:  # per-draw statistics: the clustered stderr survives save/load/merge
            arrays.update(self.clusters.arrays())
        _io.atomic_savez(path, arrays)
        return path

    def merge(self, other: "ERFResult") -> "ERFResult":
        """Combine with a result of the same configuration over disjoint draws (Chan's formula)."""
        if not isinstance(other, ERFResult):
            raise TypeError(f"other must be an ERFResult, got {type(other).__name__}")
        ignore = {"draws", "first_draw", "draw_ranges", "batch_size", "progress", "device"}
        a = {k: v for k, v in self.config.items() if k not in ignore}
        b = {k: v for k, v in other.config.items() if k not in ignore}
        if a != b or self.unit != other.unit or self.layer != other.layer:
            diff = differences(a, b)
            raise ValueError(f"other: results differ in configuration ({', '.join(diff) or 'unit/layer'}); "
                             "only runs of the same configuration over disjoint draws can be merged")
        ra, rb = self.config["draw_ranges"], other.config["draw_ranges"]
        for lo, hi in ra:
            for lo2, hi2 in rb:
                if lo < hi2 and lo2 < hi:
                    raise ValueError(f"other: draw ranges overlap ({ra} and {rb}); merge needs disjoint draws")
        clusters = None
        if self.clusters is not None and other.clusters is not None:
            clusters = self.clusters.merge(other.clusters)
            n, mean, m2 = clusters.moments()
        else:
            n, mean, m2 = merge_numpy((self.n, self.map, self.m2), (other.n, other.map, other.m2))
        ranges = sorted([list(r) for r in ra + rb])
        joined: list[list[int]] = []
        for lo, hi in ranges:
            if joined and joined[-1][1] == lo:
                joined[-1][1] = hi
            else:
                joined.append([lo, hi])
        config = dict(self.config)
        config["draw_ranges"] = joined
        config["first_draw"] = joined[0][0]
        config["draws"] = sum(hi - lo for lo, hi in joined)
        return ERFResult(n, mean, m2, unit=self.unit, layer=self.layer, input_shape=self.input_shape,
                         config=config, meta=self.meta, model=self._model, trf=self._trf, clusters=clusters)


def load(path: str | os.PathLike) -> ERFResult:
    """Restore a result written by :meth:`ERFResult.save` (no pickle: ``allow_pickle=False``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike of an .npz result file, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no such result file {path!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("map", "m2")}
            clusters = ClusterStats.from_arrays(z)
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # BadZipFile, EOFError, KeyError, RecursionError, ...: one message
        raise ValueError(f"path: {path!r} is not an erf result file ({type(exc).__name__}: {str(exc)[:200]})"
                         ) from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"path: {path!r} has result format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    check_result_arrays(meta, arrays, f"path: {path!r}")
    arrays = {k: v.astype(np.float64, copy=False) for k, v in arrays.items()}
    trf = None
    if meta.get("trf") is not None:
        try:
            from erf.trf import RFReport

            trf = RFReport.from_dict(meta["trf"])
        except Exception:  # an older or partial report: keep the map usable
            trf = None
    if clusters is not None and (clusters.n != int(meta["n"]) or clusters.within_ss.shape != arrays["map"].shape):
        raise ValueError(f"path: {path!r} holds per-draw statistics that do not match its map")
    if clusters is None and int(meta["config"].get("draws", 1)) > 1:
        warnings.warn(f"{path!r} was saved without per-draw statistics (an older erf): its stderr treats the "
                      f"maps of its {meta['config']['draws']} weight draws as independent and is too small "
                      "(result.stderr_kind says so)", stacklevel=2)
    return ERFResult(meta["n"], arrays["map"], arrays["m2"], unit=tuple(meta["unit"]), layer=meta["layer"],
                     input_shape=tuple(meta["input_shape"]), config=meta["config"], meta=meta, trf=trf,
                     clusters=clusters)
