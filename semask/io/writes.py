"""Atomic, durable writes: `atomic_path`, the `WriteError` of a refused write, clean-up of killed writes.

Every file semask writes goes through `atomic_path`, which turns a failed write into a `WriteError` naming the
file and the operating system's reason, keeps the previous file and leaves no temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat
import threading
from pathlib import Path
from typing import Iterator, Optional, Union

from semask.errors import SemaskError, WriteError
from semask.io.outputs import PathLike, check_output_file, existing_ancestor, is_read_only, probe_write

__all__ = ['process_alive', 'fsync_directory', 'fsync_file', 'remove_stale_temp_files', 'atomic_path',
           'write_error']

TEMP_SUFFIX = ".tmp"  # temporary files of atomic writes: .<name>.<host>.<pid>-<random>.tmp beside the target


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (used to tell stale temporary files from live ones)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def fsync_directory(path: Union[str, os.PathLike]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Union[str, os.PathLike]) -> None:
    """Flush a file's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """Delete the temporary files that killed `atomic_path` writes left in `folder`.

    Only files named by `atomic_path` (``.<name>.<host>.<pid>-<random>.tmp``), written on this machine by a
    process that no longer exists, are removed; a write in progress in a live process is left alone.

    Returns:
        The removed files.
    """
    rx = re.compile(rf"^\..+\.{re.escape(_host())}\.(\d+)-[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = rx.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not process_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


_CLEANED_FOLDERS: set[str] = set()
_CLEANED_LOCK = threading.Lock()


def _clean_once(folder: Path) -> None:
    """`remove_stale_temp_files` on the first atomic write into `folder` in this process (one scan per folder)."""
    key = os.path.realpath(folder)
    with _CLEANED_LOCK:
        if key in _CLEANED_FOLDERS:
            return
        _CLEANED_FOLDERS.add(key)
    remove_stale_temp_files(folder)


# --------------------------------------------------------------------------------------------- write errors
# errors of a write that the OS refused; any other OSError raised while a file is written is passed on unchanged
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                 getattr(errno, "EDQUOT", errno.ENOSPC)}
_WHAT_TO_DO = {errno.ENOSPC: "free some space or write elsewhere", errno.EROFS: "write to another file system",
               errno.EACCES: "write elsewhere or change the folder's permissions",
               errno.EPERM: "write elsewhere or change the folder's permissions",
               getattr(errno, "EDQUOT", errno.ENOSPC): "free some space or write elsewhere"}
PROBE_BYTES = 1 << 20  # written to find why a write failed: once a write ran out of space, even this much fails


def _free_space(folder: Path) -> str:
    with contextlib.suppress(OSError, AttributeError):
        st = os.statvfs(folder)
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        return f", {free / 2**20:.1f} MiB free there" if free >= 2**20 else f", {free} bytes free there"
    return ""


def write_error(path: PathLike, error: Union[OSError, int], kept: str = "nothing was written") -> WriteError:
    """The `WriteError` for a failed write of `path`: the file, the OS's reason, what was kept and what to do.

    Args:
        path: the file that was being written.
        error: the OS's error, or its errno.
        kept: what the failure left in place, e.g. ``"the previous file is kept"``.
    """
    path = Path(path)
    code = error if isinstance(error, int) else error.errno
    reason = os.strerror(code) if code else str(error)
    space = _free_space(existing_ancestor(path.parent)) if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) \
        else ""
    todo = _WHAT_TO_DO.get(code)
    exc = WriteError(f"cannot write {str(path)!r}: {reason}{space}; {kept}" + (f"; {todo}" if todo else ""))
    exc.errno, exc.strerror, exc.filename = code, reason, str(path)
    return exc


def _same_file_name(name: object, *paths: Path) -> bool:
    if name is None:
        return True  # os.write and file.write name no file: the file being written is the one
    with contextlib.suppress(TypeError, ValueError):
        return os.path.abspath(os.fsdecode(name)) in {os.path.abspath(p) for p in paths}
    return False


def _failed_write(exc: BaseException, tmp: Path, path: Path) -> Optional[OSError]:
    """The OS's error behind `exc`, raised while `tmp` was written, if it is a refused write; else None."""
    if isinstance(exc, SemaskError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError):
        return exc if exc.errno in _WRITE_ERRNOS and _same_file_name(exc.filename, tmp, path) else None
    # torch.save ("[enforce fail at inline_container.cc] unexpected pos") and safetensors report a failed write
    # without the OS's error: ask the OS now, while the partial file still takes its space
    if is_read_only(tmp.parent):
        return OSError(errno.EROFS, os.strerror(errno.EROFS))
    return probe_write(tmp.parent, PROBE_BYTES)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it over `path`, on failure delete it.

    Readers never see a half-written file: either the old file or the complete new one. A symbolic link is
    followed: the file it points to is replaced and the link kept. The temporary file is
    flushed to disk (fsync) before the rename and the folder after it, so a power cut cannot leave a torn file
    under the final name. It is created with the user's usual permissions (0666 less the umask) or, when
    `path` exists, with that file's permissions. On the first write into a folder, the temporary files that
    earlier, killed writes left there are removed (see `remove_stale_temp_files`).

    Raises:
        OutputError: `path` is a folder, or its folder cannot be created or written.
        WriteError: the OS refused the write (no space left, read-only file system, no permission), also when
            the writer (e.g. ``torch.save``) reported it without the OS's reason; the previous file is kept.
    """
    path = Path(path)
    if path.is_symlink():  # replace the file the link points to, not the link (e.g. /dev/stdout as root)
        path = Path(os.path.realpath(path))
    path = check_output_file(path)
    kept = "the previous file is kept" if path.exists() else "nothing was written"
    tmp = path.parent / f".{path.name}.{_host()}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc, kept) from exc
    try:
        try:
            if path.exists():
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            yield tmp
        except Exception as exc:
            refused = _failed_write(exc, tmp, path)  # before the partial file is removed
            if refused is None:
                raise
            raise write_error(path, refused, kept) from exc
        try:
            fsync_file(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(path, exc, kept) from exc
        try:
            fsync_directory(path.parent)
        except OSError as exc:
            raise write_error(path, exc, "the new file is in place but may not survive a power cut") from exc
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
