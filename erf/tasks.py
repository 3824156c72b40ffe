"""Generated classification tasks for training networks and watching their ERF change.

No data set can be downloaded here, so the tasks are drawn procedurally, vectorised with torch
(no per-pixel Python loops): a batch of ``n`` images is a few broadcast operations on an
``(n, H, W)`` coordinate grid.

- ``shapes``: one shape (circle, square, triangle, cross: 4 classes) on a textured background
  (random gratings + pixel noise, random colours), position, scale and rotation varied.
- ``stretched``, ``tiled``, ``zoomed``: the variants of Jang et al., "Pooling Revisited: Your
  Receptive Field is Suboptimal" (DynOPool, CVPR 2022, https://arxiv.org/abs/2205.15254), built
  from ``shapes`` as the paper builds them from CIFAR-100: the whole image stretched vertically
  by 2 (texture included) and cropped; the image downscaled by 4 and tiled 4x4 (the same image in
  all 16 cells, so the label is that image's label); the image downscaled by 2 and upscaled back
  (bilinear) after a crop, i.e. an upscaled, blurred crop.
- ``marks``: long-range context. Two small marks (3x3 px at 32 px) in opposite halves, at least
  half the image apart; label 1 if they have the same colour (palette of 4), else 0. A unit must
  see both marks to solve it, so the field has to grow.

Labels are exactly balanced: ``labels = arange(n) % classes``, randomly permuted (class counts
differ by at most one). Every draw is keyed by ``(name, seed, split)``, so a task is the same
for a seed on every run and machine, and the ``train`` and ``test`` splits are independent draws.
Images are float32, 3 channels, roughly zero-mean unit-variance (``(x - 0.5) / 0.25``).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["make", "load", "names", "classes_of", "Task", "TASKS"]

_SHAPES = ("circle", "square", "triangle", "cross")
_PALETTE = torch.tensor([[0.95, 0.15, 0.15], [0.15, 0.85, 0.2], [0.2, 0.35, 0.95], [0.95, 0.9, 0.15]])


@dataclass(frozen=True)
class _Spec:
    name: str
    classes: int
    label_rule: str
    render: Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _generator(name: str, seed: int, split: str) -> torch.Generator:
    key = zlib.crc32(f"erf.tasks/{name}/{int(seed)}/{split}".encode())
    return torch.Generator().manual_seed(key)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


def _balanced_labels(n: int, classes: int, g: torch.Generator) -> torch.Tensor:
    return (torch.arange(n) % classes)[torch.randperm(n, generator=g)]


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in units of the image side: rows ``yy`` and cols ``xx`` in (0, 1)."""
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / w  # rows scaled by the width: square pixels
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return y.view(1, h, 1), x.view(1, 1, w)


