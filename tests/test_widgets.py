"""Tests for the apps of semask.viz: the explorer's and the comparison's callbacks, driven without a browser.

Each test changes a control the way the mouse would (``control.value = ...`` fires the same observers) and checks
the figure's data against an independent computation, and that the model ran once per image, not per change.
(`tests/test_browser.py` checks the same app rendered in JupyterLab and Chromium.)
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; set here, never at import of semask

import matplotlib.pyplot  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.backend_bases import MouseEvent  # noqa: E402

import semask  # noqa: E402
from helpers import randomize_gammas  # noqa: E402
from semask.data import TOY_CLASSES, TOY_PALETTE, TestPipelineConfig, TestTransform, ToyDataset, make_toy_dataset  # noqa: E402
from semask.engine.metrics import mean_iou  # noqa: E402
from semask.engine.inference import Predictor  # noqa: E402
from semask.errors import UsageError  # noqa: E402
from semask.viz import (VIEWS, ERROR_PALETTE, Comparison, Explorer, analyse_image, compare, error_map,  # noqa: E402
                        overlay, plot_attention, plot_stage_priors, semantic_gammas)

PRESET = TestPipelineConfig(scale=(256, 64))  # keeps the 64-pixel test scenes at their size


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory) -> ToyDataset:
    root = make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", num_train=1, num_val=3, size=64)
    return ToyDataset(root, "validation")


@pytest.fixture
def model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE).eval()
    randomize_gammas(model, 0.5)
    return model


class ForwardCounter:
    """Counts the model's forward passes through a hook (independent of the explorer's own counter)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1


def _heat(explorer: Explorer) -> np.ndarray:
    assert explorer.heat is not None and explorer.cax.get_visible(), "expected a heat map with its colour bar"
    return explorer.heat


def _picture(explorer: Explorer) -> np.ndarray:
    return explorer.picture


def _legend(explorer: Explorer) -> list[str]:
    legend = explorer.ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def _rendered(figure) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba()).copy()


# --------------------------------------------------------------------------------------------- analyse_image
def test_analysis_matches_the_predictor_and_the_raw_model_outputs(model, toy_val):
    sample = toy_val[0]
    a = analyse_image(model, sample["image"], sample["label"], test_preset=PRESET)
    assert a.input_size == (64, 64) and a.size == (64, 64)
    expected = semask.predict(model, sample["image"], scale=PRESET.scale)
    assert np.array_equal(a.prediction, expected)
    assert a.miou == pytest.approx(mean_iou(expected, sample["label"], 11)["mIoU"])
    x = TestTransform(PRESET)(sample)["image"][None]
    with torch.no_grad():
        out = model(x, return_attention=True)
    for stage, stride in enumerate((4, 8, 16, 32)):
        probs = out.stage_priors[stage][0].softmax(0)  # K, h_i, w_i
        assert torch.allclose(a.stage_priors[stage], probs, atol=1e-6)
        # at the test scale of the image itself, a feature cell is a stride x stride block of pixels
        assert np.array_equal(a.prior_map(stage), probs.argmax(0).numpy().repeat(stride, 0).repeat(stride, 1))
        weights = a.attention_map(stage, 40, 21)
        r, c = 40 // stride, 21 // stride
        assert a.query_cell(stage, 40, 21) == (r, c)
        query = out.attentions[stage].query_map(0, r, c).numpy()
        assert np.allclose(weights, query.repeat(stride, 0).repeat(stride, 1))
    upsampled = analyse_image(model, sample["image"], test_preset=TestPipelineConfig(scale=(512, 128)))
    assert upsampled.input_size == (128, 128) and upsampled.prediction.shape == (64, 64)
    assert upsampled.label is None and upsampled.miou is None
    assert upsampled.query_cell(0, 63, 0) == (31, 0)  # pixel 63 -> input row 126 -> stage-1 cell 31


def test_analysis_is_the_predictors_whole_image_forward(model):
    """analyse_image runs `Predictor.predict_with_output`: the labels of `predict_labels`, the model's own output."""
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    preset = TestPipelineConfig(scale=(150, 60))  # a real rescale: 50x70 -> 60x84
    predictor = Predictor(model, test_config=preset)
    labels, out = predictor.predict_with_output(image, return_attention=True)
    assert torch.equal(labels, predictor.predict_labels(image))
    assert out.logits.shape[-2:] == (60, 84) and len(out.attentions) == 4
    a = analyse_image(model, image, test_preset=preset)
    assert np.array_equal(a.prediction, labels.numpy()) and a.input_size == (60, 84)
    assert torch.allclose(a.stage_priors[3], out.stage_priors[3][0].softmax(0))
    with pytest.raises(UsageError, match="needs mode 'whole' with one view"):
        Predictor(model, mode="msflip", test_config=preset).predict_with_output(image)


