"""One short script for a CUDA machine: every probe and theory function on the GPU vs the CPU.

Run:  ``python benchmarks/gpu_check.py``  (or ``make bench-gpu``).

For each check it computes the result on the CPU and on CUDA from the same inputs, prints the
relative difference and both timings (median of a few repeats, CUDA synchronised).  On a
machine without CUDA it says so and exits 0.  Exit status 1 if any GPU result disagrees with
the CPU beyond its tolerance.

Theory rows compare the numpy reference (host) with the same call on jax's GPU
(``backend="jax"``, float64) and must agree to 1e-10 relative; rows without a device path print
``host only``.  The theory-grid row (KRR over 10⁶ modes × 100 n × 20 ridges, scaled to
10⁴ × 20 × 5 without a jax GPU) prints the numpy / device time ratio.  ``--jax-cpu`` runs the
theory rows with jax's CPU device as the "device" (works without a GPU).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _timed(fn: Callable[[], object], device: str, repeats: int = 3,
           warmup: bool = True) -> tuple[object, float]:
    out = fn() if warmup else None  # warm-up (kernels, caches, jax compilation)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = _resolved(fn())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _resolved(x: object) -> object:
    """A probe's answer with its pending device values read (inside the timed region)."""
    from traindyn.probes._pending import read_answer

    return read_answer(x)


def _as_array(x: object) -> np.ndarray:
    x = _resolved(x)
    if isinstance(x, dict):  # several named results: all of them, in key order
        parts = [_as_array(x[k]).ravel() for k in sorted(x)]
        return np.concatenate(parts) if parts else np.empty(0)
    if isinstance(x, (tuple, list)) and not all(isinstance(v, (int, float)) for v in x):
        # e.g. a stateful probe's (values, state)
        parts = [_as_array(v).ravel() for v in x]
        return np.concatenate(parts) if parts else np.empty(0)
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    if hasattr(x, "to_array"):  # xarray Dataset
        return np.asarray(x.to_array(), dtype=float)
    if hasattr(x, "alpha"):  # PowerLawFit
        return np.array([x.alpha, x.r2])
    return np.asarray(x, dtype=float)


def feature_checks(n: int = 8192, d: int = 1024) -> dict[str, Callable[[str], object]]:
    """Checks over an ``n × d`` float32 feature matrix with a power-law spectrum."""
    from traindyn import probes

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=gen) * torch.arange(1, d + 1).float().pow(-0.6)
    checks: dict[str, Callable[[str], object]] = {}
    labels = torch.arange(n) % 10
    for name, probe in sorted(probes.all_probes().items()):
        if not probe.per_layer:
            continue
        if probe.consumes == "labelled_features":
            checks[f"probe {name}"] = lambda dev, p=probe: p(base.to(dev), labels.to(dev))
        else:
            checks[f"probe {name}"] = lambda dev, p=probe: p(base.to(dev))
    checks["bare XᵀX (baseline)"] = lambda dev: base.to(dev).T @ base.to(dev)
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
    from traindyn import probes

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


HOST_ONLY = {
    "theory advani_saxe_asymptote",
    "theory imbalanced_collapse",
    "theory saxe_dynamics",
}
"""Theory rows with no device path (closed forms, sympy, scalar root finding): run once on the
host and printed as ``host only``."""

THEORY_TOL = 1e-10
"""Device (jax, float64) against the numpy result: maximum relative difference."""


def jax_gpu() -> object | None:
    """jax's first GPU device, or None when jax has none (e.g. a CPU-only jaxlib)."""
    try:
        import jax

        return jax.devices("gpu")[0]
    except Exception:  # noqa: BLE001 - no GPU backend, or no jax at all
        return None


def _theory_backend(dev: str) -> dict:
    """``"cpu"``: the numpy reference; ``"cuda"``: jax on the GPU; ``"jax-cpu"``: jax on the
    CPU (to check the device path where there is no GPU)."""
    if dev == "cpu":
        return {}
    if dev == "jax-cpu":
        return {"backend": "jax", "device": "cpu"}
    if dev == "cuda":
        gpu = jax_gpu()
        if gpu is None:
            raise RuntimeError("jax has no GPU device here")
        return {"backend": "jax", "device": gpu}
    raise ValueError(f"unknown device {dev!r}")


