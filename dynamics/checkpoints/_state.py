"""State dicts shared by the readers: safe reading, lazy mappings, hashing, checked copies."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from traindyn.dynamics.checkpoints._errors import CheckpointError, UnsafeCheckpointError

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights", "params")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
DIR_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
"""The weight files of a Hugging Face model or Trainer checkpoint folder, in reading order."""


class TensorDict(dict):
    """A state dict read from a file; ``attributes`` marks a training wrapper's attributes."""

    attributes: bool = False


# --------------------------------------------------------------------------------------------
# reading


def unsafe_message(path: Path, error: BaseException) -> str:
    """The refusal of a pickle that asks to import or call something."""
    detail = str(error).strip().splitlines()
    hint = next((line for line in detail if "GLOBAL" in line or "Unsupported" in line),
                detail[0] if detail else type(error).__name__)
    return (f"refused to load {path.name}: the pickle asks to run code or build objects that "
            f"are not tensors ({hint.strip()}). traindyn reads checkpoints with "
            f"torch.load(weights_only=True) and never executes pickled code; re-save the "
            f"weights as a plain state dict (or .safetensors) from a trusted environment")


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it."""
    try:
        try:  # memory-mapped: tensors are read as they are touched
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except (RuntimeError, OSError, ValueError):
            # files in the pre-zip format cannot be memory-mapped, and a truncated zip gives a
            # clearer message without mmap
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(unsafe_message(path, err)) from None
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


def is_lightning(obj: Any) -> bool:
    """Whether a loaded object is the dictionary Lightning's ``Trainer.save_checkpoint`` writes."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
            and ("global_step" in obj or "pytorch-lightning_version" in obj))


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor)
                                                          for v in obj.values())


