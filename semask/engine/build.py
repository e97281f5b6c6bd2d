"""What a SeMask FPN training run (arXiv 2112.12782) is built from: the datasets and the model a `TrainConfig`
names, AdamW with the released recipes' parameter groups, the gradient scaler and the learning-rate schedule.

`semask.engine.train` builds its run from these before the loop starts (and, for a time budget, a throwaway copy of
the model and optimizer to time probe steps on); they are public for notebooks and tests:

    train_set, val_set = build_datasets(config)
    model = model_from_config(config, train_set)
    learning_rate(step, config)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from semask.data.datasets import ADE20K, COCOStuff10k, Cityscapes, FolderDataset, SegmentationDataset
from semask.data.toy import ToyDataset
from semask.engine import distributed
from semask.engine.config import ConfigError, TrainConfig
from semask.engine.evaluate import check_classes
from semask.model.registry import create_model
from semask.model.segmentor import SeMaskFPN

__all__ = ["build_datasets", "model_from_config", "param_groups", "learning_rate", "build_model", "build_optimizer"]


def build_datasets(config: TrainConfig) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The training and validation splits named by ``config.data`` (without transforms).

    Raises:
        FileNotFoundError: the root or a split folder is missing (the message shows the expected layout).
    """
    d = config.data
    root = Path(d.root)
    if d.dataset == "folder":
        def folder(split: str) -> FolderDataset:
            return FolderDataset(root / "images" / split, root / "annotations" / split, d.class_names,
                                 img_suffix=d.img_suffix, seg_map_suffix=d.seg_map_suffix,
                                 reduce_zero_label=d.reduce_zero_label)
        return folder(d.train_split or "training"), folder(d.val_split or "validation")
    classes = {"ade20k": (ADE20K, "training", "validation"), "cityscapes": (Cityscapes, "train", "val"),
               "coco_stuff10k": (COCOStuff10k, "train", "test"), "toy": (ToyDataset, "training", "validation")}
    cls, train_split, val_split = classes[d.dataset]
    return cls(root, d.train_split or train_split), cls(root, d.val_split or val_split)


def model_from_config(config: TrainConfig, dataset: SegmentationDataset, sync_bn: bool = False) -> SeMaskFPN:
    """Build the model of ``config.model`` for ``dataset``'s classes and palette (fresh weights)."""
    m = config.model
    overrides: dict[str, Any] = {"grad_checkpointing": m.grad_checkpointing, "sync_bn": sync_bn}
    for key in ("backbone_classes", "semantic_global_stages", "drop_path_rate"):
        if getattr(m, key) is not None:
            overrides[key] = getattr(m, key)
    return create_model(m.name, class_names=dataset.class_names, palette=dataset.palette, **overrides)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the released recipes: no weight decay on relative-position tables, absolute
    position embeddings and every parameter whose name contains ``norm``; decay on everything else (mmcv's
    ``paramwise_cfg`` custom keys, matched on the full parameter name)."""
    no_decay_keys = ("relative_position_bias_table", "absolute_pos_embed", "norm")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): poly decay, scaled by a linear warm-up.

    Poly: ``(lr - min_lr) * (1 - step / iters) ** power + min_lr``; during the first ``warmup_iters`` steps it is
    multiplied by ``1 - (1 - step / warmup_iters) * (1 - warmup_ratio)`` (mmcv's linear warm-up).
    """
    o, s = config.optim, config.schedule
    lr = (o.lr - s.min_lr) * (1 - step / s.iters) ** s.power + s.min_lr
    if step < s.warmup_iters:
        lr *= 1 - (1 - step / s.warmup_iters) * (1 - s.warmup_ratio)
    return lr


def build_model(config: TrainConfig, given: Optional[nn.Module], train_set: SegmentationDataset,
                val_set: SegmentationDataset, info: distributed.DistInfo) -> nn.Module:
    """The network to train (``given`` or the one ``config.model`` names), on the process's device, checked against
    the data (classes, ignore index, class weights).

    Raises:
        ConfigError: settings that do not fit the data or each other (``model.sync_bn`` on CPU processes,
            ``model.pretrained`` with a given model).
    """
    device = info.device
    sync_bn = config.model.sync_bn if config.model.sync_bn is not None else (info.distributed and device.type == "cuda")
    if sync_bn and device.type != "cuda" and info.distributed:
        raise ConfigError("model.sync_bn=true needs CUDA processes (SyncBatchNorm has no CPU/gloo kernel); "
                          "set model.sync_bn=false for CPU training")
    if given is not None and config.model.pretrained:
        raise ConfigError("model.pretrained loads ImageNet Swin weights into the configured model; it cannot be "
                          "used with a model passed to train(model=...): load its weights yourself")
    model = (given if given is not None else model_from_config(config, train_set, sync_bn=sync_bn)).to(device)
    check_classes(model, train_set)
    check_classes(model, val_set)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ignore = config.data.train_pipeline.ignore_index  # the one ignore index: pipeline, loss and metric
    for split in (train_set, val_set):
        if getattr(split, "ignore_index", ignore) != ignore:
            raise ConfigError(f"data.train_pipeline.ignore_index={ignore} differs from the ignore label "
                              f"{split.ignore_index} of {split!r}: the padding would be trained as a class")
    if model.num_classes > ignore:
        raise ConfigError(f"the model predicts {model.num_classes} classes but label {ignore} is the ignore index: "
                          f"class {ignore} would never be trained or scored")
    if config.loss.class_weight is not None and len(config.loss.class_weight) != model.num_classes:
        raise ConfigError(f"loss.class_weight has {len(config.loss.class_weight)} values but the model predicts "
                          f"{model.num_classes} classes ({', '.join(train_set.class_names[:12])} ...)")
    return model


def build_optimizer(config: TrainConfig, module: nn.Module, device: torch.device,
                    dtype: Optional[torch.dtype]) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW over the recipe's parameter groups, and the gradient scaler (enabled for fp16 only)."""
    optimizer = torch.optim.AdamW(param_groups(module, config.optim.weight_decay), lr=config.optim.lr,
                                  betas=config.optim.betas, eps=config.optim.eps, fused=device.type == "cuda")
    return optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
