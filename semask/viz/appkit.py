"""What semask's Jupyter apps (`Explorer`, `compare`; arXiv 2112.12782) share: where their images come from, the
class names and colours, the figure on an ipympl canvas, and what a notebook displays.

ipywidgets and ipympl are imported only when an app is built (`ipywidgets_module`, `ipympl_figure`), so that
``import semask.viz`` needs neither.
"""
from __future__ import annotations

import base64
import io
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from semask.data.classes import default_palette
from semask.data.datasets import SegmentationDataset
from semask.engine.inference import ImageInput, load_image
from semask.errors import UsageError, UsageTypeError

if TYPE_CHECKING:
    import ipywidgets
    from matplotlib.figure import Figure

__all__ = [
    "ImagesInput",
    "ImageSource",
    "class_metadata",
    "ipywidgets_module",
    "ipympl_figure",
    "snapshot_bytes",
    "display_bundle",
    "image_options",
]

ImagesInput = Union[ImageInput, Sequence[ImageInput], SegmentationDataset, Sequence[Mapping[str, Any]]]


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _title(image: Any, index: int) -> str:
    return os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else f"#{index}"


class ImageSource:
    """Images (and labels, titles, class metadata) from a dataset, a list of images or one image.

    Args:
        images: a `SegmentationDataset` (read without its transform), a dataset of ``{"image", "label"}`` dicts,
            a sequence of images (paths, arrays, PIL images, tensors) or one image.
        labels: ground truth per image (overrides the dataset's), or None.
        titles: a name per image (default: file names, or ``#i``).

    Raises:
        UsageError, UsageTypeError: no images, a wrong type, or labels / titles of another count.
    """

    def __init__(self, images: ImagesInput, labels: Optional[Sequence[Optional[np.ndarray]]],
                 titles: Optional[Sequence[str]]):
        self.class_names: Optional[tuple[str, ...]] = None
        self.palette: Optional[list[list[int]]] = None
        self._dataset: Optional[Any] = None
        self._images: list[Any] = []
        if isinstance(images, SegmentationDataset):
            self._dataset = images
            self.class_names, self.palette = images.class_names, images.palette
            default_titles = [p[0].name for p in images.pairs]
        elif isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)) or _is_pil(images):
            self._images = [images]
            default_titles = [_title(images, 0)]
        elif isinstance(images, Sequence) or hasattr(images, "__getitem__") and hasattr(images, "__len__"):
            if len(images) == 0:
                raise UsageError("no images given (an empty sequence or dataset)")
            if isinstance(images, Sequence) and not isinstance(images[0], Mapping):
                self._images = list(images)
                default_titles = [_title(im, i) for i, im in enumerate(self._images)]
            else:  # a dataset of sample dicts
                self._dataset = images
                self.class_names = getattr(images, "class_names", None)
                self.palette = getattr(images, "palette", None)
                default_titles = [f"#{i}" for i in range(len(images))]
        else:
            raise UsageTypeError(f"expected a dataset, a list of images, or one image (path, array, PIL image or "
                                 f"tensor), got {type(images).__name__}")
        n = len(self)
        if labels is not None and len(labels) != n:
            raise UsageError(f"{len(labels)} labels for {n} images")
        if titles is not None and len(titles) != n:
            raise UsageError(f"{len(titles)} titles for {n} images")
        self._labels = list(labels) if labels is not None else None
        self.titles = [str(t) for t in titles] if titles is not None else default_titles

    def __len__(self) -> int:
        return len(self._dataset) if self._dataset is not None else len(self._images)

    def get(self, index: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(image (H, W, 3) uint8, label (H, W) or None) of image `index`."""
        if self._dataset is not None:
            ds = self._dataset
            sample = ds.load(index) if isinstance(ds, SegmentationDataset) else ds[index]
            if not isinstance(sample, Mapping) or "image" not in sample:
                raise UsageTypeError(f"dataset item {index} is a {type(sample).__name__}; expected a dict with "
                                     "'image' (and optionally 'label')")
            image, label = sample["image"], sample.get("label")
            if isinstance(image, torch.Tensor) and image.is_floating_point():
                raise UsageError(f"dataset item {index} holds a normalised float image; pass the dataset without "
                                 "its transform (the explorer applies the test-scale rescale itself)")
        else:
            image, label = self._images[index], None
        if self._labels is not None:
            label = self._labels[index]
        try:
            image = load_image(image)
        except (TypeError, ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"image {index} ({self.titles[index]}): {exc}") from exc
        if label is not None:
            label = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label)
            if label.shape != image.shape[:2]:
                raise UsageError(f"label {index} has size {label.shape}, its image {image.shape[:2]}; labels must "
                                 "be at the original image size")
        return image, label


def class_metadata(model: nn.Module, images: ImageSource, class_names: Optional[Sequence[str]],
                   palette: Optional[Sequence[Sequence[int]]]) -> tuple[list[str], np.ndarray]:
    """Names and (K, 3) colours: the arguments, else the model's, else the dataset's, else defaults."""
    k = int(model.num_classes)
    names = class_names or getattr(model, "class_names", None) or images.class_names
    names = list(names) if names else [f"class {i}" for i in range(k)]
    colours = palette or getattr(model, "palette", None) or images.palette or default_palette(k)
    colours = np.asarray(colours, dtype=np.int64)
    if len(names) != k:
        raise UsageError(f"{len(names)} class names for a model with {k} classes")
    if colours.ndim != 2 or colours.shape != (k, 3) or colours.min() < 0 or colours.max() > 255:
        raise UsageError(f"expected a palette of {k} RGB triples in 0..255, got shape {colours.shape}")
    return names, colours.astype(np.uint8)


def ipywidgets_module() -> Any:
    """The ipywidgets module, imported now (an app is being built)."""
    try:
        import ipywidgets
    except ImportError as exc:  # pragma: no cover - ipywidgets is in the notebooks and dev extras
        raise ImportError("semask.viz's Explorer and compare need ipywidgets; install semask's [notebooks] "
                          "extra") from exc
    return ipywidgets


def ipympl_figure(figsize: tuple[float, float], dpi: int) -> "Figure":
    """A matplotlib figure on an ipympl canvas widget (independent of pyplot and the notebook's backend)."""
    import matplotlib
    from matplotlib.figure import Figure

    use = matplotlib.use
    if "ipympl" not in sys.modules:  # ipympl's package __init__ makes itself pyplot's backend (closing every open
        matplotlib.use = lambda *args, **kwargs: None  # pyplot figure); the notebook's backend must stay as it is
    try:
        from ipympl.backend_nbagg import Canvas, FigureManager
    except ImportError as exc:  # pragma: no cover - ipympl is in the notebooks and dev extras
        raise ImportError("semask.viz's Explorer and compare draw with ipympl; install it with `pip install "
                          "ipympl` (part of semask's [notebooks] extra) and restart the kernel") from exc
    finally:
        matplotlib.use = use

    figure = Figure(figsize=figsize, dpi=dpi)
    canvas = Canvas(figure)
    with warnings.catch_warnings():  # ipympl's own toolbar construction trips a traitlets deprecation warning
        warnings.filterwarnings("ignore", message=r"Passing unrecognized arguments to super\(Toolbar\)",
                                category=DeprecationWarning)
        FigureManager(canvas, num=id(figure))  # handles the frontend's resize and dpi messages
    canvas.header_visible = False
    canvas.toolbar_visible = False
    canvas.resizable = False
    return figure


def snapshot_bytes(figure: "Figure", format: str) -> bytes:
    """The figure as it is drawn now, as PNG or JPEG bytes."""
    if format not in ("png", "jpeg"):
        raise UsageError(f"snapshot: format must be 'png' or 'jpeg', got {format!r}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=format, **({"pil_kwargs": {"quality": 85}} if format == "jpeg" else {}))
    return buffer.getvalue()


def display_bundle(widget: "ipywidgets.Widget", figure: "Figure", text: str, include: Any,
                   exclude: Any) -> dict[str, Any]:
    """The live app's display data, plus a JPEG of its figure for viewers without a kernel (a rendered notebook)."""
    bundle = dict(widget._repr_mimebundle_(include=include, exclude=exclude) or {})
    bundle["image/jpeg"] = base64.b64encode(snapshot_bytes(figure, "jpeg")).decode("ascii")
    bundle["text/plain"] = text
    return bundle


def image_options(titles: Sequence[str]) -> list[tuple[str, int]]:
    """The image dropdown's options: ``("i: title", i)``."""
    return [(f"{i}: {t}", i) for i, t in enumerate(titles)]
