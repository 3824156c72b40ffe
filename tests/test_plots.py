"""Figures for papers: shared colour scales, nothing clipped or covering data, labelled scales."""
from __future__ import annotations

import numpy as np
import pytest

import erf
from erf.compare import Comparison
from erf.plot import comparison_grid, map_figure, ratio_bars


@pytest.fixture(scope="module")
def small_comp():
    return erf.compare(["max", "lip", "dilated"], net=lambda pool: erf.nets.pooling_net(pool, depth=2, convs=1, width=4),
                       input_shape=(3, 48, 48), groups=2, draws=1, n_inputs=2, progress=False, device="cpu")


def _renamed(comp, n):
    """A comparison of ``n`` panels made of the same few results under long names (22 like erf compare)."""
    keys = list(comp.results)
    rows, results = [], {}
    for i in range(n):
        k = keys[i % len(keys)]
        name = f"{k}_variant_with_a_long_name_{i}"
        row = dict(next(r for r in comp.rows if r["pool"] == k), pool=name)
        rows.append(row)
        results[name] = comp.results[k]
    return Comparison(rows, results, comp.options)


def _inside(fig, artists):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox
    for a in artists:
        if not a.get_visible() or not a.get_text():
            continue
        b = a.get_window_extent(r)
        assert b.x0 >= box.x0 - 1 and b.x1 <= box.x1 + 1 and b.y0 >= box.y0 - 1 and b.y1 <= box.y1 + 1, a.get_text()


@pytest.mark.parametrize("n", [3, 22])
def test_grid_shared_scale_one_labelled_colourbar_nothing_clipped(small_comp, n):
    comp = _renamed(small_comp, n)
    fig = comparison_grid(comp)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == n
    limits = {im.get_clim() for ax in panels for im in ax.get_images()}
    assert len(limits) == 1  # one colour scale
    bars = [ax for ax in fig.axes if ax.get_visible() and not ax.get_images()]
    assert len(bars) == 1 and "share" in bars[0].get_ylabel()
    texts = [fig._suptitle, fig._supxlabel] + [ax.title for ax in panels]
    _inside(fig, texts)
    if n > 3:
        return
    per = comparison_grid(comp, same_scale=False)
    bars = [ax for ax in per.axes if ax.get_visible() and not ax.get_images()]
    assert len(bars) == n and all(b.get_ylabel() for b in bars)
    assert len({im.get_clim() for ax in per.axes for im in ax.get_images()}) > 1


def test_ratio_legend_lists_shown_kinds_beside_the_bars(small_comp):
    fig = ratio_bars(small_comp)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(labels) == {r["kind"] for r in small_comp.rows} | {"global unit"}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    leg = ax.get_legend().get_window_extent()
    assert leg.x0 >= ax.get_window_extent().x1  # beside the axes: no bar is covered
    assert leg.x1 <= fig.bbox.x1 + 1


def test_map_figure_log_decades_sigma_labels_and_big_trf():
    from matplotlib.colors import LogNorm

    model = erf.nets.conv_stack(20, width=2, act="relu", in_channels=1)  # TRF 41 > input 24
    r = erf.effective_rf(model, (1, 24, 24), n_inputs=2, progress=False)
    assert r.trf.size[0] > 24
    fig = map_figure(r)
    lin, log = fig.axes[0], fig.axes[1]
    im = log.get_images()[0]
    assert isinstance(im.norm, LogNorm) and im.norm.vmin == pytest.approx(1e-4) and im.norm.vmax == 1
    bars = [ax for ax in fig.axes if ax.get_ylabel().startswith("contribution / peak")]
    assert bars and "decades" in bars[0].get_ylabel()
    assert "σ moments" in fig._suptitle.get_text()
    labels = lin.get_legend_handles_labels()[1]
    assert any(lb.startswith("Gaussian fit 1σ (σ fit") for lb in labels)
    assert any("clipped" in lb for lb in labels)
    assert any("> input 24x24" in t.get_text() for t in lin.texts)
    from matplotlib.patches import Rectangle

    box = [p for p in lin.patches if isinstance(p, Rectangle) and p.get_linestyle() != "solid"][0]
    x0, y0 = box.get_xy()
    assert -0.5 < x0 and x0 + box.get_width() < 23.5 and -0.5 < y0  # drawn inside the frame, not on it
    assert "σ moments" in fig._supxlabel.get_text()
    _inside(fig, [fig._suptitle, fig._supxlabel])


def test_plot_then_savefig_keeps_the_colourbar_label(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = erf.effective_rf(erf.nets.conv_stack(3), (1, 20, 20), init="ones", reduce="mean", n_inputs=1, progress=False)
    ax = r.plot()
    fig = ax.figure
    fig.savefig(tmp_path / "p.png")
    cbar = [a for a in fig.axes if a is not ax][0]
    _inside(fig, [cbar.yaxis.label, ax.title, ax.xaxis.label])
    plt.close(fig)


def test_replknet_view_is_its_scaled_map_in_rdylgn():
    r = erf.effective_rf(erf.nets.conv_stack(3, in_channels=3), (3, 20, 20), init="ones", n_inputs=2, inputs="uniform",
                         protocol="replknet", progress=False)
    ax = r.plot()
    im = ax.get_images()[0]
    assert im.get_cmap().name == "RdYlGn"
    m = np.maximum(r.map, 0)
    ref = np.log10(m + 1) / np.log10(m + 1).max()
    np.testing.assert_allclose(im.get_array(), ref, rtol=1e-12)
