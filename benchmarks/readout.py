"""Cost of the readout probes next to the spectral probes, on the same features.

For one ``n × d`` float32 feature matrix with ``C`` classes, streamed in batches of ``--batch``
rows through :class:`probes.evaluation.ProbePlan` (accumulation and values, as in the
Monitor), the script times, interleaved over ``--repeats`` rounds (median wall time and
process CPU time, and the medians of per-round ratios, so a load change hits baseline and
probe alike):

* the baseline: RankMe + alpha-ReQ (the ``"spectrum"`` accumulator);
* ``linear_probe`` alone (its ``"readout"`` accumulator: the training split's float64
  scatter, class sums, held-out rows; one eigendecomposition and the GCV ridge choice);
* RankMe + alpha-ReQ + ``linear_probe`` in one plan (what the ridge readout adds: its
  ``"readout"`` accumulator shares the ``"spectrum"`` accumulator's float64 moments and forms
  only the held-out rows' scatter);
* the same plan with a readout accumulator that does not share (it forms the training split's
  scatter itself), the cost the sharing saves;
* ``logistic_probe`` (L-BFGS), ``knn_accuracy`` (k = 20, cosine), ``class_rankme`` and
  ``uniformity`` (one-shot on the whole matrix).

It prints the machine (CPU count, torch threads, device) and ``/proc/loadavg`` before and
after.  ``--smoke`` runs the smallest size in seconds (for a smoke test); ``--ridge-only``
leaves out the logistic, kNN, class-RankMe and uniformity routes.

Run: ``python benchmarks/readout.py [--device cuda] [--n 8192 --d 512 --classes 10]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from traindyn.probes import readout as R  # noqa: E402
from traindyn.probes.evaluation import ProbePlan  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"


def features(n: int, d: int, classes: int, device: torch.device, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means plus Gaussian noise with a decaying spectrum (λ_r ∝ 1/r)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.randn(classes, d, generator=g)
    scale = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    x = means[y] * 0.3 + torch.randn(n, d, generator=g) * scale + 0.1
    return x.to(device), y


def unshared_linear_probe():
    """``linear_probe`` reading a ``"readout"``-like accumulator that shares nothing."""
    import dataclasses

    from traindyn.probes.registry import Accumulator, get_probe, register_accumulator

    register_accumulator(Accumulator("readout_unshared", R.ReadoutAccumulator,
                                     needs_labels=True))
    return dataclasses.replace(get_probe("linear_probe"), accumulator="readout_unshared")


def streamed(names: list, x: torch.Tensor, y: torch.Tensor, batch: int):
    """One plan over one layer: stream the batches, then the values."""
    plan = ProbePlan(names, ["layer"], {"alpha_req": {"fit_range": (10, min(100, x.shape[1]))}}
                     if "alpha_req" in names else None)

    def go():
        state = plan.start()
        for i in range(0, x.shape[0], batch):
            plan.update(state, "layer", x[i:i + batch], y[i:i + batch])
        return plan.layer_values(state).layer_values
    return go


def interleaved(routes: dict, device: torch.device, repeats: int) -> dict:
    """``{route: (median wall s, median wall ratio, median CPU s, median CPU ratio)}``; ratios
    are per round against the first route; CPU time is this process's (all its threads)."""
    wall: dict[str, list[float]] = {name: [] for name in routes}
    cpu: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(repeats):
        for name, fn in routes.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    def ratio(times: dict[str, list[float]], name: str) -> float:
        base = times[next(iter(routes))]
        return statistics.median(a / b for a, b in zip(times[name], base, strict=True))

    return {name: (statistics.median(wall[name]), ratio(wall, name),
                   statistics.median(cpu[name]), ratio(cpu, name)) for name in routes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--smoke", action="store_true", help="smallest size, one round (seconds)")
    ap.add_argument("--ridge-only", action="store_true",
                    help="only the spectral probes and the ridge readout (no logistic, kNN, "
                         "class RankMe, uniformity)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.classes, args.batch, args.repeats = 400, 32, 4, 128, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {device} ({name})")
    print(f"load before: {_loadavg()}")
    x, y = features(args.n, args.d, args.classes, device)
    routes = {
        "rankme + alpha_req (baseline)": streamed(["rankme", "alpha_req"], x, y, args.batch),
        "linear_probe": streamed(["linear_probe"], x, y, args.batch),
        "rankme + alpha_req + linear_probe": streamed(["rankme", "alpha_req", "linear_probe"],
                                                      x, y, args.batch),
        "rankme + alpha_req + linear_probe (unshared)": streamed(
            ["rankme", "alpha_req", unshared_linear_probe()], x, y, args.batch),
        "logistic_probe": lambda: R.logistic_probe(x, y),
        "knn_accuracy (k=20, cosine)": lambda: R.knn_accuracy(x, y, k=20),
        "class_rankme": lambda: R.class_rankme(x, y),
        "uniformity": lambda: R.uniformity(x),
    }
    if args.ridge_only:
        routes = {k: v for k, v in routes.items() if "rankme + " in k or k == "linear_probe"}
    for fn in routes.values():  # warm-up: imports, allocator, BLAS
        fn()
    res = interleaved(routes, device, args.repeats)
    print(f"\nn={args.n} d={args.d} C={args.classes} batch={args.batch}, median of "
          f"{args.repeats} interleaved rounds")
    print(f"{'route':46s} {'wall ms':>10s} {'ratio':>8s} {'CPU ms':>10s} {'ratio':>8s}")
    for route, (wall, ratio, cpu, cpu_ratio) in res.items():
        print(f"{route:46s} {wall * 1e3:10.1f} {ratio:7.2f}× {cpu * 1e3:10.1f} "
              f"{cpu_ratio:7.2f}×")
    base = res["rankme + alpha_req (baseline)"][0]
    both = res["rankme + alpha_req + linear_probe"][0]
    own = res["rankme + alpha_req + linear_probe (unshared)"][0]
    print(f"\nthe ridge readout adds {both / base - 1:+.0%} to the spectral probes' wall time "
          f"(sharing their moments; {own / base - 1:+.0%} when it forms its own scatter)")
    print(f"load after: {_loadavg()}")


if __name__ == "__main__":
    main()
