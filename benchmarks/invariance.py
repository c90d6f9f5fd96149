"""Cost of the invariance probes relative to the forward passes they need.

For a small CNN and an MLP on ``n`` 8×8 images and ``T`` transformations, per layer set:

* baseline: the ``1 + T`` forward passes with layer capture that any invariance measurement
  needs (clean inputs and each transformed copy), including the transformations themselves;
* :func:`probes.invariance.invariance_scores` without and with the equivariance fit (ridge
  regression per layer and transformation), as ratios to the baseline;
* :func:`probes.invariance.lie_derivative` (one forward-mode pass through a rotation), as a
  ratio to one forward pass with capture of the rotated inputs;
* :class:`probes.invariance.GroupAveraged` over the 4 rotations by 90°, as a ratio to one forward.

Timings: median of ``--repeats`` interleaved rounds, ratios taken within each round (so a
change of machine load hits baseline and probe alike).  CPU here; ``--device cuda`` runs the
same on a GPU (unmeasured in this repository's CI).

Run: ``python benchmarks/invariance.py [--n 512 --repeats 5]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from traindyn.probes.invariance import (  # noqa: E402
    GroupAveraged,
    cyclic_shift,
    invariance_scores,
    layer_features,
    lie_derivative,
    rot90_group,
    rotate,
)


def models(channels: int, width: int):
    cnn = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                        nn.ReLU(), nn.Linear(width, 10))
    return {"cnn": (cnn, ["1", "3", "5", "6"]), "mlp": (mlp, ["2", "4", "5"])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.channels, args.width, args.repeats = 32, 4, 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"load average {load:.1f}; n = {args.n} images 8×8")
    x = torch.rand(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    transforms = {"shift": partial(cyclic_shift, shift=1, dims=-1),
                  "rotate": partial(rotate, angle=math.radians(15))}
    for name, (model, layers) in models(args.channels, args.width).items():
        model = model.to(device).eval()

        def baseline(model=model, layers=layers):
            layer_features(model, x, layers)
            for fn in transforms.values():
                layer_features(model, fn(x), layers)

        rot = partial(rotate, angle=math.radians(15))
        averaged = GroupAveraged(model, rot90_group())
        routes = {
            f"{1 + len(transforms)} forwards with capture (baseline)": baseline,
            "invariance_scores, no equivariance": partial(
                invariance_scores, model, x, transforms, layers, equivariance=False),
            "invariance_scores + equivariance fit": partial(
                invariance_scores, model, x, transforms, layers),
            "1 forward of rotated inputs (Lie baseline)": lambda m=model, la=layers, r=rot: (
                layer_features(m, r(x), la)),
            "lie_derivative (rotation, forward AD)": partial(lie_derivative, model, x, rotate,
                                                             layers),
            "1 forward (group-average baseline)": lambda m=model: m(x),
            "GroupAveraged over 4 rotations": lambda a=averaged: a(x),
        }
        for fn in routes.values():  # warm-up (forward-mode AD compiles its first conv)
            with torch.no_grad():
                fn()
        times = {k: [] for k in routes}
        for _ in range(args.repeats):
            for k, fn in routes.items():
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
        keys = list(routes)
        base_of = {keys[1]: keys[0], keys[2]: keys[0], keys[4]: keys[3], keys[6]: keys[5]}
        print(f"\n{name}: layers {layers}")
        print(f"  {'route':44s} {'ms':>9s} {'ratio to its baseline':>22s}")
        for k in keys:
            ms = 1e3 * statistics.median(times[k])
            if k in base_of:
                ratio = statistics.median(a / b for a, b in zip(times[k], times[base_of[k]],
                                                                strict=True))
                print(f"  {k:44s} {ms:9.2f} {ratio:22.2f}")
            else:
                print(f"  {k:44s} {ms:9.2f} {'(baseline)':>22s}")


if __name__ == "__main__":
    main()
