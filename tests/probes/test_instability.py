"""Tests of the Wortsman et al. (2023) instability proxies against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.probes.evaluation import ProbePlan, ReferenceBook, evaluate
from traindyn.probes.instability import (
    attention_logit_stats,
    find_attention_modules,
    log_partition,
    lr_sensitivity,
    max_attention_logit,
)
from traindyn.probes.registry import get_probe


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


def test_log_partition_probe_reports_drift_from_the_first_evaluation():
    """The registered probe through the one evaluation path, with a reference book: log Z of
    logits shifted by +2 grows by exactly 2 (log Σ e^{y+2} = 2 + log Σ e^y)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 6)
    x = torch.randn(10, 4)
    plan = ProbePlan(["log_partition"])
    book = ReferenceBook(plan)
    first = evaluate(plan, model, [x], references=book, time=0.0).values
    with torch.no_grad():
        ref0 = float(torch.logsumexp(model(x).double(), -1).mean())
        model.bias += 2.0
    second = evaluate(plan, model, [x], references=book, time=1.0).values
    assert abs(first["mean_log_z"] - ref0) < 1e-5 and first["log_z_drift"] == 0.0
    assert abs(second["log_z_drift"] - 2.0) < 1e-5
    assert abs(second["mean_log_z"] - ref0 - 2.0) < 1e-5
    assert get_probe("log_partition").reference == ("first",)
    assert get_probe("log_partition").factory is None


ANALYZE_FACTORY = """
import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.q_out, self.k_out = nn.Identity(), nn.Identity()

    def forward(self, x):
        return torch.tanh(self.q_out(self.q(x)) + self.k_out(self.k(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(), Attention()])
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = x.reshape(x.shape[0], 8, 8)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def make():
    torch.manual_seed(0)
    return Net()
"""


def test_analyze_runs_the_instability_probes_on_a_checkpoint_folder(tmp_path):
    """``analyze`` accepts both instability probes; references: the maximum logit by loops
    over (batch, head, i, j) from q, k recomputed with float64 weights, and log Z by
    numpy's float64 log-sum-exp of the outputs."""
    from traindyn.dynamics.analyze import analyze
    from traindyn.dynamics.checkpoints import resolve_factory
    from traindyn.dynamics.probe_inputs import digits_inputs

    factory = tmp_path / "attn_factory.py"
    factory.write_text(ANALYZE_FACTORY)
    make = resolve_factory(f"{factory}:make")
    folder = tmp_path / "ckpts"
    folder.mkdir()
    states = {}
    for step in (0, 10):
        model = make()
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.mul_(1.0 + 0.1 * step * (i + 1) / 10)
        states[step] = model
        torch.save(model.state_dict(), folder / f"step{step}.pt")
    ds = analyze(folder, model=f"{factory}:make", layers=["blocks.0", "blocks.1"],
                 probe_data="digits", n_samples=6, batch_size=6,
                 probes=["rankme", "attention_logits", "log_partition"],
                 probe_kwargs={"attention_logits": {"n_heads": 2}}, progress=False)
    assert list(ds["status"].values) == ["ok", "ok"], ds["reason"].values
    x = digits_inputs()[:6].double()
    log_z = []
    for i, step in enumerate((0, 10)):
        model = states[step].double()
        h = x.reshape(6, 8, 8)
        expected = []
        for block in model.blocks:
            hq, hk = h @ block.q.weight.detach().T, h @ block.k.weight.detach().T
            q = hq.numpy().reshape(6, 8, 2, 4).transpose(0, 2, 1, 3)
            k = hk.numpy().reshape(6, 8, 2, 4).transpose(0, 2, 1, 3)
            expected.append(brute_max_logit(q, k, causal=True))
            h = torch.tanh(hq + hk)
        got = ds["max_attention_logit"].isel(step=i).values
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        logits = model.head(h.mean(1)).detach().numpy()
        top = logits.max(-1, keepdims=True)
        log_z.append(float((top[:, 0] + np.log(np.exp(logits - top).sum(-1))).mean()))
        assert abs(ds["mean_log_z"].values[i] - log_z[-1]) < 1e-5 * max(1, abs(log_z[-1]))
    assert list(ds["attention_module"].values) == ["blocks.0", "blocks.1"]
    assert ds["log_z_drift"].values[0] == 0.0
    assert abs(ds["log_z_drift"].values[1] - (log_z[1] - log_z[0])) < 1e-5
