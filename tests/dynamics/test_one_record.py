"""One measurement record: the Monitor (synchronous, thread, process) and ``analyze`` give the
same Dataset for the same model and steps, and the one builder
(:mod:`traindyn.dynamics.measurement_dataset`) follows its rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics import measurement_dataset
from traindyn.dynamics.analyze import analyze
from traindyn.dynamics.monitor import Monitor
from traindyn.probes.evaluation import Measurement

PROBES = ["rankme", "alpha_req", "neural_collapse", "class_rankme", "weight_spectra", "ntk",
          "cka_first", "cka_previous", "log_partition"]
KWARGS = {"alpha_req": {"fit_range": (1, 8)}}
LAYERS = ["0", "1", "2"]
LR = 0.05


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _model().state_dict()


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The probe batch, its labels and the weights of steps 0, 1, 2 saved as checkpoints."""
    folder = tmp_path_factory.mktemp("one_record")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    y = torch.arange(24) % 3
    (folder / "run").mkdir()
    for step in range(3):
        torch.save(_weights(step), folder / "run" / f"step{step}.pt")
    torch.save(x, folder / "inputs.pt")
    np.save(folder / "labels.npy", y.numpy())
    return folder, x, y


def _monitor(x, y, background) -> xr.Dataset:
    model = _model()
    with _quiet():
        monitor = Monitor(model, probes=PROBES, layers=LAYERS, probe_data=x, probe_labels=y,
                          schedule=lambda step: True, learning_rate=LR, background=background,
                          probe_kwargs=KWARGS)
        with monitor:
            for step in range(3):
                model.load_state_dict(_weights(step))
                monitor.step(step)
        ds = monitor.to_dataset()
    ds.attrs = {}
    return ds


class _quiet:
    def __enter__(self):
        import warnings

        self.catch = warnings.catch_warnings()
        self.catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self.catch.__exit__(*exc)


def test_monitor_in_three_modes_and_analyze_give_the_same_dataset(series):
    folder, x, y = series
    modes = {mode: _monitor(x, y, background) for mode, background in
             (("sync", False), ("thread", "thread"), ("process", "process"))}
    for mode in ("thread", "process"):
        xr.testing.assert_identical(modes[mode], modes["sync"])
    with _quiet():
        series_ds = analyze(folder / "run", model=_model, probe_data=folder / "inputs.pt",
                            probe_labels=folder / "labels.npy", probes=PROBES,
                            probe_kwargs=KWARGS, layers=LAYERS, dtype="float64",
                            batch_size=24, learning_rate=LR, progress=False)
    monitor_ds = modes["sync"]
    assert list(series_ds["status"].values) == ["ok"] * 3
    names = sorted(monitor_ds.data_vars)
    assert len(names) > 30 and set(names) <= set(series_ds.data_vars)
    for name in names:
        got, want = series_ds[name], monitor_ds[name]
        assert got.attrs == want.attrs, name
        xr.testing.assert_equal(got.reset_coords(drop=True).drop_vars("layer", errors="ignore"),
                                want.reset_coords(drop=True).drop_vars("layer",
                                                                       errors="ignore"))
    np.testing.assert_array_equal(series_ds["time"].values, monitor_ds["time"].values)
    np.testing.assert_array_equal(series_ds["layer"].values, monitor_ds["layer"].values)
    # an independent number: RankMe (Garrido et al. 2023, Eq. 1) of layer "0" at step 2 from a
    # float64 SVD of the features written out by hand
    w = _weights(2)
    z = (x @ w["0.weight"].T + w["0.bias"]).numpy()
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    rankme = float(np.exp(-(p * np.log(p)).sum()))
    np.testing.assert_allclose(monitor_ds["rankme"].sel(layer="0").values[2], rankme, rtol=1e-9)
    # reference probes: the first step compares with itself, the previous is missing there
    assert np.all(monitor_ds["cka_first"].values[0] == pytest.approx(1.0))
    assert np.isnan(monitor_ds["cka_previous"].values[0]).all()
    assert np.isfinite(monitor_ds["cka_previous"].values[1:]).all()


def test_builder_fills_missing_steps_and_layers_and_keeps_declared_attrs():
    declared = {"a": (("layer",), {"long_name": "A", "units": "1"}),
                "b": (("layer", "class"), {"long_name": "B", "units": "1"}),
                "m": ((), {"long_name": "M", "units": "s"})}
    first = Measurement(layer_values={"a": {"x": 1.5, "y": 2.5},
                                      "b": {"x": np.array([1.0, 2.0])}},
                        values={"m": 3.0}, notes=["n1"], layer_notes={"y": ["why y"]})
    second = Measurement(layer_values={"a": {"y": 4.0}}, values={})
    ds = measurement_dataset.build([0, 10, 20], [first, None, second], layers=["x", "y"],
                                   declared=declared, learning_rate=0.5, notes=True,
                                   scalars=[{"loss": 1.0}, {}, {"loss": 0.25}])
    np.testing.assert_array_equal(ds["time"].values, [0.0, 5.0, 10.0])
    np.testing.assert_array_equal(ds["a"].values, [[1.5, 2.5], [np.nan, np.nan], [np.nan, 4.0]])
    assert ds["b"].dims == ("step", "layer", "class")
    np.testing.assert_array_equal(ds["b"].values[0], [[1.0, 2.0], [np.nan, np.nan]])
    assert np.isnan(ds["b"].values[1:]).all()
    np.testing.assert_array_equal(ds["m"].values, [3.0, np.nan, np.nan])
    np.testing.assert_array_equal(ds["loss"].values, [1.0, np.nan, 0.25])
    assert ds["a"].attrs == {"long_name": "A", "units": "1"}
    assert ds["m"].attrs["units"] == "s"
    assert list(ds["notes"].values) == ["n1", "", ""]
    assert ds["layer_notes"].values.tolist() == [["", "why y"], ["", ""], ["", ""]]


def test_measurement_records_round_trip_through_json():
    import json

    da = xr.DataArray([1.0, 2.0], dims=("class",), coords={"class": [0, 1]})
    m = Measurement(layer_values={"a": {"x": 1.25}, "b": {"x": da, "y": da * 2}},
                    values={"m": 0.5}, notes=["one", "two"], layer_notes={"x": ["why"]})
    back = measurement_dataset.from_record(
        json.loads(json.dumps(measurement_dataset.to_record(m, ["x", "y"]))), ["x", "y"])
    assert back.layer_values["a"] == {"x": 1.25}   # the missing layer "y" stays missing
    xr.testing.assert_identical(back.layer_values["b"]["y"], da * 2)
    assert back.values == {"m": 0.5}
    assert back.notes == ["one; two"] and back.layer_notes == {"x": ["why"]}
