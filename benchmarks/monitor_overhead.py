"""Overhead of the training monitor: the same run timed with and without it, in one process.

The monitor: RankMe, alpha-ReQ and the neural-collapse metrics (``probes.collapse``) on two
layers, on the 540 held-out digits, at 40 log-spaced steps of a 5,000-step SGD run (batch 128).
Two training workloads, because the ratio is ``1 + n_eval · t_eval / t_train`` and so depends
on what a training step costs:

* ``cnn`` — a small convolutional classifier of the 8×8 digits (conv 32 → conv 64 → max-pool →
  conv 256 → global average pool → 256 → 10); probes on the pooled conv features and the
  penultimate layer (both 256-wide).  The usual neural-collapse setting, at toy scale.
* ``mlp`` — the digits MLP recipe's network ``64 → 256 → 256 → 10``; probes on both hidden
  layers.  Its step costs about half a millisecond on a CPU, less than one evaluation's two
  ``256 × 256`` eigensolves: the worst case for any monitor, kept to show where the budget
  breaks.

For each workload, in one process: baseline, synchronous monitor, worker-thread monitor
(``Monitor(background="thread")``), worker-process monitor (``Monitor(background="process")``)
twice (cold: the worker's start-up imports overlap the timed run; warm: the worker was ready
before it — the steady state of a long run), baseline again; the ratio is taken against the
mean of the two baselines (their spread is printed: it is the noise floor of the machine).
For the two background modes the worker's own time per evaluation (feature probes, Dataset,
Zarr append) is printed too; the process mode's worker is started when the monitor is
constructed, before the timed region.  Also printed: the
ratio from the monitor's own clock, ``1 + t_monitor / t_baseline`` (the time the training
thread spent in ``monitor.step``; less sensitive to machine noise); whether the weights are
bit-identical with and without the monitor; one evaluation taken apart (forward pass, each
probe, the Zarr append); and how the schedule trades coverage for cost — the ratio for other
evaluation counts and how many evaluations fit a 5 % budget.

Usage: ``python benchmarks/monitor_overhead.py [--model cnn mlp] [--steps 5000] [--evals 40]
[--store] [--threads N] [--device cpu|cuda] [--quick]`` (``--store`` also streams every
evaluation to a Zarr store in a temporary folder; ``--threads`` sets torch's intra-op threads;
``--quick`` runs 1,000 steps and 20 evaluations, a smoke test).  Timings on a shared machine are
noisy; run it on a quiet one for numbers to quote.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from traindyn.dynamics import storage
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.recipes.digits import DigitsMLP, load_digits_split
from traindyn.dynamics.schedules import evaluation_steps, log_spaced

PROBES = ("rankme", "alpha_req", "neural_collapse")


class DigitsCNN(nn.Module):
    """Small convolutional classifier of 8×8 digit images (input: 64 pixels per row)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 256, 3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(256, 256)
        self.penultimate = nn.ReLU()
        self.head = nn.Linear(256, 10)
        self.hidden_names = ["pool", "penultimate"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.conv(x.reshape(-1, 1, 8, 8)))
        return self.head(self.penultimate(self.fc(h)))


WORKLOADS: dict[str, Callable[[], nn.Module]] = {
    "cnn": DigitsCNN,
    "mlp": lambda: DigitsMLP((256, 256)),
}


@dataclass
class Run:
    seconds: float
    weights: dict[str, torch.Tensor]
    monitor: Monitor | None


