"""Training SeMask FPN (arXiv 2112.12782): one readable iteration loop, on the CPU, one GPU or many.

    from semask.engine.config import get_preset
    result = semask.train(get_preset("toy"), work_dir="runs/toy")
    result.best["mIoU"], result.history[-1]

    torchrun --nproc_per_node=2 -m semask train semask_tiny_ade20k --work-dir runs/tiny \
        --set data.root=/data/ADEChallengeData2016 model.pretrained=swin_tiny_patch4_window7_224.pth

Each step, in nanoGPT's order: set the learning rate -> for each of the accumulation steps: batch, forward
(under autocast), loss, backward (DDP synchronises the last one) -> unscale and clip -> optimizer step (the
fp16 gradient scaler skips steps whose gradients overflowed) -> log -> evaluate and checkpoint. Everything the
loop uses is built from the `TrainConfig` before it starts; there are no hooks.

A run directory holds ``config.json`` (the resolved config), ``log.jsonl`` (one JSON object per log line:
``{"kind": "train", "iter", "loss", "loss_decode", "loss_prior", "lr", "sec_per_iter", "data_sec",
"images_per_s", "peak_memory_mb", ...}`` and ``{"kind": "eval", "iter", "mIoU", "mAcc", "aAcc", "IoU": {class:
value}, ...}``), ``train.log`` (what was printed), ``latest.pth`` (model, optimizer, scaler, iteration; written
every ``train.checkpoint_interval`` steps and at the end), ``best.pth`` (the weights with the best validation mIoU)
and, when the `tensorboard` package is installed, ``tb/`` with the same scalars. Only the first process writes.

Reproducibility and exact resume: the data order and every sample's augmentation are functions of
(seed, epoch, sample) (`semask.data.loader.TrainSampler`, `AugmentedDataset`), and dropout / drop-path draw
from torch's generator reseeded at every step from (seed, step, process). A run resumed from ``latest.pth``
therefore computes exactly the steps the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from semask.engine import distributed
from semask.checkpoint import is_url, load_pretrained_backbone, load_training_state, save_checkpoint
from semask.engine.config import ConfigError, TrainConfig, to_dict
from semask.data.datasets import ADE20K, COCOStuff10k, Cityscapes, FolderDataset, SegmentationDataset
from semask.data.loader import build_train_loader, sample_seed
from semask.data.toy import ToyDataset
from semask.data.transforms import TrainTransform
from semask.errors import SemaskError
from semask.engine.evaluate import EvalResult, check_classes, data_inputs, evaluate
from semask.engine.losses import SeMaskLoss
from semask.engine.rundir import BEST, CONFIG_FILE, LATEST, LOG_FILE, TENSORBOARD_DIR, TEXT_LOG
from semask.model.registry import create_model
from semask.model.segmentor import SeMaskFPN
from semask.device import autocast, autocast_dtype, peak_memory_bytes, seed_everything
from semask.io import atomic_path, check_output_folder

__all__ = ["TrainingError", "TrainResult", "build_datasets", "model_from_config", "param_groups",
           "learning_rate", "train"]

DROPOUT_STREAM = 0x5EED  # salt of the per-step dropout/drop-path seeds (the data use the plain seed)


class TrainingError(SemaskError, RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, a run directory in the way, ...)."""


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


