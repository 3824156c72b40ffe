"""The claims of Luo et al., "Understanding the Effective Receptive Field in Deep Convolutional
Neural Networks", NIPS 2016 (https://arxiv.org/abs/1701.04128), checked without their data sets.

Each claim gets a measured number, its standard error and a verdict:
1. ERF size grows as depth^0.5 (uniform, random, random + ReLU/tanh/sigmoid 3x3 stacks at depths
   5, 10, 20, 40); ERF/TRF shrinks as depth^-0.5. Error of a slope: delete-one-group jackknife over
   independent groups of weight draws (uniform weights are exact: the OLS error of the fit).
2. Subsampling (two stride-2 layers) and dilation (dilation 2 in the second half) enlarge the ERF
   against the plain stack of equal depth.
3. Skip connections (residual blocks ``x + conv(relu(conv(x)))``) shrink it.
4. Dropout does not change it.
5. It grows during training (on a generated task: ``pooling_classifier("max")`` on ``shapes``,
   several training seeds; error over seeds).
Sizes follow the paper: ``sqrt`` of the count of pixels above 4.55 % of the centre value.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ._common import StudyResult, jackknife, loglog_slope, mean_se, ratio_se, verdict_greater

__all__ = ["luo2016"]

_THRESHOLD = 1 - 0.9545
#: the random-weight maps are E[g^2] (sum over channels), the variance map that Luo et al. analyse
#: (section 2.2): for linear stacks exactly the multinomial shape. E|g| is its square root in shape
#: and its 4.55 % threshold sits at the TRF's edge for shallow stacks (depth 5: the size saturates).
_REDUCE = "square"


def luo_size(m: np.ndarray) -> float:
    """Luo et al.'s ERF size of a 2-D map around its centre: sqrt(#pixels > 4.55 % of the centre value)."""
    m = np.maximum(np.asarray(m, dtype=np.float64), 0)
    c = m[m.shape[0] // 2, m.shape[1] // 2]
    return float(np.count_nonzero(m > _THRESHOLD * c)) ** 0.5 if c > 0 else float("nan")


def _near(value: float, se: float, expected: float, tol: float = 0.05) -> str:
    """``holds`` within ``max(tol, 2 se)`` of the expected value; ``undetermined`` for a missing number."""
    if not math.isfinite(value):
        return "undetermined"
    return "holds" if abs(value - expected) <= max(tol, 2 * se if math.isfinite(se) else 0.0) else "contradicts"


def _merge(results: Sequence) -> np.ndarray:
    """The mean map over groups of equal sample counts."""
    return np.mean([r.map for r in results], axis=0)


def _grouped(factory, shape, groups: int, draws: int, n_inputs: int, seed: int, train_mode: bool = False):
    from erf.engine import effective_rf

    return [effective_rf(factory, shape, init="normal", reduce=_REDUCE, n_inputs=n_inputs, draws=draws,
                         first_draw=g * draws, seed=seed, progress=False, train_mode=train_mode)
            for g in range(groups)]


def _plain(n: int, width: int, act: str = "relu", dropout: float = 0.0, strides: dict | None = None,
           dilations: dict | None = None) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    cin = 1
    for i in range(n):
        s = (strides or {}).get(i, 1)
        d = (dilations or {}).get(i, 1)
        layers.append((f"conv{i}", nn.Conv2d(cin, width, 3, stride=s, padding=d, dilation=d, bias=False)))
        layers.append((f"act{i}", nn.ReLU() if act == "relu" else nn.Identity()))
        if dropout:
            layers.append((f"drop{i}", nn.Dropout(dropout)))
        cin = width
    return nn.Sequential(OrderedDict(layers))


class _Residual(nn.Module):
    """``x + conv(relu(conv(x)))`` blocks after one stem conv: ``1 + 2 * blocks`` convs."""

    def __init__(self, blocks: int, width: int):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.ReLU(),
                                                  nn.Conv2d(width, width, 3, padding=1, bias=False))
                                    for _ in range(blocks))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return x


