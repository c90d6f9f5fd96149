"""The monitor's evaluator: one evaluation from the model (training side) and captured
features (wherever the feature probes run) to its Dataset.

:class:`Evaluator` is a small picklable object (the probe plan, labels, learning rate, seed,
source, reduce, reference books) shared by the monitor's three modes: it runs on the training
thread, on a worker thread, or in the worker process (:mod:`dynamics._monitor_worker`).  It
measures through :mod:`probes.evaluation` (forward pass, probes, reference comparisons) and
builds the Dataset with :func:`dynamics.measurement_dataset.build`; the monitor schedules and
transports.

Used by :mod:`dynamics.monitor`; not public.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from traindyn.dynamics import measurement_dataset, records
from traindyn.probes.evaluation import (
    Measurement,
    ProbePlan,
    ReferenceBook,
    compare_references,
    forward_pass,
)
from traindyn.probes.registry import RESERVED

__all__ = ["Evaluator", "to_numpy"]


def to_numpy(features: torch.Tensor) -> np.ndarray:
    """A detached CPU numpy copy of captured features (one device-to-host copy on CUDA).

    ``bfloat16`` (which numpy lacks) becomes ``float32``: exact, and the probes compute in
    float64 anyway."""
    t = features.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    t = t.cpu() if t.device.type != "cpu" else t.clone()
    return t.numpy()


class Evaluator:
    """Features → probe values → one evaluation's Dataset (picklable when its probes are).

    Holds the :class:`probes.evaluation.ProbePlan` and the in-memory reference states of the
    per-layer probes that compare with the first or previous evaluation, so one instance
    lives as long as the monitor (in the worker process, in process mode).

    Parameters
    ----------
    plan : ProbePlan
    labels : tensor, optional
        Labels of the probe data, for labelled probes.  Kept on the host (copied there once,
        here), where the probes' class bookkeeping runs without waiting for the device;
        pickled as a numpy array.
    learning_rate, seed, source, reduce
        As in :class:`dynamics.monitor.Monitor`.
    """

    def __init__(self, plan: ProbePlan, labels: Any, learning_rate: float | None,
                 seed: int | None, source: str, reduce: str,
                 model_references: ReferenceBook | None = None) -> None:
        self.plan = plan
        self.layers = list(plan.layers)
        if isinstance(labels, torch.Tensor) and labels.device.type != "cpu":
            labels = labels.detach().cpu()  # once: the class bookkeeping is done on the host
        self.labels = labels
        self.learning_rate = learning_rate
        self.seed = seed
        self.source = source
        self.reduce = reduce
        self.references = ReferenceBook(plan)  # feature probes (and parameter snapshots)
        # model probes and parameter probes measured on the training side
        self.model_references = model_references or ReferenceBook(plan)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.labels, torch.Tensor):
            state["labels"] = to_numpy(self.labels)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.labels, np.ndarray):
            self.labels = torch.from_numpy(self.labels)

    def check_scalars(self, scalars: Mapping[str, Any]) -> None:
        """Refuse scalars named like a probe's variable or a coordinate (``ValueError``): the
        Dataset would hold one of the two values under that name."""
        taken = [name for name in scalars if name in self.plan.variables() or name in RESERVED]
        if taken:
            owners = {v: p.name for p in self.plan.probes for v in p.variables}
            what = ", ".join(f"{n!r} (a variable of probe {owners[n]!r})" if n in owners
                             else f"{n!r} (a coordinate)" for n in taken)
            raise ValueError(f"scalars {what} would overwrite what the monitor records under "
                             "that name; pass them under another name (e.g. "
                             f"{taken[0] + '_user'}=...)")

    def time(self, step: int | None) -> float | None:
        """The evaluation's time, learning rate × ``step`` (1 × step without a learning
        rate)."""
        return None if step is None else records.time_of(step, self.learning_rate)

    def features(self, model: torch.nn.Module, batches: Sequence[Any]
                 ) -> dict[str, torch.Tensor]:
        """Features of every plan layer on the probe batches, in eval mode
        (:func:`probes.evaluation.forward_pass`; call inside the preserved state): detached
        values that share no memory with the model's outputs, so neither in-place
        operations later in the forward pass nor later training can change them."""
        model.eval()
        return forward_pass(model, self.layers, ((batch, None, None) for batch in batches),
                            self.reduce)

    def model_measurement(self, model: torch.nn.Module, inputs: Any, targets: Any,
                          instances: Mapping[str, Any], step: int, parameters: bool = True
                          ) -> Measurement:
        """Parameter (unless ``parameters=False``) and model probes of ``model``, compared
        with their references (call inside the preserved state; the model probes run in
        eval mode)."""
        plan = self.plan
        out = plan.parameter_values(model) if parameters else Measurement()
        if plan.model_probes:
            model.eval()
            out = out | plan.model_values(model, inputs, targets, instances)
        return compare_references(plan, out, self.model_references, self.time(step))

    def model_side(self, model: torch.nn.Module, inputs: Any, targets: Any,
                   instances: Mapping[str, Any], step: int, due: bool, parameters: bool = True
                   ) -> Measurement:
        """:meth:`model_measurement` if the model probes are ``due``, else NaN for the scalar
        variables of the parameter and model probes."""
        if not due:
            return self.not_due(("parameters", "model"))
        return self.model_measurement(model, inputs, targets, instances, step, parameters)

    def synchronous(self, model: torch.nn.Module, batches: Sequence[Any], inputs: Any,
                    targets: Any, instances: Mapping[str, Any], step: int,
                    features_due: bool = True, model_due: bool = True) -> Measurement:
        """One evaluation on the training thread (call inside the preserved state): the
        feature probes of the captured features, then the parameter and model probes (NaN
        for the scalar variables of a family not due)."""
        with torch.no_grad():
            if not features_due:
                features = self.not_due(("features", "labelled_features"))
            elif self.plan.has_layer_probes:
                features = self.feature_measurement(self.features(model, batches), step)
            else:
                features = Measurement()
        return features | self.model_side(model, inputs, targets, instances, step, model_due)

    def not_due(self, kinds: tuple[str, ...]) -> Measurement:
        """NaN for the scalar variables of the probe kinds not due at this step (so every
        evaluation records the same variables; array-valued ones are left out)."""
        out = Measurement()
        for probe in self.plan.probes:
            if probe.consumes not in kinds:
                continue
            for name, var in probe.variables.items():
                if var.dims:
                    continue
                if probe.per_layer:
                    if self.layers:
                        out.layer_values[name] = dict.fromkeys(self.layers, float("nan"))
                else:
                    out.values[name] = float("nan")
        return out

    def current_values(self, feats: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``{variable: values over layers}`` of the scalar feature probes that compare with
        no other evaluation (no reference state is kept or advanced)."""
        plan = ProbePlan([p for p in self.plan.feature_probes if not p.reference], self.layers)
        return plan.layer_values(plan.accumulate(feats, self.labels)).per_layer(self.layers)

    def feature_measurement(self, feats: Mapping[str, Any], step: int | None = None
                            ) -> Measurement:
        """The per-layer feature probes of captured features (shared accumulators; reference
        probes compared with this evaluator's first/previous states)."""
        plan = self.plan
        if not plan.has_layer_probes:
            return Measurement()
        with torch.no_grad():
            return self._compared(plan.layer_values(plan.accumulate(feats, self.labels)), step)

    def parameter_measurement(self, weights: Mapping[str, Any], step: int | None = None
                              ) -> Measurement:
        """The parameter probes of a weight snapshot (:meth:`ProbePlan.weights`), compared
        with this evaluator's first/previous states (thread mode: the worker computes them, so
        that their solves overlap training)."""
        with torch.no_grad():
            return self._compared(self.plan.parameter_values(weights), step)

    def _compared(self, out: Measurement, step: int | None) -> Measurement:
        """``out`` with its reference probes compared with this evaluator's first/previous
        states (at time learning rate × ``step``, as the Monitor's model probes), which are
        then recorded."""
        return compare_references(self.plan, out, self.references, self.time(step))

    def feature_values(self, feats: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``{variable: values over layers}`` of the scalar per-layer feature probes."""
        return self.feature_measurement(feats).per_layer(self.layers)

    def variable_attrs(self, name: str) -> dict[str, str]:
        """``long_name``, ``units`` and ``source`` of a recorded variable."""
        declared = self.plan.variables().get(name)
        return dict(declared[1]) if declared else records.variable_attrs(name)

    def attrs(self) -> dict[str, Any]:
        """The Dataset attributes ``source`` and ``parameters``."""
        return {
            "source": self.source,
            "parameters": records.params_attr(dict(
                probes=self.plan.names(), layers=self.layers, reduce=self.reduce,
                learning_rate=self.learning_rate,
                probe_kwargs={p.name: dict(p.kwargs) for p in self.plan.probes if p.kwargs})),
        }

    def build(self, step: int, measurement: Measurement, scalars: Mapping[str, float]
              ) -> xr.Dataset:
        """One evaluation as a Dataset with a length-1 ``step`` dimension
        (:func:`dynamics.measurement_dataset.build`)."""
        self._surface(step, measurement)
        ds = measurement_dataset.build([step], [measurement], layers=self.layers,
                                       declared=self.plan.variables(),
                                       learning_rate=self.learning_rate, seed=self.seed,
                                       scalars=[scalars])
        ds.attrs = self.attrs()
        return ds

    def _surface(self, step: int, measurement: Measurement) -> None:
        """Re-raise the probes' warnings of an evaluation as ``RuntimeWarning`` (each text once
        per monitor), so a NaN's reason is not lost: a Monitor's Dataset has no notes."""
        seen = self.__dict__.setdefault("_surfaced", set())
        filed = {t for notes in measurement.layer_notes.values() for t in notes}
        texts = [*(t for t in measurement.notes if t not in filed),
                 *(f"layer {layer!r}: {t}" for layer, notes in measurement.layer_notes.items()
                   for t in notes)]
        for text in dict.fromkeys(texts):
            if text not in seen:
                seen.add(text)
                warnings.warn(f"traindyn Monitor, step {step}: {text}", RuntimeWarning,
                              stacklevel=3)

    def evaluate(self, step: int, feats: Mapping[str, Any] | None, extra: Measurement,
                 scalars: Mapping[str, float], weights: Mapping[str, Any] | None = None
                 ) -> xr.Dataset:
        """Feature probes of ``feats`` (``None``: none) and parameter probes of ``weights``
        (a snapshot; ``None``: measured on the training side, in ``extra``), merged with
        ``extra`` (the model probes), as one evaluation's Dataset."""
        measurement = (self.feature_measurement(feats, step) if feats is not None
                       else Measurement())
        if weights is not None:
            measurement = measurement | self.parameter_measurement(weights, step)
        return self.build(step, measurement | extra, scalars)
