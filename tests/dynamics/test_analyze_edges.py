"""Edges of ``dynamics.analyze``: ``reduce="flatten"`` on text of unequal lengths (clear error up
front; equal lengths work and are right), and the Zarr output replaced atomically (a crash at
any moment leaves the old complete store or the new one; leftovers are tidied next run)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from traindyn.dynamics import analyze as analyze_module
from traindyn.dynamics import storage
from traindyn.dynamics.analyze import analyze
from traindyn.dynamics.probe_inputs import byte_tokenize, load_probe_inputs, stdlib_sentences

from tests.helpers import ROOT, assert_rel

CAUSAL = """
from torch import nn


class Causal(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 4)
        self.mix = nn.Identity()

    def forward(self, tokens):
        return self.mix(self.embed(tokens).cumsum(1))  # position t sees tokens <= t


def make_model():
    return Causal()
"""


@pytest.fixture
def causal(tmp_path) -> tuple[str, Path, dict]:
    file = tmp_path / "causal.py"
    file.write_text(CAUSAL)
    sys.path.insert(0, str(tmp_path))
    try:
        from causal import make_model
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("causal", None)
    torch.manual_seed(0)
    state = make_model().state_dict()
    torch.save(state, tmp_path / "step1.pt")
    return f"{file}:make_model", tmp_path / "step1.pt", state


def _rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, Eq. 1) from a float64 SVD."""
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# ----------------------------------------------------------------------------- flatten


def test_flatten_of_text_batches_of_unequal_length_fails_before_any_checkpoint(
        causal, monkeypatch):
    model, checkpoint, _ = causal
    kw = dict(probe_data="stdlib-text", tokenizer="bytes", n_samples=40, batch_size=16,
              max_length=200)
    widths = {b.inputs.shape[1] for b in load_probe_inputs(**{"source": kw["probe_data"], **{
        k: v for k, v in kw.items() if k != "probe_data"}}).batches}
    assert len(widths) > 1, "the premise: these batches are padded to different lengths"

    def never(*args, **kwargs):
        raise AssertionError("a checkpoint was analysed before the error")

    monkeypatch.setattr(analyze_module, "analyze_checkpoint", never)
    with pytest.raises(ValueError, match=r"reduce='flatten'.*reduce='mean', 'last' or 'cls'"):
        analyze([checkpoint], model=model, layers=["mix"], reduce="flatten", probes=["rankme"],
                progress=False, **kw)


def test_flatten_of_text_of_one_length_equals_a_float64_reference(causal):
    """max_length 8: every sentence reaches it, so every batch is 8 tokens wide."""
    model, checkpoint, state = causal
    ds = analyze([checkpoint], model=model, layers=["mix"], reduce="flatten", probes=["rankme"],
                 probe_data="stdlib-text", tokenizer="bytes", n_samples=60, batch_size=16,
                 max_length=8, progress=False)
    assert ds["status"].values[0] == "ok", ds["reason"].values[0]
    ids, mask = byte_tokenize(stdlib_sentences(60), 8)
    assert ids.shape == (60, 8) and bool(mask.all())
    emb = state["embed.weight"].double().numpy()
    z = emb[ids.numpy()].cumsum(1).reshape(60, -1)  # (sample, tokens·features) = (60, 32)
    assert_rel(ds["rankme"].values[0, 0], _rankme(z), 1e-6, "flattened text RankMe")


# ----------------------------------------------------------------------------- Zarr output


class Crash(BaseException):
    """Stands for the process dying: no ``except Exception`` clean-up runs."""


def _ds(k: float) -> xr.Dataset:
    return xr.Dataset({"v": ("step", np.arange(4.0) + k)}, coords={"step": [0, 1, 2, 3]})


def _value(path: Path) -> float:
    return float(storage.load(path)["v"].values[0])


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*"))


