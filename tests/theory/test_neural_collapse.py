"""theory.neural_collapse against hand-worked formulas, direct minimisation and probes.collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from traindyn.probes.collapse import neural_collapse
from traindyn.theory.neural_collapse import (
    NC_VARIABLES,
    balanced_collapse,
    class_strengths,
    collapse_geometry,
    imbalanced_collapse,
    minority_collapse_threshold,
    simplex_etf,
)


def test_simplex_etf_geometry():
    m = simplex_etf(5, dim=8)
    assert m.shape == (8, 5)
    gram = m.T @ m
    np.testing.assert_allclose(np.diag(gram), 1.0)
    off = gram[~np.eye(5, dtype=bool)]
    np.testing.assert_allclose(off, -1 / 4)
    np.testing.assert_allclose(m.sum(1), 0.0, atol=1e-15)


def _features(means, sizes, seed=0, dim=None):
    """Collapsed features: class means repeated n_k times, rotated by a random orthogonal map."""
    c, d = means.shape
    dim = dim or d + 3
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    embed = np.zeros((c, dim))
    embed[:, :d] = means
    rows = embed @ q.T
    labels = np.repeat(np.arange(c), sizes)
    return rows[labels], labels, q


def test_balanced_prediction_is_all_zero_and_aligns_with_the_probe():
    theory = balanced_collapse(6)
    etf = simplex_etf(6).T
    feats, labels, q = _features(3.0 * etf, [7] * 6)
    measured = neural_collapse(feats, labels, weight=2.0 * np.hstack([etf, np.zeros((6, 3))])
                               @ q.T)
    theory_nc, measured_nc = xr.align(theory[list(NC_VARIABLES)], measured[list(NC_VARIABLES)])
    for name in NC_VARIABLES:
        assert abs(float(theory_nc[name])) < 1e-12
        assert abs(float(measured_nc[name])) < 1e-9, name


def test_one_layer_strengths_are_soft_thresholds():
    # M = 1: z_k = (√n_k − N √(λ_W λ_H))₊, collapse iff n_k ≤ N² λ_W λ_H (worked by hand)
    sizes = np.array([200, 120, 60, 20, 5])
    lw, lh = 4e-3, 1e-3
    n = sizes.sum()
    expected = np.clip(np.sqrt(sizes) - n * np.sqrt(lw * lh), 0, None)
    np.testing.assert_allclose(class_strengths(sizes, lw, lh, 1), expected, rtol=1e-12)
    threshold = minority_collapse_threshold(n, lw, lh, 1)
    assert np.isclose(threshold, n**2 * lw * lh)
    ds = imbalanced_collapse(sizes, lw, lh)
    np.testing.assert_array_equal(ds.collapsed.values, (sizes <= threshold).astype(float))
    # norms: ‖w_k‖² = √(λ_H/λ_W) z_k and ‖h_k‖² = √(λ_W/λ_H) z_k / n_k
    np.testing.assert_allclose(ds.classifier_norm**2, np.sqrt(lh / lw) * expected, rtol=1e-12)
    np.testing.assert_allclose(ds.class_mean_norm**2, np.sqrt(lw / lh) * expected / sizes,
                               rtol=1e-12)


@pytest.mark.parametrize("n_layers", [2, 3])
def test_deeper_threshold_is_where_collapse_stops_paying(n_layers):
    lam, n_total = 5e-3, 500.0
    crit = minority_collapse_threshold(n_total, lam, lam, n_layers)
    q = 2 / (n_layers + 1)
    c = (n_layers + 1) / 2 * lam
    above = class_strengths([crit * 1.001, n_total - crit * 1.001], lam, lam, n_layers)[0]
    below = class_strengths([crit * 0.999, n_total - crit * 0.999], lam, lam, n_layers)[0]
    assert above > 0 and below == 0
    # at the threshold, the non-zero minimiser ties with z = 0 (objective worked by hand)
    f = (above - np.sqrt(crit)) ** 2 / (2 * n_total) + c * above**q
    assert abs(f - crit / (2 * n_total)) < 1e-3 * crit / (2 * n_total)


def _minimise(sizes, lam, n_layers, dim=6, restarts=4):
    """Direct L-BFGS on the class-collapsed loss of Dang et al. (2023), best of restarts."""
    k = len(sizes)
    w_n = torch.tensor(sizes, dtype=torch.float64)
    n = w_n.sum()
    best = None
    for r in range(restarts):
        g = torch.Generator().manual_seed(r)
        h = torch.randn(dim, k, generator=g, dtype=torch.float64).mul_(0.7).requires_grad_()
        ws = [torch.randn(dim, dim, generator=g, dtype=torch.float64).mul_(0.7).requires_grad_()
              for _ in range(n_layers - 1)]
        w = torch.randn(k, dim, generator=g, dtype=torch.float64).mul_(0.7).requires_grad_()
        params = [h, *ws, w]
        opt = torch.optim.LBFGS(params, max_iter=3000, tolerance_grad=1e-13,
                                tolerance_change=1e-16, history_size=50,
                                line_search_fn="strong_wolfe")

        def loss(opt=opt, h=h, ws=ws, w=w):
            opt.zero_grad()
            f = h
            for layer in ws:
                f = layer @ f
            fit = (((w @ f - torch.eye(k, dtype=torch.float64)) ** 2).sum(0) * w_n).sum()
            value = (fit / (2 * n) + lam / 2 * sum((p**2).sum() for p in [*ws, w])
                     + lam / 2 * ((h**2).sum(0) * w_n).sum())
            value.backward()
            return value

        for _ in range(3):
            opt.step(loss)
        value = float(loss().detach())
        if best is None or value < best[0]:
            f = h.detach()
            for layer in ws:
                f = layer.detach() @ f
            best = (value, f, w.detach())
    return best


@pytest.mark.parametrize("n_layers,sizes", [(1, [60, 30, 12, 4]), (2, [60, 30, 12, 4])])
def test_prediction_is_the_global_minimum_found_by_direct_minimisation(n_layers, sizes):
    lam = 8e-3
    value, feats, weight = _minimise(sizes, lam, n_layers)
    z = class_strengths(sizes, lam, lam, n_layers)
    n = sum(sizes)
    c, q = (n_layers + 1) / 2 * lam, 2 / (n_layers + 1)
    predicted = ((z - np.sqrt(sizes)) ** 2 / (2 * n) + c * z**q).sum()
    assert abs(value - predicted) < 1e-7 * predicted
    means, w_pred, _ = collapse_geometry(sizes, lam, lam, n_layers)
    # rotation-invariant geometry: Gram matrices of the class means and of the classifier rows
    np.testing.assert_allclose((feats.T @ feats).numpy(), means @ means.T, atol=2e-4)
    np.testing.assert_allclose((weight @ weight.T).numpy(), w_pred @ w_pred.T, atol=2e-4)


@pytest.mark.parametrize("global_mean", ["class_means", "samples"])
def test_predicted_metrics_equal_the_probe_on_the_predicted_geometry(global_mean):
    sizes = np.array([50, 50, 40, 20, 10])
    lam = 2e-3
    theory = imbalanced_collapse(sizes, lam, lam, n_layers=2, global_mean=global_mean)
    assert theory.collapsed.sum() == 0
    means, weight, _ = collapse_geometry(sizes, lam, lam, n_layers=2)
    feats, labels, q = _features(means, sizes, seed=3)
    w_rot = np.hstack([weight, np.zeros((5, 3))]) @ q.T
    measured = neural_collapse(feats, labels, weight=w_rot, global_mean=global_mean)
    for name in NC_VARIABLES:
        np.testing.assert_allclose(float(theory[name]), float(measured[name]), atol=1e-9,
                                   err_msg=name)
    # imbalance breaks the equinorm of centred means; balanced bias-free gives an orthogonal
    # classifier (cosine 0, so coherence 1/(C-1)) and centred means on a simplex ETF
    assert float(theory.nc2_equinorm) > 0.05
    bal = imbalanced_collapse([30] * 5, lam, lam)
    assert abs(float(bal.nc2_coherence)) < 1e-12
    assert np.isclose(float(bal.nc2_coherence_classifier), 1 / 4)


def test_collapsed_minorities_give_nan_angles_and_zero_norms():
    ds = imbalanced_collapse([100] * 3 + [2] * 3, 1e-2, 1e-2)
    assert ds.collapsed.values.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.all(ds.class_mean_norm.values[3:] == 0)
    assert np.isnan(float(ds.nc2_equiangle_classifier)) and np.isnan(float(ds.cdnv))


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive"):
        imbalanced_collapse([10, 10], 0.0, 1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        class_strengths([10], 1e-3, 1e-3)
    with pytest.raises(ValueError, match="n_layers"):
        class_strengths([10, 5], 1e-3, 1e-3, n_layers=0)
    with pytest.raises(ValueError, match="global_mean"):
        imbalanced_collapse([10, 5], 1e-3, 1e-3, global_mean="median")
    with pytest.raises(ValueError, match="2 classes"):
        simplex_etf(1)
