"""Plumbing shared by the NTK engines: parameter selection, inputs, memory, and math attention.

Attention (:class:`MathMode`).  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
take fused fast paths in eval mode, and ``F.scaled_dot_product_attention`` dispatches to fused
CPU/CUDA kernels; those have neither batching (``vmap``) nor forward-mode (``jvp``) rules, and
their internals (the input and output projections) are invisible to the structured engine.  Every
engine therefore runs the model inside :class:`MathMode`, a ``TorchFunctionMode`` that

* switches those fast paths off (a function mode makes ``has_torch_function`` true, which the
  modules check before taking them);
* replaces ``F.multi_head_attention_forward`` by :func:`mha_math`, the same computation written
  with ``F.linear`` for the projections (so the structured engine sees the parameters) and
  :func:`sdpa_math` for the attention itself;
* replaces ``F.scaled_dot_product_attention`` by :func:`sdpa_math`,
  ``softmax(q kᵀ / √d + mask) v`` (Vaswani et al. 2017, Eq. 1) from matmuls and a softmax,
  which ``vmap``, ``jvp`` and batched backward passes all support.

Options the math path does not reproduce (``bias_k``/``bias_v``, ``add_zero_attn``,
``static_k``/``static_v``, dropout in training mode, grouped-query SDPA) run the original
function unchanged.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from traindyn.probes._arrays import ArrayLike, as_tensor, on_device
from traindyn.probes.capture import first_tensor

ParamSpec = str | Iterable[str] | Iterable[nn.Parameter] | None


def batch_coupled_modules(model: nn.Module) -> list[str]:
    """Names of modules that mix samples of a batch: BatchNorm using batch statistics.

    A ``_BatchNorm`` uses batch statistics when ``training`` is True or it tracks no running
    statistics (``track_running_stats=False``).
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats
        ):
            out.append(name or type(m).__name__)
    return out


def active_dropout_modules(model: nn.Module) -> list[str]:
    """Names of Dropout modules in training mode with ``p > 0``: each forward pass draws a new
    random mask, so Jacobians taken in separate passes belong to different networks."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]


def select_parameters(model: nn.Module, params: ParamSpec = None) -> dict[str, nn.Parameter]:
    """Resolve a parameter subset to ``{name: parameter}`` (tied parameters appear once).

    ``params`` may be None (every parameter with ``requires_grad``, or every parameter when
    none requires grad), parameter names, module
    names (all parameters below that module, e.g. ``"net.0"``), glob patterns (``"*.weight"``),
    or parameter objects.  A name that matches nothing raises ``KeyError`` listing the names.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad} or dict(named)
    else:
        if isinstance(params, str):
            params = [params]
        params = list(params)
        chosen = {}
        by_id = {id(p): n for n, p in named.items()}
        for spec in params:
            if isinstance(spec, torch.Tensor):
                if id(spec) not in by_id:
                    raise KeyError("a parameter object passed in `params` is not in the model")
                chosen[by_id[id(spec)]] = spec
                continue
            hits = [n for n in named if n == spec or n.startswith(spec + ".")
                    or fnmatch.fnmatchcase(n, spec)]
            if not hits:
                raise KeyError(f"no parameter matches {spec!r}; parameters: {', '.join(named)}")
            chosen.update({n: named[n] for n in hits})
        chosen = {n: named[n] for n in named if n in chosen}  # model order
    if not chosen:
        raise ValueError("no parameters selected: the NTK over an empty set is zero")
    return chosen


def device_dtype(chosen: dict[str, nn.Parameter]) -> tuple[torch.device, torch.dtype]:
    p = next(iter(chosen.values()))
    return p.device, p.dtype


