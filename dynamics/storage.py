"""traindyn's files: atomic NetCDF, atomically replaced Zarr stores, and the monitor's Zarr stream.

* :func:`save_netcdf` — NetCDF-4 (h5netcdf) for finished results, written to a temporary file
  and moved into place with ``os.replace``: a reader sees the old file or the new one.
* :func:`save_zarr` — a finished Zarr store, written whole beside the old one and swapped in
  (:func:`recover_zarr` tidies what a killed replacement left).
* :func:`append_zarr` — plain xarray append along ``step`` (no consistency guarantee between
  arrays while it runs; the monitor uses :class:`ZarrStream`).
* :class:`ZarrStream` — the monitor's store, appended one evaluation at a time.  Each evaluation
  is *committed*: once its rows are in every array, the root ``zarr.json`` is rewritten
  atomically (temporary file, ``os.replace``) with the store's consolidated metadata (every
  array's shape) and the count of complete evaluations.  ``xarray.open_zarr`` reads the
  consolidated metadata by default, so a store killed at any moment, even half-way through
  an append, opens with plain ``xarray.open_zarr`` and holds exactly the committed
  evaluations (rows written beyond them are ignored and overwritten by the next append).
* :func:`load_stream` — reads a monitor store; a store written by an older traindyn (no commit)
  whose arrays a kill left with different lengths is cut back to its complete evaluations.

**Nothing traindyn did not write is replaced.**  Every file the save functions write carries
the attribute :data:`OUTPUT_ATTR` (``traindyn_output``) naming what wrote it (``"analyze"``,
``"theory"``, ``"monitor"``, ``"result"`` …), and a save replaces only a file or store of its own
kind (:func:`check_replaceable`): a user's folder, another program's file, a Monitor's
recording or another command's output raises ``FileExistsError`` unless ``overwrite=True``.
:func:`output_lock` keeps two processes from writing one output at once.

Files are written with the permissions a plain ``open`` gives (``0o666 & ~umask``), so that
colleagues on a shared file system can read them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time as _time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from traindyn.dynamics import records

__all__ = [
    "COMPLETE_ATTR",
    "OUTPUT_ATTR",
    "OutputLockedError",
    "ZarrStream",
    "append_zarr",
    "check_replaceable",
    "check_resume",
    "check_store",
    "dimension_names",
    "load",
    "load_stream",
    "output_kind",
    "output_lock",
    "recover_zarr",
    "resume_differences",
    "run_settings",
    "save",
    "save_netcdf",
    "save_zarr",
]

COMPLETE_ATTR = "monitor_evaluations_complete"
"""Zarr group attribute of a monitor store: the number of evaluations fully written."""

OUTPUT_ATTR = "traindyn_output"
"""Dataset attribute of every file the save functions write: what wrote it (``"analyze"``,
``"theory"``, ``"monitor"``, ``"result"`` …).  A save replaces only a file of its own kind."""

DEFAULT_KIND = "result"
"""The kind of a saved Dataset that names none itself (no :data:`OUTPUT_ATTR` attribute)."""


# -- permissions and preparation ---------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode a plain ``open`` would give."""
    os.chmod(path, 0o666 & ~_umask())


def _kind(ds: xr.Dataset, kind: str | None) -> str:
    """The kind a save records: ``kind``, else the Dataset's own, else :data:`DEFAULT_KIND`."""
    return kind if kind is not None else str(ds.attrs.get(OUTPUT_ATTR, DEFAULT_KIND))


def _prepare(ds: xr.Dataset, kind: str | None = None) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = records.plain_attrs({**records.provenance(), **ds.attrs})
    if kind is not None:
        ds.attrs[OUTPUT_ATTR] = kind
    for name in ds.variables:
        ds[name].attrs = records.plain_attrs(ds[name].attrs)
    return ds


def _zarr_ready(ds: xr.Dataset, kind: str | None = None) -> xr.Dataset:
    """Prepared for Zarr: fixed-width unicode (no Zarr v3 spec) becomes variable-length."""
    ds = _prepare(ds, kind)
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.astype(object)
    return ds


