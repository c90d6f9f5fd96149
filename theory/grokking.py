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

What :func:`lazy_grokking` covers: the lazy regime only.  The rich dynamics that make a lazy
start grok (the rank-one growth of ``M − M₀`` along ``β``) are outside a fixed kernel.

**The rich dynamics: closed equations for the sufficient statistics.**  With the readouts fixed
the network is ``f(x) = α(m − m₀)·x + (αε/2) xᵀ(M − M₀)x`` with ``m = (1/N)Σ_i w_i`` and
``M = (1/N)Σ_i w_i w_iᵀ`` (Kumar et al. 2024, Sec. 5: the sufficient statistics of the test
loss).  Their gradient-descent dynamics closes on them.  With the residuals ``r_μ = f(x_μ) −
y_μ``, ``g = (1/P)Σ_μ r_μ x_μ`` and ``G = (1/P)Σ_μ r_μ x_μ x_μᵀ``, the gradient of ``L`` with
respect to ``w_i`` is ``(α/N)(g + εG w_i)`` (``φ'(h) = 1 + εh``), so one step of size
``η N/α²`` moves every neuron by the same affine map, ``w_i ← B w_i − c`` with
``B = I − (ηε/α) G``, ``c = (η/α) g``, and

.. math::
    m \leftarrow B m - c, \qquad
    M \leftarrow B M B - B m c^\top - c\, m^\top B + c c^\top .

This is exact for gradient descent at any width ``N``: started from a network's own
``(m₀, M₀)`` it reproduces that network step for step.  The width enters only through the
initial statistics; as ``N → ∞``, ``m₀ → 0`` and ``M₀ → σ_w² I`` (law of large numbers), which
is the infinite-width limit :func:`rich_grokking` integrates by default.  ``B`` shows the rate
of feature learning: the statistics move at rate ``ε/α`` per unit time (``η`` × step) in ``G``,
so the time to learn the ``β`` direction grows like ``α/ε`` (Kumar et al. 2024, Sec. 5:
feature learning slowed by laziness ``α`` and by small ``ε``).  These equations are derived
here from the paper's model and statistics; the paper (ICLR text) states the statistics and the
loss decomposition, not these update equations.  Not covered: the dynamical mean-field theory
of the ``P, D → ∞`` limit at fixed ``P/D``, averaged over data sets (arXiv:2310.06110v1 of the
paper; Bordelon, Kumar, Gershman & Pehlevan 2024, "Asymptotic dynamics for delayed feature
learning in a toy model", ICML HiLD workshop), and trained readouts.  Here the data set is the
given one, and the dimension is finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import finite_array, finite_scalar, float_array, positive_scalar
from traindyn.theory.kernel_flow import kernel_flow

__all__ = ["polynomial_network_kernel", "lazy_grokking", "rich_grokking"]

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


RICH_SOURCE = ("Kumar, Bordelon, Gershman & Pehlevan (2024), Grokking as the transition from lazy "
               "to rich training dynamics, ICLR, Sec. 5 (model, sufficient statistics m, M and "
               "the test-loss decomposition); closed gradient-descent updates of (m, M) derived "
               "from that model (theory.grokking module docstring)")

_STAT_ATTRS = {
    "train_loss": ("training loss, mean squared error (1/P) Σ (f − y)², rich dynamics", "1"),
    "test_loss": ("test loss, mean squared error on fresh points, rich dynamics", "1"),
    "test_loss_population": ("population test loss E_x[(f − y)²], rich dynamics", "1"),
    "m_drift_sq": ("‖m − m₀‖², m = mean first-layer weight", "1"),
    "M_drift_trace": ("tr(M − M₀), M = (1/N) Σ w wᵀ", "1"),
    "M_drift_beta": ("βᵀ(M − M₀)β", "1"),
    "M_drift_fro": ("‖M − M₀‖_F", "1"),
}


def _quadratic_outputs(x: np.ndarray, dm: np.ndarray, d_big: np.ndarray, alpha: np.ndarray,
                       eps: float) -> np.ndarray:
    """``α (m − m₀)·x + (αε/2) xᵀ(M − M₀)x`` for every α (rows) and input (columns)."""
    lin = dm @ x.T                                                    # (A, n)
    quad = np.sum(np.matmul(x, d_big) * x, axis=-1)                  # xᵀ dM x, (A, n)
    return alpha[:, None] * lin + (0.5 * eps) * alpha[:, None] * quad


def rich_grokking(
    x_train: Any,
    y_train: Any,
    steps: Any,
    learning_rate: float,
    alpha: Any,
    *,
    x_test: Any = None,
    y_test: Any = None,
    beta: Any = None,
    epsilon: float = 0.02,
    weight_var: float | None = None,
    m0: Any = None,
    M0: Any = None,
) -> xr.Dataset:
    r"""Gradient descent of the grokking model through its sufficient statistics ``(m, M)``.

    The closed updates of the module docstring (Kumar et al. 2024, Sec. 5 model and statistics;
    ``m ← Bm − c``, ``M ← BMB − Bmcᵀ − cmᵀB + ccᵀ`` with ``B = I − (ηε/α)G``,
    ``c = (η/α)g``), for every ``α`` at once, from ``f₀ = 0`` (the model subtracts its initial
    function).  The default start ``m₀ = 0``, ``M₀ = σ_w² I`` is the infinite-width limit;
    passing a network's own ``(m₀, M₀)`` reproduces that network exactly.  It covers lazy and
    rich training alike (the network with fixed readouts), at ``O(P D²)`` per step and ``α``
    instead of ``O(N P D)``.

    Parameters
    ----------
    x_train, y_train : arrays (P, D), (P,)
        Training inputs and targets.
    steps : array of int
        Steps at which to record (ascending, from 0); ``time = η × step``.
    learning_rate : float
        ``η`` of the recipe (the weight step is ``η N/α²`` times the gradient of
        ``L = (1/2P)Σ(f − y)²``).
    alpha : float or sequence of float
        Output scales (laziness), all ``> 0``.
    x_test, y_test : arrays, optional
        Test points: ``test_loss``.
    beta : array (D,), optional
        Unit teacher direction of ``y = (β·x)²/2``: ``test_loss_population`` (the exact
        ``E_x[(f − y)²]`` for ``x ~ N(0, I_D)``, Isserlis' theorem) and ``M_drift_beta``.
    epsilon : float
        ``ε`` of ``φ(z) = z + (ε/2) z²``.
    weight_var : float, optional
        ``σ_w²`` of the initial weights (default ``1/D``), for the default ``M₀ = σ_w² I``.
    m0, M0 : arrays (D,), (D, D), optional
        Initial statistics (a finite network's ``W₀ᵀ1/N`` and ``W₀ᵀW₀/N``); default the
        infinite-width ``0`` and ``σ_w² I``.

    Returns
    -------
    xarray.Dataset
        Over (``alpha``, ``step``) with ``time``: ``train_loss``, ``test_loss``,
        ``test_loss_population``, ``m_drift_sq``, ``M_drift_trace``, ``M_drift_beta``,
        ``M_drift_fro`` — the names of ``dynamics.recipes.train_grokking``.
    """
    x = _inputs(x_train, "x_train")
    n, dim = x.shape
    y = finite_array(y_train, "y_train").reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"y_train has {y.shape[0]} values for {n} rows of x_train")
    eta = positive_scalar(learning_rate, "learning_rate")
    eps = finite_scalar(epsilon, "epsilon")
    alphas = np.atleast_1d(finite_array(alpha, "alpha"))
    if alphas.ndim != 1 or alphas.size == 0 or np.any(alphas <= 0):
        raise ValueError(f"alpha must be a scalar or 1-D sequence of values > 0; got {alphas}")
    rec_f = np.atleast_1d(finite_array(steps, "steps"))
    if rec_f.ndim != 1 or rec_f.size == 0 or np.any(rec_f != np.round(rec_f)):
        raise ValueError("steps must be a non-empty 1-D array of integers")
    if rec_f[0] < 0 or np.any(np.diff(rec_f) <= 0):
        raise ValueError("steps must be >= 0 and strictly increasing")
    rec = rec_f.astype(np.int64)
    var = 1.0 / dim if weight_var is None else positive_scalar(weight_var, "weight_var")
    m_init = np.zeros(dim) if m0 is None else finite_array(m0, "m0").reshape(-1)
    big_init = var * np.eye(dim) if M0 is None else finite_array(M0, "M0")
    if m_init.shape != (dim,) or big_init.shape != (dim, dim):
        raise ValueError(f"m0 and M0 must have shapes ({dim},) and ({dim}, {dim})")
    xt = yt = b = None
    if x_test is not None:
        xt = _inputs(x_test, "x_test")
        if xt.shape[1] != dim:
            raise ValueError(f"x_test has dim {xt.shape[1]}, x_train {dim}")
        if y_test is not None:
            yt = finite_array(y_test, "y_test").reshape(-1)
            if yt.shape[0] != xt.shape[0]:
                raise ValueError(f"y_test has {yt.shape[0]} values for {xt.shape[0]} rows")
    if beta is not None:
        b = finite_array(beta, "beta").reshape(-1)
        if b.shape[0] != dim:
            raise ValueError(f"beta has {b.shape[0]} entries for inputs of dim {dim}")

    n_alpha = alphas.shape[0]
    m = np.tile(m_init, (n_alpha, 1))                                # (A, D)
    big = np.tile(big_init, (n_alpha, 1, 1))                         # (A, D, D)
    rate = (eta / alphas)[:, None]                                   # η/α
    out = {k: np.full((n_alpha, rec.size), np.nan) for k in _STAT_ATTRS}
    ae = alphas * eps
    k = 0
    for step in range(int(rec[-1]) + 1):
        dm, d_big = m - m_init, big - big_init
        r = _quadratic_outputs(x, dm, d_big, alphas, eps) - y        # (A, P)
        if step == rec[k]:
            out["train_loss"][:, k] = np.mean(r * r, axis=1)
            if xt is not None and yt is not None:
                ft = _quadratic_outputs(xt, dm, d_big, alphas, eps)
                out["test_loss"][:, k] = np.mean((ft - yt) ** 2, axis=1)
            out["m_drift_sq"][:, k] = np.einsum("ad,ad->a", dm, dm)
            tr = np.einsum("add->a", d_big)
            fro2 = np.einsum("ade,ade->a", d_big, d_big)
            out["M_drift_trace"][:, k] = tr
            out["M_drift_fro"][:, k] = np.sqrt(fro2)
            if b is not None:
                bb = np.einsum("d,ade,e->a", b, d_big, b)
                out["M_drift_beta"][:, k] = bb
                # E_x[(f − y)²] = ‖α dm‖² + (tr A)²/4 + ‖A‖_F²/2, A = αε dM − ββᵀ (‖β‖ = 1)
                tr_a = ae * tr - b @ b
                fro_a = ae**2 * fro2 - 2 * ae * bb + (b @ b) ** 2
                out["test_loss_population"][:, k] = (alphas**2 * out["m_drift_sq"][:, k]
                                                      + 0.25 * tr_a**2 + 0.5 * fro_a)
            k += 1
            if k == rec.size:
                break
        g = r @ x / n                                                # (A, D)
        big_g = np.matmul(x.T[None] * r[:, None, :], x) / n          # (A, D, D)
        c = rate * g
        bmat = np.eye(dim)[None] - (rate * eps)[:, :, None] * big_g   # B = I − (ηε/α) G
        bm = np.einsum("ade,ae->ad", bmat, m)
        cross = bm[:, :, None] * c[:, None, :]
        big = (np.matmul(np.matmul(bmat, big), bmat) - cross - np.swapaxes(cross, 1, 2)
               + c[:, :, None] * c[:, None, :])
        m = bm - c
    keep = [v for v in _STAT_ATTRS if not np.all(np.isnan(out[v]))]
    ds = xr.Dataset(
        {v: (("alpha", "step"), out[v], {"long_name": _STAT_ATTRS[v][0],
                                         "units": _STAT_ATTRS[v][1]}) for v in keep},
        coords={"alpha": ("alpha", alphas, {"long_name": "output scale α (laziness)",
                                            "units": "1"}),
                "step": ("step", rec.astype(np.int64)),
                "time": ("step", eta * rec.astype(float),
                         {"long_name": "time = learning rate × step", "units": "1"})})
    ds.attrs = theory_attrs(RICH_SOURCE, dict(
        epsilon=eps, weight_var=var, learning_rate=eta, alpha=alphas.tolist(), n_train=n,
        start="infinite width (m0 = 0, M0 = weight_var I)" if m0 is None and M0 is None
        else "given (m0, M0)"), regime="lazy and rich: gradient descent of (m, M)")
    return ds
