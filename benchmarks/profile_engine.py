"""Where the time of a ResNet-50 ERF goes, and how far batching can go on this machine.

Measures, in one process:
- the machine's practical float32 peak: a 2048^3 matrix product and a 3x3 convolution
  (256 channels, 56x56, batch 8), best of several runs;
- the arithmetic of one image (forward + input gradient), counted by
  ``torch.utils.flop_counter.FlopCounterMode``;
- the achieved rate of the batch-1 protocol, the bare batched floor and the engine, as GFLOP/s and
  as a share of that peak; the ceiling of any batched speed-up is ``peak / batch-1 rate``;
- BatchNorm folding on and off in alternating engine runs (medians);
- a ``torch.profiler`` table of the operators, batch 1 against the engine's batch.

    python benchmarks/profile_engine.py [--images 8] [--batch 16] [--out benchmarks/results]

Writes ``benchmarks/results/profile_<device>.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import batch1_protocol, bare_batched, device_name, sync  # noqa: E402

import erf  # noqa: E402
from erf._fold import fold_batchnorms, plan_folding  # noqa: E402


def best_time(fn, dev: torch.device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def peak_gflops(dev: torch.device) -> dict[str, float]:
    """Practical float32 peak: a large matrix product and a large 3x3 convolution."""
    a, b = torch.randn(2048, 2048, device=dev), torch.randn(2048, 2048, device=dev)
    t_mm = best_time(lambda: a @ b, dev, 5)
    x = torch.randn(8, 256, 56, 56, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
    t_conv = best_time(lambda: torch.nn.functional.conv2d(x, w, padding=1), dev, 3)
    return {"matmul 2048^3": 2 * 2048 ** 3 / t_mm / 1e9,
            "conv 3x3, 256 ch, 56x56, B=8": 2 * 8 * 256 * 256 * 9 * 56 * 56 / t_conv / 1e9}


def nominal_cpu_peak() -> tuple[float, str] | None:
    """Float32 FMA peak at the clock /proc/cpuinfo reports: threads x FLOP/cycle x GHz, with two
    FMA units of 8 (AVX2) or 16 (AVX-512) lanes per core. ``None`` when it cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if not mhz or "fma" not in flags:
        return None
    per_cycle = 64 if "avx512f" in flags else 32
    ghz = max(mhz) / 1000
    threads = torch.get_num_threads()
    return threads * per_cycle * ghz, f"{threads} threads x {per_cycle} FLOP/cycle x {ghz:.2f} GHz"


