"""Cost of the per-draw (clustered) sums: the engine with them against the previous accumulator.

The previous accumulator (one float64 count/mean/M2 per target, no per-draw sums) is put back by
swapping :class:`erf._accumulate.TargetSums` for :class:`LegacySums`; the two paths take turns
round by round (a shared machine drifts), and the minimum per path is reported.

    python benchmarks/bench_stats.py [--rounds 5] [--out benchmarks/results]

Writes a markdown table to stdout and ``benchmarks/results/stats_<device>.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import erf
import erf._accumulate as acc_mod
from erf._stats import ClusterStats, RunningMoments
from erf.nets import conv_stack, pooling_net


class LegacySums(acc_mod.TargetSums):
    """The accumulator before per-draw sums: Chan's update of one running (n, mean, M2)."""

    def __init__(self, moments):
        self.moments = moments

    @classmethod
    def zeros(cls, map_shape, device, first_draw=0, draws=1):
        out = cls(RunningMoments.zeros(map_shape, device))
        out.first_draw = first_draw
        return out

    @property
    def shape(self):
        return tuple(self.moments.mean.shape)

    def update(self, maps, draws, weight=None, window=None):
        self.moments.update(maps, weight=weight, window=window)

    def clusters(self):
        n, mean, m2 = self.moments.to_numpy()
        return ClusterStats([self.first_draw], [float(n)], mean[None], m2)


def run(model, shape, legacy: bool, **kw) -> tuple[float, erf.ERFResult]:
    saved = acc_mod.TargetSums
    if legacy:
        acc_mod.TargetSums = LegacySums
    try:
        t = time.perf_counter()
        r = erf.effective_rf(model, shape, progress=False, device="cpu", **kw)
        return time.perf_counter() - t, r
    finally:
        acc_mod.TargetSums = saved


def cases():
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50().eval()
    x = torch.randn((16, 3, 224, 224), generator=torch.Generator().manual_seed(1))
    yield "ResNet-50 layer4, 224^2, 16 inputs x 1 draw", resnet, (3, 224, 224), dict(layer="layer4", inputs=x, batch_size=8)
    yield ("20-layer 3x3 stack, width 16, 64^2, 8 inputs x 8 draws", conv_stack(20, width=16, act="relu"),
           (16, 64, 64), dict(init="normal", n_inputs=8, draws=8, vmap_draws=False))
    yield ("pooling_net(max), 128^2, 4 inputs x 8 draws", lambda: pooling_net("max"), (3, 128, 128),
           dict(n_inputs=4, draws=8))
    yield ("10-layer stack, width 2, 256^2, 32 inputs x 16 draws (cheap maps, large grid)",
           conv_stack(10, width=2, in_channels=1), (1, 256, 256), dict(init="normal", n_inputs=32, draws=16))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    lines = ["| case | previous (s) | per-draw sums (s) | change | max rel. map dev. |", "|---|---:|---:|---:|---:|"]
    for title, model, shape, kw in cases():
        run(model, shape, False, **kw)  # warm-up (imports, TRF analysis caches, allocator)
        best = {True: np.inf, False: np.inf}
        maps = {}
        for _ in range(args.rounds):
            for legacy in (True, False):
                t, r = run(model, shape, legacy, **kw)
                best[legacy] = min(best[legacy], t)
                maps[legacy] = r.map
        dev = float(np.abs(maps[True] - maps[False]).max() / np.abs(maps[True]).max())
        change = best[False] / best[True] - 1
        lines.append(f"| {title} | {best[True]:.3f} | {best[False]:.3f} | {100 * change:+.1f} % | {dev:.1e} |")
        print(lines[-1], flush=True)
    text = "\n".join([f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; minimum of "
                      f"{args.rounds} interleaved rounds", ""] + lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stats_cpu.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
