"""Find, order, hash and safely load the checkpoints of a training run.

A *checkpoint series* is a folder (or a list of paths) holding one of:

* PyTorch state dicts (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), read with
  ``torch.load(weights_only=True)``: the restricted unpickler builds tensors and plain
  containers only, so a pickle that asks to import or call anything (``os.system``, a class of
  the writer's code …) is refused with :class:`UnsafeCheckpointError` before anything runs;
* ``.safetensors`` files, read lazily (one tensor at a time, shapes checked before any data is
  read);
* Hugging Face model folders (``config.json`` plus ``model.safetensors`` or
  ``pytorch_model.bin``), loaded with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``:
  never a call to the Hub; a list of such folders is a revision series of one model
  (Pythia-style ``step1000``, ``revision-step1000``, or ``main`` with an explicit step);
* Hugging Face Trainer ``checkpoint-*/`` folders: with ``config.json`` they are model folders;
  without it (a Trainer wrapping a plain ``nn.Module``) the ``model.safetensors`` /
  ``pytorch_model.bin`` inside is a state dict (format ``"weights_dir"``); the step in the
  folder name is cross-checked with ``trainer_state.json``'s ``global_step``;
* PyTorch Lightning ``.ckpt`` files (format ``"lightning"``): only the ``state_dict`` entry is
  used, read with ``weights_only=True``; the LightningModule's attribute prefix (``model.``,
  ``net.`` …) is dropped when that makes the keys match the target model, and the step is the
  file's ``global_step`` entry (cross-checked with ``step=100`` in the name).

Steps come from the names (``step1000``, ``step=1000``, ``checkpoint-1000``, ``ckpt_000100``,
``global_step1000``, ``iter_1000``, or a name that is only digits) or the files' own records
(``trainer_state.json``, Lightning's ``global_step``) unless an explicit list is given; each
:class:`Checkpoint` records where its step came from (``step_source``).  Explicit steps pair
with a list of paths in the order given, and one that contradicts the checkpoint's own step
is an error unless forced.  Checkpoints are hashed by **content** (names, dtypes, shapes and
bytes of the tensors), not by file bytes, so that the same weights saved twice under
different names are recognised as duplicates (published step series have been found to
serve identical weights at different steps).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "HF_WEIGHT_FILES",
    "STATE_DICT_SUFFIXES",
    "STEP_SOURCES",
    "Checkpoint",
    "CheckpointError",
    "UnsafeCheckpointError",
    "find_checkpoints",
    "hash_state_dict",
    "is_hf_folder",
    "load_hf_model",
    "load_into",
    "load_state_dict",
    "parse_step",
    "resolve_factory",
]

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File suffixes read with ``torch.load(weights_only=True)``."""

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
"""Any of these next to ``config.json`` makes a folder a Hugging Face checkpoint."""

