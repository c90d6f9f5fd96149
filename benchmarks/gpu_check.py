"""One short script for a CUDA machine: every probe and theory function on the GPU vs the CPU.

Run:  ``python benchmarks/gpu_check.py``  (or ``make bench-gpu``).

For each check it computes the result on the CPU and on CUDA from the same inputs, prints the
relative difference and both timings (median of a few repeats, CUDA synchronised).  On a
machine without CUDA it says so and exits 0.  Exit status 1 if any GPU result disagrees with
the CPU beyond its tolerance.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch


def _timed(fn: Callable[[], object], device: str, repeats: int = 3) -> tuple[object, float]:
    out = fn()  # warm-up (kernels, caches)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _as_array(x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    if hasattr(x, "to_array"):  # xarray Dataset
        return np.asarray(x.to_array(), dtype=float)
    if hasattr(x, "alpha"):  # PowerLawFit
        return np.array([x.alpha, x.r2])
    return np.asarray(x, dtype=float)


def feature_checks(n: int = 8192, d: int = 1024) -> dict[str, Callable[[str], object]]:
    """Checks over an ``n × d`` float32 feature matrix with a power-law spectrum."""
    import probes

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=gen) * torch.arange(1, d + 1).float().pow(-0.6)
    checks: dict[str, Callable[[str], object]] = {}
    for name, probe in sorted(probes.FEATURE_PROBES.items()):
        checks[f"probe {name}"] = lambda dev, p=probe: p(base.to(dev))
    checks["bare XᵀX (baseline)"] = lambda dev: base.to(dev).T @ base.to(dev)
    labels = torch.arange(n) % 10
    checks["probe neural_collapse"] = lambda dev: probes.neural_collapse(
        base.to(dev), labels.to(dev))
    weights = {"w": torch.randn(512, 256, generator=gen)}
    checks["probe weight_spectra"] = lambda dev: probes.weight_spectra(
        {k: v.to(dev) for k, v in weights.items()})
    q, k = torch.randn(2, 8, 128, 64, generator=gen), torch.randn(2, 8, 128, 64, generator=gen)
    checks["probe max_attention_logit"] = lambda dev: probes.max_attention_logit(q.to(dev),
                                                                                 k.to(dev))
    return checks


def model_checks(n: int = 256) -> dict[str, Callable[[str], object]]:
    """Whole-model probes: empirical NTK (structured and Jacobian) and kernel alignment."""
    import probes

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                              torch.nn.ReLU(), torch.nn.Linear(512, 10)).double()
    x = torch.randn(n, 64, dtype=torch.float64)
    y = torch.randn(n, dtype=torch.float64)

    def ntk(dev: str, method: str) -> torch.Tensor:
        return probes.empirical_ntk(mlp.to(dev), x.to(dev), output="trace", method=method)

    checks: dict[str, Callable[[str], object]] = {
        "ntk structured (MLP, trace)": lambda dev: ntk(dev, "structured"),
        "ntk jacobian (MLP, trace, n=32)": lambda dev: probes.empirical_ntk(
            mlp.to(dev), x[:32].to(dev), output="trace", method="jacobian"),
        "ntk full (MLP, auto)": lambda dev: probes.empirical_ntk(
            mlp.to(dev), x[:64].to(dev), output="full"),
        "kernel centred alignment": lambda dev: probes.centered_alignment(ntk(dev, "structured"),
                                                                          y.to(dev)),
    }
    return checks


def theory_checks() -> dict[str, Callable[[str], object]]:
    """Theory functions: numpy/jax on the host; run once each as a regression check."""
    import theory

    t = np.geomspace(0.01, 1e3, 200)
    eigs = np.arange(1, 10_001, dtype=float) ** -1.5
    return {
        "theory advani_saxe": lambda dev: theory.advani_saxe(t, [0.5, 2.0]),
        "theory advani_saxe_asymptote": lambda dev: theory.advani_saxe_asymptote([0.5, 2.0]),
        "theory krr_learning_curve": lambda dev: theory.krr_learning_curve(
            eigs, n=np.geomspace(10, 5e3, 30), ridge=(0.0, 1e-3)),
        "theory rf_learning_curve": lambda dev: theory.rf_learning_curve(
            eigs, n=(100, 1000), n_features=np.geomspace(10, 1e4, 20)),
        "theory imbalanced_collapse": lambda dev: theory.imbalanced_collapse([50] * 5 + [5] * 5),
        "theory saxe_dynamics": lambda dev: theory.saxe_dynamics(t, [3.0, 2.0, 1.0], 1e-3),
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (exit 0).")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    failures = 0
    print(f"{'check':<36} {'cpu s':>9} {'cuda s':>9} {'speed-up':>9} {'rel diff':>10}")
    for name, fn in {**feature_checks(), **model_checks(), **theory_checks()}.items():
        cpu, t_cpu = _timed(lambda f=fn: f("cpu"), "cpu")
        gpu, t_gpu = _timed(lambda f=fn: f("cuda"), "cuda")
        a, b = _as_array(cpu), _as_array(gpu)
        if "XᵀX" in name:
            # float32 sums in another order: compare as matrices (‖a − b‖_F / ‖a‖_F); entry by
            # entry, near-zero off-diagonal entries give large relative differences by chance
            diff = float(np.linalg.norm(a - b) / np.linalg.norm(a))
            tol = 1e-5
        else:
            scale = np.maximum(np.abs(a), 1e-12)
            diff = float(np.nanmax(np.abs(a - b) / scale)) if a.size else 0.0
            tol = 1e-6
        ok = diff <= tol or (np.isnan(a).all() and np.isnan(b).all())
        failures += not ok
        print(f"{name:<36} {t_cpu:9.4f} {t_gpu:9.4f} {t_cpu / t_gpu:9.2f} {diff:10.2e}"
              f"{'' if ok else '  MISMATCH'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
