"""The monitor's evaluation path, shared by its three modes: features → values → Dataset → Zarr.

* :class:`Evaluator` — a small picklable object (feature probes, layers, labels, learning rate,
  seed, source, reduce, attributes) that turns captured features, model-probe outputs and
  scalars into one evaluation's Dataset.
* :class:`ZarrStream` — the Zarr streaming state (the open group, its arrays along ``step``,
  the count of complete evaluations written after the data).
* :class:`ProcessWorker` — the training side of ``Monitor(background="process")``: a
  spawned process that owns an :class:`Evaluator` and a :class:`ZarrStream`, computes the
  feature probes, appends to the store and sends each Dataset back, in step order.

Used by :mod:`dynamics.monitor`; not public.
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
import warnings
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from dynamics import records
from probes.evaluation import Measurement, ProbePlan, ReferenceBook
from probes.registry import Probe

COMPLETE_ATTR = "monitor_evaluations_complete"
"""Zarr group attribute: number of evaluations fully written to the store."""


def to_numpy(features: torch.Tensor) -> np.ndarray:
    """A detached CPU numpy copy of captured features (one device-to-host copy on CUDA).

    ``bfloat16`` (which numpy lacks) becomes ``float32``: exact, and the probes compute in
    float64 anyway."""
    t = features.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    t = t.cpu() if t.device.type != "cpu" else t.clone()
    return t.numpy()


class Evaluator:
    """Features → probe values → one evaluation's Dataset (picklable when its probes are).

    Holds the :class:`probes.evaluation.ProbePlan` and the in-memory reference states of the
    per-layer probes that compare with the first or previous evaluation, so one instance
    lives as long as the monitor (in the worker process, in process mode).

    Parameters
    ----------
    plan : ProbePlan
    labels : tensor, optional
        Labels of the probe data, for labelled probes.  Pickled as a numpy array and restored
        as a CPU tensor.
    learning_rate, seed, source, reduce
        As in :class:`dynamics.monitor.Monitor`.
    """

    def __init__(self, plan: ProbePlan, labels: Any, learning_rate: float | None,
                 seed: int | None, source: str, reduce: str) -> None:
        self.plan = plan
        self.layers = list(plan.layers)
        self.labels = labels
        self.learning_rate = learning_rate
        self.seed = seed
        self.source = source
        self.reduce = reduce
        self.references = ReferenceBook(plan)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.labels, torch.Tensor):
            state["labels"] = to_numpy(self.labels)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.labels, np.ndarray):
            self.labels = torch.from_numpy(self.labels)

    def feature_measurement(self, feats: Mapping[str, Any]) -> Measurement:
        """The per-layer feature probes of captured features (shared accumulators; reference
        probes compared with this evaluator's first/previous states)."""
        plan = self.plan
        if not plan.has_layer_probes:
            return Measurement()
        with torch.no_grad():
            out = plan.layer_values(plan.accumulate(feats, self.labels))
            if plan.references and out.states:
                out = out | plan.compare(out.states, self.references.get)
                self.references.record(out.states)
        return out

    def feature_values(self, feats: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``{variable: values over layers}`` of the scalar per-layer feature probes."""
        return self.feature_measurement(feats).per_layer(self.layers)

    def variable_attrs(self, name: str) -> dict[str, str]:
        """``long_name``, ``units`` and ``source`` of a recorded variable."""
        declared = self.plan.variables().get(name)
        return dict(declared[1]) if declared else records.variable_attrs(name)

    def attrs(self) -> dict[str, Any]:
        """The Dataset attributes ``source`` and ``parameters``."""
        return {
            "source": self.source,
            "parameters": records.params_attr(dict(
                probes=self.plan.names(), layers=self.layers, reduce=self.reduce,
                learning_rate=self.learning_rate,
                probe_kwargs={p.name: dict(p.kwargs) for p in self.plan.probes if p.kwargs})),
        }

    def _layer_array(self, name: str, per_layer: Mapping[str, Any]) -> Any:
        """One per-layer variable over ``(step, layer, …)``: an array of numbers, or a
        DataArray when the values carry extra dims."""
        dims = self.plan.variables().get(name, (("layer",), {}))[0][1:]
        sample = next(iter(per_layer.values()))
        if np.ndim(sample) == 0 and not isinstance(sample, xr.DataArray):
            return np.array([[float(per_layer.get(layer, np.nan)) for layer in self.layers]])
        items = []
        for layer in self.layers:
            v = per_layer.get(layer)
            if v is None:
                v = xr.full_like(xr.DataArray(sample) if not isinstance(sample, xr.DataArray)
                                 else sample, np.nan, dtype=float)
            if not isinstance(v, xr.DataArray):
                v = xr.DataArray(np.asarray(v, dtype=float),
                                 dims=dims or tuple(f"{name}_dim_{i}" for i in range(np.ndim(v))))
            items.append(v)
        da = xr.concat(items, dim="layer", join="outer").assign_coords(
            layer=("layer", np.array(self.layers, dtype=object)))
        return da

    def build(self, step: int, measurement: Measurement, scalars: Mapping[str, float]
              ) -> xr.Dataset:
        """One evaluation as a Dataset with a length-1 ``step`` dimension."""
        coords: dict[str, Any] = records.step_coords([step], self.learning_rate)
        data_vars: dict[str, Any] = {}
        arrays = []
        if measurement.layer_values:
            coords["layer"] = ("layer", np.array(self.layers, dtype=object))
        for name, per_layer in measurement.layer_values.items():
            value = self._layer_array(name, per_layer)
            if isinstance(value, xr.DataArray):
                da = value.expand_dims(step=1).assign_coords(step=[step])
                da.attrs = self.variable_attrs(name)
                arrays.append(da.rename(name))
            else:
                data_vars[name] = (("step", "layer"), value, self.variable_attrs(name))
        for name, value in measurement.values.items():
            if isinstance(value, xr.DataArray):
                da = value.expand_dims(step=1).assign_coords(step=[step])
                da.attrs = {**self.variable_attrs(name), **value.attrs}
                arrays.append(da.rename(name))
            else:
                data_vars[name] = ("step", [float(value)], self.variable_attrs(name))
        for name, value in scalars.items():
            data_vars[name] = ("step", [float(value)], records.variable_attrs(name))
        if self.seed is not None:
            coords["seed"] = self.seed
        ds = xr.Dataset(data_vars, coords=coords)
        if arrays:
            ds = xr.merge([ds, *arrays], join="outer", combine_attrs="override")
        ds.attrs = self.attrs()
        return ds

    def evaluate(self, step: int, feats: Mapping[str, Any] | None, extra: Measurement,
                 scalars: Mapping[str, float]) -> xr.Dataset:
        """Feature probes of ``feats`` (``None``: none), merged with ``extra`` (the model and
        parameter probes measured on the training side), as one evaluation's Dataset."""
        measurement = self.feature_measurement(feats) if feats is not None else Measurement()
        return self.build(step, measurement | extra, scalars)


def dimension_names(array: Any) -> Sequence[str] | None:
    """The dimension names of a Zarr array (format 3 metadata, or xarray's v2 attribute)."""
    return getattr(array.metadata, "dimension_names", None) or array.attrs.get(
        "_ARRAY_DIMENSIONS")


class ZarrStream:
    """Append evaluations to a Zarr store along ``step``; the count of complete evaluations
    (:data:`COMPLETE_ATTR`) is written after each evaluation's data.

    The first append replaces a Zarr store already at ``path``; any other existing path raises
    ``FileExistsError``.  Variables that first appear after the first evaluation are dropped
    (with a warning); variables missing from a later one are written as NaN.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self.seconds = 0.0
        self.group: Any = None  # the open Zarr group once the store exists
        self.step_arrays: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._fixed_coords: dict[str, list] = {}
        self._vars: set[str] | None = None
        self._first: xr.Dataset | None = None

    def append(self, ds: xr.Dataset) -> None:
        """Append one evaluation (a Dataset with a length-1 ``step`` dimension)."""
        import zarr

        start = _time.perf_counter()
        if self._vars is None:
            if self.path.exists():
                if not (self.path / "zarr.json").exists() and not (
                        self.path / ".zgroup").exists():
                    raise FileExistsError(f"{self.path} exists and is not a Zarr store; "
                                          "refusing to replace it")
                import shutil

                shutil.rmtree(self.path)
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
        if self.group is None or not self._fast_append(ds):
            records.append_zarr(ds, self.path)
            self.group = zarr.open_group(str(self.path), mode="r+")
            self.step_arrays = {
                name: (array, tuple(dimension_names(array) or ()))
                for name, array in self.group.arrays()
                if (dimension_names(array) or ("",))[0] == "step"}
            self._fixed_coords = {
                name: list(np.asarray(array[...]).tolist())
                for name, array in self.group.arrays()
                if tuple(dimension_names(array) or ()) == (name,) and name != "step"}
        self.count += 1
        self.group.attrs[COMPLETE_ATTR] = self.count
        self.seconds += _time.perf_counter() - start

    def _fast_append(self, ds: xr.Dataset) -> bool:
        """Append one evaluation straight to the open Zarr arrays along ``step``.

        The same bytes as ``records.append_zarr`` (xarray's ``to_zarr(append_dim="step")``,
        tested) without re-opening and re-validating the store each time.  Returns ``False``,
        writing nothing, when ``ds`` does not match the store exactly (a variable missing or new,
        another shape, dtype or coordinate along a non-step dimension); the caller then falls
        back to ``records.append_zarr``.
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
            array.append(values, axis=0)
        return True


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
                 store: str | None) -> None:
    """Body of the worker process: evaluate each task in order until the task pipe ends.

    A task is ``(step, features, extra, scalars, settings)`` (``features``:
    ``{layer: ndarray}`` or ``None``; ``settings``: evaluator attributes to set first).
    For each it sends back ``("ok", step, dataset, seconds, seconds_storing)`` or
    ``("error", step, exception or None, traceback text)``, after a first ``("ready", pid)``
    once its imports are done.  End of file on ``tasks`` (the
    training process closed the pipe, or was killed) ends the loop after the tasks already
    received; a broken result pipe (the training process is gone) does not stop the
    evaluations still to be written.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the training side closes us
    torch.set_num_threads(1)
    import zarr  # noqa: F401

    import probes.collapse  # noqa: F401 - imported now, not during the first evaluation
    import probes.spectral  # noqa: F401

    try:
        results.send(("ready", os.getpid()))
    except OSError:
        pass
    stream = ZarrStream(store) if store is not None else None
    parent_alive = True
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):  # closed, or a message cut short by a kill
            break
        if task is None:
            break
        step, feats, extra, scalars, settings = task
        for name, value in settings.items():
            setattr(evaluator, name, value)
        start = _time.perf_counter()
        storing = stream.seconds if stream is not None else 0.0
        try:
            if feats is not None:
                feats = {k: torch.from_numpy(v) for k, v in feats.items()}
            ds = evaluator.evaluate(step, feats, extra, scalars)
            if stream is not None:
                stream.append(ds)
            storing = (stream.seconds if stream is not None else 0.0) - storing
            reply: tuple = ("ok", step, ds, _time.perf_counter() - start, storing)
        except Exception as exc:  # noqa: BLE001 - every error goes back to the training side
            text = traceback.format_exc()
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:  # noqa: BLE001 - an exception that cannot travel
                exc = None
            reply = ("error", step, exc, text)
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

    def __init__(self, evaluator: Evaluator, store: Path | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        task_reader, self._tasks = ctx.Pipe(duplex=False)
        self._results, result_writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_worker_main, name="traindyn-monitor",
            args=(task_reader, result_writer, evaluator,
                  str(store) if store is not None else None), daemon=True)
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
        self._outbox.put((step, feats, extra, dict(scalars), dict(settings)))

    def collect(self, block: bool, keep: int = 0) -> list[tuple]:
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
            if reply[0] == "ready":
                continue
            self.pending.pop(0)
            self.received += 1
            out.append(reply)
        return out

    def wait_ready(self) -> None:
        """Wait until the worker has started and imported what it evaluates with (the
        training side never needs to; a benchmark does, to time the steady state)."""
        while not self.ready:
            reply = self._receive()
            if reply[0] != "ready":  # cannot happen: "ready" is the worker's first message
                raise WorkerError(f"unexpected first message from the worker: {reply[0]!r}")

    def _receive(self) -> tuple:
        """The next message from the worker (waits); a dead worker raises WorkerError."""
        wait([self._results, self.process.sentinel])
        try:
            if not self._results.poll():
                self._died()
            reply = self._results.recv()
        except (EOFError, OSError):
            self._died()
        if reply[0] == "ready":
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

    def close(self) -> list[tuple]:
        """End the task pipe (the worker finishes what it received, then exits), wait for
        the process, and return the results that were still to be collected."""
        if self._closed:
            return []
        self._closed = True
        atexit.unregister(self.close)
        self._outbox.put(None)
        self._sender.join()
        late: list[tuple] = []
        while True:  # keep reading: a worker blocked on a full result pipe never exits
            wait([self._results, self.process.sentinel])
            try:
                if self._results.poll():
                    reply = self._results.recv()
                    if reply[0] != "ready":
                        late.append(reply)
                    continue
            except (EOFError, OSError):
                pass
            break
        self.process.join()
        self._results.close()
        return late
