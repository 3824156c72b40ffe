"""Calibration of the clustered standard errors: two runs of one configuration over disjoint weight
draws must look alike (|z| > 3 at <= 1 % of the non-zero positions), two different configurations
must not (the per-map test at p < 1e-6). Sizes are inputs x draws."""
from __future__ import annotations

import numpy as np
import pytest

import erf
from erf.nets import conv_stack, pooling_net

CASES = {
    "linear": (lambda: conv_stack(8, width=4, in_channels=1), (1, 32, 32), "normal"),
    "max": (lambda: pooling_net("max", depth=2, width=4, in_channels=1), (1, 40, 40), "default"),
    "relu_cnn": (lambda: conv_stack(8, width=4, act="relu", in_channels=1), (1, 32, 32), "normal"),
}


def _run(case: str, n_inputs: int, draws: int, first_draw: int, factory=None) -> erf.ERFResult:
    make, shape, init = CASES[case]
    return erf.effective_rf(factory or make, shape, n_inputs=n_inputs, draws=draws, first_draw=first_draw,
                            init=init, reduce="abs", progress=False, device="cpu")


def _naive_frac(a: erf.ERFResult, b: erf.ERFResult) -> float:
    """|z| > 3 share with the input-level error of every map counted as independent (the old error)."""
    se = np.sqrt(a.m2 / (a.n - 1) / a.n + b.m2 / (b.n - 1) / b.n)
    d = a.map - b.map
    z = np.where(se > 0, d / np.where(se > 0, se, 1.0), 0.0)
    support = (a.map != 0) | (b.map != 0)
    return float(np.mean(np.abs(z[support]) > 3))


def _check_same(case: str, n_inputs: int, draws: int) -> tuple[erf.ERFResult, erf.ERFResult]:
    a = _run(case, n_inputs, draws, 0)
    b = _run(case, n_inputs, draws, draws)
    assert a.stderr_kind == "clustered" and a.stderr_df == draws - 1
    d = erf.diff(a, b)
    assert d.frac_significant <= 0.01, (case, n_inputs, draws, d.frac_significant, d.max_abs_z)
    assert d.p_value > 1e-3, (d.p_value, d.test)  # the per-map test does not flag a repeat either
    return a, b


def test_disjoint_draws_agree_linear_16x4():
    a, b = _check_same("linear", 16, 4)
    # the test has teeth: maps of one draw counted as independent flag far more than 1 %
    assert _naive_frac(a, b) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("case,n_inputs,draws", [("linear", 4, 16), ("max", 16, 4), ("max", 4, 16),
                                                 ("relu_cnn", 16, 4), ("relu_cnn", 4, 16)])
def test_disjoint_draws_agree(case, n_inputs, draws):
    _check_same(case, n_inputs, draws)


def test_max_and_dilated_differ_by_the_per_map_test():
    a = _run("max", 4, 16, 0)
    b = _run("max", 4, 16, 16, factory=lambda: pooling_net("dilated", depth=2, width=4, in_channels=1))
    d = erf.diff(a, b)
    assert d.p_value < 1e-6, d.test
    assert erf.diff(a, b, normalize=True).p_value < 1e-6  # the shapes differ too, not only the gains
