"""Loading official checkpoints in every layout seen in the wild, semask's own checkpoints, and ImageNet weights."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import semask
from semask.checkpoint import (LIMITS, CheckpointError, CheckpointLimitError, convert_to_safetensors,
                               load_model_weights, load_pretrained_backbone, load_training_state, save_checkpoint,
                               to_official_checkpoint)
from semask.checkpoint.checks import LIMITS as CHECKED_LIMITS
from semask.errors import OutputExistsError, UsageError

from helpers import randomize_gammas

CLASSES = ("road", "grass", "water", "sky", "car")
PALETTE = [[128, 64, 128], [0, 200, 0], [0, 0, 200], [135, 206, 235], [200, 0, 0]]


def _toy(global_stages: tuple[int, ...] | None = None) -> semask.SeMaskFPN:
    """A toy model with non-trivial weights: gammas, BN statistics, class names and palette."""
    torch.manual_seed(1)
    extra = {} if global_stages is None else {"semantic_global_stages": global_stages}
    model = semask.create_model("semask_toy_fpn", num_classes=5, **extra)
    randomize_gammas(model, 0.3)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.class_names, model.palette = CLASSES, PALETTE
    return model.eval()


@pytest.fixture
def trained_toy() -> semask.SeMaskFPN:
    return _toy()


def _outputs(model: semask.SeMaskFPN, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


@pytest.mark.parametrize("layout", ["state_dict", "model", "bare", "module_prefix", "with_optimizer"])
def test_official_layouts_round_trip(trained_toy, tmp_path: Path, layout: str) -> None:
    official = to_official_checkpoint(trained_toy)
    sd, meta = official["state_dict"], official["meta"]
    if layout == "state_dict":
        obj = {"state_dict": sd, "meta": meta}
    elif layout == "model":
        obj = {"model": sd}
    elif layout == "bare":
        obj = dict(sd)
    elif layout == "module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "meta": meta}
    else:
        obj = {"state_dict": sd, "meta": {**meta, "mmcv_version": "1.3.0", "config": "model = dict(...)"},
               "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = semask.load_checkpoint(path)
    x = torch.randn(1, 3, 61, 83)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(trained_toy, x), rtol=0, atol=0)
    assert loaded.name == "semask_toy_fpn"
    assert loaded.backbone.global_stages == (2, 3)  # the registry entry's choice for that size
    has_meta = layout in ("state_dict", "module_prefix", "with_optimizer")
    assert loaded.class_names == (CLASSES if has_meta else None)
    assert loaded.palette == (PALETTE if has_meta else None)


def test_official_layout_needs_the_global_stages_told(tmp_path: Path) -> None:
    """Global vs windowed semantic attention cannot be seen in the weights: the override selects it."""
    model = _toy(global_stages=())
    path = tmp_path / "ckpt.pth"
    torch.save(to_official_checkpoint(model), path)
    x = torch.randn(1, 3, 70, 50)
    told = semask.load_checkpoint(path, semantic_global_stages=())
    torch.testing.assert_close(_outputs(told, x), _outputs(model, x), rtol=0, atol=0)
    guessed = semask.load_checkpoint(path)
    assert (_outputs(guessed, x) - _outputs(model, x)).abs().max() > 1e-4


def test_released_variant_is_recognised(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = semask.create_model("semask_tiny_fpn", num_classes=19)
    path = tmp_path / "cityscapes.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": tuple(f"c{i}" for i in range(19))}}, path)
    loaded = semask.load_checkpoint(path)
    assert loaded.name == "semask_tiny_fpn" and loaded.num_classes == 19 and loaded.backbone.global_stages == ()
    assert loaded.config.depths == (2, 2, 6, 2) and loaded.config.window_size == 7


def test_missing_unexpected_and_misshaped_keys_are_listed(trained_toy, tmp_path: Path) -> None:
    sd = dict(trained_toy.state_dict())
    del sd["backbone.layers.1.blocks.0.attn.qkv.weight"]
    del sd["decode_head.scale_heads.2.2.bn.running_var"]
    sd["decode_head.auxiliary.weight"] = torch.zeros(3)
    sd["backbone.norm2.weight"] = torch.ones(7)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        semask.load_checkpoint(path)
    msg = str(err.value)
    assert "broken.pth" in msg
    assert "missing (2)" in msg and "backbone.layers.1.blocks.0.attn.qkv.weight" in msg
    assert "decode_head.scale_heads.2.2.bn.running_var" in msg
    assert "unexpected (1)" in msg and "decode_head.auxiliary.weight" in msg
    assert "wrong shape (1)" in msg and "backbone.norm2.weight: checkpoint (7,) vs model (128,)" in msg


def test_mostly_empty_or_foreign_checkpoints_fail(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}}, path)
    with pytest.raises(CheckpointError, match=r"not a SeMask/Swin FPN checkpoint.*conv1.weight"):
        semask.load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        semask.load_checkpoint(path)
    torch.save({"meta": {"CLASSES": ("a",)}}, path)
    with pytest.raises(CheckpointError, match="no tensors"):
        semask.load_checkpoint(path)


def test_unreadable_and_unsafe_files(trained_toy, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        semask.load_checkpoint(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    torch.save(to_official_checkpoint(trained_toy), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        semask.load_checkpoint(truncated)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": trained_toy.state_dict(), "meta": {"hook": Path("/etc/passwd")}}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        semask.load_checkpoint(unsafe)


def test_class_names_must_match_the_decoder(trained_toy, tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    obj = to_official_checkpoint(trained_toy)
    obj["meta"]["CLASSES"] = ("a", "b")
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="2 class names but the decoder has 5"):
        semask.load_checkpoint(path)


def test_own_checkpoint_round_trip_is_exact_and_atomic(trained_toy, tmp_path: Path) -> None:
    model = semask.create_model("semask_toy_fpn", num_classes=5, semantic_global_stages=(3,))
    model.load_state_dict(trained_toy.state_dict())
    model.class_names, model.palette = CLASSES, PALETTE
    path = save_checkpoint(tmp_path / "run" / "last.pth", model, extra={"mIoU": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]  # no temp file left behind
    loaded = semask.load_checkpoint(path)
    assert loaded.config == model.config and loaded.backbone.global_stages == (3,)
    assert loaded.class_names == CLASSES and loaded.palette == PALETTE
    x = torch.randn(1, 3, 50, 50)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)
    # a failing save leaves the previous file untouched
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, model, extra={"bad": lambda: None})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]


def test_training_state_resumes_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 - it / 100)
    x, y = torch.randn(1, 3, 64, 64), torch.randint(0, 3, (1, 64, 64))
    for _ in range(2):
        opt.zero_grad()
        semask.semask_loss(model(x), y).total.backward()
        opt.step()
        sched.step()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save_checkpoint(tmp_path / "it2.pth", model, optimizer=opt, scheduler=sched, iteration=2)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    fresh = semask.create_model("semask_toy_fpn", num_classes=3)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda it: 1.0 - it / 100)
    state = load_training_state(path, fresh, opt2, sched2)
    assert state["iteration"] == 2
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.98)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    with pytest.raises(CheckpointError, match="no scaler state"):
        load_training_state(path, fresh, scaler=torch.amp.GradScaler("cpu"))


def _microsoft_layout(timm_sd: dict, drop_head: bool = False) -> dict:
    """Rewrite a timm Swin state dict in Microsoft's release layout (downsampling at the end of each stage)."""
    out = {}
    for k, v in timm_sd.items():
        if k.startswith("layers.") and ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        k = k.replace("head.fc.", "head.")
        if drop_head and k.startswith("head."):
            continue
        out[k] = v
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return {"model": out}


