"""The reader contract: one class per checkpoint format, registered by name.

Modelled on xarray's ``BackendEntrypoint`` (``xarray/backends/common.py``): a reader says
whether it can open a path (``can_open``, xarray's ``guess_can_open``), what training step the
checkpoint records (``step``) and how to load it (``load``, xarray's ``open_dataset``); the
registry maps a name (the :attr:`Checkpoint.format` of every checkpoint the reader opens) to
the reader, and :func:`guess_reader` asks the readers in order of ``priority``.

How to add a format
-------------------
Write one module in ``traindyn/dynamics/checkpoints/`` (any name not starting with ``_``)
that defines a :class:`CheckpointReader` subclass and registers it::

    from traindyn.dynamics.checkpoints.base import CheckpointReader, register_reader

    @register_reader
    class NumpyReader(CheckpointReader):
        name = "npz"
        description = "numpy .npz archives of named arrays"

        def can_open(self, path):
            return path.is_file() and path.suffix == ".npz"

        def read(self, path):
            import numpy as np, torch
            with np.load(path, allow_pickle=False) as data:
                return {k: torch.from_numpy(data[k]) for k in data.files}

The package imports every such module on first use, so ``find_checkpoints``, ``load_into``
and ``traindyn analyze`` then accept the format with nothing else changed.  A reader outside
traindyn registers itself when its module is imported (``traindyn analyze --import``) or
through the ``traindyn.checkpoint_readers`` entry-point group (the object named is the class).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from traindyn.dynamics.checkpoints._errors import CheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch
    from torch import nn

__all__ = [
    "READERS",
    "STATE_DICT_SUFFIXES",
    "STEP_SOURCES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointReader",
    "UnsafeCheckpointError",
    "get_reader",
    "guess_reader",
    "parse_step",
    "register_reader",
]

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File suffixes read with ``torch.load(weights_only=True)``."""

STEP_SOURCES = ("name", "trainer_state", "lightning", "explicit", "default")
"""Values of :attr:`Checkpoint.step_source`: the checkpoint's name, the Trainer's
``trainer_state.json``, a Lightning checkpoint's ``global_step`` entry, the caller's explicit
steps, or ``"default"`` (step 0 for a lone checkpoint with no step anywhere)."""

_STEP_PATTERN = re.compile(
    r"(?:global[_-]?step|step|checkpoint|ckpt|iteration|iter)[_=-]?(\d+)", re.IGNORECASE)


def parse_step(name: str) -> int | None:
    """Training step encoded in a checkpoint's file or folder name, or ``None``.

    Recognises ``step1000``, ``step_1000``, ``step=1000`` (Lightning's ``epoch=3-step=1000``),
    ``checkpoint-1000``, ``ckpt_000100``, ``global_step1000``, ``iter_1000``, and names made of
    digits only (``001000.pt``).  The last match in the name wins.

    >>> parse_step("checkpoint-1000"), parse_step("ckpt_000100.pt"), parse_step("final.pt")
    (1000, 100, None)
    """
    stem = Path(name).name
    for suffix in (".safetensors", *STATE_DICT_SUFFIXES):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    matches = _STEP_PATTERN.findall(stem)
    if matches:
        return int(matches[-1])
    if stem.isdigit():
        return int(stem)
    return None


class CheckpointReader:
    """One checkpoint format: recognise it, read its step, load it.

    Subclasses set :attr:`name` and :attr:`description` and override :meth:`can_open` and
    either :meth:`read` (formats holding a state dict: :meth:`load` then copies it into a model
    after the checks of :func:`~traindyn.dynamics.checkpoints.load_into`) or :meth:`load`
    (formats that build their own model, :attr:`builds_model`).  Readers are stateless; one
    instance per class is registered.
    """

    name: ClassVar[str] = ""
    """The registry key, stored as :attr:`Checkpoint.format`."""

    description: ClassVar[str] = ""
    """One line for listings and error messages."""

    priority: ClassVar[int] = 0
    """:func:`guess_reader` asks readers with a higher priority first (a Lightning ``.ckpt``
    before a plain PyTorch file, a Hugging Face model folder before a bare weights folder)."""

    builds_model: ClassVar[bool] = False
    """True when :meth:`load` builds the model itself (no model factory needed)."""

    # ---------------------------------------------------------------- recognition
    def can_open(self, path: Path) -> bool:
        """Whether ``path`` is a checkpoint of this format (cheap: names, small files)."""
        raise NotImplementedError

    def series(self, path: Path) -> list[tuple[Path, str]] | None:
        """``(checkpoint, revision name)`` of every checkpoint a folder holds, for formats whose
        folder is a whole series (a Hub cache); ``None`` for single-checkpoint formats."""
        return None

    # ---------------------------------------------------------------- steps
    def recorded_step(self, path: Path) -> tuple[int | None, str, str]:
        """The step the checkpoint records about itself: ``(step or None, source, wording)``.

        ``source`` is one of :data:`STEP_SOURCES`; ``wording`` completes "…, but ``wording``
        ``step``" in error messages.  The default: no record.
        """
        return None, "", ""

    def step(self, path: Path, name: str | None = None) -> tuple[int | None, str]:
        """The checkpoint's step and where it came from, or ``(None, "")``.

        The checkpoint's own record (:meth:`recorded_step`) wins; a step in the name (``name``,
        a revision name, or else the file name) that contradicts it is a ``ValueError`` naming
        both.
        """
        named = parse_step(name or path.name)
        recorded, source, wording = self.recorded_step(path)
        if recorded is not None:
            if named is not None and named != recorded:
                label = f"revision {name}" if name else describe(path)
                raise ValueError(
                    f"{label}: its name says step {named} but {wording} {recorded}; pass "
                    f"the steps explicitly (with force_steps=True / --force-steps) to choose")
            return recorded, source
        if named is not None:
            return named, "name"
        return None, ""

    # ---------------------------------------------------------------- content
    def weight_files(self, path: Path) -> list[Path]:
        """The files whose bytes make up the checkpoint (identity and resume checks)."""
        return [path]

    def read(self, path: Path) -> Mapping[str, torch.Tensor]:
        """The checkpoint's state dict, read safely (lazily where the format allows).

        A mapping with a true ``attributes`` attribute holds the attributes of a training
        wrapper (a LightningModule's ``model.*``, ``ema.*`` …): the model's keys are looked
        for under one of them (see :func:`~traindyn.dynamics.checkpoints.load_into`).
        """
        raise CheckpointError(f"{describe(path)}: the {self.name!r} reader has no state dict")

    def load(self, path: Path, model: nn.Module | None = None, *, strict: bool = True,
             prefix: str | None = None, model_class: str = "AutoModel",
             progress: bool = True) -> tuple[nn.Module, str]:
        """Load the checkpoint: ``(model, content hash)``.

        State-dict formats copy :meth:`read`'s tensors into ``model`` after checking names,
        shapes, dtype kinds and finiteness; ``prefix`` picks the attribute of a training
        wrapper that holds the model.  ``model_class`` and ``progress`` are for formats that
        build their own model.
        """
        from traindyn.dynamics.checkpoints import _state

        if model is None:
            raise CheckpointError(f"{describe(path)} is a state dict: a model factory "
                                  f"(--model module:function) is needed to build the network")
        return model, _state.copy_into(model, self.read(path), path, strict=strict,
                                       prefix=prefix)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.description}>"


