"""The representation-geometry notebook runs end to end at small size and writes its outputs."""

from __future__ import annotations

import pytest

from tests.helpers import run_notebook


def test_representation_geometry_notebook_runs(tmp_path):
    pytest.importorskip("nbclient")
    run_notebook("representation_geometry_digits.ipynb", tmp_path)
    from traindyn.dynamics import records, storage

    ds = storage.load(tmp_path / "representation_geometry_digits.nc")
    records.validate(ds)
    assert {"rankme", "rankme_covariance", "alpha_req", "nc1", "nc4"} <= set(ds.data_vars)
    assert ds.sizes["layer"] == 2
    assert (tmp_path / "representation_geometry_digits.png").stat().st_size > 10_000
