"""Helpers shared by the test modules (fixtures live in conftest.py).

Test modules import these with ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path``. They must not
import from ``conftest``: with ``notebooks/conftest.py`` collected in the same session, the name ``conftest`` may
refer to either file.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")  # Debian's Chromium, which the browser tests drive (no browser download)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_executable() -> Path:
    """The Chromium the browser tests drive; skips the test, saying how to install one, where there is none."""
    found = CHROMIUM if CHROMIUM.is_file() else (Path(shutil.which("chromium")) if shutil.which("chromium") else None)
    if found is None:
        pytest.skip(f"Chromium is not installed ({CHROMIUM} does not exist and no `chromium` on PATH); install it "
                    "with `apt-get install -y chromium` (as .ci/run does) to run the browser test")
    return found


def randomize_gammas(model: torch.nn.Module, value: float = 0.5) -> None:
    """Set every semantic layer's gamma (initialised to 0) so that the semantic attention reaches the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(value)


def tiny_overrides(root, **extra) -> list[str]:
    """`--set` overrides that shrink the `toy` preset to a few fast steps on `tiny_toy_root`."""
    values = {"data.root": str(root), "data.num_workers": 0, "data.train_pipeline.crop_size": "64,64",
              "data.train_pipeline.scale": "256,64", "data.test_pipeline.scale": "256,64", "train.batch_size": 2,
              "train.global_batch": 2, "schedule.iters": 4, "schedule.warmup_iters": 2, "train.log_interval": 2,
              "train.eval_interval": 2, "train.checkpoint_interval": 2, "train.tensorboard": "false"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def page_data(page: str) -> dict:
    """The JSON an explorer page's script reads (`semask.viz.page`)."""
    match = re.search(r'<script type="application/json" id="semask-data">(.*?)</script>', page, re.S)
    assert match, "the page holds no data script"
    return json.loads(match.group(1))
