r"""Eigenlearning on your own data: the learning curve predicted from a network's measured NTK.

The kernel is the empirical NTK of the network *at initialisation* on a pool of ``P`` inputs
(scikit-learn's digits, the population of Canatar, Bordelon & Pehlevan 2021, Methods:
``theory.spectrum_from_gram``); the theory is kernel ridge regression's learning curve from that
spectrum (``theory.krr_learning_curve``: Bordelon, Canatar & Pehlevan 2020; Simon et al. 2021,
eigenlearning equations).  Beside it:

* the *network* trained by full-batch gradient descent on ``n`` points drawn from the pool
  (``F.mse_loss`` on centred one-hot targets), its test error over all ``P`` points;
* kernel regression with the same measured kernel on the same ``n`` points
  (:func:`recipes.kernel_regression.simulate_digits_krr`);
* the network's own linearised prediction after the same number of steps
  (``theory.kernel_flow`` with the step-0 kernel).

The network is centred, ``g(x) = f_θ(x) − f_{θ₀}(x)`` (a frozen copy of the initial network is
subtracted), so it starts from zero output as the theory's predictor does; its NTK is the
network's own.  Gradient descent stopped after ``s`` steps acts as a ridge: mode ``λ`` of the
training Gram matrix is fitted by ``1 − (1 − ηλ/c)^s ≈ λ/(λ + c/(ηs))``, so the theory line
is drawn at the equivalent ridge ``δ = c/(η s)`` (Ali, Kolter & Tibshirani 2019, AISTATS,
gradient flow time ``t`` ↔ ridge ``1/t``) as well as ridgeless (``s → ∞``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics import records
from traindyn.dynamics.recipes.digits import DigitsMLP

__all__ = ["Centred", "digits_eigenlearning", "digits_pool"]

SOURCE = ("traindyn recipe eigenlearning.digits_eigenlearning: empirical NTK at initialisation "
          "on scikit-learn digits; theory.krr_learning_curve (Simon et al. 2021; Canatar, "
          "Bordelon & Pehlevan 2021) and theory.kernel_flow (Lee et al. 2019)")


class Centred(nn.Module):
    """``g(x) = f_θ(x) − f_{θ₀}(x)``: the network minus a frozen copy of itself at ``θ₀``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.initial = copy.deepcopy(net)
        for p in self.initial.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) - self.initial(x)