def test_replacing_a_store_leaves_only_the_new_one(tmp_path):
    out = tmp_path / "r.zarr"
    storage.save_zarr(_ds(1), out)
    storage.save_zarr(_ds(2), out)
    assert _value(out) == 2.0
    assert _leftovers(out) == []


def test_a_crash_while_writing_keeps_the_old_store_and_the_next_run_tidies(tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "r.zarr"
    storage.save_zarr(_ds(1), out)
    real = storage._write_zarr

    def dies_half_way(ds, path, *args):
        real(ds, path, *args)
        shutil.rmtree(next(p for p in Path(path).iterdir() if p.is_dir()))  # half written
        raise Crash

    monkeypatch.setattr(storage, "_write_zarr", dies_half_way)
    with pytest.raises(Crash):
        storage.save_zarr(_ds(2), out)
    assert _value(out) == 1.0
    assert len(_leftovers(out)) == 1
    monkeypatch.setattr(storage, "_write_zarr", real)
    storage.save_zarr(_ds(3), out)
    assert _value(out) == 3.0
    assert _leftovers(out) == []


def test_a_crash_after_the_exchange_has_the_new_store_in_place(tmp_path, monkeypatch):
    out = tmp_path / "r.zarr"
    storage.save_zarr(_ds(1), out)
    real = shutil.rmtree

    def dies_on_deleting(path, *args, **kwargs):
        # zarr itself clears the folder it writes into: die only when the old store, swapped
        # out to the temporary name, is about to be deleted
        if Path(path).name.endswith(".tmp") and (Path(path) / "v").exists() \
                and _value(Path(path)) == 1.0:
            raise Crash
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_on_deleting)
    with pytest.raises(Crash):
        storage.save_zarr(_ds(2), out)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert _value(out) == 2.0
    assert len(_leftovers(out)) == 1  # the old store, swapped out, not yet deleted
    storage.recover_zarr(out)
    assert _value(out) == 2.0 and _leftovers(out) == []


def test_two_rename_fallback_crash_between_renames_is_repaired(tmp_path, monkeypatch):
    out = tmp_path / "r.zarr"
    storage.save_zarr(_ds(1), out)
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    real, calls = os.rename, []

    def second_rename_dies(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise Crash
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_dies)
    with pytest.raises(Crash):
        storage.save_zarr(_ds(2), out)
    monkeypatch.setattr(os, "rename", real)
    assert not out.exists()  # the window the fallback cannot close …
    storage.recover_zarr(out)  # … which the next run repairs: the old complete store is back
    assert _value(out) == 1.0 and _leftovers(out) == []
    storage.save_zarr(_ds(2), out)  # and the fallback, uninterrupted, replaces it
    assert _value(out) == 2.0 and _leftovers(out) == []


def test_the_exchange_is_atomic_on_this_filesystem(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not storage._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable here: the two-rename fallback runs")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_analyze_tidies_leftovers_of_dead_runs_and_keeps_a_live_ones(tmp_path, causal):
    model, checkpoint, _ = causal
    out = tmp_path / "geometry.zarr"
    kw = dict(model=model, layers=["mix"], reduce="last", probes=["rankme"],
              probe_data="stdlib-text", tokenizer="bytes", n_samples=20, max_length=16,
              progress=False, output=out)
    first = analyze([checkpoint], **kw)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".geometry.zarr.new-{dead.pid}.tmp").mkdir()
    live = tmp_path / f".geometry.zarr.new-{os.getppid()}.tmp"
    live.mkdir()
    second = analyze([checkpoint], **kw)
    assert _leftovers(out) == [live.name]
    np.testing.assert_array_equal(storage.load(out)["rankme"].values, first["rankme"].values)
    np.testing.assert_array_equal(second["rankme"].values, first["rankme"].values)


WRITER = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
import xarray as xr
from traindyn.dynamics import storage
if {fallback}:
    storage._exchange = lambda a, b: False