_STEP_PATTERN = re.compile(
    r"(?:global[_-]?step|step|checkpoint|ckpt|iteration|iter)[_=-]?(\d+)", re.IGNORECASE)
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights", "params")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_DIR_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")
STEP_SOURCES = ("name", "trainer_state", "lightning", "explicit", "default")
"""Values of :attr:`Checkpoint.step_source`: the checkpoint's name, the Trainer's
``trainer_state.json``, a Lightning checkpoint's ``global_step`` entry, the caller's explicit
steps, or ``"default"`` (step 0 for a lone checkpoint with no step anywhere)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be analysed; the message is the reason recorded in the Dataset."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code when loaded; it was refused and nothing was executed."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series.

    Attributes
    ----------
    path : Path
        The weights file, or the Hugging Face model / Trainer checkpoint folder.
    step : int
        Training step.
    format : {"torch", "safetensors", "hf", "weights_dir", "lightning"}
        ``"hf"``: a model folder loaded by ``transformers``; ``"weights_dir"``: a folder whose
        ``model.safetensors`` / ``pytorch_model.bin`` is a state dict (Trainer checkpoint of a
        plain module); ``"lightning"``: a Lightning ``.ckpt`` (its ``state_dict`` entry).
    step_source : str
        Where ``step`` came from, one of :data:`STEP_SOURCES`.
    """

    path: Path
    step: int
    format: str
    step_source: str = "name"

    def weight_files(self) -> list[Path]:
        """The files whose bytes make up this checkpoint (for identity and resume checks)."""
        if self.format not in ("hf", "weights_dir"):
            return [self.path]
        files = [self.path / "config.json"] if self.format == "hf" else []
        files += sorted(p for p in self.path.iterdir()
                        if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
        return files

    def identity(self) -> dict[str, Any]:
        """Path, sizes and modification times: a re-run recomputes a checkpoint that changed."""
        files = [p for p in self.weight_files() if p.exists()]
        return {
            "path": str(self.path.resolve()),
            "step": int(self.step),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        }


# --------------------------------------------------------------------------------------------
# discovery


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


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder with ``config.json`` and Hugging Face weights."""
    path = Path(path)
    return (path.is_dir() and (path / "config.json").is_file()
            and any((path / name).is_file() for name in HF_WEIGHT_FILES))


def _is_weights_dir(path: Path) -> bool:
    """A folder holding ``model.safetensors`` / ``pytorch_model.bin`` but no ``config.json``."""
    return path.is_dir() and any((path / name).is_file() for name in _DIR_WEIGHT_FILES)


def _format_of(path: Path) -> str | None:
    if path.is_dir():
        if is_hf_folder(path):
            return "hf"
        return "weights_dir" if _is_weights_dir(path) else None
    if path.name.startswith(".") or path.name.endswith(".tmp"):
        return None
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in STATE_DICT_SUFFIXES:
        return "torch"
    return None


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _trainer_state_step(folder: Path) -> int | None:
    """``global_step`` of a Trainer checkpoint's ``trainer_state.json``, if there is one."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return None
    try:
        value = json.loads(state_file.read_text()).get("global_step")
    except (ValueError, OSError, AttributeError) as err:
        raise ValueError(f"cannot read {state_file}: {err}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{state_file} has global_step {value!r}, not a step number")
    return value


def _lightning_record(path: Path) -> dict[str, Any] | None:
    """The top level of a Lightning checkpoint (``state_dict`` + ``global_step`` …), else None.

    Read with ``weights_only=True`` and memory-mapped, so only the small pickle is parsed.  A
    file that cannot be read safely is left to fail, with its reason, when it is loaded.
    """
    try:
        obj = _torch_load(path)
    except CheckpointError:
        return None
    if (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
            and ("global_step" in obj or "pytorch-lightning_version" in obj)):
        return dict(obj)
    return None


def _lightning_step(record: Mapping[str, Any], path: Path) -> int | None:
    value = record.get("global_step")
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path} has global_step {value!r}, not a step number")
    return int(value)


def _candidates(root: Path) -> list[Path]:
    """The checkpoints inside a folder, or the folder itself when it is one checkpoint."""
    children = [p for p in root.iterdir() if _format_of(p)]
    trainer_children = [p for p in children if p.is_dir() and p.name.startswith("checkpoint-")]
    if _format_of(root):
        # a Trainer output_dir holds the final model and its checkpoint-*/ folders: the series
        # is the checkpoints; any other model folder is a series of one
        return sorted(trainer_children, key=_natural_key) or [root]
    if not children:
        raise FileNotFoundError(
            f"no checkpoints in {root}: expected *.safetensors, "
            f"{', '.join('*' + s for s in STATE_DICT_SUFFIXES)} files, Hugging Face model "
            f"folders (config.json + weights) or Trainer checkpoint-*/ folders")
    return sorted(children, key=_natural_key)


def _describe(path: Path) -> str:
    return f"{path.name}/" if path.is_dir() else path.name


def _hub_revisions(root: Path) -> list[tuple[Path, str]] | None:
    """``(snapshot folder, revision name)`` of a Hugging Face Hub cache folder, else None.

    ``from_pretrained("EleutherAI/pythia-70m", revision="step1000")`` leaves
    ``models--EleutherAI--pythia-70m/refs/step1000`` (a commit hash) and
    ``snapshots/<hash>/`` (the files).  A revision without a step in its name (``main``) is
    dropped when a stepped revision names the same snapshot.
    """
    refs, snapshots = root / "refs", root / "snapshots"
    if not (refs.is_dir() and snapshots.is_dir()):
        return None
    found: dict[Path, list[str]] = {}
    for ref in sorted(p for p in refs.rglob("*") if p.is_file()):
        folder = snapshots / ref.read_text().strip()
        if is_hf_folder(folder):
            found.setdefault(folder, []).append(ref.relative_to(refs).as_posix())
    pairs = []
    for folder, names in found.items():
        stepped = [n for n in names if parse_step(n) is not None]
        pairs += [(folder, n) for n in (stepped or names)]
    return sorted(pairs, key=lambda pair: _natural_key(Path(pair[1])))


