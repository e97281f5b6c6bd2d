"""Issue 14, class 7: metadata never overrides the tensors.

semask's own files (``.pth`` and ``.safetensors``) carry a model name, a config, class names and a palette beside
the weights. Each piece the tensors can contradict is crafted to contradict them, in both formats, and loaded
through `semask.load_checkpoint`, `convert_to_safetensors` and ``semask info`` (its code path for every case, a
subprocess for some): each must be refused with a message naming what the metadata says and what the tensors
show, never loaded (or described) under the metadata's word.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import semask
from semask.checkpoint import CheckpointError, convert_to_safetensors

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TOY = re.escape("embed_dim 32, depths (2, 2, 2, 2), num_heads (1, 2, 4, 8)")
TINY = re.escape("embed_dim 96, depths (2, 2, 6, 2), num_heads (3, 6, 12, 24)")


def _config(**changes: Any) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta["config"].update(changes)
    return edit


def _set(key: str, value: Any) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta[key] = value
    return edit


def _both(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        for e in edits:
            e(meta)
    return edit


# case -> (how the metadata is edited, what the error says: the metadata's claim and the tensors' answer)
CASES = {
    "name of another size": (_set("model_name", "semask_tiny_fpn"),
                             rf"metadata says semask_tiny_fpn \({TINY}\) but the tensors are semask_toy_fpn's "
                             rf"\({TOY}\)"),
    "name and config of another size": (
        _both(_set("model_name", "semask_tiny_fpn"), _config(embed_dim=96, depths=[2, 2, 6, 2],
                                                             num_heads=[3, 6, 12, 24])),
        rf"metadata says semask_tiny_fpn \({TINY}\) but the tensors are semask_toy_fpn's \({TOY}\)"),
    "name of the other family": (_set("model_name", "swin_toy_fpn"),
                                 r"metadata says swin_toy_fpn \(semantic False, .*\) but the tensors are "
                                 r"semask_toy_fpn's \(semantic True, "),
    "name of an unregistered size": (_set("model_name", "semask_huge_fpn"),
                                     rf"metadata says semask_huge_fpn \(.*\) but the tensors are semask_toy_fpn's"),
    "embed_dim": (_config(embed_dim=64), r"says semask_toy_fpn \(embed_dim 64\) but the tensors are "
                                         r"semask_toy_fpn's \(embed_dim 32\)"),
    "depths": (_config(depths=[2, 2, 6, 2]), r"\(depths \(2, 2, 6, 2\)\) but the tensors .*\(depths \(2, 2, 2, 2\)\)"),
    "num_heads": (_config(num_heads=[2, 4, 8, 16]),
                  r"\(num_heads \(2, 4, 8, 16\)\) but .*\(num_heads \(1, 2, 4, 8\)\)"),
    "window_size": (_config(window_size=12), r"\(window_size 12\) but the tensors are semask_toy_fpn's "
                                             r"\(window_size 7\)"),
    "num_classes": (_both(_config(num_classes=5), _set("class_names", None), _set("palette", None)),
                    r"\(num_classes 5, backbone_classes 5\) but .*\(num_classes 3, backbone_classes 3\)"),
    "backbone_classes": (_config(backbone_classes=7), r"\(backbone_classes 7\) but .*\(backbone_classes 3\)"),
    "semantic": (_config(semantic=False, semantic_global_stages=None),
                 r"\(semantic False, backbone_classes None, num_sem_blocks None\) but .*"
                 r"\(semantic True, backbone_classes 3, num_sem_blocks 1\)"),
    "num_sem_blocks": (_config(num_sem_blocks=2), r"\(num_sem_blocks 2\) but .*\(num_sem_blocks 1\)"),
    "mlp_ratio": (_config(mlp_ratio=2.0), r"\(mlp_ratio 2\.0\) but .*\(mlp_ratio 4\.0\)"),
    "decoder_channels": (_config(decoder_channels=32), r"\(decoder_channels 32\) but .*\(decoder_channels 64\)"),
    "class names": (_set("class_names", ["a", "b"]), r"meta lists 2 class names but the decoder has 3 classes"),
    "palette": (_set("palette", [[1, 2, 3]]), r"palette has 1 colours for 3 classes"),
}


@pytest.fixture(scope="module")
def toy() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    return semask.create_model("semask_toy_fpn", num_classes=3, class_names=("a", "b", "c"),
                               palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]])


def _craft(toy: semask.SeMaskFPN, folder: Path, fmt: str, edit: Callable[[dict], None]) -> Path:
    """The toy model saved as semask's own `fmt` file, with its metadata changed by `edit` (the tensors kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = semask.save_checkpoint(folder / f"saved.{fmt}", toy)
    out = folder / f"crafted.{fmt}"
    if fmt == "pth":
        obj = torch.load(saved, weights_only=True)
        meta = {"model_name": obj["model_name"], "config": dict(obj["config"]), "class_names": obj["class_names"],
                "palette": obj["palette"]}
        edit(meta)
        obj.update({k: tuple(v) if isinstance(v, list) and k == "class_names" else v for k, v in meta.items()})
        obj["config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        torch.save(obj, out)
    else:
        with safe_open(str(saved), "pt") as f:
            raw = dict(f.metadata())
        meta = {"model_name": raw["model_name"],
                **{k: json.loads(raw[k]) for k in ("config", "class_names", "palette")}}
        edit(meta)
        raw.update({"model_name": meta["model_name"],
                    **{k: json.dumps(meta[k]) for k in ("config", "class_names", "palette")}})
        save_file(load_file(str(saved)), str(out), metadata=raw)
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("case", CASES)
def test_load_checkpoint_refuses_metadata_the_tensors_contradict(case, fmt, toy, tmp_path) -> None:
    path = _craft(toy, tmp_path, fmt, CASES[case][0])
    with pytest.raises(CheckpointError, match=CASES[case][1]) as caught:
        semask.load_checkpoint(path)
    assert str(caught.value).startswith(f"checkpoint {str(path)!r}: ")
    with pytest.raises(CheckpointError, match=CASES[case][1]):  # a conversion does not launder it
        convert_to_safetensors(path, tmp_path / "converted.safetensors")
    assert not (tmp_path / "converted.safetensors").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("case", CASES)
def test_semask_info_refuses_metadata_the_tensors_contradict(case, fmt, toy, tmp_path, capsys) -> None:
    """The command's own code path (`semask.apps.cli.main`), for every case; a subprocess below for some."""
    from semask.apps.cli import main

    path = _craft(toy, tmp_path, fmt, CASES[case][0])
    assert main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    _check_info_output(path, case, out, err)


def _check_info_output(path: Path, case: str, out: str, err: str) -> None:
    assert out == ""  # nothing is described under the metadata's word
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"semask info: error: checkpoint {str(path)!r}: "), err
    assert re.search(CASES[case][1], lines[0]), lines[0]


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("case", ["name of another size", "window_size", "num_classes", "class names"])
def test_semask_info_in_a_subprocess(case, fmt, toy, tmp_path) -> None:
    path = _craft(toy, tmp_path, fmt, CASES[case][0])
    result = subprocess.run([sys.executable, "-m", "semask", "info", str(path)], capture_output=True, text=True,
                            env=ENV, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    _check_info_output(path, case, result.stdout, result.stderr)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("name", ["semask_toy_fpn", "my_model", "semask"])
def test_metadata_that_agrees_with_the_tensors_loads(name, fmt, toy, tmp_path) -> None:
    """Free labels (build_model's default "semask", a user's name) and fields the tensors cannot show
    (dropout, global stages) are kept as the file says."""
    path = _craft(toy, tmp_path, fmt, _both(_set("model_name", name), _config(drop_path_rate=0.0,
                                                                              semantic_global_stages=[3])))
    model = semask.load_checkpoint(path)
    assert model.name == name and model.config.drop_path_rate == 0.0 and model.config.semantic_global_stages == (3,)
    assert model.class_names == ("a", "b", "c")
    with torch.no_grad():
        toy.eval()
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert torch.equal(model.backbone.patch_embed.proj.weight, toy.backbone.patch_embed.proj.weight)
        assert model(x).logits.shape == toy(x).logits.shape


def test_a_custom_architecture_may_carry_an_unregistered_name(tmp_path) -> None:
    from semask.model.registry import build_model

    model = build_model(semask.ModelConfig(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=3,
                                           num_classes=2, decoder_channels=8), name="semask_mini_fpn")
    for fmt in ("pth", "safetensors"):
        assert semask.load_checkpoint(semask.save_checkpoint(tmp_path / f"m.{fmt}", model)).name == "semask_mini_fpn"