def extract_state_dict(obj: Any, path: Path) -> TensorDict:
    """The state dict in a loaded PyTorch object (top level or under ``state_dict`` …).

    A training-loop checkpoint holding several state dicts side by side (``{"model": …,
    "ema": …, "optimizer": …}``, ``{"student": …, "teacher": …}``) gives them all, each key
    prefixed by its entry's name (``model.0.weight``, ``ema.0.weight``) and marked as
    attributes, so that loading picks the one matching the model or asks which one.
    """
    lightning = is_lightning(obj)
    if isinstance(obj, Mapping) and not lightning:
        several = {k: v for k, v in obj.items() if isinstance(k, str) and _is_state_dict(v)}
        if len(several) > 1:
            out = TensorDict({f"{k}.{name}": t for k, sd in several.items()
                              for name, t in sd.items()})
            out.attributes = True
            return out
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor)
                                                    for v in obj.values()):
            out = TensorDict(obj)
            out.attributes = lightning
            return out
        if isinstance(obj, Mapping):
            nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
            if nested is not None:
                obj = nested
                continue
            tensors = TensorDict({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
            if tensors:
                tensors.attributes = lightning
                return tensors
        break
    raise CheckpointError(
        f"{path.name} holds no state dict (a mapping of names to tensors); found "
        f"{type(obj).__name__}" + (f" with keys {list(obj)[:8]}" if isinstance(obj, Mapping)
                                   else ""))


_SAFETENSORS_KINDS = {"BOOL": "bool", "F": "float", "BF": "float", "I": "int", "U": "int",
                      "C": "complex"}


class SafetensorsDict(Mapping):
    """Lazy read-only mapping over a ``.safetensors`` file: a tensor is read when asked for."""

    attributes = False

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
        """The tensor's shape, from the header (no data read)."""
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype code (``F32``, ``I64``, ``BOOL`` …), from the header."""
        return str(self._file.get_slice(key).get_dtype())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class MergedDict(Mapping):
    """Read-only mapping over the shards of a sharded checkpoint (``*.index.json``)."""

    attributes = False

    def __init__(self, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self._where = parts

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from its shard's header where it has one."""
        return shape_of(self._where[key], key)

    def dtype(self, key: str) -> str:
        """The tensor's dtype (a safetensors code or a torch dtype name)."""
        return dtype_of(self._where[key], key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_file(path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict of one weights file: ``.safetensors`` lazily, else ``torch.load``."""
    if path.suffix == ".safetensors":
        return SafetensorsDict(path)
    return extract_state_dict(torch_load(path), path)


def folder_state_dict(folder: Path) -> Mapping[str, torch.Tensor]:
    """The state dict in a model / Trainer checkpoint folder (safetensors preferred)."""
    for name in DIR_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_file(path)
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
            shards[shard] = read_file(shard_path)
        return MergedDict({key: shards[shard] for key, shard in weight_map.items()})
    raise CheckpointError(f"{folder} holds none of {', '.join(DIR_WEIGHT_FILES)}")


def folder_weight_files(folder: Path) -> list[Path]:
    """The weight files (and shard indexes) of a folder, sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))


def shape_of(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape without reading its data where the mapping allows."""
    if isinstance(state, (SafetensorsDict, MergedDict)):
        return state.shape(key)
    return tuple(state[key].shape)


def dtype_of(state: Mapping[str, torch.Tensor], key: str) -> str:
    """A tensor's dtype name without reading its data where the mapping allows."""
    if isinstance(state, (SafetensorsDict, MergedDict)):
        return state.dtype(key)
    return str(state[key].dtype).removeprefix("torch.")


def dtype_kind(dtype: str | torch.dtype) -> str:
    """``"bool"``, ``"int"``, ``"float"`` or ``"complex"`` of a torch dtype or a safetensors
    dtype code (``F32``, ``BF16``, ``I64``, ``U8``, ``BOOL``, ``C64``)."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool:
            return "bool"
        if dtype.is_complex:
            return "complex"
        return "float" if dtype.is_floating_point else "int"
    text = str(dtype)
    if text.upper() == "BOOL" or text == "bool":
        return "bool"
    if text[:1].islower():  # a torch dtype name: float32, int64, complex64, bfloat16 …
        return dtype_kind(getattr(torch, text))
    code = text.rstrip("0123456789").upper()
    if code.startswith("F8"):
        return "float"
    return _SAFETENSORS_KINDS.get(code, _SAFETENSORS_KINDS.get(code[:1], "unknown"))


# --------------------------------------------------------------------------------------------
# hashing


def hash_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's content: sorted names, dtypes, shapes and raw bytes.

    Independent of the file format and name, so identical weights saved as ``step100.pt`` and
    ``step200.safetensors`` hash the same.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        hash_tensor(digest, key, state[key])
    return digest.hexdigest()


def hash_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor into a running SHA-256."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
    if t.numel():
        digest.update(t.view(torch.uint8).numpy().tobytes())


# --------------------------------------------------------------------------------------------
# matching keys and copying


def listing(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names and how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" … ({len(names) - limit} more)" if len(names) > limit else "")


def strip_wrapper_prefix(keys: Iterable[str], model_keys: set[str]) -> str:
    """A common prefix (``module.``, ``_orig_mod.``, ``model.``) to drop so keys match the model."""
    keys = list(keys)
    best, best_overlap = "", len(set(keys) & model_keys)
    for prefix in _WRAPPER_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            overlap = len({k[len(prefix):] for k in keys} & model_keys)
            if overlap > best_overlap:
                best, best_overlap = prefix, overlap
    return best


def attribute_prefix(keys: Iterable[str], model_keys: set[str], label: str) -> str:
    """The training-wrapper attribute (``model.``, ``net.`` …) whose keys match the model.

    A Lightning ``state_dict`` holds every attribute of the LightningModule; the target model
    is usually one of them (possibly wrapped once more: ``ema.module.``).  The prefix whose
    stripped keys overlap most with the model's is chosen (``""`` when the keys already match,
    e.g. the model *is* the LightningModule).  Two
    or more attributes that fit the model equally well (``model.`` and ``ema.``, ``student.``
    and ``teacher.``) are a :class:`CheckpointError` naming them: the caller chooses with
    ``prefix=``.
    """
    keys = list(keys)
    overlaps = {"": len(set(keys) & model_keys)}
    tops = sorted({k.split(".", 1)[0] + "." for k in keys if "." in k})
    # an attribute may wrap the model once more (an EMA's ``ema.module.``, ``_orig_mod.``)
    for prefix in tops + [top + w for top in tops for w in _WRAPPER_PREFIXES]:
        stripped = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        if stripped:
            overlaps[prefix] = len(stripped & model_keys)
    best_overlap = max(overlaps.values())
    best = sorted(p for p, n in overlaps.items() if n == best_overlap)
    if best_overlap and len(best) > 1:
        named = " and ".join(repr(p) for p in best)
        raise CheckpointError(
            f"{label} holds {best_overlap} of the model's {len(model_keys)} tensors under "
            f"each of {named}: choose one with prefix={best[0]!r} (Python: load_into / "
            f"analyze) or --prefix {best[0]} (traindyn analyze)")
    return best[0]


def _normalise_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def copy_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, *,
              strict: bool = True, prefix: str | None = None) -> str:
    """Check a state dict against ``model``, copy it in, and return its content hash.

    See :func:`~traindyn.dynamics.checkpoints.load_into` for the checks.
    """
    target = model.state_dict()
    if prefix is not None:
        prefix = _normalise_prefix(prefix)
        if prefix and not any(key.startswith(prefix) for key in state):
            tops = sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
            raise CheckpointError(f"{path.name} has no tensor under prefix {prefix!r}; its "
                                  f"top-level names are {listing(tops, 8)}")
        names = {key[len(prefix):]: key for key in state if key.startswith(prefix)}
    elif getattr(state, "attributes", False):
        # keys of the wrapper's other attributes are not the model's
        prefix = attribute_prefix(state.keys(), set(target), path.name)
        names = {key[len(prefix):]: key for key in state if key.startswith(prefix)}
    else:
        prefix = strip_wrapper_prefix(state.keys(), set(target))
        names = {key[len(prefix):]: key for key in state}
    missing = [k for k in target if k not in names]
    unexpected = [k for k in names if k not in target]
    if missing:
        raise CheckpointError(f"{path.name} lacks {len(missing)} of the model's "
                              f"{len(target)} tensors: {listing(missing)}")
    if strict and unexpected:
        raise CheckpointError(f"{path.name} has {len(unexpected)} tensors the model does not: "
                              f"{listing(unexpected)}")
    wrong = [f"{k} {shape_of(state, names[k])} vs model {tuple(target[k].shape)}"
             for k in target if shape_of(state, names[k]) != tuple(target[k].shape)]
    if wrong:
        raise CheckpointError(f"shape mismatch in {path.name}: {listing(wrong, 3)}")
    kinds = []
    for k in target:
        stored = dtype_of(state, names[k])
        if dtype_kind(stored) != dtype_kind(target[k].dtype):
            kinds.append(f"{k} is {stored} ({dtype_kind(stored)}) in the checkpoint but "
                         f"{str(target[k].dtype).removeprefix('torch.')} "
                         f"({dtype_kind(target[k].dtype)}) in the model")
    if kinds:
        raise CheckpointError(f"dtype mismatch in {path.name}: {listing(kinds, 3)}; a copy "
                              f"would convert the values silently")
    digest = hashlib.sha256()
    with torch.no_grad():
        for key in sorted(names):
            tensor = state[names[key]]
            if tensor.is_floating_point() or tensor.is_complex():
                if not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise CheckpointError(f"{path.name}: tensor {key!r} has {bad} non-finite "
                                          f"value(s) (NaN or Inf)")
            hash_tensor(digest, names[key], tensor)
            if key in target:
                target[key].copy_(tensor)
    return digest.hexdigest()
