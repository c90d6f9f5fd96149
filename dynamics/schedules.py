"""Evaluation schedules: plain callables ``step -> bool`` (cockpit's habit).

Any function of the step works as a schedule; these are the common ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

Schedule = Callable[[int], bool]

__all__ = [
    "Schedule",
    "any_of",
    "at_steps",
    "evaluation_steps",
    "every",
    "linear",
    "log_spaced",
    "log_steps",
    "piecewise",
]


def log_steps(total: int, count: int, start: int = 0) -> np.ndarray:
    """About ``count`` distinct integer steps from ``start`` to ``total``, log-spaced.

    Step 0 (when ``start == 0``) and ``total`` are always included; where log-spacing would
    repeat an integer the duplicates are dropped, so fewer than ``count`` may come back early
    in training.
    """
    if total < 1 or count < 2:
        raise ValueError("need total >= 1 and count >= 2")
    grid = np.geomspace(max(start, 1), total, count - (start == 0))
    steps = np.unique(np.rint(grid).astype(np.int64))
    if start == 0:
        steps = np.concatenate([[0], steps])
    return steps


class at_steps:  # noqa: N801 - a schedule is used like a function
    """True exactly at the given steps."""

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = frozenset(int(s) for s in steps)

    def __call__(self, step: int) -> bool:
        return int(step) in self.steps

    def __repr__(self) -> str:
        return f"at_steps({sorted(self.steps)})"


def linear(every_k: int, start: int = 0) -> Schedule:
    """True at ``start, start + k, start + 2k, …``."""
    if every_k < 1:
        raise ValueError("every_k must be >= 1")
    return lambda step: step >= start and (step - start) % every_k == 0


every = linear


def log_spaced(total: int, count: int = 30, start: int = 0) -> at_steps:
    """True at about ``count`` log-spaced steps up to ``total`` (see :func:`log_steps`)."""
    return at_steps(log_steps(total, count, start))


def piecewise(first_every: int, until: int, then_every: int) -> Schedule:
    """Every ``first_every`` steps until ``until``, then every ``then_every`` steps."""
    if first_every < 1 or then_every < 1:
        raise ValueError("first_every and then_every must be >= 1")
    return lambda step: (step % first_every == 0) if step < until else (step % then_every == 0)


class any_of:  # noqa: N801 - a schedule is used like a function
    """True when any of the given schedules is (e.g. log-spaced plus every 1000 steps)."""

    def __init__(self, *schedules: Schedule) -> None:
        if not schedules:
            raise ValueError("any_of needs at least one schedule")
        self.schedules = schedules

    def __call__(self, step: int) -> bool:
        return any(schedule(step) for schedule in self.schedules)


def evaluation_steps(schedule: Schedule, total: int, start: int = 0) -> np.ndarray:
    """The steps in ``start..total`` at which ``schedule`` is True: its cost in evaluations.

    The monitor's overhead is about ``len(evaluation_steps(...)) × (cost of one evaluation)``
    divided by the cost of ``total`` training steps.
    """
    return np.array([s for s in range(start, total + 1) if schedule(s)], dtype=np.int64)
