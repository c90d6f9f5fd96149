"""Execute notebooks/ntk_lazy_rich.ipynb at small size and check what it reports."""

from __future__ import annotations

import json

from tests.helpers import run_notebook


def test_ntk_lazy_rich_notebook(tmp_path):
    run_notebook("ntk_lazy_rich.ipynb", tmp_path)
    assert (tmp_path / "ntk_lazy_rich.png").stat().st_size > 10_000
    s = json.loads((tmp_path / "ntk_lazy_rich.json").read_text())
    lazy, mid, rich = s["relative_change"]
    # the kernel barely moves at large output scale and moves by O(1) at small scale
    assert lazy < 0.05 < mid < rich
    # feature learning aligns the kernel with the task; the lazy kernel does not move
    assert abs(s["alignment_gain"][0]) < 0.01 and s["alignment_gain"][2] > 0.02
    # the lazy run's loss follows kernel regression with K_0 (width 128: within 10 %)
    assert s["lazy_max_relative_deviation"] < 0.1
    assert s["probe_relative_change"] > 0
