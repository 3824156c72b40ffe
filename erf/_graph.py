"""Private graph machinery of the TRF analyser: per-axis index rules and the graph front-ends.

Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural Networks",
Distill 2019. https://distill.pub/2019/computing-receptive-fields/

The graph is a list of :class:`Op` in topological order. Every tensor carries one *label* per
dimension: ``"B"`` (batch), an ``int`` (spatial axis of the network input) or ``None`` (any other
dimension). For each tensor input, an op holds one :class:`Rule` per spatial axis of that input,
giving the input index interval seen by an output index interval (``back``) and the
size/jump/start composition (``compose``: r' = r + (k_eff - 1) j, j' = s j, start' = start - p j).
Front-ends: torch.fx (a tracer that keeps modules with ``rf_rule`` and torch.nn layers as
leaves, plus ShapeProp) and, where tracing fails, forward hooks over leaf modules (a chain).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

# --------------------------------------------------------------------------------------------
# per-axis rules


class Rule:
    """One axis of one input of an op. ``back`` maps an inclusive output interval to inputs."""

    is_global = False
    kernel, stride, padding, dilation = 1, 1, 0, 1

    def back(self, lo: int, hi: int) -> tuple[int, int] | None:
        raise NotImplementedError

    def back_set(self, idx: np.ndarray) -> np.ndarray:
        """Exact input index set seen by the sorted output indices ``idx`` (run by run)."""
        cuts = np.nonzero(np.diff(idx) > 1)[0] + 1
        parts = []
        for run in np.split(idx, cuts):
            got = self.back(int(run[0]), int(run[-1]))
            if got is not None:
                parts.append(np.arange(got[0], got[1] + 1))
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def compose(self, r: float, j: float, start: float) -> tuple[float, float, float]:
        k_eff = self.dilation * (self.kernel - 1) + 1
        return r + (k_eff - 1) * j, self.stride * j, start - self.padding * j


class Win(Rule):
    """Sliding window: output u sees ``u s - p .. u s - p + d (k - 1)`` (s, p may be fractional)."""

    def __init__(self, k: int, s: float = 1, p: float = 0, d: int = 1) -> None:
        self.kernel, self.stride, self.padding, self.dilation = int(k), s, p, int(d)

    def back(self, lo, hi):
        a = lo * self.stride - self.padding
        b = hi * self.stride - self.padding + self.dilation * (self.kernel - 1)
        return math.floor(a + 1e-9), math.ceil(b - 1e-9)

    def back_set(self, idx):
        s, p = self.stride, self.padding
        if self.dilation == 1 and self.kernel >= s or not (float(s).is_integer() and float(p).is_integer()):
            return super().back_set(idx)
        taps = np.arange(self.kernel) * self.dilation
        return np.unique((idx[:, None] * int(s) - int(p) + taps[None, :]).ravel())


IDENTITY = Win(1)


class TConv(Rule):
    """Transposed convolution: input i feeds outputs ``i s - p + t d``, t = 0 .. k-1."""

    def __init__(self, k: int, s: int, p: int, d: int) -> None:
        self.k, self.s, self.p, self.d = int(k), int(s), int(p), int(d)
        self.kernel, self.dilation = self.k, self.d
        self.stride, self.padding = 1 / self.s, math.ceil((self.d * (self.k - 1) - self.p) / self.s)

    def _hits(self, i: int, lo: int, hi: int) -> bool:
        o0 = i * self.s - self.p
        return any(lo <= o0 + t * self.d <= hi for t in range(self.k))

    def back(self, lo, hi):
        first = -((-(lo + self.p - self.d * (self.k - 1))) // self.s)
        last = (hi + self.p) // self.s
        while first <= last and not self._hits(first, lo, hi):
            first += 1
        while last >= first and not self._hits(last, lo, hi):
            last -= 1
        return (first, last) if first <= last else None

    def back_set(self, idx):
        cand = idx[:, None] + self.p - np.arange(self.k)[None, :] * self.d
        return np.unique(cand[cand % self.s == 0] // self.s)

    def compose(self, r, j, start):
        widths = [len([i for i in range(-self.k * self.d - 2, self.k * self.d + 2) if self._hits(i, o, o)])
                  for o in range(self.s)]
        first0 = self.back(0, 0)[0] if self.back(0, 0) else 0
        return r + (max(widths) - 1) * j, j / self.s, start + first0 * j


class Div(Rule):
    """Pixel shuffle: output u comes from input ``u // r``."""

    def __init__(self, r: int) -> None:
        self.r, self.stride = int(r), 1 / int(r)

    def back(self, lo, hi):
        return lo // self.r, hi // self.r


class Span(Rule):
    """Irregular windows (adaptive pooling, interpolation, rf_input_span): exact spans on the
    valid output range; an approximate window for the size/jump/start composition."""

    def __init__(self, fn: Callable[[int, int], tuple[int, int]], n_out: int,
                 k: float, s: float, p: float, d: int = 1) -> None:
        self.fn, self.n_out = fn, n_out
        self.kernel, self.stride, self.padding, self.dilation = max(1, int(math.ceil(k))), s, p, int(d)

    def back(self, lo, hi):
        lo, hi = max(lo, 0), min(hi, self.n_out - 1)
        if lo > hi:
            return None
        ab = self.fn(lo, hi)
        if ab is None or ab[0] > ab[1]:
            return None
        return int(ab[0]), int(ab[1])


def matrix_span(dep: torch.Tensor) -> Span:
    """A :class:`Span` from a boolean dependency matrix ``dep[out, in]``."""
    n_out, n_in = dep.shape
    idx = torch.arange(n_in)
    firsts = [int(idx[row].min()) if row.any() else 0 for row in dep]
    lasts = [int(idx[row].max()) if row.any() else -1 for row in dep]
    width = max(b - a + 1 for a, b in zip(firsts, lasts))

    def fn(lo, hi):
        return min(firsts[lo:hi + 1]), max(lasts[lo:hi + 1])

    return Span(fn, n_out, width, n_in / n_out, -firsts[0])


