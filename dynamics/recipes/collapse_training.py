"""Neural collapse over training, long past zero training error, on balanced and imbalanced digits.

Two experiments that ``theory.neural_collapse`` predicts:

* :func:`train_deep_linear_collapse` — the deep linear unconstrained-features model of Dang et
  al. (ICML 2023): one free feature vector per training digit (``H_1``), ``M`` bias-free linear
  layers ``W_M⋯W_1``, MSE to one-hot labels plus weight decay on every factor, full-batch
  gradient descent.  Only the class sizes of the digits enter this model (its features are
  free), and its global minimum is known exactly (``theory.neural_collapse.imbalanced_collapse``).
* :func:`train_mlp_collapse` — a ReLU MLP on the digit pixels, bias-free last layer, the same
  loss, trained far past zero training error; its penultimate features play the role of
  ``H_M``.  The unconstrained-features theory is its idealisation, not an exact prediction.

Both record the metrics of ``probes.collapse.neural_collapse`` (same names as the theory) and
the per-class norms ``class_mean_norm`` / ``classifier_norm`` at log-spaced steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from traindyn.dynamics import records
from traindyn.dynamics.recipes.digits import load_digits_split
from traindyn.dynamics.schedules import log_steps
from traindyn.probes.collapse import NC_VARIABLES, neural_collapse

__all__ = ["collapse_digits", "train_deep_linear_collapse", "train_mlp_collapse"]


def collapse_digits(
    per_class: int = 60, minority_fraction: float = 1.0, minority_classes: Sequence[int] = (),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-(im)balanced training subset of scikit-learn digits (standardised).

    ``per_class`` samples of every class, except the ``minority_classes``, which keep
    ``round(minority_fraction × per_class)``.  Returns ``(x, y)`` (float32, int64).
    """
    x, y, _, _ = load_digits_split(seed=0)
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(10):
        n = per_class if c not in set(minority_classes) else round(minority_fraction * per_class)
        idx = np.flatnonzero(y.numpy() == c)
        if n > len(idx) or n < 1:
            raise ValueError(f"class {c} has {len(idx)} training digits; asked for {n}")
        keep.extend(rng.choice(idx, n, replace=False))
    keep = np.sort(np.array(keep))
    return x[keep], y[keep]


def _record(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
            n_classes: int, global_mean: str) -> dict[str, np.ndarray]:
    ds = neural_collapse(features, labels, weight=weight, global_mean=global_mean)
    out = {name: float(ds[name]) for name in ds.data_vars}
    means = torch.stack([features[labels == c].mean(0) for c in range(n_classes)])
    out["class_mean_norm"] = means.norm(dim=1).double().cpu().numpy()
    out["classifier_norm"] = weight.norm(dim=1).double().cpu().numpy()
    return out


def _dataset(rows: list[dict], steps: np.ndarray, lr: float, n_classes: int, source: str,
             params: dict, extra: dict[str, np.ndarray]) -> xr.Dataset:
    scalar = [k for k in rows[0] if np.ndim(rows[0][k]) == 0]
    data = {}
    for k in scalar:
        attrs = {"long_name": k.replace("_", " "), "units": "1"}
        data[k] = ("step", np.array([r[k] for r in rows]), attrs)
    for k, long in (("class_mean_norm", "norm of the class mean of last-layer features"),
                    ("classifier_norm", "norm of the classifier row w_k")):
        data[k] = (("step", "class"), np.stack([r[k] for r in rows]),
                   {"long_name": long, "units": "1"})
    for k, (values, attrs) in extra.items():
        data[k] = ("step", values, attrs)
    ds = xr.Dataset(
        data,
        coords={**records.step_coords(steps, lr),
                "class": ("class", np.arange(n_classes), {"long_name": "class label"})},
        attrs={"kind": "measurement", "source": source,
               "parameters": records.params_attr(params)},
    )
    for name, attrs in NC_VARIABLES.items():
        if name in ds:
            ds[name].attrs.update(attrs)
    return ds


