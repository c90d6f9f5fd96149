r"""Learning dynamics of deep linear networks, one input–output mode at a time.

Saxe, McClelland & Ganguli, "Exact solutions to the nonlinear dynamics of learning in deep
linear neural networks" (ICLR 2014), Sec. 1–3.

Setup.  A linear network ``W_D ⋯ W_2 W_1`` (``depth = D`` weight matrices, ``D = 2``: one hidden
layer) is trained by gradient flow on ``½ E‖y − W_D⋯W_1 x‖²`` with whitened inputs
(``Σ^{xx} = I``) and input–output correlation ``Σ^{yx} = U S Vᵀ``.  From small random weights the
network first aligns its layers with the modes ``(u_α, v_α)`` (the "alignment phase"); after
that, mode ``α`` of the composite map, ``u_α = u_αᵀ W_D⋯W_1 v_α``, evolves on its own.  Each layer
carries a strength ``a_l`` on that mode; the per-mode loss is ``½(s − Π_l a_l)²`` (Saxe et al.
2014, the per-mode reduction of Sec. 1), and from balanced initialisation (all ``a_l`` equal)
the mode strength obeys

.. math:: \tau\,\dot u = D\,u^{2-2/D}\,(s - u),

with ``τ = 1`` when time is ``learning rate × step`` (traindyn's ``time``).  For ``D = 2`` this is
``τ u̇ = 2u(s − u)``, solved by the sigmoid

.. math:: u(t) = \frac{s\,e^{2st/\tau}}{e^{2st/\tau} - 1 + s/u_0}, \qquad
          t_{1/2} = \frac{\tau}{2s}\ln\Big(\frac{s}{u_0} - 1\Big)

(Saxe et al. 2014, the two-layer solution and its timescale, Sec. 1; equation numbers differ
between the arXiv versions, so the formulas are quoted in full here).  For ``D ≥ 3`` the time to
reach a strength is an explicit integral (Saxe et al. 2014, Sec. 3), inverted numerically here.

Every formula is derived in code with sympy (:func:`strength_equation`, :func:`time_to_strength`,
:func:`two_layer_solution`) and lambdified; nothing is typed in by hand.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from traindyn.theory._dataset import theory_attrs, time_axis
from traindyn.theory._validate import (
    count,
    finite_array,
    finite_scalar,
    float_array,
    nonnegative_scalar,
    positive_scalar,
)

if TYPE_CHECKING:
    import sympy as sp

__all__ = [
    "half_rise_time",
    "initial_strength_through",
    "mode_strength",
    "saxe_dynamics",
    "strength_equation",
    "time_to_strength",
    "two_layer_solution",
]

SOURCE = ("Saxe, McClelland & Ganguli (2014), Exact solutions to the nonlinear dynamics of "
          "learning in deep linear neural networks, ICLR (arXiv:1312.6120): two-layer mode "
          "solution and its reduction for deeper networks")

_SYMBOL_NAMES = ("u", "u0", "s", "tau", "t", "x", "x0")


@cache
def _symbols() -> tuple:
    """sympy, imported on first use (``import theory`` does not load it), and the symbols
    ``u, u₀, s, τ, t, x, x₀`` of this module (all positive)."""
    import sympy

    return (sympy, *sympy.symbols("u u_0 s tau t x x_0", positive=True))


def __getattr__(name: str) -> Any:
    """The module's sympy symbols (``from theory.deep_linear import s, t, u``), made lazily."""
    if name in _SYMBOL_NAMES:
        return _symbols()[1 + _SYMBOL_NAMES.index(name)]
    raise AttributeError(f"module 'traindyn.theory.deep_linear' has no attribute {name!r}")


def _check_depth(depth: int) -> int:
    try:
        return count(depth, "depth", minimum=1)
    except ValueError:
        raise ValueError(f"depth (number of weight matrices) must be a positive integer; "
                         f"got {depth}") from None


def _check_backend(backend: Any) -> str:
    if backend not in ("numpy", "jax"):
        raise ValueError(f"backend must be 'numpy' or 'jax'; got {backend!r}")
    return backend


def _strengths(singular_value: Any, initial_strength: Any, names: tuple[str, str]) -> tuple:
    """Broadcast ``s`` and ``u₀`` (finite, ``s > 0``, ``u₀ > 0``); errors name the argument."""
    sv, uv = (finite_array(v, name) for v, name in zip((singular_value, initial_strength), names,
                                                       strict=True))
    try:
        sv, uv = np.broadcast_arrays(sv, uv)
    except ValueError:
        raise ValueError(f"{names[0]} and {names[1]} do not broadcast: shapes {sv.shape} and "
                         f"{uv.shape}") from None
    if np.any(sv <= 0):
        raise ValueError(f"{names[0]} (singular values s) must be positive")
    if np.any(uv <= 0):
        raise ValueError(f"{names[1]} (initial strengths u₀) must be positive (small "
                         "initialisation)")
    return sv, uv