# -- what is at a path, and who may replace it --------------------------------------------------
def _zarr_attrs(path: Path) -> dict[str, Any] | None:
    """The root attributes of the Zarr store ``path`` (format 3 or 2), read as JSON without
    opening the store; ``None`` when ``path`` is no Zarr store."""
    try:
        if (path / "zarr.json").is_file():
            root = json.loads((path / "zarr.json").read_bytes())
            attrs = root.get("attributes", {}) if isinstance(root, dict) else None
        elif (path / ".zgroup").is_file():
            attrs = (json.loads((path / ".zattrs").read_bytes())
                     if (path / ".zattrs").is_file() else {})
        else:
            return None
    except (OSError, ValueError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _netcdf_attr(path: Path, name: str) -> str | None:
    """The global attribute ``name`` of the NetCDF-4 (HDF5) file ``path``; ``None`` when the
    file has none or is not HDF5."""
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            value = handle.attrs.get(name)
    except (OSError, ValueError, ImportError):
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def output_kind(path: str | os.PathLike) -> str | None:
    """What traindyn wrote at ``path``: the :data:`OUTPUT_ATTR` of its file or Zarr store,
    ``"monitor"`` for a Monitor's recording, ``None`` for anything else (or nothing)."""
    path = Path(path)
    if path.is_dir():
        attrs = _zarr_attrs(path)
        if attrs is None:
            return None
        if COMPLETE_ATTR in attrs:
            return "monitor"
        kind = attrs.get(OUTPUT_ATTR)
        return None if kind is None else str(kind)
    if path.is_file():
        return _netcdf_attr(path, OUTPUT_ATTR)
    return None


_KIND_NAMES = {"monitor": "a Monitor's recording", "analyze": "an output of traindyn analyze",
               "theory": "an output of traindyn theory"}


def _describe(path: Path, kind: str | None) -> str:
    if kind is not None:
        return _KIND_NAMES.get(kind, f"a traindyn {kind!r} file")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(entries[:5]) + (" …" if len(entries) > 5 else "")
        what = "a Zarr store" if _zarr_attrs(path) is not None else "a folder"
        count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
        return f"{what} that traindyn did not write ({count}: {shown})"
    return "a file that traindyn did not write"


def check_replaceable(path: str | os.PathLike, kind: str, overwrite: bool = False) -> None:
    """Raise ``FileExistsError`` unless a save of ``kind`` may replace what is at ``path``.

    Allowed: nothing there, an empty folder, a file or Zarr store that traindyn wrote as the
    same ``kind`` (its :data:`OUTPUT_ATTR`), or anything when ``overwrite=True``.  Refused,
    with a message naming ``path``, what is there and ``overwrite``: a user's files or folder,
    a file without the attribute, a Monitor's recording, an output of another kind.
    """
    path = Path(path)
    if overwrite or not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    found = None if path.is_symlink() else output_kind(path)
    if found == kind:
        return
    raise FileExistsError(
        f"{path} holds {_describe(path, found)}; refusing to replace it with a traindyn "
        f"{kind!r} output: pass overwrite=True (--overwrite on the command line) to replace "
        "it, or choose another path")


class OutputLockedError(FileExistsError):
    """Another process is writing the same output (:func:`output_lock`)."""


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, command: str = "traindyn") -> Iterator[Path]:
    """Hold an exclusive lock on the output ``path`` while it is written.

    The lock is ``fcntl.flock`` on the sibling file ``.<name>.lock`` (which records the
    holder's pid, host, command and start time): the system releases it when the holder
    exits or dies, so a killed run never leaves a stale lock.  A second writer raises
    :class:`OutputLockedError` naming the holder.  On a platform without ``fcntl`` nothing is
    locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield _lock_path(Path(path))
        return
    path = Path(path)
    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                held = json.loads(os.read(fd, 4096) or b"{}")
            except (OSError, ValueError):
                held = {}
            os.close(fd)
            since = (_time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(held["started"]))
                     if isinstance(held.get("started"), (int, float)) else "?")
            raise OutputLockedError(
                f"{path} is being written by another process ({held.get('command', '?')}, "
                f"pid {held.get('pid', '?')} on {held.get('host', '?')}, since {since}); wait "
                "for it to finish or choose another output") from None
        try:  # the file we locked is still the one at the path (not unlinked by a releaser)
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": _time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)   # while still locked: a waiting opener retries on the new file
        os.close(fd)


# -- NetCDF ------------------------------------------------------------------------------------
def save_netcdf(ds: xr.Dataset, path: str | os.PathLike, *, kind: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``ds`` to NetCDF-4 with h5netcdf, atomically: a reader sees the old file or the new.

    Package versions are added to the attributes; dict attributes become JSON strings; the
    attribute :data:`OUTPUT_ATTR` records ``kind`` (default: the Dataset's own, else
    ``"result"``).  A file already at ``path`` is replaced only if traindyn wrote it as the
    same kind, or with ``overwrite=True`` (:func:`check_replaceable`; else
    ``FileExistsError``).  The file gets the permissions a plain ``open`` gives
    (``0o666 & ~umask``).
    """
    path = Path(path)
    kind = _kind(ds, kind)
    check_replaceable(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _prepare(ds, kind).to_netcdf(tmp, engine="h5netcdf", invalid_netcdf=True)
        _normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- replacing a Zarr store atomically ---------------------------------------------------------
def _write_zarr(ds: xr.Dataset, path: Path, kind: str | None = None) -> None:
    """Write ``ds`` to the Zarr store ``path`` in place (replacing one that is there)."""
    _zarr_ready(ds, kind).to_zarr(path, mode="w", consolidated=False)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform, C library or filesystem cannot (the caller then falls
    back to two renames); other errors raise ``OSError``.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under ``path`` to disk (so a rename publishes whole data)."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _store_temp(output: Path, kind: str) -> Path:
    return output.with_name(f".{output.name}.{kind}-{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False  # unknown, or an earlier call of this very process (finished or failed)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def recover_zarr(output: str | os.PathLike) -> None:
    """Tidy what a run killed while replacing ``output`` left next to it.

    ``.<name>.new-<pid>.tmp`` (a store being written, or the old one after the exchange) is
    deleted; ``.<name>.old-<pid>.tmp`` (the old store moved aside by the two-rename fallback)
    is moved back when ``output`` is missing, deleted otherwise.  Only folders named exactly
    so (:func:`_store_temp`) whose process has ended are touched: temporaries of a process
    that is still running, and anything else beside ``output``, are left alone.
    """
    output = Path(output)
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(new|old)-(\d+)\.tmp\Z")
    leftovers = []
    for path in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):
        match = pattern.match(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if not _alive(pid):
            try:
                leftovers.append((path.stat().st_mtime, kind, path))
            except FileNotFoundError:  # tidied meanwhile by another run
                continue
    olds = sorted((item for item in leftovers if item[1] == "old"), reverse=True)
    if olds and not os.path.lexists(output):
        os.rename(olds[0][2], output)
        leftovers.remove(olds[0])
    for _, _, path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _replace_store(output: Path, write: Callable[[Path], None], fsync: bool = True) -> Path:
    """Make the Zarr store ``output`` with ``write(folder)`` so that a crash at any moment
    leaves the old complete store or the new complete one (see :func:`save_zarr`).  Without
    ``fsync`` (the monitor's stream, whose every commit is unflushed too) this holds for a
    killed process, not for a lost machine."""
    output.parent.mkdir(parents=True, exist_ok=True)
    recover_zarr(output)
    new = _store_temp(output, "new")
    shutil.rmtree(new, ignore_errors=True)
    write(new)
    if fsync:
        _fsync_tree(new)
    if not os.path.lexists(output):
        os.rename(new, output)
    elif _exchange(new, output):
        shutil.rmtree(new)  # it now holds the old store
    else:
        old = _store_temp(output, "old")
        os.rename(output, old)
        os.rename(new, output)
        shutil.rmtree(old)
    if fsync:
        _fsync_dir(output.parent)
    return output


def save_zarr(ds: xr.Dataset, path: str | os.PathLike, *, kind: str | None = None,
              overwrite: bool = False) -> Path:
    """Write ``ds`` as the Zarr store ``path`` so that a crash at any moment leaves the old
    complete store or the new complete one (NetCDF's :func:`save_netcdf` is atomic too).

    ``kind`` and ``overwrite`` as in :func:`save_netcdf`: a folder or store at ``path`` is
    replaced only if traindyn wrote it as the same kind, or with ``overwrite=True``.

    The new store is written whole into a sibling temporary folder and flushed to disk, then
    swapped in: with one atomic ``renameat2(RENAME_EXCHANGE)`` where Linux and the filesystem
    allow it (``path`` is never absent), otherwise with two renames (old → ``.old-…``, new →
    ``path``), between which ``path`` is briefly absent and a crash leaves the old store
    at ``.<name>.old-<pid>.tmp``, which :func:`recover_zarr` (run first by every
    ``save_zarr``, and by ``traindyn analyze`` when it starts) moves back.  The replaced
    store is deleted last.
    """
    path = Path(path)
    kind = _kind(ds, kind)
    check_replaceable(path, kind, overwrite)
    return _replace_store(path, lambda new: _write_zarr(ds, new, kind))


def append_zarr(ds: xr.Dataset, path: str | os.PathLike, dim: str = "step") -> Path:
    """Append ``ds`` along ``dim`` (default ``step``) to a Zarr store, creating it if absent.

    Plain xarray append: while it runs the arrays have different lengths.  A monitor's
    store is written by :class:`ZarrStream`, whose every evaluation is committed atomically.
    """
    path = Path(path)
    prepared = _zarr_ready(ds)
    if not path.exists():
        prepared.to_zarr(path, mode="w", consolidated=False)
    else:
        prepared.to_zarr(path, append_dim=dim, consolidated=False)
    return path


def save(ds: xr.Dataset, path: str | os.PathLike, *, kind: str | None = None,
         overwrite: bool = False) -> Path:
    """Save by suffix: ``.zarr`` → Zarr, anything else → NetCDF (``.nc``); ``kind`` and
    ``overwrite`` as in :func:`save_netcdf` (nothing traindyn did not write is replaced
    without ``overwrite=True``)."""
    path = Path(path)
    if path.suffix == ".zarr":
        return save_zarr(ds, path, kind=kind, overwrite=overwrite)
    return save_netcdf(ds, path, kind=kind, overwrite=overwrite)


def _consolidated(path: Path) -> bool:
    """Whether the Zarr store ``path`` has consolidated metadata (format 3 inline, or v2)."""
    if (path / ".zmetadata").exists():
        return True
    try:
        root = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False
    return bool(root.get("consolidated_metadata"))


def _open_zarr(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, consolidated=_consolidated(path))


def load(path: str | os.PathLike) -> xr.Dataset:
    """Read a NetCDF file or Zarr store into memory (the file is closed on return).

    A Zarr store's consolidated metadata, where it has some (a monitor's stream), is what is
    read: the committed evaluations."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no result at {path}")
    if path.suffix == ".zarr" or path.is_dir():
        with _open_zarr(path) as ds:
            return ds.load()
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()


# -- the monitor's stream ----------------------------------------------------------------------
def dimension_names(array: Any) -> Sequence[str] | None:
    """The dimension names of a Zarr array (format 3 metadata, or xarray's v2 attribute)."""
    return getattr(array.metadata, "dimension_names", None) or array.attrs.get(
        "_ARRAY_DIMENSIONS")


def _is_zarr_store(path: Path) -> bool:
    return (path / "zarr.json").exists() or (path / ".zgroup").exists()


def _commit(path: Path, group: Any, arrays: Any = None, **attrs: Any) -> None:
    """Rewrite the root ``zarr.json`` of ``path`` atomically with ``group``'s attributes
    (updated with ``attrs``) and the consolidated metadata of ``arrays`` (name → open array,
    whose metadata are up to date; default: the group's arrays as read now)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import ConsolidatedMetadata, GroupMetadata

    arrays = dict(group.arrays()) if arrays is None else arrays
    attributes = {**dict(group.attrs), **attrs}
    if group.metadata.zarr_format != 3:  # pragma: no cover - xarray writes format 3 here
        import zarr

        group.attrs.update(attrs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(path))
        return
    meta = GroupMetadata(attributes=attributes, consolidated_metadata=ConsolidatedMetadata(
        metadata={name: array.metadata for name, array in arrays.items()}))
    data = meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    fd, tmp = tempfile.mkstemp(prefix=".zarr.json.", suffix=".tmp", dir=path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _normal_mode(tmp)
        os.replace(tmp, path / "zarr.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _step_arrays(group: Any) -> dict[str, tuple[Any, tuple[str, ...]]]:
    return {name: (array, tuple(dimension_names(array) or ()))
            for name, array in group.arrays()
            if (dimension_names(array) or ("",))[0] == "step"}


def _repair(path: Path) -> int:
    """Cut every array along ``step`` of the store back to its complete evaluations (the
    committed count, else the shortest array); returns that count."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    complete = group.attrs.get(COMPLETE_ATTR)
    arrays = [array for array, _ in _step_arrays(group).values()]
    if complete is None:
        if not arrays:
            raise ValueError(f"{path} holds no complete evaluation")
        complete = min(a.shape[0] for a in arrays)
    for array in arrays:
        if array.shape[0] != complete:
            array.resize((complete, *array.shape[1:]))
    return int(complete)


def load_stream(path: str | os.PathLike) -> xr.Dataset:
    """Read a monitor's Zarr store, keeping only the evaluations written completely.

    A store written by this version opens consistently as it is (its committed metadata);
    ``xarray.open_zarr`` reads it too.  For a store written by an older traindyn, where a
    process killed while appending could leave some arrays one evaluation longer than others,
    the arrays are cut back to the count of complete evaluations in the store before it is
    read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no monitor store at {path}")
    if not _consolidated(path):
        _repair(path)
    return load(path)


RESUME_SETTINGS = ("seed", "learning_rate", "probes", "probe_kwargs", "layers", "reduce")
"""What a run appended to a monitor's store (``resume=True``) must share with the stored one."""


def run_settings(parameters: Any, seed: Any) -> dict[str, Any]:
    """The :data:`RESUME_SETTINGS` of a run from its Dataset's ``parameters`` attribute (a
    JSON string, as the monitor writes it) and its ``seed`` coordinate (``None``: none);
    settings the attribute does not name are left out."""
    try:
        params = json.loads(parameters) if isinstance(parameters, str) else dict(parameters or {})
    except (TypeError, ValueError):
        params = {}
    out = {k: params[k] for k in RESUME_SETTINGS if k in params and k != "seed"}
    if seed is not None:
        seed = np.asarray(seed).reshape(()).item()
    out["seed"] = seed
    return out


def resume_differences(stored: dict[str, Any], run: dict[str, Any],
                       ignore: Sequence[str] = ()) -> list[str]:
    """``"name: the store has …, this run …"`` for each setting of :func:`run_settings` in
    which a run differs from the stored one (settings either side lacks are not compared,
    except the seed)."""
    return [f"{k}: the store has {stored[k]!r}, this run {run[k]!r}"
            for k in RESUME_SETTINGS
            if k not in ignore and k in stored and k in run and stored[k] != run[k]]


def check_resume(path: str | os.PathLike, stored: dict[str, Any], run: dict[str, Any],
                 ignore: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` listing every difference (:func:`resume_differences`) between a
    run and the one stored at ``path`` that it would be appended to."""
    differences = resume_differences(stored, run, ignore)
    if differences:
        raise ValueError(
            f"resume=True: the store {str(path)!r} holds another run (" + "; ".join(differences)
            + "); resume only the same run (seed, learning rate, probes and their settings, "
            "layers), or pass overwrite=True or another store=")


def _stored_seed(group: Any) -> Any:
    arrays = dict(group.arrays())
    return np.asarray(arrays["seed"][...]) if "seed" in arrays else None


def check_store(path: str | os.PathLike, overwrite: bool = False, resume: bool = False
                ) -> dict[str, Any] | None:
    """Check, before a run starts, that a monitor may record to the Zarr store ``path``.

    Returns ``None`` when nothing is there (a new store), else, with ``resume=True``, what the
    store holds: ``{"steps": [...], "variables": [...], "layers": [...], "settings": {...}}``
    (``settings``: :func:`run_settings` of the stored run).  Raises
    ``FileExistsError`` when ``path`` exists and neither ``overwrite`` nor ``resume`` is given,
    or when it is not a Zarr store (never replaced), and ``ValueError`` for both options.
    """
    if overwrite and resume:
        raise ValueError("overwrite=True and resume=True exclude each other: overwrite "
                         "replaces the store, resume appends to it")
    path = Path(path)
    if not os.path.lexists(path) or (path.is_dir() and not any(path.iterdir())):
        return None
    if not path.is_dir() or not _is_zarr_store(path):
        raise FileExistsError(f"store={str(path)!r} exists and is not a Zarr store; refusing "
                              "to replace it (choose another store= path)")
    if not (overwrite or resume):
        raise FileExistsError(
            f"the Zarr store {str(path)!r} already holds a recording; pass overwrite=True to "
            "replace it (at the first new evaluation) or resume=True to append to it (a "
            "matching run; steps already recorded are skipped), or choose another store=")
    if overwrite:
        return None
    import zarr

    count = _repair(path) if not _consolidated(path) else None
    group = zarr.open_group(str(path), mode="r")
    if COMPLETE_ATTR not in group.attrs and count is None:
        raise ValueError(f"resume=True: {str(path)!r} is a Zarr store but not a monitor's "
                         f"(no {COMPLETE_ATTR!r} attribute)")
    arrays = _step_arrays(group)
    coords = {"step", "time"}
    for array, _ in arrays.values():
        coords.update(str(array.attrs.get("coordinates", "")).split())
    steps = np.asarray(group["step"][...]).tolist() if "step" in arrays else []
    layers = (np.asarray(group["layer"][...]).tolist() if "layer" in dict(group.arrays())
              else [])
    return {"steps": [int(s) for s in steps],
            "variables": sorted(n for n in arrays if n not in coords),
            "layers": [str(x) for x in layers],
            "settings": run_settings(group.attrs.get("parameters"), _stored_seed(group))}


class ZarrStream:
    """Append evaluations to a Zarr store along ``step``, each committed atomically.

    After an evaluation's rows are in every array, the root ``zarr.json`` is replaced
    (temporary file, ``os.replace``) by one holding the consolidated metadata and the count
    of complete evaluations (:data:`COMPLETE_ATTR`): that is the commit.  The first
    evaluation is written into a sibling temporary store, committed and renamed into place
    (swapped with the old store when ``mode="overwrite"``); an evaluation that does not fit
    the open arrays (another shape or coordinate) rewrites a copy of the store that is then
    swapped in.  So the store at ``path`` is complete at every moment.

    Parameters
    ----------
    path : path
    mode : {"new", "overwrite", "resume"}
        ``"new"``: nothing is at ``path`` (:func:`check_store`); ``"overwrite"``: the store
        there is replaced at the first append; ``"resume"``: evaluations are appended to the
        store there, and the first must record the same variables and layers (else
        ``ValueError``).

    Variables that first appear after the first evaluation are dropped (with a warning);
    variables missing from a later one are written as NaN.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "new") -> None:
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"mode={mode!r}: use 'new', 'overwrite' or 'resume'")
        self.path = Path(path)
        self.mode = mode
        self.count = 0   # evaluations committed
        self.rows = 0    # rows along step committed
        self.seconds = 0.0
        self.group: Any = None  # the open Zarr group once the store exists
        self.arrays: dict[str, Any] = {}
        self.step_arrays: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._fixed_coords: dict[str, list] = {}
        self._vars: set[str] | None = None
        self._first: xr.Dataset | None = None

    def _open(self) -> None:
        import zarr

        self.group = zarr.open_group(str(self.path), mode="r+")
        self.arrays = dict(self.group.arrays())
        self.step_arrays = {name: (self.arrays[name], dims)
                            for name, (_, dims) in _step_arrays(self.group).items()}
        self._fixed_coords = {
            name: list(np.asarray(array[...]).tolist())
            for name, array in self.arrays.items()
            if tuple(dimension_names(array) or ()) == (name,) and name != "step"}
        self.count = int(self.group.attrs[COMPLETE_ATTR])
        self.rows = self.arrays["step"].shape[0]   # committed rows (an append may add several)

    def _check_resumed(self, ds: xr.Dataset) -> None:
        """The first evaluation appended to a resumed store must record what it holds."""
        names = {n for n, v in ds.variables.items() if v.dims[:1] == ("step",)}
        stored = set(self.step_arrays)
        layers = ([str(x) for x in np.asarray(ds["layer"].values)] if "layer" in ds.coords
                  else [])
        held = [str(x) for x in self._fixed_coords.get("layer", [])]
        check_resume(self.path,
                     run_settings(self.group.attrs.get("parameters"), _stored_seed(self.group)),
                     run_settings(ds.attrs.get("parameters"),
                                  ds["seed"].values if "seed" in ds.coords else None))
        if names != stored or layers != held:
            raise ValueError(
                f"resume=True: the store {str(self.path)!r} holds variables "
                f"{sorted(stored)} over layers {held}, this run records {sorted(names)} over "
                f"layers {layers}; resume only the same monitor (probes, layers, scalars "
                "passed to step), or pass overwrite=True or another store=")

    def append(self, ds: xr.Dataset) -> None:
        """Append one evaluation (a Dataset with a length-1 ``step`` dimension)."""
        start = _time.perf_counter()
        if self._vars is None:
            if self.mode == "resume" and _is_zarr_store(self.path):
                if not _consolidated(self.path):
                    _repair(self.path)
                self._open()
                self._check_resumed(ds)
            self._vars = set(ds.data_vars)
            self._first = ds
        else:
            new = set(ds.data_vars) - self._vars
            if new:
                warnings.warn(f"variables {sorted(new)} first appeared after the first "
                              "evaluation; they are kept in memory but not streamed", stacklevel=4)
                ds = ds.drop_vars(sorted(new))
            for name in self._vars - set(ds.data_vars):
                ds[name] = xr.full_like(self._first[name], np.nan, dtype=float).assign_coords(
                    step=ds["step"].values)
        if self.group is None:
            self._create(ds)      # (re)opens the store: count = 1
        elif self._fast_append(ds):
            _commit(self.path, self.group, self.arrays, **{COMPLETE_ATTR: self.count + 1})
            self.count += 1
            self.rows += 1
        else:
            self._rewrite(ds)     # (re)opens the store: count + 1
        self.seconds += _time.perf_counter() - start

    def _create(self, ds: xr.Dataset) -> None:
        """The first evaluation: written beside, committed, then moved (or swapped) in."""
        import zarr

        if os.path.lexists(self.path) and not _is_zarr_store(self.path):
            if self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()   # an empty folder is nothing to keep
            else:
                raise FileExistsError(f"{self.path} exists and is not a Zarr store; "
                                      "refusing to replace it")
        if os.path.lexists(self.path) and self.mode == "new":
            raise FileExistsError(f"{self.path} appeared after the monitor was constructed; "
                                  "refusing to replace it")

        def write(folder: Path) -> None:
            _write_zarr(ds, folder)
            _commit(folder, zarr.open_group(str(folder), mode="r"), **{COMPLETE_ATTR: 1})

        _replace_store(self.path, write, fsync=False)
        self._open()

    def _rewrite(self, ds: xr.Dataset) -> None:
        """An evaluation the open arrays cannot take: xarray appends it to a copy of the
        store, which is committed and swapped in."""
        import zarr

        count = self.count + 1

        def write(folder: Path) -> None:
            shutil.copytree(self.path, folder)
            group = zarr.open_group(str(folder), mode="r+", use_consolidated=False)
            for array, _ in _step_arrays(group).values():  # rows beyond the commit: out
                if array.shape[0] != self.rows:
                    array.resize((self.rows, *array.shape[1:]))
            _zarr_ready(ds).to_zarr(folder, append_dim="step", consolidated=False)
            _commit(folder, zarr.open_group(str(folder), mode="r", use_consolidated=False),
                    **{COMPLETE_ATTR: count})

        _replace_store(self.path, write, fsync=False)
        self._open()

    def _fast_append(self, ds: xr.Dataset) -> bool:
        """Append one evaluation straight to the open Zarr arrays along ``step``.

        The same bytes as :func:`append_zarr` (xarray's ``to_zarr(append_dim="step")``,
        tested) without re-opening and re-validating the store each time.  Returns ``False``,
        writing nothing, when ``ds`` does not match the store exactly (a variable missing or
        new, another shape, dtype or coordinate along a non-step dimension).
        """
        names = {n for n, v in ds.variables.items() if v.dims[:1] == ("step",)}
        if names != set(self.step_arrays) or ds.sizes.get("step") != 1:
            return False
        writes = []
        for name, (array, dims) in self.step_arrays.items():
            var = ds.variables[name]
            if set(var.dims) != set(dims):
                return False
            values = np.asarray(var.transpose(*dims).values)
            if values.dtype != array.dtype or values.shape[1:] != array.shape[1:]:
                return False
            writes.append((array, values))
        for dim in ds.dims:
            if dim != "step" and dim in ds.coords and (
                    self._fixed_coords.get(dim) != list(np.asarray(ds[dim].values).tolist())):
                return False
        for array, values in writes:
            if array.shape[0] != self.rows:   # rows an append that failed wrote beyond it
                array.resize((self.rows, *array.shape[1:]))
            array.append(values, axis=0)
        return True
