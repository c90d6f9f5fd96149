"""Forward-hook capture: layers, token reductions, data loaders, streaming into accumulators."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from traindyn.probes.capture import capture, reduce_tokens, stream_features
from traindyn.probes.collapse import CollapseAccumulator, neural_collapse
from traindyn.probes.spectral import SpectralMetrics, alpha_req, rankme

from tests._tiny_models import SharedReLUBlock, TokenModel, mlp
from tests.helpers import assert_rel

# 8 → 32 (ReLU, layer "1") → 32 (Tanh, layer "3") → 3
relu_tanh_mlp = partial(mlp, 8, 32, 32, 3, act=("relu", "tanh"), seed=0)


def test_captures_named_layers_and_lists_names_for_unknown_ones():
    model, x = relu_tanh_mlp(), torch.randn(20, 8)
    with capture(model, ["1", "3"]) as cap:
        model(x)
    h1 = torch.relu(model[0](x))
    torch.testing.assert_close(cap["1"], h1.detach())
    torch.testing.assert_close(cap["3"], torch.tanh(model[2](h1)).detach())
    assert not cap["1"].requires_grad
    with pytest.raises(KeyError, match="available: 0, 1, 2, 3, 4"):
        capture(model, ["5"])


def test_hooks_are_removed_even_when_the_forward_raises():
    model = relu_tanh_mlp()
    with pytest.raises(RuntimeError):
        with capture(model, ["*"]):
            model(torch.randn(4, 7))  # wrong width
    assert all(not m._forward_hooks for m in model.modules())


def test_token_reductions_under_left_and_right_padding():
    x = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right-padded, left-padded
    torch.testing.assert_close(reduce_tokens(x, "mean", mask),
                               torch.stack([x[0, :3].mean(0), x[1, 1:].mean(0)]))
    torch.testing.assert_close(reduce_tokens(x, "last", mask), torch.stack([x[0, 2], x[1, 3]]))
    torch.testing.assert_close(reduce_tokens(x, "cls"), x[:, 0])
    torch.testing.assert_close(reduce_tokens(x, "tokens", mask),
                               torch.cat([x[0, :3], x[1, 1:]]))
    assert reduce_tokens(x, "flatten").shape == (2, 12)
    with pytest.raises(ValueError, match="does not match"):
        reduce_tokens(x, "mean", mask[:, :3])
    with pytest.raises(ValueError, match="unknown reduce"):
        reduce_tokens(x, "max")


def test_position_subsampling_keeps_valid_positions_and_is_seeded():
    x = torch.randn(5, 40, 6)
    mask = torch.ones(5, 40, dtype=torch.long)
    mask[0, 3:] = 0  # a sequence with only 3 real tokens
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = reduce_tokens(x, "tokens", mask, positions=8, generator=g1)
    b = reduce_tokens(x, "tokens", mask, positions=8, generator=g2)
    assert a.shape == (3 + 4 * 8, 6)
    torch.testing.assert_close(a, b)
    rows = {tuple(r.tolist()) for r in x[mask > 0]}
    assert all(tuple(r.tolist()) in rows for r in a)
    with pytest.raises(ValueError, match="reduce='tokens'"):
        capture(nn.Linear(2, 2), "*", reduce="mean", positions=4)


def test_run_over_a_loader_matches_manual_features():
    model, x, y = relu_tanh_mlp(), torch.randn(50, 8), torch.randint(0, 3, (50,))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]
    with capture(model, ["3"]) as cap:
        assert cap.run(loader) == 4
    torch.testing.assert_close(cap["3"], model[:4](x).detach())
    with pytest.raises(RuntimeError, match="inside"):
        capture(model, ["3"]).run(loader)


def test_dict_batches_pass_their_attention_mask_to_the_reduction():
    torch.manual_seed(0)
    model = TokenModel()
    ids = torch.randint(0, 50, (6, 9))
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[:, 6:] = 0
    with capture(model, ["proj"], reduce="mean") as cap:
        cap.run([{"input_ids": ids, "attention_mask": mask}])
    torch.testing.assert_close(cap["proj"], model(ids)[:, :6].mean(1).detach())


def test_streaming_spectral_metrics_equal_oneshot_on_captured_features():
    model, x = relu_tanh_mlp(), torch.randn(300, 8)
    loader = [(x[i:i + 64], None) for i in range(0, 300, 64)]
    accs = stream_features(model, loader, ["1", "3"],
                           lambda: SpectralMetrics(("rankme", "alpha_req"), fit_range=(2, 20)))
    for name, upto in (("1", 2), ("3", 4)):
        feats = model[:upto](x).detach()
        out = accs[name].compute()
        assert_rel(out["rankme"], rankme(feats), 1e-10, f"rankme {name}")
        assert_rel(out["alpha_req"], alpha_req(feats, (2, 20)), 1e-10, f"alpha {name}")


def test_streaming_collapse_with_labels_equals_oneshot():
    model, x = relu_tanh_mlp(), torch.randn(200, 8)
    y = torch.randint(0, 3, (200,))
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)]
    accs = stream_features(model, loader, "3", CollapseAccumulator, labels=True)
    feats = model[:4](x).detach()
    streamed, oneshot = accs["3"].compute(), neural_collapse(feats, y)
    for var in ("nc1", "nc2_equinorm", "nc2_equiangle", "cdnv"):
        assert_rel(float(streamed[var]), float(oneshot[var]), 1e-9, var)
    with pytest.raises(ValueError, match="per sequence"):
        stream_features(model, loader, "3", CollapseAccumulator, reduce="tokens", labels=True)


def test_sink_keeps_nothing_in_the_capture():
    model, seen = relu_tanh_mlp(), []
    with capture(model, ["1"], sink=lambda name, t: seen.append(t.shape)) as cap:
        cap.run([torch.randn(10, 8), torch.randn(5, 8)])
    assert seen == [(10, 32), (5, 32)] and cap.activations() == {}
    assert np.all([not m._forward_hooks for m in model.modules()])


def test_layer_globs_are_dotted_with_an_fnmatch_fallback():
    """One rule for capture, Monitor and analyze: ``*`` stays within a dotted part, ``**``
    crosses parts, and a pattern that matches nothing that way falls back to fnmatch."""
    from traindyn.probes.capture import resolve_layers

    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
                                             nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
    model.add_module("head", nn.Linear(2, 1))
    assert list(resolve_layers(model, "blocks.*")) == ["blocks.0", "blocks.1"]
    assert list(resolve_layers(model, "blocks.*.1")) == ["blocks.0.1", "blocks.1.1"]
    assert list(resolve_layers(model, "blocks.**")) == [
        "blocks.0", "blocks.0.0", "blocks.0.1", "blocks.1", "blocks.1.0", "blocks.1.1"]
    assert list(resolve_layers(model, "*")) == ["blocks", "head"]
    # no dotted match for "b*1", so fnmatch, whose * crosses dots
    assert list(resolve_layers(model, "b*1")) == ["blocks.0.1", "blocks.1", "blocks.1.1"]
    assert list(resolve_layers(model, ["head", "blocks.[!0]"])) == ["blocks.1", "head"]
    with pytest.raises(KeyError, match="available: blocks, blocks.0"):
        resolve_layers(model, "tail.*")


# ---------------------------------------------------------------- features by value
def _float64_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The reference: module ``name``'s output cloned in float64 inside its own hook."""
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda m, i, o: seen.append(o.detach().clone().double()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("reduce", ["flatten", "none"])
def test_capture_keeps_a_value_that_a_later_inplace_relu_cannot_rewrite(reduce):
    model, x = mlp(10, 24, 5, inplace=True, seed=3), torch.randn(64, 10)
    ref = _float64_output(model, "0", x)
    assert (ref < 0).any()       # the Linear output has negative entries the ReLU would zero
    with capture(model, ["0"], reduce=reduce) as cap, torch.no_grad():
        model(x)
    torch.testing.assert_close(cap["0"].double(), ref)
    # streamed through a sink that keeps the batch, too
    kept = []
    with capture(model, ["0"], sink=lambda n, t: kept.append(t)), torch.no_grad():
        model(x)
    torch.testing.assert_close(kept[0].double(), ref)


def test_rankme_of_inplace_followed_layer_matches_a_plain_forward_pass_in_the_monitor():
    from traindyn.dynamics.monitor import Monitor

    model, x = mlp(10, 24, 5, inplace=True, seed=3), torch.randn(64, 10)
    ref = float(rankme(_float64_output(model, "0", x)))
    relu_ref = float(rankme(_float64_output(model, "1", x)))
    assert abs(ref - relu_ref) > 1.0   # the two layers differ: the check can tell them apart
    monitor = Monitor(model, probes=["rankme"], layers=["0", "1"], probe_data=x,
                      schedule=lambda s: True)
    with monitor:
        monitor.step(0)
    got = monitor.to_dataset()["rankme"].sel(layer="0").item()
    assert_rel(got, ref, 1e-10, "Monitor RankMe of the Linear before an in-place ReLU")


def test_no_reduction_leaves_a_captured_tensor_in_the_output_storage():
    model = nn.Sequential(nn.Linear(6, 6))
    x = torch.randn(4, 3, 6)
    outputs = []
    model[0].register_forward_hook(lambda m, i, o: outputs.append(o))
    for reduce in ("flatten", "cls", "last", "mean", "none"):
        with capture(model, ["0"], reduce=reduce) as cap, torch.no_grad():
            model(x)
        out = outputs[-1]
        assert cap["0"].untyped_storage().data_ptr() != out.untyped_storage().data_ptr(), reduce


# ---------------------------------------------------------------- a module called twice
def test_a_module_called_twice_is_refused_by_name_with_its_count():
    torch.manual_seed(0)
    model, x = SharedReLUBlock(), torch.randn(64, 12)
    with pytest.raises(RuntimeError, match=r"layer 'relu' \(ReLU\) was called 2 times"):
        with capture(model, ["relu"]), torch.no_grad():
            model(x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # the Monitor surfaces the same refusal instead of stacking 128 rows for 64 inputs
    from traindyn.dynamics.monitor import Monitor

    monitor = Monitor(model, probes=["rankme"], layers=["relu"], probe_data=x,
                      schedule=lambda s: True)
    with pytest.raises(RuntimeError, match="called 2 times"):
        monitor.step(0)


def test_calls_first_and_last_record_that_call_only():
    torch.manual_seed(0)
    model, x = SharedReLUBlock(), torch.randn(64, 12)
    with torch.no_grad():
        first = torch.relu(model.fc1(x)).double()
        last = torch.relu(model.fc2(first.float()) + x).double()
    for calls, ref in [("first", first), ("last", last)]:
        with capture(model, ["relu", "fc2"], calls=calls) as cap, torch.no_grad():
            model(x)
            model(x)   # two passes: one batch per pass
        assert cap["relu"].shape == (128, 12)
        torch.testing.assert_close(cap["relu"].double(), torch.cat([ref, ref]))
        assert_rel(rankme(cap["relu"][:64]), rankme(ref), 1e-10, calls)
    # a sub-module called outside a pass of the model is its own pass
    with capture(model, ["relu"]) as cap, torch.no_grad():
        model.relu(x.clone())
        model.relu(x.clone())
    assert cap["relu"].shape == (128, 12)
    with pytest.raises(ValueError, match="unknown calls"):
        capture(model, ["relu"], calls="each")
