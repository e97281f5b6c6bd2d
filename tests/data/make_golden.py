#!/usr/bin/env python3
"""Write semask's own golden fixtures for the variants the reference fixture does not cover.

For each case (variant, decoder classes[, semantic-layer classes]) this writes, into tests/data/reference/:
  spec_<case>.json      the official (mmseg 0.x) key list with shapes and dtypes of that model
  expected_<case>.pt    outputs of semask on a deterministic synthetic checkpoint built from the key list
                        with `make_checkpoint.make(spec, seed)` and the stored 149x211 input
in the same format as the reference's `expected_tiny_150.pt`, so that both `tests/test_equivalence.py` and
`python tests/data/reference/check_equivalence.py CASE` check them. The tiny/150 case is the reference
implementation's own output; these others are regression fixtures produced by semask after that case matched
(they pin the behaviour, they do not prove it).

Usage: python tests/data/make_golden.py [CASE ...]     (default: all cases below)
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
sys.path.insert(0, HERE)
from check_equivalence import INPUT, load_case_model  # noqa: E402

import semask  # noqa: E402

CASES = {  # case -> (model name, decoder classes, semantic-layer classes)
    "small_150": ("semask_small_fpn", 150, None),
    "base_150": ("semask_base_fpn", 150, None),
    "large_150": ("semask_large_fpn", 150, None),
    "tiny_19": ("semask_tiny_fpn", 19, None),
    "small_19": ("semask_small_fpn", 19, None),
    "base_19": ("semask_base_fpn", 19, None),
    "large_19": ("semask_large_fpn", 19, None),
    "tiny_171": ("semask_tiny_fpn", 171, None),
    "small_171": ("semask_small_fpn", 171, None),
    "base_171": ("semask_base_fpn", 171, None),
    "large_171": ("semask_large_fpn", 171, None),
    "tiny_171b150": ("semask_tiny_fpn", 171, 150),  # COCO-Stuff config: semantic layers with 150 classes
}
SEED = 1
NUM_PIXELS = 128


def official_spec(name: str, num_classes: int, backbone_classes) -> list:
    with torch.device("meta"):
        model = semask.create_model(name, num_classes=num_classes, backbone_classes=backbone_classes)
    # semask's parameter and buffer names are the official ones (a test checks this for tiny/150)
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]


def make_case(case: str) -> None:
    name, k, kb = CASES[case]
    spec = official_spec(name, k, kb)
    x = torch.load(os.path.join(HERE, INPUT), weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_case_model(spec, SEED, Path(tmp))
    with torch.no_grad():
        out = model(x)
    g = torch.Generator().manual_seed(0)
    h, w = x.shape[2:]
    pixels = torch.randperm(h * w, generator=g)[:NUM_PIXELS].clone()  # clone: do not store the whole permutation
    prior = out.prior_logits
    expected = {
        "variant": case.split("_")[0], "num_classes": k, "seed": SEED,
        "pred": out.logits.argmax(1)[0].to(torch.int16),
        "pixels": pixels,
        "logits": out.logits[0].flatten(1)[:, pixels].clone(),
        "prior_shape": tuple(prior.shape),
        "prior": prior[0].flatten(1)[:, pixels % (prior.shape[2] * prior.shape[3])].clone(),
        "logits_absmax": out.logits.abs().max(),
    }
    with open(os.path.join(HERE, f"spec_{case}.json"), "w") as f:
        json.dump(spec, f)
    torch.save(expected, os.path.join(HERE, f"expected_{case}.pt"))
    print(f"{case}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, written")


if __name__ == "__main__":
    for case in sys.argv[1:] or CASES:
        make_case(case)
