"""The grokking network against its lazy theory: the measured NTK equals the closed-form initial
kernel up to the finite-width fluctuation, and a lazy network (large α) trains as predicted by
its kernel."""

from __future__ import annotations

import numpy as np
import torch
from traindyn.dynamics.recipes.grokking import GrokkingNet, grokking_task, train_grokking
from traindyn.probes import empirical_ntk
from traindyn.theory import kernel_flow, lazy_grokking, polynomial_network_kernel


def _scaled_ntk(net: GrokkingNet, x1, x2=None) -> np.ndarray:
    """``K = (N/α²) Θ_emp``: the NTK in the units of the model's step."""
    width = net.linear.weight.shape[0]
    x2 = None if x2 is None else torch.as_tensor(x2)
    theta = empirical_ntk(net, torch.as_tensor(x1), x2, output="trace", method="jacobian")
    return width / net.alpha**2 * theta.numpy()


def test_measured_ntk_approaches_the_closed_form_as_width_grows():
    """Mean over 4 initialisations of the largest relative gap between ``probes.empirical_ntk``
    (scaled) and ``polynomial_network_kernel``: it falls like ``1/√N`` (16× the width, ~4×
    smaller gap)."""
    x, *_ = grokking_task(n_train=6, n_test=1, dim=8, seed=3)
    want = polynomial_network_kernel(x, epsilon=0.5)
    gaps = []
    for width in (500, 8000):
        per_seed = [np.abs(_scaled_ntk(GrokkingNet(8, width, 3.0, epsilon=0.5, seed=s), x)
                           - want).max() / np.abs(want).max() for s in range(4)]
        gaps.append(float(np.mean(per_seed)))
    assert gaps[1] < 0.03, gaps
    assert gaps[1] < gaps[0] / 2, gaps


def test_a_lazy_network_follows_its_kernel_and_the_closed_form():
    """Trained at α = 500 and 2000: the gap to the prediction from the network's own initial
    kernel shrinks like 1/α (the weights move by O(1/α)); the closed-form kernel's prediction
    is within the finite-width fluctuation."""
    x, y, xt, yt, beta = grokking_task(n_train=40, n_test=200, dim=10, seed=0)
    width, eps, lr = 4000, 0.5, 0.5
    ds = train_grokking(alpha=(500.0, 2000.0), n_train=40, n_test=200, dim=10, width=width,
                        epsilon=eps, learning_rate=lr, steps=200, n_evals=6, ntk_samples=8)
    net = GrokkingNet(10, width, 1.0, epsilon=eps, seed=0)     # the recipe's seed-0 weights
    steps = ds.step.values
    own = kernel_flow(_scaled_ntk(net, x), y, steps, lr, normalization=40.0,
                      kernel_test_train=_scaled_ntk(net, xt, x), targets_test=yt)
    gaps = []
    for alpha in (500.0, 2000.0):
        d = ds.sel(alpha=alpha).isel(seed=0)
        gaps.append(max(float(np.max(np.abs(d[v].values - own[v].values) / own[v].values))
                        for v in ("train_loss", "test_loss")))
    assert gaps[1] < 0.01, gaps
    assert 2.5 < gaps[0] / gaps[1] < 6, gaps                   # 4× α: ~4× smaller
    pred = lazy_grokking(x, y, steps, lr, x_test=xt, y_test=yt, beta=beta, epsilon=eps)
    d = ds.sel(alpha=2000.0).isel(seed=0)
    for var in ("train_loss", "test_loss", "test_loss_population"):
        rel = np.abs(d[var].values - pred[var].values) / pred[var].values
        assert rel.max() < 0.15, (var, rel)
