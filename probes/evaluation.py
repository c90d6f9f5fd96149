"""Evaluate a set of probes — the one path every consumer takes (Monitor, analyze, sweep).

:class:`ProbePlan` reads the probes' declarations (:mod:`probes.registry`) once and splits an
evaluation into steps that can run in different places (the Monitor's training thread does the
forward pass and the model probes; its worker computes the feature probes):

0. :func:`forward_pass` → the probe batch through the model, batch by batch (with each
   batch's labels and token mask), its layers captured by forward hooks: kept whole (the
   Monitor hands them to its worker) or streamed into the plan's state;
1. :meth:`ProbePlan.start` → per-layer streaming state; :meth:`ProbePlan.update` (the
   forward pass's ``sink``) feeds each batch of a layer's features (and its labels) into the shared
   accumulators — one per accumulator *name* and layer, so RankMe, alpha-ReQ and the effective
   ranks read one float64 second moment and its eigenvalues are computed once, and NC1–NC4 and
   CDNV read one set of class statistics; an accumulator that ``shares`` another (the ridge
   readout's ``"readout"`` shares ``"spectrum"``) reads that one's state when both are in the
   plan, and keeps only its extra statistics;
2. :meth:`ProbePlan.layer_values` → the per-layer probes' values from that state;
   :meth:`ProbePlan.parameter_values` → the ``parameters`` probes' values from the weights;
   :meth:`ProbePlan.model_values` → the ``model`` probes' values;
   :func:`measure` → all three after a forward pass;
3. :func:`compare_references` → reference-based probes' comparisons with the states of other
   evaluations (first / previous / final) held by a :class:`ReferenceBook` — the one place
   where the Monitor (each mode) and ``analyze`` compare.

:func:`evaluate` does all of it for a model and a batch source.  Each step returns a
:class:`Measurement`; measurements merge with ``|``, and
:mod:`traindyn.dynamics.measurement_dataset` turns them into the Dataset.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from traindyn.probes._pending import answer_pendings, fetch, resolve_answer
from traindyn.probes.registry import ACCUMULATORS, Probe, get_probe

__all__ = ["Measurement", "ProbePlan", "ReferenceBook", "compare_references", "evaluate",
           "forward_pass", "measure"]

StateKey = tuple[str, str | None]
"""(probe name, layer or None for model probes)."""


@dataclass
class Measurement:
    """Values of one evaluation.

    ``layer_values[variable][layer]`` — per-layer probes (a number, or a DataArray / array
    over the variable's extra dims); ``values[variable]`` — model probes; ``states`` —
    what reference-based probes keep, by ``(probe, layer)``; ``notes`` — warnings raised by
    the probes (deduplicated, in order); ``layer_notes[layer]`` — those raised while that
    layer's probes ran (why a value is NaN).
    """

    layer_values: dict[str, dict[str, Any]] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    states: dict[StateKey, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layer_notes: dict[str, list[str]] = field(default_factory=dict)

    def __or__(self, other: Measurement) -> Measurement:
        layer_values = {k: dict(v) for k, v in self.layer_values.items()}
        for name, per_layer in other.layer_values.items():
            layer_values.setdefault(name, {}).update(per_layer)
        layer_notes = {k: list(v) for k, v in self.layer_notes.items()}
        for layer, notes in other.layer_notes.items():
            layer_notes[layer] = list(dict.fromkeys(layer_notes.get(layer, []) + notes))
        return Measurement(layer_values, {**self.values, **other.values},
                           {**self.states, **other.states},
                           list(dict.fromkeys(self.notes + other.notes)), layer_notes)

    def per_layer(self, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Scalar per-layer variables as arrays over ``layers`` (NaN where missing)."""
        out = {}
        for name, values in self.layer_values.items():
            if all(np.ndim(v) == 0 and not hasattr(v, "dims") for v in values.values()):
                out[name] = np.array([float(values.get(layer, np.nan)) for layer in layers])
        return out


def _normalise(probe: Probe, value: Any) -> dict[str, Any]:
    """A probe's return value as ``{variable: value}`` (numbers as floats)."""
    import xarray as xr

    if isinstance(value, xr.Dataset):
        items = {k: v for k, v in value.data_vars.items()}
    elif isinstance(value, Mapping):
        items = dict(value)
    else:
        items = {probe.name: value}
    out = {}
    for name, v in items.items():
        if isinstance(v, xr.DataArray):
            out[name] = float(v.values) if v.ndim == 0 else v
        elif isinstance(v, torch.Tensor):
            out[name] = float(v.item()) if v.numel() == 1 and v.ndim == 0 else \
                v.detach().cpu().double().numpy()
        elif np.ndim(v) == 0:
            out[name] = float(v)
        else:
            out[name] = np.asarray(v, dtype=float)
    unknown = set(out) - set(probe.variables)
    if unknown:
        raise ValueError(f"probe {probe.name!r} returned undeclared variables {sorted(unknown)}; "
                         f"it declares {list(probe.variables)}")
    return out


def _takes(fn: Callable[..., Any], parameter: str) -> bool:
    """Whether ``fn`` has a parameter of that name."""
    import inspect

    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _takes_layers(fn: Callable[..., Any]) -> bool:
    """Whether a model probe's function has a ``layers`` parameter (it then receives the
    plan's layers unless the probe binds its own)."""
    return _takes(fn, "layers")


def _split_state(probe: Probe, result: Any) -> tuple[Any, Any]:
    if probe.reference:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(f"reference probe {probe.name!r} must return (values, state)")
        return result
    return result, None


def _file(out: Measurement, probe: Probe, layer: str, result: Any) -> dict[str, Any]:
    """Record one per-layer probe's result (its values, and its state if it keeps one);
    returns the values."""
    result, kept = _split_state(probe, result)
    values = _normalise(probe, result)
    for name, value in values.items():
        out.layer_values.setdefault(name, {})[layer] = value
    if probe.reference:
        out.states[(probe.name, layer)] = kept
    return values


def _nan_variables(values: Mapping[str, Any]) -> list[str]:
    """The variables of ``values`` with a NaN (anywhere in an array value)."""
    out = []
    for name, value in values.items():
        data = getattr(value, "values", value)
        try:
            if np.isnan(np.asarray(data, dtype=float)).any():
                out.append(name)
        except (TypeError, ValueError):
            continue
    return out


def _third_party(probe: Probe) -> bool:
    """Whether ``probe``'s functions come from outside traindyn (traindyn's own probes say
    why their values are NaN themselves, and their tests check it)."""
    fn = probe.fn or probe.from_accumulator or probe.factory
    fn = getattr(fn, "func", fn)   # a functools.partial
    return not str(getattr(fn, "__module__", "") or "").startswith("traindyn.")


def _note_silent_nan(probe: Probe, values: Mapping[str, Any], warned: bool,
                     layer: str | None = None) -> None:
    """Warn (into the evaluation's notes) when a third-party ``probe`` returned NaN without a
    warning of its own, naming the probe, the variables and the layer."""
    if warned or not _third_party(probe):
        return
    nan = _nan_variables(values)
    if nan:
        where = f" on layer {layer!r}" if layer is not None else ""
        warnings.warn(f"probe {probe.name!r} returned NaN for {nan}{where} without a warning "
                      "saying why", RuntimeWarning, stacklevel=3)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a probe's input (a tensor, or a mapping / sequence of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _ReadOnly:
    """Check that a probe left its inputs as they were: the version counter of every tensor
    handed to it (a tensor and its views share one) is read before and after the call; an
    in-place write raises ``RuntimeError`` naming the probe (and the layer), before the next
    probe reads the corrupted input."""

    def __init__(self, probe: Probe, layer: str | None, *inputs: Any) -> None:
        self.probe, self.layer = probe, layer
        self.tensors = [t for value in inputs for t in _tensors(value)]

    def __enter__(self) -> None:
        self.versions = [t._version for t in self.tensors]

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:
            return
        if any(t._version != v for t, v in zip(self.tensors, self.versions, strict=True)):
            where = f" of layer {self.layer!r}" if self.layer is not None else ""
            raise RuntimeError(
                f"probe {self.probe.name!r} modified its input{where} in place; the features, "
                "labels, weights, model inputs and parameters a probe receives are shared "
                "with the other probes (and the model): copy before writing (x = x.clone())")


def _as_torch(features: Any) -> Any:
    """A numpy feature matrix as a tensor over the same memory (so an in-place write by a
    probe is seen by its version counter); anything else as it is."""
    return torch.from_numpy(features) if isinstance(features, np.ndarray) else features


class _Notes:
    """Collect warnings raised inside (as text, deduplicated) and re-emit nothing."""

    def __enter__(self) -> list[str]:
        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self.caught

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    def texts(self) -> list[str]:
        return list(dict.fromkeys(str(w.message) for w in self.caught))

    def texts_since(self, first: int) -> list[str]:
        return list(dict.fromkeys(str(w.message) for w in self.caught[first:]))

    def per_layer(self, out: Measurement, layer: str, first: int,
                  earlier: Sequence[str] = ()) -> None:
        """File the warnings caught since index ``first`` (after ``earlier`` ones) under
        ``layer``."""
        texts = list(dict.fromkeys([*earlier, *self.texts_since(first)]))
        if texts:
            out.layer_notes[layer] = list(dict.fromkeys(out.layer_notes.get(layer, []) + texts))


@dataclass
class LayerState:
    """Streaming state of one layer during one evaluation."""

    accumulators: dict[str, Any]
    raw: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)


