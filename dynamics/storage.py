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

Files are written with the permissions a plain ``open`` gives (``0o666 & ~umask``), so that
colleagues on a shared file system can read them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time as _time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from traindyn.dynamics import records

__all__ = [
    "COMPLETE_ATTR",
    "ZarrStream",
    "append_zarr",
    "check_store",
    "dimension_names",
    "load",
    "load_stream",
    "recover_zarr",
    "save",
    "save_netcdf",
    "save_zarr",
]

COMPLETE_ATTR = "monitor_evaluations_complete"
"""Zarr group attribute of a monitor store: the number of evaluations fully written."""


# -- permissions and preparation ---------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode a plain ``open`` would give."""
    os.chmod(path, 0o666 & ~_umask())


def _prepare(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = records.plain_attrs({**records.provenance(), **ds.attrs})
    for name in ds.variables:
        ds[name].attrs = records.plain_attrs(ds[name].attrs)
    return ds


def _zarr_ready(ds: xr.Dataset) -> xr.Dataset:
    """Prepared for Zarr: fixed-width unicode (no Zarr v3 spec) becomes variable-length."""
    ds = _prepare(ds)
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.astype(object)
    return ds


# -- NetCDF ------------------------------------------------------------------------------------
def save_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to NetCDF-4 with h5netcdf, atomically: a reader sees the old file or the new.

    Package versions are added to the attributes; dict attributes become JSON strings.  The
    file gets the permissions a plain ``open`` gives (``0o666 & ~umask``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _prepare(ds).to_netcdf(tmp, engine="h5netcdf", invalid_netcdf=True)
        _normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- replacing a Zarr store atomically ---------------------------------------------------------
def _write_zarr(ds: xr.Dataset, path: Path) -> None:
    """Write ``ds`` to the Zarr store ``path`` in place (replacing one that is there)."""
    _zarr_ready(ds).to_zarr(path, mode="w", consolidated=False)


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
    is moved back when ``output`` is missing, deleted otherwise.  Temporaries of a process
    that is still running are left alone.
    """
    output = Path(output)
    leftovers = []
    for path in output.parent.glob(f".{output.name}.*.tmp"):
        match = re.search(r"\.(new|old)-(\d+)\.tmp\Z", path.name)
        kind, pid = (match.group(1), int(match.group(2))) if match else ("new", -1)
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


def save_zarr(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` as the Zarr store ``path`` so that a crash at any moment leaves the old
    complete store or the new complete one (NetCDF's :func:`save_netcdf` is atomic too).

    The new store is written whole into a sibling temporary folder and flushed to disk, then
    swapped in: with one atomic ``renameat2(RENAME_EXCHANGE)`` where Linux and the filesystem
    allow it (``path`` is never absent), otherwise with two renames (old → ``.old-…``, new →
    ``path``), between which ``path`` is briefly absent and a crash leaves the old store
    at ``.<name>.old-<pid>.tmp``, which :func:`recover_zarr` (run first by every
    ``save_zarr``, and by ``traindyn analyze`` when it starts) moves back.  The replaced
    store is deleted last.
    """
    return _replace_store(Path(path), lambda new: _write_zarr(ds, new))


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


def save(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Save by suffix: ``.zarr`` → Zarr, anything else → NetCDF (``.nc``)."""
    path = Path(path)
    return save_zarr(ds, path) if path.suffix == ".zarr" else save_netcdf(ds, path)


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


def check_store(path: str | os.PathLike, overwrite: bool = False, resume: bool = False
                ) -> dict[str, Any] | None:
    """Check, before a run starts, that a monitor may record to the Zarr store ``path``.

    Returns ``None`` when nothing is there (a new store), else, with ``resume=True``, what the
    store holds: ``{"steps": [...], "variables": [...], "layers": [...]}``.  Raises
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
            "layers": [str(x) for x in layers]}


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
