"""The jax device path of the theory (``backend="jax"``) against the numpy reference.

Run on jax's CPU device (no GPU needed): every output of the kernel, random-feature, scaling and
Advani–Saxe predictions agrees with numpy to 1e-10 relative on several grids — including a
60 000-mode spectrum, where numpy sums the far tail by a series and jax sums every mode.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from traindyn.theory import _backend  # noqa: E402
from traindyn.theory.kernels import Spectrum, power_law_spectrum, solve_kappa  # noqa: E402

from traindyn import theory  # noqa: E402

TOL = 1e-10


def max_rel(a, b, floor: float = 1e-200) -> float:
    """Max relative difference over all variables; inf/NaN must sit at the same places."""
    worst = 0.0
    for name in a.data_vars:
        x = np.asarray(a[name].values, dtype=float).ravel()
        y = np.asarray(b[name].values, dtype=float).ravel()
        assert np.array_equal(np.isnan(x), np.isnan(y)), name
        assert np.array_equal(np.isinf(x), np.isinf(y)), name
        assert np.array_equal(x[np.isinf(x)], y[np.isinf(y)]), name
        fin = np.isfinite(x)
        if fin.any():
            d = np.abs(x[fin] - y[fin]) / np.maximum(np.abs(x[fin]), floor)
            worst = max(worst, float(d.max()))
    return worst


@pytest.fixture(scope="module")
def spec():
    return power_law_spectrum(2000, a=1.4, b=1.6)


def _both(fn, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(**kw), fn(**kw, backend="jax", device="cpu")


@pytest.mark.parametrize("grid", [
    dict(n=np.geomspace(2, 6000, 12), ridge=[0.0, 1e-9, 1e-3, 1.0], noise_var=0.3),
    dict(n=[1.0, 1999.0, 2000.0, 2001.0, 5e4], ridge=[0.0, 1e-6], noise_var=0.0),
])
def test_krr_on_jax_cpu_equals_numpy(spec, grid):
    ref, dev = _both(theory.krr_learning_curve, eigenvalues=spec, **grid)
    assert max_rel(ref, dev) <= TOL
    # the grid crosses the interpolation threshold n = 2000 (ridgeless): inf on both
    if 2000.0 in grid["n"]:
        assert np.isinf(ref.test_error.sel(n=2000.0, ridge=0.0)) or grid["noise_var"] == 0


def test_krr_with_zero_modes_and_multiplicities(rng):
    lam = np.concatenate([rng.uniform(0.01, 2.0, 1980), np.zeros(20)])  # 2000: as `spec`
    m = rng.integers(1, 5, lam.size).astype(float)
    v2 = rng.uniform(0, 1, lam.size)
    ref, dev = _both(theory.krr_learning_curve, eigenvalues=lam, target_power=v2,
                     multiplicity=m, n=np.geomspace(3, 9000, 12), ridge=[0.0, 1e-2, 1.0, 10.0],
                     noise_var=0.1)
    assert max_rel(ref, dev) <= TOL


def test_krr_large_spectrum_tail_series_vs_exact_sums():
    big = power_law_spectrum(60_000, a=1.2, b=1.4)          # numpy uses the tail series here
    assert big._bounds.size > 0
    ref, dev = _both(theory.krr_learning_curve, eigenvalues=big,
                     n=[10.0, 300.0, 1e4, 1e5], ridge=[0.0, 1e-7], noise_var=0.05)
    assert max_rel(ref, dev) <= TOL


def test_solve_kappa_on_jax_solves_the_equation(spec):
    n = np.array([[5.0, 50.0, 500.0], [1500.0, 1999.0, 2500.0]])
    ridge = np.array([1e-12, 1e-3, 0.5])
    k_np = solve_kappa(spec, n, ridge)
    k_jx = solve_kappa(spec, n, ridge, backend="jax")
    assert k_jx.shape == (2, 3)
    np.testing.assert_allclose(k_jx, k_np, rtol=TOL)
    # independent check: the κ equation Σ λ/(λ+κ) + δ/κ = n, summed directly
    lam = spec.eigenvalues
    lhs = (lam / (lam + k_jx[..., None])).sum(-1) + ridge / k_jx
    np.testing.assert_allclose(lhs, n, rtol=1e-11)


def test_rf_on_jax_cpu_equals_numpy(spec):
    ref, dev = _both(theory.rf_learning_curve, eigenvalues=spec,
                     n=[10.0, 100.0, 1000.0, np.inf], n_features=[20.0, 100.0, 1000.0, np.inf],
                     ridge=[0.0, 1e-4, 1e-1], noise_var=0.2)
    assert max_rel(ref, dev) <= TOL


def test_scaling_regimes_on_jax_cpu(spec):
    kw = dict(n=[100.0, 300.0, 1000.0], n_features=[100.0, 300.0, 1000.0], n_fixed=30.0,
              n_features_fixed=30.0, noise_var=0.1)
    ref, dev = _both(theory.scaling_regimes, eigenvalues=spec, **kw)
    assert max_rel(ref, dev) <= TOL


@pytest.mark.slow
def test_optimal_ridge_on_jax_cpu(spec):
    ref, dev = _both(theory.optimal_ridge, eigenvalues=spec, n=[50.0, 500.0],
                     n_features=[100.0, np.inf], noise_var=0.1)
    assert max_rel(ref, dev) <= TOL


@pytest.mark.parametrize("learning_rate", [None, 0.1])
def test_advani_saxe_on_jax_cpu_equals_numpy(learning_rate):
    t = np.geomspace(0.01, 1e4, 60)
    ref, dev = _both(theory.advani_saxe, time=t, load_ratio=[0.3, 1.0, 2.5], init_var=0.2,
                     learning_rate=learning_rate)
    # e^{-λt} below ~1e-308 is flushed to zero by XLA: the floor ignores those subnormals
    assert max_rel(ref, dev, floor=1e-250) <= TOL


def test_backend_arguments_are_checked(spec):
    with pytest.raises(ValueError, match="backend"):
        theory.krr_learning_curve(spec, n=10, backend="torch")
    with pytest.raises(ValueError, match="device"):
        theory.krr_learning_curve(spec, n=10, backend="numpy", device="cpu")
    with pytest.raises(ValueError, match="device"):
        theory.krr_learning_curve(spec, n=10, device="cpu:7")
    with pytest.raises(TypeError, match="device"):
        theory.advani_saxe([1.0], 2.0, device=3.5)
    assert _backend.resolve(None, None) is None
    assert _backend.resolve(None, "cpu").platform == "cpu"   # a device implies jax


def test_jax_default_precision_is_left_alone(spec):
    """float64 is switched on inside a context only: the process-wide default stays."""
    import jax.numpy as jnp

    before = jax.config.jax_enable_x64
    theory.krr_learning_curve(spec, n=[10.0, 20.0], backend="jax")
    assert jax.config.jax_enable_x64 == before
    if not before:
        assert jnp.ones(2).dtype == jnp.float32


def test_spectrum_object_is_reused_on_device(spec):
    """The padded modes are put on the device once per spectrum and chunk size."""
    theory.krr_learning_curve(spec, n=[10.0, 20.0], backend="jax")
    cached = dict(spec.__dict__["_device_modes"])
    theory.krr_learning_curve(spec, n=[30.0, 40.0], backend="jax")
    assert all(spec.__dict__["_device_modes"][k] is v for k, v in cached.items())
    assert isinstance(spec, Spectrum)


def test_import_theory_is_light():
    """``import theory`` loads neither torch nor sympy; every public name still resolves."""
    code = ("import sys\nfrom traindyn import theory\n"
            "assert 'torch' not in sys.modules, 'torch'\n"
            "assert 'sympy' not in sys.modules, 'sympy'\n"
            "from traindyn.theory import krr_learning_curve, rf_learning_curve, advani_saxe\n"
            "from traindyn.theory import saxe_dynamics, strength_equation\n"
            "assert 'sympy' not in sys.modules, 'sympy after naming deep_linear functions'\n"
            "assert set(theory.__all__) <= set(dir(theory))\n"
            "from theory.deep_linear import s\n"
            "assert 'sympy' in sys.modules and str(s) == 's'\n"
            "assert 'torch' not in sys.modules, 'torch at the end'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
