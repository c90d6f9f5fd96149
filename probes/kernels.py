"""Kernel alignment and kernel motion: how a network's tangent kernel meets the task and moves.

Pure functions of kernel matrices (torch, numpy or jax in; float64 arithmetic on the input's
device; Python floats or numpy arrays out).  A kernel is ``(n, n)`` (e.g. the output-traced
NTK) or ``(n, n, k, k)`` (the full NTK of ``probes.ntk.empirical_ntk(..., output="full")``),
which is read as the ``(n·k, n·k)`` matrix ``K[(i,a), (j,b)]`` with targets ``vec(Y)``.

Definitions:

* kernel–target alignment (Cristianini et al. 2001; Cortes, Mohri, Rostamizadeh 2012, Eq. 1)
  ``A(K, Y) = ⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F)``, which for one target column is
  ``yᵀKy / (‖K‖_F ‖y‖²)``;
* centred alignment (Cortes, Mohri, Rostamizadeh 2012, Def. 1 and Eq. 4): the same with
  ``K_c = HKH`` and ``(YYᵀ)_c = HYYᵀH``, ``H = I − 11ᵀ/n``;
* cumulative target power in the top-k eigenvectors (Kopitkov & Indelman 2020; Baratin et al.
  2021): ``C(k) = Σ_{i≤k} ‖u_iᵀY‖² / ‖Y‖_F²``, eigenvalues sorted descending;
* kernel distance (Fort et al. 2020, Eq. 3) ``S(K₁, K₂) = 1 − ⟨K₁, K₂⟩_F / (‖K₁‖_F ‖K₂‖_F)``
  and kernel velocity ``S(K_t, K_{t+dt}) / dt``;
* relative kernel change ``‖K_t − K_0‖_F / ‖K_0‖_F`` (Lee et al. 2019, Fig. 1; Chizat, Oyallon,
  Bach 2019): of order ``1/√width`` in the lazy regime;
* effective rank of the kernel: entropy effective rank ``exp(−Σ p_i ln p_i)``,
  ``p_i = λ_i / Σλ`` (Roy & Vetterli 2007, Def. 1), or the participation ratio
  ``(Σλ)² / Σλ²``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from traindyn.probes._arrays import (
    STAT_DTYPE,
    ArrayLike,
    all_finite,
    as_tensor,
    check_finite,
    check_labels,
    warn_nan,
)

__all__ = [
    "center_kernel",
    "centered_alignment",
    "cumulative_power",
    "kernel_alignment",
    "kernel_distance",
    "kernel_velocity",
    "lazy_rich_summary",
    "ntk_effective_rank",
    "relative_kernel_change",
    "targets_matrix",
]


def _kernel(K: ArrayLike, name: str = "K") -> torch.Tensor:
    t = as_tensor(K, STAT_DTYPE)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if t.ndim == 2 and t.shape[0] == t.shape[1]:
        return t
    if t.ndim == 4 and t.shape[0] == t.shape[1] and t.shape[2] == t.shape[3]:
        return t
    raise ValueError(
        f"{name} must be a square kernel (n, n) or a full NTK (n, n, k, k); got {tuple(t.shape)}"
    )


def _flat(K: torch.Tensor) -> torch.Tensor:
    """``(n, n, k, k)`` → ``(n·k, n·k)`` with row index ``(i, a)``; 2-D kernels unchanged."""
    if K.ndim == 2:
        return K
    n, _, k, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n * k, n * k)


def targets_matrix(
    y: ArrayLike, n: int | None = None, n_outputs: int | None = None
) -> torch.Tensor:
    """Targets as a float64 ``(n, c)`` matrix: integer class labels become one-hot columns.

    Parameters
    ----------
    y : array
        ``(n,)`` integer labels, ``(n,)`` real targets, or ``(n, c)`` real targets.
    n : int, optional
        Expected number of samples (checked).
    n_outputs : int, optional
        Number of one-hot columns for integer labels (default ``max(y) + 1``).
    """
    t = as_tensor(y)
    if t.ndim == 1 and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        t = check_labels(t, n, "y (integer class labels)", n_classes=n_outputs)
        c = n_outputs if n_outputs is not None else (int(t.max()) + 1 if t.numel() else 1)
        t = torch.nn.functional.one_hot(t, c)
    t = t.to(STAT_DTYPE)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"targets y must be (n,) or (n, c); got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"targets y have {t.shape[0]} samples but the kernel has {n}")
    return t


def _target_outer(K: torch.Tensor, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(K as a matrix, vec Y as columns)`` so that ``YYᵀ`` lives on K's index set."""
    n = K.shape[0]
    if K.ndim == 2:
        Y = targets_matrix(y, n)
    else:
        k = K.shape[2]
        Y = targets_matrix(y, n, n_outputs=k)
        if Y.shape[1] != k:
            raise ValueError(
                f"a full NTK with {k} outputs needs (n, {k}) targets; got {tuple(Y.shape)}")
        Y = Y.reshape(n * k, 1)
    return _flat(K), Y.to(K.device)


