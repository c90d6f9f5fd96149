"""Spectral probes of a representation: RankMe (both published variants) and alpha-ReQ.

Notation: ``Z`` is an ``n × d`` matrix of features (samples × features), ``σ_k`` its singular
values and ``λ_k`` eigenvalues sorted in descending order.

Every metric comes in two forms that share their math, as torchmetrics does:

* a one-shot function (``rankme(Z)``), and
* a streaming accumulator (:class:`SpectrumAccumulator`) fed batch by batch with ``update``.

The one-shot function is the accumulator fed once.  Second moments are accumulated in float64
on the input's device; memory is ``O(d²)`` and does not grow with ``n``.  While fewer samples
than features have been seen (``n < d``), the accumulator keeps the rows themselves (fewer
than ``d²`` numbers) and works on the ``n × n`` Gram side, which has the same non-zero
spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probes._arrays import STAT_DTYPE, ArrayLike, all_finite, as_features, warn_nan

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_FIT_RANGE",
    "PowerLawFit",
    "SpectrumAccumulator",
    "alpha_req",
    "alpha_req_fit",
    "covariance_spectrum",
    "power_law_fit",
    "rankme",
    "rankme_covariance",
    "rankme_from_spectrum",
    "singular_values",
]

DEFAULT_EPS = 1e-7
"""ε of RankMe (Garrido et al. 2023, Eq. 1), the paper's value for float32 features."""

DEFAULT_FIT_RANGE = (10, 100)
"""0-based half-open index range of the alpha-ReQ fit: ranks 11..100 (reptrix's default)."""


