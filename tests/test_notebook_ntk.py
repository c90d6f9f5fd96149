"""Execute notebooks/ntk_lazy_rich.ipynb at small size and check what it reports.

The notebook trains the two-layer network of ``recipes.two_layer`` at a lazy (γ₀ = 0.05) and a
rich (γ₀ = 2) output scale and draws each run's own linearisation from step 0
(``dynamics.predict.predict_from_model``) and the DMFT through the measured loss curves.
Measured at the small size (P = 20, widths 100 and 400, two seeds, 60 steps, η = 0.1):
largest deviation of the loss curves from the step-0 linearisation, relative to the initial
loss, 5.6e-4 and 3.4e-4 (lazy) against 0.073 and 0.085 (rich); mean lazy→rich gap
(Δ = 30 steps) 2.0e-3 (lazy) against 0.21–0.22 (rich); DMFT within 0.4 % of the rich
networks' seed-mean loss curve.
"""

from __future__ import annotations

import json

import numpy as np

from tests.helpers import run_notebook


def test_ntk_lazy_rich_notebook(tmp_path):
    nb = run_notebook("ntk_lazy_rich.ipynb", tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert (tmp_path / "ntk_lazy_rich.png").stat().st_size > 10_000
    s = json.loads((tmp_path / "ntk_lazy_rich.json").read_text())
    lin = np.array(s["deviation_from_linearised"])      # (gamma0, width)
    gap = np.array(s["relative_gap"])
    dmft = np.array(s["deviation_from_dmft"])
    assert s["gammas"][0] < s["gammas"][-1]
    # the lazy run is its step-0 linearisation (Lee et al. 2019): within 1 % of the initial loss
    assert np.all(lin[0] < 0.01), lin
    # the rich run leaves it, by more than ten times as much, at every width
    assert np.all(lin[-1] > 10 * lin[0]), lin
    # the lazy→rich gap is larger for the rich run, at every width
    assert np.all(gap[-1] > 10 * gap[0]), gap
    # the DMFT (N → ∞ at fixed γ₀) follows the rich run closer than its linearisation does
    assert dmft[-1, -1] < 0.03 and dmft[-1, -1] < lin[-1, -1], (dmft, lin)
