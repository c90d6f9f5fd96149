r"""Spectra of weight matrices: norms, stable rank, Marchenko–Pastur bulk, heavy-tail exponent.

For a weight matrix ``W`` of shape ``m × n`` (convolution kernels are reshaped to
``out × (in·k…)``), let ``N = max(m, n)``, ``M = min(m, n)``, ``γ = M/N``.  Its empirical
spectral density (ESD) is that of the ``M`` eigenvalues ``λ_i = σ_i(W)² / N``.  For i.i.d.
entries of variance ``s²`` the ESD follows Marchenko–Pastur with edges ``s²(1 ± √γ)²``
(Marchenko & Pastur 1967; the density is :func:`theory.linear.marchenko_pastur_density`,
integrated here in its angular form).

**Heavy-tail exponent.**  Martin & Mahoney ("Implicit self-regularization in deep neural
networks", JMLR 22 (2021); "Heavy-tailed universality predicts trends in test accuracies",
2019) fit a power law ``ρ(λ) ∝ λ^{−α}`` to the tail of the ESD with the method of Clauset,
Shalizi & Newman (SIAM Review 51 (2009), Eq. 3.1 and Sec. 3.3): the continuous maximum-
likelihood (Hill) estimate ``α̂ = 1 + k / Σ_{λ_i ≥ λ_min} ln(λ_i/λ_min)`` with ``λ_min``
chosen to minimise the Kolmogorov–Smirnov distance.  On a Marchenko–Pastur ESD that procedure
picks ``λ_min`` just below the sharp upper edge, where a handful of eigenvalues are packed
together, and returns huge exponents (α ≫ 6) for a matrix with no heavy tail at all.

**traindyn's guard** (our design, stated here): a heavy tail needs eigenvalues *beyond* the
bulk.  The bulk scale ``s²`` is estimated robustly by matching the median eigenvalue to the
median of Marchenko–Pastur with ratio ``γ`` (a trace-based estimate is inflated by the tail
itself); eigenvalues above ``s²(1+√γ)²(1 + 3M^{−2/3})`` (the edge plus a few Tracy–Widom
fluctuation widths, which scale as ``M^{−2/3}``) are *outliers*.  The fit is reported as
``alpha`` only when there are at least ``min_tail`` outliers and the KS search is restricted
to tails of at least ``min_tail`` eigenvalues; otherwise ``alpha`` is NaN and
``heavy_tailed`` is 0 (an MP bulk, possibly with a few spikes, in Martin & Mahoney's
taxonomy).  The unguarded Clauset fit is kept as ``alpha_unguarded`` for comparison.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.probes._arrays import STAT_DTYPE, ArrayLike, all_finite, as_features, as_tensor
from traindyn.probes._pending import Pending, finish_all
from traindyn.probes._solve import lapack_single_thread, solve_device

__all__ = [
    "TailFit",
    "WEIGHT_VARIABLES",
    "esd",
    "marchenko_pastur_scale",
    "power_law_tail_fit",
    "weight_spectra",
    "weight_spectrum",
]

SOURCE = (
    "Martin & Mahoney (2021), Implicit self-regularization in deep neural networks, JMLR 22; "
    "Clauset, Shalizi & Newman (2009), Power-law distributions in empirical data, SIAM Rev. "
    "51; Marchenko & Pastur (1967); Rudelson & Vershynin (2007)"
)

WEIGHT_VARIABLES: dict[str, dict[str, str]] = {
    "spectral_norm": {"long_name": "spectral norm ||W||_2", "units": "1"},
    "frobenius_norm": {"long_name": "Frobenius norm ||W||_F", "units": "1"},
    "stable_rank": {"long_name": "stable rank ||W||_F^2/||W||_2^2", "units": "1"},
    "effective_rank": {"long_name": "effective rank (exp entropy of singular values)",
                       "units": "1"},
    "lambda_max": {"long_name": "largest ESD eigenvalue sigma_1^2/N", "units": "1"},
    "mp_scale": {"long_name": "Marchenko-Pastur bulk variance s^2 (median-matched)",
                 "units": "1"},
    "mp_edge": {"long_name": "Marchenko-Pastur upper edge s^2 (1+sqrt(gamma))^2", "units": "1"},
    "n_outliers": {"long_name": "ESD eigenvalues beyond the Marchenko-Pastur edge",
                   "units": "1"},
    "heavy_tailed": {"long_name": "1 if the ESD has a tail beyond the MP bulk, else 0",
                     "units": "1"},
    "alpha": {"long_name": "power-law exponent of the ESD tail (NaN without a heavy tail)",
              "units": "1"},
    "alpha_unguarded": {"long_name": "power-law exponent of the ESD tail, plain Clauset fit",
                        "units": "1"},
    "tail_xmin": {"long_name": "lower end lambda_min of the power-law tail", "units": "1"},
    "tail_size": {"long_name": "number of eigenvalues in the power-law tail", "units": "1"},
    "tail_ks": {"long_name": "Kolmogorov-Smirnov distance of the power-law tail fit",
                "units": "1"},
}
"""Variables of :func:`weight_spectra` (over ``layer``) with their attributes."""


def _as_matrix(weight: ArrayLike) -> torch.Tensor:
    w = as_tensor(weight)
    if w.numel() == 0:
        raise ValueError(f"weight is empty: shape {tuple(w.shape)}")
    if w.ndim < 2:
        raise ValueError(f"a weight matrix needs at least 2 dimensions; got shape "
                         f"{tuple(w.shape)}")
    return as_features(w.reshape(w.shape[0], -1), "weight").to(STAT_DTYPE)


def esd(weight: ArrayLike) -> torch.Tensor:
    """Eigenvalues ``σ_i(W)²/N`` of the ESD, descending, ``min(m, n)`` of them (float64, on
    the weight's device; NaN when ``W`` is not finite)."""
    w = _as_matrix(weight)
    if not all_finite(w):
        return torch.full((min(w.shape),), float("nan"), dtype=STAT_DTYPE, device=w.device)
    with lapack_single_thread(w.device):
        s = torch.linalg.svdvals(w)
    return s * s / max(w.shape)


def _mp_median(ratio: float) -> float:
    """Median of the Marchenko–Pastur law with ratio ``γ ≤ 1`` and unit variance.

    With ``λ = (1+γ) + 2√γ cos θ`` the mass element is ``ρ(λ)dλ = 4γ sin²θ / (2πλ) dθ``
    (smooth, also at the edges and for ``γ = 1``), integrated by the cumulative trapezoid
    rule (the substitution of :func:`theory.linear.marchenko_pastur_quadrature`).
    """
    theta = np.linspace(np.pi, 0.0, 20001)  # λ ascending
    lam = (1 + ratio) + 2 * np.sqrt(ratio) * np.cos(theta)
    mass = 4 * ratio * np.sin(theta) ** 2 / (2 * np.pi * np.where(lam > 0, lam, 1.0))
    mass = np.where(lam > 0, mass, 2 / np.pi)  # γ = 1: sin²θ/λ → 1 as λ → 0
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (mass[1:] + mass[:-1]) * -np.diff(theta))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, lam))


