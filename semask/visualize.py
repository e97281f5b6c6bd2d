"""Drawing label maps and overlays for SeMask results (arXiv 2112.12782)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from semask.utils import atomic_path

__all__ = ["default_palette", "colorize", "overlay", "save_label_map"]


def default_palette(num_classes: int, seed: int = 0) -> list[list[int]]:
    """A deterministic random palette (one RGB triple per class) for models without their own."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_classes, 3)).tolist()


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255,
             ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Colour a label map.

    Args:
        label: (H, W) integer class indices.
        palette: (K, 3) RGB colours.
        ignore_index: label drawn in `ignore_color`.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {label.shape}")
    lut = np.zeros((max(256, int(label.max(initial=0)) + 1), 3), dtype=np.uint8)
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[: len(pal)] = pal
    lut[ignore_index] = ignore_color
    valid = (label < len(pal)) | (label == ignore_index)
    if not valid.all():
        raise ValueError(f"label values {np.unique(label[~valid])[:10].tolist()} have no colour in a "
                         f"{len(pal)}-colour palette")
    return lut[label]


def overlay(image: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """Blend the coloured label map over an (H, W, 3) uint8 image; ignored pixels keep the image."""
    if image.shape[:2] != np.asarray(label).shape:
        raise ValueError(f"image {image.shape[:2]} and label {np.asarray(label).shape} differ in size")
    color = colorize(label, palette, ignore_index).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + color * alpha
    keep = np.asarray(label) == ignore_index
    out[keep] = image[keep]
    return out.round().astype(np.uint8)


def save_label_map(label: np.ndarray, path: Union[str, os.PathLike],
                   palette: Optional[Sequence[Sequence[int]]] = None) -> Path:
    """Write a label map as PNG atomically: class indices (mode L), or indexed colour (mode P) with a palette."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255 to be stored as PNG, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8))  # mode L; putpalette turns it into mode P
    if palette is not None:
        flat = np.zeros((256, 3), dtype=np.uint8)
        pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        flat[: len(pal)] = pal
        img.putpalette(flat.flatten().tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
