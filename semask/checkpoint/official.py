"""The released SeMask FPN checkpoints (mmseg 0.x layout, arXiv 2112.12782): reading them, and the architecture
their tensor shapes show.

An official file holds its weights under ``state_dict``, ``model`` or bare, with optional ``module.`` prefixes,
and ``meta`` with ``CLASSES`` and ``PALETTE``; it has no description of the architecture, so
`infer_model_config` reads it from the shapes (see docs/design.md, "Checkpoints", for how one odd tensor is
kept from changing it). `to_official_checkpoint` writes a model in that layout.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
from collections import Counter
from typing import Any, Callable, Mapping, Optional

import torch

from semask.checkpoint.checks import check_config_limits, check_limit, check_tensors
from semask.checkpoint.errors import CheckpointError, CheckpointLimitError
from semask.errors import UsageError
from semask.model.config import ModelConfig, released_global_stages
from semask.model.registry import list_models, model_config, variant_size
from semask.model.segmentor import SeMaskFPN

__all__ = [
    "REQUIRED_KEYS",
    "is_segmentor_state_dict",
    "unwrap_checkpoint",
    "strip_prefix",
    "infer_model_config",
    "check_metadata",
    "read_official",
    "to_official_checkpoint",
]

Votes = list[tuple[str, Any]]  # (key of the tensor that shows a number, the number)

# Every SeMask/Swin FPN state dict has these (without them it is some other network, e.g. ImageNet Swin).
REQUIRED_KEYS = ("backbone.patch_embed.proj.weight", "decode_head.conv_seg.weight")
_SEMANTIC_KEY = re.compile(
    r"backbone\.layers\.(\d+)\.semantic_layer\.class_injection\.(\d+)\.(mlp_cls_[qk])\.(weight|bias)$")
_TOWER_KEY = re.compile(r"decode_head\.scale_heads\.\d+\.\d+\.(conv\.weight|bn\.weight)$")


def is_segmentor_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether `sd` (without prefixes) has the keys of a SeMask/Swin FPN state dict."""
    return all(k in sd for k in REQUIRED_KEYS)


