"""ERF averages scaled out over processes, GPUs and machines with :mod:`torch.distributed`.

The work of a run is a list of items ``(draw, lo, hi)`` (inputs ``lo .. hi - 1`` of one weight
draw), cut the same way on every rank; item ``i`` goes to rank ``i % world_size``. Every random
stream is keyed by ``(seed, draw, block of 32 inputs)`` (:mod:`erf._rng`) and, in train mode,
items and batches start on block boundaries, so each sample's map is the one a single process
computes. Each rank folds its maps into float64 running moments on its device; one
``all_gather`` of every rank's ``(n, mean, M2)`` and Chan's formula in rank order combine them
(Chan, Golub & LeVeque 1979): the result does not depend on the number of ranks (up to float64
rounding). Every rank returns the combined result; only rank 0 writes (checkpoints, CLI outputs).

This module only assigns the items and reduces: each item is computed by the package's one
draw/batch loop, :meth:`erf._work.Worker.run_item`.

Failures: the ranks compare a status flag after every round of items, so a rank that raises
makes every rank raise (:class:`DistributedError` names the rank and its error), and a rank that
dies or stalls makes the next collective fail after at most the process group's timeout.

Checkpoints hold the reduced sums and the position up to which every item is done: rank 0 writes
one file every ``checkpoint_every`` rounds, in the format of a single-process run, so a job can
resume with any number of ranks (or none).
"""
from __future__ import annotations

import atexit
import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from erf._accumulate import Accumulator, Fingerprint, load_checkpoint, save_checkpoint
from erf._options import DEFAULT_DIST_TIMEOUT
from erf._rng import BLOCK
from erf._validate import check_positive_float
from erf._work import Item as WorkItem
from erf._work import RunInterrupted, Worker, batch_ranges

DEFAULT_TIMEOUT = DEFAULT_DIST_TIMEOUT  #: seconds a collective may wait for the other ranks
__all__ = ["DEFAULT_TIMEOUT", "DistContext", "DistributedError", "batch_ranges", "combine", "dist_context",
           "exchange", "from_options", "is_main_process", "item_size", "join", "reduce_sums", "run_sharded",
           "shard", "work_items"]

T = TypeVar("T")
Item = tuple[int, int, int]  # (draw, lo, hi)
_OWNED_GROUP = [False]  # True once this module initialised the default group (then it destroys it at exit)


class DistributedError(RuntimeError):
    """Another rank of a distributed run failed, died, or did not answer within the timeout."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed run.

    Attributes:
        rank, world_size: this process's rank and the number of processes.
        device: the device this rank computes on (``cuda:LOCAL_RANK`` on GPUs).
        comm_device: where tensors of collectives live (the GPU for NCCL, else the CPU).
        timeout: seconds a collective waits.
        group: the process group of one run's collectives (a new group with ``timeout``), or ``None``.
    """

    rank: int
    world_size: int
    device: torch.device
    comm_device: torch.device
    timeout: float
    group: Any = None


def _destroy_group() -> None:
    if _OWNED_GROUP[0] and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP[0] = False


def _pick_device(device: torch.device, local_rank: int) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK``; any other device is kept."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def dist_context(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> DistContext | None:
    """Join (or start) the default process group and pick this rank's device.

    Uses the group when one is initialised; else, when ``RANK`` and ``WORLD_SIZE`` are set (torchrun),
    initialises it from the environment (``env://``) with NCCL for CUDA devices and gloo otherwise,
    and the given timeout. Without either, returns ``None`` (with a warning): a single process.

    Args:
        device: the resolved device of the run; ``cuda`` without an index becomes ``cuda:LOCAL_RANK``.
        timeout: seconds a collective may wait for the other ranks before failing.
    Raises:
        ValueError: torch.distributed is missing, or the environment does not describe a group.
    """
    if not dist.is_available():
        raise ValueError("distributed=True needs torch.distributed, which this PyTorch build lacks")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device, local_rank)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            warnings.warn("distributed=True but no process group is initialised and RANK/WORLD_SIZE are not "
                          "set (launch with torchrun): running as a single process", stacklevel=4)
            return None
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except ValueError as exc:  # env:// rendezvous without MASTER_ADDR / MASTER_PORT
            raise ValueError(f"distributed=True: cannot initialise the process group from the environment "
                             f"({exc}); launch with torchrun") from None
        if not _OWNED_GROUP[0]:
            atexit.register(_destroy_group)
        _OWNED_GROUP[0] = True
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), device, comm, float(timeout))


