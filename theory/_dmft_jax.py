"""jax passes of the two-layer DMFT solver (:mod:`traindyn.theory.dmft`).

One *pass* integrates every sampled single-site field over the time grid, driven by the current
error ``Δ_old(t)``, and in the same ``lax.scan`` integrates the new error ``Δ_new`` with the
kernel just estimated (the prediction ODE runs forward in time like the fields, so the kernel
at every grid step is consumed as soon as it is made and never stored).  The fields are held as
``(chunks, chunk, points)`` and processed chunk by chunk inside each time step, so the largest
temporaries are ``O(chunk × points)``.  Kept states — the kernel at the output times, and the
fields on the training points at the two-time indices — are written into preallocated buffers
inside the scan: memory ``O(M·P·two_time)``, independent of the number of steps.

Shapes are padded to buckets (:func:`bucket`) so that a sweep over ``P``, test points, fields or
time grids reuses a few compiled programs; padded training/test points have ``K^x = 0`` rows and
columns and zero targets, padded fields have ``u = a = 0`` (and stay 0: ``φ(0) = 0`` for every
supported activation), padded time steps have ``dt = 0``; none of them changes a result.
"""

from __future__ import annotations

import functools
import os
from typing import Any

_TRACES = {"count": 0}


def compilations() -> int:
    """Number of jax programs traced (and compiled) by the DMFT solver in this process."""
    return _TRACES["count"]


def _traced() -> None:
    _TRACES["count"] += 1


def bucket(n: int, minimum: int = 8) -> int:
    """``n`` rounded up to a multiple of ``2^(⌊log₂ n⌋ − 3)``: at most 12.5 % padding, and only
    eight sizes per octave, so nearby sizes share one compiled program."""
    n = max(int(n), 1)
    if n <= minimum:
        return minimum
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def enable_cache(folder: str | os.PathLike | None) -> str | None:
    """Turn on jax's persistent compilation cache in ``folder`` (or ``$TRAINDYN_JAX_CACHE``).

    Compiled programs are then reused across processes.  Returns the folder used, or ``None``
    when neither is set (jax's setting is then left as it is).
    """
    folder = folder if folder is not None else os.environ.get("TRAINDYN_JAX_CACHE")
    if not folder:
        return None
    import jax

    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def phi_dphi(name: str, epsilon: float):
    """The activation and its derivative as jax functions."""
    import jax.numpy as jnp

    if name == "tanh":
        return jnp.tanh, lambda z: 1.0 - jnp.tanh(z) ** 2
    if name == "relu":
        return (lambda z: jnp.maximum(z, 0.0)), (lambda z: (z > 0).astype(z.dtype))
    if name == "linear":
        return (lambda z: z), (lambda z: jnp.ones_like(z))
    if name == "poly":
        return (lambda z: z + 0.5 * epsilon * z**2), (lambda z: 1.0 + epsilon * z)
    raise ValueError(f"activation {name!r} is not supported")


