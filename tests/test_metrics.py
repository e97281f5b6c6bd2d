"""Tests of semask.engine.metrics: docs/recipes.md §6 definitions, streaming, smp cross-check, real torch.distributed merging."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semask.engine.metrics import (SegmentationMetric, areas_from_confusion, confusion_matrix, format_table, mean_iou,
                                   metrics_from_confusion)
from semask.errors import UsageError, UsageTypeError


def _random_set(seed: int, n: int = 6, k: int = 7, shape: tuple[int, int] = (19, 23), ignore_share: float = 0.1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=(n, *shape))
    preds = np.where(rng.random((n, *shape)) < 0.6, labels, rng.integers(0, k, size=(n, *shape)))
    labels[rng.random((n, *shape)) < ignore_share] = 255
    return preds, labels


def _numpy_reference(preds: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """docs/recipes.md §6 written out with numpy loops over classes."""
    valid = labels != 255
    p, lab = preds[valid], labels[valid]
    iou, acc = np.full(k, np.nan), np.full(k, np.nan)
    for c in range(k):
        inter = np.sum((p == c) & (lab == c))
        union = np.sum((p == c) | (lab == c))
        if union:
            iou[c] = inter / union
        if np.sum(lab == c):
            acc[c] = inter / np.sum(lab == c)
    return {"aAcc": np.mean(p == lab), "IoU": iou, "Acc": acc}


def test_hand_worked_example_with_undefined_classes():
    # Class 2 is predicted once but never labelled: IoU 0, Acc undefined. Class 3 appears nowhere: both undefined.
    # The ignored pixel (255) is predicted as 3 and must not count.
    pred = np.array([[0, 0, 1], [1, 2, 3]])
    label = np.array([[0, 1, 1], [1, 0, 255]])
    result = mean_iou(pred, label, num_classes=4)
    np.testing.assert_allclose(result["IoU"][:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(result["IoU"][3])
    np.testing.assert_allclose(result["Acc"][:2], [1 / 2, 2 / 3])
    assert math.isnan(result["Acc"][2]) and math.isnan(result["Acc"][3])
    assert result["aAcc"] == pytest.approx(3 / 5)
    assert result["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)  # mean over the three defined classes
    assert result["mAcc"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_matches_a_direct_numpy_implementation():
    preds, labels = _random_set(0)
    result = mean_iou(list(preds), list(labels), num_classes=7)
    ref = _numpy_reference(preds, labels, 7)
    np.testing.assert_allclose(result["IoU"], ref["IoU"])
    np.testing.assert_allclose(result["Acc"], ref["Acc"])
    assert result["aAcc"] == pytest.approx(ref["aAcc"])
    assert result["mIoU"] == pytest.approx(np.nanmean(ref["IoU"]))


def test_cross_check_with_segmentation_models_pytorch():
    """smp's 'macro' (per-class over the summed stats, then the class mean) is mmseg's mIoU / mAcc; aAcc is
    the micro recall."""
    preds, labels = _random_set(1, k=5)
    tp, fp, fn, tn = smp.metrics.get_stats(torch.from_numpy(preds), torch.from_numpy(labels), mode="multiclass",
                                           num_classes=5, ignore_index=255)
    ours = mean_iou(preds, labels, num_classes=5)
    assert ours["mIoU"] == pytest.approx(smp.metrics.iou_score(tp, fp, fn, tn, reduction="macro").item())
    assert ours["mAcc"] == pytest.approx(smp.metrics.recall(tp, fp, fn, tn, reduction="macro").item())
    assert ours["aAcc"] == pytest.approx(smp.metrics.recall(tp, fp, fn, tn, reduction="micro").item())
    per_class = smp.metrics.iou_score(tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0), reduction="none")
    np.testing.assert_allclose(ours["IoU"], per_class.numpy(), rtol=1e-6)


def test_undefined_classes_are_nan_where_smp_divides_zero_by_zero():
    preds, labels = _random_set(2, k=4)
    preds[preds == 3], labels[labels == 3] = 0, 0  # class 3 absent everywhere
    tp, fp, fn, tn = smp.metrics.get_stats(torch.from_numpy(preds), torch.from_numpy(labels), mode="multiclass",
                                           num_classes=4, ignore_index=255)
    ours = mean_iou(preds, labels, num_classes=4)
    empty = ((tp + fp + fn).sum(0) == 0).numpy()
    assert empty.tolist() == [False, False, False, True]
    np.testing.assert_array_equal(np.isnan(ours["IoU"]), empty)
    assert ours["mIoU"] == pytest.approx(np.mean(ours["IoU"][:3]))


def test_streaming_equals_one_shot_and_reset_forgets():
    preds, labels = _random_set(3, n=8)
    metric = SegmentationMetric(7)
    metric.update(torch.from_numpy(preds[:3]), torch.from_numpy(labels[:3]))  # a batch
    for p, lab in zip(preds[3:], labels[3:]):
        metric.update(p, lab)  # single maps, numpy
    streamed = metric.compute()
    one_shot = mean_iou(preds, labels, 7)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert streamed[key] == one_shot[key]
    assert metric.areas.dtype == torch.int64 and metric.areas.shape == (4, 7)
    metric.reset()
    assert metric.areas.sum() == 0 and math.isnan(metric.compute()["aAcc"])


def test_memory_does_not_grow_and_counts_stay_exact_beyond_float32():
    metric = SegmentationMetric(3)
    metric.areas[:, 0] = 2**40  # as if a huge split had been accumulated already
    for _ in range(50):
        metric.update(torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long))
    assert metric.areas.numel() == 12  # four (K,) vectors whatever the number of images
    assert metric.areas[0, 0].item() == 2**40 + 50 * 64  # exact (float32 accumulation would have lost it)
    assert metric.areas[3, 0].item() == 2**40 + 50 * 64


def test_rejects_bad_inputs_with_clear_messages():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="differs from label shape"):
        metric.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match=r"prediction values \[5\] are outside 0..2"):
        metric.update(np.full((2, 2), 5), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        metric.update(np.zeros((2, 2), int), np.full((2, 2), 7))
    with pytest.raises(TypeError, match="argmax"):
        metric.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    with pytest.raises(UsageTypeError):
        confusion_matrix(np.zeros((2, 2), bool), np.zeros((2, 2), int), 3)
    with pytest.raises(UsageError, match=r"label values \[7\] are outside 0..2"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 7), 3)
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        mean_iou([np.zeros((2, 2), int)] * 2, [np.zeros((2, 2), int)], 3)


def test_format_table_lists_every_class_and_the_summary():
    result = mean_iou(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [255, 0]]), 3)
    table = format_table(result, ["wall", "building", "sky"])
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 1
    assert lines[2].split("|")[1].strip() == "wall" and lines[2].split("|")[2].strip() == "50.00"
    assert lines[3].split("|")[3].strip() == "100.00" and lines[4].split("|")[2].strip() == "nan"
    assert lines[-1] == "Summary: aAcc 66.67  mIoU 50.00  mAcc 75.00"
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        format_table(result, ["a", "b"])


# --------------------------------------------------------------------------------------------- distributed
def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        preds, labels = _random_set(4, n=10)
        metric = SegmentationMetric(7)
        for i in range(rank, len(preds), world_size):  # each process sees its own shard
            metric.update(preds[i], labels[i])
        local = metric.areas.clone()
        merged = metric.all_reduced()
        again = metric.compute(sync=True)  # a second collective must not double-count
        torch.save({"local": local, "after": metric.areas.clone(), "merged": merged.areas,
                    "again_miou": again["mIoU"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_merges_two_real_gloo_processes(tmp_path: Path):
    world_size = 2
    mp.spawn(_distributed_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size,
             join=True)
    preds, labels = _random_set(4, n=10)
    single = SegmentationMetric(7)
    single.update(preds, labels)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    assert not torch.equal(results[0]["local"], results[1]["local"])  # the shards really differ
    assert torch.equal(results[0]["local"] + results[1]["local"], single.areas)
    for res in results:
        assert torch.equal(res["merged"], single.areas)  # every process gets the global totals
        assert torch.equal(res["after"], res["local"])  # the local accumulator is left unchanged
        assert res["again_miou"] == single.compute()["mIoU"]


def test_areas_are_read_off_the_confusion_matrix():
    preds, labels = _random_set(3)
    confusion = confusion_matrix(preds, labels, 7)
    assert confusion.dtype == torch.int64 and confusion.shape == (7, 7)
    valid = labels != 255
    expected = np.zeros((7, 7), np.int64)
    np.add.at(expected, (labels[valid], preds[valid]), 1)
    assert np.array_equal(confusion.numpy(), expected)
    intersect, union, pred_area, label_area = areas_from_confusion(confusion).numpy()
    p, lab = preds[valid], labels[valid]
    for k in range(7):
        assert intersect[k] == ((p == k) & (lab == k)).sum() and pred_area[k] == (p == k).sum()
        assert label_area[k] == (lab == k).sum() and union[k] == ((p == k) | (lab == k)).sum()
    metric = SegmentationMetric(7)
    metric.update(preds, labels)
    assert torch.equal(metric.areas, areas_from_confusion(confusion))
    via_confusion, one_shot = metrics_from_confusion(confusion), mean_iou(preds, labels, 7)
    assert all(via_confusion[key] == one_shot[key] for key in ("aAcc", "mIoU", "mAcc"))
    assert np.array_equal(via_confusion["IoU"], one_shot["IoU"], equal_nan=True)
