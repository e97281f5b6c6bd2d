"""safetensors checkpoints: semask's own (config, classes, palette in the metadata) and bare official-layout
state dicts; `semask convert-weights`. Round trips must give exactly the original outputs."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import semask
from semask.checkpoint import CheckpointError, convert_to_safetensors, to_official_checkpoint
from semask.apps.cli import main
from helpers import randomize_gammas

CLASSES = ("sky", "sea", "boat")
PALETTE = [[0, 0, 255], [0, 100, 200], [255, 0, 0]]


@pytest.fixture(scope="module")
def model() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    m = semask.create_model("semask_toy_fpn", num_classes=3, class_names=CLASSES, palette=PALETTE)
    randomize_gammas(m)
    return m.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 3, 45, 70, generator=torch.Generator().manual_seed(1))


def _same_outputs(a: semask.SeMaskFPN, b: semask.SeMaskFPN, x: torch.Tensor) -> None:
    with torch.no_grad():
        oa, ob = a.eval()(x), b.eval()(x)
    assert torch.equal(oa.logits, ob.logits)
    assert (oa.prior_logits is None and ob.prior_logits is None) or torch.equal(oa.prior_logits, ob.prior_logits)


def test_round_trip_by_suffix_and_by_format(model, image, tmp_path: Path) -> None:
    for path, kwargs in ((tmp_path / "a.safetensors", {}), (tmp_path / "b.weights", {"format": "safetensors"})):
        semask.save_checkpoint(path, model, **kwargs)
        with safe_open(str(path), framework="pt") as f:  # a real safetensors file, not a pickle
            meta = f.metadata()
        assert meta["format"] == "semask-checkpoint-v1" and meta["model_name"] == "semask_toy_fpn"
        assert json.loads(meta["class_names"]) == list(CLASSES) and json.loads(meta["palette"]) == PALETTE
        assert json.loads(meta["config"])["semantic_global_stages"] == [2, 3]
    loaded = semask.load_checkpoint(tmp_path / "a.safetensors")
    assert loaded.name == model.name and loaded.config == model.config
    assert loaded.class_names == CLASSES and loaded.palette == PALETTE and not loaded.training
    _same_outputs(model, loaded, image)


def test_loading_never_unpickles(model, tmp_path: Path, monkeypatch) -> None:
    path = semask.save_checkpoint(tmp_path / "m.safetensors", model)

    def refuse(*args, **kwargs):
        raise AssertionError("a safetensors checkpoint went through pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert semask.load_checkpoint(path).name == "semask_toy_fpn"


def test_bare_official_state_dict(model, image, tmp_path: Path) -> None:
    sd = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}  # DDP-prefixed, as in the wild
    save_file(sd, str(tmp_path / "bare.safetensors"))
    loaded = semask.load_checkpoint(tmp_path / "bare.safetensors")
    assert loaded.name == "semask_toy_fpn" and loaded.class_names is None
    _same_outputs(model, loaded, image)
    # official meta carried as JSON metadata is used too
    save_file(sd, str(tmp_path / "meta.safetensors"),
              metadata={"CLASSES": json.dumps(CLASSES), "PALETTE": json.dumps(PALETTE)})
    assert semask.load_checkpoint(tmp_path / "meta.safetensors").class_names == CLASSES


def test_training_state_needs_a_pth(model, tmp_path: Path) -> None:
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizer"):
        semask.save_checkpoint(tmp_path / "t.safetensors", model, optimizer=opt, iteration=3)
    with pytest.raises(ValueError, match="'pth' or 'safetensors'"):
        semask.save_checkpoint(tmp_path / "t.bin", model, format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_files_are_named(model, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        semask.load_checkpoint(broken)
    bad_meta = tmp_path / "badmeta.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bad_meta),
              metadata={"format": "semask-checkpoint-v1", "model_name": "semask_toy_fpn", "config": "{oops"})
    with pytest.raises(CheckpointError, match="'config' is not valid JSON"):
        semask.load_checkpoint(bad_meta)


def test_convert_weights_official_pth(model, image, tmp_path: Path, capsys) -> None:
    src = tmp_path / "semask_toy_fpn_official.pth"
    torch.save(to_official_checkpoint(model), src)
    out = tmp_path / "converted.safetensors"
    assert main(["convert-weights", str(src), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    loaded = semask.load_checkpoint(out)
    assert loaded.class_names == CLASSES and loaded.palette == PALETTE
    _same_outputs(model, loaded, image)
    # the output is kept unless --overwrite; a non-.safetensors output is refused
    before = out.read_bytes()
    assert main(["convert-weights", str(src), str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["convert-weights", str(src), str(tmp_path / "x.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_convert_weights_semask_pth_and_imagenet_weights(image, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = semask.create_model("swin_toy_fpn", num_classes=4).eval()
    own = semask.save_checkpoint(tmp_path / "own.pth", model)
    _same_outputs(model, semask.load_checkpoint(convert_to_safetensors(own, tmp_path / "own.safetensors")), image)
    # ImageNet Swin weights (Microsoft's layout: under "model", with a classifier) stay a bare state dict
    backbone = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("norm")}
    torch.save({"model": {**backbone, "head.weight": torch.zeros(10, 256), "head.bias": torch.zeros(10)}},
               tmp_path / "swin_toy_imagenet.pth")
    out = convert_to_safetensors(tmp_path / "swin_toy_imagenet.pth", tmp_path / "swin_toy_imagenet.safetensors")
    fresh = semask.create_model("swin_toy_fpn", num_classes=4)
    report = semask.load_pretrained_backbone(fresh, out)
    assert report.loaded_fraction == 1.0 and "head.weight" in report.unexpected
    for k, v in backbone.items():
        assert torch.equal(fresh.backbone.state_dict()[k], v), k
