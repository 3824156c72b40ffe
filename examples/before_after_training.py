"""One model's ERF before and after training, from its checkpoints (the real-checkpoint workflow).

Trains a small CNN (``make`` below) on a generated task of :mod:`erf.tasks`, saves its checkpoints the
way training scripts do (epoch 0 as a DistributedDataParallel checkpoint ``{"model": {"module.…"}}``,
the last one as ``{"state_dict": …, "state_dict_ema": …}`` and as ``.safetensors``), then compares the
ERF of the last stage's centre unit on held-out task images::

    python examples/before_after_training.py            # writes ckpt/ and figures/checkpoints_*
    python examples/before_after_training.py --reuse    # only the comparison, from ckpt/
    erf compare --models examples/before_after_training.py:make@ckpt/epoch0.pth,\\
examples/before_after_training.py:make@ckpt/last.pth --layer stages.3 --input-shape 3x64x64

CPU, a few minutes. Nothing is downloaded.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def make() -> nn.Module:
    """Four stages of two 3x3 conv + BatchNorm + ReLU (16, 32, 64, 64 channels; 2x2 max pooling between
    stages), global average pooling and a linear classifier (4 classes)."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    widths, cin, stages = (16, 32, 64, 64), 3, []
    for i, w in enumerate(widths):
        layers = ([nn.MaxPool2d(2)] if i else []) + block(cin, w) + block(w, w)
        stages.append(nn.Sequential(*layers))
        cin = w
    model = nn.Sequential()
    model.add_module("stages", nn.Sequential(*stages))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(cin, 4))
    return model


def main(out: str = "ckpt", epochs: int = 8, size: int = 64, task: str = "shapes", train: bool = True) -> None:
    """Train (unless ``train=False``: reuse the checkpoints in ``out``), then compare the checkpoints."""
    from erf.tasks import make as make_task

    xt, yt = make_task(task, 512, size=size, seed=0, split="test")
    if train:
        train_and_save(out, epochs, size, task, xt, yt)
    compare_checkpoints(out, epochs, size, xt)


def train_and_save(out: str, epochs: int, size: int, task: str, xt: torch.Tensor, yt: torch.Tensor) -> None:
    """SGD with one-cycle learning rate and an EMA copy; checkpoints as training scripts write them."""
    from erf.tasks import make as make_task

    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    x, y = make_task(task, 2048, size=size, seed=0, split="train")
    model = make()
    ema = copy.deepcopy(model)
    torch.save({"epoch": 0, "model": {"module." + k: v for k, v in model.state_dict().items()}},
               os.path.join(out, "epoch0.pth"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * (len(x) // 64))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - 63, 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # exponential moving average of the weights (decay 0.99)
                for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
                    e.copy_(m) if not e.is_floating_point() else e.mul_(0.99).add_(m, alpha=0.01)
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    torch.save({"epoch": epochs, "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()},
               os.path.join(out, "last.pth"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "last.safetensors"))


def compare_checkpoints(out: str, epochs: int, size: int, xt: torch.Tensor) -> None:
    """The ERF of the last stage's centre unit for each checkpoint, on 192 held-out task images."""
    import erf

    spec = f"{os.path.relpath(__file__)}:make"
    comp = erf.compare(models={"epoch 0": f"{spec}@{out}/epoch0.pth",
                               f"epoch {epochs} (EMA)": f"{spec}@{out}/last.pth",
                               f"epoch {epochs}": f"{spec}@{out}/last.safetensors"},
                       input_shape=(3, size, size), layer="stages.3", inputs=xt[:192], groups=4, draws=1,
                       n_inputs=48, progress=False)
    print(comp.to_markdown())
    os.makedirs("figures", exist_ok=True)
    comp.plot_grid("figures/checkpoints_grid.png")
    comp.plot_ratios("figures/checkpoints_ratios.png")
    comp.to_csv("figures/checkpoints.csv")


if __name__ == "__main__":
    main(train="--reuse" not in sys.argv[1:])
