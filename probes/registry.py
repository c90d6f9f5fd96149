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
    For a ``model`` probe that keeps private state between calls: ``factory()`` returns the
    callable, made once per Monitor.  ``analyze`` refuses such a probe (its state cannot be
    resumed from disk): declare ``reference=`` and ``compare`` instead, which every consumer
    runs.
``requires_labels``
    For a ``model`` probe that needs the class labels of the probe batch (its ``targets``):
    the Monitor and ``analyze`` then refuse to start without ``probe_labels=``, as they do for
    ``labelled_features`` probes, instead of failing at every evaluation.

Names are unique
----------------
A probe name, and every variable name, belongs to one registered probe: :func:`register`
refuses a probe whose name is taken or which declares a variable another registered probe
declares, unless ``replace=True`` (which then removes the probes it collides with), so the
meaning of ``"rankme"`` never depends on import order.  Variables may not be named like the
coordinates of a record (:data:`RESERVED`).  Registering the same declaration again (every
field equal, the same functions) is a no-op.

What a probe receives is read-only
----------------------------------
The features, labels, weights and model inputs handed to a probe are shared with the next
probe (and a layer's weight is the model's own).  A probe must not modify them in place:
:class:`probes.evaluation.ProbePlan` hands numpy arrays over as read-only views and checks the
version counter of every tensor after each probe, raising ``RuntimeError`` naming the probe
and the layer when one was written.  A probe from outside traindyn that returns NaN without
a warning of its own gets a note naming it and the layer.

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

import functools
import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ACCUMULATORS",
    "CONSUMES",
    "PROBES",
    "REFERENCES",
    "RESERVED",
    "Accumulator",
    "Probe",
    "Variable",
    "all_probes",
    "get_probe",
    "register",
    "register_accumulator",
]

CONSUMES = ("features", "labelled_features", "parameters", "model")
"""What a probe can consume (see the module docstring)."""

REFERENCES = ("first", "previous", "final")
"""Which other evaluation a reference-based probe compares with."""

RESERVED = ("step", "time", "layer", "seed")
"""Coordinate names of a record: no probe variable (and no Monitor scalar) may take them."""

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
    ``shares``, if given, names another accumulator whose state this one can read instead of
    forming the same statistic again: when that accumulator is in the plan too (a probe
    reads it), the plan creates it first and calls ``factory(shared=that_accumulator)``; the
    two are fed the same batches.  Otherwise ``factory()`` is called and the accumulator
    keeps its own state.
    """

    name: str
    factory: Callable[[], Any]
    view: Callable[[Any], Any] = lambda acc: acc  # noqa: E731 - the identity
    needs_labels: bool = False
    prepare: Callable[[list[Any]], None] | None = None
    shares: str | None = None


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
    requires_labels: bool = False

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
        reserved = sorted(set(self.variables) & set(RESERVED))
        if reserved:
            raise ValueError(f"probe {self.name!r} declares variables {reserved}, which are "
                             f"coordinate names of a record ({RESERVED}); rename them")
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
        """Whether the probe needs the probe batch's labels (a ``labelled_features`` probe,
        or a model probe declared with ``requires_labels``)."""
        return self.consumes == "labelled_features" or self.requires_labels

    @property
    def streams(self) -> bool:
        """Whether it can be computed batch by batch, never holding all features."""
        return self.accumulator is not None

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


def _same(a: Probe, b: Probe) -> bool:
    """Whether two probes are the same declaration (every field equal, functions identical):
    registering it again (a provider's ``register_probes()`` called twice) changes nothing."""
    return all(_equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(Probe))


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, functools.partial) and isinstance(y, functools.partial):
        return (x.func is y.func and x.args == y.args and x.keywords == y.keywords)
    return x is y or x == y


def _collisions(probe: Probe) -> tuple[bool, dict[str, list[str]]]:
    """Whether ``probe.name`` is taken by another probe, and ``{other probe: [variables it
    shares with probe]}``."""
    taken = (probe.name in PROBES and not _same(PROBES[probe.name], probe)
             and not _same_module(PROBES[probe.name], probe))
    shared: dict[str, list[str]] = {}
    for other in PROBES.values():
        if other.name == probe.name:
            continue
        common = [v for v in probe.variables if v in other.variables]
        if common:
            shared[other.name] = common
    return taken, shared


def _module_of(probe: Probe) -> str | None:
    """The module that defines a probe's function (its fn, factory or accumulator reader)."""
    for fn in (probe.fn, probe.factory, probe.from_accumulator):
        if fn is not None:
            return getattr(fn, "__module__", None)
    return None


def _same_module(old: Probe, new: Probe) -> bool:
    """Whether ``new`` comes from the module that declared ``old``: that module was run again
    (a user's probe file imported anew after an edit), so its declaration replaces its own."""
    module = _module_of(new)
    return module is not None and module == _module_of(old)


def _builtin_caller() -> bool:
    """Whether :func:`register`'s caller is a module of traindyn's probes (a provider being
    imported: loading the other providers from there could import it circularly)."""
    frame = sys._getframe(2)
    return str(frame.f_globals.get("__name__", "")).startswith("traindyn.probes.")


def register(probe: Probe, replace: bool = False) -> Probe:
    """Add a probe and return it.

    Parameters
    ----------
    probe : Probe
    replace : bool
        Replace a registered probe of the same name, and remove every registered probe that
        declares one of this probe's variables.  Without it, either collision raises
        ``ValueError`` naming the probe and the variables.  Registering the same declaration
        again is a no-op, and a probe declared again by the module that declared it (a probe
        file imported anew after an edit) replaces its earlier declaration.

    The built-in probes are loaded first, so a user's probe is checked against them whatever
    the import order.
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"register takes a Probe; got {type(probe).__name__}")
    if probe.accumulator is not None and probe.accumulator not in ACCUMULATORS:
        raise KeyError(f"probe {probe.name!r} names accumulator {probe.accumulator!r}, which "
                       "is not registered (register_accumulator first)")
    if not _loading and not _builtin_caller():
        _load_providers()
    taken, shared = _collisions(probe)
    if (taken or shared) and not replace:
        why = []
        if taken:
            why.append(f"the name {probe.name!r} is already registered "
                       f"({PROBES[probe.name]!r})")
        why += [f"probe {other!r} already declares {names}" for other, names in shared.items()]
        raise ValueError(f"cannot register probe {probe.name!r}: {'; '.join(why)}. A variable "
                         "belongs to one probe; rename yours, or pass replace=True to replace "
                         "the registered one(s)")
    for other in shared:
        PROBES.pop(other, None)
    PROBES[probe.name] = probe
    return probe


def register_accumulator(accumulator: Accumulator) -> Accumulator:
    """Add (or replace) a shared streaming statistic."""
    ACCUMULATORS[accumulator.name] = accumulator
    return accumulator


_loaded = False
_loading = False


def _load_providers() -> None:
    global _loaded, _loading
    if _loaded:
        return
    _loaded = _loading = True
    try:
        for module in PROVIDERS:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise
    finally:
        _loading = False


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