def digits_pool(pool: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standardised digits inputs (constant pixels dropped) and centred one-hot targets, as in
    :func:`recipes.kernel_regression.digits_kernel`; ``pool`` points of a fixed permutation
    (default all 1797)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(float)
    x = x[:, x.std(0) > 0]
    x = (x - x.mean(0)) / x.std(0)
    onehot = np.eye(10)[data.target]
    y = onehot - onehot.mean(0)
    if pool is not None:
        if not 1 <= pool <= len(x):
            raise ValueError(f"pool must be between 1 and {len(x)}; got {pool}")
        idx = np.random.default_rng(seed).permutation(len(x))[:pool]
        x, y = x[idx], y[idx]
    return x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def digits_eigenlearning(
    n: Sequence[int] = (25, 50, 100, 200, 400),
    seeds: Sequence[int] = (0, 1),
    widths: Sequence[int] = (512,),
    pool: int | None = None,
    steps: int = 2000,
    lr_fraction: float = 0.5,
    init_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    n_modes_out: int = 50,
) -> tuple[xr.Dataset, xr.Dataset]:
    r"""Measured and predicted learning curves of a digits MLP from its NTK at initialisation.

    Parameters
    ----------
    n : sequence of int
        Training-set sizes; the ``n`` points are the first ``n`` of a permutation of the pool
        drawn per seed (nested along ``n``, without replacement, as
        :func:`recipes.kernel_regression.simulate_digits_krr`).
    seeds : sequence of int
        Draws of the training points (the network's initialisation is fixed by ``init_seed``,
        so every run shares the measured kernel).
    widths : hidden widths of :class:`recipes.digits.DigitsMLP`.
    pool : int, optional
        Size ``P`` of the population (default all 1797 digits); test errors are over all ``P``.
    steps : int
        Full-batch gradient-descent steps per network.
    lr_fraction : float
        Learning rate as a fraction of the largest stable one, ``η = lr_fraction · 2c/λ_max``
        of the training Gram matrix (``c = n·k/2`` for ``F.mse_loss``).

    Returns
    -------
    (measured, predicted) : two xarray.Datasets over ``n`` (and ``seed``)
        ``measured``: ``test_error`` and ``train_error`` of the trained network, and
        ``kernel_test_error`` (ridgeless kernel regression with the measured NTK on the same
        points), over (``n``, ``seed``); ``learning_rate`` used.  ``predicted``:
        ``test_error`` (eigenlearning at the early-stopping ridge ``δ = c/(ηs)``, averaged over
        seeds' ``η``), ``test_error_ridgeless``, ``ridge`` over ``n``, and
        ``linearised_test_error`` (``theory.kernel_flow`` after ``steps`` steps) over
        (``n``, ``seed``).  Errors are mean squared errors over all ``P × 10`` entries (the mean
        over outputs that ``spectrum_from_gram``'s theory predicts).
    """
    from traindyn.dynamics.recipes.kernel_regression import simulate_digits_krr
    from traindyn.probes.ntk import empirical_ntk

    from traindyn import theory

    x_np, y_np = digits_pool(pool)
    P, k = y_np.shape
    n_arr = np.asarray(n, dtype=np.int64)
    if n_arr.ndim != 1 or n_arr.size == 0 or n_arr.min() < 1 or n_arr.max() > P:
        raise ValueError(f"n must be sizes between 1 and the pool size {P}; got {n}")
    x = torch.as_tensor(x_np, dtype=dtype)
    y = torch.as_tensor(y_np, dtype=dtype)
    torch.manual_seed(init_seed)
    model0 = Centred(DigitsMLP(widths, n_in=x.shape[1], n_out=k).to(dtype))
    gram = empirical_ntk(model0, x, output="mean").detach().to(torch.float64).numpy()
    gram = 0.5 * (gram + gram.T)
    spectrum = theory.spectrum_from_gram(gram, y_np)
    kernel = simulate_digits_krr(n=n_arr, ridge=(0.0,), seeds=seeds, gram=gram, targets=y_np)

    shape = (n_arr.size, len(seeds))
    test, train, lin, lrs, ridge = (np.empty(shape) for _ in range(5))
    for s_i, seed in enumerate(seeds):
        perm = np.random.default_rng(int(seed)).permutation(P)[: int(n_arr.max())]
        for n_i, m in enumerate(n_arr):
            idx = perm[:m]
            K_n = gram[np.ix_(idx, idx)]
            c = m * k / 2.0
            lr = lr_fraction * 2 * c / float(np.linalg.eigvalsh(K_n).max())
            net = copy.deepcopy(model0)
            _train(net, x[idx], y[idx], lr, steps)
            with torch.no_grad():
                out = net(x).to(torch.float64).numpy()
            test[n_i, s_i] = ((out - y_np) ** 2).mean()
            train[n_i, s_i] = ((out[idx] - y_np[idx]) ** 2).mean()
            pred = theory.kernel_flow(K_n, y_np[idx], [steps], lr, kernel_test_train=gram[:, idx],
                                      targets_test=y_np, normalization=c)
            lin[n_i, s_i] = float(pred.test_loss.values[0])
            lrs[n_i, s_i], ridge[n_i, s_i] = lr, c / (lr * steps)

    ridge_n = ridge.mean(1)
    early = np.array([float(theory.krr_learning_curve(spectrum, n=float(m), ridge=float(r),
                                                      n_modes_out=0).test_error)
                      for m, r in zip(n_arr, ridge_n, strict=True)])
    ridgeless = theory.krr_learning_curve(spectrum, n=n_arr.astype(float), ridge=0.0,
                                          n_modes_out=n_modes_out)
    coords = {"n": ("n", n_arr, {"long_name": records.DIMS["n"], "units": "1"}),
              "seed": ("seed", np.asarray(seeds), {"long_name": records.DIMS["seed"],
                                                   "units": "1"})}
    params = dict(n=n_arr, seeds=list(seeds), widths=list(widths), P=P, steps=steps,
                  lr_fraction=lr_fraction, init_seed=init_seed, dtype=str(dtype))
    err = "mean squared error over all P points and 10 centred one-hot outputs"
    measured = xr.Dataset(
        {"test_error": (("n", "seed"), test, records.variable_attrs(
            "test_error", long_name=f"network test error: {err}")),
         "train_error": (("n", "seed"), train, records.variable_attrs(
             "train_error", long_name="network training error (mean over entries)")),
         "kernel_test_error": (("n", "seed"), kernel.test_error.isel(ridge=0).values,
                               {"long_name": f"ridgeless regression with the measured NTK: {err}",
                                "units": "1"}),
         "learning_rate": (("n", "seed"), lrs, {"long_name": "learning rate η used",
                                                "units": "1"})},
        coords=coords, attrs={"source": SOURCE, "kind": "measurement",
                              "parameters": records.params_attr(params), **records.provenance()})
    predicted = xr.Dataset(
        {"test_error": ("n", early, records.variable_attrs(
            "test_error", long_name="eigenlearning test error at the early-stopping ridge "
                                    "c/(ηs)")),
         "test_error_ridgeless": ("n", ridgeless.test_error.values, {
             "long_name": "eigenlearning test error, ridgeless (s → ∞)", "units": "1"}),
         "ridge": ("n", ridge_n, {"long_name": "early-stopping ridge c/(η s), mean over seeds",
                                  "units": "1"}),
         "linearised_test_error": (("n", "seed"), lin, {
             "long_name": "test error of the network linearised at initialisation after the "
                          "same steps (theory.kernel_flow)", "units": "1"})},
        coords=coords, attrs={"source": SOURCE, "kind": "theory",
                              "parameters": records.params_attr(params)})
    return records.validate(measured), records.validate(predicted)
