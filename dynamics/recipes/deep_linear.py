"""A deep linear network trained on a task with a known input–output SVD (Saxe et al. 2014).

The experiment that ``theory.deep_linear`` predicts: inputs are whitened (``Σ^{xx} = I``
exactly), targets are ``y = U S Vᵀ x`` for random orthogonal ``U``, ``V`` and chosen singular
values ``S``; a linear network ``W_D ⋯ W_1`` starts from small random weights and is trained by
full-batch gradient descent on ``½ mean_μ ‖y_μ − W x_μ‖²``.  At each recorded step the strength
of every mode, ``u_α = u_αᵀ W_D⋯W_1 v_α``, is read off the composite map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from traindyn.dynamics import records

__all__ = ["svd_task", "train_deep_linear"]


def svd_task(singular_values: Sequence[float], n_in: int, n_out: int, seed: int = 0):
    """Whitened inputs and targets with input–output correlation ``Σ^{yx} = U diag(s) Vᵀ``.

    Returns ``(x, y, u, v)``: ``x`` of shape ``(P, n_in)`` with ``P = n_in`` and
    ``xᵀx / P = I``; ``y = x V S Uᵀ`` (rows are samples); ``u`` (``n_out × modes``) and ``v``
    (``n_in × modes``) hold the singular vectors as columns (float64).
    """
    sv = np.asarray(singular_values, dtype=float)
    k = len(sv)
    if k > min(n_in, n_out):
        raise ValueError(f"{k} singular values need n_in, n_out >= {k}")
    if np.any(np.diff(sv) > 0) or np.any(sv <= 0):
        raise ValueError("singular values must be positive and in descending order")
    g = torch.Generator().manual_seed(seed)
    q_in, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    q_out, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64))
    q_x, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    u, v = q_out[:, :k], q_in[:, :k]
    x = np.sqrt(n_in) * q_x                      # P = n_in samples, xᵀx/P = I
    sigma_yx = u @ torch.diag(torch.as_tensor(sv)) @ v.T
    y = x @ sigma_yx.T
    return x, y, u, v


def train_deep_linear(
    singular_values: Sequence[float] = (3.0, 2.0, 1.0, 0.5),
    n_in: int = 8,
    n_out: int = 8,
    hidden: int = 16,
    depth: int = 2,
    init_scale: float = 1e-3,
    learning_rate: float = 0.005,
    steps: int = 3000,
    record_every: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> xr.Dataset:
    """Train ``W_D⋯W_1`` by full-batch gradient descent and record every mode's strength.

    Parameters
    ----------
    singular_values : sequence of float
        ``s_α`` of the task, descending.
    n_in, n_out, hidden : int
        Input, output and hidden widths.
    depth : int
        Number of weight matrices ``D`` (``D = 2``: one hidden layer).
    init_scale : float
        Weights start i.i.d. ``N(0, init_scale²)``: small, so the dynamics are sigmoidal.
    learning_rate, steps, record_every : float, int, int
        Gradient-descent step ``η``; ``time = η × step`` matches the theory's ``τ = 1``.
    seed : int
        Seed of the task and of the initialisation.

    Returns
    -------
    xarray.Dataset
        ``mode_strength`` over ``(step, mode)``, ``train_error`` (mean over samples of
        ``‖y − ŷ‖²``) over ``step``, coordinates ``time`` and ``singular_value`` (on ``mode``).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    dev = torch.device(device)
    x, y, u, v = (a.to(dev) for a in svd_task(singular_values, n_in, n_out, seed))
    g = torch.Generator().manual_seed(seed + 1)
    widths = [n_in] + [hidden] * (depth - 1) + [n_out]
    weights = [
        (init_scale * torch.randn(widths[i + 1], widths[i], generator=g, dtype=torch.float64))
        .to(dev).requires_grad_(True)
        for i in range(depth)
    ]
    record = np.arange(0, steps + 1, record_every)
    strengths = np.empty((len(record), len(singular_values)))
    errors = np.empty(len(record))
    r = 0
    for step in range(steps + 1):
        total = weights[0]
        for w in weights[1:]:
            total = w @ total
        resid = y - x @ total.T
        loss = 0.5 * (resid**2).sum(1).mean()
        if r < len(record) and step == record[r]:
            with torch.no_grad():
                strengths[r] = torch.einsum("ik,ij,jk->k", u, total, v).cpu().numpy()
                errors[r] = float(2 * loss)
            r += 1
        if step == steps:
            break
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, gw in zip(weights, grads, strict=True):
                w -= learning_rate * gw
    sv = np.asarray(singular_values, dtype=float)
    return xr.Dataset(
        {
            "mode_strength": (("step", "mode"), strengths, {
                "long_name": "strength u_α = u_αᵀ W_D⋯W_1 v_α of input–output mode α",
                "units": "1"}),
            "train_error": ("step", errors, records.variable_attrs(
                "train_error", long_name="training squared error, mean over samples")),
        },
        coords={
            **records.step_coords(record, learning_rate),
            "mode": ("mode", np.arange(len(sv))),
            "singular_value": ("mode", sv, {"long_name": "singular value s_α of Σ^yx",
                                            "units": "1"}),
        },
        attrs={
            "kind": "measurement",
            "source": "traindyn recipe deep_linear (task of Saxe, McClelland & Ganguli 2014)",
            "parameters": records.params_attr(dict(
                singular_values=list(sv), n_in=n_in, n_out=n_out, hidden=hidden, depth=depth,
                init_scale=init_scale, learning_rate=learning_rate, steps=steps, seed=seed)),
        },
    )
