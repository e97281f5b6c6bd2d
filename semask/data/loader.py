"""Data loading for SeMask training (arXiv 2112.12782): reproducible DataLoaders and a pipeline speed probe.

Reproducibility: :func:`build_dataloader` gives the DataLoader a ``torch.Generator`` seeded with ``seed``. PyTorch
derives each worker's torch seed from it (``base_seed + worker_id``), and the transforms draw their random
numbers from torch's generator, so every worker has its own stream and a run is repeatable. :func:`seed_worker`
also seeds Python's ``random`` and numpy's global generator in each worker for any user code that uses them.
With ``num_workers=0`` the transforms run in the main process and draw from its global torch generator, which
this module does not touch: seed it first (:func:`semask.device.seed_everything`) for a repeatable run.

Errors: an error raised while a worker loads a sample (an unreadable image, a label out of range) reaches the
caller as that error, with its own one-line message that names the file (:func:`unwrap_worker_error`), not as
torch's "Caught X in DataLoader worker process N ... Original Traceback" text; torch's error, with the worker's
traceback, stays attached as its ``__cause__`` (shown by ``semask ... --debug``).
"""
from __future__ import annotations

import random
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from semask.errors import UsageError

__all__ = ["seed_worker", "build_dataloader", "cycle", "measure_pipeline_throughput", "sample_seed",
           "TrainSampler", "AugmentedDataset", "build_train_loader", "unwrap_worker_error", "WorkerErrorLoader"]

# torch's text for an error re-raised from a loader worker or its pin-memory thread (torch._utils.ExceptionWrapper)
_WRAPPED = re.compile(r"Caught (\w+) in (?:DataLoader worker process \d+|pin memory thread[^\n]*)\.\n"
                      r"Original Traceback \(most recent call last\):\n")


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and numpy from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def unwrap_worker_error(exc: BaseException) -> Optional[BaseException]:
    """The error a DataLoader worker raised, rebuilt from torch's re-raised copy of it; None for other errors.

    torch sends a worker's error to the main process as its type and formatted traceback, and raises
    ``type("Caught X in DataLoader worker process N.\\nOriginal Traceback ...")``. This returns an error of the
    same type whose message is the original one (the last lines of that traceback), or a ``RuntimeError`` naming
    the original type when the type cannot be rebuilt from a message.
    """
    text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else ""
    match = _WRAPPED.match(text)
    if match is None:
        return None
    name, lines = match.group(1), text.splitlines()
    # the last traceback of the chain ends with the error's own lines: the first unindented line after its header
    i = max(k for k, line in enumerate(lines) if line.endswith("Traceback (most recent call last):")) + 1
    while i < len(lines) and (not lines[i] or lines[i][0].isspace()):
        i += 1
    body = "\n".join(lines[i:]).strip()
    message = re.sub(rf"^(?:[\w.]+\.)?{re.escape(name)}(?::[ \t]?|$)", "", body, count=1).strip()
    cls = type(exc)
    if cls.__name__ == name:
        try:
            return cls(message)
        except Exception:  # a type that is not built from one message
            pass
    return RuntimeError(f"{name}: {message}" if message else name)


def _unwrapping(batches: Iterator[Any]) -> Iterator[Any]:
    """Yield from a DataLoader iterator, raising a worker's error as itself (:func:`unwrap_worker_error`)."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:
            original = unwrap_worker_error(exc)
            if original is None:
                raise
            raise original from exc
        yield batch


class WorkerErrorLoader(DataLoader):
    """A DataLoader whose workers' errors reach the caller as themselves (see :func:`unwrap_worker_error`)."""

    def __iter__(self) -> Iterator[Any]:
        return _unwrapping(super().__iter__())


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0,
                     seed: int = 0, distributed: bool = False, drop_last: bool | None = None,
                     pin_memory: bool = False, persistent_workers: bool | None = None,
                     prefetch_factor: int | None = None, rank: int | None = None,
                     world_size: int | None = None) -> DataLoader:
    """A DataLoader with seeded shuffling and workers, and a DistributedSampler when ``distributed``.

    Args:
        dataset: map-style dataset returning dicts of tensors (and strings).
        batch_size: samples per batch (per process when distributed).
        shuffle: shuffle every epoch (training) or keep the order (evaluation).
        num_workers: loader processes (0: load in the main process).
        seed: seeds the shuffling and the workers' random streams (with ``num_workers=0`` the augmentation
            uses the main process's global generator: seed it with :func:`semask.device.seed_everything`).
        distributed: split the dataset across torch.distributed processes; call
            ``loader.sampler.set_epoch(epoch)`` each epoch (or iterate with :func:`cycle`, which does it).
        drop_last: drop the last incomplete batch (default: ``shuffle``, i.e. on for training).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (default: on when ``num_workers > 0``).
        prefetch_factor: batches loaded ahead per worker (PyTorch's default when None).
        rank: this process's rank for the DistributedSampler (default: from the process group).
        world_size: number of processes for the DistributedSampler (default: from the process group).

    Returns:
        The DataLoader.
    """
    if batch_size < 1:
        raise UsageError(f"build_dataloader: batch_size must be >= 1, got {batch_size}")
    drop_last = shuffle if drop_last is None else drop_last
    persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers and num_workers > 0
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    extra: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    return WorkerErrorLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=persistent_workers, worker_init_fn=seed_worker, generator=generator,
                      **extra)


