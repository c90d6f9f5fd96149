"""Helpers that let theory functions return Datasets in traindyn's data model.

The names (``step``, ``time``, ``layer``, ``seed`` …) are those of ``dynamics/records.py``;
theory is the bottom layer and must not import upward, so it builds plain xarray objects with
the same vocabulary, and ``tests/test_conformance.py`` checks that they validate.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xarray as xr


def time_axis(time: Any) -> tuple[np.ndarray, tuple[str, ...], dict[str, Any]]:
    """Values, dims and coords for a time argument.

    A plain array gives a ``time`` dimension.  An ``xarray.DataArray`` (for instance the
    ``time`` coordinate of a measured Dataset, which lies along ``step``) keeps its dims and
    coords, so the prediction lands on exactly the measured coordinates and ``xr.align`` needs
    no glue.
    """
    if isinstance(time, xr.DataArray):
        coords = {name: c for name, c in time.coords.items()}
        from traindyn.theory._validate import float_array

        values = float_array(time.values, "time")
        coords["time"] = (time.dims, values)
        return values, tuple(time.dims), coords
    from traindyn.theory._validate import float_array

    values = np.atleast_1d(float_array(time, "time"))
    if values.ndim != 1:
        raise ValueError(f"time must be 1-D; got shape {values.shape}")
    return values, ("time",), {"time": ("time", values)}


def params_json(params: dict[str, Any]) -> str:
    """Parameters as a JSON string (attributes must be plain)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        return str(o)

    return json.dumps(params, sort_keys=True, default=default)


def theory_attrs(source: str, params: dict[str, Any], **extra: str) -> dict[str, str]:
    """Dataset attributes of a theory prediction."""
    from traindyn.theory import __version__

    return {
        "kind": "theory",
        "source": source,
        "parameters": params_json(params),
        "traindyn_version": __version__,
        **extra,
    }
