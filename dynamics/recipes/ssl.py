r"""Self-supervised (SimCLR-style) training of a small MLP on scikit-learn's digits, with the
label-free geometry (RankMe, alpha-ReQ) and a readout (linear probe) recorded over training —
the setting of RankMe's claim (Garrido, Balestriero, Najman & LeCun, ICML 2023).

Views: two random augmentations of each 8 × 8 digit, made with the transformations of
:mod:`probes.invariance` — a sub-pixel Fourier translation along each axis (per sample,
uniform in ``±max_shift`` pixels), a bicubic rotation (one angle per quarter of the batch,
uniform in ``±max_angle`` degrees) and additive Gaussian noise of standard deviation ``noise``.
Pixels are in ``[0, 1]`` (digits / 16) while augmenting, then standardised with the training
split's pixel mean and standard deviation.

Network: ``encoder`` = ``64 → hidden → ReLU → representation → ReLU`` (the representation
``h``), ``projector`` = ``representation → projector_width → ReLU → embedding`` (``z``), as in
SimCLR (Chen, Kornblith, Norouzi & Hinton, ICML 2020, Fig. 2).  Loss: NT-Xent (their Eq. 1)
with temperature ``τ`` over the ``2N`` views of a batch, optimised with Adam.

Recorded (a :class:`~dynamics.Monitor` on the digits *test* split, 540 images the training
never sees): ``rankme`` and ``alpha_req`` (label-free) and the ridge ``linear_probe`` (labels;
its own half/half split of those 540 images) of ``encoder`` and ``projector``, the
``alignment_uniformity`` probe (Wang & Isola 2020; positive pairs: input and input with
noise), and the training loss ``ssl_loss``.  :func:`ssl_grid` runs it over a grid of
learning rate × projector width × temperature with :func:`dynamics.sweep`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import log_spaced
from traindyn.probes.invariance import add_noise, rotate, translate
from traindyn.probes.readout import linear_probe_with_split

__all__ = ["SSLNet", "augment", "load_digits_images", "nt_xent", "ssl_grid", "train_ssl"]

LAYERS = ["encoder", "projector"]
"""The monitored modules: the representation and the embedding."""


def load_digits_images(test_fraction: float = 0.3, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as ``(n, 1, 8, 8)`` float32 images in ``[0, 1]`` and int64 labels, split into
    ``(x_train, y_train, x_test, y_test)`` stratified by class with ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    t = torch.from_numpy
    return t(x[~test]), t(y[~test]), t(x[test]), t(y[test])


def augment(images: torch.Tensor, gen: torch.Generator, max_shift: float = 1.0,
            max_angle: float = 15.0, noise: float = 0.05) -> torch.Tensor:
    """One random view of each image ``(n, 1, H, W)`` (see the module docstring)."""
    n = images.shape[0]
    sx = (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1) * max_shift
    sy = (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1) * max_shift
    out = translate(translate(images, sx, dim=-1), sy, dim=-2)
    parts = []
    for chunk in out.chunk(4):
        angle = float((2 * torch.rand((), generator=gen) - 1) * math.radians(max_angle))
        parts.append(rotate(chunk, angle))
    out = torch.cat(parts)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    return add_noise(out, noise, seed=seed)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""NT-Xent (Chen et al. 2020, Eq. 1), averaged over the ``2N`` views: for view ``i`` with
    positive ``j``, ``−log [exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)]``, ``s`` the cosine
    similarity."""
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return nn.functional.cross_entropy(sim, target)


class SSLNet(nn.Module):
    """``encoder`` (the representation) followed by ``projector`` (the embedding)."""

    def __init__(self, hidden: int = 256, representation: int = 64,
                 projector_width: int = 128, embedding: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(),
                                     nn.Linear(hidden, representation), nn.ReLU())
        self.projector = nn.Sequential(nn.Linear(representation, projector_width),
                                       nn.BatchNorm1d(projector_width), nn.ReLU(),
                                       nn.Linear(projector_width, embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x.reshape(x.shape[0], -1)))


