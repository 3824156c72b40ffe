"""Stage 4 of a run, work: the (draws, input range) items and the one loop that computes them.

A run's work is a sequence of :class:`Item` s: inputs ``lo .. hi - 1`` of one weight draw, or of a
group of draws stacked with ``torch.func.vmap`` (:mod:`erf._vmap`). :meth:`Worker.run_item` is the
only draw/batch loop of the package: it cuts an item into batches (never straddling a block of 32
inputs in train mode, where stochastic modules draw keyed noise per block), computes each batch's
maps (halving the batch on out-of-memory, :func:`erf._batch.run_split`) and adds them to the
:class:`erf._accumulate.Accumulator`. :func:`run_local` feeds it every item of a single process
(with progress, checkpoints, ``until_stderr`` and Ctrl-C); :func:`erf.distributed.run_sharded`
feeds it this rank's share of the items and reduces the sums.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from erf import _rng, _vmap
from erf._accumulate import Accumulator, Fingerprint, load_checkpoint, save_checkpoint
from erf._batch import BatchSize, run_split
from erf._inputs import GeneratedInputs, TensorInputs
from erf._integrity import check_finite_inputs


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the checkpoint (if any) was saved and ``str(exc)`` says how to resume."""


@dataclass(frozen=True)
class Item:
    """Inputs ``lo .. hi - 1`` (``hi=None``: to the end of the inputs) of one draw or a stacked group.

    ``step`` fixes the inputs per step of a stacked group; ``None`` follows the run's batch size.
    """

    draws: tuple[int, ...]
    lo: int = 0
    hi: int | None = None
    step: int | None = None


