"""Any models side by side: erf.compare(models=...) and erf compare --models SPEC[@WEIGHTS],...

One model's two checkpoints (before/after) on a real timm architecture, random-weight specs and
factories against the closed-form TRF, the table and figures, and each bad input.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import erf
from _deps import lazy
from erf.cli import main
from erf.compare import MODEL_COLUMNS
from erf.nets import conv_stack

timm = lazy("timm")  # per test: the tests without it still run

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(groups=2, draws=1, n_inputs=2, progress=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """timm test_resnet: 'before' (random init, DDP-wrapped) and 'after' with every 3x3 kernel cut to its
    centre tap (an EMA checkpoint): the paths through the 3x3 convolutions then widen nothing, so the
    ERF of layer3 must shrink."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    m = timm.create_model("test_resnet")
    torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}}, d / "before.pth")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3):
                centre = mod.weight[:, :, 1, 1].clone()
                mod.weight.zero_()
                mod.weight[:, :, 1, 1] = centre
    torch.save({"model_ema": m.state_dict(), "model": {}}, d / "after.pth")
    return d


def test_one_models_two_checkpoints(checkpoints, tmp_path):
    before, after = checkpoints / "before.pth", checkpoints / "after.pth"
    same = timm.create_model("test_resnet")
    erf.load_weights(same, before)
    comp = erf.compare(models={"before": f"timm:test_resnet@{before}", "after": f"timm:test_resnet@{after}",
                               "before (module)": same},
                       input_shape=(3, 48, 48), layer="layer3", **SMALL)
    rows = {r["model"]: r for r in comp.rows}
    assert list(rows) == ["before", "after", "before (module)"]
    assert rows["before"]["weights"] == "before.pth" and rows["after"]["weights"] == "after.pth"
    for name, path in (("before", before), ("after", after)):
        w = comp.results[name].meta["provenance"]["weights"]
        assert rows[name]["weights_sha256"] == w["sha256"] and w["file"] == str(path.resolve())
    assert comp.results["after"].meta["provenance"]["weights"]["unwrapped"] == ["model_ema"]
    # the spec and the loaded module are the same weights on the same inputs: the same map
    np.testing.assert_allclose(comp.results["before (module)"].map, comp.results["before"].map, rtol=0, atol=1e-12)
    # centre-only 3x3 kernels shrink the ERF (same architecture, same TRF)
    assert rows["after"]["trf_size"] == rows["before"]["trf_size"]
    # layer3's TRF (71 px) is larger than the 48 px input: ERF/TRF uses the clipped field, as erf map does
    assert rows["before"]["trf_unclipped"] == 71 and rows["before"]["trf_size"] == 48
    assert rows["before"]["erf_trf_ratio"] == pytest.approx(rows["before"]["erf_size"] / 48)
    assert rows["after"]["erf_size"] < 0.6 * rows["before"]["erf_size"]
    assert all(r["layer"] == "layer3" and r["n"] == 4 and r["kind"] == "weights" for r in rows.values())
    assert np.isfinite(rows["before"]["erf_size_se"])
    md = comp.to_markdown()
    assert md.startswith("| model | layer | weights | TRF |") and "| after | layer3 | after.pth | 48 (of 71) |" in md
    comp.to_csv(tmp_path / "c.csv")
    with open(tmp_path / "c.csv") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == MODEL_COLUMNS and [t["model"] for t in table] == list(rows)
    d = comp.to_dict()
    assert d["options"]["models"]["after"] == f"timm:test_resnet@{after}" and d["columns"] == list(MODEL_COLUMNS)
    for fig, name in ((comp.plot_grid(same_scale=True), "grid.png"), (comp.plot_ratios(), "ratios.png")):
        from erf.plot import save_figure

        save_figure(fig, tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300
    assert "layer3" in comp.options["caption"] and "given weights: 4 inputs" in comp.options["caption"]


def test_random_weight_models_against_the_trf():
    """Specs and factories without weights get random draws; linear 3x3 stacks have TRF 2n+1."""
    comp = erf.compare(models=["stack:3", "stack:6"], input_shape=(1, 24, 24), **SMALL)
    rows = {r["model"]: r for r in comp.rows}
    assert rows["stack:3"]["trf_size"] == 7 and rows["stack:6"]["trf_size"] == 13
    assert rows["stack:6"]["erf_size"] > rows["stack:3"]["erf_size"]
    assert rows["stack:3"]["kind"] == "random" and rows["stack:3"]["weights"] is None
    comp = erf.compare(models={"s3": lambda: conv_stack(3, in_channels=1)}, input_shape=(1, 16, 16),
                       init="ones", reduce="mean", **SMALL)
    assert comp.rows[0]["sigma_row"] == pytest.approx(np.sqrt(2.0), rel=1e-9)  # 3 uniform 3x3 layers: var 3*2/3
    assert "| s3 | output | ones init |" in comp.to_markdown()


def test_default_remains_the_pooling_comparison():
    comp = erf.compare(pools=["max"], input_shape=(3, 64, 64), **SMALL)
    assert comp.rows[0]["pool"] == "max" and comp.columns[0] == "pool" and "models" not in comp.options


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(models={}), ValueError, "models: an empty dict"),
    (dict(models=[]), ValueError, "models: an empty list"),
    (dict(models=3), TypeError, "models must be a dict"),
    (dict(models=[conv_stack(2)]), TypeError, "a list must hold 'SPEC"),
    (dict(models={"a": 3}), TypeError, r"models\['a'\] must be an nn.Module"),
    (dict(models={"": "stack:2"}), TypeError, "every name must be a non-empty str"),
    (dict(models={"a": "nosuch"}), ValueError, "unknown model spec"),
    (dict(models={"a": "stack:2@/no/such.pt"}), ValueError, "stack:2@WEIGHTS: weights file '/no/such.pt' does not"),
    (dict(models={"a": conv_stack(2, in_channels=1)}, init="ones", input_shape=(1, 16, 16)), ValueError,
     "init: models\\['a'\\] has fixed weights"),
    (dict(models={"a": "stack:2"}, layer={"b": "0"}), ValueError, "layer: names \\['b'\\] are not among"),
    (dict(models={"a": "stack:2"}, layer=3), TypeError, "layer must be a module path"),
    (dict(models={"a": lambda: conv_stack(2)}), ValueError, "input_shape: give input_shape"),
    (dict(models={"a": "stack:2", "b": "pool:max"}), ValueError, "input_shape: give input_shape"),
    (dict(models={"a": "stack:2"}, pools=["max"]), ValueError, "give either models= or pools="),
    (dict(models={"a": "stack:2"}, groups=1), ValueError, "groups must be an int >= 2"),
])
def test_bad_models_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        erf.compare(**kwargs, progress=False)


