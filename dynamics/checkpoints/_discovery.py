"""Finding the checkpoints of a run and ordering them by step (the readers recognise them)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from traindyn.dynamics.checkpoints.base import (
    READERS,
    STATE_DICT_SUFFIXES,
    Checkpoint,
    CheckpointReader,
    describe,
    guess_reader,
    parse_step,
)
from traindyn.dynamics.checkpoints.hub_cache import natural_key


def _candidates(root: Path) -> list[Path]:
    """The checkpoints inside a folder, or the folder itself when it is one checkpoint."""
    children = [p for p in root.iterdir() if guess_reader(p)]
    trainer_children = [p for p in children if p.is_dir() and p.name.startswith("checkpoint-")]
    if guess_reader(root):
        # a Trainer output_dir holds the final model and its checkpoint-*/ folders: the series
        # is the checkpoints; any other model folder is a series of one
        return sorted(trainer_children, key=lambda p: natural_key(p.name)) or [root]
    if not children:
        formats = "; ".join(r.description for r in READERS.values())
        raise FileNotFoundError(
            f"no checkpoints in {root}: expected *.safetensors, "
            f"{', '.join('*' + s for s in STATE_DICT_SUFFIXES)} files, Hugging Face model "
            f"folders (config.json + weights) or Trainer checkpoint-*/ folders (formats: "
            f"{formats})")
    return sorted(children, key=lambda p: natural_key(p.name))


def _resolve_step(path: Path, reader: CheckpointReader, explicit: int | None, force: bool,
                  lone: bool, name: str | None = None) -> tuple[int | None, str]:
    """The step of one checkpoint and where it came from; contradictions are ValueErrors."""
    if explicit is None:
        step, source = reader.step(path, name)
        if step is None and lone:
            return 0, "default"
        return step, source
    if not force:
        label = f"revision {name}" if name else describe(path)
        recorded, _, wording = reader.recorded_step(path)
        for other, what in ((parse_step(name or path.name), "its name says step"),
                            (recorded, wording)):
            if other is not None and other != explicit:
                raise ValueError(
                    f"the explicit step {explicit} for {label} contradicts the "
                    f"checkpoint: {what} {other}. Steps pair with the checkpoints in the "
                    f"order given; pass force_steps=True (--force-steps) to use {explicit} "
                    f"anyway")
    return explicit, "explicit"


def find_checkpoints(
    source: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str | os.PathLike,
                                                                      int | None],
    steps: Sequence[int | None] | None = None,
    *,
    force_steps: bool = False,
) -> list[Checkpoint]:
    """The checkpoints of a run, ordered by step.

    Parameters
    ----------
    source : path, sequence of paths, or mapping of path to step
        A folder of weight files, Hugging Face model folders, Trainer ``checkpoint-*/`` folders
        or Lightning ``.ckpt`` files; a Trainer ``output_dir`` (its ``checkpoint-*/`` folders);
        a single checkpoint (a series of one); an explicit list of files and folders (a
        revision series of one model: ``step1000/``, ``revision-step2000/``, ``main/``); or a
        mapping ``{path: step}`` (``None``: read the step from the checkpoint); or a Hugging
        Face Hub cache folder ``models--org--name`` holding several revisions (``refs/step1000``
        → ``snapshots/<hash>/``, the step read from the revision name).  Each checkpoint's
        format is the first registered reader (:data:`READERS`) that can open it.
    steps : sequence of int or None, optional
        Explicit steps, one per checkpoint.  For a list of paths they pair with the paths **in
        the order given**; for a folder, with its checkpoints in natural name order (``step2``
        before ``step10``).  ``None`` entries read that checkpoint's step as without ``steps``.
    force_steps : bool
        Use explicit steps even where they contradict a step in the checkpoint's name,
        ``trainer_state.json`` or Lightning record (otherwise a ValueError naming both).

    A Lightning ``last.ckpt`` (step from its ``global_step``) that repeats the step of a
    checkpoint named with that step is the same save and is left out.

    Returns
    -------
    list of Checkpoint
        Sorted by step; each records its ``format`` and ``step_source``.

    Raises
    ------
    FileNotFoundError
        No checkpoints were found.
    ValueError
        A step cannot be read (pass ``steps``); an explicit step contradicts the checkpoint
        (without ``force_steps``); a name contradicts ``trainer_state.json`` or Lightning's
        ``global_step``; two checkpoints share a step; or ``steps`` has the wrong length.
    """
    names: list[str | None] = []
    if isinstance(source, Mapping):
        if steps is not None:
            raise ValueError("steps: give either a mapping {path: step} or steps, not both")
        steps = list(source.values())
        paths = [Path(p) for p in source]
    elif isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"no checkpoint file or folder at {root}")
        series_reader = guess_reader(root, series=True) if root.is_dir() else None
        if series_reader is not None:
            members = series_reader.series(root) or []
            if not members:
                raise FileNotFoundError(f"no revision in the {series_reader.description} "
                                        f"{root} holds a checkpoint")
            paths = [folder for folder, _ in members]
            names = [name for _, name in members]
        else:
            paths = _candidates(root) if root.is_dir() else [root]
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise FileNotFoundError("the list of checkpoints is empty")
    found: list[tuple[Path, CheckpointReader]] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        reader = guess_reader(path)
        if reader is None:
            raise ValueError(f"{path} is not a checkpoint (weights file, Hugging Face model "
                             f"folder or Trainer checkpoint folder)")
        found.append((path, reader))
    if steps is None:
        explicit: list[int | None] = [None] * len(found)
    else:
        explicit = [None if s is None else int(s) for s in steps]
        if len(explicit) != len(found):
            raise ValueError(f"{len(explicit)} steps were given for {len(found)} checkpoints "
                             f"({', '.join(describe(p) for p, _ in found[:6])} …)")
    names = names or [None] * len(found)
    series, missing = [], []
    for (path, reader), given, name in zip(found, explicit, names, strict=True):
        step, where = _resolve_step(path, reader, given, force_steps, lone=len(found) == 1,
                                    name=name)
        if step is None:
            missing.append(f"revision {name}" if name else describe(path))
        else:
            series.append(Checkpoint(path, step, reader.name, where))
    if missing:
        raise ValueError(
            f"cannot read a step from {', '.join(missing[:5])}: name checkpoints like "
            f"step1000 / checkpoint-1000 / ckpt_000100, or pass the steps explicitly")
    by_step: dict[int, Checkpoint] = {}
    for ckpt in series:
        other = by_step.get(ckpt.step)
        if other is None:
            by_step[ckpt.step] = ckpt
            continue
        # Lightning's save_last writes last.ckpt beside epoch=…-step=N.ckpt of the same step:
        # a name without a step whose step came from the file's own record is that copy
        unnamed = [c for c in (other, ckpt) if c.step_source in ("lightning", "trainer_state")
                   and parse_step(c.path.name) is None]
        if len(unnamed) == 1:
            by_step[ckpt.step] = other if unnamed[0] is ckpt else ckpt
            continue
        raise ValueError(f"two checkpoints have step {ckpt.step}: {other.path} and {ckpt.path}")
    return sorted(by_step.values(), key=lambda c: c.step)
