"""Kernel ridge regression learning curves (eigenlearning) against independent references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import brentq
from traindyn.dynamics import records
from traindyn.theory.kernels import Spectrum, krr_learning_curve, power_law_spectrum, solve_kappa

from tests.helpers import assert_rel


def _kappa_brentq(lam, m, n, ridge):
    """Reference: scipy's brentq on Σ m λ/(λ+κ) + δ/κ − n, in float64."""
    def f(k):
        return np.sum(m * lam / (lam + k)) + ridge / k - n
    return brentq(f, 1e-300, 1e10, xtol=1e-300, rtol=1e-14, maxiter=2000)


def test_kappa_matches_brentq_with_multiplicities(rng):
    lam = rng.uniform(0.01, 2.0, 40)
    m = rng.integers(1, 6, 40).astype(float)
    spec = Spectrum(lam, None, m)
    ns = np.array([5.0, 20.0, 60.0, 5.0, 20.0])
    ridges = np.array([0.0, 0.0, 0.0, 0.3, 1e-9])
    got = solve_kappa(spec, ns, ridges)
    ref = [_kappa_brentq(lam, m, n, r) for n, r in zip(ns, ridges, strict=True)]
    assert_rel(got, ref, 1e-9, "κ vs brentq")


def test_kappa_million_modes_ridge_to_zero():
    spec = power_law_spectrum(10**6, a=1.1, b=1.1)
    ns = np.array([10.0, 1e3, 1e5, 1e3, 1e3])
    ridges = np.array([0.0, 0.0, 0.0, 1e-14, 1e-30])
    kappa = solve_kappa(spec, ns, ridges)
    z, _ = spec.sums(kappa)
    # residual of the κ equation, relative to n
    assert_rel(z + ridges / kappa, ns, 1e-10, "κ equation residual")
    # δ → 0 is continuous: a tiny ridge changes κ by a tiny relative amount
    assert_rel(kappa[3:], kappa[1], 1e-6, "κ(δ→0)")


def test_degenerate_eigenvalues_equal_expanded_spectrum(rng):
    lam = np.array([1.0, 0.3, 0.05, 0.01])
    m = np.array([1, 3, 7, 20])
    v2 = np.array([0.5, 0.1, 0.02, 0.001])
    grouped = krr_learning_curve(lam, v2, n=[3, 10, 25, 40], ridge=[0.0, 0.01], noise_var=0.1,
                                 multiplicity=m)
    expanded = krr_learning_curve(np.repeat(lam, m), np.repeat(v2, m), n=[3, 10, 25, 40],
                                  ridge=[0.0, 0.01], noise_var=0.1)
    for var in ("test_error", "train_error", "kappa", "overfitting_coefficient"):
        assert_rel(grouped[var], expanded[var], 1e-9, var)


def test_learnabilities_sum_to_n_at_zero_ridge():
    spec = power_law_spectrum(5000, a=1.5, b=2.0)
    ds = krr_learning_curve(spec, n=[1, 7, 100, 1234], ridge=0.0, n_modes_out=5000)
    assert_rel(ds.learnability.sum("mode"), ds.n, 1e-9, "Σ L_i")
    assert_rel(ds.learnability_sum, ds.n, 1e-9, "learnability_sum")
    # and with ridge they sum to less than n, by δ/κ
    dr = krr_learning_curve(spec, n=[100.0], ridge=[0.01], n_modes_out=5000)
    assert_rel(dr.learnability.sum("mode") + 0.01 / dr.kappa, 100.0, 1e-9, "Σ L + δ/κ")


@pytest.mark.parametrize("n", [30, 120])
def test_isotropic_ridgeless_matches_hastie_et_al(n):
    """One eigenvalue of multiplicity p: ridgeless least squares on isotropic features.

    Hastie, Montanari, Rosset & Tibshirani (2019/2022, Ann. Stat.), Thm. 1 (isotropic case):
    clean risk ‖β‖²(1 − n/p) + σ² n/(p − n) for n < p, σ² p/(n − p) for n > p; the eigenlearning
    test error adds σ² (noisy test labels).
    """
    p, signal, sigma2 = 60, 2.0, 0.3
    ds = krr_learning_curve([1.0], [signal / p], n=n, ridge=0.0, noise_var=sigma2,
                            multiplicity=[p])
    if n < p:
        clean = signal * (1 - n / p) + sigma2 * n / (p - n)
    else:
        clean = sigma2 * p / (n - p)
    assert_rel(ds.test_error, clean + sigma2, 1e-10, "isotropic risk")
    assert_rel(ds.excess_test_error, clean, 1e-10, "clean risk")
    # least squares with more samples than features: train error σ²(n − p)/n
    expected_train = 0.0 if n < p else sigma2 * (n - p) / n
    assert abs(float(ds.train_error) - expected_train) < 1e-10


