"""`semask demo`: the toolkit's main job in one command (SeMask, arXiv 2112.12782).

On a fresh install, with no data and no GPU: write the built-in toy dataset if it is not there, train
`semask_toy_fpn` with the `toy` preset (on the GPU when there is one), evaluate it on the toy validation split,
and save into one run directory the checkpoints, ``log.jsonl``, the loss and mIoU curves, prediction panels of
validation images and the per-stage semantic priors; then print where they are and the final mIoU.

    semask demo                                   # about 3 minutes on a 2-core AVX-512 CPU, 4 on an AVX2 one
    semask demo --minutes 3                       # the toy schedule fitted to 3 minutes (semask.engine.budget)
    semask demo --set schedule.iters=100          # a shorter run
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from semask.engine.budget import check_minutes
from semask.engine.config import apply_overrides, get_preset, to_dict
from semask.data.toy import META_FILE, STUFF, ToyDataset, make_toy_dataset
from semask.engine.inference import Predictor, normalize
from semask.engine.rundir import BEST, CONFIG_FILE, LATEST, LOG_FILE, TEXT_LOG
from semask.engine.train import train
from semask.errors import UsageError
from semask.io import atomic_path, check_output_folder

__all__ = ["DemoResult", "run_demo", "DEFAULT_DATA_ROOT", "DEFAULT_RUNS_DIR"]

DEFAULT_DATA_ROOT = "data/toy"  # where `semask demo` writes (and later finds) the toy dataset
DEFAULT_RUNS_DIR = "runs"  # each demo run gets runs/demo-<date>-<time> unless --work-dir is given
PANELS = 6  # validation images drawn as prediction panels


@dataclass
class DemoResult:
    """What `run_demo` produced."""

    work_dir: Path
    mIoU: float  # noqa: N815 (the metric's name)
    seconds: float  # wall time of the whole demo
    files: dict[str, Path] = field(default_factory=dict)  # "checkpoint", "log", "curves", "predictions", "priors", ...
    metrics: dict[str, Any] = field(default_factory=dict)  # the final evaluation (EvalResult.to_dict without per-image)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _use_file_backend() -> None:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only; a notebook that already chose a backend keeps it


def _save(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG to `path` (atomically) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw_predictions(model: torch.nn.Module, val: ToyDataset, final: Any, indices: Sequence[int], scale: Any,
                      folder: Path) -> Path:
    """One image | truth | prediction panel per validation image in `indices`, into `folder`."""
    from semask.viz import plot_evaluation_panel

    folder.mkdir(exist_ok=True)
    for index in indices:
        sample = val.load(index)
        pred = Predictor(model, scale=scale)(sample["image"])
        r = final.per_image[index]
        fig = plot_evaluation_panel(sample["image"], sample["label"], pred, model.palette, model.class_names,
                                    title=f"{Path(sample['path']).name}: mIoU {100 * r['mIoU']:.1f}")
        _save(fig, folder / f"{Path(sample['path']).stem}.png")
    return folder


def _draw_priors(model: torch.nn.Module, sample: dict[str, Any], device: torch.device, folder: Path) -> Path:
    """The per-stage semantic priors of one sample, into `folder`: their argmax, then one map per thing class
    in the image (class 0 when it has none)."""
    from semask.viz import plot_stage_priors

    folder.mkdir(exist_ok=True)
    x = torch.from_numpy(sample["image"]).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        output = model(normalize(x.to(device)))
    output.stage_priors = [p.cpu() for p in output.stage_priors]
    fig = plot_stage_priors(output, sample["image"], class_names=model.class_names, palette=model.palette)
    _save(fig, folder / "argmax.png")
    things = [k for k, name in enumerate(model.class_names) if name not in STUFF and (sample["label"] == k).any()]
    for k in things or [0]:
        fig = plot_stage_priors(output, sample["image"], class_index=k, class_names=model.class_names)
        _save(fig, folder / f"class_{model.class_names[k]}.png")
    return folder


# everything the demo writes into its run directory; the demo never replaces any of them (it has no --overwrite: each
# run gets a new folder by default, and an earlier run is worth keeping)
OUTPUTS = (LATEST, BEST, LOG_FILE, CONFIG_FILE, TEXT_LOG, "curves.png", "demo.json", "predictions", "priors")


def _plan(work_dir: Path, data_root: Path) -> None:
    """Check every output before any work: the run directory outside the toy dataset and free of an earlier
    demo's files, and the dataset's folder writable when the dataset is still to be written."""
    check_output_folder(work_dir, "work_dir (--work-dir)", inputs=[("the toy dataset (--data-root)", data_root)],
                        files=OUTPUTS, overwrite=False,
                        replace_hint="leave out --work-dir (every demo gets a new folder by default)")
    if not (data_root / META_FILE).is_file():
        check_output_folder(data_root, "data_root (--data-root)")


def _check_budget(minutes: Optional[float], overrides: Sequence[str]) -> Optional[float]:
    """The checked budget; with one, no ``schedule.iters`` override (the budget sets it)."""
    if minutes is None:
        return None
    minutes = check_minutes(minutes)
    fixed = [o for o in overrides if o.split("=", 1)[0].strip() == "schedule.iters"]
    if fixed:
        raise UsageError(f"--minutes {minutes:g} sets schedule.iters to the steps that fit; leave out --set "
                         f"{fixed[0]} (or --minutes for a fixed number of steps)")
    return minutes


def run_demo(work_dir: Union[str, Path, None] = None, data_root: Union[str, Path] = DEFAULT_DATA_ROOT,
             overrides: Sequence[str] = (), progress: bool = True, minutes: Optional[float] = None) -> DemoResult:
    """Train, evaluate and draw SeMask on the toy data (see the module docstring).

    Args:
        work_dir: run directory (default ``runs/demo-<date>-<time>``); an existing run or demo output there is an
            error, and so is a folder inside the toy dataset (checked before any work).
        data_root: the toy dataset's folder; it is written there first when it holds none.
        overrides: ``key=value`` config overrides on top of the `toy` preset (e.g. ``schedule.iters=100``).
        progress: progress bars.
        minutes: a time budget for the demo from this call to the end of training (writing the toy set when it is
            missing, training, evaluations; the figures take a few seconds more): the toy schedule is fitted to it
            (`semask.train`'s ``minutes``) and the fit is recorded in ``demo.json``. None: the preset's fixed
            schedule. It cannot be given with a ``schedule.iters`` override.

    Returns:
        A `DemoResult` with the final mIoU, the wall time and the paths of everything written.

    Raises:
        UsageError: a bad budget (not above 0, not finite, above a week), a budget with ``schedule.iters``, or
            a budget the toy set's writing already used up.
    """
    _use_file_backend()
    from semask.viz import plot_training_log

    start = time.perf_counter()
    minutes = _check_budget(minutes, overrides)
    data_root = Path(data_root)
    config = apply_overrides(get_preset("toy"), [f"data.root={data_root}", *overrides])
    if work_dir is None:
        work_dir = Path(DEFAULT_RUNS_DIR) / time.strftime("demo-%Y%m%d-%H%M%S")
    work_dir = Path(work_dir)
    _plan(work_dir, data_root)
    if not (data_root / META_FILE).is_file():
        _say(f"writing the toy dataset to {data_root} ...")
        make_toy_dataset(data_root)
    left = None if minutes is None else minutes - (time.perf_counter() - start) / 60
    if left is not None and left <= 0:
        raise UsageError(f"--minutes {minutes:g}: writing the toy dataset took "
                         f"{(time.perf_counter() - start) / 60:.1f} minutes, the whole budget; run again (the dataset "
                         "is there now) or give a longer budget")
    result = train(config, work_dir, progress=progress, minutes=left)
    config, model = result.config, result.model
    device = next(model.parameters()).device
    files = {"checkpoint": work_dir / LATEST, "best": work_dir / BEST, "log": work_dir / LOG_FILE,
             "config": work_dir / CONFIG_FILE}
    files["curves"] = _save(plot_training_log(work_dir), work_dir / "curves.png")

    val = ToyDataset(data_root, "validation")
    final = result.evaluation  # the evaluation after the last step
    shown = [r["index"] for r in final.per_image[:PANELS // 2]] + [r["index"] for r in final.worst(PANELS // 2)]
    files["predictions"] = _draw_predictions(model, val, final, list(dict.fromkeys(shown)),  # first, then hardest
                                             config.data.test_pipeline.scale, work_dir / "predictions")
    files["priors"] = _draw_priors(model, val.load(shown[0]), device, work_dir / "priors")

    seconds = time.perf_counter() - start
    summary = {k: v for k, v in final.to_dict().items() if k not in ("per_image", "confusion")}
    run = next(r for r in result.history if r["kind"] == "run")  # the precision that ran, the budget's fit
    record = {"mIoU": final.mIoU, "seconds": seconds, "seed": config.train.seed, "steps": config.schedule.iters,
              "minutes": minutes, "budget": run.get("budget"), "precision": run["precision"],
              "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "python": platform.python_version(), "metrics": summary,
              "overrides": list(overrides), "config": to_dict(config)}
    with atomic_path(work_dir / "demo.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    files["summary"] = work_dir / "demo.json"
    _say(final.table())
    _say(f"\nsemask demo: mIoU {100 * final.mIoU:.2f} on the {final.num_images} toy validation images after "
         f"{config.schedule.iters} steps (seed {config.train.seed}), {seconds / 60:.1f} min in all.")
    _say(f"run directory: {work_dir}\n" + "\n".join(f"  {k:<12} {v}" for k, v in files.items()))
    return DemoResult(work_dir=work_dir, mIoU=final.mIoU, seconds=seconds, files=files, metrics=summary)
