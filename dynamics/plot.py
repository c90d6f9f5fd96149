"""Figures from Datasets: theory as lines, measurements as points with a stated spread.

Thin on purpose: every number drawn comes from a Dataset (or a probe function) computed
elsewhere; this module only lays it out.

**Backend and state.**  Importing this module changes nothing in matplotlib: it never calls
``matplotlib.use`` and never writes to the global ``rcParams``.  Each figure is drawn inside
``plt.rc_context(STYLE)`` (the house style, local to that drawing), with constrained layout
so that axis labels are not clipped.  Functions return the figure (:func:`run_overview`) or
the axes they drew on (the others; ``ax.figure`` is the figure); :func:`save_figure` writes
one.  In Jupyter the figures show inline, in a script they are written with
:func:`save_figure`; on a non-interactive backend (Agg, the default without a display)
:func:`save_figure` also closes the figure.

**Spread over seeds.**  A measurement with a ``seed`` dimension is drawn as its mean over
seeds with a band chosen by ``band``: ``"sem"`` (default; standard error of the mean,
``std(ddof=1)/√n``), ``"std"`` (sample standard deviation, ``ddof=1``), ``"ci95"`` (95 %
confidence interval of the mean, ``± t_{0.975, n−1} · SEM``, Student's t) or ``None``.  The
legend (or its title) always says which, and over how many seeds.

**Labels.**  Axis labels are built from a variable's ``long_name`` and ``units`` attributes
(``"RankMe [1]"`` is written without the dimensionless unit); the ``time`` coordinate is
labelled ``time = learning rate × step``.

**Why no seaborn.**  Every figure here is a line, scatter or image plot that matplotlib draws
directly; seaborn would add a dependency for one heatmap and a colour palette, and its themes
are set through the global ``rcParams`` (``sns.set_theme``), which this module promises not to
touch.  The palette is the colour-blind-safe one of Okabe & Ito (2008) for categories (layers,
load ratios) and viridis for ordered values (heatmaps, step colour).  seaborn is therefore not
a core dependency of traindyn; a notebook that uses it lists it in the ``notebooks`` extra.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

__all__ = [
    "BANDS",
    "OverviewFigure",
    "PALETTE",
    "STYLE",
    "axis_label",
    "checkpoint_series_figures",
    "cka_heatmap",
    "compare",
    "marchenko_pastur_esd_density",
    "mean_and_band",
    "metric_over_steps",
    "phase_plot",
    "run_overview",
    "save_figure",
    "spectrum",
]

PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
                            "#56B4E9", "#F0E442", "#000000")
"""Okabe & Ito (2008) colour-blind-safe categorical colours (blue first; yellow late)."""

STYLE: dict[str, Any] = {
    "figure.figsize": (5.6, 3.9),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "legend.title_fontsize": 7.5,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": plt.cycler(color=list(PALETTE)),
    "image.cmap": "viridis",
    "lines.markersize": 3.5,
}
"""The house style, applied with ``plt.rc_context`` around each drawing (never globally)."""

BANDS: dict[str | None, str] = {
    "sem": "mean ± SEM",
    "std": "mean ± std",
    "ci95": "mean with 95% CI",
    None: "mean",
}
"""What each ``band=`` choice draws, as the legends say it."""

TIME_LABEL = "time = learning rate × step"
_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}
_BOOKKEEPING = {"duplicate", "duplicate_of"}
_TIMING = ("load_seconds", "forward_seconds", "probe_seconds", "total_seconds", "cpu_seconds")


# ------------------------------------------------------------------------------ helpers
def axis_label(da: xr.DataArray | None, name: str | None = None, width: int = 44) -> str:
    """``"long_name [units]"`` of a variable or coordinate (dimensionless units ``"1"`` and
    empty units left out), wrapped to ``width`` characters; ``time`` gets its convention."""
    if da is None:
        return str(name)
    key = str(name if name is not None else da.name)
    if key == "time":
        units = da.attrs.get("units")
        return TIME_LABEL + (f" [{units}]" if units and units != "1" else "")
    if key == "step":
        return "step (optimiser updates)"
    long_name = str(da.attrs.get("long_name", key))
    units = da.attrs.get("units")
    text = f"{long_name} [{units}]" if units and str(units) != "1" else long_name
    return "\n".join(textwrap.wrap(text, width)) or key


def _check_band(band: str | None) -> None:
    if band not in BANDS:
        raise ValueError(f"band must be one of {list(BANDS)}; got {band!r}")


def mean_and_band(da: xr.DataArray, band: str | None = "sem", dim: str = "seed"
                  ) -> tuple[xr.DataArray, xr.DataArray | None, str]:
    """Mean of ``da`` over ``dim`` and the half-width of the chosen band, with its legend text.

    ``band``: ``"sem"`` = ``s/√n``, ``"std"`` = ``s`` (``s`` the sample standard deviation,
    ``ddof=1``), ``"ci95"`` = ``t_{0.975, n−1} · s/√n`` (the two-sided 95 % Student-t
    interval of the mean), ``None`` = no band.  NaN values are left out (``n`` counts the
    finite values at each point).  Without ``dim`` (or with one entry) there is no band and
    the text says so.
    """
    _check_band(band)
    if dim not in da.dims or da.sizes[dim] < 2:
        one = da.squeeze(dim, drop=True) if dim in da.dims else da
        return one, None, "one seed" if dim in da.dims else ""
    n = da.notnull().sum(dim)
    mean = da.mean(dim)
    n_max = int(n.max()) if n.size else 0
    if band is None:
        return mean, None, f"mean over {n_max} seeds"
    sd = da.std(dim, ddof=1)
    if band == "std":
        half = sd
    else:
        half = sd / np.sqrt(n.where(n > 0))
        if band == "ci95":
            from scipy import stats

            dof = np.asarray((n - 1).where(n > 1), dtype=float)
            half = half * xr.DataArray(stats.t.ppf(0.975, dof), dims=n.dims, coords=n.coords)
    return mean, half, f"{BANDS[band]} over {n_max} seeds"


def _positive_min(values: Any) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return float(arr.min()) if arr.size else 1.0


def _log_x(ax: plt.Axes, xs: Any) -> None:
    """Log x axis.  When ``x = 0`` (step 0) is among the values, a symmetric-log axis with a
    short linear stretch from 0 to the first positive value, ticked at 0 and at the decades
    above it (so that no tick label of the linear stretch collides with 0)."""
    from matplotlib import ticker

    xs = np.asarray(xs, dtype=float)
    xs = xs[np.isfinite(xs)]
    if not xs.size or np.nanmin(xs) > 0:
        ax.set_xscale("log")
        return
    first = _positive_min(xs)
    top = float(xs.max()) if xs.max() > 0 else 1.0
    ax.set_xscale("symlog", linthresh=first, linscale=0.35)
    decades = np.arange(math.ceil(math.log10(first)), math.floor(math.log10(top)) + 1)
    ticks = [0.0, *(10.0 ** decades)]
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: "0" if v == 0 else f"$10^{{{int(round(math.log10(v)))}}}$"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlim(-0.25 * first, top * 1.6)


def _new_axes(figsize: tuple[float, float] | None = None) -> plt.Axes:
    _, ax = plt.subplots(figsize=figsize or STYLE["figure.figsize"], layout="constrained")
    return ax


def _hue_label(hue: str, value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{hue} = {value:g}"
    return f"{hue} = {value}"


# ------------------------------------------------------------------------------ line plots
def compare(
    theory: xr.Dataset | None,
    measured: xr.Dataset | None,
    var: str,
    x: str = "time",
    hue: str | None = None,
    ax: plt.Axes | None = None,
    logx: bool = True,
    logy: bool = False,
    band: str | None = "sem",
) -> plt.Axes:
    """Draw ``theory[var]`` as lines and ``measured[var]`` as points with a band over seeds.

    ``x`` is a coordinate present in both (``time`` by default, so gradient-flow theory and
    discrete training share the axis); ``hue`` is a dimension drawn as separate colours;
    ``band`` is the error bar of the points (module docstring; the legend title says which).
    With ``logx`` the points at ``x <= 0`` (step 0) are left out of the drawing.
    """
    _check_band(band)
    with plt.rc_context(STYLE):
        ax = ax or _new_axes()
        hues: list[Any] = [None]
        for ds in (theory, measured):
            if ds is not None and hue is not None and hue in ds[var].dims:
                hues = list(ds[hue].values)
                break
        spread = ""
        for i, h in enumerate(hues):
            colour = PALETTE[i % len(PALETTE)]
            label = _hue_label(hue, h) if h is not None else None
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
                mean, half, spread = mean_and_band(da, band)
                ax.errorbar(np.asarray(mean[x]), np.asarray(mean),
                            yerr=None if half is None else np.asarray(half), fmt="o",
                            color=colour, capsize=2, lw=0.8,
                            label=f"measured{', ' + label if label else ''}")
        ref = theory if theory is not None else measured
        ax.set_xlabel(axis_label(ref[x] if x in ref.coords else None, x))
        ax.set_ylabel(axis_label(ref[var]))
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        title = (f"points: {spread}" if measured is not None and spread else None)
        ax.legend(title=title)
    return ax


def metric_over_steps(
    ds: xr.Dataset, var: str, x: str = "step", ax: plt.Axes | None = None, logx: bool = True,
    band: str | None = "sem", theory: xr.Dataset | None = None, legend: bool = True,
) -> plt.Axes:
    """One line per layer (or other category dimension) of ``ds[var]`` over ``x``.

    With a ``seed`` dimension: the mean over seeds, shaded with ``band`` (module docstring);
    the legend title says which.  ``theory``, if it holds ``var``, is drawn as dashed lines in
    the same colours.  Steps whose ``status`` is not ``"ok"`` are marked by dotted vertical
    lines.  A layer whose values are all NaN is not drawn; the legend names it.  Colours
    follow the position in the category coordinate, so panels of one Dataset agree.
    Returns the axes.
    """
    _check_band(band)
    with plt.rc_context(STYLE):
        ax = ax or _new_axes()
        da = ds[var]
        cat = _category_dim(da)
        cats: Sequence = list(da[cat].values) if cat else [None]
        spread, missing = "", []
        for i, c in enumerate(cats):
            colour = PALETTE[i % len(PALETTE)]
            sub = da if c is None else da.sel({cat: c})
            if not np.isfinite(np.asarray(sub, dtype=float)).any():
                missing.append(str(c))
                continue
            mean, half, spread = mean_and_band(sub, band)
            xs = np.asarray(mean[x], dtype=float)
            label = None if c is None else (str(c) if cat == "layer" else _hue_label(cat, c))
            ax.plot(xs, np.asarray(mean, dtype=float), "o-", ms=3, lw=1.2, color=colour,
                    label=label)
            if half is not None:
                lo, hi = np.asarray(mean - half, float), np.asarray(mean + half, float)
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, lw=0)
            _overlay_theory(ax, theory, var, x, cat, c, colour)
        for s in _failed_x(ds, x):
            ax.axvline(s, color="0.55", ls=":", lw=1)
        ax.set_xlabel(axis_label(ds[x] if x in ds.coords else None, x))
        ax.set_ylabel(axis_label(da))
        if logx:
            _log_x(ax, ds[x].values)
        if missing and cat:
            ax.plot([], [], " ", label=f"all NaN: {', '.join(missing)}")
        title = _legend_title(cat, spread, theory is not None and var in theory)
        if legend and (cats != [None] or title):
            ax.legend(title=title, ncols=2 if len(cats) > 6 else 1, alignment="left")
        elif missing and cat:
            ax.legend(handles=ax.get_lines()[-1:], loc="best")
    return ax


def _failed_x(ds: xr.Dataset, x: str) -> np.ndarray:
    """``x`` of the steps whose ``status`` is not ``"ok"`` (failed checkpoints)."""
    if "status" not in ds or ds["status"].dims != ("step",):
        return np.empty(0)
    bad = ds["status"].values != "ok"
    return np.asarray(ds[x].values, dtype=float)[bad] if x in ds.coords else np.empty(0)


def _legend_title(cat: str | None, spread: str, has_theory: bool) -> str | None:
    parts = []
    if cat:
        parts.append(cat)
    if spread:
        parts.append(f"shaded: {spread}" if "±" in spread or "CI" in spread else spread)
    if has_theory:
        parts.append("dashed: theory")
    return "; ".join(parts) or None


def _category_dim(da: xr.DataArray) -> str | None:
    """The one dimension beyond ``step`` and ``seed`` drawn as colours (``layer`` first)."""
    rest = [d for d in da.dims if d not in ("step", "seed")]
    if "layer" in rest:
        return "layer"
    return rest[0] if len(rest) == 1 else None


def _overlay_theory(ax: plt.Axes, theory: xr.Dataset | None, var: str, x: str,
                    cat: str | None, c: Any, colour: str) -> None:
    """``theory[var]`` (of category ``c``) as a dashed line, when it lies on ``x`` alone."""
    if theory is None or var not in theory:
        return
    th = theory[var]
    if cat is not None and cat in th.dims:
        th = th.sel({cat: c})
    elif cat is not None and c is not None:
        return
    if x not in th.coords:
        return
    extra = [d for d in th.dims if d not in (x, "step")]
    if extra:
        return
    ax.plot(np.asarray(th[x], float), np.asarray(th, float), "--", color=colour, lw=1.3)


# ------------------------------------------------------------------------------ overview
class OverviewFigure(Figure):
    """A matplotlib ``Figure`` that IPython displays once.

    In Jupyter the inline backend shows every open pyplot figure when a cell ends; a figure
    that is also the cell's value would be shown a second time.  This figure displays itself
    as a PNG and leaves pyplot (``plt.close``), so whichever comes first, the cell's value or
    the end of the cell, shows it and the other finds nothing to show.  It stays a complete
    figure: ``save_figure`` and ``savefig`` work after that."""

    def _ipython_display_(self) -> None:
        from IPython.display import Image, display

        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        display(Image(buffer.getvalue()))
        plt.close(self)


def _numeric(da: xr.DataArray) -> bool:
    return da.dtype.kind in "fiu" and "step" in da.dims


def _overview_panels(ds: xr.Dataset) -> list[tuple[str, list[str]]]:
    """``(title, variables)`` per panel: losses, accuracies, other step scalars, then every
    per-layer (or per-category) variable; variables that are all NaN are left out."""
    scalars, layered = [], []
    for name, da in ds.data_vars.items():
        if (not _numeric(da) or name in _TIMING or name in _BOOKKEEPING
                or str(name).endswith("_theory")):
            continue
        if not np.isfinite(np.asarray(da, dtype=float)).any():
            continue
        rest = [d for d in da.dims if d not in ("step", "seed")]
        if not rest:
            scalars.append(str(name))
        elif len(rest) == 1:
            layered.append(str(name))
    losses = [v for v in scalars if "loss" in v or v.endswith("_error")]
    accuracies = [v for v in scalars if "accuracy" in v]
    others = [v for v in scalars if v not in losses and v not in accuracies]
    panels: list[tuple[str, list[str]]] = []
    if losses:
        panels.append(("losses", losses))
    if accuracies:
        panels.append(("accuracies", accuracies))
    panels += [(v, [v]) for v in others]
    # the spectral-geometry probes first (a Zarr store lists variables alphabetically)
    first = ("rankme", "alpha_req")
    layered.sort(key=lambda v: next((i for i, f in enumerate(first) if v.startswith(f)),
                                    len(first)))
    panels += [(v, [v]) for v in layered]
    return panels


def _scalar_panel(ax: plt.Axes, ds: xr.Dataset, names: list[str], x: str, band: str | None,
                  theory: xr.Dataset | None) -> None:
    """Several ``(step[, seed])`` variables on one axes, in the same units."""
    spread = ""
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        mean, half, spread = mean_and_band(ds[name], band)
        xs = np.asarray(mean[x], dtype=float)
        ax.plot(xs, np.asarray(mean, dtype=float), "o-", ms=3, lw=1.2, color=colour,
                label=str(ds[name].attrs.get("long_name", name)))
        if half is not None:
            ax.fill_between(xs, np.asarray(mean - half, float), np.asarray(mean + half, float),
                            color=colour, alpha=0.2, lw=0)
        for th in (theory, ds):
            key = name if th is theory else f"{name}_theory"
            if th is not None and key in th and x in th[key].coords and th[key].ndim == 1:
                ax.plot(np.asarray(th[key][x], float), np.asarray(th[key], float), "--",
                        color=colour, lw=1.3)
    units = {str(ds[n].attrs.get("units", "")) for n in names}
    unit = units.pop() if len(units) == 1 else ""
    label = ("loss / error" if any("loss" in n or "error" in n for n in names)
             else "accuracy" if any("accuracy" in n for n in names) else names[0])
    if len(names) == 1:
        ax.set_ylabel(axis_label(ds[names[0]]))
    else:
        ax.set_ylabel(f"{label} [{unit}]" if unit and unit != "1" else label)
    has_theory = any((theory is not None and n in theory) or f"{n}_theory" in ds for n in names)
    ax.legend(title=_legend_title(None, spread, has_theory), alignment="left")


def run_overview(
    ds: xr.Dataset,
    theory: xr.Dataset | None = None,
    x: str | None = None,
    band: str | None = "sem",
    ncols: int = 3,
    title: str | None = None,
) -> plt.Figure:
    """One multi-panel figure of a run: losses and accuracies, then every probe variable.

    Panels, in order: the losses (``*loss*`` and ``*_error`` variables over ``step``), the
    accuracies (``*accuracy*``), any other numeric ``(step,)`` scalar, then one panel per
    variable with one category dimension (``layer``, or e.g. ``load_ratio``), one line per
    entry of it.  Wall-clock timings and variables that are NaN throughout are left out
    (listed at the bottom).  Means over ``seed`` carry the ``band`` (module docstring).

    Theory overlays (dashed, same colours): a variable ``<name>_theory`` of ``ds`` with the
    same dims, or ``theory[name]`` of a theory Dataset on the same ``x`` coordinate (a theory
    Dataset and a measured one share variable names; traindyn's data model).

    Parameters
    ----------
    ds : xarray.Dataset
        A run over ``step`` (Monitor, recipes, ``traindyn analyze``).
    theory : xarray.Dataset, optional
        Predictions to draw beside the measurements.
    x : {"step", "time"}, optional
        The abscissa; default ``time`` when the Dataset has a ``time`` coordinate that differs
        from ``step`` (a learning rate was given), else ``step``.
    band : {"sem", "std", "ci95", None}
    ncols : int
        Panels per row.
    title : str, optional
        Figure title; default the Dataset's ``source`` attribute.
    """
    _check_band(band)
    if "step" not in ds.dims:
        raise ValueError(f"run_overview needs a Dataset over 'step'; its dims are "
                         f"{dict(ds.sizes)}")
    if x is None:
        x = "time" if "time" in ds.coords and not np.array_equal(
            np.asarray(ds["time"], float), np.asarray(ds["step"], float)) else "step"
    panels = _overview_panels(ds)
    empty = [str(n) for n, da in ds.data_vars.items()
             if _numeric(da) and n not in _TIMING and n not in _BOOKKEEPING
             and not np.isfinite(np.asarray(da, dtype=float)).any()]
    n = max(len(panels), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.3 * nrows + 0.6),
                                 layout="constrained", squeeze=False, FigureClass=OverviewFigure)
        key: dict[str, Any] = {}    # the figure legend: one entry per category and style
        spread = ""
        for ax, (name, names) in zip(axes.flat, panels, strict=False):
            if name in ("losses", "accuracies") or _category_dim(ds[names[0]]) is None:
                _scalar_panel(ax, ds, names, x, band, theory)
                if name == "losses" and all(
                        np.nanmin(np.asarray(ds[v], float)) > 0 for v in names):
                    ax.set_yscale("log")
            else:
                th = theory
                if f"{name}_theory" in ds:
                    th = ds[[f"{name}_theory"]].rename({f"{name}_theory": name})
                metric_over_steps(ds, name, x=x, ax=ax, logx=False, band=band, theory=th,
                                  legend=False)
                for line in ax.get_lines():
                    label = line.get_label()
                    if not label.startswith("_") and not label.startswith("all NaN"):
                        key.setdefault(label, line)
                _, _, spread = mean_and_band(ds[name], band)
                if th is not None and name in th:
                    key.setdefault("dashed: theory",
                                   plt.Line2D([], [], color="0.3", ls="--", lw=1.3))
                missing = [ln.get_label() for ln in ax.get_lines()
                           if ln.get_label().startswith("all NaN")]
                if missing:
                    ax.legend(handles=[ax.get_lines()[-1]], loc="best")
            ax.set_title(name)
            ax.set_xlabel(axis_label(ds[x], x))
            _log_x(ax, ds[x].values)
        if _failed_x(ds, x).size:
            key["dotted: failed checkpoint"] = plt.Line2D([], [], color="0.55", ls=":", lw=1)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        heading = title if title is not None else str(ds.attrs.get("source", "run overview"))
        if empty:
            heading += "\n(NaN throughout, not drawn: " + ", ".join(empty[:8]) + (
                " …" if len(empty) > 8 else "") + ")"
        fig.suptitle(heading, fontsize=10)
        if key:
            cat_names = {_category_dim(ds[p[1][0]]) for p in panels} - {None}
            heading_key = ", ".join(sorted(str(c) for c in cat_names))
            if "±" in spread or "CI" in spread:
                key[f"shaded: {spread}"] = plt.Rectangle((0, 0), 1, 1, color="0.6", alpha=0.35)
            fig.legend(list(key.values()), list(key), loc="outside lower center",
                       ncols=min(len(key), 8), title=f"colours: {heading_key}" if heading_key
                       else None)
    return fig


# ------------------------------------------------------------------------------ CKA
def cka_heatmap(
    data: xr.Dataset | xr.DataArray,
    layer: str | None = None,
    ax: plt.Axes | None = None,
    annotate: bool | None = None,
    title: str | None = None,
) -> plt.Axes:
    """A CKA matrix as a heatmap on ``[0, 1]`` (viridis), with a labelled colour bar.

    ``data`` is the output of :func:`probes.similarity.cka_matrix` (``cka`` over
    ``(layer, layer2)``: layer × layer) or of :func:`probes.similarity.checkpoint_cka` with
    ``reference=None`` (``cka`` over ``(step, checkpoint2, layer)``: checkpoint × checkpoint
    of the ``layer`` given, default the last).  ``annotate`` writes each value in its cell
    (default: when the matrix is at most 12 × 12).  Returns the axes.
    """
    da = data["cka"] if isinstance(data, xr.Dataset) else data
    if "checkpoint2" in da.dims:
        if "layer" in da.dims:
            chosen = layer if layer is not None else da["layer"].values[-1]
            da = da.sel(layer=chosen)
            subtitle = f"checkpoint × checkpoint, layer {chosen}"
        else:
            subtitle = "checkpoint × checkpoint"
        rows, cols = "step", "checkpoint2"
        row_label, col_label = "step", "step of the compared checkpoint"
    elif "layer2" in da.dims:
        rows, cols = "layer", "layer2"
        row_label, col_label = "layer", "layer (compared)"
        subtitle = "layer × layer"
    else:
        if da.ndim != 2:
            raise ValueError(f"cka_heatmap needs a 2-D matrix; got dims {da.dims}")
        rows, cols = da.dims
        row_label, col_label = str(rows), str(cols)
        subtitle = f"{rows} × {cols}"
    values = np.asarray(da.transpose(rows, cols), dtype=float)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        if ax is None:
            side = min(7.5, 2.8 + 0.32 * max(values.shape))
            ax = _new_axes((side + 1.2, side))
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper",
                          aspect="equal", interpolation="nearest")
        ax.set_xticks(np.arange(values.shape[1]), [str(v) for v in da[cols].values],
                      rotation=45, ha="right")
        ax.set_yticks(np.arange(values.shape[0]), [str(v) for v in da[rows].values])
        ax.set_xlabel(col_label)
        ax.set_ylabel(row_label)
        if annotate is None:
            annotate = max(values.shape) <= 12
        if annotate:
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center",
                        va="center", fontsize=6.5, color="white" if v < 0.6 else "black")
        bar = ax.figure.colorbar(image, ax=ax, shrink=0.85)
        bar.set_label(axis_label(da, "cka") if da.attrs.get("long_name") else "CKA [1]")
        ax.set_title(title if title is not None else f"CKA, {subtitle}")
    return ax


# ------------------------------------------------------------------------------ spectrum
def marchenko_pastur_esd_density(lam: Any, ratio: float, scale: float = 1.0) -> np.ndarray:
    r"""Density of the ESD ``λ_i = σ_i(W)²/N`` of an ``N × M`` matrix (``γ = M/N ≤ 1``) with
    i.i.d. entries of variance ``s²`` = ``scale``, normalised over its ``M`` eigenvalues.

    .. math:: \rho(\lambda) = \frac{\sqrt{(\lambda_+-\lambda)(\lambda-\lambda_-)}}
              {2\pi\gamma s^2 \lambda}, \qquad \lambda_\pm = s^2(1\pm\sqrt\gamma)^2

    (Marchenko & Pastur 1967); from :func:`theory.linear.marchenko_pastur_density`, which is
    normalised over the ``N`` eigenvalues of ``WWᵀ``, divided by ``γ`` and rescaled by ``s²``.
    """
    from traindyn.theory.linear import marchenko_pastur_density

    lam = np.asarray(lam, dtype=float)
    return marchenko_pastur_density(lam / scale, ratio) / (ratio * scale)


def _eigenvalues(source: Any, layer: str | None, step: int | None, var: str
                 ) -> tuple[np.ndarray, float | None, str]:
    """``(eigenvalues, γ or None, description)`` of a weight matrix, a module's layer, a 1-D
    array of eigenvalues or a Dataset variable of them."""
    from traindyn.probes.weights import esd

    if isinstance(source, xr.Dataset):
        if var not in source:
            raise KeyError(f"spectrum: the Dataset has no variable {var!r} (eigenvalues); "
                           f"variables: {list(source.data_vars)}")
        source = source[var]
    if isinstance(source, xr.DataArray):
        da = source
        if "layer" in da.dims:
            da = da.sel(layer=layer if layer is not None else da["layer"].values[-1])
        if "step" in da.dims:
            da = da.sel(step=step if step is not None else da["step"].values[-1])
        if da.ndim != 1:
            raise ValueError(f"spectrum: eigenvalues must be 1-D after choosing layer and step;"
                             f" got dims {da.dims}")
        ratio = da.attrs.get("ratio")
        return np.asarray(da, float), None if ratio is None else float(ratio), str(
            da.attrs.get("long_name", da.name))
    if hasattr(source, "named_modules"):   # a torch module: its layer's weight
        modules = dict(source.named_modules())
        if layer is None or layer not in modules or getattr(modules[layer], "weight",
                                                              None) is None:
            names = [n for n, m in modules.items() if getattr(m, "weight", None) is not None]
            raise KeyError(f"spectrum: give layer= one of the modules with a weight: {names}")
        source = modules[layer].weight.detach()
        where = f"weight of {layer}"
    else:
        where = "weight matrix"
    arr = source
    shape = tuple(getattr(arr, "shape", np.shape(arr)))
    if len(shape) == 1:
        return np.asarray(arr, float), None, "eigenvalues"
    m, n = shape[0], int(np.prod(shape[1:]))
    lam = esd(arr).cpu().numpy()
    return lam, min(m, n) / max(m, n), f"ESD σ²/N of the {where} ({m} × {n})"


def spectrum(
    source: Any,
    layer: str | None = None,
    step: int | None = None,
    ax: plt.Axes | None = None,
    ratio: float | None = None,
    min_tail: int = 10,
    bins: int = 50,
    var: str = "eigenvalue",
) -> plt.Axes:
    """Empirical eigenvalue density on log–log axes, with the power-law tail fit and the
    Marchenko–Pastur bulk (weightwatcher's picture; Martin & Mahoney 2021).

    ``source`` is a weight matrix (array or tensor, ``m × n…``; its ESD ``σ_i²/N`` by
    :func:`probes.weights.esd`), a torch module with ``layer`` naming a weighted submodule, a
    1-D array of eigenvalues, or a Dataset/DataArray holding them in ``var`` (``layer`` and
    ``step`` select one, default the last).  Drawn: the histogram density on log-spaced bins
    (integrates to 1), the Marchenko–Pastur density with the bulk variance matched at the
    median (:func:`probes.weights.marchenko_pastur_scale`; needs ``γ = M/N``, known for a
    matrix, else ``ratio=``) and its upper edge, and the Clauset–Shalizi–Newman power-law tail
    ``ρ(λ) ∝ λ^{−α}`` above ``λ_min`` (:func:`probes.weights.power_law_tail_fit`), scaled to
    the tail's share of the eigenvalues.  The legend gives α, ``λ_min``, the tail size and
    the number of eigenvalues beyond the edge.  Returns the axes.
    """
    from traindyn.probes.weights import marchenko_pastur_scale, power_law_tail_fit

    lam, known_ratio, what = _eigenvalues(source, layer, step, var)
    ratio = ratio if ratio is not None else known_ratio
    lam = lam[np.isfinite(lam)]
    positive = np.sort(lam[lam > 0])
    if positive.size < 2:
        raise ValueError(f"spectrum: need at least 2 positive finite eigenvalues; got "
                         f"{positive.size}")
    with plt.rc_context(STYLE):
        ax = ax or _new_axes((6.4, 4.6))
        lo, hi = positive[0], positive[-1]
        edges = np.geomspace(lo, hi * (1 + 1e-9), bins + 1) if hi > lo else np.array(
            [lo * 0.9, hi * 1.1])
        counts, _ = np.histogram(positive, edges)
        density = counts / (positive.size * np.diff(edges))
        ax.stairs(np.where(density > 0, density, np.nan), edges, fill=True, alpha=0.35,
                  color=PALETTE[0], label=f"empirical density ({positive.size} eigenvalues)")
        ax.stairs(np.where(density > 0, density, np.nan), edges, color=PALETTE[0], lw=0.9)
        if ratio is not None and 0 < ratio <= 1:
            s2, edge = marchenko_pastur_scale(positive, ratio)
            grid = np.geomspace(max(lo, s2 * (1 - np.sqrt(ratio)) ** 2 * 1.0001), edge, 300)
            mp = marchenko_pastur_esd_density(grid, ratio, s2)
            ax.plot(grid, np.where(mp > 0, mp, np.nan), color=PALETTE[2], lw=1.5,
                    label=f"Marchenko–Pastur bulk (γ = {ratio:.3g}, s² = {s2:.3g})")
            beyond = int(np.sum(positive > edge))
            ax.axvline(edge, color=PALETTE[2], ls="--", lw=1.1,
                       label=f"MP edge λ₊ = {edge:.3g} ({beyond} beyond)")
        fit = power_law_tail_fit(positive, min_tail=min_tail)
        guard = ""
        if ratio is not None and 0 < ratio <= 1:
            outliers = int(np.sum(positive > edge * (1 + 3 * positive.size ** (-2.0 / 3.0))))
            if outliers < min_tail:
                guard = (f"; no heavy tail by traindyn's guard: fewer than {min_tail} "
                         "eigenvalues beyond the edge + 3 Tracy–Widom widths")
        if np.isfinite(fit.alpha):
            share = fit.n_tail / positive.size
            grid = np.geomspace(fit.xmin, hi, 100)
            line = share * (fit.alpha - 1) / fit.xmin * (grid / fit.xmin) ** (-fit.alpha)
            ax.plot(grid, line, color=PALETTE[3], lw=1.8,
                    label=f"power-law tail α = {fit.alpha:.2f} (λ ≥ {fit.xmin:.3g}, "
                          f"{fit.n_tail} eigenvalues, KS {fit.ks:.2f}{guard})")
        else:
            ax.plot([], [], " ", label=f"no power-law fit (fewer than {min_tail} eigenvalues)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("density ρ(λ) [1/λ]")
        ax.set_title("\n".join(textwrap.wrap(what, 60)))
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, ["\n".join(textwrap.wrap(t, 58)) for t in labels], loc="lower left",
                  frameon=True, framealpha=0.92, edgecolor="0.8")
    return ax


# ------------------------------------------------------------------------------ phases
_PHASE_MARKERS = {"warmup": "s", "entropy_seeking": "^", "compression_seeking": "v",
                  "undetermined": "o"}


def phase_plot(
    ds: xr.Dataset,
    layer: str | None = None,
    rankme: str = "rankme",
    alpha: str = "alpha_req",
    ax: plt.Axes | None = None,
    **phase_kwargs: Any,
) -> plt.Axes:
    """The trajectory of (RankMe, alpha-ReQ) over training, coloured by step, with the
    geometric phases detected by :func:`probes.phases.geometric_phases` as marker shapes.

    ``layer`` chooses the layer (default the last); a ``seed`` dimension is averaged over
    first.  ``phase_kwargs`` go to the detector (``bandwidth``, ``warmup_end`` …).  The legend
    lists each phase with the steps it spans.  Returns the axes.
    """
    from traindyn.probes.phases import geometric_phases, phase_segments

    def pick(name: str) -> xr.DataArray:
        if name not in ds:
            raise KeyError(f"phase_plot: the Dataset has no {name!r}; variables: "
                           f"{list(ds.data_vars)}")
        da = ds[name]
        if "seed" in da.dims:
            da = da.mean("seed")
        if "layer" in da.dims:
            da = da.sel(layer=layer if layer is not None else ds["layer"].values[-1])
        return da

    r, a = pick(rankme), pick(alpha)
    steps = np.asarray(ds["step"].values, dtype=float)
    labels = geometric_phases(steps, r.values, a.values, **phase_kwargs)
    chosen = layer if layer is not None else (
        ds["layer"].values[-1] if "layer" in ds.coords else None)
    with plt.rc_context(STYLE):
        ax = ax or _new_axes((6.2, 4.4))
        rv, av = np.asarray(r, float), np.asarray(a, float)
        ax.plot(rv, av, "-", color="0.6", lw=0.9, zorder=1)
        norm = mcolors.LogNorm(vmin=max(_positive_min(steps), 1.0), vmax=max(steps.max(), 2.0))
        shown = np.where(steps > 0, steps, norm.vmin)
        scatter = None
        phases_drawn, phase_labels = [], []
        for phase, marker in _PHASE_MARKERS.items():
            mask = labels == phase
            if not mask.any():
                continue
            spans = ", ".join(f"{s}–{e}" if s != e else f"{s}"
                              for s, e, p in phase_segments(steps, labels) if p == phase)
            scatter = ax.scatter(rv[mask], av[mask], c=shown[mask], cmap="viridis", norm=norm,
                                 marker=marker, s=34, edgecolors="0.2", linewidths=0.5,
                                 zorder=2)
            phases_drawn.append(phase)
            phase_labels.append(f"{phase.replace('_', '-')} (steps {spans})")
        if scatter is not None:
            bar = ax.figure.colorbar(scatter, ax=ax)
            bar.set_label("step (log scale; step 0 drawn at the first step)")
        ax.annotate("start", (rv[0], av[0]), textcoords="offset points", xytext=(6, 6),
                    fontsize=7)
        ax.annotate("end", (rv[-1], av[-1]), textcoords="offset points", xytext=(6, -10),
                    fontsize=7)
        ax.set_xlabel(axis_label(ds[rankme]))
        ax.set_ylabel(axis_label(ds[alpha]))
        handles = [plt.Line2D([], [], ls="", marker=_PHASE_MARKERS[p], markersize=6,
                              markerfacecolor="0.82", markeredgecolor="0.2", label=lab)
                   for p, lab in zip(phases_drawn, phase_labels, strict=True)]
        ax.legend(handles=handles, title="phase (traindyn detector, after Li et al. 2025)",
                  loc="best", alignment="left")
        ax.set_title("representation geometry trajectory" + (
            f", layer {chosen}" if chosen is not None else ""))
    return ax


# ------------------------------------------------------------------------------ files
def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 150,
                close: bool | None = None) -> Path:
    """Write ``fig`` (PNG, SVG or PDF by the suffix) with a tight bounding box (a figure
    without a layout engine is laid out with ``tight_layout`` first).

    ``close``: close the figure after writing; by default only on a non-interactive backend
    (Agg, in scripts), so that in Jupyter the figure still shows inline.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:   # a figure made elsewhere, without a layout
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    if close is None:
        import matplotlib

        close = matplotlib.get_backend().lower() in _NON_INTERACTIVE
    if close:
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
    paths = []
    for name, var in ds.data_vars.items():
        if var.dims != ("step", "layer") or var.dtype.kind not in "fiu":
            continue
        layers = [str(v) for v in ds["layer"].values]
        empty = [layer for layer, col in zip(layers, var.values.T, strict=True)
                 if np.all(np.isnan(col))]
        with plt.rc_context(STYLE):
            ax = _new_axes((6.4, 4.0))
            if int(ok.sum()) <= 1:
                row = var.values[np.argmax(ok)] if ok.any() else np.full(len(layers), np.nan)
                ax.plot(np.arange(len(layers)), row, marker="o")
                ax.set_xticks(np.arange(len(layers)), layers, rotation=45, ha="right")
                ax.set_xlabel(f"layer (one checkpoint: step {int(steps[np.argmax(ok)])})"
                              if ok.any() else "layer")
                ax.set_ylabel(axis_label(var))
            else:
                shown = ds.drop_vars([n for n in ds.data_vars if n != name and n != "status"])
                shown = shown.sel(layer=[la for la in ds["layer"].values
                                         if str(la) not in empty])
                metric_over_steps(shown, str(name), x="step", ax=ax)
                if (~ok).any():
                    ax.set_xlabel("step (dotted: failed checkpoints)")
            title = str(var.attrs.get("long_name", name))
            if empty:
                title += f"\n(all NaN: {', '.join(empty[:4])}{' …' if len(empty) > 4 else ''})"
            ax.set_title(title)
            path = folder / f"{stem}_{name}.png"
            save_figure(ax.figure, path, dpi=110, close=True)
        paths.append(path)
    return paths

