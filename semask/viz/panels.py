"""Images beside their label maps, for SeMask's notebooks and reports (arXiv 2112.12782).

- `plot_segmentation`: an image with its ground truth and/or predictions, and a legend of the classes present;
- `plot_samples`: a grid of images with their label maps (dataset samples, augmented views, batches);
- `plot_evaluation_panel`: image, ground truth, prediction and error map of one evaluated image.

Each returns the matplotlib `Figure`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np

from semask.engine.inference import ImageInput
from semask.errors import UsageError
from semask.viz.figures import figure_axes, show_picture
from semask.viz.inputs import ArrayLike, Palette, class_index_map, classes_present, image_array, names_caller
from semask.viz.labels import ERROR_CLASSES, ERROR_PALETTE, class_legend, error_percentages, error_map, overlay

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_segmentation", "plot_samples", "plot_evaluation_panel"]


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha must lie in [0, 1], got {alpha}")


@names_caller("plot_segmentation")
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
    img = image_array(image)
    size = img.shape[:2]
    maps: list[tuple[str, np.ndarray]] = []
    if label is not None:
        maps.append(("ground truth", class_index_map(label, "the label", size)))
    if isinstance(prediction, Mapping):
        if not prediction:
            raise UsageError("the prediction mapping is empty")
        maps += [(str(title), class_index_map(p, f"prediction {title!r}", size)) for title, p in prediction.items()]
    elif prediction is not None:
        maps.append(("prediction", class_index_map(prediction, "the prediction", size)))
    if not maps:
        raise UsageError("nothing to draw; pass a ground-truth `label`, a `prediction`, or both")
    _check_alpha(alpha)
    present, colours = classes_present([m for _, m in maps], ignore_index, palette, class_names)
    fig, flat = figure_axes(axes, 1, 1 + len(maps), extra_width=1.8)
    show_picture(flat[0], img, "image")
    for ax, (title, m) in zip(flat[1:], maps):
        show_picture(ax, overlay(img, m, colours, alpha, ignore_index), title)
    class_legend(flat[-1], present, colours, class_names, max_legend)
    return fig


@names_caller("plot_samples")
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
    if len(images) != len(labels) or not len(images):
        raise UsageError(f"expected as many labels as images (at least one), got {len(images)} images and "
                         f"{len(labels)} labels")
    if titles is not None and len(titles) != len(images):
        raise UsageError(f"{len(titles)} titles for {len(images)} images")
    if ncols < 1:
        raise UsageError(f"ncols must be at least 1, got {ncols}")
    imgs = [image_array(im) for im in images]
    labs = [class_index_map(lab, f"label {i}", im.shape[:2]) for i, (im, lab) in enumerate(zip(imgs, labels))]
    present, colours = classes_present(labs, ignore_index, palette, class_names)
    ncols = min(ncols, len(imgs))
    nrows = -(-len(imgs) // ncols)
    fig, flat = figure_axes(None, 2 * nrows, ncols, extra_width=1.8)
    for i, (img, lab) in enumerate(zip(imgs, labs)):
        r, c = divmod(i, ncols)
        show_picture(flat[2 * r * ncols + c], img, titles[i] if titles is not None else f"#{i}")
        show_picture(flat[(2 * r + 1) * ncols + c], overlay(img, lab, colours, alpha, ignore_index), "")
    for i in range(len(imgs), nrows * ncols):  # empty cells of the last row
        r, c = divmod(i, ncols)
        flat[2 * r * ncols + c].remove()
        flat[(2 * r + 1) * ncols + c].remove()
    class_legend(flat[ncols - 1], present, colours, class_names, max_legend)
    return fig


@names_caller("plot_evaluation_panel")
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

    img = image_array(image)
    pred = class_index_map(prediction, "the prediction", img.shape[:2])
    lab = class_index_map(label, "the label", img.shape[:2]) if label is not None else None
    _check_alpha(alpha)
    maps = [pred] if lab is None else [lab, pred]
    present, colours = classes_present(maps, ignore_index, palette, class_names)
    fig, flat = figure_axes(None, 1, 2 if lab is None else 4, extra_width=2.0)
    show_picture(flat[0], img, "image")
    if lab is not None:
        show_picture(flat[1], overlay(img, lab, colours, alpha, ignore_index), "ground truth")
    show_picture(flat[-1] if lab is None else flat[2], overlay(img, pred, colours, alpha, ignore_index), "prediction")
    if lab is not None:
        show_picture(flat[3], error_map(pred, lab, ignore_index, image=img, alpha=alpha), "error map")
    legend = class_legend(flat[-1], present, colours, class_names, max_legend)
    if lab is not None:
        right, wrong = error_percentages(pred, lab, ignore_index)
        shares = [f"{right:.1f}%", f"{wrong:.1f}%", "not scored"]
        handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="black", linewidth=0.5, label=f"{n} ({v})")
                   for n, c, v in zip(ERROR_CLASSES, ERROR_PALETTE, shares)]
        if legend is not None:
            flat[-1].add_artist(legend)  # keep the class legend when the error legend is added below it
        flat[-1].legend(handles=handles, loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize="small",
                        frameon=False)
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig
