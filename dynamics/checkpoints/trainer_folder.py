"""Hugging Face Trainer ``checkpoint-*/`` folders of a plain ``nn.Module`` (format
``"weights_dir"``): no ``config.json``; the ``model.safetensors`` / ``pytorch_model.bin``
inside (sharded ``*.index.json`` included) is a state dict.  The step in the folder name is
cross-checked with ``trainer_state.json``'s ``global_step``.

A Trainer folder *with* ``config.json`` is a Hugging Face model folder (``hf_folder``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from traindyn.dynamics.checkpoints import _state
from traindyn.dynamics.checkpoints.base import CheckpointReader, register_reader


def trainer_state_step(folder: Path) -> tuple[int | None, str, str]:
    """``global_step`` of a Trainer checkpoint's ``trainer_state.json``, as
    :meth:`~traindyn.dynamics.checkpoints.CheckpointReader.recorded_step` answers."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return None, "", ""
    try:
        value = json.loads(state_file.read_text()).get("global_step")
    except (ValueError, OSError, AttributeError) as err:
        raise ValueError(f"cannot read {state_file}: {err}") from None
    if value is None:
        return None, "", ""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{state_file} has global_step {value!r}, not a step number")
    return value, "trainer_state", "its trainer_state.json has global_step"


@register_reader
class TrainerFolderReader(CheckpointReader):
    """A folder holding ``model.safetensors`` / ``pytorch_model.bin`` but no ``config.json``."""

    name = "weights_dir"
    description = ("Hugging Face Trainer checkpoint-*/ of a plain module (model.safetensors "
                   "or pytorch_model.bin, no config.json)")
    priority = 10

    def can_open(self, path: Path) -> bool:
        """A folder with one of the Trainer's weight files."""
        return path.is_dir() and any((path / name).is_file() for name in _state.DIR_WEIGHT_FILES)

    def recorded_step(self, path: Path) -> tuple[int | None, str, str]:
        """The ``global_step`` of ``trainer_state.json``, if the folder has one."""
        return trainer_state_step(path)

    def weight_files(self, path: Path) -> list[Path]:
        """The weight files and shard indexes in the folder."""
        return _state.folder_weight_files(path)

    def read(self, path: Path) -> Mapping[str, torch.Tensor]:
        """The folder's state dict (safetensors preferred; every shard of a sharded one)."""
        return _state.folder_state_dict(path)
