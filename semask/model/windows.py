"""Window helpers shared by the Swin blocks and the SeMask semantic layers (arXiv 2112.12782)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from semask.model.util import is_exporting

__all__ = ["window_partition", "window_reverse", "pad_to_multiple"]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split a feature map into non-overlapping windows.

    Args:
        x: (B, H, W, C) with H and W multiples of `window_size`.
        window_size: side w of the square windows.

    Returns:
        (B * H/w * W/w, w*w, C), windows in row-major order per image.
    """
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)  # B, nH, w, nW, w, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)  # B*nH*nW, w*w, C


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`.

    Args:
        windows: (B * H/w * W/w, w*w, C).
        window_size: w.
        height, width: the (padded) feature size H, W.

    Returns:
        (B, H, W, C).
    """
    nh, nw = height // window_size, width // window_size
    C = windows.shape[-1]
    x = windows.view(-1, nh, nw, window_size, window_size, C)  # B, nH, nW, w, w, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)  # B, H, W, C


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map on the bottom/right so that H and W are multiples of `multiple`.

    The padded size is written as ``ceil(H / multiple) * multiple`` and, while `torch.export` traces the model
    (ONNX export with dynamic sizes), the pad is applied even when it is zero: the traced graph then holds
    for every input size instead of the one it was traced at (see `semask.apps.export`).
    """
    _, H, W, _ = x.shape
    pad_h = (H + multiple - 1) // multiple * multiple - H
    pad_w = (W + multiple - 1) // multiple * multiple - W
    if is_exporting() or pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x
