r"""Spectral probes of a representation: RankMe (both published variants), alpha-ReQ, and the
effective-rank family (participation ratio, stable rank, Rényi effective ranks).

Notation: ``Z`` is an ``n × d`` matrix of features (samples × features), ``σ_k`` its singular
values and ``λ_k`` eigenvalues sorted in descending order.

Every metric comes in two forms that share their math, as torchmetrics does:

* a one-shot function (``rankme(Z)``), and
* a streaming metric (:class:`RankMe`, :class:`AlphaReQ`, … or :class:`SpectralMetrics` for
  several at once) with ``update(batch)`` / ``compute()`` / ``merge(other)`` / ``reset()``,
  built on one :class:`SpectrumAccumulator`.

The one-shot function is the accumulator fed once, followed by the same reader of the
accumulator that the streaming class and the registered probe call, so the three give the
same value.  Which spectrum a metric is taken of is a parameter (``spectrum="singular"`` or
``"covariance"``, :data:`SPECTRA`): ``rankme(Z, spectrum="covariance")`` is the
centred-covariance variant of RankMe.

Second moments are accumulated in float64 on the input's device; memory is ``O(d²)`` and does
not grow with ``n``.  While fewer samples than features have been seen (``n < d``), the
accumulator keeps the rows themselves (fewer than ``d²`` numbers) and works on the ``n × n``
Gram side, which has the same non-zero spectrum.

Precision: half-precision (float16 / bfloat16) features are upcast exactly to float64 before
any product, so they cannot overflow; non-finite features (NaN, Inf, e.g. a float16
overflow upstream) give NaN with a ``RuntimeWarning``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from traindyn.probes._arrays import (
    STAT_DTYPE,
    ArrayLike,
    all_finite,
    as_features,
    as_tensor,
    warn_nan,
)
from traindyn.probes._pending import DeviceFlag, Pending, finish_all, first_failure, scalar
from traindyn.probes._solve import batched_eigvalsh, eigvalsh, lapack_single_thread

Checks = list[tuple[torch.Tensor | bool, str]]
"""``(condition, reason)`` pairs: the first that holds makes a metric NaN with that warning."""

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_FIT_RANGE",
    "SPECTRA",
    "SPECTRAL_METRICS",
    "AlphaReQ",
    "EffectiveRank",
    "ParticipationRatio",
    "PowerLawFit",
    "RankMe",
    "SpectralMetrics",
    "SpectrumAccumulator",
    "StableRank",
    "alpha_req",
    "alpha_req_fit",
    "covariance_spectrum",
    "effective_rank",
    "effective_rank_from_spectrum",
    "lapack_single_thread",
    "participation_ratio",
    "power_law_fit",
    "rankme",
    "rankme_covariance",
    "rankme_from_spectrum",
    "register_probes",
    "singular_values",
    "stable_rank",
]

DEFAULT_EPS = 1e-7
"""ε of RankMe (Garrido et al. 2023, Eq. 1), the paper's value for float32 features."""

DEFAULT_FIT_RANGE = (10, 100)
"""0-based half-open index range of the alpha-ReQ fit: ranks 11..100 (reptrix's default)."""


