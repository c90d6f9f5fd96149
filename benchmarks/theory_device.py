"""Theory learning curves on a jax device against numpy, on this machine, as time ratios.

Run: ``python benchmarks/theory_device.py [--modes 100000] [--n 50] [--ridges 10]
[--device cpu]``.

Each case times, in the same process, the numpy reference (host) and the same call with
``backend="jax"`` on ``--device`` (default: jax's CPU device; ``gpu`` where jax has one): the
first jax call (tracing + XLA compilation + run) and the best of the next ``--repeat``
(compiled).  It prints numpy time / jax time and the maximum relative difference of every
output (the target is 1e-10).  The numpy path sums the far tail of a large spectrum by a
convergent series (``theory.kernels.Spectrum``); the jax path sums every mode exactly, which
costs ``grid × modes`` per Newton step and pays off on a GPU, not on a small CPU.
Wall-clock times on a shared machine are noisy: read the ratios as orders of magnitude.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from _timing import best_of  # noqa: E402 - benchmarks/_timing.py

from traindyn import theory


def _max_rel(a, b, floor: float = 1e-200) -> float:
    worst = 0.0
    for name in a.data_vars:
        x, y = np.asarray(a[name].values, float).ravel(), np.asarray(b[name].values, float).ravel()
        fin = np.isfinite(x)
        if not np.array_equal(fin, np.isfinite(y)):
            return float("inf")
        if fin.any():
            worst = max(worst, float(np.max(np.abs(x[fin] - y[fin])
                                            / np.maximum(np.abs(x[fin]), floor))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", type=int, default=100_000)
    parser.add_argument("--n", type=int, default=50, help="number of sample sizes")
    parser.add_argument("--ridges", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="jax device: cpu, gpu, ...")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.modes, args.n, args.ridges, args.repeat = 500, 4, 3, 1

    import jax

    spec = theory.power_law_spectrum(args.modes, a=1.5, b=1.3)
    ns = np.geomspace(10, 0.5 * args.modes, args.n)
    ridges = np.concatenate([[0.0], np.logspace(-8, 0, args.ridges - 1)])
    t = np.geomspace(0.01, 1e3, 500)
    jx = {"backend": "jax", "device": args.device}
    cases = {
        f"KRR grid {args.modes} modes x {args.n} n x {args.ridges} ridges": lambda **k:
            theory.krr_learning_curve(spec, n=ns, ridge=ridges, noise_var=0.1, n_modes_out=0,
                                      **k),
        f"RF grid {args.modes} modes, n=1000 x {args.n} N_f x 3 ridges": lambda **k:
            theory.rf_learning_curve(spec, n=1000.0, n_features=ns, ridge=[0.0, 1e-4, 1e-1],
                                     noise_var=0.1, n_modes_out=0, **k),
        "Advani-Saxe 20 load ratios x 500 times x 400 nodes": lambda **k:
            theory.advani_saxe(t, np.linspace(0.1, 4.0, 20), **k),
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
          f"device {args.device!r} ({jax.devices(args.device)[0]}); float64 throughout")
    header = ("case", "numpy s", "jax 1st s", "jax s", "numpy/jax", "max rel diff")
    print(f"{header[0]:52s} {header[1]:>9s} {header[2]:>10s} {header[3]:>9s} {header[4]:>10s} "
          f"{header[5]:>13s}")
    for name, fn in cases.items():
        t_np, ref = best_of(fn, args.repeat)
        t0 = time.perf_counter()
        fn(**jx)
        t_first = time.perf_counter() - t0
        t_jax, out = best_of(lambda f=fn: f(**jx), args.repeat)
        print(f"{name:52s} {t_np:9.3f} {t_first:10.3f} {t_jax:9.3f} {t_np / t_jax:10.2f} "
              f"{_max_rel(ref, out):13.2e}")


if __name__ == "__main__":
    main()
