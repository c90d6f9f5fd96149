"""theory.deep_linear against hand-worked formulas and an independent ODE integration."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from scipy.integrate import solve_ivp
from traindyn.theory.deep_linear import (
    half_rise_time,
    initial_strength_through,
    mode_strength,
    s,
    saxe_dynamics,
    strength_equation,
    t,
    tau,
    two_layer_solution,
    u,
    u0,
)


def test_derived_equations_match_saxe_et_al():
    # τ u̇ = 2u(s − u) (Saxe et al. 2014, two layers); τ u̇ = D u^{2−2/D}(s − u) in general
    assert sp.simplify(strength_equation(2) - 2 * u * (s - u) / tau) == 0
    assert sp.simplify(strength_equation(3) - 3 * u ** sp.Rational(4, 3) * (s - u) / tau) == 0
    assert sp.simplify(strength_equation(1) - (s - u) / tau) == 0


def test_two_layer_solution_is_the_published_sigmoid():
    e = sp.exp(2 * s * t / tau)
    published = s * e / (e - 1 + s / u0)
    assert sp.simplify(two_layer_solution() - published) == 0
    tt = np.linspace(0, 12, 40)
    sv, a0 = 1.7, 2e-4
    ref = sv / (1 + (sv / a0 - 1) * np.exp(-2 * sv * tt))
    np.testing.assert_allclose(mode_strength(tt, sv, a0), ref, rtol=1e-12)
    # no overflow at long times
    assert np.isclose(mode_strength(1e4, sv, a0), sv)


def test_half_rise_time_two_layers_hand_formula():
    sv, a0, tc = np.array([3.0, 1.0, 0.25]), np.array([1e-3, 1e-4, 1e-3]), 2.0
    expected = tc / (2 * sv) * np.log(sv / a0 - 1)
    np.testing.assert_allclose(half_rise_time(sv, a0, 2, tc), expected, rtol=1e-10)
    np.testing.assert_allclose(mode_strength(expected, sv, a0, 2, tc), sv / 2, rtol=1e-10)
    assert np.isnan(half_rise_time(1.0, 0.6))  # already past s/2


def _layerwise(depth, sv, a0, times, tc=1.0):
    """Integrate the per-layer flow τ ȧ_l = Π_{k≠l} a_k (s − Π_k a_k) (not the reduced one)."""

    def rhs(_, a):
        prod = np.prod(a)
        return np.array([np.prod(np.delete(a, i)) * (sv - prod) for i in range(depth)]) / tc

    a_init = np.full(depth, a0 ** (1 / depth))
    sol = solve_ivp(rhs, (0, times[-1]), a_init, t_eval=times, rtol=1e-11, atol=1e-14,
                    method="LSODA")
    return np.prod(sol.y, axis=0)


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_deeper_modes_match_ode_integration(depth):
    sv, a0 = 2.0, 1e-3
    times = np.linspace(0, 3 * half_rise_time(sv, a0, depth), 60)
    ref = _layerwise(depth, sv, a0, times)
    np.testing.assert_allclose(mode_strength(times, sv, a0, depth), ref, rtol=1e-6, atol=1e-9)
    # the half-rise time hits s/2 on the reference trajectory too
    th = half_rise_time(sv, a0, depth)
    assert abs(_layerwise(depth, sv, a0, np.array([0.0, th]))[-1] / (sv / 2) - 1) < 1e-6


def test_jax_backend_equals_numpy():
    pytest.importorskip("jax")
    tt = np.linspace(0, 5, 11)
    a = np.asarray(mode_strength(tt, 2.0, 1e-3, backend="jax"))
    np.testing.assert_allclose(a, mode_strength(tt, 2.0, 1e-3), rtol=1e-6)


@pytest.mark.parametrize("depth", [2, 3])
def test_initial_strength_through_a_point_round_trips(depth):
    a0 = initial_strength_through(2.0, 0.3, 1.5, depth)
    np.testing.assert_allclose(mode_strength(2.0, 1.5, a0, depth), 0.3, rtol=1e-8)


def test_dataset_orders_half_rise_by_singular_value():
    ds = saxe_dynamics(np.linspace(0, 10, 21), [3.0, 2.0, 1.0], 1e-3, depth=3)
    assert ds.mode_strength.dims == ("mode", "time")
    assert np.all(np.diff(ds.half_rise_time.values) > 0)
    assert ds.attrs["source"].startswith("Saxe")


def test_bad_inputs():
    with pytest.raises(ValueError, match="u₀ < s"):
        mode_strength(1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="positive integer"):
        mode_strength(1.0, 1.0, 0.1, depth=0)
    with pytest.raises(ValueError, match="non-negative"):
        mode_strength(-1.0, 1.0, 0.1)
