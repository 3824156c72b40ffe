"""The linear-stack studies behind ``erf theory`` and ``erf growth`` (Luo et al., NIPS 2016,
https://arxiv.org/abs/1701.04128): measured ERFs of 3x3 stacks against the multinomial closed
form, and ERF/TRF size against depth with log-log slopes. A notebook gets the CLI's numbers
with one call: ``erf.studies.theory(depth=10)``, ``erf.studies.growth()``.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ._common import StudyResult, loglog_slope, markdown

__all__ = ["theory", "growth", "stack_erf"]


def stack_erf(act: str, n: int, k: int = 3, *, width: int = 4, draws: int = 4, n_inputs: int = 8,
              first_draw: int = 0, side: int | None = None, seed: int = 0, device=None, progress: bool = False,
              reduce: str = "abs"):
    """ERF of the centre unit of an ``n``-layer ``k x k`` stack: ``act="linear"`` uses uniform weights
    (``init="ones"``, ``reduce="mean"``, one input, float64: exact); otherwise random N(0, 1/fan_in)
    weights with that activation and ``reduce`` (``"abs"``: E|g|; ``"square"``: E[g^2], the variance
    map of Luo et al.'s analysis). ``act="random"``: random weights, no activation. The input holds
    the TRF plus a margin."""
    from erf.engine import effective_rf
    from erf.nets import conv_stack

    trf_side = n * (k - 1) + 1
    side = side or trf_side + 2 * max(8, trf_side // 4)
    shape = (1, side, side)
    if act == "uniform" or act == "linear":
        return effective_rf(lambda: conv_stack(n, k), shape, init="ones", reduce="mean", n_inputs=1,
                            dtype=torch.float64, progress=progress, device=device, seed=seed)
    a = None if act == "random" else act
    # sigmoid scales the gradient by ~1/4 per layer: E[g^2] of 40 layers is ~1e-48, below float32's range
    dtype = torch.float64 if act == "sigmoid" and reduce == "square" else torch.float32
    return effective_rf(lambda: conv_stack(n, k, width=width, act=a, in_channels=1), shape, init="normal",
                        reduce=reduce, n_inputs=n_inputs, draws=draws, first_draw=first_draw, progress=progress,
                        device=device, seed=seed, dtype=dtype)


def theory(depth: int = 10, k: int = 3, draws: int = 128, width: int = 16, device=None, seed: int = 0,
           progress: bool = True) -> StudyResult:
    """Linear ``k x k`` stacks against the closed form: uniform weights give the multinomial profile
    exactly; the ``square`` map of random N(0, 1/fan_in) weights has the same shape.

    Table ``cases``: sigma measured (moments) vs theory ``sqrt(n (k^2 - 1) / 12)``, the largest
    residual relative to the theory's peak and, for the random case, the largest |z|.
    """
    from erf import theory as th_
    from erf._stats import t_to_z
    from erf.engine import effective_rf
    from erf.nets import conv_stack

    for name, v in (("depth", depth), ("k", k), ("draws", draws), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    t0 = time.perf_counter()
    n = depth
    trf = n * (k - 1) + 1
    side = trf + 2 * max(4, trf // 4)
    shape = (1, side, side)
    layers = [th_.Layer.uniform(k, ndim=2)] * n
    prof = np.array(th_.binomial_profile(n, k), dtype=np.float64)
    expected = np.outer(prof, prof)
    sigma_th = float(th_.gaussian_sigma(layers)[0])
    common = {"progress": progress, "device": device, "seed": seed}
    uni = effective_rf(lambda: conv_stack(n, k), shape, init="ones", reduce="mean", n_inputs=1,
                       dtype=torch.float64, **common)
    rnd = effective_rf(lambda: conv_stack(n, k, width=width, in_channels=1), shape, init="normal", reduce="square",
                       n_inputs=1, draws=draws, **common)
    c = side // 2
    lo = c - (trf - 1) // 2
    win = (slice(lo, lo + trf), slice(lo, lo + trf))
    cases = []
    for name, res in (("uniform weights, reduce=mean", uni), ("random N(0,1/fan_in), reduce=square", rnd)):
        m = res.map[win]
        total = float(m.sum())
        # clustered error of the shape m / total, the total's uncertainty included (erf._stats)
        meas, se = m / total, res.shape_stderr(win) if hasattr(res, "shape_stderr") else res.stderr[win] / total
        thm = expected / expected.sum()
        resid = meas - thm
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(se > 0, t_to_z(resid / np.where(se > 0, se, 1), max(getattr(res, "stderr_df", 1), 1)), 0.0)
        outside = float(np.abs(res.map).sum() - np.abs(m).sum()) / max(abs(total), 1e-300)
        cases.append({"case": name, "depth": n, "k": k, "trf": trf, "n": res.n,
                      "sigma_measured": float(res.moments.sigma[0]), "sigma_theory": sigma_th,
                      "max_abs_residual": float(np.abs(resid).max() / thm.max()),
                      "max_abs_z": float(np.abs(z).max()) if res.n > 1 else None,
                      "mass_outside_trf": outside, "_meas": meas, "_theory": thm, "_se": se})
    cols = ["case", "depth", "k", "trf", "n", "sigma_measured", "sigma_theory", "max_abs_residual", "max_abs_z"]
    fmts = {"sigma_measured": ".5f", "sigma_theory": ".5f", "max_abs_residual": ".2e", "max_abs_z": ".2f"}

    def figure(result):
        from erf.plot import theory_figure

        return theory_figure(result.data["cases"])

    return StudyResult("theory", {"cases": (cases, cols, fmts)},
                       {"depth": n, "k": k, "draws": draws, "width": width, "seed": seed, "input_shape": list(shape)},
                       time.perf_counter() - t0, figure, data={"cases": cases, "results": {"uniform": uni, "random": rnd}})


def growth(depths: Sequence[int] = (8, 16, 32, 64), acts: Sequence[str] = ("linear", "relu", "tanh"), k: int = 3,
           width: int = 4, draws: int = 4, n_inputs: int = 8, device=None, seed: int = 0,
           progress: bool = True) -> StudyResult:
    """ERF size (Luo et al.: pixels above 4.55 % of the centre value) and TRF size against depth,
    with least-squares log-log slopes (theory for linear stacks: ERF 0.5, TRF 1, ratio -0.5).

    ``acts``: ``"linear"`` (uniform weights, exact) and/or activations of random N(0, 1/fan_in) stacks.
    """
    from erf.nets import ACTIVATIONS

    depths = sorted({int(d) for d in depths})
    if len(depths) < 2 or depths[0] < 1:
        raise ValueError(f"depths needs at least two positive depths, got {list(depths)!r}")
    acts = [a for a in acts]
    if not acts:
        raise ValueError(f"acts needs at least one of linear or an activation name, got {acts!r}")
    for a in acts:
        if a != "linear" and a not in ACTIVATIONS:
            raise ValueError(f"acts: unknown activation {a!r}; valid: linear, {', '.join(sorted(ACTIVATIONS))}")
    t0 = time.perf_counter()
    rows = []
    series: dict[str, dict[str, list[float]]] = {}
    for act in acts:
        s = series.setdefault(act, {"depth": [], "erf": [], "trf": [], "ratio": []})
        for n in depths:
            trf_side = n * (k - 1) + 1
            res = stack_erf(act, n, k, width=width, draws=draws, n_inputs=n_inputs, seed=seed, device=device,
                            progress=progress)
            trf = res.trf
            size = float(trf.size[0]) if trf is not None else float(trf_side)
            erf_size = res.metrics["erf_size"]
            rows.append({"act": act, "depth": n, "trf_size": size, "erf_size": erf_size,
                         "erf_trf_ratio": erf_size / size, "sigma": float(res.moments.sigma[0]), "n": res.n})
            s["depth"].append(n)
            s["erf"].append(erf_size)
            s["trf"].append(size)
            s["ratio"].append(erf_size / size)
    slopes = {}
    for act, s in series.items():
        slopes[act] = {"erf_slope": loglog_slope(s["depth"], s["erf"])[0],
                       "trf_slope": loglog_slope(s["depth"], s["trf"])[0],
                       "ratio_slope": loglog_slope(s["depth"], s["ratio"])[0]}
    slope_rows = [{"act": a, **v} for a, v in slopes.items()]
    fmts = {"erf_size": ".3f", "erf_trf_ratio": ".4f", "sigma": ".3f", "trf_size": ".0f"}

    def figure(result):
        from erf.plot import growth_figure

        return growth_figure(result.data["series"], result.data["slopes"], k=k)

    tables = {"sizes": (rows, ["act", "depth", "trf_size", "erf_size", "erf_trf_ratio", "sigma", "n"], fmts),
              "log-log slopes against depth (theory for linear stacks: ERF 0.5, TRF 1, ratio -0.5)":
              (slope_rows, ["act", "erf_slope", "trf_slope", "ratio_slope"],
               {"erf_slope": ".3f", "trf_slope": ".3f", "ratio_slope": ".3f"})}
    return StudyResult("growth", tables, {"k": k, "depths": depths, "acts": acts, "width": width, "draws": draws,
                                          "n_inputs": n_inputs, "seed": seed},
                       time.perf_counter() - t0, figure, data={"series": series, "slopes": slopes, "rows": rows})


def growth_text(result: StudyResult) -> str:
    """The CLI's text of a growth study: the sizes table, then the slopes."""
    (rows, cols, fmts), (srows, scols, sfmts) = result.tables.values()
    title = list(result.tables)[1]
    return markdown(rows, cols, fmts) + f"\n{title}\n\n" + markdown(srows, scols, sfmts)
