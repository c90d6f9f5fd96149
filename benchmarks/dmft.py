"""Cost of the two-layer DMFT against training the finite-width networks it describes.

Run: ``python benchmarks/dmft.py [--quick]``.

1. Same run, same task (he2 single-index, P = 20, D = 10, t ≤ 10, γ₀ = 1): one DMFT solve
   (``theory.dmft.dmft_two_layer``, jax CPU, 16384 fields) against training the networks that
   estimate the same curve (``dynamics.recipes.two_layer.train_two_layer``: widths 250/1000/4000
   × 4 seeds, torch CPU); ratio = network time / DMFT time, and how far the width-4000 seed mean
   is from the DMFT.
2. How the solve cost grows with P, with the number of time steps and with the number of
   sampled fields (each doubled from a base), with the exponent log₂(t(2x)/t(x)).
3. CUDA rows (jax GPU for the DMFT, torch CUDA for the networks): measured only where a GPU is
   present; otherwise printed as "unmeasured".
Wall-clock times on a shared machine are noisy; read ratios as orders of magnitude.
"""

from __future__ import annotations

import argparse
import os
import platform
import warnings

import numpy as np
import torch
from _timing import best_of  # noqa: E402 - benchmarks/_timing.py
from traindyn.dynamics.recipes.two_layer import train_two_layer, two_layer_task
from traindyn.theory.dmft import dmft_two_layer


def _jax_gpu() -> bool:
    try:
        import jax

        return bool(jax.devices("gpu"))
    except Exception:  # noqa: BLE001 - no GPU backend
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    fields = 4096 if q else 16384
    widths, seeds, steps = ((250, 1000), range(2), 100) if q else ((250, 1000, 4000), range(4),
                                                                   200)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}")
    x, y, xt, yt = two_layer_task(20, 20, 10, "he2", 3)

    def nets(device: str = "cpu"):
        return train_two_layer(x, y, 1.0, xt, yt, widths=widths, seeds=seeds,
                               learning_rate=0.05, steps=steps, record_every=10, device=device)

    t_net, net = best_of(nets, 1)

    def solve(device: str = "cpu", **kw):
        base = dict(n_samples=fields, dt=0.05, two_time=0, device=device)
        return dmft_two_layer(x, y, net.time, 1.0, xt, yt, **{**base, **kw})

    solve()  # compile once (a fresh process pays it on its first call; shown below)
    t_th, th = best_of(solve, repeat=2)
    gap = float(np.abs(net.train_loss.sel(width=widths[-1]).mean("seed") - th.train_loss).max()
                / th.train_loss.max())
    print(f"\n1. DMFT ({fields} fields, {th.attrs['n_iterations']} iterations) vs "
          f"{len(widths)} widths x {len(seeds)} seeds x {steps} GD steps")
    print(f"   DMFT solve {t_th:8.2f} s | networks {t_net:8.2f} s | networks/DMFT "
          f"{t_net / t_th:6.1f} | width {widths[-1]} seed-mean loss vs DMFT {gap:.2%}")

    print("\n2. solve cost scaling (jax CPU; exponent = log2 of the time ratio on doubling)")
    base = dict(P=16, n_steps=100, M=4096 if q else 8192)

    def cost(P: int, n_steps: int, M: int) -> float:
        xs, ys, _, _ = two_layer_task(P, 1, 10, "he2", 0)
        t = np.linspace(0, 10, 11)
        def run():  # a fixed 8 iterations (tol = 0): the cost per solve, not convergence
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return dmft_two_layer(xs, ys, t, 1.0, n_samples=M, n_steps=n_steps,
                                      two_time=0, max_iter=8, tol=0.0)

        run()  # compile
        return best_of(run, repeat=2)[0]

    t0 = cost(**base)
    print(f"   base P={base['P']}, steps={base['n_steps']}, fields={base['M']}: {t0:.3f} s "
          "(8 iterations)")
    for key, label in (("P", "P"), ("n_steps", "time steps"), ("M", "sampled fields")):
        for factor in (2, 4):
            t1 = cost(**{**base, key: base[key] * factor})
            print(f"   {label:>15} x{factor}: {t1:8.3f} s  ratio {t1 / t0:5.2f}  exponent "
                  f"{np.log(t1 / t0) / np.log(factor):5.2f}")

    print("\n3. CUDA vs CPU")
    if _jax_gpu():
        solve("gpu")
        t_gpu, th_gpu = best_of(lambda: solve("gpu"), repeat=2)
        diff = float(np.abs(th_gpu.train_loss - th.train_loss).max() / th.train_loss.max())
        print(f"   DMFT jax GPU {t_gpu:.3f} s vs CPU {t_th:.3f} s: speed-up {t_th / t_gpu:.1f}, "
              f"max rel diff {diff:.1e}")
    else:
        print("   DMFT jax GPU: unmeasured (jax has no GPU here)")
    if torch.cuda.is_available():
        t_cuda, _ = best_of(lambda: nets("cuda"), 1)
        print(f"   networks torch CUDA {t_cuda:.2f} s vs CPU {t_net:.2f} s: speed-up "
              f"{t_net / t_cuda:.1f}")
    else:
        print("   networks torch CUDA: unmeasured (no CUDA device)")


if __name__ == "__main__":
    main()