def _resolve_step(path: Path, fmt: str, explicit: int | None, force: bool, lone: bool,
                  record: Mapping[str, Any] | None = None,
                  name: str | None = None) -> tuple[int | None, str]:
    """The step of one checkpoint and where it came from; contradictions are ValueErrors."""
    named = parse_step(name or path.name)
    label = f"revision {name}" if name else _describe(path)
    recorded, recorded_source, where = None, "", ""
    if fmt in ("hf", "weights_dir"):
        recorded = _trainer_state_step(path)
        recorded_source, where = "trainer_state", "its trainer_state.json has global_step"
    elif fmt == "lightning" and record is not None:
        recorded = _lightning_step(record, path)
        recorded_source, where = "lightning", "its Lightning global_step entry is"
    if explicit is not None:
        if not force:
            for other, what in ((named, "its name says step"), (recorded, where)):
                if other is not None and other != explicit:
                    raise ValueError(
                        f"the explicit step {explicit} for {label} contradicts the "
                        f"checkpoint: {what} {other}. Steps pair with the checkpoints in the "
                        f"order given; pass force_steps=True (--force-steps) to use {explicit} "
                        f"anyway")
        return explicit, "explicit"
    if recorded is not None:
        if named is not None and named != recorded:
            raise ValueError(
                f"{label}: its name says step {named} but {where} {recorded}; pass "
                f"the steps explicitly (with force_steps=True / --force-steps) to choose")
        return recorded, recorded_source
    if named is not None:
        return named, "name"
    return (0, "default") if lone else (None, "")


