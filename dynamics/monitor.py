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

* *feature probes* (``consumes="features"`` in ``probes.registry``: ``rankme``,
  ``alpha_req`` …) map the captured ``(n, d)`` features of each layer to a number; they give
  ``(step, layer)`` variables.  A labelled probe (``consumes="labelled_features"``) receives
  ``probe_labels``; ``"neural_collapse"`` (``probes.collapse``) gives its NC variables per
  layer this way.
* *model probes* (``consumes="model"``) are callables
  ``probe(model, inputs, targets) -> {variable: value}``; a value is a number (a ``(step,)``
  variable) or an ``xarray.DataArray`` with its own dims.
* scalars passed to :meth:`Monitor.step` (losses, accuracies) give ``(step,)`` variables.

**The training run is not disturbed.**  An evaluation runs in eval mode under
``torch.no_grad`` and afterwards restores: every module's train/eval flag, the torch CPU and
CUDA, numpy and Python random states, every buffer (BatchNorm running statistics, even if a
model probe ran in train mode) and every parameter's ``.grad`` (probes that backpropagate see
``grad = None`` and their gradients are discarded).  The optimiser is never touched.  A run with
the monitor is bit-identical in its weights to a run without it (tested).

**Nothing measured is lost.**  With ``store=`` each evaluation is appended to a Zarr store
along ``step`` as soon as it is measured and then committed: the store's consolidated
metadata (every array's length and the count of complete evaluations) is replaced atomically
(:class:`dynamics.storage.ZarrStream`).  So a store opens with plain ``xarray.open_zarr`` (or
:func:`load_stream`) at any moment, even after ``kill -9`` mid-append, holding exactly the
complete evaluations: a crash loses at most the evaluation in progress.  An existing store is
never replaced silently: ``store=`` on a path that exists raises ``FileExistsError`` at
construction unless ``overwrite=True`` (replace it) or ``resume=True`` (append to it: a
restarted run, which must have the stored run's seed, learning rate, probes, probe
settings and layers) is given.  :meth:`Monitor.save` (or ``netcdf=``, written when the
``with`` block ends) writes the finished run to NetCDF, never over a file no monitor wrote
unless ``overwrite=True``.  A monitor left open (a loop that ends without ``with`` or
:meth:`Monitor.close`) is closed when it is garbage-collected or at interpreter exit: its
pending background evaluations are stored and its ``netcdf=`` file is written.

**Three modes** (``background=``).  In every mode the training thread runs, at a scheduled
step, the probe forward pass and the model probes (they need the current weights) inside the
same state preservation; the modes differ in where the *feature probes*, building the Dataset
and the Zarr append run (and, in thread mode, the parameter probes, on a snapshot of the
weights).  Every mode reads the probes' numbers from the device once per probe family and
evaluation (:mod:`probes._pending`).  All three record the same Dataset and the same Zarr
store (tested) through one code path (:class:`dynamics._evaluator.Evaluator`, which measures
through :mod:`probes.evaluation` and builds with :mod:`dynamics.measurement_dataset`, the
builder ``analyze`` uses too, and :class:`dynamics.storage.ZarrStream`).

* ``background=False`` (default) — *synchronous*: everything on the training thread.  The
  simplest; the only mode in which feature probes run on the model's device (GPU probes on the
  GPU); costs the whole evaluation ``t_eval`` per scheduled step.
* ``background="process"`` — a *worker process* (``multiprocessing`` spawn context, safe with
  CUDA and OpenMP; started when the monitor is constructed so its imports overlap early
  training; one torch thread).  The training thread copies the captured features to CPU numpy
  arrays (one device-to-host copy on CUDA) and hands ``(step, features, model-probe values,
  scalars)`` to a sender thread that writes them to a pipe, so :meth:`Monitor.step` never waits
  for the worker.  The worker computes the feature probes, appends to the Zarr store and sends
  each Dataset back; :meth:`Monitor.step` collects finished ones without waiting, in step
  order.  No GIL is shared, so with a free core an evaluation costs training little more than
  its forward pass.  Use it for CPU training with a core to spare.  A worker that falls behind
  is waited for only when ``max_pending`` evaluations are queued (default 8): up to that many
  evaluations' features wait in memory.
  Costs: a start-up of ~2-3 s of one core (the imports), the forward pass and the copy per
  evaluation on the training thread; the feature
  probes run on the CPU even when training runs on a GPU.  Feature probes must be picklable
  (module-level functions; a lambda or local function raises ``ValueError`` at construction),
  and a training script must keep its training code under ``if __name__ == "__main__":``
  (spawn imports the main module in the worker): a script without that guard is refused
  with ``RuntimeError`` at construction, before training starts (the monitor waits for the
  worker to start only then, and a Monitor constructed while the worker re-imports the
  script raises there).  If the training process is killed, the
  worker sees the end of its pipe, finishes and writes the evaluations it had received, and
  exits; if the worker dies, the training side raises ``RuntimeError`` naming the steps lost.
