r"""Learning curves of kernel ridge regression from the kernel's spectrum (eigenlearning).

Bordelon, Canatar & Pehlevan, "Spectrum dependent learning curves in kernel regression and wide
neural networks" (ICML 2020); Canatar, Bordelon & Pehlevan, "Spectral bias and task-model
alignment explain generalization in kernel regression" (Nat. Commun. 2021); Simon, Dickens,
Karkada & DeWeese, "The eigenlearning framework" (arXiv:2110.03922, 2021; TMLR 2023), the
eigenlearning equations (their Sec. 4; equation numbers differ between versions, so none are
quoted here).

Setup.  A kernel ``K(x, x') = Σ_i λ_i φ_i(x) φ_i(x')`` with eigenfunctions orthonormal under the
input measure, a target ``f(x) = Σ_i v_i φ_i(x)`` observed with label noise of variance ``σ²``,
``n`` i.i.d. samples and the predictor ``f̂(x) = K(x, X)[K(X, X) + δ I]⁻¹ y`` (ridge ``δ``, not
scaled by ``n``).  The effective regularisation ``κ`` solves

.. math:: \sum_i \frac{\lambda_i}{\lambda_i + \kappa} + \frac{\delta}{\kappa} = n ,

and with learnabilities ``L_i = λ_i/(λ_i+κ)`` and overfitting coefficient
``E₀ = n/(n − Σ_i L_i²)``

.. math::
    \mathcal E_{te} = E_0\Big[\sum_i (1-L_i)^2 v_i^2 + \sigma^2\Big], \qquad
    \mathcal E_{tr} = \Big(\frac{\delta}{n\kappa}\Big)^2 \mathcal E_{te}

(Simon et al. 2021, eigenlearning equations).  ``𝓔_te`` is the mean squared error against
*noisy* test labels: it includes ``σ²`` (``excess_test_error = 𝓔_te − σ²`` is the error
against the clean target); ``𝓔_tr`` is the mean squared error on the noisy training labels.
The predictions are exact for Gaussian eigenfeatures as ``n`` and the number of modes grow
together, and accurate to a few per cent at ``n`` of a few hundred.

Degenerate eigenvalues are passed once with a ``multiplicity`` ``m_i``: every sum above becomes
``Σ_i m_i (…)`` and ``target_power`` is ``v_i²`` *per eigenfunction* (each of the ``m_i``
eigenfunctions of eigenvalue ``λ_i`` carries power ``v_i²``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory import _backend
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import (
    count,
    finite_scalar,
    float_array,
    nonnegative_scalar,
    real_scalar,
)

__all__ = [
    "Spectrum",
    "krr_learning_curve",
    "power_law_spectrum",
    "solve_kappa",
]

SOURCE = (
    "Bordelon, Canatar & Pehlevan (2020), ICML; Simon, Dickens, Karkada & DeWeese (2021), "
    "The eigenlearning framework, arXiv:2110.03922 (eigenlearning equations)"
)

_CHUNK = 4_000_000  # grid points × modes evaluated at once (≈ 32 MB of float64)


class Spectrum:
    r"""A kernel spectrum with target power per mode, validated once.

    Parameters
    ----------
    eigenvalues : array (M,)
        Kernel eigenvalues ``λ_i ≥ 0`` (any order).
    target_power : array (M,), optional
        ``v_i²`` per eigenfunction (default: zeros, a pure-noise task).
    multiplicity : array (M,), optional
        Number of eigenfunctions sharing ``λ_i`` (default: ones).  Need not be integer.
    accelerate : bool, optional
        Evaluate the sums over modes far below ``κ`` by a convergent series (below); default:
        when there are at least ``50 000`` non-zero eigenvalues.

    Notes
    -----
    The sums ``Σ m_i L_i``, ``Σ m_i L_i²`` and ``Σ m_i (1−L_i)(1−cL_i) v_i²`` at a given ``κ`` are
    exact over the modes with ``λ_i > εκ`` (``ε = 0.1``).  For the rest, with
    ``x_i = λ_i/κ ≤ ε``, ``L_i = Σ_{k≥1} (−1)^{k−1} x_i^k`` and
    ``L_i² = Σ_{k≥2} (−1)^k (k−1) x_i^k`` are summed to ``k = 16`` from power sums of the tail
    precomputed once at ~1.1-spaced boundaries of the sorted spectrum (each mode's truncation
    error is below ``17 ε^{17} ≈ 2·10⁻¹⁶`` of its own term).  For a power law with 10⁶ modes
    and ``n ≤ 10⁴`` this evaluates a few per cent of the modes exactly.
    """

    _EPS, _ORDER, _GROWTH = 0.1, 16, 1.1

    def __init__(self, eigenvalues: Any, target_power: Any = None, multiplicity: Any = None,
                 accelerate: bool | None = None):
        lam = float_array(eigenvalues, "eigenvalues").ravel()
        if lam.size == 0:
            raise ValueError("the spectrum is empty: pass at least one eigenvalue (eigenvalues)")
        v2 = (np.zeros_like(lam) if target_power is None
              else float_array(target_power, "target_power").ravel())
        m = (np.ones_like(lam) if multiplicity is None
             else float_array(multiplicity, "multiplicity").ravel())
        if accelerate is not None and not isinstance(accelerate, (bool, np.bool_)):
            raise TypeError(f"accelerate must be True, False or None; got {accelerate!r}")
        if v2.shape != lam.shape or m.shape != lam.shape:
            raise ValueError(
                f"eigenvalues, target_power and multiplicity need the same length; got "
                f"{lam.size}, {v2.size}, {m.size}")
        for name, arr in (("eigenvalues", lam), ("target_power", v2), ("multiplicity", m)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} must be finite")
            if np.any(arr < 0):
                raise ValueError(f"{name} must be non-negative (got min {arr.min():.3g})")
        order = np.argsort(-lam, kind="stable")
        self.eigenvalues, self.target_power, self.multiplicity = lam[order], v2[order], m[order]
        positive = self.eigenvalues > 0
        self.n_positive = float(self.multiplicity[positive].sum())
        """Number of eigenfunctions with non-zero eigenvalue, ``Σ_{λ_i>0} m_i``."""
        self.trace = float((self.multiplicity * self.eigenvalues).sum())
        self.lambda_min = float(self.eigenvalues[positive].min()) if positive.any() else 0.0
        self.target_total = float((self.multiplicity * self.target_power).sum())
        self._mv2 = self.multiplicity * self.target_power
        n_pos = int(positive.sum())
        self._n_pos = n_pos
        self._v2_null = float(self._mv2[n_pos:].sum())
        if accelerate is None:
            accelerate = n_pos >= 50_000
        self._bounds = np.empty(0, dtype=np.int64)
        if accelerate and n_pos > 1:
            self._build_tail_sums(n_pos)

    def _build_tail_sums(self, n_pos: int) -> None:
        """Power sums ``R_k(b) = Σ_{i ≥ B_b} m_i (λ_i/λ_{B_b})^k`` (and the same weighted by
        ``v_i²``) for k = 0 … K at boundaries ``B_b`` spaced by a factor ~1.1 in the index."""
        b, bounds = 1.0, {1}
        while b < n_pos:
            bounds.add(int(b))
            b = max(b * self._GROWTH, b + 1)
        bounds = np.array(sorted(x for x in bounds if 0 < x < n_pos), dtype=np.int64)
        lam, m, w = (a[:n_pos] for a in (self.eigenvalues, self.multiplicity, self._mv2))
        ks = np.arange(self._ORDER + 1)
        R = np.zeros((bounds.size, ks.size))
        T = np.zeros((bounds.size, ks.size))
        ends = np.append(bounds[1:], n_pos)
        for j in range(bounds.size - 1, -1, -1):
            lo, hi = bounds[j], ends[j]
            ratio = lam[lo:hi] / lam[lo]
            powers = ratio[:, None] ** ks                          # (block, K+1), ≤ 1
            R[j] = m[lo:hi] @ powers
            T[j] = w[lo:hi] @ powers
            if j + 1 < bounds.size:
                scale = (lam[hi] / lam[lo]) ** ks
                R[j] += scale * R[j + 1]
                T[j] += scale * T[j + 1]
        self._bounds, self._lam_b, self._R, self._T = bounds, lam[bounds], R, T
        self._s1 = np.where(ks >= 1, (-1.0) ** (ks - 1), 0.0)           # coefficients of L
        self._s2 = np.where(ks >= 2, (-1.0) ** ks * (ks - 1), 0.0)      # coefficients of L²

    def _split(self, kappa: np.ndarray):
        """Group points by the first boundary with ``λ_B ≤ εκ``: yields (indices, head end, b)."""
        if self._bounds.size == 0:
            yield np.arange(kappa.size), self.eigenvalues.size, None
            return
        b = np.searchsorted(-self._lam_b, -self._EPS * kappa, side="left")
        for bb in np.unique(b):
            sel = np.flatnonzero(b == bb)
            if bb >= self._bounds.size:
                yield sel, self.eigenvalues.size, None
            else:
                yield sel, int(self._bounds[bb]), int(bb)

    def _powers(self, kappa: np.ndarray, b: int) -> np.ndarray:
        x = self._lam_b[b] / kappa
        return x[:, None] ** np.arange(self._ORDER + 1)

    def sums(self, kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``z = Σ m_i L_i`` and ``q = Σ m_i L_i²`` at each ``κ`` (flat array)."""
        kappa = np.asarray(kappa, dtype=float)
        z, q = np.empty(kappa.size), np.empty(kappa.size)
        for sel, end, b in self._split(kappa):
            lam, m = self.eigenvalues[:end], self.multiplicity[:end]
            for sl in self._chunks(sel.size, end):
                idx = sel[sl]
                L = _learn(lam, kappa[idx])
                z[idx], q[idx] = L @ m, (L * L) @ m
            if b is not None:
                p = self._powers(kappa[sel], b) * self._R[b]
                z[sel] += p @ self._s1
                q[sel] += p @ self._s2
        return z, q

    def bias_terms(self, kappa: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
        r"""``Σ m_i (1−L_i)(1 − c L_i) v_i²`` with ``c = factor`` (1 for kernel regression)."""
        kappa = np.asarray(kappa, dtype=float)
        c = np.ones_like(kappa) if factor is None else np.asarray(factor, dtype=float)
        out = np.empty(kappa.size)
        for sel, end, b in self._split(kappa):
            lam, w = self.eigenvalues[:end], self._mv2[:end]
            for sl in self._chunks(sel.size, end):
                idx = sel[sl]
                L = _learn(lam, kappa[idx])
                out[idx] = ((1 - L) * (1 - c[idx, None] * L)) @ w
            if b is not None:
                p = self._powers(kappa[sel], b) * self._T[b]
                out[sel] += (self._T[b, 0] - (1 + c[sel]) * (p @ self._s1)
                             + c[sel] * (p @ self._s2) + self._v2_null)
        return out

    def learnabilities(self, kappa: np.ndarray) -> np.ndarray:
        """``L_i = λ_i/(λ_i+κ)``, shape ``κ.shape + (M,)``; ``κ = 0`` gives 1 where ``λ_i > 0``."""
        return _learn(self.eigenvalues, np.asarray(kappa, dtype=float))

    @staticmethod
    def _chunks(size: int, width: int):
        step = max(1, _CHUNK // max(width, 1))
        for start in range(0, size, step):
            yield slice(start, min(size, start + step))


def _learn(lam: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """``λ/(λ+κ)`` over (κ…, modes); ``κ = 0`` gives 1 for ``λ > 0`` and 0 for ``λ = 0``."""
    kappa = kappa[..., None]
    if np.all(kappa > 0):
        return lam / (lam + kappa)
    with np.errstate(invalid="ignore", divide="ignore"):
        L = lam / (lam + kappa)
    return np.where(kappa == 0, (lam > 0).astype(float), L)


def power_law_spectrum(
    n_modes: int, a: float = 1.5, b: float = 1.5, noise_free_norm: bool = False,
) -> Spectrum:
    r"""The power-law task ``λ_i = i^{−a}``, ``v_i² = i^{−b}``, ``i = 1 … n_modes``.

    The model of Simon, Karkada, Ghosh & Belkin (2023, Sec. 5) and, with ``b = a = 1 + α_K``,
    the generic teacher of Bahri et al. (2021).  With ``noise_free_norm`` the target power is
    rescaled so that ``Σ v_i² = 1``.
    """
    n_modes = count(n_modes, "n_modes", minimum=1)
    a, b = finite_scalar(a, "a"), finite_scalar(b, "b")
    i = np.arange(1, n_modes + 1, dtype=float)
    v2 = i ** (-b)
    if noise_free_norm:
        v2 = v2 / v2.sum()
    with np.errstate(over="ignore"):
        lam = i ** (-a)
    if not np.all(np.isfinite(lam)) or not np.all(np.isfinite(v2)):
        raise ValueError(f"a = {a}, b = {b}: i^-a or i^-b overflows float64 for i ≤ n_modes")
    return Spectrum(lam, v2)


def broadcast_grid(**arrays: np.ndarray) -> list[np.ndarray]:
    """``np.broadcast_arrays`` whose error names the arguments."""
    try:
        return np.broadcast_arrays(*arrays.values())
    except ValueError:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items())
        raise ValueError(f"{', '.join(arrays)} do not broadcast together: {shapes}") from None


def check_spectrum(spectrum: Any) -> Spectrum:
    if not isinstance(spectrum, Spectrum):
        raise TypeError(f"spectrum must be a theory.kernels.Spectrum (e.g. Spectrum(eigenvalues, "
                        f"target_power) or power_law_spectrum(...)); got {type(spectrum).__name__}")
    return spectrum


def as_spectrum(eigenvalues: Any, target_power: Any, multiplicity: Any) -> Spectrum:
    if isinstance(eigenvalues, Spectrum):
        if target_power is not None or multiplicity is not None:
            raise ValueError("pass either a Spectrum or arrays, not both (eigenvalues is a "
                             "Spectrum: target_power and multiplicity must be None)")
        return eigenvalues
    return Spectrum(eigenvalues, target_power, multiplicity)


def root_decreasing(
    evaluate: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    lo: np.ndarray, hi: np.ndarray, tol: float = 1e-12, max_iter: int = 200,
) -> np.ndarray:
    """Vectorised safeguarded Newton–bisection for decreasing ``f(t)`` with ``f(lo) ≥ 0 ≥ f(hi)``.

    ``evaluate(t, active)`` returns ``(f, df/dt)`` at the points ``t`` (only the ``active`` mask
    needs to be right; others may be anything).  Newton steps are taken when they stay inside
    the current bracket and at least halve it; otherwise the bracket is bisected, so the
    iteration always converges (Press et al., Numerical Recipes, ``rtsafe``).
    """
    lo, hi = np.array(lo, dtype=float), np.array(hi, dtype=float)
    t = 0.5 * (lo + hi)
    active = np.ones(t.shape, dtype=bool)
    width_old = np.full(t.shape, np.inf)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        f, df = evaluate(t[idx], idx)
        up = f > 0
        lo[idx] = np.where(up, t[idx], lo[idx])
        hi[idx] = np.where(up, hi[idx], t[idx])
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = t[idx] - f / df
        # Newton when it lands inside the bracket and the bracket is not stalling
        ok = (np.isfinite(newton) & (newton > lo[idx]) & (newton < hi[idx])
              & (np.abs(newton - t[idx]) < 0.5 * width_old[idx]))
        width_old[idx] = hi[idx] - lo[idx]
        # a Newton step below the tolerance means converged, even when round-off puts it on
        # (or a hair outside) the bracket end it started from (rtsafe's |dx| < xacc)
        resolution = tol * np.maximum(1.0, np.abs(t[idx]))
        tiny = np.isfinite(newton) & (np.abs(newton - t[idx]) <= resolution)
        new = np.where(ok | tiny, newton, 0.5 * (lo[idx] + hi[idx]))
        done = (np.abs(new - t[idx]) <= resolution) | (f == 0)
        t[idx] = np.where(f == 0, t[idx], new)
        active[idx[done]] = False
    return t


def solve_kappa(
    spectrum: Spectrum, n: Any, ridge: Any, tol: float = 1e-12, backend: str | None = None,
    device: Any = None,
) -> np.ndarray:
    r"""Effective regularisation ``κ`` of kernel ridge regression (broadcast over ``n``, ridge).

    Solves ``Σ_i m_i λ_i/(λ_i+κ) + δ/κ = n`` (Simon et al. 2021; the self-consistent κ
    of Bordelon et al. 2020) for ``κ > 0``: the left side decreases strictly in ``κ``, so the
    root is unique.  It is found in ``t = log κ`` by safeguarded Newton with the bracket

    * ``δ > 0``: ``δ/n ≤ κ ≤ (Σ m_i λ_i + δ)/n``;
    * ``δ = 0`` and more modes than samples (``Σ m_i > n``): ``c λ_min ≤ κ ≤ Σ m_i λ_i / n``,
      ``c = min(1, (Σ m_i/n − 1)/2)``,

    which stays accurate for 10⁶ modes and ``δ → 0`` (``κ`` is resolved to relative ``tol``).
    With ``δ = 0`` and no more modes than samples the limit ``κ = 0`` is returned.

    ``backend="jax"`` (or a ``device``: a ``jax.Device`` or ``"cpu"``, ``"gpu"`` …) iterates
    the same safeguarded Newton on that jax device in float64, every grid point at once inside
    one ``lax.while_loop`` (:mod:`theory._backend`); the default ``backend=None`` is numpy on
    the host.
    """
    spectrum = check_spectrum(spectrum)
    dev = _backend.resolve(backend, device)
    tol = real_scalar(tol, "tol")
    if not np.isfinite(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1); got {tol}")
    n, ridge = broadcast_grid(n=float_array(n, "n"), ridge=float_array(ridge, "ridge"))
    shape = n.shape
    n, ridge = n.ravel().copy(), ridge.ravel().copy()
    if np.any(~np.isfinite(n)) or np.any(n <= 0):
        raise ValueError("n must be positive and finite")
    if n.size == 0:
        return np.zeros(shape)
    if np.any(ridge < 0) or np.any(~np.isfinite(ridge)):
        raise ValueError("ridge must be non-negative and finite (negative ridge is not supported)")
    kappa = np.zeros(n.size)
    need = (ridge > 0) | (spectrum.n_positive > n)
    if spectrum.trace == 0:
        kappa[:] = ridge / n
        return kappa.reshape(shape)
    lo = np.full(n.size, -np.inf)
    with np.errstate(divide="ignore"):
        lo = np.where(ridge > 0, np.log(ridge / n), lo)
        c = np.minimum(1.0, (spectrum.n_positive / n - 1) / 2)
        lo_rank = np.where(c > 0, np.log(spectrum.lambda_min * np.clip(c, 1e-300, None)), -np.inf)
    lo = np.maximum(lo, lo_rank)
    hi = np.log((spectrum.trace + ridge) / n)
    idx = np.flatnonzero(need)

    def evaluate(t, sub):
        k = np.exp(t)
        z, q = spectrum.sums(k)
        d = ridge[idx][sub] / k
        total = z + d
        return np.log(total / n[idx][sub]), (-(z - q) - d) / total

    if idx.size and dev is not None:
        kappa[idx] = _backend.solve_kappa(spectrum, n[idx], ridge[idx], lo[idx], hi[idx], tol, dev)
    elif idx.size:
        kappa[idx] = np.exp(root_decreasing(evaluate, lo[idx], hi[idx], tol=tol))
    return kappa.reshape(shape)


def spectrum_sums(spectrum: Spectrum, kappa: np.ndarray, device: Any = None,
                  factor: np.ndarray | None = None, bias: bool = False) -> tuple:
    """``(Σ m L, Σ m L², Σ m v²(1−L)(1−cL) or None)`` at flat ``κ``: numpy when ``device`` is
    None, else on that jax device."""
    if device is not None:
        return _backend.sums(spectrum, kappa, device, factor, bias)
    z, q = spectrum.sums(kappa)
    return z, q, (spectrum.bias_terms(kappa, factor) if bias else None)


def krr_errors(spectrum: Spectrum, n: np.ndarray, ridge: np.ndarray, noise_var: float,
               device: Any = None) -> dict:
    """Kernel-regression predictions at flat, equally shaped arrays ``n`` and ``ridge``.

    Returns a dict of flat arrays: ``kappa``, ``overfitting_coefficient``, ``test_error``
    (with noise), ``train_error``, ``excess_test_error`` (without noise), ``learnability_sum``.
    ``device``: a jax device for the κ solve and the sums over modes (None: numpy).
    """
    kappa = solve_kappa(spectrum, n, ridge, backend="jax" if device is not None else None,
                        device=device)
    z, q, bias = spectrum_sums(spectrum, kappa, device, bias=True)
    with np.errstate(divide="ignore"):
        e0 = np.where(n - q > 0, n / np.where(n - q > 0, n - q, 1.0), np.inf)
    # E₀·(bias + σ²) with 0·∞ = 0: at the interpolation threshold (δ = 0, n = number of
    # modes) E₀ = ∞ but κ = 0 learns every mode, so a noiseless target has zero error (the
    # square system is solved exactly) and only noise diverges
    with np.errstate(invalid="ignore"):
        test = np.where(bias == 0, 0.0, e0 * bias) + (e0 * noise_var if noise_var else 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # δ/(nκ); at κ = 0 (ridgeless, fewer modes than samples) its limit 1 − Σ L_i / n
        factor = np.where(ridge > 0, ridge / (n * np.where(kappa > 0, kappa, 1.0)),
                          1 - np.minimum(n, spectrum.n_positive) / n)
        train = np.where(factor == 0, 0.0, factor**2 * test)
        excess = test - noise_var
    return dict(kappa=kappa, overfitting_coefficient=e0, test_error=test, train_error=train,
                excess_test_error=excess, learnability_sum=z)


CURVE_ATTRS = {
    "kappa": {"long_name": "effective regularisation κ", "units": "1"},
    "gamma": {"long_name": "effective regularisation γ of the random-feature kernel",
              "units": "1"},
    "overfitting_coefficient": {"long_name": "overfitting coefficient E₀", "units": "1"},
    "test_error": {"long_name": "test mean squared error (noisy labels, includes σ²)",
                   "units": "1"},
    "excess_test_error": {"long_name": "test mean squared error against the clean target",
                          "units": "1"},
    "train_error": {"long_name": "training mean squared error (noisy labels)", "units": "1"},
    "learnability": {"long_name": "mode learnability L_i", "units": "1"},
    "learnability_sum": {"long_name": "sum of learnabilities Σ m_i L_i", "units": "1"},
}


def grid_coord(name: str, values: np.ndarray, long_name: str) -> tuple:
    return (name, values, {"long_name": long_name, "units": "1"})


def krr_learning_curve(
    eigenvalues: Any,
    target_power: Any = None,
    n: Any = (10, 30, 100, 300),
    ridge: Any = 0.0,
    noise_var: float = 0.0,
    multiplicity: Any = None,
    n_modes_out: int = 50,
    backend: str | None = None,
    device: Any = None,
) -> xr.Dataset:
    r"""Kernel ridge regression test and training error over a grid of ``n`` and ridge ``δ``.

    .. math::
        \sum_i \frac{m_i\lambda_i}{\lambda_i+\kappa} + \frac{\delta}{\kappa} = n,\quad
        L_i = \frac{\lambda_i}{\lambda_i+\kappa},\quad
        E_0 = \frac{n}{n-\sum_i m_i L_i^2},\quad
        \mathcal E_{te} = E_0\Big[\sum_i m_i(1-L_i)^2 v_i^2+\sigma^2\Big],\quad
        \mathcal E_{tr} = \Big(\frac{\delta}{n\kappa}\Big)^2\mathcal E_{te}

    Simon et al. (2021), eigenlearning equations; Bordelon, Canatar & Pehlevan (2020); Canatar
    et al. (2021) (the same result in their notation).  At ``δ = 0`` the factor ``δ/(nκ)``
    takes its exact value ``1 − min(n, Σ_{λ_i>0} m_i)/n`` (from the κ equation), free of
    round-off.

    Parameters
    ----------
    eigenvalues : array (M,) or Spectrum
        Kernel eigenvalues (e.g. :func:`power_law_spectrum`, or ``theory.spectra``'s empirical
        spectrum of a Gram matrix).
    target_power : array (M,), optional
        ``v_i²`` per eigenfunction.
    n, ridge : float or array
        Sample sizes (may be non-integer) and ridges ``δ ≥ 0``; arrays give dims ``n``, ``ridge``.
    noise_var : float
        Label-noise variance ``σ²``.
    multiplicity : array (M,), optional
        Degeneracy ``m_i`` of each eigenvalue.
    n_modes_out : int
        ``learnability`` is returned for the largest ``n_modes_out`` eigenvalues only (a
        10⁶-mode spectrum over a grid would not fit in memory).
    backend : {"numpy", "jax"}, optional
        ``"jax"`` solves κ and sums over the modes on a jax ``device`` in float64 (one
        ``lax.while_loop`` for the whole grid, no host round-trip per iteration); default numpy.
    device : jax.Device or str, optional
        Where the jax backend runs (``"cpu"``, ``"gpu"``, a ``jax.Device``; default jax's
        default device).  Giving a device implies ``backend="jax"``.

    Returns
    -------
    xarray.Dataset
        ``test_error`` (includes ``σ²``), ``excess_test_error`` (without), ``train_error``,
        ``kappa``, ``overfitting_coefficient``, ``learnability_sum`` over (``n``, ``ridge``) and
        ``learnability`` over (``n``, ``ridge``, ``mode``), with an ``eigenvalue`` coordinate on
        ``mode``.  Scalar ``n`` or ``ridge`` give no dimension.
    """
    spec = as_spectrum(eigenvalues, target_power, multiplicity)
    dev = _backend.resolve(backend, device)
    noise_var = nonnegative_scalar(noise_var, "noise_var")
    n_modes_out = count(n_modes_out, "n_modes_out")
    n_arr = np.atleast_1d(float_array(n, "n"))
    r_arr = np.atleast_1d(float_array(ridge, "ridge"))
    if n_arr.ndim != 1 or r_arr.ndim != 1:
        raise ValueError("n and ridge must be scalars or 1-D arrays")
    if n_arr.size == 0 or r_arr.size == 0:
        raise ValueError("n and ridge must not be empty")
    nn, rr = np.meshgrid(n_arr, r_arr, indexing="ij")
    out = krr_errors(spec, nn.ravel(), rr.ravel(), float(noise_var), dev)
    n_out = min(int(n_modes_out), spec.eigenvalues.size)
    L = spec.learnabilities(out["kappa"])[:, :n_out] if n_out else np.empty((nn.size, 0))
    shape = nn.shape
    if np.any(np.isinf(out["test_error"])):
        warnings.warn("test error diverges (ridgeless regression with n equal to the number of "
                      "modes): returned as inf", RuntimeWarning, stacklevel=2)
    data = {k: (("n", "ridge"), v.reshape(shape), CURVE_ATTRS[k]) for k, v in out.items()}
    data["learnability"] = (("n", "ridge", "mode"), L.reshape(*shape, n_out),
                            CURVE_ATTRS["learnability"])
    ds = xr.Dataset(
        data,
        coords={
            "n": grid_coord("n", n_arr, "number of training samples"),
            "ridge": grid_coord("ridge", r_arr, "ridge regularisation δ"),
            "mode": grid_coord("mode", np.arange(n_out), "kernel eigenmode index (descending λ)"),
            "eigenvalue": ("mode", spec.eigenvalues[:n_out],
                           {"long_name": "kernel eigenvalue λ_i", "units": "1"}),
        },
        attrs=theory_attrs(SOURCE, dict(noise_var=noise_var, n_modes=spec.eigenvalues.size,
                                        n_eigenfunctions=float(spec.multiplicity.sum())),
                           noise="test_error includes the label-noise variance σ²"),
    )
    squeeze = [d for d, v in (("n", n), ("ridge", ridge)) if np.ndim(v) == 0]
    return ds.squeeze(squeeze, drop=False) if squeeze else ds
