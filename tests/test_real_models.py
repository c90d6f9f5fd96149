"""Real-model conformance: every registered per-layer probe, on real architectures, through
every path that measures it, against a reference written here.

Models (``tests/_zoo.py``): torchvision's ResNet-18 and VGG-11 (in-place ReLUs, a ``relu``
called twice per block, ``out += identity`` over BatchNorm's output, Dropout), a ViT, GPT-2 and
BERT from ``transformers`` configurations, an MLP with in-place ReLUs and Dropout, and a model
with a module called twice.  All in float64 with random weights, in train mode as a training
loop leaves them.

Reference: a plain forward pass in eval mode whose hooks (written here, independent of
``probes.capture``) record each layer's output *by value* — ``.clone()`` in float64 inside the
hook, before any later in-place operation — reduced by hand (flatten, [CLS], masked mean);
then each probe's own math (its ``fn``, and ``compare`` against the states of the first /
previous / final evaluation) on those features.  Parameter probes: their function on the
layer's weight.  The NTK: a kernel from brute-force float64 Jacobians (one
``torch.autograd.grad`` per output entry), summarised by formulas written here.

Paths: ``capture`` (the hook capture, then the same math), ``evaluate``
(``probes.evaluation.evaluate`` over two evaluations), the ``Monitor`` (synchronous, thread,
process) over two steps, and ``analyze`` over a folder of two checkpoints.  The probe list is
read from the registry, so a new probe is checked by being registered, and a new model by
being added to the zoo.

The Monitor evaluates in eval mode (Dropout off, BatchNorm on its running statistics) and
restores the training flags and buffers afterwards (``dynamics.monitor.preserved_state``):
tested below on every zoo model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics.monitor import Monitor
from traindyn.probes._pending import read_answer
from traindyn.probes.capture import capture
from traindyn.probes.evaluation import ProbePlan, ReferenceBook, evaluate
from traindyn.probes.registry import Probe, all_probes

from tests._zoo import ZOO, Entry

N_SAMPLES = {"resnet18": 16, "vgg11": 8}
"""Probe-batch size per model (others: 48)."""

CLASSES = 4
STEPS = (0, 1)

PER_LAYER: list[Probe] = [p for p in all_probes().values() if p.per_layer]
"""Every registered per-layer probe (features, labelled features, parameters)."""

RTOL = 1e-7
"""Relative tolerance: float64 throughout; paths differ in summation order and in computing
from the streamed second moment (``X^T X``) instead of ``X``, whose eigenvalues near zero carry
round-off of order ``eps·λ_max``."""

ATOL_FRACTION = 1e-9
"""Absolute floor, as a fraction of the largest magnitude of that variable in the series."""

REPORT: dict[tuple[str, str, str], float] = {}
"""(model, probe, path) → worst relative difference seen; printed by the last test."""


# ---------------------------------------------------------------- the reference
def _tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.last_hidden_state


def _reduce(t: torch.Tensor, rule: str, mask: torch.Tensor | None) -> torch.Tensor:
    """The token reductions, written out: flatten, first token, masked mean over tokens."""
    if t.ndim == 2:
        return t
    if rule == "flatten":
        return t.reshape(t.shape[0], -1)
    if rule == "cls":
        return t[:, 0]
    assert rule == "mean"
    m = torch.ones(t.shape[:2], dtype=t.dtype) if mask is None else mask.to(t.dtype)
    return (t * m[..., None]).sum(1) / m.sum(1, keepdim=True)


def _call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def reference_features(model: nn.Module, x: Any, layers: list[str], rule: str,
                       mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each layer's output by value: cloned in float64 inside its own hook."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [modules[name].register_forward_hook(
        lambda m, i, o, name=name: seen[name].append(_tensor(o).detach().clone().double()))
        for name in layers]
    try:
        with torch.no_grad():
            _call(model, x)
    finally:
        for h in handles:
            h.remove()
    assert all(len(v) == 1 for v in seen.values()), {k: len(v) for k, v in seen.items()}
    return {name: _reduce(v[0], rule, mask) for name, v in seen.items()}


def _as_dict(probe: Probe, value: Any) -> dict[str, Any]:
    if isinstance(value, xr.Dataset):
        value = {k: v.values for k, v in value.data_vars.items()}
    if not isinstance(value, Mapping):
        value = {probe.name: value}
    out = {}
    for k, v in value.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().double().numpy()
        out[k] = np.asarray(getattr(v, "values", v), dtype=float)
    return out


def probe_math(probe: Probe, inputs: list[tuple], times: list[float] | None = None
               ) -> list[dict[str, np.ndarray]]:
    """``probe``'s values at each evaluation, from its own functions on ``inputs[t]`` (the
    arguments of ``fn``), references taken from the states of this series."""
    values, states = [], []
    for args in inputs:
        result = probe(*args)
        if probe.reference:
            result, state = result
            states.append(state)
        values.append(_as_dict(probe, result))
    if probe.reference:
        wants_times = "times" in inspect.signature(probe.compare).parameters
        for t, state in enumerate(states):
            refs = {"first": states[0], "previous": states[t - 1] if t else None,
                    "final": states[-1]}
            kw = dict(probe.kwargs)
            if wants_times:
                kw["times"] = {"current": None if times is None else times[t],
                               "first": None if times is None else times[0],
                               "previous": None if times is None or not t else times[t - 1]}
            answer = read_answer(probe.compare(state, {k: refs[k] for k in probe.reference},
                                               **kw))
            values[t].update(_as_dict(probe, answer))
    return values


# ---------------------------------------------------------------- the series
class Series:
    """A zoo model at two steps (state dicts), its probe batch, labels, and the reference
    values of every per-layer probe at both steps (eval mode)."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        n = N_SAMPLES.get(entry.name, 48)
        model = entry.build(seed=0)
        x = entry.inputs(n, 1)
        self.x = x
        self.mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        self.labels = torch.arange(n) % CLASSES
        with torch.no_grad():        # "training" moved the BatchNorm statistics off (0, 1)
            _call(model, entry.inputs(n, 2))
        self.states = []
        gen = torch.Generator().manual_seed(5)
        for _ in STEPS:
            self.states.append({k: v.clone() for k, v in model.state_dict().items()})
            with torch.no_grad():    # the next step's weights
                for p in model.parameters():
                    scale = float(p.std()) if p.numel() > 1 else 0.0
                    p.add_(0.2 * scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        self.layers = list(entry.layers)
        self.features = []
        self.weights = []
        for t in range(len(STEPS)):
            m = self.model(t).eval()
            self.features.append(reference_features(m, x, self.layers, entry.reduce,
                                                    self.mask))
            modules = dict(m.named_modules())
            self.weights.append({name: getattr(modules[name], "weight", None)
                                 for name in self.layers})
        self.values = {probe.name: self._values(probe) for probe in PER_LAYER}

    def model(self, t: int, train: bool = True) -> nn.Module:
        m = self.entry.build(seed=0)
        m.load_state_dict(self.states[t])
        return m.train(train)

    def _values(self, probe: Probe) -> dict[str, dict[str, np.ndarray]]:
        """``{variable: {layer: values over steps}}`` by the probe's math."""
        out: dict[str, dict[str, list]] = {}
        for layer in self.layers:
            if probe.consumes == "parameters":
                w = [self.weights[t][layer] for t in range(len(STEPS))]
                if w[0] is None or w[0].ndim < 2:
                    continue  # no weight matrix: the paths give NaN (with a warning)
                args = [(wt.detach().double(),) for wt in w]
            elif probe.needs_labels:
                args = [(f[layer], self.labels) for f in self.features]
            else:
                args = [(f[layer],) for f in self.features]
            for t, vals in enumerate(probe_math(probe, args, [float(s) for s in STEPS])):
                for var, v in vals.items():
                    out.setdefault(var, {}).setdefault(layer, [None] * len(STEPS))[t] = v
        return {var: {layer: np.array(v, dtype=float) for layer, v in per.items()}
                for var, per in out.items()}


_SERIES: dict[str, Series] = {}


def series(name: str) -> Series:
    if name not in _SERIES:
        _SERIES[name] = Series(ZOO[name])
    return _SERIES[name]


def compare(s: Series, got: Mapping[str, Any], path: str,
            probes: list[Probe] | None = None) -> int:
    """Compare ``got[variable]`` (an array over (step, layer) or a callable ``(variable,
    layer) -> values over steps``) with the reference of every probe; return the number of
    (probe) comparisons made and record the worst relative difference."""
    count = 0
    for probe in probes or PER_LAYER:
        worst = 0.0
        for var, per_layer in s.values[probe.name].items():
            scale = max(float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 0.0
                        for v in per_layer.values())
            for layer, expected in per_layer.items():
                actual = np.asarray(got(var, layer), dtype=float)
                where = f"{s.entry.name} {path} {probe.name}/{var} layer {layer}"
                assert actual.shape == expected.shape, where
                np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), where)
                ok = ~np.isnan(expected)
                diff = np.abs(actual[ok] - expected[ok])
                bound = RTOL * np.abs(expected[ok]) + ATOL_FRACTION * scale
                assert np.all(diff <= bound), (
                    f"{where}: {actual[ok]} vs {expected[ok]} (rel "
                    f"{np.max(diff / np.maximum(np.abs(expected[ok]), 1e-300)):.2e})")
                if ok.any():
                    rel = diff / np.maximum(np.abs(expected[ok]), ATOL_FRACTION * scale or 1e-300)
                    worst = max(worst, float(rel.max()))
        key = (s.entry.name, probe.name, path)
        REPORT[key] = max(REPORT.get(key, 0.0), worst)
        count += 1
    return count