# --------------------------------------------------------------------------- accumulator
class SpectrumAccumulator:
    r"""Streaming second-moment statistics of features, from which every spectrum is computed.

    Keeps ``n``, the mean ``z̄`` and the centred scatter ``M₂ = Σ_i (z_i − z̄)(z_i − z̄)ᵀ`` in
    float64 on the device of the first batch.  A batch ``b`` (``n_b`` rows, mean ``m_b``,
    centred scatter ``S_b``) is merged by the pairwise update of Chan, Golub & LeVeque (1979):

    .. math:: M_2 \leftarrow M_2 + S_b + \frac{n\,n_b}{n+n_b}(m_b-\bar z)(m_b-\bar z)^\top,

    which has none of the cancellation of ``ZᵀZ − n z̄z̄ᵀ``; the raw second moment is then the
    sum of two positive semi-definite terms, ``ZᵀZ = M₂ + n z̄z̄ᵀ``, also without cancellation.
    Until ``n ≥ d`` the rows are kept instead (memory ``n·d < d²``) and spectra come from the
    ``n × n`` Gram matrix.

    Parameters
    ----------
    batch_dtype : torch.dtype or None
        dtype in which each batch's product ``S_b`` is formed before it is added to the
        float64 state.  ``torch.float64`` (default) is exact to float64 round-off; ``None``
        uses the input's dtype (e.g. float32: about 2× faster on CPUs, with float32 round-off
        in each batch's product).

    Examples
    --------
    >>> acc = SpectrumAccumulator()
    >>> for batch in loader:                     # doctest: +SKIP
    ...     acc.update(model_features(batch))
    >>> rankme_from_spectrum(acc.singular_values())  # doctest: +SKIP
    """

    def __init__(self, batch_dtype: torch.dtype | None = STAT_DTYPE) -> None:
        self.batch_dtype = batch_dtype
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.n = 0
        self.d: int | None = None
        self._nonfinite = DeviceFlag()  # a NaN or Inf was seen (on the device: no host wait)
        self._rows: list[torch.Tensor] | None = []
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def update(self, features: ArrayLike) -> SpectrumAccumulator:
        """Add a batch of shape ``(batch, d)`` (trailing axes are flattened)."""
        z = as_features(features)
        if z.is_complex():
            raise TypeError("complex features are not supported")
        if self.d is None:
            self.d = z.shape[1]
        elif z.shape[1] != self.d:
            raise ValueError(f"batch has {z.shape[1]} features; earlier batches had {self.d}")
        self._nonfinite.mark(~torch.isfinite(z).all())
        if self._rows is None:
            self._merge_batch(z)  # increments n
            return self
        self._rows.append(z.clone())  # few rows (n < d); kept in the input's dtype
        self.n += z.shape[0]
        if self.n >= self.d:
            rows = torch.cat(self._rows)
            if self.batch_dtype is not None:
                rows = rows.to(STAT_DTYPE)
            self._rows, self.n = None, 0
            self._mean = torch.zeros(self.d, dtype=STAT_DTYPE, device=rows.device)
            self._m2 = torch.zeros(self.d, self.d, dtype=STAT_DTYPE, device=rows.device)
            self._merge_batch(rows)
        return self

    @property
    def nonfinite(self) -> bool:
        """Whether a NaN or Inf was seen (reading it waits for the device)."""
        return bool(self._nonfinite)

    def _merge_batch(self, z: torch.Tensor) -> None:
        nb = z.shape[0]
        work = z.dtype if self.batch_dtype is None else self.batch_dtype
        if not work.is_floating_point or torch.finfo(work).bits < 32:
            work = torch.float32 if self.batch_dtype is None else STAT_DTYPE
        zw = z.to(work)
        shift = zw.mean(0)
        zc = zw - shift
        resid = zc.sum(0, dtype=STAT_DTYPE)  # ≈ 0; keeps the update exact for any shift
        s_b = (zc.T @ zc).to(STAT_DTYPE) - torch.outer(resid, resid) / nb
        m_b = shift.to(STAT_DTYPE) + resid / nb
        delta = m_b - self._mean
        na = self.n
        self._m2 += s_b
        self._m2.add_(torch.outer(delta, delta), alpha=na * nb / (na + nb))
        self._mean += delta * (nb / (na + nb))
        self.n = na + nb

    def merge(self, other: SpectrumAccumulator) -> SpectrumAccumulator:
        """Add everything ``other`` has seen (e.g. on another process or device), by the same
        pairwise update as :meth:`update`."""
        if other.n == 0:
            return self
        if other._rows is not None:
            for rows in other._rows:
                self.update(rows)
            return self
        if self.d is not None and other.d != self.d:
            raise ValueError(f"cannot merge: {other.d} features vs {self.d}")
        self._nonfinite.mark(other._nonfinite)
        if self._rows is not None:  # adopt other's moments, then add the rows kept here
            mine = torch.cat(self._rows).to(STAT_DTYPE) if self._rows else None
            self.d, self.n, self._rows = other.d, other.n, None
            self._mean, self._m2 = other._mean.clone(), other._m2.clone()
            if mine is not None:
                self._merge_batch(mine.to(self._m2.device))
            return self
        na, nb = self.n, other.n
        delta = other._mean.to(self._mean.device) - self._mean
        self._m2 += other._m2.to(self._m2.device)
        self._m2.add_(torch.outer(delta, delta), alpha=na * nb / (na + nb))
        self._mean += delta * (nb / (na + nb))
        self.n = na + nb
        return self

    @property
    def device(self) -> torch.device | None:
        if self._rows:
            return self._rows[0].device
        return None if self._m2 is None else self._m2.device

    def _gram_or_scatter(self, centered: bool) -> torch.Tensor:
        """``ZᵀZ`` / ``Z_cᵀZ_c`` (``d × d``) or, while rows are kept, ``ZZᵀ`` / ``Z_cZ_cᵀ``."""
        if self._rows is not None:
            z = torch.cat(self._rows).to(STAT_DTYPE)
            if centered:
                z = z - z.mean(0, keepdim=True)
            return z @ z.T
        if centered:
            return self._m2
        return self._m2 + self.n * torch.outer(self._mean, self._mean)

    def moments(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(n, z̄, M₂)``: the sample count, the float64 mean and the centred ``d × d`` scatter
        ``Σ_i (z_i − z̄)(z_i − z̄)ᵀ`` (formed from the kept rows while ``n < d``) — the
        statistics a closed-form readout (:mod:`probes.readout`) solves with."""
        self._check_n()
        if self._rows is not None:
            z = torch.cat(self._rows).to(STAT_DTYPE)
            mean = z.mean(0)
            zc = z - mean
            return self.n, mean, zc.T @ zc
        return self.n, self._mean, self._m2

    def masked_matrix(self, centered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(matrix, nonfinite, overflow)`` without waiting for the device.

        ``matrix`` is the symmetric matrix whose eigenvalues / ``n`` are :meth:`eigenvalues`
        (``d × d``, or ``n × n`` while rows are kept), replaced by zeros when ``nonfinite``
        (NaN or Inf in the features) or ``overflow`` (a finite input whose second moment
        overflows float64) holds — 0-d boolean tensors, read later with the results
        (:mod:`probes._pending`), so that no eigensolver ever sees a NaN."""
        self._check_n()
        matrix = self._gram_or_scatter(centered)
        nonfinite = self._nonfinite.tensor(self.device)
        overflow = ~torch.isfinite(matrix).all() & ~nonfinite
        matrix = torch.where(nonfinite | overflow, torch.zeros((), dtype=matrix.dtype,
                                                               device=matrix.device), matrix)
        return matrix, nonfinite, overflow

    def eigen_matrix(self, centered: bool) -> torch.Tensor | None:
        """The matrix of :meth:`masked_matrix`, or ``None`` — with a ``RuntimeWarning`` — when
        the features were not finite or their second moment overflows float64 (reads the
        flags now: one host wait)."""
        matrix, nonfinite, overflow = self.masked_matrix(centered)
        if bool(nonfinite):
            warnings.warn(NONFINITE, RuntimeWarning, stacklevel=3)
            return None
        if bool(overflow):
            warnings.warn(OVERFLOW, RuntimeWarning, stacklevel=3)
            return None
        return matrix

    def eigenvalues_from(self, raw: torch.Tensor | None) -> torch.Tensor:
        """:meth:`eigenvalues` from the ascending eigenvalues ``raw`` of :meth:`eigen_matrix`
        (``None``: NaN), so that a batched solve of several matrices gives identical values."""
        if raw is None:
            return torch.full((min(self.n, self.d),), float("nan"), dtype=STAT_DTYPE,
                              device=self.device)
        evals = raw.flip(0) / self.n
        tol = max(self.n, self.d) * torch.finfo(STAT_DTYPE).eps * evals[0].clamp(min=0)
        return torch.where(evals > tol, evals, torch.zeros_like(evals))

    def eigenvalues(self, centered: bool) -> torch.Tensor:
        """Eigenvalues of the second-moment matrix ``(1/n) ZᵀZ`` (``centered=False``) or of the
        covariance ``(1/n) Z_cᵀ Z_c`` with column-centred ``Z_c`` (``centered=True``).

        Returns ``min(n, d)`` values in descending order (float64, on the accumulator's
        device), with round-off below ``max(n, d)·ε_64·λ_max`` set to zero.  NaN, with a
        ``RuntimeWarning``, when the features were not finite or their second moment
        overflows float64.
        """
        matrix = self.eigen_matrix(centered)
        return self.eigenvalues_from(None if matrix is None else eigvalsh(matrix))

    def singular_values(self) -> torch.Tensor:
        """Singular values ``σ_k`` of the raw (uncentred) ``Z``, descending, ``min(n, d)``."""
        return (self.eigenvalues(centered=False) * self.n).sqrt()

    def covariance_spectrum(self) -> torch.Tensor:
        """Eigenvalues of the centred covariance, ``d`` of them (zeros appended when ``n < d``)."""
        return _pad_spectrum(self.eigenvalues(centered=True), self.d)

    def trace_tensors(self, centered: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Tr A, ‖A‖_F², bad)`` of ``A = (1/n)·second moment`` as 0-d device tensors, without
        an eigensolve (the Gram side has the same non-zero eigenvalues, hence the same two
        numbers); ``bad``: the features were not finite or the numbers overflow."""
        self._check_n()
        a = self._gram_or_scatter(centered) / self.n
        trace, frob2 = torch.diagonal(a).sum(), (a * a).sum()
        bad = self._nonfinite.tensor(self.device) | ~(torch.isfinite(trace) & torch.isfinite(frob2))
        return trace, frob2, bad

    def trace_moments(self, centered: bool = True) -> tuple[float, float]:
        """:meth:`trace_tensors` read on the host: ``(nan, nan)`` when they are bad."""
        trace, frob2, bad = self.trace_tensors(centered)
        if bool(bad):
            return float("nan"), float("nan")  # the caller warns
        return float(trace), float(frob2)

    def _check_n(self) -> None:
        if self.n == 0:
            raise ValueError("no samples were accumulated: call update() first")


NONFINITE = "features are not finite (NaN or Inf): their spectra are NaN"
OVERFLOW = ("the second moment of the features overflows float64 (entries of about 1e154 or "
            "more): their spectra are NaN; rescale the features")


def _pad_spectrum(evals: torch.Tensor, d: int) -> torch.Tensor:
    """``d`` covariance eigenvalues from the ``min(n, d)`` computed ones: the other ``d − n``
    are zero (NaN when the computed ones are NaN: non-finite features)."""
    if evals.numel() >= d:
        return evals
    fill = 0.0 if all_finite(evals) else float("nan")
    return torch.cat([evals, evals.new_full((d - evals.numel(),), fill)])


def _accumulate(features: ArrayLike) -> SpectrumAccumulator:
    return SpectrumAccumulator().update(features)


def singular_values(features: ArrayLike) -> torch.Tensor:
    """Singular values of the raw ``n × d`` features (float64, descending, ``min(n, d)``)."""
    return _accumulate(features).singular_values()


def covariance_spectrum(features: ArrayLike) -> torch.Tensor:
    """Eigenvalues of the covariance of column-centred features (float64, descending, ``d``)."""
    return _accumulate(features).covariance_spectrum()


# --------------------------------------------------------------------------- spectrum → number
def _spectrum_tensor(spectrum: ArrayLike) -> torch.Tensor:
    s = as_tensor(spectrum).to(STAT_DTYPE).reshape(-1)
    return s


def rankme_from_spectrum(spectrum: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    r"""RankMe of a given spectrum: the exponential of the entropy of the normalised spectrum.

    .. math:: \mathrm{RankMe} = \exp\Big(-\sum_k p_k \ln p_k\Big),\qquad
              p_k = \frac{s_k}{\sum_j s_j} + \varepsilon

    Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the downstream performance of
    pretrained self-supervised representations by their rank", ICML 2023, Eq. 1 (ε is added
    *after* normalisation).  :func:`rankme` is this formula on the singular values of the
    features (or on their covariance eigenvalues, ``spectrum="covariance"``).

    Parameters
    ----------
    spectrum : array of shape (k,)
        Non-negative values (singular values, or covariance eigenvalues), any order.
    eps : float
        ε added after normalisation; with ``ε = 0``, zero entries add ``0 ln 0 = 0``.

    Returns
    -------
    float
        NaN with a ``RuntimeWarning`` for a spectrum that is all zero or not finite.

    Raises
    ------
    ValueError
        For negative entries.
    """
    s = _checked_spectrum(spectrum, "RankMe")
    return _rankme_of_spectrum(s, eps, _spectrum_checks(s, "RankMe")).result()


def _checked_spectrum(spectrum: ArrayLike, what: str) -> torch.Tensor:
    s = _spectrum_tensor(spectrum)
    if bool((s < 0).any()):
        raise ValueError(f"{what}: a spectrum must be non-negative (singular values or "
                         "eigenvalues of a covariance)")
    return s


def _spectrum_checks(s: torch.Tensor, what: str) -> list[tuple[torch.Tensor, str]]:
    """The NaN condition of a spectrum given as an array (the features are not known)."""
    return [(~torch.isfinite(s).all(), f"{what}: the spectrum is not finite (NaN or Inf in the "
                                       "features)")]


def _rankme_of_spectrum(s: torch.Tensor, eps: float, checks: Checks) -> Pending:
    """The RankMe formula (Garrido et al. 2023, Eq. 1) on the spectrum ``s`` (a device tensor),
    pending: NaN, with the first failed check's warning, or for an all-zero spectrum.  Shared
    by :func:`rankme_from_spectrum` and every accumulator route (:func:`_rankme_read`)."""
    total = s.sum()
    p = s / total + eps
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))  # 0 ln 0 = 0 when ε = 0
    value = torch.exp(-plogp.sum())
    return scalar(value, [*checks, (~(total > 0), "RankMe: the features are all zero; RankMe "
                                                   "is undefined (NaN)")])


def effective_rank_from_spectrum(spectrum: ArrayLike, order: float = 1.0) -> float:
    r"""Rényi effective rank: the exponential of the order-``q`` Rényi entropy of ``p = s/Σs``.

    .. math:: \mathrm{erank}_q = \exp H_q(p),\quad H_q = \frac{1}{1-q}\ln\sum_k p_k^q,\quad
              H_1 = -\sum_k p_k\ln p_k,\quad H_\infty = -\ln\max_k p_k .

    ``q = 1`` on singular values is the effective rank of Roy & Vetterli (EUSIPCO 2007, Eq. 3)
    (RankMe without ε); ``q = 2`` on covariance eigenvalues is the participation ratio;
    ``q = ∞`` on squared singular values is the stable rank.  Non-increasing in ``q``; between
    1 and the number of non-zero entries.  NaN with a warning for all-zero or non-finite input.
    """
    if order < 0 or math.isnan(order):
        raise ValueError(f"the order of a Rényi entropy must be >= 0; got {order}")
    s = _checked_spectrum(spectrum, "effective rank")
    return _effective_rank_pending(s, order, _spectrum_checks(s, "effective rank")).result()


def _effective_rank_pending(s: torch.Tensor, order: float, checks: Checks) -> Pending:
    """:func:`effective_rank_from_spectrum` of the device tensor ``s``, pending."""
    if order < 0 or math.isnan(order):
        raise ValueError(f"the order of a Rényi entropy must be >= 0; got {order}")
    total = s.sum()
    p = s / total
    if order == 1:
        logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
        value = torch.exp(-(p * logp).sum())
    elif math.isinf(order):
        value = 1.0 / p.max()
    elif order == 0:
        value = (p > 0).sum().to(STAT_DTYPE)
    else:
        powers = torch.where(p > 0, p.clamp(min=0) ** order, torch.zeros_like(p))
        value = torch.exp(torch.log(powers.sum()) / (1.0 - order))
    return scalar(value, [*checks, (~(total > 0), "effective rank: the spectrum is all zero "
                                                   "(NaN)")])


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
    r2_weighted: float = float("nan")
    """Coefficient of determination with the fit's own weights ``1/r``."""


