"""Output planning: check, before any work, that a command's outputs can be written and spare its inputs.

Every command that writes plans its outputs here (`check_output_file`, `check_output_folder`, `plan_outputs`): an
output that is, or is inside, one of the command's inputs is refused, so is an existing file that may not be
replaced, and the destination must be writable (checked with a real probe file, so that read-only mounts and
immutable folders show up for root too).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

from semask.errors import OutputError, OutputExistsError

__all__ = ['check_output_file', 'check_output_files', 'check_output_folder', 'plan_outputs']

PathLike = Union[str, os.PathLike]
# a command's inputs: paths, or (what the path is, path) pairs such as ("the checkpoint", "model.pth"); None and
# URLs are skipped
Inputs = Iterable[Union[PathLike, Tuple[str, Optional[PathLike]], None]]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _shown(paths: Sequence[object], limit: int = 10) -> str:
    names = ", ".join(repr(str(p)) for p in paths[:limit])
    return names + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _resolved(path: PathLike) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a symbolic link loop (RuntimeError before Python 3.13)
        return Path(os.path.abspath(path))


class _Inputs:
    """A command's inputs, resolved once, to tell whether an output is one of them or lies inside one of them."""

    def __init__(self, inputs: Inputs, label: str = "the input") -> None:
        self.items: list[tuple[str, str, Path]] = []
        for item in inputs:
            what, path = item if isinstance(item, tuple) else (label, item)
            if path is None or (isinstance(path, str) and (not path or _URL.match(path))):
                continue
            self.items.append((what, str(path), _resolved(path)))
        self.by_path: dict[str, tuple[str, str]] = {}
        for what, shown, resolved in self.items:  # the first description of a path wins
            self.by_path.setdefault(os.path.normcase(str(resolved)), (what, shown))
        self.folders = [item for item in self.items if item[2].is_dir()]
        self._by_inode: Optional[dict[tuple[int, int], tuple[str, str]]] = None

    def _inode(self, path: Path) -> Optional[tuple[str, str]]:
        """The input that `path` is a hard link of, if any."""
        if self._by_inode is None:
            self._by_inode = {}
            for what, shown, resolved in self.items:
                with contextlib.suppress(OSError):
                    st = resolved.stat()
                    if stat.S_ISREG(st.st_mode):
                        self._by_inode[(st.st_dev, st.st_ino)] = (what, shown)
        try:
            st = path.stat()
        except OSError:
            return None
        return self._by_inode.get((st.st_dev, st.st_ino))

    def conflict(self, output: PathLike) -> Optional[str]:
        """How `output` lands on an input (``is the checkpoint 'x.pth'``, ``is inside the dataset root 'd'``)."""
        if not self.items:
            return None
        resolved = _resolved(output)
        hit = self.by_path.get(os.path.normcase(str(resolved)))
        if hit is None and resolved.is_file():
            hit = self._inode(resolved)
        if hit is not None:
            return f"is {hit[0]} {hit[1]!r}"
        for what, shown, folder in self.folders:
            if folder in resolved.parents:
                return f"is inside {what} {shown!r}"
        return None


