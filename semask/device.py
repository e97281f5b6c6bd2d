"""Devices and process-wide numerics for semask (arXiv 2112.12782): device checks, precision (autocast), peak memory,
seeding, the allocator."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from semask.errors import UsageError, UsageTypeError

__all__ = ["check_device", "check_tensor", "autocast_dtype", "autocast", "peak_memory_bytes", "PeakMemory",
           "seed_everything", "keep_freed_memory"]


def check_device(device: Union[str, torch.device, None]) -> torch.device:
    """The `torch.device` for `device`, checked to exist on this machine.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a `torch.device`, or None for the CPU.

    Raises:
        UsageError: not a device name, or a device this machine does not have (e.g. ``"cuda"`` without CUDA).
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"device {device!r} is not a device name; expected e.g. 'cpu', 'cuda', 'cuda:1' or "
                         f"'mps' ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {str(device)!r} was asked for but CUDA is not available here "
                             "(torch.cuda.is_available() is False: no GPU or driver, or a CPU-only PyTorch); "
                             "use the CPU ('cpu', --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {str(device)!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s), cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {str(device)!r} was asked for but Apple's MPS backend is not available here; "
                         "use 'cpu'")
    return dev


def check_tensor(x: torch.Tensor, name: str, device: Optional[torch.device] = None) -> None:
    """Refuse a tensor whose values semask cannot use, naming it as `name`.

    Supported: dense (strided) tensors of real values on a real device, of any strides (transposed, sliced,
    expanded, channels-last) and with or without ``requires_grad``. Refused, each with what to do instead: the
    ``meta`` device (shapes without values), sparse and other non-strided layouts, quantised and nested tensors,
    complex dtypes, and with `device` given, a tensor on another device (the model's, for its input).

    Raises:
        UsageError: one of the above; UsageTypeError for a complex dtype.
    """
    if x.is_meta:
        raise UsageError(f"{name} is on the 'meta' device, which holds shapes but no values; give a tensor with "
                         "values on a real device (e.g. 'cpu' or 'cuda')")
    if x.is_nested:
        raise UsageError(f"{name} is a nested tensor; give one image at a time, or a batch of images of one size")
    if x.layout != torch.strided:
        raise UsageError(f"{name} has layout {x.layout}; semask takes dense (strided) tensors: pass its .to_dense()")
    if x.is_quantized:
        raise UsageError(f"{name} is a quantised tensor ({x.dtype}); pass its .dequantize(), a float tensor")
    if x.is_complex():
        raise UsageTypeError(f"{name} has the complex dtype {x.dtype}; semask takes real values")
    if device is not None and device.type == "meta":
        raise UsageError(f"the model is on the 'meta' device (shapes without weights), so it cannot run on {name}; "
                         "build it on a real device, or load weights into it (semask.load_checkpoint)")
    if device is not None and x.device != device:
        raise UsageError(f"{name} is on {x.device} but the model is on {device}; move it with .to('{device}') "
                         f"(or the model with model.to('{x.device}'))")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of returning it to the OS (glibc only).

    Turns off `mmap` for allocations and raises the trim threshold, so freed blocks stay in the heap for the next
    pass. Process-wide, and never called implicitly: the benchmark calls it for its timings. Why, and what it
    costs (fragmentation): docs/design.md, "Apps"; measured: docs/benchmarks.md, "Allocator".

    Returns:
        True if the settings were applied, False where glibc's `mallopt` is not available.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h parameter numbers
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for a precision setting (None = fp32).

    ``auto`` is bf16 on GPUs that support it, fp16 on other GPUs and fp32 on the CPU.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype` on `device`'s type, or nothing for None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then covers the process lifetime
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss() -> Optional[int]:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else None


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """The peak memory of this process so far: CUDA max allocated on a GPU, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _peak_rss()


class PeakMemory:
    """Peak memory over a block: CUDA max allocated on a GPU, peak resident set size (VmHWM) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.baseline_bytes: Optional[int] = None  # allocated / resident when the block started

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak_rss()
            self.baseline_bytes = _peak_rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = _peak_rss()
