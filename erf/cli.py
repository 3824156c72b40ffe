"""Command-line interface: ``erf map|compare|trf|theory|growth|pools|train|study``.

``main(argv) -> int`` parses, runs one command and writes its files; ``erf``, ``python -m erf``
and ``python cli.py`` all call :func:`main_entry`. Each command is a pure function of its
arguments returning an :class:`Outcome` (summary, text and the files to write); the files are
written at the edge, each atomically (temp file + rename), the main result (``.npz``) first.
Every output path is checked (a folder that can be created and written) before any work.

Exit status: 0 success; 2 bad usage or bad input (one line on stderr, no traceback); 1 an
unexpected failure (a file that could not be written included); 3 partial success: the main
result was written but an optional analysis (TRF, metrics, fit, figure) or a later file failed,
each named in a warning; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["main", "main_entry", "build_parser"]


class UsageError(Exception):
    """Bad command-line usage (argparse errors): exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line) instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


#: exit status of a partial success: the main result was written, an optional analysis or file failed
EXIT_PARTIAL = 3
#: exit status after SIGTERM (128 + 15, what shells report): the checkpoint, if any, was saved
EXIT_TERMINATED = 143


@dataclass
class Outcome:
    """What a command produced: a JSON-able summary, the text for stdout, files to write.

    The first file is the main result; ``failed`` names the optional analyses that failed
    (each already reported as a warning), which makes the exit status :data:`EXIT_PARTIAL`.
    """

    summary: dict[str, Any]
    text: str
    files: list[tuple[str, Callable[[str], Any]]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: runs once the main result (the first file) is written: the optional analyses
    after: Callable[["Outcome"], None] | None = None


def _optional(name: str, failed: list[str], fn: Callable[[], Any], default: Any = None) -> Any:
    """``fn()``, or ``default`` with a warning naming the analysis when it fails (the run is kept)."""
    import warnings

    try:
        return fn()
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        failed.append(name)
        warnings.warn(f"the {name} analysis failed ({type(exc).__name__}: {_one_line(exc)}); "
                      "the map is saved without it", RuntimeWarning, stacklevel=2)
        return default


# ------------------------------------------------------------------------------ helpers
def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r} (a positive int)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r} (a positive number)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def _out_path(args, name: str, ext: str | None = None) -> str:
    return os.path.join(args.out, f"{name}.{ext or args.format}")


def _figure_writer(fig) -> Callable[[str], Any]:
    from erf.plot import save_figure

    return lambda path: save_figure(fig, path)


