"""Issue 14, classes 2, 4 and 5: a run directory belongs to one run; no setting trains silently wrong; what cannot
fit is refused before allocating. Python API and `semask` command (subprocesses) alike."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import semask
import semask.bounds as bounds
from semask.bounds import SettingError
from semask.data.transforms import TestPipelineConfig, TrainPipelineConfig
from semask.engine.config import ConfigError, TrainConfig, apply_overrides, flat_keys, get_preset
from semask.engine.inference import Predictor
from semask.engine.losses import SeMaskLoss, semask_loss
from semask.engine.metrics import SegmentationMetric
from semask.engine.rundir import LOCK_FILE, RunLock, RunLockedError
from semask.engine.train import TrainingError, train
from semask.errors import UsageError
from semask.model.segmentor import ExternalSegmentor
from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _config(root: Path, **extra) -> TrainConfig:
    return apply_overrides(get_preset("toy"), tiny_overrides(root, **extra))


def _semask(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "semask", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class _Failing(torch.nn.Module):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error


def _failing_model(error: BaseException) -> ExternalSegmentor:
    return ExternalSegmentor(_Failing(error), 11, "failing", class_names=semask.data.TOY_CLASSES)


# =============================================================================================== class 2: run lock
def test_two_trainings_started_together_into_one_folder_one_is_refused(tiny_toy_root, tmp_path) -> None:
    run = tmp_path / "runs" / "shared"
    overrides = tiny_overrides(tiny_toy_root, **{"schedule.iters": 6, "train.eval_interval": 0})
    procs = [_semask("train", "toy", "--work-dir", run, "--no-progress", "--set", *overrides) for _ in range(2)]
    results = sorted(_finish(p) for p in procs)
    (ok, ok_err), (refused, refused_err) = results
    assert ok == 0, ok_err[-2000:]
    assert refused == 2, refused_err[-2000:]
    assert "in use by a live run" in refused_err and f"process " in refused_err and "Traceback" not in refused_err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [2, 4, 6]  # one run's lines, once each
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_a_live_lock_refuses_at_once_naming_host_and_pid(tiny_toy_root, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cases = {  # lock content -> what the refusal names
        "live here": ({"host": socket.gethostname(), "pid": os.getpid()}, [str(os.getpid()), "live run"]),
        "other host": ({"host": "elsewhere-42", "pid": 1234}, ["'elsewhere-42'", "1234", "another machine"]),
        "not a lock": ("garbage", ["not a lock of semask's"]),
    }
    for name, (content, words) in cases.items():
        (run / LOCK_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
        before = _tree(run)
        with pytest.raises(RunLockedError) as info:
            train(_config(tiny_toy_root), run, progress=False)
        message = str(info.value)
        assert all(w in message for w in words), (name, message)
        assert f"delete {run / LOCK_FILE}" in message, (name, message)
        assert _tree(run) == before, name  # nothing changed, the other run's lock kept
    assert isinstance(info.value, UsageError)


def test_a_stale_lock_is_taken_over_and_said_so(tiny_toy_root, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    train(_config(tiny_toy_root, **{"schedule.iters": 2}), run, progress=False)
    assert f"took over the lock of process {pid}" in (run / "train.log").read_text()
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_exclusive_and_released_only_by_its_holder(tmp_path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockedError, match="live run"):
        second.acquire()
    second.release()  # never held: the first one's lock stays
    assert (tmp_path / LOCK_FILE).exists()
    first.release()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()


def test_the_lock_is_released_on_errors_and_interrupts(tiny_toy_root, tmp_path) -> None:
    def interrupt(rec: dict) -> None:
        if rec["kind"] == "train":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_toy_root), tmp_path / "run", callback=interrupt, progress=False)
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert (tmp_path / "run" / "log.jsonl").exists()  # the first step was done: the run is kept, resumable
    with pytest.raises(TrainingError, match="non-finite"):
        train(_config(tiny_toy_root, **{"optim.lr": 1e30, "optim.clip_grad_norm": "none",
                                        "schedule.warmup_iters": 0}), tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan" / LOCK_FILE).exists()


FAILURES_BEFORE_THE_FIRST_STEP = {
    "missing data root": (lambda root, tmp: {"data.root": tmp / "nowhere"}, None, FileNotFoundError),
    "out of memory in the first forward": (
        lambda root, tmp: {}, lambda: _failing_model(torch.OutOfMemoryError("CUDA out of memory")), TrainingError),
    "interrupted in the first forward": (lambda root, tmp: {}, lambda: _failing_model(KeyboardInterrupt()),
                                         KeyboardInterrupt),
    "missing ImageNet weights": (lambda root, tmp: {"model.pretrained": tmp / "absent.pth"}, None,
                                 FileNotFoundError),
}


@pytest.mark.parametrize("case", list(FAILURES_BEFORE_THE_FIRST_STEP))
def test_a_run_that_fails_before_its_first_step_leaves_no_trace(tiny_toy_root, tmp_path, case) -> None:
    overrides, model, error = FAILURES_BEFORE_THE_FIRST_STEP[case]
    config = _config(tiny_toy_root, **{"train.tensorboard": "true", **overrides(tiny_toy_root, tmp_path)})
    new = tmp_path / "a" / "b" / "run"  # three folders this run would create
    with pytest.raises(error):
        train(config, new, progress=False, model=model() if model else None)
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(error):
        train(config, existing, progress=False, model=model() if model else None)
    assert _tree(existing) == {"notes.txt": b"mine"} and [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_a_resume_that_fails_before_its_first_step_changes_nothing(tiny_toy_root, tmp_path) -> None:
    run = tmp_path / "run"
    train(_config(tiny_toy_root, **{"schedule.iters": 2, "train.tensorboard": "true"}), run, progress=False)
    before = _tree(run)
    with pytest.raises(FileNotFoundError):
        train(_config(tmp_path / "nowhere", **{"schedule.iters": 4}), run, resume=True, progress=False)
    assert _tree(run) == before


def test_resume_shows_each_step_once_in_train_log_and_tensorboard(tiny_toy_root, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    config = _config(tiny_toy_root, **{"schedule.iters": 6, "train.checkpoint_interval": 3, "train.eval_interval": 1,
                                       "train.log_interval": 1, "train.tensorboard": "true"})

    def interrupt_at_step_5(rec: dict) -> None:  # evaluations of steps 4 and 5 logged after latest.pth of step 3
        if rec["kind"] == "eval" and rec["iter"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, run, callback=interrupt_at_step_5, progress=False)
    pid = _dead_pid()  # as if the run had been killed: its lock is left behind
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    train(config, run, resume=True, progress=False)
    lines = (run / "train.log").read_text().splitlines()
    assert sum(f"took over the lock of process {pid}" in line for line in lines) == 1, lines
    steps = [int(line.split(":")[0].split()[1]) for line in lines if line.startswith("step ")]
    assert steps == [1, 2, 3, 4, 5, 6], lines
    assert sum(line.startswith("resuming") for line in lines) == 1
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/mIoU")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("eval/mIoU")] == pytest.approx(
        [r["mIoU"] for r in records if r["kind"] == "eval"])


# =============================================================================================== class 4: settings
def _numeric_fields() -> list[tuple[str, bounds.Range, bool]]:
    """(dotted key, declared range, integer?) of every numeric setting of TrainConfig, pipelines included."""
    out = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            _, length, element = bounds._shape(hints[f.name])
            if dataclasses.is_dataclass(element):
                walk(element, key)
            elif element in (int, float):
                assert "range" in f.metadata, f"{key} is a number without a declared range"
                out.append((key, f.metadata["range"], element is int))

    walk(TrainConfig, "")
    return out


NUMERIC = _numeric_fields()


def test_every_numeric_setting_declares_its_range() -> None:
    keys = {k for k, _, _ in NUMERIC}
    assert len(keys) >= 40 and {"loss.prior_weight", "data.train_pipeline.flip_prob", "optim.betas", "train.threads",
                                "data.test_pipeline.std", "loss.class_weight"} <= keys
    assert keys <= set(flat_keys())


def _bad_values(rng: bounds.Range, integer: bool) -> list[str]:
    values = ["nan", "inf", "-inf", "-1"]
    if math.isfinite(rng.low):
        values.append(f"{rng.low:g}" if rng.low_open else f"{rng.low - (1 if integer else 1e-3):g}")
    if math.isfinite(rng.high):
        values.append(f"{rng.high:g}" if rng.high_open else f"{rng.high + (1 if integer else 1e-3):.10g}")
    if integer:
        values.append("2.5")
    # -1 is a valid value where nothing bounds it from below (a normalisation mean)
    return [v for v in dict.fromkeys(values) if not (v == "-1" and -1 > rng.low)]


BAD_SETTINGS = [(key, value) for key, rng, integer in NUMERIC for value in _bad_values(rng, integer)]


def _as_overrides(key: str, value: str) -> list[str]:
    """``key=value``; for a tuple setting the bad value goes first, the other elements stay valid."""
    current = get_preset("toy")
    for part in key.split("."):
        current = getattr(current, part)
    if key == "data.train_pipeline.ratio_range":  # (low, high) instead of the ratio set
        return ["data.train_pipeline.ratios=none", f"{key}={value},2.0"]
    if isinstance(current, tuple):
        return [f"{key}={','.join([value, *map(str, current[1:])])}"]
    return [f"{key}={value}"]


@pytest.mark.parametrize("key, value", BAD_SETTINGS, ids=[f"{k}={v}" for k, v in BAD_SETTINGS])
def test_a_bad_number_is_refused_where_it_enters_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset("toy"), _as_overrides(key, value))
    assert f"'{key}'" in str(info.value)


SETTINGS_THAT_ONCE_TRAINED_WRONG = [
    ("loss.prior_weight=nan", "loss.prior_weight"),
    ("loss.class_weight=" + ",".join(["0"] * 11), "not all zero"),
    ("data.train_pipeline.flip_prob=2", "flip_prob must be in [0, 1]"),
    ("data.train_pipeline.ignore_index=0", "expected 255, the ignore label of every dataset"),
    ("optim.weight_decay=nan", "optim.weight_decay"),
    ("schedule.min_lr=inf", "schedule.min_lr"),
    ("schedule.min_lr=0.1", "at most optim.lr"),
    ("schedule.power=nan", "schedule.power"),
    ("data.train_pipeline.mean=nan,0,0", "mean must be a finite number"),
    ("data.test_pipeline.std=0,1,1", "std must be a finite number > 0"),
    ("eval.stride=300", "at most eval.crop_size"),
]


@pytest.mark.parametrize("override, message", SETTINGS_THAT_ONCE_TRAINED_WRONG)
def test_settings_that_trained_silently_wrong_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        apply_overrides(get_preset("toy"), [override])
    assert message in str(info.value)


def test_the_python_api_checks_the_same_ranges(tiny_toy_root, tmp_path) -> None:
    from semask.engine.config import LossSection, OptimSection

    with pytest.raises(ConfigError, match="'optim.lr'"):
        TrainConfig(optim=OptimSection(lr=float("nan")))
    with pytest.raises(ConfigError, match="'loss.class_weight'"):
        TrainConfig(loss=LossSection(class_weight=(1.0, float("inf"))))
    with pytest.raises(SettingError, match="flip_prob"):
        TrainPipelineConfig(flip_prob=-0.1)
    with pytest.raises(SettingError, match="ratios"):
        TestPipelineConfig(ratios=(1.0, float("nan")))
    config = _config(tiny_toy_root)
    config.loss.prior_weight = float("nan")  # the sections are mutable: train() checks them again
    with pytest.raises(ConfigError, match="'loss.prior_weight'"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


LOSS_AND_METRIC = [
    ("loss prior nan", lambda: SeMaskLoss(prior_weight=float("nan")), "prior_weight"),
    ("loss weights zero", lambda: SeMaskLoss(class_weight=[0.0, 0.0]), "must not be all zero"),
    ("loss weights inf", lambda: SeMaskLoss(class_weight=[1.0, float("inf")]), "class_weight"),
    ("loss ignore negative", lambda: SeMaskLoss(ignore_index=-1), "ignore_index"),
    ("loss ohem 0", lambda: SeMaskLoss(ohem_min_kept=0), "ohem_min_kept"),
    ("loss ignore is a class", lambda: semask_loss(
        semask.create_model("semask_toy_fpn", num_classes=3).eval()(torch.zeros(1, 3, 32, 32)),
        torch.zeros(1, 32, 32, dtype=torch.long), ignore_index=0), "ignore_index 0 is also a class id"),
    ("metric ignore is a class", lambda: SegmentationMetric(5, ignore_index=0), "not a class id"),
]


@pytest.mark.parametrize("name, call, message", LOSS_AND_METRIC, ids=[c[0] for c in LOSS_AND_METRIC])
def test_loss_and_metric_settings_are_checked_where_they_enter(name, call, message) -> None:
    with pytest.raises(UsageError, match=message):
        call()


# =============================================================================================== class 5: sizes
def test_sizes_that_cannot_fit_are_refused_with_an_estimate(tiny_toy_root, tmp_path) -> None:
    cases = [  # override, words of the message, whether it estimates the memory
        ("data.train_pipeline.crop_size=100000,100000", "'data.train_pipeline.crop_size'", True),
        ("data.train_pipeline.ratios=inf", "'data.train_pipeline.ratios'", False),  # was an OverflowError
        ("data.train_pipeline.ratios=100000", "largest of ratios", True),
        ("data.test_pipeline.scale=100000,100000", "'data.test_pipeline.scale'", True),
        ("eval.crop_size=100000", "'eval.crop_size'", True),
        ("train.threads=-1", "'train.threads': expected an integer in [1, 1024]", False),  # was torch's error
        ("train.threads=100000", "'train.threads'", False),
    ]
    for override, message, estimate in cases:
        with pytest.raises(ConfigError) as info:
            apply_overrides(get_preset("toy"), [override])
        text = str(info.value)
        assert message in text, text
        assert not estimate or "GiB" in text or "PiB" in text, text


def test_a_training_step_beyond_the_devices_memory_is_refused_before_the_first_step(
        tiny_toy_root, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bounds, "memory_capacity", lambda device: 1 << 20)  # a machine with 1 MiB
    with pytest.raises(ConfigError) as info:
        train(_config(tiny_toy_root), tmp_path / "run", progress=False)
    text = str(info.value)
    assert "train.batch_size x data.train_pipeline.crop_size" in text and "needs at least" in text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 120000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError("Unable to allocate 256. TiB for an array with shape (35184372088832,) and data type float64"),
])
def test_running_out_of_cpu_memory_names_the_settings_to_lower(tiny_toy_root, tmp_path, error) -> None:
    with pytest.raises(TrainingError) as info:
        train(_config(tiny_toy_root), tmp_path / "run", progress=False, model=_failing_model(error))
    text = str(info.value)
    assert "CPU ran out of memory with train.batch_size=2 at (64, 64) crops" in text
    assert "data.train_pipeline.crop_size" in text and "accumulation" in text
    other = RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        train(_config(tiny_toy_root), tmp_path / "run2", progress=False, model=_failing_model(other))


def test_predictor_and_export_sizes_are_bounded(monkeypatch, tmp_path) -> None:
    from semask.apps.export import export_onnx

    model = semask.create_model("semask_toy_fpn", num_classes=3).eval()
    refused = [
        (lambda: Predictor(model, scale=(100000, 100000)), "scale (100000, 100000)"),
        (lambda: Predictor(model, ratios=(1e6,)), "largest of ratios"),
        (lambda: Predictor(model, mode="slide", crop_size=100000, stride=100000), "crop_size 100000"),
        (lambda: export_onnx(model, tmp_path / "m.onnx", size=(100000, 100000)), "size (--size)"),
        # under the pixel limit, but the global semantic attention's weights grow with the square of the pixels
        (lambda: export_onnx(model, tmp_path / "m.onnx", size=(9000, 9000)), "needs at least"),
    ]
    for call, message in refused:
        with pytest.raises(SettingError) as info:
            call()
        assert message in str(info.value) and ("GiB" in str(info.value) or "PiB" in str(info.value))
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setattr(bounds, "memory_capacity", lambda device: 1 << 20)
    with pytest.raises(SettingError, match=r"scale \(1024, 256\): this 64 x 64 image rescaled to 256 x 256"):
        Predictor(model)(torch.zeros(3, 64, 64))


def test_the_command_line_refuses_bad_settings_and_sizes_with_exit_2(tiny_toy_root, tmp_path) -> None:
    ckpt = tmp_path / "toy.pth"
    semask.save_checkpoint(ckpt, semask.create_model("semask_toy_fpn", num_classes=3))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    run = tmp_path / "run"
    train_cases = [("loss.prior_weight=nan", "loss.prior_weight"), ("data.train_pipeline.flip_prob=2", "flip_prob"),
                   ("train.threads=-1", "train.threads"), ("data.train_pipeline.ratios=inf", "ratios"),
                   ("data.train_pipeline.crop_size=100000,100000", "crop_size"),
                   ("data.train_pipeline.ignore_index=0", "ignore_index")]
    procs = [(_semask("train", "toy", "--work-dir", run, "--no-progress", "--set",
                      *tiny_overrides(tiny_toy_root), override), key) for override, key in train_cases]
    procs += [(_semask("export", ckpt, tmp_path / "m.onnx", "--size", "100000"), "--size"),
              (_semask("predict", ckpt, image, "--out", tmp_path / "preds", "--scale", "100000", "100000"), "scale"),
              (_semask("test", "toy", ckpt, "--set", *tiny_overrides(tiny_toy_root),
                       "data.test_pipeline.scale=100000,100000"), "data.test_pipeline.scale")]
    for proc, key in procs:
        status, err = _finish(proc)
        assert status == 2 and key in err and "Traceback" not in err, (key, status, err[-1500:])
    assert not run.exists() and not (tmp_path / "m.onnx").exists() and not (tmp_path / "preds").exists()
