"""The probe contract: what a probe consumes and returns, declared once, next to its function.

Every consumer — :class:`dynamics.Monitor` (all three modes), ``traindyn analyze`` and
``dynamics.sweep`` — reads the same declaration and evaluates probes through the one
function :func:`probes.evaluation.evaluate` (or its steps, :class:`probes.evaluation.ProbePlan`).
Nothing in ``dynamics`` guesses a probe's needs from its name or signature.

A probe (:class:`Probe`) declares
------------------------------------
``name``
    The registry key (also the variable name of a single-valued probe).
``consumes`` (one of :data:`CONSUMES`)
    ``"features"`` — the ``(n, d)`` captured features of one layer: ``fn(features, **kw)``;
    ``"labelled_features"`` — features and integer labels of the probe data:
    ``fn(features, labels, **kw)``;
    ``"parameters"`` — the weight of one layer (module ``layer``'s ``weight``, ``ndim ≥ 2``):
    ``fn(weight, **kw)``;
    ``"model"`` — the whole model on the probe batch: ``fn(model, inputs, targets, **kw)``
    (a function with a ``layers`` parameter receives the evaluation's layers unless the probe
    binds its own; DataArray values over ``layer`` must use those layer names).
    The first three give ``(step, layer, …)`` variables, ``"model"`` gives ``(step, …)``.
``variables``
    ``{name: Variable(long_name, units, dims)}`` — every variable it returns with the dims
    *beyond* ``step`` (and ``layer`` for per-layer probes), so a Dataset is built and validated
    without importing the probe's module.  A function may return a number (for a one-variable
    probe), a mapping ``{variable: number or array}``, an ``xarray.Dataset`` or, for ``model``
    probes, ``xarray.DataArray`` values with their own dims.
``accumulator`` and ``from_accumulator``
    Streaming: the name of a shared statistic (:class:`Accumulator`, e.g. ``"spectrum"`` — the
    float64 second moment of a layer that RankMe, alpha-ReQ and the effective ranks all read —
    or ``"class_stats"`` — class counts, means and within-class scatter for NC1–NC4 and CDNV)
    and ``from_accumulator(view, **kw)``, which computes the probe's values from it.  Probes
    that name the same accumulator share one pass over the features and one set of solves.
    ``from_accumulator`` may answer with a :class:`probes._pending.Pending` (device tensors
    and a host-side ``finish``): the plan then reads the numbers of every such probe of every
    layer in one device-to-host copy, after all of them have been queued on the device — the
    built-in accumulators' probes do, and an evaluation waits for the device once
    (``tests/probes/test_host_sync.py``).
``reference``
    ``()`` or a tuple drawn from :data:`REFERENCES` (``"first"``, ``"previous"``, ``"final"``):
    the probe compares this evaluation with another's state.  Its ``fn`` (or
    ``from_accumulator``) then returns ``(values, state)`` — values that need no reference
    (may be empty) and the state to keep (a numpy array or a flat mapping of them) — and
    ``compare(state, reference, **kw)`` returns the comparisons, where ``reference`` is
    ``{kind: state of that evaluation, or None}`` (``None``: no such evaluation yet — the first
    step has no previous one; the first evaluation's ``"first"`` is its own state).  The
    answer may be one :class:`probes._pending.Pending` for both, or ``(values, state)`` with
    either part pending (the CKA probes' states are): it comes in the plan's one fetch, for
    feature and model probes alike.  The caller keeps the states — in memory in the Monitor,
    on disk beside the parts in ``analyze`` (so a resumed analysis sees the same references,
    and the states of a series can be computed in parallel before the comparisons).
``factory``
    Only for stateful ``model`` probes written before this contract (``factory()`` returns the
    callable; kept per run): usable in the Monitor; ``analyze`` refuses them because their state
    cannot be resumed.

How to add a probe
------------------
::

    import torch
    from traindyn.probes.registry import Probe, Variable, register

    def mean_norm(features):                 # plain math: arrays in, a number out
        return float(torch.as_tensor(features).double().norm(dim=1).mean())

    register(Probe("mean_norm", "features", {"mean_norm": Variable("mean feature norm")},
                   source="my lab (2026)", fn=mean_norm))
    # now: Monitor(model, probes=["mean_norm", "rankme"], ...), traindyn analyze --probes
    # mean_norm (with --import mymodule), dynamics.sweep(...) — nothing else to change.

The registry module imports no probe module.  Built-in probes are registered by their own
modules (``probes.spectral``, ``probes.collapse``, ``probes.weights``, ``probes.ntk``,
``probes.instability`` …), which :func:`get_probe` imports the first time a name is not found.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "ACCUMULATORS",
    "CONSUMES",
    "FEATURE_PROBES",
    "MODEL_PROBES",
    "PROBES",
    "REFERENCES",
    "Accumulator",
    "FeatureProbe",
    "ModelProbe",
    "Probe",
    "Variable",
    "get_feature_probe",
    "get_model_probe",
    "get_probe",
    "register",
    "register_accumulator",
    "register_feature_probe",
    "register_model_probe",
]

CONSUMES = ("features", "labelled_features", "parameters", "model")
"""What a probe can consume (see the module docstring)."""

REFERENCES = ("first", "previous", "final")
"""Which other evaluation a reference-based probe compares with."""

PROVIDERS: list[str] = [
    "traindyn.probes.spectral",
    "traindyn.probes.collapse",
    "traindyn.probes.weights",
    "traindyn.probes.ntk",
    "traindyn.probes.instability",
    "traindyn.probes.similarity",
    "traindyn.probes.invariance",
    "traindyn.probes.readout",
]
"""Modules that register built-in probes; imported (once) when a name is first not found.
A module that does not exist (yet) is skipped."""


@dataclass(frozen=True)
class Variable:
    """One variable a probe returns: attributes and the dims beyond ``step`` (and ``layer``)."""

    long_name: str
    units: str = "1"
    dims: tuple[str, ...] = ()

    def attrs(self, source: str) -> dict[str, str]:
        return {"long_name": self.long_name, "units": self.units, "source": source}


@dataclass(frozen=True)
class Accumulator:
    """A streaming statistic that several probes can share.

    ``factory()`` returns an object with ``update(features)`` (or ``update(features,
    labels)`` when ``needs_labels``); ``view(acc)`` wraps it for one evaluation so that what
    the probes compute from it (eigenvalues, pseudo-inverses) is computed once.
    ``prepare(views)``, if given, receives the views of every layer of one evaluation before
    any probe reads them, so work shared across layers (a batched eigensolve of all layers'
    d × d statistics, on the device where small solves are fastest) can be done together.
    """

    name: str
    factory: Callable[[], Any]
    view: Callable[[Any], Any] = lambda acc: acc  # noqa: E731 - the identity
    needs_labels: bool = False
    prepare: Callable[[list[Any]], None] | None = None


@dataclass(frozen=True, eq=False)
class Probe:
    """A probe's declaration (see the module docstring for each field)."""

    name: str
    consumes: str
    variables: Mapping[str, Variable]
    source: str
    fn: Callable[..., Any] | None = None
    accumulator: str | None = None
    from_accumulator: Callable[..., Any] | None = None
    reference: tuple[str, ...] = ()
    compare: Callable[..., Any] | None = None
    factory: Callable[[], Callable[..., Any]] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.consumes not in CONSUMES:
            raise ValueError(f"probe {self.name!r}: consumes={self.consumes!r}; use one of "
                             f"{CONSUMES}")
        bad = [r for r in self.reference if r not in REFERENCES]
        if bad:
            raise ValueError(f"probe {self.name!r}: unknown reference {bad}; use {REFERENCES}")
        if self.fn is None and self.from_accumulator is None and self.factory is None:
            raise ValueError(f"probe {self.name!r} needs fn, from_accumulator or factory")
        if (self.accumulator is None) != (self.from_accumulator is None):
            raise ValueError(f"probe {self.name!r}: accumulator and from_accumulator go "
                             "together")
        if not self.variables:
            raise ValueError(f"probe {self.name!r} declares no variables")
        object.__setattr__(self, "variables", {
            k: v if isinstance(v, Variable) else Variable(*v) for k, v in self.variables.items()})
        object.__setattr__(self, "reference", tuple(self.reference))
        if self.reference and self.compare is None:
            raise ValueError(f"reference probe {self.name!r} needs compare=")

    @property
    def per_layer(self) -> bool:
        """Whether the probe gives one value per layer (all but ``model`` probes)."""
        return self.consumes != "model"

    @property
    def needs_labels(self) -> bool:
        return self.consumes == "labelled_features"

    @property
    def streams(self) -> bool:
        """Whether it can be computed batch by batch, never holding all features."""
        return self.accumulator is not None

    # backward-compatible names of the earlier registry
    @property
    def long_name(self) -> str:
        return next(iter(self.variables.values())).long_name

    @property
    def units(self) -> str:
        return next(iter(self.variables.values())).units

    def with_kwargs(self, **kwargs: Any) -> Probe:
        """The same probe with parameters bound (``get_probe("alpha_req").with_kwargs(
        fit_range=(3, 100))``)."""
        return replace(self, kwargs={**self.kwargs, **kwargs})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the one-shot function (``probe(features)``, ``probe(features, labels)`` …);
        an answer left on the device (a :class:`probes._pending.Pending`, alone or in a
        ``(values, state)`` pair) is read at once, so a direct call always returns values.
        :class:`probes.evaluation.ProbePlan` calls ``fn`` itself and reads every probe's
        pending values together."""
        if self.fn is None:
            raise TypeError(f"probe {self.name!r} has no one-shot function")
        from traindyn.probes._pending import read_answer  # torch: not at this module's import

        return read_answer(self.fn(*args, **{**self.kwargs, **kwargs}))

    def __repr__(self) -> str:
        return f"Probe({self.name!r}, consumes={self.consumes!r}, " \
               f"variables={list(self.variables)})"


PROBES: dict[str, Probe] = {}
"""Every registered probe by name."""

ACCUMULATORS: dict[str, Accumulator] = {}
"""Shared streaming statistics by name."""


def register(probe: Probe) -> Probe:
    """Add (or replace) a probe and return it."""
    if not isinstance(probe, Probe):
        raise TypeError(f"register takes a Probe; got {type(probe).__name__}")
    if probe.accumulator is not None and probe.accumulator not in ACCUMULATORS:
        raise KeyError(f"probe {probe.name!r} names accumulator {probe.accumulator!r}, which "
                       "is not registered (register_accumulator first)")
    PROBES[probe.name] = probe
    return probe


def register_accumulator(accumulator: Accumulator) -> Accumulator:
    """Add (or replace) a shared streaming statistic."""
    ACCUMULATORS[accumulator.name] = accumulator
    return accumulator


_loaded = False


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def get_probe(name: str | Probe) -> Probe:
    """A registered probe by name (a :class:`Probe` is returned as it is).

    Raises ``KeyError`` listing the known names."""
    if isinstance(name, Probe):
        return name
    if name not in PROBES:
        _load_providers()
    try:
        return PROBES[name]
    except KeyError:
        raise KeyError(f"unknown probe {name!r}; available: {', '.join(sorted(PROBES))}"
                       ) from None


def all_probes() -> dict[str, Probe]:
    """Every probe, built-in providers loaded."""
    _load_providers()
    return dict(PROBES)


# --- the earlier two-kind registry, as views over the one registry --------------------------
class _KindView(MutableMapping):
    """``FEATURE_PROBES`` / ``MODEL_PROBES``: the registered probes of some kinds."""

    def __init__(self, kinds: tuple[str, ...]) -> None:
        self.kinds = kinds

    def _items(self) -> dict[str, Probe]:
        _load_providers()
        return {k: p for k, p in PROBES.items() if p.consumes in self.kinds}

    def __getitem__(self, key: str) -> Probe:
        return self._items()[key]

    def __setitem__(self, key: str, probe: Probe) -> None:
        PROBES[key] = probe

    def __delitem__(self, key: str) -> None:
        if key not in self._items():
            raise KeyError(key)
        del PROBES[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


FEATURE_PROBES: MutableMapping[str, Probe] = _KindView(
    ("features", "labelled_features", "parameters"))
MODEL_PROBES: MutableMapping[str, Probe] = _KindView(("model",))


def FeatureProbe(name: str, fn: Callable[..., Any], long_name: str, units: str,  # noqa: N802
                 source: str) -> Probe:
    """A single-valued ``features`` probe (the earlier registry's constructor)."""
    return Probe(name, "features", {name: Variable(long_name, units)}, source, fn=fn)


def ModelProbe(name: str, factory: Callable[[], Callable[..., Any]],  # noqa: N802
               variables: Mapping[str, tuple[str, str]], source: str) -> Probe:
    """A stateful ``model`` probe made by ``factory()`` (the earlier registry's constructor)."""
    return Probe(name, "model", {k: Variable(*v) for k, v in variables.items()}, source,
                 factory=factory)


def register_feature_probe(name: str, fn: Callable[..., Any], long_name: str, units: str,
                           source: str) -> Probe:
    """Register a single-valued ``features`` probe."""
    return register(FeatureProbe(name, fn, long_name, units, source))


def register_model_probe(name: str, factory: Callable[[], Callable[..., Any]],
                         variables: Mapping[str, tuple[str, str]], source: str) -> Probe:
    """Register a stateful ``model`` probe."""
    return register(ModelProbe(name, factory, variables, source))


def get_feature_probe(name: str) -> Probe:
    """A registered per-layer probe by name (``KeyError`` listing the known ones)."""
    probe = get_probe(name)
    if not probe.per_layer:
        raise KeyError(f"{name!r} is a model probe, not a per-layer probe")
    return probe


def get_model_probe(name: str) -> Probe:
    """A registered model probe by name (``KeyError`` listing the known ones)."""
    probe = get_probe(name)
    if probe.per_layer:
        raise KeyError(f"{name!r} is a per-layer probe, not a model probe")
    return probe
