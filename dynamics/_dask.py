"""The dask ``LocalCluster`` traindyn starts for ``analyze(workers=N)`` and ``sweep``.

One context manager, :func:`local_client`: ``N`` worker *processes* with one thread each, no
dashboard, logs at ``ERROR`` only, and **glibc's default malloc trimming in the workers**.

Why the last point.  ``distributed``'s nanny exports ``MALLOC_TRIM_THRESHOLD_=65536`` to every
worker it spawns (config ``distributed.nanny.pre-spawn-environ``; it helps long-lived workers
hand freed memory back to the OS).  Setting that variable at all switches off glibc's *dynamic*
mmap threshold (``mallopt(3)``: an explicit ``M_TRIM_THRESHOLD`` fixes ``M_MMAP_THRESHOLD`` at
its 128 KiB default), so every large tensor — activations, weights being loaded — is a fresh
``mmap`` whose pages fault in again on each allocation and are unmapped on free.  Measured on
the 2-core development machine (tiny LM, 4 blocks, 512 sequences of 64 tokens, 6 checkpoints,
one torch thread): a default dask worker took ~1.7 s per checkpoint against ~0.95 s for the
same work serially, with system time and minor page faults up ~5×; with the variable unset a
worker took the serial time, and 2 warm workers ran the series 1.83× faster than one process.

The variable is read by glibc once, when a process starts, so it has to be absent from the
environment the workers are *spawned* with.  :func:`local_client` therefore (1) sets that
config entry to ``None`` (dask's way of not exporting it) while the cluster is built, and
(2) removes it from ``os.environ`` for the spawn too — the nanny lives in this process and
copies ``os.environ`` into its workers, and an earlier default ``LocalCluster`` in this
process leaves ``MALLOC_TRIM_THRESHOLD_`` behind there.  ``os.environ`` is restored once the
workers are up (the nanny's own ``os.environ.update`` of its pre-spawn variables included), so
this process's environment is unchanged afterwards.  A worker that dask restarts later is
spawned from the restored environment.

Workers of a cluster started elsewhere (``dask worker``, ``dask-jobqueue`` …) keep whatever
their own environment says.  For the same per-task speed start them from a shell without
``MALLOC_TRIM_THRESHOLD_`` and with this in a YAML file of ``~/.config/dask/`` (or of the
folder named by ``DASK_CONFIG``)::

    distributed:
      nanny:
        pre-spawn-environ:
          MALLOC_TRIM_THRESHOLD_: null

or run ``dask worker --no-nanny``.  The environment-variable form of dask config does not work
here: ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_`` is lower-cased
by dask into a different key.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["MALLOC_VARIABLE", "local_client"]

MALLOC_VARIABLE = "MALLOC_TRIM_THRESHOLD_"
"""The glibc tunable that dask's nanny exports and traindyn's workers go without."""


@contextlib.contextmanager
def _spawn_environment() -> Iterator[None]:
    """``os.environ`` without :data:`MALLOC_VARIABLE` inside, exactly as before afterwards."""
    saved = dict(os.environ)
    os.environ.pop(MALLOC_VARIABLE, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def local_client(n_workers: int, threads_per_worker: int = 1,
                 **cluster_kwargs: Any) -> Iterator[Any]:
    """A ``dask.distributed.Client`` on a new ``LocalCluster`` of worker processes.

    Parameters
    ----------
    n_workers : int
        Worker processes (>= 1).
    threads_per_worker : int
        Threads per worker (default 1: the tasks run torch, which has its own threads).
    **cluster_kwargs
        Passed to ``LocalCluster`` (they override the defaults ``processes=True``, no
        dashboard, ``silence_logs=logging.ERROR``).

    Yields
    ------
    distributed.Client
        Closed, with its cluster, on exit.

    Raises
    ------
    ValueError
        ``n_workers < 1``.
    ImportError
        ``dask.distributed`` is not installed (the ``dist`` extra).
    """
    if int(n_workers) < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("parallel runs need dask.distributed: "
                          "pip install 'traindyn[dist]'") from err
    options: dict[str, Any] = dict(processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR)
    if "dashboard_address" not in cluster_kwargs:
        # no dashboard; the scheduler's small HTTP server (health routes) on a free local port
        # instead of 8787, which another cluster may hold
        options["scheduler_kwargs"] = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    options.update(cluster_kwargs)
    unset = {f"distributed.nanny.pre-spawn-environ.{MALLOC_VARIABLE}": None}
    with dask.config.set(unset), _spawn_environment():
        cluster = LocalCluster(n_workers=int(n_workers),
                               threads_per_worker=int(threads_per_worker), **options)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
