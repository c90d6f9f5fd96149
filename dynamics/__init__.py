"""traindyn.dynamics — things that unfold over training steps, and the faces.

Training recipes, the monitor and its schedules, storage in the data model (``records``),
plotting and the ``traindyn`` command line.
"""

from dynamics import records, schedules
from dynamics.monitor import Monitor
from dynamics.records import load, save

__all__ = ["Monitor", "load", "records", "save", "schedules"]