def _from_dataset(ds: xr.Dataset):
    def get(var: str, layer: str) -> np.ndarray:
        return ds[var].sel(layer=layer).values
    return get


def _monitor_probes(analysis: bool = False) -> list[Probe]:
    """The Monitor cannot know the final evaluation during a run."""
    return [p for p in PER_LAYER if analysis or "final" not in p.reference]


# ---------------------------------------------------------------- paths
FAST = ["resnet18", "vgg11", "vit", "gpt2", "bert", "mlp", "shared"]


@pytest.mark.parametrize("name", FAST)
def test_capture_and_evaluate_equal_the_by_value_reference(name):
    s = series(name)
    feats = []
    for t in range(len(STEPS)):
        model = s.model(t).eval()
        with capture(model, s.layers, reduce=s.entry.reduce) as cap, torch.no_grad():
            cap.attention_mask = s.mask
            _call(model, s.x)
        feats.append({layer: cap[layer] for layer in s.layers})
        for layer in s.layers:
            torch.testing.assert_close(feats[-1][layer], s.features[t][layer], rtol=0, atol=0)
    # the evaluation path (shared accumulators, references) over the two steps
    plan = ProbePlan(_monitor_probes(), s.layers)
    book = ReferenceBook(plan)
    measured = []
    for t in range(len(STEPS)):
        measured.append(evaluate(plan, s.model(t).eval(), [s.x], labels=[s.labels],
                                 reduce=s.entry.reduce, masks=[s.mask], references=book,
                                 time=float(STEPS[t])))

    def get(var: str, layer: str) -> np.ndarray:
        return np.array([m.layer_values[var].get(layer, np.nan) for m in measured], dtype=float)
    compare(s, get, "evaluate", _monitor_probes())


