"""Hugging Face model folders (``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin``), loaded by ``transformers`` with ``local_files_only=True``,
``HF_HUB_OFFLINE=1`` (never a call to the Hub), ``weights_only=True`` and
``trust_remote_code=False``: a folder whose ``config.json`` maps the model to Python files of
its own (``auto_map``) is refused before ``transformers`` is asked, so none of its code runs,
whatever is typed on stdin.

A list of such folders is a revision series of one model (Pythia-style ``step1000``,
``revision-step1000``, or ``main`` with an explicit step).  A Trainer ``checkpoint-*/``
folder with ``config.json`` is one of them; its step in the name is cross-checked with
``trainer_state.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from traindyn.dynamics.checkpoints import _state
from traindyn.dynamics.checkpoints.base import (
    CheckpointError,
    CheckpointReader,
    UnsafeCheckpointError,
    register_reader,
)
from traindyn.dynamics.checkpoints.trainer_folder import trainer_state_step

__all__ = ["HF_WEIGHT_FILES", "HFFolderReader", "custom_code", "is_hf_folder", "load_hf_model"]

HF_WEIGHT_FILES = _state.DIR_WEIGHT_FILES
"""Any of these next to ``config.json`` makes a folder a Hugging Face checkpoint."""


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder with ``config.json`` and Hugging Face weights."""
    path = Path(path)
    return (path.is_dir() and (path / "config.json").is_file()
            and any((path / name).is_file() for name in HF_WEIGHT_FILES))


def custom_code(folder: str | os.PathLike) -> dict[str, str]:
    """The ``auto_map`` entries of a folder's ``config.json`` and ``tokenizer_config.json``:
    the classes that ``transformers`` would import from Python files of the folder (or of
    another repository) with ``trust_remote_code=True``.  Empty for an ordinary folder."""
    found: dict[str, str] = {}
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (ValueError, OSError):
            continue  # transformers reports an unreadable file itself
        auto_map = record.get("auto_map") if isinstance(record, Mapping) else None
        if isinstance(auto_map, Mapping):
            for key, value in auto_map.items():
                found[f"{name}: {key}"] = ", ".join(str(v) for v in value if v) \
                    if isinstance(value, (list, tuple)) else str(value)
    return found


def refuse_custom_code(folder: Path, what: str = "model",
                       error: type[Exception] = UnsafeCheckpointError) -> None:
    """Raise ``error`` (default :class:`~traindyn.dynamics.checkpoints.UnsafeCheckpointError`)
    for a folder that declares code of its own (:func:`custom_code`)."""
    entries = custom_code(folder)
    if entries:
        shown = "; ".join(f"{k} -> {v}" for k, v in list(entries.items())[:4])
        raise error(
            f"refused to load the {what} of {folder.name}: its auto_map names Python code of "
            f"its own ({shown}). traindyn never runs code from a checkpoint "
            f"(trust_remote_code=False); build the model with code you have reviewed (a model "
            f"factory, --model file.py:function) and load the folder's weights as a state dict")


def offline_transformers() -> Any:
    """``transformers``, imported with the Hub switched off for this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("Hugging Face checkpoints need transformers: "
                          "pip install 'traindyn[hf]'") from err
    return transformers


@contextlib.contextmanager
def quiet_transformers(transformers: Any, quiet: bool) -> Iterator[None]:
    """Switch off ``transformers``' (and the Hub's) progress bars and info/warning logging."""
    if not quiet:
        yield
        return
    tlog = transformers.utils.logging
    bars, verbosity = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def load_hf_model(folder: str | os.PathLike, model_class: str = "AutoModel",
                  strict: bool = True, progress: bool = True) -> tuple[nn.Module, str]:
    """Load a local Hugging Face model folder (never the Hub) and return ``(model, hash)``.

    ``model_class`` names a ``transformers`` class (``AutoModel`` gives the hidden states,
    ``AutoModelForCausalLM`` adds the LM head).  Weights are read by ``transformers`` with
    ``weights_only=True`` (safetensors preferred) and ``trust_remote_code=False``.  With
    ``strict``, weights the checkpoint lacks (which ``transformers`` would initialise at
    random) fail the checkpoint; non-finite weights always do.  ``progress=False`` silences
    ``transformers``' loading bars and its info/warning logging for the duration of the call
    (``traindyn analyze --no-progress``).

    Raises
    ------
    UnsafeCheckpointError
        The folder's ``config.json`` maps the model to code of its own (``auto_map``), or a
        pickle in it asks to run code: refused, nothing executed.
    CheckpointError
        Not a model folder, unreadable, shape mismatch, missing (with ``strict``) or
        non-finite weights.
    """
    folder = Path(folder).resolve()
    if not is_hf_folder(folder):
        raise CheckpointError(f"{folder} is not a Hugging Face model folder "
                              f"(config.json plus one of {', '.join(HF_WEIGHT_FILES)})")
    refuse_custom_code(folder)
    transformers = offline_transformers()
    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ValueError(f"transformers has no class {model_class!r}")
    torch.manual_seed(0)  # weights the checkpoint lacks (strict=False) are drawn reproducibly
    try:
        with quiet_transformers(transformers, quiet=not progress):
            model, info = cls.from_pretrained(str(folder), local_files_only=True,
                                              weights_only=True, trust_remote_code=False,
                                              output_loading_info=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_state.unsafe_message(folder, err)) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load {folder.name}: {type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err) else ''}") from None
    missing = sorted(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise CheckpointError(
            f"shape mismatch in {folder.name}: {_state.listing([str(m) for m in mismatched], 3)}")
    if strict and missing:
        raise CheckpointError(f"{folder.name} lacks {len(missing)} weights of {model_class} "
                              f"(they would be random): {_state.listing(missing)}")
    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{folder.name}: tensor {key!r} has non-finite values")
    return model, _state.hash_state_dict(state)


@register_reader
class HFFolderReader(CheckpointReader):
    """A ``transformers`` model folder; :meth:`load` builds the model from its ``config.json``."""

    name = "hf"
    description = "Hugging Face model folder (config.json + model.safetensors / pytorch_model.bin)"
    priority = 20
    builds_model = True

    def can_open(self, path: Path) -> bool:
        """A folder with ``config.json`` and one of :data:`HF_WEIGHT_FILES`."""
        return is_hf_folder(path)

    def recorded_step(self, path: Path) -> tuple[int | None, str, str]:
        """The ``global_step`` of a Trainer checkpoint's ``trainer_state.json``, if any."""
        return trainer_state_step(path)

    def weight_files(self, path: Path) -> list[Path]:
        """``config.json`` and the weight files."""
        return [path / "config.json", *_state.folder_weight_files(path)]

    def read(self, path: Path) -> Mapping[str, torch.Tensor]:
        """The folder's state dict (for a model built by other means)."""
        return _state.folder_state_dict(path)

    def load(self, path: Path, model: nn.Module | None = None, *, strict: bool = True,
             prefix: str | None = None, model_class: str = "AutoModel",
             progress: bool = True) -> tuple[nn.Module, str]:
        """Build ``model_class`` from the folder (:func:`load_hf_model`), or, given a model,
        copy the folder's weights into it."""
        if model is not None:
            return super().load(path, model, strict=strict, prefix=prefix)
        return load_hf_model(path, model_class, strict=strict, progress=progress)
