"""traindyn's data model: one vocabulary for measured and predicted results, and their files.

Every result is an ``xarray.Dataset``:

* dimensions ``step`` (with the non-dimension coordinate ``time`` = learning rate × step, so
  gradient-flow theory and discrete training share an axis), ``layer`` (module names),
  ``seed``, plus metric-specific ones (``rank``, ``class``, ``sample``, ``load_ratio``, ``n``,
  ``n_features``, ``ridge`` …);
* data variables named after the quantity (``rankme``, ``alpha_req``, ``test_error`` …), each
  with ``long_name`` and ``units`` attributes;
* Dataset attributes with the ``source`` (paper or recipe), ``parameters`` (a JSON string:
  attributes must be plain) and package versions (added by :func:`provenance`).

Files: NetCDF (h5netcdf engine) for finished results, written atomically (temporary file, then
``os.replace``); Zarr when appending along ``step`` during training, and a finished Zarr store
is replaced atomically too (:func:`save_zarr`: written beside the old one, then swapped in).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = [
    "DIMS",
    "VARIABLES",
    "ZarrAppender",
    "append_zarr",
    "load",
    "params_attr",
    "provenance",
    "recover_zarr",
    "save",
    "save_netcdf",
    "save_zarr",
    "step_coords",
    "validate",
    "variable_attrs",
]

DIMS: dict[str, str] = {
    "step": "optimisation step",
    "layer": "module name",
    "seed": "random seed",
    "rank": "eigenvalue rank (1-based)",
    "class": "class label",
    "sample": "sample index",
    "load_ratio": "load ratio α = P/N",
    "n": "number of training samples",
    "n_features": "number of random features",
    "ridge": "ridge regularisation",
    "mode": "kernel eigenmode index (descending eigenvalue)",
    "epsilon": "target test error ε",
}
"""Shared dimension names and their meaning."""

VARIABLES: dict[str, dict[str, str]] = {
    "rankme": {"long_name": "RankMe effective rank (raw singular values)", "units": "1"},
    "rankme_covariance": {"long_name": "RankMe of centred-covariance eigenvalues", "units": "1"},
    "alpha_req": {"long_name": "alpha-ReQ eigenspectrum decay exponent", "units": "1"},
    "alpha_req_r2": {"long_name": "R² of the alpha-ReQ power-law fit", "units": "1"},
    "train_loss": {"long_name": "training loss", "units": "nat"},
    "test_loss": {"long_name": "test loss", "units": "nat"},
    "train_accuracy": {"long_name": "training accuracy", "units": "1"},
    "test_accuracy": {"long_name": "test accuracy", "units": "1"},
    "train_error": {"long_name": "training mean squared error", "units": "1"},
    "test_error": {"long_name": "test mean squared error", "units": "1"},
    "participation_ratio": {"long_name": "participation ratio (Σλ)²/Σλ²", "units": "1"},
    "stable_rank": {"long_name": "stable rank Σλ/λ_max", "units": "1"},
    "effective_rank": {"long_name": "Rényi effective rank", "units": "1"},
    "mode_strength": {"long_name": "input-output mode strength a(t)", "units": "1"},
    "half_rise_time": {"long_name": "time for a mode to reach half its strength", "units": "1"},
    "inductive_bias": {"long_name": "inductive bias -log2 P(error <= ε)", "units": "bit"},
    "class_mean_norm": {"long_name": "norm of the centred class mean", "units": "1"},
    "classifier_norm": {"long_name": "norm of the classifier row", "units": "1"},
}
"""Variables that are not a probe's (losses, recipes' quantities) with their default
attributes.  A probe's variables are declared with the probe (``probes.registry``) and carry
their attributes into every Dataset, so this module needs no probe module;
``tests/test_conformance.py`` checks that a probe and this table agree where both name a
variable."""

_PACKAGES = ("traindyn", "numpy", "scipy", "torch", "jax", "xarray", "h5netcdf", "zarr")


def variable_attrs(name: str, **overrides: str) -> dict[str, str]:
    """Default ``long_name``/``units`` of a known variable, updated with ``overrides``."""
    attrs = dict(VARIABLES.get(name, {"long_name": name.replace("_", " "), "units": "1"}))
    attrs.update(overrides)
    return attrs


def params_attr(params: Mapping[str, Any]) -> str:
    """Parameters as a JSON string, the form attributes take (``json.loads`` reads it back);
    numpy arrays and scalars become lists and numbers, anything else its ``str``."""

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        return str(o)

    return json.dumps(dict(params), sort_keys=True, default=default)


def provenance() -> dict[str, str]:
    """Attributes naming the versions of traindyn and of the packages a result depends on."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"versions": json.dumps(versions, sort_keys=True)}


