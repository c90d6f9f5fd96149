"""dynamics.recipes.two_layer: the network's NTK against brute-force autograd, one gradient
step against the kernel formula, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from traindyn.dynamics import records
from traindyn.dynamics.recipes.two_layer import TwoLayerNet, train_two_layer, two_layer_task
from traindyn.probes.ntk import empirical_ntk


@pytest.mark.parametrize("activation", ["tanh", "relu", "poly"])
def test_rescaled_ntk_is_gamma2_n_times_empirical_ntk(activation):
    x, _, xt, _ = two_layer_task(7, 5, 4, "tanh", 1)
    net = TwoLayerNet(4, 50, 0.7, activation, epsilon=0.3, seed=2)
    with torch.no_grad():  # move away from the initialisation so a and W are generic
        net.weight += 0.3 * torch.randn_like(net.weight)
    X = torch.as_tensor(np.concatenate([x, xt]))
    brute = empirical_ntk(net, X, output="trace", method="jacobian").to(torch.float64)
    np.testing.assert_allclose(net.rescaled_ntk(X).numpy(), (0.7**2 * 50 * brute).numpy(),
                               rtol=1e-10, atol=1e-12)


def test_one_step_moves_f_by_the_kernel_times_the_error():
    """GD with per-parameter step γ₀²Nη changes f by (η/P) K Δ + O(η²)."""
    x, y, _, _ = two_layer_task(9, 1, 5, "he2", 0)
    eta = 1e-4
    ds = train_two_layer(x, y, 0.8, widths=(64,), seeds=(3,), learning_rate=eta, steps=1,
                         record_every=1)
    f0, f1 = ds.train_prediction.isel(width=0, seed=0).values
    K = ds.ntk.isel(width=0, seed=0, step=0).values
    predicted = eta / len(y) * K @ (y - f0)
    np.testing.assert_allclose(f1 - f0, predicted, rtol=2e-3, atol=1e-12)
    np.testing.assert_allclose(f0, 0.0, atol=1e-14)          # the initial function is removed
    assert ds.time.values[1] == pytest.approx(eta)            # time = η × step
    records.validate(ds)


def test_training_reduces_the_loss_and_records_every_width_and_seed():
    x, y, xt, yt = two_layer_task(10, 6, 4, "tanh", 0)
    ds = train_two_layer(x, y, 1.0, xt, yt, widths=(32, 64), seeds=(0, 1), steps=40,
                         record_every=20, learning_rate=0.1)
    assert ds.train_loss.dims == ("width", "seed", "step")
    assert (ds.train_loss.isel(step=-1) < ds.train_loss.isel(step=0)).all()
    assert np.isfinite(ds.test_loss).all() and ds.ntk.sizes["sample"] == 10


def test_bad_input():
    x, y, _, _ = two_layer_task(5, 1, 3, "tanh", 0)
    with pytest.raises(ValueError, match="gamma0"):
        train_two_layer(x, y, 0.0)
    with pytest.raises(ValueError, match="finite"):
        train_two_layer(np.full_like(x, np.nan), y, 1.0)
    with pytest.raises(ValueError, match="P >= 1"):
        train_two_layer(x[:0], y[:0], 1.0)
    with pytest.raises(ValueError, match="target"):
        two_layer_task(target="cubic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - GPU machines only
    x, y, _, _ = two_layer_task(8, 1, 4, "tanh", 0)
    cpu = train_two_layer(x, y, 1.0, widths=(64,), seeds=(0,), steps=20, device="cpu")
    gpu = train_two_layer(x, y, 1.0, widths=(64,), seeds=(0,), steps=20, device="cuda")
    np.testing.assert_allclose(gpu.train_loss, cpu.train_loss, rtol=1e-9)
