"""Issue 14, classes 8 and 9: no data silently left out, and the Python API names unsupported inputs.

- §8: every dataset class pairs its files through `semask.data.pairing.pair_files`: suffixes match
  case-insensitively (and .jpg/.jpeg alike), an image file of another suffix in the image folder is an error
  naming it, two files of one name are an error, every other unused file (hidden ones included) is named in a
  `DatasetWarning`; through the Python API and `semask train` / `semask test`.
- §9: tensors without values to read (meta, sparse, quantised, nested, complex) or on another device than the
  model are a `UsageError` naming the argument at every entry point that takes tensors; the strides of a dense
  tensor and `requires_grad` do not change a result; an error raised in a DataLoader worker reaches the caller
  (and the command line) as its own one-line message naming the file, the worker's traceback only with --debug.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch._utils import ExceptionWrapper

import semask
from semask.data import (ADE20K, TOY_CLASSES, TOY_PALETTE, COCOStuff10k, Cityscapes, DatasetError, DatasetWarning,
                         FolderDataset, ToyDataset, make_toy_dataset)
from semask.data.images import rgb_tensor
from semask.data.loader import build_dataloader, build_train_loader, unwrap_worker_error
from semask.data.transforms import TrainTransform, train_preset
from semask.engine.inference import Predictor, load_image
from semask.engine.metrics import mean_iou
from semask.errors import BatchError, UsageError, UsageTypeError, error_lines
from semask.model.segmentor import ExternalSegmentor
from semask.viz import analyse_image, colorize, denormalize, overlay, plot_evaluation_panel

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _semask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semask", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


# ============================================================================================ §8 pairing
class Layout:
    """Where one dataset class keeps a split's images and labels, and how their names end."""

    def __init__(self, build: Callable[[Path], Any], img_dir: str, ann_dir: str, img_suffix: str,
                 ann_suffix: str) -> None:
        self.build, self.img_dir, self.ann_dir = build, img_dir, ann_dir
        self.img_suffix, self.ann_suffix = img_suffix, ann_suffix


def _toy(root: Path) -> ToyDataset:
    return ToyDataset(root, "training")


LAYOUTS = {
    "ADE20K": Layout(lambda r: ADE20K(r, "training"), "images/training", "annotations/training", ".jpg", ".png"),
    "Cityscapes": Layout(lambda r: Cityscapes(r, "train"), "leftImg8bit/train/aachen", "gtFine/train/aachen",
                         "_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    "COCOStuff10k": Layout(lambda r: COCOStuff10k(r, "train"), "images/train2014", "annotations/train2014", ".jpg",
                           "_labelTrainIds.png"),
    "FolderDataset": Layout(lambda r: FolderDataset(r / "img", r / "ann", ["a", "b"]), "img", "ann", ".jpg",
                            ".png"),
    "ToyDataset": Layout(_toy, "images/training", "annotations/training", ".jpg", ".png"),
}


