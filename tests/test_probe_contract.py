"""The probe contract (probes.registry, probes.evaluation): one declaration, every place.

The same probe set — spectral (shared accumulator), neural collapse (labelled, shared class
statistics), weight spectra (parameters), a user-registered probe and a user reference probe —
gives the same numbers through the Monitor in each of its three modes, through ``analyze``
over checkpoints, and through direct calls of the plain functions; the references here are
those direct calls and float64 numpy written in this file.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.dynamics.monitor import Monitor
from traindyn.probes.evaluation import ProbePlan, ReferenceBook, evaluate
from traindyn.probes.registry import PROBES, Probe, Variable, get_probe, register

from tests._tiny_models import Wrapped, mlp
from tests.helpers import ROOT, assert_rel, child_env
from traindyn import probes

LAYERS = ["net.0", "net.2"]   # the two Linear layers: features and a weight each


# ---------------------------------------------------------------- a user's own probes
def mean_abs(features):
    """Mean absolute activation (the user's plain function)."""
    return float(torch.as_tensor(features).double().abs().mean())


def weight_state(weight):
    """A parameter reference probe: keeps the weight, reports its norm."""
    w = torch.as_tensor(weight).double()
    return {"weight_norm_test": float(w.norm())}, w.cpu().numpy()


def weight_compare(state, reference):
    out = {}
    for kind in ("first", "previous"):
        ref = reference.get(kind)
        out[f"weight_distance_{kind}"] = (float("nan") if ref is None
                                          else float(np.linalg.norm(state - ref)))
    return out


MEAN_ABS = Probe("mean_abs_test", "features", {"mean_abs_test": Variable("mean |h|")},
                 "a test of the contract", fn=mean_abs)
WEIGHT_MOTION = Probe(
    "weight_motion_test", "parameters",
    {"weight_norm_test": Variable("||W||_F"),
     "weight_distance_first": Variable("||W - W_first||_F"),
     "weight_distance_previous": Variable("||W - W_previous||_F")},
    "a test of the contract", fn=weight_state, reference=("first", "previous"),
    compare=weight_compare)


@pytest.fixture()
def user_probes():
    register(MEAN_ABS)
    register(WEIGHT_MOTION)
    yield
    PROBES.pop(MEAN_ABS.name, None)
    PROBES.pop(WEIGHT_MOTION.name, None)


def _mlp(seed: int = 0) -> nn.Module:
    """12 → 24 → 16 → 3 with Tanh, layers under ``net.``."""
    return Wrapped(mlp(12, 24, 16, 3, act="tanh", seed=seed))


def _data(n: int = 90):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=g)
    y = torch.arange(n) % 3
    return x, y


