"""dynamics.recipes.grokking: the sufficient-statistics test loss against Monte Carlo, the
recorded Dataset, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from traindyn.dynamics import records
from traindyn.dynamics.recipes.grokking import (
    GrokkingNet,
    grokking_task,
    population_test_loss,
    train_grokking,
)


def test_population_loss_from_statistics_matches_monte_carlo():
    _, _, _, _, beta = grokking_task(5, 1, 6, seed=4)
    net = GrokkingNet(6, 40, alpha=2.0, epsilon=0.5, seed=1)
    with torch.no_grad():
        net.linear.weight += 0.2 * torch.randn_like(net.linear.weight)
    b = torch.as_tensor(beta)
    exact = population_test_loss(net.statistics(b), 2.0, 0.5)
    x = torch.randn(400_000, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (net(x) - 0.5 * (x @ b) ** 2) ** 2
    mc, se = float(err.mean()), float(err.std() / np.sqrt(len(err)))
    assert abs(mc - exact) < 4 * se, (mc, exact, se)


def test_train_grokking_records_losses_statistics_and_probes():
    ds = train_grokking(alpha=(1.0, 20.0), n_train=40, n_test=400, dim=8, width=30,
                        epsilon=0.2, learning_rate=0.3, steps=300, n_evals=6, seeds=(0,),
                        ntk_samples=16)
    records.validate(ds)
    for name in ("train_loss", "test_loss", "test_loss_population", "m_drift_sq",
                 "M_drift_trace", "M_drift_beta", "M_drift_fro", "ntk_alignment",
                 "ntk_centered_alignment", "rankme"):
        assert name in ds, name
    assert ds.train_loss.dims == ("alpha", "seed", "step")
    first, last = ds.isel(step=0), ds.isel(step=-1)
    assert (last.train_loss < first.train_loss).all()
    assert float(first.M_drift_fro.max()) == 0.0
    # lazier (larger α) moves the weights less: statistics scale like 1/α
    lazy, rich = last.M_drift_fro.sel(alpha=20.0), last.M_drift_fro.sel(alpha=1.0)
    assert float(lazy.max()) < float(rich.min())
    # sampled test loss agrees with the exact population value (400 points: ~15 %)
    rel = np.abs(last.test_loss / last.test_loss_population - 1)
    assert float(rel.max()) < 0.3
    np.testing.assert_allclose(ds.time.values, 0.3 * ds.step.values)


def test_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        GrokkingNet(3, 4, alpha=0.0)
    with pytest.raises(ValueError, match="n_train"):
        train_grokking(n_train=0)


def test_vectorized_run_equals_the_per_network_loop():
    """All (α, seed) networks trained as one ``(A, S, N, D)`` tensor with a closed-form
    gradient equal, in float64, the networks trained one by one with autograd: every recorded
    variable (losses, statistics, NTK and RankMe probes) to 1e-10."""
    kw = dict(alpha=(0.5, 3.0, 20.0), n_train=30, n_test=50, dim=6, width=12, epsilon=0.3,
              learning_rate=0.4, steps=200, n_evals=6, seeds=(0, 1), ntk_samples=8)
    fast = train_grokking(vectorize=True, **kw)
    slow = train_grokking(vectorize=False, **kw)
    assert set(fast.data_vars) == set(slow.data_vars)
    for name in slow.data_vars:
        a, b = fast[name].values, slow[name].values
        assert np.array_equal(np.isfinite(a), np.isfinite(b)), name
        ok = np.isfinite(b)
        np.testing.assert_allclose(a[ok], b[ok], rtol=1e-10, atol=1e-13, err_msg=name)
    assert float(slow.M_drift_fro.isel(step=-1).min()) > 1e-3     # the weights did move