def theory_grid_size(big: bool | None = None) -> tuple[int, int, int]:
    """(modes, sample sizes, ridges) of the theory-grid row: 10⁶ × 100 × 20 with a jax GPU,
    10⁴ × 20 × 5 without one (seconds on a CPU)."""
    if big is None:
        big = jax_gpu() is not None
    return (10**6, 100, 20) if big else (10**4, 20, 5)


def theory_checks(big: bool | None = None) -> dict[str, Callable[[str], object]]:
    """Theory functions.  Each takes ``dev``: ``"cpu"`` runs the numpy reference,
    ``"cuda"`` the same call with ``backend="jax"`` on jax's GPU (``"jax-cpu"``: on jax's
    CPU).  Rows in :data:`HOST_ONLY` ignore ``dev``."""
    from traindyn import theory

    t = np.geomspace(0.01, 1e3, 200)
    eigs = np.arange(1, 10_001, dtype=float) ** -1.5
    modes, n_n, n_ridge = theory_grid_size(big)
    grid_spec = theory.power_law_spectrum(modes, a=1.5, b=1.3)
    grid_n = np.geomspace(10, 0.5 * modes, n_n)
    grid_ridge = np.concatenate([[0.0], np.logspace(-8, 0, n_ridge - 1)])
    return {
        "theory advani_saxe": lambda dev: theory.advani_saxe(
            t, [0.5, 2.0], **_theory_backend(dev)),
        "theory advani_saxe GD": lambda dev: theory.advani_saxe(
            t, [0.5, 2.0], learning_rate=0.1, **_theory_backend(dev)),
        "theory advani_saxe_asymptote": lambda dev: theory.advani_saxe_asymptote([0.5, 2.0]),
        "theory krr_learning_curve": lambda dev: theory.krr_learning_curve(
            eigs, n=np.geomspace(10, 5e3, 30), ridge=(0.0, 1e-3), **_theory_backend(dev)),
        "theory rf_learning_curve": lambda dev: theory.rf_learning_curve(
            eigs, n=(100, 1000), n_features=np.geomspace(10, 1e4, 20), **_theory_backend(dev)),
        "theory scaling_regimes": lambda dev: theory.scaling_regimes(
            eigs, n=(100, 300, 1000), n_features=(100, 300, 1000), n_fixed=30,
            n_features_fixed=30, noise_var=0.1, **_theory_backend(dev)),
        f"theory grid KRR {modes:.0e} x {n_n} x {n_ridge}": lambda dev: theory.krr_learning_curve(
            grid_spec, n=grid_n, ridge=grid_ridge, noise_var=0.1, n_modes_out=0,
            **_theory_backend(dev)),
        "theory imbalanced_collapse": lambda dev: theory.imbalanced_collapse([50] * 5 + [5] * 5),
        "theory saxe_dynamics": lambda dev: theory.saxe_dynamics(t, [3.0, 2.0, 1.0], 1e-3),
    }


def _theory_array(x: object) -> np.ndarray:
    """Every variable of a Dataset, flattened and concatenated (``to_array`` would broadcast
    them to common dims, and an empty ``mode`` dim would empty all of them)."""
    if hasattr(x, "data_vars"):
        return np.concatenate([np.asarray(v.values, dtype=float).ravel()
                               for v in x.data_vars.values()])
    return _as_array(x)


def theory_difference(a: np.ndarray, b: np.ndarray, floor: float = 1e-200) -> float:
    """Max relative difference ``|a − b| / max(|a|, floor)`` over finite entries; inf when the
    two disagree on which entries are non-finite.  ``floor`` keeps values that the device
    flushes to zero (subnormals) from counting as a relative difference of 1."""
    fin_a, fin_b = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fin_a, fin_b) or not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    if not fin_a.any():
        return 0.0
    x, y = a[fin_a], b[fin_a]
    return float(np.max(np.abs(x - y) / np.maximum(np.abs(x), floor)))


