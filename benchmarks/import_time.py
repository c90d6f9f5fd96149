"""Import cost of the packages and of ``traindyn --help``, as ratios against baselines.

Run: ``python benchmarks/import_time.py [--repeat 5]``.

Each case runs in a fresh interpreter, ``--repeat`` times, and the best wall time is kept
(the least disturbed by other work on a shared machine):

* ``import probes`` against ``import torch`` (probes needs torch; the ratio is its own cost);
* ``import theory`` and ``import dynamics`` against a bare interpreter (``python -c pass``);
* ``traindyn --help`` (``python -m dynamics.cli --help``) against the bare interpreter, with the
  target of at most 0.5 s on an idle 2-core machine.

For each it also prints the heavy packages (torch, scipy, sympy, xarray, jax) the import left
loaded, and ``python -X importtime``'s largest cumulative imports, so a regression names its
cause.  The machine's load average is printed before and after: times taken under load are
inflated, so read the ratios, and the absolute times only with the load beside them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HEAVY = ("torch", "scipy", "sympy", "xarray", "jax")
CASES = [
    # (label, code run with -c, baseline label)
    ("bare interpreter", "pass", None),
    ("import torch", "import torch", "bare interpreter"),
    ("import traindyn.probes", "import traindyn.probes", "import torch"),
    ("import traindyn.theory", "import traindyn.theory", "bare interpreter"),
    ("import traindyn.dynamics", "import traindyn.dynamics", "bare interpreter"),
    ("traindyn --help", None, "bare interpreter"),
]
TARGET_HELP_SECONDS = 0.5


def _command(code: str | None) -> list[str]:
    if code is None:
        return [sys.executable, "-m", "traindyn.dynamics.cli", "--help"]
    return [sys.executable, "-c", code]


def _best_wall(code: str | None, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(_command(code), check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def _heavy_loaded(code: str | None) -> list[str]:
    body = code if code is not None else (
        "import sys, contextlib, io\nsys.argv = ['traindyn', '--help']\n"
        "from dynamics.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main()\n    except SystemExit:\n        pass")
    probe = f"{body}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()
    return [m for m in (out[-1] if out else "").split(",") if m]


def _largest_imports(code: str | None, count: int = 3) -> list[tuple[float, str]]:
    """The top-level imports with the largest cumulative time (seconds), from -X importtime."""
    cmd = _command(code)
    cmd.insert(1, "-Ximporttime")
    err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name.startswith("  "):  # top level only
            rows.append((int(cumulative) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:count]


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # pragma: no cover - no load average on this platform
        return "load average unavailable"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case; best is kept")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (a smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.repeat = 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cores} usable cores, python {sys.version.split()[0]}; {_load()}")
    print(f"best of {args.repeat} fresh interpreters per case\n")
    times: dict[str, float] = {}
    print(f"{'case':<18} {'best [s]':>9} {'ratio':>8}  {'vs':<17} heavy modules loaded; "
          f"largest imports")
    for label, code, baseline in CASES:
        times[label] = _best_wall(code, args.repeat)
        ratio = "" if baseline is None else f"{times[label] / times[baseline]:.2f}×"
        heavy = _heavy_loaded(code) if code != "pass" else []
        largest = "" if code == "pass" else "; ".join(
            f"{name} {sec:.3f}s" for sec, name in _largest_imports(code))
        print(f"{label:<18} {times[label]:>9.3f} {ratio:>8}  {baseline or '':<17} "
              f"{','.join(heavy) or '-'}; {largest}")
    verdict = "meets" if times["traindyn --help"] <= TARGET_HELP_SECONDS else "misses"
    print(f"\ntraindyn --help: {times['traindyn --help']:.3f} s, {verdict} the target of "
          f"≤ {TARGET_HELP_SECONDS} s (set for an idle 2-core machine); {_load()}")


if __name__ == "__main__":
    main()
