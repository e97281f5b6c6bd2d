"""Training and test pipelines of SeMask (arXiv 2112.12782), with the reference semantics of docs/recipes.md §5-6.

Training (mmsegmentation's order): keep-ratio rescale to ``scale x ratio`` -> random crop (``cat_max_ratio``
with up to 10 retries) -> horizontal flip (p 0.5) -> photometric distortion -> normalise -> pad to the crop
size (image 0, label 255). Test: keep-ratio rescale to the test scale -> normalise; multi-scale and flip are
left to the inference module, which uses :data:`TEST_RATIOS`, :func:`rescale_size` and :func:`resize_image`.

Images are resized bilinearly without antialiasing (``align_corners=False``, as OpenCV's ``INTER_LINEAR``)
and rounded back to uint8; labels with legacy nearest neighbour (``floor(dst * in / out)``, as OpenCV's
``INTER_NEAREST`` and torch's ``mode="nearest"``). For speed the training pipeline chooses the crop first and
resizes only the pixels inside it, which gives the same pixels as resizing the whole image and cropping.

Randomness comes from a ``torch.Generator`` passed to the call, or from torch's global generator when none is
given; DataLoader workers seed that global generator per worker, so runs are reproducible with a seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from semask.bounds import SettingError, check_pixels, check_settings, setting
from semask.data.datasets import IGNORE_INDEX
from semask.data.photometric import PhotoMetricDistortion, coin, randint, uniform
from semask.errors import UnknownNameError, UsageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TRAIN_RATIOS",
    "TEST_RATIOS",
    "rescale_size",
    "resize_image",
    "resize_label",
    "nearest_indices",
    "normalize",
    "pad_to",
    "multi_scale_sizes",
    "check_scale_pixels",
    "TrainPipelineConfig",
    "TestPipelineConfig",
    "TrainTransform",
    "TestTransform",
    "TRAIN_PRESETS",
    "TEST_PRESETS",
    "train_preset",
    "get_test_preset",
]

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)  # RGB, 0..255 scale
TRAIN_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # ADE20K / COCO-Stuff ratio set
TEST_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # multi-scale test ratios
CAT_MAX_RETRIES = 10  # mmseg re-draws a rejected crop at most this many times


# --------------------------------------------------------------------------------------------- geometry
def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The keep-ratio size that fits ``(height, width)`` inside ``scale`` (mmcv's ``imrescale``).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        scale: ``(long_max, short_max)``; the order of the two numbers does not matter.

    Returns:
        ``(new_h, new_w)`` with ``s = min(long_max / long_side, short_max / short_side)`` and
        ``new = max(int(x * s + 0.5), 1)``: a very thin image (1 x 5000) keeps one row instead of none.
    """
    if height <= 0 or width <= 0:
        raise UsageError(f"rescale_size: expected a positive image size, got height={height}, width={width}")
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of legacy nearest-neighbour resizing: ``min(floor(dst * (in / out)), in - 1)``.

    Computed in float32 like ``torch.nn.functional.interpolate(mode="nearest")``, so both agree exactly.

    Returns:
        ``(out_size,)`` int64 array of indices into the input axis.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    return np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)


def _bilinear_coords(start: int, stop: int, in_size: int, out_size: int) -> tuple[torch.Tensor, ...]:
    """Left/right source indices and right weight of output pixels ``start .. stop - 1`` (align_corners=False)."""
    dst = torch.arange(start, stop, dtype=torch.float32)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp_(min=0.0)
    lo = src.floor().long().clamp_(max=in_size - 1)
    hi = (lo + 1).clamp_(max=in_size - 1)
    return lo, hi, src - lo


