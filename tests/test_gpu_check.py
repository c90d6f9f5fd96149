"""benchmarks/gpu_check.py: exits 0 without CUDA, and its checks run (on the CPU) here."""

import math

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(ROOT / "benchmarks" / "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_zero(gpu_check, capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA" in capsys.readouterr().out


def test_every_check_runs_on_cpu(gpu_check):
    checks = {**gpu_check.feature_checks(n=300, d=160), **gpu_check.model_checks(n=16)}
    assert any(name.startswith("probe rankme") for name in checks)
    for name, fn in checks.items():
        value = gpu_check._as_array(fn("cpu"))
        assert value.size and not math.isnan(float(value.ravel()[0])), name
    theory = gpu_check.theory_checks(big=False)
    assert gpu_check.HOST_ONLY < set(theory)
    assert gpu_check.theory_grid_size(big=False) == (10**4, 20, 5)
    assert gpu_check.theory_grid_size(big=True) == (10**6, 100, 20)
    for name, fn in theory.items():
        value = gpu_check._theory_array(fn("cpu"))
        assert value.size and np.isfinite(value).any(), name


def test_theory_device_rows_really_use_the_device(gpu_check):
    """A theory row asked for the device runs jax there (not the numpy function twice): on jax's
    CPU it agrees with numpy to 1e-10, and asked for CUDA where jax has no GPU it refuses."""
    checks = gpu_check.theory_checks(big=False)
    fn = checks["theory advani_saxe"]
    ref, dev = fn("cpu"), fn("jax-cpu")
    diff = gpu_check.theory_difference(gpu_check._theory_array(ref), gpu_check._theory_array(dev))
    assert diff <= gpu_check.THEORY_TOL
    assert gpu_check._theory_backend("jax-cpu") == {"backend": "jax", "device": "cpu"}
    assert gpu_check._theory_backend("cpu") == {}
    if gpu_check.jax_gpu() is None:
        with pytest.raises(RuntimeError, match="no GPU"):
            fn("cuda")
    # the difference measure: relative, floor for flushed subnormals, non-finite must match
    a = np.array([1.0, 2.0, np.inf, 1e-310])
    assert gpu_check.theory_difference(a, a * (1 + 1e-12)) == pytest.approx(1e-12, rel=1e-3)
    assert gpu_check.theory_difference(a, np.array([1.0, 2.0, 5.0, 0.0])) == math.inf
    assert gpu_check.theory_difference(a, np.array([1.0, 2.0, np.inf, 0.0])) < 1e-100


@pytest.mark.slow
def test_all_theory_rows_on_jax_cpu_agree_with_numpy(gpu_check):
    rows = gpu_check.theory_rows("jax-cpu", big=False, repeats=1)
    for name, _, t_dev, diff in rows:
        if name in gpu_check.HOST_ONLY:
            assert t_dev is None and diff is None
        else:
            assert diff <= gpu_check.THEORY_TOL, (name, diff)
