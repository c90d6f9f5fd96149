"""The data model: validation, NetCDF/Zarr round trips, atomic writes, provenance."""

import json

import numpy as np
import pytest
import xarray as xr
from traindyn.dynamics import records, storage


def _measured(steps=(0, 10, 100), lr=0.1, seed=None) -> xr.Dataset:
    rng = np.random.default_rng(0 if seed is None else seed)
    ds = xr.Dataset(
        {"rankme": (("step", "layer"), rng.random((len(steps), 2)),
                    records.variable_attrs("rankme")),
         "train_loss": ("step", rng.random(len(steps)), records.variable_attrs("train_loss"))},
        coords={**records.step_coords(steps, lr), "layer": ["net.1", "net.3"]},
        attrs={"source": "test", "parameters": records.params_attr({"lr": lr, "widths": [2, 3]})},
    )
    return records.validate(ds)


def test_time_coordinate_is_learning_rate_times_step():
    ds = _measured(steps=(0, 5, 50), lr=0.02)
    np.testing.assert_allclose(ds.time.values, [0.0, 0.1, 1.0])
    assert ds.time.dims == ("step",)


def test_validate_names_every_problem():
    ds = _measured()
    bad = ds.drop_vars("time")
    bad["rankme"].attrs = {}
    bad.attrs = {"config": {"a": 1}}
    with pytest.raises(ValueError) as err:
        records.validate(bad)
    text = str(err.value)
    for fragment in ("'rankme' has no 'long_name'", "'time' coordinate", "'source'",
                     "'config' is a dict"):
        assert fragment in text


def test_netcdf_round_trip_keeps_values_coords_and_attrs(tmp_path):
    ds = _measured()
    path = storage.save_netcdf(ds, tmp_path / "out" / "result.nc")
    back = storage.load(path)
    xr.testing.assert_identical(back.drop_attrs(), ds.drop_attrs())
    assert back.rankme.attrs["units"] == "1"
    assert json.loads(back.attrs["parameters"]) == {"lr": 0.1, "widths": [2, 3]}
    versions = json.loads(back.attrs["versions"])
    assert {"numpy", "xarray", "torch"} <= set(versions)


def test_dict_attributes_are_stored_as_json(tmp_path):
    ds = _measured()
    ds.attrs["config"] = {"depth": 3}
    back = storage.load(storage.save_netcdf(ds, tmp_path / "r.nc"))
    assert json.loads(back.attrs["config"]) == {"depth": 3}


def test_netcdf_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.nc"
    storage.save_netcdf(_measured(seed=1), path)
    before = path.read_bytes()

    def explode(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        storage.save_netcdf(_measured(seed=2), path)
    assert path.read_bytes() == before  # the old result survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["r.nc"]  # no temporary left behind


def test_zarr_append_along_step_equals_concatenation(tmp_path):
    parts = [_measured(steps=(s,), seed=s) for s in (0, 10, 100)]
    store = tmp_path / "live.zarr"
    for part in parts:
        storage.append_zarr(part, store)
    back = storage.load(store)
    expected = xr.concat(parts, dim="step")
    np.testing.assert_array_equal(back.step.values, [0, 10, 100])
    np.testing.assert_allclose(back.rankme.values, expected.rankme.values)
    np.testing.assert_allclose(back.time.values, expected.time.values)
    assert list(back.layer.values) == ["net.1", "net.3"]


def test_save_and_load_choose_format_by_suffix(tmp_path):
    ds = _measured()
    z = storage.save(ds, tmp_path / "r.zarr")
    n = storage.save(ds, tmp_path / "r.nc")
    assert z.is_dir() and n.is_file()
    np.testing.assert_allclose(storage.load(z).rankme.values, storage.load(n).rankme.values)
    with pytest.raises(FileNotFoundError):
        storage.load(tmp_path / "missing.nc")
