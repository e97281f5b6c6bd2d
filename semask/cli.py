"""The `semask` command line (SeMask, arXiv 2112.12782).

Each sub-command is a thin wrapper over a public function of the package, so that everything the command
line does can also be done from Python and is tested there.

    semask list-models [PATTERN]
    semask info CHECKPOINT
    semask predict CHECKPOINT IMAGE [IMAGE ...] --out DIR [--mode whole|slide|msflip]
    semask toy-data ROOT [--seed N]
    semask convert cityscapes ROOT
    semask convert coco-stuff10k ROOT
    semask benchmark [--model semask_tiny --size 512 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


# --------------------------------------------------------------------------------------------- commands
def _cmd_list_models(args: argparse.Namespace) -> int:
    from semask.models import list_models

    for name in list_models(args.pattern):
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


def _cmd_predict(args: argparse.Namespace) -> int:
    from semask.checkpoint import load_checkpoint
    from semask.inference import Predictor
    from semask.visualize import save_label_map

    model = load_checkpoint(args.checkpoint, map_location=args.device)
    predictor = Predictor(model, mode=args.mode, scale=tuple(args.scale) if args.scale else None,
                          crop_size=args.crop_size, stride=args.stride, device=args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image in args.images:
        label = predictor(image)
        target = out_dir / (Path(image).stem + ".png")
        save_label_map(label, target, palette=model.palette if args.color else None)
        print(f"{image} -> {target}")
    return 0


def _cmd_toy_data(args: argparse.Namespace) -> int:
    from semask.data.toy import make_toy_dataset

    try:
        root = make_toy_dataset(args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                size=args.size, overwrite=args.overwrite)
    except FileExistsError as exc:  # an existing dataset is kept unless --overwrite: say so, no traceback
        print(f"semask toy-data: error: {exc}", file=sys.stderr)
        return 2
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
    from semask.benchmark import main as benchmark_main

    return benchmark_main(args.benchmark_args)


# --------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `semask` command (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(prog="semask", description="SeMask semantic segmentation toolkit.")
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
    p.add_argument("--out", required=True, help="output folder for the label maps")
    p.add_argument("--mode", choices=["whole", "slide", "msflip"], default="whole")
    p.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                   help="keep-ratio test scale (default: (2048, 512), Cityscapes-sized models (2048, 1024))")
    p.add_argument("--crop-size", type=int, default=512, help="window size for --mode slide")
    p.add_argument("--stride", type=int, default=341, help="window stride for --mode slide")
    p.add_argument("--device", default="cpu")
    p.add_argument("--color", action="store_true", help="write colour PNGs with the checkpoint's palette")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("toy-data", help="write the built-in synthetic toy dataset (ADE20K layout)")
    p.add_argument("root", help="folder to write the dataset into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=None, help="number of training images (default: the toy set's)")
    p.add_argument("--num-val", type=int, default=None, help="number of validation images (default: the toy set's)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the toy set's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at ROOT")
    p.set_defaults(func=_cmd_toy_data)

    p = sub.add_parser("convert", help="convert a downloaded dataset into the layout semask reads")
    p.add_argument("dataset", choices=["cityscapes", "coco-stuff10k"])
    p.add_argument("root", help="the dataset's root folder as downloaded")
    p.add_argument("--overwrite", action="store_true", help="rewrite label files that already exist")
    p.set_defaults(func=_cmd_convert)

    # the benchmark has its own parser (semask.benchmark.build_parser); main() hands it the remaining words
    p = sub.add_parser("benchmark", help="measure speed and memory (see `semask benchmark --help`)",
                       add_help=False)
    p.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["benchmark"]:
        args = argparse.Namespace(command="benchmark", func=_cmd_benchmark, benchmark_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        # Errors raised by the package already say what was expected and what arrived: show them plainly.
        print(f"semask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
