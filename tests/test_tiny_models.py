"""The shared tiny models (``tests/_tiny_models.py``) are the modules they say they are.

Reference: the same model written out module by module with ``nn.Sequential`` after the same
``torch.manual_seed``: equal structure (``repr``, which names every module and its arguments)
and bit-equal parameters and buffers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests._tiny_models import Flat, SharedReLUBlock, TokenModel, Wrapped, circular_cnn, mlp


def _assert_same(model: nn.Module, reference: nn.Module) -> None:
    assert repr(model) == repr(reference)
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def _seeded(seed: int, build) -> nn.Module:
    torch.manual_seed(seed)
    return build()


@pytest.mark.parametrize(("factory", "reference"), [
    (lambda: mlp(8, 32, 32, 3, act=("relu", "tanh"), seed=0),
     lambda: _seeded(0, lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32),
                                              nn.Tanh(), nn.Linear(32, 3)))),
    (lambda: mlp(10, 24, 5, inplace=True, seed=3),
     lambda: _seeded(3, lambda: nn.Sequential(nn.Linear(10, 24), nn.ReLU(inplace=True),
                                              nn.Linear(24, 5)))),
    (lambda: mlp(6, 16, 16, 3, batchnorm=True, dropout=0.3, seed=1),
     lambda: _seeded(1, lambda: nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                              nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU(),
                                              nn.Linear(16, 3)))),
    (lambda: mlp(16, 32, 3, batchnorm=True, dropout=0.5, flatten=True, seed=2, double=True),
     lambda: _seeded(2, lambda: nn.Sequential(Flat(), nn.Linear(16, 32), nn.BatchNorm1d(32),
                                              nn.ReLU(), nn.Dropout(0.5),
                                              nn.Linear(32, 3)).double())),
    (lambda: mlp(16, 24, 24, 4, inplace=True, dropout=0.2, seed=4),
     lambda: _seeded(4, lambda: nn.Sequential(nn.Linear(16, 24), nn.ReLU(inplace=True),
                                              nn.Dropout(0.2), nn.Linear(24, 24),
                                              nn.ReLU(inplace=True), nn.Linear(24, 4)))),
    (lambda: mlp(5, 8, 1, act="tanh", bias=False, seed=5),
     lambda: _seeded(5, lambda: nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(),
                                              nn.Linear(8, 1, bias=False)))),
    (lambda: Wrapped(mlp(12, 24, 16, 3, act="tanh", seed=6)),
     lambda: _seeded(6, lambda: Wrapped(nn.Sequential(nn.Linear(12, 24), nn.Tanh(),
                                                      nn.Linear(24, 16), nn.Tanh(),
                                                      nn.Linear(16, 3))))),
], ids=["relu_tanh", "inplace_relu", "batchnorm_dropout", "flat_float64", "dropout_inplace",
        "no_bias", "wrapped"])
def test_factories_equal_the_model_written_out(factory, reference):
    _assert_same(factory(), reference())


def test_without_a_seed_the_model_continues_the_global_stream():
    torch.manual_seed(7)
    first = mlp(4, 8, 3)
    after = torch.randn(3)
    torch.manual_seed(7)
    reference = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    _assert_same(first, reference)
    assert torch.equal(after, torch.randn(3))


def test_float64_model_has_the_float32_draws():
    single, double = mlp(16, 64, 10, seed=0), mlp(16, 64, 10, seed=0, double=True)
    for a, b in zip(single.parameters(), double.parameters(), strict=True):
        assert b.dtype == torch.float64 and torch.equal(a.double(), b)


def test_layer_names_and_forward_passes():
    x = torch.randn(5, 12)
    model = Wrapped(mlp(12, 6, 2))
    assert [n for n, _ in model.named_modules()][1:] == ["net", "net.0", "net.1", "net.2"]
    torch.testing.assert_close(model(x), model.net[2](torch.relu(model.net[0](x))))
    block = SharedReLUBlock(d=12)
    h = torch.relu(block.fc1(x))
    torch.testing.assert_close(block(x), torch.relu(block.fc2(h) + x))
    calls = []
    block.relu.register_forward_hook(lambda *args: calls.append(1))
    block(x)
    assert len(calls) == 2
    tokens = TokenModel()
    ids = torch.randint(0, 50, (3, 7))
    out = tokens(input_ids=ids, attention_mask=torch.ones(3, 7, dtype=torch.long))
    torch.testing.assert_close(out, tokens.proj(tokens.embed.weight[ids]))


def test_circular_cnn_is_invariant_to_a_cyclic_shift_from_the_global_mean_on():
    model, x = circular_cnn(), torch.randn(4, 1, 9, dtype=torch.float64)
    shifted = torch.roll(x, 3, dims=-1)
    with torch.no_grad():
        torch.testing.assert_close(model(shifted), model(x), atol=1e-14, rtol=0)
        torch.testing.assert_close(model[:4](shifted), torch.roll(model[:4](x), 3, dims=-1),
                                   atol=1e-14, rtol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"widths": (4,)}, "an input and an output width"),
    ({"widths": (4, 8, 3), "act": ("relu", "tanh")}, "2 activations for 1 hidden layers"),
    ({"widths": (4, 8, 3), "act": "gelu"}, "activation 'gelu'"),
])
def test_bad_arguments_are_refused(kwargs, message):
    widths = kwargs.pop("widths")
    with pytest.raises(ValueError, match=message):
        mlp(*widths, **kwargs)
