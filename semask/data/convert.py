"""Converters from datasets as downloaded to the layouts semask reads (SeMask, arXiv 2112.12782, docs/recipes.md §5).

- Cityscapes: ``gtFine/**/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` beside them (the official
  19 train ids, 255 elsewhere).
- COCO-Stuff 10k: ``images/*.jpg``, ``annotations/*.mat`` (array ``S``, ids 0..182, 0 = unlabelled) and
  ``imageLists/{train,test}.txt`` -> ``images/{train2014,test2014}/<name>.jpg`` and
  ``annotations/{train2014,test2014}/<name>_labelTrainIds.png`` with the 171 classes numbered 1..171
  (0 = unlabelled, so ``reduce_zero_label`` gives 0..170).

Every output is written with :func:`semask.io.atomic_path` (a temporary file in the target folder, flushed
to disk, then renamed into place), so an interrupted run never leaves a half-written file under the final
name. Existing outputs are kept unless ``overwrite``. Before any file is converted, every output is checked
(`semask.io.check_output_files`): none may be one of the downloaded files, and every output folder must be
writable.

Reading the ``.mat`` annotations of COCO-Stuff 10k needs scipy, semask's optional ``convert`` extra
(``pip install 'semask[convert]'``); it is imported only by that converter.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from semask.data.datasets import DatasetError, preview_list, read_label
from semask.errors import MissingPackageError
from semask.io import atomic_path, check_output_files

__all__ = [
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "COCO_STUFF_UNUSED_THING_IDS",
    "cityscapes_lut",
    "coco_stuff10k_lut",
    "convert_cityscapes",
    "convert_coco_stuff10k",
    "CITYSCAPES_DOWNLOAD_LAYOUT",
    "COCO_STUFF10K_DOWNLOAD_LAYOUT",
]

# The official Cityscapes label table: labelId -> trainId for the 19 evaluated classes (255 for the rest).
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}
# COCO thing ids (1..90) that no annotation uses; with them (and 91) removed 171 classes remain.
COCO_STUFF_UNUSED_THING_IDS: tuple[int, ...] = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_STUFF_MAX_ID = 182

CITYSCAPES_DOWNLOAD_LAYOUT = """\
cityscapes/                         <- root
|-- leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png
`-- gtFine/{train,val,test}/<city>/*_gtFine_labelIds.png   (from gtFine_trainvaltest.zip)"""

CONVERT_EXTRA_HINT = "install semask's convert extra: pip install 'semask[convert]' (or pip install scipy)"

COCO_STUFF10K_DOWNLOAD_LAYOUT = """\
coco_stuff10k/                      <- root (cocostuff-10k-v1.1.zip unpacked)
|-- images/        COCO_train2014_000000000077.jpg ...
|-- annotations/   COCO_train2014_000000000077.mat ...   (array S, ids 0..182)
`-- imageLists/
    |-- train.txt  9000 names, one per line
    `-- test.txt   1000 names"""


# --------------------------------------------------------------------------------------------- id tables
def cityscapes_lut() -> np.ndarray:
    """``(256,)`` uint8 table labelId -> trainId (255 for ids without a train id)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


def coco_stuff10k_lut() -> np.ndarray:
    """``(183,)`` uint8 table COCO-Stuff id -> semask id: 0 stays 0, the 171 used ids become 1..171.

    Thing ids 1..90 minus the unused ones become 1..80 and stuff ids 92..182 become 81..171; the unused thing
    ids and 91 (never present in valid files) map to 0 = unlabelled.
    """
    lut = np.zeros(COCO_STUFF_MAX_ID + 1, dtype=np.uint8)
    used = [i for i in range(1, 91) if i not in COCO_STUFF_UNUSED_THING_IDS] + list(range(92, COCO_STUFF_MAX_ID + 1))
    lut[used] = np.arange(1, len(used) + 1)
    return lut


# --------------------------------------------------------------------------------------------- writing
def _save_png(array: np.ndarray, target: Path) -> None:
    with atomic_path(target) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _plan(what: str, targets: Sequence[Path], sources: Sequence[Path]) -> None:
    """Before any file is converted: no output is one of the downloaded files, and every output folder is
    writable (existing outputs are kept or, with ``overwrite``, replaced, as the converters document)."""
    check_output_files(targets, what, inputs=[("a downloaded file", s) for s in sources], probe=True)


def _run(jobs: Sequence[Callable[[], bool]], num_workers: int | None) -> int:
    """Run the jobs (PIL releases the GIL while coding images, so threads scale); returns how many wrote."""
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        return sum(job() for job in jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(lambda job: job(), jobs))


# --------------------------------------------------------------------------------------------- Cityscapes
def _cityscapes_target(src: Path) -> Path:
    return src.with_name(src.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))


def convert_cityscapes(root: str | Path, overwrite: bool = False, num_workers: int | None = None) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_labelIds.png`` under ``root/gtFine``.

    Args:
        root: the Cityscapes folder holding ``gtFine/``.
        overwrite: rewrite train-id files that already exist (otherwise they are kept).
        num_workers: threads (None: up to 8).

    Returns:
        The number of label files written.
    """
    gt_dir = Path(root) / "gtFine"
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"convert_cityscapes: {gt_dir} does not exist. Expected layout:\n"
                                f"{CITYSCAPES_DOWNLOAD_LAYOUT}")
    sources = sorted(gt_dir.rglob("*_gtFine_labelIds.png"))
    if not sources:
        raise FileNotFoundError(f"convert_cityscapes: no *_gtFine_labelIds.png under {gt_dir}. Expected layout:\n"
                                f"{CITYSCAPES_DOWNLOAD_LAYOUT}")
    lut = cityscapes_lut()
    _plan("convert_cityscapes: output", [_cityscapes_target(s) for s in sources], sources)

    def job(src: Path) -> Callable[[], bool]:
        def run() -> bool:
            target = _cityscapes_target(src)
            if target.exists() and not overwrite:
                return False
            label_ids = read_label(src)
            if label_ids.min() < 0 or label_ids.max() > 255:
                raise DatasetError(f"convert_cityscapes: {src} holds ids outside 0..255 "
                                   f"({label_ids.min()}..{label_ids.max()}); expected Cityscapes labelIds")
            _save_png(lut[label_ids], target)
            return True
        return run

    return _run([job(s) for s in sources], num_workers)


# --------------------------------------------------------------------------------------------- COCO-Stuff 10k
def _scipy_io() -> Any:
    """``scipy.io``, or `MissingPackageError` naming the ``convert`` extra."""
    try:
        import scipy.io
    except ImportError as exc:
        raise MissingPackageError(f"converting COCO-Stuff 10k reads MATLAB .mat files with scipy, which is not "
                                  f"installed; {CONVERT_EXTRA_HINT}") from exc
    return scipy.io


def _read_names(list_file: Path) -> list[str]:
    names = [Path(line.strip()).stem if line.strip().endswith(".jpg") else line.strip()
             for line in list_file.read_text().splitlines()]
    return [n for n in names if n]


def _load_mat_labels(path: Path) -> np.ndarray:
    """The ``S`` array of a COCO-Stuff 10k annotation file."""
    sio = _scipy_io()
    try:
        mat = sio.loadmat(path)
    except (sio.matlab.MatReadError, ValueError, OSError, NotImplementedError, TypeError) as exc:
        raise DatasetError(f"COCO-Stuff annotation {path} cannot be read by scipy.io.loadmat: {exc}") from exc
    if "S" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"COCO-Stuff annotation {path} has no array 'S' (the label map); found {keys}")
    labels = np.asarray(mat["S"])
    if labels.ndim != 2:
        raise DatasetError(f"COCO-Stuff annotation {path}: 'S' has shape {labels.shape}; expected (H, W)")
    if labels.size and (labels.min() < 0 or labels.max() > COCO_STUFF_MAX_ID):
        raise DatasetError(f"COCO-Stuff annotation {path}: ids {labels.min()}..{labels.max()} outside "
                           f"0..{COCO_STUFF_MAX_ID}")
    return labels.astype(np.int64)


def convert_coco_stuff10k(root: str | Path, overwrite: bool = False, num_workers: int | None = None) -> int:
    """Arrange COCO-Stuff 10k as downloaded into semask's layout with 171-class train ids.

    Args:
        root: the unpacked ``cocostuff-10k-v1.1`` folder (``images/``, ``annotations/``, ``imageLists/``).
        overwrite: rewrite outputs that already exist (otherwise they are kept).
        num_workers: threads (None: up to 8).

    Returns:
        The number of label files written (both splits).

    Raises:
        MissingPackageError: scipy (the ``convert`` extra) is not installed; raised before anything is read.
        FileNotFoundError: a folder or image list of the download is missing (the message shows the layout).
        DatasetError: an image list names missing files, or an annotation cannot be read or does not fit.
    """
    _scipy_io()  # fail before any work when the extra is missing
    root = Path(root)
    lists = {"train2014": root / "imageLists" / "train.txt", "test2014": root / "imageLists" / "test.txt"}
    missing = [str(p) for p in (root / "images", root / "annotations", *lists.values()) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"convert_coco_stuff10k: missing {', '.join(missing)}. Expected layout:\n"
                                f"{COCO_STUFF10K_DOWNLOAD_LAYOUT}")
    lut = coco_stuff10k_lut()
    jobs: list[Callable[[], bool]] = []
    sources: list[Path] = []
    targets: list[Path] = []
    for folder, list_file in lists.items():
        names = _read_names(list_file)
        absent = [f"{n}.jpg" for n in names if not (root / "images" / f"{n}.jpg").is_file()]
        absent += [f"{n}.mat" for n in names if not (root / "annotations" / f"{n}.mat").is_file()]
        if absent:
            raise DatasetError(f"convert_coco_stuff10k: {list_file} names {len(absent)} file(s) missing from "
                               f"images/ or annotations/: {preview_list(absent)}")
        for name in names:
            src_files, dst_files = _coco_files(root, folder, name)
            sources += src_files
            targets += dst_files
            jobs.append(_coco_job(root, folder, name, lut, overwrite))
    _plan("convert_coco_stuff10k: output", targets, sources)
    return _run(jobs, num_workers)


def _coco_files(root: Path, folder: str, name: str) -> tuple[list[Path], list[Path]]:
    """``([image, annotation], [image copy, label map])`` of one COCO-Stuff 10k scene."""
    return ([root / "images" / f"{name}.jpg", root / "annotations" / f"{name}.mat"],
            [root / "images" / folder / f"{name}.jpg", root / "annotations" / folder / f"{name}_labelTrainIds.png"])


def _coco_job(root: Path, folder: str, name: str, lut: np.ndarray, overwrite: bool) -> Callable[[], bool]:
    def run() -> bool:
        (src_image, src_mat), (dst_image, dst_label) = _coco_files(root, folder, name)
        if overwrite or not dst_image.exists():
            with atomic_path(dst_image) as tmp:
                shutil.copyfile(src_image, tmp)
        if dst_label.exists() and not overwrite:
            return False
        labels = _load_mat_labels(src_mat)
        with Image.open(src_image) as img:
            width, height = img.size
        if labels.shape != (height, width):
            raise DatasetError(f"COCO-Stuff annotation {src_mat} is {labels.shape[1]}x{labels.shape[0]} (WxH) but "
                               f"its image {src_image} is {width}x{height}")
        _save_png(lut[labels], dst_label)
        return True
    return run
