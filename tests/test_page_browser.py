"""The shareable explorer page in a real browser: written by `save_page`, opened from disk (file://) in Debian's
headless Chromium (driven by Playwright; no browser download), its controls operated as a user would.

The test selects views, stages, a class and an image, moves the opacity slider with the keyboard and clicks the
picture, and checks after each step that the canvas's pixels changed and, where the answer is known, that they are
the right ones: the prediction's palette colours, a class's probability through viridis, a query's attention
weight through inferno, the click snapped to the nearest query grid point. The page must fetch nothing (no
request but the file itself) and log no error. Screenshots go to ``$SEMASK_TEST_ARTIFACTS/page`` (or a temporary
folder). Skipped only where no Chromium exists (`.ci/run` installs it), like `tests/test_browser.py`.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semask
from helpers import CHROMIUM_FLAGS, chromium_executable, page_data, randomize_gammas
from semask.data import TOY_CLASSES, TOY_PALETTE, TestPipelineConfig, ToyDataset, make_toy_dataset
from semask.viz import analyse_image
from semask.viz.page import page_source, save_page

pytestmark = pytest.mark.slow

PRESET = TestPipelineConfig(scale=(256, 64))  # keeps the 64-pixel scenes at their size
ZOOM = 8  # the page draws a 64-pixel image on a 512-pixel canvas
TIMEOUT_MS = 30_000
PIXELS_JS = """(points) => {
    const ctx = document.getElementById("semask-canvas").getContext("2d");
    return points.map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data));
}"""


def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return np.round(colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(int)


def _gray(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L")).astype(int)


def test_the_page_from_disk_in_chromium(tmp_path: Path) -> None:
    chromium = chromium_executable()
    from playwright.sync_api import sync_playwright  # a dev dependency: missing it is an error, not a skip

    artifacts = Path(os.environ.get("SEMASK_TEST_ARTIFACTS", tmp_path / "artifacts")) / "page"
    artifacts.mkdir(parents=True, exist_ok=True)
    root = make_toy_dataset(tmp_path / "toy", seed=3, num_train=1, num_val=2, size=64)
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE).eval()
    randomize_gammas(model, 0.5)
    val = ToyDataset(root, "validation")
    path = save_page(page_source(model, val, test_preset=PRESET), tmp_path / "page.html", query_grid=4)
    data = page_data(path.read_text())
    sample = val.load(0)
    a = analyse_image(model, sample["image"], sample["label"], test_preset=PRESET)  # what the page should show
    grid = [(x, y) for y in range(2, 64, 7) for x in range(3, 64, 7)]  # image pixels to read back
    centres = [[x * ZOOM + ZOOM // 2, y * ZOOM + ZOOM // 2] for x, y in grid]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS)
        requests: list[str] = []
        errors: list[str] = []
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1100})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            canvas = page.locator("#semask-canvas")
            draws = lambda: int(canvas.get_attribute("data-draws") or 0)  # noqa: E731

            def wait_for_draws_above(count: int) -> None:
                """Poll from Python: the page's CSP forbids eval, which page.wait_for_function's polling uses once
                its first check fails (so it failed only when a redraw was slower than that check)."""
                deadline = time.monotonic() + TIMEOUT_MS / 1000
                while draws() <= count:
                    assert time.monotonic() < deadline, f"no redraw: draws {draws()}, wanted more than {count}"
                    page.wait_for_timeout(10)

            wait_for_draws_above(0)
            hashes: dict[str, str] = {}

            def step(name: str, action) -> str:
                """Operate a control, wait for the redraw, keep a screenshot; the canvas's hash."""
                before = draws()
                action()
                wait_for_draws_above(before)
                page.screenshot(path=str(artifacts / f"{len(hashes) + 1}-{name}.png"), full_page=True)
                digest = hashlib.sha256(page.evaluate("document.getElementById('semask-canvas').toDataURL()")
                                        .encode()).hexdigest()
                hashes[name] = digest
                return canvas.get_attribute("data-view")

            def pixels(points) -> np.ndarray:
                return np.asarray(page.evaluate(PIXELS_JS, points))

            def opaque() -> None:
                page.focus("#semask-opacity")
                page.keyboard.press("End")  # the slider to 1: the maps cover the image

            # the prediction at opacity 1: exactly the palette's colours of the model's prediction
            assert step("prediction-opaque", opaque) == "0|prediction|||"
            expected = np.asarray(TOY_PALETTE)[[a.prediction[y, x] for x, y in grid]]
            got = pixels(centres)
            assert (got[:, :3] == expected).all() and (got[:, 3] == 255).all()

            # a class's stage prior: its probability through viridis
            water = list(TOY_CLASSES).index("water")
            assert step("prior-stage-1", lambda: page.select_option("#semask-view", "semantic prior")) \
                == "0|semantic prior|0|argmax|"
            assert step("prior-water", lambda: page.select_option("#semask-class", str(water))) \
                == f"0|semantic prior|0|{water}|"
            gray = _gray(data["images"][0]["priors"]["0"]["class"][str(water)])
            expected = _lut("viridis")[[gray[y, x] for x, y in grid]]
            assert np.abs(pixels(centres)[:, :3] - expected).mean() < 4  # the browser's JPEG decoding

            # the query's attention in stage 1 (7x7 windows): each window cell's weight through inferno
            view = step("attention-stage-1", lambda: page.select_option("#semask-view", "semantic attention"))
            query = int(page.input_value("#semask-query"))
            assert view == f"0|semantic attention|0||{query}"
            att = data["images"][0]["attention"]["0"]
            r, c, m = att["queries"][query]
            entry = att["maps"][m]
            weights = np.frombuffer(base64.b64decode(entry["data"]), np.uint8).reshape(entry["h"], entry["w"])
            cells = [(i, j) for i in range(entry["h"]) for j in range(entry["w"])
                     if max(abs(entry["r0"] + i - r), abs(entry["c0"] + j - c)) >= 2]  # clear of the query marks
            assert cells
            points = [[round((att["cols"][entry["c0"] + j] + att["cols"][entry["c0"] + j + 1]) / 2 * ZOOM),
                       round((att["rows"][entry["r0"] + i] + att["rows"][entry["r0"] + i + 1]) / 2 * ZOOM)]
                      for i, j in cells]
            assert (pixels(points)[:, :3] == _lut("inferno")[[weights[i, j] for i, j in cells]]).all()

            assert step("attention-stage-4", lambda: page.select_option("#semask-stage", "3")) \
                == f"0|semantic attention|3||{query}"
            # a click near image pixel (5, 12) snaps to the nearest grid point, (8, 8): query 0 of the 4x4 grid
            box = canvas.bounding_box()
            assert step("clicked", lambda: page.mouse.click(box["x"] + 12.5 * box["width"] / 64,
                                                            box["y"] + 5.5 * box["height"] / 64)) \
                == "0|semantic attention|3||0"
            assert page.input_value("#semask-query") == "0"
            assert "query (8, 8)" in page.inner_text("#semask-info")
            assert step("image-1", lambda: page.select_option("#semask-image", "1")) == "1|semantic attention|3||0"
            assert data["images"][1]["title"] in page.inner_text("#semask-caption")
        finally:
            browser.close()
    assert len(set(hashes.values())) == len(hashes), f"every step should change the picture: {hashes}"
    assert requests == [path.as_uri()], f"the page fetched something: {requests}"
    assert not errors, f"the page logged errors: {errors}"
    print(f"\npage-test screenshots in {artifacts}: {sorted(p.name for p in artifacts.glob('*.png'))}")
