"""The monitor's store: an existing one is refused, replaced (overwrite=True) or resumed
(resume=True); process mode refuses a training script without a main guard at construction."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import linear

from tests.helpers import ROOT, child_env


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(store, steps, probes=("rankme",), layers=("1",), shift=0.0, **options) -> Monitor:
    """Record ``steps`` of a small net whose weights change by a known amount per step; the
    loss passed at step ``s`` is ``s + shift`` (tells the runs apart)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
    monitor = Monitor(model, probes=list(probes), layers=list(layers), schedule=linear(1),
                      probe_data=torch.randn(20, 3), store=store, **options)
    with monitor:
        for step in steps:
            with torch.no_grad():
                model[0].weight.mul_(1.0 + 0.1 * step)
            monitor.step(step, train_loss=step + shift)
    return monitor


def stored(store) -> xr.Dataset:
    with xr.open_zarr(store) as ds:
        return ds.load()


def test_an_existing_store_is_refused_at_construction(tmp_path):
    store = tmp_path / "run.zarr"
    run(store, range(3))
    before = stored(store)
    with pytest.raises(FileExistsError, match=r"overwrite=True.*resume=True"):
        run(store, range(3))
    xr.testing.assert_identical(stored(store), before)


def test_overwrite_replaces_the_store_at_the_first_new_evaluation(tmp_path):
    store = tmp_path / "run.zarr"
    run(store, range(4))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
    monitor = Monitor(model, probes=["rankme"], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(20, 3), store=store, overwrite=True)
    np.testing.assert_array_equal(stored(store)["step"].values, range(4))   # still intact
    monitor.step(7, train_loss=-1.0)
    ds = stored(store)
    np.testing.assert_array_equal(ds["step"].values, [7])
    np.testing.assert_array_equal(ds["train_loss"].values, [-1.0])
    np.testing.assert_array_equal(ds["rankme"].values, monitor.to_dataset()["rankme"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]


@pytest.mark.parametrize("background", [False, pytest.param("process", marks=pytest.mark.slow)])
def test_resume_appends_and_skips_the_steps_already_recorded(tmp_path, background):
    store = tmp_path / "run.zarr"
    first = run(store, range(5))           # steps 0-4, then the run "crashes"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = run(store, range(8), shift=100.0, resume=True, background=background)
    skips = [w for w in caught if "already holds steps up to 4" in str(w.message)]
    assert len(skips) == 1                 # one warning for the five skipped steps
    ds = stored(store)
    np.testing.assert_array_equal(ds["step"].values, range(8))
    np.testing.assert_array_equal(ds["train_loss"].values, [0, 1, 2, 3, 4, 105, 106, 107])
    mine = second.to_dataset()
    np.testing.assert_array_equal(mine["step"].values, [5, 6, 7])
    np.testing.assert_array_equal(ds["rankme"].values,
                                  np.concatenate([first.to_dataset()["rankme"].values,
                                                  mine["rankme"].values]))


@pytest.mark.filterwarnings("ignore:resume=True")
def test_resume_refuses_a_run_that_records_something_else(tmp_path):
    store = tmp_path / "run.zarr"
    run(store, range(2))
    before = stored(store)
    with pytest.raises(ValueError, match=r"no layers \['3'\]"):
        run(store, range(4), layers=("1", "3"), resume=True)
    with pytest.raises(ValueError, match=r"holds another run \(probes: the store has "
                                         r"\['rankme'\], this run \['rankme', 'alpha_req'\]\)"):
        run(store, range(4), probes=("rankme", "alpha_req"), resume=True)
    xr.testing.assert_identical(stored(store), before)


@pytest.mark.filterwarnings("ignore:resume=True")
def test_resume_refuses_another_seed_learning_rate_or_probe_settings(tmp_path):
    store = tmp_path / "run.zarr"
    same = dict(seed=3, learning_rate=0.1, probe_kwargs={"rankme": {"eps": 1e-7}})
    run(store, range(3), **same)
    before = stored(store)
    for change, words in (
            ({"seed": 4}, ["seed: the store has 3, this run 4"]),
            ({"learning_rate": 0.2}, ["learning_rate: the store has 0.1, this run 0.2"]),
            ({"probe_kwargs": {"rankme": {"eps": 1e-3}}},
             ["probe_kwargs: the store has {'rankme': {'eps': 1e-07}}, this run "
              "{'rankme': {'eps': 0.001}}"]),
            ({"seed": None, "learning_rate": 0.3, "reduce": "mean"},
             ["seed: the store has 3, this run None", "learning_rate", "reduce"])):
        with pytest.raises(ValueError, match="holds another run") as caught:
            run(store, range(6), resume=True, **{**same, **change})
        for word in words:
            assert word in str(caught.value), str(caught.value)
    # a learning rate set after construction (the Lightning callback reads the optimiser's)
    # is refused at the first evaluation appended
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
    monitor = Monitor(model, probes=["rankme"], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(20, 3), store=store, resume=True,
                      seed=3, probe_kwargs={"rankme": {"eps": 1e-7}})
    monitor.learning_rate = 0.5
    with pytest.raises(ValueError, match="learning_rate: the store has 0.1, this run 0.5"):
        monitor.step(5, train_loss=5.0)
    xr.testing.assert_identical(stored(store), before)    # nothing appended
    run(store, range(6), resume=True, **same)                 # the same run appends
    np.testing.assert_array_equal(stored(store)["step"].values, range(6))


def test_netcdf_never_replaces_a_file_no_monitor_wrote(tmp_path):
    from traindyn.dynamics import storage

    users = tmp_path / "results.nc"
    users.write_text("my results")
    with pytest.raises(FileExistsError, match=r"results.nc holds a file that traindyn did not "
                                              r"write.*overwrite"):
        run(None, range(2), netcdf=users)          # refused before training starts
    assert users.read_text() == "my results"
    run(None, range(2), netcdf=users, overwrite=True)
    np.testing.assert_array_equal(storage.load(users)["train_loss"].values, [0.0, 1.0])
    run(None, range(3), netcdf=users)            # a monitor's own file: replaced
    np.testing.assert_array_equal(storage.load(users)["train_loss"].values, [0.0, 1.0, 2.0])


LEFT_OPEN = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear

    def main(folder, background):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU())
        x = torch.randn(256, 6)
        left = Monitor(model, probes=["rankme", "alpha_req"], layers=["1", "3"],
                       schedule=linear(1), probe_data=x, background=background,
                       store=folder + "/left.zarr", netcdf=folder + "/left.nc")
        plain = Monitor(model, probes=["rankme"], layers=["1"], schedule=linear(1),
                        probe_data=x, netcdf=folder + "/sync.nc")
        for step in range(18):   # a training loop that ends without close() or `with`
            with torch.no_grad():
                model[0].weight.mul_(1.01)
            left.step(step, train_loss=float(step))
            plain.step(step, train_loss=float(step))
        print("loop done", flush=True)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
