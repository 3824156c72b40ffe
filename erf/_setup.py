"""Stage 2 of a run, setup: the first draw built, the input source, the targets and one probe.

:func:`setup` turns validated :class:`erf._options.Options`, the model (or factory) and the inputs
into a :class:`Setup`: the draw maker and the first draw (on the device, eval/train mode, frozen),
the input source, the process group (``distributed=True``), the targets with their layers resolved
and their units configured from the probe's output shapes, the activation memory per sample, and
the :class:`erf._maps.Mapper` that computes maps. Layouts and default layers of targets belong here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from erf import distributed as _dist
from erf._draws import DrawMaker
from erf._defaults import choose_default, resolve_layers
from erf._degenerate import check_run
from erf._inputs import IterableInputs, make_source
from erf._layout import Hints
from erf._integrity import run_fingerprint
from erf._maps import Mapper, compute_dtype, freeze, prepare
from erf._options import Options
from erf._target import Target
from erf._validate import check_conv_rank, model_accepts

_BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm,)


def model_hash(model: nn.Module) -> str:
    """A short hash of the model's structure (its repr: module types and shapes)."""
    return hashlib.sha256(repr(model).encode()).hexdigest()[:16]


@dataclass
class Setup:
    """What setup found (inputs of the plan and work stages).

    Attributes:
        maker: builds the model of each draw; source: the inputs (``source.n`` per draw, ``None``: unknown).
        inputs_desc: description of the inputs for the config; dist: the process group context or ``None``.
        device: the device the run computes on; model0: the first draw, ready to run.
        paths: layer path per target; targets: the resolved :class:`erf._target.Target` objects.
        per_sample_bytes: memory estimate per sample (activations of the probe); model_hash: structure hash.
        mapper: computes the maps (no plan applied yet).
        values: digests of weights, code, inputs and erf version (:func:`erf._integrity.run_fingerprint`).
        chosen: ``(layer, reason)`` when no layer was given and a classifier's feature map was chosen.
        degenerate: warnings per layer path about degenerate units (:mod:`erf._degenerate`).
    """

    maker: DrawMaker
    source: Any
    inputs_desc: str
    dist: Any
    device: torch.device
    model0: nn.Module
    paths: list[str]
    targets: list[Target]
    per_sample_bytes: int
    model_hash: str
    mapper: Mapper
    values: dict
    chosen: tuple[str, str] | None = None
    degenerate: dict = dataclasses.field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """The model's name for the config: its class, or the factory's name."""
        from erf._options import jsonable

        return type(self.model0).__name__ if not self.maker.is_factory else jsonable(self.maker.model)


def setup(opts: Options, model: Any, inputs: Any) -> Setup:
    """Build the first draw, the input source and the targets; probe one sample (see module docstring).

    Raises:
        ValueError, TypeError: a bad model, inputs, layer, unit or channel, named in the message.
    """
    maker = DrawMaker(model, opts.init, opts.seed, opts.draws, input_shape=opts.input_shape, dtype=opts.dtype)
    source = make_source(inputs, opts.n_inputs, opts.input_shape, opts.seed, opts.draws, opts.preprocess)
    inputs_desc = inputs if isinstance(inputs, str) else source.describe()
    dist = _dist.join(opts.distributed, opts.dist_timeout, opts.device, source=source,
                      until_stderr=opts.until_stderr)  # joins the process group
    device = dist.device if dist is not None else opts.device
    built = maker.build(opts.first_draw)
    values = run_fingerprint(maker, opts.first_draw, source, built)  # what determines the numbers (once per run)
    model0 = prepare(built, device, opts.dtype, opts.train_mode)
    # Module arguments name modules of the caller's model; the run works on copies, so map to paths.
    owner = model0 if maker.is_factory else maker.model
    paths = resolve_layers(owner, model0, list(opts.layers), opts.input_shape)
    hints, chosen = Hints.of(model0), None
    if len(set(paths)) != len(paths):
        raise ValueError(f"layer: the list names a layer twice: {paths}")
    targets = make_targets(opts, model0, paths, hints)
    if opts.train_mode and any(isinstance(m, _BATCH_COUPLED) for m in model0.modules()):
        warnings.warn("train_mode=True with BatchNorm: the samples of a batch are coupled through the "
                      "batch statistics, so each map also depends on the other inputs of its batch",
                      stacklevel=3)
    check_conv_rank(model0, opts.input_shape)
    mapper = Mapper(tuple(paths), tuple(targets), device, opts.dtype, opts.method, opts.reduce, opts.train_mode)
    # Probe: one sample through the network, to learn the output shapes and the memory per sample.
    # two samples in train mode: BatchNorm after global pooling refuses one value per channel
    probe_n = 2 if opts.train_mode else 1
    x = torch.zeros((probe_n,) + opts.input_shape, device=device, dtype=compute_dtype(opts.dtype))
    act_bytes = [0]

    def count(_m, _i, out):
        if isinstance(out, torch.Tensor):
            act_bytes[0] += out.numel() * out.element_size()

    leaves = [m for m in model0.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad(), model_accepts(opts.input_shape):
            outs = mapper.forward(model0, x, stop=opts.method == "gradient")
    finally:
        for h in handles:
            h.remove()
    freeze(model0)  # lazy modules have materialised their parameters in the probe
    if opts.layers == (None,) and opts.select is None and opts.grid is None and opts.layout is None:
        chosen = choose_default(model0, opts.input_shape, hints, outs[""])
        if chosen:  # a classifier: its last spatial feature map (erf._defaults)
            paths = [chosen[0]]
            targets = make_targets(opts, model0, paths, hints)
            mapper = dataclasses.replace(mapper, paths=tuple(paths), targets=tuple(targets))
            with torch.no_grad(), model_accepts(opts.input_shape):
                outs = mapper.forward(model0, x, stop=opts.method == "gradient")
    for t in targets:
        out = t.prepare(outs[t.layer])
        t.configure(out, opts.unit, opts.channel)
    in_bytes = int(np.prod(opts.input_shape)) * 4
    degenerate = check_run(model0, targets, opts.input_shape, device, opts.dtype, opts.seed,
                           x=first_inputs(source, opts.first_draw, 3))
    return Setup(maker=maker, source=source, inputs_desc=inputs_desc, dist=dist, device=device, model0=model0,
                 paths=paths, targets=targets, per_sample_bytes=3 * act_bytes[0] // probe_n + 4 * in_bytes,
                 model_hash=model_hash(model0), mapper=mapper, values=values, chosen=chosen, degenerate=degenerate)


def make_targets(opts: Options, model0: nn.Module, paths: list[str], hints: Hints) -> list[Target]:
    """One :class:`erf._target.Target` per layer path (layout planned on the first output it sees)."""
    return [Target(p, opts.select, opts.grid, opts.ndim, unit_relu=opts.unit_relu, layout=opts.layout,
                   hints=hints, input_shape=opts.input_shape, module=model0.get_submodule(p) if p else None)
            for p in paths]


def first_inputs(source: Any, draw: int, n: int) -> torch.Tensor | None:
    """The first ``n`` inputs of ``draw`` when the source has random access (else ``None``)."""
    if isinstance(source, IterableInputs) or not getattr(source, "random_access", True):
        return None
    try:
        return source.get(draw, 0, min(n, source.n))
    except Exception:  # noqa: BLE001 - the check then uses Gaussian inputs
        return None