def _stack_claims(depths, acts, groups, draws, n_inputs, width, seed, progress):
    from .linear import stack_erf

    rows, claims, series = [], [], {}
    for act in acts:
        per_depth = []
        for n in depths:
            trf = 2 * n + 1
            side = trf + 2 * max(8, trf // 4)
            if act == "uniform":
                res = [stack_erf("linear", n, side=side, seed=seed)]
            else:
                res = [stack_erf(act, n, width=width, draws=draws, n_inputs=n_inputs, first_draw=g * draws,
                                 side=side, seed=seed, reduce=_REDUCE) for g in range(groups)]
            per_depth.append((n, trf, res))
        g_count = 1 if act == "uniform" else groups

        def sizes(gs, per_depth=per_depth):
            return [luo_size(_merge([r[i] for i in gs])) for _, _, r in per_depth]

        full = sizes(list(range(g_count)))
        trfs = [t for _, t, _ in per_depth]
        if act == "uniform":
            s_erf, se_erf = loglog_slope(depths, full)
            s_rat, se_rat = loglog_slope(depths, [a / b for a, b in zip(full, trfs)])
            src = "OLS (exact maps)"
        else:
            s_erf, se_erf = jackknife(lambda gs: loglog_slope(depths, sizes(gs))[0], g_count)
            s_rat, se_rat = jackknife(lambda gs: loglog_slope(depths, [a / b for a, b in zip(sizes(gs), trfs)])[0],
                                      g_count)
            src = f"jackknife over {g_count} groups of {draws} draws x {n_inputs} inputs"
        series[act] = {"depth": list(depths), "erf": full, "trf": trfs,
                       "maps": {n: _merge(r) for n, _, r in per_depth}}
        for (n, t, _), sz in zip(per_depth, full):
            rows.append({"stack": act, "depth": n, "trf": t, "erf_size": sz, "erf_trf": sz / t})
        claims.append({"claim": f"ERF size ~ depth^0.5 ({act} 3x3 stack)", "measured": s_erf, "stderr": se_erf,
                       "expected": 0.5, "verdict": _near(s_erf, se_erf, 0.5),
                       "note": f"log-log slope over depths {list(depths)}; error: {src}"})
        claims.append({"claim": f"ERF/TRF ~ depth^-0.5 ({act})", "measured": s_rat, "stderr": se_rat,
                       "expected": -0.5, "verdict": _near(s_rat, se_rat, -0.5), "note": "log-log slope"})
    return rows, claims, series


def _compare(name_a, make_a, name_b, make_b, side, groups, draws, n_inputs, seed, train_mode_a=False):
    a = _grouped(make_a, (1, side, side), groups, draws, n_inputs, seed, train_mode=train_mode_a)
    b = _grouped(make_b, (1, side, side), groups, draws, n_inputs, seed)

    def ratio(gs):
        return luo_size(_merge([a[i] for i in gs])) / luo_size(_merge([b[i] for i in gs]))

    r, se = jackknife(ratio, groups)
    sa = luo_size(_merge(a))
    sb = luo_size(_merge(b))
    return r, se, sa, sb, _merge(a), _merge(b)


def _training_claim(seeds: int, epochs: int, n_train: int, size: int, progress: bool):
    from erf.nets import pooling_classifier
    from erf.training import train

    before, after, acc, ratios = {"task": [], "gaussian": []}, {"task": [], "gaussian": []}, [], []
    maps = {}
    for s in range(seeds):
        torch.manual_seed(1000 + s)
        model = pooling_classifier("max", 4, depth=2, width=16)
        run = train(model, "shapes", epochs=epochs, erf_every=epochs, n_train=n_train, n_test=128, size=size,
                    lr=3e-3, batch_size=16, seed=s, erf_n=16, progress=progress)
        for kind in ("task", "gaussian"):
            before[kind].append(run.history[0]["erf"][kind]["erf_size"])
            after[kind].append(run.history[-1]["erf"][kind]["erf_size"])
        acc.append(run.history[-1]["test_acc"])
        if s == 0:
            maps = {"before": run.erfs[0]["gaussian"].map, "after": run.erfs[epochs]["gaussian"].map,
                    "before_task": run.erfs[0]["task"].map, "after_task": run.erfs[epochs]["task"].map}
    out = {}
    for kind in ("task", "gaussian"):
        r = [a / b for a, b in zip(after[kind], before[kind]) if a and b]
        out[kind] = (mean_se(r), mean_se(before[kind]), mean_se(after[kind]))
    return out, mean_se(acc), maps


def luo2016(quick: bool = False, depths: Sequence[int] = (5, 10, 20, 40),
            acts: Sequence[str] = ("uniform", "random", "relu", "tanh", "sigmoid"), groups: int | None = None,
            draws: int | None = None, n_inputs: int | None = None, width: int = 8, seeds: int | None = None,
            epochs: int | None = None, seed: int = 0, progress: bool = False) -> StudyResult:
    """Luo et al. (NIPS 2016) claim by claim: measured number, standard error, verdict.

    Args:
        quick: the small variant (tests): fewer draws, 2 training seeds of 3 epochs.
        depths, acts: the stacks of claim 1; groups x draws x n_inputs: weight draws per map, in
            independent groups for the jackknife; width: channels of the random stacks.
        seeds, epochs: training runs of claim 5.
    """
    t0 = time.perf_counter()
    if quick and tuple(acts) == ("uniform", "random", "relu", "tanh", "sigmoid"):
        acts = ("uniform", "random", "relu")
    groups = groups or 4
    draws = draws or (8 if quick else 32)
    n_inputs = n_inputs or 1
    seeds = seeds or (2 if quick else 4)
    epochs = epochs or (2 if quick else 6)
    n_train = 256 if quick else 1024
    depths = tuple(depths)
    rows, claims, series = _stack_claims(depths, acts, groups, draws, n_inputs, width, seed, progress)

    # 2. subsampling and dilation against the plain stack of equal depth (10 ReLU layers)
    depth, side = 10, 97
    comp_rows = []
    maps = {}
    plain = (lambda: _plain(depth, width))
    for name, make, expect in (
            ("subsampling (stride 2 at layers 4 and 7)", lambda: _plain(depth, width, strides={3: 2, 6: 2}), "larger"),
            ("dilation (2 at layers 6-10)", lambda: _plain(depth, width, dilations={i: 2 for i in range(5, 10)}),
             "larger"),
            ("residual blocks x + conv(relu(conv x))", lambda: _Residual((depth - 1) // 2, width), "smaller"),
            ("dropout p=0.3 after every ReLU (train mode)", lambda: _plain(depth, width, dropout=0.3), "unchanged")):
        r, se, sa, sb, ma, mb = _compare(name, make, "plain", plain, side, groups, draws, n_inputs, seed,
                                         train_mode_a=name.startswith("dropout"))
        maps[name.split(" ")[0]] = ma
        maps["plain"] = mb
        comp_rows.append({"network": name, "erf_size": sa, "plain_erf_size": sb, "ratio": r, "ratio_se": se})
        if expect == "larger":
            v = verdict_greater(r, se)
        elif expect == "smaller":
            v = {"holds": "contradicts", "contradicts": "holds"}.get(verdict_greater(r, se), "inconclusive")
        else:
            v = _near(r, se, 1.0)
        verb = {"larger": "enlarges the ERF", "smaller": "shrink the ERF", "unchanged": "leaves the ERF unchanged"}[expect]
        what = name.split(" (")[0].split(" x")[0].split(" p=")[0]
        claims.append({"claim": f"{what} {verb} (vs a plain stack of {depth} layers)", "measured": r,
                       "stderr": se,
                       "expected": {"larger": "> 1", "smaller": "< 1", "unchanged": "1"}[expect], "verdict": v,
                       "note": f"ratio of ERF sizes ({sa:.1f} / {sb:.1f} px), {side}x{side} input, ReLU, jackknife"})

    # 5. before vs after training
    tr, acc, tmaps = _training_claim(seeds, epochs, n_train, 32, progress)
    maps.update({f"train_{k}": v for k, v in tmaps.items()})
    train_rows = []
    for kind, ((r, se), (b, bse), (a, ase)) in tr.items():
        train_rows.append({"inputs": kind, "erf_before": b, "erf_before_se": bse, "erf_after": a,
                           "erf_after_se": ase, "ratio": r, "ratio_se": se, "test_acc": acc[0], "test_acc_se": acc[1]})
        claims.append({"claim": f"the ERF grows during training ({kind} inputs)", "measured": r, "stderr": se,
                       "expected": "> 1", "verdict": verdict_greater(r, se),
                       "note": f"after/before ERF size, pooling_classifier('max', depth 2) on shapes 32 px, {seeds} "
                               f"seeds x {epochs} epochs, test accuracy {acc[0]:.2f} ± {acc[1]:.2f}"})

    def figure(result):
        return _luo_figure(result)

    tables = {"stacks: ERF size against depth": (rows, ["stack", "depth", "trf", "erf_size", "erf_trf"],
                                                 {"erf_size": ".2f", "erf_trf": ".3f"}),
              "architectures against the plain stack": (comp_rows, ["network", "erf_size", "plain_erf_size", "ratio",
                                                                     "ratio_se"],
                                                        {"erf_size": ".2f", "plain_erf_size": ".2f", "ratio": ".3f",
                                                         "ratio_se": ".3f"}),
              "before vs after training": (train_rows, ["inputs", "erf_before", "erf_before_se", "erf_after",
                                                        "erf_after_se", "ratio", "ratio_se", "test_acc"],
                                           {"erf_before": ".2f", "erf_before_se": ".2f", "erf_after": ".2f",
                                            "erf_after_se": ".2f", "ratio": ".3f", "ratio_se": ".3f",
                                            "test_acc": ".3f"})}
    config = {"quick": quick, "depths": list(depths), "acts": list(acts), "groups": groups, "draws": draws,
              "n_inputs": n_inputs, "width": width, "seeds": seeds, "epochs": epochs, "n_train": n_train, "seed": seed}
    return StudyResult("luo2016", tables, config, time.perf_counter() - t0, figure, claims=claims,
                       data={"series": series, "maps": maps})


def _luo_figure(result: StudyResult):
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from erf.plot import new_figure

    from ._figures import map_row

    series, maps = result.data["series"], result.data["maps"]
    fig = new_figure(14, 8.5)
    gs = fig.add_gridspec(2, 6, height_ratios=[1.25, 1])
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    d = np.asarray(next(iter(series.values()))["depth"], float)

    def loglog(ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(d)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("depth (3x3 layers)")

    ax = fig.add_subplot(gs[0, 0:2])
    for i, (act, s) in enumerate(series.items()):
        ax.plot(s["depth"], s["erf"], "o-", color=f"C{i}", label=act)
    ax.plot(d, next(iter(series.values()))["trf"], "k--", label="TRF")
    ax.plot(d, 8.307 * np.sqrt(d / 5), ":", color="0.4", label="∝ depth^0.5")
    loglog(ax)
    ax.set_yticks([5, 10, 20, 40, 80])
    ax.set_ylabel("ERF size (px)")
    ax.set_title("1. ERF size against depth", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[0, 2:4])
    for i, (act, s) in enumerate(series.items()):
        ax.plot(s["depth"], [a / b for a, b in zip(s["erf"], s["trf"])], "o-", color=f"C{i}", label=act)
    loglog(ax)
    ax.set_yticks([0.2, 0.3, 0.5, 0.7, 1.0])
    ax.set_ylabel("ERF / TRF")
    ax.set_title("ERF/TRF shrinks as depth^-0.5", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[0, 4:6])
    claims = [c for c in result.claims if not isinstance(c["expected"], float)]
    y = np.arange(len(claims))
    ax.errorbar([c["measured"] for c in claims], y, xerr=[2 * c["stderr"] for c in claims], fmt="o", capsize=3)
    ax.axvline(1, color="0.5", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{c['claim'].split(' (vs')[0]}\n[{c['verdict']}]" for c in claims], fontsize=7)
    ax.set_xlabel("ratio of ERF sizes (± 2 se)")
    ax.set_title("2-5. against the plain stack / before training", fontsize=9)
    names = [k for k in ("plain", "subsampling", "dilation", "residual") if k in maps]
    axes = [fig.add_subplot(gs[1, j]) for j in range(6)]
    for ax, k in zip(axes, names):  # each on its own scale: the residual map's peak dwarfs the others
        m = maps[k]
        c, h = m.shape[0] // 2, 24
        map_row(fig, [ax], [m[c - h:c + h + 1, c - h:c + h + 1]], [f"{k}, 10 ReLU layers\n(central 49 px)"])
    if "train_before" in maps:
        map_row(fig, axes[4:], [maps["train_before"], maps["train_after"]],
                ["max-pool net before training\n(Gaussian inputs)", "after training\n(same colour scale)"])
    fig.suptitle(f"Luo et al. (2016), claim by claim ({result.seconds:.0f} s)", fontsize=10)
    return fig
