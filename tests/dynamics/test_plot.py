"""dynamics.plot: backend and global state untouched, bands that say what they are, the new
figures drawing the numbers of their probe functions.  References: numpy/scipy on the same
input (SEM, Student-t interval, integrals), a brute-force linear CKA, a hand Hill estimate."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import xarray as xr
from scipy import integrate, stats
from traindyn.dynamics import plot

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parents[2]


def _run(n_seeds: int = 5, steps=(0, 1, 3, 10, 30, 100), layers=("a", "b", "c"),
         learning_rate: float = 0.1) -> xr.Dataset:
    rng = np.random.default_rng(0)
    steps = np.asarray(steps)
    shape = (n_seeds, steps.size, len(layers))
    rank = 10 + np.log1p(steps)[None, :, None] + rng.normal(0, 0.5, shape)
    loss = np.exp(-0.02 * steps)[None, :] + rng.normal(0, 0.01, (n_seeds, steps.size)) + 0.1
    return xr.Dataset(
        {"rankme": (("seed", "step", "layer"), rank,
                    {"long_name": "RankMe effective rank", "units": "1"}),
         "train_loss": (("seed", "step"), loss,
                        {"long_name": "training loss", "units": "nat"}),
         "test_accuracy": (("seed", "step"), 1 - loss / 2,
                           {"long_name": "test accuracy", "units": "1"})},
        coords={"seed": np.arange(n_seeds), "step": steps,
                "time": ("step", learning_rate * steps,
                         {"long_name": "training time", "units": "1"}),
                "layer": list(layers)},
        attrs={"source": "synthetic run"})


# ------------------------------------------------------------------- backend and state
def test_import_and_drawing_keep_the_backend_and_rcparams():
    """Importing dynamics.plot and drawing every figure leaves the backend chosen before (svg
    here, not Agg) and the global rcParams as they were (a child process: a fresh
    matplotlib)."""
    code = """
