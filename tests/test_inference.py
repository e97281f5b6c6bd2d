"""The test protocol: whole-image, sliding-window and multi-scale + flip inference at the original size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import semask
from semask.engine.inference import TEST_RATIOS, Predictor, load_image, model_test_config, normalize

from helpers import randomize_gammas


@pytest.fixture
def model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    m = semask.create_model("semask_toy_fpn", num_classes=5)
    randomize_gammas(m)
    return m.eval()


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(45, 71, 3), dtype=np.uint8)


def _count_backbone_calls(model: semask.SeMaskFPN) -> list:
    calls = []
    model.backbone.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    return calls


def _manual(model, image: np.ndarray, scale: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """docs/recipes.md §6 written out: keep-ratio rescale, model, softmax, resize to the original size."""
    h0, w0 = image.shape[:2]
    s = min(max(scale) / max(h0, w0), min(scale) / min(h0, w0))
    size = (int(h0 * s + 0.5), int(w0 * s + 0.5))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    x = normalize(x)
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        p = model(x).logits.softmax(1)
    if flip:
        p = p.flip(-1)
    return F.interpolate(p, size=(h0, w0), mode="bilinear", align_corners=False)[0]


def test_whole_image_follows_the_protocol(model, image) -> None:
    calls = _count_backbone_calls(model)
    labels, probs = Predictor(model, scale=(256, 64))(image, return_probs=True)
    assert labels.shape == (45, 71) and probs.shape == (5, 45, 71)
    assert calls == [(1, 3, 64, 101)]  # short side 45 -> 64, long side 71 -> 101
    expected = _manual(model, image, (256, 64))
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, expected.argmax(0).numpy())
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)


def test_multiscale_flip_runs_the_backbone_once_per_scale(model, image) -> None:
    calls = _count_backbone_calls(model)
    probs = Predictor(model, mode="msflip", scale=(256, 64)).probabilities(image)
    assert len(calls) == len(TEST_RATIOS) and all(c[0] == 2 for c in calls)  # image + flipped copy, one pass
    expected = sum(_manual(model, image, (int(256 * r), int(64 * r)), flip)
                   for r in TEST_RATIOS for flip in (False, True)) / 12
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)


def test_sliding_window_averages_overlapping_logits(model, image) -> None:
    whole = Predictor(model, scale=(256, 64)).probabilities(image)
    big_window = Predictor(model, mode="slide", scale=(256, 64), crop_size=128, stride=64).probabilities(image)
    torch.testing.assert_close(big_window, whole)  # one window covers the image: same as whole
    calls = _count_backbone_calls(model)
    pred = Predictor(model, mode="slide", scale=(256, 64), crop_size=48, stride=32, window_batch=2)
    probs = pred.probabilities(image)
    # rescaled 64 x 101 -> rows {0, 16}, cols {0, 32, 53}: 6 windows in batches of 2
    assert [c[0] for c in calls] == [2, 2, 2] and all(c[2:] == (48, 48) for c in calls)
    assert probs.shape == (5, 45, 71)
    torch.testing.assert_close(probs.sum(0), torch.ones(45, 71))


def test_inputs_of_every_kind_give_the_same_result(model, image, tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    pred = Predictor(model, scale=(256, 64))
    ref = pred(image)
    for item in (str(path), path, Image.fromarray(image), torch.from_numpy(image),
                 torch.from_numpy(image).permute(2, 0, 1)):
        np.testing.assert_array_equal(pred(item), ref)
    np.testing.assert_array_equal(semask.predict(model, path, scale=(256, 64)), ref)


def test_bad_inputs(model, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(broken)
    with pytest.raises(ValueError, match=r"\(H, W, C\) with C = 1, 3 or 4"):
        load_image(np.zeros((10, 10, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"read as 0\.\.1"):
        load_image(np.full((10, 10, 3), 200.0, dtype=np.float32))
    with pytest.raises(TypeError, match="list"):
        load_image([1, 2, 3])
    with pytest.raises(ValueError, match="mode"):
        Predictor(model, mode="sliding")


def test_default_test_scales() -> None:
    with torch.device("meta"):
        assert model_test_config(semask.create_model("semask_tiny_fpn", num_classes=19)).scale == (2048, 1024)
        assert model_test_config(semask.create_model("semask_tiny_fpn", num_classes=150)).scale == (2048, 512)


def test_bf16_autocast_agrees_with_fp32(model, image) -> None:
    fp32 = Predictor(model, scale=(256, 64))(image)
    bf16 = Predictor(model, scale=(256, 64), amp_dtype=torch.bfloat16)(image)
    assert (fp32 == bf16).mean() > 0.95


@pytest.mark.parametrize("size", [(64, 85), (45, 71), (100, 64)])  # at scale already (argmax of logits), rescaled
@pytest.mark.parametrize("mode", ["whole", "msflip"])
def test_fast_label_paths_give_the_protocols_labels(model, size, mode) -> None:
    """`predict_labels` skips the softmax and the identity resize where it may; the labels stay those of docs/recipes.md §6."""
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    if mode == "whole":
        expected = _manual(model, image, (256, 64))
    else:
        expected = sum(_manual(model, image, (int(256 * r), int(64 * r)), flip)
                       for r in TEST_RATIOS for flip in (False, True)) / 12
    predictor = Predictor(model, mode=mode, scale=(256, 64))
    labels = predictor.predict_labels(image)
    assert labels.dtype == torch.int64 and labels.shape == size and labels.device == predictor.device
    torch.testing.assert_close(labels, expected.argmax(0), rtol=0, atol=0)
    np.testing.assert_array_equal(predictor(image), expected.argmax(0).numpy())


def test_large_outputs_are_resized_in_groups_of_classes(model, monkeypatch) -> None:
    """Above the chunk budget the final resize + argmax runs class group by class group, with the same labels."""
    import semask.engine.inference as inference

    image = np.random.default_rng(7).integers(0, 256, (45, 71, 3), dtype=np.uint8)
    predictor = Predictor(model, scale=(256, 64))
    expected = predictor.predict_labels(image)
    monkeypatch.setattr(inference, "_CHUNK_BYTES", 45 * 71 * 4 * 2)  # two classes per group
    torch.testing.assert_close(predictor.predict_labels(image), expected, rtol=0, atol=0)