class Glob(Rule):
    """Every output index sees the whole axis (global pooling, a reduction, a norm over space)."""

    def __init__(self, n_in: int) -> None:
        self.n_in = int(n_in)
        self.is_global = self.n_in > 1
        self.kernel = self.n_in

    def back(self, lo, hi):
        return 0, self.n_in - 1

    def compose(self, r, j, start):
        return r + (self.n_in - 1) * j, j * self.n_in, start


class Fixed(Rule):
    """An axis indexed by one integer (``x[..., i]``): only index ``i`` is read."""

    def __init__(self, i: int) -> None:
        self.i = int(i)
        self.padding = -self.i

    def back(self, lo, hi):
        return self.i, self.i


class Bcast(Rule):
    """A size-1 dimension broadcast along an axis: every output index reads index 0."""

    def back(self, lo, hi):
        return 0, 0

    def compose(self, r, j, start):
        return r, j, start


# --------------------------------------------------------------------------------------------
# graph


@dataclass
class Op:
    """One tensor-valued node. ``rules[i]`` maps each spatial axis of input ``i`` to a Rule;
    ``local_rules`` is the variant with global statistics held constant (``None`` entries cut
    that input)."""

    name: str
    type: str
    inputs: list[int]
    shape: tuple[int, ...]
    labels: tuple
    rules: list[dict[int, Rule]] = field(default_factory=list)
    local_rules: list[dict[int, Rule] | None] | None = None
    unknown: bool = False
    batch_coupled: bool = False
    is_module: bool = False
    note: str = ""
    #: the hooks fallback could not follow the data here: no field may be reported through it
    opaque: bool = False

    @property
    def axes(self) -> dict[int, int]:
        """spatial axis -> dimension."""
        return {lab: d for d, lab in enumerate(self.labels) if isinstance(lab, int) and not isinstance(lab, bool)}


def is_axis(lab) -> bool:
    return isinstance(lab, int) and not isinstance(lab, bool)


def as_tuple(v, n: int) -> tuple:
    """``v`` (a scalar or a sequence) as an ``n``-tuple."""
    if isinstance(v, (list, tuple)):
        v = tuple(v)
        return v if len(v) == n else (v[0],) * n
    return (v,) * n


def _rules_on_last(in_labels, in_shape, nd: int, per_dim: list[Rule], mix_dim: int | None = None) -> dict:
    """Rules for an op acting on the last ``nd`` dims (conv, pooling); ``mix_dim`` is mixed."""
    rules = {}
    for d, lab in enumerate(in_labels):
        if not is_axis(lab):
            continue
        t = d - (len(in_labels) - nd)
        if t >= 0:
            rules[lab] = per_dim[t]
        elif mix_dim is not None and d == mix_dim % len(in_labels):
            rules[lab] = Glob(in_shape[d])
        else:
            rules[lab] = IDENTITY
    return rules


def reshape_labels(in_labels, in_shape, out_shape) -> tuple[tuple, dict[int, Rule], bool]:
    """Labels after a view/reshape/flatten/squeeze: a dimension keeps its label when it is the
    only non-unit dimension of its factor group on both sides; spatial axes merged with other
    dimensions become global (``Glob``). Returns (labels, rules, batch_coupled)."""
    out_labels: list = [None] * len(out_shape)
    rules: dict[int, Rule] = {lab: IDENTITY for lab in in_labels if is_axis(lab)}
    coupled = False
    big_i = [d for d, n in enumerate(in_shape) if n != 1]
    big_o = [d for d, n in enumerate(out_shape) if n != 1]
    i = o = 0
    while i < len(big_i) or o < len(big_o):
        gi, go, pi, po = [], [], 1, 1
        while True:
            if (pi <= po and i < len(big_i)) or o >= len(big_o):
                if i >= len(big_i):
                    break
                gi.append(big_i[i]); pi *= in_shape[big_i[i]]; i += 1
            else:
                go.append(big_o[o]); po *= out_shape[big_o[o]]; o += 1
            if pi == po:
                break
        if len(gi) == 1 and len(go) == 1:
            out_labels[go[0]] = in_labels[gi[0]]
            continue
        for d in gi:
            if is_axis(in_labels[d]):
                rules[in_labels[d]] = Glob(in_shape[d])
            elif in_labels[d] == "B":
                coupled = True
    unit_i = [d for d, n in enumerate(in_shape) if n == 1]
    unit_o = [d for d, n in enumerate(out_shape) if n == 1]
    for d_in, d_out in zip(unit_i, unit_o):
        out_labels[d_out] = in_labels[d_in]
    for d_in in unit_i[len(unit_o):]:
        if is_axis(in_labels[d_in]):
            rules[in_labels[d_in]] = Glob(1)
    return tuple(out_labels), rules, coupled


# --------------------------------------------------------------------------------------------
# module rules

_POINTWISE_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink,
    nn.Softshrink, nn.RReLU, nn.GLU,
    nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.ChannelShuffle,
    nn.Softmax2d,
)
_PAD_MODULES = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                nn.modules.padding._ReplicationPadNd, nn.modules.padding.CircularPad1d,
                nn.modules.padding.CircularPad2d, nn.modules.padding.CircularPad3d,
                nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)

_INTERP_MODES_1D = {"nearest": "nearest", "nearest-exact": "nearest-exact", "linear": "linear",
                    "bilinear": "linear", "trilinear": "linear", "bicubic": "bicubic", "area": "area"}


