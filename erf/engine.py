"""The ERF engine: a unit gradient at one output unit, backpropagated to the input.

Luo, Li, Urtasun, Zemel, "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks", NIPS 2016. https://arxiv.org/abs/1701.04128

For a batch ``x`` of inputs, one forward pass (stopped at the unit's layer) and one
``torch.autograd.grad(unit(x).sum(), x)`` give every sample's input gradient ``g``; each is
reduced to a map (``mean``: sum_c g, ``abs``: sum_c |g|, ``square``: sum_c g^2, ``relu``:
sum_c max(g, 0)) and folded into float64 running moments on the device. Maps are averaged
over inputs and random weight draws; fits, metrics and the TRF are computed lazily.

:func:`effective_rf` runs the five stages in order (README "Architecture"): options
(:mod:`erf._options`), setup (:mod:`erf._setup`), plan (:mod:`erf._plan`), work
(:mod:`erf._work`, or :mod:`erf.distributed` for ranks) and accumulate (:mod:`erf._accumulate`),
then wraps the sums in :class:`erf.result.ERFResult`.
"""
from __future__ import annotations

import os
import platform
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from erf import distributed as _dist
from erf._accumulate import Accumulator
from erf._batch import BatchSize
from erf._draws import describe_init
from erf._integrity import check_run_outcome
from erf._accumulate import Fingerprint
from erf._options import (DEFAULT_DIST_TIMEOUT, METHODS, NONFINITE, REDUCES, check_model, fingerprint,
                          fingerprinted, make_options, run_config)
from erf._plan import describe as describe_plan
from erf._plan import make_plan
from erf._setup import model_hash, setup
from erf._work import RunInterrupted, Worker, run_local
from erf.result import FORMAT_VERSION, ERFResult, atomic_savez, load

__all__ = ["ERFResult", "FORMAT_VERSION", "METHODS", "NONFINITE", "REDUCES", "RunInterrupted", "atomic_savez",
           "effective_rf", "load", "model_hash"]


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
                 dist_timeout: float = DEFAULT_DIST_TIMEOUT,
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
        until_stderr: stop early once the relative (clustered) standard error of the centre region is
            below this; with several draws checked after each draw, once 3 draws are done.
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
    check_model(model)
    opts = make_options(input_shape, layer=layer, select=select, grid=grid, layout=layout, unit=unit, channel=channel,
                        unit_relu=unit_relu, n_inputs=n_inputs, draws=draws, first_draw=first_draw, init=init,
                        reduce=reduce, method=method, batch_size=batch_size, device=device, dtype=dtype, seed=seed,
                        progress=progress, train_mode=train_mode, nonfinite=nonfinite, crop=crop,
                        checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                        until_stderr=until_stderr, vmap_draws=vmap_draws, distributed=distributed,
                        dist_timeout=dist_timeout, fold_bn=fold_bn, preprocess=preprocess)
    st = setup(opts, model, inputs)
    plan = make_plan(opts, st)
    config = run_config(opts, inputs=st.inputs_desc, n_inputs=st.source.n, batch_size=plan.batch_size,
                        device=st.device, model=st.model_name, model_hash=st.model_hash, layers=st.paths,
                        units=[t.unit for t in st.targets], channel=st.targets[0].channels, values=st.values,
                        protocol=protocol, preprocess=getattr(st.source, "options", None))
    key = Fingerprint(fingerprint(config), fingerprinted(config))
    acc = Accumulator(len(st.targets), opts.input_shape[1:], st.device, opts.nonfinite,
                      window=None if plan.crop is None else plan.crop.window, first_draw=opts.first_draw,
                      draws=opts.draws)
    worker = Worker(mapper=plan.apply(st.mapper), source=st.source, maker=st.maker, model0=st.model0,
                    first_draw=opts.first_draw, accumulator=acc, batch=BatchSize(plan.batch_size),
                    train_mode=opts.train_mode, seed=opts.seed)
    t0 = time.perf_counter()
    if st.dist is not None:  # this rank's share of the items, then one reduction (erf.distributed)
        acc = _dist.run_sharded(worker, opts, st.dist, key)
    else:
        acc = run_local(worker, opts, key, stacked=plan.stacked)
    elapsed = time.perf_counter() - t0
    meta = {"versions": {"erf": _erf_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "device_name": torch.cuda.get_device_name(st.device) if st.device.type == "cuda" else platform.processor() or "cpu",
            "seconds": elapsed, "skipped": float(acc.skipped.item())}
    meta.update(describe_plan(plan))
    from erf.protocols import provenance  # inputs, preprocessing, protocol, versions (one dict, key "provenance")

    meta["provenance"] = provenance(st.source, protocol, st.maker.model if not st.maker.is_factory else None)
    if st.dist is not None:
        meta["world_size"] = st.dist.world_size
    from erf.weights import weights_meta  # file + sha256 of loaded weights, None when re-drawn (warns)

    meta["provenance"]["weights"] = weights_meta(st.model0, describe_init(opts.init), opts.draws, st.maker.is_factory)
    if meta["skipped"]:
        warnings.warn(f"{int(meta['skipped'])} samples with non-finite gradients were skipped", stacklevel=2)
    per_draw = acc.clusters()  # per-draw sums on the host: the clustered stderr
    outcome = [c.moments() for c in per_draw]
    for t, (n, mean, _m2) in zip(st.targets, outcome):  # n = 0 refused; all-zero / constant maps warned
        check_run_outcome(n, mean, t.layer or "the output", meta["skipped"])
    analysis_model = st.model0.float() if opts.dtype == torch.float64 else st.model0
    results = {}
    for t, clusters, (n, mean, m2) in zip(st.targets, per_draw, outcome):
        cfg = dict(config, layer=t.layer, unit=list(t.unit))
        t_meta = dict(meta, **t.describe(st.chosen, st.maker.notes + st.degenerate.get(t.layer, [])))
        for msg in t_meta.get("warnings", []):
            warnings.warn(msg, stacklevel=2)
        results[t.layer] = ERFResult(n, mean, m2, unit=t.unit, layer=t.layer, input_shape=opts.input_shape,
                                     config=cfg, meta=t_meta, model=analysis_model.cpu(),
                                     trf=plan.trf_reports.get(t.layer), clusters=clusters)
    if opts.multi:
        return {(arg if isinstance(arg, str) else path): results[path]
                for arg, path in zip(opts.layers, st.paths)}
    return results[st.paths[0]]


def _erf_version() -> str:
    from erf import __version__

    return __version__
