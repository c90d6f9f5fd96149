"""``analyze`` with every probe family (labelled, parameter, reference) and its resume rules.

References: direct calls of the plain probe functions on features computed here, and
distances between the checkpoints' weights computed with numpy.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from traindyn.dynamics.analyze import TIMING_VARIABLES, OutputError, analyze
from traindyn.dynamics.cli_analyze import main as cli_main
from traindyn.dynamics.probe_inputs import digits_inputs, digits_labels
from traindyn.probes.registry import PROBES, register

from tests.dynamics.test_analyze import (
    FACTORY,
    _copy_series,
    _load_factory,
    _trained_state,
)
from tests.helpers import assert_rel, child_env, start_and_kill
from tests.test_probe_contract import WEIGHT_MOTION

LINEAR = ["net.0", "net.2"]
STEPS = [0, 10, 100, 1000]
PROBE_SET = ["rankme", "neural_collapse", "weight_spectra", "weight_motion_test", "ntk"]
NTK_SAMPLES = 48
PROBE_KWARGS = {"ntk": {"max_samples": NTK_SAMPLES}}

USER_MODULE = '''
from traindyn.probes.registry import register
from tests.test_probe_contract import WEIGHT_MOTION

register(WEIGHT_MOTION)
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("factory_probes") / "mlp_factory.py"
    path.write_text(FACTORY)
    return f"{path}:make_mlp"


@pytest.fixture(scope="module")
def series(factory, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("series_probes")
    make = _load_factory(factory)
    for step in STEPS:
        torch.save(_trained_state(make, step), folder / f"step{step}.pt")
    return folder


@pytest.fixture()
def user_probe():
    register(WEIGHT_MOTION)
    yield
    PROBES.pop(WEIGHT_MOTION.name, None)


def _run(folder, factory, **kw):
    kw.setdefault("progress", False)
    return analyze(folder, model=factory, layers=LINEAR, probe_data="digits", batch_size=500,
                   probe_labels="digits", probes=PROBE_SET, probe_kwargs=PROBE_KWARGS, **kw)


def _ntk_float64(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Brute force: Θ = Σ_a J_a J_aᵀ (output trace) from float64 Jacobians (torch.func)."""
    from torch.func import functional_call, jacrev

    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x.double(),)))(params)
    flat = torch.cat([j.reshape(x.shape[0], -1, j[0, 0].numel()) for j in jac.values()], -1)
    return torch.einsum("iap,jap->ij", flat, flat).numpy()


def _centered_alignment(K: np.ndarray, y: np.ndarray) -> float:
    """Cortes, Mohri & Rostamizadeh (2012): ⟨HKH, H YYᵀ H⟩ / (‖HKH‖ ‖H YYᵀ H‖)."""
    n = len(y)
    H = np.eye(n) - 1.0 / n
    L = (y[:, None] == y[None, :]).astype(float)
    Kc, Lc = H @ K @ H, H @ L @ H
    return float((Kc * Lc).sum() / (np.linalg.norm(Kc) * np.linalg.norm(Lc)))


