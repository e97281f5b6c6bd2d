"""One image through one SeMask model (arXiv 2112.12782), kept for the viewers: `analyse_image`, `ImageAnalysis`.

The model runs once, through the evaluation protocol's own whole-image forward (`semask.engine.inference.Predictor`,
docs/recipes.md §6: a keep-ratio rescale to the test scale); the prediction is that protocol's, and each stage's
prior and attention are brought to the original image's pixels by `semask.viz.stages.stage_to_image`. Asked to
measure, the same pass also gives `semask.analyze`'s numbers for the one image
(`semask.engine.analysis.analyze_output`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from semask.data.transforms import TestPipelineConfig
from semask.engine.analysis import Analysis, analyze_output, stage_gammas
from semask.engine.inference import ImageInput, Predictor, load_image, resolve_test_config
from semask.engine.metrics import mean_iou
from semask.errors import UsageError
from semask.model.semantic import SemanticAttentionMap
from semask.viz.inputs import names_caller, to_numpy
from semask.viz.stages import cell_box, prior_on_image, stage_to_image

__all__ = ["TestPreset", "ImageAnalysis", "analyse_image", "semantic_gammas"]

TestPreset = Union[str, TestPipelineConfig, None]


def semantic_gammas(model: nn.Module) -> list[list[float]]:
    """Each semantic layer's gates: ``[[gamma of block 1, ...] per stage with one]``; empty for the baseline.

    `semask.engine.analysis.stage_gammas` without the stages that have no semantic layer. ``gamma`` scales the
    semantic attention's output before it is added to the normalised features (it starts at 0: an untrained
    layer passes its features through unchanged).
    """
    return [g for g in stage_gammas(model) if g is not None]


@dataclass
class ImageAnalysis:
    """Everything the viewers draw for one image through one model (one forward pass, on the CPU after).

    Attributes:
        image: (H, W, 3) uint8, the original image.
        label: (H, W) int64 ground truth (255 = ignore), or None.
        prediction: (H, W) int64 predicted classes at the original size.
        input_size: (h, w) the model saw, the keep-ratio test scale.
        strides: pixels of the (h, w) input per feature cell of each stage (4, 8, 16, 32); of each stage with a
            semantic layer, the order of `stage_priors` and `attentions` (the index `stage` of the methods), when
            the model has any.
        stage_priors: per stage (K, h_i, w_i) float32 class probabilities (the softmax of the semantic prior);
            empty for the plain-Swin baseline.
        attentions: per stage the `SemanticAttentionMap` of image 0 (empty for the baseline or when not asked).
        num_classes: K.
        miou: mIoU of this image's prediction (classes present in the prediction or the label), None without
            a label.
        pixel_accuracy: fraction of labelled pixels predicted right, None without a label.
        measures: `semask.analyze` of this one image (per-stage prior mIoU, same-class attention, ...), when
            asked for and the image has a label; else None.
    """

    image: np.ndarray
    label: Optional[np.ndarray]
    prediction: np.ndarray
    input_size: tuple[int, int]
    strides: tuple[int, ...]
    num_classes: int
    stage_priors: list[torch.Tensor] = field(default_factory=list)
    attentions: list[SemanticAttentionMap] = field(default_factory=list)
    miou: Optional[float] = None
    pixel_accuracy: Optional[float] = None
    measures: Optional[Analysis] = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def _stage(self, stage: int, maps: Sequence[Any], what: str) -> None:
        if not maps:
            raise UsageError(f"no {what} for this image: the model has no semantic layers (a swin_*_fpn baseline)"
                             + (" or attention was not asked for" if what == "attention" else ""))
        if not 0 <= stage < len(maps):
            raise IndexError(f"stage {stage} outside 0..{len(maps) - 1} (stages count from 0 here)")

    def prior_map(self, stage: int, class_index: Optional[int] = None) -> np.ndarray:
        """A stage's semantic prior on the image's pixel grid (`semask.viz.stages.prior_on_image`).

        Args:
            stage: 0-based stage index.
            class_index: a class; None for the argmax over classes.

        Returns:
            (H, W) float32 probability of `class_index` (bilinear), or (H, W) int64 argmax labels (per cell).
        """
        self._stage(stage, self.stage_priors, "semantic prior")
        prior = self.stage_priors[stage]  # K, h_i, w_i
        if class_index is not None and not 0 <= class_index < prior.shape[0]:
            raise IndexError(f"class_index {class_index} outside 0..{prior.shape[0] - 1}")
        return prior_on_image(prior, class_index, self.strides[stage], self.input_size, self.size)

    def query_cell(self, stage: int, row: int, col: int) -> tuple[int, int]:
        """The stage's feature cell (token) that holds image pixel (row, col)."""
        H, W = self.size
        if not (0 <= row < H and 0 <= col < W):
            raise IndexError(f"pixel ({row}, {col}) outside the {H}x{W} image")
        h, w = self.input_size
        s = self.strides[stage]
        amap = self.attentions[stage] if self.attentions else None
        rows = amap.height if amap is not None else -(-h // s)
        cols = amap.width if amap is not None else -(-w // s)
        return min(int(row * h / H) // s, rows - 1), min(int(col * w / W) // s, cols - 1)

    def cell_box(self, stage: int, row0: int, col0: int, rows: int, cols: int) -> tuple[float, float, float, float]:
        """Feature cells [row0, row0 + rows) x [col0, col0 + cols) of a stage as an image box (x, y, width, height)
        in imshow's pixel coordinates (pixel centres at integers); see `semask.viz.stages.cell_box`."""
        return cell_box(row0, col0, rows, cols, self.strides[stage], self.input_size, self.size)

    def attention_map(self, stage: int, row: int, col: int) -> np.ndarray:
        """Where the token holding image pixel (row, col) looks, in a stage's semantic layer.

        Returns:
            (H, W) float32 attention weights on the image's pixel grid (each feature cell a block of pixels;
            zero outside the query's window for a windowed layer).
        """
        self._stage(stage, self.attentions, "attention")
        r, c = self.query_cell(stage, row, col)
        weights = self.attentions[stage].query_map(0, r, c)  # h_i, w_i
        return stage_to_image(weights[None], self.strides[stage], self.input_size, self.size, False)[0]


def _label_of(label: Any, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) int64 ground truth of an image of `size`."""
    lab = to_numpy(label, "label")
    if lab.shape != size or not np.issubdtype(lab.dtype, np.integer):
        raise UsageError(f"expected an (H, W) integer label of the image's size {size}, got shape {lab.shape} "
                         f"dtype {lab.dtype}")
    return lab.astype(np.int64)


@names_caller("analyse_image")
def analyse_image(model: nn.Module, image: ImageInput, label: Optional[np.ndarray] = None, *,
                  test_preset: TestPreset = None, attention: bool = True, measure: bool = False,
                  device: Union[str, torch.device, None] = None) -> ImageAnalysis:
    """Run a model once on one image at the test scale and keep what the viewers draw.

    Args:
        model: a `SeMaskFPN` (or plain-Swin baseline); run in eval mode (its modes are given back), moved to
            `device` when given.
        image: (H, W, 3) uint8 RGB, a path, PIL image or tensor (see `semask.engine.inference.load_image`).
        label: (H, W) ground truth at the image's size (255 = ignore), or None.
        test_preset: a test-pipeline preset name (``"toy"``, ``"ade20k"``, ...) or `TestPipelineConfig`; None:
            the test pipeline of the model's recipe (`semask.engine.inference.model_test_config`).
        attention: also keep every semantic layer's attention weights.
        measure: with a label, also measure the image as `semask.analyze` does (`ImageAnalysis.measures`, from
            the same forward; needs `attention`).
        device: where to run (default: the model's device); the model is moved there.

    Returns:
        `ImageAnalysis`; the prediction is `semask.Predictor`'s in whole-image mode (`Predictor.predict_with_output`).
    """
    config = resolve_test_config(model, test_preset, name="test_preset")
    predictor = Predictor(model, mode="whole", device=device, test_config=config)
    img = load_image(image)  # H, W, 3 uint8
    lab = _label_of(label, img.shape[:2]) if label is not None else None
    labels, out = predictor.predict_with_output(img, return_attention=attention)
    measures = None
    if measure and lab is not None:
        if not attention:
            raise UsageError("measure=True needs attention=True (the attention statistics come from the weights)")
        measures = analyze_output(model, out, labels, lab, class_names=getattr(model, "class_names", None))
    prediction = labels.cpu().numpy()  # H, W
    priors = [p[0].float().softmax(0).cpu() for p in out.stage_priors]  # K, h_i, w_i each
    strides = tuple(getattr(model.backbone, "strides", (4, 8, 16, 32)))
    semantic = [i for i, g in enumerate(stage_gammas(model)) if g is not None]
    if semantic and len(semantic) < len(strides):  # a stage without a semantic layer has no entry in the lists
        strides = tuple(strides[i] for i in semantic)
    attentions = [SemanticAttentionMap(a.weights[:1].float().cpu(), a.window_size, a.height, a.width)
                  for a in out.attentions]
    num_classes = int(out.logits.shape[1])
    miou = accuracy = None
    if lab is not None:
        scores = mean_iou(prediction, lab, num_classes)
        miou, accuracy = scores["mIoU"], scores["aAcc"]
    return ImageAnalysis(image=img, label=lab, prediction=prediction, input_size=tuple(out.logits.shape[-2:]),
                         strides=strides, num_classes=num_classes,
                         stage_priors=priors, attentions=attentions, miou=miou, pixel_accuracy=accuracy,
                         measures=measures)