def center_kernel(K: ArrayLike) -> torch.Tensor:
    """Centred kernel ``HKH`` with ``H = I − 11ᵀ/n`` (Cortes, Mohri, Rostamizadeh 2012, Eq. 4).

    For a full ``(n, n, k, k)`` NTK the centring acts on the two sample axes (``H ⊗ I_k``).
    """
    K = _kernel(K)
    check_finite(K, "K", "center_kernel's result has them too")
    Kc = K - K.mean(0, keepdim=True)
    return Kc - Kc.mean(1, keepdim=True)


def _cosine(A: torch.Tensor, B: torch.Tensor, what: str) -> float:
    if not (all_finite(A) and all_finite(B)):
        return warn_nan(f"{what}: non-finite entries")
    na, nb = torch.linalg.norm(A), torch.linalg.norm(B)
    if na == 0 or nb == 0:
        return warn_nan(f"{what} undefined: a zero kernel or zero targets")
    return float((A * B).sum() / (na * nb))


def kernel_alignment(K: ArrayLike, y: ArrayLike) -> float:
    """Kernel–target alignment ``A = ⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F)``.

    Cristianini, Shawe-Taylor, Elisseeff, Kandola (2001), Def. 1; for one target column it is
    ``yᵀKy / (‖K‖_F ‖y‖²)``.  Invariant to ``K → cK`` (c > 0) and ``y → cy``.

    Parameters
    ----------
    K : array, (n, n) or (n, n, k, k)
    y : array, (n,), (n, c) or integer labels (one-hot encoded)
    """
    K = _kernel(K)
    Km, Y = _target_outer(K, y)
    return _cosine(Km, Y @ Y.T, "kernel alignment")


def centered_alignment(K: ArrayLike, y: ArrayLike) -> float:
    """Centred kernel alignment ``ρ = ⟨K_c, (YYᵀ)_c⟩_F / (‖K_c‖_F ‖(YYᵀ)_c‖_F)``.

    Cortes, Mohri, Rostamizadeh (JMLR 2012), Def. 1 with ``K_c = HKH`` (Eq. 4).  Invariant to
    scaling of ``K`` and to adding a constant to ``K`` or to the targets.
    """
    K = center_kernel(K)
    n = K.shape[0]
    Y = targets_matrix(y, n, n_outputs=K.shape[2] if K.ndim == 4 else None).to(K.device)
    Yc = Y - Y.mean(0, keepdim=True)
    if K.ndim == 4:
        Yc = Yc.reshape(-1, 1)
    return _cosine(_flat(K), Yc @ Yc.T, "centred alignment")


