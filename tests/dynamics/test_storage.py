"""dynamics.storage: the home of the file functions, the committed Zarr stream, killed appends,
permissions."""

from __future__ import annotations

import ast
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from traindyn.dynamics import records, storage
from traindyn.dynamics.storage import COMPLETE_ATTR, ZarrStream

from tests.helpers import ROOT, child_env


def evaluation(step: int, layers=("a", "b")) -> xr.Dataset:
    """One evaluation whose every value is a known function of ``step``."""
    return xr.Dataset(
        {"rankme": (("step", "layer"), [[step + 0.25 * j for j in range(len(layers))]],
                    records.variable_attrs("rankme")),
         "train_loss": ("step", [10.0 * step], records.variable_attrs("train_loss"))},
        coords={**records.step_coords([step], 0.5),
                "layer": ("layer", np.array(layers, dtype=object))},
        attrs={"source": "test"})


def check_complete(ds: xr.Dataset, steps) -> None:
    """``ds`` holds exactly the evaluations at ``steps``, with the values of :func:`evaluation`."""
    steps = np.asarray(list(steps))
    np.testing.assert_array_equal(ds["step"].values, steps)
    np.testing.assert_array_equal(ds["train_loss"].values, 10.0 * steps)
    np.testing.assert_array_equal(ds["rankme"].values, steps[:, None] + [0.0, 0.25])
    np.testing.assert_array_equal(ds["time"].values, 0.5 * steps)


