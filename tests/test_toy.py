"""Tests of the built-in toy dataset: determinism, layout, label ranges and the context rule."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semask.apps.cli import main
from semask.data import ADE20K, ToyDataset, make_toy_dataset
from semask.data.toy import SHAPE_COLOURS, TOY_CLASSES, TOY_CONTEXT, render_scene

IDS = {name: k + 1 for k, name in enumerate(TOY_CLASSES)}  # stored ids (0 = unlabelled)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by the 4-neighbourhood, ``steps`` times (pixels within city-block distance ``steps``)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", seed=0, num_train=40, num_val=10, size=128)


def test_same_seed_gives_identical_bytes(tmp_path, toy_root):
    again = make_toy_dataset(tmp_path / "again", seed=0, num_train=40, num_val=10, size=128)
    assert _files(again) == _files(toy_root)
    other = make_toy_dataset(tmp_path / "other", seed=1, num_train=40, num_val=10, size=128)
    differing = [k for k, v in _files(other).items() if k.endswith(".png") and _files(toy_root)[k] != v]
    assert len(differing) == 50  # every scene changes with the seed


def test_layout_metadata_and_ade20k_compatibility(toy_root):
    assert len(list((toy_root / "images" / "training").glob("toy_train_*.jpg"))) == 40
    assert len(list((toy_root / "annotations" / "validation").glob("toy_val_*.png"))) == 10
    meta = json.loads((toy_root / "toy_meta.json").read_text())
    assert meta["classes"] == list(TOY_CLASSES) and len(meta["palette"]) == len(TOY_CLASSES)
    assert meta["seed"] == 0 and meta["size"] == 128 and meta["reduce_zero_label"] is True
    ds = ToyDataset(toy_root, "val")
    assert len(ds) == 10 and ds.num_classes == 11 and ds.class_names == TOY_CLASSES
    assert ds[0]["image"].shape == (128, 128, 3)
    assert len(ADE20K(toy_root, "training")) == 40  # the same files read as ADE20K's layout


def test_label_ranges(toy_root):
    ds = ToyDataset(toy_root, "train")
    seen = set()
    for i in range(len(ds)):
        values = set(np.unique(ds[i]["label"]).tolist())
        assert values <= set(range(11)) | {255}
        seen |= values
    assert seen == set(range(11)) | {255}  # every class and some unlabelled pixels occur in 40 scenes


def test_things_are_always_surrounded_by_their_context(toy_root):
    """Every thing pixel's 2-pixel neighbourhood outside the thing is the thing's stuff (boat <-> water ...)."""
    context = {name: stuff for (shape, stuff), name in TOY_CONTEXT.items()}
    checked = {name: 0 for name in context}
    for path in sorted((toy_root / "annotations").rglob("*.png")):
        label = np.asarray(Image.open(path))
        for name, stuff in context.items():
            mask = label == IDS[name]
            if not mask.any():
                continue
            things = np.isin(label, [IDS[n] for n in context])
            ring = _dilate(mask, 2) & ~things
            assert ring.any() and (label[ring] == IDS[stuff]).all(), f"{name} in {path.name} touches non-{stuff}"
            checked[name] += 1
    assert all(count > 0 for count in checked.values()), checked


def test_same_shape_looks_the_same_whatever_its_class():
    """Boats and cars (cows and camels, birds and fish) share outline, size and colour distributions."""
    stats: dict[str, list] = {name: [] for name in ("boat", "car", "cow", "camel", "bird", "fish")}
    pixels: dict[str, list] = {name: [] for name in stats}
    for i in range(250):
        image, label, things = render_scene(np.random.default_rng([99, i]), size=128)
        for thing in things:
            y0, y1, x0, x1 = thing.box
            stats[thing.class_name].append((thing.colour_index, (x1 - x0) / 128, (y1 - y0) / (x1 - x0)))
            own = label[y0:y1, x0:x1] == IDS[thing.class_name]  # rendered without blending: all its own paint
            pixels[thing.class_name].append(image[y0:y1, x0:x1][own].mean(0))
    for a, b in (("boat", "car"), ("cow", "camel"), ("bird", "fish")):
        sa, sb = np.array(stats[a]), np.array(stats[b])
        assert len(sa) >= 30 and len(sb) >= 30, (a, len(sa), b, len(sb))
        shape = next(s for (s, _), n in TOY_CONTEXT.items() if n == a)
        for colour in range(len(SHAPE_COLOURS[shape])):  # every colour is used by both classes
            assert (sa[:, 0] == colour).any() and (sb[:, 0] == colour).any()
        assert abs(sa[:, 1].mean() - sb[:, 1].mean()) < 0.25 * sa[:, 1].mean()  # width (x image side)
        assert abs(sa[:, 2].mean() - sb[:, 2].mean()) < 0.05  # aspect ratio
        mean_a, mean_b = np.mean(pixels[a], axis=0), np.mean(pixels[b], axis=0)
        spread = np.std(np.concatenate([pixels[a], pixels[b]]), axis=0)
        assert (np.abs(mean_a - mean_b) < 0.5 * spread).all(), (a, b, mean_a, mean_b, spread)


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    root = make_toy_dataset(tmp_path / "t", num_train=2, num_val=1, size=64)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_toy_dataset(root, num_train=2, num_val=1, size=64)
    make_toy_dataset(root, seed=3, num_train=3, num_val=1, size=64, overwrite=True)
    assert len(list((root / "images" / "training").iterdir())) == 3
    assert (root / "notes.txt").read_text() == "mine"  # files that are not the toy set's stay
    assert not list(root.glob(".toy-partial-*"))
    with pytest.raises(ValueError, match="size >= 64"):
        make_toy_dataset(tmp_path / "small", size=16)
    with pytest.raises(FileNotFoundError, match="toy_meta.json"):
        (root / "toy_meta.json").unlink()
        ToyDataset(root)


def test_toy_data_command_line(tmp_path, capsys):
    argv = ["toy-data", str(tmp_path / "cli"), "--seed", "2", "--num-train", "3", "--num-val", "2", "--size", "64"]
    assert main(argv) == 0
    assert "toy dataset written to" in capsys.readouterr().out
    assert len(ToyDataset(tmp_path / "cli", "training")) == 3
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


@pytest.mark.slow
def test_default_toy_set_is_written_within_seconds(tmp_path):
    start = time.perf_counter()
    root = make_toy_dataset(tmp_path / "default")
    elapsed = time.perf_counter() - start
    assert len(ToyDataset(root, "training")) == 300 and len(ToyDataset(root, "validation")) == 100
    assert ToyDataset(root, "validation")[0]["image"].shape == (256, 256, 3)
    assert elapsed < 30, f"writing the default toy set took {elapsed:.1f} s"
