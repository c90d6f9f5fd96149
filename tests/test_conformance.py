"""Every public producer of results returns a Dataset that follows the data model.

theory/ and probes/ cannot import dynamics/records.py (dependencies point down), so this test
is what keeps their Datasets in the shared vocabulary: each producer below is run at a small
size and its output validated, and a theory and a measurement of the same quantity align.
"""

import numpy as np
import pytest
import xarray as xr

import theory
from dynamics import records
from dynamics.recipes import simulate_linear_teacher, train_digits_mlp

PRODUCERS = {
    "theory.advani_saxe": lambda: theory.advani_saxe(np.geomspace(0.1, 10, 5), [0.5, 2.0]),
    "theory.advani_saxe_asymptote": lambda: theory.advani_saxe_asymptote([0.5, 2.0]),
    "recipes.simulate_linear_teacher": lambda: simulate_linear_teacher(
        n_features=20, steps=[0, 5], seeds=[0]),
    "recipes.train_digits_mlp": lambda: train_digits_mlp(widths=(16,), steps=5, n_evals=3,
                                                         probes=("rankme",)),
}


@pytest.mark.parametrize("name", sorted(PRODUCERS))
def test_producer_follows_data_model(name, tmp_path):
    ds = PRODUCERS[name]()
    assert isinstance(ds, xr.Dataset)
    records.validate(ds)
    back = records.load(records.save_netcdf(ds, tmp_path / "r.nc"))  # writable as it is
    assert set(back.data_vars) == set(ds.data_vars)


def test_theory_and_measurement_share_names_and_coordinates():
    measured = simulate_linear_teacher(n_features=30, steps=[0, 10, 20], seeds=[0, 1])
    predicted = theory.advani_saxe(measured.time, measured.load_ratio.values,
                                   learning_rate=0.05)
    assert set(predicted.data_vars) == set(measured.data_vars)
    aligned_theory, aligned_measured = xr.align(predicted, measured, join="exact")
    residual = aligned_measured.test_error - aligned_theory.test_error
    assert residual.dims == ("load_ratio", "seed", "step")
