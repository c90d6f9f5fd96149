"""The training monitor as a PyTorch Lightning callback (needs ``pip install lightning``).

::

    callback = MonitorCallback(probes=["rankme", "alpha_req"], layers=["encoder.2"],
                               schedule=log_spaced(5000, 40), probe_data=x_probe,
                               store="run.zarr")
    trainer = lightning.Trainer(max_steps=5000, callbacks=[callback])
    trainer.fit(module, loader)
    ds = callback.to_dataset()

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

from collections.abc import Sequence
from pathlib import Path
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

from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import Schedule

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

    Parameters are those of :class:`~dynamics.monitor.Monitor` (without ``model``); the
    learning rate for the ``time`` coordinate is read from the first optimiser when not given.
    ``background`` chooses the monitor's mode (``False``, ``"thread"`` or ``"process"``; see
    :mod:`dynamics.monitor`); an existing ``store`` needs ``overwrite=True`` or ``resume=True``
    (else ``FileExistsError`` in ``setup``, before training starts).
    """

    def __init__(
        self,
        probes: Sequence[Any] = ("rankme", "alpha_req"),
        layers: Sequence[str] = (),
        schedule: Schedule | None = None,
        probe_data: Any = None,
        probe_targets: Any = None,
        learning_rate: float | None = None,
        reduce: str = "flatten",
        seed: int | None = None,
        store: str | Path | None = None,
        netcdf: str | Path | None = None,
        background: bool | str = False,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self.kwargs = dict(probes=probes, layers=layers, schedule=schedule, reduce=reduce,
                           seed=seed, store=store, netcdf=netcdf, background=background,
                           overwrite=overwrite, resume=resume,
                           source="traindyn Monitor (Lightning callback)")
        self.probe_data = probe_data
        self.probe_targets = probe_targets
        self.learning_rate = learning_rate
        self.monitor: Monitor | None = None
        self._last_step: int | None = None

    def _step(self, step: int, **scalars: float) -> None:
        if step != self._last_step:   # gradient accumulation repeats a global step
            self._last_step = step
            self.monitor.step(step, **scalars)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.monitor is not None:
            return
        device = pl_module.device
        self.monitor = Monitor(pl_module, probe_data=_to(self.probe_data, device),
                               probe_targets=_to(self.probe_targets, device),
                               learning_rate=self.learning_rate, **self.kwargs)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor.learning_rate is None and trainer.optimizers:
            self.monitor.learning_rate = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._step(trainer.global_step, train_loss=float("nan"))  # no batch seen yet

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss(outputs)
        self._step(trainer.global_step, **({} if loss is None else {"train_loss": loss}))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.monitor.close()

    def to_dataset(self) -> Any:
        """The monitor's Dataset (see :meth:`dynamics.monitor.Monitor.to_dataset`)."""
        if self.monitor is None:
            raise RuntimeError("the callback has not been set up: run trainer.fit first")
        return self.monitor.to_dataset()
