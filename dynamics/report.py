"""``traindyn report RUN``: one self-contained HTML page of a run, to open offline or share.

The page holds, in order: a summary (source, steps, layers, seeds, failed checkpoints), the
run overview figure (:func:`dynamics.plot.run_overview`) and, when the run records RankMe and
alpha-ReQ over at least three steps, the geometric-phase trajectory of its last layer
(:func:`dynamics.plot.phase_plot`); a per-layer table of the last evaluation; the step scalars
at that evaluation; every reason a value is NaN or a checkpoint failed, in full; and the
provenance (the Dataset's attributes: parameters, versions, sources; each variable's source
paper; per checkpoint its status and content hash).

Self-contained: figures are embedded as base64 PNG (``data:`` URIs), the style sheet is
inline, and nothing refers to a network address, so the file opens in a browser without a
connection and can be mailed as it is.  Every text taken from the Dataset is HTML-escaped.

RUN is a ``.nc`` file (``traindyn analyze``, the demo, the recipes, :meth:`Monitor.save`) or a
monitor's ``.zarr`` store, also while the monitor is still appending to it
(:func:`dynamics.storage.load_stream` reads the evaluations committed so far).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["build_report", "load_run", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1500px;padding:0 16px;color:#1b1b1b;line-height:1.4}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}h3{font-size:1em;margin:1.1em 0 .3em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f5f7}td.name,th.name{text-align:left}
td.nan{color:#a33}td.text{text-align:left;max-width:900px;white-space:pre-wrap}
img{max-width:100%;height:auto;border:1px solid #eee}
.muted{color:#666;font-size:.9em}code{background:#f3f5f7;padding:0 3px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:.9em}
dt{font-weight:600}dd{margin:0;white-space:pre-wrap;word-break:break-word}
"""

_FIGURE_DPI = 100