out = Path({out!r})
for i in range(10 ** 6):
    storage.save_zarr(xr.Dataset({{"v": ("x", np.full(50, float(i % 2)))}}), out)
    print(i, flush=True)
"""


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_sigkill_while_replacing_leaves_a_complete_store(tmp_path, fallback):
    """A writer replaces the store in a loop and is killed at an arbitrary moment: after the
    next run's repair the store is one of the two complete versions."""
    out = tmp_path / "loop.zarr"
    code = textwrap.dedent(WRITER.format(root=str(ROOT), fallback=fallback, out=str(out)))
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            writer.stdout.readline()  # a few replacements done: now mid-loop
        time.sleep(float(np.random.default_rng().uniform(0.0, 0.2)))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    storage.recover_zarr(out)
    values = storage.load(out)["v"].values
    assert values.shape == (50,) and values[0] in (0.0, 1.0)
    assert (values == values[0]).all()
    assert _leftovers(out) == []


# ----------------------------------------------------------------------------- whose output


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _kw(causal, out: Path, **extra) -> dict:
    model, _, _ = causal
    return dict(model=model, layers=["mix"], reduce="last", probes=["rankme"],
                probe_data="stdlib-text", tokenizer="bytes", n_samples=20, max_length=16,
                progress=False, output=out, **extra)


@pytest.mark.parametrize("name", ["X.zarr", "X.nc"])
def test_analyze_never_replaces_a_users_files_without_overwrite(tmp_path, causal, capsys,
                                                                name):
    from traindyn.dynamics.cli_analyze import main as cli_main

    _, checkpoint, _ = causal
    users = tmp_path / "mine"
    out = users / name
    if name.endswith(".zarr"):
        (out / "raw").mkdir(parents=True)
        (out / "raw" / "scan.bin").write_bytes(bytes(range(256)))
        (out / "README.txt").write_text("six months of data")
    else:
        users.mkdir()
        out.write_text("a NetCDF-looking name, not traindyn's")
    before = _files(users)
    with pytest.raises(analyze_module.OutputError, match=r"did not write.*--overwrite"):
        analyze([checkpoint], **_kw(causal, out))
    code = cli_main([str(checkpoint), "--model", _kw(causal, out)["model"], "--layers", "mix",
                     "--reduce", "last", "--probes", "rankme", "--probe-data", "stdlib-text",
                     "--tokenizer", "bytes", "--n-samples", "20", "--max-length", "16",
                     "--output", str(out), "--no-progress", "--no-figures"])
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and "--overwrite" in err, err
    assert _files(users) == before                 # every byte intact, no .parts folder
    ds = analyze([checkpoint], **_kw(causal, out, overwrite=True))
    assert storage.output_kind(out) == "analyze"
    np.testing.assert_array_equal(storage.load(out)["rankme"].values, ds["rankme"].values)


def test_analyze_refuses_a_monitors_recording_and_another_commands_output(tmp_path, causal):
    from torch import nn
    from traindyn.dynamics.monitor import Monitor

    _, checkpoint, _ = causal
    recording = tmp_path / "run.zarr"
    with Monitor(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), probes=["rankme"], layers=["1"],
                 schedule=lambda s: True, probe_data=torch.randn(8, 3),
                 store=recording) as monitor:
        for step in range(3):
            monitor.step(step, train_loss=float(step))
    before = _files(recording)
    with pytest.raises(analyze_module.OutputError, match="a Monitor's recording"):
        analyze([checkpoint], **_kw(causal, recording))
    assert _files(recording) == before
    np.testing.assert_array_equal(storage.load_stream(recording)["train_loss"].values,
                                  [0.0, 1.0, 2.0])
    theory = tmp_path / "theory.zarr"
    storage.save(xr.Dataset({"v": ("x", [1.0])}), theory, kind="theory")
    with pytest.raises(analyze_module.OutputError, match="traindyn theory"):
        analyze([checkpoint], **_kw(causal, theory))


