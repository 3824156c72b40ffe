"""erf.distributed: sharded runs over gloo processes equal one process; failures stop every rank.

The multi-process tests launch this file as a worker (``python tests/test_distributed.py OUT JOB...``)
once with ``torchrun --standalone`` (3 ranks) and once with the torchrun environment variables set by
hand (2 ranks; one rank is killed in its last job, so torchrun must not clean up after it).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import erf
from erf import distributed as edist
from erf._stats import RunningMoments

HERE = Path(__file__).resolve()
TIMEOUT = 20.0  # process-group timeout of the failure jobs (seconds)
_CALLS = [0]


class Faulty(nn.Module):
    """A conv stack that fails on one rank at its N-th batch (``ERF_TEST_FAIL=rank:N:kill|raise``)."""

    def __init__(self):
        super().__init__()
        self.body = erf.nets.conv_stack(2, width=2, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = os.environ.get("ERF_TEST_FAIL")
        if spec and torch.is_grad_enabled():  # probes at setup run without autograd
            rank, at, mode = spec.split(":")
            _CALLS[0] += 1
            if int(os.environ.get("RANK", "0")) == int(rank) and _CALLS[0] == int(at):
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected failure")
        return self.body(x)


def make_images(folder: Path, count: int = 5) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = (np.random.default_rng(i).random((20, 30, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


def job(name: str, out: Path) -> tuple[nn.Module, tuple[int, ...], dict]:
    """Model, input shape and options of a named job (the same in the workers and the references)."""
    kw = dict(progress=False, device="cpu")
    if name == "stack":  # random weights, several draws
        return (erf.nets.conv_stack(3, width=2, act="relu"), (2, 16, 16),
                dict(kw, init="normal", draws=3, n_inputs=40, batch_size=16, checkpoint=str(out / "stack_ckpt.npz"),
                     dtype=torch.float64))  # float64: the clustered stderr is compared to 1e-10
    if name == "pool":  # a stochastic module sampling from the keyed streams
        return (erf.nets.pooling_net("stochastic", width=4), (3, 32, 32),
                dict(kw, train_mode=True, draws=2, n_inputs=40, batch_size=32))
    if name == "crop":  # enough work for the engine to run on the crop holding the unit's TRF
        return (erf.nets.conv_stack(6, width=8, act="relu"), (8, 64, 64),
                dict(kw, init="normal", draws=2, n_inputs=64, batch_size=16))
    if name == "images":
        return (erf.nets.conv_stack(2, width=3, act="relu"), (3, 12, 12),
                dict(kw, init="normal", inputs=f"images:{make_images(out / 'images')}", batch_size=2))
    if name in ("kill", "raise"):
        return (Faulty(), (2, 12, 12), dict(kw, init="normal", draws=2, n_inputs=16, batch_size=4,
                                            checkpoint=str(out / f"{name}_ckpt.npz"), checkpoint_every=1,
                                            dist_timeout=TIMEOUT))
    raise ValueError(name)


def worker(out: Path, names: list[str]) -> None:
    """One rank: run each job with distributed=True and save what it returned (and what it wrote)."""
    rank = int(os.environ["RANK"])
    import erf._io as io

    writes: list[str] = []
    real_savez = io.atomic_savez
    io.atomic_savez = lambda path, arrays: (writes.append(path), real_savez(path, arrays))[1]
    for name in names:
        if name in ("kill", "raise"):
            os.environ["ERF_TEST_FAIL"] = "1:2:kill" if name == "kill" else f"{int(os.environ['WORLD_SIZE']) - 1}:2:raise"
        model, shape, kw = job(name, out)
        info: dict = {"name": name}
        t0 = time.perf_counter()
        try:
            r = erf.effective_rf(model, shape, distributed=True, **kw)
            np.savez(out / f"{name}.rank{rank}.npz", map=r.map, m2=r.m2, n=r.n, stderr=r.stderr)
            info["world_size"] = r.meta.get("world_size")
            info["main"] = edist.is_main_process()
            info["crop"] = r.meta.get("crop")
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            info["error"] = f"{type(exc).__name__}: {exc}"
        info["seconds"] = time.perf_counter() - t0
        info["writes"] = list(writes)
        writes.clear()
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(info))
        os.environ.pop("ERF_TEST_FAIL", None)


# --------------------------------------------------------------------------- helpers of the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ERF_TEST_FAIL"):
        env.pop(key, None)
    env.update(extra)
    return env


def reference(name: str, out: Path, **overrides) -> erf.ERFResult:
    model, shape, kw = job(name, out)
    kw = dict(kw, **overrides)
    kw.pop("dist_timeout", None)
    return erf.effective_rf(model, shape, **kw)


def assert_same(result: dict | erf.ERFResult, ref: erf.ERFResult) -> None:
    get = result.__getitem__ if isinstance(result, dict) else lambda k: getattr(result, k)
    assert int(get("n")) == ref.n
    scale = np.abs(ref.map).max()
    assert np.abs(get("map") - ref.map).max() <= 1e-6 * scale
    assert np.abs(get("m2") - ref.m2).max() <= 1e-6 * np.abs(ref.m2).max()
    if isinstance(result, dict) and "stderr" in result:  # the clustered error: ranks held parts of draws
        tol = 1e-10 if ref.config["dtype"] == "float64" else 1e-6
        assert np.abs(result["stderr"] - ref.stderr).max() <= tol * np.abs(ref.stderr).max()


def _load(out: Path, name: str, rank: int) -> tuple[dict, dict | None]:
    info = json.loads((out / f"{name}.rank{rank}.json").read_text())
    path = out / f"{name}.rank{rank}.npz"
    return info, (dict(np.load(path)) if path.exists() else None)


# --------------------------------------------------------------------------- pure parts


def test_shard_is_a_deterministic_partition():
    items = list(range(23))
    for world in (1, 2, 3, 5):
        parts = [edist.shard(items, r, world) for r in range(world)]
        assert sorted(sum(parts, [])) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [edist.shard(items, r, world) for r in range(world)]
    with pytest.raises(ValueError, match="rank"):
        edist.shard(items, 2, 2)


@pytest.mark.parametrize("train_mode", [False, True])
def test_work_items_cover_every_input_once(train_mode):
    n, draws, bs = 70, 3, 20
    size = edist.item_size(bs, n * draws, 4, train_mode)
    items = edist.work_items(2, draws, n, size)
    seen = [(d, i) for d, lo, hi in items for i in range(lo, hi)]
    assert seen == [(d, i) for d in range(2, 2 + draws) for i in range(n)]
    batches = [(d, a, b) for d, lo, hi in items for a, b in edist.batch_ranges(lo, hi, bs, train_mode)]
    if train_mode:  # items and batches start on blocks, as a single process's batches do
        assert size % 32 == 0 and all(lo % 32 == 0 for _, lo, _ in items)
        assert all(a // 32 == (b - 1) // 32 for _, a, b in batches)
    assert all(b - a <= bs for _, a, b in batches)
    resumed = edist.work_items(2, draws, n, size, start=(3, 7))
    assert resumed[0] == (3, 7, size) and resumed[-1][0] == 4 and resumed[-1][2] == n
    assert edist.item_size(512, 10, 4, False) == 2  # every rank gets work when there is little


def test_combine_in_rank_order_equals_one_accumulator():
    torch.manual_seed(1)
    data = torch.randn(11, 3, 4, dtype=torch.float64) * 3 + 1
    whole = RunningMoments.zeros((3, 4))
    whole.update(data)
    parts = []
    for lo, hi in ((0, 4), (4, 4), (4, 11)):  # an empty rank in the middle
        p = RunningMoments.zeros((3, 4))
        if hi > lo:
            p.update(data[lo:hi])
        parts.append(p)
    merged = edist.combine(parts)
    assert merged.n.item() == 11
    torch.testing.assert_close(merged.mean, data.mean(0))
    torch.testing.assert_close(merged.m2, whole.m2)


def test_bad_options_and_single_process_fallback(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    model = erf.nets.conv_stack(2, width=2)
    kw = dict(n_inputs=4, progress=False, device="cpu")
    with pytest.raises(TypeError, match="distributed"):
        erf.effective_rf(model, (2, 10, 10), distributed="yes", **kw)
    with pytest.raises(ValueError, match="dist_timeout"):
        erf.effective_rf(model, (2, 10, 10), distributed=True, dist_timeout=0, **kw)
    with pytest.raises(ValueError, match="random-access"):
        erf.effective_rf(model, (2, 10, 10), distributed=True, inputs=[torch.randn(2, 2, 10, 10)], **kw)
    with pytest.raises(ValueError, match="until_stderr"):
        erf.effective_rf(model, (2, 10, 10), distributed=True, until_stderr=0.1, **kw)
    with pytest.warns(UserWarning, match="single process"):
        r = erf.effective_rf(model, (2, 10, 10), distributed=True, **kw)
    assert edist.is_main_process() and "world_size" not in r.meta
    assert np.array_equal(r.map, erf.effective_rf(model, (2, 10, 10), **kw).map)


def test_existing_group_of_one_process(tmp_path):
    """A group the caller initialised is used as it is; one rank equals the plain run."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = erf.nets.conv_stack(2, width=2, act="relu")
        kw = dict(n_inputs=40, draws=2, init="normal", batch_size=8, progress=False, device="cpu")
        r = erf.effective_rf(model, (2, 12, 12), distributed=True, **kw)
        assert r.meta["world_size"] == 1
        assert_same(r, erf.effective_rf(model, (2, 12, 12), **kw))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- several processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the 2- and 3-rank workers concurrently; returns their output folders, exit codes and logs."""
    out2, out3 = tmp_path_factory.mktemp("w2"), tmp_path_factory.mktemp("w3")
    port = str(_free_port())
    procs2 = [subprocess.Popen([sys.executable, str(HERE), str(out2), "stack", "images", "crop", "pool", "kill"],
                               env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=port),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    proc3 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                              str(HERE), str(out3), "stack", "pool", "raise"],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs2 = [p.communicate(timeout=240)[0] for p in procs2]
    log3 = proc3.communicate(timeout=240)[0]
    return {"out2": out2, "out3": out3, "codes2": [p.returncode for p in procs2], "logs2": logs2,
            "code3": proc3.returncode, "log3": log3}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["stack", "pool"])
def test_ranks_give_the_single_process_map(runs, world, name, tmp_path):
    out = runs[f"out{world}"]
    ref = reference(name, tmp_path, checkpoint=None)
    for rank in range(world):
        info, arrays = _load(out, name, rank)
        assert "error" not in info, (info, runs.get("log3" if world == 3 else "logs2"))
        assert info["world_size"] == world and info["main"] == (rank == 0)
        assert_same(arrays, ref)  # every rank returns the combined result
        if rank:
            assert info["writes"] == [], "only rank 0 writes"
    if name == "stack":  # rank 0 wrote one checkpoint file, no per-rank files, in the single-process format
        info0, _ = _load(out, name, 0)
        assert info0["writes"] and set(info0["writes"]) == {str(out / "stack_ckpt.npz")}
        assert not list(out.glob("stack_ckpt.npz.rank*"))
        resumed = reference(name, out, resume=True)  # all done: the checkpoint holds the whole run
        assert_same(resumed, ref)


@pytest.mark.slow
def test_images_are_split_across_ranks(runs, tmp_path):
    ref = reference("images", runs["out2"])
    assert ref.n == 5
    for rank in range(2):
        info, arrays = _load(runs["out2"], "images", rank)
        assert "error" not in info, info
        assert_same(arrays, ref)


@pytest.mark.slow
def test_cone_cropping_runs_sharded(runs, tmp_path):
    ref = reference("crop", tmp_path)
    assert ref.meta["crop"] is not None
    for rank in range(2):
        info, arrays = _load(runs["out2"], "crop", rank)
        assert "error" not in info and info["crop"] == ref.meta["crop"], info
        assert_same(arrays, ref)


@pytest.mark.slow
def test_killed_rank_fails_the_others_then_resume_completes(runs, tmp_path):
    out = runs["out2"]
    assert runs["codes2"][1] == -signal.SIGKILL, runs["logs2"][1]
    info, arrays = _load(out, "kill", 0)
    assert arrays is None and "DistributedError" in info["error"], info
    assert "lost contact" in info["error"] and info["seconds"] < TIMEOUT + 15, info
    # rank 0 checkpointed the reduced sums after the first round; one process finishes the job from there
    ckpt = out / "kill_ckpt.npz"
    assert ckpt.exists()
    with np.load(ckpt) as z:
        assert 0 < float(z["n0"]) < 32
    resumed = reference("kill", out, resume=True)
    assert_same(resumed, reference("kill", tmp_path))


@pytest.mark.slow
def test_raising_rank_makes_every_rank_raise(runs):
    assert runs["code3"] == 0, runs["log3"]
    for rank in range(3):
        info, arrays = _load(runs["out3"], "raise", rank)
        assert arrays is None
        if rank == 2:
            assert info["error"] == "RuntimeError: injected failure", info
        else:
            assert info["error"].startswith("DistributedError") and "rank 2 of 3 failed" in info["error"], info
            assert "injected failure" in info["error"]
        assert info["seconds"] < TIMEOUT


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
