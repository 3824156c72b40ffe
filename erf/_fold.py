"""Folding eval-mode BatchNorm into the convolution before it (a speed path of the engine).

In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta`` per output channel (running mean ``m`` and variance
``v``, affine ``g``, ``beta``): the same function, so the same input gradient up to float
rounding, without the BatchNorm's forward and backward passes over the activations
(8-18 % of a batched ResNet-50 forward+backward on CPU: benchmarks/profile_engine.py). The arithmetic is torch's
``torch.nn.utils.fusion.fuse_conv_bn_eval``; this module decides *which* pairs are safe:

- the convolution's output goes to the BatchNorm and nowhere else, found on a ``torch.fx`` trace
  (or, when the model cannot be traced, from ``nn.Sequential`` neighbours);
- both are plain ``nn.ConvNd`` / ``nn.BatchNormNd`` (a subclass may change the forward, e.g.
  weight standardisation), each called once, without hooks or parametrizations, outside
  :mod:`erf.pooling` modules, and the BatchNorm uses running statistics;
- the convolution is not a layer the engine reads (its output changes; the BatchNorm's output,
  now an ``nn.Identity``, does not).

Never in ``train_mode`` (BatchNorm then uses the batch statistics).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from erf._draws import inside_pooling

log = logging.getLogger("erf")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _LeafTracer(fx.Tracer):
    """torch.nn layers and modules declaring ``rf_rule`` stay leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "rf_rule") or super().is_leaf_module(m, qualname)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return (type(conv) in _CONVS and type(bn) in _NORMS
            and conv.out_channels == bn.num_features
            and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
            and not any(parametrize.is_parametrized(m) for m in (conv, bn))
            and not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                        for m in (conv, bn)))


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]]:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    calls: dict[str, int] = {}
    touched: set[str] = set()  # modules whose attributes the forward reads directly
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            touched.add(node.target.rpartition(".")[0])
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and user.args and user.args[0] is node and len(user.args) == 1 \
                and not user.kwargs:
            pairs.append((node.target, user.target))
    return [(c, b) for c, b in pairs
            if calls.get(c) == 1 and calls.get(b) == 1 and c not in touched and b not in touched]


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    pairs = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            items = list(m.named_children())
            for (a, ma), (b, mb) in zip(items, items[1:]):
                if seen[id(ma)] == 1 and seen[id(mb)] == 1:
                    pairs.append((f"{name}.{a}" if name else a, f"{name}.{b}" if name else b))
    return pairs


def plan_folding(model: nn.Module, keep: Iterable[str]) -> list[tuple[str, str]]:
    """``(conv path, batchnorm path)`` pairs of ``model`` (in eval mode) that can be folded;
    ``keep``: module paths whose outputs the engine reads."""
    if isinstance(model, torch.jit.ScriptModule) or not any(type(m) in _NORMS for m in model.modules()):
        return []  # (tracing runs the Python forwards once: not without a reason)
    try:
        candidates = _pairs_from_graph(model)
    except Exception as exc:  # dynamic control flow, unsupported ops: fall back to Sequential order
        log.debug("BatchNorm folding: fx trace failed (%s); using nn.Sequential neighbours", exc)
        candidates = _pairs_from_sequentials(model)
    keep = {p for p in keep if p}
    skip = inside_pooling(model)  # an erf.pooling module's insides are its own
    out = []
    for conv_path, bn_path in candidates:
        # A read layer whose output may be the convolution's own (the layer ends with it).
        if any(conv_path == p or (conv_path.startswith(p + ".") and not bn_path.startswith(p + "."))
               for p in keep):
            continue
        try:
            conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        except AttributeError:
            continue
        if id(conv) not in skip and id(bn) not in skip and _foldable(conv, bn):
            out.append((conv_path, bn_path))
    return out


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def fold_batchnorms(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fold each planned BatchNorm into its convolution, in place; the BatchNorm becomes
    ``nn.Identity`` (so a hook on its path still sees the same values)."""
    with torch.no_grad():
        for conv_path, bn_path in pairs:
            conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
            if conv.training or bn.training:
                raise RuntimeError("BatchNorm folding needs eval mode")
            fused = fuse_conv_bn_eval(conv, bn)
            for p in fused.parameters():
                p.requires_grad_(False)
            _set_submodule(model, conv_path, fused)
            _set_submodule(model, bn_path, nn.Identity())
    return model
