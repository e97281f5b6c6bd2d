"""Tests of semask.data.datasets on small real files in the standard layouts, bad data included."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semask.data import (ADE20K, ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, COCO_STUFF_CLASSES,
                         COCO_STUFF_PALETTE, COCOStuff10k, Cityscapes, DatasetError, FolderDataset, TrainTransform,
                         train_preset)
from semask.data.datasets import read_image, read_label


def _write_pair(image_path: Path, label_path: Path, label: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(*label.shape, 3), dtype=np.uint8)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path)
    Image.fromarray(label.astype(np.uint8)).save(label_path)
    return image


def _ade_tree(root: Path, n: int = 3, size: tuple[int, int] = (12, 17)) -> Path:
    base = root / "ADEChallengeData2016"
    for split, stem in (("training", "ADE_train"), ("validation", "ADE_val")):
        for i in range(n):
            label = np.arange(size[0] * size[1]).reshape(size) % 152  # stored 0..151 -> make it valid below
            label[label == 151] = 150
            _write_pair(base / "images" / split / f"{stem}_{i:08d}.jpg",
                        base / "annotations" / split / f"{stem}_{i:08d}.png", label, seed=i)
    return base


# --------------------------------------------------------------------------------------------- ADE20K
def test_ade20k_sample_contract_and_reduce_zero_label(tmp_path):
    base = _ade_tree(tmp_path)
    ds = ADE20K(base, split="validation")
    assert len(ds) == 3 and ds.num_classes == 150 and ds.ignore_index == 255
    assert ds.class_names == ADE20K_CLASSES and ds.palette[0] == list(ADE20K_PALETTE[0]) == [120, 120, 120]
    sample = ds[1]
    assert set(sample) == {"image", "label", "path", "label_path"}
    assert sample["image"].shape == (12, 17, 3) and sample["image"].dtype == np.uint8
    assert sample["label"].shape == (12, 17) and sample["label"].dtype == np.int64
    assert sample["path"].endswith("ADE_val_00000001.jpg") and sample["label_path"].endswith("ADE_val_00000001.png")
    stored = np.asarray(Image.open(sample["label_path"]))
    expected = np.where(stored == 0, 255, stored.astype(np.int64) - 1)  # 0 -> ignore, k -> k - 1
    np.testing.assert_array_equal(sample["label"], expected)
    assert sample["label"].max() == 255 and set(np.unique(sample["label"])) - {255} <= set(range(150))


def test_ade20k_accepts_the_parent_folder_and_split_aliases(tmp_path):
    _ade_tree(tmp_path)
    assert len(ADE20K(tmp_path, split="train")) == 3 and ADE20K(tmp_path, "val").split == "validation"
    with pytest.raises(ValueError, match="unknown split 'testing'.*training"):
        ADE20K(tmp_path, split="testing")


def test_missing_root_shows_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ADE20K(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere does not exist" in message and "Expected layout" in message
    assert "images/" in message and "annotations/" in message and "validation/" in message


def test_missing_split_names_the_missing_folder(tmp_path):
    base = _ade_tree(tmp_path)
    for path in sorted((base / "annotations" / "validation").iterdir()):
        path.unlink()
    (base / "annotations" / "validation").rmdir()
    with pytest.raises(FileNotFoundError, match=r"missing .*annotations/validation(.|\n)*Expected layout"):
        ADE20K(base, split="validation")


def test_image_without_label_and_label_without_image_are_named(tmp_path):
    base = _ade_tree(tmp_path)
    (base / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) .* have no label .*ADE_train_00000002.jpg"):
        ADE20K(base, "training")
    (base / "images" / "validation" / "ADE_val_00000000.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 label\(s\) .* have no image .*ADE_val_00000000.png"):
        ADE20K(base, "validation")


def test_truncated_and_garbage_files_raise_naming_the_file(tmp_path):
    base = _ade_tree(tmp_path, size=(64, 80))
    image = base / "images" / "training" / "ADE_train_00000000.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # a truncated JPEG
    ds = ADE20K(base, "training")
    with pytest.raises(DatasetError, match=r"image file .*ADE_train_00000000.jpg cannot be read.*truncated"):
        ds[0]
    label = base / "annotations" / "training" / "ADE_train_00000001.png"
    data = label.read_bytes()
    label.write_bytes(data[: len(data) - 40])  # a truncated PNG
    with pytest.raises(DatasetError, match=r"label file .*ADE_train_00000001.png cannot be read"):
        ds[1]
    (base / "images" / "training" / "ADE_train_00000002.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"ADE_train_00000002.jpg cannot be read"):
        ds[2]


def test_label_of_another_size_is_an_error(tmp_path):
    base = _ade_tree(tmp_path)
    Image.fromarray(np.ones((12, 16), np.uint8)).save(base / "annotations" / "training" / "ADE_train_00000001.png")
    with pytest.raises(DatasetError, match=r"ADE_train_00000001.png is 16x12 \(WxH\) but its image .* is 17x12"):
        ADE20K(base, "training")[1]


def test_label_values_outside_the_class_range_are_an_error(tmp_path):
    base = _ade_tree(tmp_path)
    label = np.ones((12, 17), np.uint8)
    label[0, :3] = [151, 200, 255]  # 151 and 200 are invalid; 255 stays ignore
    Image.fromarray(label).save(base / "annotations" / "training" / "ADE_train_00000000.png")
    with pytest.raises(DatasetError, match=r"ADE_train_00000000.png has values outside .*151, 200 on 2 pixels; "
                                           r"expected 1..150"):
        ADE20K(base, "training")[0]


def test_rgb_label_files_are_rejected(tmp_path):
    base = _ade_tree(tmp_path)
    Image.fromarray(np.zeros((12, 17, 3), np.uint8)).save(base / "annotations" / "training" / "ADE_train_00000000.png")
    with pytest.raises(DatasetError, match="mode 'RGB'; expected a single-channel label map"):
        ADE20K(base, "training")[0]


def test_grey_images_become_rgb_and_16_bit_labels_are_read(tmp_path):
    Image.fromarray(np.full((5, 6), 77, np.uint8)).save(tmp_path / "grey.jpg")
    image = read_image(tmp_path / "grey.jpg")
    assert image.shape == (5, 6, 3) and np.allclose(image, 77, atol=1)
    Image.fromarray(np.full((5, 6), 300, np.uint16)).save(tmp_path / "wide.png")
    assert read_label(tmp_path / "wide.png").max() == 300


def test_transform_is_applied(tmp_path):
    base = _ade_tree(tmp_path, size=(40, 50))
    ds = ADE20K(base, "training", transform=TrainTransform(train_preset("toy")))
    sample = ds[0]
    assert sample["image"].shape == (3, 128, 128) and sample["label"].dtype == torch.int64


# --------------------------------------------------------------------------------------------- Cityscapes
def _cityscapes_tree(root: Path, suffix: str = "_gtFine_labelTrainIds.png") -> Path:
    for split in ("train", "val"):
        for city, n in (("aachen", 2), ("bremen", 1)):
            for i in range(n):
                stem = f"{city}_{i:06d}_000019"
                label = np.full((8, 16), 255, np.uint8)
                label[:, :10] = np.arange(10) + i
                _write_pair(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                            root / "gtFine" / split / city / f"{stem}{suffix}", label)
    return root


def test_cityscapes_pairs_across_cities(tmp_path):
    ds = Cityscapes(_cityscapes_tree(tmp_path), split="val")
    assert len(ds) == 3 and ds.num_classes == 19 and ds.class_names == CITYSCAPES_CLASSES
    sample = ds[2]
    assert "bremen" in sample["path"] and sample["label_path"].endswith("bremen_000000_000019_gtFine_labelTrainIds.png")
    assert sample["label"][0, :10].tolist() == list(range(10)) and (sample["label"][:, 10:] == 255).all()


def test_cityscapes_without_train_ids_says_to_convert(tmp_path):
    _cityscapes_tree(tmp_path, suffix="_gtFine_labelIds.png")
    with pytest.raises(DatasetError, match="semask convert cityscapes"):
        Cityscapes(tmp_path, split="train")


def test_cityscapes_train_id_19_is_out_of_range(tmp_path):
    root = _cityscapes_tree(tmp_path)
    path = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((8, 16), 19, np.uint8)).save(path)
    with pytest.raises(DatasetError, match=r"values 19 on 128 pixels; expected 0..18 for 19 classes"):
        Cityscapes(root, "train")[0]


# --------------------------------------------------------------------------------------------- COCO-Stuff 10k
def test_coco_stuff10k_layout(tmp_path):
    for split in ("train2014", "test2014"):
        label = np.array([[0, 1, 171], [80, 81, 2]], np.uint8)
        _write_pair(tmp_path / "images" / split / f"COCO_{split}_000000000001.jpg",
                    tmp_path / "annotations" / split / f"COCO_{split}_000000000001_labelTrainIds.png", label)
    ds = COCOStuff10k(tmp_path, split="test")
    assert len(ds) == 1 and ds.num_classes == 171 and ds.class_names == COCO_STUFF_CLASSES
    assert len(ds.palette) == len(COCO_STUFF_PALETTE) == 171
    assert ds[0]["label"].tolist() == [[255, 0, 170], [79, 80, 1]]


def test_coco_stuff10k_download_layout_says_to_convert(tmp_path):
    (tmp_path / "imageLists").mkdir()
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="semask convert coco-stuff10k"):
        COCOStuff10k(tmp_path, "train")


# --------------------------------------------------------------------------------------------- folders
def test_folder_dataset_recursive_suffixes_and_default_palette(tmp_path):
    for sub in ("a", "b/c"):
        _write_pair(tmp_path / "img" / sub / "x_rgb.png", tmp_path / "ann" / sub / "x_mask.png",
                    np.array([[0, 1], [2, 255]]))
    ds = FolderDataset(tmp_path / "img", tmp_path / "ann", ["bg", "cat", "dog"], img_suffix="_rgb.png",
                       seg_map_suffix="_mask.png")
    assert len(ds) == 2 and len(ds.palette) == 3 and all(len(c) == 3 for c in ds.palette)
    assert ds[1]["label"].tolist() == [[0, 1], [2, 255]] and "b/c" in ds[1]["path"]
    with pytest.raises(ValueError, match="palette has 1 colours for 3 classes"):
        FolderDataset(tmp_path / "img", tmp_path / "ann", ["bg", "cat", "dog"], palette=[[0, 0, 0]],
                      img_suffix="_rgb.png", seg_map_suffix="_mask.png")
    with pytest.raises(DatasetError, match="no images ending in '.jpg'"):
        FolderDataset(tmp_path / "img", tmp_path / "ann", ["bg"])
    with pytest.raises(FileNotFoundError, match="label folder .*missing does not exist"):
        FolderDataset(tmp_path / "img", tmp_path / "missing", ["bg"])


def test_pixel_counts_follow_the_label_rule(tmp_path) -> None:
    from semask.data import ToyDataset, make_toy_dataset

    root = make_toy_dataset(tmp_path / "toy", num_train=3, num_val=1, size=64)
    ds = ToyDataset(root, "train")
    expected = np.zeros(11, dtype=np.int64)
    for i in range(len(ds)):
        label = ds.load(i)["label"]
        expected += np.bincount(label[label != 255], minlength=11)
    counts = ds.pixel_counts()
    assert counts.dtype == np.int64 and counts.tolist() == expected.tolist()
    from semask.data import read_label

    unlabelled = sum(int((read_label(lab) == 0).sum()) for _, lab in ds.pairs)  # stored 0 -> ignore
    assert counts.sum() == 3 * 64 * 64 - unlabelled
