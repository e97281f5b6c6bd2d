"""Inference with the test protocol of SeMask FPN (arXiv 2112.12782; docs/recipes.md §6).

- whole image: rescale to fit the test scale keeping the aspect ratio, run the model (logits come back at the
  rescaled size), softmax, resize the probabilities to the original size, argmax;
- sliding window: the same, but the rescaled image is covered by crop-size windows with a stride and the
  overlapping logits are averaged before the softmax;
- multi-scale + flip: ratios 0.5 .. 1.75 of the test scale, each also flipped horizontally; the softmax
  maps (flipped ones flipped back) are averaged at the original size.

The test scale, ratios and normalisation come from a `TestPipelineConfig` (`semask.data.TEST_PRESETS`); by
default the one the model's recipe was tested with (`recipe_test_preset`). The backbone runs once per scale:
the flipped copy travels in the same batch as the original.

Where the protocol allows it the work is skipped, never approximated, and memory stays bounded (docs/design.md,
"Engine: training, evaluation, inference").

    predictor = Predictor(model, mode="whole")          # or "slide", or "msflip"
    labels = predictor("image.jpg")                       # (H, W) int64 numpy array at the original size
    labels, probs = predictor(image, return_probs=True)  # probs: (K, H, W) float32
    labels = predictor.predict_labels(image)              # (H, W) int64 tensor on the model's device
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.bounds import check_fits, check_pixels, explicit_attention_strides, forward_bytes
from semask.data.transforms import (TEST_PRESETS, TEST_RATIOS, TestPipelineConfig, check_scale_pixels,
                                    get_test_preset, multi_scale_sizes, normalize, resize_image)
from semask.errors import NonFiniteError, SemaskError, UsageError, UsageTypeError
from semask.data.images import ImageInput, rgb_tensor
from semask.model.registry import model_config
from semask.device import autocast, autocast_dtype, check_device, check_precision

__all__ = [
    "ImageInput",
    "InferenceError",
    "load_image",
    "normalize",
    "recipe_test_preset",
    "model_test_config",
    "resolve_test_config",
    "eval_mode",
    "Predictor",
    "predict",
]

_META_MODEL = ("model is on the 'meta' device (shapes without weights) and cannot segment images; build it on a "
               "real device, or load weights into it (semask.load_checkpoint)")
_CHUNK_BYTES = 256 << 20  # above this, the final resize + argmax of one view works on groups of classes


class InferenceError(SemaskError, RuntimeError):
    """Inference could not give labels for a reason other than its input (a bug to report)."""


def load_image(image: ImageInput) -> np.ndarray:
    """Bring a path, PIL image, array or tensor to an (H, W, 3) uint8 RGB array.

    The rules (PIL modes, 16-bit and float images, layouts, size limit) are `semask.data.images`'; for example a
    float tensor in torchvision's convention (0..1, (3, H, W)) is accepted, a float array of 0..255 values is
    refused, and a 16-bit PNG is scaled to 8 bits.
    """
    return rgb_tensor(image).cpu().numpy()


def recipe_test_preset(num_classes: int, embed_dim: int) -> str:
    """The name of the `TEST_PRESETS` entry a model is tested with, from its class count and width.

    The rule of the released recipes (docs/recipes.md §6): 19 classes -> ``"cityscapes"`` (2048, 1024); 171 ->
    ``"coco_stuff10k"``; 150 or any other count -> ``"ade20k"`` (2048, 512); the Large width (embed dim 192,
    trained on 640 crops) tests ADE20K and COCO-Stuff at (2560, 640): ``"ade20k_large"``,
    ``"coco_stuff10k_large"``. The width of ``semask_toy_fpn`` gives ``"toy"`` (1024, 256), whatever the
    class count.

    Args:
        num_classes: classes of the model's decoder.
        embed_dim: channels of the backbone's first stage.

    Returns:
        A key of `semask.data.TEST_PRESETS`.
    """
    if embed_dim == model_config("semask_toy_fpn").embed_dim:
        return "toy"
    if num_classes == 19:
        return "cityscapes"
    name = "coco_stuff10k" if num_classes == 171 else "ade20k"
    large = embed_dim == model_config("semask_large_fpn").embed_dim
    return f"{name}_large" if large and f"{name}_large" in TEST_PRESETS else name



def model_test_config(model: nn.Module) -> TestPipelineConfig:
    """The `TestPipelineConfig` of `model`'s recipe: ``TEST_PRESETS[recipe_test_preset(classes, embed dim)]``."""
    config = getattr(model, "config", None)
    embed_dim = config.embed_dim if config is not None else model.backbone.out_channels[0]
    return get_test_preset(recipe_test_preset(model.num_classes, embed_dim))