READERS: dict[str, CheckpointReader] = {}
"""Every registered reader by name (the built-in ones once the package is imported)."""


def register_reader(cls: type[CheckpointReader]) -> type[CheckpointReader]:
    """Register a reader class under its :attr:`~CheckpointReader.name` (a class decorator).

    Raises ``ValueError`` for a class without a name or a name taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, CheckpointReader)):
        raise TypeError(f"register_reader takes a CheckpointReader subclass; got {cls!r}")
    if not cls.name:
        raise ValueError(f"reader {cls.__name__} has no name")
    other = READERS.get(cls.name)
    if other is not None and type(other).__qualname__ != cls.__qualname__:
        raise ValueError(f"a checkpoint reader named {cls.name!r} is already registered "
                         f"({type(other).__name__}); choose another name")
    READERS[cls.name] = cls()
    return cls


def _ordered() -> list[CheckpointReader]:
    from traindyn.dynamics.checkpoints import load_readers

    load_readers()
    return sorted(READERS.values(), key=lambda r: (-r.priority, r.name))


def get_reader(name: str) -> CheckpointReader:
    """The reader registered under ``name`` (``KeyError`` listing the known names)."""
    readers = {r.name: r for r in _ordered()}
    try:
        return readers[name]
    except KeyError:
        raise KeyError(f"unknown checkpoint format {name!r}; available: "
                       f"{', '.join(sorted(readers))}") from None


def guess_reader(path: str | os.PathLike, *, series: bool = False) -> CheckpointReader | None:
    """The first reader, by priority, that can open ``path``, or ``None``.

    With ``series=True`` only readers of whole series (:meth:`CheckpointReader.series`) are
    asked; otherwise only readers of single checkpoints.  Hidden files and ``*.tmp`` files are
    never checkpoints.
    """
    path = Path(path)
    if path.is_file() and (path.name.startswith(".") or path.name.endswith(".tmp")):
        return None
    for reader in _ordered():
        is_series = type(reader).series is not CheckpointReader.series
        if is_series == series and reader.can_open(path):
            return reader
    return None


def describe(path: Path) -> str:
    """``name/`` for a folder, ``name`` for a file (as messages show them)."""
    return f"{path.name}/" if path.is_dir() else path.name


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series.

    Attributes
    ----------
    path : Path
        The weights file, or the Hugging Face model / Trainer checkpoint folder.
    step : int
        Training step.
    format : str
        The name of its reader (:data:`READERS`): ``"torch"``, ``"safetensors"``, ``"hf"`` (a
        model folder loaded by ``transformers``), ``"weights_dir"`` (a folder whose
        ``model.safetensors`` / ``pytorch_model.bin`` is a state dict: a Trainer checkpoint of
        a plain module), ``"lightning"`` (a Lightning ``.ckpt``, its ``state_dict`` entry) …
    step_source : str
        Where ``step`` came from, one of :data:`STEP_SOURCES`.
    """

    path: Path
    step: int
    format: str
    step_source: str = "name"

    @property
    def reader(self) -> CheckpointReader:
        """The reader of this checkpoint's format."""
        return get_reader(self.format)

    def weight_files(self) -> list[Path]:
        """The files whose bytes make up this checkpoint (for identity and resume checks)."""
        return self.reader.weight_files(self.path)

    def identity(self) -> dict[str, Any]:
        """Path, sizes and modification times: a re-run recomputes a checkpoint that changed."""
        files = [p for p in self.weight_files() if p.exists()]
        return {
            "path": str(self.path.resolve()),
            "step": int(self.step),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        }
