"""What `semask benchmark` measures (SeMask, arXiv 2112.12782): `BenchmarkConfig` and its checks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import semask
from semask.data.classes import ADE20K_CLASSES, CITYSCAPES_CLASSES, COCO_STUFF_CLASSES
from semask.data.toy import TOY_CLASSES
from semask.device import PRECISIONS, autocast_dtype, check_device, precision_name
from semask.errors import UnknownNameError, UsageError

__all__ = ["TASKS", "PRECISIONS", "BenchmarkConfig", "preset_config", "resolve_config"]

TASKS = ("inference", "train", "data", "protocols", "eval_memory", "onnxruntime")
# the class count of a training preset's dataset (a folder dataset has none of its own)
DATASET_CLASSES = {"ade20k": len(ADE20K_CLASSES), "cityscapes": len(CITYSCAPES_CLASSES),
                   "coco_stuff10k": len(COCO_STUFF_CLASSES), "toy": len(TOY_CLASSES)}


@dataclass
class BenchmarkConfig:
    """What to measure."""

    model: str = "semask_tiny_fpn"  # registry name
    checkpoint: Optional[str] = None  # weights to load (official or semask); overrides model/num_classes
    num_classes: int = 150  # decoder classes (150 = ADE20K)
    size: tuple[int, int] = (512, 512)  # input height, width of the model benchmarks
    batch_size: int = 1  # images per inference batch
    train_batch_size: int = 2  # images per training step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast) | auto (resolved by resolve_config: semask.device)
    device: str = "cpu"  # cpu | cuda | cuda:N
    tasks: tuple[str, ...] = ("inference", "train")  # any of TASKS
    warmup: int = 2  # untimed runs before measuring
    repeats: int = 5  # timed runs
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute backbone blocks in backward (training)
    channels_last: bool = True  # channels-last memory for the images (and the conv head)
    threads: Optional[int] = None  # torch.set_num_threads (CPU); None = PyTorch's default
    keep_freed_memory: bool = True  # CPU timings: reuse freed heap memory instead of fresh mmaps (semask.device)
    matmul_size: int = 4096  # side of the square matmul that measures the peak (CPU; GPU uses 8192)
    protocol_size: tuple[int, int] = (512, 683)  # ADE20K-sized image for the inference protocols
    protocol_repeats: int = 2  # images timed per protocol
    data_images: int = 64  # JPEGs through the training pipeline
    eval_images: tuple[int, ...] = (4, 32)  # image counts for the evaluation-memory check
    agreement_images: int = 4  # toy scenes on which bf16/fp16 predictions are compared with fp32
    agreement_root: Optional[str] = None  # compare on this dataset's validation images instead (ADE20K layout)
    preset: Optional[str] = None  # a training preset: its model, classes, crop (size) and images per GPU (train)


def preset_config(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """`cfg` with the model, class count, input size (the crop) and training batch (images per GPU) of the
    training preset `cfg.preset` (`semask configs` lists them).

    Raises:
        UsageError: the preset trains on a folder dataset, which has no fixed class count.
    """
    from semask.engine.config import get_preset

    recipe = get_preset(cfg.preset)
    if recipe.data.dataset not in DATASET_CLASSES:
        raise UsageError(f"--preset {cfg.preset}: a {recipe.data.dataset} dataset has no fixed class count; give "
                         "--model and --num-classes instead")
    return dataclasses.replace(cfg, model=recipe.model.name, num_classes=DATASET_CLASSES[recipe.data.dataset],
                               size=tuple(recipe.data.train_pipeline.crop_size),
                               train_batch_size=recipe.train.batch_size)


def resolve_config(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """Check `cfg` and fill in what its preset or checkpoint decides (model, classes, and for a preset the crop
    and the training batch), and the precision that runs (``auto``: bf16 where the device has it natively, else
    fp32 on the CPU; `semask.device.autocast_dtype`, which also warns once about emulated bf16).

    Raises:
        UsageError: an unknown task or precision, a size, batch or repeat count below 1, or a device this machine
            does not have.
        UnknownNameError: a model name the registry does not know.
    """
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise UsageError(f"unknown benchmark task(s) {unknown}; choose from {list(TASKS)}")
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {list(PRECISIONS)}, got {cfg.precision!r}")
    small = [f"{k}={v}" for k, v in (("size", min(cfg.size)), ("batch_size", cfg.batch_size),
                                      ("train_batch_size", cfg.train_batch_size), ("repeats", cfg.repeats))
             if v < 1]
    if small:
        raise UsageError(f"these must be at least 1: {', '.join(small)}")
    cfg = dataclasses.replace(cfg, precision=precision_name(autocast_dtype(cfg.precision, check_device(cfg.device))))
    if cfg.preset:  # the recipe decides the model, its classes, the crop and the per-GPU batch
        cfg = preset_config(cfg)
    if cfg.checkpoint:  # the file decides the architecture and the class count
        loaded = semask.load_checkpoint(cfg.checkpoint)
        cfg = dataclasses.replace(cfg, model=loaded.name, num_classes=loaded.num_classes)
        del loaded
    if cfg.model not in semask.list_models():
        raise UnknownNameError(f"unknown model {cfg.model!r}; valid names: {', '.join(semask.list_models())}")
    return cfg
