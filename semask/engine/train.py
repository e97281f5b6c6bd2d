"""Training SeMask FPN (arXiv 2112.12782): one readable iteration loop, on the CPU, one GPU or many.

    from semask.engine.config import get_preset
    result = semask.train(get_preset("toy"), work_dir="runs/toy")
    result.best["mIoU"], result.history[-1]

    torchrun --nproc_per_node=2 -m semask train semask_tiny_ade20k --work-dir runs/tiny \
        --set data.root=/data/ADEChallengeData2016 model.pretrained=swin_tiny_patch4_window7_224.pth

Each step, in nanoGPT's order: set the learning rate -> for each accumulation step: batch, forward (under
autocast), loss, backward -> unscale and clip -> optimizer step -> log -> evaluate and checkpoint. Everything the
loop uses is built from the `TrainConfig` before it starts; there are no hooks. What the run directory holds is
`semask.engine.rundir`'s; why a resumed run computes exactly the steps of an uninterrupted one is in
docs/design.md ("Engine: training, evaluation, inference"). Each evaluation also scores the semantic priors of
its own forward (``eval.prior_metrics``), and ``train.snapshot_interval`` keeps the weights every N steps, so that
what the semantic layers learn can be followed over the run.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from semask.checkpoint import is_url, load_pretrained_backbone, load_training_state, save_checkpoint
from semask.data.datasets import ADE20K, COCOStuff10k, Cityscapes, FolderDataset, SegmentationDataset
from semask.data.loader import build_train_loader, sample_seed
from semask.data.toy import ToyDataset
from semask.data.transforms import TrainTransform
from semask.device import autocast, autocast_dtype, peak_memory_bytes, seed_everything
from semask.engine import distributed
from semask.engine.config import ConfigError, TrainConfig, to_dict, validate
from semask.engine.evaluate import EvalResult, check_classes, data_inputs, evaluate
from semask.engine.losses import SeMaskLoss
from semask.engine.memory import check_step_fits, out_of_memory_error
from semask.engine.rundir import (BEST, LATEST, RunClaim, RunLog, TrainingError, check_work_dir, planned_snapshots,
                                  records_upto, snapshot_name)
from semask.model.registry import create_model
from semask.model.segmentor import SeMaskFPN
from semask.io import check_output_files, check_output_folder

__all__ = ["TrainingError", "TrainResult", "build_datasets", "model_from_config", "param_groups",
           "learning_rate", "train"]

DROPOUT_STREAM = 0x5EED  # salt of the per-step dropout/drop-path seeds (the data use the plain seed)


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        work_dir: the run directory.
        history: every log record of the run (``kind`` "train", "eval" or "pretrained"), as in ``log.jsonl``.
        best: the evaluation record with the highest mIoU (None when no evaluation ran).
        model: the trained model (the last step's weights), in eval mode.
        config: the resolved config.
        evaluation: the full result of the final evaluation (per class, per image, confusion matrix).
    """

    work_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, Any]] = None
    model: Optional[SeMaskFPN] = None
    config: Optional[TrainConfig] = None
    evaluation: Optional[EvalResult] = None

    @property
    def last_eval(self) -> Optional[dict[str, Any]]:
        """The final evaluation record (None when no evaluation ran)."""
        return next((r for r in reversed(self.history) if r.get("kind") == "eval"), None)

    def summary(self) -> dict[str, Any]:
        """One flat record of the run for tables (`semask.viz.results_table`): the final and best validation
        mIoU, the final per-class IoU (``IoU/<class>``), the parameter count, the steps and the training time in
        seconds (evaluations included)."""
        last = self.last_eval or {}
        trains = [r for r in self.history if r.get("kind") == "train"]
        out: dict[str, Any] = {
            "mIoU": last.get("mIoU"), "best_mIoU": self.best["mIoU"] if self.best else None,
            "params": sum(p.numel() for p in self.model.parameters()) if self.model is not None else None,
            "steps": trains[-1]["iter"] if trains else 0,
            "train_sec": max((r.get("time", 0.0) for r in self.history), default=0.0),
        }
        out.update({f"IoU/{name}": value for name, value in (last.get("IoU") or {}).items()})
        return out


# --------------------------------------------------------------------------------------------- building blocks
def build_datasets(config: TrainConfig) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The training and validation splits named by ``config.data`` (without transforms).

    Raises:
        FileNotFoundError: the root or a split folder is missing (the message shows the expected layout).
    """
    d = config.data
    root = Path(d.root)
    if d.dataset == "folder":
        def folder(split: str) -> FolderDataset:
            return FolderDataset(root / "images" / split, root / "annotations" / split, d.class_names,
                                 img_suffix=d.img_suffix, seg_map_suffix=d.seg_map_suffix,
                                 reduce_zero_label=d.reduce_zero_label)
        return folder(d.train_split or "training"), folder(d.val_split or "validation")
    classes = {"ade20k": (ADE20K, "training", "validation"), "cityscapes": (Cityscapes, "train", "val"),
               "coco_stuff10k": (COCOStuff10k, "train", "test"), "toy": (ToyDataset, "training", "validation")}
    cls, train_split, val_split = classes[d.dataset]
    return cls(root, d.train_split or train_split), cls(root, d.val_split or val_split)


def model_from_config(config: TrainConfig, dataset: SegmentationDataset, sync_bn: bool = False) -> SeMaskFPN:
    """Build the model of ``config.model`` for ``dataset``'s classes and palette (fresh weights)."""
    m = config.model
    overrides: dict[str, Any] = {"grad_checkpointing": m.grad_checkpointing, "sync_bn": sync_bn}
    for key in ("backbone_classes", "semantic_global_stages", "drop_path_rate"):
        if getattr(m, key) is not None:
            overrides[key] = getattr(m, key)
    return create_model(m.name, class_names=dataset.class_names, palette=dataset.palette, **overrides)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the released recipes: no weight decay on relative-position tables, absolute
    position embeddings and every parameter whose name contains ``norm``; decay on everything else (mmcv's
    ``paramwise_cfg`` custom keys, matched on the full parameter name)."""
    no_decay_keys = ("relative_position_bias_table", "absolute_pos_embed", "norm")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): poly decay, scaled by a linear warm-up.

    Poly: ``(lr - min_lr) * (1 - step / iters) ** power + min_lr``; during the first ``warmup_iters`` steps it is
    multiplied by ``1 - (1 - step / warmup_iters) * (1 - warmup_ratio)`` (mmcv's linear warm-up).
    """
    o, s = config.optim, config.schedule
    lr = (o.lr - s.min_lr) * (1 - step / s.iters) ** s.power + s.min_lr
    if step < s.warmup_iters:
        lr *= 1 - (1 - step / s.warmup_iters) * (1 - s.warmup_ratio)
    return lr


