"""Default targets: the last spatial feature map of a classifier, stage shorthands, close names.

- A model whose output has no spatial axes (a classifier's logits) is analysed, when no layer is
  given, at its last spatial feature map: for timm models the last entry of ``feature_info`` (the
  stages timm itself exports with ``features_only=True`` / ``forward_intermediates``); for other
  models (torchvision, your own) the last stage found on one probe forward (below).
- ``layer="stage:K"`` names stage ``K`` of that list (0-based, negative from the end), the same
  numbering as timm's ``out_indices``.
- Stages of a model without ``feature_info``: one forward pass with hooks on every module records
  each output that reads as a feature map of the input (:mod:`erf._layout`; single-position maps
  such as squeeze-excitation gates are ignored). The container whose direct children, in execution
  order, span the most resolutions is the backbone (the model itself for a torchvision ResNet,
  ``features`` for MobileNet/EfficientNet/VGG/ConvNeXt/Swin, ``trunk_output`` for RegNet); its
  stages are the last child at each resolution (``layer1`` .. ``layer4``; ``features.1`` ..
  ``features.8``). One resolution only (a vision transformer): every child is a stage (its blocks).
  This follows the modules the forward really runs, so it also works where torch.fx cannot trace.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Sequence

import torch
from torch import nn

from erf._layout import Hints, interpretable, plan_layout

_STAGE = re.compile(r"^stage:(-?\d+)$")


def is_stage(layer: Any) -> bool:
    return isinstance(layer, str) and layer.startswith("stage:")


def close_names(model: nn.Module, name: str, n: int = 6) -> list[str]:
    """Module paths of ``model`` closest to ``name`` (difflib), for 'did you mean' hints."""
    names = [p for p, _ in model.named_modules() if p]
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if len(close) < n:  # also paths sharing the last component ("conv2" -> "layer1.0.conv2")
        tail = name.rsplit(".", 1)[-1]
        close += [p for p in names if p.rsplit(".", 1)[-1] == tail and p not in close][: n - len(close)]
    return close


def _timm_stages(model: nn.Module) -> list[str] | None:
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    try:
        if hasattr(info, "module_name"):  # timm FeatureInfo of a features_only model
            names = [info.module_name(i) for i in range(len(info))]
        else:
            names = [d["module"] for d in info]
    except (TypeError, KeyError, IndexError, AttributeError):
        return None
    known = {p for p, _ in model.named_modules()}
    names = [n for n in names if isinstance(n, str) and n in known]
    return names or None


def _spatial_key(out: torch.Tensor, input_shape: Sequence[int], hints: Hints, module: nn.Module) -> tuple | None:
    if not interpretable(out, input_shape, hints, module):
        return None
    plan = plan_layout(out, input_shape, layout=None, grid=None, hints=hints, module=module, where="output")
    return tuple(plan.apply(out).shape[2:])


def _probe_stages(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    hints = Hints.of(model)
    records: list[tuple[str, tuple]] = []
    handles = []

    def hook_for(name, mod):
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                key = _spatial_key(out, input_shape, hints, mod)
                if key is not None:
                    records.append((name, key))
        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook_for(name, mod)))
    p = next((t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None)
    x = torch.zeros((1,) + tuple(input_shape), device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.dtype == torch.float64 else torch.float32)
    was_training = model.training
    model.eval()  # the caller's model (erf.theoretical_rf): no BatchNorm statistics updated
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    key_of: dict[str, tuple] = {}
    finish: dict[str, int] = {}
    for i, (name, key) in enumerate(records):
        if math.prod(key) > 1:
            key_of[name] = key
            finish[name] = i
    # the container whose direct children, in execution order, span the most resolutions
    children: dict[str, list[str]] = {}
    for name in sorted(key_of, key=finish.get):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        children.setdefault(parent, []).append(name)
    if not children:
        return []
    best = max(children, key=lambda c: (len(set(key_of[n] for n in children[c])), len(children[c]), -c.count(".")))
    kids = children[best]
    keys = []
    for n in kids:
        if key_of[n] not in keys:
            keys.append(key_of[n])
    if len(keys) == 1:
        return kids  # one resolution (a vision transformer): every block is a stage
    return [[n for n in kids if key_of[n] == k][-1] for k in keys]


def stages(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[str], str]:
    """The model's stages (module paths, shallow to deep) and where the list comes from."""
    timm = _timm_stages(model)
    if timm:
        return timm, "timm feature_info"
    return _probe_stages(model, input_shape), "probe forward (last module of each resolution)"


