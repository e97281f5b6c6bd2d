"""Interactive exploration of SeMask models in Jupyter (arXiv 2112.12782).

`Explorer(model, images_or_dataset)` is an ipywidgets app: pick an image and a view — the prediction, the ground
truth, the error map, a stage's semantic prior (one class's probability or the argmax over classes) or where one
query pixel's token attends in a stage's semantic layer — and the figure redraws in place, with a legend of class
names for label maps and a colour bar for heat maps. Each semantic layer's learned gate `gamma` (``out = gamma *
f + x``, initialised to 0) is shown beside the stage: it says how strongly that layer injects its attention into
the features. `compare(models, images_or_dataset)` shows the same images through several models side by side,
with each prediction's mIoU on that image.

The model runs once per image (`ImageAnalysis`, cached) at the test scale of the paper's protocol (docs/recipes.md §6: a
keep-ratio rescale, `semask.data.TestTransform`); predictions and maps are brought back to the original image
size for display. Changing a control only redraws.

Why ipympl (`jupyter-matplotlib`) for the figure rather than an `Output` widget re-displaying a new PNG on every
change: the figure is created once and its artists are updated in place (`set_data`, `draw_idle`), so controls
respond without flicker and without growing the notebook's outputs; mouse clicks on the image arrive as
matplotlib events, which is how the query pixel is picked; and the package ships a prebuilt JupyterLab 4
extension (no `jupyter lab build`). The figure is built with ipympl's canvas directly, so no ``%matplotlib
widget`` is needed and the notebook's own backend (inline) is left alone. Every callback is a plain method that
tests drive without a browser; `tests/test_browser.py` checks the real thing in JupyterLab and Chromium.
"""
from __future__ import annotations

import contextlib
import html
import io
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.data.classes import default_palette
from semask.data.datasets import SegmentationDataset
from semask.data.transforms import TestPipelineConfig, TestTransform, get_test_preset
from semask.engine.inference import ImageInput, load_image, model_test_config
from semask.engine.metrics import mean_iou
from semask.model.semantic import SemanticAttentionMap
from semask.model.util import LRUCache
from semask.viz.visualize import ERROR_CLASSES, ERROR_PALETTE, class_legend, error_map, overlay

if TYPE_CHECKING:
    import ipywidgets
    from matplotlib.figure import Figure

__all__ = [
    "VIEWS",
    "ImageAnalysis",
    "analyse_image",
    "semantic_gammas",
    "Explorer",
    "Comparison",
    "compare",
]

VIEWS: tuple[str, ...] = ("prediction", "ground truth", "error map", "semantic prior", "semantic attention")
SEMANTIC_VIEWS = ("semantic prior", "semantic attention")  # need a model with semantic layers
ALL_CLASSES = -1  # value of the class control that draws the prior's argmax over all classes
ImagesInput = Union[ImageInput, Sequence[ImageInput], SegmentationDataset, Sequence[Mapping[str, Any]]]
TestPreset = Union[str, TestPipelineConfig, None]


# ----------------------------------------------------------------------------------------------- helpers
def semantic_gammas(model: nn.Module) -> list[list[float]]:
    """Each stage's semantic-layer gates: ``[[gamma of block 1, ...] per stage]``; empty for the baseline.

    ``gamma`` scales the semantic attention's output before it is added to the normalised features (it starts
    at 0: an untrained layer passes its features through unchanged).
    """
    gammas = []
    for stage in getattr(model.backbone, "layers", []):
        layer = stage.semantic_layer
        if layer is not None:
            gammas.append([float(block.gamma.detach().float().cpu()) for block in layer.class_injection])
    return gammas


def _resolve_test_pipeline(model: nn.Module, preset: TestPreset) -> TestPipelineConfig:
    if isinstance(preset, TestPipelineConfig):
        return preset
    if isinstance(preset, str):
        return get_test_preset(preset)
    if preset is None:
        return model_test_config(model)
    raise TypeError(f"test_preset must be a preset name (e.g. 'toy', 'ade20k'), a TestPipelineConfig or None, "
                    f"got {type(preset).__name__}")


def _stage_to_image(cells: torch.Tensor, stride: int, input_size: tuple[int, int], image_size: tuple[int, int],
                    smooth: bool) -> np.ndarray:
    """A stage's (C, h_i, w_i) map on the original image's pixel grid: (C, H, W).

    Feature cell (r, c) covers input pixels [r*stride, (r+1)*stride) of the (h, w) test-scale input (the last
    row and column only partly, the input having been padded up to the stride); that input is then resized to
    the original (H, W). `smooth`: bilinear (probabilities), else nearest (labels, attention cells).
    """
    h_i, w_i = cells.shape[-2:]
    mode = dict(mode="bilinear", align_corners=False) if smooth else dict(mode="nearest")
    grid = F.interpolate(cells[None].float(), size=(h_i * stride, w_i * stride), **mode)[0]  # C, h_i*s, w_i*s
    grid = grid[:, : input_size[0], : input_size[1]]  # C, h, w
    if tuple(input_size) != tuple(image_size):
        grid = F.interpolate(grid[None], size=image_size, **mode)[0]  # C, H, W
    return grid.numpy()


