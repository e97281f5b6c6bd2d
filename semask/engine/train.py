"""Training SeMask FPN (arXiv 2112.12782): one readable iteration loop, on the CPU, one GPU or many.

    from semask.engine.config import get_preset
    result = semask.train(get_preset("toy"), work_dir="runs/toy")
    result.best["mIoU"], result.history[-1]

    torchrun --nproc_per_node=2 -m semask train semask_tiny_ade20k --work-dir runs/tiny \
        --set data.root=/data/ADEChallengeData2016 model.pretrained=swin_tiny_patch4_window7_224.pth

Each step, in nanoGPT's order: set the learning rate -> for each accumulation step: batch, forward (under
autocast), loss, backward -> unscale and clip -> optimizer step -> log -> evaluate and checkpoint. Everything the
loop uses is built from the `TrainConfig` before it starts; there are no hooks. What the run directory holds is
`semask.engine.rundir`'s, the evaluations and checkpoints the loop writes into it `semask.engine.records`'; why a
resumed run computes exactly the steps of an uninterrupted one is in docs/design.md ("Engine: training, evaluation,
inference"). Each evaluation also scores the semantic priors of its own forward (``eval.prior_metrics``), and
``train.snapshot_interval`` keeps the weights every N steps, so that what the semantic layers learn can be followed
over the run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from semask.checkpoint import is_url, load_pretrained_backbone
from semask.data.loader import build_train_loader, sample_seed
from semask.data.transforms import TrainTransform
from semask.device import (autocast, autocast_dtype, kept_rng_state, peak_memory_bytes, precision_record,
                           precision_text, seed_everything)
from semask.engine import distributed
from semask.engine.budget import PROBE_EVAL_IMAGES, check_minutes, fit_budget, time_steps
from semask.engine.build import (build_datasets, build_model, build_optimizer, learning_rate, model_from_config,
                                 param_groups)
from semask.engine.config import ConfigError, TrainConfig, to_dict, validate
from semask.engine.evaluate import EvalResult, data_inputs
from semask.engine.losses import SeMaskLoss
from semask.engine.memory import check_step_fits, out_of_memory_error
from semask.engine.records import (Run, evaluate_on_val, record_evaluation, resume_run, save_latest, save_snapshot,
                                   scores_priors)
from semask.engine.rundir import RunClaim, RunLog, TrainingError, check_work_dir, planned_snapshots
from semask.io import check_output_files, check_output_folder
from semask.model.segmentor import SeMaskFPN

# build_datasets, model_from_config, param_groups and learning_rate live in semask.engine.build; kept here too
__all__ = ["TrainingError", "TrainResult", "build_datasets", "model_from_config", "param_groups",
           "learning_rate", "train"]

DROPOUT_STREAM = 0x5EED  # salt of the per-step dropout/drop-path seeds (the data use the plain seed)


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        work_dir: the run directory.
        history: every log record of the run (``kind`` "run", "pretrained", "train" or "eval"), as in ``log.jsonl``.
        best: the evaluation record with the highest mIoU (None when no evaluation ran).
        model: the trained model (the last step's weights), in eval mode.
        config: the resolved config that ran (with a time budget, the fitted one).
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


# --------------------------------------------------------------------------------------------- set-up
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


def _load_pretrained(run: Run) -> None:
    """Load the ImageNet Swin weights of ``model.pretrained`` into the backbone and log what was loaded."""
    source = run.config.model.pretrained
    report = load_pretrained_backbone(run.module, source)  # raises when mostly unloaded
    run.log.print(str(report))
    run.emit({"kind": "pretrained", "iter": 0, "source": source, "layout": report.layout,
              "loaded_fraction": report.loaded_fraction, "loaded": len(report.loaded), "resized": report.resized,
              "missing": report.missing})


def _parallel(module: nn.Module, info: distributed.DistInfo) -> nn.Module:
    """`module`, wrapped in DDP when there are several processes."""
    if not info.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def _train_batches(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's training batches from the run's step on (the data order is the seed's, see the loader)."""
    config, rt, info = run.config, run.config.train, run.info
    loader = build_train_loader(run.train_set, TrainTransform(config.data.train_pipeline), rt.batch_size, rt.seed,
                                info.rank, info.world_size, start=run.start_step * run.accum * rt.batch_size,
                                num_workers=config.data.num_workers, pin_memory=info.device.type == "cuda")
    return _batches(loader, info.device, rt.channels_last)


