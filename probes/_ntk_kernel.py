"""The checked driver behind :func:`probes.ntk.empirical_ntk` and the NTK probe: argument and
input checks, the choice between the per-sample and the batch kernel, and the warning for
non-finite kernels.  :mod:`probes.ntk` (the public functions) and :mod:`probes.ntk_probe` (the
registered probe) both build on it; neither imports the other's internals.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn
from traindyn.probes import _ntk_engines as _eng
from traindyn.probes._arrays import ArrayLike
from traindyn.probes._ntk_common import (
    ParamSpec,
    active_dropout_modules,
    batch_coupled_modules,
    device_dtype,
    prepare_input,
    requires_grad,
    select_parameters,
)

METHODS = ("auto", "jacobian", "ntk_vp", "structured")
Output = Literal["trace", "mean", "full"]


def _abbrev(names: list[str], limit: int = 6) -> str:
    return str(names[:limit])[:-1] + (f", … ({len(names)} in all)]" if len(names) > limit
                                      else "]")


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first leaf module that holds parameters (in definition order)."""
    for module in model.modules():
        if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            return module
    return None


def _expectation(model: nn.Module, dtype: torch.dtype) -> str:
    """What the model's first layer takes, in words (for error messages)."""
    first = _first_layer(model)
    if isinstance(first, nn.Embedding):
        return (f"its first layer {first} takes integer token ids in 0..{first.num_embeddings - 1}"
                " of shape (n, …)")
    if isinstance(first, nn.Linear):
        return (f"its first layer {first} takes {dtype} inputs of shape (n, …, "
                f"{first.in_features})")
    if isinstance(first, nn.modules.conv._ConvNd):
        spatial = len(first.kernel_size)
        return (f"its first layer {first} takes {dtype} inputs of shape (n, {first.in_channels}"
                + ", …" * spatial + ")")
    return f"its parameters are {dtype}"


def check_runs(model: nn.Module, x: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """Run ``model`` on one sample of ``x`` (no gradients): an input the model cannot take
    (wrong width, integer or boolean values for a floating-point model, a 1-D array that is a
    batch of scalars) is a ``ValueError`` naming what was given and what the model's first layer
    takes, instead of an error from deep inside the Jacobian machinery."""
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} has dtype {x.dtype}; {_expectation(model, dtype)}")
    try:
        with torch.no_grad():
            model(x[:1])
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, IndexError, ValueError) as err:
        hint = ""
        if x.ndim == 1:
            hint = (f" ({name} is 1-D: a batch of {x.shape[0]} scalars; one sample of "
                    f"{x.shape[0]} features is {name}[None])")
        elif not x.is_floating_point():
            hint = f" (convert {name} to floating point, e.g. {name}.to({dtype}))"
        raise ValueError(f"the model cannot run on {name} of shape {tuple(x.shape)} and dtype "
                         f"{x.dtype}: {_expectation(model, dtype)}{hint}. The model's error: "
                         f"{err}") from err


def ntk_kernel(model: nn.Module, x1: ArrayLike, x2: ArrayLike | None = None, *,
               output: Output = "trace", method: str = "auto", params: ParamSpec = None,
               chunk_size: int | None = None, per_sample: bool = True) -> torch.Tensor:
    """:func:`probes.ntk.empirical_ntk` without its check for non-finite entries, which reads
    the kernel on the host: for callers that copy the kernel to the host anyway and check it
    there with :func:`warn_nonfinite` (the NTK probe), so that a kernel on a GPU is read once."""
    if output not in ("trace", "mean", "full"):
        raise ValueError(f"output must be 'trace', 'mean' or 'full'; got {output!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")
    chosen = select_parameters(model, params)
    device, dtype = device_dtype(chosen)
    x1 = prepare_input(x1, device, dtype)
    same = x2 is None
    x2 = x1 if same else prepare_input(x2, device, dtype)
    coupled = batch_coupled_modules(model)
    dropout = active_dropout_modules(model)
    if dropout:
        raise ValueError(
            f"modules {_abbrev(dropout)} are Dropout in train mode: every pass draws a new "
            "random mask, so the kernel would mix Jacobians of different networks. Call "
            "model.eval() (the NTK of the trained network) first.")
    with torch.enable_grad(), requires_grad(chosen.values()):
        if coupled:
            if per_sample:
                raise ValueError(
                    f"modules {coupled} use batch statistics (BatchNorm in train mode), so "
                    "samples interact and the per-sample NTK is undefined. Call model.eval() to "
                    "use running statistics, or pass per_sample=False for the NTK of the batch "
                    "map X -> f(X).")
            if not same:
                raise ValueError("per_sample=False computes the kernel of one batch: pass x2=None")
            return _eng.finish(_eng.batch_ntk(model, x1, chosen), output).detach()
        if not per_sample:
            raise ValueError("per_sample=False is only for batch-coupled models (BatchNorm in "
                             "train mode); this model has none")
        check_runs(model, x1, "x1", dtype)
        if not same:
            check_runs(model, x2, "x2", dtype)
        K = _eng.per_sample_ntk(model, x1, x2, same, chosen, output, method, chunk_size)
    return K.detach()


def warn_nonfinite(K: torch.Tensor, where: str) -> torch.Tensor:
    """Warn (never silently) when a kernel has NaN or infinite entries.

    A NaN or infinite entry makes the sum NaN or infinite, so a finite sum (one reduction)
    clears the kernel; only a non-finite sum (a bad entry, or an overflowing sum of finite
    entries) pays for the entry-wise count.
    """
    if K.numel() == 0 or bool(torch.isfinite(K.sum())):
        return K
    bad = ~torch.isfinite(K)
    if bool(bad.any()):
        warnings.warn(f"{where}: {int(bad.sum())} of {K.numel()} kernel entries are NaN or "
                      "infinite (non-finite samples in x1/x2, or non-finite weights)",
                      RuntimeWarning, stacklevel=3)
    return K
