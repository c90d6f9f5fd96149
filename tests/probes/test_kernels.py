"""Kernel alignment and kernel motion against hand-computed values and their invariances."""

from __future__ import annotations

import numpy as np
import pytest
from traindyn.probes.kernels import (
    center_kernel,
    centered_alignment,
    cumulative_power,
    kernel_alignment,
    kernel_distance,
    kernel_velocity,
    lazy_rich_summary,
    ntk_effective_rank,
    relative_kernel_change,
    targets_matrix,
)

from tests.helpers import assert_rel


def spd(rng, n=6):
    A = rng.normal(size=(n, n))
    return A @ A.T + 0.1 * np.eye(n)


def test_alignment_hand_worked_2x2():
    K = np.array([[2.0, 1.0], [1.0, 2.0]])
    y = np.array([1.0, -1.0])
    # yᵀKy = 2 - 1 - 1 + 2 = 2 ; ‖K‖_F = √10 ; ‖y‖² = 2
    assert_rel(kernel_alignment(K, y), 2 / (np.sqrt(10) * 2), 1e-14, "A")
    # centring: H K H = [[.5,-.5],[-.5,.5]], (yyᵀ)_c = yyᵀ (y has mean 0) → cosine 1
    assert_rel(centered_alignment(K, y), 1.0, 1e-14, "rho")


def test_alignment_against_numpy_formula_and_invariances(rng):
    K, y = spd(rng), rng.normal(size=6)
    a = y @ K @ y / (np.linalg.norm(K) * (y @ y))
    assert_rel(kernel_alignment(K, y), a, 1e-12, "alignment")
    assert_rel(kernel_alignment(3.7 * K, -2 * y), a, 1e-12, "scale invariance")
    H = np.eye(6) - 1 / 6
    Kc, Yc = H @ K @ H, H @ np.outer(y, y) @ H
    rho = (Kc * Yc).sum() / (np.linalg.norm(Kc) * np.linalg.norm(Yc))
    assert_rel(centered_alignment(K, y), rho, 1e-12, "centred")
    # centred alignment ignores constants added to K or to y, and scaling
    assert_rel(centered_alignment(5 * K + 2.0, y + 3.0), rho, 1e-10, "centring invariance")
    assert_rel(center_kernel(K).numpy(), Kc, 1e-10, "HKH")


def test_labels_are_one_hot_and_full_kernel_is_flattened(rng):
    K, labels = spd(rng), np.array([0, 1, 1, 0, 2, 2])
    Y = np.eye(3)[labels]
    ref = np.trace(Y.T @ K @ Y) / (np.linalg.norm(K) * np.linalg.norm(Y @ Y.T))
    assert_rel(kernel_alignment(K, labels), ref, 1e-12, "labels")
    assert targets_matrix(labels).shape == (6, 3)
    # a full kernel (n, n, k, k) = K ⊗ I_k aligned with Y equals the flattened formula
    Kfull = np.einsum("ij,ab->ijab", K, np.eye(3))
    flat = np.kron(K, np.eye(3))
    v = Y.reshape(-1)
    assert_rel(kernel_alignment(Kfull, Y), v @ flat @ v / (np.linalg.norm(flat) * (v @ v)),
               1e-12, "full kernel")
    with pytest.raises(ValueError, match="targets"):
        kernel_alignment(K, np.ones(5))
    with pytest.raises(ValueError, match="square kernel"):
        kernel_alignment(np.ones((3, 4)), np.ones(3))


def test_cumulative_power_hand_worked_and_ends_at_one(rng):
    K = np.diag([3.0, 2.0, 1.0])
    y = np.array([1.0, 2.0, 2.0])  # power 1, 4, 4 of 9 along e1, e2, e3
    assert_rel(cumulative_power(K, y), [1 / 9, 5 / 9, 1.0], 1e-12, "C(k)")
    assert_rel(cumulative_power(K, y, k=2), 5 / 9, 1e-12, "C(2)")
    C = cumulative_power(spd(rng), rng.normal(size=6))
    assert np.all(np.diff(C) >= -1e-12) and abs(C[-1] - 1) < 1e-12
    with pytest.raises(ValueError, match="k must be"):
        cumulative_power(K, y, k=4)


def test_kernel_distance_velocity_and_relative_change(rng):
    K1, K2 = spd(rng), spd(rng)
    cos = (K1 * K2).sum() / (np.linalg.norm(K1) * np.linalg.norm(K2))
    assert_rel(kernel_distance(K1, K2), 1 - cos, 1e-12, "S")
    assert abs(kernel_distance(K1, 4 * K1)) < 1e-12
    assert_rel(kernel_velocity(K1, K2, 0.5), 2 * (1 - cos), 1e-12, "velocity")
    assert_rel(relative_kernel_change(K2, K1),
               np.linalg.norm(K2 - K1) / np.linalg.norm(K1), 1e-12, "relative change")
    with pytest.raises(ValueError, match="dt"):
        kernel_velocity(K1, K2, 0.0)


def test_effective_rank_of_planted_spectra():
    assert_rel(ntk_effective_rank(np.diag([2.0, 2, 2, 0])), 3.0, 1e-12, "entropy, 3 equal")
    lam = np.array([4.0, 1.0])
    p = lam / lam.sum()
    assert_rel(ntk_effective_rank(np.diag(lam)), np.exp(-(p * np.log(p)).sum()), 1e-12, "erank")
    assert_rel(ntk_effective_rank(np.diag(lam), "participation"), 25 / 17, 1e-12, "PR")


def test_degenerate_inputs_give_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="zero"):
        assert np.isnan(kernel_alignment(np.zeros((3, 3)), np.ones(3)))
    with pytest.warns(RuntimeWarning, match="zero"):
        assert np.isnan(relative_kernel_change(np.eye(2), np.zeros((2, 2))))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert np.isnan(ntk_effective_rank(np.full((2, 2), np.nan)))


def test_lazy_rich_summary_dataset(rng):
    K0 = spd(rng)
    y = rng.normal(size=6)
    Ks = [K0, K0 + 0.1 * spd(rng), K0 + 0.3 * spd(rng)]
    ds = lazy_rich_summary(Ks, y, steps=[0, 10, 30], time=[0.0, 1.0, 3.0])
    assert ds.sizes["step"] == 3 and "time" in ds.coords and ds.attrs["source"]
    assert_rel(ds.ntk_relative_change.values[2], relative_kernel_change(Ks[2], K0), 1e-12, "rc")
    assert_rel(ds.ntk_velocity.values[2], kernel_distance(Ks[1], Ks[2]) / 2.0, 1e-12, "v")
    assert np.isnan(ds.ntk_velocity.values[0])
    assert_rel(float(ds.ntk_alignment_gain), centered_alignment(Ks[2], y)
               - centered_alignment(K0, y), 1e-12, "gain")
    for var in ds.data_vars.values():
        assert {"long_name", "units"} <= set(var.attrs)
