"""Empirical NTK of torch modules vs a float64 brute-force Jacobian (one backward per output)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.probes import _ntk_structured as st
from traindyn.probes.ntk import (
    batch_coupled_modules,
    conjugate_kernel,
    empirical_ntk,
    select_parameters,
)
from traindyn.probes.ntk_probe import NTKProbe
from traindyn.probes.registry import get_probe

from tests.helpers import assert_rel

METHODS = ["structured", "jacobian", "ntk_vp", "auto"]


def brute_ntk(model, x1, x2=None, params=None):
    """Θ[i, j, a, b] from explicit Jacobian rows: one backward per (sample, output) entry."""
    ps = list(model.parameters()) if params is None else params

    def jac(x):
        rows = []
        for i in range(x.shape[0]):
            f = model(x[i:i + 1]).reshape(-1)
            for a in range(f.shape[0]):
                g = torch.autograd.grad(f[a], ps, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                       for gi, p in zip(g, ps, strict=True)]))
        return torch.stack(rows).reshape(x.shape[0], -1, sum(p.numel() for p in ps))

    J1 = jac(x1)
    J2 = J1 if x2 is None else jac(x2)
    return torch.einsum("iap,jbp->ijab", J1, J2)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


class TiedMLP(nn.Module):
    """One hidden Linear applied twice (shared weights) plus a weight used directly."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3, bias=False)
        self.scale = nn.Parameter(torch.randn(6))  # elementwise: not a linear-layer weight

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h)) * self.scale
        return self.out(h)


