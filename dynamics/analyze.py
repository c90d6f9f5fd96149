"""A run's checkpoint series → one Dataset over ``(step × layer)``: safely, resumably, in parallel.

::

    ds = analyze("runs/lm/ckpt", model="dynamics.recipes.tiny_lm:TinyLM", inputs="stdlib-text",
                 tokenizer="bytes", probes=["rankme", "alpha_req"], layers=["blocks.*"],
                 reduce="last", output="runs/lm/geometry.nc", workers=2)

For each checkpoint (in step order) the weights are loaded safely
(:mod:`dynamics.checkpoints`), the fixed probe inputs (:mod:`dynamics.probe_inputs`) run
through the model in eval mode, the chosen layers are captured by forward hooks
(:mod:`probes.capture`, with its token reduction rules), and the named feature probes of
``probes.registry.FEATURE_PROBES`` are evaluated per layer.  The spectral probes (``rankme``,
``rankme_covariance``, ``alpha_req``) share one streaming float64 second-moment accumulator per
layer (:class:`probes.spectral.SpectrumAccumulator`), so features are never stored whole and
one eigendecomposition serves both covariance-based probes; any other registered probe gets the
concatenated features.

Reliability:

* A checkpoint that cannot be analysed (unsafe pickle, truncated file, missing keys, shape
  mismatch, non-finite weights, an error in the forward pass) is recorded with
  ``status = "failed"`` and its ``reason``; the others are analysed.
* With an ``output`` path, each checkpoint's result is written atomically (temporary file, then
  ``os.replace``) to ``<output>.parts/`` as soon as it finishes.  A re-run skips checkpoints
  whose result is there for the same parameters and unchanged files, so a run killed at any
  point (SIGKILL included) and restarted gives the same Dataset as an uninterrupted run.
  Only the timing variables (:data:`TIMING_VARIABLES`) differ between runs.  The final NetCDF
  file replaces the old one with one ``os.replace``; a Zarr store (a folder) is written whole
  beside the old one and swapped in atomically where Linux allows (``renameat2`` exchange),
  else by two renames that the next run repairs if a crash falls between them.
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

import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from dynamics import records
from dynamics._dask import local_client
from dynamics.checkpoints import (
    Checkpoint,
    CheckpointError,
    find_checkpoints,
    load_hf_model,
    load_into,
    resolve_factory,
)
from dynamics.probe_inputs import ProbeInputs, load_probe_inputs
from probes import spectral
from probes.capture import REDUCTIONS, capture, module_names, resolve_layers
from probes.registry import get_feature_probe

__all__ = [
    "DEFAULT_PROBES",
    "TIMING_VARIABLES",
    "AnalyzeSpec",
    "analyze",
    "analyze_checkpoint",
    "match_layers",
    "summary_figures",
    "summary_table",
]

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
_PART_VERSION = 1


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
    probes: tuple[str, ...] = DEFAULT_PROBES
    probe_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    reduce: str = "flatten"
    device: str = "cpu"
    dtype: str = "float32"
    strict: bool = True
    seed: int = 0

    def params(self) -> dict[str, Any]:
        out = asdict(self)
        model = self.model
        if model is not None and not isinstance(model, str):
            out["model"] = f"{getattr(model, '__module__', '?')}:" \
                           f"{getattr(model, '__qualname__', type(model).__name__)}"
        out["tokenizer"] = None if self.tokenizer is None else str(self.tokenizer)
        out["model_kwargs"] = json.loads(records.params_attr(self.model_kwargs))
        return out

    def key(self) -> str:
        return hashlib.sha256(records.params_attr(self.params()).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# one checkpoint (runs in the calling process or in a dask worker)

_CACHE: dict[str, tuple[str, Any]] = {}


def _cached(slot: str, key: str, make: Callable[[], Any]) -> Any:
    """One object per slot, rebuilt when its key changes (a worker keeps its model and inputs)."""
    hit = _CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    _CACHE.pop(slot, None)
    value = make()
    _CACHE[slot] = (key, value)
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


def _model_key(spec: AnalyzeSpec) -> str:
    return repr((spec.params()["model"], dict(spec.model_kwargs), spec.device, spec.dtype,
                 id(spec.model) if not isinstance(spec.model, str) else 0))


def _inputs(spec: AnalyzeSpec) -> ProbeInputs:
    key = repr((spec.inputs, spec.n_samples, spec.batch_size, str(spec.tokenizer),
                spec.max_length, spec.seed))
    return _cached("inputs", key, lambda: load_probe_inputs(
        spec.inputs, n_samples=spec.n_samples, batch_size=spec.batch_size,
        tokenizer=spec.tokenizer, max_length=spec.max_length, seed=spec.seed))


def _load(checkpoint: Checkpoint, spec: AnalyzeSpec) -> tuple[torch.nn.Module, str]:
    if checkpoint.format == "hf":
        model, digest = load_hf_model(checkpoint.path, spec.hf_class, strict=spec.strict)
        return model.to(device=_device(spec.device), dtype=_DTYPES[spec.dtype]).eval(), digest
    if spec.model is None:
        raise CheckpointError(f"{checkpoint.path.name} is a state dict: a model factory "
                              f"(--model module:function) is needed to build the network")
    if spec.strict:
        model = _cached("model", _model_key(spec), lambda: _build_model(spec))
    else:  # keys the checkpoint lacks must start from the same initialisation every time
        model = _build_model(spec)
    return model, load_into(model, checkpoint, strict=spec.strict)


def _probe_values(layers: Sequence[str], accumulators: dict, raw: dict,
                  spec: AnalyzeSpec) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {name: [] for name in spec.probes}
    if "alpha_req" in spec.probes:
        values["alpha_req_r2"] = []
    for layer in layers:
        acc = accumulators.get(layer)
        cov: list[torch.Tensor] = []

        def covariance(acc: spectral.SpectrumAccumulator = acc, cov: list = cov) -> torch.Tensor:
            if not cov:
                cov.append(acc.covariance_spectrum())
            return cov[0]

        for name in spec.probes:
            probe = get_feature_probe(name)
            kwargs = dict(spec.probe_kwargs.get(name, {}))
            if probe.fn is spectral.rankme:
                value = spectral.rankme_from_spectrum(acc.singular_values(), **kwargs)
            elif probe.fn is spectral.rankme_covariance:
                value = spectral.rankme_from_spectrum(covariance(), **kwargs)
            elif probe.fn is spectral.alpha_req:
                fit = spectral.power_law_fit(covariance(), **kwargs)
                value = fit.alpha
                values["alpha_req_r2"].append(fit.r2)
            else:
                value = float(probe(torch.cat(raw[layer]), **kwargs))
                if name == "alpha_req":
                    values["alpha_req_r2"].append(float("nan"))
            values[name].append(float(value))
    return values


_FAST = (spectral.rankme, spectral.rankme_covariance, spectral.alpha_req)


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


def analyze_checkpoint(checkpoint: Checkpoint, spec: AnalyzeSpec,
                       threads: int | None = None) -> dict[str, Any]:
    """Analyse one checkpoint; never raises for a bad checkpoint (status ``failed`` + reason).

    Returns a JSON-serialisable dict: ``step``, ``status``, ``reason``, ``checkpoint_hash``,
    ``layers``, ``values`` (probe → one value per layer), ``notes`` (probe warnings) and
    ``seconds`` (load, forward, probes, total).
    """
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    result: dict[str, Any] = {
        "step": int(checkpoint.step), "path": str(checkpoint.path), "status": "failed",
        "reason": "", "checkpoint_hash": "", "layers": [], "values": {}, "notes": "",
        "seconds": {k: float("nan") for k in ("load", "forward", "probes", "total", "cpu")},
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        model, digest = _load(checkpoint, spec)
        result["checkpoint_hash"] = digest
        loaded = time.perf_counter()
        inputs = _inputs(spec)
        layers = match_layers(model, spec.layers)
        fast = [get_feature_probe(p).fn in _FAST for p in spec.probes]
        accumulators = {layer: spectral.SpectrumAccumulator() for layer in layers} \
            if any(fast) else {}
        raw: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        keep_raw = not all(fast)

        def sink(layer: str, x: torch.Tensor) -> None:
            if accumulators:
                accumulators[layer].update(x)
            if keep_raw:
                raw[layer].append(x)

        device, dtype = _device(spec.device), _DTYPES[spec.dtype]
        with torch.no_grad(), capture(model, layers, reduce=spec.reduce, sink=sink) as cap:
            for batch in inputs.batches:
                batch = batch.to(device, dtype)
                cap.attention_mask = batch.mask
                if isinstance(batch.inputs, dict):
                    model(**batch.inputs)
                else:
                    model(batch.inputs)
        forwarded = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught, _single_threaded(device):
            warnings.simplefilter("always")
            result["values"] = _probe_values(layers, accumulators, raw, spec)
        result["notes"] = "; ".join(dict.fromkeys(str(w.message) for w in caught))
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
# resumable storage of per-checkpoint results


def _parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _part_path(parts: Path, checkpoint: Checkpoint) -> Path:
    return parts / f"step{checkpoint.step:012d}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_part(path: Path, checkpoint: Checkpoint, spec_key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (part.get("version") != _PART_VERSION or part.get("spec_key") != spec_key
            or part.get("identity") != checkpoint.identity()):
        return None
    return part["result"]


# --------------------------------------------------------------------------------------------
# assembly


def _assemble(results: list[dict], spec: AnalyzeSpec, attrs: dict[str, Any],
              learning_rate: float | None) -> xr.Dataset:
    results = sorted(results, key=lambda r: r["step"])
    layers = next((r["layers"] for r in results if r["status"] == "ok"), [])
    for r in results:
        if r["status"] == "ok" and r["layers"] != layers:
            r.update(status="failed", values={},
                     reason=f"its layers {r['layers'][:4]}… differ from the series' {layers[:4]}…")
    steps = [r["step"] for r in results]
    coords: dict[str, Any] = records.step_coords(steps, learning_rate)
    coords["layer"] = ("layer", np.array(layers, dtype=object),
                       {"long_name": records.DIMS["layer"], "units": ""})
    names = list(spec.probes) + (["alpha_req_r2"] if "alpha_req" in spec.probes else [])
    data_vars: dict[str, Any] = {}
    for name in names:
        values = np.full((len(results), len(layers)), np.nan)
        for i, r in enumerate(results):
            if r["status"] == "ok":
                values[i] = np.asarray(r["values"][name], dtype=float)
        if name == "alpha_req_r2":
            var_attrs = records.variable_attrs(name)
        else:
            probe = get_feature_probe(name)
            var_attrs = {"long_name": probe.long_name, "units": probe.units,
                         "source": probe.source}
        data_vars[name] = (("step", "layer"), values, var_attrs)
    hashes = [r["checkpoint_hash"] for r in results]
    first_step: dict[str, int] = {}
    for h, step in zip(hashes, steps, strict=True):
        if h:
            first_step.setdefault(h, step)
    duplicate_of = np.array([first_step[h] if h and first_step[h] != step else -1
                             for h, step in zip(hashes, steps, strict=True)], dtype=np.int64)
    dup_flag = np.array([int(bool(h) and hashes.count(h) > 1) for h in hashes], dtype=np.int8)

    def strings(key: str) -> np.ndarray:
        return np.array([r[key] for r in results], dtype=object)

    data_vars.update({
        "status": ("step", strings("status"), {"long_name": "checkpoint status (ok / failed)",
                                               "units": ""}),
        "reason": ("step", strings("reason"), {"long_name": "why the checkpoint failed",
                                               "units": ""}),
        "notes": ("step", strings("notes"), {"long_name": "warnings raised by the probes",
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
    })
    for key, var in zip(("load", "forward", "probes", "total", "cpu"), TIMING_VARIABLES,
                        strict=True):
        data_vars[var] = ("step", np.array([r["seconds"].get(key, np.nan) for r in results],
                                           dtype=float),
                          {"long_name": f"wall-clock time: {key}" if key != "cpu" else
                           "CPU time of the analysing process (all its threads)", "units": "s"})
    attrs = dict(attrs)
    attrs["n_failed"] = int(sum(r["status"] != "ok" for r in results))
    attrs["n_duplicates"] = int(dup_flag.sum())
    return records.validate(xr.Dataset(data_vars, coords=coords, attrs=attrs))


# --------------------------------------------------------------------------------------------
# faces: figure and table


def summary_figures(ds: xr.Dataset, folder: str | os.PathLike, stem: str = "analyze"
                    ) -> list[Path]:
    """One PNG per probe: the metric over log-step, one line per layer; failed steps marked."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    steps = ds["step"].values
    failed = steps[ds["status"].values != "ok"]
    paths = []
    for name, var in ds.data_vars.items():
        if var.dims != ("step", "layer"):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for layer in ds["layer"].values:
            ax.plot(steps, var.sel(layer=layer).values, marker="o", ms=3, label=str(layer))
        if len(steps) and steps.min() <= 0:
            positive = steps[steps > 0]
            ax.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)
        else:
            ax.set_xscale("log")
        for step in failed:
            ax.axvline(step, color="0.6", ls=":", lw=1)
        ax.set_xlabel("step" + (" (dotted: failed checkpoints)" if failed.size else ""))
        ax.set_ylabel(f"{var.attrs.get('long_name', name)}")
        ax.set_title(name)
        if ds.sizes["layer"] <= 12:
            ax.legend(fontsize=7, title="layer", title_fontsize=7)
        fig.tight_layout()
        path = folder / f"{stem}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def summary_table(ds: xr.Dataset, max_rows: int = 40) -> str:
    """A short text table: per step the status, hash prefix, duplicate flag, time, and each
    probe at the last analysed layer (failed rows show the reason)."""
    probes = [n for n, v in ds.data_vars.items() if v.dims == ("step", "layer")
              and n != "alpha_req_r2"]
    last = str(ds["layer"].values[-1]) if ds.sizes.get("layer", 0) else "-"
    header = ["step", "status", "hash", "dup", "time/s"] + probes
    rows = []
    for i, step in enumerate(ds["step"].values):
        status = str(ds["status"].values[i])
        dup = int(ds["duplicate_of"].values[i])
        row = [str(int(step)), status, str(ds["checkpoint_hash"].values[i])[:10] or "-",
               f"={dup}" if dup >= 0 else ("yes" if ds["duplicate"].values[i] else ""),
               f"{float(ds['total_seconds'].values[i]):.2f}"]
        if status == "ok":
            row += [f"{float(ds[p].values[i, -1]):.4g}" for p in probes]
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
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the series


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


