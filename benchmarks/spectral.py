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
  memory at once): resident-set peak on CPU (reset through ``/proc/self/clear_refs``), peak
  allocated memory on CUDA.

Run: ``python benchmarks/spectral.py [--device cuda] [--n 25600 --d 1024] [--reference]``.
Timings on a shared machine are noisy: the script reports the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probes.spectral import SpectralMetrics, alpha_req, rankme  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


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
    """Peak memory (MiB) while streaming n generated samples; only one batch exists at a time."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set peak (Linux)
        base = _rss_peak()
    m = SpectralMetrics(("rankme", "alpha_req"))
    for i in range(0, n, batch):
        m.update(features(min(batch, n - i), d, device, seed=i))
    m.compute()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return (_rss_peak() - base) / 2**20


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=25_600)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2560)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also time the published route")
    ap.add_argument("--memory-n", type=int, default=None,
                    help="n of the memory test (default: --n); it streams n and 10 n")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = features(args.n, args.d, device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
          f"{torch.get_num_threads()} threads), n = {args.n}, d = {args.d}, batch = {args.batch}")

    # warm-up (allocators, BLAS threads, CUDA kernels)
    streamed(x[: 4 * args.d], args.batch, None)
    _ = x.T @ x

    t_gram, _ = timed(lambda: x.T @ x, device, args.repeats)
    t_eig, _ = timed(lambda: torch.linalg.eigvalsh(x.T @ x), device, args.repeats)
    t64, out64 = timed(lambda: streamed(x, args.batch, torch.float64), device, args.repeats)
    t32, out32 = timed(lambda: streamed(x, args.batch, None), device, args.repeats)
    exact = {"rankme": rankme(x), "alpha_req": alpha_req(x)}

    def err(out):
        return max(abs(out[k] - exact[k]) / abs(exact[k]) for k in exact)

    print(f"bare XᵀX (float32)                        {t_gram * 1e3:9.1f} ms   1.00×")
    print(f"XᵀX + eigvalsh (float32)                  {t_eig * 1e3:9.1f} ms   "
          f"{t_eig / t_gram:.2f}×")
    print(f"RankMe + alpha-ReQ, streaming, float64    {t64 * 1e3:9.1f} ms   {t64 / t_gram:.2f}×"
          f"   max rel. error {err(out64):.1e}")
    print(f"RankMe + alpha-ReQ, streaming, float32    {t32 * 1e3:9.1f} ms   {t32 / t_gram:.2f}×"
          f"   max rel. error {err(out32):.1e}")
    if args.reference:
        if device.type != "cpu":
            print("reference route: skipped (scikit-learn runs on the CPU only)")
        else:
            t_ref, out_ref = timed(lambda: reference_route(x), device, 1)
            print(f"published route (SVD + sklearn PCA)       {t_ref * 1e3:9.1f} ms   "
                  f"{t_ref / t_gram:.2f}×   max rel. error {err(out_ref):.1e}")
    print(f"load average (1, 5, 15 min): {os.getloadavg()} on {os.cpu_count()} CPUs")
    print(f"values: RankMe {exact['rankme']:.4f}, alpha-ReQ {exact['alpha_req']:.4f}")

    n_mem = args.memory_n or args.n
    small = peak_memory_of_stream(n_mem, args.d, args.batch, device)
    large = peak_memory_of_stream(10 * n_mem, args.d, args.batch, device)
    print(f"peak memory streaming n = {n_mem}: {small:.1f} MiB; n = {10 * n_mem}: {large:.1f} MiB"
          f" (ratio {large / max(small, 1e-9):.2f}; the {n_mem}×{args.d} float32 data alone "
          f"would be {n_mem * args.d * 4 / 2**20:.0f} MiB, ×10 = "
          f"{10 * n_mem * args.d * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