def test_analyze_resumes_and_replaces_its_own_output(tmp_path, causal, capsys):
    _, checkpoint, _ = causal
    out = tmp_path / "geometry.zarr"
    first = analyze([checkpoint], **_kw(causal, out))
    capsys.readouterr()
    again = analyze([checkpoint], **_kw(causal, out))
    assert "reusing 1 of 1" in capsys.readouterr().err
    np.testing.assert_array_equal(again["rankme"].values, first["rankme"].values)
    np.testing.assert_array_equal(storage.load(out)["rankme"].values, first["rankme"].values)
    assert storage.output_kind(out) == "analyze"


def test_recover_zarr_touches_only_its_own_dead_temporaries(tmp_path):
    out = tmp_path / "X.zarr"
    storage.save_zarr(_ds(1), out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    foreign = [".X.zarr.foo.tmp", f".X.zarr.new-{dead.pid}x.tmp", ".X.zarr.old-.tmp",
               f".X.zarr.backup.new-{dead.pid}.tmp"]     # the last: another output's
    for name in foreign:
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    a_file = tmp_path / f".X.zarr.old-{dead.pid}.tmp"
    a_file.write_text("a file, not a store folder")
    ours = tmp_path / f".X.zarr.new-{dead.pid}.tmp"
    storage.save_zarr(_ds(2), ours)                     # what a killed run was writing
    storage.recover_zarr(out)
    for name in foreign:
        assert (tmp_path / name / "keep.txt").read_text() == name
    assert a_file.read_text() == "a file, not a store folder"
    assert not ours.exists()                            # a dead run's own temporary: tidied
    assert _value(out) == 1.0


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from traindyn.dynamics import storage
with storage.output_lock({out!r}, "a test holding the lock"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_of_one_output_is_refused_and_a_dead_ones_lock_is_not_stale(
        tmp_path, causal):
    _, checkpoint, _ = causal
    out = tmp_path / "shared.nc"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LOCK_HOLDER.format(root=str(ROOT),
                                                                  out=str(out)))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(analyze_module.OutputError,
                           match=rf"being written by another process \(a test holding the "
                                 rf"lock, pid {holder.pid} on "):
            analyze([checkpoint], **_kw(causal, out))
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)       # dies holding the lock: the system frees it
        holder.wait()
        holder.stdout.close()
    ds = analyze([checkpoint], **_kw(causal, out))
    np.testing.assert_array_equal(storage.load(out)["rankme"].values, ds["rankme"].values)
    assert not list(tmp_path.glob(".shared.nc.lock"))   # released


# ------------------------------------------------------------------ what a result is keyed on

BLOCKS = """
import torch
from torch import nn

SCALE = {scale}


class Squash(nn.Module):
    def forward(self, x):
        return torch.tanh(SCALE * x)
"""

