"""The command line end to end on small sizes: files, summaries, slopes and exit statuses."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import erf
from erf.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json", "--no-progress")
    assert code == 0, err
    return json.loads(out)


def assert_png(path):
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


# ------------------------------------------------------------------------------ commands
def test_map_linear_stack_matches_theory(capsys, tmp_path):
    s = run_json(capsys, "map", "stack:5", "--init", "ones", "--reduce", "mean", "--input-shape", "1x24x24",
                 "--n-inputs", "2", "--out", str(tmp_path))
    assert s["sigma_moments"] == pytest.approx([math.sqrt(2 * 5 / 3)] * 2, rel=1e-6)
    assert s["trf_size"] == [11, 11] and s["unit"] == [12, 12]
    png, npz = (tmp_path / "map_stack-5.png"), (tmp_path / "map_stack-5.npz")
    assert sorted(s["files"]) == sorted([str(png), str(npz)])
    assert_png(png)
    r = erf.load(npz)
    assert r.map.shape == (24, 24) and r.config["init"] == "ones"
    assert not list(tmp_path.glob("*.tmp"))


def test_map_pool_net_markdown_and_svg(capsys, tmp_path):
    code, out, err = run(capsys, "map", "pool:avg", "--input-shape", "3x40x40", "--n-inputs", "2",
                         "--unit", "2,2", "--format", "svg", "--out", str(tmp_path), "--no-progress")
    assert code == 0, err
    assert out.startswith("| quantity | value |") and "erf_size" in out and "wrote" in out
    assert (tmp_path / "map_pool-avg.svg").read_text().lstrip().startswith("<?xml")
    assert erf.load(tmp_path / "map_pool-avg.npz").unit == (2, 2)


def test_map_file_and_module_factories(capsys, tmp_path, monkeypatch):
    src = ("import torch.nn as nn\n"
           "def make():\n    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1))\n")
    (tmp_path / "mynet.py").write_text(src)
    s = run_json(capsys, "map", f"{tmp_path / 'mynet.py'}:make", "--input-shape", "1x12x12", "--n-inputs", "2",
                 "--out", str(tmp_path))
    assert s["trf_size"] == [5, 5]
    monkeypatch.syspath_prepend(str(tmp_path))
    s2 = run_json(capsys, "map", "mynet:make", "--input-shape", "1x12x12", "--n-inputs", "2", "--out", str(tmp_path))
    assert s2["model"] == "mynet:make" and s2["trf_size"] == [5, 5]


def test_map_with_weights(capsys, tmp_path):
    from erf.nets import conv_stack

    model = conv_stack(3, in_channels=1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    s = run_json(capsys, "map", "stack:3", "--weights", str(path), "--reduce", "mean", "--input-shape", "1x16x16",
                 "--n-inputs", "1", "--out", str(tmp_path))
    assert s["sigma_moments"] == pytest.approx([math.sqrt(2.0)] * 2, rel=1e-6)  # the loaded all-ones weights


def test_compare_writes_every_file(capsys, tmp_path):
    s = run_json(capsys, "compare", "--pools", "max,avg,lip", "--input-shape", "3x72x72", "--groups", "2",
                 "--draws", "1", "--n-inputs", "1", "--out", str(tmp_path))
    assert [r["pool"] for r in s["rows"]] == ["max", "avg", "lip"]
    names = {os.path.basename(f) for f in s["files"]}
    assert names == {"compare_grid.png", "compare_ratios.png", "compare.md", "compare.csv", "compare.json"}
    assert_png(tmp_path / "compare_grid.png")
    assert_png(tmp_path / "compare_ratios.png")
    assert json.loads((tmp_path / "compare.json").read_text())["rows"][0]["pool"] == "max"
    assert (tmp_path / "compare.md").read_text().count("\n") == 2 + 3
    assert (tmp_path / "compare.csv").read_text().splitlines()[0].startswith("pool,kind,locality,trf_size")


def test_trf_table(capsys, tmp_path):
    code, out, err = run(capsys, "trf", "stack:4", "--input-shape", "1x32x32")
    assert code == 0, err
    assert "size 9x9" in out and "conv3" in out
    s = run_json(capsys, "trf", "pool:max", "--input-shape", "3x128x128", "--out", str(tmp_path))
    assert s["size"] == [68, 68] and len(s["table"]) > 10
    assert {os.path.basename(f) for f in s["files"]} == {"trf_pool-max.txt", "trf_pool-max.json"}


def test_theory_uniform_is_exact(capsys, tmp_path):
    s = run_json(capsys, "theory", "--depth", "6", "--draws", "16", "--width", "4", "--out", str(tmp_path))
    uniform, rnd = s["rows"]
    assert uniform["max_abs_residual"] < 1e-12
    assert uniform["sigma_measured"] == pytest.approx(uniform["sigma_theory"], rel=1e-9)
    assert rnd["sigma_measured"] == pytest.approx(rnd["sigma_theory"], rel=0.15)
    assert_png(tmp_path / "theory_n6_k3.png")


def test_growth_slopes_of_linear_stacks(capsys, tmp_path):
    s = run_json(capsys, "growth", "--acts", "linear", "--out", str(tmp_path))
    slopes = s["slopes"]["linear"]
    assert 0.45 <= slopes["erf_slope"] <= 0.55
    assert 0.95 <= slopes["trf_slope"] <= 1.05
    assert [r["trf_size"] for r in s["rows"]] == [17, 33, 65, 129]
    assert_png(tmp_path / "growth.png")


def test_pools_lists_the_registry(capsys):
    from erf.pooling import REGISTRY

    s = run_json(capsys, "pools")
    assert [p["name"] for p in s["pools"]] == list(REGISTRY)
    assert {"kind", "locality", "rf", "paper"} <= set(s["pools"][0])
    code, out, _ = run(capsys, "pools")
    assert code == 0 and out.count("\n") == 2 + len(REGISTRY)


@pytest.mark.parametrize("command", ["map", "compare", "trf", "theory", "growth", "pools"])
def test_help_has_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "example:" in out and f"erf {command}" in out


# ------------------------------------------------------------------------------ bad usage
def _bad_weights(tmp_path):
    from erf.nets import conv_stack

    path = tmp_path / "other.pt"
    torch.save(conv_stack(4, width=2, in_channels=1).state_dict(), path)
    return str(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("argv, needle", [
    (["nosuch"], "invalid choice"),
    (["map"], "required: MODEL"),
    (["map", "foo"], "unknown model spec"),
    (["map", "resnet:18"], "unknown model spec"),
    (["map", "pool:nosuch"], "unknown pooling module"),
    (["compare", "--pools", "max,nosuch"], "unknown pooling module"),
    (["map", "stack:3", "--input-shape", "3xabc"], "--input-shape"),
    (["map", "stack:3", "--input-shape", "64"], "--input-shape"),
    (["map", "stack:3", "--weights", "/no/such/file.pt"], "does not exist"),
    (["map", "stack:3", "--input-shape", "1x16x16", "--unit", "40,40"], "outside"),
    (["map", "stack:3", "--n-inputs", "zero"], "invalid int"),
    (["map", "missing_file.py:make"], "does not exist"),
    (["map", "stack:3", "--reduce", "median"], "invalid choice"),
    (["growth", "--depths", "8"], "at least two"),
])
def test_bad_usage_exits_2_with_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in err


def test_weights_for_another_model_and_code_pickles_are_refused(capsys, tmp_path):
    code, _, err = run(capsys, "map", "stack:3", "--input-shape", "1x16x16", "--weights", _bad_weights(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another model" in err
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    code, out, err = run(capsys, "map", "stack:3", "--weights", str(evil))
    assert code == 2 and "pwned" not in out and "would run code" in err and len(err.strip().splitlines()) == 1


def test_unexpected_failure_exits_1(capsys, tmp_path):
    (tmp_path / "broken.py").write_text("import torch.nn as nn\nclass Bad(nn.Module):\n"
                                        "    def forward(self, x):\n        raise KeyError('boom')\n"
                                        "def make():\n    return Bad()\n")
    code, _, err = run(capsys, "map", f"{tmp_path / 'broken.py'}:make", "--input-shape", "1x8x8")
    assert code == 1 and "KeyError" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ entry points
@pytest.mark.parametrize("entry", ["cli.py", "-m erf", "erf"])
def test_entry_points_behave_the_same(entry, tmp_path):
    if entry == "erf":
        # the console script of this interpreter's environment (a venv's bin/ need not be on PATH)
        here = os.path.join(os.path.dirname(sys.executable), "erf.exe" if os.name == "nt" else "erf")
        exe = here if os.path.isfile(here) else shutil.which("erf")
        if exe is None:
            pytest.skip(f"the erf console script is not installed next to {sys.executable} "
                        "(pip install -e .)")
        cmd = [exe]
    elif entry == "cli.py":
        cmd = [sys.executable, os.path.join(REPO, "cli.py")]
    else:
        cmd = [sys.executable, "-m", "erf"]
    ok = subprocess.run(cmd + ["trf", "stack:2", "--input-shape", "1x9x9", "--json"], capture_output=True,
                        text=True, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["size"] == [5, 5]
    if entry != "-m erf":
        return
    bad = subprocess.run(cmd + ["map", "pool:nosuch"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
