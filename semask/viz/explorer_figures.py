"""The `Explorer`'s figures (SeMask, arXiv 2112.12782): the one view, every stage at once, and the image's measures.

- `ViewFigure`, every view but "all stages": the picture (the image, the prediction, the ground truth or the error
  map over it, a stage's argmax prior), a heat map over it with its colour bar (one class's prior probability, or
  where the query's token attends in a stage's semantic layer, zero weights left uncoloured), the query pixel
  marked with its token and, for a windowed layer, its window, and a legend of the classes shown.
- `StageGrid`, the "all stages" view: per backbone stage, where the query pixel's token attends in the stage's
  semantic layer (top row) and the stage's semantic prior (bottom row). The one query pixel lands on a different
  token in each stage (cells of 4, 8, 16, 32 input pixels); each panel marks that stage's token, found and drawn
  through the one grid-to-pixels mapping (`ImageAnalysis.query_cell` / `cell_box`, `semask.viz.stages`).
- `MeasuresPanel`: the image's own `semask.analyze` numbers (`ImageAnalysis.measures`, from the same forward),
  drawn by `plot_stage_analysis`: per stage the prior's mIoU, the same-class attention against chance, the
  attention entropy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Optional, Sequence

import numpy as np

from semask.engine.analysis import Analysis
from semask.viz.analysis import ImageAnalysis
from semask.viz.analysis_plots import plot_stage_analysis
from semask.viz.appkit import ipympl_figure
from semask.viz.labels import ERROR_CLASSES, ERROR_PALETTE, class_legend, error_map, error_percentages, overlay

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["ViewFigure", "StageGrid", "MeasuresPanel"]

_RIGHT = 1.5  # inches right of the panels: the legend or the colour bars


def _mark_token(ax: "Axes", a: ImageAnalysis, stage: int, row: int, col: int, window: Optional[int]) -> None:
    """The query's token in this stage: a white box around its cell and a cross at the cell's centre; for a
    windowed layer its window, dashed."""
    from matplotlib.patches import Rectangle

    r, c = a.query_cell(stage, row, col)
    x, y, width, height = a.cell_box(stage, r, c, 1, 1)
    ax.add_patch(Rectangle((x, y), width, height, fill=False, edgecolor="white", linewidth=1.2))
    ax.plot([x + width / 2], [y + height / 2], linestyle="none", marker="x", color="cyan", markersize=9,
            markeredgewidth=2.2)
    if window is not None:
        x, y, width, height = a.cell_box(stage, r // window * window, c // window * window, window, window)
        ax.add_patch(Rectangle((x, y), width, height, fill=False, edgecolor="cyan", linestyle="--", linewidth=1.2))


def _no_layer(ax: "Axes", image: np.ndarray, title: str) -> None:
    """A panel of a stage without a semantic layer: the image faded, saying so."""
    faded = (0.35 * image + 0.65 * 200).astype(np.uint8)
    ax.imshow(faded, interpolation="nearest")
    ax.text(0.5, 0.5, "no semantic layer", transform=ax.transAxes, ha="center", va="center", fontsize="small",
            color="dimgray")
    ax.set_title(title, fontsize="small")


class ViewFigure:
    """The explorer's one-view figure: the picture (the image, or a label map over it), a heat map over it with
    its colour bar, the query's marks and a legend of the classes shown.

    Args:
        first: (H, W, 3) uint8, the image shown first.
        dpi: resolution.
        palette, class_names: the classes' colours and names.
        max_legend: at most this many classes in the legend.

    Attributes:
        figure, ax, cax: the figure (on an ipympl canvas), its image axes and its colour-bar axes.
    """

    def __init__(self, first: np.ndarray, dpi: int, palette: np.ndarray, class_names: Sequence[str],
                 max_legend: int):
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.patches import Rectangle

        self.palette, self.class_names, self.max_legend = palette, class_names, max_legend
        self.figure = ipympl_figure((6.8, 5.0), dpi)
        self.ax = self.figure.add_axes((0.01, 0.02, 0.66, 0.86))
        self.cax = self.figure.add_axes((0.71, 0.12, 0.03, 0.7))
        self.ax.set_axis_off()
        self._picture = self.ax.imshow(first, interpolation="nearest")
        self._heat = self.ax.imshow(np.zeros(first.shape[:2], np.float32), cmap="viridis", vmin=0.0, vmax=1.0,
                                    interpolation="nearest", visible=False)
        (self._marker,) = self.ax.plot([0], [0], linestyle="none", marker="x", color="cyan", markersize=11,
                                       markeredgewidth=2.5, visible=False)
        self._window = Rectangle((0, 0), 1, 1, fill=False, edgecolor="cyan", linestyle="--", linewidth=1.4,
                                 visible=False)
        self._cell = Rectangle((0, 0), 1, 1, fill=False, edgecolor="white", linewidth=1.2, visible=False)
        self.ax.add_patch(self._window)
        self.ax.add_patch(self._cell)
        self._scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap="viridis")  # the colour bar, opaque
        self._colorbar = self.figure.colorbar(self._scale, cax=self.cax)

    @property
    def picture(self) -> np.ndarray:
        """(H, W, 3) uint8: what the figure shows under any heat map (the image, or a label map over it)."""
        return np.asarray(self._picture.get_array())

    @property
    def heat(self) -> Optional[np.ndarray]:
        """(H, W) float32: the heat map drawn over the picture (a class probability or attention weights), or
        None in the label views."""
        return np.ma.getdata(self._heat.get_array()) if self._heat.get_visible() else None

    def draw(self, a: ImageAnalysis, view: str, stage: int, class_index: Optional[int], alpha: float, row: int,
             col: int, caption: str) -> str:
        """Draw a one-panel view (any of `semask.viz.explorer.VIEWS` but "all stages") for image pixel (row, col) as
        the query; returns the view's note for the explorer's summary."""
        H, W = a.size
        picture, heat, legend, colorbar_label, detail, note = self._view(a, view, stage, class_index, alpha, row, col)
        if picture.shape[:2] != self._picture.get_array().shape[:2]:
            for artist in (self._picture, self._heat):
                artist.set_extent((-0.5, W - 0.5, H - 0.5, -0.5))
            self.ax.set_xlim(-0.5, W - 0.5)
            self.ax.set_ylim(H - 0.5, -0.5)
        self._picture.set_data(picture)
        self._draw_heat(heat, alpha, colorbar_label)
        if legend is None:
            class_legend(self.ax, [], self.palette)
        self._draw_query(a, view, stage, row, col)
        self.ax.set_title(f"{caption}\n{detail}", fontsize="medium")
        return note

    def _draw_heat(self, heat: Optional[tuple[Any, str, float]], alpha: float, colorbar_label: str) -> None:
        if heat is None:
            self._heat.set_visible(False)
            self.cax.set_visible(False)
            return
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

    def _label_legend(self, labels: np.ndarray) -> Any:
        present = [int(k) for k in np.unique(labels) if k != 255]
        return class_legend(self.ax, present, self.palette, self.class_names, self.max_legend)

    def _error_legend(self, prediction: np.ndarray, label: np.ndarray) -> Any:
        right, wrong = error_percentages(prediction, label)
        names = [f"{ERROR_CLASSES[0]} {right:.1f}%", f"{ERROR_CLASSES[1]} {wrong:.1f}%",
                 f"{ERROR_CLASSES[2]} (not scored)"]
        classes = [0, 1] + ([2] if (label == 255).any() else [])
        return class_legend(self.ax, classes, ERROR_PALETTE, names)

    def _draw_query(self, a: ImageAnalysis, view: str, stage: int, row: int, col: int) -> None:
        show = view == "semantic attention"
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

    def _view(self, a: ImageAnalysis, view: str, stage: int, class_index: Optional[int], alpha: float, row: int,
              col: int) -> tuple[np.ndarray, Optional[tuple[Any, str, float]], Any, str, str, str]:
        """What a view draws: (picture, heat (data, cmap, vmax) or None, legend, colour-bar label, title line,
        note)."""
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
            weights = a.attention_map(stage, row, col)
            # zero weight (outside a windowed layer's window) is left uncoloured: the image shows through
            heat = (np.ma.masked_equal(weights, 0.0), "inferno", max(float(weights.max()), 1e-6))
            colorbar_label = "attention weight"
            amap = a.attentions[stage]
            kind = f"{amap.window_size}x{amap.window_size} windows" if amap.window_size else "global"
            detail = f"stage {stage + 1} semantic attention ({kind}, {amap.height}x{amap.width} tokens)"
        return picture, heat, legend, colorbar_label, detail, note


class StageGrid:
    """The "all stages" figure of the explorer.

    Args:
        num_stages: backbone stages (one column each).
        dpi: resolution.

    Attributes:
        figure: the figure, on an ipympl canvas.
        attention_axes, prior_axes: one axes per stage: the query's attention, the stage's prior. A panel's
            first line (``ax.lines[0]``) is the cross on the query's token in that stage.
    """

    def __init__(self, num_stages: int, dpi: int):
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        width = 2.1 * num_stages + _RIGHT
        self.figure = ipympl_figure((width, 5.6), dpi)
        left, right = 0.08 / width, 1.0 - _RIGHT / width
        step = (right - left) / num_stages
        self.attention_axes = [self.figure.add_axes((left + i * step, 0.47, 0.95 * step, 0.36))
                               for i in range(num_stages)]
        self.prior_axes = [self.figure.add_axes((left + i * step, 0.03, 0.95 * step, 0.36))
                           for i in range(num_stages)]
        bar_x = right + 0.15 / width
        self._attention_bar = self.figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), "inferno"),
                                                   cax=self.figure.add_axes((bar_x, 0.49, 0.12 / width, 0.32)))
        self._attention_bar.set_label("attention / the panel's max", fontsize="small")
        self._prior_scale = ScalarMappable(Normalize(0.0, 1.0), "viridis")
        self._prior_cax = self.figure.add_axes((bar_x, 0.05, 0.12 / width, 0.32))
        self._prior_bar = self.figure.colorbar(self._prior_scale, cax=self._prior_cax)

    def draw(self, a: ImageAnalysis, gammas: Sequence[Optional[list[float]]], row: int, col: int,
             class_index: Optional[int], alpha: float, palette: np.ndarray, class_names: Sequence[str],
             max_legend: int, title: str) -> None:
        """Redraw every panel for image pixel (row, col) as the query.

        Args:
            a: the image's analysis.
            gammas: per backbone stage its gates, None for a stage without a semantic layer
                (`semask.engine.analysis.stage_gammas`).
            row, col: the query pixel.
            class_index: the class whose prior probability is drawn; None: the argmax over classes.
            alpha: opacity of the maps over the image.
            palette, class_names: the classes' colours and names.
            max_legend: at most this many classes in the legend.
            title: the figure's title.
        """
        present: set[int] = set()
        j = 0  # index of the stage's semantic layer in the analysis's lists
        for i, (ax_attention, ax_prior) in enumerate(zip(self.attention_axes, self.prior_axes)):
            ax_attention.clear()
            ax_prior.clear()
            if i >= len(gammas) or gammas[i] is None:
                _no_layer(ax_attention, a.image, f"stage {i + 1}")
                _no_layer(ax_prior, a.image, f"stage {i + 1} prior")
            else:
                present.update(self._draw_stage(ax_attention, ax_prior, a, i, j, row, col, class_index, alpha,
                                                palette, class_names))
                j += 1
            ax_attention.set_axis_off()
            ax_prior.set_axis_off()
        class_legend(self.prior_axes[-1], sorted(present), palette, class_names, max_legend)
        self._prior_cax.set_visible(class_index is not None)
        if class_index is not None:
            self._prior_bar.set_label(f"P({class_names[class_index]})", fontsize="small")
        self.figure.suptitle(title, fontsize="medium")

    @staticmethod
    def _draw_stage(ax_attention: "Axes", ax_prior: "Axes", a: ImageAnalysis, i: int, j: int, row: int, col: int,
                    class_index: Optional[int], alpha: float, palette: np.ndarray,
                    class_names: Sequence[str]) -> set[int]:
        """One stage's two panels; returns the classes its argmax prior shows."""
        amap = a.attentions[j]
        weights = a.attention_map(j, row, col)
        peak = max(float(weights.max()), 1e-6)
        ax_attention.imshow(a.image, interpolation="nearest")
        # zero weight (outside a windowed layer's window) is left uncoloured: the image shows through
        ax_attention.imshow(np.ma.masked_equal(weights, 0.0), cmap="inferno", vmin=0.0, vmax=peak, alpha=alpha,
                            interpolation="nearest")
        kind = f"{amap.window_size}x{amap.window_size} windows" if amap.window_size else "global"
        ax_attention.set_title(f"stage {i + 1}: {kind}\n{amap.height}x{amap.width} tokens, max {peak:.3f}",
                               fontsize="small")
        present: set[int] = set()
        if class_index is None:
            labels = a.prior_map(j)
            present.update(int(k) for k in np.unique(labels))
            ax_prior.imshow(overlay(a.image, labels, palette, alpha), interpolation="nearest")
            ax_prior.set_title(f"stage {i + 1} prior: argmax", fontsize="small")
        else:
            ax_prior.imshow(a.image, interpolation="nearest")
            ax_prior.imshow(a.prior_map(j, class_index), cmap="viridis", vmin=0.0, vmax=1.0, alpha=alpha,
                            interpolation="nearest")
            ax_prior.set_title(f"stage {i + 1} prior: {class_names[class_index]}", fontsize="small")
        for ax, window in ((ax_attention, amap.window_size), (ax_prior, None)):
            _mark_token(ax, a, j, row, col, window)
        return present


