"""The run directory of `semask train` (SeMask, arXiv 2112.12782): its file names, writing its log, reading it.

A run directory holds ``config.json`` (the resolved config), ``log.jsonl`` (one JSON object per log line),
``train.log`` (what was printed), ``latest.pth`` (model, optimizer, scaler, iteration), ``best.pth`` (the weights
with the best validation mIoU), with ``train.snapshot_interval`` the weight snapshots ``iter_NNNNNN.pth`` (one per
N steps, weights and step only, never deleted by semask; `snapshot_name`, `list_snapshots`), with the tensorboard
extra ``tb/`` (TensorBoard scalars), and while the run is alive ``run.lock`` (`RunLock`: one run per folder). Only
the first process of a run writes them (`RunLog`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from semask.engine.config import ConfigError
from semask.errors import OutputError, SemaskError, UsageError
from semask.io import atomic_path, process_alive

__all__ = ["LOG_FILE", "CONFIG_FILE", "LATEST", "BEST", "TEXT_LOG", "TENSORBOARD_DIR", "LOCK_FILE", "TrainingError",
           "RunLockedError", "snapshot_name", "list_snapshots", "planned_snapshots", "read_training_log", "records_upto",
           "check_work_dir", "RunLock", "RunClaim",
           "make_run_dir", "remove_created", "RunLog"]

LOG_FILE = "log.jsonl"  # one JSON object per record: kind "run", "pretrained", "train" or "eval"
CONFIG_FILE = "config.json"  # the resolved TrainConfig
LATEST = "latest.pth"  # model, optimizer, scaler, iteration: what --resume continues from
BEST = "best.pth"  # the weights with the best validation mIoU
TEXT_LOG = "train.log"  # the lines the run printed
TENSORBOARD_DIR = "tb"  # TensorBoard event files (optional extra)
LOCK_FILE = "run.lock"  # host and process id of the live run (removed when it ends)
_SNAPSHOT = re.compile(r"iter_(\d{6,})\.pth")  # iter_NNNNNN.pth: the weights after step NNNNNN


class TrainingError(SemaskError, RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, a run directory in the way, ...)."""


def snapshot_name(step: int) -> str:
    """The file name of the weight snapshot after step `step`: ``iter_{step:06d}.pth``."""
    return f"iter_{step:06d}.pth"


def list_snapshots(run_dir: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    """The weight snapshots of a run (``train.snapshot_interval``), in step order.

    Args:
        run_dir: a run directory of `semask train`.

    Returns:
        ``[(step, path), ...]`` sorted by step: every file named ``iter_NNNNNN.pth`` there (each loads with
        `semask.load_checkpoint`); empty when there are none.

    Raises:
        FileNotFoundError: `run_dir` is not a folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"list_snapshots: {str(run_dir)!r} is not a folder; expected a run directory of "
                                "`semask train`")
    found = [(int(m.group(1)), path) for path in run_dir.iterdir()
             if (m := _SNAPSHOT.fullmatch(path.name)) and path.is_file()]
    return sorted(found)


def planned_snapshots(work_dir: Path, interval: int, iters: int) -> list[Path]:
    """The snapshot files a run of `iters` steps with ``train.snapshot_interval=interval`` writes (none for 0)."""
    return [work_dir / snapshot_name(step) for step in range(interval, iters + 1, interval)] if interval else []


def read_training_log(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The records of a training log: one JSON object per line (the format `RunLog` writes).

    Training lines have ``"kind": "train"`` (iter, epoch, loss, loss_decode, loss_prior, lr, ...), evaluation
    lines ``"kind": "eval"`` (iter, mIoU, mAcc, aAcc, IoU, Acc, ...); a run's first record, ``"kind": "run"``,
    says what it ran in (device, precision as set and as resolved, the time budget's fit); any other keys are kept
    as they are.

    Args:
        path: a ``log.jsonl`` file, or a run directory holding one.

    Returns:
        The records in file order. Blank lines are skipped; so is a last line without its newline that does
        not parse yet (the training loop is writing it while a notebook reads the log live).

    Raises:
        FileNotFoundError: no such file (or no ``log.jsonl`` in the directory).
        UsageError: a line that is not a JSON object (the message names the file and line).
    """
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"read_training_log: {str(path)!r} does not exist; expected a {LOG_FILE} file or "
                                "a run directory that holds one")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                break  # the line being written right now
            raise UsageError(f"read_training_log: {path}:{number} is not valid JSON ({exc.msg}); every line of "
                             f"{LOG_FILE} must be one JSON object") from exc
        if not isinstance(record, dict):
            raise UsageError(f"read_training_log: {path}:{number} holds a {type(record).__name__}, expected a "
                             "JSON object")
        records.append(record)
    return records


