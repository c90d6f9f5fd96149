"""Kernel ridge and random-feature ridge regression, solved exactly: the experiments that
``theory.kernels`` and ``theory.random_features`` predict.

Gaussian test bed.  Inputs ``x ∈ R^M`` with independent ``x_i ~ N(0, λ_i)`` and the linear
kernel ``K(x, x') = x·x'``: its eigenvalues are the ``λ_i`` and its eigenfunctions
``φ_i(x) = x_i/√λ_i`` are Gaussian (the setting in which the eigenframework is exact as sizes
grow).  The target ``f(x) = Σ_i v_i φ_i(x)`` (``v_i = √(target_power_i)``) is seen with label
noise of variance ``σ²``.  A predictor linear in ``x`` with weights ``w`` has the exact test
error ``Σ_i λ_i (w_i − v_i/√λ_i)² + σ²`` (against noisy labels, as in the theory), so no test
set adds sampling noise.

* Kernel ridge regression: ``f̂ = K(x, X)[K(X, X) + δI]⁻¹ y``.
* Random features (Simon, Karkada, Ghosh & Belkin 2023, Sec. 4, Gaussian features):
  ``g(x) = Z x`` with ``Z ∈ R^{N_f × M}`` standard Gaussian, so ``(1/N_f) g(x)·g(x') → K``;
  ridge regression on ``G = g(X)/√N_f``.

Both are solved exactly: a Cholesky factorisation of the smaller of ``GᵀG + δI`` and
``GGᵀ + δI`` for all ridges at once, with a pseudo-inverse fallback (``δ = 0`` on a singular
matrix gives the minimum-norm interpolant).  Nested sub-samples are used along ``n`` and
nested feature sets along ``n_features`` within a seed, as in a real sweep.  Computations run in
float64 with torch on ``device``.

Digits.  The same kernel regression on scikit-learn's digits (1797 images) with a chosen kernel
(Gaussian RBF by default, or any Gram matrix such as an empirical NTK): ``n`` training points
are drawn at random (without replacement by default) from the 1797, and the test error is the
mean squared error over all 1797 points and the centred one-hot outputs — the population whose
spectrum ``theory.spectra.spectrum_from_gram`` gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from traindyn.dynamics import records

__all__ = [
    "digits_kernel",
    "simulate_digits_krr",
    "simulate_krr",
    "simulate_rf",
    "simulate_rf_infinite_data",
]

_SOURCE_KRR = "traindyn recipe kernel_regression.simulate_krr (Gaussian eigenfeatures)"
_SOURCE_RF = "traindyn recipe kernel_regression.simulate_rf (Gaussian random features)"
_SOURCE_DIGITS = "traindyn recipe kernel_regression.simulate_digits_krr (scikit-learn digits)"


def _solve_all_ridges(gram: torch.Tensor, rhs: torch.Tensor, ridges: torch.Tensor) -> torch.Tensor:
    """``(gram + δI)⁺ rhs`` for every ridge δ: (R, k, C).

    Cholesky where ``gram + δI`` is positive definite (fast); otherwise the pseudo-inverse from
    one symmetric eigendecomposition, with eigenvalues below ``k·eps·max`` counted as zero, so
    ``δ = 0`` on a singular Gram matrix gives the minimum-norm solution.
    """
    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram[None] + ridges[:, None, None] * eye)
    out = torch.cholesky_solve(rhs[None].expand(ridges.numel(), *rhs.shape), chol)
    bad = info != 0
    if bool(bad.any()):
        evals, vecs = torch.linalg.eigh(gram)
        evals = evals.clamp_min(0)
        zero = evals <= evals.max() * k * torch.finfo(gram.dtype).eps
        proj = vecs.T @ rhs
        r = ridges[bad]
        denom = evals[None, :] + r[:, None]
        inv = torch.where(zero[None, :] & (r[:, None] == 0), torch.zeros_like(denom),
                          1.0 / torch.where(denom > 0, denom, torch.ones_like(denom)))
        out[bad] = torch.einsum("jk,rk,kc->rjc", vecs, inv, proj)
    return out


def _ridge_solutions(
    F: torch.Tensor, y: torch.Tensor, ridges: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``a(δ) = (FᵀF + δI)⁺Fᵀy = Fᵀ(FFᵀ + δI)⁺y`` for every ridge, and train MSEs.

    ``F``: (n, p), ``y``: (n, C); the smaller of ``FᵀF`` and ``FFᵀ`` is factorised.  Returns
    ``a`` (R, p, C) and the training mean squared errors (R,).
    """
    n, p = F.shape
    if p <= n:
        a = _solve_all_ridges(F.T @ F, F.T @ y, ridges)
    else:
        a = torch.matmul(F.T, _solve_all_ridges(F @ F.T, y, ridges))
    resid = y[None] - torch.matmul(F, a)
    return a, (resid**2).mean(dim=(1, 2))


