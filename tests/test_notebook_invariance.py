"""The invariance notebook runs end to end at small size and writes its outputs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import run_notebook


def test_invariance_notebook_runs(tmp_path):
    pytest.importorskip("nbclient")
    run_notebook("invariance_digits.ipynb", tmp_path)
    from traindyn.dynamics import records, storage

    ds = storage.load(tmp_path / "invariance_digits.nc")
    records.validate(ds)
    assert set(ds.invariance_distance.dims) == {"arch", "augmented", "step", "transform", "layer"}
    assert set(ds.transform.values) == {"shift_1px", "rotate_15deg"}
    # CKA of a representation with its transformed copy is a CKA: within [0, 1]
    assert float(ds.invariance_cka.min()) >= 0.0 and float(ds.invariance_cka.max()) <= 1.0 + 1e-12
    assert np.isfinite(ds.equivariance_error).all()
    assert (tmp_path / "invariance_digits.png").stat().st_size > 10_000
