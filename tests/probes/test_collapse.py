"""Neural-collapse metrics against float64 references written here from Papyan et al. (2020)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from traindyn.probes.collapse import CollapseAccumulator, neural_collapse

from tests.helpers import assert_rel


def reference(h, y, W=None, b=None, global_mean="class_means"):
    """Brute force in float64 numpy, straight from the definitions (explicit loops)."""
    h = np.asarray(h, np.float64)
    classes = np.unique(y)
    C, N = len(classes), len(y)
    mu = np.stack([h[y == c].mean(0) for c in classes])
    mu_g = mu.mean(0) if global_mean == "class_means" else h.mean(0)
    Mt = (mu - mu_g).T
    Sw = sum(np.outer(h[i] - mu[np.searchsorted(classes, y[i])],
                      h[i] - mu[np.searchsorted(classes, y[i])]) for i in range(N)) / N
    Sb = Mt @ Mt.T / C
    out = {"nc1": np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-10, hermitian=True)) / C}
    norms = np.linalg.norm(Mt, axis=0)
    out["nc2_equinorm"] = norms.std() / norms.mean()
    pairs = [(i, j) for i in range(C) for j in range(i + 1, C)]
    cos = np.array([Mt[:, i] @ Mt[:, j] / (norms[i] * norms[j]) for i, j in pairs])
    out["nc2_equiangle"] = cos.std()
    out["nc2_coherence"] = np.mean(np.abs(cos + 1 / (C - 1)))
    var = [np.mean(np.sum((h[y == c] - mu[k]) ** 2, 1)) for k, c in enumerate(classes)]
    out["cdnv"] = np.mean([(var[i] + var[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2))
                           for i, j in pairs])
    if W is not None:
        Wc = W[classes].T
        wn = np.linalg.norm(Wc, axis=0)
        out["nc2_equinorm_classifier"] = wn.std() / wn.mean()
        wcos = np.array([Wc[:, i] @ Wc[:, j] / (wn[i] * wn[j]) for i, j in pairs])
        out["nc2_equiangle_classifier"] = wcos.std()
        out["nc3"] = np.sum((Wc / np.linalg.norm(Wc) - Mt / np.linalg.norm(Mt)) ** 2)
        logits = h @ W.T + (0 if b is None else b)
        ncc = classes[np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), 1)]
        out["nc4"] = np.mean(ncc != logits.argmax(1))
    return out


def simplex_etf(C: int, d: int, radius: float, rng) -> np.ndarray:
    """C unit-norm vectors × radius in R^d with pairwise cosine -1/(C-1) (rows)."""
    q, _ = np.linalg.qr(rng.normal(size=(d, C)))
    etf = np.sqrt(C / (C - 1)) * (np.eye(C) - np.ones((C, C)) / C)
    return radius * (q @ etf).T


def blobs(rng, C=4, d=12, sizes=(30, 45, 20, 60)):
    y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    mu = rng.normal(size=(C, d)) * 2.0
    h = mu[y] + rng.normal(size=(len(y), d)) * rng.uniform(0.5, 2.0, size=d)
    W = rng.normal(size=(C, d))
    b = rng.normal(size=C)
    return h, y, W, b


@pytest.mark.parametrize("global_mean", ["class_means", "samples"])
def test_matches_bruteforce_on_imbalanced_classes(rng, global_mean):
    h, y, W, b = blobs(rng)
    ds = neural_collapse(h, y, weight=W, bias=b, global_mean=global_mean)
    ref = reference(h, y, W, b, global_mean)
    for name, value in ref.items():
        assert_rel(float(ds[name]), value, 1e-9, name)
    assert json.loads(ds.attrs["parameters"])["global_mean"] == global_mean


def test_global_mean_conventions_differ_when_imbalanced_and_agree_when_balanced(rng):
    h, y, _, _ = blobs(rng)
    a = neural_collapse(h, y, global_mean="class_means")
    s = neural_collapse(h, y, global_mean="samples")
    assert abs(float(a.nc1) - float(s.nc1)) > 1e-3 * float(a.nc1)
    h, y, _, _ = blobs(rng, sizes=(25, 25, 25, 25))
    a = neural_collapse(h, y, global_mean="class_means")
    s = neural_collapse(h, y, global_mean="samples")
    for name in ("nc1", "nc2_equinorm", "nc2_equiangle", "cdnv"):
        assert_rel(float(a[name]), float(s[name]), 1e-10, name)


def test_streaming_equals_oneshot_equals_reference(rng):
    h, y, W, b = blobs(rng)
    perm = rng.permutation(len(y))
    h, y = h[perm], y[perm]
    acc = CollapseAccumulator()
    cuts = [0, 1, 7, 50, 51, 120, len(y)]  # includes single-sample and single-class batches
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        acc.update(torch.from_numpy(h[lo:hi]), torch.from_numpy(y[lo:hi]))
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        acc.update_predictions(h[lo:hi], weight=W, bias=b)
    streamed = acc.compute(weight=W)
    oneshot = neural_collapse(h, y, weight=W, bias=b)
    ref = reference(h, y, W, b)
    for name, value in ref.items():
        assert_rel(float(streamed[name]), float(oneshot[name]), 1e-10, f"stream {name}")
        assert_rel(float(oneshot[name]), value, 1e-9, f"ref {name}")


def test_simplex_etf_without_spread_is_fully_collapsed(rng):
    C, d = 6, 15
    offset = rng.normal(size=d)  # any global offset
    mu = simplex_etf(C, d, 3.0, rng) + offset
    y = np.repeat(np.arange(C), 5)
    h = mu[y]
    W = 0.7 * (mu - offset)  # self-dual classifier; the bias removes the offset
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = neural_collapse(h, y, weight=W, bias=-W @ offset)
    for name in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc2_coherence",
                 "nc2_equinorm_classifier", "nc2_equiangle_classifier", "nc3", "nc4", "cdnv"):
        assert abs(float(ds[name])) < 1e-10, (name, float(ds[name]))


def test_isotropic_spread_gives_hand_computed_nc1_and_cdnv(rng):
    # Class means on a simplex ETF of radius r; each class gets the 2d points μ_c ± s·e_k, so
    # the within-class covariance is exactly (s²/d)·I.  Σ_B has C−1 eigenvalues r²/(C−1), so
    # NC1 = (s²/d)(C−1)·(C−1)/r² / C, and CDNV = 2s² / (2·2r²C/(C−1)).
    C, d, r, s = 5, 8, 2.5, 0.3
    mu = simplex_etf(C, d, r, rng)
    offsets = np.concatenate([s * np.eye(d), -s * np.eye(d)])
    h = np.concatenate([m + offsets for m in mu])
    y = np.repeat(np.arange(C), 2 * d)
    ds = neural_collapse(h, y)
    assert_rel(float(ds.nc1), (s**2 / d) * (C - 1) ** 2 / (r**2 * C), 1e-10, "nc1")
    assert_rel(float(ds.cdnv), s**2 * (C - 1) / (2 * r**2 * C), 1e-10, "cdnv")


def test_nc4_counts_disagreements_with_given_logits(rng):
    h, y, _, _ = blobs(rng)
    ref_ncc = np.unique(y)[np.argmin(((h[:, None] - np.stack(
        [h[y == c].mean(0) for c in np.unique(y)])[None]) ** 2).sum(-1), 1)]
    pred = ref_ncc.copy()
    flip = rng.choice(len(y), size=17, replace=False)
    pred[flip] = (pred[flip] + 1) % 4
    logits = np.eye(4)[pred] * 5.0
    assert float(neural_collapse(h, y, logits=logits).nc4) == pytest.approx(17 / len(y))
    assert np.isnan(float(neural_collapse(h, y).nc4))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), perm_seed=st.integers(0, 2**16))
def test_invariant_to_permutation_of_class_labels(seed, perm_seed):
    rng = np.random.default_rng(seed)
    h, y, W, b = blobs(rng)
    perm = np.random.default_rng(perm_seed).permutation(4)
    W2, b2 = np.empty_like(W), np.empty_like(b)
    W2[perm], b2[perm] = W, b  # class c is now called perm[c]
    a = neural_collapse(h, y, weight=W, bias=b)
    p = neural_collapse(h, perm[y], weight=W2, bias=b2)
    for name in a.data_vars:
        assert_rel(float(p[name]), float(a[name]), 1e-9, name)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 6), C=st.integers(2, 4), seed=st.integers(0, 99))
def test_degenerate_shapes_do_not_crash(n, d, C, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, size=n)
    y[:2] = [0, 1]  # at least two classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ds = neural_collapse(rng.normal(size=(n, d)), y, weight=rng.normal(size=(C, d)))
    assert set(ds.data_vars) >= {"nc1", "nc2_equinorm", "nc3", "nc4", "cdnv"}
    assert float(ds.nc1) >= 0 and 0 <= float(ds.nc4) <= 1


def test_nonfinite_features_give_nan_with_warning(rng):
    h, y, W, _ = blobs(rng)
    h[3, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        ds = neural_collapse(h, y, weight=W)
    assert all(np.isnan(float(ds[v])) for v in ds.data_vars)


def test_one_class_gives_nan_with_warning(rng):
    with pytest.warns(RuntimeWarning, match="at least 2 classes"):
        ds = neural_collapse(rng.normal(size=(10, 3)), np.zeros(10, dtype=int))
    assert np.isnan(float(ds.nc1))


def test_single_sample_class_warns_and_still_matches_reference(rng):
    h, y, _, _ = blobs(rng, sizes=(30, 1, 20, 25))
    with pytest.warns(RuntimeWarning, match="single sample"):
        ds = neural_collapse(h, y)
    assert_rel(float(ds.nc1), reference(h, y)["nc1"], 1e-9, "nc1")


def test_bad_labels_and_options_raise_clear_errors(rng):
    h, y, W, _ = blobs(rng)
    with pytest.raises(TypeError, match="integers"):
        neural_collapse(h, y.astype(float))
    with pytest.raises(ValueError, match="shape"):
        neural_collapse(h, y[:-1])
    with pytest.raises(ValueError, match="global_mean"):
        neural_collapse(h, y, global_mean="median")
    with pytest.raises(ValueError, match="index the rows of weight"):
        neural_collapse(h, y, weight=W[:2])
    with pytest.raises(ValueError, match="no samples"):
        CollapseAccumulator().compute()


def test_half_precision_features_are_upcast_exactly(rng):
    h, y, W, b = blobs(rng)
    h16 = torch.from_numpy(h).half()
    ds = neural_collapse(h16, torch.from_numpy(y), weight=W, bias=b)
    ref = reference(h16.double().numpy(), y, W, b)
    assert_rel(float(ds.nc1), ref["nc1"], 1e-9, "nc1")
