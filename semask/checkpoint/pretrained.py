"""ImageNet-pretrained Swin weights for the backbone of SeMask FPN (arXiv 2112.12782).

`load_pretrained_backbone` reads Microsoft's release or timm's layout of Swin weights, resizes
relative-position tables bicubically when the window differs, and returns a `LoadReport` of what it did.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.checkpoint.checks import check_finite, check_tensors
from semask.checkpoint.errors import CheckpointError
from semask.checkpoint.files import PathLike, read_checkpoint_file
from semask.checkpoint.official import strip_prefix, unwrap_checkpoint

__all__ = ["LoadReport", "resize_relative_position_table", "load_pretrained_backbone"]


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
        for title, keys in (("resized", self.resized), ("missing (left at init)", self.missing),
                            ("ignored", self.unexpected)):
            if keys:
                lines.append(f"  {title}: " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else ""))
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


def _is_timm_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    """timm downsamples at the start of the next stage (no ``layers.0.downsample``) and names its head ``head.fc``."""
    return "head.fc.weight" in sd or (
        "layers.0.downsample.reduction.weight" not in sd and "layers.1.downsample.reduction.weight" in sd)


def _convert(sd: Mapping[str, torch.Tensor], backbone: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """The weights of `sd` the backbone takes, under its key names and table sizes; `report` lists the rest."""
    own = backbone.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if report.layout == "timm":
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        if k.endswith(("attn_mask", "relative_position_index")) or k.startswith(("head.", "norm.")) or k not in own:
            report.unexpected.append(k)
            continue
        if k.endswith("relative_position_bias_table") and v.shape != own[k].shape:
            if v.shape[1] != own[k].shape[1]:
                raise CheckpointError(f"{report.source}: {k} has {v.shape[1]} heads, the model {own[k].shape[1]}")
            v = resize_relative_position_table(v, backbone.window_size)
            report.resized.append(k)
        if v.shape != own[k].shape:
            raise CheckpointError(f"{report.source}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (a different Swin variant?)")
        converted[k] = v
    report.loaded = sorted(converted)
    report.missing = sorted(k for k in own if k not in converted and not k.endswith("relative_position_index"))
    return converted


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

    Raises:
        CheckpointError: a tensor of another shape or head count, or less than `min_fraction` loaded.
        CheckpointNonFiniteError: NaN or infinite weights.
    """
    backbone = getattr(model, "backbone", model)
    if isinstance(weights, Mapping):
        source, obj = "pretrained weights", weights
    else:
        source, obj = f"pretrained weights {str(weights)!r}", read_checkpoint_file(weights, sha256=sha256)
    sd, _ = unwrap_checkpoint(obj, source)
    check_tensors(sd, source)
    for prefix in ("module.", "backbone.", "encoder."):
        sd = strip_prefix(sd, prefix)
    report = LoadReport(source, "timm" if _is_timm_layout(sd) else "microsoft")
    converted = _convert(sd, backbone, report)
    swin = {k: v.numel() for k, v in backbone.named_parameters()
            if "semantic_layer" not in k and not re.match(r"norm\d+\.", k)}
    report.loaded_fraction = sum(n for k, n in swin.items() if k in converted) / max(1, sum(swin.values()))
    if report.loaded_fraction < min_fraction:
        raise CheckpointError(f"{source}: only {report.loaded_fraction:.1%} of the backbone's Swin parameters "
                              f"would be loaded (need {min_fraction:.0%}).\n{report}")
    check_finite(converted, source)
    backbone.load_state_dict(converted, strict=False)
    return report
