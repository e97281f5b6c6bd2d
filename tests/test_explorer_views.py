"""Tests for the explorer's further views: every stage at once, a timeline over a run's snapshots, and the image's
own `semask.analyze` numbers beside the view (`semask.viz.explorer_figures`, `semask.viz.timeline`).

Controls are changed the way the mouse would (``control.value = ...``); what is drawn is read back from the
figures' artists and checked against independent computations (the token under a pixel from the stride, the
snapshot's model loaded and run on its own, `semask.analyze` on a dataset of the one image).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; set here, never at import of semask

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.backend_bases import MouseEvent  # noqa: E402

import semask  # noqa: E402
from helpers import randomize_gammas  # noqa: E402
from semask.data import TOY_CLASSES, TOY_PALETTE, TestPipelineConfig, ToyDataset, make_toy_dataset  # noqa: E402
from semask.engine.rundir import list_snapshots  # noqa: E402
from semask.errors import UsageError  # noqa: E402
from semask.viz import Explorer, analyse_image, overlay  # noqa: E402
from semask.viz.appkit import snapshot_bytes  # noqa: E402

PRESET = TestPipelineConfig(scale=(256, 64))  # keeps the 64-pixel test scenes at their size


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory) -> ToyDataset:
    root = make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", num_train=1, num_val=3, size=64)
    return ToyDataset(root, "validation")


def _model(seed: int, gamma: float = 0.5) -> semask.SeMaskFPN:
    torch.manual_seed(seed)
    model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE).eval()
    randomize_gammas(model, gamma)
    return model


@pytest.fixture
def model() -> semask.SeMaskFPN:
    return _model(0)


def _marker(ax) -> tuple[float, float]:
    """The centre of the cross drawn on the query's token (the panel's one line)."""
    (line,) = ax.lines
    return float(line.get_xdata()[0]), float(line.get_ydata()[0])


def _rendered(figure) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba()).copy()


# --------------------------------------------------------------------------------------------- all stages
def test_all_stages_marks_the_query_on_each_stages_own_token(model):
    """A 50x70 image run at 60x84: pixel (45, 66) is input pixel (54, 79); at stride s its token is
    (54 // s, 79 // s) and the cross sits at the centre of that token's s x s block, mapped back to the image."""
    image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    explorer = Explorer(model, image, test_preset=TestPipelineConfig(scale=(150, 60)), opacity=0.5)
    a = explorer.analysis()
    assert a.input_size == (60, 84)
    explorer.view.value = "all stages"
    explorer.select_pixel(45, 66)
    grid = explorer.grid
    assert len(grid.attention_axes) == len(grid.prior_axes) == 4
    assert explorer.figure.canvas.layout.display == "none" and grid.figure.canvas.layout.display is None
    assert explorer.stage.disabled and not explorer.class_name.disabled
    for i, stride in enumerate((4, 8, 16, 32)):
        r, c = 54 // stride, 79 // stride
        # the token's block of input pixels, its last row / column cut at the input's edge, scaled to the image
        y0, y1 = r * stride * 50 / 60, min((r + 1) * stride, 60) * 50 / 60
        x0, x1 = c * stride * 70 / 84, min((c + 1) * stride, 84) * 70 / 84
        expected = ((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5)
        for ax in (grid.attention_axes[i], grid.prior_axes[i]):
            assert _marker(ax) == pytest.approx(expected)
        attention = grid.attention_axes[i].images[1].get_array()
        assert np.allclose(np.ma.getdata(attention), a.attention_map(i, 45, 66))
        assert np.array_equal(np.ma.getmaskarray(attention), a.attention_map(i, 45, 66) == 0)
        assert np.array_equal(grid.prior_axes[i].images[0].get_array(),
                              overlay(image, a.prior_map(i), TOY_PALETTE, 0.5))
        assert grid.attention_axes[i].get_title().startswith(f"stage {i + 1}: ")
    assert "7x7 windows" in grid.attention_axes[0].get_title() and "global" in grid.attention_axes[3].get_title()
    assert "query pixel (45, 66)" in grid.figure.get_suptitle()
    assert explorer.snapshot() == snapshot_bytes(grid.figure, "png")  # the view's own figure

    before = _rendered(grid.figure)
    explorer.class_name.value = TOY_CLASSES.index("water")  # the priors' row turns to P(water)
    for i in range(4):
        assert np.allclose(grid.prior_axes[i].images[1].get_array(), a.prior_map(i, 1))
    assert grid.prior_axes[0].get_title() == "stage 1 prior: water"
    display = grid.prior_axes[2].transData.transform((4, 3))  # a click on pixel (row 3, col 4) of a panel
    explorer.on_click(MouseEvent("button_press_event", grid.figure.canvas, display[0], display[1], button=1))
    assert (explorer.row.value, explorer.col.value) == (3, 4)
    # pixel (3, 4) is in stage 4's token (0, 0): input pixels [0, 32) x [0, 32)
    assert _marker(grid.attention_axes[3]) == pytest.approx((32 * 70 / 84 / 2 - 0.5, 32 * 50 / 60 / 2 - 0.5))
    assert not np.array_equal(_rendered(grid.figure), before)
    explorer.view.value = "prediction"  # back to the one-panel figure
    assert explorer.figure.canvas.layout.display is None and grid.figure.canvas.layout.display == "none"


def test_all_stages_shows_a_stage_without_a_semantic_layer_as_such(model):
    """A model whose stage 1 has no semantic layer (taken out): that column says so; the others keep their
    strides (8, 16, 32) and their own tokens."""
    model.backbone.layers[0].semantic_layer = None
    image = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    explorer = Explorer(model, image, test_preset=PRESET)
    assert explorer.analysis().strides == (8, 16, 32)
    explorer.view.value = "all stages"
    explorer.select_pixel(40, 21)
    grid = explorer.grid
    for ax in (grid.attention_axes[0], grid.prior_axes[0]):
        assert [t.get_text() for t in ax.texts] == ["no semantic layer"] and not ax.lines
    for i, stride in ((1, 8), (2, 16), (3, 32)):
        r, c = 40 // stride, 21 // stride
        assert _marker(grid.attention_axes[i]) == pytest.approx(((c + 0.5) * stride - 0.5, (r + 0.5) * stride - 0.5))


# --------------------------------------------------------------------------------------------- timeline
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[int, semask.SeMaskFPN]:
    """The models written as snapshots, by step."""
    return {step: _model(seed, gamma=0.2 * seed) for step, seed in ((100, 1), (20, 2), (300, 3))}


@pytest.fixture
def run_dir(tmp_path, saved):
    """A run directory with three weights-only snapshots of different weights, and files that are not snapshots."""
    run = tmp_path / "run"
    run.mkdir()
    for step, model in saved.items():  # written out of order
        semask.save_checkpoint(run / f"iter_{step:06d}.pth", model)
    (run / "log.jsonl").write_text("")
    (run / "iter_notastep.pth").write_text("")
    return run


def test_list_snapshots_in_step_order(run_dir, tmp_path):
    assert list_snapshots(run_dir) == [(s, run_dir / f"iter_{s:06d}.pth") for s in (20, 100, 300)]
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        list_snapshots(tmp_path / "nope")


@pytest.mark.slow  # reads several checkpoints
def test_timeline_shows_the_model_at_each_snapshot(run_dir, saved, toy_val):
    explorer = Explorer.from_run(run_dir, toy_val, test_preset=PRESET, snapshot_cache=2)
    assert explorer.timeline.options == (("20", 0), ("100", 1), ("300", 2))
    assert explorer.timeline.value == 2 and explorer.step == 300  # starts at the last snapshot
    assert explorer.snapshots.loads == 1
    assert explorer.ax.get_title().startswith("toy_val_00000.jpg · step 300\n")
    explorer.view.value = "semantic attention"
    explorer.stage.value = 2
    explorer.select_pixel(40, 21)
    drawn = {}
    for index, step in ((0, 20), (1, 100), (2, 300)):
        explorer.timeline.value = index
        assert explorer.ax.get_title() == f"toy_val_00000.jpg · step {step}\nstage 3 semantic attention (global, " \
                                          "4x4 tokens)"
        assert (explorer.view.value, explorer.stage.value, explorer.row.value, explorer.col.value) == \
            ("semantic attention", 2, 40, 21)  # the same view and query
        reference = analyse_image(saved[step], toy_val[0]["image"], test_preset=PRESET)  # the model saved there
        assert np.allclose(explorer.heat, reference.attention_map(2, 40, 21))
        assert f"stage 3: &gamma; = +{0.2 * (2, 1, 3)[index]:.3f}" in explorer.gamma.value
        drawn[step] = _rendered(explorer.figure)
        assert f"step {step}" in explorer.measures.figure.get_suptitle()
    assert not np.array_equal(drawn[20], drawn[100]) and not np.array_equal(drawn[100], drawn[300])
    # memory stays bounded: two models kept, so 300 (shown first), 20, 100, 300 again meant four reads
    assert explorer.snapshots.held == 2 and explorer.snapshots.loads == 4
    runs = explorer.model_runs
    explorer.timeline.value = 0  # step 20 was let go: read again; its image analysis is still cached
    assert explorer.snapshots.loads == 5 and explorer.model_runs == runs
    explorer.view.value = "all stages"
    assert explorer.grid.figure.get_suptitle().startswith("toy_val_00000.jpg · step 20\n")


@pytest.mark.slow  # reads several checkpoints
def test_timeline_rejects_snapshots_of_another_model(run_dir, tmp_path, toy_val):
    other = tmp_path / "other.pth"
    semask.save_checkpoint(other, semask.create_model("semask_toy_fpn", num_classes=5))
    explorer = Explorer(_model(0), toy_val, test_preset=PRESET, snapshots={1: other, 2: run_dir / "iter_000020.pth"})
    with pytest.raises(UsageError, match=r"snapshot '.*other.pth' \(step 1\) is a semask_toy_fpn model that differs "
                                          r"from the explorer's semask_toy_fpn in num_classes"):
        explorer.timeline.value = 0
    assert explorer.timeline.value == 1 and explorer.step == 2  # the slider went back to the snapshot shown
    with pytest.raises(UsageError, match="holds no iter_NNNNNN.pth snapshots"):
        Explorer.from_run(tmp_path, toy_val)
    with pytest.raises(FileNotFoundError, match=r"snapshot '.*gone.pth' \(step 5\) does not exist"):
        Explorer(None, toy_val, snapshots=[(5, tmp_path / "gone.pth")])
    with pytest.raises(UsageError, match="step 20 given more than once"):
        Explorer(None, toy_val, snapshots=[(20, other), (20, other)])
    with pytest.raises(UsageError, match=r"^Explorer: a model is needed \(None only with snapshots="):
        Explorer(None, toy_val)


# --------------------------------------------------------------------------------------------- the image's numbers
class _OneImage:
    """A dataset of one image of another dataset (what `semask.analyze` reads: ``load``, ``class_names``)."""

    def __init__(self, dataset, index: int):
        self.dataset, self.index, self.class_names = dataset, index, dataset.class_names

    def __len__(self) -> int:
        return 1

    def load(self, index: int):
        return self.dataset.load(self.index)


def test_measures_beside_the_view_are_semask_analyze_of_the_image(model, toy_val):
    explorer = Explorer(model, toy_val, test_preset=PRESET)
    runs = explorer.model_runs
    explorer.image.value = 1
    assert explorer.model_runs == runs + 1  # measured in the same forward as the views
    measured = explorer.analysis().measures
    expected = semask.analyze(model, _OneImage(toy_val, 1), test_config=PRESET, progress=False)
    got, want = measured.to_dict(), expected.to_dict()
    got.pop("seconds"), want.pop("seconds")
    assert got == want and got["num_images"] == 1
    assert all(s["same_class_attention"] is not None for s in got["stages"])
    prior_axes = explorer.measures.axes[0]  # the bars are those numbers, in percent
    heights = [bar.get_height() for bar in prior_axes.patches]
    assert heights == pytest.approx([100 * s["prior_mIoU"] for s in want["stages"]]
                                    + [100 * want["decoder_prior_mIoU"]])
    same = [bar.get_height() for bar in explorer.measures.axes[1].patches]
    assert same == pytest.approx([100 * s["same_class_attention"] for s in want["stages"]]
                                 + [100 * s["same_class_chance"] for s in want["stages"]])
    assert explorer.measures.figure.get_suptitle() == "measured on this image"


def test_measures_need_a_label_and_can_be_left_out(model, toy_val):
    image = toy_val[0]["image"]
    explorer = Explorer(model, image, test_preset=PRESET)
    assert explorer.analysis().measures is None
    assert not any(ax.get_visible() for ax in explorer.measures.axes)
    texts = [t.get_text() for t in explorer.measures.figure.texts]
    assert "no ground truth for this image: nothing to measure" in texts
    bare = Explorer(model, toy_val, test_preset=PRESET, show_analysis=False)
    assert bare.measures is None and bare.analysis().measures is None
    baseline = Explorer(semask.create_model("swin_toy_fpn"), toy_val, test_preset=PRESET)
    assert baseline.measures is None and baseline.grid is None and "all stages" not in baseline.view.options
