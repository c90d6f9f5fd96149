"""Training long past zero error converges to the predicted collapse geometry."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from traindyn.dynamics import records
from traindyn.dynamics.recipes.collapse_training import (
    collapse_digits,
    train_deep_linear_collapse,
    train_mlp_collapse,
)
from traindyn.theory.neural_collapse import NC_VARIABLES, imbalanced_collapse

MINORITY = (5, 6, 7, 8, 9)



def test_digit_subsets_have_the_requested_class_sizes():
    x, y = collapse_digits(20, 0.25, MINORITY, seed=1)
    assert x.shape == (125, 64)
    np.testing.assert_array_equal(np.bincount(y.numpy()), [20] * 5 + [5] * 5)
    with pytest.raises(ValueError, match="asked for"):
        collapse_digits(500)


def test_deep_linear_imbalanced_converges_to_orthogonal_frame_with_size_set_norms():
    _, y = collapse_digits(20, 0.25, MINORITY)
    lam = 5e-3
    measured = train_deep_linear_collapse(y, n_layers=2, dim=12, weight_decay=lam,
                                          feature_decay=lam, learning_rate=0.2, steps=3000,
                                          n_evals=8, init_scale=0.3)
    records.validate(measured)
    theory = imbalanced_collapse(np.bincount(y.numpy()), lam, lam, n_layers=2)
    final, predicted = xr.align(measured.isel(step=-1), theory)
    np.testing.assert_allclose(final.class_mean_norm, predicted.class_mean_norm, rtol=5e-3)
    np.testing.assert_allclose(final.classifier_norm, predicted.classifier_norm, rtol=5e-3)
    for name in NC_VARIABLES:
        assert abs(float(final[name]) - float(predicted[name])) < 5e-3, name
    # the approach: far from the prediction at the start, close at the end
    start = measured.isel(step=0)
    assert abs(float(start.nc2_equinorm - predicted.nc2_equinorm)) > 0.1
    assert float(measured.nc1[-1]) < 1e-12 * float(measured.nc1[0])


def test_deep_linear_minority_classes_collapse_below_threshold():
    _, y = collapse_digits(20, 0.25, MINORITY)
    lam = 2e-2  # threshold N² λ_W λ_H = 125² · 4e-4 = 6.25: the 5-sample classes collapse
    measured = train_deep_linear_collapse(y, n_layers=1, dim=12, weight_decay=lam,
                                          feature_decay=lam, learning_rate=0.2, steps=4000,
                                          n_evals=8, init_scale=0.3)
    theory = imbalanced_collapse(np.bincount(y.numpy()), lam, lam, n_layers=1)
    assert theory.collapsed.values.tolist() == [0] * 5 + [1] * 5
    final = measured.isel(step=-1)
    major = slice(0, 5)
    np.testing.assert_allclose(final.class_mean_norm[major], theory.class_mean_norm[major],
                               rtol=2e-3)
    np.testing.assert_allclose(final.classifier_norm[major], theory.classifier_norm[major],
                               rtol=2e-3)
    minor = final.classifier_norm.values[5:] / theory.classifier_norm.values[0]
    assert np.all(minor < 0.03)
    mid = measured.classifier_norm.isel(step=4).values[5:]
    assert np.all(final.classifier_norm.values[5:] < 0.5 * mid)  # still shrinking towards 0


def test_deep_linear_balanced_centred_means_form_simplex_etf_classifier_orthogonal():
    _, y = collapse_digits(12)
    measured = train_deep_linear_collapse(y, n_layers=1, dim=12, learning_rate=0.2,
                                          steps=1500, n_evals=6, init_scale=0.3)
    final = measured.isel(step=-1)
    assert float(final.nc2_coherence) < 5e-3
    assert abs(float(final.nc2_coherence_classifier) - 1 / 9) < 2e-3


def test_mlp_on_digits_collapses_past_zero_training_error():
    x, y = collapse_digits(30)
    ds = train_mlp_collapse(x, y, widths=(64, 64), weight_decay=5e-4, learning_rate=1e-3,
                            steps=1200, n_evals=8)
    records.validate(ds)
    acc = ds.train_accuracy.values
    assert acc[-1] == 1.0
    first_perfect = int(np.argmax(acc == 1.0))
    assert first_perfect < len(acc) - 1  # trained past zero training error
    nc1 = ds.nc1.values
    assert nc1[-1] < 0.02 * nc1[0] and nc1[-1] < 0.5 * nc1[first_perfect]
    assert ds.cdnv.values[-1] < 0.05 * ds.cdnv.values[0]
    assert ds.nc4.values[-1] == 0.0
    # centred class means move towards the predicted simplex ETF (coherence → 0)
    assert ds.nc2_coherence.values[-1] < 0.6 * ds.nc2_coherence.values[0]


@pytest.mark.slow
def test_three_layer_deep_linear_model_reaches_prediction():
    # deeper models converge slowly (and at larger decay, λ = 5e-3, plain gradient descent can
    # stall with unequal minority norms): small decay and many steps
    _, y = collapse_digits(20, 0.25, MINORITY)
    lam = 2e-3
    measured = train_deep_linear_collapse(y, n_layers=3, dim=12, weight_decay=lam,
                                          feature_decay=lam, learning_rate=0.1, steps=40000,
                                          n_evals=8, init_scale=0.4)
    theory = imbalanced_collapse(np.bincount(y.numpy()), lam, lam, n_layers=3)
    final = measured.isel(step=-1)
    np.testing.assert_allclose(final.classifier_norm, theory.classifier_norm, rtol=1e-2)
    np.testing.assert_allclose(final.class_mean_norm, theory.class_mean_norm, rtol=1e-2)
    for name in NC_VARIABLES:
        assert abs(float(final[name]) - float(theory[name])) < 1e-2, name
