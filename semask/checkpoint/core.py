"""Checkpoints: the released SeMask FPN files, ImageNet Swin weights, and semask's own (arXiv 2112.12782).

- `load_checkpoint(path)` reads an official SeMask FPN checkpoint (mmseg 0.x: weights under `state_dict`,
  `model` or bare, optional `module.` prefixes, `meta` with `CLASSES` and `PALETTE`) or one written by
  `save_checkpoint`, infers the architecture from the tensor shapes, and returns a ready model that carries
  its class names and palette. Any missing, unexpected or mis-shaped key is an error that lists them.
- `load_pretrained_backbone(model, path)` loads ImageNet Swin weights (Microsoft's release or timm's
  layout), resizing relative-position tables bicubically when the window differs, and reports what it did.
- `save_checkpoint` / `load_training_state` write and restore the project's own checkpoints atomically,
  with the resolved config and, for training, the optimizer/scheduler/scaler/iteration/RNG states.

- `.safetensors` files (semask's own, with the config, classes and palette as JSON strings in the metadata,
  or bare state dicts in the official or ImageNet key layouts) are read and written with `safetensors`;
  `convert_to_safetensors` converts a `.pth`.
- Wherever a file is read, an ``https://`` (or ``http://``, ``file://``) URL may stand for it: it is downloaded
  once into torch.hub's cache (``torch.hub.get_dir()/checkpoints``) with a progress bar, and checked against
  an optional SHA-256.

Every `.pth` file is read with `torch.load(..., weights_only=True)` and `.safetensors` files never touch
pickle: no code from a checkpoint is ever executed. Before anything is built, the architecture a file claims is
checked against `LIMITS` (class counts, depths, widths, parameters: a few-kilobyte file with stride-0 tensors
can claim millions of classes) and against the file's own tensor shapes on the `meta` device; each
architectural number is read from every tensor that shows it and the majority wins, so one odd tensor is
reported as the odd one. NaN or infinite weights are an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import urllib.error
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.errors import LimitError, NonFiniteError, SemaskError, UsageError
from semask.model.config import ModelConfig, check_class_metadata, released_global_stages
from semask.model.registry import build_model, model_config, variant_size
from semask.model.segmentor import ExternalSegmentor, SeMaskFPN
from semask.device import check_device
from semask.io import atomic_path

__all__ = [
    "CheckpointError",
    "CheckpointLimitError",
    "CheckpointNonFiniteError",
    "ArchitectureLimits",
    "LIMITS",
    "check_architecture",
    "check_tensors",
    "check_finite",
    "LoadReport",
    "read_checkpoint_file",
    "infer_model_config",
    "load_checkpoint",
    "load_model_weights",
    "to_official_checkpoint",
    "save_checkpoint",
    "load_training_state",
    "load_pretrained_backbone",
    "is_url",
    "download_checkpoint",
    "resolve_checkpoint_path",
    "read_safetensors_checkpoint",
    "save_safetensors",
    "convert_to_safetensors",
]

PathLike = Union[str, os.PathLike]
FORMAT = "semask-checkpoint-v1"
SAFETENSORS_SUFFIX = ".safetensors"
URL_SCHEMES = ("https://", "http://", "file://")


class CheckpointError(SemaskError, ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what is wrong."""


class CheckpointLimitError(CheckpointError, LimitError):
    """A checkpoint that claims an architecture beyond `LIMITS` (the message says how to raise the limit)."""


class CheckpointNonFiniteError(CheckpointError, NonFiniteError):
    """A checkpoint with NaN or infinite weights (the message names the tensors)."""


@dataclass
class ArchitectureLimits:
    """Upper bounds on the architecture a checkpoint may claim, checked before anything is allocated.

    The released models stay far below them (SeMask-L: 211M parameters, 171 classes, 18 blocks, width 192).
    For a trusted file beyond them raise the field, e.g. ``semask.checkpoint.LIMITS.max_classes = 50_000``.
    """

    max_classes: int = 10_000  # decoder and semantic-layer classes
    max_stages: int = 8  # backbone stages
    max_depth: int = 64  # Swin blocks per stage
    max_embed_dim: int = 1024  # channels of stage 1
    max_heads: int = 128  # attention heads per stage
    max_window: int = 64  # Swin window size
    max_mlp_ratio: float = 16.0  # MLP hidden width / channels
    max_sem_blocks: int = 16  # semantic attention blocks per semantic layer
    max_decoder_channels: int = 4096  # width of the Semantic-FPN towers
    max_parameters: int = 2_000_000_000  # parameters of the whole model


LIMITS = ArchitectureLimits()


