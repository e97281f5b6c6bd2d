"""Segmentation metrics of SeMask (arXiv 2112.12782), with mmsegmentation's definitions (docs/recipes.md §6).

Over a whole split, per class ``k``: intersection ``I_k`` (pixels predicted k and labelled k), prediction area
``P_k``, label area ``L_k`` and union ``U_k = P_k + L_k - I_k``, counting only pixels whose label is not the
ignore index. Then ``IoU_k = I_k / U_k`` (NaN when the class is absent from both predictions and labels),
``Acc_k = I_k / L_k`` (NaN when absent from the labels), ``mIoU``/``mAcc`` are the means over the classes whose
value is defined, and ``aAcc = sum(I) / sum(L)``.

Every area is counted once, in :func:`confusion_matrix` (``torch.bincount`` on the model's device, int64), and
read off it by :func:`areas_from_confusion`. :class:`SegmentationMetric` accumulates the areas, so its memory does
not grow with the number of images and merging across processes (a sum) is exact.
:func:`mean_iou` is the functional form; :func:`format_table` prints the per-class table.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from semask.device import check_tensor
from semask.errors import UsageError, UsageTypeError

__all__ = ["SegmentationMetric", "mean_iou", "format_table", "metrics_from_areas", "metrics_from_confusion",
           "confusion_matrix", "areas_from_confusion", "metric_value"]


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device, name: str = "class ids") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        check_tensor(x, name)  # values must be readable: not meta, sparse, quantised or nested
    tensor = torch.as_tensor(x, device=device)
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise UsageTypeError(f"expected integer class ids, got dtype {tensor.dtype}; pass argmax'ed predictions")
    return tensor.long()


def _nanmean(values: np.ndarray) -> float:
    """Mean over the defined (non-NaN) entries; NaN when none is defined."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def metrics_from_areas(intersect: np.ndarray, union: np.ndarray, pred_area: np.ndarray,
                       label_area: np.ndarray) -> dict[str, Any]:
    """aAcc, mIoU, mAcc and per-class IoU / Acc from per-class areas (each a ``(K,)`` array).

    Returns:
        ``{"aAcc": float, "mIoU": float, "mAcc": float, "IoU": (K,) float64, "Acc": (K,) float64}`` with
        fractions in [0, 1] and NaN for undefined classes.
    """
    intersect, union = np.asarray(intersect, np.float64), np.asarray(union, np.float64)
    label_area = np.asarray(label_area, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersect / union, np.nan)
        acc = np.where(label_area > 0, intersect / label_area, np.nan)
    total = label_area.sum()
    return {
        "aAcc": float(intersect.sum() / total) if total > 0 else float("nan"),
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "IoU": iou,
        "Acc": acc,
    }