def _setup(config: TrainConfig, work_dir: Path, accum: int, resume_from: Optional[Path], claim: RunClaim,
           callback: Optional[Callable[[dict[str, Any]], None]], info: distributed.DistInfo,
           given: Optional[nn.Module], minutes: Optional[float], called: float) -> Run:
    """Everything the loop uses, in a fixed order (the seed is set before the model draws its weights); with a time
    budget, the schedule fitted to it (`_fit_budget`). Nothing is written to the run directory yet (`RunLog` keeps it
    back until the first step is done)."""
    rt, device = config.train, info.device
    log = RunLog(work_dir, info.is_main, rt.tensorboard, callback, defer=True)
    for note in claim.notes:
        log.print(note)
    if rt.threads and device.type == "cpu":
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed)
    train_set, val_set = build_datasets(config)
    module = build_model(config, given, train_set, val_set, info)
    check_step_fits(config, module, device)
    dtype = autocast_dtype(rt.precision, device)
    optimizer, scaler = build_optimizer(config, module, device, dtype)
    loss_fn = SeMaskLoss(config.loss.prior_weight, ignore_index=config.data.train_pipeline.ignore_index,
                         ohem_min_kept=config.loss.ohem_min_kept, class_weight=config.loss.class_weight)
    run = Run(config, info, work_dir, log, module, optimizer, scaler, loss_fn, dtype, accum, train_set, val_set)
    precision = precision_record(rt.precision, device)
    if resume_from is not None:
        resume_run(run, resume_from, keep_schedule=minutes is not None)
    else:  # a new run: what it runs in, and with a budget the schedule fitted to it, head the log
        record = {"kind": "run", "iter": 0, "device": str(device), "precision": precision}
        if minutes is not None:
            record["budget"] = _fit_budget(run, minutes, called)
        run.emit(record)
        if config.model.pretrained:
            _load_pretrained(run)
    log.write_config(to_dict(run.config))

    run.model = _parallel(module, info)
    run.batches = _train_batches(run)
    if config.eval.prior_metrics and not scores_priors(config):
        log.print("eval.prior_metrics: the semantic priors are scored in whole mode only (sliding windows have no one "
                  "prior per image); the evaluation records of this run (eval.mode=slide) leave them out")
    params = sum(p.numel() for p in module.parameters())
    log.print(f"{config.name}: {module.name} ({params / 1e6:.2f}M parameters, {module.num_classes} classes) on "
              f"{info.world_size} x {device}, precision {precision_text(precision)}; {len(train_set)} training / "
              f"{len(val_set)} validation images; {rt.global_batch} images per step = {rt.batch_size} x "
              f"{info.world_size} process(es) x {accum} accumulation step(s); {run.config.schedule.iters} steps")
    return run


def _fit_budget(run: Run, minutes: float, called: float) -> dict[str, Any]:
    """Fit ``run.config``'s schedule to `minutes` counted from `called` (`semask.engine.budget`) and print how.

    The probe steps run on a throwaway copy of the model, optimizer and data iterator, with the random generators
    given back afterwards, so the run itself stays a function of its config and seed. Under torchrun every process
    probes (they share the machine as in the run) and the slowest one's times fit one schedule for all.

    Returns:
        The budget record of the log (`semask.engine.budget.fit_budget`).
    """
    info, device = run.info, run.info.device
    with kept_rng_state(device):
        probe = dataclasses.replace(run, module=copy.deepcopy(run.module))
        probe.optimizer, probe.scaler = build_optimizer(run.config, probe.module, device, run.dtype)
        probe.model, probe.batches = _parallel(probe.module, info).train(), _train_batches(run)

        def step(i: int) -> None:
            _optimizer_step(probe, i % run.config.schedule.iters, _Window())
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        try:
            step_seconds, steps = time_steps(step, minutes * 60, lambda stop: distributed.any_process(stop, info))
            images = min(run.config.eval.max_images or len(run.val_set), len(run.val_set))
            probed = min(PROBE_EVAL_IMAGES, images)
            eval_seconds = evaluate_on_val(probe, probe.module, probed, progress=False).seconds / probed * images
        finally:
            probe.batches.close()  # its loader's workers end here
    step_seconds, eval_seconds, elapsed = distributed.all_reduce_max(
        [step_seconds, eval_seconds, time.perf_counter() - called], info)
    run.config, record = fit_budget(run.config, minutes, minutes * 60 - elapsed, step_seconds, steps, eval_seconds)
    where = "this CPU" if device.type == "cpu" and not info.distributed else f"{info.world_size} x {device}"
    run.log.print(f"about {record['iters']} steps fit in {minutes:g} minutes on {where} ({step_seconds:.2f} s per step "
                  f"measured over {steps} steps; {record['evaluations']} evaluations of about {eval_seconds:.1f} s): "
                  f"schedule.iters={record['iters']} warmup_iters={record['warmup_iters']} "
                  f"train.eval_interval={record['eval_interval']} checkpoint_interval={record['checkpoint_interval']}"
                  f" (the config's {record['from_iters']}-step schedule, scaled)")
    return record


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


