"""Probes on a schedule inside a training loop, recorded in traindyn's data model.

::

    monitor = Monitor(model, probes=["rankme", "alpha_req"], layers=["net.1", "net.3"],
                      schedule=log_spaced(5000, 40), probe_data=x_probe, learning_rate=lr,
                      store="run.zarr")
    with monitor:
        for step in range(5001):
            ...                                   # the user's own training step
            monitor.step(step, train_loss=loss)   # evaluates only when schedule(step) is True
    ds = monitor.to_dataset()                     # (step × layer) probes, (step) scalars

Three kinds of probe (``probes=`` takes names or objects, mixed):

* *feature probes* (``probes.registry.FEATURE_PROBES``: ``rankme``, ``alpha_req`` …) map the
  captured ``(n, d)`` features of each layer to a number; they give ``(step, layer)``
  variables.  A feature probe whose function takes ``labels`` receives ``probe_targets``;
  ``"neural_collapse"`` (``probes.collapse``) gives its NC variables per layer this way.
* *model probes* (``probes.registry.MODEL_PROBES``) are stateful callables
  ``probe(model, inputs, targets) -> {variable: value}`` made once per monitor; a value is a
  number (a ``(step,)`` variable) or an ``xarray.DataArray`` with its own dims.
* scalars passed to :meth:`Monitor.step` (losses, accuracies) give ``(step,)`` variables.

**The training run is not disturbed.**  An evaluation runs in eval mode under
``torch.no_grad`` and afterwards restores: every module's train/eval flag, the torch CPU and
CUDA, numpy and Python random states, every buffer (BatchNorm running statistics, even if a
model probe ran in train mode) and every parameter's ``.grad`` (probes that backpropagate see
``grad = None`` and their gradients are discarded).  The optimiser is never touched.  A run with
the monitor is bit-identical in its weights to a run without it (tested).

**Nothing measured is lost.**  With ``store=`` each evaluation is appended to a Zarr store
along ``step`` as soon as it is measured, and the count of complete evaluations is written
after the data; :func:`load_stream` reads the store back, dropping a half-written last
evaluation, so a crash loses at most the evaluation in progress.  :meth:`Monitor.save` (or
``netcdf=``, written when the ``with`` block ends) writes the finished run to NetCDF.

**Background evaluation** (``background=True``, opt-in).  At a scheduled step the training
thread only runs the probe forward pass (inside the same state preservation) and keeps a
detached copy of the captured features; the feature probes, building the Dataset and the
Zarr append run on one worker thread (``ThreadPoolExecutor(max_workers=1)``), so steps are
recorded in order.  torch, numpy and LAPACK release the GIL, so with a spare core the probe
arithmetic overlaps training.  The recorded Dataset is the same as in synchronous mode
(tested).  :meth:`Monitor.to_dataset`, :meth:`Monitor.flush`, :meth:`Monitor.save` and
:meth:`Monitor.close` wait for pending evaluations; an exception raised in the worker is
re-raised on the training thread at the next :meth:`Monitor.step` (or ``flush``/``close``).
*Model probes* still run synchronously on the training thread: they need the model's current
weights.  A feature probe run in the background must not draw from the global random
generators (they are shared with the training thread).

The worker thread computes on one intra-op thread: torch's intra-op thread count is a
per-thread setting (OpenMP's ``nthreads`` is a per-thread variable; ``torch.set_num_threads``
in one thread leaves another thread's count as it was), so the worker's
``torch.set_num_threads(1)`` does not touch the training thread's threads and its solves do not
open an OpenMP team of their own.  Background mode pays off only when a core is free for the
worker: arithmetic is not free because it moved to another thread.  When training already
keeps every core busy, the monitor's CPU time comes out of training either way, and the cost
is ``≈ t_monitor / t_train`` in both modes (``benchmarks/monitor_overhead.py`` measures both).

**Spectral probes share one accumulator.**  ``rankme``, ``rankme_covariance`` and
``alpha_req`` (the registry's default-parameter functions) of a layer are computed from a
single :class:`probes.spectral.SpectralMetrics` accumulator (one pass over the features, the
same numbers as the one-shot functions).
"""

