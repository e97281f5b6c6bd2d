"""Data loading for SeMask training (arXiv 2112.12782): reproducible DataLoaders and a pipeline speed probe.

Reproducibility: :func:`build_dataloader` gives the DataLoader a ``torch.Generator`` seeded with ``seed``. PyTorch
derives each worker's torch seed from it (``base_seed + worker_id``), and the transforms draw their random
numbers from torch's generator, so every worker has its own stream and a run is repeatable. :func:`seed_worker`
also seeds Python's ``random`` and numpy's global generator in each worker for any user code that uses them.
With ``num_workers=0`` the transforms run in the main process and draw from its global torch generator, which
this module does not touch: seed it first (:func:`semask.utils.seed_everything`) for a repeatable run.
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["seed_worker", "build_dataloader", "cycle", "measure_pipeline_throughput"]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and numpy from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


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
            uses the main process's global generator: seed it with :func:`semask.utils.seed_everything`).
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
        raise ValueError(f"build_dataloader: batch_size must be >= 1, got {batch_size}")
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
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
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
