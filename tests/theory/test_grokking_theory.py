"""theory.grokking: the grokking model's initial kernel and its lazy prediction, against Monte
Carlo over the initial weights and over fresh inputs (independent of the Isserlis algebra)."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.theory import kernel_flow, lazy_grokking, polynomial_network_kernel, rich_grokking


def test_initial_kernel_equals_the_average_over_random_first_layers():
    """``K₀ = (1/N) Σ_i φ'(h_i)φ'(h'_i) x·x'`` averaged over ``w ~ N(0, I/D)``: Monte Carlo with
    N = 400,000 weights, within 5 standard errors."""
    rng = np.random.default_rng(0)
    dim, eps = 6, 0.7
    x = rng.standard_normal((4, dim)) * 2.0
    w = rng.standard_normal((400_000, dim)) / np.sqrt(dim)
    dphi = 1.0 + eps * (w @ x.T)                       # φ'(h) = 1 + εh, (N, 4)
    samples = dphi[:, :, None] * dphi[:, None, :] * (x @ x.T)[None]
    mc, se = samples.mean(0), samples.std(0) / np.sqrt(samples.shape[0])
    got = polynomial_network_kernel(x, epsilon=eps)
    assert np.all(np.abs(got - mc) <= 5 * se + 1e-12), (got, mc, se)
    # at ε = 0 the model is linear: the kernel is x·x'
    np.testing.assert_allclose(polynomial_network_kernel(x, epsilon=0.0), x @ x.T, rtol=1e-15)


def test_lazy_prediction_is_kernel_flow_with_the_models_normalisation():
    rng = np.random.default_rng(1)
    x, xt = rng.standard_normal((30, 5)), rng.standard_normal((20, 5))
    beta = rng.standard_normal(5)
    beta /= np.linalg.norm(beta)
    y, yt = 0.5 * (x @ beta) ** 2, 0.5 * (xt @ beta) ** 2
    steps = np.array([0, 3, 30, 300])
    ds = lazy_grokking(x, y, steps, 0.5, x_test=xt, y_test=yt, epsilon=0.3)
    # gradient descent on L = (1/2P) Σ (f − y)² with f = K a, step by step in float64
    k = polynomial_network_kernel(x, epsilon=0.3)
    kt = polynomial_network_kernel(xt, x, epsilon=0.3)
    a = np.zeros(30)
    want_train, want_test = [], []
    for s in range(301):
        if s in steps:
            want_train.append(np.mean((k @ a - y) ** 2))
            want_test.append(np.mean((kt @ a - yt) ** 2))
        a -= 0.5 * (k @ a - y) / 30
    np.testing.assert_allclose(ds.train_loss.values, want_train, rtol=1e-10)
    np.testing.assert_allclose(ds.test_loss.values, want_test, rtol=1e-10)
    np.testing.assert_allclose(ds.time.values, 0.5 * steps)
    ref = kernel_flow(k, y, steps, 0.5, normalization=30.0)
    np.testing.assert_allclose(ds.train_loss.values, ref.train_loss.values, rtol=1e-12)


def test_population_test_loss_equals_monte_carlo_over_fresh_inputs():
    rng = np.random.default_rng(2)
    dim, n = 6, 25
    x = rng.standard_normal((n, dim))
    beta = rng.standard_normal(dim)
    beta /= np.linalg.norm(beta)
    y = 0.5 * (x @ beta) ** 2
    xt = rng.standard_normal((200_000, dim))
    yt = 0.5 * (xt @ beta) ** 2
    ds = lazy_grokking(x, y, [0, 5, 50, 2000], 0.4, x_test=xt, y_test=yt, beta=beta,
                       epsilon=0.5)
    # at step 0 the prediction is 0: E[y²] = E[(β·x)⁴]/4 = 3/4
    assert ds.test_loss_population.values[0] == pytest.approx(0.75, rel=1e-12)
    f = ds.test_loss.values                               # Monte Carlo over 200,000 inputs
    np.testing.assert_allclose(ds.test_loss_population.values, f, rtol=0.03)


def _task(n, n_test, dim, seed):
    rng = np.random.default_rng(seed)
    beta = rng.standard_normal(dim)
    beta /= np.linalg.norm(beta)
    x, xt = rng.standard_normal((n, dim)), rng.standard_normal((n_test, dim))
    return x, 0.5 * (x @ beta) ** 2, xt, 0.5 * (xt @ beta) ** 2, beta


def test_rich_dynamics_tend_to_the_lazy_kernel_flow_as_alpha_grows():
    """Linearised in ``1/α`` the ``(m, M)`` updates from ``m₀ = 0``, ``M₀ = σ²I`` are gradient
    descent under ``K₀ = (x·x')(1 + ε²σ² x·x')``: against ``lazy_grokking`` (an eigendecomposition
    of ``K₀``, no statistics) the gap falls like ``1/α`` (10× α, ~10× smaller)."""
    x, y, xt, yt, beta = _task(30, 40, 5, 3)
    steps = np.array([0, 10, 100, 400])
    lazy = lazy_grokking(x, y, steps, 0.4, x_test=xt, y_test=yt, beta=beta, epsilon=0.5)
    rich = rich_grokking(x, y, steps, 0.4, [1e3, 1e4], x_test=xt, y_test=yt, beta=beta,
                         epsilon=0.5)
    gaps = []
    for alpha in (1e3, 1e4):
        r = rich.sel(alpha=alpha)
        gaps.append(max(float(np.max(np.abs(r[v].values / lazy[v].values - 1)))
                        for v in ("train_loss", "test_loss", "test_loss_population")))
    assert gaps[1] < 2e-3, gaps
    assert 7 < gaps[0] / gaps[1] < 13, gaps


def test_rich_population_loss_equals_monte_carlo_and_the_rich_run_generalises():
    """``test_loss_population`` from the statistics against the mean squared error of the same
    predictor on 200,000 fresh inputs (3 %); a rich run (α = 0.5) ends far below the lazy
    prediction's test loss, the lazier one (α = 50) near it."""
    x, y, _, _, beta = _task(25, 1, 6, 2)
    rng = np.random.default_rng(5)
    xt = rng.standard_normal((200_000, 6))
    yt = 0.5 * (xt @ beta) ** 2
    steps = np.array([0, 20, 200, 2000])
    rich = rich_grokking(x, y, steps, 0.4, [0.5, 50.0], x_test=xt, y_test=yt, beta=beta,
                         epsilon=0.5)
    np.testing.assert_allclose(rich.test_loss_population.values[:, 0], 0.75, rtol=1e-12)
    np.testing.assert_allclose(rich.test_loss_population.values, rich.test_loss.values,
                               rtol=0.03)
    lazy = lazy_grokking(x, y, steps, 0.4, beta=beta, epsilon=0.5)
    end = rich.test_loss_population.isel(step=-1)
    assert float(end.sel(alpha=0.5)) < 0.2 * float(lazy.test_loss_population[-1])
    assert abs(float(end.sel(alpha=50.0)) / float(lazy.test_loss_population[-1]) - 1) < 0.3
    np.testing.assert_allclose(rich.time.values, 0.4 * steps)


def test_rich_grokking_bad_input():
    x, y, _, _, _ = _task(10, 1, 3, 0)
    with pytest.raises(ValueError, match="alpha"):
        rich_grokking(x, y, [0, 1], 0.1, [1.0, -2.0])
    with pytest.raises(ValueError, match="increasing"):
        rich_grokking(x, y, [0, 5, 3], 0.1, 1.0)
    with pytest.raises(ValueError, match="m0 and M0"):
        rich_grokking(x, y, [0, 1], 0.1, 1.0, M0=np.eye(4))
    with pytest.raises(ValueError, match="learning_rate"):
        rich_grokking(x, y, [0, 1], -0.1, 1.0)
    with pytest.raises(ValueError, match="y_train"):
        rich_grokking(x, y[:5], [0, 1], 0.1, 1.0)
