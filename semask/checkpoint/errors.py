"""The errors of checkpoint reading and writing (SeMask, arXiv 2112.12782); all derive from `SemaskError`."""
from __future__ import annotations

from semask.errors import LimitError, NonFiniteError, SemaskError

__all__ = ["CheckpointError", "CheckpointLimitError", "CheckpointNonFiniteError"]


class CheckpointError(SemaskError, ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what is wrong."""


class CheckpointLimitError(CheckpointError, LimitError):
    """A checkpoint that claims an architecture beyond `LIMITS` (the message says how to raise the limit)."""


class CheckpointNonFiniteError(CheckpointError, NonFiniteError):
    """A checkpoint with NaN or infinite weights (the message names the tensors)."""
