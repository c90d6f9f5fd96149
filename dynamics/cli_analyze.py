"""``traindyn analyze``: a run's checkpoint series → one Dataset, a figure per probe, a table.

Wired into ``dynamics/cli.py`` with :func:`add_parser`; also runs alone as
``python -m dynamics.cli_analyze …``.  Exit codes: 0 when every checkpoint was analysed, 1 when
any failed (the Dataset is still written, with the reasons), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "main", "run"]

_EPILOG = """\
examples:
  # a folder of state dicts from your run, an MLP factory from your own code
  traindyn analyze runs/mlp/ckpt --model mypkg.models:make_mlp --layers 'net.*' \\
      --inputs digits --output runs/mlp/geometry.nc --workers 2

  # Hugging Face model folders (local only: never the Hub), last-token features
  traindyn analyze runs/lm/checkpoint-* --layers 'model.layers.*' --inputs stdlib-text \\
      --reduce last --output lm.nc

  # a single pretrained model as a one-checkpoint series
  traindyn analyze path/to/all-MiniLM-L6-v2 --layers 'encoder.layer.*' --inputs stdlib-text \\
      --n-samples 300 --output minilm.nc

checkpoints are read safely: torch.load(weights_only=True), safetensors lazily; a pickle that
would run code is refused. Re-running with the same --output resumes: finished checkpoints are
skipped. Exit code 1 when any checkpoint failed (reasons in the table and the Dataset).
"""


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"width\": 128}'")
    return value


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _steps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be integers, got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``analyze`` sub-command to ``subparsers``; its ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "analyze",
        help="probe the geometry of every checkpoint of a run (one Dataset over step × layer)",
        description="Load each checkpoint of a run safely, run fixed probe inputs through it, "
                    "and measure feature probes (RankMe, alpha-ReQ, …) of the chosen layers. "
                    "Writes one Dataset (step × layer) with per-checkpoint status, reason and "
                    "content hash, a summary figure per probe, and prints a short table.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("checkpoints")
    src.add_argument("checkpoints", nargs="+", metavar="PATH",
                     help="a folder of *.pt/*.pth/*.bin/*.safetensors files (step in the name: "
                          "step1000, checkpoint-1000, ckpt_000100), Hugging Face model folders, "
                          "or explicit files/folders")
    src.add_argument("--steps", type=_steps,
                     help="explicit steps, one per checkpoint path in argument order; a step "
                          "that contradicts the number in a name is an error (--force-steps)")
    src.add_argument("--force-steps", action="store_true",
                     help="let --steps override step numbers in the names")
    src.add_argument("--model", metavar="FACTORY",
                     help="model factory for state dicts: package.module:function or "
                          "path/to/file.py:function (your own code, run in this process)")
    src.add_argument("--model-kwargs", type=_json, default={}, metavar="JSON",
                     help="keyword arguments for the factory, as a JSON object")
    src.add_argument("--hf-class", default="AutoModel",
                     help="transformers class for Hugging Face folders (default AutoModel)")
    src.add_argument("--no-strict", dest="strict", action="store_false",
                     help="accept checkpoints with extra keys or (HF) missing weights")
    inp = p.add_argument_group("probe inputs")
    inp.add_argument("--inputs", default="digits",
                     help="digits | stdlib-text | a .npz/.npy/.pt tensor file | a text file "
                          "(one sample per line) (default: digits)")
    inp.add_argument("--n-samples", type=int, help="number of samples (default: all; text: 512)")
    inp.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    inp.add_argument("--tokenizer",
                     help="for text: 'bytes' (UTF-8 byte ids) or a local tokenizer folder "
                          "(default: the Hugging Face checkpoint's own)")
    inp.add_argument("--max-length", type=int, default=128, help="tokens per text sample")
    inp.add_argument("--labels", metavar="SOURCE",
                     help="integer labels of the probe inputs, for labelled probes "
                          "(neural_collapse) and NTK alignment: digits | a .npy/.npz/.pt file")
    what = p.add_argument_group("what to measure")
    what.add_argument("--probes", type=_csv, default=["rankme", "rankme_covariance", "alpha_req"],
                      help="comma-separated names from the probe registry "
                           "(default: rankme,rankme_covariance,alpha_req; see `traindyn info`)")
    what.add_argument("--import", dest="imports", type=_csv, default=[], metavar="MODULES",
                      help="modules (package.module or path/to/file.py) to import first: "
                           "they register your own probes (probes.registry.register)")
    what.add_argument("--probe-kwargs", type=_json, default={}, metavar="JSON",
                      help='per-probe arguments, e.g. \'{"alpha_req": {"fit_range": [11, 100]}}\'')
    what.add_argument("--layers", type=_csv, required=True,
                      help="comma-separated module names or glob patterns, e.g. 'blocks.*'")
    what.add_argument("--reduce", choices=["flatten", "mean", "last", "cls", "none"],
                      help="token reduction (default: mean for text, flatten otherwise)")
    what.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    what.add_argument("--dtype", default="float32",
                      choices=["float32", "float64", "bfloat16", "float16"],
                      help="model precision (statistics are always float64)")
    what.add_argument("--learning-rate", type=float,
                      help="gives the coordinate time = learning rate × step")
    out = p.add_argument_group("output and scale")
    out.add_argument("--output", "-o", help="result file, .nc or .zarr (resumable)")
    out.add_argument("--workers", type=int, default=0,
                     help="fan out over a dask LocalCluster with this many processes")
    out.add_argument("--scheduler", metavar="ADDRESS",
                     help="use an existing dask cluster, e.g. tcp://10.0.0.1:8786")
    out.add_argument("--threads", type=int,
                     help="torch threads in each dask worker (default: as in this process, "
                          "which makes results equal the serial run bit for bit)")
    out.add_argument("--no-figures", dest="figures", action="store_false",
                     help="do not write the summary figures")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="hide the progress bar")
    out.add_argument("--report", nargs="?", const="", metavar="HTML",
                     help="also write the HTML report of the series (traindyn report) at the "
                          "end: to HTML, or without a value beside --output (its .html)")
    p.set_defaults(func=run)
    return p


def summary_table(ds: Any, max_rows: int = 40) -> str:
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


def _import(module: str) -> None:
    """Import a module by name or a ``.py`` file by path (it registers user probes)."""
    import importlib
    import importlib.util

    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--import {module}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = mod
        spec.loader.exec_module(mod)
    else:
        importlib.import_module(module)


def run(args: argparse.Namespace) -> int:
    """Handler of ``traindyn analyze``: returns 0, or 1 when any checkpoint failed."""
    from traindyn.dynamics._threads import apply_threads
    from traindyn.dynamics.analyze import analyze

    sources = args.checkpoints[0] if len(args.checkpoints) == 1 else args.checkpoints
    # this process's torch threads: the cores free now (TRAINDYN_THREADS overrides); dask
    # workers use the same count unless --threads says otherwise, so results equal serial ones
    apply_threads(None, processes=max(1, args.workers))
    try:
        for module in args.imports:
            _import(module)
        ds = analyze(
            sources, model=args.model, model_kwargs=args.model_kwargs, hf_class=args.hf_class,
            inputs=args.inputs, n_samples=args.n_samples, batch_size=args.batch_size,
            tokenizer=args.tokenizer, max_length=args.max_length, probes=args.probes,
            probe_kwargs=args.probe_kwargs, layers=args.layers, reduce=args.reduce,
            device=args.device, dtype=args.dtype, strict=args.strict, steps=args.steps,
            force_steps=args.force_steps, labels=args.labels,
            learning_rate=args.learning_rate, output=args.output, workers=args.workers,
            scheduler=args.scheduler, threads=args.threads, progress=args.progress,
            figures=bool(args.figures and args.output))
    except (FileNotFoundError, ValueError, KeyError, TypeError, ImportError,
            AttributeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"traindyn analyze: error: {message}", file=sys.stderr)
        return 2
    print(summary_table(ds))
    if args.output:
        print(f"wrote {args.output}" + (f" and summary figures in "
                                        f"{Path(args.output).resolve().parent}"
                                        if args.figures else ""))
    if args.report is not None:
        from traindyn.dynamics.report import write_report

        html = args.report or (Path(args.output).with_suffix(".html") if args.output
                               else Path("analyze_report.html"))
        print(f"wrote {write_report(ds, html)}")
    failed = int(ds.attrs.get("n_failed", 0))
    if failed:
        print(f"{failed} checkpoint(s) failed; see the table above and the 'reason' variable",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``analyze`` on its own: ``python -m dynamics.cli_analyze PATH …``."""
    parser = argparse.ArgumentParser(prog="traindyn")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
