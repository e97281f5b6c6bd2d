"""`semask.analyze`: per-stage prior quality, semantic-attention statistics and gates, checked against answers
computed here by hand (numpy, plain loops) and on hand-built attention maps."""
from __future__ import annotations

import dataclasses
import json
import math

import matplotlib

matplotlib.use("Agg")  # headless; set here, never at import of semask

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import semask  # noqa: E402
from semask.data import TOY_CLASSES, TOY_PALETTE, ToyDataset, make_toy_dataset  # noqa: E402
from semask.data.transforms import TEST_PRESETS  # noqa: E402
from semask.engine.analysis import Analysis, StageAnalysis, analyze, stage_gammas  # noqa: E402
from semask.engine.attention_stats import (SUM_NAMES, attention_sums, attention_summary, prior_labels,  # noqa: E402
                                           token_classes)
from semask.engine.inference import Predictor  # noqa: E402
from semask.errors import UsageError, UsageTypeError  # noqa: E402
from semask.model.semantic import SemanticAttentionMap  # noqa: E402
from semask.viz import plot_class_attention, plot_stage_analysis  # noqa: E402
from helpers import randomize_gammas  # noqa: E402

SMALL = dataclasses.replace(TEST_PRESETS["toy"], scale=(256, 64))  # the toy test pipeline; 64 px stays 64 px
K = len(TOY_CLASSES)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("analysis") / "toy", seed=1, num_train=2, num_val=3, size=64)


@pytest.fixture(scope="module")
def model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    net = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE)
    randomize_gammas(net, 0.5)
    with torch.no_grad():  # sharper attention than at initialisation: entropies away from 1
        for name, p in net.named_parameters():
            if "mlp_cls_q" in name or "mlp_cls_k" in name:
                p.mul_(8.0)
    return net.eval()


@pytest.fixture(scope="module")
def analysis(model, toy_root) -> Analysis:
    return analyze(model, ToyDataset(toy_root, "validation"), test_config=SMALL, progress=False)


# ----------------------------------------------------------------------------------------------- numpy references
def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a bilinear resize along one axis (align_corners=False, as PyTorch)."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def _bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W), float64."""
    r0, r1, ry = _bilinear_axis(x.shape[1], size[0])
    c0, c1, cx = _bilinear_axis(x.shape[2], size[1])
    rows = x[:, r0] * (1 - ry)[None, :, None] + x[:, r1] * ry[None, :, None]
    return rows[:, :, c0] * (1 - cx)[None, None, :] + rows[:, :, c1] * cx[None, None, :]


def _prior_on_label(logits: np.ndarray, stride: int, input_size, image_size) -> np.ndarray:
    """A stage prior as labels of the image: cells to their stride blocks, padding cropped, to the image."""
    k, h, w = logits.shape
    up = _bilinear(logits.astype(np.float64), (h * stride, w * stride))[:, :input_size[0], :input_size[1]]
    if tuple(input_size) != tuple(image_size):
        up = _bilinear(up, image_size)
    return up.argmax(0)


def _scores(pred: np.ndarray, label: np.ndarray, k: int) -> tuple[float, float, float]:
    """mIoU, mAcc, aAcc by their definitions, over the labelled pixels (label 255 ignored)."""
    ious, accs, hits, total = [], [], 0, 0
    for c in range(k):
        lab, prd = (label == c), (pred == c) & (label != 255)
        inter, union = int((lab & prd).sum()), int((lab | prd).sum())
        if union:
            ious.append(inter / union)
        if lab.sum():
            accs.append(inter / int(lab.sum()))
        hits, total = hits + inter, total + int(lab.sum())
    return float(np.mean(ious)), float(np.mean(accs)), hits / total


def test_prior_labels_match_numpy_on_a_padded_grid() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3, 4)).astype(np.float32)  # a 3x4 grid over a 10x13 input at stride 4
    got = prior_labels(torch.from_numpy(logits), (10, 13), (7, 9)).numpy()
    np.testing.assert_array_equal(got, _prior_on_label(logits, 4, (10, 13), (7, 9)))
    same = prior_labels(torch.from_numpy(logits), (12, 16), (12, 16)).numpy()  # no padding, no second resize
    np.testing.assert_array_equal(same, _prior_on_label(logits, 4, (12, 16), (12, 16)))


