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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch.nn as nn

from semask.decoder import SemanticFPNHead
from semask.segmentor import SeMaskFPN
from semask.swin import SeMaskSwin

__all__ = ["ModelConfig", "create_model", "build_model", "list_models", "model_config", "released_global_stages"]


@dataclass
class ModelConfig:
    """Architecture of a SeMask FPN (or plain-Swin FPN) model."""

    embed_dim: int = 96  # channels of stage 1; stage i has embed_dim * 2**i
    depths: tuple[int, ...] = (2, 2, 6, 2)  # Swin blocks per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads per stage
    window_size: int = 7  # Swin window (and semantic window) size
    num_classes: int = 150  # classes of the decoder
    backbone_classes: Optional[int] = None  # classes of the semantic layers; None = num_classes
    semantic: bool = True  # SeMask semantic layers + prior branch; False = the plain-Swin FPN baseline
    semantic_global_stages: Optional[tuple[int, ...]] = None  # stages with global semantic attention; None = released rule
    num_sem_blocks: int = 1  # semantic attention blocks per semantic layer
    mlp_ratio: float = 4.0  # hidden width of the Swin MLPs
    drop_path_rate: float = 0.3  # stochastic depth, rising linearly over all blocks
    semantic_drop: float = 0.1  # dropout after the semantic attention's projection
    decoder_channels: int = 256  # width of the Semantic-FPN towers
    decoder_dropout: float = 0.1  # Dropout2d before the classifier
    sync_bn: bool = False  # SyncBatchNorm in the decoder (multi-GPU recipes)
    grad_checkpointing: bool = False  # recompute backbone blocks in backward to save memory

    def resolved_global_stages(self) -> tuple[int, ...]:
        """The stages whose semantic layer attends over the whole feature map."""
        if not self.semantic:
            return ()
        if self.semantic_global_stages is not None:
            return tuple(self.semantic_global_stages)
        return released_global_stages(self.embed_dim, self.backbone_classes or self.num_classes)


def released_global_stages(embed_dim: int, backbone_classes: int) -> tuple[int, ...]:
    """Which stages of a released SeMask model use global (unwindowed) semantic attention.

    In the released tiny, small and large models trained on ADE20K and COCO-Stuff (embed dim 96 or 192,
    more than 19 classes) stages 3 and 4 attend over the whole map; base and every Cityscapes model are
    windowed everywhere (SPEC §2). The parameters are the same either way, so a checkpoint cannot tell.
    """
    return (2, 3) if embed_dim in (96, 192) and backbone_classes > 19 else ()


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


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (e.g. ``"semask_*"``), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a registered variant with overrides applied.

    Raises:
        KeyError: unknown model name (the message lists the valid ones).
        TypeError: an override that is not a `ModelConfig` field.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {name!r}; valid options: {', '.join(sorted(fields))}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(_REGISTRY[name], **overrides)


def build_model(config: ModelConfig, name: str = "semask") -> SeMaskFPN:
    """Build a segmentor from a `ModelConfig`."""
    if config.num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {config.num_classes}")
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
    model = SeMaskFPN(backbone, head, name=name)
    model.config = config
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
    """
    if class_names is not None:
        if num_classes is None:
            num_classes = len(class_names)
        elif len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
    if palette is not None and num_classes is not None and len(palette) != num_classes:
        raise ValueError(f"palette has {len(palette)} colours for {num_classes} classes")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = build_model(model_config(name, **overrides), name=name)
    model.class_names = tuple(class_names) if class_names is not None else None
    model.palette = [list(map(int, c)) for c in palette] if palette is not None else None
    return model