def test_semantic_gammas_reads_every_semantic_layer(model):
    assert semantic_gammas(model) == [[0.5]] * 4
    assert semantic_gammas(semask.create_model("swin_toy_fpn")) == []


# --------------------------------------------------------------------------------------------- explorer
def test_explorer_runs_the_model_once_per_image(model, toy_val):
    counter = ForwardCounter(model)
    explorer = Explorer(model, toy_val, test_preset=PRESET)
    assert counter.calls == explorer.model_runs == 1
    for view in VIEWS:
        explorer.view.value = view
        for stage in range(4):
            explorer.stage.value = stage
    explorer.class_name.value = 3
    explorer.opacity.value = 0.9
    explorer.select_pixel(10, 50)
    assert counter.calls == 1
    explorer.image.value = 2
    assert counter.calls == explorer.model_runs == 2
    explorer.image.value = 0
    explorer.image.value = 2
    assert counter.calls == 2  # both cached


def test_explorer_label_views_draw_the_expected_pixels_and_legends(model, toy_val):
    explorer = Explorer(model, toy_val, test_preset=PRESET, opacity=0.5)
    sample = toy_val[0]
    a = explorer.analysis()
    assert np.array_equal(_picture(explorer), overlay(sample["image"], a.prediction, TOY_PALETTE, 0.5))
    assert _legend(explorer) == [TOY_CLASSES[k] for k in np.unique(a.prediction)]
    assert explorer.heat is None and not explorer.cax.get_visible()

    explorer.view.value = "ground truth"
    assert np.array_equal(_picture(explorer), overlay(sample["image"], sample["label"], TOY_PALETTE, 0.5))
    present = [k for k in np.unique(sample["label"]) if k != 255]
    assert _legend(explorer) == [TOY_CLASSES[k] for k in present]

    explorer.view.value = "error map"
    assert np.array_equal(_picture(explorer), error_map(a.prediction, sample["label"], image=sample["image"], alpha=0.5))
    texts = _legend(explorer)
    scored = sample["label"] != 255
    right = (a.prediction[scored] == sample["label"][scored]).mean()
    assert texts[0] == f"correct {100 * right:.1f}%" and texts[1].startswith("wrong")

    explorer.opacity.value = 0.8
    assert np.array_equal(_picture(explorer), error_map(a.prediction, sample["label"], image=sample["image"], alpha=0.8))
    assert f"mIoU {100 * a.miou:.1f}%" in explorer.info.value


def test_explorer_semantic_prior_follows_stage_and_class(model, toy_val):
    explorer = Explorer(model, toy_val, test_preset=PRESET)
    panel = explorer.view_figure  # the one-view figure, whose artists are checked below
    a = explorer.analysis()
    explorer.view.value = "semantic prior"
    assert not explorer.stage.disabled and not explorer.class_name.disabled
    assert np.array_equal(_picture(explorer), overlay(a.image, a.prior_map(0), TOY_PALETTE, 0.5))  # argmax
    before = _rendered(explorer.figure)
    explorer.class_name.value = TOY_CLASSES.index("water")
    water = _heat(explorer)
    assert np.allclose(water, a.prior_map(0, 1))
    assert panel._colorbar.ax.get_ylabel() == "P(water) in the stage 1 prior"
    assert panel._heat.get_clim() == (0.0, 1.0)
    explorer.stage.value = 2
    stage3 = _heat(explorer)
    assert np.allclose(stage3, a.prior_map(2, 1)) and not np.allclose(stage3, water)
    assert panel._colorbar.ax.get_ylabel() == "P(water) in the stage 3 prior"
    assert "stage 3 semantic prior: water" in explorer.ax.get_title()
    assert not np.array_equal(_rendered(explorer.figure), before)  # and the pixels on the canvas changed


