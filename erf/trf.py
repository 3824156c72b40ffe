"""Theoretical receptive field of one unit, on the real graph of a network.

Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural Networks",
Distill 2019. https://distill.pub/2019/computing-receptive-fields/

The graph (torch.fx with ShapeProp; forward hooks over leaf modules where tracing fails) is
walked twice: forward, composing per axis size r, jump j and start -P for the table
(r' = r + (k_eff - 1) j, j' = s j, P' = P + p j, k_eff = d (k - 1) + 1), and backward, carrying
the exact input-index interval seen by the unit through every node in reverse topological order
(hull at fan-out), which gives ``region`` exactly for irregular windows and multi-path graphs.
:func:`empirical_trf` measures the support of the unit's gradient as a cross-check.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _graph as G
from ._copy import safe_deepcopy
from ._validate import check_conv_rank, check_index, check_input_shape, model_accepts, resolve_layer

__all__ = ["RFReport", "EmpiricalTRF", "theoretical_rf", "empirical_trf"]


def _num(v):
    """int when integral, else float (JSON-friendly)."""
    if v is None:
        return None
    f = float(v)
    return int(round(f)) if abs(f - round(f)) < 1e-9 else f


@dataclass
class RFReport:
    """Theoretical receptive field of one unit (see :func:`theoretical_rf`).

    Per spatial axis (array order) tuples: ``size`` (the region's side), ``jump`` (effective
    stride), ``padding`` (effective padding P: unit u sees ``u*jump - P .. u*jump - P + size - 1``),
    ``region`` ((first, last) inclusive, may lie outside the input; ``None``, with size 0, for a
    unit that depends on no input), ``center`` (may be a half-integer). ``jump``/``padding`` entries are ``None`` for an axis the layer's output lacks.
    ``is_global``: the unit sees the whole input (global pooling, gates, norms over space);
    ``local_size``/``local_region``: the field with those global statistics held constant
    (``None`` when nothing local remains). ``aligned``: False when paths disagree in jump or
    centre (``misaligned`` names the nodes). ``croppable``: finite, aligned, no global, unknown or
    batch-coupled layer before the unit. ``unknown``: layers without a rule (assumed pointwise when
    they keep the shape, else global).
    """

    input_shape: tuple
    layer: str | None
    unit: tuple
    size: tuple
    jump: tuple
    padding: tuple
    region: tuple
    center: tuple
    is_global: bool
    local_size: tuple | None
    local_region: tuple | None
    aligned: bool
    croppable: bool
    misaligned: list = field(default_factory=list)
    global_layers: list = field(default_factory=list)
    unknown: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    method: str = "fx"

    def table(self) -> list[dict]:
        """One row per layer on the unit's paths: name, type, kernel, stride, dilation, padding,
        size, jump, start (per axis; start = -P of that layer's output 0), note."""
        return [dict(r) for r in self.rows]

    def to_text(self) -> str:
        """The report as aligned text: summary lines, then the table."""
        def fmt(v):
            if v is None:
                return "-"
            if isinstance(v, (tuple, list)):
                return "x".join(fmt(x) for x in v) if not any(isinstance(x, (tuple, list)) for x in v) \
                    else " ".join(f"[{fmt(x[0])},{fmt(x[1])}]" for x in v)
            return f"{v:g}" if isinstance(v, float) else str(v)

        lines = [f"Theoretical receptive field of unit {self.unit} of {self.layer or 'output'} "
                 f"(input {fmt(tuple(self.input_shape))}, graph by {self.method})",
                 f"  size {fmt(self.size)}  jump {fmt(self.jump)}  padding {fmt(self.padding)}  "
                 f"region {fmt(self.region)}  center {fmt(self.center)}"]
        if self.is_global:
            lines.append(f"  global (via {', '.join(self.global_layers[:4])}); local size "
                         f"{fmt(self.local_size)} region {fmt(self.local_region)}")
        if not self.aligned:
            lines.append(f"  MISALIGNED paths at {', '.join(self.misaligned)}")
        if self.unknown:
            lines.append(f"  unknown layers: {', '.join(self.unknown)}")
        lines.append(f"  croppable: {self.croppable}")
        cols = ["name", "type", "kernel", "stride", "dilation", "padding", "size", "jump", "start", "note"]
        cells = [cols] + [[fmt(r.get(c)) if c not in ("name", "type", "note") else str(r.get(c) or "")
                           for c in cols] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        for row in cells:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        return "\n".join(lines)

    __str__ = to_text

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists); :meth:`from_dict` restores an equal report."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "RFReport":
        """Inverse of :meth:`to_dict`."""
        def tup(v):
            if isinstance(v, list):
                return tuple(tup(x) for x in v)
            return v

        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("input_shape", "unit", "size", "jump", "padding", "region", "center",
                  "local_size", "local_region"):
            if kw.get(k) is not None:
                kw[k] = tup(kw[k])
        kw["rows"] = [{k: tup(v) for k, v in r.items()} for r in kw.get("rows", [])]
        return cls(**kw)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


# --------------------------------------------------------------------------------------------
# validation


class TRFUnavailable(ValueError):
    """The model cannot be analysed exactly (no fx trace and not a plain chain of modules): ``str(exc)``
    says why. :attr:`erf.ERFResult.trf` is then ``None`` with this reason in ``trf_reason``."""


def _check_model(model) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        m = model()
        if isinstance(m, nn.Module):
            return m
        raise TypeError(f"model factory must return an nn.Module, got {type(m).__name__}")
    raise TypeError(f"model must be an nn.Module or a factory, got {type(model).__name__}")


def _layer_path(model: nn.Module, layer, input_shape) -> str | None:
    """The module path of ``layer`` (``None`` for the model output): a path, a module or ``stage:K``
    (:func:`erf._defaults.resolve_layers`, which lists close names for a misspelt path)."""
    if layer is None:
        return None
    from ._defaults import resolve_layers

    return resolve_layers(model, model, [layer], input_shape)[0] or None


def _check_unit(unit, sizes: Sequence[int]) -> tuple[int, ...]:
    """Normalise ``unit`` against the spatial sizes of the layer output (default the centre)."""
    if unit is None:
        return tuple(s // 2 for s in sizes)
    return check_index("unit", unit, sizes)


# --------------------------------------------------------------------------------------------
# analysis


def _build(model: nn.Module, input_shape: tuple) -> G.Graph:
    # the probe has the model's floating dtype: a float64 model with biases refuses float32 inputs
    dtype = next((t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()),
                 torch.float32)
    x = torch.rand((1,) + input_shape, dtype=dtype)
    try:
        graph = G.build_fx(model, x)
    except Exception as exc:  # tracing fails on data-dependent Python control flow
        graph = G.build_hooks(model, x, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return graph


def _forward(ops: list[G.Op]):
    """Per op and axis (r, j, start, glob, valid): the composition over the local paths (valid
    is False when every path goes through a global layer) and whether any path is global; plus
    the ops where local paths disagree in jump or centre."""
    fwd: list[dict] = []
    misaligned: set[int] = set()
    for i, op in enumerate(ops):
        if i == 0:
            fwd.append({a: (1, 1, 0, False, True) for a in op.axes})
            continue
        out = {}
        for a in op.axes:
            regular, glob = [], False
            for p, src in enumerate(op.inputs):
                if a not in fwd[src]:
                    continue
                rule = op.rules[p].get(a, G.IDENTITY)
                r, j, s, g, valid = fwd[src][a]
                glob |= g or rule.is_global
                if valid and not rule.is_global and not isinstance(rule, G.Bcast):
                    regular.append(rule.compose(r, j, s))
            if not regular:
                out[a] = (None, None, None, True, False)
                continue
            r0, j0, s0 = regular[0]
            for r, j, s in regular[1:]:
                if abs(j - j0) > 1e-9 or abs((s + (r - 1) / 2) - (s0 + (r0 - 1) / 2)) > 1e-9:
                    misaligned.add(i)
            start = min(c[2] for c in regular)
            end = max(c[2] + c[0] - 1 for c in regular)
            out[a] = (end - start + 1, j0, start, glob, True)
        fwd.append(out)
    return fwd, misaligned


def _backward(ops: list[G.Op], target: int, unit_iv: dict, local: bool):
    """Exact input index set per axis seen by the unit (sorted arrays, united at fan-out); the
    ops reached (``need[i]`` not None) and the ops whose global rules were used."""
    need: list[dict | None] = [None] * len(ops)
    need[target] = {a: np.arange(lo, hi + 1) for a, (lo, hi) in unit_iv.items()}
    used_global: list[int] = []
    for i in range(target, 0, -1):
        if need[i] is None:
            continue
        op = ops[i]
        for p, src in enumerate(op.inputs):
            rules = op.rules[p]
            if local:
                if op.local_rules is not None:
                    rules = op.local_rules[p]
                    if rules is None:
                        continue
                elif any(r.is_global for r in rules.values()):
                    continue
            s_op = ops[src]
            iv = {}
            hit_global = False
            for a, d in s_op.axes.items():
                rule = rules.get(a, G.IDENTITY)
                if a in need[i]:
                    got = rule.back_set(need[i][a]) if rule is not G.IDENTITY else need[i][a]
                elif isinstance(rule, (G.Glob, G.Fixed, G.Bcast)):
                    got = rule.back_set(np.zeros(1, dtype=np.int64))
                else:
                    got = np.arange(s_op.shape[d])
                if got.size == 0:
                    iv = None
                    break
                hit_global |= rule.is_global
                iv[a] = got
            if iv is None:
                continue
            if hit_global:
                used_global.append(i)
            cur = need[src]
            need[src] = iv if cur is None else {a: np.union1d(cur[a], iv[a]) for a in iv}
    for i, nd in enumerate(need):
        if nd is not None:
            need[i] = {a: (int(v[0]), int(v[-1])) for a, v in nd.items()}
    return need, used_global


def _rule_info(rule: G.Rule) -> tuple:
    return (_num(rule.kernel), _num(rule.stride), _num(rule.dilation), _num(rule.padding))


def theoretical_rf(model: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int],
                   layer: str | nn.Module | None = None,
                   unit: int | Sequence[int] | None = None) -> RFReport:
    """Analytic receptive field of one unit on the real graph of ``model``.

    Per axis (Araujo et al., Distill 2019, https://distill.pub/2019/computing-receptive-fields/):
    ``r_out = r_in + (k_eff - 1) j_in``, ``j_out = s j_in``, ``P_out = P_in + p j_in``; unit ``u``
    sees ``u j - P .. u j - P + r - 1``, exactly back-propagated through branches (hull of the
    paths), irregular windows and modules declaring ``rf_rule`` / ``rf_input_span``.

    Args:
        model: an ``nn.Module`` (not modified: a deep copy is analysed in eval mode) or a factory.
        input_shape: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``.
        layer: module path (``"layer4.1.conv2"``) or module whose output holds the unit; default
            the model output.
        unit: spatial index in that output; default the centre ``n // 2``; negative from the end.
    Returns:
        :class:`RFReport`.
    Raises:
        TypeError / ValueError: naming the bad argument.
    """
    model = _check_model(model)
    input_shape = check_input_shape(input_shape)
    path = _layer_path(model, layer, input_shape)
    was_training = model.training
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # the copy shares parameter and buffer storage: the analysis reads them, never writes
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    work = safe_deepcopy(model, memo).eval()
    check_conv_rank(work, input_shape)
    try:
        with model_accepts(input_shape):  # the model's own errors: one line naming input_shape
            graph = _build(work, input_shape)
    except ValueError:
        raise
    except Exception as exc:  # anything else the analysis met
        raise ValueError(f"input_shape {input_shape}: the analysis failed: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    for msg in graph.warnings:
        warnings.warn(msg, stacklevel=2)
    ops = graph.ops
    if path is None:
        if graph.output is None:
            raise ValueError("the model output is not a single tensor: pass layer=")
        target = graph.output
    else:
        if path not in graph.module_outputs:
            raise ValueError(f"layer {path!r} produces no tensor on the input's path (or returns a tuple)")
        target = graph.module_outputs[path]
    t_op = ops[target]
    spatial = sorted(t_op.axes.items(), key=lambda kv: kv[1])
    sizes = [t_op.shape[d] for _, d in spatial]
    u = _check_unit(unit, sizes)
    unit_iv = {a: (ui, ui) for (a, _), ui in zip(spatial, u)}

    fwd, misaligned = _forward(ops)
    need, used_global = _backward(ops, target, unit_iv, local=False)
    need_l, _ = _backward(ops, target, unit_iv, local=True)
    n_ax = len(input_shape) - 1
    if need[0] is None:  # e.g. a transposed conv's output between input taps: only the bias
        warnings.warn(f"unit {u} of {path or 'the output'} does not depend on the input", stacklevel=2)
        region, size, center = None, (0,) * n_ax, None
    else:
        region = tuple((need[0][a][0], need[0][a][1]) for a in range(n_ax))
        size = tuple(b - a + 1 for a, b in region)
        center = tuple(_num((a + b) / 2) for a, b in region)
    ft = fwd[target]
    jump = tuple(_num(ft[a][1]) if a in ft and ft[a][4] else None for a in range(n_ax))
    padding = tuple(_num(-ft[a][2]) if a in ft and ft[a][4] else None for a in range(n_ax))
    local_region = None if need_l[0] is None else tuple((need_l[0][a][0], need_l[0][a][1]) for a in range(n_ax))
    local_size = None if local_region is None else tuple(b - a + 1 for a, b in local_region)

    cone = [i for i in range(1, target + 1) if need[i] is not None]
    opaque = [ops[i].name for i in sorted(set(cone) | {target}) if ops[i].opaque]
    if opaque:
        raise TRFUnavailable(f"the TRF of {path or 'the output'} cannot be analysed: torch.fx could not trace the "
                             f"model ({graph.reason}) and from {opaque[0]!r} on the forward is not a plain chain "
                             "of modules (a branch, a functional op or an in-place change), so no field is "
                             "reported rather than one smaller than the true one")
    is_global = bool(used_global)
    mis = [ops[i].name for i in sorted(misaligned) if need[i] is not None]
    unknown = sorted({f"{ops[i].name} ({ops[i].type})" for i in cone if ops[i].unknown})
    if unknown:
        warnings.warn(f"layers without a receptive-field rule (assumed pointwise when they keep the "
                      f"shape, else global): {', '.join(unknown)}", stacklevel=2)
    coupled = any(ops[i].batch_coupled for i in cone) or (was_training and has_bn)
    croppable = (region is not None and not is_global and not mis and not unknown and not coupled and graph.method == "fx")
    rows = []
    for i in cone:
        op = ops[i]
        trivial = all(r is G.IDENTITY for rs in op.rules for r in rs.values())
        if not op.is_module and trivial and len(op.inputs) < 2:
            continue
        rules = op.rules[0] if op.rules else {}
        info = [_rule_info(rules.get(a, G.IDENTITY)) for a in range(n_ax)]
        f = fwd[i]
        rows.append({
            "name": op.name, "type": op.type,
            "kernel": tuple(x[0] for x in info), "stride": tuple(x[1] for x in info),
            "dilation": tuple(x[2] for x in info), "padding": tuple(x[3] for x in info),
            "size": tuple(_num(f[a][0]) if a in f else None for a in range(n_ax)),
            "jump": tuple(_num(f[a][1]) if a in f else None for a in range(n_ax)),
            "start": tuple(_num(f[a][2]) if a in f else None for a in range(n_ax)),
            "global": any(r.is_global for rs in op.rules for r in rs.values()),
            "note": op.note,
        })
    return RFReport(input_shape=input_shape, layer=path, unit=u, size=size, jump=jump, padding=padding,
                    region=region, center=center, is_global=is_global, local_size=local_size,
                    local_region=local_region, aligned=not mis, croppable=croppable, misaligned=mis,
                    global_layers=sorted({ops[i].name for i in used_global}, key=lambda n: n),
                    unknown=unknown, rows=rows, method=graph.method)


# --------------------------------------------------------------------------------------------
# empirical support of the gradient


@dataclass
class EmpiricalTRF:
    """Support of the unit's input gradient (see :func:`empirical_trf`).

    ``mask``: boolean array on the input grid; ``region``: per-axis (first, last) of the
    support's bounding box (``None`` when the support is empty); ``size``: its side per axis.
    """

    mask: np.ndarray
    region: tuple | None
    size: tuple | None
    unit: tuple
    layer: str | None
    input_shape: tuple


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Threshold, nn.RReLU, nn.LogSigmoid,
                nn.Tanhshrink, nn.Hardshrink, nn.Softshrink)
# squashing functions (gates) stay bounded, with a gradient that never vanishes: softsign
_SQUASH = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)


def _dense_max(orig: Callable, nd: int, adaptive: bool) -> Callable:
    """``orig`` (a max pooling functional) with a straight-through dense gradient: the value of
    the max, plus ``avg - avg.detach()`` so every element of a window receives gradient."""

    def fn(input, *args, **kwargs):
        out = orig(input, *args, **kwargs)
        vals = out[0] if isinstance(out, tuple) else out
        if adaptive:
            size = args[0] if args else kwargs["output_size"]
            dense = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[nd - 1](input, size)
        else:
            names = ("kernel_size", "stride", "padding", "dilation")
            vals_ = dict(zip(names, args))
            vals_.update({k: v for k, v in kwargs.items() if k in names})
            k = G.as_tuple(vals_["kernel_size"], nd)
            s = vals_.get("stride")
            s = G.as_tuple(s if s not in (None, [], ()) else k, nd)
            p = G.as_tuple(vals_.get("padding", 0), nd)
            d = G.as_tuple(vals_.get("dilation", 1), nd)
            if all(v == 1 for v in d):
                ceil = kwargs.get("ceil_mode", args[4] if len(args) > 4 else False)
                dense = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1](input, k, s, p, ceil_mode=ceil)
            else:  # dilated windows: a depthwise ones-convolution, cropped to the output size
                c = input.shape[-nd - 1]
                x = F.pad(input.reshape((-1,) + tuple(input.shape[-nd - 1:])), _right_pad(k, d, nd))
                w = torch.ones((c, 1) + k, dtype=input.dtype, device=input.device) / math.prod(k)
                dense = (F.conv1d, F.conv2d, F.conv3d)[nd - 1](x, w, stride=s, padding=p, dilation=d, groups=c)
                dense = dense[(Ellipsis,) + tuple(slice(0, n) for n in vals.shape[-nd:])].reshape(vals.shape)
        st = vals + (dense - dense.detach())
        return (st,) + tuple(out[1:]) if isinstance(out, tuple) else st

    return fn


