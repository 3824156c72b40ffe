"""Figures of ERF maps: heatmaps with the TRF box and the fitted Gaussian's 1- and 2-sigma ellipses.

matplotlib is imported lazily (inside the functions), so ``import erf`` never pulls it in.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _axes(ax):
    import matplotlib

    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 4.2))
    return ax


def ellipse_points(center: np.ndarray, cov: np.ndarray, k: float, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Points (row, col) of the k-sigma ellipse of a 2-D Gaussian with covariance ``cov`` (array order)."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=float))
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)])
    pts = vecs @ (np.sqrt(np.maximum(vals, 0))[:, None] * circle) * k
    return pts[0] + center[0], pts[1] + center[1]


def draw_trf_box(ax, trf: Any, shape: tuple[int, ...], color: str = "white") -> None:
    """The TRF region of the unit as a dashed rectangle (clipped to the image)."""
    from matplotlib.patches import Rectangle

    (r0, r1), (c0, c1) = trf.region[0], trf.region[1]
    r0c, r1c = max(r0, 0), min(r1, shape[0] - 1)
    c0c, c1c = max(c0, 0), min(c1, shape[1] - 1)
    ax.add_patch(Rectangle((c0c - 0.5, r0c - 0.5), c1c - c0c + 1, r1c - r0c + 1, fill=False,
                           ec=color, lw=1.2, ls="--", label=f"TRF {trf.size[0]}x{trf.size[1]}"))


def draw_fit_ellipses(ax, fit: Any, color: str = "cyan") -> None:
    """1- and 2-sigma ellipses of a :class:`erf.fit.GaussianFit`."""
    for k, ls in ((1, "-"), (2, ":")):
        rows, cols = ellipse_points(np.asarray(fit.center), np.asarray(fit.cov), k)
        ax.plot(cols, rows, color=color, lw=1.2, ls=ls, label=f"fit {k}σ")


def _title(result) -> str:
    parts = [result.layer or "output", f"unit {tuple(result.unit)}", f"n={result.n}"]
    try:
        m = result.moments
        parts.append("σ=" + "/".join(f"{s:.2f}" for s in m.sigma))
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


def plot_result(result, ax=None, log: bool = False, show_trf: bool = True, show_fit: bool = True,
                title: str | None = None, colorbar: bool = True, vmax: float | None = None):
    """Plot an :class:`erf.ERFResult`: heatmap (2-D), profile (1-D) or centre slice (3-D)."""
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
        ax.set_title(title or _title(result), fontsize=9)
        return ax
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
    shown = np.log10(1 + data / (data.max() or 1) * 1e4) / 4 if log else data
    im = ax.imshow(shown, cmap="magma", interpolation="nearest", vmin=0, vmax=vmax)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label("log-scaled contribution" if log else "mean contribution", fontsize=8)
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
    ax.set_title(title or _title(result), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right", framealpha=0.6)
    return ax