import matplotlib, json
matplotlib.use("svg")
before = matplotlib.get_backend()
import matplotlib.pyplot as plt
rc = {k: repr(v) for k, v in plt.rcParams.items()}
import numpy as np, torch
from traindyn.dynamics import plot
from tests.dynamics.test_plot import _run
fig = plot.run_overview(_run())
plot.spectrum(torch.randn(60, 30))
after = matplotlib.get_backend()
changed = [k for k, v in plt.rcParams.items() if repr(v) != rc[k]]
print(json.dumps([before, after, changed]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, changed = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == after == "svg"
    assert changed == []


def test_no_matplotlib_use_in_traindyn_or_notebooks():
    """No source file of traindyn and no notebook code cell forces a backend."""
    found = []
    for folder in ("dynamics", "probes", "theory", "traindyn"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "use"
                        and getattr(node.func.value, "id", "") == "matplotlib"):
                    found.append(str(path.relative_to(ROOT)))
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        if any("matplotlib.use(" in "".join(c["source"]) for c in cells
               if c["cell_type"] == "code"):
            found.append(str(path.relative_to(ROOT)))
    assert found == []


def test_save_figure_closes_only_on_a_non_interactive_backend(tmp_path):
    fig = plot.run_overview(_run())
    path = plot.save_figure(fig, tmp_path / "a.png", close=False)
    assert plt.fignum_exists(fig.number)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.save_figure(fig, tmp_path / "a.svg")   # the tests' backend is Agg: closed
    assert matplotlib.get_backend().lower() == "agg"
    assert not plt.fignum_exists(fig.number)
    assert b"<svg" in (tmp_path / "a.svg").read_bytes()[:400]


# ------------------------------------------------------------------- bands and labels
@pytest.mark.parametrize("band", ["sem", "std", "ci95"])
def test_band_half_widths_against_numpy_and_scipy(band):
    ds = _run(n_seeds=5)
    values = ds["rankme"].values            # (seed, step, layer)
    mean, half, text = plot.mean_and_band(ds["rankme"], band)
    sd = values.std(axis=0, ddof=1)
    expected = {"sem": sd / np.sqrt(5), "std": sd,
                "ci95": stats.t.interval(0.95, df=4, loc=0, scale=sd / np.sqrt(5))[1]}[band]
    np.testing.assert_allclose(mean.transpose("step", "layer").values, values.mean(0),
                               rtol=1e-13)
    np.testing.assert_allclose(half.transpose("step", "layer").values, expected, rtol=1e-12)
    assert text == f"{plot.BANDS[band]} over 5 seeds"


def test_band_none_and_one_seed_draw_no_band():
    ds = _run(n_seeds=5)
    assert plot.mean_and_band(ds["rankme"], None)[1] is None
    assert plot.mean_and_band(ds["rankme"].isel(seed=[0]), "sem")[1] is None
    with pytest.raises(ValueError, match="band must be one of"):
        plot.mean_and_band(ds["rankme"], "stderr")


def test_metric_over_steps_shades_the_sem_and_says_so():
    ds = _run(n_seeds=4)
    ax = plot.metric_over_steps(ds, "rankme", x="time")
    assert ax.get_legend().get_title().get_text() == "layer; shaded: mean ± SEM over 4 seeds"
    band = ax.collections[0].get_paths()[0].vertices  # layer "a": the fill_between polygon
    values = ds["rankme"].sel(layer="a").values
    sem = values.std(0, ddof=1) / 2.0
    upper = values.mean(0) + sem
    xs = ds["time"].values
    # the polygon runs along the lower edge, then back along the upper edge
    got = {round(x, 12): y for x, y in band if y >= values.mean(0)[np.argmin(abs(xs - x))]}
    np.testing.assert_allclose([got[round(x, 12)] for x in xs], upper, rtol=1e-12)
    assert ax.get_xlabel() == "time = learning rate × step"
    assert ax.get_ylabel() == "RankMe effective rank"
    plt.close(ax.figure)


def test_axis_label_from_long_name_and_units():
    da = xr.DataArray([1.0], dims="x", attrs={"long_name": "training loss", "units": "nat"})
    assert plot.axis_label(da) == "training loss [nat]"
    da.attrs["units"] = "1"
    assert plot.axis_label(da) == "training loss"
    assert plot.axis_label(xr.DataArray([0.0], dims="step"), "time") == plot.TIME_LABEL


def test_compare_legend_names_the_error_bars():
    rng = np.random.default_rng(1)
    t = np.array([0.1, 1.0, 10.0])
    theory = xr.Dataset({"err": ("step", np.exp(-t))}, coords={"step": [1, 10, 100],
                                                             "time": ("step", t)})
    measured = xr.Dataset({"err": (("seed", "step"), np.exp(-t) + rng.normal(0, .01, (6, 3)))},
                          coords={"seed": np.arange(6), "step": [1, 10, 100],
                                  "time": ("step", t)})
    ax = plot.compare(theory, measured, "err", band="ci95")
    assert ax.get_legend().get_title().get_text() == "points: mean with 95% CI over 6 seeds"
    bars = ax.containers[0]  # the errorbar container: its bar segments
    seg = bars.lines[2][0].get_segments()
    sd = measured["err"].values.std(0, ddof=1)
    half = stats.t.ppf(0.975, 5) * sd / np.sqrt(6)
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in seg], 2 * half, rtol=1e-12)
    plt.close(ax.figure)


# ------------------------------------------------------------------- run overview
def test_run_overview_panels_theory_and_no_clipped_labels():
    ds = _run()
    ds["rankme_theory"] = ds["rankme"].mean("seed") * 0 + 11.0
    ds["rankme_theory"].attrs = {"long_name": "predicted RankMe", "units": "1"}
    fig = plot.run_overview(ds)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["losses", "accuracies", "rankme"]
    assert fig.get_suptitle() == "synthetic run"
    # the theory line of layer "b": dashed, at the predicted values over time
    dashed = [ln for ln in axes[2].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 3
    np.testing.assert_allclose(dashed[1].get_ydata(), 11.0)
    np.testing.assert_allclose(dashed[1].get_xdata(), ds["time"].values)
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:3] == ["a", "b", "c"]
    assert "dashed: theory" in labels and "shaded: mean ± SEM over 5 seeds" in labels
    # nothing clipped: every axis label and title lies inside the figure
    fig.canvas.draw()
    box = fig.bbox
    for ax in axes:
        for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
            ext = text.get_window_extent()
            assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, text.get_text()
            assert box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, text.get_text()
    plt.close(fig)