def train_ssl(
    learning_rate: float = 1e-3,
    projector_width: int = 128,
    temperature: float = 0.5,
    steps: int = 300,
    batch_size: int = 128,
    hidden: int = 256,
    representation: int = 64,
    embedding: int = 32,
    n_evals: int = 8,
    fit_range: tuple[int, int] = (2, 12),
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    probes: Sequence[Any] | None = None,
) -> xr.Dataset:
    """Train :class:`SSLNet` with NT-Xent on augmented digits and record the probes.

    Parameters
    ----------
    learning_rate, projector_width, temperature : float, int, float
        The hyperparameters of the grid (Adam's step size, the projector's hidden width,
        NT-Xent's ``τ``).
    steps, batch_size, n_evals : int
        Optimiser steps, images per step (two views each), log-spaced evaluations.
    fit_range : (int, int)
        alpha-ReQ's 0-based fit range: ranks 3..12 by default, because a projector of width
        16 gives embeddings whose centred covariance has rank at most 16 (the fit needs
        ``fit_range[1] + 1`` non-zero eigenvalues).
    checkpoint_dir : path, optional
        Where to save ``step<k>.pt`` state dicts at each evaluation (read them back with
        ``traindyn analyze`` or ``torch.load(weights_only=True)``).
    probes : sequence, optional
        Overrides the probe list (default: RankMe, alpha-ReQ, the half/half ridge linear probe,
        alignment/uniformity).

    Returns
    -------
    xarray.Dataset
        Over ``(step, layer)``: ``rankme``, ``alpha_req``, ``alpha_req_r2``,
        ``linear_probe_*``, ``alignment``, ``uniformity``; over ``step``: ``ssl_loss``.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, _, x_te, y_te = load_digits_images()
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3

    def prep(images: torch.Tensor) -> torch.Tensor:
        return ((images - mean) / std).reshape(images.shape[0], -1)

    model = SSLNet(hidden, representation, projector_width, embedding)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    if probes is None:
        probes = ["rankme", "alpha_req", linear_probe_with_split(held_out=0.5, seed=0),
                  "alignment_uniformity"]
    kwargs = {"alpha_req": {"fit_range": tuple(fit_range)},
              "alignment_uniformity": {"layers": LAYERS}}
    names = {p if isinstance(p, str) else p.name for p in probes}
    monitor = Monitor(
        model, probes=probes, layers=LAYERS, probe_data=prep(x_te), probe_labels=y_te,
        schedule=log_spaced(steps, n_evals), learning_rate=learning_rate, seed=seed,
        probe_kwargs={k: v for k, v in kwargs.items() if k in names},
        source="traindyn recipe ssl (SimCLR-style NT-Xent on scikit-learn digits)")
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    loss_value = float("nan")
    for step in range(steps + 1):
        if monitor.schedule(step):
            model.eval()
            monitor.step(step, ssl_loss=loss_value)
            model.train()
            if folder is not None:
                torch.save(model.state_dict(), folder / f"step{step}.pt")
        if step == steps:
            break
        idx = torch.randint(0, x_tr.shape[0], (batch_size,), generator=gen)
        batch = x_tr[idx]
        v1, v2 = prep(augment(batch, gen)), prep(augment(batch, gen))
        optimiser.zero_grad(set_to_none=True)
        loss = nt_xent(model(v1), model(v2), temperature)
        loss.backward()
        optimiser.step()
        loss_value = float(loss.detach())
    ds = monitor.to_dataset(attrs={"kind": "measurement"})
    if "ssl_loss" in ds:
        ds["ssl_loss"].attrs.update(long_name="NT-Xent training loss of the last batch",
                                    units="nat")
    return ds


def ssl_grid(learning_rates: Sequence[float] = (3e-4, 1e-3, 3e-3),
             projector_widths: Sequence[int] = (16, 128),
             temperatures: Sequence[float] = (0.1, 0.5),
             seeds: Sequence[int] = (0,), client: Any = "serial", **fixed: Any) -> xr.Dataset:
    """:func:`train_ssl` over learning rate × projector width × temperature × seed
    (:func:`dynamics.sweep`; ``client="serial"`` runs here, ``None`` on local processes)."""
    from traindyn.dynamics.sweep import sweep

    return sweep(train_ssl, {"learning_rate": list(learning_rates),
                             "projector_width": list(projector_widths),
                             "temperature": list(temperatures)},
                 seeds=list(seeds), client=client, fixed=fixed)