def _imports(module) -> set[str]:
    """Every module a source file imports, at any depth of its code (``from a import b``
    counts ``a`` and ``a.b``)."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_file_functions_live_in_storage_alone():
    import traindyn.dynamics._monitor_worker as worker
    import traindyn.dynamics.monitor as monitor

    from traindyn import dynamics

    for name in ("save", "load", "save_netcdf", "save_zarr", "append_zarr", "recover_zarr"):
        assert getattr(storage, name).__module__ == storage.__name__
        assert not hasattr(records, name), f"records.{name} forwards to storage"
    assert "traindyn.dynamics.storage" not in _imports(records)   # no circle: storage → records
    assert dynamics.save is storage.save and dynamics.load is storage.load
    assert dynamics.load_stream is monitor.load_stream is storage.load_stream
    assert monitor.COMPLETE_ATTR == worker.COMPLETE_ATTR == COMPLETE_ATTR


def test_each_evaluation_is_committed_with_the_metadata_zarr_would_consolidate(tmp_path):
    path = tmp_path / "s.zarr"
    stream = ZarrStream(path)
    for step in range(3):
        stream.append(evaluation(step))
    with xr.open_zarr(path) as ds:   # plain xarray, default arguments
        check_complete(ds, range(3))
    root = json.loads((path / "zarr.json").read_bytes())
    assert root["attributes"][COMPLETE_ATTR] == 3
    ours = root["consolidated_metadata"]["metadata"]
    # independent reference: zarr's own consolidation of the same store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
    theirs = json.loads((path / "zarr.json").read_bytes())["consolidated_metadata"]["metadata"]
    assert ours == theirs and ours["rankme"]["shape"] == [3, 2]


def test_a_half_done_append_is_invisible_and_the_next_append_overwrites_it(tmp_path):
    path = tmp_path / "s.zarr"
    stream = ZarrStream(path)
    for step in range(3):
        stream.append(evaluation(step))
    # a kill in the middle of the 4th append: two arrays grew (with junk), the commit did not
    raw = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    raw["rankme"].append(np.full((1, 2), -1.0), axis=0)
    raw["step"].append(np.array([99]), axis=0)
    with xr.open_zarr(path) as ds:
        check_complete(ds, range(3))
    check_complete(storage.load_stream(path), range(3))
    stream.append(evaluation(3))   # the same stream goes on …
    with xr.open_zarr(path) as ds:
        check_complete(ds, range(4))
    raw = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    raw["train_loss"].append(np.array([-1.0]), axis=0)   # … and a resumed one too
    resumed = ZarrStream(path, mode="resume")
    resumed.append(evaluation(4))
    with xr.open_zarr(path, consolidated=False) as ds:   # the arrays themselves agree again
        check_complete(ds, range(5))


def test_a_kill_while_committing_leaves_the_previous_commit(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    stream = ZarrStream(path)
    for step in range(2):
        stream.append(evaluation(step))
    before = (path / "zarr.json").read_bytes()

    real = os.replace

    class Killed(Exception):
        pass

    def killed(src, dst):   # the commit's rename does not happen (a kill just before it)
        if os.path.basename(src).startswith(".zarr.json."):
            raise Killed
        real(src, dst)       # zarr's own writes go on

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        stream.append(evaluation(2))
    monkeypatch.undo()
    assert (path / "zarr.json").read_bytes() == before
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []
    with xr.open_zarr(path) as ds:
        check_complete(ds, range(2))


def test_an_evaluation_the_arrays_cannot_take_rewrites_a_copy(tmp_path):
    path = tmp_path / "s.zarr"
    stream = ZarrStream(path)
    stream.append(evaluation(0))
    stream.append(xr.concat([evaluation(1), evaluation(2)], dim="step"))  # two rows at once
    stream.append(evaluation(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]   # no temporaries left
    with xr.open_zarr(path) as ds:
        check_complete(ds, range(4))
        assert ds.attrs[COMPLETE_ATTR] == 3   # evaluations (appends), not rows


def test_a_store_of_an_older_version_is_repaired_by_load_stream(tmp_path):
    path = tmp_path / "old.zarr"
    for step in range(3):   # the old format: plain appends, then the count, no commit
        storage.append_zarr(evaluation(step), path)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[COMPLETE_ATTR] = 3
    group["rankme"].resize((4, 2))   # killed mid-append
    with pytest.raises(ValueError, match="conflicting sizes"):
        storage.load(path)
    check_complete(storage.load_stream(path), range(3))
    check_complete(storage.load(path), range(3))   # repaired in place


def test_check_store_refuses_what_it_should(tmp_path):
    path = tmp_path / "s.zarr"
    assert storage.check_store(path) is None
    (tmp_path / "empty").mkdir()
    assert storage.check_store(tmp_path / "empty") is None
    stream = ZarrStream(path)
    for step in (0, 5, 9):
        stream.append(evaluation(step))
    with pytest.raises(FileExistsError, match=r"overwrite=True.*resume=True"):
        storage.check_store(path)
    with pytest.raises(ValueError, match="exclude"):
        storage.check_store(path, overwrite=True, resume=True)
    assert storage.check_store(path, overwrite=True) is None
    assert storage.check_store(path, resume=True) == {
        "steps": [0, 5, 9], "variables": ["rankme", "train_loss"], "layers": ["a", "b"],
        "settings": {"seed": None}}
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        storage.check_store(tmp_path / "notes.txt", overwrite=True)
    with pytest.raises(ValueError, match="resume=True"):
        ZarrStream(path, "resume").append(evaluation(10, layers=("a", "c")))
    with pytest.raises(FileExistsError):   # "new" never replaces what appeared meanwhile
        ZarrStream(path, "new").append(evaluation(10))
    with xr.open_zarr(path) as ds:
        check_complete(ds, [0, 5, 9])


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_permissions_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        nc = storage.save_netcdf(evaluation(0), tmp_path / "r.nc")
        finished = storage.save_zarr(evaluation(0), tmp_path / "r.zarr")
        stream = ZarrStream(tmp_path / "s.zarr")
        for step in range(2):
            stream.append(evaluation(step))
    finally:
        os.umask(old)
    assert _mode(nc) == 0o644
    for store in (finished, tmp_path / "s.zarr"):
        files = [os.path.join(d, f) for d, _, fs in os.walk(store) for f in fs]
        folders = [d for d, _, _ in os.walk(store)]
        assert len(files) > 5
        assert {_mode(f) for f in files} == {0o644}, store
        assert {_mode(d) for d in folders} == {0o755}, store


APPENDER = textwrap.dedent("""
    import sys
    import numpy as np, xarray as xr
    from traindyn.dynamics.storage import ZarrStream
    names = [f"v{i}" for i in range(12)]
    stream = ZarrStream(sys.argv[1])
    for step in range(100000):
        ds = xr.Dataset({n: (("step", "layer"), [[step + i, -step - i]])
                         for i, n in enumerate(names)},
                        coords={"step": [step], "layer": ["a", "b"]})
        stream.append(ds)
        print(step, flush=True)
""")


@pytest.mark.parametrize("trials", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_a_store_killed_at_random_moments_opens_with_plain_xarray(tmp_path, trials):
    """SIGKILL a process appending evaluations of 12 arrays at random moments: each time plain
    ``xarray.open_zarr`` opens the store, which holds whole evaluations only."""
    rng = np.random.default_rng(trials)
    env = child_env(OMP_NUM_THREADS="1")
    for trial in range(trials):
        path = tmp_path / f"k{trial}.zarr"
        proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)],
                                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        reported = -1
        try:
            while reported < 3:
                line = proc.stdout.readline()
                if not line:
                    break
                reported = int(line)
            time.sleep(rng.uniform(0.0, 0.05))   # somewhere inside a later append
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert reported >= 3, "the child did not get far enough"
        with xr.open_zarr(path) as ds:
            steps = ds["step"].values
            assert len(steps) >= reported + 1
            np.testing.assert_array_equal(steps, np.arange(len(steps)))
            for i in range(12):
                np.testing.assert_array_equal(ds[f"v{i}"].values,
                                              np.stack([steps + i, -steps - i], axis=1))
