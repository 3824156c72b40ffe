"""erf.compare and erf.diff on small networks: rows, standard errors, files, figures."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import scipy.stats
import pytest
from PIL import Image

import erf
from erf.compare import COLUMNS, NUMBERS, jackknife
from erf.nets import conv_stack, pooling_net
from erf.pooling import list_pools

SHAPE = (3, 32, 32)


def small_net(pool):
    """pooling_net with two cheap stages (TRF 14-20 px), analysed at 32x32."""
    return pooling_net(pool, depth=2, convs=1, width=4)


@pytest.fixture(scope="module")
def comp_all():
    return erf.compare("all", net=small_net, input_shape=SHAPE, groups=2, draws=1, n_inputs=2, progress=False,
                       device="cpu")


def test_a_row_for_every_downsampling_module(comp_all):
    names = list_pools(head=False)
    assert [r["pool"] for r in comp_all.rows] == names
    assert set(comp_all.results) == set(names)
    for row in comp_all.rows:
        assert list(row) == list(COLUMNS)
        assert row["n"] == 2 * 1 * 2
        assert row["trf_size"] is not None and row["trf_size"] > 1
        assert row["erf_size"] > 0 and math.isfinite(row["erf_size_se"]) and row["erf_size_se"] >= 0
        assert row["sigma_row"] > 0 and row["sigma_col"] > 0
        assert 0 < row["fit_r2"] <= 1
    global_rows = {r["pool"] for r in comp_all.rows if r["trf_global"]}
    assert {"lip", "spectral"} <= global_rows


def test_numbers_come_from_the_merged_map(comp_all):
    row = comp_all.table()[0]
    res = comp_all.results[row["pool"]]
    assert res.config["draw_ranges"] == [[0, 2]]
    assert row["sigma_row"] == pytest.approx(res.moments.sigma[0])
    assert row["erf_size"] == pytest.approx(res.metrics["erf_size"])
    assert row["fit_r2"] == pytest.approx(res.fit.r2)


def test_merged_groups_equal_one_run_over_all_draws():
    comp = erf.compare(["avg"], net=small_net, input_shape=SHAPE, groups=3, draws=2, n_inputs=2, init="normal",
                       progress=False, device="cpu")
    whole = erf.effective_rf(lambda: small_net("avg"), SHAPE, n_inputs=2, draws=6, init="normal", progress=False,
                             device="cpu")
    np.testing.assert_allclose(comp.results["avg"].map, whole.map, rtol=1e-10, atol=1e-14)
    assert comp.results["avg"].n == whole.n == 12


def test_jackknife_of_a_mean_is_the_standard_error_across_groups():
    rng = np.random.default_rng(0)
    x = rng.normal(size=6)
    full = {"v": float(x.mean())}
    loo = [{"v": float(np.delete(x, g).mean())} for g in range(6)]
    se = jackknife(full, loo)["v"]
    assert se == pytest.approx(x.std(ddof=1) / math.sqrt(6), rel=1e-12)
    assert math.isnan(jackknife({"v": 1.0}, [{"v": 1.0}])["v"])


def test_markdown_csv_json(comp_all, tmp_path):
    md = comp_all.to_markdown()
    lines = md.strip().splitlines()
    assert lines[0].startswith("| module |") and len(lines) == 2 + len(comp_all.rows)
    assert "±" in lines[2] and "(global)" in md
    with open(comp_all.to_csv(tmp_path / "t.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["pool"] for r in rows] == [r["pool"] for r in comp_all.rows]
    assert float(rows[0]["erf_size"]) == pytest.approx(comp_all.rows[0]["erf_size"])
    data = json.loads((tmp_path / "t.json").read_text() if comp_all.to_json(tmp_path / "t.json") else "")
    assert data["columns"] == list(COLUMNS) and len(data["rows"]) == len(comp_all.rows)
    assert data["options"]["groups"] == 2 and data["options"]["init"] == "kaiming"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("same_scale", [False, True])
def test_plot_grid_and_ratios(comp_all, tmp_path, same_scale):
    from erf.compare import Comparison

    keep = ["max", "lip", "dilated"]
    comp = Comparison([r for r in comp_all.rows if r["pool"] in keep], {k: comp_all.results[k] for k in keep},
                      comp_all.options)
    path = tmp_path / "grid.png"
    fig = comp.plot_grid(path, same_scale=same_scale)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == len(keep)
    assert all(ax.get_title().startswith(k) for ax, k in zip(panels, keep))
    colourbars = len([ax for ax in fig.axes if ax.get_visible() and not ax.get_images()])
    assert colourbars == (1 if same_scale else len(keep))
    ratios = tmp_path / "ratios.svg"
    comp.plot_ratios(ratios)
    assert ratios.read_text().lstrip().startswith("<?xml")


def test_compare_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid names"):
        erf.compare(["nosuch"], net=small_net, input_shape=SHAPE)
    with pytest.raises(ValueError, match="head"):
        erf.compare(["gap"], net=small_net, input_shape=SHAPE)
    with pytest.raises(ValueError, match="groups"):
        erf.compare(["max"], net=small_net, input_shape=SHAPE, groups=1)
    with pytest.raises(ValueError, match="first_draw"):
        erf.compare(["max"], net=small_net, input_shape=SHAPE, first_draw=3)
    with pytest.raises(TypeError, match="net"):
        erf.compare(["max"], net=3, input_shape=SHAPE)


# ---------------------------------------------------------------------------- diff
def _stack_run(first_draw, n=3, draws=8, reduce="square"):
    return erf.effective_rf(lambda: conv_stack(n, width=2, in_channels=1), (1, 15, 15), init="normal",
                            reduce=reduce, n_inputs=1, draws=draws, first_draw=first_draw, progress=False,
                            device="cpu")


def test_diff_zscore_formula_and_self_difference():
    a, b = _stack_run(0), _stack_run(8)
    d = erf.diff(a, b)
    se = np.sqrt(a.stderr ** 2 + b.stderr ** 2)
    inside = se > 0
    np.testing.assert_allclose(d.map, a.map - b.map)
    # one input per draw: the clustered error has draws - 1 = 7 degrees of freedom on each side;
    # z is the normal quantile of the Welch t's two-sided p-value
    t = (a.map - b.map)[inside] / se[inside]
    va, vb = a.stderr[inside] ** 2, b.stderr[inside] ** 2
    df = (va + vb) ** 2 / (va ** 2 / 7 + vb ** 2 / 7)
    np.testing.assert_allclose(d.df[inside], df, rtol=1e-12)
    z_ref = np.sign(t) * scipy.stats.norm.isf(scipy.stats.t.sf(np.abs(t), df))
    np.testing.assert_allclose(d.z[inside], z_ref, rtol=1e-9, atol=1e-12)
    assert np.all(np.abs(d.z[inside]) <= np.abs(t) + 1e-12)  # the t's heavier tails shrink z
    assert np.all(d.z[~inside] == 0)  # outside the TRF both maps are exactly 0
    same = erf.diff(a, a)
    assert np.all(same.z == 0) and same.max_abs_z == 0 and same.frac_significant == 0


def test_diff_separates_different_fields_but_not_repeats():
    a, b = _stack_run(0, draws=12, reduce="abs"), _stack_run(12, draws=12, reduce="abs")
    assert erf.diff(a, b, normalize=True).frac_significant < 0.05  # two samples of the same field
    wide = _stack_run(0, n=6, draws=12, reduce="abs")  # TRF 13 against 7
    d = erf.diff(wide, a, normalize=True)
    # 12 one-input draws a side: t with ~11-22 df, whose z-equivalents are smaller than t
    assert d.max_abs_z > 3.5 and d.frac_significant > 0.25 and d.normalized
    ax = d.plot()
    assert ax.get_images()


def test_diff_rejects_mismatched_inputs():
    a = _stack_run(0, draws=2)
    other = erf.effective_rf(lambda: conv_stack(2, in_channels=1), (1, 11, 11), init="ones", progress=False)
    with pytest.raises(ValueError, match="same grid"):
        erf.diff(a, other)
    with pytest.raises(TypeError, match="ERFResult"):
        erf.diff(a, a.map)
