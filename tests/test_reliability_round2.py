"""Reliability, round two (issue 15): one table-driven test per numbered item of the issue.

1. never mix different models/inputs/code on resume or merge; 2. never lose a finished run;
3. no wrong number with exit 0; 4. output paths checked before computing (full and read-only disks);
5. memory; 6. user code and files; 7. signals; 8. smaller ones; 9. pooling modules.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import erf
from erf import cli
from erf.cli import main
from erf.engine import RunInterrupted
from _signals import default_signals

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(erf.__file__))))
KW = dict(n_inputs=8, batch_size=4, progress=False, device="cpu")
SHAPE = (1, 12, 12)


def _conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ============================================================================== item 1: never mix
_CODE_A = "import torch.nn as nn\nclass Net(nn.Sequential):\n    pass\n"
_CODE_B = ("import torch.nn as nn\nclass Net(nn.Sequential):\n    def forward(self, x):\n"
           "        return super().forward(x) * 2\n")


def _module_from(path, text: str, tag: str):
    import importlib.util

    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_i15_{tag}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.Net(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1))


def _images(folder, n: int, value: int = 0):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((12, 12, 3), (40 * i + value) % 255, dtype=np.uint8)).save(folder / f"{i}.png")


# each case: (what changes, first run kwargs maker, second run kwargs maker, word the refusal names)
def _case_weights(tmp):
    return dict(model=_conv(0)), dict(model=_conv(1)), "weights"


def _case_inputs_tensor(tmp):
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    return dict(model=_conv(), inputs=x), dict(model=_conv(), inputs=x + 1), "inputs"


def _case_code(tmp):
    return (dict(model=_module_from(tmp / "a.py", _CODE_A, "a")),
            dict(model=_module_from(tmp / "b.py", _CODE_B, "b")), "code")


def _case_images(tmp):
    _images(tmp / "imgs", 4)
    first = dict(model=lambda: nn.Conv2d(3, 1, 3, padding=1), inputs=f"images:{tmp / 'imgs'}")
    return first, dict(first), "inputs"


def _change_images(tmp):
    time.sleep(0.01)
    _images(tmp / "imgs", 4, value=7)  # same names, other contents (sizes may match: mtimes differ)


_MIX = [("weights", _case_weights, None), ("inputs tensor", _case_inputs_tensor, None),
        ("forward code", _case_code, None), ("images folder", _case_images, _change_images)]


@pytest.mark.parametrize("name,case,between", _MIX, ids=[m[0] for m in _MIX])
def test_item1_resume_and_merge_refuse_other_models_inputs_or_code(name, case, between, tmp_path):
    first, second, word = case(tmp_path)
    shape = (3, 12, 12) if "images" in name else SHAPE
    ckpt = tmp_path / "run.ckpt.npz"
    a = erf.effective_rf(first.pop("model"), shape, checkpoint=ckpt, **first, **KW)
    if between is not None:
        between(tmp_path)
    model = second.pop("model")
    with pytest.raises(ValueError, match=rf"another configuration \(differs in .*{word}"):
        erf.effective_rf(model, shape, checkpoint=ckpt, resume=True, **second, **KW)
    b = erf.effective_rf(model, shape, first_draw=1, **second, **KW)
    with pytest.raises(ValueError, match=word):
        a.merge(b)


def test_item1_same_values_resume_and_merge_and_saved_results_keep_the_fingerprint(tmp_path):
    ckpt = tmp_path / "run.ckpt.npz"
    x = torch.randn(8, *SHAPE)
    a = erf.effective_rf(_conv(0), SHAPE, checkpoint=ckpt, inputs=x, **KW)
    again = erf.effective_rf(_conv(0), SHAPE, checkpoint=ckpt, resume=True, inputs=x.clone(), **KW)
    assert np.array_equal(again.map, a.map)  # a new module with the same values is the same model
    b = erf.effective_rf(_conv(0), SHAPE, inputs=x, first_draw=1, **KW)
    a.merge(b)
    a.save(tmp_path / "a.npz")
    erf.effective_rf(_conv(1), SHAPE, inputs=x, first_draw=1, **KW).save(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="weights"):
        erf.load(tmp_path / "a.npz").merge(erf.load(tmp_path / "c.npz"))
    assert set(a.config["fingerprint"]) == {"weights", "code", "inputs", "erf"}


def test_item1_cli_resume_with_other_weights_is_refused(tmp_path, capsys):
    from erf.nets import conv_stack

    for i, name in enumerate(("A.pt", "B.pt")):
        torch.manual_seed(i)
        torch.save(conv_stack(3, in_channels=1).state_dict(), tmp_path / name)
    base = ["map", "stack:3", "--input-shape", "1x16x16", "--n-inputs", "4", "--no-progress",
            "--checkpoint", tmp_path / "ck.npz", "--out", tmp_path]
    code, _, err = _run(capsys, *base, "--weights", tmp_path / "A.pt")
    assert code == 0, err
    code, out, err = _run(capsys, *base, "--weights", tmp_path / "B.pt", "--resume")
    assert code == 2 and "weights" in err and "Traceback" not in err, err


# ============================================================================== item 2: never lose a run
def _fail(*_a, **_k):
    raise RuntimeError("this model cannot be traced")


_ZERO = "import torch.nn as nn\nclass Z(nn.Module):\n    def forward(self, x):\n        return x[:, :1] * 0\ndef make():\n    return Z()\n"
_PARTIAL = [("TRF fails", "stack:3", "erf.trf.theoretical_rf", "TRF"),
            ("figure fails", "stack:3", "erf.plot.map_figure", "figure"),
            ("all-zero map", "FILE", None, "moments")]


@pytest.mark.parametrize("name,model,patch,analysis", _PARTIAL, ids=[p[0] for p in _PARTIAL])
def test_item2_a_failing_analysis_keeps_the_map(name, model, patch, analysis, tmp_path, capsys, monkeypatch):
    if patch is not None:
        mod, _, attr = patch.rpartition(".")
        monkeypatch.setattr(sys.modules[mod] if mod in sys.modules else __import__(mod, fromlist=[attr]), attr, _fail)
    if model == "FILE":
        (tmp_path / "zero.py").write_text(_ZERO)
        model = f"{tmp_path / 'zero.py'}:make"
    code, out, err = _run(capsys, "map", model, "--input-shape", "1x16x16", "--n-inputs", "2", "--no-progress",
                          "--json", "--out", tmp_path / "o")
    assert code == cli.EXIT_PARTIAL, err
    assert f"the {analysis} analysis failed" in err and "Traceback" not in err
    summary = json.loads(out)
    npz = [f for f in summary["files"] if f.endswith(".npz")]
    assert npz and erf.load(npz[0]).n == 2 and analysis in summary["failed"]


def test_item2_npz_is_written_before_the_figure(tmp_path, capsys, monkeypatch):
    order = []
    real_save = erf.engine.ERFResult.save
    monkeypatch.setattr(erf.engine.ERFResult, "save", lambda self, p: order.append("npz") or real_save(self, p))
    from erf import plot

    real_fig = plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda f, p: order.append("figure") or real_fig(f, p))
    assert _run(capsys, "map", "stack:2", "--input-shape", "1x12x12", "--n-inputs", "2", "--no-progress",
                "--out", tmp_path)[0] == 0
    assert order == ["npz", "figure"]


# ============================================================================== item 4: outputs first
@contextlib.contextmanager
def _tmpfs(path, options: str):
    """A small tmpfs at ``path`` (root on Linux); skips the test where it cannot be mounted."""
    path.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount(8) for a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path):
    with contextlib.suppress(OSError), open(path / "filler", "wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()


def _file_at(d, *rest):
    (d / "f").write_text("x")
    return d.joinpath("f", *rest)


_OUT_CASES = [("a file", lambda d: _file_at(d), "is a file"),
              ("under a file", lambda d: _file_at(d, "sub"), "is a file"),
              ("read-only", "ro", "read-only"), ("full disk", "full", "disk is full")]


@pytest.mark.parametrize("name,make,words", _OUT_CASES, ids=[c[0] for c in _OUT_CASES])
def test_item4_out_is_checked_before_the_computation(name, make, words, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(erf.engine, "effective_rf", lambda *a, **k: calls.append(1))
    with contextlib.ExitStack() as stack:
        if make == "ro":
            out = stack.enter_context(_tmpfs(tmp_path / "m", "ro,size=64k"))
        elif make == "full":
            out = stack.enter_context(_tmpfs(tmp_path / "m", "size=16k"))
            _fill(out)
        else:
            out = make(tmp_path)
        code, _, err = _run(capsys, "map", "stack:2", "--input-shape", "1x12x12", "--no-progress", "--out", out)
    assert code == 2 and words in err and "--out" in err and not calls, err


def test_item4_full_disk_during_writing(tmp_path, capsys):
    with _tmpfs(tmp_path / "m", "size=12k") as out:  # the write test passes, the .npz (~25 kB) cannot fit
        code, _, err = _run(capsys, "map", "stack:2", "--input-shape", "1x40x40", "--n-inputs", "2",
                            "--no-progress", "--out", out)
        assert code == 1 and "could not write" in err and "nothing was written" in err, err
        assert os.listdir(out) == []  # neither the figure nor a temporary file
    with _tmpfs(tmp_path / "m2", "size=24k") as out:  # the .npz fits, the figure does not
        code, _, err = _run(capsys, "map", "stack:2", "--input-shape", "1x12x12", "--n-inputs", "2",
                            "--no-progress", "--out", out)
        assert code == cli.EXIT_PARTIAL and "figure" in err, err
        assert sorted(os.listdir(out)) == ["map_stack-2.npz"]
        assert erf.load(out / "map_stack-2.npz").n == 2


# ============================================================================== item 6: user code and files
_EXIT_FILES = {"exit_import.py": "import sys\nsys.exit(0)\n",
               "exit_factory.py": "import sys\ndef make():\n    sys.exit(3)\n",
               "raise_import.py": "import torch.nn as nn\n\nraise RuntimeError('no GPU here')\n"}
_USER_CODE = [("sys.exit at import", "exit_import.py", "sys.exit(0)"),
              ("sys.exit in factory", "exit_factory.py", "sys.exit(3)"),
              ("error at import names the file", "raise_import.py", "raise_import.py' raised RuntimeError at line 3")]


@pytest.mark.parametrize("name,fname,words", _USER_CODE, ids=[c[0] for c in _USER_CODE])
def test_item6_user_code_cannot_exit_or_hide_its_file(name, fname, words, tmp_path, capsys):
    (tmp_path / fname).write_text(_EXIT_FILES[fname])
    code, _, err = _run(capsys, "map", f"{tmp_path / fname}:make", "--input-shape", "1x12x12", "--no-progress",
                        "--out", tmp_path)
    assert code == 2 and words in err and "Traceback" not in err, err


def test_item6_api_factory_calling_sys_exit_raises_value_error():
    def factory():
        sys.exit(0)

    with pytest.raises(ValueError, match="sys.exit"):
        erf.effective_rf(factory, SHAPE, **KW)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _not_zip(p):
    p.write_bytes(b"PK\x03\x04" + b"\0" * 40)


def _rewrite(p, **changes):
    """The file with some arrays or metadata changed (a hand-made file with a valid layout)."""
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = "meta" if "meta" in arrays else "state"
    meta = json.loads(str(arrays[key]))
    for k, v in changes.items():
        if k in meta:
            meta[k] = v
        else:
            arrays[k] = v
    arrays[key] = np.array(json.dumps(meta))
    np.savez(p, **arrays)


def _deep_json(p):
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = "meta" if "meta" in arrays else "state"
    arrays[key] = np.array("[" * 100000 + "]" * 100000)
    np.savez(p, **arrays)


_BAD_RESULTS = [("truncated", _truncate, "not an erf result"), ("not a zip", _not_zip, "not an erf result"),
                ("deep json", _deep_json, "not an erf result"),
                ("negative n", lambda p: _rewrite(p, n=-3), "n must be"),
                ("fractional n", lambda p: _rewrite(p, n=2.5), "n must be"),
                ("map of other shape", lambda p: _rewrite(p, map=np.zeros((3, 3))), "shape"),
                ("complex map", lambda p: _rewrite(p, map=np.zeros((12, 12), complex)), "complex"),
                ("nan in m2", lambda p: _rewrite(p, m2=np.full((12, 12), np.nan)), "NaN"),
                ("negative m2", lambda p: _rewrite(p, m2=-np.ones((12, 12))), "negative")]


@pytest.mark.parametrize("name,damage,words", _BAD_RESULTS, ids=[c[0] for c in _BAD_RESULTS])
def test_item6_load_refuses_damaged_or_inconsistent_result_files(name, damage, words, tmp_path):
    path = erf.effective_rf(_conv(), SHAPE, **KW).save(tmp_path / "r.npz")
    damage(tmp_path / "r.npz")
    with pytest.raises(ValueError, match=words):
        erf.load(path)


_BAD_CHECKPOINTS = [("truncated", _truncate, "not a readable"), ("not a zip", _not_zip, "not a readable"),
                    ("deep json", _deep_json, "not a readable"),
                    ("negative n", lambda p: _rewrite(p, n0=np.array(-3.0)), "n must be"),
                    ("mean of other shape", lambda p: _rewrite(p, mean0=np.zeros((5, 5))), "shape"),
                    ("complex m2", lambda p: _rewrite(p, m2_0=np.zeros((12, 12), complex)), "complex"),
                    ("draw out of range", lambda p: _rewrite(p, draw=99), "draw 99"),
                    ("negative start", lambda p: _rewrite(p, start=-1), "start")]


@pytest.mark.parametrize("name,damage,words", _BAD_CHECKPOINTS, ids=[c[0] for c in _BAD_CHECKPOINTS])
def test_item6_resume_refuses_damaged_or_hand_made_checkpoints(name, damage, words, tmp_path):
    ckpt = tmp_path / "ck.npz"
    with pytest.raises(RunInterrupted):  # a partial checkpoint with a valid fingerprint
        erf.effective_rf(_conv(), SHAPE, checkpoint=ckpt, checkpoint_every=1,
                         inputs=_InterruptingInputs(), **KW_IT)
    damage(ckpt)
    with pytest.raises(ValueError, match=words):
        erf.effective_rf(_conv(), SHAPE, checkpoint=ckpt, resume=True, inputs=_InterruptingInputs(never=True),
                         **KW_IT)


class _InterruptingInputs:
    """Four batches of two inputs; Ctrl-C after the second (unless ``never``)."""

    def __init__(self, never: bool = False):
        self.never = never

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(4):
            if i == 2 and not self.never:
                raise KeyboardInterrupt
            yield torch.randn(2, *SHAPE, generator=g)


KW_IT = dict(batch_size=2, progress=False, device="cpu")

_PATHS = [("checkpoint is a folder", lambda d: dict(checkpoint=d), "folder"),
          ("checkpoint exists, no resume", lambda d: (d / "c.npz").write_bytes(b"x") and dict(checkpoint=d / "c.npz"),
           "resume=True"),
          ("checkpoint under a file", lambda d: dict(checkpoint=_file_at(d, "c.npz")), "is a file")]


@pytest.mark.parametrize("name,make,words", _PATHS, ids=[c[0] for c in _PATHS])
def test_item6_checkpoint_paths_are_checked_before_the_run(name, make, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        erf.effective_rf(_conv(), SHAPE, **make(tmp_path), **KW)


def test_item6_cli_existing_checkpoint_needs_resume_or_overwrite_and_save_needs_a_name(tmp_path, capsys):
    base = ["map", "stack:2", "--input-shape", "1x12x12", "--n-inputs", "2", "--no-progress",
            "--checkpoint", tmp_path / "ck.npz", "--out", tmp_path]
    assert _run(capsys, *base)[0] == 0
    before = (tmp_path / "ck.npz").read_bytes()
    code, _, err = _run(capsys, *base)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "ck.npz").read_bytes() == before  # earlier progress untouched
    assert _run(capsys, *base, "--overwrite")[0] == 0
    code, _, err = _run(capsys, *base[:-4], "--checkpoint", tmp_path, "--out", tmp_path)
    assert code == 2 and "folder" in err
    res = erf.effective_rf(_conv(), SHAPE, **KW)
    for bad in ("", str(tmp_path) + os.sep, tmp_path):
        with pytest.raises(ValueError, match="path"):
            res.save(bad)
    assert not (tmp_path / ".npz").exists()


# ============================================================================== item 7: signals
_RUN = ["map", "stack:4:relu", "--input-shape", "1x16x16", "--init", "normal", "--draws", "2", "--n-inputs", "24",
        "--batch-size", "2", "--seed", "7", "--no-progress"]


def test_item7_sigterm_saves_the_checkpoint_and_exits_143(tmp_path):
    ckpt, out = tmp_path / "ck.npz", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "erf", *_RUN, "--checkpoint", str(ckpt), "--checkpoint-every",
                             "1", "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_signals)
    t0 = time.monotonic()
    while not ckpt.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.002)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_TERMINATED, stderr
    assert "Traceback" not in stderr and "SIGTERM" in stderr and "--resume" in stderr and "saved" in stderr
    with np.load(ckpt, allow_pickle=False) as z:
        state = json.loads(str(z["state"]))
    assert 0 < state["draw"] * 24 + state["start"] <= 48
    assert not (out / "map_stack-4-relu.npz").exists()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*_RUN, "--checkpoint", str(ckpt), "--resume", "--out", str(out)]) == 0
    assert erf.load(out / "map_stack-4-relu.npz").n == 48


_EARLY = [("before the first checkpoint", KeyboardInterrupt, False, 130, "nothing was saved"),
          ("sigterm before the first checkpoint", cli._Terminated, False, 143, "nothing was saved"),
          ("earlier checkpoint on disk", KeyboardInterrupt, True, 130, "holds the earlier progress")]


@pytest.mark.parametrize("name,exc,existing,status,words", _EARLY, ids=[c[0] for c in _EARLY])
def test_item7_messages_are_true_to_the_state_on_disk(name, exc, existing, status, words, tmp_path, capsys,
                                                        monkeypatch):
    def interrupted(*_a, **_k):
        raise exc()

    monkeypatch.setattr(erf.engine, "effective_rf", interrupted)
    ckpt = tmp_path / "ck.npz"
    if existing:
        ckpt.write_bytes(b"earlier")
    code, _, err = _run(capsys, *_RUN, "--checkpoint", ckpt, "--out", tmp_path, *(["--resume"] if existing else []))
    assert code == status and words in err and "progress saved" not in err, err
    assert ckpt.exists() == existing


def test_item7_ctrl_c_during_import_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "erf", *_RUN, "--out", str(tmp_path)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    time.sleep(1.0)  # python is up (its SIGINT handler set); torch is still being imported
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr, stderr


# ============================================================================== item 9: pooling modules
from erf.pooling import blur as _blur  # noqa: E402
from erf.pooling.dynopool import DynOPool2d  # noqa: E402
from erf.pooling.fractional import FractionalMaxPool2d  # noqa: E402
from erf.pooling.lp import LpPool2d, lp_pool2d  # noqa: E402
from erf.pooling.rank import MedianPool2d, RankPool2d  # noqa: E402
from erf.pooling.second_order import isqrt_cov_pool  # noqa: E402
from erf.pooling.softpool import SoftPool2d, soft_pool2d  # noqa: E402
from erf.pooling.stochastic import S3Pool2d  # noqa: E402


@pytest.mark.parametrize("scale", [1e-4, 1e-5, 1e-3])
def test_item9_covariance_float32_is_accurate_on_small_features(scale):
    x = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    ref = isqrt_cov_pool(x)
    got = isqrt_cov_pool(x.float()).double()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3  # was 2e-2 at 1e-4 and 0.76 at 1e-5
    assert isqrt_cov_pool(torch.ones(1, 3, 4, 4)).abs().max() == 0  # a constant input: cov 0, no NaN


@pytest.mark.parametrize("p", [0.25, 0.5, 0.9, 1.0, 2.0])
def test_item9_lp_pool_gradients_are_finite_on_exact_zeros(p):
    x = torch.relu(torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    y = LpPool2d(p, 2)(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    ref = (x.detach().abs() ** p).reshape(1, 2, 4, 2, 4, 2).sum((3, 5)) ** (1 / p)  # the definition
    assert torch.allclose(y.detach(), ref, rtol=1e-5, atol=1e-6)
    nz = x.detach() > 0  # where |x| > 0 the gradient is the analytic one
    win = (x.detach() ** p).reshape(1, 2, 4, 2, 4, 2).sum((3, 5), keepdim=True)
    g = (win ** (1 / p - 1) * x.detach().reshape(1, 2, 4, 2, 4, 2) ** (p - 1)).reshape(1, 2, 8, 8)
    assert torch.allclose(x.grad[nz], g[nz], rtol=1e-4)
    assert torch.isfinite(lp_pool2d(torch.zeros(1, 1, 4, 4, requires_grad=True), 0.5)).all()


def _support(module, size: int, unit: int, trials: int = 6) -> tuple[int, int]:
    """Rows whose gradient reaches output row ``unit`` (union over random inputs), as a range."""
    rows = torch.zeros(size, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        x = torch.randn(1, 1, size, 5, generator=g, dtype=torch.float64).requires_grad_(True)
        module(x)[0, 0, unit].sum().backward()
        rows |= x.grad[0, 0].abs().sum(1) > 0
    idx = rows.nonzero().flatten()
    return int(idx.min()), int(idx.max())


_BLUR = [("blur", lambda: _blur.BlurPool2d(1), s) for s in (7, 8, 9, 12)] + \
        [("maxblur", lambda: _blur.MaxBlurPool2d(1), s) for s in (8, 9, 10, 13)] + \
        [("blur replicate", lambda: _blur.BlurPool2d(1, pad_mode="replicate"), s) for s in (7, 8)]


@pytest.mark.parametrize("name,make,size", _BLUR, ids=[f"{b[0]}-{b[2]}" for b in _BLUR])
def test_item9_blur_rf_spans_hold_the_gradient_support_of_every_unit(name, make, size):
    m = make().double()
    n_out = m(torch.zeros(1, 1, size, 5, dtype=torch.float64)).shape[-2]
    for unit in range(n_out):
        lo, hi = _support(m, size, unit)
        first, last = m.rf_input_span(0, unit, unit, size, n_out)
        assert first <= lo and hi <= last, (unit, (lo, hi), (first, last))  # never smaller than the support
        if name.startswith("blur"):  # positive weights: the span is the support, clipped to the input
            assert (max(first, 0), min(last, size - 1)) == (lo, hi)
    rep = erf.theoretical_rf(nn.Sequential(make()), (1, size, 5), unit=(n_out - 1, 0))
    lo, hi = _support(m, size, n_out - 1)
    assert rep.region[0][0] <= lo and hi <= rep.region[0][1], rep.region


@pytest.mark.parametrize("size,expected", [(5, 3), (7, 4), (9, 5), (11, 6), (8, 4), (1, 1), (3, 2)])
def test_item9_dynopool_output_size_rounds_half_up(size, expected):
    m = DynOPool2d(2.0)
    assert m(torch.randn(1, 1, size, size)).shape[-2:] == (expected, expected)
    assert float(m.size_ratio((size, size))) == pytest.approx(1.0)


_PAD = [("softpool", lambda: SoftPool2d(2, 2, padding=2)), ("median", lambda: MedianPool2d(3, 2, padding=2)),
        ("rank", lambda: RankPool2d(3, 2, padding=2)), ("lp", lambda: LpPool2d(2, 2, padding=2)),
        ("softpool functional", lambda: soft_pool2d(torch.randn(1, 1, 6, 6), 2, 2, padding=2)),
        ("negative", lambda: SoftPool2d(2, 2, padding=-1))]


@pytest.mark.parametrize("name,make", _PAD, ids=[p[0] for p in _PAD])
def test_item9_unfold_pools_refuse_padding_beyond_half_the_kernel(name, make):
    with pytest.raises(ValueError, match="padding"):
        make()
    assert torch.isfinite(SoftPool2d(2, 2, padding=1)(torch.randn(1, 1, 6, 6))).all()  # k/2 is allowed


@pytest.mark.parametrize("shape", [(1, 8), (8, 1), (1, 1), (2, 7)])
def test_item9_s3_eval_on_one_pixel_maps(shape):
    x = torch.randn(2, 3, *shape)
    train = S3Pool2d().train()(x)
    ev = S3Pool2d().eval()(x)
    assert ev.shape == train.shape and torch.isfinite(ev).all()
    if shape[0] == 1:  # one row: the eval map is the column expectation of the k2 s1 max row
        ref = S3Pool2d().eval()(torch.cat([x, x], -2))
        assert torch.allclose(ev, ref[..., :1, :], atol=1e-6)


def test_item9_fractional_output_size_declares_its_own_stride():
    m = FractionalMaxPool2d(3, output_size=10).eval()
    assert m(torch.randn(1, 1, 32, 24)).shape[-2:] == (10, 10)
    assert m.rf_rule().stride == pytest.approx((3.2, 2.4))
    rep = erf.theoretical_rf(nn.Sequential(FractionalMaxPool2d(3, output_size=10)), (1, 32, 24))
    assert rep.jump == pytest.approx((3.2, 2.4)) or tuple(rep.jump) == pytest.approx((3.2, 2.4))
    with pytest.raises(ValueError, match="forward"):
        FractionalMaxPool2d(3, output_size=10).rf_rule()


# ============================================================================== item 3: TRF without fx
import torch.nn.functional as F  # noqa: E402


class _Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) in front of various graph shapes."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(1, 1, 3, padding=1)
        self.big = nn.Conv2d(1, 1, 7, padding=3)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(1, 1, 5, padding=2)

    def forward(self, x):
        if x.sum() > -1e30:
            y = self.a(x)
        if self.kind == "chain":  # a plain chain (an in-place ReLU included): exact
            return self.b(self.relu(y))
        if self.kind == "branch":  # a residual branch the chain cannot see
            return self.b(y + self.big(x))
        if self.kind == "inplace":  # an in-place add of a functional convolution
            y += F.conv2d(x, x.new_ones(1, 1, 9, 9), padding=4)
            return self.b(y)
        return self.b(F.avg_pool2d(y, 3, 1, 1))  # a functional op between two modules


_TRF = [("chain", None, "exact"), ("branch", None, "unknown"), ("branch", "a", "exact"),
        ("inplace", None, "unknown"), ("functional", None, "unknown"), ("functional", "a", "exact")]


@pytest.mark.parametrize("kind,layer,expect", _TRF, ids=[f"{k}-{l}" for k, l, _ in _TRF])
def test_item3_trf_without_fx_is_exact_or_unknown_never_smaller(kind, layer, expect):
    model = _Untraceable(kind)
    support = erf.trf.empirical_trf(model, (1, 32, 32), layer=layer)
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        if expect == "unknown":
            with pytest.raises(erf.trf.TRFUnavailable, match="not a plain chain"):
                erf.theoretical_rf(model, (1, 32, 32), layer=layer)
            return
        rep = erf.theoretical_rf(model, (1, 32, 32), layer=layer)
    assert rep.size == support.size and tuple(map(tuple, rep.region)) == tuple(map(tuple, support.region))


def test_item3_result_of_an_unanalysable_model_has_no_trf_and_no_ratio(tmp_path):
    with pytest.warns(UserWarning):
        res = erf.effective_rf(_Untraceable("branch"), (1, 24, 24), **KW)
        assert res.trf is None and "not a plain chain" in res.trf_reason
        assert res.metrics["erf_trf_ratio"] is None
    res.save(tmp_path / "r.npz")
    assert "not a plain chain" in erf.load(tmp_path / "r.npz").trf_reason


# ============================================================================== item 5: memory
from erf import _memory  # noqa: E402


def _tree(tmp, files: dict[str, str], cgroup: str):
    for rel, text in files.items():
        p = tmp / "cg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp / "proc").write_text(cgroup)
    return str(tmp / "cg"), str(tmp / "proc")


_GIB = 1 << 30
_CGROUPS = [
    ("v2 limit", {"memory.max": f"{2 * _GIB}\n", "memory.current": f"{_GIB // 2}\n"}, "0::/\n", _GIB * 3 // 2),
    ("v2 unlimited", {"memory.max": "max\n", "memory.current": "100\n"}, "0::/\n", None),
    ("v2 nested, parent tighter", {"a/memory.max": f"{8 * _GIB}", "a/memory.current": "0", "a/b/memory.max": "max",
                                   "a/b/memory.current": "0", "memory.max": f"{_GIB}", "memory.current": "0"},
     "0::/a/b\n", _GIB),
    ("v2 page cache is reclaimable", {"memory.max": f"{2 * _GIB}", "memory.current": f"{_GIB}",
                                      "memory.stat": f"anon 1\ninactive_file {_GIB // 2}\n"}, "0::/\n", _GIB * 3 // 2),
    ("v1 limit", {"memory/memory.limit_in_bytes": f"{4 * _GIB}", "memory/memory.usage_in_bytes": f"{_GIB}"},
     "5:memory:/\n3:cpu,cpuacct:/\n", 3 * _GIB),
    ("v1 unlimited", {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "1"},
     "5:memory:/\n", None),
    ("v1 own group", {"memory/job/memory.limit_in_bytes": f"{_GIB}", "memory/job/memory.usage_in_bytes": "0",
                      "memory/memory.limit_in_bytes": "9223372036854771712"}, "7:memory:/job\n", _GIB),
    ("none", {}, "", None)]


@pytest.mark.parametrize("name,files,cgroup,expected", _CGROUPS, ids=[c[0] for c in _CGROUPS])
def test_item5_memory_comes_from_the_cgroup_limit(name, files, cgroup, expected, tmp_path):
    root, proc = _tree(tmp_path, files, cgroup)
    assert _memory.cgroup_available(root, proc) == expected


def test_item5_one_sample_that_cannot_fit_is_refused_and_train_mode_keeps_the_batch(monkeypatch):
    monkeypatch.setattr("erf._batch.free_memory", lambda device: 1 << 20)  # a 1 MiB container
    with pytest.raises(ValueError, match=r"input_shape \(1, 256, 256\): one sample needs about .* only 1.0 MiB"):
        erf.effective_rf(_conv(), (1, 256, 256), n_inputs=2, progress=False, device="cpu")
    monkeypatch.undo()
    res = erf.effective_rf(_conv(), SHAPE, n_inputs=4, batch_size=1, train_mode=True, progress=False, device="cpu")
    assert res.config["batch_size"] == 1


# ============================================================================== item 8: smaller ones
class _GlobalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.c(x) + self.bn(F.adaptive_avg_pool2d(self.c(x), 1))


def test_item8_batchnorm_after_global_pooling_in_train_mode_runs():
    with pytest.warns(UserWarning, match="BatchNorm"):
        res = erf.effective_rf(_GlobalBN(), SHAPE, n_inputs=4, batch_size=2, train_mode=True, progress=False,
                               device="cpu")
    assert res.n == 4 and np.isfinite(res.map).all()


@pytest.mark.parametrize("pool", ["s3", "fractional", "mixed", "stochastic"])
def test_item5_train_mode_explicit_batch_keeps_the_block_noise(pool):
    net = erf.nets.pooling_net(pool, width=4, depth=2)
    kw = dict(n_inputs=36, train_mode=True, progress=False, seed=2, device="cpu")
    auto = erf.effective_rf(net, (3, 24, 24), **kw)
    small = erf.effective_rf(net, (3, 24, 24), batch_size=5, **kw)
    assert auto.config["batch_size"] == 32 and small.config["batch_size"] == 5
    np.testing.assert_allclose(small.map, auto.map, rtol=1e-6, atol=1e-12)


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.c(x).detach()


class _Big(nn.Module):
    """A conv whose float16 output overflows (> 65504) and a tanh that hides it."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.c.weight, 1e4)

    def forward(self, x):
        return torch.tanh(self.c(x))


