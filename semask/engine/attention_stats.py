"""What one image says about SeMask's semantic layers (arXiv 2112.12782): the per-image sums `semask.analyze` adds.

Three pieces, each on the model's device and each reduced to a few numbers before the next image:

- `prior_labels`: a stage's semantic prior used as a segmentation: its (K, h_i, w_i) logits brought to the
  label's pixels by the one grid-to-pixels mapping (`semask.engine.grid.stage_to_pixels`: bilinear,
  align_corners=False, from the cells to their stride blocks of the input, the padding cropped, then to the
  label's size) and argmax'ed; `semask.engine.metrics.confusion_matrix` scores it. `PriorConfusions` adds these
  confusions over a split for every stage and the decoder's summed prior: the one scoring of the priors, shared
  by `semask.analyze` and the evaluation of `semask train` (``eval.prior_metrics``).
- `token_classes`: each token's class, the majority ground-truth label of the image pixels it covers under the
  same mapping (nearest), or -1 for a token that covers no labelled pixel (those are left out as queries).
- `attention_sums`: over the labelled query tokens of one semantic layer, the sums of

  * the normalised entropy of the query's attention row, ``-sum_j a_j log a_j / log N`` with N the keys of the
    row's window (w*w, padded tokens included: they take part in the softmax) or map (h_i*w_i); 0 when N = 1;
  * the attention distance, ``sum_j a_j |p_j - p_i|``, with token positions in input pixels (cell indices times
    the stride per axis, so the distance between token centres);
  * the same-class share, the attention on keys of the query's class, and its chance level, the share uniform
    attention over the same N keys would give (same-class keys / N; padded and unlabelled keys have no class);
  * the class-to-class mass: row = the query's class, column = the key's class (labelled keys only).

`attention_summary` turns the sums (over any number of images and processes) into means. Sums, not means per
image, are what is added, so every labelled token of the split counts once and the reduction is exact.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from semask.engine.grid import Stride, grid_stride, stage_to_pixels, stride_pair
from semask.engine.metrics import confusion_matrix, metrics_from_confusion
from semask.errors import UsageError
from semask.model.semantic import SemanticAttentionMap

__all__ = ["SUM_NAMES", "prior_labels", "PriorConfusions", "token_classes", "attention_sums", "attention_summary"]

SUM_NAMES = ("tokens", "entropy", "distance_px", "same_class", "chance")  # the order of `attention_sums`' vector
_CHUNK_BYTES = 64 << 20  # temporaries of one step of the class-chunked argmax and of the attention row chunks


@torch.no_grad()
def prior_labels(logits: torch.Tensor, input_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """A (K, h_i, w_i) prior (or decoder prior) as an (H, W) int64 segmentation of the image, on its device.

    The scores go through `stage_to_pixels` (smooth) at the grid's stride (`grid_stride`); for large maps in
    groups of classes with a running maximum (the first of equal maxima wins, as in `torch.argmax`), which gives
    the same labels because the mapping treats every class alone.
    """
    stride = grid_stride(tuple(logits.shape[-2:]), tuple(input_size))
    K, h_i, w_i = logits.shape
    per_class = 4 * (image_size[0] * image_size[1] + h_i * stride[0] * w_i * stride[1])
    step = max(1, _CHUNK_BYTES // per_class)
    best = labels = None
    for c in range(0, K, step):
        value, index = stage_to_pixels(logits[c:c + step], stride, input_size, image_size, True).max(0)
        if best is None:
            best, labels = value, index
        else:
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, index + c, labels)
    return labels


class PriorConfusions:
    """The semantic priors of a model used as segmentations, scored image by image (`prior_labels`).

    ``confusion[0]`` counts the decoder's summed prior, ``confusion[1 + i]`` stage i's; (1 + S, K, K) int64 on
    `device`, row = ground truth. A prior is scored only when the model has semantic layers of the labels' K
    classes (`scored`): the plain-Swin baseline, an external network and semantic layers of other classes (a
    150-class backbone under a 171-class head) have none, and their metrics are None.

    Args:
        model: a `SeMaskFPN` (or any segmentor; see above), not a DDP wrapper.
        num_classes: K, the classes of the labels.
        device: where the counts live (the model's).

    Attributes:
        num_stages: S, the model's backbone stages (0 without a Swin backbone).
        semantic: the 0-based stages with a semantic layer, in the order of the output's ``stage_priors``.
        scored: whether the stage priors are scored; decoder: whether the decoder's prior is.
    """

    def __init__(self, model: nn.Module, num_classes: int, device: torch.device):
        stages = list(getattr(getattr(model, "backbone", None), "layers", []))
        self.num_stages, self.num_classes = len(stages), num_classes
        self.semantic = [i for i, stage in enumerate(stages) if getattr(stage, "semantic_layer", None) is not None]
        self.scored = bool(self.semantic) and getattr(model.backbone, "num_classes", None) == num_classes
        self.decoder = self.scored and bool(getattr(getattr(model, "decode_head", None), "prior_branch", False))
        self.confusion = torch.zeros(1 + self.num_stages, num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, output: Any, label: torch.Tensor, ignore_index: int = 255) -> None:
        """Score one image's priors: `output` the model's `SegmentationOutput` of it (batch of one, logits at the
        input size), `label` its (H, W) ground truth at the original size."""
        if not self.scored:
            return
        input_size, image_size = tuple(output.logits.shape[-2:]), tuple(label.shape)
        k = self.num_classes
        if self.decoder and output.prior_logits is not None:
            self.confusion[0] += confusion_matrix(prior_labels(output.prior_logits[0], input_size, image_size),
                                                  label, k, ignore_index)
        for j, stage in enumerate(self.semantic):
            self.confusion[1 + stage] += confusion_matrix(
                prior_labels(output.stage_priors[j][0], input_size, image_size), label, k, ignore_index)

    def all_reduce(self) -> None:
        """Sum the counts over the processes of a distributed run (exact: integers)."""
        dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM)

    def stage_metrics(self) -> list[Optional[dict[str, Any]]]:
        """Per stage, `metrics_from_confusion` of its prior (``mIoU``, ``mAcc``, ``aAcc``, ``IoU``, ``Acc``), or
        None where it is not scored."""
        return [metrics_from_confusion(self.confusion[1 + i]) if self.scored and i in self.semantic else None
                for i in range(self.num_stages)]

    def decoder_metrics(self) -> Optional[dict[str, Any]]:
        """`metrics_from_confusion` of the decoder's summed prior, or None without one."""
        return metrics_from_confusion(self.confusion[0]) if self.decoder else None


@torch.no_grad()
def token_classes(label: torch.Tensor, grid: tuple[int, int], stride: Stride, input_size: tuple[int, int],
                  num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Each token's class: the majority label of the labelled pixels it covers (ties: the lowest class id).

    Args:
        label: (H, W) int64 ground truth of the original image, ids 0..K-1 or `ignore_index`.
        grid: (h_i, w_i) the stage's feature grid.
        stride: input pixels per cell.
        input_size: (h, w) of the input the model saw.
        num_classes: K.
        ignore_index: the label of unlabelled pixels.

    Returns:
        (h_i, w_i) int64 on the label's device; -1 for tokens that cover no labelled pixel.
    """
    h_i, w_i = grid
    rows = torch.arange(h_i, device=label.device, dtype=torch.float32)[:, None].expand(h_i, w_i)
    cols = torch.arange(w_i, device=label.device, dtype=torch.float32)[None, :].expand(h_i, w_i)
    # the cell of every image pixel, by the one mapping (nearest); row and column apart, exact in float32
    where = stage_to_pixels(torch.stack([rows, cols]), stride, input_size, tuple(label.shape), False).long()
    cell = where[0] * w_i + where[1]  # H, W
    valid = label != ignore_index
    counts = torch.bincount(cell[valid] * num_classes + label[valid], minlength=h_i * w_i * num_classes)
    counts = counts.view(h_i * w_i, num_classes)
    classes = counts.argmax(1)
    classes[counts.sum(1) == 0] = -1
    return classes.view(h_i, w_i)


def _window_classes(classes: torch.Tensor, amap: SemanticAttentionMap) -> torch.Tensor:
    """(h_i, w_i) token classes in the attention's layout, (G, N): windows row-major, -1 on the padding."""
    groups, n = amap.weights.shape[1] * amap.weights.shape[2], amap.weights.shape[-1]
    w = amap.window_size
    if w is None:
        out = classes.reshape(1, -1)
    else:
        nh, nw = amap.weights.shape[1:3]
        padded = F.pad(classes, (0, nw * w - classes.shape[1], 0, nh * w - classes.shape[0]), value=-1)
        out = padded.view(nh, w, nw, w).permute(0, 2, 1, 3).reshape(nh * nw, w * w)  # as window_partition
    if tuple(out.shape) != (groups, n):
        raise UsageError(f"token classes of a {tuple(classes.shape)} grid do not fit attention weights of shape "
                         f"{tuple(amap.weights.shape)}")
    return out


def _positions(amap: SemanticAttentionMap, stride: Stride, device: torch.device) -> torch.Tensor:
    """(N, 2) positions in input pixels of the tokens of one window (or of the whole map)."""
    sy, sx = stride_pair(stride)
    side_h, side_w = (amap.height, amap.width) if amap.window_size is None else (amap.window_size,) * 2
    r, c = torch.meshgrid(torch.arange(side_h, device=device), torch.arange(side_w, device=device), indexing="ij")
    return torch.stack([r.reshape(-1) * float(sy), c.reshape(-1) * float(sx)], dim=1)  # N, 2


@torch.no_grad()
def attention_sums(amap: SemanticAttentionMap, classes: torch.Tensor, stride: Stride, num_classes: int,
                   batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums one semantic layer adds for one image (see the module docstring for what each one is).

    Args:
        amap: the layer's `SemanticAttentionMap` (rows are softmax distributions over a window or the map).
        classes: (h_i, w_i) int64 token classes (`token_classes`), -1 for unlabelled tokens.
        stride: input pixels per cell (for the distances).
        num_classes: K, the classes of the labels.
        batch_index: which image of the attention's batch.

    Returns:
        ``(sums, class_mass)``: (5,) float64 in the order of `SUM_NAMES` (labelled query tokens, then the sums of
        entropy, distance, same-class share and chance over them), and (K, K) float64 attention mass from
        queries of class a (row) to keys of class b (column). On the attention's device.
    """
    if tuple(classes.shape) != (amap.height, amap.width):
        raise UsageError(f"token classes of shape {tuple(classes.shape)} for a {amap.height}x{amap.width} layer")
    weights = amap.weights[batch_index].float()  # nH, nW, N, N
    n = weights.shape[-1]
    weights = weights.reshape(-1, n, n)  # G, N, N
    device = weights.device
    groups = weights.shape[0]
    cls = _window_classes(classes.to(device), amap)  # G, N
    onehot = F.one_hot(cls.clamp_min(0), num_classes).float() * (cls >= 0)[..., None].float()  # G, N, K
    per_group = onehot.sum(1)  # G, K: labelled keys of each class in each window
    positions = _positions(amap, stride, device)  # N, 2
    sums = torch.zeros(len(SUM_NAMES), dtype=torch.float64, device=device)
    mass = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    log_n = math.log(n) if n > 1 else 1.0  # one key: entropy 0 (-1 * 0 / 1)
    rows = max(1, _CHUNK_BYTES // (4 * groups * (2 * n + num_classes)))
    for r0 in range(0, n, rows):
        q = cls[:, r0:r0 + rows]  # G, R: the queries' classes
        valid = q >= 0
        if not bool(valid.any()):
            continue
        a = weights[:, r0:r0 + rows]  # G, R, N
        entropy = -torch.special.xlogy(a, a).sum(-1) / log_n  # G, R
        distance = (a * torch.cdist(positions[r0:r0 + rows], positions)).sum(-1)  # G, R
        to_class = a @ onehot  # G, R, K: attention on each class's keys
        index = q.clamp_min(0)
        same = to_class.gather(-1, index[..., None])[..., 0]  # G, R
        chance = per_group.gather(-1, index) / n  # G, R
        parts = [valid.sum(), entropy[valid].sum(), distance[valid].sum(), same[valid].sum(), chance[valid].sum()]
        sums += torch.stack([p.double() for p in parts])
        mass.index_add_(0, q[valid], to_class[valid].double())
    return sums, mass


def attention_summary(sums: torch.Tensor, class_mass: torch.Tensor) -> dict[str, Any]:
    """Means over the labelled query tokens from summed `attention_sums` (any number of images or processes).

    Returns:
        ``{"num_tokens": int, "attention_entropy", "attention_distance_px", "same_class_attention",
        "same_class_chance": float or None (None without a labelled token), "class_attention": (K, K)
        float64}``; row a of ``class_attention`` is where the attention of class-a queries that lands on labelled
        keys goes (rows sum to 1), NaN for a class without a labelled query token.
    """
    values = sums.detach().double().cpu().numpy()
    tokens = int(round(values[0]))
    mean: list[Optional[float]] = [float(v / tokens) if tokens else None for v in values[1:]]
    mass = class_mass.detach().double().cpu().numpy()
    total = mass.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(total > 0, mass / total, np.nan)
    return {"num_tokens": tokens, "attention_entropy": mean[0], "attention_distance_px": mean[1],
            "same_class_attention": mean[2], "same_class_chance": mean[3], "class_attention": rows}
