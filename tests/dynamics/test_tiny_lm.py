"""Tests of the tiny causal LM recipe: corpus, causality, hooks, z-loss, checkpoints, training."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from traindyn.dynamics import records
from traindyn.dynamics.recipes.tiny_lm import (
    TinyLM,
    TinyLMConfig,
    _batch,
    checkpoint_name,
    lm_loss,
    load_corpus,
    load_tiny_lm,
    train_tiny_lm,
)

SMALL = TinyLMConfig(context=16, d_model=32, n_layers=2, n_heads=4)



@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return load_corpus(60_000)


def test_corpus_is_the_bytes_of_the_sorted_stdlib_sources():
    first = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0].read_bytes()
    tokens = load_corpus(1000)
    assert tokens.dtype == torch.int64 and len(tokens) == 1000
    assert bytes(tokens.numpy().astype(np.uint8).tolist()) == first[:1000]
    assert int(tokens.max()) < 256


def test_corpus_from_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory="):
        load_corpus(directory=tmp_path)


def test_future_tokens_do_not_change_past_logits():
    model = TinyLM(SMALL).eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_hooked_queries_and_keys_reproduce_the_attention_output():
    """q_out/k_out carry the vectors whose softmax(q·k/√d) weights mix v: recompute by hand."""
    config = TinyLMConfig(context=8, d_model=16, n_layers=1, n_heads=2, qk_layernorm=True)
    model = TinyLM(config).eval()
    attn = model.blocks[0].attn
    seen = {}
    hooks = [attn.q_out.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             attn.k_out.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o)),
             model.blocks[0].ln1.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o)),
             attn.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))]
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 8)))
    for h in hooks:
        h.remove()
    q, k, h = seen["q"].double(), seen["k"].double(), seen["h"].double()
    assert q.shape == (3, 2, 8, 8)
    # qk-layernorm: each head's query has zero mean and unit variance over d_head (affine = id)
    torch.testing.assert_close(q.mean(-1), torch.zeros(3, 2, 8, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    wv, wo = attn.v_proj.weight.detach().double(), attn.o_proj.weight.detach().double()
    v = (h @ wv.T).view(3, 8, 2, 8).transpose(1, 2).detach()
    out = np.zeros((3, 8, 16))
    for b in range(3):
        for head in range(2):
            for i in range(8):
                z = np.array([float(q[b, head, i] @ k[b, head, j]) / math.sqrt(8)
                              for j in range(i + 1)])
                w = np.exp(z - z.max())
                w /= w.sum()
                out[b, i, head * 8:(head + 1) * 8] = w @ v[b, head, : i + 1].numpy()
    expected = out @ wo.numpy().T
    np.testing.assert_allclose(seen["out"].numpy(), expected, atol=1e-5)


def test_lm_loss_adds_the_z_loss_of_the_log_partition():
    logits = torch.randn(2, 5, 7, dtype=torch.float64) * 3
    targets = torch.randint(0, 7, (2, 5))
    total, ce, mean_log_z = lm_loss(logits, targets, z_loss=1e-2)
    arr = logits.numpy()
    log_z = np.log(np.exp(arr).sum(-1))
    ce_ref = np.mean(log_z - np.take_along_axis(arr, targets.numpy()[..., None], -1)[..., 0])
    assert abs(ce.item() - ce_ref) < 1e-6
    assert abs(mean_log_z.item() - log_z.mean()) < 1e-6
    assert abs(total.item() - (ce_ref + 1e-2 * np.mean(log_z**2))) < 1e-6


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        TinyLMConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="context"):
        TinyLM(SMALL)(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="safetensors"):
        checkpoint_name(3, "bin")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoints_are_saved_at_the_given_steps_and_reload(tmp_path, corpus, fmt):
    ds = train_tiny_lm(SMALL, steps=12, lr=1e-3, corpus=corpus, eval_steps=[0, 12],
                       checkpoint_dir=tmp_path, checkpoint_steps=[0, 3, 12],
                       checkpoint_format=fmt)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["config.json", f"step000000.{fmt}", f"step000003.{fmt}",
                            f"step000012.{fmt}"])
    first, last = load_tiny_lm(tmp_path / f"step000000.{fmt}"), load_tiny_lm(
        tmp_path / f"step000012.{fmt}")
    torch.manual_seed(0)
    fresh = TinyLM(SMALL).state_dict()
    assert all(torch.equal(first.state_dict()[name], fresh[name]) for name in fresh)
    assert not torch.equal(first.head.weight, last.head.weight)
    # the validation loss recorded at step 12 is the reloaded model's loss on the held-out tail
    n_val = int(len(corpus) * 0.1)
    gen = torch.Generator().manual_seed(10_000)
    losses = []
    for _ in range(4):
        x, y = _batch(corpus[-n_val:], 16, SMALL.context, gen)
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(
                last.eval()(x).reshape(-1, 256), y.reshape(-1)).item())
    assert abs(ds["val_loss"].sel(step=12).item() - np.mean(losses)) < 1e-5


def test_training_lowers_the_loss_and_follows_the_data_model(corpus):
    ds = train_tiny_lm(SMALL, steps=150, lr=3e-3, corpus=corpus, n_evals=6)
    records.validate(ds)
    assert ds["max_attention_logit"].dims == ("step", "layer")
    assert list(ds["layer"].values) == ["blocks.0.attn", "blocks.1.attn"]
    val = ds["val_loss"].values
    assert abs(val[0] - math.log(256)) < 1.0      # near uniform at initialisation
    assert val[-1] < val[0] - 1.0                  # learns byte statistics quickly
    np.testing.assert_allclose(ds["time"].values, 3e-3 * ds["step"].values)
    assert ds.attrs["diverged"] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # time = inf × 0
def test_a_diverging_run_stops_and_is_flagged(corpus):
    ds = train_tiny_lm(SMALL, steps=10, lr=float("inf"), warmup=0, corpus=corpus,
                       eval_steps=range(11))
    assert ds.attrs["diverged"] == 1
    assert np.isfinite(ds["val_loss"].values[0])        # step 0 is measured before any update
    assert np.isnan(ds["val_loss"].values[1:]).all()


def test_a_given_model_is_trained_and_a_monitor_sees_every_step(corpus):
    from traindyn.dynamics.monitor import Monitor
    from traindyn.dynamics.schedules import linear

    torch.manual_seed(5)
    model = TinyLM(SMALL)
    before = model.head.weight.detach().clone()
    monitor = Monitor(model, probes=["attention_logits"], schedule=linear(4),
                      probe_data=corpus[:64].view(4, 16))
    ds = train_tiny_lm(model=model, monitor=monitor, steps=8, lr=1e-3, corpus=corpus,
                       eval_steps=[0, 4, 8])
    assert not torch.equal(before, model.head.weight)           # this very model was trained
    mon = monitor.to_dataset()
    assert list(mon["step"].values) == [0, 4, 8]
    np.testing.assert_array_equal(mon["train_loss"].values, ds["train_loss"].values)