class SpectrumAccumulator:
    """Streaming second-moment statistics of features, from which every spectrum is computed.

    Accumulates ``n``, ``Σ_i z_i`` and ``ZᵀZ = Σ_i z_i z_iᵀ`` in float64 on the device of the
    first batch.  Until ``n ≥ d`` the rows are kept instead (memory ``n·d < d²``).

    Examples
    --------
    >>> acc = SpectrumAccumulator()
    >>> for batch in loader:                     # doctest: +SKIP
    ...     acc.update(model_features(batch))
    >>> rankme_from_spectrum(acc.singular_values())  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.n = 0
        self.d: int | None = None
        self.nonfinite = False
        self._rows: list[torch.Tensor] | None = []
        self._sum: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None

    def update(self, features: ArrayLike) -> SpectrumAccumulator:
        """Add a batch of shape ``(batch, d)`` (trailing axes are flattened)."""
        z = as_features(features).to(STAT_DTYPE)
        if self.d is None:
            self.d = z.shape[1]
        elif z.shape[1] != self.d:
            raise ValueError(f"batch has {z.shape[1]} features; earlier batches had {self.d}")
        if not all_finite(z):
            self.nonfinite = True
        self.n += z.shape[0]
        if self._rows is not None:
            self._rows.append(z)
            if self.n >= self.d:
                rows = torch.cat(self._rows)
                self._scatter = rows.T @ rows
                self._sum = rows.sum(0)
                self._rows = None
        else:
            self._scatter.addmm_(z.T, z)
            self._sum += z.sum(0)
        return self

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.__init__()

    @property
    def device(self) -> torch.device | None:
        if self._rows:
            return self._rows[0].device
        return None if self._scatter is None else self._scatter.device

    def _check(self) -> bool:
        if self.n == 0:
            raise ValueError("no samples were accumulated: call update() first")
        return not self.nonfinite

    def eigenvalues(self, centered: bool) -> torch.Tensor:
        """Eigenvalues of the second-moment matrix ``(1/n) ZᵀZ`` (``centered=False``) or of the
        covariance ``(1/n) Z_cᵀ Z_c`` with column-centred ``Z_c`` (``centered=True``).

        Returns ``min(n, d)`` values in descending order (float64, on the accumulator's
        device), with round-off below ``max(n, d)·ε_64·λ_max`` set to zero.
        """
        if not self._check():
            return torch.full((min(self.n, self.d),), float("nan"), dtype=STAT_DTYPE)
        if self._rows is not None:
            z = torch.cat(self._rows)
            if centered:
                z = z - z.mean(0, keepdim=True)
            matrix = z @ z.T
        else:
            matrix = self._scatter
            if centered:
                mean = self._sum / self.n
                matrix = matrix - self.n * torch.outer(mean, mean)
        evals = torch.linalg.eigvalsh(matrix).flip(0) / self.n
        tol = max(self.n, self.d) * torch.finfo(STAT_DTYPE).eps * evals[0].clamp(min=0)
        return torch.where(evals > tol, evals, torch.zeros_like(evals))

    def singular_values(self) -> torch.Tensor:
        """Singular values ``σ_k`` of the raw (uncentred) ``Z``, descending, ``min(n, d)`` of them."""
        return (self.eigenvalues(centered=False) * self.n).sqrt()

    def covariance_spectrum(self) -> torch.Tensor:
        """Eigenvalues of the centred covariance, ``d`` of them (zeros appended when ``n < d``)."""
        evals = self.eigenvalues(centered=True)
        if evals.numel() < self.d:
            pad = torch.zeros(self.d - evals.numel(), dtype=evals.dtype, device=evals.device)
            evals = torch.cat([evals, pad])
        return evals


def _accumulate(features: ArrayLike) -> SpectrumAccumulator:
    return SpectrumAccumulator().update(features)


def singular_values(features: ArrayLike) -> torch.Tensor:
    """Singular values of the raw ``n × d`` features (float64, descending, ``min(n, d)``)."""
    return _accumulate(features).singular_values()


def covariance_spectrum(features: ArrayLike) -> torch.Tensor:
    """Eigenvalues of the covariance of column-centred features (float64, descending, ``d``)."""
    return _accumulate(features).covariance_spectrum()


def rankme_from_spectrum(spectrum: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    r"""Exponential of the entropy of a normalised non-negative spectrum.

    .. math:: \mathrm{RankMe} = \exp\Big(-\sum_k p_k \ln p_k\Big),\qquad
              p_k = \frac{s_k}{\sum_j s_j} + \varepsilon

    (Garrido, Balestriero, Najman, LeCun 2023, Eq. 1; ε is added *after* normalisation.)

    Returns NaN with a warning for a spectrum that is all zero or not finite.
    """
    s = torch.as_tensor(spectrum, dtype=STAT_DTYPE) if not isinstance(spectrum, torch.Tensor) \
        else spectrum.to(STAT_DTYPE)
    if not all_finite(s):
        return warn_nan("RankMe: the spectrum is not finite (NaN or Inf in the features)")
    total = s.sum()
    if not total > 0:
        return warn_nan("RankMe: the features are all zero; RankMe is undefined (NaN)")
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme(features: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    r"""RankMe of features, the paper's definition: raw, uncentred singular values.

    .. math:: \mathrm{RankMe}(Z) = \exp\Big(-\sum_{k=1}^{\min(n,d)} p_k \ln p_k\Big),\qquad
              p_k = \frac{\sigma_k(Z)}{\lVert\sigma(Z)\rVert_1} + \varepsilon

    Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the downstream performance of
    pretrained self-supervised representations by their rank", ICML 2023, Eq. 1.

    Parameters
    ----------
    features : array of shape (n, d)
        torch, numpy or jax; computed on the array's device in float64.
    eps : float
        ε added after normalisation (1e-7, the paper's value for float32).

    Returns
    -------
    float
        Between 1 and ``min(n, d)`` (up to ε terms).  NaN, with a ``RuntimeWarning``, for
        all-zero or non-finite features.

    See Also
    --------
    rankme_covariance : the variant on centred covariance eigenvalues.
    """
    return rankme_from_spectrum(_accumulate(features).singular_values(), eps)


def rankme_covariance(features: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    r"""RankMe on the eigenvalues of the centred covariance (the alpha-ReQ / "Tracing" variant).

    .. math:: p_k = \frac{\lambda_k(C)}{\sum_j \lambda_j(C)} + \varepsilon,\qquad
              C = \tfrac{1}{n} Z_c^\top Z_c,\; Z_c = Z - \bar z

    i.e. squared singular values of the column-centred features, over all ``d`` eigenvalues
    of the ``d × d`` covariance.  Used by Agrawal et al. (NeurIPS 2022) and Li et al.,
    "Tracing the representation geometry of language models" (NeurIPS 2025).  It is not the
    RankMe paper's formula and gives different numbers (≈613 vs ≈814 on a 1000 × 1024
    Gaussian matrix).
    """
    return rankme_from_spectrum(_accumulate(features).covariance_spectrum(), eps)


@dataclass(frozen=True)
class PowerLawFit:
    """Result of a power-law fit ``λ_r ≈ c · r^{-alpha}`` over a rank range."""

    alpha: float
    """Decay exponent (positive for a decaying spectrum)."""
    intercept: float
    """``ln c``."""
    r2: float
    """Coefficient of determination of ``ln λ_r`` over the fit range (unweighted)."""
    fit_range: tuple[int, int]
    """0-based half-open index range used."""


def power_law_fit(
    eigenvalues: ArrayLike, fit_range: tuple[int, int] = DEFAULT_FIT_RANGE
) -> PowerLawFit:
    r"""Weighted least-squares fit of ``ln λ_r = ln c − α ln r`` over a rank range.

    Ranks are 1-based, ``r = i + 1`` for the 0-based indices ``i ∈ [lo, hi)``; each point has
    weight ``w_r = 1/r`` on its squared residual, so that the fit is not dominated by the many
    ranks of the tail (Agrawal, Mondal, Ghosh, Richards 2022, following Stringer et al. 2019):

    .. math:: \hat\alpha = \frac{\sum_r w_r (x_r-\bar x_w)(y_r-\bar y_w)}
                                {\sum_r w_r (x_r-\bar x_w)^2},\quad x_r=-\ln r,\ y_r=\ln\lambda_r

    Returns NaN values with a warning when the range asks for more positive eigenvalues than
    there are.
    """
    lo, hi = int(fit_range[0]), int(fit_range[1])
    if not 0 <= lo < hi - 1:
        raise ValueError(f"fit_range must be (lo, hi) with 0 <= lo < hi - 1; got {fit_range}")
    lam = np.asarray(torch.as_tensor(eigenvalues).detach().cpu().double().numpy())
    if not np.all(np.isfinite(lam)):
        return PowerLawFit(warn_nan("alpha-ReQ: the spectrum is not finite"), np.nan, np.nan,
                           (lo, hi))
    positive = int(np.sum(lam > 0))
    if hi > lam.size or np.any(lam[lo:hi] <= 0):
        return PowerLawFit(
            warn_nan(
                f"alpha-ReQ: fit range [{lo}, {hi}) needs {hi} positive eigenvalues, but the "
                f"spectrum has {positive} of {lam.size} (use more samples or features, or a "
                f"smaller fit_range)"
            ),
            np.nan, np.nan, (lo, hi),
        )
    ranks = np.arange(lo, hi, dtype=np.float64) + 1.0
    x, y, w = -np.log(ranks), np.log(lam[lo:hi]), 1.0 / ranks
    xm, ym = np.average(x, weights=w), np.average(y, weights=w)
    alpha = float(np.sum(w * (x - xm) * (y - ym)) / np.sum(w * (x - xm) ** 2))
    intercept = float(ym - alpha * xm)
    resid = y - (intercept + alpha * x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = float(1.0 - np.sum(resid**2) / ss_tot) if ss_tot > 0 else 1.0
    return PowerLawFit(alpha, intercept, r2, (lo, hi))


def alpha_req_fit(
    features: ArrayLike, fit_range: tuple[int, int] = DEFAULT_FIT_RANGE
) -> PowerLawFit:
    """alpha-ReQ with the fit's details (:class:`PowerLawFit`): see :func:`alpha_req`."""
    return power_law_fit(_accumulate(features).covariance_spectrum(), fit_range)


def alpha_req(features: ArrayLike, fit_range: tuple[int, int] = DEFAULT_FIT_RANGE) -> float:
    r"""alpha-ReQ: decay exponent of the centred-covariance eigenspectrum, ``λ_r ∝ r^{-α}``.

    Agrawal, Mondal, Ghosh & Richards, "α-ReQ: Assessing representation quality in
    self-supervised learning by measuring eigenspectrum decay", NeurIPS 2022 (Eq. 2).  The
    spectrum is that of the covariance of **column-centred** features; the fit is the weighted
    log-log least squares of :func:`power_law_fit` over 0-based indices ``fit_range``
    (default ``[10, 100)``, i.e. ranks 11..100, reptrix's default; the "Tracing" paper uses
    ``[11, 100)``).

    Returns
    -------
    float
        α (positive for a decaying spectrum); NaN with a warning when there are fewer
        positive eigenvalues than the fit range needs, or the features are not finite.
    """
    return alpha_req_fit(features, fit_range).alpha
