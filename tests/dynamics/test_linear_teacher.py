"""The linear student–teacher recipe: closed-form iterates equal the step-by-step loop."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.dynamics.recipes import simulate_linear_teacher


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_closed_form_iterates_equal_gradient_descent_step_by_step(alpha):
    """``method="eigen"`` (the default, used by the demo) against the plain loop
    ``w ← w + η(Xy − XXᵀw)`` run for every step, on the same draws: α < 1 has a null space
    (λ = 0 modes, where the gain is kη), α = 1 the smallest eigenvalues near 0."""
    steps = [0, 1, 2, 7, 50, 400]
    kw = dict(n_features=60, load_ratios=[alpha], steps=steps, learning_rate=0.1,
              noise_var=0.25, init_var=0.3, seeds=(0, 1, 2))
    eigen = simulate_linear_teacher(**kw)
    loop = simulate_linear_teacher(**kw, method="loop")
    for name in ("test_error", "train_error"):
        a, b = eigen[name].values, loop[name].values
        assert np.max(np.abs(a - b)) <= 1e-12 * np.abs(b).max(), name
    assert eigen.train_error.values[..., -1].max() < 0.5 * eigen.train_error.values[..., 0].min()


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        simulate_linear_teacher(n_features=10, steps=[0, 1], method="euler")
