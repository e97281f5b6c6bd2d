"""Tests of semask.data.loader: seeded workers, distributed sampling, and the throughput probe."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from semask.data import ToyDataset, TrainTransform, make_toy_dataset, train_preset
from semask.data.loader import build_dataloader, cycle, measure_pipeline_throughput


class RandomProbe(Dataset):
    """Returns the index and one draw from each global generator a transform might use."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "torch": torch.rand(()), "numpy": np.random.rand(), "random": random.random()}


def _drain(loader) -> list[dict]:
    return [batch for batch in loader]


def test_workers_get_distinct_reproducible_streams():
    runs = [_drain(build_dataloader(RandomProbe(), batch_size=2, num_workers=2, seed=s)) for s in (0, 0, 1)]
    for key in ("index", "torch", "numpy", "random"):
        first = torch.cat([torch.as_tensor(b[key]) for b in runs[0]])
        again = torch.cat([torch.as_tensor(b[key]) for b in runs[1]])
        assert torch.equal(first, again), key  # same seed: same order and the same random draws
        if key != "index":
            assert len(set(first.tolist())) == len(first), key  # no two workers repeat each other's draws
            other = torch.cat([torch.as_tensor(b[key]) for b in runs[2]])
            assert not torch.equal(first, other), key
    assert sorted(torch.cat([b["index"] for b in runs[0]]).tolist()) == list(range(8))


def test_training_batches_are_reproducible_with_workers(tmp_path):
    root = make_toy_dataset(tmp_path / "toy", num_train=6, num_val=2, size=64)
    dataset = ToyDataset(root, "training", transform=TrainTransform(train_preset("toy")))

    def first_batches(seed: int) -> list[torch.Tensor]:
        loader = build_dataloader(dataset, batch_size=2, num_workers=2, seed=seed)
        return [b["image"] for b in itertools.islice(iter(loader), 2)]

    a, b, c = first_batches(5), first_batches(5), first_batches(6)
    assert a[0].shape == (2, 3, 128, 128)  # the toy preset's crop
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])


def test_distributed_sampler_splits_the_dataset():
    shards = []
    for rank in range(2):
        loader = build_dataloader(RandomProbe(), batch_size=2, shuffle=True, seed=3, distributed=True, rank=rank,
                                  world_size=2)
        assert isinstance(loader.sampler, DistributedSampler)
        shards.append(torch.cat([b["index"] for b in loader]).tolist())
    assert sorted(shards[0] + shards[1]) == list(range(8)) and not set(shards[0]) & set(shards[1])


def test_cycle_runs_past_the_end_and_reshuffles_distributed_epochs():
    loader = build_dataloader(RandomProbe(), batch_size=4, seed=0, distributed=True, rank=0, world_size=1)
    batches = list(itertools.islice(cycle(loader), 6))  # 2 batches per epoch, 3 epochs
    orders = [torch.cat([batches[i]["index"], batches[i + 1]["index"]]).tolist() for i in (0, 2, 4)]
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1 and loader.sampler.epoch == 2


def test_build_dataloader_defaults_and_validation():
    loader = build_dataloader(RandomProbe(), batch_size=3, shuffle=False)
    assert [b["index"].tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7]]  # eval: ordered, keeps the tail
    assert build_dataloader(RandomProbe(), batch_size=3).drop_last is True
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        build_dataloader(RandomProbe(), batch_size=0)


def test_measure_pipeline_throughput_reports_a_median():
    before = torch.get_num_threads()
    result = measure_pipeline_throughput(num_images=3, size=(96, 128), repeats=3)
    assert len(result["runs"]) == 3 and result["images_per_s_per_core"] == sorted(result["runs"])[1]
    assert result["images_per_s_per_core"] > 0 and result["ms_per_image"] == pytest.approx(
        1000 / result["images_per_s_per_core"])
    assert result["size"] == [96, 128] and result["threads"] == 1 and torch.get_num_threads() == before
