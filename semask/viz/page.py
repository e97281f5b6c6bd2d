"""A shareable explorer page for SeMask (arXiv 2112.12782): one self-contained HTML file, no kernel, no network.

`save_page` (what `Explorer.save_html` and ``semask analyze --html`` call) runs the model once per chosen image
(`semask.viz.analysis.analyse_image`, the explorer's own pass) and precomputes what the explorer draws: the
prediction, the ground truth and the error map; per chosen stage the semantic prior as the argmax and as one
class's probability; and the semantic attention of a grid of query positions. Label maps are colour PNGs (the
project's palettes, `colorize` / `error_map`), probabilities small greyscale pictures coloured in the browser with
matplotlib's viridis, and each query's attention the few numbers of its window (or map), drawn cell by cell at the
cells' pixel boxes (`semask.viz.stages.cell_box`) with inferno, scaled to the map's maximum as in the explorer.
The page's script only switches between these views; a Content-Security-Policy forbids it any network access.
"""
from __future__ import annotations

import base64
import html
import io
import json
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from semask.errors import UsageError
from semask.io import Inputs, PathLike, atomic_path, check_output_file
from semask.viz.analysis import ImageAnalysis, TestPreset, analyse_image, semantic_gammas
from semask.viz.labels import ERROR_CLASSES, ERROR_PALETTE, colorize, error_map, error_percentages
from semask.viz.page_template import PAGE_TEMPLATE
from semask.viz.stages import cell_box, prior_on_image

__all__ = ["DEFAULT_MAX_MB", "PageSource", "page_source", "PageViews", "build_views", "render_page", "page_html",
           "write_page", "save_page"]

DEFAULT_MAX_MB = 8.0  # the page's size budget, in MB (10**6 bytes)
VIEW_HELP = {  # the caption of each view on the page
    "prediction": "The model's prediction over the image.",
    "ground truth": "The label; ignored pixels show the bare image.",
    "error map": "Green: correct, red: wrong; ignored pixels (not scored) show the bare image.",
    "semantic prior": "The stage's semantic layer projects its features to class space; the decoder supervises "
                      "these priors. Argmax: which class each token leans to; a class: its probability.",
    "semantic attention": "Where the query token (x; white box) attends in the stage's semantic layer: attention "
                          "between tokens with similar class priors. Windowed layers look inside their window "
                          "(dashed) only.",
}


@dataclass
class PageSource:
    """What a page is built from: the images, analysed on demand, and how to name and colour them.

    Attributes:
        analyse: image index -> its `ImageAnalysis` (the explorer's cached `Explorer.analysis`).
        titles: a name per image.
        class_names: K names.
        palette: (K, 3) colours of the label maps.
        gammas: each semantic stage's learned gates (`semantic_gammas`); empty for the plain-Swin baseline.
        model_name: shown in the page's heading.
    """

    analyse: Callable[[int], ImageAnalysis]
    titles: Sequence[str]
    class_names: Sequence[str]
    palette: np.ndarray
    gammas: list[list[float]] = field(default_factory=list)
    model_name: str = "model"


def page_source(model: nn.Module, images: Any, *, test_preset: TestPreset = None,
                device: Union[str, torch.device, None] = None, class_names: Optional[Sequence[str]] = None,
                palette: Optional[Sequence[Sequence[int]]] = None) -> PageSource:
    """A `PageSource` without the ipywidgets app: `images` as `Explorer` takes them (a dataset read without its
    transform, images, ...), each run through `analyse_image` when the page is built."""
    from semask.engine.inference import resolve_test_config
    from semask.viz.appkit import ImageSource, class_metadata

    source = ImageSource(images, None, None)
    names, colours = class_metadata(model, source, class_names, palette)
    config = resolve_test_config(model, test_preset, name="test_preset")
    gammas = semantic_gammas(model)

    def analyse(index: int) -> ImageAnalysis:
        image, label = source.get(index)
        return analyse_image(model, image, label, test_preset=config, attention=bool(gammas), device=device)

    return PageSource(analyse, source.titles, names, colours, gammas, getattr(model, "name", type(model).__name__))


# ----------------------------------------------------------------------------------------------- encoding
def _encoded(array: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(array).save(buffer, "PNG", optimize=True)
    else:
        Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _data_uri(array: np.ndarray, exact: bool, quality: int = 90) -> str:
    """A uint8 picture as a data: URI: PNG where every value must survive (label colours), else the smaller of
    PNG and JPEG (photos, probabilities)."""
    candidates = [("png", _encoded(array, "PNG"))]
    if not exact:
        candidates.append(("jpeg", _encoded(array, "JPEG", quality)))
    kind, data = min(candidates, key=lambda c: len(c[1]))
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def _json(data: Any) -> str:
    """Compact JSON that can stand inside a <script> element (no "<" that could close it)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _json_size(data: Any) -> int:
    return len(_json(data))


def _finite(value: Optional[float]) -> Optional[float]:
    """A score for the JSON: None where undefined (NaN)."""
    return None if value is None or value != value else float(value)


def _nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) labels on a (h, w) grid, each output pixel taking the label under its centre."""
    H, W = labels.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * H / size[0]).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * W / size[1]).astype(np.int64), W - 1)
    return labels[rows[:, None], cols[None, :]]