def test_labelled_parameter_and_reference_probes_match_direct_calls(series, factory,
                                                                    user_probe):
    from traindyn.probes.weights import weight_spectrum

    from traindyn import probes

    ds = _run(series, factory, learning_rate=0.1)
    make = _load_factory(factory)
    x, y = digits_inputs(), digits_labels()
    weights, kernels = {}, []
    for i, step in enumerate(STEPS):
        model = make()
        model.load_state_dict(_trained_state(make, step))
        kernels.append(_ntk_float64(_reloaded(make, step), x[:NTK_SAMPLES]))
        assert_rel(ds["ntk_centered_alignment"].values[i],
                   _centered_alignment(kernels[-1], y[:NTK_SAMPLES].numpy()), 1e-5, "ntk")
        net = model.net
        with torch.no_grad():
            h = [net[0](x), net[2](torch.relu(net[0](x)))]
        for j, (feats, layer) in enumerate(zip(h, (net[0], net[2]), strict=True)):
            where = f"step {step} layer {j}"
            assert_rel(ds["rankme"].values[i, j], probes.rankme(feats), 1e-9, where)
            nc = probes.neural_collapse(feats, y)
            for name in ("nc1", "nc2_equinorm", "nc2_equiangle", "cdnv"):
                assert_rel(ds[name].values[i, j], float(nc[name]), 1e-9, f"{where} {name}")
            spectrum = weight_spectrum(layer.weight.detach())
            for name in ("spectral_norm", "stable_rank", "lambda_max", "mp_edge"):
                assert_rel(ds[f"weight_{name}"].values[i, j], spectrum[name], 1e-12, where)
            weights[(step, j)] = layer.weight.detach().double().numpy()
    for i, step in enumerate(STEPS):
        for j in range(2):
            first = np.linalg.norm(weights[(step, j)] - weights[(0, j)])
            assert_rel(ds["weight_distance_first"].values[i, j], first, 1e-12, "first")
            if i == 0:
                assert np.isnan(ds["weight_distance_previous"].values[i, j])
            else:
                prev = np.linalg.norm(weights[(step, j)] - weights[(STEPS[i - 1], j)])
                assert_rel(ds["weight_distance_previous"].values[i, j], prev, 1e-12, "prev")
    for i in range(1, len(STEPS)):
        K, K0, Kp = kernels[i], kernels[0], kernels[i - 1]
        assert_rel(ds["ntk_relative_change"].values[i], np.linalg.norm(K - K0) /
                   np.linalg.norm(K0), 1e-4, "ntk change")
        distance = 1 - (Kp * K).sum() / (np.linalg.norm(Kp) * np.linalg.norm(K))
        assert abs(ds["ntk_distance_previous"].values[i] - distance) < 1e-6 + 1e-3 * distance
        dt = 0.1 * (STEPS[i] - STEPS[i - 1])   # time = learning rate × step
        assert_rel(ds["ntk_velocity"].values[i], ds["ntk_distance_previous"].values[i] / dt,
                   1e-12, "velocity")
    assert np.isnan(ds["ntk_velocity"].values[0])
    # no classifier was given: its NC variables are NaN, and the Dataset says why per layer
    assert np.all(np.isnan(ds["nc3"].values))
    assert ds["layer_notes"].dims == ("step", "layer")


def _reloaded(make, step: int) -> torch.nn.Module:
    model = make()
    model.load_state_dict(_trained_state(make, step))
    return model


def test_labelled_probes_without_labels_fail_before_any_work(series, factory):
    with pytest.raises(ValueError, match="need labels"):
        analyze(series, model=factory, layers=LINEAR, probes=["neural_collapse"],
                progress=False)


def test_sigkill_then_restart_gives_the_identical_dataset_with_references(series, factory,
                                                                          tmp_path,
                                                                          user_probe, capfd):
    folder = _copy_series(series, tmp_path / "kill")
    make = _load_factory(factory)
    for step in (2000, 3000):
        torch.save(_trained_state(make, step), folder / f"step{step}.pt")
    module = tmp_path / "user_probes.py"
    module.write_text(USER_MODULE)
    output = tmp_path / "killed.nc"
    parts = tmp_path / "killed.nc.parts"
    cmd = [sys.executable, "-m", "traindyn.dynamics.cli_analyze", str(folder), "--model", factory,
           "--layers", ",".join(LINEAR), "--batch-size", "500", "--probe-labels", "digits",
           "--probes", ",".join(PROBE_SET), "--probe-kwargs", json.dumps(PROBE_KWARGS),
           "--import", str(module), "--output", str(output),
           "--no-progress", "--no-figures"]
    start_and_kill(cmd, parts, 2, child_env(TRAINDYN_TEST_DELAY="0.15", OMP_NUM_THREADS="1"))
    assert not output.exists()
    assert list(parts.glob("step*.npz")), "reference states are stored beside the parts"
    capfd.readouterr()
    resumed = _run(folder, factory, output=output, imports=[str(module)])
    reused = re.search(r"reusing (\d+) of 6 ", capfd.readouterr().err)
    assert reused and int(reused.group(1)) >= 2      # the parts the killed run finished
    whole = _run(folder, factory)
    drop = list(TIMING_VARIABLES)
    xr.testing.assert_identical(resumed.drop_vars(drop).drop_attrs(),
                                whole.drop_vars(drop).drop_attrs())


