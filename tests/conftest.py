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
