"""traindyn.dynamics — things that unfold over training steps, and the faces.

===================  ==========================================================================
module               what
===================  ==========================================================================
``records``          the data model: dims, coords, attrs, validation
``storage``          NetCDF / Zarr files: atomic saves, the monitor's stream, ``load``
``schedules``        ``step -> bool`` evaluation schedules
``monitor``          probes on a schedule inside a training loop (``lightning``: its callback)
``checkpoints``      find, order, hash and safely load checkpoints
``probe_inputs``     named and file-based probe inputs for checkpoint analysis
``analyze``          a checkpoint series → one Dataset (resumable; dask fan-out)
``predict``          a network's linearised prediction from its measured NTK; lazy→rich gap
``sweep``            recipe × parameter grid × seeds on dask.distributed (``dynamics.sweep``
                     is the function; the module is ``sys.modules["traindyn.dynamics.sweep"]``)
``local_client``     a dask ``LocalCluster`` client set up for torch work (``dynamics._dask``)
``recipes``          reproducible experiments paired with theory modules
``plot``             figures: theory lines through measured points, run overview, CKA, spectra
``report``           one self-contained HTML page of a run (``traindyn report``)
``tensorboard``      a monitor's scalars as TensorBoard series (``Monitor(tensorboard=DIR)``)
``cli``              the ``traindyn`` command line
===================  ==========================================================================

``measurement_dataset`` turns probe measurements into the Dataset: the one builder behind the
``monitor`` (each mode) and ``analyze``.

Every name is imported on first use (PEP 562 module ``__getattr__``), so ``import dynamics``
and ``traindyn --help`` load neither torch nor xarray; ``dynamics.Monitor``,
``dynamics.plot.compare`` … work as if imported eagerly.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from traindyn.dynamics import (
        analyze,
        checkpoints,
        plot,
        probe_inputs,
        recipes,
        records,
        schedules,
        storage,
    )
    from traindyn.dynamics._dask import local_client
    from traindyn.dynamics.monitor import Monitor, load_stream
    from traindyn.dynamics.storage import load, save
    from traindyn.dynamics.sweep import sweep

__all__ = [
    "Monitor",
    "analyze",
    "checkpoints",
    "load",
    "load_stream",
    "local_client",
    "plot",
    "probe_inputs",
    "recipes",
    "records",
    "save",
    "schedules",
    "storage",
    "sweep",
]

_ATTRIBUTES = {
    "Monitor": ("traindyn.dynamics.monitor", "Monitor"),
    "load_stream": ("traindyn.dynamics.monitor", "load_stream"),
    "local_client": ("traindyn.dynamics._dask", "local_client"),
    "load": ("traindyn.dynamics.storage", "load"),
    "save": ("traindyn.dynamics.storage", "save"),
    "sweep": ("traindyn.dynamics.sweep", "sweep"),
}
"""Names that are objects inside a submodule; every other public name is a submodule."""

_SUBMODULES = ("analyze", "checkpoints", "cli", "cli_analyze", "cli_predict", "demo", "lightning",
               "measurement_dataset", "monitor", "plot", "predict", "probe_inputs", "recipes",
               "records", "report", "schedules", "storage", "tensorboard")


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTES:
        module_name, attr = _ATTRIBUTES[name]
        value = getattr(importlib.import_module(module_name), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """Keeps ``dynamics.sweep`` the function even after ``import dynamics.sweep``.

    Importing a submodule binds it as an attribute of its package; the function ``sweep``
    shares its module's name, and the package attribute stays the function, as an eager
    ``from traindyn.dynamics.sweep import sweep`` would leave it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in _ATTRIBUTES and isinstance(value, types.ModuleType)
                and value.__name__ == _ATTRIBUTES[name][0]):
            value = getattr(value, _ATTRIBUTES[name][1])
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
