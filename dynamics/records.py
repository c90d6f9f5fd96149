"""traindyn's data model: one vocabulary for measured and predicted results, and their files.

Every result is an ``xarray.Dataset``:

* dimensions ``step`` (with the non-dimension coordinate ``time`` = learning rate × step, so
  gradient-flow theory and discrete training share an axis), ``layer`` (module names),
  ``seed``, plus metric-specific ones (``rank``, ``class``, ``sample``, ``load_ratio``, ``n``,
  ``n_features``, ``ridge`` …);
* data variables named after the quantity (``rankme``, ``alpha_req``, ``test_error`` …), each
  with ``long_name`` and ``units`` attributes;
* Dataset attributes with the ``source`` (paper or recipe), ``parameters`` (a JSON string:
  attributes must be plain) and package versions (added by :func:`provenance`).

Files (NetCDF for finished results, Zarr streams during training) are written and read by
:mod:`dynamics.storage` (``storage.save``, ``storage.load`` …).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
import xarray as xr

__all__ = [
    "DIMS",
    "VARIABLES",
    "params_attr",
    "plain_attrs",
    "provenance",
    "step_coords",
    "validate",
    "variable_attrs",
]

DIMS: dict[str, str] = {
    "step": "optimisation step",
    "layer": "module name",
    "seed": "random seed",
    "rank": "eigenvalue rank (1-based)",
    "class": "class label",
    "sample": "sample index",
    "load_ratio": "load ratio α = P/N",
    "n": "number of training samples",
    "n_features": "number of random features",
    "ridge": "ridge regularisation",
    "mode": "kernel eigenmode index (descending eigenvalue)",
    "epsilon": "target test error ε",
    "layer2": "second module name (layer × layer similarity)",
    "checkpoint2": "second checkpoint's step (checkpoint × checkpoint similarity)",
    "transform": "input transformation (name and parameter)",
    "generator": "generator of a continuous transformation (Lie derivative)",
    "angle": "rotation angle",
    "time2": "second time of a two-time kernel (DMFT)",
    "width": "hidden width N of a finite network",
    "gamma0": "richness γ₀ of the mean-field parameterisation",
    "time1": "first time of a two-time kernel (DMFT)",
    "sample2": "second sample index of a kernel",
    "test_sample": "test sample index",
    "iteration": "iteration of a self-consistent solver",
    "alpha": "laziness α of the grokking model (large: lazy)",
}
"""Shared dimension names and their meaning."""

VARIABLES: dict[str, dict[str, str]] = {
    "rankme": {"long_name": "RankMe effective rank (raw singular values)", "units": "1"},
    "rankme_covariance": {"long_name": "RankMe of centred-covariance eigenvalues", "units": "1"},
    "alpha_req": {"long_name": "alpha-ReQ eigenspectrum decay exponent", "units": "1"},
    "alpha_req_r2": {"long_name": "R² of the alpha-ReQ power-law fit", "units": "1"},
    "train_loss": {"long_name": "training loss", "units": "nat"},
    "test_loss": {"long_name": "test loss", "units": "nat"},
    "train_accuracy": {"long_name": "training accuracy", "units": "1"},
    "test_accuracy": {"long_name": "test accuracy", "units": "1"},
    "train_error": {"long_name": "training mean squared error", "units": "1"},
    "test_error": {"long_name": "test mean squared error", "units": "1"},
    "participation_ratio": {"long_name": "participation ratio (Σλ)²/Σλ²", "units": "1"},
    "stable_rank": {"long_name": "stable rank Σλ/λ_max", "units": "1"},
    "effective_rank": {"long_name": "Rényi effective rank", "units": "1"},
    "mode_strength": {"long_name": "input-output mode strength a(t)", "units": "1"},
    "half_rise_time": {"long_name": "time for a mode to reach half its strength", "units": "1"},
    "inductive_bias": {"long_name": "inductive bias -log2 P(error <= ε)", "units": "bit"},
    "class_mean_norm": {"long_name": "norm of the centred class mean", "units": "1"},
    "classifier_norm": {"long_name": "norm of the classifier row", "units": "1"},
}
"""Variables that are not a probe's (losses, recipes' quantities) with their default
attributes.  A probe's variables are declared with the probe (``probes.registry``) and carry
their attributes into every Dataset, so this module needs no probe module;
``tests/test_conformance.py`` checks that a probe and this table agree where both name a
variable."""

_PACKAGES = ("traindyn", "numpy", "scipy", "torch", "jax", "xarray", "h5netcdf", "zarr")


def variable_attrs(name: str, **overrides: str) -> dict[str, str]:
    """Default ``long_name``/``units`` of a known variable, updated with ``overrides``."""
    attrs = dict(VARIABLES.get(name, {"long_name": name.replace("_", " "), "units": "1"}))
    attrs.update(overrides)
    return attrs


def params_attr(params: Mapping[str, Any]) -> str:
    """Parameters as a JSON string, the form attributes take (``json.loads`` reads it back);
    numpy arrays and scalars become lists and numbers, anything else its ``str``."""

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        return str(o)

    return json.dumps(dict(params), sort_keys=True, default=default)


def provenance() -> dict[str, str]:
    """Attributes naming the versions of traindyn and of the packages a result depends on."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"versions": json.dumps(versions, sort_keys=True)}


