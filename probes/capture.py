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
``"tokens"``   every (non-pad) token becomes a sample: ``(Σ tokens, features)``; with
               ``positions=k``, at most ``k`` positions per sequence, drawn uniformly without
               replacement from a seeded generator, so token-level statistics stay affordable
``"none"``     keep the output as it is

Captured features are values, never views: a recorded tensor that still shares memory with
the module's output (a ``detach()``, a ``"flatten"``/``"cls"``/``"last"`` view) is cloned in
the hook, so an in-place operation later in the same forward pass (``nn.ReLU(inplace=True)``
after a ``Linear`` or ``BatchNorm``, as in VGG and torchvision's ResNet) cannot rewrite what
was captured.  Reductions that already make a new tensor (``"mean"``, ``"tokens"``, a dtype or
device change) are not copied again.

A module called more than once in one forward pass (a shared activation such as the single
``self.relu`` of torchvision's ``BasicBlock``, or weight sharing) has several outputs per
input.  ``calls=`` says which one a layer records (``"once"``, the default, refuses with a
``RuntimeError`` naming the module and its number of calls; ``"first"`` or ``"last"`` keep that
call's output).  A forward pass is one call of the model given to :class:`capture`; calls of a
sub-module made outside it are each their own pass.

Streaming: with ``sink=`` nothing is stored; each reduced batch is handed over as it arrives
and freed.  :func:`stream_features` runs a data loader through the model and feeds one
accumulator per layer (anything with ``update(batch)``, e.g.
:class:`probes.spectral.SpectralMetrics`, or ``update(batch, labels)`` such as
:class:`probes.collapse.CollapseAccumulator`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

Reduce = Literal["flatten", "mean", "last", "cls", "tokens", "none"]
REDUCTIONS: tuple[str, ...] = ("flatten", "mean", "last", "cls", "tokens", "none")
Calls = Literal["once", "first", "last"]
CALLS: tuple[str, ...] = ("once", "first", "last")

__all__ = [
    "CALLS",
    "REDUCTIONS",
    "capture",
    "default_forward",
    "layer_pattern",
    "module_names",
    "reduce_tokens",
    "resolve_layers",
    "stream_features",
]


def module_names(model: nn.Module) -> list[str]:
    """Names of all sub-modules of ``model`` (``""``, the model itself, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _abbreviate(names: Sequence[str], limit: int = 40) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[: limit // 2]) + f", … ({len(names) - limit} more) …, " + ", ".join(
        names[-limit // 2 :]
    )


def layer_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a dotted glob over module names.

    ``*`` matches within one dotted component, ``**`` across components, ``?`` one character
    other than a dot, ``[abc]`` / ``[!abc]`` a character class (as in shell globs of paths,
    with ``.`` in the role of ``/``).
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + re.escape(body[1:]) if body.startswith("!")
                              else re.escape(body)) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def resolve_layers(model: nn.Module, layers: str | Iterable[str]) -> dict[str, nn.Module]:
    """Map layer names or glob patterns to modules, in model order.

    An exact module name always matches itself.  A pattern is a dotted glob
    (:func:`layer_pattern`): ``"blocks.*"`` selects the blocks ``blocks.0``, ``blocks.1`` …
    and not their sub-modules, ``"blocks.**"`` everything below, ``"blocks.*.mlp"`` the MLP of
    every block.  A pattern that matches nothing this way falls back to ``fnmatch``, where
    ``*`` also crosses dots (``"*attn"`` → ``blocks.0.attn`` …).  The same rules hold wherever
    traindyn takes layer names (``capture``, ``Monitor``, ``traindyn analyze``).

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
        regex = layer_pattern(pattern)
        matches = [name for name in modules if regex.match(name)]
        if not matches:
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


def first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for attr in ("last_hidden_state", "hidden_states", "logits"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find a tensor in a module output of type {type(output).__name__}")


def _token_samples(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    positions: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Rows of ``x`` (b, t, f) at valid positions, at most ``positions`` per sequence."""
    if mask is None:
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    else:
        valid = mask.to(x.device) > 0
    if positions is not None and positions < x.shape[1]:
        scores = torch.rand(x.shape[:2], generator=generator).to(x.device)
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        top = scores.topk(positions, dim=1)
        keep = torch.zeros_like(valid)
        keep.scatter_(1, top.indices, top.values >= 0)
        valid = keep
    return x[valid]


def reduce_tokens(
    x: torch.Tensor,
    reduce: Reduce = "flatten",
    attention_mask: torch.Tensor | None = None,
    positions: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reduce a ``(batch, tokens, features)`` output to ``(samples, features)`` by a named rule.

    2-D outputs pass through unchanged for every rule but ``"none"`` (which never changes
    anything).  See the module docstring for the rules; ``positions`` (at most that many
    token positions per sequence) and ``generator`` apply to ``"tokens"``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce rule {reduce!r}; choose one of {REDUCTIONS}")
    if positions is not None and positions < 1:
        raise ValueError(f"positions must be a positive number of tokens; got {positions}")
    if reduce == "none" or x.ndim <= 2:
        return x
    if reduce == "flatten":
        return x.reshape(x.shape[0], -1)
    if x.ndim != 3:
        raise ValueError(
            f"reduce={reduce!r} expects (batch, tokens, features); got {tuple(x.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"attention mask shape {tuple(attention_mask.shape)} does not match "
                         f"{tuple(x.shape[:2])}")
    if reduce == "tokens":
        return _token_samples(x, attention_mask, positions, generator)
    if reduce == "cls":
        return x[:, 0]
    if attention_mask is None:
        return x.mean(1) if reduce == "mean" else x[:, -1]
    mask = attention_mask.to(device=x.device, dtype=x.dtype)
    empty = (mask > 0).sum(1) == 0
    if bool(empty.any()):
        rows = torch.nonzero(empty).reshape(-1).tolist()
        raise ValueError(f"attention_mask: sequences {rows[:10]} have no non-pad token, so "
                         f"reduce={reduce!r} is undefined for them; drop them from the batch")
    if reduce == "mean":
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    # last non-pad token: the highest position whose mask is 1 (works for left and right padding)
    idx = torch.arange(x.shape[1], device=x.device).expand_as(mask)
    last = torch.where(mask > 0, idx, torch.full_like(idx, -1)).amax(1).clamp(min=0)
    return x[torch.arange(x.shape[0], device=x.device), last]


class capture:  # noqa: N801 - used as a function-like context manager
    """Record (or stream) the outputs of named modules during forward passes.

    Parameters
    ----------
    model : nn.Module
    layers : str or iterable of str
        Module names or glob patterns; unknown names raise ``KeyError`` listing what exists.
    reduce : {"flatten", "mean", "last", "cls", "tokens", "none"}
        Token reduction applied as each output arrives (module docstring).
    sink : callable ``(layer_name, tensor) -> None``, optional
        Receives each reduced batch instead of storing it (for streaming accumulators).
    device : torch.device or str, optional
        Move captured tensors here (default: leave them where they are).
    dtype : torch.dtype, optional
        Cast captured tensors (e.g. ``torch.float64``).
    positions : int, optional
        With ``reduce="tokens"``: keep at most this many positions per sequence.
    seed : int
        Seed of the position subsampling (a private generator; the global RNG is untouched).
    calls : {"once", "first", "last"}
        What a layer called more than once in one forward pass of ``model`` records:
        ``"once"`` (default) raises ``RuntimeError`` naming the module and the number of calls;
        ``"first"`` / ``"last"`` keep that call's output (with ``"last"`` a layer's batch is
        recorded, or handed to ``sink``, when the model's forward pass returns).

    Captured tensors never share memory with a module's output (module docstring), so
    in-place operations later in the forward pass leave them as they were.

    Set ``cap.attention_mask`` before a forward pass to reduce under a padding mask
    (:meth:`run` does it from ``batch["attention_mask"]``).

    Examples
    --------
    >>> with capture(model, ["encoder.layer.*.output"], reduce="mean") as cap:  # doctest: +SKIP
    ...     model(**batch)
    >>> feats = cap["encoder.layer.5.output"]                                # doctest: +SKIP
    >>> with capture(model, ["net.1"]) as cap:                                # doctest: +SKIP
    ...     cap.run(loader)          # every batch, under torch.no_grad
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Iterable[str],
        reduce: Reduce = "flatten",
        sink: Callable[[str, torch.Tensor], None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        positions: int | None = None,
        seed: int = 0,
        calls: Calls = "once",
    ) -> None:
        if calls not in CALLS:
            raise ValueError(f"unknown calls rule {calls!r}; choose one of {CALLS}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduce rule {reduce!r}; choose one of {REDUCTIONS}")
        if positions is not None and (reduce != "tokens" or positions < 1):
            raise ValueError("positions=k (k >= 1) subsamples token positions and needs "
                             f"reduce='tokens'; got reduce={reduce!r}, positions={positions}")
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.reduce = reduce
        self.sink = sink
        self.device = device
        self.dtype = dtype
        self.positions = positions
        self.generator = torch.Generator().manual_seed(seed)
        self.attention_mask: torch.Tensor | None = None
        self._batches: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.calls = calls
        self._depth = 0                       # > 0 inside a forward pass of the model
        self._count: dict[str, int] = {}      # calls of each layer in the current pass
        self._last: dict[str, torch.Tensor] = {}  # calls="last": the latest call's batch

    @property
    def layers(self) -> list[str]:
        """Resolved layer names, in model order."""
        return list(self.modules)

    def _emit(self, name: str, x: torch.Tensor) -> None:
        if self.sink is not None:
            self.sink(name, x)
        else:
            self._batches[name].append(x)

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if self._depth > 0:
                count = self._count[name] = self._count.get(name, 0) + 1
                if count > 1 and self.calls == "once":
                    raise RuntimeError(
                        f"layer {name!r} ({type(module).__name__}) was called {count} times in "
                        f"one forward pass of {type(self.model).__name__} (a module used twice, "
                        "e.g. a shared activation or weight sharing), so its outputs are not "
                        "one feature vector per input; capture another module (the block "
                        "around it) or choose a call with calls='first' or calls='last'")
                if count > 1 and self.calls == "first":
                    return
            out = first_tensor(output).detach()
            x = reduce_tokens(out, self.reduce, self.attention_mask, self.positions,
                              self.generator)
            if self.device is not None or self.dtype is not None:
                x = x.to(device=self.device, dtype=self.dtype)
            if _shares_memory(x, out):
                x = x.clone()  # a value: later in-place ops on the output must not reach it
            if self._depth > 0 and self.calls == "last":
                self._last[name] = x
            else:
                self._emit(name, x)

        return hook

    def _pass_starts(self, module: nn.Module, inputs: object) -> None:
        if self._depth == 0:
            self._count.clear()
            self._last.clear()
        self._depth += 1

    def _pass_ends(self, module: nn.Module, inputs: object, output: object) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            last, self._last = self._last, {}
            for name in self.modules:  # model order
                if name in last:
                    self._emit(name, last[name])

    def __enter__(self) -> capture:
        try:
            self._depth = 0
            self._handles.append(self.model.register_forward_pre_hook(self._pass_starts))
            self._handles.append(self.model.register_forward_hook(self._pass_ends,
                                                                  always_call=True))
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

    def run(
        self,
        loader: Iterable[Any],
        forward: Callable[[nn.Module, Any], Any] | None = None,
        max_batches: int | None = None,
        on_batch: Callable[[Any], None] | None = None,
    ) -> int:
        """Run every batch of ``loader`` through the model under ``torch.no_grad``.

        Each batch is moved to the model's device and passed by ``forward(model, batch)``
        (default :func:`default_forward`); a mapping with an ``attention_mask`` sets the
        mask for the reduction.  ``on_batch(batch)`` is called after each forward pass (e.g.
        to hand labels to an accumulator).  The model's train/eval mode is left as it is.
        Hooks must be registered (inside ``with``).  Returns the number of batches run.
        """
        if not self._handles:
            raise RuntimeError("capture.run needs the hooks: use it inside `with capture(...)`")
        forward = forward or default_forward
        device = _model_device(self.model)
        count = 0
        with torch.no_grad():
            for batch in loader:
                if max_batches is not None and count >= max_batches:
                    break
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                self.attention_mask = mask
                try:
                    forward(self.model, batch)
                finally:
                    self.attention_mask = None
                if on_batch is not None:
                    on_batch(batch)
                count += 1
        return count

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


def _shares_memory(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``x`` lies in the storage of ``out`` (is it or a view of it)."""
    try:
        return x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # storage-less tensors (e.g. some subclasses)
        return True


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()}) \
            if not hasattr(batch, "to") else batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """How :meth:`capture.run` feeds a batch: ``model(**batch)`` for a mapping (a tokenizer's
    output), ``model(batch[0])`` for a ``(inputs, targets, …)`` tuple or list, else
    ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _default_labels(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "targets", "y"):
            if key in batch:
                return batch[key]
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return batch[1]
    raise ValueError("cannot find labels in the batch: pass labels=callable(batch) -> labels")


def stream_features(
    model: nn.Module,
    loader: Iterable[Any],
    layers: str | Iterable[str],
    accumulator: Callable[[], Any],
    reduce: Reduce = "flatten",
    labels: bool | Callable[[Any], Any] = False,
    positions: int | None = None,
    seed: int = 0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    calls: Calls = "once",
) -> dict[str, Any]:
    """Feed one accumulator per layer with every batch of ``loader``; nothing is stored.

    Parameters
    ----------
    model, layers, reduce, positions, seed
        As for :class:`capture`.
    loader : iterable of batches
        Tensors, ``(inputs, targets)`` tuples or mappings (see :func:`default_forward`).
    accumulator : callable returning an object with ``update``
        A factory, called once per layer: e.g. ``SpectralMetrics`` or
        ``lambda: SpectralMetrics(["rankme", "alpha_req"])`` or ``CollapseAccumulator``.
    labels : bool or callable
        Pass labels to ``update(features, labels)``: ``True`` takes them from the batch
        (``batch[1]`` or ``batch["labels"]``), a callable ``batch -> labels`` picks them.
        Per-sequence labels need a per-sequence reduction (not ``"tokens"``).
    forward : callable ``(model, batch)``, optional
    max_batches : int, optional
    calls : {"once", "first", "last"}
        For a module called more than once per forward pass (:class:`capture`).

    Returns
    -------
    dict
        ``{layer_name: accumulator}`` in model order; call ``compute()`` on each.
    """
    if labels and reduce in ("tokens", "none"):
        raise ValueError(f"labels need one feature vector per sequence; reduce={reduce!r} "
                         "does not give that")
    layer_names = list(resolve_layers(model, layers))
    accs = {name: accumulator() for name in layer_names}
    label_fn = _default_labels if labels is True else (labels or None)
    pending: dict[str, torch.Tensor] = {}

    def sink(name: str, x: torch.Tensor) -> None:
        if label_fn is None:
            accs[name].update(x)
        else:
            pending[name] = x  # labels arrive with the batch, after the forward pass

    def on_batch(batch: Any) -> None:
        if label_fn is None:
            return
        y = label_fn(batch)
        for name, x in pending.items():
            accs[name].update(x, y)
        pending.clear()

    with capture(model, layer_names, reduce=reduce, sink=sink, positions=positions,
                 seed=seed, calls=calls) as cap:
        cap.run(loader, forward=forward, max_batches=max_batches, on_batch=on_batch)
    return accs