def _optimizer_step(run: Run, step: int, window: _Window) -> tuple[float, Optional[float]]:
    """Optimizer step ``step`` (0-based): set the learning rate -> for each accumulation step: batch, forward (under
    autocast), loss, backward -> stop if the loss is not finite -> unscale and clip -> step.

    Returns:
        (learning rate, gradient norm before clipping, or None without clipping).
    """
    config, info, model, accum, rt = run.config, run.info, run.model, run.accum, run.config.train
    optimizer, scaler = run.optimizer, run.scaler
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
    grad_norm = None
    if config.optim.clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm))
    scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


def _train_record(run: Run, window: _Window, done: int, lr: float, grad_norm: Optional[float]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, work_dir: Union[str, Path], *, resume: Union[bool, str] = False,
          callback: Optional[Callable[[dict[str, Any]], None]] = None, progress: bool = True,
          model: Optional[nn.Module] = None, minutes: Optional[float] = None) -> TrainResult:
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
        minutes: a time budget for this call (setting up, training and evaluating): the config's schedule is
            shortened or lengthened to the steps that fit, measured on a few probe steps, with its warm-up and
            evaluation and checkpoint intervals scaled in proportion (`semask.engine.budget`); the fitted config is
            the run's (config.json, checkpoints, ``TrainResult.config``) and the log's ``run`` record holds the fit.
            A resume continues the stored schedule without fitting again. None (default): the config's schedule.

    Returns:
        A `TrainResult` with the history, the best evaluation record, the trained model and the config that ran.

    Raises:
        TrainingError: non-finite loss (with the step and loss terms), CUDA or CPU out of memory (with what to
            change), an existing run in ``work_dir`` without ``resume``, or no ``latest.pth`` with ``resume``.
        RunLockedError: another run holds ``work_dir`` (its host and process are named).
        FileNotFoundError: a dataset root or split that does not exist (the message shows the expected layout).
        ConfigError: a setting out of its range, settings that do not fit together (e.g. a global batch the
            processes cannot reach), or a step whose memory estimate exceeds the device's.
        UsageError: ``minutes`` not above 0, not finite or above a week, or too short for one step.
    """
    called = time.perf_counter()
    minutes = None if minutes is None else check_minutes(minutes)
    info = distributed.setup(config.train.device)
    try:
        return _train(config, Path(work_dir), resume, callback, progress, info, model, minutes, called)
    finally:
        distributed.cleanup(info)


def _train(config: TrainConfig, work_dir: Path, resume: Union[bool, str],
           callback: Optional[Callable[[dict[str, Any]], None]], progress: bool, info: distributed.DistInfo,
           given: Optional[nn.Module], minutes: Optional[float], called: float) -> TrainResult:
    validate(config)  # the sections are mutable: check the settings as they are now
    accum, resume_from, claim = _claim_work_dir(config, work_dir, resume, info)
    run = None
    try:
        try:
            run = _setup(config, work_dir, accum, resume_from, claim, callback, info, given, minutes, called)
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
        run.log.print(f"done: {run.config.schedule.iters} steps, {time.perf_counter() - run.started:.0f} s in all"
                      + (f"; best mIoU {100 * run.best['mIoU']:.2f} at step {run.best['iter']}" if run.best else ""))
    finally:  # errors and KeyboardInterrupt too; a run that never did a step leaves no folder it created
        claim.release(started=run is not None and run.log.committed)
    return TrainResult(work_dir=work_dir, history=run.history, best=run.best, model=run.module, config=run.config,
                       evaluation=run.evaluation)


def _loop(run: Run, progress: bool) -> None:
    """Steps ``run.start_step`` .. ``schedule.iters`` - 1, each: `_optimizer_step` -> log -> evaluate / checkpoint."""
    config, info, rt, iters = run.config, run.info, run.config.train, run.config.schedule.iters
    bar = distributed.progress_bar(iters, "train", "step", progress and info.is_main, initial=run.start_step)
    # a resumed run's clock continues from its last record, so that "time" is the run's total
    run.started = time.perf_counter() - max((r.get("time", 0.0) for r in run.history), default=0.0)
    window = _Window()
    run.model.train()
    try:
        for step in range(run.start_step, iters):
            lr, grad_norm = _optimizer_step(run, step, window)
            done = step + 1
            run.log.commit()  # the first step is done: from now on the run directory is written
            window.steps += 1
            bar.update(1)

            if done % rt.log_interval == 0 or done == iters:
                rec = _train_record(run, window, done, lr, grad_norm)
                run.emit(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                window.reset()
            if (rt.eval_interval and done % rt.eval_interval == 0) or done == iters:
                record_evaluation(run, done, progress)
                window.start = time.perf_counter()  # evaluation time is not training time
            # the snapshot before latest.pth: a resume from latest.pth never misses a snapshot
            if rt.snapshot_interval and done % rt.snapshot_interval == 0:
                save_snapshot(run, done)
                window.start = time.perf_counter()
            if (rt.checkpoint_interval and done % rt.checkpoint_interval == 0) or done == iters:
                save_latest(run, done)
                window.start = time.perf_counter()
    finally:
        bar.close()
