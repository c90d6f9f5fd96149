"""Conformance checks for probes: :func:`check_probe`, modelled on scikit-learn's
``check_estimator``.

A probe that passes keeps the contract of :mod:`traindyn.probes.registry` on a small example:

``declaration``
    It is a :class:`~traindyn.probes.registry.Probe`, and, if registered, the registry gives
    back the same object under its name.
``pickle``
    It pickles and the copy computes the same values (the Monitor's process mode and dask
    workers receive probes by value).
``variables``
    Evaluated through :class:`~traindyn.probes.evaluation.ProbePlan` (two evaluations, with
    the first / previous / final references a series gives), it returns exactly the variables
    it declares, each with the declared dims.
``direct_call``
    The direct call (``probe(features)``, ``probe(features, labels)``, ``probe(weight)``,
    ``probe(model, inputs, targets)``) gives the plan's values — for streaming probes, the
    one-shot function equals the accumulator path.
``nan_input``
    An input with one NaN entry gives NaN in every variable, with at least one warning (no
    silent NaN, no number computed from corrupted data).

Each check raises :class:`ProbeCheckError` naming the probe, the check and what differed.
This module checks the probe itself; :func:`traindyn.dynamics.testing.check_probe_end_to_end`
runs the same example through the Monitor in all its modes and through ``analyze``
(``probes`` never imports ``dynamics``).

The example a probe is checked on (:class:`Example`) is a small tanh MLP on Gaussian inputs
with three classes unless the probe needs another kind of model: image probes get a small
convolutional network, the attention probe a one-block attention model.  A probe with other
needs registers its own example with :func:`register_example`.
"""

from __future__ import annotations

import inspect
import math
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from traindyn.probes.evaluation import Measurement, ProbePlan, ReferenceBook, evaluate
from traindyn.probes.registry import PROBES, Probe, get_probe

__all__ = [
    "CHECKS",
    "EXAMPLES",
    "Example",
    "ProbeCheckError",
    "check_probe",
    "example_for",
    "plan_values",
    "register_example",
]

CHECKS = ("declaration", "pickle", "variables", "direct_call", "nan_input")
"""The checks :func:`check_probe` runs, in order."""


class ProbeCheckError(AssertionError):
    """A probe broke its contract; the message names the probe, the check and the difference."""


# --------------------------------------------------------------------------------------------
# examples


@dataclass
class Example:
    """A model and probe data to check a probe on.

    ``make_model(seed)`` builds the network (fresh weights for each seed); ``inputs`` is the
    probe batch, ``labels`` its integer classes (also the targets of model probes),
    ``layers`` the layers the probes read, ``probe_kwargs`` parameters for the probe.
    """

    make_model: Callable[[int], nn.Module]
    inputs: torch.Tensor
    labels: torch.Tensor
    layers: tuple[str, ...]
    probe_kwargs: dict[str, Any] = field(default_factory=dict)


class TanhMLP(nn.Sequential):
    """``Linear(10, 16) → tanh → Linear(16, 12) → tanh → Linear(12, 3)``."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 3))


class SmallConvNet(nn.Sequential):
    """Two 3×3 convolutions with tanh on ``(n, 1, 8, 8)`` images, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


class _Heads(nn.Module):
    """A linear map whose output is split into heads: ``(batch, heads, tokens, d_head)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return self.proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)


class _AttentionBlock(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.q_out, self.k_out, self.v_out = _Heads(dim, heads), _Heads(dim, heads), \
            _Heads(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_out(x), self.k_out(x), self.v_out(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights @ v).transpose(1, 2).reshape(x.shape)


class TinyAttentionNet(nn.Module):
    """One attention block (``attn.q_out`` / ``attn.k_out`` give queries and keys) on
    ``(n, tokens, 8)`` inputs, mean-pooled, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _AttentionBlock()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(dim=1))


def _seeded(cls: type[nn.Module]) -> Callable[[int], nn.Module]:
    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return cls().double()

    make.__name__ = f"make_{cls.__name__}"
    return make


