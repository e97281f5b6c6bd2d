"""Property tests of the inference entry points (issue 9): any size, mode and input kind gives a label map of the
input's size, with no NaN, and the same labels however the image is handed over or the labels are asked for."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import semask
from semask.engine.inference import Predictor

from helpers import randomize_gammas

NUM_CLASSES = 3
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    m = semask.create_model("semask_toy_fpn", num_classes=NUM_CLASSES)
    randomize_gammas(m)
    return m.eval()


@st.composite
def images(draw):
    """(image in some accepted form, its height, its width)."""
    h, w = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**16))
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    kind = draw(st.sampled_from(["uint8", "grey", "rgba", "uint16", "float01", "tensor_chw_float", "tensor_hwc",
                                 "pil_rgb", "pil_l", "pil_p", "pil_i16", "pil_f", "pil_cmyk", "pil_1"]))
    assume(not (kind == "tensor_hwc" and h == 3))  # (3, W, 3) is read as channels first, by the documented rule
    grey = rgb[:, :, 0]
    image = {
        "uint8": lambda: rgb,
        "grey": lambda: grey,
        "rgba": lambda: np.dstack([rgb, grey]),
        "uint16": lambda: rgb.astype(np.uint16) * 257,
        "float01": lambda: rgb / 255.0,
        "tensor_chw_float": lambda: torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "tensor_hwc": lambda: torch.from_numpy(rgb),
        "pil_rgb": lambda: Image.fromarray(rgb),
        "pil_l": lambda: Image.fromarray(grey),
        "pil_p": lambda: Image.fromarray(rgb).convert("P"),
        "pil_i16": lambda: Image.fromarray(grey.astype(np.uint16) * 257),
        "pil_f": lambda: Image.fromarray((grey / 255.0).astype(np.float32)),
        "pil_cmyk": lambda: Image.fromarray(rgb).convert("CMYK"),
        "pil_1": lambda: Image.fromarray(grey > 127),
    }[kind]()
    return image, h, w


MODES = st.sampled_from([("whole", {}), ("msflip", {}), ("slide", {"crop_size": 24, "stride": 16})])


@SETTINGS
@given(sample=images(), mode=MODES, scale=st.sampled_from([(64, 32), (128, 48), (40, 40)]))
def test_any_image_gives_a_label_map_of_its_size(model, sample, mode, scale) -> None:
    image, h, w = sample
    name, extra = mode
    predictor = Predictor(model, mode=name, scale=scale, **extra)
    labels, probs = predictor(image, return_probs=True)
    assert labels.shape == (h, w) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    assert probs.shape == (NUM_CLASSES, h, w) and probs.dtype == np.float32
    assert np.isfinite(probs).all() and np.allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(0))
    fast = predictor.predict_labels(image)  # the evaluation path: a tensor on the device, no probabilities
    assert isinstance(fast, torch.Tensor) and fast.dtype == torch.int64 and fast.device == predictor.device
    np.testing.assert_array_equal(fast.numpy(), labels)


@SETTINGS
@given(h=st.integers(1, 70), w=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_the_same_pixels_give_the_same_labels_in_every_form(model, h, w, seed) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    predictor = Predictor(model, scale=(64, 32))
    expected = predictor(rgb)
    for same in (Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1), rgb.astype(np.int64),
                 torch.from_numpy(rgb).permute(2, 0, 1).double() / 255, rgb.astype(np.uint16) * 257):
        np.testing.assert_array_equal(predictor(same), expected)