def cycle(loader: DataLoader) -> Iterator[Any]:
    """Iterate over ``loader`` forever (for iteration-based training), advancing a DistributedSampler's epoch."""
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (SplitMix64-style mixing of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mult) % 2**64
    return (x ^ (x >> 31)) % 2**63


class TrainSampler(Sampler[int]):
    """An endless, resumable, sharded sample order for iteration-based training.

    Epoch ``e`` is a permutation of the dataset drawn from ``seed + e`` (the same on every process), padded to a
    multiple of ``world_size`` by repeating its start, and dealt out round-robin: process ``rank`` takes positions
    ``rank, rank + world_size, ...``. The sampler yields *keys* ``e * len(dataset) + index``, so that
    :class:`AugmentedDataset` knows both the sample and the epoch it is drawn in. ``start`` skips that many keys of
    this process's stream without touching the data, which is how a resumed run continues exactly where it stopped.

    Args:
        dataset_size: number of samples.
        seed: shuffling seed (the same on every process).
        rank, world_size: this process and the number of processes.
        start: keys of this process's stream to skip (samples already consumed by this process).
        shuffle: permute each epoch (else the natural order).
    """

    def __init__(self, dataset_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 shuffle: bool = True) -> None:
        if dataset_size < 1:
            raise UsageError("TrainSampler: the dataset is empty")
        if not 0 <= rank < world_size:
            raise UsageError(f"TrainSampler: rank {rank} is not in 0..{world_size - 1}")
        self.dataset_size, self.seed, self.rank, self.world_size = dataset_size, seed, rank, world_size
        self.start, self.shuffle = start, shuffle
        self.per_epoch = -(-dataset_size // world_size)  # keys per process per epoch

    def epoch_keys(self, epoch: int) -> list[int]:
        """This process's keys of one epoch."""
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.dataset_size)
        order = order.tolist()
        order += order[: self.per_epoch * self.world_size - len(order)]  # pad to a multiple of world_size
        return [epoch * self.dataset_size + i for i in order[self.rank::self.world_size]]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            yield from self.epoch_keys(epoch)[offset:]
            epoch, offset = epoch + 1, 0


class AugmentedDataset(Dataset):
    """A dataset whose random augmentation is a pure function of (seed, epoch, sample).

    Indexed by the keys of :class:`TrainSampler`: key ``e * len(dataset) + i`` loads sample ``i`` (without the
    dataset's own transform) and applies ``transform(sample, generator)`` with a generator seeded by
    ``sample_seed(seed, e, i)``. The same run gives the same batches whatever the number of loader workers, and a
    resumed run gives the batches the uninterrupted run would have had.

    Args:
        dataset: a :class:`~semask.data.SegmentationDataset` (its ``load(i)`` returns the raw sample).
        transform: e.g. :class:`~semask.data.TrainTransform`; called as ``transform(sample, generator)``.
        seed: the run's seed.
    """

    def __init__(self, dataset: Any, transform: Any, seed: int = 0) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, index = divmod(int(key), len(self.dataset))
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.transform(self.dataset.load(index), generator)


