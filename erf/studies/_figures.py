"""Figures of the training runs and studies (matplotlib imported lazily, Agg figures)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _share(m: np.ndarray) -> np.ndarray:
    """A map as a share of its mass (so maps of different scale share one colour scale)."""
    m = np.maximum(np.asarray(m, dtype=np.float64), 0.0)
    total = m.sum()
    return m / total if total > 0 else m


def map_row(fig, axes, maps: Sequence[np.ndarray], titles: Sequence[str], vmax: float | None = None,
            cmap: str = "magma"):
    """Draw maps (as mass shares) on one colour scale; returns the last image (for a colour bar)."""
    shares = [_share(m) for m in maps]
    vmax = vmax if vmax is not None else max((float(s.max()) for s in shares), default=1.0)
    im = None
    for ax, s, t in zip(axes, shares, titles):
        im = ax.imshow(s, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(t, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return im


def training_figure(run, kinds: Sequence[str] | None = None):
    """ERF per snapshot (one row per input kind, one colour scale: mass shares) and the curves."""
    from erf.plot import new_figure

    kinds = list(kinds or next(iter(run.erfs.values())).keys())
    epochs = sorted(run.erfs)
    ncol = max(len(epochs), 3)
    fig = new_figure(2.0 * ncol + 1, 2.1 * len(kinds) + 2.8)
    gs = fig.add_gridspec(len(kinds) + 1, ncol)
    all_maps = [run.erfs[e][k].map for k in kinds for e in epochs]
    vmax = max(float(_share(m).max()) for m in all_maps)
    im = None
    for i, kind in enumerate(kinds):
        axes = [fig.add_subplot(gs[i, j]) for j in range(len(epochs))]
        titles = []
        for e in epochs:
            h = next(h for h in run.history if h["epoch"] == e)
            size = h["erf"][kind]["erf_size"]
            titles.append(f"{kind}, epoch {e}\nERF {size:.1f} px" if size is not None else f"{kind}, epoch {e}")
        im = map_row(fig, axes, [run.erfs[e][kind].map for e in epochs], titles, vmax=vmax)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.6, label="share of the map's mass")
    ep = [h["epoch"] for h in run.history]
    ax = fig.add_subplot(gs[-1, 0])
    ax.plot(ep, [h["train_acc"] for h in run.history], "o-", label="train")
    ax.plot(ep, [h["test_acc"] for h in run.history], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[-1, 1])
    for kind in kinds:
        ax.plot(ep, [h["erf"][kind]["erf_size"] for h in run.history], "o-", label=f"ERF size ({kind})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ERF size (px)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[-1, 2])
    for kind in kinds:
        ax.plot(ep, [h["erf"][kind]["sigma_ratio"] for h in run.history], "o-", label=f"σ row/σ col ({kind})")
    pools = run.history[-1]["pools"]
    for path, p in pools.items():
        if p.get("type") == "dynopool":
            ax.plot(ep, [h["pools"][path]["r"][0] / h["pools"][path]["r"][1] for h in run.history], "x--",
                    label=f"r_h/r_w {path.split('.')[-2]}")
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ratio")
    ax.legend(fontsize=6)
    fig.suptitle(f"{run.config.get('model')} on {run.config.get('task')}: ERF of layer "
                 f"{run.config.get('erf_layer') or 'output'} during training", fontsize=10)
    return fig


def bars(ax, labels: Sequence[str], values: Sequence[float], errors: Sequence[float] | None = None,
         offset: float = 0.0, width: float = 0.8, label: str | None = None, **kw: Any):
    x = np.arange(len(labels)) + offset
    ax.bar(x, values, width=width, yerr=errors, capsize=2, label=label, **kw)
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
