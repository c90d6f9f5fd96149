r"""Training under a fixed kernel: the linearised network's prediction of training.

Lee, Xiao, Schoenholz, Bahri, Novak, Sohl-Dickstein & Pennington, "Wide neural networks of any
depth evolve as linear models under gradient descent" (NeurIPS 2019), Sec. 2.2, Eqs. 9–11.

Setup.  A model linear in its parameters around ``θ₀``, ``f(x) = f₀(x) + J(x)(θ − θ₀)``, with
kernel ``Θ(x, x') = J(x)J(x')ᵀ`` (for ``k`` outputs a ``k × k`` block per pair of points), is
trained on ``n`` points ``X`` with targets ``Y`` on the objective

.. math::
    \mathcal L(\theta) = \frac1c \sum_{i=1}^n \ell(f(x_i), y_i)
        + \frac{\delta}{2c}\,\lVert\theta-\theta_0\rVert^2 ,

``ℓ(f, y) = ½‖f − y‖²`` (squared loss) or ``ℓ(f, y) = −Σ_a y_a log softmax(f)_a``
(cross-entropy), ``c`` the loss normalisation (``normalization``) and ``δ`` the ridge
(``diag_reg``: weight decay towards ``θ₀``; ``δ = 0`` is Lee et al.'s setting).  Gradient descent
``θ_{s+1} = θ_s − η∇\mathcal L`` keeps ``θ_s − θ₀ = J(X)ᵀβ_s`` with ``β₀ = 0`` and

.. math::
    \beta_{s+1} = \beta_s - \frac{\eta}{c}\big[\nabla_f\ell(f_s) + \delta\beta_s\big],\qquad
    f_s(X) = f_0(X) + \Theta\,\beta_s,\qquad f_s(x) = f_0(x) + \Theta(x, X)\,\beta_s ,

so train and test predictions need only ``Θ = Θ(X, X)`` and ``Θ(x, X)`` (Lee et al. 2019,
Sec. 2.2).  Gradient flow replaces the step by ``dβ/ds = −(η/c)[∇_fℓ + δβ]`` (``s`` counts steps,
so the flow's time is ``η s``, traindyn's ``time`` coordinate).

Squared loss, exact through one eigendecomposition ``Θ + δI = U diag(λ) Uᵀ``, with
``r = Y − f₀(X)``:

.. math::
    \beta_s = U\,\mathrm{diag}\Big(\frac{1 - g_s(\lambda)}{\lambda}\Big)U^\top r,\qquad
    g_s(\lambda) = \begin{cases} (1 - \eta\lambda/c)^s & \text{gradient descent}\\
                                 e^{-\eta\lambda s/c} & \text{gradient flow}\end{cases}

At ``δ = 0`` this is Lee et al. (2019), Eqs. 9–10: ``f_s(X) = Y + g_s(Θ)(f₀(X) − Y)`` and
``f_s(x) = f₀(x) + Θ(x,X)Θ⁻¹(I − g_s(Θ))(Y − f₀(X))``; as ``s → ∞`` (Eq. 11) the test
prediction is kernel ridge regression on the residual, ``f₀(x) + Θ(x,X)(Θ + δI)⁻¹ r``, and the
training prediction ``f₀(X) + Θ(Θ + δI)⁻¹ r`` (``= Y`` at ``δ = 0`` when ``Θ`` is invertible).
Directions with ``λ`` below round-off (``N·ε·λ_max``) are not moved: the Jacobian has no
component there, so ``Θ⁻¹`` reads as the pseudo-inverse.  Discrete gradient descent diverges
when ``η > 2c/λ_max`` (``|1 − ηλ_max/c| > 1``): that is refused with a ``ValueError``.

Cross-entropy has no closed form: gradient descent is iterated step by step (exact up to
round-off), gradient flow integrated with ``scipy.integrate.solve_ivp`` (``DOP853``, default
``rtol = 1e-8``, ``atol = 1e-10`` on ``β``).  As ``s → ∞`` nothing converges: on training data the
kernel separates (a positive-definite ``Θ`` separates any labels) the training loss tends to 0
while the logits grow without bound (``‖f‖ ∼ log s``), their direction tending to the kernel's
max-margin classifier (Soudry et al. 2018, JMLR 19:70; Ji & Telgarsky 2019 for the kernel/linear
case), so :func:`kernel_flow_limit` refuses cross-entropy.

Kernels.  ``kernel_train`` is ``(n, n)`` (every output shares the kernel, ``Θ[i,j,a,b] =
K[i,j]δ_ab``: pass an NTK averaged over outputs, ``probes.empirical_ntk(..., output="mean")``)
or ``(n, n, k, k)`` (the full kernel, ``output="full"``).  The *sum* over outputs
(``output="trace"``) is ``k`` times the per-output kernel.

Relation to neural-tangents' ``predict.gradient_descent_mse(k_train_train, y_train,
learning_rate, diag_reg)``: it is gradient flow on ``½·mean((f − y)²)``, i.e. ``c = y.size =
n·k`` (this module's default for the squared loss), with its time ``t`` in steps of
``learning_rate`` — so ``kernel_flow(..., learning_rate=lr, normalization=y.size,
dynamics="flow")`` at ``steps = t`` is its ``predict_fn(t)`` on the test points.  Its
``diag_reg`` is relative (``δ = diag_reg·trace(Θ)/n`` unless ``diag_reg_absolute_scale``); here
``diag_reg`` is absolute.  With ``δ > 0`` neural-tangents regularises the kernel inside the
training-set flow (its ``f_t(X) → Y``); here ``δ`` is weight decay, so train and test points obey
one formula and ``f_∞(X)`` is the kernel-ridge fit.  A PyTorch loop with ``F.mse_loss`` (mean over
entries, no ½) has ``c = n·k/2``; with ``F.cross_entropy`` (mean over samples) ``c = n``
(this module's default for cross-entropy); with ``reduction="sum"`` (and ½ for MSE) ``c = 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import (
    count,
    finite_array,
    nonnegative_scalar,
    positive_scalar,
)

__all__ = ["kernel_flow", "kernel_flow_limit"]

SOURCE = (
    "Lee, Xiao, Schoenholz, Bahri, Novak, Sohl-Dickstein & Pennington (2019), Wide neural "
    "networks of any depth evolve as linear models under gradient descent, NeurIPS, "
    "Sec. 2.2, Eqs. 9-11"
)

LOSSES = ("mse", "cross_entropy")
DYNAMICS = ("gd", "flow")


# --------------------------------------------------------------------------- input checks


def _choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


def _kernel(kernel: Any, name: str, tol: float) -> tuple[np.ndarray, int | None]:
    """The train kernel as an (N, N) symmetric matrix and ``k`` (``None``: shared outputs)."""
    K = finite_array(kernel, name)
    if K.ndim == 2 and K.shape[0] == K.shape[1] and K.shape[0] > 0:
        mat, k = K, None
    elif K.ndim == 4 and K.shape[0] == K.shape[1] > 0 and K.shape[2] == K.shape[3] > 0:
        n, k = K.shape[0], K.shape[2]
        mat = K.transpose(0, 2, 1, 3).reshape(n * k, n * k)  # [(i,a), (j,b)]
    else:
        raise ValueError(f"{name} must be an (n, n) or (n, n, k, k) kernel with n, k ≥ 1; got "
                         f"shape {K.shape}")
    scale = float(np.abs(mat).max())
    asym = float(np.abs(mat - mat.T).max())
    if asym > tol * max(scale, 1e-300):
        raise ValueError(f"{name} is not symmetric (max |K − Kᵀ| = {asym:.3g}, "
                         f"{asym / max(scale, 1e-300):.2g} of max |K|; allowed {tol:g}): a "
                         "kernel Θ(X, X) = J Jᵀ is symmetric")
    return 0.5 * (mat + mat.T), k


def _eigh_psd(mat: np.ndarray, name: str, tol: float) -> tuple[np.ndarray, np.ndarray]:
    lam, U = np.linalg.eigh(mat)
    top = max(float(np.abs(lam).max()), 1e-300)
    if lam[0] < -tol * top:
        raise ValueError(f"{name} is not positive semi-definite: eigenvalue {lam[0]:.3g} "
                         f"(relative {lam[0] / top:.2g}, beyond the round-off allowance {tol:g})")
    return np.maximum(lam, 0.0), U


def _check_psd(mat: np.ndarray, name: str, tol: float) -> None:
    """Refuse a kernel with an eigenvalue below ``−tol·λ_max`` without an eigendecomposition:
    ``λ_max`` by 30 power iterations (a lower bound), then a Cholesky factorisation of
    ``mat + tol·λ_max·I`` (a third of ``eigh``'s work); only a failure pays for ``eigvalsh``."""
    v = np.random.default_rng(0).standard_normal(mat.shape[0])
    top = 0.0
    for _ in range(30):
        w = mat @ v
        top = float(np.linalg.norm(w))
        if top == 0.0:
            return
        v = w / top
    try:
        np.linalg.cholesky(mat + tol * top * np.eye(mat.shape[0]))
    except np.linalg.LinAlgError:
        _eigh_psd(mat, name, tol)


def _outputs(value: Any, name: str, rows: int, k: int | None) -> np.ndarray:
    arr = finite_array(value, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != rows or (k is not None and arr.shape[1] != k):
        want = f"({rows}, {k})" if k is not None else f"({rows}, k)"
        raise ValueError(f"{name} must have shape {want}" + (f" or ({rows},)" if k in (None, 1)
                                                            else "") + f"; got {arr.shape}")
    return arr


def _labels(value: Any, name: str, rows: int, k: int | None, loss: str) -> np.ndarray:
    """Targets as an (rows, k) array: regression targets, or class probabilities for CE."""
    arr = finite_array(value, name)
    if loss == "mse":
        return _outputs(arr, name, rows, k)
    if arr.ndim == 1:
        if arr.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} labels; got shape {arr.shape}")
        if np.any(arr < 0) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name}: integer class labels ≥ 0 expected for cross-entropy")
        kk = int(arr.max()) + 1 if k is None else k
        if arr.size and arr.max() >= kk:
            raise ValueError(f"{name} has label {int(arr.max())} but there are {kk} outputs")
        return np.eye(kk)[arr.astype(np.int64)]
    P = _outputs(arr, name, rows, k)
    if np.any(P < 0) or np.any(np.abs(P.sum(1) - 1) > 1e-6):
        raise ValueError(f"{name}: for cross-entropy give integer labels (n,) or class "
                         "probabilities (n, k) with non-negative rows summing to 1")
    return P