def from_options(distributed: Any, dist_timeout: Any, device: torch.device, *, source: Any,
                 until_stderr: float | None) -> DistContext | None:
    """Validate the engine's ``distributed`` / ``dist_timeout`` options; the context, or ``None``.

    Raises:
        TypeError, ValueError: a bad option, inputs that are not random access (an iterable of
            batches), or ``until_stderr`` (a global stopping rule the ranks cannot share).
    """
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    timeout = check_positive_float("dist_timeout", dist_timeout)
    return join(distributed, timeout, device, source=source, until_stderr=until_stderr)


def join(distributed: bool, timeout: float, device: torch.device, *, source: Any,
         until_stderr: float | None) -> DistContext | None:
    """The context of a run with validated options (``None`` unless ``distributed``; see :func:`dist_context`).

    Raises:
        ValueError: inputs that are not random access, or ``until_stderr`` with ``distributed``.
    """
    if not distributed:
        return None
    if not getattr(source, "random_access", False):
        raise ValueError("distributed=True needs random-access inputs ('gaussian', 'uniform', 'images:DIR' or a "
                         "Tensor); to scale out over a DataLoader, shard it yourself and merge the results")
    if until_stderr is not None:
        raise ValueError("until_stderr cannot be combined with distributed=True; give n_inputs and draws")
    return dist_context(device, timeout)


def is_main_process() -> bool:
    """True on rank 0 (of the process group, else of torchrun's ``RANK``), or with neither: the one that writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- sharding


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from index ``rank`` (round robin)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def item_size(batch_size: int, remaining: int, world_size: int, train_mode: bool) -> int:
    """Inputs per work item: one batch, shrunk so every rank gets work; whole blocks in train mode.

    In train mode stochastic modules draw from streams keyed per block and batch start, so items
    (and the batches inside them) must start on block boundaries, as a single process's batches do.
    """
    unit = BLOCK if train_mode else 1
    size = math.ceil(batch_size / unit) * unit
    fair = (remaining // max(world_size, 1)) // unit * unit
    return max(unit, min(size, fair)) if fair > 0 else unit


def work_items(first_draw: int, draws: int, n: int, size: int,
               start: tuple[int, int] | None = None) -> list[Item]:
    """Every ``(draw, lo, hi)`` of the run from position ``start = (draw, input)`` on, in order.

    Items end on multiples of ``size`` (and at ``n``), so they are the same on every rank.
    """
    draw0, lo0 = start if start is not None else (first_draw, 0)
    items: list[Item] = []
    for draw in range(draw0, first_draw + draws):
        lo = lo0 if draw == draw0 else 0
        while lo < n:
            hi = min((lo // size + 1) * size, n)
            items.append((draw, lo, hi))
            lo = hi
    return items


# --------------------------------------------------------------------------- collectives


def _lost(ctx: DistContext, what: str, exc: BaseException) -> DistributedError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DistributedError(f"erf distributed: rank {ctx.rank} of {ctx.world_size} lost contact with the other "
                            f"ranks while {what} (a rank died, or did not answer within the timeout of "
                            f"{ctx.timeout:g} s): {type(exc).__name__}: {first}")


def exchange(ctx: DistContext, payload: Any = None, error: BaseException | None = None,
             what: str = "synchronising") -> list[Any]:
    """Every rank's ``payload``, in rank order, once every rank reports success.

    A rank passes the exception it hit as ``error``: it re-raises it once the others know, and
    every other rank raises :class:`DistributedError` naming the failed rank and its error.

    Raises:
        DistributedError: another rank failed, or a rank died or stalled past the timeout.
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(gathered, (message, payload), group=ctx.group)
    except Exception as exc:  # noqa: BLE001 - any backend error means a lost rank
        if error is not None:
            raise error
        raise _lost(ctx, what, exc) from None
    failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
    if error is not None:
        raise error
    if failed:
        r, m = failed[0]
        raise DistributedError(f"erf distributed: rank {r} of {ctx.world_size} failed ({m}); "
                               f"rank {ctx.rank} stops too")
    return [p for _, p in gathered]


def combine(parts: Sequence[T]) -> T:
    """Chan's combination of accumulators (anything with ``merge``), in the given order (the rank order)."""
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