def prepare_input(x: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = on_device(as_tensor(x), device)
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    if t.ndim < 1 or t.shape[0] == 0:
        raise ValueError(f"inputs must have a non-empty batch axis; got shape {tuple(t.shape)}")
    return t


def outputs(model, x: torch.Tensor) -> torch.Tensor:
    """The model's first tensor output, flattened to ``(n, k)``."""
    out = first_tensor(model(x))
    return out.reshape(out.shape[0], -1)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-Linux
        return 8 * 2**30


class requires_grad:  # noqa: N801
    """Temporarily set ``requires_grad`` on the chosen parameters."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc: object) -> None:
        for p, f in zip(self.params, self.flags, strict=False):
            p.requires_grad_(f)


# ----------------------------------------------------------------------------- math attention
def sdpa_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """``softmax(q kᵀ·scale + mask) v`` from matmuls (Vaswani et al. 2017, Eq. 1).

    Same arguments and conventions as ``F.scaled_dot_product_attention``: a boolean mask keeps
    the ``True`` positions, a float mask is added to the scores.
    """
    L, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    w = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        w = F.dropout(w, dropout_p)
    return w @ v


def mha_math(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
             bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
             training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
             use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
             v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
             is_causal=False):
    """``F.multi_head_attention_forward`` from ``F.linear``, matmuls and a softmax.

    Inputs are sequence-first ``(L, N, E)`` (or unbatched ``(L, E)``), as in the functional
    form; the projections call ``F.linear`` with the module's own parameters (for packed
    weights, one call per distinct input, keeping the slice that input needs), so a function
    mode sees them.
    """
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    S = key.shape[0]
    H = num_heads
    hd = E // H
    # batch-first inside: F.linear's leading axis is the sample axis the structured engine reads
    seen: dict[int, torch.Tensor] = {}
    for t in (query, key, value):
        seen.setdefault(id(t), t.transpose(0, 1))
    qb, kb, vb = seen[id(query)], seen[id(key)], seen[id(value)]
    if not use_separate_proj_weight:
        cache: dict[int, torch.Tensor] = {}

        def proj(x, i):
            if id(x) not in cache:
                cache[id(x)] = F.linear(x, in_proj_weight, in_proj_bias)
            return cache[id(x)][..., i * E:(i + 1) * E]

        q, k, v = proj(qb, 0), proj(kb, 1), proj(vb, 2)
    else:
        bq = bk = bv = None
        if in_proj_bias is not None:
            bq, bk, bv = in_proj_bias.split(E)
        q = F.linear(qb, q_proj_weight, bq)
        k = F.linear(kb, k_proj_weight, bk)
        v = F.linear(vb, v_proj_weight, bv)
    # (N, L, E) -> (N, H, L, hd)
    q = q.reshape(N, L, H, hd).transpose(1, 2)
    k = k.reshape(N, S, H, hd).transpose(1, 2)
    v = v.reshape(N, S, H, hd).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.dim() == 3:  # (N·H, L, S)
            mask = mask.reshape(N, H, L, S)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                mask, float("-inf"))
    elif is_causal:
        mask = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(
            ~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if kpm.dtype == torch.bool:
            kpm = torch.zeros(kpm.shape, dtype=q.dtype, device=q.device).masked_fill(
                kpm, float("-inf"))
        kpm = kpm.reshape(N, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    if mask is not None:
        scores = scores + mask
    w = torch.softmax(scores, dim=-1)
    if training and dropout_p > 0:
        w = F.dropout(w, dropout_p)
    out = (w @ v).transpose(1, 2).reshape(N, L, E)
    out = F.linear(out, out_proj_weight, out_proj_bias).transpose(0, 1)
    weights = None
    if need_weights:
        weights = w.mean(1) if average_attn_weights else w
        if unbatched:
            weights = weights.squeeze(0)
    if unbatched:
        out = out.squeeze(1)
    return out, weights


_MHA_NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
              "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p",
              "out_proj_weight", "out_proj_bias", "training")


def _mha_supported(args: tuple, kwargs: dict) -> bool:
    vals = dict(zip(_MHA_NAMES, args, strict=False))
    vals.update(kwargs)
    if vals.get("bias_k") is not None or vals.get("bias_v") is not None:
        return False
    if vals.get("add_zero_attn") or vals.get("static_k") is not None:
        return False
    if vals.get("static_v") is not None:
        return False
    return not (vals.get("training", True) and vals.get("dropout_p", 0.0) > 0)


class MathMode(TorchFunctionMode):
    """Run attention as math (module docstring); subclasses intercept more functions."""

    n_ops = 0  # torch functions seen (a dispatch count for the cost model)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.n_ops += 1
        if func is F.multi_head_attention_forward and _mha_supported(args, kwargs):
            with self:  # re-enter so the projections' F.linear calls reach this mode
                return mha_math(*args, **kwargs)
        if func is F.scaled_dot_product_attention and not kwargs.get("enable_gqa", False):
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if not dropout:
                return sdpa_math(*args, **kwargs)
        return self.handle(func, args, kwargs)

    def handle(self, func, args: tuple, kwargs: dict):
        return func(*args, **kwargs)