""")


@pytest.mark.parametrize("background", ["thread", pytest.param("process",
                                                               marks=pytest.mark.slow)])
def test_a_monitor_left_open_is_drained_and_closed_at_exit(tmp_path, background):
    """A script whose loop ends without ``close()`` or ``with``: at interpreter exit every
    evaluation is in the store, and the ``netcdf=`` files are written."""
    from traindyn.dynamics import storage

    script = tmp_path / "train.py"
    script.write_text(LEFT_OPEN)
    out = subprocess.run([sys.executable, str(script), str(tmp_path), background],
                         env=child_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "loop done" in out.stdout, out.stderr
    assert "closing at interpreter exit failed" not in out.stderr, out.stderr
    stream = storage.load_stream(tmp_path / "left.zarr")
    np.testing.assert_array_equal(stream["step"].values, range(18))
    np.testing.assert_array_equal(stream["train_loss"].values, range(18))
    netcdf = storage.load(tmp_path / "left.nc")
    np.testing.assert_array_equal(netcdf["rankme"].values, stream["rankme"].values)
    assert np.isfinite(stream["rankme"].values).all() and stream.sizes["layer"] == 2
    sync = storage.load(tmp_path / "sync.nc")   # the same weights, the same layer "1"
    np.testing.assert_allclose(sync["rankme"].values[:, 0], stream["rankme"].values[:, 0],
                               rtol=1e-12)


SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear

    def main():
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        monitor = Monitor(model, probes=["rankme"], layers=["1"], schedule=linear(1),
                          probe_data=torch.randn(8, 3), background="process")
        print("training starts", flush=True)
        with monitor:
            for step in range(3):
                monitor.step(step, train_loss=float(step))
        print("steps", monitor.to_dataset()["step"].values.tolist(), flush=True)
""")


@pytest.mark.parametrize("guarded", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_process_mode_refuses_a_script_without_a_main_guard_at_construction(tmp_path, guarded):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT + ('if __name__ == "__main__":\n    main()\n' if guarded
                                else "main()\n"))
    out = subprocess.run([sys.executable, str(script)], env=child_env(OMP_NUM_THREADS="1"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if guarded:
        assert out.returncode == 0, out.stderr
        assert "steps [0, 1, 2]" in out.stdout
    else:
        assert out.returncode != 0
        assert "training starts" not in out.stdout   # refused before training started
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("RuntimeError: the monitor's worker process could not start")
        assert "if __name__ ==" in last and str(script) in last


def _slow_mean_norm(features):
    import time

    time.sleep(0.4)   # still running on the worker thread when the training loop drops the monitor
    return float(torch.as_tensor(features).double().norm(dim=1).mean())


def test_a_thread_monitor_collected_on_its_own_worker_thread_still_writes_its_file(
        tmp_path, capfd):
    """The loop drops its monitor while an evaluation runs: the last reference is the worker
    thread's finished job, so the monitor is collected on that thread. Its close cannot join
    its own thread; it must still write ``netcdf=`` and report no error."""
    import time
    import weakref

    from traindyn.dynamics import storage
    from traindyn.probes.registry import Probe, Variable

    slow = Probe("slow_mean_norm", "features", {"slow_mean_norm": Variable("mean feature norm")},
                 source="test", fn=_slow_mean_norm)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    x = torch.randn(16, 4)
    monitor = Monitor(model, probes=[slow], layers=["1"], schedule=linear(1), probe_data=x,
                      background="thread", netcdf=tmp_path / "left.nc")
    monitor.step(0, train_loss=1.0)
    alive = weakref.ref(monitor)
    del monitor
    deadline = time.monotonic() + 30
    while alive() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive() is None
    assert "failed" not in capfd.readouterr().err
    ds = storage.load(tmp_path / "left.nc")
    expected = model[1](model[0](x)).double().norm(dim=1).mean()
    np.testing.assert_allclose(ds["slow_mean_norm"].values, [[float(expected)]], rtol=1e-12)