_ONES = torch.ones(8, *SHAPE)  # 9e4 > 65504 at every position of _Big's conv


def _nan_batches():
    x = torch.randn(4, *SHAPE)
    x[2, 0, 3, 3] = float("nan")
    return [x[:2], x[2:]]


_WRONG = [("NaN in an iterable", lambda: erf.effective_rf(_conv(), SHAPE, inputs=_nan_batches(), **KW_IT),
           ValueError, r"inputs \[2\] .* NaN or Inf"),
          ("Inf in a DataLoader", lambda: erf.effective_rf(
              _conv(), SHAPE, inputs=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
                  torch.full((4, *SHAPE), float("inf"))), batch_size=2), **KW_IT), ValueError, "NaN or Inf"),
          ("float16 overflow", lambda: erf.effective_rf(_Big(), SHAPE, dtype=torch.float16, inputs=_ONES, **KW),
           ValueError, "overflowed"),
          ("every sample skipped", lambda: erf.effective_rf(_Big(), SHAPE, dtype=torch.float16, nonfinite="skip",
                                                            inputs=_ONES, **KW), ValueError, r"n = 0.*skipped"),
          ("empty inputs", lambda: erf.effective_rf(_conv(), SHAPE, inputs=[], **KW_IT), ValueError,
           r"n = 0.*empty"),
          ("detached model", lambda: erf.effective_rf(_Detached(), SHAPE, **KW), RuntimeWarning, "all zeros"),
          ("constant map", lambda: erf.effective_rf(lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1)), SHAPE, **KW),
           RuntimeWarning, "constant")]


