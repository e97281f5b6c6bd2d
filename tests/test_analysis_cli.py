"""`semask analyze` through the command line: the table and --json (a subprocess), the output checks and
--max-images (`main` in this process: each subprocess costs seconds of start-up), torchrun with 2 gloo processes."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import semask
from semask.data import TOY_CLASSES, TOY_PALETTE, ToyDataset, make_toy_dataset
from semask.apps.cli import main
from semask.data.transforms import TEST_PRESETS
from helpers import randomize_gammas

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A toy set of 2 + 3 scenes of 64 px and a checkpoint of the toy model written by `save_checkpoint`."""
    tmp = tmp_path_factory.mktemp("analyze-cli")
    root = make_toy_dataset(tmp / "toy", seed=2, num_train=2, num_val=3, size=64)
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE)
    randomize_gammas(model, 0.25)
    return root, semask.save_checkpoint(tmp / "toy.pth", model)


def _overrides(root: Path) -> list[str]:
    return ["--set", f"data.root={root}", "data.test_pipeline.scale=256,64", "data.num_workers=0"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semask", *args], capture_output=True, text=True, timeout=600,
                          env=ENV)


def test_analyze_prints_the_table_and_writes_json(setup, tmp_path) -> None:
    root, checkpoint = setup
    out = tmp_path / "sub" / "analysis.json"
    run = _cli("analyze", "toy", str(checkpoint), "--json", str(out), "--no-progress", "--device", "cpu",
               *_overrides(root))
    assert run.returncode == 0, run.stderr
    assert "Decoder prior: mIoU" in run.stdout and "| 3 (/16) |" in run.stdout and "global" in run.stdout
    data = json.loads(out.read_text())
    assert {"decoder_prior_mIoU", "num_images", "stages"} <= set(data) and data["num_images"] == 3
    assert [s["stage"] for s in data["stages"]] == [1, 2, 3, 4]
    for stage in data["stages"]:
        assert {"prior_mIoU", "prior_aAcc", "attention_entropy", "attention_distance_px", "same_class_attention",
                "same_class_chance", "class_attention", "gamma"} <= set(stage)
        assert stage["gamma"] == [0.25] and 0 <= stage["prior_mIoU"] <= 1
    model = semask.load_checkpoint(checkpoint)
    config = dataclasses.replace(TEST_PRESETS["toy"], scale=(256, 64))
    expected = semask.analyze(model, ToyDataset(root, "validation"), test_config=config, progress=False).to_dict()
    assert data["mIoU"] == expected["mIoU"] and data["decoder_prior_mIoU"] == expected["decoder_prior_mIoU"]
    assert [s["prior_mIoU"] for s in data["stages"]] == [s["prior_mIoU"] for s in expected["stages"]]


def test_max_images(setup, tmp_path, capsys) -> None:
    root, checkpoint = setup
    assert main(["analyze", "toy", str(checkpoint), "--max-images", "1", "--json", str(tmp_path / "a.json"),
                 "--no-progress", *_overrides(root)]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["num_images"] == 1
    assert "analysis written to" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["exists", "is the checkpoint", "folder", "bad max", "no data"])
def test_refusals_happen_before_the_work_and_touch_nothing(setup, tmp_path, capsys, case) -> None:
    root, checkpoint = setup
    target = tmp_path / "taken.json"
    target.write_text("mine\n")
    before = checkpoint.read_bytes()
    args, expected = {
        "exists": (["--json", str(target)], "pass --overwrite"),
        "is the checkpoint": (["--json", str(checkpoint), "--overwrite"], "is the checkpoint"),
        "folder": (["--json", str(tmp_path)], "is a folder"),
        "bad max": (["--max-images", "0"], "--max-images must be a positive number"),
        "no data": (["--set", f"data.root={tmp_path / 'absent'}"], "toy-data"),
    }[case]
    assert main(["analyze", "toy", str(checkpoint), "--no-progress", *_overrides(root), *args]) == 2
    out, err = capsys.readouterr()
    assert "semask analyze: error:" in err and expected in err and "Traceback" not in err
    assert target.read_text() == "mine\n" and checkpoint.read_bytes() == before
    assert "Decoder prior" not in out  # refused before any image was analysed


def test_overwrite_replaces_an_existing_json(setup, tmp_path) -> None:
    root, checkpoint = setup
    target = tmp_path / "old.json"
    target.write_text("old\n")
    assert main(["analyze", "toy", str(checkpoint), "--json", str(target), "--overwrite", "--max-images", "1",
                 "--no-progress", *_overrides(root)]) == 0
    assert json.loads(target.read_text())["num_images"] == 1


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_analysis(setup, tmp_path) -> None:
    root, checkpoint = setup
    single = _cli("analyze", "toy", str(checkpoint), "--json", str(tmp_path / "one.json"), "--no-progress",
                  "--device", "cpu", *_overrides(root))
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "semask", "analyze", "toy", str(checkpoint), "--json", str(tmp_path / "two.json"),
                             "--no-progress", "--device", "cpu", *_overrides(root)],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("Decoder prior") == 1  # printed by the first process only
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["num_images"] == two["num_images"] == 3
    # counted metrics are exact; the float sums agree up to the order of additions
    for key in ("mIoU", "mAcc", "aAcc", "decoder_prior_mIoU", "decoder_prior_aAcc"):
        assert one[key] == two[key], key
    for a, b in zip(one["stages"], two["stages"]):
        assert a["prior_mIoU"] == b["prior_mIoU"] and a["prior_IoU"] == b["prior_IoU"]
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("attention_entropy", "attention_distance_px", "same_class_attention", "same_class_chance"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
        rows_a, rows_b = (np.array(s["class_attention"], dtype=float) for s in (a, b))  # None (no query) -> nan
        np.testing.assert_allclose(rows_b, rows_a, rtol=1e-9, equal_nan=True)