def test_explorer_attention_follows_stage_query_and_clicks(model, toy_val):
    explorer = Explorer(model, toy_val, test_preset=PRESET)
    panel = explorer.view_figure  # the one-view figure, whose artists are checked below
    a = explorer.analysis()
    explorer.view.value = "semantic attention"
    assert explorer.class_name.disabled and not explorer.stage.disabled
    assert (explorer.row.value, explorer.col.value) == (32, 32)  # the centre of the 64x64 scene
    assert np.allclose(_heat(explorer), a.attention_map(0, 32, 32))
    assert panel._window.get_visible()  # stage 1 is windowed: the 7x7 window of cell (8, 8) is cells 7..13
    x, y = panel._window.get_xy()
    assert (x, y, panel._window.get_width()) == (7 * 4 - 0.5, 7 * 4 - 0.5, 7 * 4)
    assert panel._marker.get_xdata()[0] == 32 and panel._marker.get_ydata()[0] == 32
    drawn = panel._heat.get_array()  # zero weights, outside the window, are masked: the image shows there
    assert np.array_equal(np.ma.getmaskarray(drawn), a.attention_map(0, 32, 32) == 0) and drawn.mask.any()
    assert panel._colorbar.mappable.get_cmap().name == "inferno"
    assert panel._colorbar.mappable.get_clim() == (0.0, pytest.approx(a.attention_map(0, 32, 32).max()))

    explorer.stage.value = 3  # global
    assert np.allclose(_heat(explorer), a.attention_map(3, 32, 32))
    assert not panel._window.get_visible() and panel._cell.get_visible()
    assert "global" in explorer.ax.get_title()

    explorer.stage.value = 2
    display = explorer.ax.transData.transform((50, 9))  # a click on pixel (row 9, col 50)
    event = MouseEvent("button_press_event", explorer.figure.canvas, display[0], display[1], button=1)
    explorer.on_click(event)
    assert (explorer.row.value, explorer.col.value) == (9, 50)
    assert np.allclose(_heat(explorer), a.attention_map(2, 9, 50))
    assert not np.allclose(_heat(explorer), a.attention_map(2, 32, 32))
    outside = MouseEvent("button_press_event", explorer.figure.canvas, 1, 1, button=1)  # not on the image
    explorer.on_click(outside)
    assert (explorer.row.value, explorer.col.value) == (9, 50)
    assert "stage 3: &gamma; = +0.500" in explorer.gamma.value and "font-weight:bold" in explorer.gamma.value


def test_explorer_images_of_other_sizes_without_labels(model, toy_val):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)]
    explorer = Explorer(model, images, test_preset=PRESET)
    panel = explorer.view_figure  # the one-view figure, whose artists are checked below
    assert explorer.image.options == (("0: #0", 0), ("1: #1", 1))
    explorer.view.value = "ground truth"
    assert np.array_equal(_picture(explorer), images[0])
    assert "no ground truth for this image" in explorer.ax.get_title()
    assert "no ground truth" in explorer.info.value
    explorer.view.value = "semantic attention"
    explorer.select_pixel(47, 79)
    explorer.image.value = 1
    assert (explorer.row.max, explorer.col.max) == (63, 39)
    assert explorer.col.value <= 39  # the query was moved inside the new image
    assert _heat(explorer).shape == (64, 40)
    assert panel._picture.get_extent() == [-0.5, 39.5, 63.5, -0.5]
    with pytest.raises(IndexError, match=r"pixel \(64, 0\) outside the 64x40 image"):
        explorer.select_pixel(64, 0)
    labelled = Explorer(model, images, labels=[None, np.zeros((64, 40), np.int64)], titles=["a", "b"],
                        test_preset=PRESET)
    labelled.image.value = 1
    labelled.view.value = "error map"
    assert np.array_equal(_picture(labelled), error_map(labelled.analysis().prediction, np.zeros((64, 40), np.int64),
                                                        image=images[1], alpha=0.5))


def test_explorer_on_the_plain_swin_baseline_offers_only_label_views(toy_val):
    torch.manual_seed(0)
    baseline = semask.create_model("swin_toy_fpn", class_names=TOY_CLASSES).eval()
    explorer = Explorer(baseline, toy_val, test_preset=PRESET)
    assert explorer.view.options == ("prediction", "ground truth", "error map")
    assert "no semantic layers" in explorer.gamma.value
    with pytest.raises(ValueError, match="no semantic prior for this image"):
        explorer.analysis().prior_map(0)


