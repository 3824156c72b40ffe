"""What determines the numbers of a run, and checks that files read back are what they claim.

The fingerprint (computed once per run, never per batch) holds short hashes of

- ``weights``: every value of the state dict (parameters and buffers) of the model the run uses,
  as built for draw 0 after its initialisation (so runs over disjoint draws share it);
- ``code``: the source of the model's classes (and of a factory or init function) where Python
  can find it; classes of ``torch``, ``torchvision`` and ``timm`` by the package version;
- ``inputs``: the values of an inputs tensor (or of a DataLoader's ``TensorDataset``), the file
  list of an ``images:`` folder with sizes and modification times; generated inputs are fixed
  by the seed, already part of the configuration;
- ``erf``: the version of this package.

A checkpoint stores the fingerprint with the rest of the configuration; resume and
``ERFResult.merge`` compare them and name what differs. :func:`check_result_arrays` and
:func:`check_checkpoint_arrays` refuse files whose arrays disagree with their metadata.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import numbers
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

#: packages whose classes are identified by their version rather than their source
_VERSIONED = ("torch", "torchvision", "timm")
#: what each part of the configuration is, for messages
_NAMES = {
    "fingerprint.weights": "the model's weight and buffer values",
    "fingerprint.code": "the model's code (source of its classes or factory)",
    "fingerprint.inputs": "the input values (tensor values or image files)",
    "fingerprint.erf": "the erf version",
    "model_hash": "the model's structure",
}


def _hasher():
    # sha256 (SHA-NI in current CPUs): 2-3x faster here than blake2b on weight tensors (47 MB in ~0.1 s)
    return _Short(hashlib.sha256())


class _Short:
    """A hash object whose hexdigest is 16 hex digits."""

    def __init__(self, h):
        self.h = h

    def update(self, data) -> None:
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.to("cpu").contiguous().reshape(-1)
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))


def tensor_hash(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and values (sha256, 16 hex digits)."""
    h = _hasher()
    _update_tensor(h, t)
    return h.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """Hash of every parameter and buffer value of ``model`` (names, dtypes, shapes, bytes)."""
    h = _hasher()
    for name, value in model.state_dict(keep_vars=True).items():
        h.update(name.encode())
        if isinstance(value, nn.parameter.UninitializedParameter) or \
                isinstance(value, nn.parameter.UninitializedBuffer):
            h.update(b"<uninitialized>")
        elif isinstance(value, torch.Tensor):
            _update_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _source(obj: Any) -> str:
    """The source of a class or function, its package version for torch/timm, else its name."""
    module = getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    if top in _VERSIONED:
        import importlib

        try:
            return f"{top}=={importlib.import_module(top).__version__}:{getattr(obj, '__qualname__', obj)}"
        except Exception:  # pragma: no cover - a package without a version
            return f"{module}.{getattr(obj, '__qualname__', obj)}"
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return f"{module}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def code_hash(model: nn.Module, *extra: Any) -> str:
    """Hash of the source of every class in ``model`` (and of ``extra`` callables, e.g. a factory)."""
    h = _hasher()
    seen: set[type] = set()
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls in seen or cls is object or cls is nn.Module:
                continue
            seen.add(cls)
    for cls in sorted(seen, key=lambda c: (c.__module__, c.__qualname__)):
        h.update(_source(cls).encode())
    for obj in extra:
        if callable(obj):
            fn = getattr(obj, "__func__", obj)
            if inspect.isfunction(fn):
                h.update(_function_identity(fn).encode())
            else:
                h.update(_source(fn if inspect.isclass(fn) else type(fn)).encode())
    return h.hexdigest()


def _code_identity(code) -> str:
    """Bytecode, constants (nested code objects recursively) and names of a code object."""
    consts = [(_code_identity(c) if inspect.iscode(c) else repr(c)) for c in code.co_consts]
    return f"{code.co_code.hex()}|{consts}|{code.co_names}|{code.co_varnames}"


def _function_identity(fn) -> str:
    """What a factory function does: its bytecode, constants and names (not its source text: two
    identical ``lambda: make("max")`` written on different lines are the same factory). Values it
    closes over are not included: what they change in the model shows in its structure and weights."""
    return f"{fn.__module__}|{_code_identity(fn.__code__)}"


