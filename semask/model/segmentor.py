"""SeMask FPN segmentor: wires the SeMask Swin backbone to the Semantic-FPN decoder (arXiv 2112.12782).

Wiring only: the parts live in `semask.model.swin`, `semask.model.semantic` and `semask.model.decoder`; the loss in
`semask.engine.losses`; building by name in `semask.model.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.model.config import ModelConfig
from semask.model.decoder import SemanticFPNHead, resize
from semask.device import check_tensor
from semask.errors import UsageError, UsageTypeError
from semask.model.semantic import SemanticAttentionMap
from semask.model.swin import SeMaskSwin


__all__ = ["SegmentationOutput", "SeMaskFPN", "ExternalSegmentor", "check_input"]


@dataclass
class SegmentationOutput:
    """What the segmentor returns.

    Attributes:
        logits: (B, K, H, W) class scores at the input size.
        prior_logits: (B, K, H/4, W/4) the decoder's summed semantic prior before any upsampling (None for the
            plain-Swin baseline).
        decoder_logits: (B, K, H/4, W/4) the decoder's class scores before upsampling.
        stage_priors: per backbone stage (B, K, H_i, W_i) semantic priors (empty for the baseline).
        attentions: per stage semantic attention weights, when requested with `return_attention=True`.
    """

    logits: torch.Tensor
    prior_logits: Optional[torch.Tensor]
    decoder_logits: torch.Tensor
    stage_priors: list[torch.Tensor] = field(default_factory=list)
    attentions: list[SemanticAttentionMap] = field(default_factory=list)


def check_input(x: torch.Tensor, in_chans: int = 3, dtype: Optional[torch.dtype] = None,
                device: Optional[torch.device] = None) -> None:
    """Fail early, with a message that says what to do, on inputs the model cannot take.

    Args:
        x: the batch given to the model.
        in_chans: channels the model expects.
        dtype: the model's weight dtype; the batch must have it, except under autocast, which casts every
            floating type but float64 (float64 or float16 into a float32 model is an error here, not a matmul
            error deep inside).
        device: the model's device; the batch must be on it (None: not checked).

    Raises:
        UsageTypeError: not a tensor, or complex. UsageError: a tensor without usable values (`meta` device,
        sparse, quantised, nested: `semask.device.check_tensor`), on another device than the model, wrong shape,
        empty batch or image, wrong dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise UsageTypeError(f"expected a torch.Tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    check_tensor(x, "the model's input x", device)
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise UsageError(f"expected a normalised image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}"
                         + (" (add a batch dimension with x[None])" if x.ndim == 3 else ""))
    if not x.is_floating_point():
        raise UsageError(f"expected a floating-point batch (normalised with the ImageNet mean/std), got {x.dtype}; "
                         "use semask.engine.inference.normalize(uint8_batch.float()), or semask.predict() on images")
    if x.shape[0] < 1:
        raise UsageError(f"expected a batch of at least one image, got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise UsageError(f"expected a non-empty image, got spatial size {tuple(x.shape[2:])}")
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64  # autocast casts the others
    if dtype is not None and x.dtype != dtype and not autocast:
        raise UsageError(f"expected a {dtype} batch to match the model's {dtype} weights, got {x.dtype}; convert it "
                         f"with x.to({dtype}) (or the model with model.to({x.dtype})), or run under torch.autocast")


class SeMaskFPN(nn.Module):
    """SeMask Swin backbone + Semantic-FPN decoder (or the plain-Swin FPN baseline).

    Args:
        backbone: a `SeMaskSwin` (with or without semantic layers).
        decode_head: a `SemanticFPNHead` whose `prior_branch` matches the backbone.
        name: registry name (kept for checkpoints and reports).
        class_names, palette: dataset metadata carried by the model (None when unknown).
        config: the `ModelConfig` the parts were built from (`semask.model.registry.build_model` passes it; needed to
            save the model with `save_checkpoint`).
    """

    def __init__(self, backbone: SeMaskSwin, decode_head: SemanticFPNHead, name: str = "semask",
                 class_names: Optional[Sequence[str]] = None,
                 palette: Optional[Sequence[Sequence[int]]] = None, config: Optional[ModelConfig] = None):
        super().__init__()
        if decode_head.prior_branch and not backbone.has_semantic_layers:
            raise UsageError("the decoder's prior branch needs a backbone with semantic layers")
        self.backbone = backbone
        self.decode_head = decode_head
        self.name = name
        self.config: Optional[ModelConfig] = config
        self.class_names = tuple(class_names) if class_names else None
        self.palette = [list(map(int, c)) for c in palette] if palette else None

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def set_grad_checkpointing(self, enable: bool = True, stages: Optional[Sequence[int]] = None) -> None:
        """Recompute the backbone stages in the backward pass (all, or the listed ones) to save memory."""
        self.backbone.set_grad_checkpointing(enable, stages)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> SegmentationOutput:
        """Args:
            x: (B, 3, H, W) images normalised with the ImageNet mean/std; any H and W.
            return_attention: also return every semantic layer's attention weights (for visualisation).

        Returns:
            `SegmentationOutput`; `.logits` is (B, K, H, W), `.prior_logits` (B, K, ceil(H/4), ceil(W/4)).
        """
        weight = self.backbone.patch_embed.proj.weight
        check_input(x, dtype=weight.dtype, device=weight.device)
        feats = self.backbone(x, return_attention=return_attention)
        decoder_logits, prior = self.decode_head(feats.features, feats.priors)
        # class scores leave the model in fp32 even under autocast (which would resize in bf16/fp16): the
        # upsampled map is where argmax and softmax happen, and on the CPU fp32 resizing is also the faster
        decoder_logits = decoder_logits.float()
        with torch.autocast(x.device.type, enabled=False):
            logits = F.interpolate(decoder_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return SegmentationOutput(logits=logits, prior_logits=prior, decoder_logits=decoder_logits,
                                  stage_priors=feats.priors, attentions=feats.attentions)


class ExternalSegmentor(nn.Module):
    """Any segmentation network behind semask's interface, so that `semask.engine.train` and `semask.engine.evaluate` can run
    outside baselines (e.g. a `segmentation_models_pytorch` FPN) with the same recipe, data and metrics.

    The network maps a normalised (B, 3, H, W) batch to (B, K, h, w) class scores. Inputs are zero-padded on the
    right and bottom to a multiple of `size_divisor` (smp's encoders need 32) and the scores are cropped back and
    resized to the input size. There is no semantic prior, so the loss is the decoder's cross-entropy alone.

    Args:
        net: the network.
        num_classes: K, the classes it predicts.
        name: shown in logs and stored in checkpoints (e.g. ``"smp_fpn_mobilenet_v2"``).
        class_names, palette: dataset metadata, as `SeMaskFPN` carries it.
        size_divisor: pad inputs to a multiple of this (1 = no padding).

    Checkpoints of an external model hold its weights and training state but cannot rebuild the network: build it
    again and restore them with `semask.checkpoint.load_training_state`.
    """

    config = None  # no `ModelConfig`: semask cannot build this network from a checkpoint alone

    def __init__(self, net: nn.Module, num_classes: int, name: str = "external",
                 class_names: Optional[Sequence[str]] = None, palette: Optional[Sequence[Sequence[int]]] = None,
                 size_divisor: int = 32):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise UsageError(f"ExternalSegmentor: {len(class_names)} class names for num_classes={num_classes}")
        if size_divisor < 1:
            raise UsageError(f"ExternalSegmentor: size_divisor must be a positive integer, got {size_divisor}")
        self.net = net
        self.name = name
        self._num_classes = num_classes
        self.size_divisor = size_divisor
        self.class_names = tuple(class_names) if class_names else None
        self.palette = [list(map(int, c)) for c in palette] if palette else None

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> SegmentationOutput:
        """Args:
            x: (B, 3, H, W) normalised images; any H and W.
            return_attention: accepted for interface compatibility; an external network has no semantic layers.

        Returns:
            `SegmentationOutput` with `.logits` (B, K, H, W) and no priors.
        """
        weight = next(self.net.parameters(), None)
        check_input(x, device=weight.device if weight is not None else None)
        H, W = x.shape[-2:]
        d = self.size_divisor
        padded = F.pad(x, (0, -W % d, 0, -H % d))  # B, 3, ceil(H/d)*d, ceil(W/d)*d
        scores = self.net(padded)
        if scores.ndim != 4 or scores.shape[1] != self.num_classes:
            raise UsageError(f"{self.name}: the network returned shape {tuple(scores.shape)}; expected (B, "
                             f"{self.num_classes}, h, w) class scores")
        h = round(scores.shape[-2] * H / padded.shape[-2])  # the part of the scores that covers the image
        w = round(scores.shape[-1] * W / padded.shape[-1])
        scores = scores[..., :h, :w].float()
        with torch.autocast(x.device.type, enabled=False):
            logits = resize(scores, (H, W))
        return SegmentationOutput(logits=logits, prior_logits=None, decoder_logits=scores)
