"""traindyn.dynamics — things that unfold over training steps, and the faces.

===================  ==========================================================================
module               what
===================  ==========================================================================
``records``          the data model: dims, coords, attrs, validation, NetCDF / Zarr I/O
``schedules``        ``step -> bool`` evaluation schedules
``monitor``          probes on a schedule inside a training loop (``lightning``: its callback)
``checkpoints``      find, order, hash and safely load checkpoints
``probe_inputs``     named and file-based probe inputs for checkpoint analysis
``analyze``          a checkpoint series → one Dataset (resumable; dask fan-out)
``sweep``            recipe × parameter grid × seeds on dask.distributed (``dynamics.sweep``
                     is the function; the module is ``sys.modules["dynamics.sweep"]``)
``local_client``     a dask ``LocalCluster`` client set up for torch work (``dynamics._dask``)
``recipes``          reproducible experiments paired with theory modules
``plot``             theory lines through measured points
``cli``              the ``traindyn`` command line
===================  ==========================================================================
"""

from dynamics import analyze, checkpoints, probe_inputs, records, schedules
from dynamics._dask import local_client
from dynamics.monitor import Monitor, load_stream
from dynamics.records import load, save
from dynamics.sweep import sweep

__all__ = [
    "Monitor",
    "analyze",
    "checkpoints",
    "load",
    "load_stream",
    "local_client",
    "probe_inputs",
    "records",
    "save",
    "schedules",
    "sweep",
]
