"""Streaming (minibatch) CKA against the usual full-Gram CKA: time, and peak memory as n grows 10×.

For ``L`` layers of ``d`` features of ``n`` samples (Gaussian features with shared structure):

* **full-Gram**: the debiased CKA matrix of all layers from ``n × n`` kernels
  (:func:`probes.similarity.cka_matrix`, ``debiased=True``), the usual implementation
  (Kornblith et al. 2019; Nguyen et al. 2021 before minibatching); memory ``O(L n²)``;
* **minibatch** (:class:`probes.similarity.MinibatchCKA`, Nguyen et al. 2021, Eq. 3): batches of
  ``--batch`` rows; memory ``O(L b²)`` whatever ``n``.

Prints the wall time of each at ``n`` and ``10 n`` (median of ``--repeats``, interleaved, and
the ratio minibatch / full-Gram measured in the same rounds), the largest difference between the
two CKA matrices, and the extra peak memory of each in a fresh subprocess (Linux
``/proc/self/status`` VmHWM minus VmRSS after a warm-up; features generated batch by batch for
the streaming route, so the data themselves are never held).  CPU only here; on CUDA the same
script reports peak allocated memory (``--device cuda``), unmeasured in this repository's CI.

Run: ``python benchmarks/similarity.py [--n 2000 --d 256 --layers 3 --batch 256]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from traindyn.probes.similarity import MinibatchCKA, cka_matrix  # noqa: E402


def batch_features(start: int, rows: int, d: int, layers: int, device: torch.device
                   ) -> dict[str, torch.Tensor]:
    """Rows ``start … start + rows`` of ``layers`` related representations (seeded per row
    block, so any batching of the same rows gives the same data)."""
    g = torch.Generator(device=device).manual_seed(start)
    base = torch.randn(rows, d, generator=g, device=device)
    out = {}
    for i in range(layers):
        noise = torch.randn(rows, d, generator=g, device=device)
        out[f"layer{i}"] = torch.tanh(base * (1 + i) + 0.5 * i * noise)
    return out


def full_features(n: int, d: int, layers: int, batch: int, device: torch.device):
    parts = [batch_features(s, min(batch, n - s), d, layers, device) for s in range(0, n, batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def run_full(n: int, d: int, layers: int, batch: int, device: torch.device) -> np.ndarray:
    return cka_matrix(full_features(n, d, layers, batch, device), debiased=True).cka.values


def run_stream(n: int, d: int, layers: int, batch: int, device: torch.device) -> np.ndarray:
    acc = MinibatchCKA()
    for s in range(0, n, batch):
        acc.update(batch_features(s, min(batch, n - s), d, layers, device))
    return acc.compute()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def peak_memory(route: str, n: int, args: argparse.Namespace, device: torch.device) -> float:
    """Extra peak memory (MiB) of one route at ``n``."""
    fn = run_full if route == "full" else run_stream
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(n, args.d, args.layers, args.batch, device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", route, "--n", str(n), "--d", str(args.d),
         "--layers", str(args.layers), "--batch", str(args.batch)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    fn = run_full if args.memory_child == "full" else run_stream
    fn(2 * args.batch, args.d, args.layers, args.batch, device)  # warm-up
    base = _status_kib("VmRSS")
    fn(args.n, args.d, args.layers, args.batch, device)
    print((_status_kib("VmHWM") - base) / 1024)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.layers, args.batch, args.repeats = 64, 16, 2, 32, 1
    if args.memory_child:
        _memory_child(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"load average {load:.1f}; L = {args.layers} layers, d = {args.d}, "
          f"batch = {args.batch}")
    run_stream(2 * args.batch, args.d, args.layers, args.batch, device)  # warm-up
    run_full(2 * args.batch, args.d, args.layers, args.batch, device)
    print(f"{'n':>7s} {'full-Gram s':>12s} {'minibatch s':>12s} {'ratio mb/full':>14s} "
          f"{'max |Δ CKA|':>12s}")
    for n in (args.n, 10 * args.n):
        rounds: dict[str, list[float]] = {"full": [], "stream": []}
        results = {}
        for _ in range(args.repeats):
            for name, fn in (("full", run_full), ("stream", run_stream)):
                _sync(device)
                t0 = time.perf_counter()
                results[name] = fn(n, args.d, args.layers, args.batch, device)
                _sync(device)
                rounds[name].append(time.perf_counter() - t0)
        ratio = statistics.median(s / f for s, f in zip(rounds["stream"], rounds["full"],
                                                        strict=True))
        diff = float(np.abs(results["stream"] - results["full"]).max())
        print(f"{n:7d} {statistics.median(rounds['full']):12.3f} "
              f"{statistics.median(rounds['stream']):12.3f} {ratio:14.3f} {diff:12.2e}")
    print("extra peak memory (MiB), fresh process each:")
    mem = {(r, n): peak_memory(r, n, args, device) for r in ("full", "stream")
           for n in (args.n, 10 * args.n)}
    for r, label in (("full", "full-Gram"), ("stream", "minibatch")):
        a, b = mem[(r, args.n)], mem[(r, 10 * args.n)]
        print(f"  {label:10s} n = {args.n}: {a:8.1f}   n = {10 * args.n}: {b:8.1f}   "
              f"ratio 10n/n = {b / max(a, 1e-3):6.2f}")
    print("(minibatch memory stays flat as n grows 10×; full-Gram grows ~100×, with n²)")


if __name__ == "__main__":
    main()
