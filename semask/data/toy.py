"""The built-in toy dataset of semask: synthetic outdoor scenes that need context (SeMask, arXiv 2112.12782).

Each scene has a sky above a wavy horizon and one to three bands of ground "stuff" (water, grass, road, sand),
each with its own texture and colour noise. On top sit "things" drawn from three shapes whose class depends only
on where they are, never on how they look:

=========  ================================  =====================================
shape      class by surroundings             appearance
=========  ================================  =====================================
vehicle    boat on water, car on road        same outline, same colour distribution
animal     cow on grass, camel on sand       same outline, same colour distribution
flyer      bird in the sky, fish in water    same outline, same colour distribution
=========  ================================  =====================================

so a model that looks only at a thing cannot tell a boat from a car: it has to use the scene around it, which
is what SeMask's semantic layers are meant to capture. Some scenes also hold an unannotated blob (label 0).

The files follow ADE20K's layout, with label 0 = unlabelled and class ``k`` stored as ``k + 1``, so
``reduce_zero_label`` applies; ``toy_meta.json`` at the root holds the class names and palette. Every image is
drawn from its own seed derived from ``(seed, split, index)``, so the bytes are identical across runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semask.data.datasets import SegmentationDataset, Transform, pair_files, resolve_split, split_dirs
from semask.errors import OutputError, OutputExistsError, UsageError, UsageTypeError
from semask.io import check_output_folder, fsync_directory, process_alive, write_error

__all__ = [
    "TOY_CLASSES",
    "TOY_PALETTE",
    "TOY_CONTEXT",
    "TOY_LAYOUT",
    "ToyThing",
    "render_scene",
    "make_toy_dataset",
    "remove_stale_staging",
    "ToyDataset",
]

TOY_CLASSES: tuple[str, ...] = ("sky", "water", "grass", "road", "sand", "boat", "car", "cow", "camel", "bird",
                                "fish")
TOY_PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180), (0, 90, 200), (4, 200, 3), (128, 64, 128), (220, 200, 120), (255, 0, 80), (0, 0, 142),
    (140, 80, 20), (255, 160, 0), (230, 230, 230), (255, 90, 255),
)
STUFF = ("sky", "water", "grass", "road", "sand")
GROUND = ("water", "grass", "road", "sand")
# (shape, surrounding stuff) -> thing class: the only thing that decides a thing's class.
TOY_CONTEXT: dict[tuple[str, str], str] = {
    ("vehicle", "water"): "boat", ("vehicle", "road"): "car",
    ("animal", "grass"): "cow", ("animal", "sand"): "camel",
    ("flyer", "sky"): "bird", ("flyer", "water"): "fish",
}
META_FILE = "toy_meta.json"
STAGING_PREFIX = ".toy-partial-"  # + "<host>.<pid>": where make_toy_dataset writes before moving into place
STAGING_MARK = ".semask-toy-staging"  # file inside a staging folder: semask made it, it may be deleted
DEFAULTS = {"num_train": 300, "num_val": 100, "size": 256}
SPLIT_CODES = {"training": 1, "validation": 2}
SPLIT_STEMS = {"training": "toy_train", "validation": "toy_val"}
REFUSED = ("; --overwrite deletes only a toy dataset that semask wrote, so nothing was changed. Choose another "
           "folder, or remove these files yourself")
MARGIN = 3  # pixels of the thing's own stuff kept free all around it (no other thing, no other stuff)

TOY_LAYOUT = f"""\
toy/                               <- root
|-- {META_FILE}                 class names, palette, seed, every file with its SHA-256
|-- images/
|   |-- training/      toy_train_00000.jpg ...
|   `-- validation/    toy_val_00000.jpg ...
`-- annotations/
    |-- training/      toy_train_00000.png ...  (0 = unlabelled, 1..{len(TOY_CLASSES)} = classes)
    `-- validation/    toy_val_00000.png ...
(write it with `semask toy-data ROOT`)"""

# Colours every thing of a shape draws from, whatever its class (RGB).
SHAPE_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "vehicle": ((200, 30, 30), (240, 200, 20), (235, 235, 235), (30, 30, 30), (240, 120, 20), (120, 40, 160)),
    "animal": ((120, 70, 30), (235, 225, 210), (40, 35, 30), (190, 150, 90)),
    "flyer": ((60, 60, 70), (240, 130, 30), (245, 245, 245), (150, 40, 40)),
}
SHAPE_WIDTH = {"vehicle": (0.14, 0.26), "animal": (0.10, 0.18), "flyer": (0.06, 0.11)}  # x image side
SHAPE_HEIGHT_RATIO = {"vehicle": (0.45, 0.6), "animal": (0.6, 0.8), "flyer": (0.45, 0.6)}  # height / width
STUFF_COLOURS = {"sky": (90, 150, 225), "water": (20, 90, 150), "grass": (60, 150, 45), "road": (110, 110, 115),
                 "sand": (215, 190, 130)}
STUFF_SHAPES = {"sky": ("flyer",), "water": ("vehicle", "flyer"), "road": ("vehicle",), "grass": ("animal",),
                "sand": ("animal",)}


@dataclass(frozen=True)
class ToyThing:
    """One thing placed in a scene (returned by :func:`render_scene` for tests and inspection)."""

    shape: str  # "vehicle", "animal" or "flyer"
    stuff: str  # the stuff it sits in
    class_name: str  # TOY_CONTEXT[(shape, stuff)]
    colour_index: int  # index into SHAPE_COLOURS[shape]
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1)


# --------------------------------------------------------------------------------------------- drawing
def _shape_mask(shape: str, h: int, w: int, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    """Outline mask and 'detail' mask (windows, head, eye...) of a shape in an ``(h, w)`` box."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    v, u = (v + 0.5) / h, (u + 0.5) / w
    if mirror:
        u = 1.0 - u
    if shape == "vehicle":
        slope = 0.1 * np.clip((v - 0.45) / 0.55, 0.0, 1.0)
        body = (v >= 0.45) & (u >= slope) & (u <= 1.0 - slope)
        cabin = (v >= 0.1) & (v < 0.45) & (u >= 0.28) & (u <= 0.76)
        detail = (v >= 0.18) & (v < 0.4) & (u >= 0.34) & (u <= 0.7)
        return body | cabin, detail
    if shape == "animal":
        body = ((u - 0.48) / 0.34) ** 2 + ((v - 0.42) / 0.24) ** 2 <= 1.0
        head = ((u - 0.85) / 0.13) ** 2 + ((v - 0.25) / 0.17) ** 2 <= 1.0
        legs = (v >= 0.5) & (((u >= 0.24) & (u <= 0.3)) | ((u >= 0.36) & (u <= 0.42))
                             | ((u >= 0.58) & (u <= 0.64)) | ((u >= 0.68) & (u <= 0.74)))
        return body | head | legs, head
    body = ((u - 0.4) / 0.36) ** 2 + ((v - 0.5) / 0.32) ** 2 <= 1.0  # flyer
    tail = (u >= 0.68) & (np.abs(v - 0.5) <= (u - 0.68) / 0.32 * 0.48)
    eye = ((u - 0.18) / 0.06) ** 2 + ((v - 0.42) / 0.08) ** 2 <= 1.0
    return body | tail, eye


def _texture(stuff: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A float32 base texture of one stuff class (broadcastable to ``(size, size, 3)``) and its noise level."""
    y = (np.arange(size, dtype=np.float32) / size)[:, None, None]  # size, 1, 1
    x = (np.arange(size, dtype=np.float32) / size)[None, :, None]  # 1, size, 1
    phase = np.float32(rng.uniform(0, 2 * np.pi))
    colour = np.array(STUFF_COLOURS[stuff], dtype=np.float32)
    if stuff == "sky":  # brighter towards the horizon, faint diagonal haze
        return colour + y * np.float32([90, 70, 25]) + 12 * np.sin(2 * np.pi * (1.3 * x + 0.4 * y) + phase), 3.0
    if stuff == "water":  # horizontal ripples that meander sideways
        ripples = np.sin(2 * np.pi * (size / 10.0) * y + 2.0 * np.sin(2 * np.pi * 3 * x + phase))
        return colour + ripples * np.float32([15, 25, 35]), 6.0
    if stuff == "grass":  # vertical blades and strong noise
        return colour + np.sin(2 * np.pi * (size / 3.0) * x + phase) * np.float32([10, 22, 8]), 22.0
    if stuff == "road":  # flat grey with a dashed lane marking
        dashes = (np.abs(y - 0.5 - 0.3 * np.sin(phase)) < 0.008) & (np.sin(2 * np.pi * 8 * x + phase) > 0.3)
        return np.where(dashes, np.float32([235, 235, 225]), colour), 9.0
    dunes = np.sin(2 * np.pi * (4 * x + 2.5 * y) + phase) + 0.5 * np.sin(2 * np.pi * 11 * y)  # sand
    return colour + dunes * np.float32([14, 12, 10]), 14.0


def _fits(region: np.ndarray, occupied: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    y0, y1, x0, x1 = box
    size = region.shape[0]
    ya, yb, xa, xb = max(y0 - MARGIN, 0), min(y1 + MARGIN, size), max(x0 - MARGIN, 0), min(x1 + MARGIN, size)
    return bool(region[ya:yb, xa:xb].all() and not occupied[ya:yb, xa:xb].any())


def render_scene(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray, list[ToyThing]]:
    """Draw one toy scene.

    Args:
        rng: the scene's random generator (the only source of randomness).
        size: image side in pixels.

    Returns:
        ``(image, label, things)``: ``(size, size, 3)`` uint8 RGB, ``(size, size)`` uint8 stored label ids
        (0 = unlabelled, class k as k + 1) and the placed things.
    """
    ids = {name: k + 1 for k, name in enumerate(TOY_CLASSES)}
    x = np.arange(size, dtype=np.float32)
    # Stuff regions: the sky, then one to three ground bands separated by wavy boundaries.
    num_bands = int(rng.integers(1, 4))
    horizon = rng.uniform(0.2, 0.45) * size
    cuts = np.sort(rng.uniform(horizon + 0.12 * size, size * 0.9, size=num_bands - 1))
    bounds = [horizon, *cuts.tolist()]
    stuff_names = ["sky"]
    for _ in range(num_bands):
        choices = [g for g in GROUND if g != stuff_names[-1]]
        stuff_names.append(choices[int(rng.integers(len(choices)))])
    region_index = np.zeros((size, size), dtype=np.int64)
    rows = np.arange(size, dtype=np.float32)[:, None]
    for b, level in enumerate(bounds):
        wave = level + rng.uniform(0, 6) * np.sin(2 * np.pi * x / rng.uniform(40, 120) + rng.uniform(0, 6.3))
        region_index[rows >= wave[None, :]] = b + 1
    tint = (rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.85, 1.1)).astype(np.float32)  # colour cast
    image = np.zeros((size, size, 3), dtype=np.float32)
    sigma = np.zeros((size, size, 1), dtype=np.float32)  # colour-noise level per pixel
    label = np.zeros((size, size), dtype=np.uint8)
    for r, stuff in enumerate(stuff_names):
        mask = region_index == r
        if mask.any():
            texture, noise = _texture(stuff, size, rng)
            np.copyto(image, texture * tint, where=mask[..., None])
            sigma[mask] = noise
            label[mask] = ids[stuff]
    image += sigma * rng.standard_normal((size, size, 3), dtype=np.float32)
    occupied = np.zeros((size, size), dtype=bool)
    # An unannotated blob (label 0) in some scenes: it is not part of any stuff region for thing placement.
    if rng.random() < 0.4:
        cy, cx = rng.uniform(0.1, 0.9, size=2) * size
        ry, rx = rng.uniform(0.03, 0.08, size=2) * size
        blob = ((rows - cy) / ry) ** 2 + ((x[None, :] - cx) / rx) ** 2 <= 1.0
        image[blob] = rng.uniform(0, 255, size=3) + rng.normal(0, 25, size=(int(blob.sum()), 3))
        label[blob] = 0
        occupied |= blob
    things: list[ToyThing] = []
    for r, stuff in enumerate(stuff_names):
        region = (region_index == r) & (label != 0)
        for _ in range(int(rng.integers(0, 4))):
            shape = STUFF_SHAPES[stuff][int(rng.integers(len(STUFF_SHAPES[stuff])))]
            w = max(int(rng.uniform(*SHAPE_WIDTH[shape]) * size), 6)
            h = max(int(rng.uniform(*SHAPE_HEIGHT_RATIO[shape]) * w), 4)
            colour_index = int(rng.integers(len(SHAPE_COLOURS[shape])))
            mirror = bool(rng.integers(2))
            for _attempt in range(20):
                y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
                box = (y0, y0 + h, x0, x0 + w)
                if _fits(region, occupied, box):
                    break
            else:
                continue  # no room for this thing in this region: the scene simply has one thing fewer
            outline, detail = _shape_mask(shape, h, w, mirror)
            colour = np.array(SHAPE_COLOURS[shape][colour_index], dtype=np.float32)
            shade = np.linspace(1.05, 0.8, h, dtype=np.float32)[:, None, None]  # lit from above
            paint = colour * shade + 6 * rng.standard_normal((h, w, 3), dtype=np.float32)
            paint[detail] = paint[detail] * 0.35 + 40
            view = image[box[0]:box[1], box[2]:box[3]]
            view[outline] = paint[outline]
            class_name = TOY_CONTEXT[(shape, stuff)]
            label[box[0]:box[1], box[2]:box[3]][outline] = ids[class_name]
            occupied[max(box[0] - MARGIN, 0):box[1] + MARGIN, max(box[2] - MARGIN, 0):box[3] + MARGIN] = True
            things.append(ToyThing(shape, stuff, class_name, colour_index, box))
    return np.clip(image, 0, 255).round().astype(np.uint8), label, things


# --------------------------------------------------------------------------------------------- writing
def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def _scene_files(split: str, index: int) -> tuple[str, str]:
    """The image and label file of one scene, relative to the dataset root."""
    name = f"{SPLIT_STEMS[split]}_{index:05d}"
    return f"images/{split}/{name}.jpg", f"annotations/{split}/{name}.png"


def _write_durable(path: Path, data: bytes) -> None:
    """Write a file and flush it to disk (the staging folder is renamed into place only after every fsync)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _staging_name() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname()}.{os.getpid()}"


def remove_stale_staging(root: str | Path) -> list[Path]:
    """Delete the staging folders that killed :func:`make_toy_dataset` runs left in ``root``.

    Only folders named ``.toy-partial-<host>.<pid>`` that hold semask's staging marker, made on this machine
    by a process that no longer exists, are removed.

    Returns:
        The removed folders.
    """
    removed = []
    for folder in Path(root).glob(f"{STAGING_PREFIX}*"):
        host, _, pid = folder.name[len(STAGING_PREFIX):].rpartition(".")
        if (host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))
                and folder.is_dir() and not folder.is_symlink() and (folder / STAGING_MARK).is_file()):
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def _manifest(meta: dict) -> dict[str, str | None]:
    """The files a toy dataset consists of, relative to its root, with their SHA-256 (None for version 1)."""
    if isinstance(meta.get("files"), dict):
        return {str(k): (str(v) if v is not None else None) for k, v in meta["files"].items()}
    names: dict[str, str | None] = {}  # version 1 stored no file list: the names follow from the counts
    for split, key in (("training", "num_train"), ("validation", "num_val")):
        for index in range(int(meta.get(key, 0))):
            names.update(dict.fromkeys(_scene_files(split, index)))
    return names


def _read_manifest(root: Path) -> dict[str, str | None]:
    """The manifest of the toy dataset at ``root``; `OutputError` when there is none that semask wrote."""
    meta_path = root / META_FILE
    if not meta_path.exists():
        raise OutputError(f"{root} holds images/ or annotations/ but no {META_FILE}: they were not written by "
                          f"semask toy-data{REFUSED}")
    try:
        meta = json.loads(meta_path.read_text())
        manifest = _manifest(meta) if isinstance(meta, dict) and meta.get("name") == "semask-toy" else None
    except (OSError, ValueError, TypeError) as exc:
        raise OutputError(f"{meta_path} is not a semask toy-data manifest ({exc}){REFUSED}") from None
    if manifest is None:
        raise OutputError(f"{meta_path} is not a semask toy-data manifest (not a semask toy dataset manifest)"
                          f"{REFUSED}")
    return manifest


def _shown(paths: list[str]) -> str:
    return f"{', '.join(sorted(paths)[:10])}{' ...' if len(paths) > 10 else ''}"


def _owned_dataset(root: Path) -> tuple[list[Path], list[Path]]:
    """The files and folders of the toy dataset at ``root``, after checking that semask wrote all of them.

    Returns:
        ``(files, folders)``, the folders deepest first (the order to remove them in).

    Raises:
        OutputError: ``root`` holds ``images/`` or ``annotations/`` content that the dataset's manifest
            (``toy_meta.json``) does not list, or listed files whose content changed: ``--overwrite`` deletes
            only what semask made.
    """
    manifest = _read_manifest(root)
    files, folders, foreign, changed = [], [], [], []
    for top in ("images", "annotations"):
        base = root / top
        if base.is_symlink() or (base.exists() and not base.is_dir()):
            foreign.append(top)
            continue
        if not base.exists():
            continue
        folders.append(base)
        for folder, dirnames, filenames in os.walk(base):
            for d in dirnames:
                path = Path(folder) / d
                (foreign.append(str(path.relative_to(root))) if path.is_symlink() else folders.append(path))
            for f in filenames:
                path = Path(folder) / f
                rel = path.relative_to(root).as_posix()
                if rel not in manifest or path.is_symlink():
                    foreign.append(rel)
                elif manifest[rel] is not None and hashlib.sha256(path.read_bytes()).hexdigest() != manifest[rel]:
                    changed.append(rel)
                else:
                    files.append(path)
    if foreign:
        raise OutputError(f"{root}: {len(foreign)} path(s) under images/ or annotations/ were not written by semask "
                          f"toy-data: {_shown(foreign)}{REFUSED}")
    if changed:
        raise OutputError(f"{root}: {len(changed)} toy-data file(s) changed since semask wrote them: "
                          f"{_shown(changed)}{REFUSED}")
    return files, sorted(folders, key=lambda p: len(p.parts), reverse=True)


def _check_arguments(root: Path, seed: int, num_train: int, num_val: int, size: int) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val), ("size", size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageTypeError(f"make_toy_dataset: {name} must be an int, got {value!r}")
    if num_train < 1 or num_val < 1 or size < 64:
        raise UsageError(f"make_toy_dataset: need num_train >= 1, num_val >= 1 and size >= 64, got "
                         f"num_train={num_train}, num_val={num_val}, size={size}")
    check_output_folder(root, "make_toy_dataset: root")  # a folder, writable, before any scene is drawn


def _write_dataset(staging: Path, seed: int, counts: dict[str, int], size: int) -> None:
    """Render every scene into ``staging`` and write the manifest, each file and folder flushed to disk."""
    files: dict[str, str] = {}
    for split, count in counts.items():
        for kind in ("images", "annotations"):
            (staging / kind / split).mkdir(parents=True)
        for index in range(count):
            image, label, _ = render_scene(_scene_rng(seed, split, index), size)
            for rel, array, fmt in zip(_scene_files(split, index), (image, label), ("JPEG", "PNG")):
                data = _encode(array, fmt)
                _write_durable(staging / rel, data)
                files[rel] = hashlib.sha256(data).hexdigest()
        for kind in ("images", "annotations"):
            fsync_directory(staging / kind / split)
    meta = {"name": "semask-toy", "version": 2, "seed": seed, "size": size, "num_train": counts["training"],
            "num_val": counts["validation"], "reduce_zero_label": True, "classes": list(TOY_CLASSES),
            "palette": [list(c) for c in TOY_PALETTE],
            "context": {f"{shape} on {stuff}": name for (shape, stuff), name in TOY_CONTEXT.items()},
            "files": files}
    _write_durable(staging / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    for kind in ("images", "annotations", ""):
        fsync_directory(staging / kind)


def make_toy_dataset(root: str | Path, seed: int = 0, num_train: int | None = None, num_val: int | None = None,
                     size: int | None = None, overwrite: bool = False) -> Path:
    """Write the toy dataset (ADE20K layout, see :data:`TOY_LAYOUT`).

    The files are written into a hidden staging folder beside the dataset, each flushed to disk, and moved
    into place only when all are complete; ``toy_meta.json`` lists every file with its SHA-256. A run that is
    killed leaves its staging folder behind, and the next run removes it (:func:`remove_stale_staging`).

    Args:
        root: folder to write into (created if needed; other files in it are left alone).
        seed: the same seed gives byte-identical files.
        num_train: training images (None: 300).
        num_val: validation images (None: 100).
        size: image side in pixels (None: 256; at least 64).
        overwrite: replace an existing toy dataset at ``root``. Only files the old dataset's manifest lists,
            unchanged, are deleted: anything else under ``images/`` or ``annotations/`` makes it an error.

    Returns:
        The dataset root.

    Raises:
        OutputExistsError: a dataset exists and ``overwrite`` is False.
        OutputError: ``root`` is a file or cannot be written, or holds content semask did not write (with
            ``overwrite``); checked before any scene is drawn.
        WriteError: the OS refused a write (no space left, ...); the previous dataset is kept.
        UsageError: counts or size out of range.
    """
    root = Path(root)
    num_train = DEFAULTS["num_train"] if num_train is None else num_train
    num_val = DEFAULTS["num_val"] if num_val is None else num_val
    size = DEFAULTS["size"] if size is None else size
    _check_arguments(root, seed, num_train, num_val, size)
    ours = [root / "images", root / "annotations", root / META_FILE]
    existing = [p for p in ours if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise OutputExistsError(f"make_toy_dataset: {root} already holds {', '.join(p.name for p in existing)}; "
                                "pass overwrite=True (`--overwrite`) to replace it")
    if existing:
        _owned_dataset(root)  # fail before any work if the old content is not ours to delete
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    staging = root / _staging_name()
    if staging.exists():  # our own pid: an earlier process with this pid was killed, or our clean-up failed
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        try:
            (staging / STAGING_MARK).write_text("semask toy-data staging folder; safe to delete\n")
            _write_dataset(staging, seed, {"training": num_train, "validation": num_val}, size)
        except OSError as exc:  # a full disk names the dataset and the OS's reason, and changes nothing
            if exc.errno is None:
                raise
            raise write_error(root, exc, "the previous dataset is kept" if existing else "nothing was written") from exc
        if existing:  # only now remove the old dataset (checked again), so a failed run leaves it intact
            old_files, old_folders = _owned_dataset(root)
            for path in old_files:
                path.unlink()
            for folder in old_folders:
                folder.rmdir()
        for path in ours:  # the manifest last: a dataset without one is never taken for a complete one
            os.replace(staging / path.name, path)
        fsync_directory(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root


class ToyDataset(SegmentationDataset):
    """The toy dataset written by :func:`make_toy_dataset` (``reduce_zero_label`` on).

    Args:
        root: the folder given to :func:`make_toy_dataset`.
        split: ``"training"``/``"train"`` or ``"validation"``/``"val"``.
        transform: applied to each sample dict.
    """

    SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}

    def __init__(self, root: str | Path, split: str = "training", transform: Transform | None = None) -> None:
        root = Path(root)
        folder = resolve_split("ToyDataset", split, self.SPLITS)
        img_dir, ann_dir = split_dirs("ToyDataset", root, TOY_LAYOUT, split, folder, ("images", "annotations"))
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"ToyDataset: {meta_path} is missing. Expected layout:\n{TOY_LAYOUT}")
        meta = json.loads(meta_path.read_text())
        super().__init__(pair_files(img_dir, ann_dir, ".jpg", ".png"), meta["classes"], meta["palette"],
                         reduce_zero_label=True, transform=transform, name=f"ToyDataset[{folder}]")
        self.root, self.split, self.meta = root, folder, meta