def checkpoint_folder(s: Series, tmp_path: Path) -> Path:
    """The series' states saved as ``run/step{N}.pt``, the folder ``analyze`` reads."""
    folder = tmp_path / "run"
    folder.mkdir()
    for t, step in enumerate(STEPS):
        torch.save(s.states[t], folder / f"step{step}.pt")
    return folder


def monitored_replay(s: Series, **monitor_kwargs: Any) -> xr.Dataset:
    """A synchronous Monitor over the series' states, one evaluation per recorded step."""
    model = s.model(0)
    monitor = Monitor(model, schedule=lambda step: True, **monitor_kwargs)
    with monitor:
        for t, step in enumerate(STEPS):
            model.load_state_dict(s.states[t])
            monitor.step(step)
    return monitor.to_dataset()


def _monitor_run(s: Series, mode: bool | str, probes: list[Probe]) -> xr.Dataset:
    model = s.model(0, train=True)
    x = s.x["input_ids"] if isinstance(s.x, Mapping) else s.x
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    monitor = Monitor(model, probes=probes, layers=s.layers, probe_data=x,
                      probe_labels=s.labels, reduce=s.entry.reduce, background=mode,
                      schedule=lambda step: True, learning_rate=1.0)
    with monitor:
        for t, step in enumerate(STEPS):
            if t:
                model.load_state_dict(s.states[t])
            monitor.step(step)
            # the Monitor measured in eval mode and left the model as it was
            assert all(m.training for m in model.modules())
            for k, v in model.named_buffers():
                ref = s.states[t][k] if t and k in s.states[t] else buffers[k]
                torch.testing.assert_close(v, ref, rtol=0, atol=0)
    return monitor.to_dataset()


