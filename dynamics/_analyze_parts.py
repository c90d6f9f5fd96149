"""Resumable storage of ``analyze``'s per-checkpoint results, and what a result is keyed on.

Each finished checkpoint is written atomically to ``<output>.parts/step<N>.json`` (values,
status, timings) and, when reference-based probes ran, ``step<N>.npz`` (the states they keep:
a kernel, a layer's features …).  A re-run reuses a part only when everything that determines
its numbers is unchanged:

* the analysis parameters (probes and their arguments, layers, reduction, device, dtype …);
* the *content* of the checkpoint's weight files (SHA-256 of their bytes);
* the content of the probe-input and label files (or the built-in source's name and size);
* the source file of the model factory (SHA-256 of the module's file).

A mismatch recomputes that checkpoint, and :func:`describe_reuse` says why.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from traindyn.dynamics.storage import check_replaceable

PART_VERSION = 2

OUTPUT_KIND = "analyze"
"""The :data:`dynamics.storage.OUTPUT_ATTR` of an ``analyze`` output: a re-run may replace
(and resume into) only a file or store carrying it."""


class OutputError(ValueError):
    """The output path cannot be written; found before any checkpoint is computed."""


def _file_digest(path: Path, digest: Any) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def content_hash(paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (files; folders: their files, sorted)."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(file.name.encode() + b"\0")
            _file_digest(file, digest)
    return digest.hexdigest()


def source_hash(factory: Any) -> str:
    """SHA-256 of the file that defines a model factory (``"module:function"``,
    ``"file.py:function"`` or a callable); ``""`` when there is none (Hugging Face classes)."""
    if factory is None:
        return ""
    try:
        if isinstance(factory, str):
            from traindyn.dynamics.checkpoints import resolve_factory

            factory = resolve_factory(factory)
        file = inspect.getsourcefile(factory)
    except (TypeError, OSError, ImportError, AttributeError, ValueError):
        return ""
    if not file or not Path(file).is_file():
        return ""
    return content_hash([Path(file)])


def input_hash(source: Any) -> str:
    """SHA-256 of a probe-input or label file; the name for a built-in source."""
    if source is None:
        return ""
    path = Path(str(source))
    if path.is_file():
        return content_hash([path])
    return f"builtin:{source}"


def part_path(parts: Path, step: int) -> Path:
    return parts / f"step{step:012d}.json"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``), with the
    permissions a plain ``open`` would give (``0o666 & ~umask``, not ``mkstemp``'s 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state_arrays(states: Mapping[str, Any]) -> dict[str, np.ndarray]:
    arrays = {}
    for key, state in states.items():
        if isinstance(state, Mapping):
            for sub, value in state.items():
                arrays[f"{key}\n{sub}"] = np.asarray(value)
        elif state is not None:
            arrays[key] = np.asarray(state)
    return arrays


def _states_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    states: dict[str, Any] = {}
    for name, value in arrays.items():
        key, _, sub = name.partition("\n")
        if sub:
            states.setdefault(key, {})[sub] = value
        else:
            states[key] = value
    return states


def write_part(parts: Path, step: int, keys: Mapping[str, str], result: Mapping[str, Any],
               states: Mapping[str, Any]) -> None:
    """Write one checkpoint's result (states first, so a part never names missing states)."""
    if states:
        buffer = io.BytesIO()
        np.savez(buffer, **_state_arrays(states))
        write_atomic(part_path(parts, step).with_suffix(".npz"), buffer.getvalue())
    record = {"version": PART_VERSION, "keys": dict(keys), "result": dict(result),
              "has_states": bool(states)}
    write_atomic(part_path(parts, step), json.dumps(record).encode())


def read_part(parts: Path, step: int, keys: Mapping[str, str]
              ) -> tuple[dict | None, dict[str, Any], str]:
    """``(result, states, why)``: the stored result if its keys all match (else ``None`` and
    why not)."""
    path = part_path(parts, step)
    if not path.is_file():
        return None, {}, "not analysed yet"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}, "its stored result is unreadable"
    if record.get("version") != PART_VERSION:
        return None, {}, "stored by another version of traindyn"
    stored = record.get("keys", {})
    changed = [name for name in keys if stored.get(name) != keys[name]]
    if changed:
        return None, {}, "changed: " + ", ".join(changed)
    states: dict[str, Any] = {}
    if record.get("has_states"):
        try:
            with np.load(path.with_suffix(".npz"), allow_pickle=False) as data:
                states = _states_from_arrays({k: data[k] for k in data.files})
        except (OSError, ValueError):
            return None, {}, "its stored reference states are unreadable"
    return record["result"], states, ""


def check_output(output: Path, overwrite: bool = False) -> None:
    """Raise :class:`OutputError` if ``output`` (a ``.nc`` file or ``.zarr`` store) and its
    ``.parts`` folder cannot be written — before any checkpoint is computed — or if something
    other than an earlier ``analyze`` output is there and ``overwrite`` is not given
    (:func:`dynamics.storage.check_replaceable`: a user's folder, a Monitor's recording …)."""
    if output.suffix not in (".nc", ".zarr"):
        raise OutputError(f"output {output} must end in .nc (NetCDF) or .zarr (Zarr store)")
    if not overwrite:
        try:
            check_replaceable(output, OUTPUT_KIND)
        except FileExistsError as err:
            raise OutputError(str(err)) from None
    if output.suffix == ".nc" and output.is_dir():
        raise OutputError(f"output {output} is an existing directory, not a file")
    if output.suffix == ".zarr" and output.exists() and not output.is_dir():
        raise OutputError(f"output {output} is an existing file, not a Zarr store (a folder)")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        parts = output.with_name(output.name + ".parts")
        parts.mkdir(exist_ok=True)
        for folder in (parent, parts):
            fd, tmp = tempfile.mkstemp(prefix=".traindyn-write-test.", dir=folder)
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(tmp)
    except OSError as err:
        raise OutputError(f"cannot write the output {output}: {err.strerror or err} "
                          f"({err.filename or parent})") from None
