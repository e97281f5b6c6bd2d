"""`Explorer`: one SeMask model (arXiv 2112.12782) on a set of images, in Jupyter.

Pick an image and a view — the prediction, the ground truth, the error map, a stage's semantic prior (one
class's probability or the argmax over classes) or where one query pixel's token attends in a stage's semantic
layer — and the figure redraws in place, with a legend of class names for label maps and a colour bar for heat
maps (`semask.viz.explorer_figures.ViewFigure`). Each semantic layer's learned gate `gamma` (``out = gamma * f +
x``, initialised to 0) is shown beside the stage. The "all stages" view draws the query's attention and the prior
of every stage side by side, the query marked on each stage's own token (`semask.viz.explorer_figures.StageGrid`);
beside the view, the image's own `semask.analyze` numbers (per-stage prior mIoU, same-class attention against
chance, entropy). Given a run's snapshots (`snapshots=` or `Explorer.from_run`), a timeline slider shows the same
image, view and query with the model at each snapshot (`semask.viz.timeline.Timeline`: loaded when first shown, a
few kept). The model runs once per image and snapshot (`analyse_image`, cached); a control only redraws.
docs/design.md ("Visualisation and widgets") says why the app is built this way.
"""
from __future__ import annotations

import contextlib
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from semask.engine.analysis import stage_gammas
from semask.engine.inference import resolve_test_config
from semask.engine.rundir import list_snapshots
from semask.errors import UsageError
from semask.model.util import LRUCache
from semask.viz.analysis import ImageAnalysis, TestPreset, analyse_image, semantic_gammas
from semask.viz.appkit import (ImagesInput, ImageSource, class_metadata, display_bundle, image_options,
                               ipywidgets_module, snapshot_bytes)
from semask.viz.explorer_figures import MeasuresPanel, StageGrid, ViewFigure
from semask.viz.inputs import names_caller
from semask.viz.timeline import Snapshots, Timeline

if TYPE_CHECKING:
    import ipywidgets
    from matplotlib.figure import Figure

__all__ = ["VIEWS", "Explorer"]

VIEWS: tuple[str, ...] = ("prediction", "ground truth", "error map", "semantic prior", "semantic attention",
                          "all stages")
SEMANTIC_VIEWS = ("semantic prior", "semantic attention", "all stages")  # need a model with semantic layers
ALL_CLASSES = -1  # value of the class control that draws the prior's argmax over all classes

_VIEW_HELP = {
    "prediction": "The model's prediction over the image.",
    "ground truth": "The label (black: ignored pixels).",
    "error map": "Green: correct, red: wrong, grey: not scored.",
    "semantic prior": "The stage's semantic layer projects its features to class space; the decoder supervises "
                      "these priors. Argmax: which class each token leans to; a class: its probability.",
    "semantic attention": "Where the query token (x; white box) attends in the stage's semantic layer: attention "
                          "between tokens with similar class priors. Windowed layers look inside their window "
                          "(dashed) only. Click the image to move the query.",
    "all stages": "Every stage at once: top, where the query pixel's token attends in that stage's semantic layer "
                  "(the cross marks the stage's own token: 4, 8, 16, 32 input pixels a side); bottom, the stage's "
                  "prior (argmax, or the chosen class). Click a panel to move the query.",
}


