"""The worker process of ``Monitor(background="process")`` and the messages it exchanges.

* :class:`ProcessWorker` — the training side: a spawned process that owns an
  :class:`~dynamics._evaluator.Evaluator` and a :class:`~dynamics.storage.ZarrStream`,
  computes the feature probes, appends to the store and sends each Dataset back, in step order.
* The messages, one small dataclass each: :class:`Task` (training side → worker), then
  :class:`Ready`, :class:`Done` and :class:`Failed` (worker → training side).

Used by :mod:`dynamics.monitor`; not public.  (The evaluator is in :mod:`dynamics._evaluator`,
the Zarr stream in :mod:`dynamics.storage`; both names are still importable from here.)
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time as _time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from traindyn.dynamics._evaluator import Evaluator, to_numpy
from traindyn.dynamics.storage import COMPLETE_ATTR, ZarrStream, dimension_names
from traindyn.probes.evaluation import Measurement
from traindyn.probes.registry import Probe

__all__ = ["COMPLETE_ATTR", "WORKER_NAME", "Done", "Evaluator", "Failed", "ProcessWorker",
           "Ready", "Task", "WorkerError", "ZarrStream", "check_picklable", "dimension_names",
           "to_numpy"]

WORKER_NAME = "traindyn-monitor"
"""The worker process's name (``multiprocessing.current_process().name`` in it, already while
the spawn start method re-imports the training script there)."""


@dataclass
class Task:
    """One evaluation for the worker: ``features`` ``{layer: ndarray}`` (or ``None``), the
    model and parameter probes measured on the training side, the scalars, and evaluator
    attributes to set first (``learning_rate``, ``seed``, ``source``)."""

    step: int
    features: dict[str, np.ndarray] | None
    extra: Measurement
    scalars: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ready:
    """The worker's first message: its imports are done."""

    pid: int


@dataclass
class Done:
    """One evaluation finished (and appended to the store, if there is one)."""

    step: int
    dataset: xr.Dataset
    seconds: float
    seconds_storing: float


@dataclass
class Failed:
    """One evaluation failed: the exception (``None`` if it cannot be pickled) and the
    worker's traceback text."""

    step: int
    error: BaseException | None
    traceback: str


def check_picklable(probes: Sequence[Probe]) -> None:
    """Raise ``ValueError`` naming the first feature probe that cannot be pickled."""
    for probe in probes:
        try:
            pickle.dumps(probe)
        except Exception as exc:  # noqa: BLE001 - pickling raises many types
            raise ValueError(
                f"feature probe {probe.name!r} cannot be sent to a worker process "
                f"({type(exc).__name__}: {exc}); define its function at module level "
                "(not a lambda or a local function) or use background='thread'") from exc