def test_explorer_reads_a_segmentation_dataset_without_its_transform(model, toy_val):
    transformed = ToyDataset(toy_val.root, "validation", transform=TestTransform(TestPipelineConfig(scale=(64, 32))))
    explorer = Explorer(model, transformed, test_preset=PRESET)
    assert np.array_equal(explorer.analysis().image, toy_val[0]["image"])  # the original, not the 32-pixel input
    assert explorer.analysis().input_size == (64, 64)


def test_explorer_display_bundle_has_the_widget_and_a_static_picture(model, toy_val):
    explorer = Explorer(model, toy_val, test_preset=PRESET)
    bundle = explorer._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
    assert explorer.snapshot().startswith(b"\x89PNG") and explorer.snapshot("jpeg").startswith(b"\xff\xd8")
    assert base64.b64decode(bundle["image/jpeg"]).startswith(b"\xff\xd8")  # for viewers without a kernel
    assert explorer.figure.canvas in explorer.widget.children[-1].children


def test_explorer_rejects_bad_inputs(model, toy_val):
    normalised = [TestTransform(PRESET)(toy_val[0])]  # sample dicts holding a float (3, H, W) image
    with pytest.raises(ValueError, match="pass the dataset without its transform"):
        Explorer(model, normalised)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        Explorer(model, toy_val, labels=[None, None])
    with pytest.raises(ValueError, match="opacity must lie in"):
        Explorer(model, toy_val, opacity=2.0)
    with pytest.raises(ValueError, match="2 class names for a model with 11 classes"):
        Explorer(model, toy_val, class_names=["a", "b"])
    with pytest.raises(ValueError, match="no images given"):
        Explorer(model, [])
    with pytest.raises(KeyError, match="unknown test pipeline preset 'nope'"):
        Explorer(model, toy_val, test_preset="nope")
    with pytest.raises(ValueError, match=r"label 0 has size \(3, 3\), its image \(64, 64\)"):
        Explorer(model, [toy_val[0]["image"]], labels=[np.zeros((3, 3), np.int64)])


