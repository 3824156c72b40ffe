"""Defaults on real architectures: ``erf.effective_rf(timm model, (3, 224, 224))`` with no options.

Run: ``python benchmarks/bench_architectures.py [--threads 2] [--n-inputs 32] [--repeat 2] [model ...]``.
Per timm model (random weights, ``pretrained=False``): the layer the engine chose (the last spatial
feature map), the layout it inferred, the wall time of the run itself (engine setup, probe,
degenerate-unit check, forward + backward of every input) and of the analyses afterwards (TRF,
metrics, Gaussian fit), the best of ``--repeat`` runs. Also prints the machine's load average,
because on a shared machine other processes' work inflates every time.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

import erf

MODELS = ["vit_tiny_patch16_224", "convnext_atto"]


def main(argv: list[str] | None = None) -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-inputs", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--side", type=int, default=224)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (3, args.side, args.side)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, {args.n_inputs} inputs, "
          f"input {'x'.join(map(str, shape))}, load average before {os.getloadavg()[0]:.2f}")
    print(f"{'model':24s} {'layer':10s} {'layout':28s} {'run s':>7s} {'analyses s':>10s}  ERF/TRF  warnings")
    for name in args.models:
        def make(name=name):
            return timm.create_model(name, pretrained=False)
        runs, analyses = [], []
        for _ in range(args.repeat):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = time.perf_counter()
                r = erf.effective_rf(make, shape, n_inputs=args.n_inputs, progress=False)
                runs.append(time.perf_counter() - t)
                t = time.perf_counter()
                ratio = r.metrics["erf_trf_ratio"]
                _ = r.fit
                analyses.append(time.perf_counter() - t)
        lay = r.meta.get("layout", {})
        desc = lay.get("layout", "?") + (f" {lay['grid'][0]}x{lay['grid'][1]}+{lay['prefix_tokens']}"
                                         if lay.get("grid") else "")
        print(f"{name:24s} {r.layer:10s} {desc:28s} {min(runs):7.2f} {min(analyses):10.2f}  "
              f"{ratio['overall'] if ratio else float('nan'):.3f}    {len(r.meta.get('warnings', []))}")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