class TransposedTie(nn.Module):
    """A weight used by F.linear and, transposed, by a matmul: structured must fall back."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return h @ self.enc.weight  # (n, 5)


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(inplace=True),
                        nn.Linear(6, 3))
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2),
                        nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))
    seq = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same"), nn.Tanh(), nn.Flatten(),
                        nn.Linear(18, 2))
    nobias = nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 1, bias=False))
    return {
        "mlp": (mlp, (5,)), "cnn": (cnn, (2, 7, 7)), "conv1d": (seq, (2, 6)),
        "nobias_one_output": (nobias, (5,)), "tied": (TiedMLP(), (4,)),
        "transposed_tie": (TransposedTie(), (5,)),
    }


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("method", METHODS)
def test_full_ntk_equals_brute_force_jacobian(name, method):
    model, shape = models()[name]
    model = model.double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    ref = brute_ntk(model, x)
    K = empirical_ntk(model, x, output="full", method=method)
    assert K.shape == ref.shape and K.dtype == torch.float64
    assert rel_err(K, ref) < 1e-6, f"{name}/{method}: {rel_err(K, ref):.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_cross_kernel_trace_and_mean_conventions(method):
    model, shape = models()["cnn"]
    model = model.double()
    x1 = torch.randn(3, *shape, dtype=torch.float64)
    x2 = torch.randn(5, *shape, dtype=torch.float64)
    ref = brute_ntk(model, x1, x2)
    tr = torch.einsum("ijaa->ij", ref)
    assert rel_err(empirical_ntk(model, x1, x2, method=method), tr) < 1e-6
    assert rel_err(empirical_ntk(model, x1, x2, method=method, output="mean"), tr / 3) < 1e-6


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntk_vp"])
@pytest.mark.parametrize("output", ["full", "trace"])
def test_chunked_equals_unchunked(method, output):
    model, shape = models()["tied"]
    model = model.double()
    x = torch.randn(7, *shape, dtype=torch.float64)
    whole = empirical_ntk(model, x, output=output, method=method)
    for chunk in (1, 3):
        assert rel_err(empirical_ntk(model, x, output=output, method=method, chunk_size=chunk),
                       whole) < 1e-12
    x2 = torch.randn(5, *shape, dtype=torch.float64)
    assert rel_err(empirical_ntk(model, x, x2, output=output, method=method, chunk_size=2),
                   empirical_ntk(model, x, x2, output=output, method=method)) < 1e-12


def test_parameter_subset_equals_brute_force_on_that_subset():
    model, shape = models()["mlp"]
    model = model.double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    sub = [model[2].weight, model[4].bias]
    ref = brute_ntk(model, x, params=sub)
    for method in METHODS:
        K = empirical_ntk(model, x, output="full", method=method, params=["2.weight", "4.bias"])
        assert rel_err(K, ref) < 1e-6, method
    # a module name selects all its parameters; kernels over disjoint subsets add up
    k_all = empirical_ntk(model, x)
    k_parts = sum(empirical_ntk(model, x, params=m) for m in ("0", "2", "4"))
    assert rel_err(k_parts, k_all) < 1e-12
    assert list(select_parameters(model, "*.bias")) == ["0.bias", "2.bias", "4.bias"]
    with pytest.raises(KeyError, match="available|parameters"):
        select_parameters(model, "nope")


def test_float32_close_to_float64():
    model, shape = models()["mlp"]
    x = torch.randn(6, *shape)
    ref = brute_ntk(model.double(), x.double())
    K = empirical_ntk(model.float(), x, output="full")
    assert K.dtype == torch.float32
    assert rel_err(K.double(), ref) < 1e-5


def test_batchnorm_in_train_mode_is_refused_or_computed_as_batch_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    assert batch_coupled_modules(model) == ["1"]
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        empirical_ntk(model, x)
    running = model[1].running_mean.clone()
    K = empirical_ntk(model, x, output="full", per_sample=False)
    assert torch.equal(model[1].running_mean, running), "running statistics must be restored"
    # reference: Jacobian of the whole batch map X -> f(X), which is not per-sample
    ps = list(model.parameters())
    f = model(x)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[i, a], ps, retain_graph=True)])
            for i in range(6) for a in range(2)]
    J = torch.stack(rows).reshape(6, 2, -1)
    assert rel_err(K, torch.einsum("iap,jbp->ijab", J, J)) < 1e-10
    model.eval()
    assert batch_coupled_modules(model) == []
    assert rel_err(empirical_ntk(model, x, output="full"), brute_ntk(model, x)) < 1e-6


def test_bad_arguments_raise_clear_errors():
    model, shape = models()["mlp"]
    x = torch.randn(3, *shape)
    with pytest.raises(ValueError, match="output"):
        empirical_ntk(model, x, output="diag")
    with pytest.raises(ValueError, match="unknown method"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="per_sample=False"):
        empirical_ntk(model, x, per_sample=False)


def test_numpy_input_and_gradients_untouched():
    model, shape = models()["mlp"]
    x = np.random.default_rng(0).normal(size=(4, *shape))
    for p in model.parameters():
        p.requires_grad_(False)
    K = empirical_ntk(model, x)  # float64 numpy input is cast to the model's float32
    assert K.shape == (4, 4) and K.dtype == torch.float32
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_conjugate_kernel_is_feature_gram():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    phi1, phi2 = torch.relu(model[0](x1)), torch.relu(model[0](x2))
    K = conjugate_kernel(model, x1, x2, layer="1")
    assert_rel(K.detach().numpy(), (phi1 @ phi2.T / 10).detach().numpy(), 1e-5, "CK")
    K11 = conjugate_kernel(model, x1, layer="1", normalize=False)
    assert_rel(K11.numpy(), (phi1 @ phi1.T).detach().numpy(), 1e-5, "CK raw")


def _probe_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    return model, x, y


def _expected(K, K0, Kp, y):
    """Hand-written alignment, relative change and Fort distance from brute-force kernels."""
    Y = torch.nn.functional.one_hot(y, 2).double()
    A = float((Y.T @ K @ Y).trace() / (K.norm() * (Y @ Y.T).norm()))
    change = float((K - K0).norm() / K0.norm())
    dist = float("nan") if Kp is None else 1 - float((Kp * K).sum() / (Kp.norm() * K.norm()))
    return A, change, dist


def test_ntk_model_probe_tracks_alignment_and_motion():
    model, x, y = _probe_setup()
    probe = NTKProbe()
    with torch.no_grad():  # the monitor calls probes under no_grad
        r0 = probe(model, x, y)
    # the stateful NTKProbe knows no times: every contract variable but the velocity
    assert set(r0) == set(get_probe("ntk").variables) - {"ntk_velocity"}
    assert r0["ntk_relative_change"] == 0 and np.isnan(r0["ntk_distance_previous"])
    K0 = torch.einsum("ijaa->ij", brute_ntk(model, x))
    assert_rel(r0["ntk_alignment"], _expected(K0, K0, None, y)[0], 1e-8, "alignment")
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    r1 = probe(model, x, y)
    K1 = torch.einsum("ijaa->ij", brute_ntk(model, x))
    _, change, dist = _expected(K1, K0, K0, y)
    assert_rel(r1["ntk_relative_change"], change, 1e-8, "change")
    assert_rel(r1["ntk_distance_previous"], dist, 1e-6, "distance")
    assert_rel(r1["ntk_trace_mean"], float(K1.diagonal().mean()), 1e-8, "trace mean")


def test_ntk_contract_probe_through_evaluate_and_resumed_from_saved_states():
    """The registered "ntk" probe under the one contract: probes.evaluation.evaluate with a
    ReferenceBook over three checkpoints gives the brute-force numbers; restarting after the
    second from its saved (numpy) states gives the identical third evaluation."""
    from traindyn.probes.evaluation import ProbePlan, ReferenceBook, evaluate

    spec = get_probe("ntk")
    assert spec.consumes == "model" and spec.reference == ("first", "previous")
    model, x, y = _probe_setup()
    plan = ProbePlan(["ntk"], [])
    book = ReferenceBook(plan)
    kernels, results, states = [], [], []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.0 + 0.3 * step)
        m = evaluate(plan, model, [x], targets=y, references=book)
        kernels.append(torch.einsum("ijaa->ij", brute_ntk(model, x)))
        results.append(m.values)
        states.append(m.states[("ntk", None)])
    assert set(results[0]) == set(spec.variables)
    assert np.isnan(results[0]["ntk_distance_previous"]) and results[0]["ntk_relative_change"] == 0
    for t in (1, 2):
        A, change, dist = _expected(kernels[t], kernels[0], kernels[t - 1], y)
        assert_rel(results[t]["ntk_alignment"], A, 1e-8, "alignment")
        assert_rel(results[t]["ntk_relative_change"], change, 1e-8, "change")
        assert_rel(results[t]["ntk_distance_previous"], dist, 1e-6, "distance")
    assert results[2]["ntk_alignment_gain"] == pytest.approx(
        results[2]["ntk_centered_alignment"] - results[0]["ntk_centered_alignment"], abs=1e-14)
    # resume: states as saved to disk (plain numpy), the third checkpoint evaluated again
    saved = [{k: np.array(v) for k, v in st.items()} for st in states]
    refs = {"first": saved[0], "previous": saved[1]}
    again = evaluate(plan, model, [x], targets=y, references=lambda key, kind: refs[kind])
    assert again.values.keys() == results[2].keys()
    np.testing.assert_array_equal([again.values[k] for k in sorted(again.values)],
                                  [results[2][k] for k in sorted(again.values)])  # NaN == NaN
    # the standalone NTKProbe gives the same numbers as the contract path
    model2, _, _ = _probe_setup()
    probe = NTKProbe()
    for step in range(3):
        with torch.no_grad():
            model2[0].weight.mul_(1.0 + 0.3 * step)
        direct = probe(model2, x, y)
    expected = {k: v for k, v in results[2].items() if k != "ntk_velocity"}
    assert direct == pytest.approx(expected, rel=1e-12, nan_ok=True)


def test_structured_plan_covers_linear_and_conv_weights_and_falls_back_for_the_rest():
    from traindyn.probes._ntk_structured import plan_structured as _plan_structured

    def plan_of(name):
        model, shape = models()[name]
        model = model.double()
        chosen = select_parameters(model)
        plan, _ = _plan_structured(model, torch.randn(3, *shape, dtype=torch.float64), chosen,
                                   True, 3)
        names = {id(p): n for n, p in chosen.items()}
        done = sorted(names[id(p)] for g in plan.groups for p in (g.weight, g.bias)
                      if p is not None)
        return done, sorted(plan.fallback)

    assert plan_of("tied") == (
        ["inp.bias", "inp.weight", "out.weight", "shared.bias", "shared.weight"], ["scale"])
    assert plan_of("cnn")[1] == []
    assert plan_of("transposed_tie") == ([], ["enc.bias", "enc.weight"])


def test_default_symmetric_panels_equal_one_block():
    model, shape = models()["mlp"]
    model = model.double()
    x = torch.randn(520, *shape, dtype=torch.float64)  # n >= 512: three panels by default
    for output in ("full", "trace"):
        assert rel_err(empirical_ntk(model, x, output=output),
                       empirical_ntk(model, x, output=output, chunk_size=520)) < 1e-12


# ----------------------------------------------------------------------------- transformers
class Block(nn.Module):
    """Linear embedding → ``nn.TransformerEncoderLayer`` → mean over tokens → linear head."""

    def __init__(self, norm_first: bool):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.layer(self.emb(x)).mean(1))


class CrossAttention(nn.Module):
    """Cross-attention with separate key/value inputs, a causal mask, padding and RMSNorm."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(3, 8)
        self.kv = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        q, kv = self.q(x), torch.tanh(self.kv(x))
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        pad = torch.zeros(x.shape[0], T, dtype=torch.bool)
        pad[:, -1] = True
        h, _ = self.attn(q, kv, kv, attn_mask=causal, key_padding_mask=pad)
        return self.head(self.norm(h)[:, 0] + h[:, 1])


