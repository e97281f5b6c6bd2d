"""Safe file output for semask (arXiv 2112.12782): atomic writes, stale-temp clean-up, output planning."""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Sequence, Union

from semask.errors import OutputError, OutputExistsError, UsageError

__all__ = ['process_alive', 'fsync_directory', 'fsync_file', 'remove_stale_temp_files', 'check_output_file', 'atomic_path', 'plan_outputs']


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


def check_output_file(path: Union[str, os.PathLike], what: str = "output") -> Path:
    """Check that `path` can be written as a file: not a folder, its folder creatable and writable.

    Raises:
        OutputError: with the path, what is wrong and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a folder; expected a file name")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(path)!r} cannot be written: no write permission in {str(existing)!r}")
    return path


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it over `path`, on failure delete it.

    Readers never see a half-written file: either the old file or the complete new one. The temporary file is
    flushed to disk (fsync) before the rename and the folder after it, so a power cut cannot leave a torn file
    under the final name. It is created with the user's usual permissions (0666 less the umask) or, when
    `path` exists, with that file's permissions. On the first write into a folder, the temporary files that
    earlier, killed writes left there are removed (see `remove_stale_temp_files`).

    Raises:
        OutputError: `path` is a folder, or its folder cannot be created or written.
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    tmp = path.parent / f".{path.name}.{_host()}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    os.close(fd)
    try:
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def plan_outputs(inputs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike], suffix: str,
                 overwrite: bool = False, protected: Sequence[Union[str, os.PathLike]] = ()) -> list[Path]:
    """Choose one output file per input inside `out_dir`, and check them all before anything is written.

    Each output keeps its input's path relative to the folder that holds all inputs, with the file suffix
    replaced by `suffix` (``a/x.jpg`` and ``b/x.jpg`` give ``OUT/a/x.png`` and ``OUT/b/x.png``; inputs in one
    folder give flat names).

    Args:
        inputs: input files (distinct).
        out_dir: the output folder (need not exist yet).
        suffix: the outputs' suffix, e.g. ``".png"``.
        overwrite: replace outputs that already exist; otherwise they are an error.
        protected: further files no output may replace (e.g. the checkpoint).

    Returns:
        The output paths, in the order of `inputs`.

    Raises:
        OutputError: `out_dir` is a file or not writable, two inputs would write the same output (the
            clashing names are listed), or an output would replace an input or a protected file.
        OutputExistsError: outputs already exist and `overwrite` is False (they are listed).
    """
    out_dir = Path(out_dir)
    existing_dir = next(p for p in (out_dir, *out_dir.parents) if p.exists() or p == Path(p.anchor))
    if not existing_dir.is_dir():
        raise OutputError(f"output folder {str(out_dir)!r} cannot be used: {str(existing_dir)!r} is a file; "
                          "give a folder (it is created if needed)")
    try:  # a real probe: permissions, read-only mounts and immutable folders all show here, also for root
        with tempfile.TemporaryFile(dir=existing_dir, prefix=".semask-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {str(out_dir)!r} cannot be written: no write permission in "
                          f"{str(existing_dir)!r} ({exc.strerror or exc})") from exc
    resolved = [Path(p).resolve() for p in inputs]
    if not resolved:
        return []
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    outputs = [out_dir / p.relative_to(common).with_suffix(suffix) for p in resolved]
    by_output: dict[str, list[str]] = {}
    for source, target in zip(inputs, outputs):
        by_output.setdefault(os.path.normcase(str(target.resolve())), []).append(str(source))
    clashes = [names for names in by_output.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(" and ".join(names) for names in clashes[:10])
        raise OutputError(f"{len(clashes)} output name(s) would be written by more than one input ({shown}); "
                          "rename the inputs or run them separately")
    keep = {os.path.normcase(str(p)) for p in resolved} | {os.path.normcase(str(Path(p).resolve())) for p in protected}
    same = [str(t) for t in outputs if os.path.normcase(str(t.resolve())) in keep
            or (t.exists() and any(os.path.exists(k) and os.path.samefile(t, k) for k in keep))]
    if same:
        raise OutputError(f"output(s) {', '.join(same[:10])} would replace input files; choose another output "
                          "folder")
    folders = [str(t) for t in outputs if t.is_dir()]
    if folders:
        raise OutputError(f"output(s) {', '.join(folders[:10])} exist as folders; choose another output folder")
    existing = [str(t) for t in outputs if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 10} more" if len(existing) > 10 else ""
        raise OutputExistsError(f"{len(existing)} output(s) already exist: {', '.join(existing[:10])}{more}; "
                                "pass --overwrite (overwrite=True) to replace them")
    return outputs
