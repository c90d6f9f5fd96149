"""theory.dmft at research scale: the tanh initial kernels against scipy quadrature at
pre-activation scale up to |h| = 30, chunked fields and in-scan two-time states against an
independent numpy integration that keeps every state, the time-step error estimate against the
error measured with a finer grid, compilation reuse across a sweep, and the device argument."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import integrate

pytest.importorskip("jax")

from traindyn.dynamics.recipes.two_layer import two_layer_task  # noqa: E402
from traindyn.theory import dmft  # noqa: E402
from traindyn.theory.dmft import DMFTStepWarning, dmft_two_layer, initial_kernels  # noqa: E402


# --- tanh K0: scipy.integrate.quad, conditional on the first variable ------------------------
def _quad_reference(a: float, b: float, c: float) -> tuple[float, float]:
    """⟨φ(u)φ(v)⟩ for φ = tanh and φ = sech² by nested adaptive quadrature: u = √a ξ, v | u ~
    N((c/a) u, b − c²/a), each integral split where its argument changes sign."""
    s = np.sqrt(max(b - c * c / a, 0.0))
    kappa = c / a
    gauss = 1.0 / np.sqrt(2 * np.pi)

    def inner(mu: float, f) -> float:
        if s < 1e-12:
            return f(mu)
        xi0 = float(np.clip(-mu / s, -12, 12))
        return integrate.quad(lambda z: f(mu + s * z) * np.exp(-0.5 * z * z) * gauss, -12, 12,
                              points=[xi0], limit=400, epsabs=1e-14, epsrel=1e-12)[0]

    out = []
    for f in (np.tanh, lambda z: 1.0 / np.cosh(z) ** 2):
        def outer(xi, f=f):
            u = np.sqrt(a) * xi
            return f(u) * inner(kappa * u, f) * np.exp(-0.5 * xi * xi) * gauss
        out.append(integrate.quad(outer, -12, 12, points=[0.0], limit=400, epsabs=1e-14,
                                  epsrel=1e-12)[0])
    return out[0], out[1]


@pytest.mark.parametrize("a, b, c", [
    (900.0, 900.0, 450.0),     # |h| ~ 30 on both points
    (900.0, 1.0, 20.0),        # one large, one unit-scale point
    (9.0, 9.0, 8.9),           # raw-pixel scale, strongly correlated (|x|²/D ≈ 9)
    (100.0, 400.0, -199.9),    # anti-correlated, nearly degenerate
    (0.04, 900.0, 3.0),        # tiny and large
])
def test_tanh_initial_kernels_match_scipy_quad_at_large_scale(a, b, c):
    phi0, gdot0, k0 = initial_kernels(np.array([[a, c], [c, b]]), "tanh")
    ref_phi, ref_g = _quad_reference(a, b, c)
    assert abs(phi0[0, 1] - ref_phi) < 1e-9, (phi0[0, 1], ref_phi)
    assert abs(gdot0[0, 1] - ref_g) < 1e-9 * max(1.0, ref_g), (gdot0[0, 1], ref_g)
    np.testing.assert_allclose(k0, phi0 + gdot0 * np.array([[a, c], [c, b]]), rtol=1e-14)


def test_tanh_diagonal_matches_one_dimensional_quad():
    """Diagonal entries ⟨tanh²(u)⟩, ⟨sech⁴(u)⟩ at variances 1e-4 … 900 against 1-D quad, and the
    48-node Gauss–Hermite rule is visibly wrong at the large ones (the test can tell)."""
    var = np.array([1e-4, 0.5, 9.0, 100.0, 900.0])
    phi0, gdot0, _ = initial_kernels(np.diag(var), "tanh")
    nodes, weights = np.polynomial.hermite_e.hermegauss(48)
    weights = weights / weights.sum()
    for i, v in enumerate(var):
        def mean(f, v=v):
            return integrate.quad(lambda z: f(np.sqrt(v) * z) * np.exp(-z * z / 2)
                                  / np.sqrt(2 * np.pi), -12, 12, points=[0.0], limit=400,
                                  epsabs=1e-15, epsrel=1e-13)[0]
        ref_p = mean(lambda z: np.tanh(z) ** 2)
        ref_g = mean(lambda z: np.cosh(z) ** -4)
        assert abs(phi0[i, i] - ref_p) < 1e-10 and abs(gdot0[i, i] - ref_g) < 1e-10 * max(
            1, ref_g), (v, phi0[i, i], ref_p, gdot0[i, i], ref_g)
        if v >= 100:
            gh = weights @ np.cosh(np.sqrt(v) * nodes) ** -4
            assert abs(gh - ref_g) > 0.1 * ref_g


# --- the solver's passes against an independent numpy integration ----------------------------
def _numpy_pass(x, xt, y, t_grid, gamma0, n_samples, seed, keep):
    """One pass driven by the static-kernel error Δ⁰(t) = e^{−K₀t/P} y, in plain numpy: every
    field state kept, then the kept ones selected; kernels with the control variate; the new
    error by the exponential midpoint rule."""
    P, D = x.shape
    xa = np.concatenate([x, xt])
    kx = xa @ xa.T / D
    phi0, gdot0, k0 = initial_kernels(kx, "tanh")
    u, a = dmft._fields(kx, n_samples, seed)
    lam, vec = np.linalg.eigh(k0[:P, :P])
    d_old = np.stack([vec @ (np.exp(-lam * t / P) * (vec.T @ y)) for t in t_grid])
    kx_tr = kx[:, :P]

    def rhs(h, a, d):
        g = a[:, None] * (1 - np.tanh(h[:, :P]) ** 2)
        return gamma0 / P * (g * d) @ kx_tr.T, gamma0 / P * np.tanh(h[:, :P]) @ d

    states = [(u, a)]
    h = u
    for n, dt in enumerate(np.diff(t_grid)):
        dh1, da1 = rhs(h, a, d_old[n])
        dh2, da2 = rhs(h + dt * dh1, a + dt * da1, d_old[n + 1])
        h, a = h + 0.5 * dt * (dh1 + dh2), a + 0.5 * dt * (da1 + da2)
        states.append((h, a))

    def khat(h, a):
        ph, g = np.tanh(h), a[:, None] * (1 - np.tanh(h) ** 2)
        return (ph.T @ ph[:, :P] + (g.T @ g[:, :P]) * kx_tr) / len(a)

    ks = np.stack([khat(*s) for s in states])
    ks = ks - ks[0] + k0[:, :P]
    d = y.copy()
    d_new = [d]
    for n, dt in enumerate(np.diff(t_grid)):
        km = 0.5 * (ks[n] + ks[n + 1])
        lam, vec = np.linalg.eigh(0.5 * (km[:P] + km[:P].T))
        d = vec @ (np.exp(-dt * lam / P) * (vec.T @ d))
        d_new.append(d)
    sel = [states[i] for i in keep]
    ph = np.stack([np.tanh(h[:, :P]) for h, _ in sel])
    gg = np.stack([a[:, None] * (1 - np.tanh(h[:, :P]) ** 2) for h, a in sel])
    phi_two = np.einsum("tmp,smq->tspq", ph, ph) / n_samples
    g_two = np.einsum("tmp,smq->tspq", gg, gg) / n_samples
    phi_two = phi_two - phi_two[0, 0] + phi0[:P, :P]
    g_two = g_two - g_two[0, 0] + gdot0[:P, :P]
    return np.stack(d_new), ks, phi_two, g_two


@pytest.mark.parametrize("chunk", [None, 64])
def test_one_pass_and_in_scan_two_time_states_match_numpy(chunk):
    """tol = 1 stops after the first pass, whose driving error is the static-kernel one: every
    output (predictions, kernels at the output times, the two-time kernels collected inside
    the scan, with fields in one chunk or in chunks of 64) equals a numpy integration that
    keeps all states and selects afterwards, to round-off."""
    x, y, xt, yt = two_layer_task(10, 5, 6, "he2", 2)
    t = np.linspace(0, 6, 7)
    ds = dmft_two_layer(x, y, t, 1.3, xt, yt, n_samples=256, n_steps=24, tol=1.0, two_time=4,
                        chunk_size=chunk, step_tol=None, seed=3)
    assert ds.attrs["n_iterations"] == 1
    grid = np.linspace(0, 6, 25)
    keep = np.searchsorted(grid, ds.time1.values)
    d_new, ks, phi_two, g_two = _numpy_pass(x, xt, y, grid, 1.3, 256, 3, keep)
    out = np.searchsorted(grid, t)
    np.testing.assert_allclose(ds.train_prediction.values, y - d_new[out], atol=1e-12)
    k_out = ks[out]
    np.testing.assert_allclose(ds.ntk.values, 0.5 * (k_out[:, :10] + k_out[:, :10].transpose(
        0, 2, 1)), atol=1e-12)
    np.testing.assert_allclose(ds.ntk_test.values, k_out[:, 10:], atol=1e-12)
    np.testing.assert_allclose(ds.phi_kernel.values, phi_two, atol=1e-12)
    np.testing.assert_allclose(ds.g_kernel.values, g_two, atol=1e-12)


@pytest.mark.slow
def test_chunked_equals_unchunked_at_convergence():
    """Through the whole iteration (the one-pass test above covers chunks in the default
    suite)."""
    x, y, xt, yt = two_layer_task(12, 6, 6, "he2", 0)
    t = np.linspace(0, 10, 6)
    kw = dict(n_samples=512, n_steps=40, two_time=3)
    one = dmft_two_layer(x, y, t, 1.0, xt, yt, chunk_size=512, **kw)
    many = dmft_two_layer(x, y, t, 1.0, xt, yt, chunk_size=96, **kw)
    assert one.attrs["chunk_size"] == 512 and many.attrs["chunk_size"] == 96
    assert one.attrs["converged"] == many.attrs["converged"] == 1
    assert one.attrs["n_iterations"] == many.attrs["n_iterations"]
    for name in ("train_prediction", "test_prediction", "ntk", "ntk_test", "phi_kernel",
                 "g_kernel"):
        np.testing.assert_allclose(one[name].values, many[name].values, atol=1e-11, rtol=0,
                                   err_msg=name)


# --- time-step error control ------------------------------------------------------------------
def test_step_error_estimate_tracks_the_measured_error_and_warns():
    """Richardson estimate at a coarse grid against the error measured from a 16× finer grid
    (same fields, so the difference is discretisation only): within a factor 2, and a warning
    above step_tol; at the fine grid the estimate is small and no warning is raised."""
    x, y, _, _ = two_layer_task(12, 0, 6, "he2", 0)
    t = np.linspace(0, 60, 4)
    kw = dict(n_samples=256, two_time=0)
    with pytest.warns(DMFTStepWarning, match="time-step error"):
        coarse = dmft_two_layer(x, y, t, 1.0, n_steps=12, step_tol=1e-4, **kw)
    fine = dmft_two_layer(x, y, t, 1.0, n_steps=192, step_tol=None, **kw)
    measured = float(np.linalg.norm(coarse.train_prediction.values - fine.train_prediction.values,
                                    axis=1).max() / np.linalg.norm(y))
    est = coarse.attrs["step_error"]
    assert 0.5 < est / measured < 2.0, (est, measured)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DMFTStepWarning)
        ok = dmft_two_layer(x, y, t, 1.0, n_steps=96, **kw)
    assert ok.attrs["step_error"] < est / 10


# --- compile once per bucket ------------------------------------------------------------------
def test_sweep_in_one_bucket_does_not_recompile(tmp_path):
    """P = 33 and 35 share the padded size 36, n_steps 49 and 51 the padded grid 52: after the
    first solve the others compile nothing; the persistent cache folder fills."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    try:
        counts = []
        for p, steps in ((33, 49), (35, 51), (34, 50)):
            x, y, _, _ = two_layer_task(p, 0, 5, "he2", 1)
            ds = dmft_two_layer(x, y, [0.0, 4.0], 0.7, n_samples=128, n_steps=steps,
                                cache_dir=str(tmp_path))
            counts.append(ds.attrs["n_compilations"])
        assert counts[0] >= 1 and counts[1:] == [0, 0], counts
        assert any(tmp_path.iterdir())
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_gpu_without_a_gpu_fails_clearly():
    import jax

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        pytest.skip("this machine has a GPU")
    x, y, _, _ = two_layer_task(6, 0, 4, "he2", 0)
    with pytest.raises(ValueError, match="no GPU"):
        dmft_two_layer(x, y, [0.0, 1.0], 0.5, n_samples=16, device="gpu")