def time_of(step: Any, learning_rate: float | np.ndarray | None) -> Any:
    """``time = learning_rate × step``: gradient-flow time of a discrete step (``step``
    itself when no learning rate is given)."""
    return (1.0 if learning_rate is None else learning_rate) * step


def step_coords(steps: Any, learning_rate: float | np.ndarray | None) -> dict[str, Any]:
    """Coordinates ``step`` and ``time = learning_rate × step`` for a measured Dataset.

    With no learning rate (``None``), ``time`` equals ``step`` and says so in its attributes.
    """
    steps = np.asarray(steps, dtype=np.int64)
    lr = None if learning_rate is None else np.asarray(learning_rate, dtype=float)
    return {
        "step": ("step", steps, {"long_name": DIMS["step"], "units": "1"}),
        "time": ("step", time_of(steps, lr),
                 {"long_name": "training time, learning rate × step", "units": "1",
                  **({"note": "no learning rate given: time = step"} if learning_rate is None
                     else {})}),
    }


def validate(ds: xr.Dataset) -> xr.Dataset:
    """Check that ``ds`` follows the data model; return it unchanged, or raise ``ValueError``.

    Rules: every data variable has ``long_name`` and ``units``; a ``step`` dimension carries a
    ``time`` coordinate along it; the Dataset has a ``source`` attribute; attributes are plain
    (str, number, or 1-D array of numbers), so the result can be written to NetCDF and Zarr.
    """
    problems = []
    for name, var in ds.data_vars.items():
        for key in ("long_name", "units"):
            if key not in var.attrs:
                problems.append(f"variable {name!r} has no {key!r} attribute")
    if "step" in ds.dims:
        if "time" not in ds.coords or "step" not in ds["time"].dims:
            problems.append("a 'step' dimension needs a 'time' coordinate along it")
    if "source" not in ds.attrs:
        problems.append("the Dataset has no 'source' attribute (paper or recipe)")
    for key, value in ds.attrs.items():
        if not isinstance(value, (str, int, float, np.number, np.ndarray, list, tuple)):
            problems.append(f"attribute {key!r} is a {type(value).__name__}; store it as JSON")
    if problems:
        raise ValueError(
            "Dataset does not follow traindyn's data model:\n- " + "\n- ".join(problems))
    return ds


def plain_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes in the plain form NetCDF and Zarr accept: dicts as JSON strings (see
    :func:`params_attr`), lists of non-numbers as JSON lists, booleans as 0/1, ``None`` as
    ``"None"``."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, (dict, list, tuple)) and not (
            isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
        ):
            out[key] = params_attr(value) if isinstance(value, dict) else json.dumps(list(value))
        elif isinstance(value, bool):
            out[key] = int(value)
        elif value is None:
            out[key] = "None"
        else:
            out[key] = value
    return out

