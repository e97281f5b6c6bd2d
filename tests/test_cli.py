"""The `semask` command line: model listing, checkpoint info, prediction, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semask
from semask.checkpoint import to_official_checkpoint
from semask.apps.cli import main


@pytest.fixture
def official_ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", num_classes=3)
    model.class_names, model.palette = ("sky", "sea", "boat"), [[0, 0, 255], [0, 100, 200], [255, 0, 0]]
    path = tmp_path / "toy_official.pth"
    torch.save(to_official_checkpoint(model), path)
    return path


def test_list_models(capsys) -> None:
    assert main(["list-models", "swin_*"]) == 0
    out = capsys.readouterr().out.split()
    assert out == semask.list_models("swin_*") and "swin_tiny_fpn" in out


def test_info(official_ckpt: Path, capsys) -> None:
    assert main(["info", str(official_ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "semask_toy_fpn" and info["num_classes"] == 3
    assert info["classes"] == ["sky", "sea", "boat"]
    assert info["semantic_global_stages"] == [2, 3]


def test_predict_writes_label_maps(official_ckpt: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(40, 60), (33, 21)]):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        images.append(p)
    out = tmp_path / "pred"
    assert main(["predict", str(official_ckpt), *map(str, images), "--out", str(out), "--scale", "128", "64",
                 "--color", "--mode", "msflip"]) == 0
    for p, size in zip(images, [(40, 60), (33, 21)]):
        with Image.open(out / f"{p.stem}.png") as im:
            assert im.mode == "P" and im.size == (size[1], size[0])
            assert np.asarray(im).max() < 3
            assert im.getpalette()[:9] == [0, 0, 255, 0, 100, 200, 255, 0, 0]
    model = semask.load_checkpoint(official_ckpt)
    expected = semask.predict(model, images[0], mode="msflip", scale=(128, 64))
    with Image.open(out / "img0.png") as im:
        np.testing.assert_array_equal(np.asarray(im), expected)


def test_errors_are_reported_without_a_traceback(tmp_path: Path, capsys) -> None:
    assert main(["info", str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err
    assert "semask info: error:" in err and "absent.pth" in err and "Traceback" not in err


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "semask", "list-models", "semask_t*"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["semask_tiny_fpn", "semask_toy_fpn"]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"semask {semask.__version__}"


def test_list_models_without_a_match_says_so(capsys) -> None:
    assert main(["list-models", "resnet*"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no model matches 'resnet*'" in captured.err and "semask_tiny_fpn" in captured.err
