"""Reading images faithfully and safely for SeMask (arXiv 2112.12782): files, PIL images, arrays and tensors.

Everything that enters semask as an image (inference inputs, dataset images) becomes 8-bit RGB by one set of
rules, or is refused with a message that says why:

- **8-bit PIL modes** ``1, L, P, RGB, RGBA, RGBX, RGBa, CMYK, YCbCr, LAB, HSV, LA, PA, La``: PIL's own
  conversion to RGB. Alpha is dropped (the colours are kept, not blended onto a background).
- **16-bit** (PIL ``I;16*``, ``uint16`` arrays) and 32-bit integer PIL ``I`` images with values in 0..65535:
  scaled to 0..255 as ``round(v / 257)`` (65535 -> 255). ``I`` images with values outside 0..65535 are refused.
- **Floating point** (PIL ``F``, float arrays and tensors of any precision): read in torchvision's convention,
  0..1, and scaled to ``round(255 * v)``. Values outside [0, 1] or NaN/infinity are refused: an image given as
  0..255 floats must be converted by the caller (``.astype(np.uint8)``), semask does not guess.
- **Other integer** arrays and tensors (``int32``, ``int64``, ...): values on the 0..255 scale are taken as
  they are; anything outside 0..255 is refused. ``bool`` gives 0 and 255 (as PIL's mode ``1``).
- **Layouts**: arrays ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``, ``(H, W, 4)``; tensors ``(H, W)`` or, in this
  order of preference, ``(3, H, W)`` (torchvision's), ``(H, W, 3)``, ``(C, H, W)`` and ``(H, W, C)`` with C = 1 or
  4 (so a ``(3, 5, 3)`` tensor is read as channels first, a ``(1, 1, 3)`` one as a single RGB pixel). Grey
  images are repeated to three channels, a fourth (alpha) channel is dropped. Tensors stay on their device.
- **Tensors**: dense ones of any strides (transposed, sliced, expanded, channels-last), with or without
  ``requires_grad`` (their values are read, detached). Tensors without values to read -- on the ``meta``
  device, sparse, quantised or nested -- are refused with a :class:`~semask.errors.UsageError` saying what to
  pass instead (`semask.device.check_tensor`).
- **Size**: an image needs at least one pixel. Files are refused *before decoding* when they declare more
  pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 by default; PIL itself only warns up to twice
  that), a guard against decompression bombs -- a few-kilobyte PNG can declare 20000 x 20000 pixels. For
  trusted large files raise it: ``PIL.Image.MAX_IMAGE_PIXELS = 400_000_000`` in Python, or the environment
  variable ``SEMASK_MAX_IMAGE_PIXELS`` for the ``semask`` command.

EXIF orientation is not applied: label maps have none, so the stored pixel grid is what they align with.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from semask.device import check_tensor
from semask.errors import ImageError, LimitError, NonFiniteError, UsageError, UsageTypeError

__all__ = [
    "ImageInput",
    "PIL_RGB_MODES",
    "max_image_pixels",
    "check_image_size",
    "open_image",
    "pil_to_rgb",
    "read_rgb",
    "rgb_tensor",
]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
# PIL modes whose own conversion to RGB is faithful (alpha dropped); the 16-bit, I and F modes have rules here.
PIL_RGB_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "La")
_CHANNELS = (1, 3, 4)


def max_image_pixels() -> Optional[int]:
    """The largest number of pixels an image file may declare: ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    return Image.MAX_IMAGE_PIXELS


def check_image_size(width: int, height: int, name: str, limit_pixels: bool = True) -> None:
    """Refuse an empty image, or (with `limit_pixels`) one above :func:`max_image_pixels`, saying how to raise it."""
    if width < 1 or height < 1:
        raise ImageError(f"{name} is {width}x{height} pixels (WxH); an image needs at least one pixel")
    limit = max_image_pixels() if limit_pixels else None
    if limit is not None and width * height > limit:
        raise LimitError(
            f"{name} declares {width}x{height} = {width * height:,} pixels, above the limit of {limit:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); if the file is trusted, raise "
            "the limit: PIL.Image.MAX_IMAGE_PIXELS = N in Python, or SEMASK_MAX_IMAGE_PIXELS=N for the semask "
            "command")


