"""A training schedule fitted to a time budget (SeMask, arXiv 2112.12782): `semask.train(..., minutes=N)` and
`semask demo --minutes N`.

The budget buys the config's own schedule, shortened or lengthened. `semask.engine.train` times a few probe steps on
a throwaway copy of the model and optimizer (`time_steps`) and the evaluation on a few validation images; `fit_steps`
gives the most steps whose training and evaluations fit in the time that is left, and `scale_schedule` sets
``schedule.iters`` to them with the warm-up and the evaluation and checkpoint intervals scaled in proportion. The
fitted config is the run's config (config.json, every checkpoint), so a resume continues it (`stored_schedule`)
instead of fitting again. Why it is built so: docs/design.md ("Engine").

    # 3 minutes, 0.27 s a step, 4 s an evaluation, a schedule of 1000 steps evaluated every 250 (4 evaluations):
    fit_steps(180.0, step_seconds=0.27, eval_seconds=4.0, config=config)   # -> 607 steps, evaluated every 152
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Any, Callable

from semask.engine.config import TrainConfig, apply_overrides
from semask.errors import UsageError, UsageTypeError

__all__ = ["MAX_MINUTES", "PROBE_WARMUP", "PROBE_STEPS", "PROBE_SHARE", "PROBE_EVAL_IMAGES", "FITTED_KEYS",
           "check_minutes", "evaluations", "scale_schedule", "fit_steps", "time_steps", "fit_budget",
           "stored_schedule"]

MAX_MINUTES = 7 * 24 * 60  # a week: a longer budget is a typo (seconds given as minutes), not a plan
PROBE_WARMUP = 2  # untimed probe steps (first-call costs: kernels chosen, memory allocated)
PROBE_STEPS = 8  # timed probe steps at most ...
PROBE_SHARE = 0.05  # ... and no more than this share of the budget (one timed step at least)
PROBE_EVAL_IMAGES = 4  # validation images timed to estimate an evaluation
# what the fit sets; a resume takes them from the run's stored config instead of fitting again
FITTED_KEYS = ("schedule.iters", "schedule.warmup_iters", "train.eval_interval", "train.checkpoint_interval")


def check_minutes(minutes: Any) -> float:
    """`minutes` as a float, checked: a finite number of minutes above 0 and at most `MAX_MINUTES`.

    Raises:
        UsageTypeError: not a number; UsageError: NaN, infinite, 0 or below, or above a week.
    """
    if isinstance(minutes, bool) or not isinstance(minutes, numbers.Real):
        raise UsageTypeError(f"minutes (--minutes) must be a number of minutes, got {minutes!r}")
    value = float(minutes)
    if not (math.isfinite(value) and 0 < value <= MAX_MINUTES):
        raise UsageError(f"minutes (--minutes) must be a time budget in minutes above 0 and at most {MAX_MINUTES} "
                         f"(a week), got {minutes!r}")
    return value


def _interval(interval: int, ratio: float) -> int:
    # rounded up, so that the scaled schedule evaluates (checkpoints) as often as the config's, not once more
    return 0 if interval == 0 else max(1, math.ceil(interval * ratio))


def evaluations(iters: int, eval_interval: int) -> int:
    """How many evaluations a run of `iters` steps makes: every `eval_interval` steps (0: none) and after the last."""
    if iters <= 0:
        return 0
    return iters // eval_interval + (iters % eval_interval != 0) if eval_interval else 1


def scale_schedule(config: TrainConfig, iters: int) -> TrainConfig:
    """`config` with ``schedule.iters = iters`` and its warm-up (rounded) and evaluation and checkpoint intervals
    (rounded up, at least 1; 0 stays 0) scaled by ``iters / schedule.iters``: the same schedule, shorter or longer."""
    ratio = iters / config.schedule.iters
    schedule = dataclasses.replace(config.schedule, iters=iters,
                                   warmup_iters=math.floor(config.schedule.warmup_iters * ratio + 0.5))
    runtime = dataclasses.replace(config.train, eval_interval=_interval(config.train.eval_interval, ratio),
                                  checkpoint_interval=_interval(config.train.checkpoint_interval, ratio))
    return dataclasses.replace(config, schedule=schedule, train=runtime)


def fit_steps(seconds: float, step_seconds: float, eval_seconds: float, config: TrainConfig) -> int:
    """The most steps whose training (``steps x step_seconds``) and evaluations (as many as `scale_schedule` makes
    of `config`'s schedule for that many steps, each ``eval_seconds``) take at most `seconds`; 0 if none do."""
    step_seconds = max(step_seconds, 1e-9)
    iters, interval = config.schedule.iters, config.train.eval_interval

    def cost(n: int) -> float:
        return n * step_seconds + evaluations(n, _interval(interval, n / iters)) * eval_seconds

    # from the most steps that one evaluation leaves room for, down to the first that fits with all of its
    # evaluations: the rounded intervals make the count of evaluations jump, so the cost is not monotone in the steps
    # (a scaled schedule never evaluates more often than the config's, so this is at most a few evaluations' worth)
    n = max(0, int((seconds - eval_seconds) // step_seconds))
    while n > 0 and cost(n) > seconds:
        n -= 1
    return n


def time_steps(step: Callable[[int], None], seconds: float,
               agree: Callable[[bool], bool] = bool) -> tuple[float, int]:
    """Seconds per call of ``step(i)``: `PROBE_WARMUP` untimed calls, then timed ones until `PROBE_STEPS` or
    `PROBE_SHARE` of `seconds` (at least one).

    Args:
        step: runs probe step ``i`` (it must wait for the device: the clock is read after it returns).
        seconds: the budget, for the probe's share of it.
        agree: turns this process's "stop now" into every process's (under torchrun, so that all take the same
            steps: `semask.engine.distributed.any_process`).

    Returns:
        (mean seconds per timed step, timed steps).
    """
    for i in range(PROBE_WARMUP):
        step(i)
    start, timed = time.perf_counter(), 0
    while True:
        step(PROBE_WARMUP + timed)
        timed += 1
        elapsed = time.perf_counter() - start
        if agree(timed >= PROBE_STEPS or elapsed >= PROBE_SHARE * seconds):
            return elapsed / timed, timed


def fit_budget(config: TrainConfig, minutes: float, seconds_left: float, step_seconds: float, probe_steps: int,
               eval_seconds: float) -> tuple[TrainConfig, dict[str, Any]]:
    """The config fitted to the budget, and its record for the log.

    Args:
        config: the config whose schedule is scaled.
        minutes: the whole budget.
        seconds_left: what is left of it for the steps and evaluations (after setting up and probing).
        step_seconds, probe_steps: the measured time of a step and over how many steps.
        eval_seconds: the estimated time of one evaluation.

    Returns:
        (fitted config, record): the record holds the budget, the measurements, the evaluations and the fitted
        ``iters``, ``warmup_iters``, ``eval_interval``, ``checkpoint_interval`` and ``from_iters`` (the config's).

    Raises:
        UsageError: not even one step fits; the message says how long a budget is needed.
    """
    iters = fit_steps(seconds_left, step_seconds, eval_seconds, config)
    if iters < 1:
        needed = (minutes * 60 - seconds_left + step_seconds + eval_seconds) / 60
        raise UsageError(f"minutes (--minutes) {minutes:g}: not even one training step fits: "
                         f"{max(seconds_left, 0):.0f} s are left after setting up and measuring, and here a step "
                         f"takes {step_seconds:.2f} s and an evaluation about {eval_seconds:.1f} s; give at least "
                         f"{math.ceil(needed * 10 - 1e-9) / 10:g} minutes")
    fitted = scale_schedule(config, iters)
    record = {"minutes": minutes, "seconds_left": seconds_left, "step_seconds": step_seconds,
              "probe_steps": probe_steps, "eval_seconds": eval_seconds,
              "evaluations": evaluations(iters, fitted.train.eval_interval), "iters": iters,
              "warmup_iters": fitted.schedule.warmup_iters, "eval_interval": fitted.train.eval_interval,
              "checkpoint_interval": fitted.train.checkpoint_interval, "from_iters": config.schedule.iters}
    return fitted, record


def stored_schedule(config: TrainConfig, stored: dict[str, Any]) -> TrainConfig:
    """`config` with the `FITTED_KEYS` of a stored config (`semask.engine.config.to_dict` form: a checkpoint's
    ``train_config``): what a resume of a budgeted run continues."""
    pairs = []
    for key in FITTED_KEYS:
        section, name = key.split(".")
        if name in (stored.get(section) or {}):
            pairs.append((key, stored[section][name]))
    return apply_overrides(config, pairs)
