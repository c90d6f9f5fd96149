"""Geometric-phase detector (traindyn's own design) on planted trajectories."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.probes.phases import (
    PHASES,
    geometric_phases,
    phase_segments,
    smoothed_log_derivatives,
)

STEPS = np.concatenate([[0], np.unique(np.rint(np.geomspace(1, 10_000, 80)))])
X = np.log1p(STEPS)
KINKS = (np.log1p(100.0), np.log1p(1000.0))  # warm-up | entropy-seeking | compression-seeking


def planted(noise: float = 0.0, seed: int = 0):
    """ln RankMe falls, rises, falls; alpha rises, falls, rises (piecewise linear in ln step)."""
    k1, k2 = KINKS
    u = np.where(X < k1, 5.0 - 0.5 * X, np.where(X < k2, 5 - 0.5 * k1 + 0.4 * (X - k1),
                                                  5 - 0.5 * k1 + 0.4 * (k2 - k1) - 0.3 * (X - k2)))
    a = np.where(X < k1, 0.5 + 0.1 * X, np.where(X < k2, 0.5 + 0.1 * k1 - 0.15 * (X - k1),
                                                  0.5 + 0.1 * k1 - 0.15 * (k2 - k1)
                                                  + 0.1 * (X - k2)))
    rng = np.random.default_rng(seed)
    return np.exp(u + noise * rng.normal(size=X.size)), a + noise * rng.normal(size=X.size)


def expected(margin: float):
    """Planted labels at checkpoints farther than ``margin`` (in ln step) from a kink."""
    k1, k2 = KINKS
    far = (np.abs(X - k1) > margin) & (np.abs(X - k2) > margin)
    want = np.where(X < k1, "warmup", np.where(X < k2, "entropy_seeking", "compression_seeking"))
    return far, want


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_planted_three_phases_are_recovered_away_from_the_kinks(noise):
    rankme, alpha = planted(noise)
    labels = geometric_phases(STEPS, rankme, alpha)
    far, want = expected(margin=1.0)
    assert far.sum() > 25
    np.testing.assert_array_equal(labels[far], want[far])
    assert set(labels) <= set(PHASES)
    segments = [s[2] for s in phase_segments(STEPS, labels) if s[2] != "undetermined"]
    assert segments == ["warmup", "entropy_seeking", "compression_seeking"]


def test_labels_do_not_depend_on_units_of_rankme():
    rankme, alpha = planted(0.01)
    np.testing.assert_array_equal(geometric_phases(STEPS, rankme, alpha),
                                  geometric_phases(STEPS, 37.0 * rankme, alpha))


def test_agreeing_signs_and_flat_noise_are_undetermined():
    rng = np.random.default_rng(3)
    both_up = geometric_phases(STEPS, np.exp(0.2 * X), 0.1 * X + 1)
    assert both_up[0] == "undetermined" and set(both_up) == {"undetermined"}
    flat = geometric_phases(STEPS, 50 * np.exp(1e-4 * rng.normal(size=X.size)),
                            1 + 1e-4 * rng.normal(size=X.size))
    assert set(flat) == {"undetermined"}


def test_known_warmup_end_overrides_detection():
    rankme, alpha = planted()
    labels = geometric_phases(STEPS, rankme, alpha, warmup_end=10)
    assert set(labels[STEPS < 10]) == {"warmup"}
    assert "warmup" not in set(labels[STEPS >= 10])


def test_local_linear_derivative_is_exact_on_lines_and_matches_a_parabola():
    np.testing.assert_allclose(smoothed_log_derivatives(STEPS, 3.0 * X - 2), 3.0, rtol=1e-10)
    # For y = x², a symmetric local-linear window gives 2x exactly in the interior where the
    # weights are symmetric; check the middle checkpoint on a uniform grid.
    steps = np.expm1(np.linspace(0, 8, 81))
    x = np.log1p(steps)
    d = smoothed_log_derivatives(steps, x**2)
    assert d[40] == pytest.approx(2 * x[40], rel=1e-9)


def test_bad_input():
    rankme, alpha = planted()
    with pytest.raises(ValueError, match="same length"):
        geometric_phases(STEPS, rankme[:-1], alpha)
    with pytest.raises(ValueError, match="strictly increasing"):
        geometric_phases(STEPS[::-1], rankme, alpha)
    with pytest.raises(ValueError, match="at least 3"):
        geometric_phases(STEPS[:2], rankme[:2], alpha[:2])
    rankme = rankme.copy()
    rankme[30] = np.nan
    with pytest.warns(RuntimeWarning, match="undetermined"):
        labels = geometric_phases(STEPS, rankme, alpha)
    assert labels[30] == "undetermined"
    far, want = expected(margin=1.0)
    far[30] = False
    np.testing.assert_array_equal(labels[far], want[far])