def _expand(eigenvalues: Any, target_power: Any, multiplicity: Any) -> tuple[np.ndarray, ...]:
    lam = np.asarray(eigenvalues, dtype=float).ravel()
    v2 = np.zeros_like(lam) if target_power is None else np.asarray(target_power, float).ravel()
    if v2.shape != lam.shape:
        raise ValueError("eigenvalues and target_power need the same length")
    if np.any(lam <= 0) or np.any(v2 < 0):
        raise ValueError("the test bed needs eigenvalues > 0 and target_power ≥ 0")
    if multiplicity is not None:
        m = np.asarray(multiplicity)
        if m.shape != lam.shape or np.any(m < 1) or np.any(m != np.round(m)):
            raise ValueError("multiplicity must be positive integers, one per eigenvalue")
        lam, v2 = np.repeat(lam, m.astype(int)), np.repeat(v2, m.astype(int))
    return lam, v2


def _grid(values: Any, name: str, integer: bool = False) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=float))
    if arr.ndim != 1 or arr.size == 0 or np.any(~np.isfinite(arr)):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of finite numbers")
    if integer:
        if np.any(arr < 1) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must be positive integers; got {arr}")
        return arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    return arr


def _coords(**axes: np.ndarray) -> dict[str, Any]:
    return {name: (name, values, {"long_name": records.DIMS.get(name, name), "units": "1"})
            for name, values in axes.items()}


def _draw(lam: np.ndarray, v2: np.ndarray, noise_var: float, n_max: int, seed: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    g = torch.Generator(device=device).manual_seed(int(seed))
    sd = torch.as_tensor(np.sqrt(lam), dtype=torch.float64, device=device)
    x = torch.randn(n_max, lam.size, generator=g, dtype=torch.float64, device=device) * sd
    w_star = torch.as_tensor(np.sqrt(v2 / lam), dtype=torch.float64, device=device)
    eps = torch.randn(n_max, generator=g, dtype=torch.float64, device=device) * np.sqrt(noise_var)
    return x, w_star, (x @ w_star + eps)[:, None], g


def _features(n_modes: int, n_features: int, seed: int, device: torch.device) -> torch.Tensor:
    """The random projection ``Z`` (N_f × M) of a seed: its own stream, so that the same seed
    gives the same features whatever ``n`` is (paired comparisons across ``n``, and with
    :func:`simulate_rf_infinite_data`)."""
    g = torch.Generator(device=device).manual_seed(int(seed) + 7_919_000_003)
    return torch.randn(n_features, n_modes, generator=g, dtype=torch.float64, device=device)


def _test_error(w: torch.Tensor, w_star: torch.Tensor, lam: torch.Tensor,
                noise_var: float) -> torch.Tensor:
    """Exact test MSE against noisy labels, ``Σ λ_i (w_i − w*_i)² + σ²``, for w of (R, M)."""
    return ((w - w_star) ** 2 * lam).sum(-1) + noise_var


def simulate_krr(
    eigenvalues: Any,
    target_power: Any = None,
    n: Sequence[int] = (10, 30, 100, 300),
    ridge: Sequence[float] = (0.0,),
    noise_var: float = 0.0,
    seeds: Sequence[int] = (0, 1, 2, 3),
    multiplicity: Any = None,
    device: str | torch.device | None = None,
) -> xr.Dataset:
    """Kernel ridge regression on the Gaussian test bed, solved exactly.

    Parameters
    ----------
    eigenvalues, target_power, multiplicity
        ``λ_i > 0``, ``v_i²`` per eigenfunction, and integer multiplicities (each eigenvalue is
        repeated), as in ``theory.kernels.krr_learning_curve``.
    n, ridge : sequences
        Sample sizes (integers, nested within a seed) and ridges ``δ ≥ 0``.
    noise_var : float
        Label-noise variance ``σ²``.
    seeds : sequence of int
        One independent draw of inputs and noise per seed.
    device : optional
        torch device (default CPU).

    Returns
    -------
    xarray.Dataset
        ``test_error`` (exact expectation over a fresh noisy test point: includes ``σ²``) and
        ``train_error`` over (``n``, ``ridge``, ``seed``).
    """
    lam, v2 = _expand(eigenvalues, target_power, multiplicity)
    n_arr, r_arr = _grid(n, "n", integer=True), _grid(ridge, "ridge")
    device = torch.device(device or "cpu")
    ridges = torch.as_tensor(r_arr, dtype=torch.float64, device=device)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=device)
    test = np.empty((n_arr.size, r_arr.size, len(seeds)))
    train = np.empty_like(test)
    for s_i, seed in enumerate(seeds):
        x, w_star, y, _ = _draw(lam, v2, noise_var, int(n_arr.max()), seed, device)
        for n_i, m in enumerate(n_arr):
            a, tr = _ridge_solutions(x[:m], y[:m], ridges)
            test[n_i, :, s_i] = _test_error(a[..., 0], w_star, lam_t, noise_var).cpu().numpy()
            train[n_i, :, s_i] = tr.cpu().numpy()
    return _dataset(test, train, ("n", "ridge", "seed"),
                    _coords(n=n_arr, ridge=r_arr, seed=np.asarray(seeds)), _SOURCE_KRR,
                    dict(noise_var=noise_var, n_modes=lam.size))


