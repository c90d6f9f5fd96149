"""The cost model behind ``empirical_ntk(method="auto")``: its choice on the shapes of
``benchmarks/ntk.py`` (checked against a table; the timings that justify the table are printed
by the benchmark, not asserted here) and its arithmetic against hand-worked FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch
from traindyn.probes import _ntk_cost as cost
from traindyn.probes import _ntk_structured as st
from traindyn.probes._ntk_common import requires_grad, select_parameters
from traindyn.probes._ntk_engines import auto_method

from benchmarks.ntk import cases

# shape name -> (choice on the CPU, choice on CUDA).  CPU column: the fastest explicit method
# measured by benchmarks/ntk.py on the 2-core VM (CPU time, one thread; on the transformer block
# structured and jacobian are within 10 % of each other, either way round between runs).  CUDA
# column: the model's choice with its CUDA constants, which have not been measured.
TABLE = {
    "MLP 64-512-512-10 (headline)": ("structured", "structured"),
    "MLP 64-512-512-10": ("structured", "structured"),
    "MLP 32-128x3-5": ("structured", "structured"),
    "MLP 16-256-1": ("structured", "jacobian"),
    "CNN 3x8x8, 16 channels, 10 outputs": ("structured", "jacobian"),
    "Transformer block: 8 tokens, d 32, 4 heads, ff 64, 10 outputs": ("structured", "structured"),
}


def _shape(model, x, output):
    chosen = select_parameters(model)
    with torch.enable_grad(), requires_grad(chosen.values()):
        plan, rec = st.plan_structured(model, x, chosen, output == "full", x.shape[0])
    return cost.describe(model, x, chosen, plan, rec, rec.f.shape[1])


def test_choice_on_every_benchmark_shape_matches_the_table():
    seen = set()
    for name, model, x, output, _, _ in cases():
        model.eval()
        cpu, cuda = TABLE[name]
        assert auto_method(model, x, output=output) == cpu, name
        s = _shape(model, x, output)
        n = x.shape[0]
        assert cost.choose(s, n, n, True, output, "cuda") == cuda, name
        seen.add(name)
    assert seen == set(TABLE)


def test_model_shape_counts_layers_parameters_and_flops_of_an_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    s = _shape(model, torch.randn(5, 4), "full")
    assert (s.k, s.P, s.P_fallback) == (3, 4 * 6 + 6 + 6 * 3 + 3, 0)
    # two layers, one token each, the bias as an extra input column
    assert [(L.kind, L.T, L.p, L.q) for L in s.layers] == [("linear", 1, 5, 6), ("linear", 1, 7, 3)]
    assert s.flops == 2 * (4 * 6 + 6 * 3)  # 2·inputs·outputs per layer (bias adds not counted)


def test_costs_equal_hand_worked_counts_and_pick_the_cheapest():
    cpu = cost.DEVICES["cpu"]
    s = cost.ModelShape(k=4, P=1000, flops=2000.0, ops=6, layers=(), P_fallback=1000)
    n = 10
    c = cost.costs(s, n, n, True, "full", "cpu")
    # jacobian: 3FNk + 2n²k²P + 2NkP flops, plus O vmapped dispatches
    jac = (3 * 2000 * 10 * 4 + 2 * 100 * 16 * 1000 + 2 * 10 * 4 * 1000) / cpu.rate
    assert c["jacobian"] == pytest.approx(jac + 6 * cpu.vmap_latency, rel=1e-12)
    # ntk_vp: columns in chunks of m = n // k = 2, i.e. 5 chunks
    vp = (3 * 2000 * 10 * 4 * 10 + 2 * 2000 * 10 * 4 * 2) / cpu.rate
    assert c["ntk_vp"] == pytest.approx(vp + 5 * 6 * 2 * cpu.vmap_latency, rel=1e-12)
    # without a structured layer, auto picks between the other two by these costs
    assert cost.choose(s, n, n, True, "full") == min(("jacobian", "ntk_vp"), key=c.get)
    # a full kernel with many outputs favours NTK-vector products (k² vs k in the
    # contraction), its trace favours the Jacobian: the crossover at k ≈ 3F/P
    wide = cost.ModelShape(k=64, P=10**6, flops=2e6, ops=6, P_fallback=10**6)
    assert cost.choose(wide, 32, 32, False, "full") == "ntk_vp"
    assert cost.choose(wide, 32, 32, False, "trace") == "jacobian"


def test_structured_layer_takes_the_cheaper_of_gram_and_materialised_forms():
    L = cost.Layer("linear", T=16, p=65, q=64)
    s = cost.ModelShape(k=2, P=65 * 64, flops=2.0 * 16 * 65 * 64, ops=4, layers=(L,))
    n, rate = 8, cost.DEVICES["cpu"].rate
    base = n * s.flops + 2 * s.flops * n * 2
    gram = 2 * n * n * 16**2 * (65 + 2 * 64)
    mat = 2 * n * 2 * 16 * 65 * 64 + 2 * n * n * 2 * 65 * 64
    got = cost.costs(s, n, n, True, "trace")["structured"]
    launch = (4 * 5 + 6) * cost.DEVICES["cpu"].latency
    assert got == pytest.approx((base + min(gram, mat)) / rate + launch, rel=1e-12)
    # the full kernel of a multi-token layer is always materialised (as the engine does)
    got_full = cost.costs(s, n, n, True, "full")["structured"]
    mat_full = 2 * n * 2 * 16 * 65 * 64 + 2 * n * n * 4 * 65 * 64
    assert got_full == pytest.approx((base + mat_full) / rate + launch, rel=1e-12)
    assert math.isfinite(got_full)