def _right_pad(k, d, nd) -> list[int]:
    pad: list[int] = []
    for t in reversed(range(nd)):
        pad += [0, d[t] * k[t]]
    return pad


class _DenseMaxPatch:
    """Context manager replacing ``F.max_pool*d`` and ``F.adaptive_max_pool*d`` by dense-gradient
    versions (restored on exit, even after an error)."""

    names = [(f"max_pool{n}d", n, False) for n in (1, 2, 3)] + [(f"adaptive_max_pool{n}d", n, True) for n in (1, 2, 3)]

    def __enter__(self):
        self.saved = {name: getattr(F, name) for name, _, _ in self.names}
        for name, nd, adaptive in self.names:
            setattr(F, name, _dense_max(self.saved[name], nd, adaptive))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(F, name, fn)
        return False


def _positive_copy(model: nn.Module, generator: torch.Generator, dtype: torch.dtype):
    """A copy sharing the caller's tensors, with activations replaced by identity, and forward
    pre-hooks that give each module, on its first call, fresh ``dtype`` tensors: conv/linear
    weights positive and normalised (each output averages its inputs), biases zero, norms
    identities. Only the modules that run pay for it. Returns (copy, hook handles)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    m = safe_deepcopy(model, memo).eval()
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, ACTIVATIONS):
                setattr(mod, name, nn.Identity())
            elif isinstance(child, _SQUASH):
                setattr(mod, name, nn.Softsign())
    done: set[int] = set()
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

    def prep(mod, args):
        if id(mod) in done:
            return
        done.add(id(mod))
        with torch.no_grad():
            for name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)) and name == "weight":
                    w = torch.rand(p.shape, generator=generator, dtype=torch.float64) + 0.5
                    out_dim = 1 if isinstance(mod, nn.modules.conv._ConvTransposeNd) else 0
                    w = w / w.sum(dim=[d for d in range(w.dim()) if d != out_dim], keepdim=True)
                elif isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)) and name == "bias":
                    w = torch.zeros(p.shape, dtype=torch.float64)
                elif isinstance(mod, norms):
                    w = torch.full(p.shape, 1.0 if name == "weight" else 0.0, dtype=torch.float64)
                else:
                    w = p.detach()
                mod._parameters[name] = nn.Parameter(w.to(dtype=dtype, copy=True), requires_grad=False)
            for name, b in list(mod._buffers.items()):
                if b is None:
                    continue
                if isinstance(mod, norms) and name in ("running_mean", "running_var"):
                    b = torch.full(b.shape, 1.0 if name == "running_var" else 0.0)
                mod._buffers[name] = b.to(dtype=dtype, copy=True) if b.is_floating_point() else b.clone()

    handles = [mod.register_forward_pre_hook(prep) for mod in m.modules()]
    return m, handles


class _Stop(Exception):
    pass


def empirical_trf(model: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int],
                  layer: str | nn.Module | None = None, unit: int | Sequence[int] | None = None,
                  hold_gates: bool = False, *, dtype: torch.dtype = torch.float64,
                  n_inputs: int = 2, seed: int = 0) -> EmpiricalTRF:
    """Exact support of the gradient of one unit with respect to the input.

    ``support = {i : d unit / d x_i != 0}`` on a linearised positive copy of the model, so that
    no path is cut: activations become identity, conv/linear weights positive averages with zero
    bias, max pooling keeps its value but passes gradient to every window element, norms become
    identities; inputs are positive, ``n_inputs`` draws are united (data-dependent selections
    inside custom modules, e.g. median or rank pooling, pick different elements per draw).
    Cross-check of :func:`theoretical_rf` (Araujo et al., https://distill.pub/2019/computing-receptive-fields/).

    Args:
        model, input_shape, layer, unit: as :func:`theoretical_rf` (the unit indexes the spatial
            dims ``2..`` of the layer output; a 2-D output has no spatial dims).
        hold_gates: detach global gates (outputs of adaptive pooling to size 1, of modules whose
            ``rf_rule`` is global without a local rule): the support is then the local field.
        dtype: float64 by default (products of many small weights underflow float32).
        n_inputs: positive random inputs united; seed: their seed.
    Returns:
        :class:`EmpiricalTRF`.
    """
    model = _check_model(model)
    input_shape = check_input_shape(input_shape)
    check_conv_rank(model, input_shape)
    path = _layer_path(model, layer, input_shape)
    if not isinstance(n_inputs, int) or isinstance(n_inputs, bool) or n_inputs < 1:
        raise ValueError(f"n_inputs must be a positive int, got {n_inputs!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(hold_gates, bool):
        raise TypeError(f"hold_gates must be True or False, got {hold_gates!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    m, handles = _positive_copy(model, gen, dtype)
    captured: dict[str, torch.Tensor] = {}

    def detach_hook(mod, args, out):
        return out.detach() if isinstance(out, torch.Tensor) else out

    def stop_hook(mod, args, out):
        captured["out"] = out
        raise _Stop

    try:
        if hold_gates:
            for mod in m.modules():
                gate = isinstance(mod, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)) \
                    and all(v == 1 for v in G.as_tuple(mod.output_size, 3) if v is not None)
                if hasattr(mod, "rf_rule"):
                    rule = mod.rf_rule()
                    gate = gate or (rule.is_global and rule.local is None)
                if gate:
                    handles.append(mod.register_forward_hook(detach_hook))
        if path is not None:
            handles.append(m.get_submodule(path).register_forward_hook(stop_hook))
        x = (torch.rand((n_inputs,) + input_shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        x.requires_grad_(True)
        with _DenseMaxPatch():
            try:
                with model_accepts(input_shape):
                    out = m(x)
            except _Stop:
                out = captured["out"]
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise ValueError("the layer output is not a tensor")
    sizes = tuple(out.shape[2:])
    u = _check_unit(unit, sizes)
    sel = out[(slice(None), slice(None)) + u].sum()
    if not sel.requires_grad:
        mask = np.zeros(input_shape[1:], dtype=bool)
    else:
        g, = torch.autograd.grad(sel, x, allow_unused=True)
        if g is not None and not torch.isfinite(g).all():
            warnings.warn("the gradient has non-finite values (overflow in the linearised copy); "
                          "the support may be too large", stacklevel=2)
        mask = np.zeros(input_shape[1:], dtype=bool) if g is None else (g != 0).any(0).any(0).numpy()
    if not mask.any():
        region = size = None
    else:
        region = []
        for ax in range(mask.ndim):
            other = tuple(a for a in range(mask.ndim) if a != ax)
            idx = np.nonzero(mask.any(axis=other) if other else mask)[0]
            region.append((int(idx[0]), int(idx[-1])))
        region = tuple(region)
        size = tuple(b - a + 1 for a, b in region)
    return EmpiricalTRF(mask=mask, region=region, size=size, unit=u, layer=path, input_shape=input_shape)