def test_resume_reuses_only_what_is_unchanged_and_says_so(series, factory, tmp_path, capfd):
    folder = _copy_series(series, tmp_path / "resume")
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, digits_inputs().numpy()[:300])
    labels = tmp_path / "labels.npy"
    np.save(labels, digits_labels().numpy()[:300])
    source = Path(factory.rpartition(":")[0])
    model_file = tmp_path / "model.py"
    model_file.write_text(source.read_text())
    kw = dict(model=f"{model_file}:make_mlp", layers=LINEAR, probe_data=str(inputs),
              probe_labels=str(labels), probes=["rankme", "neural_collapse"], progress=False,
              output=tmp_path / "out.nc")
    first = analyze(folder, **kw)
    capfd.readouterr()
    again = analyze(folder, **kw)
    err = capfd.readouterr().err
    assert "reusing 4 of 4" in err, err
    xr.testing.assert_identical(first.drop_vars(list(TIMING_VARIABLES)),
                                again.drop_vars(list(TIMING_VARIABLES)))
    # the probe inputs change in content, not in name: everything is computed again
    np.save(inputs, -digits_inputs().numpy()[:300])
    changed = analyze(folder, **kw)
    err = capfd.readouterr().err
    assert "reusing 0 of 4" in err and "probe inputs" in err, err
    assert not np.allclose(changed["rankme"].values, first["rankme"].values)
    # the model code changes (a comment is enough to be safe): recomputed, and said
    model_file.write_text(model_file.read_text() + "\n# edited\n")
    analyze(folder, **kw)
    err = capfd.readouterr().err
    assert "model code" in err, err
    # a checkpoint replaced by one with the same size and modification time
    path = folder / "step100.pt"
    st = path.stat()
    make = _load_factory(factory)
    torch.save(_trained_state(make, 5), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    analyze(folder, **kw)
    err = capfd.readouterr().err
    assert "reusing 3 of 4" in err and "checkpoint content" in err, err


def test_output_problems_are_found_before_any_checkpoint(series, factory, tmp_path, capsys,
                                                         monkeypatch):
    import traindyn.dynamics.analyze as mod

    calls = []
    monkeypatch.setattr(mod, "analyze_checkpoint", lambda *a, **k: calls.append(1))
    (tmp_path / "a_dir.nc").mkdir()
    (tmp_path / "a_file").write_text("x")
    for bad, message in ((tmp_path / "a_dir.nc", "directory"),
                         (tmp_path / "a_file" / "out.nc", "cannot write"),
                         (tmp_path / "out.csv", "must end in")):
        with pytest.raises(OutputError, match=message):
            analyze(series, model=factory, layers=LINEAR, output=bad, progress=False)
        code = cli_main([str(series), "--model", factory, "--layers", "net.0", "--output",
                         str(bad), "--no-progress"])
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert calls == []


def test_results_are_readable_by_colleagues(series, factory, tmp_path):
    old = os.umask(0o022)
    try:
        output = tmp_path / "shared.nc"
        analyze(series, model=factory, layers=["net.0"], probes=["rankme"], output=output,
                progress=False)
    finally:
        os.umask(old)
    for path in [output, *sorted((tmp_path / "shared.nc.parts").iterdir())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_usage_errors_for_impossible_requests(series, factory, capsys):
    assert cli_main([str(series), "--model", factory, "--layers", "net.0", "--n-samples", "0",
                     "--no-progress"]) == 2
    assert "n_samples must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main([str(series), "--model", factory, "--layers", "net.0", "--device",
                         "cuda", "--no-progress"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_series_figures_say_what_they_show(tmp_path, monkeypatch):
    """One checkpoint: drawn over the layers, not a one-point step axis; an all-NaN layer is
    named in the title and left out of the legend."""
    from matplotlib.figure import Figure
    from traindyn.dynamics import records as rec
    from traindyn.dynamics.plot import checkpoint_series_figures

    seen = []

    def record(fig, path, **kw):
        if not str(path).endswith("_rankme.png"):    # the run overview is drawn too
            return
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen.append((ax.get_xlabel(), ax.get_title(),
                     [t.get_text() for t in legend.get_texts()] if legend else []))

    monkeypatch.setattr(Figure, "savefig", record)
    values = np.array([[1.0, 2.0, np.nan], [1.5, 2.5, np.nan], [2.0, 3.0, np.nan]])

    def series(steps):
        n = len(steps)
        return xr.Dataset({"rankme": (("step", "layer"), values[:n], {"long_name": "RankMe",
                                                                      "units": "1"}),
                           "status": ("step", np.array(["ok"] * n, dtype=object))},
                          coords={**rec.step_coords(steps, None), "layer": ["a", "b", "c"]})

    checkpoint_series_figures(series([0, 10, 100]), tmp_path)
    xlabel, title, legend = seen[-1]
    assert xlabel.startswith("step") and legend == ["a", "b"] and "all NaN: c" in title
    checkpoint_series_figures(series([100]), tmp_path)
    xlabel, title, legend = seen[-1]
    assert xlabel.startswith("layer (one checkpoint: step 100)")
