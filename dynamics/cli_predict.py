"""``traindyn predict``: a run's own kernel prediction from a checkpoint, and the lazy→rich gap.

Wired into ``dynamics/cli.py`` with :func:`add_parser`.  Exit codes: 0 on success, 2 for a
usage error (bad arguments, no checkpoint at the step, unreadable data).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from traindyn.dynamics._cli_common import run_subcommand

__all__ = ["add_parser", "run"]

_EPILOG = """\
examples:
  # predict the rest of training from step 1000 on digits (the MLP from your own code)
  traindyn predict runs/mlp/ckpt --model mypkg.models:make_mlp --from-step 1000 \\
      --learning-rate 0.05 --data digits --n-train 300 --measured runs/mlp/run.nc \\
      --output runs/mlp/predicted.nc

  # the lazy→rich gap over the whole run: linearised from each checkpoint to the next
  traindyn predict runs/mlp/ckpt --model mypkg.models:make_mlp --learning-rate 0.05 \\
      --data digits --n-train 300 --gap --output runs/mlp/gap.nc

The prediction is for full-batch gradient descent on the --n-train training points with a
mean-reduced loss (PyTorch's default); checkpoints are read with torch.load(weights_only=True).
"""


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"width\": 128}'")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``predict`` sub-command to ``subparsers``; its ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "predict",
        help="predict training from a checkpoint's empirical NTK (linearised network), or the "
             "lazy→rich gap over a run",
        description="Measure the empirical NTK of the network at a checkpoint on the training "
                    "and test batches, and predict the rest of training by the network "
                    "linearised there (Lee et al. 2019): train/test loss and accuracy over "
                    "step, aligned with a measured run. With --gap, the distance between what "
                    "the network did and its linearisation, from every checkpoint.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="PATH",
                   help="a folder of checkpoints (step in the names) or explicit files")
    p.add_argument("--model", metavar="FACTORY", required=True,
                   help="model factory: package.module:function or path/to/file.py:function "
                        "(your own code, run in this process)")
    p.add_argument("--model-kwargs", type=_json, default={}, metavar="JSON",
                   help="keyword arguments for the factory, as a JSON object")
    p.add_argument("--from-step", "--predict-from", dest="from_step", type=int,
                   help="the checkpoint's step to predict from (default: the first)")
    p.add_argument("--learning-rate", type=float, required=True, help="η of the run")
    p.add_argument("--data", default="digits",
                   help="digits (the recipes' split) or a .npz with x_train, y_train, x_test, "
                        "y_test (default: digits)")
    p.add_argument("--n-train", type=int, default=256,
                   help="training points the prediction trains on (kernel size; default 256)")
    p.add_argument("--n-test", type=int, default=256, help="test points (default 256)")
    p.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy")
    p.add_argument("--kernel", choices=["full", "mean"], default="full",
                   help="full (n, n, k, k) kernel, or averaged over outputs (k² cheaper)")
    p.add_argument("--dynamics", choices=["gd", "flow"], default="gd")
    p.add_argument("--to", type=int, help="last step to predict (default: from-step + 1000)")
    p.add_argument("--points", type=int, default=20, help="steps to predict at (default 20)")
    p.add_argument("--measured", metavar="FILE",
                   help="a measured run (.nc/.zarr with train_loss … over step): predict at its "
                        "steps and print both")
    p.add_argument("--gap", nargs="?", const=0, type=int, metavar="DELTA",
                   help="compute the lazy→rich gap over all checkpoints instead: Δ steps "
                        "(default: to the next checkpoint)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="precision of the kernel measurement (default float64)")
    p.add_argument("--output", "-o", help="write the Dataset to this .nc or .zarr path")
    p.set_defaults(func=run)
    return p


def _data(spec: str, n_train: int, n_test: int) -> tuple[Any, Any, Any, Any]:
    import numpy as np
    import torch

    if spec == "digits":
        from traindyn.dynamics.recipes.digits import load_digits_split

        xtr, ytr, xte, yte = load_digits_split()
    else:
        with np.load(spec, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise ValueError(f"--data {spec}: missing arrays {missing}")
            xtr, ytr, xte, yte = (torch.as_tensor(f[k]) for k in
                                  ("x_train", "y_train", "x_test", "y_test"))
    if n_train < 1 or n_test < 0:
        raise ValueError("--n-train must be ≥ 1 and --n-test ≥ 0")
    return xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]


def _table(pred: Any, measured: Any) -> str:
    import xarray as xr

    names = [v for v in ("train_loss", "test_loss", "train_accuracy", "test_accuracy")
             if v in pred]
    both = measured is not None and any(v in measured for v in names)
    if both:
        pred, measured = xr.align(pred, measured)
    header = ["step", "time"] + [f"{v}{' pred/meas' if both else ''}" for v in names]
    lines = ["  ".join(header)]
    for i, step in enumerate(pred.step.values):
        row = [str(int(step)), f"{float(pred.time.values[i]):.4g}"]
        for v in names:
            cell = f"{float(pred[v].values[i]):.4g}"
            if both and v in measured:
                cell += f"/{float(measured[v].values[i]):.4g}"
            row.append(cell)
        lines.append("  ".join(row))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Handler of ``traindyn predict``: 0 on success, 2 for a usage error."""
    import numpy as np
    import torch
    from traindyn.dynamics import checkpoints, storage
    from traindyn.dynamics.predict import lazy_rich_gap, predict_from_model

    try:
        factory = checkpoints.resolve_factory(args.model)
        dtype = getattr(torch, args.dtype)

        def build() -> torch.nn.Module:
            return factory(**args.model_kwargs).to(device=args.device, dtype=dtype)

        xtr, ytr, xte, yte = _data(args.data, args.n_train, args.n_test)
        if args.loss == "cross_entropy":
            ytr, yte = ytr.long(), yte.long()
        test = dict(x_test=xte, y_test=yte) if len(xte) else {}
        sources = args.checkpoints[0] if len(args.checkpoints) == 1 else args.checkpoints
        found = checkpoints.find_checkpoints(sources)
        common = dict(loss=args.loss, kernel=args.kernel, dynamics=args.dynamics)
        if args.gap is not None:
            ds = lazy_rich_gap(sources, xtr, ytr, args.learning_rate, model=build,
                               delta=args.gap or None, **test, **common)
            print(ds[[v for v in ds.data_vars if "gap" in v]].to_dataframe().to_string(
                float_format=lambda v: f"{v:.4g}"))
        else:
            steps_found = [c.step for c in found]
            start = steps_found[0] if args.from_step is None else args.from_step
            if start not in steps_found:
                raise ValueError(f"no checkpoint at step {start}; steps found: {steps_found}")
            ckpt = found[steps_found.index(start)]
            measured = storage.load(args.measured) if args.measured else None
            if measured is not None:
                steps = measured.step.values[measured.step.values >= start]
            else:
                end = args.to if args.to is not None else start + 1000
                steps = np.unique(np.linspace(start, end, args.points).round().astype(int))
            model = build()
            checkpoints.load_into(model, ckpt)
            ds = predict_from_model(model, xtr, ytr, steps, args.learning_rate, step=start,
                                    **test, **common)
            ds.attrs["checkpoint"] = str(ckpt.path)
            print(_table(ds, measured))
    except (FileNotFoundError, ValueError, KeyError, TypeError, ImportError, AttributeError,
            checkpoints.CheckpointError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"traindyn predict: error: {message}", file=sys.stderr)
        return 2
    if args.output:
        print(f"wrote {storage.save(ds, args.output)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``predict`` on its own: ``python -m traindyn.dynamics.cli_predict PATH …``."""
    return run_subcommand("predict", add_parser, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
