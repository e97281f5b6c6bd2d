"""The shareable explorer page (`semask.viz.page`, `Explorer.save_html`, ``semask analyze --html``), without a
browser: the views it holds, decoded from the written file, against the explorer's own computations; no outside
resource; the size budget; the output checks. (`tests/test_page_browser.py` operates the page in Chromium.)
"""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semask
from helpers import page_data, randomize_gammas
from semask.apps.cli import main
from semask.data import TOY_CLASSES, TOY_PALETTE, TestPipelineConfig, ToyDataset, make_toy_dataset
from semask.errors import OutputExistsError, UsageError
from semask.viz import analyse_image, colorize, error_map
from semask.viz.page import page_html, page_source, save_page

PRESET = TestPipelineConfig(scale=(256, 64))  # keeps the 64-pixel test scenes at their size


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", seed=3, num_train=1, num_val=3, size=64)


@pytest.fixture(scope="module")
def model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE).eval()
    randomize_gammas(model, 0.5)
    return model


def decoded(uri: str) -> np.ndarray:
    assert re.match(r"data:image/(png|jpeg);base64,", uri), uri[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_the_page_holds_the_explorers_views(model, toy_root, tmp_path):
    val = ToyDataset(toy_root, "validation")
    path = save_page(page_source(model, val, test_preset=PRESET), tmp_path / "page.html", query_grid=4)
    data = page_data(path.read_text())
    assert len(data["images"]) == 3 and data["grid"] == 4 and [s["index"] for s in data["stages"]] == [0, 1, 2, 3]
    assert data["stages"][2]["gamma"] == [0.5]
    sample = val.load(1)
    a = analyse_image(model, sample["image"], sample["label"], test_preset=PRESET)  # an independent pass
    im = data["images"][1]
    assert im["size"] == im["shown"] == [64, 64] and im["title"] == val.pairs[1][0].name
    assert im["miou"] == pytest.approx(a.miou)
    palette = np.asarray(TOY_PALETTE)
    # label views: exact palette colours; ignored pixels transparent, so the image shows as in `overlay`
    prediction = decoded(im["layers"]["prediction"]["png"])
    assert (prediction[..., :3] == colorize(a.prediction, palette)).all() and (prediction[..., 3] == 255).all()
    truth = decoded(im["layers"]["ground truth"]["png"])
    ignored = a.label == 255
    assert ignored.any() and (truth[..., 3] == np.where(ignored, 0, 255)).all()
    assert (truth[~ignored][:, :3] == colorize(a.label, palette)[~ignored]).all()
    errors = decoded(im["layers"]["error map"]["png"])
    assert (errors[~ignored][:, :3] == error_map(a.prediction, a.label)[~ignored]).all()
    assert im["layers"]["prediction"]["classes"] == np.unique(a.prediction).tolist()
    # default classes: those in the prediction or the label
    assert im["classes"] == sorted(set(np.unique(a.prediction)) | set(np.unique(a.label[~ignored])))
    for stage in range(4):
        prior = im["priors"][str(stage)]
        assert (decoded(prior["argmax"]["png"])[..., :3] == colorize(a.prior_map(stage), palette)).all()
        for k in im["classes"]:
            expected = a.prior_map(stage, k) * 255
            got = decoded(prior["class"][str(k)]).astype(np.float64)
            assert np.abs(got - expected).mean() < 1.5 and np.abs(got - expected).max() < 12  # PNG or JPEG q90
    # the attention of every grid query, stage by stage, against the explorer's own (H, W) attention map
    for stage in range(4):
        att = im["attention"][str(stage)]
        window = a.attentions[stage].window_size
        assert att["window"] == window
        for (row, col, predicted, label), (r, c, m) in zip(im["points"], att["queries"]):
            assert (predicted, label) == (a.prediction[row, col], a.label[row, col])
            assert (r, c) == a.query_cell(stage, row, col)
            entry = att["maps"][m]
            weights = np.frombuffer(base64.b64decode(entry["data"]), np.uint8).reshape(entry["h"], entry["w"])
            weights = weights / 255 * entry["max"]
            full = a.attention_map(stage, row, col)  # on the image's pixels, zero outside the window
            for i in range(entry["h"]):
                for j in range(entry["w"]):
                    y0, y1 = att["rows"][entry["r0"] + i], att["rows"][entry["r0"] + i + 1]
                    x0, x1 = att["cols"][entry["c0"] + j], att["cols"][entry["c0"] + j + 1]
                    block = full[round(y0):round(y1), round(x0):round(x1)]
                    assert np.abs(block - weights[i, j]).max() <= entry["max"] / 500
            assert entry["max"] == pytest.approx(float(full.max()), rel=1e-6)
    assert [p[:2] for p in im["points"]] == [[r, c] for r in (8, 24, 40, 56) for c in (8, 24, 40, 56)]


def test_cell_edges_follow_the_padded_grid_and_large_images_are_scaled_down(model):
    # 64 x 100 pixels (kept at its size by PRESET): stage 4's input is padded to 64 x 128, 2 x 4 cells of 32
    # pixels, the last column only 4 pixels inside the image
    image = np.random.default_rng(0).integers(0, 256, (64, 100, 3), dtype=np.uint8)
    data = page_data(page_html(page_source(model, [image], test_preset=PRESET), query_grid=2, classes=[]))
    im = data["images"][0]
    assert im["input"] == [64, 100]
    att = im["attention"]["3"]
    assert att["rows"] == [0, 32, 64] and att["cols"] == [0, 32, 64, 96, 100] and att["window"] is None
    assert im["attention"]["0"]["rows"] == list(range(0, 65, 4)) and im["attention"]["0"]["window"] == 7
    assert im["classes"] == [] and all(p["class"] == {} for p in im["priors"].values())
    assert "ground truth" not in im["layers"] and im["points"][0][3] is None  # no label
    small = page_data(page_html(page_source(model, [image], test_preset=PRESET), query_grid=2, max_side=50))
    im = small["images"][0]
    assert im["size"] == [64, 100] and im["shown"] == [32, 50]
    assert decoded(im["picture"]).shape[:2] == (32, 50)
    assert decoded(im["layers"]["prediction"]["png"]).shape[:2] == (32, 50)
    assert im["attention"]["3"]["cols"] == [0, 16, 32, 48, 50]


def test_the_page_uses_no_outside_resource(model, toy_root):
    page = page_html(page_source(model, ToyDataset(toy_root, "validation"), test_preset=PRESET), images=[0],
                     title="<script>alert(1)</script> & co")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I), "the page names an outside resource"
    assert not re.search(r"<(link|iframe|object|embed|img)\b", page, re.I)
    markup = re.sub(r"<script\b.*?</script>", "", page, flags=re.S)
    assert not re.search(r"\b(src|href)\s*=", markup, re.I)  # every picture is a data: URI inside the JSON
    assert "Content-Security-Policy" in page and "default-src 'none'" in page  # the browser refuses any fetch
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt; &amp; co</title>" in page
    assert page.count("</script>") == 2  # the title's "</script>" is escaped in the JSON too
    data = page_data(page)
    uris = re.findall(r'"(data:[^"]{0,30})', json.dumps(data))
    assert uris and all(u.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for u in uris)


