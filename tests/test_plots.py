"""Tests for the result plots of semask.viz: training logs, per-class IoU, run tables, confusion, error maps."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.legend

matplotlib.use("Agg")  # headless; set here, never at import of semask

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from semask.engine.metrics import mean_iou  # noqa: E402
from semask.engine.rundir import read_training_log  # noqa: E402
from semask.viz import (ERROR_PALETTE, ResultsTable, error_map, overlay, plot_class_iou,  # noqa: E402
                        plot_confusion, plot_evaluation_panel, plot_results, plot_training_log, results_table)
from semask.viz import paired_differences  # noqa: E402
from semask.viz.results import t_quantile  # noqa: E402

LOGS = Path(__file__).parent / "data" / "training_logs"
SEMASK_LOG = LOGS / "semask_toy" / "log.jsonl"
SWIN_LOG = LOGS / "swin_toy" / "log.jsonl"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _line(ax, label: str):
    lines = [line for line in ax.lines if line.get_label() == label]
    assert len(lines) == 1, f"expected one line {label!r}, found {[line.get_label() for line in ax.lines]}"
    return lines[0]


# --------------------------------------------------------------------------------------------- error_map
def test_error_map_colours_correct_wrong_and_ignored():
    label = np.array([[0, 1, 255], [2, 2, 1]])
    pred = np.array([[0, 2, 1], [2, 0, 1]])
    rgb = error_map(pred, label)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    correct, wrong, ignored = (list(c) for c in ERROR_PALETTE)
    assert rgb.reshape(-1, 3).tolist() == [correct, wrong, ignored, correct, wrong, correct]


def test_error_map_over_an_image_keeps_ignored_pixels():
    label = np.array([[0, 1, 255], [2, 2, 1]])
    pred = np.array([[0, 2, 1], [2, 0, 1]])
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    blended = error_map(pred, label, image=image, alpha=0.4)
    codes = np.array([[0, 1, 255], [0, 1, 0]])
    assert np.array_equal(blended, overlay(image, codes, ERROR_PALETTE[:2], 0.4))
    assert np.array_equal(blended[0, 2], image[0, 2])


def test_error_map_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"error_map: the prediction has size \(2, 2\) but the image is \(2, 3\)"):
        error_map(np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"the image is \(4, 4\) but the label is \(2, 3\)"):
        error_map(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64), image=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="expected integer class indices"):
        error_map(np.zeros((2, 3)), np.zeros((2, 3), np.int64))


# --------------------------------------------------------------------------------------------- training logs
def test_read_training_log_from_file_or_run_directory():
    records = read_training_log(SEMASK_LOG)
    assert records == _records(SEMASK_LOG)
    assert read_training_log(SEMASK_LOG.parent) == records
    assert [r["kind"] for r in records].count("eval") == 2
    assert records[1]["note"] == "an unknown extra key, tolerated"


def test_read_training_log_skips_only_a_line_still_being_written(tmp_path):
    lines = SEMASK_LOG.read_text().splitlines(keepends=True)
    partial = tmp_path / "log.jsonl"
    partial.write_text("".join(lines[:3]) + "\n" + lines[3][:40])  # a blank line, then a half-written last line
    assert read_training_log(partial) == _records(SEMASK_LOG)[:3]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + lines[1][:40] + "\n" + lines[2])
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        read_training_log(broken)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list.jsonl:1 holds a list, expected a JSON object"):
        read_training_log(not_object)
    with pytest.raises(FileNotFoundError, match="expected a log.jsonl file or a run directory"):
        read_training_log(tmp_path / "nowhere")


def test_plot_training_log_one_run_draws_loss_terms_lr_and_miou():
    records = _records(SEMASK_LOG)
    fig = plot_training_log(SEMASK_LOG)
    loss_ax, lr_ax, miou_ax = fig.axes
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    for term in ("loss", "loss_decode", "loss_prior"):
        line = _line(loss_ax, f"semask_toy: {term}")
        assert line.get_xdata().tolist() == [r["iter"] for r in train]
        assert np.allclose(line.get_ydata(), [r[term] for r in train])
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["loss", "loss_decode", "loss_prior"]
    assert np.allclose(_line(lr_ax, "semask_toy: lr").get_ydata(), [r["lr"] for r in train])
    miou = _line(miou_ax, "semask_toy: mIoU")
    assert miou.get_xdata().tolist() == [50, 100]
    assert np.allclose(miou.get_ydata(), [100 * r["mIoU"] for r in evals])
    assert miou_ax.get_ylabel() == "validation mIoU (%)" and miou_ax.get_xlabel() == "iteration"


def test_plot_training_log_overlays_runs_from_every_accepted_form():
    swin_records = _records(SWIN_LOG)
    fig = plot_training_log({"SeMask": SEMASK_LOG.parent, "Swin": swin_records}, panels=("loss", "mIoU", "grad_norm"))
    loss_ax, miou_ax, grad_ax = fig.axes
    labels = sorted(line.get_label() for line in loss_ax.lines)
    assert labels == ["SeMask: loss", "SeMask: loss_decode", "SeMask: loss_prior", "Swin: loss", "Swin: loss_decode"]
    assert _line(loss_ax, "SeMask: loss").get_color() != _line(loss_ax, "Swin: loss").get_color()
    assert [t.get_text() for t in grad_ax.get_legend().get_texts()] == ["SeMask", "Swin"]  # run colours, once
    assert [line.get_label() for line in grad_ax.lines] == ["SeMask: grad_norm"]  # absent for the baseline
    assert np.allclose(_line(miou_ax, "Swin: mIoU").get_ydata(),
                       [100 * r["mIoU"] for r in swin_records if r["kind"] == "eval"])
    by_paths = plot_training_log([SEMASK_LOG, SWIN_LOG.parent], panels=("lr",))
    assert sorted(line.get_label() for line in by_paths.axes[0].lines) == ["semask_toy: lr", "swin_toy: lr"]


def test_plot_training_log_smoothing_and_empty_panels():
    records = [{"kind": "train", "iter": i, "loss": float(v)} for i, v in zip((1, 2, 3, 4), (4.0, 2.0, 6.0, 0.0))]
    fig = plot_training_log(records, panels=("loss", "mIoU", "lr"), smooth=2)
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), [4.0, 3.0, 4.0, 3.0])
    assert [t.get_text() for t in fig.axes[1].texts] == ["no 'mIoU' in the log"]
    assert [t.get_text() for t in fig.axes[2].texts] == ["no 'lr' in the log"]


@pytest.mark.parametrize("runs, error, message", [
    ([], ValueError, "no runs given"),
    ({}, ValueError, "mapping of runs is empty"),
    ({"kind": "train", "iter": 1}, TypeError, "single log record"),
    ([{"iter": 1, "loss": 1.0}], ValueError, "record 0 of run 'run' has no 'kind'"),
    ([{"kind": "eval", "iter": 1}], ValueError, r"eval record 0 of run 'run' lacks \['mIoU'\]"),
    ({"a": 3}, TypeError, "got int for run 'a'"),
])
def test_plot_training_log_rejects_bad_runs(runs, error, message):
    with pytest.raises(error, match=message):
        plot_training_log(runs)


# --------------------------------------------------------------------------------------------- per-class IoU
def _result(iou, miou=None):
    iou = np.asarray(iou, dtype=np.float64)
    return {"aAcc": 0.9, "mIoU": float(np.nanmean(iou)) if miou is None else miou, "mAcc": 0.8, "IoU": iou,
            "Acc": iou}


def test_plot_class_iou_bars_names_and_missing_classes():
    fig = plot_class_iou(_result([0.5, np.nan, 0.25]), ["sky", "boat", "car"])
    ax = fig.axes[0]
    assert np.allclose([p.get_height() for p in ax.patches], [50.0, 0.0, 25.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sky", "boat", "car"]
    assert [t.get_text() for t in ax.texts] == ["n/a"]
    assert ax.texts[0].get_position()[0] == pytest.approx(1.0)  # at the NaN class
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mIoU 37.5%"]


def test_plot_class_iou_several_results_side_by_side_and_sorted():
    a = mean_iou(np.array([[0, 0, 1, 2]]), np.array([[0, 0, 1, 1]]), 3)  # IoU 1.0, 0.5, 0.0
    b = _result([0.2, 0.9, 0.4])
    fig = plot_class_iou({"SeMask": a, "Swin": b}, ["x", "y", "z"], sort=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]  # a's order: 100, 50, 0
    heights = [p.get_height() for p in ax.patches]
    assert np.allclose(heights, [100.0, 50.0, 0.0, 20.0, 90.0, 40.0])
    xs = [p.get_x() + p.get_width() / 2 for p in ax.patches]
    assert xs[0] < 0 < xs[3]  # the two results' bars of a class sit side by side around its tick
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["SeMask (mIoU 50.0%)", "Swin (mIoU 50.0%)"]
    fig = plot_class_iou(_result([0.2, np.nan, 0.6]), ["x", "y", "z"], sort=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["z", "x", "y"]  # undefined last


def test_plot_class_iou_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        plot_class_iou(_result([0.1, 0.2, 0.3]), ["a", "b"])
    with pytest.raises(ValueError, match=r"no per-class 'IoU' array in \['x'\]"):
        plot_class_iou({"x": {"mIoU": 0.3}})
    with pytest.raises(ValueError, match=r"must all be \(K,\)"):
        plot_class_iou({"a": _result([0.1, 0.2]), "b": _result([0.1, 0.2, 0.3])})
    with pytest.raises(TypeError, match="expected a metrics dict"):
        plot_class_iou([0.1, 0.2])


# --------------------------------------------------------------------------------------------- results
RUNS = [
    {"setting": "SeMask", "seed": 0, "mIoU": 0.60, "mAcc": 0.70, "params": 2.9e6, "train_sec": 400.0},
    {"setting": "SeMask", "seed": 1, "mIoU": 0.64, "mAcc": 0.74, "params": 2.9e6, "train_sec": 440.0},
    {"setting": "Swin", "seed": 0, "mIoU": 0.50, "mAcc": 0.61, "params": 2.7e6, "train_sec": 60.0, "extra": "x"},
    {"setting": "Swin", "seed": 1, "mIoU": 0.56, "mAcc": 0.65, "params": 2.7e6, "train_sec": 80.0},
    {"setting": "FPN", "seed": 0, "mIoU": 0.45, "mAcc": 0.55, "params": 3.1e6, "train_sec": 50.0},
]


def test_results_table_groups_by_setting_with_mean_and_std_over_seeds():
    table = results_table(RUNS, metrics=("mIoU", "mAcc"), columns=("params", "train_sec"))
    assert isinstance(table, ResultsTable)
    assert [r["setting"] for r in table.rows] == ["SeMask", "Swin", "FPN"]  # first-appearance order
    semask_row = table.rows[0]
    assert semask_row["n"] == 2 and semask_row["seeds"] == [0, 1]
    assert semask_row["mIoU_mean"] == pytest.approx(0.62)
    assert semask_row["mIoU_std"] == pytest.approx(np.std([0.60, 0.64], ddof=1))
    assert semask_row["mIoU_values"] == [0.60, 0.64]
    assert semask_row["train_sec"] == pytest.approx(420.0)
    assert np.isnan(table.rows[2]["mIoU_std"])  # one seed: no spread
    lines = table.to_markdown().splitlines()
    assert lines[0] == "| setting | seeds | mIoU (%) | mAcc (%) | params | train_sec |"
    assert lines[2] == "| SeMask | 2 (0, 1) | 62.00 ± 2.83 | 72.00 ± 2.83 | 2.90 M | 7.0 min |"
    assert lines[4] == "| FPN | 1 (0) | 45.00 | 55.00 | 3.10 M | 50.0 s |"
    assert str(table) == table.to_markdown() == table._repr_markdown_()


def test_results_table_rejects_incomplete_runs():
    with pytest.raises(ValueError, match="no runs given"):
        results_table([])
    with pytest.raises(ValueError, match=r"run 1 \(Swin\) lacks \['mIoU'\]"):
        results_table([RUNS[0], {"setting": "Swin", "seed": 0}])
    with pytest.raises(ValueError, match=r"run 0 \(\?\) lacks \['setting'\]"):
        results_table([{"mIoU": 0.5}])
    with pytest.raises(ValueError, match="non-numeric 'mIoU'"):
        results_table([{"setting": "a", "mIoU": "0.5"}])


def test_plot_results_bars_error_bars_and_runs():
    fig = plot_results(results_table(RUNS))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["SeMask", "Swin", "FPN"]
    assert np.allclose([p.get_height() for p in ax.patches], [62.0, 53.0, 45.0])
    (errorbars,) = ax.containers[1:]  # the bar container, then the error bars
    segments = errorbars.lines[2][0].get_segments()  # one vertical segment per setting with a spread
    assert len(segments) == 2
    for seg, mean, std in zip(segments, (62.0, 53.0), (100 * np.std([0.6, 0.64], ddof=1),
                                                        100 * np.std([0.5, 0.56], ddof=1))):
        assert seg[0][1] == pytest.approx(mean - std) and seg[1][1] == pytest.approx(mean + std)
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert sorted(np.concatenate([d.get_ydata() for d in dots]).round(6).tolist()) == [45.0, 50.0, 56.0, 60.0, 64.0]
    assert "mean ± std over 1/2 runs per setting" in ax.get_title()
    runs_fig = plot_results(RUNS, metric="mAcc")  # runs are grouped on the fly
    assert np.allclose([p.get_height() for p in runs_fig.axes[0].patches], [72.0, 63.0, 55.0])
    with pytest.raises(ValueError, match=r"'mAcc' is not a metric of this table; it has \['mIoU'\]"):
        plot_results(results_table(RUNS), metric="mAcc")


# 95% two-sided critical values t(0.975, df) as printed in standard tables (3 decimals)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 29: 2.045, 30: 2.042}


def test_t_quantile_matches_the_published_table_and_the_closed_forms():
    for df, value in T_975.items():
        assert round(t_quantile(0.975, df), 3) == value, df
    assert round(t_quantile(0.95, 10), 3) == 1.812 and round(t_quantile(0.995, 5), 3) == 4.032
    assert round(t_quantile(0.9, 1), 3) == 3.078 and round(t_quantile(0.9995, 30), 3) == 3.646
    for p in (0.6, 0.9, 0.975, 0.999):  # df 1 is Cauchy, df 2 has t = (2p - 1) / sqrt(2 p (1 - p))
        assert t_quantile(p, 1) == pytest.approx(np.tan(np.pi * (p - 0.5)), rel=1e-12)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / np.sqrt(2 * p * (1 - p)), rel=1e-12)
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.96, abs=1e-3)  # towards the normal's 1.95996
    for bad_df in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="degrees of freedom must be a positive int"):
            t_quantile(0.975, bad_df)
    for bad_p in (0, 1, 1.5, "0.9", None):
        with pytest.raises(ValueError, match=r"probability must be a number in \(0, 1\)"):
            t_quantile(bad_p, 3)


FIVE = [0.70, 0.72, 0.74, 0.76, 0.78]  # mean 0.74, std sqrt(0.001); 95% half-width 2.7764 * 0.031623 / sqrt(5)


def test_results_table_confidence_intervals_of_the_mean():
    runs = [{"setting": "A", "seed": s, "mIoU": v, "entropy": 10 * v} for s, v in enumerate(FIVE)]
    runs += RUNS[:2]  # SeMask: 0.60, 0.64 -> half-width t(0.975, 1) * 0.028284 / sqrt(2) = 12.7062 * 0.02
    table = results_table(runs, metrics=("mIoU",), ci=0.95)
    a, semask = table.rows
    assert a["mIoU_ci"] == pytest.approx(2.776445 * np.sqrt(0.001) / np.sqrt(5), rel=1e-6)
    assert semask["mIoU_ci"] == pytest.approx(12.706205 * 0.02, rel=1e-6)
    lines = table.to_markdown().splitlines()
    assert lines[0] == "| setting | seeds | mIoU (%), mean ± std [95% CI] |"
    assert lines[2] == "| A | 5 (0, 1, 2, 3, 4) | 74.00 ± 3.16 [70.07, 77.93] |"
    assert lines[3] == "| SeMask | 2 (0, 1) | 62.00 ± 2.83 [36.59, 87.41] |"
    one = results_table(RUNS, ci=0.9).rows[2]  # FPN: one run, no interval
    assert np.isnan(one["mIoU_std"]) and np.isnan(one["mIoU_ci"])
    assert "| FPN | 1 (0) | 45.00 |" in results_table(RUNS, ci=0.9).to_markdown()
    assert "mIoU_ci" not in results_table(RUNS).rows[0]  # no level, no interval
    plain = results_table(runs[:5], metrics=("mIoU", "entropy"), plain=("entropy",), ci=0.95)
    assert plain.to_markdown().splitlines()[2].endswith(" | 7.400 ± 0.316 [7.007, 7.793] |")
    with pytest.raises(ValueError, match=r"ci must be a confidence level in \(0, 1\)"):
        results_table(RUNS, ci=95)
    with pytest.raises(ValueError, match=r"plain names \['mAcc'\], which are not among the metrics"):
        results_table(RUNS, plain=("mAcc",))


def test_results_table_leaves_out_runs_without_a_measure():
    runs = [{"setting": "SeMask", "seed": 0, "prior": 0.5}, {"setting": "SeMask", "seed": 1, "prior": 0.7},
            {"setting": "Swin", "seed": 0, "prior": None}, {"setting": "Swin", "seed": 1, "prior": None},
            {"setting": "mixed", "seed": 0, "prior": None}, {"setting": "mixed", "seed": 1, "prior": 0.4}]
    table = results_table(runs, metrics=("prior",), ci=0.95)
    swin, mixed = table.rows[1], table.rows[2]
    assert swin["n"] == 2 and swin["prior_values"] == [] and np.isnan(swin["prior_mean"])
    assert mixed["prior_values"] == [0.4] and mixed["prior_mean"] == pytest.approx(0.4)
    lines = table.to_markdown().splitlines()
    assert lines[3] == "| Swin | 2 (0, 1) | n/a |" and lines[4] == "| mixed | 2 (0, 1) | 40.00 |"
    with pytest.raises(ValueError, match="non-numeric 'params'"):  # None only for metrics
        results_table([{"setting": "a", "mIoU": 0.5, "params": None}], columns=("params",))


def test_paired_differences_pair_runs_by_seed():
    a = [{"setting": "SeMask", "seed": s, "mIoU": v} for s, v in enumerate(FIVE)]
    b = [{"setting": "Swin", "seed": s, "mIoU": v - d} for s, v, d in zip(range(5), FIVE, (.01, .02, .03, .02, .02))]
    runs = b[::-1] + a  # pairing goes by seed, not by order
    result = paired_differences(runs, [("SeMask", "Swin")])
    (row,) = result.rows
    assert row["seeds"] == [0, 1, 2, 3, 4] and np.allclose(row["differences"], [.01, .02, .03, .02, .02])
    assert row["mean"] == pytest.approx(0.02) and row["std"] == pytest.approx(np.sqrt(0.00005))
    assert row["ci"] == pytest.approx(2.776445 * np.sqrt(0.00005) / np.sqrt(5), rel=1e-6)
    assert (row["low"], row["high"]) == pytest.approx((0.02 - row["ci"], 0.02 + row["ci"]))
    lines = result.to_markdown().splitlines()
    assert lines[0] == ("| comparison | seeds | mIoU difference per seed (points) | mean ± std (points) "
                        "| 95% CI (points) |")
    assert lines[2] == ("| SeMask − Swin | 5 (0, 1, 2, 3, 4) | +1.00 / +2.00 / +3.00 / +2.00 / +2.00 "
                        "| +2.00 ± 0.71 | [+1.12, +2.88] |")
    assert str(result) == result.to_markdown() == result._repr_markdown_()
    with pytest.raises(ValueError, match=r"must have the same seeds to be paired: only 'SeMask' has \[4\], "
                                         r"only 'Swin' has \[\]"):
        paired_differences(a + b[:4], [("SeMask", "Swin")])
    with pytest.raises(ValueError, match=r"no runs of 'FPN'; the settings are \['Swin', 'SeMask'\]"):
        paired_differences(runs, [("SeMask", "FPN")])
    with pytest.raises(ValueError, match="need one distinct 'seed' each"):
        paired_differences(runs + [a[0]], [("SeMask", "Swin")])
    with pytest.raises(TypeError, match="a comparison is a"):
        paired_differences(runs, ["SeMask"])


def test_plot_results_draws_the_confidence_interval():
    runs = [{"setting": "A", "seed": s, "mIoU": v} for s, v in enumerate(FIVE)]
    fig = plot_results(runs, ci=0.95)
    ax = fig.axes[0]
    (segment,) = ax.containers[1].lines[2][0].get_segments()
    half = 100 * 2.776445 * np.sqrt(0.001) / np.sqrt(5)
    assert segment[0][1] == pytest.approx(74.0 - half, rel=1e-6) and segment[1][1] == pytest.approx(74.0 + half,
                                                                                                       rel=1e-6)
    assert "mean ± 95% CI of the mean over 5 runs" in ax.get_title()
    with pytest.raises(ValueError, match="differs from the table's level"):
        plot_results(results_table(runs), ci=0.95)


# --------------------------------------------------------------------------------------------- confusion
def test_plot_confusion_is_row_normalised_with_names():
    counts = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])
    fig = plot_confusion(counts, ["sky", "boat", "car"])
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert np.allclose(shown[0], [0.8, 0.2, 0.0]) and np.allclose(shown[2], [0.25, 0.25, 0.5])
    assert shown.mask[1].all()  # no ground-truth pixels of "boat": an empty row
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sky", "boat", "car"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sky", "boat", "car"]
    assert ax.get_ylabel() == "ground truth" and ax.get_xlabel() == "predicted"
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("n/a") == 1 and texts[:3] == ["80", "20", "0"]
    assert len(fig.axes) == 2  # the colour bar
    assert ax.images[0].get_clim() == (0.0, 1.0)


def test_plot_confusion_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"square \(K, K\)"):
        plot_confusion(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="expected integer pixel counts"):
        plot_confusion(np.eye(2))
    with pytest.raises(ValueError, match="non-negative"):
        plot_confusion(np.array([[1, -1], [0, 1]]))
    with pytest.raises(ValueError, match="3 class names for a 2x2 matrix"):
        plot_confusion(np.eye(2, dtype=np.int64), ["a", "b", "c"])


# --------------------------------------------------------------------------------------------- evaluation panel
def test_plot_evaluation_panel_shows_image_truth_prediction_and_errors():
    image = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    label = np.zeros((6, 8), np.int64)
    label[:, 4:] = 2
    label[0, 0] = 255
    pred = label.copy()
    pred[0, 0] = 1
    pred[5, 4:] = 1  # 4 of the 47 scored pixels wrong
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    fig = plot_evaluation_panel(image, label, pred, palette, ["a", "b", "c"], title="x.png: mIoU 50.0")
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "prediction", "error map"]
    assert np.array_equal(fig.axes[0].images[0].get_array(), image)
    assert np.array_equal(fig.axes[1].images[0].get_array(), overlay(image, label, palette, 0.5))
    assert np.array_equal(fig.axes[2].images[0].get_array(), overlay(image, pred, palette, 0.5))
    assert np.array_equal(fig.axes[3].images[0].get_array(), error_map(pred, label, image=image, alpha=0.5))
    legends = [a for a in fig.axes[3].get_children() if isinstance(a, matplotlib.legend.Legend)]
    texts = sorted([t.get_text() for t in legend.get_texts()] for legend in legends)
    assert texts == [["a", "b", "c"], ["correct (91.5%)", "wrong (8.5%)", "ignored (not scored)"]]
    assert fig._suptitle.get_text() == "x.png: mIoU 50.0"
    unlabelled = plot_evaluation_panel(image, None, pred, palette)
    assert [ax.get_title() for ax in unlabelled.axes] == ["image", "prediction"]
    with pytest.raises(ValueError, match=r"plot_evaluation_panel: the prediction has size \(6, 7\)"):
        plot_evaluation_panel(image, label, pred[:, :7], palette)


def test_plot_training_log_reads_a_real_training_run(tiny_toy_root, tmp_path):
    """The contract with `semask.engine.train`: its log.jsonl (train, eval and other kinds of lines) plots as written."""
    from semask.engine.config import apply_overrides, get_preset
    from semask.engine.train import train
    from helpers import tiny_overrides

    train(apply_overrides(get_preset("toy"), tiny_overrides(tiny_toy_root)), tmp_path / "run", progress=False)
    records = read_training_log(tmp_path / "run")
    fig = plot_training_log(tmp_path / "run", panels=("loss", "lr", "mIoU", "images_per_s"))
    train_lines = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert train_lines and evals
    for term in ("loss", "loss_decode", "loss_prior"):
        assert np.allclose(_line(fig.axes[0], f"run: {term}").get_ydata(), [r[term] for r in train_lines])
    assert np.allclose(_line(fig.axes[1], "run: lr").get_xdata(), [r["iter"] for r in train_lines])
    assert np.allclose(_line(fig.axes[2], "run: mIoU").get_ydata(), [100 * r["mIoU"] for r in evals])
    assert len(fig.axes[3].lines) == 1


def test_live_training_plot_redraws_as_records_arrive() -> None:
    import matplotlib.pyplot as plt

    from semask.viz import LiveTrainingPlot

    shown = []
    live = LiveTrainingPlot(every=2, show=lambda fig: shown.append([ax.get_ylabel() for ax in fig.axes]))
    live({"kind": "pretrained", "iter": 0})
    assert live.draws == 0  # nothing to draw before the first training line
    for i in (1, 2, 3, 4):
        live({"kind": "train", "iter": i, "loss": 2.0 / i, "loss_decode": 1.5 / i, "loss_prior": 0.5 / i,
              "lr": 1e-3})
    assert live.draws == 2  # after the 2nd and 4th training line
    live({"kind": "eval", "iter": 4, "mIoU": 0.5, "mAcc": 0.6, "aAcc": 0.9})
    assert live.draws == 3 and len(live.records) == 6
    assert shown[-1] == ["training loss", "learning rate", "validation mIoU (%)"]
    assert not plt.get_fignums()  # every drawn figure was closed
    with pytest.raises(ValueError, match="every must be at least 1"):
        LiveTrainingPlot(every=0)