def _nan_fit(reason: str, lo: int, hi: int) -> PowerLawFit:
    return PowerLawFit(warn_nan(reason), np.nan, np.nan, (lo, hi), np.nan)


def _fit_range(fit_range: tuple[int, int]) -> tuple[int, int]:
    lo, hi = int(fit_range[0]), int(fit_range[1])
    if not 0 <= lo < hi - 1:
        raise ValueError(f"fit_range must be (lo, hi) with 0 <= lo < hi - 1; got {fit_range}")
    return lo, hi


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
    there are, or the spectrum is not finite.
    """
    lo, hi = _fit_range(fit_range)
    lam = _spectrum_tensor(eigenvalues)
    if bool((lam < 0).any()):
        raise ValueError("eigenvalues must be non-negative (a covariance spectrum); got "
                         f"{float(lam.min())}")
    checks = [(~torch.isfinite(lam).all(), "alpha-ReQ: the spectrum is not finite")]
    return _power_law_pending(lam, lo, hi, checks).result()


def _power_law_pending(lam: torch.Tensor, lo: int, hi: int, checks: Checks) -> Pending:
    """:func:`power_law_fit` of the device tensor ``lam`` (descending), pending: every sum is
    formed on the device and read once."""
    size = lam.numel()
    fits = hi <= size
    if fits:
        seg = lam[lo:hi]
        ranks = torch.arange(lo + 1, hi + 1, dtype=STAT_DTYPE, device=lam.device)
        x, w = -ranks.log(), 1.0 / ranks
        y = seg.clamp(min=torch.finfo(STAT_DTYPE).tiny).log()  # a zero is caught by `positive`
        xm, ym = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
        alpha = (w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum()
        intercept = ym - alpha * xm
        resid = y - (intercept + alpha * x)
        ss_tot, ss_tot_w = ((y - y.mean()) ** 2).sum(), (w * (y - ym) ** 2).sum()
        one = torch.ones((), dtype=STAT_DTYPE, device=lam.device)
        r2 = torch.where(ss_tot > 0, 1.0 - (resid ** 2).sum() / ss_tot, one)
        r2_w = torch.where(ss_tot_w > 0, 1.0 - (w * resid ** 2).sum() / ss_tot_w, one)
        in_range = (seg > 0).all()
        tensors = {"alpha": alpha, "intercept": intercept, "r2": r2, "r2_w": r2_w,
                   "in_range": in_range}
    else:
        tensors = {}
    tensors["positive"] = (lam > 0).sum()
    flags, failure = first_failure(checks)
    tensors.update(flags)

    def finish(h: dict[str, np.ndarray]) -> PowerLawFit:
        reason = failure(h)
        if reason is not None:
            return _nan_fit(reason, lo, hi)
        if not fits or not bool(h["in_range"]):
            return _nan_fit(
                f"alpha-ReQ: fit range [{lo}, {hi}) needs {hi} positive eigenvalues, but the "
                f"spectrum has {int(h['positive'])} of {size} (use more samples or features, "
                "or a smaller fit_range)", lo, hi)
        return PowerLawFit(float(h["alpha"]), float(h["intercept"]), float(h["r2"]), (lo, hi),
                           float(h["r2_w"]))

    return Pending(tensors, finish)


# --------------------------------------------------------------------------- shared computes
# A metric is computed from a view of an accumulator (:class:`_CachedSpectra`) by one
# ``_<metric>_read(view, …)``, which answers with device tensors (a :class:`Pending`, read
# with the whole evaluation, or at once by ``.result()``).  The metric's one-shot function,
# its streaming class and its registered probe all call that one reader, as torchmetrics'
# functional and module forms share their ``_update`` / ``_compute`` helpers.
SPECTRA = ("singular", "covariance")
"""The spectra a metric can be taken of: ``"singular"``, the singular values of the raw
features (``min(n, d)`` of them); ``"covariance"``, the eigenvalues of the covariance of the
column-centred features (``d`` of them)."""


def _check_spectrum(spectrum: str) -> str:
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be 'singular' or 'covariance'; got {spectrum!r}")
    return spectrum


def _spectrum_of(view: _CachedSpectra, spectrum: str) -> tuple[torch.Tensor, bool]:
    """The spectrum named ``spectrum`` (:data:`SPECTRA`) and whether it is of the centred
    features."""
    if _check_spectrum(spectrum) == "singular":
        return view.singular_values(), False
    return view.covariance_spectrum(), True


def _rankme_read(view: _CachedSpectra, eps: float = DEFAULT_EPS,
                 spectrum: str = "singular") -> Pending:
    """RankMe (:func:`rankme`) of the accumulated features, pending."""
    s, centered = _spectrum_of(view, spectrum)
    return _rankme_of_spectrum(s, eps, view.checks(centered, "RankMe"))


def _alpha_req_read(view: _CachedSpectra,
                    fit_range: tuple[int, int] = DEFAULT_FIT_RANGE) -> Pending:
    """alpha-ReQ's :class:`PowerLawFit` (:func:`alpha_req_fit`) of the accumulated features,
    pending."""
    lo, hi = _fit_range(fit_range)
    return _power_law_pending(view.covariance_spectrum(), lo, hi, view.checks(True, "alpha-ReQ"))


def _participation_ratio_pending(view: _CachedSpectra) -> Pending:
    trace, frob2, bad = view.trace_tensors(centered=True)
    return scalar(trace * trace / frob2, [
        (bad, "participation ratio: the features are not finite, or their second moment "
              "overflows float64"),
        (~(frob2 > 0), "participation ratio: the features are constant (zero covariance)")])


def _stable_rank_pending(view: _CachedSpectra, centered: bool = False) -> Pending:
    evals = view.eigenvalues(centered)
    return scalar(evals.sum() / evals[0], [
        *view.checks(centered, "stable rank"),
        (~(evals[0] > 0), "stable rank: the matrix is zero (NaN)")])


def _effective_rank_pending_of(view: _CachedSpectra, order: float = 1.0,
                               spectrum: str = "singular") -> Pending:
    s, centered = _spectrum_of(view, spectrum)
    return _effective_rank_pending(s, order, view.checks(centered, "effective rank"))


def _view(acc: SpectrumAccumulator | _CachedSpectra) -> _CachedSpectra:
    return acc if isinstance(acc, _CachedSpectra) else _CachedSpectra(acc)


def _participation_ratio_compute(acc: SpectrumAccumulator) -> float:
    return _participation_ratio_pending(_view(acc)).result()


def _stable_rank_compute(acc: SpectrumAccumulator, centered: bool = False) -> float:
    return _stable_rank_pending(_view(acc), centered).result()


def _effective_rank_compute(acc: SpectrumAccumulator, order: float = 1.0,
                            spectrum: str = "singular") -> float:
    return _effective_rank_pending_of(_view(acc), order, spectrum).result()


# --------------------------------------------------------------------------- one-shot functions
def rankme(features: ArrayLike, eps: float = DEFAULT_EPS, spectrum: str = "singular") -> float:
    r"""RankMe of features: the exponential of the entropy of their normalised spectrum.

    .. math:: \mathrm{RankMe}(Z) = \exp\Big(-\sum_{k} p_k \ln p_k\Big),\qquad
              p_k = \frac{s_k}{\sum_j s_j} + \varepsilon

    With ``spectrum="singular"`` (default), ``s_k = σ_k(Z)`` are the ``min(n, d)`` singular
    values of the raw, uncentred ``Z`` — the definition of Garrido, Balestriero, Najman &
    LeCun, "RankMe: Assessing the downstream performance of pretrained self-supervised
    representations by their rank", ICML 2023, Eq. 1.

    With ``spectrum="covariance"``, ``s_k = λ_k(C)`` are the ``d`` eigenvalues of the
    covariance ``C = (1/n) Z_cᵀZ_c`` of the column-centred ``Z_c = Z − z̄`` (squared singular
    values of ``Z_c``, zeros included when ``n < d``): the variant of Agrawal et al. (NeurIPS
    2022) and Li et al., "Tracing the representation geometry of language models" (NeurIPS
    2025).  It is not the RankMe paper's formula and gives different numbers (≈613 vs ≈814 on
    a 1000 × 1024 Gaussian matrix).

    Parameters
    ----------
    features : array of shape (n, d)
        torch, numpy or jax (trailing axes are flattened); computed on the array's device in
        float64.
    eps : float
        ε added after normalisation (1e-7, the paper's value for float32).
    spectrum : {"singular", "covariance"}
        Which spectrum of the features (:data:`SPECTRA`).

    Returns
    -------
    float
        Between 1 and the number of entries of the spectrum (up to ε terms).  NaN, with a
        ``RuntimeWarning``, for all-zero (``"covariance"``: constant) or non-finite features,
        or a second moment that overflows float64.

    See Also
    --------
    RankMe : the streaming form (``update`` batch by batch, ``merge``, ``compute``); it gives
        the same value as this function on the same rows.
    rankme_from_spectrum : the formula on a spectrum already computed.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.random.default_rng(0).normal(size=(500, 8))
    >>> round(rankme(z), 2), round(rankme(z, spectrum="covariance"), 2)
    (7.98, 7.92)
    """
    _check_spectrum(spectrum)
    return _rankme_read(_CachedSpectra(_accumulate(features)), eps, spectrum).result()


def rankme_covariance(features: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    """``rankme(features, eps, spectrum="covariance")``: RankMe of the centred-covariance
    eigenvalues (Agrawal et al. 2022; Li et al. 2025), the function of the registered probe
    ``rankme_covariance``.  See :func:`rankme`."""
    return rankme(features, eps, spectrum="covariance")


def alpha_req_fit(
    features: ArrayLike, fit_range: tuple[int, int] = DEFAULT_FIT_RANGE
) -> PowerLawFit:
    """alpha-ReQ with the fit's details (:class:`PowerLawFit`): see :func:`alpha_req`."""
    return _alpha_req_read(_CachedSpectra(_accumulate(features)), fit_range).result()


def alpha_req(features: ArrayLike, fit_range: tuple[int, int] = DEFAULT_FIT_RANGE) -> float:
    r"""alpha-ReQ: decay exponent of the centred-covariance eigenspectrum, ``λ_r ∝ r^{-α}``.

    .. math:: \hat\alpha = \arg\min_{\alpha,\,c}\sum_{r} \frac{1}{r}
              \big(\ln\lambda_r - c + \alpha\ln r\big)^2,\qquad
              r = \mathrm{lo}+1, \dots, \mathrm{hi}

    Agrawal, Mondal, Ghosh & Richards, "α-ReQ: Assessing representation quality in
    self-supervised learning by measuring eigenspectrum decay", NeurIPS 2022 (Eq. 2).  ``λ_r``
    are the eigenvalues of the covariance ``C = (1/n) Z_cᵀZ_c`` of the **column-centred**
    features, in descending order; the fit is the weighted log-log least squares of
    :func:`power_law_fit` (weights ``1/r``, following Stringer et al. 2019).

    Parameters
    ----------
    features : array of shape (n, d)
        torch, numpy or jax; computed on the array's device in float64.
    fit_range : (int, int)
        0-based half-open index range ``[lo, hi)`` of the fit (default ``[10, 100)``, i.e.
        ranks 11..100, reptrix's default; the "Tracing" paper uses ``[11, 100)``).

    Returns
    -------
    float
        α (positive for a decaying spectrum); NaN with a warning when there are fewer
        positive eigenvalues than the fit range needs, or the features are not finite.

    See Also
    --------
    alpha_req_fit : the same fit with its intercept and R².
    AlphaReQ : the streaming form (``update`` batch by batch, ``merge``, ``compute``); it gives
        the same value as this function on the same rows.
    power_law_fit : the fit on a spectrum already computed.
    """
    return alpha_req_fit(features, fit_range).alpha


def participation_ratio(features: ArrayLike) -> float:
    r"""Participation ratio of the centred covariance ``C``:

    .. math:: \mathrm{PR} = \frac{(\sum_k \lambda_k)^2}{\sum_k \lambda_k^2}
              = \frac{(\operatorname{Tr} C)^2}{\lVert C\rVert_F^2}

    Gao, Trautmann, Yu, Santhanam, Ryu, Shenoy & Ganguli, "A theory of multineuronal
    dimensionality, dynamics and measurement", bioRxiv 2017 (Eq. 1); Recanatesi et al. (2019).
    Computed from the trace and Frobenius norm, without an eigensolve.  Between 1 and
    ``rank(C)``; NaN with a warning for constant or non-finite features.
    """
    return _participation_ratio_compute(_accumulate(features))


def stable_rank(features: ArrayLike, centered: bool = False) -> float:
    r"""Stable (numerical) rank ``‖Z‖_F² / ‖Z‖_2² = Σ_k σ_k² / σ_1²``.

    Rudelson & Vershynin, "Sampling from large matrices: an approach through geometric
    functional analysis", J. ACM 54 (2007), Sec. 1.4.  ``centered=True`` uses the column-
    centred ``Z``.  Between 1 and ``rank(Z)``; NaN with a warning for a zero matrix.
    """
    return _stable_rank_compute(_accumulate(features), centered)


def effective_rank(features: ArrayLike, order: float = 1.0, spectrum: str = "singular") -> float:
    """Rényi effective rank of the singular values of raw ``Z`` (``spectrum="singular"``) or
    of the centred covariance eigenvalues (``"covariance"``): see
    :func:`effective_rank_from_spectrum`.  ``order=1, spectrum="singular"`` is Roy & Vetterli's
    effective rank (2007)."""
    return _effective_rank_compute(_accumulate(features), order, spectrum)


# --------------------------------------------------------------------------- streaming metrics
class _StreamingSpectral:
    """Base of the streaming metrics: one :class:`SpectrumAccumulator` (the state) and a
    ``compute`` that reads the metric from it.

    Parameters
    ----------
    batch_dtype : torch.dtype or None
        dtype of each batch's product (see :class:`SpectrumAccumulator`).
    """

    def __init__(self, batch_dtype: torch.dtype | None = STAT_DTYPE) -> None:
        self.accumulator = SpectrumAccumulator(batch_dtype)

    def update(self, features: ArrayLike) -> _StreamingSpectral:
        """Add a batch ``(batch, d)`` (trailing axes are flattened); returns ``self``."""
        self.accumulator.update(features)
        return self

    def merge(self, other: _StreamingSpectral | SpectrumAccumulator) -> _StreamingSpectral:
        """Add everything ``other`` has seen (e.g. the same metric on another process, device
        or shard of the data); returns ``self``.

        Every streaming spectral metric keeps the same state, so ``other`` may be any of them,
        or a :class:`SpectrumAccumulator`; this metric's own parameters (``eps``, ``spectrum``,
        ``fit_range`` …) are the ones :meth:`compute` uses.  The result equals feeding both
        streams to one metric, up to float64 round-off (:meth:`SpectrumAccumulator.merge`).
        """
        acc = other.accumulator if isinstance(other, _StreamingSpectral) else other
        if not isinstance(acc, SpectrumAccumulator):
            raise TypeError(f"cannot merge a {type(other).__name__} into a "
                            f"{type(self).__name__}: give a streaming spectral metric or a "
                            "SpectrumAccumulator")
        if acc is self.accumulator:
            raise ValueError("cannot merge a metric with itself")
        self.accumulator.merge(acc)
        return self

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.accumulator.reset()

    def compute(self) -> object:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.accumulator.n}, d={self.accumulator.d})"


