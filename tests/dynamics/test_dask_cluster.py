"""``dynamics._dask.local_client``: a real 2-worker LocalCluster whose workers run without dask's
``MALLOC_TRIM_THRESHOLD_`` (glibc's dynamic mmap threshold stays on), and whose results equal
the serial run's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr
from traindyn.dynamics._dask import MALLOC_VARIABLE, local_client
from traindyn.dynamics.analyze import TIMING_VARIABLES, analyze
from traindyn.dynamics.probe_inputs import digits_inputs

distributed = pytest.importorskip("distributed")

FACTORY = """
from torch import nn


def make_mlp(width=32):
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
"""

FAULTS = """
import resource
import numpy as np


def faults_per_allocation(n=40, size=2 ** 18):
    # 2 MiB arrays, allocated, touched and freed n times; the first one sets glibc's dynamic
    # mmap threshold above 2 MiB (free of an mmapped chunk raises it), so the others reuse the
    # heap.  With M_TRIM_THRESHOLD fixed (MALLOC_TRIM_THRESHOLD_ set) each is a fresh mmap whose
    # 512 pages fault in again.
    np.ones(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.ones(size)
        del a
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n
"""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask_helpers")
    (folder / "mlp_factory.py").write_text(FACTORY)
    (folder / "malloc_faults.py").write_text(FAULTS)
    return folder


@pytest.fixture(scope="module")
def leaked_variable():
    """A variable left in this process by an earlier default LocalCluster must not reach the
    workers either (the nanny copies ``os.environ`` into them)."""
    saved = os.environ.get(MALLOC_VARIABLE)
    os.environ[MALLOC_VARIABLE] = "65536"
    yield "65536"
    if saved is None:
        os.environ.pop(MALLOC_VARIABLE, None)
    else:
        os.environ[MALLOC_VARIABLE] = saved


@pytest.fixture(scope="module")
def client(leaked_variable, helpers):
    before = dict(os.environ)
    with local_client(2) as made:
        assert dict(os.environ) == before, "this process's environment must be left as it was"
        made.run(lambda folder=str(helpers): sys.path.insert(0, folder))
        yield made


def test_dask_exports_the_variable_by_default():
    """The premise: without the helper, the nanny would export MALLOC_TRIM_THRESHOLD_."""
    import dask

    assert dask.config.get("distributed.nanny.pre-spawn-environ")[MALLOC_VARIABLE] is not None


def test_workers_environment_has_no_malloc_trim_threshold(client, leaked_variable):
    envs = client.run(lambda: os.environ.get(MALLOC_VARIABLE))
    assert len(envs) == 2
    assert list(envs.values()) == [None, None]
    assert os.environ[MALLOC_VARIABLE] == leaked_variable  # restored here


def test_workers_keep_the_dynamic_mmap_threshold(client, helpers):
    """Page faults per 2 MiB allocation: ~0 on a helper worker, ~512 (one per 4 KiB page) in a
    process started with MALLOC_TRIM_THRESHOLD_ set, as dask's nanny would."""

    def on_worker() -> float:
        from malloc_faults import faults_per_allocation

        return faults_per_allocation()

    workers = list(client.run(on_worker).values())
    env = {k: v for k, v in os.environ.items() if k != MALLOC_VARIABLE}
    code = "from malloc_faults import faults_per_allocation as f; print(f())"
    fixed = float(subprocess.run(
        [sys.executable, "-c", code], cwd=helpers, check=True, capture_output=True, text=True,
        env={**env, MALLOC_VARIABLE: "65536"}).stdout)
    assert fixed > 400, f"control: {fixed:.0f} faults per allocation with the variable set"
    assert max(workers) < 0.1 * fixed, (workers, fixed)


def test_analysis_on_the_helper_cluster_equals_serial(client, helpers, tmp_path):
    make = f"{helpers / 'mlp_factory.py'}:make_mlp"
    sys.path.insert(0, str(helpers))
    try:
        from mlp_factory import make_mlp
    finally:
        sys.path.remove(str(helpers))
    for step in (1, 10, 100):
        torch.manual_seed(step)
        torch.save(make_mlp().state_dict(), tmp_path / f"step{step}.pt")
    kw = dict(model=make, layers=["1", "3"], probe_data="digits", batch_size=600,
              probes=["rankme", "rankme_covariance", "alpha_req"], progress=False)
    serial = analyze(tmp_path, **kw)
    remote = analyze(tmp_path, scheduler=client.scheduler.address, **kw)
    timing = list(TIMING_VARIABLES)
    xr.testing.assert_identical(serial.drop_vars(timing), remote.drop_vars(timing))
    assert (remote["status"].values == "ok").all()
    # and the serial values are right: RankMe of the last checkpoint's first ReLU layer from a
    # float64 SVD of the features (Garrido et al. 2023, Eq. 1)
    torch.manual_seed(100)
    model = make_mlp().double()
    with torch.no_grad():
        z = model[:2](digits_inputs().double()).numpy()
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    reference = float(np.exp(-(p * np.log(p)).sum()))
    assert abs(remote["rankme"].values[-1, 0] - reference) < 1e-5 * reference