def theory_rows(device: str = "cuda", big: bool | None = None,
                repeats: int = 3) -> list[tuple[str, float, float | None, float | None]]:
    """``(name, cpu seconds, device seconds or None, max relative difference or None)`` per
    theory row; ``None`` for host-only rows.  The device runs the jax path on ``device``
    (``"cuda"`` or ``"jax-cpu"``) after one warm-up call (compilation)."""
    rows = []
    for name, fn in theory_checks(big).items():
        grid = name.startswith("theory grid")
        cpu, t_cpu = _timed(lambda f=fn: f("cpu"), "cpu", repeats=1 if grid else repeats,
                            warmup=not grid)
        if name in HOST_ONLY:
            rows.append((name, t_cpu, None, None))
            continue
        dev, t_dev = _timed(lambda f=fn: f(device), "cpu", repeats=1 if grid else repeats)
        rows.append((name, t_cpu, t_dev, theory_difference(_theory_array(cpu),
                                                            _theory_array(dev))))
    return rows


def _print_theory(rows: list, device_label: str) -> int:
    failures = 0
    for name, t_cpu, t_dev, diff in rows:
        if t_dev is None:
            print(f"{name:<36} {t_cpu:9.4f} {'':>9} {'':>9} {'':>10}  host only")
            continue
        ok = diff <= THEORY_TOL
        failures += not ok
        print(f"{name:<36} {t_cpu:9.4f} {t_dev:9.4f} {t_cpu / t_dev:9.2f} {diff:10.2e}"
              f"  {device_label}{'' if ok else '  MISMATCH'}")
    return failures


DMFT_TOL = 1e-8
"""theory.dmft on the GPU against the same solve on the CPU (same sampled fields, float64)."""


def dmft_row() -> tuple[float, float | None, float | None]:
    """``theory.dmft.dmft_two_layer`` (P = 40, 16384 fields, 200 steps, γ₀ = 1) on jax's CPU
    and on its GPU: (cpu s, gpu s or None, max relative difference of the loss curves or
    None).  No GPU: the device half is unmeasured (None)."""
    from traindyn.dynamics.recipes.two_layer import two_layer_task
    from traindyn.theory.dmft import dmft_two_layer

    x, y, xt, yt = two_layer_task(40, 40, 10, "he2", 0)
    t = np.linspace(0, 10, 21)

    def solve(dev: str):
        return dmft_two_layer(x, y, t, 1.0, xt, yt, n_samples=16384, n_steps=200,
                              two_time=0, device=dev)

    solve("cpu")  # compile
    t0 = time.perf_counter()
    cpu = solve("cpu")
    t_cpu = time.perf_counter() - t0
    if jax_gpu() is None:
        return t_cpu, None, None
    solve("gpu")
    t0 = time.perf_counter()
    gpu = solve("gpu")
    t_gpu = time.perf_counter() - t0
    a = np.concatenate([cpu.train_loss.values, cpu.test_loss.values])
    b = np.concatenate([gpu.train_loss.values, gpu.test_loss.values])
    return t_cpu, t_gpu, float(np.max(np.abs(a - b) / np.abs(a)))


def _print_dmft() -> int:
    t_cpu, t_gpu, diff = dmft_row()
    name = "theory dmft_two_layer P=40 M=16384"
    if t_gpu is None:
        print(f"{name:<36} {t_cpu:9.4f} {'':>9} {'':>9} {'':>10}  jax GPU unmeasured (none)")
        return 0
    ok = diff <= DMFT_TOL
    print(f"{name:<36} {t_cpu:9.4f} {t_gpu:9.4f} {t_cpu / t_gpu:9.2f} {diff:10.2e}  jax gpu"
          f"{'' if ok else '  MISMATCH'}")
    return int(not ok)


