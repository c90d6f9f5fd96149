"""Values computed on the device and read on the host once, after the whole evaluation.

On an accelerator every read of a tensor's value by Python (``float(t)``, ``bool(t)``,
``t.item()``, an ``if`` on a tensor) waits for the device queue to drain: a *host
synchronisation*.  A probe evaluation that reads each metric as it computes it waits a dozen
times per layer, and the device sits idle between the tiny kernels that follow each wait.

A :class:`Pending` keeps what a probe computed as device tensors, together with a host-side
``finish`` that turns their values into the probe's result — and decides, from flags computed
on the device too, whether a value is NaN and which warning says why.  :func:`fetch` moves the
tensors of many pendings (every layer, every probe of an evaluation) to the host in **one**
device-to-host copy per device; :func:`finish_all` then runs the ``finish`` functions in order.
The streaming accumulators of :mod:`probes.spectral` and :mod:`probes.collapse`, weight spectra
(:mod:`probes.weights`), the CKA reference states (:mod:`probes.similarity`) and the invariance
and Lie-derivative scores (:mod:`probes.invariance`) answer with pendings;
:class:`probes.evaluation.ProbePlan` resolves all of one evaluation's at once (``layer_values``,
``parameter_values``, ``model_values``).  The NTK probe copies its kernel to the host once (its
state lives there) and computes its summaries there.

What still synchronises inside an evaluation, and why: an eigensolve on CUDA (torch checks
LAPACK's ``info`` on the host after ``torch.linalg.eigvalsh``), or the copy of a small matrix
to the host when :mod:`probes._solve` places its solve there; both happen once per batch of
same-shaped matrices (:func:`probes._solve.batched_eigvalsh`), not once per layer and metric.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DeviceFlag", "Pending", "answer_pendings", "fetch", "finish_all", "first_failure",
           "flag", "gather", "read_answer", "resolve_answer", "scalar"]

Flag = torch.Tensor | bool
"""A condition: a 0-d boolean tensor on the device, or a Python bool known on the host."""


@dataclass
class Pending:
    """A result whose numbers are still on the device.

    Parameters
    ----------
    tensors : mapping str → tensor
        What ``finish`` reads (any shape; booleans and integers arrive as float64 — exact for
        counts below 2⁵³).
    finish : callable ``(host) -> result``
        Runs on the host with ``host[name]`` a float64 numpy array of each tensor's shape (a
        0-d array for a scalar); may warn; returns the probe's result.
    """

    tensors: Mapping[str, torch.Tensor]
    finish: Callable[[dict[str, np.ndarray]], Any]

    def then(self, fn: Callable[[Any], Any]) -> Pending:
        """The same tensors, finished by ``fn(self.finish(host))``."""
        return Pending(self.tensors, lambda host: fn(self.finish(host)))

    def result(self) -> Any:
        """Fetch this pending alone and finish it (one host synchronisation)."""
        return self.finish(fetch([self])[0])


def flag(condition: Flag) -> torch.Tensor | bool:
    """``condition`` as a fetchable 0-d tensor (a Python bool stays a bool)."""
    if isinstance(condition, torch.Tensor):
        return condition.reshape(())
    return bool(condition)


Failure = Callable[[dict[str, np.ndarray]], "str | None"]
"""A host function: the reason of the first check that failed, or ``None``."""


def first_failure(checks: Sequence[tuple[Flag, str]]) -> tuple[dict[str, torch.Tensor], Failure]:
    """The device flags of ``checks`` — ``(condition, reason)`` pairs in order of precedence —
    to fetch (keys ``check<i>``), and a host function that gives the reason of the first
    condition that holds, or ``None`` when none does."""
    tensors: dict[str, torch.Tensor] = {}
    order: list[tuple[str | bool, str]] = []
    for i, (condition, reason) in enumerate(checks):
        f = flag(condition)
        if isinstance(f, torch.Tensor):
            tensors[f"check{i}"] = f
            order.append((f"check{i}", reason))
        else:
            order.append((f, reason))

    def failure(host: dict[str, np.ndarray]) -> str | None:
        for key, reason in order:
            if key if isinstance(key, bool) else bool(host[key]):
                return reason
        return None

    return tensors, failure


def scalar(value: torch.Tensor, checks: Sequence[tuple[Flag, str]] = ()) -> Pending:
    """A number with the conditions under which it is NaN.

    ``checks`` are ``(condition, reason)`` pairs in order of precedence: the first condition
    that holds makes the result NaN with ``RuntimeWarning(reason)``; otherwise the result is
    ``float(value)``."""
    tensors, failure = first_failure(checks)
    tensors["value"] = value.reshape(())

    def finish(host: dict[str, np.ndarray]) -> float:
        reason = failure(host)
        if reason is not None:
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
            return float("nan")
        return float(host["value"])

    return Pending(tensors, finish)


class DeviceFlag:
    """A condition or-ed together on the device, batch after batch ("a NaN was seen"), and read
    only when asked: marking it never makes the host wait."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def mark(self, condition: torch.Tensor | DeviceFlag) -> None:
        """Or in a 0-d boolean tensor (or another flag, e.g. of a merged accumulator)."""
        if isinstance(condition, DeviceFlag):
            if condition.value is None:
                return
            condition = condition.value
        if self.value is None:
            self.value = condition
            return
        if condition.device != self.value.device:  # merged from another device
            condition = condition.to(self.value.device)
        self.value = self.value | condition

    def tensor(self, device: torch.device | None) -> torch.Tensor:
        """The flag as a 0-d boolean tensor (``False`` on ``device`` when never marked)."""
        if self.value is None:
            return torch.zeros((), dtype=torch.bool, device=device)
        return self.value

    def __bool__(self) -> bool:
        """Read the flag (one host wait)."""
        return self.value is not None and bool(self.value)


