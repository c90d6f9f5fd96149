"""Measurements → one ``xarray.Dataset``: the single builder of traindyn's data model.

Every recording path turns :class:`~traindyn.probes.evaluation.Measurement` objects into a
Dataset here, with one rule per kind of value:

* a per-layer number → a ``(step, layer)`` variable (NaN where a layer or step has none);
* a per-layer array or DataArray → ``(step, layer, …)`` (its own dims; a bare array takes the
  probe's declared dims);
* a model-probe number → ``(step,)``; a model-probe DataArray → ``(step, …)``;
* scalars (losses, accuracies) → ``(step,)``;
* optionally the probes' warnings as the string variables ``notes`` ``(step,)`` and
  ``layer_notes`` ``(step, layer)`` (why a value is NaN).

Variable attributes are the probe's declaration (``long_name``, ``units``, ``source``;
:meth:`~traindyn.probes.evaluation.ProbePlan.variables`), else
:func:`~traindyn.dynamics.records.variable_attrs`; coordinates ``step`` and ``time`` come from
:func:`~traindyn.dynamics.records.step_coords`.

Users:

* :class:`~traindyn.dynamics.monitor.Monitor` — one evaluation at a time (:func:`build` with
  one step, on the training thread, a worker thread or the worker process), then
  :func:`concat_steps` over the recorded evaluations;
* :func:`~traindyn.dynamics.analyze.analyze` — the whole checkpoint series at once, from the
  measurement records its part files hold (:func:`to_record` / :func:`from_record`: JSON, so
  an interrupted run resumes from them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from traindyn.dynamics import records
from traindyn.probes.evaluation import Measurement

__all__ = ["build", "concat_steps", "empty", "from_record", "to_record"]

Declared = Mapping[str, tuple[tuple[str, ...], Mapping[str, str]]]
"""``{variable: (dims, attrs)}`` as :meth:`ProbePlan.variables` gives it."""


# -- measurement records (JSON) -----------------------------------------------------------------
def _encode(value: Any) -> Any:
    """A measured value as JSON: a number, or a DataArray as ``to_dict`` (data as lists)."""
    if isinstance(value, xr.DataArray):
        return {"dataarray": value.to_dict(data="list")}
    if isinstance(value, np.ndarray):
        return {"array": value.tolist()}
    return float(value)


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "dataarray" in value:
        return xr.DataArray.from_dict(value["dataarray"])
    if isinstance(value, dict) and "array" in value:
        return np.asarray(value["array"], dtype=float)
    return value


def _missing(value: Any) -> bool:
    return isinstance(value, float) and value != value


def to_record(measurement: Measurement, layers: Sequence[str]) -> dict[str, Any]:
    """A measurement as JSON: ``values`` (per-layer variable → one value per layer, NaN where
    a layer has none), ``model_values``, ``notes`` and ``layer_notes`` (texts joined by
    ``"; "``).  States (arrays) are not part of it."""
    return {
        "values": {name: [_encode(per_layer.get(layer, float("nan"))) for layer in layers]
                   for name, per_layer in measurement.layer_values.items()},
        "model_values": {k: _encode(v) for k, v in measurement.values.items()},
        "notes": "; ".join(measurement.notes),
        "layer_notes": {k: "; ".join(v) for k, v in measurement.layer_notes.items()},
    }


def from_record(record: Mapping[str, Any], layers: Sequence[str]) -> Measurement:
    """The measurement a :func:`to_record` record holds (a NaN layer entry counts as
    missing)."""
    layer_values = {
        name: {layer: value for layer, value in zip(layers, (_decode(v) for v in per_layer),
                                                     strict=True) if not _missing(value)}
        for name, per_layer in record.get("values", {}).items()}
    return Measurement(
        layer_values=layer_values,
        values={k: _decode(v) for k, v in record.get("model_values", {}).items()},
        notes=[record["notes"]] if record.get("notes") else [],
        layer_notes={k: [v] for k, v in record.get("layer_notes", {}).items() if v})


# -- the builder -----------------------------------------------------------------------------------
def _attrs(name: str, declared: Declared) -> dict[str, str]:
    """``long_name``, ``units`` and ``source`` of a variable."""
    found = declared.get(name)
    return dict(found[1]) if found else records.variable_attrs(name)


def _as_dataarray(name: str, value: Any, declared: Declared) -> xr.DataArray:
    if isinstance(value, xr.DataArray):
        return value
    dims = declared.get(name, (("layer",), {}))[0][1:]
    return xr.DataArray(np.asarray(value, dtype=float),
                        dims=dims or tuple(f"{name}_dim_{i}" for i in range(np.ndim(value))))


def _layer_variable(name: str, steps: Sequence[int],
                    rows: Sequence[Mapping[str, Any] | None], layers: Sequence[str],
                    declared: Declared) -> Any:
    """One per-layer variable over ``(step, layer, …)``: an array of numbers, or a DataArray
    when the values carry extra dims (``rows[i]``: step i's ``{layer: value}``, or ``None``)."""
    sample = next((v for row in rows if row for v in row.values()), float("nan"))
    if np.ndim(sample) == 0 and not isinstance(sample, xr.DataArray):
        return np.array([[float(row.get(layer, np.nan)) if row is not None else np.nan
                          for layer in layers] for row in rows], dtype=float)
    template = xr.full_like(_as_dataarray(name, sample, declared), np.nan, dtype=float)
    out = []
    for row in rows:
        items = [_as_dataarray(name, (row or {}).get(layer, template), declared)
                 for layer in layers]
        out.append(xr.concat(items, dim="layer", join="outer"))
    da = (out[0].expand_dims(step=1) if len(out) == 1
          else xr.concat(out, dim="step", join="outer"))
    return da.assign_coords(step=np.asarray(steps, dtype=np.int64),
                            layer=("layer", np.array(layers, dtype=object)))


def _model_variable(name: str, steps: Sequence[int], values: Sequence[Any],
                    declared: Declared) -> Any:
    """One model-probe variable over ``(step, …)`` (``values[i]``: step i's value, or
    ``None``)."""
    sample = next((v for v in values if v is not None), float("nan"))
    if not isinstance(sample, xr.DataArray):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    template = xr.full_like(sample, np.nan, dtype=float)
    rows = [template if v is None else v for v in values]
    da = (rows[0].expand_dims(step=1) if len(rows) == 1
          else xr.concat(rows, dim="step", join="outer"))
    da = da.assign_coords(step=np.asarray(steps, dtype=np.int64))
    da.attrs = {**_attrs(name, declared), **sample.attrs}
    return da


def build(steps: Sequence[int], measurements: Sequence[Measurement | None], *,
          layers: Sequence[str], declared: Declared, learning_rate: float | None = None,
          seed: int | None = None, scalars: Sequence[Mapping[str, float]] | None = None,
          notes: bool = False) -> xr.Dataset:
    """The Dataset of ``measurements`` at ``steps`` (``None``: a step without values, NaN).

    Parameters
    ----------
    steps, measurements : sequences of equal length
    layers : the evaluation's layers (the ``layer`` coordinate, in this order)
    declared : ``{variable: (dims, attrs)}`` of the probes (:meth:`ProbePlan.variables`)
    learning_rate : gives ``time = learning_rate × step``
    seed : stored as a scalar ``seed`` coordinate
    scalars : per step, ``{name: number}`` (losses …), each a ``(step,)`` variable
    notes : add ``notes`` ``(step,)`` and ``layer_notes`` ``(step, layer)`` (the probes'
        warnings; ``""`` where there are none)

    Returns
    -------
    xarray.Dataset
        Without attributes (each caller sets its ``source`` and ``parameters``).
    """
    steps = [int(s) for s in steps]
    coords: dict[str, Any] = records.step_coords(steps, learning_rate)
    layer_names = list(dict.fromkeys(n for m in measurements if m is not None
                                     for n in m.layer_values))
    model_names = list(dict.fromkeys(n for m in measurements if m is not None
                                     for n in m.values))
    if layer_names or notes:
        coords["layer"] = ("layer", np.array(layers, dtype=object))
    data_vars: dict[str, Any] = {}
    for name in layer_names:
        rows = [None if m is None else m.layer_values.get(name) for m in measurements]
        value = _layer_variable(name, steps, rows, layers, declared)
        if isinstance(value, xr.DataArray):
            value.attrs = _attrs(name, declared)
            data_vars[name] = value
        else:
            data_vars[name] = (("step", "layer"), value, _attrs(name, declared))
    for name in model_names:
        values = [None if m is None else m.values.get(name) for m in measurements]
        value = _model_variable(name, steps, values, declared)
        data_vars[name] = (value if isinstance(value, xr.DataArray)
                           else ("step", value, _attrs(name, declared)))
    for name in dict.fromkeys(n for row in scalars or () for n in row):
        data_vars[name] = ("step", np.array([float(row.get(name, np.nan)) for row in scalars],
                                            dtype=float), records.variable_attrs(name))
    if notes:
        data_vars["notes"] = ("step", np.array(
            ["; ".join(m.notes) if m is not None else "" for m in measurements], dtype=object),
            {"long_name": "warnings raised by the probes", "units": ""})
        data_vars["layer_notes"] = (("step", "layer"), np.array(
            [["; ".join(m.layer_notes.get(layer, ())) if m is not None else ""
              for layer in layers] for m in measurements], dtype=object
        ).reshape(len(steps), len(layers)),
            {"long_name": "why a layer's values are NaN (its probes' warnings)", "units": ""})
    if seed is not None:
        coords["seed"] = seed
    return xr.Dataset(data_vars, coords=coords)


def concat_steps(evaluations: Sequence[xr.Dataset]) -> xr.Dataset:
    """One-step Datasets of :func:`build` joined along ``step``; a variable an evaluation
    lacks (a probe family not due at that step) is NaN there."""
    names = {n for ds in evaluations for n in ds.data_vars}
    filled = []
    for ds in evaluations:
        for name in names - set(ds.data_vars):
            template = next(e[name] for e in evaluations if name in e)
            ds = ds.assign({name: xr.full_like(template, np.nan, dtype=float)
                            .assign_coords(step=ds["step"].values)})
        filled.append(ds)
    return xr.concat(filled, dim="step", data_vars="all", coords="minimal",
                     compat="override", join="outer", combine_attrs="override")


def empty(layers: Sequence[str], declared: Declared, learning_rate: float | None = None,
          seed: int | None = None, per_layer: bool = True) -> xr.Dataset:
    """A Dataset of no step: the ``(step, layer)`` variables of ``declared`` with length-0
    ``step`` (``per_layer=False``: coordinates only)."""
    ds = xr.Dataset(coords=records.step_coords([], learning_rate))
    if per_layer:
        ds = ds.assign_coords(layer=("layer", np.array(layers, dtype=object)))
        for name, (dims, attrs) in declared.items():
            if dims == ("layer",):
                ds[name] = (("step", "layer"), np.empty((0, len(layers))), attrs)
    if seed is not None:
        ds = ds.assign_coords(seed=seed)
    return ds
