"""Capture activations of named modules of any ``torch.nn.Module`` through forward hooks.

Hooks are global state on the model: they are always removed when the ``with`` block ends,
also when it ends with an error.  Only the modules asked for are hooked (TransformerLens's
``names_filter`` habit), outputs are detached at once, and sequence outputs can be reduced to
one vector per sequence as they arrive, so nothing larger than asked for is kept.

Token reduction rules (``reduce=``), for outputs of shape ``(batch, tokens, features)``:

``"flatten"``  (default) keep every axis after the batch, flattened: ``(batch, tokens·features)``
``"mean"``     mean over tokens (over non-pad tokens when an attention mask is set)
``"last"``     the last token, or the last non-pad token of each sequence under a mask
``"cls"``      the first token (BERT's [CLS] position)
``"none"``     keep the output as it is
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import nn

Reduce = Literal["flatten", "mean", "last", "cls", "none"]
REDUCTIONS: tuple[str, ...] = ("flatten", "mean", "last", "cls", "none")

__all__ = ["REDUCTIONS", "capture", "module_names", "reduce_tokens", "resolve_layers"]


def module_names(model: nn.Module) -> list[str]:
    """Names of all sub-modules of ``model`` (``""``, the model itself, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _abbreviate(names: Sequence[str], limit: int = 40) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[: limit // 2]) + f", … ({len(names) - limit} more) …, " + ", ".join(
        names[-limit // 2 :]
    )


def resolve_layers(model: nn.Module, layers: str | Iterable[str]) -> dict[str, nn.Module]:
    """Map layer names or glob patterns (``"blocks.*.mlp"``) to modules, in model order.

    Raises
    ------
    KeyError
        When a name or pattern matches no module; the message lists the available names.
    """
    if isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    modules.pop("", None)
    chosen: dict[str, nn.Module] = {}
    for pattern in layers:
        if pattern in modules:
            chosen[pattern] = modules[pattern]
            continue
        matches = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise KeyError(
                f"layer {pattern!r} not found in {type(model).__name__}; available: "
                f"{_abbreviate(list(modules))}"
            )
        for name in matches:
            chosen[name] = modules[name]
    order = {name: i for i, name in enumerate(modules)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


def _first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for attr in ("last_hidden_state", "hidden_states", "logits"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find a tensor in a module output of type {type(output).__name__}")


def reduce_tokens(
    x: torch.Tensor, reduce: Reduce = "flatten", attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce a ``(batch, tokens, features)`` output to ``(batch, features)`` by a named rule.

    2-D outputs pass through unchanged for every rule but ``"none"`` (which never changes
    anything).  See the module docstring for the rules.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce rule {reduce!r}; choose one of {REDUCTIONS}")
    if reduce == "none" or x.ndim <= 2:
        return x
    if reduce == "flatten":
        return x.reshape(x.shape[0], -1)
    if x.ndim != 3:
        raise ValueError(
            f"reduce={reduce!r} expects (batch, tokens, features); got {tuple(x.shape)}")
    if reduce == "cls":
        return x[:, 0]
    if attention_mask is None:
        return x.mean(1) if reduce == "mean" else x[:, -1]
    mask = attention_mask.to(x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"attention mask shape {tuple(mask.shape)} does not match {tuple(x.shape[:2])}")
    mask = mask.to(x.dtype)
    if reduce == "mean":
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    # last non-pad token: the highest position whose mask is 1 (works for left and right padding)
    positions = torch.arange(x.shape[1], device=x.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(1).clamp(min=0)
    return x[torch.arange(x.shape[0], device=x.device), last]


class capture:  # noqa: N801 - used as a function-like context manager
    """Record (or stream) the outputs of named modules during forward passes.

    Parameters
    ----------
    model : nn.Module
    layers : str or iterable of str
        Module names or glob patterns; unknown names raise ``KeyError`` listing what exists.
    reduce : {"flatten", "mean", "last", "cls", "none"}
        Token reduction applied as each output arrives (module docstring).
    sink : callable ``(layer_name, tensor) -> None``, optional
        Receives each reduced batch instead of storing it (for streaming accumulators).
    device : torch.device or str, optional
        Move captured tensors here (default: leave them where they are).
    dtype : torch.dtype, optional
        Cast captured tensors (e.g. ``torch.float64``).

    Examples
    --------
    >>> with capture(model, ["encoder.layer.*.output"], reduce="mean") as cap:  # doctest: +SKIP
    ...     model(**batch)
    >>> feats = cap["encoder.layer.5.output"]                                # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Iterable[str],
        reduce: Reduce = "flatten",
        sink: Callable[[str, torch.Tensor], None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduce rule {reduce!r}; choose one of {REDUCTIONS}")
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.reduce = reduce
        self.sink = sink
        self.device = device
        self.dtype = dtype
        self.attention_mask: torch.Tensor | None = None
        self._batches: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def layers(self) -> list[str]:
        """Resolved layer names, in model order."""
        return list(self.modules)

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            x = reduce_tokens(_first_tensor(output).detach(), self.reduce, self.attention_mask)
            if self.device is not None or self.dtype is not None:
                x = x.to(device=self.device, dtype=self.dtype)
            if self.sink is not None:
                self.sink(name, x)
            else:
                self._batches[name].append(x)

        return hook

    def __enter__(self) -> capture:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def clear(self) -> None:
        """Drop what was recorded so far."""
        for batches in self._batches.values():
            batches.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        """All recorded batches of layer ``name``, concatenated along the batch axis."""
        if name not in self._batches:
            raise KeyError(f"layer {name!r} was not captured; captured: {', '.join(self._batches)}")
        batches = self._batches[name]
        if not batches:
            raise ValueError(f"nothing was recorded for layer {name!r}: run a forward pass first")
        return batches[0] if len(batches) == 1 else torch.cat(batches)

    def activations(self) -> dict[str, torch.Tensor]:
        """All recorded layers: ``{name: tensor}``."""
        return {name: self[name] for name, b in self._batches.items() if b}