def _direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Every variable by direct calls of the plain functions, layer by layer."""
    from traindyn.probes.spectral import alpha_req_fit
    from traindyn.probes.weights import weight_spectrum

    net = model.net
    with torch.no_grad():
        h0 = net[0](x)
        h2 = net[2](net[1](h0))
    out: dict[str, list] = {}
    for h, layer in ((h0, net[0]), (h2, net[2])):
        fit = alpha_req_fit(h, fit_range=(2, 8))
        row = {"rankme": probes.rankme(h), "alpha_req": fit.alpha, "alpha_req_r2": fit.r2,
               "mean_abs_test": mean_abs(h)}
        nc = probes.neural_collapse(h, y)
        row.update({k: float(v) for k, v in nc.data_vars.items()})
        row.update({f"weight_{k}": v for k, v in weight_spectrum(layer.weight).items()})
        row["weight_norm_test"] = float(layer.weight.detach().double().norm())
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return {k: np.array(v, dtype=float) for k, v in out.items()}


PROBE_SET = ["rankme", "alpha_req", "neural_collapse", "weight_spectra", "mean_abs_test",
             "weight_motion_test"]


def _check(values: dict[str, np.ndarray], direct: dict[str, np.ndarray], where: str) -> None:
    assert set(direct) <= set(values), f"{where}: missing {sorted(set(direct) - set(values))}"
    for name, expected in direct.items():
        got = np.asarray(values[name], dtype=float)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), f"{where} {name}")
        finite = ~np.isnan(expected)
        assert_rel(got[finite], expected[finite], 1e-9, f"{where} {name}")


@pytest.mark.parametrize("mode", [False, "thread", "process"])
def test_monitor_modes_equal_direct_calls(user_probes, mode):
    x, y = _data()
    model = _mlp()
    direct0 = _direct(model, x, y)
    monitor = Monitor(model, probes=PROBE_SET, layers=LAYERS, probe_data=x, probe_labels=y,
                      schedule=lambda s: True, background=mode,
                      probe_kwargs={"alpha_req": {"fit_range": (2, 8)}})
    w_first = [model.net[0].weight.detach().double().clone(),
               model.net[2].weight.detach().double().clone()]
    with monitor:
        monitor.step(0)
        with torch.no_grad():  # "training": move the weights
            for p in model.parameters():
                p.mul_(1.1)
        monitor.step(1)
    ds = monitor.to_dataset()
    direct1 = _direct(model, x, y)
    for i, direct in enumerate((direct0, direct1)):
        _check({k: ds[k].values[i] for k in ds.data_vars if ds[k].dims == ("step", "layer")},
               direct, f"{mode} step {i}")
    # the reference probe: first evaluation has no previous; the second moved by ~0.1·W
    assert np.all(np.isnan(ds["weight_distance_previous"].values[0]))
    w_now = [model.net[0].weight.detach().double(), model.net[2].weight.detach().double()]
    expected = [float((b - a).norm()) for a, b in zip(w_first, w_now, strict=True)]
    assert_rel(expected, [0.1 * float(w.norm()) for w in w_first], 1e-6, "the weights moved")
    assert_rel(ds["weight_distance_previous"].values[1], expected, 1e-12, mode)
    assert_rel(ds["weight_distance_first"].values[1], expected, 1e-12, mode)
    assert ds["mean_abs_test"].attrs["source"] == "a test of the contract"
    assert ds["nc1"].attrs["long_name"].startswith("NC1")


def test_one_evaluate_call_equals_direct_calls_and_keeps_references(user_probes):
    x, y = _data()
    model = _mlp(3)
    plan = ProbePlan(PROBE_SET, LAYERS, {"alpha_req": {"fit_range": (2, 8)}})
    book = ReferenceBook(plan)
    batches = list(x.split(32))
    first = evaluate(plan, model, batches, labels=list(y.split(32)), references=book)
    _check({k: [v[layer] for layer in LAYERS] for k, v in first.layer_values.items()},
           _direct(model, x, y), "evaluate")
    assert set(first.states) == {("weight_motion_test", "net.0"), ("weight_motion_test", "net.2")}
    assert book.get(("weight_motion_test", "net.0"), "first") is first.states[
        ("weight_motion_test", "net.0")]


def test_plan_declares_dims_and_refuses_what_it_cannot_do(user_probes):
    plan = ProbePlan(PROBE_SET, LAYERS)
    variables = plan.variables()
    assert variables["rankme"][0] == ("layer",)
    assert variables["nc1"][0] == ("layer",) and variables["weight_alpha"][0] == ("layer",)
    # spectral probes share one accumulator; neural collapse its class statistics
    assert plan.accumulator_names == ["spectrum", "class_stats"]
    assert plan.needs_labels
    with pytest.raises(KeyError, match="unknown probe 'rankmee'"):
        ProbePlan(["rankmee"])
    with pytest.raises(ValueError, match="listed twice"):
        ProbePlan(["rankme", "rankme"])
    with pytest.raises(KeyError, match="not in the plan"):
        ProbePlan(["rankme"], probe_kwargs={"alpha_req": {}})
    final = Probe("final_test", "features", {"final_test": Variable("x")}, "t",
                  fn=lambda f: ({}, 0), reference=("final",), compare=lambda s, r: {})
    with pytest.raises(ValueError, match="final checkpoint"):
        ReferenceBook(ProbePlan([final], ["a"]))
    with pytest.raises(ValueError, match="consumes"):
        Probe("bad", "pixels", {"bad": Variable("x")}, "t", fn=mean_abs)
    with pytest.raises(ValueError, match="needs compare"):
        Probe("bad", "features", {"bad": Variable("x")}, "t", fn=mean_abs,
              reference=("first",))


def test_undeclared_variables_are_refused(user_probes):
    liar = Probe("liar_test", "features", {"liar_test": Variable("x")}, "t",
                 fn=lambda f: {"something_else": 1.0})
    x, _ = _data()
    plan = ProbePlan([liar], LAYERS)
    with pytest.raises(ValueError, match="undeclared variables"):
        plan.layer_values(plan.accumulate({"net.0": x, "net.2": x}))


def test_user_probe_runs_in_a_sweep_on_worker_processes(tmp_path):
    """A Probe object travels by value to a dask worker process that never imported it."""
    pytest.importorskip("distributed")
    from traindyn.dynamics import local_client, sweep
    from traindyn.dynamics.recipes import train_digits_mlp

    with local_client(1) as client:
        ds = sweep(train_digits_mlp, {"learning_rate": [0.05]}, seeds=[0],
                   fixed=dict(widths=(16,), steps=4, n_evals=2,
                              probes=("rankme", MEAN_ABS)), client=client)
    serial = train_digits_mlp(widths=(16,), steps=4, n_evals=2, probes=("rankme", MEAN_ABS),
                              learning_rate=0.05, seed=0)
    got = ds["mean_abs_test"].squeeze(["learning_rate", "seed"], drop=True).values
    np.testing.assert_array_equal(got, serial["mean_abs_test"].values)
    assert np.all(got > 0)


def test_registry_imports_no_probe_module_and_probes_import_is_light():
    code = ("import sys; import traindyn.probes.registry as r; "
            "bad = [m for m in ('traindyn.probes.spectral', 'traindyn.probes.ntk', 'torch', "
            "'sympy') "
            "if m in sys.modules]; assert not bad, bad; "
            "import traindyn.probes; assert 'sympy' not in sys.modules; "
            "p = r.get_probe('rankme'); assert p.accumulator == 'spectrum'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=child_env())


def test_every_builtin_probe_declares_what_records_knows():
    """Where a probe and the records vocabulary both name a variable, they agree on units."""
    from traindyn.dynamics import records
    from traindyn.probes.registry import all_probes

    for probe in all_probes().values():
        for name, var in probe.variables.items():
            if name in records.VARIABLES:
                assert records.VARIABLES[name]["units"] == var.units, (probe.name, name)
    assert get_probe("weight_spectra").consumes == "parameters"


def test_importing_a_submodule_keeps_the_export_of_the_same_name():
    """``import traindyn.probes.inductive_bias`` keeps ``probes.inductive_bias`` the function."""
    code = ("import types, traindyn.probes.inductive_bias, traindyn.probes.capture; "
            "from traindyn import probes; "
            "assert not isinstance(probes.inductive_bias, types.ModuleType); "
            "assert not isinstance(probes.capture, types.ModuleType); "
            "from traindyn.probes.inductive_bias import kernel_hypothesis_errors")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=child_env())


@pytest.mark.parametrize("mode", [False, "thread"])
def test_model_and_parameter_probes_on_their_own_schedule(user_probes, mode):
    x, y = _data()
    model = _mlp(5)
    monitor = Monitor(model, probes=["rankme", "weight_spectra", "weight_motion_test"],
                      layers=LAYERS, probe_data=x, schedule=lambda s: s % 2 == 0,
                      model_schedule=lambda s: s % 3 == 0, background=mode)
    with monitor:
        for step in range(7):
            monitor.step(step)
    ds = monitor.to_dataset()
    assert list(ds.step.values) == [0, 2, 3, 4, 6]          # either schedule due
    rank_due = ~np.isnan(ds["rankme"].values[:, 0])
    weight_due = ~np.isnan(ds["weight_spectral_norm"].values[:, 0])
    np.testing.assert_array_equal(rank_due, [True, True, False, True, True])
    np.testing.assert_array_equal(weight_due, [True, False, True, False, True])
    # the weights did not move: distances to the first/previous evaluation of the weights are 0
    assert np.all(ds["weight_distance_previous"].values[[2, 4]] == 0)
    w = model.net[0].weight.detach().double()
    assert_rel(ds["weight_spectral_norm"].values[0, 0],
               float(torch.linalg.matrix_norm(w, ord=2)), 1e-12, "spectral norm")



def test_monitor_kernel_velocity_uses_the_time_between_model_evaluations():
    x, y = _data(40)
    model = _mlp(7)
    monitor = Monitor(model, probes=["ntk"], probe_data=x, probe_labels=y, learning_rate=0.5,
                      schedule=lambda s: s in (0, 4), probe_kwargs={"ntk": {"max_samples": 16}})
    with monitor:
        monitor.step(0)
        with torch.no_grad():
            model.net[0].weight.mul_(1.3)
        monitor.step(4)
    ds = monitor.to_dataset()
    assert ds["ntk_distance_previous"].values[1] > 0
    assert_rel(ds["ntk_velocity"].values[1], ds["ntk_distance_previous"].values[1] / 2.0,
               1e-12, "velocity = distance / (0.5 × 4)")


def test_a_direct_call_of_a_probe_answering_on_the_device_returns_values():
    """Calling a registered probe reads what it left on the device (a Pending, alone or in
    its (values, state) pair); ProbePlan calls ``fn`` and reads every probe's values at once.
    The CKA reference probe's state is the float64 features (hand check)."""
    import numpy as np
    import torch
    from traindyn.probes._pending import Pending
    from traindyn.probes.registry import get_probe

    x = torch.randn(12, 5)
    probe = get_probe("cka_first")
    assert isinstance(probe.fn(x), Pending)
    values, state = probe(x)
    assert values == {}
    (kept,) = state.values()
    np.testing.assert_array_equal(kept, x.double().numpy())


