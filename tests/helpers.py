"""Helpers shared by tests: tolerances, notebook execution, loading a script as a module."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def load_script(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """The Python file ``path`` (a script under ``scripts/``, ``benchmarks/`` or ``docs/``, or
    a file a test wrote) executed as a module named ``name`` (default: the file's stem)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_rel(actual, expected, rtol: float, what: str = "") -> None:
    """Assert ``|actual - expected| <= rtol·|expected|`` elementwise, with a readable message."""
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    err = np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-300)
    assert np.all(err <= rtol), f"{what}: max relative error {err.max():.3e} > {rtol:.1e}"


def run_notebook(name: str, tmp_path: Path, timeout: int = 600) -> object:
    """Execute ``notebooks/<name>`` at small size (``TRAINDYN_NOTEBOOK_SMALL=1``) in ``tmp_path``.

    Notebooks read that variable in their first cell to pick small sizes; outputs (figures,
    files) land in ``tmp_path``.  Returns the executed notebook.
    """
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ["TRAINDYN_NOTEBOOK_SMALL"] = "1"
    os.environ["TRAINDYN_NOTEBOOK_OUT"] = str(tmp_path)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    km = AsyncKernelManager(kernel_name="python3",
                            client_class="tests._nbkernel.NoHeartbeatKernelClient")
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python process that imports this checkout: the repository
    root prepended to any ``PYTHONPATH`` already set (which may hold carried packages)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **extra}


def start_and_kill(cmd: list[str], parts: Path, at_least: int, env: dict[str, str],
                   limit: float = 120) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``parts`` holds ``at_least`` ``step*.json``
    results (an ``analyze`` run with per-checkpoint parts); fails if it ended first."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(parts.glob("step*.json"))) >= at_least:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