def conv_padding(m_padding, kernel, dilation, nd: int) -> tuple:
    """Leading padding per axis; ``"same"`` pads ``d (k - 1) // 2`` before (torch puts the odd one after)."""
    if m_padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    if m_padding == "valid":
        return (0,) * nd
    return as_tuple(m_padding, nd)


def interp_span(n_in: int, n_out: int, mode: str, align_corners, scale) -> Span:
    """Exact dependency of 1-D interpolation, measured on a one-hot probe (``C = n_in``)."""
    mode1 = _INTERP_MODES_1D.get(mode, mode)
    eye = torch.eye(n_in, dtype=torch.float64)
    kw: dict[str, Any] = {"mode": mode1}
    if mode1 in ("linear", "bicubic"):
        kw["align_corners"] = align_corners
    if mode1 == "bicubic":
        probe = eye[None, :, :, None].expand(1, n_in, n_in, 1)
        sf = (scale, 1.0) if scale is not None else None
        out = F.interpolate(probe, size=None if sf else (n_out, 1), scale_factor=sf, **kw)[0, :, :, 0]
    else:
        out = F.interpolate(eye[None], size=None if scale is not None else n_out,
                            scale_factor=scale, **kw)[0]
    return matrix_span((out != 0).T)


def adaptive_span(n_in: int, n_out: int) -> Rule:
    """Adaptive pooling windows ``floor(i n / o) .. ceil((i + 1) n / o) - 1``; global when o = 1."""
    if n_out == 1:
        return Glob(n_in)
    first = [(i * n_in) // n_out for i in range(n_out)]
    last = [-((-(i + 1) * n_in) // n_out) - 1 for i in range(n_out)]

    def fn(lo, hi):
        return first[lo], last[hi]

    return Span(fn, n_out, max(b - a + 1 for a, b in zip(first, last)), n_in / n_out, 0)


def module_op(m: nn.Module, name: str, in_labels, in_shape, out_shape) -> Op | None:
    """The op of a leaf module, or ``None`` when its type is unknown."""
    nd_in = len(in_shape)
    op = Op(name, type(m).__name__, [], tuple(out_shape), tuple(in_labels), is_module=True)
    same = tuple(in_shape) == tuple(out_shape)

    if hasattr(m, "rf_rule"):
        rule = m.rf_rule()
        nd = rule.ndim
        if len(out_shape) != nd_in:
            lab_out, _, _ = reshape_labels(in_labels, in_shape, out_shape)
            op.labels = tuple(l if not is_axis(l) else None for l in lab_out)
        if rule.is_global:
            op.rules = [{lab: Glob(in_shape[d]) for d, lab in enumerate(in_labels) if is_axis(lab)}]
            if rule.local is not None:
                op.local_rules = [_rules_on_last(in_labels, in_shape, nd, [
                    Win(rule.local.kernel[t], rule.local.stride[t], rule.local.padding[t], rule.local.dilation[t])
                    for t in range(nd)])]
            else:
                op.local_rules = [None]
            op.note = rule.note
            return op
        per = []
        for t in range(nd):
            k, s, p, d = rule.kernel[t], rule.stride[t], rule.padding[t], rule.dilation[t]
            if hasattr(m, "rf_input_span"):
                n_i, n_o = in_shape[nd_in - nd + t], out_shape[len(out_shape) - nd + t]
                fn = (lambda t_, n_i_, n_o_: lambda lo, hi: m.rf_input_span(t_, lo, hi, n_i_, n_o_))(t, n_i, n_o)
                per.append(Span(fn, n_o, d * (k - 1) + 1, s, p))
            else:
                per.append(Win(k, s, p, d))
        op.rules = [_rules_on_last(in_labels, in_shape, nd, per)]
        op.note = rule.note
        return op

    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        nd = len(m.kernel_size)
        per = [TConv(m.kernel_size[t], m.stride[t], m.padding[t], m.dilation[t]) for t in range(nd)]
        op.rules = [_rules_on_last(in_labels, in_shape, nd, per, mix_dim=-nd - 1)]
        return op
    if isinstance(m, nn.modules.conv._ConvNd):
        nd = len(m.kernel_size)
        pad = conv_padding(m.padding, m.kernel_size, m.dilation, nd)
        per = [Win(m.kernel_size[t], m.stride[t], pad[t], m.dilation[t]) for t in range(nd)]
        op.rules = [_rules_on_last(in_labels, in_shape, nd, per, mix_dim=-nd - 1)]
        op.note = "" if m.padding_mode == "zeros" else f"padding_mode={m.padding_mode}"
        return op
    if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd)):
        nd = int(type(m).__name__[-2])
        k = as_tuple(m.kernel_size, nd)
        s = as_tuple(m.stride if m.stride is not None else m.kernel_size, nd)
        p = as_tuple(getattr(m, "padding", 0), nd)
        d = as_tuple(getattr(m, "dilation", 1), nd)
        op.rules = [_rules_on_last(in_labels, in_shape, nd, [Win(k[t], s[t], p[t], d[t]) for t in range(nd)])]
        return op
    if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        nd = int(type(m).__name__[-2])
        per = [adaptive_span(in_shape[nd_in - nd + t], out_shape[len(out_shape) - nd + t]) for t in range(nd)]
        op.rules = [_rules_on_last(in_labels, in_shape, nd, per)]
        op.local_rules = [None] if any(r.is_global for r in per) else None
        return op
    if isinstance(m, (nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)):
        nd = 2 if isinstance(m, nn.FractionalMaxPool2d) else 3
        k = as_tuple(m.kernel_size, nd)
        per = [fractional_span(in_shape[nd_in - nd + t], out_shape[len(out_shape) - nd + t], k[t]) for t in range(nd)]
        op.rules = [_rules_on_last(in_labels, in_shape, nd, per)]
        op.note = "random windows: hull over all samples"
        return op
    if isinstance(m, nn.Upsample):
        nd = nd_in - 2
        sf = as_tuple(m.scale_factor, nd) if m.scale_factor is not None else (None,) * nd
        per = [interp_span(in_shape[2 + t], out_shape[2 + t], m.mode, m.align_corners,
                           None if sf[t] is None or m.recompute_scale_factor else float(sf[t]))
               for t in range(nd)]
        op.rules = [_rules_on_last(in_labels, in_shape, nd, per)]
        return op
    if isinstance(m, nn.PixelShuffle):
        r = m.upscale_factor
        op.rules = [_rules_on_last(in_labels, in_shape, 2, [Div(r), Div(r)], mix_dim=-3)]
        return op
    if isinstance(m, nn.PixelUnshuffle):
        r = m.downscale_factor
        op.rules = [_rules_on_last(in_labels, in_shape, 2, [Win(r, r), Win(r, r)], mix_dim=-3)]
        return op
    if isinstance(m, _PAD_MODULES):
        nd = len(m.padding) // 2
        per = [Win(1, 1, m.padding[2 * (nd - 1 - t)]) for t in range(nd)]
        op.rules = [_rules_on_last(in_labels, in_shape, nd, per)]
        return op
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        op.labels, rules, op.batch_coupled = reshape_labels(in_labels, in_shape, out_shape)
        op.rules = [rules]
        op.local_rules = [None] if any(r.is_global for r in rules.values()) else None
        return op
    if isinstance(m, (nn.Linear, nn.Bilinear, nn.LazyLinear)) or isinstance(m, (nn.Softmax, nn.Softmin, nn.LogSoftmax)):
        dim = -1 if isinstance(m, (nn.Linear, nn.Bilinear, nn.LazyLinear)) else (m.dim if m.dim is not None else 1)
        return _mix_dims_op(op, in_labels, in_shape, [dim], out_shape)
    if isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        if m.track_running_stats and not m.training:
            op.rules = [{lab: IDENTITY for lab in in_labels if is_axis(lab)}]
            return op
        return _norm_over(op, in_labels, in_shape, range(2, nd_in), "statistics over space")
    if isinstance(m, nn.GroupNorm):
        return _norm_over(op, in_labels, in_shape, range(1, nd_in), "statistics over space")
    if isinstance(m, nn.LayerNorm):
        return _norm_over(op, in_labels, in_shape, range(nd_in - len(m.normalized_shape), nd_in), "")
    if isinstance(m, _POINTWISE_MODULES) and same:
        op.rules = [{lab: IDENTITY for lab in in_labels if is_axis(lab)}]
        return op
    return None


def fractional_span(n_in: int, n_out: int, k: int) -> Span:
    """torch's fractional max pooling: hull of the windows over samples u in [0, 1)."""
    if n_out <= 1:
        return Span(lambda lo, hi: (0, n_in - 1), n_out, n_in, n_in, 0)
    alpha = (n_in - k) / (n_out - 1)
    us = [i / 256 for i in range(256)]

    def start(i, u):
        return n_in - k if i == n_out - 1 else int((i + u) * alpha) - int(u * alpha)

    def fn(lo, hi):
        return min(start(lo, u) for u in us), max(start(hi, u) for u in us) + k - 1

    return Span(fn, n_out, k, alpha, 0)


def _norm_over(op: Op, in_labels, in_shape, dims, note: str) -> Op:
    dims = {d % len(in_shape) for d in dims}
    rules, local = {}, {}
    for d, lab in enumerate(in_labels):
        if is_axis(lab):
            rules[lab] = Glob(in_shape[d]) if d in dims else IDENTITY
            local[lab] = IDENTITY
    op.rules = [rules]
    if any(r.is_global for r in rules.values()):
        op.local_rules = [local]
        op.note = note or "normalised over space"
    return op


def _mix_dims_op(op: Op, in_labels, in_shape, dims, out_shape) -> Op:
    """An op that mixes the given dims (linear over the last dim, softmax, reductions)."""
    dims = {d % len(in_shape) for d in dims}
    rules = {}
    for d, lab in enumerate(in_labels):
        if is_axis(lab):
            rules[lab] = Glob(in_shape[d]) if d in dims else IDENTITY
    if len(out_shape) == len(in_shape):
        op.labels = tuple(None if d in dims and is_axis(lab) and out_shape[d] != in_shape[d] else lab
                          for d, lab in enumerate(in_labels))
    else:
        op.labels = tuple(lab for d, lab in enumerate(in_labels) if d not in dims)
        if len(op.labels) != len(out_shape):
            op.labels = (None,) * len(out_shape)
    for d in dims:
        if in_labels[d] == "B" and in_shape[d] > 1:
            op.batch_coupled = True
    op.rules = [rules]
    if any(r.is_global for r in rules.values()):
        op.local_rules = [None]
    return op


# --------------------------------------------------------------------------------------------
# functions and methods of an fx graph

_POINTWISE = {
    "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "elu", "selu", "celu", "mish", "softplus", "softsign", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "add", "sub", "mul", "div",
    "truediv", "floordiv", "mod", "neg", "pos", "pow", "abs", "exp", "log", "log1p", "expm1", "sqrt",
    "rsqrt", "clamp", "clamp_min", "clamp_max", "clip", "square", "sin", "cos", "erf", "where",
    "maximum", "minimum", "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type",
    "type_as", "detach", "batch_norm", "iadd", "isub", "imul", "itruediv", "rsub", "sign",
    "reciprocal", "lt", "gt", "le", "ge", "eq", "ne", "masked_fill", "nan_to_num", "threshold",
    "logsigmoid", "hardshrink", "softshrink", "tanhshrink", "rrelu", "prelu", "expand", "expand_as",
    "broadcast_to", "add_", "addcmul", "addcdiv", "lerp", "channel_shuffle", "native_channel_shuffle",
    "local_response_norm", "requires_grad_", "cpu", "cuda", "stochastic_depth", "drop_path",
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "norm", "logsumexp",
           "median", "nanmean", "nansum", "all", "any", "argmax", "argmin", "count_nonzero", "std_mean",
           "var_mean", "nanmedian"}
_RESHAPE = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"}
_SPLIT = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}


