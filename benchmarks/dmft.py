"""Cost of the two-layer DMFT against training the finite-width networks it describes.

Run: ``python benchmarks/dmft.py [--smoke | --quick] [--device gpu] [--targets | --scaling]``.

1. Same run, same task (he2 single-index, P = 20, D = 10, t ≤ 10, γ₀ = 1): one DMFT solve
   (``theory.dmft.dmft_two_layer``, jax, 16384 fields) against training the networks that
   estimate the same curve (``dynamics.recipes.two_layer.train_two_layer``: widths 250/1000/4000
   × 4 seeds, torch CPU); ratio = network time / DMFT time, and how far the width-4000 seed mean
   is from the DMFT.
2. How the solve cost grows with P, with the number of time steps and with the number of
   sampled fields (each doubled from a base; a fixed 4 iterations), with the exponent
   log₂(t(2x)/t(x)); ``--scaling --device gpu`` is the P-scaling table on CUDA (P = 40 … 320,
   M = 32,768, 400 steps).
3. CUDA rows (jax GPU for the DMFT, torch CUDA for the networks): measured only where a GPU is
   present; otherwise printed as "unmeasured".
4. ``--targets``: (a) peak memory and wall time at P = 550, M = 32,768, 400 steps, two-time
   kernels at 6 times (run in a child process, peak RSS from ``getrusage``); (b) P = 160,
   M = 32,768, 400 steps against the solver of commit ``--ref`` (loaded with ``git show``) in
   the same run, with ``two_time = 0`` for both (the reference keeps every time step's fields
   for its two-time kernels: 17 GB at this size), outputs compared; (c) a sweep over 5 P and 3
   time grids in one process, compilations counted per bucket.
Wall-clock times on a shared machine are noisy; the load average is printed with each table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _timing import best_of  # noqa: E402 - benchmarks/_timing.py
from traindyn.dynamics.recipes.two_layer import train_two_layer, two_layer_task
from traindyn.theory.dmft import compilations, dmft_two_layer

ROOT = Path(__file__).resolve().parent.parent


def _load() -> str:
    return "load " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def _jax_gpu() -> bool:
    try:
        import jax

        return bool(jax.devices("gpu"))
    except Exception:  # noqa: BLE001 - no GPU backend
        return False


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def compare_networks(sizes: dict, device: str) -> None:
    x, y, xt, yt = two_layer_task(20, 20, 10, "he2", 3)

    def nets(dev: str = "cpu"):
        return train_two_layer(x, y, 1.0, xt, yt, widths=sizes["widths"], seeds=sizes["seeds"],
                               learning_rate=0.05, steps=sizes["steps"], record_every=10,
                               device=dev)

    t_net, net = best_of(nets, 1)

    def solve(dev: str = device):
        return _quiet(dmft_two_layer, x, y, net.time, 1.0, xt, yt, n_samples=sizes["fields"],
                      dt=0.05, two_time=0, device=dev)

    solve()  # compile once (a fresh process pays it on its first call)
    t_th, th = best_of(solve, repeat=2)
    w = sizes["widths"][-1]
    gap = float(np.abs(net.train_loss.sel(width=w).mean("seed") - th.train_loss).max()
                / th.train_loss.max())
    print(f"\n1. DMFT ({sizes['fields']} fields, {th.attrs['n_iterations']} iterations, "
          f"{device}) vs {len(sizes['widths'])} widths x {len(sizes['seeds'])} seeds x "
          f"{sizes['steps']} GD steps; {_load()}")
    print(f"   DMFT solve {t_th:8.2f} s | networks {t_net:8.2f} s | networks/DMFT "
          f"{t_net / t_th:6.1f} | width {w} seed-mean loss vs DMFT {gap:.2%}")
    print("\n3. CUDA vs CPU")
    if _jax_gpu():
        solve("gpu")
        t_gpu, th_gpu = best_of(lambda: solve("gpu"), repeat=2)
        t_cpu, th_cpu = best_of(lambda: solve("cpu"), repeat=1)
        diff = float(np.abs(th_gpu.train_loss - th_cpu.train_loss).max()
                     / th_cpu.train_loss.max())
        print(f"   DMFT jax GPU {t_gpu:.3f} s vs CPU {t_cpu:.3f} s: speed-up {t_cpu / t_gpu:.1f}, "
              f"max rel diff {diff:.1e}")
    else:
        print("   DMFT jax GPU: unmeasured (jax has no GPU here)")
    if torch.cuda.is_available():
        t_cuda, _ = best_of(lambda: nets("cuda"), 1)
        print(f"   networks torch CUDA {t_cuda:.2f} s vs CPU {t_net:.2f} s: speed-up "
              f"{t_net / t_cuda:.1f}")
    else:
        print("   networks torch CUDA: unmeasured (no CUDA device)")


def scaling(base: dict, device: str, factors: tuple[int, ...],
            keys: tuple[str, ...] = ("P", "n_steps", "M")) -> None:
    print(f"\n2. solve cost scaling (jax {device}; exponent = log2 of the time ratio on "
          f"doubling; 4 iterations each); {_load()}")

    def cost(P: int, n_steps: int, M: int) -> float:
        xs, ys, _, _ = two_layer_task(P, 1, 10, "he2", 0)
        t = np.linspace(0, 10, 11)

        def run():  # a fixed 4 iterations (tol unreachable): the cost per solve
            return _quiet(dmft_two_layer, xs, ys, t, 1.0, n_samples=M, n_steps=n_steps,
                          two_time=0, max_iter=4, tol=1e-300, step_tol=None, device=device)

        run()  # compile
        return best_of(run, repeat=2)[0]

    t0 = cost(**base)
    print(f"   base P={base['P']}, steps={base['n_steps']}, fields={base['M']}: {t0:.3f} s")
    for key, label in (("P", "P"), ("n_steps", "time steps"), ("M", "sampled fields")):
        if key not in keys:
            continue
        for factor in factors:
            t1 = cost(**{**base, key: base[key] * factor})
            print(f"   {label:>15} x{factor}: {t1:8.3f} s  ratio {t1 / t0:5.2f}  exponent "
                  f"{np.log(t1 / t0) / np.log(factor):5.2f}")


# --- the research-scale targets -------------------------------------------------------------
def _reference_solver(ref: str | None):
    """The reference solver as a module: ``benchmarks/_dmft_reference.py`` (commit dd32ac4's
    solver, kept verbatim; no git needed) when ``ref`` is None, else ``theory/dmft.py`` of
    commit ``ref`` (``git show``), or None when that is unavailable."""
    if ref is None:
        import _dmft_reference

        return _dmft_reference
    try:
        src = subprocess.run(["git", "show", f"{ref}:theory/dmft.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"   reference {ref}: unavailable ({err})")
        return None
    path = Path(tempfile.mkdtemp(prefix="traindyn-dmft-ref-")) / "dmft_reference.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("dmft_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def memory_child(P: int, M: int, steps: int, two_time: int, device: str) -> None:
    """Run one solve and print its wall time and this process's peak RSS."""
    x, y, xt, yt = two_layer_task(P, 1, 10, "he2", 0)
    t0 = time.perf_counter()
    ds = _quiet(dmft_two_layer, x, y, np.linspace(0, 10, 11), 1.0, xt, yt, n_samples=M,
                n_steps=steps, two_time=two_time, device=device)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(f"   P={P}, M={M}, {steps} steps, two_time={two_time}: wall {wall:.1f} s, "
          f"{ds.attrs['n_iterations']} iterations (converged {ds.attrs['converged']}), "
          f"step_error {ds.attrs['step_error']:.1e}, chunk {ds.attrs['chunk_size']}, peak RSS "
          f"{peak:.2f} GiB; {_load()}", flush=True)