def _text_writer(text: str) -> Callable[[str], Any]:
    from erf.compare import write_text_atomic

    return lambda path: write_text_atomic(path, text)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _markdown(rows: list[dict[str, Any]], columns: Sequence[str], fmt: dict[str, str] | None = None) -> str:
    fmt = fmt or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, float):
                cells.append("—" if not math.isfinite(v) else format(v, fmt.get(c, ".4g")))
            elif isinstance(v, (tuple, list)):
                cells.append(" x ".join(format(x, ".4g") if isinstance(x, float) else str(x) for x in v))
            elif isinstance(v, dict):
                cells.append(", ".join(f"{k}: {'—' if x is None else format(x, '.4g')}" for k, x in v.items()))
            else:
                cells.append("—" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ model + engine options
def _model_for(args, spec, input_shape):
    """The model (module with --weights, else a factory) and the engine's init for one run."""
    from erf.compare import kaiming_init

    init = args.init or "default"
    if spec.weights:  # --weights PATH or MODEL@PATH (erf.models.parse_model)
        if init != "default" or args.draws not in (None, 1):
            raise ValueError("--weights uses the given weights as they are: leave --init at default and --draws at 1")
        model = spec.build(input_shape[0])
        print(f"erf {args.command}: weights: {model.erf_weights}", file=sys.stderr)
        return model, "default"
    factory = spec.factory(input_shape[0])
    if init == "kaiming":
        base = factory

        def factory():  # noqa: F811 - the He-initialised variant of the spec's factory
            return kaiming_init(base())

        factory.__qualname__ = f"{spec.spec}+kaiming"
        init = "default"
    return factory, init


def _layout_kwargs(args) -> dict[str, Any]:
    """``--grid HxW`` and ``--layout`` (erf map only)."""
    kw: dict[str, Any] = {}
    grid = getattr(args, "grid", None)
    if grid is not None:
        import re

        parts = re.split(r"[x,×]", grid.strip().lower())
        if len(parts) < 1 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--grid must look like 14x14 (positive ints, one per spatial axis), got {grid!r}")
        kw["grid"] = tuple(int(p) for p in parts)
    if getattr(args, "layout", None) is not None:
        kw["layout"] = args.layout
    return kw


def _engine_kwargs(args) -> dict[str, Any]:
    from erf.models import parse_unit

    kw: dict[str, Any] = {"method": args.method, "seed": args.seed,
                          "progress": _progress(args), "device": args.device, "batch_size": args.batch_size}
    if args.reduce is not None:
        kw["reduce"] = args.reduce
    kw.update(_image_kwargs(args))
    if args.inputs is not None:
        kw["inputs"] = args.inputs
    if args.n_inputs is not None:
        kw["n_inputs"] = args.n_inputs
    if args.draws is not None:
        kw["draws"] = args.draws
    if args.layer is not None:
        kw["layer"] = _layer_arg(args.layer)
    if args.unit is not None:
        kw["unit"] = parse_unit(args.unit)
    kw.update(_layout_kwargs(args))
    if args.channel is not None:
        try:
            ch = [int(c) for c in args.channel.split(",")]
        except ValueError:
            raise ValueError(f"--channel must be an int or comma-separated ints, got {args.channel!r}") from None
        kw["channel"] = ch[0] if len(ch) == 1 else ch
    if args.resume and args.checkpoint is None:
        raise UsageError("--resume needs --checkpoint PATH (the file to continue from)")
    if args.checkpoint_every is not None and args.checkpoint is None:
        raise UsageError("--checkpoint-every needs --checkpoint PATH")
    if args.checkpoint is not None:
        kw["checkpoint"] = args.checkpoint
    if args.checkpoint_every is not None:
        kw["checkpoint_every"] = args.checkpoint_every
    if args.resume:
        kw["resume"] = True
    if args.distributed:
        if args.until_stderr is not None:
            raise UsageError("--until-stderr cannot be combined with --distributed (a stopping rule the "
                             "processes cannot share); give --n-inputs and --draws")
        kw["distributed"] = True
    if args.until_stderr is not None:
        kw["until_stderr"] = args.until_stderr
    return kw


def _image_kwargs(args) -> dict[str, Any]:
    """``protocol`` and ``preprocess`` from --protocol, --preprocess, --interpolation, --mean, --std,
    --crop-pct, --no-exif, --strict (only the options given: a protocol fills the rest)."""
    kw: dict[str, Any] = {}
    if getattr(args, "protocol", None):
        kw["protocol"] = args.protocol
    pp: dict[str, Any] = {}
    given = {k: getattr(args, k, None) for k in ("interpolation", "mean", "std", "crop_pct")}
    if getattr(args, "preprocess", None) == "timm":
        if any(v is not None for v in given.values()):
            raise UsageError("--preprocess timm takes the model's own data config: drop --interpolation, "
                             "--mean, --std and --crop-pct (or use --preprocess crop|squash)")
        kw["preprocess"] = "timm"
    elif getattr(args, "preprocess", None):
        pp["resize"] = args.preprocess
    if given["interpolation"] is not None:
        pp["interpolation"] = given["interpolation"]
    for key in ("mean", "std"):
        if given[key] is not None:
            try:
                pp[key] = tuple(float(v) for v in given[key].split(","))
            except ValueError:
                raise ValueError(f"--{key} must be comma-separated numbers such as 0.485,0.456,0.406, "
                                 f"got {given[key]!r}") from None
    if given["crop_pct"] is not None:
        pp["crop_pct"] = given["crop_pct"]
    if getattr(args, "no_exif", False):
        pp["exif"] = False
    if getattr(args, "strict", False):
        pp["strict"] = True
    if pp:
        inputs = getattr(args, "inputs", None) or ""
        if not inputs.startswith("images:"):
            raise UsageError("--preprocess, --interpolation, --mean, --std, --crop-pct, --no-exif and --strict "
                             "apply to --inputs images:... only")
        if "preprocess" in kw:
            raise UsageError("--preprocess timm cannot be combined with --no-exif/--strict")
        kw["preprocess"] = pp
    return kw


def _layer_arg(text: str) -> str | list[str]:
    """``--layer A`` -> ``"A"``; ``--layer A,B,C`` -> ``["A", "B", "C"]`` (one run, one forward pass per batch)."""
    if "," not in text:
        return text
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise UsageError(f"--layer: an empty layer name in {text!r}; give comma-separated module paths such as "
                         "layer2,layer3")
    return parts


def _input_shape(args, spec) -> tuple[int, ...]:
    from erf.models import parse_input_shape

    return parse_input_shape(args.input_shape) if args.input_shape else spec.default_input_shape


# ------------------------------------------------------------------------------ commands
def cmd_map(args) -> Outcome:
    """ERF heatmap of one unit: figure (linear/log views, TRF box, 1σ/2σ ellipses, profiles), .npz, summary."""
    from erf.engine import effective_rf
    from erf.models import parse_model

    kw = _engine_kwargs(args)  # option errors before any work
    spec = parse_model(args.model, weights=args.weights)
    shape = _input_shape(args, spec)
    model, init = _model_for(args, spec, shape)
    t0 = time.perf_counter()
    result = effective_rf(model, shape, init=init, **kw)
    seconds = time.perf_counter() - t0
    chosen = None if isinstance(result, dict) else result.meta.get("default_layer")
    if chosen:  # no --layer and a classifier: say which layer was analysed
        print(f"erf map: layer {chosen['layer']} ({chosen['reason']}); pass --layer to choose another", file=sys.stderr)
    if isinstance(result, dict):  # --layer A,B,C: one .npz, summary row and figure per layer, plus a panel
        return _map_layers_outcome(args, spec, result, seconds)
    name = f"map_{spec.slug}"
    outcome = Outcome({}, "", [], [])

    def analyses(o: Outcome) -> None:  # after the .npz is written: a failure here never loses the map
        o.summary = _result_summary(result, o.failed)
        o.summary.update({"model": spec.spec, "seconds": round(seconds, 3)})
        o.summary.update(_target_summary(result))
        if (result.meta.get("provenance") or {}).get("weights"):
            o.summary["weights"] = result.meta["provenance"]["weights"]
        rows = [{"quantity": k, "value": v} for k, v in o.summary.items()
                if k not in ("config", "weights", "provenance", "protocol")]
        if "weights" in o.summary:
            w = o.summary["weights"]
            rows.append({"quantity": "weights", "value": f"{os.path.basename(w['path'])} (sha256 {w['sha256'][:16]})"})
        rows += _essentials_rows(o.summary)
        o.text = _markdown(rows, ["quantity", "value"])

    # the .npz first (the run itself); the figure is drawn only when it is written, and a failure
    # there is a warning (exit status EXIT_PARTIAL), never the loss of the map
    outcome.files = [(_out_path(args, name, "npz"), result.save),
                     (_out_path(args, name), _map_figure_writer(spec, result, outcome.failed))]
    outcome.after = analyses
    return outcome


def _target_summary(result) -> dict[str, Any]:
    """The inferred layout and the default layer of a result, for the summary."""
    out: dict[str, Any] = {}
    lay = result.meta.get("layout") or {}
    if lay.get("layout") not in (None, "nchw"):
        out["layout"] = lay["layout"] + (f" (grid {'x'.join(map(str, lay['grid']))}, {lay['prefix_tokens']} prefix "
                                         f"tokens)" if lay.get("grid") else "")
    if result.meta.get("default_layer"):
        out["layer_chosen_by"] = result.meta["default_layer"]["reason"]
    return out


def _layer_slug(result) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", result.layer or "output").strip("-")[:60] or "output"


_LAYER_COLUMNS = ["layer", "unit", "trf_size", "erf_size", "erf_trf_ratio", "sigma_moments", "fit_r2", "anisotropy", "n"]


def _map_layers_outcome(args, spec, results: dict, seconds: float) -> Outcome:
    """Several layers of one run: ``map_SPEC_LAYER.npz`` and ``.png`` per layer, ``map_SPEC_layers.png``
    (one panel per layer: heatmap, TRF box, 2-sigma ellipse) and one summary row per layer."""
    outcome = Outcome({}, "", [], [])
    base = f"map_{spec.slug}"
    ordered = list(results.values())

    def analyses(o: Outcome) -> None:
        rows = [_result_summary(r, o.failed) for r in ordered]
        o.summary = {"model": spec.spec, "seconds": round(seconds, 3), "layers": rows}
        weights = (ordered[0].meta.get("provenance") or {}).get("weights")
        if weights:
            o.summary["weights"] = weights
        o.text = _markdown(rows, _LAYER_COLUMNS, {"erf_size": ".3g", "erf_trf_ratio": ".3f", "fit_r2": ".3f",
                                                  "anisotropy": ".3f"})

    def panel(path: str):
        def draw():
            from erf.compare import Comparison
            from erf.plot import save_figure

            by_layer = {(r.layer or "output"): r for r in ordered}
            rows = [{"pool": k, "erf_size": (s.get("erf_size") or float("nan")),
                     "erf_trf_ratio": s.get("erf_trf_ratio") if s.get("erf_trf_ratio") is not None else float("nan"),
                     "trf_global": s.get("trf_global", False)}
                    for k, s in zip(by_layer, outcome.summary.get("layers", [{}] * len(by_layer)))]
            import textwrap

            cfg = ordered[0].config
            who = spec.spec.split("@")[0] + (f"@{os.path.basename(spec.weights)}" if spec.weights else "")
            cols = len(ordered) if len(ordered) <= 4 else None
            text = (f"{who}: ERF of the centre unit per layer, input {'x'.join(map(str, ordered[0].input_shape))}, "
                    f"init={cfg.get('init')}, reduce={cfg.get('reduce')}, n={ordered[0].n}")
            caption = "\n".join(textwrap.wrap(text, 30 * (cols or 3))
                                 + ["dashed box: TRF;  cyan: 2σ ellipse of the fitted Gaussian"])
            comp = Comparison(rows=rows, results=by_layer, options={"caption": caption})
            return save_figure(comp.plot_grid(same_scale=False, cols=cols), path)
        return _optional("layers figure", outcome.failed, draw, _SKIPPED)

    files = [(_out_path(args, f"{base}_{_layer_slug(r)}", "npz"), r.save) for r in ordered]
    files += [(_out_path(args, f"{base}_{_layer_slug(r)}"), _map_figure_writer(spec, r, outcome.failed))
              for r in ordered]
    if all(r.ndim_spatial == 2 for r in ordered):
        files.append((_out_path(args, f"{base}_layers"), panel))
    outcome.files, outcome.after = files, analyses
    return outcome


def _map_figure_writer(spec, result, failed: list[str]) -> Callable[[str], Any]:
    def write(path: str):
        def draw():
            from erf.plot import map_figure, new_figure, plot_result, save_figure

            if result.ndim_spatial == 2:
                fig = map_figure(result, title=_map_title(spec, result))
            else:
                fig = new_figure(6, 4.5)
                plot_result(result, ax=fig.subplots())
            return save_figure(fig, path)
        return _optional("figure", failed, draw, _SKIPPED)
    return write


_SKIPPED = object()  # a writer's answer when its optional file was not written


def _essentials_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Protocol metrics and provenance as flat table rows (the JSON summary keeps them nested)."""
    rows: list[dict[str, Any]] = []
    proto = summary.get("protocol")
    if proto:
        rows.append({"quantity": "protocol", "value": proto["name"] + (" (modified: " + ", ".join(proto["overridden"])
                                                                       + ")" if proto.get("overridden") else "")})
        for k, v in proto["metrics"].items():
            if k == "protocol":
                continue
            if isinstance(v, dict):
                v = ", ".join(f"{kk}: {'—' if vv is None else (format(vv, '.4g') if isinstance(vv, float) else vv)}"
                              for kk, vv in v.items())
            rows.append({"quantity": f"{proto['name']} {k}", "value": v})
    prov = summary.get("provenance") or {}
    from erf.plot import provenance_caption

    cap = provenance_caption(prov, width=10**6)
    if cap:
        rows.append({"quantity": "provenance", "value": cap})
    return rows


def _map_title(spec, result) -> str:
    from erf.plot import result_title

    cfg = result.config
    return (f"{spec.spec}: {result_title(result)}\ninit={cfg.get('init')}, reduce={cfg.get('reduce')}, "
            f"draws={cfg.get('draws')}, inputs/draw={cfg.get('n_inputs')}, method={cfg.get('method')}")


def _result_summary(result, failed: list[str] | None = None) -> dict[str, Any]:
    """The run's summary; each analysis (TRF, moments, fit, metrics) is optional: a failure is a
    warning naming it (recorded in ``failed``) and its entries are ``None``."""
    failed = [] if failed is None else failed
    out: dict[str, Any] = {"layer": result.layer or "output", "unit": list(result.unit),
                           "input_shape": list(result.input_shape), "n": result.n}
    mom = _optional("moments", failed, lambda: result.moments)
    out["sigma_moments"] = None if mom is None else [float(s) for s in mom.sigma]
    fit = _optional("fit", failed, lambda: result.fit)
    out["sigma_fit"] = None if fit is None else [float(s) for s in fit.sigma]
    out["fit_r2"] = None if fit is None else float(fit.r2)
    trf = _optional("TRF", failed, lambda: result.trf)
    if trf is not None:
        out["trf_size"] = list(trf.size)
        out["trf_global"] = bool(getattr(trf, "is_global", False))
    elif getattr(result, "trf_reason", None):
        out["trf_size"] = None  # unknown: the analyser could not follow the model (no ERF/TRF ratio)
        out["trf_unavailable"] = result.trf_reason
    if trf is None and "TRF" in failed:  # the metrics without the TRF (no ERF/TRF ratio)
        from erf.fit import metrics as _metrics

        met = _optional("metrics", failed, lambda: _metrics(result.nonnegative_map))
    else:
        met = _optional("metrics", failed, lambda: result.metrics)
    if met is None:
        out.update({"erf_size": None, "erf_trf_ratio": None, "anisotropy": None, "area_ratio": None})
        return out
    out["erf_size"] = None if met["erf_size"] is None else float(met["erf_size"])
    ratio = met.get("erf_trf_ratio")
    out["erf_trf_ratio"] = None if not ratio else float(ratio["overall"])
    out["anisotropy"] = float(met["anisotropy"])
    out["area_ratio"] = {str(k): (None if v is None else float(v)) for k, v in met["area_ratio"].items()}
    out["area_ratio_kind"] = "raw map, centred squares from side 1 around the TRF centre, >= (not RepLKNet's)"
    proto = result.config.get("protocol")
    if isinstance(proto, dict) and proto.get("name"):
        from erf.protocols import score

        out["protocol"] = {"name": proto["name"], "overridden": proto.get("overridden", {}),
                           "metrics": _optional(f"{proto['name']} metrics", failed,
                                                lambda: score(result, proto["name"])) or {}}
    prov = result.meta.get("provenance")
    if prov:
        out["provenance"] = prov
    return out


def cmd_compare(args) -> Outcome:
    """The pooling-module comparison: grid figure, ratio bar chart, table as md/csv/json."""
    from erf.compare import compare
    from erf.models import parse_input_shape

    kw: dict[str, Any] = {"progress": _progress(args), "seed": args.seed, "reduce": args.reduce or "abs",
                          "device": args.device, "batch_size": args.batch_size}
    for name in ("groups", "draws", "n_inputs"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.init is not None:
        kw["init"] = args.init
    if args.inputs is not None:
        kw["inputs"] = args.inputs
    if args.models is not None:  # any models side by side (SPEC[@WEIGHTS],...): erf.compare(models=...)
        if args.pools != "all":
            raise UsageError("give --models or --pools, not both")
        shape = parse_input_shape(args.input_shape) if args.input_shape else None
        comp = compare(models=args.models, input_shape=shape, layer=args.layer, **kw)
    else:
        if args.layer is not None:
            raise UsageError("--layer needs --models (the pooling comparison measures the net's output)")
        shape = parse_input_shape(args.input_shape) if args.input_shape else (3, 128, 128)
        comp = compare(args.pools, input_shape=shape, **kw)
    md = comp.to_markdown()
    files = [(_out_path(args, "compare_grid"), _figure_writer(comp.plot_grid(same_scale=args.same_scale))),
             (_out_path(args, "compare_ratios"), _figure_writer(comp.plot_ratios())),
             (_out_path(args, "compare", "md"), _text_writer(md)),
             (_out_path(args, "compare", "csv"), comp.to_csv),
             (_out_path(args, "compare", "json"), comp.to_json)]
    return Outcome(comp.to_dict(), md, files)


def cmd_trf(args) -> Outcome:
    """Theoretical receptive field of one unit, one row per layer."""
    from erf.models import parse_model, parse_unit
    from erf.trf import theoretical_rf

    spec = parse_model(args.model, weights=args.weights)
    shape = _input_shape(args, spec)
    model = spec.build(shape[0])
    unit = parse_unit(args.unit) if args.unit is not None else None
    rep = theoretical_rf(model, shape, layer=args.layer, unit=unit)
    summary = {"model": spec.spec, "input_shape": list(shape), "size": rep.size, "jump": rep.jump,
               "padding": rep.padding, "region": rep.region, "center": rep.center, "is_global": rep.is_global,
               "local_size": getattr(rep, "local_size", None), "table": rep.table()}
    summary = _jsonable(summary)
    text = rep.to_text() + "\n"
    files = []
    if args.out_given:
        files.append((_out_path(args, f"trf_{spec.slug}", "txt"), _text_writer(text)))
        files.append((_out_path(args, f"trf_{spec.slug}", "json"), _text_writer(json.dumps(summary, indent=1) + "\n")))
    return Outcome(summary, text, files)


def cmd_theory(args) -> Outcome:
    """Linear stacks against the closed forms (:func:`erf.studies.theory`): uniform weights vs the
    multinomial profile, and the ``square`` map of random weights vs the same shape (Luo et al. 2016)."""
    from erf.studies import theory

    n, k = args.depth, args.k
    result = theory(depth=n, k=k, draws=args.draws, width=args.width, device=args.device, seed=args.seed,
                    progress=_progress(args))
    rows, cols, fmts = result.tables["cases"]
    text = _markdown(rows, cols, fmts)
    summary = _jsonable({"depth": n, "k": k, "input_shape": result.config["input_shape"],
                         "rows": [{k2: v for k2, v in cs.items() if not k2.startswith("_")} for cs in rows]})
    files = [(_out_path(args, f"theory_n{n}_k{k}"), _figure_writer(result.figure())),
             (_out_path(args, f"theory_n{n}_k{k}", "md"), _text_writer(text))]
    return Outcome(summary, text, files)


def cmd_growth(args) -> Outcome:
    """ERF size and TRF size against depth (log-log), with fitted slopes (:func:`erf.studies.growth`)."""
    from erf.studies import growth
    from erf.studies.linear import growth_text

    try:
        depths = sorted({int(d) for d in args.depths.split(",")})
    except ValueError:
        raise ValueError(f"--depths must be comma-separated ints such as 8,16,32, got {args.depths!r}") from None
    if len(depths) < 2 or depths[0] < 1:
        raise ValueError(f"--depths needs at least two positive depths, got {args.depths!r}")
    acts = [a.strip() for a in args.acts.split(",") if a.strip()]
    if not acts:
        raise ValueError(f"--acts needs at least one of linear or an activation name, got {args.acts!r}")
    try:
        result = growth(depths, acts, k=args.k, width=args.width, draws=args.draws, n_inputs=args.n_inputs,
                        device=args.device, seed=args.seed, progress=_progress(args))
    except ValueError as exc:
        raise ValueError(str(exc).replace("acts: ", "--acts: ", 1)) from None
    text = growth_text(result)
    summary = _jsonable({"k": args.k, "depths": depths, "rows": result.data["rows"], "slopes": result.data["slopes"]})
    files = [(_out_path(args, "growth"), _figure_writer(result.figure())),
             (_out_path(args, "growth", "md"), _text_writer(text))]
    return Outcome(summary, text, files)


def _train_model(args, classes: int):
    """The classifier for ``erf train``: ``pool:NAME`` is :func:`erf.nets.pooling_classifier`."""
    import torch

    torch.manual_seed(args.seed)  # the model's initialisation is part of the run's seed
    if args.model.startswith("pool:"):
        from erf.nets import pooling_classifier

        return pooling_classifier(args.model[5:], classes, depth=args.depth, width=args.width), args.model
    from erf.models import parse_model

    spec = parse_model(args.model)
    model = spec.build(3)
    if args.weights:
        from erf.models import load_weights

        load_weights(model, args.weights)
    return model, spec.spec


def cmd_train(args) -> Outcome:
    """Train a classifier on a generated task with ERF snapshots: figure, table (md/csv/json), .npz files."""
    from erf import tasks
    from erf.training import snapshot_epochs, train

    snapshot_epochs(args.epochs, args.erf_every)  # option errors before any work
    model, name = _train_model(args, tasks.classes_of(args.task))
    run = train(model, args.task, epochs=args.epochs, erf_every=args.erf_every, n_train=args.n_train,
                n_test=args.n_test, size=args.size, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                erf_n=args.erf_n, erf_layer=args.layer, device=args.device, pool_lr=args.pool_lr,
                checkpoint=args.checkpoint, resume=args.resume, progress=_progress(args) and not args.json)
    run.config["model"] = name
    slug = f"train_{name.replace(':', '-').replace('/', '-')}_{args.task}"
    cols = ["epoch", "loss", "train_acc", "test_acc", "erf_size_task", "erf_size_gaussian", "sigma_row_task",
            "sigma_col_task", "anisotropy_task", "erf_trf_task", "fit_r2_task"]
    extra = [c for c in (run.table()[0] if run.history else {}) if c.endswith(("r_h", "r_w", ".p"))]
    md = run.to_markdown(cols + extra)
    files = [(_out_path(args, slug), _figure_writer(run.plot())),
             (_out_path(args, slug, "md"), _text_writer(md)),
             (_out_path(args, slug, "csv"), run.to_csv),
             (_out_path(args, slug, "json"), run.to_json),
             (_out_path(args, slug, "npz"), run.save)]
    for epoch, by_kind in run.erfs.items():
        for kind, res in by_kind.items():
            files.append((_out_path(args, f"{slug}_e{epoch}_{kind}", "npz"), res.save))
    summary = {"model": name, "task": args.task, "config": run.config, "history": run.history,
               "seconds": round(sum(run.seconds), 3)}
    return Outcome(summary, md, files)


def cmd_study(args) -> Outcome:
    """Run one study of :mod:`erf.studies` and write its figure and table (md/csv/json)."""
    from erf import studies

    result = studies.run(args.name, quick=args.quick, seed=args.seed, progress=_progress(args) and not args.json)
    stem = f"study_{args.name.replace('-', '_')}" + ("_quick" if args.quick else "")
    md = result.to_markdown()
    files = [(_out_path(args, stem), _figure_writer(result.figure())),
             (_out_path(args, stem, "md"), _text_writer(md)),
             (_out_path(args, stem, "csv"), result.to_csv),
             (_out_path(args, stem, "json"), result.to_json)]
    return Outcome(result.to_dict(), md, files)


def cmd_analyze(args) -> Outcome:
    """Re-score a saved map (.npz result or a bare .npy of RepLKNet/OpenERF scripts) under a protocol."""
    from erf.analyze import analyze

    summary, result = analyze(args.file, args.protocol)
    rows = [{"quantity": k, "value": v} for k, v in summary.items() if k not in ("metrics", "erf_metrics")]
    for k, v in (summary.get("erf_metrics") or {}).items():
        rows.append({"quantity": f"erf {k}", "value": v})
    for proto, met in summary["metrics"].items():
        for k, v in met.items():
            if k != "protocol":
                rows.append({"quantity": f"{proto} {k}", "value": v})
    stem = os.path.splitext(os.path.basename(args.file))[0]
    files = []
    if len(summary["shape"]) == 2:
        from erf.plot import map_figure

        title = f"{os.path.basename(args.file)}: " + (f"{summary['protocol']} view" if summary["protocol"] else "map")
        files.append((_out_path(args, f"analyze_{stem}"), _figure_writer(map_figure(result, title=title))))
    return Outcome(summary, _markdown(rows, ["quantity", "value"]), files)


def cmd_pools(args) -> Outcome:
    """The pooling modules of ``erf.pooling.REGISTRY`` with kind, locality, receptive-field rule and paper."""
    from erf.pooling import REGISTRY

    rows = [{"name": e.name, "role": "head" if e.head else ("downsampling" if e.downsampling else "same size"),
             "kind": e.kind, "locality": e.locality, "rf": e.rf, "paper": e.paper} for e in REGISTRY.values()]
    text = _markdown(rows, ["name", "role", "kind", "locality", "rf", "paper"])
    return Outcome({"pools": rows}, text, [])


# ------------------------------------------------------------------------------ parser
_EPILOG = {
    "map": "example:\n  erf map pool:softpool --n-inputs 32 --draws 4\n  erf map stack:10 --init ones --reduce mean "
           "--input-shape 1x48x48\n  erf map torchvision:resnet18 --layer layer2 --input-shape 3x128x128 --out maps",
    "compare": "example:\n  erf compare                      # every module, writes figures/compare_*\n"
               "  erf compare --pools max,avg,softpool --json --out /tmp/cmp\n"
               "  erf compare --models timm:resnet18@ep0.pth,timm:resnet18@ep90.pth --layer layer4",
    "trf": "example:\n  erf trf torchvision:resnet18\n  erf trf pool:maxblur --input-shape 3x128x128 --json",
    "theory": "example:\n  erf theory --depth 10 --k 3",
    "growth": "example:\n  erf growth                        # linear, ReLU and tanh stacks\n"
              "  erf growth --acts linear --depths 8,16,32,64",
    "pools": "example:\n  erf pools --json",
    "analyze": "example:\n  erf analyze resnet101_erf_matrix.npy --protocol replknet",
    "train": "example:\n  erf train pool:dynopool --task stretched --epochs 6 --erf-every 2\n"
             "  erf train pool:max --task shapes --epochs 4 --out runs --json",
    "study": "example:\n  erf study luo2016 --quick\n  erf study trained-pools\n  erf study dynopool --out figures",
}


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    from erf.protocols import PROTOCOLS

    g = p.add_argument_group("published protocols and images (erf.protocols, erf._images)")
    g.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="fix every option the published method fixes (explicit options override and are recorded): "
                        "replknet (Ding et al. 2022), openerf (OpenERF), luo2016 (Luo et al. 2016)")
    g.add_argument("--preprocess", choices=("crop", "squash", "timm"),
                   help="images: crop = shorter side + centre crop (default), squash = resize to the input shape, "
                        "timm = the model's timm data config")
    g.add_argument("--interpolation", choices=("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"),
                   help="images: resampling filter (default bilinear)")
    g.add_argument("--mean", metavar="M,M,M", help="images: normalisation mean (default ImageNet's)")
    g.add_argument("--std", metavar="S,S,S", help="images: normalisation std (default ImageNet's)")
    g.add_argument("--crop-pct", type=_positive_float, metavar="F", help="images: crop share (default 1.0)")
    g.add_argument("--no-exif", action="store_true", help="images: ignore the EXIF orientation")
    g.add_argument("--strict", action="store_true", help="images: refuse unreadable files (exit 2) instead of skipping")


def build_parser() -> argparse.ArgumentParser:
    """The ``erf`` argument parser (subcommands map, compare, trf, theory, growth, pools)."""
    p = _Parser(prog="erf", description="Effective receptive fields of PyTorch networks (Luo et al. 2016).",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="MODEL: pool:NAME | stack:N[:ACT] | torchvision:NAME | timm:NAME | FILE.py:FACTORY | "
                       "package.module:FACTORY\nexample:\n  erf compare\n  erf map pool:max\n  erf map --help")
    from erf import __version__

    p.add_argument("--version", action="version", version=f"erf {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    out = _Parser(add_help=False)
    g = out.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=None, help="folder for figures and files (default: figures)")
    g.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="figure format (default png)")
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON summary on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr, only on a terminal)")

    run = _Parser(add_help=False)
    r = run.add_argument_group("measurement (as erf.effective_rf)")
    r.add_argument("--input-shape", metavar="CxHxW", help="input shape, e.g. 3x64x64 (default: suits the model)")
    r.add_argument("--inputs", help="gaussian, uniform or images:DIR|LIST.txt|GLOB (default gaussian); images: "
                                    "the first --n-inputs readable files, folders read recursively")
    r.add_argument("--n-inputs", type=_positive_int, help="inputs per weight draw")
    r.add_argument("--draws", type=_positive_int, help="random weight draws")
    r.add_argument("--init", choices=("default", "ones", "normal", "kaiming", "kaiming_all"),
                   help="default, ones, normal, kaiming (He-normal convs, zero biases) or kaiming_all (also "
                        "random normalisation/layer-scale scales: residual branches that start at zero count)")
    r.add_argument("--reduce", choices=("abs", "mean", "square", "relu", "relu_of_mean"), default=None,
                   help="gradient -> map (default abs, or the protocol's)")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    r.add_argument("--seed", type=int, default=0, help="seed of every random stream (default 0)")
    r.add_argument("--batch-size", type=_positive_int, help="batch size (default: auto)")

    unit = _Parser(add_help=False)
    u = unit.add_argument_group("unit")
    u.add_argument("--layer", help="module path holding the unit, e.g. layer3 (default: model output); "
                   "several, comma-separated (layer2,layer3,layer4), share one run")
    u.add_argument("--unit", metavar="R,C", help="spatial index of the unit, e.g. 8,8 (default: centre)")
    u.add_argument("--weights", metavar="PATH", help="weights file: .pt/.pth/.bin (torch.load weights_only=True) or "
                   ".safetensors; training checkpoints are unwrapped (state_dict, model(_ema), params(_ema), "
                   "module. prefix); also MODEL@PATH")

    fmt = argparse.RawDescriptionHelpFormatter
    m = sub.add_parser("map", parents=[run, unit, out], help="ERF heatmap of one unit: figure + .npz + summary",
                       description="ERF heatmap of one unit: figure + .npz + summary.", epilog=_EPILOG["map"],
                       formatter_class=fmt)
    m.add_argument("model", metavar="MODEL")
    _add_protocol_options(m)
    m.add_argument("--channel", help="channel(s) of the unit, e.g. 3 or 0,5 (default: sum over channels)")
    m.add_argument("--grid", metavar="HxW", help="read a token output (N, L, D) as an HxW grid after its leading "
                   "prefix tokens (default: inferred from the model and the input)")
    m.add_argument("--layout", choices=("nchw", "nhwc", "tokens"),
                   help="layout of the layer's output when it cannot be inferred (default: inferred)")
    m.add_argument("--method", default="gradient",
                   choices=("gradient", "guided_backprop", "deconvolution", "integrated_gradients"))
    m.add_argument("--checkpoint", metavar="PATH", help="save the running sums here (atomically); with --resume continue")
    m.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                   help="batches between checkpoint saves (default 20)")
    m.add_argument("--resume", action="store_true", help="continue from --checkpoint (a fresh run if it is absent)")
    m.add_argument("--overwrite", action="store_true",
                   help="start afresh even though --checkpoint exists (its progress is lost)")
    m.add_argument("--until-stderr", type=_positive_float, metavar="X",
                   help="stop once the centre's relative stderr < X")
    m.add_argument("--distributed", action="store_true",
                   help="share the run among torchrun processes (only rank 0 writes and prints)")
    m.set_defaults(func=cmd_map)

    c = sub.add_parser("compare", parents=[run, out], help="the pooling-module comparison (grid, bars, table)",
                       description="ERF of pooling_net(module) for every downsampling module of erf.pooling, "
                                   "with standard errors from independent groups of weight draws.",
                       epilog=_EPILOG["compare"], formatter_class=fmt)
    c.add_argument("--pools", default="all", help="comma-separated module names or 'all' (default)")
    c.add_argument("--models", metavar="SPEC[@WEIGHTS],...",
                   help="compare these models instead of pooling modules, e.g. timm:resnet18@ep0.pth,"
                        "timm:resnet18@ep90.pth (one model's two checkpoints) or timm:resnet18,timm:convnext_atto")
    c.add_argument("--layer", help="with --models: the layer of every model (default: each model's own rule)")
    c.add_argument("--groups", type=_positive_int, help="independent groups of draws for standard errors (default 4)")
    c.add_argument("--same-scale", action="store_true", default=True,
                   help="grid: maps as mass shares on one colour scale with one colour bar (the default)")
    c.add_argument("--per-panel-scale", dest="same_scale", action="store_false",
                   help="grid: each panel on its own colour scale")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("trf", parents=[unit, out], help="theoretical receptive field per layer",
                       description="Theoretical receptive field of one unit, per layer (erf.theoretical_rf).",
                       epilog=_EPILOG["trf"], formatter_class=fmt)
    t.add_argument("model", metavar="MODEL")
    t.add_argument("--input-shape", metavar="CxHxW", help="input shape, e.g. 3x224x224")
    t.set_defaults(func=cmd_trf)

    th = sub.add_parser("theory", parents=[out], help="binomial/Gaussian theory against measurement",
                        description="Linear 3x3 stacks against the closed forms of Luo et al. 2016: uniform "
                                    "weights vs the multinomial profile (exact), and the square map of random "
                                    "weights vs the same shape.", epilog=_EPILOG["theory"], formatter_class=fmt)
    th.add_argument("--depth", type=_positive_int, default=10, help="layers (default 10)")
    th.add_argument("--k", type=_positive_int, default=3, help="kernel size (default 3)")
    th.add_argument("--draws", type=_positive_int, default=128, help="random weight draws for the square map (default 128)")
    th.add_argument("--width", type=_positive_int, default=16, help="channels of the random stack (default 16)")
    th.add_argument("--device")
    th.add_argument("--seed", type=int, default=0)
    th.set_defaults(func=cmd_theory)

    gr = sub.add_parser("growth", parents=[out], help="ERF and TRF size against depth, log-log slopes",
                        description="ERF size (Luo et al.) and TRF size of 3x3 stacks against depth, with "
                                    "least-squares log-log slopes (theory: ERF 0.5, TRF 1).",
                        epilog=_EPILOG["growth"], formatter_class=fmt)
    gr.add_argument("--depths", default="8,16,32,64", help="comma-separated depths (default 8,16,32,64)")
    gr.add_argument("--acts", default="linear,relu,tanh", help="linear (uniform weights) and/or activations")
    gr.add_argument("--k", type=_positive_int, default=3)
    gr.add_argument("--width", type=_positive_int, default=4, help="channels of the random stacks (default 4)")
    gr.add_argument("--draws", type=_positive_int, default=4, help="weight draws of the random stacks (default 4)")
    gr.add_argument("--n-inputs", type=_positive_int, default=8, help="inputs per draw of the random stacks (default 8)")
    gr.add_argument("--device")
    gr.add_argument("--seed", type=int, default=0)
    gr.set_defaults(func=cmd_growth)

    an = sub.add_parser("analyze", parents=[out], help="re-score a saved map (.npz or a bare .npy) under a protocol",
                        description="Re-score a saved ERF map under a published protocol's metrics and figure: an "
                                    "erf result (.npz) or the bare .npy matrix that RepLKNet's visualize_erf.py or "
                                    "OpenERF save (RepLKNet's float32 matrix is scored exactly as analyze_erf.py).",
                        epilog="example:\n  erf analyze resnet101_erf_matrix.npy --protocol replknet\n"
                               "  erf analyze figures/map_pool-max.npz --protocol openerf --json",
                        formatter_class=fmt)
    an.add_argument("file", metavar="FILE", help="a .npz written by erf (ERFResult.save) or a 2-D .npy map")
    from erf.protocols import PROTOCOLS

    an.add_argument("--protocol", choices=sorted(PROTOCOLS),
                    help="score and show the map as this protocol does (default: the result's own, or all that apply)")
    an.set_defaults(func=cmd_analyze)

    po = sub.add_parser("pools", parents=[out], help="the pooling modules and their receptive-field rules",
                        description="The pooling modules of erf.pooling with kind, locality, receptive-field "
                                    "rule and paper.", epilog=_EPILOG["pools"], formatter_class=fmt)
    po.set_defaults(func=cmd_pools)

    tr = sub.add_parser("train", parents=[out], help="train on a generated task with ERF snapshots",
                        description="Train a classifier on a generated task (erf.tasks) and measure its ERF at "
                                    "epoch 0 and every --erf-every epochs (erf.train): figure, table, .npz files.",
                        epilog=_EPILOG["train"], formatter_class=fmt)
    tr.add_argument("model", metavar="MODEL", help="pool:NAME (pooling_classifier) or a MODEL spec returning logits")
    tr.add_argument("--task", required=True, help="shapes, stretched, tiled, zoomed or marks")
    tr.add_argument("--epochs", type=_positive_int, required=True)
    tr.add_argument("--erf-every", type=_positive_int, default=1, help="epochs between ERF snapshots (default 1)")
    tr.add_argument("--n-train", type=_positive_int, default=1024, help="training images (default 1024)")
    tr.add_argument("--n-test", type=_positive_int, default=256, help="held-out images (default 256)")
    tr.add_argument("--size", type=_positive_int, default=32, help="image side in px (default 32)")
    tr.add_argument("--depth", type=int, default=2, help="pooling stages of pool:NAME (default 2)")
    tr.add_argument("--width", type=_positive_int, default=16, help="channels of pool:NAME (default 16)")
    tr.add_argument("--batch-size", type=_positive_int, default=32)
    tr.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam learning rate (default 3e-3)")
    tr.add_argument("--pool-lr", type=_positive_float, help="learning rate of pooling parameters (default --lr)")
    tr.add_argument("--erf-n", type=_positive_int, default=16, help="images (and Gaussian inputs) per ERF (default 16)")
    tr.add_argument("--layer", help="layer holding the unit (default: the last spatial feature map)")
    tr.add_argument("--weights", metavar="PATH", help="state dict for a MODEL spec")
    tr.add_argument("--checkpoint", metavar="PATH", help="save the run after every epoch; with --resume continue")
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    tr.add_argument("--device")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train)

    st = sub.add_parser("study", parents=[out], help="luo2016, trained-pools, dynopool, theory, growth",
                        description="Run a study of erf.studies and write its figure and table.",
                        epilog=_EPILOG["study"], formatter_class=fmt)
    st.add_argument("name", metavar="NAME", help="luo2016, trained-pools, dynopool, theory or growth")
    st.add_argument("--quick", action="store_true", help="the small variant (under a minute on 2 CPU cores)")
    st.add_argument("--seed", type=int, default=0)
    st.set_defaults(func=cmd_study)
    return p


# ------------------------------------------------------------------------------ main
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 600 else text[:597] + "..."


# The engine names its arguments as in Python; on the command line the option is named instead.
_OPTION_OF = {"protocol": "--protocol", "preprocess": "--preprocess", "input_shape": "--input-shape", "n_inputs": "--n-inputs", "batch_size": "--batch-size",
              "until_stderr": "--until-stderr", "checkpoint_every": "--checkpoint-every", "unit": "--unit",
              "channel": "--channel", "layer": "--layer", "inputs": "--inputs", "device": "--device",
              "draws": "--draws", "checkpoint": "--checkpoint", "reduce": "--reduce", "method": "--method",
              "weights": "--weights", "models": "--models", "init": "--init", "grid": "--grid", "layout": "--layout"}


def _cli_message(text: str) -> str:
    """An engine message as the command line says it: ``n_inputs must ...`` -> ``--n-inputs must ...``."""
    if "; pass nonfinite='skip'" in text:  # options of the Python API only: say what the CLI can do
        text = (text.split("; pass nonfinite='skip'")[0] + "; try smaller or normalised inputs (the Python API "
                "can skip such samples: erf.effective_rf(..., nonfinite='skip'))")
    if text.startswith("select: ") and "; pass select=" in text:  # no --select: point at --layer
        text = (text.split("; pass select=")[0].replace("select: ", "--layer: ", 1)
                + "; pass --layer PATH naming a layer whose output is one tensor, or a FILE.py:FACTORY "
                  "whose model returns one tensor")
    if text.startswith("layer: ") and "; pass layer=" in text:
        text = "--" + text.split("; pass layer=")[0] + "; pass --layer PATH naming a layer with spatial axes"
    head, sep, rest = text.partition(" ")
    key = head.rstrip(":")
    if key in _OPTION_OF:
        return _OPTION_OF[key] + head[len(key):] + sep + rest
    return text


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """Parse only: the namespace, or the exit status (2 after one line on stderr; 0 for --help)."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(_one_line(exc), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else 2
    args.out_given = getattr(args, "out", None) is not None
    if hasattr(args, "out") and args.out is None:
        args.out = "figures"
    return args


def _show_warning(args):
    """warnings as one line on stderr: ``erf map: warning: ...``."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"erf {args.command}: warning: {_one_line(message)}", file=sys.stderr)
    return show


def _resume_hint(args, saved: bool) -> str:
    """What is on disk after an interruption, and how to continue (true to the state of the file)."""
    path = getattr(args, "checkpoint", None)
    if path and saved:
        return f"progress saved to {path!r}; run the same command with --resume to continue"
    if path and os.path.isfile(path):
        return (f"stopped before this run saved any progress; {path!r} holds the earlier progress: run the same "
                "command with --resume to continue from it")
    if path:
        return f"stopped before the first checkpoint: nothing was saved to {path!r}"
    if hasattr(args, "resume"):
        return "nothing was saved; pass --checkpoint PATH to be able to resume with --resume"
    return "nothing was saved"


# Commands whose files go to --out (the default folder included); `trf` writes only with --out.
_WRITES_ALWAYS = ("map", "compare", "theory", "growth")


def _writable_folder(folder: str, what: str) -> None:
    """``folder`` exists or can be created, and a file can be written in it (before any work).

    Raises ValueError naming ``what`` for a path under a file, a read-only or full file system."""
    import errno
    import tempfile

    probe = os.path.abspath(folder or ".")
    parent = probe
    while not os.path.exists(parent):  # the first existing ancestor must be a folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {folder!r}: {parent!r} is a file, not a folder")
    created = []  # folders made for the test, removed after it (the check leaves no trace)
    d = probe
    while d != parent:
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(probe, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".erf-write-test-", dir=probe)
        try:
            os.write(fd, b"\0" * 4096)  # one page: fails on a full file system
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(tmp)
            for d in created:
                try:
                    os.rmdir(d)
                except OSError:
                    break
    except FileExistsError:
        raise ValueError(f"{what} {folder!r} is a file, not a folder") from None
    except OSError as exc:
        reason = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                  errno.ENOTDIR: "a part of the path is a file"}.get(exc.errno, exc.strerror or str(exc))
        raise ValueError(f"{what} {folder!r} cannot be written: {reason}") from None


def _check_outputs(args) -> None:
    """Every output path of the command, checked before the computation (exit 2, nothing computed)."""
    if hasattr(args, "out") and (args.out_given or args.command in _WRITES_ALWAYS):
        _writable_folder(args.out, "--out")
    path = getattr(args, "checkpoint", None)
    if path is None:
        return
    if path == "" or os.path.isdir(path) or path.endswith(os.sep):
        raise ValueError(f"--checkpoint {path!r} is a folder; give a file path such as run.ckpt.npz")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path!r} is not a regular file")
    _writable_folder(os.path.dirname(path) or ".", "--checkpoint folder")
    if os.path.isfile(path) and not args.resume:
        if not getattr(args, "overwrite", False):
            raise ValueError(f"--checkpoint {path!r} exists and holds earlier progress: add --resume to continue "
                             "it, or --overwrite to start afresh (its progress is lost)")
        os.remove(path)


class _WriteError(Exception):
    """The main result could not be written (a full disk, a read-only file system): exit status 1."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before killing a job), handled like Ctrl-C."""


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def _write_files(args, outcome: Outcome) -> tuple[list[str], bool]:
    """Write the main result, run the optional analyses, write the other files.

    A main result that cannot be written raises (exit 1); a later failure is a warning naming the file
    or analysis. Returns the paths written and whether everything succeeded."""
    import warnings

    written: list[str] = []
    for i, (path, writer) in enumerate(outcome.files):
        try:
            ans = writer(path)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            if i == 0:
                raise _WriteError(f"could not write {path!r} ({type(exc).__name__}: {_one_line(exc)}); nothing was "
                              "written") from None
            outcome.failed.append(os.path.basename(path))
            warnings.warn(f"could not write {path!r} ({type(exc).__name__}: {_one_line(exc)}); "
                          f"{written[0]!r} was written", RuntimeWarning, stacklevel=2)
            continue
        if ans is not _SKIPPED:
            written.append(os.fspath(ans) if isinstance(ans, (str, os.PathLike)) else path)
        if i == 0 and outcome.after is not None:
            outcome.after(outcome)
    if not outcome.files and outcome.after is not None:
        outcome.after(outcome)
    return written, not outcome.failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok, 2 bad usage/input, 1 unexpected failure, 3 partial
    success (main result written, an optional analysis or file failed), 130 Ctrl-C, 143 SIGTERM."""
    import signal
    import threading
    import warnings

    try:
        args = _parse(argv)
    except KeyboardInterrupt:
        print("erf: interrupted", file=sys.stderr)
        return 130
    if isinstance(args, int):
        return args
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    main_rank, ok = True, True
    try:
        from erf.engine import RunInterrupted

        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(args)
            _check_outputs(args)
            try:
                outcome = args.func(args)
            except SystemExit as exc:  # user code (a model file, a factory) called sys.exit()
                raise ValueError(f"the model's code called sys.exit({exc.code!r}); "
                                 "erf runs it as a library and cannot continue") from None
            from erf.distributed import is_main_process

            main_rank = is_main_process()  # with --distributed only rank 0 writes and prints
            written, ok = _write_files(args, outcome) if main_rank else ([], True)
    except KeyboardInterrupt as exc:
        saved = isinstance(exc, _interrupted_type())  # the engine saved the checkpoint
        terminated = isinstance(exc, _Terminated) or isinstance(exc.__context__, _Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"erf {args.command}: {what}; {_resume_hint(args, saved)}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else 130
    except (ValueError, TypeError, UsageError, ImportError) as exc:
        if os.environ.get("ERF_DEBUG"):
            raise
        print(f"erf {args.command}: error: {_cli_message(_one_line(exc))}", file=sys.stderr)
        return 2
    except _WriteError as exc:
        print(f"erf {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # an unexpected failure: one line, status 1
        if os.environ.get("ERF_DEBUG"):
            raise
        print(f"erf {args.command}: unexpected {type(exc).__name__}: {_one_line(exc)} "
              "(set ERF_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if not main_rank:
        return 0
    if args.json:
        summary = dict(outcome.summary)
        summary["files"] = [os.fspath(w) for w in written]
        if outcome.failed:
            summary["failed"] = list(outcome.failed)
        print(json.dumps(_jsonable(summary), allow_nan=False))
    else:
        sys.stdout.write(outcome.text)
        for w in written:
            print(f"wrote {w}")
    return 0 if ok else EXIT_PARTIAL


def _interrupted_type():
    """:class:`erf.engine.RunInterrupted` when the engine is loaded (it means: checkpoint saved)."""
    engine = sys.modules.get("erf.engine")
    return getattr(engine, "RunInterrupted", ()) if engine is not None else ()


def main_entry() -> None:
    """Console-script entry point: ``sys.exit(main())`` (Ctrl-C at any point: one line, status 130)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("erf: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
