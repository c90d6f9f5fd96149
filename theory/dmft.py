r"""Dynamical mean-field theory (DMFT) of a two-layer network: lazy → rich.

The network (Bordelon & Pehlevan, NeurIPS 2022, Sec. 2 and App. D, "mean-field" / μP
parameterisation with richness ``γ₀``)::

    h_i(x) = W_i · x / √D,        f(x) = (1/(γ₀ N)) Σ_i a_i φ(h_i(x)),
    W_i ~ N(0, I_D),  a_i ~ N(0, 1),

trained by gradient flow on the mean squared loss ``L = (1/(2P)) Σ_μ (y_μ − f_μ)²`` with every
parameter moving as ``dθ/dt = −γ₀² N ∂L/∂θ`` (the learning rate scaled with ``γ₀² N`` so that
``df/dt = O(1)`` for every ``γ₀``).  **Time convention**: ``t`` is the time of this flow; a
network trained by gradient descent with per-parameter step ``γ₀² N η`` is at ``t = η × step``
(``dynamics.recipes.two_layer`` uses exactly this, so its ``time`` coordinate is this ``t``).

With ``Δ = y − f`` on the ``P`` training points and ``K^x_{μν} = x_μ·x_ν / D``:

.. math::
    \partial_t f_\mu = \frac{1}{P}\sum_\alpha K_{\mu\alpha}(t)\,\Delta_\alpha(t),\qquad
    K = \Phi + G\circ K^x,

    \Phi_{\mu\nu}(t,s) = \langle\phi(h_\mu(t))\phi(h_\nu(s))\rangle,\quad
    G_{\mu\nu}(t,s) = \langle g_\mu(t) g_\nu(s)\rangle,\quad g = a\,\phi'(h),

and the single-site (one-neuron) stochastic process, ``u ~ N(0, K^x)``, ``a(0) ~ N(0, 1)``:

.. math::
    h_\mu(t) = u_\mu + \frac{\gamma_0}{P}\int_0^t ds\sum_\alpha K^x_{\mu\alpha}\Delta_\alpha(s)
    g_\alpha(s),\qquad
    a(t) = a(0) + \frac{\gamma_0}{P}\int_0^t ds\sum_\alpha \Delta_\alpha(s)\phi(h_\alpha(s))

(Bordelon & Pehlevan 2022, Eqs. 7–9 for ``L = 1`` hidden layer, with the ``1/P`` of the mean
loss written out).  ``⟨·⟩`` is the average over the process; ``f(0) = 0`` (the infinite-width
network's initial output vanishes).  Test points enter the fields through ``K^x`` between test
and training points, and ``∂_t f_test = (1/P) K_{test,train} Δ``.

**Solver** (the paper's Algorithm 1, with Anderson mixing): draw ``n_samples`` fields once
(common random numbers, so the map below is deterministic; antithetic pairs ``(u, a)``, ``(u,
−a)``, so the terms odd in the readout cancel exactly as they do at infinite width), start from
the static-kernel error ``Δ⁰(t) = e^{−K₀ t/P} y``, then repeat: (i) integrate every sampled
field given ``Δ`` (Heun's method), (ii) estimate ``K(t)``, (iii) integrate ``∂_t Δ = −K(t)Δ/P``
with the exponential midpoint rule (exact for a constant kernel), (iv) the next ``Δ`` from the
last few ``(Δ, Δ_new)`` pairs by Anderson mixing (Walker & Ni 2011), or ``Δ ← (1 − β)Δ + β
Δ_new``; the residual ``max_t ‖Δ_new(t) − Δ(t)‖ / ‖y‖`` is recorded at each iteration, and ``β``
is halved whenever it grows. The two-time states are written only in a pass predicted to be the
last; ``adaptive=True`` solves on nested coarser time grids first and stops at the coarsest one
whose Richardson step-error estimate meets ``step_tol``. The kernels are estimated with a
control variate: ``K(t) = K̂(t) − K̂(0) + K₀`` with ``K₀`` the exact infinite-width initial
kernel (closed forms for linear, ReLU and the polynomial; for tanh a Kolmogorov scale mixture of
erf kernels, exact to ~1e-14 at any input scale, :func:`initial_kernels`) and ``K̂`` the sample
average, so ``γ₀ → 0`` gives exactly the static kernel and the Monte-Carlo error is carried only
by the kernel's *change*.

Cost and memory: (i)–(iii) run together, segment by segment of the time grid, with the fields
processed in chunks (``chunk_size``); the kernels of one segment, the fields, and the fields
on the training points at the ``two_time`` kept times are all that is held, so peak memory is
``O(M (P+Q) + M P two_time + chunk (P+Q))`` whatever the number of steps.  Shapes are padded
to buckets (at most 12.5 % larger) so that sweeps reuse compiled programs; ``cache_dir`` (or
``$TRAINDYN_JAX_CACHE``) keeps them across processes.  A Richardson estimate of the time-step
error is reported (``step_error``) and warned about above ``step_tol``.

Backend: the inner loops run in jax (``jit`` + ``lax.scan``) in float64 (inside
``jax.enable_x64``, so other modules' jax default is untouched), on ``device`` — ``None`` picks
``jax.devices()[0]`` (the GPU when jax has one, else the CPU), or pass ``"cpu"`` / ``"gpu"``.
``field_dtype="float32"`` runs the fields, their drift and each chunk's Gram products in
float32 and adds every chunk to the kernel in float64 (the error ``Δ`` stays float64).  Measured
at P = 160, M = 32,768, γ₀ = 1, 50 steps, seed 0: every output within 1e-4 of its Monte-Carlo
standard deviation over seeds of the float64 solve (largest: predictions 2.2e-8 against
σ_MC = 3.5e-4; NTK 1.8e-7 against 4.2e-3), the iteration converging to the same ``tol``, with
2.6× less CPU time.  float64 stays the default: it keeps the solver's round-off checks (1e-12
against a float64 reference integration) and the γ₀ → 0 limit exact.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time as _time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr
from scipy.interpolate import CubicSpline
from traindyn.theory._dataset import theory_attrs, time_axis
from traindyn.theory._dmft_jax import SEGMENT, bucket, compilations, enable_cache, passes

__all__ = ["ACTIVATIONS", "DMFTConvergenceWarning", "DMFTStepWarning", "compilations",
           "dmft_two_layer", "initial_kernels"]

_LOG = logging.getLogger(__name__)

SOURCE = ("Bordelon & Pehlevan (NeurIPS 2022), self-consistent DMFT of kernel evolution, "
          "two-layer network")
ACTIVATIONS = ("tanh", "relu", "linear", "poly")
"""Supported ``activation`` names; ``"poly"`` is ``φ(z) = z + (ε/2) z²`` (Kumar et al. 2024)."""


class DMFTConvergenceWarning(RuntimeWarning):
    """The DMFT fixed-point iteration stopped before reaching its tolerance."""


class DMFTStepWarning(RuntimeWarning):
    """The estimated time-step error of a DMFT solution is above ``step_tol``."""


def _kolmogorov_density(k: np.ndarray) -> np.ndarray:
    """Density of the Kolmogorov–Smirnov distribution, ``F(k) = 1 − 2Σ_j (−1)^{j−1}
    e^{−2j²k²}`` (its Jacobi-theta form ``(√(2π)/k) Σ_j e^{−(2j−1)²π²/(8k²)}`` below ``k = 1``,
    where the alternating series converges slowly)."""
    k = np.asarray(k, dtype=float)
    out = np.empty_like(k)
    j = np.arange(1, 40, dtype=float)[:, None]
    small = k < 1.0
    ks = k[small]
    c = (2 * j - 1) ** 2 * np.pi**2 / 8
    out[small] = np.sqrt(2 * np.pi) * (np.exp(-c / ks**2) * (2 * c / ks**4 - 1 / ks**2)).sum(0)
    kl = k[~small]
    out[~small] = 8 * kl * ((-1.0) ** (j - 1) * j**2 * np.exp(-2 * j**2 * kl**2)).sum(0)
    return out


@functools.cache
def _tanh_scales(spacing: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``K_j`` and weights ``w_j`` of ``tanh(z) = E_K[erf(z / (K√2))]``, ``K`` Kolmogorov.

    The logistic distribution is a scale mixture of normals with scale ``2K`` (Andrews &
    Mallows 1974, JRSS B 36, Sec. 3; Stefanski 1991, Statist. Probab. Lett. 11, 69), so
    ``tanh(z) = 2σ(2z) − 1 = E_K[2Φ(z/K) − 1]``.  Trapezoid rule in ``log K`` (the density
    decays double-exponentially at both ends): with spacing 1/8 (32 nodes) the rule reproduces
    ``tanh`` and ``sech²`` to ~1e-14 on the real line.
    """
    tau = np.arange(np.log(0.12), np.log(5.5) + spacing / 2, spacing)
    k = np.exp(tau)
    w = spacing * k * _kolmogorov_density(k)
    return k, w / w.sum()


