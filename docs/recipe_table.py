#!/usr/bin/env python3
"""The recipe tables of docs/recipes.md §5, generated from semask's training presets (SeMask, arXiv 2112.12782).

    python docs/recipe_table.py            # print the tables
    python docs/recipe_table.py --write    # replace them in docs/recipes.md
    python docs/recipe_table.py --check    # exit status 1 when docs/recipes.md differs

Run from the repository root with semask importable (installed, or ``PYTHONPATH=.``). The tables sit between the
markers ``<!-- recipe-table:start -->`` and ``<!-- recipe-table:end -->``; `tests/test_project.py` checks that
docs/recipes.md holds exactly what this prints, so the document cannot drift from the presets.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from semask.engine.config import TrainConfig, get_preset, to_dict

DOC = Path(__file__).resolve().parent / "recipes.md"
START, END = "<!-- recipe-table:start -->", "<!-- recipe-table:end -->"
DATASETS = ("ade20k", "cityscapes", "coco_stuff10k")
VARIANTS = ("tiny", "small", "base", "large")
# Settings that every published recipe shares, with what they mean: one table row each (the generator fails if a
# preset differs in one of them).
COMMON = {
    "model.drop_path_rate": "the registry's stochastic depth: 0.3, rising linearly from 0 over the blocks",
    "model.sync_bn": "SyncBatchNorm in the decoder when training on several CUDA processes (§7)",
    "loss.prior_weight": "weight of the semantic-prior cross-entropy (§3)",
    "loss.class_weight": "no per-class weights",
    "optim.betas": "AdamW betas",
    "optim.eps": "AdamW epsilon",
    "optim.clip_grad_norm": "no gradient clipping",
    "schedule.iters": "optimizer steps (iteration-based, no epochs)",
    "schedule.power": "poly decay power",
    "schedule.min_lr": "learning rate at the last step",
    "train.precision": "bf16 autocast on GPUs that support it, fp16 on older ones; on the CPU bf16 where it is native (AVX512_BF16, AMX), else fp32 (§7)",
    "train.seed": "seeds initialisation, data order, augmentation, dropout and drop-path",
    "train.eval_interval": "steps between validations",
    "train.checkpoint_interval": "steps between writes of latest.pth",
    "data.train_pipeline.flip_prob": "horizontal flip probability",
    "data.train_pipeline.photometric": "brightness, contrast, saturation, hue distortion",
    "data.train_pipeline.mean": "normalisation mean, RGB, 0..255",
    "data.train_pipeline.std": "normalisation std, RGB, 0..255",
    "data.train_pipeline.ignore_index": "label of unlabelled and padded pixels",
    "data.test_pipeline.ratios": "multi-scale test ratios (`--aug-test`)",
    "eval.mode": "validation protocol during training (§6)",
}
# What a plain-Swin baseline preset may differ in from the SeMask preset of the same recipe.
BASELINE_DIFFERS = {"name", "official_config", "model.name"}


def _num(x: float) -> str:
    """1e-4 rather than 0.0001; 0.05, 0.75, 1.0 as they are."""
    if isinstance(x, float) and 0 < abs(x) < 0.01:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return str(x)


def _value(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(_value(v) for v in x) + ")"
    return _num(x) if isinstance(x, float) else str(x)


def _set_value(x: Any) -> str:
    """A value as `semask configs NAME` prints it and ``--set`` takes it."""
    if isinstance(x, (list, tuple)):
        return ",".join(map(str, x))
    return "none" if x is None else str(x).lower() if isinstance(x, bool) else str(x)


def _flat(config: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, d: dict[str, Any]) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[prefix + key] = value
    walk("", to_dict(config))
    return out


def _presets() -> list[TrainConfig]:
    return [get_preset(f"semask_{v}_{d}") for d in DATASETS for v in VARIANTS]


def _ratios(c: TrainConfig) -> str:
    p = c.data.train_pipeline
    if p.ratios is not None:
        return "set {" + ", ".join(_num(r) for r in p.ratios) + "}"
    return f"uniform [{_num(p.ratio_range[0])}, {_num(p.ratio_range[1])}]"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


RECIPE_COLUMNS: tuple[tuple[str, Callable[[TrainConfig], str]], ...] = (
    ("preset", lambda c: f"`{c.name}`"),
    ("crop", lambda c: "x".join(map(str, c.data.train_pipeline.crop_size))),
    ("train scale", lambda c: _value(c.data.train_pipeline.scale)),
    ("ratio", _ratios),
    ("cat_max_ratio", lambda c: _num(c.data.train_pipeline.cat_max_ratio)
     + (" (off)" if c.data.train_pipeline.cat_max_ratio >= 1 else "")),
    ("lr", lambda c: _num(c.optim.lr)),
    ("weight decay", lambda c: _num(c.optim.weight_decay)),
    ("warm-up iters, ratio", lambda c: f"{c.schedule.warmup_iters}, {_num(c.schedule.warmup_ratio)}"),
    ("images/GPU x GPUs", lambda c: f"{c.train.batch_size} x {c.train.global_batch // c.train.batch_size}"),
    ("OHEM pixels/image", lambda c: f"{c.loss.ohem_min_kept:,}" if c.loss.ohem_min_kept else "-"),
    ("test scale", lambda c: _value(c.data.test_pipeline.scale)),
)
SOURCE_COLUMNS: tuple[tuple[str, Callable[[TrainConfig], str]], ...] = (
    ("preset", lambda c: f"`{c.name}`"),
    ("reproduces (authors' `SeMask-FPN/` folder)", lambda c: f"`{c.official_config}`"),
    ("`model.pretrained`", lambda c: f"`{c.model.pretrained}`"),
    ("slide window, stride", lambda c: f"{c.eval.crop_size}, {c.eval.stride}"),
)


def _check_baselines(presets: list[TrainConfig]) -> None:
    """The plain-Swin baseline of each recipe is the same recipe with another model and config file."""
    for c in presets:
        baseline = get_preset(c.name.replace("semask_", "swin_", 1))
        ours, theirs = _flat(c), _flat(baseline)
        differ = {k for k in ours if ours[k] != theirs[k]}
        if not differ <= BASELINE_DIFFERS:
            raise SystemExit(f"{baseline.name} differs from {c.name} in {sorted(differ - BASELINE_DIFFERS)}")
        want = c.official_config.replace("semask_swin", "swin")
        if baseline.official_config != want:
            raise SystemExit(f"{baseline.name} reproduces {baseline.official_config}, expected {want}")


def _common_rows(presets: list[TrainConfig]) -> list[list[str]]:
    flats = [_flat(c) for c in presets]
    rows = []
    for key in COMMON:
        values = {repr(f[key]) for f in flats}
        if len(values) != 1:
            raise SystemExit(f"{key} differs between the published presets ({sorted(values)}); move it to a column")
        rows.append([f"`{key}={_set_value(flats[0][key])}`", COMMON[key]])
    return rows


def recipe_tables() -> str:
    """The Markdown of the three tables (per recipe, sources, shared settings), markers excluded."""
    presets = _presets()
    _check_baselines(presets)
    lines = _table([h for h, _ in RECIPE_COLUMNS], [[f(c) for _, f in RECIPE_COLUMNS] for c in presets])
    lines += ["", *_table([h for h, _ in SOURCE_COLUMNS], [[f(c) for _, f in SOURCE_COLUMNS] for c in presets])]
    lines += ["", *_table(["shared by all twelve presets", "meaning"], _common_rows(presets))]
    return "\n".join(lines) + "\n"


def tables_in(text: str) -> str:
    """The text between the markers of a document."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n") + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"replace the tables in {DOC.name}")
    group.add_argument("--check", action="store_true", help=f"exit status 1 when {DOC.name} differs")
    args = parser.parse_args(argv)
    tables = recipe_tables()
    if args.check:
        same = tables_in(DOC.read_text()) == tables
        print(f"{DOC.name}: the recipe tables {'match' if same else 'differ from'} the presets")
        return 0 if same else 1
    if args.write:
        text = DOC.read_text()
        start, end = text.index(START) + len(START), text.index(END)
        DOC.write_text(text[:start] + "\n" + tables + text[end:])
        return 0
    print(tables, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