def build_train_loader(dataset: Any, transform: Any, batch_size: int, seed: int = 0, rank: int = 0,
                       world_size: int = 1, start: int = 0, num_workers: int = 0,
                       pin_memory: bool = False) -> DataLoader:
    """An endless training DataLoader over ``dataset`` (see :class:`TrainSampler` and :class:`AugmentedDataset`).

    Args:
        dataset: a segmentation dataset with ``load(i)``.
        transform: the training transform, e.g. ``TrainTransform(train_preset("ade20k_tiny"))``.
        batch_size: images per batch of this process.
        seed: the run's seed (data order and augmentation).
        rank, world_size: this process among ``world_size`` training processes.
        start: samples of this process's stream already consumed (to resume).
        num_workers: loader processes.
        pin_memory: page-locked batches for faster host-to-GPU copies.

    Returns:
        A DataLoader whose iterator never ends; batches are dicts with ``image`` (B, 3, h, w) and ``label``
        (B, h, w) int64.
    """
    if batch_size < 1:
        raise UsageError(f"build_train_loader: batch_size must be >= 1, got {batch_size}")
    sampler = TrainSampler(len(dataset), seed, rank, world_size, start)
    # its own generator: starting the loader's iterator draws the workers' base seed, which must not consume
    # the global generator that dropout and drop-path use
    generator = torch.Generator().manual_seed(sample_seed(seed, rank, start))
    return WorkerErrorLoader(AugmentedDataset(dataset, transform, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                      persistent_workers=False, worker_init_fn=seed_worker, generator=generator)


def measure_pipeline_throughput(num_images: int = 24, size: tuple[int, int] = (512, 683), repeats: int = 3,
                                preset: str = "ade20k_tiny", seed: int = 0) -> dict[str, Any]:
    """Images per second per CPU core through decode + the training pipeline, on ADE20K-sized JPEGs.

    Writes ``num_images`` synthetic JPEG images (smooth colour fields with noise, quality 90) and 150-class PNG
    labels of ``size`` to a temporary folder, then times ``dataset[i]`` (JPEG/PNG decode, label checks,
    :class:`~semask.data.TrainTransform`) on one thread: one warm-up pass, then ``repeats`` timed passes.

    Args:
        num_images: images per pass.
        size: ``(height, width)`` of the images (ADE20K's typical 512x683 by default).
        repeats: timed passes; the median is reported.
        preset: training pipeline preset (see :data:`~semask.data.TRAIN_PRESETS`).
        seed: seeds the synthetic data and the augmentation.

    Returns:
        ``{"images_per_s_per_core": median, "runs": [...], "ms_per_image": ..., "num_images", "size",
        "preset", "threads": 1}``.
    """
    from semask.data.datasets import FolderDataset
    from semask.data.transforms import TrainTransform, train_preset

    rng = np.random.default_rng(seed)
    height, width = size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="semask-throughput-") as tmp:
            img_dir, ann_dir = Path(tmp) / "images", Path(tmp) / "annotations"
            img_dir.mkdir()
            ann_dir.mkdir()
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            for i in range(num_images):
                freq = rng.uniform(0.005, 0.03, size=3)
                field = 127 + 100 * np.sin(yy[..., None] * freq + xx[..., None] * freq[::-1] + rng.uniform(0, 6, 3))
                image = np.clip(field + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)
                blocks = rng.integers(0, 151, size=(height // 64 + 1, width // 64 + 1), dtype=np.uint8)
                label = np.kron(blocks, np.ones((64, 64), dtype=np.uint8))[:height, :width]
                Image.fromarray(image).save(img_dir / f"{i:04d}.jpg", quality=90)
                Image.fromarray(label).save(ann_dir / f"{i:04d}.png")
            dataset = FolderDataset(img_dir, ann_dir, [f"c{k}" for k in range(150)], reduce_zero_label=True)
            transform = TrainTransform(train_preset(preset))
            generator = torch.Generator().manual_seed(seed)

            def one_pass() -> float:
                start = time.perf_counter()
                for i in range(len(dataset)):
                    transform(dataset[i], generator)
                return len(dataset) / (time.perf_counter() - start)

            one_pass()  # warm-up: file cache, allocator, lazy imports
            runs = [one_pass() for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    median = statistics.median(runs)
    return {"images_per_s_per_core": median, "ms_per_image": 1000.0 / median, "runs": runs,
            "num_images": num_images, "size": list(size), "preset": preset, "threads": 1}
