"""Regressions found by the hostile pass (``scripts/hostile_pass.py``) on real structures,
each against an independent reference."""

from __future__ import annotations

import subprocess
import sys


def test_theory_kernel_flow_is_the_function_after_its_submodule_is_imported():
    """``from traindyn.theory.kernel_flow import …`` (the submodule) before
    ``theory.kernel_flow(…)`` (the function, as ``dynamics.predict`` calls it): the attribute
    stays the function.  Reference: the closed form ``f_s = y + (I − ηΘ/c)^s (f₀ − y)``."""
    code = (
        "import numpy as np\n"
        "from traindyn.theory.kernel_flow import kernel_flow_limit\n"
        "from traindyn import theory\n"
        "r = np.random.default_rng(0); j = r.normal(size=(6, 9)); K = j @ j.T / 9\n"
        "y = np.eye(2)[np.arange(6) % 2]; f0 = r.normal(size=(6, 2))\n"
        "ds = theory.kernel_flow(K, y, [7], 0.5, f0_train=f0, normalization=6.0)\n"
        "ref = y + np.linalg.matrix_power(np.eye(6) - 0.5 * K / 6.0, 7) @ (f0 - y)\n"
        "v = 'f_train'\n"
        "print(float(np.abs(np.asarray(ds[v]).reshape(6, 2) - ref).max()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert float(out) < 1e-12


def test_report_never_replaces_a_page_it_did_not_write(tmp_path):
    """``write_report(run, "index.html")`` over a user's own page: refused, the page kept
    byte for byte; over its own page, or with ``overwrite=True``: written (the new page holds
    the run's value, read back from the HTML)."""
    import pytest
    import xarray as xr
    from traindyn.dynamics.report import write_report

    ds = xr.Dataset({"rankme": (("step", "layer"), [[3.25], [7.125]])},
                    coords={"step": [0, 10], "layer": ["fc"], "time": ("step", [0.0, 1.0])})
    html = tmp_path / "index.html"
    html.write_text("<html>my homepage</html>")
    with pytest.raises(FileExistsError, match="did not write"):
        write_report(ds, html)
    assert html.read_text() == "<html>my homepage</html>"
    write_report(ds, html, overwrite=True)
    assert "7.125" in html.read_text()
    write_report(ds.assign(rankme=ds["rankme"] * 2), html)  # its own page: replaced
    assert "14.25" in html.read_text()