def analyze(
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Checkpoint],
    *,
    model: str | Callable[..., torch.nn.Module] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    hf_class: str = "AutoModel",
    inputs: str | os.PathLike = "digits",
    n_samples: int | None = None,
    batch_size: int = 256,
    tokenizer: Any = None,
    max_length: int = 128,
    probes: Sequence[str] = DEFAULT_PROBES,
    probe_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    layers: Sequence[str] | str | None = None,
    reduce: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    strict: bool = True,
    steps: Sequence[int] | None = None,
    learning_rate: float | None = None,
    output: str | os.PathLike | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    threads: int | None = None,
    retry_failed: bool = True,
    progress: bool = True,
    figures: bool | str | os.PathLike = False,
    seed: int = 0,
) -> xr.Dataset:
    """Analyse every checkpoint of a run and return one Dataset over ``(step × layer)``.

    Parameters
    ----------
    checkpoints : path, list of paths, or list of :class:`~dynamics.checkpoints.Checkpoint`
        A folder of state dicts / safetensors / Hugging Face folders, one Hugging Face folder,
        or explicit paths (see :func:`dynamics.checkpoints.find_checkpoints`).
    model : "module:function", "file.py:function" or callable
        Factory of the network for state-dict checkpoints, called as ``model(**model_kwargs)``.
        Not needed for Hugging Face folders (``hf_class`` is used, default ``AutoModel``).
    inputs, n_samples, batch_size, tokenizer, max_length :
        Probe inputs (:func:`dynamics.probe_inputs.load_probe_inputs`).  For text and Hugging
        Face checkpoints the tokenizer defaults to the first checkpoint folder's own.
    probes : names in ``probes.registry.FEATURE_PROBES``
        Default ``rankme``, ``rankme_covariance``, ``alpha_req`` (which adds ``alpha_req_r2``).
    probe_kwargs : {probe: {argument: value}}
        e.g. ``{"alpha_req": {"fit_range": (11, 100)}}``.
    layers : module names or dotted glob patterns (:func:`match_layers`)
        Required; ``"blocks.*"`` selects the blocks, not their sub-modules.  A pattern that
        matches nothing raises ``KeyError`` listing the model's modules.
    reduce : token reduction of ``probes.capture``
        Default ``"mean"`` for text inputs and ``"flatten"`` otherwise.  ``"flatten"`` needs
        inputs of one shape: text tokenised into batches of different lengths raises
        ``ValueError`` before any checkpoint is loaded.
    device, dtype : where and in which precision the model runs (``device="auto"``: CUDA if
        available); statistics are float64 on that device.
    strict : bool
        Unexpected keys (state dicts) or weights the checkpoint lacks fail the checkpoint.
    steps : explicit steps, overriding names.
    learning_rate : gives the coordinate ``time = learning_rate × step``.
    output : path ending in ``.nc`` or ``.zarr``
        Save the Dataset there; per-checkpoint results go to ``<output>.parts/`` as they
        finish, and a re-run resumes from them.
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
    figures : bool or folder
        Write one summary PNG per probe (next to ``output``, or into the given folder).

    Returns
    -------
    xarray.Dataset
        Probe variables over ``(step, layer)``; per step ``status``, ``reason``, ``notes``,
        ``checkpoint_hash``, ``duplicate``, ``duplicate_of``, ``checkpoint_path`` and the
        timings of :data:`TIMING_VARIABLES`; attributes ``source``, ``parameters`` (JSON),
        ``probe_inputs``, ``n_failed``, ``n_duplicates``.
    """
    from tqdm.auto import tqdm

    series = (list(checkpoints) if isinstance(checkpoints, Sequence) and checkpoints
              and isinstance(checkpoints[0], Checkpoint) else find_checkpoints(checkpoints, steps))
    for name in probes:
        get_feature_probe(name)  # unknown names fail now, listing the known ones
    if not probes:
        raise ValueError("no probes were asked for")
    text_inputs = str(inputs) in ("stdlib-text", "text") or (
        Path(inputs).suffix not in (".npz", ".npy", ".pt", ".pth") and str(inputs) != "digits")
    reduce = reduce or ("mean" if text_inputs else "flatten")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce rule {reduce!r}; choose one of {REDUCTIONS}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if text_inputs and tokenizer is None:
        hf = [c for c in series if c.format == "hf"]
        if hf:
            tokenizer = str(hf[0].path.resolve())
    if str(inputs) not in ("digits", "stdlib-text", "text"):
        inputs = str(Path(inputs).resolve())
    if model is not None and isinstance(model, str) and ".py" in model:
        file, sep, attr = model.rpartition(":") if ":" in model else (model, "", "")
        model = str(Path(file).resolve()) + sep + attr
    if isinstance(layers, str):
        layers = [layers]
    spec = AnalyzeSpec(
        model=model, model_kwargs=dict(model_kwargs or {}), hf_class=hf_class,
        inputs=str(inputs), n_samples=n_samples, batch_size=batch_size, tokenizer=tokenizer,
        max_length=max_length, probes=tuple(probes),
        probe_kwargs={k: dict(v) for k, v in (probe_kwargs or {}).items()},
        layers=tuple(layers or ()), reduce=reduce, device=device, dtype=dtype, strict=strict,
        seed=seed)
    probe_inputs = _inputs(spec)  # errors in the inputs surface here, before any work
    if reduce == "flatten":
        _check_flatten(probe_inputs)
    if any(c.format != "hf" for c in series):
        if model is None:
            raise ValueError("state-dict checkpoints need a model factory: "
                             "model='package.module:function' or 'file.py:function'")
        reference = _cached("model", _model_key(spec), lambda: _build_model(spec))
        if not layers:
            raise ValueError(f"choose layers (names or glob patterns); the model has: "
                             f"{', '.join(module_names(reference)[:60])}")
        match_layers(reference, layers)
    elif not layers:
        raise ValueError("choose layers (names or glob patterns), e.g. 'encoder.layer.*'")

    spec_key = spec.key()
    output = Path(output) if output is not None else None
    if output is not None and output.suffix == ".zarr":
        records.recover_zarr(output)  # a store a killed run was replacing: back, temporaries gone
    parts = _parts_dir(output) if output is not None else None
    results: dict[int, dict] = {}
    pending: list[Checkpoint] = []
    for checkpoint in series:
        done = _read_part(_part_path(parts, checkpoint), checkpoint, spec_key) if parts else None
        if done is not None and (done["status"] == "ok" or not retry_failed):
            results[checkpoint.step] = done
        else:
            pending.append(checkpoint)
    by_step = {c.step: c for c in series}

    bar = tqdm(total=len(series), initial=len(results), desc="traindyn analyze", unit="ckpt",
               disable=not progress, file=sys.stderr)
    if results and progress:
        bar.write(f"resuming: {len(results)} of {len(series)} checkpoints already analysed")

    def on_result(result: dict) -> None:
        results[result["step"]] = result
        if parts is not None:
            checkpoint = by_step[result["step"]]
            _write_atomic(_part_path(parts, checkpoint), json.dumps(
                {"version": _PART_VERSION, "spec_key": spec_key,
                 "identity": checkpoint.identity(), "result": result}))
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
        if output.suffix == ".zarr":
            records.save_zarr(ds, output)
        else:
            records.save(ds, output)
    if figures:
        folder = Path(figures) if not isinstance(figures, bool) else (
            output.parent if output is not None else Path.cwd())
        summary_figures(ds, folder, stem=output.stem if output is not None else "analyze")
    return ds

