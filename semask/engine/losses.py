"""Training loss of SeMask FPN (arXiv 2112.12782, Sec. 3.3).

    loss = CE(decoder logits, labels) + 0.4 * CE(summed semantic prior, labels)

Both maps are resized bilinearly from 1/4 resolution to the label size; label 255 is ignored. As in the
reference, each per-pixel loss is averaged over ALL label pixels, ignored ones included (they contribute 0).
Optionally, OHEM (online hard example mining) keeps only the hardest pixels of the decoder loss: the
`min_kept` x batch-size valid pixels with the highest loss get weight 1, the others 0 (no threshold), as in
mmsegmentation's `OHEMPixelSampler` used by the released Large ADE20K recipe and all four COCO-Stuff 10k
recipes (not by ADE20K tiny, small or base, nor by Cityscapes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from semask.bounds import check_settings, setting
from semask.errors import UsageError, UsageTypeError
from semask.model.decoder import resize
from semask.model.segmentor import SegmentationOutput

__all__ = ["LossOutput", "SeMaskLoss", "semask_loss", "ohem_weights", "pixel_cross_entropy", "balanced_class_weights"]


@dataclass
class LossOutput:
    """Scalar losses: `total` (to back-propagate), and its parts `decode` and `prior` (already weighted)."""

    total: torch.Tensor
    decode: torch.Tensor
    prior: Optional[torch.Tensor]

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging."""
        out = {"loss": self.total.item(), "loss_decode": self.decode.item()}
        if self.prior is not None:
            out["loss_prior"] = self.prior.item()
        return out


@dataclass(frozen=True)
class _LossSettings:
    """The loss's numbers, checked by `semask.bounds` where they enter (`SeMaskLoss`, `semask_loss`)."""

    prior_weight: float = setting(0.4, ge=0)
    ignore_index: int = setting(255, ge=0)
    ohem_min_kept: Optional[int] = setting(None, ge=1)
    class_weight: Optional[tuple[float, ...]] = setting(None, ge=0, not_all_zero=True)


def _loss_settings(who: str, prior_weight: float, ignore_index: int, ohem_min_kept: Optional[int],
                   class_weight: Optional[Sequence[float]]) -> _LossSettings:
    if class_weight is not None:
        try:  # a list, a tuple, an array or a tensor of K numbers
            class_weight = tuple(float(w) for w in class_weight)
        except (TypeError, ValueError) as exc:
            raise UsageTypeError(f"{who}: class_weight must be K numbers, got {class_weight!r}") from exc
    settings = _LossSettings(prior_weight, ignore_index, ohem_min_kept, class_weight)
    check_settings(settings, who)
    return settings


