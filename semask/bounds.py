"""Ranges of numeric settings and sizes that must fit (SeMask, arXiv 2112.12782).

Every numeric field of the setting dataclasses (`semask.engine.config`'s sections, `TrainPipelineConfig`,
`TestPipelineConfig`) declares its range beside it with `setting(default, ...)`, and `check_settings` — the one
validator — reads the declarations: type, finiteness, range, and for tuples their length and the elements. A
field without a declaration is not a number.

    flip_prob: float = setting(0.5, ge=0, le=1)  # probability of a horizontal flip

Sizes are checked before anything is allocated: `check_pixels` bounds an image a setting makes by the pixel limit
images are read under (``PIL.Image.MAX_IMAGE_PIXELS``), `check_fits` bounds an estimate of what a pass needs by
the memory of the device it runs on. Both raise a `SettingError` naming the setting and the memory it needs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import typing
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from semask.errors import UsageError

__all__ = ["SettingError", "Range", "setting", "check_settings", "check_pixels", "memory_capacity", "check_fits",
           "forward_bytes", "explicit_attention_strides", "format_bytes"]

_MISSING = dataclasses.MISSING


class SettingError(UsageError):
    """A setting out of its range or too large to fit.

    Attributes:
        field: the setting's name within its owner (e.g. ``flip_prob``), for callers that name it by a longer key.
        expected: what it may be (``a positive integer``, ``a number in [0, 1]``, ...); empty for sizes.
        got: the value given.
    """

    def __init__(self, message: str, field: str = "", expected: str = "", got: Any = None):
        super().__init__(message)
        self.field, self.expected, self.got = field, expected, got


@dataclass(frozen=True)
class Range:
    """The values a numeric setting (or each element of a tuple setting) may take; numbers are always finite."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    not_all_zero: bool = False  # tuples: at least one element is not 0 (class weights)
    allow_empty: bool = False  # variable-length tuples: () is a value
    what: Optional[str] = None  # the phrase for the message when the numbers alone do not say it

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self, integer: bool) -> str:
        """``a positive integer``, ``in (0, 1]``, ``a finite number > 0``, ...: what ``X must be ...`` needs."""
        if self.what:
            return self.what
        if integer:
            if self.high == math.inf:
                return {0: "a non-negative integer", 1: "a positive integer"}.get(int(self.low),
                                                                                  f"an integer >= {self.low:.0f}")
            return f"an integer in [{self.low:.0f}, {self.high:.0f}]"
        if math.isfinite(self.low) and math.isfinite(self.high):
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if math.isfinite(self.low):
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        if math.isfinite(self.high):
            return f"a finite number {'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


def setting(default: Any = _MISSING, *, default_factory: Any = _MISSING, gt: Optional[float] = None,
            ge: Optional[float] = None, lt: Optional[float] = None, le: Optional[float] = None,
            not_all_zero: bool = False, allow_empty: bool = False, what: Optional[str] = None) -> Any:
    """A dataclass field with its range: ``setting(0.5, ge=0, le=1)``, ``setting(8, ge=1)``."""
    rng = Range(low=gt if gt is not None else ge if ge is not None else -math.inf,
                high=lt if lt is not None else le if le is not None else math.inf,
                low_open=gt is not None, high_open=lt is not None, not_all_zero=not_all_zero,
                allow_empty=allow_empty, what=what)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"range": rng})


@functools.lru_cache(maxsize=None)
def _declared(cls: type) -> tuple[tuple[str, Range, Any], ...]:
    """(name, range, type hint) of each field of ``cls`` that declares a range."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, f.metadata["range"], hints[f.name]) for f in dataclasses.fields(cls)
                 if "range" in f.metadata)


def _shape(tp: Any) -> tuple[bool, Optional[int], type]:
    """(optional?, tuple length (-1: any, None: a scalar), element type) of a field's type hint."""
    optional = False
    if typing.get_origin(tp) is Union or type(tp).__name__ == "UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = len(args) < len(typing.get_args(tp)), args[0]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return optional, -1, args[0]
        return optional, len(args), args[0]
    return optional, None, tp


def check_settings(obj: Any, owner: Optional[str] = None) -> None:
    """Check every field of the dataclass ``obj`` that declares a `Range` (``owner``: its name in messages,
    by default its class's).

    Raises:
        SettingError: the first field that is not of its type, not finite or out of its range; the message is
            ``Owner: field must be <range>, got <value>``, and the error carries the field, what it may be and
            the value.
    """
    owner = owner or type(obj).__name__
    for name, rng, tp in _declared(type(obj)):
        value = getattr(obj, name)
        optional, length, element = _shape(tp)
        if value is None and optional:
            continue
        integer = element is int
        what = rng.describe(integer)
        noun = f"a number {what}" if what.startswith("in ") else what  # for "expected ..."
        if length is None:
            items, label = [value], name
        elif rng.what:
            items, label = value, name
        else:
            count = f"{length} values" if length >= 0 else "comma-separated values"
            noun = f"{count}, each {noun}" + (", not all zero" if rng.not_all_zero else "")
            items, label = value, f"each value of {name}"
        got = tuple(value) if isinstance(value, list) else value

        def fail(message: str) -> SettingError:
            return SettingError(f"{owner}: {message}, got {got!r}", name, noun, got)

        if length is not None:
            if not isinstance(value, (tuple, list)):
                raise fail(f"{name} must be {noun}")
            if (length >= 0 and len(value) != length) or (length < 0 and not value and not rng.allow_empty):
                raise fail(f"{name} must be {noun}")
            if rng.not_all_zero and value and not any(value):
                raise fail(f"{name} must not be all zero (nothing would be learnt)")
        for item in items:
            ok_type = not isinstance(item, bool) and isinstance(item, numbers.Integral if integer else numbers.Real)
            if not ok_type or not rng.contains(float(item)):
                raise fail(f"{label} must be {what}")


