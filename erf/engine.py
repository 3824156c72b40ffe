"""The ERF engine: a unit gradient at one output unit, backpropagated to the input.

Luo, Li, Urtasun, Zemel, "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks", NIPS 2016. https://arxiv.org/abs/1701.04128

For a batch ``x`` of inputs, one forward pass (stopped at the unit's layer) and one
``torch.autograd.grad(unit(x).sum(), x)`` give every sample's input gradient ``g``; each is
reduced to a map (``mean``: sum_c g, ``abs``: sum_c |g|, ``square``: sum_c g^2, ``relu``:
sum_c max(g, 0)) and folded into float64 running moments on the device. Maps are averaged
over inputs and random weight draws; fits, metrics and the TRF are computed lazily.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from erf import _rng
from erf import distributed as _dist
from erf._batch import choose_batch_size, run_split, use_channels_last
from erf._fold import fold_batchnorms, plan_folding
from erf._crop import plan_crop
from erf._draws import INITS, DrawMaker, describe_init
from erf._inputs import IterableInputs, make_source
from erf._integrity import (check_checkpoint_arrays, check_checkpoint_path, check_position, check_result_arrays, differences,
                            run_fingerprint)
from erf._io import atomic_write
from erf._stats import RunningMoments, merge_numpy, stderr_of
from erf._defaults import choose_default, resolve_layers
from erf._degenerate import check_run, clip_trf
from erf._layout import Hints, check_layout
from erf._target import Target, check_grid
from erf._vmap import plan_stacking
from erf._validate import (check_choice, check_conv_rank, check_input_shape, check_int, check_positive_float,
                           model_accepts, resolve_layer)

REDUCES = ("mean", "abs", "square", "relu", "relu_of_mean")
METHODS = ("gradient", "guided_backprop", "deconvolution", "integrated_gradients")
NONFINITE = ("raise", "skip")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
_BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm,)
FORMAT_VERSION = 1


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the checkpoint (if any) was saved and ``str(exc)`` says how to resume."""


class _Mismatch(Exception):
    """A checkpoint or result of another configuration (raised as ValueError naming what differs)."""


class _StopForward(Exception):
    """Raised by a hook once every target layer has produced its output."""


# --------------------------------------------------------------------------- results


class ERFResult:
    """The averaged ERF map of one unit, with lazily computed analyses.

    Attributes:
        map: ndarray on the input grid (float64), the mean reduced gradient.
        stderr: standard error of that mean per position.
        n: number of maps averaged (inputs x draws, non-finite ones skipped).
        unit, layer, input_shape, config: what was measured and how (``config`` is JSON-able).
    """

    def __init__(self, n: int, mean: np.ndarray, m2: np.ndarray, *, unit: tuple[int, ...], layer: str,
                 input_shape: tuple[int, ...], config: dict, meta: dict | None = None,
                 model: nn.Module | None = None, trf: Any = None):
        self.n = int(n)
        self.map = mean
        self.m2 = m2
        self.stderr = stderr_of(self.n, m2)
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

            from erf._layout import layout_trf

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
        atomic_savez(path, arrays)
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
                         config=config, meta=self.meta, model=self._model, trf=self._trf)


def atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` atomically (:func:`erf._io.atomic_write`)."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


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
    return ERFResult(meta["n"], arrays["map"], arrays["m2"], unit=tuple(meta["unit"]), layer=meta["layer"],
                     input_shape=tuple(meta["input_shape"]), config=meta["config"], meta=meta, trf=trf)


# --------------------------------------------------------------------------- helpers


def _reduce_fn(reduce: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if reduce == "mean":
        return lambda g: g.sum(1)
    if reduce == "abs":
        return lambda g: g.abs().sum(1)
    if reduce == "square":
        return lambda g: (g * g).sum(1)
    if reduce == "relu_of_mean":  # OpenERF: max(mean_c g, 0)
        return lambda g: torch.relu(g.mean(1))
    return lambda g: torch.relu(g).sum(1)


def _clone_tensors(out: Any) -> Any:
    """``out`` with its tensors cloned (a tensor, or a tuple/list/dict of them)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_tensors(o) for o in out) if type(out) in (tuple, list) else out
    if isinstance(out, dict):
        return {k: _clone_tensors(v) for k, v in out.items()}
    return out


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.replace("torch.", ""), dtype)
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, float64, bfloat16 or float16, got {dtype!r}")
    return dtype


def model_hash(model: nn.Module) -> str:
    """A short hash of the model's structure (its repr: module types and shapes)."""
    return hashlib.sha256(repr(model).encode()).hexdigest()[:16]


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    from erf._memory import cpu_available

    return cpu_available()  # host MemAvailable capped by the cgroup (container) limit


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.device):
        return str(value)
    return getattr(value, "__qualname__", type(value).__name__)


class _Run:
    """One validated run: model draws, targets, input source and accumulation."""

    def __init__(self, model, input_shape, *, layer, select, grid, unit, layout=None, channel, unit_relu, inputs, n_inputs,
                 draws, first_draw, init, reduce, method, batch_size, device, dtype, seed, progress,
                 train_mode, nonfinite, crop, checkpoint, checkpoint_every, resume, until_stderr,
                 vmap_draws=None, distributed=False, dist_timeout=_dist.DEFAULT_TIMEOUT, fold_bn=True,
                 preprocess=None):
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(f"model must be an nn.Module or a zero-argument factory returning one, "
                            f"got {type(model).__name__}")
        self.input_shape = check_input_shape(input_shape)
        self.ndim = len(self.input_shape) - 1
        self.reduce = check_choice("reduce", reduce, REDUCES)
        self.method = check_choice("method", method, METHODS)
        if not (callable(init) or (isinstance(init, str) and init in INITS)):
            raise ValueError(f"init must be one of {list(INITS)} or a callable (module, generator) -> None, "
                             f"got {init!r}")
        self.init = init
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE)
        self.n_inputs = check_int("n_inputs", n_inputs, 1)
        self.draws = check_int("draws", draws, 1)
        self.first_draw = check_int("first_draw", first_draw, 0)
        self.seed = check_int("seed", seed)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
        self.until_stderr = check_positive_float("until_stderr", until_stderr, allow_none=True)
        if select is not None and not callable(select):
            raise TypeError(f"select must be a callable picking a tensor from the output, got {type(select).__name__}")
        for name, flag in (("unit_relu", unit_relu), ("train_mode", train_mode), ("progress", progress),
                           ("crop", crop), ("resume", resume), ("fold_bn", fold_bn)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.grid = check_grid(grid)
        self.layout = check_layout(layout)
        if vmap_draws is not None and not isinstance(vmap_draws, bool):
            raise TypeError(f"vmap_draws must be None, True or False, got {vmap_draws!r}")
        self.vmap_draws = vmap_draws
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype)
        self.unit_relu, self.train_mode, self.progress, self.crop = unit_relu, train_mode, progress, crop
        self.fold_bn = fold_bn
        self.fold_plan: list[tuple[str, str]] = []
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.resume = resume
        if resume and self.checkpoint is None:
            raise ValueError("resume=True needs checkpoint=PATH")
        check_checkpoint_path(self.checkpoint, resume)
        self.maker = DrawMaker(model, init, self.seed, self.draws, input_shape=self.input_shape, dtype=self.dtype)
        self.source = make_source(inputs, self.n_inputs, self.input_shape, self.seed, self.draws, preprocess)
        self.inputs_desc = inputs if isinstance(inputs, str) else self.source.describe()
        self.dist = _dist.from_options(distributed, dist_timeout, self.device, source=self.source,
                                       until_stderr=self.until_stderr)  # joins the process group
        self.device = self.dist.device if self.dist is not None else self.device
        self.multi = isinstance(layer, (list, tuple))
        layers = list(layer) if self.multi else [layer]
        if self.multi and not layers:
            raise ValueError("layer: an empty list of layers")
        self.layer_args = layers
        self.select = select
        self.unit_arg, self.channel_arg = unit, channel

    # -- model of a draw, ready to run
    def _prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.dtype == torch.float64:
            model = model.double()
        model.train(self.train_mode)
        self._freeze(model)
        if self.fold_plan:
            fold_batchnorms(model, self.fold_plan)
        if getattr(self, "channels_last", False):
            model.to(memory_format=torch.channels_last)
        return model

    @staticmethod
    def _freeze(model: nn.Module) -> None:
        """No parameter needs a gradient: autograd then saves nothing for weight gradients."""
        for p in model.parameters():
            if not isinstance(p, nn.parameter.UninitializedParameter):
                p.requires_grad_(False)

    def setup(self) -> None:
        """Build the first draw, resolve layers and units with one probe sample, plan the speed paths."""
        built = self.maker.build(self.first_draw)
        self.fingerprint = run_fingerprint(self, built)  # what determines the numbers (once per run)
        self.model0 = self._prepare(built)
        # Module arguments name modules of the caller's model; the run works on copies, so map to paths.
        owner = self.model0 if self.maker.is_factory else self.maker.model
        self.paths = resolve_layers(owner, self.model0, self.layer_args, self.input_shape)
        self.hints, self.chosen = Hints.of(self.model0), None
        if len(set(self.paths)) != len(self.paths):
            raise ValueError(f"layer: the list names a layer twice: {self.paths}")
        self._make_targets()
        if self.train_mode and any(isinstance(m, _BATCH_COUPLED) for m in self.model0.modules()):
            warnings.warn("train_mode=True with BatchNorm: the samples of a batch are coupled through the "
                          "batch statistics, so each map also depends on the other inputs of its batch",
                          stacklevel=3)
        check_conv_rank(self.model0, self.input_shape)
        # Probe: one sample through the network, to learn the output shapes and the memory per sample.
        # two samples in train mode: BatchNorm after global pooling refuses one value per channel
        probe_n = 2 if self.train_mode else 1
        x = torch.zeros((probe_n,) + self.input_shape, device=self.device,
                        dtype=torch.float64 if self.dtype == torch.float64 else torch.float32)
        act_bytes = [0]

        def count(_m, _i, out):
            if isinstance(out, torch.Tensor):
                act_bytes[0] += out.numel() * out.element_size()

        leaves = [m for m in self.model0.modules() if not list(m.children())]
        handles = [m.register_forward_hook(count) for m in leaves]
        try:
            with torch.no_grad(), model_accepts(self.input_shape):
                outs = self._forward(self.model0, x, stop=self.method == "gradient")
        finally:
            for h in handles:
                h.remove()
        self._freeze(self.model0)  # lazy modules have materialised their parameters in the probe
        if self.layer_args == [None] and self.select is None and self.grid is None and self.layout is None:
            self.chosen = choose_default(self.model0, self.input_shape, self.hints, outs[""])
            if self.chosen:  # a classifier: its last spatial feature map (erf._defaults)
                self.paths = [self.chosen[0]]
                self._make_targets()
                with torch.no_grad(), model_accepts(self.input_shape):
                    outs = self._forward(self.model0, x, stop=self.method == "gradient")
        for t in self.targets:
            out = t.prepare(outs[t.layer])
            t.configure(out, self.unit_arg, self.channel_arg)
        in_bytes = int(np.prod(self.input_shape)) * 4
        self.per_sample_bytes = 3 * act_bytes[0] // probe_n + 4 * in_bytes
        map_shape = self.input_shape[1:]
        self.degenerate = check_run(self.model0, self.targets, self.input_shape, self.device, self.dtype, self.seed,
                                    x=self._first_inputs(3))
        self.stats = [RunningMoments.zeros(map_shape, self.device) for _ in self.targets]
        self.skipped = torch.zeros((), dtype=torch.float64, device=self.device)
        self.reduce_fn = _reduce_fn(self.reduce)
        self.model_hash = model_hash(self.model0)
        if self.fold_bn and not self.train_mode:  # eval-mode BatchNorm into the conv before it
            self.fold_plan = plan_folding(self.model0, self.paths)
            fold_batchnorms(self.model0, self.fold_plan)
        self.channels_last = use_channels_last(self)
        if self.channels_last:
            self.model0.to(memory_format=torch.channels_last)
        # Speed paths (each gives the plain path's map): cone crop, stacked draws, the batch that fits.
        self.crop_plan = plan_crop(self) if self.crop else None
        self.stacker = plan_stacking(self, self.vmap_draws)
        self.batch_size_used = choose_batch_size(self)
        if self.train_mode and self.batch_size is None:
            # Stochastic modules draw one sample of noise per forward, keyed by its block of 32
            # inputs: one block per forward keeps every map independent of the batch size. An
            # explicit batch_size is kept (batches then split blocks, each keyed by its first input).
            self.batch_size_used = _rng.BLOCK

    def _first_inputs(self, n: int) -> torch.Tensor | None:
        """The first ``n`` inputs of the first draw when the source has random access (else ``None``)."""
        if isinstance(self.source, IterableInputs) or not getattr(self.source, "random_access", True):
            return None
        try:
            return self.source.get(self.first_draw, 0, min(n, self.source.n))
        except Exception:  # noqa: BLE001 - the check then uses Gaussian inputs
            return None

    def _make_targets(self) -> None:
        self.targets = [Target(p, self.select, self.grid, self.ndim, unit_relu=self.unit_relu, layout=self.layout,
                               hints=self.hints, input_shape=self.input_shape,
                               module=self.model0.get_submodule(p) if p else None) for p in self.paths]

    # -- forward stopped at the target layers
    def _forward(self, model: nn.Module, x: torch.Tensor, stop: bool = True) -> dict[str, Any]:
        outs: dict[str, Any] = {}
        wanted = [p for p in self.paths if p]
        handles = []

        def make_hook(path):
            def hook(_m, _i, out):
                outs[path] = out
                if stop and len(outs) == len(wanted) and "" not in self.paths:
                    raise _StopForward
                # the forward goes on: later in-place ops (ResNet's ``out += identity``, inplace ReLU)
                # must not change the value read here (clone is differentiable)
                outs[path] = _clone_tensors(out)
            return hook

        for p in wanted:
            handles.append(model.get_submodule(p).register_forward_hook(make_hook(p)))
        try:
            result = model(x)
            if "" in self.paths:
                outs[""] = result
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return outs

    def _autocast(self):
        if self.dtype in _LOW_PRECISION:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return torch.autocast(self.device.type, enabled=False)

    # -- one batch: per-sample maps for every target
    def _maps(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        if self.crop_plan is not None:
            x = self.crop_plan.crop(x)
        x = x.to(self.device, dtype=torch.float64 if self.dtype == torch.float64 else torch.float32,
                 non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.method != "gradient":
            return self._captum_maps(model, x)
        x.requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            outs = self._forward(model, x, stop=True)
            targets = self.crop_plan.targets if self.crop_plan is not None else self.targets
            scalars = [t.scalar(outs[t.layer]).float().sum() for t in targets]
        maps = []
        for i, s in enumerate(scalars):
            if not s.requires_grad:
                g = torch.zeros_like(x)
            else:
                g, = torch.autograd.grad(s, x, retain_graph=i < len(scalars) - 1, allow_unused=True)
                if g is None:
                    g = torch.zeros_like(x)
            maps.append(self.reduce_fn(g.float() if g.dtype in _LOW_PRECISION else g))
        return maps

    def _captum_maps(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop, NeuronIntegratedGradients

        cls = {"guided_backprop": NeuronGuidedBackprop, "deconvolution": NeuronDeconvolution,
               "integrated_gradients": NeuronIntegratedGradients}[self.method]
        maps = []
        for t in self.targets:
            layer_module = model.get_submodule(t.layer) if t.layer else model
            algo = cls(model, layer_module)
            with self._autocast(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.method == "integrated_gradients":
                    a = algo.attribute(x, neuron_selector=t.scalar, baselines=torch.zeros_like(x),
                                       n_steps=16, internal_batch_size=x.shape[0])
                else:
                    a = algo.attribute(x, neuron_selector=t.scalar)
            maps.append(self.reduce_fn(a.detach()))
        return maps

    # -- checkpoints
    def _fingerprint(self, config: dict) -> str:
        keep = {k: v for k, v in config.items() if k not in ("progress", "until_stderr", "batch_size")}
        self._checkpoint_config = keep  # stored with the checkpoint to name what differs on resume
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def _save_checkpoint(self, draw: int, start: int, fingerprint: str) -> None:
        arrays: dict[str, np.ndarray] = {}
        for i, st in enumerate(self.stats):
            n, mean, m2 = st.to_numpy()
            arrays[f"n{i}"] = np.array(st.n.item())
            arrays[f"mean{i}"], arrays[f"m2_{i}"] = mean, m2
        state = {"fingerprint": fingerprint, "draw": draw, "start": start, "batch_size": self.batch_size_used,
                 "skipped": float(self.skipped.item()), "targets": len(self.stats),
                 "config": getattr(self, "_checkpoint_config", None)}
        arrays["state"] = np.array(json.dumps(state))
        atomic_savez(self.checkpoint, arrays)

    def _load_checkpoint(self, fingerprint: str) -> tuple[int, int]:
        path = self.checkpoint
        if not os.path.isfile(path):
            return self.first_draw, 0
        try:
            with np.load(path, allow_pickle=False) as z:
                state = json.loads(str(z["state"]))
                if not isinstance(state, dict):
                    raise ValueError("its state is not a JSON object")
                if state.get("fingerprint") != fingerprint:
                    saved = state.get("config")
                    what = differences(saved, self._checkpoint_config) if isinstance(saved, dict) else []
                    raise _Mismatch(f"checkpoint {path!r} belongs to another configuration"
                                    + (f" (differs in {', '.join(what)})" if what else "")
                                    + "; refusing to mix runs: delete it or use another path")
                where = f"checkpoint {path!r}"
                check_position(state, self.first_draw, self.draws, self.source.n, where)
                loaded = []
                for i, st in enumerate(self.stats):
                    mean, m2 = z[f"mean{i}"], z[f"m2_{i}"]
                    count = check_checkpoint_arrays(z[f"n{i}"][()], mean, m2, tuple(st.mean.shape), where)
                    loaded.append((count, mean, m2))
                for st, (count, mean, m2) in zip(self.stats, loaded):
                    st.n = torch.tensor(float(count), dtype=torch.float64, device=self.device)
                    st.mean = torch.as_tensor(mean, dtype=torch.float64, device=self.device).clone()
                    st.m2 = torch.as_tensor(m2, dtype=torch.float64, device=self.device).clone()
        except _Mismatch as exc:
            raise ValueError(str(exc)) from None
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # BadZipFile, EOFError, KeyError, RecursionError, ...: one message
            raise ValueError(f"checkpoint {path!r} is not a readable erf checkpoint "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
        self.batch_size_used = state["batch_size"]
        self.skipped.fill_(state["skipped"])
        return state["draw"], state["start"]

    # -- the loop
    def _ranges(self, start: int) -> Iterable[tuple[int, int]]:
        n, bs = self.source.n, self.batch_size_used
        i = start
        while i < n:
            stop = min(i + min(bs, self.batch_size_used), n)  # smaller after an out-of-memory retry
            if self.train_mode:  # stochastic streams are keyed per block: batches never straddle blocks
                stop = min(stop, (i // _rng.BLOCK + 1) * _rng.BLOCK)
            yield i, stop
            i = stop

    def _batches(self, draw: int, start: int):
        if not isinstance(self.source, IterableInputs):
            for lo, hi in self._ranges(start):
                yield lo, hi, self.source.get(draw, lo, hi)
            return
        seen = 0
        for xb in self.source.batches():
            lo_b = seen
            seen += xb.shape[0]
            i = max(lo_b, start)
            while i < seen:
                stop = min(i + self.batch_size_used, seen)
                if self.train_mode:
                    stop = min(stop, (i // _rng.BLOCK + 1) * _rng.BLOCK)
                yield i, stop, xb[i - lo_b: stop - lo_b]
                i = stop

    def _centre_rel_stderr(self) -> float:
        st = self.stats[0]
        n = st.n.item()
        if n < 2:
            return math.inf
        mean = st.mean.abs() if self.reduce == "mean" else st.mean
        region = mean >= 0.5 * mean.max()
        se = torch.sqrt(torch.clamp(st.m2, min=0) / (n - 1) / n)
        denom = mean[region].mean().item()
        return math.inf if denom <= 0 else se[region].mean().item() / denom

    def run(self, config: dict) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Every draw and batch (resuming from the checkpoint if asked); ``(n, mean, M2)`` per target."""
        if self.dist is not None:  # this rank's share of the work, then one reduction (erf.distributed)
            return _dist.run_sharded(self, config)
        from tqdm.auto import tqdm

        fingerprint = self._fingerprint(config)
        draw0, start0 = self.first_draw, 0
        if self.checkpoint is not None and self.resume:
            draw0, start0 = self._load_checkpoint(fingerprint)
        n_per_draw = self.source.n
        total = None if n_per_draw is None else n_per_draw * self.draws
        done0 = None if n_per_draw is None else (draw0 - self.first_draw) * n_per_draw + start0
        bar = tqdm(total=total, initial=done0 or 0, disable=None if self.progress else True, delay=1.0,
                   unit="map", desc="erf", file=sys.stderr, dynamic_ncols=True, leave=False)
        batches_since_ckpt = 0
        position = (draw0, start0)
        try:
            for draw in range(draw0, self.first_draw + self.draws):
                if self.stacker is not None and start0 == 0 and self.stacker.handle(draw, bar):
                    continue  # this draw ran stacked with others (torch.func.vmap)
                model = self.model0 if draw == self.first_draw else self._prepare(self.maker.build(draw))
                start = start0 if draw == draw0 else 0
                for lo, hi, x in self._batches(draw, start):
                    position = (draw, lo)
                    for a, b, maps in run_split(
                            lambda a, b: self._run_batch(model, x[a - lo: b - lo], draw, a, b), lo, hi, self):
                        self._accumulate(maps, draw, a, b)
                    position = (draw, hi)
                    bar.update(hi - lo)
                    batches_since_ckpt += 1
                    if self.checkpoint is not None and batches_since_ckpt >= self.checkpoint_every:
                        self._save_checkpoint(draw, hi, fingerprint)
                        batches_since_ckpt = 0
                    if self.until_stderr is not None and self.draws == 1 and \
                            self._centre_rel_stderr() < self.until_stderr:
                        break
                position = (draw + 1, 0)
                if self.until_stderr is not None and self.draws > 1 and \
                        self._centre_rel_stderr() < self.until_stderr:
                    break
        except KeyboardInterrupt:
            if self.checkpoint is not None:
                self._save_checkpoint(*position, fingerprint)
                raise RunInterrupted(f"interrupted; progress saved to {self.checkpoint!r}: run again with "
                                     "resume=True (CLI: --resume) to continue") from None
            raise
        finally:
            bar.close()
        if self.checkpoint is not None:
            self._save_checkpoint(*position, fingerprint)
        return [st.to_numpy() for st in self.stats]

    def _run_batch(self, model: nn.Module, x: torch.Tensor, draw: int, lo: int, hi: int) -> list[torch.Tensor]:
        if not self.train_mode:
            return self._maps(model, x)
        block = lo // _rng.BLOCK
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        start = block * _rng.BLOCK
        size = _rng.BLOCK if self.source.n is None else min(_rng.BLOCK, self.source.n - start)
        with torch.random.fork_rng(devices=devices):
            key = _rng.key_seed(self.seed, "stochastic", draw, block, lo)
            torch.manual_seed(key)  # torch's own RNG (nn.Dropout): keyed per batch
            # erf's stochastic modules: keyed per block, per-sample noise sliced from the whole block's
            with _rng.use_generator(_rng.generator(self.seed, "stochastic", draw, block, start)), \
                    _rng.batch_slice(lo - start, hi - lo, size):
                return self._maps(model, x)

    def _accumulate(self, maps: list[torch.Tensor], draw: int, lo: int, hi: int) -> None:
        window = self.crop_plan.window if self.crop_plan is not None else None
        for st, m in zip(self.stats, maps):
            finite = torch.isfinite(m.reshape(m.shape[0], -1)).all(1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                if self.nonfinite == "raise":
                    raise ValueError(
                        f"non-finite gradients in draw {draw}, inputs {lo}..{hi - 1} (samples "
                        f"{[lo + b for b in bad[:5]]}); pass nonfinite='skip' to skip and count them, or use "
                        "dtype=torch.float64 / smaller inputs")
                self.skipped += (~finite).sum()
                st.update(m, weight=finite, window=window)
            else:
                st.update(m, window=window)


def _protocol_options(fn: Callable) -> Callable:
    """``protocol=NAME`` fills the options the published method fixes (those not given explicitly), and
    ``preprocess="timm"`` reads the model's timm data config: :func:`erf.protocols.resolve_options`."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, input_shape, **options):
        from erf.protocols import resolve_options

        return fn(model, input_shape, **resolve_options(model, input_shape, options))
    return wrapper


@_protocol_options
def effective_rf(model: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int], *,
                 layer: Any = None, select: Callable[[Any], Any] | None = None,
                 grid: Sequence[int] | None = None, layout: str | None = None, unit: Sequence[int] | None = None,
                 channel: int | Sequence[int] | None = None, unit_relu: bool = False,
                 inputs: Any = "gaussian", n_inputs: int = 32, draws: int = 1, first_draw: int = 0,
                 init: str | Callable = "default", reduce: str = "abs", method: str = "gradient",
                 batch_size: int | None = None, device: Any = None, dtype: torch.dtype = torch.float32,
                 seed: int = 0, progress: bool = True, train_mode: bool = False, nonfinite: str = "raise",
                 crop: bool = True, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 20,
                 resume: bool = False, until_stderr: float | None = None,
                 vmap_draws: bool | None = None, distributed: bool = False,
                 dist_timeout: float = _dist.DEFAULT_TIMEOUT,
                 fold_bn: bool = True, protocol: str | None = None,
                 preprocess: dict | str | None = None) -> ERFResult | dict[str, ERFResult]:
    """Effective receptive field of one unit, averaged over inputs and weight draws (Luo et al. 2016).

    ``map = E_{draws, inputs}[ reduce(d unit / d x) ]`` with ``reduce`` one of ``mean`` (sum_c g),
    ``abs`` (sum_c |g|), ``square`` (sum_c g^2, the variance map of the theory), ``relu``
    (sum_c max(g, 0), RepLKNet's), ``relu_of_mean`` (max(mean_c g, 0), OpenERF's).

    Args:
        model: an ``nn.Module`` (never modified: the engine works on a deep copy) or a factory.
        input_shape: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``.
        layer: module path or module holding the unit (default: the model output); a list gives a dict.
        unit: spatial index in that output (default: centre ``n // 2``; negative counts from the end).
        channel / unit_relu / select / grid: which value of the output is the unit (see SPEC).
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"`` when the output's layout cannot be inferred
            (:mod:`erf._layout`: token sequences ``(N, L, D)`` get their grid from timm's
            ``patch_embed``/``num_prefix_tokens`` or the input's shape; ``meta["layout"]`` says how).
            With no ``layer``, a model whose output has no spatial axes (a classifier) is analysed
            at its last spatial feature map (``meta["default_layer"]``); ``layer="stage:-1"`` names
            a stage (:mod:`erf._defaults`). Degenerate units (constant, zero-initialised residual
            scales) are warned about and listed in ``meta["warnings"]`` (:mod:`erf._degenerate`).
        inputs, n_inputs, draws, first_draw, init, seed: what is averaged over; every random stream is
            keyed by ``(seed, draw, block of 32 inputs)``. ``inputs="images:DIR|LIST.txt|GLOB"`` reads
            the first ``n_inputs`` readable images (:mod:`erf._images`).
        preprocess: images only: ``None`` (shorter side + centre crop, bilinear, ImageNet mean/std),
            a dict of ``resize`` (``crop``/``squash``), ``interpolation``, ``crop_pct``, ``mean``, ``std``,
            ``exif``, ``strict``, or ``"timm"`` (the model's timm data config).
        protocol: ``"replknet"``, ``"openerf"`` or ``"luo2016"``: every option the published method fixes
            (:mod:`erf.protocols`); options given explicitly override it and are recorded in
            ``config["protocol"]``.
        nonfinite: ``"raise"`` (default) or ``"skip"`` (skip and count samples with NaN/Inf maps).
        checkpoint, checkpoint_every, resume: save the running sums atomically every N batches; resume.
        until_stderr: stop early once the relative standard error of the centre region is below this.
        crop: run the network on the smallest input crop that holds the unit's TRF (when the TRF
            analyser calls it safe and a probe confirms it); the map is unchanged.
        fold_bn: fold each eval-mode BatchNorm into the convolution before it (``erf._fold``; the
            same function, so the map changes by float rounding only). Never in ``train_mode``.
        vmap_draws: stack weight draws with ``torch.func.vmap`` (``None``: on CUDA when it works).
        distributed, dist_timeout: share the work among the ranks of a torch.distributed job (torchrun;
            :mod:`erf.distributed`), every rank returning the combined result; collectives fail after
            ``dist_timeout`` seconds.
    Returns:
        :class:`ERFResult` (a dict ``{layer: ERFResult}`` when ``layer`` is a list).
    Raises:
        ValueError, TypeError: bad arguments, each naming the argument.
    """
    run = _Run(model, input_shape, layer=layer, select=select, grid=grid, unit=unit, channel=channel, layout=layout,
               unit_relu=unit_relu, inputs=inputs, n_inputs=n_inputs, draws=draws, first_draw=first_draw,
               init=init, reduce=reduce, method=method, batch_size=batch_size, device=device, dtype=dtype,
               seed=seed, progress=progress, train_mode=train_mode, nonfinite=nonfinite, crop=crop,
               checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
               until_stderr=until_stderr, vmap_draws=vmap_draws, distributed=distributed,
               dist_timeout=dist_timeout, fold_bn=fold_bn, preprocess=preprocess)
    run.setup()
    base = {
        "input_shape": list(run.input_shape), "inputs": run.inputs_desc,
        "n_inputs": run.source.n, "draws": run.draws, "first_draw": run.first_draw,
        "draw_ranges": [[run.first_draw, run.first_draw + run.draws]],
        "init": describe_init(init), "reduce": run.reduce, "method": run.method,
        "batch_size": run.batch_size_used, "device": str(run.device), "dtype": _jsonable(run.dtype),
        "seed": run.seed, "train_mode": run.train_mode, "unit_relu": run.unit_relu,
        "channel": _jsonable(run.targets[0].channels), "grid": _jsonable(run.grid), "layout": run.layout,
        "select": _jsonable(select), "nonfinite": run.nonfinite, "until_stderr": run.until_stderr,
        "model": type(run.model0).__name__ if not run.maker.is_factory else _jsonable(model),
        "model_hash": run.model_hash, "fingerprint": run.fingerprint,
        "layers": run.paths, "units": [list(t.unit) for t in run.targets],
        "protocol": protocol, "preprocess": _jsonable(getattr(run.source, "options", None)),
    }
    t0 = time.perf_counter()
    stats = run.run(base)
    elapsed = time.perf_counter() - t0
    meta = {"versions": {"erf": _erf_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else platform.processor() or "cpu",
            "seconds": elapsed, "skipped": float(run.skipped.item()),
            "crop": None if run.crop_plan is None else [[w.start, w.stop] for w in run.crop_plan.window],
            "vmap_draws": run.stacker is not None, "folded_batchnorms": len(run.fold_plan),
            "channels_last": bool(run.channels_last)}
    from erf.protocols import provenance  # inputs, preprocessing, protocol, versions (one dict, key "provenance")

    meta["provenance"] = provenance(run.source, protocol, run.maker.model if not run.maker.is_factory else None)
    if run.dist is not None:
        meta["world_size"] = run.dist.world_size
    from erf.weights import weights_meta  # file + sha256 of loaded weights, None when re-drawn (warns)

    meta["provenance"]["weights"] = weights_meta(run.model0, describe_init(init), run.draws, run.maker.is_factory)
    if meta["skipped"]:
        warnings.warn(f"{int(meta['skipped'])} samples with non-finite gradients were skipped", stacklevel=2)
    analysis_model = run.model0.float() if run.dtype == torch.float64 else run.model0
    results = {}
    for t, (n, mean, m2) in zip(run.targets, stats):
        cfg = dict(base, layer=t.layer, unit=list(t.unit))
        t_meta = dict(meta, **t.describe(run.chosen, run.maker.notes + run.degenerate.get(t.layer, [])))
        for msg in t_meta.get("warnings", []):
            warnings.warn(msg, stacklevel=2)
        results[t.layer] = ERFResult(n, mean, m2, unit=t.unit, layer=t.layer, input_shape=run.input_shape,
                                     config=cfg, meta=t_meta, model=analysis_model.cpu(),
                                     trf=getattr(run, "trf_reports", {}).get(t.layer))
    if run.multi:
        return {(arg if isinstance(arg, str) else path): results[path]
                for arg, path in zip(run.layer_args, run.paths)}
    return results[run.paths[0]]


def _erf_version() -> str:
    from erf import __version__

    return __version__