def reduce_sums(ctx: DistContext, acc: Accumulator) -> Accumulator:
    """All ranks' sums combined (float64), on every rank, skipped counts added.

    One ``all_gather`` of every rank's flat float64 vector (:meth:`erf._accumulate.Accumulator.flat`),
    then :func:`combine` in rank order.

    Raises:
        DistributedError: a rank died or stalled past the timeout.
    """
    home = acc.skipped.device
    mine = acc.flat().to(ctx.comm_device)
    bufs = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    try:
        dist.all_gather(bufs, mine, group=ctx.group)
    except Exception as exc:  # noqa: BLE001
        raise _lost(ctx, "combining the running sums", exc) from None
    return combine([acc.from_flat(buf.to(home)) for buf in bufs])


# --------------------------------------------------------------------------- the sharded run


def run_sharded(worker: Worker, opts: Any, ctx: DistContext, fingerprint: Fingerprint) -> Accumulator:
    """This rank's items through the worker's loop, then one reduction; the combined sums (on every rank).

    ``opts`` (:class:`erf._options.Options`) gives draws, checkpointing and progress.
    """
    from tqdm.auto import tqdm

    try:  # a group of its own: the run's timeout holds even in a group the caller made
        group = dist.new_group(timeout=timedelta(seconds=ctx.timeout))
    except Exception as exc:  # noqa: BLE001
        raise _lost(ctx, "creating the run's process group", exc) from None
    ctx = dataclasses.replace(ctx, group=group)
    acc = worker.accumulator
    position, error = (opts.first_draw, 0), None
    if ctx.rank == 0 and opts.checkpoint is not None and opts.resume:
        try:
            position, saved_batch = load_checkpoint(opts.checkpoint, acc, fingerprint, position, draws=opts.draws,
                                                    n_per_draw=worker.source.n)
            if saved_batch is not None:
                worker.batch.value = saved_batch
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
    infos = exchange(ctx, (worker.batch.value, position), error, "starting")
    worker.batch.value = min(bs for bs, _ in infos)  # items must be cut the same way on every rank
    position = tuple(infos[0][1])
    n = worker.source.n
    remaining = (opts.first_draw + opts.draws - position[0]) * n - position[1]
    size = item_size(worker.batch.value, remaining, ctx.world_size, opts.train_mode)
    items = work_items(opts.first_draw, opts.draws, n, size, position)
    rounds = math.ceil(len(items) / ctx.world_size)
    end = (opts.first_draw + opts.draws, 0)
    mine = sum(hi - lo for _, lo, hi in shard(items, ctx.rank, ctx.world_size))
    bar = tqdm(total=mine, disable=None if (opts.progress and ctx.rank == 0) else True, delay=1.0, unit="map",
               desc=f"erf [rank 0 of {ctx.world_size}]", file=sys.stderr, dynamic_ncols=True, leave=False)
    saved = False
    try:
        for j in range(rounds):
            k = j * ctx.world_size + ctx.rank
            error = None
            if k < len(items):
                draw, lo, hi = items[k]
                try:
                    for _ in worker.run_item(WorkItem((draw,), lo, hi)):
                        pass
                    bar.update(hi - lo)
                except Exception as exc:  # noqa: BLE001 - re-raised by exchange once the others know
                    error = exc
            exchange(ctx, None, error, f"finishing round {j + 1} of {rounds}")
            last = j == rounds - 1
            if opts.checkpoint is not None and not last and (j + 1) % opts.checkpoint_every == 0:
                nxt = (j + 1) * ctx.world_size
                _checkpoint(ctx, acc, opts.checkpoint, items[nxt][:2] if nxt < len(items) else end,
                            worker.batch.value, fingerprint)
                saved = True
    except KeyboardInterrupt:
        if saved:
            raise RunInterrupted(f"interrupted; progress up to the last checkpoint is in {opts.checkpoint!r}: run "
                                 "again with resume=True (CLI: --resume) to continue") from None
        raise
    finally:
        bar.close()
    merged = reduce_sums(ctx, acc)
    error = None
    if opts.checkpoint is not None and ctx.rank == 0:
        try:
            save_checkpoint(opts.checkpoint, merged, end, worker.batch.value, fingerprint)
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            error = exc
    exchange(ctx, None, error, "writing the final checkpoint")
    dist.destroy_process_group(group)
    return merged


def _checkpoint(ctx: DistContext, acc: Accumulator, path: str, position: tuple[int, int], batch_size: int,
                fingerprint: Fingerprint) -> None:
    """Rank 0 writes the reduced sums with ``position``; the ranks keep their own sums running."""
    merged = reduce_sums(ctx, acc)
    error = None
    if ctx.rank == 0:
        try:
            save_checkpoint(path, merged, position, batch_size, fingerprint)
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            error = exc
    exchange(ctx, None, error, "writing a checkpoint")
