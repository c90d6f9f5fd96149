"""Structured-derivatives engine of the empirical NTK (Novak, Sohl-Dickstein, Schoenholz 2022).

Every call ``y = a Wᵀ + b`` of ``F.linear`` (and ``F.conv1d/2d`` through im2col) whose weight is a
chosen parameter is intercepted; with the input activations ``a`` and the backpropagated signals
``g_a = ∂f_a/∂y`` (one batched backward with k one-hot cotangents), ``∂f_a(x)/∂W = Σ_t g_{a,t} ⊗
a_t`` (t runs over tokens / conv positions / repeated calls), so the layer's block is
``Θ_W = (a₁·a₂ + [bias]) ∘ (g₁·g₂)`` — a Gram of signals times a Gram of activations
(Novak et al. 2022, Sec. 4, "matrix multiplication" rule).  When ``T`` tokens make ``T²`` Gram
terms dearer than the layer Jacobian (typical for convolutions and attention projections), the
per-layer Jacobian ``Σ_t g_t a_tᵀ`` is formed from the same factors instead (always, for the
full kernel of a layer with ``T > 1``).

Normalisation layers ``F.layer_norm`` / ``F.rms_norm`` with a chosen affine weight (and bias)
are intercepted the same way: ``y = x̂ ∘ γ + β`` gives ``∂f_a/∂γ = Σ_t g_{a,t} ∘ x̂_t`` and
``∂f_a/∂β = Σ_t g_{a,t}`` (Novak et al. 2022, Sec. 4, "elementwise" rule), formed directly.
Attention runs as math (:class:`probes._ntk_common.MathMode`), so the input and output
projections inside ``nn.MultiheadAttention`` are ``F.linear`` calls this engine sees.

Everything else (embeddings, weights used outside these calls) falls back to the Jacobian
engine; which parameters are structured is checked once by comparing a random-cotangent
gradient with its reconstruction from the factors.

Speed (same kernel, fewer or cheaper operations; each path is tested against the float64
brute-force Jacobian kernel in ``tests/probes/test_ntk.py``):

* an output layer whose signals are exactly one-hot (the model returns its ``y``) skips the
  signal Gram: its block is ``δ_ab (a₁·a₂)`` (:func:`structured_factors`);
* a symmetric kernel of ≥ :data:`SYM_WORK` multiply-adds is computed in row strips, upper part
  only (:func:`block_sym`);
* once a plan is verified, convolutions are recorded *cut* (:func:`record`): their outputs are
  autograd leaves and their transposed product runs for all ``k`` outputs at once (one
  transposed convolution, or one GEMM and a scatter, whichever is faster on the geometry:
  :func:`_conv_input_grad`), where a batched backward (``vmap`` over outputs) would run the
  convolution's backward once per output.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from traindyn.probes._ntk_common import MathMode, outputs

_LINEAR = F.linear
_CONV = {F.conv1d: 1, F.conv2d: 2}
_NORMS = (F.layer_norm, F.rms_norm)


@dataclass
class Call:
    kind: str  # "linear", "conv" or "norm"
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    a: torch.Tensor  # (n, T, p) input rows (im2col patches; x̂ for norms)
    y: torch.Tensor  # the op's output, as recorded (autograd target)
    cut: tuple | None = None  # (input, its version, geometry, sources) of a cut conv
    version: int | None = None  # y's version when recorded, where y went downstream uncopied


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


_SOURCES: dict = {}


def _sources(spatial: tuple, ks, stride, padding, dilation, device) -> torch.Tensor:
    """``(L·∏ks,)``: for each patch entry ``(l, κ)`` of :func:`_im2col`, 1 + the flat input
    position it reads, or 0 for a tap in the padding."""
    key = (spatial, ks, stride, padding, dilation, device)
    if key not in _SOURCES:
        HW = math.prod(spatial)
        img = torch.arange(1, HW + 1, dtype=torch.float64).reshape(1, 1, *spatial)
        cols = _im2col(img, ks, stride, padding, dilation)[0]  # (L, ∏ks)
        if len(_SOURCES) > 64:
            _SOURCES.clear()
        _SOURCES[key] = cols.reshape(-1).round().long().to(device)
    return _SOURCES[key]


CONV_INPUT_GRAD_ENV = "TRAINDYN_NTK_CONV_INPUT_GRAD"
"""Environment override of :func:`_conv_input_grad`'s route: ``scatter``, ``transpose`` or
``auto`` (the default)."""

_CONV_ROUTES: dict = {}  # geometry key -> the route timed fastest on it (this process)


def _conv_input_grad(gy: torch.Tensor, c: Call) -> torch.Tensor:
    """``(k, n, q, *out)`` output signals of a cut convolution → ``(k, n, C, *in)`` signals of
    its input: the transposed convolution for all ``k·n`` rows at once.

    Two routes give the same numbers (to round-off): :func:`_conv_input_grad_scatter` (one
    GEMM, then a scatter-add of patch gradients) and :func:`_conv_input_grad_transpose` (one
    batched transposed convolution, torch's own kernel).  Measured on the 2-core VM, one thread,
    neither wins everywhere: the scatter is 1.3–2.4× faster on a stride-2 3×3 convolution of
    an 8×8 input (9 output positions), the transposed convolution 1.6–3× faster on stride-1
    convolutions of 4×4 to 32×32 inputs.  So on the CPU each geometry is timed once per process
    on its first call (both routes run on the real signals; the faster is kept); on other
    devices the transposed convolution (cuDNN) is used.  ``$TRAINDYN_NTK_CONV_INPUT_GRAD``
    (``scatter`` / ``transpose``) fixes the route.
    """
    route = os.environ.get(CONV_INPUT_GRAD_ENV, "auto")
    if route not in ("auto", "scatter", "transpose"):
        raise ValueError(f"${CONV_INPUT_GRAD_ENV} must be 'auto', 'scatter' or 'transpose'; "
                         f"got {route!r}")
    if route == "auto":
        if gy.device.type != "cpu":
            route = "transpose"
        else:
            x = c.cut[0]
            key = (tuple(gy.shape), tuple(x.shape[1:]), tuple(c.weight.shape), c.cut[2],
                   gy.dtype)
            route = _CONV_ROUTES.get(key)
            if route is None:
                route, out = _time_routes(gy, c)
                if len(_CONV_ROUTES) > 256:
                    _CONV_ROUTES.clear()
                _CONV_ROUTES[key] = route
                return out
    return _CONV_GRAD[route](gy, c)


def _time_routes(gy: torch.Tensor, c: Call, budget: float = 0.1,
                 rounds: int = 5) -> tuple[str, torch.Tensor]:
    """Run every route on ``(gy, c)``; the fastest and its result.  Rounds (each route once)
    are repeated, up to ``rounds``, while the time spent stays under ``budget`` seconds, and
    each route's best is compared: the first call of a kernel pays for its set-up, and on a
    shared machine one millisecond timing can be 50 % off (a single round picked the slower
    route in 1 of 5 fresh processes on the 2-core VM's benchmark CNN)."""
    best: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    for _ in range(rounds):
        for name, fn in _CONV_GRAD.items():
            t0 = time.perf_counter()
            outs[name] = fn(gy, c)
            best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    route = min(best, key=best.get)
    return route, outs[route]


def _conv_input_grad_scatter(gy: torch.Tensor, c: Call) -> torch.Tensor:
    """:func:`_conv_input_grad` by patch gradients ``g W`` (one product), scatter-added onto
    the input positions they were read from."""
    x, _, geo, src = c.cut
    k, n, q = gy.shape[:3]
    N, C = k * n, x.shape[1]
    kk = c.weight[0, 0].numel()
    L = gy[0, 0, 0].numel()
    W = c.weight.detach().reshape(q, C, kk).transpose(1, 2).reshape(q, kk * C)
    cols = gy.reshape(N, q, L).transpose(1, 2).reshape(N * L, q) @ W  # rows (N, l), cols (κ, C)
    HW = x[0, 0].numel()
    out = torch.zeros(N, HW + 1, C, dtype=cols.dtype, device=cols.device)
    out.index_add_(1, src, cols.view(N, L * kk, C))
    # contiguous: a batched backward through a strided gradient runs ~10x slower
    return out[:, 1:].transpose(1, 2).contiguous().view(k, *x.shape)


def _conv_input_grad_transpose(gy: torch.Tensor, c: Call) -> torch.Tensor:
    """:func:`_conv_input_grad` by one transposed convolution of all ``k·n`` rows (the input
    gradient of the convolution, ``torch.nn.grad.conv{1,2}d_input``)."""
    x, _, (_, stride, padding, dilation), _ = c.cut
    k, n = gy.shape[:2]
    grad = torch.nn.grad.conv1d_input if x.ndim == 3 else torch.nn.grad.conv2d_input
    out = grad((k * n, *x.shape[1:]), c.weight.detach(), gy.reshape(k * n, *gy.shape[2:]),
               stride=stride, padding=padding, dilation=dilation)
    return out.view(k, *x.shape)


_CONV_GRAD = {"scatter": _conv_input_grad_scatter, "transpose": _conv_input_grad_transpose}


class Recorder(MathMode):
    """Intercept linear / conv / norm calls whose weight or bias is chosen (module docstring)."""

    def __init__(self, ids: set[int], cut: bool = False, copy: bool = True) -> None:
        super().__init__()
        self.ids = ids
        self.cut = cut
        self.copy = copy  # hand copies of recorded linear / conv outputs downstream
        self.detached = False  # a convolution ran on detached tensors (no parameter gradients)
        self.calls: list[Call] = []
        self.other_uses: list[tuple[str, int]] = []  # chosen tensors seen in other calls

    def _chosen(self, w, b) -> bool:
        return id(w) in self.ids or (b is not None and id(b) in self.ids)

    def _cut_conv(self, func, args, kwargs, x, w, b):
        """A convolution in a ``cut`` recording (see :func:`record`): computed on detached
        tensors as the product of its patches (which the factors need anyway) with the weight,
        its output an autograd leaf; the input is kept for the transposed product when it
        needs signals.  None where the geometry is not supported."""
        dims = _CONV[func]
        geo = _conv_args(args, kwargs, dims)
        if geo is None or x.ndim != dims + 2 or w is None:
            return None
        ks, stride, padding, dilation = geo
        a = _im2col(x.detach(), *geo)  # (n, L, C·∏ks)
        n, L = a.shape[:2]
        q = w.shape[0]
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
               for s, k, st, p, d in zip(x.shape[2:], ks, stride, padding, dilation,
                                         strict=True)]
        wm = w.detach().reshape(q, -1)
        y = (a.reshape(n * L, -1) @ wm.T if b is None
             else torch.addmm(b.detach(), a.reshape(n * L, -1), wm.T))
        # contiguous, as the convolution's own output (strided signals slow the backward ~10×)
        y = y.view(n, L, q).transpose(1, 2).contiguous().view(n, q, *out).requires_grad_(True)
        cut = None
        if x.requires_grad:
            cut = (x, x._version, geo, _sources(tuple(x.shape[2:]), *geo, x.device))
        self.calls.append(Call("conv", w, b, a, y, cut))
        self.detached = True
        return y.clone()

    def handle(self, func, args, kwargs):
        if func is _LINEAR or func in _CONV:
            vals = dict(zip(("input", "weight", "bias"), args, strict=False))
            vals.update({k: v for k, v in kwargs.items() if k in ("input", "weight", "bias")})
            w, b = vals.get("weight"), vals.get("bias")
            if self._chosen(w, b):
                x = vals["input"]
                if func is not _LINEAR and self.cut:
                    cut = self._cut_conv(func, args, kwargs, x, w, b)
                    if cut is not None:
                        return cut
                y = func(*args, **kwargs)
                if func is _LINEAR:
                    if x.ndim < 2:
                        return y
                    a = x.detach().reshape(x.shape[0], -1, x.shape[-1])
                    self.calls.append(Call("linear", w, b, a, y, version=y._version))
                    # in-place ops downstream must not alter the recorded y (without copies,
                    # :func:`record` checks its version afterwards)
                    return y.clone() if self.copy else y
                geo = _conv_args(args, kwargs, _CONV[func])
                if geo is not None and x.ndim == _CONV[func] + 2:
                    a = _im2col(x.detach(), *geo)
                    self.calls.append(Call("conv", w, b, a, y, version=y._version))
                    return y.clone() if self.copy else y
                return y
        elif func in _NORMS:
            names = (("input", "normalized_shape", "weight", "bias", "eps") if func is F.layer_norm
                     else ("input", "normalized_shape", "weight", "eps"))
            vals = dict(zip(names, args, strict=False))
            vals.update(kwargs)
            w, b = vals.get("weight"), vals.get("bias")
            x = vals["input"]
            if (w is not None or b is not None) and self._chosen(w, b) and x.ndim >= 2:
                shape = vals["normalized_shape"]
                shape = (shape,) if isinstance(shape, int) else tuple(shape)
                if func is F.layer_norm:
                    xhat = F.layer_norm(x, shape, None, None, vals.get("eps", 1e-5))
                else:
                    xhat = F.rms_norm(x, shape, None, vals.get("eps"))
                y = xhat if w is None else xhat * w
                if b is not None:
                    y = y + b
                D = math.prod(shape)
                a = xhat.detach().reshape(x.shape[0], -1, D)
                self.calls.append(Call("norm", w, b, a, y))
                return y.clone()
        for v in (*args, *kwargs.values()):
            for t in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(t, torch.Tensor) and id(t) in self.ids:
                    self.other_uses.append((getattr(func, "__name__", str(func)), id(t)))
        return func(*args, **kwargs)


@dataclass
class Group:
    """One weight (and/or bias) handled by structured derivatives, with its calls."""

    kind: str
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    materialise: bool = False  # form the per-layer Jacobian instead of Grams of factors


@dataclass
class Plan:
    groups: list[Group]
    fallback: dict[str, nn.Parameter]
    ops: int = 0  # torch calls in the recorded forward
    fingerprint: tuple = ()  # of the recording it was verified on (Recording.fingerprint)


@dataclass
class Factors:
    groups: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (a, g)
    jac: list[torch.Tensor] = field(default_factory=list)  # (n, k, P) small Jacobians
    unit: list[torch.Tensor] = field(default_factory=list)  # a (n, 1, p) of unit-signal layers

    def rows(self, s: slice) -> Factors:
        """The factors of samples ``s`` (views)."""
        return Factors([(a[s], g[s]) for a, g in self.groups], [J[s] for J in self.jac],
                       [a[s] for a in self.unit])


def signals(f: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """``∂f_a/∂y`` for each recorded ``y`` and every output ``a``, stacked as ``(k, *y.shape)``."""
    n, k = f.shape
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    gs = _vjp(f, ys, eye[:, None, :].expand(k, n, k))
    return [torch.zeros((k, *y.shape), dtype=y.dtype, device=y.device) if g is None else g
            for g, y in zip(gs, ys, strict=False)]


def _vjp(out: torch.Tensor, targets: list[torch.Tensor], cot: torch.Tensor) -> list:
    """``cot[r]ᵀ ∂out/∂target`` for every row ``r`` of ``cot (k, *out.shape)``: one batched
    backward (a plain one when ``k = 1``), or one per row for ops without a batching rule;
    ``(k, *target.shape)`` per target, None where it does not reach it."""
    k = cot.shape[0]
    if k == 1:
        gs = torch.autograd.grad(out, targets, grad_outputs=cot[0], retain_graph=True,
                                 allow_unused=True)
        return [None if g is None else g[None] for g in gs]
    try:
        return list(torch.autograd.grad(out, targets, grad_outputs=cot, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True))
    except RuntimeError:  # an op without a batching rule: one backward per row
        per = [torch.autograd.grad(out, targets, grad_outputs=cot[r], retain_graph=True,
                                   allow_unused=True) for r in range(k)]
        return [None if per[0][i] is None else torch.stack([p[i] for p in per])
                for i in range(len(targets))]


def _g_rows(g: torch.Tensor, kind: str) -> torch.Tensor:
    """Signals ``(k, n, …)`` → ``(n, k, T, out)``."""
    k, n = g.shape[:2]
    if kind == "conv":  # (k, n, out, *spatial)
        return g.reshape(k, n, g.shape[2], -1).permute(1, 0, 3, 2)
    return g.reshape(k, n, -1, g.shape[-1]).permute(1, 0, 2, 3)


@dataclass
class Recording:
    """One chunk's forward: outputs ``f (n, k)``, intercepted calls, their signals, the number
    of torch calls made (for the cost model), and each group's factors once formed."""

    f: torch.Tensor | None
    calls: list[Call]
    gs: list[torch.Tensor]
    ops: int = 0
    cache: dict = field(default_factory=dict)
    other_uses: tuple = ()
    detached: bool = False  # some calls ran detached: no parameter gradients through them

    def fingerprint(self, x: torch.Tensor) -> tuple:
        """What the plan's validity rests on: the input's trailing shape, which chosen tensors
        each intercepted call used (and its rows' shape), and the other calls that used them."""
        return (tuple(x.shape[1:]), x.dtype,
                tuple((c.kind, _key(c.weight), _key(c.bias), tuple(c.a.shape[1:]))
                      for c in self.calls), self.other_uses)

    def returns(self, group: Group) -> bool:
        """Whether the model returned the output ``y`` of this group's only call itself (``f``
        a contiguous view of a contiguous ``y``, same elements): then ``∂f_a/∂y_c = δ_ac``
        exactly, known without reading the signals (a host wait on a GPU)."""
        f = self.f
        calls = [c for c in self.calls if c.weight is group.weight and c.bias is group.bias]
        if f is None or len(calls) != 1 or calls[0].kind != "linear":
            return False
        y = calls[0].y
        return (f.requires_grad and (f is y or f._base is y) and f.data_ptr() == y.data_ptr()
                and f.numel() == y.numel() and f.shape[1] == y.shape[-1]
                and f.is_contiguous() and y.is_contiguous())

    def factors(self, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
        key = (_key(group.weight), _key(group.bias))
        if key not in self.cache:
            self.cache[key] = group_factors(group, self.calls, self.gs)
        return self.cache[key]


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Models whose recorded outputs were modified in place downstream (recorded with copies)."""


def record(model, x, ids, cut: bool = False, copy: bool | None = None) -> Recording:
    """Forward with the recorder on, then the batched backward of the signals.

    Recorded linear and conv outputs go downstream as they are (a copy per call would cost an
    op forward and one backward, most of a small model's recording); if one of them was then
    modified in place (``ReLU(inplace=True)``), its version counter says so and the recording
    is made again with copies (``copy=None`` remembers that per model).

    With ``cut``, convolutions whose input needs signals run on detached tensors, their
    outputs autograd leaves: the batched backward stops there, the convolution's transposed
    product is done for all ``k`` outputs at once (:func:`_conv_input_grad`), and a further
    batched backward from its input carries the signals on, the cut calls taken last to first
    (a signal reaches a layer from every later cut that its output feeds, and from ``f``
    directly).  Parameter gradients do not flow through cut calls, so plans are verified on
    uncut recordings.  If an input was modified in place after its convolution read it, the
    recording is made again uncut.
    """
    if copy is None:
        try:
            copy = model in _COPIES
        except TypeError:  # not weak-referenceable
            copy = True
    with Recorder(ids, cut, copy) as rec:
        f = outputs(model, x)
    calls = rec.calls
    if not copy and any(c.version is not None and c.y._version != c.version for c in calls):
        with contextlib.suppress(TypeError):
            _COPIES[model] = True
        return record(model, x, ids, cut, copy=True)
    cuts = [i for i, c in enumerate(calls) if c.cut is not None]
    if any(calls[i].cut[0]._version != calls[i].cut[1] for i in cuts):
        return record(model, x, ids, copy=copy)
    ys = [c.y for c in calls]
    gs = signals(f, ys) if calls else []
    for i in reversed(cuts):
        upstream = list(range(i))
        gx = _conv_input_grad(gs[i], calls[i])
        if not upstream or not calls[i].cut[0].requires_grad:
            continue
        more = _vjp(calls[i].cut[0], [ys[j] for j in upstream], gx)
        for j, g in zip(upstream, more, strict=True):
            if g is not None:
                gs[j] = gs[j] + g  # not in place: a gradient may alias a cotangent
    return Recording(f, calls, gs, rec.n_ops, other_uses=tuple(rec.other_uses),
                     detached=rec.detached)


def _key(p) -> int | None:
    return None if p is None else id(p)


def group_factors(group: Group, calls, gs):
    """Concatenate the calls of one group along tokens: ``a (n, T, p)``, ``g (n, k, T, out)``.

    For linear and conv groups with a bias, ``a`` carries a trailing column of ones.
    """
    a_parts, g_parts = [], []
    for c, g in zip(calls, gs, strict=False):
        if c.kind != group.kind and not {c.kind, group.kind} <= {"linear", "conv"}:
            continue
        if group.weight is not None and c.weight is not group.weight:
            continue
        if group.weight is None and c.bias is not group.bias:
            continue
        cols = []
        if group.weight is not None or group.kind == "norm":
            cols.append(c.a)
        if group.bias is not None and group.kind != "norm":
            cols.append(torch.ones(*c.a.shape[:2], 1, dtype=c.a.dtype, device=c.a.device))
        a_parts.append(torch.cat(cols, -1) if len(cols) > 1 else cols[0])
        g_parts.append(_g_rows(g, c.kind))
    a = torch.cat(a_parts, 1) if len(a_parts) > 1 else a_parts[0]
    g = torch.cat(g_parts, 2) if len(g_parts) > 1 else g_parts[0]
    return a, g


def group_jacobian(group: Group, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobian ``(n, k, P_group)`` of one group from its factors."""
    n, k = g.shape[:2]
    if group.kind == "norm":
        parts = []
        if group.weight is not None:
            parts.append(torch.einsum("nktd,ntd->nkd", g, a))
        if group.bias is not None:
            parts.append(g.sum(2))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    if a.shape[1] == 1:
        return (g[:, :, 0, :, None] * a[:, None, 0, None, :]).reshape(n, k, -1)
    T, o = g.shape[2], g.shape[3]
    # Σ_t g[n,k,t,o] a[n,t,p]: one batched product, rows (k, o) per sample
    return torch.bmm(g.transpose(2, 3).reshape(n, k * o, T), a).reshape(n, k, -1)


def _reconstruct(group: Group, r: torch.Tensor, a, g) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(parameter, Σ r·∂f/∂parameter from the factors)]`` for one group."""
    if group.kind == "norm":
        out = []
        n, k, T, d = g.shape
        rg = torch.bmm(r[:, None, :], g.reshape(n, k, T * d)).reshape(n, T, d)
        if group.weight is not None:
            out.append((group.weight, (rg * a).sum((0, 1))))
        if group.bias is not None:
            out.append((group.bias, rg.sum((0, 1))))
        return out
    n, k, T, o = g.shape
    rg = torch.bmm(r[:, None, :], g.reshape(n, k, T * o)).reshape(n * T, o)
    rec = rg.T @ a.reshape(n * T, -1)
    out = []
    if group.weight is not None:
        width = rec.shape[1] - (group.bias is not None)
        out.append((group.weight, rec[:, :width]))
    if group.bias is not None:
        out.append((group.bias, rec[:, -1]))
    return out


def plan_structured(model, x, chosen: dict[str, nn.Parameter], full: bool, n_total: int,
                    rec: Recording | None = None):
    """Decide which chosen parameters go through structured derivatives (module docstring).

    Returns the plan and the :class:`Recording` of ``x``, reused for the first chunk.
    """
    ids = {id(p): n for n, p in chosen.items()}
    rec = record(model, x, set(ids)) if rec is None else rec
    f, calls = rec.f, rec.calls
    n, k = f.shape
    # parameters seen in an intercepted call, and in which role
    roles: dict[int, set] = {}
    for c in calls:
        fam = "norm" if c.kind == "norm" else "lin"
        if c.weight is not None and id(c.weight) in ids:
            roles.setdefault(id(c.weight), set()).add(("w", _key(c.bias), fam))
        if c.bias is not None and id(c.bias) in ids:
            roles.setdefault(id(c.bias), set()).add(("b", _key(c.weight), fam))
    groups: list[Group] = []
    covered: set[int] = set()
    for c in calls:
        w = c.weight if (c.weight is not None and id(c.weight) in ids) else None
        b = c.bias if (c.bias is not None and id(c.bias) in ids) else None
        if w is not None and len(roles[id(w)]) != 1:
            w = None  # used with different biases or by different ops: leave to the fallback
        if b is not None and (len(roles[id(b)]) != 1 or (w is None and c.weight is not None
                                                          and id(c.weight) in ids)):
            b = None
        key = (_key(w), _key(b))
        if key == (None, None) or any((_key(g.weight), _key(g.bias)) == key for g in groups):
            continue
        if (w is not None and id(w) in covered) or (b is not None and id(b) in covered):
            continue
        groups.append(Group(c.kind, w, b))
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
            a, g = rec.factors(grp)
            good = True
            for p, part in _reconstruct(grp, r, a, g):
                t = true[id(p)]
                t = torch.zeros_like(p) if t is None else t
                tol = 50 * math.sqrt(torch.finfo(p.dtype).eps) * (float(t.norm()) + 1e-30)
                good &= part.numel() == p.numel() and float(
                    (part.reshape(p.shape) - t).norm()) <= tol
            if good:
                ok.append(grp)
        groups = ok
    done = {id(p) for g in groups for p in (g.weight, g.bias) if p is not None}
    fallback = {nm: p for nm, p in chosen.items() if id(p) not in done}
    # per group: Grams of factors (cost ~ n²T²(p + k·out) for a trace) or the layer Jacobian;
    # the full kernel with T > 1 tokens always materialises (its Gram form is a (nkT)² product
    # followed by a memory-bound reduction, never the cheaper one in practice)
    for grp in groups:
        a, g = rec.factors(grp)
        T, p, q = a.shape[1], a.shape[2], g.shape[3]
        gram_cost = n_total**2 * T**2 * (p + k * q)
        jac_cost = n_total * k * T * p * q + n_total**2 * k * p * q
        grp.materialise = grp.kind == "norm" or (T > 1 and (full or jac_cost < gram_cost))
    return Plan(groups, fallback, rec.ops, rec.fingerprint(x)), rec


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_plan(model, x, chosen: dict[str, nn.Parameter], full: bool, n_total: int):
    """:func:`plan_structured`, verified once per model, parameter set and input shape.

    Later calls record ``x`` (which the factors need anyway) and reuse the plan when the
    recording's :meth:`Recording.fingerprint` matches the verified one; any change (a weight
    used by another call, a different path through the model) plans and verifies again.
    """
    key = (tuple(map(id, chosen.values())), full, n_total, tuple(x.shape[1:]), x.dtype)
    try:
        per_model = _PLANS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no cache
        return plan_structured(model, x, chosen, full, n_total)
    ids = set(map(id, chosen.values()))
    rec = record(model, x, ids, cut=True)
    plan = per_model.get(key)
    if plan is not None and plan.fingerprint == rec.fingerprint(x):
        return plan, rec
    if rec.detached:  # verification needs parameter gradients
        rec = record(model, x, ids)
    plan, rec = plan_structured(model, x, chosen, full, n_total, rec)
    per_model[key] = plan
    return plan, rec


def structured_factors(model, x, plan: Plan, jacobian_rows,
                       recorded: Recording | None = None) -> Factors:
    """Factors of one chunk ``x``; ``jacobian_rows(model, x, params)`` serves the fallback.

    A one-token layer whose signals are exactly one-hot, ``∂f_a/∂y_c = δ_ac`` (the output
    layer, when the model returns its ``y``), is kept as its activations only (``unit``): its
    signal Gram is ``δ_ab``, so its block is ``δ_ab (a₁·a₂)`` without the signal product.  It
    is recognised from the recording (:meth:`Recording.returns`) or, on the CPU, by comparing
    the signals with the identity (a host read, which on a GPU would wait for the device).
    """
    ids = {id(p) for g in plan.groups for p in (g.weight, g.bias) if p is not None}
    if recorded is None:
        recorded = record(model, x, ids, cut=True) if ids else Recording(None, [], [])
    out = Factors()
    for grp in plan.groups:
        a, g = recorded.factors(grp)
        if grp.materialise:
            out.jac.append(group_jacobian(grp, a, g))
        elif recorded.returns(grp) or (g.device.type == "cpu" and _unit_signals(g)):
            out.unit.append(a)
        else:
            out.groups.append((a, g.contiguous()))
    if plan.fallback:
        out.jac.append(jacobian_rows(model, x, plan.fallback))
    return out


def _unit_signals(g: torch.Tensor) -> bool:
    """Whether ``g (n, k, 1, k)`` is the identity for every sample (exact comparison)."""
    n, k, T, q = g.shape
    if T != 1 or q != k:
        return False
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    return bool(torch.equal(g[:, :, 0], eye.expand(n, k, k)))


SYM_WORK = 1e8
"""Multiply-adds of a symmetric block from which it is computed in row strips, upper part only
(below it, the extra calls cost about what the skipped products save).  Measured on the 2-core
VM, one thread (``benchmarks/ntk.py`` shapes): strips are even at ~4·10⁷ multiply-adds and save
10–30 % from 10⁸; four strips beat two from ~2.5·10⁸ (three, unevenly cut, never won)."""


def block_sym(F: Factors, output: str, k: int) -> torch.Tensor:
    """``block(F, F, …)`` of a symmetric kernel, in the *final* layout: ``(n, n, k, k)`` for
    ``"full"``, ``(n, n)`` for ``"trace"``.

    Large blocks are cut into ``m`` row strips, strip ``i`` against samples ``i…n`` only (one
    product per strip), so the Grams' products shrink to ``(m+1)/2m`` of the whole; the part
    below the diagonal is the transpose of the part above, written in the same pass that puts
    the block in its final layout.
    """
    n = _samples(F)
    m = _panels(block_work(F, output, k))
    full = output == "full"
    if m == 1 or n < 2 * m:
        K = block(F, F, output, k)
        return K.permute(0, 2, 1, 3).contiguous() if full else K
    cuts = [round(i * n / m) for i in range(m + 1)]
    ref = next(t for t in (*F.jac, *F.unit, *(a for a, _ in F.groups)))
    K = torch.empty((n, n, k, k) if full else (n, n), dtype=ref.dtype, device=ref.device)
    for i in range(m):
        r0, r1 = cuts[i], cuts[i + 1]
        B = block(F.rows(slice(r0, r1)), F.rows(slice(r0, n)), output, k)
        if full:  # B[i, a, j, b] → K[i, j, a, b]; below the diagonal K[j, i, b, a]
            K[r0:r1, r0:] = B.permute(0, 2, 1, 3)
            K[r1:, r0:r1] = B[:, :, r1 - r0:].permute(2, 0, 3, 1)
        else:
            K[r0:r1, r0:] = B
            K[r1:, r0:r1] = B[:, r1 - r0:].T
    return K


def _samples(F: Factors) -> int:
    return next(t for t in (*F.jac, *F.unit, *(a for a, _ in F.groups))).shape[0]


def _panels(work: float) -> int:
    """Row panels for a symmetric block of ``work`` multiply-adds (:data:`SYM_WORK`)."""
    return 1 if work < SYM_WORK else 2 if work < 2.5 * SYM_WORK else 4


def block_work(F: Factors, output: str, k: int) -> float:
    """Multiply-adds of ``block(F, F, output, k)`` (the products only)."""
    n = _samples(F)
    full = output == "full"
    w = 0.0
    for a, g in F.groups:
        T, p, q = a.shape[1], a.shape[2], g.shape[3]
        w += n * n * T * T * (p + k * q * (k if full else 1))
    for J in F.jac:
        w += n * n * J.shape[2] * k * (k if full else 1)
    for a in F.unit:
        w += n * n * a.shape[2]
    return w


def block(F1: Factors, F2: Factors, output: str, k: int) -> torch.Tensor:
    """Kernel block from two factor sets: ``(n1, k, n2, k)`` if ``"full"``, else ``(n1, n2)``.

    The terms, summed over layers: Grams ``(g₁·g₂)(a₁·a₂)`` (Novak et al. 2022, Sec. 4),
    Jacobian products ``J₁J₂ᵀ`` (accumulated in place, one GEMM each), and unit-signal layers'
    ``δ_ab (a₁·a₂)`` (``k (a₁·a₂)`` in the trace).
    """
    n1, n2 = _samples(F1), _samples(F2)
    K = None
    if output == "full":
        for (a1, g1), (a2, g2) in zip(F1.groups, F2.groups, strict=False):
            # one token: the plan materialises T > 1 for the full kernel.  The activation
            # Gram is repeated along (j, b) so the product runs along contiguous rows (a
            # broadcast over the inner b axis is several times slower)
            H = (g1.reshape(n1 * k, -1) @ g2.reshape(n2 * k, -1).T).view(n1, k, n2 * k)
            A = a1[:, 0] @ a2[:, 0].T
            A = (A if k == 1 else A.repeat_interleave(k, dim=1))[:, None, :]
            K = H.mul_(A) if K is None else K.addcmul_(H, A)
        K = None if K is None else K.view(n1, k, n2, k)
        for J1, J2 in zip(F1.jac, F2.jac, strict=False):
            J1, J2 = J1.reshape(n1 * k, -1), J2.reshape(n2 * k, -1)
            if K is None:
                K = (J1 @ J2.T).view(n1, k, n2, k)
            else:
                K.view(n1 * k, n2 * k).addmm_(J1, J2.T)
        for a1, a2 in zip(F1.unit, F2.unit, strict=False):
            if K is None:
                K = torch.zeros(n1, k, n2, k, dtype=a1.dtype, device=a1.device)
            if k == 1:  # δ_ab = 1: accumulate inside the product
                K.view(n1, n2).addmm_(a1[:, 0], a2[:, 0].T)
            else:
                K.diagonal(dim1=1, dim2=3).add_((a1[:, 0] @ a2[:, 0].T)[:, :, None])
        return K
    for (a1, g1), (a2, g2) in zip(F1.groups, F2.groups, strict=False):
        T = a1.shape[1]
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
        J1, J2 = J1.reshape(n1, -1), J2.reshape(n2, -1)
        if K is None:
            K = J1 @ J2.T
        else:
            K.addmm_(J1, J2.T)
    for a1, a2 in zip(F1.unit, F2.unit, strict=False):
        if K is None:
            K = (a1[:, 0] @ a2[:, 0].T).mul_(k)
        else:
            K.addmm_(a1[:, 0], a2[:, 0].T, alpha=k)
    return K
