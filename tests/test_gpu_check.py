"""benchmarks/gpu_check.py: exits 0 without CUDA, and its checks run (on the CPU) here."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_zero(gpu_check, capsys):
    assert gpu_check.main() == 0
    assert "no CUDA" in capsys.readouterr().out


def test_every_check_runs_on_cpu(gpu_check):
    checks = {**gpu_check.feature_checks(n=300, d=160), **gpu_check.model_checks(n=16),
              **gpu_check.theory_checks()}
    assert any(name.startswith("probe rankme") for name in checks)
    for name, fn in checks.items():
        value = gpu_check._as_array(fn("cpu"))
        assert value.size and not math.isnan(float(value.ravel()[0])), name
