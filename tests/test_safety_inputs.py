"""No silent wrong answers, limits against crafted input, named errors, one source of settings (issue 9 §2-5).

Table-driven: images of every PIL mode and array/tensor kind, degenerate sizes, decompression bombs, crafted
and corrupt checkpoints, non-finite numbers, sliding-window arguments, dataset pairing rules, bad argument
types and values, and where the test-time settings come from.
"""
from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semask
from semask.checkpoint import (LIMITS, CheckpointError, CheckpointLimitError, CheckpointNonFiniteError,
                               save_checkpoint, to_official_checkpoint)
from semask.data import TEST_PRESETS, DatasetError, FolderDataset, make_toy_dataset
from semask.data.transforms import multi_scale_sizes
from semask.errors import (ImageError, LimitError, NonFiniteError, UnknownNameError, UsageError, UsageTypeError)
from semask.engine.inference import Predictor, eval_mode, load_image, model_test_config, recipe_test_preset
from semask.model.config import ModelConfig
from semask.model.registry import build_model

from helpers import randomize_gammas

GREY = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10) * 2  # 0..238


@pytest.fixture(scope="module")
def model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    m = semask.create_model("semask_toy_fpn", num_classes=4)
    randomize_gammas(m)
    return m.eval()


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------------------------- §2 images
def _pil_cases() -> list[tuple[str, Image.Image, np.ndarray]]:
    """(name, image, expected RGB) for every PIL mode semask converts."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((12, 10), 7, np.uint8)])
    values16 = GREY.astype(np.uint16) * 257 + 100  # 16-bit values whose 8-bit reading is GREY (+100 rounds away)
    palette_img = Image.fromarray(GREY % 4, "L").convert("P")
    palette_img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    lut = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    return [
        ("1", Image.fromarray(GREY > 100), _rgb(np.where(GREY > 100, 255, 0).astype(np.uint8))),
        ("L", Image.fromarray(GREY), _rgb(GREY)),
        ("P", palette_img, lut[GREY % 4]),
        ("RGB", Image.fromarray(rgb), rgb),
        ("RGBA", Image.fromarray(rgba, "RGBA"), rgb),  # alpha dropped, colours kept
        ("LA", Image.fromarray(np.dstack([GREY, GREY]), "LA"), _rgb(GREY)),
        ("I;16", Image.fromarray(values16), _rgb(GREY)),
        ("I;16B", Image.frombytes("I;16B", (10, 12), values16.astype(">u2").tobytes()), _rgb(GREY)),
        ("I", Image.fromarray(values16.astype(np.int32)), _rgb(GREY)),
        ("F", Image.fromarray((GREY / 255.0).astype(np.float32)), _rgb(GREY)),
        ("CMYK", Image.fromarray(rgb).convert("CMYK"), np.array(Image.fromarray(rgb).convert("CMYK").convert("RGB"))),
        ("YCbCr", Image.fromarray(rgb).convert("YCbCr"), np.array(Image.fromarray(rgb).convert("YCbCr").convert("RGB"))),
        ("HSV", Image.fromarray(rgb).convert("HSV"), np.array(Image.fromarray(rgb).convert("HSV").convert("RGB"))),
        ("LAB", Image.fromarray(rgb).convert("LAB"), np.array(Image.fromarray(rgb).convert("LAB").convert("RGB"))),
    ]


@pytest.mark.parametrize("name, image, expected", _pil_cases(), ids=[c[0] for c in _pil_cases()])
def test_every_pil_mode_is_converted_faithfully(name, image, expected, tmp_path: Path) -> None:
    assert image.mode == name
    np.testing.assert_array_equal(load_image(image), expected)
    fmt = {"F": "TIFF", "I": "TIFF", "CMYK": "TIFF", "YCbCr": "JPEG", "HSV": None, "LAB": "TIFF",
           "I;16B": "TIFF"}.get(name, "PNG")
    if fmt and fmt != "JPEG":  # and the same through a file (JPEG is lossy; HSV has no file format)
        path = tmp_path / f"img.{fmt.lower()}"
        image.save(path, format=fmt)
        np.testing.assert_array_equal(load_image(path), load_image(Image.open(path)))
        if name not in ("CMYK", "LAB", "I;16B"):  # formats may store these modes differently
            np.testing.assert_array_equal(load_image(path), expected)
        np.testing.assert_array_equal(semask.data.read_image(path), load_image(path))  # datasets: the same rules


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 0, 1, 156, 255]  # round(v / 257)


ARRAY_CASES = [
    ("uint8 HWC", _rgb(GREY), _rgb(GREY)),
    ("uint8 HW grey", GREY, _rgb(GREY)),
    ("uint8 HW1", GREY[:, :, None], _rgb(GREY)),
    ("uint8 RGBA", np.dstack([_rgb(GREY), np.zeros_like(GREY)]), _rgb(GREY)),
    ("uint16", GREY.astype(np.uint16) * 257, _rgb(GREY)),
    ("uint16 big-endian", (GREY.astype(np.uint16) * 257).astype(">u2"), _rgb(GREY)),
    ("bool", GREY > 100, _rgb(np.where(GREY > 100, 255, 0).astype(np.uint8))),
    ("int64 0..255", GREY.astype(np.int64), _rgb(GREY)),
    ("float64 0..1", GREY / 255.0, _rgb(GREY)),
    ("float16 0..1", (_rgb(GREY) / 255.0).astype(np.float16), _rgb(GREY)),
    ("tensor CHW uint8", torch.from_numpy(_rgb(GREY)).permute(2, 0, 1), _rgb(GREY)),
    ("tensor CHW float 0..1 (torchvision)", torch.from_numpy(_rgb(GREY)).permute(2, 0, 1).float() / 255, _rgb(GREY)),
    ("tensor 1HW float", torch.from_numpy(GREY)[None].double() / 255, _rgb(GREY)),
    ("tensor HWC uint8", torch.from_numpy(_rgb(GREY)), _rgb(GREY)),
    ("tensor one RGB pixel", torch.tensor([[[9, 8, 7]]], dtype=torch.uint8), np.array([[[9, 8, 7]]], np.uint8)),
    ("tensor 3x1x3 is CHW", torch.arange(9, dtype=torch.uint8).view(3, 1, 3),
     torch.arange(9, dtype=torch.uint8).view(3, 1, 3).permute(1, 2, 0).numpy()),
    ("tensor 4xWx3 is HWC", torch.arange(36, dtype=torch.uint8).view(4, 3, 3),
     torch.arange(36, dtype=torch.uint8).view(4, 3, 3).numpy()),
    ("tensor bfloat16 CHW", (torch.from_numpy(_rgb(GREY)).permute(2, 0, 1).float() / 255).bfloat16(),
     _rgb((torch.from_numpy(GREY).float() / 255).bfloat16().float().mul(255).round().byte().numpy())),
]


@pytest.mark.parametrize("name, image, expected", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_arrays_and_tensors_follow_the_documented_rules(name, image, expected) -> None:
    np.testing.assert_array_equal(load_image(image), expected)


REFUSED = [
    ("float 0..255", _rgb(GREY).astype(np.float32), ImageError, r"read as 0\.\.1"),
    ("float NaN", np.full((4, 4, 3), np.nan, np.float32), NonFiniteError, "NaN"),
    ("float inf tensor", torch.full((3, 4, 4), float("inf")), NonFiniteError, "NaN or infinite"),
    ("int above 255", GREY.astype(np.int32) * 3, ImageError, "expected 0..255"),
    ("negative int", -GREY.astype(np.int16), ImageError, "expected 0..255"),
    ("two channels", np.zeros((4, 4, 2), np.uint8), UsageError, "C = 1, 3 or 4"),
    ("batch tensor", torch.zeros(2, 3, 4, 4), UsageError, "one image at a time"),
    ("complex", np.zeros((4, 4, 3), np.complex64), UsageTypeError, "complex64"),
    ("empty", np.zeros((0, 4, 3), np.uint8), ImageError, "at least one pixel"),
    ("list", [[1, 2, 3]], UsageTypeError, "got list"),
    ("I beyond 16 bits", Image.fromarray(np.full((4, 4), 70000, np.int32)), ImageError, "up to 16 bits"),
    ("F beyond 1", Image.fromarray(np.full((4, 4), 3.0, np.float32)), ImageError, r"read as 0\.\.1"),
]


@pytest.mark.parametrize("name, image, error, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_images_that_cannot_be_read_faithfully_are_refused(name, image, error, message) -> None:
    with pytest.raises(error, match=message):
        load_image(image)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header declaring width x height 8-bit grey pixels, and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(20000, 20000), (100000, 1000), (9500, 9500)])
def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path, width: int, height: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    assert path.stat().st_size < 100
    declared = rf"(declares {width}x{height} = {width * height:,} pixels|{width * height} pixels)"
    with pytest.raises(LimitError, match=rf"{declared}.*PIL.Image.MAX_IMAGE_PIXELS.*SEMASK_MAX_IMAGE_PIXELS"):
        load_image(path)
    with pytest.raises(DatasetError, match="MAX_IMAGE_PIXELS"):
        semask.data.read_image(path)


def test_the_pixel_limit_can_be_raised_for_trusted_files(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(9500, 9500))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    with pytest.raises(ImageError, match="cannot be read"):  # past the limit: the (missing) pixel data is read
        load_image(path)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (2, 3), (3, 700)])
@pytest.mark.parametrize("mode", ["whole", "msflip", "slide"])
def test_degenerate_sizes_give_a_label_map_of_the_input_size(model, size, mode) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    predictor = Predictor(model, mode=mode, scale=(512, 128), crop_size=64, stride=48)
    labels, probs = predictor(image, return_probs=True)
    assert labels.shape == size and labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < 4
    assert np.isfinite(probs).all() and np.allclose(probs.sum(0), 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------- §2 non-finite
def test_non_finite_model_output_is_an_error_not_class_zero(model) -> None:
    broken = semask.create_model("semask_toy_fpn", num_classes=4)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.decode_head.conv_seg.bias[1] = float("nan")
    image = np.zeros((16, 16, 3), np.uint8)
    for mode in ("whole", "msflip", "slide"):
        with pytest.raises(NonFiniteError, match="NaN or infinite class scores"):
            Predictor(broken, mode=mode, scale=(64, 32), crop_size=16, stride=16)(image)
    with pytest.raises(NonFiniteError, match="NaN"):
        semask.predict(model, torch.full((3, 8, 8), float("nan")))


def test_slide_stride_larger_than_the_crop_is_refused(model) -> None:
    with pytest.raises(UsageError, match="stride 65 is larger than crop_size 64.*uncovered"):
        Predictor(model, mode="slide", crop_size=64, stride=65)
    probs = Predictor(model, mode="slide", scale=(512, 128), crop_size=40, stride=40).probabilities(
        np.zeros((100, 130, 3), np.uint8))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(0), torch.ones(()), atol=1e-5)


def test_predict_restores_the_modes_it_found() -> None:
    model = semask.create_model("semask_toy_fpn", num_classes=4).train()
    model.decode_head.eval()  # e.g. a frozen head inside a model that trains
    before = {name: m.training for name, m in model.named_modules()}
    semask.predict(model, np.zeros((16, 16, 3), np.uint8), scale=(64, 32))
    semask.predict(model, np.zeros((16, 16, 3), np.uint8), mode="msflip", scale=(64, 32), return_probs=True)
    assert {name: m.training for name, m in model.named_modules()} == before
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("interrupted")
    assert {name: m.training for name, m in model.named_modules()} == before


# --------------------------------------------------------------------------------------------- §2, §3 checkpoints
@pytest.fixture(scope="module")
def official_sd(model) -> dict[str, torch.Tensor]:
    return dict(to_official_checkpoint(model)["state_dict"])


def _blame(sd, key, value):
    sd = dict(sd)
    sd[key] = value
    return sd


BLAME_CASES = [  # one wrong tensor; the error must name it and only it
    ("relative_position_bias_table", "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
     lambda v: torch.zeros(121, v.shape[1])),
    ("patch_embed", "backbone.patch_embed.proj.weight", lambda v: torch.zeros(48, 3, 4, 4)),
    ("classifier_bias", "decode_head.conv_seg.bias", lambda v: torch.zeros(9)),
    ("semantic_query", "backbone.layers.2.semantic_layer.class_injection.0.mlp_cls_q.weight",
     lambda v: torch.zeros(7, v.shape[1])),
    ("mlp", "backbone.layers.1.blocks.1.mlp.fc1.weight", lambda v: torch.zeros(v.shape[0] * 2, v.shape[1])),
    ("heads", "backbone.layers.3.blocks.0.attn.relative_position_bias_table", lambda v: torch.zeros(v.shape[0], 3)),
]


@pytest.mark.parametrize("name, key, make", BLAME_CASES, ids=[c[0] for c in BLAME_CASES])
def test_a_wrong_shaped_tensor_is_blamed_alone(official_sd, tmp_path: Path, name, key, make) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": _blame(official_sd, key, make(official_sd[key]))}, path)
    with pytest.raises(CheckpointError) as err:
        semask.load_checkpoint(path)
    message = str(err.value)
    assert "wrong shape (1)" in message and key in message, message
    assert "missing" not in message and "unexpected" not in message


CRAFTED = [
    ("millions_of_classes_stride0", lambda sd: _blame(_blame(sd, "decode_head.conv_seg.weight",
                                                             torch.zeros(1).expand(5_000_000, 64, 1, 1)),
                                                      "decode_head.conv_seg.bias", torch.zeros(1).expand(5_000_000)),
     CheckpointError, "stride-0"),
    ("many_classes", lambda sd: _blame(_blame(sd, "decode_head.conv_seg.weight", torch.zeros(20_000, 64, 1, 1)),
                                       "decode_head.conv_seg.bias", torch.zeros(20_000)),
     CheckpointLimitError, "num_classes = 20,000, above semask.checkpoint.LIMITS.max_classes"),
    ("deep_stage", lambda sd: {**sd, **{f"backbone.layers.0.blocks.{i}.norm1.weight": torch.zeros(32)
                                        for i in range(2, 100)}},
     CheckpointLimitError, "LIMITS.max_depth"),
    ("gap_in_stages", lambda sd: {**sd, "backbone.layers.7.blocks.0.norm1.weight": torch.zeros(32)},
     CheckpointError, r"missing \[4, 5\]"),
    ("nan_weight", lambda sd: _blame(sd, "backbone.layers.1.blocks.0.mlp.fc2.bias",
                                     torch.full_like(sd["backbone.layers.1.blocks.0.mlp.fc2.bias"], float("nan"))),
     CheckpointNonFiniteError, r"backbone\.layers\.1\.blocks\.0\.mlp\.fc2\.bias \(64 of 64 values\)"),
    ("inf_running_var", lambda sd: _blame(sd, "decode_head.scale_heads.0.0.bn.running_var",
                                          torch.full((64,), float("inf"))),
     CheckpointNonFiniteError, "running_var"),
]


@pytest.mark.parametrize("name, craft, error, message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_checkpoints_fail_before_anything_is_built(official_sd, tmp_path: Path, name, craft, error,
                                                           message) -> None:
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": craft(official_sd)}, path)
    assert path.stat().st_size < 20 * 2**20
    with pytest.raises(error, match=message):
        semask.load_checkpoint(path)


def test_architecture_limits_can_be_raised_for_trusted_files(official_sd, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "wide.pth"
    sd = _blame(_blame(official_sd, "decode_head.conv_seg.weight", torch.zeros(20_000, 64, 1, 1)),
                "decode_head.conv_seg.bias", torch.zeros(20_000))
    torch.save({"state_dict": sd}, path)
    monkeypatch.setattr(LIMITS, "max_classes", 30_000)
    loaded = semask.load_checkpoint(path)  # a 20000-class head over 4-class semantic layers, as the file says
    assert loaded.num_classes == 20_000 and loaded.backbone.num_classes == 4


OWN_FORMAT = [
    ("unknown_config_key", lambda obj: obj["config"].update(window="7"), "unknown key\\(s\\) \\['window'\\]"),
    ("bad_config_type", lambda obj: obj["config"].update(window_size="7"), "window_size: expected an int"),
    ("config_over_limit", lambda obj: obj["config"].update(num_classes=10**7), "LIMITS.max_classes"),
    ("not_a_tensor", lambda obj: obj["state_dict"].update({"decode_head.conv_seg.bias": [0.0] * 4}),
     "not plain dense weight tensors"),
    ("missing_state_dict", lambda obj: obj.pop("state_dict"), r"without \['state_dict'\]"),
    ("bad_palette", lambda obj: obj.update(palette=[[0, 0, 999]] * 4), "palette values must lie in 0..255"),
]


@pytest.mark.parametrize("name, damage, message", OWN_FORMAT, ids=[c[0] for c in OWN_FORMAT])
def test_own_checkpoints_are_checked_field_by_field(model, tmp_path: Path, name, damage, message) -> None:
    path = save_checkpoint(tmp_path / "own.pth", model)
    obj = torch.load(path, weights_only=True)
    damage(obj)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message):
        semask.load_checkpoint(path)


# --------------------------------------------------------------------------------------------- §2 datasets
def _pairs(root: Path, names: list[str], img_suffix: str, seg_suffix: str, same_folder: bool = False) -> tuple:
    img_dir, ann_dir = root / "img", root / ("img" if same_folder else "ann")
    for name in names:
        _ = [d.mkdir(parents=True, exist_ok=True) for d in (img_dir, ann_dir)]
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img_dir / f"{name}{img_suffix}")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(ann_dir / f"{name}{seg_suffix}")
    return img_dir, ann_dir


@pytest.mark.parametrize("case", ["empty_image_suffix", "empty_label_suffix", "same_suffix_same_folder",
                                  "nested_suffix_same_folder", "dangling_image_link", "dangling_label_link",
                                  "folder_named_like_an_image"])
def test_folder_dataset_pairing_never_collapses_or_skips(tmp_path: Path, case: str) -> None:
    if case.startswith("empty"):
        img_dir, ann_dir = _pairs(tmp_path, ["a", "b"], ".png", ".png")
        kwargs = {"img_suffix": ""} if case == "empty_image_suffix" else {"seg_map_suffix": ""}
        with pytest.raises(UsageError, match="non-empty string"):
            FolderDataset(img_dir, ann_dir, ["x"], **{"img_suffix": ".png", "seg_map_suffix": ".png", **kwargs})
    elif case == "same_suffix_same_folder":
        img_dir, _ = _pairs(tmp_path, ["a", "b"], ".png", "_label.png", same_folder=True)
        with pytest.raises(UsageError, match="clash"):
            FolderDataset(img_dir, img_dir, ["x"], img_suffix=".png", seg_map_suffix=".png")
    elif case == "nested_suffix_same_folder":
        img_dir, _ = _pairs(tmp_path, ["a", "b"], ".png", "_label.png", same_folder=True)
        with pytest.raises(UsageError, match="clash"):
            FolderDataset(img_dir, img_dir, ["x"], img_suffix=".png", seg_map_suffix="_label.png")
    else:
        img_dir, ann_dir = _pairs(tmp_path, ["a", "b"], ".jpg", ".png")
        if case == "dangling_image_link":
            (img_dir / "c.jpg").symlink_to(tmp_path / "gone.jpg")
            match = r"c\.jpg \(dangling symbolic link\)"
        elif case == "dangling_label_link":
            (ann_dir / "b.png").unlink()
            (ann_dir / "b.png").symlink_to(tmp_path / "gone.png")
            match = r"b\.png \(dangling symbolic link\)"
        else:
            (img_dir / "c.jpg").mkdir()
            match = r"c\.jpg \(a folder\)"
        with pytest.raises(DatasetError, match=match):
            FolderDataset(img_dir, ann_dir, ["x"])


def test_distinct_suffixes_in_one_folder_still_pair(tmp_path: Path) -> None:
    img_dir = tmp_path / "both"
    img_dir.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img_dir / f"{name}_img.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(img_dir / f"{name}_label.png")
    ds = FolderDataset(img_dir, img_dir, ["x"], img_suffix="_img.png", seg_map_suffix="_label.png")
    assert [(p.name, q.name) for p, q in ds.pairs] == [("a_img.png", "a_label.png"), ("b_img.png", "b_label.png")]


# --------------------------------------------------------------------------------------------- §4 arguments
BAD_ARGUMENTS = [
    ("num_classes float", lambda: semask.create_model("semask_toy_fpn", num_classes=2.5), UsageTypeError,
     r"num_classes: expected an int >= 1, got 2\.5 \(float\)"),
    ("window_size str", lambda: semask.create_model("semask_toy_fpn", window_size="7"), UsageTypeError,
     "window_size: expected an int >= 1, got '7'"),
    ("window_size 0", lambda: semask.create_model("semask_toy_fpn", window_size=0), UsageError,
     "window_size: expected an int >= 1, got 0"),
    ("drop_path_rate 1.5", lambda: semask.create_model("semask_toy_fpn", drop_path_rate=1.5), UsageError,
     r"drop_path_rate: expected a number in \[0, 1\), got 1\.5"),
    ("backbone_classes 0", lambda: semask.create_model("semask_toy_fpn", backbone_classes=0), UsageError,
     "backbone_classes: expected an int >= 1, got 0"),
    ("heads do not divide", lambda: semask.create_model("semask_toy_fpn", num_heads=(3, 2, 4, 8)), UsageError,
     "not divisible by its 3 heads"),
    ("unknown option", lambda: semask.create_model("semask_toy_fpn", windw=7), UsageTypeError, "unknown option"),
    ("unknown model", lambda: semask.create_model("semask_huge_fpn"), UnknownNameError, "valid names"),
    ("palette short", lambda: semask.create_model("semask_toy_fpn", num_classes=3, palette=[[0, 0, 0]]),
     UsageError, "palette has 1 colours for 3 classes"),
    ("class names not str", lambda: semask.create_model("semask_toy_fpn", class_names=[1, 2]), UsageTypeError,
     "class_names must all be str"),
    ("scale zero", lambda: Predictor(_small(), scale=(0, 0)), UsageError, r"scale\[0\] must be a positive int"),
    ("scale float", lambda: Predictor(_small(), scale=(512.5, 128)), UsageTypeError, "positive int"),
    ("window_batch 0", lambda: Predictor(_small(), window_batch=0), UsageError, "window_batch must be a positive"),
    ("ratios negative", lambda: Predictor(_small(), ratios=(1.0, -0.5)), UsageError, "ratios must be positive"),
    ("amp float64", lambda: Predictor(_small(), amp_dtype=torch.float64), UsageError, "amp_dtype"),
    ("test_config name", lambda: Predictor(_small(), test_config="imagenet"), UnknownNameError, "valid names"),
    ("device name", lambda: Predictor(_small(), device="gpu"), UsageError, "not a device name"),
    ("batch 0", lambda: _small()(torch.zeros(0, 3, 32, 32)), UsageError, "at least one image"),
    ("float64 input", lambda: _small()(torch.zeros(1, 3, 32, 32, dtype=torch.float64)), UsageError,
     r"expected a torch.float32 batch .* got torch.float64"),
    ("fp16 input", lambda: _small()(torch.zeros(1, 3, 32, 32, dtype=torch.float16)), UsageError,
     "got torch.float16; convert it"),
    ("uint8 input", lambda: _small()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), UsageError, "floating-point"),
    ("test config scale", lambda: semask.data.TestPipelineConfig(scale=(0, 512)), UsageError, "positive ints"),
    ("toy size", lambda: make_toy_dataset("/nonexistent-semask/x", size=16), UsageError, "size >= 64"),
]


def _small() -> semask.SeMaskFPN:
    return semask.create_model("semask_toy_fpn", num_classes=3).eval()


@pytest.mark.parametrize("name, call, error, message", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_are_named_errors(name, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def test_errors_keep_their_builtin_kinds() -> None:
    with pytest.raises(KeyError):
        semask.create_model("nope")
    with pytest.raises(TypeError):
        semask.create_model("semask_toy_fpn", num_classes=2.5)
    with pytest.raises(ValueError):
        semask.create_model("semask_toy_fpn", window_size=0)


def test_autocast_casts_other_float_inputs_but_not_float64() -> None:
    model = _small()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.zeros(1, 3, 32, 32, dtype=torch.float16)).logits.shape == (1, 3, 32, 32)
        with pytest.raises(UsageError, match="got torch.float64"):
            model(torch.zeros(1, 3, 32, 32, dtype=torch.float64))


# --------------------------------------------------------------------------------------------- §5 settings
@pytest.mark.parametrize("name, num_classes, preset", [
    ("semask_tiny_fpn", 150, "ade20k"), ("semask_large_fpn", 150, "ade20k_large"),
    ("semask_tiny_fpn", 19, "cityscapes"), ("semask_large_fpn", 19, "cityscapes"),
    ("semask_base_fpn", 171, "coco_stuff10k"), ("semask_large_fpn", 171, "coco_stuff10k_large"),
    ("semask_toy_fpn", 11, "toy"), ("semask_toy_fpn", 5, "toy"), ("swin_large_fpn", 150, "ade20k_large"),
])
def test_the_test_scale_comes_from_the_models_preset(name, num_classes, preset) -> None:
    with torch.device("meta"):
        m = semask.create_model(name, num_classes=num_classes)
    assert recipe_test_preset(num_classes, m.config.embed_dim) == preset
    assert model_test_config(m) == TEST_PRESETS[preset]
    predictor = Predictor(m)
    assert predictor.scale == TEST_PRESETS[preset].scale and predictor.test_config == TEST_PRESETS[preset]
    assert Predictor(m, mode="msflip").ratios == TEST_PRESETS[preset].ratios
    assert Predictor(m, test_config="cityscapes").scale == (2048, 1024)
    assert Predictor(m, scale=(640, 320)).scale == (640, 320)


def test_large_models_test_at_their_recipes_scale() -> None:
    with torch.device("meta"):
        large = semask.create_model("semask_large_fpn", num_classes=150)
    assert Predictor(large).scale == (2560, 640)  # not (2048, 512): the Large recipe trains on 640 crops


def test_msflip_inputs_are_multi_scale_sizes(model) -> None:
    config = dataclasses.replace(TEST_PRESETS["toy"], scale=(256, 64), ratios=(0.5, 1.0, 1.5))
    seen = []
    hook = model.backbone.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    try:
        Predictor(model, mode="msflip", test_config=config).predict_labels(np.zeros((45, 71, 3), np.uint8))
    finally:
        hook.remove()
    assert seen == multi_scale_sizes(45, 71, (256, 64), (0.5, 1.0, 1.5))


def test_normalisation_comes_from_the_test_config(model) -> None:
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    odd = dataclasses.replace(TEST_PRESETS["toy"], scale=(32, 32), mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))
    probs = Predictor(model, test_config=odd).probabilities(image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        torch.testing.assert_close(probs, model(x).logits.softmax(1)[0])


def test_models_are_built_in_one_step(tmp_path: Path) -> None:
    config = ModelConfig(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=2)
    model = build_model(config, name="tiny_thing", class_names=("sea", "sky"), palette=[[0, 0, 255], [9, 9, 9]])
    assert model.config is config and model.name == "tiny_thing"
    assert model.class_names == ("sea", "sky") and model.palette == [[0, 0, 255], [9, 9, 9]]
    loaded = semask.load_checkpoint(save_checkpoint(tmp_path / "m.pth", model))
    assert (loaded.config, loaded.class_names, loaded.palette) == (config, model.class_names, model.palette)
    official = tmp_path / "official.pth"
    torch.save(to_official_checkpoint(model), official)
    assert semask.load_checkpoint(official).class_names == ("sea", "sky")
    with pytest.raises(UsageTypeError, match="expected a ModelConfig"):
        build_model({"embed_dim": 32})
