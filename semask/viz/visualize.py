"""Drawing label maps, overlays, semantic priors and attention for SeMask results (arXiv 2112.12782).

The array functions (`colorize`, `overlay`, `save_label_map`, `denormalize`) return numpy arrays or files. The
`plot_*` functions draw matplotlib figures for the notebooks and return the `Figure`; each accepts axes to draw
into, and imports pyplot only when called (importing semask selects no matplotlib backend):

- `plot_segmentation`: an image with its ground truth and/or predictions, and a legend of the classes present;
- `plot_samples`: a grid of images with their label maps (dataset samples, augmented views, batches);
- `plot_stage_priors`: the semantic prior of each backbone stage, the "semantic masks" SeMask is named after;
- `plot_attention`: where one query token of a semantic layer attends;
- `plot_training_log`: loss terms, learning rate and validation mIoU of one or several runs' `log.jsonl`, and
  `LiveTrainingPlot`, a `semask.engine.train` callback that redraws them in place in a notebook while a run goes on;
- `plot_class_iou`: per-class IoU bars of one or several results;
- `plot_results` (with `results_table`): several runs grouped by setting, mean and spread over seeds;
- `plot_confusion`: a row-normalised confusion matrix;
- `plot_evaluation_panel`: image, ground truth, prediction and error map of one evaluated image.

`error_map` (correct / wrong / ignored pixels) and `class_legend` are shared with `semask.viz.widgets`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semask.data.classes import default_palette
from semask.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_label
from semask.engine.inference import ImageInput, load_image
from semask.engine.rundir import LOG_FILE, read_training_log
from semask.model.semantic import SemanticAttentionMap
from semask.model.segmentor import SegmentationOutput
from semask.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend

__all__ = [
    "default_palette",
    "colorize",
    "overlay",
    "save_label_map",
    "denormalize",
    "plot_segmentation",
    "plot_samples",
    "plot_stage_priors",
    "plot_attention",
    "ERROR_CLASSES",
    "ERROR_PALETTE",
    "error_map",
    "class_legend",
    "plot_evaluation_panel",
    "read_training_log",
    "plot_training_log",
    "LiveTrainingPlot",
    "plot_class_iou",
    "ResultsTable",
    "results_table",
    "plot_results",
    "plot_confusion",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
Palette = Sequence[Sequence[int]]
PANEL_INCHES = 3.0  # side of one image panel in the plot_* figures


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255,
             ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Colour a label map.

    Args:
        label: (H, W) integer class indices.
        palette: (K, 3) RGB colours.
        ignore_index: label drawn in `ignore_color`.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {label.shape}")
    lut = np.zeros((max(256, int(label.max(initial=0)) + 1), 3), dtype=np.uint8)
    pal = _as_palette(palette, 0, "colorize")
    lut[: len(pal)] = pal
    lut[ignore_index] = ignore_color
    valid = (label < len(pal)) | (label == ignore_index)
    if not valid.all():
        raise ValueError(f"label values {np.unique(label[~valid])[:10].tolist()} have no colour in a "
                         f"{len(pal)}-colour palette")
    return lut[label]


def overlay(image: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """Blend the coloured label map over an (H, W, 3) uint8 image; ignored pixels keep the image."""
    if image.shape[:2] != np.asarray(label).shape:
        raise ValueError(f"image {image.shape[:2]} and label {np.asarray(label).shape} differ in size")
    color = colorize(label, palette, ignore_index).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + color * alpha
    keep = np.asarray(label) == ignore_index
    out[keep] = image[keep]
    return out.round().astype(np.uint8)


def save_label_map(label: np.ndarray, path: Union[str, os.PathLike],
                   palette: Optional[Sequence[Sequence[int]]] = None) -> Path:
    """Write a label map as PNG atomically: class indices (mode L), or indexed colour (mode P) with a palette."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255 to be stored as PNG, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8))  # mode L; putpalette turns it into mode P
    if palette is not None:
        flat = np.zeros((256, 3), dtype=np.uint8)
        pal = _as_palette(palette, 0, "save_label_map")[:256]
        flat[: len(pal)] = pal
        img.putpalette(flat.flatten().tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------------------------- helpers
def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_image(image: ImageInput, who: str) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from an array/tensor/path (see `semask.engine.inference.load_image`)."""
    if isinstance(image, torch.Tensor):
        floating = image.is_floating_point()
    else:
        floating = isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)
    if floating:
        raise ValueError(f"{who}: expected an (H, W, 3) uint8 RGB image, got a {image.dtype} array of shape "
                         f"{tuple(image.shape)}; bring a normalised (3, H, W) image back with "
                         "semask.viz.visualize.denormalize()")
    try:
        return load_image(image)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{who}: {exc}") from exc


def _as_label(label: ArrayLike, who: str, name: str, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """An (H, W) int64 label map, checked against the image size."""
    array = _numpy(label)
    if array.ndim != 2:
        hint = " (class scores? pass their argmax over the class axis)" if array.ndim == 3 else ""
        raise ValueError(f"{who}: expected {name} as an (H, W) map of class indices, got shape {array.shape}{hint}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{who}: expected integer class indices in {name}, got dtype {array.dtype}")
    if size is not None and array.shape != tuple(size):
        raise ValueError(f"{who}: {name} has size {array.shape} but the image is {tuple(size)}; "
                         "both must be at the same (original) size")
    return array.astype(np.int64)


def _as_palette(palette: Optional[Palette], num_classes: int, who: str) -> np.ndarray:
    """(K, 3) uint8 colours; `default_palette` when None."""
    if palette is None:
        return np.asarray(default_palette(num_classes), dtype=np.uint8)
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{who}: expected a palette of RGB triples, shape (K, 3), got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{who}: palette values must lie in 0..255, got {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def _present(labels: Sequence[np.ndarray], ignore_index: int, palette: Optional[Palette],
             class_names: Optional[Sequence[str]], who: str) -> tuple[list[int], np.ndarray]:
    """Sorted classes present in any of the label maps, and the (K, 3) palette (a default one when None).

    Raises if a present class has no colour or no name.
    """
    present = sorted({int(k) for lab in labels for k in np.unique(lab) if k != ignore_index})
    if present and present[0] < 0:
        raise ValueError(f"{who}: negative class indices {[k for k in present if k < 0][:10]} in the label maps")
    colours = _as_palette(palette, max(present, default=-1) + 1, who)
    if present and present[-1] >= len(colours):
        bad = [k for k in present if k >= len(colours)]
        raise ValueError(f"{who}: class indices {bad[:10]} have no colour in a {len(colours)}-colour palette")
    if class_names is not None and present and present[-1] >= len(class_names):
        raise ValueError(f"{who}: class index {present[-1]} has no name ({len(class_names)} class names given)")
    return present, colours


def class_legend(ax: "Axes", classes: Sequence[int], palette: Palette, class_names: Optional[Sequence[str]] = None,
                 max_entries: int = 24, **legend_kwargs: Any) -> Optional["Legend"]:
    """A legend of coloured patches, one per class in the given order, to the right of `ax`.

    Args:
        ax: the axes the legend belongs to (a previous legend there is replaced).
        classes: class indices to list.
        palette: (K, 3) RGB colours indexed by class.
        class_names: names indexed by class (``class k`` when None).
        max_entries: at most this many entries; the rest are counted in a last "(+n more)" entry.
        **legend_kwargs: passed to `Axes.legend` (defaults: outside the axes, upper left, small font).

    Returns:
        The legend, or None when `classes` is empty (a previous legend is removed all the same).
    """
    from matplotlib.patches import Patch

    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if not len(classes):
        return None
    colours = _as_palette(palette, 0, "class_legend")
    shown = list(classes[:max_entries])
    handles = [Patch(facecolor=colours[k] / 255.0, edgecolor="black", linewidth=0.5,
                     label=class_names[k] if class_names is not None else f"class {k}") for k in shown]
    if len(classes) > len(shown):
        handles.append(Patch(facecolor="none", edgecolor="none", label=f"(+{len(classes) - len(shown)} more)"))
    options = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    options.update(legend_kwargs)
    return ax.legend(handles=handles, **options)


def _add_legend(ax: "Axes", classes: Sequence[int], palette: np.ndarray, class_names: Optional[Sequence[str]],
                max_entries: int) -> None:
    """A legend of coloured patches (one per class, in class order) to the right of `ax`."""
    class_legend(ax, classes, palette, class_names, max_entries)


def _figure_axes(axes: Optional[Union["Axes", Sequence["Axes"]]], nrows: int, ncols: int, who: str,
                 extra_width: float = 0.0) -> tuple["Figure", list["Axes"]]:
    """The caller's axes (exactly nrows * ncols of them) or a new constrained-layout figure's, row-major."""
    needed = nrows * ncols
    if axes is not None:
        flat = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(flat) != needed:
            raise ValueError(f"{who}: needs {needed} axes for this plot, got {len(flat)}")
        return flat[0].figure, flat
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(nrows, ncols, figsize=(ncols * PANEL_INCHES + extra_width, nrows * PANEL_INCHES),
                             squeeze=False, layout="constrained")
    return fig, list(grid.ravel())


def _show(ax: "Axes", picture: np.ndarray, title: str) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title, fontsize="medium")
    ax.set_axis_off()


def denormalize(image: ArrayLike, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Undo the pipelines' normalisation for display.

    Args:
        image: (3, H, W) float image normalised with `mean`/`std` (as `TrainTransform`/`TestTransform` return).
        mean, std: the normalisation's RGB mean and std on the 0..255 scale (ImageNet's by default).

    Returns:
        (H, W, 3) uint8 RGB, rounded and clipped to 0..255.
    """
    array = _numpy(image)
    if array.ndim != 3 or array.shape[0] != 3 or not np.issubdtype(array.dtype, np.floating):
        hint = " (take one image of the batch)" if array.ndim == 4 else ""
        raise ValueError(f"denormalize: expected a normalised float image of shape (3, H, W), got shape "
                         f"{array.shape} dtype {array.dtype}{hint}")
    rgb = array.transpose(1, 2, 0).astype(np.float64) * np.asarray(std) + np.asarray(mean)  # H, W, 3
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- figures
def plot_segmentation(image: ImageInput, label: Optional[ArrayLike], palette: Optional[Palette],
                      class_names: Optional[Sequence[str]] = None,
                      prediction: Optional[Union[ArrayLike, Mapping[str, ArrayLike]]] = None, *,
                      alpha: float = 0.5, ignore_index: int = 255,
                      axes: Optional[Sequence["Axes"]] = None, max_legend: int = 24) -> "Figure":
    """The image, its ground truth and/or predictions as overlays, and a legend of the classes present.

    Args:
        image: (H, W, 3) uint8 RGB (array, (3, H, W) uint8 tensor or path).
        label: (H, W) ground-truth class indices (`ignore_index` drawn as the bare image), or None.
        palette: (K, 3) RGB colours, e.g. `model.palette` or a dataset's `palette` (None: `default_palette`).
        class_names: K names for the legend (``class k`` when None).
        prediction: an (H, W) predicted label map, or a mapping ``{title: (H, W) map}`` for several
            (e.g. ``{"whole": ..., "msflip": ...}``), or None.
        alpha: opacity of the label colours over the image.
        ignore_index: label value left uncoloured.
        axes: 1 + (label given) + (number of predictions) axes to draw into; a new figure when None.
        max_legend: at most this many classes in the legend (class order).

    Returns:
        The figure: one panel for the image, one per label map, each overlay = `overlay(image, map, palette,
        alpha)`.
    """
    who = "plot_segmentation"
    img = _as_image(image, who)
    size = img.shape[:2]
    maps: list[tuple[str, np.ndarray]] = []
    if label is not None:
        maps.append(("ground truth", _as_label(label, who, "the label", size)))
    if isinstance(prediction, Mapping):
        if not prediction:
            raise ValueError(f"{who}: the prediction mapping is empty")
        maps += [(str(title), _as_label(p, who, f"prediction {title!r}", size)) for title, p in prediction.items()]
    elif prediction is not None:
        maps.append(("prediction", _as_label(prediction, who, "the prediction", size)))
    if not maps:
        raise ValueError(f"{who}: nothing to draw; pass a ground-truth `label`, a `prediction`, or both")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{who}: alpha must lie in [0, 1], got {alpha}")
    present, colours = _present([m for _, m in maps], ignore_index, palette, class_names, who)
    fig, flat = _figure_axes(axes, 1, 1 + len(maps), who, extra_width=1.8)
    _show(flat[0], img, "image")
    for ax, (title, m) in zip(flat[1:], maps):
        _show(ax, overlay(img, m, colours, alpha, ignore_index), title)
    _add_legend(flat[-1], present, colours, class_names, max_legend)
    return fig


def plot_samples(images: Sequence[ImageInput], labels: Sequence[ArrayLike], palette: Optional[Palette],
                 class_names: Optional[Sequence[str]] = None, titles: Optional[Sequence[str]] = None, *,
                 ncols: int = 4, alpha: float = 1.0, ignore_index: int = 255, max_legend: int = 24) -> "Figure":
    """A grid of samples: each image above its label map, with one legend for the classes present.

    Args:
        images: N (H_i, W_i, 3) uint8 RGB images (`denormalize` pipeline outputs first).
        labels: N (H_i, W_i) class-index maps; `ignore_index` pixels show the image.
        palette: (K, 3) RGB colours (None: `default_palette`).
        class_names: K names for the legend.
        titles: N titles, one per sample.
        ncols: samples per row.
        alpha: opacity of the label colours over the image in the label row (1 = plain colours).
        ignore_index: label value left uncoloured.
        max_legend: at most this many classes in the legend.

    Returns:
        The figure, with 2 * N axes: row 2r holds images, row 2r + 1 their labels (unused cells removed).
    """
    who = "plot_samples"
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"{who}: expected as many labels as images (at least one), got {len(images)} images "
                         f"and {len(labels)} labels")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{who}: {len(titles)} titles for {len(images)} images")
    if ncols < 1:
        raise ValueError(f"{who}: ncols must be at least 1, got {ncols}")
    imgs = [_as_image(im, who) for im in images]
    labs = [_as_label(lab, who, f"label {i}", im.shape[:2]) for i, (im, lab) in enumerate(zip(imgs, labels))]
    present, colours = _present(labs, ignore_index, palette, class_names, who)
    ncols = min(ncols, len(imgs))
    nrows = -(-len(imgs) // ncols)
    fig, flat = _figure_axes(None, 2 * nrows, ncols, who, extra_width=1.8)
    for i, (img, lab) in enumerate(zip(imgs, labs)):
        r, c = divmod(i, ncols)
        _show(flat[2 * r * ncols + c], img, titles[i] if titles is not None else f"#{i}")
        _show(flat[(2 * r + 1) * ncols + c], overlay(img, lab, colours, alpha, ignore_index), "")
    for i in range(len(imgs), nrows * ncols):  # empty cells of the last row
        r, c = divmod(i, ncols)
        flat[2 * r * ncols + c].remove()
        flat[(2 * r + 1) * ncols + c].remove()
    _add_legend(flat[ncols - 1], present, colours, class_names, max_legend)
    return fig


def _stage_priors(output_or_priors: Union[SegmentationOutput, Sequence[torch.Tensor]], batch_index: int,
                  who: str) -> list[torch.Tensor]:
    """Per stage (K, H_i, W_i) float priors of one image."""
    if isinstance(output_or_priors, SegmentationOutput):
        priors = list(output_or_priors.stage_priors)
    elif isinstance(output_or_priors, (list, tuple)):
        priors = list(output_or_priors)
    else:
        raise TypeError(f"{who}: expected a SegmentationOutput or a list of (B, K, H_i, W_i) tensors, got "
                        f"{type(output_or_priors).__name__}")
    if not priors:
        raise ValueError(f"{who}: no stage priors to draw; the model has no semantic layers (a swin_*_fpn "
                         "baseline) or the list is empty")
    out = []
    for i, p in enumerate(priors):
        if not isinstance(p, torch.Tensor) or p.ndim != 4:
            raise ValueError(f"{who}: stage {i + 1} prior must be a (B, K, H, W) tensor, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if not 0 <= batch_index < p.shape[0]:
            raise IndexError(f"{who}: batch_index {batch_index} outside a batch of {p.shape[0]}")
        if p.shape[1] != priors[0].shape[1]:
            raise ValueError(f"{who}: stage {i + 1} prior has {p.shape[1]} classes, stage 1 has {priors[0].shape[1]}")
        out.append(p[batch_index].detach().float().cpu())  # K, H_i, W_i
    return out


def plot_stage_priors(output_or_priors: Union[SegmentationOutput, Sequence[torch.Tensor]],
                      image: Optional[ImageInput] = None, class_index: Optional[int] = None,
                      class_names: Optional[Sequence[str]] = None, *, palette: Optional[Palette] = None,
                      batch_index: int = 0, alpha: float = 0.6, axes: Optional[Sequence["Axes"]] = None,
                      max_legend: int = 24) -> "Figure":
    """The semantic prior of every backbone stage: SeMask's per-stage "semantic masks".

    Each semantic layer's queries are a (K, H_i, W_i) class-score map (stride 4, 8, 16, 32). Drawn per stage
    is either its argmax (a label map, coloured with `palette`) or, with `class_index`, that class's softmax
    probability over the K classes (0..1, one shared colour bar).

    Args:
        output_or_priors: the model's `SegmentationOutput` or its `stage_priors`, a list of (B, K, H_i, W_i).
        image: (H, W, 3) uint8 image the priors belong to; the maps are upsampled to its size (argmax: nearest,
            scores: bilinear) and drawn over it. None: the maps at their own resolution.
        class_index: draw this class's score map instead of the argmax.
        class_names: K names (legend and title).
        palette: (K, 3) colours of the argmax maps (`default_palette(K)` when None).
        batch_index: which image of the batch.
        alpha: opacity of the maps over the image.
        axes: one axes per stage to draw into; a new figure when None.
        max_legend: at most this many classes in the legend.

    Returns:
        The figure: one axes per stage, plus a colour bar axes when `class_index` is given.
    """
    who = "plot_stage_priors"
    priors = _stage_priors(output_or_priors, batch_index, who)
    num_classes = priors[0].shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{who}: {len(class_names)} class names for priors with {num_classes} classes")
    if class_index is not None and not 0 <= class_index < num_classes:
        raise IndexError(f"{who}: class_index {class_index} outside 0..{num_classes - 1}")
    img = _as_image(image, who) if image is not None else None
    colours = _as_palette(palette, num_classes, who)
    if len(colours) < num_classes:
        raise ValueError(f"{who}: a {len(colours)}-colour palette for priors with {num_classes} classes")
    fig, flat = _figure_axes(axes, 1, len(priors), who, extra_width=1.8)
    present: set[int] = set()
    heat = None
    for i, (ax, prior) in enumerate(zip(flat, priors)):
        h, w = prior.shape[1:]
        title = f"stage {i + 1} ({h}x{w})"
        if class_index is None:
            labels = prior.argmax(0).numpy()  # H_i, W_i
            present.update(np.unique(labels).tolist())
            if img is None:
                _show(ax, colorize(labels, colours), title)
            else:
                _show(ax, overlay(img, resize_label(labels, img.shape[:2]), colours, alpha), title)
            continue
        score = prior.softmax(0)[class_index]  # H_i, W_i
        if img is not None:
            score = F.interpolate(score[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(img)
        heat = ax.imshow(score.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, alpha=alpha if img is not None else None,
                         interpolation="nearest")
        ax.set_title(title, fontsize="medium")
        ax.set_axis_off()
    if class_index is None:
        _add_legend(flat[-1], sorted(present), colours, class_names, max_legend)
    else:
        name = class_names[class_index] if class_names is not None else f"class {class_index}"
        fig.colorbar(heat, ax=flat, shrink=0.8, label=f"P({name}) in the stage prior")
    return fig


def plot_attention(attention_map: SemanticAttentionMap, row: int, col: int, image: Optional[ImageInput] = None,
                   stage_name: str = "semantic layer", *, batch_index: int = 0, ax: Optional["Axes"] = None,
                   alpha: float = 0.6, cmap: str = "inferno") -> "Figure":
    """Where one query token of a semantic layer attends (`SemanticAttentionMap.query_map`).

    Args:
        attention_map: one stage's attention (from ``model(x, return_attention=True).attentions[i]``).
        row, col: the query in feature-map coordinates (0 <= row < attention_map.height, same for col).
        image: (H, W, 3) uint8 image the features were computed from (at any size): the (h, w) weights are
            upsampled to it with nearest neighbour, so each feature cell covers its block of pixels. None: the
            weights at the feature map's resolution.
        stage_name: title prefix, e.g. ``"stage 1"``.
        batch_index: which image of the batch.
        ax: axes to draw into; a new figure when None.
        alpha: opacity of the weights over the image.
        cmap: matplotlib colour map of the weights.

    Returns:
        The figure: the weights (with a colour bar), the query marked with a cross, and for a windowed layer
        the query's window outlined (the weights are zero outside it).
    """
    from matplotlib.patches import Rectangle

    who = "plot_attention"
    if not isinstance(attention_map, SemanticAttentionMap):
        raise TypeError(f"{who}: expected a SemanticAttentionMap (model(x, return_attention=True).attentions[i]), "
                        f"got {type(attention_map).__name__}")
    if not 0 <= batch_index < attention_map.weights.shape[0]:
        raise IndexError(f"{who}: batch_index {batch_index} outside a batch of {attention_map.weights.shape[0]}")
    weights = attention_map.query_map(batch_index, row, col).detach().float().cpu().numpy()  # h, w
    h, w = weights.shape
    fig, (ax,) = _figure_axes(None if ax is None else [ax], 1, 1, who, extra_width=0.8)
    if image is not None:
        img = _as_image(image, who)
        height, width = img.shape[:2]
        ax.imshow(img)
        shown = ax.imshow(resize_label(weights, (height, width)), cmap=cmap, alpha=alpha, vmin=0.0,
                          interpolation="nearest")
    else:
        height, width = h, w
        shown = ax.imshow(weights, cmap=cmap, vmin=0.0, interpolation="nearest")
    sy, sx = height / h, width / w  # pixels per feature cell; imshow puts pixel i's centre at i (edges at +-0.5)
    ax.plot([(col + 0.5) * sx - 0.5], [(row + 0.5) * sy - 0.5], marker="x", color="cyan", markersize=10,
            markeredgewidth=2)
    ws = attention_map.window_size
    if ws is not None:
        r0, c0 = row // ws * ws, col // ws * ws
        r1, c1 = min(r0 + ws, h), min(c0 + ws, w)
        ax.add_patch(Rectangle((c0 * sx - 0.5, r0 * sy - 0.5), (c1 - c0) * sx, (r1 - r0) * sy, fill=False,
                               edgecolor="cyan", linestyle="--", linewidth=1.2))
    extent = f"{ws}x{ws} window" if ws is not None else f"global, {h}x{w}"
    ax.set_title(f"{stage_name}: query ({row}, {col})\n{extent}", fontsize="medium")
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, shrink=0.8, label="attention weight")
    return fig


# ----------------------------------------------------------------------------------------------- error maps
ERROR_CLASSES: tuple[str, ...] = ("correct", "wrong", "ignored")  # the three kinds of pixel of `error_map`
ERROR_PALETTE: tuple[tuple[int, int, int], ...] = ((40, 180, 90), (230, 40, 40), (60, 60, 60))  # their colours


def error_map(prediction: ArrayLike, label: ArrayLike, ignore_index: int = 255,
              image: Optional[ImageInput] = None, alpha: float = 0.6) -> np.ndarray:
    """Where a prediction is right and wrong: correct pixels green, wrong red, ignored dark grey.

    Args:
        prediction: (H, W) predicted class indices.
        label: (H, W) ground truth; `ignore_index` pixels are "ignored" (they count for no metric).
        ignore_index: the label value that is not scored.
        image: (H, W, 3) uint8 image to draw the map over; None: the plain colours.
        alpha: opacity of the colours over `image` (ignored pixels then show the bare image).

    Returns:
        (H, W, 3) uint8 RGB, colours `ERROR_PALETTE` in the order of `ERROR_CLASSES`.
    """
    who = "error_map"
    lab = _as_label(label, who, "the label")
    pred = _as_label(prediction, who, "the prediction", lab.shape)
    ignored = lab == ignore_index
    codes = (pred != lab).astype(np.int64)  # 0 correct, 1 wrong
    if image is None:
        codes[ignored] = 2
        return colorize(codes, ERROR_PALETTE)
    img = _as_image(image, who)
    if img.shape[:2] != lab.shape:
        raise ValueError(f"{who}: the image is {img.shape[:2]} but the label is {lab.shape}; both must be the "
                         "same (original) size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{who}: alpha must lie in [0, 1], got {alpha}")
    codes[ignored] = 255
    return overlay(img, codes, ERROR_PALETTE[:2], alpha, ignore_index=255)


def plot_evaluation_panel(image: ImageInput, label: Optional[ArrayLike], prediction: ArrayLike,
                          palette: Optional[Palette], class_names: Optional[Sequence[str]] = None, *,
                          ignore_index: int = 255, alpha: float = 0.5, title: Optional[str] = None,
                          max_legend: int = 24) -> "Figure":
    """One evaluated image in a row: the image, its ground truth, the prediction and the error map.

    Args:
        image: (H, W, 3) uint8 RGB at the original size.
        label: (H, W) ground truth (`ignore_index` not scored), or None (then image and prediction only).
        prediction: (H, W) predicted class indices at the same size.
        palette: (K, 3) RGB colours (None: `default_palette`).
        class_names: K names for the legend.
        ignore_index: the label value that is not scored.
        alpha: opacity of the label colours over the image.
        title: the figure's title (e.g. the file name and the image's mIoU).
        max_legend: at most this many classes in the legend.

    Returns:
        The figure: 4 panels (2 without a label); a legend of the classes present in the ground truth or the
        prediction, and one of the error map's colours with the share of scored pixels that are correct / wrong.
    """
    from matplotlib.patches import Patch

    who = "plot_evaluation_panel"
    img = _as_image(image, who)
    pred = _as_label(prediction, who, "the prediction", img.shape[:2])
    lab = _as_label(label, who, "the label", img.shape[:2]) if label is not None else None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{who}: alpha must lie in [0, 1], got {alpha}")
    maps = [pred] if lab is None else [lab, pred]
    present, colours = _present(maps, ignore_index, palette, class_names, who)
    fig, flat = _figure_axes(None, 1, 2 if lab is None else 4, who, extra_width=2.0)
    _show(flat[0], img, "image")
    if lab is not None:
        _show(flat[1], overlay(img, lab, colours, alpha, ignore_index), "ground truth")
    _show(flat[-1] if lab is None else flat[2], overlay(img, pred, colours, alpha, ignore_index), "prediction")
    if lab is not None:
        _show(flat[3], error_map(pred, lab, ignore_index, image=img, alpha=alpha), "error map")
    legend = class_legend(flat[-1], present, colours, class_names, max_legend)
    if lab is not None:
        scored = lab != ignore_index
        total = max(int(scored.sum()), 1)
        right = int((pred[scored] == lab[scored]).sum())
        shares = [f"{100 * right / total:.1f}%", f"{100 * (total - right) / total:.1f}%", "not scored"]
        handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="black", linewidth=0.5, label=f"{n} ({v})")
                   for n, c, v in zip(ERROR_CLASSES, ERROR_PALETTE, shares)]
        if legend is not None:
            flat[-1].add_artist(legend)  # keep the class legend when the error legend is added below it
        flat[-1].legend(handles=handles, loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize="small",
                        frameon=False)
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


# ----------------------------------------------------------------------------------------------- training logs
LogSource = Union[str, os.PathLike, Sequence[Mapping[str, Any]]]
LOSS_TERMS = ("loss", "loss_decode", "loss_prior")  # drawn together in the "loss" panel, in this order
EVAL_FRACTIONS = ("mIoU", "mAcc", "aAcc")  # evaluation metrics stored as fractions, drawn in percent


def _log_runs(runs: Union[LogSource, Mapping[str, LogSource], Sequence[Union[str, os.PathLike]]],
              who: str) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """(label, records) per run from any of the accepted forms of `plot_training_log`'s `runs`."""
    def one(source: LogSource, label: Optional[str]) -> tuple[str, list[Mapping[str, Any]]]:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            name = path.parent.name if path.name == LOG_FILE else (path.name if path.is_dir() else path.stem)
            return label or name or str(path), read_training_log(path)
        if isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
            return label or "run", list(source)
        raise TypeError(f"{who}: expected a log.jsonl path, a run directory or a list of record dicts, got "
                        f"{type(source).__name__}" + (f" for run {label!r}" if label else ""))

    if isinstance(runs, Mapping):
        if "kind" in runs:
            raise TypeError(f"{who}: got a single log record; pass a list of records, a path, or a mapping "
                            "{label: run}")
        if not runs:
            raise ValueError(f"{who}: the mapping of runs is empty")
        return [one(source, str(label)) for label, source in runs.items()]
    if isinstance(runs, Sequence) and not isinstance(runs, str) and runs and \
            all(isinstance(r, (str, os.PathLike)) for r in runs):
        return [one(source, None) for source in runs]
    if isinstance(runs, Sequence) and not isinstance(runs, str) and not runs:
        raise ValueError(f"{who}: no runs given (an empty list)")
    return [one(runs, None)]


def _check_records(label: str, records: Sequence[Mapping[str, Any]], who: str) -> None:
    for i, record in enumerate(records):
        kind = record.get("kind")
        if kind is None:
            raise ValueError(f"{who}: record {i} of run {label!r} has no 'kind' (expected 'train' or 'eval'): "
                             f"{dict(record)}")
        needed = {"train": ("iter",), "eval": ("iter", "mIoU")}.get(kind, ())
        missing = [k for k in needed if k not in record]
        if missing:
            raise ValueError(f"{who}: {kind} record {i} of run {label!r} lacks {missing}: {dict(record)}")


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    if window <= 1 or values.size == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    starts = np.arange(1, values.size + 1) - counts
    return (csum[1:] - csum[starts]) / counts


def plot_training_log(runs: Union[LogSource, Mapping[str, LogSource], Sequence[Union[str, os.PathLike]]],
                      panels: Sequence[str] = ("loss", "lr", "mIoU"), *, smooth: int = 1,
                      axes: Optional[Sequence["Axes"]] = None) -> "Figure":
    """Training curves of one or several runs against the iteration.

    Args:
        runs: one run — a ``log.jsonl`` path, a run directory holding one, or a list of record dicts — or
            several: a list of paths/directories (labelled by directory name), or a mapping ``{label: run}``
            of any of those. Runs are overlaid, one colour each.
        panels: what to draw, one axes each: ``"loss"`` (the loss terms present among loss, loss_decode and
            loss_prior, one line style each), ``"mIoU"`` / ``"mAcc"`` / ``"aAcc"`` (validation, in percent,
            from the evaluation lines) or any other numeric key of the training lines (``"lr"``,
            ``"grad_norm"``, ``"images_per_s"``, ``"peak_memory_mb"``, ...).
        smooth: trailing moving average over this many training lines (1 = raw values); evaluation points are
            never smoothed.
        axes: one axes per panel to draw into; a new figure when None.

    Returns:
        The figure. Each data line is labelled ``"{run}: {key}"``; a panel with no data says so.
    """
    from matplotlib.lines import Line2D

    who = "plot_training_log"
    if not panels:
        raise ValueError(f"{who}: no panels asked for")
    if smooth < 1:
        raise ValueError(f"{who}: smooth must be at least 1 (training lines averaged), got {smooth}")
    loaded = _log_runs(runs, who)
    for label, records in loaded:
        _check_records(label, records, who)
    fig, flat = _figure_axes(axes, 1, len(panels), who)
    if axes is None:
        fig.set_size_inches(4.2 * len(panels), 3.2)
    colours = [f"C{i % 10}" for i in range(len(loaded))]
    styles = {"loss": "-", "loss_decode": "--", "loss_prior": ":"}
    for ax, panel in zip(flat, panels):
        drawn_terms: list[str] = []
        for (label, records), colour in zip(loaded, colours):
            if panel in EVAL_FRACTIONS:
                points = [(r["iter"], r[panel]) for r in records if r["kind"] == "eval" and r.get(panel) is not None]
                if points:
                    x, y = np.asarray(points, dtype=np.float64).T
                    ax.plot(x, 100.0 * y, marker="o", markersize=4, color=colour, label=f"{label}: {panel}")
                continue
            train = [r for r in records if r["kind"] == "train"]
            for key in (LOSS_TERMS if panel == "loss" else (panel,)):
                points = [(r["iter"], r[key]) for r in train if r.get(key) is not None]
                if not points:
                    continue
                x, y = np.asarray(points, dtype=np.float64).T
                ax.plot(x, _moving_average(y, smooth), linestyle=styles.get(key, "-"), color=colour,
                        linewidth=1.2, label=f"{label}: {key}")
                if key not in drawn_terms:
                    drawn_terms.append(key)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {panel!r} in the log" if panel != "loss" else "no loss in the log",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        ylabel = {"loss": "training loss", "lr": "learning rate"}.get(panel, panel)
        if panel in EVAL_FRACTIONS:
            ylabel = f"validation {panel} (%)"
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if panel == "loss" and len(drawn_terms) > 1:  # line styles name the loss terms
            proxies = [Line2D([], [], color="black", linestyle=styles[t], label=t) for t in drawn_terms]
            ax.legend(handles=proxies, fontsize="small", loc="upper right")
    if len(loaded) > 1:  # colours name the runs, once for the figure, on the last panel
        proxies = [Line2D([], [], color=c, label=label) for (label, _), c in zip(loaded, colours)]
        flat[-1].legend(handles=proxies, fontsize="small", loc="best")
    if smooth > 1:
        fig.suptitle(f"training lines smoothed over {smooth} points", fontsize="small")
    return fig


class LiveTrainingPlot:
    """A `semask.engine.train` callback that redraws `plot_training_log` in place in a notebook while a run goes on.

        live = LiveTrainingPlot(every=5)
        result = semask.train(config, work_dir, callback=live)

    Args:
        panels, smooth: as for `plot_training_log`.
        every: redraw after every ``every``-th training line (and after every evaluation).
        show: how to show a figure; default: IPython's ``display`` with a display id, updated in place (outside
            IPython nothing is shown). Tests pass a function.

    Attributes:
        records: every record received so far (the run's history).
        draws: how many times the curves were drawn.
    """

    def __init__(self, panels: Sequence[str] = ("loss", "lr", "mIoU"), every: int = 1, smooth: int = 1,
                 show: Optional[Any] = None) -> None:
        if every < 1:
            raise ValueError(f"LiveTrainingPlot: every must be at least 1, got {every}")
        self.panels, self.every, self.smooth, self.show = tuple(panels), every, smooth, show
        self.records: list[dict[str, Any]] = []
        self.draws = 0
        self._handle: Any = None

    def __call__(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))
        trains = sum(r["kind"] == "train" for r in self.records)
        if record.get("kind") == "eval" or (record.get("kind") == "train" and trains % self.every == 0):
            self.redraw()

    def redraw(self) -> None:
        """Draw the curves of the records so far (replacing the previous drawing)."""
        import matplotlib.pyplot as plt

        if not any(r.get("kind") == "train" for r in self.records):
            return
        fig = plot_training_log(self.records, self.panels, smooth=self.smooth)
        self.draws += 1
        if self.show is not None:
            self.show(fig)
        else:
            try:
                from IPython.display import display
            except ImportError:  # not in IPython: the log file and the progress bar are the live view
                pass
            else:
                if self._handle is None:
                    self._handle = display(fig, display_id=True)
                else:
                    self._handle.update(fig)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------- per-class IoU
