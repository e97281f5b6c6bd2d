"""The architecture of a SeMask FPN model as a typed config (arXiv 2112.12782), checked where it is made.

`ModelConfig` holds every architectural choice; `released_global_stages` is the rule of the released
checkpoints for which stages attend globally; `check_class_metadata` checks class names and a palette against
a class count.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from semask.errors import UsageError, UsageTypeError

__all__ = ["ModelConfig", "released_global_stages", "check_class_metadata"]


def _int_field(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageTypeError(f"ModelConfig.{name}: expected an int >= {minimum}, got {value!r} "
                             f"({type(value).__name__})")
    if value < minimum:
        raise UsageError(f"ModelConfig.{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _ints_field(name: str, value: Any, minimum: int = 1, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise UsageTypeError(f"ModelConfig.{name}: expected a tuple of ints, got {value!r} ({type(value).__name__})")
    if not value and not allow_empty:
        raise UsageError(f"ModelConfig.{name}: expected at least one value, got {tuple(value)!r}")
    return tuple(_int_field(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))


def _float_field(name: str, value: Any, low: float, high: float, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageTypeError(f"ModelConfig.{name}: expected a number, got {value!r} ({type(value).__name__})")
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise UsageError(f"ModelConfig.{name}: expected a number in {interval}, got {value!r}")
    return float(value)


def _bool_field(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageTypeError(f"ModelConfig.{name}: expected True or False, got {value!r} ({type(value).__name__})")
    return value


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

    def __post_init__(self) -> None:
        """Check every field's type and range where the config is made (lists become tuples).

        Raises:
            UsageTypeError: a field of the wrong type (``num_classes=2.5``, ``window_size="7"``).
            UsageError: a value out of range (``window_size=0``, ``drop_path_rate=1.5``) or fields that do
                not fit together (depths and num_heads of different lengths, a stage width not divisible by
                its heads, a global stage that does not exist).
        """
        for name in ("embed_dim", "window_size", "num_classes", "num_sem_blocks", "decoder_channels"):
            setattr(self, name, _int_field(name, getattr(self, name)))
        if self.backbone_classes is not None:
            self.backbone_classes = _int_field("backbone_classes", self.backbone_classes)
        self.depths = _ints_field("depths", self.depths)
        self.num_heads = _ints_field("num_heads", self.num_heads)
        if len(self.depths) != len(self.num_heads):
            raise UsageError(f"ModelConfig: depths {self.depths} and num_heads {self.num_heads} differ in length")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise UsageError(f"ModelConfig: stage {i} has {self.embed_dim * 2 ** i} channels (embed_dim "
                                 f"{self.embed_dim} x 2^{i}), not divisible by its {heads} heads")
        if self.semantic_global_stages is not None:
            self.semantic_global_stages = _ints_field("semantic_global_stages", self.semantic_global_stages,
                                                      minimum=0, allow_empty=True)
            bad = [s for s in self.semantic_global_stages if s >= len(self.depths)]
            if bad:
                raise UsageError(f"ModelConfig.semantic_global_stages: stages {bad} do not exist (the backbone "
                                 f"has stages 0..{len(self.depths) - 1})")
        self.mlp_ratio = _float_field("mlp_ratio", self.mlp_ratio, 0.0, float("inf"), high_open=True)
        if self.mlp_ratio <= 0 or int(self.embed_dim * self.mlp_ratio) < 1:
            raise UsageError(f"ModelConfig.mlp_ratio: expected a positive number, got {self.mlp_ratio}")
        self.drop_path_rate = _float_field("drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        self.semantic_drop = _float_field("semantic_drop", self.semantic_drop, 0.0, 1.0, high_open=True)
        self.decoder_dropout = _float_field("decoder_dropout", self.decoder_dropout, 0.0, 1.0, high_open=True)
        for name in ("semantic", "sync_bn", "grad_checkpointing"):
            _bool_field(name, getattr(self, name))

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
    windowed everywhere (docs/recipes.md §2). The parameters are the same either way, so a checkpoint cannot tell.
    """
    return (2, 3) if embed_dim in (96, 192) and backbone_classes > 19 else ()


def check_class_metadata(num_classes: int, class_names: Optional[Sequence[str]],
                         palette: Optional[Sequence[Sequence[int]]], source: str = "") -> tuple[
                             Optional[tuple[str, ...]], Optional[list[list[int]]]]:
    """Check class names and a palette against a class count; return them as a tuple of str / [r, g, b] lists.

    Args:
        num_classes: the model's classes.
        class_names: one name per class, or None.
        palette: at least one ``[r, g, b]`` (0..255 ints) per class, or None. (Released checkpoints may carry
            a longer palette; colours beyond `num_classes` are kept but never used.)
        source: prefix for error messages (e.g. the checkpoint's name).

    Raises:
        UsageError / UsageTypeError: names or colours that do not fit.
    """
    prefix = f"{source}: " if source else ""
    names = None
    if class_names is not None:
        if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
            raise UsageTypeError(f"{prefix}class_names must be a sequence of str, got {type(class_names).__name__}")
        if not all(isinstance(n, str) for n in class_names):
            raise UsageTypeError(f"{prefix}class_names must all be str, got "
                                 f"{sorted({type(n).__name__ for n in class_names})}")
        if len(class_names) != num_classes:
            raise UsageError(f"{prefix}{len(class_names)} class names given for num_classes={num_classes}")
        names = tuple(class_names)
    colours = None
    if palette is not None:
        try:
            colours = [[int(v) for v in c] for c in palette]
            well_formed = all(len(c) == 3 and all(float(v) == int(v) for v in raw) for c, raw in zip(colours, palette))
        except (TypeError, ValueError, OverflowError):
            well_formed = False
        if not well_formed or isinstance(palette, (str, bytes)):
            raise UsageTypeError(f"{prefix}palette must be a sequence of [r, g, b] integer triples, got "
                                 f"{str(palette)[:80]}")
        if len(colours) < num_classes:
            raise UsageError(f"{prefix}palette has {len(colours)} colours for {num_classes} classes")
        if any(not 0 <= v <= 255 for c in colours for v in c):
            raise UsageError(f"{prefix}palette values must lie in 0..255")
    return names, colours