class ProbePlan:
    """Which probes, on which layers, sharing which accumulators.

    Parameters
    ----------
    probes : sequence of str or Probe
        Registered names or :class:`~probes.registry.Probe` objects.
    layers : sequence of str
        Layer (module) names for the per-layer probes.
    probe_kwargs : mapping probe name → mapping, optional
        Parameters bound to each probe (``{"alpha_req": {"fit_range": [3, 100]}}``).
    """

    def __init__(self, probes: Sequence[str | Probe], layers: Sequence[str] = (),
                 probe_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        probe_kwargs = dict(probe_kwargs or {})
        resolved: list[Probe] = []
        for p in probes:
            probe = get_probe(p)
            if probe.name in probe_kwargs:
                probe = probe.with_kwargs(**dict(probe_kwargs.pop(probe.name)))
            resolved.append(probe)
        if probe_kwargs:
            raise KeyError(f"probe_kwargs name probes not in the plan: {sorted(probe_kwargs)}")
        names = [p.name for p in resolved]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"probes {dup} are listed twice")
        owner: dict[str, str] = {}
        for probe in resolved:
            for var in probe.variables:
                if var in owner:
                    raise ValueError(f"probes {owner[var]!r} and {probe.name!r} both declare "
                                     f"the variable {var!r}: one of them would overwrite the "
                                     "other's values; evaluate them separately or rename one")
                owner[var] = probe.name
        self.probes = resolved
        self.layers = list(layers)
        self.feature_probes = [p for p in resolved if p.consumes in ("features",
                                                                     "labelled_features")]
        self.parameter_probes = [p for p in resolved if p.consumes == "parameters"]
        self.model_probes = [p for p in resolved if p.consumes == "model"]
        self.accumulator_names = list(dict.fromkeys(
            p.accumulator for p in self.feature_probes if p.accumulator))
        self.keep_raw = any(p.accumulator is None for p in self.feature_probes)
        self.needs_labels = any(p.needs_labels for p in self.feature_probes) or any(
            ACCUMULATORS[a].needs_labels for a in self.accumulator_names)
        self.label_users = [p.name for p in resolved if p.needs_labels or (
            p.accumulator is not None and ACCUMULATORS[p.accumulator].needs_labels)]
        """Names of the probes (feature and model) that need the probe batch's labels."""
        self.references = sorted({r for p in resolved for r in p.reference})

    # -- declarations --------------------------------------------------------------------
    def variables(self) -> dict[str, tuple[tuple[str, ...], dict[str, str]]]:
        """``{variable: (dims after step, attrs)}`` of everything the plan records (built
        once: the Monitor reads it for every variable of every evaluation; do not mutate)."""
        if getattr(self, "_variables", None) is None:
            out: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}
            for probe in self.probes:
                for name, var in probe.variables.items():
                    dims = (("layer",) if probe.per_layer else ()) + tuple(var.dims)
                    out.setdefault(name, (dims, var.attrs(probe.source)))
            self._variables = out
        return self._variables

    def names(self) -> list[str]:
        return [p.name for p in self.probes]

    @property
    def has_layer_probes(self) -> bool:
        return bool(self.feature_probes and self.layers)

    # -- 1. streaming ----------------------------------------------------------------------
    def start(self) -> dict[str, LayerState]:
        """Fresh streaming state for every layer."""
        return {layer: self._layer_state() for layer in self.layers}

    def _layer_state(self) -> LayerState:
        """One layer's accumulators; one that ``shares`` another accumulator of the plan
        receives it (created first) instead of forming the same statistic again."""
        accs: dict[str, Any] = {}
        for name in self.accumulator_names:
            shared = ACCUMULATORS[name].shares
            if shared is not None and shared in self.accumulator_names:
                if shared not in accs:
                    accs[shared] = ACCUMULATORS[shared].factory()
                accs[name] = ACCUMULATORS[name].factory(shared=accs[shared])
            elif name not in accs:
                accs[name] = ACCUMULATORS[name].factory()
        return LayerState({name: accs[name] for name in self.accumulator_names})

    def update(self, state: Mapping[str, LayerState], layer: str, features: Any,
               labels: Any = None) -> None:
        """Feed one batch of ``layer``'s features (and their labels) into its state."""
        st = state[layer]
        if self.needs_labels and labels is None:
            raise ValueError(f"probes {[p.name for p in self.feature_probes if p.needs_labels]}"
                             " need labels of the probe data")
        for name, acc in st.accumulators.items():
            if ACCUMULATORS[name].needs_labels:
                acc.update(features, labels)
            else:
                acc.update(features)
        if self.keep_raw:
            st.raw.append(features)
            if labels is not None:
                st.labels.append(torch.as_tensor(labels))

    def accumulate(self, features: Mapping[str, Any], labels: Any = None
                   ) -> dict[str, LayerState]:
        """The streaming state of whole feature matrices (one batch per layer)."""
        state = self.start()
        for layer in self.layers:
            self.update(state, layer, features[layer], labels)
        return state

    # -- 2. values -------------------------------------------------------------------------
    def layer_values(self, state: Mapping[str, LayerState]) -> Measurement:
        """Values of the ``features`` and ``labelled_features`` probes from the streamed state.

        Two phases, so that the device is not waited for once per metric: every probe of every
        layer first computes on the device (the accumulators' probes answer with a
        :class:`~probes._pending.Pending`), then all their numbers come to the host in one
        copy per device (:func:`probes._pending.fetch`) and are finished there — NaN checks
        and warnings included, filed under their layer."""
        out = Measurement()
        notes = _Notes()
        computed: dict[str, list[tuple[Probe, Any, bool]]] = {layer: [] for layer in
                                                               self.layers}
        early: dict[str, list[str]] = {}
        with notes:
            views_by_layer = {
                layer: {a: ACCUMULATORS[a].view(acc)
                        for a, acc in state[layer].accumulators.items()}
                for layer in self.layers}
            for a in self.accumulator_names:
                if ACCUMULATORS[a].prepare is not None:
                    ACCUMULATORS[a].prepare([views_by_layer[layer][a] for layer in self.layers])
            for layer in self.layers:  # 1. on the device
                st = state[layer]
                views = views_by_layer[layer]
                raw = labels = None
                first = len(notes.caught)
                for probe in self.feature_probes:
                    before = len(notes.caught)
                    if probe.accumulator is not None:
                        result = probe.from_accumulator(views[probe.accumulator],
                                                        **probe.kwargs)
                    else:
                        if raw is None:
                            raw = _as_torch(st.raw[0]) if len(st.raw) == 1 else torch.cat(
                                [torch.as_tensor(r) for r in st.raw])
                            labels = (None if not st.labels else st.labels[0]
                                      if len(st.labels) == 1 else torch.cat(st.labels))
                        args = (raw, labels) if probe.needs_labels else (raw,)
                        with _ReadOnly(probe, layer, *args):
                            result = probe.fn(*args, **probe.kwargs)
                    computed[layer].append((probe, result, len(notes.caught) > before))
                early[layer] = notes.texts_since(first)
            self._finish(out, computed, early, notes)  # one read, then the host
        out.notes = notes.texts()
        return out

    def weights(self, model: torch.nn.Module, copy: bool = False
                ) -> dict[str, torch.Tensor | None]:
        """Each plan layer's ``weight`` (``ndim ≥ 2``; ``None`` where there is none), detached —
        cloned with ``copy=True`` (a snapshot that later training steps do not change; on a
        GPU the clone is queued, not waited for)."""
        modules = dict(model.named_modules())
        out: dict[str, torch.Tensor | None] = {}
        with torch.no_grad():
            for layer in self.layers:
                weight = getattr(modules.get(layer), "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
                    out[layer] = None
                else:
                    out[layer] = weight.detach().clone() if copy else weight.detach()
        return out

    def parameter_values(self, model: torch.nn.Module | Mapping[str, torch.Tensor | None]
                         ) -> Measurement:
        """Values of the ``parameters`` probes: each layer's ``weight`` (``ndim ≥ 2``), from the
        model or from a snapshot of :meth:`weights`."""
        out = Measurement()
        if not (self.parameter_probes and self.layers):
            return out
        weights = model if isinstance(model, Mapping) else self.weights(model)
        notes = _Notes()
        computed: dict[str, list[tuple[Probe, Any, bool]]] = {layer: [] for layer in
                                                               self.layers}
        early: dict[str, list[str]] = {}
        with notes, torch.no_grad():
            for layer in self.layers:  # on the device (pending answers are read below)
                first = len(notes.caught)
                weight = weights.get(layer)
                if weight is None:
                    warnings.warn(f"layer {layer!r} has no weight matrix: its parameter probes "
                                  "are NaN", RuntimeWarning, stacklevel=2)
                else:
                    for probe in self.parameter_probes:
                        before = len(notes.caught)
                        with _ReadOnly(probe, layer, weight):
                            result = probe.fn(weight, **probe.kwargs)
                        computed[layer].append((probe, result, len(notes.caught) > before))
                early[layer] = notes.texts_since(first)
            self._finish(out, computed, early, notes)
        out.notes = notes.texts()
        return out

    def _finish(self, out: Measurement,
                computed: Mapping[str, list[tuple[Probe, Any, bool]]],
                early: Mapping[str, list[str]], notes: _Notes) -> None:
        """Read every pending result in one copy per device, finish and file them by layer
        (with the warnings raised while each layer was computed; a third-party probe that
        returned NaN without a warning of its own gets a note naming it)."""
        pending = [p for layer in self.layers for _, r, _ in computed[layer]
                   for p in answer_pendings(r)]
        hosts = iter(fetch(pending))
        for layer in self.layers:
            first = len(notes.caught)
            for probe, result, warned in computed[layer]:
                before = len(notes.caught)
                values = _file(out, probe, layer, resolve_answer(result, hosts))
                _note_silent_nan(probe, values, warned or len(notes.caught) > before, layer)
            notes.per_layer(out, layer, first, early[layer])

    def model_instances(self) -> dict[str, Callable[..., Any]]:
        """Per-run callables of the stateful (``factory``) model probes."""
        return {p.name: p.factory() for p in self.model_probes if p.factory is not None}

    def model_values(self, model: torch.nn.Module, inputs: Any, targets: Any = None,
                     instances: Mapping[str, Callable[..., Any]] | None = None) -> Measurement:
        """Values of the ``model`` probes on the probe batch (the caller sets eval mode and
        preserves the training state).

        As :meth:`layer_values`: every probe first computes (a probe answering with a
        :class:`~probes._pending.Pending` — or, for a reference probe, a ``(values, state)``
        pair with pending members — leaves its numbers on the device), then the pendings of
        all model probes come to the host in one copy per device and are finished, in the
        probes' order."""
        out = Measurement()
        instances = instances or {}
        notes = _Notes()
        parameters = list(model.parameters())
        with notes:
            computed: list[tuple[Probe, Any, bool]] = []
            for probe in self.model_probes:  # 1. on the device
                before = len(notes.caught)
                with _ReadOnly(probe, None, inputs, targets, parameters):
                    if probe.factory is not None:
                        fn = instances.get(probe.name)
                        if fn is None:
                            raise ValueError(f"model probe {probe.name!r} is stateful "
                                             "(factory): pass its instance "
                                             "(ProbePlan.model_instances())")
                        result = fn(model, inputs, targets)
                    else:
                        kwargs = dict(probe.kwargs)
                        if "layers" not in kwargs and _takes_layers(probe.fn):
                            kwargs["layers"] = list(self.layers)  # the plan's layers
                        result = probe.fn(model, inputs, targets, **kwargs)
                computed.append((probe, result, len(notes.caught) > before))
            hosts = iter(fetch([p for _, r, _ in computed
                                for p in answer_pendings(r)]))  # 2. one read
            for probe, result, warned in computed:  # 3. on the host
                before = len(notes.caught)
                result, kept = _split_state(probe, resolve_answer(result, hosts))
                values = _normalise(probe, result)
                out.values.update(values)
                _note_silent_nan(probe, values, warned or len(notes.caught) > before)
                if probe.reference:
                    out.states[(probe.name, None)] = kept
        out.notes = notes.texts()
        return out

    # -- 3. references ---------------------------------------------------------------------
    def compare(self, states: Mapping[StateKey, Any],
                references: Callable[[StateKey, str], Any], time: float | None = None,
                times: Callable[[StateKey, str], float | None] | None = None) -> Measurement:
        """Reference-based probes' comparisons of ``states`` (this evaluation's) with
        ``references(key, kind)`` (another evaluation's state, or ``None``).

        A ``compare`` function with a ``times`` parameter also receives ``{"current": time,
        kind: that evaluation's time or None}`` (``times(key, kind)``), for rates such as the
        kernel velocity (distance / Δtime)."""
        out = Measurement()
        notes = _Notes()
        with notes:
            for probe in self.probes:
                if not probe.reference or probe.compare is None:
                    continue
                wants_times = _takes(probe.compare, "times")
                for (name, layer), state in states.items():
                    if name != probe.name:
                        continue
                    key = (name, layer)
                    refs = {kind: references(key, kind) for kind in probe.reference}
                    when = {kind: times(key, kind) if times is not None else None
                            for kind in probe.reference}
                    if refs.get("first") is None and "first" in refs:
                        refs["first"] = state  # the first evaluation is its own first
                        when["first"] = time
                    kwargs = dict(probe.kwargs)
                    if wants_times:
                        kwargs["times"] = {"current": time, **when}
                    values = _normalise(probe, probe.compare(state, refs, **kwargs))
                    for var, value in values.items():
                        if layer is None:
                            out.values[var] = value
                        else:
                            out.layer_values.setdefault(var, {})[layer] = value
        out.notes = notes.texts()
        return out


class ReferenceBook:
    """Reference states of a run evaluated in step order (the Monitor, ``analyze``).

    ``"first"`` keeps the first state of each key, ``"previous"`` the last one recorded;
    ``"final"`` is known only for a finished series: pass ``final=(states, time)`` (the last
    evaluation's states and time), else probes comparing with it are refused
    (``ValueError``)."""

    def __init__(self, plan: ProbePlan,
                 final: tuple[Mapping[StateKey, Any], float | None] | None = None) -> None:
        if "final" in plan.references and final is None:
            raise ValueError("probes comparing with the final checkpoint "
                             f"({[p.name for p in plan.probes if 'final' in p.reference]}) "
                             "need the whole series: use dynamics.analyze")
        self.first: dict[StateKey, Any] = {}
        self.previous: dict[StateKey, Any] = {}
        self.final: dict[StateKey, Any] = dict(final[0]) if final is not None else {}
        final_time = final[1] if final is not None else None
        self._times: dict[str, dict[StateKey, float | None]] = {
            "first": {}, "previous": {}, "final": dict.fromkeys(self.final, final_time)}

    def get(self, key: StateKey, kind: str) -> Any:
        return getattr(self, kind if kind in ("first", "final") else "previous").get(key)

    def time(self, key: StateKey, kind: str) -> float | None:
        """The time at which the ``kind`` state of ``key`` was recorded (or ``None``)."""
        return self._times[kind if kind in ("first", "final") else "previous"].get(key)

    def record(self, states: Mapping[StateKey, Any], time: float | None = None) -> None:
        for key, state in states.items():
            if key not in self.first:
                self.first[key] = state
                self._times["first"][key] = time
            self.previous[key] = state
            self._times["previous"][key] = time


class _Lookup:
    """A ``(key, kind) -> state`` callable seen as a book that records nothing."""

    def __init__(self, lookup: Callable[[StateKey, str], Any]) -> None:
        self.get = lookup

    def time(self, key: StateKey, kind: str) -> None:
        return None

    def record(self, states: Mapping[StateKey, Any], time: float | None = None) -> None:
        pass


def compare_references(plan: ProbePlan, measurement: Measurement,
                       references: ReferenceBook | Callable[[StateKey, str], Any] | None,
                       time: float | None = None) -> Measurement:
    """``measurement`` with its reference probes' comparisons added — every consumer's one
    place for them (the Monitor in each mode, ``analyze``, :func:`evaluate`).

    Each state of ``measurement`` is compared (:meth:`ProbePlan.compare`) with the states
    ``references`` holds (a :class:`ReferenceBook`, then updated with this evaluation's
    states at ``time``; or a callable ``(key, kind) -> state``); ``time`` is this
    evaluation's (learning rate × step), for rates such as the kernel velocity."""
    if not (plan.references and measurement.states):
        return measurement
    if references is None:
        raise ValueError(f"probes {[p.name for p in plan.probes if p.reference]} compare "
                         "with other evaluations: pass references=")
    book = references if isinstance(references, ReferenceBook) else _Lookup(references)
    out = measurement | plan.compare(measurement.states, book.get, time,
                                     book.time if isinstance(book, ReferenceBook) else None)
    book.record(out.states, time)
    return out


def forward_pass(model: torch.nn.Module, layers: Sequence[str],
                 batches: Iterable[tuple[Any, Any, Any]], reduce: str = "flatten",
                 sink: Callable[[str, torch.Tensor, Any], None] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The probe batch through ``model`` under ``torch.no_grad``, with ``layers`` captured by
    forward hooks (:class:`probes.capture.capture`, token reduction ``reduce``).

    Parameters
    ----------
    batches : iterable of ``(inputs, labels, mask)``
        ``inputs`` go to ``model(inputs)`` (a mapping as keyword arguments); ``labels`` (or
        ``None``) are handed to ``sink`` with that batch's features; ``mask`` (``(batch,
        tokens)``, 1 = real token, or ``None``) is the padding mask of the token reduction.
    sink : callable ``(layer, features, labels) -> None``, optional
        Streams each batch's reduced features of each layer (e.g. into
        :meth:`ProbePlan.update`); nothing is kept.

    Returns
    -------
    dict
        Without ``sink``: ``{layer: features of all batches}`` (detached; copies where they
        would alias the model's outputs); with ``sink``: ``{}``.

    The caller sets the model's mode (the probes run in eval mode).
    """
    from traindyn.probes.capture import capture

    current: dict[str, Any] = {}
    hook = None if sink is None else (
        lambda layer, x: sink(layer, x, current.get("labels")))
    with torch.no_grad(), capture(model, layers, reduce=reduce, sink=hook) as cap:
        for inputs, labels, mask in batches:
            current["labels"] = labels
            cap.attention_mask = mask
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(inputs)
    return {} if sink is not None else cap.activations()


def measure(plan: ProbePlan, model: torch.nn.Module, state: Any = None, model_inputs: Any = None,
            targets: Any = None, instances: Mapping[str, Callable[..., Any]] | None = None
            ) -> Measurement:
    """Every probe of ``plan`` after the forward pass: the per-layer probes from ``state``
    (what :func:`forward_pass` streamed into :meth:`ProbePlan.start`'s state; ``None``: no
    per-layer probes), the parameter probes of ``model``'s weights and the model probes on
    ``model_inputs`` (with ``targets``; ``instances``: :meth:`ProbePlan.model_instances`)."""
    out = Measurement()
    if state is not None:
        out = out | plan.layer_values(state)
    out = out | plan.parameter_values(model)
    if plan.model_probes:
        out = out | plan.model_values(model, model_inputs, targets, instances)
    return out


def _measure(plan: ProbePlan, model: torch.nn.Module, batches: list[Any], labels: list[Any],
             masks: list[Any], reduce: str, targets: Any, model_inputs: Any,
             instances: Mapping[str, Callable[..., Any]] | None) -> Measurement:
    """The forward pass and every probe of :func:`evaluate` (the model in eval mode)."""
    state = None
    if plan.has_layer_probes:
        state = plan.start()
        forward_pass(model, plan.layers, zip(batches, labels, masks, strict=True), reduce,
                     sink=lambda layer, x, y: plan.update(state, layer, x, y))
    if plan.model_probes and model_inputs is None:
        model_inputs = batches[0] if len(batches) == 1 else (
            torch.cat(batches) if all(isinstance(b, torch.Tensor) for b in batches)
            else batches)
    return measure(plan, model, state, model_inputs, targets, instances)


def evaluate(plan: ProbePlan, model: torch.nn.Module, batches: Iterable[Any],
             labels: Iterable[Any] | None = None, reduce: str = "flatten",
             masks: Iterable[Any] | None = None, targets: Any = None,
             model_inputs: Any = None, instances: Mapping[str, Callable[..., Any]] | None = None,
             references: ReferenceBook | Callable[[StateKey, str], Any] | None = None,
             time: float | None = None) -> Measurement:
    """Every probe of ``plan`` on ``model``: one streamed forward pass over ``batches``, then
    the parameter and model probes, then the reference comparisons.

    Parameters
    ----------
    batches : iterable
        Inputs for ``model(batch)`` (a mapping goes as keyword arguments).
    labels, masks : iterables, optional
        Per batch: integer labels (for labelled probes) and token masks (for the reduction).
    targets, model_inputs : optional
        What ``model`` probes receive (``model_inputs`` defaults to the batches concatenated).
    references : ReferenceBook or callable ``(key, kind) -> state``, optional
        Where reference probes find other evaluations' states (a :class:`ReferenceBook` is
        also updated with this evaluation's states).
    time : float, optional
        This evaluation's time (learning rate × step), for rates (kernel velocity).

    The model is evaluated in eval mode (Dropout off, BatchNorm on its running statistics);
    every module's train/eval flag is restored afterwards.
    """
    batches = list(batches)
    labels = list(labels) if labels is not None else [None] * len(batches)
    masks = list(masks) if masks is not None else [None] * len(batches)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()   # Dropout off, BatchNorm on its running statistics; restored below
    try:
        out = _measure(plan, model, batches, labels, masks, reduce, targets, model_inputs,
                       instances)
    finally:
        for module, mode in modes:
            module.training = mode
    return compare_references(plan, out, references, time)
