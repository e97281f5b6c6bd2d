"""What a SeMask FPN training run (arXiv 2112.12782) keeps, and the state it keeps it from: the `Run` the loop of
`semask.engine.train` works with, its evaluations (a log record each, best.pth for the best), its checkpoints
(latest.pth, and iter_NNNNNN.pth snapshots every ``train.snapshot_interval`` steps) and the resume from latest.pth.

The file names and the log are `semask.engine.rundir`'s; why a resumed run computes exactly the steps of an
uninterrupted one is in docs/design.md ("Engine: training, evaluation, inference").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from semask.checkpoint import load_training_state, save_checkpoint
from semask.data.datasets import SegmentationDataset
from semask.engine import distributed
from semask.engine.budget import stored_schedule
from semask.engine.config import TrainConfig, to_dict
from semask.engine.evaluate import EvalResult, evaluate
from semask.engine.losses import SeMaskLoss
from semask.engine.rundir import BEST, LATEST, RunLog, records_upto, snapshot_name

__all__ = ["Run", "resume_run", "evaluate_on_val", "record_evaluation", "scores_priors", "save_snapshot", "save_latest"]


@dataclass
class Run:
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


# --------------------------------------------------------------------------------------------- resume
def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def resume_run(run: Run, checkpoint: Path, keep_schedule: bool) -> None:
    """Restore weights, optimizer, scaler, step and best evaluation; keep the log up to the checkpoint's step. With
    ``keep_schedule`` (a time budget), continue the schedule stored in the checkpoint instead of fitting it again."""
    state = load_training_state(checkpoint, run.module, run.optimizer,
                                scaler=run.scaler if run.scaler.is_enabled() else None,
                                map_location=run.info.device, restore_rng=False)
    run.start_step = int(state.get("iteration", 0))
    run.best = (state.get("extra") or {}).get("best")
    run.history = records_upto(run.work_dir, run.start_step)
    if keep_schedule:
        run.config = stored_schedule(run.config, state.get("train_config") or {})
    changed = _diff(state.get("train_config") or {}, to_dict(run.config))
    # drop what the steps after the checkpoint logged: they are redone
    run.log.rewind(run.history, run.start_step, (state.get("extra") or {}).get("text_log_bytes"))
    run.log.print(f"resuming {run.work_dir} at step {run.start_step}/{run.config.schedule.iters}"
                  + ("; the time budget does not refit a resumed run: it continues the stored schedule"
                     if keep_schedule else "")
                  + (f"; config changed since the checkpoint: {'; '.join(changed)}" if changed else ""))


# --------------------------------------------------------------------------------------------- evaluations
def evaluate_on_val(run: Run, module: nn.Module, max_images: Optional[int], progress: bool) -> EvalResult:
    """`module` on the validation split with the run's protocol (the first `max_images` images)."""
    config = run.config
    result = evaluate(module, run.val_set, mode=config.eval.mode, test_config=config.data.test_pipeline,
                      crop_size=config.eval.crop_size, stride=config.eval.stride, max_images=max_images,
                      progress=progress, prior_metrics=scores_priors(config))
    module.train()
    return result


def record_evaluation(run: Run, done: int, progress: bool) -> None:
    """Validate after step ``done``, log the result and save best.pth when it is the best so far."""
    config, module = run.config, run.module
    distributed.broadcast_buffers(module, run.info)  # every process scores the weights best.pth / latest.pth hold
    run.evaluation = result = evaluate_on_val(run, module, config.eval.max_images, progress)
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


def scores_priors(config: TrainConfig) -> bool:
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


# --------------------------------------------------------------------------------------------- checkpoints
def save_snapshot(run: Run, done: int) -> None:
    """Write iter_NNNNNN.pth: the weights after step ``done`` with the model's config, classes and the step (no
    optimizer state; `semask.load_checkpoint` reads it). A resume rewrites the snapshots of the steps it redoes
    with the weights it computes (the same ones: docs/design.md, "Engine"); earlier ones are never touched."""
    if run.info.is_main:
        save_checkpoint(run.work_dir / snapshot_name(done), run.module, iteration=done,
                        train_config=to_dict(run.config))


def save_latest(run: Run, done: int) -> None:
    """Write latest.pth (weights, optimizer, scaler, step, best evaluation): what a resume continues from."""
    if run.info.is_main:
        scaler = run.scaler if run.scaler.is_enabled() else None
        # train.log's size: a resume from this checkpoint cuts the log back to it
        save_checkpoint(run.work_dir / LATEST, run.module, optimizer=run.optimizer, scaler=scaler, iteration=done,
                        train_config=to_dict(run.config),
                        extra={"best": run.best, "text_log_bytes": run.log.text_size()})
