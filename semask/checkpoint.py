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
pickle: no code from a checkpoint is ever executed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import urllib.error
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.models import _SWIN, ModelConfig, build_model, model_config, released_global_stages
from semask.segmentor import SeMaskFPN
from semask.utils import atomic_path

__all__ = [
    "CheckpointError",
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what is wrong."""


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


def infer_model_config(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[str, ModelConfig]:
    """Infer the architecture of a SeMask FPN / Swin FPN state dict from its tensor shapes.

    Args:
        sd: weights with `backbone.` / `decode_head.` prefixes.
        source: name used in error messages.

    Returns:
        (registry-style name, `ModelConfig`). Whether stages 3-4 use global semantic attention cannot be
        seen in the weights: a registered size keeps its registry entry's choice (for the released sizes,
        the released models' rule `released_global_stages`), any other size follows that rule.
    """
    need = ["backbone.patch_embed.proj.weight", "decode_head.conv_seg.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not a SeMask/Swin FPN checkpoint; missing {absent}. "
                              f"First keys found: {sorted(sd)[:8]}")
    embed_dim = sd["backbone.patch_embed.proj.weight"].shape[0]
    stages = _layer_indices(sd, r"backbone\.layers\.(\d+)\.")
    depths, heads = [], []
    for i in stages:
        blocks = _layer_indices(sd, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.")
        table = sd.get(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            raise CheckpointError(f"{source}: stage {i} has no Swin blocks with a relative_position_bias_table")
        depths.append(len(blocks))
        heads.append(table.shape[1])
    table = sd["backbone.layers.0.blocks.0.attn.relative_position_bias_table"]
    window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
    mlp_ratio = sd["backbone.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    q_key = "backbone.layers.0.semantic_layer.class_injection.0.mlp_cls_q.weight"
    semantic = q_key in sd
    num_classes, channels = sd["decode_head.conv_seg.weight"].shape[:2]
    backbone_classes = sd[q_key].shape[0] if semantic else None
    sem_blocks = len(_layer_indices(sd, r"backbone\.layers\.0\.semantic_layer\.class_injection\.(\d+)\.")) or 1
    config = ModelConfig(
        embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=window,
        num_classes=num_classes, backbone_classes=backbone_classes if backbone_classes != num_classes else None,
        semantic=semantic, num_sem_blocks=sem_blocks, mlp_ratio=mlp_ratio, decoder_channels=channels)
    # a registered size keeps that entry's semantic regions (for the released sizes: the released rule)
    size = next((s for s, a in _SWIN.items() if (a["embed_dim"], tuple(a["depths"]), tuple(a["num_heads"]))
                 == (embed_dim, tuple(depths), tuple(heads))), None)
    name = f"{'semask' if semantic else 'swin'}_{size or 'custom'}_fpn"
    if semantic:
        stages = (model_config(name, num_classes=num_classes, backbone_classes=config.backbone_classes)
                  .resolved_global_stages() if size else released_global_stages(embed_dim, backbone_classes))
        config = dataclasses.replace(config, semantic_global_stages=stages)
    return name, config


# ----------------------------------------------------------------------------------------------- loading
def load_model_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a full state dict into `model`, or raise listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match the model ({len(own)} tensors expected, {len(sd)} found):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = "\n    ".join(items[:30]) + (f"\n    ... and {len(items) - 30} more" if len(items) > 30 else "")
                parts.append(f"  {title} ({len(items)}):\n    {shown}")
        raise CheckpointError("\n".join(parts))
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
    obj = read_checkpoint_file(path, map_location, sha256=sha256)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        config = ModelConfig(**obj["config"])
        name, class_names, palette = obj["model_name"], obj.get("class_names"), obj.get("palette")
        sd = obj["state_dict"]
    else:
        sd, meta = _unwrap(obj, source)
        sd = _strip_prefix(sd, "module.")
        name, config = infer_model_config(sd, source)
        class_names, palette = meta.get("CLASSES"), meta.get("PALETTE")
    if semantic_global_stages is not None:
        config = dataclasses.replace(config, semantic_global_stages=tuple(semantic_global_stages))
    model = build_model(config, name=name)
    load_model_weights(model, sd, source)
    if class_names is not None and len(class_names) != model.num_classes:
        raise CheckpointError(f"{source}: meta lists {len(class_names)} class names but the decoder has "
                              f"{model.num_classes} classes")
    model.class_names = tuple(class_names) if class_names else None
    model.palette = [list(map(int, c)) for c in palette] if palette is not None else None
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


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
    if model.config is None:
        raise ValueError("the model has no ModelConfig (build it with semask.create_model or build_model)")
    obj: dict[str, Any] = {
        "format": FORMAT,
        "model_name": model.name,
        "config": dataclasses.asdict(model.config),
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
