"""Where a CUDA eigensolver beats the CPU for the ``d × d`` matrices of probe statistics.

Every spectral probe ends in ``torch.linalg.eigvalsh`` of a ``d × d`` float64 matrix (the
accumulated second moment).  On a GPU the accumulation is cheap and this one solve can
dominate; for small ``d`` a CPU LAPACK solve (after a ``d²`` copy to the host) may be faster.
This script times, for each ``d``: the CUDA solve, and the CPU solve on one thread (what
``probes.spectral.lapack_single_thread`` uses) and on all threads, each including the copy to
the host.  Ratios are against the CUDA solve, measured in the same run.

Run: ``python benchmarks/eigvalsh_crossover.py`` (without CUDA it times the CPU only).
"""

from __future__ import annotations

import statistics
import time

import torch


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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


def main() -> None:
    cuda = torch.cuda.is_available()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}; CPU threads {threads}; "
          f"{torch.cuda.get_device_name() if cuda else 'no CUDA'}")
    print(f"{'d':>6} {'cuda ms':>9} {'cpu 1 thr ms':>13} {'ratio':>7} {'cpu all ms':>11} "
          f"{'ratio':>7}")
    gen = torch.Generator().manual_seed(0)
    for d in (64, 128, 256, 512, 1024, 2048, 4096):
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


if __name__ == "__main__":
    main()