class RankMe(_StreamingSpectral):
    r"""Streaming RankMe: :func:`rankme` of every row given to :meth:`update` (and
    :meth:`merge`), with memory ``O(d²)`` whatever the number of rows.

    .. math:: \mathrm{RankMe}(Z) = \exp\Big(-\sum_{k} p_k \ln p_k\Big),\qquad
              p_k = \frac{s_k}{\sum_j s_j} + \varepsilon

    Garrido, Balestriero, Najman & LeCun, ICML 2023, Eq. 1, with ``s_k`` the singular values
    of the raw rows (``spectrum="singular"``) or the eigenvalues of their centred covariance
    (``spectrum="covariance"``: Agrawal et al. 2022; Li et al. 2025).  The one-shot
    :func:`rankme` and the registered probes ``rankme`` / ``rankme_covariance`` compute the
    same value from the same :class:`SpectrumAccumulator`.

    Parameters
    ----------
    eps : float
        ε added after normalisation (1e-7, the paper's value for float32).
    spectrum : {"singular", "covariance"}
        Which spectrum of the features (:data:`SPECTRA`).
    batch_dtype : torch.dtype or None
        dtype of each batch's product (see :class:`SpectrumAccumulator`); float64 (default)
        gives :func:`rankme`'s value to float64 round-off.

    Examples
    --------
    >>> metric = RankMe()
    >>> for batch in loader:                    # doctest: +SKIP
    ...     metric.update(model_features(batch))
    >>> metric.compute()                        # doctest: +SKIP
    """

    def __init__(self, eps: float = DEFAULT_EPS, spectrum: str = "singular",
                 batch_dtype: torch.dtype | None = STAT_DTYPE) -> None:
        super().__init__(batch_dtype)
        self.eps, self.spectrum = eps, _check_spectrum(spectrum)

    def compute(self) -> float:
        """RankMe of everything seen (NaN with a warning: see :func:`rankme`); raises
        ``ValueError`` when nothing was seen."""
        return _rankme_read(_CachedSpectra(self.accumulator), self.eps, self.spectrum).result()