def _refuse_input(what: str, path: PathLike, hit: str, kind: str = "file") -> OutputError:
    return OutputError(f"{what} {str(path)!r} {hit}; a command never writes over or into its own inputs: choose "
                       f"another {kind} (nothing was written)")


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (the folder a new path would be created in)."""
    return next(p for p in (path, *path.parents) if p.exists() or p.is_symlink() or p == Path(p.anchor))


def probe_write(folder: Path, size: int = 0) -> Optional[OSError]:
    """Create a temporary file in `folder` and write `size` bytes to it: the OS's error, or None when it works.

    A real write, because permission bits do not stop root while read-only mounts and immutable folders do.
    """
    try:
        handle = tempfile.TemporaryFile(dir=folder, prefix=".semask-probe-")
    except OSError as exc:
        return exc
    with handle:
        block, written = bytes(min(size, 1 << 16)), 0
        try:
            while written < size:
                written += os.write(handle.fileno(), block[: size - written])
        except OSError as exc:
            return exc
    return None


def _unwritable(folder: Path, probe: bool) -> Optional[str]:
    """Why nothing can be written in the existing `folder` (the OS's words), or None."""
    if probe:
        exc = probe_write(folder)
        return None if exc is None else (exc.strerror or str(exc))
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    return os.strerror(errno.EROFS if is_read_only(folder) else errno.EACCES)


def is_read_only(folder: Path) -> bool:
    """Whether `folder` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
          (stat.S_ISSOCK, "a socket"))


def _check_one(path: Path, what: str, checked: _Inputs, folders: dict[Path, Path], probe: bool) -> None:
    """The checks of `check_output_files` for one output (the folders checked so far are in `folders`)."""
    hit = checked.conflict(path)
    if hit is not None:
        raise _refuse_input(what, path, hit)
    if path.is_symlink():  # `atomic_path` writes the file the link points to, and keeps the link
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a folder; expected a file name")
    if path.exists() and not path.is_file():  # e.g. /dev/null: a write would replace the device with a file
        mode = path.stat().st_mode
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise OutputError(f"{what} {str(path)!r} is {kind}, not a file; give a file name")
    if path.parent not in folders:
        existing = folders[path.parent] = existing_ancestor(path.parent)
        if not existing.is_dir():
            raise OutputError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a folder")
        reason = _unwritable(existing, probe)
        if reason is not None:
            raise OutputError(f"{what} {str(path)!r} cannot be written: no write permission in {str(existing)!r} "
                              f"({reason})")
    existing, long, limit = folders[path.parent], [], 0
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no pathconf on Windows
        limit = os.pathconf(existing, "PC_NAME_MAX")
        long = [part for part in path.relative_to(existing).parts if len(os.fsencode(part)) > limit]
    if long:  # found now, not when the file is opened after the work
        raise OutputError(f"{what} {str(path)!r} cannot be created: a name of {len(os.fsencode(long[0]))} bytes "
                          f"({long[0][:24]!r}...), the file system allows {limit}")


def check_output_files(paths: Iterable[PathLike], what: str = "output", *, inputs: Inputs = (),
                       overwrite: bool = True, probe: bool = False) -> list[Path]:
    """Check, before any work, that each of `paths` can be written as a file.

    Args:
        paths: the files to write.
        what: how the message names them (e.g. ``"--json"``).
        inputs: the command's inputs (paths, or ``(description, path)`` pairs); no output may be one of them or
            lie inside one of their folders.
        overwrite: whether existing files may be replaced.
        probe: check that each folder is writable by creating a temporary file there (planning before work);
            otherwise by its permissions (the check `atomic_path` makes on every write).

    Returns:
        `paths` as `Path` objects.

    Raises:
        OutputError: an output is or is inside an input, is a folder, or its folder cannot be created or written
            (the first such output is named, with the input).
        OutputExistsError: outputs exist and `overwrite` is False (they are listed).
    """
    paths = [Path(p) for p in paths]
    checked = _Inputs(inputs)
    folders: dict[Path, Path] = {}
    for path in paths:
        try:
            _check_one(path, what, checked, folders, probe)
        except OSError as exc:  # a path the OS cannot even look up (e.g. a name too long)
            raise OutputError(f"{what} {str(path)!r} cannot be used: {exc.strerror or exc}") from exc
    present = [] if overwrite else [p for p in paths if p.exists() or p.is_symlink()]
    if len(present) == 1 and len(paths) == 1:
        raise OutputExistsError(f"{what} {str(present[0])!r} already exists; choose another name or pass "
                                "--overwrite (overwrite=True) to replace it")
    if present:
        raise OutputExistsError(f"{what}: {len(present)} file(s) already exist: {_shown(present)}; pass "
                                "--overwrite (overwrite=True) to replace them")
    return paths


def check_output_file(path: PathLike, what: str = "output", *, inputs: Inputs = (), overwrite: bool = True,
                      probe: bool = False) -> Path:
    """`check_output_files` for one file: not an input, not a folder, writable, replaced only if `overwrite`."""
    return check_output_files([path], what, inputs=inputs, overwrite=overwrite, probe=probe)[0]


def check_output_folder(path: PathLike, what: str = "output folder", *, inputs: Inputs = (),
                        files: Iterable[str] = (), overwrite: bool = True,
                        replace_hint: str = "pass --overwrite (overwrite=True) to replace them") -> Path:
    """Check, before any work, that files can be written into the folder `path` (created later if needed).

    Args:
        path: the output folder.
        what: how the message names it (e.g. ``"--show-dir"``).
        inputs: the command's inputs; the folder may not be one of them or lie inside one, and none of `files`
            may be one of them.
        files: the names (relative to `path`) the command will write, when known.
        overwrite: whether existing `files` may be replaced.
        replace_hint: what the message suggests when `files` exist and `overwrite` is False.

    Returns:
        `path` as a `Path`.

    Raises:
        OutputError: the folder is or is inside an input, is a file (or under one), cannot be written, or one of
            `files` is an input.
        OutputExistsError: some of `files` exist and `overwrite` is False (they are listed).
    """
    path = Path(path)
    checked = _Inputs(inputs)
    hit = checked.conflict(path)
    if hit is not None:
        raise _refuse_input(what, path, hit, "folder")
    existing = existing_ancestor(path)
    if not existing.is_dir():
        raise OutputError(f"{what} {str(path)!r} cannot be used: {str(existing)!r} is a file; give a folder (it "
                          "is created if needed)")
    reason = _unwritable(existing, probe=True)
    if reason is not None:
        raise OutputError(f"{what} {str(path)!r} cannot be written: no write permission in {str(existing)!r} "
                          f"({reason})")
    targets = [path / name for name in files]
    hits = [f"{str(t)!r} {h}" for t in targets for h in [checked.conflict(t)] if h is not None]
    if hits:
        raise OutputError(f"{what} {str(path)!r}: {len(hits)} output(s) would replace input files: "
                          f"{'; '.join(hits[:10])}; choose another folder (nothing was written)")
    if not overwrite:
        present = [t for t in targets if t.exists() or t.is_symlink()]
        if present:
            raise OutputExistsError(f"{what} {str(path)!r} already holds {len(present)} of the outputs: "
                                    f"{_shown(present)}; choose another folder or {replace_hint}")
    return path


def plan_outputs(inputs: Sequence[PathLike], out_dir: PathLike, suffix: str, overwrite: bool = False,
                 protected: Inputs = ()) -> list[Path]:
    """Choose one output file per input inside `out_dir`, and check them all before anything is written.

    Each output keeps its input's path relative to the folder that holds all inputs, with the file suffix
    replaced by `suffix` (``a/x.jpg`` and ``b/x.jpg`` give ``OUT/a/x.png`` and ``OUT/b/x.png``; inputs in one
    folder give flat names).

    Args:
        inputs: input files (distinct).
        out_dir: the output folder (need not exist yet).
        suffix: the outputs' suffix, e.g. ``".png"``.
        overwrite: replace outputs that already exist; otherwise they are an error.
        protected: further files no output may replace (paths, or ``(description, path)`` pairs such as
            ``("the checkpoint", path)``).

    Returns:
        The output paths, in the order of `inputs`.

    Raises:
        OutputError: `out_dir` is a file or not writable, two inputs would write the same output (the
            clashing names are listed), or an output would replace an input or a protected file.
        OutputExistsError: outputs already exist and `overwrite` is False (they are listed).
    """
    out_dir = check_output_folder(out_dir, "output folder")
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
    kept = _Inputs([*inputs, *(p if isinstance(p, tuple) else ("the protected file", p) for p in protected)])
    hits = [f"{str(t)!r} {h}" for t in outputs for h in [kept.conflict(t)] if h is not None]
    if hits:
        raise OutputError(f"{len(hits)} output(s) would replace input files: {'; '.join(hits[:10])}; choose "
                          "another output folder")
    folders = [str(t) for t in outputs if t.is_dir()]
    if folders:
        raise OutputError(f"output(s) {', '.join(folders[:10])} exist as folders; choose another output folder")
    existing = [str(t) for t in outputs if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 10} more" if len(existing) > 10 else ""
        raise OutputExistsError(f"{len(existing)} output(s) already exist: {', '.join(existing[:10])}{more}; "
                                "pass --overwrite (overwrite=True) to replace them")
    return outputs