def records_upto(work_dir: Path, step: int) -> list[dict[str, Any]]:
    """The records of the run in ``work_dir`` up to step ``step`` (later ones belong to steps a resume redoes);
    none when it has no log yet."""
    if not (work_dir / LOG_FILE).is_file():
        return []
    return [r for r in read_training_log(work_dir / LOG_FILE) if r.get("iter", 0) <= step]


def check_work_dir(work_dir: Path, resume: Union[bool, str]) -> Optional[Path]:
    """The checkpoint to resume from, or None; refuses to write over an existing run.

    Args:
        work_dir: the run directory (it need not exist yet).
        resume: True, False or ``"auto"`` (resume when ``latest.pth`` is there), as `semask.engine.train.train`.

    Raises:
        ConfigError: ``resume`` is none of these.
        TrainingError: ``resume`` without ``latest.pth``, or an existing run without ``resume``.
    """
    latest = work_dir / LATEST
    if resume not in (True, False, "auto"):
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume == "auto":
        resume = latest.is_file()
    if resume:
        if not latest.is_file():
            raise TrainingError(f"--resume: {latest} does not exist; nothing to resume in {work_dir} "
                                "(start a new run without --resume)")
        return latest
    existing = [p.name for p in (work_dir / LOG_FILE, latest, work_dir / BEST) if p.exists()]
    if work_dir.is_dir():  # snapshots of an earlier run are its files too
        existing += sorted(p.name for p in work_dir.iterdir() if _SNAPSHOT.fullmatch(p.name))
    if existing:
        shown = ", ".join(existing[:6]) + (f" and {len(existing) - 6} more" if len(existing) > 6 else "")
        raise TrainingError(f"{work_dir} already holds a run ({shown}); continue it with --resume "
                            "or choose another --work-dir (nothing was changed)")
    return None


class RunLockedError(UsageError):
    """Another process holds the run directory (its lock names the host and process)."""