@functools.cache
def _tanh_pair_fn():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def pairs(a, b, c, k2, ww):
        """Both averages for a block of pairs (see :func:`_tanh_kernels`)."""
        ra = jax.lax.rsqrt(a[:, None] + k2[None, :])                   # (n, K)
        rb = jax.lax.rsqrt(b[:, None] + k2[None, :])
        r = ra[:, :, None] * rb[:, None, :]                              # 1/√((K²+a)(K'²+b))
        arg = c[:, None, None] * r
        phi = jnp.arcsin(jnp.clip(arg, -1.0, 1.0)).reshape(a.shape[0], -1) @ ww
        gd = (r * jax.lax.rsqrt(jnp.maximum(1.0 - arg * arg, 1e-300))).reshape(
            a.shape[0], -1) @ ww
        return phi * (2 / np.pi), gd * (2 / np.pi)

    return pairs


def _tanh_kernels(kx: np.ndarray, n_cols: int | None = None,
                  block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    r"""``⟨tanh(u) tanh(v)⟩`` and ``⟨sech²(u) sech²(v)⟩`` for ``(u, v) ~ N(0, [[a, c], [c, b]])``.

    With ``tanh(z) = E_K[erf(z/(K√2))]`` (:func:`_tanh_scales`) and the Gaussian averages of
    erf and of Gaussians in closed form (Williams 1997, NeurIPS, Eq. 11):

    .. math::
        ⟨\tanh u \tanh v⟩ = E_{K,K'}\Big[\tfrac{2}{π}\arcsin\frac{c}{\sqrt{(K^2+a)(K'^2+b)}}\Big],
        \qquad ⟨\mathrm{sech}^2 u\, \mathrm{sech}^2 v⟩ =
        E_{K,K'}\Big[\tfrac{2}{π}\frac{1}{\sqrt{(K^2+a)(K'^2+b) − c^2}}\Big],

    a smooth 2-D average over the two scales (32² nodes), accurate to ~1e-14 at every
    pre-activation scale (checked against ``scipy.integrate.quad`` up to ``|h| = 30``).
    Only the columns ``[:, :n_cols]`` are computed (all by default); the rest are left 0.
    """
    import jax

    k, w = _tanh_scales()
    n = kx.shape[0]
    n_cols = n if n_cols is None else int(n_cols)
    rows, cols = np.nonzero(np.tril(np.ones((n, n_cols), dtype=bool)))  # i >= j, j < n_cols
    diag = np.diag(kx)
    phi = np.empty(rows.size)
    gd = np.empty(rows.size)
    pairs = _tanh_pair_fn()
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        k2, ww = jax.numpy.asarray(k**2), jax.numpy.asarray(np.outer(w, w).ravel())
        for lo in range(0, rows.size, block):
            i, j = rows[lo:lo + block], cols[lo:lo + block]
            pad = block - i.size  # one shape for every block: one compilation
            args = [np.pad(v, (0, pad)) for v in (diag[i], diag[j], kx[i, j])]
            p, g = pairs(*args, k2, ww)
            phi[lo:lo + block] = np.asarray(p)[:i.size]
            gd[lo:lo + block] = np.asarray(g)[:i.size]
    out = []
    for v in (phi, gd):
        m = np.zeros((n, n))
        m[rows, cols] = v
        m[cols, rows] = v
        out.append(m)
    return out[0], out[1]


def initial_kernels(kx: np.ndarray, activation: str = "tanh",
                    epsilon: float = 0.02) -> tuple[np.ndarray, ...]:
    r"""Exact infinite-width initial kernels ``Φ₀``, ``Ġ₀ = ⟨φ'(u)φ'(u')⟩`` and ``K₀``.

    For ``(u, u') ~ N(0, [[a, c], [c, b]])`` with ``a, b, c`` read off ``K^x``:

    * linear: ``Φ₀ = c``, ``Ġ₀ = 1``;
    * ReLU (arc-cosine kernels, Cho & Saul 2009, Eq. 6 with ``n = 1, 0``):
      ``Φ₀ = √(ab)(sin θ + (π − θ) cos θ)/(2π)``, ``Ġ₀ = (π − θ)/(2π)``, ``cos θ = c/√(ab)``;
    * ``φ(z) = z + (ε/2)z²``: ``Φ₀ = c + (ε²/4)(ab + 2c²)``, ``Ġ₀ = 1 + ε² c`` (Isserlis);
    * tanh: ``tanh`` written as a Kolmogorov scale mixture of ``erf`` (Andrews & Mallows 1974)
      and the erf kernels in closed form (Williams 1997), see :func:`_tanh_kernels`; accurate
      to ~1e-14 at any input scale.

    ``K₀ = Φ₀ + ⟨a²⟩ Ġ₀ ∘ K^x`` with ``⟨a²⟩ = 1`` (Bordelon & Pehlevan 2022, Eq. 8 at t = 0).

    Returns ``(Φ₀, Ġ₀, K₀)``, each shaped like ``kx``.
    """
    kx = np.asarray(kx, dtype=float)
    d = np.sqrt(np.clip(np.diag(kx), 0.0, None))
    a, b = np.diag(kx)[:, None], np.diag(kx)[None, :]
    if activation == "linear":
        phi0, gdot0 = kx.copy(), np.ones_like(kx)
    elif activation == "poly":
        phi0 = kx + 0.25 * epsilon**2 * (a * b + 2 * kx**2)
        gdot0 = 1.0 + epsilon**2 * kx
    elif activation == "relu":
        norm = d[:, None] * d[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(norm > 0, kx / np.where(norm > 0, norm, 1.0), 1.0)
        theta = np.arccos(np.clip(cos, -1.0, 1.0))
        phi0 = norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
        gdot0 = (np.pi - theta) / (2 * np.pi)
    elif activation == "tanh":
        phi0, gdot0 = _tanh_kernels(kx)
    else:
        raise ValueError(f"activation {activation!r} is not supported; use one of {ACTIVATIONS}")
    return phi0, gdot0, phi0 + gdot0 * kx


def _device(device: str | None):
    import jax

    if device is None:
        return jax.devices()[0]
    name = str(device).lower()
    if name in ("cuda", "gpu") or name.startswith("cuda:"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError as exc:
            raise ValueError(f"device={device!r}: jax has no GPU backend here ({exc})") from None
        idx = int(name.split(":")[1]) if ":" in name else 0
        return gpus[idx]
    if name == "cpu":
        return jax.devices("cpu")[0]
    raise ValueError(f"device={device!r}: use None (jax's default), 'cpu' or 'gpu'/'cuda'")


def _grid(t_out: np.ndarray, dt: float | None, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Internal time grid containing every output time; index of each output time in it."""
    uniq = np.unique(np.concatenate([[0.0], t_out]))
    t_max = uniq[-1]
    step = dt if dt is not None else (t_max / n_steps if t_max > 0 else 1.0)
    pieces = [np.zeros(1)]
    for lo, hi in zip(uniq[:-1], uniq[1:], strict=True):
        k = max(1, int(np.ceil((hi - lo) / step - 1e-9)))
        pieces.append(np.linspace(lo, hi, k + 1)[1:])
    grid = np.concatenate(pieces)
    return grid, np.searchsorted(grid, t_out)


def _check_inputs(x_train, y_train, x_test, y_test, gamma0, n_samples):
    x = np.asarray(x_train, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x_train must be (P, D) with P >= 1; got shape {x.shape}")
    y = np.asarray(y_train, dtype=float).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y_train has {y.shape[0]} values for P = {x.shape[0]} inputs")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x_train and y_train must be finite (found NaN or inf)")
    if not np.isfinite(gamma0) or gamma0 < 0:
        raise ValueError(f"gamma0 must be a finite number >= 0; got {gamma0}")
    if int(n_samples) < 2:
        raise ValueError(f"n_samples must be >= 2; got {n_samples}")
    xt = yt = None
    if x_test is not None:
        xt = np.asarray(x_test, dtype=float)
        xt = xt[:, None] if xt.ndim == 1 else xt
        if xt.ndim != 2 or xt.shape[1] != x.shape[1]:
            raise ValueError(f"x_test must be (Q, {x.shape[1]}); got shape {xt.shape}")
        if not np.all(np.isfinite(xt)):
            raise ValueError("x_test must be finite (found NaN or inf)")
        if y_test is not None:
            yt = np.asarray(y_test, dtype=float).reshape(-1)
            if yt.shape[0] != xt.shape[0] or not np.all(np.isfinite(yt)):
                raise ValueError("y_test must hold one finite value per test input")
    elif y_test is not None:
        raise ValueError("y_test given without x_test")
    return x, y, xt, yt


def _alignments(k: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kernel–target alignment ``yᵀKy/(‖K‖_F‖y‖²)`` and its centred form (Cortes, Mohri &
    Rostamizadeh 2012, Eq. 1 and Def. 1), for a stack of kernels (T, P, P)."""
    n = y.shape[0]
    a = np.einsum("i,tij,j->t", y, k, y) / (np.linalg.norm(k, axis=(1, 2)) * (y @ y))
    h = np.eye(n) - 1.0 / n
    kc = h @ k @ h
    yc = h @ y
    yy = np.outer(yc, yc)
    c = np.einsum("tij,ij->t", kc, yy) / (np.linalg.norm(kc, axis=(1, 2)) * np.linalg.norm(yy))
    return a, c


@contextlib.contextmanager
def _single_thread_lapack() -> Iterator[None]:
    """One LAPACK thread for the duration (threadpoolctl, when installed).

    jax's CPU ``eigh`` calls scipy's OpenBLAS LAPACK; on a machine with more runnable threads
    than cores its worker threads spin, and the ``P × P`` eigendecomposition of every time step
    took 0.2–0.4 s instead of 5 ms (P = 160, load 11 on 2 cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _anderson(hist: list[tuple[Any, Any]], beta: float):
    r"""Next iterate of Anderson mixing from the history ``[(x_i, f_i)]``, ``f_i = G(x_i) − x_i``.

    Walker & Ni (2011, SIAM J. Numer. Anal. 49, 1715), Sec. 3, with mixing parameter ``β``
    (Anderson 1965, J. ACM 12, 547; the DIIS of Pulay 1980):

    .. math::
        γ = \arg\min_γ ‖f_k − ΔF_k γ‖_2,\qquad
        x_{k+1} = x_k + β f_k − (ΔX_k + β ΔF_k) γ,

    with ``ΔX_k``, ``ΔF_k`` the differences of consecutive iterates and residuals in the
    history.  One pair is plain damped iteration ``x + β f``.  The least-squares problem is
    solved by SVD with small singular values cut (``rcond = 1e-10``).
    """
    x, f = hist[-1]
    if len(hist) == 1:
        return x + beta * f
    xs = np.stack([np.asarray(v).ravel() for v, _ in hist])
    fs = np.stack([np.asarray(r).ravel() for _, r in hist])
    dx, df = np.diff(xs, axis=0).T, np.diff(fs, axis=0).T
    gamma = np.linalg.lstsq(df, fs[-1], rcond=1e-10)[0]
    step = xs[-1] + beta * fs[-1] - (dx + beta * df) @ gamma
    return x + (step.reshape(x.shape) - np.asarray(x))


def _fields(kx: np.ndarray, n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampled fields ``u ~ N(0, K^x)`` (through a symmetric square root) and ``a(0) ~ N(0, 1)``
    in antithetic pairs ``(u, a)``, ``(u, −a)`` next to each other (so every even prefix of the
    samples keeps the pairs): the terms odd in the readout (the O(γ₀) ones) cancel exactly."""
    rng = np.random.default_rng(seed)
    lam, vec = np.linalg.eigh(kx)
    root = vec * np.sqrt(np.clip(lam, 0.0, None))
    half = (int(n_samples) + 1) // 2
    u = rng.standard_normal((half, kx.shape[0])) @ root.T
    a = rng.standard_normal(half)
    return np.repeat(u, 2, axis=0), np.stack([a, -a], axis=1).ravel()


def _initial(kx: np.ndarray, activation: str, epsilon: float, n_cols: int) -> tuple:
    """:func:`initial_kernels`, only the columns ``[:, :n_cols]`` computed for tanh."""
    if activation == "tanh":
        phi0, gdot0 = _tanh_kernels(kx, n_cols)
        return phi0, gdot0, phi0 + gdot0 * kx
    return initial_kernels(kx, activation, epsilon)


class _Problem:
    """The padded device arrays of one solve (see :mod:`traindyn.theory._dmft_jax`)."""

    def __init__(self, x, xt, y, kx, k0, u, a0, grid, keep_k, keep_t, chunk, put, jnp):
        P, D = x.shape
        Q = 0 if xt is None else xt.shape[0]
        self.P, self.Q = P, Q
        self.Pp, self.Qp = bucket(P), (bucket(Q) if Q else 0)
        n_pad = self.Pp + self.Qp
        rows = np.r_[np.arange(P), self.Pp + np.arange(Q)]  # real points in the padded layout
        self.rows = rows
        self.Dp = bucket(D)
        self.factored = self.Dp * (self.Pp + n_pad) < 0.8 * self.Pp * n_pad
        xa = x if xt is None else np.concatenate([x, xt])
        xs = np.zeros((n_pad, self.Dp))
        xs[rows, :D] = xa / np.sqrt(D)
        kx_p = np.zeros((n_pad, n_pad))
        kx_p[np.ix_(rows, rows)] = kx
        k0_p = np.zeros((n_pad, self.Pp))
        k0_p[rows, :P] = k0[:, :P]
        y_p = np.zeros(self.Pp)
        y_p[:P] = y
        self.m = u.shape[0]
        self.chunk = int(min(chunk, self.m))
        n_chunks = bucket(-(-self.m // self.chunk), minimum=1)
        u_p = np.zeros((n_chunks * self.chunk, n_pad))
        u_p[:self.m, rows] = u
        a_p = np.zeros(n_chunks * self.chunk)
        a_p[:self.m] = a0
        self.u_flat, self.a_flat = u_p, a_p
        self.put, self.jnp = put, jnp
        self.kx_tr = put(kx_p[:, :self.Pp])
        self.xs_tr, self.xs_all = put(xs[:self.Pp]), put(xs)
        self.k0, self.y = put(k0_p), put(y_p)
        self.k0_host = k0_p
        self.grid, self.keep_k, self.keep_t = grid, keep_k, keep_t

    def fields(self, m: int | None = None):
        """The first ``m`` sampled fields (all by default) as (chunks, chunk, points)."""
        m = self.m if m is None else m
        chunk = min(self.chunk, m)
        n = bucket(-(-m // chunk), minimum=1) * chunk
        u = self.u_flat[:n].copy()
        a = self.a_flat[:n].copy()
        u[m:] = 0.0
        a[m:] = 0.0
        return (self.put(u.reshape(-1, chunk, u.shape[1])), self.put(a.reshape(-1, chunk)),
                1.0 / m)

    def time(self, grid_idx: np.ndarray):
        """Padded ``dts`` (a whole number of segments) and the two-time slot of each step's end
        point, for the sub-grid ``grid[grid_idx]``."""
        g = self.grid[grid_idx]
        steps = g.size - 1
        seg = min(SEGMENT, bucket(max(steps, 1)))
        n = -(-steps // seg) * seg
        dts = np.zeros(n)
        dts[:steps] = np.diff(g)
        tslot = np.full(n, -1, dtype=np.int32)
        pos = {int(v): i for i, v in enumerate(grid_idx)}
        for slot, gi in enumerate(self.keep_t):
            if int(gi) in pos and pos[int(gi)] > 0:
                tslot[pos[int(gi)] - 1] = slot
        return dts, tslot, seg, n + 1

    def static_deltas(self, grid_idx: np.ndarray, n_grid: int):
        """``Δ⁰(t) = e^{−K₀ t/P} y`` on the (padded) sub-grid."""
        k = self.k0_host[:self.Pp]
        lam, vec = np.linalg.eigh(0.5 * (k + k.T))
        t = self.grid[grid_idx]
        t = np.concatenate([t, np.full(n_grid - t.size, t[-1])])
        proj = vec.T @ np.asarray(self.y)
        return self.put(np.exp(-np.outer(t, lam) / self.P) * proj @ vec.T)


def dmft_two_layer(
    x_train: Any,
    y_train: Any,
    time: Any,
    gamma0: float,
    x_test: Any = None,
    y_test: Any = None,
    activation: str = "tanh",
    epsilon: float = 0.02,
    n_samples: int = 4096,
    dt: float | None = None,
    n_steps: int = 200,
    damping: float = 1.0,
    tol: float = 1e-7,
    max_iter: int = 60,
    two_time: int = 6,
    seed: int = 0,
    device: str | None = None,
    chunk_size: int | None = None,
    warm_start: bool = True,
    step_tol: float | None = 1e-3,
    cache_dir: str | None = None,
    mixing: str = "anderson",
    anderson_depth: int = 4,
    adaptive: bool = False,
    field_dtype: str = "float64",
) -> xr.Dataset:
    r"""Solve the two-layer DMFT self-consistently; loss, predictions and kernels over time.

    Parameters
    ----------
    x_train, y_train : (P, D), (P,)
        Training inputs and targets (``P >= 1``, finite).
    time : array-like or xarray.DataArray
        Output times ``t ≥ 0`` of the gradient flow (see the module docstring for the
        convention; ``time = η × step`` of ``dynamics.recipes.two_layer``).  A DataArray (e.g.
        a measured ``time`` coordinate along ``step``) puts the prediction on those coordinates.
    gamma0 : float
        Richness ``γ₀ ≥ 0``; ``0`` is the static-kernel (NTK) limit.
    x_test, y_test : (Q, D), (Q,), optional
        Test points (their predictions and, with ``y_test``, the test loss).
    activation : {"tanh", "relu", "linear", "poly"}
        ``"poly"`` is ``φ(z) = z + (ε/2) z²`` with ``epsilon``.
    n_samples : int
        Sampled single-site fields (the Monte-Carlo size).
    dt, n_steps : float, int
        Largest internal time step (default ``t_max / n_steps``); output times are grid points.
    damping, tol, max_iter : float, float, int
        Initial damping/mixing parameter ``β ∈ (0, 1]`` (halved whenever the residual grows),
        tolerance on the residual ``max_t ‖Δ_new − Δ‖/‖y‖``, and the iteration cap (per grid
        level with ``adaptive``).  Not converging raises a :class:`DMFTConvergenceWarning` and
        sets ``converged = 0`` in the attributes.
    two_time : int
        Number of output times (evenly chosen) at which the two-time kernels ``Φ(t, s)`` and
        ``G(t, s)`` on the training points are reported (0: none).
    seed : int
        Seed of the sampled fields.
    device : None, "cpu" or "gpu"
        Where jax runs (None: ``jax.devices()[0]``, the GPU when there is one).  ``"gpu"``
        without a GPU raises a ``ValueError``.
    chunk_size : int, optional
        Fields processed together (default: about 2²¹ / (P + Q), a power of two).  Peak memory
        grows like ``8 B × M (P+Q) (4 + 2·two_time)`` for ``M`` fields, plus ``O(chunk (P+Q))``
        temporaries and one segment of kernels, independent of the number of time steps
        (measured peak RSS: 2.9 GB at P = 550, M = 32,768, two_time = 6 over one 32-step pass;
        3.06 GiB for the whole adaptive solve); the result does not depend on
        the chunk size beyond round-off.
    warm_start : bool
        With at least 16384 fields, first iterate on the first eighth of them (same draws) and
        start the full iteration from that fixed point (fewer full-size passes).
    step_tol : float or None
        Time-step error control: after the iteration, the last pass is repeated on the grid
        with every second point and the step error of ``Δ`` is estimated by Richardson
        extrapolation (second-order schemes), ``max_t ‖Δ_{2dt} − Δ_{dt}‖ / (3‖y‖)``, divided by
        ``1 − ρ`` with ``ρ`` the iteration's observed contraction (the error of one pass moves
        the fixed point by about that much more; measured within a factor 1.5 of the error
        against a 16× finer grid on a γ₀ = 1 task).  Reported
        as ``step_error``; above ``step_tol`` a :class:`DMFTStepWarning` is raised.  ``None``
        skips the estimate (half a pass).
    cache_dir : str, optional
        Folder of jax's persistent compilation cache (default ``$TRAINDYN_JAX_CACHE``; neither
        set: no persistent cache).
    mixing, anderson_depth : {"anderson", "damped"}, int
        How the next ``Δ`` is formed from the pass: Anderson mixing over the last
        ``anderson_depth`` differences (Walker & Ni 2011, see :func:`_anderson`; the history is
        restarted whenever the residual grows), or ``Δ + β (Δ_new − Δ)``.  Both stop at the same
        fixed point.  Measured (P = 10, 512 fields, 80 steps, tol 1e-9): γ₀ = 4, 51 passes
        against 90 damped; γ₀ ≤ 2, 9–13 passes either way; at P = 160, γ₀ = 1 a pass contracts
        the residual ~200-fold and both need 2–3 passes.
    adaptive : bool
        Error-controlled time grid (needs ``step_tol``): solve on nested grids, every
        ``2^k``-th point of the ``n_steps`` grid (with the output times), from the coarsest with
        at least 16 steps; each level starts from the previous level's ``Δ`` (cubic spline in
        time) and is iterated to ``tol``; stop at the first level whose Richardson estimate
        ``max_t ‖Δ_h − Δ_2h‖/(3‖y‖)`` on the shared points is ``≤ step_tol`` (or at the full
        grid).  ``n_steps``/``dt`` is then the finest grid allowed; ``n_steps_solved`` says
        which was used.  Choose ``step_tol`` below the Monte-Carlo error of the outputs (at
        P = 160, M = 32,768, γ₀ = 1: ``max_t ‖σ_MC(f)‖/‖y‖ = 1.1e-4`` over seeds).
    field_dtype : {"float64", "float32"}
        Type of the sampled fields and of each chunk's Gram products (kernel sums and ``Δ``
        are float64 either way); see the module docstring for the measured deviation.

    Returns
    -------
    xarray.Dataset
        Over ``time`` (or the dims of a ``time`` DataArray): ``train_loss`` (and ``test_loss``),
        mean squared errors ``(1/P) Σ (y − f)²``; ``train_prediction`` (``sample``),
        ``test_prediction`` (``test_sample``); the NTK ``ntk`` (``sample``, ``sample2``) and
        ``ntk_test`` (``test_sample``, ``sample``) in the ``γ₀²N``-rescaled units of the
        module docstring; ``ntk_alignment``, ``ntk_centered_alignment`` (on the training
        points) and ``ntk_trace_mean``; two-time ``phi_kernel``, ``g_kernel`` over
        (``time1``, ``time2``, ``sample``, ``sample2``); ``dmft_residual`` over ``iteration``.
        Attributes: ``converged`` (1/0), ``n_iterations`` (passes with all fields, every grid
        level), ``n_warm_iterations``, ``final_residual``, ``step_error``, ``n_steps_solved``
        (steps of the grid the outputs come from), ``n_pass_equivalents`` (the work, in passes
        of all fields over the ``n_steps`` grid), ``n_compilations`` (jax programs compiled by
        this call), ``device``, ``time_convention``.  Each pass is logged at INFO level on the
        ``traindyn.theory.dmft`` logger.
    """
    import jax
    import jax.numpy as jnp
    from traindyn.theory import _validate as check

    gamma0 = check.real_scalar(gamma0, "gamma0")
    n_samples = check.count(n_samples, "n_samples", 2)
    x, y, xt, yt = _check_inputs(x_train, y_train, x_test, y_test, gamma0, n_samples)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; use one of {ACTIVATIONS}")
    epsilon = check.finite_scalar(epsilon, "epsilon")
    damping = check.finite_scalar(damping, "damping")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1]; got {damping}")
    tol = check.positive_scalar(tol, "tol")
    max_iter = check.count(max_iter, "max_iter", 1)
    n_steps = check.count(n_steps, "n_steps", 1)
    two_time = check.count(two_time, "two_time", 0)
    if dt is not None:
        dt = check.positive_scalar(dt, "dt")
    if chunk_size is not None:
        chunk_size = check.count(chunk_size, "chunk_size", 2)
    if step_tol is not None:
        step_tol = check.positive_scalar(step_tol, "step_tol")
    if adaptive and step_tol is None:
        raise ValueError("adaptive=True refines the time grid until the step error is below "
                         "step_tol: give step_tol (below the Monte-Carlo error of the outputs)")
    if mixing not in ("anderson", "damped"):
        raise ValueError(f"mixing must be 'anderson' or 'damped'; got {mixing!r}")
    anderson_depth = check.count(anderson_depth, "anderson_depth", 1)
    field_dtype = str(np.dtype(field_dtype)) if field_dtype in (
        "float32", "float64", np.float32, np.float64) else field_dtype
    if field_dtype not in ("float32", "float64"):
        raise ValueError(f"field_dtype must be 'float64' or 'float32'; got {field_dtype!r}")
    t_out, tdims, tcoords = time_axis(time)
    if np.any(~np.isfinite(t_out)) or np.any(t_out < 0):
        raise ValueError("time must be finite and non-negative")
    dev = _device(device)
    cache = enable_cache(cache_dir)
    traces0 = compilations()
    P, D = x.shape
    xa = x if xt is None else np.concatenate([x, xt], axis=0)
    kx = xa @ xa.T / D
    phi0, gdot0, k0 = _initial(kx, activation, epsilon, P)
    grid, idx = _grid(t_out.ravel(), dt, n_steps)
    keep_k = np.unique(idx)
    n_two = min(int(two_time), t_out.size)
    two_idx = (np.unique(idx[np.linspace(0, t_out.size - 1, n_two).round().astype(int)])
               if n_two > 0 else np.zeros(0, dtype=int))
    u, a0 = _fields(kx, n_samples, seed)
    n_samples = u.shape[0]
    n_all = bucket(P) + (bucket(xt.shape[0]) if xt is not None else 0)
    if chunk_size is None:
        chunk_size = 1 << max(6, int(np.log2(max((1 << 21) // n_all, 1))))
    chunk_size += chunk_size % 2  # whole antithetic pairs in every chunk

    residuals: list[float] = []
    n_warm = 0
    work = [0.0]  # passes in units of one pass of all fields over the whole grid
    started = _time.perf_counter()
    ynorm = float(np.linalg.norm(y)) or 1.0
    with jax.enable_x64(True), jax.default_device(dev), _single_thread_lapack():
        put = functools.partial(jax.device_put, device=dev)
        pb = _Problem(x, xt, y, kx, k0, u, a0, grid, keep_k, two_idx, chunk_size, put, jnp)
        khat_fn, field_seg, error_seg, two_time_fn = passes(activation, float(epsilon),
                                                             pb.factored, field_dtype)
        g = put(jnp.asarray(float(gamma0)))
        inv_p = put(jnp.asarray(1.0 / P))
        full = np.arange(grid.size)
        n_t = two_idx.size
        consts = (pb.k0, pb.kx_tr, pb.xs_tr, pb.xs_all, g, inv_p)

        def run(fields, deltas, sub=None, keep=True):
            """One pass driven by ``deltas``: the new error and test outputs on the grid, the
            kernels at the grid points ``keep_k`` and the two-time buffers."""
            dts, tslot, seg, _ = pb.time(full if sub is None else sub)
            h0, a0_, inv_m0 = fields
            inv_m = put(jnp.asarray(inv_m0))
            h = jnp.array(h0, dtype=field_dtype)
            a = jnp.array(a0_, dtype=field_dtype)
            shape_h = (n_t if keep else 0, *h.shape[:2], pb.Pp)
            hbuf = jnp.array(jnp.broadcast_to(h[None, :, :, :pb.Pp], shape_h))
            abuf = jnp.array(jnp.broadcast_to(a[None], shape_h[:3]))
            khat0 = khat_fn(h, a, pb.kx_tr, inv_m)
            delta, f_te, k_prev = pb.y, jnp.zeros(pb.k0.shape[0] - pb.Pp), pb.k0
            ds, fs, kept = [delta[None]], [f_te[None]], {0: pb.k0}
            grid_of = full if sub is None else sub
            work[0] += (grid_of.size - 1) / max(grid.size - 1, 1) / (inv_m0 * n_samples)
            want = {int(i): j for j, i in enumerate(grid_of)}
            for lo in range(0, dts.size, seg):
                h, a, hbuf, abuf, ks = field_seg(
                    h, a, hbuf, abuf, deltas[lo:lo + seg + 1], put(dts[lo:lo + seg]),
                    put(tslot[lo:lo + seg]), khat0, *consts[:4], g, inv_p, inv_m)
                delta, f_te, dseg, fseg = error_seg(k_prev, ks, delta, f_te,
                                                    put(dts[lo:lo + seg]), inv_p)
                k_prev = ks[-1]
                ds.append(dseg)
                fs.append(fseg)
                for gi in keep_k:
                    j = want.get(int(gi), -1) - lo - 1
                    if 0 <= j < seg:
                        kept[int(gi)] = ks[j]
            new = jnp.concatenate(ds)
            f_all = jnp.concatenate(fs)
            kbuf = (jnp.stack([kept[int(gi)] for gi in keep_k])
                    if all(int(gi) in kept for gi in keep_k) else None)
            return new, f_all, kbuf, hbuf, abuf

        def residual(new, deltas) -> float:
            return float(jnp.max(jnp.linalg.norm(new - deltas, axis=1))) / ynorm

        def level_grid(k: int) -> np.ndarray:
            """Every ``2^k``-th grid point, with the output times and the end point."""
            if k == 0:
                return full
            return np.unique(np.r_[np.arange(0, grid.size, 1 << k), idx.ravel(), grid.size - 1])

        def on_grid(values, src: np.ndarray, dst: np.ndarray):
            """``Δ`` given on ``grid[src]`` carried to ``grid[dst]`` (cubic spline in time),
            padded to whole segments like a pass's own output."""
            v = np.asarray(values)[:src.size]
            if src.size > 3:
                w = CubicSpline(grid[src], v, axis=0)(grid[dst])
            else:
                w = np.stack([np.interp(grid[dst], grid[src], c) for c in v.T], axis=1)
            n = pb.time(dst)[3]
            return put(np.concatenate([w, np.broadcast_to(w[-1], (n - dst.size, w.shape[1]))]))

        def iterate(flds, deltas, sub: np.ndarray, cap: int, stop: float, want_two: bool,
                    record: bool):
            """Fixed-point iteration on the sub-grid ``sub``, Anderson-mixed or damped.

            Returns the last pass's output, the driving ``Δ`` of that pass, and whether the
            residual fell below ``stop``."""
            nonlocal n_warm
            beta = float(damping)
            hist: list[tuple[Any, Any]] = []
            res: list[float] = []
            out, drive, done = None, deltas, False
            for _ in range(cap):
                # the two-time states are written only in a pass predicted to be the last
                rho = res[-1] / res[-2] if len(res) > 1 else 1.0
                keep = want_two and len(res) > 0 and res[-1] * min(rho, 1.0) < stop
                out = None  # the previous pass's two-time buffers are freed before this one
                out = run(flds, deltas, sub, keep=keep)
                new = out[0]
                r = residual(new, deltas)
                _LOG.info("DMFT pass: %d steps, %d fields, residual %.3g, work %.3f passes, "
                          "%.1f s", sub.size - 1, round(1 / flds[2]), r, work[0],
                          _time.perf_counter() - started)
                drive = deltas
                if record:
                    if residuals and r > residuals[-1]:
                        beta = max(beta / 2, 1 / 64)
                    residuals.append(r)
                else:
                    n_warm += 1
                grew = bool(res) and r > res[-1]
                res.append(r)
                if r < stop:
                    done = True
                    break
                f = new - deltas
                if mixing == "anderson":
                    if grew:  # restart the history from the latest pair (safeguard)
                        hist = []
                    hist = [*hist, (deltas, f)][-(anderson_depth + 1):]
                    deltas = _anderson(hist, beta)
                else:
                    deltas = deltas + beta * f
            if want_two and done and not (out[3].shape[0] > 0):
                out = None
                out = run(flds, drive, sub, keep=True)  # converged before a keeping pass
            return out, drive, done, deltas

        step_error = float("nan")
        warm_fields = warm_start and n_samples >= 16384 and gamma0 > 0
        levels = [0]
        if adaptive and step_tol is not None and gamma0 > 0:
            k_top = 0
            while (grid.size - 1) >> (k_top + 1) >= 16:
                k_top += 1
            levels = list(range(k_top, -1, -1))
        sub = level_grid(levels[0])
        deltas = pb.static_deltas(sub, pb.time(sub)[3])
        if warm_fields:
            deltas = iterate(pb.fields(2 * (n_samples // 16)), deltas, sub,
                             min(int(max_iter), 12), max(tol, 1e-4), False, False)[0][0]
        fields = pb.fields()
        converged = False
        prev = None
        for k in levels:
            last_level = k == levels[-1]
            if prev is not None:
                deltas = on_grid(prev[0], prev[1], level_grid(k))
            sub = level_grid(k)
            out = None  # free the coarser level's buffers
            out, driving, converged, deltas = iterate(fields, deltas, sub, int(max_iter), tol,
                                                      bool(two_idx.size), True)
            new = out[0]
            if prev is not None and converged:
                # Richardson: second-order scheme, Δ_h − Δ_2h ≈ 3 × (error of Δ_h), on the
                # points the two grids share (all of the coarser one)
                common = np.searchsorted(sub, prev[1])
                diff = np.asarray(new)[common] - np.asarray(prev[0])[:prev[1].size]
                step_error = float(np.linalg.norm(diff, axis=1).max()) / (3 * ynorm)
                if step_error <= step_tol:
                    break
            if last_level or not converged:
                break
            prev = (new, sub)
        if not converged:  # the kernels and predictions of the last iterate
            driving = deltas
            out = None
            out = run(fields, deltas, sub, keep=bool(two_idx.size))
        new, f_te, kbuf, hbuf, abuf = out
        out_grid = sub
        if len(levels) == 1 and step_tol is not None and sub.size > 2:
            half = np.unique(np.r_[np.arange(0, sub.size, 2), sub.size - 1])
            coarse_idx = sub[half]
            n_sub = pb.time(coarse_idx)[3]
            drive = jnp.concatenate([driving[half], jnp.broadcast_to(
                driving[half[-1]], (n_sub - half.size, pb.Pp))])
            coarse = run(fields, drive, coarse_idx, keep=False)[0]
            one_pass = float(jnp.max(jnp.linalg.norm(coarse[:half.size] - new[half], axis=1))
                             ) / (3 * ynorm)
            # the fixed point moves by the one-pass error amplified by 1/(1 − ρ), ρ the
            # contraction of the iteration (median of its last residual ratios)
            ratios = np.asarray(residuals[1:]) / np.maximum(residuals[:-1], 1e-300)
            rho = float(np.clip(np.median(ratios[-3:]), 0.0, 0.9)) if ratios.size else 0.0
            step_error = one_pass / (1.0 - rho)
        if two_idx.size:
            pt, gt = two_time_fn(hbuf, abuf, put(jnp.asarray(1.0 / n_samples)))
            phi_two = np.asarray(pt)[:, :, :P, :P]
            g_two = np.asarray(gt)[:, :, :P, :P]
            if two_idx[0] == 0:  # control variate: the sampled (0, 0) kernels -> exact ones
                phi_two = phi_two - phi_two[0, 0] + phi0[:P, :P]
                g_two = g_two - g_two[0, 0] + gdot0[:P, :P]
        at = np.searchsorted(out_grid, idx)  # the output times on the grid solved last
        deltas = np.asarray(new)[at, :P]
        f_te = np.asarray(f_te)[at][:, pb.rows[P:] - pb.Pp] if xt is not None else None
        kbuf = np.asarray(kbuf)[:, pb.rows][:, :, :P]
    n_compiled = compilations() - traces0
    if not converged:
        warnings.warn(
            f"the DMFT iteration did not converge in {max_iter} iterations (residual "
            f"{residuals[-1]:.3g} > tol {tol:g}); the Dataset says converged = 0. Try a smaller "
            "gamma0 or time range, more iterations, or a smaller damping", DMFTConvergenceWarning,
            stacklevel=2)
    if step_tol is not None and step_error > step_tol:
        warnings.warn(
            f"the estimated time-step error of the DMFT solution is {step_error:.3g} (relative "
            f"to ‖y‖) > step_tol {step_tol:g}; the Dataset says step_error = {step_error:.3g}. "
            "Use more n_steps or a smaller dt", DMFTStepWarning, stacklevel=2)

    shape = t_out.shape
    delta_out = deltas                                       # (T, P)
    k_out = kbuf[np.searchsorted(keep_k, idx)]               # (T, P+Q, P)
    k_tr = 0.5 * (k_out[:, :P] + np.transpose(k_out[:, :P], (0, 2, 1)))
    align, calign = _alignments(k_tr, y)

    def over_time(values: np.ndarray, extra: tuple[str, ...] = ()) -> tuple:
        return (*tdims, *extra), values.reshape(*shape, *values.shape[1:])

    data: dict[str, Any] = {
        "train_loss": (*over_time((delta_out**2).mean(1)), {
            "long_name": "training loss, mean squared error (1/P) Σ (y − f)²", "units": "1"}),
        "train_prediction": (*over_time(y[None] - delta_out, ("sample",)), {
            "long_name": "network output f on the training points", "units": "1"}),
        "ntk": (*over_time(k_tr, ("sample", "sample2")), {
            "long_name": "NTK on the training points (γ₀²N-rescaled)", "units": "1"}),
        "ntk_alignment": (*over_time(align), {"long_name": "NTK–target alignment",
                                              "units": "1"}),
        "ntk_centered_alignment": (*over_time(calign), {
            "long_name": "centred NTK–target alignment", "units": "1"}),
        "ntk_trace_mean": (*over_time(np.trace(k_tr, axis1=1, axis2=2) / P), {
            "long_name": "mean NTK diagonal tr(K)/n", "units": "1"}),
    }
    if xt is not None:
        f_test = f_te
        data["test_prediction"] = (*over_time(f_test, ("test_sample",)), {
            "long_name": "network output f on the test points", "units": "1"})
        data["ntk_test"] = (*over_time(k_out[:, P:], ("test_sample", "sample")), {
            "long_name": "NTK between test and training points (γ₀²N-rescaled)", "units": "1"})
        if yt is not None:
            data["test_loss"] = (*over_time(((yt[None] - f_test) ** 2).mean(1)), {
                "long_name": "test loss, mean squared error", "units": "1"})
    coords: dict[str, Any] = dict(tcoords)
    coords["sample"] = ("sample", np.arange(P))
    coords["sample2"] = ("sample2", np.arange(P))
    if xt is not None:
        coords["test_sample"] = ("test_sample", np.arange(xt.shape[0]))
    if two_idx.size:
        tt = grid[two_idx]
        data["phi_kernel"] = (("time1", "time2", "sample", "sample2"), phi_two, {
            "long_name": "two-time feature kernel Φ(t, s) on the training points", "units": "1"})
        data["g_kernel"] = (("time1", "time2", "sample", "sample2"), g_two, {
            "long_name": "two-time gradient kernel G(t, s) on the training points",
            "units": "1"})
        coords["time1"] = ("time1", tt, {"long_name": "first time of a two-time kernel",
                                         "units": "1"})
        coords["time2"] = ("time2", tt, {"long_name": "second time of a two-time kernel",
                                         "units": "1"})
    data["dmft_residual"] = ("iteration", np.asarray(residuals), {
        "long_name": "DMFT residual max_t ‖Δ_new − Δ‖/‖y‖", "units": "1"})
    coords["iteration"] = ("iteration", np.arange(1, len(residuals) + 1))
    params = dict(gamma0=float(gamma0), activation=activation, epsilon=float(epsilon),
                  n_samples=int(n_samples), n_grid=int(out_grid.size), damping=damping, tol=tol,
                  max_iter=max_iter, seed=seed, P=P, D=D, mixing=mixing, field_dtype=field_dtype,
                  adaptive=int(adaptive),
                  Q=0 if xt is None else int(xt.shape[0]))
    ds = xr.Dataset(data, coords=coords, attrs=theory_attrs(
        SOURCE, params,
        time_convention="t of the flow dθ/dt = −γ₀²N ∂L/∂θ, L = (1/2P)Σ(y−f)²; "
                        "= learning rate × step for GD with per-parameter step γ₀²N·lr",
        device=str(dev)))
    ds.attrs.update(converged=int(converged), n_iterations=len(residuals),
                    n_warm_iterations=n_warm,
                    final_residual=float(residuals[-1]) if residuals else float("nan"),
                    step_error=step_error, n_steps_solved=int(out_grid.size - 1),
                    n_pass_equivalents=round(work[0], 4),
                    n_compilations=n_compiled,
                    chunk_size=int(pb.chunk), compilation_cache=cache or "")
    if "time" in ds.coords:
        ds["time"].attrs.update(long_name="training time, learning rate × step", units="1")
    return ds