def test_run_overview_default_x_is_step_without_a_learning_rate():
    ds = _run(learning_rate=1.0)
    fig = plot.run_overview(ds)
    assert fig.axes[0].get_xlabel() == "step (optimiser updates)"
    plt.close(fig)


# ------------------------------------------------------------------- CKA
def _brute_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019) Eq. 2 with linear kernels, centred, in float64."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2
                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_heatmap_draws_the_matrix():
    from traindyn.probes.similarity import cka_matrix

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    feats = {f"l{i}": torch.tanh(x @ torch.randn(8, 12, generator=gen, dtype=torch.float64))
             for i in range(4)}
    ax = plot.cka_heatmap(cka_matrix(feats))
    drawn = np.asarray(ax.images[0].get_array())
    ref = np.array([[_brute_linear_cka(feats[a].numpy(), feats[b].numpy()) for b in feats]
                    for a in feats])
    np.testing.assert_allclose(drawn, ref, rtol=1e-10)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(feats)
    assert ax.images[0].get_clim() == (0.0, 1.0)
    plt.close(ax.figure)


def test_cka_heatmap_checkpoint_by_checkpoint():
    from traindyn.probes.similarity import checkpoint_cka

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(100, 6, generator=gen, dtype=torch.float64)
    feats = {s: {"h": base + 0.3 * s * torch.randn(100, 6, generator=gen, dtype=torch.float64),
                 "o": base} for s in (0, 1, 2)}
    ax = plot.cka_heatmap(checkpoint_cka(feats), layer="h")
    drawn = np.asarray(ax.images[0].get_array())
    ref = [[_brute_linear_cka(feats[a]["h"].numpy(), feats[b]["h"].numpy()) for b in feats]
           for a in feats]
    np.testing.assert_allclose(drawn, ref, rtol=1e-10)
    assert ax.get_xlabel() == "step of the compared checkpoint"
    plt.close(ax.figure)


# ------------------------------------------------------------------- spectrum
def test_marchenko_pastur_esd_density_integrates_to_one():
    for ratio, scale in ((0.5, 1.0), (0.2, 3.7), (1.0, 0.4)):
        lo, hi = scale * (1 - np.sqrt(ratio)) ** 2, scale * (1 + np.sqrt(ratio)) ** 2
        total, _ = integrate.quad(lambda v, r=ratio, s=scale:
                                  plot.marchenko_pastur_esd_density(np.array([v]), r, s)[0],
                                  lo, hi, limit=200)
        assert abs(total - 1.0) < 1e-6


def test_spectrum_of_a_gaussian_matrix():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(600, 300, generator=gen, dtype=torch.float64)
    ax = plot.spectrum(w, bins=40)
    hist = ax.patches[0]   # the filled stairs: heights over log-spaced edges
    lam = np.linalg.svd(w.numpy(), compute_uv=False) ** 2 / 600
    edges = np.geomspace(lam.min(), lam.max() * (1 + 1e-9), 41)
    counts, _ = np.histogram(lam, edges)
    heights = counts / (lam.size * np.diff(edges))
    np.testing.assert_allclose(np.sum(heights * np.diff(edges)), 1.0, rtol=1e-12)
    path = hist.get_path().vertices
    assert np.isclose(path[:, 1].max(), heights.max(), rtol=1e-12)
    edge_line = next(ln for ln in ax.get_lines() if ln.get_linestyle() == "--")
    edge = edge_line.get_xdata()[0]
    # unit-variance entries: the MP edge (1 + sqrt(1/2))^2 = 2.914 (Marchenko & Pastur 1967),
    # from a bulk scale matched at the median; finite-size error a few per cent
    assert abs(edge / (1 + np.sqrt(0.5)) ** 2 - 1) < 0.03
    assert "no heavy tail by traindyn's guard" in ax.get_legend().get_texts()[-1].get_text()
    plt.close(ax.figure)