def _text_without_mask(s: Series) -> Series | None:
    """The Monitor feeds ``model(tensor)``: text models get the ids alone (no padding mask),
    so their reference is the unmasked one."""
    if not isinstance(s.x, Mapping):
        return None
    key = s.entry.name + ":ids"
    if key not in _SERIES:
        clone = object.__new__(Series)
        clone.__dict__.update(s.__dict__)
        clone.x, clone.mask = s.x["input_ids"], None
        clone.features = [reference_features(s.model(t).eval(), clone.x, s.layers,
                                             s.entry.reduce) for t in range(len(STEPS))]
        clone.values = {p.name: clone._values(p) for p in PER_LAYER}
        _SERIES[key] = clone
    return _SERIES[key]


@pytest.mark.parametrize("name", [n if n != "vgg11" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FAST])
def test_monitor_synchronous_equals_the_reference_in_eval_mode(name):
    s = series(name)
    s = _text_without_mask(s) or s
    ds = _monitor_run(s, False, _monitor_probes())
    compare(s, _from_dataset(ds), "monitor-sync", _monitor_probes())


@pytest.mark.parametrize("name", ["mlp", pytest.param("resnet18", marks=pytest.mark.slow),
                                  pytest.param("gpt2", marks=pytest.mark.slow)])
def test_monitor_thread_equals_the_reference(name):
    s = series(name)
    s = _text_without_mask(s) or s
    ds = _monitor_run(s, "thread", _monitor_probes())
    compare(s, _from_dataset(ds), "monitor-thread", _monitor_probes())


def test_monitor_process_equals_the_reference():
    s = series("mlp")
    ds = _monitor_run(s, "process", _monitor_probes())
    compare(s, _from_dataset(ds), "monitor-process", _monitor_probes())


def test_train_mode_features_differ_so_the_eval_mode_check_has_teeth():
    """In train mode Dropout and BatchNorm change the features: the eval-mode agreement above
    would fail if the Monitor measured in train mode."""
    for name, layer in (("mlp", "3"), ("resnet18", "layer4.0.bn1")):
        s = series(name)
        with torch.no_grad():
            train = reference_features(s.model(0, train=True), s.x, [layer], s.entry.reduce)
        gap = float((train[layer] - s.features[0][layer]).abs().max())
        assert gap > 1e-3 * float(s.features[0][layer].abs().max()), (name, gap)