def resolve_test_config(model: nn.Module, test_config: Union[TestPipelineConfig, str, None],
                        name: str = "test_config") -> TestPipelineConfig:
    """The test pipeline to use: `test_config` itself, the preset it names, or (None) the model's recipe's.

    Raises:
        UnknownNameError: an unknown preset name (the message lists the valid ones).
        UsageTypeError: anything else; the message names the argument as `name`.
    """
    if test_config is None:
        return model_test_config(model)
    if isinstance(test_config, str):
        return get_test_preset(test_config)
    if isinstance(test_config, TestPipelineConfig):
        return test_config
    raise UsageTypeError(f"{name} must be a TestPipelineConfig or a preset name "
                         f"({', '.join(sorted(TEST_PRESETS))}), got {type(test_config).__name__}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block, then give every submodule back the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------------------------- checks
def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageTypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise UsageError(f"{name} must be a positive int, got {value}")
    return int(value)


def _check_scale(scale: object) -> tuple[int, int]:
    if not isinstance(scale, (tuple, list)) or len(scale) != 2:
        raise UsageError(f"scale must be two positive ints (long_max, short_max), got {scale!r}")
    return _positive_int(scale[0], "scale[0]"), _positive_int(scale[1], "scale[1]")


def _check_ratios(ratios: object) -> tuple[float, ...]:
    if not isinstance(ratios, (tuple, list)) or not ratios:
        raise UsageError(f"ratios must be a non-empty sequence of positive numbers, got {ratios!r}")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r <= 0:
            raise UsageError(f"ratios must be positive finite numbers, got {tuple(ratios)!r}")
    return tuple(float(r) for r in ratios)


class Predictor:
    """Segment images with the paper's test protocol.

    Args:
        model: a `SeMaskFPN`. Each call runs it in eval mode and gives every module its mode back afterwards.
        mode: "whole", "slide" or "msflip" (whole-image inference at the config's ratios with flipping).
        scale: keep-ratio test scale (long, short); overrides the test config's.
        ratios: scale ratios (default (1.0,), or the test config's ratios for "msflip").
        flip: also run the horizontally flipped image (default True for "msflip").
        crop_size, stride: window and stride of the sliding-window mode (stride <= crop_size, so that the
            windows cover every pixel).
        device: where to run (default: the model's device; given, the model is moved there). A device this
            machine does not have is an error.
        amp_dtype: the precision: None (default) or ``"fp32"`` for full precision, an autocast dtype
            (torch.bfloat16 / torch.float16), or a precision name: ``"bf16"``, ``"fp16"``, or ``"auto"`` (bf16 where the
            device has it natively, `semask.device.autocast_dtype`); `amp_dtype` then holds the dtype it resolved to.
            bf16 on a CPU without native bf16 runs emulated and warns once (`semask.device.EmulatedPrecisionWarning`).
        window_batch: windows per forward pass in the sliding-window mode.
        test_config: a `TestPipelineConfig` or the name of a `TEST_PRESETS` entry (scale, multi-scale ratios,
            normalisation); default ``model_test_config(model)``, the one of the model's recipe.

    Images are given as paths, PIL images, arrays or tensors (`semask.data.images`); a tensor on another device
    than the model is copied to the model's device, and its ``requires_grad`` does not matter. Tensors without
    values to read (``meta`` device, sparse, quantised, nested) are refused with a `UsageError`.

    Raises:
        UsageError, UsageTypeError: an argument of the wrong type or out of range; `device` for a model on the
            ``meta`` device (such a predictor tells its settings, and refuses to segment).
    """

    def __init__(self, model: nn.Module, mode: str = "whole", scale: Optional[tuple[int, int]] = None,
                 ratios: Optional[Sequence[float]] = None, flip: Optional[bool] = None, crop_size: int = 512,
                 stride: int = 341, device: Union[str, torch.device, None] = None,
                 amp_dtype: Union[torch.dtype, str, None] = None, window_batch: int = 4,
                 test_config: Union[TestPipelineConfig, str, None] = None):
        if mode not in ("whole", "slide", "msflip"):
            raise UsageError(f"mode must be 'whole', 'slide' or 'msflip', got {mode!r}")
        if not isinstance(model, nn.Module) or not hasattr(model, "num_classes"):
            raise UsageTypeError(f"model must be a SeMaskFPN (semask.create_model / load_checkpoint), got "
                                 f"{type(model).__name__}")
        config = resolve_test_config(model, test_config)
        if scale is not None:
            config = dataclasses.replace(config, scale=_check_scale(scale))
        if flip is not None and not isinstance(flip, bool):
            raise UsageTypeError(f"flip must be True, False or None, got {flip!r}")
        check_precision(amp_dtype, "amp_dtype")
        self.crop_size = _positive_int(crop_size, "crop_size")
        self.stride = _positive_int(stride, "stride")
        self.window_batch = _positive_int(window_batch, "window_batch")
        if self.stride > self.crop_size:
            raise UsageError(f"stride {self.stride} is larger than crop_size {self.crop_size}: the windows would "
                             "leave pixels uncovered; use a stride of at most the crop size")
        weight = next(model.parameters(), None)
        if device is not None:
            if weight is not None and weight.is_meta:
                raise UsageError(_META_MODEL)
            self.device = check_device(device)
            model = model.to(self.device)
        else:
            self.device = next(model.parameters()).device
        self.model = model
        self.mode = mode
        self.test_config = config
        self.scale = config.scale
        self.ratios = _check_ratios(ratios) if ratios is not None else (
            config.ratios if mode == "msflip" else (1.0,))
        self.flip = flip if flip is not None else mode == "msflip"
        self.amp_dtype = autocast_dtype(amp_dtype, self.device)
        # sizes are bounded before any image is seen: no view above the pixel limit images are read under
        check_scale_pixels("Predictor: ", self.scale, self.ratios)
        if mode == "slide":
            check_pixels(f"Predictor: crop_size {self.crop_size}", self.crop_size, self.crop_size, field="crop_size")

    # ------------------------------------------------------------------------------------------- internals
    def _image(self, image: ImageInput) -> torch.Tensor:
        """(1, 3, H, W) uint8 on the device (a view of an (H, W, 3) tensor, as the reference pipeline has it)."""
        if self.device.type == "meta":  # a predictor of a meta model tells its settings but segments nothing
            raise UsageError(_META_MODEL)
        return rgb_tensor(image).to(self.device).permute(2, 0, 1)[None]  # 1, 3, H, W

    def _check_finite(self, decoder_logits: torch.Tensor) -> None:
        # the full-size logits are a bilinear resize of these: finite here means finite there
        if not bool(torch.isfinite(decoder_logits).all()):
            hint = (" Under float16 autocast activations can overflow: try amp_dtype=torch.bfloat16 or None."
                    if self.amp_dtype == torch.float16 else "")
            raise NonFiniteError("the model produced NaN or infinite class scores for this image (weights or "
                                 f"activations out of range); no labels can be given.{hint}")

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, h, w) float32 of a normalised batch, whole or by sliding windows."""
        with autocast(self.device, self.amp_dtype):
            if self.mode != "slide":
                out = self.model(batch)
                self._check_finite(out.decoder_logits)
                return out.logits.float()
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
            out = self.model(crops)
            self._check_finite(out.decoder_logits)
            logits = out.logits.float().view(len(chunk), B, -1, h, w)
            if total is None:
                total = torch.zeros(B, logits.shape[2], H, W, device=batch.device)
            for (y, x), window in zip(chunk, logits):
                total[:, :, y:y + h, x:x + w] += window
                count[:, :, y:y + h, x:x + w] += 1
        if not bool((count > 0).all()):  # cannot happen with stride <= crop_size; never average over nothing
            raise InferenceError("sliding windows left pixels uncovered")
        return total / count

    def _view_logits(self, img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits (B, K, h, w) of the image rescaled to `size` (B = 2 with its flipped copy)."""
        return self._logits(self._view_batch(img, size))

    def _view_batch(self, img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The model's input for the image rescaled to `size`: normalised (B, 3, h, w) float32, B = 2 with its
        flipped copy; refused when the forward would not fit the device's memory."""
        H0, W0 = img.shape[-2:]
        views = 2 if self.flip else 1
        strides = explicit_attention_strides(self.model, self.device)
        if self.mode == "slide":  # the class scores cover the whole view, global attention one window batch
            window = (min(self.crop_size, size[0]), min(self.crop_size, size[1]))
            needed = (forward_bytes(*size, self.model.num_classes, views)
                      + forward_bytes(*window, 0, views * self.window_batch, attention_strides=strides))
        else:
            needed = forward_bytes(*size, self.model.num_classes, views, attention_strides=strides)
        check_fits(f"scale {tuple(self.scale)}", needed, self.device,
                   f"this {H0} x {W0} image rescaled to {size[0]} x {size[1]} ({views} view(s), "
                   f"{self.model.num_classes} classes)", "lower the test scale (scale=, --scale, "
                   "data.test_pipeline.scale) or the ratios, or run on a device with more memory")
        # bilinear without antialiasing, rounded to uint8 like OpenCV's INTER_LINEAR in the reference
        batch = normalize(resize_image(img, size) if size != (H0, W0) else img, self.test_config.mean,
                          self.test_config.std)  # 1, 3, h, w float32
        if self.flip:
            batch = torch.cat([batch, batch.flip(-1)])  # one backbone pass for both
        return batch

    def _sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        return multi_scale_sizes(height, width, self.scale, self.ratios)

    @staticmethod
    def _softmax_views(logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, flipped copy flipped back and added: (B, K, h, w) -> (1, K, h, w), in place.

        One image of the batch at a time (in bands of rows when its map is above `_CHUNK_BYTES`) and the flip
        in groups of classes, so that the temporaries stay small (instead of three or four class maps of the
        whole batch).
        """
        K, h, w = logits.shape[1:]
        rows = h if K * h * w * logits.element_size() <= _CHUNK_BYTES else max(1, _CHUNK_BYTES // (K * w * 4))
        for b in range(logits.shape[0]):
            for r in range(0, h, rows):  # bands of rows only for large maps
                _softmax_classes_(logits[b:b + 1, :, r:r + rows])
        if logits.shape[0] == 2:
            step = max(1, logits.shape[1] // 8)
            for c in range(0, logits.shape[1], step):
                logits[0, c:c + step] += logits[1, c:c + step].flip(-1)
        return logits[:1]

    def _summed_probabilities(self, img: torch.Tensor) -> torch.Tensor:
        """Sum over all views of the softmax maps at the original size, (K, H, W) float32."""
        H0, W0 = img.shape[-2:]
        total = None
        for size in self._sizes(H0, W0):
            p = self._softmax_views(self._view_logits(img, size))  # 1, K, h, w
            if p.shape[-2:] != (H0, W0):
                p = F.interpolate(p, size=(H0, W0), mode="bilinear", align_corners=False)
            if total is None:  # a resized map is new; a view of the logits is copied so that they can be freed
                total = p[0].clone() if size == (H0, W0) else p[0]
            else:
                total += p[0]
            del p
        return total

    def _num_views(self) -> int:
        return len(self.ratios) * (2 if self.flip else 1)

    # ------------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def predict_labels(self, image: ImageInput) -> torch.Tensor:
        """The label map of one image, as a tensor on the model's device (no copy to the host).

        Args:
            image: a path, PIL image, array or tensor (see `semask.data.images` for what is accepted).

        Returns:
            (H, W) int64 class indices at the original size.

        Raises:
            NonFiniteError: the model's scores are NaN or infinite (never a silent map of class 0).
            ImageError, LimitError, UsageError: an image that cannot be read or used.
        """
        img = self._image(image)
        H0, W0 = img.shape[-2:]
        with eval_mode(self.model):
            if self._num_views() > 1:
                return self._summed_probabilities(img).div_(self._num_views()).argmax(0)
            size = self._sizes(H0, W0)[0]
            logits = self._view_logits(img, size)  # 1, K, h, w
            if size == (H0, W0):  # softmax and an identity resize leave the argmax as it is
                return logits[0].argmax(0)
            probs = self._softmax_views(logits)
            return _resize_argmax(probs, (H0, W0))

    @torch.no_grad()
    def probabilities(self, image: ImageInput) -> torch.Tensor:
        """Class probabilities (K, H, W) float32 at the original image size, averaged over scales and flips."""
        img = self._image(image)
        with eval_mode(self.model):
            return self._summed_probabilities(img).div_(self._num_views())

    def __call__(self, image: ImageInput, return_probs: bool = False
                 ) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Label map (H, W) int64 at the original size; with `return_probs`, also (K, H, W) float32 probabilities."""
        if return_probs:
            probs = self.probabilities(image)
            return probs.argmax(0).cpu().numpy(), probs.cpu().numpy()
        return self.predict_labels(image).cpu().numpy()

    @torch.no_grad()
    def predict_with_output(self, image: ImageInput, return_attention: bool = False
                            ) -> tuple[torch.Tensor, "SegmentationOutput"]:
        """Whole mode's label map together with the model's own output (stage priors, attention weights).

        The labels are `predict_labels`' (the same rescale, normalisation, forward, softmax and resize: equal bit
        for bit, which lets an evaluation score the priors of its own forward); the output is what the model
        returned for the rescaled image (logits at that size), for viewers and `semask.analyze`.

        Args:
            image: a path, PIL image, array or tensor (see `semask.data.images` for what is accepted).
            return_attention: also keep every semantic layer's attention weights in the output.

        Returns:
            ((H, W) int64 labels at the original size on the model's device, the model's `SegmentationOutput`).

        Raises:
            UsageError: a predictor other than whole mode with one view (several views have no one output).
            NonFiniteError: the model's scores are NaN or infinite.
        """
        if self.mode != "whole" or self._num_views() != 1:
            raise UsageError(f"predict_with_output needs mode 'whole' with one view (one ratio, no flip), got mode "
                             f"{self.mode!r} with {self._num_views()} views")
        img = self._image(image)
        H0, W0 = img.shape[-2:]
        size = self._sizes(H0, W0)[0]
        batch = self._view_batch(img, size)
        with eval_mode(self.model), autocast(self.device, self.amp_dtype):
            output = self.model(batch, return_attention=return_attention)
        self._check_finite(output.decoder_logits)
        logits = output.logits.float()
        if size == (H0, W0):  # as in predict_labels: softmax and an identity resize leave the argmax as it is
            return logits[0].argmax(0), output
        return _resize_argmax(self._softmax_views(logits.clone()), (H0, W0)), output


def _softmax_classes_(x: torch.Tensor) -> None:
    """Softmax over the class dimension of `x` (B, K, h, w), written back into `x`; over the last dimension of a
    channels-last view when `x` is channels-last (the faster kernel; docs/design.md, "Engine")."""
    if x.is_contiguous(memory_format=torch.channels_last):
        x.copy_(x.permute(0, 2, 3, 1).softmax(dim=-1).permute(0, 3, 1, 2))  # B, h, w, K -> B, K, h, w
    else:
        x.copy_(x.softmax(dim=1))


def _resize_argmax(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """argmax over classes of `probs` (1, K, h, w) resized bilinearly to `size`, as (H, W) int64.

    Small maps are resized at once; large ones in groups of classes with a running maximum (the first of
    equal maxima wins, as in `torch.argmax`), so that memory stays at a few class maps of the output size.
    """
    K = probs.shape[1]
    per_class = size[0] * size[1] * probs.element_size()
    if K * per_class <= _CHUNK_BYTES:
        return F.interpolate(probs, size=size, mode="bilinear", align_corners=False).argmax(1)[0]
    step = max(1, _CHUNK_BYTES // per_class)
    best = labels = None
    for c in range(0, K, step):
        part = F.interpolate(probs[:, c:c + step], size=size, mode="bilinear", align_corners=False)[0]
        value, index = part.max(0)
        if best is None:
            best, labels = value, index.add_(c)
        else:
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, index.add_(c), labels)
    return labels


def predict(model: nn.Module, image: ImageInput, mode: str = "whole", return_probs: bool = False, **kwargs
            ) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """One-call inference: `Predictor(model, mode, **kwargs)(image, return_probs)`; the model's modes are kept
    (e.g. ``predict(model, image, amp_dtype="auto")`` runs in bf16 where the device has it natively)."""
    return Predictor(model, mode=mode, **kwargs)(image, return_probs=return_probs)
