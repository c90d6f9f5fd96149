"""Tests of the training monitor: undisturbed training, recorded values, streaming, crashes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import traindyn.dynamics.monitor as monitor_module
import xarray as xr
import zarr
from torch import nn
from traindyn.dynamics import records, storage
from traindyn.dynamics.monitor import COMPLETE_ATTR, Monitor, load_stream
from traindyn.dynamics.schedules import at_steps, linear
from traindyn.probes.registry import Probe, Variable

from tests._tiny_models import mlp
from tests.helpers import ROOT, child_env


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: one thread is fastest, and immune to an oversubscribed machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe, Garrido et al. (2023) Eq. 1, from numpy's float64 SVD."""
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def feature_probe(name: str, fn, long_name: str, units: str, source: str) -> Probe:
    """A one-variable ``features`` probe."""
    return Probe(name, "features", {name: Variable(long_name, units)}, source, fn=fn)


def make_net() -> nn.Module:
    """Linear → BatchNorm → ReLU → Dropout(0.3) → Linear → ReLU → Linear: train mode differs."""
    return mlp(6, 16, 16, 3, batchnorm=True, dropout=0.3)


def disturbing_probe_factory():
    """A model probe that does everything a careless probe could: train mode (BatchNorm
    statistics move), random draws from torch/numpy/Python, and a backward pass."""

    def probe(model, inputs, targets):
        model.train()
        noise = torch.randn_like(inputs) + float(np.random.rand())  # noqa: NPY002 - the global RNG + random.random()
        loss = nn.functional.cross_entropy(model(inputs + noise), targets)
        loss.backward()
        return {"probe_loss": loss.item()}

    return probe


DISTURBING = Probe("disturbing", "model", {"probe_loss": Variable("loss seen by the probe", "nat")},
                   "test", factory=disturbing_probe_factory)


