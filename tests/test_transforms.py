"""Tests of semask.data.transforms and semask.data.photometric (docs/recipes.md §5-6 semantics)."""
from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from semask.data import photometric as pm
from semask.data import transforms as tf
from semask.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TEST_RATIOS, TestPipelineConfig, TestTransform,
                                    TrainPipelineConfig, TrainTransform, rescale_size, resize_image, resize_label)
from semask.errors import UsageError


# --------------------------------------------------------------------------------------------- geometry
def test_imagenet_constants_are_the_spec_values():
    assert IMAGENET_MEAN == (123.675, 116.28, 103.53)
    assert IMAGENET_STD == (58.395, 57.12, 57.375)
    assert TEST_RATIOS == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@pytest.mark.parametrize("size, scale, expected", [
    ((100, 200), (2048, 512), (512, 1024)),  # s = min(2048/200, 512/100) = 5.12
    ((333, 500), (2048, 512), (512, 769)),  # s = 512/333; 500 * s = 768.77 -> 769
    ((512, 683), (2048, 512), (512, 683)),  # ADE20K-sized image is already at scale
    ((1024, 2048), (2048, 1024), (1024, 2048)),  # Cityscapes
    ((1024, 2048), (1024, 256), (256, 512)),  # a 0.5 ratio of (2048, 512)
    ((4000, 100), (2048, 512), (2048, 51)),  # long side limits: s = 2048/4000; 100 * s = 51.2 -> 51
])
def test_rescale_size_examples(size, scale, expected):
    assert rescale_size(*size, scale) == expected


@given(h=st.integers(1, 3000), w=st.integers(1, 3000), long_max=st.integers(16, 4096), short_max=st.integers(8, 2048))
def test_rescale_size_fits_and_keeps_ratio(h, w, long_max, short_max):
    long_max, short_max = max(long_max, short_max), min(long_max, short_max)
    new_h, new_w = rescale_size(h, w, (long_max, short_max))
    s = min(long_max / max(h, w), short_max / min(h, w))
    assert (new_h, new_w) == (max(int(h * s + 0.5), 1), max(int(w * s + 0.5), 1))  # never 0 rows or columns
    assert max(new_h, new_w) <= long_max and min(new_h, new_w) <= short_max
    assert max(new_h, new_w) == long_max or min(new_h, new_w) == short_max  # one side touches its limit


def test_rescale_size_rejects_empty_images():
    with pytest.raises(ValueError, match="positive image size"):
        rescale_size(0, 10, (2048, 512))


def test_resize_image_matches_torch_bilinear_without_antialias():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    ref = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(20, 90), mode="bilinear",
                        align_corners=False, antialias=False)[0]
    out = resize_image(image, (20, 90))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (20, 90, 3)
    np.testing.assert_array_equal(out, ref.round().clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8))
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1)
    out_t = resize_image(batch, (20, 90))
    assert out_t.shape == (2, 3, 20, 90) and out_t.dtype == torch.float32
    torch.testing.assert_close(out_t[1], ref)


@given(in_h=st.integers(1, 70), in_w=st.integers(1, 70), out_h=st.integers(1, 140), out_w=st.integers(1, 140))
@settings(max_examples=60, deadline=None)
def test_resize_label_is_torch_legacy_nearest(in_h, in_w, out_h, out_w):
    label = np.arange(in_h * in_w, dtype=np.int64).reshape(in_h, in_w) % 251
    ref = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(out_h, out_w), mode="nearest")[0, 0]
    np.testing.assert_array_equal(resize_label(label, (out_h, out_w)), ref.long().numpy())
    assert torch.equal(resize_label(torch.from_numpy(label), (out_h, out_w)), ref.long())


@pytest.mark.parametrize("size", [(896, 1195), (256, 341), (512, 683), (700, 933), (60, 81)])
@pytest.mark.parametrize("flip", [False, True])
def test_window_resize_equals_full_resize_then_crop(size, flip):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(512, 683, 3), dtype=np.uint8)
    box = (size[0] // 5, size[0] // 5 + min(400, size[0] - size[0] // 5), 7, 7 + min(500, size[1] - 7))
    full = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=size, mode="bilinear",
                         align_corners=False)[0].round()[:, box[0]:box[1], box[2]:box[3]]
    if flip:
        full = full.flip(-1)
    window = tf._resize_window(image, size, box, flip)
    assert window.shape == full.shape
    # Identical arithmetic up to float summation order: a rounding tie may land one level apart.
    assert (window - full).abs().max() <= 1
    assert (window != full).float().mean() < 1e-4