@pytest.mark.parametrize("name,run,exc,words", _WRONG, ids=[w[0] for w in _WRONG])
def test_item3_no_wrong_number_without_a_word(name, run, exc, words):
    if issubclass(exc, Warning):
        with pytest.warns(exc, match=words):
            run()
    else:
        with pytest.raises(exc, match=words):
            run()


def test_item3_float16_within_range_still_runs():
    res = erf.effective_rf(_conv(), SHAPE, dtype=torch.float16, **KW)
    ref = erf.effective_rf(_conv(), SHAPE, **KW)
    assert res.n == 8 and np.allclose(res.map, ref.map, rtol=2e-2, atol=1e-3 * ref.map.max())


class _InplaceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.c(self.relu(x))


def _double_model_map():
    torch.manual_seed(0)
    m = _conv().double()
    with pytest.warns(UserWarning, match="float64"):
        return erf.effective_rf(m, SHAPE, **KW).map


_SMALL = [("input modified in place", lambda: erf.effective_rf(_InplaceFirst(), SHAPE, **KW).n == 8),
          ("float64 model, default dtype", lambda: np.allclose(_double_model_map(), erf.effective_rf(
              _conv(), SHAPE, **KW).map, rtol=1e-5)),
          ("half model, default dtype", lambda: erf.effective_rf(_conv().half(), SHAPE, **KW).n == 8),
          ("TorchScript module: analysed at its output", lambda: erf.effective_rf(
              torch.jit.script(_conv()), SHAPE, **KW).n == 8),
          ("TorchScript module at a layer", lambda: _raises(ValueError, "TorchScript", erf.effective_rf,
                                                            torch.jit.script(_conv()), SHAPE, layer="0", **KW)),
          ("device meta", lambda: _raises(ValueError, "device", erf.effective_rf, _conv(), SHAPE,
                                          **dict(KW, device="meta"))),
          ("until_stderr 10**400", lambda: _raises(ValueError, "until_stderr", erf.effective_rf, _conv(), SHAPE,
                                                   until_stderr=10 ** 400, **KW))]


