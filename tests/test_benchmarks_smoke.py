"""Every script in benchmarks/ runs at its smallest size (``--smoke``), so a benchmark broken by a
change fails the suite.  Scripts are found by globbing ``benchmarks/*.py`` (a new script joins
automatically); they run as parallel subprocesses, and each must exit 0 within its budget.

Costs (CPU seconds of each smoke run, measured on the 2-core machine): eigvalsh_crossover 1.6,
gpu_check 1.5, spectral 1.7, theory_cost, theory_device and ntk_reference about as much — these
run in the default suite (under 10 s together); analyze 4.6, import_time 5.2, invariance 5.8,
ntk 5.7, similarity 12.3, dmft_speed 12, dmft 28, monitor_overhead 42.5 are marked slow
(``HEAVY``), ~117 s together.  A script not listed runs in the default suite: list it in
``HEAVY`` if its smoke run costs more than a few seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

SKIP = {
    "run_all.py": "runs every other script in sequence (`run_all.py --smoke` forwards the flag); "
                  "each of them is smoked here on its own",
}
HEAVY = {"analyze.py", "dmft.py", "dmft_speed.py", "import_time.py", "invariance.py",
         "monitor_overhead.py", "ntk.py", "similarity.py"}
"""Scripts whose smoke run costs more than ~5 s of CPU (torch/jax start-up, model builds,
compilations): marked slow."""
TIMEOUT = 600


def scripts() -> list[Path]:
    return sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def run_smoke(script: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _params() -> list:
    out = []
    for path in scripts():
        marks = []
        if path.name in SKIP:
            marks.append(pytest.mark.skip(reason=SKIP[path.name]))
        elif path.name in HEAVY:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(path, id=path.name, marks=marks))
    return out


@pytest.fixture(scope="module")
def results(request) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """The selected scripts' smoke runs, two at a time (the machine has 2 cores).  Under
    pytest-xdist each test runs its own script instead (the workers are the parallelism)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return {}
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.originalname == "test_benchmark_smoke_run"
                and not item.get_closest_marker("skip")]

    def one(path: Path):
        t0 = time.perf_counter()
        proc = run_smoke(path)
        return path.name, (proc, time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, selected))


@pytest.mark.parametrize("script", _params())
def test_benchmark_smoke_run(script, results):
    if script.name not in results:
        t0 = time.perf_counter()
        results[script.name] = (run_smoke(script), time.perf_counter() - t0)
    proc, seconds = results[script.name]
    assert proc.returncode == 0, (
        f"{script.name} --smoke exited {proc.returncode} after {seconds:.1f} s\n"
        f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}")
    assert proc.stdout.strip(), f"{script.name} --smoke printed nothing"


def test_every_script_takes_the_smoke_flag():
    """Cheap static check over all scripts (skipped ones included): each parses ``--smoke``."""
    missing = [p.name for p in scripts() if "--smoke" not in p.read_text()]
    assert not missing, f"benchmark scripts without --smoke: {missing}"


def test_a_broken_benchmark_fails_the_smoke_run(tmp_path):
    """The harness catches a script that crashes at its smallest size."""
    broken = tmp_path / "broken.py"
    broken.write_text("import argparse\nargparse.ArgumentParser().add_argument('--smoke')\n"
                      "raise ValueError('tol must be > 0')\n")
    proc = run_smoke(broken, timeout=60)
    assert proc.returncode != 0 and "tol must be" in proc.stderr