def ranges(lo: int, hi: int, size: Callable[[], int], train_mode: bool) -> Iterator[tuple[int, int]]:
    """Batches ``[a, b)`` of ``[lo, hi)`` of ``size()`` inputs (read per batch: it shrinks on out-of-memory);
    in train mode they never straddle a block of :data:`erf._rng.BLOCK` inputs."""
    i = lo
    while i < hi:
        stop = min(i + size(), hi)
        if train_mode:  # stochastic streams are keyed per block: batches never straddle blocks
            stop = min(stop, (i // _rng.BLOCK + 1) * _rng.BLOCK)
        yield i, stop
        i = stop


def batch_ranges(lo: int, hi: int, batch_size: int, train_mode: bool) -> list[tuple[int, int]]:
    """The batches of ``[lo, hi)`` at a fixed ``batch_size`` (:func:`ranges`)."""
    return list(ranges(lo, hi, lambda: batch_size, train_mode))


def local_items(first_draw: int, draws: int, start: tuple[int, int],
                group: Callable[[], tuple[int, int]] | None = None) -> Iterator[Item]:
    """A single process's items from position ``start = (draw, input)``: one per draw, or stacked groups.

    ``group()`` (when draws are stacked) gives ``(draws per group, inputs per step)`` at the time a group
    starts; a last group of one draw runs as a plain item.
    """
    draw, lo = start
    end = first_draw + draws
    while draw < end:
        if group is not None and lo == 0:
            size, step = group()
            members = tuple(range(draw, min(draw + size, end)))
            if len(members) >= 2:
                yield Item(members, step=step)
                draw = members[-1] + 1
                continue
        yield Item((draw,), lo)
        draw, lo = draw + 1, 0


class Worker:
    """Computes items: builds each draw's model, cuts batches, computes and accumulates their maps.

    Args:
        mapper: the planned :class:`erf._maps.Mapper`; source: the inputs; maker: builds draws;
        model0: the first draw (ready); first_draw: its index; accumulator: where maps go;
        batch: the run's :class:`erf._batch.BatchSize`; train_mode, seed: for the keyed noise streams.
    """

    def __init__(self, *, mapper: Any, source: Any, maker: Any, model0: nn.Module, first_draw: int,
                 accumulator: Accumulator, batch: BatchSize, train_mode: bool, seed: int):
        self.mapper, self.source, self.maker, self.model0 = mapper, source, maker, model0
        self.first_draw, self.accumulator, self.batch = first_draw, accumulator, batch
        self.train_mode, self.seed = train_mode, seed
        self._last: tuple[int, nn.Module] = (first_draw, model0)

    def model(self, draw: int) -> nn.Module:
        """The model of ``draw``, ready to run (the last one built is kept)."""
        if draw == self.first_draw:
            return self.model0
        if self._last[0] != draw:
            self._last = (draw, self.mapper.prepare(self.maker.build(draw)))
        return self._last[1]

    def run_item(self, item: Item) -> Iterator[tuple[int, int]]:
        """Compute ``item`` batch by batch, yielding ``(lo, hi)`` after each batch is accumulated."""
        stacked = len(item.draws) > 1
        compute = self._stacked_compute(item) if stacked else self._plain_compute(item.draws[0])
        add = self.accumulator.add_stacked if stacked else self.accumulator.add
        for lo, hi, x in self._batches(item):
            for draws, a, b, maps in compute(x, lo, hi):
                add(maps, draws, a, b)
            yield lo, hi

    # -- the parts of the loop
    def _batches(self, item: Item) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(lo, hi, x)`` per batch; ``x`` is ``(B, C, *S)``, or ``(K, B, C, *S)`` for K stacked draws."""
        src, k = self.source, len(item.draws)
        batch = self.batch
        size = (lambda: item.step) if item.step is not None else (lambda: batch.value)
        if getattr(src, "random_access", False):
            hi = item.hi if item.hi is not None else src.n
            checked = isinstance(src, (GeneratedInputs, TensorInputs))  # finite by construction / checked
            for a, b in ranges(item.lo, hi, size, self.train_mode):
                x = self._fetch(item.draws, a, b)
                yield a, b, x if checked else check_finite_inputs(x, a, b)
            return
        seen = 0
        for xb in src.batches():
            check_finite_inputs(xb, seen, seen + xb.shape[0])
            lo_b = seen
            seen += xb.shape[0]
            for a, b in ranges(max(lo_b, item.lo), seen, size, self.train_mode):
                x = xb[a - lo_b: b - lo_b]
                yield a, b, (x if k == 1 else x.unsqueeze(0).expand((k,) + (-1,) * x.dim()))

    def _fetch(self, draws: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
        if len(draws) == 1:
            return self.source.get(draws[0], lo, hi)
        if isinstance(self.source, GeneratedInputs):  # keyed per draw; other sources give every draw the same
            return torch.stack([self.source.get(d, lo, hi) for d in draws])
        x = self.source.get(draws[0], lo, hi)
        return x.unsqueeze(0).expand((len(draws),) + (-1,) * x.dim())

    def _plain_compute(self, draw: int) -> Callable[..., list]:
        model, device, batch = self.model(draw), self.mapper.device, self.batch

        def compute(x: torch.Tensor, lo: int, hi: int) -> list:
            parts = run_split(lambda a, b: self._maps(model, x[a - lo: b - lo], draw, a, b), lo, hi, device, batch)
            return [(draw, a, b, maps) for a, b, maps in parts]

        return compute

    def _stacked_compute(self, item: Item) -> Callable[..., list]:
        models = [self.model(d) if d == self.first_draw else self.mapper.prepare(self.maker.build(d))
                  for d in item.draws]
        params, buffers = _vmap.stack(models)
        del models

        def compute(x: torch.Tensor, lo: int, hi: int) -> list:
            parts = _vmap.stacked_maps(self.mapper, self.model0, params, buffers, x, lo, hi, self.batch)
            return [(item.draws[sub], a, b, maps) for sub, a, b, maps in parts]

        return compute

    def _maps(self, model: nn.Module, x: torch.Tensor, draw: int, lo: int, hi: int) -> list[torch.Tensor]:
        """The batch's maps; in train mode under torch's RNG keyed by ``(seed, draw, block, lo)`` and erf's
        streams keyed per block (per-sample noise sliced from the block's: :func:`erf._rng.batch_slice`)."""
        if not self.train_mode:
            return self.mapper.maps(model, x)
        block = lo // _rng.BLOCK
        device = self.mapper.device
        devices = [device.index or 0] if device.type == "cuda" else []
        start = block * _rng.BLOCK
        size = _rng.BLOCK if self.source.n is None else min(_rng.BLOCK, self.source.n - start)
        with torch.random.fork_rng(devices=devices):
            key = _rng.key_seed(self.seed, "stochastic", draw, block, lo)
            torch.manual_seed(key)  # torch's own RNG (nn.Dropout): keyed per batch
            # erf's stochastic modules: keyed per block, per-sample noise sliced from the whole block's
            with _rng.use_generator(_rng.generator(self.seed, "stochastic", draw, block, start)), \
                    _rng.batch_slice(lo - start, hi - lo, size):
                return self.mapper.maps(model, x)


def run_local(worker: Worker, opts: Any, fingerprint: Fingerprint, stacked: bool = False) -> Accumulator:
    """Every item of a single process (resuming from the checkpoint if asked); the accumulator.

    ``opts`` (:class:`erf._options.Options`) gives draws, checkpointing, ``until_stderr`` and progress;
    ``stacked`` groups draws for ``torch.func.vmap``.

    Raises:
        RunInterrupted: Ctrl-C with a checkpoint (saved first).
    """
    from tqdm.auto import tqdm

    acc = worker.accumulator
    draw0, start0 = opts.first_draw, 0
    if opts.checkpoint is not None and opts.resume:
        (draw0, start0), saved_batch = load_checkpoint(opts.checkpoint, acc, fingerprint, (draw0, start0),
                                                       draws=opts.draws, n_per_draw=worker.source.n)
        if saved_batch is not None:
            worker.batch.value = saved_batch
    n_per_draw = worker.source.n
    total = None if n_per_draw is None else n_per_draw * opts.draws
    done0 = None if n_per_draw is None else (draw0 - opts.first_draw) * n_per_draw + start0
    bar = tqdm(total=total, initial=done0 or 0, disable=None if opts.progress else True, delay=1.0,
               unit="map", desc="erf", file=sys.stderr, dynamic_ncols=True, leave=False)
    group = None
    if stacked:
        group = lambda: _vmap.group_sizes(n_per_draw, opts.draws, worker.batch.value)  # noqa: E731
    every, until = opts.checkpoint_every, opts.until_stderr
    batches_since_ckpt = 0
    position = (draw0, start0)
    try:
        for item in local_items(opts.first_draw, opts.draws, (draw0, start0), group):
            draw = item.draws[-1]
            for lo, hi in worker.run_item(item):
                position = (draw, hi)
                bar.update(len(item.draws) * (hi - lo))
                batches_since_ckpt += 1
                if opts.checkpoint is not None and batches_since_ckpt >= every:
                    save_checkpoint(opts.checkpoint, acc, position, worker.batch.value, fingerprint)
                    batches_since_ckpt = 0
                if until is not None and opts.draws == 1 and acc.centre_rel_stderr(opts.reduce) < until:
                    break
            position = (draw + 1, 0)
            # clustered error: draws are the units, so at least 3 of them (2 degrees of freedom) first
            if until is not None and opts.draws > 1 and acc.centre_rel_stderr(opts.reduce, min_draws=3) < until:
                break
    except KeyboardInterrupt:
        if opts.checkpoint is not None:
            save_checkpoint(opts.checkpoint, acc, position, worker.batch.value, fingerprint)
            raise RunInterrupted(f"interrupted; progress saved to {opts.checkpoint!r}: run again with "
                                 "resume=True (CLI: --resume) to continue") from None
        raise
    finally:
        bar.close()
    if opts.checkpoint is not None:
        save_checkpoint(opts.checkpoint, acc, position, worker.batch.value, fingerprint)
    return acc
