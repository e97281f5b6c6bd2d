"""Tests for semask.viz: label-map colouring, PNG writing, and the notebook figures."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; set here, never at import of semask

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import semask  # noqa: E402
from semask.data.transforms import normalize  # noqa: E402
from semask.errors import UsageError  # noqa: E402
from semask.model.semantic import SemanticAttentionMap  # noqa: E402
from semask.viz import (colorize, default_palette, denormalize, overlay, plot_attention,  # noqa: E402
                        plot_results, plot_samples, plot_segmentation, plot_stage_priors, save_label_map,
                        stage_to_image)
from semask.viz.stages import cell_box, grid_stride  # noqa: E402

PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]
NAMES = ["red", "green", "blue", "dark"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image(h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _label(h: int = 8, w: int = 10) -> np.ndarray:
    label = np.zeros((h, w), dtype=np.int64)  # class 0 on the left, 2 on the right, an ignored corner
    label[:, w // 2:] = 2
    label[0, 0] = 255
    return label


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, "expected a legend on this axes"
    return [t.get_text() for t in legend.get_texts()]


# --------------------------------------------------------------------------------------------- arrays
def test_default_palette_is_deterministic_rgb():
    a, b = default_palette(20), default_palette(20)
    assert a == b and len(a) == 20
    arr = np.asarray(a)
    assert arr.shape == (20, 3) and arr.min() >= 0 and arr.max() <= 255
    assert default_palette(20, seed=1) != a


def test_colorize_maps_classes_to_palette_and_ignore_to_ignore_color():
    label = _label()
    rgb = colorize(label, PALETTE, ignore_color=(7, 8, 9))
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    assert rgb[3, 0].tolist() == PALETTE[0]
    assert rgb[3, 9].tolist() == PALETTE[2]
    assert rgb[0, 0].tolist() == [7, 8, 9]


def test_colorize_rejects_values_without_colour_and_wrong_shape():
    with pytest.raises(ValueError, match=r"label values \[4, 7\] have no colour in a 4-colour palette"):
        colorize(np.array([[0, 4], [7, 1]]), PALETTE)
    with pytest.raises(ValueError, match=r"expected an \(H, W\) label map"):
        colorize(np.zeros((2, 3, 3), dtype=np.int64), PALETTE)


def test_overlay_blends_and_keeps_ignored_pixels():
    image, label = _image(), _label()
    out = overlay(image, label, PALETTE, alpha=0.25)
    expected = np.round(image[3, 9].astype(np.float32) * 0.75 + np.float32(PALETTE[2]) * 0.25)
    assert out[3, 9].tolist() == expected.astype(np.uint8).tolist()
    assert out[0, 0].tolist() == image[0, 0].tolist()  # ignored: the bare image
    assert overlay(image, label, PALETTE, alpha=1.0)[3, 0].tolist() == PALETTE[0]
    assert np.array_equal(overlay(image, label, PALETTE, alpha=0.0), image)


def test_overlay_rejects_size_mismatch():
    with pytest.raises(ValueError, match=r"image \(8, 10\) and label \(8, 9\) differ in size"):
        overlay(_image(), _label(8, 9), PALETTE)


def test_save_label_map_round_trips_palette_png(tmp_path):
    label = _label().astype(np.uint8)
    path = save_label_map(label, tmp_path / "pred.png", palette=PALETTE)
    assert path == tmp_path / "pred.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.png"]  # no temporary file left behind
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im), label)
        stored = np.asarray(im.getpalette()[: 3 * len(PALETTE)]).reshape(-1, 3)
        assert stored.tolist() == PALETTE
        assert np.array_equal(np.array(im.convert("RGB"))[3, 9], PALETTE[2])


def test_save_label_map_without_palette_is_grayscale(tmp_path):
    label = np.arange(12, dtype=np.int64).reshape(3, 4) * 20
    path = save_label_map(label, tmp_path / "ids.png")
    with Image.open(path) as im:
        assert im.mode == "L"
        assert np.array_equal(np.array(im), label)


def test_save_label_map_rejects_values_png_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"must lie in 0..255.*got 0..300"):
        save_label_map(np.array([[0, 300]]), tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"expected an \(H, W\) label map"):
        save_label_map(np.zeros((2, 2, 2), dtype=np.uint8), tmp_path / "bad.png")
    assert not list(tmp_path.iterdir())


def test_denormalize_inverts_the_pipeline_normalisation():
    image = _image(16, 12)
    normalised = normalize(image)  # 3, H, W float32
    assert normalised.shape == (3, 16, 12)
    assert np.array_equal(denormalize(normalised), image)
    with pytest.raises(ValueError, match=r"\(3, H, W\).*take one image of the batch"):
        denormalize(normalised[None])
    with pytest.raises(ValueError, match=r"normalised float image"):
        denormalize(image)


# --------------------------------------------------------------------------------------------- plot_segmentation
def test_plot_segmentation_panels_pixels_and_legend():
    image, label = _image(), _label()
    prediction = np.full((8, 10), 1, dtype=np.int64)
    prediction[:, :3] = 0
    fig = plot_segmentation(image, label, PALETTE, NAMES, prediction=prediction, alpha=0.5)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "prediction"]
    assert np.array_equal(fig.axes[0].images[0].get_array(), image)
    assert np.array_equal(fig.axes[1].images[0].get_array(), overlay(image, label, PALETTE, 0.5))
    assert np.array_equal(fig.axes[2].images[0].get_array(), overlay(image, prediction, PALETTE, 0.5))
    assert _legend_texts(fig.axes[-1]) == ["red", "green", "blue"]  # classes present, in class order; not 255


def test_plot_segmentation_several_predictions_tensors_and_given_axes():
    image, label = _image(), _label()
    preds = {"whole": torch.zeros(8, 10, dtype=torch.int64), "msflip": torch.full((8, 10), 3)}
    fig = plot_segmentation(torch.from_numpy(image).permute(2, 0, 1), None, PALETTE, prediction=preds)
    assert [ax.get_title() for ax in fig.axes] == ["image", "whole", "msflip"]
    assert _legend_texts(fig.axes[-1]) == ["class 0", "class 3"]
    own, axes = plt.subplots(1, 4)
    out = plot_segmentation(image, label, PALETTE, NAMES, prediction=preds, axes=axes)
    assert out is own and len(own.axes) == 4


def test_plot_segmentation_default_palette_and_legend_limit():
    label = np.arange(80).reshape(8, 10) % 30
    fig = plot_segmentation(_image(), label, None, max_legend=5)
    texts = _legend_texts(fig.axes[-1])
    assert texts == [f"class {k}" for k in range(5)] + ["(+25 more)"]
    expected = overlay(_image(), label, default_palette(30), 0.5)
    assert np.array_equal(fig.axes[1].images[0].get_array(), expected)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(label=None), ValueError, "nothing to draw"),
    (dict(label=np.zeros((8, 9), dtype=np.int64)), ValueError, r"label has size \(8, 9\) but the image is \(8, 10\)"),
    (dict(prediction=np.zeros((4, 8, 10), dtype=np.float32)), ValueError, "pass their argmax"),
    (dict(prediction=np.zeros((8, 10), dtype=np.float32)), ValueError, "expected integer class indices"),
    (dict(prediction={}), ValueError, "mapping is empty"),
    (dict(palette=[[0, 0, 0]]), ValueError, r"class indices \[2\] have no colour in a 1-colour palette"),
    (dict(palette=[[0, 0, 300]] * 4), ValueError, "palette values must lie in 0..255"),
    (dict(palette=[0, 0, 0]), ValueError, r"palette of RGB triples, shape \(K, 3\)"),
    (dict(class_names=["red"]), ValueError, r"class index 2 has no name \(1 class names given\)"),
    (dict(alpha=1.5), ValueError, "alpha must lie in"),
    (dict(image=np.zeros((8, 10, 3), dtype=np.float32)), ValueError, "denormalize"),
    (dict(image=np.zeros((8, 10, 2), dtype=np.uint8)), ValueError, r"plot_segmentation: .*C = 1, 3 or 4"),
    (dict(axes="two"), ValueError, "needs 2 axes"),
])
def test_plot_segmentation_rejects_bad_inputs(kwargs, error, message):
    args = dict(image=_image(), label=_label(), palette=PALETTE)
    args.update(kwargs)
    if args.get("axes") == "two":
        args["axes"] = plt.subplots(1, 3)[1]
    with pytest.raises(error, match=message):
        plot_segmentation(**args)


# --------------------------------------------------------------------------------------------- plot_samples
def test_plot_samples_grid_pixels_and_legend():
    images = [_image(seed=i) for i in range(3)]
    labels = [_label(), np.full((8, 10), 1), _label()]
    fig = plot_samples(images, labels, PALETTE, NAMES, titles=["a", "b", "c"], ncols=2)
    assert len(fig.axes) == 6  # 3 images + 3 labels; the empty cells of the last row are removed
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["a", "b", "", "", "c", ""]
    assert np.array_equal(fig.axes[1].images[0].get_array(), images[1])
    assert np.array_equal(fig.axes[2].images[0].get_array(), overlay(images[0], labels[0], PALETTE, 1.0))
    assert fig.axes[3].images[0].get_array()[4, 4].tolist() == PALETTE[1]
    assert _legend_texts(fig.axes[1]) == ["red", "green", "blue"]


def test_plot_samples_rejects_bad_inputs():
    with pytest.raises(ValueError, match="as many labels as images"):
        plot_samples([_image()], [], PALETTE)
    with pytest.raises(ValueError, match="1 titles for 2 images"):
        plot_samples([_image(), _image()], [_label(), _label()], PALETTE, titles=["a"])
    with pytest.raises(ValueError, match=r"label 1 has size \(4, 4\)"):
        plot_samples([_image(), _image()], [_label(), np.zeros((4, 4), dtype=np.int64)], PALETTE)
    with pytest.raises(ValueError, match="ncols must be at least 1"):
        plot_samples([_image()], [_label()], PALETTE, ncols=0)


# --------------------------------------------------------------------------------------------- plot_stage_priors
def _priors() -> list[torch.Tensor]:
    """Four (1, 3, h, w) priors at strides 4..32 of a 32x32 image: class 1 wins on the left half, 2 on the right."""
    priors = []
    for side in (8, 4, 2, 1):
        p = torch.zeros(1, 3, side, max(side, 2))
        p[0, 1, :, : p.shape[-1] // 2] = 5.0
        p[0, 2, :, p.shape[-1] // 2:] = 5.0
        priors.append(p)
    return priors


def test_plot_stage_priors_argmax_maps_pixels_and_legend():
    fig = plot_stage_priors(_priors(), class_names=["a", "b", "c"], palette=PALETTE[:3])
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == ["stage 1 (8x8)", "stage 2 (4x4)", "stage 3 (2x2)",
                                                   "stage 4 (1x2)"]
    drawn = fig.axes[0].images[0].get_array()
    assert drawn.shape == (8, 8, 3)
    assert drawn[0, 0].tolist() == PALETTE[1] and drawn[0, 7].tolist() == PALETTE[2]
    assert _legend_texts(fig.axes[-1]) == ["b", "c"]


def test_plot_stage_priors_over_an_image_upsamples_to_its_size():
    image = _image(32, 32)
    fig = plot_stage_priors(_priors(), image=image, palette=PALETTE[:3], alpha=0.5)
    for ax in fig.axes:
        drawn = ax.images[0].get_array()
        assert drawn.shape == (32, 32, 3)
        label = np.where(np.arange(32) < 16, 1, 2)[None].repeat(32, 0)
        assert np.array_equal(drawn, overlay(image, label, PALETTE[:3], 0.5))


def test_plot_stage_priors_class_scores_from_a_model_output(toy_model):
    with torch.no_grad():
        out = toy_model(torch.randn(1, 3, 64, 64), return_attention=True)
    fig = plot_stage_priors(out, class_index=3)
    assert len(fig.axes) == 5  # four stages and the shared colour bar
    scores = fig.axes[0].images[0].get_array()
    assert np.allclose(scores, out.stage_priors[0][0].softmax(0)[3].numpy(), atol=1e-6)
    image = _image(64, 64)
    fig = plot_stage_priors(out, image=image, class_index=3)
    assert len(fig.axes) == 5
    assert np.array_equal(fig.axes[2].images[0].get_array(), image)
    upsampled = torch.nn.functional.interpolate(out.stage_priors[2].softmax(1)[:, 3:4], size=(64, 64),
                                                mode="bilinear", align_corners=False)[0, 0]  # stage 3: 4x4 -> 64x64
    assert np.allclose(fig.axes[2].images[1].get_array(), upsampled.numpy(), atol=1e-6)
    assert "P(class 3)" in fig.axes[-1].get_ylabel()


def test_plot_stage_priors_rejects_bad_inputs(toy_model):
    torch.manual_seed(0)
    baseline = semask.create_model("swin_toy_fpn", num_classes=3).eval()
    with torch.no_grad():
        out = baseline(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no semantic layers"):
        plot_stage_priors(out)
    with pytest.raises(TypeError, match="SegmentationOutput or a list"):
        plot_stage_priors(torch.zeros(1, 3, 4, 4))
    with pytest.raises(IndexError, match=r"class_index 3 outside 0..2"):
        plot_stage_priors(_priors(), class_index=3)
    with pytest.raises(IndexError, match="batch_index 1 outside a batch of 1"):
        plot_stage_priors(_priors(), batch_index=1)
    with pytest.raises(ValueError, match="2 class names for priors with 3 classes"):
        plot_stage_priors(_priors(), class_names=["a", "b"])
    with pytest.raises(ValueError, match="stage 2 prior has 4 classes"):
        plot_stage_priors([torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 2, 2)])
    with pytest.raises(ValueError, match=r"stage 1 prior must be a \(B, K, H, W\) tensor"):
        plot_stage_priors([torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match="2-colour palette for priors with 3 classes"):
        plot_stage_priors(_priors(), palette=PALETTE[:2])


# --------------------------------------------------------------------------------------------- plot_attention
def _windowed_map() -> SemanticAttentionMap:
    """A 4x4 feature map in 2x2 windows; query (1, 2) (window (0, 1), token 2) attends to its window's token 1."""
    weights = torch.full((1, 2, 2, 4, 4), 0.25)
    weights[0, 0, 1, 2] = torch.tensor([0.1, 0.7, 0.1, 0.1])
    return SemanticAttentionMap(weights, window_size=2, height=4, width=4)


