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


def free_memory(device: torch.device) -> int:
    """Free bytes for a run on ``device``: free GPU memory, or host RAM capped by the cgroup limit (:mod:`erf._memory`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    from erf._memory import cpu_available

    return cpu_available()  # host MemAvailable capped by the cgroup (container) limit


class BatchSize:
    """The batch size a run uses now: set by the plan, halved by :func:`run_split` on out-of-memory."""

    def __init__(self, value: int):
        self.value = int(value)

    def shrink(self, at_most: int) -> None:
        """Use at most ``at_most`` (at least 1) from now on."""
        self.value = max(1, min(self.value, at_most))


def measure_cuda_bytes(maps: Callable[[torch.Tensor], Any], x: torch.Tensor, device: torch.device) -> int | None:
    """Peak device bytes per sample of one gradient batch ``maps(x)`` (``None`` when it cannot be measured)."""
    try:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = maps(x)
        del out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    except Exception as exc:
        if is_oom(exc):
            release(device)
        return None
    return max(1, (peak - base) // x.shape[0])


def auto_batch_size(device: torch.device, estimate: int, total: int, *,
                    measure: Callable[[], int | None] | None = None) -> int:
    """The automatic batch: the share of free memory that ``estimate`` (or on GPU ``measure()``) bytes per
    sample fit, capped by :data:`CAP` and ``total``; at least 1."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    per_sample = estimate
    if kind == "cuda" and measure is not None:
        measured = measure()
        if measured is not None:
            per_sample = max(measured, 1)
    bs = int(free_memory(device) * SHARE[kind] // max(per_sample, 1))
    return max(1, min(bs, CAP[kind], max(total, 1)))


def clamp_requested(device: torch.device, batch_size: int, per_sample: int) -> int:
    """A requested CPU batch, reduced (with a warning) to what free RAM can hold."""
    if device.type != "cpu":
        return batch_size  # the GPU backs off on out-of-memory errors instead
    fits = max(1, int(free_memory(device) * 0.8 // max(per_sample, 1)))
    if batch_size > fits:
        warnings.warn(f"batch_size={batch_size} needs about {batch_size * per_sample / 2**30:.1f} GiB, more "
                      f"than the free RAM holds; using batch_size={fits}", stacklevel=4)
        return fits
    return batch_size


def run_split(fn: Callable[[int, int], Any], lo: int, hi: int, device: torch.device,
              batch: BatchSize) -> list[tuple[int, int, Any]]:
    """``fn(lo, hi)``, or on out-of-memory the halves ``[lo, mid)``, ``[mid, hi)`` recursively.

    Each failure shrinks ``batch`` so later batches start at the size that fits.
    Returns ``[(lo, hi, fn(lo, hi)), ...]`` covering ``[lo, hi)`` in order.
    """
    try:
        return [(lo, hi, fn(lo, hi))]
    except Exception as exc:
        if not is_oom(exc) or hi - lo <= 1:
            raise
    release(device)
    mid = lo + (hi - lo) // 2
    batch.shrink(mid - lo)
    warnings.warn(f"out of memory with a batch of {hi - lo}; retrying with batches of {mid - lo}",
                  RuntimeWarning, stacklevel=2)
    return run_split(fn, lo, mid, device, batch) + run_split(fn, mid, hi, device, batch)


def check_one_sample_fits(device: torch.device, input_shape: tuple[int, ...], per_sample: int) -> None:
    """CPU: refuse (ValueError naming input_shape) a run whose one sample needs more than the memory
    available (host RAM capped by the cgroup limit): it would be killed (exit 137) without a message."""
    if device.type != "cpu":
        return  # the GPU measures its probe and backs off on out-of-memory errors
    from erf._memory import describe

    available = free_memory(device)
    if per_sample > available:
        raise ValueError(f"input_shape {tuple(input_shape)}: one sample needs about {describe(per_sample)} "
                         f"(activations and gradients) but only {describe(available)} is available (free RAM, "
                         "capped by the container's cgroup limit); use a smaller input_shape or a layer "
                         "closer to the input")


def choose_batch_size(device: torch.device, requested: int | None, per_sample_bytes: int, total: int, *,
                      input_shape: tuple[int, ...], crop_fraction: float | None = None,
                      measure: Callable[[], int | None] | None = None) -> int:
    """The batch of a run: the request (CPU: clamped to free RAM) or the automatic batch.

    ``per_sample_bytes`` shrinks with the cone crop (``crop_fraction``); ``total`` is the number of
    samples one step may hold (the inputs of one draw, times the draws when they are stacked).

    Raises:
        ValueError: on CPU, one sample of ``input_shape`` does not fit (:func:`check_one_sample_fits`).
    """
    per_sample = per_sample_bytes
    if crop_fraction is not None:
        per_sample = max(1, int(per_sample * crop_fraction))
    check_one_sample_fits(device, input_shape, per_sample)
    if requested is not None:
        return clamp_requested(device, requested, per_sample)
    return auto_batch_size(device, per_sample, total, measure=measure)


def use_channels_last(ndim: int, dtype: torch.dtype, method: str, model: torch.nn.Module) -> bool:
    """channels_last for model and input: 2-D convolution nets in float32/bf16/fp16, GPU and CPU.

    ENGINEERING.md measured ~1.35x on CPU for a ResNet-like net (maps equal to 2.4e-7); the
    benchmarks (``benchmarks/bench_engine.py``) measure it again. float64, 1-D/3-D and nets holding a
    module that declares ``prefers_contiguous = True`` (gather-based pooling, slower in channels_last)
    stay contiguous.
    """
    return (ndim == 2 and dtype != torch.float64 and method == "gradient"
            and not any(getattr(m, "prefers_contiguous", False) for m in model.modules()))
