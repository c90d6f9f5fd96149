"""jax passes of the two-layer DMFT solver (:mod:`traindyn.theory.dmft`).

One *pass* integrates every sampled single-site field over the time grid, driven by the current
error ``Δ_old(t)``, and the new error ``Δ_new`` with the kernel it estimates, segment by segment
(:data:`SEGMENT` steps): the fields over a segment, then the error over the same segment (the
error ODE runs forward in time like the fields, so only one segment of kernels is ever held).
The fields are held as ``(chunks, chunk, points)`` and processed chunk by chunk inside each time
step, so the largest temporaries are ``O(chunk × points)``.  The fields on the training points
at the two-time indices are written into a preallocated buffer inside the scan: memory
``O(M·P·two_time)``, independent of the number of steps.

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


SEGMENT = 32
"""Time steps per segment: the fields are integrated over a segment (kernels kept for its
steps only, ``SEGMENT × points × P``), then the error over the same segment."""


@functools.lru_cache(maxsize=64)
def passes(activation: str, epsilon: float, factored: bool,
           field_dtype: str = "float64") -> tuple[Any, ...]:
    """jit-compiled ``(khat, field_segment, error_segment, two_time_kernels)``.

    ``factored``: the field drift ``(γ₀/P) (gΔ) K^{xT}`` is applied as ``((gΔ) X_tr) X_allᵀ/D``
    (cheaper when the input dimension ``D`` is below the number of points).
    ``field_dtype``: the fields, their drift and each chunk's Gram products are computed in this
    type (the arrays passed in are in it); every chunk's Gram product is added to the kernel
    in float64, and the error ``Δ`` is integrated in float64.
    """
    import jax
    import jax.numpy as jnp

    phi, dphi = phi_dphi(activation, epsilon)
    fdt = jnp.dtype(field_dtype)

    def rhs(h, a, delta, scale, kx_tr, xs_tr, xs_all):
        p = delta.shape[0]
        h_tr = h[:, :p]
        gd = a[:, None] * dphi(h_tr) * delta[None, :]
        dh = (gd @ xs_tr) @ xs_all.T if factored else gd @ kx_tr.T
        return scale * dh, scale * (phi(h_tr) @ delta)

    def gram(h, a, p):
        ph = phi(h)
        g = a[:, None] * dphi(h)
        return ((ph.T @ ph[:, :p]).astype(jnp.float64),
                (g.T @ g[:, :p]).astype(jnp.float64))

    def khat(h, a, kx_tr, inv_m):
        """Sampled kernel ``K̂ = (Φ̂ + Ĝ∘K^x)`` between all points and the training points."""
        _traced()
        p = kx_tr.shape[1]
        zeros = jnp.zeros(kx_tr.shape, dtype=jnp.float64)

        def body(acc, xs):
            pk, gk = gram(*xs, p)
            return (acc[0] + pk, acc[1] + gk), None

        (pk, gk), _ = jax.lax.scan(body, (zeros, zeros), (h, a))
        return (pk + gk * kx_tr) * inv_m

    def field_segment(h, a, hbuf, abuf, deltas, dts, tslot, khat0, k0, kx_tr, xs_tr, xs_all,
                      gamma0, inv_p, inv_m):
        """Heun steps of every field over one segment, driven by ``deltas`` (segment + 1
        points), chunk by chunk; the kernel ``K̂(t) − K̂(0) + K₀`` after each step, and the
        training-point fields and readouts written to the two-time slots flagged in
        ``tslot``."""
        _traced()
        p = kx_tr.shape[1]
        scale = (gamma0 * inv_p).astype(fdt)
        zeros = jnp.zeros(kx_tr.shape, dtype=jnp.float64)
        keep = hbuf.shape[0] > 0
        kx_f, xs_tr_f, xs_all_f = (v.astype(fdt) for v in (kx_tr, xs_tr, xs_all))

        def step(carry, xs):
            h, a, hbuf, abuf = carry
            dt, d0, d1, ts = xs
            dt, d0, d1 = dt.astype(fdt), d0.astype(fdt), d1.astype(fdt)

            def chunk(acc, hc_ac):
                hc, ac = hc_ac
                dh1, da1 = rhs(hc, ac, d0, scale, kx_f, xs_tr_f, xs_all_f)
                dh2, da2 = rhs(hc + dt * dh1, ac + dt * da1, d1, scale, kx_f, xs_tr_f, xs_all_f)
                hc = hc + 0.5 * dt * (dh1 + dh2)
                ac = ac + 0.5 * dt * (da1 + da2)
                pk, gk = gram(hc, ac, p)
                return (acc[0] + pk, acc[1] + gk), (hc, ac)

            (pk, gk), (h, a) = jax.lax.scan(chunk, (zeros, zeros), (h, a))
            k = (pk + gk * kx_tr) * inv_m - khat0 + k0
            if keep:  # contiguous in-place slot updates (a no-op write off the kept steps)
                ti = jnp.maximum(ts, 0)
                old_h = jax.lax.dynamic_index_in_dim(hbuf, ti, 0, False)
                hbuf = jax.lax.dynamic_update_index_in_dim(
                    hbuf, jnp.where(ts >= 0, h[:, :, :p], old_h), ti, 0)
                old_a = jax.lax.dynamic_index_in_dim(abuf, ti, 0, False)
                abuf = jax.lax.dynamic_update_index_in_dim(
                    abuf, jnp.where(ts >= 0, a, old_a), ti, 0)
            return (h, a, hbuf, abuf), k

        (h, a, hbuf, abuf), ks = jax.lax.scan(
            step, (h, a, hbuf, abuf), (dts, deltas[:-1], deltas[1:], tslot))
        return h, a, hbuf, abuf, ks

    def error_segment(k_prev, ks, delta, f_te, dts, inv_p):
        """``∂_t Δ = −K Δ/P`` over the segment by the exponential midpoint rule (exact for a
        constant kernel), and ``∂_t f_test = K_te Δ/P``."""
        _traced()
        p = delta.shape[0]

        def step(carry, xs):
            delta, f_te, k0 = carry
            dt, k1 = xs
            km = 0.5 * (k0 + k1)
            ktr = 0.5 * (km[:p] + km[:p].T)
            lam, vec = jnp.linalg.eigh(ktr)
            z = -dt * lam * inv_p
            small = jnp.abs(z) < 1e-12
            phi1 = jnp.where(small, 1.0 + 0.5 * z, jnp.expm1(z) / jnp.where(small, 1.0, z))
            proj = vec.T @ delta
            delta = vec @ (jnp.exp(z) * proj)
            f_te = f_te + (km[p:] @ (vec @ (dt * phi1 * proj))) * inv_p
            return (delta, f_te, k1), (delta, f_te)

        (delta, f_te, _), (ds, fs) = jax.lax.scan(step, (delta, f_te, k_prev), (dts, ks))
        return delta, f_te, ds, fs

    def two_time_kernels(hbuf, abuf, inv_m):
        """``Φ(t, s)`` and ``G(t, s)`` on the training points from the kept states, summed
        chunk by chunk: (slots, slots, P, P) each."""
        _traced()
        s, p = hbuf.shape[0], hbuf.shape[-1]
        zeros = jnp.zeros((s, s, p, p), dtype=jnp.float64)

        def body(c, acc):
            hc = jax.lax.dynamic_index_in_dim(hbuf, c, 1, False)      # (S, chunk, P)
            ac = jax.lax.dynamic_index_in_dim(abuf, c, 1, False)      # (S, chunk)
            ph = phi(hc)
            g = ac[..., None] * dphi(hc)
            return (acc[0] + jnp.einsum("tmp,smq->tspq", ph, ph).astype(jnp.float64),
                    acc[1] + jnp.einsum("tmp,smq->tspq", g, g).astype(jnp.float64))

        pt, gt = jax.lax.fori_loop(0, hbuf.shape[1], body, (zeros, zeros))
        return pt * inv_m, gt * inv_m

    return (jax.jit(khat), jax.jit(field_segment, donate_argnums=(0, 1, 2, 3)),
            jax.jit(error_segment), jax.jit(two_time_kernels))
