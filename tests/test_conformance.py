"""Every public producer of results returns a Dataset that follows the data model.

theory/ and probes/ cannot import dynamics/records.py (dependencies point down), so this test
is what keeps their Datasets in the shared vocabulary: each producer below is run at a small
size and its output validated, and a theory and a measurement of the same quantity align.
"""

import numpy as np
import pytest
import xarray as xr
from traindyn.dynamics import records, storage
from traindyn.dynamics.recipes import (
    TinyLMConfig,
    simulate_krr,
    simulate_linear_teacher,
    simulate_rf,
    train_deep_linear,
    train_digits_mlp,
    train_tiny_lm,
)

from tests._tiny_models import mlp
from traindyn import probes, theory

_EIGS = np.arange(1, 201, dtype=float) ** -1.5
_RNG = np.random.default_rng(0)
_FEATS = _RNG.standard_normal((60, 8))
_LABELS = np.repeat(np.arange(3), 20)
_K = [(lambda a: a @ a.T)(_RNG.standard_normal((12, 12))) for _ in range(3)]

PRODUCERS = {
    "theory.krr_learning_curve": lambda: theory.krr_learning_curve(_EIGS, n=(10, 30),
                                                                   ridge=(0.0, 0.1)),
    "theory.rf_learning_curve": lambda: theory.rf_learning_curve(_EIGS, n=(10, 30),
                                                                 n_features=(20, 40)),
    "theory.scaling_regimes": lambda: theory.scaling_regimes(_EIGS, n=(100, 300),
                                                             n_features=(100, 300)),
    "theory.balanced_collapse": lambda: theory.balanced_collapse(4),
    "theory.imbalanced_collapse": lambda: theory.imbalanced_collapse([40, 40, 10]),
    "theory.saxe_dynamics": lambda: theory.saxe_dynamics(np.linspace(0, 5, 6), [3.0, 1.0], 1e-3),
    "probes.neural_collapse": lambda: probes.neural_collapse(_FEATS, _LABELS),
    "probes.weight_spectra": lambda: probes.weight_spectra(
        {"w": _RNG.standard_normal((40, 30))}),
    "probes.lazy_rich_summary": lambda: probes.lazy_rich_summary(_K, _RNG.standard_normal(12),
                                                                 steps=[0, 1, 2]),
    "probes.inductive_bias": lambda: probes.inductive_bias(
        _RNG.chisquare(20, 200) / 20, [0.5, 0.8], n_bootstrap=10),
    "recipes.simulate_krr": lambda: simulate_krr(_EIGS, n=(10, 20), seeds=(0,)),
    "recipes.simulate_rf": lambda: simulate_rf(_EIGS, n=(20,), n_features=(10,), seeds=(0,)),
    "recipes.train_deep_linear": lambda: train_deep_linear(steps=20, record_every=10),
    "recipes.train_tiny_lm": lambda: train_tiny_lm(
        TinyLMConfig(d_model=16, n_layers=1, n_heads=2, context=16), steps=3, n_evals=2,
        eval_batches=1, batch_size=2),
    "theory.advani_saxe": lambda: theory.advani_saxe(np.geomspace(0.1, 10, 5), [0.5, 2.0]),
    "theory.advani_saxe_asymptote": lambda: theory.advani_saxe_asymptote([0.5, 2.0]),
    "recipes.simulate_linear_teacher": lambda: simulate_linear_teacher(
        n_features=20, steps=[0, 5], seeds=[0]),
    "recipes.train_digits_mlp": lambda: train_digits_mlp(widths=(16,), steps=5, n_evals=3,
                                                         probes=("rankme",)),
    "probes.cka_matrix": lambda: probes.cka_matrix({"a": _FEATS, "b": _FEATS[:, :3] ** 2},
                                                   debiased=True),
    "probes.minibatch_cka": lambda: probes.minibatch_cka([_FEATS, _FEATS ** 2], batch_size=20),
    "probes.checkpoint_cka": lambda: probes.checkpoint_cka(
        {0: {"a": _FEATS}, 5: {"a": _FEATS + 0.1}}, learning_rate=0.1),
    "probes.checkpoint_cka_first": lambda: probes.checkpoint_cka(
        {0: {"a": _FEATS}, 5: {"a": _FEATS ** 2}}, reference="first"),
    "probes.invariance_scores": lambda: _invariance(),
    "probes.lie_derivative_scores": lambda: _lie(),
    "theory.dmft_two_layer": lambda: _dmft_and_two_layer()[0],
    "recipes.train_two_layer": lambda: _dmft_and_two_layer()[1],
    "recipes.train_grokking": lambda: _grokking(),
    "theory.kernel_flow": lambda: theory.kernel_flow(
        _K[0], _LABELS[:12], [0, 5], 1e-3, kernel_test_train=_K[1][:4], targets_test=_LABELS[:4],
        loss="cross_entropy", f0_train=np.zeros((12, 3))),
    "theory.kernel_flow_limit": lambda: theory.kernel_flow_limit(
        _K[0], _RNG.standard_normal(12), kernel_test_train=_K[1][:4]),
}