class MeasuresPanel:
    """The explorer's panel of the image's `semask.analyze` numbers, three bar plots stacked (`plot_stage_analysis`).

    Args:
        dpi: resolution.

    Attributes:
        figure: the figure, on an ipympl canvas; ``figure.axes[:3]`` the prior mIoU, same-class attention and
            entropy plots.
    """

    def __init__(self, dpi: int):
        self.figure = ipympl_figure((3.3, 5.6), dpi)
        self.axes = [self.figure.add_axes((0.2, y, 0.76, 0.17)) for y in (0.72, 0.41, 0.1)]
        self._note = self.figure.text(0.5, 0.5, "", ha="center", va="center", wrap=True, fontsize="small",
                                      color="dimgray")
        self._shown: Optional[Hashable] = None

    def show(self, key: Hashable, measures: Optional[Analysis], title: str) -> None:
        """Draw `measures` unless the panel shows `key` (the explorer's snapshot and image) already."""
        if key != self._shown:
            self._shown = key
            self.draw(measures, title)
            self.figure.canvas.draw_idle()

    def draw(self, measures: Optional[Analysis], title: str,
             note: str = "no ground truth for this image: nothing to measure") -> None:
        """Draw `measures` (an `Analysis` of one image) under `title`, or `note` when there is none."""
        for ax in self.axes:
            ax.clear()
            ax.set_visible(measures is not None)
        self.figure.suptitle(title, fontsize="medium")
        self._note.set_text("" if measures is not None else note)
        if measures is None:
            return
        plot_stage_analysis(measures, axes=self.axes)
        for ax, label, fmt in zip(self.axes, ("prior mIoU %", "same class %", "entropy (0..1)"),
                                  ("%.0f", "%.0f", "%.2f")):
            ax.set_ylabel(label, fontsize="small")
            ax.tick_params(labelsize="x-small")
            for bars in ax.containers:  # one image's numbers are read, not only compared
                ax.bar_label(bars, fmt=fmt, fontsize="xx-small", padding=1)
        for ax, top in zip(self.axes, (112.0, 112.0, 1.12)):  # room for the numbers above full bars
            ax.set_ylim(0.0, top)
        self.axes[1].legend(fontsize="x-small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2,
                            frameon=False)
