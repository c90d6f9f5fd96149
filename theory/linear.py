r"""High-dimensional dynamics of a linear student learning a linear teacher.

Advani & Saxe, "High-dimensional dynamics of generalization error in neural networks"
(arXiv:1710.03667, 2017; Neural Networks 2020), Sec. 2–3.

Setup.  ``N`` input dimensions, ``P = αN`` training samples ``x_μ ∈ R^N`` with i.i.d.
``N(0, 1/N)`` entries (columns of ``X ∈ R^{N×P}``), a teacher ``y_μ = w̄·x_μ + ε_μ`` with
``w̄_i ~ N(0, σ_w̄²)`` and ``ε_μ ~ N(0, σ_ε²)``, a student ``ŷ = w·x`` started at
``w_i(0) ~ N(0, σ_w0²)`` and trained by gradient flow on ``½ Σ_μ (y_μ − w·x_μ)²``:

.. math:: \dot w = X y - X X^\top w .

In the eigenbasis of ``XXᵀ`` each mode relaxes independently with rate ``λ``; as ``N → ∞``
the eigenvalues follow the Marchenko–Pastur law with edges ``λ± = (1 ± √α)²`` and an atom of
mass ``(1−α)₊`` at zero (the frozen subspace).  Errors are plain mean squared errors (no ½).

Discrete gradient descent with learning rate ``η`` is the same with ``e^{−λt}`` replaced by
``(1 − ηλ)^{t/η}``; ``time = η × step`` in both cases, which is traindyn's ``time`` coordinate.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory import _backend
from traindyn.theory._dataset import theory_attrs, time_axis
from traindyn.theory._validate import (
    count,
    float_array,
    nonnegative_scalar,
    positive_scalar,
    real_scalar,
)

__all__ = [
    "advani_saxe",
    "advani_saxe_asymptote",
    "marchenko_pastur_density",
    "marchenko_pastur_quadrature",
]

SOURCE = (
    "Advani & Saxe (2017), High-dimensional dynamics of generalization error in neural "
    "networks, arXiv:1710.03667, Eqs. 9-14"
)


def _load_ratios(load_ratio: Any) -> np.ndarray:
    ratios = np.atleast_1d(float_array(load_ratio, "load_ratio"))
    if ratios.ndim != 1 or ratios.size == 0:
        raise ValueError(f"load_ratio must be a scalar or a non-empty 1-D array; got shape "
                         f"{ratios.shape}")
    if not np.all(np.isfinite(ratios)) or np.any(ratios <= 0):
        raise ValueError("load_ratio (the load ratio α = P/N) must be positive and finite")
    return ratios


def marchenko_pastur_density(lam: np.ndarray, load_ratio: float) -> np.ndarray:
    r"""Continuous part of the Marchenko–Pastur density of the eigenvalues of ``XXᵀ``.

    .. math:: \rho(\lambda) = \frac{\sqrt{(\lambda_+-\lambda)(\lambda-\lambda_-)}}{2\pi\lambda},
              \qquad \lambda_\pm = (1\pm\sqrt\alpha)^2

    for ``X`` of shape ``N × αN`` with ``N(0, 1/N)`` entries (Advani & Saxe 2017, Eq. 9).
    It integrates to ``min(1, α)``; the remaining mass ``(1−α)₊`` sits at ``λ = 0``.
    NaN entries of ``lam`` give NaN, with a warning.
    """
    load_ratio = positive_scalar(load_ratio, "load_ratio")
    lam = float_array(lam, "lam")
    if np.any(np.isnan(lam)):
        warnings.warn("lam has NaN entries: the density is NaN there", RuntimeWarning,
                      stacklevel=2)
    lo, hi = (1 - np.sqrt(load_ratio)) ** 2, (1 + np.sqrt(load_ratio)) ** 2
    inside = (lam > lo) & (lam < hi)
    out = np.where(np.isnan(lam), np.nan, 0.0)
    out[inside] = np.sqrt((hi - lam[inside]) * (lam[inside] - lo)) / (2 * np.pi * lam[inside])
    return out


def marchenko_pastur_quadrature(
    load_ratio: float, n_nodes: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    r"""Nodes and weights for ``∫ρ(λ) f(λ) dλ`` over the continuous Marchenko–Pastur part.

    Substituting ``λ = (1+α) + 2√α cos θ`` turns the square-root edges into a smooth
    integrand, ``ρ(λ)dλ = (2√α)² sin²θ / (2πλ) dθ``, integrated by Gauss–Legendre on
    ``θ ∈ [0, π]``.  The weights sum to ``min(1, α)``.
    """
    load_ratio = real_scalar(load_ratio, "load_ratio")
    if not np.isfinite(load_ratio) or load_ratio <= 0:
        raise ValueError(f"load_ratio (the load ratio α = P/N) must be positive and finite; "
                         f"got {load_ratio}")
    n_nodes = count(n_nodes, "n_nodes", minimum=1)
    x, w = np.polynomial.legendre.leggauss(n_nodes)
    theta = 0.5 * np.pi * (x + 1.0)
    w = 0.5 * np.pi * w
    centre, radius = 1.0 + load_ratio, 2.0 * np.sqrt(load_ratio)
    lam = centre + radius * np.cos(theta)
    weights = w * radius**2 * np.sin(theta) ** 2 / (2 * np.pi * lam)
    return lam, weights


def _decay(lam: np.ndarray, t: np.ndarray, learning_rate: float | None) -> np.ndarray:
    """``e^{-λt}`` (gradient flow) or ``(1-ηλ)^{t/η}`` (gradient descent); shape (t, λ)."""
    if learning_rate is None:
        return np.exp(-np.outer(t, lam))
    steps = np.rint(t / learning_rate).astype(np.int64)
    return np.power.outer(1.0 - learning_rate * lam, steps).T


def _errors_one(
    load_ratio: float, t: np.ndarray, noise_var: float, teacher_var: float, init_var: float,
    learning_rate: float | None, n_nodes: int,
) -> tuple[np.ndarray, np.ndarray]:
    lam, w = marchenko_pastur_quadrature(load_ratio, n_nodes)
    d = _decay(lam, t, learning_rate)
    s0 = init_var + teacher_var  # per-component variance of the initial error w(0) - w̄
    frozen = max(1.0 - load_ratio, 0.0)
    # test error E_g(t) = σ_ε² + (1-α)₊ s0 + ∫ρ [s0 d² + (σ_ε²/λ)(1-d)²]
    test = noise_var + frozen * s0 + (d**2 * s0 + noise_var / lam * (1 - d) ** 2) @ w
    # train error E_t(t) = (1/α) ∫ρ d² (σ_ε² + λ s0) + (1 - 1/α)₊ σ_ε²
    train = (d**2 * (noise_var + lam * s0)) @ w / load_ratio
    train = train + max(1.0 - 1.0 / load_ratio, 0.0) * noise_var
    return test, train


def advani_saxe(
    time: Any,
    load_ratio: float | np.ndarray,
    noise_var: float = 0.25,
    teacher_var: float = 1.0,
    init_var: float = 0.0,
    learning_rate: float | None = None,
    n_nodes: int = 400,
    backend: str | None = None,
    device: Any = None,
) -> xr.Dataset:
    r"""Test and training error of the linear student–teacher over training time.

    .. math::
        E_g(t) = \sigma_\varepsilon^2 + (1-\alpha)_+ (\sigma_{w0}^2+\bar\sigma^2)
          + \int\!\rho(\lambda)\Big[(\sigma_{w0}^2+\bar\sigma^2)e^{-2\lambda t}
          + \frac{\sigma_\varepsilon^2}{\lambda}\big(1-e^{-\lambda t}\big)^2\Big]d\lambda

        E_t(t) = \frac{1}{\alpha}\int\!\rho(\lambda)\,e^{-2\lambda t}
          \big[\sigma_\varepsilon^2 + \lambda(\sigma_{w0}^2+\bar\sigma^2)\big]d\lambda
          + \big(1-\tfrac{1}{\alpha}\big)_+\sigma_\varepsilon^2

    Advani & Saxe (2017), Eqs. 9–14, in the large-``N`` limit (``ρ``: Marchenko–Pastur).

    Parameters
    ----------
    time : float, array-like or xarray.DataArray
        Training times ``t = η × step``.  A DataArray (e.g. ``measured.time``, along ``step``)
        puts the prediction on the measured coordinates.  A scalar gives a scalar prediction:
        no ``time`` dimension, ``time`` a 0-d coordinate (as ``ds.sel(time=t)`` would).
    load_ratio : float or array
        ``α = P/N``.  An array adds a ``load_ratio`` dimension.
    noise_var, teacher_var, init_var : float
        ``σ_ε²``, ``σ_w̄²`` (so SNR = teacher_var / noise_var) and ``σ_w0²``.
    learning_rate : float, optional
        If given, the exact expectation for discrete gradient descent with this step size.
    n_nodes : int
        Quadrature nodes over the spectrum.
    backend, device
        ``backend="jax"`` (or a ``device``: ``"cpu"``, ``"gpu"``, a ``jax.Device``) evaluates
        the quadrature for every load ratio and time in one float64 call on that jax device
        (:mod:`theory._backend`); default numpy on the host.

    Returns
    -------
    xarray.Dataset
        ``test_error`` and ``train_error`` (mean squared errors) over ``time`` (or the dims of
        the ``time`` DataArray; none for a scalar time) and ``load_ratio`` (none for a scalar
        load ratio).
    """
    dev = _backend.resolve(backend, device)
    t, tdims, tcoords = time_axis(time)
    ratios = _load_ratios(load_ratio)
    if np.any(np.isnan(t)) or np.any(t < 0):
        raise ValueError("time must be non-negative (no NaN)")
    noise_var, teacher_var, init_var = (nonnegative_scalar(v, name) for v, name in (
        (noise_var, "noise_var"), (teacher_var, "teacher_var"), (init_var, "init_var")))
    n_nodes = count(n_nodes, "n_nodes", minimum=1)
    if learning_rate is not None:
        learning_rate = positive_scalar(learning_rate, "learning_rate")
        if not np.all(np.isfinite(t)):
            raise ValueError("time must be finite for gradient descent (learning_rate given)")
        unstable = learning_rate * (1 + np.sqrt(ratios.max())) ** 2
        if unstable >= 2:
            raise ValueError(
                f"gradient descent with learning rate {learning_rate} diverges at α = "
                f"{ratios.max()} (needs η λ₊ < 2, λ₊ = (1+√α)²)"
            )
    if dev is not None:
        nodes = [marchenko_pastur_quadrature(a, n_nodes) for a in ratios]
        test, train = _backend.advani_saxe(
            np.stack([q[0] for q in nodes]), np.stack([q[1] for q in nodes]), ratios, t,
            noise_var, init_var + teacher_var, learning_rate, dev)
    else:
        results = [
            _errors_one(a, t, noise_var, teacher_var, init_var, learning_rate, n_nodes)
            for a in ratios
        ]
        test = np.stack([r[0] for r in results])
        train = np.stack([r[1] for r in results])
    dims = ("load_ratio", *tdims)
    coords = {**tcoords, "load_ratio": ("load_ratio", ratios)}
    shape = (len(ratios), *np.shape(t))
    ds = xr.Dataset(
        {
            "test_error": (dims, test.reshape(shape),
                           {"long_name": "test (generalisation) mean squared error", "units": "1"}),
            "train_error": (dims, train.reshape(shape),
                            {"long_name": "training mean squared error", "units": "1"}),
        },
        coords=coords,
        attrs=theory_attrs(
            SOURCE,
            dict(noise_var=noise_var, teacher_var=teacher_var, init_var=init_var,
                 learning_rate=learning_rate, n_nodes=n_nodes),
            dynamics="gradient flow" if learning_rate is None else "gradient descent",
        ),
    )
    ds["time"].attrs.update(long_name="training time, learning rate × step", units="1")
    ds["load_ratio"].attrs.update(long_name="load ratio α = P/N", units="1")
    if np.ndim(load_ratio) == 0:
        ds = ds.squeeze("load_ratio")
    if not isinstance(time, xr.DataArray) and np.ndim(time) == 0:
        ds = ds.isel(time=0)  # a scalar time: a 0-d ``time`` coordinate, no dimension
    return ds


def advani_saxe_asymptote(
    load_ratio: float | np.ndarray, noise_var: float = 0.25, teacher_var: float = 1.0,
    init_var: float = 0.0,
) -> xr.Dataset:
    r"""Long-time (``t → ∞``) test and training error of :func:`advani_saxe`.

    .. math::
        E_g(\infty) = \begin{cases} \sigma_\varepsilon^2\,\alpha/(\alpha-1), & \alpha > 1\\
        (1-\alpha)(\sigma_{w0}^2+\bar\sigma^2) + \sigma_\varepsilon^2/(1-\alpha), & \alpha < 1
        \end{cases},\qquad E_t(\infty) = \sigma_\varepsilon^2\,(1-1/\alpha)_+

    (Advani & Saxe 2017, Sec. 3); ``E_g`` diverges at ``α = 1``.
    """
    a = _load_ratios(load_ratio)
    noise_var, teacher_var, init_var = (nonnegative_scalar(v, name) for v, name in (
        (noise_var, "noise_var"), (teacher_var, "teacher_var"), (init_var, "init_var")))
    s0 = init_var + teacher_var
    with np.errstate(divide="ignore"):
        test = np.where(a > 1, noise_var * a / (a - 1), (1 - a) * s0 + noise_var / (1 - a))
    test = np.where(a == 1, np.inf, test)
    train = noise_var * np.clip(1 - 1 / a, 0, None)
    ds = xr.Dataset(
        {
            "test_error": ("load_ratio", test,
                           {"long_name": "test mean squared error at t → ∞", "units": "1"}),
            "train_error": ("load_ratio", train,
                            {"long_name": "training mean squared error at t → ∞", "units": "1"}),
        },
        coords={"load_ratio": a},
        attrs=theory_attrs(SOURCE, dict(noise_var=noise_var, teacher_var=teacher_var,
                                        init_var=init_var)),
    )
    if np.ndim(load_ratio) == 0:
        ds = ds.squeeze("load_ratio")
    return ds