ANALYZE = ["mlp", "resnet18", pytest.param("vgg11", marks=pytest.mark.slow),
           pytest.param("gpt2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", ANALYZE)
def test_analyze_over_a_checkpoint_folder_equals_the_reference(name, tmp_path):
    from traindyn.dynamics.analyze import analyze
    from traindyn.dynamics.probe_inputs import load_probe_inputs

    s = series(name)
    folder = checkpoint_folder(s, tmp_path)
    if isinstance(s.x, Mapping):      # text: analyze tokenises a text file (bytes)
        n = N_SAMPLES.get(name, 48)
        rng = np.random.default_rng(0)
        words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
        lines = [" ".join(rng.choice(words, size=rng.integers(2, 6))) for _ in range(n)]
        source = tmp_path / "lines.txt"
        source.write_text("\n".join(lines) + "\n")
        batch = load_probe_inputs(source, batch_size=n, tokenizer="bytes").batches[0]
        text = object.__new__(Series)
        text.__dict__.update(s.__dict__)
        text.x, text.mask = batch.inputs, batch.mask
        text.features = [reference_features(s.model(t).eval(), text.x, s.layers,
                                            s.entry.reduce, text.mask)
                         for t in range(len(STEPS))]
        text.values = {p.name: text._values(p) for p in PER_LAYER}
        s, inputs, extra = text, str(source), {"tokenizer": "bytes", "batch_size": n}
    else:
        inputs = tmp_path / "x.pt"
        torch.save(s.x, inputs)
        extra = {"batch_size": len(s.x)}
    labels = tmp_path / "y.pt"
    torch.save(s.labels, labels)
    ds = analyze(folder, model=f"tests._zoo:{name}", layers=s.layers, probe_data=str(inputs),
                 probe_labels=str(labels), probes=[p.name for p in PER_LAYER],
                 reduce=s.entry.reduce,
                 dtype="float64", learning_rate=1.0, progress=False, **extra)
    assert list(ds["status"].values) == ["ok"] * len(STEPS), ds["reason"].values
    compare(s, _from_dataset(ds), "analyze")


# ---------------------------------------------------------------- the NTK
def brute_ntk(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Output-traced NTK ``Θ_ij = Σ_a Σ_θ ∂f_ia/∂θ ∂f_ja/∂θ`` from one ``autograd.grad`` per
    output entry, float64 (Jacot, Gabriel, Hongler 2018)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    n, c = out.shape
    rows = []
    for i in range(n):
        for a in range(c):
            g = torch.autograd.grad(out[i, a], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    J = torch.stack(rows).reshape(n, c, -1)
    return torch.einsum("iap,jap->ij", J, J).detach().numpy()


def ntk_summary(K: np.ndarray, y: np.ndarray, K0: np.ndarray, Kprev: np.ndarray | None
                ) -> dict[str, float]:
    """The ntk probe's variables from their papers' formulas, in numpy."""
    Y = np.eye(int(y.max()) + 1)[y]
    L = Y @ Y.T
    n = len(y)
    H = np.eye(n) - 1.0 / n
    Kc, Lc = H @ K @ H, H @ L @ H
    lam = np.clip(np.linalg.eigvalsh(K), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    out = {
        "ntk_alignment": float((K * L).sum() / (np.linalg.norm(K) * np.linalg.norm(L))),
        "ntk_centered_alignment": float((Kc * Lc).sum()
                                        / (np.linalg.norm(Kc) * np.linalg.norm(Lc))),
        "ntk_effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "ntk_trace_mean": float(np.trace(K) / n),
        "ntk_relative_change": float(np.linalg.norm(K - K0) / np.linalg.norm(K0)),
        "ntk_distance_previous": float("nan") if Kprev is None else float(
            1 - (Kprev * K).sum() / (np.linalg.norm(Kprev) * np.linalg.norm(K))),
    }
    return out


@pytest.mark.parametrize("name", ["mlp", "shared"])
def test_ntk_through_the_monitor_and_analyze_equals_brute_force_jacobians(name, tmp_path):
    from traindyn.dynamics.analyze import analyze

    s = series(name)
    n = 12
    x, y = s.x[:n], s.labels[:n]
    kernels = [brute_ntk(s.model(t).eval(), x) for t in range(len(STEPS))]
    expected = [ntk_summary(K, y.numpy(), kernels[0], kernels[t - 1] if t else None)
                for t, K in enumerate(kernels)]
    ds_m = monitored_replay(s, probes=["ntk"], layers=[], probe_data=x, probe_labels=y,
                            learning_rate=1.0, probe_kwargs={"ntk": {"max_samples": n}})
    folder = checkpoint_folder(s, tmp_path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(y, tmp_path / "y.pt")
    ds_a = analyze(folder, model=f"tests._zoo:{name}", layers=s.layers[:1],
                   probe_data=str(tmp_path / "x.pt"), probe_labels=str(tmp_path / "y.pt"),
                   probes=["ntk"], probe_kwargs={"ntk": {"max_samples": n}}, dtype="float64",
                   learning_rate=1.0, batch_size=n, progress=False)
    for path, ds in (("monitor-sync", ds_m), ("analyze", ds_a)):
        worst = 0.0
        for var in expected[0]:
            got = ds[var].values
            want = np.array([e[var] for e in expected])
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), f"{path} {var}")
            ok = ~np.isnan(want)
            rel = np.abs(got[ok] - want[ok]) / np.maximum(np.abs(want[ok]), 1e-12)
            assert np.all(rel <= 1e-8), f"{name} {path} {var}: {got} vs {want}"
            worst = max(worst, float(rel.max()) if rel.size else 0.0)
        REPORT[(name, "ntk", path)] = worst
        velocity = ds["ntk_velocity"].values
        assert np.isnan(velocity[0])
        assert abs(velocity[1] - expected[1]["ntk_distance_previous"]) <= 1e-8 * abs(
            expected[1]["ntk_distance_previous"])


def test_log_partition_through_the_monitor_and_analyze_equals_numpy_logsumexp(tmp_path):
    """The output-logit probe (Wortsman et al. 2023, Sec. 3.2) on the MLP with Dropout, in eval
    mode: mean over the batch of log Σ_v exp(y_v), by numpy in float64, and its drift from the
    first step."""
    from traindyn.dynamics.analyze import analyze

    s = series("mlp")
    logits = []
    for t in range(len(STEPS)):
        with torch.no_grad():
            y = s.model(t).eval()(s.x).numpy()
        top = y.max(1, keepdims=True)
        logits.append(float((top[:, 0] + np.log(np.exp(y - top).sum(1))).mean()))
    expected = {"mean_log_z": np.array(logits),
                "log_z_drift": np.array(logits) - logits[0]}
    ds_m = monitored_replay(s, probes=["log_partition"], layers=[], probe_data=s.x)
    folder = checkpoint_folder(s, tmp_path)
    torch.save(s.x, tmp_path / "x.pt")
    ds_a = analyze(folder, model="tests._zoo:mlp", layers=["0"], probe_data=str(tmp_path / "x.pt"),
                   probes=["log_partition"], dtype="float64", batch_size=len(s.x),
                   progress=False)
    for path, ds in (("monitor-sync", ds_m), ("analyze", ds_a)):
        worst = 0.0
        for var, want in expected.items():
            got = ds[var].values
            scale = np.abs(want).max()
            assert np.all(np.abs(got - want) <= 1e-12 * scale), (path, var, got, want)
            worst = max(worst, float((np.abs(got - want) / scale).max()))
        REPORT[("mlp", "log_partition", path)] = worst


# ---------------------------------------------------------------- structure
def test_the_shared_relu_of_resnet_blocks_is_refused_by_name_and_calls_last_is_the_block():
    s = series("resnet18")
    model = s.model(0).eval()
    with pytest.raises(RuntimeError, match=r"'layer4\.0\.relu' \(ReLU\) was called 2 times"):
        with capture(model, ["layer4.0.relu"]), torch.no_grad():
            model(s.x)
    with capture(model, ["layer4.0.relu"], calls="last") as cap, torch.no_grad():
        model(s.x)
    ref = reference_features(model, s.x, ["layer4.0"], "flatten")["layer4.0"]
    torch.testing.assert_close(cap["layer4.0.relu"], ref, rtol=0, atol=0)


def test_the_harness_covers_every_registered_per_layer_probe_and_reports():
    """Runs last in this file: every per-layer probe was compared on every fast model in the
    paths above; prints the count and the worst relative difference."""
    done = {(m, p) for (m, p, _) in REPORT}
    if not REPORT:
        pytest.skip("run with the rest of the file")
    analysed = {m for (m, p, path) in REPORT if path == "analyze" and p != "ntk"}
    missing = {(m, p.name) for m in FAST for p in PER_LAYER if (m, p.name) not in done
               and ("final" not in p.reference or m in analysed)}
    assert not missing, sorted(missing)   # "final" references need a whole series: analyze
    worst = max(REPORT.items(), key=lambda kv: kv[1])
    models = {m for (m, _, _) in REPORT}
    paths = {path for (_, _, path) in REPORT}
    print(f"\nconformance: {len(REPORT)} (model, probe, path) comparisons over {len(models)} "
          f"models, {len({p for (_, p, _) in REPORT})} probes, {len(paths)} paths "
          f"({', '.join(sorted(paths))}); worst relative difference {worst[1]:.2e} at "
          f"{worst[0]}")
