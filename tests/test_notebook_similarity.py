"""The representation-similarity notebook runs end to end at small size and writes its outputs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import run_notebook


def test_representation_similarity_notebook_runs(tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("seaborn")
    run_notebook("representation_similarity.ipynb", tmp_path)
    from traindyn.dynamics import records, storage

    ds = storage.load(tmp_path / "representation_similarity.nc")
    records.validate(ds)
    assert ds.cka.dims == ("step", "checkpoint2", "layer")
    np.testing.assert_allclose(np.diagonal(ds.cka.values, axis1=0, axis2=1), 1.0, atol=1e-10)
    np.testing.assert_allclose(ds.cka.values, ds.cka.values.transpose(1, 0, 2), atol=1e-12)
    for name in ("cka_layers_digits", "cka_checkpoints_digits", "cka_tiny_lm"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
