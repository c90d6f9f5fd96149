"""Where a CUDA eigensolver beats the CPU for the ``d × d`` matrices of probe statistics, and
what batching the layers' solves costs or saves.

Every spectral probe ends in ``torch.linalg.eigvalsh`` of a ``d × d`` float64 matrix (the
accumulated second moment).  On a GPU the accumulation is cheap and this one solve can
dominate; for small ``d`` a CPU LAPACK solve (after a ``d²`` copy to the host) may be faster.

1. For each ``d``: the CUDA solve, and the CPU solve on one thread (what
   ``probes._solve.lapack_single_thread`` uses) and on all threads, each including the copy to
   the host.  Ratios are against the CUDA solve, measured in the same run.  Then the crossover
   that ``probes._solve`` decides from its own (smaller) measurement — the ``d`` below which
   ``probes`` moves a CUDA solve to the CPU (override: ``TRAINDYN_EIGH_DEVICE_CROSSOVER``).
2. ``--layers L``: ``L`` layers' ``d × d`` solves one by one vs one batched call
   (``probes._solve.batched_eigvalsh``, what the ``"spectrum"`` accumulator's ``prepare`` does),
   on the CPU and, with CUDA, on the GPU; ratio batched / one-by-one (below 1: batching wins).

Run: ``python benchmarks/eigvalsh_crossover.py [--quick] [--layers 12]`` (without CUDA it
times the CPU only and says so; GPU figures are then unmeasured).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from traindyn.probes import _solve  # noqa: E402


def _median_seconds(fn, repeats: int = 5, clock=time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def _gpu_solve(matrix: torch.Tensor):
    def solve() -> None:
        torch.linalg.eigvalsh(matrix)
        torch.cuda.synchronize()
    return solve


def _cpu_solve(matrix: torch.Tensor, n_threads: int):
    """The solve on ``n_threads`` CPU threads, including the copy to the host."""
    def solve() -> None:
        saved = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            torch.linalg.eigvalsh(matrix.cpu())
        finally:
            torch.set_num_threads(saved)
    return solve


def crossover_table(sizes: tuple[int, ...], cuda: bool) -> None:
    threads = torch.get_num_threads()
    print(f"{'d':>6} {'cuda ms':>9} {'cpu 1 thr ms':>13} {'ratio':>7} {'cpu all ms':>11} "
          f"{'ratio':>7}")
    gen = torch.Generator().manual_seed(0)
    for d in sizes:
        x = torch.randn(2 * d, d, generator=gen, dtype=torch.float64)
        matrix = x.T @ x
        if cuda:
            matrix = matrix.cuda()
        repeats = 5 if d <= 1024 else 2
        t_gpu = _median_seconds(_gpu_solve(matrix), repeats) if cuda else float("nan")
        t_one = _median_seconds(_cpu_solve(matrix, 1), repeats)
        t_all = _median_seconds(_cpu_solve(matrix, threads), repeats)
        print(f"{d:6d} {t_gpu * 1e3:9.2f} {t_one * 1e3:13.2f} {t_one / t_gpu:7.2f} "
              f"{t_all * 1e3:11.2f} {t_all / t_gpu:7.2f}")
    if cuda:
        dev = torch.device("cuda")
        start = time.perf_counter()
        cross = _solve.crossover(dev)
        print(f"traindyn.probes._solve crossover on {dev}: d < {cross} goes to the CPU "
              f"(measured in {time.perf_counter() - start:.2f} s; "
              f"{_solve.CROSSOVER_ENV}={os.environ.get(_solve.CROSSOVER_ENV, 'unset')})")
    else:
        print("traindyn.probes._solve crossover: CPU only, nothing moves (GPU figures unmeasured)")


def batching_table(layers: int, sizes: tuple[int, ...], device: torch.device,
                   repeats: int) -> None:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # on the CPU: process CPU time (robust on a shared, loaded machine); on CUDA: wall time
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    print(f"\n{layers} layers on {device}: one-by-one vs batched eigvalsh (float64; "
          f"{'process CPU' if device.type == 'cpu' else 'wall'} time)")
    print(f"{'d':>6} {'one-by-one ms':>14} {'batched ms':>11} {'ratio':>7} {'max |diff|':>11}")
    gen = torch.Generator().manual_seed(1)
    for d in sizes:
        mats = []
        for _ in range(layers):
            x = torch.randn(d + 8, d, generator=gen, dtype=torch.float64)
            mats.append((x.T @ x).to(device))

        def one_by_one(mats=mats) -> list[torch.Tensor]:
            out = [_solve.eigvalsh(m, override=0) for m in mats]
            sync()
            return out

        def batched(mats=mats) -> list[torch.Tensor]:
            out = _solve.batched_eigvalsh(mats, override=0)
            sync()
            return out

        t1 = _median_seconds(one_by_one, repeats, clock)
        t2 = _median_seconds(batched, repeats, clock)
        diff = max(float((a - b).abs().max()) for a, b in zip(one_by_one(), batched(),
                                                             strict=True))
        print(f"{d:6d} {t1 * 1e3:14.2f} {t2 * 1e3:11.2f} {t2 / t1:7.2f} {diff:11.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    ap.add_argument("--layers", type=int, default=12, help="layers of the batching table")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; CPU threads {torch.get_num_threads()}; "
          f"{torch.cuda.get_device_name() if cuda else 'no CUDA (GPU figures unmeasured)'}; "
          f"load average {os.getloadavg()} on {os.cpu_count()} CPUs")
    if args.smoke:
        args.quick, args.layers = True, 2
    sizes = ((64,) if args.smoke else (64, 128, 256) if args.quick
             else (64, 128, 256, 512, 1024, 2048, 4096))
    crossover_table(sizes, cuda)
    bsizes = (16,) if args.smoke else (16, 64, 256) if args.quick else (16, 64, 256, 512)
    repeats = 1 if args.smoke else 3 if args.quick else 5
    batching_table(args.layers, bsizes, torch.device("cpu"), repeats)
    if cuda:
        batching_table(args.layers, bsizes, torch.device("cuda"), repeats)


if __name__ == "__main__":
    main()
