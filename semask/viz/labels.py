"""Label maps as pictures for SeMask results (arXiv 2112.12782): colours, overlays, error maps, PNG files.

`colorize`, `overlay`, `error_map` and `denormalize` return (H, W, 3) uint8 arrays; `save_label_map` writes a
PNG; `class_legend` draws the legend of coloured patches every viewer puts beside a label map.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

from semask.data.classes import default_palette
from semask.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from semask.engine.inference import ImageInput
from semask.errors import UsageError
from semask.io import atomic_path
from semask.viz.inputs import ArrayLike, Palette, class_index_map, image_array, names_caller, palette_array, to_numpy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.legend import Legend

__all__ = [
    "default_palette",
    "colorize",
    "overlay",
    "save_label_map",
    "denormalize",
    "ERROR_CLASSES",
    "ERROR_PALETTE",
    "error_map",
    "error_percentages",
    "class_legend",
]

ERROR_CLASSES: tuple[str, ...] = ("correct", "wrong", "ignored")  # the three kinds of pixel of `error_map`
ERROR_PALETTE: tuple[tuple[int, int, int], ...] = ((40, 180, 90), (230, 40, 40), (60, 60, 60))  # their colours


@names_caller("colorize")
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
    label = to_numpy(label, "label")
    if label.ndim != 2:
        raise UsageError(f"expected an (H, W) label map, got shape {label.shape}")
    lut = np.zeros((max(256, int(label.max(initial=0)) + 1), 3), dtype=np.uint8)
    pal = palette_array(palette, 0)
    lut[: len(pal)] = pal
    lut[ignore_index] = ignore_color
    valid = (label < len(pal)) | (label == ignore_index)
    if not valid.all():
        raise UsageError(f"label values {np.unique(label[~valid])[:10].tolist()} have no colour in a "
                         f"{len(pal)}-colour palette")
    return lut[label]


@names_caller("overlay")
def overlay(image: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """Blend the coloured label map over an (H, W, 3) uint8 image; ignored pixels keep the image."""
    label = to_numpy(label, "label")
    if image.shape[:2] != label.shape:
        raise UsageError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    color = colorize(label, palette, ignore_index).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + color * alpha
    keep = label == ignore_index
    out[keep] = image[keep]
    return out.round().astype(np.uint8)


@names_caller("save_label_map")
def save_label_map(label: np.ndarray, path: Union[str, os.PathLike],
                   palette: Optional[Sequence[Sequence[int]]] = None) -> Path:
    """Write a label map as PNG atomically: class indices (mode L), or indexed colour (mode P) with a palette."""
    label = to_numpy(label, "label")
    if label.ndim != 2:
        raise UsageError(f"expected an (H, W) label map, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise UsageError(f"label values must lie in 0..255 to be stored as PNG, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8))  # mode L; putpalette turns it into mode P
    if palette is not None:
        flat = np.zeros((256, 3), dtype=np.uint8)
        pal = palette_array(palette, 0)[:256]
        flat[: len(pal)] = pal
        img.putpalette(flat.flatten().tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


@names_caller("denormalize")
def denormalize(image: ArrayLike, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Undo the pipelines' normalisation for display.

    Args:
        image: (3, H, W) float image normalised with `mean`/`std` (as `TrainTransform`/`TestTransform` return).
        mean, std: the normalisation's RGB mean and std on the 0..255 scale (ImageNet's by default).

    Returns:
        (H, W, 3) uint8 RGB, rounded and clipped to 0..255.
    """
    array = to_numpy(image, "image")
    if array.ndim != 3 or array.shape[0] != 3 or not np.issubdtype(array.dtype, np.floating):
        hint = " (take one image of the batch)" if array.ndim == 4 else ""
        raise UsageError(f"expected a normalised float image of shape (3, H, W), got shape {array.shape} dtype "
                         f"{array.dtype}{hint}")
    rgb = array.transpose(1, 2, 0).astype(np.float64) * np.asarray(std) + np.asarray(mean)  # H, W, 3
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- error maps
@names_caller("error_map")
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
    lab = class_index_map(label, "the label")
    pred = class_index_map(prediction, "the prediction", lab.shape)
    ignored = lab == ignore_index
    codes = (pred != lab).astype(np.int64)  # 0 correct, 1 wrong
    if image is None:
        codes[ignored] = 2
        return colorize(codes, ERROR_PALETTE)
    img = image_array(image)
    if img.shape[:2] != lab.shape:
        raise UsageError(f"the image is {img.shape[:2]} but the label is {lab.shape}; both must be the same "
                         "(original) size")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha must lie in [0, 1], got {alpha}")
    codes[ignored] = 255
    return overlay(img, codes, ERROR_PALETTE[:2], alpha, ignore_index=255)


def error_percentages(prediction: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> tuple[float, float]:
    """(correct, wrong): the percentages of the scored pixels (label not `ignore_index`) of an (H, W) prediction."""
    scored = label != ignore_index
    total = max(int(scored.sum()), 1)
    right = int((prediction[scored] == label[scored]).sum())
    return 100 * right / total, 100 * (total - right) / total


# ----------------------------------------------------------------------------------------------- legends
@names_caller("class_legend")
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
    colours = palette_array(palette, 0)
    shown = list(classes[:max_entries])
    handles = [Patch(facecolor=colours[k] / 255.0, edgecolor="black", linewidth=0.5,
                     label=class_names[k] if class_names is not None else f"class {k}") for k in shown]
    if len(classes) > len(shown):
        handles.append(Patch(facecolor="none", edgecolor="none", label=f"(+{len(classes) - len(shown)} more)"))
    options = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    options.update(legend_kwargs)
    return ax.legend(handles=handles, **options)