def test_stage_and_decoder_prior_scores_match_an_independent_computation(model, toy_root, analysis) -> None:
    ds = ToyDataset(toy_root, "validation")
    predictor = Predictor(model, test_config=SMALL)
    preds = {i: [] for i in range(5)}  # stage 0..3, then the decoder prior
    labels = []
    for i in range(len(ds)):
        sample = ds.load(i)
        _, out = predictor.predict_with_output(sample["image"])
        input_size, image_size = tuple(out.logits.shape[-2:]), sample["label"].shape
        for s, prior in enumerate(out.stage_priors):
            preds[s].append(_prior_on_label(prior[0].numpy(), 2 ** (s + 2), input_size, image_size))
        preds[4].append(_prior_on_label(out.prior_logits[0].numpy(), 4, input_size, image_size))
        labels.append(sample["label"])
    label = np.concatenate([lab.ravel() for lab in labels])
    for s in range(5):
        miou, macc, aacc = _scores(np.concatenate([p.ravel() for p in preds[s]]), label, K)
        entry = analysis.stages[s].prior_metrics if s < 4 else analysis.decoder_prior_metrics
        assert entry["mIoU"] == pytest.approx(miou, abs=1e-12), s
        assert entry["mAcc"] == pytest.approx(macc, abs=1e-12) and entry["aAcc"] == pytest.approx(aacc, abs=1e-12)
    assert len({round(analysis.stages[s].prior_mIoU, 6) for s in range(4)}) > 1  # the stages really differ


def test_token_classes_take_the_majority_of_their_pixels() -> None:
    label = np.full((8, 8), 255, np.int64)
    label[:4, :4] = 1                       # cell (0, 0): all class 1
    label[:4, 4:] = 2
    label[1, 4:8] = 0                       # cell (0, 1): 12 x class 2, 4 x class 0 -> 2
    label[4:, :4] = 255                     # cell (1, 0): nothing labelled -> -1
    label[4:6, 4:] = 3
    label[6:, 4:] = 0                       # cell (1, 1): a tie of 8 and 8 -> the lower id, 0
    got = token_classes(torch.from_numpy(label), (2, 2), 4, (8, 8), 4)
    assert got.tolist() == [[1, 2], [-1, 0]]
    # the input was the image x 2 (the test scale): pixel (y, x) of the image is input pixel (2y, 2x)
    small = torch.from_numpy(label[::2, ::2].copy())
    assert token_classes(small, (2, 2), 4, (8, 8), 4).tolist() == [[1, 2], [-1, 0]]


# ----------------------------------------------------------------------------------------------- hand-built maps
CLASSES = torch.tensor([[0, 0, 1], [0, 1, 1], [2, 2, -1]])  # a 3x3 map: windows of 2 pad it to 4x4


def _uniform_windowed() -> SemanticAttentionMap:
    return SemanticAttentionMap(torch.full((1, 2, 2, 4, 4), 0.25), 2, 3, 3)