def load_run(path: str | Path) -> xr.Dataset:
    """A run from a ``.nc`` file or a monitor's ``.zarr`` store (its committed evaluations,
    also while it is being written)."""
    from traindyn.dynamics.storage import load, load_stream

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run at {path}")
    if path.suffix == ".zarr" or path.is_dir():
        return load_stream(path)
    return load(path)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _figure_png(fig: Any) -> str:
    """An ``<img>`` with the figure as a base64 PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_FIGURE_DPI, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _last_index(ds: xr.Dataset) -> int | None:
    """Index along ``step`` of the last evaluation that succeeded (status ``ok``, if the run
    records a status), or ``None`` for an empty run."""
    if ds.sizes.get("step", 0) == 0:
        return None
    if "status" in ds and ds["status"].dims == ("step",):
        ok = np.flatnonzero(ds["status"].values == "ok")
        return int(ok[-1]) if ok.size else None
    return ds.sizes["step"] - 1


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else str(value)
    return f"{value:.5g}"


def _fmt_pm(mean: float, sem: float | None) -> str:
    """``mean ± sem`` with the SEM to two significant digits and the mean to the same
    decimal place (as a measurement is written)."""
    if sem is None or not math.isfinite(sem) or sem <= 0 or not math.isfinite(mean):
        return _fmt(mean)
    decimals = max(0, 1 - math.floor(math.log10(sem)))
    if decimals <= 5:
        return f"{mean:.{decimals}f} ± {sem:.{decimals}f}"
    exp = math.floor(math.log10(abs(mean) if mean != 0 else sem))   # tiny values: (m ± s)e±x
    m, e = mean / 10.0**exp, sem / 10.0**exp
    decimals = max(0, 1 - math.floor(math.log10(e)))
    return f"({m:.{decimals}f} ± {e:.{decimals}f})e{exp:+03d}"


def _category_vars(ds: xr.Dataset, dim: str) -> list[str]:
    """Numeric variables over ``step`` and ``dim`` (and perhaps ``seed``)."""
    return [str(n) for n, da in ds.data_vars.items()
            if dim in da.dims and "step" in da.dims and da.dtype.kind in "fiub"
            and set(da.dims) <= {"step", dim, "seed"}]


def _category_dims(ds: xr.Dataset) -> list[str]:
    """``layer`` first, then every other dimension that numeric step variables run over."""
    dims = {d for da in ds.data_vars.values() if "step" in da.dims and da.dtype.kind in "fiub"
            for d in da.dims if d not in ("step", "seed")}
    return sorted(dims, key=lambda d: (d != "layer", d))


def _scalar_vars(ds: xr.Dataset) -> list[str]:
    return [str(n) for n, da in ds.data_vars.items()
            if "step" in da.dims and da.dtype.kind in "fiub"
            and set(da.dims) <= {"step", "seed"}]


def _value(da: xr.DataArray) -> tuple[float, float | None, int]:
    """Mean over seeds (if any), its SEM and the number of seeds."""
    if "seed" in da.dims and da.sizes["seed"] > 1:
        vals = np.asarray(da, dtype=float)
        finite = vals[np.isfinite(vals)]
        if finite.size == 0:
            return float("nan"), None, da.sizes["seed"]
        sem = float(finite.std(ddof=1) / np.sqrt(finite.size)) if finite.size > 1 else None
        return float(finite.mean()), sem, da.sizes["seed"]
    return float(np.asarray(da, dtype=float).reshape(-1)[0]), None, 1


class _Reasons:
    """Numbered NaN reasons, each listed once at the foot of the tables."""

    def __init__(self) -> None:
        self.keys: dict[str, int] = {}

    def key(self, reason: str) -> int:
        return self.keys.setdefault(reason, len(self.keys) + 1)


def _note(ds: xr.Dataset, i: int, layer: Any | None, name: str) -> str:
    """Why ``name`` at step index ``i`` (and ``layer``) is NaN, from the run's notes; without
    a note, the variable's own definition (some are NaN by definition, e.g. a tail exponent
    without a tail)."""
    if layer is not None and "layer_notes" in ds:
        text = str(ds["layer_notes"].isel(step=i).sel(layer=layer).values)
        if text:
            return text
    elif "notes" in ds and ds["notes"].dims == ("step",) and str(ds["notes"].values[i]):
        return str(ds["notes"].values[i])
    long_name = ds[name].attrs.get("long_name")
    return ("no warning was recorded for it" + (f"; the variable is defined as: {long_name}"
                                                if long_name else ""))


def _layer_table(ds: xr.Dataset, i: int, reasons: _Reasons, dim: str = "layer") -> str:
    """One row per variable over ``dim``, one column per entry of ``dim`` (layers)."""
    names = _category_vars(ds, dim)
    if not names:
        return f'<p class="muted">No per-{_esc(dim)} variables.</p>'
    layers = list(ds[dim].values)
    head = "".join(f"<th>{_esc(layer if dim == 'layer' else f'{dim} = {layer}')}</th>"
                   for layer in layers)
    rows = []
    seeded = False
    for name in names:
        da = ds[name].isel(step=i)
        attrs = da.attrs
        label = _esc(attrs.get("long_name", name))
        units = attrs.get("units", "")
        cells = []
        for layer in layers:
            mean, sem, n_seeds = _value(da.sel({dim: layer}))
            seeded = seeded or n_seeds > 1
            if math.isnan(mean):
                k = reasons.key(_note(ds, i, layer if dim == "layer" else None, name))
                cells.append(f'<td class="nan">NaN <a href="#nan-{k}">[{k}]</a></td>')
            else:
                cells.append(f"<td>{_esc(_fmt_pm(mean, sem))}</td>")
        rows.append(f'<tr><td class="name"><code>{_esc(name)}</code></td>'
                    f'<td class="name">{label}</td><td>{_esc(units)}</td>{"".join(cells)}</tr>')
    note = ('<p class="muted">Values: mean ± SEM over seeds (standard error of the mean, '
            'std(ddof=1)/√n).</p>' if seeded else "")
    return (f'<table><tr><th class="name">variable</th><th class="name">meaning</th>'
            f"<th>units</th>{head}</tr>{''.join(rows)}</table>{note}")


def _scalar_table(ds: xr.Dataset, i: int, reasons: _Reasons) -> str:
    names = _scalar_vars(ds)
    if not names:
        return '<p class="muted">No step scalars.</p>'
    rows = []
    for name in names:
        da = ds[name].isel(step=i)
        mean, sem, _ = _value(da)
        if math.isnan(mean):
            k = reasons.key(_note(ds, i, None, name))
            cell = f'<td class="nan">NaN <a href="#nan-{k}">[{k}]</a></td>'
        else:
            cell = f"<td>{_esc(_fmt_pm(mean, sem))}</td>"
        rows.append(f'<tr><td class="name"><code>{_esc(name)}</code></td><td class="name">'
                    f'{_esc(da.attrs.get("long_name", name))}</td>'
                    f'<td>{_esc(da.attrs.get("units", ""))}</td>{cell}</tr>')
    return ('<table><tr><th class="name">variable</th><th class="name">meaning</th>'
            f"<th>units</th><th>value</th></tr>{''.join(rows)}</table>")


def _all_reasons(ds: xr.Dataset, reasons: _Reasons) -> str:
    """The numbered reasons of the tables, then every distinct note and failure of the run
    with the steps (and layers) where it occurred."""
    parts = []
    if reasons.keys:
        items = "".join(f'<tr><td id="nan-{k}">[{k}]</td><td class="text">{_esc(r)}</td></tr>'
                        for r, k in reasons.keys.items())
        parts.append(f"<h3>NaN in the tables above</h3><table>{items}</table>")
    where: dict[str, list[str]] = {}
    steps = ds["step"].values if "step" in ds.coords else []
    if "reason" in ds and ds["reason"].dims == ("step",):
        for s, text in zip(steps, ds["reason"].values, strict=True):
            if str(text):
                where.setdefault(f"checkpoint failed: {text}", []).append(str(int(s)))
    layered = "layer_notes" in ds and set(ds["layer_notes"].dims) == {"step", "layer"}
    if layered:
        notes = ds["layer_notes"].transpose("step", "layer").values
        for a, s in enumerate(steps):
            for b, layer in enumerate(ds["layer"].values):
                if str(notes[a, b]):
                    where.setdefault(str(notes[a, b]), []).append(f"{int(s)}/{layer}")
    if "notes" in ds and ds["notes"].dims == ("step",):
        for a, (s, text) in enumerate(zip(steps, ds["notes"].values, strict=True)):
            text = str(text)
            # a step's notes join its layers' notes: list only what no layer note holds
            if layered:
                for note in filter(None, (str(n) for n in notes[a])):
                    text = text.replace(note, "")
                text = text.strip("; ")
            if text:
                where.setdefault(text, []).append(str(int(s)))
    if where:
        rows = "".join(f'<tr><td class="text">{_esc(text)}</td><td class="text">'
                       f'{_esc(_compact(places))}</td></tr>' for text, places in where.items())
        parts.append("<h3>Every recorded reason, with where it occurred</h3>"
                     '<table><tr><th class="name">reason</th><th class="name">'
                     f"steps (step/layer)</th></tr>{rows}</table>")
    if not parts:
        return '<p class="muted">No NaN values and no failed checkpoints.</p>'
    return "".join(parts)


def _compact(places: Sequence[str], limit: int = 60) -> str:
    shown = ", ".join(places[:limit])
    return shown + (f" … ({len(places) - limit} more)" if len(places) > limit else "")


def _provenance(ds: xr.Dataset) -> str:
    items = []
    for key, value in ds.attrs.items():
        text = _esc(value)
        if isinstance(value, str) and value[:1] == "{":
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):   # a JSON object (parameters, versions): a table
                rows = "".join(f'<tr><td class="name">{_esc(k)}</td><td class="text">'
                               f"{_esc(json.dumps(v))}</td></tr>"
                               for k, v in sorted(parsed.items()))
                text = f"<table>{rows}</table>"
        items.append(f"<dt>{_esc(key)}</dt><dd>{text}</dd>")
    out = f"<h3>Attributes</h3><dl>{''.join(items)}</dl>" if items else ""
    sources: dict[str, list[str]] = {}
    for name, da in ds.data_vars.items():
        if da.attrs.get("source"):
            sources.setdefault(str(da.attrs["source"]), []).append(str(name))
    if sources:
        rows = "".join(f'<tr><td class="text">{_esc(src)}</td><td class="text">'
                       f'{_esc(", ".join(names))}</td></tr>' for src, names in sources.items())
        out += ('<h3>Sources of the variables</h3><table><tr><th class="name">source</th>'
                f'<th class="name">variables</th></tr>{rows}</table>')
    per_step = [n for n in ("status", "checkpoint_hash", "step_source", "duplicate_of")
                if n in ds and ds[n].dims == ("step",)]
    if per_step:
        head = "".join(f'<th class="name">{_esc(n)}</th>' for n in per_step)
        rows = "".join(
            f"<tr><td>{int(s)}</td>" + "".join(
                f'<td class="name"><code>{_esc(ds[n].values[i]) or "–"}</code></td>'
                for n in per_step)
            + "</tr>" for i, s in enumerate(ds["step"].values))
        out += f"<h3>Checkpoints</h3><table><tr><th>step</th>{head}</tr>{rows}</table>"
    return out or '<p class="muted">The run carries no provenance attributes.</p>'


def _figures(ds: xr.Dataset, theory: xr.Dataset | None) -> str:
    from traindyn.dynamics import plot

    parts = []
    if ds.sizes.get("step", 0) >= 1:
        try:
            parts.append("<h2>Run overview</h2>" + _figure_png(plot.run_overview(ds, theory)))
        except (ValueError, KeyError, TypeError) as err:
            parts.append(f'<p class="muted">No overview figure: {_esc(err)}</p>')
    if "rankme" in ds and "alpha_req" in ds and "layer" in ds.dims:
        keep = np.ones(ds.sizes["step"], bool)
        if "status" in ds:
            keep = ds["status"].values == "ok"
        sub = ds.isel(step=np.flatnonzero(keep))
        layer = sub["layer"].values[-1]
        ok = np.isfinite(sub["rankme"].sel(layer=layer).values).reshape(sub.sizes["step"], -1)
        ok &= np.isfinite(sub["alpha_req"].sel(layer=layer).values).reshape(ok.shape[0], -1)
        if ok.all(axis=1).sum() >= 3:
            try:
                ax = plot.phase_plot(sub, layer=layer)
                parts.append(f"<h2>Geometric phases, layer {_esc(layer)}</h2>"
                             + _figure_png(ax.figure))
            except (ValueError, KeyError) as err:
                parts.append(f'<p class="muted">No phase plot: {_esc(err)}</p>')
    return "".join(parts)


def build_report(ds: xr.Dataset, title: str | None = None, theory: xr.Dataset | None = None,
                 origin: str | None = None) -> str:
    """The HTML page of a run (module docstring) as a string."""
    title = title or str(ds.attrs.get("source", "traindyn run"))
    n_steps = ds.sizes.get("step", 0)
    layers = [str(v) for v in ds["layer"].values] if "layer" in ds.coords else []
    facts = [f"{n_steps} evaluations"]
    if n_steps:
        steps = ds["step"].values
        facts.append(f"steps {int(steps.min())}–{int(steps.max())}")
    if layers:
        facts.append(f"{len(layers)} layers: {', '.join(layers)}")
    if "seed" in ds.dims:
        facts.append(f"{ds.sizes['seed']} seeds")
    if "status" in ds and ds["status"].dims == ("step",):
        failed = int((ds["status"].values != "ok").sum())
        facts.append(f"{failed} failed checkpoint{'s' if failed != 1 else ''}")
    reasons = _Reasons()
    i = _last_index(ds)
    if i is None:
        tables = '<p class="muted">No completed evaluation yet.</p>'
    else:
        step = int(ds["step"].values[i])
        time = (f", time = learning rate × step = {float(ds['time'].values[i]):.5g}"
                if "time" in ds.coords else "")
        tables = (f"<h2>Last evaluation: step {step}{_esc(time)}</h2>"
                  + "".join(f"<h3>Per {_esc(dim)}</h3>{_layer_table(ds, i, reasons, dim)}"
                            for dim in (_category_dims(ds) or ["layer"]))
                  + f"<h3>Step scalars</h3>{_scalar_table(ds, i, reasons)}")
    made = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"{GENERATOR}<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>"
        f'<p class="muted">{_esc(origin) + " · " if origin else ""}{_esc(" · ".join(facts))}'
        f" · report written {made} by traindyn</p>"
        f"{_figures(ds, theory)}{tables}"
        f"<h2>Why values are NaN</h2>{_all_reasons(ds, reasons)}"
        f"<h2>Provenance</h2>{_provenance(ds)}"
        "</body></html>\n")


GENERATOR = '<meta name="generator" content="traindyn report">'
"""The mark of a page this module wrote: only such a page is replaced without ``overwrite``."""


def _check_replaceable(output: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` when ``output`` holds something a report did not write."""
    import os

    if overwrite or not os.path.lexists(output):
        return
    ours = False
    if output.is_file() and not output.is_symlink():
        with open(output, "rb") as handle:
            ours = GENERATOR.encode() in handle.read(4096)
    if not ours:
        what = ("a symbolic link" if output.is_symlink() else
                "a folder" if output.is_dir() else "a file")
        raise FileExistsError(
            f"{output} holds {what} that traindyn report did not write; refusing to replace "
            "it: pass overwrite=True (--overwrite on the command line) or choose another path")


def write_report(run: str | Path | xr.Dataset, output: str | Path | None = None,
                 theory: str | Path | xr.Dataset | None = None, title: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write the HTML report of ``run`` (a path or a Dataset) to ``output`` (default: the
    run's path with the suffix ``.html``; required for a Dataset).  Returns its path.

    The page is written to a temporary file beside ``output`` and renamed into place, so a
    reader never sees half a page.  An ``output`` that holds anything but a page written by
    this function (a user's own ``index.html``, a folder, a link) is refused with
    ``FileExistsError`` unless ``overwrite=True``."""
    import os
    import tempfile

    origin = None
    if isinstance(run, xr.Dataset):
        if output is None:
            raise ValueError("write_report: give output= when run is a Dataset")
        ds = run
    else:
        ds = load_run(run)
        origin = str(run)
        if output is None:
            output = Path(str(Path(run)).rstrip("/")).with_suffix(".html")
    if theory is not None and not isinstance(theory, xr.Dataset):
        theory = load_run(theory)
    page = build_report(ds, title=title, theory=theory, origin=origin)
    output = Path(output)
    _check_replaceable(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output
