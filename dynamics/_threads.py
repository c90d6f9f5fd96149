"""How many torch threads to use: the cores that are actually free, not all of them.

torch's default intra-op thread count is the number of cores.  When other processes are busy
(a second pytest worker, a training run, a browser) those threads time-share the same cores and
small operations slow down many-fold: on a 2-core VM with one other busy process, ``traindyn
demo --quick`` took 74–112 s with torch's default of 2 threads and 16 s with one.

:func:`choose_threads` picks the count, in this order of precedence:

1. an explicit argument (``traindyn demo --threads N``);
2. the environment variable ``TRAINDYN_THREADS`` (a positive integer, or ``auto``);
3. automatically: the cores this process may run on (``os.sched_getaffinity``) minus the cores
   other work keeps busy (the larger of the 1-minute load average and the number of other
   runnable tasks right now, from ``/proc/loadavg``), rounded, divided among ``processes``
   processes of our own, at least 1.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence

__all__ = ["ENV_VAR", "apply_threads", "available_cores", "busy_cores", "choose_threads"]

ENV_VAR = "TRAINDYN_THREADS"
"""Environment variable that overrides the automatic choice (``auto`` keeps it)."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def _read_loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as handle:
            return handle.read()
    except OSError:
        return None


def busy_cores(loadavg_texts: Sequence[str] | None = None, samples: int = 5,
               interval: float = 0.01) -> float:
    """Cores kept busy by other work: max(1-minute load average, other runnable tasks now).

    The load average lags (a process started ten seconds ago adds only ~0.15); the count of
    runnable tasks (the fourth field of ``/proc/loadavg``, minus this process), taken as the
    median of ``samples`` readings ``interval`` seconds apart, sees it at once.  Taking the
    larger errs towards fewer threads, which costs at most the idle cores, whereas
    oversubscription has cost 5× (see the module docstring).

    Parameters
    ----------
    loadavg_texts : sequence of str, optional
        Readings of ``/proc/loadavg`` (``"0.84 0.36 0.14 2/180 1234"``), for tests; read from
        the system when omitted.  Without ``/proc`` the load average alone is used.
    """
    if loadavg_texts is None:
        readings = []
        for i in range(max(1, samples)):
            if i:
                time.sleep(interval)
            text = _read_loadavg()
            if text is None:
                break
            readings.append(text)
        if not readings:
            try:
                return max(0.0, float(os.getloadavg()[0]))
            except (AttributeError, OSError):  # pragma: no cover - no load information
                return 0.0
        loadavg_texts = readings
    one_minute, running = 0.0, []
    for text in loadavg_texts:
        fields = text.split()
        if len(fields) < 4 or "/" not in fields[3]:
            raise ValueError(f"loadavg_texts: expected the /proc/loadavg format "
                             f"'1.0 0.5 0.2 2/180 1234', got {text!r}")
        one_minute = max(one_minute, float(fields[0]))
        running.append(int(fields[3].split("/")[0]) - 1)  # this process runs as it reads
    return max(0.0, one_minute, float(statistics.median(running)))


def choose_threads(
    threads: int | None = None,
    *,
    processes: int = 1,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
    busy: float | None = None,
) -> int:
    """Number of torch intra-op threads for each of ``processes`` processes of ours.

    Parameters
    ----------
    threads : int, optional
        Explicit choice; wins over everything.
    processes : int
        Processes of ours that will share the free cores (workers of a local cluster).
    environ : mapping, optional
        Environment to read ``TRAINDYN_THREADS`` from (default ``os.environ``).
    cores, busy : optional
        Available and busy cores (default :func:`available_cores`, :func:`busy_cores`); for
        tests.

    Returns
    -------
    int
        ``max(1, round(cores − busy) // processes)`` unless overridden.

    Raises
    ------
    ValueError
        ``threads``, ``processes`` or ``TRAINDYN_THREADS`` is not a positive integer.
    """
    if threads is not None:
        if isinstance(threads, bool) or int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        return int(threads)
    if isinstance(processes, bool) or int(processes) != processes or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR, "").strip()
    if text and text.lower() != "auto":
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{ENV_VAR} must be a positive integer or 'auto', got {text!r}")
        return value
    cores = available_cores() if cores is None else int(cores)
    busy = busy_cores() if busy is None else float(busy)
    if not math.isfinite(busy) or busy < 0:
        raise ValueError(f"busy must be a finite non-negative number, got {busy!r}")
    free = math.floor(cores - busy + 0.5)
    return max(1, free // int(processes))


def apply_threads(threads: int | None = None, *, processes: int = 1) -> int:
    """Set torch's intra-op thread count to :func:`choose_threads` and return it."""
    import torch

    chosen = choose_threads(threads, processes=processes)
    torch.set_num_threads(chosen)
    return chosen