def test_plot_attention_windowed_over_an_image():
    image = _image(8, 8)
    fig = plot_attention(_windowed_map(), 1, 2, image=image, stage_name="stage 1")
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # the map and its colour bar
    assert np.array_equal(ax.images[0].get_array(), image)
    heat = np.asarray(ax.images[1].get_array())
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[0:2, 2:4] = [[0.1, 0.7], [0.1, 0.1]]
    assert heat.shape == (8, 8)
    assert np.allclose(heat, expected.repeat(2, 0).repeat(2, 1))  # each feature cell covers 2x2 pixels
    (marker,) = ax.lines
    assert marker.get_xdata()[0] == pytest.approx(4.5) and marker.get_ydata()[0] == pytest.approx(2.5)
    (window,) = ax.patches  # the query's window: feature cells rows 0-1, cols 2-3 -> pixels 4..7, 0..3
    assert window.get_xy() == (3.5, -0.5) and window.get_width() == 4 and window.get_height() == 4
    assert ax.get_title() == "stage 1: query (1, 2)\n2x2 window"


def test_plot_attention_global_map_from_a_model(toy_model):
    with torch.no_grad():
        out = toy_model(torch.randn(1, 3, 64, 64), return_attention=True)
    amap = out.attentions[2]  # the toy model's stage 3 attends globally
    assert amap.window_size is None
    fig = plot_attention(amap, 1, 3, stage_name="stage 3")
    ax = fig.axes[0]
    heat = np.asarray(ax.images[0].get_array())
    assert np.allclose(heat, amap.query_map(0, 1, 3).numpy())
    assert heat.sum() == pytest.approx(1.0, abs=1e-5)
    assert not ax.patches and ax.get_title() == f"stage 3: query (1, 3)\nglobal, {amap.height}x{amap.width}"
    own, given = plt.subplots()
    assert plot_attention(amap, 0, 0, ax=given) is own


