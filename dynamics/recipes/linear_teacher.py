r"""Simulation of the linear student–teacher of Advani & Saxe (2017), trained by gradient descent.

The finite-size experiment that ``theory.linear.advani_saxe`` predicts: draw ``X``, a teacher,
label noise and an initial student, run full-batch gradient descent with learning rate ``η``
and record the training error and the exact test error ``σ_ε² + ‖w − w̄‖²/N`` (the expectation
over a fresh input ``x ~ N(0, I/N)``, so no finite test set adds noise) at chosen steps.
Seeds are simulated together as a batch.

Gradient descent on ``½‖y − Xᵀw‖²`` is the linear map ``w ← w + η(Xy − A w)``, ``A = XXᵀ``; in
the eigenbasis ``A = U Λ Uᵀ`` of *this* draw of ``X`` its ``k``-th iterate is exact in closed
form (each mode ``i`` relaxes independently; Advani & Saxe 2017, Eq. 7, before the
``N → ∞`` limit the theory takes):

.. math:: Uᵀw_k = (1-ηλ_i)^k\,Uᵀw_0 + \frac{1-(1-ηλ_i)^k}{λ_i}\,UᵀXy ,

with ``(1 − (1−ηλ)^k)/λ → kη`` as ``λ → 0``.  ``method="eigen"`` (default) evaluates it at the
recorded steps only — one ``N × N`` eigendecomposition per seed instead of ``k`` matrix-vector
products — and ``method="loop"`` runs the iteration step by step; they agree to float64
round-off (tested), so the finite-size experiment is the same, only cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from traindyn.dynamics import records

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
    method: str = "eigen",
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
    method : {"eigen", "loop"}
        The gradient-descent iterates in closed form from the eigendecomposition of ``XXᵀ``
        (module docstring), or by running the steps one by one.

    Returns
    -------
    xarray.Dataset
        ``test_error`` and ``train_error`` over ``(load_ratio, seed, step)`` with ``time``.
    """
    if method not in ("eigen", "loop"):
        raise ValueError(f"method must be 'eigen' or 'loop'; got {method!r}")
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
        iterates = (_iterates_eigen if method == "eigen" else _iterates_loop)(
            xxt, xy, w, steps, learning_rate)
        for record, w in enumerate(iterates):
            resid = y - torch.einsum("snp,sn->sp", x, w)
            train[a_idx, :, record] = (resid**2).mean(1).numpy()
            test[a_idx, :, record] = (noise_var + ((w - w_bar) ** 2).sum(1) / n).numpy()
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


def _iterates_loop(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, steps: np.ndarray,
                   lr: float) -> list[torch.Tensor]:
    """``w_k`` at ``steps`` by ``w ← w + η(b − A w)``, one step at a time (batched seeds)."""
    out, k = [], 0
    for target in steps:
        while k < target:
            w = w + lr * (b - torch.einsum("snm,sm->sn", a, w))
            k += 1
        out.append(w)
    return out


def _iterates_eigen(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, steps: np.ndarray,
                    lr: float) -> list[torch.Tensor]:
    """``w_k`` at ``steps`` in closed form from ``A = UΛUᵀ`` (module docstring)."""
    lam, u = torch.linalg.eigh(a)                     # (seed, N), (seed, N, N)
    c0 = torch.einsum("snm,sn->sm", u, w)             # Uᵀw₀
    cb = torch.einsum("snm,sn->sm", u, b)             # UᵀXy
    log_decay = torch.log1p(-lr * lam)                # ln(1 − ηλ), finite: ηλ < 2 (checked)
    out = []
    for k in steps:
        decay = torch.exp(k * log_decay)
        # (1 − (1−ηλ)^k)/λ, written with expm1 so that λ → 0 gives kη without cancellation
        small = lam.abs() < 1e-300
        gain = torch.where(small, torch.full_like(lam, float(k) * lr),
                           -torch.expm1(k * log_decay) / torch.where(small, 1.0, lam))
        out.append(torch.einsum("snm,sm->sn", u, decay * c0 + gain * cb))
    return out

