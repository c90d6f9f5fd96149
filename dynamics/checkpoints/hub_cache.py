"""Hugging Face Hub cache folders (``models--org--name``) holding several revisions.

``from_pretrained("EleutherAI/pythia-70m", revision="step1000")`` leaves
``models--EleutherAI--pythia-70m/refs/step1000`` (a commit hash) and ``snapshots/<hash>/``
(the files).  The folder is a series: each revision whose snapshot is a model folder is one
checkpoint (format ``"hf"``), its step read from the revision name.  A revision without a step
in its name (``main``) is dropped when a stepped revision names the same snapshot.
"""

from __future__ import annotations

from pathlib import Path

from traindyn.dynamics.checkpoints.base import (
    CheckpointError,
    CheckpointReader,
    parse_step,
    register_reader,
)
from traindyn.dynamics.checkpoints.hf_folder import is_hf_folder


def natural_key(name: str) -> list[object]:
    """Sort key putting ``step2`` before ``step10``."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@register_reader
class HubCacheReader(CheckpointReader):
    """The revisions of one model in a Hub cache folder (``refs/`` → ``snapshots/``)."""

    name = "hub_cache"
    description = "Hugging Face Hub cache folder models--org--name (refs/ -> snapshots/)"
    priority = 30

    def can_open(self, path: Path) -> bool:
        """A folder with ``refs/`` and ``snapshots/``."""
        return path.is_dir() and (path / "refs").is_dir() and (path / "snapshots").is_dir()

    def series(self, path: Path) -> list[tuple[Path, str]]:
        """``(snapshot folder, revision name)`` in natural order of the revision names."""
        refs, snapshots = path / "refs", path / "snapshots"
        found: dict[Path, list[str]] = {}
        for ref in sorted(p for p in refs.rglob("*") if p.is_file()):
            folder = snapshots / ref.read_text().strip()
            if is_hf_folder(folder):
                found.setdefault(folder, []).append(ref.relative_to(refs).as_posix())
        pairs = []
        for folder, names in found.items():
            stepped = [n for n in names if parse_step(n) is not None]
            pairs += [(folder, n) for n in (stepped or names)]
        return sorted(pairs, key=lambda pair: natural_key(pair[1]))

    def read(self, path: Path) -> dict:
        """A cache folder is a series, not one state dict."""
        raise CheckpointError(f"{path.name} is a Hub cache folder holding several revisions: "
                              f"find_checkpoints({str(path)!r}) lists them")
