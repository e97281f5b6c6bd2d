"""The `semask` command line (SeMask, arXiv 2112.12782).

Each sub-command is a thin wrapper over a public function of the package, so that everything the command
line does can also be done from Python and is tested there. The commands that run a training preset (``configs``,
``train``, ``test``, ``analyze``) are `semask.apps.cli_presets`'; this module parses the line and prints the errors.

    semask list-models [PATTERN]
    semask info CHECKPOINT
    semask predict CHECKPOINT IMAGE [IMAGE ...] --out DIR [--mode whole|slide|msflip] [--precision P] [--overwrite]
    semask toy-data ROOT [--seed N]
    semask convert cityscapes ROOT
    semask convert coco-stuff10k ROOT
    semask benchmark [--model semask_tiny --size 512 ...] [--json FILE [--overwrite]]
    semask export CHECKPOINT OUT.onnx [--size H W] [--dynamic] [--prior]
    semask convert-weights IN.pth OUT.safetensors
    semask configs [PRESET] [--set KEY=VALUE ...]
    semask train PRESET --work-dir DIR [--set KEY=VALUE ...] [--resume]
    semask test PRESET CHECKPOINT [--aug-test] [--mode whole|slide] [--precision P] [--show-dir DIR] [--json FILE]
                [--overwrite]
    semask analyze PRESET CHECKPOINT [--max-images N] [--json FILE] [--html FILE [--html-images N]] [--overwrite]
    semask demo [--work-dir DIR] [--data-root DIR] [--minutes N] [--set KEY=VALUE ...]

Every command that writes checks all its outputs before any work (`semask.io`): never one of its inputs or inside
one, existing files replaced only with --overwrite, the destination writable.
`train` and `test` also run under torchrun: ``torchrun --nproc_per_node=N -m semask train ...``.

Errors (`main`): every error is printed as one line, ``semask COMMAND: error: MESSAGE``, without a traceback
unless ``--debug`` is given (anywhere on the line); the exit status is 2 for usage errors (bad arguments,
paths, names, outputs that would overwrite something) and 1 for failures (`semask.errors.exit_status`). A
sub-command gets this by raising the package's errors (it prints no error itself); it prints notes on stderr as
``semask COMMAND: note: ...``.
The environment variable ``SEMASK_MAX_IMAGE_PIXELS`` raises the image size limit for trusted large images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from typing import Sequence

from semask.apps.cli_presets import cmd_analyze, cmd_configs, cmd_test, cmd_train
from semask.errors import BatchError, SemaskError, UsageError, error_lines, exit_status
from semask.io import check_output_file

__all__ = ["main", "build_parser", "note"]

PRECISION_HELP = ("fp32 (default: exact, reproducible numbers), bf16, fp16 (autocast), or auto: bf16 where the device "
                  "has it natively (GPUs; CPUs with AVX512_BF16 or AMX), else fp32")


def note(command: str, message: str) -> None:
    """Tell the user something on stderr without failing: ``semask COMMAND: note: MESSAGE``."""
    print(f"semask {command}: note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- commands
def _cmd_list_models(args: argparse.Namespace) -> int:
    from semask.model.registry import list_models

    names = list_models(args.pattern)
    if not names:  # a failure (exit status 1), not a usage error: the pattern is valid, nothing matches it
        raise SemaskError(f"no model matches {args.pattern!r}; registered: {', '.join(list_models())}")
    for name in names:
        print(name)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from semask.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint, map_location="cpu")
    info = {
        "model": model.name,
        "num_classes": model.num_classes,
        "backbone_classes": model.backbone.num_classes,
        "semantic_global_stages": list(model.backbone.global_stages),
        "parameters": sum(p.numel() for p in model.parameters()),
        "classes": list(model.class_names) if model.class_names else None,
    }
    print(json.dumps(info, indent=2))
    return 0


def _input_images(paths: Sequence[str]) -> list[str]:
    """`paths` without repeats of the same file, checked to be existing files."""
    images, seen = [], set()
    for image in paths:  # the same file named twice is segmented once
        key = os.path.realpath(image)
        if key not in seen:
            seen.add(key)
            images.append(image)
    missing = [i for i in images if not os.path.exists(i)]
    folders = [i for i in images if os.path.isdir(i)]
    if missing or folders:
        parts = ([f"{len(missing)} image(s) do not exist: {', '.join(missing[:10])}"] if missing else []) + (
            [f"{len(folders)} image path(s) are folders, not files: {', '.join(folders[:10])}"] if folders else [])
        raise UsageError("; ".join(parts))
    return images


def _cmd_predict(args: argparse.Namespace) -> int:
    from semask.checkpoint import load_checkpoint
    from semask.data.classes import default_palette
    from semask.engine.inference import Predictor
    from semask.device import check_device
    from semask.io import plan_outputs
    from semask.viz import save_label_map

    device = check_device(args.device)
    images = _input_images(args.images)
    # every output is decided and checked before anything is read or written
    targets = plan_outputs(images, args.out, ".png", overwrite=args.overwrite,
                           protected=[("the checkpoint", args.checkpoint)])
    model = load_checkpoint(args.checkpoint, map_location=device)
    if model.num_classes > 256:
        raise UsageError(f"{args.checkpoint} has {model.num_classes} classes; PNG label maps hold at most 256 "
                         "(use semask.Predictor from Python and store the labels another way)")
    predictor = Predictor(model, mode=args.mode, scale=tuple(args.scale) if args.scale else None,
                          crop_size=args.crop_size, stride=args.stride, device=device, amp_dtype=args.precision)
    palette = None
    if args.color:
        palette = model.palette
        if palette is None:
            palette = default_palette(model.num_classes)
            note("predict", f"{args.checkpoint} has no palette: using semask's default palette for "
                            f"{model.num_classes} classes")
    failures = []
    for image, target in zip(images, targets):
        try:
            label = predictor(image)
            save_label_map(label, target, palette=palette)
        except (SemaskError, OSError, MemoryError) as exc:  # one bad image does not drop the others
            failures.append((image, exc))
            continue
        print(f"{image} -> {target}")
    if failures:  # main prints one line per failed image, then the count
        raise BatchError(failures, len(images), "images")
    return 0


def _cmd_toy_data(args: argparse.Namespace) -> int:
    from semask.data.toy import make_toy_dataset

    root = make_toy_dataset(args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                            size=args.size, overwrite=args.overwrite)
    print(f"toy dataset written to {root}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from semask.data import convert

    if args.dataset == "cityscapes":
        written = convert.convert_cityscapes(args.root, overwrite=args.overwrite)
    else:
        written = convert.convert_coco_stuff10k(args.root, overwrite=args.overwrite)
    print(f"{args.dataset}: wrote {written} label files under {args.root}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from semask.apps.benchmark import main as benchmark_main

    return benchmark_main(args.benchmark_args)


def _cmd_export(args: argparse.Namespace) -> int:
    from semask.checkpoint import load_checkpoint
    from semask.apps.export import export_onnx

    if len(args.size) not in (1, 2):
        raise UsageError(f"--size takes one or two numbers (height [width]), got {args.size}")
    check_output_file(args.out, "output", inputs=[("the checkpoint", args.checkpoint)], overwrite=args.overwrite,
                      probe=True)  # before the checkpoint is read and the model traced
    model = load_checkpoint(args.checkpoint, map_location="cpu", sha256=args.sha256)
    result = export_onnx(model, args.out, size=(args.size[0], args.size[-1]), batch_size=args.batch_size,
                         dynamic=args.dynamic, prior=args.prior, opset=args.opset, check=not args.no_check,
                         overwrite=args.overwrite)
    print(json.dumps({"path": str(result.path), "model": model.name, "size": list(result.size),
                      "batch_size": "dynamic" if result.dynamic else result.batch_size, "dynamic": result.dynamic,
                      "min_size": result.min_size, "outputs": list(result.outputs), "opset": result.opset,
                      "checks": result.checks}, indent=2))
    return 0


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from semask.checkpoint import convert_to_safetensors

    out = convert_to_safetensors(args.input, args.output, sha256=args.sha256, overwrite=args.overwrite)
    print(f"{args.input} -> {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from semask.apps.demo import run_demo

    run_demo(args.work_dir, args.data_root, args.set, progress=not args.no_progress, minutes=args.minutes)
    return 0


# --------------------------------------------------------------------------------------------- parser
def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options `semask test` and `semask analyze` share: precision, device, config overrides, progress."""
    from semask.device import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. data.root=/data/ADEChallengeData2016")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `semask` command (exposed for tests and documentation)."""
    from semask import __version__
    from semask.device import PRECISIONS

    parser = argparse.ArgumentParser(prog="semask", description="SeMask semantic segmentation toolkit.",
                                     epilog="Errors print one line each; exit status 2 for usage errors, 1 for "
                                            "failures.")
    parser.add_argument("--version", action="version", version=f"semask {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (allowed anywhere)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list-models", help="list the registered model names")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'semask_*'")
    p.set_defaults(func=_cmd_list_models)

    p = sub.add_parser("info", help="describe a checkpoint (official SeMask FPN or semask's own)")
    p.add_argument("checkpoint")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("predict", help="segment images with a checkpoint and write label PNGs")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True,
                   help="output folder for the label maps: <name>.png, keeping the inputs' paths relative to the "
                        "folder that holds them all; never an input file, existing ones only with --overwrite")
    p.add_argument("--mode", choices=["whole", "slide", "msflip"], default="whole")
    p.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                   help="keep-ratio test scale (default: the one the model's recipe tests at, e.g. (2048, 512) for "
                        "ADE20K, (2048, 1024) for Cityscapes, (2560, 640) for Large ADE20K / COCO-Stuff models)")
    p.add_argument("--crop-size", type=int, default=512, help="window size for --mode slide")
    p.add_argument("--stride", type=int, default=341, help="window stride for --mode slide")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--color", action="store_true",
                   help="write colour PNGs with the checkpoint's palette (semask's default palette if it has none)")
    p.add_argument("--overwrite", action="store_true", help="replace label maps that already exist in --out")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("toy-data", help="write the built-in synthetic toy dataset (ADE20K layout)")
    p.add_argument("root", help="folder to write the dataset into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=None, help="number of training images (default: the toy set's)")
    p.add_argument("--num-val", type=int, default=None, help="number of validation images (default: the toy set's)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the toy set's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a toy dataset at ROOT (only files semask wrote, as its manifest lists them)")
    p.set_defaults(func=_cmd_toy_data)

    p = sub.add_parser("convert", help="convert a downloaded dataset into the layout semask reads")
    p.add_argument("dataset", choices=["cityscapes", "coco-stuff10k"])
    p.add_argument("root", help="the dataset's root folder as downloaded")
    p.add_argument("--overwrite", action="store_true", help="rewrite label files that already exist")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("configs", help="list the training presets, or print one resolved config")
    p.add_argument("preset", nargs="?", default=None, help="a preset name (or a run's config.json)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. train.batch_size=4")
    p.add_argument("--json", action="store_true", help="print the config as JSON instead of key=value lines")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("train", help="train a model with a preset recipe (also under torchrun)")
    p.add_argument("preset", help="a preset name (`semask configs` lists them) or a run's config.json")
    p.add_argument("--work-dir", required=True, help="run directory (checkpoints, log.jsonl, config.json)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. data.root=/data/ADEChallengeData2016 train.batch_size=4")
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir from its latest.pth")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate a checkpoint on a preset's validation split (also under torchrun)")
    p.add_argument("preset", help="the preset whose dataset and test protocol to use (or a run's config.json)")
    p.add_argument("checkpoint", help="an official SeMask FPN checkpoint or one written by semask train")
    p.add_argument("--aug-test", action="store_true", help="multi-scale (0.5 .. 1.75) + flip")
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the preset's eval.mode")
    p.add_argument("--show-dir", default=None, help="write an image | truth | prediction | error panel per image "
                                                     "(<image name>.png; never into the dataset's folders)")
    p.add_argument("--json", default=None, help="write the metrics (per class, per image, confusion) as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file and --show-dir panels")
    _add_run_options(p)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("analyze", help="measure what the semantic layers learn (per-stage prior quality, attention "
                                        "statistics, gates) over a preset's validation split (also under torchrun)")
    p.add_argument("preset", help="the preset whose dataset and test scale to use (or a run's config.json)")
    p.add_argument("checkpoint", help="an official SeMask FPN checkpoint or one written by semask train")
    p.add_argument("--json", default=None, help="also write the analysis as JSON (fractions in 0..1)")
    p.add_argument("--html", default=None, help="also write a self-contained explorer page (one HTML file, no "
                                                "network) of the first images, with the analysis table")
    p.add_argument("--html-images", type=int, default=4, help="images in the --html page (default 4)")
    p.add_argument("--html-grid", type=int, default=8, help="query positions per side of the --html page's "
                                                            "attention views (default 8: 8x8)")
    p.add_argument("--html-max-mb", type=float, default=None, help="size budget of the --html page in MB (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --html file")
    p.add_argument("--max-images", type=int, default=None, help="the first N images only (default: the preset's "
                                                                "eval.max_images, else all)")
    _add_run_options(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the main job: train SeMask on the built-in toy data, evaluate, draw (~3 min "
                                     "on a 2-core AVX-512 CPU, ~4 without AVX-512)")
    p.add_argument("--work-dir", default=None, help="run directory (default: runs/demo-<date>-<time>)")
    p.add_argument("--data-root", default="data/toy", help="the toy dataset (written there when missing)")
    p.add_argument("--minutes", type=float, default=None, metavar="N",
                   help="a time budget: the toy schedule (steps, warm-up, evaluations) is fitted to the steps that "
                        "fit in N minutes on this machine, measured on a few probe steps; default: the fixed, "
                        "reproducible schedule")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override the toy preset, e.g. schedule.iters=100 for a shorter run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, checked against PyTorch with onnxruntime")
    p.add_argument("checkpoint", help="a .pth or .safetensors checkpoint, or an https:// URL of one")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--size", type=int, nargs="+", default=[512, 512], metavar="PX",
                   help="input height and width the graph is traced at (one number: square; default 512 512)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of a static graph (default 1)")
    p.add_argument("--dynamic", action="store_true",
                   help="symbolic batch, height and width (heights/widths from 33 px; trace size > 32 x window)")
    p.add_argument("--prior", action="store_true", help="also output the semantic prior (prior_logits)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the checkpoint (or a prefix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("convert-weights", help="convert a .pth checkpoint (read safely) to .safetensors")
    p.add_argument("input", help="a .pth checkpoint (official SeMask FPN, semask's own, ImageNet Swin) or URL")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the input (or a prefix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_convert_weights)

    # the benchmark has its own parser (semask.apps.benchmark.build_parser); main() hands it the remaining words
    p = sub.add_parser("benchmark", help="measure speed and memory (see `semask benchmark --help`)",
                       add_help=False)
    p.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 failure, 2 usage error).

    Errors are printed one line each (`semask.errors.error_lines`), with a traceback only under ``--debug``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and not argv[0].startswith("-") else "command"
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    show = warnings.showwarning

    def note(message, category, filename, lineno, file=None, line=None):  # semask's notices as one line each
        if os.path.abspath(filename).startswith(package + os.sep):
            print(f"semask {command}: note: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = note
    try:
        limit = os.environ.get("SEMASK_MAX_IMAGE_PIXELS")
        if limit:
            from PIL import Image

            if not limit.isdigit() or int(limit) < 1:
                raise UsageError(f"SEMASK_MAX_IMAGE_PIXELS must be a positive integer, got {limit!r}")
            Image.MAX_IMAGE_PIXELS = int(limit)
        if argv[:1] == ["benchmark"]:
            args = argparse.Namespace(command="benchmark", func=_cmd_benchmark, benchmark_args=argv[1:])
        else:  # argparse prints its usage and one error line and exits 2 itself (0 for --help, --version)
            args = build_parser().parse_args(argv)
        command = args.command
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"semask {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place where errors become messages and exit statuses
        if debug:
            traceback.print_exc()
        for line in error_lines(exc):
            print(f"semask {command}: error: {line}", file=sys.stderr)
        return exit_status(exc)
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    raise SystemExit(main())
