r"""Geometric phases of training from RankMe and alpha-ReQ trajectories (traindyn's detector).

Li et al., "Tracing the representation geometry of language models from pretraining to
post-training" (NeurIPS 2025) describe three phases of LLM pretraining read off plots of
RankMe and alpha-ReQ over log-spaced checkpoints:

* **warm-up** – an initial rapid collapse of RankMe (representations fold onto a few
  directions);
* **entropy-seeking** – RankMe rises while α falls (the spectrum flattens, variance spreads
  over more directions);
* **compression-seeking** – RankMe falls while α rises (variance concentrates in the leading
  directions, anisotropic consolidation).

The paper gives no algorithm.  **The automatic detector here is traindyn's own design**, not
the authors'; it decides as follows.

1. Put the checkpoints on a log-step axis ``x = ln(1 + step)`` and take ``u = ln RankMe``
   (so that the rule does not depend on the units of RankMe) and ``v = α``.
2. Smooth derivatives ``u'(x)``, ``v'(x)``: at each checkpoint, the slope of a local linear
   least-squares fit with Gaussian weights ``exp(−(x_j − x_i)² / 2h²)`` (a local-linear
   kernel smoother; Fan & Gijbels 1996, Ch. 3).  The bandwidth ``h`` is
   ``bandwidth × (x_max − x_min)``.
3. A derivative counts as zero ("flat") when ``|u'| ≤ tol_u`` with
   ``tol_u = max(rel_tol · (max u − min u)/(x_max − x_min), abs_tol_rankme)``, and likewise for
   ``v`` with ``abs_tol_alpha``: a change must be a visible fraction of the whole excursion.
4. Labels: the leading run of checkpoints with ``u' < 0`` is ``"warmup"`` (or every step
   before ``warmup_end`` when that is given); afterwards ``u' > 0, v' < 0`` is
   ``"entropy_seeking"``, ``u' < 0, v' > 0`` is ``"compression_seeking"``, and anything else
   (both rising, both falling, either flat, or NaN inputs) is ``"undetermined"``.
"""

from __future__ import annotations

import warnings

import numpy as np
from traindyn.probes._arrays import ArrayLike

__all__ = ["PHASES", "geometric_phases", "phase_segments", "smoothed_log_derivatives"]

PHASES: tuple[str, ...] = ("warmup", "entropy_seeking", "compression_seeking", "undetermined")


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(getattr(x, "values", x), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per checkpoint); got shape {arr.shape}")
    return arr


def smoothed_log_derivatives(
    step: ArrayLike, values: ArrayLike, bandwidth: float = 0.05
) -> np.ndarray:
    r"""Derivative ``dy/dx`` at each checkpoint, ``x = ln(1 + step)``, by local-linear smoothing.

    At ``x_i`` the slope of the weighted least-squares line through ``(x_j, y_j)`` with
    weights ``w_j = exp(−(x_j−x_i)²/2h²)``, ``h = bandwidth·(x_max − x_min)``:

    .. math:: y'(x_i) = \frac{\sum_j w_j (x_j-\bar x_w)(y_j-\bar y_w)}{\sum_j w_j (x_j-\bar x_w)^2}

    (Fan & Gijbels, *Local polynomial modelling*, 1996, Ch. 3).  NaN values get weight 0.
    """
    x = np.log1p(_as_1d(step, "step"))
    y = _as_1d(values, "values")
    h = bandwidth * (x[-1] - x[0])
    if not h > 0:
        raise ValueError("bandwidth and the span of steps must be positive")
    ok = np.isfinite(y)
    w = np.exp(-0.5 * ((x[None, :] - x[:, None]) / h) ** 2) * ok[None, :]
    y0 = np.where(ok, y, 0.0)
    sw = w.sum(1)
    xm = (w * x).sum(1) / sw
    ym = (w * y0).sum(1) / sw
    dx = x[None, :] - xm[:, None]
    sxx = (w * dx**2).sum(1)
    sxy = (w * dx * (y0[None, :] - ym[:, None])).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sxx > 0, sxy / sxx, np.nan)