# ---------------------------------------------------------------- names, inputs, NaN
def test_a_taken_name_or_variable_is_refused_unless_replace(user_probes):
    impostor = Probe("rankme", "features", {"rankme": Variable("not RankMe")}, "t",
                     fn=mean_abs)
    with pytest.raises(ValueError, match=r"'rankme' is already registered.*replace=True"):
        register(impostor)
    thief = Probe("my_rank_test", "features", {"rankme": Variable("x")}, "t", fn=mean_abs)
    with pytest.raises(ValueError, match=r"probe 'rankme' already declares \['rankme'\]"):
        register(thief)
    x = torch.randn(40, 6, dtype=torch.float64)
    assert get_probe("rankme")(x) == pytest.approx(probes.rankme(x), rel=1e-12)
    with pytest.raises(ValueError, match="coordinate names"):
        Probe("steps_test", "features", {"step": Variable("x")}, "t", fn=mean_abs)
    register(MEAN_ABS)  # the same object again: a no-op
    # two unregistered probes declaring one variable cannot share a plan either
    twin = Probe("twin_test", "features", {"mean_abs_test": Variable("x")}, "t", fn=mean_abs)
    with pytest.raises(ValueError, match="both declare the variable 'mean_abs_test'"):
        ProbePlan([MEAN_ABS, twin], ["a"])
    # replace=True replaces, and removes the probe whose variable it takes
    saved = dict(PROBES)
    try:
        register(Probe("mean_abs_test", "features", {"mean_abs_test": Variable("y")}, "t2",
                       fn=mean_abs), replace=True)
        assert get_probe("mean_abs_test").source == "t2"
        register(twin, replace=True)
        assert "mean_abs_test" not in PROBES and PROBES["twin_test"] is twin
    finally:
        PROBES.clear()
        PROBES.update(saved)