# --------------------------------------------------------------------------------------------- set-up
def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _batches(loader: Any, device: torch.device, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, batch["label"].to(device, non_blocking=True)


def _claim_work_dir(config: TrainConfig, work_dir: Path, resume: Union[bool, str],
                    info: distributed.DistInfo) -> tuple[int, Optional[Path], RunClaim]:
    """Check the batch arithmetic; on the first process create the run directory and take its lock (at once, so
    that a second run into it is refused before anything else); then check the run directory and the ImageNet
    weights on every process. Returns the accumulation steps per optimizer step, the checkpoint to resume from
    (or None) and the claim to give back when the run ends."""
    rt = config.train
    per_step = rt.batch_size * info.world_size
    if rt.global_batch % per_step:
        raise ConfigError(f"train.global_batch={rt.global_batch} is not a multiple of train.batch_size x processes "
                          f"= {rt.batch_size} x {info.world_size}; change one of them")
    inputs = [*data_inputs(config.data), ("model.pretrained", config.model.pretrained)]
    check_output_folder(work_dir, "work_dir (--work-dir)", inputs=inputs)
    check_output_files(planned_snapshots(work_dir, rt.snapshot_interval, config.schedule.iters),
                       "train.snapshot_interval: the snapshot", inputs=inputs)
    claim, failure = RunClaim(work_dir), None
    if info.is_main:  # under torchrun the first process alone holds the lock
        try:
            claim.take()
        except Exception as exc:  # noqa: BLE001 - re-raised below, once every process knows
            failure = exc
    if distributed.any_process(failure is not None, info):
        claim.release(started=False)
        if failure is not None:
            raise failure
        raise TrainingError(f"the first process could not claim {work_dir} (its error says why)")
    try:
        resume_from = check_work_dir(work_dir, resume)
        if (config.model.pretrained and resume_from is None and not is_url(config.model.pretrained)
                and not Path(config.model.pretrained).is_file()):  # URLs are downloaded by load_pretrained_backbone
            raise FileNotFoundError(
                f"model.pretrained: ImageNet weights {config.model.pretrained!r} not found. The {config.name} recipe "
                "starts from them (Microsoft's Swin Transformer release, github.com/microsoft/Swin-Transformer); "
                "pass --set model.pretrained=PATH, or model.pretrained=none to train from scratch (far lower mIoU)")
        distributed.barrier(info)  # every process has checked before the first one writes
    except BaseException:
        claim.release(started=False)
        raise
    return rt.global_batch // per_step, resume_from, claim


def _build_model(config: TrainConfig, given: Optional[nn.Module], train_set: SegmentationDataset,
                 val_set: SegmentationDataset, info: distributed.DistInfo) -> nn.Module:
    """The network to train (``given`` or the one ``config.model`` names), on the device, checked against the data."""
    device = info.device
    sync_bn = config.model.sync_bn if config.model.sync_bn is not None else (info.distributed and device.type == "cuda")
    if sync_bn and device.type != "cuda" and info.distributed:
        raise ConfigError("model.sync_bn=true needs CUDA processes (SyncBatchNorm has no CPU/gloo kernel); "
                          "set model.sync_bn=false for CPU training")
    if given is not None and config.model.pretrained:
        raise ConfigError("model.pretrained loads ImageNet Swin weights into the configured model; it cannot be "
                          "used with a model passed to train(model=...): load its weights yourself")
    model = (given if given is not None else model_from_config(config, train_set, sync_bn=sync_bn)).to(device)
    check_classes(model, train_set)
    check_classes(model, val_set)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ignore = config.data.train_pipeline.ignore_index  # the one ignore index: pipeline, loss and metric
    for split in (train_set, val_set):
        if getattr(split, "ignore_index", ignore) != ignore:
            raise ConfigError(f"data.train_pipeline.ignore_index={ignore} differs from the ignore label "
                              f"{split.ignore_index} of {split!r}: the padding would be trained as a class")
    if model.num_classes > ignore:
        raise ConfigError(f"the model predicts {model.num_classes} classes but label {ignore} is the ignore index: "
                          f"class {ignore} would never be trained or scored")
    if config.loss.class_weight is not None and len(config.loss.class_weight) != model.num_classes:
        raise ConfigError(f"loss.class_weight has {len(config.loss.class_weight)} values but the model predicts "
                          f"{model.num_classes} classes ({', '.join(train_set.class_names[:12])} ...)")
    return model


@dataclass
class _Run:
    """What the loop works with, built from the config before it starts, and what it has produced so far."""

    config: TrainConfig
    info: distributed.DistInfo
    work_dir: Path
    log: RunLog
    module: nn.Module  # the network; `model` is it, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: SeMaskLoss
    dtype: Optional[torch.dtype]  # autocast dtype (None: fp32)
    accum: int  # forward/backward passes per optimizer step
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    model: Optional[nn.Module] = None
    batches: Optional[Iterator[tuple[torch.Tensor, torch.Tensor]]] = None
    start_step: int = 0
    best: Optional[dict[str, Any]] = None  # the best evaluation so far: iter, mIoU, mAcc, aAcc
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: Optional[EvalResult] = None
    started: float = 0.0  # perf_counter at the run's time 0 (earlier than now for a resumed run)

    def emit(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        self.log.record(rec)


def _resume(run: _Run, checkpoint: Path) -> None:
    """Restore weights, optimizer, scaler, step and best evaluation; keep the log up to the checkpoint's step."""
    state = load_training_state(checkpoint, run.module, run.optimizer,
                                scaler=run.scaler if run.scaler.is_enabled() else None,
                                map_location=run.info.device, restore_rng=False)
    run.start_step = int(state.get("iteration", 0))
    run.best = (state.get("extra") or {}).get("best")
    run.history = records_upto(run.work_dir, run.start_step)
    changed = _diff(state.get("train_config") or {}, to_dict(run.config))
    # drop what the steps after the checkpoint logged: they are redone
    run.log.rewind(run.history, run.start_step, (state.get("extra") or {}).get("text_log_bytes"))
    run.log.print(f"resuming {run.work_dir} at step {run.start_step}/{run.config.schedule.iters}"
                  + (f"; config changed since the checkpoint: {'; '.join(changed)}" if changed else ""))


def _load_pretrained(run: _Run) -> None:
    """Load the ImageNet Swin weights of ``model.pretrained`` into the backbone and log what was loaded."""
    source = run.config.model.pretrained
    report = load_pretrained_backbone(run.module, source)  # raises when mostly unloaded
    run.log.print(str(report))
    run.emit({"kind": "pretrained", "iter": 0, "source": source, "layout": report.layout,
              "loaded_fraction": report.loaded_fraction, "loaded": len(report.loaded), "resized": report.resized,
              "missing": report.missing})


def _setup(config: TrainConfig, work_dir: Path, accum: int, resume_from: Optional[Path], claim: RunClaim,
           callback: Optional[Callable[[dict[str, Any]], None]], info: distributed.DistInfo,
           given: Optional[nn.Module]) -> _Run:
    """Everything the loop uses, in a fixed order (the seed is set before the model draws its weights). Nothing is
    written to the run directory yet (`RunLog` keeps it back until the first step is done)."""
    rt, device = config.train, info.device
    log = RunLog(work_dir, info.is_main, rt.tensorboard, callback, defer=True)
    for note in claim.notes:
        log.print(note)
    if rt.threads and device.type == "cpu":
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed)
    train_set, val_set = build_datasets(config)
    module = _build_model(config, given, train_set, val_set, info)
    check_step_fits(config, module, device)
    dtype = autocast_dtype(rt.precision, device)
    optimizer = torch.optim.AdamW(param_groups(module, config.optim.weight_decay), lr=config.optim.lr,
                                  betas=config.optim.betas, eps=config.optim.eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = SeMaskLoss(config.loss.prior_weight, ignore_index=config.data.train_pipeline.ignore_index,
                         ohem_min_kept=config.loss.ohem_min_kept, class_weight=config.loss.class_weight)
    run = _Run(config, info, work_dir, log, module, optimizer, scaler, loss_fn, dtype, accum, train_set, val_set)
    if resume_from is not None:
        _resume(run, resume_from)
    elif config.model.pretrained:
        _load_pretrained(run)
    log.write_config(to_dict(config))

    run.model = module
    if info.distributed:
        run.model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    loader = build_train_loader(train_set, TrainTransform(config.data.train_pipeline), rt.batch_size, rt.seed,
                                info.rank, info.world_size, start=run.start_step * accum * rt.batch_size,
                                num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    run.batches = _batches(loader, device, rt.channels_last)
    if config.eval.prior_metrics and not _prior_metrics(config):
        log.print("eval.prior_metrics: the semantic priors are scored in whole mode only (sliding windows have no one "
                  "prior per image); the evaluation records of this run (eval.mode=slide) leave them out")
    params = sum(p.numel() for p in module.parameters())
    log.print(f"{config.name}: {module.name} ({params / 1e6:.2f}M parameters, {module.num_classes} classes) on "
              f"{info.world_size} x {device}, {dtype or 'fp32'}; {len(train_set)} training / {len(val_set)} "
              f"validation images; {rt.global_batch} images per step = {rt.batch_size} x {info.world_size} "
              f"process(es) x {accum} accumulation step(s); {config.schedule.iters} steps")
    return run


# --------------------------------------------------------------------------------------------- parts of a step
class _Window:
    """The loss terms and timings of the steps since the last training log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.data_time, self.steps, self.start = 0.0, 0, time.perf_counter()

    def add(self, terms: dict[str, float], accum: int) -> None:
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value / accum


def _stop_if_nonfinite(nonfinite: bool, step: int, lr: float, terms: dict[str, float],
                       info: distributed.DistInfo) -> None:
    if distributed.any_process(nonfinite, info):  # every process stops together, before any of them steps
        raise TrainingError(
            f"the loss became non-finite at step {step + 1} (lr {lr:.3g}; last micro-batch: "
            + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
            + "). Lower optim.lr, set optim.clip_grad_norm (e.g. 1.0), or use train.precision=bf16/fp32 "
            "instead of fp16; check the data for broken labels. The last checkpoint is untouched.")


def _train_record(run: _Run, window: _Window, done: int, lr: float, grad_norm: Optional[float]) -> dict[str, Any]:
    """The log record of the steps in ``window`` (their loss terms averaged over steps and processes)."""
    rt = run.config.train
    means = distributed.all_reduce_mean({k: v / window.steps for k, v in window.sums.items()}, run.info)
    elapsed = time.perf_counter() - window.start
    return {"kind": "train", "iter": done, "epoch": done * rt.global_batch / len(run.train_set),
            **{k: means[k] for k in sorted(means)}, "lr": lr,
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
            **({"loss_scale": run.scaler.get_scale()} if run.scaler.is_enabled() else {}),
            "sec_per_iter": elapsed / window.steps, "data_sec": window.data_time / window.steps,
            "images_per_s": rt.global_batch * window.steps / elapsed,
            "peak_memory_mb": (peak_memory_bytes(run.info.device) or 0) / 2**20,
            "time": time.perf_counter() - run.started}


def _evaluate(run: _Run, done: int, progress: bool) -> None:
    """Validate after step ``done``, log the result and save best.pth when it is the best so far."""
    config, module = run.config, run.module
    distributed.broadcast_buffers(module, run.info)  # every process scores the weights best.pth / latest.pth hold
    run.evaluation = result = evaluate(
        module, run.val_set, mode=config.eval.mode, test_config=config.data.test_pipeline,
        crop_size=config.eval.crop_size, stride=config.eval.stride, max_images=config.eval.max_images,
        progress=progress, prior_metrics=_prior_metrics(config))
    module.train()
    rec = {"kind": "eval", "iter": done, "mIoU": result.mIoU, "mAcc": result.metrics["mAcc"],
           "aAcc": result.metrics["aAcc"], "IoU": result.to_dict()["IoU"], "Acc": result.to_dict()["Acc"]}
    if result.prior_metrics is not None:
        rec.update(prior_mIoU=result.prior_mIoU, decoder_prior_mIoU=result.decoder_prior_mIoU)
    rec.update(eval_sec=result.seconds, num_images=result.num_images, time=time.perf_counter() - run.started)
    is_best = run.best is None or rec["mIoU"] > run.best["mIoU"]
    if is_best:
        run.best = {k: rec[k] for k in ("iter", "mIoU", "mAcc", "aAcc")}
    best = run.best
    run.emit(rec)
    run.log.print(f"step {done}: mIoU {100 * rec['mIoU']:.2f}  mAcc {100 * rec['mAcc']:.2f}  aAcc "
                  f"{100 * rec['aAcc']:.2f}" + ("  (best)" if is_best else f"  (best {100 * best['mIoU']:.2f} "
                                                                           f"at step {best['iter']})")
                  + _prior_line(rec))
    if is_best and run.info.is_main:
        save_checkpoint(run.work_dir / BEST, module, iteration=done, train_config=to_dict(config),
                        extra={"metrics": {k: rec[k] for k in ("mIoU", "mAcc", "aAcc")}})


def _prior_metrics(config: TrainConfig) -> bool:
    """Whether the evaluations score the semantic priors: ``eval.prior_metrics`` in whole mode (sliding windows
    have no one prior per image)."""
    return config.eval.prior_metrics and config.eval.mode == "whole"


def _prior_line(rec: dict[str, Any]) -> str:
    """The priors' part of an evaluation's printed line: ``prior mIoU 12.3/-/45.6/50.1 (stages), decoder 52.0``."""
    stages = rec.get("prior_mIoU") or []
    if all(v is None for v in stages):
        return ""
    shown = "/".join("-" if v is None else f"{100 * v:.1f}" for v in stages)
    decoder = rec.get("decoder_prior_mIoU")
    return f"  prior mIoU {shown} (stages)" + (f", decoder {100 * decoder:.1f}" if decoder is not None else "")


def _save_snapshot(run: _Run, done: int) -> None:
    """Write iter_NNNNNN.pth: the weights after step ``done`` with the model's config, classes and the step (no
    optimizer state; `semask.load_checkpoint` reads it). A resume rewrites the snapshots of the steps it redoes
    with the weights it computes (the same ones: docs/design.md, "Engine"); earlier ones are never touched."""
    if run.info.is_main:
        save_checkpoint(run.work_dir / snapshot_name(done), run.module, iteration=done,
                        train_config=to_dict(run.config))


def _save_latest(run: _Run, done: int) -> None:
    """Write latest.pth (weights, optimizer, scaler, step, best evaluation): what a resume continues from."""
    if run.info.is_main:
        scaler = run.scaler if run.scaler.is_enabled() else None
        # train.log's size: a resume from this checkpoint cuts the log back to it
        save_checkpoint(run.work_dir / LATEST, run.module, optimizer=run.optimizer, scaler=scaler, iteration=done,
                        train_config=to_dict(run.config),
                        extra={"best": run.best, "text_log_bytes": run.log.text_size()})


# --------------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, work_dir: Union[str, Path], *, resume: Union[bool, str] = False,
          callback: Optional[Callable[[dict[str, Any]], None]] = None, progress: bool = True,
          model: Optional[nn.Module] = None) -> TrainResult:
    """Train a model with a `TrainConfig` (one process, or one of several started by torchrun).

    Args:
        config: the resolved config (e.g. ``semask.engine.config.get_preset("toy")`` with overrides applied).
        work_dir: run directory (created; an existing run in it is an error unless ``resume``). The run holds its
            lock (``run.lock``) until it ends; until its first step is done it writes nothing there, so a run that
            fails earlier leaves the folder as it found it (and no folder it created).
        resume: continue from ``work_dir/latest.pth`` (model, optimizer, scaler, step, data position);
            ``"auto"``: continue when there is one, else start (a finished run then just loads: notebooks use this
            to train once and reuse the run afterwards).
        callback: called with every log record (train and eval lines) on the first process, e.g. to plot live.
        progress: show a tqdm progress bar (first process only).
        model: train this network instead of the one ``config.model`` names, with the same recipe, e.g. an outside
            baseline wrapped in `semask.model.segmentor.ExternalSegmentor` (fresh weights; it must predict the dataset's
            classes). ``config.model`` is then not used (``model.pretrained`` is an error).

    Returns:
        A `TrainResult` with the history, the best evaluation record and the trained model.

    Raises:
        TrainingError: non-finite loss (with the step and loss terms), CUDA or CPU out of memory (with what to
            change), an existing run in ``work_dir`` without ``resume``, or no ``latest.pth`` with ``resume``.
        RunLockedError: another run holds ``work_dir`` (its host and process are named).
        FileNotFoundError: a dataset root or split that does not exist (the message shows the expected layout).
        ConfigError: a setting out of its range, settings that do not fit together (e.g. a global batch the
            processes cannot reach), or a step whose memory estimate exceeds the device's.
    """
    info = distributed.setup(config.train.device)
    try:
        return _train(config, Path(work_dir), resume, callback, progress, info, model)
    finally:
        distributed.cleanup(info)


def _train(config: TrainConfig, work_dir: Path, resume: Union[bool, str],
           callback: Optional[Callable[[dict[str, Any]], None]], progress: bool, info: distributed.DistInfo,
           given: Optional[nn.Module]) -> TrainResult:
    validate(config)  # the sections are mutable: check the settings as they are now
    accum, resume_from, claim = _claim_work_dir(config, work_dir, resume, info)
    run = None
    try:
        try:
            run = _setup(config, work_dir, accum, resume_from, claim, callback, info, given)
            try:
                _loop(run, progress)
            finally:
                run.log.close()
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            named = out_of_memory_error(exc, config)
            if named is not None:
                raise named from exc
            raise
        distributed.barrier(info)
        run.module.eval()
        run.log.commit()  # a resume with no step left to do still records that it ran
        run.log.print(f"done: {config.schedule.iters} steps, {time.perf_counter() - run.started:.0f} s in all"
                      + (f"; best mIoU {100 * run.best['mIoU']:.2f} at step {run.best['iter']}" if run.best else ""))
    finally:  # errors and KeyboardInterrupt too; a run that never did a step leaves no folder it created
        claim.release(started=run is not None and run.log.committed)
    return TrainResult(work_dir=work_dir, history=run.history, best=run.best, model=run.module, config=config,
                       evaluation=run.evaluation)


def _loop(run: _Run, progress: bool) -> None:
    """Steps ``run.start_step`` .. ``schedule.iters`` - 1, each: lr -> forward -> loss -> backward -> clip ->
    step -> log -> evaluate / checkpoint."""
    config, info, model, accum = run.config, run.info, run.model, run.accum
    optimizer, scaler, rt, iters = run.optimizer, run.scaler, config.train, config.schedule.iters
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True)
    # a resumed run's clock continues from its last record, so that "time" is the run's total
    run.started = time.perf_counter() - max((r.get("time", 0.0) for r in run.history), default=0.0)
    window, grad_norm = _Window(), None
    model.train()
    try:
        for step in range(run.start_step, iters):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            nonfinite = False
            for micro in range(accum):
                torch.manual_seed(sample_seed(rt.seed ^ DROPOUT_STREAM, step, info.rank * accum + micro))
                t0 = time.perf_counter()
                images, labels = next(run.batches)
                window.data_time += time.perf_counter() - t0
                sync = micro == accum - 1 or not info.distributed  # DDP synchronises the last backward only
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast(info.device, run.dtype):
                        out = model(images)
                        losses = run.loss_fn(out, labels)
                    scaler.scale(losses.total / accum).backward()
                terms = losses.as_dict()  # one host sync per micro-batch: small next to a segmentation step
                window.add(terms, accum)
                nonfinite |= not math.isfinite(terms["loss"])
            _stop_if_nonfinite(nonfinite, step, lr, terms, info)
            if config.optim.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm))
            scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            run.log.commit()  # the first step is done: from now on the run directory is written
            window.steps += 1
            if bar is not None:
                bar.update(1)

            if done % rt.log_interval == 0 or done == iters:
                rec = _train_record(run, window, done, lr, grad_norm)
                run.emit(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                window.reset()
            if (rt.eval_interval and done % rt.eval_interval == 0) or done == iters:
                _evaluate(run, done, progress)
                window.start = time.perf_counter()  # evaluation time is not training time
            # the snapshot before latest.pth: a resume from latest.pth never misses a snapshot
            if rt.snapshot_interval and done % rt.snapshot_interval == 0:
                _save_snapshot(run, done)
                window.start = time.perf_counter()
            if (rt.checkpoint_interval and done % rt.checkpoint_interval == 0) or done == iters:
                _save_latest(run, done)
                window.start = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
