"""Where a SeMask stage's feature grid lies on the image (arXiv 2112.12782): the one grid-to-pixels mapping.

A stage's feature grid covers the model's (h, w) input at a stride: the patch embedding and every patch merging
pad their input up to a multiple of the stride (4, 8, 16, 32), so feature cell (r, c) of stage i covers input
pixels [r * s_i, (r + 1) * s_i) x [c * s_i, (c + 1) * s_i), the last row and column only partly.
`stage_to_pixels` maps a grid that way (cell to stride block, padding cropped, input resized to the original
image), on the grid's own device; `semask.viz.stages.stage_to_image` is its numpy form for the viewers and
`semask.engine.analysis` scores the stage priors and assigns tokens their classes through it.
"""
from __future__ import annotations

import numbers
from typing import Union

import torch
import torch.nn.functional as F

from semask.errors import UsageError

__all__ = ["Stride", "stride_pair", "grid_stride", "stage_to_pixels"]

Stride = Union[int, tuple[int, int]]  # input pixels per feature cell: one for both axes, or (rows, columns)
Size = tuple[int, int]


def stride_pair(stride: Stride) -> tuple[int, int]:
    """(rows, columns) of a stride given as one int or a pair."""
    return (stride, stride) if isinstance(stride, numbers.Integral) else (int(stride[0]), int(stride[1]))


def grid_stride(grid: Size, input_size: Size) -> tuple[int, int]:
    """The stride of a stage whose (h_i, w_i) grid covers an (h, w) input: per axis, the smallest power of two s
    with ceil(h / s) = h_i, the stride of every SeMask stage (a smaller one would give more cells).

    Raises:
        UsageError: no power of two tiles the input with that many cells (the grid is not of this input).
    """
    strides = []
    for cells, pixels in zip(grid, input_size):
        stride = 1
        while -(-pixels // stride) > cells:
            stride *= 2
        if -(-pixels // stride) != cells:
            raise UsageError(f"a stage grid of {grid[0]}x{grid[1]} cells does not cover a {input_size[0]}x"
                             f"{input_size[1]} input at any stride; pass input_size=(h, w), the size of the input "
                             "the model saw")
        strides.append(stride)
    return strides[0], strides[1]


def stage_to_pixels(cells: torch.Tensor, stride: Stride, input_size: Size, image_size: Size,
                    smooth: bool) -> torch.Tensor:
    """A stage's (C, h_i, w_i) map on the original image's pixel grid: (C, H, W) float32, on `cells`' device.

    Feature cell (r, c) covers input pixels [r*stride, (r+1)*stride) of the (h, w) input (the last row and
    column only partly, the input having been padded up to the stride); that input is then resized to the
    original (H, W).

    Args:
        cells: (C, h_i, w_i) values per feature cell (class scores, labels, attention weights, cell ids).
        stride: input pixels per cell (`grid_stride` when not known from the model).
        input_size: (h, w) of the input the model saw.
        image_size: (H, W) of the original image.
        smooth: bilinear, align_corners=False (scores), else nearest (labels, attention cells, cell ids).

    Returns:
        (C, H, W) float32.
    """
    sy, sx = stride_pair(stride)
    h_i, w_i = cells.shape[-2:]
    if h_i * sy < input_size[0] or w_i * sx < input_size[1]:
        raise UsageError(f"a {h_i}x{w_i} grid at stride {(sy, sx)} does not cover a {input_size[0]}x{input_size[1]} "
                         "input")
    mode = dict(mode="bilinear", align_corners=False) if smooth else dict(mode="nearest")
    grid = F.interpolate(cells[None].float(), size=(h_i * sy, w_i * sx), **mode)[0]  # C, h_i*s, w_i*s
    grid = grid[:, : input_size[0], : input_size[1]]  # C, h, w
    if tuple(input_size) != tuple(image_size):
        grid = F.interpolate(grid[None], size=tuple(image_size), **mode)[0]  # C, H, W
    return grid
