"""Scaling of a distributed ERF run: the same job with 1, 2, ... processes under torchrun.

Usage (CPU, gloo)::

    python benchmarks/bench_distributed.py                  # 1 and 2 processes
    python benchmarks/bench_distributed.py --procs 1 2 4 --threads 1

Each configuration is launched with ``torchrun --standalone --nproc-per-node N``; every rank runs
``erf.effective_rf(..., distributed=True)`` and reports the seconds of the call (setup, its share
of the work, the reduction). The table gives the slowest rank's time, the launch-to-exit time
(process start-up and imports included), the speed-up over one process, and checks that every
configuration gives the one-process map (max relative difference).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JOB = dict(pool="max", width=16, input_shape=(3, 64, 64), n_inputs=96, draws=2, batch_size=32)


def worker(out: str) -> None:
    """One rank: the benchmark job; writes its timing (and rank 0 its map)."""
    import torch

    import erf

    model = erf.nets.pooling_net(JOB["pool"], width=JOB["width"])
    t0 = time.perf_counter()
    r = erf.effective_rf(model, JOB["input_shape"], n_inputs=JOB["n_inputs"], draws=JOB["draws"],
                         batch_size=JOB["batch_size"], device="cpu", progress=False, distributed=True)
    seconds = time.perf_counter() - t0
    rank = int(os.environ.get("RANK", "0"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                                                          "n": r.n}))
    if rank == 0:
        np.save(Path(out, "map.npy"), r.map)


def launch(procs: int, threads: int | None) -> dict:
    """Run the job with ``procs`` processes; timings and the map."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               __file__, "--worker", out]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(procs)]
        return {"procs": procs, "threads": ranks[0]["threads"], "run_s": max(r["seconds"] for r in ranks),
                "wall_s": wall, "n": ranks[0]["n"], "map": np.load(Path(out, "map.npy"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS per process (default: torchrun's: all cores for 1 process, 1 for more)")
    parser.add_argument("--repeat", type=int, default=2, help="launches per configuration (the minimum is kept)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    print(f"job: pooling_net({JOB['pool']!r}, width={JOB['width']}) at {JOB['input_shape']}, "
          f"{JOB['n_inputs']} inputs x {JOB['draws']} draws, batch {JOB['batch_size']}; {os.cpu_count()} CPU cores")
    rows = []
    for procs in args.procs:
        runs = [launch(procs, args.threads) for _ in range(args.repeat)]
        rows.append(min(runs, key=lambda r: r["run_s"]))
    base, ref = rows[0]["run_s"], rows[0]["map"]
    print("| processes | threads each | run s (slowest rank) | launch-to-exit s | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        diff = np.abs(r["map"] - ref).max() / np.abs(ref).max()
        print(f"| {r['procs']} | {r['threads']} | {r['run_s']:.2f} | {r['wall_s']:.2f} | "
              f"{base / r['run_s']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