def stage_layer(model: nn.Module, layer: str, input_shape: Sequence[int]) -> str:
    """The module path of ``layer="stage:K"``."""
    m = _STAGE.match(layer)
    if not m:
        raise ValueError(f"layer {layer!r}: a stage shorthand is stage:K with K an int (e.g. stage:-1, stage:2)")
    k = int(m.group(1))
    names, source = stages(model, input_shape)
    if not names:
        raise ValueError(f"layer {layer!r}: found no stages with spatial outputs in the model ({source}); "
                         "pass a module path")
    if not -len(names) <= k < len(names):
        raise ValueError(f"layer {layer!r}: the model has {len(names)} stages (0..{len(names) - 1}, from "
                         f"{source}): {', '.join(names)}")
    return names[k]


def resolve_layers(owner: nn.Module, model: nn.Module, layer_args: Sequence[Any],
                   input_shape: Sequence[int]) -> list[str]:
    """Module paths of ``layer_args``: ``stage:K`` shorthands, paths (with close names on a typo), modules."""
    from erf._validate import resolve_layer

    out = []
    for layer in layer_args:
        if layer is not None and (isinstance(owner, torch.jit.ScriptModule) or getattr(model, "_erf_scripted", False)):
            raise ValueError(f"layer {layer!r}: a TorchScript module cannot be hooked at a layer; analyse its "
                             "output (layer=None) or pass the Python nn.Module")
        if is_stage(layer):
            out.append(stage_layer(model, layer, input_shape))
            continue
        try:
            out.append(resolve_layer(owner, layer))
        except ValueError as exc:
            if isinstance(layer, str):
                close = close_names(owner, layer)
                hint = (f"did you mean {', '.join(close)}?" if close
                        else "list them with [n for n, _ in model.named_modules()]")
                raise ValueError(f"layer {layer!r} is not a submodule of the model; {hint} "
                                 "(stage shorthands: stage:0 .. stage:-1)") from None
            raise exc
    return out


def default_layer(model: nn.Module, input_shape: Sequence[int]) -> tuple[str, str]:
    """The last spatial feature map of a model whose output has none: ``(path, how it was chosen)``."""
    names, source = stages(model, input_shape)
    if not names:
        raise ValueError("layer: the model output has no spatial axes and no layer of the model gives a feature "
                         f"map of the {'x'.join(map(str, input_shape[1:]))} input with more than one position; "
                         "pass layer=... (a module path) or a larger input_shape")
    return names[-1], f"last spatial feature map ({source})"


def output_is_spatial(out: Any, input_shape: Sequence[int], hints: Hints) -> bool:
    """Whether the model output itself is the target: anything but a ``(N, K)`` (or ``(N,)``) tensor.

    Tuples/dicts (``select=`` asks), token sequences and channels-first/-last maps are the target
    (their own errors ask for ``grid=`` / ``layout=``); logits are not.
    """
    return not isinstance(out, torch.Tensor) or out.dim() >= 3


def choose_default(model: nn.Module, input_shape: Sequence[int], hints: Hints, out: Any) -> tuple[str, str] | None:
    """``(path, reason)`` when the model output ``out`` is not a feature map (a classifier), else ``None``."""
    if output_is_spatial(out, input_shape, hints):
        return None
    return default_layer(model, input_shape)