class _RunLog:
    """Rank 0's outputs: printed lines (also in train.log), log.jsonl records, TensorBoard scalars."""

    def __init__(self, work_dir: Path, active: bool, tensorboard: bool,
                 callback: Optional[Callable[[dict[str, Any]], None]]) -> None:
        self.work_dir, self.active, self.callback = work_dir, active, callback
        self.writer = None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional extra; the same scalars are in log.jsonl
                self.print("tensorboard is not installed: scalars are in log.jsonl only "
                           "(pip install 'semask[tensorboard]' to get them in TensorBoard too)")
            else:
                self.writer = SummaryWriter(str(work_dir / TENSORBOARD_DIR))

    def print(self, line: str) -> None:
        if self.active:
            print(line, file=sys.stderr, flush=True)
            with open(self.work_dir / TEXT_LOG, "a") as f:
                f.write(line + "\n")

    def record(self, rec: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.work_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            for key, value in rec.items():
                if isinstance(value, (int, float)) and key not in ("iter", "time"):
                    self.writer.add_scalar(f"{rec['kind']}/{key}", value, rec["iter"])
            self.writer.flush()
        if self.callback is not None:
            self.callback(rec)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    """The records of a run's log.jsonl up to step ``upto`` (later ones belong to steps a resume redoes)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("iter", 0) <= upto]


def _check_work_dir(work_dir: Path, resume: Union[bool, str]) -> Optional[Path]:
    """The checkpoint to resume from, or None; refuses to write over an existing run."""
    latest = work_dir / LATEST
    if resume not in (True, False, "auto"):
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume == "auto":
        resume = latest.is_file()
    if resume:
        if not latest.is_file():
            raise TrainingError(f"--resume: {latest} does not exist; nothing to resume in {work_dir} "
                                "(start a new run without --resume)")
        return latest
    existing = [p.name for p in (work_dir / LOG_FILE, latest, work_dir / BEST) if p.exists()]
    if existing:
        raise TrainingError(f"{work_dir} already holds a run ({', '.join(existing)}); continue it with --resume "
                            "or choose another --work-dir (nothing was changed)")
    return None


def _batches(loader: Any, device: torch.device, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, batch["label"].to(device, non_blocking=True)


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


# --------------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, work_dir: Union[str, Path], *, resume: Union[bool, str] = False,
          callback: Optional[Callable[[dict[str, Any]], None]] = None, progress: bool = True,
          model: Optional[nn.Module] = None) -> TrainResult:
    """Train a model with a `TrainConfig` (one process, or one of several started by torchrun).

    Args:
        config: the resolved config (e.g. ``semask.engine.config.get_preset("toy")`` with overrides applied).
        work_dir: run directory (created; an existing run in it is an error unless ``resume``).
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
        TrainingError: non-finite loss (with the step and loss terms), CUDA out of memory (with what to change),
            an existing run in ``work_dir`` without ``resume``, or no ``latest.pth`` with ``resume``.
        FileNotFoundError: a dataset root or split that does not exist (the message shows the expected layout).
        ConfigError: settings that do not fit together (e.g. a global batch the processes cannot reach).
    """
    info = distributed.setup(config.train.device)
    try:
        return _train(config, Path(work_dir), resume, callback, progress, info, model)
    finally:
        distributed.cleanup(info)


def _train(config: TrainConfig, work_dir: Path, resume: Union[bool, str],
           callback: Optional[Callable[[dict[str, Any]], None]], progress: bool, info: distributed.DistInfo,
           given: Optional[nn.Module]) -> TrainResult:
    rt, device = config.train, info.device
    per_step = rt.batch_size * info.world_size
    if rt.global_batch % per_step:
        raise ConfigError(f"train.global_batch={rt.global_batch} is not a multiple of train.batch_size x processes "
                          f"= {rt.batch_size} x {info.world_size}; change one of them")
    accum = rt.global_batch // per_step
    check_output_folder(work_dir, "work_dir (--work-dir)",
                        inputs=[*data_inputs(config.data), ("model.pretrained", config.model.pretrained)])
    resume_from = _check_work_dir(work_dir, resume)
    if (config.model.pretrained and resume_from is None and not is_url(config.model.pretrained)
            and not Path(config.model.pretrained).is_file()):  # URLs are downloaded by load_pretrained_backbone
        raise FileNotFoundError(
            f"model.pretrained: ImageNet weights {config.model.pretrained!r} not found. The {config.name} recipe "
            "starts from them (Microsoft's Swin Transformer release, github.com/microsoft/Swin-Transformer); pass "
            "--set model.pretrained=PATH, or model.pretrained=none to train from scratch (far lower mIoU)")
    distributed.barrier(info)  # every process has checked before the first one writes
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)
    log = _RunLog(work_dir, info.is_main, rt.tensorboard, callback)
    if rt.threads and device.type == "cpu":
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed)

    train_set, val_set = build_datasets(config)
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
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.loss.class_weight is not None and len(config.loss.class_weight) != model.num_classes:
        raise ConfigError(f"loss.class_weight has {len(config.loss.class_weight)} values but the model predicts "
                          f"{model.num_classes} classes ({', '.join(train_set.class_names[:12])} ...)")
    dtype = autocast_dtype(rt.precision, device)
    optimizer = torch.optim.AdamW(param_groups(model, config.optim.weight_decay), lr=config.optim.lr,
                                  betas=config.optim.betas, eps=config.optim.eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = SeMaskLoss(config.loss.prior_weight, ohem_min_kept=config.loss.ohem_min_kept,
                         class_weight=config.loss.class_weight)

    start_step, best, history = 0, None, []
    evaluation: Optional[EvalResult] = None

    def emit(rec: dict[str, Any]) -> None:
        history.append(rec)
        log.record(rec)

    if resume_from is not None:
        state = load_training_state(resume_from, model, optimizer, scaler=scaler if scaler.is_enabled() else None,
                                    map_location=device, restore_rng=False)
        start_step = int(state.get("iteration", 0))
        best = (state.get("extra") or {}).get("best")
        history = _read_log(work_dir / LOG_FILE, start_step)
        changed = _diff(state.get("train_config") or {}, to_dict(config))
        if info.is_main:
            with atomic_path(work_dir / LOG_FILE) as tmp:  # drop records of steps after the checkpoint
                tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        log.print(f"resuming {work_dir} at step {start_step}/{config.schedule.iters}"
                  + (f"; config changed since the checkpoint: {'; '.join(changed)}" if changed else ""))
    elif config.model.pretrained:
        report = load_pretrained_backbone(model, config.model.pretrained)  # raises when mostly unloaded
        log.print(str(report))
        emit({"kind": "pretrained", "iter": 0, "source": config.model.pretrained, "layout": report.layout,
              "loaded_fraction": report.loaded_fraction, "loaded": len(report.loaded), "resized": report.resized,
              "missing": report.missing})
    if info.is_main:
        with atomic_path(work_dir / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(to_dict(config), indent=2) + "\n")

    module = model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = build_train_loader(train_set, TrainTransform(config.data.train_pipeline), rt.batch_size, rt.seed,
                                info.rank, info.world_size, start=start_step * accum * rt.batch_size,
                                num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    batches = _batches(loader, device, rt.channels_last)
    params = sum(p.numel() for p in module.parameters())
    log.print(f"{config.name}: {module.name} ({params / 1e6:.2f}M parameters, {module.num_classes} classes) on "
              f"{info.world_size} x {device}, {dtype or 'fp32'}; {len(train_set)} training / {len(val_set)} "
              f"validation images; {rt.global_batch} images per step = {rt.batch_size} x {info.world_size} "
              f"process(es) x {accum} accumulation step(s); {config.schedule.iters} steps")

    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.schedule.iters, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    # a resumed run's clock continues from its last record, so that "time" is the run's total
    run_start = time.perf_counter() - max((r.get("time", 0.0) for r in history), default=0.0)
    sums: dict[str, float] = {}
    window_start, data_time, window_steps = time.perf_counter(), 0.0, 0
    grad_norm: Optional[float] = None
    model.train()
    try:
        for step in range(start_step, config.schedule.iters):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            nonfinite = False
            for micro in range(accum):
                torch.manual_seed(sample_seed(rt.seed ^ DROPOUT_STREAM, step, info.rank * accum + micro))
                t0 = time.perf_counter()
                images, labels = next(batches)
                data_time += time.perf_counter() - t0
                sync = micro == accum - 1 or not info.distributed
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast(device, dtype):
                        out = model(images)
                        losses = loss_fn(out, labels)
                    scaler.scale(losses.total / accum).backward()
                terms = losses.as_dict()  # one host sync per micro-batch: small next to a segmentation step
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value / accum
                nonfinite |= not math.isfinite(terms["loss"])
            if info.distributed:  # every process stops together, before any of them steps
                flag = torch.tensor(float(nonfinite), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                nonfinite = bool(flag.item())
            if nonfinite:
                raise TrainingError(
                    f"the loss became non-finite at step {step + 1} (lr {lr:.3g}; last micro-batch: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                    + "). Lower optim.lr, set optim.clip_grad_norm (e.g. 1.0), or use train.precision=bf16/fp32 "
                    "instead of fp16; check the data for broken labels. The last checkpoint is untouched.")
            if config.optim.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm))
            scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window_steps += 1
            if bar is not None:
                bar.update(1)

            if done % rt.log_interval == 0 or done == config.schedule.iters:
                means = distributed.all_reduce_mean({k: v / window_steps for k, v in sums.items()}, info)
                elapsed = time.perf_counter() - window_start
                rec = {"kind": "train", "iter": done, "epoch": done * rt.global_batch / len(train_set),
                       **{k: means[k] for k in sorted(means)}, "lr": lr,
                       **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                       **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
                       "sec_per_iter": elapsed / window_steps, "data_sec": data_time / window_steps,
                       "images_per_s": rt.global_batch * window_steps / elapsed,
                       "peak_memory_mb": (peak_memory_bytes(device) or 0) / 2**20, "time": time.perf_counter() - run_start}
                emit(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                sums, data_time, window_steps, window_start = {}, 0.0, 0, time.perf_counter()

            last = done == config.schedule.iters
            if (rt.eval_interval and done % rt.eval_interval == 0) or last:
                evaluation = result = evaluate(
                    module, val_set, mode=config.eval.mode, test_config=config.data.test_pipeline,
                    crop_size=config.eval.crop_size, stride=config.eval.stride, max_images=config.eval.max_images,
                    progress=progress)
                module.train()
                rec = {"kind": "eval", "iter": done, "mIoU": result.mIoU, "mAcc": result.metrics["mAcc"],
                       "aAcc": result.metrics["aAcc"], "IoU": result.to_dict()["IoU"], "Acc": result.to_dict()["Acc"],
                       "eval_sec": result.seconds, "num_images": result.num_images,
                       "time": time.perf_counter() - run_start}
                is_best = best is None or rec["mIoU"] > best["mIoU"]
                if is_best:
                    best = {k: rec[k] for k in ("iter", "mIoU", "mAcc", "aAcc")}
                emit(rec)
                log.print(f"step {done}: mIoU {100 * rec['mIoU']:.2f}  mAcc {100 * rec['mAcc']:.2f}  aAcc "
                          f"{100 * rec['aAcc']:.2f}" + ("  (best)" if is_best else f"  (best {100 * best['mIoU']:.2f} "
                                                                                   f"at step {best['iter']})"))
                if is_best and info.is_main:
                    save_checkpoint(work_dir / BEST, module, iteration=done, train_config=to_dict(config),
                                    extra={"metrics": {k: rec[k] for k in ("mIoU", "mAcc", "aAcc")}})
                window_start = time.perf_counter()  # evaluation time is not training time
            if (rt.checkpoint_interval and done % rt.checkpoint_interval == 0) or last:
                if info.is_main:
                    save_checkpoint(work_dir / LATEST, module, optimizer=optimizer,
                                    scaler=scaler if scaler.is_enabled() else None, iteration=done,
                                    train_config=to_dict(config), extra={"best": best})
                window_start = time.perf_counter()
    except torch.OutOfMemoryError as exc:
        raise TrainingError(
            f"CUDA ran out of memory with train.batch_size={rt.batch_size} at "
            f"{tuple(config.data.train_pipeline.crop_size)} crops ({exc}). Try model.grad_checkpointing=true, "
            f"a smaller train.batch_size (the global batch {rt.global_batch} is kept by gradient accumulation), "
            "or train.precision=bf16.") from exc
    finally:
        if bar is not None:
            bar.close()
        log.close()
    distributed.barrier(info)
    module.eval()
    log.print(f"done: {config.schedule.iters} steps, {time.perf_counter() - run_start:.0f} s in all"
              + (f"; best mIoU {100 * best['mIoU']:.2f} at step {best['iter']}" if best else ""))
    return TrainResult(work_dir=work_dir, history=history, best=best, model=module, config=config,
                       evaluation=evaluation)

