"""Evaluation with the paper's protocol: metrics, confusion matrix, per-image scores, class checks, `semask test`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import semask
from semask.engine.config import apply_overrides, get_preset
from semask.data import TOY_CLASSES, TOY_PALETTE, ToyDataset
from semask.data.transforms import TEST_PRESETS
from semask.engine.evaluate import EvalResult, check_classes, evaluate
from semask.engine.inference import Predictor
from semask.engine.metrics import confusion_matrix, mean_iou
from semask.engine.train import train
from helpers import tiny_overrides


@pytest.fixture(scope="module")
def toy_model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE)
    with torch.no_grad():  # a little structure in the predictions: more than one class per image
        model.decode_head.conv_seg.bias.copy_(torch.linspace(-1, 1, 11))
    return model.eval()


def test_evaluate_matches_the_metrics_of_its_predictions(toy_model, tiny_toy_root) -> None:
    ds = ToyDataset(tiny_toy_root, "val")
    result = evaluate(toy_model, ds, test_config=TEST_PRESETS["toy"], progress=False)
    predictor = Predictor(toy_model, scale=TEST_PRESETS["toy"].scale)
    preds = [predictor(ds.load(i)["image"]) for i in range(len(ds))]
    labels = [ds.load(i)["label"] for i in range(len(ds))]
    expected = mean_iou(preds, labels, 11)
    assert result.metrics["mIoU"] == expected["mIoU"] and result.metrics["aAcc"] == expected["aAcc"]
    np.testing.assert_array_equal(result.metrics["IoU"], expected["IoU"])
    total = sum(confusion_matrix(torch.as_tensor(p), torch.as_tensor(lab), 11) for p, lab in zip(preds, labels))
    np.testing.assert_array_equal(result.confusion, total.numpy())
    assert result.confusion.sum() == sum(int((lab != 255).sum()) for lab in labels)
    assert [r["index"] for r in result.per_image] == list(range(4)) and result.num_images == 4
    for r, p, lab in zip(result.per_image, preds, labels):
        assert r["mIoU"] == mean_iou(p, lab, 11)["mIoU"] and r["path"].endswith(".jpg")
    assert result.worst(2) == sorted(result.per_image, key=lambda r: r["mIoU"])[:2]
    assert result.class_names == TOY_CLASSES and "Summary: aAcc" in result.table()


def test_eval_result_json_and_limits(toy_model, tiny_toy_root, tmp_path) -> None:
    ds = ToyDataset(tiny_toy_root, "val")
    result = evaluate(toy_model, ds, test_config=TEST_PRESETS["toy"], max_images=2, progress=False)
    assert result.num_images == 2
    data = json.loads(result.save_json(tmp_path / "m.json").read_text())
    assert set(data["IoU"]) == set(TOY_CLASSES) and data["num_images"] == 2 and len(data["confusion"]) == 11
    assert data["mIoU"] == pytest.approx(result.mIoU)
    assert all(v is None or 0 <= v <= 1 for v in data["IoU"].values())
    assert any(v is None for v in data["IoU"].values())  # classes absent from 2 images are undefined, not 0


def test_evaluate_restores_the_model_mode_and_supports_ms_flip(toy_model, tiny_toy_root) -> None:
    ds = ToyDataset(tiny_toy_root, "val")
    toy_model.train()
    try:
        ms = evaluate(toy_model, ds, aug_test=True, test_config=TEST_PRESETS["toy"], max_images=1, progress=False)
        assert toy_model.training
    finally:
        toy_model.eval()
    single = evaluate(toy_model, ds, test_config=TEST_PRESETS["toy"], max_images=1, progress=False)
    assert ms.aug_test and not single.aug_test
    probs = Predictor(toy_model, mode="msflip", scale=TEST_PRESETS["toy"].scale).probabilities(ds.load(0)["image"])
    assert ms.per_image[0]["mIoU"] == mean_iou(probs.argmax(0).numpy(), ds.load(0)["label"], 11)["mIoU"]
    slide = evaluate(toy_model, ds, mode="slide", crop_size=48, stride=32, test_config=TEST_PRESETS["toy"],
                     max_images=1, progress=False)
    assert slide.mode == "slide" and not math.isnan(slide.mIoU)


def test_class_mismatches_are_refused(tiny_toy_root) -> None:
    ds = ToyDataset(tiny_toy_root, "val")
    with pytest.raises(ValueError, match="predicts 5 classes but the dataset .* has 11"):
        check_classes(semask.create_model("semask_toy_fpn", num_classes=5), ds)
    renamed = semask.create_model("semask_toy_fpn", class_names=("ocean",) + TOY_CLASSES[1:])
    with pytest.warns(UserWarning, match="differ from the dataset's at 1 of 11 positions .*'ocean' vs .*'sky'"):
        evaluate(renamed, ds, max_images=1, progress=False)


def test_semask_test_command(tiny_toy_root, tmp_path) -> None:
    overrides = tiny_overrides(tiny_toy_root, **{"schedule.iters": 2, "train.eval_interval": 0})
    run = subprocess.run([sys.executable, "-m", "semask", "train", "toy", "--work-dir", str(tmp_path / "run"),
                          "--no-progress", "--set", *overrides], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "best mIoU" in run.stdout and (tmp_path / "run" / "latest.pth").is_file()
    test = subprocess.run([sys.executable, "-m", "semask", "test", "toy", str(tmp_path / "run" / "latest.pth"),
                           "--json", str(tmp_path / "m.json"), "--no-progress", "--set", *overrides],
                          capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr
    assert "Summary: aAcc" in test.stdout and "| sky" in test.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    model = semask.load_checkpoint(tmp_path / "run" / "latest.pth")
    test_config = apply_overrides(get_preset("toy"), overrides).data.test_pipeline  # 64 px scenes stay 64 px
    expected = evaluate(model, ToyDataset(tiny_toy_root, "val"), test_config=test_config, progress=False)
    assert metrics["mIoU"] == expected.mIoU
    again = subprocess.run([sys.executable, "-m", "semask", "train", "toy", "--work-dir", str(tmp_path / "run"),
                            "--set", *overrides], capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    bad = subprocess.run([sys.executable, "-m", "semask", "test", "toy", str(tmp_path / "run" / "latest.pth"),
                          "--set", f"data.root={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "toy-data" in bad.stderr


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "semask", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_training_and_exact_evaluation_with_gloo(tiny_toy_root, tmp_path) -> None:
    overrides = tiny_overrides(tiny_toy_root, **{"train.batch_size": 1, "train.global_batch": 4,
                                                 "schedule.iters": 2, "train.log_interval": 1})
    run = _torchrun("train", "toy", "--work-dir", str(tmp_path / "run"), "--no-progress", "--set", *overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (tmp_path / "run" / "train.log").read_text()
    assert "on 2 x cpu" in text and "4 images per step = 1 x 2 process(es) x 2 accumulation step(s)" in text
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2]  # written once, by rank 0
    assert [r["num_images"] for r in records if r["kind"] == "eval"] == [4]  # the split divided, then merged
    # the priors' confusions were summed over the processes like the evaluation's: one process's analysis agrees
    test_config = apply_overrides(get_preset("toy"), overrides).data.test_pipeline
    analysis = semask.analyze(semask.load_checkpoint(tmp_path / "run" / "latest.pth"),
                              ToyDataset(tiny_toy_root, "val"), test_config=test_config, progress=False)
    last = [r for r in records if r["kind"] == "eval"][-1]
    assert last["prior_mIoU"] == [s.prior_mIoU for s in analysis.stages]
    assert last["decoder_prior_mIoU"] == analysis.decoder_prior_mIoU and last["mIoU"] == analysis.metrics["mIoU"]

    checkpoint = str(tmp_path / "run" / "latest.pth")
    single = subprocess.run([sys.executable, "-m", "semask", "test", "toy", checkpoint, "--json",
                             str(tmp_path / "one.json"), "--no-progress", "--set", *overrides],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    double = _torchrun("test", "toy", checkpoint, "--json", str(tmp_path / "two.json"), "--no-progress",
                       "--set", *overrides)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for key in ("aAcc", "mIoU", "mAcc", "IoU", "Acc", "confusion", "num_images"):
        assert one[key] == two[key], key
    assert [r["index"] for r in two["per_image"]] == [0, 1, 2, 3]
    assert [r["mIoU"] for r in one["per_image"]] == [r["mIoU"] for r in two["per_image"]]


def test_show_dir_writes_one_panel_per_image(toy_model, tiny_toy_root, tmp_path) -> None:
    from PIL import Image

    ds = ToyDataset(tiny_toy_root, "val")
    evaluate(toy_model, ds, test_config=TEST_PRESETS["toy"], show_dir=tmp_path / "show", progress=False)
    panels = sorted(p.name for p in (tmp_path / "show").iterdir())
    assert panels == sorted(Path(ds.pairs[i][0]).stem + ".png" for i in range(len(ds)))
    with Image.open(tmp_path / "show" / panels[0]) as im:
        assert im.width > 3 * im.height  # image | ground truth | prediction | error map, side by side


def test_semask_demo_runs_end_to_end(tiny_toy_root, tmp_path) -> None:
    overrides = tiny_overrides(tiny_toy_root, **{"schedule.iters": 2, "train.eval_interval": 0})
    run = subprocess.run([sys.executable, "-m", "semask", "demo", "--work-dir", str(tmp_path / "demo"),
                          "--data-root", str(tiny_toy_root), "--no-progress", "--set", *overrides],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    demo = tmp_path / "demo"
    for name in ("latest.pth", "best.pth", "log.jsonl", "config.json", "curves.png", "demo.json"):
        assert (demo / name).is_file(), name
    assert len(list((demo / "predictions").glob("*.png"))) == 4  # the 4 validation scenes (first and hardest)
    assert (demo / "priors" / "argmax.png").is_file() and len(list((demo / "priors").glob("class_*.png"))) >= 1
    record = json.loads((demo / "demo.json").read_text())
    last = [json.loads(line) for line in (demo / "log.jsonl").read_text().splitlines()][-1]
    assert last["kind"] == "eval" and record["mIoU"] == last["mIoU"] and record["seed"] == 0
    assert record["minutes"] is None and record["budget"] is None and record["steps"] == 2  # the fixed schedule
    assert record["precision"]["setting"] == "auto" and record["precision"]["autocast"] in ("fp32", "bf16")
    assert f"semask demo: mIoU {100 * last['mIoU']:.2f}" in run.stderr and str(demo) in run.stderr


def test_demo_writes_the_toy_set_when_missing(tmp_path) -> None:
    from semask.apps.demo import run_demo

    overrides = tiny_overrides(tmp_path / "toy", **{"schedule.iters": 1, "train.eval_interval": 0,
                                                   "eval.max_images": 2})
    result = run_demo(tmp_path / "demo", tmp_path / "toy", overrides, progress=False)
    assert (tmp_path / "toy" / "toy_meta.json").is_file()
    assert len(ToyDataset(tmp_path / "toy", "val")) == 100  # the full toy set, as `semask toy-data` writes it
    assert result.files["curves"].is_file() and 0 <= result.mIoU <= 1