def unwrap_checkpoint(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Find the weights (under ``state_dict``, ``model`` or bare) and the ``meta`` dict inside a loaded checkpoint.

    Raises:
        CheckpointError: not a dict, or no tensors in it.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    return sd, dict(meta)


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`sd` without `prefix` on its keys when every key has it (a DDP ``module.``), else `sd` unchanged."""
    if all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------------------------- inference
def _layer_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _count(indices: list[int], what: str, limit_name: str, source: str) -> int:
    """len(indices), checked to be at most ``LIMITS.<limit_name>`` and numbered 0..n-1."""
    check_limit(len(indices), limit_name, f"{source}: the file has {len(indices)} {what}")
    if indices != list(range(len(indices))):
        present = set(indices)
        gaps = [i for i in range(len(indices) + 1) if i not in present][:5]
        raise CheckpointError(f"{source}: {what} are numbered {indices[:12]}; expected 0..{len(indices) - 1} "
                              f"(missing {gaps})")
    return len(indices)


def _vote(votes: Votes, what: str, source: str, valid: Optional[Callable[[Any], bool]] = None) -> Any:
    """The value most tensors agree on, or an error naming `what`.

    Values failing `valid` (a predicate) lose to any that pass; among equally common ones the earliest wins.
    """
    if valid is not None and any(valid(v) for _, v in votes):
        votes = [(k, v) for k, v in votes if valid(v)]
    if not votes:
        raise CheckpointError(f"{source}: cannot tell the {what}: no tensor of the file shows it")
    counts = Counter(value for _, value in votes)
    top = max(counts.values())
    return next(value for _, value in votes if counts[value] == top)


def _dims(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> Optional[tuple[int, ...]]:
    tensor = sd.get(key)
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) and tensor.ndim == ndim else None


def _block(i: int, j: int, rest: str) -> str:
    return f"backbone.layers.{i}.blocks.{j}.{rest}"


def _depths(sd: Mapping[str, torch.Tensor], source: str) -> list[int]:
    """Swin blocks per stage, from the numbered keys (within `LIMITS`, numbered without gaps)."""
    stages = _count(_layer_indices(sd, r"backbone\.layers\.(\d+)\."), "stages (backbone.layers.N)", "max_stages",
                    source)
    depths = [_count(_layer_indices(sd, rf"backbone\.layers\.{i}\.blocks\.(\d+)\."), f"blocks of stage {i}",
                     "max_depth", source) for i in range(stages)]
    if not stages or not all(depths):
        raise CheckpointError(f"{source}: every backbone stage needs Swin blocks; found {depths or 'no stages'}")
    return depths


def _embed_dim(sd: Mapping[str, torch.Tensor], depths: list[int], source: str) -> int:
    """Channels of stage 1, from the patch embedding and every norm (stage i has 2**i times as many)."""
    width: Votes = []
    for key, ndim in (("backbone.patch_embed.proj.weight", 4), ("backbone.patch_embed.proj.bias", 1),
                      ("backbone.patch_embed.norm.weight", 1)):
        if (dims := _dims(sd, key, ndim)) is not None:
            width.append((key, dims[0]))
    for i, depth in enumerate(depths):
        for key in [f"backbone.norm{i}.weight"] + [_block(i, j, "norm1.weight") for j in range(depth)]:
            if (dims := _dims(sd, key, 1)) is not None and dims[0] % 2 ** i == 0:
                width.append((key, dims[0] // 2 ** i))
    return _vote(width, "embedding width", source)


def _attention(sd: Mapping[str, torch.Tensor], depths: list[int], embed_dim: int,
               source: str) -> tuple[int, list[int], float]:
    """(window size, heads per stage, MLP ratio), from every block's relative-position table and first MLP layer."""
    windows: Votes = []
    ratios: Votes = []
    heads = []
    for i, depth in enumerate(depths):
        stage_heads: Votes = []
        for j in range(depth):
            key = _block(i, j, "attn.relative_position_bias_table")
            if (dims := _dims(sd, key, 2)) is not None:
                side = math.isqrt(dims[0])  # the table has (2w-1)**2 rows
                if side * side == dims[0] and side % 2 == 1:
                    windows.append((key, (side + 1) // 2))
                stage_heads.append((key, dims[1]))
            key = _block(i, j, "mlp.fc1.weight")
            if (dims := _dims(sd, key, 2)) is not None:
                ratios.append((key, dims[0] / (embed_dim * 2 ** i)))
        heads.append(_vote(stage_heads, f"attention heads of stage {i}", source,
                           valid=lambda h, dim=embed_dim * 2 ** i: h > 0 and dim % h == 0))
    window = _vote(windows, "window size (relative_position_bias_table)", source)
    return window, heads, _vote(ratios, "MLP ratio (mlp.fc1)", source)


def _decoder(sd: Mapping[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(classes, channels) of the Semantic-FPN decoder, from its classifier and its towers."""
    classes = [(k, d[0]) for k, n in (("decode_head.conv_seg.weight", 4), ("decode_head.conv_seg.bias", 1))
               if (d := _dims(sd, k, n)) is not None]
    num_classes = _vote(classes, "number of classes (decode_head.conv_seg)", source)
    channels = [("decode_head.conv_seg.weight", d[1])] if (d := _dims(sd, "decode_head.conv_seg.weight", 4)) else []
    channels += [(k, v.shape[0]) for k, v in sd.items() if _TOWER_KEY.match(k) and v.ndim >= 1]
    return num_classes, _vote(channels, "decoder width (decode_head.conv_seg)", source)


def _semantic(sd: Mapping[str, torch.Tensor], source: str) -> tuple[Optional[int], int]:
    """(classes, blocks per layer) of the semantic layers; (None, 1) for a plain Swin backbone."""
    sem_classes: Votes = []
    sem_blocks: dict[int, set[int]] = {}
    for k, v in sd.items():
        if (m := _SEMANTIC_KEY.match(k)) and v.ndim >= 1:
            sem_classes.append((k, v.shape[0]))
            sem_blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not sem_classes:
        return None, 1
    return (_vote(sem_classes, "semantic-layer classes (mlp_cls_q)", source),
            _vote([(str(i), len(b)) for i, b in sorted(sem_blocks.items())], "semantic blocks", source))


def infer_model_config(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[str, ModelConfig]:
    """Infer the architecture of a SeMask FPN / Swin FPN state dict from its tensor shapes.

    Each number is read from every tensor that shows it and the value most of them agree on wins, so a single
    wrong-shaped tensor cannot change the inferred architecture: loading then reports that tensor, and only it,
    as mis-shaped.

    Args:
        sd: weights with `backbone.` / `decode_head.` prefixes.
        source: name used in error messages.

    Returns:
        (registry-style name, `ModelConfig`). Whether stages 3-4 use global semantic attention cannot be
        seen in the weights: a registered size keeps its registry entry's choice (for the released sizes,
        the released models' rule `released_global_stages`), any other size follows that rule.

    Raises:
        CheckpointError: not a SeMask/Swin FPN state dict, or numbers that make no architecture.
        CheckpointLimitError: an architecture beyond `LIMITS`.
    """
    absent = [k for k in REQUIRED_KEYS if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not a SeMask/Swin FPN checkpoint; missing {absent}. "
                              f"First keys found: {sorted(sd)[:8]}")
    depths = _depths(sd, source)
    embed_dim = _embed_dim(sd, depths, source)
    window, heads, mlp_ratio = _attention(sd, depths, embed_dim, source)
    num_classes, decoder_channels = _decoder(sd, source)
    backbone_classes, num_sem_blocks = _semantic(sd, source)
    semantic = backbone_classes is not None
    numbers = dict(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=window,
                   num_classes=num_classes, num_sem_blocks=num_sem_blocks, mlp_ratio=mlp_ratio,
                   decoder_channels=decoder_channels)
    check_config_limits(types.SimpleNamespace(**numbers, backbone_classes=backbone_classes),
                        f"{source}: the weights claim")
    try:
        config = ModelConfig(**numbers, semantic=semantic,
                             backbone_classes=backbone_classes if backbone_classes != num_classes else None)
    except UsageError as exc:
        raise CheckpointError(f"{source}: the tensor shapes make no valid architecture: {exc}") from exc
    size = variant_size(embed_dim, depths, heads)
    name = f"{'semask' if semantic else 'swin'}_{size or 'custom'}_fpn"
    if semantic:
        global_stages = (model_config(name, num_classes=num_classes, backbone_classes=config.backbone_classes)
                         .resolved_global_stages() if size else released_global_stages(embed_dim, backbone_classes))
        config = dataclasses.replace(config, semantic_global_stages=global_stages)
    return name, config


# ----------------------------------------------------------------------------------------------- metadata
# The config fields the tensors show (everything else -- dropout, global stages, sync BN -- they cannot contradict).
_SHOWN_FIELDS = ("semantic", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "num_classes",
                 "backbone_classes", "num_sem_blocks", "decoder_channels")
_VARIANT_FIELDS = ("embed_dim", "depths", "num_heads")
_NAME = re.compile(r"(semask|swin)_(\w+)_fpn")


def _shown(config: ModelConfig, field: str) -> Any:
    """The value of `field` that the tensors of a model built from `config` show."""
    if field in ("backbone_classes", "num_sem_blocks") and not config.semantic:
        return None  # a plain-Swin backbone has no semantic layers
    if field == "backbone_classes":
        return config.backbone_classes or config.num_classes
    if field == "mlp_ratio":
        return round(float(config.mlp_ratio), 6)
    return getattr(config, field)


def _name_contradicts(name: str, shown_name: str) -> bool:
    """Whether a registry-style `name` (``semask_tiny_fpn``) names another model than the tensors show.

    Any other name is a free label (``build_model``'s default is ``"semask"``); an unregistered size
    (``semask_huge_fpn``) may label any unregistered architecture of its family.
    """
    match = _NAME.fullmatch(name)
    if match is None or name == shown_name:
        return False
    registered = set(list_models())
    return match.group(1) != shown_name.split("_")[0] or name in registered or shown_name in registered


def check_metadata(name: str, config: ModelConfig, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse metadata (the model name and config of semask's own files) that its tensors contradict.

    The architecture is read from the tensors (`infer_model_config`) and compared with every field the tensors
    show (`_SHOWN_FIELDS`), and a registry-style name with the variant the tensors are: a file whose metadata says
    ``semask_tiny_fpn`` over the toy model's tensors must not load, or be described, as SeMask-T.

    Raises:
        CheckpointError: naming what the metadata says and what the tensors show.
        CheckpointLimitError: tensors that claim an architecture beyond `LIMITS`.
    """
    if not is_segmentor_state_dict(sd):
        return  # `check_architecture` lists the missing keys
    try:
        shown_name, shown = infer_model_config(sd, source)
    except CheckpointLimitError:
        raise
    except CheckpointError:
        return  # numbers that make no architecture: `check_architecture` names the tensors that do not fit
    claimed = {f: _shown(config, f) for f in _SHOWN_FIELDS}
    fields = [f for f in _SHOWN_FIELDS if claimed[f] != _shown(shown, f)]
    if _name_contradicts(name, shown_name):  # what the name says: its family, and a registered size's numbers
        claimed["semantic"] = name.startswith("semask_")
        if name in list_models():
            claimed.update({f: _shown(model_config(name), f) for f in _VARIANT_FIELDS})
        fields = [f for f in _SHOWN_FIELDS if f in fields or f in _VARIANT_FIELDS
                  or (f == "semantic" and claimed[f] != shown.semantic)]
    if fields:
        said = ", ".join(f"{f} {claimed[f]}" for f in fields)
        seen = ", ".join(f"{f} {_shown(shown, f)}" for f in fields)
        raise CheckpointError(f"{source}: its metadata says {name} ({said}) but the tensors are {shown_name}'s "
                              f"({seen}); the metadata contradicts the weights (the file was edited or damaged): "
                              "re-save it from the model it came from")


# ----------------------------------------------------------------------------------------------- the layout
def read_official(obj: Any, source: str) -> tuple[str, ModelConfig, dict[str, torch.Tensor], Any, Any]:
    """Name, config, weights, class names and palette of a loaded checkpoint in the released layout.

    Raises:
        CheckpointError: no tensors, entries that are not dense tensors, or shapes that make no architecture.
        CheckpointLimitError: an architecture beyond `LIMITS`.
    """
    sd, meta = unwrap_checkpoint(obj, source)
    sd = strip_prefix(sd, "module.")
    check_tensors(sd, source)
    name, config = infer_model_config(sd, source)
    return name, config, sd, meta.get("CLASSES"), meta.get("PALETTE")


def to_official_checkpoint(model: SeMaskFPN) -> dict:
    """The model in the released (mmseg 0.x) layout: ``{"state_dict": ..., "meta": {"CLASSES", "PALETTE"}}``."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": {"CLASSES": tuple(model.class_names) if model.class_names else None,
                     "PALETTE": model.palette}}
