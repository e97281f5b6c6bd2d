"""The errors semask raises on purpose (SeMask, arXiv 2112.12782), and how the command line reports them.

Every error a user can trigger is one of these, with a message that names the argument or file, says what
was expected and what arrived, and what to do. They come in two kinds, which the command line tells apart
by their exit status:

- **usage errors** (:class:`UsageError`, exit status 2): what was asked cannot be done as asked -- an argument
  of the wrong type or out of range, an unknown name, a path that does not exist or is of the wrong kind, an
  output that would overwrite something, a device that is not there. Fix the command and run it again.
- **failures** (every other :class:`SemaskError`, exit status 1): the request was fine but the work failed --
  an unreadable or crafted file, an image above the size limit, NaN in weights or outputs, some images of a
  batch that could not be processed.

Each class also derives from the built-in exception a Python caller would expect (``ValueError``,
``TypeError``, ``KeyError``), so ``except ValueError`` keeps working.

Sub-commands of ``semask`` get this policy by raising these errors: :func:`semask.apps.cli.main` prints one line per
error (``semask COMMAND: error: ...``), no traceback unless ``--debug`` is given, and returns
:func:`exit_status`.
"""
from __future__ import annotations

import errno
from typing import Iterator, Sequence

__all__ = [
    "SemaskError",
    "UsageError",
    "UsageTypeError",
    "UnknownNameError",
    "OutputError",
    "OutputExistsError",
    "MissingPackageError",
    "WriteError",
    "ImageError",
    "LimitError",
    "NonFiniteError",
    "BatchError",
    "exit_status",
    "error_lines",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
# OS errors about a path the user named: the command line was wrong, not the work.
_USAGE_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS}
_USAGE_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)


class SemaskError(Exception):
    """Base of semask's own errors: a failure (exit status 1) unless a subclass says otherwise."""

    exit_status = EXIT_FAILURE

    def __str__(self) -> str:  # plain message, also for the KeyError subclass (which would quote it)
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UsageError(SemaskError, ValueError):
    """An argument, name or path that cannot be used as given (exit status 2)."""

    exit_status = EXIT_USAGE


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type, e.g. ``num_classes=2.5`` (exit status 2)."""


class UnknownNameError(UsageError, KeyError):
    """An unknown model, preset or option name; the message lists the valid ones (exit status 2)."""


class OutputError(UsageError):
    """An output that would overwrite an input, collide with another output, or cannot be written there."""


class OutputExistsError(OutputError, FileExistsError):
    """An output that already exists and was not asked to be replaced (``overwrite`` / ``--overwrite``)."""


class WriteError(SemaskError, OSError):
    """A write that failed (no space left, read-only file system, no permission): the message names the file and the
    operating system's reason, and ``errno``/``strerror``/``filename`` carry them; the previous file is kept."""


class MissingPackageError(UsageError, ImportError):
    """An optional package (one of semask's extras) that is not installed; the message names the extra to install."""


class ImageError(SemaskError, ValueError):
    """An image that cannot be read, or whose mode or values cannot be converted faithfully to RGB."""


class LimitError(SemaskError, ValueError):
    """Input beyond a safety limit (image pixels, model size); the message says how to raise the limit."""


class NonFiniteError(SemaskError, ValueError):
    """NaN or infinity in weights, inputs or outputs, where a number was needed."""


class BatchError(SemaskError):
    """Some items of a batch failed; the others were processed.

    Args:
        failures: ``(item, error)`` for every item that failed.
        total: how many items there were.
        what: what the items are, for the message (e.g. ``"images"``).
    """

    def __init__(self, failures: Sequence[tuple[str, BaseException]], total: int, what: str = "items"):
        self.failures = list(failures)
        self.total = total
        names = ", ".join(item for item, _ in self.failures[:10])
        more = f" and {len(self.failures) - 10} more" if len(self.failures) > 10 else ""
        super().__init__(f"{len(self.failures)} of {total} {what} failed: {names}{more}")


def exit_status(exc: BaseException) -> int:
    """The command line's exit status for an error: 2 for usage errors, 1 for failures.

    semask's errors carry their own (``exc.exit_status``); an ``OSError`` about a path (missing, a directory
    where a file was expected, no permission, already there) counts as a usage error, and so does a plain
    ``ValueError``, ``TypeError`` or ``KeyError`` (the checks of arguments that predate this module raise
    these); anything else (``RuntimeError``, out of memory, a full disk) is a failure.
    """
    if isinstance(exc, SemaskError):
        return exc.exit_status
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        return EXIT_USAGE
    if isinstance(exc, _USAGE_OS_ERRORS) or (isinstance(exc, OSError) and exc.errno in _USAGE_ERRNOS):
        return EXIT_USAGE
    return EXIT_FAILURE


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def error_lines(exc: BaseException) -> Iterator[str]:
    """One line of text per error in ``exc`` (a :class:`BatchError` gives one per failed item plus a summary).

    semask's errors, OS errors and the value/type/lookup errors that libraries raise with a message show that
    message; any other exception is unexpected and shows its type as well, so that it can be reported.
    """
    if isinstance(exc, BatchError):
        for item, error in exc.failures:
            for line in error_lines(error):
                yield line if item in line else f"{item}: {line}"
        yield _one_line(str(exc))
        return
    if isinstance(exc, KeyError) and not isinstance(exc, SemaskError) and len(exc.args) == 1:
        message = _one_line(str(exc.args[0]))  # KeyError's str() quotes its message
    else:
        message = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, (SemaskError, OSError, ValueError, TypeError, LookupError)):
        yield message
    else:
        yield f"{type(exc).__name__}: {message} (unexpected; run with --debug for the traceback)"