def target_memory(P: int, M: int, steps: int, device: str) -> None:
    print(f"\n4a. peak memory, fresh process; {_load()}")
    subprocess.run([sys.executable, __file__, "--memory-child", f"{P},{M},{steps}",
                    "--device", device], check=False)


def target_speed(P: int, M: int, steps: int, ref: str, device: str) -> None:
    print(f"\n4b. this solver vs commit {ref} in the same run (P={P}, M={M}, {steps} steps, "
          f"two_time=0 for both); {_load()}")
    old = _reference_solver(None if ref == "dd32ac4" else ref)
    x, y, xt, yt = two_layer_task(P, 1, 10, "he2", 0)
    t = np.linspace(0, 10, 11)
    kw = dict(n_samples=M, n_steps=steps, two_time=0)
    rows = {}
    _quiet(dmft_two_layer, x, y, t, 1.0, xt, yt, **kw)  # compile
    runs = [("this solver", lambda: dmft_two_layer(x, y, t, 1.0, xt, yt, device=device, **kw))]
    if old is not None:
        runs.append((f"commit {ref}", lambda: old.dmft_two_layer(x, y, t, 1.0, xt, yt, **kw)))
    for name, fn in runs:
        t0 = time.perf_counter()
        ds = _quiet(fn)
        rows[name] = (time.perf_counter() - t0, ds)
        print(f"   {name:<18} {rows[name][0]:8.1f} s, {ds.attrs['n_iterations']} iterations; "
              f"{_load()}", flush=True)
    if old is not None:
        (t_new, new), (t_old, ref_ds) = rows["this solver"], rows[f"commit {ref}"]
        diffs = {v: float(np.abs(new[v] - ref_ds[v]).max()) for v in
                 ("train_loss", "train_prediction", "test_prediction", "ntk")}
        print(f"   speed-up {t_old / t_new:.2f}x; max |difference| "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
              + f"; this solver's step_error {new.attrs['step_error']:.1e}")