def test_cli_compare_models(checkpoints, tmp_path, capsys):
    spec = f"timm:test_resnet@{checkpoints / 'before.pth'},timm:test_resnet@{checkpoints / 'after.pth'}"
    code = main(["compare", "--models", spec, "--layer", "layer3", "--input-shape", "3x48x48", "--groups", "2",
                 "--draws", "1", "--n-inputs", "2", "--json", "--no-progress", "--same-scale", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out)
    assert [r["model"] for r in s["rows"]] == ["timm:test_resnet@before.pth", "timm:test_resnet@after.pth"]
    assert sorted(os.path.basename(f) for f in s["files"]) == ["compare.csv", "compare.json", "compare.md",
                                                               "compare_grid.png", "compare_ratios.png"]
    assert s["rows"][1]["erf_size"] < s["rows"][0]["erf_size"]
    for argv, message in (
            (["--models", "stack:2", "--pools", "max"], "give --models or --pools, not both"),
            (["--layer", "0"], "--layer needs --models"),
            (["--models", "stack:2,stack:2"], "--models: 'stack:2' is listed twice"),
            (["--models", "timm:no_such_net"], "unknown timm model"),
            (["--models", f"stack:2@{tmp_path / 'compare.md'}"], "cannot be read as a torch or safetensors"),
            (["--models", "stack:2@"], "names no weights file after '@'"),
            (["--models", f"timm:test_resnet@{checkpoints / 'after.pth'}", "--init", "ones"],
             "--init: models.* has fixed weights")):
        code = main(["compare"] + argv + ["--out", str(tmp_path), "--no-progress"])
        out, err = capsys.readouterr()
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(message, err), err


# ------------------------------------------------------------------------------ erf map --layer A,B,C
def test_cli_map_several_layers_one_run(tmp_path, capsys):
    """One .npz, summary row and figure per layer plus a panel figure; each layer's map equals the one of
    a run of that layer alone (the same inputs: the same forward passes serve every layer)."""
    pytest.importorskip("timm")  # the CLI builds timm:test_resnet
    common = ["--input-shape", "3x32x32", "--n-inputs", "2", "--no-progress"]
    code = main(["map", "timm:test_resnet", "--layer", "layer1,layer2", "--json", "--out", str(tmp_path / "both")]
                + common)
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out)
    assert [r["layer"] for r in s["layers"]] == ["layer1", "layer2"] and s["layers"][1]["trf_size"] == [55, 55]
    names = sorted(os.path.basename(f) for f in s["files"])
    assert names == ["map_timm-test_resnet_layer1.npz", "map_timm-test_resnet_layer1.png",
                     "map_timm-test_resnet_layer2.npz", "map_timm-test_resnet_layer2.png",
                     "map_timm-test_resnet_layers.png"]
    with Image.open(tmp_path / "both" / "map_timm-test_resnet_layers.png") as im:
        assert im.size[0] > 1.4 * im.size[1]  # two panels side by side
    from erf.models import parse_model

    alone = erf.effective_rf(parse_model("timm:test_resnet").factory(3), (3, 32, 32), layer="layer2", n_inputs=2,
                             progress=False)  # what `erf map timm:test_resnet --layer layer2` runs
    joint = erf.load(tmp_path / "both" / "map_timm-test_resnet_layer2.npz")
    np.testing.assert_allclose(joint.map, alone.map, rtol=1e-5, atol=1e-7 * float(np.abs(alone.map).max()))
    code = main(["map", "timm:test_resnet", "--layer", "layer1,", "--out", str(tmp_path)] + common)
    assert code == 2 and "--layer: an empty layer name" in capsys.readouterr().err