def _save(path: Path, rgb: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((4, 6, 3) if rgb else (4, 6), np.uint8)
    ext = path.suffix.lower().lstrip(".")
    Image.fromarray(array).save(path, format={"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF"}.get(ext, ext.upper()))


def _upper_ext(suffix: str) -> str:
    stem, ext = suffix.rsplit(".", 1)
    return f"{stem}.{ext.upper()}"


def _other_format(suffix: str) -> str:
    """The suffix with the other common extension: '.jpg' -> '.png', '_x.png' -> '_x.jpg'."""
    stem, ext = suffix.rsplit(".", 1)
    return f"{stem}.{'png' if ext == 'jpg' else 'jpg'}"


def _layout_tree(root: Path, layout: Layout, stems: tuple[str, ...] = ("s0", "s1")) -> None:
    """A clean split of `layout` with the given samples (and the toy set's meta file)."""
    for stem in stems:
        _save(root / layout.img_dir / f"{stem}{layout.img_suffix}")
        _save(root / layout.ann_dir / f"{stem}{layout.ann_suffix}", rgb=False)
    (root / "toy_meta.json").write_text(json.dumps({"classes": ["a", "b"], "palette": [[0, 0, 0], [9, 9, 9]]}))


# each case: what to add to a clean two-sample split, and what must happen: ("pairs", n), ("error", [names])
# or ("notice", [names]) (the dataset builds with its two samples and names these files in a DatasetWarning)
def _add(*files: tuple[str, str]) -> Callable[[Path, Layout], None]:
    def add(root: Path, layout: Layout) -> None:
        for where, name in files:
            folder = root / (layout.img_dir if where == "img" else layout.ann_dir)
            name = name.format(img=layout.img_suffix, ann=layout.ann_suffix, IMG=_upper_ext(layout.img_suffix),
                               ANN=_upper_ext(layout.ann_suffix), other=_other_format(layout.img_suffix))
            if name.endswith((".txt", ".md", ".json", "DS_Store")):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text("not data\n")
            else:
                _save(folder / name, rgb=where == "img")
    return add


CASES: dict[str, tuple[Callable[[Path, Layout], None], tuple[str, Any]]] = {
    "upper_case_suffixes_pair": (_add(("img", "s2{IMG}"), ("ann", "s2{ANN}")), ("pairs", 3)),
    "upper_case_image_lower_case_label": (_add(("img", "s2{IMG}"), ("ann", "s2{ann}")), ("pairs", 3)),
    "twin_with_another_suffix": (_add(("img", "s0{other}")), ("error", ["s0{other}", "would be left out"])),
    "image_of_another_format_without_twin": (_add(("img", "extra.bmp")), ("error", ["extra.bmp", "left out"])),
    "two_files_of_one_name": (_add(("img", "s0{IMG}")), ("error", ["s0{img}", "s0{IMG}", "more than one file"])),
    "two_labels_of_one_name": (_add(("ann", "s1{ANN}")), ("error", ["s1{ann}", "s1{ANN}", "more than one file"])),
    "upper_case_image_without_label": (_add(("img", "s2{IMG}")), ("error", ["have no label", "s2{IMG}"])),
    "stray_non_image_files": (_add(("img", "notes.txt"), ("ann", "README.md"), ("ann", "extra.bmp")),
                              ("notice", ["notes.txt", "README.md", "extra.bmp"])),
    "hidden_files": (_add(("img", ".DS_Store"), ("img", "._s0{img}"), ("img", ".ipynb_checkpoints/s0{img}"),
                          ("ann", ".DS_Store")),
                     ("notice", [".DS_Store", "._s0{img}", ".ipynb_checkpoints/s0{img}"])),
    "clean": (_add(), ("pairs", 2)),
}


def _fill(text: str, layout: Layout) -> str:
    return text.format(img=layout.img_suffix, ann=layout.ann_suffix, IMG=_upper_ext(layout.img_suffix),
                       ANN=_upper_ext(layout.ann_suffix), other=_other_format(layout.img_suffix))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_every_dataset_class_pairs_or_names_every_file(tmp_path: Path, dataset: str, case: str) -> None:
    layout, (add, (kind, expected)) = LAYOUTS[dataset], CASES[case]
    _layout_tree(tmp_path, layout)
    add(tmp_path, layout)
    if kind == "error":
        with pytest.raises(DatasetError) as info:
            layout.build(tmp_path)
        message = str(info.value)
        assert "\n" not in message and all(_fill(name, layout) in message for name in expected), message
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = layout.build(tmp_path)
    notices = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    if kind == "pairs":
        assert len(ds) == expected and not notices, notices
        assert all(p.is_file() and q.is_file() for p, q in ds.pairs)
        assert len(ds[len(ds) - 1]["image"]) == 4  # the last sample (an upper-case one where added) is read
    else:
        assert len(ds) == 2 and notices
        text = " ".join(notices)
        assert all(_fill(name, layout) in text for name in expected), notices
        named = [item for notice in notices for item in notice.split("): ", 1)[1].split(", ")]
        used = {str(p.relative_to(tmp_path / layout.img_dir)) for p, _ in ds.pairs}
        used |= {str(q.relative_to(tmp_path / layout.ann_dir)) for _, q in ds.pairs}
        assert "not used" in text and not used & set(named), named


@pytest.mark.parametrize("dataset", ["ADE20K", "COCOStuff10k", "FolderDataset", "ToyDataset"])
def test_the_two_spellings_of_jpeg_pair(tmp_path: Path, dataset: str) -> None:
    layout = LAYOUTS[dataset]
    _layout_tree(tmp_path, layout)
    _save(tmp_path / layout.img_dir / "s2.jpeg")
    _save(tmp_path / layout.img_dir / "s3.JPEG")
    for stem in ("s2", "s3"):
        _save(tmp_path / layout.ann_dir / f"s{stem[1]}{layout.ann_suffix}", rgb=False)
    assert [p.name for p, _ in layout.build(tmp_path).pairs] == ["s0.jpg", "s1.jpg", "s2.jpeg", "s3.JPEG"]
    _save(tmp_path / layout.img_dir / "s0.jpeg")
    with pytest.raises(DatasetError, match=r"s0\.jpeg and s0\.jpg"):
        layout.build(tmp_path)


def test_cityscapes_companion_files_are_expected_not_reported(tmp_path: Path) -> None:
    layout = LAYOUTS["Cityscapes"]
    _layout_tree(tmp_path, layout)
    for stem in ("s0", "s1"):
        for companion in ("_gtFine_color.png", "_gtFine_instanceIds.png", "_gtFine_labelIds.png"):
            _save(tmp_path / layout.ann_dir / f"{stem}{companion}")
        (tmp_path / layout.ann_dir / f"{stem}_gtFine_polygons.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        assert len(Cityscapes(tmp_path, "train")) == 2
    (tmp_path / layout.ann_dir / "s0_gtFine_disparity.png").write_text("x")  # not one of the download's own
    with pytest.warns(DatasetWarning, match="s0_gtFine_disparity.png"):
        Cityscapes(tmp_path, "train")


def test_one_shared_folder_names_only_what_is_unused(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        _save(tmp_path / f"{stem}_img.png")
        _save(tmp_path / f"{stem}_label.png", rgb=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.warns(DatasetWarning) as caught:
        ds = FolderDataset(tmp_path, tmp_path, ["x"], img_suffix="_img.png", seg_map_suffix="_label.png")
    assert len(ds) == 2 and len(caught) == 1
    assert "1 file(s)" in str(caught[0].message) and "notes.txt" in str(caught[0].message)
    _save(tmp_path / "c.jpg")  # an image that matches neither suffix would be left out
    with pytest.raises(DatasetError, match=r"c\.jpg"):
        FolderDataset(tmp_path, tmp_path, ["x"], img_suffix="_img.png", seg_map_suffix="_label.png")


def test_no_images_names_the_images_of_other_suffixes(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        _save(tmp_path / "img" / f"{stem}.png")
        _save(tmp_path / "ann" / f"{stem}.png", rgb=False)
    with pytest.raises(DatasetError, match=r"no images ending in '.jpg' .* 2 image file\(s\) ending otherwise: "
                                           r"a.png, b.png"):
        FolderDataset(tmp_path / "img", tmp_path / "ann", ["x"])


def test_linked_and_unreadable_folders_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = LAYOUTS["FolderDataset"]
    _layout_tree(tmp_path, layout)
    _save(tmp_path / "elsewhere" / "s9.jpg")
    (tmp_path / "img" / "more").symlink_to(tmp_path / "elsewhere")  # not searched (a link may loop)
    with pytest.warns(DatasetWarning, match=r"more \(a linked folder, not searched\)"):
        assert len(layout.build(tmp_path)) == 2
    walk = os.walk

    def walk_with_a_locked_folder(top, onerror=None, **kwargs):  # what os.walk does for a folder it cannot list
        if onerror is not None and Path(top).name == "img":
            onerror(PermissionError(13, "Permission denied", str(Path(top) / "locked")))
        return walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(os, "walk", walk_with_a_locked_folder)
    with pytest.raises(DatasetError, match=r"1 folder\(s\) under the image folder .* cannot be listed: .*locked "
                                           r"\(Permission denied\)"):
        layout.build(tmp_path)


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "toy.pth"
    torch.manual_seed(0)
    semask.save_checkpoint(path, semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES,
                                                     palette=TOY_PALETTE))
    return path


FAST = ["data.num_workers=0", "data.train_pipeline.crop_size=64,64", "data.train_pipeline.scale=256,64",
        "data.test_pipeline.scale=256,64", "train.batch_size=2", "train.global_batch=2", "schedule.iters=2",
        "schedule.warmup_iters=1", "train.log_interval=1", "train.eval_interval=0", "train.checkpoint_interval=2",
        "train.tensorboard=false"]


@pytest.mark.slow  # a fresh semask process per case
@pytest.mark.parametrize("case", ["twin", "case_duplicate", "stray_text"])
@pytest.mark.parametrize("command", ["train", "test"])
def test_the_command_line_names_unused_files(tmp_path: Path, toy_checkpoint: Path, command: str, case: str) -> None:
    root = make_toy_dataset(tmp_path / "toy", num_train=2, num_val=1, size=64)
    images = root / "images" / "training"
    first = sorted(images.glob("*.jpg"))[0]
    name = {"twin": first.with_suffix(".png").name, "case_duplicate": first.with_suffix(".JPG").name,
            "stray_text": "notes.txt"}[case]
    if case == "stray_text":
        (images / name).write_text("x")
    else:
        _save(images / name)
    args = ([command, "toy", "--work-dir", str(tmp_path / "run")] if command == "train"
            else [command, "toy", str(toy_checkpoint)])
    result = _semask(*args, "--no-progress", "--set", f"data.root={root}", *FAST)
    assert "Traceback" not in result.stderr
    if case == "stray_text":
        assert result.returncode == 0, result.stderr
        assert f"semask {command}: note: 1 file(s)" in result.stderr and name in result.stderr, result.stderr
    else:
        assert result.returncode == 1, result.stderr
        errors = _error_lines(result.stderr)
        assert len(errors) == 1 and name in errors[0] and f"semask {command}: error:" in errors[0], result.stderr


# ============================================================================================ §9 tensors
def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def _quantised(t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantised tensors are deprecated in PyTorch; still accepted by it
        return torch.quantize_per_tensor(t.float(), 1.0 if not t.is_floating_point() else 1 / 255, 0, torch.quint8)


def _nested(t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype warning of nested tensors
        return torch.nested.nested_tensor([t, t])


def _csr(t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CSR support is in beta
        return torch.where(t == 0, torch.ones_like(t), t).to_sparse_csr()  # batched CSR: as many values per matrix


UNSUPPORTED: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], type, str]] = {
    "meta": (_meta, UsageError, r"'meta' device, which holds shapes but no values"),
    "sparse_coo": (lambda t: t.to_sparse(), UsageError, r"layout torch\.sparse_coo; .*\.to_dense\(\)"),
    "sparse_csr": (_csr, UsageError, r"layout torch\.sparse_csr; .*\.to_dense\(\)"),
    "quantised": (_quantised, UsageError, r"quantised tensor \(torch\.quint8\); pass its \.dequantize\(\)"),
    "nested": (_nested, UsageError, r"nested tensor"),
    "complex": (lambda t: t.to(torch.complex64), UsageTypeError, r"complex dtype torch\.complex64"),
}


class _Items:
    """A dataset of one item given as tensors (what `evaluate` reads through `dataset[i]`)."""

    class_names = ("a", "b", "c", "d", "e")

    def __init__(self, image: torch.Tensor, label: torch.Tensor) -> None:
        self.item = {"image": image, "label": label, "path": "item0.png"}

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return self.item


def _external() -> ExternalSegmentor:
    torch.manual_seed(0)
    return ExternalSegmentor(torch.nn.Conv2d(3, 5, 1), num_classes=5, size_divisor=1)


IMAGE = torch.rand(3, 24, 32)  # 0..1 floats: an image by torchvision's convention
IMAGE_U8 = (IMAGE * 255).round().to(torch.uint8)  # the viewers draw uint8 images
BATCH = (IMAGE[None] - 0.45) / 0.25  # a normalised batch
LABEL = torch.randint(0, 5, (24, 32))
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]]
SCALE = (64, 32)  # a small test scale: the checks come first, and the supported tensors run fast

# entry point -> (what it is given, how to call it with the model, what its message must name)
ENTRY_POINTS: dict[str, tuple[torch.Tensor, Callable[[Any, torch.Tensor], Any], str]] = {
    "SeMaskFPN.forward": (BATCH, lambda m, x: m(x), "the model's input x"),
    "ExternalSegmentor.forward": (BATCH, lambda m, x: _external()(x), "the model's input x"),
    "Predictor.predict_labels": (IMAGE, lambda m, x: Predictor(m, scale=SCALE).predict_labels(x), "image tensor"),
    "Predictor.__call__": (IMAGE, lambda m, x: Predictor(m, scale=SCALE)(x, return_probs=True), "image tensor"),
    "Predictor.probabilities": (IMAGE, lambda m, x: Predictor(m, mode="msflip", scale=SCALE).probabilities(x),
                                "image tensor"),
    "Predictor.predict_with_output": (IMAGE, lambda m, x: Predictor(m, scale=SCALE).predict_with_output(x),
                                      "image tensor"),
    "Predictor.slide": (IMAGE, lambda m, x: Predictor(m, mode="slide", crop_size=16, stride=8)(x), "image tensor"),
    "semask.predict": (IMAGE, lambda m, x: semask.predict(m, x, scale=SCALE), "image tensor"),
    "load_image": (IMAGE, lambda m, x: load_image(x), "image tensor"),
    "rgb_tensor": (IMAGE, lambda m, x: rgb_tensor(x, "the picture"), "the picture"),
    "evaluate.image": (IMAGE, lambda m, x: semask.evaluate(m, _Items(x, LABEL), progress=False),
                       "evaluate: dataset item 0 (item0.png) 'image'"),
    "evaluate.label": (LABEL, lambda m, x: semask.evaluate(m, _Items(IMAGE, x), progress=False),
                       "evaluate: dataset item 0 (item0.png) 'label'"),
    "mean_iou.label": (LABEL, lambda m, x: mean_iou(LABEL, x, 5), "label"),
    "mean_iou.prediction": (LABEL, lambda m, x: mean_iou(x, LABEL, 5), "prediction"),
    "viz.colorize": (LABEL, lambda m, x: colorize(x, PALETTE), "colorize: label"),
    "viz.overlay": (LABEL, lambda m, x: overlay(IMAGE_U8.permute(1, 2, 0).numpy(), x, PALETTE), "overlay: label"),
    "viz.denormalize": (BATCH[0], lambda m, x: denormalize(x), "denormalize: image"),
    "viz.plot_evaluation_panel.image": (IMAGE_U8, lambda m, x: plot_evaluation_panel(x, LABEL, LABEL, PALETTE),
                                        "image tensor"),
    "viz.plot_evaluation_panel.label": (LABEL, lambda m, x: plot_evaluation_panel(IMAGE_U8, x, LABEL, PALETTE),
                                        "label"),
    "viz.analyse_image.image": (IMAGE_U8, lambda m, x: analyse_image(m, x, attention=False), "image tensor"),
    "viz.analyse_image.label": (LABEL, lambda m, x: analyse_image(m, IMAGE_U8, x, attention=False), "label"),
}


@pytest.fixture(scope="module")
def model5() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    return semask.create_model("semask_toy_fpn", num_classes=5).eval()


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_unsupported_tensors_are_named_usage_errors(model5, entry: str, kind: str) -> None:
    import matplotlib.pyplot as plt

    given, call, name = ENTRY_POINTS[entry]
    make, error, message = UNSUPPORTED[kind]
    try:
        with pytest.raises(error, match=message) as info:
            call(model5, make(given))
    finally:
        plt.close("all")
    assert name in str(info.value) and "\n" not in str(info.value)
    assert list(error_lines(info.value)) == [str(info.value)]


def _strided(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense tensors like `t` whose strides are not the contiguous ones (and one that requires grad)."""
    variants = {"transposed": t.mT.contiguous().mT, "sliced": torch.stack([t, t], -1)[..., 0],
                "expanded": t[..., :1].expand(t.shape)}
    if t.ndim == 4:
        variants["channels_last"] = t.contiguous(memory_format=torch.channels_last)
    if t.is_floating_point():
        variants["requires_grad"] = t.clone().requires_grad_()
    return variants


@pytest.mark.parametrize("entry", ["SeMaskFPN.forward", "Predictor.predict_labels", "Predictor.probabilities",
                                   "evaluate.image", "evaluate.label", "viz.colorize", "rgb_tensor"])
def test_dense_tensors_of_any_strides_give_the_same_result(model5, entry: str) -> None:
    given, call, _ = ENTRY_POINTS[entry]

    def result(x: torch.Tensor) -> Any:
        out = call(model5, x)
        out = getattr(out, "logits", out)
        out = getattr(out, "confusion", out)
        return out.detach() if isinstance(out, torch.Tensor) else out

    for variant, x in _strided(given).items():
        assert variant == "requires_grad" or not x.is_contiguous()
        got, expected = result(x), result(x.detach().contiguous())
        if isinstance(got, torch.Tensor):
            torch.testing.assert_close(got, expected, msg=f"{entry} {variant}")
        else:
            np.testing.assert_array_equal(got, expected, err_msg=f"{entry} {variant}")


def test_a_model_without_weights_or_on_another_device_is_named(model5) -> None:
    with torch.device("meta"):
        ghost = semask.create_model("semask_toy_fpn", num_classes=5)
    with pytest.raises(UsageError, match=r"the model is on the 'meta' device .* cannot run on the model's input x"):
        ghost(BATCH)
    predictor = Predictor(ghost)  # a meta model's predictor tells its settings ...
    assert predictor.scale == (1024, 256)
    with pytest.raises(UsageError, match=r"model is on the 'meta' device .* cannot segment images"):
        predictor.predict_labels(IMAGE)  # ... and refuses to segment
    with pytest.raises(UsageError, match=r"model is on the 'meta' device"):
        Predictor(ghost, device="cpu")
    from semask.device import check_tensor

    with pytest.raises(UsageError, match=r"x is on cpu but the model is on cuda:0; move it with \.to\('cuda:0'\)"):
        check_tensor(BATCH, "x", torch.device("cuda:0"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_on_another_device_than_the_model_cuda(model5) -> None:
    gpu = semask.create_model("semask_toy_fpn", num_classes=5).eval()
    gpu.load_state_dict(model5.state_dict())
    gpu = gpu.cuda()
    with pytest.raises(UsageError, match=r"the model's input x is on cpu but the model is on cuda:0"):
        gpu(BATCH)
    with pytest.raises(UsageError, match=r"the model's input x is on cuda:0 but the model is on cpu"):
        model5(BATCH.cuda())
    # the Predictor copies an image to the model's device, whichever device it is on
    expected = Predictor(model5).predict_labels(IMAGE)
    assert torch.equal(Predictor(gpu).predict_labels(IMAGE).cpu(), expected)
    assert torch.equal(Predictor(model5).predict_labels(IMAGE.cuda()), expected)


# ============================================================================================ §9 workers
def _wrapped(exc: BaseException, where: str = "in DataLoader worker process 1") -> BaseException:
    """What torch raises in the main process for `exc` raised in a loader worker (its ExceptionWrapper)."""
    try:
        raise exc
    except BaseException:
        wrapper = ExceptionWrapper(where=where)
    try:
        wrapper.reraise()
    except BaseException as reraised:  # noqa: B036 (we return what torch raised)
        return reraised
    raise AssertionError("reraise() returned")


def _chained() -> DatasetError:
    try:
        try:
            raise OSError("cannot identify image file '/data/x.jpg'")
        except OSError as inner:
            raise DatasetError("image file /data/x.jpg cannot be read: cannot identify image file") from inner
    except DatasetError as outer:
        return outer


WORKER_ERRORS = {
    "chained_dataset_error": (_chained(), DatasetError, "image file /data/x.jpg cannot be read: cannot identify "
                                                        "image file"),
    "multi_line_value_error": (ValueError("first line\nsecond line"), ValueError, "first line\nsecond line"),
    "key_error": (KeyError("image"), KeyError, "'image'"),
    "file_not_found": (FileNotFoundError(2, "No such file or directory", "/data/y.png"), FileNotFoundError,
                       "[Errno 2] No such file or directory: '/data/y.png'"),
    "no_message": (ValueError(), ValueError, ""),
    "type_not_built_from_a_message": (BatchError([("a.jpg", ValueError("bad"))], 2, "images"), RuntimeError,
                                      "BatchError: 1 of 2 images failed: a.jpg"),
}


@pytest.mark.parametrize("where", ["in DataLoader worker process 1", "in pin memory thread for device 0"])
@pytest.mark.parametrize("case", sorted(WORKER_ERRORS))
def test_worker_errors_are_unwrapped_to_their_own_message(case: str, where: str) -> None:
    original, error, message = WORKER_ERRORS[case]
    reraised = _wrapped(original, where)
    assert str(reraised.args[0]).startswith("Caught ")  # what torch gives
    unwrapped = unwrap_worker_error(reraised)
    assert type(unwrapped) is error
    assert (unwrapped.args[0] if unwrapped.args else "") == message
    assert unwrap_worker_error(original) is None and unwrap_worker_error(RuntimeError("Caught nothing")) is None
    assert len(list(error_lines(unwrapped))) == 1


@pytest.fixture
def corrupt_toy(tmp_path: Path) -> tuple[Path, Path]:
    root = make_toy_dataset(tmp_path / "toy", num_train=4, num_val=1, size=64)
    bad = sorted((root / "images" / "training").glob("*.jpg"))[1]
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    return root, bad


@pytest.mark.parametrize("loader", ["build_dataloader", "build_train_loader"])
def test_a_worker_error_reaches_the_caller_as_itself(corrupt_toy, loader: str) -> None:
    root, bad = corrupt_toy
    ds = ToyDataset(root, "train")
    if loader == "build_dataloader":
        batches = build_dataloader(ds, batch_size=1, shuffle=False, num_workers=2)
    else:
        transform = TrainTransform(train_preset("toy"))
        batches = build_train_loader(ds, transform, batch_size=2, num_workers=2)
    with pytest.raises(DatasetError) as info:
        for i, _ in enumerate(batches):
            assert i < 8, "the corrupt image was never read"
    message = str(info.value)
    assert str(bad) in message and "cannot be read" in message and "\n" not in message and "Caught" not in message
    assert "Original Traceback" in str(info.value.__cause__)  # the worker's traceback stays attached


def test_the_loaders_still_give_every_batch_with_workers(tmp_path: Path) -> None:
    root = make_toy_dataset(tmp_path / "toy", num_train=4, num_val=1, size=64)
    ds = ToyDataset(root, "train")
    loader = build_dataloader(ds, batch_size=2, shuffle=False, num_workers=2)  # persistent workers
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 2
    inline = [b["image"] for b in build_dataloader(ds, batch_size=2, shuffle=False, num_workers=0)]
    for _ in range(2):  # two epochs over the same workers
        batches = [b["image"] for b in loader]
        assert len(batches) == 2 and all(torch.equal(a, b) for a, b in zip(batches, inline))


@pytest.mark.slow  # a fresh semask process per case
@pytest.mark.parametrize("debug", [False, True])
def test_the_command_line_reports_a_worker_error_in_one_line(corrupt_toy, tmp_path: Path, debug: bool) -> None:
    root, bad = corrupt_toy
    fast = [s for s in FAST if not s.startswith(("data.num_workers", "schedule.iters"))]
    result = _semask("train", "toy", "--work-dir", str(tmp_path / "run"), "--no-progress", *(["--debug"] * debug),
                     "--set", f"data.root={root}", "data.num_workers=2", "schedule.iters=4", *fast)
    assert result.returncode == 1, result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and str(bad) in errors[0] and "cannot be read" in errors[0], result.stderr
    assert errors[0].startswith("semask train: error: image file") and result.stderr.rstrip().endswith(errors[0])
    assert ("Original Traceback" in result.stderr) == debug and ("Traceback" in result.stderr) == debug
    assert ("Caught DatasetError in DataLoader worker process" in result.stderr) == debug