def strength_equation(depth: int = 2) -> sp.Expr:
    r"""``du/dt`` of the mode strength ``u = Π_l a_l`` from balanced initialisation (sympy).

    Derived, not typed: gradient flow ``τ ȧ_l = −∂L/∂a_l`` on the per-mode loss
    ``L = ½(s − Π_l a_l)²`` (Saxe et al. 2014, Sec. 1), restricted to the balanced manifold
    ``a_l = a`` (which the flow preserves), then ``u = a^D`` by the chain rule.
    """
    return _strength_equation(_check_depth(depth))


@cache
def _strength_equation(depth: int) -> sp.Expr:
    sp, u, u0, s, tau, t, x, x0 = _symbols()
    layers = sp.symbols(f"a1:{depth + 1}", positive=True)
    a = sp.Symbol("a", positive=True)
    loss = (s - sp.Mul(*layers)) ** 2 / 2
    da = (-sp.diff(loss, layers[0]) / tau).subs({al: a for al in layers})
    du = depth * a ** (depth - 1) * da
    return sp.simplify(du.subs(a, u ** sp.Rational(1, depth)))


def _real_logs(expr: sp.Expr) -> sp.Expr:
    """Replace ``log(g)`` by ``log(−g)`` where ``g < 0`` on ``0 < x < 1``: the same derivative,
    real values on the interval where ``u < s``."""
    sp, u, u0, s, tau, t, x, x0 = _symbols()

    def negative(arg: sp.Expr) -> bool:
        return bool(arg.subs({x: sp.Rational(1, 2), s: 1, tau: 1}).is_negative)

    return expr.replace(lambda e: isinstance(e, sp.log) and negative(e.args[0]),
                        lambda e: sp.log(-e.args[0]))


def time_to_strength(depth: int = 2) -> sp.Expr:
    r"""Antiderivative ``T(x)`` with ``t = T(x) − T(x₀)``, ``x = (u/s)^{1/D}`` (sympy).

    Separation of variables in :func:`strength_equation` with the substitution ``u = s x^D``:

    .. math:: t = \int_{u_0}^{u}\frac{du'}{\dot u'} = \tau\,s^{2/D-2}\int_{x_0}^{x}
              \frac{dx'}{x'^{D-1}(1-x'^D)}

    (Saxe et al. 2014, Sec. 3, written for general depth).  Logarithms are taken of positive
    arguments on ``0 < x < 1``; the result is checked by differentiation.
    """
    return _time_to_strength(_check_depth(depth))


@cache
def _time_to_strength(depth: int) -> sp.Expr:
    sp, u, u0, s, tau, t, x, x0 = _symbols()
    rhs = _strength_equation(depth)
    integrand = sp.powsimp(sp.simplify((1 / rhs).subs(u, s * x**depth)
                                       * sp.diff(s * x**depth, x)), force=True)
    # integrate the rational function of x alone: sympy drops terms when the s-dependent
    # constant stays inside the integrand
    constant, rational = integrand.as_independent(x, as_Add=False)
    antiderivative = constant * _real_logs(sp.integrate(sp.apart(rational, x), x))
    residual = sp.diff(antiderivative, x) - integrand
    for point in ((0.1, 2.0, 1.5), (0.5, 0.7, 1.0), (0.93, 3.0, 0.2)):
        value = complex(residual.subs({x: point[0], s: point[1], tau: point[2]}).evalf())
        if abs(value) > 1e-9 * (1 + abs(complex(integrand.subs(
                {x: point[0], s: point[1], tau: point[2]}).evalf()))):  # pragma: no cover
            raise RuntimeError(f"sympy's antiderivative for depth {depth} failed its check")
    return antiderivative


@cache
def two_layer_solution() -> sp.Expr:
    r"""Closed-form ``u(t)`` for ``D = 2`` (sympy), solved from ``t = T(x) − T(x₀)``.

    Returns ``s u₀ e^{2st/τ} / (s − u₀ + u₀ e^{2st/τ})``, Saxe et al. (2014), Sec. 1.
    """
    sp, u, u0, s, tau, t, x, x0 = _symbols()
    antiderivative = time_to_strength(2)
    elapsed = (antiderivative - antiderivative.subs(x, x0)).subs(
        {x: sp.sqrt(u / s), x0: sp.sqrt(u0 / s)})
    (solution,) = sp.solve(sp.Eq(t, elapsed), u)
    return sp.simplify(solution)


