"""The training loop: parameter groups, schedule, precision, run directory, resume, errors, pretrained weights."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import semask
from semask.checkpoint import CheckpointError, read_checkpoint_file
from semask.engine.config import ConfigError, apply_overrides, get_preset
from semask.data.loader import AugmentedDataset, TrainSampler, build_train_loader
from semask.data.toy import ToyDataset
from semask.data.transforms import TrainTransform, train_preset
from semask.engine.rundir import LOG_FILE, RunLog, check_work_dir, records_upto
from semask.engine.train import (TrainingError, learning_rate, model_from_config, param_groups, train)
from helpers import tiny_overrides


def _config(root: Path, **extra):
    return apply_overrides(get_preset("toy"), tiny_overrides(root, **extra))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- building blocks
def test_param_groups_exempt_position_tables_and_norms() -> None:
    model = semask.create_model("semask_toy_fpn")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert exempt and decayed and not exempt & decayed
    assert len(exempt) + len(decayed) == len(names)
    assert all("relative_position_bias_table" in n or "norm" in n for n in exempt)
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in exempt
    assert "backbone.layers.0.blocks.0.norm1.weight" in exempt and "backbone.norm3.bias" in exempt
    assert "backbone.layers.0.blocks.0.attn.qkv.weight" in decayed
    assert "decode_head.scale_heads.0.0.bn.weight" in decayed  # mmcv matches "norm" in the name, not BN layers


def test_learning_rate_is_linear_warmup_then_poly() -> None:
    c = apply_overrides(get_preset("semask_tiny_ade20k"), [])
    lr, iters, warm, ratio = 1e-4, 80_000, 1500, 1e-6
    poly = lambda s: lr * (1 - s / iters)  # noqa: E731
    assert learning_rate(0, c) == pytest.approx(lr * ratio)
    assert learning_rate(750, c) == pytest.approx(poly(750) * (1 - 0.5 * (1 - ratio)))
    assert learning_rate(1500, c) == pytest.approx(poly(1500))
    assert learning_rate(40_000, c) == pytest.approx(lr / 2)
    assert learning_rate(iters, c) == 0.0
    after = [learning_rate(s, c) for s in range(1500, iters, 997)]
    assert after == sorted(after, reverse=True)
    c2 = apply_overrides(c, ["schedule.min_lr=1e-6", "schedule.power=0.9"])
    assert learning_rate(iters, c2) == pytest.approx(1e-6)


def test_model_from_config_applies_the_model_section(tiny_toy_root) -> None:
    c = apply_overrides(get_preset("toy"), [f"data.root={tiny_toy_root}", "model.drop_path_rate=0.0",
                                            "model.semantic_global_stages=", "model.grad_checkpointing=true"])
    ds = ToyDataset(tiny_toy_root, "train")
    model = model_from_config(c, ds)
    assert model.num_classes == 11 and model.class_names == ds.class_names and model.palette == ds.palette
    assert model.config.drop_path_rate == 0.0 and model.backbone.global_stages == ()
    assert model.config.grad_checkpointing


# --------------------------------------------------------------------------------------------- run directory
def test_run_log_writes_on_the_first_process_only_and_a_resume_keeps_the_steps_it_does_not_redo(tmp_path) -> None:
    seen = []
    log = RunLog(tmp_path, active=True, tensorboard=False, callback=seen.append)
    records = [{"kind": "train", "iter": i, "loss": 1.0 / i} for i in (1, 2, 3)] + [{"kind": "eval", "iter": 3}]
    for rec in records:
        log.record(rec)
    log.print("hello")
    log.write_config({"name": "toy"})
    assert seen == records and _records(tmp_path) == records
    assert (tmp_path / "train.log").read_text() == "hello\n"
    assert json.loads((tmp_path / "config.json").read_text()) == {"name": "toy"}
    assert records_upto(tmp_path, 2) == records[:2] and records_upto(tmp_path / "none", 2) == []
    with open(tmp_path / LOG_FILE, "a") as f:
        f.write('{"kind": "train", "it')  # what a killed run leaves behind
    log.rewrite(records_upto(tmp_path, 2))
    assert _records(tmp_path) == records[:2]
    quiet = RunLog(tmp_path / "other", active=False, tensorboard=True, callback=seen.append)
    quiet.record(records[0])
    quiet.print("x")
    quiet.write_config({})
    quiet.close()
    assert not (tmp_path / "other").exists() and len(seen) == len(records)


def test_check_work_dir_refuses_to_overwrite_and_needs_a_checkpoint_to_resume(tmp_path) -> None:
    assert check_work_dir(tmp_path / "new", False) is None and check_work_dir(tmp_path / "new", "auto") is None
    (tmp_path / LOG_FILE).write_text("")
    with pytest.raises(TrainingError, match=r"already holds a run \(log.jsonl\)"):
        check_work_dir(tmp_path, False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        check_work_dir(tmp_path, True)
    (tmp_path / "latest.pth").write_bytes(b"")
    assert check_work_dir(tmp_path, "auto") == tmp_path / "latest.pth" == check_work_dir(tmp_path, True)
    with pytest.raises(ConfigError, match="resume must be True, False or 'auto'"):
        check_work_dir(tmp_path, "yes")


# --------------------------------------------------------------------------------------------- data order
def test_train_sampler_shards_and_resumes() -> None:
    full = TrainSampler(10, seed=3)
    stream = [k for _, k in zip(range(25), iter(full))]
    assert sorted(k % 10 for k in stream[:10]) == list(range(10))  # epoch 0 is a permutation
    assert all(10 <= k < 20 for k in stream[10:20])  # keys carry their epoch
    resumed = [k for _, k in zip(range(12), iter(TrainSampler(10, seed=3, start=13)))]
    assert resumed == stream[13:25]
    ranks = [[k for _, k in zip(range(5), iter(TrainSampler(10, seed=3, rank=r, world_size=2)))] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))  # one epoch, split between two processes
    odd = [list(TrainSampler(5, seed=1, rank=r, world_size=2).epoch_keys(0)) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 3  # padded to a multiple of the world size


def test_augmentation_is_independent_of_workers_and_resumable(tiny_toy_root) -> None:
    ds = ToyDataset(tiny_toy_root, "train")
    transform = TrainTransform(train_preset("toy"))

    def batches(num_workers: int, start: int, count: int) -> list[torch.Tensor]:
        loader = build_train_loader(ds, transform, batch_size=2, seed=5, start=start, num_workers=num_workers)
        return [b["image"] for _, b in zip(range(count), loader)]

    plain = batches(0, 0, 4)
    assert all(torch.equal(a, b) for a, b in zip(plain, batches(2, 0, 4)))
    assert all(torch.equal(a, b) for a, b in zip(plain[2:], batches(0, 4, 2)))
    aug = AugmentedDataset(ds, transform, seed=5)
    assert torch.equal(aug[3]["image"], aug[3]["image"]) and not torch.equal(aug[3]["image"], aug[3 + 12]["image"])


# --------------------------------------------------------------------------------------------- the loop
def test_training_writes_a_complete_run(tiny_toy_root, tmp_path) -> None:
    seen = []
    result = train(_config(tiny_toy_root), tmp_path / "run", callback=seen.append, progress=False)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "log.jsonl", "train.log", "latest.pth", "best.pth"}
    records = _records(run)
    assert records == result.history == seen
    train_lines = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iter"] for r in train_lines] == [2, 4] and [r["iter"] for r in evals] == [2, 4]
    for r in train_lines:
        assert set(r) >= {"iter", "epoch", "loss", "loss_decode", "loss_prior", "lr", "grad_norm", "sec_per_iter",
                          "data_sec", "images_per_s", "peak_memory_mb", "time"}
        assert r["loss"] == pytest.approx(r["loss_decode"] + r["loss_prior"], rel=1e-5)
        assert r["epoch"] == pytest.approx(r["iter"] * 2 / 12)
    for r in evals:
        assert 0 <= r["mIoU"] <= 1 and set(r["IoU"]) == set(semask.data.TOY_CLASSES) and r["num_images"] == 4
    assert result.best["mIoU"] == max(r["mIoU"] for r in evals)
    assert result.last_eval == evals[-1]
    assert json.loads((run / "config.json").read_text())["schedule"]["iters"] == 4
    latest = read_checkpoint_file(run / "latest.pth")
    assert latest["iteration"] == 4 and "optimizer" in latest
    assert latest["train_config"]["name"] == "toy" and latest["train_config"]["data"]["root"] == str(tiny_toy_root)
    model = semask.load_checkpoint(run / "best.pth")  # a checkpoint alone says what it is and how it was trained
    assert model.class_names == semask.data.TOY_CLASSES and not model.training
    best = read_checkpoint_file(run / "best.pth")
    assert best["iteration"] == result.best["iter"] and best["extra"]["metrics"]["mIoU"] == result.best["mIoU"]
    assert not result.model.training


def test_resume_ends_exactly_where_an_uninterrupted_run_does(tiny_toy_root, tmp_path) -> None:
    overrides = {"schedule.iters": 6, "train.checkpoint_interval": 3, "train.eval_interval": 0,
                 "data.num_workers": 1, "train.log_interval": 1}
    whole = train(_config(tiny_toy_root, **overrides), tmp_path / "whole", progress=False)
    config = _config(tiny_toy_root, **overrides)

    class Interrupted(Exception):
        pass

    def interrupt_at_step_4(rec: dict) -> None:  # latest.pth of step 3 is on disk by then
        if rec["kind"] == "train" and rec["iter"] == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, tmp_path / "resumed", callback=interrupt_at_step_4, progress=False)
    assert read_checkpoint_file(tmp_path / "resumed" / "latest.pth")["iteration"] == 3
    resumed = train(config, tmp_path / "resumed", resume=True, progress=False)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"
    # the log holds each step once: the records of step 4 from before the interruption were replaced
    assert [r["iter"] for r in _records(tmp_path / "resumed") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    losses = lambda h: [r["loss"] for r in h if r["kind"] == "train"]  # noqa: E731
    assert losses(resumed.history) == losses(whole.history)
    assert resumed.last_eval["mIoU"] == whole.last_eval["mIoU"]


def test_an_existing_run_is_never_overwritten(tiny_toy_root, tmp_path) -> None:
    train(_config(tiny_toy_root, **{"schedule.iters": 2}), tmp_path / "run", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(TrainingError, match="already holds a run .*--resume"):
        train(_config(tiny_toy_root, **{"schedule.iters": 2}), tmp_path / "run", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(_config(tiny_toy_root), tmp_path / "empty", resume=True, progress=False)


def test_a_non_finite_loss_stops_with_the_step_and_terms(tiny_toy_root, tmp_path) -> None:
    config = _config(tiny_toy_root, **{"optim.lr": 1e30, "optim.clip_grad_norm": "none",
                                       "schedule.warmup_iters": 0, "train.checkpoint_interval": 0})
    with pytest.raises(TrainingError) as info:
        train(config, tmp_path / "run", progress=False)
    message = str(info.value)
    assert "non-finite at step 2" in message and "loss_decode=" in message and "optim.lr" in message
    assert not (tmp_path / "run" / "latest.pth").exists()


def test_fp16_scaler_skips_overflowing_steps(tiny_toy_root, tmp_path, monkeypatch) -> None:
    # a loss scale of 2**100 overflows every gradient: the scaler must skip the optimizer step and back off
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 100))
    config = _config(tiny_toy_root, **{"train.precision": "fp16", "schedule.iters": 2, "train.log_interval": 1,
                                       "train.eval_interval": 0, "optim.clip_grad_norm": "none"})
    torch.manual_seed(0)
    start = model_from_config(config, ToyDataset(tiny_toy_root, "train")).state_dict()
    result = train(config, tmp_path / "run", progress=False)
    scales = [r["loss_scale"] for r in result.history if r["kind"] == "train"]
    assert scales[0] < 2.0 ** 100 and scales[1] < scales[0]
    end = result.model.state_dict()
    moved = [k for k in start if k.endswith("weight") and not torch.equal(start[k], end[k])]
    assert not moved, f"skipped steps must leave the weights alone, but {moved[:3]} changed"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(tiny_toy_root, tmp_path, precision: str) -> None:
    result = train(_config(tiny_toy_root, **{"train.precision": precision, "schedule.iters": 2}),
                   tmp_path / precision, progress=False)
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    first = next(r for r in result.history if r["kind"] == "train")
    assert ("loss_scale" in first) == (precision == "fp16")
    assert next(r for r in result.history if r["kind"] == "run")["precision"]["autocast"] == precision


def test_gradient_accumulation_reaches_the_global_batch(tiny_toy_root, tmp_path) -> None:
    config = _config(tiny_toy_root, **{"train.batch_size": 1, "train.global_batch": 4, "schedule.iters": 2,
                                       "train.eval_interval": 0})
    result = train(config, tmp_path / "run", progress=False)
    line = next(r for r in result.history if r["kind"] == "train")
    assert line["epoch"] == pytest.approx(2 * 4 / 12)  # 4 images per step = 1 image x 4 accumulation steps
    text = (tmp_path / "run" / "train.log").read_text()
    assert "4 images per step = 1 x 1 process(es) x 4 accumulation step(s)" in text
    with pytest.raises(ConfigError, match="a multiple of train.batch_size"):
        _config(tiny_toy_root, **{"train.batch_size": 3, "train.global_batch": 4})


def test_pretrained_imagenet_weights_are_loaded_and_reported(tiny_toy_root, tmp_path) -> None:
    donor = semask.create_model("swin_toy_fpn").backbone.state_dict()
    imagenet = {"model": {k: v for k, v in donor.items() if not k.startswith("norm")}}  # Microsoft's layout
    imagenet["model"]["head.weight"] = torch.zeros(1000, 256)
    torch.save(imagenet, tmp_path / "swin_toy_imagenet.pth")
    result = train(_config(tiny_toy_root, **{"model.pretrained": tmp_path / "swin_toy_imagenet.pth",
                                             "schedule.iters": 1, "train.eval_interval": 0}),
                   tmp_path / "run", progress=False)
    report = next(r for r in _records(tmp_path / "run") if r["kind"] == "pretrained")
    assert report["loaded_fraction"] == 1.0 and report["layout"] == "microsoft"
    assert "swin_toy_imagenet.pth" in (tmp_path / "run" / "train.log").read_text()
    assert [r["kind"] for r in result.history[:2]] == ["run", "pretrained"] and result.history[1] == report
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="only 0.0% of the backbone's Swin parameters"):
        train(_config(tiny_toy_root, **{"model.pretrained": tmp_path / "wrong.pth"}), tmp_path / "run2",
              progress=False)
    with pytest.raises(FileNotFoundError, match="model.pretrained: ImageNet weights .* not found"):
        train(_config(tiny_toy_root, **{"model.pretrained": tmp_path / "absent.pth"}), tmp_path / "run3",
              progress=False)


def test_a_missing_dataset_shows_the_expected_layout(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="toy-data"):
        train(_config(tmp_path / "nowhere"), tmp_path / "run", progress=False)
    config = apply_overrides(get_preset("semask_tiny_ade20k"), [f"data.root={tmp_path}", "model.pretrained=none"])
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        train(config, tmp_path / "run", progress=False)


def test_an_external_network_trains_with_the_same_recipe(tiny_toy_root, tmp_path) -> None:
    import segmentation_models_pytorch as smp

    from semask.checkpoint import load_training_state
    from semask.data import TOY_CLASSES, TOY_PALETTE
    from semask.model.segmentor import ExternalSegmentor

    def build() -> ExternalSegmentor:
        torch.manual_seed(0)
        net = smp.FPN("mobilenet_v2", encoder_weights=None, classes=11, decoder_pyramid_channels=128,
                      decoder_segmentation_channels=64)
        return ExternalSegmentor(net, 11, "smp_fpn_mobilenet_v2", class_names=TOY_CLASSES, palette=TOY_PALETTE)

    model = build()
    out = model.eval()(torch.randn(2, 3, 50, 70))  # padded to 64 x 96 inside, cropped back
    assert out.logits.shape == (2, 11, 50, 70) and out.prior_logits is None and out.stage_priors == []
    result = train(_config(tiny_toy_root, **{"schedule.iters": 2}), tmp_path / "run", progress=False,
                   model=model.train())
    lines = [r for r in result.history if r["kind"] == "train"]
    assert lines and "loss_prior" not in lines[0] and lines[0]["loss"] == lines[0]["loss_decode"]
    assert result.last_eval is not None and result.model is model
    with pytest.raises(CheckpointError, match="external network .*smp_fpn_mobilenet_v2.*load_training_state"):
        semask.load_checkpoint(tmp_path / "run" / "latest.pth")
    again = build()
    load_training_state(tmp_path / "run" / "latest.pth", again)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ConfigError, match="model.pretrained .* train\\(model=...\\)"):
        train(_config(tiny_toy_root, **{"model.pretrained": tmp_path / "run" / "latest.pth"}), tmp_path / "run2",
              progress=False, model=build())
    wrong = ExternalSegmentor(torch.nn.Conv2d(3, 5, 1), 5, "five")
    with pytest.raises(ValueError, match="predicts 5 classes but the dataset"):
        train(_config(tiny_toy_root), tmp_path / "run3", progress=False, model=wrong)


def test_resume_auto_starts_or_continues(tiny_toy_root, tmp_path) -> None:
    config = _config(tiny_toy_root, **{"schedule.iters": 2, "train.eval_interval": 0})
    first = train(config, tmp_path / "run", resume="auto", progress=False)
    again = train(config, tmp_path / "run", resume="auto", progress=False)  # finished: loads, trains nothing
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert [r["iter"] for r in again.history] == [r["iter"] for r in first.history]
    assert "resuming" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ConfigError, match="resume must be True, False or 'auto'"):
        train(config, tmp_path / "run", resume="yes", progress=False)


def test_train_result_summary(tiny_toy_root, tmp_path) -> None:
    result = train(_config(tiny_toy_root, **{"schedule.iters": 2}), tmp_path / "run", progress=False)
    s = result.summary()
    assert s["mIoU"] == result.last_eval["mIoU"] and s["best_mIoU"] == result.best["mIoU"] and s["steps"] == 2
    assert s["params"] == sum(p.numel() for p in result.model.parameters()) and s["train_sec"] > 0
    assert s["IoU/sky"] == result.last_eval["IoU"]["sky"]


def test_out_of_memory_says_what_to_change(tiny_toy_root, tmp_path) -> None:
    from semask.model.segmentor import ExternalSegmentor

    class Exhausted(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = ExternalSegmentor(Exhausted(), 11, "exhausted", class_names=semask.data.TOY_CLASSES)
    with pytest.raises(TrainingError) as info:
        train(_config(tiny_toy_root), tmp_path / "run", progress=False, model=model)
    message = str(info.value)
    assert "ran out of memory with train.batch_size=2" in message
    assert "model.grad_checkpointing=true" in message and "train.precision=bf16" in message
    assert "accumulation" in message


def test_tensorboard_gets_the_logged_scalars(tiny_toy_root, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_config(tiny_toy_root, **{"train.tensorboard": "true", "schedule.iters": 2}), tmp_path / "run",
          progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_decode", "train/loss_prior", "train/lr", "eval/mIoU"} <= tags
    records = _records(tmp_path / "run")
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in records if r["kind"] == "train"])
    assert [e.step for e in events.Scalars("eval/mIoU")] == [r["iter"] for r in records if r["kind"] == "eval"]