def inputs_hash(source: Any) -> str:
    """Hash of what the inputs are: tensor values, image files (names, sizes, mtimes), else the kind."""
    h = _hasher()
    x = getattr(source, "x", None)
    files = getattr(source, "files", None)
    iterable = getattr(source, "iterable", None)
    if isinstance(x, torch.Tensor):
        _update_tensor(h, x)
    elif files is not None:
        for path in files:
            try:
                st = os.stat(path)
                h.update(f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{os.path.basename(path)}|missing\n".encode())
    elif iterable is not None:
        tensors = getattr(getattr(iterable, "dataset", None), "tensors", None)
        h.update(type(iterable).__name__.encode())
        if isinstance(tensors, (tuple, list)) and tensors and isinstance(tensors[0], torch.Tensor):
            _update_tensor(h, tensors[0])
        elif isinstance(iterable, (list, tuple)):
            for item in iterable:
                t = item[0] if isinstance(item, (tuple, list)) else item
                if isinstance(t, torch.Tensor):
                    _update_tensor(h, t)
    else:
        h.update(type(source).__name__.encode())  # generated: fixed by kind and seed (configuration)
    return h.hexdigest()


def run_fingerprint(maker: Any, first_draw: int, source: Any, built: nn.Module) -> dict[str, str]:
    """The fingerprint of a run (see the module docstring): ``maker`` builds its draws (:class:`erf._draws.DrawMaker`),
    ``source`` gives its inputs; ``built`` is the model of draw ``first_draw`` as built (on the CPU, before the
    engine prepares it)."""
    from erf import __version__

    ref = built if first_draw == 0 else maker.build(0)
    extra = []
    if maker.is_factory:
        extra.append(maker.model)
    if callable(maker.init):
        extra.append(maker.init)
    return {"weights": weights_hash(ref), "code": code_hash(ref, *extra), "inputs": inputs_hash(source),
            "erf": __version__}


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration with the fingerprint's parts as ``fingerprint.PART`` keys."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if k == "fingerprint" and isinstance(v, Mapping):
            for part, value in v.items():
                out[f"fingerprint.{part}"] = value
        else:
            out[k] = v
    return out


def differences(a: Mapping[str, Any], b: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys (fingerprint parts flattened) whose values differ, in words where known."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))
    return [f"{k} ({_NAMES[k]})" if k in _NAMES else k for k in keys]


# --------------------------------------------------------------------------- files read back
def _finite_real(name: str, arr: np.ndarray, shape: tuple[int, ...] | None, where: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        kind = "complex" if isinstance(arr, np.ndarray) and arr.dtype.kind == "c" else \
            getattr(getattr(arr, "dtype", None), "name", type(arr).__name__)
        raise ValueError(f"{where}: array {name!r} must be real numbers, got {kind}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{where}: array {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: array {name!r} holds NaN or Inf")
    return arr.astype(np.float64, copy=False)


def check_count(name: str, n: Any, where: str) -> int:
    """A sample count: a finite, non-negative whole number."""
    if isinstance(n, bool) or not isinstance(n, (numbers.Real, np.ndarray)):
        raise ValueError(f"{where}: {name} must be a non-negative whole number, got {n!r}")
    value = float(n)
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{where}: {name} must be a non-negative whole number, got {n!r}")
    return int(value)


def check_result_arrays(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str) -> None:
    """The arrays of a result file agree with its metadata: shapes, real finite values, n >= 0."""
    shape = meta.get("input_shape")
    if not isinstance(shape, (list, tuple)) or not 2 <= len(shape) <= 4 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{where}: input_shape {shape!r} is not 2 to 4 positive ints")
    check_count("n", meta.get("n"), where)
    spatial = tuple(shape[1:])
    for key in ("map", "m2"):
        _finite_real(key, arrays[key], spatial, where)
    if (arrays["m2"] < 0).any():
        raise ValueError(f"{where}: array 'm2' (sums of squared deviations) has negative entries")
    unit = meta.get("unit")
    if not isinstance(unit, (list, tuple)) or not all(isinstance(u, int) and not isinstance(u, bool) for u in unit):
        raise ValueError(f"{where}: unit {unit!r} is not a list of ints")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{where}: config is missing")


def check_checkpoint_arrays(n: Any, mean: np.ndarray, m2: np.ndarray, shape: tuple[int, ...], where: str) -> int:
    """One target's running moments of a checkpoint: n a count, mean and M2 real, finite, of ``shape``."""
    count = check_count("n", n, where)
    _finite_real("mean", mean, shape, where)
    _finite_real("m2", m2, shape, where)
    if (m2 < 0).any():
        raise ValueError(f"{where}: array 'm2' has negative entries")
    return count


def check_position(state: Mapping[str, Any], first_draw: int, draws: int, n_per_draw: int | None,
                   where: str) -> tuple[int, int]:
    """The ``(draw, start)`` a checkpoint continues from lies inside the run."""
    draw, start = state.get("draw"), state.get("start")
    for name, v in (("draw", draw), ("start", start)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: {name} {v!r} is not a non-negative int")
    if not first_draw <= draw <= first_draw + draws:
        raise ValueError(f"{where}: draw {draw} is outside the run's draws {first_draw}..{first_draw + draws}")
    if n_per_draw is not None and start > n_per_draw:
        raise ValueError(f"{where}: start {start} is beyond the {n_per_draw} inputs of a draw")
    return draw, start


def check_checkpoint_path(path: str | None, resume: bool) -> None:
    """A checkpoint path names a file (not a folder), and an existing one is continued, never replaced."""
    if path is None:
        return
    if path == "" or os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"checkpoint {path!r} is a folder; give a file path such as run.ckpt.npz")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} exists and is not a regular file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"checkpoint {path!r}: {parent!r} is a file, not a folder")
    if os.path.isfile(path) and not resume:
        raise ValueError(f"checkpoint {path!r} exists and holds earlier progress: pass resume=True to continue "
                         "it, or delete it to start afresh (it is never replaced silently)")


# --------------------------------------------------------------------------- values met during a run
def check_finite_inputs(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``x`` (inputs ``lo .. hi-1``) must be finite: a NaN/Inf input gives a finite but meaningless map."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).nonzero().flatten().tolist()
        raise ValueError(f"inputs: inputs {[lo + b for b in bad[:5]]} (of {lo}..{hi - 1}) hold NaN or Inf values; "
                         "pass finite inputs")
    return x


class OverflowGuard:
    """Forward hooks on every leaf module marking the samples whose activations are not finite.

    In float16/bfloat16 a forward pass can overflow (inf) and a later saturating layer hide it,
    leaving a finite but wrong unit value; the engine treats such samples as non-finite maps."""

    def __init__(self, model: nn.Module, n: int, device: torch.device):
        self.bad = torch.zeros(n, dtype=torch.bool, device=device)
        self.n = n
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if not any(True for _ in m.children())]

    def _hook(self, _m, _args, out) -> None:
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 1 and out.shape[0] == self.n:
            self.bad |= ~torch.isfinite(out.detach().reshape(self.n, -1)).all(1)

    def __enter__(self) -> "OverflowGuard":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def check_run_outcome(n: float, mean: np.ndarray, name: str, skipped: float) -> None:
    """After a run: n = 0 is an error; an all-zero or constant map a warning naming the likely causes."""
    import warnings

    if n <= 0:
        why = (f"all {int(skipped)} samples had non-finite gradients or unit values and were skipped"
               if skipped else "the inputs were empty")
        raise ValueError(f"no map was averaged for {name} (n = 0): {why}")
    if not np.any(mean):
        warnings.warn(f"the map of {name} is all zeros: the unit does not depend on the input (a forward under "
                      "torch.no_grad or .detach(), a constant or zero-weight model, dead ReLUs, or a unit whose "
                      "field lies in the padding)", RuntimeWarning, stacklevel=3)
    elif mean.size > 1 and float(np.ptp(mean)) == 0.0:
        warnings.warn(f"the map of {name} is constant ({float(mean.flat[0]):.4g} everywhere): the unit weighs every "
                      "input position equally (a global average of a linear model?), so its ERF has no shape",
                      RuntimeWarning, stacklevel=3)
