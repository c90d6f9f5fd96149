"""Empirical neural tangent kernel of a ``torch.nn.Module``: fast, chunked, on the model's device.

``Θ(x, x')_{ab} = Σ_θ ∂f_a(x)/∂θ · ∂f_b(x')/∂θ = [J(x) J(x')ᵀ]_{ab}`` (Jacot, Gabriel, Hongler
2018, Eq. 2), summed over the chosen parameters θ.  Output conventions (``output=``):

``"full"``   the ``(n1, n2, k, k)`` kernel ``Θ[i, j, a, b]``;
``"trace"``  ``Σ_a Θ[i, j, a, a]``, shape ``(n1, n2)``: the *sum* over outputs (the PyTorch
             torch.func tutorial's convention, and traindyn's default);
``"mean"``   ``(1/k) Σ_a Θ[i, j, a, a]``: neural-tangents' ``trace_axes`` convention (a mean).

Methods (Novak, Sohl-Dickstein, Schoenholz, ICML 2022, "Fast finite width NTK", Sec. 3–4):
``"jacobian"`` (Jacobian contraction), ``"ntk_vp"`` (NTK–vector products) and ``"structured"``
(structured derivatives of linear, convolution, attention-projection and LayerNorm/RMSNorm
parameters, the rest by Jacobian contraction) live in :mod:`probes._ntk_engines` and
:mod:`probes._ntk_structured`; ``"auto"`` (default) picks the cheapest by the cost model of
:mod:`probes._ntk_cost` (shapes, parameter counts, device).  Attention runs as math
(``softmax(qkᵀ/√d)v`` from matmuls) under every method, so transformer blocks work with
``vmap``/``jvp`` and their projections are structured.

Per-sample methods assume that samples do not interact.  A model with BatchNorm in training
mode couples the batch: it is refused with a clear message (switch to ``model.eval()``), or,
with ``per_sample=False``, the kernel of the batch map ``X ↦ f(X)`` is computed without vmap by
one backward pass per output entry (running statistics restored afterwards).  Dropout in
training mode draws a new mask in every pass, so Jacobians would come from different networks:
it is refused too (call ``model.eval()``).

Memory: ``chunk_size`` samples per block (default: chosen from free memory).  Peak memory is the
kernel itself, the per-sample factors (``n·k·width`` per layer for ``"structured"``), and one
block's intermediates.

The model probe (``get_probe("ntk")``, and the stateful :class:`probes.ntk_probe.NTKProbe`) is
in :mod:`probes.ntk_probe`; both it and this module build on :mod:`probes._ntk_kernel`.

Bad input: an input the model cannot run on (wrong width, integer or boolean values for a
floating-point model, a 1-D batch of scalars) is a ``ValueError`` naming its shape and dtype and
what the model's first layer takes.
"""

from __future__ import annotations

import torch
from torch import nn
from traindyn.probes import ntk_probe  # noqa: F401 - registers the "ntk" probe (see below)
from traindyn.probes._arrays import ArrayLike
from traindyn.probes._ntk_common import (
    ParamSpec,
    batch_coupled_modules,
    prepare_input,
    select_parameters,
)
from traindyn.probes._ntk_kernel import METHODS, Output, ntk_kernel, warn_nonfinite
from traindyn.probes.capture import capture

# The "ntk" model probe lives in probes.ntk_probe, which builds on probes._ntk_kernel, not on this
# module (one direction of import); the registry imports this module to find "ntk".

__all__ = [
    "METHODS",
    "batch_coupled_modules",
    "conjugate_kernel",
    "empirical_ntk",
    "select_parameters",
]


def empirical_ntk(
    model: nn.Module,
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    output: Output = "trace",
    method: str = "auto",
    params: ParamSpec = None,
    chunk_size: int | None = None,
    per_sample: bool = True,
) -> torch.Tensor:
    """Finite-width NTK ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` of ``model`` (Jacot et al. 2018, Eq. 2).

    Parameters
    ----------
    model : nn.Module
        Maps a batch ``(n, …)`` to outputs ``(n, …)`` (trailing axes flattened to ``k``).
    x1, x2 : arrays
        Input batches; ``x2=None`` means ``x2 = x1`` (the kernel is then symmetric).
    output : {"trace", "mean", "full"}
        Sum over outputs (default), mean over outputs (neural-tangents' convention), or the full
        ``(n1, n2, k, k)`` kernel (module docstring).
    method : {"auto", "jacobian", "ntk_vp", "structured"}
        Algorithm (module docstring); all give the same kernel up to round-off.
    params : names, module names, globs or parameter objects, optional
        Parameter subset (default: all parameters with ``requires_grad``).
    chunk_size : int, optional
        Samples per block; default from free memory on the model's device.
    per_sample : bool
        True (default): the usual per-sample NTK; batch-coupled models are refused.  False:
        the kernel of the batch map ``X ↦ f(X)`` (only ``x2=None``), without vmap.

    Returns
    -------
    torch.Tensor on the model's device, in the parameters' dtype.
    """
    K = ntk_kernel(model, x1, x2, output=output, method=method, params=params,
                   chunk_size=chunk_size, per_sample=per_sample)
    return warn_nonfinite(K, "empirical_ntk")


def conjugate_kernel(
    model: nn.Module,
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    layer: str,
    reduce: str = "flatten",
    normalize: bool = True,
) -> torch.Tensor:
    """Conjugate kernel (features' Gram) ``Φ(x1)Φ(x2)ᵀ / d`` of a captured layer.

    Neal (1996); Fan & Wang (NeurIPS 2020), Sec. 2: ``CK = Φ Φᵀ / d`` with ``d`` the layer's
    width (``normalize=False`` drops the ``1/d``).  Features come from :func:`probes.capture`
    with the given token ``reduce`` rule; the model runs in its current mode, without gradients.
    """
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    feats = []
    for x in (x1, x2):
        if x is None:
            continue
        xt = prepare_input(x, device, dtype)
        with torch.no_grad(), capture(model, layer, reduce=reduce) as cap:
            model(xt)
        if len(cap.layers) != 1:
            raise ValueError(f"layer {layer!r} matches {len(cap.layers)} modules; name one")
        phi = cap[cap.layers[0]]
        feats.append(phi.reshape(phi.shape[0], -1))
    phi1 = feats[0]
    phi2 = feats[1] if len(feats) > 1 else phi1
    K = phi1 @ phi2.T
    return warn_nonfinite(K / phi1.shape[1] if normalize else K, "conjugate_kernel")
