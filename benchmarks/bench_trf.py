"""How long ``erf.theoretical_rf`` takes per torchvision model (CPU, 224x224, random weights).

Run: ``python benchmarks/bench_trf.py [--repeat 3] [--threads 2] [model ...]``. Prints, per model,
the best wall time of the analysis (trace, shapes with fake tensors, forward and backward walks)
and the TRF size, jump and padding of the centre unit of the last feature map.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from erf.trf import theoretical_rf

MODELS = {
    "resnet18": "layer4", "resnet50": "layer4", "vgg16": "features", "alexnet": "features",
    "mobilenet_v2": "features", "densenet121": "features", "convnext_tiny": "features",
    "efficientnet_b0": "features", "regnet_y_400mf": "trunk_output",
}


def main(argv: list[str] | None = None) -> None:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=list(MODELS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", type=int, default=224)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'model':18s} {'best s':>7s}  size        jump     padding   global  local size")
    for name in args.models:
        model = getattr(torchvision.models, name)()
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = theoretical_rf(model, (3, args.side, args.side), layer=MODELS[name])
            times.append(time.perf_counter() - t)
        print(f"{name:18s} {min(times):7.3f}  {str(r.size):11s} {str(r.jump):8s} {str(r.padding):11s} "
              f"{str(r.is_global):6s}  {r.local_size}")


if __name__ == "__main__":
    main()