def step_coords(steps: Any, learning_rate: float | np.ndarray | None) -> dict[str, Any]:
    """Coordinates ``step`` and ``time = learning_rate × step`` for a measured Dataset.

    With no learning rate (``None``), ``time`` equals ``step`` and says so in its attributes.
    """
    steps = np.asarray(steps, dtype=np.int64)
    lr = 1.0 if learning_rate is None else learning_rate
    return {
        "step": ("step", steps, {"long_name": DIMS["step"], "units": "1"}),
        "time": ("step", steps * np.asarray(lr, dtype=float),
                 {"long_name": "training time, learning rate × step", "units": "1",
                  **({"note": "no learning rate given: time = step"} if learning_rate is None
                     else {})}),
    }


def validate(ds: xr.Dataset) -> xr.Dataset:
    """Check that ``ds`` follows the data model; return it unchanged, or raise ``ValueError``.

    Rules: every data variable has ``long_name`` and ``units``; a ``step`` dimension carries a
    ``time`` coordinate along it; the Dataset has a ``source`` attribute; attributes are plain
    (str, number, or 1-D array of numbers), so the result can be written to NetCDF and Zarr.
    """
    problems = []
    for name, var in ds.data_vars.items():
        for key in ("long_name", "units"):
            if key not in var.attrs:
                problems.append(f"variable {name!r} has no {key!r} attribute")
    if "step" in ds.dims:
        if "time" not in ds.coords or "step" not in ds["time"].dims:
            problems.append("a 'step' dimension needs a 'time' coordinate along it")
    if "source" not in ds.attrs:
        problems.append("the Dataset has no 'source' attribute (paper or recipe)")
    for key, value in ds.attrs.items():
        if not isinstance(value, (str, int, float, np.number, np.ndarray, list, tuple)):
            problems.append(f"attribute {key!r} is a {type(value).__name__}; store it as JSON")
    if problems:
        raise ValueError(
            "Dataset does not follow traindyn's data model:\n- " + "\n- ".join(problems))
    return ds


def _plain_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, (dict, list, tuple)) and not (
            isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
        ):
            out[key] = params_attr(value) if isinstance(value, dict) else json.dumps(list(value))
        elif isinstance(value, bool):
            out[key] = int(value)
        elif value is None:
            out[key] = "None"
        else:
            out[key] = value
    return out


def _prepare(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = _plain_attrs({**provenance(), **ds.attrs})
    for name in ds.variables:
        ds[name].attrs = _plain_attrs(ds[name].attrs)
    return ds


def save_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to NetCDF-4 with h5netcdf, atomically: a reader sees the old file or the new.

    Package versions are added to the attributes; dict attributes become JSON strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _prepare(ds).to_netcdf(tmp, engine="h5netcdf", invalid_netcdf=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _zarr_ready(ds: xr.Dataset) -> xr.Dataset:
    """Prepared for Zarr: fixed-width unicode (no Zarr v3 spec) becomes variable-length."""
    ds = _prepare(ds)
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.astype(object)
    return ds


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
    import shutil

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
    import shutil

    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    recover_zarr(output)
    new = _store_temp(output, "new")
    shutil.rmtree(new, ignore_errors=True)
    _write_zarr(ds, new)
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
    _fsync_dir(output.parent)
    return output


def append_zarr(ds: xr.Dataset, path: str | os.PathLike, dim: str = "step") -> Path:
    """Append ``ds`` along ``dim`` (default ``step``) to a Zarr store, creating it if absent.

    Each call writes one evaluation; a crash between calls loses nothing already written.
    """
    path = Path(path)
    prepared = _zarr_ready(ds)
    if not path.exists():
        prepared.to_zarr(path, mode="w", consolidated=False)
    else:
        prepared.to_zarr(path, append_dim=dim, consolidated=False)
    return path


class ZarrAppender:
    """Append evaluations along ``step`` to one Zarr store (see :func:`append_zarr`)."""

    def __init__(self, path: str | os.PathLike, dim: str = "step") -> None:
        self.path = Path(path)
        self.dim = dim

    def append(self, ds: xr.Dataset) -> None:
        append_zarr(ds, self.path, self.dim)

    def load(self) -> xr.Dataset:
        return load(self.path)


def save(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Save by suffix: ``.zarr`` → Zarr, anything else → NetCDF (``.nc``)."""
    path = Path(path)
    return save_zarr(ds, path) if path.suffix == ".zarr" else save_netcdf(ds, path)


def load(path: str | os.PathLike) -> xr.Dataset:
    """Read a NetCDF file or Zarr store into memory (the file is closed on return)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no result at {path}")
    if path.suffix == ".zarr" or path.is_dir():
        with xr.open_zarr(path, consolidated=False) as ds:
            return ds.load()
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()