def _check_limits(values: Sequence[tuple[str, float, str]], claim: str) -> None:
    """Refuse the first ``(what, value, limit_name)`` whose value is above ``LIMITS.<limit_name>``.

    Raises:
        CheckpointLimitError: ``"<claim> <what> = <value>, above semask.checkpoint.LIMITS.<limit_name> = ..."``.
    """
    for what, value, limit_name in values:
        limit = getattr(LIMITS, limit_name)
        if value > limit:
            raise CheckpointLimitError(f"{claim} {what} = {value:,}, above semask.checkpoint.LIMITS.{limit_name} = "
                                       f"{limit:,} (nothing was built); raise that limit only if the file is trusted")


# ----------------------------------------------------------------------------------------------- reading
def read_checkpoint_file(path: PathLike, map_location: Any = "cpu", sha256: Optional[str] = None) -> Any:
    """`torch.load` with `weights_only=True` and errors that name the file.

    A URL is downloaded first (`resolve_checkpoint_path`, checked against `sha256` when given); a
    `.safetensors` file is read with `read_safetensors_checkpoint` instead of `torch.load`.
    """
    path = resolve_checkpoint_path(path, sha256=sha256)
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors_checkpoint(path, map_location)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist" if not path.exists()
                                else f"checkpoint {str(path)!r} is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # re-raised with the file named and the safe-loading policy explained
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} safely (torch.load weights_only=True): {exc}. "
            "semask only loads tensors and plain Python containers; if the file holds other objects, "
            "re-save its state_dict from a trusted environment.") from exc


