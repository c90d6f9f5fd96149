"""Simulation of the linear student–teacher of Advani & Saxe (2017), trained by gradient descent.

The finite-size experiment that ``theory.linear.advani_saxe`` predicts: draw ``X``, a teacher,
label noise and an initial student, run full-batch gradient descent with learning rate ``η``
and record the training error and the exact test error ``σ_ε² + ‖w − w̄‖²/N`` (the expectation
over a fresh input ``x ~ N(0, I/N)``, so no finite test set adds noise) at chosen steps.
Seeds are simulated together as a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from dynamics import records

__all__ = ["simulate_linear_teacher"]


def simulate_linear_teacher(
    n_features: int = 300,
    load_ratios: Sequence[float] = (0.5, 2.0),
    steps: Sequence[int] | np.ndarray = (0, 10, 100, 1000),
    learning_rate: float = 0.05,
    noise_var: float = 0.25,
    teacher_var: float = 1.0,
    init_var: float = 0.0,
    seeds: Sequence[int] = (0, 1, 2, 3),
) -> xr.Dataset:
    """Train linear students by gradient descent on ``½‖y − Xᵀw‖²`` and record their errors.

    Parameters
    ----------
    n_features : int
        ``N``; each load ratio ``α`` uses ``P = round(αN)`` samples.
    steps : sequence of int
        Steps at which to record (``time = learning_rate × step``).
    learning_rate, noise_var, teacher_var, init_var : float
        ``η``, ``σ_ε²``, ``σ_w̄²``, ``σ_w0²`` as in ``theory.linear.advani_saxe``.
    seeds : sequence of int
        One independent draw of data, teacher, noise and initialisation per seed.

    Returns
    -------
    xarray.Dataset
        ``test_error`` and ``train_error`` over ``(load_ratio, seed, step)`` with ``time``.
    """
    steps = np.unique(np.asarray(steps, dtype=np.int64))
    if steps[0] < 0:
        raise ValueError("steps must be non-negative")
    n = n_features
    test = np.empty((len(load_ratios), len(seeds), len(steps)))
    train = np.empty_like(test)
    for a_idx, ratio in enumerate(load_ratios):
        p = max(1, int(round(ratio * n)))
        if learning_rate * (1 + np.sqrt(p / n)) ** 2 >= 2:
            raise ValueError(f"learning rate {learning_rate} is unstable at α = {ratio}")
        xs, w_bar, eps, w0 = [], [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + a_idx)
            xs.append(torch.randn(n, p, generator=g, dtype=torch.float64) / np.sqrt(n))
            w_bar.append(torch.randn(n, generator=g, dtype=torch.float64) * np.sqrt(teacher_var))
            eps.append(torch.randn(p, generator=g, dtype=torch.float64) * np.sqrt(noise_var))
            w0.append(torch.randn(n, generator=g, dtype=torch.float64) * np.sqrt(init_var))
        x, w_bar, eps, w = torch.stack(xs), torch.stack(w_bar), torch.stack(eps), torch.stack(w0)
        y = torch.einsum("snp,sn->sp", x, w_bar) + eps
        xxt = x @ x.transpose(1, 2)                       # (seed, N, N)
        xy = torch.einsum("snp,sp->sn", x, y)
        k, record = 0, 0
        while record < len(steps):
            if k == steps[record]:
                resid = y - torch.einsum("snp,sn->sp", x, w)
                train[a_idx, :, record] = (resid**2).mean(1).numpy()
                test[a_idx, :, record] = (noise_var + ((w - w_bar) ** 2).sum(1) / n).numpy()
                record += 1
                continue
            w = w + learning_rate * (xy - torch.einsum("snm,sm->sn", xxt, w))
            k += 1
    dims = ("load_ratio", "seed", "step")
    ds = xr.Dataset(
        {
            "test_error": (dims, test, records.variable_attrs("test_error")),
            "train_error": (dims, train, records.variable_attrs("train_error")),
        },
        coords={
            **records.step_coords(steps, learning_rate),
            "load_ratio": ("load_ratio", np.asarray(load_ratios, dtype=float),
                           {"long_name": records.DIMS["load_ratio"], "units": "1"}),
            "seed": ("seed", np.asarray(seeds)),
        },
        attrs={
            "kind": "measurement",
            "source": "traindyn recipe linear_teacher (setup of Advani & Saxe 2017)",
            "parameters": records.params_attr(
                dict(n_features=n, learning_rate=learning_rate, noise_var=noise_var,
                     teacher_var=teacher_var, init_var=init_var)),
        },
    )
    return ds
