"""Scaling regimes (Bahri et al. 2021) and the power-law exponent fitter."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.dynamics import records
from traindyn.theory.kernels import power_law_spectrum
from traindyn.theory.scaling import fit_power_law, predicted_exponents, scaling_regimes


def test_predicted_exponents_generic_teacher_and_general_task():
    assert predicted_exponents(1.5) == {
        "variance_limited_n": 1.0, "variance_limited_features": 1.0,
        "resolution_limited_n": 0.5, "resolution_limited_features": 0.5}
    steep = predicted_exponents(1.5, 5.0)   # target concentrated on top modes
    assert steep["resolution_limited_n"] == 3.0 and steep["resolution_limited_features"] == 1.5
    with pytest.raises(ValueError):
        predicted_exponents(0.9)


def test_theory_curves_have_the_predicted_exponents():
    """λ_i = v_i² = i^-2.5 (α_K = 1.5): variance-limited slopes 1, resolution-limited 1.5."""
    a = 2.5
    spec = power_law_spectrum(30_000, a=a, b=a)
    expected = predicted_exponents(a)
    # resolution-limited: n, N_f well below the number of modes
    res = scaling_regimes(spec, n=np.geomspace(1e2, 1e3, 4), n_features=np.geomspace(1e2, 1e3, 4))
    # variance-limited: n, N_f far above the fixed other size
    var = scaling_regimes(spec, n=np.geomspace(1e3, 1e4, 4), n_features=np.geomspace(1e3, 1e4, 4),
                          n_fixed=10, n_features_fixed=10)
    records.validate(res)
    for ds, name, dim in ((var, "variance_limited_n", "n"),
                          (var, "variance_limited_features", "n_features"),
                          (res, "resolution_limited_n", "n"),
                          (res, "resolution_limited_features", "n_features")):
        fit = fit_power_law(ds[dim], ds[name])
        assert abs(float(fit.exponent) - expected[name]) < 0.02, (name, float(fit.exponent))
        assert float(fit.r2) > 0.999


def test_fit_recovers_exponent_and_interval_covers_it(rng):
    """Synthetic y = 3 x^-0.7 (1 + noise) over 8 seeds: the 90 % interval must cover 0.7 in
    about 90 % of repetitions (binomial bounds for 200 repetitions)."""
    x = np.geomspace(10, 1000, 8)
    covered, estimates = 0, []
    for rep in range(200):
        y = 3 * x[:, None] ** -0.7 * (1 + 0.1 * rng.standard_normal((8, 8)))
        fit = fit_power_law(x, y, level=0.9, n_boot=300, seed=rep)
        covered += float(fit.exponent_low) <= 0.7 <= float(fit.exponent_high)
        estimates.append(float(fit.exponent))
    assert 0.82 <= covered / 200 <= 0.99, covered
    assert abs(np.mean(estimates) - 0.7) < 0.01


def test_fit_single_curve_t_interval_and_offset():
    x = np.geomspace(1, 100, 10)
    y = 2.0 + 5 * x**-1.0
    fit = fit_power_law(x, y, offset=2.0)
    assert abs(float(fit.exponent) - 1.0) < 1e-10
    assert abs(float(fit.prefactor) - 5.0) < 1e-8
    with pytest.warns(RuntimeWarning, match="dropped"):
        fit_power_law(x, y, offset=2.5)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law(-x, y)
