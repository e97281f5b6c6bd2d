"""Plots of `semask.analyze` (arXiv 2112.12782): what the semantic layers learn, per stage, over a split.

- `plot_stage_analysis`: per-stage bars: each stage's prior mIoU (and the decoder's summed prior), the share of
  attention on same-class tokens next to its chance level, and the normalised attention entropy;
- `plot_class_attention`: one stage's class-to-class attention matrix with class names.

Both take an `semask.engine.analysis.Analysis` or its `to_dict()` (a ``semask analyze --json`` file, loaded).
Not to be confused with `semask.viz.analysis`, the one-image pass of the viewers.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from semask.engine.analysis import Analysis
from semask.errors import UsageError, UsageTypeError
from semask.viz.figures import class_matrix, figure_axes
from semask.viz.inputs import names_caller

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_stage_analysis", "plot_class_attention"]

AnalysisLike = Union[Analysis, dict]


def _as_dict(analysis: AnalysisLike) -> dict[str, Any]:
    if isinstance(analysis, Analysis):
        return analysis.to_dict()
    if isinstance(analysis, dict) and isinstance(analysis.get("stages"), list):
        return analysis
    raise UsageTypeError(f"expected a semask.analyze() Analysis or its to_dict() (a `semask analyze --json` file), "
                         f"got {type(analysis).__name__}")


def _value(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


@names_caller("plot_stage_analysis")
def plot_stage_analysis(analysis: AnalysisLike, *, axes: Optional[Sequence["Axes"]] = None,
                        title: Optional[str] = None) -> "Figure":
    """Three bar panels over the stages: prior mIoU, same-class attention against chance, attention entropy.

    Args:
        analysis: an `Analysis` or its `to_dict()`.
        axes: three axes to draw into; a new figure when None.
        title: the figure's title (none when None).

    Returns:
        The figure. A stage without a semantic layer shows "n/a" instead of bars; the prior panel ends with the
        decoder's summed prior.
    """
    data = _as_dict(analysis)
    stages = data["stages"]
    if not stages:
        raise UsageError("the analysis has no stages (a model without a Swin backbone)")
    fig, (ax_prior, ax_same, ax_entropy) = figure_axes(axes, 1, 3, extra_width=1.0)
    names = [f"stage {s['stage']}" for s in stages]
    x = np.arange(len(stages))
    priors = [_value(s.get("prior_mIoU")) for s in stages] + [_value(data.get("decoder_prior_mIoU"))]
    ax_prior.bar(np.arange(len(priors)), 100 * np.asarray(priors), color=["tab:blue"] * len(stages) + ["tab:purple"])
    ax_prior.set_xticks(np.arange(len(priors)), names + ["decoder"], rotation=30)
    ax_prior.set_ylabel("mIoU of the prior as a segmentation (%)")
    same = np.asarray([_value(s.get("same_class_attention")) for s in stages])
    chance = np.asarray([_value(s.get("same_class_chance")) for s in stages])
    ax_same.bar(x - 0.2, 100 * same, width=0.4, label="attention", color="tab:green")
    ax_same.bar(x + 0.2, 100 * chance, width=0.4, label="chance (uniform)", color="tab:gray")
    ax_same.set_xticks(x, names, rotation=30)
    ax_same.set_ylabel("attention on same-class tokens (%)")
    ax_same.legend(fontsize="small")
    entropy = np.asarray([_value(s.get("attention_entropy")) for s in stages])
    ax_entropy.bar(x, entropy, color="tab:orange")
    ax_entropy.set_xticks(x, names, rotation=30)
    ax_entropy.set_ylim(0.0, 1.05)
    ax_entropy.set_ylabel("normalised attention entropy (1 = uniform)")
    for ax, values in ((ax_prior, priors), (ax_same, same), (ax_entropy, entropy)):
        for i, v in enumerate(values):
            if np.isnan(v):
                ax.text(i, 0.0, "n/a", ha="center", va="bottom", fontsize="small", color="dimgray")
    ax_prior.set_ylim(0.0, 100.0)
    ax_same.set_ylim(0.0, 100.0)
    if title:
        fig.suptitle(title)
    return fig


@names_caller("plot_class_attention")
def plot_class_attention(analysis: AnalysisLike, stage: int, *, class_names: Optional[Sequence[str]] = None,
                         annotate: Optional[bool] = None, cmap: str = "viridis",
                         ax: Optional["Axes"] = None) -> "Figure":
    """One stage's class-to-class attention: row a shows where class-a queries' attention on labelled keys goes.

    Args:
        analysis: an `Analysis` or its `to_dict()`.
        stage: the 1-based stage number (as in the table).
        class_names: K names (default: the analysis's classes).
        annotate: write each cell's percentage (default: when K <= 20).
        cmap: matplotlib colour map of the shares.
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure: shares 0..1 with a colour bar; a class without labelled query tokens is a grey row ("n/a").
    """
    data = _as_dict(analysis)
    stage_numbers = [s["stage"] for s in data["stages"]]
    if isinstance(stage, bool) or not isinstance(stage, numbers.Integral) or stage not in stage_numbers:
        raise UsageError(f"stage must be one of {stage_numbers} (1-based), got {stage!r}")
    entry = data["stages"][stage_numbers.index(stage)]
    if entry.get("class_attention") is None:
        raise UsageError(f"stage {stage} has no semantic layer (a plain-Swin stage): no class-to-class attention")
    matrix = np.asarray([[np.nan if v is None else v for v in row] for row in entry["class_attention"]], float)
    k = matrix.shape[0]
    names = list(class_names) if class_names is not None else list(data.get("classes") or
                                                                     [f"class {i}" for i in range(k)])
    if len(names) != k:
        raise UsageError(f"{len(names)} class names for a {k}x{k} matrix")
    fig, ax, shown = class_matrix(ax, matrix, names, cmap, annotate, "key class", "query class")
    same, chance = entry.get("same_class_attention"), entry.get("same_class_chance")
    extra = f"\nsame class {100 * same:.1f}% (chance {100 * chance:.1f}%)" if same is not None and chance is not None \
        else ""
    ax.set_title(f"stage {stage}: class-to-class attention{extra}", fontsize="medium")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="share of the query class's attention on labelled keys")
    return fig