def test_normalize_and_pad():
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    out = tf.normalize(image)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(200 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))
    with pytest.raises(UsageError, match=r"normalize: expected a \(B, 3, H, W\) batch or a \(H, W, 3\) image"):
        tf.normalize(np.zeros((2, 3), np.uint8))
    padded = tf.pad_to(out, (4, 5), 0.0)
    assert padded.shape == (3, 4, 5) and torch.equal(padded[:, :2, :3], out) and padded[:, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="larger than the target"):
        tf.pad_to(out, (1, 5), 0.0)


# --------------------------------------------------------------------------------------------- presets
def test_presets_follow_the_spec_recipe_table():
    ade_t, ade_s = tf.train_preset("ade20k_tiny"), tf.train_preset("ade20k_small")
    ade_l = tf.train_preset("ade20k_large")
    assert ade_t.crop_size == (512, 512) and ade_t.scale == (2048, 512) and ade_t.cat_max_ratio == 0.75
    assert ade_t.ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and ade_t.ratio_range is None
    assert ade_s.cat_max_ratio == 1.0 and tf.train_preset("ade20k_base").cat_max_ratio == 1.0
    assert ade_l.crop_size == (640, 640) and ade_l.scale == (2560, 640) and ade_l.cat_max_ratio == 1.0
    for variant in ("tiny", "small", "base", "large"):
        city = tf.train_preset(f"cityscapes_{variant}")
        assert city.crop_size == (768, 768) and city.scale == (2048, 1024)
        assert city.ratio_range == (0.5, 2.0) and city.ratios is None and city.cat_max_ratio == 0.75
        coco = tf.train_preset(f"coco_stuff10k_{variant}")
        assert coco.cat_max_ratio == 1.0 and coco.ratios == tf.TRAIN_RATIOS
        assert coco.crop_size == ((640, 640) if variant == "large" else (512, 512))
    assert tf.get_test_preset("cityscapes").scale == (2048, 1024) and tf.get_test_preset("ade20k").scale == (2048, 512)
    with pytest.raises(KeyError, match="ade20k_tiny"):
        tf.train_preset("ade20k_huge")


def test_config_rejects_contradictions():
    with pytest.raises(UsageError, match="either `ratios`"):  # as TestPipelineConfig does
        TrainPipelineConfig(ratios=(1.0,), ratio_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="cat_max_ratio"):
        TrainPipelineConfig(cat_max_ratio=0.0)
    with pytest.raises(ValueError, match="ratio_range"):
        TrainPipelineConfig(ratios=None, ratio_range=(2.0, 0.5))


def test_normalize_gives_one_image_and_a_batch_the_same_numbers():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 7, 9, 3), dtype=np.uint8)
    singles = [tf.normalize(image) for image in images]  # (H, W, 3) -> contiguous (3, H, W) float32
    assert all(s.is_contiguous() and s.dtype == torch.float32 for s in singles)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)  # B, 3, H, W viewed channels-last
    for given in (batch, batch.float()):  # uint8 or float, the batch keeps its layout
        out = tf.normalize(given)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, torch.stack(singles))
    wide = tf.normalize(batch.double())
    assert wide.dtype == torch.float64 and torch.allclose(wide.float(), torch.stack(singles))
    assert torch.equal(tf.normalize(batch[0].float(), channels_last=False), singles[0])


# --------------------------------------------------------------------------------------------- training pipeline
def _sample(h: int = 64, w: int = 80, seed: int = 0, classes: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
            "label": rng.integers(0, classes, size=(h, w)), "path": "x.jpg", "label_path": "x.png"}


def test_train_transform_output_contract_and_padding():
    cfg = TrainPipelineConfig(crop_size=(48, 40), scale=(60, 20), ratios=(1.0,))
    out = TrainTransform(cfg)(_sample(), torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 48, 40) and out["image"].dtype == torch.float32
    assert out["label"].shape == (48, 40) and out["label"].dtype == torch.int64
    assert out["path"] == "x.jpg" and out["label_path"] == "x.png"
    # The 64x80 image rescales to 20x25, smaller than the crop: image padded with 0, label with 255.
    assert (out["label"][20:] == 255).all() and (out["label"][:, 25:] == 255).all()
    assert (out["label"][:20, :25] < 5).all()
    assert out["image"][:, 20:].abs().sum() == 0 and out["image"][:, :, 25:].abs().sum() == 0