# ----------------------------------------------------------------------------------------------- one image
@dataclass
class ImageAnalysis:
    """Everything the viewers draw for one image through one model (one forward pass, on the CPU after).

    Attributes:
        image: (H, W, 3) uint8, the original image.
        label: (H, W) int64 ground truth (255 = ignore), or None.
        prediction: (H, W) int64 predicted classes at the original size.
        input_size: (h, w) the model saw, the keep-ratio test scale.
        strides: pixels of the (h, w) input per feature cell of each stage (4, 8, 16, 32).
        stage_priors: per stage (K, h_i, w_i) float32 class probabilities (the softmax of the semantic prior);
            empty for the plain-Swin baseline.
        attentions: per stage the `SemanticAttentionMap` of image 0 (empty for the baseline or when not asked).
        num_classes: K.
        miou: mIoU of this image's prediction (classes present in the prediction or the label), None without
            a label.
        pixel_accuracy: fraction of labelled pixels predicted right, None without a label.
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

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def _stage(self, stage: int, maps: Sequence[Any], what: str) -> None:
        if not maps:
            raise ValueError(f"no {what} for this image: the model has no semantic layers (a swin_*_fpn baseline)"
                             + (" or attention was not asked for" if what == "attention" else ""))
        if not 0 <= stage < len(maps):
            raise IndexError(f"stage {stage} outside 0..{len(maps) - 1} (stages count from 0 here)")

    def prior_map(self, stage: int, class_index: Optional[int] = None) -> np.ndarray:
        """A stage's semantic prior on the image's pixel grid.

        Args:
            stage: 0-based stage index.
            class_index: a class; None for the argmax over classes.

        Returns:
            (H, W) float32 probability of `class_index` (bilinear), or (H, W) int64 argmax labels (per cell).
        """
        self._stage(stage, self.stage_priors, "semantic prior")
        prior = self.stage_priors[stage]  # K, h_i, w_i
        if class_index is None:
            labels = prior.argmax(0)[None]  # 1, h_i, w_i
            return _stage_to_image(labels, self.strides[stage], self.input_size, self.size, False)[0].astype(np.int64)
        if not 0 <= class_index < prior.shape[0]:
            raise IndexError(f"class_index {class_index} outside 0..{prior.shape[0] - 1}")
        return _stage_to_image(prior[class_index:class_index + 1], self.strides[stage], self.input_size, self.size,
                               True)[0]

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
        in imshow's pixel coordinates (pixel centres at integers)."""
        H, W = self.size
        h, w = self.input_size
        s = self.strides[stage]
        y0, y1 = row0 * s * H / h, min((row0 + rows) * s, h) * H / h
        x0, x1 = col0 * s * W / w, min((col0 + cols) * s, w) * W / w
        return x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0

    def attention_map(self, stage: int, row: int, col: int) -> np.ndarray:
        """Where the token holding image pixel (row, col) looks, in a stage's semantic layer.

        Returns:
            (H, W) float32 attention weights on the image's pixel grid (each feature cell a block of pixels;
            zero outside the query's window for a windowed layer).
        """
        self._stage(stage, self.attentions, "attention")
        r, c = self.query_cell(stage, row, col)
        weights = self.attentions[stage].query_map(0, r, c)  # h_i, w_i
        return _stage_to_image(weights[None], self.strides[stage], self.input_size, self.size, False)[0]


@torch.no_grad()
def analyse_image(model: nn.Module, image: ImageInput, label: Optional[np.ndarray] = None, *,
                  test_preset: TestPreset = None, attention: bool = True,
                  device: Union[str, torch.device, None] = None) -> ImageAnalysis:
    """Run a model once on one image at the test scale and keep what the viewers draw.

    Args:
        model: a `SeMaskFPN` (or plain-Swin baseline); put in eval mode (and moved to `device`, when given) here.
        image: (H, W, 3) uint8 RGB, a path, PIL image or tensor (see `semask.engine.inference.load_image`).
        label: (H, W) ground truth at the image's size (255 = ignore), or None.
        test_preset: a test-pipeline preset name (``"toy"``, ``"ade20k"``, ...) or `TestPipelineConfig`; None:
            the test pipeline of the model's recipe (`semask.engine.inference.model_test_config`).
        attention: also keep every semantic layer's attention weights.
        device: where to run (default: the model's device); the model is moved there.

    Returns:
        `ImageAnalysis`; the prediction is the argmax of the softmax resized to the original size, as in
        `semask.Predictor` whole-image mode.
    """
    img = load_image(image)
    H, W = img.shape[:2]
    lab = None
    if label is not None:
        lab = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
        if lab.shape != (H, W) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"analyse_image: expected an (H, W) integer label of the image's size {(H, W)}, got "
                             f"shape {lab.shape} dtype {lab.dtype}")
        lab = lab.astype(np.int64)
    config = _resolve_test_pipeline(model, test_preset)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    model.eval()
    x = TestTransform(config)({"image": img})["image"][None].to(device)  # 1, 3, h, w normalised
    out = model(x, return_attention=attention)
    probs = out.logits.float().softmax(dim=1)  # 1, K, h, w
    if probs.shape[-2:] != (H, W):
        probs = F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False)
    prediction = probs[0].argmax(0).cpu().numpy()  # H, W
    priors = [p[0].float().softmax(0).cpu() for p in out.stage_priors]  # K, h_i, w_i each
    attentions = [SemanticAttentionMap(a.weights[:1].float().cpu(), a.window_size, a.height, a.width)
                  for a in out.attentions]
    num_classes = int(out.logits.shape[1])
    miou = accuracy = None
    if lab is not None:
        scores = mean_iou(prediction, lab, num_classes)
        miou, accuracy = scores["mIoU"], scores["aAcc"]
    return ImageAnalysis(image=img, label=lab, prediction=prediction, input_size=tuple(x.shape[-2:]),
                         strides=tuple(getattr(model.backbone, "strides", (4, 8, 16, 32))), num_classes=num_classes,
                         stage_priors=priors, attentions=attentions, miou=miou, pixel_accuracy=accuracy)


