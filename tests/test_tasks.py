"""erf.tasks: deterministic, balanced, vectorised generated tasks."""
from __future__ import annotations

import pytest
import torch

from erf import tasks


@pytest.mark.parametrize("name", tasks.names())
def test_task_is_deterministic_balanced_and_split(name):
    x, y = tasks.make(name, 50, size=32, seed=3)
    x2, y2 = tasks.make(name, 50, size=32, seed=3)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    counts = torch.bincount(y, minlength=tasks.classes_of(name))
    assert len(counts) == tasks.classes_of(name) and int(counts.max() - counts.min()) <= 1
    xt, _ = tasks.make(name, 50, size=32, seed=3, split="test")
    xo, _ = tasks.make(name, 50, size=32, seed=4)
    assert not torch.equal(x, xt) and not torch.equal(x, xo)
    assert torch.isfinite(x).all() and 0.2 < float(x.std()) < 2.0


def test_variants_have_their_structure():
    tiled, _ = tasks.make("tiled", 4, size=32)
    cell = tiled[:, :, :8, :8]
    assert torch.equal(tiled[:, :, 8:16, 16:24], cell)  # the same image in every cell of the 4x4 grid
    # stretched: vertical neighbours are more alike than horizontal ones (the texture is stretched)
    def v_over_h(t):
        return float((t[..., 1:, :] - t[..., :-1, :]).abs().mean() / (t[..., :, 1:] - t[..., :, :-1]).abs().mean())

    s, _ = tasks.make("stretched", 64, size=32)
    p, _ = tasks.make("shapes", 64, size=32)
    assert v_over_h(s) < 0.9 * v_over_h(p) and 0.9 < v_over_h(p) < 1.1
    z, _ = tasks.make("zoomed", 64, size=32)  # upscaled x2: smoother than shapes
    assert (z[..., :, 1:] - z[..., :, :-1]).abs().mean() < 0.8 * (p[..., :, 1:] - p[..., :, :-1]).abs().mean()


def test_marks_are_far_apart_and_label_is_same_colour():
    x, y = tasks.make("marks", 200, size=32, seed=1)
    img = x * 0.25 + 0.5
    palette = tasks._PALETTE
    for i in range(0, 200, 17):
        d = ((img[i].permute(1, 2, 0)[..., None, :] - palette) ** 2).sum(-1)  # (H, W, 4)
        hit = d.min(-1).values < 1e-6
        rows, cols = hit.nonzero(as_tuple=True)
        colours = d.argmin(-1)[hit].unique()
        span = max(int(rows.max() - rows.min()), int(cols.max() - cols.min()))
        assert span >= 16
        assert (len(colours) == 1) == bool(y[i])


def test_load_and_bad_input():
    t = tasks.load("shapes", n_train=8, n_test=4, size=16)
    assert t.x_train.shape == (8, 3, 16, 16) and t.y_test.shape == (4,) and t.classes == 4
    with pytest.raises(ValueError, match="unknown task 'nope'.*shapes"):
        tasks.make("nope", 4)
    with pytest.raises(ValueError, match="n must be"):
        tasks.make("shapes", 0)
    with pytest.raises(ValueError, match="size"):
        tasks.make("shapes", 4, size=8)
    with pytest.raises(ValueError, match="multiple of 4"):
        tasks.make("tiled", 4, size=30)