# -- the worker process ----------------------------------------------------------------------
def _worker_main(tasks: Connection, results: Connection, evaluator: Evaluator,
                 store: str | None, store_mode: str = "new") -> None:
    """Body of the worker process: evaluate each :class:`Task` in order until the pipe ends.

    Sends :class:`Ready` once its imports are done, then a :class:`Done` or :class:`Failed`
    per task.  End of file on ``tasks`` (the training process closed the pipe, or was killed)
    ends the loop after the tasks already received; a broken result pipe (the training
    process is gone) does not stop the evaluations still to be written.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the training side closes us
    torch.set_num_threads(1)
    import traindyn.probes.collapse  # noqa: F401 - imported now, not during the first evaluation
    import traindyn.probes.spectral  # noqa: F401
    import zarr  # noqa: F401

    try:
        results.send(Ready(os.getpid()))
    except OSError:
        pass
    stream = ZarrStream(store, store_mode) if store is not None else None
    parent_alive = True
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):  # closed, or a message cut short by a kill
            break
        if task is None:
            break
        for name, value in task.settings.items():
            setattr(evaluator, name, value)
        start = _time.perf_counter()
        storing = stream.seconds if stream is not None else 0.0
        try:
            feats = task.features
            if feats is not None:
                feats = {k: torch.from_numpy(v) for k, v in feats.items()}
            ds = evaluator.evaluate(task.step, feats, task.extra, task.scalars)
            if stream is not None:
                stream.append(ds)
            storing = (stream.seconds if stream is not None else 0.0) - storing
            reply: Done | Failed = Done(task.step, ds, _time.perf_counter() - start, storing)
        except Exception as exc:  # noqa: BLE001 - every error goes back to the training side
            text = traceback.format_exc()
            error: BaseException | None = exc
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:  # noqa: BLE001 - an exception that cannot travel
                error = None
            reply = Failed(task.step, error, text)
        if parent_alive:
            try:
                results.send(reply)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                parent_alive = False
    tasks.close()
    results.close()


class WorkerError(RuntimeError):
    """The worker process died or could not be reached."""


class ProcessWorker:
    """The training side of the worker process: submit tasks without blocking, collect
    results in order.

    The process is started (spawn context) at construction, so its imports overlap early
    training.  Tasks go through a pipe written by a sender thread, so :meth:`submit` never
    waits for the worker; results come back through a second pipe.
    """

    def __init__(self, evaluator: Evaluator, store: Path | None, store_mode: str = "new"
                 ) -> None:
        ctx = multiprocessing.get_context("spawn")
        task_reader, self._tasks = ctx.Pipe(duplex=False)
        self._results, result_writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_worker_main, name=WORKER_NAME,
            args=(task_reader, result_writer, evaluator,
                  str(store) if store is not None else None, store_mode), daemon=True)
        self.process.start()
        task_reader.close()    # the worker holds the only reader: our death is its EOF
        result_writer.close()  # the worker holds the only writer: its death is our EOF
        self.pending: list[int] = []   # steps submitted and not yet collected, in order
        self.received = 0
        self.ready = False   # the worker's start-up message arrived
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="traindyn-monitor-send",
                                        daemon=True)
        self._sender.start()
        self._closed = False
        atexit.register(self.close)

    def _send_loop(self) -> None:
        while True:
            task = self._outbox.get()
            if task is None:
                break
            try:
                self._tasks.send(task)
            except (BrokenPipeError, ConnectionResetError, OSError):
                break   # the worker is gone; collect() reports it
        self._tasks.close()

    def submit(self, step: int, feats: dict[str, np.ndarray] | None, extra: Measurement,
               scalars: Mapping[str, float], settings: Mapping[str, Any]) -> None:
        """Queue one evaluation (returns at once); ``settings`` updates the worker's
        evaluator's attributes (``learning_rate``, ``seed``, ``source``) first."""
        if self._closed:
            raise RuntimeError("the monitor's worker process is closed")
        self.pending.append(step)
        self._outbox.put(Task(step, feats, extra, dict(scalars), dict(settings)))

    def collect(self, block: bool, keep: int = 0) -> list[Done | Failed]:
        """Results received so far (if ``block``: waiting until at most ``keep`` are still
        pending), in step order.

        Raises :class:`WorkerError` naming the lost evaluations if the process died with
        evaluations pending."""
        out = []
        while len(self.pending) > (keep if block else 0):
            if not block and not self._results.poll():
                if not self.process.is_alive() and not self._results.poll():
                    self._died()
                break
            reply = self._receive()
            if isinstance(reply, Ready):
                continue
            self.pending.pop(0)
            self.received += 1
            out.append(reply)
        return out

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the worker has started and imported what it evaluates with (the
        training side need not; a benchmark does, to time the steady state, and the monitor
        does when the training script has no main guard).  Returns False after ``timeout``
        seconds without it; a worker that died raises :class:`WorkerError`."""
        deadline = None if timeout is None else _time.monotonic() + timeout
        while not self.ready:
            left = None if deadline is None else max(0.0, deadline - _time.monotonic())
            if not wait([self._results, self.process.sentinel], timeout=left):
                return False
            reply = self._receive()
            if not isinstance(reply, Ready):  # cannot happen: Ready is the first message
                raise WorkerError(f"unexpected first message from the worker: {reply!r}")
        return True

    def _receive(self) -> Ready | Done | Failed:
        """The next message from the worker (waits); a dead worker raises WorkerError."""
        wait([self._results, self.process.sentinel])
        try:
            if not self._results.poll():
                self._died()
            reply = self._results.recv()
        except (EOFError, OSError):
            self._died()
        if isinstance(reply, Ready):
            self.ready = True
        return reply

    def _died(self) -> None:
        self.process.join(timeout=5)
        lost, self.pending = self.pending, []
        hint = ("" if self.received else
                "; it died before its first result: if it could not start, note that the spawn "
                "start method imports the training script in the worker, so the training code "
                "must be under `if __name__ == '__main__':` (its error is on stderr)")
        raise WorkerError(
            f"the monitor's worker process died (exit code {self.process.exitcode}); the "
            f"evaluations at steps {lost} were lost (their model probes and scalars too){hint}")

    def close(self) -> list[Done | Failed]:
        """End the task pipe (the worker finishes what it received, then exits), wait for
        the process, and return the results that were still to be collected."""
        if self._closed:
            return []
        self._closed = True
        atexit.unregister(self.close)
        self._outbox.put(None)
        self._sender.join()
        late: list[Done | Failed] = []
        while True:  # keep reading: a worker blocked on a full result pipe never exits
            wait([self._results, self.process.sentinel])
            try:
                if self._results.poll():
                    reply = self._results.recv()
                    if not isinstance(reply, Ready):
                        late.append(reply)
                    continue
            except (EOFError, OSError):
                pass
            break
        self.process.join()
        self._results.close()
        return late
