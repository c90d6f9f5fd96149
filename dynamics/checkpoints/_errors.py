"""The exceptions of checkpoint reading (shared by every reader module)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be analysed; the message is the reason recorded in the Dataset."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when loaded; it was refused and nothing was executed."""
