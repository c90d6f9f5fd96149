r"""Kernel spectra and target coefficients from data, to run the learning-curve theory on a
real dataset.

Treat a finite dataset ``{x_1 … x_P}`` as the input distribution (the uniform measure on its
points), as Canatar, Bordelon & Pehlevan (Nat. Commun. 2021, Methods) do for MNIST.  The
kernel's integral operator on that measure has the matrix ``K/P`` (``K`` the Gram matrix), so
with ``K = U diag(s) Uᵀ``:

.. math::
    \lambda_i = s_i / P,\qquad \phi_i(x_\mu) = \sqrt P\,U_{\mu i},\qquad
    v_i = \frac1P\sum_\mu \phi_i(x_\mu)\,y_\mu = \frac{U_{:i}^\top y}{\sqrt P},

so that ``Σ_i v_i² = (1/P) Σ_μ y_μ²`` (Parseval) and ``K(x_μ, x_ν) = Σ_i λ_i φ_i(x_μ)φ_i(x_ν)``.
For several target columns ``target_power`` is the mean of ``v_{ic}²`` over columns ``c``,
which makes the theory's ``test_error`` the mean squared error averaged over outputs.  The Gram
matrix may come from any kernel, including an empirical NTK.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory._dataset import theory_attrs
from traindyn.theory._validate import float_array
from traindyn.theory.kernels import Spectrum

__all__ = ["empirical_spectrum", "spectrum_from_gram"]

SOURCE = ("Canatar, Bordelon & Pehlevan (2021), Spectral bias and task-model alignment, "
          "Nat. Commun. 12:2914, Methods (kernel spectrum on a finite dataset)")


def _eigensystem(gram: Any, targets: Any) -> tuple[np.ndarray, np.ndarray, int]:
    K = float_array(gram, "gram")
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"gram must be a square (P, P) matrix; got shape {K.shape}")
    if not np.all(np.isfinite(K)):
        raise ValueError("gram has non-finite entries")
    P = K.shape[0]
    asym = np.abs(K - K.T).max()
    if asym > 1e-6 * max(np.abs(K).max(), 1e-300):
        raise ValueError(f"gram is not symmetric (max |K − Kᵀ| = {asym:.3g})")
    s, U = np.linalg.eigh(0.5 * (K + K.T))
    s, U = s[::-1], U[:, ::-1]
    tol = P * np.finfo(float).eps * max(abs(s[0]), 1e-300) * 10
    if s[-1] < -max(tol, 1e-6 * abs(s[0])):
        warnings.warn(f"gram has a negative eigenvalue {s[-1]:.3g} (not positive semi-definite);"
                      " negative eigenvalues are set to zero", RuntimeWarning, stacklevel=3)
    s = np.where(s > tol, s, 0.0)
    if targets is None:
        v2 = np.zeros(P)
    else:
        y = float_array(targets, "targets")
        if not np.all(np.isfinite(y)):
            raise ValueError("targets has non-finite entries")
        if y.ndim == 0 or y.shape[0] != P:
            raise ValueError(f"targets must have P = {P} rows; got shape {y.shape}")
        y = y.reshape(P, -1)
        v = U.T @ y / np.sqrt(P)
        v2 = (v**2).mean(axis=1)
    return s / P, v2, P


def spectrum_from_gram(gram: Any, targets: Any = None) -> Spectrum:
    r"""A :class:`~theory.kernels.Spectrum` of the kernel on the uniform measure over ``P`` points.

    ``λ_i = s_i/P`` and ``v_i² = (U_{:i}ᵀy)²/P`` (mean over target columns), Canatar et al.
    (2021), Methods.  Feed it to ``krr_learning_curve`` or ``rf_learning_curve``: they then
    predict kernel regression on ``n`` points drawn i.i.d. from the ``P`` and tested on all
    ``P``.  Negative eigenvalues (a Gram matrix that is not PSD, e.g. from float32 round-off)
    are set to zero, with a warning when they are not negligible.
    """
    lam, v2, _ = _eigensystem(gram, targets)
    return Spectrum(lam, v2)


def empirical_spectrum(gram: Any, targets: Any = None) -> xr.Dataset:
    """The empirical spectrum as a Dataset over ``mode``.

    Returns
    -------
    xarray.Dataset
        ``eigenvalue`` (``λ_i = s_i/P``), ``target_power`` (``v_i²``) and
        ``cumulative_power`` (``Σ_{j≤i} v_j² / Σ_j v_j²``, the task-model alignment curve of
        Canatar et al. 2021, Fig. 2) over ``mode`` (descending eigenvalue).
    """
    lam, v2, P = _eigensystem(gram, targets)
    total = v2.sum()
    if total > 0:
        cum = np.cumsum(v2) / total
    else:
        cum = np.full_like(v2, np.nan)
        warnings.warn("empirical_spectrum: " + ("no targets given" if targets is None else
                                               "the targets have zero power")
                      + ": cumulative_power is undefined (NaN)", RuntimeWarning, stacklevel=2)
    return xr.Dataset(
        {
            "eigenvalue": ("mode", lam, {"long_name": "kernel eigenvalue λ_i = s_i/P",
                                         "units": "1"}),
            "target_power": ("mode", v2, {"long_name": "target power v_i² in the eigenbasis",
                                          "units": "1"}),
            "cumulative_power": ("mode", cum, {"long_name": "cumulative target power C(i)",
                                               "units": "1"}),
        },
        coords={"mode": ("mode", np.arange(P), {"long_name": "kernel eigenmode index",
                                                "units": "1"})},
        attrs=theory_attrs(SOURCE, dict(P=P)),
    )
