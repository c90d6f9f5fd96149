"""Exact kernel / random-feature ridge regression experiments, and theory through them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from traindyn.dynamics import records
from traindyn.dynamics.recipes.kernel_regression import (
    _ridge_solutions,
    digits_kernel,
    simulate_digits_krr,
    simulate_krr,
    simulate_rf,
)
from traindyn.theory.kernels import krr_learning_curve, power_law_spectrum
from traindyn.theory.random_features import rf_learning_curve
from traindyn.theory.scaling import fit_power_law, predicted_exponents
from traindyn.theory.spectra import spectrum_from_gram

SPEC = power_law_spectrum(500, a=1.5, b=1.5)
NOISE = 0.1


def _mean_rel_error(measured: xr.DataArray, theory: xr.DataArray) -> float:
    measured, theory = xr.align(measured.mean("seed"), theory, join="exact")
    return float(np.abs(measured / theory - 1).mean())


@pytest.mark.parametrize("shape", [(30, 8), (8, 30)])
def test_ridge_solutions_match_brute_force(rng, shape):
    F = rng.standard_normal(shape)
    y = rng.standard_normal((shape[0], 1))
    ridges = np.array([0.0, 0.1, 3.0])
    a, train = _ridge_solutions(torch.from_numpy(F), torch.from_numpy(y), torch.from_numpy(ridges))
    for r_i, r in enumerate(ridges):
        ref = np.linalg.pinv(F) @ y if r == 0 else np.linalg.solve(
            F.T @ F + r * np.eye(shape[1]), F.T @ y)
        np.testing.assert_allclose(a[r_i].numpy(), ref, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(train[r_i].item(), np.mean((y - F @ ref) ** 2), rtol=1e-8,
                                   atol=1e-14)


def test_singular_gram_gives_minimum_norm_interpolant(rng):
    F = rng.standard_normal((10, 4)) @ rng.standard_normal((4, 20))   # rank 4 < n = 10 < p
    y = rng.standard_normal((10, 1))
    a, _ = _ridge_solutions(torch.from_numpy(F), torch.from_numpy(y), torch.tensor([0.0]))
    np.testing.assert_allclose(a[0].numpy(), np.linalg.pinv(F) @ y, rtol=1e-6, atol=1e-8)


def test_krr_simulation_matches_theory_within_5_percent():
    ns, ridges = [100, 200, 300], [0.0, 1e-2, 1e-1]
    sim = simulate_krr(SPEC.eigenvalues, SPEC.target_power, n=ns, ridge=ridges, noise_var=NOISE,
                       seeds=range(10))
    theory = krr_learning_curve(SPEC, n=ns, ridge=ridges, noise_var=NOISE)
    records.validate(sim)
    assert _mean_rel_error(sim.test_error, theory.test_error) < 0.05
    # train error (ridge > 0, where it is not ~0): small and noisier across seeds, so 10 %
    pos = {"ridge": [1e-2, 1e-1]}
    assert _mean_rel_error(sim.train_error.sel(pos), theory.train_error.sel(pos)) < 0.10
    # interpolation at zero ridge
    assert float(sim.train_error.sel(ridge=0.0).max()) < 1e-16


def test_rf_simulation_matches_theory_within_5_percent():
    nf, ridges = [50, 100, 300], [0.0, 1e-2, 1e-1]
    sim = simulate_rf(SPEC.eigenvalues, SPEC.target_power, n=[200], n_features=nf, ridge=ridges,
                      noise_var=NOISE, seeds=range(10))
    theory = rf_learning_curve(SPEC, n=[200], n_features=nf, ridge=ridges, noise_var=NOISE)
    records.validate(sim)
    assert _mean_rel_error(sim.test_error, theory.test_error) < 0.05


def test_double_descent_in_simulation_peaks_at_n_features_equal_n():
    nf = [40, 80, 100, 120, 200]
    sim = simulate_rf(SPEC.eigenvalues, SPEC.target_power, n=[100], n_features=nf, ridge=[0.0],
                      noise_var=NOISE, seeds=range(6))
    curve = sim.test_error.median("seed").squeeze()
    assert int(np.argmax(curve.values)) == nf.index(100)
    assert float(curve.sel(n_features=100)) > 5 * float(curve.sel(n_features=40))


def test_same_seed_gives_the_same_data_in_krr_and_rf():
    """Paired comparisons: with many features RF approaches KRR on the very same sample."""
    krr = simulate_krr(SPEC.eigenvalues, SPEC.target_power, n=[80], ridge=[1e-2],
                       noise_var=NOISE, seeds=[3, 4])
    rf = simulate_rf(SPEC.eigenvalues, SPEC.target_power, n=[80], n_features=[4000],
                     ridge=[1e-2], noise_var=NOISE, seeds=[3, 4])
    gap = (rf.test_error.squeeze() - krr.test_error.squeeze()) / krr.test_error.squeeze()
    assert np.all(np.abs(gap.values) < 0.05)


def test_digits_theory_through_simulation():
    """KRR on (a 700-image subset of) digits with an RBF kernel vs the eigenframework run on
    the empirical spectrum of the same population; non-Gaussian data, so 6 % on average."""
    gram, y = digits_kernel()
    keep = np.random.default_rng(0).permutation(gram.shape[0])[:700]
    gram, y = gram[np.ix_(keep, keep)], y[keep]
    ns, ridges = [25, 50, 100, 200], [1e-3, 1e-1]
    sim = simulate_digits_krr(ns, ridges, seeds=range(10), gram=gram, targets=y)
    theory = krr_learning_curve(spectrum_from_gram(gram, y), n=ns, ridge=ridges)
    records.validate(sim)
    assert _mean_rel_error(sim.test_error, theory.test_error) < 0.06
    # learning curve falls with n in both
    assert np.all(np.diff(theory.test_error.values, axis=0) < 0)
    assert np.all(np.diff(sim.test_error.mean("seed").values, axis=0) < 0)


def test_resolution_limited_exponent_from_simulations():
    """Noiseless ridgeless KRR, λ_i = v_i² = i^-2 (α_K = 1): the exponent fitted to simulated
    points (bootstrap over seeds) brackets the predicted one."""
    spec = power_law_spectrum(1500, a=2.0, b=2.0)
    ns = [20, 40, 80, 160]
    sim = simulate_krr(spec.eigenvalues, spec.target_power, n=ns, ridge=[0.0], seeds=range(10))
    fit = fit_power_law(sim.n, sim.test_error.squeeze("ridge"))
    predicted = predicted_exponents(2.0)["resolution_limited_n"]
    assert float(fit.exponent_low) <= predicted <= float(fit.exponent_high), fit


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive integers"):
        simulate_krr(SPEC.eigenvalues, SPEC.target_power, n=[10.5])
    with pytest.raises(ValueError, match="eigenvalues > 0"):
        simulate_krr([1.0, 0.0], [1.0, 1.0], n=[5])
    with pytest.raises(ValueError, match="targets"):
        simulate_digits_krr([5], gram=np.eye(4))
    with pytest.raises(ValueError, match="unknown kernel"):
        digits_kernel("cosine")


@pytest.mark.slow
def test_many_seeds_theory_within_3_percent_everywhere_off_threshold():
    """32 seeds, n up to 400: every point of the KRR and RF curves within 6 %, mean within 3 %."""
    spec = power_law_spectrum(2000, a=1.5, b=1.5)
    ns, ridges = [50, 100, 200, 400], [0.0, 1e-2, 1e-1]
    sim = simulate_krr(spec.eigenvalues, spec.target_power, n=ns, ridge=ridges,
                       noise_var=NOISE, seeds=range(32))
    th = krr_learning_curve(spec, n=ns, ridge=ridges, noise_var=NOISE)
    rel = np.abs(sim.test_error.mean("seed") / th.test_error - 1)
    assert float(rel.mean()) < 0.03 and float(rel.max()) < 0.06
    nf = [50, 100, 150, 300, 600]
    sim = simulate_rf(spec.eigenvalues, spec.target_power, n=[200], n_features=nf,
                      ridge=ridges, noise_var=NOISE, seeds=range(32))
    th = rf_learning_curve(spec, n=[200], n_features=nf, ridge=ridges, noise_var=NOISE)
    rel = np.abs(sim.test_error.mean("seed") / th.test_error - 1)
    assert float(rel.mean()) < 0.03 and float(rel.max()) < 0.08


@pytest.mark.slow
def test_digits_full_population():
    gram, y = digits_kernel()
    ns, ridges = [25, 50, 100, 200, 400], [1e-3, 1e-1]
    sim = simulate_digits_krr(ns, ridges, seeds=range(16), gram=gram, targets=y)
    theory = krr_learning_curve(spectrum_from_gram(gram, y), n=ns, ridge=ridges)
    assert _mean_rel_error(sim.test_error, theory.test_error) < 0.05