def _fname(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    name = name.strip("_") if name.startswith("__") else name.lstrip("_")
    if name.endswith("_") and name not in ("add_",):
        name = name[:-1]
    if name.startswith("max_pool") and name.endswith("_with_indices"):
        name = name[: -len("_with_indices")]
    return name


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


@dataclass
class Graph:
    """Ops in topological order (op 0 is the input), the module paths' output ops, and how the
    graph was obtained."""

    ops: list[Op]
    output: int | None
    module_outputs: dict[str, int]
    method: str
    warnings: list[str] = field(default_factory=list)
    #: why torch.fx could not trace the model (hooks fallback)
    reason: str = ""


class _Tracer(fx.Tracer):
    """fx tracer keeping modules that define ``rf_rule`` (and torch.nn layers) as leaves and
    recording the output node of every module call."""

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: dict[str, fx.Node] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "rf_rule") or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_outputs[self.path_of_module(m)] = out.node
        return out


def _meta_shape(node) -> Any:
    return node.meta.get("erf_shape") if isinstance(node, fx.Node) else None


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores each node's output shape (a list for tuples of tensors)."""

    def run_node(self, n: fx.Node) -> Any:
        res = super().run_node(n)
        if isinstance(res, torch.Tensor):
            n.meta["erf_shape"] = tuple(res.shape)
        elif isinstance(res, (tuple, list)) and res and all(isinstance(t, torch.Tensor) for t in res):
            n.meta["erf_shape"] = [tuple(t.shape) for t in res]
        else:
            n.meta.pop("erf_shape", None)
        return res


