"""Tests of evaluation schedules (plain ``step -> bool`` callables)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.dynamics.monitor import Monitor
from traindyn.dynamics.schedules import (
    any_of,
    at_steps,
    evaluation_steps,
    every,
    linear,
    log_spaced,
    log_steps,
    piecewise,
)


def test_log_steps_are_log_spaced_and_include_both_ends():
    steps = log_steps(5000, 40)
    assert steps[0] == 0 and steps[-1] == 5000
    assert np.all(np.diff(steps) > 0)
    assert 30 <= len(steps) <= 40          # duplicates among the first integers are dropped
    # in the range where rounding no longer matters, consecutive ratios are (5000)^(1/38)
    late = steps[steps >= 100]
    ratio = 5000 ** (1 / 38)
    np.testing.assert_allclose(late[1:] / late[:-1], ratio, rtol=0.03)


def test_log_steps_from_a_later_start_and_bad_arguments():
    steps = log_steps(1000, 4, start=10)
    np.testing.assert_array_equal(steps, [10, 46, 215, 1000])   # 10·(100)^(k/3), rounded
    with pytest.raises(ValueError):
        log_steps(0, 10)
    with pytest.raises(ValueError):
        log_steps(100, 1)


def test_linear_every_and_at_steps_by_hand():
    assert list(evaluation_steps(linear(4), 13)) == [0, 4, 8, 12]
    assert list(evaluation_steps(every(5, start=3), 20)) == [3, 8, 13, 18]
    assert list(evaluation_steps(at_steps([7, 2, 2]), 10)) == [2, 7]
    assert list(evaluation_steps(log_spaced(100, 5), 100)) == list(log_steps(100, 5))
    with pytest.raises(ValueError):
        linear(0)


def test_piecewise_dense_then_sparse():
    # every 10 until 50, then every 100: 0..40 by 10, then 100, 200, 300
    assert list(evaluation_steps(piecewise(10, 50, 100), 300)) == [0, 10, 20, 30, 40, 100, 200,
                                                                    300]
    with pytest.raises(ValueError):
        piecewise(0, 10, 5)


def test_any_of_is_the_union():
    sched = any_of(at_steps([3]), linear(10))
    assert list(evaluation_steps(sched, 25)) == [0, 3, 10, 20]
    with pytest.raises(ValueError):
        any_of()


def test_any_user_function_is_a_schedule():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    monitor = Monitor(model, probes=["rankme"], layers=["1"], probe_data=torch.randn(8, 3),
                      schedule=lambda step: step in (1, 4, 9))   # squares
    evaluated = [s for s in range(12) if monitor.step(s)]
    assert evaluated == [1, 4, 9]
    assert list(monitor.to_dataset()["step"].values) == [1, 4, 9]
