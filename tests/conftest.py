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


# a CPU class -> what PyTorch's probes say on it: (capability string, avx512_bf16, amx tiles)
SIMULATED_CPUS = {"AVX2": ("AVX2", False, False), "AVX512": ("AVX512", False, False),
                  "AVX512_BF16": ("AVX512", True, False), "AMX": ("AVX512", True, True)}


@pytest.fixture
def simulate_cpu(monkeypatch):
    """``simulate_cpu("AVX2")``: this process sees a CPU of that class (PyTorch's capability probes patched; the
    kernels that run stay this machine's), and semask has not yet warned about its precision."""
    import semask.device

    def simulate(name: str) -> None:
        base, bf16, amx = SIMULATED_CPUS[name]
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: base)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(semask.device, "_warned", set())

    return simulate
