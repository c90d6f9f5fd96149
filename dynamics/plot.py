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

__all__ = ["checkpoint_series_figures", "compare", "metric_over_steps", "save_figure"]


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


def checkpoint_series_figures(ds: xr.Dataset, folder: str | Path, stem: str = "analyze"
                              ) -> list[Path]:
    """One PNG per ``(step, layer)`` variable of a checkpoint series (``traindyn analyze``):
    the metric over log-step, one line per layer; failed steps dotted.

    A series of one checkpoint is drawn as one point per layer over the layer axis (a step
    axis with one step means nothing); layers whose values are all NaN are left out of the
    drawing and listed in the title.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    steps = ds["step"].values
    ok = ds["status"].values == "ok" if "status" in ds else np.ones(len(steps), bool)
    failed = steps[~ok]
    paths = []
    for name, var in ds.data_vars.items():
        if var.dims != ("step", "layer") or var.dtype.kind not in "fiu":
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        layers = [str(v) for v in ds["layer"].values]
        empty = [layer for layer, col in zip(layers, var.values.T, strict=True)
                 if np.all(np.isnan(col))]
        if int(ok.sum()) <= 1:
            row = var.values[np.argmax(ok)] if ok.any() else np.full(len(layers), np.nan)
            ax.plot(np.arange(len(layers)), row, marker="o")
            ax.set_xticks(np.arange(len(layers)), layers, rotation=45, ha="right", fontsize=7)
            ax.set_xlabel(f"layer (one checkpoint: step {int(steps[np.argmax(ok)])})"
                          if ok.any() else "layer")
        else:
            for layer in layers:
                if layer in empty:
                    continue
                ax.plot(steps, var.sel(layer=layer).values, marker="o", ms=3, label=layer)
            positive = steps[steps > 0]
            if len(steps) and steps.min() <= 0:
                ax.set_xscale("symlog", linthresh=float(positive.min()) if positive.size
                              else 1.0)
            else:
                ax.set_xscale("log")
            for step in failed:
                ax.axvline(step, color="0.6", ls=":", lw=1)
            ax.set_xlabel("step" + (" (dotted: failed checkpoints)" if failed.size else ""))
            if 0 < len(layers) - len(empty) <= 12:
                ax.legend(fontsize=7, title="layer", title_fontsize=7)
        ax.set_ylabel(_label(var))
        title = str(name)
        if empty:
            title += f"  (all NaN: {', '.join(empty[:4])}{' …' if len(empty) > 4 else ''})"
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = folder / f"{stem}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
