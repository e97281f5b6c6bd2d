"""Training configs: the twelve published recipes (docs/recipes.md §5), their baselines, typed overrides, round trips, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from semask.apps.cli import main
from semask.engine.config import (PRESETS, ConfigError, TrainConfig, apply_overrides, flat_keys, from_dict, get_preset,
                           list_presets, load_config, set_value, to_dict)
from semask.data.transforms import TRAIN_RATIOS

# docs/recipes.md §5, row by row: crop, scale, ratio set (True) or range, cat_max_ratio, lr, weight decay, warm-up ratio,
# images per GPU, GPUs; OHEM from docs/recipes.md §3 (Large ADE20K and every COCO-Stuff 10k recipe).
RECIPES = {
    ("ade20k", "tiny"): (512, (2048, 512), True, 0.75, 1e-4, 1e-4, 1e-6, 8, 2, None),
    ("ade20k", "small"): (512, (2048, 512), True, 1.0, 1e-4, 1e-4, 1e-6, 8, 2, None),
    ("ade20k", "base"): (512, (2048, 512), True, 1.0, 1e-4, 1e-4, 1e-6, 8, 2, None),
    ("ade20k", "large"): (640, (2560, 640), True, 1.0, 1e-4, 1e-4, 1e-6, 4, 4, 100_000),
    ("cityscapes", "tiny"): (768, (2048, 1024), (0.5, 2.0), 0.75, 1e-3, 0.05, 1e-5, 4, 2, None),
    ("cityscapes", "small"): (768, (2048, 1024), (0.5, 2.0), 0.75, 1e-3, 0.05, 1e-5, 4, 2, None),
    ("cityscapes", "base"): (768, (2048, 1024), (0.5, 2.0), 0.75, 1e-3, 0.05, 1e-6, 4, 2, None),
    ("cityscapes", "large"): (768, (2048, 1024), (0.5, 2.0), 0.75, 1e-3, 0.05, 1e-5, 2, 4, None),
    ("coco_stuff10k", "tiny"): (512, (2048, 512), True, 1.0, 1e-4, 1e-4, 1e-6, 4, 4, 100_000),
    ("coco_stuff10k", "small"): (512, (2048, 512), True, 1.0, 1e-4, 1e-4, 1e-6, 4, 4, 100_000),
    ("coco_stuff10k", "base"): (512, (2048, 512), True, 1.0, 1e-4, 1e-4, 1e-6, 2, 8, 100_000),
    ("coco_stuff10k", "large"): (640, (2560, 640), True, 1.0, 1e-4, 1e-4, 1e-6, 2, 8, 100_000),
}
TEST_SCALES = {"ade20k": (2048, 512), "cityscapes": (2048, 1024), "coco_stuff10k": (2048, 512)}


@pytest.mark.parametrize("family", ["semask", "swin"])
@pytest.mark.parametrize("dataset, variant", sorted(RECIPES))
def test_published_recipes_follow_the_spec(family: str, dataset: str, variant: str) -> None:
    crop, scale, ratios, cat, lr, wd, warmup_ratio, per_gpu, gpus, ohem = RECIPES[(dataset, variant)]
    c = get_preset(f"{family}_{variant}_{dataset}")
    assert c.model.name == f"{family}_{variant}_fpn"
    assert c.data.dataset == dataset
    p = c.data.train_pipeline
    assert p.crop_size == (crop, crop) and p.scale == scale and p.cat_max_ratio == cat
    if ratios is True:
        assert p.ratios == TRAIN_RATIOS and p.ratio_range is None
    else:
        assert p.ratios is None and p.ratio_range == ratios
    assert (c.optim.lr, c.optim.weight_decay, c.optim.betas) == (lr, wd, (0.9, 0.999))
    assert (c.schedule.iters, c.schedule.warmup_iters, c.schedule.warmup_ratio) == (80_000, 1500, warmup_ratio)
    assert (c.schedule.power, c.schedule.min_lr) == (1.0, 0.0)
    assert (c.train.batch_size, c.train.global_batch) == (per_gpu, per_gpu * gpus)
    assert (c.train.eval_interval, c.train.checkpoint_interval) == (8000, 8000)
    assert c.loss.ohem_min_kept == ohem and c.loss.prior_weight == 0.4
    large_scale = (2560, 640) if variant == "large" and dataset != "cityscapes" else TEST_SCALES[dataset]
    assert c.data.test_pipeline.scale == large_scale
    arch = "window7" if variant in ("tiny", "small") else "window12"
    folder = "semask_swin" if family == "semask" else "swin"
    short = {"coco_stuff10k": "coco10k"}.get(dataset, dataset)
    assert c.official_config == (f"configs/{folder}/{dataset}/semfpn_{folder}_{variant}_patch4_{arch}_{crop}x{crop}"
                                 f"_80k_{short}.py")
    assert c.model.pretrained.startswith(f"swin_{variant}_patch4_")  # an ImageNet start, never silently scratch


def test_the_preset_list() -> None:
    names = list_presets()
    assert len(names) == 26 and names == sorted(PRESETS)
    assert {"toy", "swin_toy"} <= set(names)
    assert list_presets("*_cityscapes") == [f"{f}_{v}_cityscapes" for f in ("semask", "swin")
                                            for v in ("base", "large", "small", "tiny")]
    toy = get_preset("toy")
    assert toy.model.name == "semask_toy_fpn" and toy.data.dataset == "toy" and toy.model.pretrained is None
    assert get_preset("swin_toy").model.name == "swin_toy_fpn"
    with pytest.raises(ConfigError, match="valid presets: semask_base_ade20k"):
        get_preset("semask_tiny_ade")


def test_get_preset_returns_an_independent_copy() -> None:
    c = get_preset("toy")
    c.train.batch_size = 1
    assert get_preset("toy").train.batch_size != 1


def test_typed_overrides() -> None:
    c = apply_overrides(get_preset("semask_tiny_ade20k"), [
        "data.root=/data/ADEChallengeData2016", "model.pretrained=swin_tiny_patch4_window7_224.pth",
        "train.batch_size=4", "optim.lr=2e-4", "optim.clip_grad_norm=1", "data.train_pipeline.crop_size=384,384",
        "data.train_pipeline.ratios=(1.0, 1.5)", "model.semantic_global_stages=", "loss.ohem_min_kept=50_000",
        "train.channels_last=false", "eval.max_images=none", "model.sync_bn=True"])
    assert c.data.root == "/data/ADEChallengeData2016" and c.train.batch_size == 4
    assert c.optim.lr == 2e-4 and c.optim.clip_grad_norm == 1.0 and isinstance(c.optim.clip_grad_norm, float)
    assert c.data.train_pipeline.crop_size == (384, 384) and c.data.train_pipeline.ratios == (1.0, 1.5)
    assert c.model.semantic_global_stages == () and c.loss.ohem_min_kept == 50_000
    assert c.train.channels_last is False and c.eval.max_images is None and c.model.sync_bn is True
    assert c.data.train_pipeline.scale == (2048, 512)  # untouched fields keep the preset's values


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=4", "unknown config key 'train.batchsize'; valid keys: train.batch_size, train.global_batch"),
    ("trian.batch_size=4", "unknown config key 'trian.batch_size'; valid keys: model.name"),
    ("train.batch_size=2.5", "'train.batch_size': expected an integer, got '2.5'"),
    ("train.batch_size=0", "'train.batch_size': expected a positive integer"),
    ("train.batch_size", "not of the form key=value"),
    ("optim.lr=fast", "'optim.lr': expected a number, got 'fast'"),
    ("train.channels_last=maybe", "expected true or false"),
    ("data.train_pipeline.crop_size=512", "'data.train_pipeline.crop_size': expected 2 comma-separated values"),
    ("data.train_pipeline.cat_max_ratio=1.5", "cat_max_ratio must be in (0, 1]"),
    ("model.name=semask_huge_fpn", "expected a registered model"),
    ("train.precision=fp8", "one of auto, fp32, bf16, fp16"),
    ("data.dataset=imagenet", "one of ade20k, cityscapes, coco_stuff10k, toy, folder"),
    ("train.batch_size=none", "'train.batch_size': expected int, got 'none'"),
    ("train.global_batch=12", "a multiple of train.batch_size (8)"),
    ("model=semask_tiny_fpn", "is a section; set its fields: model.name"),
    ("train.seed.x=1", "train.seed is not a section"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset("semask_tiny_ade20k"), [override])
    assert message in str(info.value)


def test_folder_datasets_need_class_names() -> None:
    with pytest.raises(ConfigError, match="data.class_names"):
        apply_overrides(get_preset("toy"), ["data.dataset=folder"])
    c = apply_overrides(get_preset("toy"), ["data.dataset=folder", "data.class_names=sky,road,car"])
    assert c.data.class_names == ("sky", "road", "car")


def test_round_trip_through_json(tmp_path) -> None:
    for name in ("semask_large_coco_stuff10k", "swin_base_cityscapes", "toy"):
        c = get_preset(name)
        assert from_dict(json.loads(json.dumps(to_dict(c)))) == c
    path = tmp_path / "config.json"
    c = set_value(get_preset("toy"), "schedule.iters", "7")
    path.write_text(json.dumps(to_dict(c)))
    assert load_config(path) == c
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        load_config(path)
    path.write_text(json.dumps({"model": {"name": "semask_toy_fpn", "colour": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model.colour in section 'model'"):
        load_config(path)


def test_flat_keys_cover_every_field() -> None:
    keys = flat_keys()
    assert "data.train_pipeline.crop_size" in keys and "optim.lr" in keys and "name" in keys
    for key in keys:  # each key can be read back through set_value's path
        section = TrainConfig()
        node = section
        for part in key.split("."):
            node = getattr(node, part)


def test_cli_configs_lists_presets_with_their_official_files(capsys) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 26
    row = next(line for line in lines if line.startswith("semask_tiny_ade20k "))
    assert row.split()[1] == "configs/semask_swin/ade20k/semfpn_semask_swin_tiny_patch4_window7_512x512_80k_ade20k.py"


def test_cli_configs_prints_a_resolved_config(capsys) -> None:
    assert main(["configs", "semask_tiny_ade20k", "--set", "train.batch_size=4", "data.root=/d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.batch_size=4" in lines and "data.root=/d" in lines and "train.global_batch=16" in lines
    assert "data.train_pipeline.crop_size=512,512" in lines and "model.sync_bn=none" in lines
    assert main(["configs", "toy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == "semask_toy_fpn"


def test_cli_configs_errors_in_a_subprocess() -> None:
    run = subprocess.run([sys.executable, "-m", "semask", "configs", "toy", "--set", "optim.lr=fast"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "'optim.lr': expected a number, got 'fast'" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_the_toy_class_weights_come_from_the_toy_data(tmp_path) -> None:
    from semask.engine.config import TOY_CLASS_WEIGHTS
    from semask.data import ToyDataset, make_toy_dataset
    from semask.engine.losses import balanced_class_weights

    root = make_toy_dataset(tmp_path / "toy", seed=0)  # the set `semask demo` trains on
    weights = balanced_class_weights(ToyDataset(root, "train").pixel_counts())
    assert TOY_CLASS_WEIGHTS == pytest.approx(weights, abs=0.005)
    assert get_preset("toy").loss.class_weight == TOY_CLASS_WEIGHTS
