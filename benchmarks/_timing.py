"""Timing and machine load shared by the benchmark scripts (imported as ``_timing``: a
script's own folder is first on ``sys.path`` when it runs as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """The shortest wall-clock time of ``repeat`` calls of ``fn``, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def load_average() -> str:
    """The machine's load (``/proc/loadavg`` where there is one: 1, 5 and 15 min averages,
    runnable/total tasks), printed beside every timing so a reader can judge it."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
