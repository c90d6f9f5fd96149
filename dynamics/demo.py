"""``traindyn demo``: the main job on an embedded default that needs no download.

1. Train a small MLP on scikit-learn's bundled digits, recording train/test loss and accuracy
   and RankMe and alpha-ReQ of each hidden layer at ~30 log-spaced steps, over a few seeds.
2. Run the linear student–teacher at two load ratios (α < 1 and α > 1) by gradient descent
   and compute the Advani–Saxe prediction on the same ``time`` coordinate.

Writes ``<out>/digits.nc``, ``<out>/linear_teacher.nc``, ``<out>/linear_theory.nc`` and PNG
figures (theory as lines; measurements as points: digits with their seed spread, the linear
teacher as mean ± standard error of the mean over its seeds, which are simulated as one batch).

torch's thread count is chosen from the cores that are free (``dynamics._threads``; override
with ``threads=`` / ``--threads`` or the environment variable ``TRAINDYN_THREADS``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from tqdm.auto import tqdm
from traindyn.dynamics import plot, storage
from traindyn.dynamics._threads import apply_threads
from traindyn.dynamics.recipes import simulate_linear_teacher, train_digits_mlp
from traindyn.dynamics.schedules import log_steps

from traindyn import theory

__all__ = ["DemoConfig", "linear_sem", "run_demo", "summary"]


@dataclass
class DemoConfig:
    """Sizes of the demo; :meth:`quick` is the version the tests run."""

    digits_steps: int = 3000
    digits_seeds: tuple[int, ...] = (0, 1, 2)
    digits_widths: tuple[int, ...] = (256, 256)
    digits_evals: int = 30
    learning_rate: float = 0.05
    linear_features: int = 300
    linear_load_ratios: tuple[float, ...] = (0.5, 2.0)
    linear_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    linear_learning_rate: float = 0.05
    linear_steps: int = 20_000
    linear_evals: int = 30
    noise_var: float = 0.25
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> DemoConfig:
        # 20 linear-teacher seeds: at N = 100 one seed's test error at α = 0.5 scatters by
        # ~0.15 around the theory's 1.0, and two seeds (0.87 ± 0.005, both low) made the
        # figure say the theory fails; the seeds run as one batch, so 20 cost little more
        return cls(digits_steps=300, digits_seeds=(0, 1), digits_widths=(128, 128),
                   digits_evals=12, linear_features=100, linear_seeds=tuple(range(20)),
                   linear_steps=2000, linear_evals=12)


def _digits(cfg: DemoConfig, bar: tqdm) -> xr.Dataset:
    runs = []
    for seed in cfg.digits_seeds:
        runs.append(train_digits_mlp(
            widths=cfg.digits_widths, steps=cfg.digits_steps, learning_rate=cfg.learning_rate,
            seed=seed, n_evals=cfg.digits_evals, on_step=lambda _: bar.update(1)))
    ds = xr.concat(runs, dim="seed", combine_attrs="override")
    ds.attrs["monitor_seconds"] = float(sum(r.attrs["monitor_seconds"] for r in runs))
    return ds


def _linear(cfg: DemoConfig) -> tuple[xr.Dataset, xr.Dataset]:
    steps = log_steps(cfg.linear_steps, cfg.linear_evals)
    measured = simulate_linear_teacher(
        n_features=cfg.linear_features, load_ratios=cfg.linear_load_ratios, steps=steps,
        learning_rate=cfg.linear_learning_rate, noise_var=cfg.noise_var,
        seeds=cfg.linear_seeds)
    predicted = theory.advani_saxe(
        measured.time, measured.load_ratio.values, noise_var=cfg.noise_var,
        learning_rate=cfg.linear_learning_rate)
    n_seeds = measured.sizes["seed"]
    measured.attrs["error_bars"] = (
        f"figure error bars: standard error of the mean over the {n_seeds} seeds, "
        f"std(ddof=1)/sqrt({n_seeds}); see linear_sem()")
    return measured, predicted


def linear_sem(measured: xr.Dataset, var: str) -> tuple[xr.DataArray, xr.DataArray]:
    """Mean and standard error of the mean of ``measured[var]`` over ``seed``.

    SEM = ``std(ddof=1) / sqrt(n_seeds)``: the uncertainty of the plotted mean, so the theory
    line should pass within about two of them; NaN (with a warning) for a single seed.
    """
    n = measured.sizes["seed"]
    mean = measured[var].mean("seed")
    if n < 2:
        import warnings

        warnings.warn(f"{var}: one seed has no standard error; drawn without error bars",
                      RuntimeWarning, stacklevel=2)
        return mean, xr.full_like(mean, np.nan)
    return mean, measured[var].std("seed", ddof=1) / np.sqrt(n)


def _figures(out: Path, digits: xr.Dataset, measured: xr.Dataset, predicted: xr.Dataset,
             cfg: DemoConfig) -> list[Path]:
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    plot.metric_over_steps(digits, "rankme", ax=axes[0])
    plot.metric_over_steps(digits, "alpha_req", ax=axes[1])
    for var, style in (("train_loss", "-"), ("test_loss", "--")):
        mean = digits[var].mean("seed")
        axes[2].plot(digits.step, mean, style, label=var)
    axes[2].set_xscale("symlog", linthresh=1)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("cross-entropy [nat]")
    axes[2].legend(fontsize=7, frameon=False)
    fig.suptitle("MLP on scikit-learn digits: hidden-layer geometry over training "
                 f"({digits.sizes['seed']} seeds)", fontsize=9)
    paths.append(plot.save_figure(fig, out / "digits_geometry.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    limits = theory.advani_saxe_asymptote(measured.load_ratio.values, noise_var=cfg.noise_var)
    times = measured.time.values[measured.time.values > 0]
    dense = theory.advani_saxe(
        np.geomspace(times.min(), times.max(), 200), measured.load_ratio.values,
        noise_var=cfg.noise_var, learning_rate=cfg.linear_learning_rate)
    colours = plot.PALETTE   # the colours of plot.compare's theory lines
    n_seeds = measured.sizes["seed"]
    for ax, var in zip(axes, ("test_error", "train_error"), strict=True):
        plot.compare(dense, None, var, x="time", hue="load_ratio", ax=ax)
        mean, sem = linear_sem(measured.where(measured.time > 0, drop=True), var)
        for i, ratio in enumerate(measured.load_ratio.values):
            ax.errorbar(mean.time.values, mean.sel(load_ratio=ratio).values,
                        yerr=sem.sel(load_ratio=ratio).values, fmt="o", ms=3.5, capsize=2,
                        lw=0.8, color=colours[i % len(colours)],
                        label=f"measured, load_ratio = {ratio:g}")
        ax.legend(fontsize=7, frameon=False,
                  title=f"points: mean ± SEM over {n_seeds} seeds", title_fontsize=7)
        if var == "test_error":
            for a, lim in zip(limits.load_ratio.values, limits.test_error.values, strict=True):
                ax.axhline(lim, color="0.6", lw=0.8, ls=":")
                ax.annotate(f"t→∞, α={a:g}", (float(measured.time.max()), lim), fontsize=6,
                            ha="right", va="bottom", color="0.4")
    axes[1].set_yscale("log")
    top = float(measured.train_error.max())
    axes[1].set_ylim(1e-4 * top, 2 * top)
    fig.suptitle(f"Linear student–teacher, N = {cfg.linear_features}: Advani–Saxe theory "
                 "(lines) vs gradient descent (points)", fontsize=9)
    paths.append(plot.save_figure(fig, out / "linear_teacher.png"))
    return paths


def run_demo(out: str | Path = "runs/demo", config: DemoConfig | None = None,
             progress: bool = True, threads: int | None = None) -> dict[str, Path]:
    """Run both parts of the demo, write Datasets and figures into ``out``, return their paths.

    ``threads`` sets torch's intra-op threads for the run (default: the free cores, see
    :func:`dynamics._threads.choose_threads`; ``TRAINDYN_THREADS`` overrides); the previous
    setting is restored afterwards.  ``paths["threads"]`` is the number used.
    """
    import torch

    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    chosen = apply_threads(threads)
    try:
        paths = _run(out, cfg, progress)
    finally:
        torch.set_num_threads(before)
    paths["threads"] = chosen  # type: ignore[assignment]
    return paths


def _run(out: Path, cfg: DemoConfig, progress: bool) -> dict[str, Path]:
    start = time.perf_counter()
    total = len(cfg.digits_seeds) * (cfg.digits_steps + 1) + 1
    with tqdm(total=total, desc="traindyn demo", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("digits MLP")
        digits = _digits(cfg, bar)
        bar.set_postfix_str("linear teacher")
        measured, predicted = _linear(cfg)
        bar.update(1)
    paths = {
        "digits": storage.save_netcdf(digits, out / "digits.nc"),
        "linear_teacher": storage.save_netcdf(measured, out / "linear_teacher.nc"),
        "linear_theory": storage.save_netcdf(predicted, out / "linear_theory.nc"),
    }
    for fig_path in _figures(out, digits, measured, predicted, cfg):
        paths[f"{fig_path.stem}.png"] = fig_path
    paths["seconds"] = time.perf_counter() - start  # type: ignore[assignment]
    return paths


def summary(paths: dict[str, Path], digits: xr.Dataset | None = None) -> str:
    """A few lines telling where the results are and what they say."""
    lines = ["traindyn demo: results written"]
    for key, path in paths.items():
        if key not in ("seconds", "threads"):
            lines.append(f"  {key:<16} {path}")
    if digits is not None:
        last = digits.isel(step=-1)
        lines.append(f"  final test accuracy {float(last.test_accuracy.mean()):.3f}; RankMe per "
                     "layer " + ", ".join(
                         f"{layer}: {float(last.rankme.sel(layer=layer).mean()):.1f}"
                         for layer in digits.layer.values))
    threads = paths.get("threads")
    lines.append(f"  took {paths['seconds']:.1f} s" + (
        f" with {threads} torch thread{'s' if threads != 1 else ''} (--threads N or "
        f"TRAINDYN_THREADS=N to change)" if threads else ""))
    return "\n".join(lines)

