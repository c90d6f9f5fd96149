"""The grokking network against ``theory.rich_grokking`` (gradient descent of the sufficient
statistics ``m``, ``M``): exact from the network's own initial statistics, and the
infinite-width start approached as the width grows."""

from __future__ import annotations

import numpy as np
from traindyn.dynamics.recipes.grokking import GrokkingNet, grokking_task, train_grokking
from traindyn.theory import rich_grokking

_VARS = ("train_loss", "test_loss", "test_loss_population", "m_drift_sq", "M_drift_trace",
         "M_drift_beta", "M_drift_fro")


def test_statistics_dynamics_reproduce_the_network_from_its_own_start():
    """The network trained with autograd, one α at a time (rich α = 0.5 to lazy α = 20),
    against the closed ``(m, M)`` updates started from its initial ``W₀ᵀ1/N`` and ``W₀ᵀW₀/N``:
    every loss and statistic to 1e-10, through the rich phase."""
    n, dim, width, eps, lr = 40, 8, 30, 0.3, 0.4
    ds = train_grokking(alpha=(0.5, 3.0, 20.0), n_train=n, n_test=60, dim=dim, width=width,
                        epsilon=eps, learning_rate=lr, steps=300, n_evals=6, ntk_samples=8,
                        vectorize=False)
    x, y, xt, yt, beta = grokking_task(n, 60, dim, 0)
    w0 = GrokkingNet(dim, width, 1.0, eps, seed=0).linear.weight.detach().numpy()
    th = rich_grokking(x, y, ds.step.values, lr, ds.alpha.values, x_test=xt, y_test=yt,
                       beta=beta, epsilon=eps, m0=w0.mean(0), M0=w0.T @ w0 / width)
    for name in _VARS:
        np.testing.assert_allclose(th[name].values, ds[name].isel(seed=0).values,
                                   rtol=1e-10, atol=1e-13, err_msg=name)
    rich = ds.sel(alpha=0.5).isel(seed=0)
    assert float(rich.test_loss_population[-1]) < 0.1 * float(rich.test_loss_population[0])


def test_infinite_width_statistics_approached_as_width_grows():
    """Largest gap of the population test loss between networks (mean over 3 seeds) and the
    infinite-width start ``m₀ = 0``, ``M₀ = I/D``: 16× the width, ~4× smaller (1/√N)."""
    n, dim, eps, lr = 40, 8, 0.3, 0.4
    x, y, _, _, beta = grokking_task(n, 1, dim, 0)
    gaps = []
    for width in (100, 1600):
        ds = train_grokking(alpha=(1.0,), n_train=n, n_test=20, dim=dim, width=width,
                            epsilon=eps, learning_rate=lr, steps=150, n_evals=5,
                            seeds=(0, 1, 2), ntk_samples=4)
        th = rich_grokking(x, y, ds.step.values, lr, 1.0, beta=beta, epsilon=eps)
        d = np.abs(ds.test_loss_population.isel(alpha=0).values
                   - th.test_loss_population.isel(alpha=0).values[None])
        gaps.append(float(d.max(axis=1).mean()))
    assert gaps[1] < 0.02, gaps
    assert 2.0 < gaps[0] / gaps[1] < 8.0, gaps
