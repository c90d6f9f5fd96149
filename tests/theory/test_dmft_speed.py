"""theory.dmft's work-saving paths against independent references: every output of the solver
(Anderson mixing, two-time states from the last pass only, and the error-controlled grid) equals
the reference solver's (benchmarks/_dmft_reference.py, the straightforward whole-trajectory
solver) within 10 % of the Monte-Carlo error measured over seeds; Anderson and damped mixing
reach the same fixed point; the adaptive grid's Richardson estimate against the error measured
from the fine grid with the same fields."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

from traindyn.dynamics.recipes.two_layer import two_layer_task  # noqa: E402
from traindyn.theory.dmft import dmft_two_layer  # noqa: E402

from tests.helpers import ROOT, load_script  # noqa: E402

OUTPUTS = ("train_loss", "test_loss", "train_prediction", "test_prediction", "ntk", "ntk_test",
           "ntk_alignment", "phi_kernel", "g_kernel")


def _reference():
    return load_script(ROOT / "benchmarks" / "_dmft_reference.py")


@pytest.mark.slow
def test_outputs_equal_the_reference_solver_within_the_monte_carlo_error():
    """σ_MC: standard deviation of each output over 4 seeds (the error of one solve).  At seed
    0 the reference solver, this solver on the same grid and on the error-controlled grid
    (step_tol a tenth of the Monte-Carlo error of Δ) differ by at most 0.1 σ_MC per output."""
    x, y, xt, yt = two_layer_task(12, 6, 6, "he2", 0)
    t = np.linspace(0, 10, 6)
    kw = dict(n_samples=1024, n_steps=96, two_time=3)
    seeds = [dmft_two_layer(x, y, t, 1.0, xt, yt, seed=s, **kw) for s in range(1, 5)]
    sigma = {v: np.std(np.stack([d[v].values for d in seeds]), axis=0, ddof=1).max()
             for v in OUTPUTS}
    e_mc = (np.linalg.norm(np.std(np.stack([d.train_prediction.values for d in seeds]), axis=0,
                                  ddof=1), axis=1).max() / np.linalg.norm(y))
    ref = _reference().dmft_two_layer(x, y, t, 1.0, xt, yt, **kw)
    fixed = dmft_two_layer(x, y, t, 1.0, xt, yt, **kw)
    adaptive = dmft_two_layer(x, y, t, 1.0, xt, yt, adaptive=True, step_tol=e_mc / 10, **kw)
    assert fixed.attrs["converged"] == adaptive.attrs["converged"] == 1
    assert adaptive.attrs["n_steps_solved"] < 96
    assert adaptive.attrs["n_pass_equivalents"] < fixed.attrs["n_pass_equivalents"]
    for ds in (fixed, adaptive):
        for v in OUTPUTS:
            diff = float(np.abs(ds[v].values - ref[v].values).max())
            assert sigma[v] > 0 and diff <= 0.1 * sigma[v], (v, diff, sigma[v])


@pytest.mark.slow
def test_anderson_and_damped_mixing_reach_the_same_fixed_point():
    """A strongly coupled case (γ₀ = 4) where plain iteration halves its damping and crawls
    (90 passes): Anderson mixing converges in far fewer (51), to the same fixed point within the
    tolerance."""
    x, y, xt, yt = two_layer_task(10, 4, 5, "he2", 3)
    t = np.linspace(0, 20, 5)
    kw = dict(n_samples=512, n_steps=80, two_time=2, tol=1e-9, step_tol=None, max_iter=200)
    anderson = dmft_two_layer(x, y, t, 4.0, xt, yt, mixing="anderson", **kw)
    damped = dmft_two_layer(x, y, t, 4.0, xt, yt, mixing="damped", **kw)
    assert anderson.attrs["converged"] == damped.attrs["converged"] == 1
    assert anderson.attrs["n_iterations"] < 0.7 * damped.attrs["n_iterations"], (
        anderson.attrs["n_iterations"], damped.attrs["n_iterations"])
    for v in ("train_prediction", "test_prediction", "ntk", "phi_kernel", "g_kernel"):
        np.testing.assert_allclose(anderson[v].values, damped[v].values, atol=1e-7, err_msg=v)


def test_adaptive_grid_error_estimate_against_the_fine_grid():
    """Same fields: the error of the adaptive solution, measured against the fixed grid 8×
    finer, is below step_tol and within a factor 3 of the reported Richardson estimate."""
    x, y, _, _ = two_layer_task(12, 0, 6, "he2", 0)
    t = np.linspace(0, 40, 5)
    kw = dict(n_samples=256, two_time=0, tol=1e-10)
    adaptive = dmft_two_layer(x, y, t, 1.0, n_steps=512, adaptive=True, step_tol=2e-4, **kw)
    solved = adaptive.attrs["n_steps_solved"]
    assert 16 <= solved < 512
    fine = dmft_two_layer(x, y, t, 1.0, n_steps=8 * solved, step_tol=None, **kw)
    measured = float(np.linalg.norm(adaptive.train_prediction.values
                                    - fine.train_prediction.values, axis=1).max()
                     / np.linalg.norm(y))
    est = adaptive.attrs["step_error"]
    assert measured <= 2e-4 and est <= 2e-4
    assert 1 / 3 < est / measured < 3, (est, measured)


def test_float32_fields_stay_within_a_micro_tolerance_of_float64():
    """Same fields in float32 (kernel sums in float64): every output differs from the float64
    solve, by less than 2e-5; float64 stays the default."""
    x, y, xt, yt = two_layer_task(10, 4, 5, "he2", 1)
    t = np.linspace(0, 10, 4)
    kw = dict(n_samples=256, n_steps=24, two_time=2)
    f64 = dmft_two_layer(x, y, t, 1.0, xt, yt, **kw)
    f32 = dmft_two_layer(x, y, t, 1.0, xt, yt, field_dtype="float32", **kw)
    assert f32.attrs["converged"] == 1
    for v in ("train_prediction", "test_prediction", "ntk", "phi_kernel", "g_kernel"):
        diff = float(np.abs(f32[v].values - f64[v].values).max())
        assert 0 < diff < 2e-5, (v, diff)
    with pytest.raises(ValueError, match="field_dtype"):
        dmft_two_layer(x, y, t, 1.0, field_dtype="float16", **kw)