def open_image(path: Union[str, os.PathLike], name: Optional[str] = None) -> Image.Image:
    """Open and fully decode an image file, its size checked before decoding.

    Args:
        path: the file.
        name: how to call it in error messages (default ``image '<path>'``).

    Raises:
        FileNotFoundError, IsADirectoryError: the path is not a file.
        LimitError: the file declares more pixels than :func:`max_image_pixels`.
        ImageError: the file is not an image PIL can decode, or is truncated.
    """
    path = Path(path)
    name = name or f"image {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{name} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{name} is a folder; expected an image file")
    how = ("if the file is trusted, raise the limit: PIL.Image.MAX_IMAGE_PIXELS = N in Python, or "
           "SEMASK_MAX_IMAGE_PIXELS=N for the semask command")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below is stricter
            img = Image.open(path)
    except Image.DecompressionBombError as exc:  # PIL's own refusal, at twice its limit
        raise LimitError(f"{name} is too large to open safely ({exc}); the limit is {max_image_pixels():,} pixels "
                         f"(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); {how}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's errors for unknown / corrupt data
        raise ImageError(f"{name} cannot be read: {exc}") from exc
    try:
        check_image_size(img.width, img.height, name)  # before decoding a single pixel
        img.load()
    except (OSError, SyntaxError, EOFError) as exc:
        img.close()
        raise ImageError(f"{name} cannot be read: {exc} (unreadable or truncated file)") from exc
    except ValueError as exc:
        img.close()
        if isinstance(exc, (LimitError, ImageError)):
            raise
        raise ImageError(f"{name} cannot be read: {exc} (unreadable or truncated file)") from exc
    except BaseException:
        img.close()
        raise
    return img


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 as round(v / 257)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def pil_to_rgb(img: Image.Image, name: str = "image") -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB array from a PIL image of any supported mode (see the module's rules).

    Raises:
        ImageError: a mode without a faithful conversion, or values outside the mode's rule.
        LimitError: more pixels than :func:`max_image_pixels`.
    """
    check_image_size(img.width, img.height, name)
    mode = img.mode
    if mode in PIL_RGB_MODES:
        if mode == "La":  # premultiplied alpha: PIL converts it to RGB only through LA
            img = img.convert("LA")
        return np.array(img.convert("RGB") if img.mode != "RGB" else img)
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(img)
        if mode == "I" and grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ImageError(f"{name} has mode 'I' (32-bit integers) with values {grey.min()}..{grey.max()}; "
                             "semask reads integer images of up to 16 bits (0..65535); convert it yourself")
        return np.repeat(_scale_16bit(grey)[:, :, None], 3, axis=2)
    if mode == "F":
        return rgb_tensor(np.asarray(img), name).numpy()
    raise ImageError(f"{name} has mode {mode!r}, which semask cannot convert to RGB faithfully; supported modes: "
                     f"{', '.join(PIL_RGB_MODES)}, I;16, I (0..65535) and F (0..1)")


def read_rgb(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array (see :func:`open_image` and the module's rules)."""
    with open_image(path) as img:
        return pil_to_rgb(img, f"image {str(path)!r}")


def _to_uint8(values: torch.Tensor, kind: str, name: str) -> torch.Tensor:
    """Apply the value rules to a tensor whose values come from an array of dtype kind `kind`."""
    if kind == "uint8":
        return values
    if kind == "bool":
        return values.to(torch.uint8) * 255
    if kind == "uint16":
        return ((values.to(torch.int32) + 128) // 257).to(torch.uint8)
    if kind == "float":
        if not bool(torch.isfinite(values).all()):
            raise NonFiniteError(f"{name} holds NaN or infinite values; expected finite values in 0..1")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(f"{name} is floating point with values {low:g}..{high:g}; float images are read as "
                             "0..1 (torchvision's convention). For 0..255 values pass uint8 "
                             "(array.astype(np.uint8) / tensor.byte()), or divide by 255")
        return (values.to(torch.float64 if values.dtype == torch.float64 else torch.float32) * 255).round_().to(
            torch.uint8)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 255:
        raise ImageError(f"{name} has integer values {low}..{high}; expected 0..255 (uint8 scale), or pass uint16 "
                         "for 16-bit images")
    return values.to(torch.uint8)


def _kind(dtype: Union[np.dtype, torch.dtype]) -> str:
    """Which value rule applies: uint8, bool, uint16, float, int, complex or other."""
    if isinstance(dtype, torch.dtype):
        special = {torch.uint8: "uint8", torch.bool: "bool", torch.uint16: "uint16"}
        if dtype in special:
            return special[dtype]
        return "complex" if dtype.is_complex else ("float" if dtype.is_floating_point else "int")
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return "uint8" if dtype.itemsize == 1 else "uint16"
    return {"b": "bool", "f": "float", "i": "int", "u": "int", "c": "complex"}.get(dtype.kind, "other")


def rgb_tensor(image: ImageInput, name: Optional[str] = None) -> torch.Tensor:
    """Bring a path, PIL image, array or tensor to an ``(H, W, 3)`` uint8 RGB tensor by the module's rules.

    Args:
        image: a file path, a PIL image, an array (``(H, W)`` or ``(H, W, C)``) or a tensor (``(C, H, W)`` or
            ``(H, W, C)``, see the module's layout rule), C in 1, 3, 4.
        name: how to call the image in error messages.

    Returns:
        ``(H, W, 3)`` uint8 tensor, contiguous, on the input tensor's device (the CPU for other inputs; arrays
        that need no conversion share their memory).

    Raises:
        UsageTypeError: not an image type. UsageError: a shape that is not an image; a tensor without usable
            values (`meta` device, sparse, quantised, nested; see `semask.device.check_tensor`).
        ImageError, NonFiniteError, LimitError: values or sizes the rules refuse.
    """
    if isinstance(image, (str, os.PathLike)):
        return torch.from_numpy(read_rgb(image))
    if isinstance(image, Image.Image):
        return torch.from_numpy(pil_to_rgb(image, name or "PIL image"))
    if isinstance(image, np.ndarray):
        name = name or "image array"
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in _CHANNELS:
            raise UsageError(f"{name} has shape {image.shape}; expected (H, W) or (H, W, C) with C = 1, 3 or 4")
        kind = _kind(image.dtype)
        if kind in ("other", "complex"):
            raise UsageTypeError(f"{name} has dtype {image.dtype}; expected uint8, uint16, bool, an integer or a "
                                 "float type")
        if not image.flags.writeable:  # torch wants writable memory (e.g. np.asarray of a PIL image)
            image = image.copy()
        if not image.dtype.isnative or kind == "uint16" or image.dtype.kind == "u" and image.dtype.itemsize > 2:
            image = image.astype(np.float64 if kind == "float" else np.int64)  # types torch can hold
        values = torch.from_numpy(np.ascontiguousarray(image))  # H, W, C
    elif isinstance(image, torch.Tensor):
        name = name or "image tensor"
        check_tensor(image, name)  # before any value is read: meta, sparse, quantised and nested tensors
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            hint = " (one image at a time: pass batch[i])" if image.ndim == 4 else ""
            raise UsageError(f"{name} has shape {tuple(image.shape)}; expected (C, H, W) or (H, W, C) with "
                             f"C = 1, 3 or 4{hint}")
        first, last = image.shape[0], image.shape[2]
        if first == 3 or (last != 3 and first in _CHANNELS):
            image = image.permute(1, 2, 0)  # H, W, C
        elif last not in _CHANNELS:
            raise UsageError(f"{name} has shape {tuple(image.shape)}; expected (C, H, W) or (H, W, C) with "
                             "C = 1, 3 or 4")
        kind = _kind(image.dtype)
        if kind in ("other", "complex"):
            raise UsageTypeError(f"{name} has dtype {image.dtype}; expected uint8, bool, an integer or a float type")
        values = image.detach()
    else:
        raise UsageTypeError(f"expected an image as a path, PIL image, numpy array or tensor, got "
                             f"{type(image).__name__}")
    check_image_size(values.shape[1], values.shape[0], name, limit_pixels=False)  # already in memory
    rgb = _to_uint8(values, kind, name)  # H, W, C uint8
    if rgb.shape[2] == 1:
        rgb = rgb.expand(-1, -1, 3)
    elif rgb.shape[2] == 4:
        rgb = rgb[:, :, :3]
    return rgb.contiguous()
