"""Inference with the test protocol of SeMask FPN (arXiv 2112.12782; SPEC §6).

- whole image: rescale to fit the test scale keeping the aspect ratio ((2048, 512); (2048, 1024) for
  Cityscapes), run the model (logits come back at the rescaled size), softmax, resize the probabilities to
  the original size, argmax;
- sliding window: the same, but the rescaled image is covered by crop-size windows with a stride and the
  overlapping logits are averaged before the softmax;
- multi-scale + flip: ratios 0.5 .. 1.75 of the test scale, each also flipped horizontally; the softmax
  maps (flipped ones flipped back) are averaged at the original size.

The backbone runs once per scale: the flipped copy travels in the same batch as the original.

    predictor = Predictor(model, mode="whole")          # or "slide", or "msflip"
    labels = predictor("image.jpg")                       # (H, W) int64 at the original size
    labels, probs = predictor(image, return_probs=True)  # probs: (K, H, W) float32
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from semask.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TEST_RATIOS, rescale_size, resize_image

__all__ = ["MS_RATIOS", "ImageInput", "load_image", "normalize", "default_test_scale", "Predictor", "predict"]

MS_RATIOS = TEST_RATIOS  # the paper's multi-scale test ratios, 0.5 .. 1.75
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def load_image(image: ImageInput) -> np.ndarray:
    """Bring a path, PIL image, array or tensor to an (H, W, 3) uint8 RGB array.

    Arrays must be (H, W, 3) uint8 RGB; tensors (3, H, W) uint8 or (H, W, 3) uint8.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))
        except OSError as exc:
            raise ValueError(f"image {str(path)!r} cannot be read: {exc}") from exc
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.permute(1, 2, 0)  # H, W, 3
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got an array of shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image (0..255), got dtype {image.dtype}")
        return image
    raise TypeError(f"expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float RGB in 0..255, on any device -> normalised with the ImageNet mean/std.

    (`semask.data.transforms.normalize` does the same for single CPU images in the data pipeline.)
    """
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    return (image - mean) / std


def default_test_scale(model: nn.Module) -> tuple[int, int]:
    """(2048, 1024) for 19-class (Cityscapes) models, (2048, 512) otherwise, as in the released configs."""
    return (2048, 1024) if getattr(model, "num_classes", None) == 19 else (2048, 512)


class Predictor:
    """Segment images with the paper's test protocol.

    Args:
        model: a `SeMaskFPN` (put in eval mode here).
        mode: "whole", "slide" or "msflip" (whole-image inference at `MS_RATIOS` with flipping).
        scale: keep-ratio test scale (long, short); default `default_test_scale(model)`.
        ratios: scale ratios (default (1.0,), or `MS_RATIOS` for "msflip").
        flip: also run the horizontally flipped image (default True for "msflip").
        crop_size, stride: window and stride of the sliding-window mode.
        device: where to run (default: the model's device).
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for full precision.
        window_batch: windows per forward pass in the sliding-window mode.
    """

    def __init__(self, model: nn.Module, mode: str = "whole", scale: Optional[tuple[int, int]] = None,
                 ratios: Optional[Sequence[float]] = None, flip: Optional[bool] = None, crop_size: int = 512,
                 stride: int = 341, device: Union[str, torch.device, None] = None,
                 amp_dtype: Optional[torch.dtype] = None, window_batch: int = 4):
        if mode not in ("whole", "slide", "msflip"):
            raise ValueError(f"mode must be 'whole', 'slide' or 'msflip', got {mode!r}")
        if crop_size < 1 or stride < 1:
            raise ValueError(f"crop_size and stride must be positive, got {crop_size} and {stride}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.mode = mode
        self.scale = tuple(scale) if scale is not None else default_test_scale(model)
        self.ratios = tuple(ratios) if ratios is not None else (MS_RATIOS if mode == "msflip" else (1.0,))
        self.flip = flip if flip is not None else mode == "msflip"
        self.crop_size, self.stride, self.window_batch = crop_size, stride, window_batch
        self.amp_dtype = amp_dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, h, w) of a normalised batch, whole or by sliding windows."""
        with self._autocast():
            if self.mode != "slide":
                return self.model(batch).logits.float()
            return self._slide(batch)

    def _slide(self, batch: torch.Tensor) -> torch.Tensor:
        B, _, H, W = batch.shape
        c, s = self.crop_size, self.stride
        ys = [min(y, max(H - c, 0)) for y in range(0, max(H - c + s - 1, 0) // s * s + 1, s)]
        xs = [min(x, max(W - c, 0)) for x in range(0, max(W - c + s - 1, 0) // s * s + 1, s)]
        boxes = [(y, x) for y in ys for x in xs]
        h, w = min(c, H), min(c, W)
        total = None
        count = torch.zeros(1, 1, H, W, device=batch.device)
        for start in range(0, len(boxes), self.window_batch):
            chunk = boxes[start:start + self.window_batch]
            crops = torch.cat([batch[:, :, y:y + h, x:x + w] for y, x in chunk])  # n*B, 3, h, w
            logits = self.model(crops).logits.float().view(len(chunk), B, -1, h, w)
            if total is None:
                total = torch.zeros(B, logits.shape[2], H, W, device=batch.device)
            for (y, x), out in zip(chunk, logits):
                total[:, :, y:y + h, x:x + w] += out
                count[:, :, y:y + h, x:x + w] += 1
        return total / count

    @torch.no_grad()
    def probabilities(self, image: ImageInput) -> torch.Tensor:
        """Class probabilities (K, H, W) at the original image size, averaged over scales and flips."""
        array = load_image(image)
        H0, W0 = array.shape[:2]
        img = torch.from_numpy(np.ascontiguousarray(array)).to(self.device).permute(2, 0, 1)[None]  # 1, 3, H, W uint8
        probs = None
        for ratio in self.ratios:
            scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
            size = rescale_size(H0, W0, scale)
            # bilinear without antialiasing, rounded to uint8 like OpenCV's INTER_LINEAR in the reference
            batch = normalize((resize_image(img, size) if size != (H0, W0) else img).float())  # 1, 3, h, w
            if self.flip:
                batch = torch.cat([batch, batch.flip(-1)])  # one backbone pass for both
            p = self._logits(batch).softmax(dim=1)
            if self.flip:
                p = p[:1] + p[1:].flip(-1)
            p = F.interpolate(p, size=(H0, W0), mode="bilinear", align_corners=False)[0]
            probs = p if probs is None else probs + p
        return probs / (len(self.ratios) * (2 if self.flip else 1))

    def __call__(self, image: ImageInput, return_probs: bool = False
                 ) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Label map (H, W) int64 at the original size; with `return_probs`, also (K, H, W) float32 probabilities."""
        probs = self.probabilities(image)
        labels = probs.argmax(0).cpu().numpy()
        return (labels, probs.cpu().numpy()) if return_probs else labels


def predict(model: nn.Module, image: ImageInput, mode: str = "whole", return_probs: bool = False, **kwargs
            ) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """One-call inference: `Predictor(model, mode, **kwargs)(image, return_probs)`."""
    return Predictor(model, mode=mode, **kwargs)(image, return_probs=return_probs)
