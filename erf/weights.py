"""Weights files as users have them: ``.pt/.pth/.bin/.ckpt`` (``torch.load(weights_only=True)``) and
``.safetensors``, unwrapped from the usual training-checkpoint layouts.

:func:`read_state_dict` turns a file into a flat state dict and a :class:`WeightsReport` saying
what it did: which wrapper keys it descended (``state_dict``, ``model``, ``model_ema``,
``state_dict_ema``, ``params``, ``params_ema``; nested ones too, e.g. ``{"model": {"state_dict": ...}}``;
EMA weights are preferred when both are present, as timm and BasicSR do at evaluation), which
prefixes it stripped (``module.`` of DistributedDataParallel, ``_orig_mod.`` of ``torch.compile``),
and the file's sha256. :func:`load_weights` loads it into a model strictly; a mismatch raises a
``ValueError`` naming the missing and unexpected keys and the shape differences. A single prefix
shared by every key that stops the keys from matching (``model.`` of a Lightning module,
``backbone.``, ``net.``) is stripped only when that makes the keys match, and reported.

Nothing here runs code from the file (``weights_only=True`` refuses such pickles; safetensors holds
tensors only) and nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

__all__ = ["WeightsReport", "read_state_dict", "load_weights", "apply_state_dict", "WRAPPER_KEYS", "file_sha256"]

#: Wrapper keys of training checkpoints, in the order they are preferred (EMA weights first).
WRAPPER_KEYS: tuple[str, ...] = ("state_dict_ema", "model_ema", "params_ema", "state_dict", "model", "params")
#: Prefixes added by wrappers, stripped wherever they lead a key (in any order, repeatedly).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
_SAFETENSORS_EXT = (".safetensors",)


@dataclass
class WeightsReport:
    """What :func:`load_weights` read and how.

    Attributes:
        path: the file (absolute). sha256: hex digest of its bytes. format: ``"torch"`` or ``"safetensors"``.
        unwrapped: wrapper keys descended, outermost first (e.g. ``["model", "state_dict"]``); empty for a
            bare state dict. alternatives: other wrapper keys present next to the chosen one (e.g.
            ``["model"]`` when ``model_ema`` was chosen). stripped: prefixes removed from the keys.
        n_tensors: tensors loaded. converted: how the keys were converted beyond stripping (e.g.
            timm's ``checkpoint_filter_fn``), else ``None``. dropped: non-tensor entries ignored.
    """

    path: str
    sha256: str
    format: str
    unwrapped: list[str] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)
    n_tensors: int = 0
    converted: str | None = None
    dropped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (a result's ``meta["provenance"]["weights"]``): ``file`` (= path), ``sha256``,
        ``bytes`` and the other fields."""
        out = asdict(self)
        out["file"] = self.path
        out["bytes"] = os.path.getsize(self.path) if os.path.isfile(self.path) else None
        return out

    def __str__(self) -> str:
        where = "[" + "][".join(repr(k) for k in self.unwrapped) + "]" if self.unwrapped else "a bare state dict"
        parts = [f"{self.n_tensors} tensors from {where} of {os.path.basename(self.path)} ({self.format}, "
                 f"sha256 {self.sha256[:12]})"]
        if self.alternatives:
            parts.append(f"also present, not used: {', '.join(self.alternatives)}")
        if self.stripped:
            parts.append("stripped prefix " + ", ".join(repr(p) for p in self.stripped))
        if self.converted:
            parts.append(f"converted by {self.converted}")
        return "; ".join(parts)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_path(path: Any, arg: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a path (str or os.PathLike) of a weights file, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{arg}: weights file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{arg}: {path!r} is not a file (a directory?); give the weights file itself")
    return path


def _looks_like_safetensors(path: str) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header starting with ``{``."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < os.path.getsize(path)


def _first_line(exc: BaseException) -> str:
    """The reason of a reader's exception in a few words (torch's unpickler explains at length)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    text = " ".join(text.split()).split(". ")[0].strip().rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_file(path: str, arg: str) -> tuple[Any, str]:
    import torch

    if path.lower().endswith(_SAFETENSORS_EXT) or _looks_like_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{arg}: {path!r} is a safetensors file; pip install safetensors to read it") from None
        try:
            return load_file(path, device="cpu"), "safetensors"
        except Exception as exc:  # SafetensorError, OSError: a truncated or corrupt file
            raise ValueError(f"{arg}: {path!r} cannot be read as a safetensors file ({_first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "torch"
    except pickle.UnpicklingError as exc:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if found:
            raise ValueError(f"{arg}: {path!r} is not a plain weights file: torch.load(weights_only=True) refused "
                             f"it because loading it would run code ({found.group(1)}); if you trust the file, "
                             "re-save only the weights: torch.save(torch.load(f, weights_only=False)['state_dict'], "
                             "'weights.pt')") from None
        raise ValueError(f"{arg}: {path!r} cannot be read as a torch or safetensors weights file "
                         f"({_first_line(exc)})") from None
    except Exception as exc:  # a truncated zip, a text file, ...
        raise ValueError(f"{arg}: {path!r} cannot be read as a torch or safetensors weights file "
                         f"({_first_line(exc)})") from None


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _unwrap(obj: Any, path: str, arg: str, key: str | None) -> tuple[dict, list[str], list[str]]:
    """Descend wrapper keys until a mapping holding tensors; returns (state dict, keys descended, alternatives)."""
    trail: list[str] = []
    alternatives: list[str] = []
    for _ in range(8):
        if not isinstance(obj, Mapping):
            break
        wrappers = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj.get(k)]
        if key is not None and not trail:
            if key not in obj or not isinstance(obj[key], Mapping):
                found = [k for k, v in obj.items() if isinstance(v, Mapping)]
                raise ValueError(f"{arg}: key {key!r} is not a dict entry of {path!r}; its dict entries are "
                                 f"{found[:10] or 'none'}")
            chosen = key
        elif wrappers and not any(_is_tensor(v) for v in obj.values()):
            chosen = wrappers[0]
        else:
            break
        alternatives = [k for k in wrappers if k != chosen] if not trail else alternatives
        trail.append(chosen)
        obj = obj[chosen]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{arg}: {path!r} holds a {type(obj).__name__}"
                         f"{' under ' + repr(trail) if trail else ''}, not a state dict (a dict of tensors); "
                         "save model.state_dict()")
    if not any(_is_tensor(v) for v in obj.values()):
        entries = [k for k in obj if isinstance(k, str)][:10]
        raise ValueError(f"{arg}: {path!r} holds no tensors{' under ' + repr(trail) if trail else ''} and none of "
                         f"the wrapper keys {list(WRAPPER_KEYS)}; its entries are {entries}")
    if not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{arg}: {path!r} is not a state dict: its keys are not all strings")
    return dict(obj), trail, alternatives


def _strip_wrappers(state: dict) -> tuple[dict, list[str]]:
    stripped: list[str] = []
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
                    if p not in stripped:
                        stripped.append(p)
        out[k] = v
    return out, stripped


def read_state_dict(path: str | os.PathLike, *, key: str | None = None,
                    arg: str = "path") -> tuple[dict, WeightsReport]:
    """A flat state dict from a weights file, and the :class:`WeightsReport` of how it was found.

    Args:
        path: ``.pt/.pth/.bin/.ckpt/...`` (``torch.load(weights_only=True)``) or ``.safetensors``
            (recognised by extension or by its header).
        key: the wrapper entry to use (e.g. ``"model"`` to skip ``"model_ema"``); default: the first
            of :data:`WRAPPER_KEYS` present, descending nested wrappers.
        arg: the argument name used in error messages.
    Raises:
        ValueError: a missing, unreadable, corrupt or code-running file; no state dict inside.
        TypeError: ``path`` is not a path.
    """
    path = _check_path(path, arg)
    obj, fmt = _read_file(path, arg)
    state, trail, alternatives = _unwrap(obj, path, arg, key)
    dropped = sorted(k for k, v in state.items() if not _is_tensor(v))
    state = {k: v for k, v in state.items() if _is_tensor(v)}
    state, stripped = _strip_wrappers(state)
    report = WeightsReport(path=os.path.abspath(path), sha256=file_sha256(path), format=fmt, unwrapped=trail,
                           alternatives=alternatives, stripped=stripped, n_tensors=len(state), dropped=dropped)
    return state, report


def _shared_prefix_strip(state: dict, own: set[str]) -> tuple[dict, str] | None:
    """Strip one leading ``NAME.`` shared by every key when that makes the keys the model's own."""
    firsts = {k.split(".", 1)[0] for k in state}
    if len(firsts) != 1 or not all("." in k for k in state):
        return None
    prefix = firsts.pop() + "."
    cut = {k[len(prefix):]: v for k, v in state.items()}
    return (cut, prefix) if set(cut) <= own else None


def mismatch_message(state: Mapping, model: nn.Module, limit: int = 4) -> str | None:
    """One line naming missing and unexpected keys and shape differences; ``None`` when the keys and
    shapes match."""
    own = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (files saved without it load in torch)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []

    def names(keys: Sequence[str]) -> str:
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    if missing:
        parts.append(f"{len(missing)} missing keys ({names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({names(unexpected)})")
    if shapes:
        more = f" and {len(shapes) - limit} more" if len(shapes) > limit else ""
        parts.append(f"{len(shapes)} shape differences (" + ", ".join(
            f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in shapes[:limit]) + more + ")")
    return "; ".join(parts)


def apply_state_dict(model: nn.Module, state: dict, report: WeightsReport, *, arg: str = "path",
                     alternatives: Sequence[tuple[str, Any]] = ()) -> WeightsReport:
    """Load ``state`` into ``model`` strictly (after an optional shared-prefix strip); record the report
    on the model (``model.erf_weights``, read by :func:`erf.effective_rf` into ``meta["provenance"]["weights"]``).

    ``alternatives``: ``(description, convert(state, model) -> state)`` tried in turn when the keys do
    not match as they are (e.g. timm's ``checkpoint_filter_fn``).
    """
    own = set(model.state_dict())
    detail = mismatch_message(state, model)
    if detail is not None and not set(state) <= own:
        cut = _shared_prefix_strip(state, own)
        if cut is not None and mismatch_message(cut[0], model) is None:
            state, prefix = cut
            report.stripped.append(prefix)
            detail = None
    if detail is not None:
        for name, convert in alternatives:
            try:
                converted = convert(state, model)
            except Exception:  # the converter does not apply to this checkpoint
                continue
            if isinstance(converted, Mapping) and mismatch_message(converted, model) is None:
                state, detail = dict(converted), None
                report.converted = name
                break
    if detail is not None:
        where = "[" + "][".join(repr(k) for k in report.unwrapped) + "]" if report.unwrapped else "a bare state dict"
        raise ValueError(f"{arg}: {os.path.basename(report.path)} holds weights for another model, not this "
                         f"{type(model).__name__} ({report.n_tensors} tensors from {where}): {detail}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise ValueError(f"{arg}: {os.path.basename(report.path)} does not load into {type(model).__name__}: "
                         f"{' '.join(str(exc).split())[:400]}") from None
    report.n_tensors = len(state)
    model.erf_weights = report
    model._erf_weights = report.to_dict()  # what erf.protocols.provenance reads
    return report


def load_weights(model: nn.Module, path: str | os.PathLike, *, key: str | None = None) -> WeightsReport:
    """Load a weights file into ``model`` in place and report what was read.

    Reads ``.pt/.pth/.bin/.ckpt`` with ``torch.load(weights_only=True)`` (a pickle that would run code
    is refused) and ``.safetensors``; unwraps ``state_dict``, ``model``, ``model_ema``,
    ``state_dict_ema``, ``params``, ``params_ema`` (nested too; EMA weights preferred, ``key`` picks
    another), strips ``module.`` and ``_orig_mod.`` prefixes, and loads strictly. The report (path,
    sha256, what was unwrapped and stripped) is returned and kept as ``model.erf_weights``, so
    :func:`erf.effective_rf` records it in ``result.meta["provenance"]["weights"]``.

    For a timm model whose keys do not match as they are (an original, non-timm checkpoint), timm's
    own ``checkpoint_filter_fn`` of that architecture is tried, as ``timm.create_model(...,
    pretrained_cfg_overlay=dict(file=...))`` would do it, without any download.

    Raises:
        ValueError: missing or unreadable file, no state dict inside, or keys/shapes that do not fit
            the model (the message names the missing and unexpected keys and the shape differences).
        TypeError: ``model`` is not an nn.Module or ``path`` not a path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state, report = read_state_dict(path, key=key, arg="path")
    return apply_state_dict(model, state, report, arg="path", alternatives=timm_converters(model))


def timm_converters(model: nn.Module) -> list[tuple[str, Any]]:
    """timm's per-architecture ``checkpoint_filter_fn`` (the one its pretrained loader applies)."""
    import sys

    mod = sys.modules.get(type(model).__module__)
    if mod is None or not type(model).__module__.startswith("timm."):
        return []
    fn = getattr(mod, "checkpoint_filter_fn", None) or getattr(mod, "_filter_fn", None)
    if fn is None:
        return []

    def convert(state, m):
        try:
            return fn(dict(state), m)
        except TypeError:
            return fn(dict(state))

    return [(f"{type(model).__module__}.{getattr(fn, '__name__', 'checkpoint_filter_fn')}", convert)]


def weights_meta(model: nn.Module, init: Any, draws: int, is_factory: bool) -> dict[str, Any] | None:
    """``meta["provenance"]["weights"]`` of a run: the :class:`WeightsReport` of the weights it used, if any.

    A model whose loaded weights the run re-draws (``init`` other than ``"default"``, or several
    draws of a module) gets a warning instead: the result does not describe that file.
    """
    import warnings

    report = getattr(model, "erf_weights", None)
    if not isinstance(report, WeightsReport):
        return None
    if init != "default" or (draws > 1 and not is_factory):
        warnings.warn(f"the model's loaded weights ({os.path.basename(report.path)}) are re-drawn by "
                      f"init={init!r}, draws={draws}: the result describes random weights, not that file; "
                      "use init='default' and draws=1 to measure the loaded weights", stacklevel=3)
        return None
    return report.to_dict()
