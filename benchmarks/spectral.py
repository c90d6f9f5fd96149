"""Cost of the spectral probes against a bare XᵀX, and their memory as n grows.

Prints, for an ``n × d`` float32 feature matrix on the chosen device:

* the time of RankMe + alpha-ReQ computed together by the streaming accumulator
  (:class:`probes.spectral.SpectralMetrics`, batches of ``--batch`` rows), with float64 batch
  products (the default, exact) and with input-precision batch products (``batch_dtype=None``),
  as ratios to a bare ``XᵀX`` in float32 on the same data, measured in the same run;
* ``XᵀX`` + one symmetric eigensolve, for reference;
* with ``--reference``: the published codes' route (full SVD for RankMe, scikit-learn full
  PCA for alpha-ReQ; CPU only);
* the accuracy of each route against the float64 one-shot value;
* peak memory of streaming ``n`` and ``10 n`` samples generated batch by batch (never held in
  memory at once): resident-set peak of a fresh subprocess on CPU (Linux ``/proc``), peak
  allocated memory on CUDA.

Run: ``python benchmarks/spectral.py [--device cuda] [--n 25600 --d 1024] [--reference]``.
Timings on a shared machine are noisy: the script reports the median of ``--repeats`` runs.
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

from traindyn.probes.spectral import SpectralMetrics, alpha_req, rankme  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, out


def interleaved(routes: dict, device: torch.device, repeats: int) -> dict:
    """Run the routes one after the other, ``repeats`` rounds; per route the median wall and CPU
    time and the median of per-round ratios to the first route (the baseline), so that a load
    change on a shared machine hits baseline and probe alike."""
    rounds = {name: [] for name in routes}
    for _ in range(repeats):
        for name, fn in routes.items():
            rounds[name].append(timed(fn, device))
    base = next(iter(routes))
    out = {}
    for name, runs in rounds.items():
        wall = [r[0] for r in runs]
        cpu = [r[1] for r in runs]
        out[name] = {
            "wall": statistics.median(wall), "cpu": statistics.median(cpu),
            "ratio_wall": statistics.median(
                w / b[0] for w, b in zip(wall, rounds[base], strict=True)),
            "ratio_cpu": statistics.median(
                c / b[1] for c, b in zip(cpu, rounds[base], strict=True)),
            "result": runs[-1][2],
        }
    return out


def features(n: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Gaussian features with a power-law covariance spectrum (λ_r ∝ r^-1) and a mean."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = torch.arange(1, d + 1, device=device, dtype=torch.float32) ** -0.5
    return torch.randn(n, d, generator=g, device=device) * scale + 0.1


def streamed(x: torch.Tensor, batch: int, batch_dtype) -> dict[str, float]:
    m = SpectralMetrics(("rankme", "alpha_req"), batch_dtype=batch_dtype)
    for i in range(0, x.shape[0], batch):
        m.update(x[i:i + batch])
    return m.compute()


def reference_route(x: torch.Tensor) -> dict[str, float]:
    """The published codes' route: full SVD (RankMe) and scikit-learn PCA (alpha-ReQ)."""
    from sklearn.decomposition import PCA

    s = torch.linalg.svdvals(x)
    p = s / s.sum() + 1e-7
    rm = float(torch.exp(-(p * p.log()).sum()))
    lam = PCA().fit(x.cpu().numpy()).explained_variance_
    r = np.arange(10, 100) + 1.0
    xx = np.stack([-np.log(r), np.ones_like(r)], 1)
    w = 1.0 / r[:, None]
    b = np.linalg.solve(xx.T @ (xx * w), (w * xx).T @ np.log(lam[10:100]))
    return {"rankme": rm, "alpha_req": float(b[0])}


