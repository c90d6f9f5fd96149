"""The inductive-bias and neural-collapse notebooks run end to end at small size.

Each notebook ends with a cell asserting its own conclusions on the run it just made (kernel
space needs more bits than MLP spaces; the deep linear model reaches the predicted geometry), so
executing it checks the science as well as the code.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_notebook


@pytest.mark.parametrize("name,outputs", [
    ("inductive_bias_digits.ipynb", ["inductive_bias_digits.png", "inductive_bias_digits.nc"]),
    ("neural_collapse_training.ipynb", ["collapse_norms.png", "minority_collapse.png",
                                        "collapse_training.nc"]),
])
def test_notebook_runs_and_writes_outputs(name, outputs, tmp_path):
    run_notebook(name, tmp_path)
    for out in outputs:
        assert (tmp_path / out).stat().st_size > 0, out