MODELS = """
from torch import nn

from .blocks import Squash


def make_model():
    return nn.Sequential(nn.Linear(64, 24), Squash())
"""


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A user's package ``stalelab`` (a factory in ``models.py`` importing ``blocks.py``) and
    one checkpoint of it; ``forget()`` drops the package from ``sys.modules`` as a new process
    would start without it."""
    package = tmp_path / "src" / "stalelab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(MODELS)
    (package / "blocks.py").write_text(BLOCKS.format(scale=1.0))
    monkeypatch.syspath_prepend(str(package.parent))

    def forget():
        for name in [n for n in sys.modules if n.split(".")[0] == "stalelab"]:
            del sys.modules[name]

    forget()
    from stalelab.models import make_model

    torch.manual_seed(0)
    torch.save(make_model().state_dict(), tmp_path / "step7.pt")
    yield package, tmp_path / "step7.pt", forget
    forget()


def _lab_kw(output=None, **extra):
    return dict(model="stalelab.models:make_model", layers=["1"], probes=["rankme"],
                n_samples=200, progress=False, output=output, **extra)


def _squashed_rankme(checkpoint: Path, scale: float) -> float:
    """RankMe of ``tanh(scale · (x Wᵀ + b))`` on the probe inputs, in float64 from the weights."""
    state = torch.load(checkpoint, weights_only=True)
    x = torch.cat([b.inputs for b in load_probe_inputs("digits", n_samples=200).batches])
    w, bias = state["0.weight"].double(), state["0.bias"].double()
    return _rankme(torch.tanh(scale * (x.double() @ w.T + bias)).numpy())


def test_a_module_the_factory_imports_changes_and_the_result_is_recomputed(lab, tmp_path,
                                                                           capfd):
    package, checkpoint, forget = lab
    out = tmp_path / "lab.nc"
    before = float(analyze([checkpoint], **_lab_kw(out))["rankme"].item())
    (package / "blocks.py").write_text(BLOCKS.format(scale=6.0))   # saturates the tanh
    forget()                                                       # as a new process would
    capfd.readouterr()
    after = float(analyze([checkpoint], **_lab_kw(out))["rankme"].item())
    err = capfd.readouterr().err
    assert_rel(before, _squashed_rankme(checkpoint, 1.0), 1e-6, "RankMe with SCALE 1")
    assert_rel(after, _squashed_rankme(checkpoint, 6.0), 1e-6, "RankMe with SCALE 6")
    assert abs(after - before) > 0.05 * before                     # the premise
    assert "reusing 0 of 1" in err and "model code (stalelab.blocks)" in err, err
    analyze([checkpoint], **_lab_kw(out))                          # unchanged: reused
    assert "reusing 1 of 1" in capfd.readouterr().err


PROBE_FILE = """
import torch
from traindyn.probes.registry import Probe, Variable, register


def scaled_norm(features):
    return float(torch.linalg.norm(features.double())) * {factor}


register(Probe("stale_scaled_norm", "features",
               {{"stale_scaled_norm": Variable("norm of the features × a factor")}},
               "a test", fn=scaled_norm))
"""


def test_an_imported_probe_file_changes_and_the_result_is_recomputed(causal, tmp_path,
                                                                     capfd):
    from traindyn.dynamics.cli_analyze import main as cli_main
    from traindyn.probes.registry import PROBES

    model, checkpoint, _ = causal
    probe_file = tmp_path / "stale_probe.py"
    out = tmp_path / "probe.nc"
    args = [str(checkpoint), "--model", model, "--layers", "mix", "--reduce", "last",
            "--probes", "stale_scaled_norm", "--probe-data", "stdlib-text", "--tokenizer", "bytes",
            "--n-samples", "20", "--max-length", "16", "--import", str(probe_file),
            "--output", str(out), "--no-progress", "--no-figures"]
    try:
        values = []
        for factor in (1.0, 1000.0):
            probe_file.write_text(PROBE_FILE.format(factor=factor))
            capfd.readouterr()
            assert cli_main(args) == 0
            values.append(float(storage.load(out)["stale_scaled_norm"].item()))
        err = capfd.readouterr().err
    finally:
        PROBES.pop("stale_scaled_norm", None)
        sys.modules.pop("stale_probe", None)
    assert values[1] == pytest.approx(1000.0 * values[0], rel=1e-12)
    assert "reusing 0 of 1" in err and "probe code (stale_probe)" in err, err


def test_another_traindyn_version_recomputes(causal, tmp_path, capfd, monkeypatch):
    import traindyn

    _, checkpoint, _ = causal
    out = tmp_path / "v.nc"
    first = analyze([checkpoint], **_kw(causal, out))
    monkeypatch.setattr(traindyn, "__version__", "99.0")
    capfd.readouterr()
    again = analyze([checkpoint], **_kw(causal, out))
    err = capfd.readouterr().err
    assert "reusing 0 of 1" in err and "traindyn version (" in err and "→ 99.0)" in err, err
    np.testing.assert_array_equal(again["rankme"].values, first["rankme"].values)
