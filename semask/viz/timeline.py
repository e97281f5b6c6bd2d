"""A training run's snapshots as the explorer's timeline (SeMask, arXiv 2112.12782): `Timeline`.

``semask train`` with ``train.snapshot_interval`` keeps weights-only ``iter_NNNNNN.pth`` files in its run directory
(`semask.engine.rundir.list_snapshots` lists them). A `Timeline` holds their steps and paths, loads a snapshot
with `semask.load_checkpoint` only when it is first shown, and keeps just the few most recently shown models, so
memory stays bounded however many snapshots the run kept.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from semask.checkpoint import load_checkpoint
from semask.errors import UsageError, UsageTypeError
from semask.model.util import LRUCache

__all__ = ["Snapshots", "Timeline"]

Snapshots = Union[Sequence[tuple[int, Union[str, os.PathLike]]], Mapping[int, Union[str, os.PathLike]]]


def _points(snapshots: Snapshots) -> list[tuple[int, Path]]:
    """(step, path) in step order, checked: non-negative distinct steps, existing files."""
    items = list(snapshots.items()) if isinstance(snapshots, Mapping) else snapshots
    if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Sequence):
        raise UsageTypeError(f"snapshots must be (step, path) pairs (as semask.engine.rundir.list_snapshots(run_dir) "
                             f"gives) or a {{step: path}} dict, got {type(snapshots).__name__}")
    if not items:
        raise UsageError("snapshots: none given (an empty list); a run keeps them with train.snapshot_interval=N")
    points = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UsageTypeError(f"snapshots: expected (step, path) pairs, got {item!r}")
        step, path = item
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise UsageError(f"snapshots: a step must be a non-negative int, got {step!r} (for {str(path)!r})")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"snapshot {str(path)!r} (step {step}) does not exist")
        points.append((int(step), path))
    steps = sorted(step for step, _ in points)
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        raise UsageError(f"snapshots: step {repeated[0]} given more than once")
    return sorted(points)


def _config_difference(config: Any, other: Any) -> list[str]:
    """The fields in which two `ModelConfig`s differ (all of them when either is missing)."""
    if config is None or other is None or type(config) is not type(other):
        return ["config"]
    return [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(other, f.name)]


class Timeline:
    """One model's snapshots over training, loaded when first shown, at most `cache` of them in memory.

    Args:
        snapshots: (step, path) pairs (`semask.engine.rundir.list_snapshots`) or a ``{step: path}`` dict; shown in
            step order.
        template: the model every snapshot must be (architecture and classes); None: the first snapshot loaded.
        device: where the loaded models go (default: the template's device, else the CPU).
        cache: models kept in memory at once.

    Attributes:
        steps, paths: the training steps (increasing) and their files.
        loads: how many times a snapshot file was read; `held`: how many models are in memory now.

    Raises:
        UsageError, UsageTypeError: no snapshots, a bad step, a repeated step, a bad `cache`.
        FileNotFoundError: a snapshot file that does not exist.
    """

    def __init__(self, snapshots: Snapshots, *, template: Optional[nn.Module] = None,
                 device: Union[str, torch.device, None] = None, cache: int = 2):
        if isinstance(cache, bool) or not isinstance(cache, numbers.Integral) or cache < 1:
            raise UsageError(f"snapshot_cache must be a positive int, got {cache!r}")
        points = _points(snapshots)
        self.steps = [step for step, _ in points]
        self.paths = [path for _, path in points]
        if device is None:
            device = next(template.parameters()).device if template is not None else "cpu"
        self.device = device
        self.loads = 0
        self._name = getattr(template, "name", None) if template is not None else None
        self._config = getattr(template, "config", None) if template is not None else None
        self._checked = template is not None
        self._models = LRUCache(int(cache))

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def held(self) -> int:
        """How many snapshot models are in memory now (at most `cache`)."""
        return len(self._models)

    def model(self, index: int) -> nn.Module:
        """The model at snapshot `index` (0 = the earliest), in eval mode; read from its file on a cache miss.

        Raises:
            UsageError: the snapshot is another model than the template (or than the first snapshot loaded).
            CheckpointError: a file `semask.load_checkpoint` refuses.
        """
        model = self._models.get(index)
        if model is None:
            path = self.paths[index]
            model = load_checkpoint(path, map_location=self.device)
            self.loads += 1
            if not self._checked:
                self._name, self._config, self._checked = model.name, model.config, True
            differs = _config_difference(self._config, model.config)
            if differs or model.name != self._name:
                raise UsageError(f"snapshot {str(path)!r} (step {self.steps[index]}) is a {model.name} model that "
                                 f"differs from the explorer's {self._name} in {', '.join(differs) or 'its name'}; a "
                                 "timeline shows the snapshots of one run")
            self._models.put(index, model)
        return model