def _zeroing(features):
    """A careless probe: edits its input in place."""
    features[:] = 0.0
    return 0.0


def test_a_probe_that_writes_its_input_is_named_before_the_next_probe_reads_it():
    careless = Probe("zeroing_test", "features", {"zeroing_test": Variable("x")}, "t",
                     fn=_zeroing)
    x = torch.randn(30, 12)
    model = _mlp()
    plan = ProbePlan([careless, MEAN_ABS], ["net.0"])
    with pytest.raises(RuntimeError, match=r"probe 'zeroing_test' modified its input of "
                                           r"layer 'net.0' in place"):
        evaluate(plan, model, [x])
    # numpy features (the worker process's) are guarded the same way
    feats = {"net.0": model.net[0](x).detach().numpy().copy()}
    with pytest.raises(RuntimeError, match="'zeroing_test' modified its input"):
        plan.layer_values(plan.accumulate(feats))
    # a probe that copies first is fine, and the next probe reads the untouched features
    polite = Probe("zeroing_test", "features", {"zeroing_test": Variable("x")}, "t",
                   fn=lambda f: _zeroing(f.clone()))
    out = evaluate(ProbePlan([polite, MEAN_ABS], ["net.0"]), model, [x])
    with torch.no_grad():
        assert_rel(out.layer_values["mean_abs_test"]["net.0"], mean_abs(model.net[0](x)),
                   1e-12, "mean |h| after a polite probe")
    # a parameter probe writing the layer's weight would change the model itself
    scaling = Probe("scaling_test", "parameters", {"scaling_test": Variable("x")}, "t",
                    fn=lambda w: float(w.mul_(2.0).sum()))
    with pytest.raises(RuntimeError, match="'scaling_test' modified its input"):
        ProbePlan([scaling], ["net.0"]).parameter_values(model)


