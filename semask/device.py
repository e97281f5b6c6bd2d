"""Devices and process-wide numerics for semask (arXiv 2112.12782): device checks, precision (autocast and what the
CPU can do natively), peak memory, seeding, the allocator."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from semask.errors import UsageError, UsageTypeError

__all__ = ["PRECISIONS", "EmulatedPrecisionWarning", "check_device", "check_tensor", "cpu_capability", "native_bf16",
           "check_precision", "autocast_dtype", "precision_name", "precision_record", "precision_text", "autocast",
           "peak_memory_bytes", "PeakMemory", "seed_everything", "kept_rng_state", "keep_freed_memory"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # the precision settings: training, inference, the benchmark
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NATIVE_BF16_CPUS = ("AVX512_BF16", "AMX")
_warned: set[str] = set()  # the slow-precision warnings this process has given (each once)


class EmulatedPrecisionWarning(UserWarning):
    """A precision that runs, but emulated and several times slower than fp32 on this machine (bf16 autocast on a CPU
    without AVX512_BF16 or AMX). Given once per process."""


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


@contextlib.contextmanager
def kept_rng_state(device: torch.device) -> Iterator[None]:
    """Give Python's, NumPy's and PyTorch's generators (the CPU's, and `device`'s when it is a GPU) back the states
    they had before the block: work inside it draws no number that the code after it would otherwise draw."""
    python, numpy = random.getstate(), np.random.get_state()
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=gpus):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


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


def _cpu_flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)  # private helpers of torch.cpu: absent in some builds
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001 - a probe that fails means "not known to be there"
        return False


def cpu_capability() -> str:
    """This CPU's class for PyTorch's kernels: ``"AMX"`` (Intel AMX tiles, with native bf16), ``"AVX512_BF16"``
    (AVX-512 with native bf16), ``"AVX512"``, ``"AVX2"``, or PyTorch's own name for other CPUs (``"DEFAULT"``,
    ``"ZVECTOR"``, ``"SVE256"``, ...), from `torch.backends.cpu.get_cpu_capability` and torch.cpu's feature probes."""
    if _cpu_flag("_is_amx_tile_supported"):
        return "AMX"
    if _cpu_flag("_is_avx512_bf16_supported"):
        return "AVX512_BF16"
    return str(torch.backends.cpu.get_cpu_capability())


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether bf16 arithmetic is native on `device`: a CPU with AVX512_BF16 or AMX (elsewhere PyTorch emulates bf16
    on the CPU, several times slower than fp32), a GPU for which `torch.cuda.is_bf16_supported`; never elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_capability() in _NATIVE_BF16_CPUS


def check_precision(precision: Any, name: str = "precision") -> None:
    """Refuse what is neither a precision setting (`PRECISIONS`) nor an autocast dtype (torch.bfloat16,
    torch.float16, or None for fp32), naming the argument as `name`.

    Raises:
        UsageError: anything else (torch.float64, "fp8", ...).
    """
    valid = precision is None or (isinstance(precision, str) and precision in PRECISIONS) or (
        isinstance(precision, torch.dtype) and precision in (torch.bfloat16, torch.float16))
    if not valid:
        raise UsageError(f"{name} must be a precision ({', '.join(map(repr, PRECISIONS))}) or an autocast dtype "
                         f"(torch.bfloat16, torch.float16, None for fp32), got {precision!r}")


def autocast_dtype(precision: Union[str, torch.dtype, None], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for a precision setting (None = fp32): the one place a precision becomes a dtype.

    ``auto`` is bf16 on GPUs that support it and fp16 on other GPUs; on the CPU it is bf16 where the CPU has it
    natively (AVX512_BF16 or AMX: `native_bf16`) and fp32 otherwise; fp32 elsewhere. An explicit bf16 on a CPU
    without native bf16 runs, emulated, and warns once per process (`EmulatedPrecisionWarning`).

    Args:
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16``, or an autocast dtype (torch.bfloat16 / torch.float16 /
            None), which is kept.
        device: where the model runs.

    Raises:
        UsageError: not a precision (`check_precision`).
    """
    check_precision(precision)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if native_bf16(device) else None
    dtype = _DTYPES[precision] if isinstance(precision, str) else precision
    if dtype == torch.bfloat16 and device.type == "cpu" and "bf16" not in _warned and not native_bf16(device):
        _warned.add("bf16")
        warnings.warn(f"bf16 autocast is emulated on this CPU (capability {cpu_capability()}: no AVX512_BF16 or AMX) "
                      "and typically several times slower than fp32 here; use precision fp32, or auto (bf16 only "
                      "where the CPU has it natively)", EmulatedPrecisionWarning, stacklevel=2)
    return dtype


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for an autocast dtype (None = fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def precision_record(setting: Union[str, torch.dtype, None], device: torch.device) -> dict[str, Any]:
    """What a precision setting resolves to on `device`, for logs and result files: ``setting`` (as asked, e.g.
    ``auto``), ``autocast`` (the precision that runs), ``native_bf16`` and, on the CPU, ``cpu_capability``."""
    record = {"setting": setting if isinstance(setting, str) else precision_name(setting),
              "autocast": precision_name(autocast_dtype(setting, device)), "native_bf16": native_bf16(device)}
    if device.type == "cpu":
        record["cpu_capability"] = cpu_capability()
    return record


def precision_text(record: dict[str, Any], machine: bool = True) -> str:
    """A `precision_record` in words, e.g. ``auto -> bf16 (AVX512_BF16 CPU, bf16 native)`` or ``fp32``; without
    `machine`, the precisions only (``auto -> bf16``)."""
    setting, used = record["setting"], record["autocast"]
    text = used if setting == used else f"{setting} -> {used}"
    cpu = record.get("cpu_capability") if machine else None
    return text + (f" ({cpu} CPU, bf16 {'native' if record['native_bf16'] else 'emulated'})" if cpu else "")


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