def find_checkpoints(
    source: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str | os.PathLike,
                                                                      int | None],
    steps: Sequence[int | None] | None = None,
    *,
    force_steps: bool = False,
) -> list[Checkpoint]:
    """The checkpoints of a run, ordered by step.

    Parameters
    ----------
    source : path, sequence of paths, or mapping of path to step
        A folder of weight files, Hugging Face model folders, Trainer ``checkpoint-*/`` folders
        or Lightning ``.ckpt`` files; a Trainer ``output_dir`` (its ``checkpoint-*/`` folders);
        a single checkpoint (a series of one); an explicit list of files and folders (a
        revision series of one model: ``step1000/``, ``revision-step2000/``, ``main/``); or a
        mapping ``{path: step}`` (``None``: read the step from the checkpoint); or a Hugging
        Face Hub cache folder ``models--org--name`` holding several revisions (``refs/step1000``
        → ``snapshots/<hash>/``, the step read from the revision name).
    steps : sequence of int or None, optional
        Explicit steps, one per checkpoint.  For a list of paths they pair with the paths **in
        the order given**; for a folder, with its checkpoints in natural name order (``step2``
        before ``step10``).  ``None`` entries read that checkpoint's step as without ``steps``.
    force_steps : bool
        Use explicit steps even where they contradict a step in the checkpoint's name,
        ``trainer_state.json`` or Lightning record (otherwise a ValueError naming both).

    A Lightning ``last.ckpt`` (step from its ``global_step``) that repeats the step of a
    checkpoint named with that step is the same save and is left out.

    Returns
    -------
    list of Checkpoint
        Sorted by step; each records its ``format`` and ``step_source``.

    Raises
    ------
    FileNotFoundError
        No checkpoints were found.
    ValueError
        A step cannot be read (pass ``steps``); an explicit step contradicts the checkpoint
        (without ``force_steps``); a name contradicts ``trainer_state.json`` or Lightning's
        ``global_step``; two checkpoints share a step; or ``steps`` has the wrong length.
    """
    names: list[str | None] = []
    if isinstance(source, Mapping):
        if steps is not None:
            raise ValueError("steps: give either a mapping {path: step} or steps, not both")
        steps = list(source.values())
        paths = [Path(p) for p in source]
    elif isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"no checkpoint file or folder at {root}")
        revisions = _hub_revisions(root) if root.is_dir() else None
        if revisions is not None:
            if not revisions:
                raise FileNotFoundError(f"no revision in the Hub cache folder {root} has "
                                        f"config.json and weights")
            paths = [folder for folder, _ in revisions]
            names = [name for _, name in revisions]
        else:
            paths = _candidates(root) if root.is_dir() else [root]
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise FileNotFoundError("the list of checkpoints is empty")
    found, lightning = [], {}
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        fmt = _format_of(path)
        if fmt is None:
            raise ValueError(f"{path} is not a checkpoint (weights file, Hugging Face model "
                             f"folder or Trainer checkpoint folder)")
        if fmt == "torch" and path.suffix == ".ckpt":
            record = _lightning_record(path)
            if record is not None:
                fmt, lightning[path] = "lightning", record
        found.append((path, fmt))
    if steps is None:
        explicit: list[int | None] = [None] * len(found)
    else:
        explicit = [None if s is None else int(s) for s in steps]
        if len(explicit) != len(found):
            raise ValueError(f"{len(explicit)} steps were given for {len(found)} checkpoints "
                             f"({', '.join(_describe(p) for p, _ in found[:6])} …)")
    names = names or [None] * len(found)
    series, missing = [], []
    for (path, fmt), given, name in zip(found, explicit, names, strict=True):
        step, where = _resolve_step(path, fmt, given, force_steps, lone=len(found) == 1,
                                    record=lightning.get(path), name=name)
        if step is None:
            missing.append(f"revision {name}" if name else _describe(path))
        else:
            series.append(Checkpoint(path, step, fmt, where))
    if missing:
        raise ValueError(
            f"cannot read a step from {', '.join(missing[:5])}: name checkpoints like "
            f"step1000 / checkpoint-1000 / ckpt_000100, or pass the steps explicitly")
    by_step: dict[int, Checkpoint] = {}
    for ckpt in series:
        other = by_step.get(ckpt.step)
        if other is None:
            by_step[ckpt.step] = ckpt
            continue
        # Lightning's save_last writes last.ckpt beside epoch=…-step=N.ckpt of the same step:
        # a name without a step whose step came from the file's own record is that copy
        unnamed = [c for c in (other, ckpt) if c.step_source in ("lightning", "trainer_state")
                   and parse_step(c.path.name) is None]
        if len(unnamed) == 1:
            by_step[ckpt.step] = other if unnamed[0] is ckpt else ckpt
            continue
        raise ValueError(f"two checkpoints have step {ckpt.step}: {other.path} and {ckpt.path}")
    return sorted(by_step.values(), key=lambda c: c.step)


# --------------------------------------------------------------------------------------------
# safe loading


def _unsafe_message(path: Path, error: BaseException) -> str:
    detail = str(error).strip().splitlines()
    hint = next((line for line in detail if "GLOBAL" in line or "Unsupported" in line),
                detail[0] if detail else type(error).__name__)
    return (f"refused to load {path.name}: the pickle asks to run code or build objects that "
            f"are not tensors ({hint.strip()}). traindyn reads checkpoints with "
            f"torch.load(weights_only=True) and never executes pickled code; re-save the "
            f"weights as a plain state dict (or .safetensors) from a trusted environment")