def simulate_rf(
    eigenvalues: Any,
    target_power: Any = None,
    n: Sequence[int] = (100,),
    n_features: Sequence[int] = (10, 30, 100, 300),
    ridge: Sequence[float] = (0.0,),
    noise_var: float = 0.0,
    seeds: Sequence[int] = (0, 1, 2, 3),
    multiplicity: Any = None,
    device: str | torch.device | None = None,
) -> xr.Dataset:
    """Random-feature ridge regression on the Gaussian test bed, solved exactly.

    Features ``g(x) = Zx`` with i.i.d. standard Gaussian ``Z`` (``N_f × M``), so the feature
    kernel ``g(x)·g(x')/N_f`` averages to ``x·x'`` (Simon, Karkada, Ghosh & Belkin 2023,
    Sec. 4); ridge regression on ``G = g(X)/√N_f`` with ridge ``δ``.  The learnt function is
    linear in ``x`` with weights ``Zᵀa/√N_f``, whose test error is exact.  Sample and feature
    sets are nested within a seed; a seed's data are those of :func:`simulate_krr` with the same
    seed and largest ``n``, and its features those of :func:`simulate_rf_infinite_data`.

    Returns
    -------
    xarray.Dataset
        ``test_error`` (includes ``σ²``) and ``train_error`` over
        (``n``, ``n_features``, ``ridge``, ``seed``).
    """
    lam, v2 = _expand(eigenvalues, target_power, multiplicity)
    n_arr, f_arr = _grid(n, "n", integer=True), _grid(n_features, "n_features", integer=True)
    r_arr = _grid(ridge, "ridge")
    device = torch.device(device or "cpu")
    ridges = torch.as_tensor(r_arr, dtype=torch.float64, device=device)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=device)
    test = np.empty((n_arr.size, f_arr.size, r_arr.size, len(seeds)))
    train = np.empty_like(test)
    for s_i, seed in enumerate(seeds):
        x, w_star, y, _ = _draw(lam, v2, noise_var, int(n_arr.max()), seed, device)
        z = _features(lam.size, int(f_arr.max()), seed, device)
        feats = x @ z.T                                          # (n_max, N_max)
        for f_i, nf in enumerate(f_arr):
            scale = 1.0 / np.sqrt(nf)
            for n_i, m in enumerate(n_arr):
                a, tr = _ridge_solutions(feats[:m, :nf] * scale, y[:m], ridges)
                w = (a[..., 0] @ z[:nf]) * scale                 # (R, M)
                test[n_i, f_i, :, s_i] = _test_error(w, w_star, lam_t, noise_var).cpu().numpy()
                train[n_i, f_i, :, s_i] = tr.cpu().numpy()
    return _dataset(test, train, ("n", "n_features", "ridge", "seed"),
                    _coords(n=n_arr, n_features=f_arr, ridge=r_arr, seed=np.asarray(seeds)),
                    _SOURCE_RF, dict(noise_var=noise_var, n_modes=lam.size))