def train(with_monitor: bool, steps: int = 12) -> tuple[dict, Monitor | None]:
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - the monitor must leave the global RNG alone
    random.seed(0)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_probe, y_probe = torch.randn(40, 6), torch.randint(0, 3, (40,))
    monitor = Monitor(model, probes=["rankme", DISTURBING], layers=["2", "5"],
                      schedule=linear(3), probe_data=x_probe, probe_labels=y_probe,
                      learning_rate=0.1) if with_monitor else None
    for step in range(steps):
        x = torch.randn(32, 6) + float(np.random.rand()) + random.random()  # noqa: NPY002
        y = torch.randint(0, 3, (32,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if monitor is not None:  # between backward and the update: the worst place
            monitor.step(step, train_loss=loss.item())
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, monitor


def test_training_with_the_monitor_is_bit_identical():
    plain, _ = train(False)
    monitored, monitor = train(True)
    assert set(plain) == set(monitored)
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name
    ds = monitor.to_dataset()
    assert list(ds["step"].values) == list(range(0, 12, 3))
    assert np.isfinite(ds["probe_loss"].values).all()


def test_the_bit_identity_test_would_catch_a_disturbance(monkeypatch):
    """Control: without state preservation the disturbing probe does change the run."""

    class Nothing(contextlib.nullcontext):
        def __init__(self, model):
            super().__init__()

    monkeypatch.setattr(monitor_module, "preserved_state", Nothing)
    plain, _ = train(False)
    monitored, _ = train(True)
    assert not all(torch.equal(plain[k], monitored[k]) for k in plain)


def test_recorded_probes_equal_a_brute_force_reference():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh())
    x = torch.randn(30, 5)
    monitor = Monitor(model, probes=["rankme"], layers=["1", "3"], schedule=at_steps([0, 2]),
                      probe_data=[x[:10], x[10:]], learning_rate=0.5, seed=7)
    expected = []
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        if monitor.step(step, train_loss=float(step) / 4):
            with torch.no_grad():
                h1 = torch.tanh(x @ model[0].weight.T + model[0].bias)
                h2 = torch.tanh(h1 @ model[2].weight.T + model[2].bias)
            expected.append([brute_rankme(h1.numpy()), brute_rankme(h2.numpy())])
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    ds = records.validate(monitor.to_dataset())
    np.testing.assert_allclose(ds["rankme"].values, expected, rtol=1e-5)
    np.testing.assert_allclose(ds["time"].values, [0.0, 1.0])
    np.testing.assert_allclose(ds["train_loss"].values, [0.0, 0.5])
    assert int(ds["seed"]) == 7 and list(ds["layer"].values) == ["1", "3"]
    # measure() gives the same numbers now, without recording
    before = len(monitor.to_dataset()["step"])
    with torch.no_grad():
        h1 = torch.tanh(x @ model[0].weight.T + model[0].bias)
    assert abs(monitor.measure()[0, 0] - brute_rankme(h1.numpy())) < 1e-4 * brute_rankme(h1)
    assert len(monitor.to_dataset()["step"]) == before


def test_zarr_stream_and_netcdf_hold_what_was_measured(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    with Monitor(model, probes=["rankme", "neural_collapse", "log_partition"], layers=["1"],
                 schedule=linear(2), probe_data=x, probe_labels=y, learning_rate=0.01,
                 store=tmp_path / "run.zarr", netcdf=tmp_path / "run.nc") as monitor:
        for step in range(7):
            monitor.step(step, train_loss=step * 0.1)
            with torch.no_grad():
                model[2].bias += 0.5   # mean log Z moves by exactly 0.5 per step
    memory = monitor.to_dataset()
    streamed = load_stream(tmp_path / "run.zarr")
    on_disk = storage.load(tmp_path / "run.nc")
    for ds in (streamed, on_disk):
        assert list(ds["step"].values) == [0, 2, 4, 6]
        for name in ("rankme", "nc1", "cdnv", "mean_log_z", "train_loss"):
            np.testing.assert_array_equal(ds[name].values, memory[name].values)
    np.testing.assert_allclose(memory["log_z_drift"].values, [0.0, 1.0, 2.0, 3.0], atol=1e-5)
    assert memory["nc1"].attrs["units"] == "1" and "Papyan" in memory["nc1"].attrs["source"]
    assert zarr.open_group(str(tmp_path / "run.zarr")).attrs[COMPLETE_ATTR] == 4


def test_attention_logits_are_recorded_over_their_modules_beside_layer_probes(tmp_path):
    from traindyn.dynamics.recipes.tiny_lm import TinyLM, TinyLMConfig
    from traindyn.probes.instability import attention_logit_stats

    model = TinyLM(TinyLMConfig(context=8, d_model=16, n_layers=2, n_heads=2))
    tokens = torch.randint(0, 256, (6, 8))
    monitor = Monitor(model, probes=["rankme", "attention_logits"], layers=["blocks.1"],
                      reduce="mean", schedule=at_steps([0, 1]), probe_data=tokens,
                      store=tmp_path / "lm.zarr")
    monitor.step(0)
    monitor.step(1)
    ds = monitor.to_dataset()
    assert list(ds["layer"].values) == ["blocks.1"]
    assert ds["max_attention_logit"].dims == ("step", "attention_module")
    assert list(ds["attention_module"].values) == ["blocks.0.attn", "blocks.1.attn"]
    direct = attention_logit_stats(model.eval(), tokens)["max_attention_logit"]
    np.testing.assert_allclose(ds["max_attention_logit"].sel(step=1), direct)
    stream = load_stream(tmp_path / "lm.zarr")
    np.testing.assert_array_equal(stream["max_attention_logit"].values,
                                  ds["max_attention_logit"].values)


def test_a_half_written_evaluation_is_dropped_on_load(tmp_path):
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    monitor = Monitor(model, probes=["rankme"], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(20, 3), store=tmp_path / "s.zarr")
    for step in range(3):
        monitor.step(step, train_loss=1.0)
    # a crash mid-append: one array already grew, the others and the commit did not
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+", use_consolidated=False)
    group["rankme"].resize((4, 1))
    with xr.open_zarr(tmp_path / "s.zarr") as plain:   # plain xarray reads the commit
        assert list(plain["step"].values) == [0, 1, 2] and plain["rankme"].shape == (3, 1)
    ds = load_stream(tmp_path / "s.zarr")
    assert list(ds["step"].values) == [0, 1, 2] and ds["rankme"].shape == (3, 1)
    xr.testing.assert_identical(storage.load(tmp_path / "s.zarr"), ds)


CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    background = {"sync": False, "thread": True, "process": "process"}[sys.argv[2]]
    monitor = Monitor(model, probes=["rankme", "alpha_req"], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(200, 8), store=sys.argv[1], background=background)
    for step in range(100000):
        x = torch.randn(64, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        monitor.step(step, train_loss=float(step))
        if not background:
            print(step, flush=True)
        elif step % 3 == 2:   # in the background an evaluation is complete once flushed
            monitor.flush()
            print(step, flush=True)
""")


def _children(pid: int) -> list[int]:
    """Worker processes (``multiprocessing`` spawn children) of process ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if ppid == pid and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    """Wait until process ``pid`` has exited (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running after {timeout} s")


@pytest.mark.parametrize("background", ["sync", "thread", "process"])
def test_a_killed_run_keeps_every_completed_evaluation(tmp_path, background):
    if background == "process" and not os.path.isdir("/proc"):
        pytest.skip("finding the worker process uses /proc")
    store = tmp_path / "killed.zarr"
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(store), background],
                            stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    completed = -1
    deadline = time.monotonic() + 180   # generous: a loaded 2-core machine is slow to start
    try:
        while completed < 6 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            completed = int(line)
        time.sleep(0.05)   # let it get into the next evaluations before the kill
    finally:
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert completed >= 6, "the child did not get far enough"
    assert len(workers) == (background == "process")
    for pid in workers:   # a worker process finishes what it received, then exits
        _wait_gone(pid)
    with xr.open_zarr(store) as plain:   # plain xarray opens it: every evaluation committed
        ds = plain.load()
    xr.testing.assert_identical(load_stream(store), ds)
    steps = ds["step"].values
    assert len(steps) >= completed + 1                     # every reported evaluation is there
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    np.testing.assert_array_equal(ds["train_loss"].values, steps.astype(float))
    assert np.isfinite(ds["rankme"].values).all()


def test_bad_arguments_get_clear_errors():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    with pytest.raises(ValueError, match="probe_data"):
        Monitor(model, probes=["rankme"], layers=["1"])
    with pytest.raises(ValueError, match="probe_labels"):
        Monitor(model, probes=["neural_collapse"], layers=["1"], probe_data=torch.ones(2, 3))
    with pytest.raises(KeyError, match="available"):
        Monitor(model, probes=["no_such_probe"], layers=["1"], probe_data=torch.ones(2, 3))
    with pytest.raises(KeyError, match="available"):
        Monitor(model, probes=["rankme"], layers=["9"], probe_data=torch.ones(2, 3))


def test_the_stream_never_replaces_something_that_is_not_a_zarr_store(tmp_path):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    for options in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match="not a Zarr store"):
            Monitor(model, probes=["rankme"], layers=["1"], schedule=linear(1),
                    probe_data=torch.randn(6, 3), store=precious, **options)
    assert (precious / "thesis.tex").read_text() == "keep me"


def test_an_empty_monitor_still_gives_a_valid_dataset():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    monitor = Monitor(model, probes=["rankme"], layers=["1"], schedule=at_steps([5]),
                      probe_data=torch.ones(4, 3))
    assert not monitor.step(0)
    ds = records.validate(monitor.to_dataset())
    assert ds["rankme"].shape == (0, 1)
    assert isinstance(ds, xr.Dataset)


def _fit_lightning(callbacks: list) -> dict:
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    lightning.seed_everything(0, verbose=False)
    module = Module()
    data = torch.utils.data.TensorDataset(torch.randn(96, 6), torch.randint(0, 3, (96,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    trainer = lightning.Trainer(max_steps=9, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)
    return {k: v.clone() for k, v in module.state_dict().items()}, module


@pytest.mark.parametrize("background", [False, "process"])
def test_lightning_callback_records_without_disturbing_the_run(tmp_path, background):
    pytest.importorskip("lightning")
    from traindyn.dynamics.lightning import MonitorCallback

    plain, _ = _fit_lightning([])
    x_probe, y_probe = torch.randn(40, 6), torch.randint(0, 3, (40,))
    callback = MonitorCallback(probes=["rankme", DISTURBING], layers=["net.2"],
                               schedule=linear(3), probe_data=x_probe, probe_labels=y_probe,
                               store=tmp_path / "pl.zarr", background=background)
    monitored, module = _fit_lightning([callback])
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name
    ds = callback.to_dataset()
    assert list(ds["step"].values) == [0, 3, 6, 9]
    np.testing.assert_allclose(ds["time"].values, 0.1 * ds["step"].values)
    with torch.no_grad():
        h = module.net[:3].eval()(x_probe)
    assert abs(ds["rankme"].sel(step=9, layer="net.2").item() - brute_rankme(h.numpy())) < 1e-4
    stream = load_stream(tmp_path / "pl.zarr")
    assert list(stream["step"].values) == [0, 3, 6, 9]
    np.testing.assert_array_equal(stream["train_loss"].values, ds["train_loss"].values)
    assert np.isnan(ds["train_loss"].values[0]) and np.isfinite(ds["train_loss"].values[1:]).all()


# -- background evaluation -----------------------------------------------------------------
def train_bn(monitor_kwargs: dict | None, steps: int = 14) -> tuple[dict, Monitor | None]:
    """The BatchNorm/Dropout net trained with RNG draws from torch, numpy and Python; the
    monitor (if any) runs spectral, collapse and a disturbing model probe."""
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_probe, y_probe = torch.randn(60, 6), torch.arange(60) % 3
    monitor = None
    if monitor_kwargs is not None:
        monitor = Monitor(model, probes=["rankme", "alpha_req", "neural_collapse", DISTURBING],
                          layers=["2", "5"], schedule=linear(2), probe_data=x_probe,
                          probe_labels=y_probe, learning_rate=0.1, seed=3, **monitor_kwargs)
    for step in range(steps):
        x = torch.randn(32, 6) + float(np.random.rand()) + random.random()  # noqa: NPY002
        y = torch.randint(0, 3, (32,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if monitor is not None:
            monitor.step(step, train_loss=loss.item())
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, monitor


def _without_timing(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if not k.startswith("monitor_seconds")}
    return ds


@pytest.mark.filterwarnings("ignore:alpha-ReQ")
def test_background_modes_record_the_same_dataset_and_store_without_disturbing(tmp_path):
    plain, _ = train_bn(None)
    sync_w, sync = train_bn(dict(store=tmp_path / "sync.zarr"))
    back_w, back = train_bn(dict(store=tmp_path / "back.zarr", background=True))
    proc_w, proc = train_bn(dict(store=tmp_path / "proc.zarr", background="process"))
    for name in plain:  # training is bit-identical in every mode
        assert torch.equal(plain[name], sync_w[name]), name
        assert torch.equal(plain[name], back_w[name]), name
        assert torch.equal(plain[name], proc_w[name]), name
    with back:
        ds_back = back.to_dataset()  # waits for the worker
    with proc:
        ds_proc = proc.to_dataset()
    ds_sync = sync.to_dataset()
    assert list(ds_back["step"].values) == list(range(0, 14, 2))
    assert {"rankme", "alpha_req", "nc1", "probe_loss"} <= set(ds_back.data_vars)
    xr.testing.assert_identical(_without_timing(ds_back), _without_timing(ds_sync))
    xr.testing.assert_identical(_without_timing(ds_proc), _without_timing(ds_sync))
    reference = load_stream(tmp_path / "sync.zarr")
    xr.testing.assert_identical(load_stream(tmp_path / "back.zarr"), reference)
    xr.testing.assert_identical(load_stream(tmp_path / "proc.zarr"), reference)
    assert back.seconds_background > 0 and back._executor is None  # closed
    assert proc.seconds_background > 0 and proc.seconds_storing > 0
    assert proc._worker is None  # closed, and the process is gone:
    assert not any(p.name == "traindyn-monitor" for p in multiprocessing.active_children())


def test_background_worker_runs_on_one_thread_and_leaves_the_training_threads_alone():
    """Regression: the worker's single-thread setting must not change the training thread's
    intra-op thread count (torch's count is per thread; the old LAPACK guard was believed to
    be process-wide, which made background mode oversubscribe or slow training)."""
    seen = []

    def threads_seen(features):
        seen.append(torch.get_num_threads())
        return float(features.shape[1])

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        monitor = Monitor(model, probes=[feature_probe("width", threads_seen, "width", "1", "-")],
                          layers=["1"], schedule=linear(1), probe_data=torch.randn(10, 4),
                          background=True)
        with monitor:
            for step in range(3):
                monitor.step(step)
                assert torch.get_num_threads() == 2
            ds = monitor.to_dataset()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    assert seen == [1, 1, 1]
    np.testing.assert_array_equal(ds["width"].values, np.full((3, 1), 6.0))


def test_the_shared_spectral_accumulator_equals_the_one_shot_functions():
    from traindyn.probes.spectral import alpha_req, rankme, rankme_covariance

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(20, 150), nn.Tanh())
    x = torch.randn(300, 20) @ torch.diag(torch.logspace(0, -2, 20))
    monitor = Monitor(model, probes=["rankme", "alpha_req", "rankme_covariance"], layers=["1"],
                      probe_data=x)
    values = monitor._probe_features({"1": model(x).detach()})
    h = np.tanh(x.double().numpy() @ model[0].weight.detach().double().numpy().T
                + model[0].bias.detach().double().numpy())
    assert abs(values["rankme"][0] - brute_rankme(h)) < 1e-5 * brute_rankme(h)
    z = model(x).detach()
    for name, fn in [("rankme", rankme), ("alpha_req", alpha_req),
                     ("rankme_covariance", rankme_covariance)]:
        assert abs(values[name][0] - fn(z)) <= 1e-12 * abs(fn(z)), name


def test_an_error_in_the_worker_is_raised_on_the_training_thread():
    from concurrent.futures import wait

    calls = []

    def fragile(features):
        calls.append(1)
        if len(calls) >= 2:
            raise FloatingPointError("probe failed")
        return 1.0

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    monitor = Monitor(model, probes=[feature_probe("fragile", fragile, "f", "1", "test")],
                      layers=["1"], schedule=linear(1), probe_data=torch.randn(8, 3),
                      background=True)
    assert monitor.step(0)
    monitor.flush()                       # the first evaluation succeeds
    assert monitor.step(1)                # its failure happens on the worker …
    wait(monitor._pending)
    with pytest.raises(RuntimeError, match="background evaluation") as info:
        monitor.step(2)                   # … and surfaces at the next step
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert monitor.step(3)                # the step after that fails again, at flush
    with pytest.raises(RuntimeError) as info:
        monitor.close()
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert list(monitor.to_dataset()["step"].values) == [0]


@pytest.mark.filterwarnings("ignore:alpha-ReQ")
def test_the_direct_zarr_append_writes_what_xarray_append_writes(tmp_path):
    """After the first evaluation the monitor appends to the open Zarr arrays itself; the store
    must read back identical to one written by ``storage.append_zarr`` (xarray's to_zarr)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU())
    monitor = Monitor(model, probes=["rankme", "neural_collapse"], layers=["1", "3"],
                      schedule=linear(1), probe_data=torch.randn(48, 6),
                      probe_labels=torch.arange(48) % 4, learning_rate=0.1, seed=2,
                      store=tmp_path / "direct.zarr")
    for step in range(4):
        monitor.step(step, train_loss=0.25 * step)
        with torch.no_grad():
            model[0].weight.mul_(1.1)
    assert monitor._stream.group is not None and monitor._stream.step_arrays  # direct path
    for ds in monitor._evaluations:
        storage.append_zarr(ds, tmp_path / "xarray.zarr")
    direct, reference = storage.load(tmp_path / "direct.zarr"), storage.load(
        tmp_path / "xarray.zarr")
    assert direct.attrs.pop(COMPLETE_ATTR) == 4
    xr.testing.assert_identical(direct, reference)
    assert len(np.unique(direct["rankme"].values)) == 8   # four different evaluations


# -- the worker process ----------------------------------------------------------------------
def slow_width(features):
    """A module-level (picklable) feature probe that takes its time: the layer's width."""
    time.sleep(0.15)
    return float(features.shape[1])


def fails_when_large(features):
    """A module-level feature probe that fails on large features."""
    if float(features.abs().max()) > 100:
        raise FloatingPointError("probe failed: features too large")
    return float(features.abs().max())


SLOW = feature_probe("width", slow_width, "layer width", "1", "test")
FRAGILE = feature_probe("max_abs", fails_when_large, "largest feature", "1", "test")


def test_an_error_in_the_worker_process_is_raised_on_the_training_side():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].bias.fill_(0.0)
    x = torch.ones(8, 3)
    monitor = Monitor(model, probes=[FRAGILE], layers=["1"], schedule=linear(1), probe_data=x,
                      background="process")
    monitor.learning_rate = 0.5   # set after the worker started (as the Lightning callback does)
    assert monitor.step(0, train_loss=1.0)
    monitor.flush()                       # the first evaluation succeeds
    with torch.no_grad():
        model[0].weight.fill_(100.0)      # features 300: the probe fails in the worker …
    assert monitor.step(1, train_loss=2.0)
    with pytest.raises(RuntimeError, match=r"background evaluation.*step 1") as info:
        monitor.flush()                   # … and surfaces on the training side
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert "features too large" in str(info.value)  # with the worker's traceback
    with torch.no_grad():
        model[0].weight.fill_(1.0)        # the worker is still alive and evaluates again
    assert monitor.step(2, train_loss=3.0)
    monitor.close()
    ds = monitor.to_dataset()
    assert list(ds["step"].values) == [0, 2]
    np.testing.assert_array_equal(ds["max_abs"].values, [[1.5], [3.0]])  # 3 × 0.5, 3 × 1
    np.testing.assert_array_equal(ds["train_loss"].values, [1.0, 3.0])
    np.testing.assert_array_equal(ds["time"].values, [0.0, 1.0])
    assert '"learning_rate": 0.5' in ds.attrs["parameters"]


def test_an_unpicklable_probe_is_refused_for_process_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    local = feature_probe("local_width", lambda f: float(f.shape[1]), "width", "1", "test")
    with pytest.raises(ValueError, match=r"'local_width'.*module level.*background='thread'"):
        Monitor(model, probes=["rankme", local], layers=["1"], probe_data=torch.randn(5, 3),
                background="process")
    with pytest.raises(ValueError, match="background="):
        Monitor(model, probes=["rankme"], layers=["1"], probe_data=torch.randn(5, 3),
                background="processes")
    # the thread mode takes it
    monitor = Monitor(model, probes=[local], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(5, 3), background="thread")
    with monitor:
        monitor.step(0)
    assert monitor.to_dataset()["local_width"].values.tolist() == [[4.0]]


def test_a_dead_worker_process_gives_a_clear_error_not_a_hang():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    monitor = Monitor(model, probes=[SLOW], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(6, 3), background="process")
    monitor.step(0)
    monitor.flush()
    monitor._worker.process.kill()
    monitor._worker.process.join()
    start = time.monotonic()
    monitor.step(1)               # handed over without waiting …
    with pytest.raises(RuntimeError, match=r"worker process died.*steps \[1\] were lost"):
        monitor.step(2)           # … and the next step finds the worker gone
    monitor.step(3)
    with pytest.raises(RuntimeError, match=r"worker process died.*steps \[3\] were lost"):
        monitor.flush()           # waiting for a dead worker does not hang either
    assert time.monotonic() - start < 10
    monitor.close()
    assert list(monitor.to_dataset()["step"].values) == [0]


KILLED_WHILE_PENDING = textwrap.dedent("""
    import os, signal, sys, time, torch
    from torch import nn
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear
    from tests.dynamics.test_monitor import SLOW
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    monitor = Monitor(model, probes=[SLOW], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(6, 3), store=sys.argv[1], background="process")
    for step in range(5):
        monitor.step(step, train_loss=float(step))
    time.sleep(0.3)   # the tasks are in the pipe; the worker is still on the first ones
    print(monitor._worker.process.pid, len(monitor._evaluations), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="waiting for the worker uses /proc")
def test_a_killed_training_process_leaves_the_worker_to_finish_what_it_received(tmp_path):
    store = tmp_path / "pending.zarr"
    env = child_env(OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", KILLED_WHILE_PENDING, str(store)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    pid, collected = map(int, out.stdout.split())
    assert collected < 5      # killed before the worker had finished every evaluation
    _wait_gone(pid)
    ds = load_stream(store)
    assert list(ds["step"].values) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ds["width"].values, np.full((5, 1), 4.0))
    np.testing.assert_array_equal(ds["train_loss"].values, np.arange(5.0))
    assert zarr.open_group(str(store)).attrs[COMPLETE_ATTR] == 5


@pytest.mark.parametrize("background", ["thread", "process"])
def test_a_worker_that_falls_behind_holds_at_most_max_pending_evaluations(background):
    """A slow probe (0.15 s) at every step: ``step()`` waits once ``max_pending`` evaluations
    are queued, so at most that many features wait in memory; nothing is lost or reordered."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    monitor = Monitor(model, probes=[SLOW], layers=["1"], schedule=linear(1),
                      probe_data=torch.randn(10, 4), background=background, max_pending=2)
    seen = []
    with monitor:
        for step in range(6):
            monitor.step(step, train_loss=float(step))
            queued = (len(monitor._worker.pending) if background == "process"
                      else len(monitor._pending))
            seen.append(queued)
        ds = monitor.to_dataset()
    assert max(seen) <= 2 and seen[-1] >= 1     # bounded, and the worker did fall behind
    np.testing.assert_array_equal(ds["step"].values, np.arange(6))
    np.testing.assert_array_equal(ds["train_loss"].values, np.arange(6.0))
    np.testing.assert_array_equal(ds["width"].values, np.full((6, 1), 6.0))
    with pytest.raises(ValueError, match="max_pending"):
        Monitor(model, probes=[SLOW], layers=["1"], probe_data=torch.randn(10, 4),
                max_pending=0)


def test_thread_mode_parameter_probes_see_the_weights_of_their_step(monkeypatch):
    """Thread mode computes the parameter probes in the worker, from a snapshot of the weights
    taken at step(): training that changes the weights before the worker runs (held back here
    by 0.3 s) does not change what is recorded.  Reference: the spectral norm by numpy SVD."""
    from traindyn.dynamics._evaluator import Evaluator

    original = Evaluator.parameter_measurement

    def slow(self, weights, *args):
        time.sleep(0.3)
        return original(self, weights, *args)

    monkeypatch.setattr(Evaluator, "parameter_measurement", slow)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    want = np.linalg.svd(model[0].weight.detach().numpy().astype(float), compute_uv=False)[0]
    mon = Monitor(model, probe_data=torch.randn(64, 8), layers=["0", "2"],
                  probes=["rankme", "weight_spectra"], schedule=lambda s: True,
                  background="thread")
    with mon:
        mon.step(0)
        with torch.no_grad():
            model[0].weight.mul_(3.0)  # "training" moves on before the worker reads
    got = float(mon.to_dataset()["weight_spectral_norm"].sel(step=0, layer="0"))
    assert got == pytest.approx(want, rel=1e-6)


def _weight_norm_state(weight):
    return {}, {"norm": np.array(float(weight.double().norm()))}


def _norm_change_rate(state, reference, times):
    """(‖W‖ − ‖W‖ at the first evaluation) / (time − its time): needs both times."""
    dt = times["current"] - times["first"] if times["current"] is not None else np.nan
    change = float(state["norm"] - reference["first"]["norm"])
    return {"norm_rate": change / dt if dt else 0.0}


def test_parameter_reference_probes_get_the_same_times_in_every_mode():
    """A parameter probe comparing with the first evaluation at time = learning rate × step:
    thread mode (parameter probes in the worker) records what synchronous mode records, and
    both equal the rate worked by hand from the weights at those steps."""
    from traindyn.probes.registry import Probe, Variable

    probe = Probe("norm_rate", "parameters", {"norm_rate": Variable("weight-norm rate")},
                  "test", fn=_weight_norm_state, reference=("first",),
                  compare=_norm_change_rate)
    results, norms = {}, {}
    for mode in (False, "thread"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6))
        mon = Monitor(model, probe_data=torch.randn(8, 4), layers=["0"], probes=[probe],
                      schedule=at_steps([0, 5]), learning_rate=0.1, background=mode)
        with mon:
            for step in range(6):
                if step in (0, 5):
                    norms[step] = float(model[0].weight.detach().double().norm())
                mon.step(step)
                with torch.no_grad():
                    model[0].weight.mul_(1.1)
        results[mode] = mon.to_dataset()["norm_rate"].sel(layer="0").values
    want = (norms[5] - norms[0]) / (0.1 * 5)
    for mode, values in results.items():
        assert values[0] == 0.0, mode
        assert values[1] == pytest.approx(want, rel=1e-12), mode