def cumulative_power(K: ArrayLike, y: ArrayLike, k: int | None = None) -> np.ndarray | float:
    """Cumulative target power in the top eigenvectors, ``C(k) = Σ_{i≤k} ‖u_iᵀY‖² / ‖Y‖_F²``.

    Kopitkov & Indelman (2020), Sec. 4; Baratin et al. (AISTATS 2021), Eq. 5.  Eigenvalues sorted
    descending.  Returns ``C(1), …, C(n)`` (length n, or n·k for a full NTK), or ``C(k)`` when ``k``
    is given.  ``C(n) = 1``.
    """
    K = _kernel(K)
    Km, Y = _target_outer(K, y)
    if not all_finite(Km):
        out = np.full(Km.shape[0], np.nan)
        warn_nan("cumulative power: non-finite kernel")
        return out if k is None else float("nan")
    norm2 = float((Y * Y).sum())
    if not np.isfinite(norm2):
        warn_nan("cumulative power: the targets y are not finite")
        return np.full(Km.shape[0], np.nan) if k is None else float("nan")
    if norm2 == 0:
        warn_nan("cumulative power undefined for zero targets")
        return np.full(Km.shape[0], np.nan) if k is None else float("nan")
    evals, evecs = torch.linalg.eigh((Km + Km.T) / 2)
    order = torch.argsort(evals, descending=True)
    proj = (evecs[:, order].T @ Y).pow(2).sum(1)
    curve = (torch.cumsum(proj, 0) / norm2).cpu().numpy()
    if k is None:
        return curve
    if not 1 <= k <= curve.size:
        raise ValueError(f"k must be in 1..{curve.size}; got {k}")
    return float(curve[k - 1])


def kernel_distance(K1: ArrayLike, K2: ArrayLike) -> float:
    """Kernel distance ``S(K₁, K₂) = 1 − Tr(K₁K₂ᵀ) / √(Tr(K₁K₁ᵀ) Tr(K₂K₂ᵀ))``.

    Fort, Dziugaite, Paul, Kharaghani, Roy, Ganguli (NeurIPS 2020), Eq. 3.  Zero for kernels
    equal up to a positive scale; in ``[0, 2]``.
    """
    A, B = _kernel(K1, "K1"), _kernel(K2, "K2")
    if A.shape != B.shape:
        raise ValueError(f"kernels differ in shape: {tuple(A.shape)} vs {tuple(B.shape)}")
    return 1.0 - _cosine(A, B.to(A.device), "kernel distance")


def kernel_velocity(K1: ArrayLike, K2: ArrayLike, dt: float) -> float:
    """Kernel velocity ``S(K_t, K_{t+dt}) / dt`` (Fort et al. 2020, Sec. 3); ``dt`` in time."""
    if not dt > 0:
        raise ValueError(f"dt must be positive; got {dt}")
    return kernel_distance(K1, K2) / dt


def relative_kernel_change(K_t: ArrayLike, K_0: ArrayLike) -> float:
    """Relative kernel change ``‖K_t − K_0‖_F / ‖K_0‖_F`` (Lee et al. 2019, Fig. 1)."""
    A, B = _kernel(K_t, "K_t"), _kernel(K_0, "K_0")
    if A.shape != B.shape:
        raise ValueError(f"kernels differ in shape: {tuple(A.shape)} vs {tuple(B.shape)}")
    B = B.to(A.device)
    if not (all_finite(A) and all_finite(B)):
        return warn_nan("relative kernel change: non-finite entries")
    n0 = torch.linalg.norm(B)
    if n0 == 0:
        return warn_nan("relative kernel change undefined: K_0 is zero")
    return float(torch.linalg.norm(A - B) / n0)


def ntk_effective_rank(K: ArrayLike, kind: str = "entropy") -> float:
    """Effective rank of a kernel from its eigenvalues ``λ_i`` (negative round-off clipped to 0).

    ``kind="entropy"`` (default): ``exp(−Σ p_i ln p_i)``, ``p_i = λ_i/Σλ`` (Roy & Vetterli 2007,
    Def. 1).  ``kind="participation"``: ``(Σλ)²/Σλ²`` (the participation ratio).  Both equal
    ``r`` for ``r`` equal non-zero eigenvalues.
    """
    if kind not in ("entropy", "participation"):
        raise ValueError(f"kind must be 'entropy' or 'participation'; got {kind!r}")
    Km = _flat(_kernel(K))
    if not all_finite(Km):
        return warn_nan("effective rank: non-finite kernel")
    lam = torch.linalg.eigvalsh((Km + Km.T) / 2).clamp(min=0)
    total = lam.sum()
    if total <= 0:
        return warn_nan("effective rank undefined for a zero kernel")
    if kind == "participation":
        return float(total**2 / (lam**2).sum())
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


