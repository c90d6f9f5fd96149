"""``traindyn analyze``: a run's checkpoint series → one Dataset, a figure per probe, a table.

Wired into ``dynamics/cli.py`` with :func:`add_parser`; also runs alone as
``python -m dynamics.cli_analyze …``.  Exit codes: 0 when every checkpoint was analysed, 1 when
any failed (the Dataset is still written, with the reasons), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from traindyn.dynamics._cli_common import run_subcommand

__all__ = ["add_parser", "main", "run"]

_EPILOG = """\
examples:
  # a folder of state dicts from your run, an MLP factory from your own code
  traindyn analyze runs/mlp/ckpt --model mypkg.models:make_mlp --layers 'net.*' \\
      --probe-data digits --output runs/mlp/geometry.nc --workers 2

  # Hugging Face model folders (local only: never the Hub), last-token features
  traindyn analyze runs/lm/checkpoint-* --layers 'model.layers.*' --probe-data stdlib-text \\
      --reduce last --output lm.nc

  # a single pretrained model as a one-checkpoint series
  traindyn analyze path/to/all-MiniLM-L6-v2 --layers 'encoder.layer.*' --probe-data stdlib-text \\
      --n-samples 300 --output minilm.nc

checkpoints are read safely: torch.load(weights_only=True), safetensors lazily; a pickle that
would run code is refused. Re-running with the same --output resumes: finished checkpoints are
skipped. An --output holding anything traindyn analyze did not write (your files, a Monitor's
recording) is never replaced without --overwrite, and one output has one writer at a time.
Exit code 1 when any checkpoint failed (reasons in the table and the Dataset).
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


class _Deprecated(argparse.Action):
    """An option's deprecated spelling (hidden from ``--help``): stores into the new option's
    destination and warns with a ``DeprecationWarning`` naming the new spelling."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DeprecationWarning)  # shown outside __main__ too
            warnings.warn(f"traindyn analyze: {option_string} is deprecated; use {self.new}",
                          DeprecationWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


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
    src.add_argument("--prefix", help="load the model from the tensors under this attribute "
                     "of a training wrapper (a Lightning .ckpt with model.* and ema.*: ema.)")
    inp = p.add_argument_group("probe batch")
    inp.add_argument("--probe-data", default="digits", metavar="SOURCE",
                     help="digits | stdlib-text | a .npz/.npy/.pt tensor file | a text file "
                          "(one sample per line) (default: digits)")
    inp.add_argument("--n-samples", type=int, help="number of samples (default: all; text: 512)")
    inp.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    inp.add_argument("--tokenizer",
                     help="for text: 'bytes' (UTF-8 byte ids) or a local tokenizer folder "
                          "(default: the Hugging Face checkpoint's own)")
    inp.add_argument("--max-length", type=int, default=128, help="tokens per text sample")
    inp.add_argument("--probe-labels", metavar="SOURCE",
                     help="integer labels of the probe batch, for labelled probes "
                          "(neural_collapse) and NTK alignment: digits | a .npy/.npz/.pt file")
    inp.add_argument("--inputs", dest="probe_data", action=_Deprecated, new="--probe-data")
    inp.add_argument("--labels", dest="probe_labels", action=_Deprecated, new="--probe-labels")
    what = p.add_argument_group("what to measure")
    what.add_argument("--probes", type=_csv, default=["rankme", "rankme_covariance", "alpha_req"],
                      help="comma-separated names from the probe registry "
                           "(default: rankme,rankme_covariance,alpha_req; see `traindyn info`)")
    what.add_argument("--import", dest="imports", type=_csv, default=[], metavar="MODULES",
                      help="modules (package.module or path/to/file.py) to import first: "
                           "they register your own probes (probes.registry.register)")
    what.add_argument("--probe-kwargs", type=_json, default={}, metavar="JSON",
                      help='per-probe arguments, e.g. \'{"alpha_req": {"fit_range": [11, 100]}}\'')
    what.add_argument("--classifier", metavar="MODULE",
                      help="module name of the classifier (last linear layer), so that "
                           "neural_collapse also gives NC3, NC4 and the classifier variants "
                           "(sets probe_kwargs neural_collapse.classifier)")
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
    out.add_argument("--overwrite", action="store_true",
                     help="replace what is at --output even if traindyn analyze did not "
                          "write it (a folder or file of yours, a Monitor's recording)")
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


def run(args: argparse.Namespace) -> int:
    """Handler of ``traindyn analyze``: returns 0, or 1 when any checkpoint failed."""
    from traindyn.dynamics._threads import apply_threads
    from traindyn.dynamics.analyze import analyze, summary_table

    sources = args.checkpoints[0] if len(args.checkpoints) == 1 else args.checkpoints
    # this process's torch threads: the cores free now (TRAINDYN_THREADS overrides); dask
    # workers use the same count unless --threads says otherwise, so results equal serial ones
    apply_threads(None, processes=max(1, args.workers))
    try:
        if args.classifier:
            if "neural_collapse" not in args.probes:
                raise ValueError("--classifier is for the neural_collapse probe; add it to "
                                 "--probes")
            args.probe_kwargs = {**args.probe_kwargs, "neural_collapse": {
                **args.probe_kwargs.get("neural_collapse", {}), "classifier": args.classifier}}
        ds = analyze(
            sources, model=args.model, model_kwargs=args.model_kwargs, hf_class=args.hf_class,
            probe_data=args.probe_data, n_samples=args.n_samples, batch_size=args.batch_size,
            tokenizer=args.tokenizer, max_length=args.max_length, probes=args.probes,
            probe_kwargs=args.probe_kwargs, layers=args.layers, reduce=args.reduce,
            device=args.device, dtype=args.dtype, strict=args.strict, prefix=args.prefix,
            steps=args.steps,
            force_steps=args.force_steps, probe_labels=args.probe_labels,
            learning_rate=args.learning_rate, output=args.output, workers=args.workers,
            scheduler=args.scheduler, threads=args.threads, progress=args.progress,
            figures=bool(args.figures and args.output), overwrite=args.overwrite,
            imports=args.imports)
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
        try:
            print(f"wrote {write_report(ds, html, overwrite=args.overwrite)}")
        except FileExistsError as err:
            print(f"traindyn analyze: error: {err}", file=sys.stderr)
            return 2
    failed = int(ds.attrs.get("n_failed", 0))
    if failed:
        print(f"{failed} checkpoint(s) failed; see the table above and the 'reason' variable",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``analyze`` on its own: ``python -m traindyn.dynamics.cli_analyze PATH …``."""
    return run_subcommand("analyze", add_parser, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
