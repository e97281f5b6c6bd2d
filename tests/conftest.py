"""Shared fixtures: small models and deterministic inputs."""
from __future__ import annotations

import pytest
import torch

import semask


@pytest.fixture
def toy_model() -> semask.SeMaskFPN:
    """The CPU-sized SeMask variant with 5 classes, deterministic weights, eval mode."""
    torch.manual_seed(0)
    return semask.create_model("semask_toy_fpn", num_classes=5).eval()


def randomize_gammas(model: torch.nn.Module, value: float = 0.5) -> None:
    """Set every semantic layer's gamma (initialised to 0) so that the semantic attention reaches the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(value)


@pytest.fixture(scope="session")
def tiny_toy_root(tmp_path_factory):
    """A small toy dataset (12 training, 4 validation scenes of 64 px) shared by the training tests."""
    from semask.data import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("tiny-toy") / "toy", seed=0, num_train=12, num_val=4, size=64)


def tiny_overrides(root, **extra) -> list[str]:
    """`--set` overrides that shrink the `toy` preset to a few fast steps on `tiny_toy_root`."""
    values = {"data.root": str(root), "data.num_workers": 0, "data.train_pipeline.crop_size": "64,64",
              "data.train_pipeline.scale": "256,64", "data.test_pipeline.scale": "256,64", "train.batch_size": 2,
              "train.global_batch": 2, "schedule.iters": 4, "schedule.warmup_iters": 2, "train.log_interval": 2,
              "train.eval_interval": 2, "train.checkpoint_interval": 2, "train.tensorboard": "false"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