def monitor_parity(device: str, n: int = 2048, width: int = 256) -> tuple[float, float]:
    """``(process vs sync, sync vs sync)``: max relative differences of RankMe, alpha-ReQ and
    NC1 of two hidden layers between the Monitor's synchronous mode (probes on ``device``) and
    its process mode (probes on the CPU, from features captured on ``device``), and between
    two synchronous runs.  Each Monitor runs its own float32 forward pass, so the second
    number is the floor set by the device's forward pass alone (cuBLAS/cuDNN may sum in
    another order from one call to the next); the target is that the modes agree to float64
    round-off or that the gap be explained — a first number at the level of the second is the
    forward pass, not the mode."""
    from torch import nn
    from traindyn.dynamics.monitor import Monitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).to(device)
    x = torch.randn(n, 64, device=device)
    y = torch.arange(n, device=device) % 10
    out = {}
    for key, mode in (("sync", False), ("process", "process"), ("sync again", False)):
        mon = Monitor(model, probes=["rankme", "alpha_req", "neural_collapse"],
                      layers=["1", "3"], probe_data=x, probe_labels=y,
                      schedule=lambda s: True, background=mode)
        with mon:
            mon.step(0)
        out[key] = mon.to_dataset()

    def gap(a_key: str, b_key: str) -> float:
        diffs = []
        for name in ("rankme", "alpha_req", "nc1"):
            a, b = out[a_key][name].values, out[b_key][name].values
            diffs.append(float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))))
        return max(diffs)

    return gap("sync", "process"), gap("sync", "sync again")


def host_syncs(device: str = "cuda", width: int = 256) -> tuple[int, list[str]]:
    """Host synchronisations in one synchronous Monitor evaluation on ``device`` (RankMe,
    alpha-ReQ, neural collapse and weight spectra of two 256-wide layers), counted by torch's
    CUDA sync debug mode; returns the count and where they were made (file:line, distinct).

    Expected: one read of the feature probes' values and one of the parameter
    probes' (:mod:`probes._pending`), plus the waits no Python code can avoid — torch's
    LAPACK ``info`` check after each batched CUDA eigensolve / SVD, or the copy of a small
    matrix to the CPU where :mod:`probes._solve` places its solve.  The CPU test
    ``tests/probes/test_host_sync.py`` checks the Python side without a GPU."""
    import warnings

    from torch import nn
    from traindyn.dynamics.monitor import Monitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).to(device)
    x = torch.randn(2048, 64, device=device)
    y = torch.arange(2048, device=device) % 10
    mon = Monitor(model, probes=["rankme", "alpha_req", "neural_collapse", "weight_spectra"],
                  layers=["1", "3"], probe_data=x, probe_labels=y, schedule=lambda s: True)
    mon.step(0)  # warm-up: the solve crossover is measured once per process
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mon.step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), list(dict.fromkeys(f"{Path(w.filename).name}:{w.lineno}" for w in syncs))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # --smoke: the same run (without CUDA it only says so and exits 0; with CUDA it is the check)
    if "--jax-cpu" in args:
        # the theory device path on jax's CPU device against numpy: runs anywhere
        print(f"{'check':<36} {'numpy s':>9} {'jax s':>9} {'speed-up':>9} {'rel diff':>10}")
        failures = _print_theory(theory_rows("jax-cpu"), "jax cpu") + _print_dmft()
        return 1 if failures else 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (exit 0). "
              "`python benchmarks/gpu_check.py --jax-cpu` checks the theory device path on the "
              "CPU.")
        print("theory dmft_two_layer (jax GPU vs CPU): unmeasured here (no GPU); "
              "`--jax-cpu` runs its CPU half")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    failures = 0
    print(f"{'check':<36} {'cpu s':>9} {'cuda s':>9} {'speed-up':>9} {'rel diff':>10}")
    for name, fn in {**feature_checks(), **model_checks()}.items():
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
    parity, floor = monitor_parity("cuda")
    explained = parity <= max(1e-9, 10 * floor)
    print(f"{'monitor process (CPU) vs sync (CUDA)':<36} {'':>9} {'':>9} {'':>9} {parity:10.2e}"
          f"  rankme, alpha_req, nc1; two sync runs differ by {floor:.2e} (forward pass)"
          f"{'' if explained else '  DIFFERS beyond the forward pass (see Monitor docs)'}")
    count, where = host_syncs("cuda")
    print(f"{'host syncs, one sync-mode evaluation':<36} {count:>9d} {'':>9} {'':>9} {'':>10}"
          f"  at {', '.join(where[:8])}")
    # theory: numpy on the host against the jax path on the GPU (float64, tolerance 1e-10)
    gpu = jax_gpu()
    if gpu is None:
        for name in theory_checks(big=False):
            print(f"{name:<36} {'':>9} {'':>9} {'':>9} {'':>10}  host only (jax has no GPU)")
    else:
        failures += _print_theory(theory_rows("cuda"), f"jax {gpu.platform}")
    failures += _print_dmft()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
