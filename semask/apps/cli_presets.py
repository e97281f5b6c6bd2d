"""The `semask` commands that run a training preset (SeMask, arXiv 2112.12782): ``configs``, ``train``, ``test`` and
``analyze``. Each takes a preset name or a run's config.json with ``--set`` overrides, resolved here; the
parser and the one place that prints errors are `semask.apps.cli`'s.

    semask configs [PRESET] [--set KEY=VALUE ...]
    semask train PRESET --work-dir DIR [--set KEY=VALUE ...] [--resume]
    semask test PRESET CHECKPOINT [--aug-test] [--mode whole|slide] [--precision P] [--show-dir DIR] [--json FILE]
    semask analyze PRESET CHECKPOINT [--max-images N] [--json FILE] [--html FILE [--html-images N]]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from semask.errors import UsageError
from semask.io import check_output_file, check_output_folder

__all__ = ["cmd_configs", "cmd_train", "cmd_test", "cmd_analyze"]


def _config_file(name_or_path: str) -> str | None:
    """The config file a preset argument names (a run's config.json), or None for a preset name."""
    from semask.engine.config import PRESETS

    return None if name_or_path in PRESETS or not name_or_path.endswith(".json") else name_or_path


def _resolve_config(name_or_path: str, overrides: Sequence[str]):
    """A preset name or a run's config.json, with ``--set`` overrides applied."""
    from semask.engine.config import PRESETS, apply_overrides, get_preset, load_config

    if name_or_path in PRESETS or not name_or_path.endswith(".json"):
        config = get_preset(name_or_path)
    else:
        config = load_config(name_or_path)
    return apply_overrides(config, overrides)


def _report(result: Any, header: str, json_path: Optional[str], what: str) -> None:
    """Print `header` and the result's table; with `json_path`, write the result there and say so."""
    print(header)
    print(result.table())
    if json_path:
        result.save_json(json_path)
        print(f"{what} written to {json_path}")


def cmd_configs(args: argparse.Namespace) -> int:
    from semask.engine.config import PRESETS, list_presets, to_dict

    if args.preset is None:
        for name in list_presets():
            print(f"{name:<28} {PRESETS[name].official_config or '(semask: the built-in toy data)'}")
        return 0
    values = to_dict(_resolve_config(args.preset, args.set))
    if args.json:
        print(json.dumps(values, indent=2))
        return 0

    def lines(node: dict, prefix: str = "") -> list[str]:  # one `key=value` per field, as --set takes them
        out = []
        for key, value in node.items():
            if isinstance(value, dict):
                out += lines(value, f"{prefix}{key}.")
            else:
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
                    if isinstance(value, bool) else "none" if value is None else str(value)
                out.append(f"{prefix}{key}={text}")
        return out

    print("\n".join(lines(values)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from semask.engine.rundir import CONFIG_FILE
    from semask.engine.train import train

    config = _resolve_config(args.preset, args.set)
    if not args.resume:  # a resumed run rewrites its own config.json; a new run never writes over the one it read
        check_output_folder(args.work_dir, "--work-dir", inputs=[("the config file", _config_file(args.preset))],
                            files=[CONFIG_FILE])
    result = train(config, args.work_dir, resume=args.resume, progress=not args.no_progress)
    if result.best is not None:
        print(f"best mIoU {100 * result.best['mIoU']:.2f} at step {result.best['iter']}; run in {result.work_dir}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from semask.engine import distributed
    from semask.checkpoint import load_checkpoint
    from semask.engine.evaluate import data_inputs, evaluate
    from semask.device import autocast_dtype, precision_record, precision_text
    from semask.engine.train import build_datasets

    config = _resolve_config(args.preset, args.set)
    inputs = [("the checkpoint", args.checkpoint), ("the config file", _config_file(args.preset)),
              *data_inputs(config.data)]
    if args.json:  # every output is checked before the checkpoint is read and the split evaluated
        check_output_file(args.json, "--json", inputs=inputs, overwrite=args.overwrite, probe=True)
    if args.show_dir:  # its panels are checked against the dataset's files once the split is listed (evaluate)
        check_output_folder(args.show_dir, "--show-dir", inputs=inputs)
    info = distributed.setup(args.device)
    try:
        model = load_checkpoint(args.checkpoint, map_location=info.device)
        _, val_set = build_datasets(config)
        dtype = autocast_dtype(args.precision, info.device)
        result = evaluate(model, val_set, mode=args.mode or config.eval.mode, aug_test=args.aug_test,
                          test_config=config.data.test_pipeline, crop_size=config.eval.crop_size,
                          stride=config.eval.stride, amp_dtype=dtype, max_images=config.eval.max_images,
                          show_dir=args.show_dir, overwrite=args.overwrite, progress=not args.no_progress)
        if info.is_main:
            protocol = (("multi-scale + flip" if args.aug_test else "single scale") + f", {result.mode}, "
                        + precision_text(precision_record(args.precision, info.device)))
            _report(result, f"{args.checkpoint} on {val_set!r} ({result.num_images} images, {protocol}, "
                            f"{result.num_images / result.seconds:.2f} img/s)", args.json, "metrics")
    finally:
        distributed.cleanup(info)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """`semask.analyze` over the validation split a preset names, found as `semask test` finds it."""
    from semask.checkpoint import load_checkpoint
    from semask.device import autocast_dtype
    from semask.engine import distributed
    from semask.engine.analysis import analyze
    from semask.engine.evaluate import data_inputs
    from semask.engine.train import build_datasets
    from semask.viz.page import write_page

    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max-images must be a positive number of images, got {args.max_images}")
    for flag, value in (("--html-images", args.html_images), ("--html-grid", args.html_grid),
                        ("--html-max-mb", args.html_max_mb)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be a positive number, got {value}")
    config = _resolve_config(args.preset, args.set)
    inputs = [("the checkpoint", args.checkpoint), ("the config file", _config_file(args.preset)),
              *data_inputs(config.data)]
    outputs = [(flag, path) for flag, path in (("--json", args.json), ("--html", args.html)) if path]
    if len(outputs) == 2 and Path(args.json).resolve() == Path(args.html).resolve():
        raise UsageError(f"--json and --html name the same file {args.json!r}; give each its own")
    for flag, path in outputs:  # planned before any work: a bad or existing output fails now, not after the split
        check_output_file(path, flag, inputs=inputs, overwrite=args.overwrite, probe=True)
    info = distributed.setup(args.device)
    try:
        model = load_checkpoint(args.checkpoint, map_location=info.device)
        _, val_set = build_datasets(config)
        max_images = args.max_images if args.max_images is not None else config.eval.max_images
        # the page's views are built first: a page over its size budget fails before the split is analysed
        views = _page_views(args, model, val_set, config, max_images, info.device) if args.html and info.is_main \
            else None
        result = analyze(model, val_set, max_images=max_images, test_config=config.data.test_pipeline,
                         amp_dtype=autocast_dtype(args.precision, info.device), progress=not args.no_progress)
        if info.is_main:
            _report(result, f"{args.checkpoint} on {val_set!r} ({result.num_images} images, whole image at the test "
                            f"scale, {result.seconds:.1f} s)", args.json, "analysis")
            if views is not None:
                path = write_page(args.html, views, result.to_dict())
                print(f"explorer page ({len(views.data['images'])} images) written to {path}")
    finally:
        distributed.cleanup(info)
    return 0


def _page_views(args: argparse.Namespace, model: Any, val_set: Any, config: Any, max_images: Optional[int],
                device: Any) -> Any:
    """`semask analyze --html`: the explorer views of the first analysed images, built (and held to their
    budget) before the analysis, which the page then shows as a table (`semask.viz.page.write_page`)."""
    from semask.viz.page import build_views, page_source

    source = page_source(model, val_set, test_preset=config.data.test_pipeline, device=device)
    count = min(args.html_images, len(source.titles), max_images or len(source.titles))
    budget = {"max_mb": args.html_max_mb} if args.html_max_mb is not None else {}
    return build_views(source, images=range(count), query_grid=args.html_grid,
                       title=f"SeMask analysis: {Path(args.checkpoint).name} on {config.data.dataset}", **budget)
