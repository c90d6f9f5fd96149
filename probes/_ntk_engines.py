"""The NTK engines and the blocked driver behind :func:`probes.ntk.empirical_ntk`.

``"jacobian"``   Jacobian contraction: per-sample Jacobians by ``vmap(jacrev)``, then ``J₁J₂ᵀ``;
                 cost ~ N·k·[backward] + N²·k²·P, memory N·k·P per chunk.
``"ntk_vp"``     NTK–vector products: for each column ``(j, b)``, a VJP on ``x'_j`` then a JVP on
                 the ``x`` batch; cost ~ N²·k·[forward], never stores ``J(x)``.
``"structured"`` structured derivatives (:mod:`probes._ntk_structured`).

(Novak, Sohl-Dickstein, Schoenholz, ICML 2022, "Fast finite width NTK", Sec. 3–4.)  All run
the model inside :class:`probes._ntk_common.MathMode`, so attention has ``vmap``/``jvp`` rules.
The choice for ``"auto"`` is made by :mod:`probes._ntk_cost`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from traindyn.probes import _ntk_cost as cost
from traindyn.probes import _ntk_structured as st
from traindyn.probes._ntk_common import MathMode, available_bytes, outputs

SYM_PANELS = 512
"""From this many samples, a symmetric kernel is computed in three row panels, upper blocks only
(below it the fixed cost of three chunks outweighs the saved third of the contraction)."""


def jacobian_rows(model, x, params: dict[str, nn.Parameter]) -> torch.Tensor:
    """Per-sample Jacobian ``(n, k, P)`` w.r.t. ``params`` by ``vmap(jacrev(functional_call))``."""
    from torch.func import functional_call, jacrev, vmap

    detached = {n: p.detach() for n, p in params.items()}

    def f1(p, xi):
        return outputs(lambda z: functional_call(model, p, (z,)), xi[None])[0]

    with MathMode():
        jac = vmap(jacrev(f1), in_dims=(None, 0))(detached, x)
    n = x.shape[0]
    return torch.cat([jac[name].reshape(n, jac[name].shape[1], -1) for name in params], -1)


def ntk_vp_block(model, x1, x2, params: dict[str, nn.Parameter], k: int, chunk: int):
    """``(n1, k, n2, k)`` block by VJPs on ``x2`` columns and JVPs on the ``x1`` batch."""
    from torch.func import functional_call, jvp, vjp, vmap

    detached = {n: p.detach() for n, p in params.items()}

    def fx(p, x):
        return outputs(lambda z: functional_call(model, p, (z,)), x)

    n1, n2 = x1.shape[0], x2.shape[0]
    out = torch.empty(n1, k, n2, k, dtype=next(iter(detached.values())).dtype, device=x1.device)
    cols = max(1, chunk // max(1, k))
    with MathMode():
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


def batch_ntk(model, x, chosen: dict[str, nn.Parameter]) -> torch.Tensor:
    """NTK of the batch map ``X ↦ f(X)``: one backward per output entry (no vmap)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    params = list(chosen.values())
    try:
        with MathMode():
            f = outputs(model, x)
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


def finish(K: torch.Tensor, output: str) -> torch.Tensor:
    """``(n1, k, n2, k)`` → the requested output."""
    k = K.shape[1]
    if output == "full":
        return K.permute(0, 2, 1, 3).contiguous()
    tr = torch.diagonal(K, dim1=1, dim2=3).sum(-1)
    return tr / k if output == "mean" else tr