def _gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def mlp_example() -> Example:
    """48 Gaussian samples in 10 dimensions, 3 classes, layers ``0`` and ``2`` of
    :class:`TanhMLP`."""
    return Example(_seeded(TanhMLP), _gaussian((48, 10), 1), torch.arange(48) % 3, ("0", "2"))


def image_example() -> Example:
    """24 Gaussian ``1 × 8 × 8`` images, 3 classes, both convolutions of :class:`SmallConvNet`."""
    return Example(_seeded(SmallConvNet), _gaussian((24, 1, 8, 8), 2), torch.arange(24) % 3,
                   ("0", "2"))


def attention_example() -> Example:
    """24 sequences of 5 Gaussian tokens for :class:`TinyAttentionNet` (layer ``attn``)."""
    return Example(_seeded(TinyAttentionNet), _gaussian((24, 5, 8), 3), torch.arange(24) % 3,
                   ("attn",))


EXAMPLES: dict[str, Callable[[], Example]] = {
    "invariance": image_example,
    "lie_derivative": image_example,
    "attention_logits": attention_example,
}
"""Examples by probe name, for probes that need more than :func:`mlp_example`."""


def register_example(name: str, make: Callable[[], Example]) -> None:
    """Check the probe called ``name`` on ``make()`` instead of the default example."""
    EXAMPLES[name] = make


def example_for(probe: Probe | str) -> Example:
    """The example a probe is checked on."""
    probe = get_probe(probe)
    return EXAMPLES.get(probe.name, mlp_example)()


# --------------------------------------------------------------------------------------------
# the plan path


def _as_array(value: Any) -> np.ndarray:
    values = getattr(value, "values", value)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float)


def _dims(value: Any) -> tuple[str, ...]:
    return tuple(getattr(value, "dims", ()))


class SeriesReferences(ReferenceBook):
    """The references of evaluation ``index`` of a series whose states are known: first the
    first evaluation's, previous the one before (none at the first), final the last one's;
    the time of evaluation ``i`` is ``i`` (steps 0, 1, … with learning rate 1)."""

    def __init__(self, states: Sequence[Mapping[Any, Any]], index: int) -> None:
        self.states, self.index = list(states), index

    def _which(self, kind: str) -> int | None:
        if kind == "first":
            return 0
        if kind == "previous":
            return self.index - 1 if self.index > 0 else None
        return len(self.states) - 1

    def get(self, key: Any, kind: str) -> Any:
        which = self._which(kind)
        return None if which is None else self.states[which].get(key)

    def time(self, key: Any, kind: str) -> float | None:
        which = self._which(kind)
        return None if which is None else float(which)

    def record(self, states: Mapping[Any, Any], time: float | None = None) -> None:
        """Nothing to record: the series is known."""


def plan_values(probe: Probe, example: Example, seeds: Sequence[int] = (0, 1),
                labels: bool = True) -> list[Measurement]:
    """The probe's measurements through :func:`~traindyn.probes.evaluation.evaluate`, one per
    seed (a series of checkpoints), with the first / previous / final references a series
    gives (the final one is the last seed's)."""
    plan = ProbePlan([probe], example.layers,
                     {probe.name: dict(example.probe_kwargs)} if example.probe_kwargs else {})
    models = [example.make_model(seed).eval() for seed in seeds]
    instances = plan.model_instances()  # a stateful probe keeps its state along the series
    y = example.labels if labels else None

    def run(i: int, lookup: Any) -> Measurement:
        return evaluate(plan, models[i], [example.inputs],
                        labels=[y] if plan.has_layer_probes else None, targets=y,
                        instances=instances, references=lookup, time=float(i))

    if not probe.reference:
        return [run(i, lambda key, kind: None) for i in range(len(seeds))]
    states = [run(i, lambda key, kind: None).states for i in range(len(seeds))]
    instances = plan.model_instances()  # the series again, from the start
    return [run(i, SeriesReferences(states, i)) for i in range(len(seeds))]


