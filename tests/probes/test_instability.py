"""Tests of the Wortsman et al. (2023) instability proxies against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.probes.instability import (
    attention_logit_stats,
    find_attention_modules,
    log_partition,
    lr_sensitivity,
    max_attention_logit,
)
from traindyn.probes.registry import get_model_probe


def brute_max_logit(q: np.ndarray, k: np.ndarray, causal: bool) -> float:
    """max |q_i·k_j|/√d by explicit loops over (batch, head, i, j)."""
    best = 0.0
    b, h, t, d = q.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                for j in range(i + 1 if causal else t):
                    best = max(best, abs(float(np.dot(q[bi, hi, i], k[bi, hi, j]))) / math.sqrt(d))
    return best


@pytest.mark.parametrize("causal", [True, False])
def test_max_attention_logit_matches_loops(rng, causal):
    q = rng.normal(size=(2, 3, 6, 4))
    k = rng.normal(size=(2, 3, 6, 4))
    k[0, 1, 5] *= 50  # a huge key that only the last query may see under the causal mask
    assert abs(max_attention_logit(q, k, causal=causal) - brute_max_logit(q, k, causal)) < 1e-12


def test_max_attention_logit_refuses_mismatched_shapes_and_warns_on_nan():
    with pytest.raises(ValueError, match="same shape"):
        max_attention_logit(np.zeros((2, 3, 4)), np.zeros((2, 4, 4)))
    q = np.ones((1, 2, 3))
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert math.isnan(max_attention_logit(q * np.inf, q))


class ToyAttention(nn.Module):
    """Single-layer attention exposing q and k as (batch, tokens, heads·d) via identity modules."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.q_out, self.k_out = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_out(self.q(x)) + self.k_out(self.k(x))


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ToyAttention(), ToyAttention()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_hooked_attention_logits_equal_the_recomputed_ones():
    torch.manual_seed(3)
    net = ToyNet()
    x = torch.randn(3, 5, 8)
    assert find_attention_modules(net) == ["layers.0", "layers.1"]
    stats = attention_logit_stats(net, x, n_heads=2)
    assert stats["layers"] == ["layers.0", "layers.1"]
    # independent reference: recompute each layer's q and k from its input, split heads by hand
    h = x.double()
    expected = []
    for layer in net.layers:
        hq = h @ layer.q.weight.detach().double().T
        hk = h @ layer.k.weight.detach().double().T
        q = hq.numpy().reshape(3, 5, 2, 4).transpose(0, 2, 1, 3)
        k = hk.numpy().reshape(3, 5, 2, 4).transpose(0, 2, 1, 3)
        expected.append(brute_max_logit(q, k, causal=True))
        h = hq + hk
    np.testing.assert_allclose(stats["max_attention_logit"], expected, rtol=1e-5)
    # hooks are gone afterwards, and 3-D outputs need n_heads
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="n_heads"):
        attention_logit_stats(net, x)
    assert all(not m._forward_hooks for m in net.modules())


def test_models_without_query_key_modules_get_a_clear_error():
    with pytest.raises(KeyError, match="attention_modules="):
        attention_logit_stats(nn.Linear(3, 3), torch.zeros(1, 3))


def test_log_partition_is_stable_for_large_logits(rng):
    logits = rng.normal(size=(4, 7)) + 1000.0
    shifted = logits - 1000.0
    expected = 1000.0 + np.log(np.exp(shifted).sum(-1))
    np.testing.assert_allclose(log_partition(logits).numpy(), expected, rtol=1e-14)
    # log-probabilities already normalised have log Z = 0
    logp = np.log(np.full((2, 5), 0.2))
    np.testing.assert_allclose(log_partition(logp).numpy(), 0.0, atol=1e-14)


def test_lr_sensitivity_by_hand():
    # capped at L0 = 5: [3, 2.5, 5 (diverged), 5 (worse than init)]; L* = 2.5
    value = lr_sensitivity([3.0, 2.5, np.nan, 10.0], initial_loss=5.0)
    assert abs(value - np.mean([0.5, 0.0, 2.5, 2.5])) < 1e-15
    # a given L* (e.g. the best loss over all variants) shifts every term
    assert abs(lr_sensitivity([3.0, 2.5], 5.0, best_loss=2.0) - 0.75) < 1e-15
    # a flat sweep that reaches L* everywhere is perfectly insensitive
    assert lr_sensitivity([2.0, 2.0, 2.0], 5.0) == 0.0


def test_lr_sensitivity_of_an_all_diverged_sweep_is_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="diverged"):
        assert math.isnan(lr_sensitivity([np.nan, np.inf], 5.0))
    with pytest.raises(ValueError):
        lr_sensitivity([], 5.0)


def test_log_partition_model_probe_reports_drift_from_its_first_call():
    torch.manual_seed(0)
    model = nn.Linear(4, 6)
    probe = get_model_probe("log_partition").factory()
    x = torch.randn(10, 4)
    first = probe(model, x, None)
    assert first["log_z_drift"] == 0.0
    with torch.no_grad():
        model.bias += 2.0  # every logit +2 → log Z + 2 exactly
    second = probe(model, x, None)
    assert abs(second["log_z_drift"] - 2.0) < 1e-6
    assert abs(second["mean_log_z"] - first["mean_log_z"] - 2.0) < 1e-6