class Explorer:
    """An interactive view of one SeMask model on a set of images.

    Args:
        model: a `SeMaskFPN`; a plain-Swin baseline works too (its views are prediction, ground truth and
            error map only). Put in eval mode. With `snapshots` it is only the architecture every snapshot must
            have (None: the last snapshot's); its own weights are not shown.
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
        snapshots: a run's snapshots, (step, path) pairs (`semask.engine.rundir.list_snapshots(run_dir)`) or
            ``{step: path}``: a timeline slider over them, starting at the last (see `from_run`).
        snapshot_cache: snapshot models kept in memory at once (each loaded when first shown).
        show_analysis: beside the view, the image's own `semask.analyze` numbers (`ImageAnalysis.measures`;
            images with a label, models with semantic layers).

    Attributes:
        widget: the app (an ipywidgets ``VBox``); a notebook shows it when the explorer is displayed.
        figure, ax, cax: the matplotlib figure (on an ipympl canvas), its image axes and its colour-bar axes.
        image, view, stage, class_name, row, col, opacity: the controls (ipywidgets); setting ``.value`` from
            code updates the figure exactly as the mouse does.
        gamma, info: HTML widgets with the semantic layers' gammas and a summary of the current image and view.
        model_runs: how many times the model has run (once per analysed image and snapshot).
        model: the model shown now (with a timeline: at the slider's snapshot).
        view_figure: the figure of every view but "all stages" (`ViewFigure`; ``figure``, ``ax`` and ``cax`` are
            its own).
        grid, measures: the "all stages" figure (`StageGrid`) and the panel of the image's numbers
            (`MeasuresPanel`), or None. snapshots, timeline: the `Timeline` (``steps``, ``paths``, ``loads``) and
            its slider (value: the index of the step shown), or None.
    """

    @names_caller("Explorer")
    def __init__(self, model: Optional[nn.Module], images: ImagesInput, *,
                 labels: Optional[Sequence[Optional[np.ndarray]]] = None, titles: Optional[Sequence[str]] = None,
                 class_names: Optional[Sequence[str]] = None, palette: Optional[Sequence[Sequence[int]]] = None,
                 test_preset: TestPreset = None, device: Union[str, torch.device, None] = None,
                 cache_size: int = 16, opacity: float = 0.5, max_legend: int = 16, dpi: int = 80,
                 snapshots: Optional[Snapshots] = None, snapshot_cache: int = 2, show_analysis: bool = True):
        w = ipywidgets_module()
        if cache_size < 1:
            raise UsageError(f"cache_size must be at least 1, got {cache_size}")
        if not 0.0 <= opacity <= 1.0:
            raise UsageError(f"opacity must lie in [0, 1], got {opacity}")
        self.snapshots = (Timeline(snapshots, template=model, device=device, cache=snapshot_cache)
                          if snapshots is not None else None)
        if self.snapshots is not None:
            model = self.snapshots.model(len(self.snapshots) - 1)
        elif model is None:
            raise UsageError("a model is needed (None only with snapshots=...; or use Explorer.from_run(run_dir, ...))")
        self.model = model.eval()
        self.images = ImageSource(images, labels, titles)
        self.class_names, self.palette = class_metadata(model, self.images, class_names, palette)
        self.test_pipeline = resolve_test_config(model, test_preset, name="test_preset")
        self.device = device
        self.max_legend = max_legend
        self.model_runs = 0
        self._cache = LRUCache(cache_size)
        self._gammas = semantic_gammas(model)
        self._semantic = bool(self._gammas)
        self._measure = show_analysis and self._semantic
        self._holding = False
        self._make_controls(w, opacity)
        first, _ = self.images.get(0)
        self.view_figure = ViewFigure(first, dpi, self.palette, self.class_names, max_legend)
        self.figure, self.ax, self.cax = self.view_figure.figure, self.view_figure.ax, self.view_figure.cax
        self.figure.canvas.mpl_connect("button_press_event", self.on_click)
        self.grid = StageGrid(len(stage_gammas(model)), dpi) if self._semantic else None
        if self.grid is not None:  # every panel shows the image at its own pixel coordinates
            self.grid.figure.canvas.mpl_connect("button_press_event", self.on_click)
        self.measures = MeasuresPanel(dpi) if self._measure else None
        self.widget = self._layout(w)
        self._set_image_ranges(*first.shape[:2], centre=True)  # draws the first view

    @classmethod
    @names_caller("Explorer.from_run")
    def from_run(cls, run_dir: Union[str, os.PathLike], images: ImagesInput, **kwargs: Any) -> "Explorer":
        """An explorer whose timeline is the ``iter_NNNNNN.pth`` snapshots of a ``semask train`` run directory
        (kept with ``train.snapshot_interval``), the model the last one's; `kwargs` as for `Explorer`.

        Raises:
            FileNotFoundError: no such directory. UsageError: no snapshots in it.
        """
        points = list_snapshots(run_dir)
        if not points:
            raise UsageError(f"run directory {str(run_dir)!r} holds no iter_NNNNNN.pth snapshots; train with "
                             "train.snapshot_interval=N to keep them")
        return cls(None, images, snapshots=points, **kwargs)

    def _make_controls(self, w: Any, opacity: float) -> None:
        """The ipywidgets controls, each with a stable CSS class (handles for browser tests and custom CSS)."""
        views = VIEWS if self._semantic else tuple(v for v in VIEWS if v not in SEMANTIC_VIEWS)
        style = {"description_width": "70px"}
        self.image = w.Dropdown(options=image_options(self.images.titles), value=0, description="image",
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
        self.timeline = None
        if self.snapshots is not None:
            self.timeline = w.SelectionSlider(options=[(str(s), i) for i, s in enumerate(self.snapshots.steps)],
                                              value=len(self.snapshots) - 1, description="step", style=style,
                                              continuous_update=False, layout=w.Layout(width="520px"))
            self.timeline.add_class("semask-timeline")
            self.timeline.observe(self._on_timeline, names="value")
        for control, name in ((self.image, "image"), (self.view, "view"), (self.stage, "stage"),
                              (self.class_name, "class"), (self.row, "row"), (self.col, "col"),
                              (self.opacity, "opacity")):
            control.add_class(f"semask-{name}")
        for control in (self.view, self.stage, self.class_name, self.row, self.col, self.opacity):
            control.observe(self._on_change, names="value")
        self.image.observe(self._on_image, names="value")

    def _layout(self, w: Any) -> "ipywidgets.VBox":
        def label(text: str) -> "ipywidgets.Label":  # the toggle buttons' captions, aligned with the others'
            return w.Label(text, layout=w.Layout(width="74px", justify_content="flex-end", padding="0 4px 0 0"))

        self.gamma.layout.margin = "0 0 0 12px"
        self.info.layout.margin = "8px 0 0 12px"
        self.figure.canvas.layout.flex = "0 0 auto"  # as wide as the figure, the summary right beside it
        rows = [w.HBox([self.image, self.opacity]), w.HBox([label("view"), self.view]),
                w.HBox([label("stage"), self.stage, self.gamma]), self.class_name, w.HBox([self.row, self.col])]
        rows[1:1] = [self.timeline] if self.timeline is not None else []
        figures = [self.figure.canvas] + ([self.grid.figure.canvas] if self.grid is not None else [])
        side = [self.info] + ([self.measures.figure.canvas] if self.measures is not None else [])
        for name, panel in (("stage-grid", self.grid), ("measures", self.measures)):
            if panel is not None:
                panel.figure.canvas.layout.flex = "0 0 auto"
                panel.figure.canvas.add_class(f"semask-{name}")
        shown = w.HBox(figures + [w.VBox(side)], layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        widget = w.VBox(rows + [shown])
        widget.add_class("semask-explorer")
        return widget

    # ------------------------------------------------------------------------------------------- model cache
    @names_caller("Explorer")
    def analysis(self, index: Optional[int] = None) -> ImageAnalysis:
        """The cached `ImageAnalysis` of image `index` (default: the selected one) with the model shown now (at
        the timeline's snapshot); runs the model on a miss."""
        index = self.image.value if index is None else index
        if not 0 <= index < len(self.images):
            raise IndexError(f"image {index} outside 0..{len(self.images) - 1}")
        key = (self._point(), index)
        cached = self._cache.get(key)
        if cached is None:
            image, label = self.images.get(index)
            cached = analyse_image(self.model, image, label, test_preset=self.test_pipeline,
                                   attention=self._semantic, measure=self._measure, device=self.device)
            self.model_runs += 1
            self._cache.put(key, cached)
        return cached

    def _point(self) -> int:
        """The timeline's snapshot shown now (0 without a timeline)."""
        return self.timeline.value if self.timeline is not None else 0

    @property
    def step(self) -> Optional[int]:
        """The training step of the snapshot shown now; None without a timeline."""
        return self.snapshots.steps[self._point()] if self.snapshots is not None else None

    @property
    def picture(self) -> np.ndarray:
        """(H, W, 3) uint8: what the figure shows under any heat map (the image, or a label map over it)."""
        return self.view_figure.picture

    @property
    def heat(self) -> Optional[np.ndarray]:
        """(H, W) float32: the heat map drawn over the picture (a class probability or attention weights), or
        None in the label views."""
        return self.view_figure.heat

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

    def _on_timeline(self, change: Optional[Mapping[str, Any]] = None) -> None:
        """Another snapshot: its model (loaded on first use), the same image, view and query."""
        try:
            self.model = self.snapshots.model(self._point()).eval()
        except Exception:  # a file that cannot be shown: the slider goes back to the snapshot still shown
            with self._hold():
                self.timeline.value = change["old"] if change else self.timeline.value
            raise
        self._gammas = semantic_gammas(self.model)
        self._on_change()

    def _on_image(self, change: Optional[Mapping[str, Any]] = None) -> None:
        """A new image: analyse it (or take it from the cache), fit the query sliders to its size, redraw."""
        H, W = self.analysis().size
        with self._hold():
            self._set_image_ranges(H, W, centre=False)

    @names_caller("Explorer")
    def select_pixel(self, row: int, col: int) -> None:
        """Make image pixel (row, col) the attention query (what a click on the image does)."""
        H, W = self.analysis().size
        if not (0 <= row < H and 0 <= col < W):
            raise IndexError(f"pixel ({row}, {col}) outside the {H}x{W} image")
        with self._hold():
            self.row.value, self.col.value = int(row), int(col)

    def on_click(self, event: Any) -> None:
        """Mouse click on the figure: a click on the image (in the "all stages" view: on any panel) selects the
        query pixel (other clicks are ignored)."""
        panels = [self.ax] + (self.grid.attention_axes + self.grid.prior_axes if self.grid is not None else [])
        if event.inaxes not in panels or event.xdata is None or event.ydata is None:
            return
        H, W = self.analysis().size
        row, col = int(round(event.ydata)), int(round(event.xdata))
        if 0 <= row < H and 0 <= col < W:
            self.select_pixel(row, col)

    # ------------------------------------------------------------------------------------------- drawing
    def update(self) -> None:
        """Redraw the figure, the gamma table, the summary and the image's measures from the current control
        values."""
        a = self.analysis()
        view, stage = self.view.value, self.stage.value
        class_index = None if self.class_name.value == ALL_CLASSES else self.class_name.value
        alpha = float(self.opacity.value)
        self.stage.disabled = view not in SEMANTIC_VIEWS or view == "all stages"
        self.class_name.disabled = view not in ("semantic prior", "all stages")
        self.row.disabled = self.col.disabled = False  # the query also names the classes under it in the summary
        caption, note = self._caption(), ""
        if view == "all stages":
            row, col = self.row.value, self.col.value
            self.grid.draw(a, stage_gammas(self.model), row, col, class_index, alpha, self.palette, self.class_names,
                           self.max_legend, f"{caption}\nall stages: query pixel ({row}, {col})")
        else:
            note = self.view_figure.draw(a, view, stage, class_index, alpha, self.row.value, self.col.value, caption)
        self.figure.canvas.layout.display = "none" if view == "all stages" else None
        if self.grid is not None:
            self.grid.figure.canvas.layout.display = None if view == "all stages" else "none"
        self.gamma.value = self._gamma_html(stage, view in SEMANTIC_VIEWS)
        self.info.value = self._info_html(a, view, note)
        self._draw_measures(a)
        self._shown_figure().canvas.draw_idle()

    def _caption(self) -> str:
        """The image's title, with the snapshot's step on a timeline."""
        title = self.images.titles[self.image.value]
        return title if self.step is None else f"{title} · step {self.step}"

    def _shown_figure(self) -> "Figure":
        return self.grid.figure if self.view.value == "all stages" else self.figure

    def _draw_measures(self, a: ImageAnalysis) -> None:
        if self.measures is not None:  # redrawn for a new image or snapshot only
            title = "measured on this image" + ("" if self.step is None else f", step {self.step}")
            self.measures.show((self._point(), self.image.value), a.measures, title)

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
        """The figure of the view as it is drawn now (the "all stages" view's own figure), as PNG (or ``"jpeg"``)
        bytes."""
        return snapshot_bytes(self._shown_figure(), format)

    def save_html(self, path: Union[str, os.PathLike], **options: Any) -> Path:
        """Write this explorer as one self-contained HTML page that opens from disk in any browser (no kernel,
        no network): the chosen images' views precomputed, with controls that switch between them.

        Args:
            path: the .html file (an existing one is replaced only with ``overwrite=True``).
            options: as `semask.viz.page.save_page`: ``images`` (indices, default all), ``stages`` (0-based, as
                `stage`), ``classes`` (probability maps; default the classes in each image), ``query_grid``
                (attention for a query_grid x query_grid grid of query pixels, default 8), ``max_mb`` (size
                budget, default 8), ``max_side``, ``analysis`` (`semask.analyze(...).to_dict()`), ``title``,
                ``overwrite``. The page opens at this explorer's opacity.

        Returns:
            The written file's path.

        Raises:
            UsageError: bad options, or the page would exceed its size budget (the message says what to reduce).
        """
        from semask.viz.page import PageSource, save_page

        source = PageSource(self.analysis, self.images.titles, self.class_names, self.palette,
                            semantic_gammas(self.model), getattr(self.model, "name", type(self.model).__name__))
        return save_page(source, path, **{"opacity": float(self.opacity.value), **options})

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return display_bundle(self.widget, self._shown_figure(), repr(self), include, exclude)

    def __repr__(self) -> str:
        return (f"Explorer({getattr(self.model, 'name', type(self.model).__name__)}, {len(self.images)} images, "
                f"view={self.view.value!r})")