def _unwrap(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Find the weights and the metadata inside a loaded checkpoint object."""
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


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _layer_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _contiguous(indices: list[int], what: str, limit: int, limit_name: str, source: str) -> int:
    """len(indices), checked to be at most `limit` and numbered 0..n-1."""
    if len(indices) > limit:
        raise CheckpointLimitError(f"{source}: the file has {len(indices)} {what}, above "
                                   f"semask.checkpoint.LIMITS.{limit_name} = {limit}; raise that limit only if "
                                   "the file is trusted")
    if indices != list(range(len(indices))):
        present = set(indices)
        gaps = [i for i in range(len(indices) + 1) if i not in present][:5]
        raise CheckpointError(f"{source}: {what} are numbered {indices[:12]}; expected 0..{len(indices) - 1} "
                              f"(missing {gaps})")
    return len(indices)


def _vote(votes: list[tuple[str, Any]], what: str, source: str, valid: Any = None) -> Any:
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


def infer_model_config(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[str, ModelConfig]:
    """Infer the architecture of a SeMask FPN / Swin FPN state dict from its tensor shapes.

    Each number is read from every tensor that shows it (the width from the patch embedding and every norm,
    the window and heads from every block's relative-position table, the class counts from every semantic
    layer and the classifier, ...) and the value most of them agree on wins, so a single wrong-shaped tensor
    cannot change the inferred architecture: loading then reports that tensor, and only it, as mis-shaped.

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
    need = ["backbone.patch_embed.proj.weight", "decode_head.conv_seg.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not a SeMask/Swin FPN checkpoint; missing {absent}. "
                              f"First keys found: {sorted(sd)[:8]}")
    stages = _contiguous(_layer_indices(sd, r"backbone\.layers\.(\d+)\."), "stages (backbone.layers.N)",
                         LIMITS.max_stages, "max_stages", source)
    depths = [_contiguous(_layer_indices(sd, rf"backbone\.layers\.{i}\.blocks\.(\d+)\."),
                          f"blocks of stage {i}", LIMITS.max_depth, "max_depth", source) for i in range(stages)]
    if not stages or not all(depths):
        raise CheckpointError(f"{source}: every backbone stage needs Swin blocks; found {depths or 'no stages'}")

    def block(i: int, j: int, rest: str) -> str:
        return f"backbone.layers.{i}.blocks.{j}.{rest}"

    width: list[tuple[str, Any]] = []  # channels of stage 1
    for key, ndim in (("backbone.patch_embed.proj.weight", 4), ("backbone.patch_embed.proj.bias", 1),
                      ("backbone.patch_embed.norm.weight", 1)):
        if (dims := _dims(sd, key, ndim)) is not None:
            width.append((key, dims[0]))
    for i in range(stages):
        for key in [f"backbone.norm{i}.weight"] + [block(i, j, "norm1.weight") for j in range(depths[i])]:
            if (dims := _dims(sd, key, 1)) is not None and dims[0] % 2 ** i == 0:
                width.append((key, dims[0] // 2 ** i))
    embed_dim = _vote(width, "embedding width", source)
    windows, heads, ratios = [], [], []
    for i in range(stages):
        stage_heads = []
        for j in range(depths[i]):
            key = block(i, j, "attn.relative_position_bias_table")
            if (dims := _dims(sd, key, 2)) is not None:
                side = math.isqrt(dims[0])
                if side * side == dims[0] and side % 2 == 1:
                    windows.append((key, (side + 1) // 2))
                stage_heads.append((key, dims[1]))
            key = block(i, j, "mlp.fc1.weight")
            if (dims := _dims(sd, key, 2)) is not None:
                ratios.append((key, dims[0] / (embed_dim * 2 ** i)))
        heads.append(_vote(stage_heads, f"attention heads of stage {i}", source,
                           valid=lambda h, dim=embed_dim * 2 ** i: h > 0 and dim % h == 0))
    window = _vote(windows, "window size (relative_position_bias_table)", source)
    mlp_ratio = _vote(ratios, "MLP ratio (mlp.fc1)", source)
    classes = [(k, d[0]) for k, n in (("decode_head.conv_seg.weight", 4), ("decode_head.conv_seg.bias", 1))
               if (d := _dims(sd, k, n)) is not None]
    num_classes = _vote(classes, "number of classes (decode_head.conv_seg)", source)
    channels = [("decode_head.conv_seg.weight", d[1])] if (d := _dims(sd, "decode_head.conv_seg.weight", 4)) else []
    channels += [(k, v.shape[0]) for k, v in sd.items()
                 if re.match(r"decode_head\.scale_heads\.\d+\.\d+\.(conv\.weight|bn\.weight)$", k) and v.ndim >= 1]
    decoder_channels = _vote(channels, "decoder width (decode_head.conv_seg)", source)
    rx_sem = re.compile(r"backbone\.layers\.(\d+)\.semantic_layer\.class_injection\.(\d+)\.(mlp_cls_[qk])\.(weight|bias)$")
    sem_classes, sem_blocks = [], {}
    for k, v in sd.items():
        if (m := rx_sem.match(k)) and v.ndim >= 1:
            sem_classes.append((k, v.shape[0]))
            sem_blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    semantic = bool(sem_classes)
    backbone_classes = _vote(sem_classes, "semantic-layer classes (mlp_cls_q)", source) if semantic else None
    num_sem_blocks = _vote([(str(i), len(b)) for i, b in sorted(sem_blocks.items())], "semantic blocks",
                           source) if semantic else 1
    _check_limits([("num_classes", num_classes, "max_classes"),
                   ("backbone_classes", backbone_classes or 0, "max_classes"),
                   ("embed_dim", embed_dim, "max_embed_dim"),
                   ("num_heads", max(heads), "max_heads"),
                   ("window_size", window, "max_window"),
                   ("mlp_ratio", mlp_ratio, "max_mlp_ratio"),
                   ("num_sem_blocks", num_sem_blocks, "max_sem_blocks"),
                   ("decoder_channels", decoder_channels, "max_decoder_channels")], f"{source}: the weights claim")
    try:
        config = ModelConfig(
            embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=window,
            num_classes=num_classes, backbone_classes=backbone_classes if backbone_classes != num_classes else None,
            semantic=semantic, num_sem_blocks=num_sem_blocks, mlp_ratio=mlp_ratio, decoder_channels=decoder_channels)
    except UsageError as exc:
        raise CheckpointError(f"{source}: the tensor shapes make no valid architecture: {exc}") from exc
    # a registered size keeps that entry's semantic regions (for the released sizes: the released rule)
    size = variant_size(embed_dim, depths, heads)
    name = f"{'semask' if semantic else 'swin'}_{size or 'custom'}_fpn"
    if semantic:
        global_stages = (model_config(name, num_classes=num_classes, backbone_classes=config.backbone_classes)
                         .resolved_global_stages() if size else released_global_stages(embed_dim, backbone_classes))
        config = dataclasses.replace(config, semantic_global_stages=global_stages)
    return name, config


def check_tensors(sd: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Refuse state-dict entries that are not tensors, or tensors that claim more elements than they store.

    A stride-0 (expanded) tensor pickles as a few bytes whatever its shape: a crafted file can make a tiny
    classifier claim millions of classes. Real weights never have a zero stride.

    Raises:
        CheckpointError: listing the offending entries.
    """
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    bad += [f"{k} (shape {tuple(v.shape)}, strides {v.stride()}: an expanded, stride-0 tensor)"
            for k, v in sd.items() if isinstance(v, torch.Tensor) and v.layout == torch.strided
            and any(st == 0 and n > 1 for st, n in zip(v.stride(), v.shape))]
    bad += [f"{k} (layout {v.layout})" for k, v in sd.items() if isinstance(v, torch.Tensor) and v.layout != torch.strided]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not plain dense "
                              f"weight tensors: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")


def check_finite(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse floating-point tensors holding NaN or infinity.

    Raises:
        CheckpointNonFiniteError: naming every such tensor and how many values are affected.
    """
    bad = []
    for k, v in sd.items():
        if v.is_floating_point() or v.is_complex():
            count = int((~torch.isfinite(v)).sum())
            if count:
                bad.append(f"{k} ({count} of {v.numel()} values)")
    if bad:
        raise CheckpointNonFiniteError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values: "
                                       f"{', '.join(bad[:20])}{' ...' if len(bad) > 20 else ''}; the weights are "
                                       "corrupt (or a training run diverged before it was saved)")


def _mismatches(own: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor], source: str) -> Optional[str]:
    """The report of missing, unexpected and mis-shaped keys, or None when the names and shapes agree."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k])}"
                        for k in set(own) & set(sd) if tuple(own[k]) != tuple(sd[k].shape))
    if not (missing or unexpected or mismatched):
        return None
    parts = [f"{source} does not match the model ({len(own)} tensors expected, {len(sd)} found):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            shown = "\n    ".join(items[:30]) + (f"\n    ... and {len(items) - 30} more" if len(items) > 30 else "")
            parts.append(f"  {title} ({len(items)}):\n    {shown}")
    return "\n".join(parts)


def check_architecture(config: ModelConfig, sd: Mapping[str, torch.Tensor], name: str = "semask",
                       source: str = "checkpoint") -> None:
    """Build `config` on the ``meta`` device (no memory) and check it against `LIMITS` and the weights' shapes.

    Raises:
        CheckpointLimitError: more parameters than ``LIMITS.max_parameters``.
        CheckpointError: missing, unexpected or mis-shaped keys (all listed), before a real model is built.
    """
    with torch.device("meta"):
        skeleton = build_model(config, name=name)
    parameters = sum(p.numel() for p in skeleton.parameters())
    if parameters > LIMITS.max_parameters:
        raise CheckpointLimitError(f"{source}: the architecture it describes has {parameters:,} parameters, above "
                                   f"semask.checkpoint.LIMITS.max_parameters = {LIMITS.max_parameters:,} (nothing "
                                   "was built); raise that limit only if the file is trusted")
    report = _mismatches({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, sd, source)
    if report:
        raise CheckpointError(report)


# ----------------------------------------------------------------------------------------------- loading
def load_model_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a full state dict into `model`, or raise listing every missing, unexpected and mis-shaped key.

    Raises:
        CheckpointError: entries that are not dense tensors, names or shapes that differ, a non-standard
            relative-position index. CheckpointNonFiniteError: NaN or infinite weights (named).
    """
    check_tensors(sd, source)
    own = model.state_dict()
    report = _mismatches({k: tuple(v.shape) for k, v in own.items()}, sd, source)
    if report:
        raise CheckpointError(report)
    check_finite(sd, source)
    for k, v in sd.items():
        if k.endswith("relative_position_index") and not torch.equal(own[k], v.to(own[k].dtype)):
            raise CheckpointError(f"{source}: {k} differs from the standard Swin index layout")
    model.load_state_dict(sd, strict=True)


def load_checkpoint(path: PathLike, map_location: Any = "cpu",
                    semantic_global_stages: Optional[tuple[int, ...]] = None, *,
                    sha256: Optional[str] = None) -> SeMaskFPN:
    """Load an official SeMask FPN checkpoint or one of semask's own, and return the model in eval mode.

    Args:
        path: a `.pth` or `.safetensors` file, or an ``https://`` URL of one (downloaded once into torch.hub's
            cache, see `download_checkpoint`).
        map_location: device for the tensors (and the returned model).
        semantic_global_stages: override which stages use global semantic attention for an official file
            (by default the released models' rule; semask's own checkpoints store it).
        sha256: expected SHA-256 of the file (hex, or a prefix of at least 8 characters); checked for local
            files and downloads alike.

    Returns:
        A `SeMaskFPN` with `.class_names` and `.palette` from the checkpoint's metadata (None when absent).
    """
    source = f"checkpoint {str(path)!r}"
    if isinstance(map_location, (str, torch.device)):
        check_device(map_location)
    obj = read_checkpoint_file(path, map_location, sha256=sha256)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        name, config, sd = _own_format(obj, source)
        class_names, palette = obj.get("class_names"), obj.get("palette")
    else:
        sd, meta = _unwrap(obj, source)
        sd = _strip_prefix(sd, "module.")
        check_tensors(sd, source)
        name, config = infer_model_config(sd, source)
        class_names, palette = meta.get("CLASSES"), meta.get("PALETTE")
    if semantic_global_stages is not None:
        try:
            config = dataclasses.replace(config, semantic_global_stages=tuple(semantic_global_stages))
        except UsageError as exc:
            raise UsageError(f"semantic_global_stages for {source}: {exc}") from exc
    if isinstance(class_names, (list, tuple)) and len(class_names) != config.num_classes:
        raise CheckpointError(f"{source}: meta lists {len(class_names)} class names but the decoder has "
                              f"{config.num_classes} classes")
    try:
        class_names, palette = check_class_metadata(config.num_classes, class_names or None, palette, source)
    except UsageError as exc:
        raise CheckpointError(str(exc)) from exc
    check_architecture(config, sd, name, source)  # limits and shapes, before anything is allocated
    model = build_model(config, name=name, class_names=class_names, palette=palette)
    load_model_weights(model, sd, source)
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def _own_format(obj: Mapping[str, Any], source: str) -> tuple[str, ModelConfig, Mapping[str, torch.Tensor]]:
    """Name, config and weights of a checkpoint written by `save_checkpoint`, checked field by field."""
    missing = [k for k in ("model_name", "config", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{source}: a {FORMAT} file without {missing}; it is damaged or not from semask")
    name, raw, sd = obj["model_name"], obj["config"], obj["state_dict"]
    if raw is None and isinstance(name, str):
        raise CheckpointError(f"{source} holds the weights of an external network ({name!r}, trained through "
                              "semask.model.segmentor.ExternalSegmentor), which semask cannot build from the file: build "
                              "the network again and restore them with semask.checkpoint.load_training_state")
    if not isinstance(name, str) or not isinstance(raw, Mapping) or not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: model_name, config and state_dict must be a str and two dicts, got "
                              f"{type(name).__name__}, {type(raw).__name__}, {type(sd).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(map(str, set(raw) - fields))
    if unknown:
        raise CheckpointError(f"{source}: its config has unknown key(s) {unknown} (written by a newer semask, or "
                              f"edited); valid keys: {', '.join(sorted(fields))}")
    try:
        config = ModelConfig(**raw)
    except UsageError as exc:
        raise CheckpointError(f"{source}: its config is invalid: {exc}") from exc
    _check_limits([("num_classes", config.num_classes, "max_classes"),
                   ("backbone_classes", config.backbone_classes or 0, "max_classes"),
                   ("stages", len(config.depths), "max_stages"),
                   ("depth", max(config.depths), "max_depth"),
                   ("embed_dim", config.embed_dim, "max_embed_dim"),
                   ("num_heads", max(config.num_heads), "max_heads"),
                   ("window_size", config.window_size, "max_window"),
                   ("mlp_ratio", config.mlp_ratio, "max_mlp_ratio"),
                   ("num_sem_blocks", config.num_sem_blocks, "max_sem_blocks"),
                   ("decoder_channels", config.decoder_channels, "max_decoder_channels")],
                  f"{source}: its config has")
    check_tensors(sd, source)
    return name, config, sd


def to_official_checkpoint(model: SeMaskFPN) -> dict:
    """The model in the released (mmseg 0.x) layout: ``{"state_dict": ..., "meta": {"CLASSES", "PALETTE"}}``."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": {"CLASSES": tuple(model.class_names) if model.class_names else None,
                     "PALETTE": model.palette}}


# ----------------------------------------------------------------------------------------------- own format
def _atomic_save(obj: Any, path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, model: SeMaskFPN, *, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, iteration: Optional[int] = None,
                    train_config: Any = None, extra: Optional[dict] = None, format: Optional[str] = None) -> Path:
    """Write semask's own checkpoint atomically (temp file + rename).

    Args:
        path: destination `.pth`, or `.safetensors` (see `format`).
        model: the model (a DDP wrapper's `.module` is taken automatically).
        optimizer, scheduler, scaler: training states to resume from (optional).
        iteration: training iteration reached (optional).
        train_config: the resolved training config (a dataclass), stored as a dict.
        extra: further plain data (metrics, ...).
        format: ``"pth"`` (torch.save) or ``"safetensors"`` (weights, with the config, classes, palette,
            `train_config` and `extra` as JSON metadata; no optimizer/scheduler/scaler/RNG states). None: from
            the suffix of `path`.

    Returns:
        The written path.
    """
    fmt = format or ("safetensors" if Path(path).suffix == SAFETENSORS_SUFFIX else "pth")
    if fmt == "safetensors":
        states = [n for n, v in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler),
                                 ("iteration", iteration)) if v is not None]
        if states:
            raise ValueError(f"save_checkpoint({str(path)!r}): safetensors files hold weights and metadata only, "
                             f"not {', '.join(states)}; write training checkpoints to a .pth file")
        return save_safetensors(path, model, train_config=train_config, extra=extra)
    if fmt != "pth":
        raise ValueError(f"save_checkpoint: format must be 'pth' or 'safetensors', got {format!r}")
    model = getattr(model, "module", model)
    if getattr(model, "config", None) is None and not isinstance(model, ExternalSegmentor):
        raise UsageError("save_checkpoint: the model has no ModelConfig (build it with semask.create_model or "
                         "semask.model.registry.build_model)")
    obj: dict[str, Any] = {
        "format": FORMAT,
        "model_name": model.name,
        "config": dataclasses.asdict(model.config) if model.config is not None else None,  # None: external
        "class_names": tuple(model.class_names) if model.class_names else None,
        "palette": model.palette,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if train_config is not None:
        obj["train_config"] = dataclasses.asdict(train_config) if dataclasses.is_dataclass(train_config) else train_config
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        obj["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        obj["scaler"] = scaler.state_dict()
    if iteration is not None:
        obj["iteration"] = int(iteration)
        obj["rng"] = _rng_state()
    if extra:
        obj["extra"] = extra
    return _atomic_save(obj, path)


def load_training_state(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        scheduler: Any = None, scaler: Any = None, map_location: Any = "cpu",
                        restore_rng: bool = True) -> dict:
    """Restore a training run from a checkpoint written by `save_checkpoint`.

    Returns:
        The checkpoint's dict (with `iteration`, `train_config`, `extra` when present).
    """
    obj = read_checkpoint_file(path, map_location)
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a semask training checkpoint "
                              "(to start from official weights use load_checkpoint)")
    load_model_weights(getattr(model, "module", model), obj["state_dict"], f"checkpoint {str(path)!r}")
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None:
            if name not in obj:
                raise CheckpointError(f"checkpoint {str(path)!r} holds no {name} state to resume from")
            target.load_state_dict(obj[name])
    if restore_rng and "rng" in obj:
        _set_rng_state(obj["rng"])
    return obj


# ----------------------------------------------------------------------------------------------- ImageNet
@dataclass
class LoadReport:
    """What `load_pretrained_backbone` did."""

    source: str
    layout: str  # "microsoft" or "timm"
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded_fraction: float = 0.0  # of the Swin-block parameters (semantic layers and out norms excluded)

    def __str__(self) -> str:
        lines = [f"{self.source} ({self.layout} layout): loaded {len(self.loaded)} tensors "
                 f"({self.loaded_fraction:.1%} of the Swin parameters), resized {len(self.resized)}, "
                 f"missing {len(self.missing)}, ignored {len(self.unexpected)}"]
        if self.resized:
            lines.append("  resized: " + ", ".join(self.resized[:6]) + (" ..." if len(self.resized) > 6 else ""))
        if self.missing:
            lines.append("  missing (left at init): " + ", ".join(self.missing[:6]) + (" ..." if len(self.missing) > 6 else ""))
        if self.unexpected:
            lines.append("  ignored: " + ", ".join(self.unexpected[:6]) + (" ..." if len(self.unexpected) > 6 else ""))
        return "\n".join(lines)


def resize_relative_position_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Bicubically resize a ((2w'-1)^2, heads) relative-position table to window `window_size`."""
    old = int(round(table.shape[0] ** 0.5))
    new = 2 * window_size - 1
    if old == new:
        return table
    grid = table.T.reshape(1, -1, old, old).float()  # 1, heads, 2w'-1, 2w'-1
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(-1, new * new).T.contiguous().to(table.dtype)  # (2w-1)^2, heads


def load_pretrained_backbone(model: nn.Module, weights: Union[PathLike, Mapping[str, torch.Tensor]],
                             min_fraction: float = 0.5, *, sha256: Optional[str] = None) -> LoadReport:
    """Load ImageNet-pretrained Swin weights into a SeMask/Swin backbone.

    Accepts Microsoft's release (weights under `model`, downsampling at the end of each stage, classifier
    `head.*`, final `norm.*`, `attn_mask` buffers) and timm's layout (downsampling at the start of the next
    stage, `head.fc.*`). Relative-position tables are resized bicubically when the window differs (window-7
    weights into a window-12 model). The classifier, final norm and index/mask buffers are ignored.

    Args:
        model: a `SeMaskFPN` or its `SeMaskSwin` backbone.
        weights: a `.pth`/`.safetensors` path, an ``https://`` URL of one, or an already loaded dict.
        min_fraction: raise if less than this fraction of the Swin-block parameters was loaded.
        sha256: expected SHA-256 of the file (see `load_checkpoint`).

    Returns:
        A `LoadReport` (print it to see what was loaded, resized, missing and ignored).
    """
    backbone = getattr(model, "backbone", model)
    if isinstance(weights, Mapping):
        source, obj = "pretrained weights", weights
    else:
        source, obj = f"pretrained weights {str(weights)!r}", read_checkpoint_file(weights, sha256=sha256)
    sd, _ = _unwrap(obj, source)
    check_tensors(sd, source)
    for prefix in ("module.", "backbone.", "encoder."):
        sd = _strip_prefix(sd, prefix)
    timm_layout = "head.fc.weight" in sd or (
        "layers.0.downsample.reduction.weight" not in sd and "layers.1.downsample.reduction.weight" in sd)
    report = LoadReport(source, "timm" if timm_layout else "microsoft")
    own = backbone.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if timm_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        if k.endswith(("attn_mask", "relative_position_index")) or k.startswith(("head.", "norm.")):
            report.unexpected.append(k)
            continue
        if k not in own:
            report.unexpected.append(k)
            continue
        if k.endswith("relative_position_bias_table") and v.shape != own[k].shape:
            if v.shape[1] != own[k].shape[1]:
                raise CheckpointError(f"{source}: {k} has {v.shape[1]} heads, the model {own[k].shape[1]}")
            v = resize_relative_position_table(v, backbone.window_size)
            report.resized.append(k)
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (a different Swin variant?)")
        converted[k] = v
    report.loaded = sorted(converted)
    report.missing = sorted(k for k in own if k not in converted and not k.endswith("relative_position_index"))
    swin = {k: v.numel() for k, v in backbone.named_parameters()
            if "semantic_layer" not in k and not re.match(r"norm\d+\.", k)}
    report.loaded_fraction = sum(n for k, n in swin.items() if k in converted) / max(1, sum(swin.values()))
    if report.loaded_fraction < min_fraction:
        raise CheckpointError(f"{source}: only {report.loaded_fraction:.1%} of the backbone's Swin parameters "
                              f"would be loaded (need {min_fraction:.0%}).\n{report}")
    check_finite(converted, source)
    backbone.load_state_dict(converted, strict=False)
    return report


# ----------------------------------------------------------------------------------------------- URLs
def is_url(path: Any) -> bool:
    """Whether `path` is a URL that `resolve_checkpoint_path` downloads (https, http or file)."""
    return isinstance(path, str) and path.lower().startswith(URL_SCHEMES)


def _check_sha256(path: Path, sha256: str, source: str) -> None:
    expected = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"sha256 for {source} must be 8 to 64 hexadecimal characters, got {sha256!r}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(expected):
        raise CheckpointError(f"{source}: SHA-256 of {str(path)!r} is {digest.hexdigest()}, expected {expected}"
                              + ("..." if len(expected) < 64 else "")
                              + ". The file is corrupt or not the one meant; delete it and download it again.")


def download_checkpoint(url: str, sha256: Optional[str] = None, progress: bool = True,
                        file_name: Optional[str] = None) -> Path:
    """Download `url` once into torch.hub's cache and return the local file.

    The file goes to ``torch.hub.get_dir()/checkpoints/<file name>`` (the cache `torch.hub` uses for its own
    weights; `torch.hub.set_dir` or ``$TORCH_HOME`` move it), through a temporary file that is renamed only
    when the download is complete and, with `sha256`, matches. A file already in the cache is not
    downloaded again (but is checked against `sha256` too).

    Args:
        url: ``https://...`` (``http://`` and ``file://`` work the same way).
        sha256: expected SHA-256, hex (a prefix of at least 8 characters is enough, as in torch.hub's names).
        progress: show a progress bar on stderr.
        file_name: name in the cache (default: the last part of the URL's path).

    Returns:
        The path of the cached file.
    """
    if not is_url(url):
        raise ValueError(f"expected a URL starting with one of {URL_SCHEMES}, got {url!r}")
    name = file_name or Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name or name in (".", ".."):
        raise ValueError(f"cannot tell a file name from the URL {url!r}; pass file_name=")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / name
    if not target.is_file():
        if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256.strip()):
            raise ValueError(f"sha256 for {url!r} must be 8 to 64 hexadecimal characters, got {sha256!r}")
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256.strip().lower() if sha256 else None,
                                           progress=progress)
        except RuntimeError as exc:  # torch.hub's hash mismatch; the partial file is already removed
            raise CheckpointError(f"download of {url!r}: {exc}; nothing was written to {str(cache)!r}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise FileNotFoundError(f"cannot download {url!r}: {exc}") from exc
    elif sha256 is not None:
        _check_sha256(target, sha256, f"cached download of {url!r}")
    return target


def resolve_checkpoint_path(path: PathLike, sha256: Optional[str] = None, progress: bool = True) -> Path:
    """The local file for a path or URL: URLs are downloaded (`download_checkpoint`); `sha256` is checked."""
    if is_url(path):
        return download_checkpoint(str(path), sha256=sha256, progress=progress)
    path = Path(path)
    if sha256 is not None and path.is_file():
        _check_sha256(path, sha256, f"checkpoint {str(path)!r}")
    return path


# ----------------------------------------------------------------------------------------------- safetensors
def _json_meta(meta: Mapping[str, str], key: str, source: str) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: metadata {key!r} is not valid JSON ({exc}): {meta[key][:80]!r}") from exc


def read_safetensors_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Read a `.safetensors` file (never unpickling) into the dict layout `load_checkpoint` reads.

    Args:
        path: a file written by `save_safetensors` (metadata ``format`` = semask's format tag, with
            ``model_name``, and ``config``, ``class_names``, ``palette`` as JSON), or any safetensors file of a
            state dict (the official layout; ``CLASSES``/``PALETTE`` metadata as JSON are used when present).
        map_location: device for the tensors.

    Returns:
        semask's checkpoint dict (``format``, ``model_name``, ``config``, ``class_names``, ``palette``,
        ``state_dict``) or ``{"state_dict": ..., "meta": {"CLASSES", "PALETTE"}}`` for other files.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    source = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist" if not path.exists() else f"{source} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {source} as safetensors: {exc}") from exc
    if map_location not in (None, "cpu") and isinstance(map_location, (str, torch.device)):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    if meta.get("format") == FORMAT:
        config = _json_meta(meta, "config", source)
        if not isinstance(config, dict) or "model_name" not in meta:
            raise CheckpointError(f"{source}: semask safetensors metadata without a 'config' object or 'model_name'")
        return {"format": FORMAT, "model_name": meta["model_name"],
                "config": {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()},
                "class_names": _json_meta(meta, "class_names", source), "palette": _json_meta(meta, "palette", source),
                "train_config": _json_meta(meta, "train_config", source), "extra": _json_meta(meta, "extra", source),
                "state_dict": tensors}
    return {"state_dict": tensors,
            "meta": {"CLASSES": _json_meta(meta, "CLASSES", source), "PALETTE": _json_meta(meta, "PALETTE", source)}}


def save_safetensors(path: PathLike, model: SeMaskFPN, train_config: Any = None, extra: Optional[dict] = None) -> Path:
    """Write the model's weights as `.safetensors` atomically, with its config, classes and palette as metadata.

    Args:
        path: destination (normally ending in `.safetensors`).
        model: the model (a DDP wrapper's `.module` is taken automatically).
        train_config, extra: optional JSON-serialisable run information, stored as JSON strings.

    Returns:
        The written path. `load_checkpoint` reads it back into an identical model.
    """
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    if getattr(model, "config", None) is None:
        raise ValueError("the model has no ModelConfig (build it with semask.create_model or build_model)")
    meta = {
        "format": FORMAT,
        "model_name": model.name,
        "config": json.dumps(dataclasses.asdict(model.config)),
        "class_names": json.dumps(list(model.class_names) if model.class_names else None),
        "palette": json.dumps(model.palette),
    }
    try:
        if train_config is not None:
            meta["train_config"] = json.dumps(
                dataclasses.asdict(train_config) if dataclasses.is_dataclass(train_config) else train_config)
        if extra:
            meta["extra"] = json.dumps(extra)
    except TypeError as exc:
        raise ValueError(f"save_checkpoint({str(path)!r}): safetensors metadata must be JSON: {exc}") from exc
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def convert_to_safetensors(src: PathLike, dst: PathLike, *, sha256: Optional[str] = None,
                           overwrite: bool = False) -> Path:
    """Convert a `.pth` checkpoint (read with ``weights_only=True``; a URL is downloaded) to `.safetensors`.

    A SeMask/Swin FPN checkpoint (official or semask's own) is loaded as a model, so that the file gets the
    inferred config, the classes and the palette (`load_checkpoint` reads it back into the same model). Any
    other file of tensors, such as ImageNet Swin weights, is written as its bare state dict (found under
    ``state_dict`` or ``model``), which `load_pretrained_backbone` reads.

    Args:
        src: the `.pth` file or URL.
        dst: the `.safetensors` file to write (atomically).
        sha256: expected SHA-256 of `src`.
        overwrite: replace an existing `dst` (otherwise that is an error).

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"the output {str(dst)!r} must end in {SAFETENSORS_SUFFIX}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists; choose another name or pass overwrite=True (--overwrite)")
    local = resolve_checkpoint_path(src, sha256=sha256)
    if not is_url(src) and dst.exists() and local.resolve() == dst.resolve():
        raise ValueError(f"input and output are the same file {str(dst)!r}")
    obj = read_checkpoint_file(local)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return save_safetensors(dst, load_checkpoint(local))
    source = f"checkpoint {str(src)!r}"
    sd, meta = _unwrap(obj, source)
    sd = _strip_prefix(sd, "module.")
    if all(k in sd for k in ("backbone.patch_embed.proj.weight", "decode_head.conv_seg.weight")):
        return save_safetensors(dst, load_checkpoint(local))
    with atomic_path(dst) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp))
    return dst
