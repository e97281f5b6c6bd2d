"""The errors of checkpoint reading and writing (SeMask, arXiv 2112.12782); all derive from `SemaskError`."""
from __future__ import annotations

from semask.errors import EXIT_USAGE, LimitError, NonFiniteError, SemaskError

__all__ = ["CheckpointError", "CheckpointLimitError", "CheckpointNonFiniteError", "DownloadError", "DownloadLimitError",
           "DownloadNotFoundError"]


class CheckpointError(SemaskError, ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what is wrong."""


class CheckpointLimitError(CheckpointError, LimitError):
    """A checkpoint that claims an architecture beyond `LIMITS` (the message says how to raise the limit)."""


class CheckpointNonFiniteError(CheckpointError, NonFiniteError):
    """A checkpoint with NaN or infinite weights (the message names the tensors)."""


class DownloadError(SemaskError, OSError):
    """A download that failed or was refused: a time-out, a broken or malformed response, an HTTP error (the
    message names the URL and the reason). Nothing of it is kept in the cache."""


class DownloadLimitError(DownloadError, LimitError):
    """A download above ``semask.checkpoint.DOWNLOAD_LIMITS.max_bytes`` (declared, or sent)."""


class DownloadNotFoundError(DownloadError, FileNotFoundError):
    """A URL that names no file (HTTP 404 or 410, or a ``file://`` path that does not exist): a usage error."""

    exit_status = EXIT_USAGE
