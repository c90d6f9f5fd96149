"""Advani–Saxe theory against simulation, hand-worked limits and random-matrix brute force."""

import numpy as np
import pytest
import xarray as xr
from traindyn.dynamics.recipes import simulate_linear_teacher
from traindyn.dynamics.schedules import log_steps

from tests.helpers import assert_rel
from traindyn import theory


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0, 2.0, 4.0])
def test_marchenko_pastur_quadrature_moments(alpha):
    # ∫ρ = min(1, α) (the rest is the atom at 0) and ∫ρλ = E[λ] = tr(XXᵀ)/N = α (by hand)
    lam, w = theory.marchenko_pastur_quadrature(alpha)
    assert_rel(w.sum(), min(1.0, alpha), 1e-10, "mass")
    assert_rel(w @ lam, alpha, 1e-10, "first moment")
    # second moment of MP with these conventions: E[λ²] = α(1+α)  (Marchenko–Pastur, by hand)
    assert_rel(w @ lam**2, alpha * (1 + alpha), 1e-10, "second moment")


def test_marchenko_pastur_density_matches_sampled_spectrum():
    rng = np.random.default_rng(0)
    n, alpha = 1000, 0.5
    x = rng.standard_normal((n, int(alpha * n))) / np.sqrt(n)
    evals = np.linalg.eigvalsh(x @ x.T)
    nonzero = evals[evals > 1e-8]
    hist, edges = np.histogram(nonzero, bins=20)
    centres = 0.5 * (edges[1:] + edges[:-1])
    widths = np.diff(edges)
    predicted = theory.marchenko_pastur_density(centres, alpha) * widths * n
    inner = slice(2, -2)  # edges of the bulk converge slowly
    assert np.abs(hist[inner] - predicted[inner]).max() < 0.15 * predicted[inner].max()
    assert np.sum(evals <= 1e-8) == n - int(alpha * n)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_long_time_limits_match_hand_formula(alpha):
    noise, teacher = 0.3, 1.2
    ds = theory.advani_saxe([1e6], alpha, noise_var=noise, teacher_var=teacher)
    if alpha > 1:
        expected = noise * alpha / (alpha - 1)
    else:
        expected = (1 - alpha) * teacher + noise / (1 - alpha)
    assert_rel(ds.test_error.values, expected, 1e-6, "E_g(∞)")
    assert_rel(ds.train_error.values, noise * max(0.0, 1 - 1 / alpha) if alpha > 1 else 1.0, 1.0
               if alpha < 1 else 1e-6, "E_t(∞)")
    lim = theory.advani_saxe_asymptote(alpha, noise_var=noise, teacher_var=teacher)
    assert_rel(lim.test_error.values, expected, 1e-12, "asymptote")


def test_initial_errors_equal_prior_variance():
    # at t = 0 the student has learned nothing: E_g = E_t = σ_ε² + σ_w0² + σ_w̄²
    ds = theory.advani_saxe([0.0], [0.5, 2.0], noise_var=0.1, teacher_var=1.0, init_var=0.2)
    assert_rel(ds.test_error.values, 1.3, 1e-10, "E_g(0)")
    assert_rel(ds.train_error.values, 1.3, 1e-10, "E_t(0)")


def test_gradient_descent_tends_to_gradient_flow_as_lr_shrinks():
    t = np.array([0.5, 2.0, 10.0])
    flow = theory.advani_saxe(t, 2.0).test_error.values
    gd = theory.advani_saxe(t, 2.0, learning_rate=1e-3).test_error.values
    assert_rel(gd, flow, 2e-3, "GD(η→0) vs flow")


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_theory_matches_simulation_at_n300(alpha):
    lr = 0.05
    sim = simulate_linear_teacher(
        n_features=300, load_ratios=[alpha], steps=log_steps(2000, 16), learning_rate=lr,
        noise_var=0.25, seeds=range(32))
    pred = theory.advani_saxe(sim.time, sim.load_ratio.values, noise_var=0.25, learning_rate=lr)
    measured = sim.mean("seed")
    # within 5 % at every recorded time: 32 seeds, seed-to-seed spread of the mean ≈ 1.5 %
    assert_rel(measured.test_error, pred.test_error, 0.05, f"test error α={alpha}")
    # training error while it is above 1 % of its start; later, at α < 1, its decay is set by
    # the smallest eigenvalue of XXᵀ, which at N = 300 lies O(N^-2/3) below the MP edge λ₋,
    # so the finite-size run decays more slowly than the N → ∞ theory (8 % tolerance there)
    big = pred.train_error > 1e-2 * float(pred.train_error.max())
    assert_rel(measured.train_error.where(big, drop=True), pred.train_error.where(big, drop=True),
               0.08, f"train error α={alpha}")
    # aligned with no glue: the prediction lies on the measured (load_ratio, step) coordinates
    a, b = xr.align(pred, measured, join="exact")
    assert a.sizes == b.sizes


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="load ratio"):
        theory.advani_saxe([1.0], 0.0)
    with pytest.raises(ValueError, match="diverges"):
        theory.advani_saxe([1.0], 4.0, learning_rate=0.5)
    with pytest.raises(ValueError, match="non-negative"):
        theory.advani_saxe([-1.0], 2.0)
    assert np.isinf(theory.advani_saxe_asymptote(1.0).test_error)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_a_scalar_time_gives_a_scalar_prediction(alpha):
    """advani_saxe(3.0, α): a scalar time gives 0-d variables with
    a 0-d ``time`` coordinate; the value is the test error of Advani & Saxe (2017) integrated
    with scipy.integrate.quad over the Marchenko–Pastur density (plus the frozen atom), and
    equals the same time taken from an array."""
    from scipy.integrate import quad

    t, noise, teacher = 3.0, 0.25, 1.0
    ds = theory.advani_saxe(t, alpha, noise_var=noise, teacher_var=teacher)
    assert ds.test_error.dims == () and float(ds.time) == t

    lo, hi = (1 - np.sqrt(alpha)) ** 2, (1 + np.sqrt(alpha)) ** 2

    def rho(lam):  # MP density of the non-zero eigenvalues, mass min(1, α)
        return np.sqrt((hi - lam) * (lam - lo)) / (2 * np.pi * lam)

    def integrand(lam):
        d = np.exp(-lam * t)
        return rho(lam) * (teacher * d**2 + noise / lam * (1 - d) ** 2)

    want = noise + max(1 - alpha, 0) * teacher + quad(integrand, lo, hi, epsabs=1e-13,
                                                       epsrel=1e-12)[0]
    assert float(ds.test_error) == pytest.approx(want, rel=1e-8)
    from_array = theory.advani_saxe([0.0, t], alpha, noise_var=noise, teacher_var=teacher)
    assert float(from_array.test_error.sel(time=t)) == float(ds.test_error)
    gd = theory.advani_saxe(t, alpha, learning_rate=0.01)
    assert gd.train_error.dims == () and float(gd.train_error) == float(
        theory.advani_saxe([t], alpha, learning_rate=0.01).train_error[0])
