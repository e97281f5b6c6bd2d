"""Evaluation of SeMask FPN with the paper's protocol (arXiv 2112.12782; docs/recipes.md §6), on one process or many.

`evaluate(model, dataset)` runs every image of a split through `semask.engine.inference.Predictor` (whole image or
sliding window at the test scale; with ``aug_test=True`` multi-scale + flip), at the original image size, and
accumulates mmsegmentation's metrics exactly (int64 counts). Memory does not grow with the split: each image's
prediction is reduced to its (K, K) confusion matrix, added to the split's, and two numbers before the next one;
the metrics of an image and of the split are both read off a confusion matrix (`semask.engine.metrics`).

With ``prior_metrics=True`` (whole mode, one view) the same forward also scores each stage's semantic prior and
the decoder's summed prior as segmentations, exactly as `semask.analyze` does (`PriorConfusions`); the
prediction and its metrics are unchanged (`Predictor.predict_with_output` gives `predict_labels`' labels).

Under ``torch.distributed`` (``torchrun ... semask test``) process ``r`` of ``n`` takes images ``r, r + n, ...``;
the confusion matrix is summed across processes, so the metrics are exactly the single-process ones, and
every process returns the same result.

    result = semask.evaluate(model, ADE20K(root, "validation"))
    print(result.table())
    result.metrics["mIoU"], result.confusion, result.worst(5)
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from semask.data.transforms import TestPipelineConfig
from semask.device import check_tensor
from semask.engine.attention_stats import PriorConfusions
from semask.engine.distributed import progress_bar, shard
from semask.engine.inference import Predictor
from semask.engine.metrics import confusion_matrix, format_table, metric_value, metrics_from_confusion
from semask.errors import UsageError

__all__ = ["EvalResult", "evaluate", "check_classes", "dataset_sample", "plan_panels", "dataset_inputs",
           "data_inputs"]


@dataclass
class EvalResult:
    """What `evaluate` measured.

    Attributes:
        metrics: ``{"aAcc", "mIoU", "mAcc"}`` fractions and ``"IoU"``, ``"Acc"`` ``(K,)`` arrays (NaN = undefined).
        class_names: K names.
        confusion: ``(K, K)`` int64 pixel counts, row = ground truth, column = prediction.
        per_image: one dict per image, in dataset order: ``index``, ``path``, ``mIoU`` and ``aAcc`` of that image
            alone (NaN when it has no labelled pixel).
        mode: ``whole`` or ``slide``; aug_test: multi-scale + flip was used.
        seconds: wall time of the evaluation (slowest process).
        prior_metrics: with ``evaluate(..., prior_metrics=True)``, per backbone stage the metrics of its semantic
            prior used as a segmentation (as ``metrics``), None for a stage without a semantic layer (an empty
            list without a Swin backbone); None when not measured.
        decoder_prior_metrics: the same for the decoder's summed prior (None without one, or not measured).
    """

    metrics: dict[str, Any]
    class_names: tuple[str, ...]
    confusion: np.ndarray
    per_image: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "whole"
    aug_test: bool = False
    seconds: float = 0.0
    prior_metrics: Optional[list[Optional[dict[str, Any]]]] = None
    decoder_prior_metrics: Optional[dict[str, Any]] = None

    @property
    def num_images(self) -> int:
        return len(self.per_image)

    @property
    def prior_mIoU(self) -> Optional[list[Optional[float]]]:  # noqa: N802 (the metric's name)
        """Per stage the prior's mIoU (fraction; None for a stage without a semantic layer or an undefined
        mIoU); None when the priors were not measured."""
        return None if self.prior_metrics is None else [metric_value(m, "mIoU") for m in self.prior_metrics]

    @property
    def decoder_prior_mIoU(self) -> Optional[float]:  # noqa: N802 (the metric's name)
        """The decoder's summed prior's mIoU (fraction), or None."""
        return metric_value(self.decoder_prior_metrics, "mIoU")

    @property
    def mIoU(self) -> float:  # noqa: N802 (the metric's name)
        return float(self.metrics["mIoU"])

    def table(self, digits: int = 2) -> str:
        """The per-class IoU / Acc table and the summary line (percentages)."""
        return format_table(self.metrics, self.class_names, digits)

    def worst(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` images with the lowest per-image mIoU (images without labels last)."""
        return sorted(self.per_image, key=lambda r: (math.isnan(r["mIoU"]), r["mIoU"]))[:n]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: metrics (per class by name), protocol, timing and per-image scores; with the
        priors measured also ``prior_mIoU`` (per stage) and ``decoder_prior_mIoU``."""
        def clean(x: float) -> Optional[float]:
            return None if math.isnan(x) else float(x)

        priors = {} if self.prior_metrics is None else {"prior_mIoU": self.prior_mIoU,
                                                        "decoder_prior_mIoU": self.decoder_prior_mIoU}
        return {
            "aAcc": clean(self.metrics["aAcc"]), "mIoU": clean(self.metrics["mIoU"]),
            "mAcc": clean(self.metrics["mAcc"]), **priors,
            "IoU": {n: clean(v) for n, v in zip(self.class_names, self.metrics["IoU"])},
            "Acc": {n: clean(v) for n, v in zip(self.class_names, self.metrics["Acc"])},
            "mode": self.mode, "aug_test": self.aug_test, "num_images": self.num_images,
            "seconds": self.seconds, "images_per_s": self.num_images / self.seconds if self.seconds else None,
            "per_image": [{**r, "mIoU": clean(r["mIoU"]), "aAcc": clean(r["aAcc"])} for r in self.per_image],
            "confusion": self.confusion.tolist(),
        }

    def save_json(self, path: Union[str, Path]) -> Path:
        """Write `to_dict` as JSON (atomically)."""
        from semask.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)


def check_classes(model: nn.Module, dataset: Any) -> None:
    """Fail with the dataset's class list when the model predicts another number of classes; warn, listing the
    differences, when the counts agree but the names do not (released checkpoints spell some names
    differently from one mmseg version to the next, so a different spelling alone is not an error)."""
    model = getattr(model, "module", model)
    theirs = tuple(getattr(dataset, "class_names", ()) or ())
    ours = tuple(model.class_names or ())
    if model.num_classes != len(theirs) and theirs:
        raise UsageError(f"the model predicts {model.num_classes} classes but the dataset {dataset!r} has "
                         f"{len(theirs)}: {', '.join(theirs[:12])}{' ...' if len(theirs) > 12 else ''}. "
                         "Use a checkpoint trained on this dataset (or a preset for it).")
    if ours and theirs and ours != theirs:
        diff = [f"{k}: model {a!r} vs dataset {b!r}" for k, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        warnings.warn(f"the model's class names differ from the dataset's at {len(diff)} of {len(ours)} positions "
                      f"({'; '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); check that label k means the "
                      "same class for both", stacklevel=2)


def dataset_sample(dataset: Any, index: int, caller: str = "evaluate") -> Mapping[str, Any]:
    """Item `index` of `dataset` without its transform (``dataset.load``, else ``dataset[index]``), checked to hold
    an image and a label that can be read; `caller` starts the error message."""
    sample = dataset.load(index) if hasattr(dataset, "load") else dataset[index]
    where = f"dataset item {index}"
    if not isinstance(sample, Mapping) or "image" not in sample or sample.get("label") is None:
        what = f"a dict with keys {sorted(map(str, sample))}" if isinstance(sample, Mapping) else type(sample).__name__
        raise UsageError(f"{caller}: {where} is {what}; it must be a dict with an 'image' and its 'label' (as the "
                         "load(i) of semask.data's datasets returns)")
    if "path" in sample:
        where += f" ({sample['path']})"
    for key in ("image", "label"):
        if isinstance(sample[key], torch.Tensor):
            check_tensor(sample[key], f"{caller}: {where} {key!r}")
    return sample


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, *, mode: str = "whole", aug_test: bool = False,
             test_config: Optional[TestPipelineConfig] = None, crop_size: int = 512, stride: int = 341,
             amp_dtype: Union[torch.dtype, str, None] = None, device: Union[str, torch.device, None] = None,
             max_images: Optional[int] = None, show_dir: Union[str, Path, None] = None,
             overwrite: bool = False, progress: bool = True, prior_metrics: bool = False) -> EvalResult:
    """Evaluate a model on a dataset split with the paper's protocol.

    Args:
        model: a `SeMaskFPN` (a DDP wrapper's module is used); it is run in eval mode and its mode restored.
        dataset: a `semask.data` dataset; its raw samples (``dataset.load(i)``: image and label at the original
            size) are used, whatever transform it carries.
        mode: ``whole`` or ``slide`` (windows of ``crop_size`` with ``stride`` at the test scale).
        aug_test: multi-scale (ratios of ``test_config.ratios``) + horizontal flip.
        test_config: test scale and ratios (default: the model's recipe, `semask.engine.inference.model_test_config`).
        crop_size, stride: the sliding-window mode's window and stride.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``), None for fp32, or a precision name
            (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``), as `Predictor` takes it.
        device: where to run (default: the model's device).
        max_images: evaluate the first N images only.
        show_dir: write a panel per image (image, ground truth, prediction, error map, class legend) here, as
            ``<image stem>.png``; planned before any image is evaluated: the folder may not be or lie inside the
            dataset's folders, and existing panels are an error unless `overwrite`.
        overwrite: replace panels that already exist in `show_dir`.
        progress: show a progress bar (on the first process).
        prior_metrics: also score the semantic priors of the same forward (`EvalResult.prior_metrics`); whole
            mode without ``aug_test`` only (sliding windows and several views have no one prior per image).

    Returns:
        An `EvalResult`; identical on every process of a distributed run.

    Raises:
        UsageError: ``prior_metrics`` with slide mode or ``aug_test``.
        OutputError: `show_dir` is or lies inside the dataset's folders, cannot be written, or two images would
            give the same panel name; `OutputExistsError` for existing panels without `overwrite`.
    """
    module = getattr(model, "module", model)
    check_classes(module, dataset)
    class_names = tuple(getattr(dataset, "class_names", None) or module.class_names
                        or [f"class {k}" for k in range(module.num_classes)])
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n < 1:
        raise UsageError(f"evaluate: the dataset {dataset!r} has no images")
    if prior_metrics and (mode != "whole" or aug_test):
        raise UsageError(f"evaluate: prior_metrics needs mode 'whole' without aug_test (one forward per image), "
                         f"got mode {mode!r}" + (" with aug_test" if aug_test else ""))
    was_training = module.training
    predictor = Predictor(module, mode="msflip" if aug_test and mode == "whole" else mode,
                          flip=True if aug_test else None, crop_size=crop_size, stride=stride, device=device,
                          amp_dtype=amp_dtype, test_config=test_config,
                          ratios=(test_config.ratios if test_config is not None else None) if aug_test else None)
    k = module.num_classes
    ignore = getattr(dataset, "ignore_index", 255)
    confusion = torch.zeros(k, k, dtype=torch.int64, device=predictor.device)
    priors = PriorConfusions(module, k, predictor.device) if prior_metrics else None
    with_output = priors is not None and priors.scored  # else the priors are all None: no output needed
    indices, rank, world = shard(n)
    if show_dir is not None:  # before any work; each process checks the panels it writes
        plan_panels(dataset, show_dir, n, indices, overwrite)
    records: list[dict[str, Any]] = []
    if show_dir is not None:
        Path(show_dir).mkdir(parents=True, exist_ok=True)
    bar = progress_bar(n, "evaluate", "img", progress and rank == 0)
    start = time.perf_counter()
    try:
        for i in indices:
            sample = dataset_sample(dataset, i)
            if with_output:
                pred, output = predictor.predict_with_output(sample["image"])
            else:
                pred = predictor.predict_labels(sample["image"])
            label = torch.as_tensor(sample["label"], device=predictor.device)
            image_confusion = confusion_matrix(pred, label, k, ignore)  # checks the label first
            confusion += image_confusion
            if with_output:
                priors.add(output, label, ignore)
                del output
            one = metrics_from_confusion(image_confusion)
            records.append({"index": i, "path": str(sample.get("path", i)), "mIoU": one["mIoU"], "aAcc": one["aAcc"]})
            if show_dir is not None:
                _save_panel(Path(show_dir), sample, pred.cpu().numpy(), module, class_names, ignore, one["mIoU"])
            bar.update(min(world, n - bar.n))
    finally:
        bar.close()
        module.train(was_training)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        if with_output:
            priors.all_reduce()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (records, seconds))
        records = sorted((r for part, _ in gathered for r in part), key=lambda r: r["index"])
        seconds = max(s for _, s in gathered)
    return EvalResult(metrics=metrics_from_confusion(confusion), class_names=class_names,
                      confusion=confusion.cpu().numpy(), per_image=records, mode=mode, aug_test=aug_test,
                      seconds=seconds, prior_metrics=None if priors is None else priors.stage_metrics(),
                      decoder_prior_metrics=None if priors is None else priors.decoder_metrics())


def data_inputs(data: Any) -> list[tuple[str, Path]]:
    """The dataset root that a config's ``data`` section reads, as a `semask.io` input (no output goes into it).

    Only a root that holds a dataset counts (its image or label folder exists; for ADE20K also the
    ``ADEChallengeData2016`` folder inside it): a root without one holds nothing to protect, and may well be a
    parent folder where runs are kept; reading it then fails with the dataset's expected layout.
    """
    root = Path(data.root)
    subs = ("leftImg8bit", "gtFine") if data.dataset == "cityscapes" else ("images", "annotations")
    roots = [root, root / "ADEChallengeData2016"] if data.dataset == "ade20k" else [root]
    return [("the dataset root", r) for r in roots if any((r / sub).is_dir() for sub in subs)]


def dataset_inputs(dataset: Any) -> list[tuple[str, Path]]:
    """The folders a dataset reads (its root, image and label folders, and every folder holding its files), as
    `semask.io` inputs: no output may go into them."""
    names = {"root": "the dataset root", "img_dir": "the dataset's image folder", "ann_dir": "the dataset's label folder"}
    inputs = [(what, Path(getattr(dataset, name))) for name, what in names.items()
              if getattr(dataset, name, None) is not None]
    folders = {p.parent for pair in getattr(dataset, "pairs", ()) for p in pair}
    return inputs + [("a dataset folder", folder) for folder in sorted(folders)]


def plan_panels(dataset: Any, show_dir: Union[str, Path], n: int, indices: Sequence[int] = (),
                overwrite: bool = False) -> list[Path]:
    """Check the ``show_dir`` panels of the first `n` images before any work (`semask.io.check_output_folder`).

    Returns:
        The panel paths of `indices` (the images this process draws); empty when the dataset does not list its
        files (``dataset.pairs``): then only the folder is checked.
    """
    from semask.errors import OutputError
    from semask.io import check_output_folder

    pairs = getattr(dataset, "pairs", None)
    names = [Path(pairs[i][0]).stem + ".png" for i in range(n)] if pairs is not None else []
    seen: dict[str, int] = {}
    clashes = [f"{pairs[i][0]} and {pairs[seen[name]][0]}" for i, name in enumerate(names)
               if seen.setdefault(name, i) != i]
    if clashes:
        raise OutputError(f"show_dir (--show-dir): {len(clashes)} panel name(s) would be written by two images "
                          f"({'; '.join(clashes[:5])}); panels are named by the image's file name, so these "
                          "images cannot share one folder")
    mine = [names[i] for i in indices] if names else []
    check_output_folder(show_dir, "show_dir (--show-dir)", inputs=dataset_inputs(dataset), files=mine,
                        overwrite=overwrite)
    return [Path(show_dir) / name for name in mine]


def _save_panel(folder: Path, sample: dict[str, Any], pred: np.ndarray, model: nn.Module,
                class_names: Sequence[str], ignore_index: int, miou: float) -> None:
    """Image | ground truth | prediction | error map, with a class legend, as ``<image stem>.png``."""
    import matplotlib.pyplot as plt

    from semask.io import atomic_path
    from semask.viz import plot_evaluation_panel

    fig = plot_evaluation_panel(sample["image"], sample["label"], pred, model.palette, class_names,
                                ignore_index=ignore_index,
                                title=f"{Path(str(sample.get('path', 'image'))).name}: mIoU {100 * miou:.1f}")
    name = Path(str(sample.get("path", "image"))).stem + ".png"
    with atomic_path(folder / name) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