class SDPA(nn.Module):
    """Attention written with ``F.scaled_dot_product_attention`` (the fused kernel)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(3, 12)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.mean(1))


def transformer_models():
    torch.manual_seed(1)
    return {"post_norm": Block(False), "pre_norm": Block(True), "cross": CrossAttention(),
            "sdpa": SDPA()}


@pytest.mark.parametrize("name", list(transformer_models()))
def test_transformer_ntk_equals_brute_force_for_every_method(name):
    model = transformer_models()[name].double().eval()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    ref = brute_ntk(model, x)  # torch's own attention (fused kernels where it picks them)
    for method in METHODS:
        K = empirical_ntk(model, x, output="full", method=method)
        assert rel_err(K, ref) < 1e-9, f"{name}/{method}: {rel_err(K, ref):.2e}"
    # structured derivatives cover every parameter: projections inside attention and the norms
    chosen = select_parameters(model)
    from traindyn.probes._ntk_structured import plan_structured

    plan, _ = plan_structured(model, x, chosen, True, 3)
    assert sorted(plan.fallback) == [], plan.fallback
    kinds = sorted({g.kind for g in plan.groups})
    assert kinds == (["linear", "norm"] if name != "sdpa" else ["linear"])


def test_math_attention_equals_torch_multi_head_attention():
    """``mha_math`` against torch's own ``F.multi_head_attention_forward`` (option by option)."""
    from traindyn.probes._ntk_common import mha_math

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double()
    L, S, N = 4, 5, 3
    q = torch.randn(L, N, 8, dtype=torch.float64)
    kv = torch.randn(S, N, 8, dtype=torch.float64)
    bool_mask = torch.rand(L, S) > 0.7
    bool_mask[:, 0] = False
    float_mask = torch.randn(N * 2, L, S, dtype=torch.float64)
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[0, -2:] = True
    args = (8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
            mha.out_proj.weight, mha.out_proj.bias)
    for query, key, kw in [
        (q, q, {}),
        (q, kv, {"attn_mask": bool_mask, "key_padding_mask": pad}),
        (q, kv, {"attn_mask": float_mask, "average_attn_weights": False}),
        (q[:, 0], kv[:, 0], {"attn_mask": bool_mask}),  # unbatched
    ]:
        ref = torch.nn.functional.multi_head_attention_forward(query, key, key, *args,
                                                               training=False, **kw)
        out = mha_math(query, key, key, *args, training=False, **kw)
        for a, b in zip(out, ref, strict=True):
            assert rel_err(a, b) < 1e-12


