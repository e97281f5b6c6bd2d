"""The run directory of `semask train` (SeMask, arXiv 2112.12782): its file names, writing its log, reading it.

A run directory holds ``config.json`` (the resolved config), ``log.jsonl`` (one JSON object per log line),
``train.log`` (what was printed), ``latest.pth`` (model, optimizer, scaler, iteration), ``best.pth`` (the weights
with the best validation mIoU) and, with the tensorboard extra, ``tb/`` (TensorBoard scalars). Only the first
process of a run writes them (`RunLog`).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

from semask.engine.config import ConfigError
from semask.errors import SemaskError, UsageError
from semask.io import atomic_path

__all__ = ["LOG_FILE", "CONFIG_FILE", "LATEST", "BEST", "TEXT_LOG", "TENSORBOARD_DIR", "TrainingError",
           "read_training_log", "records_upto", "check_work_dir", "RunLog"]

LOG_FILE = "log.jsonl"  # one JSON object per record: kind "train", "eval" or "pretrained"
CONFIG_FILE = "config.json"  # the resolved TrainConfig
LATEST = "latest.pth"  # model, optimizer, scaler, iteration: what --resume continues from
BEST = "best.pth"  # the weights with the best validation mIoU
TEXT_LOG = "train.log"  # the lines the run printed
TENSORBOARD_DIR = "tb"  # TensorBoard event files (optional extra)


class TrainingError(SemaskError, RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, a run directory in the way, ...)."""


def read_training_log(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The records of a training log: one JSON object per line (the format `RunLog` writes).

    Training lines have ``"kind": "train"`` (iter, epoch, loss, loss_decode, loss_prior, lr, ...), evaluation
    lines ``"kind": "eval"`` (iter, mIoU, mAcc, aAcc, IoU, Acc, ...); any other keys are kept as they are.

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
    if existing:
        raise TrainingError(f"{work_dir} already holds a run ({', '.join(existing)}); continue it with --resume "
                            "or choose another --work-dir (nothing was changed)")
    return None


class RunLog:
    """The first process's outputs in a run directory: printed lines (also in train.log), log.jsonl records,
    TensorBoard scalars and config.json. On the other processes (``active`` False) every method does nothing.

    Args:
        work_dir: the run directory (it must exist).
        active: whether this process writes (rank 0).
        tensorboard: also write the records' numbers as TensorBoard scalars when the package is installed.
        callback: called with every record, e.g. to plot live.
    """

    def __init__(self, work_dir: Path, active: bool, tensorboard: bool,
                 callback: Optional[Callable[[dict[str, Any]], None]]) -> None:
        self.work_dir, self.active, self.callback = work_dir, active, callback
        self.writer = None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional extra; the same scalars are in log.jsonl
                self.print(f"tensorboard is not installed: scalars are in {LOG_FILE} only "
                           "(pip install 'semask[tensorboard]' to get them in TensorBoard too)")
            else:
                self.writer = SummaryWriter(str(work_dir / TENSORBOARD_DIR))

    def print(self, line: str) -> None:
        """Print ``line`` to stderr and append it to train.log."""
        if self.active:
            print(line, file=sys.stderr, flush=True)
            with open(self.work_dir / TEXT_LOG, "a") as f:
                f.write(line + "\n")

    def record(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` (with ``kind`` and ``iter``) to log.jsonl and TensorBoard, then call the callback."""
        if not self.active:
            return
        with open(self.work_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            for key, value in rec.items():
                if isinstance(value, (int, float)) and key not in ("iter", "time"):
                    self.writer.add_scalar(f"{rec['kind']}/{key}", value, rec["iter"])
            self.writer.flush()
        if self.callback is not None:
            self.callback(rec)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace log.jsonl with ``records`` (atomically): a resume drops the records of the steps it redoes."""
        if self.active:
            with atomic_path(self.work_dir / LOG_FILE) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))

    def write_config(self, values: dict[str, Any]) -> None:
        """Write the resolved config (`semask.engine.config.to_dict`) to config.json (atomically)."""
        if self.active:
            with atomic_path(self.work_dir / CONFIG_FILE) as tmp:
                tmp.write_text(json.dumps(values, indent=2) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
