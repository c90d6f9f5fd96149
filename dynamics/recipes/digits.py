"""A small MLP classifier on scikit-learn's bundled digits (no download), with a Monitor.

Used by ``traindyn demo`` and the notebooks: it records train/test loss and accuracy and the
feature probes of each hidden layer at scheduled steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import Schedule, log_spaced

__all__ = ["DigitsMLP", "load_digits_split", "train_digits_mlp"]


def load_digits_split(test_fraction: float = 0.3, seed: int = 0):
    """Standardised digits (8×8 images, 10 classes, 1797 samples) split into train and test.

    Returns ``(x_train, y_train, x_test, y_test)`` as float32 / int64 tensors.  The split is
    stratified by class and fixed by ``seed``; standardisation uses training statistics.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.extend(idx[: int(round(test_fraction * len(idx)))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    mean, std = x[~test_mask].mean(0), x[~test_mask].std(0) + 1e-6
    x = (x - mean) / std
    t = torch.from_numpy
    return t(x[~test_mask]), t(y[~test_mask]), t(x[test_mask]), t(y[test_mask])


class DigitsMLP(nn.Module):
    """``64 → width → … → 10`` ReLU network; hidden activations are modules ``hidden.{i}``."""

    def __init__(self, widths: Sequence[int] = (256, 256), n_in: int = 64, n_out: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        self.hidden_names: list[str] = []
        prev = n_in
        for i, width in enumerate(widths):
            layers += [nn.Linear(prev, width), nn.ReLU()]
            self.hidden_names.append(f"net.{2 * i + 1}")
            prev = width
        layers.append(nn.Linear(prev, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


def train_digits_mlp(
    widths: Sequence[int] = (256, 256),
    steps: int = 2000,
    learning_rate: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    probes: Sequence[str] = ("rankme", "alpha_req"),
    schedule: Schedule | None = None,
    n_evals: int = 30,
    on_step: Callable[[int], None] | None = None,
) -> xr.Dataset:
    """Train :class:`DigitsMLP` with SGD and record probes of every hidden layer.

    Probes are evaluated on the test split (540 samples) at ``schedule`` (default:
    ``n_evals`` log-spaced steps); losses and accuracies on both splits at the same steps.

    Returns
    -------
    xarray.Dataset
        ``train_loss``, ``test_loss``, ``train_accuracy``, ``test_accuracy`` over ``step`` and
        each probe over ``(step, layer)``, with a scalar ``seed`` coordinate.
    """
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    model = DigitsMLP(widths)
    optimiser = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.0)
    monitor = Monitor(
        model, probes=probes, layers=model.hidden_names,
        schedule=schedule or log_spaced(steps, n_evals), probe_data=x_te,
        learning_rate=learning_rate, seed=seed,
        source="traindyn recipe digits_mlp (scikit-learn digits, SGD)",
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_tr), generator=gen)
    cursor = 0
    for step in range(steps + 1):
        if monitor.schedule(step):
            model.eval()
            tr_loss, tr_acc = _loss_acc(model, x_tr, y_tr)
            te_loss, te_acc = _loss_acc(model, x_te, y_te)
            model.train()
            monitor.step(step, train_loss=tr_loss, test_loss=te_loss,
                         train_accuracy=tr_acc, test_accuracy=te_acc)
        if on_step is not None:
            on_step(step)
        if step == steps:
            break
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(y_tr), generator=gen), 0
        idx = order[cursor: cursor + batch_size]
        cursor += batch_size
        optimiser.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        loss.backward()
        optimiser.step()
    return monitor.to_dataset(attrs={"kind": "measurement"})
