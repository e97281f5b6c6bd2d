"""The matplotlib plumbing of semask's plots (arXiv 2112.12782): the axes to draw into and one image panel.

pyplot is imported only when a new figure is made, so importing semask selects no matplotlib backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from semask.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PANEL_INCHES", "figure_axes", "single_axes", "show_picture"]

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
