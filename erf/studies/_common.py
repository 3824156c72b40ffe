"""What every study returns: :class:`StudyResult` (tables, claims, a figure, files)."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Callable, Sequence

import numpy as np


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "—" if not math.isfinite(v) else format(float(v), spec)
    if isinstance(v, (list, tuple)):
        return " x ".join(fmt(x, spec) for x in v)
    return str(v)


def markdown(rows: Sequence[dict], columns: Sequence[str] | None = None, formats: dict[str, str] | None = None) -> str:
    formats = formats or {}
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), formats.get(c, ".4g")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def pm(value: float | None, se: float | None, spec: str = ".3f") -> str:
    """``value ± se`` as text."""
    if value is None or not math.isfinite(value):
        return "—"
    if se is None or not math.isfinite(se):
        return format(value, spec)
    return f"{format(value, spec)} ± {format(se, spec)}"


def verdict_greater(ratio: float, se: float, z: float = 2.0) -> str:
    """``holds`` when ``ratio > 1`` by more than ``z`` standard errors, ``contradicts`` when below by as much."""
    if not (math.isfinite(ratio) and math.isfinite(se)):
        return "undetermined"
    if ratio - 1 > z * se:
        return "holds"
    if 1 - ratio > z * se:
        return "contradicts"
    return "inconclusive"


def ratio_se(a: float, se_a: float, b: float, se_b: float) -> tuple[float, float]:
    """``a / b`` and its standard error by the delta method (independent ``a``, ``b``)."""
    r = a / b
    return r, abs(r) * math.sqrt((se_a / a) ** 2 + (se_b / b) ** 2)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``nan`` error for one value)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ``log y`` on ``log x`` and its OLS standard error."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    (s, b), res = np.polyfit(lx, ly, 1), None
    resid = ly - (s * lx + b)
    dof = len(lx) - 2
    se = float(np.sqrt((resid ** 2).sum() / dof / ((lx - lx.mean()) ** 2).sum())) if dof > 0 else float("nan")
    return float(s), se


def jackknife(stat: Callable[[list[int]], float], groups: int) -> tuple[float, float]:
    """``stat(all groups)`` and its delete-one-group jackknife standard error."""
    full = stat(list(range(groups)))
    if groups < 2:
        return full, float("nan")
    loo = np.array([stat([g for g in range(groups) if g != d]) for d in range(groups)])
    se = math.sqrt((groups - 1) / groups * float(((loo - loo.mean()) ** 2).sum()))
    return full, se


class StudyResult:
    """The outcome of a study: named tables (lists of dicts), optional claims, a figure, timing.

    ``tables`` maps a title to ``(rows, columns, formats)``; the first table is the main one
    (``to_csv``). ``claims`` (Luo et al.) has ``claim, measured, stderr, expected, verdict``.
    """

    def __init__(self, name: str, tables: dict[str, tuple[list[dict], list[str], dict[str, str]]],
                 config: dict, seconds: float, figure: Callable[["StudyResult"], Any] | None = None,
                 claims: list[dict] | None = None, data: dict | None = None, notes: Sequence[str] = ()):
        self.name = name
        self.tables = tables
        self.config = config
        self.seconds = seconds
        self.claims = claims or []
        self.data = data or {}
        self.notes = list(notes)
        self._figure = figure

    def __repr__(self) -> str:
        return f"StudyResult({self.name!r}, tables={list(self.tables)}, seconds={self.seconds:.1f})"

    @property
    def rows(self) -> list[dict]:
        """The main table's rows (the numbers, where a table of text is also shown)."""
        if "_data" in self.tables:
            return self.tables["_data"][0]
        return next(iter(self.tables.values()))[0] if self.tables else []

    def figure(self):
        """The study's matplotlib figure."""
        if self._figure is None:
            raise ValueError(f"study {self.name!r} has no figure")
        return self._figure(self)

    def to_markdown(self) -> str:
        parts = []
        if self.claims:
            parts.append("claims\n\n" + markdown(self.claims, ["claim", "measured", "stderr", "expected", "verdict",
                                                               "note"], {"measured": ".3f", "stderr": ".3f"}))
        for title, (rows, cols, fmts) in self.tables.items():
            if title.startswith("_"):  # machine-readable only (csv/json)
                continue
            parts.append(f"{title}\n\n" + markdown(rows, cols, fmts))
        for n in self.notes:
            parts.append(n + "\n")
        parts.append(f"({self.name}: {self.seconds:.1f} s)\n")
        return "\n".join(parts)

    def to_dict(self) -> dict:
        return jsonable({"study": self.name, "config": self.config, "seconds": self.seconds, "claims": self.claims,
                         "tables": {t: rows for t, (rows, _, _) in self.tables.items()}, "notes": self.notes})

    def to_json(self, path) -> str:
        from erf._io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    def to_csv(self, path) -> str:
        """The claims (when there are) or the main table as CSV."""
        from erf._io import atomic_write_text

        rows = self.claims or (self.tables["_data"][0] if "_data" in self.tables else self.rows)
        cols = list(rows[0].keys()) if rows else []
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else (json.dumps(jsonable(v)) if isinstance(v, (list, dict)) else v))
                        for k, v in r.items()})
        return atomic_write_text(path, buf.getvalue())
