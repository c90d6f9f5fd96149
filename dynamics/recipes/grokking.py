"""Grokking as the transition from lazy to rich training (Kumar, Bordelon, Gershman & Pehlevan,
ICLR 2024, Sec. 5): a two-layer polynomial network on a quadratic target.

Model and training (the paper's Sec. 5 setting, our normalisations stated)::

    x ~ N(0, I_D),   y(x) = (β·x)²/2,  ‖β‖ = 1,
    f(x) = α (1/N) Σ_i φ(w_i·x) − f_init(x),   φ(z) = z + (ε/2) z²,   w_i(0) ~ N(0, I_D/D),
    w_i ← w_i − η (N/α²) ∇_{w_i} L,   L = (1/(2P)) Σ_μ (f(x_μ) − y_μ)²,

i.e. the loss divided by ``α²`` and the step scaled by ``N`` (Kumar et al. 2024, Sec. 5), so
``df/dt = O(1)`` for every ``α`` and the weights move by ``O(1/α)``: large ``α`` is lazy.
``time = η × step``.  With the readouts fixed the network is ``α m·x + (αε/2) xᵀMx`` with
``m = (1/N) Σ w_i``, ``M = (1/N) Σ w_i w_iᵀ`` (Kumar et al. 2024, Eq. 7), and the population
test loss is an exact function of four statistics (with ``b = α(m − m₀)``,
``A = αε(M − M₀) − ββᵀ``; Isserlis' theorem)::

    E_x[(f − y)²] = ‖b‖² + (tr A)²/4 + ‖A‖_F²/2,
    tr A = αε tr(M−M₀) − 1,   ‖A‖_F² = α²ε²‖M−M₀‖_F² − 2αε βᵀ(M−M₀)β + 1.

Recorded through :class:`dynamics.Monitor` on a log-spaced schedule: ``train_loss``,
``test_loss`` (mean squared errors on the training set and on ``n_test`` fresh points),
``test_loss_population`` (the formula above), the statistics ``m_drift_sq`` (‖m−m₀‖²),
``M_drift_trace`` (tr(M−M₀)), ``M_drift_beta`` (βᵀ(M−M₀)β), ``M_drift_fro`` (‖M−M₀‖_F),
the NTK probe (``probes.empirical_ntk`` → ``ntk_alignment``, ``ntk_centered_alignment`` …
against the labels of the first ``ntk_samples`` training points) and ``rankme`` of the hidden
layer ``act`` (``φ(Wx)`` on those points).

All (α, seed) networks train together as one tensor of first-layer weights ``(A, S, N, D)``
(batched matrix products, the closed-form gradient); ``vectorize=False`` trains them one after
the other with autograd, and the two agree to round-off.  ``traindyn.theory.rich_grokking``
follows the same gradient descent through ``(m, M)`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics import records
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import at_steps, log_steps

__all__ = ["GrokkingNet", "GROKKING_VARIABLES", "grokking_task", "population_test_loss",
           "train_grokking"]

_SOURCE = ("traindyn recipe grokking (Kumar, Bordelon, Gershman & Pehlevan, ICLR 2024, "
           "Sec. 5: polynomial two-layer network, quadratic target)")

GROKKING_VARIABLES: dict[str, dict[str, str]] = {
    "test_loss_population": {"long_name": "population test loss E_x[(f − y)²] from the "
                                          "sufficient statistics", "units": "1"},
    "m_drift_sq": {"long_name": "‖m − m₀‖², m = mean first-layer weight", "units": "1"},
    "M_drift_trace": {"long_name": "tr(M − M₀), M = (1/N) Σ w wᵀ", "units": "1"},
    "M_drift_beta": {"long_name": "βᵀ(M − M₀)β", "units": "1"},
    "M_drift_fro": {"long_name": "‖M − M₀‖_F", "units": "1"},
}
"""Variables this recipe adds to ``records.VARIABLES`` (its documented extension point)."""
for _name, _attrs in GROKKING_VARIABLES.items():
    records.VARIABLES.setdefault(_name, dict(_attrs))

_MSE = {"train_loss": "training loss, mean squared error (1/P) Σ (f − y)²",
        "test_loss": "test loss, mean squared error on fresh points"}


class _Poly(nn.Module):
    def __init__(self, epsilon: float) -> None:
        super().__init__()
        self.epsilon = float(epsilon)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + 0.5 * self.epsilon * z**2


class GrokkingNet(nn.Module):
    """``f(x) = α (1/N) Σ_i φ(w_i·x) − f_init(x)``; the hidden layer is the module ``act``."""

    def __init__(self, dim: int, width: int, alpha: float, epsilon: float = 0.02,
                 seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be > 0; got {alpha}")
        g = torch.Generator().manual_seed(int(seed))
        self.linear = nn.Linear(dim, width, bias=False, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(width, dim, generator=g, dtype=dtype)
                                     / np.sqrt(dim))
        self.register_buffer("weight0", self.linear.weight.detach().clone())
        self.act = _Poly(epsilon)
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.linear(x)).mean(-1)
        # φ of the frozen initial network by ``forward``, not a second call of the module
        # ``act``: a probe on ``act`` sees the trained hidden layer only
        init = self.act.forward(x @ self.weight0.T).mean(-1)
        return self.alpha * (out - init)

    @torch.no_grad()
    def statistics(self, beta: torch.Tensor) -> dict[str, float]:
        """``‖m−m₀‖²``, ``tr(M−M₀)``, ``βᵀ(M−M₀)β``, ``‖M−M₀‖_F`` of the first-layer weights."""
        w, w0 = self.linear.weight, self.weight0
        n = w.shape[0]
        dm = w.mean(0) - w0.mean(0)
        dM = (w.T @ w - w0.T @ w0) / n
        return {"m_drift_sq": float(dm @ dm), "M_drift_trace": float(torch.trace(dM)),
                "M_drift_beta": float(beta @ dM @ beta),
                "M_drift_fro": float(torch.linalg.matrix_norm(dM))}


def population_test_loss(stats: dict[str, float], alpha: float, epsilon: float) -> float:
    """``E_x[(f − y)²]`` for ``x ~ N(0, I)``, ``‖β‖ = 1``, from the four statistics
    (Kumar et al. 2024, Sec. 5; Isserlis' theorem, see the module docstring)."""
    ae = alpha * epsilon
    tr_a = ae * stats["M_drift_trace"] - 1.0
    fro_a = ae**2 * stats["M_drift_fro"] ** 2 - 2 * ae * stats["M_drift_beta"] + 1.0
    return alpha**2 * stats["m_drift_sq"] + 0.25 * tr_a**2 + 0.5 * fro_a


def grokking_task(n_train: int = 550, n_test: int = 1000, dim: int = 100, seed: int = 0,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x ~ N(0, I_D)``, ``y = (β·x)²/2`` with a random unit ``β``: returns
    ``(x_train, y_train, x_test, y_test, beta)`` (float64)."""
    if n_train < 1 or n_test < 1 or dim < 1:
        raise ValueError("n_train, n_test and dim must be >= 1")
    rng = np.random.default_rng(seed)
    beta = rng.standard_normal(dim)
    beta /= np.linalg.norm(beta)
    x = rng.standard_normal((n_train + n_test, dim))
    y = 0.5 * (x @ beta) ** 2
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], beta


def _one_run(x, y, xt, yt, beta, width, alpha, epsilon, lr, steps, schedule, seed,
             ntk_samples, device, dtype) -> xr.Dataset:
    dev = torch.device(device)
    net = GrokkingNet(x.shape[1], width, alpha, epsilon, seed, dtype).to(dev)
    X, Y = (torch.as_tensor(a, dtype=dtype, device=dev) for a in (x, y))
    Xt, Yt = (torch.as_tensor(a, dtype=dtype, device=dev) for a in (xt, yt))
    b = torch.as_tensor(beta, dtype=dtype, device=dev)
    step_size = lr * width / alpha**2
    monitor = Monitor(net, probes=["ntk", "rankme"],
                      layers=["act"], schedule=schedule, probe_data=X[:ntk_samples],
                      probe_labels=Y[:ntk_samples], learning_rate=lr, seed=int(seed),
                      source=_SOURCE)
    with monitor:
        for step in range(steps + 1):
            f = net(X)
            loss = 0.5 * ((f - Y) ** 2).mean()
            if schedule(step):
                with torch.no_grad():
                    stats = net.statistics(b)
                    monitor.step(step, train_loss=float(2 * loss),
                                 test_loss=float(((net(Xt) - Yt) ** 2).mean()),
                                 test_loss_population=population_test_loss(stats, alpha,
                                                                           epsilon),
                                 **stats)
            if step == steps:
                break
            (grad,) = torch.autograd.grad(loss, [net.linear.weight])
            with torch.no_grad():
                net.linear.weight -= step_size * grad
        ds = monitor.to_dataset()
    for name, long_name in _MSE.items():
        ds[name].attrs.update(long_name=long_name, units="1")
    return ds


def _batched_runs(x, y, xt, yt, beta, width, alphas, epsilon, lr, steps, eval_steps, seeds,
                  ntk_samples, device, dtype) -> list[list[xr.Dataset]]:
    """Every (α, seed) network trained at once: first-layer weights ``(A, S, N, D)``.

    One step is the per-network step of :func:`_one_run` for each (α, seed): the gradient of
    ``L`` with respect to ``w_i`` is ``(α/(NP)) Σ_μ r_μ φ'(w_i·x_μ) x_μ`` (``r = f − y``,
    ``φ'(h) = 1 + εh``), applied with the step ``η N/α²`` of its own α.  Each (α, seed) keeps a
    :class:`GrokkingNet` and a :class:`Monitor`; at the recorded steps its weights are copied
    into that network and the Monitor evaluates it as in the per-network loop.
    """
    dev = torch.device(device)
    dim = x.shape[1]
    nets = [[GrokkingNet(dim, width, float(a), epsilon, s, dtype).to(dev) for s in seeds]
            for a in alphas]
    w = torch.stack([torch.stack([n.linear.weight.detach().clone() for n in row])
                     for row in nets])                                 # (A, S, N, D)
    X, Y = (torch.as_tensor(a, dtype=dtype, device=dev) for a in (x, y))
    Xt, Yt = (torch.as_tensor(a, dtype=dtype, device=dev) for a in (xt, yt))
    b = torch.as_tensor(beta, dtype=dtype, device=dev)
    alpha_t = torch.as_tensor(np.asarray(alphas, dtype=float), dtype=dtype, device=dev)
    scale = alpha_t.view(-1, 1, 1)                                     # α, for (A, S, P)
    step_size = (lr * width / alpha_t**2).view(-1, 1, 1, 1)            # η N/α², (A, S, N, D)
    eps = float(epsilon)

    def hidden_mean(weights: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(weights, inputs.T)                             # (A, S, N, n)
        return (h + 0.5 * eps * h * h).mean(-2)

    init_train, init_test = hidden_mean(w, X), hidden_mean(w, Xt)
    schedule = at_steps(eval_steps)
    monitors = [[Monitor(n, probes=["ntk", "rankme"], layers=["act"], schedule=schedule,
                         probe_data=X[:ntk_samples], probe_labels=Y[:ntk_samples],
                         learning_rate=lr, seed=int(s), source=_SOURCE)
                 for n, s in zip(row, seeds, strict=True)] for row in nets]
    try:
        for step in range(steps + 1):
            h = torch.matmul(w, X.T)                                    # (A, S, N, P)
            f = scale * ((h + 0.5 * eps * h * h).mean(-2) - init_train)  # (A, S, P)
            r = f - Y
            if schedule(step):
                f_test = scale * (hidden_mean(w, Xt) - init_test)
                train_loss = (r * r).mean(-1)
                test_loss = ((f_test - Yt) ** 2).mean(-1)
                for i, row in enumerate(nets):
                    for j, net in enumerate(row):
                        with torch.no_grad():
                            net.linear.weight.copy_(w[i, j])
                        stats = net.statistics(b)
                        monitors[i][j].step(
                            step, train_loss=float(train_loss[i, j]),
                            test_loss=float(test_loss[i, j]),
                            test_loss_population=population_test_loss(
                                stats, float(alphas[i]), eps), **stats)
            if step == steps:
                break
            # ∂L/∂w_i = (α/(N P)) Σ_μ r_μ (1 + ε h_iμ) x_μ
            coef = (1.0 + eps * h) * (r * scale / (width * X.shape[0])).unsqueeze(-2)
            w = w - step_size * torch.matmul(coef, X)
        out = [[mon.to_dataset() for mon in row] for row in monitors]
    finally:
        for row in monitors:
            for mon in row:
                mon.close()
    for ds in (d for row in out for d in row):
        for name, long_name in _MSE.items():
            ds[name].attrs.update(long_name=long_name, units="1")
    return out


def train_grokking(
    alpha: Sequence[float] = (1.0,),
    n_train: int = 550,
    n_test: int = 1000,
    dim: int = 100,
    width: int = 500,
    epsilon: float = 0.02,
    learning_rate: float = 0.5,
    steps: int = 20_000,
    n_evals: int = 40,
    seeds: Sequence[int] = (0,),
    data_seed: int = 0,
    ntk_samples: int = 128,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    vectorize: bool = True,
) -> xr.Dataset:
    """Train the grokking model for each ``alpha`` and seed; the standard Dataset.

    Parameters
    ----------
    alpha : sequence of float
        Output scales (laziness): large ``α`` starts lazy, small ``α`` rich.
    n_train, n_test, dim, width, epsilon
        ``P``, the fresh test points, ``D``, ``N`` and ``ε`` (paper's Fig. 1: 550, –, 100,
        500, 0.02).
    learning_rate : float
        ``η``; the step applied to the weights is ``η N/α²`` times the gradient of ``L``.
        Gradient descent is stable for ``η λ_max(K/P) < 2`` with ``K ≈ XXᵀ``: about
        ``η < 2P/(√P + √D)²`` (≈ 0.98 at the paper's sizes).
    steps, n_evals : int
        Training steps; evaluations at ``n_evals`` log-spaced steps (0 and ``steps`` included).
    seeds : sequence of int
        Initialisation seeds (the data are fixed by ``data_seed``).
    ntk_samples : int
        Training points on which the NTK probe and RankMe are evaluated.
    device, dtype
        Torch device (``"cpu"``, ``"cuda"``) and dtype.
    vectorize : bool
        Train every (α, seed) network at once, as one tensor of first-layer weights
        ``(A, S, N, D)`` with batched matrix products (default), or one network after the
        other (autograd on each :class:`GrokkingNet`).  Both apply the same gradient-descent
        step to each network; they agree to round-off.

    Returns
    -------
    xarray.Dataset
        Over (``alpha``, ``seed``, ``step``; ``layer`` for ``rankme``) with ``time = η × step``.
    """
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1; got {n_train}")
    if learning_rate <= 0 or steps < 1 or n_evals < 2:
        raise ValueError("learning_rate > 0, steps >= 1 and n_evals >= 2 are needed")
    x, y, xt, yt, beta = grokking_task(n_train, n_test, dim, data_seed)
    eval_steps = np.unique(np.concatenate([[0], log_steps(steps, n_evals), [steps]]))
    if vectorize:
        grid = _batched_runs(x, y, xt, yt, beta, width, [float(a) for a in alpha], epsilon,
                             learning_rate, steps, eval_steps, list(seeds),
                             min(ntk_samples, n_train), device, dtype)
    else:
        grid = [[_one_run(x, y, xt, yt, beta, width, float(a), epsilon, learning_rate,
                          steps, at_steps(eval_steps), s, min(ntk_samples, n_train),
                          device, dtype) for s in seeds] for a in alpha]
    runs = [xr.concat(per_seed, dim="seed", combine_attrs="override") for per_seed in grid]
    ds = xr.concat(runs, dim=xr.DataArray(np.asarray(alpha, dtype=float), dims="alpha",
                                          attrs={"long_name": "output scale α (laziness)",
                                                 "units": "1"}),
                   combine_attrs="override")
    ds.attrs.update(kind="measurement", source=_SOURCE, parameters=records.params_attr(dict(
        alpha=list(map(float, alpha)), n_train=n_train, n_test=n_test, dim=dim, width=width,
        epsilon=epsilon, learning_rate=learning_rate, steps=steps, data_seed=data_seed,
        ntk_samples=ntk_samples, device=str(device))),
        time_convention="time = learning_rate × step; weight step η N/α² × ∇L")
    for key in ("monitor_seconds", "monitor_seconds_storing"):
        ds.attrs.pop(key, None)
    return ds
