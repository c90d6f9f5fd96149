"""Empirical kernel spectra and target coefficients from a Gram matrix."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.dynamics import records
from traindyn.theory.spectra import empirical_spectrum, spectrum_from_gram

from tests.helpers import assert_rel


def _planted(rng, P=60):
    """K = Σ λ_i φ_i φ_iᵀ with φ_i orthonormal under the uniform measure on P points."""
    q, _ = np.linalg.qr(rng.standard_normal((P, P)))
    phi = np.sqrt(P) * q                        # (1/P) Σ_μ φ_i(x_μ) φ_j(x_μ) = δ_ij
    lam = np.sort(rng.uniform(0.01, 1.0, P))[::-1]
    v = rng.standard_normal(P) * lam
    return phi, lam, v, (phi * lam) @ phi.T, phi @ v


def test_planted_spectrum_and_coefficients_are_recovered(rng):
    phi, lam, v, gram, y = _planted(rng)
    spec = spectrum_from_gram(gram, y)
    assert_rel(spec.eigenvalues, lam, 1e-9, "eigenvalues")
    assert_rel(spec.target_power, v**2, 1e-6, "v_i²")
    # Parseval: Σ v_i² = mean y²
    assert_rel(spec.target_power.sum(), np.mean(y**2), 1e-10, "Parseval")


def test_multi_output_targets_average_over_columns(rng):
    phi, lam, v, gram, y = _planted(rng)
    y2 = np.stack([y, 2 * y], axis=1)
    spec = spectrum_from_gram(gram, y2)
    assert_rel(spec.target_power, 2.5 * v**2, 1e-6, "mean over outputs")


def test_dataset_cumulative_power(rng):
    phi, lam, v, gram, y = _planted(rng)
    ds = empirical_spectrum(gram, y)
    records.validate(ds)
    assert_rel(ds.cumulative_power[-1], 1.0, 1e-12, "C(P)")
    assert np.all(np.diff(ds.cumulative_power.values) >= -1e-15)
    assert_rel(ds.eigenvalue, lam, 1e-9, "eigenvalues")


def test_bad_gram_matrices(rng):
    with pytest.raises(ValueError, match="square"):
        spectrum_from_gram(np.ones((3, 4)))
    with pytest.raises(ValueError, match="symmetric"):
        spectrum_from_gram(np.triu(np.ones((3, 3))))
    with pytest.raises(ValueError, match="rows"):
        spectrum_from_gram(np.eye(3), np.ones(4))
    indefinite = np.diag([1.0, 0.5, -0.3])
    with pytest.warns(RuntimeWarning, match="negative eigenvalue"):
        spec = spectrum_from_gram(indefinite)
    assert np.all(spec.eigenvalues >= 0)
