"""A schedule fitted to a time budget: the arithmetic (known answers), the probe, a real budgeted run (recorded, stopped
at the fitted steps, a function of its fitted config alone, resumed without fitting again) and `semask demo --minutes`.

The real runs make the probe report 2 s more per step than it measured, so that a handful of steps fit in a few
seconds of budget on any machine (the fitted number still comes from the probe's real measurement).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import semask
import semask.engine.train as train_module
from semask.apps.cli import main as cli_main
from semask.checkpoint import read_checkpoint_file
from semask.engine import budget
from semask.engine.budget import (MAX_MINUTES, check_minutes, evaluations, fit_budget, fit_steps, scale_schedule,
                                  stored_schedule, time_steps)
from semask.engine.config import apply_overrides, get_preset, to_dict
from semask.errors import UsageError, UsageTypeError
from helpers import tiny_overrides

SLOWER = 2.0  # seconds the probe adds to its measured step in the real runs below


def _shape(**extra) -> semask.engine.config.TrainConfig:
    """A config whose schedule is the shape the budget scales: 1000 steps, warm-up 50, evaluations every 250."""
    values = {"schedule.iters": 1000, "schedule.warmup_iters": 50, "train.eval_interval": 250,
              "train.checkpoint_interval": 250, **extra}
    return apply_overrides(get_preset("toy"), [f"{k}={v}" for k, v in values.items()])


@pytest.fixture
def slower_probe(monkeypatch) -> None:
    real = train_module.time_steps

    def probe(step, seconds, agree=bool):
        measured, steps = real(step, seconds, agree)  # the probe steps really run
        return measured + SLOWER, steps

    monkeypatch.setattr(train_module, "time_steps", probe)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- arithmetic
def test_check_minutes() -> None:
    assert check_minutes(3) == 3.0 and check_minutes(0.25) == 0.25 and check_minutes(MAX_MINUTES) == MAX_MINUTES
    for bad in (0, -1, float("nan"), float("inf"), MAX_MINUTES + 1, 1e12):
        with pytest.raises(UsageError, match=r"minutes \(--minutes\) must be a time budget in minutes above 0"):
            check_minutes(bad)
    for bad in ("3", True, [3]):
        with pytest.raises(UsageTypeError, match=r"minutes \(--minutes\) must be a number"):
            check_minutes(bad)


def test_evaluations_count_the_intervals_and_the_last_step() -> None:
    assert evaluations(1000, 250) == 4 and evaluations(999, 250) == 4 and evaluations(1001, 250) == 5
    assert evaluations(10, 0) == 1 and evaluations(3, 5) == 1 and evaluations(0, 5) == 0


def test_scale_schedule_keeps_the_shape() -> None:
    config = _shape()
    fitted = scale_schedule(config, 640)
    assert (fitted.schedule.iters, fitted.schedule.warmup_iters) == (640, 32)
    assert (fitted.train.eval_interval, fitted.train.checkpoint_interval) == (160, 160)
    assert evaluations(640, 160) == evaluations(1000, 250) == 4
    short = scale_schedule(config, 10)  # 0.5 and 2.5 rounded: warm-up up to 1 step, intervals up to 3
    assert (short.schedule.iters, short.schedule.warmup_iters, short.train.eval_interval) == (10, 1, 3)
    assert evaluations(10, 3) == 4
    longer = scale_schedule(config, 2000)
    assert (longer.schedule.warmup_iters, longer.train.eval_interval,
            longer.train.checkpoint_interval) == (100, 500, 500)
    assert scale_schedule(_shape(**{"train.eval_interval": 0}), 10).train.eval_interval == 0  # only at the end
    # everything else is the config's
    same = lambda c: {k: v for k, v in to_dict(c).items() if k not in ("schedule", "train")}  # noqa: E731
    assert same(fitted) == same(config) and fitted.schedule.warmup_ratio == config.schedule.warmup_ratio
    assert fitted.train.log_interval == config.train.log_interval and fitted.train.seed == config.train.seed


def test_fit_steps_known_answers() -> None:
    config = _shape()
    # 3 minutes, 0.27 s a step, 4 s an evaluation: (180 - 4 x 4) / 0.27 = 607.4 steps, evaluated every 152
    assert fit_steps(180.0, 0.27, 4.0, config) == 607
    cost = lambda n: n * 0.27 + evaluations(n, math.ceil(250 * n / 1000)) * 4.0  # noqa: E731
    assert cost(607) <= 180.0 < cost(608)
    # 100 s, 1 s a step, 10 s an evaluation: 60 steps and 4 evaluations every 15 steps fill it exactly
    assert fit_steps(100.0, 1.0, 10.0, config) == 60
    # evaluated only at the end: one evaluation
    assert fit_steps(100.0, 1.0, 10.0, _shape(**{"train.eval_interval": 0})) == 90
    # a schedule of 10 steps evaluated every 3 (4 evaluations): 9 steps are evaluated 3 times (every 3), 10 steps 4
    # times (every 3), 17 steps 3 times (every 6), 18 steps 3 times (every 6): the most that fit are 17, not 9
    small = _shape(**{"schedule.iters": 10, "schedule.warmup_iters": 1, "train.eval_interval": 3})
    cost = lambda n: n + evaluations(n, math.ceil(3 * n / 10)) * 10.0  # noqa: E731
    assert [cost(n) for n in (9, 10, 17, 18)] == [39.0, 50.0, 47.0, 48.0]
    assert fit_steps(47.0, 1.0, 10.0, small) == 17
    assert fit_steps(5.0, 1.0, 10.0, config) == 0  # one step needs its evaluation: nothing fits


def test_the_scaled_schedule_never_evaluates_more_often_than_the_configs() -> None:
    for iters in (1, 7, 10, 100, 1000):
        for interval in (0, 1, 3, 7, 250, 2000):
            config = _shape(**{"schedule.iters": iters, "schedule.warmup_iters": 0, "train.eval_interval": interval,
                               "train.checkpoint_interval": interval})
            for n in (1, 2, 5, 13, 99, 640, 5000):
                assert evaluations(n, scale_schedule(config, n).train.eval_interval) <= evaluations(iters, interval)


def test_fit_budget_records_the_fit_and_refuses_a_budget_too_short() -> None:
    fitted, record = fit_budget(_shape(), 3.0, 180.0, 0.27, 8, 4.0)
    assert fitted.schedule.iters == record["iters"] == 607 and record["from_iters"] == 1000
    assert record == {"minutes": 3.0, "seconds_left": 180.0, "step_seconds": 0.27, "probe_steps": 8,
                      "eval_seconds": 4.0, "evaluations": 4, "iters": 607, "warmup_iters": 30, "eval_interval": 152,
                      "checkpoint_interval": 152, "from_iters": 1000}
    with pytest.raises(UsageError, match=r"minutes \(--minutes\) 0.2: not even one training step fits: 5 s are left "
                                         r".* a step takes 1.00 s and an evaluation about 10.0 s; give at least 0.3 "
                                         "minutes"):  # 7 s used, 11 s needed: 18 s
        fit_budget(_shape(), 0.2, 5.0, 1.0, 1, 10.0)


def test_time_steps_warms_up_then_times_within_its_share(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
    calls = []

    def step(i: int) -> None:
        calls.append(i)
        now[0] += 0.5

    assert time_steps(step, seconds=1000.0) == (0.5, budget.PROBE_STEPS)
    assert calls == list(range(budget.PROBE_WARMUP + budget.PROBE_STEPS))
    calls.clear()
    assert time_steps(step, seconds=10.0) == (0.5, 1)  # 5% of 10 s is one step's 0.5 s
    assert len(calls) == budget.PROBE_WARMUP + 1
    votes = []
    assert time_steps(step, 1000.0, agree=lambda stop: votes.append(stop) or True) == (0.5, 1)  # another process
    assert votes == [False]                                                                     # stopped: so does this


def test_stored_schedule_takes_the_fitted_keys_only() -> None:
    fitted = scale_schedule(_shape(), 40)
    resumed = stored_schedule(_shape(**{"optim.lr": 0.01}), to_dict(fitted))
    assert (resumed.schedule.iters, resumed.schedule.warmup_iters) == (40, 2)
    assert (resumed.train.eval_interval, resumed.train.checkpoint_interval) == (10, 10)
    assert resumed.optim.lr == 0.01  # not one of the fitted keys: the config's
    assert stored_schedule(_shape(), {}).schedule.iters == 1000


def test_the_probe_draws_no_number_the_run_would_draw() -> None:
    import random

    import numpy as np

    from semask.device import kept_rng_state

    def draws() -> tuple:
        return torch.rand(2).tolist(), random.random(), np.random.rand()

    semask.device.seed_everything(3)
    with kept_rng_state(torch.device("cpu")):
        inside = draws()
        torch.manual_seed(99)  # the probe reseeds per step, as the loop does
    after = draws()
    semask.device.seed_everything(3)
    assert after == draws() == inside


# --------------------------------------------------------------------------------------------- real runs
def _budget_config(root) -> semask.engine.config.TrainConfig:
    return apply_overrides(get_preset("toy"), tiny_overrides(root, **{
        "schedule.iters": 100, "schedule.warmup_iters": 10, "train.eval_interval": 50, "train.checkpoint_interval": 50,
        "train.log_interval": 1, "eval.max_images": 2, "train.precision": "fp32"}))


def test_a_budgeted_run_is_recorded_stops_at_the_fitted_steps_and_resumes_without_refitting(
        tiny_toy_root, tmp_path, slower_probe) -> None:
    run = tmp_path / "run"
    config = _budget_config(tiny_toy_root)
    result = semask.train(config, run, minutes=0.3, progress=False)
    fit = result.history[0]["budget"]
    n = fit["iters"]
    assert n >= 1 and result.history[0]["kind"] == "run" and fit["minutes"] == 0.3 and fit["from_iters"] == 100
    assert fit["step_seconds"] > SLOWER and 1 <= fit["probe_steps"] <= budget.PROBE_STEPS and fit["eval_seconds"] > 0
    # the fitted schedule is the run's: the result, config.json, the checkpoint; the run stopped there
    c = result.config
    assert (c.schedule.iters, c.schedule.warmup_iters) == (n, math.floor(10 * n / 100 + 0.5))
    assert (c.train.eval_interval, c.train.checkpoint_interval) == (math.ceil(50 * n / 100),) * 2
    assert (fit["warmup_iters"], fit["eval_interval"]) == (c.schedule.warmup_iters, c.train.eval_interval)
    assert json.loads((run / "config.json").read_text())["schedule"]["iters"] == n
    latest = read_checkpoint_file(run / "latest.pth")
    assert latest["iteration"] == n and latest["train_config"]["schedule"]["iters"] == n
    records = _records(run)
    assert records == result.history and [r["iter"] for r in records if r["kind"] == "train"] == list(range(1, n + 1))
    assert len([r for r in records if r["kind"] == "eval"]) == fit["evaluations"]
    text = (run / "train.log").read_text()
    assert text.count("steps fit in") == 1 and f"about {n} steps fit in 0.3 minutes on this CPU (" in text
    # the probe left no trace: the fitted config trained without a budget computes the same weights
    plain = semask.train(result.config, tmp_path / "plain", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), result.model.state_dict().values()))
    assert [r for r in plain.history if r["kind"] == "run"][0].get("budget") is None
    # a resume continues the stored schedule, whatever the schedule of the config it is given, and fits nothing
    again = semask.train(config, run, resume=True, minutes=0.3, progress=False)
    assert again.config.schedule.iters == n and again.config.train.eval_interval == c.train.eval_interval
    text = (run / "train.log").read_text()
    assert text.count("steps fit in") == 1 and "does not refit a resumed run" in text
    assert [r for r in _records(run) if r["kind"] == "run"] == [result.history[0]]


def test_a_bad_budget_is_refused_before_any_work(tiny_toy_root, tmp_path) -> None:
    config = _budget_config(tiny_toy_root)
    for bad in (0, -2.5, float("nan")):
        with pytest.raises(UsageError, match=r"--minutes"):
            semask.train(config, tmp_path / "run", minutes=bad, progress=False)
    assert not (tmp_path / "run").exists()


def test_demo_minutes_is_parsed_fitted_and_recorded(tiny_toy_root, tmp_path, slower_probe, capsys) -> None:
    overrides = [o for o in tiny_overrides(tiny_toy_root, **{"eval.max_images": 2})
                 if not o.startswith("schedule.iters=")]
    demo = tmp_path / "demo"
    assert cli_main(["demo", "--work-dir", str(demo), "--data-root", str(tiny_toy_root), "--no-progress",
                     "--minutes", "0.3", "--set", *overrides]) == 0
    record = json.loads((demo / "demo.json").read_text())
    fit = record["budget"]
    assert record["minutes"] == 0.3 and fit["minutes"] <= 0.3 and fit["from_iters"] == get_preset("toy").schedule.iters
    assert record["steps"] == fit["iters"] == record["config"]["schedule"]["iters"] >= 1
    assert record["precision"]["setting"] == "auto" and record["precision"]["autocast"] in ("fp32", "bf16")
    assert f"about {fit['iters']} steps fit in" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "0"], "minutes (--minutes) must be a time budget in minutes above 0"),
    (["--minutes", "nan"], "minutes (--minutes) must be a time budget"),
    (["--minutes", "-3"], "minutes (--minutes) must be a time budget"),
    (["--minutes", "1e9"], "minutes (--minutes) must be a time budget in minutes above 0 and at most 10080 (a "
                           "week), got 1000000000.0"),
    (["--minutes", "3", "--set", "schedule.iters=5"], "--minutes 3 sets schedule.iters to the steps that fit; leave "
                                                      "out --set schedule.iters=5"),
])
def test_demo_refuses_a_bad_budget_before_any_work(tmp_path, capsys, argv, message) -> None:
    status = cli_main(["demo", "--work-dir", str(tmp_path / "demo"), "--data-root", str(tmp_path / "toy"),
                       "--no-progress", *argv])
    err = capsys.readouterr().err
    assert status == 2 and f"semask demo: error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "toy").exists()
    with pytest.raises(SystemExit):  # not a number: argparse's own usage error (exit status 2)
        cli_main(["demo", "--minutes", "three"])


@pytest.mark.slow
def test_under_torchrun_every_process_fits_the_same_schedule(tiny_toy_root, tmp_path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_toy_root, **{"train.batch_size": 1, "train.global_batch": 2,
                                                 "schedule.iters": 100, "train.eval_interval": 50,
                                                 "train.checkpoint_interval": 50, "eval.max_images": 2})
    script = tmp_path / "budgeted.py"
    script.write_text(
        "import json, os\n"
        "import semask\n"
        "from semask.engine.config import apply_overrides, get_preset\n"
        f"config = apply_overrides(get_preset('toy'), {overrides!r})\n"
        f"result = semask.train(config, {str(run)!r}, minutes=0.4, progress=False)\n"
        "c = result.config\n"
        f"out = {str(tmp_path)!r} + '/fitted-' + os.environ['RANK'] + '.json'\n"
        "open(out, 'w').write(json.dumps([c.schedule.iters, c.schedule.warmup_iters, c.train.eval_interval, "
        "c.train.checkpoint_interval]))\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # each worker writes its own file: on a shared stdout, unbuffered (PYTHONUNBUFFERED) prints interleave mid-line
    fitted = [json.loads((tmp_path / f"fitted-{rank}.json").read_text()) for rank in (0, 1)]
    assert fitted[0] == fitted[1], fitted  # one schedule for both processes
    records = _records(run)
    fit = records[0]["budget"]
    assert fit["iters"] == fitted[0][0] == json.loads((run / "config.json").read_text())["schedule"]["iters"]
    assert [r["iter"] for r in records if r["kind"] == "train"][-1] == fit["iters"]  # the run stopped there
    assert len([r for r in records if r["kind"] == "eval"]) == fit["evaluations"]
