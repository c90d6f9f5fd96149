"""Notebooks committed with their outputs: the outputs must come from the committed code.

``make notebooks`` (scripts/run_notebooks.py) executes each notebook and stores the SHA-256 of
its code cells in its metadata.  Here: every committed notebook that carries outputs carries
that hash, the hash matches its code cells, and it holds PNG figures; the staleness check
itself is exercised on a small notebook executed through nbclient, which also shows that
traindyn's figures appear inline (``image/png`` outputs) when no backend is forced.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.helpers import ROOT, load_script

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _tool():
    return load_script(ROOT / "scripts" / "run_notebooks.py")


def test_committed_outputs_come_from_the_committed_code():
    """A notebook with outputs must carry the code hash of ``make notebooks``, equal to the
    hash of its code cells now, and at least one PNG figure.  (Notebooks committed without
    outputs and without a hash are not checked until ``make notebooks`` has run.)"""
    tool = _tool()
    problems = []
    checked = 0
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        recorded = tool.recorded_hash(nb)
        if recorded is None:
            if tool.has_outputs(nb):
                problems.append(f"{path.name}: outputs without a code hash (run make notebooks)")
            continue
        checked += 1
        if recorded != tool.code_hash(nb):
            problems.append(f"{path.name}: code edited after its outputs were made "
                            "(run make notebooks)")
        if tool.image_outputs(nb) == 0:
            problems.append(f"{path.name}: no image/png output")
        if nb["metadata"]["traindyn"].get("size") != "full":
            problems.append(f"{path.name}: outputs from the small test size")
    assert problems == []
    assert checked <= len(NOTEBOOKS)


def test_code_hash_against_hashlib():
    """The hash is SHA-256 over the code cells' sources, each followed by a NUL byte."""
    tool = _tool()
    nb = {"cells": [{"cell_type": "code", "source": ["x = 1\r\n", "y = 2\n\n"]},
                    {"cell_type": "markdown", "source": "# title"},
                    {"cell_type": "code", "source": "print(x)"}]}
    expected = hashlib.sha256(b"x = 1\ny = 2\0print(x)\0").hexdigest()
    assert tool.code_hash(nb) == expected


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    pytest.importorskip("nbclient")
    import nbformat

    folder = tmp_path_factory.mktemp("nb")
    path = folder / "small.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A run"),
        nbformat.v4.new_code_cell(
            "import numpy as np, xarray as xr\n"
            "from traindyn.dynamics import plot\n"
            "ds = xr.Dataset({'rankme': (('step', 'layer'), np.arange(6.0).reshape(3, 2) + 1,\n"
            "                            {'long_name': 'RankMe', 'units': '1'})},\n"
            "                coords={'step': [0, 1, 10], 'layer': ['a', 'b']})"),
        nbformat.v4.new_code_cell("fig = plot.run_overview(ds)"),
        nbformat.v4.new_code_cell("import matplotlib\nprint(matplotlib.get_backend())"),
        nbformat.v4.new_code_cell("plot.run_overview(ds)"),   # the cell's value: shown once
    ]
    nbformat.write(nb, path)
    tool = _tool()
    tool.execute(path, out_dir=folder / "out", timeout=300, small=True,
                 client_class="tests._nbkernel.NoHeartbeatKernelClient")
    return tool, path


def test_executed_notebook_has_inline_png_and_a_fresh_hash(executed):
    import nbformat

    tool, path = executed
    nb = nbformat.read(path, as_version=4)
    assert [c.source for c in nb.cells][0] == "# A run"   # the setup cell is not saved
    assert len(nb.cells) == 5
    assert tool.image_outputs(nb) == 2                    # one per figure, none twice
    assert [sum("image/png" in o.get("data", {}) for o in c.outputs)
            for c in nb.cells[1:]] == [0, 1, 0, 1]
    png = nb.cells[2].outputs[0]["data"]["image/png"]
    import base64

    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    backend = nb.cells[3].outputs[0]["text"].strip()
    assert "inline" in backend                            # nothing switched it to Agg
    assert nb.metadata["traindyn"] == {"code_sha256": tool.code_hash(nb), "size": "small"}
    assert not tool.is_stale(nb)


def test_staleness_check_catches_an_edited_code_cell(executed):
    import nbformat

    tool, path = executed
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source = "# A run, retitled"              # markdown: still fresh
    assert not tool.is_stale(nb)
    nb.cells[2].source = "fig = plot.run_overview(ds, band='std')"
    assert tool.is_stale(nb)
    edited = path.with_name("edited.ipynb")
    nbformat.write(nb, edited)
    assert tool.main(["--check", str(edited)]) == 1
    assert tool.main(["--check", str(path)]) == 0
