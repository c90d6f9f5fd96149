"""The kernel learning-curve and scaling-regime notebooks run at small size."""

from __future__ import annotations

import pytest

from tests.helpers import run_notebook


@pytest.mark.parametrize("name", ["kernel_learning_curves.ipynb", "scaling_regimes.ipynb"])
def test_notebook_runs_and_writes_its_figure(name, tmp_path):
    nb = run_notebook(name, tmp_path)
    assert (tmp_path / name.replace(".ipynb", ".png")).stat().st_size > 10_000
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
