"""Segmentation datasets of SeMask (arXiv 2112.12782): ADE20K, Cityscapes, COCO-Stuff 10k and plain folders.

Every dataset is a list of (image, label) file pairs, fixed when the dataset is built by
:func:`semask.data.pairing.pair_files`: building it fails with an error naming the files when an image has no
label or a label has no image, or an image file would be left out, and names every other file of the folders
that is not used in a :class:`DatasetWarning` (suffixes match case-insensitively). Reading a sample checks the
files themselves: an unreadable or truncated file, a label whose size differs from its image, or label values
outside ``0 .. num_classes - 1`` (255 = ignore allowed) raise :class:`DatasetError` naming the file. Nothing is
skipped silently.

Without a transform ``ds[i]`` is ``{"image": (H, W, 3) uint8 RGB, "label": (H, W) int64, "path": str,
"label_path": str}``, the label after the dataset's mapping (``reduce_zero_label``: 0 -> 255, k -> k - 1).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from semask.data.classes import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE,
                                 COCO_STUFF_CLASSES, COCO_STUFF_PALETTE, default_palette)
from semask.errors import ImageError, LimitError, UnknownNameError, UsageError
from semask.data.images import open_image, pil_to_rgb
from semask.data.pairing import DatasetError, DatasetWarning, pair_files, preview_list

__all__ = [
    "IGNORE_INDEX",
    "DatasetError",
    "DatasetWarning",
    "read_image",
    "read_label",
    "pair_files",
    "preview_list",
    "resolve_split",
    "split_dirs",
    "default_palette",
    "SegmentationDataset",
    "FolderDataset",
    "ADE20K",
    "Cityscapes",
    "COCOStuff10k",
    "ADE20K_LAYOUT",
    "CITYSCAPES_LAYOUT",
    "COCO_STUFF10K_LAYOUT",
]

IGNORE_INDEX = 255  # label value of unlabelled pixels in every dataset
Transform = Callable[[dict[str, Any]], dict[str, Any]]
_REDUCE_ZERO_LUT = np.concatenate([[IGNORE_INDEX], np.arange(254), [IGNORE_INDEX]]).astype(np.int64)  # 0->255, k->k-1

ADE20K_LAYOUT = """\
ADEChallengeData2016/               <- root (or its parent)
|-- images/
|   |-- training/      ADE_train_00000001.jpg ...
|   `-- validation/    ADE_val_00000001.jpg ...
`-- annotations/
    |-- training/      ADE_train_00000001.png ...  (0 = unlabelled, 1..150 = classes)
    `-- validation/    ADE_val_00000001.png ..."""

CITYSCAPES_LAYOUT = """\
cityscapes/                         <- root
|-- leftImg8bit/
|   |-- train/<city>/  <city>_000000_000019_leftImg8bit.png ...
|   `-- val/<city>/
`-- gtFine/
    |-- train/<city>/  <city>_000000_000019_gtFine_labelTrainIds.png ...  (0..18, 255 = ignore)
    `-- val/<city>/