def flops_per_image(features: nn.Module, shape, dev: torch.device) -> dict[str, float]:
    """Forward + input-gradient FLOPs of one image (weights frozen: no weight gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn((1,) + tuple(shape), device=dev, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        out = features(x)
        out[(slice(None), slice(None)) + tuple(s // 2 for s in out.shape[2:])].sum().backward()
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def op_table(step, label: str, rows: int = 8) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    out = [f"**{label}** (share of self {'GPU' if torch.cuda.is_available() else 'CPU'} time)", "",
           "| operator | share | calls |", "|---|---:|---:|"]
    for e in events[:rows]:
        out.append(f"| `{e.key}` | {100 * getattr(e, key) / total:.1f} % | {e.count} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images for the batch-1 protocol")
    ap.add_argument("--batch", type=int, default=16, help="the batched paths' batch size")
    ap.add_argument("--ab-runs", type=int, default=5, help="alternating runs of the folding A/B")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    features = nn.Sequential(*list(model.children())[:-2]).to(dev).eval()
    for p in features.parameters():
        p.requires_grad_(False)
    shape = (3, 224, 224)
    x = torch.randn((args.batch,) + shape, generator=torch.Generator().manual_seed(1))

    peaks = peak_gflops(dev)
    peak = max(peaks.values())
    flops = flops_per_image(features, shape, dev)
    per_image = sum(flops.values())
    t1 = best_time(lambda: batch1_protocol(features, x[:args.images], dev), dev, 2) / args.images
    tb = best_time(lambda: bare_batched(features, x, args.batch, dev), dev, 2) / args.batch
    steady: list[float] = []

    def engine_call():
        r = erf.effective_rf(model, shape, layer="layer4", inputs=x, batch_size=args.batch, device=dev,
                             progress=False)
        steady.append(r.meta["seconds"] / args.batch)  # without the set-up (TRF analysis, probes)

    te = best_time(engine_call, dev, 2) / args.batch
    te_steady = min(steady)
    rate1 = per_image / t1 / 1e9
    md = [f"## Where the time goes: ResNet-50, 224x224, layer4 centre unit, on {device_name(dev)}", "",
          f"torch {torch.__version__}. FLOPs per image (forward + input gradient, "
          f"`FlopCounterMode`): " + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in flops.items())
          + f"; total {per_image / 1e9:.2f} GFLOP.", "",
          "| measurement | s / image | GFLOP/s | share of peak | vs batch-1 |", "|---|---:|---:|---:|---:|"]
    nominal = nominal_cpu_peak() if dev.type == "cpu" else None
    if nominal is not None:
        peak = max(peak, nominal[0])
        md.append(f"| nominal FMA peak ({nominal[1]}) | - | {nominal[0]:.1f} | {100 * nominal[0] / peak:.0f} % | - |")
    for name, g in peaks.items():
        md.append(f"| best large kernel: {name} | - | {g:.1f} | {100 * g / peak:.0f} % | - |")
    for name, t in ((f"(a) batch-1 protocol ({args.images} images)", t1),
                    (f"(b) bare batched floor (B={args.batch})", tb),
                    (f"(c) engine defaults (B={args.batch}, BatchNorm folded), whole call", te),
                    ("(c) the same, steady state (set-up excluded)", te_steady)):
        g = per_image / t / 1e9
        md.append(f"| {name} | {t:.3f} | {g:.1f} | {100 * g / peak:.0f} % | {t1 / t:.2f}x |")
    # BatchNorm folding A/B: alternating runs, so that drifts of a shared machine hit both alike
    ab: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.ab_runs):
        for fold in (True, False):
            r = erf.effective_rf(model, shape, layer="layer4", inputs=x, batch_size=args.batch, crop=False,
                                 fold_bn=fold, device=dev, progress=False)
            ab[fold].append(r.meta["seconds"] / args.batch)
    med = {k: statistics.median(v) for k, v in ab.items()}
    md += ["", f"BatchNorm folding, {args.ab_runs} alternating engine runs (B={args.batch}, crop=False), median "
               f"s / image: folded {med[True]:.3f}, not folded {med[False]:.3f}: **{med[False] / med[True]:.2f}x** "
               f"(runs: folded {', '.join(f'{t:.3f}' for t in ab[True])}; "
               f"not folded {', '.join(f'{t:.3f}' for t in ab[False])})."]
    best = max(max(peaks.values()), per_image / te_steady / 1e9)
    md += ["", f"To reach 3x the batch-1 protocol without doing less arithmetic, the engine would have to run at "
               f"{3 * rate1:.0f} GFLOP/s: {3 * rate1 / best:.1f}x the best rate any measurement above reached "
               f"({best:.0f} GFLOP/s)"
           + (f" and {100 * 3 * rate1 / nominal[0]:.0f} % of the nominal FMA peak." if nominal else ".")
           + " Only doing less arithmetic goes further: BatchNorm folding (the BatchNorm passes), the cone crop.",
           ""]

    def step1():
        batch1_protocol(features, x[:1], dev)

    folded = nn.Sequential(*list(torchvision.models.resnet50().eval().children())[:-2]).eval()
    folded = fold_batchnorms(folded, plan_folding(folded, []))
    folded.to(dev).to(memory_format=torch.channels_last)
    for p in folded.parameters():
        p.requires_grad_(False)

    def stepb():
        bare_batched(folded, x.contiguous(memory_format=torch.channels_last), args.batch, dev)

    def step_floor():
        bare_batched(features, x, args.batch, dev)

    md += op_table(step1, "batch-1 protocol, one image")
    md += op_table(step_floor, f"bare batched floor, BatchNorm not folded, B={args.batch}")
    md += op_table(stepb, f"engine's computation: BatchNorm folded, channels_last, B={args.batch}")
    text = "\n".join(md)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile_{dev.type}.md")
    with open(path, "w") as fh:
        fh.write(text + "\n")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
