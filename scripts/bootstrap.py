#!/usr/bin/env python3
"""Set up traindyn's virtual environment: idempotent, quick when already done.

Policy (documented in README.md):

* The environment is ``.venv`` (or ``$VENV``), created with ``--system-site-packages`` from
  the interpreter that runs this script, so a torch already installed for that interpreter
  (a GPU user's CUDA build, say) is seen and kept.
* torch is installed only when none is importable.  With an NVIDIA GPU present, pip's
  default build is right.  Without one, a CPU build is installed: ``torch==$TORCH_VERSION``
  (default 2.13.0) when pip resolves it to a ``+cpu`` build or a local file, otherwise the
  same version from the PyTorch CPU index.  A multi-GB CUDA build is never downloaded onto a
  machine without a GPU.
* Then the package itself is installed in editable mode with the extras the tests need.
  A stamp file keyed on ``pyproject.toml`` makes a second run a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_module(python: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", code]).returncode == 0


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_torch(python: Path, spec: str) -> dict | None:
    """What pip would install for ``spec`` (a dry run: nothing is downloaded but metadata)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "--dry-run", "--no-deps", "-q",
             "--report", str(report), spec],
            capture_output=True, text=True,
        )
        if proc.returncode != 0 or not report.exists():
            return None
        for item in json.loads(report.read_text())["install"]:
            if item["metadata"]["name"].lower() == "torch":
                return item
    return None


def ensure_torch(python: Path) -> None:
    if has_module(python, "torch"):
        print("torch already installed: keeping it.")
        return
    if has_nvidia_gpu():
        run([str(python), "-m", "pip", "install", "torch"])
        return
    version = os.environ.get("TORCH_VERSION", "2.13.0")
    spec = f"torch=={version}"
    item = resolve_torch(python, spec)
    is_cpu = item is not None and (
        "+cpu" in item["metadata"]["version"] or item["download_info"]["url"].startswith("file:")
    )
    if is_cpu:
        run([str(python), "-m", "pip", "install", spec])
    else:
        print(f"No GPU and no CPU build of {spec} found locally: using the PyTorch CPU index.")
        run([str(python), "-m", "pip", "install", spec, "--index-url", CPU_INDEX])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=os.environ.get("VENV", ".venv"))
    parser.add_argument("--extras", default="hf,models,dist,lightning,dev")
    args = parser.parse_args()

    venv = (ROOT / args.venv).resolve()
    python = venv_python(venv)
    stamp = venv / ".traindyn-installed"
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + args.extras.encode() + sys.version.encode()
    ).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == key:
        stamp.touch()  # newer than pyproject.toml, so make does not ask again
        return 0
    if not python.exists():
        run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    ensure_torch(python)
    target = f"{ROOT}[{args.extras}]" if args.extras else str(ROOT)
    run([str(python), "-m", "pip", "install", "-q", "-e", target])
    stamp.write_text(key)
    print(f"traindyn environment ready: {venv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