@functools.lru_cache(maxsize=64)
def passes(activation: str, epsilon: float, factored: bool) -> tuple[Any, Any]:
    """jit-compiled ``(solve_pass, two_time_kernels)`` for one activation.

    ``factored``: the field drift ``(γ₀/P) (gΔ) K^{xT}`` is applied as ``((gΔ) X_tr) X_allᵀ/D``
    (cheaper when the input dimension ``D`` is below the number of points).
    """
    import jax
    import jax.numpy as jnp

    phi, dphi = phi_dphi(activation, epsilon)

    def rhs(h, a, delta, scale, kx_tr, xs_tr, xs_all):
        p = delta.shape[0]
        h_tr = h[:, :p]
        gd = a[:, None] * dphi(h_tr) * delta[None, :]
        dh = (gd @ xs_tr) @ xs_all.T if factored else gd @ kx_tr.T
        return scale * dh, scale * (phi(h_tr) @ delta)

    def solve_pass(h0, a0, deltas, dts, y, k0, kx_tr, xs_tr, xs_all, gamma0, inv_p, inv_m,
                   kslot, tslot, n_kslots, n_tslots):
        """One iteration: fields driven by ``deltas`` (Heun), the kernel estimated at every
        step with the control variate ``K̂(t) − K̂(0) + K₀``, and the new error integrated
        with it (exponential midpoint).  Returns the new error and test outputs on the grid,
        the kernels at the grid steps flagged in ``kslot`` and the training-point fields and
        readouts at the steps flagged in ``tslot``."""
        _traced()
        p = y.shape[0]
        scale = gamma0 * inv_p

        def gram(h, a):
            ph = phi(h)
            g = a[:, None] * dphi(h)
            return ph.T @ ph[:, :p], g.T @ g[:, :p]

        zeros = jnp.zeros(k0.shape, dtype=k0.dtype)

        def khat(h, a):
            def body(acc, xs):
                pk, gk = gram(*xs)
                return (acc[0] + pk, acc[1] + gk), None

            (pk, gk), _ = jax.lax.scan(body, (zeros, zeros), (h, a))
            return (pk + gk * kx_tr) * inv_m

        khat0 = khat(h0, a0)
        kbuf = jnp.broadcast_to(k0, (n_kslots, *k0.shape))
        hbuf = jnp.broadcast_to(h0[:, None, :, :p], (h0.shape[0], n_tslots, *h0.shape[1:2], p))
        abuf = jnp.broadcast_to(a0[:, None, :], (a0.shape[0], n_tslots, a0.shape[1]))
        f_te0 = jnp.zeros(k0.shape[0] - p, dtype=y.dtype)

        def step(carry, xs):
            h, a, k_prev, delta, f_te, kbuf, hbuf, abuf = carry
            dt, d0, d1, ks, ts = xs

            def chunk(acc, hc_ac):
                hc, ac = hc_ac
                dh1, da1 = rhs(hc, ac, d0, scale, kx_tr, xs_tr, xs_all)
                dh2, da2 = rhs(hc + dt * dh1, ac + dt * da1, d1, scale, kx_tr, xs_tr, xs_all)
                hc = hc + 0.5 * dt * (dh1 + dh2)
                ac = ac + 0.5 * dt * (da1 + da2)
                pk, gk = gram(hc, ac)
                return (acc[0] + pk, acc[1] + gk), (hc, ac)

            (pk, gk), (h, a) = jax.lax.scan(chunk, (zeros, zeros), (h, a))
            k_new = (pk + gk * kx_tr) * inv_m - khat0 + k0
            km = 0.5 * (k_prev + k_new)
            ktr = 0.5 * (km[:p] + km[:p].T)
            lam, vec = jnp.linalg.eigh(ktr)
            z = -dt * lam * inv_p
            small = jnp.abs(z) < 1e-12
            phi1 = jnp.where(small, 1.0 + 0.5 * z, jnp.expm1(z) / jnp.where(small, 1.0, z))
            proj = vec.T @ delta
            delta = vec @ (jnp.exp(z) * proj)
            f_te = f_te + (km[p:] @ (vec @ (dt * phi1 * proj))) * inv_p
            ki = jnp.maximum(ks, 0)
            kbuf = kbuf.at[ki].set(jnp.where(ks >= 0, k_new, kbuf[ki]))
            if n_tslots:
                ti = jnp.maximum(ts, 0)
                hbuf = hbuf.at[:, ti].set(jnp.where(ts >= 0, h[:, :, :p], hbuf[:, ti]))
                abuf = abuf.at[:, ti].set(jnp.where(ts >= 0, a, abuf[:, ti]))
            return (h, a, k_new, delta, f_te, kbuf, hbuf, abuf), (delta, f_te)

        carry = (h0, a0, k0, y, f_te0, kbuf, hbuf, abuf)
        carry, (ds, fs) = jax.lax.scan(step, carry, (dts, deltas[:-1], deltas[1:], kslot, tslot))
        new = jnp.concatenate([y[None], ds], axis=0)
        f_te = jnp.concatenate([f_te0[None], fs], axis=0)
        return new, f_te, carry[5], carry[6], carry[7]

    def two_time_kernels(hbuf, abuf, inv_m):
        """``Φ(t, s)`` and ``G(t, s)`` on the training points from the kept states, summed
        chunk by chunk: (slots, slots, P, P) each."""
        _traced()
        s, p = hbuf.shape[1], hbuf.shape[-1]
        zeros = jnp.zeros((s, s, p, p), dtype=hbuf.dtype)

        def body(acc, xs):
            hc, ac = xs                                        # (S, chunk, P), (S, chunk)
            ph = phi(hc)
            g = ac[..., None] * dphi(hc)
            return (acc[0] + jnp.einsum("tmp,smq->tspq", ph, ph),
                    acc[1] + jnp.einsum("tmp,smq->tspq", g, g)), None

        (pt, gt), _ = jax.lax.scan(body, (zeros, zeros), (hbuf, abuf))
        return pt * inv_m, gt * inv_m

    return (jax.jit(solve_pass, static_argnames=("n_kslots", "n_tslots")),
            jax.jit(two_time_kernels))
