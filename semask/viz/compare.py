"""`compare`: the same images through several SeMask models (arXiv 2112.12782) side by side, in Jupyter, with
each prediction's mIoU on the image (e.g. SeMask against its plain-Swin baseline).

Each model runs once per image (`analyse_image`, cached); the controls only redraw.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from semask.engine.inference import resolve_test_config
from semask.errors import UnknownNameError, UsageError
from semask.model.util import LRUCache
from semask.viz.analysis import ImageAnalysis, TestPreset, analyse_image
from semask.viz.appkit import (ImagesInput, ImageSource, class_metadata, display_bundle, image_options,
                               ipympl_figure, ipywidgets_module, snapshot_bytes)
from semask.viz.inputs import names_caller
from semask.viz.labels import ERROR_CLASSES, ERROR_PALETTE, class_legend, error_map, overlay

__all__ = ["Comparison", "compare"]


def _labelled(models: Union[Mapping[str, nn.Module], Sequence[nn.Module]]) -> list[tuple[str, nn.Module]]:
    """(label, model) pairs: the mapping's keys, else each model's registry name (made unique)."""
    if isinstance(models, Mapping):
        return [(str(k), m) for k, m in models.items()]
    named: list[tuple[str, nn.Module]] = []
    for i, m in enumerate(models):
        name = str(getattr(m, "name", f"model {i}"))
        named.append((name if all(name != n for n, _ in named) else f"{name} ({i})", m))
    return named


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

    @names_caller("compare")
    def __init__(self, models: Union[Mapping[str, nn.Module], Sequence[nn.Module]], images: ImagesInput, *,
                 labels: Optional[Sequence[Optional[np.ndarray]]] = None, titles: Optional[Sequence[str]] = None,
                 class_names: Optional[Sequence[str]] = None, palette: Optional[Sequence[Sequence[int]]] = None,
                 test_preset: TestPreset = None, device: Union[str, torch.device, None] = None,
                 cache_size: int = 64, opacity: float = 0.6, dpi: int = 72):
        w = ipywidgets_module()
        named = _labelled(models)
        if len(named) < 1:
            raise UsageError("no models given")
        classes = {label: int(m.num_classes) for label, m in named}
        if len(set(classes.values())) > 1:
            raise UsageError(f"the models predict different numbers of classes {classes}; compare models of one "
                             "dataset")
        if not 0.0 <= opacity <= 1.0:
            raise UsageError(f"opacity must lie in [0, 1], got {opacity}")
        self.models = dict(named)
        for m in self.models.values():
            m.eval()
        self.images = ImageSource(images, labels, titles)
        self.class_names, self.palette = class_metadata(named[0][1], self.images, class_names, palette)
        self.test_pipelines = {label: resolve_test_config(m, test_preset, name="test_preset") for label, m in named}
        self.device = device
        self.model_runs = 0
        self._cache = LRUCache(cache_size)

        self.image = w.Dropdown(options=image_options(self.images.titles), value=0, description="image",
                                layout=w.Layout(width="340px"))
        self.view = w.ToggleButtons(options=["prediction", "error map"], value="prediction", description="view")
        self.opacity = w.FloatSlider(value=opacity, min=0.0, max=1.0, step=0.05, description="opacity",
                                     continuous_update=False)
        for control, name in ((self.image, "image"), (self.view, "view"), (self.opacity, "opacity")):
            control.add_class(f"semask-{name}")
            control.observe(self._on_change, names="value")
        n = 1 + len(named)
        self.figure = ipympl_figure((2.9 * n + 1.6, 3.5), dpi)
        self.axes = [self.figure.add_axes((0.01 + i * 0.9 / n, 0.02, 0.88 / n, 0.8)) for i in range(n)]
        first, _ = self.images.get(0)
        self._pictures = []
        for ax in self.axes:
            ax.set_axis_off()
            self._pictures.append(ax.imshow(first, interpolation="nearest"))
        self.widget = w.VBox([w.HBox([self.image, self.opacity]), self.view, self.figure.canvas])
        self.widget.add_class("semask-comparison")
        self.update()

    @names_caller("compare")
    def analysis(self, model: str, index: Optional[int] = None) -> ImageAnalysis:
        """The cached prediction of model `model` (its label) on image `index` (default: the selected one)."""
        index = self.image.value if index is None else index
        if model not in self.models:
            raise UnknownNameError(f"no model {model!r}; the models are {list(self.models)}")
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
        return snapshot_bytes(self.figure, format)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return display_bundle(self.widget, self.figure, repr(self), include, exclude)

    def __repr__(self) -> str:
        return f"Comparison({', '.join(self.models)}; {len(self.images)} images, view={self.view.value!r})"


def compare(models: Union[Mapping[str, nn.Module], Sequence[nn.Module]], images: ImagesInput,
            **kwargs: Any) -> Comparison:
    """The same images through several models side by side with per-image mIoU: `Comparison(models, images,
    **kwargs)`, e.g. ``compare({"SeMask": semask_model, "Swin": swin_model}, ToyDataset(root, "validation"),
    test_preset="toy")``."""
    return Comparison(models, images, **kwargs)
