r"""A network's own kernel prediction of its training, and how far the run departs from it.

:func:`predict_from_model` measures, at step ``s``, the empirical NTK of a ``torch`` model on the
training batch and between the test and training batches (:func:`probes.ntk.empirical_ntk`,
chunked), reads the outputs ``f_s`` there, and hands both to :func:`theory.kernel_flow`: the
prediction of the rest of training by the network linearised at ``s`` (Lee et al. 2019,
Sec. 2.2, Eqs. 9–11).  The result is a Dataset over ``step`` with ``time = η × step`` and the
variable names of traindyn's recipes (``train_loss``, ``test_loss``, ``train_accuracy``,
``test_accuracy``), so ``xr.align(prediction, measured)`` needs no glue.
:func:`predict_from_checkpoint` does the same for a saved checkpoint (read safely by
:func:`dynamics.checkpoints.load_into`).

:func:`lazy_rich_gap` runs this at every recorded step ``s`` of a run (models in memory or a
checkpoint folder) and compares the prediction at ``s + Δ`` with what the network actually did
there: a measure, over training, of how far the run leaves its kernel regime (0 in the lazy
limit; of the order of the change itself when features move).

::

    # inside a training loop, at a Monitor evaluation (or any step s)
    with monitor:
        for step in range(steps + 1):
            if step == s:
                predicted = predict_from_model(model, x_train, y_train, later_steps, lr,
                                               step=step, x_test=x_test, y_test=y_test)
            ...                                   # the user's own training step
            monitor.step(step, train_loss=loss)
    measured = monitor.to_dataset()
    dynamics.plot.compare(predicted, measured, "train_loss")     # same step / time axes

Conventions.  The prediction is for full-batch training on ``x_train`` with a loss reduced by the
mean, as PyTorch's ``F.mse_loss`` / ``F.cross_entropy`` do by default (``normalization``: ``c =
n·k/2`` for the squared loss, ``c = n`` for cross-entropy; pass another ``c`` for other
reductions).  Minibatch SGD on a mean-reduced loss follows the same expected path to first
order in the learning rate.  The model is evaluated in eval mode under
:class:`dynamics.monitor.preserved_state`, so calling these inside a training loop (at a
Monitor evaluation) leaves the run untouched: modes, buffers, gradients and random states are
restored.
"""

from __future__ import annotations

import os
import time as _time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

__all__ = ["lazy_rich_gap", "model_outputs", "predict_from_checkpoint", "predict_from_model"]

SOURCE = ("traindyn dynamics.predict: empirical NTK at the step predicted from, "
          "theory.kernel_flow (Lee et al. 2019, Sec. 2.2, Eqs. 9-11)")


