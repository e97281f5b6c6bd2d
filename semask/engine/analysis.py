"""What SeMask's semantic layers learn (arXiv 2112.12782), measured over a split: `analyze` and `Analysis`.

For every backbone stage, over every image of a split:

- **prior quality**: the stage's semantic prior used as a segmentation (its logits brought to the label's pixels
  by the one grid-to-pixels mapping, bilinear with align_corners=False, then argmax), scored with the project's
  metrics (`semask.engine.metrics`: mIoU, mAcc, aAcc); the same for the decoder's summed prior, and for the
  model's own prediction (the whole-image protocol of ``semask test``);
- **attention statistics** of the stage's semantic layer (`semask.engine.attention_stats`): normalised entropy,
  attention distance in input pixels, the share of attention on tokens of the query's own class next to its
  chance level, and a class-to-class attention matrix, with each token's class the majority label of its pixels;
- the learned gates ``gamma`` of its semantic blocks.

Each image goes once through the evaluation protocol's own forward (`Predictor.predict_with_output`, whole mode at
the test scale) and is reduced to integer confusion matrices and float64 sums before the next one, so memory does
not grow with the split. Under torchrun each process takes its share of the images (`distributed.shard`) and the
sums are added with ``all_reduce``: the result is the single-process one (the confusions exactly, the float sums
up to the order of additions), on every process.

    analysis = semask.analyze(model, ToyDataset("data/toy", "validation"))
    print(analysis.table())
    analysis.stages[2].same_class_attention, analysis.to_dict()["decoder_prior_mIoU"]

`analyze_output` is the same measurement of one image from a model output the caller already has (the
explorer's per-image analysis panel): one owner, no second forward.
"""
from __future__ import annotations

import json
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from semask.data.transforms import TestPipelineConfig
from semask.engine.attention_stats import (SUM_NAMES, PriorConfusions, attention_sums, attention_summary,
                                           token_classes)
from semask.engine.distributed import progress_bar, shard
from semask.engine.evaluate import check_classes, dataset_sample
from semask.engine.grid import grid_stride
from semask.engine.inference import Predictor
from semask.engine.metrics import confusion_matrix, metric_value, metrics_from_confusion
from semask.errors import UsageError, UsageTypeError

__all__ = ["StageAnalysis", "Analysis", "analyze", "analyze_output", "stage_gammas"]


def stage_gammas(model: nn.Module) -> list[Optional[list[float]]]:
    """Per backbone stage, the gates ``gamma`` of its semantic blocks, or None for a stage without a semantic layer.

    ``gamma`` scales the semantic attention's output before it is added to the normalised features (it starts
    at 0: an untrained layer passes its features through unchanged). A model without a Swin backbone has no
    stages: ``[]``.
    """
    gammas: list[Optional[list[float]]] = []
    for stage in getattr(getattr(model, "backbone", None), "layers", []):
        layer = getattr(stage, "semantic_layer", None)
        gammas.append(None if layer is None else
                      [float(block.gamma.detach().float().cpu()) for block in layer.class_injection])
    return gammas


_metric = metric_value  # a summary metric for JSON and tables: None for NaN


def _clean(value: Any) -> Any:
    """JSON-ready: NaN -> None, numpy scalars and arrays -> Python numbers and lists."""
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


