"""Training a linear network on a known-SVD task reproduces Saxe et al.'s sigmoidal stages."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.dynamics import records
from traindyn.dynamics.recipes.deep_linear import svd_task, train_deep_linear
from traindyn.theory.deep_linear import half_rise_time, initial_strength_through, mode_strength


def _crossing(time, values, level):
    """First time ``values`` crosses ``level``, linearly interpolated between records."""
    i = int(np.argmax(values >= level))
    slope = (values[i] - values[i - 1]) / (time[i] - time[i - 1])
    return time[i - 1] + (level - values[i - 1]) / slope


def test_task_has_the_requested_svd():
    x, y, u, v = svd_task([3.0, 1.0], 5, 4, seed=2)
    p = x.shape[0]
    np.testing.assert_allclose((x.T @ x / p).numpy(), np.eye(5), atol=1e-12)
    sigma_yx = (y.T @ x / p).numpy()
    np.testing.assert_allclose(np.linalg.svd(sigma_yx, compute_uv=False)[:2], [3.0, 1.0])
    np.testing.assert_allclose(u.numpy().T @ sigma_yx @ v.numpy(), np.diag([3.0, 1.0]), atol=1e-12)


@pytest.mark.parametrize("depth,init_scale,steps,tol", [(2, 1e-3, 3600, 0.01),
                                                        (3, 0.02, 8000, 0.03)])
def test_mode_strengths_follow_theory_after_alignment(depth, init_scale, steps, tol):
    ds = train_deep_linear(depth=depth, init_scale=init_scale, steps=steps, record_every=20)
    records.validate(ds)
    t = ds.time.values
    measured_half, predicted_half = [], []
    for m, sv in enumerate(ds.singular_value.values):
        um = ds.mode_strength.values[:, m]
        # alignment phase over once the mode reaches s/10: fix u₀ there, predict the rest
        i = int(np.argmax(um >= 0.1 * sv))
        a0 = initial_strength_through(t[i], um[i], sv, depth)
        after = t >= t[i]
        err = np.abs(um[after] - mode_strength(t[after], sv, a0, depth)).max() / sv
        assert err < tol, f"mode {m} (s = {sv}): max deviation {err:.3f} s"
        measured_half.append(_crossing(t, um, sv / 2))
        predicted_half.append(float(half_rise_time(sv, a0, depth)))
    # stages ordered by singular value, at the predicted times
    assert np.all(np.diff(measured_half) > 0)
    np.testing.assert_allclose(measured_half, predicted_half, rtol=tol)
    # the network learns the whole map
    np.testing.assert_allclose(ds.mode_strength.values[-1], ds.singular_value.values, rtol=0.02)
