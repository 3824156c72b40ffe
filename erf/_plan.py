"""Stage 3 of a run, plan: the speed paths, each chosen by a function of explicit arguments.

Every path gives the plain path's map (up to float rounding): BatchNorm folding (:mod:`erf._fold`),
channels_last (:func:`erf._batch.use_channels_last`), the cone crop (:mod:`erf._crop`), stacked
draws (:mod:`erf._vmap`) and the batch that fits (:mod:`erf._batch`). :func:`make_plan` asks each in
turn and combines the answers into one :class:`Plan` that the work stage follows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erf import _rng
from erf._batch import choose_batch_size, measure_cuda_bytes, use_channels_last
from erf._crop import CropPlan, plan_crop
from erf._fold import fold_batchnorms, plan_folding
from erf._maps import Mapper, compute_dtype
from erf._options import Options
from erf._setup import Setup
from erf._vmap import blocker, plan_stacking


@dataclass(frozen=True)
class Plan:
    """How the run computes its maps.

    Attributes:
        fold: ``(conv, norm)`` module path pairs folded (eval-mode BatchNorm into the conv before it).
        channels_last: model and inputs in channels_last memory format.
        crop: the cone crop (:class:`erf._crop.CropPlan`) or ``None``.
        stacked: weight draws run stacked with ``torch.func.vmap``.
        batch_size: samples per step (inputs of one draw, or of all stacked draws).
        trf_reports: ``{layer: RFReport}`` computed while planning the crop (reused as results' ``.trf``).
    """

    fold: tuple[tuple[str, str], ...] = ()
    channels_last: bool = False
    crop: CropPlan | None = None
    stacked: bool = False
    batch_size: int = 1
    trf_reports: dict = field(default_factory=dict, compare=False)

    def apply(self, mapper: Mapper) -> Mapper:
        """``mapper`` following this plan (crop, layout, folding of new draws)."""
        return mapper.with_plan(crop=self.crop, channels_last=self.channels_last, fold=self.fold)


def make_plan(opts: Options, st: Setup) -> Plan:
    """Plan the speed paths of a set-up run; folds and re-lays out ``st.model0`` in place as planned.

    The order matters: the crop is checked on the folded first draw, stacking on the cropped maps, and the
    batch size on the memory of the cropped (and stacked) step.
    """
    model0 = st.model0
    fold: list[tuple[str, str]] = []
    if opts.fold_bn and not opts.train_mode:  # eval-mode BatchNorm into the conv before it
        fold = plan_folding(model0, st.paths)
        fold_batchnorms(model0, fold)
    channels_last = use_channels_last(opts.ndim, opts.dtype, opts.method, model0)
    if channels_last:
        model0.to(memory_format=torch.channels_last)
    mapper = st.mapper.with_plan(fold=fold, channels_last=channels_last)
    n = st.source.n if st.source.n is not None else 32
    crop, reports = None, {}
    if opts.crop:
        crop, reports = plan_crop(mapper, model0, opts.input_shape, samples=n * opts.draws,
                                  per_sample_bytes=st.per_sample_bytes, select=opts.select, grid=opts.grid)
    mapper = mapper.with_plan(crop=crop, channels_last=channels_last, fold=fold)
    reason = blocker(train_mode=opts.train_mode, method=opts.method, checkpoint=opts.checkpoint,
                     until_stderr=opts.until_stderr, draws=opts.draws)
    stacked = plan_stacking(opts.vmap_draws, reason, mapper, model0, opts.input_shape)
    measure = None
    if opts.method == "gradient":
        def measure() -> int | None:
            probe = torch.zeros((2,) + tuple(opts.input_shape), dtype=compute_dtype(opts.dtype))
            return measure_cuda_bytes(lambda x: mapper.maps(model0, x), probe, st.device)
    batch_size = choose_batch_size(st.device, opts.batch_size, st.per_sample_bytes,
                                   n * opts.draws if stacked else n, input_shape=opts.input_shape,
                                   crop_fraction=None if crop is None else crop.fraction, measure=measure)
    if opts.train_mode and opts.batch_size is None:
        # Stochastic modules draw one sample of noise per forward, keyed by its block of 32
        # inputs: one block per forward keeps every map independent of the batch size. An
        # explicit batch_size is kept (batches then split blocks, each keyed by its first input).
        batch_size = _rng.BLOCK
    return Plan(fold=tuple(fold), channels_last=channels_last, crop=crop, stacked=stacked,
                batch_size=batch_size, trf_reports=reports)


def describe(plan: Plan) -> dict[str, Any]:
    """The plan as the results' ``meta`` records it."""
    return {"crop": None if plan.crop is None else [[w.start, w.stop] for w in plan.crop.window],
            "vmap_draws": plan.stacked, "folded_batchnorms": len(plan.fold),
            "channels_last": bool(plan.channels_last)}
