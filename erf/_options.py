"""Stage 1 of a run, options: the validated, frozen description of what to measure and how.

:func:`make_options` checks every argument of :func:`erf.effective_rf` that does not need the
model or the inputs (each bad value raises a ValueError/TypeError naming the argument) and returns
an :class:`Options`. :func:`run_config` turns options plus what setup and plan found into the
JSON-able ``config`` of the results, and :func:`fingerprint` hashes that config (and optional digests
of values, e.g. weights) into the key that ties a checkpoint to its run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from erf._draws import INITS, describe_init
from erf._integrity import check_checkpoint_path
from erf._layout import check_layout
from erf._target import check_grid
from erf._validate import check_choice, check_input_shape, check_int, check_positive_float

REDUCES = ("mean", "abs", "square", "relu", "relu_of_mean")
METHODS = ("gradient", "guided_backprop", "deconvolution", "integrated_gradients")
NONFINITE = ("raise", "skip")
DEFAULT_DIST_TIMEOUT = 1800.0  #: seconds a collective may wait for the other ranks
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
#: config keys that do not change the numbers: left out of the fingerprint
_NOT_FINGERPRINTED = ("progress", "until_stderr", "batch_size")


@dataclass(frozen=True)
class Options:
    """Every validated option of one run (see :func:`erf.effective_rf` for their meaning).

    ``layers`` holds the layer arguments as given (paths or modules; ``multi`` says whether a list
    was given); ``device`` and ``dtype`` are resolved. Values are plain Python/torch objects;
    :meth:`describe` gives a JSON-able view.
    """

    input_shape: tuple[int, ...]
    layers: tuple[Any, ...]
    multi: bool
    select: Callable[[Any], Any] | None
    grid: tuple[int, ...] | None
    layout: str | None
    unit: Any
    channel: Any
    unit_relu: bool
    n_inputs: int
    draws: int
    first_draw: int
    init: str | Callable
    reduce: str
    method: str
    batch_size: int | None
    device: torch.device
    dtype: torch.dtype
    seed: int
    progress: bool
    train_mode: bool
    nonfinite: str
    crop: bool
    checkpoint: str | None
    checkpoint_every: int
    resume: bool
    until_stderr: float | None
    vmap_draws: bool | None
    distributed: bool
    dist_timeout: float
    fold_bn: bool
    preprocess: Any = None

    @property
    def ndim(self) -> int:
        """Number of spatial axes of the input."""
        return len(self.input_shape) - 1

    @property
    def last_draw(self) -> int:
        """One past the last weight draw of the run."""
        return self.first_draw + self.draws

    def describe(self) -> dict:
        """The options as a JSON-able dict (callables by name, dtypes and devices as strings)."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def resolve_device(device: Any) -> torch.device:
    """``None`` -> CUDA when available else CPU; else the ``torch.device`` asked for."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for but MPS (Apple GPU) is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r} (a {dev.type!r} "
                         "device holds no data to differentiate)")
    return dev


def resolve_dtype(dtype: Any) -> torch.dtype:
    """A torch floating dtype from a dtype or its name."""
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.replace("torch.", ""), dtype)
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, float64, bfloat16 or float16, got {dtype!r}")
    return dtype


def check_model(model: Any) -> None:
    """``model`` must be an ``nn.Module`` or a zero-argument factory."""
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module or a zero-argument factory returning one, "
                        f"got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptFunction):
        raise TypeError("model is a TorchScript function, not a module: pass an nn.Module (TorchScript modules "
                        "are analysed at their output with their weights as given)")


def make_options(input_shape, *, layer, select, grid, layout=None, unit, channel, unit_relu, n_inputs, draws, first_draw,
                 init, reduce, method, batch_size, device, dtype, seed, progress, train_mode, nonfinite, crop,
                 checkpoint, checkpoint_every, resume, until_stderr, vmap_draws=None, distributed=False,
                 dist_timeout=DEFAULT_DIST_TIMEOUT, fold_bn=True, preprocess=None) -> Options:
    """Validate the options of :func:`erf.effective_rf` (everything but the model and the inputs).

    Raises:
        ValueError, TypeError: a bad option, named in the message.
    """
    input_shape = check_input_shape(input_shape)
    reduce = check_choice("reduce", reduce, REDUCES)
    method = check_choice("method", method, METHODS)
    if not (callable(init) or (isinstance(init, str) and init in INITS)):
        raise ValueError(f"init must be one of {list(INITS)} or a callable (module, generator) -> None, "
                         f"got {init!r}")
    nonfinite = check_choice("nonfinite", nonfinite, NONFINITE)
    n_inputs = check_int("n_inputs", n_inputs, 1)
    draws = check_int("draws", draws, 1)
    first_draw = check_int("first_draw", first_draw, 0)
    seed = check_int("seed", seed)
    batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    until_stderr = check_positive_float("until_stderr", until_stderr, allow_none=True)
    if select is not None and not callable(select):
        raise TypeError(f"select must be a callable picking a tensor from the output, got {type(select).__name__}")
    for name, flag in (("unit_relu", unit_relu), ("train_mode", train_mode), ("progress", progress),
                       ("crop", crop), ("resume", resume), ("fold_bn", fold_bn)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    grid = check_grid(grid)
    layout = check_layout(layout)
    if vmap_draws is not None and not isinstance(vmap_draws, bool):
        raise TypeError(f"vmap_draws must be None, True or False, got {vmap_draws!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH")
    check_checkpoint_path(checkpoint, resume)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    dist_timeout = check_positive_float("dist_timeout", dist_timeout)
    multi = isinstance(layer, (list, tuple))
    layers = tuple(layer) if multi else (layer,)
    if multi and not layers:
        raise ValueError("layer: an empty list of layers")
    return Options(input_shape=input_shape, layers=layers, multi=multi, select=select, grid=grid, layout=layout, unit=unit,
                   channel=channel, unit_relu=unit_relu, n_inputs=n_inputs, draws=draws, first_draw=first_draw,
                   init=init, reduce=reduce, method=method, batch_size=batch_size, device=device, dtype=dtype,
                   seed=seed, progress=progress, train_mode=train_mode, nonfinite=nonfinite, crop=crop,
                   checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                   until_stderr=until_stderr, vmap_draws=vmap_draws, distributed=distributed,
                   dist_timeout=float(dist_timeout), fold_bn=fold_bn, preprocess=preprocess)


def jsonable(value: Any) -> Any:
    """``value`` with dtypes, devices and callables replaced by strings (for JSON)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.device):
        return str(value)
    return getattr(value, "__qualname__", type(value).__name__)


