"""Choosing torch's thread count from the free cores (dynamics._threads)."""

from __future__ import annotations

import pytest
import torch
from traindyn.dynamics._threads import ENV_VAR, apply_threads, busy_cores, choose_threads


@pytest.mark.parametrize(("cores", "busy", "processes", "expected"), [
    (2, 0.0, 1, 2),      # idle 2-core machine: both cores
    (2, 0.3, 1, 2),      # background noise rounds away
    (2, 1.0, 1, 1),      # one other busy process: the one free core
    (2, 0.6, 1, 1),      # 1.4 free cores round to 1
    (2, 5.4, 1, 1),      # overloaded: never fewer than one thread
    (16, 3.0, 1, 13),
    (16, 0.0, 4, 4),     # four worker processes share sixteen free cores
    (16, 2.2, 4, 3),     # 14 free cores / 4 processes
    (2, 0.0, 3, 1),      # more processes than cores: one each
])
def test_threads_are_the_free_cores_shared_among_our_processes(cores, busy, processes,
                                                               expected):
    got = choose_threads(processes=processes, environ={}, cores=cores, busy=busy)
    assert got == expected


def test_explicit_argument_beats_environment_beats_automatic():
    env = {ENV_VAR: "3"}
    assert choose_threads(environ=env, cores=2, busy=0.0) == 3
    assert choose_threads(5, environ=env, cores=2, busy=0.0) == 5
    assert choose_threads(environ={ENV_VAR: "auto"}, cores=8, busy=1.0) == 7
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match=ENV_VAR):
            choose_threads(environ={ENV_VAR: bad}, cores=2, busy=0.0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            choose_threads(bad)
    with pytest.raises(ValueError, match="processes"):
        choose_threads(processes=0, environ={}, cores=2, busy=0.0)
    with pytest.raises(ValueError, match="busy"):
        choose_threads(environ={}, cores=2, busy=float("nan"))


def test_busy_cores_reads_load_average_and_runnable_tasks():
    # idle: load 0.05, only this process runnable
    assert busy_cores(["0.05 0.10 0.20 1/180 99"] * 3) == pytest.approx(0.05)
    # a busy process started seconds ago: the load average has not caught up (0.15), but it
    # is runnable now (2 runnable = it + us)
    assert busy_cores(["0.15 0.05 0.01 2/181 99"] * 5) == pytest.approx(1.0)
    # one momentary blip among five readings does not count (median)
    blip = ["0.05 0.1 0.1 1/180 9"] * 4 + ["0.05 0.1 0.1 3/180 9"]
    assert busy_cores(blip) == pytest.approx(0.05)
    # a long-running load shows in the 1-minute average even when it sleeps at the instant
    assert busy_cores(["1.93 1.5 1.2 1/180 9"]) == pytest.approx(1.93)
    with pytest.raises(ValueError, match="loadavg"):
        busy_cores(["garbage"])
    # on this machine: a non-negative number, and a choice within [1, cores]
    assert busy_cores() >= 0


def test_apply_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
        chosen = apply_threads()
        assert torch.get_num_threads() == chosen >= 1
    finally:
        torch.set_num_threads(before)
