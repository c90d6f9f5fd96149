"""`traindyn analyze`: a checkpoint series → one Dataset (dynamics.analyze, cli_analyze,
probe_inputs).  Values are checked against float64 numpy references written here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file
from traindyn.dynamics import records, storage
from traindyn.dynamics.analyze import TIMING_VARIABLES, analyze, match_layers, summary_table
from traindyn.dynamics.cli_analyze import main as cli_main
from traindyn.dynamics.probe_inputs import (
    byte_tokenize,
    digits_inputs,
    load_probe_inputs,
    stdlib_sentences,
)
from traindyn.probes.registry import PROBES, Probe, Variable

from tests.helpers import assert_rel, child_env, start_and_kill

FACTORY = '''
import os
import time

from torch import nn


class MLP(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        delay = float(os.environ.get("TRAINDYN_TEST_DELAY", "0"))
        if delay:
            time.sleep(delay)
        return self.net(x)


def make_mlp(width=128):
    return MLP(width)
'''

STEPS = [0, 10, 100, 1000]
LAYERS = ["net.[13]"]  # the two hidden ReLU outputs (full rank; the digits have 3 constant
# pixels, so the first pre-activation is rank-deficient and its near-zero singular values are
# float32 noise, on which an SVD and a Gram-matrix route legitimately differ at 1e-6)


# -------------------------------------------------------------------------- references


def ref_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """Garrido et al. (2023) Eq. 1 by brute force: raw singular values, ε after normalising."""
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_cov_eigs(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    zc = z - z.mean(0)
    lam = np.linalg.eigvalsh(zc.T @ zc / len(z))[::-1]
    return np.clip(lam, 0, None)


def ref_rankme_cov(z: np.ndarray, eps: float = 1e-7) -> float:
    lam = ref_cov_eigs(z)
    p = lam / lam.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_alpha(z: np.ndarray, lo: int = 10, hi: int = 100) -> float:
    """Weighted (1/r) least squares of ln λ_r on −ln r, ranks lo+1..hi (Agrawal et al. 2022)."""
    lam = ref_cov_eigs(z)
    r = np.arange(lo, hi) + 1.0
    slope, _ = np.polyfit(-np.log(r), np.log(lam[lo:hi]), 1, w=np.sqrt(1.0 / r))
    return float(slope)


# -------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("factory") / "mlp_factory.py"
    path.write_text(FACTORY)
    return f"{path}:make_mlp"


def _load_factory(spec: str):
    from traindyn.dynamics.checkpoints import resolve_factory

    return resolve_factory(spec)


def _trained_state(make, step: int) -> dict:
    """A stand-in for training: weights drift away from the initialisation with the step."""
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(step + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * np.log1p(step) * torch.randn(p.shape, generator=gen))
    return model.state_dict()


@pytest.fixture(scope="module")
def series(factory, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("series")
    make = _load_factory(factory)
    for step in STEPS:
        state = _trained_state(make, step)
        if step % 20 == 0:
            torch.save(state, folder / f"step{step}.pt")
        else:
            save_file(state, str(folder / f"checkpoint-{step}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def clean(series, factory) -> xr.Dataset:
    """The series analysed serially, in memory."""
    return _run(series, factory, learning_rate=0.1)


def _copy_series(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _run(series_dir, factory, **kw):
    kw.setdefault("progress", False)
    return analyze(series_dir, model=factory, layers=LAYERS, probe_data="digits", batch_size=500,
                   **kw)


def _drop_timing(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_vars(list(TIMING_VARIABLES))


# -------------------------------------------------------------------------- values


def test_values_match_float64_references_at_every_step(clean, factory):
    ds = clean
    records.validate(ds)
    assert list(ds["step"].values) == STEPS
    np.testing.assert_allclose(ds["time"].values, 0.1 * np.array(STEPS))
    assert list(ds["layer"].values) == ["net.1", "net.3"]
    assert set(ds["status"].values) == {"ok"}
    make = _load_factory(factory)
    x = digits_inputs()
    for i, step in enumerate(STEPS):
        model = make()
        model.load_state_dict(_trained_state(make, step))
        with torch.no_grad():
            h1 = torch.relu(model.net[0](x))
            h3 = torch.relu(model.net[2](h1))
        for j, h in enumerate((h1.numpy(), h3.numpy())):
            where = f"step {step} layer {j}"
            assert_rel(ds["rankme"].values[i, j], ref_rankme(h), 1e-9, where)
            assert_rel(ds["rankme_covariance"].values[i, j], ref_rankme_cov(h), 1e-9, where)
            assert_rel(ds["alpha_req"].values[i, j], ref_alpha(h), 1e-8, where)
    assert np.all((ds["alpha_req_r2"].values > 0) & (ds["alpha_req_r2"].values <= 1))
    assert np.all(ds["duplicate_of"].values == -1) and ds.attrs["n_failed"] == 0


def test_probe_kwargs_and_registered_probes_reach_the_computation(series, factory, monkeypatch):
    def mean_square(features, scale=1.0):
        f = torch.as_tensor(features, dtype=torch.float64)
        return float(scale * (f**2).sum(1).mean())

    monkeypatch.setitem(PROBES, "mean_square_test",
                        Probe("mean_square_test", "features",
                              {"mean_square_test": Variable("mean squared norm")},
                              "a test probe", fn=mean_square))
    ds = _run(series, factory, probes=["mean_square_test", "alpha_req"],
              probe_kwargs={"mean_square_test": {"scale": 2.0},
                            "alpha_req": {"fit_range": (3, 40)}})
    make = _load_factory(factory)
    model = make()
    model.load_state_dict(_trained_state(make, 1000))
    with torch.no_grad():
        h0 = torch.relu(model.net[0](digits_inputs())).double().numpy()
    assert_rel(ds["mean_square_test"].values[-1, 0], 2.0 * (h0**2).sum(1).mean(), 1e-10,
               "custom probe")
    assert_rel(ds["alpha_req"].values[-1, 0], ref_alpha(h0, 3, 40), 1e-8, "fit range")
    assert json.loads(ds.attrs["parameters"])["probe_kwargs"]["alpha_req"]["fit_range"] == [3, 40]


def test_duplicate_weights_are_flagged(series, factory, tmp_path):
    folder = _copy_series(series, tmp_path / "dup")
    (folder / "step5000.pt").write_bytes((folder / "checkpoint-10.safetensors").read_bytes())
    os.rename(folder / "step5000.pt", folder / "step5000.safetensors")
    ds = _run(folder, factory)
    assert list(ds["duplicate_of"].values) == [-1, -1, -1, -1, 10]
    assert list(ds["duplicate"].values) == [0, 1, 0, 0, 1]
    assert ds["checkpoint_hash"].values[1] == ds["checkpoint_hash"].values[4]
    np.testing.assert_array_equal(ds["rankme"].values[1], ds["rankme"].values[4])


# -------------------------------------------------------------------------- failures


def test_bad_checkpoints_fail_with_reasons_and_the_rest_is_analysed(series, factory, clean,
                                                                   tmp_path):
    folder = _copy_series(series, tmp_path / "bad")
    make = _load_factory(factory)
    good = _trained_state(make, 100)
    marker = tmp_path / "payload_ran.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({**good, "x": Payload()}, folder / "step20.pt")                   # malicious
    data = (folder / "step100.pt").read_bytes()
    (folder / "step30.pt").write_bytes(data[: len(data) // 3])                    # truncated
    torch.save({k: v for k, v in good.items() if k != "net.4.bias"},
               folder / "step40.pt")                                              # missing key
    save_file({**good, "net.2.weight": torch.zeros(128, 64)},
              str(folder / "step50.safetensors"))                                 # shape
    nan = {k: v.clone() for k, v in good.items()}
    nan["net.0.weight"][3, 3] = float("nan")
    torch.save(nan, folder / "step60.pt")                                         # NaN
    output = tmp_path / "bad.nc"
    code = cli_main([str(folder), "--model", factory, "--layers", ",".join(LAYERS),
                     "--batch-size", "500", "--output", str(output), "--no-progress"])
    assert code == 1
    assert not marker.exists()
    ds = storage.load(output)
    status = dict(zip(ds["step"].values.tolist(), ds["status"].values.tolist(), strict=True))
    reason = dict(zip(ds["step"].values.tolist(), ds["reason"].values.tolist(), strict=True))
    assert {s for s, v in status.items() if v == "failed"} == {20, 30, 40, 50, 60}
    assert "refused" in reason[20] and "weights_only" in reason[20]
    assert "truncated" in reason[30]
    assert "net.4.bias" in reason[40]
    assert "shape mismatch" in reason[50] and "net.2.weight" in reason[50]
    assert "non-finite" in reason[60] and "net.0.weight" in reason[60]
    assert ds.attrs["n_failed"] == 5
    for step in STEPS:  # the good checkpoints are analysed exactly as in a clean series
        np.testing.assert_array_equal(ds["rankme"].sel(step=step).values,
                                      clean["rankme"].sel(step=step).values)
    assert np.all(np.isnan(ds["rankme"].sel(step=[20, 30, 40, 50, 60]).values))
    assert (tmp_path / "bad_rankme.png").is_file()
    table = summary_table(ds)
    assert "failed" in table and "refused" in table


def test_usage_errors_exit_2_with_a_message(series, factory, capsys):
    assert cli_main([str(series), "--model", factory, "--layers", "nope.*",
                     "--no-progress"]) == 2
    assert "available: net, net.0" in capsys.readouterr().err
    assert cli_main([str(series), "--layers", "net.0", "--no-progress"]) == 2
    assert "model factory" in capsys.readouterr().err
    assert cli_main([str(series), "--model", factory, "--layers", "net.0", "--probes",
                     "rankmee", "--no-progress"]) == 2
    assert "unknown probe 'rankmee'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for option in ("--workers", "--scheduler", "--layers", "--probe-data", "--probe-labels",
                   "--reduce", "--steps"):
        assert option in out


# -------------------------------------------------------------------------- resume


def test_rerun_skips_finished_and_recomputes_changed(series, factory, tmp_path, monkeypatch):
    import traindyn.dynamics.analyze as mod

    folder = _copy_series(series, tmp_path / "resume")
    output = tmp_path / "out.nc"
    first = _run(folder, factory, output=output)
    calls = []
    original = mod.analyze_checkpoint
    monkeypatch.setattr(mod, "analyze_checkpoint",
                        lambda c, s, t=None: calls.append(c.step) or original(c, s, t))
    again = _run(folder, factory, output=output)
    assert calls == []
    xr.testing.assert_identical(first, again)
    make = _load_factory(factory)
    torch.save(_trained_state(make, 5), folder / "step100.pt")  # a checkpoint replaced
    os.utime(folder / "step100.pt", ns=(10**9, 10**9))
    changed = _run(folder, factory, output=output)
    assert calls == [100]
    assert changed["checkpoint_hash"].values[2] != first["checkpoint_hash"].values[2]
    calls.clear()
    _run(folder, factory, output=output, probes=["rankme"])  # other parameters: all again
    assert calls == STEPS


def test_sigkill_then_restart_equals_an_uninterrupted_run(series, factory, tmp_path):
    folder = _copy_series(series, tmp_path / "kill")
    extra = _load_factory(factory)
    for step in (2000, 3000):
        torch.save(_trained_state(extra, step), folder / f"step{step}.pt")
    output = tmp_path / "killed.nc"
    parts = tmp_path / "killed.nc.parts"
    cmd = [sys.executable, "-m", "traindyn.dynamics.cli_analyze", str(folder), "--model", factory,
           "--layers", ",".join(LAYERS), "--batch-size", "500", "--output", str(output),
           "--no-progress", "--no-figures"]
    start_and_kill(cmd, parts, 2, child_env(TRAINDYN_TEST_DELAY="0.1", OMP_NUM_THREADS="1"))
    finished = len(list(parts.glob("step*.json")))
    assert 2 <= finished < 6 and not output.exists()
    # restart (here in-process, the same code path as the command line)
    _run(folder, factory, output=output)
    resumed = storage.load(output)
    _run(folder, factory, output=tmp_path / "clean.nc")
    uninterrupted = storage.load(tmp_path / "clean.nc")
    assert resumed.sizes["step"] == 6
    xr.testing.assert_identical(_drop_timing(resumed), _drop_timing(uninterrupted))


# -------------------------------------------------------------------------- parallel


def test_two_worker_local_cluster_equals_serial(series, factory, clean, tmp_path):
    pytest.importorskip("distributed")
    serial = clean
    parallel = _run(series, factory, workers=2, output=tmp_path / "parallel.zarr",
                    learning_rate=0.1)
    xr.testing.assert_identical(_drop_timing(serial), _drop_timing(parallel))
    stored = storage.load(tmp_path / "parallel.zarr")
    np.testing.assert_array_equal(stored["rankme"].values, serial["rankme"].values)


# -------------------------------------------------------------------------- layers, inputs


def test_dotted_globs_select_blocks_not_their_children():
    from torch import nn

    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleList(
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(3)))
    assert match_layers(model, ["blocks.*"]) == ["blocks.0", "blocks.1", "blocks.2"]
    assert match_layers(model, ["blocks.**"])[:3] == ["blocks.0", "blocks.0.0", "blocks.0.1"]
    assert match_layers(model, ["*.1"]) == ["blocks.1"]
    assert match_layers(model, ["*.0.1"]) == ["blocks.0.1"]
    assert match_layers(model, ["blocks.[02]", "blocks.[!0].1"]) == [
        "blocks.0", "blocks.1.1", "blocks.2", "blocks.2.1"]
    with pytest.raises(KeyError, match="available"):
        match_layers(model, ["head"])


def test_probe_inputs_from_builtins_and_files(tmp_path):
    x = digits_inputs()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    from sklearn.datasets import load_digits

    raw = load_digits().data
    np.testing.assert_allclose(x[:, 10].numpy(), (raw[:, 10] - raw[:, 10].mean())
                               / (raw[:, 10].std() + 1e-6), rtol=1e-5)
    batches = load_probe_inputs("digits", n_samples=1000, batch_size=300).batches
    assert [len(b) for b in batches] == [300, 300, 300, 100]

    sentences = stdlib_sentences(300, seed=1)
    assert len(sentences) == 300 == len(set(sentences))
    assert sentences == stdlib_sentences(300, seed=1) != stdlib_sentences(300, seed=2)
    assert all(s[-1] in ".!?" and len(s.split()) >= 5 for s in sentences)
    with pytest.raises(ValueError, match="asked for"):
        stdlib_sentences(10**7)

    ids, mask = byte_tokenize(["ab", "été"], max_length=4)
    assert ids.tolist() == [[97, 98, 0, 0], [195, 169, 116, 195]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]

    np.savez(tmp_path / "probe.npz", x=np.ones((7, 3), np.float32), y=np.zeros(7))
    assert load_probe_inputs(tmp_path / "probe.npz", batch_size=4).batches[1].inputs.shape \
        == (3, 3)
    torch.save({"input_ids": torch.ones(5, 6, dtype=torch.long),
                "attention_mask": torch.ones(5, 6, dtype=torch.long)}, tmp_path / "tok.pt")
    tok = load_probe_inputs(tmp_path / "tok.pt", batch_size=2).batches
    assert isinstance(tok[0].inputs, dict) and tok[0].mask.shape == (2, 6) and len(tok) == 3
    (tmp_path / "lines.txt").write_text("first line\n\nsecond one\n")
    text = load_probe_inputs(tmp_path / "lines.txt", tokenizer="bytes", max_length=8)
    assert text.texts == ["first line", "second one"]
    assert text.batches[0].inputs[1, :6].tolist() == list(b"second")
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": torch.ones(2, 2), "p": Payload()}, tmp_path / "evil_inputs.pt")
    with pytest.raises(ValueError, match="refused to load probe inputs"):
        load_probe_inputs(tmp_path / "evil_inputs.pt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="need a tokenizer"):
        load_probe_inputs("stdlib-text", n_samples=5)
    with pytest.raises(FileNotFoundError, match="not a built-in"):
        load_probe_inputs("no-such-inputs")


def test_byte_text_with_last_token_reduction(tmp_path):
    """A causal byte model on text: the last-token rule picks the last non-pad position."""
    from torch import nn

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, 8)
            self.mix = nn.Identity()

        def forward(self, tokens):
            return self.mix(self.embed(tokens).cumsum(1))  # causal: position t sees ≤ t

    torch.manual_seed(0)
    state = Causal().state_dict()
    torch.save(state, tmp_path / "step1.pt")
    file = tmp_path / "causal.py"
    file.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Causal(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.embed = nn.Embedding(256, 8)\n        self.mix = nn.Identity()\n\n"
        "    def forward(self, tokens):\n        return self.mix(self.embed(tokens)"
        ".cumsum(1))\n\ndef make_model():\n    return Causal()\n")
    ds = analyze([tmp_path / "step1.pt"], model=str(file), probe_data="stdlib-text", n_samples=40,
                 tokenizer="bytes", max_length=32, batch_size=16, layers=["mix"],
                 reduce="last", probes=["rankme"], progress=False)
    texts = stdlib_sentences(40)
    emb = state["embed.weight"].double().numpy()
    z = np.stack([emb[list(t.encode()[:32])].sum(0) for t in texts])
    assert_rel(ds["rankme"].values[0, 0], ref_rankme(z), 1e-6, "last-token rankme")


@pytest.mark.slow
def test_existing_scheduler_address_equals_serial(series, factory, clean):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = _run(series, factory, scheduler=cluster.scheduler_address, learning_rate=0.1)
    xr.testing.assert_identical(_drop_timing(clean), _drop_timing(remote))


def test_analyze_needs_nothing_from_its_command_line():
    """``summary_table`` lives in ``analyze``; the command line imports it from there (one
    direction: the face over the library)."""
    import ast

    import traindyn.dynamics.analyze as library
    import traindyn.dynamics.cli_analyze as face

    imported = set()
    for node in ast.walk(ast.parse(Path(library.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not any(name.startswith("traindyn.dynamics.cli") for name in imported), imported
    assert library.summary_table.__module__ == library.__name__
    assert not hasattr(face, "summary_table")