def test_plot_attention_rejects_bad_inputs():
    amap = _windowed_map()
    with pytest.raises(TypeError, match="expected a SemanticAttentionMap"):
        plot_attention(torch.zeros(4, 4), 0, 0)
    with pytest.raises(IndexError, match=r"query \(4, 0\) outside the 4x4 feature map"):
        plot_attention(amap, 4, 0)
    with pytest.raises(IndexError, match="batch_index 1 outside a batch of 1"):
        plot_attention(amap, 0, 0, batch_index=1)
    with pytest.raises(ValueError, match=r"integer values 0\.\.300; expected 0\.\.255"):
        plot_attention(amap, 0, 0, image=np.arange(192, dtype=np.int32).reshape(8, 8, 3) * 300 // 191)


def test_palettes_out_of_range_are_rejected_not_wrapped(tmp_path) -> None:
    from semask.viz import colorize, save_label_map

    label = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"colorize: palette values must lie in 0..255, got 0..300"):
        colorize(label, [[300, 0, 0]])
    with pytest.raises(ValueError, match=r"save_label_map: palette values must lie in 0..255"):
        save_label_map(label, tmp_path / "x.png", palette=[[0, -1, 0]])
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------- shared logic
def test_stage_grid_maps_cells_to_stride_blocks_and_crops_the_padding():
    """A 60x84 input: stage 4 (stride 32) is a 2x3 grid whose last row and column are partly padding."""
    assert grid_stride((2, 3), (60, 84)) == (32, 32)
    assert grid_stride((15, 21), (60, 84)) == (4, 4)
    assert grid_stride((1, 2), (32, 32)) == (32, 16)  # per axis
    with pytest.raises(UsageError, match=r"5x5 cells does not cover a 50x70 input.*input_size"):
        grid_stride((5, 5), (50, 70))
    cells = torch.arange(6.0).view(1, 2, 3)
    mapped = stage_to_image(cells, 32, (60, 84), (60, 84), smooth=False)[0]
    assert mapped.shape == (60, 84)
    assert mapped[31, 63] == 1 and mapped[32, 64] == 5 and mapped[59, 83] == 5 and mapped[0, 0] == 0
    resized = stage_to_image(cells, 32, (60, 84), (30, 42), smooth=False)[0]  # the input was the image x 2
    assert resized[15, 31] == 1 and resized[16, 31] == 4 and resized[16, 32] == 5
    assert cell_box(1, 2, 1, 1, 32, (60, 84), (30, 42)) == (31.5, 15.5, 10.0, 14.0)  # cropped to the input


def test_errors_name_the_function_called_once():
    with pytest.raises(UsageError, match=r"^plot_samples: label 1 has size \(4, 4\)"):
        plot_samples([_image(), _image()], [_label(), np.zeros((4, 4), dtype=np.int64)], PALETTE)
    with pytest.raises(UsageError, match=r"^results_table: no runs given"):  # the inner entry point's name stays
        plot_results([])
    with pytest.raises(IndexError, match=r"^plot_attention: query \(4, 0\) outside"):  # raised by the model's map
        plot_attention(_windowed_map(), 4, 0)


def test_importing_semask_viz_imports_no_plotting_or_widget_backend():
    import subprocess
    import sys

    code = ("import sys, semask.viz; print(sorted(m for m in ('ipywidgets', 'ipympl', 'matplotlib.pyplot') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
