"""The RankMe-claim notebook runs end to end at small size; its correlations are recomputed here
from the Dataset it saved (scipy on the same numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from tests.helpers import run_notebook


def test_rankme_claim_notebook_runs(tmp_path):
    pytest.importorskip("nbclient")
    run_notebook("rankme_claim.ipynb", tmp_path)
    from traindyn.dynamics import records, storage

    ds = storage.load(tmp_path / "rankme_claim.nc")
    records.validate(ds)
    assert ds["rankme"].dims == ("learning_rate", "projector_width", "temperature", "seed",
                                 "step", "layer")
    assert (tmp_path / "rankme_claim.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "rankme_claim.json").read_text())
    last = ds.isel(step=-1)
    x = last["rankme"].sel(layer="projector").values.ravel()
    y = last["linear_probe_accuracy"].sel(layer="encoder").values.ravel()
    rho, lo, hi = summary["RankMe (embedding)"]["grid_spearman"]
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert lo <= rho + 1e-12 and rho - 1e-12 <= hi
    accuracy = ds["linear_probe_accuracy"].values
    assert np.all((accuracy >= 0) & (accuracy <= 1))