def _torch_load(path: Path) -> Any:
    try:
        try:  # memory-mapped: tensors are read as they are touched
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except (RuntimeError, OSError, ValueError):
            # legacy (non-zip) files cannot be memory-mapped, and a truncated zip gives a
            # clearer message without mmap
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_unsafe_message(path, err)) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head == b"PK" and not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"cannot read {path.name}: the zip archive is truncated or corrupt "
                f"({path.stat().st_size} bytes; torch says {type(err).__name__}: {err})") from None
        raise CheckpointError(
            f"cannot read {path.name} (truncated or not a PyTorch file?): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor)
                                                    for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
            if nested is not None:
                obj = nested
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise CheckpointError(
        f"{path.name} holds no state dict (a mapping of names to tensors); found "
        f"{type(obj).__name__}" + (f" with keys {list(obj)[:8]}" if isinstance(obj, Mapping)
                                   else ""))


class _SafetensorsDict(Mapping):
    """Lazy read-only mapping over a ``.safetensors`` file: a tensor is read when asked for."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read {path.name} (truncated or not safetensors?): "
                                  f"{type(err).__name__}: {err}") from None
        self.path = path

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {key!r} of {self.path.name}: {err}") \
                from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _MergedDict(Mapping):
    """Read-only mapping over the shards of a sharded checkpoint (``*.index.json``)."""

    def __init__(self, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self._where = parts

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return _shape(self._where[key], key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _folder_state_dict(folder: Path) -> Mapping[str, torch.Tensor]:
    """The state dict in a model / Trainer checkpoint folder (safetensors preferred)."""
    for name in _DIR_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return load_state_dict(path)
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot read the shard index {folder.name}/{name}: "
                                  f"{type(err).__name__}: {err}") from None
        shards: dict[str, Mapping[str, torch.Tensor]] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (folder / shard).resolve()
            if shard_path.parent != folder.resolve() or not shard_path.is_file():
                raise CheckpointError(f"{folder.name}/{name} names a shard {shard!r} that is "
                                      f"not a file in that folder")
            shards[shard] = load_state_dict(shard_path)
        return _MergedDict({key: shards[shard] for key, shard in weight_map.items()})
    raise CheckpointError(f"{folder} holds none of {', '.join(_DIR_WEIGHT_FILES)}")


def _is_lightning(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
            and ("global_step" in obj or "pytorch-lightning_version" in obj))


def _read(path: Path) -> tuple[Mapping[str, torch.Tensor], bool]:
    """``(state dict, is a Lightning checkpoint)`` of a file or folder, read safely."""
    if path.is_dir():
        return _folder_state_dict(path), False
    if path.suffix == ".safetensors":
        return _SafetensorsDict(path), False
    obj = _torch_load(path)
    return _extract_state_dict(obj, path), _is_lightning(obj)


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
    return _read(Path(path))[0]


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if isinstance(state, (_SafetensorsDict, _MergedDict)):
        return state.shape(key)
    return tuple(state[key].shape)


def _strip_prefix(keys: Iterable[str], model_keys: set[str]) -> str:
    """A common prefix (``module.``, ``_orig_mod.``, ``model.``) to drop so keys match the model."""
    keys = list(keys)
    best, best_overlap = "", len(set(keys) & model_keys)
    for prefix in _PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            overlap = len({k[len(prefix):] for k in keys} & model_keys)
            if overlap > best_overlap:
                best, best_overlap = prefix, overlap
    return best


def _attribute_prefix(keys: Iterable[str], model_keys: set[str]) -> str:
    """The LightningModule attribute (``model.``, ``net.`` …) whose keys match the model.

    A Lightning ``state_dict`` holds every attribute of the LightningModule; the target model
    is usually one of them.  The prefix whose stripped keys overlap most with the model's is
    chosen ("" when the keys already match, e.g. the model *is* the LightningModule).
    """
    keys = list(keys)
    best, best_overlap = "", len(set(keys) & model_keys)
    for prefix in sorted({k.split(".", 1)[0] + "." for k in keys if "." in k}):
        overlap = len({k[len(prefix):] for k in keys if k.startswith(prefix)} & model_keys)
        if overlap > best_overlap:
            best, best_overlap = prefix, overlap
    return best


def _list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … ({len(names) - limit} more)" if len(names) > limit else "")


def hash_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's content: sorted names, dtypes, shapes and raw bytes.

    Independent of the file format and name, so identical weights saved as ``step100.pt`` and
    ``step200.safetensors`` hash the same.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        _hash_tensor(digest, key, state[key])
    return digest.hexdigest()


def _hash_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
    if t.numel():
        digest.update(t.view(torch.uint8).numpy().tobytes())


def load_into(model: nn.Module, checkpoint: Checkpoint | str | os.PathLike,
              strict: bool = True) -> str:
    """Copy a checkpoint's weights into ``model`` after checking them; return the content hash.

    A Lightning checkpoint contributes the keys under the LightningModule attribute that holds
    the model (see :func:`_attribute_prefix`); its other attributes' tensors are ignored and do
    not enter the hash.

    Checks, each failing with a :class:`CheckpointError` that names the problem: the file reads
    (not truncated, not an unsafe pickle), the keys match the model's state dict (missing or,
    with ``strict``, unexpected keys), every shape matches, every floating value is finite.
    Shapes are checked before any tensor is copied.  Tensors are read and copied one at a time
    (safetensors lazily), so peak memory is the model plus one tensor.

    Returns
    -------
    str
        :func:`hash_state_dict` of the checkpoint's tensors.
    """
    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    state, lightning = _read(path)
    target = model.state_dict()
    if lightning:  # keys of the LightningModule's other attributes are not the model's
        prefix = _attribute_prefix(state.keys(), set(target))
        names = {key[len(prefix):]: key for key in state if key.startswith(prefix)}
    else:
        prefix = _strip_prefix(state.keys(), set(target))
        names = {key[len(prefix):]: key for key in state}
    missing = [k for k in target if k not in names]
    unexpected = [k for k in names if k not in target]
    if missing:
        raise CheckpointError(f"{path.name} lacks {len(missing)} of the model's "
                              f"{len(target)} tensors: {_list(missing)}")
    if strict and unexpected:
        raise CheckpointError(f"{path.name} has {len(unexpected)} tensors the model does not: "
                              f"{_list(unexpected)}")
    wrong = [f"{k} {_shape(state, names[k])} vs model {tuple(target[k].shape)}"
             for k in target if _shape(state, names[k]) != tuple(target[k].shape)]
    if wrong:
        raise CheckpointError(f"shape mismatch in {path.name}: {_list(wrong, 3)}")
    digest = hashlib.sha256()
    with torch.no_grad():
        for key in sorted(names):
            tensor = state[names[key]]
            if tensor.is_floating_point() or tensor.is_complex():
                if not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise CheckpointError(f"{path.name}: tensor {key!r} has {bad} non-finite "
                                          f"value(s) (NaN or Inf)")
            _hash_tensor(digest, names[key], tensor)
            if key in target:
                target[key].copy_(tensor)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# model construction


def resolve_factory(spec: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A model factory from ``"package.module:function"``, ``"path/file.py:function"``, or
    ``"path/file.py"`` (function ``make_model``); callables are returned unchanged.

    The factory is the user's own code and runs in this process; checkpoints never do.
    """
    if callable(spec):
        return spec
    text = str(spec)
    target, sep, attr = text.rpartition(":")
    if not sep:
        target, attr = text, ""
    if target.endswith(".py"):
        file = Path(target).resolve()
        if not file.is_file():
            raise FileNotFoundError(f"model factory file {file} does not exist")
        name = "_traindyn_factory_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        attr = attr or "make_model"
    else:
        if not attr:
            raise ValueError(f"model factory {text!r} must look like 'package.module:function' "
                             f"or 'path/to/file.py:function'")
        module = importlib.import_module(target)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{target} has no attribute {attr!r} (model factory {text!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"model factory {text!r} is not callable")
    return obj


def _offline_transformers() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("Hugging Face checkpoints need transformers: "
                          "pip install 'traindyn[hf]'") from err
    return transformers


@contextlib.contextmanager
def _quiet_transformers(transformers: Any, quiet: bool) -> Iterator[None]:
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
    ``weights_only=True`` (safetensors preferred).  With ``strict``, weights the checkpoint
    lacks (which ``transformers`` would initialise at random) fail the checkpoint; non-finite
    weights always do.  ``progress=False`` silences ``transformers``' loading bars and its
    info/warning logging for the duration of the call (``traindyn analyze --no-progress``).
    """
    folder = Path(folder).resolve()
    if not is_hf_folder(folder):
        raise CheckpointError(f"{folder} is not a Hugging Face model folder "
                              f"(config.json plus one of {', '.join(HF_WEIGHT_FILES)})")
    transformers = _offline_transformers()
    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ValueError(f"transformers has no class {model_class!r}")
    torch.manual_seed(0)  # weights the checkpoint lacks (strict=False) are drawn reproducibly
    try:
        with _quiet_transformers(transformers, quiet=not progress):
            model, info = cls.from_pretrained(str(folder), local_files_only=True,
                                              weights_only=True, output_loading_info=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_unsafe_message(folder, err)) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load {folder.name}: {type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err) else ''}") from None
    missing = sorted(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise CheckpointError(
            f"shape mismatch in {folder.name}: {_list([str(m) for m in mismatched], 3)}")
    if strict and missing:
        raise CheckpointError(f"{folder.name} lacks {len(missing)} weights of {model_class} "
                              f"(they would be random): {_list(missing)}")
    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{folder.name}: tensor {key!r} has non-finite values")
    return model, hash_state_dict(state)