def test_cached_plan_is_verified_again_when_the_forward_changes():
    """The structured plan is reused across calls only while the forward uses the chosen
    parameters the same way; a weight that starts being used outside F.linear re-plans."""

    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(4, 5), nn.Linear(5, 3)
            self.tied = False

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            y = self.out(h)
            return y + h @ self.out.weight.T if self.tied else y

    torch.manual_seed(0)
    model = Switch().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    for tied in (False, True, False):
        model.tied = tied
        K = empirical_ntk(model, x, output="full", method="structured")
        assert rel_err(K, brute_ntk(model, x)) < 1e-9, tied


def test_non_finite_sample_gives_nan_row_and_column_with_a_warning():
    model, shape = models()["mlp"]
    model = model.double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    good = empirical_ntk(model, x)
    x[2, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        K = empirical_ntk(model, x)
    bad = torch.isnan(K)
    assert bad[2].all() and bad[:, 2].all() and int(bad.sum()) == 7
    keep = [0, 1, 3]
    assert rel_err(K[keep][:, keep], good[keep][:, keep]) < 1e-12


# ----------------------------------------------------------------------------- fast paths
class ScaledHead(nn.Module):
    """An MLP whose output is twice its last Linear's output: signals 2·δ_ac, not one-hot."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return 2 * self.net(x)


@pytest.mark.parametrize("name", ["mlp", "cnn", "tied", "nobias_one_output"])
@pytest.mark.parametrize("strips", [2, 4])
def test_symmetric_row_strips_equal_brute_force(monkeypatch, name, strips):
    """Upper row strips, mirrored below the diagonal (forced on small models; by default
    only blocks of ≥ 10⁸ multiply-adds use them) vs the float64 brute-force Jacobian kernel."""
    from traindyn.probes import _ntk_structured as st

    monkeypatch.setattr(st, "_panels", lambda work: strips)
    model, shape = models()[name]
    model = model.double()
    x = torch.randn(9, *shape, dtype=torch.float64)  # 9 rows: uneven strips
    ref = brute_ntk(model, x)
    K = empirical_ntk(model, x, output="full", method="structured")
    assert rel_err(K, ref) < 1e-9, f"{name}/{strips}: {rel_err(K, ref):.2e}"
    tr = empirical_ntk(model, x, output="trace", method="structured")
    assert rel_err(tr, torch.einsum("ijaa->ij", ref)) < 1e-9
    # and chunked, where the diagonal chunks take the strips
    Kc = empirical_ntk(model, x, output="full", method="structured", chunk_size=4)
    assert rel_err(Kc, ref) < 1e-9


def test_unit_signal_output_layer_is_detected_exactly():
    """A model returning its last Linear's output keeps that layer as activations only (its
    signal Gram is δ_ab); a scaled output (signals 2·δ) must not be taken for one; both
    kernels equal the float64 brute-force Jacobian kernel."""
    from traindyn.probes import _ntk_structured as st
    from traindyn.probes._ntk_common import requires_grad
    from traindyn.probes._ntk_engines import jacobian_rows

    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64)
    for model, unit, layers in ((models()["mlp"][0].double(), 1, 3),
                                (ScaledHead().double(), 0, 2)):
        chosen = select_parameters(model)
        with torch.enable_grad(), requires_grad(chosen.values()):
            plan, rec = st.plan_structured(model, x, chosen, True, 6)
            F = st.structured_factors(model, x, plan, jacobian_rows, rec)
        assert len(F.unit) == unit and len(F.unit) + len(F.groups) == layers
        ref = brute_ntk(model, x)
        for output, want in (("full", ref), ("trace", torch.einsum("ijaa->ij", ref))):
            K = empirical_ntk(model, x, output=output, method="structured")
            assert rel_err(K, want) < 1e-12, (type(model).__name__, output)


def test_nonfinite_check_is_not_fooled_by_an_overflowing_sum():
    """The one-reduction check: finite entries whose float32 sum overflows raise no warning;
    an infinite entry is counted."""
    from traindyn.probes._ntk_kernel import warn_nonfinite as _warn_nonfinite

    K = torch.full((3, 3), 3e38, dtype=torch.float32)  # sum = inf, every entry finite
    assert not torch.isfinite(K.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _warn_nonfinite(K, "t") is K
    K[1, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="1 of 9 kernel entries"):
        _warn_nonfinite(K, "t")


class TwoConv1d(nn.Module):
    """Conv1d ('same' padding) → tanh → dilated Conv1d → flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding="same")
        self.c2 = nn.Conv1d(3, 4, 3, dilation=2)
        self.head = nn.Linear(4 * 4, 2)

    def forward(self, x):
        return self.head(self.c2(torch.tanh(self.c1(x))).flatten(1))