def _label_layer(labels: np.ndarray, palette: Any) -> dict[str, Any]:
    """A label map as an RGBA PNG in `palette` (ignored pixels transparent: the image shows, as in `overlay`) and
    the classes it shows."""
    rgba = np.dstack([colorize(labels, palette), np.where(labels == 255, 0, 255).astype(np.uint8)])
    return {"png": _data_uri(rgba, True), "classes": [int(k) for k in np.unique(labels) if k != 255]}


# ----------------------------------------------------------------------------------------------- one image
@dataclass
class _Options:
    stages: list[int]
    classes: Optional[list[int]]
    grid: int
    max_side: int
    quality: int
    max_mb: float


def _query_points(size: tuple[int, int], grid: int) -> list[tuple[int, int]]:
    """A grid x grid set of image pixels (row, col), the centres of equal blocks of the image."""
    rows = [min(int((i + 0.5) * size[0] / grid), size[0] - 1) for i in range(grid)]
    cols = [min(int((j + 0.5) * size[1] / grid), size[1] - 1) for j in range(grid)]
    return [(r, c) for r in rows for c in cols]


def _stage_attention(a: ImageAnalysis, stage: int, points: list[tuple[int, int]],
                     shown: tuple[int, int]) -> dict[str, Any]:
    """One stage's attention for every query point: the query's cell, the cells' pixel edges on the shown
    picture, and per distinct query cell its window (or map) of weights as bytes scaled to their maximum."""
    amap = a.attentions[stage]
    stride, ws = a.strides[stage], amap.window_size
    box = lambda r, c: cell_box(r, c, 1, 1, stride, a.input_size, shown)  # noqa: E731 (x, y, w, h) in pixels
    row_edges = [box(r, 0)[1] + 0.5 for r in range(amap.height)] + [sum(box(amap.height - 1, 0)[1::2]) + 0.5]
    col_edges = [box(0, c)[0] + 0.5 for c in range(amap.width)] + [sum(box(0, amap.width - 1)[0::2]) + 0.5]
    cells: dict[tuple[int, int], int] = {}
    maps, queries = [], []
    for row, col in points:
        r, c = a.query_cell(stage, row, col)
        if (r, c) not in cells:
            weights = amap.query_map(0, r, c).numpy()  # h_i, w_i; zero outside the query's window
            r0, c0 = (r // ws * ws, c // ws * ws) if ws else (0, 0)
            crop = weights[r0:r0 + ws, c0:c0 + ws] if ws else weights
            peak = max(float(crop.max()), 1e-6)
            data = np.clip(np.round(crop / peak * 255), 0, 255).astype(np.uint8)
            cells[(r, c)] = len(maps)
            maps.append({"r0": r0, "c0": c0, "h": int(crop.shape[0]), "w": int(crop.shape[1]), "max": peak,
                         "data": base64.b64encode(data.tobytes()).decode("ascii")})
        queries.append([r, c, cells[(r, c)]])
    return {"rows": row_edges, "cols": col_edges, "window": ws, "queries": queries, "maps": maps}


def _image_payload(a: ImageAnalysis, title: str, source: PageSource, opts: _Options,
                   sizes: dict[str, int]) -> dict[str, Any]:
    """Everything the page shows of one image; adds each part's bytes to `sizes`."""
    H, W = a.size
    scale = min(1.0, opts.max_side / max(H, W))
    shown = (max(1, round(H * scale)), max(1, round(W * scale)))
    picture = np.asarray(Image.fromarray(a.image).resize(shown[::-1], Image.BILINEAR)) if scale < 1 else a.image
    prediction = _nearest(a.prediction, shown)
    layers = {"prediction": _label_layer(prediction, source.palette)}
    out: dict[str, Any] = {"title": title, "size": [H, W], "shown": list(shown), "input": list(a.input_size),
                           "miou": _finite(a.miou), "acc": _finite(a.pixel_accuracy), "layers": layers,
                           "picture": _data_uri(picture, False, opts.quality)}
    if a.label is not None:
        label = _nearest(a.label, shown)
        layers["ground truth"] = _label_layer(label, source.palette)
        errors = np.dstack([error_map(prediction, label), np.where(label == 255, 0, 255).astype(np.uint8)])
        right, wrong = error_percentages(a.prediction, a.label)
        layers["error map"] = {"png": _data_uri(errors, True), "percent": [right, wrong]}
    sizes["pictures"] += len(out["picture"]) + _json_size(layers)
    points = _query_points((H, W), opts.grid)
    out["points"] = [[r, c, int(a.prediction[r, c]), None if a.label is None else int(a.label[r, c])]
                     for r, c in points]
    present = sorted(set(np.unique(a.prediction).tolist())
                     | (set(np.unique(a.label).tolist()) - {255} if a.label is not None else set()))
    classes = opts.classes if opts.classes is not None else present
    out["classes"] = classes
    out["priors"], out["attention"] = {}, {}
    for s in opts.stages:
        probabilities, stride = a.stage_priors[s], a.strides[s]
        argmax = prior_on_image(probabilities, None, stride, a.input_size, shown)
        prior = {"argmax": _label_layer(argmax, source.palette), "class": {}}
        for k in classes:
            p = prior_on_image(probabilities, k, stride, a.input_size, shown)
            prior["class"][str(k)] = _data_uri(np.clip(np.round(p * 255), 0, 255).astype(np.uint8), False,
                                               opts.quality)
        sizes["priors"] += _json_size(prior)
        out["priors"][str(s)] = prior
        if a.attentions:
            attention = _stage_attention(a, s, points, shown)
            sizes["attention"] += _json_size(attention)
            out["attention"][str(s)] = attention
    return out


# ----------------------------------------------------------------------------------------------- the page
def _indices(value: Optional[Sequence[Any]], count: int, what: str, names: Optional[Sequence[str]] = None,
             default: Optional[list[int]] = None) -> list[int]:
    """Checked 0-based indices (or names, where `names` are given) into `count` things."""
    if value is None:
        return list(range(count)) if default is None else default
    if isinstance(value, (str, numbers.Integral)):
        value = [value]
    out = []
    for v in value:
        if names is not None and isinstance(v, str):
            if v not in names:
                raise UsageError(f"{what}: unknown class {v!r}; the classes are {list(names)}")
            v = list(names).index(v)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 0 <= v < count:
            raise UsageError(f"{what}: expected indices in 0..{count - 1}"
                             + (" or class names" if names is not None else "") + f", got {v!r}")
        if int(v) in out:
            raise UsageError(f"{what}: {v!r} is given twice")
        out.append(int(v))
    return out


def _budget_error(sizes: dict[str, int], done: int, total: int, opts: _Options) -> UsageError:
    used = sum(sizes.values())
    parts = ", ".join(f"{what} {sizes[key] / 1e6:.2f} MB" for key, what in _PARTS.items() if sizes.get(key))
    return UsageError(
        f"the page would exceed its size budget of {opts.max_mb:g} MB: {done} of {total} images already take "
        f"{used / 1e6:.2f} MB ({parts}; about {used / done * total / 1e6:.1f} MB for all {total}); choose fewer "
        f"images (images=, --html-images), a coarser query grid (now {opts.grid}x{opts.grid}: query_grid=, "
        f"--html-grid), fewer stages (now {len(opts.stages)}: stages=) or classes (classes=), a smaller max_side "
        f"(now {opts.max_side}), or raise the budget (max_mb=, --html-max-mb)")


_PARTS = {"pictures": "image and label pictures", "priors": "stage priors", "attention": "query attention",
          "analysis": "the analysis"}


@dataclass
class PageViews:
    """A page's views, built and within budget, waiting for the analysis table (`render_page`).

    Attributes:
        data: what the page's script reads (`semask.viz.page_template`), without ``"analysis"``.
        sizes: bytes of each part (``pictures``, ``priors``, ``attention``), for the budget's message.
    """

    data: dict[str, Any]
    sizes: dict[str, int]
    options: _Options


def build_views(source: PageSource, *, images: Optional[Sequence[int]] = None,
                stages: Optional[Sequence[int]] = None, classes: Optional[Sequence[Union[int, str]]] = None,
                query_grid: int = 8, max_side: int = 512, max_mb: float = DEFAULT_MAX_MB, quality: int = 90,
                opacity: float = 0.5, title: Optional[str] = None) -> PageViews:
    """Analyse the chosen images and encode their views (see `save_page` for the arguments).

    Raises:
        UsageError: bad arguments, or the views pass `max_mb` (raised as soon as the images built so far pass
            it, naming what to reduce).
    """
    for name, value, low, high in (("query_grid", query_grid, 1, 64), ("max_side", max_side, 16, 8192),
                                   ("quality", quality, 10, 100)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
            raise UsageError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if not isinstance(max_mb, numbers.Real) or isinstance(max_mb, bool) or not max_mb > 0:
        raise UsageError(f"max_mb must be a positive number of MB, got {max_mb!r}")
    if not 0.0 <= opacity <= 1.0:
        raise UsageError(f"opacity must lie in [0, 1], got {opacity}")
    chosen = _indices(images, len(source.titles), "images")
    if not chosen:
        raise UsageError("images: no image chosen")
    opts = _Options(_indices(stages, len(source.gammas), "stages"), None if classes is None else
                    _indices(classes, len(source.class_names), "classes", source.class_names), query_grid,
                    max_side, quality, float(max_mb))
    sizes = {"pictures": 0, "priors": 0, "attention": 0}
    payloads = []
    for done, index in enumerate(chosen, 1):
        payloads.append(_image_payload(source.analyse(index), source.titles[index], source, opts, sizes))
        if sum(sizes.values()) + len(PAGE_TEMPLATE) > opts.max_mb * 1e6:
            raise _budget_error(sizes, done, len(chosen), opts)
    from matplotlib import colormaps

    luts = {name: "".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in
                          np.round(colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(int))
            for name in ("viridis", "inferno")}
    hex_colours = lambda colours: [f"#{int(r):02x}{int(g):02x}{int(b):02x}" for r, g, b in colours]  # noqa: E731
    data = {"title": title or f"SeMask explorer: {source.model_name}", "classes": list(source.class_names),
            "palette": hex_colours(np.asarray(source.palette)[:, :3]),
            "errors": {"names": list(ERROR_CLASSES), "palette": hex_colours(ERROR_PALETTE)},
            "stages": [{"index": s, "gamma": source.gammas[s]} for s in opts.stages], "grid": query_grid,
            "opacity": opacity, "help": VIEW_HELP, "luts": luts, "images": payloads}
    return PageViews(data, sizes, opts)


def render_page(views: PageViews, analysis: Optional[Mapping[str, Any]] = None) -> str:
    """The page as one HTML string: `views` and, when given, `Analysis.to_dict()` of the split as a table.

    Raises:
        UsageError: the page with the analysis passes the budget.
    """
    data = {**views.data, "analysis": None if analysis is None else dict(analysis)}
    values = {"TITLE": html.escape(data["title"]), "DATA": _json(data)}
    page = re.sub(r"__(TITLE|DATA)__", lambda m: values[m.group(1)], PAGE_TEMPLATE)
    if len(page.encode("utf-8")) > views.options.max_mb * 1e6:
        count = len(views.data["images"])
        raise _budget_error({**views.sizes, "analysis": len(_json(data["analysis"]))}, count, count, views.options)
    return page


def page_html(source: PageSource, *, analysis: Optional[Mapping[str, Any]] = None, **options: Any) -> str:
    """`render_page` of `build_views`: the explorer page as one HTML string (arguments as `save_page`)."""
    return render_page(build_views(source, **options), analysis)


def write_page(path: PathLike, views: PageViews, analysis: Optional[Mapping[str, Any]] = None) -> Path:
    """Render the page and write it atomically to `path` (checked by the caller before the work)."""
    page = render_page(views, analysis)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)


def save_page(source: PageSource, path: PathLike, *, overwrite: bool = False, inputs: Inputs = (),
              analysis: Optional[Mapping[str, Any]] = None, **options: Any) -> Path:
    """Write the explorer page: one self-contained HTML file that opens from disk in any browser.

    The output is checked before any image is analysed (never an input, an existing file only with
    `overwrite`), the views built within the budget, then the page written atomically.

    Args:
        source: the images and the model's pass over them (`page_source`, or `Explorer.save_html`).
        path: the .html file.
        overwrite: replace an existing file.
        inputs: the caller's input files, which the output may not be.
        analysis: `semask.analyze(...).to_dict()` of the split, shown as a per-stage table with the
            class-to-class attention of the selected stage.
        images: indices of the images to include (default: all).
        stages: 0-based indices of the stages to include (default: every stage with a semantic layer).
        classes: class indices or names whose prior probability maps to include (default: per image, the
            classes in its prediction or ground truth); the argmax is always there.
        query_grid: query positions per side: the attention of a query_grid x query_grid grid of image
            pixels (a click snaps to the nearest).
        max_side: the pictures' longest side in pixels (larger images are shown scaled down).
        max_mb: the size budget in MB (10**6 bytes).
        quality: JPEG quality of the photos and probability maps (each kept as PNG when that is smaller).
        opacity: initial opacity of the maps over the image.
        title: the page's heading.

    Returns:
        `path` as a `Path`.

    Raises:
        UsageError: see `build_views`, `render_page`. OutputError, OutputExistsError: `path` cannot be written
            or exists.
    """
    check_output_file(path, "the page", inputs=inputs, overwrite=overwrite, probe=True)
    return write_page(path, build_views(source, **options), analysis)