@cache
def _closed_form(depth: int, backend: str) -> Any:
    sp, u, u0, s, tau, t, x, x0 = _symbols()
    sol = two_layer_solution() if depth == 2 else _one_layer_solution()
    # s / u expanded: a sum of decaying exponentials, stable for large t
    return sp.lambdify((t, s, u0, tau), s / sp.expand(s / sol), modules=backend)


@cache
def _time_fn(depth: int) -> Any:
    sp, u, u0, s, tau, t, x, x0 = _symbols()
    return sp.lambdify((x, s, tau), time_to_strength(depth), modules="numpy")


@cache
def _one_layer_solution() -> sp.Expr:
    sp, u, u0, s, tau, t, x, x0 = _symbols()
    antiderivative = time_to_strength(1)
    elapsed = (antiderivative - antiderivative.subs(x, x0)).subs({x: u / s, x0: u0 / s})
    (solution,) = sp.solve(sp.Eq(t, elapsed), u)
    return sp.simplify(solution)


def _time_of(xv: np.ndarray, x0v: np.ndarray, sv: np.ndarray, depth: int, tau_v: float):
    f = _time_fn(depth)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return f(xv, sv, tau_v) - f(x0v, sv, tau_v)


def _invert(tv: np.ndarray, sv: np.ndarray, x0v: np.ndarray, depth: int, tau_v: float):
    """Solve ``T(x) − T(x₀) = t`` for ``x ∈ [x₀, 1)`` by bisection on ``logit x`` (T is
    increasing in x, and → ∞ as x → 1)."""
    lo = np.log(x0v / (1 - x0v)) * np.ones_like(tv)
    hi = np.full_like(tv, 40.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        xm = 1 / (1 + np.exp(-mid))
        below = _time_of(xm, x0v, sv, depth, tau_v) < tv
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 1 / (1 + np.exp(-0.5 * (lo + hi)))


def mode_strength(
    time: Any, singular_value: Any, initial_strength: Any, depth: int = 2, tau: float = 1.0,
    backend: str = "numpy",
) -> Any:
    r"""Mode strength ``u(t)`` from balanced initialisation ``u(0) = u₀`` (broadcasting).

    ``D ≤ 2``: the lambdified closed form (:func:`two_layer_solution`; ``backend="jax"`` gives a
    jax-traceable result).  ``D ≥ 3``: numerical inversion of :func:`time_to_strength` (numpy
    only).  Requires ``0 < u₀ < s``.
    """
    depth = _check_depth(depth)
    backend = _check_backend(backend)
    tau = positive_scalar(tau, "tau")
    tv = float_array(time, "time")
    if np.any(np.isnan(tv)) or np.any(tv < 0):
        raise ValueError("time must be non-negative (no NaN)")
    sv, uv = _strengths(singular_value, initial_strength, ("singular_value", "initial_strength"))
    try:
        tv, sv, uv = np.broadcast_arrays(tv, sv, uv)
    except ValueError:
        raise ValueError(f"time, singular_value and initial_strength do not broadcast: shapes "
                         f"{tv.shape}, {sv.shape}, {uv.shape}") from None
    if np.any(uv >= sv):
        raise ValueError("need singular values s > 0 and initial strengths 0 < u₀ < s "
                         "(small initialisation): initial_strength ≥ singular_value")
    if depth <= 2:
        return _closed_form(depth, backend)(tv, sv, uv, tau)
    if backend != "numpy":
        raise ValueError("depth ≥ 3 is solved numerically: backend must be 'numpy'")
    x0v = (uv / sv) ** (1 / depth)
    return sv * _invert(tv, sv, x0v, depth, tau) ** depth


def half_rise_time(singular_value: Any, initial_strength: Any, depth: int = 2,
                   tau: float = 1.0) -> np.ndarray:
    r"""Time at which ``u`` reaches ``s/2``: ``T(2^{-1/D}) − T(x₀)``; for ``D = 2``,
    ``(τ/2s) ln(s/u₀ − 1)`` (Saxe et al. 2014).  NaN where ``u₀ ≥ s/2`` (the mode starts past
    half strength), with a warning."""
    depth = _check_depth(depth)
    tau = positive_scalar(tau, "tau")
    sv, uv = _strengths(singular_value, initial_strength, ("singular_value", "initial_strength"))
    x0v = (uv / sv) ** (1 / depth)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = _time_of(np.full_like(sv, 0.5 ** (1 / depth)), x0v, sv, depth, tau)
    past = ~(uv < sv / 2)
    if np.any(past):
        warnings.warn(f"half_rise_time: initial_strength ≥ singular_value/2 for {past.sum()} "
                      "mode(s), which start past half strength: NaN there", RuntimeWarning,
                      stacklevel=2)
    return np.where(past, np.nan, out)


def initial_strength_through(time: float, strength: float, singular_value: float,
                             depth: int = 2, tau: float = 1.0) -> float:
    """The ``u₀`` whose trajectory passes through ``(time, strength)``.

    Solves ``T(x₀) = T(x) − t`` (one bisection): a network started from small *random* weights
    leaves its alignment phase with an effective initial strength that is not its literal
    ``u(0)``; matching one point after alignment fixes it, and the rest of the curve is then a
    prediction.
    """
    depth = _check_depth(depth)
    tau = positive_scalar(tau, "tau")
    time = nonnegative_scalar(time, "time")
    singular_value = positive_scalar(singular_value, "singular_value")
    strength = finite_scalar(strength, "strength")
    if not 0 < strength < singular_value:
        raise ValueError("need 0 < strength < singular value (strength, singular_value)")
    xs = (strength / singular_value) ** (1 / depth)
    target = _time_of(np.array(xs), np.array(0.5), np.array(singular_value), depth, tau) - time
    lo, hi = -60.0, float(np.log(xs / (1 - xs)))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        xm = 1 / (1 + np.exp(-mid))
        if _time_of(np.array(xm), np.array(0.5), np.array(singular_value), depth, tau) < target:
            lo = mid
        else:
            hi = mid
    return float(singular_value * (1 / (1 + np.exp(-0.5 * (lo + hi)))) ** depth)


def saxe_dynamics(
    time: Any, singular_values: Any, initial_strength: Any, depth: int = 2, tau: float = 1.0,
) -> xr.Dataset:
    r"""Predicted mode strengths over time for every input–output mode.

    Parameters
    ----------
    time : array-like or xarray.DataArray
        ``t = learning rate × step``; a DataArray (``measured.time``) keeps the measured dims.
    singular_values : array-like, shape (modes,)
        ``s_α`` of ``Σ^{yx}`` (inputs whitened).
    initial_strength : float or array-like, shape (modes,)
        ``u_α(0)`` (small), or an effective value from :func:`initial_strength_through`.
    depth : int
        Number of weight matrices ``D``.
    tau : float
        Time constant (1 when time = learning rate × step).

    Returns
    -------
    xarray.Dataset
        ``mode_strength`` over ``(mode, *time dims)``, ``half_rise_time`` over ``mode``, and the
        coordinate ``singular_value`` on ``mode``.
    """
    tv, tdims, tcoords = time_axis(time)
    sv = np.atleast_1d(finite_array(singular_values, "singular_values"))
    if sv.ndim != 1:
        raise ValueError(f"singular_values must be 1-D (one per mode); got shape {sv.shape}")
    try:
        uv = np.broadcast_to(finite_array(initial_strength, "initial_strength"), sv.shape)
    except ValueError:
        raise ValueError(f"initial_strength must be a scalar or one value per mode "
                         f"({sv.size}); got shape {np.shape(initial_strength)}") from None
    if np.any(sv <= 0):
        raise ValueError("singular_values must be positive")
    strengths = mode_strength(tv[None, :], sv[:, None], uv[:, None], depth, tau)
    shape = (len(sv), *np.shape(np.asarray(time)))
    ds = xr.Dataset(
        {
            "mode_strength": (("mode", *tdims), np.asarray(strengths).reshape(shape), {
                "long_name": "strength u_α = u_αᵀ W_D⋯W_1 v_α of input–output mode α",
                "units": "1"}),
            "half_rise_time": ("mode", half_rise_time(sv, uv, depth, tau), {
                "long_name": "time at which u_α reaches s_α / 2", "units": "1"}),
        },
        coords={**tcoords, "mode": ("mode", np.arange(len(sv))),
                "singular_value": ("mode", sv, {"long_name": "singular value s_α of Σ^yx",
                                                "units": "1"})},
        attrs=theory_attrs(SOURCE, dict(depth=depth, tau=tau,
                                        initial_strength=np.asarray(uv))),
    )
    ds["time"].attrs.update(long_name="training time, learning rate × step", units="1")
    return ds