def simulate_rf_infinite_data(
    eigenvalues: Any,
    target_power: Any = None,
    n_features: Sequence[int] = (10, 30, 100),
    noise_var: float = 0.0,
    seeds: Sequence[int] = (0, 1, 2, 3),
    multiplicity: Any = None,
    device: str | torch.device | None = None,
) -> xr.Dataset:
    """Random-feature regression with infinite data: the best predictor in the features' span.

    With ``n → ∞`` (any fixed ridge) the weights minimise the population error,
    ``w = Zᵀ(ZΛZᵀ)⁺ZΛw*`` (``Λ = diag λ``), whose test error ``Σ λ_i (w_i − w*_i)² + σ²`` is
    exact.  The features ``Z`` of a seed are those :func:`simulate_rf` uses with the same seed,
    so ``simulate_rf(...) − simulate_rf_infinite_data(...)`` is a paired, low-noise estimate of
    the variance-limited excess ``L(n) − L(∞)`` (Bahri et al. 2021).

    Returns
    -------
    xarray.Dataset
        ``test_error`` and ``train_error`` (equal here) over (``n_features``, ``seed``).
    """
    lam, v2 = _expand(eigenvalues, target_power, multiplicity)
    f_arr = _grid(n_features, "n_features", integer=True)
    device = torch.device(device or "cpu")
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=device)
    w_star = torch.as_tensor(np.sqrt(v2 / lam), dtype=torch.float64, device=device)
    test = np.empty((f_arr.size, len(seeds)))
    for s_i, seed in enumerate(seeds):
        z_all = _features(lam.size, int(f_arr.max()), seed, device)
        for f_i, nf in enumerate(f_arr):
            z = z_all[:nf]
            coef = _solve_all_ridges((z * lam_t) @ z.T, ((z * lam_t) @ w_star)[:, None],
                                     torch.zeros(1, dtype=torch.float64, device=device))
            w = (coef[0, :, 0] @ z)[None]
            test[f_i, s_i] = _test_error(w, w_star, lam_t, noise_var).item()
    return _dataset(test, test.copy(), ("n_features", "seed"),
                    _coords(n_features=f_arr, seed=np.asarray(seeds)),
                    "traindyn recipe kernel_regression.simulate_rf_infinite_data",
                    dict(noise_var=noise_var, n_modes=lam.size))


def _dataset(test, train, dims, coords, source, params, note=None) -> xr.Dataset:
    return xr.Dataset(
        {
            "test_error": (dims, test, records.variable_attrs(
                "test_error", long_name=note or "test mean squared error (noisy labels, "
                "includes σ²)")),
            "train_error": (dims, train, records.variable_attrs(
                "train_error", long_name="training mean squared error (noisy labels)")),
        },
        coords=coords,
        attrs={"kind": "measurement", "source": source,
               "parameters": records.params_attr(params)},
    )


