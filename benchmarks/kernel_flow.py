"""Cost of predicting a network's training from its NTK against training the network.

Run: ``python benchmarks/kernel_flow.py [--smoke] [--threads N]``.

1. Same run: a digits MLP (``recipes.digits.DigitsMLP``, 64 → width → 10) trained by full-batch
   gradient descent on ``n`` training points for ``S`` steps (losses on train and test recorded
   at 20 steps), against ``dynamics.predict.predict_from_model`` from step 0 to the same steps:
   the empirical NTK (full ``(n, n, 10, 10)`` kernel and test–train kernel) plus
   ``theory.kernel_flow``.  Ratio = training time / prediction time, for cross-entropy (GD
   iterated in function space: ``(nk)²`` work per step) and for the squared loss (one
   ``(nk)³`` eigendecomposition), with the full kernel and with the kernel averaged over
   outputs (``kernel="mean"``: ``k²`` less memory, ``k³`` less eigendecomposition).
2. How ``theory.kernel_flow`` alone grows with ``n`` and with ``k`` (doubling each; exponent =
   log₂ of the time ratio), squared loss and cross-entropy, shared vs full kernel.
Machine, threads (torch and BLAS) and load average are printed first and last.  Times are CPU
seconds of this process (``time.process_time``; wall-clock in brackets), best of 2 (training)
and of 3 (``--smoke``) or 1 (prediction at full size); the CPU time is the steadier measure on
a shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from _timing import load_average  # benchmarks/_timing.py
from threadpoolctl import threadpool_limits
from torch import nn
from traindyn.dynamics.predict import predict_from_model
from traindyn.dynamics.recipes.digits import DigitsMLP, load_digits_split

from traindyn import theory


def best_of(fn, repeat: int = 3):
    """The shortest CPU time (``time.process_time``: all threads of this process) of ``repeat``
    calls, its wall-clock time, and the last result.  On a shared machine a process's CPU time
    is far steadier than its wall-clock time (another process's load stretches the latter)."""
    best, wall, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        c, w = time.process_time() - c0, time.perf_counter() - w0
        if c < best:
            best, wall = c, w
    return best, wall, out



def same_run(n: int, width: int, steps: int, lr: float, repeat: int) -> None:
    xtr, ytr, xte, yte = load_digits_split()
    xtr, ytr, xte, yte = xtr[:n], ytr[:n], xte[:n], yte[:n]
    record = np.unique(np.linspace(0, steps, 20).round().astype(int))
    for loss, fn, targets, tt in (
            ("cross_entropy", nn.functional.cross_entropy, ytr, yte),
            ("mse", nn.functional.mse_loss, nn.functional.one_hot(ytr, 10).float(),
             nn.functional.one_hot(yte, 10).float())):
        torch.manual_seed(0)
        model0 = DigitsMLP((width,))

        def train(model0=model0, fn=fn, targets=targets, tt=tt):
            model = DigitsMLP((width,))
            model.load_state_dict(model0.state_dict())
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            out = []
            for s in range(steps + 1):
                if s in record:
                    with torch.no_grad():
                        out.append((fn(model(xtr), targets).item(), fn(model(xte), tt).item()))
                if s == steps:
                    break
                opt.zero_grad()
                fn(model(xtr), targets).backward()
                opt.step()
            return np.array(out)

        t_train, w_train, measured = best_of(train, 2)

        for kernel in ("full", "mean"):
            def predict(model0=model0, loss=loss, targets=targets, tt=tt, kernel=kernel):
                return predict_from_model(model0, xtr, targets if loss == "mse" else ytr,
                                          record, lr, x_test=xte,
                                          y_test=tt if loss == "mse" else yte, loss=loss,
                                          kernel=kernel)

            t_pred, w_pred, pred = best_of(predict, repeat)
            t_ntk, t_solve = pred.attrs["ntk_seconds"], pred.attrs["solve_seconds"]
            gap = float(np.abs(measured[:, 0] - pred.train_loss.values).max() / measured[0, 0])
            print(f"   {loss:13s} {kernel:4s} kernel: CPU train {t_train:7.3f} s | predict "
                  f"{t_pred:7.3f} s (wall: NTK {t_ntk:.3f} s, kernel_flow {t_solve:.3f} s) | "
                  f"train/predict {t_train / t_pred:6.2f} (wall {w_train / w_pred:.2f}) | "
                  f"max |train loss gap| {gap:.1%} of the initial loss")


def scaling(ns: list[int], ks: list[int], steps: int) -> None:
    rng = np.random.default_rng(0)

    def problem(n: int, k: int, full: bool):
        A = rng.standard_normal((n * k if full else n, 2 * n * k))
        K = A @ A.T / A.shape[1]
        if full:
            K = K.reshape(n, k, n, k).transpose(0, 2, 1, 3)
        labels = rng.integers(0, k, n)
        return K, labels

    def run(n: int, k: int, full: bool, loss: str) -> float:
        K, labels = problem(n, k, full)
        y = np.eye(k)[labels] if loss == "mse" else labels
        f0 = np.zeros((n, k))
        t, _, _ = best_of(lambda: theory.kernel_flow(K, y, np.linspace(0, steps, 20).round(),
                                                     0.5, f0_train=f0, loss=loss), 3)
        return t

    for loss in ("mse", "cross_entropy"):
        for full in (False, True):
            label = f"{loss}, {'full (n,n,k,k)' if full else 'shared (n,n)'} kernel"
            times = [run(n, ks[0], full, loss) for n in ns]
            expo = [np.log2(b / a) for a, b in zip(times[:-1], times[1:], strict=True)]
            print(f"   {label:38s} k={ks[0]:<3d} n={ns}: CPU "
                  + ", ".join(f"{t * 1e3:.1f}" for t in times) + " ms; exponents "
                  + ", ".join(f"{e:.2f}" for e in expo))
            times = [run(ns[0], k, full, loss) for k in ks]
            expo = [np.log2(b / a) for a, b in zip(times[:-1], times[1:], strict=True)]
            print(f"   {label:38s} n={ns[0]:<3d} k={ks}: CPU "
                  + ", ".join(f"{t * 1e3:.1f}" for t in times) + " ms; exponents "
                  + ", ".join(f"{e:.2f}" for e in expo))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy/scipy BLAS: the same thread count as torch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch threads {torch.get_num_threads()}; load (/proc/loadavg) {load_average()}")
    n, width, steps = (32, 32, 20) if args.smoke else (256, 256, 1000)
    print(f"\n1. same run: digits MLP 64-{width}-10, n = {n} train / {n} test, {steps} "
          f"full-batch GD steps, lr 0.1, losses at 20 steps")
    same_run(n, width, steps, 0.1, 3 if args.smoke else 1)
    ns, ks, s = ([16, 32], [2, 4], 20) if args.smoke else ([64, 128, 256], [2, 4, 8], 1000)
    print(f"\n2. theory.kernel_flow cost, 20 output steps up to s = {s} "
          "(squared loss: one eigh; cross-entropy: s GD steps)")
    scaling(ns, ks, s)
    print(f"\nload after: {load_average()}")


if __name__ == "__main__":
    main()