def _metric_results(results: Mapping[str, Any], metric: str, who: str) -> list[tuple[Optional[str], Mapping]]:
    """(label, result) pairs: one result dict (label None) or a mapping {label: result}."""
    if not isinstance(results, Mapping) or not results:
        raise TypeError(f"{who}: expected a metrics dict (SegmentationMetric.compute()) or a non-empty mapping "
                        f"{{label: metrics dict}}, got {type(results).__name__}")
    if metric in results:
        return [(None, results)]
    bad = [label for label, r in results.items() if not isinstance(r, Mapping) or metric not in r]
    if bad:
        raise ValueError(f"{who}: no per-class {metric!r} array in {bad[:5]}; expected the dicts of "
                         "SegmentationMetric.compute() (keys aAcc, mIoU, mAcc, IoU, Acc)")
    return [(str(label), r) for label, r in results.items()]


def plot_class_iou(results: Mapping[str, Any], class_names: Optional[Sequence[str]] = None, *,
                   metric: str = "IoU", sort: bool = False, ax: Optional["Axes"] = None) -> "Figure":
    """Per-class IoU (or Acc) as bars, one group per class, one bar per result.

    Args:
        results: one metrics dict of `SegmentationMetric.compute()` / `mean_iou` (``"IoU"``: (K,) fractions,
            NaN where undefined) or a mapping ``{label: metrics dict}`` for several side by side.
        class_names: K names (``class k`` when None).
        metric: the per-class key to draw, ``"IoU"`` or ``"Acc"``.
        sort: order the classes by the first result's value, best first (undefined classes last).
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure: bars in percent; an undefined (NaN) class gets an empty bar marked "n/a"; each result's
        mean (its ``m{metric}`` when present) is a dashed line in its colour and in its legend label.
    """
    who = "plot_class_iou"
    pairs = _metric_results(results, metric, who)
    values = [np.asarray(r[metric], dtype=np.float64) for _, r in pairs]
    k = values[0].size
    if any(v.ndim != 1 for v in values) or any(v.size != k for v in values):
        raise ValueError(f"{who}: per-class {metric!r} arrays must all be (K,), got shapes "
                         f"{[v.shape for v in values]}")
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{who}: {len(names)} class names for {k} classes")
    order = np.arange(k)
    if sort:
        first = np.where(np.isnan(values[0]), -np.inf, values[0])
        order = np.argsort(-first, kind="stable")
    n = len(pairs)
    width = 0.8 / n
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * k * max(n, 2) + 1.5), 4.0), layout="constrained")
    else:
        fig = ax.figure
    x = np.arange(k)
    for j, ((label, result), v) in enumerate(zip(pairs, values)):
        shown = v[order]
        offset = (j - (n - 1) / 2) * width
        defined = ~np.isnan(shown)
        mean = result.get(f"m{metric}", float(np.nanmean(v)) if defined.any() else float("nan"))
        text = f"m{metric} {100 * mean:.1f}%"
        ax.bar(x + offset, np.where(defined, 100.0 * shown, 0.0), width=width, color=f"C{j % 10}",
               label=f"{label} ({text})" if label is not None else text)
        for xi in np.flatnonzero(~defined):
            ax.text(x[xi] + offset, 1.0, "n/a", rotation=90, ha="center", va="bottom", fontsize="x-small",
                    color="gray")
        if not math.isnan(mean):
            ax.axhline(100 * mean, color=f"C{j % 10}", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, [names[i] for i in order], rotation=90 if k > 8 else 0, fontsize="small")
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=n, frameon=False)
    return fig