class ResidualConv(nn.Module):
    """A skip connection around a convolution, then a strided, padded one: signals reach the
    first layer both through the cut convolutions and around them."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.c3 = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        z = torch.relu(self.c1(x))
        z = torch.tanh(self.c2(z) + z)
        return self.head(torch.relu(self.c3(z)).flatten(1))


@pytest.mark.parametrize("route", ["scatter", "transpose", "auto"])
@pytest.mark.parametrize("name", ["cnn", "conv1d_two", "residual"])
def test_cut_convolutions_give_the_uncut_signals_and_the_brute_force_kernel(name, route,
                                                                            monkeypatch):
    """Convolutions whose input needs signals are cut out of the batched backward (their
    transposed product done for all outputs at once, by either route): the signals equal those
    of the plain batched backward, and the kernels of the first call (uncut, verified) and of
    later calls (cached plan, cut recordings) equal the float64 brute-force Jacobian kernel."""
    from traindyn.probes._ntk_common import requires_grad

    monkeypatch.setenv(st.CONV_INPUT_GRAD_ENV, route)
    torch.manual_seed(2)
    model, shape = {"cnn": models()["cnn"], "conv1d_two": (TwoConv1d(), (2, 8)),
                    "residual": (ResidualConv(), (2, 6, 6))}[name]
    model = model.double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    chosen = select_parameters(model)
    ids = set(map(id, chosen.values()))
    with torch.enable_grad(), requires_grad(chosen.values()):
        cut, plain = st.record(model, x, ids, cut=True), st.record(model, x, ids)
    assert sum(c.cut is not None for c in cut.calls) == {"cnn": 1, "conv1d_two": 1,
                                                          "residual": 2}[name]
    for g1, g0 in zip(cut.gs, plain.gs, strict=True):
        assert rel_err(g1, g0) < 1e-12
    ref = brute_ntk(model, x)
    for _ in range(2):  # the second call reuses the plan and records with cuts
        assert rel_err(empirical_ntk(model, x, output="full", method="structured"), ref) < 1e-9
    x2 = torch.randn(3, *shape, dtype=torch.float64)
    cross = torch.einsum("ijaa->ij", brute_ntk(model, x, x2))
    assert rel_err(empirical_ntk(model, x, x2, method="structured"), cross) < 1e-9


@pytest.mark.parametrize("name", ["cnn", "conv1d"])
def test_cached_plan_structures_every_convolution(name):
    """Plans are verified on recordings with parameter gradients, so every convolution weight
    is structured (none falls back to the Jacobian), also when the only convolution reads the
    input, which cut recordings compute detached."""
    from traindyn.probes import _ntk_structured as st
    from traindyn.probes._ntk_common import requires_grad

    model, shape = models()[name]
    model = model.double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    chosen = select_parameters(model)
    with torch.enable_grad(), requires_grad(chosen.values()):
        for _ in range(2):
            plan, rec = st.cached_plan(model, x, chosen, True, 4)
            assert plan.fallback == {} and len(plan.groups) == len(chosen) // 2
    assert rel_err(empirical_ntk(model, x, output="full"), brute_ntk(model, x)) < 1e-9


def test_recorded_outputs_modified_in_place_are_recorded_again_with_copies():
    """Recorded layer outputs go downstream uncopied; an in-place op on one (ReLU(inplace))
    is caught by its version counter and the model re-recorded with copies: the kernel equals
    the float64 brute-force Jacobian kernel and every layer keeps structured derivatives."""
    torch.manual_seed(3)
    inplace = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 6),
                            nn.Tanh(), nn.Linear(6, 3)).double()
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    for model in (inplace, plain):
        K = empirical_ntk(model, x, output="full", method="structured")
        assert rel_err(K, brute_ntk(model, x)) < 1e-10
    assert inplace in st._COPIES and plain not in st._COPIES
    # every layer stayed structured (without copies the in-place ReLU would have changed the
    # first layer's signals: its verification would fail, the layer fall back to the Jacobian)
    assert all(not plan.fallback for plan in st._PLANS[inplace].values())
    # a second call on the remembered model records with copies from the start
    ids = {id(p) for p in inplace.parameters()}
    with torch.enable_grad():
        rec = st.record(inplace, x, ids)
    assert all(c.y._version == c.version for c in rec.calls)
    assert rel_err(empirical_ntk(inplace, x, output="full", method="structured"),
                   brute_ntk(inplace, x)) < 1e-10


def test_conv_input_grad_routes_agree_and_auto_times_once(monkeypatch):
    """Both transposed-product routes equal torch's own input gradient of the convolution for
    every output row (float64, strided / padded / dilated 2-D and 1-D geometries); ``auto``
    times them once per geometry and keeps the faster; a bad override is refused."""
    torch.manual_seed(4)
    cases = [(nn.Conv2d(3, 4, 3, stride=2), (3, 9, 9)),
             (nn.Conv2d(3, 4, 3, padding=1, dilation=1), (3, 5, 5)),
             (nn.Conv2d(2, 3, 2, stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (2, 6, 7)),
             (nn.Conv1d(2, 3, 3, dilation=2, padding=2), (2, 8))]
    for conv, shape in cases:
        conv = conv.double()
        x = torch.randn(4, *shape, dtype=torch.float64, requires_grad=True)
        with st.Recorder({id(conv.weight)}, cut=True) as rec:
            conv(x)
        (call,) = rec.calls
        gy = torch.randn(3, *call.y.shape, dtype=torch.float64)
        y = conv(x)
        ref = torch.stack([torch.autograd.grad(y, x, g, retain_graph=True)[0] for g in gy])
        for name, fn in st._CONV_GRAD.items():
            assert rel_err(fn(gy, call), ref) < 1e-12, name
        st._CONV_ROUTES.clear()
        monkeypatch.setenv(st.CONV_INPUT_GRAD_ENV, "auto")
        assert rel_err(st._conv_input_grad(gy, call), ref) < 1e-12
        (chosen,) = st._CONV_ROUTES.values()
        assert chosen in st._CONV_GRAD
        calls = []
        monkeypatch.setitem(st._CONV_GRAD, chosen, lambda g, c, f=st._CONV_GRAD[chosen],
                            log=calls: log.append(1) or f(g, c))
        assert rel_err(st._conv_input_grad(gy, call), ref) < 1e-12 and calls == [1]
        monkeypatch.undo()
    monkeypatch.setenv(st.CONV_INPUT_GRAD_ENV, "fold")
    with pytest.raises(ValueError, match="TRAINDYN_NTK_CONV_INPUT_GRAD"):
        st._conv_input_grad(gy, call)


def test_returned_output_layer_is_recognised_from_the_recording(monkeypatch):
    """Without comparing signal values (a host read on a GPU; switched off here), a model that
    returns its last Linear's output is recognised from the recording; a scaled output or an
    in-place-modified model (recorded with copies) is not, and takes the general path — every
    kernel equals the float64 brute-force Jacobian kernel."""
    from traindyn.probes._ntk_common import requires_grad
    from traindyn.probes._ntk_engines import jacobian_rows

    monkeypatch.setattr(st, "_unit_signals", lambda g: False)
    torch.manual_seed(5)
    x = torch.randn(6, 5, dtype=torch.float64)
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    for model, unit in ((plain, 1), (ScaledHead().double(), 0), (models()["mlp"][0].double(), 0)):
        chosen = select_parameters(model)
        with torch.enable_grad(), requires_grad(chosen.values()):
            for _ in range(2):  # the second recording knows whether the model needs copies
                plan, rec = st.cached_plan(model, x, chosen, True, 6)
            F = st.structured_factors(model, x, plan, jacobian_rows, rec)
        assert len(F.unit) == unit, type(model).__name__
        ref = brute_ntk(model, x)
        assert rel_err(empirical_ntk(model, x, output="full", method="structured"), ref) < 1e-12


# ----------------------------------------------------------------- inputs the model cannot take
@pytest.mark.parametrize("case", ["int", "bool", "1-D", "width", "x2 width"])
def test_inputs_the_model_cannot_take_are_a_clear_value_error(case):
    """Integer, boolean, 1-D or wrong-width inputs: a ValueError names the input's shape and
    dtype and what the first layer takes (not a torch error from inside the Jacobian code)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(6, 5)
    args = {"int": (torch.randint(0, 3, (6, 5)),), "bool": (torch.ones(6, 5, dtype=torch.bool),),
            "1-D": (torch.randn(5),), "width": (torch.randn(6, 4),),
            "x2 width": (x, torch.randn(3, 7))}[case]
    name = "x2" if case == "x2 width" else "x1"
    want = {"int": r"dtype torch\.int64: .*Linear\(in_features=5.* torch\.float32 inputs of "
                   r"shape \(n, …, 5\) \(convert x1 to floating point",
            "bool": r"x1 has dtype torch\.bool; its first layer Linear",
            "1-D": r"shape \(5,\).*x1 is 1-D: a batch of 5 scalars; one sample of 5 features "
                   r"is x1\[None\]",
            "width": r"x1 of shape \(6, 4\) .*shape \(n, …, 5\)",
            "x2 width": r"x2 of shape \(3, 7\)"}[case]
    with pytest.raises(ValueError, match=want) as err:
        empirical_ntk(model, *args)
    assert name in str(err.value)


