"""Checks of what semask's viewers (arXiv 2112.12782) are given: images, class-index maps, palettes, classes.

Each check raises where the input enters, a `UsageError` / `UsageTypeError` whose message says what was expected
and what arrived. `names_caller` wraps a public entry point so that those messages start with its name
(``"plot_samples: label 1 has size ..."``), once, however deep the check that raised.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch

from semask.data.classes import default_palette
from semask.device import check_tensor
from semask.engine.inference import ImageInput, load_image
from semask.errors import SemaskError, UsageError

__all__ = [
    "ArrayLike",
    "Palette",
    "names_caller",
    "to_numpy",
    "image_array",
    "class_index_map",
    "palette_array",
    "classes_present",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
Palette = Sequence[Sequence[int]]
Function = TypeVar("Function", bound=Callable[..., Any])

_NAMED = re.compile(r"[A-Za-z_][\w.]*: ")  # a message that already starts with the name of its caller


def names_caller(name: str) -> Callable[[Function], Function]:
    """Decorate a public entry point: semask's errors raised inside it start with ``"{name}: "``.

    Only `SemaskError`s (usage errors, unreadable images), `IndexError`s and `FileNotFoundError`s are named; a
    message that already starts with a name (an inner entry point's, e.g. ``"results_table: ..."``) is left as
    it is. The exception keeps its type and traceback.
    """
    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except (SemaskError, IndexError, FileNotFoundError) as exc:
                if exc.args and isinstance(exc.args[0], str) and not _NAMED.match(exc.args[0]):
                    exc.args = (f"{name}: {exc.args[0]}",) + exc.args[1:]
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def to_numpy(x: ArrayLike, name: str = "tensor") -> np.ndarray:
    """A numpy array of an array or a tensor (detached, on the CPU); a tensor without values to read (``meta``
    device, sparse, quantised, nested) is a `UsageError` naming it as `name` (`semask.device.check_tensor`)."""
    if isinstance(x, torch.Tensor):
        check_tensor(x, name)
        return x.detach().cpu().numpy()
    return np.asarray(x)


def image_array(image: ImageInput) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from an array, tensor, PIL image or path (`semask.engine.inference.load_image`).

    A float array or tensor is refused: the viewers draw images, not the normalised inputs of the model.
    """
    if isinstance(image, torch.Tensor):
        floating = image.is_floating_point()
    else:
        floating = isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)
    if floating:
        raise UsageError(f"expected an (H, W, 3) uint8 RGB image, got a {image.dtype} array of shape "
                         f"{tuple(image.shape)}; bring a normalised (3, H, W) image back with "
                         "semask.viz.denormalize()")
    return load_image(image)


def class_index_map(label: ArrayLike, name: str, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """An (H, W) int64 map of class indices (a ground truth or a prediction), checked against the image size.

    Args:
        label: (H, W) integer or bool array or tensor.
        name: what the map is, for messages (``"the label"``, ``"prediction 'whole'"``).
        size: the (H, W) it must have, or None.
    """
    array = to_numpy(label, name)
    if array.ndim != 2:
        hint = " (class scores? pass their argmax over the class axis)" if array.ndim == 3 else ""
        raise UsageError(f"expected {name} as an (H, W) map of class indices, got shape {array.shape}{hint}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise UsageError(f"expected integer class indices in {name}, got dtype {array.dtype}")
    if size is not None and array.shape != tuple(size):
        raise UsageError(f"{name} has size {array.shape} but the image is {tuple(size)}; "
                         "both must be at the same (original) size")
    return array.astype(np.int64)


def palette_array(palette: Optional[Palette], num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours of a palette of RGB triples; `default_palette(num_classes)` when None."""
    if palette is None:
        return np.asarray(default_palette(num_classes), dtype=np.uint8)
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"expected a palette of RGB triples, shape (K, 3), got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise UsageError(f"palette values must lie in 0..255, got {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def classes_present(labels: Sequence[np.ndarray], ignore_index: int, palette: Optional[Palette],
                    class_names: Optional[Sequence[str]]) -> tuple[list[int], np.ndarray]:
    """Sorted classes present in any of the label maps, and the (K, 3) palette (a default one when None).

    Raises:
        UsageError: a negative class, or a present class without a colour or a name.
    """
    present = sorted({int(k) for lab in labels for k in np.unique(lab) if k != ignore_index})
    if present and present[0] < 0:
        raise UsageError(f"negative class indices {[k for k in present if k < 0][:10]} in the label maps")
    colours = palette_array(palette, max(present, default=-1) + 1)
    if present and present[-1] >= len(colours):
        bad = [k for k in present if k >= len(colours)]
        raise UsageError(f"class indices {bad[:10]} have no colour in a {len(colours)}-colour palette")
    if class_names is not None and present and present[-1] >= len(class_names):
        raise UsageError(f"class index {present[-1]} has no name ({len(class_names)} class names given)")
    return present, colours
