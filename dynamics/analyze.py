"""A run's checkpoint series → one Dataset over ``(step × layer)``: safely, resumably, in parallel.

::

    ds = analyze("runs/lm/ckpt", model="traindyn.dynamics.recipes.tiny_lm:TinyLM",
                 probe_data="stdlib-text", tokenizer="bytes", probes=["rankme", "alpha_req"],
                 layers=["blocks.*"], reduce="last", output="runs/lm/geometry.nc", workers=2)

For each checkpoint (in step order) the weights are loaded safely
(:mod:`dynamics.checkpoints`), the fixed probe inputs (:mod:`dynamics.probe_inputs`) run
through the model in eval mode, the chosen layers are captured by forward hooks
(:mod:`probes.capture`, with its token reduction rules), and every probe asked for is
evaluated through the probe contract (:mod:`probes.registry`, :mod:`probes.evaluation`) — the
same path as the Monitor's:

* feature probes per layer; those that share an accumulator (RankMe, alpha-ReQ and the
  effective ranks: one streaming float64 second moment; NC1–NC4 and CDNV: one set of class
  statistics) stream the features batch by batch and never store them whole;
* labelled probes (``neural_collapse`` …) with ``probe_labels=`` (``"digits"`` or a file);
* parameter probes per layer (``weight_spectra``: ESD summaries and the guarded heavy-tail α);
* model probes on the probe batch (``ntk`` and its alignment with the labels …);
* reference probes (kernel velocity / distance to the previous checkpoint, CKA against the
  first or final one …): each checkpoint's state (a kernel, a layer's features) is stored with
  its result (``<output>.parts/step<N>.npz``), and the comparisons are made once every state
  is known, so the checkpoints can run in parallel and a resumed run gives the identical
  Dataset.

Reliability:

* A checkpoint that cannot be analysed (unsafe pickle, truncated file, missing keys, shape
  mismatch, non-finite weights, an error in the forward pass) is recorded with
  ``status = "failed"`` and its ``reason``; the others are analysed.
* With an ``output`` path, each checkpoint's result is written atomically (temporary file, then
  ``os.replace``) to ``<output>.parts/`` as soon as it finishes.  A re-run reuses a result only
  when what determines its numbers is unchanged — the parameters, the checkpoint's *content*,
  the probe-input and label files' content, the source of the model factory and of every
  module it imports from the user's files, the source of the probes and of the ``imports``,
  traindyn's version and its own modules on the analysis path (:mod:`dynamics._analyze_parts`)
  — and always says on one line what it reuses and what it recomputes and why (the changed
  modules by name).  A run killed at any point (SIGKILL included) and restarted gives the
  same Dataset as an uninterrupted run.  The output path is checked before any checkpoint is
  computed (:class:`~dynamics._analyze_parts.OutputError`).
  Only the timing variables (:data:`TIMING_VARIABLES`) differ between runs.  The final NetCDF
  file replaces the old one with one ``os.replace``; a Zarr store (a folder) is written whole
  beside the old one and swapped in atomically where Linux allows (``renameat2`` exchange),
  else by two renames that the next run repairs if a crash falls between them.
* The output is never written over anything ``analyze`` did not write (a user's folder or
  file, a Monitor's recording, another command's output) unless ``overwrite=True``
  (``--overwrite``): traindyn's files carry the attribute ``traindyn_output``
  (:func:`dynamics.storage.check_replaceable`).  One output has one writer at a time: a
  second ``analyze`` on it fails at once, naming the process that holds it
  (:func:`dynamics.storage.output_lock`).
* Identical weights under different steps are flagged (``duplicate``, ``duplicate_of``), from
  a content hash of the tensors.
* ``workers=N`` fans checkpoints out over a ``dask.distributed`` ``LocalCluster`` (``N``
  processes); ``scheduler="tcp://…"`` uses an existing cluster.  Results are written by the
  calling process as they arrive and equal the serial run's bit for bit (eigendecompositions
  run on one thread; workers use the caller's torch thread count unless ``threads`` is set).
  Worker processes are spawned: a script calling ``analyze(workers=N)`` needs the usual
  ``if __name__ == "__main__":`` guard (notebooks and the command line need nothing).
  The ``LocalCluster`` comes from :func:`dynamics._dask.local_client`, whose workers run with
  glibc's default malloc settings: dask's nanny otherwise exports
  ``MALLOC_TRIM_THRESHOLD_=65536``, which turns every large tensor allocation into a fresh
  ``mmap`` and made a worker take ~1.7 s per tiny-LM checkpoint against ~0.95 s serially.
* With ``scheduler=`` the workers are someone else's and keep their own environment: workers
  started with dask's default ``MALLOC_TRIM_THRESHOLD_`` run allocation-heavy models (a
  transformer's forward pass) up to ~2× slower per checkpoint than a serial run.  Start them
  from a shell where ``MALLOC_TRIM_THRESHOLD_`` is unset, with the dask config entry
  ``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null`` in a YAML file of
  ``~/.config/dask/`` (or of the folder named by ``DASK_CONFIG``), or as ``dask worker
  --no-nanny``.  (A ``DASK_DISTRIBUTED__…`` environment variable cannot do it: dask lower-cases
  the key it names.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from traindyn.dynamics import _analyze_parts as parts_io
from traindyn.dynamics import measurement_dataset, records, storage
from traindyn.dynamics._dask import local_client
from traindyn.dynamics._renamed import renamed_kwargs
from traindyn.dynamics.checkpoints import (
    Checkpoint,
    CheckpointError,
    find_checkpoints,
    load_hf_model,
    load_into,
    resolve_factory,
)
from traindyn.dynamics.probe_inputs import (
    ProbeInputs,
    attach_labels,
    load_labels,
    load_probe_inputs,
)
from traindyn.probes.capture import REDUCTIONS, module_names, resolve_layers
from traindyn.probes.evaluation import (
    Measurement,
    ProbePlan,
    ReferenceBook,
    compare_references,
    forward_pass,
    measure,
)
from traindyn.probes.registry import Probe, get_probe

__all__ = [
    "DEFAULT_PROBES",
    "TIMING_VARIABLES",
    "AnalyzeSpec",
    "OutputError",
    "analyze",
    "analyze_checkpoint",
    "match_layers",
    "summary_figures",
    "summary_table",
]

OutputError = parts_io.OutputError

DEFAULT_PROBES = ("rankme", "rankme_covariance", "alpha_req")
TIMING_VARIABLES = ("load_seconds", "forward_seconds", "probe_seconds", "total_seconds",
                    "cpu_seconds")
"""Per-checkpoint wall-clock times: the only variables that differ between identical runs."""


def match_layers(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names matching names or dotted glob patterns, in model order.

    The rules of :func:`probes.capture.resolve_layers` (shared with ``capture`` and the
    ``Monitor``): ``*`` matches within one dotted component and ``**`` across components, so
    ``"encoder.layer.*"`` selects the blocks ``encoder.layer.0`` … and not their sub-modules;
    a pattern that matches nothing that way falls back to ``fnmatch``, where ``*`` crosses dots.

    Raises
    ------
    KeyError
        A pattern matches no module; the message lists the model's modules.
    """
    return list(resolve_layers(model, list(patterns)))


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AnalyzeSpec:
    """Everything a worker needs to analyse one checkpoint (picklable).

    ``params()`` is the JSON record kept in the Dataset's attributes; ``key()`` hashes the
    parameters that change results, so a re-run with other settings recomputes everything.
    """

    model: Any = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    hf_class: str = "AutoModel"
    inputs: str = "digits"
    n_samples: int | None = None
    batch_size: int = 256
    tokenizer: Any = None
    max_length: int = 128
    probes: tuple[str | Probe, ...] = DEFAULT_PROBES
    probe_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    reduce: str = "flatten"
    device: str = "cpu"
    dtype: str = "float32"
    strict: bool = True
    seed: int = 0
    labels: str | None = None
    prefix: str | None = None
    progress: bool = True  # transformers' own loading bars; changes no number

    def params(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"}
        out["probes"] = [p.name if isinstance(p, Probe) else p for p in self.probes]
        out["probe_kwargs"] = {k: dict(v) for k, v in self.probe_kwargs.items()}
        model = self.model
        if model is not None and not isinstance(model, str):
            out["model"] = f"{getattr(model, '__module__', '?')}:" \
                           f"{getattr(model, '__qualname__', type(model).__name__)}"
        out["tokenizer"] = None if self.tokenizer is None else str(self.tokenizer)
        out["model_kwargs"] = json.loads(records.params_attr(self.model_kwargs))
        return out

    def key(self) -> str:
        return hashlib.sha256(records.params_attr(self.params()).encode()).hexdigest()

    def plan(self, layers: Sequence[str]) -> ProbePlan:
        return ProbePlan(self.probes, layers, {k: dict(v) for k, v in self.probe_kwargs.items()})


# --------------------------------------------------------------------------------------------
# one checkpoint (runs in the calling process or in a dask worker)

_CACHE: dict[str, tuple[str, Any, Any]] = {}


def _cached(slot: str, key: str, make: Callable[[], Any], holds: Any = None) -> Any:
    """One object per slot, rebuilt when its key changes (a worker keeps its model and inputs).

    ``holds`` (the model factory) is kept with the entry and must be the very same object for
    a hit: a factory without a stable name (a lambda) is otherwise known by its ``id`` only,
    which a later factory can take over once the first is garbage-collected."""
    hit = _CACHE.get(slot)
    if hit is not None and hit[0] == key and hit[2] is holds:
        return hit[1]
    _CACHE.pop(slot, None)
    value = make()
    _CACHE[slot] = (key, value, holds)
    return value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _build_model(spec: AnalyzeSpec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
    model = resolve_factory(spec.model)(**dict(spec.model_kwargs))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the model factory returned a {type(model).__name__}, not an nn.Module")
    return model.to(device=_device(spec.device), dtype=_DTYPES[spec.dtype]).eval()


def _factory(spec: AnalyzeSpec) -> Any:
    """The factory object a cached model must have been built from: a callable (known to the
    key only by its ``id``); ``None`` for a factory named by a string (the key names it)."""
    return None if isinstance(spec.model, str) else spec.model


def _model_key(spec: AnalyzeSpec) -> str:
    return repr((spec.params()["model"], dict(spec.model_kwargs), spec.device, spec.dtype,
                 id(spec.model) if not isinstance(spec.model, str) else 0, _model_code(spec)))


def _users(path: Path) -> bool:
    """Code whose source keys a result: the user's files and traindyn's own."""
    return parts_io.is_user_file(path) or parts_io.is_traindyn_file(path)


def _model_code(spec: AnalyzeSpec) -> str:
    """The source of the model factory's module and of every module it imports from the
    user's files (:func:`dynamics._analyze_parts.code_hashes`); ``"{}"`` without a factory."""
    factory = None
    if spec.model is not None:
        try:
            factory = parts_io.module_of(resolve_factory(spec.model))
        except (ImportError, OSError, AttributeError, TypeError, ValueError):
            factory = None
    return parts_io.code_hashes(parts_io.code_files([factory] if factory else [], _users))


def _inputs(spec: AnalyzeSpec) -> ProbeInputs:
    key = repr((spec.inputs, spec.n_samples, spec.batch_size, str(spec.tokenizer),
                spec.max_length, spec.seed, spec.labels,  # and the files' contents:
                parts_io.input_hash(spec.inputs), parts_io.input_hash(spec.labels)))

    def make() -> ProbeInputs:
        inputs = load_probe_inputs(spec.inputs, n_samples=spec.n_samples,
                                   batch_size=spec.batch_size, tokenizer=spec.tokenizer,
                                   max_length=spec.max_length, seed=spec.seed)
        return attach_labels(inputs, load_labels(spec.labels)) if spec.labels else inputs

    return _cached("inputs", key, make)


def _load(checkpoint: Checkpoint, spec: AnalyzeSpec) -> tuple[torch.nn.Module, str]:
    if checkpoint.reader.builds_model:
        model, digest = load_hf_model(checkpoint.path, spec.hf_class, strict=spec.strict,
                                      progress=spec.progress)
        return model.to(device=_device(spec.device), dtype=_DTYPES[spec.dtype]).eval(), digest
    if spec.model is None:
        raise CheckpointError(f"{checkpoint.path.name} is a state dict: a model factory "
                              f"(--model module:function) is needed to build the network")
    if spec.strict:
        model = _cached("model", _model_key(spec), lambda: _build_model(spec), _factory(spec))
    else:  # keys the checkpoint lacks must start from the same initialisation every time
        model = _build_model(spec)
    return model, load_into(model, checkpoint, strict=spec.strict, prefix=spec.prefix)


class _single_threaded:  # noqa: N801
    """Run the CPU eigendecompositions on one thread, whatever the worker's thread count.

    LAPACK's multi-threaded symmetric eigensolver changes the last bits of the eigenvalues
    with the number of threads (~1e-15 relative), so a fixed count makes a parallel run equal
    to the serial one bit for bit; for the d × d matrices of per-layer statistics one thread
    also avoids the large overhead of OpenMP on a busy machine.
    """

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cpu"

    def __enter__(self) -> None:
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            torch.set_num_threads(self.saved)


def _state_key(key: tuple[str, str | None]) -> str:
    return f"{key[0]}\t{key[1] or ''}"


def _from_state_key(text: str) -> tuple[str, str | None]:
    probe, _, layer = text.partition("\t")
    return probe, layer or None


def _model_inputs(inputs: ProbeInputs, device: torch.device, dtype: torch.dtype) -> tuple:
    """All probe inputs (and labels) in one batch, for model probes."""
    batches = [b.to(device, dtype) for b in inputs.batches]
    first = batches[0].inputs
    if isinstance(first, torch.Tensor):
        x: Any = torch.cat([b.inputs for b in batches])
    else:
        try:
            x = {k: torch.cat([b.inputs[k] for b in batches]) for k in first}
        except RuntimeError as err:
            raise ValueError("model probes need all probe inputs in one batch, and these "
                             f"batches have different lengths ({err}); use inputs of one "
                             "length") from None
    labels = [b.labels for b in batches]
    y = torch.cat(labels) if all(t is not None for t in labels) else None
    return x, y


def check_positions(model: Any, inputs: Any) -> None:
    """Refuse token sequences longer than a Hugging Face model's position table.

    ``config.max_position_embeddings`` (BERT, Llama …) or ``config.n_positions`` (GPT-2):
    longer inputs end in an ``IndexError`` from inside the embedding, which says nothing of the
    cause."""
    config = getattr(model, "config", None)
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if (config is None or not isinstance(ids, torch.Tensor) or ids.ndim < 2
            or ids.is_floating_point()):
        return
    for attr in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, attr, None)
        if isinstance(limit, int) and 0 < limit < ids.shape[-1]:
            raise ValueError(
                f"the probe inputs are {ids.shape[-1]} tokens long but the model takes at most "
                f"{limit} positions (config.{attr}); pass --max-length {limit} (max_length=)")


def _batches(inputs: ProbeInputs, model: Any, device: torch.device, dtype: torch.dtype
             ) -> Iterator[tuple[Any, Any, Any]]:
    """The probe batches as :func:`probes.evaluation.forward_pass` takes them, moved to the
    model's device and dtype one at a time (each checked against the model's positions)."""
    for batch in inputs.batches:
        batch = batch.to(device, dtype)
        labels = None if batch.labels is None else batch.labels.to(device)
        check_positions(model, batch.inputs)
        yield batch.inputs, labels, batch.mask


def analyze_checkpoint(checkpoint: Checkpoint, spec: AnalyzeSpec,
                       threads: int | None = None) -> dict[str, Any]:
    """Analyse one checkpoint; never raises for a bad checkpoint (status ``failed`` + reason).

    Returns a dict: ``step``, ``status``, ``reason``, ``checkpoint_hash``, ``layers``,
    ``values`` (per-layer variable → one value per layer), ``model_values`` (variable →
    value), ``notes`` (probe warnings), ``layer_notes`` (layer → why its values are NaN),
    ``seconds`` (load, forward, probes, total, cpu) — all JSON-serialisable — and ``states``
    (what reference probes keep, arrays; stored beside the part, not in it).
    """
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    result: dict[str, Any] = {
        "step": int(checkpoint.step), "path": str(checkpoint.path), "status": "failed",
        "reason": "", "checkpoint_hash": "", "layers": [], "values": {}, "model_values": {},
        "notes": "", "layer_notes": {}, "states": {},
        "step_source": getattr(checkpoint, "step_source", "name"),
        "seconds": {k: float("nan") for k in ("load", "forward", "probes", "total", "cpu")},
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        model, digest = _load(checkpoint, spec)
        result["checkpoint_hash"] = digest
        loaded = time.perf_counter()
        inputs = _inputs(spec)
        layers = match_layers(model, spec.layers)
        plan = spec.plan(layers)
        device, dtype = _device(spec.device), _DTYPES[spec.dtype]
        state = plan.start() if plan.has_layer_probes else None
        if state is not None:
            forward_pass(model, layers, _batches(inputs, model, device, dtype), spec.reduce,
                         sink=lambda layer, x, y: plan.update(state, layer, x, y))
        forwarded = time.perf_counter()
        with _single_threaded(device):
            x = y = None
            if plan.model_probes:
                stateful = [p.name for p in plan.model_probes if p.factory is not None]
                if stateful:
                    raise ValueError(f"model probes {stateful} keep state between calls in a "
                                     "way that cannot be resumed: use them in the Monitor")
                x, y = _model_inputs(inputs, device, dtype)
            measurement = measure(plan, model, state, x, y)
        result.update(measurement_dataset.to_record(measurement, layers))
        result["states"] = {_state_key(k): v for k, v in measurement.states.items()}
        result["layers"] = layers
        result["status"] = "ok"
        done = time.perf_counter()
        result["seconds"] = {"load": loaded - start, "forward": forwarded - loaded,
                             "probes": done - forwarded, "total": done - start,
                             "cpu": time.process_time() - cpu_start}
    except CheckpointError as err:
        result["reason"] = str(err)
    except Exception as err:  # noqa: BLE001 - any failure is this checkpoint's, recorded
        result["reason"] = f"{type(err).__name__}: {err}"
    if result["status"] == "failed":
        result["seconds"]["total"] = time.perf_counter() - start
        result["seconds"]["cpu"] = time.process_time() - cpu_start
    return result


# --------------------------------------------------------------------------------------------
# references: comparisons once every state is known


def _measurements(results: list[dict], plan_of: Callable[[list[str]], ProbePlan],
                  learning_rate: float | None = None) -> list[Measurement]:
    """Each result's measurement (in the order of ``results``), with the reference probes'
    comparisons (first / previous / final) made in step order over the ok results from the
    states the checkpoints kept (:func:`probes.evaluation.compare_references`)."""
    measurements = [measurement_dataset.from_record(r, r["layers"]) for r in results]
    ok = sorted((i for i, r in enumerate(results) if r["status"] == "ok"),
                key=lambda i: results[i]["step"])
    if not ok:
        return measurements
    plan = plan_of(results[ok[0]]["layers"])
    if not plan.references:
        return measurements
    lr = None if learning_rate is None else float(learning_rate)

    def states(i: int) -> dict[tuple[str, str | None], Any]:
        return {_from_state_key(k): v for k, v in results[i]["states"].items()}

    last = ok[-1]
    book = ReferenceBook(plan, final=(states(last), records.time_of(results[last]["step"], lr)))
    for i in ok:
        compared = compare_references(plan, Measurement(states=states(i)), book,
                                      records.time_of(results[i]["step"], lr))
        measurements[i] = measurements[i] | Measurement(compared.layer_values,
                                                        compared.values, notes=compared.notes)
    return measurements


def _assemble(results: list[dict], spec: AnalyzeSpec, attrs: dict[str, Any],
              learning_rate: float | None) -> xr.Dataset:
    """The series' Dataset: the measurements (:func:`dynamics.measurement_dataset.build`) and
    each checkpoint's bookkeeping (status, hash, duplicates, path, timings)."""
    results = sorted(results, key=lambda r: r["step"])
    measurements = _measurements(results, spec.plan, learning_rate)
    layers = next((r["layers"] for r in results if r["status"] == "ok"), [])
    for r, m in zip(results, measurements, strict=True):
        if r["status"] == "ok" and r["layers"] != layers:
            r.update(status="failed",
                     reason=f"its layers {r['layers'][:4]}… differ from the series' {layers[:4]}…")
        if r["status"] != "ok":  # its notes stay; its values do not
            m.layer_values, m.values = {}, {}
    steps = [r["step"] for r in results]
    ds = measurement_dataset.build(steps, measurements, layers=layers,
                                   declared=spec.plan(layers).variables(),
                                   learning_rate=learning_rate, notes=True)
    ds = ds.assign_coords(layer=("layer", np.array(layers, dtype=object),
                                 {"long_name": records.DIMS["layer"], "units": ""}))
    hashes = [r["checkpoint_hash"] for r in results]
    first_step: dict[str, int] = {}
    for h, step in zip(hashes, steps, strict=True):
        if h:
            first_step.setdefault(h, step)
    duplicate_of = np.array([first_step[h] if h and first_step[h] != step else -1
                             for h, step in zip(hashes, steps, strict=True)], dtype=np.int64)
    dup_flag = np.array([int(bool(h) and hashes.count(h) > 1) for h in hashes], dtype=np.int8)

    def strings(key: str) -> np.ndarray:
        return np.array([str(r.get(key, "")) for r in results], dtype=object)

    data_vars: dict[str, Any] = {
        "status": ("step", strings("status"), {"long_name": "checkpoint status (ok / failed)",
                                               "units": ""}),
        "reason": ("step", strings("reason"), {"long_name": "why the checkpoint failed",
                                               "units": ""}),
        "checkpoint_hash": ("step", np.array(hashes, dtype=object),
                            {"long_name": "SHA-256 of the checkpoint's tensors (names, dtypes, "
                                          "shapes, bytes)", "units": ""}),
        "duplicate": ("step", dup_flag, {"long_name": "weights identical to another step's",
                                         "units": "1"}),
        "duplicate_of": ("step", duplicate_of, {"long_name": "earliest step with identical "
                                                             "weights (-1: none)", "units": "1"}),
        "checkpoint_path": ("step", strings("path"), {"long_name": "checkpoint file or folder",
                                                      "units": ""}),
        "step_source": ("step", strings("step_source"),
                        {"long_name": "where the step number came from (name, trainer_state, "
                                      "lightning, explicit, default)", "units": ""}),
    }
    for key, var in zip(("load", "forward", "probes", "total", "cpu"), TIMING_VARIABLES,
                        strict=True):
        data_vars[var] = ("step", np.array([r["seconds"].get(key, np.nan) for r in results],
                                           dtype=float),
                          {"long_name": f"wall-clock time: {key}" if key != "cpu" else
                           "CPU time of the analysing process (all its threads)", "units": "s"})
    ds = ds.assign(data_vars)
    ds.attrs = dict(attrs)
    ds.attrs["n_failed"] = int(sum(r["status"] != "ok" for r in results))
    ds.attrs["n_duplicates"] = int(dup_flag.sum())
    return records.validate(ds)


def summary_figures(ds: xr.Dataset, folder: str | os.PathLike, stem: str = "analyze"
                    ) -> list[Path]:
    """One PNG per ``(step, layer)`` variable (:func:`dynamics.plot.checkpoint_series_figures`)
    and, for a series of several analysed checkpoints, ``<stem>_overview.png``
    (:func:`dynamics.plot.run_overview`)."""
    from traindyn.dynamics.plot import checkpoint_series_figures, run_overview, save_figure

    paths = checkpoint_series_figures(ds, folder, stem)
    ok = ds["status"].values == "ok" if "status" in ds else np.ones(ds.sizes["step"], bool)
    if int(ok.sum()) > 1:
        paths.append(save_figure(run_overview(ds), Path(folder) / f"{stem}_overview.png",
                                 dpi=90, close=True))
    return paths


def summary_table(ds: xr.Dataset, max_rows: int = 40) -> str:
    """A short text table of a checkpoint series: per step the status, hash prefix, duplicate
    flag, time and each probe at the last analysed layer; a NaN shows its reason (the layer's
    probe warning) and a failed row the checkpoint's reason."""
    probes = [n for n, v in ds.data_vars.items() if v.dims == ("step", "layer")
              and n != "alpha_req_r2" and v.dtype.kind in "fiu"]
    last = str(ds["layer"].values[-1]) if ds.sizes.get("layer", 0) else "-"
    header = ["step", "status", "hash", "dup", "time/s"] + probes
    rows, reasons = [], {}
    notes = ds["layer_notes"] if "layer_notes" in ds else None
    for i, step in enumerate(ds["step"].values):
        status = str(ds["status"].values[i])
        dup = int(ds["duplicate_of"].values[i])
        row = [str(int(step)), status, str(ds["checkpoint_hash"].values[i])[:10] or "-",
               f"={dup}" if dup >= 0 else ("yes" if ds["duplicate"].values[i] else ""),
               f"{float(ds['total_seconds'].values[i]):.2f}"]
        if status == "ok":
            for p in probes:
                value = float(ds[p].values[i, -1])
                if value != value:  # NaN: say why
                    why = str(notes.values[i, -1]) if notes is not None else ""
                    key = reasons.setdefault(why or "no reason recorded", f"[{len(reasons) + 1}]")
                    row.append(f"nan{key}")
                else:
                    row.append(f"{value:.4g}")
        else:
            row += [str(ds["reason"].values[i])[:60]]
        rows.append(row)
    if len(rows) > max_rows:
        rows = rows[: max_rows // 2] + [["…"] * len(header)] + rows[-max_rows // 2:]
    widths = [max([len(h)] + [len(r[k]) for r in rows if k < len(r)]) for k, h in
              enumerate(header)]
    lines = [f"probes at layer {last}; {ds.attrs.get('n_failed', 0)} failed, "
             f"{ds.attrs.get('n_duplicates', 0)} with duplicate weights"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        lines.append("  ".join(c.ljust(widths[k]) if k < len(widths) else c
                               for k, c in enumerate(r)))
    for why, key in reasons.items():
        lines.append(f"{key} NaN at layer {last}: {why[:200]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the series, in steps


def _check_flatten(inputs: ProbeInputs) -> None:
    """``reduce="flatten"`` needs one input shape: raise before any checkpoint is loaded.

    Flattening keeps every position, ``(batch, tokens·features)``, so batches tokenised to
    different lengths (padding to each batch's longest text) give feature vectors of different
    sizes, which no statistic over samples can combine.
    """
    def shape(batch: Any) -> tuple[int, ...]:
        first = batch.inputs if isinstance(batch.inputs, torch.Tensor) else (
            batch.inputs.get("input_ids", next(iter(batch.inputs.values()))))
        return tuple(first.shape[1:])

    shapes = sorted({shape(b) for b in inputs.batches})
    if len(shapes) > 1:
        listed = ", ".join(str(s[0] if len(s) == 1 else s) for s in shapes[:6])
        raise ValueError(
            f"reduce='flatten' keeps every token position, so all probe inputs need the same "
            f"length, but these batches have sequence lengths {listed}"
            f"{' …' if len(shapes) > 6 else ''}: use reduce='mean', 'last' or 'cls' (one "
            f"vector per sequence), or inputs of one fixed length (a token file with "
            f"equal-length rows, or a max_length that every text reaches)")


def _describe(result: dict) -> str:
    s = result["seconds"]
    if result["status"] == "ok":
        return (f"step {result['step']}: ok in {s['total']:.2f} s (load {s['load']:.2f}, "
                f"forward {s['forward']:.2f}, probes {s['probes']:.2f})")
    return f"step {result['step']}: FAILED in {s['total']:.2f} s: {result['reason']}"


def _run_dask(pending: list[Checkpoint], spec: AnalyzeSpec, workers: int,
              scheduler: str | None, threads: int, on_result: Callable[[dict], None]) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("workers/scheduler need dask.distributed: "
                          "pip install 'traindyn[dist]'") from err
    with (Client(scheduler) if scheduler else local_client(workers)) as client:
        futures = [client.submit(analyze_checkpoint, c, spec, threads, pure=False,
                                 key=f"traindyn-analyze-{spec.key()[:8]}-step{c.step}")
                   for c in pending]
        for future in as_completed(futures):
            on_result(future.result())


def _make_spec(series: list[Checkpoint], *, model: Any, model_kwargs: Any, hf_class: str,
               inputs: Any, n_samples: int | None, batch_size: int, tokenizer: Any,
               max_length: int, probes: Sequence[str], probe_kwargs: Any, layers: Any,
               reduce: str | None, device: str, dtype: str, strict: bool, seed: int,
               prefix: str | None = None,
               labels: Any, progress: bool) -> AnalyzeSpec:
    """Check the arguments (unknown probes, reduce, dtype, device, labels) and normalise
    paths; everything that can be wrong without running a checkpoint fails here."""
    if not probes:
        raise ValueError("no probes were asked for")
    plan = ProbePlan(probes, (), probe_kwargs)  # unknown names and kwargs fail now
    if plan.label_users and labels is None:
        raise ValueError(f"probes {plan.label_users} "
                         "need labels of the probe inputs: probe_labels='digits' or a file")
    text_inputs = str(inputs) in ("stdlib-text", "text") or (
        Path(inputs).suffix not in (".npz", ".npy", ".pt", ".pth") and str(inputs) != "digits")
    reduce = reduce or ("mean" if text_inputs else "flatten")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce rule {reduce!r}; choose one of {REDUCTIONS}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    try:
        dev = _device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine "
                         "(use --device cpu, or auto)")
    if text_inputs and tokenizer is None:
        hf = [c for c in series if c.format == "hf"]
        if hf:
            tokenizer = str(hf[0].path.resolve())
    if str(inputs) not in ("digits", "stdlib-text", "text"):
        inputs = str(Path(inputs).resolve())
    if labels is not None and str(labels) != "digits":
        labels = str(Path(labels).resolve())
    if model is not None and isinstance(model, str) and ".py" in model:
        file, sep, attr = model.rpartition(":") if ":" in model else (model, "", "")
        model = str(Path(file).resolve()) + sep + attr
    if isinstance(layers, str):
        layers = [layers]
    return AnalyzeSpec(
        model=model, model_kwargs=dict(model_kwargs or {}), hf_class=hf_class,
        inputs=str(inputs), n_samples=n_samples, batch_size=batch_size, tokenizer=tokenizer,
        max_length=max_length,
        probes=tuple(get_probe(p) for p in probes),  # by value: dask workers need no import
        probe_kwargs={k: dict(v) for k, v in (probe_kwargs or {}).items()},
        layers=tuple(layers or ()), reduce=reduce, device=device, dtype=dtype, strict=strict,
        seed=seed, labels=None if labels is None else str(labels), progress=progress,
        prefix=prefix)


def _check_model_and_layers(series: list[Checkpoint], spec: AnalyzeSpec) -> None:
    if any(not c.reader.builds_model for c in series):
        if spec.model is None:
            raise ValueError("state-dict checkpoints need a model factory: "
                             "model='package.module:function' or 'file.py:function'")
        reference = _cached("model", _model_key(spec), lambda: _build_model(spec),
                            _factory(spec))
        if not spec.layers:
            raise ValueError(f"choose layers (names or glob patterns); the model has: "
                             f"{', '.join(module_names(reference)[:60])}")
        match_layers(reference, spec.layers)
    elif not spec.layers:
        raise ValueError("choose layers (names or glob patterns), e.g. 'encoder.layer.*'")


_LOADED: dict[Path, str] = {}
"""The ``.py`` files :func:`_import_modules` executed, with their content hash then."""


def _import_modules(imports: Sequence[str]) -> list[tuple[str | None, Path | None]]:
    """Import each module (``package.module``) or ``.py`` file (they register the user's
    probes); a file already imported runs again only if its content changed since.  Returns
    them as ``(module name, file)`` for the resume key."""
    import importlib
    import importlib.util

    out: list[tuple[str | None, Path | None]] = []
    for module in imports:
        if not str(module).endswith(".py"):
            importlib.import_module(module)
            out.append((module, None))
            continue
        path = Path(module).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--import {module}: no such file")
        loaded = sys.modules.get(path.stem)
        digest = parts_io.content_hash([path])
        if (loaded is None or Path(getattr(loaded, "__file__", "") or "").resolve() != path
                or _LOADED.get(path, digest) != digest):
            _LOADED[path] = digest
            spec = importlib.util.spec_from_file_location(path.stem, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = loaded
            spec.loader.exec_module(loaded)
        out.append((path.stem, path))
    return out


def _probe_modules(probes: Sequence[Probe]) -> list[tuple[str | None, Path]]:
    """The modules defining the functions of every probe (and of the accumulators they
    share)."""
    from traindyn.probes.registry import ACCUMULATORS

    objects: list[Any] = []
    for probe in probes:
        objects += [getattr(probe, f.name) for f in fields(probe)]
        if probe.accumulator in ACCUMULATORS:
            accumulator = ACCUMULATORS[probe.accumulator]
            objects += [getattr(accumulator, f.name) for f in fields(accumulator)]
    found = (parts_io.module_of(o) for o in objects if callable(o))
    return list(dict.fromkeys(m for m in found if m is not None))


def _code_keys(spec: AnalyzeSpec, imported: Sequence[tuple[str | None, Path | None]]
               ) -> dict[str, str]:
    """The resume keys of code: traindyn's version and the modules the analysis runs through,
    the model factory's and probes' modules with what they import from the user's files."""
    import traindyn

    probes = _probe_modules([p for p in spec.probes if isinstance(p, Probe)])
    ours = [m for m in probes if parts_io.is_traindyn_file(m[1])]
    theirs = [m for m in probes if not parts_io.is_traindyn_file(m[1])]
    return {
        "traindyn version": str(traindyn.__version__),
        "traindyn code": parts_io.code_hashes(parts_io.code_files(
            [(__name__, Path(__file__)), *ours], parts_io.is_traindyn_file)),
        "probe code": parts_io.code_hashes(parts_io.code_files([*theirs, *imported], _users)),
        "model code": _model_code(spec),
    }


def _content_keys(spec: AnalyzeSpec, imported: Sequence[tuple[str | None, Path | None]] = ()
                  ) -> dict[str, str]:
    """What a stored result is reused for, beside the checkpoint's own content."""
    return {"parameters": spec.key(), "probe inputs": parts_io.input_hash(spec.inputs),
            "labels": parts_io.input_hash(spec.labels), **_code_keys(spec, imported)}


def _checkpoint_keys(series: list[Checkpoint], keys: Mapping[str, str]
                     ) -> dict[int, dict[str, str]]:
    """Per step: ``keys`` and the checkpoint's content hash (each file is read once)."""
    return {c.step: {**keys, "checkpoint content": parts_io.content_hash(
        [p for p in c.weight_files() if p.exists()] or [c.path])} for c in series}


def _resume(series: list[Checkpoint], parts: Path | None,
            keys_by_step: Mapping[int, Mapping[str, str]], retry_failed: bool
            ) -> tuple[dict[int, dict], list[Checkpoint], list[str]]:
    """Stored results that still hold, the checkpoints to compute, and why each is."""
    results: dict[int, dict] = {}
    pending: list[Checkpoint] = []
    why: list[str] = []
    for checkpoint in series:
        if parts is None:
            pending.append(checkpoint)
            continue
        done, states, reason = parts_io.read_part(parts, checkpoint.step,
                                                  keys_by_step[checkpoint.step])
        if done is not None and (done["status"] == "ok" or not retry_failed):
            done["states"] = states
            results[checkpoint.step] = done
        else:
            pending.append(checkpoint)
            if done is not None:
                reason = "failed before"
            why.append(f"step {checkpoint.step}: {reason}")
    return results, pending, why


def _reuse_line(n_reused: int, n_total: int, why: list[str]) -> str:
    recomputed = n_total - n_reused
    reasons = {}
    for line in why:
        reasons.setdefault(line.split(": ", 1)[1], []).append(line.split(":")[0][5:])
    detail = "; ".join(f"{reason} (step{'s' if len(s) > 1 else ''} {', '.join(s[:6])}"
                       f"{' …' if len(s) > 6 else ''})" for reason, s in reasons.items())
    return (f"traindyn analyze: resuming: reusing {n_reused} of {n_total} checkpoints "
            f"(same parameters, checkpoint contents, probe inputs, labels, model code, "
            f"probe code and traindyn); "
            f"computing {recomputed}" + (f": {detail}" if detail else ""))


def _save(ds: xr.Dataset, output: Path, overwrite: bool) -> None:
    storage.save(ds, output, kind=parts_io.OUTPUT_KIND, overwrite=overwrite)


@contextlib.contextmanager
def _locked(output: Path | None) -> Iterator[None]:
    """Hold the output's lock (:func:`dynamics.storage.output_lock`) while it is written."""
    held = contextlib.ExitStack()
    if output is not None:
        try:
            held.enter_context(storage.output_lock(output, "traindyn analyze"))
        except storage.OutputLockedError as err:
            raise OutputError(str(err)) from None
    with held:
        yield


@renamed_kwargs(inputs="probe_data", labels="probe_labels")
def analyze(
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Checkpoint],
    *,
    # what to load: the checkpoints and the network they hold
    steps: Sequence[int] | None = None,
    force_steps: bool = False,
    model: str | Callable[..., torch.nn.Module] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    hf_class: str = "AutoModel",
    strict: bool = True,
    prefix: str | None = None,
    imports: Sequence[str] = (),
    # what to feed: the probe batch and its labels
    probe_data: str | os.PathLike = "digits",
    probe_labels: str | os.PathLike | None = None,
    n_samples: int | None = None,
    batch_size: int = 256,
    tokenizer: Any = None,
    max_length: int = 128,
    seed: int = 0,
    # what to measure
    probes: Sequence[str] = DEFAULT_PROBES,
    probe_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    layers: Sequence[str] | str | None = None,
    reduce: str | None = None,
    learning_rate: float | None = None,
    # how to run
    device: str = "cpu",
    dtype: str = "float32",
    workers: int = 0,
    scheduler: str | None = None,
    threads: int | None = None,
    retry_failed: bool = True,
    progress: bool = True,
    # where to write
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    figures: bool | str | os.PathLike = False,
) -> xr.Dataset:
    """Analyse every checkpoint of a run and return one Dataset over ``(step × layer)``.

    Every option is a keyword, in five groups (as in ``traindyn analyze --help``): what to
    load, what to feed, what to measure, how to run, where to write.  ``inputs=`` and
    ``labels=`` are deprecated spellings of ``probe_data=`` and ``probe_labels=``.

    Parameters
    ----------
    checkpoints : path, list of paths, or list of :class:`~dynamics.checkpoints.Checkpoint`
        A folder of state dicts / safetensors / Hugging Face folders / Trainer
        ``checkpoint-*/`` folders / Lightning ``.ckpt`` files, one Hugging Face folder, or
        explicit paths (see :func:`dynamics.checkpoints.find_checkpoints`).

    **What to load**

    steps, force_steps : explicit steps, paired with the checkpoint paths in argument order;
        a step that contradicts the number in a name is an error unless ``force_steps``.
    model : "module:function", "file.py:function" or callable
        Factory of the network for state-dict checkpoints, called as ``model(**model_kwargs)``.
        Not needed for Hugging Face folders (``hf_class`` is used, default ``AutoModel``).
    strict : bool
        Unexpected keys (state dicts) or weights the checkpoint lacks fail the checkpoint.
    prefix : str, optional
        Load the model from the tensors under this attribute of a training wrapper
        (``"ema."`` of a Lightning checkpoint holding ``model.*`` and ``ema.*``; see
        :func:`~traindyn.dynamics.checkpoints.load_into`).
    imports : module names (``package.module``) or ``.py`` files
        Imported first, unless already imported (they register the user's own probes); their
        source, and what they import from the user's files, keys the resume.

    **What to feed**

    probe_data, n_samples, batch_size, tokenizer, max_length :
        The probe batch (:func:`dynamics.probe_inputs.load_probe_inputs`): ``"digits"``,
        ``"stdlib-text"``, a tensor file or a text file.  For text and Hugging Face
        checkpoints the tokenizer defaults to the first checkpoint folder's own.
    probe_labels : "digits", a file, or None
        Labels of the probe batch, one integer per sample, for labelled probes
        (``neural_collapse``) and model probes that compare with the task (NTK alignment).
    seed : int
        Seeds torch before each model is built and the sampling of the probe batch.

    **What to measure**

    probes : registered probe names (``probes.registry``) or :class:`~probes.registry.Probe`
        objects
        Default ``rankme``, ``rankme_covariance``, ``alpha_req`` (which adds ``alpha_req_r2``).
        Feature, labelled, parameter (``weight_spectra``), model (``ntk`` …) and reference
        probes all run (``attention_logits`` and ``log_partition`` included); a model probe
        that keeps private state (a ``factory``) cannot be resumed and fails the checkpoint
        with that reason.
    probe_kwargs : {probe: {argument: value}}
        e.g. ``{"alpha_req": {"fit_range": (11, 100)}}``.
    layers : module names or dotted glob patterns (:func:`match_layers`)
        Required; ``"blocks.*"`` selects the blocks, not their sub-modules.  A pattern that
        matches nothing raises ``KeyError`` listing the model's modules.
    reduce : token reduction of ``probes.capture``
        Default ``"mean"`` for text inputs and ``"flatten"`` otherwise.  ``"flatten"`` needs
        inputs of one shape: text tokenised into batches of different lengths raises
        ``ValueError`` before any checkpoint is loaded.
    learning_rate : gives the coordinate ``time = learning_rate × step``.

    **How to run**

    device, dtype : where and in which precision the model runs (``device="auto"``: CUDA if
        available; ``"cuda"`` without CUDA raises ``ValueError``); statistics are float64 on
        that device.
    workers, scheduler : dask fan-out (module docstring).  ``workers=N`` (N > 1) starts a
        ``LocalCluster`` of N single-threaded processes for this call; ``scheduler`` is the
        address of a running cluster, whose workers should be started without dask's
        ``MALLOC_TRIM_THRESHOLD_`` (up to ~2× slower per checkpoint otherwise; module
        docstring).
    threads : int, optional
        torch threads of each dask worker for the forward pass (default: this process's
        ``torch.get_num_threads()``, so that the forward pass, and hence every number, equals
        the serial run's bit for bit; fewer threads per worker run faster on a small machine
        and agree to about 1e-15).  Eigendecompositions always run on one thread.
    retry_failed : bool
        Re-run checkpoints that failed in an earlier run (default); finished ones are skipped.
    progress : bool
        A progress bar and a line per checkpoint (the one-line resume summary is printed
        either way).

    **Where to write**

    output : path ending in ``.nc`` or ``.zarr``
        Save the Dataset there; per-checkpoint results go to ``<output>.parts/`` as they
        finish, and a re-run resumes from them (module docstring).  Checked before any work:
        an unwritable path raises :class:`OutputError`, and so does a path holding anything
        but an earlier ``analyze`` output (a user's folder, a Monitor's recording, another
        program's file: never replaced unless ``overwrite``) or an output another process is
        writing (a lock, :func:`dynamics.storage.output_lock`).
    overwrite : bool
        Replace whatever is at ``output``, even what ``analyze`` did not write.
    figures : bool or folder
        Write one summary PNG per probe (next to ``output``, or into the given folder).

    Returns
    -------
    xarray.Dataset
        Probe variables over ``(step, layer, …)`` and ``(step, …)``; per step ``status``,
        ``reason``, ``notes``, ``checkpoint_hash``, ``duplicate``, ``duplicate_of``,
        ``checkpoint_path``, ``step_source`` and the timings of :data:`TIMING_VARIABLES`; per
        step and layer ``layer_notes`` (why a value is NaN); attributes ``source``,
        ``parameters`` (JSON), ``probe_inputs``, ``n_failed``, ``n_duplicates``.
    """
    from tqdm.auto import tqdm

    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be >= 1 (or None for all), got {n_samples}")
    output = Path(output) if output is not None else None
    if output is not None:
        parts_io.check_output(output, overwrite)
    imported = _import_modules(imports)
    if isinstance(checkpoints, Sequence) and checkpoints and isinstance(checkpoints[0],
                                                                        Checkpoint):
        series = list(checkpoints)
    elif force_steps:
        series = find_checkpoints(checkpoints, steps, force_steps=True)
    else:
        series = find_checkpoints(checkpoints, steps)
    spec = _make_spec(series, model=model, model_kwargs=model_kwargs, hf_class=hf_class,
                      inputs=probe_data, n_samples=n_samples, batch_size=batch_size,
                      tokenizer=tokenizer, max_length=max_length, probes=probes,
                      probe_kwargs=probe_kwargs, layers=layers, reduce=reduce, device=device,
                      dtype=dtype, strict=strict, seed=seed, labels=probe_labels,
                      progress=progress,
                      prefix=prefix)
    probe_inputs = _inputs(spec)  # errors in the inputs surface here, before any work
    if spec.reduce == "flatten":
        _check_flatten(probe_inputs)
    _check_model_and_layers(series, spec)

    with _locked(output):  # one writer per output; the second is refused
        if output is not None and output.suffix == ".zarr":
            storage.recover_zarr(output)  # a store a killed run was replacing: back, its
            # temporaries gone
        parts = output.with_name(output.name + ".parts") if output is not None else None
        keys_by_step = (_checkpoint_keys(series, _content_keys(spec, imported))
                        if parts is not None else {})
        results, pending, why = _resume(series, parts, keys_by_step, retry_failed)
        if parts is not None and (results or any(not w.endswith("not analysed yet") for w in why)):
            print(_reuse_line(len(results), len(series), why), file=sys.stderr, flush=True)

        bar = tqdm(total=len(series), initial=len(results), desc="traindyn analyze", unit="ckpt",
                   disable=not progress, file=sys.stderr)

        def on_result(result: dict) -> None:
            results[result["step"]] = result
            if parts is not None:
                stored = {k: v for k, v in result.items() if k != "states"}
                parts_io.write_part(parts, result["step"], keys_by_step[result["step"]], stored,
                                    result["states"])
            bar.set_postfix_str(f"step {result['step']} {result['status']} "
                                f"{result['seconds']['total']:.2f}s")
            bar.update(1)
            if progress:
                bar.write(_describe(result))

        try:
            if pending and (workers > 1 or scheduler):
                _run_dask(pending, spec, workers, scheduler,
                          threads or torch.get_num_threads(), on_result)
            else:
                for checkpoint in pending:
                    on_result(analyze_checkpoint(checkpoint, spec))
        finally:
            bar.close()

        params = spec.params()
        params.update(checkpoints=str(checkpoints) if isinstance(checkpoints, (str, os.PathLike))
                      else [str(c.path if isinstance(c, Checkpoint) else c) for c in checkpoints],
                      steps=[c.step for c in series], learning_rate=learning_rate)
        attrs = {
            "source": "traindyn analyze: probes of a checkpoint series",
            "parameters": records.params_attr(params),
            "probe_inputs": probe_inputs.description,
            "n_samples": probe_inputs.n_samples,
            "python": sys.version.split()[0],
        }
        ds = _assemble(list(results.values()), spec, attrs, learning_rate)
        if output is not None:
            _save(ds, output, overwrite)
    if figures:
        folder = Path(figures) if not isinstance(figures, bool) else (
            output.parent if output is not None else Path.cwd())
        summary_figures(ds, folder, stem=output.stem if output is not None else "analyze")
    return ds