def test_integer_token_ids_still_work_for_an_embedding_model():
    """The check runs the model on one sample; integer ids into an Embedding are fine, and the
    kernel equals the float64 brute-force Jacobian contraction."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double()
    ids = torch.randint(0, 10, (5, 3))
    K = empirical_ntk(model, ids)
    rows = []
    for i in range(5):
        out = model(ids[i:i + 1])[0]
        grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], list(
            model.parameters()), retain_graph=True, allow_unused=False)]) for a in range(2)]
        rows.append(torch.stack(grads))
    J = torch.stack(rows)  # (n, k, P)
    ref = torch.einsum("iap,jap->ij", J, J)
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"token ids in 0\.\.9"):
        empirical_ntk(model, torch.full((2, 3), 12))


def test_ntk_and_its_probe_import_in_one_direction_only():
    """probes.ntk imports probes.ntk_probe (which registers the "ntk" probe); neither
    probes.ntk_probe nor the private NTK modules import probes.ntk, at any level."""
    import ast
    from pathlib import Path

    import traindyn.probes as pkg

    root = Path(pkg.__file__).parent

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    for path in [root / "ntk_probe.py", *root.glob("_ntk_*.py")]:
        assert "traindyn.probes.ntk" not in imported(path), path.name
    assert "traindyn.probes.ntk_probe" in imported(root / "ntk.py")
    assert get_probe("ntk") is not None
