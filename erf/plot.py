"""Figures of ERF maps: heatmaps with the TRF box and the fitted Gaussian's 1- and 2-sigma ellipses.

matplotlib is imported lazily (inside the functions), so ``import erf`` never pulls it in.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _axes(ax):
    if ax is None:  # constrained layout: ``r.plot()`` then ``savefig`` keeps the colour-bar label
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5.2, 4.4), layout="constrained")
    return ax


def ellipse_points(center: np.ndarray, cov: np.ndarray, k: float, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Points (row, col) of the k-sigma ellipse of a 2-D Gaussian with covariance ``cov`` (array order)."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=float))
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)])
    pts = vecs @ (np.sqrt(np.maximum(vals, 0))[:, None] * circle) * k
    return pts[0] + center[0], pts[1] + center[1]


def draw_trf_box(ax, trf: Any, shape: tuple[int, ...], color: str = "white", annotate: bool = True) -> None:
    """The TRF region of the unit as a dashed rectangle, clipped to the image.

    Sides of the region beyond the input are drawn just inside the border (so the box never
    vanishes on the frame) and, with ``annotate``, a note says the TRF exceeds the input.
    """
    from matplotlib.patches import Rectangle

    (r0, r1), (c0, c1) = trf.region[0], trf.region[1]
    inset = 0.004 * max(shape[0], shape[1]) + 0.5  # a clipped side sits just inside the frame
    top = r0 - 0.5 if r0 >= 0 else -0.5 + inset
    bottom = r1 + 0.5 if r1 <= shape[0] - 1 else shape[0] - 0.5 - inset
    left = c0 - 0.5 if c0 >= 0 else -0.5 + inset
    right = c1 + 0.5 if c1 <= shape[1] - 1 else shape[1] - 0.5 - inset
    clipped = r0 < 0 or c0 < 0 or r1 > shape[0] - 1 or c1 > shape[1] - 1
    label = f"TRF {trf.size[0]}x{trf.size[1]}" + (" (clipped: larger than the input)" if clipped else "")
    ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, ec=color, lw=1.4 if clipped else 1.2,
                           ls=(0, (4, 3)) if clipped else "--", label=label))
    if clipped and annotate:
        ax.annotate(f"TRF {trf.size[0]}x{trf.size[1]} > input {shape[0]}x{shape[1]}", xy=(0.02, 0.98),
                    xycoords="axes fraction", ha="left", va="top", fontsize=7, color="black",
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.75})


def draw_fit_ellipses(ax, fit: Any, color: str = "cyan") -> None:
    """1- and 2-sigma ellipses of a :class:`erf.fit.GaussianFit`."""
    sig = "/".join(f"{s:.2f}" for s in np.asarray(fit.sigma, float))
    for k, ls in ((1, "-"), (2, ":")):
        rows, cols = ellipse_points(np.asarray(fit.center), np.asarray(fit.cov), k)
        ax.plot(cols, rows, color=color, lw=1.2, ls=ls,
                label=f"Gaussian fit {k}σ (σ fit {sig})" if k == 1 else f"Gaussian fit {k}σ")


def result_title(result) -> str:
    """The default figure title of a result: layer, unit, n, reduce and sigma (moments)."""
    parts = [result.layer or "output", f"unit {tuple(result.unit)}", f"n={result.n}"]
    try:
        m = result.moments
        parts.append("σ moments " + "/".join(f"{s:.2f}" for s in m.sigma))
    except Exception:  # a degenerate map still gets a heatmap
        pass
    try:
        met = result.metrics
        parts.append(f"ERF {met['erf_size']:.1f}")
        ratio = met.get("erf_trf_ratio")
        if isinstance(ratio, dict) and ratio.get("overall") is not None:
            parts.append(f"ERF/TRF {ratio['overall']:.2f}")
    except Exception:
        pass
    return "  ".join(parts)


LOG_FLOOR = 1e-4  # the log view shows four decades below the peak


def _protocol_name(result) -> str | None:
    proto = (getattr(result, "config", None) or {}).get("protocol")
    return proto.get("name") if isinstance(proto, dict) else proto


def _view(data: np.ndarray, log: bool, protocol: str | None, vmax: float | None):
    """``(shown, imshow kwargs, colour-bar label)`` of a non-negative 2-D map.

    ``log``: map / peak on a logarithmic colour scale, ticks in decades, values below
    1e-4 of the peak shown at the floor. ``protocol="replknet"``: RepLKNet's log10(map + 1) / max
    in its colour map RdYlGn; ``"openerf"``: the map normalised to sum 1. Otherwise the map.
    """
    from matplotlib.colors import LogNorm

    if log:
        peak = float(data.max()) or 1.0
        rel = np.maximum(data / peak, LOG_FLOOR)
        return rel, {"cmap": "magma", "norm": LogNorm(vmin=LOG_FLOOR, vmax=1.0)}, \
            "contribution / peak (log scale, decades)"
    if protocol == "replknet" and data.max() > 0:
        from erf.protocols import replknet_scaled

        return replknet_scaled(data), {"cmap": "RdYlGn", "vmin": 0.0, "vmax": 1.0}, "log10(map + 1) / max (RepLKNet)"
    if protocol == "openerf" and data.sum() > 0:
        return data / data.sum(), {"cmap": "viridis", "vmin": 0.0, "vmax": vmax}, "share of the map (sum 1, OpenERF)"
    return data, {"cmap": "magma", "vmin": 0.0, "vmax": vmax}, "mean contribution"


def plot_result(result, ax=None, log: bool = False, show_trf: bool = True, show_fit: bool = True,
                title: str | None = None, colorbar: bool = True, vmax: float | None = None,
                protocol: str | None = None):
    """Plot an :class:`erf.ERFResult`: heatmap (2-D), profile (1-D) or centre slice (3-D).

    ``log=True`` shows map / peak on a log colour scale in decades (down to 1e-4); a result made
    with ``protocol="replknet"`` (or ``protocol=`` given here) is shown as that protocol shows it
    (RepLKNet: log10(map + 1) / max in RdYlGn). The title's σ is the moments' (labelled); the
    ellipses and their legend are the Gaussian fit's.
    """
    ax = _axes(ax)
    data = result.nonnegative_map
    if data.ndim == 1:
        x = np.arange(data.size)
        ax.plot(x, data, "k.-", lw=1, label="ERF")
        fit = result.fit if show_fit else None
        if fit is not None:
            s = float(np.sqrt(np.asarray(fit.cov).reshape(-1)[0]))
            c = float(np.asarray(fit.center).reshape(-1)[0])
            ax.plot(x, fit.amplitude * np.exp(-0.5 * ((x - c) / s) ** 2), "c-", label="Gaussian fit")
        ax.set_xlabel("input position")
        ax.set_ylabel("mean |gradient|" if result.config.get("reduce") != "square" else "mean gradient²")
        ax.legend(fontsize=8)
        ax.set_title(title or result_title(result), fontsize=9)
        return ax
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
    shown, kw, label = _view(data, log, _protocol_name(result) if protocol is None else protocol or None, vmax)
    im = ax.imshow(shown, interpolation="nearest", **kw)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(label, fontsize=8)
    ax.set_xlim(-0.5, data.shape[1] - 0.5)
    ax.set_ylim(data.shape[0] - 0.5, -0.5)
    if show_trf and result.ndim_spatial == 2:
        try:
            trf = result.trf
        except Exception:
            trf = None
        if trf is not None and not getattr(trf, "is_global", False):
            draw_trf_box(ax, trf, data.shape)
    if show_fit and result.ndim_spatial == 2:
        fit = result.fit
        if fit is not None:
            draw_fit_ellipses(ax, fit)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(title or result_title(result), fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # below the axes: never over the map
        leg = ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False,
                        handlelength=2.2, columnspacing=1.0)
        for h in getattr(leg, "legend_handles", []):  # the white TRF box would vanish on the white page
            if hasattr(h, "set_edgecolor") and not hasattr(h, "get_xdata"):
                h.set_edgecolor("0.2")
    return ax


# --------------------------------------------------------------------------- figure files
def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` not managed by pyplot (no GUI backend; Agg when saved)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path, dpi: int = 100) -> str:
    """Save ``fig`` atomically (temp file + rename); the format follows the extension (png/pdf/svg)."""
    import os

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from erf._io import atomic_write

    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if fmt not in ("png", "pdf", "svg"):
        raise ValueError(f"figure format must be png, pdf or svg, got {fmt!r} (from {path!r})")
    if not isinstance(fig.canvas, FigureCanvasAgg) and fmt == "png":
        FigureCanvasAgg(fig)
    meta = {"Software": None} if fmt == "png" else None
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi, metadata=meta))


def _safe_trf(result):
    try:
        return result.trf
    except Exception:  # an analyser failure never stops a figure
        return None


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to a figure ``width_in`` inches wide (about 0.55 fontsize-em per character)."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


SHARED_DECADES_FLOOR = 1e-3  # the shared grid scale spans three decades below the largest share


def comparison_grid(comp, same_scale: bool = True, cols: int | None = None):
    """Grid of ERF heatmaps, one per module (or model) of a :class:`erf.compare.Comparison`.

    Each panel shows the unit's map on the input grid, its TRF as a dashed white box (clipped at
    the border when larger than the input, and said so in the panel title) and the 2-sigma
    ellipse of the fitted Gaussian (cyan).
    ``same_scale=True`` (default): every map divided by its total (share of the map's mass per
    pixel) on ONE logarithmic colour scale (three decades below the largest share) with one labelled
    colour bar, so the panels are comparable and a concentrated map does not blacken the wide ones.
    ``same_scale=False``: each panel on its own scale with its own labelled colour bar.
    Titles and the caption are wrapped to the figure's width: nothing is clipped at any number
    of panels.
    """
    import math as _m

    from matplotlib.colors import LogNorm

    names = list(comp.results)
    n = len(names)
    cols = cols or min(6, max(1, _m.ceil(_m.sqrt(n * 1.3))))
    rows = _m.ceil(n / cols)
    width = max(2.5 * cols + (0.9 if same_scale else 0.6 * cols), 6.4)
    opts = comp.options
    shape = "x".join(str(s) for s in opts.get("input_shape", []))
    title = _wrap(opts.get("caption") or (  # compare(models=...) writes its own
        f"ERF of the centre unit of pooling_net(module), input {shape}, {opts.get('init')} init, "
        f"reduce={opts.get('reduce')}, {opts.get('groups', 0) * opts.get('draws', 0)} weight draws x "
        f"{opts.get('n_inputs')} inputs"), width, 10)
    note = ("dashed box: TRF (clipped at the border when larger than the input); cyan: 2σ ellipse of the "
            "fitted Gaussian; " + ("one colour scale for all panels" if same_scale else "each panel on its own scale"))
    first = comp.results[names[0]] if names else None
    cap = provenance_caption(getattr(first, "meta", {}).get("provenance") if first is not None else None, width=10**6)
    caption = _wrap(note + ("\n" + cap if cap else ""), width, 7.5)
    text_in = (title.count("\n") + 1) * 10 / 72 * 1.3 + (caption.count("\n") + 1) * 7.5 / 72 * 1.3
    fig = new_figure(width, 2.75 * rows + text_in + 0.3)  # room for the wrapped title and caption
    axes = fig.subplots(rows, cols, squeeze=False)
    maps = {k: comp.results[k].nonnegative_map for k in names}
    if same_scale:
        maps = {k: m / (m.sum() or 1.0) for k, m in maps.items()}
        vmax = max(float(m.max()) for m in maps.values()) or 1.0
    row_of = {r.get("pool", r.get("model")): r for r in comp.rows}
    im = None
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        res, data = comp.results[name], maps[name]
        if same_scale:  # one logarithmic scale: a concentrated map does not blacken the wide ones
            im = ax.imshow(np.maximum(data, vmax * SHARED_DECADES_FLOOR), cmap="magma", interpolation="nearest",
                           norm=LogNorm(vmin=vmax * SHARED_DECADES_FLOOR, vmax=vmax))
        else:
            im = ax.imshow(data, cmap="magma", interpolation="nearest", vmin=0, vmax=float(data.max()) or 1.0)
        trf = _safe_trf(res)
        if trf is not None and not getattr(trf, "is_global", False):
            draw_trf_box(ax, trf, data.shape, annotate=False)
        fit = res.fit
        if fit is not None:
            rr, cc = ellipse_points(np.asarray(fit.center), np.asarray(fit.cov), 2)
            ax.plot(cc, rr, color="cyan", lw=1.0)
        ax.set_xlim(-0.5, data.shape[1] - 0.5)
        ax.set_ylim(data.shape[0] - 0.5, -0.5)
        row = row_of.get(name, {})
        ratio = row.get("erf_trf_ratio")
        size = row.get("erf_size")
        sub = f"ERF {size:.0f} px" if isinstance(size, (int, float)) and np.isfinite(size) else "ERF —"
        if ratio is not None and np.isfinite(ratio):
            sub += f", ERF/TRF {ratio:.2f}"
        if row.get("trf_global"):
            sub += "\n(global unit)"
        elif trf is not None and any(s > n_ for s, n_ in zip(trf.size, data.shape)):
            sub += "\n(TRF larger than the input)"
        ax.set_title(_wrap(f"{name}\n{sub}", 2.4 if same_scale else 2.0, 8.5), fontsize=8.5)
        ax.tick_params(labelsize=6.5)
        if not same_scale:
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=6)
            cb.formatter.set_powerlimits((-2, 3))
            cb.ax.yaxis.get_offset_text().set_fontsize(6)
            cb.set_label("mean contribution", fontsize=6.5)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    if same_scale and im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.025 if cols > 2 else 0.05, pad=0.01)
        cb.set_label("share of the map's mass per pixel (each map sums to 1; log scale)", fontsize=8.5)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel(caption, fontsize=7.5, color="0.3")
    return fig


_KIND_COLORS = {"fixed": "#4c72b0", "data-dependent": "#dd8452", "learnable": "#55a868", "stochastic": "#c44e52"}


def ratio_bars(comp):
    """Horizontal bars of ERF size / TRF side per module (sorted), with standard-error whiskers.

    Bars are coloured by the module's kind (fixed, data-dependent, learnable, stochastic);
    hatched bars are modules whose unit sees the whole input (ratio to the local TRF, or to the
    input for spectral pooling).
    """
    from matplotlib.patches import Patch

    rows = [r for r in comp.rows if r.get("erf_trf_ratio") is not None and np.isfinite(r["erf_trf_ratio"])]
    rows.sort(key=lambda r: r["erf_trf_ratio"])
    fig = new_figure(7.4, 0.26 * len(rows) + 1.4)
    ax = fig.subplots()
    y = np.arange(len(rows))
    vals = [r["erf_trf_ratio"] for r in rows]
    errs = [r["erf_trf_ratio_se"] if np.isfinite(r["erf_trf_ratio_se"]) else 0.0 for r in rows]
    bars = ax.barh(y, vals, xerr=errs, color=[_KIND_COLORS.get(r["kind"], "grey") for r in rows],
                   error_kw={"elinewidth": 1, "capsize": 2}, height=0.7)
    for b, r in zip(bars, rows):
        if r.get("trf_global"):
            b.set_hatch("//")
            b.set_edgecolor("white")
    ax.set_yticks(y, [f"{r['pool']} (TRF {r['trf_size']:.0f})" for r in rows], fontsize=8)
    ax.set_xlabel("ERF size / TRF side (Luo et al. size: pixels above 4.55 % of the centre)", fontsize=8.5)
    ax.set_xlim(0, max(v + e for v, e in zip(vals, errs)) * 1.12 if vals else 1)
    ax.grid(axis="x", alpha=0.3)
    kinds = {r.get("kind") for r in rows}  # only the kinds shown; the legend sits beside the bars
    handles = [Patch(color=c, label=k) for k, c in _KIND_COLORS.items() if k in kinds]
    if any(r.get("trf_global") for r in rows):
        handles.append(Patch(facecolor="lightgrey", hatch="//", edgecolor="0.35", label="global unit"))
    if comp.options.get("models"):  # a comparison of models: no pooling kinds
        ax.set_title("ERF/TRF ratio per model (± standard error)", fontsize=10)
        return fig
    if handles:
        ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  frameon=False, title="kind", title_fontsize=7.5)
    ax.set_title("ERF/TRF ratio per pooling module (± standard error)", fontsize=10)
    return fig


def plot_diff(d, ax=None, zmax: float = 5.0):
    """z-score map of an :class:`erf.compare.ERFDiff` (red: a > b, blue: a < b), clipped at +-zmax."""
    ax = _axes(ax)
    z = np.clip(np.nan_to_num(d.z, posinf=zmax, neginf=-zmax), -zmax, zmax)
    if z.ndim == 1:
        ax.plot(z, "k.-")
        ax.set_ylabel("z = (a - b) / se")
        return ax
    if z.ndim == 3:
        z = z[z.shape[0] // 2]
    im = ax.imshow(z, cmap="RdBu_r", vmin=-zmax, vmax=zmax, interpolation="nearest")
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("z = (a - b) / sqrt(se_a² + se_b²)", fontsize=8)
    ax.set_title(f"difference a - b: max |z| {d.max_abs_z:.1f}, |z| > 3 at {100 * d.frac_significant:.1f} %",
                 fontsize=9)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    return ax


def _gauss_profile(fit, axis: int, at: float, n: int) -> np.ndarray:
    """The fitted 2-D Gaussian along one row (axis=1) or column (axis=0) at position ``at``."""
    x = np.arange(n, dtype=float)
    mu, cov = np.asarray(fit.center, float), np.asarray(fit.cov, float)
    P = np.linalg.inv(cov)
    pts = np.zeros((n, 2))
    pts[:, axis] = x
    pts[:, 1 - axis] = at
    dx = pts - mu
    return fit.amplitude * np.exp(-0.5 * np.einsum("ni,ij,nj->n", dx, P, dx))


def map_figure(result, title: str | None = None):
    """Four panels of one 2-D ERF: linear heatmap, log heatmap (TRF box, fitted 1σ/2σ ellipses),
    and the row and column through the unit's TRF centre against the fitted Gaussian.

    The log view is map / peak on a logarithmic colour scale (ticks in decades, down to 1e-4);
    the caption names the inputs, weights, protocol and versions (``meta["provenance"]``).
    """
    data = result.nonnegative_map
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
    fig = new_figure(10.5, 8.6)
    axes = fig.subplots(2, 2)
    proto = _protocol_name(result)
    first = {"replknet": "RepLKNet's view: log10(map + 1) / max", "openerf": "OpenERF's view: map / sum"}.get(
        proto, "linear scale")
    plot_result(result, ax=axes[0, 0], title=first)
    plot_result(result, ax=axes[0, 1], log=True, title="log scale: decades below the peak")
    trf = _safe_trf(result)
    fit = result.fit
    if trf is not None and all(0 <= c <= n - 1 for c, n in zip(trf.center, data.shape)):
        centre = [float(c) for c in trf.center]
    else:
        centre = [n // 2 for n in data.shape]
    for ax, axis, name in ((axes[1, 0], 1, "row"), (axes[1, 1], 0, "column")):
        other = centre[1 - axis]
        idx = int(np.floor(other + 0.5))
        prof = data[idx, :] if axis == 1 else data[:, idx]
        x = np.arange(prof.size)
        ax.plot(x, prof, "k.-", lw=0.8, ms=3, label="measured")
        if fit is not None:
            ax.plot(x, _gauss_profile(fit, axis, idx, prof.size), "c-", lw=1.5, label="fitted Gaussian")
        if trf is not None and not getattr(trf, "is_global", False):
            lo, hi = trf.region[axis]
            ax.axvspan(lo - 0.5, hi + 0.5, color="0.85", zorder=0, label=f"TRF ({trf.size[axis]} px)")
        ax.set_xlabel("column" if axis == 1 else "row")
        ax.set_ylabel("mean contribution")
        ax.set_title(f"centre {name} ({'row' if axis == 1 else 'column'} {idx})", fontsize=9)
        ax.legend(fontsize=7)
        ax.set_xlim(-0.5, prof.size - 0.5)
    fig.suptitle(title or result_title(result), fontsize=10)
    caption = provenance_caption(getattr(result, "meta", {}).get("provenance"), width=140)
    caption = ("σ moments: from second moments of the map; ellipses and σ fit: least-squares Gaussian fit"
               + ("\n" + caption if caption else ""))
    fig.supxlabel(caption, fontsize=7, color="0.3")
    return fig


def theory_figure(cases: list[dict]):
    """Measured linear-stack ERFs against the multinomial theory (Luo et al. 2016).

    Top row: the centre row of each measured map (mass-normalised, dots; ±2 standard errors for
    the random-weight case) and of the theory (line), log scale. Bottom row: the residual
    measured - theory along that row, relative to the theory's peak (uniform weights: rounding
    only) or in standard errors (random weights: z-scores, expected within ±3).
    """
    fig = new_figure(10.5, 7.6)
    axes = fig.subplots(2, len(cases), squeeze=False)
    for j, cs in enumerate(cases):
        meas, th, se = cs["_meas"], cs["_theory"], cs["_se"]
        c = meas.shape[0] // 2
        x = np.arange(meas.shape[1]) - (meas.shape[1] - 1) / 2
        ax = axes[0][j]
        ax.semilogy(x, th[c], "-", color="C0", lw=1.5, label="theory (multinomial)")
        if cs["n"] > 1:
            ax.errorbar(x, meas[c], yerr=2 * se[c], fmt="k.", ms=4, elinewidth=0.8, label="measured ± 2 se")
        else:
            ax.semilogy(x, meas[c], "k.", ms=4, label="measured")
        ax.set_title(f"{cs['case']}\ndepth {cs['depth']}, k {cs['k']}, TRF {cs['trf']}: σ {cs['sigma_measured']:.4f} "
                     f"(theory {cs['sigma_theory']:.4f})", fontsize=9)
        ax.set_xlabel("offset from the unit (px)")
        ax.set_ylabel("share of the map's mass (centre row)")
        ax.legend(fontsize=7)
        ax2 = axes[1][j]
        if cs["n"] > 1:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(se[c] > 0, (meas[c] - th[c]) / np.where(se[c] > 0, se[c], 1), 0.0)
            ax2.bar(x, z, color="C3", width=0.8)
            ax2.axhline(3, color="0.5", ls=":", lw=1)
            ax2.axhline(-3, color="0.5", ls=":", lw=1)
            ax2.set_ylabel("(measured - theory) / se")
            ax2.set_title(f"residual in standard errors (max |z| over the map {cs['max_abs_z']:.2f})", fontsize=9)
        else:
            r = (meas[c] - th[c]) / th.max()
            ax2.plot(x, r, "o", color="C3", ms=4)
            ax2.set_ylabel("(measured - theory) / theory peak")
            if not np.any(r):
                ax2.set_ylim(-1e-15, 1e-15)
                ax2.text(0.5, 0.75, "measured = theory at every position\n(exact in float64)",
                         transform=ax2.transAxes, ha="center", fontsize=9)
            ax2.set_title(f"residual (max |r| over the map {cs['max_abs_residual']:.1e})", fontsize=9)
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax2.set_xlabel("offset from the unit (px)")
        ax2.axhline(0, color="k", lw=0.6)
    fig.suptitle("Linear 3x3 stacks: measured ERF against the closed form of Luo et al. (2016)", fontsize=10)
    return fig


def growth_figure(series: dict, slopes: dict, k: int = 3):
    """ERF size and TRF size against depth on log-log axes (left), ERF/TRF ratio (right).

    Points are measurements (ERF size by Luo et al.'s 4.55 %-of-centre rule), lines the least-squares
    fits whose slopes are in the legend; the theory for linear stacks is ERF ~ depth^0.5, TRF ~ depth^1.
    """
    fig = new_figure(11, 4.6)
    ax, ax2 = fig.subplots(1, 2)
    markers = {"linear": "o", "relu": "s", "tanh": "^"}
    trf_drawn = False
    for i, (act, s) in enumerate(series.items()):
        d = np.asarray(s["depth"], float)
        col = f"C{i}"
        sl = slopes[act]
        b = np.polyfit(np.log(d), np.log(s["erf"]), 1)
        ax.loglog(d, s["erf"], markers.get(act, "D"), color=col, label=f"ERF {act}: slope {sl['erf_slope']:.3f}")
        ax.loglog(d, np.exp(np.polyval(b, np.log(d))), "-", color=col, lw=1)
        b2 = np.polyfit(np.log(d), np.log(s["ratio"]), 1)
        ax2.loglog(d, s["ratio"], markers.get(act, "D"), color=col, label=f"{act}: slope {sl['ratio_slope']:.3f}")
        ax2.loglog(d, np.exp(np.polyval(b2, np.log(d))), "-", color=col, lw=1)
        if not trf_drawn:
            ax.loglog(d, s["trf"], "k--", marker="x", lw=1, label=f"TRF: slope {sl['trf_slope']:.3f}")
            trf_drawn = True
    from matplotlib.ticker import FuncFormatter, NullFormatter

    depths = sorted({int(d) for s in series.values() for d in s["depth"]})
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for a in (ax, ax2):
        a.set_xticks(depths)
        a.xaxis.set_major_formatter(plain)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.yaxis.set_major_formatter(plain)
        a.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** np.floor(np.log10(v))) in (2, 3, 5) else ""))
        a.tick_params(axis="y", which="minor", labelsize=7)
        a.set_xlabel("depth (number of 3x3 layers)" if k == 3 else f"depth (number of {k}x{k} layers)")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("size (px)")
    ax.set_title("ERF and TRF size against depth", fontsize=10)
    ax2.set_ylabel("ERF size / TRF size")
    ax2.set_title("ERF/TRF ratio shrinks as depth^-1/2", fontsize=10)
    fig.suptitle("Luo et al. (2016): ERF grows as sqrt(depth), TRF linearly "
                 "(linear: uniform weights; relu/tanh: random N(0, 1/fan_in) weights)", fontsize=10)
    return fig


def provenance_caption(prov: dict | None, width: int = 150) -> str:
    """One or two lines naming what produced a map (``meta["provenance"]``): the inputs (kind, folder,
    files used/skipped, the first 12 hex digits of the file-list hash), the preprocessing, the
    weights (file and sha256 prefix, or the model's own initialisation), the protocol and versions."""
    import os

    if not prov:
        return ""
    parts = []
    inp = prov.get("inputs") or {}
    if inp.get("files_used") is not None:
        pp = inp.get("preprocess") or {}
        desc = f"images {os.path.basename(os.path.normpath(inp.get('path', '')))!s}: {inp['files_used']} files"
        if inp.get("skipped"):
            desc += f" ({inp['skipped']} unreadable skipped)"
        desc += f", list sha256 {str(inp.get('files_sha256', ''))[:12]}"
        if pp:
            desc += f"; {pp.get('resize')} {pp.get('interpolation')}" + (
                f", crop {pp.get('crop_pct')}" if pp.get("resize") != "squash" else "")
        parts.append(desc)
    elif inp:
        parts.append(f"inputs {inp.get('kind')}" + (f" x {inp['n']}" if inp.get("n") is not None else ""))
    w = prov.get("weights")
    if isinstance(w, dict) and w.get("file"):
        parts.append(f"weights {os.path.basename(w['file'])} sha256 {str(w.get('sha256', ''))[:12]}")
    elif "weights" in prov:
        parts.append("weights: own initialisation")
    if prov.get("protocol"):
        parts.append(f"protocol {prov['protocol']}")
    v = prov.get("versions") or {}
    parts.append(" / ".join(f"{k} {v[k]}" for k in ("erf", "torch", "timm") if v.get(k)))
    text = ";  ".join(p for p in parts if p)
    if len(text) > width:  # break once, at a separator near the middle
        cut = text.rfind(";  ", 0, width)
        if cut > 0:
            text = text[:cut] + "\n" + text[cut + 3:]
    return text