def train_deep_linear_collapse(
    labels: torch.Tensor | np.ndarray,
    n_layers: int = 1,
    dim: int = 32,
    weight_decay: float = 5e-3,
    feature_decay: float = 5e-3,
    learning_rate: float = 0.05,
    steps: int = 20000,
    n_evals: int = 30,
    init_scale: float = 0.1,
    global_mean: str = "class_means",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> xr.Dataset:
    r"""Gradient descent on Dang et al.'s (2023) deep linear unconstrained-features model.

    Loss ``(1/2N)‖W_M⋯W_1 H_1 − Y‖² + (λ_W/2)Σ_j‖W_j‖² + (λ_H/2)‖H_1‖²`` (bias-free), in
    float64.  Every column of ``H_1`` only receives ``1/N`` of the data gradient, so the free
    features take steps ``N × learning_rate`` (a fixed per-block preconditioning: the same
    stationary points as plain gradient flow, reached ``N`` times sooner).  ``time`` is
    ``learning_rate × step``.

    Returns
    -------
    xarray.Dataset
        Over ``step``: the NC metrics of ``probes.collapse`` on ``H_M = W_{M−1}⋯W_1 H_1`` and
        ``W_M``, ``train_loss`` (the regularised objective) and ``train_error`` (MSE term ×2);
        over ``(step, class)``: ``class_mean_norm``, ``classifier_norm``.
    """
    dev = torch.device(device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=dev)
    n, k = y.shape[0], int(y.max()) + 1
    if dim < k:
        raise ValueError(f"dim = {dim} must be at least the number of classes {k}")
    target = torch.nn.functional.one_hot(y, k).to(torch.float64)
    g = torch.Generator().manual_seed(seed)

    def init(*shape):
        return (init_scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dev)

    h1 = init(dim, n).requires_grad_(True)
    layers = [init(dim, dim).requires_grad_(True) for _ in range(n_layers - 1)]
    classifier = init(k, dim).requires_grad_(True)
    params = [h1, *layers, classifier]
    lrs = [learning_rate * n] + [learning_rate] * (len(params) - 1)
    record = log_steps(steps, n_evals)
    rows, losses, errors = [], [], []
    for step in range(steps + 1):
        feats = h1
        for w in layers:
            feats = w @ feats
        out = classifier @ feats
        mse = ((out.T - target) ** 2).sum() / (2 * n)
        reg = (weight_decay / 2 * sum((w**2).sum() for w in [*layers, classifier])
               + feature_decay / 2 * (h1**2).sum())
        loss = mse + reg
        if step in record:
            with torch.no_grad():
                rows.append(_record(feats.T.detach(), y, classifier.detach(), k, global_mean))
                losses.append(float(loss))
                errors.append(float(2 * mse))
        if step == steps:
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gp, lr in zip(params, grads, lrs, strict=True):
                p -= lr * gp
    return _dataset(
        rows, record, learning_rate, k,
        "traindyn recipe collapse_training.deep_linear (model of Dang et al. 2023)",
        dict(n_layers=n_layers, dim=dim, weight_decay=weight_decay,
             feature_decay=feature_decay, learning_rate=learning_rate, steps=steps,
             init_scale=init_scale, global_mean=global_mean, seed=seed,
             class_sizes=np.bincount(y.cpu().numpy(), minlength=k)),
        {"train_loss": (np.array(losses), {"long_name": "regularised training objective",
                                           "units": "1"}),
         "train_error": (np.array(errors), records.variable_attrs(
             "train_error", long_name="training squared error, mean over samples"))},
    )


def train_mlp_collapse(
    x: torch.Tensor,
    labels: torch.Tensor,
    widths: Sequence[int] = (128, 128),
    weight_decay: float = 5e-4,
    learning_rate: float = 1e-3,
    steps: int = 3000,
    n_evals: int = 25,
    global_mean: str = "class_means",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> xr.Dataset:
    """A ReLU MLP on digit pixels, bias-free last layer, trained long past zero training error.

    Full-batch Adam on ``½ mean‖f(x) − onehot(y)‖² + (λ/2)‖θ‖²`` (weight decay in the loss,
    not decoupled).  NC metrics of the penultimate (post-ReLU) features at log-spaced steps;
    ``train_accuracy`` shows when training error reaches zero (the terminal phase starts).
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    xs = torch.as_tensor(x, dtype=torch.float32, device=dev)
    y = torch.as_tensor(labels, dtype=torch.long, device=dev)
    k = int(y.max()) + 1
    target = torch.nn.functional.one_hot(y, k).to(torch.float32)
    body: list[torch.nn.Module] = []
    prev = xs.shape[1]
    for w in widths:
        body += [torch.nn.Linear(prev, w), torch.nn.ReLU()]
        prev = w
    body_net = torch.nn.Sequential(*body).to(dev)
    head = torch.nn.Linear(prev, k, bias=False).to(dev)
    params = [*body_net.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=learning_rate)
    record = log_steps(steps, n_evals)
    rows, accs, errors = [], [], []
    for step in range(steps + 1):
        feats = body_net(xs)
        out = head(feats)
        mse = 0.5 * ((out - target) ** 2).sum(1).mean()
        loss = mse + weight_decay / 2 * sum((p**2).sum() for p in params)
        if step in record:
            with torch.no_grad():
                rows.append(_record(feats.detach().double(), y, head.weight.detach().double(),
                                    k, global_mean))
                accs.append(float((out.argmax(1) == y).float().mean()))
                errors.append(float(2 * mse))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _dataset(
        rows, record, learning_rate, k,
        "traindyn recipe collapse_training.mlp (digits, bias-free MSE with weight decay)",
        dict(widths=list(widths), weight_decay=weight_decay, learning_rate=learning_rate,
             steps=steps, global_mean=global_mean, seed=seed,
             class_sizes=np.bincount(y.cpu().numpy(), minlength=k)),
        {"train_accuracy": (np.array(accs), records.variable_attrs("train_accuracy")),
         "train_error": (np.array(errors), records.variable_attrs(
             "train_error", long_name="training squared error, mean over samples"))},
    )