def geometric_phases(
    step: ArrayLike,
    rankme: ArrayLike,
    alpha: ArrayLike,
    bandwidth: float = 0.05,
    rel_tol: float = 0.1,
    abs_tol_rankme: float = 0.01,
    abs_tol_alpha: float = 0.005,
    warmup_end: int | None = None,
) -> np.ndarray:
    """Label each checkpoint with a geometric phase from RankMe and alpha-ReQ trajectories.

    The detector is traindyn's own design (module docstring), after the phases described by
    Li et al. (NeurIPS 2025).

    Parameters
    ----------
    step : array (T,)
        Checkpoint steps, strictly increasing, ``>= 0`` (log-spaced in typical use).
    rankme, alpha : array (T,)
        RankMe (either variant; positive) and alpha-ReQ at those steps.
    bandwidth : float
        Smoothing bandwidth as a fraction of the span of ``ln(1 + step)``.
    rel_tol : float
        A derivative below ``rel_tol`` × (total excursion / span of log-steps) is flat.
    abs_tol_rankme, abs_tol_alpha : float
        Floors of the flatness thresholds for ``d ln RankMe / d ln step`` and
        ``d α / d ln step`` (so that noise on a flat trajectory is not read as a phase).
    warmup_end : int, optional
        Known end of the warm-up (e.g. the learning-rate warm-up length): steps before it are
        ``"warmup"``.  By default the warm-up is the leading run of falling RankMe.

    Returns
    -------
    numpy.ndarray of str, shape (T,)
        One of :data:`PHASES` per checkpoint.
    """
    steps = _as_1d(step, "step")
    r = _as_1d(rankme, "rankme")
    a = _as_1d(alpha, "alpha")
    if not (steps.shape == r.shape == a.shape):
        raise ValueError(f"step, rankme and alpha must have the same length; got "
                         f"{steps.size}, {r.size}, {a.size}")
    if steps.size < 3:
        raise ValueError(f"step: need at least 3 checkpoints to take derivatives; got "
                         f"{steps.size}")
    if not np.all(np.isfinite(steps)):
        raise ValueError("step must be finite (NaN or Inf found)")
    if np.any(steps < 0) or np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be non-negative and strictly increasing")
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(r > 0, np.log(r), np.nan)
    bad = ~(np.isfinite(u) & np.isfinite(a))
    if bad.any():
        warnings.warn(f"geometric_phases: {int(bad.sum())} checkpoints have NaN/non-positive "
                      "RankMe or NaN alpha; they are 'undetermined' and left out of the "
                      "smoothing", RuntimeWarning, stacklevel=2)
        u, a = np.where(bad, np.nan, u), np.where(bad, np.nan, a)
    x = np.log1p(steps)
    span = x[-1] - x[0]
    du = smoothed_log_derivatives(steps, u, bandwidth)
    da = smoothed_log_derivatives(steps, a, bandwidth)

    def signs(deriv: np.ndarray, y: np.ndarray, floor: float) -> np.ndarray:
        excursion = np.nanmax(y) - np.nanmin(y) if np.isfinite(y).any() else 0.0
        tol = max(rel_tol * excursion / span, floor)
        return np.where(deriv > tol, 1, np.where(deriv < -tol, -1, 0))

    su, sa = signs(du, u, abs_tol_rankme), signs(da, a, abs_tol_alpha)
    labels = np.full(steps.size, "undetermined", dtype="<U19")
    labels[(su > 0) & (sa < 0)] = "entropy_seeking"
    labels[(su < 0) & (sa > 0)] = "compression_seeking"
    if warmup_end is not None:
        labels[steps < warmup_end] = "warmup"
    else:
        i = 0
        while i < steps.size and su[i] < 0 and not bad[i]:
            labels[i] = "warmup"
            i += 1
    labels[bad] = "undetermined"
    return labels


def phase_segments(step: ArrayLike, labels: ArrayLike) -> list[tuple[int, int, str]]:
    """Runs of equal labels as ``(first_step, last_step, label)``, in order."""
    steps = _as_1d(step, "step")
    labels = np.asarray(labels)
    if steps.shape != labels.shape:
        raise ValueError("step and labels must have the same length")
    if not np.all(np.isfinite(steps)):
        raise ValueError("step must be finite (NaN or Inf found)")
    out: list[tuple[int, int, str]] = []
    start = 0
    for i in range(1, steps.size + 1):
        if i == steps.size or labels[i] != labels[start]:
            out.append((int(steps[start]), int(steps[i - 1]), str(labels[start])))
            start = i
    return out
