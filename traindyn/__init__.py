"""traindyn: the geometry of what networks learn, measured and predicted.

Three subpackages, each imported on first access so that ``import traindyn.theory`` loads
no torch:

``traindyn.theory``
    closed-form, kernel, random-feature and DMFT predictions (numpy / scipy / jax).
``traindyn.probes``
    geometry metrics of representations, weights and kernels, and the hooks that feed them.
``traindyn.dynamics``
    training-time monitors, checkpoint analysis, recipes, sweeps, storage, plots, CLI.

The three live in the top-level folders ``theory/``, ``probes/`` and ``dynamics/`` of the
source tree and install under this package (``pyproject.toml`` maps them), so files of a
user's named ``probes.py`` or ``dynamics.py`` never shadow them.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["dynamics", "probes", "theory", "__version__"]

_SUBPACKAGES = ("dynamics", "probes", "theory")


def _source_tree() -> Path | None:
    """The source checkout this file sits in, when it is imported from one (not installed)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not all((root / name / "__init__.py").is_file() for name in _SUBPACKAGES):
        return None
    try:
        if 'name = "traindyn"' not in pyproject.read_text(encoding="utf-8"):
            return None
    except OSError:
        return None
    return root


# Imported from a source checkout (the repository root on sys.path, no install or an install
# elsewhere): the subpackages are the sibling folders, as the package-dir mapping installs them.
_ROOT = _source_tree()
if _ROOT is not None and str(_ROOT) not in __path__:
    __path__.append(str(_ROOT))

try:
    __version__ = metadata.version("traindyn")
except metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'traindyn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