# --------------------------------------------------------------------------------------------- sizes
def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``120 MiB``, ``3.2 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # not reached


def forward_bytes(height: int, width: int, num_classes: int, batch: int = 1, training: bool = False,
                  attention_strides: Sequence[int] = ()) -> int:
    """A lower bound on the memory one pass over ``batch`` images of ``height x width`` pixels needs.

    Counts the float32 input and the full-resolution class scores (training: also their gradients, the semantic
    prior's scores with theirs, and the int64 labels), and for each stride in ``attention_strides`` the
    (tokens x tokens) float32 weights of a global semantic attention computed explicitly at that stride (its
    memory grows with the square of the pixels: see `explicit_attention_strides`). The backbone's other
    activations come on top.
    """
    per_pixel = 4 * 3 + (8 + 4 * num_classes * 4 if training else 4 * num_classes)
    total = height * width * per_pixel
    for stride in attention_strides:
        tokens = math.ceil(height / stride) * math.ceil(width / stride)
        total += tokens * tokens * 4 * (2 if training else 1)  # training keeps them, and their gradient
    return int(total * batch)


def explicit_attention_strides(model: Any, device: Union[str, torch.device]) -> tuple[int, ...]:
    """The strides of ``model``'s global semantic attention layers that build their whole (tokens x tokens)
    weights on ``device``: every one except on CUDA, where a fused kernel does without (`semask.model.semantic`)."""
    config, backbone = getattr(model, "config", None), getattr(model, "backbone", None)
    if torch.device(device).type == "cuda" or config is None or not hasattr(config, "resolved_global_stages"):
        return ()
    strides = getattr(backbone, "strides", None) or []
    return tuple(strides[i] for i in config.resolved_global_stages() if i < len(strides))


def check_pixels(setting_name: str, height: float, width: float, bytes_per_pixel: float = 12,
                 field: str = "") -> None:
    """Refuse a setting that makes images of ``height x width`` pixels above the pixel limit images are read under.

    Args:
        setting_name: named in the message (e.g. ``"TrainPipelineConfig: crop_size"`` or ``"--size"``).
        height, width: the largest image the setting makes (may be fractional: a scale times a ratio).
        bytes_per_pixel: what one pixel of it costs, for the estimate in the message (12: float32 RGB).
        field: `SettingError.field`.
    """
    from semask.data.images import max_image_pixels  # here: semask.data imports this module

    limit = max_image_pixels()
    pixels = height * width
    if limit is not None and pixels > limit:
        raise SettingError(
            f"{setting_name} makes images of {height:,.0f} x {width:,.0f} = {pixels:,.0f} pixels (about "
            f"{format_bytes(pixels * bytes_per_pixel)} each), above the limit of {limit:,} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS, the limit images are read under); lower it, or raise the limit if the "
            "machine has the memory: PIL.Image.MAX_IMAGE_PIXELS = N in Python, SEMASK_MAX_IMAGE_PIXELS=N for the "
            "semask command", field)


def _cgroup_limit() -> Optional[int]:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


@functools.lru_cache(maxsize=None)
def _capacity(device: torch.device) -> Optional[int]:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    if device.type != "cpu":
        return None
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = None
    limits = [v for v in (physical, _cgroup_limit()) if v]
    return min(limits) if limits else None


def memory_capacity(device: Union[str, torch.device]) -> Optional[int]:
    """All the memory ``device`` has: a GPU's total memory; for the CPU the physical memory, or the container's
    limit when lower. None where it cannot be told (then nothing is refused)."""
    return _capacity(torch.device(device))  # asked once per device: it does not change while a process runs


def check_fits(setting_name: str, needed: int, device: Union[str, torch.device], what: str, advice: str,
               field: str = "") -> None:
    """Refuse work whose lower-bound estimate ``needed`` exceeds all of ``device``'s memory, before allocating.

    Args:
        setting_name: the setting that makes it large (named in the message).
        needed: bytes, e.g. `forward_bytes`.
        device: where it would run.
        what: what needs the memory, e.g. ``"a training step of 8 crops of 4096 x 4096"``.
        advice: what to lower, e.g. ``"lower data.train_pipeline.crop_size or train.batch_size"``.
    """
    capacity = memory_capacity(device)
    if capacity is not None and needed > capacity:
        raise SettingError(f"{setting_name}: {what} needs at least {format_bytes(needed)} of memory, more than the "
                           f"{format_bytes(capacity)} {torch.device(device).type} memory of this machine; {advice}",
                           field)