# ----------------------------------------------------------------------------------------------- image sources
class _Images:
    """Images (and labels, titles, class metadata) from a dataset, a list of images or one image."""

    def __init__(self, images: ImagesInput, labels: Optional[Sequence[Optional[np.ndarray]]],
                 titles: Optional[Sequence[str]], who: str):
        self.who = who
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
                raise ValueError(f"{who}: no images given (an empty sequence or dataset)")
            if isinstance(images, Sequence) and not isinstance(images[0], Mapping):
                self._images = list(images)
                default_titles = [_title(im, i) for i, im in enumerate(self._images)]
            else:  # a dataset of sample dicts
                self._dataset = images
                self.class_names = getattr(images, "class_names", None)
                self.palette = getattr(images, "palette", None)
                default_titles = [f"#{i}" for i in range(len(images))]
        else:
            raise TypeError(f"{who}: expected a dataset, a list of images, or one image (path, array, PIL image or "
                            f"tensor), got {type(images).__name__}")
        n = len(self)
        if labels is not None and len(labels) != n:
            raise ValueError(f"{who}: {len(labels)} labels for {n} images")
        if titles is not None and len(titles) != n:
            raise ValueError(f"{who}: {len(titles)} titles for {n} images")
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
                raise TypeError(f"{self.who}: dataset item {index} is a {type(sample).__name__}; expected a dict "
                                "with 'image' (and optionally 'label')")
            image, label = sample["image"], sample.get("label")
            if isinstance(image, torch.Tensor) and image.is_floating_point():
                raise ValueError(f"{self.who}: dataset item {index} holds a normalised float image; pass the dataset "
                                 "without its transform (the explorer applies the test-scale rescale itself)")
        else:
            image, label = self._images[index], None
        if self._labels is not None:
            label = self._labels[index]
        try:
            image = load_image(image)
        except (TypeError, ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"{self.who}: image {index} ({self.titles[index]}): {exc}") from exc
        if label is not None:
            label = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label)
            if label.shape != image.shape[:2]:
                raise ValueError(f"{self.who}: label {index} has size {label.shape}, its image {image.shape[:2]}; "
                                 "labels must be at the original image size")
        return image, label


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _title(image: Any, index: int) -> str:
    return os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else f"#{index}"


def _class_metadata(model: nn.Module, images: _Images, class_names: Optional[Sequence[str]],
                    palette: Optional[Sequence[Sequence[int]]], who: str) -> tuple[list[str], np.ndarray]:
    """Names and (K, 3) colours: the arguments, else the model's, else the dataset's, else defaults."""
    k = int(model.num_classes)
    names = class_names or getattr(model, "class_names", None) or images.class_names
    names = list(names) if names else [f"class {i}" for i in range(k)]
    colours = palette or getattr(model, "palette", None) or images.palette or default_palette(k)
    colours = np.asarray(colours, dtype=np.int64)
    if len(names) != k:
        raise ValueError(f"{who}: {len(names)} class names for a model with {k} classes")
    if colours.ndim != 2 or colours.shape != (k, 3) or colours.min() < 0 or colours.max() > 255:
        raise ValueError(f"{who}: expected a palette of {k} RGB triples in 0..255, got shape {colours.shape}")
    return names, colours.astype(np.uint8)


def _new_figure(figsize: tuple[float, float], dpi: int) -> "Figure":
    """A matplotlib figure on an ipympl canvas widget (independent of pyplot and the notebook's backend)."""
    import matplotlib
    from matplotlib.figure import Figure

    use = matplotlib.use
    if "ipympl" not in sys.modules:  # ipympl's package __init__ makes itself pyplot's backend (closing every open
        matplotlib.use = lambda *args, **kwargs: None  # pyplot figure); the notebook's backend must stay as it is
    try:
        from ipympl.backend_nbagg import Canvas, FigureManager
    except ImportError as exc:  # pragma: no cover - ipympl is in the notebooks and dev extras
        raise ImportError("semask.viz.widgets draws with ipympl; install it with `pip install ipympl` (part of "
                          "semask's [notebooks] extra) and restart the kernel") from exc
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


def _widgets() -> Any:
    try:
        import ipywidgets
    except ImportError as exc:  # pragma: no cover - ipywidgets is in the notebooks and dev extras
        raise ImportError("semask.viz.widgets needs ipywidgets; install semask's [notebooks] extra") from exc
    return ipywidgets