def auto_chunk(n1, n2, k, width_sum, full, itemsize, device) -> int:
    budget = max(available_bytes(device) // 8, 64 * 2**20)
    per_row = itemsize * (n2 * (k * k if full else 1) * 3 + k * width_sum * 2)
    return int(max(1, min(n1, budget // max(per_row, 1))))


def per_sample_ntk(model, x1, x2, same, chosen, output, method, chunk_size):
    """The per-sample NTK by ``method`` (``"auto"`` resolved here), blocked by chunks."""
    n1, n2 = x1.shape[0], x2.shape[0]
    full = output == "full"
    dtype = next(iter(chosen.values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    # a symmetric kernel in 3 row panels computes only the blocks on and above the diagonal
    sym = math.ceil(n1 / 3) if (same and chunk_size is None and n1 >= SYM_PANELS) else None
    probe_chunk = x1[: min(n1, chunk_size or sym or 256)]
    plan = recorded = None
    if method in ("auto", "structured"):
        plan, recorded = st.cached_plan(model, probe_chunk, chosen, full, max(n1, n2))
    k = int(recorded.f.shape[1]) if recorded is not None else int(_k_outputs(model, x1[:1]))
    if method == "auto":
        shape = cost.describe(model, x1, chosen, plan, recorded, k)
        method = cost.choose(shape, n1, n2, same, output, x1.device)
    kernel_bytes = n1 * n2 * (k * k if full else 1) * itemsize
    if kernel_bytes > 0.9 * available_bytes(x1.device):
        raise MemoryError(f"the requested kernel needs {kernel_bytes / 2**30:.1f} GiB; ask for "
                          "output='trace', fewer samples, or a larger device")
    P = sum(p.numel() for p in chosen.values())
    if method == "ntk_vp":
        chunk = chunk_size or auto_chunk(n1, n2, k, P, full, itemsize, x1.device)
        K = torch.empty((n1, n2, k, k) if full else (n1, n2), dtype=dtype, device=x1.device)
        for s in range(0, n1, chunk):
            B = ntk_vp_block(model, x1[s:s + chunk], x2, chosen, k, chunk)
            K[s:s + chunk] = B.permute(0, 2, 1, 3) if full else finish(B, "trace")
        return K / k if output == "mean" else K

    if method == "jacobian":
        plan, recorded = st.Plan([], dict(chosen)), None
        width = P
    else:
        width = 0
        for grp in plan.groups:
            a, g = recorded.factors(grp)
            width += (g.shape[-1] + a.shape[-1]) * a.shape[1]
        width += sum(p.numel() for p in plan.fallback.values())
    chunk = chunk_size or min(auto_chunk(n1, n2, k, width, full, itemsize, x1.device),
                              sym or n1)

    def factors(x: torch.Tensor) -> list[st.Factors]:
        out = []
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            reuse = recorded if (recorded is not None and xs.shape == probe_chunk.shape
                                 and xs.data_ptr() == probe_chunk.data_ptr()) else None
            out.append(st.structured_factors(model, xs, plan, jacobian_rows, reuse))
        return out

    f1 = factors(x1)
    f2 = f1 if same else factors(x2)
    mode = "full" if full else "trace"
    if len(f1) == 1 and len(f2) == 1:
        if same:  # symmetric: upper row panels only, written in the final layout
            K = st.block_sym(f1[0], mode, k)
        else:
            K = st.block(f1[0], f2[0], mode, k)
            if full:
                return finish(K, output)
    else:
        K = torch.empty((n1, n2, k, k) if full else (n1, n2), dtype=dtype, device=x1.device)
        for i, Fi in enumerate(f1):
            r = slice(i * chunk, min(n1, (i + 1) * chunk))
            for j, Fj in enumerate(f2):
                if same and j < i:
                    continue
                c = slice(j * chunk, min(n2, (j + 1) * chunk))
                if same and j == i:
                    K[r, c] = st.block_sym(Fi, mode, k)
                    continue
                B = st.block(Fi, Fj, mode, k)
                if full:
                    K[r, c] = B.permute(0, 2, 1, 3)
                    if same and j > i:
                        K[c, r] = B.permute(2, 0, 3, 1)
                else:
                    K[r, c] = B
                    if same and j > i:
                        K[c, r] = B.T
    return K / k if output == "mean" else K


def _k_outputs(model, x) -> int:
    with torch.no_grad(), MathMode():
        return outputs(model, x).shape[1]


def auto_method(model, x1, x2=None, *, output: str = "trace", params=None) -> str:
    """The method ``empirical_ntk(..., method="auto")`` would run on these inputs (no kernel)."""
    from traindyn.probes._ntk_common import (
        device_dtype,
        prepare_input,
        requires_grad,
        select_parameters,
    )

    chosen = select_parameters(model, params)
    device, dtype = device_dtype(chosen)
    x1 = prepare_input(x1, device, dtype)
    same = x2 is None
    x2 = x1 if same else prepare_input(x2, device, dtype)
    n1, n2 = x1.shape[0], x2.shape[0]
    sym = math.ceil(n1 / 3) if (same and n1 >= SYM_PANELS) else None
    probe_chunk = x1[: min(n1, sym or 256)]
    with torch.enable_grad(), requires_grad(chosen.values()):
        plan, recorded = st.cached_plan(model, probe_chunk, chosen, output == "full",
                                            max(n1, n2))
    shape = cost.describe(model, x1, chosen, plan, recorded, int(recorded.f.shape[1]))
    return cost.choose(shape, n1, n2, same, output, x1.device)
