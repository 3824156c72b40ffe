"""Reliability at the boundary: bad inputs (API and CLI), kills and Ctrl-C from the command line,
safe loading, parser fuzzing, hooks left behind, ``--distributed`` and ``--until-stderr``."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import erf
from erf import cli
from erf.cli import main
from erf.models import load_weights, parse_model
from erf.nets import conv_stack
from _signals import default_signals

ERF_DIR = os.path.dirname(os.path.abspath(erf.__file__))
REPO = os.path.dirname(ERF_DIR)


# ------------------------------------------------------------------------------ small models and files
class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        y = self.c(x)
        return y, y


class _Dict(_Tuple):
    def forward(self, x):
        return {"features": self.c(x)}


class _Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


class _Evil:
    """A pickle whose loading creates ``marker`` (it would run code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _net():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 3))


_FILES = {
    "tuple.py": "import torch.nn as nn\nclass T(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                "        self.c = nn.Conv2d(1, 2, 3)\n    def forward(self, x):\n        y = self.c(x)\n"
                "        return y, y\ndef make():\n    return T()\n"
                "def flat():\n    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())\n"
                "def needs(width):\n    return nn.Conv2d(1, width, 3)\n"
                "def conv():\n    return nn.Conv2d(1, 2, 3, padding=1)\n",
    "syntax.py": "def make(:\n",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    for name, text in _FILES.items():
        (d / name).write_text(text)
    torch.save(conv_stack(4, width=2, in_channels=1).state_dict(), d / "other.pt")
    torch.save({"conv0.weight": _Evil(d / "pwned_cli")}, d / "evil.pt")
    np.save(d / "objects.npy", np.array([1], dtype=object))
    np.savez(d / "objects.npz", map=np.array([_Evil(d / "pwned_npz")], dtype=object), meta=np.array("{}"))
    return d


def _result(tmp):
    return erf.effective_rf(_net(), (1, 12, 12), n_inputs=2, progress=False, device="cpu")


# ------------------------------------------------------------------------------ the table: API
E = erf.effective_rf
K = dict(n_inputs=2, progress=False, device="cpu")
API_CASES = [
    ("effective_rf input_shape=(16,)", lambda d: E(_net(), (16,), **K), ValueError, "input_shape"),
    ("effective_rf input_shape=(1, 0, 16)", lambda d: E(_net(), (1, 0, 16), **K), ValueError, "input_shape"),
    ("effective_rf input_shape=(1, -3, 16)", lambda d: E(_net(), (1, -3, 16), **K), ValueError, "input_shape"),
    ("effective_rf input_shape='1x16x16'", lambda d: E(_net(), "1x16x16", **K), TypeError, "input_shape"),
    ("effective_rf input_shape=(1, 2, 2) (smaller than the net needs)", lambda d: E(_net(), (1, 2, 2), **K),
     ValueError, "input_shape"),
    ("effective_rf input_shape=(3, 16, 16) (net takes 1 channel)", lambda d: E(_net(), (3, 16, 16), **K),
     ValueError, "input_shape"),
    ("effective_rf input_shape=(1, 16) for a 2-D net", lambda d: E(_net(), (1, 16), **K), ValueError, "input_shape"),
    ("effective_rf unit=(40, 40)", lambda d: E(_net(), (1, 16, 16), unit=(40, 40), **K), ValueError, "unit"),
    ("effective_rf unit=(4,)", lambda d: E(_net(), (1, 16, 16), unit=(4,), **K), ValueError, "unit"),
    ("effective_rf channel=7 (3 channels)", lambda d: E(_net(), (1, 16, 16), channel=7, **K), ValueError, "channel"),
    ("effective_rf reduce='median'", lambda d: E(_net(), (1, 16, 16), reduce="median", **K), ValueError, "reduce"),
    ("effective_rf init='xavier'", lambda d: E(_net(), (1, 16, 16), init="xavier", **K), ValueError, "init"),
    ("effective_rf method='saliency'", lambda d: E(_net(), (1, 16, 16), method="saliency", **K), ValueError,
     "method"),
    ("effective_rf layer='nosuch'", lambda d: E(_net(), (1, 16, 16), layer="nosuch", **K), ValueError, "layer"),
    ("effective_rf model returning a tuple", lambda d: E(_Tuple(), (1, 16, 16), **K), TypeError, "select"),
    ("effective_rf model returning a dict", lambda d: E(_Dict(), (1, 16, 16), **K), TypeError, "select"),
    ("effective_rf model output without spatial axes",
     lambda d: E(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), (1, 16, 16), layer="1", **K), ValueError,
     "layer"),
    ("effective_rf n_inputs=0", lambda d: E(_net(), (1, 16, 16), n_inputs=0, progress=False), ValueError,
     "n_inputs"),
    ("effective_rf draws=-1", lambda d: E(_net(), (1, 16, 16), draws=-1, **K), ValueError, "draws"),
    ("effective_rf batch_size=0", lambda d: E(_net(), (1, 16, 16), batch_size=0, **K), ValueError, "batch_size"),
    ("effective_rf dtype=torch.int32", lambda d: E(_net(), (1, 16, 16), dtype=torch.int32, **K), ValueError,
     "dtype"),
    ("effective_rf device='tpu'", lambda d: E(_net(), (1, 16, 16), device="tpu", progress=False), ValueError,
     "device"),
    ("effective_rf inputs='laplace'", lambda d: E(_net(), (1, 16, 16), inputs="laplace", **K), ValueError,
     "inputs"),
    ("effective_rf inputs=Tensor with NaN",
     lambda d: E(_net(), (1, 16, 16), inputs=torch.full((2, 1, 16, 16), float("nan")), progress=False),
     ValueError, "inputs"),
    ("effective_rf model=None", lambda d: E(None, (1, 16, 16), **K), TypeError, "model"),
    ("effective_rf factory returning 3", lambda d: E(lambda: 3, (1, 16, 16), **K), TypeError, "model factory"),
    ("effective_rf non-finite gradients (x * inf)",
     lambda d: E(nn.Sequential(nn.Conv2d(1, 1, 3), _Scale(float("inf"))), (1, 8, 8), **K), ValueError,
     "nonfinite"),
    ("effective_rf train_mode='yes'", lambda d: E(_net(), (1, 16, 16), train_mode="yes", **K), TypeError,
     "train_mode"),
    ("effective_rf resume=True without checkpoint", lambda d: E(_net(), (1, 16, 16), resume=True, **K),
     ValueError, "resume"),
    ("effective_rf until_stderr=nan", lambda d: E(_net(), (1, 16, 16), until_stderr=float("nan"), **K),
     ValueError, "until_stderr"),
    ("theoretical_rf input_shape=(1, 0, 16)", lambda d: erf.theoretical_rf(_net(), (1, 0, 16)), ValueError,
     "input_shape"),
    ("theoretical_rf unit=(99, 99)", lambda d: erf.theoretical_rf(_net(), (1, 16, 16), unit=(99, 99)), ValueError,
     "unit"),
    ("empirical_trf hold_gates='y'", lambda d: erf.empirical_trf(_net(), (1, 16, 16), hold_gates="y"), TypeError,
     "hold_gates"),
    ("empirical_trf input_shape=(1, 16) for a 2-D net", lambda d: erf.empirical_trf(_net(), (1, 16)), ValueError,
     "input_shape"),
    ("fit_gaussian 4-D array", lambda d: erf.fit_gaussian(np.ones((2, 2, 2, 2))), ValueError, "map"),
    ("moments of NaN", lambda d: erf.moments(np.full((5, 5), np.nan)), ValueError, "map"),
    ("metrics center=(9, 9) on 5x5", lambda d: erf.metrics(np.ones((5, 5)), center=(9, 9)), ValueError, "center"),
    ("theory.Layer stride=0", lambda d: erf.theory.Layer([1, 1], stride=0), ValueError, "stride"),
    ("theory.binomial_profile(2.5, 3)", lambda d: erf.theory.binomial_profile(2.5, 3), TypeError, "n must"),
    ("pooling.get_pool('nosuch', 3)", lambda d: erf.pooling.get_pool("nosuch", 3), ValueError, "pooling module"),
    ("pooling.REGISTRY['max'].make(0)", lambda d: erf.pooling.REGISTRY["max"].make(0), ValueError, "channels"),
    ("pooling.REGISTRY['max'].make(3, stride=0)", lambda d: erf.pooling.REGISTRY["max"].make(3, stride=0),
     ValueError, "stride"),
    ("nets.conv_stack(3, padding='zz')", lambda d: conv_stack(3, padding="zz"), ValueError, "padding"),
    ("nets.pooling_net('max', width=-1)", lambda d: erf.nets.pooling_net("max", width=-1), ValueError, "width"),
    ("nets.swap_pooling('resnet', 'max')", lambda d: erf.nets.swap_pooling("resnet", "max"), TypeError, "model"),
    ("compare(3)", lambda d: erf.compare(3, progress=False), ValueError, "pools"),
    ("diff(1, 2)", lambda d: erf.diff(1, 2), TypeError, "a must"),
    ("load('/no/such.npz')", lambda d: erf.load("/no/such.npz"), ValueError, "path"),
    ("load(npz with a pickled object array)", lambda d: erf.load(d / "objects.npz"), ValueError, "path"),
    ("ERFResult.merge(3)", lambda d: _result(d).merge(3), TypeError, "other"),
    ("ERFResult.save(3)", lambda d: _result(d).save(3), TypeError, "path"),
    ("models.load_weights(malicious pickle)", lambda d: load_weights(conv_stack(3, in_channels=1), str(d / "evil.pt")),
     ValueError, "weights file"),
    ("models.parse_model('stack:0')", lambda d: parse_model("stack:0"), ValueError, "stack"),
]