def _resize_window(image: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int],
                   flip: bool) -> torch.Tensor:
    """Bilinearly resize ``image`` to ``size`` but compute only the pixels inside ``box``.

    Same arithmetic as ``F.interpolate(mode="bilinear", align_corners=False)`` followed by a crop, done
    separably (rows, then columns) on the source rows and columns that the window needs.

    Args:
        image: ``(H, W, 3)`` uint8 array.
        size: ``(out_h, out_w)`` of the whole resized image.
        box: ``(y0, y1, x0, x1)`` window of the resized image to compute.
        flip: mirror the window horizontally.

    Returns:
        ``(3, y1 - y0, x1 - x0)`` float32 tensor with integer values in 0..255 (rounded like uint8 output).
    """
    y0, y1, x0, x1 = box
    lo, hi, wy = _bilinear_coords(y0, y1, image.shape[0], size[0])
    top = torch.from_numpy(np.take(image, lo.numpy(), axis=0)).float()  # h, W, 3
    bottom = torch.from_numpy(np.take(image, hi.numpy(), axis=0)).float()  # h, W, 3
    rows = top.add_(bottom.sub_(top).mul_(wy.view(-1, 1, 1)))  # h, W, 3
    rows_np = rows.permute(2, 0, 1).contiguous().numpy()  # 3, h, W (numpy's take is the fastest column gather)
    lo, hi, wx = _bilinear_coords(x0, x1, image.shape[1], size[1])
    if flip:
        lo, hi, wx = lo.flip(0), hi.flip(0), wx.flip(0)
    left = torch.from_numpy(np.take(rows_np, lo.numpy(), axis=2))  # 3, h, w
    right = torch.from_numpy(np.take(rows_np, hi.numpy(), axis=2))  # 3, h, w
    return left.add_(right.sub_(left).mul_(wx.view(1, 1, -1))).round_().clamp_(0.0, 255.0)  # 3, h, w


