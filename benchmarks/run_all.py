"""Run every benchmark script in this folder, one after another (``make bench``).

Each script prints its own ratios against a baseline measured in the same run.  The
neural-tangents reference (``ntk_reference.py``) needs its own environment and is skipped
here; ``gpu_check.py`` is meant for a CUDA machine and is run last (it exits 0 without CUDA).
``--smoke`` passes ``--smoke`` to every script (smallest sizes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all.py", "ntk_reference.py", "gpu_check.py"}


def main() -> int:
    smoke = ["--smoke"] if "--smoke" in sys.argv[1:] else []
    scripts = sorted(
        p for p in HERE.glob("*.py") if p.name not in SKIP and not p.name.startswith("_"))
    scripts.append(HERE / "gpu_check.py")
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        if subprocess.run([sys.executable, str(script), *smoke],
                          cwd=HERE.parent).returncode != 0:
            failed.append(script.name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
