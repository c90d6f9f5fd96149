"""Cost of a theory learning curve against the simulation it replaces, as a ratio.

Run: ``python benchmarks/theory_cost.py [--seeds 20] [--modes 2000]``.

Each case times, in the same process, (a) the eigenframework prediction of a whole curve
(``theory.kernels`` / ``theory.random_features``) and (b) the exact simulations over seeds that
estimate the same curve to a few per cent (``dynamics.recipes.kernel_regression``), and prints
simulation time / theory time together with how far the simulated mean is from the theory.
Wall-clock times on a shared machine are noisy: read the ratios as orders of magnitude.
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import best_of  # noqa: E402 - benchmarks/_timing.py
from traindyn.dynamics.recipes.kernel_regression import simulate_krr, simulate_rf
from traindyn.theory.kernels import krr_learning_curve, power_law_spectrum
from traindyn.theory.random_features import optimal_ridge, rf_learning_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--modes", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.modes = 2, 1000
    spec = power_law_spectrum(args.modes, a=1.5, b=1.5)
    lam, v2, noise = spec.eigenvalues, spec.target_power, 0.1
    seeds = range(args.seeds)

    rows = []
    # 1. KRR learning curve: 6 sample sizes × 3 ridges
    ns, ridges = [25, 50, 100, 200, 400, 800], [0.0, 1e-2, 1e-1]
    t_th, th = best_of(lambda: krr_learning_curve(spec, n=ns, ridge=ridges, noise_var=noise))
    t_sim, sim = best_of(lambda: simulate_krr(lam, v2, n=ns, ridge=ridges, noise_var=noise,
                                               seeds=seeds), repeat=1)
    err = float(np.abs(sim.test_error.mean("seed") / th.test_error - 1).mean())
    rows.append(("KRR curve, 6 n x 3 ridges", t_th, t_sim, err))

    # 2. RF curve at n = 200: 8 widths × 3 ridges (the interpolation threshold excluded)
    nf = [25, 50, 100, 150, 300, 500, 1000, 2000]
    t_th, th = best_of(lambda: rf_learning_curve(spec, n=[200], n_features=nf, ridge=ridges,
                                                  noise_var=noise))
    t_sim, sim = best_of(lambda: simulate_rf(lam, v2, n=[200], n_features=nf, ridge=ridges,
                                              noise_var=noise, seeds=seeds), repeat=1)
    err = float(np.abs(sim.test_error.mean("seed") / th.test_error - 1).mean())
    rows.append(("RF curve, n=200, 8 N_f x 3 ridges", t_th, t_sim, err))

    # 3. optimal-ridge envelope: theory minimises over δ; a simulation must sweep a ridge grid
    grid = np.concatenate([[0.0], np.logspace(-4, 1, 15)])
    t_th, th = best_of(lambda: optimal_ridge(spec, n=[200], n_features=nf, noise_var=noise))
    t_sim, sim = best_of(lambda: simulate_rf(lam, v2, n=[200], n_features=nf, ridge=grid,
                                              noise_var=noise, seeds=seeds), repeat=1)
    best_sim = sim.test_error.mean("seed").min("ridge")
    err = float(np.abs(best_sim / th.test_error - 1).mean())
    rows.append(("optimal-ridge envelope, 8 N_f (sim: 16 ridges)", t_th, t_sim, err))

    print(f"spectrum: {args.modes} modes, λ_i = v_i² = i^-1.5, σ² = {noise}; "
          f"simulations: {args.seeds} seeds (float64, torch CPU)")
    header = ("case", "theory s", "sim s", "sim/theory", "mean |rel diff|")
    print(f"{header[0]:48s} {header[1]:>9s} {header[2]:>8s} {header[3]:>11s} {header[4]:>16s}")
    for name, t_th, t_sim, err in rows:
        print(f"{name:48s} {t_th:9.4f} {t_sim:8.2f} {t_sim / t_th:11.0f} {err:16.3f}")

    # theory alone at a size no simulation reaches: 10⁶ modes, 30 × 10 grid
    big = power_law_spectrum(10**6, a=1.5, b=1.5)
    t_big, _ = best_of(lambda: krr_learning_curve(big, n=np.geomspace(10, 1e5, 30),
                                                   ridge=np.logspace(-8, 0, 10)), repeat=1)
    print(f"theory only: KRR curve with 10^6 modes over a 30 n x 10 ridge grid: {t_big:.2f} s")


if __name__ == "__main__":
    main()
