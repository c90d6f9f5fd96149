"""The JAX NTK path against the torch path (same weights) and against a hand-built Jacobian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from traindyn.probes.ntk import empirical_ntk  # noqa: E402
from traindyn.probes.ntk_jax import empirical_ntk_jax  # noqa: E402

from tests.helpers import assert_rel  # noqa: E402


def mlp(params, x):
    (W0, b0), (W1, b1), (W2, b2) = params
    h = jnp.tanh(x @ W0.T + b0)
    h = jax.nn.relu(h @ W1.T + b1)
    return h @ W2.T + b2


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):  # float64 for this module only (the flag is process-wide)
        yield


@pytest.fixture
def pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 3)).double()
    params = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy()))
              for m in model if isinstance(m, nn.Linear)]
    return model, params


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "auto"])
def test_jax_path_equals_torch_path_for_the_same_weights(pair, method):
    model, params = pair
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    ref = empirical_ntk(model, torch.from_numpy(x1), torch.from_numpy(x2), output="full",
                        method="jacobian").numpy()
    K = np.asarray(empirical_ntk_jax(mlp, params, x1, x2, output="full", method=method))
    assert_rel(K, ref, 1e-9, f"full/{method}")
    if method == "ntk_vp":
        tr = np.asarray(empirical_ntk_jax(mlp, params, x1, x2, method=method, chunk_size=3))
        assert_rel(tr, np.einsum("ijaa->ij", ref), 1e-9, f"trace chunked/{method}")
    if method == "jacobian":
        mean = np.asarray(empirical_ntk_jax(mlp, params, x1, x2, output="mean", method=method))
        assert_rel(mean, np.einsum("ijaa->ij", ref) / 3, 1e-9, "mean")


def test_jax_linear_model_kernel_is_input_gram():
    # f(W, x) = x Wᵀ: Θ(x, x')_{ab} = (x·x') δ_ab (a hand-worked Jacobian)
    rng = np.random.default_rng(1)
    W, x = jnp.asarray(rng.normal(size=(2, 3))), rng.normal(size=(4, 3))
    K = np.asarray(empirical_ntk_jax(lambda w, z: z @ w.T, W, x, output="full"))
    assert_rel(K, np.einsum("ij,ab->ijab", x @ x.T, np.eye(2)), 1e-12, "linear")


def test_jax_bad_method():
    with pytest.raises(ValueError, match="structured"):
        empirical_ntk_jax(mlp, [], np.zeros((1, 4)), method="structured")
