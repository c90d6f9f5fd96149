"""PyTorch Lightning ``.ckpt`` files (format ``"lightning"``).

Only the ``state_dict`` entry is used, read with ``torch.load(weights_only=True)``.  It holds
every attribute of the LightningModule: the model's keys are looked for under the attribute
(``model.``, ``net.`` …) that matches the target model; when two attributes match equally well
(``model.`` and ``ema.``, ``student.`` and ``teacher.``) loading stops with an error naming
them, and ``prefix=`` (``--prefix``) chooses.  The step is the file's ``global_step`` entry,
cross-checked with ``step=100`` in the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from traindyn.dynamics.checkpoints import _state
from traindyn.dynamics.checkpoints.base import CheckpointError, CheckpointReader, register_reader


def lightning_record(path: Path) -> dict[str, Any] | None:
    """The top level of a Lightning checkpoint (``state_dict`` + ``global_step`` …), else None.

    Read with ``weights_only=True`` and memory-mapped, so only the small pickle is parsed.  A
    file that cannot be read safely is left to fail, with its reason, when it is loaded.
    """
    try:
        obj = _state.torch_load(path)
    except CheckpointError:
        return None
    return dict(obj) if _state.is_lightning(obj) else None


@register_reader
class LightningReader(CheckpointReader):
    """A ``.ckpt`` written by Lightning's ``Trainer.save_checkpoint``."""

    name = "lightning"
    description = "PyTorch Lightning .ckpt (its state_dict entry; step from global_step)"
    priority = 20

    def can_open(self, path: Path) -> bool:
        """A ``.ckpt`` file whose top level is Lightning's record."""
        return path.is_file() and path.suffix == ".ckpt" and lightning_record(path) is not None

    def recorded_step(self, path: Path) -> tuple[int | None, str, str]:
        """The record's ``global_step`` entry."""
        record = lightning_record(path)
        value = None if record is None else record.get("global_step")
        if value is None:
            return None, "", ""
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path} has global_step {value!r}, not a step number")
        return int(value), "lightning", "its Lightning global_step entry is"

    def read(self, path: Path) -> Mapping[str, torch.Tensor]:
        """The ``state_dict`` entry, its keys marked as the LightningModule's attributes."""
        state = _state.extract_state_dict(_state.torch_load(path), path)
        state.attributes = True
        return state