def train(workload: str, steps: int, monitor_args: dict | None, device: str,
          batch: int = 128, warm: bool = False) -> Run:
    """One timed training run; a background monitor is flushed inside the timed region.

    A process-mode monitor is constructed (its worker process started) before the timed
    region; with ``warm`` the run also waits, untimed, until the worker has finished its
    imports, else they overlap the first training steps."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in load_digits_split())
    model = WORKLOADS[workload]().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = (Monitor(model, layers=model.hidden_names, probe_data=x_te, probe_labels=y_te,
                       learning_rate=0.05, **monitor_args) if monitor_args is not None else None)
    if warm:
        monitor._worker.wait_ready()
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps + 1):
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen).to(device)
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
    if monitor is not None:
        monitor.flush()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Run(seconds, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
               monitor)


FLOOR_SOLVES = "floor: the d × d eigensolves (raw + centred)"
FLOOR_FORWARD = "forward pass with hooks"


def breakdown(monitor: Monitor, store: Path) -> dict[str, float]:
    """Seconds of each part of one evaluation (median of 5; probes summed over layers)."""
    from traindyn.probes import capture
    from traindyn.probes._solve import batched_eigvalsh
    from traindyn.probes.collapse import neural_collapse
    from traindyn.probes.spectral import SpectralMetrics, SpectrumAccumulator

    model, x = monitor.model, monitor.probe_data
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        t = time.perf_counter()
        out = fn()
        if x.is_cuda:  # the GPU's time, not the launch's
            torch.cuda.synchronize(x.device)
        parts.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def spectral(f):
        metrics = SpectralMetrics(["rankme", "alpha_req"])
        metrics.update(f)
        return metrics.compute()

    for _ in range(5):
        model.eval()
        with torch.no_grad(), capture(model, monitor.layers) as cap:
            timed(FLOOR_FORWARD, lambda: model(x))
        feats = cap.activations()
        # the floor: the eigensolves that no route avoids for exact RankMe (raw spectrum) and
        # alpha-ReQ (centred spectrum) of every layer, batched as the probes batch them
        accs = [SpectrumAccumulator().update(feats[layer]) for layer in monitor.layers]
        mats = [a.masked_matrix(c)[0] for c in (False, True) for a in accs]
        timed(FLOOR_SOLVES, lambda m=mats: batched_eigvalsh(m))
        for layer in monitor.layers:
            timed("rankme + alpha_req (one shared accumulator)",
                  lambda f=feats[layer]: spectral(f))
            timed("neural_collapse", lambda f=feats[layer]: neural_collapse(
                f, monitor.probe_labels))
        timed("whole evaluation (t_eval)", lambda: monitor.evaluate(0, train_loss=1.0))
        ds = monitor.evaluate(10**6, train_loss=1.0)
        timed("first Zarr append (xarray to_zarr)", lambda d=ds: storage.append_zarr(d, store))
        model.train()
    per_layer = {"rankme + alpha_req (one shared accumulator)", "neural_collapse"}
    return {k: float(np.median(v)) * (len(monitor.layers) if k in per_layer else 1)
            for k, v in parts.items()}


def schedule_for(steps: int, evals: int):
    """Log-spaced schedule with exactly ``evals`` distinct evaluation steps (log-spacing
    repeats small integers, so ask for more points until enough distinct steps remain)."""
    count = evals
    while len(evaluation_steps(log_spaced(steps, count), steps)) < evals:
        count += 1
    return log_spaced(steps, count)


def run_workload(workload: str, args: argparse.Namespace, tmp: Path) -> dict:
    schedule = schedule_for(args.steps, args.evals)
    n_evals = len(evaluation_steps(schedule, args.steps))
    store = (lambda name: tmp / f"{workload}-{name}.zarr") if args.store else (lambda name: None)
    train(workload, 50, None, args.device)  # warm-up (allocator, kernels)
    base1 = train(workload, args.steps, None, args.device)
    sync = train(workload, args.steps, dict(probes=PROBES, schedule=schedule,
                                            store=store("sync")), args.device)
    back = train(workload, args.steps, dict(probes=PROBES, schedule=schedule,
                                            store=store("thread"), background="thread"),
                 args.device)
    cold = train(workload, args.steps, dict(probes=PROBES, schedule=schedule,
                                            store=store("process-cold"), background="process"),
                 args.device)
    cold.monitor.close()   # the worker process exits (after the timed region)
    proc = train(workload, args.steps, dict(probes=PROBES, schedule=schedule,
                                            store=store("process"), background="process"),
                 args.device, warm=True)
    proc.monitor.close()
    base2 = train(workload, args.steps, None, args.device)
    base = (base1.seconds + base2.seconds) / 2
    mon, bg, pr = sync.monitor, back.monitor, proc.monitor
    identical = all(torch.equal(base1.weights[k], sync.weights[k]) for k in base1.weights)
    identical_bg = all(torch.equal(base1.weights[k], back.weights[k]) for k in base1.weights)
    identical_pr = all(torch.equal(base1.weights[k], proc.weights[k]) for k in base1.weights)
    reference = mon.to_dataset().drop_attrs()
    same = reference.identical(bg.to_dataset().drop_attrs())
    same_pr = reference.identical(pr.to_dataset().drop_attrs())
    parts = breakdown(mon, tmp / f"{workload}-breakdown.zarr")
    t_eval = mon.seconds_spent / n_evals
    out = dict(workload=workload, n_evals=n_evals, base1=base1.seconds, base2=base2.seconds,
               base=base, step=base / args.steps, sync=sync.seconds, back=back.seconds,
               proc=proc.seconds, cold=cold.seconds, t_eval=t_eval,
               t_eval_bg=bg.seconds_spent / n_evals,
               t_eval_pr=pr.seconds_spent / n_evals,
               worker=bg.seconds_background / n_evals, worker_pr=pr.seconds_background / n_evals,
               identical=identical, identical_bg=identical_bg, identical_pr=identical_pr,
               same=same, same_pr=same_pr, parts=parts,
               storing=mon.seconds_storing / n_evals, layers=mon.layers)
    _report(out, args)
    return out


def _report(r: dict, args: argparse.Namespace) -> None:
    base = r["base"]
    print(f"\n== {r['workload']}: {args.steps} steps of batch 128, {r['n_evals']} log-spaced "
          f"evaluations of {PROBES} on {r['layers']}"
          f"{', streamed to Zarr' if args.store else ''}")
    print(f"  baseline runs        {r['base1']:7.2f} s, {r['base2']:7.2f} s  (spread "
          f"{abs(r['base1'] - r['base2']) / base:.1%}); training step {r['step'] * 1e3:.3f} ms")
    print(f"  synchronous monitor  {r['sync']:7.2f} s   RATIO {r['sync'] / base:.3f}   "
          f"(monitor's own clock: {1 + r['t_eval'] * r['n_evals'] / base:.3f}; "
          f"t_eval {r['t_eval'] * 1e3:.1f} ms, of which storing {r['storing'] * 1e3:.1f} ms)")
    print(f"  thread monitor       {r['back']:7.2f} s   RATIO {r['back'] / base:.3f}   "
          f"(training thread's clock: {1 + r['t_eval_bg'] * r['n_evals'] / base:.3f}; "
          f"worker thread {r['worker'] * 1e3:.1f} ms per evaluation; the final wait is timed)")
    print(f"  process monitor      {r['proc']:7.2f} s   RATIO {r['proc'] / base:.3f}   "
          f"(training thread's clock: {1 + r['t_eval_pr'] * r['n_evals'] / base:.3f}; "
          f"worker process {r['worker_pr'] * 1e3:.1f} ms per evaluation; worker started "
          f"and ready before the timed region, the final wait timed)")
    extra = r["cold"] - r["proc"]
    cost = (f"a fixed cost of ~{extra:.1f} s here, amortised by longer runs" if
            extra > 0.05 * base else "no cost above this machine's noise here")
    print(f"  process monitor, cold {r['cold']:6.2f} s   RATIO {r['cold'] / base:.3f}   "
          f"(the same, its worker's start-up imports overlapping the timed run: {cost})")
    print(f"  weights bit-identical with and without the monitor: synchronous "
          f"{r['identical']}, thread {r['identical_bg']}, process {r['identical_pr']}; "
          f"Datasets identical to the synchronous one: thread {r['same']}, "
          f"process {r['same_pr']}")
    print("  one evaluation taken apart (median of 5):")
    for name, seconds in sorted(r["parts"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:44s} {seconds * 1e3:8.2f} ms")
    per_eval = r["t_eval"]
    floor = r["parts"][FLOOR_FORWARD] + r["parts"][FLOOR_SOLVES]
    print(f"  in-run cost per synchronous evaluation {per_eval * 1e3:.2f} ms; its floor "
          f"(forward pass + the unavoidable solves, measured above) {floor * 1e3:.2f} ms: "
          f"{per_eval / floor:.2f}× the floor (target on a GPU: ≤ 12 ms)")
    counts = ", ".join(f"n={n}: {1 + n * per_eval / base:.3f}" for n in (10, 20, 40, 100, 400))
    print(f"  synchronous ratio(n) = 1 + n·t_eval/t_run: {counts}")
    print(f"  evaluations that fit a 5% budget: {int(0.05 * base / per_eval)}; "
          f"break-even training step for 40 evaluations at 5%: "
          f"{40 * per_eval / 0.05 / args.steps * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(WORKLOADS), default=["cnn", "mlp"])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--evals", type=int, default=40)
    parser.add_argument("--store", action="store_true", help="also stream to Zarr")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="1,000 steps, 20 evaluations")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.evals = 1000, 20
    if args.smoke:
        args.steps, args.evals, args.model = 40, 2, ["mlp"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.device == "cuda":
        # bit-identity of weights with and without the monitor is only defined for
        # deterministic kernels (cuDNN's default convolution backward uses atomics: two
        # identical CUDA runs differ in their last bits, as an H200 run showed)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda" else
                   f"CPU, {torch.get_num_threads()} intra-op threads")
    print(f"torch {torch.__version__} on {device_name}")
    tmp = Path(tempfile.mkdtemp(prefix="traindyn-overhead-"))
    results = [run_workload(w, args, tmp) for w in args.model]
    print("\nsummary (target: ratio <= 1.05)")
    print("  workload  step ms  t_eval ms  synchronous  thread  process  monitor-clock  "
          "worker ms/eval (thread, process)")
    for r in results:
        print(f"  {r['workload']:8s}  {r['step'] * 1e3:7.3f}  {r['t_eval'] * 1e3:9.1f}  "
              f"{r['sync'] / r['base']:11.3f}  {r['back'] / r['base']:6.3f}  "
              f"{r['proc'] / r['base']:7.3f}  "
              f"{1 + r['t_eval'] * r['n_evals'] / r['base']:13.3f}  "
              f"{r['worker'] * 1e3:7.1f}, {r['worker_pr'] * 1e3:7.1f}")


if __name__ == "__main__":
    main()