def _steps(steps: Any, start: int, dynamics: str) -> np.ndarray:
    arr = np.atleast_1d(finite_array(steps, "steps"))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"steps must be a non-empty 1-D array of training steps; got shape "
                         f"{arr.shape}")
    if np.any(arr < start):
        raise ValueError(f"steps must be ≥ start_step = {start} (the step of f0 and the kernel); "
                         f"got min {arr.min():g}")
    if dynamics == "gd" and np.any(arr != np.round(arr)):
        raise ValueError("steps must be integers for gradient descent (dynamics='gd')")
    return arr


class _Problem:
    """Validated inputs in one internal layout.

    The kernel is an (N, N) matrix ``M``; the state ``β`` and outputs are (N, kk) arrays.
    Shared kernel: ``N = n``, ``kk = k``.  Full kernel: ``N = n·k``, ``kk = 1``, entry ``i·k + a``.
    """

    def __init__(self, kernel_train, targets_train, kernel_test_train, targets_test, f0_train,
                 f0_test, loss, normalization, diag_reg, kernel_tol):
        self.loss = _choice(loss, "loss", LOSSES)
        self.tol = positive_scalar(kernel_tol, "kernel_tol")
        self.M, k_full = _kernel(kernel_train, "kernel_train", self.tol)
        n = self.M.shape[0] // (k_full or 1)
        self.n, self.full = n, k_full is not None
        k = k_full
        if k is None and f0_train is not None:
            k = _outputs(f0_train, "f0_train", n, None).shape[1]
        self.Y = _labels(targets_train, "targets_train", n, k, self.loss)
        self.k = k = self.Y.shape[1]
        if self.loss == "cross_entropy" and k < 2:
            raise ValueError("targets_train: cross-entropy needs k ≥ 2 outputs (classes)")
        self.F0 = (np.zeros((n, k)) if f0_train is None
                   else _outputs(f0_train, "f0_train", n, k))
        self.c = (float(n * k if self.loss == "mse" else n) if normalization is None
                  else positive_scalar(normalization, "normalization"))
        self.delta = nonnegative_scalar(diag_reg, "diag_reg")
        self.m = 0
        self.Kt = self.Yt = self.F0t = None
        if kernel_test_train is not None:
            Kt = finite_array(kernel_test_train, "kernel_test_train")
            want = (n, k, k) if self.full else (n,)
            if Kt.ndim != 1 + len(want) or Kt.shape[1:] != want:
                shape = ", ".join(map(str, want))
                raise ValueError(f"kernel_test_train must have shape (m, {shape}) to match "
                                 f"kernel_train; got {Kt.shape}")
            self.m = m = Kt.shape[0]
            self.Kt = Kt.transpose(0, 2, 1, 3).reshape(m * k, n * k) if self.full else Kt
            self.F0t = (np.zeros((m, k)) if f0_test is None
                        else _outputs(f0_test, "f0_test", m, k))
            if targets_test is not None:
                self.Yt = _labels(targets_test, "targets_test", m, k, self.loss)
        elif targets_test is not None or f0_test is not None:
            raise ValueError("targets_test / f0_test need kernel_test_train (the test–train "
                             "kernel Θ(x, X))")

    # layout conversions
    def state(self, A: np.ndarray) -> np.ndarray:
        return A.reshape(-1, 1) if self.full else A

    def outputs(self, S: np.ndarray, rows: int) -> np.ndarray:
        """(…, N, kk) state-layout arrays → (…, rows, k)."""
        return S.reshape(*S.shape[:-2], rows, self.k)

    def params(self) -> dict[str, Any]:
        return dict(loss=self.loss, normalization=self.c, diag_reg=self.delta, n=self.n,
                    n_test=self.m, n_outputs=self.k,
                    kernel="full (n, n, k, k)" if self.full else "shared (n, n)")


