r"""The lazy prediction for the grokking model of Kumar, Bordelon, Gershman & Pehlevan (2024).

Model (Kumar et al., ICLR 2024, Sec. 5; ``dynamics.recipes.grokking`` trains it)::

    f(x) = α (1/N) Σ_i φ(w_i·x) − f_init(x),   φ(z) = z + (ε/2) z²,   w_i(0) ~ N(0, σ_w² I_D),
    w_i ← w_i − η (N/α²) ∇_{w_i} L,   L = (1/(2P)) Σ_μ (f(x_μ) − y_μ)²,   y = (β·x)²/2.

In function space one step is ``Δf = −(η/P) K (f − y)`` with ``K = (N/α²) Θ``, ``Θ`` the
empirical NTK.  Its expectation over the initial weights follows from Isserlis' theorem for the
jointly Gaussian pre-activations ``h = w·x``, ``h' = w·x'`` (``E[hh'] = σ_w² x·x'``):

.. math::
    K_0(x, x') = \frac1N\sum_i \varphi'(h_i)\varphi'(h_i')\,x\cdot x'
      \;\xrightarrow{N\to\infty}\; (x\cdot x')\,\big(1 + \varepsilon^2\sigma_w^2\, x\cdot x'\big),

since ``φ'(h) = 1 + εh`` and ``E[(1+εh)(1+εh')] = 1 + ε² E[hh']``.  It does not depend on ``α``:
``α`` only sets how far the weights must move (``O(1/α)``), i.e. how long the kernel stays
fixed.  Training under ``K₀`` (:func:`traindyn.theory.kernel_flow`, ``c = P``) is the lazy
(``α → ∞``) limit of the network: the prediction every run starts on and large-``α`` runs follow.

The lazy predictor is a quadratic form, ``f_t(x) = m̃·x + xᵀM̃x`` with ``m̃ = Σ_μ a_μ x_μ`` and
``M̃ = ε²σ_w² Σ_μ a_μ x_μ x_μᵀ`` (``a`` the kernel coefficients), so its population test loss
against ``y = xᵀ(ββᵀ/2)x`` for ``x ~ N(0, I_D)`` is exact (Isserlis again, ``A = M̃ − ββᵀ/2``):

.. math::
    E_x[(f_t - y)^2] = \lVert\tilde m\rVert^2 + (\operatorname{tr} A)^2 + 2\lVert A\rVert_F^2 .

What this covers: the lazy regime only.  The rich dynamics that make a lazy start grok (the
rank-one growth of ``M − M₀`` along ``β``) are outside a fixed kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import finite_array, finite_scalar, float_array, positive_scalar
from traindyn.theory.kernel_flow import kernel_flow

__all__ = ["polynomial_network_kernel", "lazy_grokking"]

SOURCE = ("Kumar, Bordelon, Gershman & Pehlevan (2024), Grokking as the transition from lazy "
          "to rich training dynamics, ICLR, Sec. 5 (model); initial kernel by Isserlis' theorem; "
          "training under a fixed kernel: Lee et al. (2019), Eqs. 9-11")


def _inputs(x: Any, name: str) -> np.ndarray:
    arr = float_array(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dim); got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} is empty: shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def polynomial_network_kernel(x1: Any, x2: Any = None, epsilon: float = 0.02,
                              weight_var: float | None = None) -> np.ndarray:
    r"""Expected initial kernel ``K₀(x, x') = (x·x')(1 + ε²σ_w² x·x')`` of the grokking model.

    ``K₀ = (N/α²) E[Θ₀]``, the NTK in the units of the model's step (module docstring; Kumar et
    al. 2024, Sec. 5; the expectation by Isserlis' theorem).

    Parameters
    ----------
    x1, x2 : arrays (n, D), (m, D)
        Inputs; ``x2`` defaults to ``x1``.
    epsilon : float
        ``ε`` of ``φ(z) = z + (ε/2) z²``.
    weight_var : float, optional
        Variance ``σ_w²`` of each first-layer weight at initialisation (default ``1/D``, the
        recipe's ``w_i ~ N(0, I/D)``).

    Returns
    -------
    numpy.ndarray, shape (n, m)
    """
    a = _inputs(x1, "x1")
    b = a if x2 is None else _inputs(x2, "x2")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"x1 and x2 have different dims: {a.shape[1]} and {b.shape[1]}")
    eps = finite_scalar(epsilon, "epsilon")
    var = 1.0 / a.shape[1] if weight_var is None else positive_scalar(weight_var, "weight_var")
    dot = a @ b.T
    return dot * (1.0 + eps**2 * var * dot)


def _population_loss(coef: np.ndarray, x: np.ndarray, beta: np.ndarray, eps2var: float
                     ) -> np.ndarray:
    """``E_x[(m̃·x + xᵀM̃x − (β·x)²/2)²]`` for coefficient rows ``coef`` (steps, P)."""
    out = np.empty(coef.shape[0])
    half = 0.5 * np.outer(beta, beta)
    for i, a in enumerate(coef):
        m = x.T @ a
        big_a = eps2var * (x.T * a) @ x - half
        out[i] = m @ m + np.trace(big_a) ** 2 + 2.0 * np.sum(big_a * big_a)
    return out


def lazy_grokking(
    x_train: Any,
    y_train: Any,
    steps: Any,
    learning_rate: float,
    *,
    x_test: Any = None,
    y_test: Any = None,
    beta: Any = None,
    epsilon: float = 0.02,
    weight_var: float | None = None,
    dynamics: str = "gd",
) -> xr.Dataset:
    r"""The grokking model trained under its initial kernel: the lazy (``α → ∞``) prediction.

    Kumar et al. (2024), Sec. 5 model; ``K₀`` from :func:`polynomial_network_kernel`; training
    under the fixed kernel with ``c = P`` (the model's loss ``(1/2P)Σ(f − y)²``) by
    :func:`traindyn.theory.kernel_flow` (Lee et al. 2019, Eqs. 9–11), from ``f₀ = 0`` (the
    model subtracts its initial function).

    Parameters
    ----------
    x_train, y_train : arrays (P, D), (P,)
        Training inputs and targets.
    steps : array of int
        Steps of the prediction (a measured Dataset's ``step``); ``time = η × step``.
    learning_rate : float
        ``η`` of the recipe (the weight step is ``η N/α²`` times the gradient).
    x_test, y_test : arrays, optional
        Test points: ``test_loss`` (mean squared error on them).
    beta : array (D,), optional
        The teacher direction of ``y = (β·x)²/2`` (unit norm): ``test_loss_population``, the
        exact ``E_x[(f − y)²]`` over ``x ~ N(0, I_D)`` (module docstring).
    epsilon, weight_var : float
        ``ε`` and ``σ_w²`` (default ``1/D``).
    dynamics : {"gd", "flow"}

    Returns
    -------
    xarray.Dataset
        ``train_loss`` (mean squared error on the training set), ``test_loss``,
        ``test_loss_population`` over ``step`` with ``time``; the names of
        ``dynamics.recipes.train_grokking``, so ``xr.align`` needs no glue.
    """
    x = _inputs(x_train, "x_train")
    y = finite_array(y_train, "y_train").reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y_train has {y.shape[0]} values for {x.shape[0]} rows of x_train")
    var = 1.0 / x.shape[1] if weight_var is None else positive_scalar(weight_var, "weight_var")
    epsilon = finite_scalar(epsilon, "epsilon")
    k = polynomial_network_kernel(x, epsilon=epsilon, weight_var=var)
    test = {}
    if x_test is not None:
        xt = _inputs(x_test, "x_test")
        test = dict(kernel_test_train=polynomial_network_kernel(xt, x, epsilon, var),
                    targets_test=None if y_test is None else finite_array(y_test, "y_test"))
    flow = kernel_flow(k, y, steps, learning_rate, loss="mse", dynamics=dynamics,
                       normalization=float(x.shape[0]), **test)
    keep = [v for v in ("train_loss", "test_loss") if v in flow]
    ds = flow[keep]
    if beta is not None:
        b = finite_array(beta, "beta").reshape(-1)
        if b.shape[0] != x.shape[1]:
            raise ValueError(f"beta has {b.shape[0]} entries for inputs of dim {x.shape[1]}")
        # kernel coefficients a_t from the training predictions f_t(X) = K a_t (pseudo-inverse:
        # the feature-space weights m̃, M̃ are the same for every a with K a = f_t(X))
        f_train = flow["f_train"].values[..., 0]
        coef = np.linalg.lstsq(k, f_train.T, rcond=None)[0].T
        ds["test_loss_population"] = ("step", _population_loss(
            coef, x, b, float(epsilon) ** 2 * var), {
            "long_name": "population test loss E_x[(f − y)²], lazy prediction", "units": "1"})
    for name in keep:
        ds[name].attrs["long_name"] = ds[name].attrs.get("long_name", name) + ", lazy prediction"
    ds.attrs = theory_attrs(SOURCE, dict(epsilon=float(epsilon), weight_var=var,
                                         learning_rate=float(learning_rate),
                                         dynamics=dynamics, n_train=int(x.shape[0])),
                            regime="lazy: the initial kernel, fixed")
    return ds