class AlphaReQ(_StreamingSpectral):
    """Streaming alpha-ReQ: :func:`alpha_req` (Agrawal, Mondal, Ghosh & Richards, NeurIPS 2022,
    Eq. 2) of every row given to :meth:`update` (and :meth:`merge`), with memory ``O(d²)``.

    :meth:`compute` gives α, :meth:`compute_fit` the whole :class:`PowerLawFit` (as
    :func:`alpha_req_fit`).  The one-shot functions and the registered probe ``alpha_req``
    compute the same values from the same :class:`SpectrumAccumulator`.

    Parameters
    ----------
    fit_range : (int, int)
        0-based half-open index range of the fit (see :func:`alpha_req`).
    batch_dtype : torch.dtype or None
        dtype of each batch's product (see :class:`SpectrumAccumulator`).
    """

    def __init__(self, fit_range: tuple[int, int] = DEFAULT_FIT_RANGE,
                 batch_dtype: torch.dtype | None = STAT_DTYPE) -> None:
        super().__init__(batch_dtype)
        _fit_range(fit_range)  # a bad range fails here, not at compute()
        self.fit_range = fit_range

    def compute_fit(self) -> PowerLawFit:
        """The power-law fit of everything seen (see :func:`alpha_req_fit`)."""
        return _alpha_req_read(_CachedSpectra(self.accumulator), self.fit_range).result()

    def compute(self) -> float:
        """α of everything seen (see :func:`alpha_req`)."""
        return self.compute_fit().alpha


