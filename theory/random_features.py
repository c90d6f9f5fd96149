r"""Test and training risk of random-feature ridge regression, and its optimal ridge.

Simon, Karkada, Ghosh & Belkin, "More is Better in Modern Machine Learning: when Infinite
Overparameterization is Optimal and Overfitting is Obligatory" (ICLR 2024, arXiv:2311.14646),
Sec. 4 (the eigenframework for random-feature regression) and Sec. 5 (power-law tasks).

Setup.  A kernel ``K = Σ_i λ_i φ_i φ_i`` and ``N_f`` random features ``g_j(x)`` whose feature
kernel ``(1/N_f) Σ_j g_j(x) g_j(x')`` averages to ``K``; ridge regression with ridge ``δ`` on
``n`` samples: ``f̂(x) = g(x)ᵀ(GᵀG + δI)⁻¹Gᵀy``, ``G_{μj} = g_j(x_μ)/√N_f``.  Two effective
regularisations ``κ, γ ≥ 0`` solve

.. math::
    n = \sum_i L_i + \frac{\delta}{\kappa}, \qquad
    N_f = \sum_i L_i + \frac{N_f\,\kappa}{\gamma}, \qquad L_i = \frac{\lambda_i}{\lambda_i+\gamma}.

With ``z = Σ L_i`` and ``q = Σ L_i²``

.. math::
    E_0 = \frac{n}{n - q - \frac{(z-q)^2}{N_f - q}},\qquad
    \mathcal E_{te} = E_0\Big[\sum_i (1-L_i)\Big(1 - \frac{N_f - z}{N_f - q}L_i\Big)v_i^2
                      + \sigma^2\Big],\qquad
    \mathcal E_{tr} = \Big(\frac{\delta}{n\kappa}\Big)^2\mathcal E_{te}.

As ``N_f → ∞``, ``γ → κ`` and these reduce to kernel ridge regression
(:mod:`theory.kernels`).  At zero ridge ``γ`` solves ``z(γ) = min(n, N_f)`` and the risk diverges
at ``N_f = n`` (double descent).  ``𝓔_te`` includes the label noise ``σ²``.

Solution used here: eliminating ``κ = γ(N_f − z)/N_f`` leaves one equation in ``γ``,
``z(γ) + δN_f/(γ(N_f − z(γ))) = n``, whose left side decreases strictly on ``z(γ) < N_f``; it is
solved in ``log γ`` by safeguarded Newton (``dz/d log γ = −(z − q)``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory import _backend
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import count, float_array, nonnegative_scalar, positive_scalar
from traindyn.theory.kernels import (
    CURVE_ATTRS,
    Spectrum,
    as_spectrum,
    broadcast_grid,
    check_spectrum,
    grid_coord,
    krr_errors,
    root_decreasing,
    solve_kappa,
    spectrum_sums,
)

__all__ = [
    "optimal_ridge",
    "power_law_optimal_fitting_ratio",
    "rf_errors",
    "rf_learning_curve",
]

SOURCE = (
    "Simon, Karkada, Ghosh & Belkin (2023), More is Better in Modern Machine Learning, "
    "arXiv:2311.14646, Sec. 4"
)


def _solve_gamma(spec: Spectrum, n: np.ndarray, nf: np.ndarray, ridge: np.ndarray,
                 device: Any = None) -> np.ndarray:
    """``γ`` for finite ``N_f`` (flat arrays; ``n`` may be ``inf``); on a jax ``device`` if
    given."""
    gamma = np.zeros(n.size)
    small = np.minimum(n, nf)
    jx = dict(backend="jax" if device is not None else None, device=device)
    # zero ridge, or infinite data: z(γ) = min(n, N_f)   (δ/κ = n − z or κ = 0)
    direct = (ridge == 0) | np.isinf(n)
    if np.any(direct):
        gamma[direct] = solve_kappa(spec, np.where(ridge[direct] == 0, small[direct],
                                                   nf[direct]), 0.0, **jx)
    idx = np.flatnonzero(~direct)
    if idx.size == 0 or spec.trace == 0:
        return gamma
    n_i, nf_i, d_i = n[idx], nf[idx], ridge[idx]
    g_nf = solve_kappa(spec, nf_i, 0.0, **jx)  # z(γ_N) = N_f: the left end of the domain
    with np.errstate(divide="ignore"):
        lo = np.maximum(np.log(g_nf), np.log(d_i / n_i))
    hi = np.log(np.maximum(4 * spec.trace / np.minimum(n_i, nf_i), 3 * d_i / n_i))

    def evaluate(t, sub):
        g = np.exp(t)
        z, q = spec.sums(g)
        nf_s, d_s, n_s = nf_i[sub], d_i[sub], n_i[sub]
        gap = nf_s - z
        ok = gap > 0
        safe = np.where(ok, gap, 1.0)
        extra = d_s * nf_s / (g * safe)
        total = z + extra
        f = np.where(ok, np.log(total / n_s), np.inf)
        df = (-(z - q) - d_s * nf_s * (nf_s - q) / (g * safe**2)) / total
        return f, np.where(ok, df, np.nan)

    if device is not None:
        gamma[idx] = _backend.solve_gamma(spec, n_i, nf_i, d_i, lo, hi, 1e-12, device)
    else:
        gamma[idx] = np.exp(root_decreasing(evaluate, lo, hi))
    return gamma


def rf_errors(
    spectrum: Spectrum, n: Any, n_features: Any, ridge: Any, noise_var: float = 0.0,
    backend: str | None = None, device: Any = None,
) -> dict[str, np.ndarray]:
    """Random-feature predictions at broadcast arrays ``n``, ``n_features``, ``ridge``.

    ``n`` or ``n_features`` may be ``inf`` (infinite data; kernel regression).  Returns a dict of
    arrays of the broadcast shape: ``gamma``, ``kappa``, ``overfitting_coefficient``,
    ``test_error`` (includes ``σ²``), ``excess_test_error``, ``train_error``,
    ``learnability_sum``.  See the module docstring for the equations.  ``backend="jax"`` /
    ``device``: the root solves and the sums over modes run on that jax device (a fixed number
    of dispatches per call, none per iteration), as in
    :func:`theory.kernels.krr_learning_curve`.
    """
    spectrum = check_spectrum(spectrum)
    dev = _backend.resolve(backend, device)
    noise_var = nonnegative_scalar(noise_var, "noise_var")
    n, nf, ridge = broadcast_grid(n=float_array(n, "n"), n_features=float_array(n_features,
                                                                            "n_features"),
                              ridge=float_array(ridge, "ridge"))
    shape = n.shape
    n, nf, ridge = n.ravel(), nf.ravel(), ridge.ravel()
    if np.any(np.isnan(n)) or np.any(n <= 0) or np.any(np.isnan(nf)) or np.any(nf <= 0):
        raise ValueError("n and n_features must be positive (inf allowed)")
    if np.any(ridge < 0) or np.any(~np.isfinite(ridge)):
        raise ValueError("ridge must be non-negative and finite")
    spec = spectrum
    out = {k: np.empty(n.size) for k in ("gamma", "kappa", "overfitting_coefficient",
                                          "test_error", "train_error", "learnability_sum")}
    kernel = np.isinf(nf) & np.isfinite(n)
    if np.any(kernel):
        k = krr_errors(spec, n[kernel], ridge[kernel], noise_var, dev)
        for key in out:
            out[key][kernel] = k["kappa"] if key == "gamma" else k[key]
    both = np.isinf(nf) & np.isinf(n)
    if np.any(both):  # infinite data and features: everything with λ_i > 0 is learnt
        bias = spectrum_sums(spec, np.zeros(both.sum()), dev, bias=True)[2]
        out["gamma"][both] = out["kappa"][both] = 0.0
        out["overfitting_coefficient"][both] = 1.0
        out["test_error"][both] = out["train_error"][both] = bias + noise_var
        out["learnability_sum"][both] = spec.n_positive
    rest = np.flatnonzero(np.isfinite(nf))
    if rest.size:
        n_r, nf_r, d_r = n[rest], nf[rest], ridge[rest]
        gamma = _solve_gamma(spec, n_r, nf_r, d_r, dev)
        z, q, _ = spectrum_sums(spec, gamma, dev)
        n_minus_q = nf_r - q
        ok = n_minus_q > 0
        c = np.where(ok, (nf_r - z) / np.where(ok, n_minus_q, 1.0), 1.0)
        bias = spectrum_sums(spec, gamma, dev, factor=c, bias=True)[2]
        cross = np.where(ok, (z - q) ** 2 / np.where(ok, n_minus_q, 1.0), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = n_r - q - cross
            # the interpolation threshold n = N_f < rank, exactly (round-off would leave ~1e-13)
            denom = np.where((d_r == 0) & (n_r == nf_r) & (n_r < spec.n_positive), 0.0, denom)
            e0 = np.where(np.isinf(n_r), 1.0,
                          np.where(denom > 0, n_r / np.where(denom > 0, denom, 1.0), np.inf))
            test = e0 * (bias + noise_var)
            # κ from whichever exact relation is better conditioned at the root: γ(N_f − z)/N_f
            # cancels when z ≈ N_f (n ≫ N_f), δ/(n − z) when z ≈ n (or δ = 0)
            # (at δ = 0 or n = ∞ the root has z = min(n, N_f) exactly: use it, not its
            # round-off, so that κ = 0 comes out exactly 0 where it is)
            z_root = np.where((d_r == 0) | np.isinf(n_r), np.minimum(n_r, nf_r), z)
            via_gamma = gamma * np.clip(nf_r - z_root, 0, None) / nf_r
            via_ridge = d_r / np.where(n_r - z > 0, n_r - z, np.nan)
            use_ridge = ((d_r > 0) & np.isfinite(n_r) & (n_r - z > 0)
                         & ((n_r - z) / n_r > (nf_r - z) / nf_r))
            kappa = np.where(use_ridge, via_ridge, via_gamma)
            factor = np.where(np.isinf(n_r), 1.0,
                              np.where(d_r > 0, d_r / (n_r * np.where(kappa > 0, kappa, 1.0)),
                                       1 - np.minimum(np.minimum(n_r, nf_r), spec.n_positive)
                                       / n_r))
            train = np.where(factor == 0, 0.0, factor**2 * test)
        out["gamma"][rest] = gamma
        out["kappa"][rest] = kappa
        out["overfitting_coefficient"][rest] = e0
        out["test_error"][rest] = test
        out["train_error"][rest] = train
        out["learnability_sum"][rest] = z
    with np.errstate(invalid="ignore"):
        out["excess_test_error"] = out["test_error"] - noise_var
    return {k: v.reshape(shape) for k, v in out.items()}


def _grid_dataset(values: dict, coords: dict, dims: tuple, attrs: dict) -> xr.Dataset:
    return xr.Dataset({k: (dims, v, CURVE_ATTRS.get(k, {"long_name": k.replace("_", " "),
                                                     "units": "1"}))
                       for k, v in values.items()}, coords=coords, attrs=attrs)


def rf_learning_curve(
    eigenvalues: Any,
    target_power: Any = None,
    n: Any = (10, 30, 100, 300),
    n_features: Any = np.inf,
    ridge: Any = 0.0,
    noise_var: float = 0.0,
    multiplicity: Any = None,
    n_modes_out: int = 50,
    backend: str | None = None,
    device: Any = None,
) -> xr.Dataset:
    r"""Random-feature ridge regression risk over a grid of ``n``, ``n_features`` and ridge.

    Equations in the module docstring (Simon, Karkada, Ghosh & Belkin 2023, Sec. 4).

    Parameters
    ----------
    eigenvalues, target_power, multiplicity
        The kernel spectrum and ``v_i²`` per eigenfunction, as in
        :func:`theory.kernels.krr_learning_curve` (or a :class:`~theory.kernels.Spectrum`).
    n, n_features : float or array
        Samples and features; ``inf`` is allowed in both (``n_features = inf`` is kernel ridge
        regression, ``n = inf`` the infinite-data limit).
    ridge : float or array
        ``δ ≥ 0``.
    noise_var : float
        ``σ²``; ``test_error`` includes it, ``excess_test_error`` does not.
    n_modes_out : int
        ``learnability`` ``L_i = λ_i/(λ_i+γ)`` is returned for the largest ``n_modes_out``
        eigenvalues.
    backend, device
        ``backend="jax"`` (or a ``device``) runs the root solves and sums over modes on a jax
        device in float64, as :func:`theory.kernels.krr_learning_curve`; default numpy.

    Returns
    -------
    xarray.Dataset
        ``test_error``, ``excess_test_error``, ``train_error``, ``kappa``, ``gamma``,
        ``overfitting_coefficient``, ``learnability_sum`` over (``n``, ``n_features``, ``ridge``)
        and ``learnability`` over those and ``mode``; scalar arguments give no dimension.
    """
    spec = as_spectrum(eigenvalues, target_power, multiplicity)
    dev = _backend.resolve(backend, device)
    noise_var = nonnegative_scalar(noise_var, "noise_var")
    n_modes_out = count(n_modes_out, "n_modes_out")
    axes = [np.atleast_1d(float_array(a, name)) for a, name in
            ((n, "n"), (n_features, "n_features"), (ridge, "ridge"))]
    for a, name in zip(axes, ("n", "n_features", "ridge"), strict=True):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name} must be a scalar or a non-empty 1-D array")
    grid = np.meshgrid(*axes, indexing="ij")
    out = rf_errors(spec, *grid, noise_var=float(noise_var),
                    backend="jax" if dev is not None else None, device=dev)
    if np.any(np.isinf(out["test_error"])):
        warnings.warn("test error diverges (zero ridge at n = n_features, or n equal to the "
                      "number of modes): returned as inf", RuntimeWarning, stacklevel=2)
    coords = {
        "n": grid_coord("n", axes[0], "number of training samples"),
        "n_features": grid_coord("n_features", axes[1], "number of random features"),
        "ridge": grid_coord("ridge", axes[2], "ridge regularisation δ"),
    }
    ds = _grid_dataset(out, coords, ("n", "n_features", "ridge"),
                       theory_attrs(SOURCE, dict(noise_var=noise_var,
                                                 n_modes=spec.eigenvalues.size),
                                    noise="test_error includes the label-noise variance σ²"))
    k = min(int(n_modes_out), spec.eigenvalues.size)
    L = spec.learnabilities(out["gamma"].ravel())[:, :k].reshape(*grid[0].shape, k)
    ds["learnability"] = (("n", "n_features", "ridge", "mode"), L, CURVE_ATTRS["learnability"])
    ds = ds.assign_coords(
        mode=grid_coord("mode", np.arange(k), "kernel eigenmode index (descending λ)"),
        eigenvalue=("mode", spec.eigenvalues[:k], {"long_name": "kernel eigenvalue λ_i",
                                                   "units": "1"}))
    squeeze = [d for d, v in (("n", n), ("n_features", n_features), ("ridge", ridge))
               if np.ndim(v) == 0]
    return ds.squeeze(squeeze) if squeeze else ds


def optimal_ridge(
    eigenvalues: Any,
    target_power: Any = None,
    n: Any = (10, 30, 100, 300),
    n_features: Any = np.inf,
    noise_var: float = 0.0,
    multiplicity: Any = None,
    ridge_grid: Any = None,
    tol: float = 1e-4,
    backend: str | None = None,
    device: Any = None,
) -> xr.Dataset:
    r"""The ridge ``δ* = argmin_{δ≥0} 𝓔_te`` and the risk there, over ``n`` and ``n_features``.

    Simon, Karkada, Ghosh & Belkin (2023), Sec. 4: at ``δ*`` the risk decreases monotonically in
    both ``n`` and ``N_f`` ("more is better"); the fitting ratio ``𝓔_tr/𝓔_te`` at ``δ*`` says how
    much one must overfit (Sec. 5).  The minimum is located on ``ridge_grid`` (default: 0 and 61
    log-spaced values from 10⁻¹⁰ to 10³ times ``Σ m_i λ_i``), then refined by golden-section
    search in ``log δ`` between the neighbours of the best grid point to relative ``tol``.
    ``backend="jax"`` / ``device``: every risk evaluation runs on that jax device (see
    :func:`rf_errors`; the golden-section loop itself stays on the host).

    Returns
    -------
    xarray.Dataset
        ``optimal_ridge``, ``test_error``, ``train_error``, ``excess_test_error`` and
        ``fitting_ratio`` (``train_error / test_error``) over (``n``, ``n_features``).
    """
    spec = as_spectrum(eigenvalues, target_power, multiplicity)
    dev = _backend.resolve(backend, device)
    jx = dict(backend="jax" if dev is not None else None, device=dev)
    noise_var = nonnegative_scalar(noise_var, "noise_var")
    tol = positive_scalar(tol, "tol")
    n_arr = np.atleast_1d(float_array(n, "n"))
    nf_arr = np.atleast_1d(float_array(n_features, "n_features"))
    for a, name in ((n_arr, "n"), (nf_arr, "n_features")):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name} must be a scalar or a non-empty 1-D array")
    nn, ff = (g.ravel() for g in np.meshgrid(n_arr, nf_arr, indexing="ij"))
    if ridge_grid is None:
        ridge_grid = np.concatenate([[0.0], np.logspace(-10, 3, 61) * max(spec.trace, 1e-300)])
    grid = np.unique(float_array(ridge_grid, "ridge_grid").ravel())
    if grid.size == 0 or not np.all(np.isfinite(grid)) or grid[0] < 0:
        raise ValueError("ridge_grid must be a non-empty array of finite ridges δ ≥ 0")
    risk = rf_errors(spec, nn[:, None], ff[:, None], grid[None, :], noise_var,
                     **jx)["test_error"]
    best = np.nanargmin(np.where(np.isfinite(risk), risk, np.inf), axis=1)
    lo_i, hi_i = np.clip(best - 1, 0, grid.size - 1), np.clip(best + 1, 0, grid.size - 1)
    positive = grid[grid > 0].min() if np.any(grid > 0) else 1.0
    a = np.log(np.maximum(grid[lo_i], positive * 1e-3))
    b = np.log(np.maximum(grid[hi_i], positive * 1e-3))
    # golden section on the bracket [a, b] in log δ (the grid minimum lies inside)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)

    def f(t):
        return rf_errors(spec, nn, ff, np.exp(t), noise_var, **jx)["test_error"]

    fc, fd = f(c), f(d)
    for _ in range(200):
        if np.all(b - a <= tol):
            break
        left = fc < fd
        b, a = np.where(left, d, b), np.where(left, a, c)
        d_new = np.where(left, c, a + ratio * (b - a))
        c_new = np.where(left, b - ratio * (b - a), d)
        fd_new, fc_new = np.where(left, fc, np.nan), np.where(left, np.nan, fd)
        c, d = c_new, d_new
        need_c, need_d = np.isnan(fc_new), np.isnan(fd_new)
        fc = np.where(need_c, f(c), fc_new) if need_c.any() else fc_new
        fd = np.where(need_d, f(d), fd_new) if need_d.any() else fd_new
    refined = np.exp(0.5 * (a + b))
    at_grid = risk[np.arange(nn.size), best]
    res = rf_errors(spec, nn, ff, refined, noise_var, **jx)
    use_grid = ~(res["test_error"] <= at_grid)
    delta = np.where(use_grid, grid[best], refined)
    res = rf_errors(spec, nn, ff, delta, noise_var, **jx)
    shape = (n_arr.size, nf_arr.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_ft = res["train_error"] / res["test_error"]
    values = {
        "optimal_ridge": delta.reshape(shape),
        "test_error": res["test_error"].reshape(shape),
        "excess_test_error": res["excess_test_error"].reshape(shape),
        "train_error": res["train_error"].reshape(shape),
        "fitting_ratio": ratio_ft.reshape(shape),
    }
    coords = {"n": grid_coord("n", n_arr, "number of training samples"),
              "n_features": grid_coord("n_features", nf_arr, "number of random features")}
    ds = _grid_dataset(values, coords, ("n", "n_features"),
                       theory_attrs(SOURCE, dict(noise_var=noise_var, tol=tol),
                                    noise="test_error includes the label-noise variance σ²"))
    ds["optimal_ridge"].attrs.update(long_name="test-risk-minimising ridge δ*")
    ds["fitting_ratio"].attrs.update(long_name="fitting ratio train_error/test_error at δ*")
    squeeze = [dm for dm, v in (("n", n), ("n_features", n_features)) if np.ndim(v) == 0]
    return ds.squeeze(squeeze) if squeeze else ds


def power_law_optimal_fitting_ratio(a: Any, b: Any) -> np.ndarray:
    r"""Fitting ratio ``𝓔_tr/𝓔_te`` at the optimal ridge for the noiseless power-law task.

    Task ``λ_i = i^{−a}``, ``v_i² = i^{−b}`` (Simon, Karkada, Ghosh & Belkin 2023, Sec. 5),
    kernel regression (``N_f = ∞``), ``n → ∞``, ``σ² = 0``, ``a > 1``, ``1 < b < 2a + 1``.
    Replacing the sums by integrals, ``z = Σ L_i ≈ C κ^{−1/a}``, ``q ≈ (1 − 1/a) z`` and
    ``Σ(1−L_i)²v_i² ∝ κ^{(b−1)/a}``; writing ``x = z/n`` (so ``δ/(nκ) = 1 − x``),

    .. math:: \mathcal E_{te} \propto \frac{x^{-(b-1)}}{1 - (1 - 1/a)x},

    minimised at ``x* = a(b−1)/(b(a−1))``.  For ``b < a`` this is below 1 (positive optimal
    ridge) and the fitting ratio is ``(1 − x*)²``:

    .. math:: \frac{\mathcal E_{tr}}{\mathcal E_{te}}\Big|_{\delta^*}
              = \Big(\frac{a-b}{b\,(a-1)}\Big)^2 ,

    independent of ``n``; for ``b ≥ a`` the optimum is at ``δ ≤ 0`` and, with ``δ ≥ 0``, the
    best fit interpolates (ratio 0).  This derivation is traindyn's, in the continuum limit of
    the eigenframework as in the paper's Sec. 5; :func:`optimal_ridge` gives the exact value at
    finite ``n`` and with noise (with noise ``σ² > 0`` fixed the ratio tends to 1 as
    ``n → ∞``).
    """
    a, b = float_array(a, "a"), float_array(b, "b")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("a and b must be finite")
    try:
        a, b = np.broadcast_arrays(a, b)
    except ValueError:
        raise ValueError(f"a and b do not broadcast: shapes {a.shape}, {b.shape}") from None
    if np.any(a <= 1) or np.any(b <= 1) or np.any(b >= 2 * a + 1):
        raise ValueError("needs a > 1 and 1 < b < 2a + 1 (a normalisable target and a "
                         "convergent bias integral)")
    return np.where(b < a, ((a - b) / (b * (a - 1))) ** 2, 0.0)
