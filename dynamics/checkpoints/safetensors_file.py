"""``.safetensors`` files: read lazily, one tensor at a time, shapes and dtypes checked from the
header before any data is read.  The format holds no code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from traindyn.dynamics.checkpoints import _state
from traindyn.dynamics.checkpoints.base import CheckpointReader, register_reader


@register_reader
class SafetensorsReader(CheckpointReader):
    """One ``.safetensors`` file of named tensors."""

    name = "safetensors"
    description = "safetensors file (.safetensors), read lazily"
    priority = 10

    def can_open(self, path: Path) -> bool:
        """A file ending in ``.safetensors``."""
        return path.is_file() and path.suffix == ".safetensors"

    def read(self, path: Path) -> Mapping[str, torch.Tensor]:
        """A lazy mapping over the file's tensors."""
        return _state.SafetensorsDict(path)
