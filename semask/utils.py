"""Small shared utilities of semask (arXiv 2112.12782): atomic file writes and seeding."""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Hashable, Iterator, Optional, Union

import numpy as np
import torch

__all__ = ["atomic_path", "seed_everything", "keep_freed_memory", "is_exporting", "LRUCache"]


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it.

    Readers never see a half-written file: either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of returning it to the OS (glibc only).

    PyTorch's CPU tensors come from `malloc`; glibc serves large blocks with fresh `mmap`s and unmaps them on
    free, so every large activation is page-faulted in anew on every forward pass (for SeMask-T at 512x512
    on a 2-core VM this costs about 15% of the inference time). Turning off `mmap` for allocations and
    raising the trim threshold makes freed blocks stay in the heap for the next pass: memory is not handed
    back between passes, and the process keeps its high-water mark (docs/benchmarks.md records the peak
    resident memory both ways). This is the glibc counterpart of running with jemalloc or tcmalloc, which
    PyTorch's CPU performance guides recommend.

    The price is fragmentation: a heap that never returns memory also keeps its holes, and the resident size
    can creep up (measured: +240 MiB over 64 same-size evaluation images of SeMask-T, where the default
    allocator stayed flat). Use it for fixed-shape loops such as benchmarks and training steps, not for long
    evaluations over many image sizes.

    Changes process-wide allocator settings, so it is never called implicitly: the benchmark calls it (and
    records that it did) for its timings.

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


def is_exporting() -> bool:
    """True while `torch.export` traces the model (as `torch.onnx.export` does); False on PyTorch < 2.6.

    The model code asks this where a shape-dependent Python branch or a cache would otherwise tie the traced
    graph to the size it was traced at (see `semask.export`).
    """
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check()) if check is not None else False


class LRUCache:
    """A small least-recently-used cache (for per-feature-size attention masks): at most `maxsize` entries."""

    def __init__(self, maxsize: int = 8):
        self.maxsize = maxsize
        self._data: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()

    def get(self, key: Hashable) -> Optional[Any]:
        """The value for `key` (marked as recently used), or None."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store `value`, evicting the least recently used entry beyond `maxsize`."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