def measurement_variables(measurement: Measurement) -> dict[str, dict[str | None, Any]]:
    """``{variable: {layer (None for model probes): value}}`` of a measurement."""
    out: dict[str, dict[str | None, Any]] = {k: dict(v)
                                             for k, v in measurement.layer_values.items()}
    for name, value in measurement.values.items():
        out.setdefault(name, {})[None] = value
    return out


# --------------------------------------------------------------------------------------------
# direct calls


def _normalised(probe: Probe, value: Any) -> dict[str, Any]:
    """A probe's own return value as ``{variable: value}``."""
    import xarray as xr

    if isinstance(value, xr.Dataset):
        return {k: value[k] for k in value.data_vars}
    if isinstance(value, Mapping):
        return dict(value)
    return {probe.name: value}


def _takes_layers(fn: Callable[..., Any]) -> bool:
    try:
        return "layers" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _features(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str]
              ) -> dict[str, torch.Tensor]:
    """Each layer's output, flattened per sample, by a plain forward pass (clones)."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda m, a, out, name=name: seen.__setitem__(name, out.detach().clone()))
        for name in layers]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: seen[name].reshape(seen[name].shape[0], -1) for name in layers}


def direct_values(probe: Probe, example: Example, seed: int = 0, *,
                  inputs: torch.Tensor | None = None,
                  corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  states: dict[str | None, Any] | None = None,
                  instance: Callable[..., Any] | None = None
                  ) -> dict[str, dict[str | None, Any]]:
    """The probe's values by direct calls, layer by layer (``corrupt`` edits what each call
    receives: the features, the weight, or the model inputs); a reference probe's values are
    the non-reference part of its ``(values, state)``, and its states by layer go into
    ``states`` when given.  A stateful probe (``factory``) is called through ``instance``
    (default: a new one)."""
    model = example.make_model(seed).eval()
    x = example.inputs if inputs is None else inputs
    kwargs = dict(example.probe_kwargs)
    corrupt = corrupt or (lambda t: t)
    out: dict[str, dict[str | None, Any]] = {}

    def keep(result: Any, layer: str | None) -> None:
        if probe.reference:
            result, state = result
            if states is not None:
                states[layer] = state
        for name, value in _normalised(probe, result).items():
            out.setdefault(name, {})[layer] = value

    if probe.consumes == "model":
        if probe.factory is not None:
            keep((instance or probe.factory())(model, corrupt(x), example.labels), None)
        else:
            if "layers" not in probe.kwargs and _takes_layers(probe.fn):
                kwargs.setdefault("layers", list(example.layers))
            keep(probe(model, corrupt(x), example.labels, **kwargs), None)
        return out
    modules = dict(model.named_modules())
    features = _features(model, x, example.layers) if probe.consumes != "parameters" else {}
    for layer in example.layers:
        if probe.consumes == "parameters":
            keep(probe(corrupt(modules[layer].weight.detach()), **kwargs), layer)
        elif probe.consumes == "labelled_features":
            keep(probe(corrupt(features[layer]), example.labels, **kwargs), layer)
        else:
            keep(probe(corrupt(features[layer]), **kwargs), layer)
    return out


def direct_comparisons(probe: Probe, example: Example, seeds: Sequence[int] = (0, 1),
                       corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> list[dict[str, dict[str | None, Any]]]:
    """A reference probe's values and comparisons by direct calls of ``fn`` and ``compare``,
    one mapping per seed, with the references :func:`plan_values` uses (first: the first
    seed's state, previous: the one before, final: the last one's)."""
    per_seed = []
    for seed in seeds:
        states: dict[str | None, Any] = {}
        values = direct_values(probe, example, seed, corrupt=corrupt, states=states)
        per_seed.append((values, states))
    wants_times = "times" in inspect.signature(probe.compare).parameters
    out = []
    for i, (values, states) in enumerate(per_seed):
        merged = {k: dict(v) for k, v in values.items()}
        for layer, state in states.items():
            refs = {"first": per_seed[0][1][layer],
                    "previous": per_seed[i - 1][1][layer] if i > 0 else None,
                    "final": per_seed[-1][1][layer]}
            kwargs = dict(probe.kwargs)
            if wants_times:
                book = SeriesReferences([{}] * len(per_seed), i)
                kwargs["times"] = {"current": float(i),
                                   **{k: book.time(None, k) for k in probe.reference}}
            compared = probe.compare(state, {k: refs[k] for k in probe.reference}, **kwargs)
            for name, value in _normalised(probe, compared).items():
                merged.setdefault(name, {})[layer] = value
        out.append(merged)
    return out


# --------------------------------------------------------------------------------------------
# the checks


def _fail(probe: Probe, check: str, message: str) -> ProbeCheckError:
    return ProbeCheckError(f"probe {probe.name!r} fails {check!r}: {message}")


def assert_same(probe: Probe, check: str, got: Mapping[str, Mapping[Any, Any]],
                expected: Mapping[str, Mapping[Any, Any]], rtol: float, where: str = "") -> None:
    """Every variable and layer of ``expected`` equals ``got`` (NaN where NaN), to ``rtol``
    relative to the larger magnitude of the pair (1e-12 absolute floor)."""
    for name, per_layer in expected.items():
        if name not in got:
            raise _fail(probe, check, f"{where}variable {name!r} is missing")
        for layer, value in per_layer.items():
            if layer not in got[name]:
                raise _fail(probe, check, f"{where}{name!r} has no value for layer {layer!r}")
            a, b = _as_array(got[name][layer]), _as_array(value)
            if a.shape != b.shape:
                raise _fail(probe, check, f"{where}{name!r} at layer {layer!r}: shape "
                                          f"{a.shape} vs {b.shape}")
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                raise _fail(probe, check, f"{where}{name!r} at layer {layer!r}: NaN in one "
                                          f"path only ({a.ravel()[:4]} vs {b.ravel()[:4]})")
            finite = ~np.isnan(b)
            scale = np.maximum(np.maximum(np.abs(a[finite]), np.abs(b[finite])), 1e-12)
            err = np.abs(a[finite] - b[finite]) / scale
            if err.size and err.max() > rtol:
                raise _fail(probe, check, f"{where}{name!r} at layer {layer!r} differs by "
                                          f"{err.max():.2e} relative (> {rtol:.0e}): "
                                          f"{a.ravel()[:4]} vs {b.ravel()[:4]}")


def _check_declaration(probe: Probe) -> str:
    if not isinstance(probe, Probe):
        raise ProbeCheckError(f"{probe!r} is not a Probe")
    registered = PROBES.get(probe.name)
    if registered is not None and registered is not probe:
        raise _fail(probe, "declaration", "another probe is registered under its name")
    return "ok" if registered is not None else "ok (not registered)"


def _check_pickle(probe: Probe, example: Example, rtol: float) -> str:
    try:
        copy = pickle.loads(pickle.dumps(probe))
    except Exception as err:  # pickle raises PicklingError, AttributeError, TypeError …
        raise _fail(probe, "pickle", f"cannot be pickled ({type(err).__name__}: {err}); "
                                     f"define its functions at module level") from None
    if copy.name != probe.name or dict(copy.variables) != dict(probe.variables):
        raise _fail(probe, "pickle", "the unpickled copy declares something else")
    if probe.fn is None and probe.factory is None:
        return "ok (no one-shot function to compare)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(probe, "pickle", direct_values(copy, example),
                    direct_values(probe, example), rtol, "the copy: ")
    return "ok"


def _check_variables(probe: Probe, measurements: Sequence[Measurement]) -> str:
    declared = dict(probe.variables)
    for i, measurement in enumerate(measurements):
        found = measurement_variables(measurement)
        if set(found) != set(declared):
            raise _fail(probe, "variables", f"evaluation {i} returned {sorted(found)}, it "
                                            f"declares {sorted(declared)}")
        for name, per_layer in found.items():
            want = tuple(d for d in declared[name].dims if not (probe.per_layer and
                                                                 d == "layer"))
            for layer, value in per_layer.items():
                if _dims(value) != want and not (not want and np.ndim(_as_array(value)) == 0):
                    raise _fail(probe, "variables", f"{name!r} at layer {layer!r} has dims "
                                                    f"{_dims(value) or np.shape(value)}, it "
                                                    f"declares {want}")
    return "ok"


def _check_direct(probe: Probe, example: Example, measurements: Sequence[Measurement],
                  rtol: float) -> str:
    if probe.fn is None and probe.factory is None:
        return "skipped (no one-shot function)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if probe.reference and probe.factory is None:
            directs = direct_comparisons(probe, example, range(len(measurements)))
        else:
            instance = probe.factory() if probe.factory is not None else None
            directs = [direct_values(probe, example, seed, instance=instance)
                       for seed in range(len(measurements))]
    for i, (direct, measurement) in enumerate(zip(directs, measurements, strict=True)):
        assert_same(probe, "direct_call", measurement_variables(measurement), direct, rtol,
                    f"evaluation {i}, plan vs direct call: ")
    return "ok"


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    t.reshape(-1)[min(3, t.numel() - 1)] = float("nan")
    return t


def _check_nan(probe: Probe, example: Example) -> str:
    if probe.fn is None and probe.factory is None:
        return "skipped (no one-shot function)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if probe.consumes == "model":
            values = direct_values(probe, example, inputs=_with_nan(example.inputs))
        elif probe.reference and probe.factory is None:
            values = direct_comparisons(probe, example, (0, 0), corrupt=_with_nan)[-1]
        else:
            values = direct_values(probe, example, corrupt=_with_nan)
    for name, per_layer in values.items():
        for layer, value in per_layer.items():
            array = _as_array(value)
            if not np.all(np.isnan(array)):
                raise _fail(probe, "nan_input", f"{name!r} at layer {layer!r} is "
                                                f"{array.ravel()[:4]} from an input with a "
                                                f"NaN entry; expected NaN")
    if not caught:
        raise _fail(probe, "nan_input", "an input with a NaN entry gave NaN without a warning")
    return "ok"


def check_probe(probe: Probe | str, example: Example | None = None, *, rtol: float = 1e-9,
                checks: Sequence[str] = CHECKS) -> dict[str, str]:
    """Check a probe against the probe contract (see the module docstring).

    Parameters
    ----------
    probe : Probe or str
        The probe, or the name of a registered one.
    example : Example, optional
        What to evaluate it on (default: :func:`example_for`).
    rtol : float
        Relative tolerance of the comparisons (the paths compute in float64).
    checks : sequence of str
        A subset of :data:`CHECKS`.

    Returns
    -------
    dict
        ``{check: "ok" | "skipped (why)"}``.

    Raises
    ------
    ProbeCheckError
        The first check the probe fails, naming it and what differed.
    """
    probe = get_probe(probe)
    example = example if example is not None else example_for(probe)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {CHECKS}")
    report: dict[str, str] = {}
    measurements: list[Measurement] | None = None
    for check in CHECKS:
        if check not in checks:
            continue
        if check == "declaration":
            report[check] = _check_declaration(probe)
        elif check == "pickle":
            report[check] = _check_pickle(probe, example, rtol)
        else:
            if measurements is None:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        measurements = plan_values(probe, example)
                except (ValueError, TypeError, KeyError) as err:
                    raise _fail(probe, "variables", f"the plan failed: {type(err).__name__}: "
                                                    f"{err}") from None
            if check == "variables":
                report[check] = _check_variables(probe, measurements)
            elif check == "direct_call":
                report[check] = _check_direct(probe, example, measurements, rtol)
            else:
                report[check] = _check_nan(probe, example)
    return report
