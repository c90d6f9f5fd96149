"""DMFT solve cost against the unchanged solver, with outputs checked against Monte-Carlo error.

Run: ``python benchmarks/dmft_speed.py [--smoke] [--P 160 --M 32768 --steps 400]``.

Task: he2 single-index (``two_layer_task(P, 1, 10, "he2", 0)``), tanh, γ₀ = 1, outputs at
``t = 0, 1, …, 10``, ``two_time = 0``.  In one process, with one LAPACK thread for every solver
(threadpoolctl) and the same XLA settings:

1. **Monte-Carlo error.**  ``theory.dmft_two_layer`` at seeds 1…``--seeds`` (error-controlled
   grid, ``step_tol = 1e-5``); ``σ_MC`` of every output is its standard deviation over the seeds
   (the error of one solve with ``M`` fields).  ``e_MC = max_t ‖σ_MC(f(t))‖ / ‖y‖`` is the same
   error in the units of ``step_error``.
2. **Timed solves at seed 0**: the reference solver (``benchmarks/_dmft_reference.py``, the
   solver of commit dd32ac4; or ``theory/dmft.py`` of another commit ``--ref`` by ``git show``);
   this solver on the fixed ``--steps`` grid (Anderson mixing, two-time states only in the last
   pass); this solver with the error-controlled grid (``adaptive=True``, ``step_tol = e_MC /
   10``), and the same with ``field_dtype="float32"``. Wall time, process CPU time, iterations
   (full-size passes; warm-start passes on an eighth of the fields counted apart), the work in
   full-pass equivalents and the load average. ``--ref-iterations N`` times the reference with a
   fixed ``N`` iterations instead (said in the output).
3. **Agreement**: for each output, ``max |new − reference|`` over all entries against
   ``max σ_MC`` of that output; the stated tolerance is 10 % of the Monte-Carlo error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from traindyn.dynamics.recipes.two_layer import two_layer_task
from traindyn.theory.dmft import dmft_two_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dmft_reference  # noqa: E402 - benchmarks/_dmft_reference.py (commit dd32ac4's solver)
from dmft import _reference_solver  # noqa: E402 - benchmarks/dmft.py

OUTPUTS = ("train_loss", "test_loss", "train_prediction", "test_prediction", "ntk",
           "ntk_test", "ntk_alignment", "ntk_trace_mean")


def _load() -> str:
    return "load " + " ".join(f"{v:.1f}" for v in os.getloadavg())


@contextlib.contextmanager
def _one_lapack_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _timed(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w0, c0 = time.perf_counter(), time.process_time()
        with _one_lapack_thread():
            ds = fn()
        return ds, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (seconds)")
    parser.add_argument("--P", type=int, default=160)
    parser.add_argument("--M", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=4, help="extra seeds for σ_MC")
    parser.add_argument("--ref", default="dd32ac4",
                        help="commit of the reference solver (dd32ac4: the copy in "
                             "benchmarks/_dmft_reference.py, no git needed)")
    parser.add_argument("--ref-iterations", type=int, default=0,
                        help="time the reference with this many iterations (0: to the end)")
    parser.add_argument("--count-M", type=int, default=4096,
                        help="with --ref-iterations: fields of the reference solve run to the "
                             "end to count its iterations")
    parser.add_argument("--step-tol", type=float, default=None,
                        help="step_tol of the adaptive solve (default e_MC/10 from the seeds)")
    parser.add_argument("--exact-k0", action="store_true",
                        help="give the reference solver this module's exact initial kernels "
                             "(its tanh K0 is 48-node Gauss-Hermite, 1.8e-3 off at P = 160), so "
                             "the comparison isolates the solver")
    parser.add_argument("--no-fixed", action="store_true",
                        help="skip this solver on the fixed grid")
    args = parser.parse_args()
    if args.smoke:
        args.P, args.M, args.steps, args.seeds = 12, 256, 64, 2
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"P={args.P}, M={args.M}, steps={args.steps}; {_load()}", flush=True)
    x, y, xt, yt = two_layer_task(args.P, 1, 10, "he2", 0)
    t = np.linspace(0, 10, 11)
    kw = dict(n_samples=args.M, n_steps=args.steps, two_time=0)
    ynorm = float(np.linalg.norm(y))

    # 1. Monte-Carlo error over seeds
    runs = []
    for seed in range(1, args.seeds + 1):
        ds, wall, cpu = _timed(lambda s=seed: dmft_two_layer(
            x, y, t, 1.0, xt, yt, seed=s, adaptive=True, step_tol=1e-5, **kw))
        runs.append(ds)
        print(f"   seed {seed}: {ds.attrs['n_steps_solved']} steps, {ds.attrs['n_iterations']} "
              f"iterations, wall {wall:.1f} s, CPU {cpu:.1f} s; {_load()}", flush=True)
    sigma, e_mc = {}, float("nan")
    if len(runs) > 1:
        sigma = {v: np.std(np.stack([r[v].values for r in runs]), axis=0, ddof=1)
                 for v in OUTPUTS}
        e_mc = float(np.linalg.norm(sigma["train_prediction"], axis=1).max()) / ynorm
        print(f"1. Monte-Carlo error over {args.seeds} seeds: e_MC = max_t ‖σ(f)‖/‖y‖ = "
              f"{e_mc:.2e}; max σ: " + ", ".join(f"{v} {sigma[v].max():.1e}" for v in OUTPUTS),
              flush=True)

    # 2. timed solves at seed 0
    step_tol = args.step_tol if args.step_tol is not None else e_mc / 10
    rows = {}
    old = _dmft_reference if args.ref == "dd32ac4" else _reference_solver(args.ref)
    if old is not None and args.exact_k0:
        from traindyn.theory.dmft import initial_kernels

        old.initial_kernels = initial_kernels
        print("   the reference solver uses the exact initial kernels (--exact-k0)")
    if old is not None:
        cap = dict(max_iter=args.ref_iterations, tol=1e-300) if args.ref_iterations else {}
        ds, wall, cpu = _timed(lambda: old.dmft_two_layer(x, y, t, 1.0, xt, yt, **kw, **cap))
        n_it = ds.attrs["n_iterations"]
        note = ""
        if args.ref_iterations:
            full = old.dmft_two_layer(x, y, t, 1.0, xt, yt, **{**kw, "n_samples": args.count_M})
            n_full = full.attrs["n_iterations"]
            note = (f" (timed with {n_it} iteration(s); to tol 1e-7 it takes {n_full} "
                    f"(counted at M = {args.count_M}, same task): wall and CPU shown are "
                    f"per-iteration × {n_full})")
            wall, cpu = wall / n_it * n_full, cpu / n_it * n_full
            n_it = n_full
        rows[f"commit {args.ref}"] = (ds, wall, cpu, n_it, 0, note)
    if not args.no_fixed:
        ds, wall, cpu = _timed(lambda: dmft_two_layer(x, y, t, 1.0, xt, yt, **kw))
        rows["this, fixed grid"] = (ds, wall, cpu, ds.attrs["n_iterations"],
                                    ds.attrs["n_warm_iterations"], "")
    ds, wall, cpu = _timed(lambda: dmft_two_layer(x, y, t, 1.0, xt, yt, adaptive=True,
                                                  step_tol=step_tol, **kw))
    rows["this, adaptive grid"] = (ds, wall, cpu, ds.attrs["n_iterations"],
                                   ds.attrs["n_warm_iterations"], "")
    ds, wall, cpu = _timed(lambda: dmft_two_layer(x, y, t, 1.0, xt, yt, adaptive=True,
                                                  step_tol=step_tol, field_dtype="float32",
                                                  **kw))
    rows["adaptive + float32"] = (ds, wall, cpu, ds.attrs["n_iterations"],
                                  ds.attrs["n_warm_iterations"], "")
    print(f"2. seed 0, one LAPACK thread each; adaptive step_tol = e_MC/10 = {step_tol:.1e}")
    base = rows.get(f"commit {args.ref}")
    for name, (ds, wall, cpu, n_it, n_warm, note) in rows.items():
        ratio = ""
        if base is not None:
            ratio = f" | speed-up wall {base[1] / wall:5.2f}x, CPU {base[2] / cpu:5.2f}x"
        steps = ds.attrs.get("n_steps_solved", args.steps)
        print(f"   {name:<20} wall {wall:8.1f} s, CPU {cpu:8.1f} s, {n_it} iterations "
              f"(+{n_warm} warm on M/8), {steps} steps, "
              f"{ds.attrs.get('n_pass_equivalents', n_it)} full-pass equivalents, step_error "
              f"{ds.attrs.get('step_error', float('nan')):.1e}{ratio}{note}; {_load()}",
              flush=True)

    # 3. agreement with the reference within the Monte-Carlo error
    if base is not None and not args.ref_iterations and sigma:
        print("3. max |this − reference| / max σ_MC per output (tolerance 0.1):")
        worst = 0.0
        for name, (ds, *_rest) in rows.items():
            if name == f"commit {args.ref}":
                continue
            parts = []
            for v in OUTPUTS:
                if v not in base[0]:
                    continue
                d = float(np.abs(ds[v].values - base[0][v].values).max())
                r = d / max(float(sigma[v].max()), 1e-300)
                worst = max(worst, r)
                parts.append(f"{v} {d:.1e} ({r:.3f})")
            print(f"   {name}: " + ", ".join(parts))
        print(f"   worst ratio {worst:.3f}: {'within' if worst <= 0.1 else 'ABOVE'} 10 % of "
              "the Monte-Carlo error")


if __name__ == "__main__":
    main()
