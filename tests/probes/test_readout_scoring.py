"""Held-out scoring of the readouts with labels that are not ``0..C−1`` and held-out classes
the training split never saw, against scikit-learn (RidgeClassifier, LogisticRegression,
``log_loss``) and one-hot targets built here sample by sample."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from traindyn.probes import readout as R

from tests.helpers import assert_rel

CLASSES = np.array([3, 7, 10, 42])


def _data(n: int = 400, d: int = 10, seed: int = 5):
    """Blobs labelled 3, 7, 10, 42; two held-out samples relabelled 99 (no training sample)
    and every training sample of class 42 moved to class 10, so 42 is held-out only."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 4, n)
    x = rng.standard_normal((4, d))[k] * 1.5 + rng.standard_normal((n, d)) + 0.5
    y = CLASSES[k]
    held = R.held_out_mask(np.arange(n), 0.25, 0)
    y[np.flatnonzero(held)[:2]] = 99
    y[~held & (y == 42)] = 10
    return x, y, held


def _one_hot(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """One row per sample, a 1 in its class's column; no 1 for a class not in ``classes``."""
    out = np.zeros((len(labels), len(classes)))
    for i, label in enumerate(labels):
        if label in classes:
            out[i, classes.index(label)] = 1.0
    return out


def test_ridge_held_out_scores_with_absent_classes_equal_sklearn():
    from sklearn.linear_model import RidgeClassifier

    x, y, held = _data()
    xt, yt, xh, yh = x[~held], y[~held], x[held], y[held]
    classes = sorted(set(yt.tolist()))
    assert classes == [3, 7, 10] and {42, 99} <= set(yh.tolist())
    lam = 2.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = R.linear_probe(x, y, ridge=lam)
    assert any("[42, 99]" in str(w.message) for w in caught)
    sk = RidgeClassifier(alpha=lam).fit(xt, yt)  # ±1 targets: twice our outputs, less one
    assert values["linear_probe_accuracy"] == float(np.mean(sk.predict(xh) == yh))
    assert values["linear_probe_train_accuracy"] == float(np.mean(sk.predict(xt) == yt))
    out = (sk.decision_function(xh) + 1.0) / 2.0
    want = float(np.mean(((out - _one_hot(yh, classes)) ** 2).sum(1)))
    assert_rel(values["linear_probe_loss"], want, 1e-10, "held-out MSE")


def test_loo_choice_is_the_same_for_any_class_labels():
    """PRESS of each candidate λ with labels 3, 7, 10 equals the one with 0, 1, 2 (same order),
    bit for bit: the one-hot columns follow the sorted classes."""
    x, y, held = _data()
    y = np.where(np.isin(y, [42, 99]), 10, y)
    remapped = np.searchsorted([3, 7, 10], y)
    fit = R.ReadoutAccumulator().update(x, y).fit_ridge(criterion="loo")
    ref = R.ReadoutAccumulator().update(x, remapped).fit_ridge(criterion="loo")
    np.testing.assert_array_equal(fit.scores, ref.scores)
    assert fit.ridge == ref.ridge and fit.classes == [3, 7, 10]
    torch.testing.assert_close(fit.weight, ref.weight, rtol=0, atol=0)


def test_logistic_held_out_loss_with_absent_classes_equals_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    x, y, held = _data(n=240)
    xt, yt, xh, yh = x[~held], y[~held], x[held], y[held]
    l2 = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = R.logistic_probe(x, y, l2=l2)
    sk = LogisticRegression(C=1.0 / (len(yt) * l2), tol=1e-12, max_iter=10000).fit(xt, yt)
    assert got["logistic_probe_accuracy"] == float(np.mean(sk.predict(xh) == yh))
    seen = np.isin(yh, sk.classes_)  # held-out samples of training classes
    ref = log_loss(yh[seen], sk.predict_proba(xh[seen]), labels=sk.classes_)
    assert abs(got["logistic_probe_loss"] - ref) < 1e-4