def _snapshot(figure: "Figure", format: str) -> bytes:
    if format not in ("png", "jpeg"):
        raise ValueError(f"snapshot: format must be 'png' or 'jpeg', got {format!r}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=format, **({"pil_kwargs": {"quality": 85}} if format == "jpeg" else {}))
    return buffer.getvalue()


def _bundle(widget: "ipywidgets.Widget", figure: "Figure", text: str, include: Any, exclude: Any) -> dict[str, Any]:
    """The live app's display data, plus a JPEG of its figure for viewers without a kernel (a rendered notebook)."""
    import base64

    bundle = dict(widget._repr_mimebundle_(include=include, exclude=exclude) or {})
    bundle["image/jpeg"] = base64.b64encode(_snapshot(figure, "jpeg")).decode("ascii")
    bundle["text/plain"] = text
    return bundle


def _image_options(titles: Sequence[str]) -> list[tuple[str, int]]:
    return [(f"{i}: {t}", i) for i, t in enumerate(titles)]


# ----------------------------------------------------------------------------------------------- the explorer
class Explorer:
    """An interactive view of one SeMask model on a set of images.

    Args:
        model: a `SeMaskFPN`; a plain-Swin baseline works too (its views are prediction, ground truth and
            error map only). Put in eval mode.
        images: a dataset (`semask.data.ToyDataset(root, "validation")` or any `SegmentationDataset`, read
            without its transform; or a sequence of ``{"image": (H, W, 3) uint8, "label": (H, W)}`` dicts), a
            list of images (paths, (H, W, 3) uint8 arrays, PIL images) or one image.
        labels: ground truth per image (overrides the dataset's; None entries for unlabelled images).
        titles: a name per image (default: file names, or ``#i``).
        class_names, palette: K names and (K, 3) colours (default: the model's, else the dataset's).
        test_preset: test-pipeline preset or config (``"toy"`` keeps the toy set's 256-pixel images at their
            size); None: `semask.engine.inference.model_test_config(model)`, the test pipeline of the model's recipe.
        device: where the model runs (default: its own device).
        cache_size: analysed images kept (each the model's output for one image, with every semantic layer's
            attention weights: a few MB for an ADE20K-sized image); revisiting one of them does not run the model
            again.
        opacity: initial opacity of the maps over the image.
        max_legend: at most this many classes in the legend.
        dpi: resolution of the figure.

    Attributes:
        widget: the app (an ipywidgets ``VBox``); a notebook shows it when the explorer is displayed.
        figure, ax, cax: the matplotlib figure (on an ipympl canvas), its image axes and its colour-bar axes.
        image, view, stage, class_name, row, col, opacity: the controls (ipywidgets); setting ``.value`` from
            code updates the figure exactly as the mouse does.
        gamma, info: HTML widgets with the semantic layers' gammas and a summary of the current image and view.
        model_runs: how many times the model has run (once per analysed image).
    """

    def __init__(self, model: nn.Module, images: ImagesInput, *,
                 labels: Optional[Sequence[Optional[np.ndarray]]] = None, titles: Optional[Sequence[str]] = None,
                 class_names: Optional[Sequence[str]] = None, palette: Optional[Sequence[Sequence[int]]] = None,
                 test_preset: TestPreset = None, device: Union[str, torch.device, None] = None,
                 cache_size: int = 16, opacity: float = 0.5, max_legend: int = 16, dpi: int = 80):
        who = "Explorer"
        w = _widgets()
        if cache_size < 1:
            raise ValueError(f"{who}: cache_size must be at least 1, got {cache_size}")
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"{who}: opacity must lie in [0, 1], got {opacity}")
        self.model = model.eval()
        self.images = _Images(images, labels, titles, who)
        self.class_names, self.palette = _class_metadata(model, self.images, class_names, palette, who)
        self.test_pipeline = _resolve_test_pipeline(model, test_preset)
        self.device = device
        self.max_legend = max_legend
        self.model_runs = 0
        self._cache = LRUCache(cache_size)
        self._gammas = semantic_gammas(model)
        self._semantic = bool(self._gammas)
        self._holding = False
        views = VIEWS if self._semantic else tuple(v for v in VIEWS if v not in SEMANTIC_VIEWS)

        style = {"description_width": "70px"}
        self.image = w.Dropdown(options=_image_options(self.images.titles), value=0, description="image",
                                style=style, layout=w.Layout(width="340px"))
        self.view = w.ToggleButtons(options=list(views), value="prediction")
        self.view.style.button_width = "160px"
        stages = len(self._gammas) or 4
        self.stage = w.ToggleButtons(options=[(f"stage {i + 1}", i) for i in range(stages)], value=0)
        self.stage.style.button_width = "72px"
        self.class_name = w.Dropdown(options=[("all classes (argmax)", ALL_CLASSES)]
                                     + [(n, k) for k, n in enumerate(self.class_names)],
                                     value=ALL_CLASSES, description="class", style=style,
                                     layout=w.Layout(width="340px"))
        self.row = w.IntSlider(value=0, min=0, max=1, description="query row", style=style,
                               continuous_update=False)
        self.col = w.IntSlider(value=0, min=0, max=1, description="query col", style=style,
                               continuous_update=False)
        self.opacity = w.FloatSlider(value=opacity, min=0.0, max=1.0, step=0.05, description="opacity", style=style,
                                     continuous_update=False)
        self.gamma = w.HTML()
        self.info = w.HTML()
        for control, name in ((self.image, "image"), (self.view, "view"), (self.stage, "stage"),
                              (self.class_name, "class"), (self.row, "row"), (self.col, "col"),
                              (self.opacity, "opacity")):
            control.add_class(f"semask-{name}")  # stable handles for browser tests and custom CSS

        self.figure = _new_figure((6.8, 5.0), dpi)
        self.ax = self.figure.add_axes((0.01, 0.02, 0.66, 0.86))
        self.cax = self.figure.add_axes((0.71, 0.12, 0.03, 0.7))
        self.ax.set_axis_off()
        first, _ = self.images.get(0)
        self._picture = self.ax.imshow(first, interpolation="nearest")
        self._heat = self.ax.imshow(np.zeros(first.shape[:2], np.float32), cmap="viridis", vmin=0.0, vmax=1.0,
                                    interpolation="nearest", visible=False)
        (self._marker,) = self.ax.plot([0], [0], linestyle="none", marker="x", color="cyan", markersize=11,
                                       markeredgewidth=2.5, visible=False)
        from matplotlib.patches import Rectangle

        self._window = Rectangle((0, 0), 1, 1, fill=False, edgecolor="cyan", linestyle="--", linewidth=1.4,
                                 visible=False)
        self._cell = Rectangle((0, 0), 1, 1, fill=False, edgecolor="white", linewidth=1.2, visible=False)
        self.ax.add_patch(self._window)
        self.ax.add_patch(self._cell)
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        self._scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap="viridis")  # the colour bar, opaque
        self._colorbar = self.figure.colorbar(self._scale, cax=self.cax)
        self.figure.canvas.mpl_connect("button_press_event", self.on_click)

        for control in (self.view, self.stage, self.class_name, self.row, self.col, self.opacity):
            control.observe(self._on_change, names="value")
        self.image.observe(self._on_image, names="value")

        def label(text: str) -> "ipywidgets.Label":  # the toggle buttons' captions, aligned with the others'
            return w.Label(text, layout=w.Layout(width="74px", justify_content="flex-end", padding="0 4px 0 0"))

        self.gamma.layout.margin = "0 0 0 12px"
        self.info.layout.margin = "8px 0 0 12px"
        self.figure.canvas.layout.flex = "0 0 auto"  # as wide as the figure, the summary right beside it
        rows = [w.HBox([self.image, self.opacity]), w.HBox([label("view"), self.view]),
                w.HBox([label("stage"), self.stage, self.gamma]), self.class_name, w.HBox([self.row, self.col])]
        self.widget = w.VBox(rows + [w.HBox([self.figure.canvas, self.info])])
        self.widget.add_class("semask-explorer")
        self._set_image_ranges(*first.shape[:2], centre=True)  # draws the first view

    # ------------------------------------------------------------------------------------------- model cache
    def analysis(self, index: Optional[int] = None) -> ImageAnalysis:
        """The cached `ImageAnalysis` of image `index` (default: the selected one); runs the model on a miss."""
        index = self.image.value if index is None else index
        if not 0 <= index < len(self.images):
            raise IndexError(f"Explorer: image {index} outside 0..{len(self.images) - 1}")
        cached = self._cache.get(index)
        if cached is None:
            image, label = self.images.get(index)
            cached = analyse_image(self.model, image, label, test_preset=self.test_pipeline,
                                   attention=self._semantic, device=self.device)
            self.model_runs += 1
            self._cache.put(index, cached)
        return cached

    @property
    def picture(self) -> np.ndarray:
        """(H, W, 3) uint8: what the figure shows under any heat map (the image, or a label map over it)."""
        return np.asarray(self._picture.get_array())

    @property
    def heat(self) -> Optional[np.ndarray]:
        """(H, W) float32: the heat map drawn over the picture (a class probability or attention weights), or
        None in the label views."""
        return np.ma.getdata(self._heat.get_array()) if self._heat.get_visible() else None

    # ------------------------------------------------------------------------------------------- callbacks
    @contextlib.contextmanager
    def _hold(self) -> Iterator[None]:
        """Change several controls with one redraw at the end."""
        holding, self._holding = self._holding, True
        try:
            yield
        finally:
            self._holding = holding
        if not holding:
            self.update()

    def _on_change(self, change: Optional[Mapping[str, Any]] = None) -> None:
        if not self._holding:
            self.update()

    def _set_image_ranges(self, height: int, width: int, centre: bool) -> None:
        with self._hold():
            for slider, size in ((self.row, height), (self.col, width)):
                slider.max = max(size - 1, 1)
                if centre or slider.value > size - 1:
                    slider.value = size // 2

    def _on_image(self, change: Optional[Mapping[str, Any]] = None) -> None:
        """A new image: analyse it (or take it from the cache), fit the query sliders to its size, redraw."""
        H, W = self.analysis().size
        with self._hold():
            self._set_image_ranges(H, W, centre=False)

    def select_pixel(self, row: int, col: int) -> None:
        """Make image pixel (row, col) the attention query (what a click on the image does)."""
        H, W = self.analysis().size
        if not (0 <= row < H and 0 <= col < W):
            raise IndexError(f"Explorer: pixel ({row}, {col}) outside the {H}x{W} image")
        with self._hold():
            self.row.value, self.col.value = int(row), int(col)

    def on_click(self, event: Any) -> None:
        """Mouse click on the figure: a click on the image selects the query pixel (other clicks are ignored)."""
        if event.inaxes is not self.ax or event.xdata is None or event.ydata is None:
            return
        H, W = self.analysis().size
        row, col = int(round(event.ydata)), int(round(event.xdata))
        if 0 <= row < H and 0 <= col < W:
            self.select_pixel(row, col)

    # ------------------------------------------------------------------------------------------- drawing
    def update(self) -> None:
        """Redraw the figure, the gamma table and the summary from the current control values."""
        a = self.analysis()
        view, stage = self.view.value, self.stage.value
        class_index = None if self.class_name.value == ALL_CLASSES else self.class_name.value
        alpha = float(self.opacity.value)
        H, W = a.size
        title = self.images.titles[self.image.value]
        self.stage.disabled = view not in SEMANTIC_VIEWS
        self.class_name.disabled = view != "semantic prior"
        self.row.disabled = self.col.disabled = False  # the query also names the classes under it in the summary

        picture, heat, legend, colorbar_label, note = a.image, None, None, "", ""
        if view == "prediction":
            picture = overlay(a.image, a.prediction, self.palette, alpha)
            legend = self._label_legend(a.prediction)
            detail = "prediction"
        elif view in ("ground truth", "error map") and a.label is None:
            detail = f"{view}: no ground truth for this image"
            note = "This image has no label: the ground-truth and error-map views need one."
        elif view == "ground truth":
            picture = overlay(a.image, a.label, self.palette, alpha)
            legend = self._label_legend(a.label)
            detail = "ground truth (black: ignored)" if (a.label == 255).any() else "ground truth"
        elif view == "error map":
            picture = error_map(a.prediction, a.label, image=a.image, alpha=alpha)
            legend = self._error_legend(a.prediction, a.label)
            detail = "error map"
        elif view == "semantic prior":
            name = f"stage {stage + 1}"
            if class_index is None:
                labels = a.prior_map(stage)
                picture = overlay(a.image, labels, self.palette, alpha)
                legend = self._label_legend(labels)
                detail = f"{name} semantic prior: argmax over classes"
            else:
                heat = (a.prior_map(stage, class_index), "viridis", 1.0)
                colorbar_label = f"P({self.class_names[class_index]}) in the {name} prior"
                detail = f"{name} semantic prior: {self.class_names[class_index]}"
        else:  # semantic attention
            weights = a.attention_map(stage, self.row.value, self.col.value)
            # zero weight (outside a windowed layer's window) is left uncoloured: the image shows through
            heat = (np.ma.masked_equal(weights, 0.0), "inferno", max(float(weights.max()), 1e-6))
            colorbar_label = "attention weight"
            amap = a.attentions[stage]
            kind = f"{amap.window_size}x{amap.window_size} windows" if amap.window_size else "global"
            detail = f"stage {stage + 1} semantic attention ({kind}, {amap.height}x{amap.width} tokens)"

        if picture.shape[:2] != self._picture.get_array().shape[:2]:
            for artist in (self._picture, self._heat):
                artist.set_extent((-0.5, W - 0.5, H - 0.5, -0.5))
            self.ax.set_xlim(-0.5, W - 0.5)
            self.ax.set_ylim(H - 0.5, -0.5)
        self._picture.set_data(picture)
        if heat is None:
            self._heat.set_visible(False)
            self.cax.set_visible(False)
        else:
            data, cmap, vmax = heat
            self._heat.set_data(data)
            self._heat.set_cmap(cmap)
            self._heat.set_clim(0.0, vmax)
            self._heat.set_alpha(alpha)
            self._heat.set_visible(True)
            self.cax.set_visible(True)
            self._scale.set_cmap(cmap)
            self._scale.set_clim(0.0, vmax)
            self._colorbar.update_normal(self._scale)
            self._colorbar.set_label(colorbar_label)
        if legend is None:
            class_legend(self.ax, [], self.palette)
        self._draw_query(a, view, stage)
        self.ax.set_title(f"{title}\n{detail}", fontsize="medium")
        self.gamma.value = self._gamma_html(stage, view in SEMANTIC_VIEWS)
        self.info.value = self._info_html(a, view, note)
        self.figure.canvas.draw_idle()

    def _label_legend(self, labels: np.ndarray) -> Any:
        present = [int(k) for k in np.unique(labels) if k != 255]
        return class_legend(self.ax, present, self.palette, self.class_names, self.max_legend)

    def _error_legend(self, prediction: np.ndarray, label: np.ndarray) -> Any:
        scored = label != 255
        total = max(int(scored.sum()), 1)
        right = int((prediction[scored] == label[scored]).sum())
        names = [f"{ERROR_CLASSES[0]} {100 * right / total:.1f}%", f"{ERROR_CLASSES[1]} {100 * (total - right) / total:.1f}%",
                 f"{ERROR_CLASSES[2]} (not scored)"]
        classes = [0, 1] + ([2] if (~scored).any() else [])
        return class_legend(self.ax, classes, ERROR_PALETTE, names)

    def _draw_query(self, a: ImageAnalysis, view: str, stage: int) -> None:
        show = view == "semantic attention"
        row, col = self.row.value, self.col.value
        self._marker.set_data([col], [row])
        self._marker.set_visible(show)
        self._window.set_visible(False)
        self._cell.set_visible(False)
        if not show:
            return
        r, c = a.query_cell(stage, row, col)
        self._cell.set_bounds(*a.cell_box(stage, r, c, 1, 1))
        self._cell.set_visible(True)
        ws = a.attentions[stage].window_size
        if ws is not None:
            self._window.set_bounds(*a.cell_box(stage, r // ws * ws, c // ws * ws, ws, ws))
            self._window.set_visible(True)

    def _gamma_html(self, stage: int, active: bool) -> str:
        if not self._gammas:
            return "<span style='color:gray'>no semantic layers (plain-Swin baseline)</span>"
        cells = []
        for i, gammas in enumerate(self._gammas):
            text = ", ".join(f"{g:+.3f}" for g in gammas)
            style = "font-weight:bold;" if (i == stage and active) else "color:#555;"
            cells.append(f"<span style='{style}margin-right:10px'>stage {i + 1}: &gamma; = {text}</span>")
        return ("<div title='gamma scales the semantic attention added to the features (0 = no effect)'>"
                + "".join(cells) + "</div>")

    def _info_html(self, a: ImageAnalysis, view: str, note: str) -> str:
        H, W = a.size
        h, w = a.input_size
        lines = [f"<b>{html.escape(self.images.titles[self.image.value])}</b>",
                 f"{W}x{H} pixels, run at {w}x{h}"]
        if a.miou is not None:
            lines.append(f"this image: mIoU {100 * a.miou:.1f}%, pixel accuracy {100 * a.pixel_accuracy:.1f}%")
        else:
            lines.append("no ground truth for this image")
        row, col = self.row.value, self.col.value
        if row < H and col < W:
            query = f"query ({row}, {col}): predicted {html.escape(self.class_names[a.prediction[row, col]])}"
            if a.label is not None:
                k = int(a.label[row, col])
                query += f", labelled {html.escape(self.class_names[k]) if k != 255 else 'ignored'}"
            lines.append(query)
        lines.append(f"<i>{html.escape(note or _VIEW_HELP[view])}</i>")
        return "<div style='max-width:260px;font-size:12px;line-height:1.4'>" + "<br>".join(lines) + "</div>"

    # ------------------------------------------------------------------------------------------- display
    def snapshot(self, format: str = "png") -> bytes:
        """The figure as it is drawn now, as PNG (or ``"jpeg"``) bytes."""
        return _snapshot(self.figure, format)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return _bundle(self.widget, self.figure, repr(self), include, exclude)

    def __repr__(self) -> str:
        return (f"Explorer({getattr(self.model, 'name', type(self.model).__name__)}, {len(self.images)} images, "
                f"view={self.view.value!r})")


_VIEW_HELP = {
    "prediction": "The model's prediction over the image.",
    "ground truth": "The label (black: ignored pixels).",
    "error map": "Green: correct, red: wrong, grey: not scored.",
    "semantic prior": "The stage's semantic layer projects its features to class space; the decoder supervises "
                      "these priors. Argmax: which class each token leans to; a class: its probability.",
    "semantic attention": "Where the query token (x; white box) attends in the stage's semantic layer: attention "
                          "between tokens with similar class priors. Windowed layers look inside their window "
                          "(dashed) only. Click the image to move the query.",
}


# ----------------------------------------------------------------------------------------------- comparison
class Comparison:
    """The same images through several models, side by side, with each prediction's mIoU on the image.

    Args:
        models: ``{label: model}``, or a list of models (labelled by their registry name).
        images, labels, titles, class_names, palette, test_preset, device, cache_size: as for `Explorer`
            (class metadata from the first model); every model must have the same number of classes.
        opacity: initial opacity of the label colours.
        dpi: resolution of the figure.

    Attributes:
        widget: the app (``VBox``): image and view controls above the figure.
        figure, axes: the figure (ipympl canvas) and its panels: ground truth (or the bare image), then one per
            model.
        image, view, opacity: the controls; view is ``"prediction"`` or ``"error map"``.
        model_runs: forward passes so far (one per model and image).
    """

    def __init__(self, models: Union[Mapping[str, nn.Module], Sequence[nn.Module]], images: ImagesInput, *,
                 labels: Optional[Sequence[Optional[np.ndarray]]] = None, titles: Optional[Sequence[str]] = None,
                 class_names: Optional[Sequence[str]] = None, palette: Optional[Sequence[Sequence[int]]] = None,
                 test_preset: TestPreset = None, device: Union[str, torch.device, None] = None,
                 cache_size: int = 64, opacity: float = 0.6, dpi: int = 72):
        who = "compare"
        w = _widgets()
        if isinstance(models, Mapping):
            named = [(str(k), m) for k, m in models.items()]
        else:
            named = []
            for i, m in enumerate(models):
                name = str(getattr(m, "name", f"model {i}"))
                named.append((name if all(name != n for n, _ in named) else f"{name} ({i})", m))
        if len(named) < 1:
            raise ValueError(f"{who}: no models given")
        classes = {label: int(m.num_classes) for label, m in named}
        if len(set(classes.values())) > 1:
            raise ValueError(f"{who}: the models predict different numbers of classes {classes}; compare models "
                             "of one dataset")
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"{who}: opacity must lie in [0, 1], got {opacity}")
        self.models = dict(named)
        for m in self.models.values():
            m.eval()
        self.images = _Images(images, labels, titles, who)
        self.class_names, self.palette = _class_metadata(named[0][1], self.images, class_names, palette, who)
        self.test_pipelines = {label: _resolve_test_pipeline(m, test_preset) for label, m in named}
        self.device = device
        self.model_runs = 0
        self._cache = LRUCache(cache_size)

        self.image = w.Dropdown(options=_image_options(self.images.titles), value=0, description="image",
                                layout=w.Layout(width="340px"))
        self.view = w.ToggleButtons(options=["prediction", "error map"], value="prediction", description="view")
        self.opacity = w.FloatSlider(value=opacity, min=0.0, max=1.0, step=0.05, description="opacity",
                                     continuous_update=False)
        for control, name in ((self.image, "image"), (self.view, "view"), (self.opacity, "opacity")):
            control.add_class(f"semask-{name}")
            control.observe(self._on_change, names="value")
        n = 1 + len(named)
        self.figure = _new_figure((2.9 * n + 1.6, 3.5), dpi)
        self.axes = [self.figure.add_axes((0.01 + i * 0.9 / n, 0.02, 0.88 / n, 0.8)) for i in range(n)]
        first, _ = self.images.get(0)
        self._pictures = []
        for ax in self.axes:
            ax.set_axis_off()
            self._pictures.append(ax.imshow(first, interpolation="nearest"))
        self.widget = w.VBox([w.HBox([self.image, self.opacity]), self.view, self.figure.canvas])
        self.widget.add_class("semask-comparison")
        self.update()

    def analysis(self, model: str, index: Optional[int] = None) -> ImageAnalysis:
        """The cached prediction of model `model` (its label) on image `index` (default: the selected one)."""
        index = self.image.value if index is None else index
        if model not in self.models:
            raise KeyError(f"compare: no model {model!r}; the models are {list(self.models)}")
        key = (model, index)
        cached = self._cache.get(key)
        if cached is None:
            image, label = self.images.get(index)
            cached = analyse_image(self.models[model], image, label, test_preset=self.test_pipelines[model],
                                   attention=False, device=self.device)
            self.model_runs += 1
            self._cache.put(key, cached)
        return cached

    def _on_change(self, change: Optional[Mapping[str, Any]] = None) -> None:
        self.update()

    def update(self) -> None:
        """Redraw every panel for the current image, view and opacity."""
        index, alpha = self.image.value, float(self.opacity.value)
        results = {name: self.analysis(name, index) for name in self.models}
        first = next(iter(results.values()))
        H, W = first.size
        label = first.label
        panels = [(overlay(first.image, label, self.palette, alpha) if label is not None else first.image,
                   "ground truth" if label is not None else f"{self.images.titles[index]} (no ground truth)")]
        for name, a in results.items():
            score = f"mIoU {100 * a.miou:.1f}%" if a.miou is not None else "no ground truth"
            if self.view.value == "error map" and label is not None:
                picture = error_map(a.prediction, label, image=a.image, alpha=alpha)
            else:
                picture = overlay(a.image, a.prediction, self.palette, alpha)
            panels.append((picture, f"{name}\n{score}"))
        present = sorted({int(k) for a in results.values() for k in np.unique(a.prediction)}
                         | ({int(k) for k in np.unique(label) if k != 255} if label is not None else set()))
        for ax, artist, (picture, title) in zip(self.axes, self._pictures, panels):
            artist.set_data(picture)
            artist.set_extent((-0.5, W - 0.5, H - 0.5, -0.5))
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
            ax.set_title(title, fontsize="medium")
        if self.view.value == "error map" and label is not None:
            class_legend(self.axes[-1], [0, 1, 2], ERROR_PALETTE, list(ERROR_CLASSES))
        else:
            class_legend(self.axes[-1], present, self.palette, self.class_names, 16)
        self.figure.canvas.draw_idle()

    def scores(self) -> list[dict[str, Any]]:
        """Per labelled image, each model's mIoU on it: ``[{"image": title, label: mIoU, ...}]`` (runs the models
        on every image not yet seen)."""
        rows = []
        for i, title in enumerate(self.images.titles):
            row: dict[str, Any] = {"image": title}
            for name in self.models:
                a = self.analysis(name, i)
                if a.miou is None:
                    break
                row[name] = a.miou
            else:
                rows.append(row)
        return rows

    def scores_markdown(self, digits: int = 1) -> str:
        """`scores()` as a markdown table in percent, with the mean over images as the last row."""
        rows = self.scores()
        names = list(self.models)
        lines = ["| image | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for row in rows:
            lines.append(f"| {row['image']} | " + " | ".join(f"{100 * row[n]:.{digits}f}" for n in names) + " |")
        if rows:
            lines.append("| **mean** | " + " | ".join(f"**{100 * np.mean([r[n] for r in rows]):.{digits}f}**"
                                                      for n in names) + " |")
        return "\n".join(lines)

    def snapshot(self, format: str = "png") -> bytes:
        """The figure as it is drawn now, as PNG (or ``"jpeg"``) bytes."""
        return _snapshot(self.figure, format)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return _bundle(self.widget, self.figure, repr(self), include, exclude)

    def __repr__(self) -> str:
        return f"Comparison({', '.join(self.models)}; {len(self.images)} images, view={self.view.value!r})"


def compare(models: Union[Mapping[str, nn.Module], Sequence[nn.Module]], images: ImagesInput,
            **kwargs: Any) -> Comparison:
    """The same images through several models side by side with per-image mIoU: `Comparison(models, images,
    **kwargs)`, e.g. ``compare({"SeMask": semask_model, "Swin": swin_model}, ToyDataset(root, "validation"),
    test_preset="toy")``."""
    return Comparison(models, images, **kwargs)
