"""Reliability of the library: checkpoints, interruption, determinism, numerical safety."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import erf
from erf.engine import RunInterrupted
from erf.pooling import REGISTRY


_CALLS = {"n": 0}  # module level: every draw works on its own deep copy of the model


class _InterruptAfter(nn.Module):
    """Identity that raises KeyboardInterrupt on the ``n``-th forward call of a run (simulated Ctrl-C)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        _CALLS["n"] = 0

    def forward(self, x):
        if not torch.is_grad_enabled():  # setup's probes (shapes, degenerate-unit check) run without autograd
            return x
        _CALLS["n"] += 1
        if _CALLS["n"] == self.n:
            raise KeyboardInterrupt
        return x


def _net(tail: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    mods = [nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, padding=1)]
    return nn.Sequential(*(mods + ([tail] if tail is not None else [])))


_KW = dict(n_inputs=40, draws=3, init="normal", batch_size=8, seed=4, progress=False)


def test_interrupt_saves_and_resume_is_bit_identical(tmp_path):
    ckpt = tmp_path / "run.ckpt.npz"
    full = erf.effective_rf(_net(_InterruptAfter(10 ** 9)), (2, 12, 12), **_KW)
    # Interrupt at several points, each time resuming from the checkpoint left behind.
    # Setup's probes run without autograd and are not counted: call k is batch k of the run (across draws).
    for stop_at in (2, 4, 3):
        with pytest.raises(RunInterrupted, match="resume"):
            erf.effective_rf(_net(_InterruptAfter(stop_at)), (2, 12, 12), checkpoint=ckpt,
                             checkpoint_every=2, resume=True, **_KW)
        assert ckpt.exists()
    resumed = erf.effective_rf(_net(_InterruptAfter(10 ** 9)), (2, 12, 12), checkpoint=ckpt,
                               checkpoint_every=2, resume=True, **_KW)
    assert resumed.n == full.n == 120
    assert np.array_equal(resumed.map, full.map)
    assert np.array_equal(resumed.stderr, full.stderr)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    ckpt = tmp_path / "run.ckpt.npz"
    erf.effective_rf(_net(), (2, 12, 12), checkpoint=ckpt, **_KW)
    with pytest.raises(ValueError, match="another configuration"):
        erf.effective_rf(_net(), (2, 12, 12), checkpoint=ckpt, resume=True, **dict(_KW, seed=5))
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        erf.effective_rf(_net(), (2, 12, 12), checkpoint=ckpt, resume=True, **_KW)
    with pytest.raises(ValueError, match="resume"):
        erf.effective_rf(_net(), (2, 12, 12), resume=True, **_KW)


def test_resume_of_a_finished_run_returns_it(tmp_path):
    ckpt = tmp_path / "run.ckpt.npz"
    first = erf.effective_rf(_net(), (2, 12, 12), checkpoint=ckpt, **_KW)
    again = erf.effective_rf(_net(), (2, 12, 12), checkpoint=ckpt, resume=True, **_KW)
    assert np.array_equal(first.map, again.map) and again.n == first.n


def test_same_seed_same_batch_bit_identical_and_seed_matters():
    a = erf.effective_rf(_net(), (2, 12, 12), **_KW).map
    b = erf.effective_rf(_net(), (2, 12, 12), **_KW).map
    c = erf.effective_rf(_net(), (2, 12, 12), **dict(_KW, seed=99)).map
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_until_stderr_stops_early():
    model = erf.nets.conv_stack(3, width=4, act="relu", in_channels=1)
    full = erf.effective_rf(model, (1, 16, 16), n_inputs=256, batch_size=16, init="normal", progress=False)
    early = erf.effective_rf(model, (1, 16, 16), n_inputs=256, batch_size=16, init="normal", progress=False,
                             until_stderr=0.1)
    assert early.n < full.n
    centre = early.map >= 0.5 * early.map.max()
    assert (early.stderr[centre].mean() / early.map[centre].mean()) < 0.1
    with pytest.raises(ValueError, match="until_stderr"):
        erf.effective_rf(model, (1, 16, 16), until_stderr=-1.0, progress=False)


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.downsampling or n == "dilated"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_pooling_net_finite_for_huge_inputs(name, dtype):
    """Inputs x1000: no NaN/Inf in the map, in float32 and under bfloat16 autocast."""
    x = 1000 * torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    net = erf.nets.pooling_net(name, width=4)
    r = erf.effective_rf(net, (3, 48, 48), inputs=x, dtype=dtype, progress=False, device="cpu")
    assert np.isfinite(r.map).all() and np.isfinite(r.stderr).all()
    assert r.map.sum() > 0


def test_train_mode_stochastic_maps_do_not_depend_on_batch_size():
    net = erf.nets.pooling_net("stochastic", width=4)
    kw = dict(n_inputs=40, train_mode=True, progress=False, seed=2)
    maps = [erf.effective_rf(net, (3, 32, 32), batch_size=bs, **kw).map for bs in (7, 32, 64)]
    for m in maps[1:]:
        np.testing.assert_allclose(m, maps[0], rtol=1e-6, atol=1e-12)
    other = erf.effective_rf(net, (3, 32, 32), batch_size=7, **dict(kw, seed=3)).map
    assert not np.allclose(other, maps[0])


def test_atomic_save_removes_temporaries_of_killed_writers(tmp_path):
    from erf.engine import atomic_savez

    target = str(tmp_path / "ckpt.npz")
    dead = tmp_path / "ckpt.npz.999999999.tmp"  # no such process
    alive = tmp_path / f"ckpt.npz.{os.getppid()}.tmp"  # a live process may still be writing it
    dead.write_bytes(b"half")
    alive.write_bytes(b"busy")
    atomic_savez(target, {"a": np.arange(3)})
    assert not dead.exists() and alive.exists()
    with np.load(target, allow_pickle=False) as z:
        assert z["a"].tolist() == [0, 1, 2]
