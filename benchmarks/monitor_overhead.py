"""Overhead of the training monitor: the same run timed with and without it, in one process.

The run: the digits MLP recipe's network (``64 → 256 → 256 → 10``, ReLU) trained by SGD with
batch 128 for 5,000 steps.  The monitor: RankMe, alpha-ReQ and the neural-collapse metrics
(``probes.collapse``) on both hidden layers, on the 540 held-out digits, at 40 log-spaced steps.
Baseline runs before and after the synchronous monitored run give the noise of the machine;
ratios are taken against their mean.  The weights of the two runs are compared bit for bit.

Then one evaluation is taken apart (forward pass with hooks, each probe on each layer, building
the Dataset, appending to Zarr) so the printout says what dominates, and the ratio is
extrapolated to other evaluation counts: ``ratio(n) ≈ 1 + n · t_eval / t_train``.  A schedule
buys coverage (evaluations) linearly in cost; log-spacing puts them where the geometry changes
fastest (early) for the same budget.

Both monitor modes are timed: *synchronous* (every evaluation on the training thread) and
*background* (``Monitor(background=True)``: the training thread runs only the probe forward
pass; the probes and the Zarr append run on one worker thread, overlapping training when a core
is free).  The two monitored runs' Datasets are compared for equality.

Usage: ``python benchmarks/monitor_overhead.py [--steps 5000] [--evals 40] [--store]
[--threads N]`` (``--store`` also streams every evaluation to a Zarr store in a temporary
folder; ``--threads`` sets torch's intra-op threads of the training loop).
Timings on a shared machine are noisy; run it on a quiet one for numbers to quote.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynamics import records
from dynamics.monitor import Monitor
from dynamics.recipes.digits import DigitsMLP, load_digits_split
from dynamics.schedules import evaluation_steps, log_spaced

PROBES = ("rankme", "alpha_req", "neural_collapse")


def train(steps: int, monitor_args: dict | None, width: int, batch: int,
          finish: bool = False) -> tuple[float, dict, Monitor | None]:
    """Time the run; ``finish`` also times waiting for the monitor's background work."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    model = DigitsMLP((width, width))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = (Monitor(model, layers=model.hidden_names, probe_data=x_te, probe_targets=y_te,
                       learning_rate=0.05, **monitor_args) if monitor_args is not None else None)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps + 1):
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        if monitor is not None:
            monitor.step(step, train_loss=loss.item())
        else:
            loss.item()  # the same synchronisation point as the monitored loop
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if finish and monitor is not None:
        monitor.flush()
    seconds = time.perf_counter() - start
    return seconds, {k: v.clone() for k, v in model.state_dict().items()}, monitor


