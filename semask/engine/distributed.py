"""torch.distributed for SeMask training and evaluation (arXiv 2112.12782): process setup in a few functions.

`semask train` and `semask test` run as one process, or as several under PyTorch's own launcher:

    torchrun --nproc_per_node=2 -m semask train semask_tiny_ade20k --work-dir runs/tiny

`torchrun` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; `setup` reads them,
starts the process group (NCCL on GPUs, gloo on CPUs) and gives each process its GPU. Without them it does
nothing and the run is a single process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from semask.device import check_device

__all__ = ["DistInfo", "setup", "resolve_device", "shard", "barrier", "any_process", "all_reduce_mean",
           "all_reduce_max", "broadcast_buffers", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among `world_size` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this call initialised the process group (and `cleanup` will end it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> the local GPU when CUDA is available, else the CPU; ``cuda`` -> ``cuda:<local_rank>``.

    Raises:
        UsageError: a device this machine does not have, or not a device name (`semask.device.check_device`).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = check_device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Start (or join) the process group when launched by torchrun, and choose this process's device.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun, ``cuda`` means ``cuda:LOCAL_RANK``).
        timeout_minutes: how long collective operations wait for the other processes.

    Returns:
        A `DistInfo`; single-process runs get rank 0 of 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
        started = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                    started_here=started)


def shard(n: int) -> tuple[range, int, int]:
    """This process's share of items 0 .. n-1 and where it stands: (indices, rank, world size).

    Process ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...`` (all of them without a process group), so the
    shares are disjoint and together cover every item once; sums over them, added with ``all_reduce``, are the
    single-process sums.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        return range(rank, n, world), rank, world
    return range(n), 0, 1


def barrier(info: DistInfo) -> None:
    """Wait for every process (a no-op for a single process)."""
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def any_process(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is true on any process (every process must call it; a single process gets its own)."""
    if not info.distributed:
        return flag
    t = torch.tensor(float(flag), device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean over processes of a dict of numbers (every process must call it with the same keys)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: v / info.world_size for k, v in zip(keys, t.tolist())}


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every process the first process's buffers (a no-op for a single process).

    Under DDP each process updates its own BatchNorm running statistics in the forward (DDP copies the first
    process's at the start of the next training forward only), so after a step they differ; an evaluation that
    divides the images among the processes must use the statistics that the first process saves.
    """
    if info.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """The largest of each number over processes, the same on every process (every process must call it)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
    """A tqdm bar for long work; callers enable it on the first process only. A disabled bar's calls do nothing,
    so the loops update and close it without checking."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


def cleanup(info: DistInfo) -> None:
    """End the process group if `setup` started it."""
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()