(make the *_labelTrainIds.png files from *_labelIds.png with `semask convert cityscapes ROOT`)"""

COCO_STUFF10K_LAYOUT = """\
coco_stuff10k/                      <- root
|-- images/
|   |-- train2014/     COCO_train2014_000000000077.jpg ...
|   `-- test2014/
`-- annotations/
    |-- train2014/     COCO_train2014_000000000077_labelTrainIds.png ...  (0 = unlabelled, 1..171)
    `-- test2014/
(make this layout from the downloaded .mat files with `semask convert coco-stuff10k ROOT`)"""


# --------------------------------------------------------------------------------------------- file reading
def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image file (size-checked first), every failure a :class:`DatasetError`."""
    try:
        return open_image(path, name=f"{what} file {path}")
    except FileNotFoundError as exc:
        raise DatasetError(f"{what} file {path} does not exist (it was listed when the dataset was built)") from exc
    except IsADirectoryError as exc:
        raise DatasetError(f"{what} file {path} is a folder") from exc
    except (ImageError, LimitError) as exc:
        raise DatasetError(str(exc)) from exc


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB by the rules of :mod:`semask.data.images`.

    EXIF orientation is not applied: label maps have none, so the stored pixel grid is what they align with.

    Args:
        path: any format PIL reads; every 8-bit mode is converted by PIL, 16-bit images are scaled to 8 bits,
            float images must hold 0..1 values; files above ``PIL.Image.MAX_IMAGE_PIXELS`` are refused.

    Returns:
        ``(H, W, 3)`` uint8 array.
    """
    with _open(Path(path), "image") as img:
        try:
            return pil_to_rgb(img, f"image file {path}")
        except (ImageError, LimitError) as exc:
            raise DatasetError(str(exc)) from exc


def read_label(path: str | Path) -> np.ndarray:
    """Read a label map (class ids as pixel values).

    Args:
        path: a single-channel image (PNG modes ``L``, ``P`` -- the palette indices are the ids -- ``I;16``
            or ``I``).

    Returns:
        ``(H, W)`` integer array (uint8 for 8-bit files).
    """
    with _open(Path(path), "label") as img:
        if img.mode in ("L", "P"):
            return np.array(img)  # a writable copy
        if img.mode.startswith("I"):
            return np.asarray(img).astype(np.int64)
        mode = img.mode
    raise DatasetError(f"label file {path} has image mode {mode!r}; expected a single-channel label map "
                       f"(modes L, P, I;16 or I) whose pixel values are class ids")


# --------------------------------------------------------------------------------------------- datasets
class SegmentationDataset(torch.utils.data.Dataset):
    """A fixed list of (image, label) files with the label rules of one dataset.

    Args:
        pairs: ``(image_path, label_path)`` pairs.
        class_names: one name per class; ``num_classes = len(class_names)``.
        palette: one ``[r, g, b]`` per class (a reproducible one is made when None).
        reduce_zero_label: map label 0 to 255 (ignore) and k to k - 1, as ADE20K and COCO-Stuff 10k need.
        transform: callable applied to the sample dict (e.g. :class:`semask.data.TrainTransform`).
        name: shown in ``repr``.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(self, pairs: Sequence[tuple[str | Path, str | Path]], class_names: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None, reduce_zero_label: bool = False,
                 transform: Transform | None = None, name: str | None = None) -> None:
        if not class_names:
            raise UsageError("SegmentationDataset: class_names is empty; give one name per class")
        if palette is not None and len(palette) != len(class_names):
            raise UsageError(f"SegmentationDataset: palette has {len(palette)} colours for {len(class_names)} "
                             "classes; give one [r, g, b] per class")
        self.pairs = [(Path(i), Path(lab)) for i, lab in pairs]
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.palette: list[list[int]] = ([list(map(int, c)) for c in palette] if palette is not None
                                         else default_palette(len(class_names)))
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self.name = name or type(self).__name__

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (f"{self.name}({len(self)} samples, {self.num_classes} classes, "
                f"reduce_zero_label={self.reduce_zero_label})")

    def map_label(self, raw: np.ndarray, label_path: Path | str = "<array>") -> np.ndarray:
        """Apply the dataset's label rule to a raw label map and check its values.

        Args:
            raw: ``(H, W)`` class ids as stored in the file.
            label_path: named in the error message.

        Returns:
            ``(H, W)`` int64 with values in ``0 .. num_classes - 1`` or 255.
        """
        first = 1 if self.reduce_zero_label else 0  # stored id of class 0
        last = self.num_classes - 1 + first  # stored id of the last class
        if raw.size and (raw.min() < 0 or raw.max() > last):
            bad = (raw < 0) | ((raw > last) & (raw != self.ignore_index))
            if bad.any():
                stored = np.unique(raw[bad]).tolist()
                raise DatasetError(
                    f"label file {label_path} has values outside the class range of {self.name}: stored values "
                    f"{preview_list([str(v) for v in stored])} on {int(bad.sum())} pixels; expected {first}..{last} "
                    f"for {self.num_classes} classes"
                    + (" (0 = unlabelled, k -> class k - 1)" if self.reduce_zero_label else "")
                    + f", or {self.ignore_index} (ignore)")
        if not self.reduce_zero_label:
            return raw.astype(np.int64)
        if raw.dtype == np.uint8:
            return _REDUCE_ZERO_LUT[raw]
        label = raw.astype(np.int64) - 1
        label[(raw == 0) | (raw == self.ignore_index)] = self.ignore_index
        return label

    def pixel_counts(self) -> np.ndarray:
        """How many labelled pixels each class has over the whole split (label files only, after the label rule).

        Returns:
            ``(num_classes,)`` int64 counts (ignored pixels not counted); e.g. for
            `semask.engine.losses.balanced_class_weights`.
        """
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for _, label_path in self.pairs:
            label = self.map_label(read_label(label_path), label_path)
            counts += np.bincount(label[label != self.ignore_index].ravel(), minlength=self.num_classes)
        return counts

    def load(self, index: int) -> dict[str, Any]:
        """The checked sample ``index`` without the transform."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_label(label_path)
        if raw.shape != image.shape[:2]:
            raise DatasetError(f"label file {label_path} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                               f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must be the same size")
        return {"image": image, "label": self.map_label(raw, label_path), "path": str(image_path),
                "label_path": str(label_path)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample


class FolderDataset(SegmentationDataset):
    """Images and labels in two folders, paired by relative name (mmseg's ``CustomDataset``).

    Args:
        img_dir: image folder (searched recursively).
        ann_dir: label folder, same relative names as the images.
        class_names: one name per class.
        palette: one ``[r, g, b]`` per class (a reproducible one when None).
        img_suffix: how image file names end.
        seg_map_suffix: how label file names end.
        reduce_zero_label: 0 -> 255 (ignore), k -> k - 1.
        transform: applied to each sample dict.
    """

    def __init__(self, img_dir: str | Path, ann_dir: str | Path, class_names: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None, img_suffix: str = ".jpg",
                 seg_map_suffix: str = ".png", reduce_zero_label: bool = False,
                 transform: Transform | None = None) -> None:
        super().__init__(pair_files(img_dir, ann_dir, img_suffix, seg_map_suffix), class_names, palette,
                         reduce_zero_label, transform)
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)


def split_dirs(dataset: str, root: Path, layout: str, split: str, folder: str,
                sub_dirs: tuple[str, str]) -> tuple[Path, Path]:
    """The image and label folders of ``split``, or a FileNotFoundError that shows the expected layout."""
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root {root} does not exist. Expected layout:\n{layout}")
    img_dir, ann_dir = root / sub_dirs[0] / folder, root / sub_dirs[1] / folder
    missing = [str(d) for d in (img_dir, ann_dir) if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"{dataset} split {split!r}: missing {', '.join(missing)}. Expected layout:\n"
                                f"{layout}")
    return img_dir, ann_dir


def resolve_split(dataset: str, split: str, aliases: dict[str, str]) -> str:
    """The folder name of ``split`` (``aliases`` maps accepted names to folders), or an error listing them."""
    if split not in aliases:
        raise UnknownNameError(f"{dataset}: unknown split {split!r}; valid splits: {', '.join(aliases)}")
    return aliases[split]


class ADE20K(SegmentationDataset):
    """ADE20K (SceneParsing, 150 classes), ``reduce_zero_label`` on.

    Args:
        root: the ``ADEChallengeData2016`` folder, or the folder that contains it.
        split: ``"training"``/``"train"`` or ``"validation"``/``"val"``.
        transform: applied to each sample dict.
    """

    SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}

    def __init__(self, root: str | Path, split: str = "training", transform: Transform | None = None) -> None:
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        folder = resolve_split("ADE20K", split, self.SPLITS)
        img_dir, ann_dir = split_dirs("ADE20K", root, ADE20K_LAYOUT, split, folder, ("images", "annotations"))
        super().__init__(pair_files(img_dir, ann_dir, ".jpg", ".png"), ADE20K_CLASSES, ADE20K_PALETTE,
                         reduce_zero_label=True, transform=transform, name=f"ADE20K[{folder}]")
        self.root, self.split = root, folder


# the other files of each image in Cityscapes' gtFine/ (the download's own), expected beside the train-id labels
CITYSCAPES_COMPANIONS = ("_gtFine_color.png", "_gtFine_instanceIds.png", "_gtFine_labelIds.png",
                         "_gtFine_polygons.json")


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations (19 train ids, 255 ignore), read from ``*_gtFine_labelTrainIds.png``.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to each sample dict.
    """

    SPLITS = {"train": "train", "val": "val", "test": "test"}

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        root = Path(root)
        folder = resolve_split("Cityscapes", split, self.SPLITS)
        img_dir, ann_dir = split_dirs("Cityscapes", root, CITYSCAPES_LAYOUT, split, folder,
                                       ("leftImg8bit", "gtFine"))
        if not any(ann_dir.rglob("*_gtFine_labelTrainIds.png")) and any(ann_dir.rglob("*_gtFine_labelIds.png")):
            raise DatasetError(f"Cityscapes split {split!r}: {ann_dir} holds *_gtFine_labelIds.png but no "
                               f"*_gtFine_labelTrainIds.png; run `semask convert cityscapes {root}` first")
        super().__init__(pair_files(img_dir, ann_dir, "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                                    expected=CITYSCAPES_COMPANIONS),
                         CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, reduce_zero_label=False, transform=transform,
                         name=f"Cityscapes[{folder}]")
        self.root, self.split = root, folder


class COCOStuff10k(SegmentationDataset):
    """COCO-Stuff 10k (171 classes) after ``semask convert coco-stuff10k``, ``reduce_zero_label`` on.

    Args:
        root: the folder holding ``images/{train2014,test2014}`` and ``annotations/{train2014,test2014}``.
        split: ``"train"``/``"train2014"`` or ``"test"``/``"test2014"``.
        transform: applied to each sample dict.
    """

    SPLITS = {"train": "train2014", "train2014": "train2014", "test": "test2014", "test2014": "test2014"}

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        root = Path(root)
        folder = resolve_split("COCOStuff10k", split, self.SPLITS)
        if root.is_dir() and not (root / "annotations" / folder).is_dir() and (root / "imageLists").is_dir():
            raise FileNotFoundError(f"COCOStuff10k: {root} looks like the download (imageLists/, .mat files) but "
                                    f"has no annotations/{folder}; run `semask convert coco-stuff10k {root}` first")
        img_dir, ann_dir = split_dirs("COCOStuff10k", root, COCO_STUFF10K_LAYOUT, split, folder,
                                       ("images", "annotations"))
        super().__init__(pair_files(img_dir, ann_dir, ".jpg", "_labelTrainIds.png"), COCO_STUFF_CLASSES,
                         COCO_STUFF_PALETTE, reduce_zero_label=True, transform=transform,
                         name=f"COCOStuff10k[{folder}]")
        self.root, self.split = root, folder