def fetch(pendings: Iterable[Pending]) -> list[dict[str, np.ndarray]]:
    """The tensors of every pending as host float64 arrays, in **one** copy per device.

    All tensors on one device are flattened, cast to float64 and concatenated on that device;
    the single buffer is copied to the host and split again.  Returns, per pending, the dict
    its ``finish`` expects."""
    pendings = list(pendings)
    by_device: dict[torch.device, dict[int, torch.Tensor]] = {}  # tensors by identity
    wanted: list[tuple[int, str, torch.device, int]] = []
    for i, p in enumerate(pendings):
        for name, t in p.tensors.items():
            t = torch.as_tensor(t)
            by_device.setdefault(t.device, {}).setdefault(id(t), t)
            wanted.append((i, name, t.device, id(t)))
    out: list[dict[str, np.ndarray]] = [{} for _ in pendings]
    arrays: dict[tuple[torch.device, int], np.ndarray] = {}
    for device, tensors in by_device.items():
        # a tensor that several pendings read (two reference probes' state of one layer) is
        # copied once
        flat = [t.detach().reshape(-1).to(torch.float64) for t in tensors.values()]
        buffer = torch.cat(flat) if len(flat) > 1 else flat[0]
        # the one device → host copy (and wait) of this device; a copy on the CPU too, so that
        # later in-place updates of an accumulator cannot change what was fetched
        host = np.array(buffer.to("cpu").numpy(), copy=True)
        start = 0
        for (key, t), f in zip(tensors.items(), flat, strict=True):
            size = f.numel()
            arrays[device, key] = host[start:start + size].reshape(tuple(t.shape))
            start += size
    for i, name, device, key in wanted:
        out[i][name] = arrays[device, key]
    return out


def gather(parts: Sequence[Pending], build: Callable[[list], Any]) -> Pending:
    """One :class:`Pending` of several: its tensors are theirs (keys prefixed by position);
    ``finish`` finishes each in order (their warnings in that order) and returns
    ``build([results])``."""
    parts = list(parts)
    tensors = {f"{i}:{k}": t for i, p in enumerate(parts) for k, t in p.tensors.items()}

    def finish(host: dict[str, np.ndarray]) -> Any:
        return build([p.finish({k: host[f"{i}:{k}"] for k in p.tensors})
                      for i, p in enumerate(parts)])

    return Pending(tensors, finish)


def answer_pendings(answer: Any) -> list[Pending]:
    """The pending parts of a probe's answer: the answer itself, or the pending members of a
    ``(values, state)`` pair (a reference probe may leave its values, its state or both on
    the device)."""
    if isinstance(answer, Pending):
        return [answer]
    if isinstance(answer, tuple):
        return [r for r in answer if isinstance(r, Pending)]
    return []


def resolve_answer(answer: Any, hosts: Iterator[dict[str, np.ndarray]]) -> Any:
    """``answer`` with each of its :func:`answer_pendings` finished on its fetched host
    values, taken from ``hosts`` in the same order."""
    if isinstance(answer, Pending):
        return answer.finish(next(hosts))
    if isinstance(answer, tuple) and any(isinstance(r, Pending) for r in answer):
        return tuple(r.finish(next(hosts)) if isinstance(r, Pending) else r for r in answer)
    return answer


def read_answer(answer: Any) -> Any:
    """``answer`` with its pending parts read now (one copy per device)."""
    return resolve_answer(answer, iter(fetch(answer_pendings(answer))))


def finish_all(pendings: Sequence[Pending]) -> list[Any]:
    """:func:`fetch` then each ``finish``, in order (their warnings are raised in that order)."""
    return [p.finish(h) for p, h in zip(pendings, fetch(pendings), strict=True)]