_VAR_ATTRS = {
    "ntk_alignment": ("NTK–target alignment", "1"),
    "ntk_centered_alignment": ("centred NTK–target alignment", "1"),
    "ntk_effective_rank": ("entropy effective rank of the NTK", "1"),
    "ntk_relative_change": ("relative NTK change ‖K_t − K_0‖/‖K_0‖", "1"),
    "ntk_distance_previous": ("kernel distance to the previous evaluation", "1"),
    "ntk_velocity": ("kernel velocity, distance / Δtime", "1/time"),
}


def lazy_rich_summary(
    kernels: Sequence[ArrayLike] | ArrayLike,
    y: ArrayLike,
    steps: Sequence[int] | None = None,
    time: Sequence[float] | None = None,
) -> xr.Dataset:
    """Lazy-vs-rich summary of a kernel trajectory ``K_0, K_1, …`` as a Dataset over ``step``.

    Variables per step: ``ntk_alignment``, ``ntk_centered_alignment``, ``ntk_effective_rank``,
    ``ntk_relative_change`` (‖K_t − K_0‖/‖K_0‖, Lee et al. 2019), ``ntk_distance_previous`` and
    ``ntk_velocity`` (Fort et al. 2020; NaN at the first step); scalars ``ntk_alignment_gain``
    (final − initial centred alignment) and ``ntk_final_relative_change``.  Lazy training keeps
    the relative change ≪ 1 and the gain ≈ 0; rich (feature-learning) training moves both.

    Parameters
    ----------
    kernels : sequence of (n, n) or (n, n, k, k) kernels, or one stacked array
    y : targets for the alignments
    steps : optimisation steps (default 0, 1, …)
    time : learning rate × step (default: ``steps``)
    """
    Ks = [_kernel(K) for K in kernels]
    if not Ks:
        raise ValueError("lazy_rich_summary needs at least one kernel")
    steps = np.arange(len(Ks)) if steps is None else np.asarray(steps, dtype=np.int64)
    time = steps.astype(float) if time is None else np.asarray(time, dtype=float)
    if steps.shape != (len(Ks),) or time.shape != (len(Ks),):
        raise ValueError(f"steps/time must have one entry per kernel ({len(Ks)})")
    vals: dict[str, list[float]] = {name: [] for name in _VAR_ATTRS}
    for t, K in enumerate(Ks):
        vals["ntk_alignment"].append(kernel_alignment(K, y))
        vals["ntk_centered_alignment"].append(centered_alignment(K, y))
        vals["ntk_effective_rank"].append(ntk_effective_rank(K))
        vals["ntk_relative_change"].append(relative_kernel_change(K, Ks[0]))
        if t == 0:
            vals["ntk_distance_previous"].append(float("nan"))
            vals["ntk_velocity"].append(float("nan"))
        else:
            d = kernel_distance(Ks[t - 1], K)
            dt = time[t] - time[t - 1]
            vals["ntk_distance_previous"].append(d)
            vals["ntk_velocity"].append(d / dt if dt > 0 else float("nan"))
    data = {
        name: ("step", np.asarray(v),
               {"long_name": _VAR_ATTRS[name][0], "units": _VAR_ATTRS[name][1]})
        for name, v in vals.items()
    }
    ca = vals["ntk_centered_alignment"]
    data["ntk_alignment_gain"] = ((), ca[-1] - ca[0], {
        "long_name": "gain in centred NTK alignment over training", "units": "1"})
    data["ntk_final_relative_change"] = ((), vals["ntk_relative_change"][-1], {
        "long_name": "final relative NTK change", "units": "1"})
    coords = {
        "step": ("step", steps, {"long_name": "optimisation step", "units": "1"}),
        "time": ("step", time, {"long_name": "training time, learning rate × step", "units": "1"}),
    }
    return xr.Dataset(data, coords=coords, attrs={
        "source": "Cortes, Mohri, Rostamizadeh (2012); Fort et al. (2020); Lee et al. (2019)"})