def _tensor(x: Any, like: torch.Tensor | None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if like is not None and t.is_floating_point():
        t = t.to(device=like.device, dtype=like.dtype)
    return t


def _first_param(model: nn.Module) -> torch.Tensor | None:
    return next(model.parameters(), None)


def model_outputs(model: nn.Module, x: Any, batch_size: int = 1024) -> np.ndarray:
    """The model's outputs on ``x`` as a float64 ``(n, k)`` array (eval mode, no gradients,
    everything restored afterwards)."""
    from traindyn.dynamics.monitor import preserved_state

    p = _first_param(model)
    xt = _tensor(x, p)
    outs = []
    with preserved_state(model), torch.no_grad():
        model.eval()
        for i in range(0, xt.shape[0], batch_size):
            outs.append(model(xt[i:i + batch_size]).reshape(min(batch_size, xt.shape[0] - i),
                                                             -1))
    return torch.cat(outs).detach().to("cpu", torch.float64).numpy()


def _targets(y: Any, name: str) -> np.ndarray:
    if y is None:
        raise TypeError(f"{name} is required")
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return arr


def _default_c(loss: str, n: int, k: int) -> float:
    if loss == "mse":
        return n * k / 2.0
    if loss == "cross_entropy":
        return float(n)
    raise ValueError(f"loss must be 'mse' or 'cross_entropy'; got {loss!r}")


def _kernels(model: nn.Module, x_train: Any, x_test: Any, kernel: str, method: str,
             params: Any, chunk_size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    from traindyn.dynamics.monitor import preserved_state
    from traindyn.probes.ntk import empirical_ntk

    if kernel not in ("full", "mean"):
        raise ValueError(f"kernel must be 'full' ((n, n, k, k)) or 'mean' (averaged over "
                         f"outputs); got {kernel!r}")
    p = _first_param(model)
    xtr = _tensor(x_train, p)
    with preserved_state(model):
        model.eval()
        K = empirical_ntk(model, xtr, output=kernel, method=method, params=params,
                          chunk_size=chunk_size)
        Kt = None
        if x_test is not None:
            Kt = empirical_ntk(model, _tensor(x_test, p), xtr, output=kernel, method=method,
                               params=params, chunk_size=chunk_size)
    host = lambda a: a.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    return host(K), (host(Kt) if Kt is not None else None)


def predict_from_model(
    model: nn.Module,
    x_train: Any,
    y_train: Any,
    steps: Any,
    learning_rate: float,
    *,
    step: int = 0,
    x_test: Any = None,
    y_test: Any = None,
    loss: str = "cross_entropy",
    normalization: float | None = None,
    dynamics: str = "gd",
    diag_reg: float = 0.0,
    kernel: str = "full",
    method: str = "auto",
    params: Any = None,
    chunk_size: int | None = None,
) -> xr.Dataset:
    r"""The linearised prediction of training from the model as it is at ``step``.

    Measures ``Θ_s(X, X)``, ``Θ_s(x, X)`` (:func:`probes.ntk.empirical_ntk`) and the outputs
    ``f_s`` and returns :func:`theory.kernel_flow` from ``start_step = step`` (Lee et al. 2019,
    Sec. 2.2, Eqs. 9–11).

    Parameters
    ----------
    model : nn.Module
        The network at ``step`` (live in a training loop, or loaded from a checkpoint).  Left
        as it was (modes, buffers, gradients, random states).
    x_train, y_train : arrays
        The training batch the prediction trains on, and its targets (integer labels or class
        probabilities for cross-entropy; ``(n,)`` or ``(n, k)`` values for the squared loss).
    steps : array of int
        Absolute steps ``≥ step`` to predict, e.g. ``measured.step.where(measured.step >= s)``.
    learning_rate : float
        ``η`` of the run (``time = η × step``).
    x_test, y_test : arrays, optional
        Test batch: gives ``f_test`` and ``test_loss`` / ``test_accuracy``.
    loss : {"cross_entropy", "mse"}
    normalization : float, optional
        ``c`` of the loss ``(1/c)Σ_i ℓ_i`` (``theory.kernel_flow``); default as PyTorch's mean
        reduction: ``n·k/2`` for ``F.mse_loss``, ``n`` for ``F.cross_entropy``.
    dynamics : {"gd", "flow"}
    diag_reg : float
        Ridge towards the weights at ``step`` (``theory.kernel_flow``).
    kernel : {"full", "mean"}
        ``"full"``: the ``(n, n, k, k)`` kernel (exact linearisation; memory ``(n k)²``);
        ``"mean"``: the kernel averaged over outputs, shared by all (``k²`` times cheaper, exact
        when the output blocks are ``K δ_ab``, as for a wide network's last layer).
    method, params, chunk_size
        Passed to :func:`probes.ntk.empirical_ntk`.

    Returns
    -------
    xarray.Dataset
        :func:`theory.kernel_flow`'s Dataset, with attributes ``predicted_from_step`` and the
        seconds spent on the kernel (``ntk_seconds``) and on the prediction
        (``solve_seconds``).
    """
    from traindyn import theory

    t0 = _time.perf_counter()
    K, Kt = _kernels(model, x_train, x_test, kernel, method, params, chunk_size)
    f_train = model_outputs(model, x_train)
    f_test = model_outputs(model, x_test) if x_test is not None else None
    t1 = _time.perf_counter()
    n, k = f_train.shape
    c = _default_c(loss, n, k) if normalization is None else normalization
    yt = _targets(y_test, "y_test") if y_test is not None else None
    ds = theory.kernel_flow(
        K, _targets(y_train, "y_train"), steps, learning_rate, kernel_test_train=Kt,
        targets_test=yt, f0_train=f_train, f0_test=f_test, loss=loss, dynamics=dynamics,
        normalization=c, diag_reg=diag_reg, start_step=step)
    t2 = _time.perf_counter()
    ds.attrs.update(source=SOURCE, predicted_from_step=int(step), kernel=kernel,
                    ntk_seconds=t1 - t0, solve_seconds=t2 - t1)
    return ds


def predict_from_checkpoint(
    checkpoint: Any,
    model: nn.Module | Callable[[], nn.Module],
    x_train: Any,
    y_train: Any,
    steps: Any,
    learning_rate: float,
    *,
    strict: bool = True,
    **kwargs: Any,
) -> xr.Dataset:
    """:func:`predict_from_model` from a checkpoint's weights.

    ``checkpoint`` is a :class:`dynamics.checkpoints.Checkpoint` or a path (its step read from
    the name, e.g. ``step1000.pt``); ``model`` a module of the right architecture or a factory
    (called without arguments) that builds one.  Weights are read with
    ``torch.load(weights_only=True)`` / safetensors and checked (:func:`checkpoints.load_into`);
    the model's own weights are overwritten.
    """
    from traindyn.dynamics import checkpoints

    if isinstance(checkpoint, checkpoints.Checkpoint):
        ckpt = checkpoint
    else:
        found = checkpoints.find_checkpoints(checkpoint)
        if len(found) != 1:
            raise ValueError(f"checkpoint {checkpoint!r} names {len(found)} checkpoints; give "
                             "one file (or use lazy_rich_gap for a series)")
        ckpt = found[0]
    net = model if isinstance(model, nn.Module) else model()
    checkpoints.load_into(net, ckpt, strict=strict)
    ds = predict_from_model(net, x_train, y_train, steps, learning_rate, step=ckpt.step,
                            **kwargs)
    ds.attrs["checkpoint"] = str(ckpt.path)
    return ds


# --------------------------------------------------------------------------- the gap


def _series(models: Any, model: Any, strict: bool
            ) -> tuple[list[int], Iterable[tuple[int, nn.Module]]]:
    """The recorded steps, and (step, model) pairs in step order; checkpoints are found first
    (steps from their names) and loaded one at a time when iterated."""
    if isinstance(models, (str, os.PathLike)) or (
            isinstance(models, Sequence) and len(models) > 0
            and isinstance(models[0], (str, os.PathLike))):
        from traindyn.dynamics import checkpoints

        if model is None:
            raise TypeError("a checkpoint folder needs model= (a module or a factory)")
        found = checkpoints.find_checkpoints(models)

        def load() -> Iterable[tuple[int, nn.Module]]:
            for ckpt in found:
                net = model if isinstance(model, nn.Module) else model()
                checkpoints.load_into(net, ckpt, strict=strict)
                yield ckpt.step, net

        return [c.step for c in found], load()
    items = models.items() if isinstance(models, Mapping) else models
    pairs = sorted(((int(s), m) for s, m in items), key=lambda sm: sm[0])
    if any(isinstance(m, Mapping) for _, m in pairs) and model is None:
        raise TypeError("state dicts need model= (a module or a factory) to load them into")

    def build() -> Iterable[tuple[int, nn.Module]]:
        for s, m in pairs:
            if isinstance(m, Mapping):  # a state dict, e.g. {k: v.clone()} saved during training
                net = model if isinstance(model, nn.Module) else model()
                net.load_state_dict(m)
                m = net
            yield s, m

    return [s for s, _ in pairs], build()


_GAP_ATTRS = {
    "gap_train_loss": "measured − predicted training loss at s + Δ",
    "gap_test_loss": "measured − predicted test loss at s + Δ",
    "gap_train_output": "RMS over training entries of f_measured(s+Δ) − f_predicted(s+Δ)",
    "gap_test_output": "RMS over test entries of f_measured(s+Δ) − f_predicted(s+Δ)",
    "relative_gap_train": "‖f_measured(s+Δ) − f_predicted(s+Δ)‖ / ‖f_measured(s+Δ) − f(s)‖ on "
                          "the training batch (0: lazy, ~1: the linearisation misses the change)",
    "relative_gap_test": "‖f_measured(s+Δ) − f_predicted(s+Δ)‖ / ‖f_measured(s+Δ) − f(s)‖ on "
                         "the test batch",
    "predicted_train_loss": "training loss at s + Δ predicted from step s",
    "predicted_test_loss": "test loss at s + Δ predicted from step s",
    "measured_train_loss": "measured training loss at s + Δ",
    "measured_test_loss": "measured test loss at s + Δ",
    "delta_steps": "Δ, steps from s to the step compared",
}


def lazy_rich_gap(
    models: Any,
    x_train: Any,
    y_train: Any,
    learning_rate: float,
    *,
    delta: int | None = None,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    x_test: Any = None,
    y_test: Any = None,
    loss: str = "cross_entropy",
    normalization: float | None = None,
    dynamics: str = "gd",
    kernel: str = "full",
    strict: bool = True,
    **ntk_kwargs: Any,
) -> xr.Dataset:
    r"""The lazy→rich gap over training: measured minus linearised-from-``s`` at ``s + Δ``.

    For each recorded step ``s`` whose ``s + Δ`` is also recorded, the network linearised at
    ``s`` (its empirical NTK and outputs there, :func:`predict_from_model`) predicts the
    outputs and losses at ``s + Δ``; the gap is what the network actually did there minus that
    prediction.  In the lazy (kernel) regime the gap vanishes as the width grows (Lee et al.
    2019, Thm 2.1); when features move it is of the order of the change itself.

    Parameters
    ----------
    models : mapping step → module or state dict, sequence of (step, …) pairs, or checkpoint path(s)
        The run at its recorded steps.  State dicts and checkpoints (a folder or list, read
        safely) are loaded one at a time into ``model`` (a module or a factory), so one network
        is in memory at once.
    delta : int, optional
        ``Δ`` in steps; default: to the next recorded step (then ``Δ`` varies with ``s``, and is
        recorded as ``delta_steps``).
    Other arguments as :func:`predict_from_model`; ``ntk_kwargs`` (``method``, ``params``,
    ``chunk_size``) go to :func:`probes.ntk.empirical_ntk`.

    Returns
    -------
    xarray.Dataset over ``step`` (= ``s``, with ``time = η s``)
        ``gap_train_loss``, ``gap_train_output``, ``relative_gap_train``, the predicted and
        measured training losses at ``s + Δ``, ``delta_steps``, and the test counterparts when
        ``x_test`` is given.

    Cost
    ----
    One pass over the run.  Per compared step: one NTK on the training batch and one between
    test and training batches (``"full"``: ``(n + m)·n·k²`` entries, by
    :func:`probes.ntk.empirical_ntk`'s chosen method), a forward pass, and the prediction —
    one ``(n k)³`` eigendecomposition for the squared loss, ``Δ`` steps of ``(n k)²`` work for
    cross-entropy.  Outputs of every model are kept (``(n + m)·k`` numbers per step).
    """
    from traindyn.dynamics import records

    if delta is not None and (not isinstance(delta, (int, np.integer)) or delta < 1):
        raise ValueError(f"delta must be a positive integer number of steps or None; got "
                         f"{delta!r}")
    y_tr = _targets(y_train, "y_train")
    y_te = _targets(y_test, "y_test") if y_test is not None else None
    steps, series = _series(models, model, strict)
    recorded = set(steps)
    if delta is None:
        targets = dict(zip(steps[:-1], steps[1:], strict=True))
    else:
        targets = {s: s + delta for s in steps if s + delta in recorded}
    outputs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    pending: dict[int, tuple[int, xr.Dataset]] = {}   # s → (s + Δ, prediction)
    for s, net in series:
        f_tr = model_outputs(net, x_train)
        f_te = model_outputs(net, x_test) if x_test is not None else None
        outputs[s] = (f_tr, f_te)
        if s in targets:
            pending[s] = (targets[s], predict_from_model(
                net, x_train, y_train, [targets[s]], learning_rate, step=s, x_test=x_test,
                y_test=y_test, loss=loss, normalization=normalization, dynamics=dynamics,
                kernel=kernel, **ntk_kwargs))
    if not pending:
        raise ValueError(f"no recorded step s has s + Δ recorded (steps {steps}, "
                         f"delta={delta}); choose delta among the differences of the steps")
    rows = []
    for s, (target, pred) in sorted(pending.items()):
        rows.append((s, _gap_row(s, target, pred, outputs[s], outputs[target], y_tr, y_te,
                                 loss)))
    names = rows[0][1].keys()
    s_arr = np.array([r[0] for r in rows], dtype=np.int64)
    data = {name: ("step", np.array([r[1][name] for r in rows], dtype=float),
                   {"long_name": _GAP_ATTRS[name],
                    "units": "nat" if (loss == "cross_entropy" and "loss" in name) else "1"})
            for name in names}
    ds = xr.Dataset(data, coords=records.step_coords(s_arr, learning_rate), attrs={
        "source": "traindyn dynamics.predict.lazy_rich_gap: measured vs linearised "
                  "(Lee et al. 2019, Sec. 2.2) from each recorded step",
        "parameters": records.params_attr(dict(delta=delta, loss=loss, kernel=kernel,
                                               dynamics=dynamics, learning_rate=learning_rate,
                                               normalization=normalization)),
        "kind": "measurement", **records.provenance()})
    return records.validate(ds)


def _gap_row(s: int, target: int, pred: xr.Dataset, at_s: tuple, at_target: tuple,
             y_tr: np.ndarray, y_te: np.ndarray | None, loss: str) -> dict[str, float]:
    from traindyn.theory.kernel_flow import losses_of

    row: dict[str, float] = {"delta_steps": float(target - s)}
    for split, idx, y in (("train", 0, y_tr), ("test", 1, y_te)):
        f_s, f_meas = at_s[idx], at_target[idx]
        if f_meas is None:
            continue
        f_pred = pred[f"f_{split}"].values[0]
        diff = f_meas - f_pred
        change = np.linalg.norm(f_meas - f_s)
        row[f"gap_{split}_output"] = float(np.sqrt((diff ** 2).mean()))
        if change > 0:
            row[f"relative_gap_{split}"] = float(np.linalg.norm(diff) / change)
        else:
            warnings.warn(f"lazy_rich_gap: the {split} outputs did not change from step {s} to "
                          f"{target}: relative_gap_{split} is undefined (NaN)", RuntimeWarning,
                          stacklevel=3)
            row[f"relative_gap_{split}"] = float("nan")
        if f"{split}_loss" in pred and y is not None:
            Y = _loss_targets(y, f_meas.shape[1], loss)
            measured, _ = losses_of(f_meas, Y, loss)
            predicted = float(pred[f"{split}_loss"].values[0])
            row[f"measured_{split}_loss"] = float(measured)
            row[f"predicted_{split}_loss"] = predicted
            row[f"gap_{split}_loss"] = float(measured) - predicted
    return row


def _loss_targets(y: np.ndarray, k: int, loss: str) -> np.ndarray:
    """Targets as (n, k) rows, as ``theory.kernel_flow`` reads them."""
    y = np.asarray(y, dtype=float)
    if loss == "cross_entropy" and y.ndim == 1:
        return np.eye(k)[y.astype(np.int64)]
    return y.reshape(y.shape[0], -1)
