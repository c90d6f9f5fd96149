"""Find, order, hash and safely load the checkpoints of a training run.

A *checkpoint series* is a folder (or a list of paths) of checkpoints in any of the
registered formats.  Each format is one reader class (:class:`CheckpointReader`, modelled on
xarray's ``BackendEntrypoint``) in one module of this package, registered by name:

===============  ============================================================================
``format``       what (module)
===============  ============================================================================
``torch``        PyTorch state dicts ``.pt``, ``.pth``, ``.bin``, ``.ckpt`` read with
                 ``torch.load(weights_only=True)``: a pickle that asks to import or call
                 anything is refused with :class:`UnsafeCheckpointError` before anything runs
                 (``torch_file``)
``safetensors``  ``.safetensors`` files, read lazily, shapes and dtypes checked from the header
                 before any data is read (``safetensors_file``)
``hf``           Hugging Face model folders (``config.json`` plus ``model.safetensors`` or
                 ``pytorch_model.bin``) loaded with ``local_files_only=True``,
                 ``HF_HUB_OFFLINE=1`` and ``trust_remote_code=False``: never a call to the Hub,
                 never the folder's own code (``hf_folder``)
``weights_dir``  Hugging Face Trainer ``checkpoint-*/`` folders of a plain ``nn.Module`` (no
                 ``config.json``): the weights inside are a state dict; the step in the name is
                 cross-checked with ``trainer_state.json`` (``trainer_folder``)
``lightning``    PyTorch Lightning ``.ckpt`` files: the ``state_dict`` entry only, the
                 LightningModule attribute holding the model (``model.``, ``net.`` …) found by
                 matching keys, an ambiguous one (``model.`` and ``ema.``) an error until
                 ``prefix=`` chooses; step from ``global_step`` (``lightning_ckpt``)
``hub_cache``    a Hugging Face Hub cache folder ``models--org--name``: a series of revisions
                 (``refs/step1000`` → ``snapshots/<hash>/``), each an ``hf`` checkpoint
                 (``hub_cache``)
===============  ============================================================================

Adding a format is one new module here (see :mod:`traindyn.dynamics.checkpoints.base`).

Steps come from the names (``step1000``, ``step=1000``, ``checkpoint-1000``, ``ckpt_000100``,
``global_step1000``, ``iter_1000``, or a name that is only digits) or the checkpoints' own
records (``trainer_state.json``, Lightning's ``global_step``) unless an explicit list is given;
each :class:`Checkpoint` records where its step came from (``step_source``).  Explicit steps
pair with a list of paths in the order given, and one that contradicts the checkpoint's own
step is an error unless forced.  Checkpoints are hashed by **content** (names, dtypes, shapes
and bytes of the tensors), not by file bytes, so that the same weights saved twice under
different names are recognised as duplicates (published step series have been found to serve
identical weights at different steps).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from traindyn.dynamics.checkpoints import _state
from traindyn.dynamics.checkpoints._discovery import find_checkpoints
from traindyn.dynamics.checkpoints._factory import resolve_factory
from traindyn.dynamics.checkpoints._state import hash_state_dict
from traindyn.dynamics.checkpoints.base import (
    READERS,
    STATE_DICT_SUFFIXES,
    STEP_SOURCES,
    Checkpoint,
    CheckpointError,
    CheckpointReader,
    UnsafeCheckpointError,
    get_reader,
    guess_reader,
    parse_step,
    register_reader,
)
from traindyn.dynamics.checkpoints.hf_folder import HF_WEIGHT_FILES, is_hf_folder, load_hf_model

__all__ = [
    "HF_WEIGHT_FILES",
    "READERS",
    "STATE_DICT_SUFFIXES",
    "STEP_SOURCES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointReader",
    "UnsafeCheckpointError",
    "find_checkpoints",
    "get_reader",
    "guess_reader",
    "hash_state_dict",
    "is_hf_folder",
    "load_hf_model",
    "load_into",
    "load_readers",
    "load_state_dict",
    "parse_step",
    "register_reader",
    "resolve_factory",
]

ENTRY_POINT_GROUP = "traindyn.checkpoint_readers"
"""Entry-point group through which an installed package registers its reader classes."""

_loaded = False


def load_readers() -> dict[str, CheckpointReader]:
    """Import every reader module of this package and of the :data:`ENTRY_POINT_GROUP`
    entry points (once) and return :data:`READERS`."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_") and module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            cls = entry.load()
            if cls.name not in READERS:
                register_reader(cls)
    return READERS


def _reader_of(path: Path) -> CheckpointReader:
    """The reader of a single checkpoint (a file or folder), by content where names agree."""
    reader = guess_reader(path)
    if reader is None:
        if not path.exists():
            raise CheckpointError(f"no checkpoint at {path}")
        if path.is_dir():
            return get_reader("weights_dir")  # reports the weight files it looked for
        return get_reader("torch")            # reports why the file cannot be read
    return reader


def load_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """Read a state dict safely: ``.safetensors`` lazily, PyTorch files with ``weights_only``.

    PyTorch files may hold the state dict at the top level or under ``state_dict``,
    ``model_state_dict``, ``model`` or ``module`` (training-loop and Lightning checkpoints).
    A folder (Hugging Face model or Trainer ``checkpoint-*``) gives the state dict of its
    ``model.safetensors`` / ``pytorch_model.bin`` (sharded ``*.index.json`` included).

    Raises
    ------
    UnsafeCheckpointError
        The pickle would import or call something: refused, nothing executed.
    CheckpointError
        Truncated or unreadable file, or no tensors in it.
    """
    path = Path(path)
    return _reader_of(path).read(path)


def load_into(model: nn.Module, checkpoint: Checkpoint | str | os.PathLike,
              strict: bool = True, prefix: str | None = None) -> str:
    """Copy a checkpoint's weights into ``model`` after checking them; return the content hash.

    A Lightning checkpoint contributes the keys under the LightningModule attribute that holds
    the model: the one whose keys, with the attribute's name removed, match the model's (``""``
    when the model is the LightningModule itself); its other attributes' tensors are ignored
    and do not enter the hash.  When several attributes match equally well (``model.`` and
    ``ema.``, ``student.`` and ``teacher.``) the load fails naming them; ``prefix="ema."``
    chooses (``prefix`` works for every format: only keys under it are used, without it).

    Checks, each failing with a :class:`CheckpointError` that names the problem: the file reads
    (not truncated, not an unsafe pickle), the keys match the model's state dict (missing or,
    with ``strict``, unexpected keys), every shape matches, every dtype is of the model's kind
    (bool, integer, floating or complex: an int64 tensor is not cast into a float weight),
    every floating value is finite.  Shapes and dtypes are checked before any tensor is
    copied.  Tensors are read and copied one at a time (safetensors lazily), so peak memory is
    the model plus one tensor.

    Returns
    -------
    str
        :func:`hash_state_dict` of the checkpoint's tensors.
    """
    if isinstance(checkpoint, Checkpoint):
        path, reader = checkpoint.path, checkpoint.reader
    else:
        path = Path(checkpoint)
        reader = _reader_of(path)
    return _state.copy_into(model, reader.read(path), path, strict=strict, prefix=prefix)


load_readers()
