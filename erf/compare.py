"""Side-by-side receptive fields of the pooling modules, and differences of two ERF maps.

Luo et al., NIPS 2016 (ERF size, ERF/TRF ratio), https://arxiv.org/abs/1701.04128;
Ding et al., RepLKNet, CVPR 2022 (high-contribution area ratio), https://arxiv.org/abs/2203.06717.

Each module runs ``groups`` groups of weight draws: group g runs draws ``g * draws .. (g + 1) *
draws - 1`` (disjoint ``first_draw`` ranges; :meth:`erf.ERFResult.merge` joins them into exactly
the run over all draws). The value reported is the number computed on the merged map; its
standard error is the delete-one-draw jackknife, ``sqrt((D - 1) / D * sum_d (x_(-d) - mean)^2)``
over the D maps that leave one weight draw out: the draws are the clusters of
``ERFResult.stderr``, and for the mean map itself (equal inputs per draw) this jackknife equals
that cluster-robust error exactly; it also covers nonlinear numbers such as the fit's r2.
Results without per-draw statistics fall back to leaving one group out.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from erf._io import atomic_write_text
from torch import nn

__all__ = ["Comparison", "ERFDiff", "compare", "compare_models", "diff", "COLUMNS", "MODEL_COLUMNS"]

#: Row keys with a standard error (``key_se``), in table order.
NUMBERS: tuple[str, ...] = ("erf_size", "sigma_row", "sigma_col", "erf_trf_ratio", "area_20", "area_30",
                            "area_50", "area_99", "mass_radius", "anisotropy", "fit_r2")
#: All row keys, in table order.
COLUMNS: tuple[str, ...] = (("pool", "kind", "locality", "trf_size", "trf_global")
                            + tuple(x for k in NUMBERS for x in (k, f"{k}_se")) + ("n", "seconds"))
_AREA = {"area_20": 0.2, "area_30": 0.3, "area_50": 0.5, "area_99": 0.99}


class NetFactory:
    """Zero-argument factory ``net(pool)`` (optionally He-initialised) for one module of the registry.

    ``kaiming=True`` re-draws the weights of every convolution and linear layer outside the
    ``erf.pooling`` modules as N(0, 2 / fan_in) with zero biases (He et al. 2015,
    https://arxiv.org/abs/1502.01852), so ReLU activations keep unit scale through the depth and
    data-dependent modules (softpool, lp, gem, stochastic, ...) see inputs of order one.
    """

    def __init__(self, net: Callable[..., nn.Module], pool: str, kaiming: bool):
        self.net, self.pool, self.kaiming = net, pool, kaiming
        name = getattr(net, "__name__", type(net).__name__)
        self.__qualname__ = f"{name}({pool!r}){'+kaiming' if kaiming else ''}"

    def __call__(self) -> nn.Module:
        model = self.net(self.pool)
        if not isinstance(model, nn.Module):
            raise TypeError(f"net must return an nn.Module, got {type(model).__name__}")
        if self.kaiming:
            kaiming_init(model)
        return model


def kaiming_init(model: nn.Module) -> nn.Module:
    """He-normal weights N(0, 2 / fan_in) and zero biases for conv/linear layers outside ``erf.pooling``.

    Draws from torch's global generator (the engine seeds it per weight draw); returns ``model``.
    """
    import torch

    from erf._draws import inside_pooling

    skip = inside_pooling(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and id(m) not in skip:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                m.weight.normal_(0.0, math.sqrt(2.0 / max(fan_in, 1)))
                if m.bias is not None:
                    m.bias.zero_()
    return model


# ------------------------------------------------------------------------------ numbers
def _trf_side(trf: Any) -> tuple[float | None, bool]:
    """Geometric-mean side of the TRF (the local field for global modules) and whether it is global."""
    if trf is None:
        return None, False
    is_global = bool(getattr(trf, "is_global", False))
    size = getattr(trf, "local_size", None) if is_global else None
    size = size if size is not None else trf.size
    try:
        side = float(np.prod(np.asarray(size, dtype=np.float64)) ** (1.0 / len(size)))
    except (TypeError, ValueError):
        return None, is_global
    return (side if math.isfinite(side) and side > 0 else None), is_global


def numbers_of(result, trf_side: float | None = None) -> dict[str, float]:
    """The comparison's numbers for one map: ERF size, sigma per axis, ERF/TRF, areas, fit r2, ...

    ``erf_trf_ratio`` = ``erf_size / trf_side`` (Luo et al.). Missing numbers (an unfittable
    map, no square holding 99 %) are NaN.
    """
    from erf.fit import fit_gaussian, metrics, moments

    arr = result.nonnegative_map
    out = {k: math.nan for k in NUMBERS}
    if not np.any(arr > 0):
        return out
    mom = moments(arr)
    out["sigma_row"], out["sigma_col"] = float(mom.sigma[-2]), float(mom.sigma[-1])
    trf = result.trf
    try:
        met = metrics(arr, trf=trf)
    except ValueError:  # a TRF centre outside the map (a unit near the border): use the array centre
        met = metrics(arr)
    out["erf_size"] = math.nan if met["erf_size"] is None else float(met["erf_size"])
    if trf_side and met["erf_size"] is not None:
        out["erf_trf_ratio"] = float(met["erf_size"]) / trf_side
    out["mass_radius"] = float(met["mass_radius"])
    out["anisotropy"] = float(met["anisotropy"])
    for key, t in _AREA.items():
        v = met["area_ratio"].get(t)
        out[key] = math.nan if v is None else float(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_gaussian(arr)
    out["fit_r2"] = math.nan if fit is None else float(fit.r2)
    return out


def jackknife(full: dict[str, float], leave_out: Sequence[dict[str, float]]) -> dict[str, float]:
    """Delete-one-cluster jackknife standard errors: sqrt((K-1)/K sum (x_-g - mean)^2) per key."""
    k = len(leave_out)
    se = {}
    for key in full:
        vals = np.array([d[key] for d in leave_out], dtype=np.float64)
        if k < 2 or not np.all(np.isfinite(vals)):
            se[key] = math.nan
        else:
            se[key] = float(math.sqrt((k - 1) / k * np.sum((vals - vals.mean()) ** 2)))
    return se


def leave_one_draw_out(result, j: int):
    """``result`` with weight draw ``j`` (its position in ``result.clusters``) left out of the map:
    ``(N m - n_j xbar_j) / (N - n_j)``; analyses are recomputed lazily on the copy."""
    import copy

    cl = result.clusters
    N, nj = float(cl.draw_n.sum()), float(cl.draw_n[j])
    out = copy.copy(result)
    out.map = (N * result.map - nj * cl.draw_mean[j]) / (N - nj)
    out._cache = {}
    return out


def _leave_one_out(merged, parts: Sequence[Any], side: float | None) -> list[dict[str, float]]:
    """The numbers of every leave-one-draw-out map (delete-one-cluster jackknife: the same clusters
    as ``ERFResult.stderr``); the leave-one-group-out maps when per-draw statistics are missing."""
    cl = getattr(merged, "clusters", None)
    if cl is not None and cl.draws >= 2 and np.all(cl.draw_n > 0):
        return [numbers_of(leave_one_draw_out(merged, j), side) for j in range(len(cl.draw_n))]
    return [numbers_of(_merge_all(parts[:g] + parts[g + 1:]), side) for g in range(len(parts))]


def _merge_all(results: Sequence[Any]):
    out = results[0]
    for r in results[1:]:
        out = out.merge(r)
    return out


# ------------------------------------------------------------------------------ Comparison
@dataclass
class Comparison:
    """The result of :func:`compare`: one row per pooling module (or per model, ``compare(models=...)``).

    Attributes:
        rows: list of dicts with the keys of :attr:`columns` (``x`` and its standard error ``x_se``).
        results: pool name -> merged :class:`erf.ERFResult` (every group's draws).
        options: the settings of the run (JSON-able). seconds: wall time of the run.
    """

    rows: list[dict[str, Any]]
    results: dict[str, Any] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        """The rows (copies), one dict per module."""
        return [dict(r) for r in self.rows]

    @property
    def columns(self) -> tuple[str, ...]:
        """:data:`MODEL_COLUMNS` for a comparison of models, else :data:`COLUMNS`."""
        return MODEL_COLUMNS if self.options.get("models") else COLUMNS

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: options, seconds and rows (NaN written as null)."""
        return {"options": self.options, "seconds": self.seconds, "columns": list(self.columns),
                "rows": [{k: _json_number(v) for k, v in r.items()} for r in self.rows]}

    def to_markdown(self) -> str:
        """A markdown table: value ± standard error; areas in percent of the input area."""
        models = bool(self.options.get("models"))
        head = (["model", "layer", "weights"] if models else ["module", "kind"]) + [
            "TRF", "ERF size", "σ row", "σ col", "ERF/TRF", "raw area 20 %", "raw area 50 %", "raw area 99 %", "anisotropy",
            "fit R²"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            trf = "—" if r["trf_size"] is None else f"{r['trf_size']:.0f}" + (" (global)" if r["trf_global"] else "")
            if r.get("trf_unclipped"):  # a TRF larger than the input: ERF/TRF uses the clipped field
                trf += f" (of {r['trf_unclipped']:.0f})"
            first = ([r["model"], r["layer"], r["weights"] or f"{self.options.get('init')} init"] if models
                     else [r["pool"], r["kind"]])
            cells = first + [trf, _pm(r, "erf_size", 1), _pm(r, "sigma_row", 2),
                     _pm(r, "sigma_col", 2), _pm(r, "erf_trf_ratio", 3), _pm(r, "area_20", 2, 100),
                     _pm(r, "area_50", 2, 100), _pm(r, "area_99", 1, 100), _pm(r, "anisotropy", 3),
                     _pm(r, "fit_r2", 3)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | os.PathLike) -> str:
        """Write the rows as CSV (atomically); returns the path."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.columns), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if _isnan(r[k]) or r[k] is None else r[k]) for k in self.columns})
        return write_text_atomic(path, buf.getvalue())

    def to_json(self, path: str | os.PathLike) -> str:
        """Write :meth:`to_dict` as JSON (atomically); returns the path."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    def plot_grid(self, path: str | os.PathLike | None = None, same_scale: bool = True, cols: int | None = None):
        """One heatmap per module with its TRF box and the fitted 2-sigma ellipse; see
        :func:`erf.plot.comparison_grid`. Saves to ``path`` (atomically) when given; returns the Figure."""
        from erf.plot import comparison_grid, save_figure

        fig = comparison_grid(self, same_scale=same_scale, cols=cols)
        if path is not None:
            save_figure(fig, path)
        return fig

    def plot_ratios(self, path: str | os.PathLike | None = None):
        """Bar chart of ERF/TRF per module with standard errors; see :func:`erf.plot.ratio_bars`."""
        from erf.plot import ratio_bars, save_figure

        fig = ratio_bars(self)
        if path is not None:
            save_figure(fig, path)
        return fig


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _json_number(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _pm(row: dict, key: str, digits: int, scale: float = 1.0) -> str:
    v, se = row[key], row[f"{key}_se"]
    if v is None or _isnan(v):
        return "—"
    s = f"{v * scale:.{digits}f}"
    if se is not None and not _isnan(se):
        s += f" ± {se * scale:.{digits}f}"
    return s


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically (:func:`erf._io.atomic_write_text`); returns the path."""
    return atomic_write_text(path, text)


# ------------------------------------------------------------------------------ compare
def _resolve_pools(pools: Any) -> list[str]:
    from erf.pooling import get_entry, list_pools

    if pools == "all" or pools is None:
        return list_pools(head=False)
    if isinstance(pools, str):
        pools = [p.strip() for p in pools.split(",") if p.strip()]
    if not isinstance(pools, (list, tuple)) or not pools:
        raise ValueError(f"pools must be 'all' or a non-empty list of pooling-module names, got {pools!r}")
    names = []
    for p in pools:
        entry = get_entry(p)  # ValueError listing the valid names
        if entry.head:
            raise ValueError(f"pools: {p!r} is a head, not a downsampling module; valid: "
                             f"{', '.join(list_pools(head=False))}")
        if entry.name in names:
            raise ValueError(f"pools: {p!r} is listed twice")
        names.append(entry.name)
    return names


def compare(pools: Any = "all", net: Callable[..., nn.Module] | None = None,
            input_shape: Sequence[int] | None = None, *, models: Any = None, groups: int = 4, draws: int = 3,
            n_inputs: int = 4, init: str | Callable | None = None, reduce: str = "abs", seed: int = 0,
            progress: bool = True, **options) -> Comparison:
    """ERF of the centre unit of ``net(pool)`` for every pooling module, with standard errors.

    Each module runs ``groups`` independent groups of ``draws`` weight draws x ``n_inputs``
    Gaussian inputs (defaults 4 x 3 x 4 = 48 maps, 12 weight draws); numbers come from the merged map and their
    standard errors from the delete-one-draw jackknife (see the module docstring).

    With ``models=`` any models are compared instead (see :func:`compare_models`): two checkpoints
    of one model (before/after training), several backbones, ...

    Args:
        pools: ``"all"`` (every non-head module of ``erf.pooling.REGISTRY``), a list of names or
            a comma-separated string.
        net: ``net(pool_name) -> nn.Module``; default :func:`erf.nets.pooling_net` (TRF 68-89 px).
        input_shape: ``(C, H, W)``; keep it larger than the TRF (128 x 128 by default).
        models: ``{"name": module | factory | "SPEC[@WEIGHTS]"}`` (or a list of specs): compare these
            models instead of pooling modules (:func:`compare_models`).
        groups, draws, n_inputs: K groups of ``draws`` draws of ``n_inputs`` inputs (groups >= 2).
        init: ``"kaiming"`` (He-normal conv weights, zero biases, pooling modules untouched; the
            default, so data-dependent modules see unit-scale activations) or any ``init`` of
            :func:`erf.effective_rf`.
        reduce, seed, progress, **options: passed to :func:`erf.effective_rf` (``batch_size``, ``device``, ...).
    Returns:
        :class:`Comparison`.
    Raises:
        ValueError: unknown pooling names, groups < 2, or a bad option of the engine.
    """
    from tqdm.auto import tqdm

    from erf.engine import effective_rf
    from erf.nets import pooling_net
    from erf.pooling import get_entry

    if models is not None:
        if pools not in ("all", None) or net is not None:
            raise ValueError("models: give either models= or pools=/net= (the pooling comparison), not both")
        return compare_models(models, input_shape, groups=groups, draws=draws, n_inputs=n_inputs, init=init,
                              reduce=reduce, seed=seed, progress=progress, **options)
    input_shape = (3, 128, 128) if input_shape is None else input_shape
    init = "kaiming" if init is None else init
    if net is None:
        net = pooling_net
    if not callable(net):
        raise TypeError(f"net must be a callable net(pool_name) -> nn.Module, got {type(net).__name__}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 2:
        raise ValueError(f"groups must be an int >= 2 (standard errors need two groups), got {groups!r}")
    for name, value in (("draws", draws), ("n_inputs", n_inputs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for bad in ("first_draw", "layer", "model"):
        if bad in options:
            raise ValueError(f"{bad} is not an option of compare (groups set the draws; the unit is the "
                             "centre of the net's output)")
    names = _resolve_pools(pools)
    kaiming = init == "kaiming"
    engine_init = "default" if kaiming else init
    t_start = time.perf_counter()
    rows, results = [], {}
    bar = tqdm(total=len(names) * groups, disable=None if progress else True, delay=1.0, unit="group",
               desc="compare", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for name in names:
            t0 = time.perf_counter()
            factory = NetFactory(net, name, kaiming)
            parts = []
            for g in range(groups):
                bar.set_postfix_str(name)
                parts.append(effective_rf(factory, input_shape, n_inputs=n_inputs, draws=draws,
                                          first_draw=g * draws, init=engine_init, reduce=reduce, seed=seed,
                                          progress=False, **options))
                bar.update(1)
            trf = parts[0].trf  # computed once; merges carry it
            side, is_global = _trf_side(trf)
            merged = _merge_all(parts)
            full = numbers_of(merged, side)
            se = jackknife(full, _leave_one_out(merged, parts, side))
            entry = get_entry(name)
            row: dict[str, Any] = {"pool": name, "kind": entry.kind, "locality": entry.locality,
                                   "trf_size": None if side is None else round(side, 3), "trf_global": is_global}
            for key in NUMBERS:
                row[key], row[f"{key}_se"] = full[key], se[key]
            row["n"], row["seconds"] = merged.n, round(time.perf_counter() - t0, 3)
            rows.append(row)
            results[name] = merged
    finally:
        bar.close()
    opts = {"pools": names, "net": getattr(net, "__name__", type(net).__name__), "input_shape": list(input_shape),
            "groups": groups, "draws": draws, "n_inputs": n_inputs,
            "init": init if isinstance(init, str) else getattr(init, "__qualname__", type(init).__name__),
            "reduce": reduce, "seed": seed}
    opts.update({k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in options.items()})
    return Comparison(rows=rows, results=results, options=opts, seconds=round(time.perf_counter() - t_start, 3))


# ------------------------------------------------------------------------------ compare models
#: Row keys of a model comparison, in table order (``pool`` repeats the name for the figures).
MODEL_COLUMNS: tuple[str, ...] = (("model", "spec", "layer", "unit", "weights", "weights_sha256", "kind",
                                   "locality", "trf_size", "trf_global", "trf_unclipped")
                                  + tuple(x for k in NUMBERS for x in (k, f"{k}_se")) + ("n", "seconds"))


@dataclass
class _Entry:
    name: str
    spec: str
    kind: str  # "weights" (fixed: a module or SPEC@WEIGHTS) or "random" (a factory or a spec)
    model: Any  # nn.Module (fixed weights) or a zero-argument factory
    fixed: bool
    default_shape: tuple[int, ...] | None


def _display_name(text: str, taken: set[str]) -> str:
    base, sep, path = text.partition("@")
    short = f"{base}@{os.path.basename(path)}" if sep else text
    return short if short not in taken else text


def _model_entries(models: Any) -> list[tuple[str, Any]]:
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if isinstance(models, (list, tuple)):
        if not models:
            raise ValueError("models: an empty list; give {'name': model, ...} or a list of specs")
        bad = [m for m in models if not isinstance(m, str)]
        if bad:
            raise TypeError(f"models: a list must hold 'SPEC[@WEIGHTS]' strings (give a dict name -> module or "
                            f"factory for other models), got {type(bad[0]).__name__}")
        named: dict[str, Any] = {}
        for m in models:
            name = _display_name(m, set(named))
            if name in named:
                raise ValueError(f"models: {m!r} is listed twice")
            named[name] = m
        models = named
    if not isinstance(models, dict):
        raise TypeError(f"models must be a dict {{'name': module | factory | 'SPEC[@WEIGHTS]'}} or a list of specs, "
                        f"got {type(models).__name__}")
    if not models:
        raise ValueError("models: an empty dict; give at least one model")
    for name in models:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"models: every name must be a non-empty str, got {name!r}")
    return list(models.items())


def _resolve_entry(name: str, value: Any, channels: int | None) -> _Entry:
    from erf.models import parse_model

    if isinstance(value, str):
        spec = parse_model(value)
        c = channels if channels is not None else spec.default_input_shape[0]
        if spec.weights:
            return _Entry(name, value, "weights", spec.build(c), True, spec.default_input_shape)
        return _Entry(name, value, "random", spec.factory(c), False, spec.default_input_shape)
    if isinstance(value, nn.Module):
        return _Entry(name, type(value).__name__, "weights", value, True, None)
    if callable(value):
        return _Entry(name, getattr(value, "__qualname__", type(value).__name__), "random", value, False, None)
    raise TypeError(f"models[{name!r}] must be an nn.Module, a zero-argument factory or a 'SPEC[@WEIGHTS]' "
                    f"string, got {type(value).__name__}")


def _weights_of(result) -> dict | None:
    return (result.meta.get("provenance") or {}).get("weights")


def _input_groups(options: dict, shape: tuple[int, ...], n: int, groups: int, seed: int):
    """Given inputs (a Tensor, ``images:...``, an iterable) split into ``groups`` disjoint parts
    (``x[g::groups]``) for fixed-weight models, whose groups must not repeat one set of inputs; with
    the inputs' provenance and fingerprint. ``None`` for generated inputs (disjoint streams already)."""
    import torch

    from erf._inputs import make_source

    inputs = options.get("inputs")
    if inputs is None or (isinstance(inputs, str) and inputs in ("gaussian", "uniform")):
        return None
    src = make_source(inputs, n, shape, seed, 1, options.get("preprocess"))
    x = src.get(0, 0, src.n) if hasattr(src, "get") else torch.cat([b for b in src.batches()])
    if x.shape[0] < groups:
        raise ValueError(f"inputs: {x.shape[0]} inputs cannot make groups={groups} disjoint groups for a model "
                         "with fixed weights; give more inputs or fewer groups")
    prov = (src.provenance() if hasattr(src, "provenance")
            else {"kind": src.describe() if hasattr(src, "describe") else type(inputs).__name__, "files_used": None,
                  "n": int(x.shape[0])})
    from erf._integrity import inputs_hash

    return [x[g::groups] for g in range(groups)], prov, inputs_hash(src)


def _model_row(e: _Entry, layer: Any, input_shape: tuple[int, ...], groups: int, draws: int, n_inputs: int,
               kaiming: bool, engine_init: Any, reduce: str, seed: int, options: dict, bar: Any,
               results: dict, split: Any = None) -> dict[str, Any]:
    """One model of :func:`compare_models`: its groups, merged map (into ``results``) and table row."""
    from erf.engine import effective_rf

    t0 = time.perf_counter()
    model = e.model
    if kaiming and not e.fixed:
        base = e.model

        def model(base=base):  # the He-initialised variant of the factory
            return kaiming_init(base())

        model.__qualname__ = f"{e.spec}+kaiming"
    parts = []
    for g in range(groups):
        bar.set_postfix_str(e.name)
        opts = options
        if e.fixed:
            kw = dict(n_inputs=draws * n_inputs, draws=1, first_draw=g, init="default")
            if split is not None:  # group g: its own part of the given inputs
                opts = {k: v for k, v in options.items() if k not in ("inputs", "preprocess")}
                kw["inputs"] = split[0][g]
        else:
            kw = dict(n_inputs=n_inputs, draws=draws, first_draw=g * draws, init=engine_init)
        res = effective_rf(model, input_shape, layer=layer, reduce=reduce, seed=seed,
                           progress=False, **kw, **opts)
        if isinstance(res, dict):
            raise ValueError(f"layer: one layer per model in compare, got a list for {e.name!r}")
        if e.fixed and split is not None and isinstance(res.config.get("fingerprint"), dict):
            # the parts of the given inputs merge into the run over all of them: its inputs' fingerprint
            res.config = dict(res.config, fingerprint=dict(res.config["fingerprint"], inputs=split[2]))
        parts.append(res)
        bar.update(1)
    from erf._degenerate import clip_trf

    full_side, _ = _trf_side(parts[0].trf)
    trf, clipped = clip_trf(parts[0].trf, input_shape)  # larger than the input: the clipped field, as map's
    if clipped:
        warnings.warn(f"{e.name}: {clipped}", stacklevel=3)
    side, is_global = _trf_side(trf)
    if getattr(parts[0].trf, "is_global", False):
        is_global = True
    merged = _merge_all(parts)
    if e.fixed and split is not None:  # record the given inputs, not the group's part of them
        merged.meta = dict(merged.meta, provenance=dict(merged.meta.get("provenance") or {}, inputs=split[1]))
    full = numbers_of(merged, side)
    se = jackknife(full, _leave_one_out(merged, parts, side))
    w = _weights_of(merged)
    row: dict[str, Any] = {"model": e.name, "pool": e.name, "spec": e.spec, "layer": merged.layer or "output",
                           "unit": list(merged.unit),
                           "weights": None if not w else os.path.basename(w.get("file") or w.get("path")),
                           "weights_sha256": None if not w else w.get("sha256"), "kind": e.kind,
                           "locality": "global" if is_global else "local",
                           "trf_size": None if side is None else round(side, 3), "trf_global": is_global,
                           "trf_unclipped": round(full_side, 3) if clipped and full_side else None}
    for key in NUMBERS:
        row[key], row[f"{key}_se"] = full[key], se[key]
    row["n"], row["seconds"] = merged.n, round(time.perf_counter() - t0, 3)
    results[e.name] = merged
    return row


def compare_models(models: Any, input_shape: Sequence[int] | None = None, *, groups: int = 4, draws: int = 3,
                   n_inputs: int = 4, init: str | Callable | None = None, reduce: str = "abs", seed: int = 0,
                   progress: bool = True, **options) -> Comparison:
    """ERF of the centre unit of any models side by side (``erf.compare(models=...)``), with standard errors.

    Same numbers, table and figures as the pooling comparison (module docstring: merged map,
    delete-one-group jackknife over ``groups`` independent groups). A model with fixed weights (an
    ``nn.Module``, or a spec with ``@WEIGHTS``) is measured as it is: each group is one set of
    ``draws * n_inputs`` inputs (disjoint input streams; given inputs, such as ``inputs="images:DIR"``
    or a Tensor, are read once, ``groups * draws * n_inputs`` of them, and split ``x[g::groups]``), so
    the standard errors cover the inputs.
    A factory or a spec without weights gets ``draws`` random weight draws of ``n_inputs`` inputs per
    group, as the pooling nets do. Two checkpoints of one model: ``{"before": "timm:resnet18@ep0.pth",
    "after": "timm:resnet18@ep90.pth"}``.

    Args:
        models: ``{"name": module | factory | "SPEC[@WEIGHTS]"}``, or a list (or comma-separated
            string) of specs named after themselves.
        input_shape: ``(C, H, W)``; default: the specs' common default (224 x 224 for timm/torchvision).
        layer: (in ``options``) one layer for every model, or ``{"name": layer}``; default: each model's
            own rule of :func:`erf.effective_rf`.
        init: for random-weight models, ``"default"`` (their own initialisation; the default) or any
            init of :func:`compare`; fixed-weight models refuse any other than ``"default"``.
        groups, draws, n_inputs, reduce, seed, progress, **options: as :func:`compare`.
    Raises:
        ValueError, TypeError: bad models, names, layers, shapes or options (each naming the argument).
    """
    from tqdm.auto import tqdm

    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 2:
        raise ValueError(f"groups must be an int >= 2 (standard errors need two groups), got {groups!r}")
    for name, value in (("draws", draws), ("n_inputs", n_inputs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for bad in ("first_draw", "model"):
        if bad in options:
            raise ValueError(f"{bad} is not an option of compare (groups set the draws and inputs)")
    pairs = _model_entries(models)
    layer = options.pop("layer", None)
    if isinstance(layer, dict):
        unknown = sorted(set(layer) - {n for n, _ in pairs})
        if unknown:
            raise ValueError(f"layer: names {unknown} are not among the models {[n for n, _ in pairs]}")
        layers = {n: layer.get(n) for n, _ in pairs}
    elif layer is None or isinstance(layer, str):
        layers = {n: layer for n, _ in pairs}
    else:
        raise TypeError(f"layer must be a module path (one for every model) or a dict name -> path, "
                        f"got {type(layer).__name__}")
    init = "default" if init is None else init
    channels = None if input_shape is None else int(tuple(input_shape)[0])
    entries = [_resolve_entry(n, v, channels) for n, v in pairs]  # builds and loads every checkpoint first
    if input_shape is None:
        shapes = {e.default_shape for e in entries if e.default_shape is not None}
        if len(shapes) != 1 or any(e.default_shape is None for e in entries):
            raise ValueError("input_shape: give input_shape (the models' default shapes "
                             f"{sorted(shapes) or 'are unknown'} do not settle one)")
        input_shape = shapes.pop()
    input_shape = tuple(int(x) for x in input_shape)
    for e in entries:
        if e.fixed and init != "default":
            raise ValueError(f"init: models[{e.name!r}] has fixed weights (a module or SPEC@WEIGHTS), which "
                             f"init={init!r} would re-draw; leave init unset for it")
    kaiming = init == "kaiming"
    engine_init = "default" if kaiming else init
    t_start = time.perf_counter()
    rows, results = [], {}
    bar = tqdm(total=len(entries) * groups, disable=None if progress else True, delay=1.0, unit="group",
               desc="compare", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("once")  # a model's warning (degenerate unit, ...) once, not once per group
            split = (_input_groups(options, input_shape, groups * draws * n_inputs, groups, seed)
                     if any(e.fixed for e in entries) else None)
            for e in entries:
                rows.append(_model_row(e, layers[e.name], input_shape, groups, draws, n_inputs, kaiming,
                                       engine_init, reduce, seed, options, bar, results, split))
    finally:
        bar.close()
    shape = "x".join(str(x) for x in input_shape)
    how = []
    if any(e.fixed for e in entries):
        how.append(f"given weights: {groups * draws * n_inputs} inputs")
    if not all(e.fixed for e in entries):
        how.append(f"random weights ({init if isinstance(init, str) else 'custom'} init): {groups * draws} draws x "
                   f"{n_inputs} inputs")
    layer_text = ", ".join(sorted({r["layer"] for r in rows}))
    caption = "\n".join(textwrap.wrap(f"ERF of each model's centre unit at {layer_text}, input {shape}, "
                                       f"reduce={reduce}; {'; '.join(how)}", 64)
                         + ["dashed box: TRF;  cyan: 2σ ellipse of the fitted Gaussian"])
    opts = {"models": {e.name: e.spec for e in entries}, "layers": {r["model"]: r["layer"] for r in rows},
            "input_shape": list(input_shape), "groups": groups, "draws": draws, "n_inputs": n_inputs,
            "init": init if isinstance(init, str) else getattr(init, "__qualname__", type(init).__name__),
            "reduce": reduce, "seed": seed, "caption": caption}
    opts.update({k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in options.items()})
    return Comparison(rows=rows, results=results, options=opts, seconds=round(time.perf_counter() - t_start, 3))


# ------------------------------------------------------------------------------ diff
@dataclass
class ERFDiff:
    """``a - b`` of two ERF maps on the same grid, with per-position z-scores and a per-map test.

    Attributes:
        map: ``a.map - b.map`` (or of the mass-normalised maps with ``normalize=True``).
        stderr: ``sqrt(se_a^2 + se_b^2)`` per position (clustered errors: draws are the units).
        z: z-equivalent of ``t = map / stderr`` under Student's t with Welch-Satterthwaite degrees
            of freedom (same two-sided p-value); 0 where both are 0, +-inf where only se is 0.
        df: those degrees of freedom per position.
        max_abs_z: largest finite |z|. frac_significant: share of positions with |z| > 3
            among those where either map is non-zero. normalized: whether maps were normalised.
        statistic, p_value, test: the per-map test (:func:`erf._stats.map_test`): do the maps
            differ at all? (Hotelling T^2 of per-draw moment features; NaN when not available.)
    """

    map: np.ndarray
    stderr: np.ndarray
    z: np.ndarray
    max_abs_z: float
    frac_significant: float
    normalized: bool = False
    df: np.ndarray | None = None
    statistic: float = math.nan
    p_value: float = math.nan
    test: str = ""

    def plot(self, ax=None, zmax: float = 5.0):
        """The z-score map on a diverging colour scale clipped at +-zmax; returns the Axes."""
        from erf.plot import plot_diff

        return plot_diff(self, ax=ax, zmax=zmax)


def _stderr_df(r) -> tuple[np.ndarray, float]:
    """A result's standard error and its degrees of freedom (draws - 1, or inputs - 1 with one draw)."""
    df = getattr(r, "stderr_df", None)
    if df is None:
        df = max(r.n - 1, 1)
    return r.stderr, float(df)


def diff(a, b, normalize: bool = False) -> ERFDiff:
    """Difference of two :class:`erf.ERFResult` maps, z-scores per position and one test per map.

    ``t = (a - b) / sqrt(se_a^2 + se_b^2)`` with each side's clustered standard error (weight draws
    as clusters, ``ERFResult.stderr``), turned into a z-equivalent through Student's t with
    Welch-Satterthwaite degrees of freedom (each side has draws - 1): |z| > 3 then happens at
    0.27 % of positions when the two runs measure the same thing. The per-map test
    (``p_value``) says whether the maps differ at all: Hotelling's T^2 over weight draws of
    moment features (:func:`erf._stats.map_test`), calibrated despite the spatial correlation.

    Args:
        a, b: results on the same input grid (any configurations).
        normalize: divide each map by its total sum |map| first, comparing shapes rather than
            magnitudes (the standard error of the shape includes the total's, by the delta method
            over draws: :meth:`erf._stats.ClusterStats.normalized_stderr`).
    Returns:
        :class:`ERFDiff`.
    Raises:
        TypeError: a or b is not an ERFResult. ValueError: the maps' shapes differ.
    """
    from erf._stats import map_test, welch_z
    from erf.engine import ERFResult

    for name, r in (("a", a), ("b", b)):
        if not isinstance(r, ERFResult):
            raise TypeError(f"{name} must be an ERFResult, got {type(r).__name__}")
    if a.map.shape != b.map.shape:
        raise ValueError(f"a and b must be maps on the same grid, got shapes {a.map.shape} and {b.map.shape}")
    (sa, dfa), (sb, dfb) = _stderr_df(a), _stderr_df(b)
    ma, mb = a.map, b.map
    ka = kb = 1.0
    if normalize:
        ta, tb = float(np.abs(ma).sum()), float(np.abs(mb).sum())
        if ta == 0 or tb == 0:
            raise ValueError("normalize=True needs maps with a non-zero total")
        ka, kb = 1.0 / ta, 1.0 / tb
        ma, mb = ma * ka, mb * kb
        # the shape's error includes the total's (per-draw delta method) when per-draw data exist
        ca, cb = getattr(a, "clusters", None), getattr(b, "clusters", None)
        sa = ca.normalized_stderr() if ca is not None else sa * ka
        sb = cb.normalized_stderr() if cb is not None else sb * kb
    d = ma - mb
    z, se, df = welch_z(d, sa, dfa, sb, dfb)
    finite = np.isfinite(z)
    support = (ma != 0) | (mb != 0)
    max_abs_z = float(np.abs(z[finite]).max()) if finite.any() else 0.0
    frac = float(np.mean(np.abs(z[support]) > 3)) if support.any() else 0.0
    test = map_test(getattr(a, "clusters", None), getattr(b, "clusters", None), shape_only=bool(normalize))
    return ERFDiff(map=d, stderr=se, z=z, max_abs_z=max_abs_z, frac_significant=frac, normalized=bool(normalize),
                   df=df, statistic=test.statistic, p_value=test.p_value, test=test.note)


class _CallableModule(type(sys)):
    """``erf.compare`` is both this submodule and the function: once ``erf.compare`` (the module) is
    imported, Python binds the package attribute to the module, so the module forwards calls."""

    def __call__(self, *args, **kwargs) -> Comparison:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