# ----------------------------------------------------------------------------------------------- several runs
@dataclass
class ResultsTable:
    """Runs grouped by setting: mean and spread over seeds (see `results_table`).

    Attributes:
        rows: one dict per setting, in first-appearance order: ``group_by`` (the setting), ``"n"`` (runs),
            ``"seeds"`` (their ``seed`` values, None where a run has none), per metric ``"{m}_mean"``,
            ``"{m}_std"`` (sample std, ddof 1; NaN for one run) and ``"{m}_values"``, and per extra column
            its mean under the column's own name.
        metrics: the metric keys (fractions, shown in percent).
        columns: the extra numeric columns (shown as means).
        group_by: the key that names a setting.
    """

    rows: list[dict[str, Any]]
    metrics: tuple[str, ...]
    columns: tuple[str, ...]
    group_by: str

    def to_markdown(self, digits: int = 2) -> str:
        """A markdown table: setting, seeds, each metric as ``mean ± std`` in percent, each extra column."""
        header = [self.group_by, "seeds"] + [f"{m} (%)" for m in self.metrics] + list(self.columns)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for row in self.rows:
            seeds = [s for s in row["seeds"] if s is not None]
            cells = [str(row[self.group_by]), f"{row['n']}" + (f" ({', '.join(map(str, seeds))})" if seeds else "")]
            for m in self.metrics:
                mean, std = row[f"{m}_mean"], row[f"{m}_std"]
                cell = f"{100 * mean:.{digits}f}"
                if row["n"] > 1:
                    cell += f" ± {100 * std:.{digits}f}"
                cells.append(cell)
            cells += [_format_column(c, row[c]) for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _format_column(name: str, value: float) -> str:
    """``params`` in millions, ``*_sec`` in seconds or minutes, anything else with 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if name == "params":
        return f"{value / 1e6:.2f} M"
    if name.endswith("_sec"):
        return f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"
    return f"{value:.4g}"


def results_table(runs: Sequence[Mapping[str, Any]], *, group_by: str = "setting",
                  metrics: Sequence[str] = ("mIoU",), columns: Sequence[str] = ()) -> ResultsTable:
    """Group runs by setting and summarise each metric over the seeds.

    Args:
        runs: one flat dict per run, e.g. ``{"setting": "SeMask", "seed": 0, "mIoU": 0.612, "params": 2.9e6,
            "train_sec": 431.0}``; metric values are fractions (0..1) as `SegmentationMetric.compute()` gives.
        group_by: the key whose value names a run's setting (rows keep the order settings first appear in).
        metrics: keys summarised as mean and sample standard deviation over the runs of a setting.
        columns: further numeric keys reported as their mean (e.g. ``"params"``, ``"train_sec"``).

    Returns:
        A `ResultsTable` (``.rows`` list of dicts, ``.to_markdown()``; Jupyter shows it as a table).

    Raises:
        ValueError: no runs, or a run without the `group_by` key, a metric or a column (named in the message).
    """
    who = "results_table"
    if not runs:
        raise ValueError(f"{who}: no runs given")
    metrics, columns = tuple(metrics), tuple(columns)
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise TypeError(f"{who}: run {i} is a {type(run).__name__}, expected a dict like "
                            "{'setting': ..., 'seed': ..., 'mIoU': ...}")
        missing = [k for k in (group_by, *metrics, *columns) if k not in run]
        if missing:
            raise ValueError(f"{who}: run {i} ({run.get(group_by, '?')}) lacks {missing}; it has {sorted(run)}")
        for key in (*metrics, *columns):
            if not isinstance(run[key], (int, float, np.integer, np.floating)) or isinstance(run[key], bool):
                raise ValueError(f"{who}: run {i} ({run[group_by]}) has a non-numeric {key!r}: {run[key]!r}")
        groups.setdefault(run[group_by], []).append(run)
    rows = []
    for setting, members in groups.items():
        row: dict[str, Any] = {group_by: setting, "n": len(members), "seeds": [r.get("seed") for r in members]}
        for m in metrics:
            values = np.asarray([float(r[m]) for r in members])
            row[f"{m}_values"] = values.tolist()
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
        for c in columns:
            row[c] = float(np.mean([float(r[c]) for r in members]))
        rows.append(row)
    return ResultsTable(rows=rows, metrics=metrics, columns=columns, group_by=group_by)


def plot_results(results: Union[ResultsTable, Sequence[Mapping[str, Any]]], metric: str = "mIoU", *,
                 group_by: str = "setting", show_runs: bool = True, ax: Optional["Axes"] = None) -> "Figure":
    """One bar per setting: the mean of `metric` over its runs, the standard deviation as error bar.

    Args:
        results: a `ResultsTable`, or the runs themselves (grouped with `results_table(runs, group_by=...)`).
        metric: a metric of the table (a fraction, drawn in percent).
        group_by: the setting key when `results` are runs.
        show_runs: also draw each run's value as a dot.
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure (bars in setting order; settings with one run have no error bar).
    """
    who = "plot_results"
    table = results if isinstance(results, ResultsTable) else results_table(results, group_by=group_by,
                                                                             metrics=(metric,))
    if metric not in table.metrics:
        raise ValueError(f"{who}: {metric!r} is not a metric of this table; it has {list(table.metrics)}")
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(table.rows) + 1.5), 3.6), layout="constrained")
    else:
        fig = ax.figure
    names = [str(r[table.group_by]) for r in table.rows]
    means = np.asarray([100 * r[f"{metric}_mean"] for r in table.rows])
    stds = np.asarray([100 * r[f"{metric}_std"] for r in table.rows])
    x = np.arange(len(names))
    colours = [f"C{i % 10}" for i in range(len(names))]
    ax.bar(x, means, color=colours, alpha=0.8, width=0.6)
    spread = ~np.isnan(stds)
    if spread.any():
        ax.errorbar(x[spread], means[spread], yerr=stds[spread], fmt="none", ecolor="black", capsize=5,
                    linewidth=1.2)
    if show_runs:
        for xi, row in zip(x, table.rows):
            values = 100 * np.asarray(row[f"{metric}_values"])
            ax.plot(np.full(values.size, xi, dtype=float), values, linestyle="none", marker="o", markersize=4,
                    color="black", alpha=0.7)
    for xi, m, s in zip(x, means, stds):  # the value above the error bar
        ax.annotate(f"{m:.1f}" + (f" ± {s:.1f}" if not np.isnan(s) else ""), (xi, m + np.nan_to_num(s)),
                    xytext=(0, 5), textcoords="offset points", ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, min(100.0, max(float(np.nanmax(means + np.nan_to_num(stds))) * 1.2, 1.0)))
    ax.grid(True, axis="y", alpha=0.3)
    n = sorted({r["n"] for r in table.rows})
    ax.set_title(f"{metric}: mean ± std over {'/'.join(map(str, n))} runs per setting", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------------------------- confusion
def plot_confusion(confusion: ArrayLike, class_names: Optional[Sequence[str]] = None, *,
                   annotate: Optional[bool] = None, cmap: str = "Blues", ax: Optional["Axes"] = None) -> "Figure":
    """A confusion matrix normalised per ground-truth class: row k shows where class k's pixels went.

    Args:
        confusion: (K, K) non-negative integer pixel counts, rows = ground truth, columns = prediction.
        class_names: K names (``class k`` when None).
        annotate: write each cell's percentage (default: when K <= 20).
        cmap: matplotlib colour map of the fractions.
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure: fractions 0..1 (a class without ground-truth pixels is an empty grey row marked "n/a"),
        with a colour bar.
    """
    who = "plot_confusion"
    counts = _numpy(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"{who}: expected a square (K, K) matrix of counts, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"{who}: expected integer pixel counts, got dtype {counts.dtype} (the normalisation is "
                         "done here)")
    if counts.size and counts.min() < 0:
        raise ValueError(f"{who}: counts must be non-negative, got a minimum of {counts.min()}")
    k = counts.shape[0]
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{who}: {len(names)} class names for a {k}x{k} matrix")
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fractions = np.where(totals > 0, counts / totals, np.nan)
    if ax is None:
        import matplotlib.pyplot as plt

        side = max(4.0, 0.35 * k + 2.0)
        fig, ax = plt.subplots(figsize=(side + 1.0, side), layout="constrained")
    else:
        fig = ax.figure
    import matplotlib

    colours = matplotlib.colormaps[cmap].with_extremes(bad="lightgray")
    shown = ax.imshow(np.ma.masked_invalid(fractions), cmap=colours, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(np.arange(k), names, rotation=90, fontsize="small")
    ax.set_yticks(np.arange(k), names, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if annotate if annotate is not None else k <= 20:
        for i in range(k):
            for j in range(k):
                if np.isnan(fractions[i, j]):
                    if j == i:
                        ax.text(j, i, "n/a", ha="center", va="center", fontsize="x-small", color="dimgray")
                    continue
                ax.text(j, i, f"{100 * fractions[i, j]:.0f}", ha="center", va="center", fontsize="x-small",
                        color="white" if fractions[i, j] > 0.5 else "black")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="fraction of the ground-truth class's pixels")
    return fig
