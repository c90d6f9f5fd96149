"""Empirical neural tangent kernel of a ``torch.nn.Module``: fast, chunked, on the model's device.

``Θ(x, x')_{ab} = Σ_θ ∂f_a(x)/∂θ · ∂f_b(x')/∂θ = [J(x) J(x')ᵀ]_{ab}`` (Jacot, Gabriel, Hongler
2018, Eq. 2), summed over the chosen parameters θ.  Output conventions (``output=``):

``"full"``   the ``(n1, n2, k, k)`` kernel ``Θ[i, j, a, b]``;
``"trace"``  ``Σ_a Θ[i, j, a, a]``, shape ``(n1, n2)``: the *sum* over outputs (the PyTorch
             torch.func tutorial's convention, and traindyn's default);
``"mean"``   ``(1/k) Σ_a Θ[i, j, a, a]``: neural-tangents' ``trace_axes`` convention (a mean).

Methods (Novak, Sohl-Dickstein, Schoenholz, ICML 2022, "Fast finite width NTK", Sec. 3–4):

``"jacobian"``   Jacobian contraction: per-sample Jacobians by ``vmap(jacrev)``, then ``J₁J₂ᵀ``;
                 cost ~ N·k·[forward] + N²·k²·P, memory N·k·P per chunk.
``"ntk_vp"``     NTK–vector products: for each column ``(j, b)``, a VJP on ``x'_j`` then a JVP on
                 the ``x`` batch; cost ~ N²·k·[forward], never stores ``J(x)``.
``"structured"`` structured derivatives (Novak et al. 2022, Sec. 4, "matrix multiplication"
                 rule): every call ``y = a Wᵀ + b`` of ``F.linear`` (and ``F.conv1d/2d`` through
                 im2col) whose weight is a chosen parameter is intercepted; with the input
                 activations ``a`` and the backpropagated signals ``g_a = ∂f_a/∂y`` (one batched
                 backward with k one-hot cotangents), ``∂f_a(x)/∂W = Σ_t g_{a,t} ⊗ a_t`` (t runs
                 over tokens / conv positions / repeated calls), so the layer's block is
                 ``Θ_W = (a₁·a₂ + [bias]) ∘ (g₁·g₂)`` — a Gram of signals times a Gram of
                 activations, no Jacobian built.  When ``T`` tokens make ``T²`` Gram terms dearer
                 than the layer Jacobian (typical for convolutions), the per-layer Jacobian
                 ``Σ_t g_t a_tᵀ`` is formed from the same factors instead.  Parameters used
                 elsewhere (norms, embeddings, weights used outside ``F.linear``/``F.conv``) fall
                 back to the Jacobian method; which parameters are structured is checked once by
                 comparing a random-cotangent gradient with its reconstruction from the factors.
``"auto"``       ``"structured"`` when any chosen parameter qualifies, otherwise the cheaper of
                 the other two by the cost model above (forward FLOPs counted on one sample).

Per-sample methods assume that samples do not interact.  A model with BatchNorm in training
mode couples the batch: it is refused with a clear message (switch to ``model.eval()``), or,
with ``per_sample=False``, the kernel of the batch map ``X ↦ f(X)`` is computed without vmap by
one backward pass per output entry (running statistics restored afterwards).

Memory: ``chunk_size`` samples per block (default: chosen from free memory).  Peak memory is the
kernel itself, the per-sample factors (``n·k·width`` per layer for ``"structured"``), and one
block's intermediates.

Model probe ``"ntk"`` (registered in :mod:`probes.registry`).  ``probe = get_model_probe("ntk")
.factory()`` returns a stateful callable ``probe(model, inputs, targets) -> dict[str, float]``:
the output-traced NTK on (at most ``max_samples``) probe inputs, compared with the targets
(integer labels one-hot encoded) and with the kernels of earlier calls of the *same* instance:

``ntk_alignment``           kernel–target alignment (Cristianini et al. 2001)
``ntk_centered_alignment``  centred alignment (Cortes, Mohri, Rostamizadeh 2012)
``ntk_alignment_gain``      centred alignment minus its value at the first call
``ntk_effective_rank``      entropy effective rank of the NTK (Roy & Vetterli 2007)
``ntk_relative_change``     ``‖K_t − K_0‖_F/‖K_0‖_F``, ``K_0`` the first call's kernel (0 there)
``ntk_distance_previous``   Fort et al. (2020) kernel distance to the previous call (NaN at first)
``ntk_trace_mean``          ``tr(K)/n``, the kernel's scale

Make one instance per run, call it at increasing steps on the same inputs; kernel velocity is
``ntk_distance_previous / Δtime`` (the caller knows the times).  The probe runs the model in the
mode it is given (the monitor uses eval mode), turns gradients on internally, and does not touch
``.grad`` or the parameters.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from probes import kernels as _k
from probes._arrays import ArrayLike, as_tensor
from probes.capture import _first_tensor, capture
from probes.registry import register_model_probe

__all__ = [
    "METHODS",
    "NTKProbe",
    "batch_coupled_modules",
    "conjugate_kernel",
    "empirical_ntk",
    "select_parameters",
]

METHODS = ("auto", "jacobian", "ntk_vp", "structured")
Output = Literal["trace", "mean", "full"]
ParamSpec = str | Iterable[str] | Iterable[nn.Parameter] | None


# ----------------------------------------------------------------------------- plumbing
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


def _device_dtype(
    model: nn.Module, chosen: dict[str, nn.Parameter]
) -> tuple[torch.device, torch.dtype]:
    p = next(iter(chosen.values()))
    return p.device, p.dtype


def _prepare_input(x: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = as_tensor(x).to(device)
    if t.is_floating_point():
        t = t.to(dtype)
    if t.ndim < 1 or t.shape[0] == 0:
        raise ValueError(f"inputs must have a non-empty batch axis; got shape {tuple(t.shape)}")
    return t


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = _first_tensor(model(x))
    return out.reshape(out.shape[0], -1)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-Linux
        return 8 * 2**30


class _requires_grad:  # noqa: N801
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


# ----------------------------------------------------------------------------- structured
_LINEAR = F.linear
_CONV = {F.conv1d: 1, F.conv2d: 2}


@dataclass
class _Call:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    a: torch.Tensor  # (n, T, p) input rows (im2col patches for convolutions)
    y: torch.Tensor  # the op's output, as recorded (autograd target)
    conv: bool


def _conv_args(args: tuple, kwargs: dict, dims: int) -> tuple | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    vals = dict(zip(names, args, strict=False))
    vals.update(kwargs)
    stride, padding, dilation = (vals.get(k, d) for k, d in (("stride", 1), ("padding", 0),
                                                              ("dilation", 1)))
    if vals.get("groups", 1) != 1:
        return None
    w = vals["weight"]
    ks = tuple(w.shape[2:])

    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims

    stride, dilation = tup(stride), tup(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * dims
        elif padding == "same":
            tot = [d * (k - 1) for d, k in zip(dilation, ks, strict=False)]
            if any(t % 2 for t in tot):
                return None
            padding = tuple(t // 2 for t in tot)
        else:
            return None
    return ks, stride, tup(padding), dilation


def _im2col(x: torch.Tensor, ks, stride, padding, dilation) -> torch.Tensor:
    """``(n, C, *spatial)`` → ``(n, L, C·∏ks)`` patches, in ``weight.reshape(out, -1)`` order."""
    if len(ks) == 1:
        x = x.unsqueeze(2)
        ks, stride, padding, dilation = ((1,) + ks, (1,) + stride, (0,) + padding, (1,) + dilation)
    cols = F.unfold(x, ks, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


class _Recorder(TorchFunctionMode):
    """Intercept ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` calls whose weight or bias is chosen."""

    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids = ids
        self.calls: list[_Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR or func in _CONV:
            vals = dict(zip(("input", "weight", "bias"), args, strict=False))
            vals.update({k: v for k, v in kwargs.items() if k in ("input", "weight", "bias")})
            w, b = vals.get("weight"), vals.get("bias")
            if id(w) in self.ids or (b is not None and id(b) in self.ids):
                x = vals["input"]
                y = func(*args, **kwargs)
                if func is _LINEAR:
                    a = x.detach().reshape(x.shape[0], -1, x.shape[-1])
                    self.calls.append(_Call(w, b, a, y, conv=False))
                    return y.clone()  # in-place ops downstream must not alter the recorded y
                geo = _conv_args(args, kwargs, _CONV[func])
                if geo is not None and x.ndim == _CONV[func] + 2:
                    a = _im2col(x.detach(), *geo)
                    self.calls.append(_Call(w, b, a, y, conv=True))
                    return y.clone()
                return y
        return func(*args, **kwargs)


@dataclass
class _Group:
    """One weight (and/or bias) handled by structured derivatives, with its calls."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    materialise: bool = False  # form the per-layer Jacobian instead of Grams of factors


@dataclass
class _Plan:
    groups: list[_Group]
    fallback: dict[str, nn.Parameter]
    fallback_method: str = "jacobian"


@dataclass
class _Factors:
    groups: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (a, g)
    jac: list[torch.Tensor] = field(default_factory=list)  # (n, k, P) small Jacobians


def _signals(f: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """``∂f_a/∂y`` for each recorded ``y`` and every output ``a``, stacked as ``(k, *y.shape)``."""
    n, k = f.shape
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    cot = eye[:, None, :].expand(k, n, k)
    try:
        gs = torch.autograd.grad(f, ys, grad_outputs=cot, is_grads_batched=True,
                                 retain_graph=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one backward per output
        per = [torch.autograd.grad(f[:, a].sum(), ys, retain_graph=True, allow_unused=True)
               for a in range(k)]
        gs = [None if per[0][i] is None else torch.stack([p[i] for p in per])
              for i in range(len(ys))]
    return [torch.zeros((k, *y.shape), dtype=y.dtype, device=y.device) if g is None else g
            for g, y in zip(gs, ys, strict=False)]


def _g_rows(g: torch.Tensor, conv: bool) -> torch.Tensor:
    """Signals ``(k, n, …)`` → ``(n, k, T, out)``."""
    k, n = g.shape[:2]
    if conv:  # (k, n, out, *spatial)
        return g.reshape(k, n, g.shape[2], -1).permute(1, 0, 3, 2)
    return g.reshape(k, n, -1, g.shape[-1]).permute(1, 0, 2, 3)


def _record(model, x, ids):
    with _Recorder(ids) as rec:
        f = _outputs(model, x)
    gs = _signals(f, [c.y for c in rec.calls]) if rec.calls else []
    return f, rec.calls, gs


def _group_factors(group: _Group, calls, gs, n: int, k: int):
    """Concatenate the calls of one group along tokens: ``a (n, T, p)``, ``g (n, k, T, out)``."""
    a_parts, g_parts = [], []
    for c, g in zip(calls, gs, strict=False):
        if c.weight is not (group.weight if group.weight is not None else c.weight):
            continue
        if group.weight is None and c.bias is not group.bias:
            continue
        cols = []
        if group.weight is not None:
            cols.append(c.a)
        if group.bias is not None:
            cols.append(torch.ones(*c.a.shape[:2], 1, dtype=c.a.dtype, device=c.a.device))
        a_parts.append(torch.cat(cols, -1) if len(cols) > 1 else cols[0])
        g_parts.append(_g_rows(g, c.conv))
    a = torch.cat(a_parts, 1) if len(a_parts) > 1 else a_parts[0]
    g = torch.cat(g_parts, 2) if len(g_parts) > 1 else g_parts[0]
    return a, g


def _plan_structured(model, x, chosen: dict[str, nn.Parameter], full: bool, n_total: int):
    """Decide which chosen parameters go through structured derivatives (module docstring)."""
    ids = {id(p): n for n, p in chosen.items()}
    f, calls, gs = _record(model, x, set(ids))
    n, k = f.shape
    # parameters seen in an intercepted call, and in which role
    roles: dict[int, set] = {}
    for c in calls:
        if id(c.weight) in ids:
            bias_id = id(c.bias) if c.bias is not None else None
            roles.setdefault(id(c.weight), set()).add(("w", bias_id))
        if c.bias is not None and id(c.bias) in ids:
            roles.setdefault(id(c.bias), set()).add(("b", id(c.weight)))
    groups: list[_Group] = []
    covered: set[int] = set()
    for c in calls:
        w = c.weight if id(c.weight) in ids else None
        b = c.bias if (c.bias is not None and id(c.bias) in ids) else None
        if w is not None and len(roles[id(w)]) != 1:
            w = None  # used with different biases: leave to the fallback
        if b is not None and (len(roles[id(b)]) != 1 or (w is None and id(c.weight) in ids)):
            b = None
        key = (id(w) if w is not None else None, id(b) if b is not None else None)
        if key == (None, None) or any(
            (id(g.weight) if g.weight is not None else None,
             id(g.bias) if g.bias is not None else None) == key for g in groups):
            continue
        if (w is not None and id(w) in covered) or (b is not None and id(b) in covered):
            continue
        groups.append(_Group(w, b))
        covered.update(id(p) for p in (w, b) if p is not None)
    # verification: a random-cotangent gradient must equal its reconstruction from the factors
    if groups:
        r = torch.randn(f.shape, generator=torch.Generator().manual_seed(0), dtype=f.dtype)
        r = r.to(f.device)
        params = [p for g in groups for p in (g.weight, g.bias) if p is not None]
        true = torch.autograd.grad(f, params, grad_outputs=r, retain_graph=True, allow_unused=True)
        true = dict(zip(map(id, params), true, strict=False))
        ok = []
        for grp in groups:
            a, g = _group_factors(grp, calls, gs, n, k)
            rec = torch.einsum("nk,nkto,ntp->op", r, g, a)
            good = True
            col = 0
            for p in (grp.weight, grp.bias):
                if p is None:
                    continue
                width = 1 if p is grp.bias else rec.shape[1] - (grp.bias is not None)
                part = rec[:, col:col + width].reshape(p.shape)
                col += width
                t = true[id(p)]
                t = torch.zeros_like(p) if t is None else t
                tol = 50 * math.sqrt(torch.finfo(p.dtype).eps) * (float(t.norm()) + 1e-30)
                good &= float((part - t).norm()) <= tol
            if good:
                ok.append(grp)
        groups = ok
    done = {id(p) for g in groups for p in (g.weight, g.bias) if p is not None}
    fallback = {nm: p for nm, p in chosen.items() if id(p) not in done}
    # per group: Grams of factors (cost ~ n²T²(p + k_eff·out)) or the layer Jacobian
    k_eff = k * k if full else k
    for grp in groups:
        a, g = _group_factors(grp, calls, gs, n, k)
        T, p, q = a.shape[1], a.shape[2], g.shape[3]
        gram_cost = n_total**2 * T**2 * (p + k_eff * q)
        jac_cost = n_total * k * T * p * q + n_total**2 * (k_eff) * p * q
        grp.materialise = T > 1 and jac_cost < gram_cost
    return _Plan(groups, fallback), (f, calls, gs)


def _jacobian_rows(model, x, params: dict[str, nn.Parameter]) -> torch.Tensor:
    """Per-sample Jacobian ``(n, k, P)`` w.r.t. ``params`` by ``vmap(jacrev(functional_call))``."""
    from torch.func import functional_call, jacrev, vmap

    detached = {n: p.detach() for n, p in params.items()}

    def f1(p, xi):
        return _outputs(lambda z: functional_call(model, p, (z,)), xi[None])[0]

    jac = vmap(jacrev(f1), in_dims=(None, 0))(detached, x)
    n = x.shape[0]
    return torch.cat([jac[name].reshape(n, jac[name].shape[1], -1) for name in params], -1)


def _structured_factors(model, x, plan: _Plan, chosen, recorded=None) -> _Factors:
    ids = {id(p) for g in plan.groups for p in (g.weight, g.bias) if p is not None}
    if recorded is None:
        recorded = _record(model, x, ids) if ids else (None, [], [])
    f, calls, gs = recorded
    out = _Factors()
    for grp in plan.groups:
        a, g = _group_factors(grp, calls, gs, x.shape[0], _n_out(gs))
        if grp.materialise:
            out.jac.append(torch.einsum("nkto,ntp->nkop", g, a).reshape(a.shape[0], g.shape[1], -1))
        else:
            out.groups.append((a, g))
    if plan.fallback:
        out.jac.append(_jacobian_rows(model, x, plan.fallback))
    if len(out.jac) > 1:
        out.jac = [torch.cat(out.jac, -1)]
    return out


def _n_out(gs) -> int:
    return gs[0].shape[0] if gs else 0


def _block(F1: _Factors, F2: _Factors, output: str, k: int) -> torch.Tensor:
    """Kernel block from two factor sets: ``(n1, k, n2, k)`` if ``"full"``, else ``(n1, n2)``."""
    if output == "full":
        K = None
        for (a1, g1), (a2, g2) in zip(F1.groups, F2.groups, strict=False):
            n1, n2, T = a1.shape[0], a2.shape[0], a1.shape[1]
            if T == 1:
                G = (g1.reshape(n1 * k, -1) @ g2.reshape(n2 * k, -1).T).view(n1, k, n2, k)
                G.mul_((a1[:, 0] @ a2[:, 0].T)[:, None, :, None])
            else:
                A = torch.einsum("itp,jsp->itjs", a1, a2)
                G = torch.einsum("iktq,jlsq,itjs->ikjl", g1, g2, A)
            K = G if K is None else K.add_(G)
        for J1, J2 in zip(F1.jac, F2.jac, strict=False):
            n1, n2 = J1.shape[0], J2.shape[0]
            G = (J1.reshape(n1 * k, -1) @ J2.reshape(n2 * k, -1).T).view(n1, k, n2, k)
            K = G if K is None else K.add_(G)
        return K
    K = None
    for (a1, g1), (a2, g2) in zip(F1.groups, F2.groups, strict=False):
        n1, n2, T = a1.shape[0], a2.shape[0], a1.shape[1]
        if T == 1:
            G = g1.reshape(n1, -1) @ g2.reshape(n2, -1).T
            G.mul_(a1[:, 0] @ a2[:, 0].T)
        else:
            h1 = g1.permute(0, 2, 1, 3).reshape(n1 * T, -1)
            h2 = g2.permute(0, 2, 1, 3).reshape(n2 * T, -1)
            A = a1.reshape(n1 * T, -1) @ a2.reshape(n2 * T, -1).T
            G = ((h1 @ h2.T) * A).view(n1, T, n2, T).sum((1, 3))
        K = G if K is None else K.add_(G)
    for J1, J2 in zip(F1.jac, F2.jac, strict=False):
        G = J1.reshape(J1.shape[0], -1) @ J2.reshape(J2.shape[0], -1).T
        K = G if K is None else K.add_(G)
    return K


# ----------------------------------------------------------------------------- ntk_vp
def _ntk_vp_block(model, x1, x2, params: dict[str, nn.Parameter], k: int, chunk: int):
    """``(n1, k, n2, k)`` block by VJPs on ``x2`` columns and JVPs on the ``x1`` batch."""
    from torch.func import functional_call, jvp, vjp, vmap

    detached = {n: p.detach() for n, p in params.items()}

    def fx(p, x):
        return _outputs(lambda z: functional_call(model, p, (z,)), x)

    n1, n2 = x1.shape[0], x2.shape[0]
    out = torch.empty(n1, k, n2, k, dtype=next(iter(detached.values())).dtype, device=x1.device)
    cols = max(1, chunk // max(1, k))
    for s in range(0, n2, cols):
        xs = x2[s:s + cols]
        m = xs.shape[0]
        _, vjp_fn = vjp(lambda p, xs=xs: fx(p, xs), detached)
        cot = torch.eye(m * k, dtype=out.dtype, device=x1.device).reshape(m * k, m, k)
        tangents = vmap(vjp_fn)(cot)[0]

        def push(t):
            return jvp(lambda p: fx(p, x1), (detached,), (t,))[1]

        res = vmap(push)(tangents)  # (m·k, n1, k)
        out[:, :, s:s + m, :] = res.reshape(m, k, n1, k).permute(2, 3, 0, 1)
    return out


# ----------------------------------------------------------------------------- batch-coupled
def _batch_ntk(model, x, chosen: dict[str, nn.Parameter]) -> torch.Tensor:
    """NTK of the batch map ``X ↦ f(X)``: one backward per output entry (no vmap)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    params = list(chosen.values())
    try:
        f = _outputs(model, x)
        n, k = f.shape
        rows = []
        for i in range(n):
            for a in range(k):
                gr = torch.autograd.grad(f[i, a], params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(gr, params, strict=False)]))
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    J = torch.stack(rows).reshape(n, k, -1)
    return torch.einsum("iap,jbp->iajb", J, J)


# ----------------------------------------------------------------------------- public
def _forward_flops(model, x1: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x1[:1])
        return float(max(fc.get_total_flops(), 1))
    except Exception:  # noqa: BLE001 - an estimate only
        return float(sum(p.numel() for p in model.parameters()) * 2)


def _auto_chunk(n1, n2, k, width_sum, full, itemsize, device) -> int:
    budget = max(_available_bytes(device) // 8, 64 * 2**20)
    per_row = itemsize * (n2 * (k * k if full else 1) * 3 + k * width_sum * 2)
    return int(max(1, min(n1, budget // max(per_row, 1))))


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
    if output not in ("trace", "mean", "full"):
        raise ValueError(f"output must be 'trace', 'mean' or 'full'; got {output!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")
    chosen = select_parameters(model, params)
    device, dtype = _device_dtype(model, chosen)
    x1 = _prepare_input(x1, device, dtype)
    same = x2 is None
    x2 = x1 if same else _prepare_input(x2, device, dtype)
    coupled = batch_coupled_modules(model)
    with torch.enable_grad(), _requires_grad(chosen.values()):
        if coupled:
            if per_sample:
                raise ValueError(
                    f"modules {coupled} use batch statistics (BatchNorm in train mode), so "
                    "samples interact and the per-sample NTK is undefined. Call model.eval() to "
                    "use running statistics, or pass per_sample=False for the NTK of the batch "
                    "map X -> f(X).")
            if not same:
                raise ValueError("per_sample=False computes the kernel of one batch: pass x2=None")
            return _finish(_batch_ntk(model, x1, chosen), output).detach()
        if not per_sample:
            raise ValueError("per_sample=False is only for batch-coupled models (BatchNorm in "
                             "train mode); this model has none")
        K = _per_sample_ntk(model, x1, x2, same, chosen, output, method, chunk_size)
    return K.detach()


def _finish(K: torch.Tensor, output: str) -> torch.Tensor:
    """``(n1, k, n2, k)`` → the requested output."""
    k = K.shape[1]
    if output == "full":
        return K.permute(0, 2, 1, 3).contiguous()
    tr = torch.diagonal(K, dim1=1, dim2=3).sum(-1)
    return tr / k if output == "mean" else tr


def _per_sample_ntk(model, x1, x2, same, chosen, output, method, chunk_size):
    n1, n2 = x1.shape[0], x2.shape[0]
    full = output == "full"
    itemsize = torch.empty((), dtype=next(iter(chosen.values())).dtype).element_size()
    # a symmetric kernel in >= 3 row panels computes only the blocks on and above the diagonal
    sym = math.ceil(n1 / 3) if (same and chunk_size is None and n1 >= 64) else None
    probe_chunk = x1[: min(n1, chunk_size or sym or 256)]
    plan = recorded = None
    if method in ("auto", "structured"):
        plan, recorded = _plan_structured(model, probe_chunk, chosen, full, max(n1, n2))
        if method == "auto" and not plan.groups:
            plan = None
    k = int(_outputs(model, x1[:1]).shape[1]) if recorded is None else recorded[0].shape[1]
    P = sum(p.numel() for p in chosen.values())
    if method == "auto" and plan is None:
        fl = _forward_flops(model, x1)
        jac_cost = (n1 + n2) * k * 3 * fl + n1 * n2 * (k * k if full else k) * P
        vp_cost = n2 * k * 3 * fl * (1 + n1)
        method = "jacobian" if jac_cost <= vp_cost else "ntk_vp"
    kernel_bytes = n1 * n2 * (k * k if full else 1) * itemsize
    if kernel_bytes > 0.9 * _available_bytes(x1.device):
        raise MemoryError(f"the requested kernel needs {kernel_bytes / 2**30:.1f} GiB; ask for "
                          "output='trace', fewer samples, or a larger device")
    if method == "ntk_vp":
        chunk = chunk_size or _auto_chunk(n1, n2, k, P, full, itemsize, x1.device)
        dtype = next(iter(chosen.values())).dtype
        K = torch.empty((n1, n2, k, k) if full else (n1, n2), dtype=dtype, device=x1.device)
        for s in range(0, n1, chunk):
            B = _ntk_vp_block(model, x1[s:s + chunk], x2, chosen, k, chunk)
            K[s:s + chunk] = B.permute(0, 2, 1, 3) if full else _finish(B, "trace")
        return K / k if output == "mean" else K

    if method == "jacobian":
        plan = _Plan([], dict(chosen))
        width = P
    else:
        width = sum((g.shape[-1] + a.shape[-1]) * a.shape[1] for grp in plan.groups
                    for a, g in [_group_factors(grp, recorded[1], recorded[2],
                                                recorded[0].shape[0], k)])
        width += sum(p.numel() for p in plan.fallback.values())
    chunk = chunk_size or min(_auto_chunk(n1, n2, k, width, full, itemsize, x1.device),
                              sym or n1)

    def factors(x: torch.Tensor) -> list[_Factors]:
        out = []
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            reuse = recorded if (recorded is not None and xs.shape == probe_chunk.shape
                                 and xs.data_ptr() == probe_chunk.data_ptr()) else None
            out.append(_structured_factors(model, xs, plan, chosen, reuse))
        return out

    f1 = factors(x1)
    f2 = f1 if same else factors(x2)
    shape = (n1, n2, k, k) if full else (n1, n2)  # blocks written in the final layout
    dtype = next(iter(chosen.values())).dtype
    if len(f1) == 1 and len(f2) == 1:
        K = _block(f1[0], f2[0], "full" if full else "trace", k)
        if full:
            return _finish(K, output)
    else:
        K = torch.empty(shape, dtype=dtype, device=x1.device)
        for i, Fi in enumerate(f1):
            r = slice(i * chunk, min(n1, (i + 1) * chunk))
            for j, Fj in enumerate(f2):
                if same and j < i:
                    continue
                c = slice(j * chunk, min(n2, (j + 1) * chunk))
                B = _block(Fi, Fj, "full" if full else "trace", k)
                if full:
                    K[r, c] = B.permute(0, 2, 1, 3)
                    if same and j > i:
                        K[c, r] = B.permute(2, 0, 3, 1)
                else:
                    K[r, c] = B
                    if same and j > i:
                        K[c, r] = B.T
    return K / k if output == "mean" else K


# ----------------------------------------------------------------------------- CK and probe
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
        xt = _prepare_input(x, device, dtype)
        with torch.no_grad(), capture(model, layer, reduce=reduce) as cap:
            model(xt)
        if len(cap.layers) != 1:
            raise ValueError(f"layer {layer!r} matches {len(cap.layers)} modules; name one")
        phi = cap[cap.layers[0]]
        feats.append(phi.reshape(phi.shape[0], -1))
    phi1 = feats[0]
    phi2 = feats[1] if len(feats) > 1 else phi1
    K = phi1 @ phi2.T
    return K / phi1.shape[1] if normalize else K


class NTKProbe:
    """Stateful NTK alignment / motion probe (contract in the module docstring)."""

    def __init__(self, max_samples: int = 256, method: str = "auto", params: ParamSpec = None,
                 chunk_size: int | None = None) -> None:
        self.max_samples = max_samples
        self.method = method
        self.params = params
        self.chunk_size = chunk_size
        self.K0_: torch.Tensor | None = None
        self.K_prev_: torch.Tensor | None = None
        self.centered0_: float | None = None

    def __call__(self, model: nn.Module, inputs: ArrayLike, targets: ArrayLike) -> dict[str, float]:
        x = inputs[: self.max_samples]
        y = targets[: self.max_samples]
        K = empirical_ntk(model, x, output="trace", method=self.method, params=self.params,
                          chunk_size=self.chunk_size).detach().to(torch.float64)
        Y = _k.targets_matrix(y, K.shape[0])
        out = {
            "ntk_alignment": _k.kernel_alignment(K, Y),
            "ntk_centered_alignment": _k.centered_alignment(K, Y),
            "ntk_effective_rank": _k.ntk_effective_rank(K),
            "ntk_trace_mean": float(torch.diagonal(K).mean()),
        }
        if self.K0_ is None:
            self.K0_ = K
            self.centered0_ = out["ntk_centered_alignment"]
        elif self.K0_.shape != K.shape:
            raise ValueError("the NTK probe must see the same probe inputs at every call")
        out["ntk_alignment_gain"] = out["ntk_centered_alignment"] - self.centered0_
        out["ntk_relative_change"] = _k.relative_kernel_change(K, self.K0_)
        out["ntk_distance_previous"] = (float("nan") if self.K_prev_ is None
                                        else _k.kernel_distance(self.K_prev_, K))
        self.K_prev_ = K
        return out


NTK_PROBE_VARIABLES: dict[str, tuple[str, str]] = {
    "ntk_alignment": ("NTK–target alignment", "1"),
    "ntk_centered_alignment": ("centred NTK–target alignment", "1"),
    "ntk_alignment_gain": ("gain in centred NTK alignment since the first evaluation", "1"),
    "ntk_effective_rank": ("entropy effective rank of the NTK", "1"),
    "ntk_relative_change": ("relative NTK change ‖K_t − K_0‖/‖K_0‖", "1"),
    "ntk_distance_previous": ("kernel distance to the previous evaluation", "1"),
    "ntk_trace_mean": ("mean NTK diagonal tr(K)/n", "1"),
}

register_model_probe(
    "ntk", NTKProbe, NTK_PROBE_VARIABLES,
    "Jacot et al. (2018); Cortes, Mohri, Rostamizadeh (2012); Fort et al. (2020)",
)

