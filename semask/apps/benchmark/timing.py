"""Timing, FLOP counting and the matrix-multiply peak for `semask benchmark` (SeMask, arXiv 2112.12782)."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import semask
from semask.device import cpu_capability, native_bf16

__all__ = ["synchronize", "time_it", "count_flops", "matmul_peak", "cpu_model", "environment"]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA kernels run asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed.

    Returns:
        Seconds: ``median_s``, ``min_s``, ``max_s``, ``iqr_s`` (interquartile range) and ``times_s`` (every run).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "iqr_s": q[2] - q[0], "times_s": times}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _flop_counter() -> FlopCounterMode:
    # PyTorch's counter knows the CUDA attention kernels; give the CPU flash-attention kernel the same formula
    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flops),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flops)):
        if hasattr(torch.ops.aten, name):
            mapping[getattr(torch.ops.aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`, from PyTorch's FLOP counter (matrix products, convolutions, attention)."""
    counter = _flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()


PROBE_SIDE = 512  # the products timed first, to choose the layout and whether the asked side fits the time limit
# the two operand layouts of a product: CPU kernels can differ by 20x between them where bf16 is emulated (plain
# row-major operands hit a slow path that nn.Linear's transposed weight avoids); in fp32 they run alike
_LAYOUTS = {"a @ b": lambda a, b: torch.mm(a, b), "a @ b.T": lambda a, b: torch.nn.functional.linear(a, b)}


def _square_pair(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return (torch.randn(n, n, generator=g).to(device=device, dtype=dtype),
            torch.randn(n, n, generator=g).to(device=device, dtype=dtype))


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 5,
                max_seconds: float = 5.0) -> dict[str, Any]:
    """The machine's matrix-multiply throughput in `dtype`: best and median FLOP/s of an n x n x n product.

    Both operand layouts (``a @ b``, and ``a @ b.T`` as `nn.Linear` computes it) are timed on a 512 x 512 product
    first and the faster is measured. Where one n x n product would take longer than `max_seconds` (extrapolated
    from that probe), the side is halved until it fits, down to 512. ``n`` is the side measured, ``n_asked`` the
    one asked, ``layout`` the layout measured.
    """
    a, b = _square_pair(min(n, PROBE_SIDE), dtype, device)
    probes = {name: time_it(lambda f=f: f(a, b), warmup=1, repeats=1, device=device)["min_s"]
              for name, f in _LAYOUTS.items()}
    layout = min(probes, key=probes.get)
    side = n
    while side > PROBE_SIDE and probes[layout] * (side / PROBE_SIDE) ** 3 > max_seconds:
        side //= 2
    side = max(side, min(n, PROBE_SIDE))
    a, b = _square_pair(side, dtype, device)
    product = _LAYOUTS[layout]
    stats = time_it(lambda: product(a, b), warmup=2, repeats=repeats, device=device)
    flops = 2.0 * side ** 3
    return {"n": side, "n_asked": n, "layout": layout, "best_flops": flops / stats["min_s"],
            "median_flops": flops / stats["median_s"]}


def cpu_model() -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux on x86), None where it cannot be read."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and versions, for the record: the CPU's model (None where unreadable), its capability class for
    PyTorch's kernels and whether it has native bf16 (`semask.device.cpu_capability`), PyTorch's thread count."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "semask": semask.__version__,
        "platform": platform.platform(), "cpu": cpu_model(), "cpu_capability": cpu_capability(),
        "cpu_bf16_native": native_bf16("cpu"), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
