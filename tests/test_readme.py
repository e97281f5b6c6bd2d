"""Every ```python block of README.md and data/README.md runs as written.

How it works: each block is run on its own (a fresh namespace, so every name it uses must be imported or defined
in the block) in an empty temporary folder that becomes the working directory. Nothing is patched: a block that
fails here fails for a reader too.

Blocks that read files (checkpoints, images, datasets) declare them in an HTML comment on the line right above
the opening fence, which Markdown does not show:

    <!-- readme-test: checkpoint=semask_tiny_fpn_ade20k.pth image=image.jpg -->
    ```python
    model = semask.load_checkpoint("semask_tiny_fpn_ade20k.pth")
    ```

Each ``KIND=PATH`` (``KIND:ARG=PATH`` where a kind takes an argument) makes a small stand-in of that kind at
PATH, relative to the working directory, with the real format and layout (see `STAND_INS`):

    checkpoint=P            SeMask toy FPN with ADE20K's 150 classes and palette, random weights; the released
                            mmseg layout for .pth, semask's format for .safetensors (fast: 3M parameters)
    checkpoint:MODEL=P      the same for a registered model (e.g. semask_tiny_fpn where a block checks the variant)
    image=P                 a 96x128 RGB image (format from the suffix)
    ade20k=P                ADEChallengeData2016 layout, 8 training + 2 validation images of 64x96
    toy=P                   the built-in toy dataset, 8 + 2 scenes of 64 px
    run=P                   a run directory holding two weights-only snapshots of the toy model (iter_000010.pth,
                            iter_000020.pth; random weights, toy classes)
    repo=P                  what a clone holds for torch.hub: hubconf.py and the semask package
    skip="REASON"           not run; reported as a skip with the reason (for a block that needs a GPU, say)

A new kind is one entry in `STAND_INS`; an unknown kind fails the test with the list of known ones.
"""
from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import semask

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "data" / "README.md"]
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*readme-test:(?P<spec>.*?)-->\s*$")


@dataclass
class Block:
    """One ```python block: where it is, its code (dedented), and the stand-ins its directive asks for."""

    file: Path
    line: int  # 1-based line of the opening fence
    code: str
    stand_ins: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, argument, path)

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, with the stand-ins declared right above each."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, start, body = match.group("indent"), i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: ```python block is never closed")
        stand_ins = []
        directive = _DIRECTIVE.match(lines[start - 1]) if start else None
        if directive:
            for item in shlex.split(directive.group("spec")):
                if "=" not in item:
                    raise AssertionError(f"{path}:{start}: readme-test item {item!r} is not KIND=PATH")
                key, value = item.split("=", 1)
                kind, _, arg = key.partition(":")
                stand_ins.append((kind, arg, value))
        blocks.append(Block(path, start + 1, "\n".join(body) + "\n", stand_ins))
        i += 1
    return blocks


# ----------------------------------------------------------------------------------------------- stand-ins
def _checkpoint(path: Path, model_name: str) -> None:
    from semask.checkpoint import to_official_checkpoint
    from semask.data import ADE20K_CLASSES, ADE20K_PALETTE

    torch.manual_seed(0)
    model = semask.create_model(model_name or "semask_toy_fpn", class_names=ADE20K_CLASSES, palette=ADE20K_PALETTE)
    if path.suffix == ".safetensors":
        semask.save_checkpoint(path, model)
    else:
        torch.save(to_official_checkpoint(model), path)


def _image(path: Path, arg: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _ade20k(path: Path, arg: str) -> None:
    rng = np.random.default_rng(0)
    for split, prefix, count in (("training", "ADE_train", 8), ("validation", "ADE_val", 2)):
        (path / "images" / split).mkdir(parents=True)
        (path / "annotations" / split).mkdir(parents=True)
        for i in range(1, count + 1):
            Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(
                path / "images" / split / f"{prefix}_{i:08d}.jpg")
            Image.fromarray(rng.integers(0, 151, (64, 96), dtype=np.uint8)).save(
                path / "annotations" / split / f"{prefix}_{i:08d}.png")


def _toy(path: Path, arg: str) -> None:
    from semask.data import make_toy_dataset

    make_toy_dataset(path, seed=0, num_train=8, num_val=2, size=64)


def _run(path: Path, arg: str) -> None:
    from semask.data import TOY_CLASSES, TOY_PALETTE

    path.mkdir(parents=True, exist_ok=True)
    for step in (10, 20):
        torch.manual_seed(step)
        model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE)
        semask.save_checkpoint(path / f"iter_{step:06d}.pth", model)


def _repo(path: Path, arg: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "hubconf.py", path / "hubconf.py")
    shutil.copytree(ROOT / "semask", path / "semask", ignore=shutil.ignore_patterns("__pycache__"))


STAND_INS: dict[str, Callable[[Path, str], None]] = {
    "checkpoint": _checkpoint,
    "image": _image,
    "ade20k": _ade20k,
    "toy": _toy,
    "run": _run,
    "repo": _repo,
}

BLOCKS = [block for readme in READMES for block in python_blocks(readme)]


def test_the_readmes_have_python_blocks() -> None:
    files = {block.file for block in BLOCKS}
    assert ROOT / "README.md" in files, "README.md has no ```python block (or the parser missed them)"
    assert len([b for b in BLOCKS if b.file == ROOT / "README.md"]) >= 4


def test_the_parser_reads_directives_and_indented_blocks(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text('text\n<!-- readme-test: image=a.jpg checkpoint:semask_tiny_fpn=b.pth skip="needs a GPU" -->\n'
                  "```python\nx = 1\n```\n\n- item\n\n  ```python\n  y = 2\n  ```\n```bash\nls\n```\n")
    first, second = python_blocks(md)
    assert first.line == 3 and first.code == "x = 1\n"
    assert first.stand_ins == [("image", "", "a.jpg"), ("checkpoint", "semask_tiny_fpn", "b.pth"),
                               ("skip", "", "needs a GPU")]
    assert second.code == "y = 2\n" and second.stand_ins == []


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for kind, arg, target in block.stand_ins:
        if kind == "skip":
            pytest.skip(f"{block.id}: {target}")
        if kind not in STAND_INS:
            raise AssertionError(f"{block.id}: unknown readme-test stand-in {kind!r}; known: "
                                 f"{', '.join(sorted(STAND_INS))} and skip (see {Path(__file__).name})")
        path = tmp_path / target
        path.parent.mkdir(parents=True, exist_ok=True)
        STAND_INS[kind](path, arg)
    code = compile(block.code, block.id, "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - running the documentation is the point