def _run_api(case, d):
    _, fn, etype, needle = case
    with pytest.raises(etype) as info:
        fn(d)
    return info.value


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input_raises_naming_the_argument(case, files):
    exc = _run_api(case, files)
    assert case[3] in str(exc), str(exc)
    last = traceback.extract_tb(exc.__traceback__)[-1].filename
    assert os.path.abspath(last).startswith(ERF_DIR + os.sep), f"raised from {last}, not from erf"


# ------------------------------------------------------------------------------ the table: CLI
_S = ["map", "stack:3", "--input-shape", "1x16x16", "--n-inputs", "2", "--no-progress"]
CLI_CASES = [
    ("map (no MODEL)", lambda d: ["map"], "MODEL"),
    ("map foo", lambda d: ["map", "foo"], "model spec"),
    ("map pool:nosuch", lambda d: ["map", "pool:nosuch"], "pooling module"),
    ("map stack:0", lambda d: ["map", "stack:0"], "stack"),
    ("map stack:3 --input-shape 3x0x16", lambda d: ["map", "stack:3", "--input-shape", "3x0x16"], "--input-shape"),
    ("map stack:3 --input-shape 64", lambda d: ["map", "stack:3", "--input-shape", "64"], "--input-shape"),
    ("map stack:3 --input-shape 1x16 (2-D net)", lambda d: ["map", "stack:3", "--input-shape", "1x16"],
     "--input-shape"),
    ("map pool:max --input-shape 3x4x4 (too small)", lambda d: ["map", "pool:max", "--input-shape", "3x4x4"],
     "--input-shape"),
    ("map FILE.py:conv --input-shape 3x16x16 (1-channel net)",
     lambda d: ["map", f"{d / 'tuple.py'}:conv", "--input-shape", "3x16x16"], "--input-shape"),
    ("map ... --unit 40,40", lambda d: _S + ["--unit", "40,40"], "--unit"),
    ("map ... --unit a,b", lambda d: _S + ["--unit", "a,b"], "--unit"),
    ("map ... --channel 5 (1 channel)", lambda d: _S + ["--channel", "5"], "--channel"),
    ("map ... --channel x", lambda d: _S + ["--channel", "x"], "--channel"),
    ("map ... --layer nosuch", lambda d: _S + ["--layer", "nosuch"], "--layer"),
    ("map ... --init xavier", lambda d: _S + ["--init", "xavier"], "--init"),
    ("map ... --reduce median", lambda d: _S + ["--reduce", "median"], "--reduce"),
    ("map ... --method saliency", lambda d: _S + ["--method", "saliency"], "--method"),
    ("map ... --n-inputs 0", lambda d: ["map", "stack:3", "--n-inputs", "0"], "--n-inputs"),
    ("map ... --draws -2", lambda d: _S + ["--draws", "-2"], "--draws"),
    ("map ... --batch-size 0", lambda d: _S + ["--batch-size", "0"], "--batch-size"),
    ("map ... --device tpu", lambda d: _S + ["--device", "tpu"], "--device"),
    ("map ... --inputs laplace", lambda d: _S + ["--inputs", "laplace"], "--inputs"),
    ("map ... --inputs images:/no/such", lambda d: _S + ["--inputs", "images:/no/such"], "--inputs"),
    ("map ... --format gif", lambda d: _S + ["--format", "gif"], "--format"),
    ("map ... --resume (no --checkpoint)", lambda d: _S + ["--resume"], "--resume"),
    ("map ... --checkpoint-every 0", lambda d: _S + ["--checkpoint", str(d / "c.npz"), "--checkpoint-every", "0"],
     "--checkpoint-every"),
    ("map ... --until-stderr -1", lambda d: _S + ["--until-stderr", "-1"], "--until-stderr"),
    ("map ... --until-stderr 0.1 --distributed", lambda d: _S + ["--until-stderr", "0.1", "--distributed"],
     "--until-stderr"),
    ("map ... --resume from a file that is no checkpoint",
     lambda d: _S + ["--checkpoint", str(d / "objects.npy"), "--resume"], "checkpoint"),
    ("map ... --weights /no/such.pt", lambda d: _S + ["--weights", "/no/such.pt"], "weights"),
    ("map ... --weights (another model's state dict)", lambda d: _S + ["--weights", str(d / "other.pt")],
     "weights"),
    ("map ... --weights (malicious pickle)", lambda d: _S + ["--weights", str(d / "evil.pt")], "weights"),
    ("map ... --weights W --draws 4", lambda d: _S + ["--weights", str(d / "other.pt"), "--draws", "4"],
     "--weights"),
    ("map FILE.py:make (model returns a tuple)", lambda d: ["map", f"{d / 'tuple.py'}:make", "--input-shape",
                                                           "1x16x16"], "--layer"),
    ("map FILE.py:flat (no spatial axes)", lambda d: ["map", f"{d / 'tuple.py'}:flat", "--input-shape", "1x16x16",
                                                      "--layer", "1"], "--layer"),
    ("map FILE.py:needs (factory needs arguments)", lambda d: ["map", f"{d / 'tuple.py'}:needs"], "factory"),
    ("map FILE.py:make (syntax error)", lambda d: ["map", f"{d / 'syntax.py'}:make"], "syntax error"),
    ("map missing.py:make", lambda d: ["map", "missing.py:make"], "model file"),
    ("trf stack:3 --unit 99,99", lambda d: ["trf", "stack:3", "--unit", "99,99"], "--unit"),
    ("compare --pools max,nosuch", lambda d: ["compare", "--pools", "max,nosuch"], "pooling module"),
    ("theory --depth 0", lambda d: ["theory", "--depth", "0"], "--depth"),
    ("growth --acts foo", lambda d: ["growth", "--acts", "foo"], "--acts"),
    ("nosuch (unknown command)", lambda d: ["nosuch"], "invalid choice"),
]