def test_uniform_attention_has_entropy_one_and_the_chance_share() -> None:
    sums, mass = attention_sums(_uniform_windowed(), CLASSES, 4, 3)
    out = attention_summary(sums, mass)
    # windows: [0,0,0,1] -> 3 queries at 3/4 and one at 1/4; [1,pad,1,pad] -> 2 at 2/4; [2,2,pad,pad] -> 2 at
    # 2/4; [-1,pad,pad,pad] -> no query
    assert out["num_tokens"] == 8
    assert out["same_class_chance"] == pytest.approx(4.5 / 8)
    assert out["same_class_attention"] == pytest.approx(out["same_class_chance"])
    assert out["attention_entropy"] == pytest.approx(1.0)
    # a 2x2 window at stride 4: distances 0, 4, 4 and 4 * sqrt(2) from every query
    assert out["attention_distance_px"] == pytest.approx((8 + 4 * math.sqrt(2)) / 4)
    rows = out["class_attention"]
    np.testing.assert_allclose(rows.sum(1), 1.0)
    # class 0's queries (3 of them, window 1) put 3/4 on class 0 and 1/4 on class 1, class 2's stay among 2s
    np.testing.assert_allclose(rows[0], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(rows[2], [0.0, 0.0, 1.0])


def test_one_hot_attention_on_a_same_class_token() -> None:
    # global 2x3 map, stride 8: each query looks only at the token of its class farthest to its right
    classes = torch.tensor([[0, 0, 1], [1, 1, 1]])
    target = {0: 1, 1: 1, 2: 2, 3: 5, 4: 5, 5: 5}  # token index -> the key it attends
    weights = torch.zeros(1, 1, 1, 6, 6)
    for q, k in target.items():
        weights[0, 0, 0, q, k] = 1.0
    out = attention_summary(*attention_sums(SemanticAttentionMap(weights, None, 2, 3), classes, 8, 2))
    assert out["num_tokens"] == 6 and out["same_class_attention"] == pytest.approx(1.0)
    assert out["attention_entropy"] == pytest.approx(0.0, abs=1e-7)
    assert out["same_class_chance"] == pytest.approx((2 / 6 * 2 + 4 / 6 * 4) / 6)
    # distances in cells 1, 0, 0, 2, 1, 0 -> 4 / 6 cells of 8 px
    assert out["attention_distance_px"] == pytest.approx(8 * 4 / 6)
    np.testing.assert_allclose(out["class_attention"], np.eye(2))


def test_class_matrix_rows_sum_to_one_and_match_a_plain_loop() -> None:
    torch.manual_seed(0)
    weights = torch.randn(1, 2, 2, 4, 4).mul(3).softmax(-1)
    amap = SemanticAttentionMap(weights, 2, 3, 3)
    sums, mass = attention_sums(amap, CLASSES, (4, 8), 3)
    expected = np.zeros(len(SUM_NAMES))
    expected_mass = np.zeros((3, 3))
    padded = np.full((4, 4), -1)
    padded[:3, :3] = CLASSES.numpy()
    for wr in range(2):
        for wc in range(2):
            cells = [(wr * 2 + i // 2, wc * 2 + i % 2) for i in range(4)]
            for q, (qr, qc) in enumerate(cells):
                cq = padded[qr, qc]
                if cq < 0:
                    continue
                a = weights[0, wr, wc, q].double().numpy()
                dist = [math.hypot(4 * (kr - qr), 8 * (kc - qc)) for kr, kc in cells]
                same = sum(a[k] for k, (kr, kc) in enumerate(cells) if padded[kr, kc] == cq)
                chance = sum(padded[kr, kc] == cq for kr, kc in cells) / 4
                expected += [1, -(a * np.log(a)).sum() / math.log(4), float(np.dot(a, dist)), same, chance]
                for k, (kr, kc) in enumerate(cells):
                    if padded[kr, kc] >= 0:
                        expected_mass[cq, padded[kr, kc]] += a[k]
    np.testing.assert_allclose(sums.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(mass.numpy(), expected_mass, rtol=1e-5)
    rows = attention_summary(sums, mass)["class_attention"]
    np.testing.assert_allclose(rows.sum(1), 1.0)


def test_a_class_without_query_tokens_is_a_nan_row() -> None:
    sums, mass = attention_sums(_uniform_windowed(), CLASSES, 4, 5)  # classes 3 and 4 never occur
    rows = attention_summary(sums, mass)["class_attention"]
    assert rows.shape == (5, 5) and np.isnan(rows[3:]).all() and not np.isnan(rows[:3]).any()


def test_attention_sums_refuse_classes_of_another_grid() -> None:
    with pytest.raises(UsageError, match="3x3 layer"):
        attention_sums(_uniform_windowed(), torch.zeros(2, 3, dtype=torch.long), 4, 3)


# ----------------------------------------------------------------------------------------------- the real model
def test_analyze_the_toy_model(model, toy_root, analysis) -> None:
    assert analysis.num_images == 3 and len(analysis.stages) == 4
    assert [s.window_size for s in analysis.stages] == [7, 7, None, None]  # the toy model's global stages 3-4
    assert [s.stride for s in analysis.stages] == [4, 8, 16, 32]
    assert [s.gamma for s in analysis.stages] == stage_gammas(model) == [[0.5]] * 4
    expected = semask.evaluate(model, ToyDataset(toy_root, "validation"), test_config=SMALL, progress=False)
    assert analysis.metrics["mIoU"] == expected.mIoU  # the protocol's own forward and prediction
    np.testing.assert_array_equal(analysis.confusion, expected.confusion)
    for s in analysis.stages:
        assert s.semantic and s.num_tokens > 0
        assert 0 <= s.attention_entropy <= 1 + 1e-6 and s.attention_distance_px > 0
        assert 0 <= s.same_class_attention <= 1 and 0 < s.same_class_chance <= 1
        rows = s.class_attention
        assert rows.shape == (K, K)
        defined = ~np.isnan(rows).any(1)
        assert defined.any() and np.allclose(rows[defined].sum(1), 1.0)
        assert 0 <= s.prior_metrics["aAcc"] <= 1 and s.prior_confusion.sum() == expected.confusion.sum()
    assert analysis.stages[0].num_tokens <= 16 * 16 * 3 and analysis.stages[3].num_tokens <= 2 * 2 * 3


def test_to_dict_round_trips_json(analysis, tmp_path) -> None:
    data = analysis.to_dict()
    assert {"decoder_prior_mIoU", "num_images", "stages", "mIoU"} <= set(data)
    keys = {"prior_mIoU", "prior_aAcc", "attention_entropy", "attention_distance_px", "same_class_attention",
            "same_class_chance", "class_attention", "gamma"}
    assert all(keys <= set(stage) for stage in data["stages"])
    assert json.loads(json.dumps(data, allow_nan=False)) == data  # strict JSON: no NaN, only plain types
    assert json.loads(analysis.save_json(tmp_path / "a.json").read_text()) == data
    stage = data["stages"][0]
    assert 0 <= stage["prior_mIoU"] <= 1 and 0 <= stage["same_class_attention"] <= 1  # fractions, not percent
    assert len(stage["class_attention"]) == K and all(len(row) == K for row in stage["class_attention"])
    table = analysis.table()
    assert "Decoder prior: mIoU" in table and "global" in table and len(table.splitlines()) == 2 + 4 + 2


def test_plain_swin_has_no_semantic_entries(toy_root) -> None:
    torch.manual_seed(0)
    baseline = semask.create_model("swin_toy_fpn", class_names=TOY_CLASSES)
    result = analyze(baseline, ToyDataset(toy_root, "validation"), test_config=SMALL, max_images=2, progress=False)
    assert result.num_images == 2 and result.decoder_prior_metrics is None
    data = result.to_dict()
    assert data["decoder_prior_mIoU"] is None and data["mIoU"] is not None and len(data["stages"]) == 4
    for stage in data["stages"]:
        for key in ("prior_mIoU", "prior_aAcc", "attention_entropy", "attention_distance_px",
                    "same_class_attention", "same_class_chance", "class_attention", "gamma"):
            assert stage[key] is None, key
    assert "Decoder prior: mIoU -" in result.table()
    with pytest.raises(UsageError, match="no semantic layer"):
        plot_class_attention(result, 1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_images": 0}, UsageError, "max_images must be a positive int"),
    ({"max_images": "3"}, UsageTypeError, "max_images must be a positive int"),
    ({"max_images": True}, UsageTypeError, "max_images must be a positive int"),
])
def test_bad_arguments_are_usage_errors(model, toy_root, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        analyze(model, ToyDataset(toy_root, "validation"), progress=False, **kwargs)


class _Samples:
    """A dataset of given samples (dataset[i]), with the toy classes."""

    class_names = TOY_CLASSES

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _image_with(toy_root, label) -> dict:
    return {"image": ToyDataset(toy_root, "validation").load(0)["image"], "label": label, "path": "x.jpg"}


@pytest.mark.parametrize("make, error, match", [
    (lambda root: ("model", ToyDataset(root, "validation")), UsageTypeError, "model must be a SeMaskFPN"),
    (lambda root: (None, _Samples([("image", "label")])), UsageError, "must be a dict with an 'image' and its"),
    (lambda root: (None, _Samples([])), UsageError, "has no images"),
    (lambda root: (None, _Samples([_image_with(root, np.zeros((30, 64), np.uint8))])), UsageError,
     r"image 0 \(x.jpg\) is \(64, 64\) pixels but its label is \(30, 64\)"),
    (lambda root: (None, _Samples([_image_with(root, np.full((64, 64), 40, np.uint8))])), UsageError,
     r"image 0 \(x.jpg\): label values \[40\] are outside 0..10"),
])
def test_bad_inputs_are_usage_errors_naming_the_image(model, toy_root, make, error, match) -> None:
    net, dataset = make(toy_root)
    with pytest.raises(error, match=match):
        analyze(net if net is not None else model, dataset, test_config=SMALL, progress=False)


def test_unlabelled_and_one_pixel_images_give_none_not_nan(model, toy_root) -> None:
    unlabelled = _image_with(toy_root, np.full((64, 64), 255, np.uint8))
    tiny = {"image": np.zeros((1, 1, 3), np.uint8), "label": np.full((1, 1), 255, np.uint8)}
    data = analyze(model, _Samples([unlabelled, tiny]), test_config=SMALL, progress=False).to_dict()
    assert data["mIoU"] is None and data["decoder_prior_mIoU"] is None
    assert all(s["attention_entropy"] is None and s["num_tokens"] == 0 for s in data["stages"])
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    one = analyze(model, _Samples([{**tiny, "label": np.zeros((1, 1), np.uint8)}]), test_config=SMALL,
                  progress=False)
    # the 1-pixel image is seen at the test scale, 64 x 64: one labelled token per stage, among 7 x 7 window keys
    # (stages 1-2, padding included) or the 4 x 4 and 2 x 2 maps of the global stages 3-4
    assert [s.num_tokens for s in one.stages] == [1, 1, 1, 1]
    assert [s.same_class_chance for s in one.stages] == pytest.approx([1 / 49, 1 / 49, 1 / 16, 1 / 4])
    assert all(0 < s.attention_entropy <= 1 + 1e-6 for s in one.stages)


def test_a_model_of_other_classes_is_refused(toy_root) -> None:
    other = semask.create_model("semask_toy_fpn", num_classes=5)
    with pytest.raises(UsageError, match="predicts 5 classes"):
        analyze(other, ToyDataset(toy_root, "validation"), progress=False)


# ----------------------------------------------------------------------------------------------- plots
def test_plot_stage_analysis_draws_three_panels(analysis) -> None:
    fig = plot_stage_analysis(analysis, title="toy")
    prior, same, entropy = fig.axes[:3]
    assert len(prior.patches) == 5 and len(same.patches) == 8 and len(entropy.patches) == 4
    assert prior.patches[0].get_height() == pytest.approx(100 * analysis.stages[0].prior_mIoU)
    assert same.patches[4].get_height() == pytest.approx(100 * analysis.stages[0].same_class_chance)
    again = plot_stage_analysis(json.loads(json.dumps(analysis.to_dict())))  # from a --json file
    assert [p.get_height() for p in again.axes[0].patches] == [p.get_height() for p in prior.patches]


def test_plot_class_attention_names_the_classes(analysis) -> None:
    fig = plot_class_attention(analysis, 3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TOY_CLASSES)
    assert "stage 3" in ax.get_title() and "chance" in ax.get_title()
    shown = ax.images[0].get_array()
    assert np.allclose(shown.filled(np.nan)[~shown.mask.any(1)].sum(1), 1.0)


@pytest.mark.parametrize("call, match", [
    (lambda a: plot_class_attention(a, 5), "stage must be one of"),
    (lambda a: plot_class_attention(a, 1, class_names=["a"]), "1 class names"),
    (lambda a: plot_stage_analysis({"no": "stages"}), "expected a semask.analyze"),
])
def test_plot_errors_name_the_plot(analysis, call, match) -> None:
    with pytest.raises((UsageError, UsageTypeError), match=match):
        call(analysis)


def test_stage_analysis_defaults_are_empty() -> None:
    entry = StageAnalysis(stage=1, stride=4).to_dict()
    assert entry["prior_mIoU"] is None and entry["class_attention"] is None and entry["semantic"] is False