def breakdown(monitor: Monitor, store: Path) -> dict[str, float]:
    """Seconds of each part of one evaluation (median of 5)."""
    from probes import capture
    from probes.collapse import neural_collapse
    from probes.spectral import alpha_req, rankme

    model, x = monitor.model, monitor.probe_data
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(time.perf_counter() - t)
        return out

    for _ in range(5):
        model.eval()
        with torch.no_grad(), capture(model, monitor.layers) as cap:
            timed("forward + hooks", lambda: model(x))
        feats = cap.activations()
        for layer in monitor.layers:
            timed("rankme", lambda f=feats[layer]: rankme(f))
            timed("alpha_req", lambda f=feats[layer]: alpha_req(f))
            timed("neural_collapse", lambda f=feats[layer]: neural_collapse(
                f, monitor.probe_targets))
        timed("whole evaluation", lambda: monitor.evaluate(0, train_loss=1.0))
        ds = monitor.evaluate(10**6, train_loss=1.0)
        timed("zarr append", lambda d=ds: records.append_zarr(d, store))
        model.train()
    return {k: float(np.median(v)) * (1 if k in ("forward + hooks", "whole evaluation",
                                                  "zarr append") else len(monitor.layers))
            for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--evals", type=int, default=40)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--store", action="store_true", help="also stream to Zarr")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    count = args.evals   # log-spacing repeats small integers: ask for more to get `evals` steps
    while len(evaluation_steps(log_spaced(args.steps, count), args.steps)) < args.evals:
        count += 1
    schedule = log_spaced(args.steps, count)
    n_evals = len(evaluation_steps(schedule, args.steps))
    tmp = Path(tempfile.mkdtemp(prefix="traindyn-overhead-"))
    store = tmp / "run.zarr" if args.store else None
    train(50, None, args.width, args.batch)  # warm-up (allocator, kernels)

    base1, w_base, _ = train(args.steps, None, args.width, args.batch)
    mon_s, w_mon, monitor = train(args.steps, dict(probes=PROBES, schedule=schedule,
                                                   store=store), args.width, args.batch)
    base2, _, _ = train(args.steps, None, args.width, args.batch)
    # the background run goes last: with several intra-op threads its worker thread leaves
    # OpenMP threads of its own behind, which slowed any run after it (2-3x, measured)
    bg_store = tmp / "background.zarr" if args.store else None
    bg_s, w_bg, bg = train(args.steps, dict(probes=PROBES, schedule=schedule, store=bg_store,
                                            background=True), args.width, args.batch,
                           finish=True)
    base = (base1 + base2) / 2
    identical = all(torch.equal(w_base[k], w_mon[k]) for k in w_base)
    identical_bg = all(torch.equal(w_base[k], w_bg[k]) for k in w_base)
    same = monitor.to_dataset().drop_attrs().identical(bg.to_dataset().drop_attrs())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.steps} steps, width {args.width}, batch {args.batch}")
    print(f"probes {PROBES} on {monitor.layers}, {n_evals} log-spaced evaluations"
          f"{', streamed to Zarr' if store else ''}")
    print(f"baseline runs       {base1:8.2f} s, {base2:8.2f} s  (spread "
          f"{abs(base1 - base2) / base:.1%})")
    print(f"monitored run       {mon_s:8.2f} s  (monitor's own clock: "
          f"{monitor.seconds_spent:.2f} s, of which storing {monitor.seconds_storing:.2f} s)")
    print(f"RATIO monitored / baseline = {mon_s / base:.3f}   (target <= 1.05)")
    print(f"ratio from the monitor's own clock, 1 + t_monitor / t_baseline = "
          f"{1 + monitor.seconds_spent / base:.3f}   (less sensitive to machine noise)")
    print(f"weights bit-identical with and without the monitor: {identical}")
    print(f"\nbackground run      {bg_s:8.2f} s  (training thread's monitor clock: "
          f"{bg.seconds_spent:.2f} s; worker: {bg.seconds_background:.2f} s, of which storing "
          f"{bg.seconds_storing:.2f} s; includes waiting for the worker at the end)")
    print(f"RATIO background / baseline = {bg_s / base:.3f}   (target <= 1.05)")
    print(f"ratio from the training thread's monitor clock = "
          f"{1 + bg.seconds_spent / base:.3f}")
    print(f"background: weights bit-identical {identical_bg}; Dataset identical to the "
          f"synchronous run's {same}")

    parts = breakdown(monitor, tmp / "breakdown.zarr")
    if store:
        parts["zarr append (monitor, in the run)"] = monitor.seconds_storing / n_evals
    per_eval = parts["whole evaluation"] + (parts["zarr append (monitor, in the run)"]
                                            if store else 0.0)
    print("\none evaluation, median of 5 (probe times summed over layers; 'zarr append' is"
          " xarray's to_zarr append, the monitor's first append; later ones write the open"
          " arrays directly; the zarr append counts in t_eval only with --store):")
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:34s} {seconds * 1e3:9.2f} ms")
    per_step = base / args.steps
    print(f"\ntraining step       {per_step * 1e3:9.3f} ms")
    print("synchronous ratio(n) = 1 + n · t_eval / t_train for other evaluation counts"
          " (background mode moves all but the forward pass off the training thread):")
    for n in (10, 20, 40, 100, 400):
        print(f"  n = {n:4d}: {1 + n * per_eval / base:.3f}")
    budget = int(0.05 * base / per_eval)
    print(f"evaluations that fit in a 5% budget here: {budget}")


if __name__ == "__main__":
    main()
