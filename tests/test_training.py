"""erf.train: training with ERF snapshots, save/load, resume, errors; the CLI ``erf train``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf
from erf.cli import main
from erf.nets import pooling_classifier
from erf.training import TrainingRun, load_run, snapshot_epochs, train

TINY = {"n_train": 64, "n_test": 32, "size": 16, "erf_n": 2, "batch_size": 16}


def tiny(pool="max", classes=4, seed=0):
    torch.manual_seed(seed)
    return pooling_classifier(pool, classes, depth=1, width=4)


def test_small_cnn_learns_shapes_and_snapshots_at_the_epochs_asked():
    torch.manual_seed(0)
    model = pooling_classifier("max", 4, depth=2, width=8)
    run = train(model, "shapes", epochs=3, erf_every=2, n_train=384, n_test=128, size=24, batch_size=16, lr=3e-3,
                erf_n=4)
    assert run.epochs == [0, 2, 3] and sorted(run.erfs) == [0, 2, 3]  # 0, every 2 epochs, and the last
    assert run.history[0]["test_acc"] < 0.4
    assert run.history[-1]["test_acc"] > 0.45  # chance is 0.25
    h = run.history[-1]
    for kind in ("task", "gaussian"):
        e = h["erf"][kind]
        assert 1 < e["erf_size"] <= 24 and len(e["sigma"]) == 2 and e["anisotropy"] >= 1
        assert e["trf_size"] == [32, 32] and 0 < e["erf_trf"] <= 1 and e["fit"]["r2"] > 0
        res = run.erfs[3][kind]
        assert res.input_shape == (3, 24, 24) and res.layer == "features"
    assert run.config["erf_layer"] == "features"
    assert snapshot_epochs(5, 2) == [0, 2, 4, 5]


def test_dynopool_r_moves_during_training():
    model = tiny("dynopool")
    run = train(model, "stretched", epochs=1, pool_lr=0.05, erf_inputs=("gaussian",), **TINY)
    before = run.history[0]["pools"]["features.stage0.pool"]
    after = run.history[-1]["pools"]["features.stage0.pool"]
    assert before["r"] == pytest.approx([0.5, 0.5]) and before["delta"] == pytest.approx([0.5, 0.5])
    assert max(abs(a - 0.5) for a in after["r"]) > 0.01
    assert after["delta"] != before["delta"]
    gem = train(tiny("gem"), "shapes", epochs=1, pool_lr=0.05, erf_inputs=("gaussian",), **TINY)
    assert gem.history[0]["pools"]["features.stage0.pool"]["p"] == pytest.approx(3.0)
    assert gem.history[-1]["pools"]["features.stage0.pool"]["p"] != pytest.approx(3.0, abs=1e-4)


class _Stop(Exception):
    pass


def test_interrupt_and_resume_give_the_same_history_bit_identical(tmp_path):
    def make():  # dropout and learnable pooling: the RNG and optimiser state must resume too
        m = tiny("gem")
        m.features.head.add_module("drop", nn.Dropout(0.2))
        return m

    opts = dict(epochs=3, erf_every=1, seed=5, erf_inputs=("task",), **TINY)
    full = train(make(), "shapes", **opts)
    ckpt = tmp_path / "run.npz"

    def stop(run, epoch):
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(make(), "shapes", checkpoint=ckpt, callback=stop, **opts)
    resumed_model = tiny("gem", seed=99)  # other weights: the checkpoint's must be used
    resumed_model.features.head.add_module("drop", nn.Dropout(0.2))
    resumed = train(resumed_model, "shapes", checkpoint=ckpt, resume=True, **opts)
    assert resumed.history == full.history
    for e in full.erfs:
        assert np.array_equal(resumed.erfs[e]["task"].map, full.erfs[e]["task"].map)
    with pytest.raises(ValueError, match="different run"):
        train(tiny("gem"), "shapes", checkpoint=ckpt, resume=True, **dict(opts, seed=6))


def test_save_load_roundtrip_and_tables(tmp_path):
    run = train(tiny(), "zoomed", epochs=1, **TINY)
    path = run.save(tmp_path / "run")
    assert path.endswith(".npz")
    with np.load(path, allow_pickle=False) as z:  # no pickle anywhere
        assert "run" in z.files
    back = load_run(path)
    assert isinstance(back, TrainingRun) and back.history == run.history and back.config == run.config
    assert np.array_equal(back.erfs[1]["gaussian"].map, run.erfs[1]["gaussian"].map)
    assert back.erfs[1]["gaussian"].trf.size == run.erfs[1]["gaussian"].trf.size
    rows = run.table()
    assert [r["epoch"] for r in rows] == [0, 1] and "erf_size_task" in rows[0]
    run.to_csv(tmp_path / "t.csv")
    run.to_json(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["history"][1]["epoch"] == 1
    files = run.save_erfs(tmp_path)
    assert erf.load(files[0]).map.shape == (16, 16)


def test_any_dataloader_and_bad_input():
    x, y = erf.tasks.make("marks", 48, size=16)
    xt, yt = erf.tasks.make("marks", 16, size=16, split="test")
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    run = train(tiny(classes=2), loader, test=DataLoader(TensorDataset(xt, yt), batch_size=8), epochs=1, erf_n=2)
    assert run.erfs[1]["task"].n == 2 and run.config["classes"] == 2
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        train(tiny(), "nope", epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        train(tiny(), "shapes", epochs=0)
    with pytest.raises(ValueError, match="output has 4 classes per sample but the task has 2"):
        train(tiny(classes=4), "marks", epochs=1, **TINY)
    with pytest.raises(ValueError, match=r"\(inputs, labels\) pairs"):
        train(tiny(), DataLoader(TensorDataset(x), batch_size=8), epochs=1)
    with pytest.raises(ValueError, match="logits"):
        train(erf.nets.conv_stack(2, width=3), "shapes", epochs=1, **TINY)
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        train(tiny(), "shapes", epochs=1, resume=True)
    with pytest.raises(TypeError, match="nn.Module"):
        train("model", "shapes", epochs=1)


def test_cli_train_writes_figure_table_and_npz(capsys, tmp_path):
    rc = main(["train", "pool:dynopool", "--task", "stretched", "--epochs", "2", "--erf-every", "2", "--n-train", "32",
               "--n-test", "16", "--size", "16", "--depth", "1", "--width", "4", "--erf-n", "2", "--pool-lr", "0.05",
               "--out", str(tmp_path), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert [h["epoch"] for h in s["history"]] == [0, 2]
    stem = tmp_path / "train_pool-dynopool_stretched"
    for ext in ("png", "md", "csv", "json", "npz"):
        assert (tmp_path / f"{stem.name}.{ext}").stat().st_size > 0
    assert erf.load(tmp_path / f"{stem.name}_e2_task.npz").input_shape == (3, 16, 16)
    assert "r_h" in (tmp_path / f"{stem.name}.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["train", "pool:max", "--task", "nope", "--epochs", "1"], "unknown task 'nope'"),
    (["train", "pool:max", "--task", "shapes", "--epochs", "0"], "--epochs"),
    (["train", "stack:2", "--task", "shapes", "--epochs", "1", "--n-train", "8", "--size", "16"], "logits"),
    (["study", "nope"], "unknown study 'nope'"),
])
def test_cli_train_bad_input_exits_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