class CountingSource:
    def __init__(self, source):
        self.source, self.calls = source, 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def analyse(self, index):
        self.calls += 1
        return self.source.analyse(index)


def test_the_size_budget_stops_before_the_rest_is_analysed_and_writes_nothing(model, toy_root, tmp_path):
    source = page_source(model, ToyDataset(toy_root, "validation"), test_preset=PRESET)
    full = len(page_html(source, query_grid=4).encode())
    counting = CountingSource(source)
    with pytest.raises(UsageError) as info:
        save_page(counting, tmp_path / "page.html", query_grid=4, max_mb=full / 3 / 1e6)
    message = str(info.value)
    assert "size budget" in message and "of 3 images already take" in message
    for hint in ("images=", "query_grid=", "stages=", "classes=", "max_mb=", "--html-images", "--html-grid"):
        assert hint in message
    assert counting.calls < 3 and not (tmp_path / "page.html").exists()
    page = page_html(source, query_grid=4, max_mb=full / 1e6 + 0.001)  # just enough
    assert len(page.encode()) == full
    with pytest.raises(UsageError, match="query_grid must be an int in 1..64"):
        page_html(source, query_grid=0)
    with pytest.raises(UsageError, match="max_mb must be a positive"):
        page_html(source, max_mb=0)
    with pytest.raises(UsageError, match="stages: expected indices in 0..3"):
        page_html(source, stages=[4])
    with pytest.raises(UsageError, match="unknown class 'unicorn'"):
        page_html(source, classes=["unicorn"])


