"""Resumable storage of ``analyze``'s per-checkpoint results, and what a result is keyed on.

Each finished checkpoint is written atomically to ``<output>.parts/step<N>.json`` (its
measurement record — :func:`dynamics.measurement_dataset.to_record`: values and the probes'
notes — with status and timings) and, when reference-based probes ran, ``step<N>.npz``
(the states they keep: a kernel, a layer's features …).  A re-run reuses a part only when
everything that determines its numbers is unchanged:

* the analysis parameters (probes and their arguments, layers, reduction, device, dtype …);
* the *content* of the checkpoint's weight files (SHA-256 of their bytes);
* the content of the probe-input and label files (or the built-in source's name and size);
* the source of the model factory's file and of every module of the user's own files it
  imports, at any depth (:func:`code_hashes`; libraries in the standard library and
  ``site-packages`` are left out);
* the source of every probe used and of every ``--import``-ed file, and of what they import
  from the user's files;
* traindyn's version and the source of the traindyn modules the analysis runs through (the
  probes' modules, capture, evaluation, the checkpoint readers …), so an upgraded or edited
  traindyn recomputes.

A mismatch recomputes that checkpoint, and :func:`read_part` says what changed (the modules
by name).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import inspect
import io
import json
import os
import re
import site
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Mapping
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


# -- the code a result depends on ---------------------------------------------------------------
def _library_dirs() -> tuple[str, ...]:
    """Folders of installed code: the standard library and every ``site-packages``."""
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - a virtualenv's old site module
        pass
    return tuple(sorted({os.path.realpath(d) + os.sep for d in dirs if d}))


_LIBRARY_DIRS = _library_dirs()


def is_user_file(path: Path) -> bool:
    """Whether ``path`` is the user's own code: a ``.py`` file outside the standard library
    and every ``site-packages`` / ``dist-packages`` folder (a source checkout of traindyn
    counts as the user's)."""
    real = os.path.realpath(path)
    if any(part in ("site-packages", "dist-packages") for part in Path(real).parts):
        return False
    return not real.startswith(_LIBRARY_DIRS)


def traindyn_dirs() -> tuple[str, ...]:
    """The folders of traindyn's own modules (``traindyn``, its ``probes`` and ``dynamics``)."""
    import traindyn.dynamics
    import traindyn.probes

    import traindyn

    return tuple(os.path.realpath(Path(m.__file__).parent) + os.sep
                 for m in (traindyn, traindyn.probes, traindyn.dynamics))


def is_traindyn_file(path: Path) -> bool:
    return os.path.realpath(path).startswith(traindyn_dirs())


def _find(name: str) -> Path | None:
    """The file of module ``name``: an imported module's ``__file__``, else found on the path
    without importing anything (no package's ``__init__`` runs)."""
    module = sys.modules.get(name)
    if module is not None:
        file = getattr(module, "__file__", None)
        return Path(file) if file else None
    path = None
    spec = None
    parts = name.split(".")
    start = 0
    for i in range(len(parts) - 1, 0, -1):   # the nearest imported package: its real __path__
        parent = sys.modules.get(".".join(parts[:i]))
        if parent is not None:
            path = getattr(parent, "__path__", None)
            if path is None:
                return None
            start = i
            break
    for i in range(start, len(parts)):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), path)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        path = spec.submodule_search_locations
        if i < len(parts) - 1 and path is None:
            return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin not in ("built-in", "frozen") else None


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)"
                     r"|import[ \t]+([^\n#;]*))", re.MULTILINE)
_IMPORTS: dict[tuple[str, int, int], list[tuple[str, int, list[str]]]] = {}


def _imports(file: Path) -> list[tuple[str, int, list[str]]]:
    """``(module, level, names)`` of every import statement in ``file``, at any depth (function
    bodies included); cached by path, size and modification time.

    Read from the text (a line-anchored pattern, much faster than parsing): an ``import`` line
    inside a string adds a name to look up, never loses one."""
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    if key not in _IMPORTS:
        text = file.read_text(encoding="utf-8", errors="replace")
        found = []
        for dots, module, names, plain in _IMPORT.findall(text):
            if plain:
                found += [(part.split()[0], 0, []) for part in plain.split(",")
                          if part.split()]
            else:
                listed = [part.split()[0] for part in names.strip("()").replace("\\", " ")
                          .split(",") if part.split()]
                found.append((module, len(dots), listed))
        _IMPORTS[key] = found
    return _IMPORTS[key]


def _imported_names(name: str | None, file: Path) -> list[str]:
    """The modules ``file`` (module ``name``, if known) may import: each ``import a.b`` as
    ``a.b`` and its parents, each ``from a import b`` as ``a`` and ``a.b``."""
    package = None
    if name is not None:
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for module, level, names in _imports(file):
        if level:
            if package is None:
                continue
            base = package.split(".") if package else []
            if level - 1 > len(base):
                continue
            base = base[:len(base) - (level - 1)]
            module = ".".join([*base, *([module] if module else [])])
        if not module:
            continue
        parts = module.split(".")
        out += [".".join(parts[:i + 1]) for i in range(len(parts))]
        out += [f"{module}.{n}" for n in names if n != "*"]
    return out


def code_files(start: Iterable[tuple[str | None, Path]], keep: Callable[[Path], bool]
               ) -> dict[str, Path]:
    """Every module reachable by imports from ``start`` (``(module name or None, file)``
    pairs) whose file ``keep`` accepts, as ``{label: file}`` (label: the module's name, else
    its path).  Modules ``keep`` rejects are not followed."""
    found: dict[str, Path] = {}
    seen: set[str] = set()
    todo: list[tuple[str | None, Path | None]] = list(start)
    while todo:
        name, file = todo.pop()
        if file is None:
            if name is None or name in seen:
                continue
            seen.add(name)
            file = _find(name)
        if file is None or file.suffix != ".py" or not file.is_file() or not keep(file):
            continue
        label = name if name is not None else str(file)
        if label in found:
            continue
        found[label] = file
        todo += [(n, None) for n in _imported_names(name, file)]
    return found


def code_hashes(files: Mapping[str, Path]) -> str:
    """``{label: SHA-256 of the file}`` as a JSON string (a resume key whose entries
    :func:`read_part` compares one by one)."""
    return json.dumps({label: content_hash([path])[:16] for label, path in sorted(files.items())},
                      sort_keys=True)


def module_of(obj: Any) -> tuple[str | None, Path] | None:
    """``(module name, file)`` of the module defining a function or class (``None`` when it
    has no source file)."""
    obj = getattr(obj, "func", obj)   # functools.partial
    try:
        file = inspect.getsourcefile(obj)
    except (TypeError, OSError):
        return None
    if not file:
        return None
    name = getattr(obj, "__module__", None)
    module = sys.modules.get(name) if name else None
    if module is None or os.path.realpath(getattr(module, "__file__", "") or "") != \
            os.path.realpath(file):
        name = None
    return name, Path(file)


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
    changed = [_changed(name, stored.get(name), keys[name]) for name in keys
               if stored.get(name) != keys[name]]
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


def _changed(name: str, old: str | None, new: str) -> str:
    """``name``, and for a key of :func:`code_hashes` the modules that differ."""
    try:
        before, after = json.loads(old or ""), json.loads(new)
    except ValueError:
        before = after = None
    if not (isinstance(before, dict) and isinstance(after, dict)):
        if name == "traindyn version" and old:
            return f"{name} ({old} → {new})"
        return name
    modules = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    shown = ", ".join(modules[:4]) + (" …" if len(modules) > 4 else "")
    return f"{name} ({shown})"


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
