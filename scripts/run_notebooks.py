"""Execute notebooks at full size and save them with their outputs (``make notebooks``).

::

    python scripts/run_notebooks.py notebooks/*.ipynb          # all, in place
    python scripts/run_notebooks.py --check notebooks/*.ipynb  # which are stale (exit 1)

Each notebook runs in a fresh ``python3`` kernel (nbclient) from its own folder, with
``TRAINDYN_NOTEBOOK_OUT`` pointing to ``runs/notebooks/<name>/`` (the files a notebook writes
land there, not beside the notebook).  Figures are kept as PNG at ``--dpi`` (80 by default:
readable on GitHub, small in the repository).  After a successful run the notebook is written
back with its outputs and, in its metadata, the SHA-256 of its code cells::

    "metadata": {"traindyn": {"code_sha256": "…", "size": "full"}}

so that a test (``tests/test_notebook_outputs.py``) can tell when a committed notebook's code
differs from the code its outputs came from.  A notebook that fails is left untouched and the
script exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METADATA_KEY = "traindyn"


def code_hash(nb: Any) -> str:
    """SHA-256 of a notebook's code cells, in order: each cell's source (line endings
    normalised to ``\\n``, trailing whitespace of the cell dropped) followed by a NUL byte.
    Markdown cells, outputs and metadata do not count."""
    digest = hashlib.sha256()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = cell["source"]
        if isinstance(source, list):
            source = "".join(source)
        digest.update(source.replace("\r\n", "\n").rstrip().encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def recorded_hash(nb: Any) -> str | None:
    """The code hash saved in the notebook's metadata by :func:`execute`, or ``None``."""
    return (nb.get("metadata", {}).get(METADATA_KEY) or {}).get("code_sha256")


def is_stale(nb: Any) -> bool:
    """Whether the notebook's code cells differ from those its saved outputs came from (a
    notebook never executed by this script counts as stale)."""
    return recorded_hash(nb) != code_hash(nb)


def has_outputs(nb: Any) -> bool:
    return any(cell.get("outputs") for cell in nb["cells"] if cell["cell_type"] == "code")


def image_outputs(nb: Any) -> int:
    """Number of ``image/png`` outputs in the notebook."""
    return sum("image/png" in out.get("data", {}) for cell in nb["cells"]
               if cell["cell_type"] == "code" for out in cell.get("outputs", []))


_SETUP = ('%matplotlib inline\n'
          '%config InlineBackend.figure_formats = ["png"]\n'
          '%config InlineBackend.rc = {{"figure.dpi": {dpi}}}\n')


def execute(path: str | Path, out_dir: str | Path | None = None, timeout: int = 3600,
            small: bool = False, dpi: int = 80, write: bool = True,
            client_class: str | None = None) -> Any:
    """Execute the notebook at ``path`` and (if ``write``) save it in place with its outputs
    and code hash.  ``small`` sets ``TRAINDYN_NOTEBOOK_SMALL=1`` (the tests' sizes; the
    metadata then says ``"size": "small"``).  ``client_class`` is an import path of a
    jupyter_client kernel client class (default: jupyter_client's).  Returns the executed
    notebook."""
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    out_dir = Path(out_dir) if out_dir is not None else ROOT / "runs" / "notebooks" / path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"MPLBACKEND": None,   # no backend forced from outside: ipykernel's, as in Jupyter
           "TRAINDYN_NOTEBOOK_OUT": str(out_dir),
           "TRAINDYN_NOTEBOOK_SMALL": "1" if small else "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get(
               "PYTHONPATH")])])}
    saved = {k: os.environ.get(k) for k in env}
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # the inline backend's figure format and resolution, in a cell that is not saved
    setup = nbformat.v4.new_code_cell(_SETUP.format(dpi=int(dpi)))
    nb.cells.insert(0, setup)
    try:
        km = AsyncKernelManager(kernel_name="python3", **(
            {"client_class": client_class} if client_class else {}))
        client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        nb.cells.remove(setup)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    nb.metadata[METADATA_KEY] = {"code_sha256": code_hash(nb),
                                 "size": "small" if small else "full"}
    if write:
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", help="the .ipynb files")
    parser.add_argument("--check", action="store_true",
                        help="only list stale notebooks (code changed since their outputs)")
    parser.add_argument("--small", action="store_true",
                        help="the tests' small sizes (TRAINDYN_NOTEBOOK_SMALL=1)")
    parser.add_argument("--dpi", type=int, default=80, help="inline PNG resolution")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    import nbformat

    if args.check:
        stale = [p for p in args.notebooks if is_stale(nbformat.read(p, as_version=4))]
        for p in stale:
            print(f"stale: {p}")
        return 1 if stale else 0
    failed = []
    for p in args.notebooks:
        start = time.perf_counter()
        try:
            nb = execute(p, timeout=args.timeout, small=args.small, dpi=args.dpi)
        except Exception as err:  # noqa: BLE001 - report every failing notebook, go on
            failed.append(p)
            print(f"FAILED {p}: {type(err).__name__}: {str(err)[-2000:]}", file=sys.stderr)
            continue
        size = Path(p).stat().st_size / 1e6
        print(f"{p}: {image_outputs(nb)} figures, {size:.2f} MB, "
              f"{time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