def target_sweep(Ps: tuple[int, ...], grids: tuple[int, ...], M: int, device: str) -> None:
    from traindyn.theory._dmft_jax import SEGMENT, bucket

    print(f"\n4c. sweep over P = {Ps} x n_steps = {grids} (M = {M}) in one process; {_load()}")
    start = compilations()
    buckets = set()
    t0 = time.perf_counter()
    for P in Ps:
        x, y, _, _ = two_layer_task(P, 0, 10, "he2", 0)
        for steps in grids:
            _quiet(dmft_two_layer, x, y, [0.0, 5.0], 1.0, n_samples=M, n_steps=steps,
                   device=device)
            seg = min(SEGMENT, bucket(steps))
            buckets.add((bucket(P), seg))
    n = compilations() - start
    print(f"   {len(Ps) * len(grids)} solves in {time.perf_counter() - t0:.1f} s: {n} jax "
          f"programs compiled for {len(buckets)} (padded P, segment) buckets = "
          f"{n / len(buckets):.1f} per bucket (one each of: sampled kernel, field segment with "
          "and without two-time slots, error segment, two-time kernels; plus a field and an "
          "error segment for the half-step grid when its segment is shorter)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--targets", action="store_true",
                        help="the research-scale targets (section 4; long)")
    parser.add_argument("--scaling", action="store_true",
                        help="only the P-scaling table at M = 32768, 400 steps, P = 40 … 320 "
                             "(for a GPU: --device gpu)")
    parser.add_argument("--ref", default="dd32ac4",
                        help="commit of the reference solver (dd32ac4: the copy kept in "
                             "benchmarks/_dmft_reference.py; another commit: read with git)")
    parser.add_argument("--device", default="cpu", help="jax device of the DMFT (cpu, gpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        P, M, steps = (int(v) for v in args.memory_child.split(","))
        memory_child(P, M, steps, 6, args.device)
        return
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch threads {torch.get_num_threads()}; {_load()}")
    if args.scaling:
        scaling(dict(P=40, n_steps=400, M=32768), args.device, (2, 4, 8), keys=("P",))
        return
    if args.smoke:
        compare_networks(dict(fields=256, widths=(50, 100), seeds=range(1), steps=20),
                         args.device)
        scaling(dict(P=8, n_steps=16, M=256), args.device, (2,))
        target_memory(12, 256, 16, args.device)
        target_speed(12, 256, 16, args.ref, args.device)
        target_sweep((17, 18), (20, 21), 128, args.device)
        return
    q = args.quick
    compare_networks(dict(fields=4096 if q else 16384,
                          widths=(250, 1000) if q else (250, 1000, 4000),
                          seeds=range(2) if q else range(4), steps=100 if q else 200),
                     args.device)
    scaling(dict(P=16, n_steps=100, M=4096 if q else 8192), args.device, (2, 4))
    if args.targets:
        target_memory(550, 32768, 400, args.device)
        target_speed(160, 32768, 400, args.ref, args.device)
        target_sweep((120, 130, 140, 150, 160), (200, 300, 400), 4096, args.device)


if __name__ == "__main__":
    main()
