"""Tests of probes.inductive_bias against closed forms: the χ² CDF and Gaussian-weight models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from traindyn.probes.inductive_bias import (
    MLPHypothesis,
    fit_ncx2,
    gp_posterior_errors,
    inductive_bias,
    kernel_hypothesis_errors,
    log_cdf_ncx2,
    ncx2_logpdf,
    network_hypothesis_errors,
    sankaran_log_cdf,
    series_log_cdf,
)


@pytest.mark.parametrize("df,nc", [(4, 0.0), (10, 5.0), (60, 25.0), (400, 80.0)])
def test_series_tail_equals_scipy_where_scipy_is_accurate(df, nc):
    # boost's CDF (scipy) is an independent implementation; both must agree in the tail they share
    x = stats.ncx2.ppf([1e-3, 1e-20, 1e-80, 1e-250], df, nc)
    ref = stats.ncx2.logcdf(x, df, nc)
    np.testing.assert_allclose(series_log_cdf(x, df, nc), ref, rtol=1e-9)


def test_far_tail_matches_leading_small_x_asymptote():
    # P(χ'²_k(λ) ≤ x) → e^{-λ/2} (x/2)^{k/2} / Γ(k/2+1) as x → 0 (first Poisson term, first
    # gamma-series term), worked by hand; at x = 1e-40 the correction is O(x), negligible.
    df, nc, scale = 30.0, 12.0, 0.02
    x = 1e-40
    expected = -nc / 2 + (df / 2) * math.log(x / 2) - special.gammaln(df / 2 + 1)
    got = log_cdf_ncx2(x * scale, df, nc, scale)
    assert np.isfinite(got) and got < -600  # scipy underflows here: the tail branch is used
    assert abs(got - expected) / abs(expected) < 1e-6
    # monotone and finite down to absurdly small errors
    xs = np.geomspace(1e-300, 1.0, 50) * scale
    lp = log_cdf_ncx2(xs, df, nc, scale)
    assert np.all(np.isfinite(lp)) and np.all(np.diff(lp) > 0)
    assert log_cdf_ncx2(0.0, df, nc, scale) == -np.inf


def test_sankaran_approximation_good_in_bulk_saturates_in_far_tail():
    x = stats.ncx2.ppf(1e-3, 400, 80)
    assert abs(sankaran_log_cdf(x, 400, 80) / stats.ncx2.logcdf(x, 400, 80) - 1) < 0.01
    # the normal approximation bottoms out (P(X ≤ 0) > 0): why the series is the default
    x = stats.ncx2.ppf(1e-100, 10, 5)
    assert sankaran_log_cdf(x, 10, 5) > -30 > stats.ncx2.logcdf(x, 10, 5)


@pytest.mark.parametrize("df,nc", [(3, 0.0), (40, 7.0), (150, 60.0)])
def test_log_density_equals_scipy_where_scipy_is_finite(df, nc):
    x = 0.2 * stats.ncx2.ppf([1e-6, 0.01, 0.5, 0.99, 1 - 1e-9], df, nc)
    np.testing.assert_allclose(ncx2_logpdf(x, df, nc, 0.2),
                               stats.ncx2.logpdf(x, df, nc, scale=0.2), rtol=1e-9)


def test_fit_survives_large_df_where_scipy_density_underflows():
    # regression: scipy's ncx2.logpdf is -inf at df ~ 2000, so ncx2.fit cannot fit such errors
    df, nc, scale = 2000.0, 30.0, 1e-3
    assert np.isneginf(stats.ncx2.logpdf(df + nc, df, 1e-3))
    e = scale * stats.ncx2.rvs(df, nc, size=400, random_state=np.random.default_rng(5))
    fit = fit_ncx2(e)
    law = stats.ncx2(fit.df, fit.nc, scale=fit.scale)
    assert abs(law.mean() / e.mean() - 1) < 1e-3
    assert abs(law.std() / e.std() - 1) < 0.05
    assert fit.ks_pvalue > 0.05


def test_bits_are_nats_over_ln2_of_the_fitted_law():
    rng = np.random.default_rng(3)
    e = 0.05 * stats.ncx2.rvs(12, 4, size=300, random_state=rng)
    ds = inductive_bias(e, [0.2, 0.4], n_bootstrap=0)
    nats = -stats.ncx2.logcdf([0.2, 0.4], float(ds.ncx2_df), float(ds.ncx2_nc),
                              scale=float(ds.ncx2_scale))
    np.testing.assert_allclose(ds.inductive_bias.values, nats / math.log(2), rtol=1e-10)
    assert ds.inductive_bias.attrs["units"] == "bit"
    assert np.isnan(ds.inductive_bias_low).all()


def test_recovers_known_chi2_bias_within_bootstrap_interval():
    df, nc, scale = 20.0, 6.0, 0.01
    e = scale * stats.ncx2.rvs(df, nc, size=400, random_state=np.random.default_rng(0))
    eps = np.array([0.06, 0.1, 0.15, 0.2, 0.3])
    truth = -stats.ncx2.logcdf(eps, df, nc, scale=scale) / math.log(2)
    ds = inductive_bias(e, eps, n_bootstrap=60, seed=1)
    assert np.all(ds.inductive_bias_low.values <= truth)
    assert np.all(truth <= ds.inductive_bias_high.values)
    # the smallest ε lies beyond every sample: only the fit can say anything there
    assert np.isinf(ds.empirical_inductive_bias.values[0])
    assert ds.ks_pvalue > 0.05


def _gaussian_weight_problem(n=20, p=60, m=15, outputs=2, seed=0):
    """Linear models f(x) = θᵀφ(x), θ ~ N(0, I_p), constrained to fit n training points.

    Test features φ_* = Q + Aφ_train with Q orthonormal rows orthogonal to the training rows,
    so the posterior of f(X_*) is N(A y_train, I_m) per output (worked by hand) and
    m·error ~ χ'²(m·outputs, ‖A y_train − y_*‖²_F) exactly.
    """
    rng = np.random.default_rng(seed)
    phi_tr = rng.standard_normal((n, p))
    basis, _ = np.linalg.qr(np.concatenate([phi_tr.T, rng.standard_normal((p, p))], 1))
    q = basis[:, n:n + m].T                                    # orthogonal to span(φ_train)
    a = 0.3 * rng.standard_normal((m, n))
    phi_te = q + a @ phi_tr
    y_tr = rng.standard_normal((n, outputs))
    y_te = rng.standard_normal((m, outputs))
    nc = float(((a @ y_tr - y_te) ** 2).sum())
    return phi_tr, phi_te, y_tr, y_te, m * outputs, nc, m


def test_gp_posterior_samples_of_gaussian_weight_space_have_exact_chi2_law():
    phi_tr, phi_te, y_tr, y_te, k, nc, m = _gaussian_weight_problem()
    errors = gp_posterior_errors(phi_tr @ phi_tr.T, phi_te @ phi_tr.T, phi_te @ phi_te.T,
                                 y_tr, y_te, n_hypotheses=3000, seed=0).numpy()
    exact = stats.ncx2(k, nc, scale=1.0 / m)
    assert stats.kstest(errors, exact.cdf).pvalue > 0.01
    assert abs(errors.mean() / exact.mean() - 1) < 0.02
    # the estimator recovers the exact inductive bias of this space within its interval
    eps = exact.ppf([1e-6, 1e-3, 0.1])
    truth = -exact.logcdf(eps) / math.log(2)
    ds = inductive_bias(errors[:500], eps, n_bootstrap=60, seed=2)
    assert np.all(ds.inductive_bias_low.values <= truth)
    assert np.all(truth <= ds.inductive_bias_high.values)


def test_linear_kernel_on_features_is_the_same_space():
    phi_tr, phi_te, y_tr, y_te, _, _, _ = _gaussian_weight_problem()
    d = phi_tr.shape[1]
    a = kernel_hypothesis_errors(phi_tr, y_tr, phi_te, y_te, kernel="linear", amplitude=d,
                                 n_hypotheses=50, seed=4)
    b = gp_posterior_errors(phi_tr @ phi_tr.T, phi_te @ phi_tr.T, phi_te @ phi_te.T,
                            y_tr, y_te, n_hypotheses=50, seed=4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_estimate_stabilises_as_samples_grow():
    df, nc, scale = 20.0, 6.0, 0.01
    eps = 0.08
    truth = -stats.ncx2.logcdf(eps, df, nc, scale=scale) / math.log(2)
    widths, errs = [], []
    for n in (50, 1600):
        e = scale * stats.ncx2.rvs(df, nc, size=n, random_state=np.random.default_rng(n))
        ds = inductive_bias(e, eps, n_bootstrap=40, seed=0)
        widths.append((ds.inductive_bias_high - ds.inductive_bias_low).item())
        errs.append(abs(ds.inductive_bias.item() - truth))
    print(f"\nI({eps}) true {truth:.2f} bits; interval widths {widths}; |error| {errs}")
    assert widths[1] < 0.5 * widths[0]
    assert errs[1] < 0.1 * truth


def _toy_train(seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    return float(rng.uniform(0.1, 0.2)), (0.0 if seed % 4 else 1.0)


def test_network_errors_over_dask_equal_serial_and_unfit_networks_are_dropped():
    distributed = pytest.importorskip("distributed")
    serial = network_hypothesis_errors(_toy_train, range(8))
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        parallel = network_hypothesis_errors(_toy_train, range(8), client=client)
    np.testing.assert_array_equal(serial, parallel)
    with pytest.warns(RuntimeWarning, match="did not fit"):
        kept = network_hypothesis_errors(_toy_train, range(8), fit_tolerance=0.5)
    np.testing.assert_array_equal(kept, serial[[1, 2, 3, 5, 6, 7]])


def test_mlp_hypotheses_fit_training_data_and_differ_by_seed():
    rng = np.random.default_rng(0)
    x, xt = rng.standard_normal((20, 5)), rng.standard_normal((10, 5))
    y, yt = np.eye(3)[rng.integers(0, 3, 20)], np.eye(3)[rng.integers(0, 3, 10)]
    fn = MLPHypothesis(x, y, xt, yt, width=64, learning_rate=1e-2, max_steps=500,
                       tolerance=1e-3)
    (te0, tr0), (te1, tr1) = fn(0), fn(1)
    assert tr0 <= 1e-3 and tr1 <= 1e-3
    assert te0 != te1 and te0 > tr0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="non-negative"):
        fit_ncx2([0.1, -0.2, 0.3])
    with pytest.raises(ValueError, match="at least 3"):
        fit_ncx2([0.1, 0.2])
    with pytest.raises(ValueError, match="spread"):
        inductive_bias([0.1] * 10, 0.05)
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((10, 4))  # 4 features cannot interpolate 10 points
    with pytest.raises(ValueError, match="interpolates"):
        gp_posterior_errors(phi @ phi.T, phi[:3] @ phi.T, phi[:3] @ phi[:3].T,
                            rng.standard_normal(10), rng.standard_normal(3))
    with pytest.raises(ValueError, match="tail"):
        log_cdf_ncx2(0.1, 3, 1, tail="normal")