* ``background=True`` or ``"thread"`` — a *worker thread* (``ThreadPoolExecutor(max_workers=1)``)
  does the same work in the training process.  Kept for feature probes that cannot be
  pickled: it shares the GIL with training, and the training thread, which releases the GIL
  around every torch op, must win it back from the worker each time (the convoy effect), so it
  saves less than the process mode (see below).  A feature probe run on the worker thread
  must not draw from the global random generators (they are shared with the training thread).
  The worker thread computes on one intra-op thread: ``torch.set_num_threads`` is a per-thread
  setting (OpenMP's ``nthreads`` is a per-thread variable), so the worker's
  ``torch.set_num_threads(1)`` leaves the training thread's count as it was.
  The parameter probes (weight spectra) run in the worker too, on a clone of the layers'
  weights queued at :meth:`Monitor.step` (tested: weights changed by later steps do not reach
  the recorded values), so their SVDs are off the training thread.
  On CUDA the worker thread computes on its own CUDA stream (after an event recorded behind
  the captured features and the weight clones), so its kernels overlap training's instead of
  queueing behind them on the default stream (the overlap itself is unmeasured: no GPU
  timing of it exists yet).

**Process mode on a GPU run** computes the feature probes on the CPU from the same float32
(or bfloat16 → float32) features that synchronous mode uses on the GPU: both accumulate in
float64, so the values differ only by the order of float64 sums and the eigensolvers' round-off
(≲ 1e-12 relative expected).  An earlier H200 run measured ~1e-7 relative between the two
modes; in that check each mode's Monitor ran its own float32 forward pass on the GPU, where
cuBLAS/cuDNN may sum in another order from one call to the next, so float32 round-off of the
*features* (~1e-7) is the likely cause.  ``benchmarks/gpu_check.py`` now prints, beside the
process-vs-sync gap, the gap between two synchronous runs (the forward pass's own floor), and
flags the modes only if they differ beyond it (not yet run on a GPU).

In both background modes :meth:`Monitor.to_dataset`, :meth:`Monitor.flush`,
:meth:`Monitor.save` and :meth:`Monitor.close` wait for pending evaluations, and an exception
raised in the worker is re-raised on the training thread (``RuntimeError`` whose cause is the
original exception; in process mode with the worker's traceback in the message) at the next
:meth:`Monitor.step` (or ``flush``/``close``).  Background modes pay off only when a core is
free for the worker: arithmetic is not free because it moved elsewhere.  When training already
keeps every core busy, the monitor's CPU time comes out of training in every mode, and the cost
is ``≈ t_monitor / t_train``.

Measured (``benchmarks/monitor_overhead.py --model mlp --threads 1``: the digits MLP, 0.86 ms
per step, 5,000 steps, 40 evaluations of RankMe, alpha-ReQ and neural collapse on two
256-wide layers, ~25-35 ms each; a 2-core shared VM, one core free; timings noisy by 10-30 %):
run time / run time without monitor = synchronous 1.30, thread 1.13, process 1.06 (worker
ready before the run; 1.11 when its ~2 s start-up overlaps this 4 s run); the training thread
itself spent 1.8 % of the run in ``monitor.step`` in process mode (the forward pass and the
copy), the worker process 29 ms per evaluation.  A repeat gave 1.29 / 1.11 / 1.10: on a
shared 2-core VM the "free" core is not always free.  With a worker evaluating these probes
non-stop, this MLP's training steps slowed 1.25-1.30x beside a worker thread and 1.03-1.14x
beside a worker process (two runs; 2.6x beside the thread on a busier VM).
On the H200 machine's CPU (16 cores, 4 training threads) one run gave synchronous 1.43,
thread 1.27, process 1.25, with a ~7 s worker start-up there; that machine's timings were
noisy (a second run's baselines disagreed), so treat them as rough.  With CUDA (same
machine) process mode's CPU probe values matched synchronous mode's CUDA values to ~1e-7
relative.

**Spectral probes share one accumulator.**  ``rankme``, ``rankme_covariance`` and
``alpha_req`` (the registry's default-parameter functions) of a layer are computed from a
single :class:`probes.spectral.SpectralMetrics` accumulator (one pass over the features, the
same numbers as the one-shot functions).
"""

from __future__ import annotations

import ast
import multiprocessing
import random
import sys
import threading
import time as _time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.dynamics import measurement_dataset
from traindyn.dynamics._evaluator import Evaluator, to_numpy
from traindyn.dynamics._monitor_worker import (
    WORKER_NAME,
    Done,
    ProcessWorker,
    WorkerError,
    check_picklable,
)
from traindyn.dynamics._renamed import renamed_kwargs
from traindyn.dynamics.schedules import Schedule, log_spaced
from traindyn.dynamics.storage import (
    COMPLETE_ATTR,
    ZarrStream,
    check_replaceable,
    check_resume,
    check_store,
    load_stream,
    run_settings,
    save_netcdf,
)
from traindyn.probes.capture import capture
from traindyn.probes.evaluation import (
    Measurement,
    ProbePlan,
    ReferenceBook,
)
from traindyn.probes.registry import Probe

__all__ = ["COMPLETE_ATTR", "Monitor", "load_stream", "preserved_state"]

OUTPUT_KIND = "monitor"
"""The :data:`dynamics.storage.OUTPUT_ATTR` of a monitor's NetCDF file: a monitor replaces only
a file of this kind (or any with ``overwrite=True``)."""

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


def _handed_over(feats: Mapping[str, torch.Tensor] | None,
                 weights: Mapping[str, torch.Tensor | None] | None) -> list[torch.Tensor]:
    """The tensors a thread-mode evaluation hands to the worker: captured features and the
    weight snapshot."""
    return [t for t in [*(feats or {}).values(), *(weights or {}).values()] if t is not None]


def _concat(batches: torch.Tensor | Sequence[torch.Tensor] | None) -> Any:
    if batches is None or isinstance(batches, torch.Tensor):
        return batches
    batches = list(batches)
    return batches[0] if len(batches) == 1 else torch.cat(batches)


_READY_TIMEOUT = 120.0
"""Seconds a monitor in process mode waits, at construction, for a worker that re-imports a
training script without a main guard (it normally fails within the script's imports)."""


def _unguarded_main() -> str | None:
    """The training script's path if the spawn start method will re-import it in a worker and
    it has no top-level ``if __name__ == "__main__":`` (else ``None``: interactive, ``-c``,
    a notebook, or a guarded script)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py"):
        return None   # spawn re-imports only a main module that is a .py file
    try:
        with open(path, "rb") as handle:
            tree = ast.parse(handle.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [node.test.left, *node.test.comparators]
            if any(isinstance(n, ast.Name) and n.id == "__name__" for n in names):
                return None
    return str(path)


def _unguarded_message(script: str | None = None, in_worker: bool = False) -> str:
    where = (f"the training script {script!r}" if script is not None
             else "the training script")
    what = ("a Monitor was constructed inside the monitor's own worker process" if in_worker
            else "the monitor's worker process could not start")
    return (f"{what}: background='process' starts the worker with the 'spawn' start method, "
            f"which re-imports {where} in the worker, and its training code is not under "
            "`if __name__ == \"__main__\":`, so the worker would run the training again. Put "
            "the training code under `if __name__ == \"__main__\":` (or use "
            "background='thread').")


_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()
"""Monitors not yet closed, drained and closed at interpreter exit (:func:`_close_at_exit`)."""
_EXIT_HOOK: list[bool] = []


def _close_at_exit() -> None:
    """Close every monitor the program left open: wait for its pending evaluations (they are
    stored), stop its worker and write its ``netcdf=`` file.

    Registered with ``threading``'s exit hooks, which run when the main thread ends and before
    ``concurrent.futures`` and zarr's I/O threads shut down (a plain ``atexit`` hook runs after
    them, too late for a worker thread's store writes); an error is printed, not raised."""
    for monitor in list(_OPEN):
        try:
            monitor.close()
        except Exception as exc:  # noqa: BLE001 - at exit: report every monitor's problem
            print(f"traindyn Monitor: closing at interpreter exit failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)


def _keep_until_exit(monitor: Monitor) -> None:
    """Track ``monitor`` (weakly) so that :func:`_close_at_exit` closes it if it is left open."""
    _OPEN.add(monitor)
    if not _EXIT_HOOK:
        register = getattr(threading, "_register_atexit", None)  # CPython >= 3.9
        try:
            if register is None:
                raise RuntimeError
            register(_close_at_exit)
        except RuntimeError:  # no such hook, or the interpreter is already shutting down
            import atexit

            atexit.register(_close_at_exit)
        _EXIT_HOOK.append(True)


_MODES = {False: "sync", None: "sync", "sync": "sync", "synchronous": "sync",
          True: "thread", "thread": "thread", "process": "process"}


class Monitor:
    """Evaluate probes on chosen layers at scheduled steps; record and stream the results.

    Parameters
    ----------
    model : nn.Module
    probes : sequence of str or Probe
        Registered probe names (``"rankme"``, ``"alpha_req"``, ``"neural_collapse"``,
        ``"ntk"`` …; ``probes.registry.all_probes()``) or :class:`~probes.registry.Probe`
        objects.
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
    probe_labels : tensor or sequence of tensors, optional
        Labels of the probe data, one per sample (integer classes, or regression targets for
        a model probe that takes them): passed to model probes and to feature probes that
        take ``labels`` (neural collapse, readouts).  ``probe_targets=`` is a deprecated
        spelling.
    store : path, optional
        Zarr store to which each evaluation is appended and committed as it is measured
        (:class:`dynamics.storage.ZarrStream`).  A store already there raises
        ``FileExistsError`` here, before training starts, unless ``overwrite`` or ``resume``
        is given; a path that is not a Zarr store is never replaced.
    overwrite : bool
        Replace an existing ``store`` (atomically, when the first new evaluation is written:
        until then the old recording is intact), and whatever is at ``netcdf``.
    resume : bool
        Append to an existing ``store`` (a restarted run): its layers must include this
        monitor's (checked here) and the first new evaluation must record the same variables
        and layers (else ``ValueError``); scheduled steps at or below the last recorded step
        are skipped, with one warning.  :meth:`to_dataset` holds this run's evaluations; the
        store holds all (:func:`load_stream`).
    netcdf : path, optional
        NetCDF file written by :meth:`close` (the end of a ``with`` block).  A file there that
        a monitor did not write raises ``FileExistsError`` here unless ``overwrite``.
    background : {False, True, "thread", "process"}
        Where the feature probes and the store writes run (see the module docstring):
        ``False`` on the training thread (synchronous); ``True`` or ``"thread"`` on a worker
        thread; ``"process"`` in a worker process (started here; its feature probes must be
        picklable, else ``ValueError``).  The training thread always runs the probe forward
        pass and the model probes.
    max_pending : int
        Background modes: at most this many evaluations wait for the worker; a scheduled step
        beyond that waits for the oldest one, so the features held for a worker that falls
        behind stay bounded (default 8).
    probe_kwargs : mapping probe name → mapping, optional
        Parameters bound to a probe (``{"alpha_req": {"fit_range": (3, 100)}}``).
    model_schedule : callable ``step -> bool``, optional
        Its own schedule for the parameter and model probes (weight spectra, NTK alignment …),
        which often cost more than the feature probes: they run at the steps where it is
        true, the feature probes where ``schedule`` is.  A step is recorded when either is
        due; the scalar variables of the family not due are NaN there.  Default: ``schedule``.
    tensorboard : path, optional
        A TensorBoard log directory: every scalar of each recorded evaluation (per layer:
        ``rankme/<layer>``; per step: ``train_loss``) is written there as it is recorded
        (:mod:`dynamics.tensorboard`; needs the ``tensorboard`` package).

    Attributes
    ----------
    on_record : list of callables ``Dataset -> None``
        Called with each evaluation (a one-step Dataset) when it is recorded, in the thread
        that records it (the training thread, or the worker thread in thread mode).  The
        ``tensorboard`` writer and the Lightning callback listen here.
    """

    @renamed_kwargs(probe_targets="probe_labels")
    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[str | Probe] = ("rankme", "alpha_req"),
        layers: Sequence[str] = (),
        schedule: Schedule | None = None,
        probe_data: torch.Tensor | Sequence[torch.Tensor] | None = None,
        learning_rate: float | None = None,
        reduce: str = "flatten",
        seed: int | None = None,
        source: str = "traindyn Monitor",
        probe_labels: torch.Tensor | Sequence[torch.Tensor] | None = None,
        store: str | Path | None = None,
        netcdf: str | Path | None = None,
        background: bool | str = False,
        max_pending: int = 8,
        probe_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        model_schedule: Schedule | None = None,
        tensorboard: str | Path | None = None,
    ) -> None:
        if multiprocessing.current_process().name == WORKER_NAME:
            raise RuntimeError(_unguarded_message(in_worker=True))
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be >= 1; got {max_pending}")
        self.max_pending = int(max_pending)
        try:
            mode = _MODES[background]
        except (KeyError, TypeError):
            raise ValueError(f"background={background!r}: use False (synchronous), "
                             "True or 'thread', or 'process'") from None
        self.model = model
        self.layers = list(capture(model, layers).layers) if layers else []
        self.plan = ProbePlan(probes, self.layers, probe_kwargs)
        self.probes = self.plan.feature_probes
        self.model_probes = self.plan.model_probes
        if (self.plan.has_layer_probes or self.model_probes) and probe_data is None:
            raise ValueError("probe_data is required to evaluate probes")
        needs_labels = [p.name for p in self.probes if p.needs_labels]
        if needs_labels and self.layers and probe_labels is None:
            raise ValueError(f"probes {needs_labels} need labels: pass probe_labels=")
        model_needs = [p.name for p in self.model_probes if p.needs_labels]
        if model_needs and probe_labels is None:
            raise ValueError(f"probes {model_needs} need labels: pass probe_labels=")
        references = ReferenceBook(self.plan)  # model and parameter probes' states
        if mode == "process":
            check_picklable(self.probes)
        self.schedule = schedule or log_spaced(10_000, 30)
        self.model_schedule = model_schedule
        self.probe_data = probe_data
        self.probe_labels = probe_labels
        self._learning_rate = learning_rate
        self.reduce = reduce
        self.seed = seed
        self.source = source
        self.store = Path(store) if store is not None else None
        self.netcdf = Path(netcdf) if netcdf is not None else None
        self._overwrite = bool(overwrite)
        if self.netcdf is not None:   # refused now, not when the run ends
            check_replaceable(self.netcdf, OUTPUT_KIND, overwrite)
        self._resume_after: int | None = None   # resume=True: the last step in the store
        self._skip_warned = False
        store_mode = "new"
        if self.store is not None:
            held = check_store(self.store, overwrite=overwrite, resume=resume)
            if overwrite and self.store.exists():
                store_mode = "overwrite"
            elif held is not None:
                store_mode = "resume"
                missing = [layer for layer in self.layers if layer not in held["layers"]]
                if missing:
                    raise ValueError(
                        f"resume=True: the store {str(self.store)!r} has no layers {missing} "
                        f"(it holds {held['layers']}); resume only the same monitor, or pass "
                        "overwrite=True or another store=")
                self._resume_after = max(held["steps"]) if held["steps"] else None
        self._model_instances = self.plan.model_instances()
        self._evaluations: list[xr.Dataset] = []
        self.on_record: list[Callable[[xr.Dataset], Any]] = []
        self._tensorboard = None
        if tensorboard is not None:
            from traindyn.dynamics.tensorboard import TensorBoardWriter

            self._tensorboard = TensorBoardWriter(tensorboard)
            self.on_record.append(self._tensorboard)
        self._stream = ZarrStream(self.store, store_mode) if self.store is not None else None
        self.seconds_spent = 0.0
        self.seconds_background = 0.0
        self._seconds_storing_elsewhere = 0.0  # the worker process's store writes
        self.mode = mode
        self.background = mode != "sync"
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._worker: ProcessWorker | None = None
        self._eval = Evaluator(self.plan, _concat(probe_labels), learning_rate, seed, source,
                               reduce, model_references=references)
        if store_mode == "resume":   # the learning rate, if set later, is checked at the append
            check_resume(self.store, held["settings"],
                         run_settings(self._eval.attrs()["parameters"], seed),
                         ignore=("learning_rate",) if learning_rate is None else ())
        self._closed = False
        self._finished_closing = False
        self._closing = threading.Lock()
        _keep_until_exit(self)
        if mode == "process":  # start now: the worker's imports overlap early training
            self._worker = ProcessWorker(self._eval, self.store, store_mode)
            script = _unguarded_main()
            if script is not None:   # the worker re-imports it: wait to see it survive that
                try:
                    self._worker.wait_ready(timeout=_READY_TIMEOUT)
                except WorkerError:
                    worker, self._worker = self._worker, None
                    worker.close()
                    raise RuntimeError(_unguarded_message(script=script)) from None

    # -- the evaluation path shared by the three modes -------------------------------------
    @property
    def probe_targets(self) -> torch.Tensor | Sequence[torch.Tensor] | None:
        """Deprecated spelling of :attr:`probe_labels`."""
        warnings.warn("Monitor.probe_targets is deprecated; use Monitor.probe_labels",
                      DeprecationWarning, stacklevel=2)
        return self.probe_labels

    @property
    def learning_rate(self) -> float | None:
        """Gives the ``time`` coordinate (settable: the Lightning callback reads it from the
        optimiser after construction; each task to a worker process carries it)."""
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value: float | None) -> None:
        self._learning_rate = value

    def _evaluator(self) -> Evaluator:
        """The monitor's evaluator, with the current learning rate."""
        self._eval.learning_rate = self.learning_rate
        return self._eval

    @property
    def seconds_storing(self) -> float:
        """Seconds spent appending to the Zarr store (in whichever thread or process)."""
        own = self._stream.seconds if self._stream is not None else 0.0
        return own + self._seconds_storing_elsewhere

    # -- context manager -----------------------------------------------------------------
    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending background work, stop the worker (thread or process), and write
        the NetCDF file if ``netcdf=`` was given (the Zarr store is already complete).

        A monitor left open (no ``with``, no ``close``) is closed when it is garbage-collected
        or at interpreter exit, whichever comes first: its pending evaluations are stored
        (a thread-mode monitor is not collected while any is pending), its ``netcdf=`` file
        written.

        Closing is done once, by whichever thread comes first; another caller waits until it
        has finished. When the last reference to a thread-mode monitor is a finished job of its
        own worker thread, the monitor is collected (and closed) on that thread, which cannot
        wait for itself: it stops taking work (every job is done) and ends once the NetCDF
        file is written; interpreter exit waits for it."""
        with self._closing:
            if self._finished_closing:
                return
            self._closed = True
            _OPEN.discard(self)
            try:
                self.flush()
            finally:
                if self._executor is not None:
                    executor, self._executor = self._executor, None
                    own_thread = threading.current_thread() in getattr(executor, "_threads", ())
                    executor.shutdown(wait=not own_thread)
                if self._worker is not None:
                    worker, self._worker = self._worker, None
                    worker.close()
                if self._tensorboard is not None:
                    self._tensorboard.close()
            if self.netcdf is not None and self._evaluations:
                self.save(self.netcdf, overwrite=self._overwrite)
            self._finished_closing = True

    def __del__(self) -> None:
        if getattr(self, "_closed", True):  # closed, or its construction failed
            return
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - a finaliser cannot raise
            print(f"traindyn Monitor: closing a monitor left open failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)

    def flush(self) -> None:
        """Wait for every pending background evaluation; re-raise the first error of one."""
        if self._worker is not None:
            self._collect(block=True)
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

    def _collect(self, block: bool, keep: int = 0) -> None:
        """Record the worker process's finished evaluations (if ``block``: waiting until at
        most ``keep`` are pending); re-raise the first error of one after recording the others
        received with it."""
        try:
            replies = self._worker.collect(block, keep)
        except WorkerError as exc:
            raise RuntimeError(str(exc)) from None
        error: BaseException | None = None
        for reply in replies:
            if isinstance(reply, Done):
                self._evaluations.append(reply.dataset)
                self._notify(reply.dataset)
                self.seconds_background += reply.seconds
                self._seconds_storing_elsewhere += reply.seconds_storing
            elif error is None:
                error = RuntimeError(
                    f"a background evaluation of the monitor failed (step {reply.step}); the "
                    f"worker process's traceback:\n{reply.traceback}")
                error.__cause__ = reply.error
        if error is not None:
            raise error

    # -- measuring -----------------------------------------------------------------------
    def _batches(self) -> list[torch.Tensor]:
        data = self.probe_data
        return [data] if isinstance(data, torch.Tensor) else list(data)

    def _capture(self) -> dict[str, torch.Tensor]:
        """Features of every layer on the probe batch (inside preserved state)."""
        return self._evaluator().features(self.model, self._batches())

    def _probe_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """``{variable: values over layers}`` of every scalar feature probe, from captured
        features (see :meth:`dynamics._evaluator.Evaluator.feature_values`)."""
        return self._evaluator().feature_values(feats)

    def measure(self) -> np.ndarray:
        """Feature-probe values now, shape ``(len(layers), len(probes))``, not recorded.

        Only single-valued feature probes (the variable named after the probe);
        :meth:`evaluate` gives every variable.  Reference probes are not advanced.
        """
        out = np.full((len(self.layers), len(self.probes)), np.nan)
        if not self.plan.has_layer_probes:
            return out
        with preserved_state(self.model), torch.no_grad():
            feats = self._capture()
        values = self._eval.current_values(feats)
        for j, probe in enumerate(self.probes):
            if probe.name in values:
                out[:, j] = values[probe.name]
        return out

    def evaluate(self, step: int = 0, **scalars: float) -> xr.Dataset:
        """One evaluation as a Dataset with a length-1 ``step`` dimension (not recorded).

        Always synchronous (whatever ``background`` is)."""
        self._eval.check_scalars(scalars)
        return self._evaluate_due(step, True, True, scalars)

    def _evaluate_due(self, step: int, features_due: bool, model_due: bool,
                      scalars: Mapping[str, float]) -> xr.Dataset:
        """One synchronous evaluation of the probe families due at ``step``."""
        evaluator = self._evaluator()
        with preserved_state(self.model):
            measurement = evaluator.synchronous(
                self.model, self._batches(), _concat(self.probe_data),
                _concat(self.probe_labels), self._model_instances, step, features_due, model_due)
        return evaluator.build(step, measurement, scalars)

    def _record(self, ds: xr.Dataset) -> None:
        if self._stream is not None:
            self._stream.append(ds)
        self._evaluations.append(ds)
        self._notify(ds)

    def _notify(self, ds: xr.Dataset) -> None:
        for listener in self.on_record:
            listener(ds)

    def _background_job(self, evaluator: Evaluator, step: int,
                        feats: Mapping[str, torch.Tensor] | None, extra: Measurement,
                        scalars: Mapping[str, float], ready: Any = None,
                        weights: Mapping[str, torch.Tensor | None] | None = None) -> None:
        start = _time.perf_counter()
        if ready is not None:  # CUDA: compute on the monitor's own stream (see _side_stream)
            tensors = _handed_over(feats, weights)
            stream = self._side_stream(tensors[0].device)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                for t in tensors:
                    t.record_stream(stream)
                ds = evaluator.evaluate(step, feats, extra, scalars, weights)
        else:
            ds = evaluator.evaluate(step, feats, extra, scalars, weights)
        self._record(ds)
        self.seconds_background += _time.perf_counter() - start

    def _side_stream(self, device: torch.device) -> Any:
        """The thread worker's own CUDA stream on ``device``: its kernels overlap training's
        instead of queueing behind them on the default stream (made on first use).
        Unmeasured: no GPU was available when this was written."""
        streams = self.__dict__.setdefault("_streams", {})
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)
        return streams[device]

    @staticmethod
    def _ready_event(feats: Mapping[str, torch.Tensor] | None,
                     weights: Mapping[str, torch.Tensor | None] | None = None) -> Any:
        """A CUDA event recorded after the captured features and the weight snapshot on the
        training stream (the worker's stream waits for it), or ``None`` off CUDA."""
        tensors = _handed_over(feats, weights)
        if not tensors:
            return None
        first = tensors[0]
        if first.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(first.device))
        return event

    def _bound_pending(self) -> None:
        """Wait for the worker while ``max_pending`` evaluations are queued (bounds the memory
        held by features waiting for a worker that falls behind)."""
        limit = self.max_pending
        if self._worker is not None and len(self._worker.pending) >= limit:
            self._collect(block=True, keep=limit - 1)
        while len(self._pending) >= limit:
            self._pending[0].exception()  # waits for the oldest thread job
            self._raise_finished_errors()

    def step(self, step: int, **scalars: float) -> bool:
        """Evaluate, record and stream if ``schedule(step)``; returns whether it did.

        In background mode the feature probes and the store are handed to the worker (thread
        or process), finished results are collected without waiting, and an error of an
        earlier background evaluation is raised here."""
        self._eval.check_scalars(scalars)
        if self._pending:
            self._raise_finished_errors()
        if self._worker is not None and self._worker.pending:
            self._collect(block=False)
        features_due = bool(self.schedule(step))
        model_due = features_due if self.model_schedule is None else bool(
            self.model_schedule(step))
        if not (features_due or model_due):
            return False
        if self._resume_after is not None and step <= self._resume_after:
            if not self._skip_warned:
                self._skip_warned = True
                warnings.warn(f"resume=True: the store {str(self.store)!r} already holds steps "
                              f"up to {self._resume_after}; scheduled steps up to it are "
                              f"skipped (first: {step})", stacklevel=2)
            return False
        self._bound_pending()
        start = _time.perf_counter()
        if self.mode == "sync":
            self._record(self._evaluate_due(int(step), features_due, model_due, scalars))
        else:
            scalars = {k: float(v) for k, v in scalars.items()}
            process = self.mode == "process"
            if process and self._worker is None:
                raise RuntimeError("the monitor is closed: its worker process has exited")
            with preserved_state(self.model):
                with torch.no_grad():
                    feats = (self._capture()
                             if self.plan.has_layer_probes and features_due else None)
                    arrays = (None if feats is None or not process
                              else {k: to_numpy(v) for k, v in feats.items()})
                # thread mode: the parameter probes run in the worker on a snapshot of the
                # weights (a queued clone), so that their solves overlap training
                weights = (self.plan.weights(self.model, copy=True)
                           if not process and model_due and self.plan.parameter_probes
                           else None)
                extra = self._evaluator().model_side(
                    self.model, _concat(self.probe_data), _concat(self.probe_labels),
                    self._model_instances, step, model_due, parameters=weights is None)
                if not features_due:
                    extra = extra | self._eval.not_due(("features", "labelled_features"))
            if process:
                self._worker.submit(int(step), arrays, extra, scalars,
                                    dict(learning_rate=self.learning_rate, seed=self.seed,
                                         source=self.source))
            else:
                if self._executor is None:
                    # one intra-op thread for the worker only (a per-thread setting; see above)
                    self._executor = ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="traindyn-monitor",
                        initializer=torch.set_num_threads, initargs=(1,))
                self._pending.append(self._executor.submit(
                    self._background_job, self._evaluator(), int(step), feats, extra, scalars,
                    self._ready_event(feats, weights), weights))
        self.seconds_spent += _time.perf_counter() - start
        return True

    def to_dataset(self, attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
        """Everything recorded so far as a Dataset over ``step`` (and ``layer``); waits for
        pending background evaluations."""
        self.flush()
        evaluator = self._evaluator()
        if self._evaluations:
            ds = measurement_dataset.concat_steps(self._evaluations)
        else:
            ds = measurement_dataset.empty(self.layers, self.plan.variables(),
                                           self.learning_rate, self.seed,
                                           per_layer=self.plan.has_layer_probes)
        ds.attrs = {**evaluator.attrs(), "monitor_seconds": self.seconds_spent,
                    "monitor_seconds_storing": self.seconds_storing, **(attrs or {})}
        if self.background:
            ds.attrs["monitor_seconds_background"] = self.seconds_background
        return ds

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write everything recorded so far to NetCDF (atomically; a file there that a monitor
        did not write is replaced only with ``overwrite=True``; see
        :func:`dynamics.storage.save_netcdf`)."""
        return save_netcdf(self.to_dataset(), path, kind=OUTPUT_KIND, overwrite=overwrite)
