"""The linear-dynamics, deep-linear and fitting-ratio notebooks run at small size; each
asserts its own theory-vs-measurement agreement inside the notebook."""

from __future__ import annotations

import pytest

from tests.helpers import run_notebook


@pytest.mark.parametrize("name", ["advani_saxe.ipynb", "deep_linear_modes.ipynb",
                                  "fitting_ratio.ipynb"])
def test_notebook_runs_and_draws_theory_through_measurement(name, tmp_path):
    nb = run_notebook(name, tmp_path)
    assert (tmp_path / name.replace(".ipynb", ".png")).stat().st_size > 10_000
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