def marchenko_pastur_scale(eigenvalues: ArrayLike, ratio: float) -> tuple[float, float]:
    """``(s², edge)``: bulk variance from the median eigenvalue and the MP upper edge.

    ``s² = median(λ) / median_MP(γ)``, ``edge = s²(1 + √γ)²`` (Marchenko & Pastur 1967).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio γ = M/N must be in (0, 1]; got {ratio}")
    lam = as_tensor(eigenvalues).to(STAT_DTYPE).cpu().numpy()
    s2 = float(np.median(lam)) / _mp_median(ratio)
    return s2, float(s2 * (1 + np.sqrt(ratio)) ** 2)


@dataclass(frozen=True)
class TailFit:
    """Power-law tail ``p(λ) ∝ λ^{−alpha}`` for ``λ ≥ xmin`` (Clauset et al. 2009)."""

    alpha: float
    xmin: float
    n_tail: int
    ks: float


def power_law_tail_fit(samples: ArrayLike, min_tail: int = 10) -> TailFit:
    r"""Continuous power-law fit of the upper tail of ``samples`` (Clauset, Shalizi, Newman 2009).

    For each candidate ``x_min`` (every sample value leaving at least ``min_tail`` samples in
    the tail) the maximum-likelihood exponent (their Eq. 3.1)

    .. math:: \hat\alpha = 1 + k\Big/\sum_{x_i\ge x_{\min}} \ln\frac{x_i}{x_{\min}}

    and the Kolmogorov–Smirnov distance ``D = max |S(x) − P(x)|`` between the empirical CDF of
    the tail and ``P(x) = 1 − (x/x_min)^{1−α̂}`` are computed; the ``x_min`` with the smallest
    ``D`` is kept (their Sec. 3.3).  NaN fields when there are fewer than ``min_tail``
    positive finite samples.
    """
    x = as_tensor(samples).to(STAT_DTYPE).reshape(-1).cpu().numpy()
    x = np.sort(x[np.isfinite(x) & (x > 0)])
    if min_tail < 2:
        raise ValueError(f"min_tail must be at least 2; got {min_tail}")
    if x.size < min_tail:
        return TailFit(np.nan, np.nan, 0, np.nan)
    logx = np.log(x)
    suffix = np.cumsum(logx[::-1])[::-1]  # Σ_{i≥j} ln x_i
    best = TailFit(np.nan, np.nan, 0, np.inf)
    for j in range(0, x.size - min_tail + 1):
        if j and x[j] == x[j - 1]:
            continue
        k = x.size - j
        denom = suffix[j] - k * logx[j]
        if not denom > 0:
            continue
        alpha = 1.0 + k / denom
        tail = x[j:]
        model = 1.0 - (tail / x[j]) ** (1.0 - alpha)
        emp_hi = np.arange(1, k + 1) / k
        emp_lo = np.arange(0, k) / k
        ks = float(max(np.max(np.abs(emp_hi - model)), np.max(np.abs(emp_lo - model))))
        if ks < best.ks:
            best = TailFit(float(alpha), float(x[j]), int(k), ks)
    if not np.isfinite(best.ks):
        return TailFit(np.nan, np.nan, 0, np.nan)
    return best


def weight_spectrum(weight: ArrayLike, min_tail: int = 10) -> dict[str, float]:
    """Spectral summaries of one weight matrix (the variables of :data:`WEIGHT_VARIABLES`).

    Norms and ranks: ``spectral_norm = σ_1``, ``frobenius_norm = (Σσ²)^{1/2}``,
    ``stable_rank = Σσ²/σ_1²`` (Rudelson & Vershynin 2007), ``effective_rank`` =
    ``exp(−Σ p ln p)``, ``p = σ/Σσ`` (Roy & Vetterli 2007).  ESD, MP bulk and the guarded
    heavy-tail exponent as in the module docstring.  A non-finite or zero matrix gives NaN.
    """
    return weight_spectrum_pending(weight, min_tail).result()


def weight_spectrum_pending(weight: ArrayLike, min_tail: int = 10) -> Pending:
    """:func:`weight_spectrum` as a :class:`~probes._pending.Pending`.

    The device computes the singular values — where :func:`probes._solve.solve_device` places
    a solve of that size (small matrices on the CPU, where an SVD is faster than on a GPU) —
    and a finiteness flag; the summaries, which are sorting, medians and the KS search of the
    tail fit, run on the host from the ``min(m, n)`` singular values, read once with the
    rest of the evaluation."""
    w = _as_matrix(weight)
    m, n = w.shape
    finite = torch.isfinite(w).all()
    w = torch.where(finite, w, torch.zeros((), dtype=w.dtype, device=w.device))
    where = solve_device(min(m, n), w.device)
    with lapack_single_thread(where):  # a copy to the CPU (one wait) only for a small solve
        s = torch.linalg.svdvals(w if where == w.device else w.to(where))
    return Pending({"s": s, "finite": finite},
                   lambda host: _summaries(host["s"], bool(host["finite"]), m, n, min_tail))


def _summaries(s: np.ndarray, finite: bool, m: int, n: int, min_tail: int
               ) -> dict[str, float]:
    """The host half of :func:`weight_spectrum_pending`: summaries of the singular values."""
    ratio = min(m, n) / max(m, n)
    out = dict.fromkeys(WEIGHT_VARIABLES, float("nan"))
    if not finite:
        warnings.warn("weight has non-finite entries (NaN or Inf): its spectral summaries are "
                      "NaN", RuntimeWarning, stacklevel=3)
        return out
    if not s[0] > 0:
        warnings.warn("weight is zero: its norms are 0 and its ranks, ESD fit and tail are "
                      "undefined (NaN)", RuntimeWarning, stacklevel=3)
        out["spectral_norm"] = out["frobenius_norm"] = out["lambda_max"] = 0.0
        return out
    rel = s / s[0]  # scaled, so that no square overflows
    out["spectral_norm"] = float(s[0])
    out["frobenius_norm"] = float(s[0] * np.sqrt(np.sum(rel * rel)))
    out["stable_rank"] = float(np.sum(rel * rel))
    p = rel / rel.sum()
    p = p[p > 0]
    out["effective_rank"] = float(np.exp(-np.sum(p * np.log(p))))
    with np.errstate(over="ignore"):
        lam = s * s / max(m, n)
    if not np.all(np.isfinite(lam)):
        warnings.warn("weight: its ESD sigma^2/N overflows float64 (entries of about 1e154 or "
                      "more); the ESD, Marchenko-Pastur and tail summaries are NaN",
                      RuntimeWarning, stacklevel=3)
        return out
    out["lambda_max"] = float(lam[0])
    s2, edge = marchenko_pastur_scale(lam, ratio)
    out["mp_scale"], out["mp_edge"] = s2, edge
    n_out = int(np.sum(lam > edge * (1 + 3 * min(m, n) ** (-2.0 / 3.0))))
    out["n_outliers"] = float(n_out)
    fit = power_law_tail_fit(lam, min_tail)
    out["alpha_unguarded"] = fit.alpha
    heavy = n_out >= min_tail and np.isfinite(fit.alpha)
    out["heavy_tailed"] = float(heavy)
    if heavy:
        out["alpha"] = fit.alpha
        out["tail_xmin"], out["tail_size"], out["tail_ks"] = fit.xmin, float(fit.n_tail), fit.ks
    return out


def _named_weights(
    model: nn.Module | Mapping[str, ArrayLike], layers: str | Iterable[str] | None
) -> dict[str, ArrayLike]:
    if isinstance(model, nn.Module):
        items = {name: p.detach() for name, p in model.named_parameters() if p.ndim >= 2}
    else:
        items = {name: w for name, w in model.items() if as_tensor(w).ndim >= 2}
    if layers is None:
        return items
    if isinstance(layers, str):
        layers = [layers]
    chosen = {}
    for name in layers:
        key = name if name in items else f"{name}.weight"
        if key not in items:
            raise ValueError(_no_weight_message(model, name, items))
        chosen[key] = items[key]
    if not chosen:
        raise ValueError(f"layers is empty; layers with a weight matrix: "
                         f"{_layer_list(items)}")
    return chosen


def _layer_list(items: Mapping[str, ArrayLike]) -> str:
    names = [k[: -len(".weight")] if k.endswith(".weight") else k for k in items]
    return ", ".join(names) if names else "none"


def _no_weight_message(model: nn.Module | Mapping[str, ArrayLike], name: str,
                       items: Mapping[str, ArrayLike]) -> str:
    """Why ``name`` has no weight matrix, and which layers do."""
    available = f"layers with a weight matrix: {_layer_list(items)}"
    if isinstance(model, nn.Module):
        module = dict(model.named_modules()).get(name)
        if module is not None:
            kind = type(module).__name__
            own = getattr(module, "weight", None)
            if isinstance(own, torch.Tensor):
                return (f"layer {name!r} ({kind}) has a {own.ndim}-D weight: a spectrum needs "
                        f"a matrix; {available}")
            inner = [k for k in items if k.startswith(f"{name}.")]
            if inner:
                return (f"layer {name!r} ({kind}) has no weight of its own; its sub-modules "
                        f"with a weight matrix: {_layer_list(dict.fromkeys(inner))} — name "
                        "one of them")
            return f"layer {name!r} ({kind}) has no weight matrix; {available}"
    elif name in model or f"{name}.weight" in model:
        return f"{name!r} is not a matrix (fewer than 2 dimensions); {available}"
    return f"layer {name!r} not found; {available}"


def weight_spectra(
    model: nn.Module | Mapping[str, ArrayLike],
    layers: Iterable[str] | None = None,
    min_tail: int = 10,
) -> xr.Dataset:
    """:func:`weight_spectrum` of every weight matrix (parameters with ``ndim ≥ 2``).

    Parameters
    ----------
    model : nn.Module or mapping name → array
        A model (its parameters are read, not modified) or a state dict.
    layers : str or iterable of str, optional
        Parameter names (``"net.0.weight"``, or the module name ``"net.0"``); default all.
        A layer without a weight matrix (an activation, a container, a norm layer's 1-D
        weight) is a ``ValueError`` naming it and listing the layers that have one.
    min_tail : int
        Smallest tail (and number of outliers) for the heavy-tail exponent.

    Returns
    -------
    xarray.Dataset
        Variables of :data:`WEIGHT_VARIABLES` over dimension ``layer`` (parameter names).
    """
    weights = _named_weights(model, layers)
    if not weights:
        raise ValueError("no weight matrices (parameters with 2 or more dimensions) found")
    pendings = {name: weight_spectrum_pending(w, min_tail) for name, w in weights.items()}
    rows = dict(zip(pendings, finish_all(list(pendings.values())), strict=True))  # one read
    names = list(rows)
    data_vars = {
        var: ("layer", np.array([rows[n][var] for n in names]), dict(attrs))
        for var, attrs in WEIGHT_VARIABLES.items()
    }
    return xr.Dataset(
        data_vars, coords={"layer": ("layer", np.array(names, dtype=object))},
        attrs={"source": SOURCE, "kind": "probe",
               "parameters": json.dumps({"min_tail": min_tail, "esd": "sigma^2/max(m,n)"})},
    )


# --------------------------------------------------------------------------- registry
PROBE_VARIABLES = {f"weight_{k}": v for k, v in WEIGHT_VARIABLES.items()}
"""The ``weight_spectra`` probe's variables: :data:`WEIGHT_VARIABLES` prefixed ``weight_`` (so
they never collide with the feature probes' ``stable_rank`` / ``effective_rank``)."""


def layer_weight_spectrum(weight: ArrayLike, min_tail: int = 10) -> Pending:
    """:func:`weight_spectrum` of one layer's weight, named as the registered probe's
    variables (``weight_alpha``, ``weight_stable_rank`` …), pending until the evaluation's
    values are read."""
    return weight_spectrum_pending(weight, min_tail).then(
        lambda values: {f"weight_{k}": v for k, v in values.items()})


def register_probes() -> None:
    """Register the ``weight_spectra`` parameter probe (idempotent)."""
    from traindyn.probes.registry import Probe, Variable, register

    register(Probe("weight_spectra", "parameters",
                   {k: Variable(v["long_name"], v["units"]) for k, v in PROBE_VARIABLES.items()},
                   SOURCE, fn=layer_weight_spectrum))


register_probes()