def resize_image(image: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray | torch.Tensor:
    """Resize bilinearly without antialiasing (``align_corners=False``), as OpenCV's ``INTER_LINEAR``.

    Args:
        image: ``(H, W, C)`` uint8 numpy array, or a tensor ``(C, H, W)`` / ``(B, C, H, W)`` of any float or
            uint8 dtype.
        size: ``(out_h, out_w)``.

    Returns:
        The resized image of the same kind: a uint8 ``(out_h, out_w, C)`` array for an array input, a tensor of
        the input's layout and dtype otherwise (uint8 results are rounded to the nearest integer).
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise UsageError(f"resize_image: expected an (H, W, C) array, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # C, H, W
        return resize_image(tensor, size).permute(1, 2, 0).numpy()  # type: ignore[union-attr]  # h, w, C
    if image.ndim not in (3, 4):
        raise UsageError(f"resize_image: expected a (C, H, W) or (B, C, H, W) tensor, got {tuple(image.shape)}")
    batch = image if image.ndim == 4 else image.unsqueeze(0)  # B, C, H, W
    work = batch if batch.is_floating_point() else batch.float()
    out = F.interpolate(work, size=tuple(size), mode="bilinear", align_corners=False)
    if not batch.is_floating_point():
        info = torch.iinfo(batch.dtype)
        out = out.round_().clamp_(info.min, info.max).to(batch.dtype)
    return out if image.ndim == 4 else out.squeeze(0)


def resize_label(label: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray | torch.Tensor:
    """Resize a label map with legacy nearest neighbour (see :func:`nearest_indices`).

    Args:
        label: ``(..., H, W)`` integer array or tensor.
        size: ``(out_h, out_w)``.

    Returns:
        ``(..., out_h, out_w)`` of the same kind and dtype.
    """
    rows = nearest_indices(label.shape[-2], size[0])
    cols = nearest_indices(label.shape[-1], size[1])
    if isinstance(label, torch.Tensor):
        rows_t, cols_t = torch.from_numpy(rows).to(label.device), torch.from_numpy(cols).to(label.device)
        return label.index_select(-2, rows_t).index_select(-1, cols_t)
    return label[..., rows[:, None], cols[None, :]]


def normalize(image: np.ndarray | torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, channels_last: bool = True) -> torch.Tensor:
    """Normalise RGB given on the 0..255 scale: ``(image - mean) / std`` per channel.

    The one normalisation of semask: the data pipeline's (one image on the CPU) and inference's (a batch on the
    model's device; `semask.engine.inference.normalize` is this function).

    Args:
        image: one image, ``(H, W, 3)`` (``channels_last``) or ``(3, H, W)``, uint8 or float, array or tensor; or
            a batch, a ``(B, 3, H, W)`` uint8 or float tensor on any device.
        mean: per-channel mean, RGB.
        std: per-channel standard deviation, RGB.
        channels_last: whether one image is ``(H, W, 3)`` (a batch is always ``(B, 3, H, W)``).

    Returns:
        One image: a contiguous ``(3, H, W)`` float32 tensor. A batch: ``(B, 3, H, W)`` on its device, in its
        memory layout, of its dtype (float32 for uint8).

    Raises:
        UsageError: not one RGB image or a batch of them in the layout above.
    """
    tensor = torch.as_tensor(image)
    if channels_last and tensor.ndim == 3:
        tensor = tensor.permute(2, 0, 1)  # 3, H, W
    if tensor.ndim not in (3, 4) or tensor.shape[-3] != len(mean):
        layout = "(B, 3, H, W) batch or a " + ("(H, W, 3)" if channels_last else "(3, H, W)")
        raise UsageError(f"normalize: expected a {layout} image, got shape {tuple(torch.as_tensor(image).shape)}")
    batch = tensor.ndim == 4
    work = tensor.dtype if tensor.is_floating_point() else torch.float32  # precision of the subtraction
    dtype = work if batch else torch.float32  # of the result
    shape = (1, -1, 1, 1) if batch else (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=work, device=tensor.device).view(shape)
    std_t = torch.tensor(std, dtype=dtype, device=tensor.device).view(shape)
    if batch:  # a batch keeps its layout: channels-last images give channels-last logits (see inference)
        return (tensor.to(dtype) - mean_t).div_(std_t)
    out = torch.empty(tuple(tensor.shape), dtype=dtype, device=tensor.device)  # contiguous whatever the input
    for c in range(out.shape[0]):  # per channel: a broadcast read of an (H, W, 3) view is several times slower
        torch.sub(tensor[c], mean_t[c, 0, 0], out=out[c])
        out[c].div_(std_t[c, 0, 0])
    return out


def pad_to(tensor: torch.Tensor, size: tuple[int, int], value: float) -> torch.Tensor:
    """Pad the last two dimensions on the bottom and right up to ``size`` with ``value``.

    Args:
        tensor: ``(..., H, W)`` tensor with ``H <= size[0]`` and ``W <= size[1]``.
        size: ``(out_h, out_w)``.
        value: fill value (0 for normalised images, 255 for labels).

    Returns:
        ``(..., out_h, out_w)`` tensor (the input itself when no padding is needed).
    """
    pad_h, pad_w = size[0] - tensor.shape[-2], size[1] - tensor.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise UsageError(f"pad_to: tensor of size {tuple(tensor.shape[-2:])} is larger than the target {size}")
    if pad_h == 0 and pad_w == 0:
        return tensor
    return F.pad(tensor, (0, pad_w, 0, pad_h), value=value)


# --------------------------------------------------------------------------------------------- configuration
def _as_tuples(config: Any, names: Sequence[str]) -> None:
    """Lists (from JSON or the command line) -> tuples, so that a frozen config stays hashable and comparable."""
    for name in names:
        if isinstance(getattr(config, name), list):
            object.__setattr__(config, name, tuple(getattr(config, name)))


def check_scale_pixels(owner: str, scale: tuple[int, int], ratios: Sequence[float],
                       ratio_field: str = "ratios") -> None:
    """Refuse a keep-ratio scale whose largest rescale (``scale x max(ratios)``) makes images above the pixel limit.

    A keep-ratio fit into ``(long, short)`` never has more than ``long x short`` pixels, whatever the image.
    """
    check_pixels(f"{owner}scale {tuple(scale)}", max(scale), min(scale), field="scale")
    top = max(ratios, default=1.0)
    if top > 1:  # the scale alone fits: the ratio is to blame
        check_pixels(f"{owner}scale {tuple(scale)} x the largest of {ratio_field} ({top:g})", max(scale) * top,
                     min(scale) * top, field=ratio_field)


@dataclass(frozen=True)
class TrainPipelineConfig:
    """The training augmentation of one published recipe (docs/recipes.md §5).

    Every number is checked where the config is made (`semask.bounds`): ranges beside the fields, and a crop or
    a rescale above the pixel limit images are read under is refused before anything is allocated.
    """

    crop_size: tuple[int, int] = setting((512, 512), ge=1)  # (h, w) of the random crop; smaller images are padded
    scale: tuple[int, int] = setting((2048, 512), ge=1)  # keep-ratio base scale (long_max, short_max) before the ratio
    ratios: tuple[float, ...] | None = setting(TRAIN_RATIOS, gt=0)  # ratio drawn from this set (ADE20K, COCO-Stuff) ...
    ratio_range: tuple[float, float] | None = setting(None, gt=0)  # ... or uniformly from this range (Cityscapes)
    cat_max_ratio: float = setting(1.0, gt=0, le=1)  # < 1: re-draw crops where one class covers this share or more
    flip_prob: float = setting(0.5, ge=0, le=1)  # probability of a horizontal flip
    photometric: bool = True  # brightness / contrast / saturation / hue distortion
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN)  # normalisation mean, RGB, 0..255
    std: tuple[float, float, float] = setting(IMAGENET_STD, gt=0)  # normalisation std, RGB, 0..255
    ignore_index: int = setting(IGNORE_INDEX, ge=0)  # label of unlabelled and padded pixels (the loss's and metric's)

    def __post_init__(self) -> None:
        _as_tuples(self, ("crop_size", "scale", "ratios", "ratio_range", "mean", "std"))
        if self.ratios is not None and self.ratio_range is not None:
            raise UsageError("TrainPipelineConfig: give either `ratios` (a set) or `ratio_range`, not both; got "
                             f"ratios={self.ratios}, ratio_range={self.ratio_range}")
        check_settings(self)
        if self.ratio_range is not None and not self.ratio_range[0] <= self.ratio_range[1]:
            raise SettingError(f"TrainPipelineConfig: `ratio_range` must be (low, high) with 0 < low <= high, "
                               f"got {self.ratio_range}", "ratio_range")
        # the crop is padded to its full size (float32 image + int64 label); the rescale's index arrays follow it
        check_pixels(f"TrainPipelineConfig: crop_size {self.crop_size}", *self.crop_size, bytes_per_pixel=20,
                     field="crop_size")
        if self.ratio_range is not None:
            check_scale_pixels("TrainPipelineConfig: ", self.scale, self.ratio_range, "ratio_range")
        else:
            check_scale_pixels("TrainPipelineConfig: ", self.scale, self.ratios or (1.0,))


@dataclass(frozen=True)
class TestPipelineConfig:
    """The test-time rescale of one published recipe (docs/recipes.md §6), checked like `TrainPipelineConfig`."""

    # keep-ratio test scale (long_max, short_max)
    scale: tuple[int, int] = setting((2048, 512), ge=1, what="two positive ints (long_max, short_max)")
    ratios: tuple[float, ...] = setting(TEST_RATIOS, gt=0)  # multi-scale ratios of the inference module's msflip
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN)  # normalisation mean, RGB, 0..255
    std: tuple[float, float, float] = setting(IMAGENET_STD, gt=0)  # normalisation std, RGB, 0..255

    __test__ = False  # not a pytest test class despite the name

    def __post_init__(self) -> None:
        _as_tuples(self, ("scale", "ratios", "mean", "std"))
        check_settings(self)
        check_scale_pixels("TestPipelineConfig: ", self.scale, self.ratios)


def _ratio_set(crop: int, long_side: int, cat_max_ratio: float) -> TrainPipelineConfig:
    return TrainPipelineConfig(crop_size=(crop, crop), scale=(long_side, crop), ratios=TRAIN_RATIOS,
                               cat_max_ratio=cat_max_ratio)


def _cityscapes() -> TrainPipelineConfig:
    return TrainPipelineConfig(crop_size=(768, 768), scale=(2048, 1024), ratios=None, ratio_range=(0.5, 2.0),
                               cat_max_ratio=0.75)


# One preset per row of the recipe table of docs/recipes.md §5, named `<dataset>_<variant>`.
TRAIN_PRESETS: dict[str, TrainPipelineConfig] = {
    "ade20k_tiny": _ratio_set(512, 2048, 0.75),
    "ade20k_small": _ratio_set(512, 2048, 1.0),
    "ade20k_base": _ratio_set(512, 2048, 1.0),
    "ade20k_large": _ratio_set(640, 2560, 1.0),
    "cityscapes_tiny": _cityscapes(),
    "cityscapes_small": _cityscapes(),
    "cityscapes_base": _cityscapes(),
    "cityscapes_large": _cityscapes(),
    "coco_stuff10k_tiny": _ratio_set(512, 2048, 1.0),
    "coco_stuff10k_small": _ratio_set(512, 2048, 1.0),
    "coco_stuff10k_base": _ratio_set(512, 2048, 1.0),
    "coco_stuff10k_large": _ratio_set(640, 2560, 1.0),
    # The built-in toy set (256 px images): the ADE20K scales halved, crops of 128 (a quarter of the image: four
    # times cheaper per step than full-image crops, and better per second of CPU; docs/benchmarks.md, "The demo").
    "toy": TrainPipelineConfig(crop_size=(128, 128), scale=(1024, 256), ratios=TRAIN_RATIOS, cat_max_ratio=0.75),
}

TEST_PRESETS: dict[str, TestPipelineConfig] = {
    "ade20k": TestPipelineConfig(scale=(2048, 512)),
    "ade20k_large": TestPipelineConfig(scale=(2560, 640)),
    "cityscapes": TestPipelineConfig(scale=(2048, 1024)),
    "coco_stuff10k": TestPipelineConfig(scale=(2048, 512)),
    "coco_stuff10k_large": TestPipelineConfig(scale=(2560, 640)),
    "toy": TestPipelineConfig(scale=(1024, 256)),
}


def _lookup(presets: dict[str, Any], name: str, kind: str) -> Any:
    if name not in presets:
        raise UnknownNameError(f"unknown {kind} preset {name!r}; valid names: {', '.join(sorted(presets))}")
    return presets[name]


def train_preset(name: str) -> TrainPipelineConfig:
    """The training pipeline config of a published recipe, e.g. ``train_preset("ade20k_tiny")``."""
    return _lookup(TRAIN_PRESETS, name, "training pipeline")


def get_test_preset(name: str) -> TestPipelineConfig:
    """The test pipeline config of a dataset, e.g. ``get_test_preset("cityscapes")``."""
    return _lookup(TEST_PRESETS, name, "test pipeline")



# --------------------------------------------------------------------------------------------- random crop
def _sample_crop_box(height: int, width: int, crop: tuple[int, int],
                     generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A uniformly placed crop window ``(y0, y1, x0, x1)``, clipped to the image."""
    y0 = randint(generator, 0, max(height - crop[0], 0) + 1)
    x0 = randint(generator, 0, max(width - crop[1], 0) + 1)
    return y0, min(y0 + crop[0], height), x0, min(x0 + crop[1], width)


def _crop_is_balanced(crop_label: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    """mmseg's test: more than one class, and no class covers ``cat_max_ratio`` or more of the labelled pixels."""
    flat = crop_label.ravel()
    counts = np.bincount(flat if flat.dtype == np.uint8 else flat.astype(np.int64))
    if ignore_index < counts.size:
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio


# --------------------------------------------------------------------------------------------- pipelines
def _as_label(label: np.ndarray) -> np.ndarray:
    """uint8 when every value fits (fast bincount and indexing), the input otherwise."""
    if label.dtype == np.uint8:
        return label
    if label.size and 0 <= label.min() and label.max() <= 255:
        return label.astype(np.uint8)
    return label


def _check_sample(sample: dict[str, Any], who: str) -> tuple[np.ndarray, np.ndarray | None]:
    image = np.asarray(sample["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UsageError(f"{who}: expected sample['image'] as an (H, W, 3) uint8 RGB array, got shape "
                         f"{image.shape} dtype {image.dtype} ({sample.get('path', 'no path')})")
    label = sample.get("label")
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape[:2]:
            raise UsageError(f"{who}: label shape {label.shape} differs from image shape {image.shape[:2]} "
                             f"({sample.get('path', 'no path')})")
    return image, label


@dataclass
class TrainTransform:
    """The training augmentation of docs/recipes.md §5 as a callable on dataset samples.

    ``transform(sample, generator=None)`` maps ``{"image": (H, W, 3) uint8, "label": (H, W) int, ...}`` to
    ``{"image": (3, ch, cw) float32 normalised, "label": (ch, cw) int64 (255 = ignore/padding), ...}``; other
    keys (paths) pass through.
    """

    config: TrainPipelineConfig = field(default_factory=TrainPipelineConfig)
    photometric: PhotoMetricDistortion = field(default_factory=PhotoMetricDistortion)

    def sample_ratio(self, generator: torch.Generator | None = None) -> float:
        """The rescale ratio of one image: from the ratio set, the ratio range, or 1."""
        cfg = self.config
        if cfg.ratios is not None:
            return cfg.ratios[randint(generator, 0, len(cfg.ratios))]
        if cfg.ratio_range is not None:
            return uniform(generator, *cfg.ratio_range)
        return 1.0

    def crop_box(self, label: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                 generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """Choose the crop of the resized label ``label[rows][:, cols]`` (mmseg's RandomCrop).

        With ``cat_max_ratio < 1`` the first window and up to 10 re-draws are tested; the window after the
        last failed test is kept (as mmseg does).
        """
        cfg = self.config
        box = _sample_crop_box(rows.size, cols.size, cfg.crop_size, generator)
        if cfg.cat_max_ratio < 1.0:
            for _ in range(CAT_MAX_RETRIES):
                y0, y1, x0, x1 = box
                if _crop_is_balanced(label[rows[y0:y1, None], cols[None, x0:x1]], cfg.cat_max_ratio,
                                     cfg.ignore_index):
                    break
                box = _sample_crop_box(rows.size, cols.size, cfg.crop_size, generator)
        return box

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        cfg = self.config
        image, label = _check_sample(sample, "TrainTransform")
        if label is None:
            raise UsageError(f"TrainTransform: the sample has no 'label' ({sample.get('path', 'no path')})")
        label = _as_label(label)
        ratio = self.sample_ratio(generator)
        target = (int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio))  # mmseg's int() of the scaled scale
        size = rescale_size(image.shape[0], image.shape[1], target)
        rows, cols = nearest_indices(label.shape[0], size[0]), nearest_indices(label.shape[1], size[1])
        y0, y1, x0, x1 = self.crop_box(label, rows, cols, generator)
        flip = coin(generator, cfg.flip_prob)
        crop_cols = cols[x0:x1][::-1] if flip else cols[x0:x1]
        crop_label = label[rows[y0:y1, None], crop_cols[None, :]]  # h, w
        crop_image = _resize_window(image, size, (y0, y1, x0, x1), flip)  # 3, h, w float, 0..255
        if cfg.photometric:
            crop_image = self.photometric(crop_image, generator)
        out = dict(sample)
        crop_image = normalize(crop_image, cfg.mean, cfg.std, channels_last=False)  # 3, h, w
        out["image"] = pad_to(crop_image, cfg.crop_size, 0.0)  # 3, ch, cw
        out["label"] = pad_to(torch.from_numpy(crop_label.astype(np.int64)), cfg.crop_size, cfg.ignore_index)
        return out


@dataclass
class TestTransform:
    """Keep-ratio rescale to the test scale and normalise (docs/recipes.md §6), labels left at the original size.

    ``transform(sample)`` maps ``{"image": (H, W, 3) uint8, "label": (H, W) int (optional), ...}`` to
    ``{"image": (3, h, w) float32, "label": (H, W) int64, "ori_size": (H, W), ...}``.
    """

    config: TestPipelineConfig = field(default_factory=TestPipelineConfig)

    __test__ = False  # not a pytest test class despite the name

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        image, label = _check_sample(sample, "TestTransform")
        size = rescale_size(image.shape[0], image.shape[1], self.config.scale)
        out = dict(sample)
        out["image"] = normalize(resize_image(image, size), self.config.mean, self.config.std)  # 3, h, w
        out["ori_size"] = (int(image.shape[0]), int(image.shape[1]))
        if label is not None:
            out["label"] = torch.from_numpy(label.astype(np.int64))
        return out


def multi_scale_sizes(height: int, width: int, scale: tuple[int, int],
                      ratios: tuple[float, ...] = TEST_RATIOS) -> list[tuple[int, int]]:
    """The ``(h, w)`` of each multi-scale test input: keep-ratio fit into ``int(scale * ratio)``."""
    return [rescale_size(height, width, (int(scale[0] * r), int(scale[1] * r))) for r in ratios]