def test_monitor_scalars_named_like_a_probe_variable_are_refused(user_probes):
    x, _ = _data()
    monitor = Monitor(_mlp(), probes=["rankme", "mean_abs_test"], layers=LAYERS, probe_data=x,
                      schedule=lambda s: True)
    with pytest.raises(ValueError, match=r"'rankme' \(a variable of probe 'rankme'\)"):
        monitor.step(0, rankme=3.0)
    with pytest.raises(ValueError, match="'layer' \\(a coordinate\\)"):
        monitor.step(0, layer=1.0)
    monitor.step(0, train_loss=1.0)   # other names are recorded as before
    ds = monitor.to_dataset()
    with torch.no_grad():
        h0 = _mlp().net[0](x)
    assert_rel(ds["rankme"].sel(layer="net.0").item(), probes.rankme(h0), 1e-9, "rankme")
    assert ds["train_loss"].item() == 1.0


def _silent_nan(features):
    return float("nan")


def test_a_probe_returning_nan_without_a_reason_gets_a_note_naming_it_and_the_layer():
    silent = Probe("silent_nan_test", "features", {"silent_nan_test": Variable("x")}, "t",
                   fn=_silent_nan)
    x = torch.randn(30, 12)
    out = evaluate(ProbePlan([silent, "rankme"], LAYERS), _mlp(), [x])
    for layer in LAYERS:
        assert np.isnan(out.layer_values["silent_nan_test"][layer])
        assert any("probe 'silent_nan_test' returned NaN" in n and repr(layer) in n
                   for n in out.layer_notes[layer]), out.layer_notes
    assert not any("'rankme'" in n for n in out.notes)
    # the Monitor, whose Dataset has no notes, raises it as a warning
    monitor = Monitor(_mlp(), probes=[silent], layers=["net.0"], probe_data=x,
                      schedule=lambda s: True)
    with pytest.warns(RuntimeWarning, match=r"step 0: layer 'net.0': probe 'silent_nan_test' "
                                            "returned NaN"):
        monitor.step(0)


def test_evaluate_measures_in_eval_mode_and_restores_the_training_flags():
    """Reference: the features of a plain forward pass in eval mode, by hand (Dropout off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Dropout(0.5), nn.Linear(24, 8))
    x = torch.randn(40, 12)
    out = evaluate(ProbePlan(["rankme"], ["1"]), model.train(), [x])
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        eval_features = model[0](x)          # Dropout is the identity in eval mode
    assert_rel(out.layer_values["rankme"]["1"], probes.rankme(eval_features), 1e-9,
               "evaluate in eval mode")
