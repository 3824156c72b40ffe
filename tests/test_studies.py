"""erf.studies: Luo et al.'s claims (quick variant), the trained pooling studies, the CLI ``erf study``."""
from __future__ import annotations

import json

import pytest

from erf import studies
from erf.cli import main


@pytest.fixture(scope="module")
def luo_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("luo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["study", "luo2016", "--quick", "--json", "--no-progress", "--out", str(out)])
    assert rc == 0
    return json.loads(buf.getvalue()), out


def _claim(summary, text):
    hits = [c for c in summary["claims"] if text in c["claim"]]
    assert len(hits) == 1, text
    return hits[0]


def test_luo2016_quick_reproduces_the_sqrt_depth_law(luo_quick):
    s, _ = luo_quick
    for stack in ("uniform", "relu"):
        c = _claim(s, f"ERF size ~ depth^0.5 ({stack} 3x3 stack)")
        assert 0.45 <= c["measured"] <= 0.55 and c["verdict"] == "holds"
        assert c["stderr"] is not None and 0 <= c["stderr"] < 0.1
        r = _claim(s, f"ERF/TRF ~ depth^-0.5 ({stack})")
        assert -0.6 <= r["measured"] <= -0.4
    sizes = [row for row in s["tables"]["stacks: ERF size against depth"] if row["stack"] == "uniform"]
    # the exact multinomial sizes of REFERENCES.md (uniform 3x3 stacks, depths 5..40)
    assert [round(r["erf_size"], 3) for r in sizes] == [8.307, 11.705, 16.155, 22.738]


def test_luo2016_quick_reports_comparisons_with_standard_errors(luo_quick):
    s, out = luo_quick
    res = _claim(s, "residual blocks")
    assert res["measured"] < 1 and res["stderr"] > 0 and res["verdict"] in ("holds", "inconclusive", "contradicts")
    sub = _claim(s, "subsampling")
    assert sub["measured"] > 1.3 and sub["verdict"] == "holds"
    assert _claim(s, "dilation")["measured"] > 1.1
    for kind in ("task", "gaussian"):
        t = _claim(s, f"grows during training ({kind} inputs)")
        assert t["measured"] > 0 and t["stderr"] is not None and t["stderr"] > 0
    for ext in ("png", "md", "csv", "json"):
        assert (out / f"study_luo2016_quick.{ext}").stat().st_size > 0
    assert "verdict" in (out / "study_luo2016_quick.md").read_text()


def test_trained_pools_and_dynopool_tiny():
    tp = studies.trained_pools(pools=("max", "gem"), seeds=2, epochs=1, n_train=32, size=16)
    rows = [r for r in tp.rows if r["inputs"] == "gaussian"]
    assert [r["module"] for r in rows] == ["max", "gem"]
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and r["erf_size_before"] > 0 and r["erf_size_after"] > 0
        assert r["erf_size_before_se"] >= 0 and r["erf_trf_after"] > 0
    assert "p " in rows[1]["learned"]
    assert "ERF before" in tp.to_markdown()
    tp.figure()
    dy = studies.dynopool(tasks=("stretched",), seeds=1, epochs=1, n_train=32, size=16, pool_lr=0.05)
    row = next(r for r in dy.rows if r["pool"] == "dynopool")
    assert row["stage0_r_h"] != pytest.approx(0.5, abs=1e-4) and row["sigma_ratio_task_trained"] > 0
    dy.figure()
    with pytest.raises(ValueError, match="unknown study"):
        studies.run("nope")