def _check_labels(labels: torch.Tensor, logits: torch.Tensor, ignore_index: int) -> None:
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise UsageError(f"labels must be (B, H, W) with B={logits.shape[0]}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise UsageTypeError(f"labels must be an integer tensor, got {labels.dtype}")
    num_classes = logits.shape[1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:10].tolist()
        raise UsageError(f"labels hold values {values} outside 0..{num_classes - 1} (and not the ignore "
                         f"index {ignore_index}); check the dataset's label mapping (reduce_zero_label?)")


class _PixelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (N, K) scores with a fused backward: d loss / d x = (softmax(x) - onehot) * grad.

    Saves the log-probabilities and computes the gradient in place from them, instead of autograd's
    zero-filled NLL gradient followed by a separate log-softmax backward over the same N x K elements.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        logp = torch.log_softmax(scores.float(), dim=1)  # N, K
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)
        loss = -logp.gather(1, target[:, None])[:, 0] * valid  # N
        ctx.save_for_backward(logp, target, valid)
        ctx.input_dtype = scores.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logp, target, valid = ctx.saved_tensors
        g = (grad * valid)[:, None]  # N, 1
        dx = logp.exp_().mul_(g)  # softmax * g, in the saved buffer (it is not needed again)
        dx.scatter_add_(1, target[:, None], -g)  # - onehot * g
        return dx.to(ctx.input_dtype), None, None


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel cross-entropy, 0 at ignored pixels.

    Args:
        logits: (B, K, H, W) class scores.
        labels: (B, H, W) int64 labels.

    Returns:
        (B, H, W) float32 losses, equal to `F.cross_entropy(logits, labels, ignore_index=..., reduction="none")`.

    Computed over a (B*H*W, K) view of the channels-last scores, with a fused backward pass (why: docs/design.md,
    "Engine").
    """
    B, K, H, W = logits.shape
    flat = logits.permute(0, 2, 3, 1).reshape(B * H * W, K)  # B*H*W, K
    return _PixelCrossEntropy.apply(flat, labels.reshape(-1), ignore_index).view(B, H, W)


@torch.no_grad()
def ohem_weights(pixel_loss: torch.Tensor, labels: torch.Tensor, min_kept: int, ignore_index: int = 255
                 ) -> torch.Tensor:
    """OHEM pixel weights without a threshold.

    Args:
        pixel_loss: (B, H, W) per-pixel decoder loss.
        labels: (B, H, W) labels.
        min_kept: pixels kept per image; the batch keeps its `min_kept * B` hardest valid pixels.
        ignore_index: label of ignored pixels (always weight 0).

    Returns:
        (B, H, W) float weights in {0, 1}.
    """
    valid = (labels != ignore_index).flatten()
    weights = torch.zeros_like(pixel_loss).flatten()
    valid_loss = pixel_loss.flatten()[valid]
    keep = min(min_kept * labels.shape[0], valid_loss.numel())
    valid_weights = torch.zeros_like(valid_loss)
    valid_weights[torch.topk(valid_loss, keep, sorted=False).indices] = 1.0
    weights[valid] = valid_weights
    return weights.view_as(pixel_loss)


def balanced_class_weights(pixel_counts: Sequence[int], power: float = 0.5) -> tuple[float, ...]:
    """Per-class loss weights that lift rare classes: ``w_k ~ frequency_k ** -power``.

    The weights are scaled so that their mean over the labelled pixels is 1 (``sum_k f_k w_k = 1``), which keeps the
    loss on its usual scale; ``power=0.5`` (inverse square root of the frequency) is the common compromise between
    no weighting (0) and full inverse frequency (1). Classes without pixels get weight 1.

    Args:
        pixel_counts: (K,) labelled pixels per class, e.g. `SegmentationDataset.pixel_counts()`.
        power: how strongly to weight by rarity.

    Returns:
        K weights, for `semask_loss(class_weight=...)` / the config's ``loss.class_weight``.
    """
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 0).any()) or counts.sum() <= 0:
        raise UsageError(f"pixel_counts must be K non-negative counts with a positive sum, got {list(pixel_counts)}")
    freq = counts / counts.sum()
    present = freq > 0
    weights = torch.ones_like(freq)
    weights[present] = freq[present] ** -power
    weights[present] /= (freq[present] * weights[present]).sum()
    return tuple(float(w) for w in weights)


def semask_loss(output: SegmentationOutput, labels: torch.Tensor, prior_weight: float = 0.4,
                ignore_index: int = 255, ohem_min_kept: Optional[int] = None,
                class_weight: Optional[Sequence[float]] = None) -> LossOutput:
    """The SeMask FPN training loss.

    Args:
        output: the model's output: its `logits` (or, when the labels have another size, its 1/4-resolution
            `decoder_logits`) and its `prior_logits`, resized bilinearly to the label size.
        labels: (B, H, W) integer labels, `ignore_index` for unlabelled pixels.
        prior_weight: weight of the semantic-prior loss (0.4 in every recipe).
        ignore_index: ignored label.
        ohem_min_kept: enable OHEM on the decoder loss with this many pixels per image (100000 in the recipes).
        class_weight: K per-class weights of both cross-entropies (mmseg's `class_weight`): a pixel of class k
            counts `class_weight[k]` times; OHEM then ranks the weighted losses. None: all 1 (every released recipe).

    Returns:
        `LossOutput` with `total = decode + prior`.
    """
    _loss_settings("semask_loss", prior_weight, ignore_index, ohem_min_kept, class_weight)
    if ignore_index < output.decoder_logits.shape[1]:
        raise UsageError(f"semask_loss: ignore_index {ignore_index} is also a class id (the model predicts "
                         f"{output.decoder_logits.shape[1]} classes): that class would never be trained; use 255")
    _check_labels(labels, output.decoder_logits, ignore_index)
    labels = labels.long()
    size = labels.shape[-2:]
    # the model's logits are already the decoder logits resized to the input size: reuse them when it matches
    logits = output.logits if output.logits.shape[-2:] == size else resize(output.decoder_logits, size)
    decode = pixel_cross_entropy(logits, labels, ignore_index)
    weight = None
    if class_weight is not None:
        num_classes = output.decoder_logits.shape[1]
        if len(class_weight) != num_classes:
            raise UsageError(f"class_weight has {len(class_weight)} values for {num_classes} classes")
        table = torch.ones(256 if ignore_index < 256 else ignore_index + 1, device=labels.device)
        table[:num_classes] = torch.as_tensor(class_weight, dtype=torch.float32, device=labels.device)
        weight = table[labels.clamp(0, table.numel() - 1)]  # B, H, W (ignored pixels have loss 0 anyway)
        decode = decode * weight
    if ohem_min_kept is not None:
        decode = decode * ohem_weights(decode.detach(), labels, ohem_min_kept, ignore_index)
    decode = decode.mean()
    prior = None
    if output.prior_logits is not None and prior_weight > 0:
        prior = pixel_cross_entropy(resize(output.prior_logits, size), labels, ignore_index)
        prior = (prior * weight if weight is not None else prior).mean() * prior_weight
    total = decode + prior if prior is not None else decode
    return LossOutput(total=total, decode=decode, prior=prior)


class SeMaskLoss(nn.Module):
    """`semask_loss` as a module with its settings fixed (see there for the arguments)."""

    def __init__(self, prior_weight: float = 0.4, ignore_index: int = 255, ohem_min_kept: Optional[int] = None,
                 class_weight: Optional[Sequence[float]] = None):
        super().__init__()
        checked = _loss_settings("SeMaskLoss", prior_weight, ignore_index, ohem_min_kept, class_weight)
        self.prior_weight, self.ignore_index, self.ohem_min_kept = prior_weight, ignore_index, ohem_min_kept
        self.class_weight = checked.class_weight

    def forward(self, output: SegmentationOutput, labels: torch.Tensor) -> LossOutput:
        return semask_loss(output, labels, self.prior_weight, self.ignore_index, self.ohem_min_kept,
                           self.class_weight)
