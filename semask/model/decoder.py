"""Semantic-FPN decoder with the SeMask semantic-prior branch (arXiv 2112.12782, Sec. 3.3).

The head of Panoptic FPN's semantic branch (arXiv 1901.02446) applied directly to the backbone's four
stages (no FPN neck): stage i (stride 4, 8, 16, 32) goes through a tower of max(1, log2(stride / 4))
units of 3x3 conv (no bias) + BatchNorm + ReLU, each followed by a x2 bilinear upsample when the stride is
above 4; the towers are summed at stride 4, then Dropout2d and a 1x1 conv give the class logits.

The prior branch has no parameters: stage priors 2..4 are upsampled x2 as many times as their stage's tower
has units, resized to stage 1's size and summed with stage 1's prior. Module names follow the released
checkpoints (`scale_heads.{i}.{j}.conv`, `.bn`, `conv_seg`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.errors import UsageError
from semask.model.util import is_exporting

__all__ = ["resize", "ConvBNReLU", "Upsample2x", "SemanticFPNHead"]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners False) of a (B, C, H, W) map; a no-op when the size already matches.

    While `torch.export` traces the model the resize is always applied (to the same size it is the identity),
    so that the traced graph holds for every input size (see `semask.apps.export`).
    """
    if not is_exporting() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias) + norm + ReLU, with the checkpoints' names `conv` and `bn`."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = norm_layer(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class Upsample2x(nn.Module):
    """Bilinear x2 upsampling (align_corners False), to an output of exactly twice the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False)


class SemanticFPNHead(nn.Module):
    """Semantic-FPN decoder; with `prior_branch` it also sums the backbone's semantic priors.

    Args:
        in_channels: channels of each backbone stage (`backbone.out_channels`).
        strides: stride of each stage; the first must be the smallest.
        num_classes: K, output classes.
        channels: width of the towers (256 in every released model).
        dropout: Dropout2d probability before the classifier.
        prior_branch: sum the stage priors (SeMask); False for the plain-Swin FPN baseline.
        norm_layer: normalisation of the conv units (`nn.BatchNorm2d`, or `nn.SyncBatchNorm` for multi-GPU).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int] = (4, 8, 16, 32),
                 num_classes: int = 150, channels: int = 256, dropout: float = 0.1,
                 prior_branch: bool = True, norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if len(in_channels) != len(strides):
            raise UsageError(f"in_channels {tuple(in_channels)} and strides {tuple(strides)} differ in length")
        self.num_classes = num_classes
        self.prior_branch = prior_branch
        self.num_units = [max(1, int(math.log2(s / strides[0]))) for s in strides]
        self.scale_heads = nn.ModuleList()
        for in_ch, stride, units in zip(in_channels, strides, self.num_units):
            tower: list[nn.Module] = []
            for k in range(units):
                tower.append(ConvBNReLU(in_ch if k == 0 else channels, channels, norm_layer))
                if stride > strides[0]:
                    tower.append(Upsample2x())
            self.scale_heads.append(nn.Sequential(*tower))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def sum_priors(self, priors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The prior branch.

        Args:
            priors: per stage (B, K, H_i, W_i).

        Returns:
            (B, K, H_1, W_1), the summed semantic prior at stage 1's resolution.
        """
        size = priors[0].shape[-2:]
        total = priors[0].float()  # summed in fp32 under autocast too
        for prior, units in zip(priors[1:], self.num_units[1:]):
            prior = prior.float()
            for _ in range(units):
                prior = F.interpolate(prior, size=(2 * prior.shape[-2], 2 * prior.shape[-1]),
                                      mode="bilinear", align_corners=False)
            total = total + resize(prior, size)
        return total

    def forward(self, features: Sequence[torch.Tensor], priors: Optional[Sequence[torch.Tensor]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args:
            features: per stage (B, C_i, H_i, W_i), finest first.
            priors: per stage (B, K, H_i, W_i) semantic priors (needed when `prior_branch` is on).

        Returns:
            logits: (B, K, H_1, W_1); prior_logits: (B, K, H_1, W_1) or None without the prior branch.
        """
        if len(features) != len(self.scale_heads):
            raise UsageError(f"expected {len(self.scale_heads)} feature maps, got {len(features)}")
        out = self.scale_heads[0](features[0])
        size = out.shape[-2:]
        for head, feat in zip(self.scale_heads[1:], features[1:]):
            out = out + resize(head(feat), size)
        logits = self.conv_seg(self.dropout(out))
        prior = None
        if self.prior_branch:
            if not priors:
                raise UsageError("the prior branch needs the backbone's semantic priors, but none were given "
                                 "(is the backbone a plain Swin without semantic layers?)")
            with torch.autocast(priors[0].device.type, enabled=False):  # summed in fp32 under autocast too
                prior = self.sum_priors(priors)
        return logits, prior
