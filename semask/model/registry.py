"""Named SeMask FPN variants and a flat registry (arXiv 2112.12782).

    model = semask.create_model("semask_tiny_fpn", num_classes=150)
    semask.list_models("semask_*")

Every variant is a `ModelConfig`; `create_model` applies keyword overrides to it (unknown keys are an
error) and builds the model. The plain-Swin FPN baselines of the paper are the same backbone without
semantic layers and the same decoder without the prior branch.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Optional, Sequence

import torch.nn as nn

from semask.model.config import ModelConfig, check_class_metadata
from semask.model.decoder import SemanticFPNHead
from semask.errors import UnknownNameError, UsageError, UsageTypeError
from semask.model.segmentor import SeMaskFPN
from semask.model.swin import SeMaskSwin

__all__ = [
    "create_model",
    "build_model",
    "list_models",
    "model_config",
    "variant_size",
]


_SWIN = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
    # sized for CPU training on the built-in toy data; global semantic attention in stages 3-4 as in SeMask-T
    "toy": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.1,
                decoder_channels=64, semantic_global_stages=(2, 3), num_classes=11),  # the toy set's 11 classes
}

_REGISTRY: dict[str, ModelConfig] = {}
for _size, _arch in _SWIN.items():
    _REGISTRY[f"semask_{_size}_fpn"] = ModelConfig(**_arch)
    _REGISTRY[f"swin_{_size}_fpn"] = ModelConfig(**{**_arch, "semantic": False, "semantic_global_stages": None})


def variant_size(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int]) -> Optional[str]:
    """The registered size (``"tiny"``, ..., ``"toy"``) with this Swin architecture, or None."""
    for size, arch in _SWIN.items():
        if (arch["embed_dim"], tuple(arch["depths"]), tuple(arch["num_heads"])) == (
                embed_dim, tuple(depths), tuple(num_heads)):
            return size
    return None


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (e.g. ``"semask_*"``), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a registered variant with overrides applied.

    Raises:
        UnknownNameError (a KeyError): unknown model name (the message lists the valid ones).
        UsageTypeError (a TypeError): an override that is not a `ModelConfig` field, or of the wrong type.
        UsageError (a ValueError): an override out of range.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownNameError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageTypeError(f"unknown option(s) {unknown} for {name!r}; valid options: {', '.join(sorted(fields))}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(_REGISTRY[name], **overrides)


def build_model(config: ModelConfig, name: str = "semask", class_names: Optional[Sequence[str]] = None,
                palette: Optional[Sequence[Sequence[int]]] = None) -> SeMaskFPN:
    """Build a segmentor from a `ModelConfig` in one step: weights freshly initialised, the config, the name,
    the class names and the palette set by the constructor.

    Args:
        config: the architecture.
        name: registry-style name kept with the model (checkpoints, reports).
        class_names, palette: dataset metadata (see `check_class_metadata`).

    Returns:
        A `SeMaskFPN` in training mode.
    """
    if not isinstance(config, ModelConfig):
        raise UsageTypeError(f"build_model: expected a ModelConfig, got {type(config).__name__}")
    class_names, palette = check_class_metadata(config.num_classes, class_names, palette)
    backbone = SeMaskSwin(
        embed_dim=config.embed_dim, depths=config.depths, num_heads=config.num_heads,
        window_size=config.window_size,
        num_classes=(config.backbone_classes or config.num_classes) if config.semantic else None,
        semantic_global_stages=config.resolved_global_stages(), num_sem_blocks=config.num_sem_blocks,
        mlp_ratio=config.mlp_ratio, drop_path_rate=config.drop_path_rate, semantic_drop=config.semantic_drop)
    head = SemanticFPNHead(
        backbone.out_channels, backbone.strides, num_classes=config.num_classes,
        channels=config.decoder_channels, dropout=config.decoder_dropout, prior_branch=config.semantic,
        norm_layer=nn.SyncBatchNorm if config.sync_bn else nn.BatchNorm2d)
    model = SeMaskFPN(backbone, head, name=name, class_names=class_names, palette=palette, config=config)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def create_model(name: str, num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                 palette: Optional[Sequence[Sequence[int]]] = None, **overrides: Any) -> SeMaskFPN:
    """Build a registered model.

    Args:
        name: a name from `list_models()`, e.g. ``"semask_tiny_fpn"`` or ``"swin_tiny_fpn"``.
        num_classes: decoder (and, unless `backbone_classes` is given, semantic-layer) classes; defaults to
            ``len(class_names)`` when class names are given.
        class_names, palette: dataset metadata the model carries (into checkpoints and visualisations).
        **overrides: any other `ModelConfig` field, e.g. ``drop_path_rate=0.2`` or ``grad_checkpointing=True``.

    Returns:
        A `SeMaskFPN` in training mode with freshly initialised weights.

    Raises:
        UnknownNameError, UsageTypeError, UsageError: see `model_config` and `check_class_metadata`.
    """
    if class_names is not None and num_classes is None and isinstance(class_names, Sequence):
        num_classes = len(class_names)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return build_model(model_config(name, **overrides), name=name, class_names=class_names, palette=palette)
