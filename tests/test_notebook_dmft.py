"""Execute notebooks/dmft_two_layer.ipynb at small size and check what it reports."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_notebook

pytest.importorskip("jax")


def test_dmft_two_layer_notebook(tmp_path):
    run_notebook("dmft_two_layer.ipynb", tmp_path)
    assert (tmp_path / "dmft_two_layer.png").stat().st_size > 10_000
    s = json.loads((tmp_path / "dmft_two_layer.json").read_text())
    for g, gap in s["gap_by_width"].items():
        assert gap[0] > gap[2], (g, gap)          # wider networks are closer to the theory
        assert s["rel_loss_gap_mid_width"][g] < 0.05   # the loss curve at N = 500 within 5 %
        r = s["residuals"][g]
        assert r[-1] < 1e-7 and all(b < a for a, b in zip(r, r[1:], strict=False))
    gains = [s["alignment_gain"][g] for g in sorted(s["alignment_gain"], key=float)]
    assert 0 <= gains[0] < gains[1], gains    # richer: the kernel aligns more with the task