from __future__ import annotations

import inspect
import random
import time as _time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from dynamics import records
from dynamics.schedules import Schedule, log_spaced
from probes import capture, get_feature_probe
from probes.registry import MODEL_PROBES, FeatureProbe, ModelProbe

__all__ = ["Monitor", "load_stream", "preserved_state"]

COMPLETE_ATTR = "monitor_evaluations_complete"
"""Zarr group attribute: number of evaluations fully written to the store."""


class preserved_state:  # noqa: N801 - a context manager used like a function
    """Restore a model's modes, buffers, gradients and all random states on exit.

    Saved on entry, restored on exit: the ``training`` flag of every module; a copy of every
    buffer (BatchNorm running mean/var and ``num_batches_tracked``); each parameter's ``.grad``
    (set to ``None`` inside, so a backward pass inside cannot add to the run's gradients); the
    torch CPU RNG, the CUDA RNGs (if CUDA is initialised), numpy's and Python's global RNGs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> preserved_state:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.grads = [(p, p.grad) for p in self.model.parameters()]
        for p, _ in self.grads:
            p.grad = None
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.np_rng = np.random.get_state()  # noqa: NPY002 - the legacy global state
        self.py_rng = random.getstate()
        return self

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in self.buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
        for p, grad in self.grads:
            p.grad = grad
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.np_rng)  # noqa: NPY002
        random.setstate(self.py_rng)


_preserved_state = preserved_state  # the foundation's private name


def _collapse_probe() -> FeatureProbe:
    from probes.collapse import SOURCE, neural_collapse

    return FeatureProbe("neural_collapse", neural_collapse, "neural-collapse metrics", "1",
                        SOURCE)


def _resolve(probe: str | FeatureProbe | ModelProbe) -> FeatureProbe | ModelProbe:
    if isinstance(probe, (FeatureProbe, ModelProbe)):
        return probe
    if probe not in MODEL_PROBES:
        import probes.instability  # noqa: F401 - registers its model probes
    if probe in MODEL_PROBES:
        return MODEL_PROBES[probe]
    if probe == "neural_collapse":
        try:
            return get_feature_probe(probe)
        except KeyError:
            return _collapse_probe()
    return get_feature_probe(probe)  # KeyError listing the known names


def _takes_labels(probe: FeatureProbe) -> bool:
    try:
        return "labels" in inspect.signature(probe.fn).parameters
    except (TypeError, ValueError):
        return False


def _shared_spectral(probe: FeatureProbe) -> bool:
    """Whether ``probe`` is one of the spectral one-shot functions with default parameters
    that :class:`probes.spectral.SpectralMetrics` computes from a shared accumulator."""
    from probes import spectral

    fns = {"rankme": spectral.rankme, "rankme_covariance": spectral.rankme_covariance,
           "alpha_req": spectral.alpha_req}
    return fns.get(probe.name) is probe.fn


def _concat(batches: torch.Tensor | Sequence[torch.Tensor] | None) -> Any:
    if batches is None or isinstance(batches, torch.Tensor):
        return batches
    batches = list(batches)
    return batches[0] if len(batches) == 1 else torch.cat(batches)


class Monitor:
    """Evaluate probes on chosen layers at scheduled steps; record and stream the results.

    Parameters
    ----------
    model : nn.Module
    probes : sequence of str, FeatureProbe or ModelProbe
        Feature-probe names (``"rankme"``, ``"alpha_req"``, ``"neural_collapse"`` …),
        model-probe names (``probes.registry.MODEL_PROBES``) or probe objects.
    layers : sequence of str
        Module names or glob patterns for the feature probes (unknown names raise
        ``KeyError`` listing the modules).
    schedule : callable ``step -> bool``
        When to evaluate (default: 30 log-spaced steps up to 10,000).
    probe_data : tensor or sequence of tensors
        A fixed probe batch (or batches), passed to ``model(...)``; model probes receive the
        batches concatenated.
    learning_rate : float, optional
        Gives the ``time = learning_rate × step`` coordinate.
    reduce : str
        Token reduction of captured outputs (``probes.capture``).
    seed : int, optional
        Stored as a scalar ``seed`` coordinate, so runs concatenate along ``seed``.
    source : str
        The Dataset's ``source`` attribute.
    probe_targets : tensor or sequence of tensors, optional
        Targets/labels of the probe data: passed to model probes and to feature probes that
        take ``labels`` (neural collapse).
    store : path, optional
        Zarr store to which each evaluation is appended as it is measured (a Zarr store
        already there is replaced when the first evaluation is written; any other existing
        path raises ``FileExistsError``).
    netcdf : path, optional
        NetCDF file written by :meth:`close` (the end of a ``with`` block).
    background : bool
        Compute feature probes and write the store on a worker thread (see the module
        docstring); the training thread only runs the probe forward pass and model probes.
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[str | FeatureProbe | ModelProbe] = ("rankme", "alpha_req"),
        layers: Sequence[str] = (),
        schedule: Schedule | None = None,
        probe_data: torch.Tensor | Sequence[torch.Tensor] | None = None,
        learning_rate: float | None = None,
        reduce: str = "flatten",
        seed: int | None = None,
        source: str = "traindyn Monitor",
        probe_targets: torch.Tensor | Sequence[torch.Tensor] | None = None,
        store: str | Path | None = None,
        netcdf: str | Path | None = None,
        background: bool = False,
    ) -> None:
        self.model = model
        resolved = [_resolve(p) for p in probes]
        self.probes = [p for p in resolved if isinstance(p, FeatureProbe)]
        self.model_probes = [p for p in resolved if isinstance(p, ModelProbe)]
        self.layers = list(capture(model, layers).layers) if layers else []
        if (self.probes and self.layers or self.model_probes) and probe_data is None:
            raise ValueError("probe_data is required to evaluate probes")
        needs_labels = [p.name for p in self.probes if _takes_labels(p)]
        if needs_labels and self.layers and probe_targets is None:
            raise ValueError(f"probes {needs_labels} need labels: pass probe_targets=")
        self.schedule = schedule or log_spaced(10_000, 30)
        self.probe_data = probe_data
        self.probe_targets = probe_targets
        self.learning_rate = learning_rate
        self.reduce = reduce
        self.seed = seed
        self.source = source
        self.store = Path(store) if store is not None else None
        self.netcdf = Path(netcdf) if netcdf is not None else None
        self._model_probe_fns = [(p, p.factory()) for p in self.model_probes]
        self._evaluations: list[xr.Dataset] = []
        self._stream_vars: set[str] | None = None
        self.seconds_spent = 0.0
        self.seconds_storing = 0.0
        self.seconds_background = 0.0
        self.background = bool(background)
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None  # the open Zarr group once the store exists
        self._step_arrays: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._fixed_coords: dict[str, list] = {}
        self._pending: list[Future] = []

    # -- context manager -----------------------------------------------------------------
    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending background work, stop the worker, and write the NetCDF file if
        ``netcdf=`` was given (the Zarr store is already complete)."""
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        if self.netcdf is not None and self._evaluations:
            self.save(self.netcdf)

    def flush(self) -> None:
        """Wait for every pending background evaluation; re-raise the first error of one."""
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        for future in pending:
            exc = future.exception()  # waits
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise RuntimeError("a background evaluation of the monitor failed") from error

    def _raise_finished_errors(self) -> None:
        """Re-raise an error of a finished background evaluation (without waiting)."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            exc = future.exception()
            if exc is not None:
                raise RuntimeError("a background evaluation of the monitor failed") from exc

    # -- measuring -----------------------------------------------------------------------
    def _batches(self) -> list[torch.Tensor]:
        data = self.probe_data
        return [data] if isinstance(data, torch.Tensor) else list(data)

    def _capture(self) -> dict[str, torch.Tensor]:
        """Features of every layer on the probe batch (call inside preserved state, no_grad);
        detached copies, so later training cannot change them."""
        self.model.eval()
        with capture(self.model, self.layers, reduce=self.reduce) as cap:
            for batch in self._batches():
                self.model(batch)
        return {name: f.detach().clone() for name, f in cap.activations().items()}

    def _probe_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """``{variable: values over layers}`` of every feature probe, from captured features.

        The default-parameter spectral probes (``rankme``, ``rankme_covariance``,
        ``alpha_req``) of a layer share one :class:`probes.spectral.SpectralMetrics`
        accumulator; the others are called one by one.
        """
        from probes.spectral import SpectralMetrics

        out: dict[str, np.ndarray] = {}
        labels = _concat(self.probe_targets)
        shared = [p for p in self.probes if _shared_spectral(p)]
        for i, layer in enumerate(self.layers):
            values: dict[str, float] = {}
            if shared:
                metrics = SpectralMetrics([p.name for p in shared])
                metrics.update(feats[layer])
                values.update(metrics.compute())
            for probe in self.probes:
                if probe in shared:
                    items = [(probe.name, values[probe.name])]
                else:
                    kwargs = {"labels": labels} if _takes_labels(probe) else {}
                    value = probe(feats[layer], **kwargs)
                    items = (value.data_vars.items() if isinstance(value, xr.Dataset)
                             else value.items() if isinstance(value, Mapping)
                             else [(probe.name, value)])
                for name, v in items:
                    arr = out.setdefault(name, np.full(len(self.layers), np.nan))
                    arr[i] = float(v)
        return out

    def _feature_values(self) -> dict[str, np.ndarray]:
        """``{variable: values over layers}`` of every feature probe (inside preserved state)."""
        if not (self.layers and self.probes):
            return {}
        return self._probe_features(self._capture())

    def _variable_attrs(self, name: str) -> dict[str, str]:
        for probe in self.probes:
            if probe.name == name:
                return {"long_name": probe.long_name, "units": probe.units,
                        "source": probe.source}
        if any(p.name == "neural_collapse" for p in self.probes):
            from probes.collapse import NC_VARIABLES, SOURCE

            if name in NC_VARIABLES:
                return {**NC_VARIABLES[name], "source": SOURCE}
        for probe in self.model_probes:
            if name in probe.variables:
                long_name, units = probe.variables[name]
                return {"long_name": long_name, "units": units, "source": probe.source}
        return records.variable_attrs(name)

    def measure(self) -> np.ndarray:
        """Feature-probe values now, shape ``(len(layers), len(probes))``, not recorded.

        Only single-valued feature probes; :meth:`evaluate` gives every variable.
        """
        out = np.full((len(self.layers), len(self.probes)), np.nan)
        if not self.layers or not self.probes:
            return out
        with preserved_state(self.model), torch.no_grad():
            values = self._feature_values()
        for j, probe in enumerate(self.probes):
            if probe.name in values:
                out[:, j] = values[probe.name]
        return out

    def _model_probe_values(self) -> dict[str, Any]:
        """Model probes' outputs (call inside preserved state)."""
        extra: dict[str, Any] = {}
        if self._model_probe_fns:
            inputs, targets = _concat(self.probe_data), _concat(self.probe_targets)
            self.model.eval()
            for _, fn in self._model_probe_fns:
                extra.update(fn(self.model, inputs, targets))
        return extra

    def evaluate(self, step: int = 0, **scalars: float) -> xr.Dataset:
        """One evaluation as a Dataset with a length-1 ``step`` dimension (not recorded).

        Always synchronous (also with ``background=True``)."""
        with preserved_state(self.model):
            with torch.no_grad():
                feature_values = self._feature_values()
            extra = self._model_probe_values()
        return self._build(step, feature_values, extra, scalars)

    def _build(self, step: int, feature_values: Mapping[str, np.ndarray],
               extra: Mapping[str, Any], scalars: Mapping[str, float]) -> xr.Dataset:
        coords: dict[str, Any] = records.step_coords([step], self.learning_rate)
        data_vars: dict[str, Any] = {}
        if feature_values:
            coords["layer"] = ("layer", np.array(self.layers, dtype=object))
            for name, values in feature_values.items():
                data_vars[name] = (("step", "layer"), values[None], self._variable_attrs(name))
        arrays = []
        for name, value in extra.items():
            if isinstance(value, xr.DataArray):
                da = value.expand_dims(step=1).assign_coords(step=[step])
                da.attrs = {**self._variable_attrs(name), **value.attrs}
                arrays.append(da.rename(name))
            else:
                data_vars[name] = ("step", [float(value)], self._variable_attrs(name))
        for name, value in scalars.items():
            data_vars[name] = ("step", [float(value)], records.variable_attrs(name))
        if self.seed is not None:
            coords["seed"] = self.seed
        ds = xr.Dataset(data_vars, coords=coords)
        if arrays:
            ds = xr.merge([ds, *arrays], join="outer", combine_attrs="override")
        ds.attrs = self._attrs()
        return ds

    def _record(self, ds: xr.Dataset) -> None:
        self._evaluations.append(ds)
        if self.store is not None:
            stored = _time.perf_counter()
            self._append(ds)
            self.seconds_storing += _time.perf_counter() - stored

    def _background_job(self, step: int, feats: Mapping[str, torch.Tensor] | None,
                        extra: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
        start = _time.perf_counter()
        with torch.no_grad():
            values = self._probe_features(feats) if feats is not None else {}
        self._record(self._build(step, values, extra, scalars))
        self.seconds_background += _time.perf_counter() - start

    def step(self, step: int, **scalars: float) -> bool:
        """Evaluate, record and stream if ``schedule(step)``; returns whether it did.

        With ``background=True`` the feature probes and the store are handed to the worker
        thread, and an error of an earlier background evaluation is raised here."""
        if self._pending:
            self._raise_finished_errors()
        if not self.schedule(step):
            return False
        start = _time.perf_counter()
        if not self.background:
            self._record(self.evaluate(int(step), **scalars))
        else:
            scalars = {k: float(v) for k, v in scalars.items()}
            with preserved_state(self.model):
                with torch.no_grad():
                    feats = self._capture() if (self.layers and self.probes) else None
                extra = self._model_probe_values()
            if self._executor is None:
                # one intra-op thread for the worker only (a per-thread setting; see above)
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="traindyn-monitor",
                    initializer=torch.set_num_threads, initargs=(1,))
            self._pending.append(self._executor.submit(
                self._background_job, int(step), feats, extra, scalars))
        self.seconds_spent += _time.perf_counter() - start
        return True

    # -- storage -------------------------------------------------------------------------
    def _append(self, ds: xr.Dataset) -> None:
        import zarr

        if self._stream_vars is None:
            if self.store.exists():
                if not (self.store / "zarr.json").exists() and not (
                        self.store / ".zgroup").exists():
                    raise FileExistsError(f"{self.store} exists and is not a Zarr store; "
                                          "refusing to replace it")
                import shutil

                shutil.rmtree(self.store)
            self._stream_vars = set(ds.data_vars)
        else:
            new = set(ds.data_vars) - self._stream_vars
            if new:
                warnings.warn(f"variables {sorted(new)} first appeared after the first "
                              "evaluation; they are kept in memory but not streamed", stacklevel=3)
                ds = ds.drop_vars(sorted(new))
            for name in self._stream_vars - set(ds.data_vars):
                template = self._evaluations[0][name]
                ds[name] = xr.full_like(template, np.nan, dtype=float).assign_coords(
                    step=ds["step"].values)
        if self._group is None or not self._fast_append(ds):
            records.append_zarr(ds, self.store)
            self._group = zarr.open_group(str(self.store), mode="r+")
            self._step_arrays = {
                name: (array, tuple(_dimension_names(array) or ()))
                for name, array in self._group.arrays()
                if (_dimension_names(array) or ("",))[0] == "step"}
            self._fixed_coords = {
                name: list(np.asarray(array[...]).tolist())
                for name, array in self._group.arrays()
                if tuple(_dimension_names(array) or ()) == (name,) and name != "step"}
        self._group.attrs[COMPLETE_ATTR] = len(self._evaluations)

    def _fast_append(self, ds: xr.Dataset) -> bool:
        """Append one evaluation straight to the open Zarr arrays along ``step``.

        The same bytes as ``records.append_zarr`` (xarray's ``to_zarr(append_dim="step")``,
        tested) without re-opening and re-validating the store each time.  Returns ``False``,
        writing nothing, when ``ds`` does not match the store exactly (a variable missing or new,
        another shape, dtype or coordinate along a non-step dimension); the caller then falls
        back to ``records.append_zarr``.
        """
        names = {n for n, v in ds.variables.items() if v.dims[:1] == ("step",)}
        if names != set(self._step_arrays) or ds.sizes.get("step") != 1:
            return False
        writes = []
        for name, (array, dims) in self._step_arrays.items():
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

    def _attrs(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "parameters": records.params_attr(dict(
                probes=[p.name for p in self.probes] + [p.name for p in self.model_probes],
                layers=self.layers, reduce=self.reduce, learning_rate=self.learning_rate)),
        }

    def to_dataset(self, attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
        """Everything recorded so far as a Dataset over ``step`` (and ``layer``); waits for
        pending background evaluations."""
        self.flush()
        if self._evaluations:
            names = {n for ds in self._evaluations for n in ds.data_vars}
            filled = []
            for ds in self._evaluations:
                for name in names - set(ds.data_vars):
                    template = next(e[name] for e in self._evaluations if name in e)
                    ds = ds.assign({name: xr.full_like(template, np.nan, dtype=float)
                                    .assign_coords(step=ds["step"].values)})
                filled.append(ds)
            ds = xr.concat(filled, dim="step", data_vars="all", coords="minimal",
                           compat="override", join="outer", combine_attrs="override")
        else:
            ds = xr.Dataset(coords=records.step_coords([], self.learning_rate))
            if self.layers and self.probes:
                ds = ds.assign_coords(layer=("layer", np.array(self.layers, dtype=object)))
                for p in self.probes:
                    ds[p.name] = (("step", "layer"), np.empty((0, len(self.layers))),
                                  self._variable_attrs(p.name))
            if self.seed is not None:
                ds = ds.assign_coords(seed=self.seed)
        ds.attrs = {**self._attrs(), "monitor_seconds": self.seconds_spent,
                    "monitor_seconds_storing": self.seconds_storing, **(attrs or {})}
        if self.background:
            ds.attrs["monitor_seconds_background"] = self.seconds_background
        return ds

    def save(self, path: str | Path) -> Path:
        """Write everything recorded so far to NetCDF (atomically; see ``records.save_netcdf``)."""
        return records.save_netcdf(self.to_dataset(), path)


def _dimension_names(array: Any) -> Sequence[str] | None:
    return getattr(array.metadata, "dimension_names", None) or array.attrs.get(
        "_ARRAY_DIMENSIONS")


def load_stream(path: str | Path) -> xr.Dataset:
    """Read a monitor's Zarr store, keeping only the evaluations written completely.

    A process killed while appending can leave some arrays one evaluation longer than others
    (or longer than the count of complete evaluations); they are cut back to that count in the
    store before it is read, so the result holds every completed evaluation.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no monitor store at {path}")
    group = zarr.open_group(str(path), mode="r+")
    complete = group.attrs.get(COMPLETE_ATTR)
    arrays = []
    for _, array in group.arrays():
        dims = getattr(array.metadata, "dimension_names", None) or array.attrs.get(
            "_ARRAY_DIMENSIONS")
        if dims and dims[0] == "step":
            arrays.append(array)
    if complete is None:
        if not arrays:
            raise ValueError(f"{path} holds no complete evaluation")
        complete = min(a.shape[0] for a in arrays)
    for array in arrays:
        if array.shape[0] > complete:
            array.resize((complete, *array.shape[1:]))
    return records.load(path)