class ParticipationRatio(_StreamingSpectral):
    """Streaming :func:`participation_ratio`."""

    def compute(self) -> float:
        return _participation_ratio_compute(self.accumulator)


class StableRank(_StreamingSpectral):
    """Streaming :func:`stable_rank`."""

    def __init__(self, centered: bool = False, batch_dtype: torch.dtype | None = STAT_DTYPE):
        super().__init__(batch_dtype)
        self.centered = centered

    def compute(self) -> float:
        return _stable_rank_compute(self.accumulator, self.centered)


class EffectiveRank(_StreamingSpectral):
    """Streaming :func:`effective_rank`."""

    def __init__(self, order: float = 1.0, spectrum: str = "singular",
                 batch_dtype: torch.dtype | None = STAT_DTYPE):
        super().__init__(batch_dtype)
        self.order, self.spectrum = order, spectrum

    def compute(self) -> float:
        return _effective_rank_compute(self.accumulator, self.order, self.spectrum)


class _CachedSpectra:
    """The accumulator's spectra, each computed once (for several metrics at one time), as
    device tensors that are never read on the host here.

    The spectrum of non-finite features (or of a second moment that overflows float64) is NaN,
    set on the device after solving a zero matrix in its place; :meth:`checks` gives the flags
    that turn the metrics into NaN with the reason when the evaluation's results are read
    (:mod:`probes._pending`).

    Views joined by :func:`prepare_spectra` (the ``"spectrum"`` accumulator's ``prepare``)
    share a :class:`_SpectrumBatch`: the first eigenvalue request of one of them solves that
    variant (raw or centred) for every view of the batch in batched calls."""

    def __init__(self, acc: SpectrumAccumulator) -> None:
        self.acc = acc
        self._memo: dict = {}
        self._batch: _SpectrumBatch | None = None

    def _get(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def _solve(self, centered: bool) -> None:
        matrix, nonfinite, overflow = self.acc.masked_matrix(centered)
        self._store(centered, eigvalsh(matrix), nonfinite, overflow)

    def _store(self, centered: bool, raw: torch.Tensor, nonfinite: torch.Tensor,
               overflow: torch.Tensor) -> None:
        """Keep the eigenvalues of a solve — NaN, set on the device, where the flags hold, so
        that a probe reading them directly never sees the zero matrix's finite spectrum."""
        evals = self.acc.eigenvalues_from(raw)
        self._memo[("eig", centered)] = torch.where(
            nonfinite | overflow, torch.full((), float("nan"), dtype=evals.dtype,
                                             device=evals.device), evals)
        self._memo[("flags", centered)] = (nonfinite, overflow)

    def eigenvalues(self, centered: bool) -> torch.Tensor:
        key = ("eig", centered)
        if key not in self._memo and self._batch is not None:
            self._batch.solve(centered)
        if key not in self._memo:  # no batch, or no samples (this raises the ValueError)
            self._solve(centered)
        return self._memo[key]

    def checks(self, centered: bool, what: str) -> Checks:
        """``[(nonfinite, reason), (overflow, reason)]`` of the ``centered`` spectrum."""
        self.eigenvalues(centered)
        nonfinite, overflow = self._memo[("flags", centered)]
        return [(nonfinite, f"{what}: {NONFINITE}"), (overflow, f"{what}: {OVERFLOW}")]

    def singular_values(self) -> torch.Tensor:
        return self._get("sv", lambda: (self.eigenvalues(False) * self.acc.n).sqrt())

    def covariance_spectrum(self) -> torch.Tensor:
        def padded() -> torch.Tensor:
            evals = self.eigenvalues(True)
            extra = self.acc.d - evals.numel()  # n < d: the other d − n are zero (NaN if bad)
            if extra <= 0:
                return evals
            return torch.cat([evals, (evals[:1] * 0).expand(extra)])
        return self._get("cov", padded)

    def trace_tensors(self, centered: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._get(("tm", centered), lambda: self.acc.trace_tensors(centered))


class _SpectrumBatch:
    """Views of several layers whose eigenproblems are solved together (lazily, per variant,
    so that no solve is made that no probe asks for)."""

    def __init__(self, views: Sequence[_CachedSpectra]) -> None:
        self.views = list(views)

    def solve(self, centered: bool) -> None:
        key = ("eig", centered)
        todo = [v for v in self.views if key not in v._memo and v.acc.n > 0]
        masked = [v.acc.masked_matrix(centered) for v in todo]
        raws = batched_eigvalsh([m for m, _, _ in masked])
        for v, (_, nonfinite, overflow), raw in zip(todo, masked, raws, strict=True):
            v._store(centered, raw, nonfinite, overflow)


def prepare_spectra(views: Sequence[_CachedSpectra]) -> None:
    """``prepare`` of the ``"spectrum"`` accumulator (:class:`probes.registry.Accumulator`):
    join every layer's view into one :class:`_SpectrumBatch`, so that layers with the same
    ``d`` (same matrix shape) are eigendecomposed in one batched ``torch.linalg.eigvalsh`` call
    (:func:`probes._solve.batched_eigvalsh`) — bit-identical values to per-layer solves on the
    CPU — and small solves run where :mod:`probes._solve` places them."""
    batch = _SpectrumBatch([v for v in views if isinstance(v, _CachedSpectra)])
    for v in batch.views:
        v._batch = batch


SPECTRAL_METRICS: dict[str, Callable[[SpectrumAccumulator], float]] = {
    "rankme": lambda acc: _rankme_read(_view(acc)).result(),
    "rankme_covariance": lambda acc: _rankme_read(_view(acc), spectrum="covariance").result(),
    "alpha_req": lambda acc: _alpha_req_read(_view(acc)).result().alpha,
    "alpha_req_r2": lambda acc: _alpha_req_read(_view(acc)).result().r2,
    "participation_ratio": _participation_ratio_compute,
    "stable_rank": _stable_rank_compute,
    "effective_rank": _effective_rank_compute,
}
"""Metrics :class:`SpectralMetrics` can compute from one accumulator (default parameters)."""


class SpectralMetrics(_StreamingSpectral):
    """Several spectral metrics from one pass and one accumulator.

    ``SpectralMetrics(["rankme", "alpha_req"])`` accumulates once and ``compute()`` returns
    ``{"rankme": …, "alpha_req": …}``; each value equals the one-shot function's, and all of
    them are read from the device together.  Names are keys of :data:`SPECTRAL_METRICS`;
    ``fit_range`` and ``eps`` apply to alpha-ReQ and RankMe.
    """

    def __init__(self, metrics: Sequence[str] = ("rankme", "alpha_req"),
                 eps: float = DEFAULT_EPS, fit_range: tuple[int, int] = DEFAULT_FIT_RANGE,
                 batch_dtype: torch.dtype | None = STAT_DTYPE):
        super().__init__(batch_dtype)
        unknown = [m for m in metrics if m not in SPECTRAL_METRICS]
        if unknown:
            raise KeyError(f"unknown spectral metrics {unknown}; available: "
                           f"{', '.join(SPECTRAL_METRICS)}")
        self.metrics, self.eps, self.fit_range = tuple(metrics), eps, fit_range

    def compute(self) -> dict[str, float]:
        view = _CachedSpectra(self.accumulator)
        pendings: dict[str, Pending] = {}
        for name in self.metrics:
            if name in ("alpha_req", "alpha_req_r2"):
                pendings.setdefault("fit", _alpha_req_read(view, self.fit_range))
            elif name in ("rankme", "rankme_covariance"):
                pendings[name] = _rankme_read(
                    view, self.eps, "singular" if name == "rankme" else "covariance")
            else:
                pendings[name] = _METRIC_PENDINGS[name](view)
        results = dict(zip(pendings, finish_all(list(pendings.values())), strict=True))
        return {name: (results["fit"].alpha if name == "alpha_req" else results["fit"].r2)
                if name in ("alpha_req", "alpha_req_r2") else results[name]
                for name in self.metrics}


_METRIC_PENDINGS = {"participation_ratio": _participation_ratio_pending,
                    "stable_rank": _stable_rank_pending,
                    "effective_rank": _effective_rank_pending_of}


# --------------------------------------------------------------------------- registry
def _read_alpha_req(view: _CachedSpectra,
                    fit_range: tuple[int, int] = DEFAULT_FIT_RANGE) -> Pending:
    return _alpha_req_read(view, tuple(fit_range)).then(
        lambda fit: {"alpha_req": fit.alpha, "alpha_req_r2": fit.r2})


_SPECTRUM_READERS = {  # from_accumulator of each registered probe: pending device values
    "rankme": _rankme_read,
    "rankme_covariance": functools.partial(_rankme_read, spectrum="covariance"),
    "alpha_req": _read_alpha_req, "participation_ratio": _participation_ratio_pending,
    "stable_rank": _stable_rank_pending, "effective_rank": _effective_rank_pending_of,
}

_PROBES = (
    ("rankme", rankme, {"rankme": ("RankMe effective rank (raw singular values)", "1")},
     "Garrido, Balestriero, Najman, LeCun (ICML 2023), Eq. 1"),
    ("rankme_covariance", rankme_covariance,
     {"rankme_covariance": ("RankMe of centred-covariance eigenvalues", "1")},
     "Agrawal et al. (NeurIPS 2022); Li et al. (NeurIPS 2025)"),
    ("alpha_req", alpha_req,
     {"alpha_req": ("alpha-ReQ eigenspectrum decay exponent", "1"),
      "alpha_req_r2": ("R² of the alpha-ReQ power-law fit", "1")},
     "Agrawal, Mondal, Ghosh, Richards (NeurIPS 2022), Eq. 2"),
    ("participation_ratio", participation_ratio,
     {"participation_ratio": ("participation ratio of the centred covariance", "1")},
     "Gao et al. (2017), A theory of multineuronal dimensionality, Eq. 1"),
    ("stable_rank", stable_rank, {"stable_rank": ("stable rank ||Z||_F^2/||Z||_2^2", "1")},
     "Rudelson & Vershynin (2007), J. ACM 54, Sec. 1.4"),
    ("effective_rank", effective_rank,
     {"effective_rank": ("effective rank (exp entropy of singular values)", "1")},
     "Roy & Vetterli (2007), The effective rank, EUSIPCO, Eq. 3"),
)


def register_probes() -> None:
    """Register the spectral probes and their shared ``"spectrum"`` accumulator in
    :mod:`probes.registry` (idempotent; done when this module is imported)."""
    from traindyn.probes.registry import (
        Accumulator,
        Probe,
        Variable,
        register,
        register_accumulator,
    )

    register_accumulator(Accumulator("spectrum", SpectrumAccumulator, _CachedSpectra,
                                     prepare=prepare_spectra))
    for name, fn, variables, source in _PROBES:
        register(Probe(name, "features", {k: Variable(*v) for k, v in variables.items()},
                       source, fn=fn, accumulator="spectrum",
                       from_accumulator=_SPECTRUM_READERS[name]))


register_probes()
