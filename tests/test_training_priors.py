"""What the semantic layers learn, over training (issue 16, part 2): the evaluation records' prior mIoU per stage
(checked against `semask.analyze` on the same weights), ``eval.prior_metrics``, ``train.snapshot_interval``
snapshots (weights only, listed in step order, kept across a resume) and the priors' panel of
`plot_training_log`."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import semask
from semask.checkpoint import read_checkpoint_file
from semask.data import TOY_CLASSES, make_toy_dataset
from semask.data.toy import ToyDataset
from semask.engine.config import apply_overrides, get_preset
from semask.engine.evaluate import evaluate
from semask.engine.rundir import list_snapshots, planned_snapshots, snapshot_name
from semask.engine.train import TrainingError, train
from semask.errors import OutputError, UsageError
from semask.viz import LiveTrainingPlot, plot_training_log
from helpers import tiny_overrides

matplotlib.use("Agg")

EVAL_KEYS = ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "num_images")


def _config(root: Path, preset: str = "toy", **extra):
    return apply_overrides(get_preset(preset), tiny_overrides(root, **extra))


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy16") / "toy", num_train=8, num_val=4, size=64)


@pytest.fixture(scope="module")
def runs(toy_root, tmp_path_factory):
    """The same 4-step run (evaluations at steps 2 and 4) twice: with the priors and snapshots every 2 steps, and
    with ``eval.prior_metrics=false`` and no snapshots."""
    base = tmp_path_factory.mktemp("runs16")
    on = train(_config(toy_root, **{"train.snapshot_interval": 2}), base / "on", progress=False)
    off = train(_config(toy_root, **{"eval.prior_metrics": "false"}), base / "off", progress=False)
    return base, on, off


# --------------------------------------------------------------------------------------------- the eval records
def test_the_eval_records_prior_miou_is_semask_analyze_s_on_the_same_weights(runs, toy_root) -> None:
    base, on, _ = runs
    evals = _records(base / "on", "eval")
    assert [r["iter"] for r in evals] == [2, 4]
    test_config = on.config.data.test_pipeline
    for rec in evals:
        assert len(rec["prior_mIoU"]) == 4 and all(0 <= v <= 1 for v in rec["prior_mIoU"])
        assert 0 <= rec["decoder_prior_mIoU"] <= 1
        # independent: the snapshot of that step, through semask.analyze's own forward with attention weights
        model = semask.load_checkpoint(base / "on" / snapshot_name(rec["iter"]))
        analysis = semask.analyze(model, ToyDataset(toy_root, "validation"), test_config=test_config, progress=False)
        assert [s.prior_mIoU for s in analysis.stages] == rec["prior_mIoU"]
        assert analysis.decoder_prior_mIoU == rec["decoder_prior_mIoU"]
        assert analysis.metrics["mIoU"] == rec["mIoU"]  # the same weights, the same protocol
    assert evals[0]["prior_mIoU"] != evals[1]["prior_mIoU"]  # the priors moved with training
    text = (base / "on" / "train.log").read_text()
    shown = "/".join(f"{100 * v:.1f}" for v in evals[-1]["prior_mIoU"])
    assert f"prior mIoU {shown} (stages), decoder {100 * evals[-1]['decoder_prior_mIoU']:.1f}" in text


def test_switching_the_priors_off_leaves_the_evaluation_bit_identical(runs) -> None:
    base, on, off = runs
    with_priors, without = _records(base / "on", "eval"), _records(base / "off", "eval")
    assert [{k: r[k] for k in EVAL_KEYS} for r in with_priors] == [{k: r[k] for k in EVAL_KEYS} for r in without]
    assert all("prior_mIoU" not in r and "decoder_prior_mIoU" not in r for r in without)
    losses = [[r["loss"] for r in _records(base / name, "train")] for name in ("on", "off")]
    assert losses[0] == losses[1]  # snapshots and prior scoring leave training alone
    assert _same_weights(on.model.state_dict(), off.model.state_dict())
    assert list_snapshots(base / "off") == []  # train.snapshot_interval=0: none
    assert "prior mIoU" not in (base / "off" / "train.log").read_text()


def test_evaluate_scores_the_priors_of_its_own_forward_only_in_whole_mode(runs, toy_root) -> None:
    base, on, _ = runs
    val = ToyDataset(toy_root, "validation")
    config = on.config.data.test_pipeline
    plain = evaluate(on.model, val, test_config=config, progress=False)
    scored = evaluate(on.model, val, test_config=config, progress=False, prior_metrics=True)
    assert np.array_equal(plain.confusion, scored.confusion) and plain.prior_metrics is None
    assert scored.prior_mIoU == _records(base / "on", "eval")[-1]["prior_mIoU"]
    assert scored.to_dict()["prior_mIoU"] == scored.prior_mIoU and "prior_mIoU" not in plain.to_dict()
    assert set(scored.prior_metrics[2]) >= {"mIoU", "mAcc", "aAcc", "IoU", "Acc"}
    with pytest.raises(UsageError, match="prior_metrics needs mode 'whole' without aug_test .* 'slide'"):
        evaluate(on.model, val, mode="slide", crop_size=32, stride=32, prior_metrics=True, progress=False)
    with pytest.raises(UsageError, match="with aug_test"):
        evaluate(on.model, val, aug_test=True, prior_metrics=True, progress=False)


def test_models_without_semantic_layers_record_none(toy_root, tmp_path) -> None:
    swin = train(_config(toy_root, "swin_toy", **{"schedule.iters": 2}), tmp_path / "swin", progress=False)
    rec = swin.last_eval
    assert rec["prior_mIoU"] == [None, None, None, None] and rec["decoder_prior_mIoU"] is None
    assert 0 <= rec["mIoU"] <= 1 and "prior mIoU" not in (tmp_path / "swin" / "train.log").read_text()

    from semask.model.segmentor import ExternalSegmentor

    torch.manual_seed(0)
    external = ExternalSegmentor(torch.nn.Conv2d(3, 11, 1), 11, "one_by_one", class_names=TOY_CLASSES)
    result = evaluate(external, ToyDataset(toy_root, "validation"), test_config=swin.config.data.test_pipeline,
                      prior_metrics=True, progress=False)
    assert result.prior_metrics == [] and result.prior_mIoU == [] and result.decoder_prior_mIoU is None


def test_slide_mode_runs_leave_the_priors_out_and_say_so(toy_root, tmp_path) -> None:
    overrides = {"schedule.iters": 1, "eval.mode": "slide", "eval.crop_size": 64, "eval.stride": 64}
    result = train(_config(toy_root, **overrides), tmp_path / "slide", progress=False)
    assert "prior_mIoU" not in result.last_eval
    assert "eval.prior_metrics: the semantic priors are scored in whole mode only" in \
        (tmp_path / "slide" / "train.log").read_text()


# --------------------------------------------------------------------------------------------- snapshots
def test_snapshots_are_weights_only_loadable_and_listed_in_step_order(runs) -> None:
    base, on, _ = runs
    snapshots = list_snapshots(base / "on")
    assert snapshots == [(2, base / "on" / "iter_000002.pth"), (4, base / "on" / "iter_000004.pth")]
    for step, path in snapshots:
        raw = read_checkpoint_file(path)
        assert raw["iteration"] == step and raw["train_config"]["train"]["snapshot_interval"] == 2
        assert not {"optimizer", "scaler", "scheduler"} & set(raw)  # weights only
        model = semask.load_checkpoint(path)
        assert model.class_names == TOY_CLASSES and model.name == "semask_toy_fpn"
    last = semask.load_checkpoint(snapshots[-1][1]).state_dict()
    assert _same_weights(last, on.model.state_dict())
    assert not _same_weights(semask.load_checkpoint(snapshots[0][1]).state_dict(), last)
    latest = (base / "on" / "latest.pth").stat().st_size
    assert snapshots[0][1].stat().st_size < latest  # latest.pth also holds the optimizer's moments


def test_resume_keeps_the_snapshots_it_does_not_redo_and_redoes_the_others_identically(toy_root, tmp_path) -> None:
    config = _config(toy_root, **{"schedule.iters": 5, "train.checkpoint_interval": 2, "train.eval_interval": 0,
                                  "train.log_interval": 1, "train.snapshot_interval": 1})
    run = tmp_path / "run"

    class Interrupted(Exception):
        pass

    def interrupt_at_step_4(rec: dict) -> None:  # snapshots 1-3 are on disk by then, latest.pth of step 2
        if rec["kind"] == "train" and rec["iter"] == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, run, callback=interrupt_at_step_4, progress=False)
    assert [s for s, _ in list_snapshots(run)] == [1, 2, 3]
    kept = {s: (p.read_bytes(), p.stat().st_mtime_ns) for s, p in list_snapshots(run) if s <= 2}
    redone = semask.load_checkpoint(run / snapshot_name(3)).state_dict()
    resumed = train(config, run, resume=True, progress=False)
    assert [s for s, _ in list_snapshots(run)] == [1, 2, 3, 4, 5]
    for step, (data, mtime) in kept.items():  # steps up to the checkpoint's are not written again
        path = run / snapshot_name(step)
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    assert _same_weights(semask.load_checkpoint(run / snapshot_name(3)).state_dict(), redone)
    assert _same_weights(semask.load_checkpoint(run / snapshot_name(5)).state_dict(), resumed.model.state_dict())


def test_the_output_plan_counts_the_snapshots(toy_root, runs, tmp_path) -> None:
    base, _, _ = runs
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "iter_000002.pth").write_bytes((base / "on" / "iter_000002.pth").read_bytes())
    with pytest.raises(TrainingError, match=r"already holds a run \(iter_000002.pth\)"):
        train(_config(toy_root), stray, progress=False)  # another run's snapshot, even without snapshots here
    assert sorted(p.name for p in stray.iterdir()) == ["iter_000002.pth"]

    weights = tmp_path / "fresh" / "iter_000004.pth"  # the ImageNet weights where a snapshot would go
    weights.parent.mkdir()
    weights.write_bytes(b"not really weights")
    with pytest.raises(OutputError, match=r"train.snapshot_interval: the snapshot .*iter_000004.pth' is "
                                          r"model.pretrained"):
        train(_config(toy_root, **{"train.snapshot_interval": 2, "model.pretrained": weights}), weights.parent,
              progress=False)
    assert weights.read_bytes() == b"not really weights" and [p.name for p in weights.parent.iterdir()] == \
        ["iter_000004.pth"]


def test_snapshot_names_and_listing(tmp_path) -> None:
    assert snapshot_name(7) == "iter_000007.pth" and snapshot_name(1234567) == "iter_1234567.pth"
    assert planned_snapshots(tmp_path, 3, 10) == [tmp_path / f"iter_00000{s}.pth" for s in (3, 6, 9)]
    assert planned_snapshots(tmp_path, 0, 10) == []
    for name in ("iter_000010.pth", "iter_000002.pth", "iter_1000000.pth", "iter_2.pth", "iter_000003.pth.tmp",
                 "latest.pth", "iter_00000x.pth"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "iter_000005.pth").mkdir()  # not a file: not a snapshot
    assert list_snapshots(tmp_path) == [(2, tmp_path / "iter_000002.pth"), (10, tmp_path / "iter_000010.pth"),
                                        (1000000, tmp_path / "iter_1000000.pth")]
    (tmp_path / "empty_run").mkdir()
    assert list_snapshots(str(tmp_path / "empty_run")) == []
    with pytest.raises(FileNotFoundError, match="list_snapshots: .*nowhere' is not a folder"):
        list_snapshots(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------- the curves
def _eval(it: int, stages, decoder) -> dict:
    return {"kind": "eval", "iter": it, "mIoU": 0.5, "prior_mIoU": stages, "decoder_prior_mIoU": decoder}


def _line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_plot_training_log_draws_the_priors_by_default_when_the_records_have_them() -> None:
    import matplotlib.pyplot as plt

    records = [{"kind": "train", "iter": 1, "loss": 1.0, "lr": 1e-3},
               _eval(2, [0.1, None, 0.3, 0.4], 0.5), _eval(4, [0.2, None, None, 0.6], None)]
    fig = plot_training_log(records)
    assert [ax.get_ylabel() for ax in fig.axes] == ["training loss", "learning rate", "validation mIoU (%)",
                                                     "prior mIoU (%)"]
    prior = fig.axes[3]
    assert sorted(line.get_label() for line in prior.lines) == ["run: decoder prior", "run: stage 1 prior",
                                                                  "run: stage 3 prior", "run: stage 4 prior"]
    assert np.allclose(_line(prior, "run: stage 1 prior").get_ydata(), [10.0, 20.0])
    assert np.allclose(_line(prior, "run: stage 4 prior").get_xdata(), [2, 4])
    assert _line(prior, "run: stage 3 prior").get_xdata().tolist() == [2]  # None: no point
    assert _line(prior, "run: decoder prior").get_xdata().tolist() == [2]
    assert [t.get_text() for t in prior.get_legend().get_texts()] == ["stage 1", "stage 3", "stage 4", "decoder"]
    plt.close("all")

    no_priors = [{"kind": "train", "iter": 1, "loss": 1.0}, _eval(2, [None] * 4, None)]  # a plain-Swin run
    assert len(plot_training_log(no_priors).axes) == 3
    several = plot_training_log({"semask": records, "swin": no_priors}, panels=("mIoU", "prior_mIoU"))
    assert [t.get_text() for t in several.axes[1].get_legend().get_texts()] == \
        ["semask", "swin", "stage 1", "stage 3", "stage 4", "decoder"]  # run colours, then the stages
    assert _line(several.axes[1], "semask: stage 1 prior").get_color() == \
        _line(several.axes[0], "semask: mIoU").get_color() != _line(several.axes[0], "swin: mIoU").get_color()
    empty = plot_training_log(no_priors, panels=("prior_mIoU",))
    assert [t.get_text() for t in empty.axes[0].texts] == ["no 'prior_mIoU' in the log"]
    with pytest.raises(ValueError, match="eval record 0 of run 'run': prior_mIoU must be a list"):
        plot_training_log([_eval(2, 0.5, None)], panels=("prior_mIoU",))
    plt.close("all")


def test_the_priors_of_a_real_run_plot_and_join_the_live_plot(runs) -> None:
    import matplotlib.pyplot as plt

    base, _, _ = runs
    evals = _records(base / "on", "eval")
    fig = plot_training_log(base / "on")
    for stage in range(4):
        line = _line(fig.axes[3], f"on: stage {stage + 1} prior")
        assert np.allclose(line.get_ydata(), [100 * r["prior_mIoU"][stage] for r in evals])
    assert np.allclose(_line(fig.axes[3], "on: decoder prior").get_ydata(),
                       [100 * r["decoder_prior_mIoU"] for r in evals])
    shown = []
    live = LiveTrainingPlot(show=lambda f: shown.append(len(f.axes)))
    for record in map(json.loads, (base / "on" / "log.jsonl").read_text().splitlines()):
        live(record)
    assert shown[0] == 3 and shown[-1] == 4  # the panel joins with the first evaluation that has priors
    plt.close("all")