def test_save_page_keeps_an_existing_file_unless_overwrite(model, toy_root, tmp_path):
    source = page_source(model, ToyDataset(toy_root, "validation"), test_preset=PRESET)
    target = tmp_path / "mine.html"
    target.write_text("mine\n")
    counting = CountingSource(source)
    with pytest.raises(OutputExistsError, match="already exists"):
        save_page(counting, target, images=[0])
    assert target.read_text() == "mine\n" and counting.calls == 0  # refused before any work
    save_page(source, target, images=[0], overwrite=True)
    assert len(page_data(target.read_text())["images"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.html"]  # no temporary file left


def test_explorer_save_html_reuses_its_analyses_and_options(model, toy_root, tmp_path):
    pytest.importorskip("ipympl")
    from semask.viz import Explorer

    val = ToyDataset(toy_root, "validation")
    explorer = Explorer(model, val, test_preset=PRESET, opacity=0.7)
    explorer.image.value = 1
    runs = explorer.model_runs
    path = explorer.save_html(tmp_path / "explorer.html", images=[0, 1], stages=[2], classes=["water", 0],
                              query_grid=3, title="mine")
    assert explorer.model_runs == runs  # both images were analysed already (the explorer's cache)
    data = page_data(path.read_text())
    water = list(TOY_CLASSES).index("water")
    assert data["title"] == "mine" and data["opacity"] == 0.7 and data["grid"] == 3
    assert [im["title"] for im in data["images"]] == explorer.images.titles[:2]
    assert [s["index"] for s in data["stages"]] == [2]
    for im in data["images"]:
        assert list(im["priors"]) == ["2"] and list(im["attention"]) == ["2"]
        assert im["classes"] == [water, 0] and sorted(im["priors"]["2"]["class"]) == sorted([str(water), "0"])
        assert len(im["points"]) == 9
    with pytest.raises(OutputExistsError):
        explorer.save_html(path)


def test_the_baseline_page_has_the_label_views_only(toy_root):
    torch.manual_seed(0)
    baseline = semask.create_model("swin_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE).eval()
    data = page_data(page_html(page_source(baseline, ToyDataset(toy_root, "validation"), test_preset=PRESET),
                               images=[0]))
    assert data["stages"] == [] and data["images"][0]["priors"] == {} and data["images"][0]["attention"] == {}
    assert set(data["images"][0]["layers"]) == {"prediction", "ground truth", "error map"}


# --------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return semask.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy.pth", model)


def _overrides(root: Path) -> list[str]:
    return ["--set", f"data.root={root}", "data.test_pipeline.scale=256,64", "data.num_workers=0"]


def test_analyze_writes_the_page_with_the_analysis(toy_root, checkpoint, tmp_path, capsys):
    page, table = tmp_path / "report.html", tmp_path / "analysis.json"
    assert main(["analyze", "toy", str(checkpoint), "--html", str(page), "--html-images", "2", "--html-grid", "4",
                 "--json", str(table), "--no-progress", *_overrides(toy_root)]) == 0
    assert "explorer page (2 images) written to" in capsys.readouterr().out
    data = page_data(page.read_text())
    assert data["analysis"] == json.loads(table.read_text())  # Analysis.to_dict(), as --json writes it
    assert data["analysis"]["num_images"] == 3 and len(data["analysis"]["stages"]) == 4
    assert len(data["images"]) == 2 and data["grid"] == 4 and data["title"] == "SeMask analysis: toy.pth on toy"
    assert main(["analyze", "toy", str(checkpoint), "--html", str(tmp_path / "one.html"), "--max-images", "1",
                 "--no-progress", *_overrides(toy_root)]) == 0
    assert len(page_data((tmp_path / "one.html").read_text())["images"]) == 1  # no more than analysed


@pytest.mark.parametrize("case", ["exists", "same as --json", "bad grid", "over budget"])
def test_analyze_html_refusals_come_before_the_analysis(toy_root, checkpoint, tmp_path, capsys, case):
    target = tmp_path / "taken.html"
    target.write_text("mine\n")
    args, expected = {
        "exists": (["--html", str(target)], "pass --overwrite"),
        "same as --json": (["--html", str(tmp_path / "x"), "--json", str(tmp_path / "x")], "name the same file"),
        "bad grid": (["--html", str(tmp_path / "p.html"), "--html-grid", "0"], "--html-grid must be a positive"),
        "over budget": (["--html", str(tmp_path / "p.html"), "--html-max-mb", "0.01"], "size budget of 0.01 MB"),
    }[case]
    assert main(["analyze", "toy", str(checkpoint), "--no-progress", *_overrides(toy_root), *args]) == 2
    out, err = capsys.readouterr()
    assert "semask analyze: error:" in err and expected in err and "Traceback" not in err
    assert "Decoder prior" not in out  # refused before the split was analysed
    assert target.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.html"]
