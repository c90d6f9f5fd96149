"""Execute notebooks/grokking.ipynb at small size and check what it reports."""

from __future__ import annotations

import json
import math

from tests.helpers import run_notebook


def test_grokking_notebook(tmp_path):
    run_notebook("grokking.ipynb", tmp_path)
    assert (tmp_path / "grokking.png").stat().st_size > 10_000
    s = json.loads((tmp_path / "grokking.json").read_text())
    rich, lazy = 0, -1
    # the training loss halves before the test loss does
    assert all(te >= tt for tt, te in zip(s["t_train"], s["t_test"], strict=True))
    # the lazier run learns the target direction less and generalises later
    assert s["final_M_drift_beta"][lazy] < s["final_M_drift_beta"][rich]
    assert s["final_test"][lazy] > s["final_test"][rich]
    assert s["t_test"][lazy] > s["t_test"][rich] or math.isinf(s["t_test"][lazy])