def test_large_ridge_fits_nothing():
    """δ → ∞: the predictor is 0, so train = test = Σ v_i² + σ² (and κ → δ/n)."""
    spec = power_law_spectrum(300, a=2.0, b=1.5)
    ds = krr_learning_curve(spec, n=[10, 50], ridge=1e12, noise_var=0.2)
    assert_rel(ds.test_error, spec.target_total + 0.2, 1e-9, "test")
    assert_rel(ds.train_error, spec.target_total + 0.2, 1e-9, "train")
    assert_rel(ds.kappa, 1e12 / ds.n, 1e-9, "κ")


def test_finite_rank_ridgeless_limit_and_divergence():
    lam = np.array([1.0, 0.5, 0.25])
    ds = krr_learning_curve(lam, [0.1, 0.1, 0.1], n=[6.0, 12.0], ridge=0.0, noise_var=0.5)
    # n > rank: κ = 0, every mode learnt, E₀ = n/(n − 3)
    assert np.all(ds.kappa == 0)
    assert_rel(ds.overfitting_coefficient, ds.n / (ds.n - 3), 1e-12, "E₀")
    with pytest.warns(RuntimeWarning, match="diverges"):
        div = krr_learning_curve(lam, [0.1, 0.1, 0.1], n=3.0, ridge=0.0, noise_var=0.5)
    assert np.isinf(float(div.test_error))


def test_noiseless_interpolation_threshold_is_exact_recovery_not_nan():
    """Regression: ridgeless, noiseless, n = number of modes gave NaN (0·∞) behind a bare
    numpy warning.  n samples of an n-mode target solve a square system exactly, so the test
    error is 0 - checked against least squares on sampled Gaussian features."""
    import warnings

    lam = 1.0 / np.arange(1, 21) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = krr_learning_curve(lam, lam, n=[19.0, 20.0, 21.0], ridge=0.0)
    assert np.all(np.isfinite(ds.test_error))
    assert float(ds.test_error.sel(n=20.0)) == 0.0
    rng = np.random.default_rng(0)
    w = np.sqrt(lam)                      # target coefficients with v_i² = λ_i (target_power)
    x = rng.standard_normal((20, 20)) * np.sqrt(lam)
    w_hat = np.linalg.solve(x, x @ w)
    x_test = rng.standard_normal((2000, 20)) * np.sqrt(lam)
    assert np.mean((x_test @ (w_hat - w)) ** 2) < 1e-20


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="non-negative"):
        Spectrum([1.0, -0.1])
    with pytest.raises(ValueError, match="same length"):
        Spectrum([1.0, 0.5], [1.0])
    with pytest.raises(ValueError, match="ridge"):
        krr_learning_curve([1.0, 0.5], [1.0, 1.0], n=3, ridge=-1.0)
    with pytest.raises(ValueError, match="n must be positive"):
        krr_learning_curve([1.0, 0.5], [1.0, 1.0], n=0, ridge=0.1)
    with pytest.raises(ValueError, match="empty"):
        Spectrum([])


def test_dataset_follows_data_model():
    ds = krr_learning_curve(power_law_spectrum(100), n=[5, 10], ridge=[0.0, 0.1])
    records.validate(ds)
    assert ds.test_error.dims == ("n", "ridge")
    assert ds.learnability.dims == ("n", "ridge", "mode")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scalar = krr_learning_curve(power_law_spectrum(100), n=5, ridge=0.1)
    assert scalar.test_error.ndim == 0


def test_series_tail_matches_exact_sums():
    """The accelerated sums (exact head + power-series tail) equal the plain float64 sums."""
    i = np.arange(1, 120_001, dtype=float)
    lam, v2 = i**-1.5, i**-1.2
    lam[-500:] = 0.0                                     # null modes carry target power too
    m = np.ones_like(lam)
    m[:30] = 4.0
    exact = Spectrum(lam, v2, m, accelerate=False)
    fast = Spectrum(lam, v2, m, accelerate=True)
    kappa = np.logspace(-9, 1, 25)
    c = np.linspace(0.0, 1.0, 25)
    for a, b in zip(exact.sums(kappa), fast.sums(kappa), strict=True):
        assert_rel(b, a, 1e-12, "z, q")
    assert_rel(fast.bias_terms(kappa, c), exact.bias_terms(kappa, c), 1e-12, "bias")