@torch.no_grad()
def confusion_matrix(pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """Pixel counts of (ground truth, prediction) pairs, ignoring label ``ignore_index``: where every area is counted.

    Args:
        pred: ``(H, W)`` or ``(B, H, W)`` integer class ids in ``0 .. K - 1``.
        label: same shape; class ids or ``ignore_index``.
        num_classes: K.
        ignore_index: label value excluded (predictions there do not count).

    Returns:
        ``(K, K)`` int64 tensor on the prediction's device (the CPU for an array); row = ground truth, column =
        prediction. `areas_from_confusion` gives the per-class areas from it.

    Raises:
        UsageTypeError: floating-point or boolean class ids. UsageError: shapes that differ, ids outside
        ``0 .. K - 1`` (the message lists them).
    """
    device = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
    pred_t, label_t = _as_tensor(pred, device, "prediction"), _as_tensor(label, device, "label")
    if pred_t.shape != label_t.shape:
        raise UsageError(f"prediction shape {tuple(pred_t.shape)} differs from label shape {tuple(label_t.shape)}; "
                         "resize the prediction to the label size first")
    valid = label_t != ignore_index
    pred_v, label_v = pred_t[valid], label_t[valid]  # N, the labelled pixels
    k = num_classes
    for name, ids in (("prediction", pred_v), ("label", label_v)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
            bad = torch.unique(ids[(ids < 0) | (ids >= k)]).tolist()[:10]
            raise UsageError(f"{name} values {bad} are outside 0..{k - 1} (ignore_index={ignore_index} is excluded "
                             "from labels only)")
    counts = torch.bincount(label_v * k + pred_v, minlength=k * k)
    return counts.view(k, k)


def areas_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """The per-class areas of a ``(K, K)`` confusion matrix (row = ground truth, column = prediction).

    Returns:
        ``(4, K)`` int64: intersection (the diagonal), union, prediction area (column sums), label area (row sums).
    """
    intersect = confusion.diagonal()
    pred_area, label_area = confusion.sum(0), confusion.sum(1)
    return torch.stack([intersect, pred_area + label_area - intersect, pred_area, label_area])


def metrics_from_confusion(confusion: torch.Tensor) -> dict[str, Any]:
    """`metrics_from_areas` of the areas of a ``(K, K)`` confusion matrix."""
    return metrics_from_areas(*areas_from_confusion(confusion).cpu().numpy())


def metric_value(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    """``metrics[key]`` (a summary fraction such as ``"mIoU"``) as a float for records and JSON: None for no
    metrics and for an undefined (NaN) value."""
    if metrics is None:
        return None
    value = float(metrics[key])
    return None if math.isnan(value) else value


class SegmentationMetric:
    """Streaming per-class areas over a split; memory is four ``(K,)`` int64 vectors whatever the split size.

    Args:
        num_classes: number of classes K; predictions and labels hold ids ``0 .. K - 1``.
        ignore_index: label value excluded from every area (predictions there do not count).
        device: where the areas live (the model's device; bincount runs there).

    Example::

        metric = SegmentationMetric(150, device="cuda")
        for image, label in loader:
            metric.update(model(image).argmax(1), label)
        result = metric.compute(sync=True)  # sums over torch.distributed processes first
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if num_classes <= 0:
            raise UsageError(f"SegmentationMetric: num_classes must be positive, got {num_classes}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
            raise UsageError(f"SegmentationMetric: ignore_index must be an integer that is not a class id "
                             f"(0..{num_classes - 1}), e.g. 255; got {ignore_index!r}: that class would never be "
                             "scored")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.areas = torch.zeros(4, num_classes, dtype=torch.int64, device=self.device)  # I, U, P, L

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.areas.zero_()

    @torch.no_grad()
    def update(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one prediction / label pair (or a batch): the areas of their `confusion_matrix`.

        Args:
            pred: ``(H, W)`` or ``(B, H, W)`` integer class ids in ``0 .. K - 1``.
            label: same shape; class ids or ``ignore_index``.
        """
        confusion = confusion_matrix(_as_tensor(pred, self.device, "prediction"), label, self.num_classes,
                                     self.ignore_index)
        self.areas += areas_from_confusion(confusion)

    def merge(self, other: SegmentationMetric) -> SegmentationMetric:
        """Add the areas of another accumulator (same K) to this one; returns self."""
        if other.num_classes != self.num_classes:
            raise UsageError(f"SegmentationMetric.merge: {other.num_classes} classes vs {self.num_classes}")
        self.areas += other.areas.to(self.device)
        return self

    def all_reduced(self) -> SegmentationMetric:
        """A new accumulator holding the areas summed over all torch.distributed processes.

        This accumulator is left unchanged, so calling it twice does not double-count. Without an initialised
        process group (or with one process) it returns a copy. Every process must call it (collective op).
        """
        merged = SegmentationMetric(self.num_classes, self.ignore_index, self.device)
        merged.areas.copy_(self.areas)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(merged.areas, op=dist.ReduceOp.SUM)
        return merged

    def compute(self, sync: bool = False) -> dict[str, Any]:
        """The metrics (see :func:`metrics_from_areas`), after summing over processes when ``sync``."""
        source = self.all_reduced() if sync else self
        intersect, union, pred_area, label_area = source.areas.cpu().numpy()
        return metrics_from_areas(intersect, union, pred_area, label_area)


def mean_iou(preds: Iterable[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
             labels: Iterable[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
             num_classes: int, ignore_index: int = 255) -> dict[str, Any]:
    """aAcc, mIoU, mAcc and per-class IoU / Acc of a whole set of predictions.

    Args:
        preds: ``(N, H, W)`` array/tensor, a single ``(H, W)`` map, or a sequence of ``(H_i, W_i)`` maps of
            integer class ids.
        labels: the matching label maps (``ignore_index`` excluded).
        num_classes: number of classes K.
        ignore_index: label value to ignore.

    Returns:
        ``{"aAcc", "mIoU", "mAcc"}`` floats in [0, 1] (NaN-aware means over defined classes) and ``"IoU"``,
        ``"Acc"`` ``(K,)`` float64 arrays with NaN for undefined classes.
    """
    metric = SegmentationMetric(num_classes, ignore_index)
    if isinstance(preds, (np.ndarray, torch.Tensor)) and isinstance(labels, (np.ndarray, torch.Tensor)):
        metric.update(preds, labels)
    else:
        preds, labels = list(preds), list(labels)
        if len(preds) != len(labels):
            raise UsageError(f"mean_iou: {len(preds)} predictions but {len(labels)} labels")
        for pred, label in zip(preds, labels):
            metric.update(pred, label)
    return metric.compute()


def format_table(result: dict[str, Any], class_names: Sequence[str] | None = None, digits: int = 2) -> str:
    """A plain-text per-class table (percentages) followed by the summary line.

    Args:
        result: output of :func:`mean_iou` or :meth:`SegmentationMetric.compute`.
        class_names: one name per class (``class 0``, ``class 1``, ... when None).
        digits: decimals of the percentages.

    Returns:
        The table as a string; undefined values print as ``nan``.
    """
    iou, acc = np.asarray(result["IoU"]), np.asarray(result["Acc"])
    names = list(class_names) if class_names is not None else [f"class {k}" for k in range(iou.size)]
    if len(names) != iou.size:
        raise UsageError(f"format_table: {len(names)} class names for {iou.size} classes")
    width = max([len("Class")] + [len(n) for n in names])

    def pct(value: float) -> str:
        return "nan" if np.isnan(value) else f"{100.0 * value:.{digits}f}"

    cols = 8 + digits
    lines = [f"| {'Class':<{width}} | {'IoU':>{cols}} | {'Acc':>{cols}} |",
             f"|{'-' * (width + 2)}|{'-' * (cols + 2)}|{'-' * (cols + 2)}|"]
    lines += [f"| {n:<{width}} | {pct(i):>{cols}} | {pct(a):>{cols}} |" for n, i, a in zip(names, iou, acc)]
    lines.append(f"Summary: aAcc {pct(result['aAcc'])}  mIoU {pct(result['mIoU'])}  mAcc {pct(result['mAcc'])}")
    return "\n".join(lines)