def _run_cli(case, d, capsys):
    code = main(case[1](d))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_exits_2_with_one_line(case, files, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the repository
    code, out, err = _run_cli(case, files, capsys)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and case[2] in err, err
    assert not (files / "pwned_cli").exists()


def test_table_is_large_and_distinct():
    assert len(API_CASES) + len(CLI_CASES) >= 30 and len(CLI_CASES) >= 12
    names = [c[0] for c in API_CASES + CLI_CASES]
    assert len(set(names)) == len(names)


# ------------------------------------------------------------------------------ warnings, the caller's model
def test_train_mode_with_batchnorm_warns_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 1, 3))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="BatchNorm"):
        E(model, (1, 12, 12), train_mode=True, init="normal", draws=2, **K)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert all(p.requires_grad for p in model.parameters())


class _Raises(nn.Module):
    """Identity that raises on the ``n``-th forward call (module level counter: the engine copies models)."""

    calls = {"n": 0}

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        _Raises.calls["n"] = 0

    def forward(self, x):
        _Raises.calls["n"] += 1
        if _Raises.calls["n"] == self.n:
            raise RuntimeError("boom in forward")
        return x


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


@pytest.mark.parametrize("method", ["gradient", "guided_backprop"])
@pytest.mark.parametrize("layer", [None, "3", "2"])
def test_no_hook_left_after_a_failure_mid_run(method, layer):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), _Raises(3), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    mine = model[0].register_forward_hook(lambda m, i, o: None)  # the caller's own hook stays
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):  # mid-run (a failure in the probe would be a ValueError)
        E(model, (1, 12, 12), n_inputs=12, batch_size=2, layer=layer, method=method, crop=False, progress=False)
    assert _Raises.calls["n"] == 3
    assert _hooks(model) == 1 and list(model[0]._forward_hooks.values())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mine.remove()
    assert _hooks(model) == 0