def propagate_shapes(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Shapes of every node: with fake tensors (no compute) when the graph allows it, else one
    real forward pass without gradients."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            _ShapeRecorder(gm).run(mode.from_tensor(x))
        return
    except Exception:
        pass
    with torch.no_grad():
        _ShapeRecorder(gm).run(x)


def build_fx(model: nn.Module, x: torch.Tensor) -> Graph:
    """Trace ``model`` with torch.fx (leaves: modules with ``rf_rule`` and torch.nn layers) and
    propagate shapes with one forward pass on ``x``."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    propagate_shapes(gm, x)
    modules = dict(gm.named_modules())
    ops: list[Op] = []
    index: dict[fx.Node, int] = {}
    tuples: dict[fx.Node, tuple[fx.Node, list]] = {}
    out_index = None
    notes: list[str] = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    def live(a) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg(a, lambda n: found.append(n) if n in index else None)
        return found

    for node in graph.nodes:
        if node.op == "placeholder":
            if node is placeholders[0]:
                shape = _meta_shape(node)
                labels = ("B", None) + tuple(range(len(shape) - 2))
                ops.append(Op("input", "Input", [], shape, labels))
                index[node] = 0
            continue
        if node.op == "output":
            res = node.args[0]
            out_index = index.get(res) if isinstance(res, fx.Node) else None
            continue
        shape = _meta_shape(node)
        ins = live((node.args, node.kwargs))
        if not ins:
            continue
        if isinstance(shape, list):
            tuples[node] = (node, shape)
            continue
        if shape is None:
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in tuples:
            op = _split_item(node, tuples[node.args[0]][0], shape, ops, index)
        elif node.op == "call_module":
            src = ins[0]
            m = modules[node.target]
            in_op = ops[index[src]]
            op = module_op(m, node.target, in_op.labels, in_op.shape, shape)
            if op is None:
                op = _unknown(node.target, type(m).__name__, [in_op], shape)
            op.inputs = [index[src]]
        else:
            op = _function_op(node, shape, ins, ops, index)
        ops.append(op)
        index[node] = len(ops) - 1
    module_outputs = {p: index[n] for p, n in tracer.module_outputs.items() if n in index}
    return Graph(ops, out_index, module_outputs, "fx", notes)


def _unknown(name: str, type_: str, in_ops: list[Op], shape, inputs: list[int] | None = None) -> Op:
    """An op of unknown type: pointwise if it keeps the shape of its first input, else global."""
    first = in_ops[0]
    if tuple(first.shape) == tuple(shape):
        op = Op(name, type_, list(inputs or []), tuple(shape), first.labels, unknown=True,
                note="unknown: assumed pointwise")
        op.rules = [{lab: IDENTITY for lab in o.labels if is_axis(lab)} for o in in_ops]
        return op
    op = Op(name, type_, list(inputs or []), tuple(shape), ("B",) + (None,) * (len(shape) - 1) if first.labels[:1] == ("B",)
            and shape and shape[0] == first.shape[0] else (None,) * len(shape), unknown=True,
            note="unknown: assumed global")
    op.rules = [{lab: Glob(o.shape[d]) for d, lab in enumerate(o.labels) if is_axis(lab)} for o in in_ops]
    op.local_rules = [None] * len(in_ops)
    return op


def _split_item(node: fx.Node, tup: fx.Node, shape, ops: list[Op], index) -> Op:
    """``getitem`` on the tuple of a split/chunk/unbind (offsets along the split dim) or of a
    reduction returning (values, indices)."""
    name = _fname(tup)
    src = tup.args[0] if tup.args and isinstance(tup.args[0], fx.Node) else None
    k = node.args[1]
    if src is None or src not in index:
        live_in = [n for n in tup.all_input_nodes if n in index]
        return _unknown(tup.name, name, [ops[index[n]] for n in live_in], shape, [index[n] for n in live_in])
    in_op = ops[index[src]]
    if name in _SPLIT:
        dim = _arg(tup, 2 if name != "unbind" else 1, "dim", 0) % len(in_op.shape)
        shapes = _meta_shape(tup)
        op = Op(tup.name + f"[{k}]", name, [index[src]], tuple(shape), in_op.labels)
        rules = {lab: IDENTITY for lab in in_op.labels if is_axis(lab)}
        lab = in_op.labels[dim]
        if name == "unbind":
            op.labels = tuple(l for d, l in enumerate(in_op.labels) if d != dim)
            if is_axis(lab):
                rules[lab] = Fixed(k)
        elif is_axis(lab):
            off = sum(s[dim] for s in shapes[:k])
            rules[lab] = Win(1, 1, -off)
        op.rules = [rules]
        return op
    if name in _REDUCE or name in ("sort", "topk", "kthvalue", "mode", "cummax", "cummin"):
        dim = _arg(tup, 1, "dim", None)
        if name == "topk":
            dim = _arg(tup, 2, "dim", -1)
        dims = range(len(in_op.shape)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        op = Op(tup.name + f"[{k}]", name, [index[src]], tuple(shape), in_op.labels)
        return _mix_dims_op(op, in_op.labels, in_op.shape, dims, shape)
    return _unknown(tup.name + f"[{k}]", name, [in_op], shape, [index[src]])


def _function_op(node: fx.Node, shape, ins: list[fx.Node], ops: list[Op], index) -> Op:
    name = _fname(node)
    in_ops = [ops[index[n]] for n in ins]
    x = in_ops[0]
    op = Op(node.name, name, [index[n] for n in ins], tuple(shape), x.labels)
    nd_in = len(x.shape)

    def weight_shape(i, kw):
        w = _arg(node, i, kw)
        return _meta_shape(w) if isinstance(w, fx.Node) else None

    if name == "getitem":
        return _index_op(op, node.args[1], x, shape)
    if name in ("cat", "concat", "concatenate", "stack"):
        tensors = node.args[0]
        dim = _arg(node, 1, "dim", 0)
        if name == "stack":
            dim = dim % (nd_in + 1)
            op.labels = x.labels[:dim] + (None,) + x.labels[dim:]
            op.rules = [{lab: IDENTITY for lab in o.labels if is_axis(lab)} for o in in_ops]
            return op
        dim %= nd_in
        off, rules_all = 0, []
        for t in tensors:
            if t in index:
                o = ops[index[t]]
                rules = {lab: IDENTITY for lab in o.labels if is_axis(lab)}
                lab = o.labels[dim]
                if is_axis(lab):
                    n_p, off_p = o.shape[dim], off
                    rules[lab] = Span((lambda a, n: lambda lo, hi: (max(lo - a, 0), min(hi - a, n - 1)))(off_p, n_p),
                                      shape[dim], 1, 1, -off_p)
                rules_all.append(rules)
            tshape = _meta_shape(t) if isinstance(t, fx.Node) else None
            off += tshape[dim] if tshape else 0
        op.rules = rules_all
        return op
    if name in ("max", "min") and len(ins) >= 2 or name in _POINTWISE or name in ("where",):
        return _elementwise(op, in_ops, shape)
    if name in _REDUCE:
        dim = _arg(node, 1, "dim", None)
        if isinstance(dim, fx.Node):
            dim = None
        dims = range(nd_in) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        return _mix_dims_op(op, x.labels, x.shape, dims, shape)
    if name in ("softmax", "log_softmax", "softmin"):
        return _mix_dims_op(op, x.labels, x.shape, [_arg(node, 1, "dim", -1)], shape)
    if name in _RESHAPE:
        op.labels, rules, op.batch_coupled = reshape_labels(x.labels, x.shape, shape)
        op.rules = [rules]
        op.local_rules = [None] if any(r.is_global for r in rules.values()) else None
        return op
    if name in ("permute", "transpose", "swapaxes", "movedim", "t"):
        perm = _permutation(node, name, nd_in)
        op.labels = tuple(x.labels[p] for p in perm)
        op.rules = [{lab: IDENTITY for lab in x.labels if is_axis(lab)}]
        return op
    if name == "linear":
        op.inputs = op.inputs[:1]
        return _mix_dims_op(op, x.labels, x.shape, [-1], shape)
    if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        op.inputs = op.inputs[:1]
        nd = int(name[-2])
        ws = weight_shape(1, "weight")
        k = ws[2:] if ws else (1,) * nd
        if name.startswith("conv_transpose"):
            s, p = as_tuple(_arg(node, 3, "stride", 1), nd), as_tuple(_arg(node, 4, "padding", 0), nd)
            d = as_tuple(_arg(node, 7, "dilation", 1), nd)
            per = [TConv(k[t], s[t], p[t], d[t]) for t in range(nd)]
        else:
            s, d = as_tuple(_arg(node, 3, "stride", 1), nd), as_tuple(_arg(node, 5, "dilation", 1), nd)
            p = conv_padding(_arg(node, 4, "padding", 0), k, d, nd)
            per = [Win(k[t], s[t], p[t], d[t]) for t in range(nd)]
        op.rules = [_rules_on_last(x.labels, x.shape, nd, per, mix_dim=-nd - 1)]
        return op
    if name.startswith(("max_pool", "avg_pool", "lp_pool")) and name[-2:] in ("1d", "2d", "3d"):
        op.inputs = op.inputs[:1]
        nd = int(name[-2])
        base = 1 if not name.startswith("lp_pool") else 2
        k = as_tuple(_arg(node, base, "kernel_size"), nd)
        s = _arg(node, base + 1, "stride", None)
        s = as_tuple(s if s not in (None, [], ()) else k, nd)
        p = as_tuple(_arg(node, 3, "padding", 0), nd) if base == 1 else (0,) * nd
        d = as_tuple(_arg(node, 4, "dilation", 1), nd) if name.startswith("max_pool") else (1,) * nd
        op.rules = [_rules_on_last(x.labels, x.shape, nd, [Win(k[t], s[t], p[t], d[t]) for t in range(nd)])]
        return op
    if name.startswith(("adaptive_avg_pool", "adaptive_max_pool")):
        op.inputs = op.inputs[:1]
        nd = int(name[-2])
        per = [adaptive_span(x.shape[nd_in - nd + t], shape[len(shape) - nd + t]) for t in range(nd)]
        op.rules = [_rules_on_last(x.labels, x.shape, nd, per)]
        op.local_rules = [None] if any(r.is_global for r in per) else None
        return op
    if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
        op.inputs = op.inputs[:1]
        nd = nd_in - 2
        mode = _arg(node, 3, "mode", "nearest") if name in ("interpolate", "upsample") else (
            "nearest" if name == "upsample_nearest" else "bilinear")
        ac = _arg(node, 4, "align_corners", None) if name != "upsample_bilinear" else True
        sf = _arg(node, 2, "scale_factor", None)
        rsf = _arg(node, 5, "recompute_scale_factor", None)
        sf = as_tuple(sf, nd) if sf is not None and not rsf else (None,) * nd
        per = [interp_span(x.shape[2 + t], shape[2 + t], mode, ac, None if sf[t] is None else float(sf[t]))
               for t in range(nd)]
        op.rules = [_rules_on_last(x.labels, x.shape, nd, per)]
        return op
    if name == "pad":
        op.inputs = op.inputs[:1]
        pad = list(_arg(node, 1, "pad"))
        nd = len(pad) // 2
        per = [Win(1, 1, pad[2 * (nd - 1 - t)]) for t in range(nd)]
        op.rules = [_rules_on_last(x.labels, x.shape, nd, per)]
        return op
    if name in ("pixel_shuffle", "pixel_unshuffle"):
        op.inputs = op.inputs[:1]
        r = _arg(node, 1, "upscale_factor" if name == "pixel_shuffle" else "downscale_factor")
        per = [Div(r), Div(r)] if name == "pixel_shuffle" else [Win(r, r), Win(r, r)]
        op.rules = [_rules_on_last(x.labels, x.shape, 2, per, mix_dim=-3)]
        return op
    if name in ("layer_norm", "group_norm", "instance_norm"):
        op.inputs = op.inputs[:1]
        if name == "layer_norm":
            ns = _arg(node, 1, "normalized_shape")
            ns = [ns] if isinstance(ns, int) else list(ns)
            dims = range(nd_in - len(ns), nd_in)
        else:
            dims = range(1 if name == "group_norm" else 2, nd_in)
        return _norm_over(op, x.labels, x.shape, dims, "")
    return _unknown(node.name, name, in_ops, shape, op.inputs)


def _permutation(node: fx.Node, name: str, nd: int) -> list[int]:
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(_arg(node, 1, "dims"), (list, tuple)) \
            else _arg(node, 1, "dims")
        return [int(d) % nd for d in dims]
    perm = list(range(nd))
    if name == "t":
        return perm[::-1]
    if name == "movedim":
        src, dst = _arg(node, 1, "source") % nd, _arg(node, 2, "destination") % nd
        perm.pop(src)
        perm.insert(dst, src)
        return perm
    a, b = _arg(node, 1, "dim0") % nd, _arg(node, 2, "dim1") % nd
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _elementwise(op: Op, in_ops: list[Op], shape) -> Op:
    """Elementwise op with broadcasting: size-1 dims read index 0 along the output's axis."""
    nd = len(shape)
    labels: list = [None] * nd
    for o in in_ops:
        off = nd - len(o.shape)
        for d, lab in enumerate(o.labels):
            if off + d >= 0 and o.shape[d] == shape[off + d] and labels[off + d] is None and lab is not None:
                labels[off + d] = lab
    op.labels = tuple(labels)
    op.rules = []
    for o in in_ops:
        off = nd - len(o.shape)
        rules = {}
        for d, lab in enumerate(o.labels):
            if not is_axis(lab):
                continue
            if o.shape[d] == 1 and shape[off + d] != 1:
                rules[lab] = Bcast()
            elif labels[off + d] == lab:
                rules[lab] = IDENTITY
            else:
                rules[lab] = Glob(o.shape[d])
        op.rules.append(rules)
    return op


def _index_op(op: Op, idx, x: Op, shape) -> Op:
    """Basic tensor indexing: slices shift/stride an axis, integers fix it, None adds a dim."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in idx):
        return _unknown(op.name, "getitem", [x], shape, op.inputs[:1])
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (len(x.shape) - n_real) + idx[e + 1:]
    idx = idx + (slice(None),) * (len(x.shape) - sum(1 for i in idx if i is not None))
    labels, rules, d = [], {lab: IDENTITY for lab in x.labels if is_axis(lab)}, 0
    for i in idx:
        if i is None:
            labels.append(None)
            continue
        lab, n = x.labels[d], x.shape[d]
        if isinstance(i, int):
            if is_axis(lab):
                rules[lab] = Fixed(i % n)
        else:
            start, _, step = i.indices(n)
            labels.append(lab)
            if is_axis(lab) and (start, step) != (0, 1):
                rules[lab] = Win(1, step, -start)
        d += 1
    op.labels = tuple(labels)
    op.rules = [rules]
    op.inputs = op.inputs[:1]
    return op


# --------------------------------------------------------------------------------------------
# hook fallback


#: functions that act elementwise on one tensor (others scalars): a chain link may pass through them
_POINTWISE = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "leaky_relu", "elu", "selu", "celu",
              "mish", "hardswish", "hardsigmoid", "softplus", "softsign", "dropout", "alpha_dropout", "clone",
              "contiguous", "float", "double", "half", "bfloat16", "to", "abs", "neg", "exp", "square", "sqrt",
              "mul", "add", "sub", "div", "true_divide", "rsub", "radd", "rmul", "pow", "clamp", "clip",
              "relu_", "sigmoid_", "tanh_", "mul_", "add_", "sub_", "div_", "clamp_", "hardtanh_", "leaky_relu_",
              "elu_", "silu_", "gelu_"}


def build_hooks(model: nn.Module, x: torch.Tensor, reason: str) -> Graph:
    """Fallback when tracing fails: leaf modules in call order, as a chain (forward hooks).

    The chain is exact only while each leaf reads exactly the tensor the previous leaf wrote,
    unchanged (same object, same version counter: no functional op, branch or in-place change in
    between), starting from the input. From the first leaf where that fails, every op is
    ``opaque``: the analyser then refuses to report a field (it could be smaller than the truth).
    """
    calls: list[list] = []  # [path, module, in shape, out shape, in key, out key]
    keep: list[torch.Tensor] = []  # the tensors stay alive during the probe, so their ids are unique
    module_out: dict[str, tuple] = {}
    skip: set[str] = set()
    for path, m in model.named_modules():
        if hasattr(m, "rf_rule") and path:
            skip.update(p for p, _ in m.named_modules(prefix=path) if p != path)
    handles = []

    def key(t: torch.Tensor) -> tuple[int, int]:
        keep.append(t)
        return id(t), t._version

    def pre(path):
        def fn(m, args):
            if args and isinstance(args[0], torch.Tensor):
                calls.append([path, m, tuple(args[0].shape), None, key(args[0]), None])
        return fn

    def post(path, leaf):
        def fn(m, args, out):
            if isinstance(out, torch.Tensor):
                module_out[path] = (key(out), tuple(out.shape))
            if leaf and calls and calls[-1][0] == path and calls[-1][3] is None:
                if isinstance(out, torch.Tensor):
                    calls[-1][3], calls[-1][5] = tuple(out.shape), key(out)
                else:
                    calls.pop()
        return fn

    steps: dict[tuple, tuple] = {}  # pointwise one-tensor ops outside the leaves: input key -> output key
    depth = [0]

    class _Pointwise(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            before = (id(tensors[0]), tensors[0]._version) if len(tensors) == 1 else None
            out = func(*args, **kwargs)
            name = getattr(func, "__name__", "").strip("_")
            if depth[0] == 0 and before is not None and isinstance(out, torch.Tensor) and \
                    name in _POINTWISE and tuple(out.shape) == tuple(tensors[0].shape):
                keep.extend((tensors[0], out))
                steps[before] = (id(out), out._version)
            return out

    def enter(m, args):
        depth[0] += 1

    def leave(m, args, out):
        depth[0] -= 1

    try:
        for path, m in model.named_modules():
            if path in skip:
                continue
            leaf = bool(path) and (hasattr(m, "rf_rule") or not any(True for _ in m.children()))
            if leaf:
                handles.append(m.register_forward_pre_hook(pre(path)))
                handles.append(m.register_forward_pre_hook(enter))
                handles.append(m.register_forward_hook(leave))
            handles.append(m.register_forward_hook(post(path, leaf)))
        with torch.no_grad(), _Pointwise():
            x_key = key(x)
            result = model(x)
    finally:
        for h in handles:
            h.remove()

    def follow(k: tuple) -> set:
        """``k`` and the keys reached from it through pointwise one-tensor ops (relu, scaling, ...)."""
        seen = {k}
        while k in steps and steps[k] not in seen:
            k = steps[k]
            seen.add(k)
        return seen

    calls = [c for c in calls if c[3] is not None]
    ops = [Op("input", "Input", [], tuple(x.shape), ("B", None) + tuple(range(x.dim() - 2)))]
    outputs: dict[str, int] = {}
    by_key: dict[tuple, int] = {x_key: 0}
    prev_key, broken = x_key, None
    for path, m, s_in, s_out, in_key, out_key in calls:
        prev = ops[-1]
        if broken is None and in_key not in follow(prev_key):
            broken = path
        if tuple(prev.shape) != s_in:
            labels, _, _ = reshape_labels(prev.labels, prev.shape, s_in)
        else:
            labels = prev.labels
        if broken is None:
            op = module_op(m, path, labels, s_in, s_out) or _unknown(path, type(m).__name__, [prev], s_out)
        else:
            op = _unknown(path, type(m).__name__, [prev], s_out)
            op.opaque, op.note = True, "unknown: not a plain chain from here (branch or functional op)"
        op.inputs = [len(ops) - 1]
        ops.append(op)
        by_key[out_key] = len(ops) - 1
        prev_key = out_key

    def resolve(name: str, k: tuple, shape: tuple) -> int:
        if k in by_key:
            return by_key[k]
        for src, i in by_key.items():  # a module's output followed by pointwise ops only
            if k in follow(src):
                return i
        op = _unknown(name, "(functional)", [ops[-1]], shape)
        op.opaque, op.note = True, "unknown: its value is not the output of an analysed module"
        op.inputs = [len(ops) - 1]
        ops.append(op)
        return len(ops) - 1

    for path, (k, shape) in module_out.items():
        if path:
            outputs[path] = resolve(path, k, shape)
    out_index = resolve("output", key(result), tuple(result.shape)) if isinstance(result, torch.Tensor) else None
    if out_index is not None:
        outputs[""] = out_index
    msg = (f"torch.fx could not trace the model ({reason}); analysed the leaf modules as a chain "
           "in call order" + (f", exact up to {broken!r} (from there on not a plain chain: unknown)"
                              if broken else " (a plain chain: exact)"))
    return Graph(ops, out_index, outputs, "hooks", [msg], reason)
