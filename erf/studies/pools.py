"""Pooling modules after training.

- :func:`trained_pools`: ``erf.nets.pooling_classifier(module)`` trained on one generated task with
  the same seeds for every downsampling module: test accuracy, and ERF size, sigma per axis,
  anisotropy and ERF/TRF before and after training (mean ± standard error over seeds).
- :func:`dynopool`: DynOPool (Jang et al., "Pooling Revisited", CVPR 2022,
  https://arxiv.org/abs/2205.15254) trained on ``shapes``, ``stretched``, ``tiled`` and ``zoomed``:
  the learned scale r per axis per layer and the ERF's anisotropy, against max pooling.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ._common import StudyResult, mean_se, pm

__all__ = ["trained_pools", "dynopool"]

_KEYS = ("erf_size", "sigma_row", "sigma_col", "sigma_ratio", "anisotropy", "erf_trf")


def _train_one(pool: str, task: str, seed: int, epochs: int, n_train: int, size: int, depth: int, width: int,
               progress: bool, pool_lr: float | None = None, dynopool_cost: float = 0.0):
    from erf import tasks
    from erf.nets import pooling_classifier
    from erf.training import train

    torch.manual_seed(1000 + seed)
    model = pooling_classifier(pool, tasks.classes_of(task), depth=depth, width=width)
    return train(model, task, epochs=epochs, erf_every=epochs, n_train=n_train, n_test=256, size=size, lr=3e-3,
                 batch_size=16, seed=seed, erf_n=16, pool_lr=pool_lr, dynopool_cost=dynopool_cost, progress=progress)


def _values(h: dict, kind: str) -> dict[str, float | None]:
    e = h["erf"][kind]
    sig = e["sigma"]
    return {"erf_size": e["erf_size"], "sigma_row": sig[0], "sigma_col": sig[-1], "sigma_ratio": e["sigma_ratio"],
            "anisotropy": e["anisotropy"], "erf_trf": e["erf_trf"]}


def _summarise(runs, kind: str) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for when, idx in (("before", 0), ("after", -1)):
        vals = [_values(r.history[idx], kind) for r in runs]
        for k in _KEYS:
            out[f"{k}_{when}"] = mean_se([v[k] for v in vals])
    out["test_acc"] = mean_se([r.history[-1]["test_acc"] for r in runs])
    out["growth"] = mean_se([r.history[-1]["erf"][kind]["erf_size"] / r.history[0]["erf"][kind]["erf_size"]
                             for r in runs if r.history[0]["erf"][kind]["erf_size"]
                             and r.history[-1]["erf"][kind]["erf_size"]])
    return out


def _learned(runs) -> str:
    """A short text of the learned pooling parameters (mean over seeds, first layer and last)."""
    pools = [r.history[-1]["pools"] for r in runs]
    if not pools or not pools[0]:
        return "—"
    parts = []
    for path in pools[0]:
        p0 = pools[0][path]
        layer = path.split(".")[-2] if "." in path else path
        if p0["type"] == "dynopool":
            r = np.mean([p[path]["r"] for p in pools], axis=0)
            parts.append(f"{layer} r {r[0]:.2f}x{r[1]:.2f}")
        elif p0["type"] == "gem":
            parts.append(f"{layer} p {np.mean([p[path]['p'] for p in pools]):.2f}")
        elif p0["type"] == "lip":
            parts.append(f"{layer} mean abs w {np.mean([p[path]['logit_weight_absmean'] for p in pools]):.3f}")
        else:
            keys = [k for k in p0 if k.endswith("_mean")][:1]
            for k in keys:
                parts.append(f"{layer} {k[:-5]} {np.mean([p[path][k] for p in pools]):.2f}")
    return "; ".join(parts)


def _mean_map(runs, epoch_index: int, kind: str) -> np.ndarray:
    maps = []
    for r in runs:
        e = sorted(r.erfs)[epoch_index]
        m = np.maximum(r.erfs[e][kind].map, 0)
        maps.append(m / m.sum() if m.sum() > 0 else m)
    return np.mean(maps, axis=0)


def trained_pools(quick: bool = False, pools: Sequence[str] | None = None, task: str = "shapes",
                  seeds: int | None = None, epochs: int | None = None, n_train: int | None = None, size: int = 32,
                  depth: int = 2, width: int = 16, seed: int = 0, progress: bool = False) -> StudyResult:
    """Every downsampling module in ``pooling_classifier`` trained on ``task`` with the same seeds.

    Rows: test accuracy, ERF size / sigma per axis / anisotropy / ERF-TRF before and after
    training, mean ± standard error over ``seeds`` runs; ERF on Gaussian inputs (as the
    initialisation comparison of ``erf compare``) and on held-out task images.
    """
    t0 = time.perf_counter()
    pools = list(pools or (("max", "avg", "gem") if quick else
                           ("max", "avg", "softpool", "gem", "lip", "gated", "dynopool", "strided")))
    seeds = seeds or (2 if quick else 3)
    epochs = epochs or (2 if quick else 5)
    n_train = n_train or (256 if quick else 768)
    runs: dict[str, list] = {}
    for p in pools:
        runs[p] = [_train_one(p, task, seed + s, epochs, n_train, size, depth, width, progress,
                              pool_lr=0.01 if p == "dynopool" else None) for s in range(seeds)]
    tables = {}
    data_rows = []
    for kind in ("gaussian", "task"):
        disp = []
        for p in pools:
            sm = _summarise(runs[p], kind)
            row = {"module": p, "inputs": kind, **{k: v[0] for k, v in sm.items()},
                   **{f"{k}_se": v[1] for k, v in sm.items()}, "learned": _learned(runs[p])}
            data_rows.append(row)
            disp.append({"module": p, "test acc": pm(*sm["test_acc"]),
                         "ERF before": pm(*sm["erf_size_before"], ".1f"), "ERF after": pm(*sm["erf_size_after"], ".1f"),
                         "after/before": pm(*sm["growth"]),
                         "σ row x col after": f"{sm['sigma_row_after'][0]:.2f} x {sm['sigma_col_after'][0]:.2f}",
                         "anisotropy before": pm(*sm["anisotropy_before"], ".2f"),
                         "anisotropy after": pm(*sm["anisotropy_after"], ".2f"),
                         "ERF/TRF before": pm(*sm["erf_trf_before"]), "ERF/TRF after": pm(*sm["erf_trf_after"]),
                         "learned": _learned(runs[p]) if kind == "gaussian" else ""})
        cols = list(disp[0].keys())
        if kind == "task":
            cols.remove("learned")
        tables[f"ERF on {'Gaussian inputs' if kind == 'gaussian' else 'held-out task images'}"] = (disp, cols, {})
    maps = {p: {"before": _mean_map(runs[p], 0, "gaussian"), "after": _mean_map(runs[p], -1, "gaussian")}
            for p in pools}
    config = {"quick": quick, "pools": pools, "task": task, "seeds": seeds, "epochs": epochs, "n_train": n_train,
              "size": size, "depth": depth, "width": width, "seed": seed, "model": "pooling_classifier"}
    notes = [f"pooling_classifier(module, depth={depth}, width={width}) (BatchNorm after each conv) on {task} "
             f"{size} px, {n_train} training images, {epochs} epochs, Adam lr 3e-3, batch 16, seeds {seed}..{seed + seeds - 1}; "
             "ERF of the centre unit of `features`, reduce=abs, 16 inputs; mean ± standard error over seeds."]
    tables["_data"] = (data_rows, list(data_rows[0].keys()), {})
    return StudyResult("trained-pools", tables, config, time.perf_counter() - t0, _pools_figure,
                       data={"maps": maps, "rows": data_rows}, notes=notes)


def _pools_figure(result: StudyResult):
    from erf.plot import new_figure

    from ._figures import bars, map_row

    maps = result.data["maps"]
    pools = list(maps)
    fig = new_figure(max(8.0, 1.7 * len(pools)), 7.4)
    gs = fig.add_gridspec(3, len(pools))
    allm = [maps[p][w] for p in pools for w in ("before", "after")]
    vmax = max(float(m.max()) for m in allm)
    im = map_row(fig, [fig.add_subplot(gs[0, j]) for j in range(len(pools))], [maps[p]["before"] for p in pools],
                 [f"{p}: init" for p in pools], vmax=vmax)
    map_row(fig, [fig.add_subplot(gs[1, j]) for j in range(len(pools))], [maps[p]["after"] for p in pools],
            [f"{p}: trained" for p in pools], vmax=vmax)
    fig.colorbar(im, ax=fig.axes, shrink=0.5, label="share of mass (mean over seeds)")
    rows = [r for r in result.data["rows"] if r["inputs"] == "gaussian"]
    half = max(1, len(pools) // 2)
    ax = fig.add_subplot(gs[2, :half])
    bars(ax, pools, [r["erf_size_before"] for r in rows], [r["erf_size_before_se"] for r in rows], -0.2, 0.4,
         label="before")
    bars(ax, pools, [r["erf_size_after"] for r in rows], [r["erf_size_after_se"] for r in rows], 0.2, 0.4,
         label="after")
    ax.set_ylabel("ERF size (px), Gaussian inputs")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[2, half:])
    bars(ax, pools, [r["test_acc"] for r in rows], [r["test_acc_se"] for r in rows], color="C2")
    ax.set_ylabel("test accuracy")
    cfg = result.config
    fig.suptitle(f"pooling_classifier trained on {cfg['task']} ({cfg['seeds']} seeds x {cfg['epochs']} epochs): "
                 f"ERF before and after training ({result.seconds:.0f} s)", fontsize=10)
    return fig


def dynopool(quick: bool = False, tasks: Sequence[str] = ("shapes", "stretched", "tiled", "zoomed"),
             seeds: int | None = None, epochs: int | None = None, n_train: int | None = None, size: int = 32,
             depth: int = 2, width: int = 16, pool_lr: float = 0.01, dynopool_cost: float = 0.0, seed: int = 0,
             progress: bool = False) -> StudyResult:
    """DynOPool against max pooling on the DynOPool paper's task variants: the learned r per axis
    per layer, and the ERF anisotropy (sigma_row / sigma_col of the moments; fit anisotropy)."""
    t0 = time.perf_counter()
    tasks = list(tasks)
    seeds = seeds or (1 if quick else 2)
    epochs = epochs or (2 if quick else 5)
    n_train = n_train or (256 if quick else 768)
    if quick:
        tasks = tasks[:2]
    runs = {(t, p): [_train_one(p, t, seed + s, epochs, n_train, size, depth, width, progress,
                                pool_lr=pool_lr if p == "dynopool" else None,
                                dynopool_cost=dynopool_cost if p == "dynopool" else 0.0) for s in range(seeds)]
            for t in tasks for p in ("dynopool", "max")}
    disp, data_rows = [], []
    for t in tasks:
        for p in ("dynopool", "max"):
            rs = runs[(t, p)]
            acc = mean_se([r.history[-1]["test_acc"] for r in rs])
            row = {"task": t, "pool": p, "test_acc": acc[0], "test_acc_se": acc[1]}
            rtext = []
            if p == "dynopool":
                for path in rs[0].history[-1]["pools"]:
                    r_all = np.array([r.history[-1]["pools"][path]["r"] for r in rs])
                    layer = path.split(".")[-2]
                    row[f"{layer}_r_h"], row[f"{layer}_r_w"] = float(r_all[:, 0].mean()), float(r_all[:, 1].mean())
                    rtext.append(f"{r_all[:, 0].mean():.3f} x {r_all[:, 1].mean():.3f}")
            for kind in ("task", "gaussian"):
                for when, idx in (("init", 0), ("trained", -1)):
                    sr = mean_se([r.history[idx]["erf"][kind]["sigma_ratio"] for r in rs])
                    an = mean_se([r.history[idx]["erf"][kind]["anisotropy"] for r in rs])
                    sz = mean_se([r.history[idx]["erf"][kind]["erf_size"] for r in rs])
                    row.update({f"sigma_ratio_{kind}_{when}": sr[0], f"sigma_ratio_{kind}_{when}_se": sr[1],
                                f"anisotropy_{kind}_{when}": an[0], f"erf_size_{kind}_{when}": sz[0]})
            data_rows.append(row)
            disp.append({"task": t, "pool": p, "test acc": pm(acc[0], acc[1]),
                         "learned r (h x w) per layer": "; ".join(rtext) or "— (fixed 0.5 x 0.5)",
                         "σrow/σcol trained (task imgs)": pm(row["sigma_ratio_task_trained"],
                                                             row["sigma_ratio_task_trained_se"]),
                         "σrow/σcol trained (Gaussian)": pm(row["sigma_ratio_gaussian_trained"],
                                                            row["sigma_ratio_gaussian_trained_se"]),
                         "σrow/σcol init (Gaussian)": pm(row["sigma_ratio_gaussian_init"],
                                                         row["sigma_ratio_gaussian_init_se"]),
                         "ERF size trained (Gaussian)": f"{row['erf_size_gaussian_trained']:.1f}"})
    history = {t: [[h["pools"] for h in r.history] for r in runs[(t, "dynopool")]] for t in tasks}
    maps = {(t, p): _mean_map(runs[(t, p)], -1, "task") for t in tasks for p in ("dynopool", "max")}
    config = {"quick": quick, "tasks": tasks, "seeds": seeds, "epochs": epochs, "n_train": n_train, "size": size,
              "depth": depth, "width": width, "pool_lr": pool_lr, "dynopool_cost": dynopool_cost, "seed": seed}
    notes = [f"pooling_classifier(depth={depth}, width={width}) with DynOPool (r initial 0.5 x 0.5, alpha = 1/r and "
             f"delta learned at lr {pool_lr}) or max pooling, {n_train} images of {size} px, {epochs} epochs, "
             f"{seeds} seed(s); σrow/σcol > 1: the ERF is taller than wide. DynOPool paper: on vertically "
             "stretched images the learned field should stretch vertically (r_h < r_w)."]
    tables = {"learned r and ERF anisotropy": (disp, list(disp[0].keys()), {}),
              "_data": (data_rows, list(data_rows[0].keys()), {})}
    return StudyResult("dynopool", tables, config, time.perf_counter() - t0, _dynopool_figure,
                       data={"maps": maps, "rows": data_rows, "r_history": history}, notes=notes)


def _dynopool_figure(result: StudyResult):
    from erf.plot import new_figure

    from ._figures import map_row

    tasks = result.config["tasks"]
    maps = result.data["maps"]
    fig = new_figure(2.3 * len(tasks) + 3.5, 7.2)
    gs = fig.add_gridspec(3, len(tasks) + 1)
    vmax = max(float(m.max()) for m in maps.values())
    im = None
    for i, p in enumerate(("dynopool", "max")):
        im = map_row(fig, [fig.add_subplot(gs[i, j]) for j in range(len(tasks))], [maps[(t, p)] for t in tasks],
                     [f"{p} on {t} (trained)" for t in tasks], vmax=vmax)
    fig.colorbar(im, ax=fig.axes[:2 * len(tasks)], shrink=0.5, label="share of mass (task images)")
    rows = {(r["task"], r["pool"]): r for r in result.data["rows"]}
    ax = fig.add_subplot(gs[2, :len(tasks) // 2 + 1])
    x = np.arange(len(tasks))
    for off, p in ((-0.2, "dynopool"), (0.2, "max")):
        ax.bar(x + off, [rows[(t, p)]["sigma_ratio_task_trained"] for t in tasks], 0.4,
               yerr=[rows[(t, p)]["sigma_ratio_task_trained_se"] or 0 for t in tasks], capsize=2, label=p)
    ax.axhline(1, color="0.5", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, fontsize=8)
    ax.set_ylabel("σ row / σ col (trained)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[2, len(tasks) // 2 + 1:])
    for i, t in enumerate(tasks):
        for seed_hist in result.data["r_history"][t][:1]:
            last = seed_hist[-1]
            layers = list(last)
            ax.plot(range(len(layers)), [last[pth]["r"][0] for pth in layers], "o-", color=f"C{i}", label=f"{t} r_h")
            ax.plot(range(len(layers)), [last[pth]["r"][1] for pth in layers], "s--", color=f"C{i}", label=f"{t} r_w")
    ax.axhline(0.5, color="0.5", lw=0.8)
    ax.set_xlabel("pooling layer")
    ax.set_ylabel("learned r (init 0.5)")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"DynOPool against max pooling: learned scale r and ERF anisotropy ({result.seconds:.0f} s)",
                 fontsize=10)
    return fig
