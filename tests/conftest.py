"""Shared fixtures: small models and deterministic inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

import semask


@pytest.fixture
def toy_model() -> semask.SeMaskFPN:
    """The CPU-sized SeMask variant with 5 classes, deterministic weights, eval mode."""
    torch.manual_seed(0)
    return semask.create_model("semask_toy_fpn", num_classes=5).eval()


@pytest.fixture(scope="session")
def tiny_toy_root(tmp_path_factory):
    """A small toy dataset (12 training, 4 validation scenes of 64 px) shared by the training tests."""
    from semask.data import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("tiny-toy") / "toy", seed=0, num_train=12, num_val=4, size=64)


@pytest.fixture
def hub_dir(tmp_path: Path) -> Iterator[Path]:
    """torch.hub's directory (and so its download cache) in a temporary folder, restored afterwards."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub"
    finally:
        torch.hub.set_dir(previous)