# --------------------------------------------------------------------------- solvers


def _mse_coefficients(lam: np.ndarray, elapsed: np.ndarray, rate: float, dynamics: str,
                      cut: float) -> np.ndarray:
    """``(1 − g_s(λ))/λ`` over (steps, modes); 0 for modes with ``λ ≤ cut``."""
    x = rate * lam                                          # ηλ/c
    s = elapsed[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if dynamics == "flow":
            one_minus_g = -np.expm1(-x * s)
        else:
            small = x < 1
            one_minus_g = np.where(small, -np.expm1(s * np.log1p(-np.where(small, x, 0.0))),
                                   1.0 - np.power(1.0 - x, s))
        h = np.where(lam > cut, one_minus_g / np.where(lam > cut, lam, 1.0), 0.0)
    return h


def _mse_path(p: _Problem, elapsed: np.ndarray, rate: float, dynamics: str, eta: float):
    lam0, U = _eigh_psd(p.M, "kernel_train", p.tol)
    lam = lam0 + p.delta
    cut = lam.size * np.finfo(float).eps * max(float(lam.max()), 1e-300)
    if dynamics == "gd" and rate * lam.max() > 2.0:
        raise ValueError(
            f"learning_rate η = {eta:g} makes gradient descent diverge: η·λ_max/c = "
            f"{rate * lam.max():.4g} > 2 (λ_max = {lam.max():.4g} of kernel_train + diag_reg, "
            f"c = {p.c:g}), so the residual grows as |1 − ηλ_max/c|^s; the largest stable "
            f"learning rate is 2c/λ_max = {2 * p.c / lam.max():.4g}")
    P = U.T @ p.state(p.Y - p.F0)                            # (N, kk)
    H = _mse_coefficients(lam, elapsed, rate, dynamics, cut)  # (T, N)
    train = U @ ((H * lam0)[:, :, None] * P)                 # (T, N, kk): U diag(λ₀h) Uᵀ r
    test = None
    if p.Kt is not None:
        test = p.Kt @ (U @ (H[:, :, None] * P))              # Θ(x, X) β_s
    return train, test


def _softmax(F: np.ndarray) -> np.ndarray:
    Z = F - F.max(axis=-1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=-1, keepdims=True)


def _ce_path(p: _Problem, elapsed: np.ndarray, rate: float, dynamics: str, rtol: float,
             atol: float, method: str):
    """β at each elapsed step: GD iterated, or the flow integrated."""
    order = np.argsort(elapsed, kind="stable")
    N, kk = p.M.shape[0], (1 if p.full else p.k)
    F0s = p.state(p.F0)
    Ys = p.state(p.Y)

    def grad(B: np.ndarray) -> np.ndarray:
        F = p.outputs(F0s + p.M @ B, p.n)
        return p.state(_softmax(F)) - Ys + p.delta * B

    _check_psd(p.M, "kernel_train", p.tol)
    betas = np.empty((elapsed.size, N, kk))
    B = np.zeros((N, kk))
    if dynamics == "gd":
        done = 0
        for idx in order:
            target = int(elapsed[idx])
            for _ in range(target - done):
                B = B - rate * grad(B)
            done = target
            betas[idx] = B
    else:
        from scipy.integrate import solve_ivp

        t_eval = elapsed[order]
        end = float(t_eval[-1])
        if end == 0.0:
            betas[:] = 0.0
        else:
            sol = solve_ivp(lambda _t, b: -rate * grad(b.reshape(N, kk)).ravel(), (0.0, end),
                            np.zeros(N * kk), method=method, t_eval=t_eval, rtol=rtol, atol=atol)
            if not sol.success:
                raise RuntimeError(f"solve_ivp failed to integrate the cross-entropy flow: "
                                   f"{sol.message}")
            betas[order] = sol.y.T.reshape(-1, N, kk)
    train = p.M @ betas
    test = p.Kt @ betas if p.Kt is not None else None
    return train, test


# --------------------------------------------------------------------------- Dataset


def losses_of(F: np.ndarray, Y: np.ndarray, loss: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss and accuracy over the leading axes of ``F`` (…, rows, k)."""
    if loss == "mse":
        value = ((F - Y) ** 2).mean(axis=(-2, -1))
        if Y.shape[1] > 1:
            acc = (F.argmax(-1) == Y.argmax(-1)).mean(-1)
        elif np.all(np.abs(Y) == 1):
            acc = (np.sign(F[..., 0]) == Y[:, 0]).mean(-1)
        else:
            acc = None
        return value, acc
    Z = F - F.max(axis=-1, keepdims=True)
    logp = Z - np.log(np.exp(Z).sum(axis=-1, keepdims=True))
    value = -(Y * logp).sum(-1).mean(-1)
    acc = (F.argmax(-1) == Y.argmax(-1)).mean(-1)
    return value, acc


def _variables(p: _Problem, train: np.ndarray, test: np.ndarray | None, lead: tuple[str, ...],
               where: str) -> dict[str, Any]:
    if p.loss == "mse":
        lname = "mean squared error over all entries, (1/(n·k)) Σ (f − y)²"
        units = "1"
    else:
        lname = "softmax cross-entropy, mean over samples"
        units = "nat"
    data: dict[str, Any] = {}
    for split, F, Y, dim in (("train", train, p.Y, "sample"), ("test", test, p.Yt,
                                                                "test_sample")):
        if F is None:
            continue
        data[f"f_{split}"] = (lead + (dim, "output"), F, {
            "long_name": f"{split} outputs (logits for cross-entropy) {where}", "units": "1"})
        if Y is None:
            continue
        value, acc = losses_of(F, Y, p.loss)
        data[f"{split}_loss"] = (lead, value, {
            "long_name": f"{split} loss {where}: {lname}", "units": units})
        if acc is not None:
            data[f"{split}_accuracy"] = (lead, acc, {
                "long_name": f"{split} accuracy (argmax of f; sign for ±1 targets) {where}",
                "units": "1"})
    return data


def _coords(p: _Problem) -> dict[str, Any]:
    coords = {
        "sample": ("sample", np.arange(p.n), {"long_name": "training sample index",
                                              "units": "1"}),
        "output": ("output", np.arange(p.k), {"long_name": "network output index",
                                              "units": "1"}),
    }
    if p.m:
        coords["test_sample"] = ("test_sample", np.arange(p.m),
                                 {"long_name": "test sample index", "units": "1"})
    return coords


# --------------------------------------------------------------------------- public


def kernel_flow(
    kernel_train: Any,
    targets_train: Any,
    steps: Any,
    learning_rate: float,
    *,
    kernel_test_train: Any = None,
    targets_test: Any = None,
    f0_train: Any = None,
    f0_test: Any = None,
    loss: str = "mse",
    dynamics: str = "gd",
    normalization: float | None = None,
    diag_reg: float = 0.0,
    start_step: int = 0,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "DOP853",
    kernel_tol: float = 1e-5,
) -> xr.Dataset:
    r"""Train and test predictions of training under the fixed kernel ``Θ``, over ``step``.

    Lee et al. (2019), Sec. 2.2, Eqs. 9–11 (module docstring for the equations and the loss
    convention): from outputs ``f₀`` and kernel ``Θ`` at ``start_step``, the outputs at each of
    ``steps`` of gradient descent (``dynamics="gd"``, the step operator ``(I − ηΘ/c)^s``) or
    gradient flow (``"flow"``, ``e^{−ηΘs/c}``), squared loss exact through one
    eigendecomposition, cross-entropy iterated (GD) or integrated with ``solve_ivp`` (flow).

    Parameters
    ----------
    kernel_train : array (n, n) or (n, n, k, k)
        ``Θ(X, X)``; ``(n, n)`` is shared by every output (an NTK averaged over outputs).
        Symmetric positive semi-definite to ``kernel_tol`` (relative), else ``ValueError``.
    targets_train : array (n,) or (n, k)
        Regression targets (``loss="mse"``), or integer labels / class probabilities
        (``loss="cross_entropy"``).
    steps : array of training steps
        Absolute steps ``≥ start_step`` (integers for ``"gd"``), e.g. a measured Dataset's
        ``step``, so the prediction lands on the measured coordinates.
    learning_rate : float
        ``η > 0``; ``time = η × step``.  For ``"gd"`` with the squared loss,
        ``η > 2c/λ_max(Θ + δI)`` diverges and raises ``ValueError``.
    kernel_test_train : array (m, n) or (m, n, k, k), optional
        ``Θ(x, X)`` for ``m`` test points (same layout as ``kernel_train``).
    targets_test : array (m,) or (m, k), optional
        Test targets: give ``test_loss`` (and ``test_accuracy``).
    f0_train, f0_test : arrays (n, k), (m, k), optional
        Outputs at ``start_step`` (default zeros).  With an ``(n, n)`` kernel and integer labels
        ``k`` is read from ``f0_train`` (else ``max label + 1``).
    loss : {"mse", "cross_entropy"}
    dynamics : {"gd", "flow"}
    normalization : float, optional
        ``c`` in ``(1/c) Σ_i ℓ_i``; default ``n·k`` for ``"mse"`` (neural-tangents) and ``n`` for
        ``"cross_entropy"`` (PyTorch's mean cross-entropy).
    diag_reg : float
        Ridge ``δ ≥ 0`` (weight decay ``(δ/2c)‖θ − θ₀‖²``), absolute.
    start_step : int
        The step at which ``f₀`` and ``Θ`` were measured.
    rtol, atol, method : solve_ivp settings of the cross-entropy flow (on ``β``).
    kernel_tol : float
        Relative allowance for asymmetry and negative eigenvalues (round-off of a float32 NTK).

    Returns
    -------
    xarray.Dataset
        Over ``step`` (coordinate ``time = η × step``): ``train_loss`` and ``f_train``
        (``step, sample, output``); with test data ``f_test`` (``step, test_sample, output``) and
        ``test_loss``; ``train_accuracy`` / ``test_accuracy`` for cross-entropy, for squared loss
        with ``k > 1`` (argmax) or with ±1 targets (sign).  Squared loss is the mean over all
        ``n·k`` entries of ``(f − y)²`` (PyTorch's ``mse_loss``), cross-entropy the mean over
        samples, whatever ``normalization`` is.
    """
    p = _Problem(kernel_train, targets_train, kernel_test_train, targets_test, f0_train,
                 f0_test, loss, normalization, diag_reg, kernel_tol)
    dynamics = _choice(dynamics, "dynamics", DYNAMICS)
    eta = positive_scalar(learning_rate, "learning_rate")
    start = count(start_step, "start_step")
    s = _steps(steps, start, dynamics)
    rtol = positive_scalar(rtol, "rtol")
    atol = positive_scalar(atol, "atol")
    rate = eta / p.c
    elapsed = s - start
    if p.loss == "mse":
        dtrain, dtest = _mse_path(p, elapsed, rate, dynamics, eta)
    else:
        dtrain, dtest = _ce_path(p, elapsed, rate, dynamics, rtol, atol, method)
    train = p.F0[None] + p.outputs(dtrain, p.n)
    test = p.F0t[None] + p.outputs(dtest, p.m) if dtest is not None else None
    where = f"predicted under the fixed kernel from step {start}"
    data = _variables(p, train, test, ("step",), where)
    step_values = s.astype(np.int64) if np.all(s == np.round(s)) else s
    coords = _coords(p)
    coords["step"] = ("step", step_values, {"long_name": "optimisation step", "units": "1"})
    coords["time"] = ("step", step_values * float(eta),
                      {"long_name": "training time, learning rate × step", "units": "1"})
    params = dict(p.params(), learning_rate=eta, dynamics=dynamics, start_step=start)
    if p.loss == "cross_entropy" and dynamics == "flow":
        params.update(rtol=rtol, atol=atol, method=method)
    return xr.Dataset(data, coords=coords,
                      attrs=theory_attrs(SOURCE, params, start_step=start, loss=p.loss,
                                         dynamics=dynamics))


def kernel_flow_limit(
    kernel_train: Any,
    targets_train: Any,
    *,
    kernel_test_train: Any = None,
    targets_test: Any = None,
    f0_train: Any = None,
    f0_test: Any = None,
    loss: str = "mse",
    diag_reg: float = 0.0,
    kernel_tol: float = 1e-5,
) -> xr.Dataset:
    r"""The ``s → ∞`` end point of :func:`kernel_flow`: kernel (ridge) regression on the residual.

    .. math::
        f_\infty(x) = f_0(x) + \Theta(x, X)(\Theta + \delta I)^{+}(Y - f_0(X))

    (Lee et al. 2019, Eq. 11 with the ridge of weight decay; the same for gradient descent at a
    stable learning rate and for gradient flow).  Cross-entropy has no limit (the logits
    diverge; module docstring) and raises ``ValueError``.

    Returns
    -------
    xarray.Dataset
        ``train_loss``, ``f_train`` and, with test data, ``f_test``, ``test_loss`` (and the
        accuracies as in :func:`kernel_flow`), without a ``step`` dimension.
    """
    if loss == "cross_entropy":
        raise ValueError(
            "loss='cross_entropy' has no s → ∞ limit under a fixed kernel: the training loss "
            "tends to 0 while the logits grow without bound (‖f‖ ~ log s) in the direction of "
            "the kernel max-margin classifier (Soudry et al. 2018; Ji & Telgarsky 2019); "
            "evaluate kernel_flow at finite steps instead")
    p = _Problem(kernel_train, targets_train, kernel_test_train, targets_test, f0_train,
                 f0_test, loss, None, diag_reg, kernel_tol)
    lam0, U = _eigh_psd(p.M, "kernel_train", p.tol)
    lam = lam0 + p.delta
    cut = lam.size * np.finfo(float).eps * max(float(lam.max()), 1e-300)
    inv = np.where(lam > cut, 1.0 / np.where(lam > cut, lam, 1.0), 0.0)
    P = U.T @ p.state(p.Y - p.F0)
    beta = U @ (inv[:, None] * P)
    train = p.F0 + p.outputs(p.M @ beta, p.n)
    test = p.F0t + p.outputs(p.Kt @ beta, p.m) if p.Kt is not None else None
    data = _variables(p, train, test, (), "at the end of training under the fixed kernel "
                                          "(s → ∞, kernel ridge regression)")
    return xr.Dataset(data, coords=_coords(p), attrs=theory_attrs(SOURCE, p.params()))
