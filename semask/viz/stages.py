"""The backbone stages of SeMask (arXiv 2112.12782) on the image: semantic priors and semantic attention.

A stage's feature grid covers the model's (h, w) input at a stride: the patch embedding and every patch merging
pad their input up to a multiple of the stride (4, 8, 16, 32), so feature cell (r, c) of stage i covers input
pixels [r * s_i, (r + 1) * s_i) x [c * s_i, (c + 1) * s_i), the last row and column only partly. `stage_to_image`
(the numpy form of `semask.engine.grid.stage_to_pixels`) is the one mapping from a grid to image pixels (cell to
stride block, padding cropped, input resized to the original image) and `cell_box` the matching box of cells;
`plot_stage_priors`, `plot_attention` and the explorer all draw through them.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch

from semask.engine.grid import Stride, grid_stride, stage_to_pixels, stride_pair
from semask.engine.inference import ImageInput
from semask.errors import UsageError, UsageTypeError
from semask.model.segmentor import SegmentationOutput
from semask.model.semantic import SemanticAttentionMap
from semask.viz.figures import figure_axes, show_picture
from semask.viz.inputs import Palette, image_array, names_caller, palette_array
from semask.viz.labels import class_legend, colorize, overlay

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.axes import Axes

__all__ = [
    "Stride",
    "grid_stride",
    "stage_to_image",
    "prior_on_image",
    "cell_box",
    "plot_stage_priors",
    "plot_attention",
]

Size = tuple[int, int]


def _checked_size(value: object, name: str) -> Size:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and v > 0 for v in value)):
        raise UsageError(f"{name} must be two positive ints (height, width), got {value!r}")
    return int(value[0]), int(value[1])


# ----------------------------------------------------------------------------------------------- geometry
def stage_to_image(cells: torch.Tensor, stride: Stride, input_size: Size, image_size: Size,
                   smooth: bool) -> np.ndarray:
    """A stage's (C, h_i, w_i) map on the original image's pixel grid: (C, H, W) float32 numpy.

    The numpy form of `semask.engine.grid.stage_to_pixels`, the one mapping: feature cell (r, c) covers input
    pixels [r*stride, (r+1)*stride) of the (h, w) input (the last row and column only partly, the input having
    been padded up to the stride); that input is then resized to the original (H, W).

    Args:
        cells: (C, h_i, w_i) values per feature cell (class probabilities, labels, attention weights).
        stride: input pixels per cell (`grid_stride` when not known from the model).
        input_size: (h, w) of the input the model saw.
        image_size: (H, W) of the original image.
        smooth: bilinear (probabilities), else nearest (labels, attention cells).

    Returns:
        (C, H, W) float32.
    """
    return stage_to_pixels(cells, stride, input_size, image_size, smooth).cpu().numpy()


def prior_on_image(probabilities: torch.Tensor, class_index: Optional[int], stride: Stride, input_size: Size,
                   image_size: Size) -> np.ndarray:
    """A stage's semantic prior, (K, h_i, w_i) class probabilities, on the image's pixel grid.

    Returns:
        (H, W) int64 argmax labels (per cell) when `class_index` is None, else (H, W) float32 probability of
        that class (bilinear).
    """
    if class_index is None:
        labels = probabilities.argmax(0)[None]  # 1, h_i, w_i
        return stage_to_image(labels, stride, input_size, image_size, False)[0].astype(np.int64)
    return stage_to_image(probabilities[class_index:class_index + 1], stride, input_size, image_size, True)[0]


def cell_box(row0: int, col0: int, rows: int, cols: int, stride: Stride, input_size: Size,
             image_size: Size) -> tuple[float, float, float, float]:
    """Feature cells [row0, row0 + rows) x [col0, col0 + cols) as an image box (x, y, width, height) in imshow's
    pixel coordinates (pixel centres at integers), the padding cropped as in `stage_to_image`."""
    sy, sx = stride_pair(stride)
    (H, W), (h, w) = image_size, input_size
    y0, y1 = row0 * sy * H / h, min((row0 + rows) * sy, h) * H / h
    x0, x1 = col0 * sx * W / w, min((col0 + cols) * sx, w) * W / w
    return x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0


# ----------------------------------------------------------------------------------------------- priors
def _stage_priors(output_or_priors: Union[SegmentationOutput, Sequence[torch.Tensor]],
                  batch_index: int) -> list[torch.Tensor]:
    """Per stage (K, H_i, W_i) float priors of one image."""
    if isinstance(output_or_priors, SegmentationOutput):
        priors = list(output_or_priors.stage_priors)
    elif isinstance(output_or_priors, (list, tuple)):
        priors = list(output_or_priors)
    else:
        raise UsageTypeError(f"expected a SegmentationOutput or a list of (B, K, H_i, W_i) tensors, got "
                             f"{type(output_or_priors).__name__}")
    if not priors:
        raise UsageError("no stage priors to draw; the model has no semantic layers (a swin_*_fpn baseline) or the "
                         "list is empty")
    out = []
    for i, p in enumerate(priors):
        if not isinstance(p, torch.Tensor) or p.ndim != 4:
            raise UsageError(f"stage {i + 1} prior must be a (B, K, H, W) tensor, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if not 0 <= batch_index < p.shape[0]:
            raise IndexError(f"batch_index {batch_index} outside a batch of {p.shape[0]}")
        if p.shape[1] != priors[0].shape[1]:
            raise UsageError(f"stage {i + 1} prior has {p.shape[1]} classes, stage 1 has {priors[0].shape[1]}")
        out.append(p[batch_index].detach().float().cpu())  # K, H_i, W_i
    return out


@names_caller("plot_stage_priors")
def plot_stage_priors(output_or_priors: Union[SegmentationOutput, Sequence[torch.Tensor]],
                      image: Optional[ImageInput] = None, class_index: Optional[int] = None,
                      class_names: Optional[Sequence[str]] = None, *, palette: Optional[Palette] = None,
                      batch_index: int = 0, alpha: float = 0.6, axes: Optional[Sequence["Axes"]] = None,
                      max_legend: int = 24, input_size: Optional[Size] = None) -> "Figure":
    """The semantic prior of every backbone stage: SeMask's per-stage "semantic masks".

    Each semantic layer's queries are a (K, H_i, W_i) class-score map (stride 4, 8, 16, 32). Drawn per stage
    is either its argmax (a label map, coloured with `palette`) or, with `class_index`, that class's softmax
    probability over the K classes (0..1, one shared colour bar).

    Args:
        output_or_priors: the model's `SegmentationOutput` or its `stage_priors`, a list of (B, K, H_i, W_i).
        image: (H, W, 3) uint8 image the priors belong to; the maps are drawn over it through `stage_to_image`
            (each cell its stride block of the input, the padding cropped, the input resized to the image;
            argmax: nearest, scores: bilinear). None: the maps at their own resolution.
        class_index: draw this class's score map instead of the argmax.
        class_names: K names (legend and title).
        palette: (K, 3) colours of the argmax maps (`default_palette(K)` when None).
        batch_index: which image of the batch.
        alpha: opacity of the maps over the image.
        axes: one axes per stage to draw into; a new figure when None.
        max_legend: at most this many classes in the legend.
        input_size: (h, w) of the input the model saw, when an image is given; default: the size of the
            `SegmentationOutput`'s logits, else the image's size.

    Returns:
        The figure: one axes per stage, plus a colour bar axes when `class_index` is given.
    """
    priors = _stage_priors(output_or_priors, batch_index)
    num_classes = priors[0].shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f"{len(class_names)} class names for priors with {num_classes} classes")
    if class_index is not None and not 0 <= class_index < num_classes:
        raise IndexError(f"class_index {class_index} outside 0..{num_classes - 1}")
    img = image_array(image) if image is not None else None
    colours = palette_array(palette, num_classes)
    if len(colours) < num_classes:
        raise UsageError(f"a {len(colours)}-colour palette for priors with {num_classes} classes")
    if img is not None:
        if input_size is not None:
            input_size = _checked_size(input_size, "input_size")
        elif isinstance(output_or_priors, SegmentationOutput):
            input_size = tuple(output_or_priors.logits.shape[-2:])
        else:
            input_size = img.shape[:2]
    fig, flat = figure_axes(axes, 1, len(priors), extra_width=1.8)
    present: set[int] = set()
    heat = None
    for i, (ax, prior) in enumerate(zip(flat, priors)):
        h, w = prior.shape[1:]
        title = f"stage {i + 1} ({h}x{w})"
        probabilities = prior.softmax(0)  # K, H_i, W_i
        if img is None:
            picture = probabilities.argmax(0) if class_index is None else probabilities[class_index]
            picture = picture.numpy()
        else:
            picture = prior_on_image(probabilities, class_index, grid_stride((h, w), input_size), input_size,
                                     img.shape[:2])
        if class_index is None:
            present.update(np.unique(picture).tolist())
            show_picture(ax, colorize(picture, colours) if img is None else overlay(img, picture, colours, alpha),
                         title)
            continue
        if img is not None:
            ax.imshow(img)
        heat = ax.imshow(picture, cmap="viridis", vmin=0.0, vmax=1.0, alpha=alpha if img is not None else None,
                         interpolation="nearest")
        ax.set_title(title, fontsize="medium")
        ax.set_axis_off()
    if class_index is None:
        class_legend(flat[-1], sorted(present), colours, class_names, max_legend)
    else:
        name = class_names[class_index] if class_names is not None else f"class {class_index}"
        fig.colorbar(heat, ax=flat, shrink=0.8, label=f"P({name}) in the stage prior")
    return fig


# ----------------------------------------------------------------------------------------------- attention
@names_caller("plot_attention")
def plot_attention(attention_map: SemanticAttentionMap, row: int, col: int, image: Optional[ImageInput] = None,
                   stage_name: str = "semantic layer", *, batch_index: int = 0, ax: Optional["Axes"] = None,
                   alpha: float = 0.6, cmap: str = "inferno", input_size: Optional[Size] = None) -> "Figure":
    """Where one query token of a semantic layer attends (`SemanticAttentionMap.query_map`).

    Args:
        attention_map: one stage's attention (from ``model(x, return_attention=True).attentions[i]``).
        row, col: the query in feature-map coordinates (0 <= row < attention_map.height, same for col).
        image: (H, W, 3) uint8 image the features were computed from: the (h, w) weights are drawn over it
            through `stage_to_image` (each feature cell a block of pixels). None: the weights at the feature
            map's resolution.
        stage_name: title prefix, e.g. ``"stage 1"``.
        batch_index: which image of the batch.
        ax: axes to draw into; a new figure when None.
        alpha: opacity of the weights over the image.
        cmap: matplotlib colour map of the weights.
        input_size: (h, w) of the input the model saw, when an image is given; default: the image's size.

    Returns:
        The figure: the weights (with a colour bar), the query marked with a cross, and for a windowed layer
        the query's window outlined (the weights are zero outside it).
    """
    from matplotlib.patches import Rectangle

    if not isinstance(attention_map, SemanticAttentionMap):
        raise UsageTypeError(f"expected a SemanticAttentionMap (model(x, return_attention=True).attentions[i]), "
                             f"got {type(attention_map).__name__}")
    if not 0 <= batch_index < attention_map.weights.shape[0]:
        raise IndexError(f"batch_index {batch_index} outside a batch of {attention_map.weights.shape[0]}")
    weights = attention_map.query_map(batch_index, row, col).detach().float().cpu()  # h, w
    h, w = weights.shape
    fig, (ax,) = figure_axes(None if ax is None else [ax], 1, 1, extra_width=0.8)
    if image is not None:
        img = image_array(image)
        image_size = img.shape[:2]
        input_size = _checked_size(input_size, "input_size") if input_size is not None else image_size
        stride = grid_stride((h, w), input_size)
        ax.imshow(img)
        shown = ax.imshow(stage_to_image(weights[None], stride, input_size, image_size, False)[0], cmap=cmap,
                          alpha=alpha, vmin=0.0, interpolation="nearest")
    else:
        image_size = input_size = (h, w)
        stride = 1
        shown = ax.imshow(weights.numpy(), cmap=cmap, vmin=0.0, interpolation="nearest")
    x, y, width, height = cell_box(row, col, 1, 1, stride, input_size, image_size)
    ax.plot([x + width / 2], [y + height / 2], marker="x", color="cyan", markersize=10, markeredgewidth=2)
    ws = attention_map.window_size
    if ws is not None:
        x, y, width, height = cell_box(row // ws * ws, col // ws * ws, ws, ws, stride, input_size, image_size)
        ax.add_patch(Rectangle((x, y), width, height, fill=False, edgecolor="cyan", linestyle="--", linewidth=1.2))
    extent = f"{ws}x{ws} window" if ws is not None else f"global, {h}x{w}"
    ax.set_title(f"{stage_name}: query ({row}, {col})\n{extent}", fontsize="medium")
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, shrink=0.8, label="attention weight")
    return fig
