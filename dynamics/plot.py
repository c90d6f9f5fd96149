"""Plots from Datasets: theory as lines, measurements as points with their seed spread.

Thin on purpose: every number comes from a Dataset computed elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

__all__ = ["compare", "metric_over_steps", "save_figure"]


def _label(da: xr.DataArray) -> str:
    name = da.attrs.get("long_name", da.name)
    units = da.attrs.get("units")
    return f"{name} [{units}]" if units and units != "1" else str(name)


def _spread(da: xr.DataArray, dim: str = "seed") -> tuple[xr.DataArray, xr.DataArray | None]:
    if dim in da.dims and da.sizes[dim] > 1:
        return da.mean(dim), da.std(dim)
    return (da.squeeze(dim, drop=True) if dim in da.dims else da), None


def compare(
    theory: xr.Dataset | None,
    measured: xr.Dataset | None,
    var: str,
    x: str = "time",
    hue: str | None = None,
    ax: plt.Axes | None = None,
    logx: bool = True,
    logy: bool = False,
) -> plt.Axes:
    """Draw ``theory[var]`` as lines and ``measured[var]`` as points (mean ± std over seeds).

    ``x`` is a coordinate present in both (``time`` by default, so gradient-flow theory and
    discrete training share the axis); ``hue`` is a dimension drawn as separate colours.  With
    ``logx`` the points at ``x <= 0`` (step 0) are left out of the drawing.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    hues = [None]
    for ds in (theory, measured):
        if ds is not None and hue is not None and hue in ds[var].dims:
            hues = list(ds[hue].values)
            break
    for i, h in enumerate(hues):
        colour = colours[i % len(colours)]
        label = f"{hue} = {h:g}" if h is not None and np.isscalar(h) and not isinstance(h, str) \
            else (f"{hue} = {h}" if h is not None else None)
        if theory is not None:
            da = theory[var] if h is None else theory[var].sel({hue: h})
            if logx:
                da = da.where(da[x] > 0, drop=True)
            ax.plot(np.asarray(da[x]), np.asarray(da), "-", color=colour, lw=1.6,
                    label=f"theory{', ' + label if label else ''}")
        if measured is not None:
            da = measured[var] if h is None else measured[var].sel({hue: h})
            if logx:
                da = da.where(da[x] > 0, drop=True)
            mean, std = _spread(da)
            xs = np.asarray(mean[x])
            ax.errorbar(xs, np.asarray(mean), yerr=None if std is None else np.asarray(std),
                        fmt="o", ms=3.5, color=colour, capsize=2, lw=0.8,
                        label=f"measured{', ' + label if label else ''}")
    ax.set_xlabel(x)
    ref = theory if theory is not None else measured
    ax.set_ylabel(_label(ref[var]))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7, frameon=False)
    return ax


def _linthresh(coord: xr.DataArray) -> float:
    values = np.asarray(coord, dtype=float)
    positive = values[values > 0]
    return float(positive.min()) if positive.size else 1.0


def metric_over_steps(
    ds: xr.Dataset, var: str, x: str = "step", ax: plt.Axes | None = None, logx: bool = True
) -> plt.Axes:
    """One line per layer of ``ds[var]`` over ``x`` (mean over seeds, shaded ± std)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    da = ds[var]
    layers: Sequence = list(ds["layer"].values) if "layer" in da.dims else [None]
    for layer in layers:
        sub = da if layer is None else da.sel(layer=layer)
        mean, std = _spread(sub)
        xs = np.asarray(mean[x], dtype=float)
        (line,) = ax.plot(xs, np.asarray(mean), "o-", ms=3, lw=1.2,
                          label=None if layer is None else str(layer))
        if std is not None:
            ax.fill_between(xs, np.asarray(mean - std), np.asarray(mean + std),
                            color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(x)
    ax.set_ylabel(_label(da))
    if logx:
        ax.set_xscale("symlog", linthresh=_linthresh(ds[x]))
    if layers != [None]:
        ax.legend(fontsize=7, frameon=False, title="layer", title_fontsize=7)
    return ax


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG (150 dpi) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
