#!/usr/bin/env python3
"""Check that semask reproduces SeMask FPN (arXiv 2112.12782) on checkpoints in the released mmseg 0.x layout.

Usage, from the repository root (with semask importable: installed, or ``PYTHONPATH=.``):

    python tests/data/reference/check_equivalence.py              # tiny_150, the reference implementation's outputs
    python tests/data/reference/check_equivalence.py small_150 large_171 ...
    python tests/data/reference/check_equivalence.py --all        # every case stored in this folder

For each case it rebuilds a deterministic checkpoint in the released layout from the case's key list
(``spec_<case>.json``; ``official_keys_tiny_ade20k.json`` for ``tiny_150``) with ``make_checkpoint.make``, saves
it, loads it with ``semask.load_checkpoint``, runs it in eval mode on the stored 149x211 input and compares with
``expected_<case>.pt``:

- ``out.logits`` (B, K, H, W): the stored pixels' logits, and the argmax over the whole image;
- ``out.prior_logits`` (B, K, H/4, W/4): the decoder's summed semantic prior at the stored pixels.

One line per case, then a summary line; the exit status is 0 when every case matches within tolerance, else 1.
``tests/test_equivalence.py`` runs the same comparison (`compare_case`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_checkpoint  # noqa: E402  (the deterministic checkpoint generator of this folder)

__all__ = ["TOLERANCE", "MIN_AGREEMENT", "INPUT", "CASES", "Comparison", "case_spec", "load_case_model",
           "compare_case", "main"]

TOLERANCE = 1e-3  # max |difference| of logits and priors at the stored pixels
MIN_AGREEMENT = 0.999  # share of pixels whose argmax agrees
INPUT = "input_149x211.pt"  # not a multiple of any window: padding, shift masks and odd sizes all matter
OFFICIAL_KEYS = "official_keys_tiny_ade20k.json"  # the released SeMask-T ADE20K key list (the tiny_150 case)
CASES = sorted(p.name[len("expected_"):-len(".pt")] for p in HERE.glob("expected_*.pt"))


@dataclass
class Comparison:
    """How one case's outputs compare with the stored ones (NaN where a shape mismatch prevented a number)."""

    case: str
    max_dlogits: float = math.nan
    max_dprior: float = math.nan
    agreement: float = math.nan
    problems: list[str] = field(default_factory=list)  # shape mismatches

    @property
    def ok(self) -> bool:
        return (not self.problems and self.max_dlogits < TOLERANCE and self.max_dprior < TOLERANCE
                and self.agreement > MIN_AGREEMENT)

    def line(self) -> str:
        """``<case>: max|dlogits|=... max|dprior|=... argmax agreement=... OK|MISMATCH``."""
        text = (f"{self.case}: max|dlogits|={self.max_dlogits:.2e} max|dprior|={self.max_dprior:.2e} "
                f"argmax agreement={self.agreement:.5f} {'OK' if self.ok else 'MISMATCH'}")
        return text + "".join(f"; {p}" for p in self.problems)


def case_spec(case: str, folder: Path = HERE) -> list:
    """The key list ``[[key, shape, dtype], ...]`` of a case's checkpoint."""
    path = folder / f"spec_{case}.json"
    return json.loads((path if path.exists() else folder / OFFICIAL_KEYS).read_text())


def load_case_model(spec: list, seed: int, work_dir: Path, **load_kwargs: Any) -> torch.nn.Module:
    """Write the deterministic checkpoint of ``spec`` in the released layout and load it with semask.

    Args:
        spec: the key list (see `case_spec`).
        seed: the generator seed of `make_checkpoint.make`.
        work_dir: a folder for the checkpoint file.
        load_kwargs: passed to ``semask.load_checkpoint`` (e.g. ``semantic_global_stages=()``).

    Returns:
        The loaded model, in eval mode.
    """
    import semask

    path = Path(work_dir) / "checkpoint.pth"
    torch.save(make_checkpoint.make(spec, seed), path)
    return semask.load_checkpoint(path, **load_kwargs).eval()


def compare_case(case: str, work_dir: Path, folder: Path = HERE, **load_kwargs: Any) -> Comparison:
    """Run one case and compare its outputs with ``expected_<case>.pt``.

    Args:
        case: e.g. ``"tiny_150"`` (variant and class count; ``tiny_171b150``: 150-class semantic layers).
        work_dir: a folder for the temporary checkpoint.
        folder: where the case's files are.
        load_kwargs: passed to ``semask.load_checkpoint``.

    Returns:
        The differences; `Comparison.ok` says whether they are within tolerance.
    """
    expected = torch.load(folder / f"expected_{case}.pt", weights_only=True)
    x = torch.load(folder / INPUT, weights_only=True)
    model = load_case_model(case_spec(case, folder), int(expected["seed"]), work_dir, **load_kwargs)
    with torch.no_grad():
        out = model(x)
    logits, prior = out.logits, out.prior_logits
    result = Comparison(case)
    want_logits = (1, expected["num_classes"], *x.shape[2:])
    if tuple(logits.shape) != want_logits:
        result.problems.append(f"logits shape {tuple(logits.shape)} != {want_logits}")
    if tuple(prior.shape) != tuple(expected["prior_shape"]):
        result.problems.append(f"prior shape {tuple(prior.shape)} != {tuple(expected['prior_shape'])}")
    if result.problems:
        return result
    pixels = expected["pixels"]
    result.max_dlogits = (logits[0].flatten(1)[:, pixels] - expected["logits"]).abs().max().item()
    hw = prior.shape[2] * prior.shape[3]
    result.max_dprior = (prior[0].flatten(1)[:, pixels % hw] - expected["prior"]).abs().max().item()
    result.agreement = (logits.argmax(1)[0].to(torch.int16) == expected["pred"]).float().mean().item()
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"default tiny_150; stored: {', '.join(CASES)}")
    parser.add_argument("--all", action="store_true", help="check every stored case")
    args = parser.parse_args(argv)
    cases = CASES if args.all else args.cases or ["tiny_150"]
    results = []
    for case in cases:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                result = compare_case(case, Path(tmp))
            print(result.line())
            results.append(result.ok)
        except Exception as exc:  # report and go on: one broken case should not hide the others
            print(f"{case}: ERROR {type(exc).__name__}: {exc}")
            results.append(False)
    print(f"official-checkpoint equivalence: {sum(results)}/{len(results)} cases match")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