def test_creating_an_explorer_leaves_the_matplotlib_backend_alone(tmp_path):
    """ipympl selects itself as pyplot's backend when first imported; the explorer must not let it (a fresh
    process, so that no earlier import of ipympl hides the effect)."""
    script = (
        "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; import numpy as np\n"
        "import semask; from semask.viz import Explorer\n"
        "fig = plt.figure()\n"
        "explorer = Explorer(semask.create_model('semask_toy_fpn'), np.zeros((64, 64, 3), np.uint8),"
        " test_preset='toy')\n"
        "assert type(explorer.figure.canvas).__name__ == 'Canvas', type(explorer.figure.canvas)\n"
        "print(matplotlib.get_backend(), plt.fignum_exists(fig.number), type(plt.figure().canvas).__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("MPLBACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.lower().split() == ["agg", "true", "figurecanvasagg"]


# --------------------------------------------------------------------------------------------- comparison
def test_compare_shows_each_model_with_its_per_image_miou(model, toy_val):
    torch.manual_seed(1)
    baseline = semask.create_model("swin_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE).eval()
    sample = toy_val[0]
    predictions = {name: semask.predict(m, sample["image"], scale=PRESET.scale)
                   for name, m in (("SeMask", model), ("Swin", baseline))}
    counters = [ForwardCounter(model), ForwardCounter(baseline)]
    comparison = compare({"SeMask": model, "Swin": baseline}, toy_val, test_preset=PRESET, opacity=0.5)
    assert isinstance(comparison, Comparison)
    titles = [ax.get_title() for ax in comparison.axes]
    assert titles[0] == "ground truth"
    for ax, name in zip(comparison.axes[1:], ("SeMask", "Swin")):
        miou = mean_iou(predictions[name], sample["label"], 11)["mIoU"]
        assert ax.get_title() == f"{name}\nmIoU {100 * miou:.1f}%"
        assert np.array_equal(ax.images[0].get_array(), overlay(sample["image"], predictions[name], TOY_PALETTE, 0.5))
    comparison.view.value = "error map"
    assert np.array_equal(comparison.axes[2].images[0].get_array(),
                          error_map(predictions["Swin"], sample["label"], image=sample["image"], alpha=0.5))
    legend = [t.get_text() for t in comparison.axes[-1].get_legend().get_texts()]
    assert legend == ["correct", "wrong", "ignored"]
    assert [c.calls for c in counters] == [1, 1]
    rows = comparison.scores()
    assert [r["image"] for r in rows] == ["toy_val_00000.jpg", "toy_val_00001.jpg", "toy_val_00002.jpg"]
    assert rows[0]["Swin"] == pytest.approx(mean_iou(predictions["Swin"], sample["label"], 11)["mIoU"])
    assert [c.calls for c in counters] == [3, 3] and comparison.model_runs == 6
    comparison.image.value = 2
    assert [c.calls for c in counters] == [3, 3]  # cached by scores()
    table = comparison.scores_markdown().splitlines()
    assert table[0] == "| image | SeMask | Swin |" and table[-1].startswith("| **mean** |")
    assert ERROR_PALETTE  # the legend colours come from the shared palette


def test_compare_rejects_models_of_different_class_counts(model, toy_val):
    other = semask.create_model("swin_toy_fpn", num_classes=5)
    with pytest.raises(ValueError, match="different numbers of classes"):
        compare([model, other], toy_val)
    with pytest.raises(ValueError, match="no models given"):
        compare({}, toy_val)


def test_stage_maps_at_another_test_scale_cover_the_image(model, toy_val):
    """At a test scale other than the image size, maps come back to the original size, cell by cell."""
    a = analyse_image(model, toy_val[0]["image"], test_preset=TestPipelineConfig(scale=(200, 50)))
    assert a.input_size == (50, 50)
    probs = a.stage_priors[1][:1]  # 1, 7, 7 at stride 8 of a 50x50 input (the last cell partly outside)
    grid = F.interpolate(probs[None], size=(56, 56), mode="bilinear", align_corners=False)[0, :, :50, :50]
    expected = F.interpolate(grid[None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    assert np.allclose(a.prior_map(1, 0), expected.numpy(), atol=1e-6)
    assert a.attention_map(3, 63, 63).shape == (64, 64)


def test_plot_stage_priors_plot_attention_and_the_explorer_draw_the_same_pixels(model):
    """On an input whose sides are not multiples of 32, every viewer maps a stage cell to its stride block of the
    input, crops the padding and resizes to the image (`semask.viz.stages.stage_to_image`): the same pixels."""
    image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    preset = TestPipelineConfig(scale=(150, 60))  # 50x70 -> a 60x84 input; stage 4 is a 2x3 grid, padded
    explorer = Explorer(model, image, test_preset=preset, opacity=0.5)
    panel = explorer.view_figure  # the one-view figure, whose artists are checked below
    a = explorer.analysis()
    assert a.input_size == (60, 84)
    _, out = Predictor(model, test_config=preset).predict_with_output(image, return_attention=True)
    water = TOY_CLASSES.index("water")
    argmax = plot_stage_priors(out, image=image, palette=TOY_PALETTE, alpha=0.5)
    scores = plot_stage_priors(out, image=image, class_index=water)
    explorer.view.value = "semantic prior"
    for stage in range(4):
        explorer.stage.value = stage
        explorer.class_name.value = -1  # argmax
        assert np.array_equal(argmax.axes[stage].images[0].get_array(), _picture(explorer))
        explorer.class_name.value = water
        assert np.allclose(scores.axes[stage].images[1].get_array(), _heat(explorer), atol=1e-6)
    stretched = F.interpolate(out.stage_priors[3].softmax(1)[:, water:water + 1], size=(50, 70), mode="bilinear",
                              align_corners=False)[0, 0].numpy()
    assert not np.allclose(_heat(explorer), stretched, atol=1e-3)  # the old whole-image stretch differs

    explorer.view.value = "semantic attention"
    explorer.select_pixel(45, 66)
    for stage in range(4):
        explorer.stage.value = stage
        r, c = a.query_cell(stage, 45, 66)
        fig = plot_attention(out.attentions[stage], r, c, image=image, input_size=a.input_size)
        assert np.allclose(fig.axes[0].images[1].get_array(), _heat(explorer))
        if out.attentions[stage].window_size is not None:
            (window,) = fig.axes[0].patches
            assert window.get_xy() == panel._window.get_xy()
            assert (window.get_width(), window.get_height()) == (panel._window.get_width(),
                                                                 panel._window.get_height())
    matplotlib.pyplot.close("all")
