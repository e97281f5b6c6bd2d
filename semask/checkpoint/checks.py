"""The checks on untrusted checkpoint files (SeMask FPN, arXiv 2112.12782), all in one place.

`LIMITS` bounds the architecture a file may claim (users raise a field for a trusted file, e.g.
``semask.checkpoint.LIMITS.max_classes = 50_000``); `check_config_limits` holds the one list of what each limit
bounds. `check_tensors` refuses entries that are not plain dense tensors, `check_finite` NaN and infinity,
`check_architecture` a claimed model that is too large or does not match the weights' shapes (built on the
``meta`` device), and `load_model_weights` copies weights into a model only once all of that holds. See
docs/design.md, "Checkpoints", for why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from semask.checkpoint.errors import CheckpointError, CheckpointLimitError, CheckpointNonFiniteError
from semask.model.config import ModelConfig
from semask.model.registry import build_model

__all__ = [
    "ArchitectureLimits",
    "LIMITS",
    "check_limit",
    "check_config_limits",
    "check_tensors",
    "check_finite",
    "check_architecture",
    "load_model_weights",
]


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

# What each limit bounds: (name in messages, the number read from a config, field of LIMITS).
_CONFIG_LIMITS: tuple[tuple[str, Callable[[Any], float], str], ...] = (
    ("num_classes", lambda c: c.num_classes, "max_classes"),
    ("backbone_classes", lambda c: c.backbone_classes or 0, "max_classes"),
    ("stages", lambda c: len(c.depths), "max_stages"),
    ("depth", lambda c: max(c.depths), "max_depth"),
    ("embed_dim", lambda c: c.embed_dim, "max_embed_dim"),
    ("num_heads", lambda c: max(c.num_heads), "max_heads"),
    ("window_size", lambda c: c.window_size, "max_window"),
    ("mlp_ratio", lambda c: c.mlp_ratio, "max_mlp_ratio"),
    ("num_sem_blocks", lambda c: c.num_sem_blocks, "max_sem_blocks"),
    ("decoder_channels", lambda c: c.decoder_channels, "max_decoder_channels"),
)


def check_limit(value: float, limit_name: str, claim: str) -> None:
    """Refuse `value` above ``LIMITS.<limit_name>``.

    Args:
        value: the number the file claims.
        limit_name: a field of `ArchitectureLimits`.
        claim: what the file claims, to start the message (e.g. ``"checkpoint 'x.pth': the file has 9 stages"``).

    Raises:
        CheckpointLimitError: ``"<claim>, above semask.checkpoint.LIMITS.<limit_name> = <limit> ..."``.
    """
    limit = getattr(LIMITS, limit_name)
    if value > limit:
        raise CheckpointLimitError(f"{claim}, above semask.checkpoint.LIMITS.{limit_name} = {limit:,} (nothing was "
                                   "built); raise that limit only if the file is trusted")


def check_config_limits(config: Any, claim: str) -> None:
    """Refuse an architecture beyond `LIMITS`, checking the first number that is too large.

    Args:
        config: a `ModelConfig`, or any object with its fields ``num_classes``, ``backbone_classes``,
            ``depths``, ``embed_dim``, ``num_heads``, ``window_size``, ``mlp_ratio``, ``num_sem_blocks`` and
            ``decoder_channels`` (the numbers read from a file before a config is made of them).
        claim: who claims them, to start the message (e.g. ``"checkpoint 'x.pth': its config has"``).

    Raises:
        CheckpointLimitError: ``"<claim> <field> = <value>, above semask.checkpoint.LIMITS.<limit> = ..."``.
    """
    for what, read, limit_name in _CONFIG_LIMITS:
        value = read(config)
        check_limit(value, limit_name, f"{claim} {what} = {value:,}")


def check_tensors(sd: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Refuse state-dict entries that are not tensors, or tensors that claim more elements than they store
    (stride-0 expansions; real weights never have a zero stride).

    Raises:
        CheckpointError: listing the offending entries.
    """
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    bad += [f"{k} (shape {tuple(v.shape)}, strides {v.stride()}: an expanded, stride-0 tensor)"
            for k, v in sd.items() if isinstance(v, torch.Tensor) and v.layout == torch.strided
            and any(st == 0 and n > 1 for st, n in zip(v.stride(), v.shape))]
    bad += [f"{k} (layout {v.layout})" for k, v in sd.items()
            if isinstance(v, torch.Tensor) and v.layout != torch.strided]
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


def _check_shapes(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str) -> None:
    report = _mismatches({k: tuple(v.shape) for k, v in own.items()}, sd, source)
    if report:
        raise CheckpointError(report)


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
    check_limit(parameters, "max_parameters", f"{source}: the architecture it describes has {parameters:,} parameters")
    _check_shapes(skeleton.state_dict(), sd, source)


def load_model_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a full state dict into `model`, or raise listing every missing, unexpected and mis-shaped key.

    Raises:
        CheckpointError: entries that are not dense tensors, names or shapes that differ, a non-standard
            relative-position index. CheckpointNonFiniteError: NaN or infinite weights (named).
    """
    check_tensors(sd, source)
    own = model.state_dict()
    _check_shapes(own, sd, source)
    check_finite(sd, source)
    for k, v in sd.items():
        if k.endswith("relative_position_index") and not torch.equal(own[k], v.to(own[k].dtype)):
            raise CheckpointError(f"{source}: {k} differs from the standard Swin index layout")
    model.load_state_dict(sd, strict=True)
