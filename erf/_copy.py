"""Copying the caller's model safely: non-leaf tensor attributes, TorchScript modules, dtypes.

- ``copy.deepcopy`` refuses tensors that are outputs of autograd (a model that keeps
  ``self.feature_maps = [t]`` from its last forward): :func:`safe_deepcopy` copies those as
  detached tensors (they are caches, never parameters, and the run overwrites them).
- A TorchScript module (``torch.jit.script``/``trace``/``load``) deep-copies into non-leaf
  parameters and cannot be hooked: :func:`wrap_script` makes a hookable ``nn.Module`` around a
  fresh copy (``torch.jit.save``/``load`` round trip), analysable at its output (``layer=None``)
  with its weights as given.
- A model whose parameters are float16/bfloat16/float64 while the run computes in float32
  (:func:`match_dtype`): its copy is cast to float32 (the map is a float32 gradient), with a note.
"""
from __future__ import annotations

import copy
import io
from typing import Any

import torch
from torch import nn


def _nonleaf_memo(obj: Any, memo: dict, seen: set, depth: int = 0) -> None:
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if not obj.is_leaf and id(obj) not in memo:
            memo[id(obj)] = obj.detach().clone()
        return
    if isinstance(obj, nn.Module):
        for value in vars(obj).values():
            _nonleaf_memo(value, memo, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for value in obj.values():
            _nonleaf_memo(value, memo, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _nonleaf_memo(value, memo, seen, depth + 1)


def safe_deepcopy(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, copying non-leaf tensor attributes as detached tensors.

    Raises:
        TypeError: the model cannot be copied at all (naming the cause; pass a factory instead).
    """
    if isinstance(model, torch.jit.ScriptModule):
        return wrap_script(model)
    memo = {} if memo is None else memo
    try:
        return copy.deepcopy(model, dict(memo))
    except RuntimeError as exc:
        if "deepcopy" not in str(exc):
            raise
    extra: dict = {}
    _nonleaf_memo(model, extra, set())
    try:
        return copy.deepcopy(model, {**memo, **extra})
    except Exception as exc:  # noqa: BLE001 - say what failed, in one line
        raise TypeError(f"model: cannot be deep-copied ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        "pass a zero-argument factory that builds it instead") from None


class ScriptedModel(nn.Module):
    """A hookable wrapper around a TorchScript module (its output is the unit's tensor)."""

    _erf_scripted = True

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        buf = io.BytesIO()
        torch.jit.save(script, buf)
        buf.seek(0)
        fresh = torch.jit.load(buf, map_location="cpu")
        for p in fresh.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_script", [fresh])  # hidden from modules(): ScriptModules take no hooks
        self.original_name = getattr(script, "original_name", type(script).__name__)

    @property
    def script(self) -> torch.jit.ScriptModule:
        return self._script[0]

    def forward(self, *args, **kwargs):
        return self.script(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._script[0] = self.script._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self.script.train(mode)
        return super().train(mode)

    def __deepcopy__(self, memo):
        return ScriptedModel(self.script)

    def extra_repr(self) -> str:
        return f"TorchScript {self.original_name}"


def wrap_script(script: torch.jit.ScriptModule) -> ScriptedModel:
    return script if isinstance(script, ScriptedModel) else ScriptedModel(script)


def check_script(model: Any, init: Any, draws: int) -> None:
    """TorchScript modules are used with their weights as given, at their output."""
    if isinstance(model, torch.jit.ScriptModule) and (init != "default" or draws != 1):
        raise ValueError("init: a TorchScript module is analysed with its weights as given (init='default', "
                         "draws=1): its submodules cannot be re-initialised; pass the Python nn.Module or a "
                         "factory to draw random weights")


def match_dtype(model: nn.Module, run_dtype: torch.dtype) -> str | None:
    """Cast ``model`` (a private copy) to float32 when its floating parameters are another dtype.

    The engine computes in float32 (float64 for ``dtype=torch.float64``, which casts itself;
    float16/bfloat16 runs are float32 models under autocast). Returns a note, or ``None``.
    """
    if run_dtype == torch.float64:
        return None
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers())
              if t.is_floating_point() and not isinstance(t, nn.parameter.UninitializedParameter)}
    if not dtypes or dtypes == {torch.float32}:
        return None
    model.float()
    given = "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))
    return (f"model: its parameters are {given}; the run casts its copy to float32 "
            f"(dtype={str(run_dtype).replace('torch.', '')}: float16/bfloat16 run as autocast on a float32 model, "
            "dtype=torch.float64 in double precision)")
