"""Timing of the default ``erf compare`` (every downsampling module at 3x128x128, on the CPU).

    python benchmarks/bench_compare.py                 # the defaults of erf.compare
    python benchmarks/bench_compare.py --n-inputs 8    # try other settings

Prints the wall time, the process CPU time (both threads of torch; under contention from other
processes CPU time / threads is the better estimate of an idle machine's wall time), the load
average, and the slowest modules. Timings belong here, never in the tests.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pools", default="all")
    p.add_argument("--groups", type=int, default=None)
    p.add_argument("--draws", type=int, default=None)
    p.add_argument("--n-inputs", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import erf

    kw = {k: v for k, v in (("groups", args.groups), ("draws", args.draws), ("n_inputs", args.n_inputs))
          if v is not None}
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    comp = erf.compare(args.pools, progress=False, device="cpu", **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"modules: {len(comp.rows)}  options: {comp.options}")
    print(f"wall {wall:.1f} s   cpu {cpu:.1f} s (cpu/threads {cpu / args.threads:.1f} s)   "
          f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    for row in sorted(comp.rows, key=lambda r: -r["seconds"])[:6]:
        print(f"  {row['pool']:<11} {row['seconds']:6.2f} s")


if __name__ == "__main__":
    main()