def _background(n: int, h: int, w: int, g: torch.Generator, stretch: float = 1.0) -> torch.Tensor:
    """Textured backgrounds ``(n, 3, h, w)`` in [0, 1]: two random gratings + pixel noise, two colours."""
    yy, xx = _grid(h, w)
    yy = yy / stretch
    tex = torch.zeros(n, h, w)
    for _ in range(2):
        theta = _uniform(g, n, 0, math.pi).view(n, 1, 1)
        freq = _uniform(g, n, 2.0, 6.0).view(n, 1, 1) * 2 * math.pi
        phase = _uniform(g, n, 0, 2 * math.pi).view(n, 1, 1)
        tex = tex + 0.5 * torch.sin(freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    tex = (tex / 2 + 0.5).clamp(0, 1)  # (n, h, w) in [0, 1]
    c0 = _uniform(g, n, 0.25, 0.55, 3).view(n, 3, 1, 1)
    c1 = _uniform(g, n, 0.25, 0.55, 3).view(n, 3, 1, 1)
    img = c0 + (c1 - c0) * tex.unsqueeze(1)
    return img + 0.04 * torch.randn(n, 3, h, w, generator=g)


def _shape_masks(kind: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, s: torch.Tensor, rot: torch.Tensor,
                 h: int, w: int, stretch: float = 1.0) -> torch.Tensor:
    """Anti-aliased masks ``(n, h, w)`` in [0, 1] from signed distances (1 px soft edge)."""
    n = kind.shape[0]
    yy, xx = _grid(h, w)
    dy = (yy - cy.view(n, 1, 1)) / stretch
    dx = xx - cx.view(n, 1, 1)
    c, sn = torch.cos(rot).view(n, 1, 1), torch.sin(rot).view(n, 1, 1)
    u = c * dx + sn * dy
    v = -sn * dx + c * dy
    s = s.view(n, 1, 1)
    circle = torch.sqrt(u * u + v * v) - s
    square = torch.maximum(u.abs(), v.abs()) - 0.85 * s
    # equilateral triangle of circumradius s: three half-planes
    tri = None
    for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        d = -(u * math.cos(a) + v * math.sin(a)) - 0.5 * s
        tri = d if tri is None else torch.maximum(tri, d)
    bar = 0.3 * s
    cross = torch.minimum(torch.maximum(u.abs() - bar, v.abs() - s), torch.maximum(v.abs() - bar, u.abs() - s))
    sd = torch.stack([circle, square, tri, cross], 1)  # (n, 4, h, w), in units of the width
    sd = sd.gather(1, kind.view(n, 1, 1, 1).expand(n, 1, h, w))[:, 0]
    return (0.5 - sd * w).clamp(0, 1)


def _shapes(n: int, size: int, g: torch.Generator, stretch: float = 1.0,
            scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``shapes`` at ``size`` px; with ``stretch`` > 1 the whole image is stretched vertically by that
    factor and cropped to ``size`` rows (the shape's centre kept inside); ``scale`` multiplies the
    shapes' size (a crop of a larger image)."""
    y = _balanced_labels(n, len(_SHAPES), g)
    s = _uniform(g, n, 0.12, 0.24) * scale  # half-size as a share of the side
    rot = _uniform(g, n, 0, 2 * math.pi)
    margin_y = (s * stretch).clamp(max=0.45)
    cy = margin_y + (1 - 2 * margin_y) * torch.rand(n, generator=g)
    cx = s + (1 - 2 * s) * torch.rand(n, generator=g)
    bg = _background(n, size, size, g, stretch)
    mask = _shape_masks(y, cy, cx, s, rot, size, size, stretch).unsqueeze(1)
    # the shape's colour: contrasting with the background (bright or dark), random hue
    bright = (torch.rand(n, generator=g) < 0.5).float().view(n, 1, 1, 1)
    col = bright * _uniform(g, n, 0.75, 1.0, 3).view(n, 3, 1, 1) + (1 - bright) * _uniform(g, n, 0.0, 0.1, 3).view(n, 3, 1, 1)
    img = bg * (1 - mask) + col * mask
    return img, y


def _stretched(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return _shapes(n, size, g, stretch=2.0)


def _tiled(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if size % 4:
        raise ValueError(f"size must be a multiple of 4 for task 'tiled', got {size}")
    img, y = _shapes(n, size, g)
    small = F.avg_pool2d(img, 4)  # anti-aliased downscale by 4
    return small.repeat(1, 1, 4, 4), y


def _zoomed(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if size % 2:
        raise ValueError(f"size must be even for task 'zoomed', got {size}")
    img, y = _shapes(n, size // 2, g, scale=1.7)  # a crop of half the side (shapes ~2x larger), half resolution ...
    return F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False), y  # ... upscaled x2


def _marks(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = _balanced_labels(n, 2, g)
    img = _background(n, size, size, g)
    m = max(2, round(size * 3 / 32))  # mark side: 3 px at 32 px
    c1 = torch.randint(0, len(_PALETTE), (n,), generator=g)
    shift = torch.randint(1, len(_PALETTE), (n,), generator=g)
    c2 = torch.where(y == 1, c1, (c1 + shift) % len(_PALETTE))
    # mark 1 in the left/top half, mark 2 in the opposite half, >= size/2 apart along the split axis
    vertical = torch.rand(n, generator=g) < 0.5
    q = size // 4
    a = torch.randint(1, q, (n,), generator=g)
    b = (a + size // 2 + torch.randint(0, max(1, q - m), (n,), generator=g)).clamp(max=size - m)
    o1 = torch.randint(1, size - m - 1, (n,), generator=g)
    o2 = torch.randint(1, size - m - 1, (n,), generator=g)
    r1, k1 = torch.where(vertical, a, o1), torch.where(vertical, o1, a)
    r2, k2 = torch.where(vertical, b, o2), torch.where(vertical, o2, b)
    rows = torch.arange(size).view(1, size, 1)
    cols = torch.arange(size).view(1, 1, size)

    def box(r, k):
        return ((rows >= r.view(n, 1, 1)) & (rows < r.view(n, 1, 1) + m)
                & (cols >= k.view(n, 1, 1)) & (cols < k.view(n, 1, 1) + m)).unsqueeze(1).float()

    for r, k, c in ((r1, k1, c1), (r2, k2, c2)):
        mask = box(r, k)
        img = img * (1 - mask) + _PALETTE[c].view(n, 3, 1, 1) * mask
    return img, y


TASKS: dict[str, _Spec] = {
    "shapes": _Spec("shapes", 4, "the shape: 0 circle, 1 square, 2 triangle, 3 cross", _shapes),
    "stretched": _Spec("stretched", 4, "the shape (image stretched x2 vertically, cropped)", _stretched),
    "tiled": _Spec("tiled", 4, "the shape of the image repeated in all 16 cells of the 4x4 grid", _tiled),
    "zoomed": _Spec("zoomed", 4, "the shape (half-resolution crop upscaled x2)", _zoomed),
    "marks": _Spec("marks", 2, "1 if the two far-apart marks have the same colour, else 0", _marks),
}


def names() -> list[str]:
    """The task names."""
    return list(TASKS)


def _spec(name) -> _Spec:
    if not isinstance(name, str):
        raise TypeError(f"name must be a task name (str), got {type(name).__name__}")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def classes_of(name: str) -> int:
    """Number of classes of a task."""
    return _spec(name).classes


def make(name: str, n: int, size: int = 32, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images and labels of a generated task: ``(x Tensor[n, 3, size, size] float32, y Tensor[n] int64)``.

    Deterministic for ``(name, seed, split)``; ``split`` ``"train"`` or ``"test"`` are independent
    draws. Classes are exactly balanced (counts differ by at most one). See the module docstring
    for each task's label rule.

    Raises:
        ValueError: unknown task, ``n < 1``, ``size`` < 16 (or not a multiple of 4 for ``tiled``).
    """
    spec = _spec(name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 16:
        raise ValueError(f"size must be an int >= 16 (pixels per side), got {size!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    g = _generator(name, seed, split)
    img, y = spec.render(n, size, g)
    x = ((img.clamp(0, 1) - 0.5) / 0.25).contiguous()
    return x.float(), y.long()


@dataclass
class Task:
    """A task's train and test splits (tensors) with its name, classes and label rule."""

    name: str
    classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    size: int
    seed: int
    label_rule: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "n_train": len(self.y_train), "n_test": len(self.y_test),
                "size": self.size, "seed": self.seed, "label_rule": self.label_rule}


def load(name: str, n_train: int = 1024, n_test: int = 256, size: int = 32, seed: int = 0) -> Task:
    """Both splits of a generated task (:func:`make` with ``split="train"`` and ``"test"``)."""
    spec = _spec(name)
    x_tr, y_tr = make(name, n_train, size=size, seed=seed, split="train")
    x_te, y_te = make(name, n_test, size=size, seed=seed, split="test")
    return Task(name, spec.classes, x_tr, y_tr, x_te, y_te, size, seed, spec.label_rule)
