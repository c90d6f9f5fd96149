"""Where and how the probes' symmetric eigensolves run: batched across layers, small ones on the
CPU when that is faster (the GPU-first evaluation path).

Every spectral probe ends in ``torch.linalg.eigvalsh`` of a float64 ``d × d`` (or ``n × n``)
matrix.  Two rules, both exact (they change where a solve runs, never its precision):

* **Batching.**  :func:`batched_eigvalsh` solves matrices of the same shape, dtype and device in
  one call of ``torch.linalg.eigvalsh`` on the stacked batch (one kernel launch on a GPU instead
  of one per layer).  On the CPU torch runs the same LAPACK routine per matrix, so the values are
  bit-identical to separate solves (tested).
* **Placement.**  A CUDA solve of a small matrix costs more in launches and synchronisation than
  the arithmetic; below a *crossover* dimension the matrix is copied to the host, solved by
  LAPACK on one thread (:class:`lapack_single_thread`) and the eigenvalues copied back.  The
  crossover is, in order of precedence: the ``crossover=`` argument, the environment variable
  ``TRAINDYN_EIGH_DEVICE_CROSSOVER`` (an integer ``d``; ``0`` keeps every solve on the device),
  or a measurement made once per process and device (:func:`measure_timings` →
  :func:`decide_crossover`; a few ms).  On a CPU-only machine nothing moves.

This is traindyn's engineering, not a published method; the timings that motivate it are in
``benchmarks/eigvalsh_crossover.py`` (GPU figures: measured only where a GPU is available).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "CROSSOVER_ENV",
    "batched_eigvalsh",
    "crossover",
    "decide_crossover",
    "eigvalsh",
    "lapack_single_thread",
    "measure_timings",
    "solve_device",
]

CROSSOVER_ENV = "TRAINDYN_EIGH_DEVICE_CROSSOVER"
"""Environment variable overriding the measured crossover dimension (an integer ``d``)."""

MEASURE_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
"""Dimensions timed by :func:`measure_timings`."""

_measured: dict[str, int] = {}
"""Crossover per device (``"cuda:0"`` …), measured once per process."""


class lapack_single_thread:  # noqa: N801 - a context manager used like a function
    """Run CPU eigensolvers and SVDs on one intra-op thread; restore the count afterwards.

    LAPACK's symmetric eigensolver parallelises poorly at the ``d × d`` sizes of probe
    statistics, and on a busy machine OpenMP's spinning threads can make a 2-thread solve tens
    of times slower than a 1-thread one; one thread also makes results independent of the
    thread count (the last bits of LAPACK eigenvalues change with it).  No effect on CUDA.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.active = device is None or device.type == "cpu"
        self.saved: int | None = None

    def __enter__(self) -> None:
        if self.active and torch.get_num_threads() != 1:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)
            self.saved = None


def decide_crossover(timings: Mapping[int, tuple[float, float]]) -> int:
    """The crossover dimension from timings ``{d: (seconds on the device, seconds on the CPU
    including the copies)}``: the smallest measured ``d`` from which the device is at least as
    fast at every larger measured ``d``.  Solves with dimension below it go to the CPU.

    If the device is never faster, the largest measured ``d`` plus one (beyond what was
    measured the device is assumed to win, as the CPU's ``O(d³)`` cost grows faster); if it is
    always faster, ``0``.
    """
    if not timings:
        raise ValueError("timings is empty: need {d: (device seconds, cpu seconds)}")
    sizes = sorted(timings)
    for d in sizes:
        t_dev, t_cpu = timings[d]
        if not (t_dev >= 0 and t_cpu >= 0):
            raise ValueError(f"timings must be non-negative seconds; got {timings[d]} at d={d}")
    cross = sizes[-1] + 1
    for d in reversed(sizes):
        t_dev, t_cpu = timings[d]
        if t_dev <= t_cpu:
            cross = d
        else:
            break
    return 0 if cross == sizes[0] else cross


def _median_seconds(fn: Callable[[], object], repeats: int,
                    timer: Callable[[], float]) -> float:
    fn()  # warm-up (kernel loading, workspace allocation)
    times = []
    for _ in range(repeats):
        start = timer()
        fn()
        times.append(timer() - start)
    return statistics.median(times)


def measure_timings(device: torch.device, sizes: Sequence[int] = MEASURE_SIZES,
                    repeats: int = 3, timer: Callable[[], float] = time.perf_counter
                    ) -> dict[int, tuple[float, float]]:
    """``{d: (device seconds, CPU seconds)}`` of ``eigvalsh`` of a float64 SPD ``d × d`` matrix
    on ``device`` and on one CPU thread (including the copies to and from the host)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for d in sizes:
        x = torch.randn(d + 8, d, generator=gen, dtype=torch.float64)
        matrix = (x.T @ x).to(device)

        def on_device(m=matrix) -> None:
            torch.linalg.eigvalsh(m)
            sync(device)

        def on_cpu(m=matrix) -> None:
            with lapack_single_thread():
                torch.linalg.eigvalsh(m.cpu()).to(device)
            sync(device)

        out[d] = (_median_seconds(on_device, repeats, timer),
                  _median_seconds(on_cpu, repeats, timer))
    return out


def crossover(device: torch.device | str, override: int | None = None,
              measure: Callable[[torch.device], Mapping[int, tuple[float, float]]] | None = None
              ) -> int:
    """Dimension below which a solve on ``device`` is moved to the CPU (``0``: never).

    ``override`` (an argument) beats ``TRAINDYN_EIGH_DEVICE_CROSSOVER`` (the environment), which
    beats a measurement — ``measure(device)`` (default :func:`measure_timings`), made once per
    process and device and cached.  Always ``0`` for a CPU device.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return 0
    if override is not None:
        if int(override) < 0:
            raise ValueError(f"crossover must be >= 0; got {override}")
        return int(override)
    env = os.environ.get(CROSSOVER_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{CROSSOVER_ENV} must be an integer dimension; got {env!r}") \
                from None
        if value < 0:
            raise ValueError(f"{CROSSOVER_ENV} must be >= 0; got {value}")
        return value
    key = str(device)
    if key not in _measured:
        _measured[key] = decide_crossover((measure or measure_timings)(device))
    return _measured[key]


def solve_device(d: int, device: torch.device, override: int | None = None,
                 measure: Callable[[torch.device], Mapping[int, tuple[float, float]]] | None
                 = None) -> torch.device:
    """Where a ``d × d`` solve of a matrix on ``device`` runs (the CPU below the crossover)."""
    device = torch.device(device)
    if device.type == "cpu":
        return device
    return torch.device("cpu") if d < crossover(device, override, measure) else device


def eigvalsh(matrix: torch.Tensor, override: int | None = None) -> torch.Tensor:
    """Ascending eigenvalues of a symmetric matrix (or a batch), on ``matrix``'s device, solved
    where :func:`solve_device` says (one CPU thread when on the CPU)."""
    where = solve_device(matrix.shape[-1], matrix.device, override)
    with lapack_single_thread(where):
        values = torch.linalg.eigvalsh(matrix.to(where))
    return values.to(matrix.device)


def batched_eigvalsh(matrices: Sequence[torch.Tensor], override: int | None = None
                     ) -> list[torch.Tensor]:
    """Ascending eigenvalues of each matrix; matrices of the same shape, dtype and device are
    solved together in one ``torch.linalg.eigvalsh`` call of the stacked batch."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = eigvalsh(matrices[idx[0]], override)
            continue
        values = eigvalsh(torch.stack([matrices[i] for i in idx]), override)
        for j, i in enumerate(idx):
            out[i] = values[j]
    return out  # type: ignore[return-value]