@dataclass
class StageAnalysis:
    """One backbone stage of a model, measured over a split by `analyze`.

    Every semantic field is None for a stage without a semantic layer (the plain-Swin baseline); the prior fields
    are also None when the semantic layers predict other classes than the dataset's (``backbone_classes``).

    Attributes:
        stage: 1-based stage number.
        stride: input pixels per feature cell (4, 8, 16, 32).
        window_size: tokens per side of the semantic attention's windows; None for attention over the whole map
            (and for a stage without a semantic layer, see `semantic`).
        semantic: whether the stage has a semantic layer.
        prior_metrics: ``{"aAcc", "mIoU", "mAcc"}`` fractions and ``"IoU"``, ``"Acc"`` (K,) arrays of the stage's
            prior used as a segmentation (NaN = undefined), or None.
        prior_confusion: (K, K) int64 pixel counts of that segmentation (row = ground truth), or None.
        num_tokens: labelled query tokens the attention statistics average over (every image's, summed).
        attention_entropy: mean normalised entropy of the attention rows, 0 (one key) .. 1 (uniform).
        attention_distance_px: mean attention-weighted distance between query and key token centres, in pixels
            of the model's input (the image rescaled to the test scale).
        same_class_attention: mean share of a query's attention on tokens of its own class, 0..1.
        same_class_chance: the same share under uniform attention over the query's window or map.
        class_attention: (K, K) float64; row a: where the attention of class-a queries that lands on labelled
            keys goes, by key class (rows sum to 1; NaN rows for classes without a labelled query token).
        gamma: the learned gate of each semantic block of the stage.
    """

    stage: int
    stride: int
    window_size: Optional[int] = None
    semantic: bool = False
    prior_metrics: Optional[dict[str, Any]] = None
    prior_confusion: Optional[np.ndarray] = None
    num_tokens: int = 0
    attention_entropy: Optional[float] = None
    attention_distance_px: Optional[float] = None
    same_class_attention: Optional[float] = None
    same_class_chance: Optional[float] = None
    class_attention: Optional[np.ndarray] = None
    gamma: Optional[list[float]] = None

    @property
    def prior_mIoU(self) -> Optional[float]:  # noqa: N802 (the metric's name)
        return _metric(self.prior_metrics, "mIoU")

    def to_dict(self, class_names: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        """JSON-ready: fractions in 0..1, None for NaN and for what the stage does not have."""
        names = class_names or ()
        out: dict[str, Any] = {"stage": self.stage, "stride": self.stride, "semantic": self.semantic,
                               "window_size": self.window_size}
        for key in ("mIoU", "mAcc", "aAcc"):
            out[f"prior_{key}"] = _metric(self.prior_metrics, key)
        for key in ("IoU", "Acc"):
            out[f"prior_{key}"] = (None if self.prior_metrics is None else
                                   dict(zip(names, _clean(self.prior_metrics[key]))))
        out.update(num_tokens=self.num_tokens, attention_entropy=self.attention_entropy,
                   attention_distance_px=self.attention_distance_px, same_class_attention=self.same_class_attention,
                   same_class_chance=self.same_class_chance,
                   class_attention=None if self.class_attention is None else _clean(self.class_attention),
                   gamma=self.gamma)
        return out


@dataclass
class Analysis:
    """What `analyze` measured over a split.

    Attributes:
        class_names: the K classes (the dataset's).
        num_images: images measured (all processes together).
        metrics: ``{"aAcc", "mIoU", "mAcc", "IoU", "Acc"}`` of the model's own prediction (whole-image protocol).
        decoder_prior_metrics: the same for the decoder's summed prior used as a segmentation; None without one.
        stages: one `StageAnalysis` per backbone stage (empty for a model without a Swin backbone).
        confusion: (K, K) int64 pixel counts of the model's prediction.
        seconds: wall time (slowest process).
    """

    class_names: tuple[str, ...]
    num_images: int
    metrics: dict[str, Any]
    decoder_prior_metrics: Optional[dict[str, Any]]
    stages: list[StageAnalysis] = field(default_factory=list)
    confusion: Optional[np.ndarray] = None
    seconds: float = 0.0

    @property
    def decoder_prior_mIoU(self) -> Optional[float]:  # noqa: N802 (the metric's name)
        return _metric(self.decoder_prior_metrics, "mIoU")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``semask analyze --json`` writes): fractions in 0..1, NaN as None.

        Top level: ``num_images``, ``classes``, ``mIoU`` / ``mAcc`` / ``aAcc`` of the prediction,
        ``decoder_prior_mIoU`` / ``_mAcc`` / ``_aAcc``, ``seconds`` and ``stages``, one dict per stage
        (`StageAnalysis.to_dict`: ``prior_mIoU``, ``prior_aAcc``, ``attention_entropy``,
        ``attention_distance_px``, ``same_class_attention``, ``same_class_chance``, ``class_attention`` (K rows
        of K), ``gamma``, ...; None where the stage has no semantic layer).
        """
        out: dict[str, Any] = {"num_images": self.num_images, "classes": list(self.class_names)}
        for key in ("mIoU", "mAcc", "aAcc"):
            out[key] = _metric(self.metrics, key)
        for key in ("mIoU", "mAcc", "aAcc"):
            out[f"decoder_prior_{key}"] = _metric(self.decoder_prior_metrics, key)
        out["seconds"] = self.seconds
        out["stages"] = [s.to_dict(self.class_names) for s in self.stages]
        return out

    def save_json(self, path: Union[str, Path]) -> Path:
        """Write `to_dict` as JSON (atomically)."""
        from semask.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    def table(self) -> str:
        """A text table, one row per stage: prior quality and same-class share in percent, entropy 0..1,
        distance in input pixels, gamma; then the decoder prior and the prediction."""
        def num(value: Optional[float], scale: float = 100.0, digits: int = 2) -> str:
            return "-" if value is None or math.isnan(value) else f"{scale * value:.{digits}f}"

        head = ("stage", "attention", "prior mIoU", "prior mAcc", "prior aAcc", "same-class", "chance", "entropy",
                "distance px", "gamma")
        rows = []
        for s in self.stages:
            extent = ("-" if not s.semantic else "global" if s.window_size is None
                      else f"{s.window_size}x{s.window_size}")
            gamma = "-" if s.gamma is None else ",".join(f"{g:.3f}" for g in s.gamma)
            rows.append((f"{s.stage} (/{s.stride})", extent, num(s.prior_mIoU), num(_metric(s.prior_metrics, "mAcc")),
                         num(_metric(s.prior_metrics, "aAcc")), num(s.same_class_attention),
                         num(s.same_class_chance), num(s.attention_entropy, 1.0, 3),
                         num(s.attention_distance_px, 1.0, 1), gamma))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        lines = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
        d = self.decoder_prior_metrics
        lines.append(f"Decoder prior: mIoU {num(_metric(d, 'mIoU'))}  mAcc {num(_metric(d, 'mAcc'))}  "
                     f"aAcc {num(_metric(d, 'aAcc'))}")
        lines.append(f"Prediction: mIoU {num(_metric(self.metrics, 'mIoU'))}  mAcc "
                     f"{num(_metric(self.metrics, 'mAcc'))}  aAcc {num(_metric(self.metrics, 'aAcc'))}  "
                     f"({self.num_images} images; percent except entropy and distance)")
        return "\n".join(lines)


class _Sums:
    """Everything `analyze` adds over images, on the model's device: the prediction's confusion matrix, the priors'
    (`PriorConfusions`: the decoder prior's and each stage's), per stage the `SUM_NAMES` sums and the class-to-class
    mass; and what the model has to be measured (its gammas, its stages with a semantic layer).
    """

    def __init__(self, module: nn.Module, k: int, ignore: int, device: torch.device):
        self.module, self.k, self.ignore = module, k, ignore
        self.gammas = stage_gammas(module)
        # semantic layers of other classes than the labels' (a 150-class backbone under a 171-class head) have no
        # prior to score against these labels (`PriorConfusions`); their attention is still measured with the labels'
        self.priors = PriorConfusions(module, k, device)
        self.semantic = self.priors.semantic
        num_stages = len(self.gammas)
        self.confusion = torch.zeros(k, k, dtype=torch.int64, device=device)
        self.attention = torch.zeros(num_stages, len(SUM_NAMES), dtype=torch.float64, device=device)
        self.mass = torch.zeros(num_stages, k, k, dtype=torch.float64, device=device)

    def all_reduce(self) -> None:
        for tensor in (self.confusion, self.attention, self.mass):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self.priors.all_reduce()

    def add(self, output: Any, pred: torch.Tensor, label: torch.Tensor) -> None:
        """One image's confusions and attention sums (the model's output of one image, the (H, W) prediction)."""
        k, ignore = self.k, self.ignore
        self.confusion += confusion_matrix(pred, label, k, ignore)  # checks the label's ids first
        self.priors.add(output, label, ignore)
        input_size = tuple(output.logits.shape[-2:])
        for j, stage in enumerate(self.semantic):
            grid = tuple(output.stage_priors[j].shape[-2:])
            stride = grid_stride(grid, input_size)
            classes = token_classes(label, grid, stride, input_size, k, ignore)
            part, mass = attention_sums(output.attentions[j], classes, stride, k)
            self.attention[stage] += part.to(self.attention.device)
            self.mass[stage] += mass.to(self.mass.device)

    def result(self, class_names: tuple[str, ...], num_images: int, seconds: float) -> Analysis:
        """The `Analysis` of the sums added so far (over `num_images` images)."""
        strides = list(getattr(getattr(self.module, "backbone", None), "strides", []))
        return Analysis(class_names=class_names, num_images=num_images,
                        metrics=metrics_from_confusion(self.confusion),
                        decoder_prior_metrics=self.priors.decoder_metrics(), stages=self._stage_results(strides),
                        confusion=self.confusion.cpu().numpy(), seconds=seconds)

    def _stage_results(self, strides: list[int]) -> list[StageAnalysis]:
        results = []
        prior_metrics = self.priors.stage_metrics()
        for i, gamma in enumerate(self.gammas):
            stage = StageAnalysis(stage=i + 1, stride=strides[i])
            if gamma is not None:
                stage.semantic, stage.gamma = True, gamma
                stage.window_size = self.module.backbone.layers[i].semantic_layer.window_size
                if prior_metrics[i] is not None:
                    stage.prior_confusion = self.priors.confusion[1 + i].cpu().numpy()
                    stage.prior_metrics = prior_metrics[i]
                summary = attention_summary(self.attention[i], self.mass[i])
                stage.num_tokens = summary.pop("num_tokens")
                for key, value in summary.items():
                    setattr(stage, key, value)
            results.append(stage)
        return results


def _class_names(module: nn.Module, given: Optional[Any]) -> tuple[str, ...]:
    return tuple(given or module.class_names or [f"class {k}" for k in range(module.num_classes)])


def _check_max_images(max_images: object) -> Optional[int]:
    if max_images is None:
        return None
    if isinstance(max_images, bool) or not isinstance(max_images, numbers.Integral):
        raise UsageTypeError(f"max_images must be a positive int or None, got {max_images!r}")
    if max_images < 1:
        raise UsageError(f"max_images must be a positive int or None, got {max_images}")
    return int(max_images)


@torch.no_grad()
def analyze(model: nn.Module, dataset: Any, *, max_images: Optional[int] = None,
            device: Union[str, torch.device, None] = None, progress: bool = True,
            test_config: Union[TestPipelineConfig, str, None] = None,
            amp_dtype: Union[torch.dtype, str, None] = None) -> Analysis:
    """Measure what a model's semantic layers learn over a dataset split (see the module docstring).

    Args:
        model: a `SeMaskFPN` (a DDP wrapper's module is used), or the plain-Swin baseline (its semantic entries
            are None); run in eval mode, its mode given back.
        dataset: a `semask.data` dataset; its raw samples (``dataset.load(i)``: image and label at the original
            size) are used, whatever transform it carries. Its classes must be the model's.
        max_images: the first N images only (default: all).
        device: where to run (default: the model's device; given, the model is moved there).
        progress: show a progress bar (on the first process).
        test_config: the test scale and normalisation, a `TestPipelineConfig` or a `TEST_PRESETS` name (default:
            the model's recipe, `semask.engine.inference.model_test_config`); whole-image inference, one view.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``), None for fp32, or a precision name
            (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``), as `Predictor` takes it.

    Returns:
        An `Analysis`; the same on every process of a distributed run.

    Raises:
        UsageError: an empty dataset, a bad argument, classes that do not fit, labels outside 0..K-1.
        NonFiniteError: the model's scores are NaN or infinite.
    """
    module = getattr(model, "module", model)
    max_images = _check_max_images(max_images)
    predictor = Predictor(module, mode="whole", device=device, amp_dtype=amp_dtype, test_config=test_config)
    check_classes(module, dataset)
    class_names = _class_names(module, getattr(dataset, "class_names", None))
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n < 1:
        raise UsageError(f"analyze: the dataset {dataset!r} has no images")
    sums = _Sums(module, module.num_classes, getattr(dataset, "ignore_index", 255), predictor.device)
    indices, rank, world = shard(n)
    bar = progress_bar(n, "analyze", "img", progress and rank == 0)
    start = time.perf_counter()
    try:
        for i in indices:
            sample = dataset_sample(dataset, i, "analyze")
            pred, output = predictor.predict_with_output(sample["image"], return_attention=bool(sums.semantic))
            label = torch.as_tensor(np.asarray(sample["label"]), device=predictor.device).long()
            if tuple(label.shape) != tuple(pred.shape):
                raise UsageError(f"analyze: image {i} ({sample.get('path', 'no path')}) is {tuple(pred.shape)} pixels "
                                 f"but its label is {tuple(label.shape)}; labels must have their image's size")
            try:
                sums.add(output, pred, label)
            except UsageError as exc:  # a label the metrics refuse: say which image
                raise UsageError(f"analyze: image {i} ({sample.get('path', 'no path')}): {exc}") from exc
            del output
            bar.update(min(world, n - bar.n))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if world > 1:
        sums.all_reduce()
        slowest = torch.tensor([seconds], dtype=torch.float64, device=predictor.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        seconds = float(slowest.item())
    return sums.result(class_names, n, seconds)


@torch.no_grad()
def analyze_output(model: nn.Module, output: Any, prediction: torch.Tensor, label: Any, *,
                   class_names: Optional[Any] = None, ignore_index: int = 255) -> Analysis:
    """`analyze` of one image, from the model's output for it: the same measures, without a second forward.

    Args:
        model: the `SeMaskFPN` that made `output` (a DDP wrapper's module is used).
        output: its `SegmentationOutput` of one image, from the evaluation protocol's forward with the attention
            (``Predictor(model, mode="whole").predict_with_output(image, return_attention=True)``).
        prediction: (H, W) int64 labels that call returned, at the original image size.
        label: (H, W) ground truth of that image (`ignore_index` for unlabelled pixels), a tensor or array.
        class_names: the K class names (default: the model's).
        ignore_index: the label of unlabelled pixels.

    Returns:
        An `Analysis` with ``num_images == 1``: what `analyze` gives on a dataset of this one image.

    Raises:
        UsageError: a label of another size than the prediction, label ids outside 0..K-1, or an output of a
            model with semantic layers that holds no attention weights.
    """
    module = getattr(model, "module", model)
    sums = _Sums(module, module.num_classes, ignore_index, prediction.device)
    label = torch.as_tensor(np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label),
                            device=prediction.device).long()
    if tuple(label.shape) != tuple(prediction.shape):
        raise UsageError(f"analyze_output: the prediction is {tuple(prediction.shape)} pixels but the label is "
                         f"{tuple(label.shape)}; the label must have its image's size")
    if len(output.attentions) != len(sums.semantic):
        raise UsageError(f"analyze_output: the output holds {len(output.attentions)} attention maps for "
                         f"{len(sums.semantic)} semantic layers; run the model with return_attention=True")
    sums.add(output, prediction, label)
    return sums.result(_class_names(module, class_names), 1, 0.0)
