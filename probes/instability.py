"""Small-scale proxies of Transformer training instabilities (Wortsman et al. 2023).

Wortsman, Liu, Xiao, Everett, Alemi, Adlam, Co-Reyes, Gur, Kumar, Novak, Pennington,
Sohl-Dickstein, Xu, Lee, Gilmer, Kornblith (2023), "Small-scale proxies for large-scale
Transformer training instabilities" (arXiv:2309.14322):

* **attention-logit growth** (Sec. 3.1): the logits ``z_ij = q_iᵀ k_j / √d_head`` grow in
  magnitude at high learning rates until the softmax collapses to one-hot; tracked here as
  ``max_{b,h,i≥j} |z_ij|`` per attention module.  qk-layernorm prevents it.
* **output-logit divergence** (Sec. 3.2): the log partition function ``log Z = log Σ_v e^{y_v}``
  of the output logits drifts far from 0; z-loss ``1e-4 · log² Z`` prevents it.
* **learning-rate sensitivity** (Sec. 2.2, Eq. 1): ``E_{lr}[min(L(lr), L₀) − L*]`` over a
  log-spaced learning-rate sweep, ``L₀`` the loss at initialisation and ``L*`` the best loss
  of the sweep.

Math on arrays (:func:`max_attention_logit`, :func:`log_partition`, :func:`lr_sensitivity`)
is kept apart from the hook plumbing (:func:`attention_logit_stats`), which finds the queries
and keys through forward hooks on sub-modules of each attention module (by default the
identity modules ``q_out`` and ``k_out`` of ``dynamics.recipes.tiny_lm``; any other names can
be given) and always removes its hooks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from traindyn.probes._arrays import STAT_DTYPE, ArrayLike, as_tensor
from traindyn.probes.capture import resolve_layers
from traindyn.probes.registry import Probe, Variable, register

__all__ = [
    "attention_logit_stats",
    "attention_logits_probe",
    "find_attention_modules",
    "log_partition",
    "log_partition_drift",
    "log_partition_probe",
    "lr_sensitivity",
    "max_attention_logit",
]

SOURCE = "Wortsman et al. (2023), Small-scale proxies for large-scale Transformer instabilities"


def max_attention_logit(
    q: ArrayLike, k: ArrayLike, causal: bool = True, scale: float | None = None
) -> float:
    """Largest attention-logit magnitude ``max |z_ij|``, ``z_ij = scale · q_iᵀ k_j``.

    Wortsman et al. (2023), Sec. 3.1 (their Fig. 3 tracks the maximum attention logit).

    Parameters
    ----------
    q, k : array ``(..., tokens, d_head)``
        Queries and keys with matching leading (batch, head) axes.
    causal : bool
        Only pairs ``j ≤ i`` (positions a causal model attends to).
    scale : float, optional
        Default ``1/√d_head``, the scaling applied before the softmax (Vaswani et al. 2017).
    """
    qt, kt = as_tensor(q, STAT_DTYPE), as_tensor(k, STAT_DTYPE)
    if qt.shape != kt.shape or qt.ndim < 2:
        raise ValueError(f"q and k must have the same shape (..., tokens, d_head); got "
                         f"{tuple(qt.shape)} and {tuple(kt.shape)}")
    if qt.numel() == 0:
        raise ValueError(f"q and k are empty: shape {tuple(qt.shape)}")
    scale = 1.0 / math.sqrt(qt.shape[-1]) if scale is None else scale
    logits = (qt @ kt.transpose(-2, -1)).abs() * scale
    if causal:
        t = qt.shape[-2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=logits.device))
        logits = logits.masked_fill(~keep, 0.0)
    value = logits.max().item()
    if not math.isfinite(value):
        warnings.warn("attention logits are not finite (diverged run?)", RuntimeWarning,
                      stacklevel=2)
        return float("nan")
    return float(value)


def log_partition(logits: ArrayLike) -> torch.Tensor:
    """``log Z = log Σ_v exp(y_v)`` over the last axis, in float64 (Wortsman et al. 2023, Sec. 3.2).

    ``log Z = 0`` when the logits already are log-probabilities; its drift away from 0 is the
    output-logit divergence that z-loss suppresses.
    """
    t = as_tensor(logits, STAT_DTYPE)
    if t.ndim == 0 or t.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (vocabulary) axis; got shape "
                         f"{tuple(t.shape)}")
    out = torch.logsumexp(t, dim=-1)
    if not bool(torch.isfinite(out).all()):
        warnings.warn("log_partition: logits have NaN or +Inf entries (or a row of -Inf): "
                      "log Z is not finite there", RuntimeWarning, stacklevel=2)
    return out


def lr_sensitivity(
    losses: ArrayLike, initial_loss: float, best_loss: float | None = None
) -> float:
    """Learning-rate sensitivity ``E_lr[min(L(lr), L₀) − L*]`` over a learning-rate sweep.

    Wortsman et al. (2023), Sec. 2.2: the mean over a log-spaced grid of learning rates of the
    final loss, capped at the loss at initialisation ``L₀``, minus the best loss ``L*`` of the
    sweep.  A diverged run (non-finite loss) counts as ``L₀``.  The grid should be log-spaced;
    the mean is unweighted over its points.

    Parameters
    ----------
    losses : 1-D array
        Final losses, one per learning rate.
    initial_loss : float
        ``L₀``.
    best_loss : float, optional
        ``L*``; default the smallest finite loss of ``losses``.
    """
    values = np.asarray(losses, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("losses is empty: lr_sensitivity needs at least one loss")
    if not math.isfinite(initial_loss):
        raise ValueError(f"initial_loss must be finite, got {initial_loss}")
    capped = np.where(np.isfinite(values), np.minimum(values, initial_loss), initial_loss)
    if best_loss is not None and not math.isfinite(best_loss):
        raise ValueError(f"best_loss must be finite, got {best_loss}")
    if best_loss is None:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            warnings.warn("every run of the sweep diverged: LR sensitivity is undefined",
                          RuntimeWarning,
                          stacklevel=2)
            return float("nan")
        best_loss = float(min(finite.min(), initial_loss))
    return float(np.mean(capped - best_loss))


def find_attention_modules(
    model: nn.Module, q_name: str = "q_out", k_name: str = "k_out"
) -> list[str]:
    """Names of the modules that have sub-modules called ``q_name`` and ``k_name``."""
    return [name for name, m in model.named_modules()
            if isinstance(getattr(m, q_name, None), nn.Module)
            and isinstance(getattr(m, k_name, None), nn.Module)]


def _heads(x: torch.Tensor, n_heads: int | None) -> torch.Tensor:
    if x.ndim == 4:
        return x
    if x.ndim == 3 and n_heads is not None:
        b, t, d = x.shape
        return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)
    raise ValueError(f"expected q/k of shape (batch, heads, tokens, d_head), got {tuple(x.shape)};"
                     " for (batch, tokens, heads·d_head) outputs pass n_heads=")


def attention_logit_stats(
    model: nn.Module,
    inputs: Any,
    attention_modules: str | Sequence[str] | None = None,
    q_name: str = "q_out",
    k_name: str = "k_out",
    n_heads: int | None = None,
    causal: bool = True,
) -> dict[str, Any]:
    """Run ``model(inputs)`` (``model(**inputs)`` for a mapping) once and return the maximum
    attention logit of each module.

    Hooks are put on ``{module}.{q_name}`` and ``{module}.{k_name}`` of every attention module
    (default: :func:`find_attention_modules`), removed afterwards; their outputs are the queries
    and keys ``(batch, heads, tokens, d_head)`` (or ``(batch, tokens, heads·d_head)`` with
    ``n_heads``).  Runs under ``torch.no_grad`` in the model's current train/eval mode.

    Returns
    -------
    dict
        ``max_attention_logit``: float64 array, one value per module (:func:`max_attention_logit`);
        ``layers``: the module names; ``output``: the model's output.
    """
    if attention_modules is None:
        names = find_attention_modules(model, q_name, k_name)
        if not names:
            raise KeyError(f"no module of {type(model).__name__} has sub-modules {q_name!r} and "
                           f"{k_name!r}; pass attention_modules= and q_name=/k_name=")
    else:
        names = list(resolve_layers(model, attention_modules))
    modules = dict(model.named_modules())
    seen: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def hook(key: tuple[str, str]):
        def record(module: nn.Module, args: object, output: torch.Tensor) -> None:
            seen[key] = output.detach()
        return record

    try:
        for name in names:
            for part in (q_name, k_name):
                sub = getattr(modules[name], part, None)
                if not isinstance(sub, nn.Module):
                    raise KeyError(f"module {name!r} has no sub-module {part!r}")
                handles.append(sub.register_forward_hook(hook((name, part))))
        with torch.no_grad():
            output = _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    maxima = np.array([
        max_attention_logit(_heads(seen[(n, q_name)], n_heads), _heads(seen[(n, k_name)], n_heads),
                            causal=causal) for n in names])
    return {"max_attention_logit": maxima, "layers": names, "output": output}


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping (a tokenizer's output), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def attention_logits_probe(
    model: nn.Module,
    inputs: Any,
    targets: Any = None,
    attention_modules: str | Sequence[str] | None = None,
    q_name: str = "q_out",
    k_name: str = "k_out",
    n_heads: int | None = None,
    causal: bool = True,
) -> dict[str, xr.DataArray]:
    """The ``attention_logits`` model probe: :func:`attention_logit_stats` as a variable
    ``max_attention_logit`` over the dim ``attention_module`` (the modules' names, which need
    not be the evaluation's layers).  Wortsman et al. (2023), Sec. 3.1."""
    stats = attention_logit_stats(model, inputs, attention_modules, q_name, k_name, n_heads,
                                  causal)
    names = np.array(stats["layers"], dtype=object)
    return {"max_attention_logit": xr.DataArray(
        stats["max_attention_logit"], dims=("attention_module",),
        coords={"attention_module": names})}


def log_partition_probe(model: nn.Module, inputs: Any, targets: Any = None
                        ) -> tuple[dict[str, float], np.ndarray]:
    """The ``log_partition`` model probe's values and state: the mean over the probe batch of
    ``log Z`` of the model's output logits (Wortsman et al. 2023, Sec. 3.2), kept as the
    state that :func:`log_partition_drift` compares with the first evaluation's."""
    with torch.no_grad():
        out = _call(model, inputs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    mean = float(log_partition(logits).mean().item())
    return {"mean_log_z": mean}, np.array(mean)


def log_partition_drift(state: np.ndarray, reference: Mapping[str, Any]) -> dict[str, float]:
    """``log_z_drift``: this evaluation's mean ``log Z`` minus the first evaluation's."""
    first = reference.get("first")
    return {"log_z_drift": float("nan") if first is None else float(state) - float(first)}


register(Probe(
    "attention_logits", "model",
    {"max_attention_logit": Variable("maximum attention logit |q·k|/√d_head", "1",
                                     ("attention_module",))},
    SOURCE + ", Sec. 3.1", fn=attention_logits_probe,
))
register(Probe(
    "log_partition", "model",
    {"mean_log_z": Variable("mean log partition function of output logits", "nat"),
     "log_z_drift": Variable("change of mean log Z since the first evaluation", "nat")},
    SOURCE + ", Sec. 3.2", fn=log_partition_probe, reference=("first",),
    compare=log_partition_drift,
))
