"""The finite-width two-layer network that ``theory.dmft`` describes, trained by gradient descent.

Same parameterisation and time scale as :func:`theory.dmft.dmft_two_layer` (Bordelon &
Pehlevan, NeurIPS 2022, mean-field / μP with richness ``γ₀``)::

    h_i(x) = W_i·x/√D,   f(x) = (1/(γ₀N)) Σ_i a_i φ(h_i(x)) [− f_init(x)],
    W_ij, a_i ~ N(0, 1),   L = (1/(2P)) Σ_μ (y_μ − f(x_μ))²,
    θ ← θ − γ₀² N η ∇_θ L     (full batch, every parameter),

so one step advances the gradient-flow time of the theory by ``η``: ``time = η × step``.
``center=True`` (default) subtracts the network's initial function (a frozen copy of the
initial weights), as the infinite-width theory has ``f(0) = 0``; the kernels are unchanged by it.

Recorded per (``width``, ``seed``, ``step``): ``train_loss``/``test_loss`` (mean squared
errors), ``train_prediction``/``test_prediction``, the NTK on the training points in the same
``γ₀²N``-rescaled units as the theory (``ntk = Φ + G∘K^x`` from the network's own features,
``Φ = φφᵀ/N``, ``G = (aφ')(aφ')ᵀ/N``; equal to ``γ₀²N`` × the empirical NTK of
``probes.empirical_ntk``, tested), ``ntk_alignment`` and ``ntk_centered_alignment``
(``probes.kernel_alignment`` / ``probes.centered_alignment``) and ``ntk_trace_mean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics import records
from traindyn.probes.kernels import centered_alignment, kernel_alignment

__all__ = ["TwoLayerNet", "train_two_layer", "two_layer_task"]

_SOURCE = ("traindyn recipe two_layer (mean-field two-layer network of Bordelon & Pehlevan "
           "2022, gradient descent)")
_TARGETS = ("tanh", "he2", "linear")


def _activation(name: str, epsilon: float):
    if name == "tanh":
        return torch.tanh, lambda z: 1 - torch.tanh(z) ** 2
    if name == "relu":
        return torch.relu, lambda z: (z > 0).to(z.dtype)
    if name == "linear":
        return (lambda z: z), torch.ones_like
    if name == "poly":
        return (lambda z: z + 0.5 * epsilon * z**2), (lambda z: 1 + epsilon * z)
    raise ValueError(f"activation {name!r} is not supported; use tanh, relu, linear or poly")


def two_layer_task(
    n_train: int = 40, n_test: int = 40, dim: int = 10, target: str = "he2", seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A single-index task: ``x ~ N(0, I_D)``, ``y = g(β·x)`` with a random unit ``β``.

    ``target``: ``"he2"`` (``(z² − 1)/√2``, orthogonal to every linear function: the initial
    kernel of an odd activation is misaligned with it), ``"tanh"`` (``tanh(2z)``) or
    ``"linear"`` (``z``).  Returns float64 ``(x_train, y_train, x_test, y_test)``.
    """
    if n_train < 1 or n_test < 0 or dim < 1:
        raise ValueError("n_train >= 1, n_test >= 0 and dim >= 1 are needed")
    funcs = {"tanh": lambda z: np.tanh(2 * z), "he2": lambda z: (z**2 - 1) / np.sqrt(2),
             "linear": lambda z: z}
    if target not in funcs:
        raise ValueError(f"target {target!r} unknown; use one of {_TARGETS}")
    rng = np.random.default_rng(seed)
    beta = rng.standard_normal(dim)
    beta /= np.linalg.norm(beta)
    x = rng.standard_normal((n_train + n_test, dim))
    y = funcs[target](x @ beta)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class TwoLayerNet(nn.Module):
    """``f(x) = (1/(γ₀N)) a·φ(Wx/√D)`` minus the initial function when ``center``."""

    def __init__(self, dim: int, width: int, gamma0: float, activation: str = "tanh",
                 epsilon: float = 0.02, center: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if not np.isfinite(gamma0) or gamma0 <= 0:
            raise ValueError(f"gamma0 must be > 0 for a finite network; got {gamma0}")
        if int(width) < 1:
            raise ValueError(f"width must be >= 1; got {width}")
        g = torch.Generator().manual_seed(int(seed))
        self.weight = nn.Parameter(torch.randn(width, dim, generator=g, dtype=dtype))
        self.readout = nn.Parameter(torch.randn(width, generator=g, dtype=dtype))
        self.register_buffer("weight0", self.weight.detach().clone())
        self.register_buffer("readout0", self.readout.detach().clone())
        self.gamma0, self.width, self.dim, self.center = float(gamma0), int(width), dim, center
        self.phi, self.dphi = _activation(activation, epsilon)

    def _raw(self, x: torch.Tensor, weight: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        h = x @ weight.T / np.sqrt(self.dim)
        return self.phi(h) @ readout / (self.gamma0 * self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._raw(x, self.weight, self.readout)
        if self.center:
            out = out - self._raw(x, self.weight0, self.readout0)
        return out

    @torch.no_grad()
    def rescaled_ntk(self, x: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        """``γ₀²N × NTK = Φ + G∘K^x`` between ``x`` and ``x2`` (default ``x``)."""
        x2 = x if x2 is None else x2
        h1, h2 = x @ self.weight.T / np.sqrt(self.dim), x2 @ self.weight.T / np.sqrt(self.dim)
        phi = self.phi(h1) @ self.phi(h2).T / self.width
        g1, g2 = self.dphi(h1) * self.readout, self.dphi(h2) * self.readout
        return phi + (g1 @ g2.T / self.width) * (x @ x2.T / self.dim)


def train_two_layer(
    x_train: Any,
    y_train: Any,
    gamma0: float,
    x_test: Any = None,
    y_test: Any = None,
    widths: Sequence[int] = (250, 1000),
    seeds: Sequence[int] = (0, 1, 2),
    activation: str = "tanh",
    epsilon: float = 0.02,
    learning_rate: float = 0.05,
    steps: int = 200,
    record_every: int = 10,
    center: bool = True,
    device: str | torch.device = "cpu",
) -> xr.Dataset:
    """Train the two-layer network by full-batch gradient descent over widths and seeds.

    Parameters
    ----------
    x_train, y_train, x_test, y_test
        Data (e.g. :func:`two_layer_task`); test data optional.
    gamma0 : float
        Richness ``γ₀ > 0`` (the output is divided by ``γ₀``, the step multiplied by ``γ₀²N``).
    widths, seeds : sequences of int
        Hidden widths ``N`` and initialisation seeds.
    activation, epsilon
        As in :func:`theory.dmft.dmft_two_layer`.
    learning_rate : float
        ``η``: each step moves every parameter by ``−γ₀²Nη ∇L``; ``time = η × step``.
    steps, record_every : int
        Number of steps and the recording interval (step 0 and the last step are recorded).
    center : bool
        Subtract the initial function (default; the theory's ``f(0) = 0``).
    device : str or torch.device
        Where to train (``"cpu"``, ``"cuda"``), in float64.

    Returns
    -------
    xarray.Dataset
        Variables over (``width``, ``seed``, ``step``) with coordinate ``time``; see the module
        docstring.
    """
    dev = torch.device(device)
    x = torch.as_tensor(np.asarray(x_train, dtype=float), device=dev)
    x = x[:, None] if x.ndim == 1 else x
    y = torch.as_tensor(np.asarray(y_train, dtype=float).reshape(-1), device=dev)
    if x.shape[0] == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"need P >= 1 inputs with one target each; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x_train and y_train must be finite")
    if learning_rate <= 0 or steps < 0 or record_every < 1:
        raise ValueError("learning_rate > 0, steps >= 0 and record_every >= 1 are needed")
    xt = yt = None
    if x_test is not None:
        xt = torch.as_tensor(np.asarray(x_test, dtype=float), device=dev)
        xt = xt[:, None] if xt.ndim == 1 else xt
        if y_test is not None:
            yt = torch.as_tensor(np.asarray(y_test, dtype=float).reshape(-1), device=dev)
    P, D = x.shape
    record = np.unique(np.concatenate([np.arange(0, steps + 1, record_every), [steps]]))
    W, S, T = len(widths), len(seeds), len(record)
    out: dict[str, np.ndarray] = {
        "train_loss": np.empty((W, S, T)), "ntk_alignment": np.empty((W, S, T)),
        "ntk_centered_alignment": np.empty((W, S, T)), "ntk_trace_mean": np.empty((W, S, T)),
        "train_prediction": np.empty((W, S, T, P)), "ntk": np.empty((W, S, T, P, P)),
    }
    if xt is not None:
        out["test_prediction"] = np.empty((W, S, T, xt.shape[0]))
        if yt is not None:
            out["test_loss"] = np.empty((W, S, T))
    for w_i, width in enumerate(widths):
        for s_i, seed in enumerate(seeds):
            net = TwoLayerNet(D, int(width), gamma0, activation, epsilon, center, int(seed)).to(dev)
            step_size = gamma0**2 * width * learning_rate
            with torch.no_grad():  # the initial function, subtracted (constant in training)
                f_init = net._raw(x, net.weight0, net.readout0) if center else 0.0
            r = 0
            for step in range(steps + 1):
                f = net._raw(x, net.weight, net.readout) - f_init
                loss = 0.5 * ((y - f) ** 2).mean()
                if step == record[r]:
                    with torch.no_grad():
                        K = net.rescaled_ntk(x)
                        out["train_loss"][w_i, s_i, r] = float(2 * loss)
                        out["train_prediction"][w_i, s_i, r] = f.detach().cpu().numpy()
                        out["ntk"][w_i, s_i, r] = K.cpu().numpy()
                        out["ntk_alignment"][w_i, s_i, r] = kernel_alignment(K, y)
                        out["ntk_centered_alignment"][w_i, s_i, r] = centered_alignment(K, y)
                        out["ntk_trace_mean"][w_i, s_i, r] = float(torch.diagonal(K).mean())
                        if xt is not None:
                            ft = net(xt)
                            out["test_prediction"][w_i, s_i, r] = ft.cpu().numpy()
                            if yt is not None:
                                out["test_loss"][w_i, s_i, r] = float(((yt - ft) ** 2).mean())
                    r += 1
                if step == steps:
                    break
                grads = torch.autograd.grad(loss, [net.weight, net.readout])
                with torch.no_grad():
                    net.weight -= step_size * grads[0]
                    net.readout -= step_size * grads[1]
    dims = ("width", "seed", "step")
    attrs = {
        "train_loss": records.variable_attrs(
            "train_loss", long_name="training loss, mean squared error (1/P) Σ (y − f)²",
            units="1"),
        "test_loss": records.variable_attrs("test_loss", long_name="test loss, mean squared "
                                            "error", units="1"),
        "train_prediction": {"long_name": "network output f on the training points",
                             "units": "1"},
        "test_prediction": {"long_name": "network output f on the test points", "units": "1"},
        "ntk": {"long_name": "NTK on the training points (γ₀²N-rescaled)", "units": "1"},
        "ntk_alignment": records.variable_attrs("ntk_alignment"),
        "ntk_centered_alignment": records.variable_attrs("ntk_centered_alignment"),
        "ntk_trace_mean": records.variable_attrs("ntk_trace_mean"),
    }
    extra = {"train_prediction": ("sample",), "test_prediction": ("test_sample",),
             "ntk": ("sample", "sample2")}
    data = {name: ((*dims, *extra.get(name, ())), values, attrs[name])
            for name, values in out.items()}
    coords: dict[str, Any] = {
        **records.step_coords(record, learning_rate),
        "width": ("width", np.asarray(widths, dtype=np.int64), {"long_name": "hidden width N",
                                                                "units": "1"}),
        "seed": ("seed", np.asarray(seeds, dtype=np.int64), {"long_name": records.DIMS["seed"],
                                                             "units": "1"}),
        "sample": ("sample", np.arange(P)),
        "sample2": ("sample2", np.arange(P)),
    }
    if xt is not None:
        coords["test_sample"] = ("test_sample", np.arange(xt.shape[0]))
    return xr.Dataset(data, coords=coords, attrs={
        "kind": "measurement", "source": _SOURCE,
        "parameters": records.params_attr(dict(
            gamma0=gamma0, activation=activation, epsilon=epsilon, learning_rate=learning_rate,
            steps=steps, record_every=record_every, center=center, P=P, D=D, device=str(dev))),
        "time_convention": "time = learning_rate × step; per-parameter step γ₀²N·learning_rate",
    })
