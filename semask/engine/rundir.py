"""The run directory of `semask train` (SeMask, arXiv 2112.12782): its file names, and reading its log.

A run directory holds ``config.json`` (the resolved config), ``log.jsonl`` (one JSON object per log line),
``train.log`` (what was printed), ``latest.pth`` (model, optimizer, scaler, iteration), ``best.pth`` (the weights
with the best validation mIoU) and, with the tensorboard extra, ``tb/`` (TensorBoard scalars).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

__all__ = ["LOG_FILE", "CONFIG_FILE", "LATEST", "BEST", "TEXT_LOG", "TENSORBOARD_DIR", "read_training_log"]

LOG_FILE = "log.jsonl"  # one JSON object per record: kind "train", "eval" or "pretrained"
CONFIG_FILE = "config.json"  # the resolved TrainConfig
LATEST = "latest.pth"  # model, optimizer, scaler, iteration: what --resume continues from
BEST = "best.pth"  # the weights with the best validation mIoU
TEXT_LOG = "train.log"  # the lines the run printed
TENSORBOARD_DIR = "tb"  # TensorBoard event files (optional extra)


def read_training_log(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The records of a training log: one JSON object per line (the format `semask.engine.train` writes).

    Training lines have ``"kind": "train"`` (iter, epoch, loss, loss_decode, loss_prior, lr, ...), evaluation
    lines ``"kind": "eval"`` (iter, mIoU, mAcc, aAcc, IoU, Acc, ...); any other keys are kept as they are.

    Args:
        path: a ``log.jsonl`` file, or a run directory holding one.

    Returns:
        The records in file order. Blank lines are skipped; so is a last line without its newline that does
        not parse yet (the training loop is writing it while a notebook reads the log live).

    Raises:
        FileNotFoundError: no such file (or no ``log.jsonl`` in the directory).
        ValueError: a line that is not a JSON object (the message names the file and line).
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
            raise ValueError(f"read_training_log: {path}:{number} is not valid JSON ({exc.msg}); every line of "
                             f"{LOG_FILE} must be one JSON object") from exc
        if not isinstance(record, dict):
            raise ValueError(f"read_training_log: {path}:{number} holds a {type(record).__name__}, expected a "
                             "JSON object")
        records.append(record)
    return records