# ------------------------------------------------------------------------------ safe loading
def test_malicious_pickles_are_refused_and_do_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"conv0.weight": _Evil(marker)}, evil)
    code = main(["map", "stack:3", "--input-shape", "1x16x16", "--weights", str(evil), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "would run code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    with pytest.raises(ValueError, match="would run code"):
        load_weights(conv_stack(3, in_channels=1), str(evil))
    assert not marker.exists()
    # result and checkpoint files: numpy object arrays (pickles) are refused
    obj = tmp_path / "obj.npz"
    np.savez(obj, map=np.array([_Evil(marker)], dtype=object), meta=np.array("{}"), state=np.array([_Evil(marker)],
                                                                                                    dtype=object))
    with pytest.raises(ValueError, match="not an erf result"):
        erf.load(obj)
    code = main(["map", "stack:3", "--input-shape", "1x16x16", "--checkpoint", str(obj), "--resume", "--out",
                 str(tmp_path)])
    assert code == 2 and "checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    # control: the file really runs code when loaded unsafely, so the checks above can fail
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------ kills and Ctrl-C from the CLI
_N, _DRAWS = 24, 3
_RUN = ["map", "stack:4:relu", "--input-shape", "1x16x16", "--init", "normal", "--draws", str(_DRAWS),
        "--n-inputs", str(_N), "--batch-size", "2", "--seed", "7", "--no-progress"]
_NPZ = "map_stack-4-relu.npz"
_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")


def _cmd(*extra):
    return [sys.executable, "-m", "erf", *_RUN, *map(str, extra)]


def _in_process(*extra) -> int:
    """``main`` here, on one thread like the subprocesses (the same arithmetic, without their start-up)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return main([*_RUN, *map(str, extra)])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    assert _in_process("--out", out) == 0
    return erf.load(out / _NPZ)


def _stamp(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _checkpoint_state(path):
    """The checkpoint, read as resume reads it (no pickle); raises when it is corrupt."""
    with np.load(path, allow_pickle=False) as z:
        state = json.loads(str(z["state"]))
        for key in z.files:
            z[key]  # every array must read back
    return state


def _assert_same(result, reference):
    assert result.n == reference.n == _N * _DRAWS
    assert np.array_equal(result.map, reference.map)
    assert np.array_equal(result.stderr, reference.stderr)


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, reference):
    rng = random.Random(20240607)
    ckpt, out = tmp_path / "run.ckpt.npz", tmp_path / "out"
    log, t_start = [], time.monotonic()
    for attempt in range(4):
        before = _stamp(ckpt)
        t0 = time.monotonic()
        proc = subprocess.Popen(_cmd("--checkpoint", ckpt, "--checkpoint-every", 1, "--resume", "--out", out),
                                env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # kill after a random number of this process's checkpoint writes (so every attempt progresses,
        # whatever the machine's speed) plus a random moment, often in the middle of the next write
        writes, extra, seen, last = rng.randint(1, 6), rng.uniform(0.0, 0.02), 0, before
        while seen < writes and proc.poll() is None and time.monotonic() - t0 < 120:
            stamp = _stamp(ckpt)
            if stamp != last:
                seen, last = seen + 1, stamp
            time.sleep(0.001)
        time.sleep(extra)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        state = _checkpoint_state(ckpt) if ckpt.exists() else None
        if (out / _NPZ).exists():
            erf.load(out / _NPZ)  # a result file, if written, is whole
        log.append({"attempt": attempt, "kill_after_s": round(time.monotonic() - t0, 2),
                    "after_checkpoint_writes": writes, "extra_delay_s": round(extra, 4),
                    "finished_before_kill": finished,
                    "checkpoint_at": None if state is None else (state["draw"], state["start"])})
        if finished:
            break
    positions = [e["checkpoint_at"] for e in log if e["checkpoint_at"] is not None]
    assert positions == sorted(positions) and positions[0] != (0, 0)
    assert sum(not e["finished_before_kill"] for e in log) >= 3  # the kills did land mid-run
    t0 = time.monotonic()
    assert _in_process("--checkpoint", ckpt, "--checkpoint-every", 1, "--resume", "--out", out) == 0
    _assert_same(erf.load(out / _NPZ), reference)
    log.append({"final_resume_s": round(time.monotonic() - t0, 2), "total_s": round(time.monotonic() - t_start, 2)})
    print("sigkill runs:", json.dumps(log))


def test_ctrl_c_saves_exits_130_with_one_line_and_resume_is_bit_identical(tmp_path, reference):
    ckpt, out = tmp_path / "run.ckpt.npz", tmp_path / "out"
    proc = subprocess.Popen(_cmd("--checkpoint", ckpt, "--checkpoint-every", 1, "--out", out), env=_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)  # also when pytest runs with SIGINT ignored
    t0 = time.monotonic()
    while not ckpt.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.002)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and "--resume" in stderr, stderr
    state = _checkpoint_state(ckpt)
    assert 0 < state["draw"] * _N + state["start"] <= _N * _DRAWS
    assert not (out / _NPZ).exists()
    assert _in_process("--checkpoint", ckpt, "--resume", "--out", out) == 0
    _assert_same(erf.load(out / _NPZ), reference)


# ------------------------------------------------------------------------------ --distributed, --until-stderr
def test_distributed_without_torchrun_runs_as_one_process(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["map", "stack:2", "--input-shape", "1x12x12", "--n-inputs", "4", "--no-progress", "--distributed"]
    code = main(argv + ["--json", "--out", str(tmp_path / "one")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "single process" in err and "Traceback" not in err
    summary = json.loads(out)
    assert summary["n"] == 4 and len(summary["files"]) == 2
    result = erf.load(tmp_path / "one" / "map_stack-2.npz")
    assert result.n == 4 and "world_size" not in result.meta
    # on a rank other than 0 nothing is written or printed
    monkeypatch.setattr(erf.distributed, "is_main_process", lambda: False)
    code = main(argv + ["--out", str(tmp_path / "other")])
    out, err = capsys.readouterr()
    assert code == 0 and out == "" and not (tmp_path / "other").exists()


def test_until_stderr_end_to_end(tmp_path, capsys):
    code = main(["map", "stack:3:relu", "--init", "normal", "--input-shape", "1x16x16", "--n-inputs", "512",
                 "--batch-size", "16", "--until-stderr", "0.1", "--json", "--no-progress", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 16 <= json.loads(out)["n"] < 512
    r = erf.load(tmp_path / "map_stack-3-relu.npz")
    assert r.config["until_stderr"] == 0.1 and r.n < 512
    centre = r.map >= 0.5 * r.map.max()
    assert r.stderr[centre].mean() / r.map[centre].mean() < 0.1


# ------------------------------------------------------------------------------ fuzzing the parsers
_COMMANDS = ["map", "compare", "trf", "theory", "growth", "pools", "nosuch", "--version", "-h"]
_TOKENS = ["stack:3", "pool:max", "--input-shape", "3x64x64", "1x8x8", "0x1x1", "--n-inputs", "--draws",
           "--batch-size", "--checkpoint", "--checkpoint-every", "--resume", "--until-stderr", "--distributed",
           "--unit", "8,8", "-1,2", "--channel", "0,5", "--layer", "--init", "ones", "--reduce", "abs", "--method",
           "--seed", "--out", "--format", "svg", "--json", "--pools", "max,avg", "--depths", "8,16", "--acts",
           "--weights", "--inputs", "gaussian", "0", "-3", "1e9", "nan", "inf", "--", "-", "--help", "x"]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(_COMMANDS),
       rest=st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=10)), max_size=8))
def test_fuzz_cli_parser_never_tracebacks(command, rest):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        args = cli._parse([command] + rest)
        if not isinstance(args, int) and args.command == "map":
            try:  # the option checks of `map` that run before any work
                cli._engine_kwargs(args)
                if args.input_shape:
                    erf.models.parse_input_shape(args.input_shape)
            except (ValueError, TypeError, cli.UsageError) as exc:
                assert str(exc).strip()
    if isinstance(args, int):
        assert args in (0, 2)
        if args == 2:
            assert len(err.getvalue().strip().splitlines()) == 1 and "Traceback" not in err.getvalue()


def _safe_import(name, package=None):
    if name in ("collections", "json", "erf.nets", "torch.nn"):
        return importlib.import_module(name)
    raise ImportError(f"fuzz: not importing {name!r}")


_PREFIXES = ["", "pool:", "stack:", "stack:3:", "torchvision:", "timm:", "x.py:", "collections:", "json:",
             "erf.nets:", "torch.nn:", ":"]


_EMPTY_DIR: list[str] = []


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=st.one_of(st.text(max_size=24), st.builds(lambda p, r: p + r, st.sampled_from(_PREFIXES),
                                                       st.text(max_size=16))))
def test_fuzz_model_spec_parser(spec):
    if not _EMPTY_DIR:
        _EMPTY_DIR.append(tempfile.mkdtemp(prefix="erf-fuzz-"))
    fake = types.SimpleNamespace(import_module=_safe_import, util=importlib.util)
    cwd = os.getcwd()
    os.chdir(_EMPTY_DIR[0])  # relative FILE.py specs resolve in an empty folder: no file of ours is run
    try:
        with mock.patch("erf.models.importlib", fake):
            try:
                result = parse_model(spec)
            except (ValueError, TypeError) as exc:
                assert str(exc).strip()
            else:
                assert callable(result.build) and len(result.default_input_shape) in (2, 3, 4)
    finally:
        os.chdir(cwd)
