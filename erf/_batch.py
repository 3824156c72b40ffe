"""Batch sizes: the largest batch that fits, and backing off when one does not.

- GPU: one probe batch measures the peak memory per sample; the batch is the share of free
  device memory that holds, and an out-of-memory error during the run halves it and retries
  the same inputs (:func:`run_split`), down to one sample.
- CPU: an estimate of the memory per sample (activations of the probe) against free RAM; a
  requested batch larger than free RAM can hold is reduced with a warning (the kernel's OOM
  killer gives no exception to recover from).
"""
from __future__ import annotations

import gc
import warnings
from typing import Any, Callable

import torch

#: largest automatic batch per device type (beyond it throughput no longer grows). CPU: ResNet-50 at
#: 224x224 ran 8 % slower per image at 32 than at 16 (benchmarks/, 2 cores); small nets gain nothing
#: from more than 16 either.
CAP = {"cuda": 1024, "cpu": 16}
#: share of free memory an automatic batch may use
SHARE = {"cuda": 0.8, "cpu": 0.3}


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of the GPU or of the CPU allocator."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc)
        return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    return False


def release(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_cuda_bytes(run: Any, x: torch.Tensor) -> int | None:
    """Peak device bytes per sample of one gradient batch ``x`` (``None`` when it cannot be measured)."""
    dev = run.device
    try:
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        maps = run._maps(run.model0, x)
        del maps
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    except Exception as exc:
        if is_oom(exc):
            release(dev)
        return None
    return max(1, (peak - base) // x.shape[0])


def auto_batch_size(run: Any, estimate: int, total: int) -> int:
    """The automatic batch of a set-up run: measured on GPU, estimated on CPU, at least 1."""
    dev = run.device
    kind = "cuda" if dev.type == "cuda" else "cpu"
    per_sample = estimate
    if kind == "cuda" and run.method == "gradient":
        probe = torch.zeros((2,) + tuple(run.input_shape),
                            dtype=torch.float64 if run.dtype == torch.float64 else torch.float32)
        measured = measure_cuda_bytes(run, probe)
        if measured is not None:
            per_sample = max(measured, 1)
    from erf.engine import _free_memory

    bs = int(_free_memory(dev) * SHARE[kind] // max(per_sample, 1))
    return max(1, min(bs, CAP[kind], max(total, 1)))


def clamp_requested(run: Any, batch_size: int, per_sample: int) -> int:
    """A requested CPU batch, reduced (with a warning) to what free RAM can hold."""
    if run.device.type != "cpu":
        return batch_size  # the GPU backs off on out-of-memory errors instead
    from erf.engine import _free_memory

    fits = max(1, int(_free_memory(run.device) * 0.8 // max(per_sample, 1)))
    if batch_size > fits:
        warnings.warn(f"batch_size={batch_size} needs about {batch_size * per_sample / 2**30:.1f} GiB, more "
                      f"than the free RAM holds; using batch_size={fits}", stacklevel=4)
        return fits
    return batch_size


def run_split(fn: Callable[[int, int], Any], lo: int, hi: int, run: Any) -> list[tuple[int, int, Any]]:
    """``fn(lo, hi)``, or on out-of-memory the halves ``[lo, mid)``, ``[mid, hi)`` recursively.

    Each failure halves ``run.batch_size_used`` so later batches start at the size that fits.
    Returns ``[(lo, hi, fn(lo, hi)), ...]`` covering ``[lo, hi)`` in order.
    """
    try:
        return [(lo, hi, fn(lo, hi))]
    except Exception as exc:
        if not is_oom(exc) or hi - lo <= 1:
            raise
    release(run.device)
    mid = lo + (hi - lo) // 2
    run.batch_size_used = max(1, min(run.batch_size_used, mid - lo))
    warnings.warn(f"out of memory with a batch of {hi - lo}; retrying with batches of {mid - lo}",
                  RuntimeWarning, stacklevel=2)
    return run_split(fn, lo, mid, run) + run_split(fn, mid, hi, run)


def check_one_sample_fits(run: Any, per_sample: int) -> None:
    """CPU: refuse (ValueError naming input_shape) a run whose one sample needs more than the memory
    available (host RAM capped by the cgroup limit): it would be killed (exit 137) without a message."""
    if run.device.type != "cpu":
        return  # the GPU measures its probe and backs off on out-of-memory errors
    from erf._memory import describe
    from erf.engine import _free_memory

    available = _free_memory(run.device)
    if per_sample > available:
        raise ValueError(f"input_shape {tuple(run.input_shape)}: one sample needs about {describe(per_sample)} "
                         f"(activations and gradients) but only {describe(available)} is available (free RAM, "
                         "capped by the container's cgroup limit); use a smaller input_shape or a layer "
                         "closer to the input")


def choose_batch_size(run: Any) -> int:
    """``run.batch_size_used``: the request (CPU: clamped to free RAM) or the automatic batch.

    The memory per sample shrinks with the cone crop; with stacked draws one step holds the
    inputs of several draws, so the automatic batch may exceed the inputs of one draw.
    """
    per_sample = run.per_sample_bytes
    if run.crop_plan is not None:
        per_sample = max(1, int(per_sample * run.crop_plan.fraction))
    check_one_sample_fits(run, per_sample)
    if run.batch_size is not None:
        return clamp_requested(run, run.batch_size, per_sample)
    total = run.source.n if run.source.n is not None else 32
    if run.stacker is not None:
        total *= run.draws
    return auto_batch_size(run, per_sample, total)


def use_channels_last(run: Any) -> bool:
    """channels_last for model and input: 2-D convolution nets in float32/bf16/fp16, GPU and CPU.

    ENGINEERING.md measured ~1.35x on CPU for a ResNet-like net (maps equal to 2.4e-7); the
    benchmarks (``benchmarks/bench_engine.py``) measure it again. float64, 1-D/3-D and nets holding a
    module that declares ``prefers_contiguous = True`` (gather-based pooling, slower in channels_last)
    stay contiguous.
    """
    return (run.ndim == 2 and run.dtype != torch.float64 and run.method == "gradient"
            and not any(getattr(m, "prefers_contiguous", False) for m in run.model0.modules()))