def test_spectrum_power_law_line_matches_a_hill_estimate():
    gen = torch.Generator().manual_seed(2)
    w = torch.distributions.StudentT(2.0).sample((500, 250)).double()
    ax = plot.spectrum(w)
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("power-law"))
    x, y = line.get_xdata(), line.get_ydata()
    slope = np.polyfit(np.log(x), np.log(y), 1)[0]
    lam = np.sort(np.linalg.svd(w.numpy(), compute_uv=False) ** 2 / 500)
    xmin = x[0]
    tail = lam[lam >= xmin * (1 - 1e-12)]
    alpha = 1 + tail.size / np.sum(np.log(tail / xmin))   # Clauset et al. (2009) Eq. 3.1
    np.testing.assert_allclose(-slope, alpha, rtol=1e-9)
    # the line carries the tail's share of the eigenvalues: its integral from xmin
    share = integrate.trapezoid(y, x)
    assert 0.9 * tail.size / lam.size < share <= tail.size / lam.size * 1.0001
    del gen
    plt.close(ax.figure)


def test_spectrum_of_a_module_layer():
    net = torch.nn.Sequential(torch.nn.Linear(40, 80), torch.nn.ReLU(), torch.nn.Linear(80, 20))
    ax = plot.spectrum(net, layer="2")
    assert "(20 × 80)" in ax.get_title()
    with pytest.raises(KeyError, match="'0', '2'"):
        plot.spectrum(net, layer="1")
    plt.close("all")


# ------------------------------------------------------------------- phases
def test_phase_plot_marks_the_detected_phases():
    from traindyn.probes.phases import geometric_phases

    steps = np.r_[0, np.unique(np.geomspace(1, 5000, 40).astype(int))]
    t = np.log1p(steps)
    rank = 50 - 30 * np.exp(-t) + 10 * np.sin(t / 1.5)
    alpha = 1 - 0.1 * np.sin(t / 1.5) + 0.02 * t
    ds = xr.Dataset({"rankme": (("step", "layer"), rank[:, None]),
                     "alpha_req": (("step", "layer"), alpha[:, None])},
                    coords={"step": steps, "layer": ["h"]})
    ax = plot.phase_plot(ds)
    labels = geometric_phases(steps, rank, alpha)
    drawn = [p for p in ("warmup", "entropy_seeking", "compression_seeking", "undetermined")
             if (labels == p).any()]
    assert len(ax.collections) == len(drawn)
    for coll, phase in zip(ax.collections, drawn, strict=True):
        np.testing.assert_allclose(coll.get_offsets()[:, 0], rank[labels == phase])
        np.testing.assert_allclose(coll.get_array(),
                                   np.where(steps > 0, steps, 1)[labels == phase])
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == len(drawn)
    assert all(t.split(" (")[0].replace("-", "_") in drawn for t in texts)
    plt.close(ax.figure)


def test_spectrum_of_eigenvalues_in_a_dataset():
    """A Dataset of eigenvalues over (step, layer, mode): the chosen one is drawn, the
    histogram integrates to 1, and without a ratio no Marchenko-Pastur curve is claimed."""
    rng = np.random.default_rng(0)
    lam = np.sort(rng.pareto(2.0, size=(2, 2, 400)) + 1.0, axis=-1)
    ds = xr.Dataset({"eigenvalue": (("step", "layer", "mode"), lam,
                                    {"long_name": "feature covariance eigenvalue"})},
                    coords={"step": [0, 5], "layer": ["a", "b"]})
    ax = plot.spectrum(ds, layer="a", step=5, bins=30)
    chosen = lam[1, 0]
    edges = np.geomspace(chosen.min(), chosen.max() * (1 + 1e-9), 31)
    heights = np.histogram(chosen, edges)[0] / (chosen.size * np.diff(edges))
    drawn = ax.patches[0].get_path().vertices[:, 1]
    assert np.isclose(drawn.max(), heights.max(), rtol=1e-12)
    assert ax.get_title() == "feature covariance eigenvalue"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any("Marchenko" in t for t in labels)
    assert any(t.startswith("power-law tail α =") for t in labels)
    plt.close(ax.figure)