def _invariance():
    from functools import partial

    from traindyn.probes.invariance import cyclic_shift, invariance_scores

    return invariance_scores(mlp(8, 6, 2, act="tanh", seed=0), _FEATS.astype(np.float32),
                             (partial(cyclic_shift), [1, 2]), layers=["1"], dim="shift")


def _lie():
    from traindyn.probes.invariance import lie_derivative_scores, translate

    return lie_derivative_scores(mlp(8, 6, 2, act="tanh", seed=0), _FEATS.astype(np.float32),
                                 {"translate": translate}, layers=["1", "2"])


@pytest.mark.parametrize("name", sorted(PRODUCERS))
def test_producer_follows_data_model(name, tmp_path):
    ds = PRODUCERS[name]()
    assert isinstance(ds, xr.Dataset)
    records.validate(ds)
    back = storage.load(storage.save_netcdf(ds, tmp_path / "r.nc"))  # writable as it is
    assert set(back.data_vars) == set(ds.data_vars)


def test_theory_and_measurement_share_names_and_coordinates():
    measured = simulate_linear_teacher(n_features=30, steps=[0, 10, 20], seeds=[0, 1])
    predicted = theory.advani_saxe(measured.time, measured.load_ratio.values,
                                   learning_rate=0.05)
    assert set(predicted.data_vars) == set(measured.data_vars)
    aligned_theory, aligned_measured = xr.align(predicted, measured, join="exact")
    residual = aligned_measured.test_error - aligned_theory.test_error
    assert residual.dims == ("load_ratio", "seed", "step")


def _dmft_and_two_layer():
    from traindyn.dynamics.recipes.two_layer import train_two_layer, two_layer_task

    x, y, xt, yt = two_layer_task(6, 4, 3, "tanh", 0)
    measured = train_two_layer(x, y, 1.0, xt, yt, widths=(16,), seeds=(0,), steps=4,
                               record_every=2)
    predicted = theory.dmft_two_layer(x, y, measured.time, 1.0, xt, yt, n_samples=64,
                                      n_steps=8, two_time=2)
    return predicted, measured


def _grokking():
    from traindyn.dynamics.recipes.grokking import train_grokking

    return train_grokking(alpha=(1.0,), n_train=8, n_test=8, dim=3, width=6, steps=3,
                          n_evals=2, ntk_samples=4)


def test_dmft_and_two_layer_network_align_without_glue():
    predicted, measured = _dmft_and_two_layer()
    shared = set(predicted.data_vars) & set(measured.data_vars)
    assert {"train_loss", "test_loss", "ntk", "ntk_alignment", "train_prediction"} <= shared
    th, me = xr.align(predicted, measured.isel(width=0), join="exact")
    assert (me.train_loss - th.train_loss).dims == ("seed", "step")
