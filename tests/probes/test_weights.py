"""Weight spectra against numpy references, planted heavy tails and Marchenko–Pastur matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.probes.weights import (
    esd,
    marchenko_pastur_scale,
    power_law_tail_fit,
    weight_spectra,
    weight_spectrum,
)

from tests.helpers import assert_rel


def test_esd_norms_and_ranks_match_numpy_svd(rng):
    w = rng.normal(size=(120, 300)) * np.linspace(0.1, 2, 300)
    s = np.linalg.svd(w, compute_uv=False)
    assert_rel(esd(w).numpy(), s**2 / 300, 1e-10, "esd")
    out = weight_spectrum(w)
    assert_rel(out["spectral_norm"], s[0], 1e-10, "spectral norm")
    assert_rel(out["frobenius_norm"], np.sqrt(np.sum(w**2)), 1e-10, "frobenius")
    assert_rel(out["stable_rank"], np.sum(w**2) / s[0] ** 2, 1e-10, "stable rank")
    p = s / s.sum()
    assert_rel(out["effective_rank"], np.exp(-np.sum(p * np.log(p))), 1e-10, "effective rank")


def test_tail_fit_is_the_hill_estimate_at_the_chosen_xmin_and_recovers_a_pareto_exponent(rng):
    alpha = 2.5
    x = (1 - rng.random(4000)) ** (-1 / (alpha - 1))  # Pareto, p(x) ∝ x^-α for x ≥ 1
    fit = power_law_tail_fit(x)
    tail = x[x >= fit.xmin]
    assert fit.n_tail == tail.size
    assert_rel(fit.alpha, 1 + tail.size / np.sum(np.log(tail / fit.xmin)), 1e-12, "Hill")
    assert fit.alpha == pytest.approx(alpha, abs=0.15)


@pytest.mark.parametrize("shape", [(800, 400), (400, 400), (1200, 200)])
def test_marchenko_pastur_matrix_gives_no_spurious_heavy_tail(rng, shape):
    w = rng.normal(size=shape) * 0.05
    out = weight_spectrum(w)
    assert out["heavy_tailed"] == 0 and np.isnan(out["alpha"]) and out["n_outliers"] == 0
    assert out["alpha_unguarded"] > 5  # the known failure of the unguarded Clauset fit
    assert out["mp_scale"] == pytest.approx(0.05**2, rel=0.03)
    gamma = min(shape) / max(shape)
    assert out["mp_edge"] == pytest.approx(0.05**2 * (1 + np.sqrt(gamma)) ** 2, rel=0.03)


def test_planted_spikes_are_outliers_not_a_heavy_tail(rng):
    w = rng.normal(size=(800, 400)) + rng.normal(size=(800, 3)) @ rng.normal(size=(3, 400)) * 0.3
    out = weight_spectrum(w)
    assert out["n_outliers"] == 3 and out["heavy_tailed"] == 0 and np.isnan(out["alpha"])


def test_cauchy_like_entries_give_the_universality_exponent(rng):
    # Martin & Mahoney (2021): entries with tail index μ < 2 give an ESD tail α ≈ 1 + μ/2.
    w = rng.standard_t(1.0, size=(1000, 500))
    out = weight_spectrum(w)
    assert out["heavy_tailed"] == 1
    assert out["alpha"] == pytest.approx(1.5, abs=0.2)


def test_mp_median_matches_direct_integration_of_the_density():
    from scipy.integrate import quad
    from scipy.optimize import brentq
    from traindyn.probes.weights import _mp_median

    for gamma in (0.1, 0.5, 1.0):
        lo, hi = (1 - np.sqrt(gamma)) ** 2, (1 + np.sqrt(gamma)) ** 2

        def rho(x, lo=lo, hi=hi, gamma=gamma):  # MP density of the M eigenvalues, unit variance
            return np.sqrt(max((hi - x) * (x - lo), 0.0)) / (2 * np.pi * gamma * x)

        def cdf(t, lo=lo):
            return quad(rho, lo, t, limit=200)[0]

        median = brentq(lambda t: cdf(t) - 0.5, lo + 1e-12, hi)
        assert _mp_median(gamma) == pytest.approx(median, rel=1e-5)
        s2, _ = marchenko_pastur_scale(np.array([0.1, median, 9.0]) * 4.0, gamma)
        assert s2 == pytest.approx(4.0, rel=1e-5)


def test_weight_spectra_of_a_model_covers_every_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(),
                          nn.Linear(4, 2))
    ds = weight_spectra(model)
    assert list(ds.layer.values) == ["0.weight", "2.weight", "4.weight"]
    w0 = model[0].weight.detach().reshape(8, -1).double().numpy()
    assert float(ds.spectral_norm.sel(layer="0.weight")) == pytest.approx(
        np.linalg.norm(w0, 2), rel=1e-10)
    for var in ds.data_vars:
        assert {"long_name", "units"} <= set(ds[var].attrs)
    one = weight_spectra(model, layers=["2"])
    assert list(one.layer.values) == ["2.weight"]
    with pytest.raises(ValueError, match="layer 'nope' not found; layers with a weight matrix: "
                                         "0, 2, 4"):
        weight_spectra(model, layers=["nope"])


def test_a_layer_without_a_weight_matrix_is_refused_naming_it_and_the_layers_that_have_one():
    """An activation, a container, a norm layer's 1-D weight: each a ValueError that names the
    layer, says why and lists the layers with a weight matrix (or, for a container, its own);
    a single name as a string is one layer (not its characters).  The values of a valid
    layer: numpy's 2-norm."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Sequential(nn.Linear(7, 6),
                                                                    nn.LayerNorm(6)),
                          nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"layer '1' \(ReLU\) has no weight matrix; layers "
                                         r"with a weight matrix: 0, 2\.0, 3"):
        weight_spectra(model, layers=["1"])
    with pytest.raises(ValueError, match=r"layer '2' \(Sequential\) has no weight of its own; "
                                         r"its sub-modules with a weight matrix: 2\.0"):
        weight_spectra(model, layers="2")
    with pytest.raises(ValueError, match=r"layer '2\.1' \(LayerNorm\) has a 1-D weight"):
        weight_spectra(model, layers=["2.1"])
    with pytest.raises(ValueError, match="layers is empty; layers with a weight matrix: 0, "):
        weight_spectra(model, layers=[])
    with pytest.raises(ValueError, match="'b' is not a matrix"):
        weight_spectra({"a.weight": np.ones((3, 4)), "b": np.ones(3)}, layers=["b"])
    ds = weight_spectra(model, layers="3")
    assert float(ds.spectral_norm[0]) == pytest.approx(
        np.linalg.norm(model[3].weight.detach().double().numpy(), 2), rel=1e-10)


def test_bad_weights():
    with pytest.raises(ValueError, match="2 dimensions"):
        weight_spectrum(np.ones(5))
    w = np.ones((10, 5))
    w[0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert np.isnan(weight_spectrum(w)["spectral_norm"])
    with pytest.warns(RuntimeWarning, match="zero"):
        zero = weight_spectrum(np.zeros((10, 5)))
    assert np.isnan(zero["stable_rank"])
    assert zero["spectral_norm"] == 0.0 and zero["frobenius_norm"] == 0.0  # the norms are 0
    fit = power_law_tail_fit(np.array([1.0, 2.0, 3.0]))
    assert np.isnan(fit.alpha)
    with pytest.raises(ValueError, match="ratio"):
        marchenko_pastur_scale(np.ones(3), 2.0)
