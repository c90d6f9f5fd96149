"""Cost of the grokking recipe per training step: every α at once against one network at a time,
and against ``theory.rich_grokking`` (the same gradient descent through ``(m, M)`` alone).

Run: ``python benchmarks/grokking.py [--smoke] [--threads N]``.

Size: Kumar et al. (2024), Fig. 1 — D = 100, P = 550, N = 500, ε = 0.02 — with A = 4 output
scales (``--smoke``: D = 10, P = 55, N = 50).  Per-step cost = (time of a run of ``S + 1`` steps
− time of a run of 1 step) / ``S``, both with 2 evaluations (so the Monitor's start-up and
probe evaluations cancel); best of 2.  Times are CPU seconds of this process
(``time.process_time``; wall-clock in brackets); ratios are against the per-network loop
measured in the same run.  Machine, threads and load average are printed first and last.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
import torch
from _timing import load_average  # benchmarks/_timing.py
from threadpoolctl import threadpool_limits
from traindyn.dynamics.recipes.grokking import grokking_task, train_grokking
from traindyn.theory import rich_grokking


def best_of(fn, repeat: int = 2) -> tuple[float, float]:
    """Shortest CPU time of ``repeat`` calls and the wall-clock time of that call."""
    best, wall = float("inf"), float("inf")
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        c, w = time.process_time() - c0, time.perf_counter() - w0
        if c < best:
            best, wall = c, w
    return best, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="smallest size (seconds)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    dim, n, width, steps = (10, 55, 50, 20) if args.smoke else (100, 550, 500, 300)
    alphas = (1.0, 4.0, 16.0, 64.0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} cores; threads {args.threads}; load {load_average()}")
    print(f"D = {dim}, P = {n}, N = {width}, A = {len(alphas)} alphas, {steps} steps")
    common = dict(alpha=alphas, n_train=n, n_test=200, dim=dim, width=width, epsilon=0.02,
                  learning_rate=0.5, n_evals=2, ntk_samples=16)
    per_step = {}
    with threadpool_limits(args.threads):
        for vectorize in (False, True):
            long = best_of(lambda v=vectorize: train_grokking(steps=steps + 1, vectorize=v,
                                                              **common))
            short = best_of(lambda v=vectorize: train_grokking(steps=1, vectorize=v, **common))
            per_step[vectorize] = ((long[0] - short[0]) / steps, (long[1] - short[1]) / steps)
        x, y, _, _, beta = grokking_task(n, 1, dim, 0)
        th = best_of(lambda: rich_grokking(x, y, np.array([0, steps]), 0.5, list(alphas),
                                           beta=beta, epsilon=0.02))
    per_step["theory"] = (th[0] / steps, th[1] / steps)
    loop = per_step[False][0]
    for name, key in (("one network at a time (autograd)", False),
                      ("all alphas at once (vectorised)", True),
                      ("theory.rich_grokking, (m, M)", "theory")):
        cpu, wall = per_step[key]
        print(f"{name:36s} {1e3 * cpu:8.2f} ms CPU/step [{1e3 * wall:8.2f} wall]  "
              f"{1 / max(cpu, 1e-12):8.1f} steps/s  loop ÷ this = {loop / max(cpu, 1e-12):5.2f}")
    print(f"load {load_average()}")


if __name__ == "__main__":
    main()