def test_train_transform_is_deterministic_under_a_seed():
    transform = TrainTransform(tf.train_preset("toy"))
    sample = _sample(200, 260)
    a = transform(sample, torch.Generator().manual_seed(7))
    b = transform(sample, torch.Generator().manual_seed(7))
    c = transform(sample, torch.Generator().manual_seed(8))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    torch.manual_seed(3)  # without a generator, torch's global generator drives it (as in DataLoader workers)
    d = transform(sample)
    torch.manual_seed(3)
    assert torch.equal(d["image"], transform(sample)["image"])


def test_ratio_set_and_ratio_range_are_sampled_as_specified():
    g = torch.Generator().manual_seed(0)
    ratios = [TrainTransform(tf.train_preset("ade20k_tiny")).sample_ratio(g) for _ in range(600)]
    assert set(ratios) == set(tf.TRAIN_RATIOS)  # every ratio of the set, nothing else
    assert max(ratios.count(r) for r in tf.TRAIN_RATIOS) < 2 * min(ratios.count(r) for r in tf.TRAIN_RATIOS)
    drawn = np.array([TrainTransform(tf.train_preset("cityscapes_tiny")).sample_ratio(g) for _ in range(2000)])
    assert drawn.min() >= 0.5 and drawn.max() < 2.0 and len(np.unique(drawn)) == drawn.size
    assert abs(drawn.mean() - 1.25) < 0.03 and abs(np.mean(drawn < 1.0) - 1 / 3) < 0.04  # uniform on [0.5, 2)


def test_rescale_uses_int_of_scale_times_ratio():
    # ratio 0.75 of (2048, 512) is (1536, 384): a 512x683 image becomes 384x512 (683 * 0.75 = 512.25 -> 512).
    cfg = TrainPipelineConfig(crop_size=(1000, 1000), scale=(2048, 512), ratios=(0.75,), photometric=False)
    out = TrainTransform(cfg)(_sample(512, 683), torch.Generator().manual_seed(0))
    valid = out["label"] != 255
    assert valid.any(1).sum() == 384 and valid.any(0).sum() == 512


def test_cat_max_ratio_rejects_dominated_crops():
    label = np.zeros((100, 100), dtype=np.int64)
    label[:, 80:] = 1  # class 0 covers 80 % of the image, class 1 a band on the right
    sample = {"image": np.zeros((100, 100, 3), np.uint8), "label": label}

    def dominated_share(cat_max_ratio: float) -> float:
        cfg = TrainPipelineConfig(crop_size=(30, 30), scale=(100, 100), ratios=None, cat_max_ratio=cat_max_ratio,
                                  flip_prob=0.0, photometric=False)
        transform, g = TrainTransform(cfg), torch.Generator().manual_seed(0)
        bad = 0
        for _ in range(200):
            counts = np.bincount(transform(sample, g)["label"].numpy().ravel(), minlength=2)
            bad += counts.max() / counts.sum() >= 0.75
        return bad / 200

    # A 30 px window at x0 in 0..70 is balanced (class 1 share in (0.25, 0.75)) for x0 in 58..70: p = 13 / 71.
    p = 13 / 71
    assert abs(dominated_share(1.0) - (1 - p)) < 0.07  # one draw
    assert abs(dominated_share(0.75) - (1 - p) ** 11) < 0.06  # the first window and ten re-draws all failing


def test_cat_max_ratio_gives_up_after_ten_retries(monkeypatch):
    draws = []
    original = tf._sample_crop_box

    def counting(*args, **kwargs):
        draws.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tf, "_sample_crop_box", counting)
    cfg = TrainPipelineConfig(crop_size=(8, 8), scale=(32, 32), ratios=None, cat_max_ratio=0.75)
    sample = {"image": np.zeros((32, 32, 3), np.uint8), "label": np.full((32, 32), 3)}  # a single class
    out = TrainTransform(cfg)(sample, torch.Generator().manual_seed(0))
    assert len(draws) == 1 + tf.CAT_MAX_RETRIES  # the first window and ten re-draws, then it is kept
    assert out["label"].shape == (8, 8)