class RunLock:
    """The lock of a live run: ``run.lock`` in the run directory, holding the host and process id of its owner.

    Made with ``O_CREAT | O_EXCL``, so that of two processes started together exactly one gets it. A lock left
    by a process that is gone (same host, no such process) is taken over, and the take-over is reported through
    ``say``; a lock held by a live process, or by another host (whose processes cannot be seen from here), is a
    `RunLockedError` at once. `release` removes the lock if it is still this process's.
    """

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def acquire(self, say: Callable[[str], None] = lambda line: None) -> None:
        """Take the lock, or raise `RunLockedError` naming its holder."""
        text = json.dumps({**self.owner, "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
        for _ in range(3):  # a stale lock is moved away, then the exclusive create is tried again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder(self.path)
                self._refuse_unless_stale(holder)
                if self._move_stale(holder):
                    say(f"{self.path}: took over the lock of process {holder['pid']} on {holder['host']}, which is "
                        "no longer running (a run that was killed)")
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self.held = True
            return
        raise RunLockedError(f"{self.path.parent} is being claimed by other processes at the same time; run one "
                             "`semask train` per --work-dir")

    @staticmethod
    def _holder(path: Path) -> Optional[dict[str, Any]]:
        """The lock's host and pid; None when it cannot be read (being written, or not a lock of semask's)."""
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(holder, dict) and isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int)
        return holder if ok else None

    def _refuse_unless_stale(self, holder: Optional[dict[str, Any]]) -> None:
        remove = f"if no run is using {self.path.parent}, delete {self.path} and start again"
        if holder is None:
            raise RunLockedError(f"{self.path.parent} is locked by another run ({self.path} is being written or is "
                                 f"not a lock of semask's); {remove}")
        where = f"process {holder['pid']} on host {holder['host']!r}" + (
            f" (since {holder['started']})" if isinstance(holder.get("started"), str) else "")
        if holder["host"] != self.owner["host"]:
            raise RunLockedError(f"{self.path.parent} is locked by {where}, another machine, so whether it still "
                                 f"runs cannot be told from here; {remove}")
        if process_alive(holder["pid"]):
            raise RunLockedError(f"{self.path.parent} is in use by a live run, {where}: one run per --work-dir; "
                                 f"wait for it, stop it, or choose another --work-dir ({remove} if that process is "
                                 "not a semask run)")

    def _move_stale(self, holder: dict[str, Any]) -> bool:
        """Remove the stale lock ``holder`` describes; False if another process replaced it meanwhile (then it is
        put back: only a lock still naming the dead process is ever removed)."""
        aside = self.path.with_name(f".{LOCK_FILE}.{self.owner['pid']}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process moved it first
            return False
        if self._holder(aside) == holder:
            aside.unlink()
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, self.path)  # a fresh lock, taken by mistake: back where it was, unless replaced
        aside.unlink()
        return False

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if self.held:
            self.held = False
            holder = self._holder(self.path)
            if holder is not None and all(holder.get(k) == v for k, v in self.owner.items()):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


class RunClaim:
    """What a run did to its directory before it started: the folders it created, its lock, and what to tell its
    log (a stale lock taken over). `release` gives it all back."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.created: list[Path] = []
        self.lock: Optional[RunLock] = None
        self.notes: list[str] = []

    def take(self) -> None:
        """Create the run directory (and missing parents) and take its lock; on failure nothing is left."""
        self.created = make_run_dir(self.work_dir)
        self.lock = RunLock(self.work_dir)
        try:
            self.lock.acquire(say=self.notes.append)
        except BaseException:
            self.release(started=False)
            raise

    def release(self, started: bool) -> None:
        """Give the lock back; a run that never started also removes the folders it created (while empty)."""
        if self.lock is not None:
            self.lock.release()
        if not started:
            remove_created(self.created)
            self.created = []


def make_run_dir(work_dir: Path) -> list[Path]:
    """Create ``work_dir`` and its missing parents; returns the folders this call created, outermost first."""
    created: list[Path] = []
    try:
        for folder in reversed([work_dir, *work_dir.parents]):
            if not folder.exists():
                try:
                    folder.mkdir()
                except FileExistsError:  # made by another process meanwhile: not ours
                    continue
                created.append(folder)
        if not work_dir.is_dir():
            raise OutputError(f"--work-dir {work_dir} is a file, not a folder; choose another --work-dir")
    except BaseException:
        remove_created(created)
        raise
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the folders `make_run_dir` created, innermost first, each only while it is empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): something else is in it, leave it
            return


class RunLog:
    """The first process's outputs in a run directory: printed lines (also in train.log), log.jsonl records,
    TensorBoard scalars and config.json. On the other processes (``active`` False) every method does nothing.

    With ``defer``, nothing is written to the folder until `commit` (training calls it once the run's first step
    is done), so that a run that fails before its first step leaves the folder as it found it; printed lines still
    reach stderr, and records the callback, at once. The TensorBoard writer is made at the first record written:
    no event file without a record.

    Args:
        work_dir: the run directory (it must exist).
        active: whether this process writes (rank 0).
        tensorboard: also write the records' numbers as TensorBoard scalars when the package is installed.
        callback: called with every record, e.g. to plot live.
        defer: keep every write back until `commit`.
    """

    def __init__(self, work_dir: Path, active: bool, tensorboard: bool,
                 callback: Optional[Callable[[dict[str, Any]], None]], defer: bool = False) -> None:
        self.work_dir, self.active, self.callback = work_dir, active, callback
        self.writer: Any = None
        self._writer_class: Any = None
        self._purge_step: Optional[int] = None
        self._pending: Optional[list[Callable[[], None]]] = [] if active and defer else None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional extra; the same scalars are in log.jsonl
                self.print(f"tensorboard is not installed: scalars are in {LOG_FILE} only "
                           "(pip install 'semask[tensorboard]' to get them in TensorBoard too)")
            else:
                self._writer_class = SummaryWriter

    @property
    def committed(self) -> bool:
        """Whether the folder has been written to (`commit` was called)."""
        return self._pending is None

    def _write(self, op: Callable[[], None], first: bool = False) -> None:
        """Run ``op`` now, or keep it back until `commit` (``first``: before what was kept back so far)."""
        if not self.active:
            return
        if self._pending is None:
            op()
        elif first:
            self._pending.insert(0, op)
        else:
            self._pending.append(op)

    def commit(self) -> None:
        """Write what was kept back, in order, and from now on write at once (the run's first step is done)."""
        if self._pending is None:
            return
        ops, self._pending = self._pending, None
        for op in ops:
            op()

    def print(self, line: str) -> None:
        """Print ``line`` to stderr and append it to train.log."""
        if self.active:
            print(line, file=sys.stderr, flush=True)
            self._write(lambda: self._append(TEXT_LOG, line + "\n"))

    def _append(self, name: str, text: str) -> None:
        with open(self.work_dir / name, "a") as f:
            f.write(text)

    def record(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` (with ``kind`` and ``iter``) to log.jsonl and TensorBoard, then call the callback."""
        if not self.active:
            return
        self._write(lambda: self._write_record(rec))
        if self.callback is not None:
            self.callback(rec)

    def _write_record(self, rec: dict[str, Any]) -> None:
        self._append(LOG_FILE, json.dumps(rec) + "\n")
        if self._writer_class is not None and self.writer is None:
            # purge_step: TensorBoard hides the events a resume redoes, which earlier event files still hold
            self.writer = self._writer_class(str(self.work_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        if self.writer is not None:
            for key, value in rec.items():
                if isinstance(value, (int, float)) and key not in ("iter", "time"):
                    self.writer.add_scalar(f"{rec['kind']}/{key}", value, rec["iter"])
            self.writer.flush()

    def rewind(self, records: list[dict[str, Any]], step: int, text_size: Optional[int]) -> None:
        """Go back to step ``step`` for a resume: log.jsonl keeps ``records`` (rewritten atomically), train.log its
        first ``text_size`` bytes (its size when the checkpoint was written; without it, the ``step N:`` lines of
        later steps are dropped), and TensorBoard hides the later steps."""
        if not self.active:
            return
        self._purge_step = step + 1

        # the files as the earlier run left them are cut back before anything of this run's is written
        self._write(lambda: _cut_text_log(self.work_dir / TEXT_LOG, step, text_size), first=True)
        self.rewrite(records, first=True)

    def rewrite(self, records: list[dict[str, Any]], first: bool = False) -> None:
        """Replace log.jsonl with ``records`` (atomically): a resume drops the records of the steps it redoes."""

        def rewrite() -> None:
            with atomic_path(self.work_dir / LOG_FILE) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))

        self._write(rewrite, first)

    def text_size(self) -> Optional[int]:
        """train.log's size now (None on the other processes): where a resume from a checkpoint written now cuts it."""
        if not self.active or not self.committed:
            return None
        path = self.work_dir / TEXT_LOG
        return path.stat().st_size if path.exists() else 0

    def write_config(self, values: dict[str, Any]) -> None:
        """Write the resolved config (`semask.engine.config.to_dict`) to config.json (atomically)."""

        def write() -> None:
            with atomic_path(self.work_dir / CONFIG_FILE) as tmp:
                tmp.write_text(json.dumps(values, indent=2) + "\n")

        self._write(write)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _cut_text_log(path: Path, step: int, size: Optional[int]) -> None:
    """Cut train.log back to ``size`` bytes, or (size unknown or larger than the file) drop its lines of steps
    after ``step``; atomically."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if size is not None and 0 <= size <= len(data):
        kept = data[:size]
    else:
        lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
        kept = "".join(line for line in lines
                       if not ((m := re.match(r"step (\d+):", line)) and int(m.group(1)) > step)).encode()
    if kept != data:
        with atomic_path(path) as tmp:
            tmp.write_bytes(kept)