@pytest.mark.slow
def test_warm_start_reaches_the_same_fixed_point():
    """Iterating first on an eighth of the fields (same draws) and then on all of them ends at
    the fixed point of the full set: equal to the cold start within the iteration tolerance.
    Plain iteration (``mixing="damped"``) saves a full pass here (8 vs 9); with Anderson mixing
    both take 8 full passes, so the pass count is checked with damping."""
    x, y, xt, yt = two_layer_task(8, 4, 5, "he2", 4)
    t = np.linspace(0, 30, 4)
    kw = dict(n_samples=16384, n_steps=24, two_time=2, tol=1e-9, step_tol=None,
              mixing="damped")
    warm = dmft_two_layer(x, y, t, 1.5, xt, yt, warm_start=True, **kw)
    cold = dmft_two_layer(x, y, t, 1.5, xt, yt, warm_start=False, **kw)
    assert warm.attrs["n_warm_iterations"] >= 1 and cold.attrs["n_warm_iterations"] == 0
    assert warm.attrs["converged"] == cold.attrs["converged"] == 1
    assert warm.attrs["n_iterations"] < cold.attrs["n_iterations"], (
        warm.attrs["n_iterations"], cold.attrs["n_iterations"])
    for name in ("train_prediction", "test_prediction", "ntk", "phi_kernel"):
        np.testing.assert_allclose(warm[name].values, cold[name].values, atol=1e-7,
                                   err_msg=name)


def test_step_warning_is_exported_from_the_theory_package():
    from traindyn import theory

    assert theory.DMFTStepWarning is DMFTStepWarning
    assert "DMFTStepWarning" in theory.__all__ and issubclass(DMFTStepWarning, RuntimeWarning)
