"""PyTorch state-dict files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), read with
``torch.load(weights_only=True)``.

The restricted unpickler builds tensors and plain containers only, so a pickle that asks to
import or call anything (``os.system``, a class of the writer's code …) is refused with
:class:`~traindyn.dynamics.checkpoints.UnsafeCheckpointError` before anything runs.  The state
dict may sit at the top level or under ``state_dict``, ``model_state_dict``, ``model`` or
``module`` (training-loop checkpoints); wrapper prefixes (``module.``, ``_orig_mod.``,
``model.``) are dropped when that makes the keys match the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from traindyn.dynamics.checkpoints import _state
from traindyn.dynamics.checkpoints.base import (
    STATE_DICT_SUFFIXES,
    CheckpointReader,
    register_reader,
)


@register_reader
class TorchFileReader(CheckpointReader):
    """A file written by ``torch.save`` holding a state dict (or a dict that contains one)."""

    name = "torch"
    description = "PyTorch state dict (.pt, .pth, .bin, .ckpt), torch.load(weights_only=True)"
    priority = 10

    def can_open(self, path: Path) -> bool:
        """A file with one of :data:`~traindyn.dynamics.checkpoints.STATE_DICT_SUFFIXES`."""
        return path.is_file() and path.suffix in STATE_DICT_SUFFIXES

    def read(self, path: Path) -> Mapping[str, torch.Tensor]:
        """The state dict, memory-mapped; a Lightning-style dict marks its keys as attributes."""
        return _state.extract_state_dict(_state.torch_load(path), path)