def test_timm_swin_weights_reproduce_timm_features() -> None:
    """timm's Swin-T weights in our plain-Swin backbone give timm's features at a window-aligned size.

    448 px: every stage (112, 56, 28, 14) is a multiple of the window and larger than it, where timm's Swin
    (which shifts before padding and drops the shift when a map fits in one window) and the original agree.
    """
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=448).eval()
    model = semask.create_model("swin_tiny_fpn", num_classes=3).eval()
    report = load_pretrained_backbone(model, reference.state_dict())
    assert report.layout == "timm" and report.loaded_fraction == 1.0 and not report.resized
    assert "head.fc.weight" in report.unexpected and "norm.weight" in report.unexpected
    assert all(k.startswith("norm") for k in report.missing)  # only the per-stage output norms
    with torch.no_grad():
        model.backbone.norm3.load_state_dict(reference.norm.state_dict())
        x = torch.randn(1, 3, 448, 448)
        ours = model.backbone(x).features[3]  # B, C, H, W
        theirs = reference.forward_features(x)  # B, H, W, C
    torch.testing.assert_close(ours, theirs.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_microsoft_weights_load_into_semask(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save(_microsoft_layout(reference.state_dict()), path)
    model = semask.create_model("semask_tiny_fpn", num_classes=150)
    report = load_pretrained_backbone(model, path)
    assert report.layout == "microsoft" and report.loaded_fraction == 1.0
    assert "layers.0.blocks.1.attn_mask" in report.unexpected and "head.weight" in report.unexpected
    assert any("semantic_layer" in k for k in report.missing)
    torch.testing.assert_close(model.backbone.layers[0].downsample.reduction.weight,
                               reference.layers[1].downsample.reduction.weight)
    assert "loaded" in str(report) and "semantic_layer" in str(report)


def test_window_7_weights_resize_into_a_window_12_model() -> None:
    torch.manual_seed(0)
    reference = timm.create_model("swin_base_patch4_window7_224", pretrained=False)
    model = semask.create_model("semask_base_fpn", num_classes=150)
    report = load_pretrained_backbone(model, _microsoft_layout(reference.state_dict(), drop_head=True))
    assert len(report.resized) == 24 and report.loaded_fraction == 1.0
    table = model.backbone.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (23 * 23, 4)
    src = reference.layers[0].blocks[0].attn.relative_position_bias_table  # 13*13, 4
    # the centre (zero offset) keeps its value under a bicubic resize of an odd grid
    torch.testing.assert_close(table[11 * 23 + 11], src[6 * 13 + 6], rtol=1e-4, atol=1e-4)


def test_pretrained_errors() -> None:
    model = semask.create_model("semask_tiny_fpn", num_classes=150)
    sd = {"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4), "patch_embed.proj.bias": torch.zeros(96)}
    with pytest.raises(CheckpointError, match=r"only 0\.0% .* would be loaded"):
        load_pretrained_backbone(model, sd)
    tiny = dict(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict())
    tiny["layers.2.blocks.0.attn.relative_position_bias_table"] = torch.zeros(169, 5)
    with pytest.raises(CheckpointError, match=r"layers.2.blocks.0.attn.relative_position_bias_table has 5 heads"):
        load_pretrained_backbone(model, tiny)
    base = timm.create_model("swin_base_patch4_window7_224", pretrained=False)
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight has shape \(128, 3, 4, 4\)"):
        load_pretrained_backbone(model, base.state_dict())


def test_load_model_weights_rejects_a_non_standard_index(trained_toy) -> None:
    sd = dict(trained_toy.state_dict())
    key = "backbone.layers.0.blocks.0.attn.relative_position_index"
    sd[key] = sd[key].flip(0)
    with pytest.raises(CheckpointError, match="relative_position_index differs"):
        load_model_weights(semask.create_model("semask_toy_fpn", num_classes=5), sd)


@pytest.mark.parametrize("field, limit", [("embed_dim", "max_embed_dim"), ("num_heads", "max_heads"),
                                          ("window_size", "max_window")])
def test_one_limit_table_serves_official_and_own_files(trained_toy, tmp_path: Path, monkeypatch, field: str,
                                                       limit: str) -> None:
    assert LIMITS is CHECKED_LIMITS  # semask.checkpoint.LIMITS is the object the checks read
    monkeypatch.setattr(LIMITS, limit, 1)
    official = tmp_path / "official.pth"
    torch.save(to_official_checkpoint(trained_toy), official)
    own = save_checkpoint(tmp_path / "own.pth", trained_toy)
    for path, claim in ((official, "the weights claim"), (own, "its config has")):
        message = rf"{claim} {field} = .*above semask\.checkpoint\.LIMITS\.{limit} = 1 "
        with pytest.raises(CheckpointLimitError, match=message):
            semask.load_checkpoint(path)


def test_save_checkpoint_refuses_bad_arguments_as_usage_errors(trained_toy, tmp_path: Path) -> None:
    cases = [({"format": "onnx"}, "t.bin", "'pth' or 'safetensors'"),
             ({"iteration": 3}, "t.safetensors", "weights and metadata only"),
             ({"extra": {"x": object()}}, "t.safetensors", "must be JSON")]
    for kwargs, name, message in cases:
        with pytest.raises(UsageError, match=message):
            save_checkpoint(tmp_path / name, trained_toy, **kwargs)
    for name in ("t.pth", "t.safetensors"):
        with pytest.raises(UsageError, match="no ModelConfig"):
            save_checkpoint(tmp_path / name, torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []
    src = save_checkpoint(tmp_path / "t.pth", trained_toy)
    with pytest.raises(UsageError, match="must end in .safetensors"):
        convert_to_safetensors(src, tmp_path / "t.bin")
    (tmp_path / "t.safetensors").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        convert_to_safetensors(src, tmp_path / "t.safetensors")