def run_config(opts: Options, *, inputs: str, n_inputs: int | None, batch_size: int, device: torch.device,
               model: str, model_hash: str, layers: Sequence[str], units: Sequence[Sequence[int]],
               channel: Any, values: dict | None = None, protocol: str | None = None,
               preprocess: Any = None) -> dict:
    """The JSON-able ``config`` of a run's results (before ``layer``/``unit`` of each target are added).

    Args:
        inputs: description of the input source; n_inputs: inputs per draw (``None``: unknown).
        batch_size, device: the batch and device the run uses (after planning and process-group setup).
        model, model_hash: the model's name and structure hash; layers, units, channel: the resolved targets.
        values: digests of what determines the numbers besides the options (weights, code, inputs, erf
            version: :func:`erf._integrity.run_fingerprint`), stored as ``config["fingerprint"]``.
        protocol: the preset's name (:mod:`erf.protocols`); preprocess: the image source's resolved options.
    """
    return {
        "input_shape": list(opts.input_shape), "inputs": inputs,
        "n_inputs": n_inputs, "draws": opts.draws, "first_draw": opts.first_draw,
        "draw_ranges": [[opts.first_draw, opts.first_draw + opts.draws]],
        "init": describe_init(opts.init), "reduce": opts.reduce, "method": opts.method,
        "batch_size": batch_size, "device": str(device), "dtype": jsonable(opts.dtype),
        "seed": opts.seed, "train_mode": opts.train_mode, "unit_relu": opts.unit_relu,
        "channel": jsonable(channel), "grid": jsonable(opts.grid), "layout": opts.layout,
        "select": jsonable(opts.select), "nonfinite": opts.nonfinite, "until_stderr": opts.until_stderr,
        "model": model, "model_hash": model_hash, "fingerprint": values,
        "layers": list(layers), "units": [list(u) for u in units],
        "protocol": protocol, "preprocess": jsonable(preprocess),
    }


def fingerprinted(config: dict) -> dict:
    """The part of a config that determines the numbers (less progress/until_stderr/batch_size)."""
    return {k: v for k, v in config.items() if k not in _NOT_FINGERPRINTED}


def fingerprint(config: dict) -> str:
    """Key of a run's numbers: sha256 of :func:`fingerprinted` ``(config)`` as sorted JSON, 16 hex digits.

    The config holds the digests of weights, code and inputs (``config["fingerprint"]``), so the key
    changes with any of them.
    """
    return hashlib.sha256(json.dumps(fingerprinted(config), sort_keys=True).encode()).hexdigest()[:16]
