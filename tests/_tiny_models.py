"""Tiny models shared by the tests, each built in milliseconds on the CPU.

What each one is for:

:func:`mlp`              ``Linear → activation → … → Linear`` through the given widths, the
                         workhorse of probe, Monitor and checkpoint tests.  Options give the
                         structures that make features hard to measure: in-place ReLUs (a
                         captured output rewritten after its hook ran), BatchNorm and Dropout
                         (train and eval mode differ), a leading :class:`Flat` (inputs of any
                         shape), float64 weights (float64 references).
:class:`Wrapped`         a model whose layers sit under ``net.`` (``net.0``, ``net.2``, …), as
                         in a user's ``self.net = nn.Sequential(...)``.
:class:`SharedReLUBlock` one ``nn.ReLU(inplace=True)`` called twice per forward pass (the
                         pattern of torchvision's ``BasicBlock``).
:class:`TokenModel`      ``(batch, tokens)`` ids → ``Embedding`` → ``Linear``; its forward takes
                         an ``attention_mask``, so a batch dict ``model(**batch)`` works.
:func:`circular_cnn`     circular 1-D convolutions and a global mean: exactly invariant to cyclic
                         shifts of the input.

Real architectures with random weights (ResNet-18, VGG-11, ViT, GPT-2, BERT, and an MLP and a
block with a shared activation at the zoo's sizes) are in ``tests/_zoo.py``.

``seed``, where a factory takes one, calls ``torch.manual_seed(seed)`` right before the first
parameter is drawn; without it the model continues the current global torch stream (the suite
seeds it with 0 before each test, ``tests/conftest.py``).  The parameters are drawn in float32
and ``double=True`` converts them afterwards, so a float64 model has exactly the float32 one's
values.  The layers of :func:`mlp` and :func:`circular_cnn` are named as in ``nn.Sequential``:
``"0"``, ``"1"``, … in build order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Flat", "GlobalMean", "SharedReLUBlock", "TokenModel", "Wrapped", "circular_cnn",
           "mlp"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class Flat(nn.Module):
    """``(batch, …) → (batch, features)`` by ``reshape``: lets an MLP take signals or images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class GlobalMean(nn.Module):
    """Mean over the last axis (global average pooling of a 1-D signal)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1)


def _activation(name: str, inplace: bool) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r}: one of {sorted(_ACTIVATIONS)}")
    return nn.ReLU(inplace=inplace) if name == "relu" else _ACTIVATIONS[name]()


def mlp(*widths: int, act: str | Sequence[str] = "relu", inplace: bool = False,
        batchnorm: bool = False, dropout: float = 0.0, flatten: bool = False, bias: bool = True,
        seed: int | None = None, double: bool = False) -> nn.Sequential:
    """A multilayer perceptron ``Linear(w₀, w₁) → act → … → Linear(w_{L-1}, w_L)``.

    Parameters
    ----------
    *widths
        Input width, hidden widths, output width (at least two numbers); no activation
        follows the last ``Linear``.
    act
        ``"relu"`` or ``"tanh"`` for every hidden layer, or one name per hidden layer.
    inplace
        ReLUs are ``nn.ReLU(inplace=True)``: they overwrite the preceding module's output.
    batchnorm
        A ``BatchNorm1d`` between the first ``Linear`` and its activation.
    dropout
        If nonzero, a ``Dropout(dropout)`` after the first activation.
    flatten
        Start with :class:`Flat` (so the first ``Linear`` is layer ``"1"``).
    bias
        Whether the ``Linear`` layers have a bias.
    seed
        ``torch.manual_seed(seed)`` before drawing the weights (``None``: the current stream).
    double
        Convert the model to float64 after drawing its float32 weights.

    Examples
    --------
    ``mlp(6, 16, 16, 3, batchnorm=True, dropout=0.3)`` is ``Linear(6, 16) → BatchNorm1d(16) →
    ReLU → Dropout(0.3) → Linear(16, 16) → ReLU → Linear(16, 3)``.
    """
    if len(widths) < 2:
        raise ValueError(f"mlp needs an input and an output width, got {widths}")
    hidden = len(widths) - 2
    acts = [act] * hidden if isinstance(act, str) else list(act)
    if len(acts) != hidden:
        raise ValueError(f"{len(acts)} activations for {hidden} hidden layers")
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = [Flat()] if flatten else []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i == hidden:
            break
        if batchnorm and i == 0:
            layers.append(nn.BatchNorm1d(n_out))
        layers.append(_activation(acts[i], inplace))
        if dropout and i == 0:
            layers.append(nn.Dropout(dropout))
    model = nn.Sequential(*layers)
    return model.double() if double else model


class Wrapped(nn.Module):
    """``net`` under the attribute ``net``: its layers are named ``net.0``, ``net.1``, …"""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SharedReLUBlock(nn.Module):
    """torchvision's ``BasicBlock`` pattern: one ``self.relu`` (in place) used twice.

    ``relu(fc2(relu(fc1(x))) + x)`` with two ``d × d`` layers; capturing ``relu`` sees two
    calls per forward pass.
    """

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.fc1(x))
        return self.relu(self.fc2(out) + x)


class TokenModel(nn.Module):
    """Token model: ``(batch, tokens)`` ids → ``embed`` → ``proj``, features per token.

    ``forward(input_ids, attention_mask=None)`` accepts the mask (and ignores it), as language
    models do, so a batch ``{"input_ids": …, "attention_mask": …}`` can be passed whole and the
    mask is left to the token reduction.
    """

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.embed(input_ids))


def circular_cnn(seed: int = 0) -> nn.Module:
    """Circular convolutions + global average pooling, float64: exactly invariant to cyclic
    shifts of a ``(batch, 1, length)`` signal from layer ``"4"`` (the global mean) on.

    ``Conv1d(1, 4, 3, circular) → ReLU → Conv1d(4, 4, 3, circular) → ReLU → GlobalMean →
    Linear(4, 3)``.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
        GlobalMean(), nn.Linear(4, 3)).double()
