"""Drawing label maps, overlays, semantic priors and attention for SeMask results (arXiv 2112.12782).

The array functions (`colorize`, `overlay`, `save_label_map`, `denormalize`) return numpy arrays or files. The
`plot_*` functions draw matplotlib figures for the notebooks and return the `Figure`; each accepts axes to draw
into, and imports pyplot only when called (importing semask selects no matplotlib backend):

- `plot_segmentation`: an image with its ground truth and/or predictions, and a legend of the classes present;
- `plot_samples`: a grid of images with their label maps (dataset samples, augmented views, batches);
- `plot_stage_priors`: the semantic prior of each backbone stage, the "semantic masks" SeMask is named after;
- `plot_attention`: where one query token of a semantic layer attends.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semask.data.classes import default_palette
from semask.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_label
from semask.inference import ImageInput, load_image
from semask.semantic import SemanticAttentionMap
from semask.segmentor import SegmentationOutput
from semask.utils import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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
    """An (H, W, 3) uint8 RGB array from an array/tensor/path (see `semask.inference.load_image`)."""
    if isinstance(image, torch.Tensor):
        floating = image.is_floating_point()
    else:
        floating = isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)
    if floating:
        raise ValueError(f"{who}: expected an (H, W, 3) uint8 RGB image, got a {image.dtype} array of shape "
                         f"{tuple(image.shape)}; bring a normalised (3, H, W) image back with "
                         "semask.visualize.denormalize()")
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


def _add_legend(ax: "Axes", classes: Sequence[int], palette: np.ndarray, class_names: Optional[Sequence[str]],
                max_entries: int) -> None:
    """A legend of coloured patches (one per class, in class order) to the right of `ax`."""
    from matplotlib.patches import Patch

    if not classes:
        return
    shown = list(classes[:max_entries])
    handles = [Patch(facecolor=palette[k] / 255.0, edgecolor="black", linewidth=0.5,
                     label=class_names[k] if class_names is not None else f"class {k}") for k in shown]
    if len(classes) > len(shown):
        handles.append(Patch(facecolor="none", edgecolor="none", label=f"(+{len(classes) - len(shown)} more)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)


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
