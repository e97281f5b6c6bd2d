"""The matplotlib plumbing of semask's plots (arXiv 2112.12782): the axes to draw into and one image panel.

pyplot is imported only when a new figure is made, so importing semask selects no matplotlib backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from semask.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PANEL_INCHES", "figure_axes", "single_axes", "show_picture", "class_matrix"]

PANEL_INCHES = 3.0  # side of one image panel in the plot_* figures


def figure_axes(axes: Optional[Union["Axes", Sequence["Axes"]]], nrows: int, ncols: int,
                extra_width: float = 0.0) -> tuple["Figure", list["Axes"]]:
    """The caller's axes (exactly nrows * ncols of them) or a new constrained-layout figure's, row-major.

    Raises:
        UsageError: the caller gave another number of axes.
    """
    needed = nrows * ncols
    if axes is not None:
        flat = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(flat) != needed:
            raise UsageError(f"needs {needed} axes for this plot, got {len(flat)}")
        return flat[0].figure, flat
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(nrows, ncols, figsize=(ncols * PANEL_INCHES + extra_width, nrows * PANEL_INCHES),
                             squeeze=False, layout="constrained")
    return fig, list(grid.ravel())


def single_axes(ax: Optional["Axes"], figsize: tuple[float, float]) -> tuple["Figure", "Axes"]:
    """The caller's axes and its figure, or a new constrained-layout figure of `figsize` inches with one axes."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def show_picture(ax: "Axes", picture: np.ndarray, title: str) -> None:
    """Draw an (H, W, 3) picture pixel for pixel, titled, without axis lines."""
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title, fontsize="medium")
    ax.set_axis_off()


def class_matrix(ax: Optional["Axes"], matrix: np.ndarray, names: Sequence[str], cmap: str,
                 annotate: Optional[bool], xlabel: str, ylabel: str) -> tuple["Figure", "Axes", Any]:
    """A K x K matrix of shares 0..1 with class names on both axes; NaN cells grey (a NaN diagonal cell "n/a"),
    each cell's percentage written when `annotate` (default: K <= 20), in black or white by the cell's colour.

    Returns:
        The figure, the axes and the image (for a colour bar).
    """
    import matplotlib

    k = matrix.shape[0]
    side = max(4.0, 0.35 * k + 2.0)
    fig, ax = single_axes(ax, (side + 1.0, side))
    colours = matplotlib.colormaps[cmap].with_extremes(bad="lightgray")
    shown = ax.imshow(np.ma.masked_invalid(matrix), cmap=colours, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(np.arange(k), names, rotation=90, fontsize="small")
    ax.set_yticks(np.arange(k), names, fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate if annotate is not None else k <= 20:
        for i in range(k):
            for j in range(k):
                if np.isnan(matrix[i, j]):
                    if i == j:
                        ax.text(j, i, "n/a", ha="center", va="center", fontsize="x-small", color="dimgray")
                    continue
                r, g, b, _ = colours(float(matrix[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # perceived brightness of the cell
                ax.text(j, i, f"{100 * matrix[i, j]:.0f}", ha="center", va="center", fontsize="x-small",
                        color="white" if dark else "black")
    return fig, ax, shown
