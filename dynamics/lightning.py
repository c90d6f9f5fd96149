"""The training monitor as a PyTorch Lightning callback (needs ``pip install lightning``).

::

    callback = MonitorCallback(probes=["rankme", "alpha_req"], layers=["encoder.2"],
                               schedule=log_spaced(5000, 40), probe_data=x_probe,
                               store="run.zarr")
    trainer = lightning.Trainer(max_steps=5000, callbacks=[callback],
                                logger=CSVLogger("logs"))
    trainer.fit(module, loader)
    ds = callback.to_dataset()

The keyword arguments are those of :class:`dynamics.monitor.Monitor` (without ``model``:
the LightningModule); or pass a ``Monitor`` built on the module yourself,
``MonitorCallback(Monitor(module, ...))``.

**Values reach the trainer's loggers.**  Each recorded evaluation is sent to every logger of
the trainer (``trainer.loggers``: TensorBoard, CSV, Weights & Biases …) with
``logger.log_metrics(values, step=<the evaluation's step>)``, under the names of
:mod:`dynamics.tensorboard` (``rankme/<layer>``, ``train_loss`` …), and stored in
``trainer.callback_metrics``, so ``ModelCheckpoint(monitor="rankme/encoder.2")`` or
``EarlyStopping`` can use them.  In background modes an evaluation is sent when it comes
back from the worker (at a later batch, still with its own step).  ``log=False`` turns this
off.

Steps follow ``trainer.global_step`` (optimiser steps taken): the evaluation at step ``s``
sees the weights after ``s`` updates, as in a plain loop that calls ``monitor.step(s)`` before
update ``s``.  Step 0 is evaluated when training starts (``train_loss`` NaN); at a later step
the ``train_loss`` recorded is the loss of the batch that produced the last update (as
Lightning reports it).
The callback builds a :class:`dynamics.monitor.Monitor` on the LightningModule in ``setup``,
with the probe batch moved to the module's device (probes call ``pl_module(probe_data)``, so
the module needs a ``forward``); everything the monitor guarantees (the run
is undisturbed, evaluations stream to Zarr) holds here too.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as error:
        raise ImportError("traindyn.dynamics.lightning needs PyTorch Lightning: "
                          "pip install lightning") from error

from traindyn.dynamics._renamed import rename_kwargs
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.tensorboard import scalar_series

__all__ = ["MonitorCallback"]


def _to(data: Any, device: torch.device) -> Any:
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        return data.to(device)
    return [d.to(device) for d in data]


def _loss(outputs: Any) -> float | None:
    if isinstance(outputs, torch.Tensor):
        return float(outputs.detach())
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return float(outputs["loss"].detach())
    return None


class MonitorCallback(Callback):
    """Run a :class:`~dynamics.monitor.Monitor` on the LightningModule being trained.

    Parameters
    ----------
    monitor : Monitor, optional
        A monitor built on the module (or one of its submodules) by the caller; without it,
        one is built in ``setup`` from ``monitor_kwargs``.
    log : bool
        Send each recorded evaluation to the trainer's loggers and ``callback_metrics``
        (module docstring).
    **monitor_kwargs
        Keyword arguments of :class:`~dynamics.monitor.Monitor` (``probes``, ``layers``,
        ``schedule``, ``probe_data``, ``probe_labels``, ``store``, ``background`` …).  The
        probe batch and its labels are moved to the module's device; the learning rate for the
        ``time`` coordinate is read from the first optimiser when not given.  An existing
        ``store`` needs ``overwrite=True`` or ``resume=True`` (else ``FileExistsError`` in
        ``setup``, before training starts).
    """

    def __init__(self, monitor: Monitor | None = None, *, log: bool = True,
                 **monitor_kwargs: Any) -> None:
        super().__init__()
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"MonitorCallback takes a Monitor or Monitor's keyword arguments "
                            f"(probes=..., layers=..., ...); got {type(monitor).__name__} as "
                            "its first argument")
        if monitor is not None and monitor_kwargs:
            raise TypeError("MonitorCallback: give a Monitor or keyword arguments for one, "
                            f"not both (got {sorted(monitor_kwargs)})")
        if "model" in monitor_kwargs:
            raise TypeError("MonitorCallback: the model is the LightningModule being trained; "
                            "do not pass model=")
        rename_kwargs(monitor_kwargs, {"probe_targets": "probe_labels"}, "MonitorCallback")
        monitor_kwargs.setdefault("source", "traindyn Monitor (Lightning callback)")
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = monitor
        self.log = log
        self._last_step: int | None = None
        self._lock = threading.Lock()
        self._unsent: list[Any] = []
        if monitor is not None and log:
            monitor.on_record.append(self._received)

    def _received(self, ds: Any) -> None:
        """A recorded evaluation (called on the thread that records it): kept for the
        training thread, which sends it to the loggers."""
        with self._lock:
            self._unsent.append(ds)

    def _send(self, trainer: Any) -> None:
        """Send the evaluations recorded since the last call to the trainer's loggers."""
        with self._lock:
            unsent, self._unsent = self._unsent, []
        for ds in unsent:
            by_step: dict[int, dict[str, float]] = {}
            for tag, step, value in scalar_series(ds):
                by_step.setdefault(step, {})[tag] = value
            for step, metrics in sorted(by_step.items()):
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
                for tag, value in metrics.items():
                    trainer.callback_metrics[tag] = torch.tensor(value)

    def _step(self, trainer: Any, step: int, **scalars: float) -> None:
        if step != self._last_step:   # gradient accumulation repeats a global step
            self._last_step = step
            self.monitor.step(step, **scalars)
        if self.log:
            self._send(trainer)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.monitor is not None:
            return
        device = pl_module.device
        kwargs = dict(self.monitor_kwargs)
        for key in ("probe_data", "probe_labels"):
            kwargs[key] = _to(kwargs.get(key), device)
        self.monitor = Monitor(pl_module, **kwargs)
        if self.log:
            self.monitor.on_record.append(self._received)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor.learning_rate is None and trainer.optimizers:
            self.monitor.learning_rate = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._step(trainer, trainer.global_step, train_loss=float("nan"))  # no batch seen yet

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss(outputs)
        self._step(trainer, trainer.global_step,
                   **({} if loss is None else {"train_loss": loss}))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.monitor.close()
        if self.log:
            self._send(trainer)
            for logger in trainer.loggers:
                logger.save()

    def to_dataset(self) -> Any:
        """The monitor's Dataset (see :meth:`dynamics.monitor.Monitor.to_dataset`)."""
        if self.monitor is None:
            raise RuntimeError("the callback has not been set up: run trainer.fit first")
        return self.monitor.to_dataset()
