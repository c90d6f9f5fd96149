r"""Exact inductive bias of a task relative to a hypothesis space.

Boopathy, Yue, Hwang, Iyer & Fiete, "Towards Exact Computation of Inductive Bias" (IJCAI 2024),
Eq. 1 and Sec. 3.  The inductive bias required to reach test error ``ε`` with a hypothesis space
``H`` (and a sampling distribution ``p_h`` on it, restricted to hypotheses that fit the training
data) is

.. math:: I(\varepsilon) = -\log_2 P_{h\sim p_h}\big(e(h) \le \varepsilon\big),

the information needed to pick, out of the hypotheses that fit the training data, one that
generalises to error ``ε``.  ``P`` is far too small to count directly, so the sampled test errors
``e(h_1) … e(h_S)`` are fitted with a scaled non-central χ² distribution (location fixed at 0:
the exact law of a squared error of Gaussian predictions has this shape) and ``I`` is read off its
lower tail.  Where the χ² CDF underflows, the authors' code switches to the normal approximation
of Sankaran (1959); that approximation saturates in the far lower tail (it gives ``P(e ≤ 0) > 0``),
so traindyn's default there is the exact Poisson-mixture series of the CDF summed in log space
(:func:`series_log_cdf`: finite, smooth and exact however small the probability), with Sankaran's
form available as ``tail="sankaran"``.  The fit is maximum likelihood with a log-space density
(:func:`ncx2_logpdf`), because ``scipy.stats.ncx2.logpdf`` underflows for large ``df``.

The authors' code returns nats; traindyn reports **bits** (nats / ln 2) and says so in ``units``.

Hypothesis spaces:

* kernel (GP) / linear-in-parameters spaces: exact samples of the GP posterior conditioned to
  interpolate the training data, by direct linear solves (Cholesky), no iterative fitting;
* networks: one model trained to fit the training data per random initialisation
  (:func:`network_hypothesis_errors`, optionally fanned out over a ``dask.distributed`` Client).

Error: the squared error summed over outputs and averaged over test points,
``e(h) = (1/m) Σ_i ‖h(x_i) − y_i‖²`` (one-hot targets for classification).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from scipy import optimize, special, stats
from traindyn.probes._arrays import STAT_DTYPE, ArrayLike, as_tensor, require_finite

__all__ = [
    "MLPHypothesis",
    "NcxFit",
    "fit_ncx2",
    "gp_posterior_errors",
    "inductive_bias",
    "kernel_hypothesis_errors",
    "linear_kernel",
    "log_cdf_ncx2",
    "ncx2_logpdf",
    "network_hypothesis_errors",
    "rbf_kernel",
    "sankaran_log_cdf",
    "series_log_cdf",
]

SOURCE = ("Boopathy, Yue, Hwang, Iyer & Fiete (2024), Towards Exact Computation of Inductive "
          "Bias, IJCAI, Eq. 1; far tail: log-space Poisson-mixture series of the χ'² CDF")

LN2 = math.log(2.0)
_EXACT_LOG_CDF_FLOOR = -600.0
"""Below this natural-log probability scipy's χ'² CDF is replaced by the far-tail evaluation."""


# --------------------------------------------------------------------------- distribution fit


@dataclass(frozen=True)
class NcxFit:
    """A scaled non-central χ² fit ``e ~ scale · χ'²(df, nc)`` (location 0) and its quality.

    ``ks_statistic`` / ``ks_pvalue``: Kolmogorov–Smirnov test of the sample against the fitted
    law.  The p-value is optimistic because the parameters were fitted to the same sample.
    """

    df: float
    nc: float
    scale: float
    ks_statistic: float
    ks_pvalue: float
    n: int

    def dist(self) -> Any:
        """The fitted law as a frozen ``scipy.stats.ncx2(df, nc, loc=0, scale=scale)``."""
        return stats.ncx2(self.df, self.nc, loc=0, scale=self.scale)

    def log_cdf(self, x: ArrayLike, tail: str = "series") -> np.ndarray:
        """Natural log of ``P(e ≤ x)`` under the fit (see :func:`log_cdf_ncx2`)."""
        return log_cdf_ncx2(x, self.df, self.nc, self.scale, tail=tail)


def _moment_guess(e: np.ndarray) -> tuple[float, float, float]:
    r"""Method-of-moments start for the fit.

    For ``e = s·χ'²(k, λ)``: mean ``s(k+λ)``, variance ``2s²(k+2λ)``, third central moment
    ``8s³(k+3λ)`` (Johnson, Kotz & Balakrishnan 1995, Ch. 29).  Eliminating ``k`` and ``λ``
    gives ``8m s² − 8v s + μ₃ = 0``; the root with ``λ ≥ 0`` is ``s = (v − √(v² − mμ₃/2))/(2m)``.
    Falls back to the central χ² (``s = v/2m``) when the sample skew does not allow ``λ > 0``.
    """
    m, v = float(e.mean()), float(e.var())
    mu3 = float(((e - m) ** 3).mean())
    central = (v / (2 * m), 2 * m * m / v, 0.0)
    disc = v * v - m * mu3 / 2
    if disc <= 0 or mu3 <= 0:
        return central
    s = (v - math.sqrt(disc)) / (2 * m)
    if s <= 0:
        return central
    k_plus_l, k_plus_2l = m / s, v / (2 * s * s)
    lam = k_plus_2l - k_plus_l
    k = k_plus_l - lam
    if k <= 0 or lam < 0:
        return central
    return s, k, lam


def ncx2_logpdf(x: ArrayLike, df: float, nc: float, scale: float = 1.0) -> np.ndarray:
    r"""Log-density of ``scale · χ'²(df, nc)``, as a Poisson mixture summed in log space.

    .. math:: f(x) = \sum_{j\ge0} e^{-\lambda/2}\frac{(\lambda/2)^j}{j!}\,
              f_{\chi^2_{k+2j}}(x)

    (Johnson, Kotz & Balakrishnan 1995, Eq. 29.4), over the window of ``j`` that carries the
    Poisson mass (``λ/2 ± 8√(λ/2)`` and more).  ``scipy.stats.ncx2.logpdf`` underflows to
    ``-inf`` for ``df`` above a few hundred (its density is not computed in log space), which
    breaks ``scipy.stats.ncx2.fit`` exactly where sampled test errors concentrate; this form
    does not.
    """
    xs = np.atleast_1d(np.asarray(x, dtype=float)) / scale
    half = max(float(nc), 0.0) / 2.0
    spread = 8 * math.sqrt(half) + 8
    j = np.arange(max(0, int(half - spread)), int(half + spread) + 1, dtype=float)
    log_pois = (-half + j * math.log(half) - special.gammaln(j + 1) if half > 0
                else np.where(j == 0, 0.0, -np.inf))
    nu = df + 2 * j[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_chi2 = ((nu / 2 - 1) * np.log(xs) - xs / 2 - nu / 2 * math.log(2)
                    - special.gammaln(nu / 2))
    out = special.logsumexp(log_pois[:, None] + log_chi2, axis=0) - math.log(scale)
    out = np.where(xs > 0, out, -np.inf)
    return out.reshape(np.shape(x))


def _fit_ks(e: np.ndarray, df: float, nc: float, scale: float) -> NcxFit:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        ks = stats.kstest(e, stats.ncx2(df, nc, loc=0, scale=scale).cdf)
    return NcxFit(float(df), float(nc), float(scale), float(ks.statistic), float(ks.pvalue),
                  int(e.size))


def _check_errors(errors: ArrayLike) -> np.ndarray:
    e = np.asarray(as_tensor(errors, STAT_DTYPE).cpu().numpy(), dtype=float).ravel()
    if e.size < 3:
        raise ValueError(f"need at least 3 sampled test errors to fit a χ²; got {e.size}")
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("test errors must be finite and non-negative (squared errors)")
    if np.ptp(e) == 0:
        raise ValueError("all sampled test errors are equal; the χ² fit needs a spread")
    return e


def _from_moments(theta: np.ndarray) -> tuple[float, float, float]:
    """``(df, nc, scale)`` from ``θ = (ln mean, ln variance, logit ρ)``, ``ρ = λ/(k+λ)``.

    Mean ``s(k+λ)`` and variance ``2s²(k+2λ)`` are pinned down by the data; only the share
    ``ρ`` of non-centrality is weakly identified, so the likelihood is well conditioned in θ.
    """
    m, v = math.exp(theta[0]), math.exp(theta[1])
    rho = 1 / (1 + math.exp(-theta[2]))
    scale = v / (2 * m * (1 + rho))
    total = m / scale
    return total * (1 - rho), total * rho, scale


def _to_moments(df: float, nc: float, scale: float) -> np.ndarray:
    rho = min(max(nc / (df + nc), 1e-6), 1 - 1e-6)
    mean, var = scale * (df + nc), 2 * scale**2 * (df + 2 * nc)
    return np.array([math.log(mean), math.log(var), math.log(rho / (1 - rho))])


def fit_ncx2(errors: ArrayLike, start: tuple[float, float, float] | None = None) -> NcxFit:
    r"""Maximum-likelihood fit of ``e ~ scale · χ'²(df, nc)`` with location 0.

    The model of the authors' code (``scipy.stats.ncx2.fit(errors, floc=0)``), maximised by
    L-BFGS-B over ``(ln mean, ln variance, logit λ/(k+λ))`` (:func:`_from_moments`; the natural
    parameters trade off along a flat ridge) with the log-space density :func:`ncx2_logpdf`
    (scipy's own density underflows for large ``df``).  Started from the method of moments
    (:func:`_moment_guess`) or from ``start = (df, nc, scale)``.  ``nc ≤ 10³`` (beyond that
    the law is normal to any precision a sample can see).

    Raises
    ------
    ValueError
        If there are fewer than 3 errors, or any is negative or non-finite, or all are equal.
    """
    e = _check_errors(errors)
    if start is None:
        s0, k0, l0 = _moment_guess(e)
    else:
        k0, l0, s0 = start
    theta0 = _to_moments(k0, l0, s0)
    bounds = [(theta0[0] - 5, theta0[0] + 5), (theta0[1] - 10, theta0[1] + 10), (-14.0, 5.0)]

    def nll(theta: np.ndarray) -> float:
        k, lam, sc = _from_moments(theta)
        if k < 1e-3 or lam > 1e3:
            return 1e300
        value = -float(ncx2_logpdf(e, k, lam, sc).sum())
        return value if np.isfinite(value) else 1e300

    with np.errstate(all="ignore"):
        res = optimize.minimize(nll, theta0, method="L-BFGS-B", bounds=bounds,
                                options={"maxiter": 200})
    theta = res.x if res.fun <= nll(theta0) else theta0
    return _fit_ks(e, *_from_moments(theta))


def sankaran_log_cdf(x: ArrayLike, df: float, nc: float, scale: float = 1.0) -> np.ndarray:
    r"""Natural log of ``P(scale·χ'²(k, λ) ≤ x)`` by Sankaran's normal approximation.

    .. math::
        h = 1 - \tfrac23\frac{(k+\lambda)(k+3\lambda)}{(k+2\lambda)^2},\quad
        p = \frac{k+2\lambda}{(k+\lambda)^2},\quad m = (h-1)(1-3h),

        \Big(\frac{X}{k+\lambda}\Big)^h \approx \mathcal N\Big(1 + hp\big(h-1-\tfrac12(2-h)mp\big),
        \; h^2\,2p\,\big(1+\tfrac12 mp\big)\Big)

    (Sankaran 1959, Biometrika 46:235; the approximation the IJCAI 2024 code uses for the far
    tail).  Evaluated as ``log Φ(z)`` with ``scipy.special.log_ndtr``, finite and smooth even
    where the probability underflows; for ``λ = 0`` it is the Wilson–Hilferty approximation.
    """
    x = np.asarray(x, dtype=float) / scale
    k, lam = float(df), float(nc)
    h = 1 - 2 / 3 * (k + lam) * (k + 3 * lam) / (k + 2 * lam) ** 2
    p = (k + 2 * lam) / (k + lam) ** 2
    m = (h - 1) * (1 - 3 * h)
    mean = 1 + h * p * (h - 1 - 0.5 * (2 - h) * m * p)
    sd = h * math.sqrt(2 * p) * math.sqrt(max(1 + 0.5 * m * p, 1e-12))
    z = (np.clip(x, 0, None) / (k + lam)) ** h
    return special.log_ndtr((z - mean) / sd)


def _log_chi2_lower_series(x: float, nu: np.ndarray) -> np.ndarray:
    r"""``log P(χ²_ν ≤ x)`` for an array of ``ν``, from the series of the lower incomplete gamma.

    .. math:: P(\chi^2_\nu \le x) = \frac{z^a e^{-z}}{\Gamma(a+1)}
              \sum_{n\ge0}\frac{z^n}{(a+1)\cdots(a+n)},\qquad a=\nu/2,\ z=x/2

    (Abramowitz & Stegun 6.5.29), summed in log space: every term is positive, so nothing
    cancels and nothing underflows however small the probability.
    """
    a = nu[:, None] / 2.0
    z = x / 2.0
    n_terms = int(z + 12 * math.sqrt(z + 1) + 60)
    n = np.arange(n_terms)[None, :]
    log_terms = n * math.log(z) - (special.gammaln(a + n + 1) - special.gammaln(a + 1))
    return (a[:, 0] * math.log(z) - z - special.gammaln(a[:, 0] + 1)
            + special.logsumexp(log_terms, axis=1))


def series_log_cdf(x: ArrayLike, df: float, nc: float, scale: float = 1.0) -> np.ndarray:
    r"""Natural log of ``P(scale·χ'²(k, λ) ≤ x)`` from the Poisson mixture, in log space.

    .. math:: P(\chi'^2_k(\lambda) \le x) = \sum_{j\ge0} e^{-\lambda/2}
              \frac{(\lambda/2)^j}{j!}\,P(\chi^2_{k+2j} \le x)

    (Johnson, Kotz & Balakrishnan 1995, Eq. 29.2), each central term from
    :func:`_log_chi2_lower_series`, combined with ``logsumexp``.  Exact up to truncation and
    finite, smooth and accurate arbitrarily far into the lower tail (where the CDF underflows
    double precision): traindyn's default far-tail evaluation.  Slow in the bulk for large ``x``
    (many terms), so :func:`log_cdf_ncx2` uses it only in the tail.
    """
    xs = np.atleast_1d(np.asarray(x, dtype=float)) / scale
    half = float(nc) / 2.0
    n_j = int(half + 12 * math.sqrt(half + 1) + 30)
    j = np.arange(n_j, dtype=float)
    log_pois = -half + j * math.log(half) - special.gammaln(j + 1) if half > 0 else None
    out = np.full(xs.shape, -np.inf)
    for i, xi in enumerate(xs):
        if xi <= 0:
            continue
        if log_pois is None:
            out[i] = _log_chi2_lower_series(xi, np.array([float(df)]))[0]
        else:
            out[i] = special.logsumexp(log_pois + _log_chi2_lower_series(xi, df + 2 * j))
    return out.reshape(np.shape(x))


def log_cdf_ncx2(
    x: ArrayLike, df: float, nc: float, scale: float = 1.0, tail: str = "series",
) -> np.ndarray:
    """Natural log of the scaled non-central χ² CDF, exact in the bulk, well-behaved in the tail.

    ``scipy.stats.ncx2.logcdf`` is used while it is above ``e^-600`` (well inside double
    precision).  Below that, or where it underflows to ``-inf``: ``tail="series"`` (default)
    uses the exact log-space Poisson-mixture series :func:`series_log_cdf`; ``tail="sankaran"``
    the normal approximation :func:`sankaran_log_cdf` of the authors' code, which saturates for
    small ``df`` (it gives ``P(X ≤ 0) > 0``).  ``x ≤ 0`` has probability 0 (log = ``-inf``).
    """
    if tail not in ("series", "sankaran"):
        raise ValueError(f"tail must be 'series' or 'sankaran'; got {tail!r}")
    x = np.asarray(x, dtype=float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exact = np.asarray(stats.ncx2.logcdf(x, df, nc, loc=0, scale=scale), dtype=float)
    far = (~np.isfinite(exact) | (exact < _EXACT_LOG_CDF_FLOOR)) & (x > 0)
    out = exact.copy()
    if far.any():
        approx = series_log_cdf if tail == "series" else sankaran_log_cdf
        out[far] = approx(x[far], df, nc, scale)
    return np.where(x <= 0, -np.inf, out)


# --------------------------------------------------------------------------- the estimator


def inductive_bias(
    errors: ArrayLike,
    epsilon: ArrayLike,
    n_bootstrap: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
) -> xr.Dataset:
    r"""Inductive bias ``I(ε) = −log₂ P(e(h) ≤ ε)`` from sampled test errors, in bits.

    Boopathy et al. (2024), Eq. 1: the errors ``e(h_s)`` of hypotheses that fit the training
    data are fitted with a scaled non-central χ² (:func:`fit_ncx2`) and
    ``I(ε) = −log P_fit(e ≤ ε) / ln 2`` (:func:`log_cdf_ncx2`).  The interval is a percentile
    bootstrap over the sampled hypotheses (resample, refit, re-evaluate).

    Parameters
    ----------
    errors : array-like, shape (S,)
        Test errors of ``S`` independently sampled hypotheses that fit the training data.
    epsilon : float or array-like
        Target test error(s).
    n_bootstrap : int
        Bootstrap resamples (0: no interval; ``*_low``/``*_high`` are NaN).
    confidence : float
        Coverage of the bootstrap interval.
    seed : int
        Seed of the bootstrap resampling.

    Returns
    -------
    xarray.Dataset
        Over ``epsilon``: ``inductive_bias`` (bits), ``inductive_bias_low`` / ``_high`` (the
        bootstrap interval), ``empirical_inductive_bias`` (−log₂ of the fraction of samples with
        ``e ≤ ε``; ``inf`` where none is, which is why the fit is needed).  Scalars: the fit
        ``ncx2_df``, ``ncx2_nc``, ``ncx2_scale``, its goodness ``ks_statistic``, ``ks_pvalue``,
        and ``n_hypotheses``.
    """
    e = np.asarray(as_tensor(errors, STAT_DTYPE).cpu().numpy(), dtype=float).ravel()
    eps = np.atleast_1d(np.asarray(epsilon, dtype=float))
    if eps.ndim != 1:
        raise ValueError(f"epsilon must be a number or 1-D; got shape {eps.shape}")
    if not np.all(np.isfinite(eps)):
        raise ValueError("epsilon must be finite (NaN or Inf found)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    fit = fit_ncx2(e)
    bits = -fit.log_cdf(eps) / LN2
    low = np.full_like(eps, np.nan)
    high = np.full_like(eps, np.nan)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        boot = np.empty((n_bootstrap, eps.size))
        for b in range(n_bootstrap):
            sample = e[rng.integers(0, e.size, e.size)]
            try:
                boot[b] = -fit_ncx2(sample).log_cdf(eps) / LN2
            except ValueError:  # a degenerate resample (all equal): skip it
                boot[b] = np.nan
        alpha = (1 - confidence) / 2
        low, high = np.nanquantile(boot, [alpha, 1 - alpha], axis=0)
    with np.errstate(divide="ignore"):
        empirical = -np.log2((e[None, :] <= eps[:, None]).mean(1))
    bit = {"units": "bit"}
    ds = xr.Dataset(
        {
            "inductive_bias": ("epsilon", bits, {
                "long_name": "inductive bias −log₂ P(test error ≤ ε) (scaled χ'² fit)", **bit}),
            "inductive_bias_low": ("epsilon", low, {
                "long_name": f"lower end of the {confidence:.0%} bootstrap interval", **bit}),
            "inductive_bias_high": ("epsilon", high, {
                "long_name": f"upper end of the {confidence:.0%} bootstrap interval", **bit}),
            "empirical_inductive_bias": ("epsilon", empirical, {
                "long_name": "−log₂ of the sampled fraction with test error ≤ ε", **bit}),
            "ncx2_df": ((), fit.df, {"long_name": "fitted χ'² degrees of freedom", "units": "1"}),
            "ncx2_nc": ((), fit.nc, {"long_name": "fitted χ'² non-centrality", "units": "1"}),
            "ncx2_scale": ((), fit.scale, {"long_name": "fitted χ'² scale", "units": "1"}),
            "ks_statistic": ((), fit.ks_statistic, {
                "long_name": "Kolmogorov–Smirnov distance of errors to the fit", "units": "1"}),
            "ks_pvalue": ((), fit.ks_pvalue, {
                "long_name": "KS p-value (optimistic: parameters fitted)", "units": "1"}),
            "n_hypotheses": ((), e.size, {"long_name": "sampled hypotheses", "units": "1"}),
        },
        coords={"epsilon": ("epsilon", eps, {"long_name": "target test error ε",
                                             "units": "1"})},
        attrs={
            "kind": "measurement",
            "source": SOURCE,
            "parameters": _params(n_bootstrap=n_bootstrap, confidence=confidence, seed=seed),
            "note": "bits = nats / ln 2 (the authors' code reports nats)",
        },
    )
    return ds


def _params(**kw: Any) -> str:
    import json

    return json.dumps(kw, sort_keys=True)


# --------------------------------------------------------------------------- kernel spaces


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, lengthscale: float) -> torch.Tensor:
    r"""Gaussian kernel ``k(x, x') = exp(−‖x − x'‖² / (2ℓ²))``."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return torch.exp(-d2.clamp_min(0) / (2 * lengthscale**2))


def linear_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Linear kernel ``k(x, x') = x·x' / d``: the GP of ``θᵀx/√d`` with ``θ ~ N(0, I)``."""
    return a @ b.T / a.shape[1]


def gp_posterior_errors(
    k_train: ArrayLike,
    k_cross: ArrayLike,
    k_test: ArrayLike,
    y_train: ArrayLike,
    y_test: ArrayLike,
    n_hypotheses: int = 1000,
    seed: int = 0,
    jitter: float = 1e-8,
    batch: int = 256,
) -> torch.Tensor:
    r"""Test errors of exact samples of a GP conditioned to interpolate the training data.

    With prior ``f ~ GP(0, k)`` independently per output and the constraint ``f(X) = Y``,

    .. math:: f(X_*) \mid f(X)=Y \;\sim\; \mathcal N\big(K_{*n}K_{nn}^{-1}Y,\;
              K_{**} - K_{*n}K_{nn}^{-1}K_{n*}\big)

    (Rasmussen & Williams 2006, Eq. 2.19 with zero noise).  Both terms come from one Cholesky
    factorisation of ``K_nn``; samples are ``μ + L z`` with ``L`` the Cholesky factor of the
    posterior covariance (``jitter`` × its mean diagonal added for numerical safety).  This is
    the kernel / linear-in-parameters hypothesis space of Boopathy et al. (2024).

    Computed in float64 on the device of ``k_train``.  Returns the ``n_hypotheses`` errors
    ``(1/m)‖F_* − Y_*‖_F²``.
    """
    knn = as_tensor(k_train, STAT_DTYPE)
    dev = knn.device
    ksn = as_tensor(k_cross, STAT_DTYPE).to(dev)
    kss = as_tensor(k_test, STAT_DTYPE).to(dev)
    ytr = as_tensor(y_train, STAT_DTYPE).to(dev)
    yte = as_tensor(y_test, STAT_DTYPE).to(dev)
    ytr = ytr[:, None] if ytr.ndim == 1 else ytr
    yte = yte[:, None] if yte.ndim == 1 else yte
    n, m = knn.shape[0], kss.shape[0]
    if knn.shape != (n, n) or ksn.shape != (m, n) or kss.shape != (m, m):
        raise ValueError(f"kernel shapes disagree: K_nn {tuple(knn.shape)}, K_*n "
                         f"{tuple(ksn.shape)}, K_** {tuple(kss.shape)}")
    if ytr.shape[0] != n or yte.shape[0] != m or ytr.shape[1] != yte.shape[1]:
        raise ValueError(f"targets y_train {tuple(ytr.shape)} / y_test {tuple(yte.shape)} do "
                         f"not match {n} training and {m} test points")
    for name, t in (("k_train", knn), ("k_cross", ksn), ("k_test", kss), ("y_train", ytr),
                    ("y_test", yte)):
        require_finite(t, name)
    chol, info = torch.linalg.cholesky_ex(knn)
    if int(info) != 0:
        raise ValueError("the training kernel matrix is singular: no function of this space "
                         "interpolates the training data (fewer features than samples, or "
                         "duplicate inputs); add jitter to K_nn or use more features")
    a = torch.cholesky_solve(ksn.T, chol)                       # K_nn^{-1} K_n*
    mean = a.T @ ytr                                            # (m, outputs)
    cov = kss - ksn @ a
    cov = 0.5 * (cov + cov.T)
    scale = float(cov.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(m, dtype=STAT_DTYPE, device=dev)
    for j in (jitter, jitter * 1e2, jitter * 1e4):
        lpost, info = torch.linalg.cholesky_ex(cov + j * scale * eye)
        if int(info) == 0:
            break
    else:
        raise ValueError("posterior covariance is not positive semi-definite")
    resid0 = mean - yte
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for start in range(0, n_hypotheses, batch):
        s = min(batch, n_hypotheses - start)
        z = torch.randn(s, m, ytr.shape[1], generator=gen, dtype=STAT_DTYPE, device=dev)
        f = torch.einsum("ij,sjo->sio", lpost, z) + resid0
        out.append((f * f).sum((1, 2)) / m)
    return torch.cat(out)


def kernel_hypothesis_errors(
    x_train: ArrayLike,
    y_train: ArrayLike,
    x_test: ArrayLike,
    y_test: ArrayLike,
    kernel: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "rbf",
    lengthscale: float | None = None,
    amplitude: float = 1.0,
    n_hypotheses: int = 1000,
    seed: int = 0,
) -> torch.Tensor:
    """Test errors of interpolating GP-posterior samples for a kernel on raw inputs.

    ``kernel``: ``"rbf"`` (lengthscale by default the median pairwise training distance),
    ``"linear"`` (``x·x'/d``: linear models with Gaussian weights; pass features as ``x`` for any
    linear-in-parameters space), or a callable ``k(A, B) -> (len(A), len(B))`` on float64
    tensors.  ``amplitude`` multiplies the kernel (prior variance).  See
    :func:`gp_posterior_errors`.
    """
    xtr = as_tensor(x_train, STAT_DTYPE)
    xte = as_tensor(x_test, STAT_DTYPE).to(xtr.device)
    for name, t in (("x_train", xtr), ("x_test", xte)):
        if t.ndim == 0 or t.shape[0] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
        require_finite(t, name)
    xtr, xte = xtr.reshape(xtr.shape[0], -1), xte.reshape(xte.shape[0], -1)
    if kernel == "rbf":
        if lengthscale is None:
            d = torch.cdist(xtr, xtr)
            lengthscale = float(d[d > 0].median())

        def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return rbf_kernel(a, b, lengthscale)
    elif kernel == "linear":
        k = linear_kernel
    elif callable(kernel):
        k = kernel
    else:
        raise ValueError(f"unknown kernel {kernel!r}; use 'rbf', 'linear' or a callable")
    return gp_posterior_errors(
        amplitude * k(xtr, xtr), amplitude * k(xte, xtr), amplitude * k(xte, xte),
        y_train, y_test, n_hypotheses=n_hypotheses, seed=seed)


# --------------------------------------------------------------------------- network spaces


def network_hypothesis_errors(
    train_fn: Callable[[int], float | tuple[float, float]],
    seeds: Iterable[int],
    client: Any = None,
    fit_tolerance: float | None = None,
) -> np.ndarray:
    """Test errors of networks trained from independent random initialisations.

    ``train_fn(seed)`` trains one network from the initialisation drawn with ``seed`` and
    returns its test error, or ``(test_error, train_error)``.  With a ``dask.distributed``
    ``Client`` the seeds run in parallel on its workers (``train_fn`` must then be picklable,
    e.g. :class:`MLPHypothesis`).  With ``fit_tolerance``, networks whose training error is above
    it do not fit the training data and are left out of the hypothesis sample (with a warning),
    as the estimator conditions on fitting the training data.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    if fit_tolerance is not None and not fit_tolerance >= 0:
        raise ValueError(f"fit_tolerance must be a non-negative number; got {fit_tolerance}")
    if client is not None:
        results = client.gather(client.map(train_fn, seeds, pure=False))
    else:
        results = [train_fn(s) for s in seeds]
    test = np.array([r[0] if isinstance(r, tuple) else r for r in results], dtype=float)
    if fit_tolerance is not None:
        if not all(isinstance(r, tuple) for r in results):
            raise ValueError("fit_tolerance needs train_fn to return (test_error, train_error)")
        train = np.array([r[1] for r in results], dtype=float)
        keep = train <= fit_tolerance
        if not keep.all():
            warnings.warn(f"{(~keep).sum()} of {len(keep)} networks did not fit the training "
                          f"data (train error > {fit_tolerance}); they are left out",
                          RuntimeWarning, stacklevel=2)
        test = test[keep]
    bad = ~np.isfinite(test)
    if bad.any():
        warnings.warn(f"{int(bad.sum())} of {test.size} networks gave a non-finite test error "
                      "(diverged?); they are NaN here and must be dropped or refitted before "
                      "inductive_bias", RuntimeWarning, stacklevel=2)
    return test


@dataclass
class MLPHypothesis:
    """A picklable ``train_fn`` for :func:`network_hypothesis_errors`: a ReLU MLP fitted by
    full-batch Adam on the squared error to (one-hot) targets until the training error is below
    ``tolerance`` (or ``max_steps``).  Returns ``(test_error, train_error)`` with the error of
    this module (squared error summed over outputs, averaged over points).  PyTorch default
    initialisation, drawn with ``torch.manual_seed(seed)``.  Runs on ``device``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    width: int = 256
    depth: int = 1
    learning_rate: float = 1e-3
    max_steps: int = 2000
    tolerance: float = 1e-3
    device: str = "cpu"

    def __call__(self, seed: int) -> tuple[float, float]:
        from torch import nn

        torch.manual_seed(seed)
        dev = torch.device(self.device)
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
        xtr, ytr, xte, yte = (t(self.x_train), t(self.y_train), t(self.x_test), t(self.y_test))
        layers: list[nn.Module] = []
        prev = xtr.shape[1]
        for _ in range(self.depth):
            layers += [nn.Linear(prev, self.width), nn.ReLU()]
            prev = self.width
        layers.append(nn.Linear(prev, ytr.shape[1]))
        model = nn.Sequential(*layers).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
        train_err = float("inf")
        for _ in range(self.max_steps):
            opt.zero_grad(set_to_none=True)
            loss = ((model(xtr) - ytr) ** 2).sum(1).mean()
            train_err = loss.item()
            if train_err <= self.tolerance:
                break
            loss.backward()
            opt.step()
        with torch.no_grad():
            test_err = float(((model(xte) - yte) ** 2).sum(1).mean())
            train_err = float(((model(xtr) - ytr) ** 2).sum(1).mean())
        return test_err, train_err
