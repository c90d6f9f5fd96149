"""Live scalars: a monitor's evaluations as TensorBoard scalars (``Monitor(tensorboard=DIR)``).

Every numeric variable of an evaluation that is a number per step (a loss, an accuracy, a
model probe's value) or per step and layer (RankMe, alpha-ReQ, the weight-spectrum summaries …)
becomes one TensorBoard scalar series, written at the evaluation's ``step``:

* ``<variable>`` for a ``(step,)`` variable, e.g. ``train_loss``;
* ``<variable>/<layer>`` for a ``(step, layer)`` variable, e.g. ``rankme/encoder.2``;
* ``…/seed<k>`` appended for a Dataset with a ``seed`` dimension.

Variables with other dimensions (spectra, matrices) are left out: TensorBoard's scalar board
shows numbers over steps.  NaN values are written as NaN (TensorBoard leaves a gap), so a
missing measurement is visible rather than silently absent.  TensorBoard stores scalars as
float32.

Writing uses ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard`` package
(``pip install tensorboard``, or the ``tensorboard`` extra of traindyn).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["TensorBoardWriter", "scalar_series"]


def scalar_series(ds: xr.Dataset) -> Iterator[tuple[str, int, float]]:
    """``(tag, step, value)`` of every scalar of ``ds`` as TensorBoard would show it (module
    docstring), in the order of the variables, then layers, then steps."""
    if "step" not in ds.dims:
        return
    steps = [int(s) for s in ds["step"].values]
    for name, da in ds.data_vars.items():
        if da.dtype.kind not in "fiub" or "step" not in da.dims:
            continue
        extra = [d for d in da.dims if d not in ("step", "layer", "seed")]
        if extra:
            continue
        order = [d for d in ("layer", "seed") if d in da.dims]
        values = np.asarray(da.transpose(*order, "step"), dtype=float)
        labels: list[tuple[str, ...]] = [()]
        for dim in order:
            prefix = "seed" if dim == "seed" else ""
            labels = [(*lab, f"{prefix}{v}") for lab in labels for v in ds[dim].values]
        flat = values.reshape(len(labels), len(steps))
        for lab, row in zip(labels, flat, strict=True):
            tag = "/".join([str(name), *lab])
            for step, value in zip(steps, row, strict=True):
                yield tag, step, float(value)


class TensorBoardWriter:
    """Write each evaluation Dataset it is called with to a TensorBoard log directory.

    Parameters
    ----------
    log_dir : path
        The event-file folder (``tensorboard --logdir`` it).
    flush_secs : float
        How often the writer flushes to disk (``SummaryWriter``'s ``flush_secs``).
    """

    def __init__(self, log_dir: str | Path, flush_secs: float = 10.0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("Monitor(tensorboard=...) writes with torch.utils.tensorboard, "
                              "which needs the tensorboard package: pip install tensorboard "
                              "(or traindyn[tensorboard])") from error
        self.log_dir = Path(log_dir)
        self.writer: Any = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def __call__(self, ds: xr.Dataset) -> None:
        for tag, step, value in scalar_series(ds):
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