def test_given_inputs_are_split_into_disjoint_groups_for_fixed_weights(tmp_path):
    """A Tensor or images: each group of a fixed-weight model gets its own part, so the merged map is the
    map over all the inputs (not one part repeated) and the standard errors are not zero."""
    torch.manual_seed(1)
    model = conv_stack(3, act="relu", width=4, in_channels=3)
    x = torch.randn(8, 3, 20, 20)
    comp = erf.compare(models={"m": model}, input_shape=(3, 20, 20), inputs=x, groups=2, draws=1, n_inputs=4,
                       progress=False)
    whole = erf.effective_rf(model, (3, 20, 20), inputs=x, progress=False)
    r = comp.results["m"]
    assert r.n == 8 and r.config["fingerprint"]["inputs"] == whole.config["fingerprint"]["inputs"]
    np.testing.assert_allclose(r.map, whole.map, rtol=1e-9, atol=1e-12 * float(whole.map.max()))
    assert comp.rows[0]["erf_size_se"] >= 0 and comp.rows[0]["sigma_row_se"] > 0
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    comp = erf.compare(models={"m": model}, input_shape=(3, 20, 20), inputs=f"images:{folder}", groups=3,
                       draws=1, n_inputs=2, progress=False)
    assert comp.results["m"].n == 6 and comp.results["m"].meta["provenance"]["inputs"]["files_used"] == 6
    with pytest.raises(ValueError, match="inputs: 2 inputs cannot make groups=3"):
        erf.compare(models={"m": model}, input_shape=(3, 20, 20), inputs=x[:2], groups=3, progress=False)
