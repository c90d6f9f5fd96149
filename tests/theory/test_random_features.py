"""Random-feature ridge regression theory ("More is Better", Simon et al. 2023)."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.dynamics import records
from traindyn.theory.kernels import krr_learning_curve, power_law_spectrum
from traindyn.theory.random_features import (
    optimal_ridge,
    power_law_optimal_fitting_ratio,
    rf_errors,
    rf_learning_curve,
)

from tests.helpers import assert_rel

SPEC = power_law_spectrum(3000, a=1.5, b=1.5)


def test_coupled_equations_hold_at_the_solution():
    """κ and γ returned satisfy n = Σ L_i + δ/κ and N_f = Σ L_i + N_f κ/γ (L_i = λ_i/(λ_i+γ))."""
    n = np.array([50.0, 200.0, 200.0, 30.0])
    nf = np.array([80.0, 100.0, 1000.0, 30.0])
    ridge = np.array([1e-3, 0.1, 1e-6, 0.5])
    out = rf_errors(SPEC, n, nf, ridge, noise_var=0.1)
    L = SPEC.eigenvalues / (SPEC.eigenvalues + out["gamma"][:, None])
    z = L.sum(1)
    assert_rel(z + ridge / out["kappa"], n, 1e-9, "first equation")
    assert_rel(z + nf * out["kappa"] / out["gamma"], nf, 1e-9, "second equation")
    # and the risk from the closed form, written out independently here
    q = (L**2).sum(1)
    e0 = n / (n - q - (z - q) ** 2 / (nf - q))
    c = (nf - z) / (nf - q)
    test = e0 * (((1 - L) * (1 - c[:, None] * L)) @ SPEC.target_power + 0.1)
    assert_rel(out["test_error"], test, 1e-9, "test risk")
    assert_rel(out["train_error"], (ridge / (n * out["kappa"])) ** 2 * test, 1e-9, "train risk")


def test_tends_to_kernel_regression_as_features_grow():
    nf = np.array([1e4, 1e5, 1e6, 1e7])
    rf = rf_learning_curve(SPEC, n=100, n_features=nf, ridge=1e-3, noise_var=0.1)
    krr = krr_learning_curve(SPEC, n=100, ridge=1e-3, noise_var=0.1)
    gap = (rf.test_error - krr.test_error).values
    assert np.all(gap > 0)
    # variance-limited approach: gap ∝ 1/N_f, so it falls ten-fold per decade
    assert_rel(gap[:-1] / gap[1:], 10.0, 0.02, "1/N_f approach")
    exact = rf_learning_curve(SPEC, n=100, n_features=np.inf, ridge=1e-3, noise_var=0.1)
    assert_rel(exact.test_error, krr.test_error, 1e-12, "N_f = inf is KRR")
    assert_rel(exact.kappa, exact.gamma, 1e-12, "γ = κ at N_f = inf")


def test_double_descent_at_n_features_equal_n():
    nf = np.array([20, 50, 80, 95, 99, 100, 101, 105, 120, 200, 500, 2000])
    with pytest.warns(RuntimeWarning, match="diverges"):
        ds = rf_learning_curve(SPEC, n=100, n_features=nf, ridge=0.0, noise_var=0.1)
    test = ds.test_error.values
    peak = int(np.flatnonzero(nf == 100)[0])
    assert np.isinf(test[peak]) and np.all(np.isfinite(np.delete(test, peak)))
    # rises towards the interpolation threshold from below (after the first, bias-dominated,
    # points) and falls after it
    assert np.all(np.diff(test[2:peak]) > 0)
    assert np.all(np.diff(test[peak + 1:]) < 0)
    # a ridge removes the divergence
    reg = rf_learning_curve(SPEC, n=100, n_features=100, ridge=0.05, noise_var=0.1)
    assert np.isfinite(float(reg.test_error))


def test_optimal_ridge_risk_is_monotone_in_n_and_features():
    n = np.array([10, 30, 100, 300, 1000])
    nf = np.array([10, 30, 100, 300, 1000, np.inf])
    spec = power_law_spectrum(1000, a=1.5, b=1.5)
    opt = optimal_ridge(spec, n=n, n_features=nf, noise_var=0.1)
    risk = opt.test_error.values
    assert np.all(np.diff(risk, axis=0) < 0), "more data must help at optimal ridge"
    assert np.all(np.diff(risk, axis=1) < 0), "more features must help at optimal ridge"
    # the optimum beats every ridge on a fine grid (at one point, brute force)
    grid = np.concatenate([[0.0], np.logspace(-6, 2, 400)])
    brute = rf_learning_curve(spec, n=100, n_features=300, ridge=grid, noise_var=0.1)
    assert float(opt.test_error.sel(n=100, n_features=300)) <= float(brute.test_error.min()) + 1e-9


def test_bayes_optimal_ridge_equals_noise_for_a_matched_prior():
    """v_i² = λ_i is the Gaussian-process prior of the kernel; the posterior mean (ridge σ²) is
    Bayes-optimal, so the risk-minimising ridge is δ* = σ² at every n (kernel regression)."""
    spec = power_law_spectrum(3000, a=1.5, b=1.5)
    opt = optimal_ridge(spec, n=[10, 100, 1000], n_features=np.inf, noise_var=0.3)
    assert_rel(opt.optimal_ridge, 0.3, 1e-3, "δ* = σ²")


def test_power_law_fitting_ratio_closed_form_vs_numerical_optimum():
    a, b = 3.0, 2.0
    spec = power_law_spectrum(10_000, a=a, b=b)
    coarse = np.concatenate([[0.0], np.logspace(-9, 0, 19)])
    opt = optimal_ridge(spec, n=100, n_features=np.inf, noise_var=0.0, ridge_grid=coarse)
    expected = power_law_optimal_fitting_ratio(a, b)
    assert_rel(expected, ((a - b) / (b * (a - 1))) ** 2, 1e-15, "formula")
    assert_rel(opt.fitting_ratio, expected, 0.02, "fitting ratio at δ*")
    # b ≥ a: interpolation is optimal among δ ≥ 0
    assert float(power_law_optimal_fitting_ratio(2.0, 2.5)) == 0.0
    interp = optimal_ridge(power_law_spectrum(20_000, a=2.0, b=2.5), n=100, noise_var=0.0,
                           ridge_grid=coarse)
    assert float(interp.fitting_ratio) < 1e-3
    with pytest.raises(ValueError, match="a > 1"):
        power_law_optimal_fitting_ratio(0.5, 1.5)


def test_infinite_data_limit_is_projection_on_features():
    """n = ∞, δ = 0: γ solves Σ L_i = N_f and the risk is Σ (1−L_i) v_i² + σ² (E₀ = 1)."""
    out = rf_errors(SPEC, np.inf, 100.0, 0.0, noise_var=0.2)
    g = float(out["gamma"])
    L = SPEC.eigenvalues / (SPEC.eigenvalues + g)
    assert_rel(L.sum(), 100.0, 1e-9, "Σ L_i = N_f")
    assert_rel(out["test_error"], ((1 - L) * SPEC.target_power).sum() + 0.2, 1e-9, "risk")
    # and approaching it: large n gives nearly the same risk
    near = rf_errors(SPEC, 1e7, 100.0, 0.0, noise_var=0.2)["test_error"]
    assert_rel(near, out["test_error"], 1e-4, "n → ∞")


def test_bad_inputs_and_data_model():
    with pytest.raises(ValueError, match="positive"):
        rf_learning_curve(SPEC, n=10, n_features=0, ridge=0.1)
    with pytest.raises(ValueError, match="ridge"):
        rf_learning_curve(SPEC, n=10, n_features=10, ridge=-0.1)
    ds = rf_learning_curve(SPEC, n=[10, 20], n_features=[5, 50], ridge=[0.1, 1.0],
                           n_modes_out=SPEC.eigenvalues.size)
    records.validate(ds)
    assert ds.test_error.dims == ("n", "n_features", "ridge")
    # learnabilities at γ, and their sum
    assert ds.learnability.dims == ("n", "n_features", "ridge", "mode")
    assert_rel(ds.learnability.sum("mode"), ds.learnability_sum, 1e-9, "Σ L_i(γ)")
    records.validate(optimal_ridge(SPEC, n=[10, 20], n_features=[5, 50]))