@given(h=st.integers(8, 63), w=st.integers(8, 63), crop_h=st.integers(4, 48), crop_w=st.integers(4, 48),
       long_side=st.integers(16, 160), short_side=st.integers(8, 96), mode=st.sampled_from(["set", "range", "none"]),
       cat=st.sampled_from([1.0, 0.75]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=80, deadline=None)
def test_image_and_label_stay_aligned(h, w, crop_h, crop_w, long_side, short_side, mode, cat, seed):
    """Each pixel's colour encodes its source row/column; its label encodes the source block; they must agree."""
    step, block = 4, 8
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([rows * step, cols * step, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    label = (rows // block) * 8 + cols // block  # < 64, never 255
    cfg = TrainPipelineConfig(crop_size=(crop_h, crop_w), scale=(long_side, short_side),
                              ratios=(0.5, 1.0, 1.5) if mode == "set" else None,
                              ratio_range=(0.5, 2.0) if mode == "range" else None, cat_max_ratio=cat,
                              photometric=False)
    transform = TrainTransform(cfg)
    g = torch.Generator().manual_seed(seed)
    probe = torch.Generator()
    probe.set_state(g.get_state())
    ratio = transform.sample_ratio(probe)  # the first draw of the call below
    new_h, new_w = rescale_size(h, w, (int(long_side * ratio), int(short_side * ratio)))
    out = transform({"image": image, "label": label}, g)

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (out["image"] * std + mean).round().numpy()
    lab = out["label"].numpy()
    valid = lab != 255
    assert valid.any()
    # Labelled pixels form the top-left rectangle; the rest is padding with a zero (normalised) image.
    vh, vw = valid.any(1).sum(), valid.any(0).sum()
    assert valid[:vh, :vw].all() and not valid[vh:].any() and not valid[:, vw:].any()
    assert np.abs(out["image"].numpy()[:, ~valid]).sum() == 0
    # Bilinear samples around (dst + 0.5) * in/out - 0.5, nearest at floor(dst * in/out): within `tol` source px.
    for axis, (n_in, n_out, channel) in enumerate(((h, new_h, 0), (w, new_w, 1))):
        tol = 0.5 * n_in / n_out + 1.0 + 0.25
        coord = pixels[channel][valid] / step  # decoded bilinear source coordinate
        lab_block = (lab[valid] // 8) if axis == 0 else (lab[valid] % 8)
        safe = np.floor((coord - tol) / block) == np.floor((coord + tol) / block)
        np.testing.assert_array_equal(lab_block[safe], np.floor(coord[safe] / block))


# --------------------------------------------------------------------------------------------- photometric
def _reference_hsv(r: int, g: int, b: int) -> tuple[int, int, int]:
    """OpenCV's 8-bit RGB->HSV from its documented formulas, in exact arithmetic."""
    v, mn = max(r, g, b), min(r, g, b)
    diff = v - mn
    s = math.floor(255 * diff / v + 0.5) if v else 0
    if diff == 0:
        return 0, s, v
    if v == r:
        h = 30 * (g - b) / diff
    elif v == g:
        h = 60 + 30 * (b - r) / diff
    else:
        h = 120 + 30 * (r - g) / diff
    h = math.floor(h + 0.5)
    return (h + 180 if h < 0 else h), s, v


def test_rgb_to_hsv_matches_opencv_formulas():
    rng = np.random.default_rng(0)
    colours = np.concatenate([rng.integers(0, 256, size=(3000, 3)), [[0, 0, 0], [255, 0, 0], [0, 255, 0],
                              [0, 0, 255], [255, 255, 0], [10, 10, 10], [255, 0, 1], [200, 200, 199]]])
    h, s, v = pm.rgb_to_hsv(torch.from_numpy(colours.T.reshape(3, 1, -1)).float())
    ours = np.stack([h.numpy().ravel(), s.numpy().ravel(), v.numpy().ravel()], axis=1)
    expected = np.array([_reference_hsv(*map(int, c)) for c in colours])
    np.testing.assert_array_equal(ours, expected)
    assert expected[-7:-4, 0].tolist() == [0, 60, 120]  # red, green, blue in half degrees


def test_hsv_to_rgb_matches_colorsys_and_round_trips():
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, size=(3000, 3)).astype(np.float32)
    h, s, v = pm.rgb_to_hsv(torch.from_numpy(colours.T.reshape(3, 1, -1)))
    back = pm.hsv_to_rgb(h, s, v).numpy().reshape(3, -1).T
    ref = np.array([colorsys.hsv_to_rgb(hh / 180.0, ss / 255.0, vv / 255.0)
                    for hh, ss, vv in zip(h.ravel().tolist(), s.ravel().tolist(), v.ravel().tolist())]) * 255
    assert np.abs(back - ref).max() <= 0.5 + 1e-3  # rounded to the nearest level
    assert np.abs(back - colours).max() <= 4  # 8-bit HSV quantises hue to 2 degrees and saturation to 1/255


def test_hue_shift_turns_red_into_green():
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    params = pm.PhotoParams(brightness=None, contrast=None, contrast_first=True, saturation=None, hue=60)
    assert pm.PhotoMetricDistortion.apply(red, params).view(3).tolist() == [0.0, 255.0, 0.0]


def test_photometric_steps_follow_mmseg_arithmetic():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(3, 16, 16)).astype(np.float32)
    t = torch.from_numpy(image)
    apply = pm.PhotoMetricDistortion.apply

    def params(**kw):
        base = dict(brightness=None, contrast=None, contrast_first=True, saturation=None, hue=None)
        return pm.PhotoParams(**{**base, **kw})

    def convert(img, alpha=1.0, beta=0.0):  # mmseg: float32, scale/shift, clip, astype(uint8)
        return np.clip(img.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)

    np.testing.assert_array_equal(apply(t, params(brightness=-20.7)).numpy(), convert(image, beta=-20.7))
    np.testing.assert_array_equal(apply(t, params(contrast=1.37)).numpy(), convert(image, alpha=1.37))
    # Contrast first or last: the order changes the result when saturation clips in between.
    first = apply(t, params(contrast=1.4, contrast_first=True, saturation=1.5))
    last = apply(t, params(contrast=1.4, contrast_first=False, saturation=1.5))
    h, s, v = pm.rgb_to_hsv(torch.from_numpy(convert(image, alpha=1.4)).float())
    expected_first = pm.hsv_to_rgb(h, torch.from_numpy(convert(s.numpy(), alpha=1.5)).float(), v)
    assert torch.equal(first, expected_first) and not torch.equal(first, last)
    assert torch.equal(apply(t, params()), t)  # no step drawn: unchanged
    assert ((apply(t, params(brightness=30.0, contrast=1.5, saturation=1.5, hue=10)) % 1) == 0).all()


def test_photometric_draws_have_the_spec_probabilities_and_ranges():
    distortion, g = pm.PhotoMetricDistortion(), torch.Generator().manual_seed(0)
    draws = [distortion.sample(g) for _ in range(4000)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        applied = [getattr(p, name) for p in draws if getattr(p, name) is not None]
        assert abs(len(applied) / len(draws) - 0.5) < 0.03, name
    assert abs(np.mean([p.contrast_first for p in draws]) - 0.5) < 0.03
    brightness = np.array([p.brightness for p in draws if p.brightness is not None])
    assert -32 <= brightness.min() < -31 and 31 < brightness.max() < 32
    contrast = np.array([p.contrast for p in draws if p.contrast is not None])
    assert 0.5 <= contrast.min() < 0.51 and 1.49 < contrast.max() < 1.5
    hues = {p.hue for p in draws if p.hue is not None}
    assert hues == set(range(-18, 18))  # numpy's randint(-18, 18): 18 itself excluded


def test_photometric_is_a_per_pixel_function():
    """It must not move pixels: equal input pixels give equal output pixels wherever they are."""
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, size=(6, 3))
    index = rng.integers(0, 6, size=(20, 24))
    image = torch.from_numpy(palette[index].transpose(2, 0, 1).astype(np.float32))
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        out = pm.PhotoMetricDistortion()(image, g).numpy()
        for k in range(6):
            pixels = out[:, index == k]
            assert (pixels == pixels[:, :1]).all()


# --------------------------------------------------------------------------------------------- test pipeline
def test_test_transform_rescales_to_the_test_scale_and_keeps_the_label():
    sample = _sample(300, 400, classes=150)
    out = TestTransform(TestPipelineConfig(scale=(2048, 512)))(sample)
    assert out["image"].shape == (3, 512, 683) and out["ori_size"] == (300, 400)
    assert torch.equal(out["label"], torch.from_numpy(sample["label"]))
    expected = tf.normalize(resize_image(sample["image"], (512, 683)))
    assert torch.equal(out["image"], expected)
    assert tf.multi_scale_sizes(300, 400, (2048, 512))[0] == rescale_size(300, 400, (1024, 256))
