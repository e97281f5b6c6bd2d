"""Memory and SeMask training (arXiv 2112.12782): a step that cannot fit is refused before the first step, and
running out of memory during training becomes a message that names the settings to lower.

The estimates themselves are `semask.bounds`' (`forward_bytes`: a lower bound, input and class scores, plus the
square-growing weights of a global semantic attention where they are built explicitly).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from semask.bounds import SettingError, check_fits, explicit_attention_strides, forward_bytes
from semask.engine.config import ConfigError, TrainConfig
from semask.engine.rundir import TrainingError

__all__ = ["check_step_fits", "out_of_memory_error"]

# what the CPU allocator's RuntimeError says (its type is a plain RuntimeError, unlike CUDA's OutOfMemoryError)
_CPU_MARKERS = ("DefaultCPUAllocator", "can't allocate memory", "Cannot allocate memory")


def check_step_fits(config: TrainConfig, model: nn.Module, device: torch.device) -> None:
    """Refuse a training step whose lower-bound memory exceeds all of ``device``'s.

    Raises:
        ConfigError: naming ``train.batch_size`` and ``data.train_pipeline.crop_size`` and the memory needed.
    """
    rt, (h, w) = config.train, config.data.train_pipeline.crop_size
    needed = forward_bytes(h, w, model.num_classes, rt.batch_size, training=True,
                           attention_strides=explicit_attention_strides(model, device))
    try:
        check_fits("train.batch_size x data.train_pipeline.crop_size", needed, device,
                   f"a step of {rt.batch_size} crops of {h} x {w} pixels with {model.num_classes} classes",
                   "lower data.train_pipeline.crop_size, or train.batch_size (train.global_batch is kept by gradient "
                   "accumulation)")
    except SettingError as exc:
        raise ConfigError(str(exc)) from None


def out_of_memory_error(exc: BaseException, config: TrainConfig) -> Optional[TrainingError]:
    """The `TrainingError` for running out of memory (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError,
    NumPy's MemoryError, also from a DataLoader worker), naming the settings to lower; None for other errors."""
    rt, crop = config.train, tuple(config.data.train_pipeline.crop_size)
    text = str(exc)
    cpu = isinstance(exc, MemoryError) or (not isinstance(exc, torch.OutOfMemoryError)
                                           and any(marker in text for marker in _CPU_MARKERS))
    if isinstance(exc, torch.OutOfMemoryError) and not cpu:
        return TrainingError(
            f"CUDA ran out of memory with train.batch_size={rt.batch_size} at {crop} crops ({exc}). Try "
            f"model.grad_checkpointing=true, a smaller train.batch_size (the global batch {rt.global_batch} is kept "
            "by gradient accumulation), or train.precision=bf16.")
    if cpu:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return TrainingError(
            f"the CPU ran out of memory with train.batch_size={rt.batch_size} at {crop} crops ({first}). Lower "
            f"train.batch_size (the global batch {rt.global_batch} is kept by gradient accumulation) or "
            "data.train_pipeline.crop_size, set model.grad_checkpointing=true, or use fewer data.num_workers; "
            "the last checkpoint is untouched.")
    return None