def digits_kernel(
    kernel: str = "rbf", bandwidth: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix and centred one-hot targets of scikit-learn's digits (all 1797 images).

    Inputs are standardised per pixel (constant pixels dropped).  ``kernel``: ``"rbf"``,
    ``exp(−‖x−x'‖²/(2ℓ²d))`` with ``ℓ = bandwidth`` (default 1) and ``d`` the input dimension,
    or ``"laplace"``, ``exp(−‖x−x'‖/(ℓ√d))``.  Targets: one-hot labels minus their mean (10
    columns), so a zero predictor has the error of the class proportions.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(float)
    x = x[:, x.std(0) > 0]
    x = (x - x.mean(0)) / x.std(0)
    d = x.shape[1]
    ell = 1.0 if bandwidth is None else float(bandwidth)
    sq = (x**2).sum(1)
    dist2 = np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)
    if kernel == "rbf":
        gram = np.exp(-dist2 / (2 * ell**2 * d))
    elif kernel == "laplace":
        gram = np.exp(-np.sqrt(dist2) / (ell * np.sqrt(d)))
    else:
        raise ValueError(f"unknown kernel {kernel!r}; use 'rbf' or 'laplace', or pass a Gram "
                         f"matrix to simulate_digits_krr")
    onehot = np.eye(10)[data.target]
    return gram, onehot - onehot.mean(0)


def simulate_digits_krr(
    n: Sequence[int] = (10, 30, 100, 300),
    ridge: Sequence[float] = (0.0,),
    seeds: Sequence[int] = (0, 1, 2, 3),
    gram: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    replace: bool = False,
    device: str | torch.device | None = None,
) -> xr.Dataset:
    """Kernel ridge regression on the digits population with a given (or RBF) kernel.

    ``n`` distinct training points are drawn at random from the ``P`` points of ``gram`` (i.i.d.
    with replacement when ``replace``; the default, without, agrees better with the theory:
    repeated points are not the Gaussian-like features the theory assumes); the test error is
    the mean squared error of ``K(:, S)[K(S, S) + δI]⁺ y_S`` over all ``P`` points and all
    target columns.  Draws are
    nested along ``n`` within a seed.  Pass ``gram`` and ``targets`` for another kernel (e.g.
    an empirical NTK of the digits inputs); default :func:`digits_kernel`.

    Returns
    -------
    xarray.Dataset
        ``test_error`` and ``train_error`` (no label noise) over (``n``, ``ridge``, ``seed``).
    """
    if gram is None:
        gram, default_targets = digits_kernel()
        targets = default_targets if targets is None else targets
    if targets is None:
        raise ValueError("targets are needed with a custom gram matrix")
    gram_np = np.asarray(gram, dtype=float)
    y_np = np.asarray(targets, dtype=float)
    y_np = y_np[:, None] if y_np.ndim == 1 else y_np
    p = gram_np.shape[0]
    if gram_np.shape != (p, p) or y_np.shape[0] != p:
        raise ValueError(f"gram must be (P, P) and targets (P, …); got {gram_np.shape}, "
                         f"{y_np.shape}")
    n_arr, r_arr = _grid(n, "n", integer=True), _grid(ridge, "ridge")
    if not replace and n_arr.max() > p:
        raise ValueError(f"n = {n_arr.max()} exceeds the {p} points available without replacement")
    device = torch.device(device or "cpu")
    K = torch.as_tensor(gram_np, dtype=torch.float64, device=device)
    Y = torch.as_tensor(y_np, dtype=torch.float64, device=device)
    ridges = torch.as_tensor(r_arr, dtype=torch.float64, device=device)
    test = np.empty((n_arr.size, r_arr.size, len(seeds)))
    train = np.empty_like(test)
    for s_i, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        idx_all = (rng.integers(0, p, int(n_arr.max())) if replace
                   else rng.permutation(p)[: int(n_arr.max())])
        for n_i, m in enumerate(n_arr):
            idx = torch.as_tensor(idx_all[:m], device=device)
            alpha = _solve_all_ridges(K[idx][:, idx], Y[idx], ridges)      # (R, m, C)
            pred = torch.matmul(K[:, idx], alpha)                           # (R, P, C)
            test[n_i, :, s_i] = ((pred - Y[None]) ** 2).mean(dim=(1, 2)).cpu().numpy()
            train[n_i, :, s_i] = ((pred[:, idx] - Y[idx][None]) ** 2).mean(
                dim=(1, 2)).cpu().numpy()
    return _dataset(test, train, ("n", "ridge", "seed"),
                    _coords(n=n_arr, ridge=r_arr, seed=np.asarray(seeds)), _SOURCE_DIGITS,
                    dict(P=p, n_outputs=y_np.shape[1], replace=replace),
                    note="test mean squared error over the whole dataset (mean over outputs)")
