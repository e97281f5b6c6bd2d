"""Two helpers of the SeMask forward pass (arXiv 2112.12782): the export guard and a small LRU cache."""
from __future__ import annotations

import collections
from typing import Any, Hashable, Optional

import torch

__all__ = ['is_exporting', 'LRUCache']


def is_exporting() -> bool:
    """True while `torch.export` traces the model (as `torch.onnx.export` does); False on PyTorch < 2.6.

    The model code asks this where a shape-dependent Python branch or a cache would otherwise tie the traced
    graph to the size it was traced at (see `semask.apps.export`).
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
