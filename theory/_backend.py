"""Evaluate theory predictions on a jax device (CPU, GPU, TPU) in float64.

The numpy code in :mod:`theory.kernels`, :mod:`theory.random_features` and :mod:`theory.linear`
stays the reference; this module holds their jax twins for the parts that cost ``O(grid ×
modes)``: the root of the κ (or γ) equation by safeguarded Newton–bisection, iterated inside a
``jax.lax.while_loop`` on the device (no host round-trip per iteration), and the sums over modes
``Σ m_i L_i``, ``Σ m_i L_i²``, ``Σ m_i v_i² (1−L_i)(1−cL_i)``, accumulated over chunks of modes
by ``jax.lax.scan`` so that a 10⁶-mode spectrum over a 2000-point grid never holds a
``grid × modes`` array.  The sums are exact over every mode (no tail series as in
:class:`theory.kernels.Spectrum`); both agree to ~1e-14.

Precision: everything runs inside ``jax.enable_x64(True)``, a context manager, so the process-wide
default (float32 unless the user set ``jax_enable_x64``) is unchanged for other modules
(``probes.ntk_jax`` and its tests do the same).  jax is imported on first use, never by
``import theory``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import numpy as np

BACKENDS = ("numpy", "jax")

_CHUNK_ELEMENTS = {"cpu": 1 << 21, "default": 1 << 25}  # grid × modes per scan step


def resolve(backend: str | None, device: Any = None) -> Any:
    """The jax device to evaluate on, or ``None`` for numpy on the host.

    ``backend=None`` means numpy unless a ``device`` is given.  ``device`` may be a
    ``jax.Device``, a platform name (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"tpu"``), optionally with
    an index (``"gpu:1"``), or ``None`` (jax's default device).
    """
    if backend is None:
        backend = "numpy" if device is None else "jax"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "numpy":
        if device is not None:
            raise ValueError(f"device={device!r} needs backend='jax' (numpy runs on the host)")
        return None
    import jax

    if device is None:
        return jax.devices()[0]
    if isinstance(device, str):
        platform, _, index = device.partition(":")
        platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform.lower(), platform.lower())
        try:
            devices = jax.devices(platform)
        except RuntimeError as err:
            raise ValueError(f"device={device!r}: jax has no {platform!r} device here "
                             f"({err})") from None
        i = int(index) if index else 0
        if not 0 <= i < len(devices):
            raise ValueError(f"device={device!r}: only {len(devices)} {platform} device(s)")
        return devices[i]
    if hasattr(device, "platform") and hasattr(device, "id"):
        return device
    raise TypeError(f"device must be a jax.Device, a platform name or None; got {device!r}")


@contextlib.contextmanager
def x64() -> Iterator[None]:
    """float64 in jax for the duration (the global flag is restored on exit)."""
    import jax

    with jax.enable_x64(True):
        yield


def _chunk(device: Any, n_points: int, n_modes: int) -> int:
    budget = _CHUNK_ELEMENTS.get(device.platform, _CHUNK_ELEMENTS["default"])
    c = max(256, budget // max(n_points, 1))
    c = 1 << int(np.ceil(np.log2(c)))  # powers of two: few distinct compilations
    return int(min(c, 1 << int(np.ceil(np.log2(max(n_modes, 1))))))


def _modes(spec: Any, device: Any, chunk: int) -> tuple:
    """``(λ, m, m v²)`` padded to a multiple of ``chunk`` (padding: λ = m = 0, contributing
    nothing) and shaped ``(chunks, chunk)`` on ``device``; cached on the spectrum."""
    import jax

    cache_ = spec.__dict__.setdefault("_device_modes", {})
    key = (str(device), chunk)
    if key not in cache_:
        size = spec.eigenvalues.size
        pad = (-size) % chunk
        arrays = []
        for a in (spec.eigenvalues, spec.multiplicity, spec._mv2):
            a = np.concatenate([a, np.zeros(pad)]).reshape(-1, chunk)
            arrays.append(jax.device_put(a, device))
        cache_[key] = tuple(arrays)
    return cache_[key]


def _learn(jnp: Any, lam: Any, kappa: Any) -> Any:
    """``λ/(λ+κ)`` over (points, modes); ``κ = 0`` gives 1 for ``λ > 0`` and 0 for ``λ = 0``."""
    k = kappa[:, None]
    positive = k > 0
    return jnp.where(positive, lam / (lam + jnp.where(positive, k, 1.0)),
                     (lam > 0).astype(lam.dtype))


def _sums(lam: Any, m: Any, w: Any, kappa: Any, c: Any, bias: bool) -> tuple:
    """``(Σ m L, Σ m L², Σ w (1−L)(1−cL))`` at each κ, accumulated over chunks of modes."""
    import jax
    import jax.numpy as jnp

    def body(carry, block):
        lam_b, m_b, w_b = block
        L = _learn(jnp, lam_b[None, :], kappa)
        z, q, b = carry
        z = z + L @ m_b
        q = q + (L * L) @ m_b
        if bias:
            b = b + ((1 - L) * (1 - c[:, None] * L)) @ w_b
        return (z, q, b), None

    zero = jnp.zeros_like(kappa)
    (z, q, b), _ = jax.lax.scan(body, (zero, zero, zero), (lam, m, w))
    return z, q, b


def _root_decreasing(evaluate: Callable, lo: Any, hi: Any, active: Any, tol: float,
                     max_iter: int) -> Any:
    """jax twin of :func:`theory.kernels.root_decreasing` (same steps, masked lanes instead
    of index subsets), iterated in ``lax.while_loop`` until every lane has converged."""
    import jax
    import jax.numpy as jnp

    t = 0.5 * (lo + hi)
    state = (0, lo, hi, t, jnp.full_like(t, jnp.inf), active)

    def cond(s):
        return (s[0] < max_iter) & jnp.any(s[5])

    def body(s):
        i, lo, hi, t, width_old, active = s
        f, df = evaluate(t)
        up = f > 0
        lo2 = jnp.where(up, t, lo)
        hi2 = jnp.where(up, hi, t)
        newton = t - f / df
        ok = (jnp.isfinite(newton) & (newton > lo2) & (newton < hi2)
              & (jnp.abs(newton - t) < 0.5 * width_old))
        width2 = hi2 - lo2
        resolution = tol * jnp.maximum(1.0, jnp.abs(t))
        tiny = jnp.isfinite(newton) & (jnp.abs(newton - t) <= resolution)
        new = jnp.where(ok | tiny, newton, 0.5 * (lo2 + hi2))
        done = (jnp.abs(new - t) <= resolution) | (f == 0)
        t2 = jnp.where(f == 0, t, new)
        return (i + 1, jnp.where(active, lo2, lo), jnp.where(active, hi2, hi),
                jnp.where(active, t2, t), jnp.where(active, width2, width_old),
                active & ~done)

    return jax.lax.while_loop(cond, body, state)[3]


@cache
def _kappa_solver() -> Callable:
    import jax
    import jax.numpy as jnp

    def solve(lam, m, w, n, ridge, lo, hi, active, tol, max_iter):
        def evaluate(t):
            k = jnp.exp(t)
            z, q, _ = _sums(lam, m, w, k, None, False)
            d = ridge / k
            total = z + d
            return jnp.log(total / n), (-(z - q) - d) / total

        return jnp.exp(_root_decreasing(evaluate, lo, hi, active, tol, max_iter))

    return jax.jit(solve, static_argnames=("tol", "max_iter"))


@cache
def _gamma_solver() -> Callable:
    import jax
    import jax.numpy as jnp

    def solve(lam, m, w, n, nf, ridge, lo, hi, active, tol, max_iter):
        def evaluate(t):
            g = jnp.exp(t)
            z, q, _ = _sums(lam, m, w, g, None, False)
            gap = nf - z
            ok = gap > 0
            safe = jnp.where(ok, gap, 1.0)
            extra = ridge * nf / (g * safe)
            total = z + extra
            f = jnp.where(ok, jnp.log(total / n), jnp.inf)
            df = (-(z - q) - ridge * nf * (nf - q) / (g * safe**2)) / total
            return f, jnp.where(ok, df, jnp.nan)

        return jnp.exp(_root_decreasing(evaluate, lo, hi, active, tol, max_iter))

    return jax.jit(solve, static_argnames=("tol", "max_iter"))


@cache
def _sums_fn() -> Callable:
    import jax

    def run(lam, m, w, kappa, c, bias):
        return _sums(lam, m, w, kappa, c, bias)

    return jax.jit(run, static_argnames=("bias",))


def _bucket(size: int) -> int:
    """Padded lane count: a power of two (≥ 64), so that grids of similar size share one
    compiled program instead of tracing one per shape (padding lanes cost little next to a
    compilation)."""
    return max(64, 1 << int(np.ceil(np.log2(max(size, 1)))))


def _put(device: Any, *arrays: np.ndarray) -> list:
    """Flat float64 arrays padded (by repeating the last entry) to :func:`_bucket` lanes, on
    ``device``."""
    import jax

    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64).ravel()
        a = np.pad(a, (0, _bucket(a.size) - a.size), mode="edge")
        out.append(jax.device_put(a, device))
    return out


def solve_kappa(spec: Any, n: np.ndarray, ridge: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                tol: float, device: Any, max_iter: int = 200) -> np.ndarray:
    """``κ`` at flat arrays (all lanes need solving) on ``device``; see
    :func:`theory.kernels.solve_kappa` for the equation and the bracket."""
    if n.size == 0:
        return np.empty(0)
    with x64():
        modes = _modes(spec, device, _chunk(device, _bucket(n.size), spec.eigenvalues.size))
        args = _put(device, n, ridge, lo, hi)
        import jax

        active = jax.device_put(np.ones(args[0].shape, dtype=bool), device)
        out = _kappa_solver()(*modes, *args, active, tol=float(tol), max_iter=int(max_iter))
        return np.asarray(out)[:n.size]


def solve_gamma(spec: Any, n: np.ndarray, nf: np.ndarray, ridge: np.ndarray, lo: np.ndarray,
                hi: np.ndarray, tol: float, device: Any, max_iter: int = 200) -> np.ndarray:
    """``γ`` of random-feature regression with ``δ > 0`` on ``device`` (flat arrays); see
    :func:`theory.random_features._solve_gamma`."""
    if n.size == 0:
        return np.empty(0)
    with x64():
        modes = _modes(spec, device, _chunk(device, _bucket(n.size), spec.eigenvalues.size))
        args = _put(device, n, nf, ridge, lo, hi)
        import jax

        active = jax.device_put(np.ones(args[0].shape, dtype=bool), device)
        out = _gamma_solver()(*modes, *args, active, tol=float(tol), max_iter=int(max_iter))
        return np.asarray(out)[:n.size]


def sums(spec: Any, kappa: np.ndarray, device: Any, factor: np.ndarray | None = None,
         bias: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(Σ m L, Σ m L², Σ m v² (1−L)(1−cL) or None)`` at flat ``κ`` on ``device``."""
    kappa = np.asarray(kappa, dtype=np.float64).ravel()
    if kappa.size == 0:
        return np.empty(0), np.empty(0), (np.empty(0) if bias else None)
    c = np.ones_like(kappa) if factor is None else np.asarray(factor, dtype=np.float64).ravel()
    size = kappa.size
    with x64():
        modes = _modes(spec, device, _chunk(device, _bucket(size), spec.eigenvalues.size))
        k, cc = _put(device, kappa, c)
        z, q, b = _sums_fn()(*modes, k, cc, bias=bool(bias))
        return (np.asarray(z)[:size], np.asarray(q)[:size],
                (np.asarray(b)[:size] if bias else None))


# --------------------------------------------------------------------------- Advani & Saxe


@cache
def _advani_saxe_fn() -> Callable:
    import jax
    import jax.numpy as jnp

    def run(lam, w, ratio, t, noise_var, s0, learning_rate, steps, discrete):
        # lam, w: (R, K) quadrature; t, steps: (T,)
        if discrete:
            base = 1.0 - learning_rate * lam                        # (R, K)
            d = jnp.power(base[:, None, :], steps[None, :, None])   # (R, T, K), integer power
        else:
            d = jnp.exp(-t[None, :, None] * lam[:, None, :])
        frozen = jnp.maximum(1.0 - ratio, 0.0)[:, None]
        test = (noise_var + frozen * s0
                + jnp.einsum("rtk,rk->rt", d**2 * s0 + noise_var / lam[:, None, :]
                             * (1 - d) ** 2, w))
        train = jnp.einsum("rtk,rk->rt", d**2 * (noise_var + lam[:, None, :] * s0), w)
        train = train / ratio[:, None] + jnp.maximum(1.0 - 1.0 / ratio, 0.0)[:, None] * noise_var
        return test, train

    return jax.jit(run, static_argnames=("discrete",))


def advani_saxe(lam: np.ndarray, w: np.ndarray, ratios: np.ndarray, t: np.ndarray,
                noise_var: float, s0: float, learning_rate: float | None,
                device: Any) -> tuple[np.ndarray, np.ndarray]:
    """Test and train error ``(R, T)`` on ``device``; see :func:`theory.linear.advani_saxe`."""
    discrete = learning_rate is not None
    steps = (np.rint(t / learning_rate).astype(np.int64) if discrete
             else np.zeros(t.size, dtype=np.int64))
    with x64():
        import jax

        lam_d, w_d, r_d, t_d = (jax.device_put(np.asarray(a, dtype=np.float64), device)
                                for a in (lam, w, ratios, t))
        steps_d = jax.device_put(steps, device)
        test, train = _advani_saxe_fn()(lam_d, w_d, r_d, t_d, float(noise_var), float(s0),
                                        float(learning_rate or 0.0), steps_d,
                                        discrete=discrete)
        return np.asarray(test), np.asarray(train)
