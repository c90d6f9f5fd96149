"""A tiny causal transformer language model on bytes of the Python standard library's source.

The small-scale setting of Wortsman et al. (2023), "Small-scale proxies for large-scale
Transformer training instabilities": pre-LayerNorm blocks, an explicit attention module whose
queries and keys pass through hookable identity modules (``blocks.{i}.attn.q_out`` and
``blocks.{i}.attn.k_out``, shape ``(batch, heads, tokens, d_head)``, after the optional
qk-layernorm), optional z-loss, AdamW with linear warm-up and cosine decay.

The corpus needs no download: it is the concatenated ``*.py`` files at the top level of the
running interpreter's standard library (sorted by name), read as bytes (vocabulary 256).
Different Python versions give slightly different corpora; the first bytes of the corpus are
hashed into the Dataset's parameters so runs can be compared.

::

    config = TinyLMConfig(n_layers=2, d_model=64, qk_layernorm=True)
    ds = train_tiny_lm(config, steps=1000, lr=3e-3, z_loss=1e-4,
                       checkpoint_dir="ckpt", checkpoint_steps=log_steps(1000, 12))
    model = load_tiny_lm("ckpt/step001000.safetensors")     # config read from ckpt/config.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.nn import functional as F
from traindyn.dynamics import records

__all__ = [
    "CausalSelfAttention",
    "TinyLM",
    "TinyLMConfig",
    "checkpoint_name",
    "initial_loss",
    "load_corpus",
    "load_tiny_lm",
    "lm_loss",
    "train_tiny_lm",
    "train_tiny_lm_flat",
]


@dataclass(frozen=True)
class TinyLMConfig:
    """Architecture of :class:`TinyLM` (plain values, stored as ``config.json`` with checkpoints).

    Attributes
    ----------
    vocab_size : int
        256 for byte-level tokens.
    context : int
        Maximum sequence length (learned absolute position embeddings).
    d_model, n_layers, n_heads, mlp_ratio :
        Width, depth, heads (``d_model`` must divide by ``n_heads``), MLP hidden = ratio × width.
    qk_layernorm : bool
        LayerNorm on queries and keys per head before the dot product (Dehghani et al. 2023;
        Wortsman et al. 2023, Sec. 3.1.2).
    dropout : float
        Dropout on attention weights and residual branches (0 by default).
    """

    vocab_size: int = 256
    context: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    qk_layernorm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyLMConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with queries and keys exposed to hooks.

    Attention logits ``z_ij = q_iᵀ k_j / √d_head`` (Vaswani et al. 2017, Eq. 1) for ``j ≤ i``.
    ``q_out`` and ``k_out`` are identity modules receiving ``q`` and ``k`` of shape
    ``(batch, heads, tokens, d_head)`` after the optional qk-layernorm, so a forward hook on
    them sees exactly the vectors whose dot products enter the softmax.
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.d_head = config.d_model // config.n_heads
        d = config.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm = nn.LayerNorm(self.d_head) if config.qk_layernorm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.d_head) if config.qk_layernorm else nn.Identity()
        self.q_out = nn.Identity()
        self.k_out = nn.Identity()
        self.attn_drop = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.context, config.context, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        q = self.q_out(self.q_norm(heads(self.q_proj(x))))
        k = self.k_out(self.k_norm(heads(self.k_proj(x))))
        v = heads(self.v_proj(x))
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        logits = logits.masked_fill(~self.mask[:t, :t], float("-inf"))
        weights = self.attn_drop(torch.softmax(logits, dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(y)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_ratio * d, bias=False), nn.GELU(),
            nn.Linear(config.mlp_ratio * d, d, bias=False),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyLM(nn.Module):
    """Token + position embedding, ``n_layers`` pre-LN blocks, final LayerNorm, linear head.

    Module names: ``embed``, ``pos_embed``, ``blocks.{i}`` (residual stream after block i),
    ``blocks.{i}.attn`` (:class:`CausalSelfAttention`), ``ln_f``, ``head``.  Weights are drawn
    from N(0, 1/fan_in) (embeddings N(0, 1)); LayerNorms start at identity.
    """

    def __init__(self, config: TinyLMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TinyLMConfig()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.context, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)

    @property
    def attention_names(self) -> list[str]:
        """Names of the attention modules, ``blocks.{i}.attn``."""
        return [f"blocks.{i}.attn" for i in range(self.config.n_layers)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, tokens, vocab)`` for integer ``tokens`` ``(batch, tokens)``."""
        t = tokens.shape[1]
        if t > self.config.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.config.context}")
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.embed(tokens) + self.pos_embed(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(
    n_bytes: int | None = 2_000_000, directory: str | os.PathLike | None = None
) -> torch.Tensor:
    """Byte tokens (int64, values 0..255) of the standard library's top-level ``*.py`` files.

    Files are read in sorted order and concatenated; ``n_bytes`` caps the length (``None``: all,
    about 4.7 MB on CPython 3.11).  ``directory`` reads another folder of ``*.py`` files instead.
    """
    root = Path(directory) if directory is not None else _stdlib_dir()
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in {root}; pass directory= to a source folder")
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if n_bytes is not None and total >= n_bytes:
            break
    blob = b"".join(chunks)
    if n_bytes is not None:
        blob = blob[:n_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64)


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy plus z-loss; returns ``(total, cross_entropy, mean log Z)``.

    z-loss ``= c · mean_tokens (log Z)²`` with ``log Z = logsumexp_v(logits_v)``, which keeps
    the softmax normaliser near 1 (Chowdhery et al. 2022, Sec. 5; Wortsman et al. 2023,
    Sec. 3.2, coefficient 1e-4).
    """
    log_z = torch.logsumexp(logits.float(), dim=-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    total = ce + z_loss * (log_z**2).mean() if z_loss else ce
    return total, ce, log_z.mean()


def checkpoint_name(step: int, fmt: str = "safetensors") -> str:
    """File name of the checkpoint at ``step``: ``step000100.safetensors`` (or ``.pt``)."""
    if fmt not in ("safetensors", "pt"):
        raise ValueError(f"checkpoint format must be 'safetensors' or 'pt', got {fmt!r}")
    return f"step{int(step):06d}.{fmt}"


def _save_checkpoint(model: TinyLM, folder: Path, step: int, fmt: str) -> Path:
    path = folder / checkpoint_name(step, fmt)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"step": str(step)})
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_tiny_lm(path: str | os.PathLike, config: TinyLMConfig | None = None) -> TinyLM:
    """Rebuild a :class:`TinyLM` from a ``.safetensors`` or ``.pt`` state dict.

    Without ``config``, ``config.json`` next to the checkpoint (written by
    :func:`train_tiny_lm`) gives the architecture.
    """
    path = Path(path)
    if config is None:
        cfg_path = path.parent / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"no config given and no {cfg_path}; pass config=")
        config = TinyLMConfig.from_dict(json.loads(cfg_path.read_text())["model"])
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyLM(config)
    model.load_state_dict(state)
    return model


def _lr_at(step: int, steps: int, lr: float, warmup: int, final_fraction: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``final_fraction·lr``.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch(data: torch.Tensor, batch_size: int, context: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def train_tiny_lm(
    config: TinyLMConfig | None = None,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    z_loss: float = 0.0,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    final_lr_fraction: float = 0.0,
    eval_steps: Iterable[int] | None = None,
    n_evals: int = 20,
    eval_batches: int = 4,
    corpus: torch.Tensor | None = None,
    val_fraction: float = 0.1,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_steps: Iterable[int] | None = None,
    checkpoint_format: str = "safetensors",
    device: str | torch.device = "cpu",
    monitor: object | None = None,
    model: TinyLM | None = None,
) -> xr.Dataset:
    """Train :class:`TinyLM` with AdamW on next-byte prediction and record its losses.

    Parameters
    ----------
    config : TinyLMConfig
    steps : int
        Optimiser steps; evaluations may be made at ``0..steps``.
    lr : float
        Peak learning rate of a linear warm-up (``warmup`` steps, default ``steps // 10``) and
        cosine decay to ``final_lr_fraction · lr`` (Wortsman et al. 2023, Sec. 2).
    z_loss : float
        Coefficient of the z-loss (:func:`lm_loss`); 1e-4 in Wortsman et al.
    weight_decay : float
        AdamW decoupled weight decay (applied to matrices only).
    eval_steps : iterable of int, optional
        Steps at which the validation loss, mean log Z and the maximum attention logit are
        recorded (default: ``n_evals`` log-spaced steps including 0 and ``steps``).
    corpus : tensor, optional
        Byte tokens (default :func:`load_corpus`); the last ``val_fraction`` is held out.
    checkpoint_dir, checkpoint_steps :
        Save the state dict at these steps as ``step000100.safetensors`` (or ``.pt`` with
        ``checkpoint_format="pt"``), with ``config.json`` holding the configuration.
    monitor : dynamics.monitor.Monitor, optional
        Called as ``monitor.step(step, train_loss=…)`` after each step's loss is known (build
        it on ``model``).
    model : TinyLM, optional
        Train this model (its ``config`` replaces ``config``) instead of a fresh one made
        after ``torch.manual_seed(seed)``; the data order still follows ``seed``.

    Returns
    -------
    xarray.Dataset
        Over ``step``: ``train_loss`` (cross-entropy of the batch at that step), ``val_loss``,
        ``mean_log_z`` (mean log partition function on validation tokens); over
        ``(step, layer)``: ``max_attention_logit`` per attention module.  If the loss becomes
        non-finite, training stops, later entries are NaN and attr ``diverged`` is 1.
    """
    from traindyn.dynamics.schedules import log_steps
    from traindyn.probes.instability import attention_logit_stats

    if model is not None:
        config = model.config
    config = config or TinyLMConfig()
    device = torch.device(device)
    if corpus is None:
        corpus = load_corpus()
    corpus = torch.as_tensor(corpus, dtype=torch.int64)
    n_val = max(int(len(corpus) * val_fraction), config.context + 2)
    train_data, val_data = corpus[:-n_val], corpus[-n_val:]
    if len(train_data) <= config.context + 1:
        raise ValueError(f"corpus of {len(corpus)} tokens is too short for context "
                         f"{config.context}")
    warmup = steps // 10 if warmup is None else warmup
    evals = sorted({int(s) for s in (eval_steps if eval_steps is not None
                                     else log_steps(steps, n_evals))} & set(range(steps + 1)))
    ckpts = {int(s) for s in checkpoint_steps} if checkpoint_steps is not None else set()
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        params_for_file = dict(model=config.to_dict(), steps=steps, lr=lr,
                               batch_size=batch_size, seed=seed, z_loss=z_loss,
                               weight_decay=weight_decay, warmup=warmup)
        (folder / "config.json").write_text(json.dumps(params_for_file, indent=2))

    torch.manual_seed(seed)
    model = (model if model is not None else TinyLM(config)).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    val_gen = torch.Generator().manual_seed(10_000 + seed)
    val_batches = [_batch(val_data, batch_size, config.context, val_gen)
                   for _ in range(eval_batches)]
    val_batches = [(x.to(device), y.to(device)) for x, y in val_batches]

    n_layers = config.n_layers
    rec = {name: np.full(len(evals), np.nan) for name in ("train_loss", "val_loss", "mean_log_z")}
    rec_attn = np.full((len(evals), n_layers), np.nan)
    eval_index = {s: i for i, s in enumerate(evals)}
    diverged = False

    def evaluate(step: int, train_loss: float) -> None:
        i = eval_index[step]
        rec["train_loss"][i] = train_loss
        was_training = model.training
        model.eval()
        with torch.no_grad():
            losses, log_zs, maxima = [], [], np.zeros(n_layers)
            for x, y in val_batches:
                stats = attention_logit_stats(model, x, model.attention_names)
                maxima = np.maximum(maxima, stats["max_attention_logit"])
                _, ce, log_z = lm_loss(stats["output"], y)
                losses.append(ce.item())
                log_zs.append(log_z.item())
        model.train(was_training)
        rec["val_loss"][i] = float(np.mean(losses))
        rec["mean_log_z"][i] = float(np.mean(log_zs))
        rec_attn[i] = maxima

    model.train()
    for step in range(steps + 1):
        if folder is not None and step in ckpts:
            _save_checkpoint(model, folder, step, checkpoint_format)
        x, y = _batch(train_data, batch_size, config.context, gen)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss, ce, _ = lm_loss(logits, y, z_loss)
        ce_value = ce.item()
        if not math.isfinite(ce_value):
            diverged = True
            break
        if step in eval_index:
            evaluate(step, ce_value)
        if monitor is not None:
            monitor.step(step, train_loss=ce_value)
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup, final_lr_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    coords = records.step_coords(evals, lr)
    coords["layer"] = ("layer", np.array(model.attention_names, dtype=object))
    coords["seed"] = seed
    attrs = {name: records.variable_attrs(name) for name in rec}
    attrs["val_loss"] = {"long_name": "validation cross-entropy", "units": "nat"}
    attrs["mean_log_z"] = {"long_name": "mean log partition function of output logits",
                           "units": "nat", "source": "Wortsman et al. (2023), Sec. 3.2"}
    data_vars = {name: ("step", values, attrs[name]) for name, values in rec.items()}
    data_vars["max_attention_logit"] = (
        ("step", "layer"), rec_attn,
        {"long_name": "maximum attention logit |q·k|/√d_head", "units": "1",
         "source": "Wortsman et al. (2023), Sec. 3.1"})
    corpus_hash = hashlib.sha1(corpus[:100_000].numpy().astype(np.uint8).tobytes()).hexdigest()
    params = dict(model=config.to_dict(), steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                  z_loss=z_loss, weight_decay=weight_decay, warmup=warmup,
                  final_lr_fraction=final_lr_fraction, corpus_tokens=len(corpus),
                  corpus_sha1_100k=corpus_hash)
    return xr.Dataset(data_vars, coords=coords, attrs={
        "source": "traindyn recipe tiny_lm (bytes of the Python standard library, AdamW)",
        "parameters": records.params_attr(params),
        "diverged": int(diverged),
    })


def initial_loss(config: TinyLMConfig | None = None, seed: int = 0,
                 corpus: Sequence[int] | torch.Tensor | None = None, batches: int = 4,
                 batch_size: int = 16) -> float:
    """Validation cross-entropy of the freshly initialised model (``L₀`` of LR sensitivity)."""
    ds = train_tiny_lm(config, steps=0, lr=1e-3, seed=seed, corpus=corpus, eval_steps=[0],
                       eval_batches=batches, batch_size=batch_size)
    return float(ds["val_loss"].isel(step=0))


def train_tiny_lm_flat(
    lr: float = 1e-3,
    steps: int = 500,
    seed: int = 0,
    qk_layernorm: bool = False,
    z_loss: float = 0.0,
    corpus_bytes: int = 500_000,
    **kwargs,
) -> xr.Dataset:
    """:func:`train_tiny_lm` with flat keyword arguments, for ``dynamics.sweep`` grids.

    Keyword arguments that are fields of :class:`TinyLMConfig` (``d_model``, ``n_layers`` …)
    build the configuration; the rest go to :func:`train_tiny_lm`.  The corpus is the first
    ``corpus_bytes`` bytes of :func:`load_corpus`.
    """
    fields = {f.name for f in dataclasses.fields(TinyLMConfig)}
    config = TinyLMConfig(qk_layernorm=qk_layernorm,
                          **{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    return train_tiny_lm(config, steps=steps, lr=lr, seed=seed, z_loss=z_loss,
                         corpus=load_corpus(corpus_bytes), **kwargs)
