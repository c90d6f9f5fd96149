"""The ``traindyn`` command line: a thin face over recipes, probes and theory.

Only the standard library is imported at module level, so ``traindyn --help`` (and building
the parser) loads no torch, scipy, sympy or xarray; each command imports what it uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from traindyn.dynamics import storage
    from traindyn.dynamics.demo import DemoConfig, run_demo, summary

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    paths = run_demo(args.out, cfg, progress=not args.no_progress, threads=args.threads)
    print(summary(paths, storage.load(paths["digits"])))
    return 0


def _cmd_theory_linear(args: argparse.Namespace) -> int:
    """``traindyn theory linear``: 0, or 2 with a one-line message for a usage error."""
    import math

    import numpy as np
    from traindyn.dynamics import storage

    from traindyn import theory

    try:
        if not (math.isfinite(args.t_min) and math.isfinite(args.t_max)
                and 0 < args.t_min < args.t_max):
            raise ValueError(f"need 0 < --t-min < --t-max, both finite; got --t-min "
                             f"{args.t_min:g} --t-max {args.t_max:g}")
        if args.points < 1:
            raise ValueError(f"--points must be at least 1; got {args.points}")
        if args.out and Path(args.out).suffix not in (".nc", ".zarr"):
            raise ValueError(f"--out {args.out}: the path must end in .nc (NetCDF) or .zarr "
                             "(Zarr store)")
        times = np.geomspace(args.t_min, args.t_max, args.points)
        ds = theory.advani_saxe(times, np.asarray(args.load_ratio), noise_var=args.noise_var,
                                teacher_var=args.teacher_var, init_var=args.init_var)
        if args.out:
            path = storage.save(ds, args.out, kind="theory", overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"traindyn theory linear: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        print(f"wrote {path}")
    else:
        print(ds.to_dataframe().to_string(float_format=lambda v: f"{v:.5g}"))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from importlib import metadata

    from traindyn.dynamics.records import provenance
    from traindyn.probes.registry import CONSUMES, all_probes

    try:
        version = metadata.version("traindyn")
    except metadata.PackageNotFoundError:  # run from a source checkout that is not installed
        version = "(not installed: running from a source checkout)"
    print("traindyn", version)
    print("versions:", ", ".join(f"{k} {v}" for k, v in
                                json.loads(provenance()["versions"]).items()))
    registered = all_probes()
    print("probes (by what they consume; * streams a shared accumulator, "
          "↺ compares with another checkpoint):")
    for kind in CONSUMES:
        names = [p.name + ("*" if p.streams else "") + ("↺" if p.reference else "")
                 for p in sorted(registered.values(), key=lambda p: p.name)
                 if p.consumes == kind]
        print(f"  {kind + ':':19s}", ", ".join(names) or "(none)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from traindyn.dynamics.report import write_report

    try:
        path = write_report(args.run, args.output, theory=args.theory, title=args.title,
                            overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"traindyn report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="traindyn",
        description="Measure the geometry of what networks learn and put theory beside it. "
                    "Every result is an xarray Dataset (dims step/layer/seed, coord time = "
                    "learning rate × step) saved as NetCDF or Zarr.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run the embedded demo (digits MLP geometry + Advani–Saxe theory vs "
                     "simulation); no download",
        description="Train a small MLP on scikit-learn's digits recording RankMe and alpha-ReQ "
                    "of each hidden layer at ~30 log-spaced steps, and compare the Advani–Saxe "
                    "theory of a linear student–teacher with gradient-descent simulations at "
                    "two load ratios. Writes NetCDF files and PNG figures.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument("--threads", type=int,
                      help="torch threads (default: the cores that are free now, from the "
                           "load average; env TRAINDYN_THREADS overrides the default)")
    demo.set_defaults(func=_cmd_demo)

    th = sub.add_parser("theory", help="evaluate a theory prediction",
                        description="Evaluate a theory module and print or save its Dataset.")
    th_sub = th.add_subparsers(dest="model", metavar="MODEL", required=True)
    lin = th_sub.add_parser(
        "linear", help="Advani & Saxe (2017) linear student-teacher errors over time",
        description="Test and training error of a linear student learning a linear teacher "
                    "under gradient flow (Advani & Saxe 2017), from the Marchenko-Pastur "
                    "spectrum.")
    lin.add_argument("--load-ratio", type=float, nargs="+", default=[0.5, 2.0],
                     help="α = P/N values (default: 0.5 2.0)")
    lin.add_argument("--noise-var", type=float, default=0.25, help="label-noise variance σ_ε²")
    lin.add_argument("--teacher-var", type=float, default=1.0, help="teacher variance σ_w̄²")
    lin.add_argument("--init-var", type=float, default=0.0, help="initial weight variance")
    lin.add_argument("--t-min", type=float, default=0.01)
    lin.add_argument("--t-max", type=float, default=1000.0)
    lin.add_argument("--points", type=int, default=13)
    lin.add_argument("--out", help="save to this .nc or .zarr path instead of printing")
    lin.add_argument("--overwrite", action="store_true",
                     help="replace what is at --out even if traindyn theory did not write it "
                          "(a folder or file of yours, another command's output)")
    lin.set_defaults(func=_cmd_theory_linear)

    from traindyn.dynamics import cli_analyze

    cli_analyze.add_parser(sub)

    report = sub.add_parser(
        "report", help="one self-contained HTML page of a run (opens offline)",
        description="Write an HTML report of a run: the run overview figure, a per-layer "
                    "table of the last evaluation, every NaN reason, and the provenance. "
                    "Figures are embedded; the page needs no network access.")
    report.add_argument("run", help="a .nc result or a monitor's .zarr store (also while it "
                                    "is being written)")
    report.add_argument("--output", "-o", help="the HTML file (default: RUN with .html)")
    report.add_argument("--theory", help="a theory Dataset (.nc) drawn beside the run")
    report.add_argument("--title", help="page title (default: the run's source attribute)")
    report.add_argument("--overwrite", action="store_true",
                        help="replace what is at --output even if traindyn report did not "
                             "write it")
    report.set_defaults(func=_cmd_report)

    from traindyn.dynamics import cli_predict

    cli_predict.add_parser(sub)

    info = sub.add_parser("info", help="versions and the available probes",
                          description="Print package versions and the registered probes.")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