def peak_memory_of_stream(n: int, d: int, batch: int, device: torch.device) -> float:
    """Extra peak memory (MiB) while streaming n generated samples (one batch at a time).

    CUDA: peak allocated bytes above what was allocated before.  CPU: measured in a fresh
    subprocess (the allocator of a long-lived process reuses freed memory, which hides peaks):
    peak resident set minus the resident set after imports and a warm-up batch.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _stream(n, d, batch, device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n), "--d", str(d), "--batch",
         str(batch), "--device", "cpu", "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, check=True,
        # fixed mmap threshold: freed batches go back to the OS instead of fragmenting the heap
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    return float(out.stdout.strip().splitlines()[-1])


def _stream(n: int, d: int, batch: int, device: torch.device) -> None:
    m = SpectralMetrics(("rankme", "alpha_req"))
    for i in range(0, n, batch):
        m.update(features(min(batch, n - i), d, device, seed=i))
    m.compute()


def _memory_child(n: int, d: int, batch: int) -> None:
    device = torch.device("cpu")
    _stream(2 * d, d, batch, device)  # warm-up: allocator, BLAS, LAPACK
    base = _status_kib("VmRSS")
    _stream(n, d, batch, device)
    print((_status_kib("VmHWM") - base) / 1024)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def plan_layers(x: torch.Tensor, layers: int, device: torch.device, repeats: int) -> None:
    """ProbePlan over ``layers`` layers (the same ``d``) with all six spectral probes: the
    ``"spectrum"`` accumulator's ``prepare`` (one batched eigensolve per variant for all layers)
    against per-layer solves (``prepare`` switched off), interleaved; values must be equal."""
    from dataclasses import replace

    from traindyn.probes import registry
    from traindyn.probes.evaluation import ProbePlan

    names = ["rankme", "rankme_covariance", "alpha_req", "participation_ratio", "stable_rank",
             "effective_rank"]
    feats = {f"l{i}": x[:, torch.randperm(x.shape[1], generator=torch.Generator()
                                           .manual_seed(i)).to(x.device)]
             for i in range(layers)}
    plan = ProbePlan(names, list(feats))
    state = plan.accumulate(feats)
    batched_acc = registry.ACCUMULATORS["spectrum"]
    per_layer_acc = replace(batched_acc, prepare=None)

    def run(acc):
        def go():
            registry.ACCUMULATORS["spectrum"] = acc
            try:
                return plan.layer_values(state).layer_values
            finally:
                registry.ACCUMULATORS["spectrum"] = batched_acc
        return go

    res = interleaved({"per-layer solves": run(per_layer_acc),
                       "batched prepare": run(batched_acc)}, device, repeats)
    a, b = (r["result"] for r in res.values())
    same = all(a[k][layer] == b[k][layer] or (np.isnan(a[k][layer]) and np.isnan(b[k][layer]))
               for k in a for layer in a[k])
    print(f"\nProbePlan, {layers} layers of {tuple(x.shape)}, six spectral probes (values from "
          f"the accumulated state; accumulation not timed):")
    for name, r in res.items():
        print(f"{name:42s} {r['wall'] * 1e3:9.1f} {r['ratio_wall']:6.2f}× {r['cpu'] * 1e3:9.1f} "
              f"{r['ratio_cpu']:6.2f}×")
    print(f"values identical (bit for bit): {same}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=25_600)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2560)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--reference", action="store_true", help="also time the published route")
    ap.add_argument("--memory-n", type=int, default=None,
                    help="n of the memory test (default: --n); it streams n and 10 n")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=0,
                    help="also time ProbePlan over this many layers: batched prepare vs "
                         "per-layer solves")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory test")
    ap.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.batch, args.repeats, args.no_memory = 512, 32, 128, 1, True
    if args.memory_child is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        _memory_child(args.memory_child, args.d, args.batch)
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = features(args.n, args.d, device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
          f"{torch.get_num_threads()} threads), n = {args.n}, d = {args.d}, batch = {args.batch}")

    # warm-up (allocators, BLAS threads, LAPACK's first eigensolve costs seconds, CUDA kernels)
    streamed(x[: 4 * args.d], args.batch, None)
    streamed(x[: 4 * args.d], args.batch, torch.float64)
    torch.linalg.eigvalsh(x.T @ x)

    routes = {
        "bare XᵀX (float32)": lambda: x.T @ x,
        "XᵀX + eigvalsh (float32)": lambda: torch.linalg.eigvalsh(x.T @ x),
        "RankMe + alpha-ReQ, streaming, float64": lambda: streamed(x, args.batch, torch.float64),
        "RankMe + alpha-ReQ, streaming, float32": lambda: streamed(x, args.batch, None),
    }
    if args.reference and device.type == "cpu":
        routes["published route (SVD + sklearn PCA)"] = lambda: reference_route(x)
    res = interleaved(routes, device, args.repeats)
    exact = {"rankme": rankme(x), "alpha_req": alpha_req(x)}

    def err(out):
        if not isinstance(out, dict):
            return ""
        e = max(abs(out[k] - exact[k]) / abs(exact[k]) for k in exact)
        return f"   max rel. error {e:.1e}"

    cpu_note = " (CPU time: all threads of this process)" if device.type == "cpu" else ""
    print(f"{'route':42s} {'wall ms':>9s} {'ratio':>7s} {'cpu ms':>9s} {'ratio':>7s}{cpu_note}")
    for name, r in res.items():
        print(f"{name:42s} {r['wall'] * 1e3:9.1f} {r['ratio_wall']:6.2f}× {r['cpu'] * 1e3:9.1f} "
              f"{r['ratio_cpu']:6.2f}×{err(r['result'])}")
    if args.reference and device.type != "cpu":
        print("published route: skipped (scikit-learn runs on the CPU only)")
    print(f"load average (1, 5, 15 min): {os.getloadavg()} on {os.cpu_count()} CPUs")
    print(f"values: RankMe {exact['rankme']:.4f}, alpha-ReQ {exact['alpha_req']:.4f}")

    if args.layers:
        plan_layers(x[: min(args.n, 4 * args.d)], args.layers, device, args.repeats)
    if args.no_memory:
        return
    n_mem = args.memory_n or args.n
    small = peak_memory_of_stream(n_mem, args.d, args.batch, device)
    large = peak_memory_of_stream(10 * n_mem, args.d, args.batch, device)
    print(f"extra peak memory streaming n = {n_mem}: {small:.1f} MiB; n = {10 * n_mem}: "
          f"{large:.1f} MiB (ratio {large / max(small, 1e-9):.2f}; "
          f"the {n_mem}×{args.d} float32 data alone "
          f"would be {n_mem * args.d * 4 / 2**20:.0f} MiB, ×10 = "
          f"{10 * n_mem * args.d * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
