"""Tests of semask.data.convert on small files written in the real download formats (PNG, MATLAB .mat)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from semask.apps.cli import main
from semask.data import COCOStuff10k, Cityscapes, DatasetError
from semask.data import convert

# The official Cityscapes label table (docs/recipes.md §5), written out independently of the module under test.
OFFICIAL_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _cityscapes_download(root: Path) -> list[Path]:
    label_ids = np.arange(40, dtype=np.uint8).reshape(5, 8)  # every labelId 0..33 and a few beyond
    written = []
    for split, city in (("train", "aachen"), ("train", "zurich"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        image_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        label_path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(image_path)
        Image.fromarray(label_ids).save(label_path)
        written.append(label_path)
    return written


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    sources = _cityscapes_download(tmp_path)
    assert convert.convert_cityscapes(tmp_path) == 3
    for src in sources:
        target = src.with_name(src.name.replace("_labelIds.png", "_labelTrainIds.png"))
        out = np.asarray(Image.open(target))
        expected = [OFFICIAL_TRAIN_IDS.get(i, 255) for i in range(40)]
        assert out.ravel().tolist() == expected
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave nothing behind
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 2 and set(np.unique(ds[0]["label"]).tolist()) == set(range(19)) | {255}


def test_cityscapes_existing_outputs_are_kept_unless_overwrite(tmp_path):
    _cityscapes_download(tmp_path)
    assert convert.convert_cityscapes(tmp_path, num_workers=1) == 3
    assert convert.convert_cityscapes(tmp_path) == 0
    assert convert.convert_cityscapes(tmp_path, overwrite=True) == 3


def test_cityscapes_missing_folder_shows_the_download_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gtFine does not exist(.|\n)*_gtFine_labelIds.png"):
        convert.convert_cityscapes(tmp_path)
    (tmp_path / "gtFine").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*_gtFine_labelIds.png"):
        convert.convert_cityscapes(tmp_path)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    sources = _cityscapes_download(tmp_path)

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert.convert_cityscapes(tmp_path, num_workers=1)
    assert not list(tmp_path.rglob("*labelTrainIds*")) and not list(tmp_path.rglob("*.tmp*"))
    assert all(s.exists() for s in sources)


# --------------------------------------------------------------------------------------------- COCO-Stuff 10k
COCO_IDS = np.array([[0, 1, 11, 12, 13], [90, 91, 92, 181, 182]], dtype=np.uint8)
# Thing ids 1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 -> 1..80; 92..182 -> 81..171; others 0.
COCO_EXPECTED = [[0, 1, 11, 0, 12], [80, 0, 81, 170, 171]]


def _coco_download(root: Path, names: dict[str, list[str]], size: tuple[int, int] = (2, 5)) -> None:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "imageLists").mkdir()
    for split, split_names in names.items():
        (root / "imageLists" / f"{split}.txt").write_text("".join(f"{n}\n" for n in split_names))
        for i, name in enumerate(split_names):
            Image.fromarray(np.full((*size, 3), 10 * i, np.uint8)).save(root / "images" / f"{name}.jpg")
            scipy.io.savemat(root / "annotations" / f"{name}.mat", {"S": COCO_IDS.astype(np.uint16),
                                                                      "names": np.array(["x"], dtype=object)})


def test_coco_stuff10k_is_arranged_with_171_class_ids(tmp_path):
    names = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
             "test": ["COCO_train2014_000000000079"]}
    _coco_download(tmp_path, names)
    assert convert.convert_coco_stuff10k(tmp_path) == 3
    for split, folder in (("train", "train2014"), ("test", "test2014")):
        for name in names[split]:
            label = np.asarray(Image.open(tmp_path / "annotations" / folder / f"{name}_labelTrainIds.png"))
            assert label.tolist() == COCO_EXPECTED
            copied = tmp_path / "images" / folder / f"{name}.jpg"
            assert copied.read_bytes() == (tmp_path / "images" / f"{name}.jpg").read_bytes()
    ds = COCOStuff10k(tmp_path, "train")
    assert len(ds) == 2
    assert ds[0]["label"].tolist() == [[255, 0, 10, 255, 11], [79, 255, 80, 169, 170]]
    assert convert.convert_coco_stuff10k(tmp_path) == 0  # kept
    assert not list(tmp_path.rglob("*.tmp*"))


def test_coco_lookup_table_covers_171_classes():
    lut = convert.coco_stuff10k_lut()
    assert sorted(set(lut.tolist())) == list(range(172))  # 0 plus 1..171
    assert lut[91] == 0 and all(lut[i] == 0 for i in convert.COCO_STUFF_UNUSED_THING_IDS)


def test_coco_missing_and_broken_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing .*imageLists(.|\n)*Expected layout"):
        convert.convert_coco_stuff10k(tmp_path)
    _coco_download(tmp_path, {"train": ["a", "b"], "test": ["c"]})
    (tmp_path / "annotations" / "b.mat").unlink()
    with pytest.raises(DatasetError, match=r"train.txt names 1 file\(s\) missing .*b.mat"):
        convert.convert_coco_stuff10k(tmp_path)
    scipy.io.savemat(tmp_path / "annotations" / "b.mat", {"L": COCO_IDS})
    with pytest.raises(DatasetError, match=r"b.mat has no array 'S'.*\['L'\]"):
        convert.convert_coco_stuff10k(tmp_path, num_workers=1)
    scipy.io.savemat(tmp_path / "annotations" / "b.mat", {"S": np.zeros((3, 5), np.uint8)})
    with pytest.raises(DatasetError, match=r"b.mat is 5x3 \(WxH\) but its image .*b.jpg is 5x2"):
        convert.convert_coco_stuff10k(tmp_path, num_workers=1)
    (tmp_path / "annotations" / "b.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(DatasetError, match="b.mat cannot be read"):
        convert.convert_coco_stuff10k(tmp_path, num_workers=1)


# --------------------------------------------------------------------------------------------- command line
def test_convert_command_line(tmp_path, capsys):
    _cityscapes_download(tmp_path / "city")
    assert main(["convert", "cityscapes", str(tmp_path / "city")]) == 0
    assert "wrote 3 label files" in capsys.readouterr().out
    _coco_download(tmp_path / "coco", {"train": ["a"], "test": ["b"]})
    assert main(["convert", "coco-stuff10k", str(tmp_path / "coco")]) == 0
    assert (tmp_path / "coco" / "annotations" / "test2014" / "b_labelTrainIds.png").is_file()
    assert main(["convert", "cityscapes", str(tmp_path / "nothing")]) == 2
    assert "Expected layout" in capsys.readouterr().err


def test_coco_conversion_without_scipy_names_the_convert_extra(tmp_path, monkeypatch, capsys):
    """scipy is the optional `convert` extra: without it the converter says what to install, before any work."""
    import sys

    from semask.errors import MissingPackageError, UsageError

    _coco_download(tmp_path, {"train": ["a"], "test": ["b"]})
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy.io` now fails as if scipy were absent
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(MissingPackageError, match=r"scipy.*pip install 'semask\[convert\]'") as info:
        convert.convert_coco_stuff10k(tmp_path)
    assert isinstance(info.value, UsageError) and isinstance(info.value, ImportError)
    assert not (tmp_path / "images" / "train2014").exists()  # nothing was written
    assert main(["convert", "coco-stuff10k", str(tmp_path)]) == 2
    assert "semask[convert]" in capsys.readouterr().err
    _cityscapes_download(tmp_path / "city")
    assert convert.convert_cityscapes(tmp_path / "city") == 3
