r"""Scaling regimes of the test loss in data and in model size, and an exponent fitter.

Bahri, Dyer, Kaplan, Lee & Sharma, "Explaining neural scaling laws" (arXiv:2102.06701, 2021;
PNAS 2024), Sec. 2–3.  Four regimes, all produced by the random-feature risk of
:mod:`theory.random_features` swept over ``n`` (data, their ``D``) and ``N_f`` (features, their
``P``):

* variance-limited in ``n`` (``N_f`` fixed, ``n → ∞``):  ``L(n) − L(∞) ∝ 1/n``;
* variance-limited in ``N_f`` (``n`` fixed, ``N_f → ∞``): ``L(N_f) − L(∞) ∝ 1/N_f``;
* resolution-limited in ``n`` (``N_f = ∞``): ``L ∝ n^{−α}``;
* resolution-limited in ``N_f`` (``n = ∞``): ``L ∝ N_f^{−α}``.

For a spectrum ``λ_i ∝ i^{−(1+α_K)}`` and a generic teacher (``v_i² ∝ λ_i``) both
resolution-limited exponents equal ``α_K`` (Bahri et al. 2021, Sec. 3, "duality").  For the
general power-law task ``λ_i = i^{−a}``, ``v_i² = i^{−b}`` (noiseless, ridgeless), the continuum
limit of the eigenframework gives ``min(b − 1, 2a)`` in ``n`` (kernel regression: bias
``Σ(1−L_i)²v_i² ∝ κ^{(b−1)/a}`` while ``b < 2a + 1``, else ``∝ κ²``; ``κ ∝ n^{−a}``) and
``min(b − 1, a)`` in ``N_f`` (infinite data: ``Σ(1−L_i)v_i²`` with ``z(γ) = N_f``); these
coincide with ``α_K`` for ``b = a = 1 + α_K``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats
from traindyn.theory import _backend
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import (
    count,
    finite_scalar,
    float_array,
    nonnegative_scalar,
    positive_scalar,
    real_scalar,
)
from traindyn.theory.kernels import as_spectrum, grid_coord
from traindyn.theory.random_features import rf_errors

__all__ = ["fit_power_law", "predicted_exponents", "scaling_regimes"]

SOURCE = ("Bahri, Dyer, Kaplan, Lee & Sharma (2021), Explaining neural scaling laws, "
          "arXiv:2102.06701, Sec. 2-3")

def predicted_exponents(a: float, b: float | None = None) -> dict[str, float]:
    r"""Predicted exponents of the four regimes for ``λ_i = i^{−a}``, ``v_i² = i^{−b}``.

    Variance-limited: 1 (Bahri et al. 2021, Sec. 2).  Resolution-limited, noiseless and
    ridgeless: ``min(b−1, 2a)`` in ``n`` and ``min(b−1, a)`` in ``N_f`` (module docstring);
    ``b`` defaults to ``a`` (the generic teacher), giving ``α_K = a − 1`` for both.
    """
    a = finite_scalar(a, "a")
    b = a if b is None else finite_scalar(b, "b")
    if a <= 1 or b <= 1:
        raise ValueError("needs a > 1 (trace-class kernel) and b > 1 (square-summable target)")
    return {
        "variance_limited_n": 1.0,
        "variance_limited_features": 1.0,
        "resolution_limited_n": float(min(b - 1, 2 * a)),
        "resolution_limited_features": float(min(b - 1, a)),
    }


def scaling_regimes(
    eigenvalues: Any,
    target_power: Any = None,
    n: Any = (1e3, 3e3, 1e4, 3e4, 1e5),
    n_features: Any = (1e3, 3e3, 1e4, 3e4, 1e5),
    n_fixed: float = 100.0,
    n_features_fixed: float = 100.0,
    ridge: float = 0.0,
    noise_var: float = 0.0,
    multiplicity: Any = None,
    backend: str | None = None,
    device: Any = None,
) -> xr.Dataset:
    r"""The four scaling regimes of Bahri et al. (2021) from the random-feature risk.

    ``backend="jax"`` (or a ``device``) evaluates the risks on a jax device in float64
    (:func:`theory.random_features.rf_errors`); default numpy.

    Returns
    -------
    xarray.Dataset
        ``variance_limited_n``: ``𝓔(n; N_f = n_features_fixed) − 𝓔(∞; n_features_fixed)`` over
        ``n``; ``variance_limited_features``: ``𝓔(N_f; n = n_fixed) − 𝓔(n_fixed; ∞)`` over
        ``n_features``; ``resolution_limited_n``: ``𝓔(n; N_f = ∞) − σ²`` over ``n``;
        ``resolution_limited_features``: ``𝓔(n = ∞; N_f) − σ²`` over ``n_features``.  ``𝓔`` is
        the test error of :func:`theory.random_features.rf_errors` at ``ridge`` and
        ``noise_var``.  Each variable's attrs carry its ``regime``.  The grids should sit where
        the regime holds: ``n ≫ n_features_fixed`` and ``n_features ≫ n_fixed`` for the
        variance-limited ones, and well below the number of modes for the resolution-limited
        ones (a truncated spectrum stops improving there).
    """
    spec = as_spectrum(eigenvalues, target_power, multiplicity)
    dev = _backend.resolve(backend, device)
    n_arr = np.atleast_1d(float_array(n, "n"))
    f_arr = np.atleast_1d(float_array(n_features, "n_features"))
    for a, name in ((n_arr, "n"), (f_arr, "n_features")):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name} must be a scalar or a non-empty 1-D array")
        if np.any(np.isnan(a)) or np.any(a <= 0):
            raise ValueError(f"{name} must be positive (inf allowed)")
    n_fixed = positive_scalar(n_fixed, "n_fixed")
    n_features_fixed = positive_scalar(n_features_fixed, "n_features_fixed")
    ridge = nonnegative_scalar(ridge, "ridge")
    noise_var = nonnegative_scalar(noise_var, "noise_var")
    inf = np.inf

    def risk(nn, ff):
        return rf_errors(spec, nn, ff, ridge, noise_var,
                         backend="jax" if dev is not None else None, device=dev)["test_error"]

    var_n = risk(n_arr, n_features_fixed) - risk(inf, n_features_fixed)
    var_f = risk(n_fixed, f_arr) - risk(n_fixed, inf)
    res_n = risk(n_arr, inf) - noise_var
    res_f = risk(inf, f_arr) - noise_var
    long = {
        "variance_limited_n": "test error above its n → ∞ limit at fixed n_features",
        "variance_limited_features": "test error above its n_features → ∞ limit at fixed n",
        "resolution_limited_n": "excess test error of kernel regression (n_features = ∞)",
        "resolution_limited_features": "excess test error with infinite data (n = ∞)",
    }
    data = {
        "variance_limited_n": ("n", var_n),
        "variance_limited_features": ("n_features", var_f),
        "resolution_limited_n": ("n", res_n),
        "resolution_limited_features": ("n_features", res_f),
    }
    ds = xr.Dataset(
        {k: (d, v, {"long_name": long[k], "units": "1", "regime": k}) for k, (d, v) in
         data.items()},
        coords={"n": grid_coord("n", n_arr, "number of training samples"),
                "n_features": grid_coord("n_features", f_arr, "number of random features")},
        attrs=theory_attrs(SOURCE, dict(n_fixed=n_fixed, n_features_fixed=n_features_fixed,
                                        ridge=ridge, noise_var=noise_var)),
    )
    return ds


def _ols(logx: np.ndarray, logy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slopes, intercepts and R² of least squares of each column of ``logy`` on ``logx``."""
    xm = logx.mean()
    dx = logx - xm
    sxx = (dx**2).sum()
    ym = logy.mean(0)
    slope = (dx[:, None] * (logy - ym)).sum(0) / sxx
    intercept = ym - slope * xm
    resid = logy - (intercept + slope * logx[:, None])
    ss_tot = ((logy - ym) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - (resid**2).sum(0) / ss_tot
    return slope, intercept, r2


def fit_power_law(
    x: Any,
    y: Any,
    offset: float = 0.0,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> xr.Dataset:
    r"""Fit ``y − offset = A x^{−p}`` on log–log axes and give a confidence interval for ``p``.

    Parameters
    ----------
    x : array (k,)
        Positive abscissae (``n`` or ``n_features``).
    y : array (k,) or (k, S), or xarray.DataArray
        Measured values; a second axis (or a ``seed`` dim of a DataArray, whose other dim is
        the abscissa) holds independent repetitions.
    offset : float
        Subtracted before the fit (``L(∞)`` for a variance-limited curve).
    level : float
        Confidence level of the interval.
    n_boot : int
        Bootstrap resamples over repetitions (with ``S ≥ 2``).

    Returns
    -------
    xarray.Dataset
        Scalars ``exponent`` (``p``), ``exponent_low``, ``exponent_high``, ``prefactor``
        (``A``) and ``r2`` (of the log–log fit of the mean).

    Notes
    -----
    The point estimate is ordinary least squares of ``log(ȳ − offset)`` on ``log x``, ``ȳ`` the
    mean over repetitions.  With one repetition the interval is the ``t``-interval of the
    slope (``k − 2`` degrees of freedom); with several it is the percentile interval of the
    slope over bootstrap resamples of the repetitions (Efron & Tibshirani 1993, Ch. 13),
    widened to the ``t``-interval when that is wider (curvature the seeds do not show).  Points
    with ``ȳ − offset ≤ 0`` cannot be fitted: they are dropped with a warning.
    """
    if isinstance(y, xr.DataArray):
        if "seed" in y.dims:
            other = [d for d in y.dims if d != "seed"]
            if len(other) != 1:
                raise ValueError(f"y must have one dim besides 'seed'; got {y.dims}")
            y = y.transpose(other[0], "seed").values
        else:
            y = y.values
    x = float_array(x, "x").ravel()
    y = float_array(y, "y")
    y = y[:, None] if y.ndim == 1 else y
    if y.ndim != 2 or y.shape[0] != x.size:
        raise ValueError(f"y must be (k,) or (k, S) with k = len(x) = {x.size}; got {y.shape}")
    if np.any(x <= 0) or not np.all(np.isfinite(x)):
        raise ValueError("x must be positive and finite")
    level = real_scalar(level, "level")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    offset = finite_scalar(offset, "offset")
    n_boot = count(n_boot, "n_boot")
    seed = count(seed, "seed")
    if np.unique(x).size < 2:
        raise ValueError("x must hold at least 2 distinct values for a slope")
    mean = y.mean(1) - offset
    keep = np.isfinite(mean) & (mean > 0)
    if not keep.all():
        warnings.warn(f"{(~keep).sum()} point(s) with y − offset ≤ 0 or non-finite dropped from "
                      "the power-law fit", RuntimeWarning, stacklevel=2)
    if keep.sum() < 3 or np.unique(x[keep]).size < 2:
        raise ValueError("a power-law fit with an interval needs at least 3 usable points of "
                         "y (y − offset > 0 and finite) at 2 or more distinct x")
    lx, yk = np.log(x[keep]), y[keep]
    slope, intercept, r2 = _ols(lx, np.log(mean[keep])[:, None])
    k = lx.size
    resid = np.log(mean[keep]) - (intercept + slope * lx)
    se = np.sqrt((resid**2).sum() / (k - 2) / ((lx - lx.mean()) ** 2).sum()) if k > 2 else np.inf
    tq = stats.t.ppf(0.5 + level / 2, k - 2)
    lo, hi = -slope[0] - tq * se, -slope[0] + tq * se
    method = "t-interval of the OLS slope"
    if y.shape[1] >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, y.shape[1], size=(n_boot, y.shape[1]))
        boot = yk[:, picks].mean(2) - offset                   # (k, n_boot)
        ok = np.all(boot > 0, axis=0)
        if ok.sum() < 0.9 * n_boot:
            warnings.warn("many bootstrap resamples had y − offset ≤ 0; the interval is "
                          "unreliable", RuntimeWarning, stacklevel=2)
        bs, _, _ = _ols(lx, np.log(boot[:, ok]))
        b_lo, b_hi = np.quantile(-bs, [0.5 - level / 2, 0.5 + level / 2])
        lo, hi = min(lo, b_lo), max(hi, b_hi)
        method = "bootstrap over repetitions, widened to the t-interval"
    return xr.Dataset(
        {
            "exponent": ((), -slope[0], {"long_name": "fitted exponent p in y ∝ x^-p",
                                         "units": "1"}),
            "exponent_low": ((), lo, {"long_name": f"lower end of the {level:.0%} interval",
                                      "units": "1"}),
            "exponent_high": ((), hi, {"long_name": f"upper end of the {level:.0%} interval",
                                       "units": "1"}),
            "prefactor": ((), float(np.exp(intercept[0])), {"long_name": "prefactor A",
                                                            "units": "1"}),
            "r2": ((), r2[0], {"long_name": "R² of the log-log fit", "units": "1"}),
        },
        attrs=theory_attrs("power-law fit (ordinary least squares on log-log axes)",
                           dict(offset=offset, level=level, n_boot=n_boot, seed=seed,
                                n_points=int(k)), method=method),
    )
