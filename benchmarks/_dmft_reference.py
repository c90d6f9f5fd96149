# Reference implementation of ``theory.dmft_two_layer`` at commit dd32ac4: the straightforward
# solver (whole-trajectory field pass, damped iteration, fixed grid, every step's fields kept
# for the two-time kernels).  Kept verbatim as the baseline of benchmarks/dmft_speed.py and
# tests/theory/test_dmft_speed.py; not part of the package.
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

**Solver** (the paper's Algorithm 1, damped): draw ``n_samples`` fields once (common random
numbers, so the map below is deterministic; antithetic pairs ``(u, a)``, ``(u, −a)``, so the
terms odd in the readout cancel exactly as they do at infinite width), start from the
static-kernel error ``Δ⁰(t) = e^{−K₀ t/P} y``, then repeat: (i) integrate every sampled field
given ``Δ`` (Heun's method), (ii) estimate ``K(t)``, (iii) integrate ``∂_t Δ = −K(t)Δ/P`` with
the exponential midpoint rule (exact for a constant kernel), (iv) ``Δ ← (1 − β)Δ + β Δ_new``;
the residual ``max_t ‖Δ_new(t) − Δ(t)‖ / ‖y‖`` is recorded at each iteration, and ``β`` is
halved whenever it grows. The kernels are estimated with a control variate: ``K(t) = K̂(t) −
K̂(0) + K₀`` with ``K₀`` the exact infinite-width initial kernel (closed forms for linear, ReLU
and the polynomial; 2-D Gauss–Hermite quadrature for tanh) and ``K̂`` the sample average, so
``γ₀ → 0`` gives exactly the static kernel and the Monte-Carlo error is carried only by the
kernel's *change*.

Backend: the inner loops run in jax (``jit`` + ``lax.scan``) in float64 (inside
``jax.enable_x64``, so other modules' jax default is untouched), on ``device`` — ``None`` picks
``jax.devices()[0]`` (the GPU when jax has one, else the CPU), or pass ``"cpu"`` / ``"gpu"``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import xarray as xr
from traindyn.theory._dataset import theory_attrs, time_axis

__all__ = ["ACTIVATIONS", "DMFTConvergenceWarning", "dmft_two_layer", "initial_kernels"]

SOURCE = ("Bordelon & Pehlevan (NeurIPS 2022), self-consistent DMFT of kernel evolution, "
          "two-layer network")
ACTIVATIONS = ("tanh", "relu", "linear", "poly")
"""Supported ``activation`` names; ``"poly"`` is ``φ(z) = z + (ε/2) z²`` (Kumar et al. 2024)."""


class DMFTConvergenceWarning(RuntimeWarning):
    """The DMFT fixed-point iteration stopped before reaching its tolerance."""


# --- activations ---------------------------------------------------------------------------
def _phi_dphi(name: str, epsilon: float):
    import jax.numpy as jnp

    if name == "tanh":
        return jnp.tanh, lambda z: 1.0 - jnp.tanh(z) ** 2
    if name == "relu":
        return (lambda z: jnp.maximum(z, 0.0)), (lambda z: (z > 0).astype(z.dtype))
    if name == "linear":
        return (lambda z: z), (lambda z: jnp.ones_like(z))
    if name == "poly":
        return (lambda z: z + 0.5 * epsilon * z**2), (lambda z: 1.0 + epsilon * z)
    raise ValueError(f"activation {name!r} is not supported; use one of {ACTIVATIONS}")


def initial_kernels(kx: np.ndarray, activation: str = "tanh",
                    epsilon: float = 0.02, n_quadrature: int = 48) -> tuple[np.ndarray, ...]:
    r"""Exact infinite-width initial kernels ``Φ₀``, ``Ġ₀ = ⟨φ'(u)φ'(u')⟩`` and ``K₀``.

    For ``(u, u') ~ N(0, [[a, c], [c, b]])`` with ``a, b, c`` read off ``K^x``:

    * linear: ``Φ₀ = c``, ``Ġ₀ = 1``;
    * ReLU (arc-cosine kernels, Cho & Saul 2009, Eq. 6 with ``n = 1, 0``):
      ``Φ₀ = √(ab)(sin θ + (π − θ) cos θ)/(2π)``, ``Ġ₀ = (π − θ)/(2π)``, ``cos θ = c/√(ab)``;
    * ``φ(z) = z + (ε/2)z²``: ``Φ₀ = c + (ε²/4)(ab + 2c²)``, ``Ġ₀ = 1 + ε² c`` (Isserlis);
    * tanh: 2-D Gauss–Hermite quadrature with ``n_quadrature²`` nodes.

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
        nodes, weights = np.polynomial.hermite_e.hermegauss(n_quadrature)
        weights = weights / weights.sum()
        n = kx.shape[0]
        phi0, gdot0 = np.empty_like(kx), np.empty_like(kx)
        ia = np.where(d > 0, d, 1.0)
        for i in range(n):  # rows: z1 = √a ξ1, z2 = (c/√a) ξ1 + √(b − c²/a) ξ2
            c = kx[i]
            rho = c / ia[i]
            rest = np.sqrt(np.clip(np.diag(kx) - rho**2, 0.0, None))
            z1 = d[i] * nodes[:, None]                                     # (q, 1)
            z2 = rho[None, :, None] * nodes[:, None, None] + rest[None, :, None] * nodes
            t1, t2 = np.tanh(z1), np.tanh(z2)                              # (q,1), (q,n,q)
            w2 = weights[:, None, None] * weights[None, None, :]
            phi0[i] = (w2 * t1[:, :, None] * t2).sum((0, 2))
            gdot0[i] = (w2 * (1 - t1[:, :, None] ** 2) * (1 - t2**2)).sum((0, 2))
        phi0 = 0.5 * (phi0 + phi0.T)
        gdot0 = 0.5 * (gdot0 + gdot0.T)
    else:
        raise ValueError(f"activation {activation!r} is not supported; use one of {ACTIVATIONS}")
    return phi0, gdot0, phi0 + gdot0 * kx


# --- the jax kernels of the solver -----------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _compiled(activation: str, epsilon: float, n_train: int):
    """jit-compiled field pass and prediction pass (cached per activation and P)."""
    import jax
    import jax.numpy as jnp

    phi, dphi = _phi_dphi(activation, epsilon)
    P = n_train

    def kernels(h, a, kx_tr):
        """K̂ between all points and the training points, and Φ̂, Ĝ: (n_all, P)."""
        m = h.shape[0]
        ph = phi(h)
        g = a[:, None] * dphi(h)
        phi_k = ph.T @ ph[:, :P] / m
        g_k = g.T @ g[:, :P] / m
        return phi_k + g_k * kx_tr, phi_k, g_k

    def rhs(h, a, delta, gamma0, kx_tr):
        g_tr = a[:, None] * dphi(h[:, :P])
        dh = (gamma0 / P) * (g_tr * delta[None, :]) @ kx_tr.T
        da = (gamma0 / P) * phi(h[:, :P]) @ delta
        return dh, da

    def heun(h, a, dt, d0, d1, gamma0, kx_tr):
        """One Heun (explicit trapezoid) step of the sampled fields, Δ = d0 → d1."""
        dh1, da1 = rhs(h, a, d0, gamma0, kx_tr)
        dh2, da2 = rhs(h + dt * dh1, a + dt * da1, d1, gamma0, kx_tr)
        return h + 0.5 * dt * (dh1 + dh2), a + 0.5 * dt * (da1 + da2)

    @jax.jit
    def field_pass(h0, a0, deltas, dts, gamma0, kx_tr):
        """Integrate the sampled fields given Δ on the grid (Heun); K̂ on the grid."""
        k0, _, _ = kernels(h0, a0, kx_tr)

        def step(carry, xs):
            dt, d0, d1 = xs
            h, a = heun(*carry, dt, d0, d1, gamma0, kx_tr)
            k, _, _ = kernels(h, a, kx_tr)
            return (h, a), k

        _, ks = jax.lax.scan(step, (h0, a0), (dts, deltas[:-1], deltas[1:]))
        return jnp.concatenate([k0[None], ks], axis=0)

    @jax.jit
    def states_at(h0, a0, deltas, dts, gamma0, kx_tr, keep):
        """Fields at the grid indices flagged in ``keep`` (for two-time kernels)."""
        def step(carry, xs):
            dt, d0, d1 = xs
            h, a = heun(*carry, dt, d0, d1, gamma0, kx_tr)
            return (h, a), (h[:, :P], a)

        _, (hs, as_) = jax.lax.scan(step, (h0, a0), (dts, deltas[:-1], deltas[1:]))
        hs = jnp.concatenate([h0[None, :, :P], hs], axis=0)[keep]
        as_ = jnp.concatenate([a0[None], as_], axis=0)[keep]
        return phi(hs), as_[:, :, None] * dphi(hs)

    @jax.jit
    def prediction_pass(ks, y, dts):
        """``∂_t Δ = −K Δ / P`` (exponential midpoint) and ``∂_t f_test = K_te Δ / P``."""
        def step(carry, xs):
            delta, f_te = carry
            dt, k0, k1 = xs
            km = 0.5 * (k0 + k1)
            ktr = 0.5 * (km[:P] + km[:P].T)
            lam, vec = jnp.linalg.eigh(ktr)
            z = -dt * lam / P
            small = jnp.abs(z) < 1e-12
            phi1 = jnp.where(small, 1.0 + 0.5 * z, jnp.expm1(z) / jnp.where(small, 1.0, z))
            proj = vec.T @ delta
            new_delta = vec @ (jnp.exp(z) * proj)
            f_te = f_te + (km[P:] @ (vec @ (dt * phi1 * proj))) / P
            return (new_delta, f_te), (new_delta, f_te)

        f_te0 = jnp.zeros(ks.shape[1] - P, dtype=y.dtype)
        _, (ds, fs) = jax.lax.scan(step, (y, f_te0), (dts, ks[:-1], ks[1:]))
        return (jnp.concatenate([y[None], ds], axis=0),
                jnp.concatenate([f_te0[None], fs], axis=0))

    return field_pass, prediction_pass, states_at


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
        Initial damping ``β ∈ (0, 1]`` (halved whenever the residual grows), tolerance on the
        residual ``max_t ‖Δ_new − Δ‖/‖y‖``, and the iteration cap.  Not converging raises a
        :class:`DMFTConvergenceWarning` and sets ``converged = 0`` in the attributes.
    two_time : int
        Number of output times (evenly chosen) at which the two-time kernels ``Φ(t, s)`` and
        ``G(t, s)`` on the training points are reported (0: none).
    seed : int
        Seed of the sampled fields.
    device : None, "cpu" or "gpu"
        Where jax runs (None: ``jax.devices()[0]``, the GPU when there is one).

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
        Attributes: ``converged`` (1/0), ``n_iterations``, ``final_residual``, ``device``,
        ``time_convention``.
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
    t_out, tdims, tcoords = time_axis(time)
    if np.any(~np.isfinite(t_out)) or np.any(t_out < 0):
        raise ValueError("time must be finite and non-negative")
    P, D = x.shape
    xa = x if xt is None else np.concatenate([x, xt], axis=0)
    kx = xa @ xa.T / D
    phi0, gdot0, k0 = initial_kernels(kx, activation, epsilon)
    grid, idx = _grid(t_out.ravel(), dt, n_steps)
    dts = np.diff(grid)

    # sampled fields: u ~ N(0, K^x) through a symmetric square root; a(0) ~ N(0, 1)
    rng = np.random.default_rng(seed)
    lam, vec = np.linalg.eigh(kx)
    root = vec * np.sqrt(np.clip(lam, 0.0, None))
    half = (int(n_samples) + 1) // 2   # antithetic pairs (u, a) and (u, −a): terms odd in a
    u = rng.standard_normal((half, kx.shape[0])) @ root.T   # (the O(γ₀) ones) cancel exactly
    u = np.concatenate([u, u])
    a0 = rng.standard_normal(half)
    a0 = np.concatenate([a0, -a0])
    n_samples = 2 * half

    dev = _device(device)
    field_pass, prediction_pass, states_at = _compiled(activation, float(epsilon), P)
    residuals: list[float] = []
    with jax.enable_x64(True), jax.default_device(dev):
        put = functools.partial(jax.device_put, device=dev)
        u_j, a0_j = put(jnp.asarray(u)), put(jnp.asarray(a0))
        kx_tr = put(jnp.asarray(kx[:, :P]))
        dts_j, y_j = put(jnp.asarray(dts)), put(jnp.asarray(y))
        k0_j = put(jnp.asarray(k0[:, :P]))
        g = put(jnp.asarray(float(gamma0)))
        # start from the static-kernel solution
        ks = jnp.broadcast_to(k0_j, (grid.size, *k0_j.shape))
        deltas, _ = prediction_pass(ks, y_j, dts_j)
        beta, converged = float(damping), False
        ynorm = float(np.linalg.norm(y)) or 1.0
        for _ in range(int(max_iter)):
            k_hat = field_pass(u_j, a0_j, deltas, dts_j, g, kx_tr)
            ks = k_hat - k_hat[0][None] + k0_j[None]
            new, f_te = prediction_pass(ks, y_j, dts_j)
            r = float(jnp.max(jnp.linalg.norm(new - deltas, axis=1))) / ynorm
            if residuals and r > residuals[-1]:
                beta = max(beta / 2, 1 / 64)
            residuals.append(r)
            if r < tol:
                deltas = new
                converged = True
                break
            deltas = (1 - beta) * deltas + beta * new
        if not converged:  # the kernels and predictions of the last iterate
            k_hat = field_pass(u_j, a0_j, deltas, dts_j, g, kx_tr)
            ks = k_hat - k_hat[0][None] + k0_j[None]
            deltas, f_te = prediction_pass(ks, y_j, dts_j)
        n_two = min(int(two_time), t_out.size)
        two_idx = (np.unique(idx[np.linspace(0, t_out.size - 1, n_two).round().astype(int)])
                   if n_two > 0 else np.zeros(0, dtype=int))
        if two_idx.size:
            ph, gg = states_at(u_j, a0_j, deltas, dts_j, g, kx_tr, put(jnp.asarray(two_idx)))
            m = float(n_samples)
            phi_two = np.asarray(jnp.einsum("tmp,smq->tspq", ph, ph)) / m
            g_two = np.asarray(jnp.einsum("tmp,smq->tspq", gg, gg)) / m
            # control variate: the sampled kernels at (0, 0) replaced by the exact ones
            phi_two = phi_two - phi_two[0, 0] + phi0[:P, :P] if two_idx[0] == 0 else phi_two
            g_two = g_two - g_two[0, 0] + gdot0[:P, :P] if two_idx[0] == 0 else g_two
        deltas = np.asarray(deltas)
        f_te = np.asarray(f_te)
        ks = np.asarray(ks)
    if not converged:
        warnings.warn(
            f"the DMFT iteration did not converge in {max_iter} iterations (residual "
            f"{residuals[-1]:.3g} > tol {tol:g}); the Dataset says converged = 0. Try a smaller "
            "gamma0 or time range, more iterations, or a smaller damping", DMFTConvergenceWarning,
            stacklevel=2)

    shape = t_out.shape
    delta_out = deltas[idx]                                  # (T, P)
    k_out = ks[idx]                                          # (T, P+Q, P)
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
        f_test = f_te[idx]
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
                  n_samples=int(n_samples), n_grid=int(grid.size), damping=damping, tol=tol,
                  max_iter=max_iter, seed=seed, P=P, D=D,
                  Q=0 if xt is None else int(xt.shape[0]))
    ds = xr.Dataset(data, coords=coords, attrs=theory_attrs(
        SOURCE, params,
        time_convention="t of the flow dθ/dt = −γ₀²N ∂L/∂θ, L = (1/2P)Σ(y−f)²; "
                        "= learning rate × step for GD with per-parameter step γ₀²N·lr",
        device=str(dev)))
    ds.attrs.update(converged=int(converged), n_iterations=len(residuals),
                    final_residual=float(residuals[-1]) if residuals else float("nan"))
    if "time" in ds.coords:
        ds["time"].attrs.update(long_name="training time, learning rate × step", units="1")
    return ds
