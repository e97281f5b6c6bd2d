"""Photometric distortion of the SeMask training pipeline (SeMask, arXiv 2112.12782, configs of §5).

The reference pipeline (mmsegmentation's ``PhotoMetricDistortion``) changes brightness, contrast, saturation
and hue of the already cropped and flipped image, each with probability 0.5:

1. brightness: add ``beta ~ U(-32, 32)``;
2. a coin decides whether contrast comes now (``mode == 1``) or last (``mode == 0``);
   contrast: multiply by ``alpha ~ U(0.5, 1.5)``;
3. saturation: in 8-bit HSV, multiply S by ``alpha ~ U(0.5, 1.5)``;
4. hue: in 8-bit HSV (H in 0..179), add an integer ``delta`` drawn from -18..17 (numpy's ``randint(-18, 18)``,
   whose upper end is exclusive), modulo 180;
5. contrast here when it was not applied in step 2.

Every step clips to 0..255 and truncates to integers, as OpenCV-based uint8 code does. The image is kept as a
float32 ``(3, H, W)`` RGB tensor whose values are integers in 0..255, so no step converts dtypes. The HSV
conversions follow OpenCV's 8-bit ``RGB2HSV``/``HSV2RGB`` (rounded S and H, H in half degrees).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PhotoParams",
    "PhotoMetricDistortion",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "uniform",
    "randint",
    "coin",
]


# --------------------------------------------------------------------------------------------- random draws
def uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    """A float drawn uniformly from ``[low, high)`` with ``generator`` (torch's global RNG when None)."""
    u = torch.rand((), dtype=torch.float64, generator=generator).item()
    return low + (high - low) * u


def randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """An integer drawn uniformly from ``low .. high - 1`` (numpy's convention: ``high`` is exclusive)."""
    return int(torch.randint(low, high, (), generator=generator).item())


def coin(generator: torch.Generator | None, prob: float = 0.5) -> bool:
    """True with probability ``prob``."""
    return bool(torch.rand((), dtype=torch.float64, generator=generator).item() < prob)


# --------------------------------------------------------------------------------------------- 8-bit HSV
# Branches are written as products with 0/1 masks: on one CPU core this is several times faster than
# torch.where, and the HSV steps dominate the cost of the whole training pipeline.
def rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV's 8-bit RGB -> HSV on integer-valued floats.

    Args:
        image: ``(3, H, W)`` float tensor, RGB, integer values in 0..255.

    Returns:
        ``(h, s, v)``, each ``(H, W)`` float tensors with integer values: h in 0..179 (half degrees),
        s and v in 0..255.
    """
    r, g, b = image.unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    s = (diff * 255.0).div_(v.clamp(min=1.0)).add_(0.5).floor_()  # round(255 * diff / v); 0 where v == 0
    # The dominant channel picks the hue formula; ties go to red, then green (as OpenCV).
    is_r = (v == r).float()
    is_g = (v == g).float().mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    num = (g - b).mul_(is_r) + (b - r + 2.0 * diff).mul_(is_g) + (r - g + 4.0 * diff).mul_(is_b)
    h = num.mul_(30.0).div_(diff.clamp(min=1.0)).add_(0.5).floor_()  # 0 where diff == 0 (num is 0 there)
    h += (h < 0).float().mul_(180.0)
    return h, s, v


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit HSV -> RGB (rounded to the nearest integer, ties to even).

    Args:
        h: ``(H, W)`` hue in half degrees (0..179), float.
        s: ``(H, W)`` saturation 0..255, float.
        v: ``(H, W)`` value 0..255, float.

    Returns:
        ``(3, H, W)`` float tensor, RGB, integer values in 0..255.
    """
    sector = h * (6.0 / 180.0)  # position on the colour wheel in sixths of a turn, 0 <= sector < 6
    chroma = s.div(255.0).mul_(v)
    out = torch.empty((3,) + tuple(h.shape), dtype=h.dtype)  # 3, H, W
    for channel, offset in enumerate((5.0, 3.0, 1.0)):  # R, G, B
        k = sector + offset
        k -= (k >= 6.0).float().mul_(6.0)  # (sector + offset) mod 6
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(v, chroma * ramp, out=out[channel])
    return out.round_().clamp_(0.0, 255.0)


# --------------------------------------------------------------------------------------------- distortion
@dataclass(frozen=True)
class PhotoParams:
    """The random decisions of one photometric distortion; ``None`` means the step is skipped."""

    brightness: float | None  # added to every channel
    contrast: float | None  # multiplies every channel
    contrast_first: bool  # mmseg's mode == 1: contrast right after brightness, else after hue
    saturation: float | None  # multiplies S in HSV
    hue: int | None  # added to H (half degrees) modulo 180


def _clip_trunc(x: torch.Tensor) -> torch.Tensor:
    """Clip to 0..255 and truncate to integers, in place (what ``np.clip(...).astype(np.uint8)`` does)."""
    return x.clamp_(0.0, 255.0).floor_()


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """Random brightness, contrast, saturation and hue with mmsegmentation's probabilities and order.

    Call it on a ``(3, H, W)`` float32 RGB tensor with integer values in 0..255; it returns a tensor of the same
    kind. ``sample`` draws the decisions, ``apply`` applies given decisions (both are public for tests).
    """

    brightness_delta: int = 32  # beta ~ U(-delta, delta)
    contrast_range: tuple[float, float] = (0.5, 1.5)  # alpha ~ U(low, high)
    saturation_range: tuple[float, float] = (0.5, 1.5)  # alpha ~ U(low, high) on S
    hue_delta: int = 18  # integer shift drawn from -delta .. delta - 1 (half degrees)
    prob: float = 0.5  # probability of each of the four steps

    def sample(self, generator: torch.Generator | None = None) -> PhotoParams:
        """Draw the decisions for one image."""
        brightness = (uniform(generator, -self.brightness_delta, self.brightness_delta)
                      if coin(generator, self.prob) else None)
        contrast_first = coin(generator, 0.5)
        contrast = uniform(generator, *self.contrast_range) if coin(generator, self.prob) else None
        saturation = uniform(generator, *self.saturation_range) if coin(generator, self.prob) else None
        hue = randint(generator, -self.hue_delta, self.hue_delta) if coin(generator, self.prob) else None
        return PhotoParams(brightness, contrast, contrast_first, saturation, hue)

    @staticmethod
    def apply(image: torch.Tensor, params: PhotoParams) -> torch.Tensor:
        """Apply ``params`` to ``image`` ((3, H, W) float, integer values 0..255); returns a new tensor."""
        img = image.clone()
        if params.brightness is not None:
            img = _clip_trunc(img.add_(params.brightness))
        if params.contrast is not None and params.contrast_first:
            img = _clip_trunc(img.mul_(params.contrast))
        if params.saturation is not None:
            h, s, v = rgb_to_hsv(img)
            img = hsv_to_rgb(h, _clip_trunc(s.mul_(params.saturation)), v)
        if params.hue is not None:
            h, s, v = rgb_to_hsv(img)
            img = hsv_to_rgb(torch.remainder(h + params.hue, 180.0), s, v)
        if params.contrast is not None and not params.contrast_first:
            img = _clip_trunc(img.mul_(params.contrast))
        return img

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Distort ``image`` ((3, H, W) float, integer values 0..255) with freshly drawn decisions."""
        return self.apply(image, self.sample(generator))
