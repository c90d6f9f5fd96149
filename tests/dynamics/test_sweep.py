"""Tests of ``dynamics.sweep`` on a real 2-worker dask LocalCluster (worker processes)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from traindyn.dynamics import records
from traindyn.dynamics.sweep import sweep

distributed = pytest.importorskip("dask.distributed")


def gd_recipe(lr: float, width: int, seed: int, steps: int = 20) -> xr.Dataset:
    """Gradient descent on a random least-squares problem; loss recorded at every step."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, width))
    y = rng.normal(size=30)
    w = np.zeros(width)
    losses = []
    for _ in range(steps + 1):
        r = x @ w - y
        losses.append(0.5 * np.mean(r**2))
        w -= lr * x.T @ r / len(y)
    return xr.Dataset({"train_loss": ("step", np.array(losses), records.variable_attrs(
        "train_loss"))}, coords={**records.step_coords(np.arange(steps + 1), lr), "seed": seed},
        attrs={"source": "test least squares"})


def sleepy_recipe(lr: float, seed: int, marker_dir: str) -> xr.Dataset:
    """Leaves a marker ``<lr>_<seed>_<pid>`` when it starts, then works for half a second."""
    Path(marker_dir, f"{lr}_{seed}_{os.getpid()}").touch()
    time.sleep(0.5)
    return gd_recipe(lr, 3, seed, steps=3)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


GRID = {"lr": [0.01, 0.1], "width": [2, 5]}


def test_sweep_on_the_cluster_equals_the_serial_run(client):
    assert len(client.scheduler_info()["workers"]) == 2
    parallel = sweep(gd_recipe, GRID, seeds=[0, 1, 2], client=client)
    serial = sweep(gd_recipe, GRID, seeds=[0, 1, 2], client="serial")
    xr.testing.assert_identical(parallel, serial)
    assert parallel["train_loss"].dims == ("lr", "width", "seed", "step")
    # each cell is the run with those arguments
    direct = gd_recipe(0.1, 5, 2)
    np.testing.assert_array_equal(parallel["train_loss"].sel(lr=0.1, width=5, seed=2),
                                  direct["train_loss"])
    # time = lr × step differs between learning rates, so it gains the lr dimension
    np.testing.assert_allclose(parallel["time"].sel(lr=0.1), 0.1 * parallel["step"])
    assert parallel["time"].dims == ("lr", "step")
    # ... and stays a plain (step,) coordinate when it is the same for every run
    widths = sweep(gd_recipe, {"width": [2, 3]}, seeds=[0], client=client, fixed={"lr": 0.1})
    assert widths["time"].dims == ("step",)
    records.validate(widths)


def test_sweep_arguments_are_checked():
    with pytest.raises(ValueError, match="seeds="):
        sweep(gd_recipe, {"seed": [1]}, client="serial")
    with pytest.raises(ValueError, match="empty"):
        sweep(gd_recipe, {"lr": []}, client="serial")
    with pytest.raises(ValueError, match="fixed and swept"):
        sweep(gd_recipe, {"lr": [0.1]}, fixed={"lr": 0.2, "width": 2}, client="serial")
    with pytest.raises(TypeError, match="Dataset"):
        sweep(lambda lr, seed: 1.0, {"lr": [0.1]}, client="serial")


def test_a_worker_killed_mid_sweep_has_its_tasks_rerun(tmp_path, client):
    """Kept last in this file: it kills one of the shared cluster's workers (the nanny
    restarts it)."""
    pids = set(client.run(os.getpid).values())
    grid = {"lr": [0.01, 0.02, 0.03, 0.04]}

    def kill_first_busy_worker() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            busy = {int(p.name.split("_")[-1]) for p in tmp_path.iterdir()} & pids
            if busy:
                os.kill(sorted(busy)[0], signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_busy_worker)
    killer.start()
    result = sweep(sleepy_recipe, grid, seeds=[0, 1], client=client,
                   fixed={"marker_dir": str(tmp_path)})
    killer.join()
    expected = sweep(gd_recipe, grid, seeds=[0, 1], client="serial",
                     fixed={"width": 3, "steps": 3})
    np.testing.assert_array_equal(result["train_loss"].values, expected["train_loss"].values)
    starts = [p.name.rsplit("_", 1)[0] for p in tmp_path.iterdir()]
    # 8 tasks; the one running on the killed worker started again on another worker
    assert len(set(starts)) == 8
    assert len(starts) > 8