def _raises(exc, words, fn, *a, **k):
    with pytest.raises(exc, match=words):
        fn(*a, **k)
    return True


@pytest.mark.parametrize("name,check", _SMALL, ids=[c[0] for c in _SMALL])
def test_item8_smaller_ones(name, check):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert check()


_SMALL_CLI = [("device meta", ["--device", "meta"], "--device"),
              ("non-finite advice names no API-only option", ["--input-shape", "1x12x12"], "nonfinite='skip'"),
              ("growth --acts ''", None, "--acts")]


@pytest.mark.parametrize("name,extra,words", _SMALL_CLI, ids=[c[0] for c in _SMALL_CLI])
def test_item8_cli_smaller_ones(name, extra, words, tmp_path, capsys, monkeypatch):
    if extra is None:
        code, _, err = _run(capsys, "growth", "--acts", "", "--out", tmp_path)
    else:
        if "nonfinite" in words:
            def boom(*_a, **_k):
                raise ValueError("non-finite gradients in draw 0, inputs 0..3 (samples [1]); pass "
                                 "nonfinite='skip' to skip and count them, or use dtype=torch.float32 / smaller inputs")
            monkeypatch.setattr(erf.engine, "effective_rf", boom)
        code, _, err = _run(capsys, "map", "stack:2", "--no-progress", "--out", tmp_path, *extra)
    assert code == 2 and "Traceback" not in err
    if "nonfinite" in words:
        assert "pass nonfinite" not in err and "dtype=" not in err and "erf.effective_rf" in err, err
    else:
        assert words in err, err


def test_item1_factories_are_identified_by_what_they_do_not_where_they_are_written():
    from erf._integrity import code_hash

    f1 = lambda: nn.Conv2d(1, 1, 3)  # noqa: E731
    f2 = \
        lambda: nn.Conv2d(1, 1, 3)  # noqa: E731
    f3 = lambda: nn.Conv2d(1, 1, 5)  # noqa: E731
    m = f1()
    assert code_hash(m, f1) == code_hash(m, f2) != code_hash(m, f3)
