"""Results of SeMask experiments (arXiv 2112.12782) as tables and plots.

- `plot_class_iou`: per-class IoU bars of one or several results;
- `results_table` / `ResultsTable` and `plot_results`: several runs grouped by setting, mean and spread over
  seeds;
- `plot_confusion`: a row-normalised confusion matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from semask.errors import UsageError, UsageTypeError
from semask.viz.figures import class_matrix, single_axes
from semask.viz.inputs import ArrayLike, names_caller, to_numpy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_class_iou", "ResultsTable", "results_table", "plot_results", "plot_confusion"]


def _metric_results(results: Mapping[str, Any], metric: str) -> list[tuple[Optional[str], Mapping]]:
    """(label, result) pairs: one result dict (label None) or a mapping {label: result}."""
    if not isinstance(results, Mapping) or not results:
        raise UsageTypeError(f"expected a metrics dict (SegmentationMetric.compute()) or a non-empty mapping "
                             f"{{label: metrics dict}}, got {type(results).__name__}")
    if metric in results:
        return [(None, results)]
    bad = [label for label, r in results.items() if not isinstance(r, Mapping) or metric not in r]
    if bad:
        raise UsageError(f"no per-class {metric!r} array in {bad[:5]}; expected the dicts of "
                         "SegmentationMetric.compute() (keys aAcc, mIoU, mAcc, IoU, Acc)")
    return [(str(label), r) for label, r in results.items()]


@names_caller("plot_class_iou")
def plot_class_iou(results: Mapping[str, Any], class_names: Optional[Sequence[str]] = None, *,
                   metric: str = "IoU", sort: bool = False, ax: Optional["Axes"] = None) -> "Figure":
    """Per-class IoU (or Acc) as bars, one group per class, one bar per result.

    Args:
        results: one metrics dict of `SegmentationMetric.compute()` / `mean_iou` (``"IoU"``: (K,) fractions,
            NaN where undefined) or a mapping ``{label: metrics dict}`` for several side by side.
        class_names: K names (``class k`` when None).
        metric: the per-class key to draw, ``"IoU"`` or ``"Acc"``.
        sort: order the classes by the first result's value, best first (undefined classes last).
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure: bars in percent; an undefined (NaN) class gets an empty bar marked "n/a"; each result's
        mean (its ``m{metric}`` when present) is a dashed line in its colour and in its legend label.
    """
    pairs = _metric_results(results, metric)
    values = [np.asarray(r[metric], dtype=np.float64) for _, r in pairs]
    k = values[0].size
    if any(v.ndim != 1 for v in values) or any(v.size != k for v in values):
        raise UsageError(f"per-class {metric!r} arrays must all be (K,), got shapes "
                         f"{[v.shape for v in values]}")
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
    if len(names) != k:
        raise UsageError(f"{len(names)} class names for {k} classes")
    order = np.arange(k)
    if sort:
        first = np.where(np.isnan(values[0]), -np.inf, values[0])
        order = np.argsort(-first, kind="stable")
    n = len(pairs)
    width = 0.8 / n
    fig, ax = single_axes(ax, (max(6.0, 0.22 * k * max(n, 2) + 1.5), 4.0))
    x = np.arange(k)
    for j, ((label, result), v) in enumerate(zip(pairs, values)):
        shown = v[order]
        offset = (j - (n - 1) / 2) * width
        defined = ~np.isnan(shown)
        mean = result.get(f"m{metric}", float(np.nanmean(v)) if defined.any() else float("nan"))
        text = f"m{metric} {100 * mean:.1f}%"
        ax.bar(x + offset, np.where(defined, 100.0 * shown, 0.0), width=width, color=f"C{j % 10}",
               label=f"{label} ({text})" if label is not None else text)
        for xi in np.flatnonzero(~defined):
            ax.text(x[xi] + offset, 1.0, "n/a", rotation=90, ha="center", va="bottom", fontsize="x-small",
                    color="gray")
        if not math.isnan(mean):
            ax.axhline(100 * mean, color=f"C{j % 10}", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, [names[i] for i in order], rotation=90 if k > 8 else 0, fontsize="small")
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=n, frameon=False)
    return fig


# ----------------------------------------------------------------------------------------------- several runs
@dataclass
class ResultsTable:
    """Runs grouped by setting: mean and spread over seeds (see `results_table`).

    Attributes:
        rows: one dict per setting, in first-appearance order: ``group_by`` (the setting), ``"n"`` (runs),
            ``"seeds"`` (their ``seed`` values, None where a run has none), per metric ``"{m}_mean"``,
            ``"{m}_std"`` (sample std, ddof 1; NaN for one run) and ``"{m}_values"``, and per extra column
            its mean under the column's own name.
        metrics: the metric keys (fractions, shown in percent).
        columns: the extra numeric columns (shown as means).
        group_by: the key that names a setting.
    """

    rows: list[dict[str, Any]]
    metrics: tuple[str, ...]
    columns: tuple[str, ...]
    group_by: str

    def to_markdown(self, digits: int = 2) -> str:
        """A markdown table: setting, seeds, each metric as ``mean ± std`` in percent, each extra column."""
        header = [self.group_by, "seeds"] + [f"{m} (%)" for m in self.metrics] + list(self.columns)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for row in self.rows:
            seeds = [s for s in row["seeds"] if s is not None]
            cells = [str(row[self.group_by]), f"{row['n']}" + (f" ({', '.join(map(str, seeds))})" if seeds else "")]
            for m in self.metrics:
                mean, std = row[f"{m}_mean"], row[f"{m}_std"]
                cell = f"{100 * mean:.{digits}f}"
                if row["n"] > 1:
                    cell += f" ± {100 * std:.{digits}f}"
                cells.append(cell)
            cells += [_format_column(c, row[c]) for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _format_column(name: str, value: float) -> str:
    """``params`` in millions, ``*_sec`` in seconds or minutes, anything else with 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if name == "params":
        return f"{value / 1e6:.2f} M"
    if name.endswith("_sec"):
        return f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"
    return f"{value:.4g}"


@names_caller("results_table")
def results_table(runs: Sequence[Mapping[str, Any]], *, group_by: str = "setting",
                  metrics: Sequence[str] = ("mIoU",), columns: Sequence[str] = ()) -> ResultsTable:
    """Group runs by setting and summarise each metric over the seeds.

    Args:
        runs: one flat dict per run, e.g. ``{"setting": "SeMask", "seed": 0, "mIoU": 0.612, "params": 2.9e6,
            "train_sec": 431.0}``; metric values are fractions (0..1) as `SegmentationMetric.compute()` gives.
        group_by: the key whose value names a run's setting (rows keep the order settings first appear in).
        metrics: keys summarised as mean and sample standard deviation over the runs of a setting.
        columns: further numeric keys reported as their mean (e.g. ``"params"``, ``"train_sec"``).

    Returns:
        A `ResultsTable` (``.rows`` list of dicts, ``.to_markdown()``; Jupyter shows it as a table).

    Raises:
        UsageError: no runs, or a run without the `group_by` key, a metric or a column (named in the message).
    """
    if not runs:
        raise UsageError("no runs given")
    metrics, columns = tuple(metrics), tuple(columns)
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise UsageTypeError(f"run {i} is a {type(run).__name__}, expected a dict like "
                                 "{'setting': ..., 'seed': ..., 'mIoU': ...}")
        missing = [k for k in (group_by, *metrics, *columns) if k not in run]
        if missing:
            raise UsageError(f"run {i} ({run.get(group_by, '?')}) lacks {missing}; it has {sorted(run)}")
        for key in (*metrics, *columns):
            if not isinstance(run[key], (int, float, np.integer, np.floating)) or isinstance(run[key], bool):
                raise UsageError(f"run {i} ({run[group_by]}) has a non-numeric {key!r}: {run[key]!r}")
        groups.setdefault(run[group_by], []).append(run)
    rows = []
    for setting, members in groups.items():
        row: dict[str, Any] = {group_by: setting, "n": len(members), "seeds": [r.get("seed") for r in members]}
        for m in metrics:
            values = np.asarray([float(r[m]) for r in members])
            row[f"{m}_values"] = values.tolist()
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
        for c in columns:
            row[c] = float(np.mean([float(r[c]) for r in members]))
        rows.append(row)
    return ResultsTable(rows=rows, metrics=metrics, columns=columns, group_by=group_by)


@names_caller("plot_results")
def plot_results(results: Union[ResultsTable, Sequence[Mapping[str, Any]]], metric: str = "mIoU", *,
                 group_by: str = "setting", show_runs: bool = True, ax: Optional["Axes"] = None) -> "Figure":
    """One bar per setting: the mean of `metric` over its runs, the standard deviation as error bar.

    Args:
        results: a `ResultsTable`, or the runs themselves (grouped with `results_table(runs, group_by=...)`).
        metric: a metric of the table (a fraction, drawn in percent).
        group_by: the setting key when `results` are runs.
        show_runs: also draw each run's value as a dot.
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure (bars in setting order; settings with one run have no error bar).
    """
    table = results if isinstance(results, ResultsTable) else results_table(results, group_by=group_by,
                                                                             metrics=(metric,))
    if metric not in table.metrics:
        raise UsageError(f"{metric!r} is not a metric of this table; it has {list(table.metrics)}")
    fig, ax = single_axes(ax, (max(4.0, 1.1 * len(table.rows) + 1.5), 3.6))
    names = [str(r[table.group_by]) for r in table.rows]
    means = np.asarray([100 * r[f"{metric}_mean"] for r in table.rows])
    stds = np.asarray([100 * r[f"{metric}_std"] for r in table.rows])
    x = np.arange(len(names))
    colours = [f"C{i % 10}" for i in range(len(names))]
    ax.bar(x, means, color=colours, alpha=0.8, width=0.6)
    spread = ~np.isnan(stds)
    if spread.any():
        ax.errorbar(x[spread], means[spread], yerr=stds[spread], fmt="none", ecolor="black", capsize=5,
                    linewidth=1.2)
    if show_runs:
        for xi, row in zip(x, table.rows):
            values = 100 * np.asarray(row[f"{metric}_values"])
            ax.plot(np.full(values.size, xi, dtype=float), values, linestyle="none", marker="o", markersize=4,
                    color="black", alpha=0.7)
    for xi, m, s in zip(x, means, stds):  # the value above the error bar
        ax.annotate(f"{m:.1f}" + (f" ± {s:.1f}" if not np.isnan(s) else ""), (xi, m + np.nan_to_num(s)),
                    xytext=(0, 5), textcoords="offset points", ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, min(100.0, max(float(np.nanmax(means + np.nan_to_num(stds))) * 1.2, 1.0)))
    ax.grid(True, axis="y", alpha=0.3)
    n = sorted({r["n"] for r in table.rows})
    ax.set_title(f"{metric}: mean ± std over {'/'.join(map(str, n))} runs per setting", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------------------------- confusion
@names_caller("plot_confusion")
def plot_confusion(confusion: ArrayLike, class_names: Optional[Sequence[str]] = None, *,
                   annotate: Optional[bool] = None, cmap: str = "Blues", ax: Optional["Axes"] = None) -> "Figure":
    """A confusion matrix normalised per ground-truth class: row k shows where class k's pixels went.

    Args:
        confusion: (K, K) non-negative integer pixel counts, rows = ground truth, columns = prediction.
        class_names: K names (``class k`` when None).
        annotate: write each cell's percentage (default: when K <= 20).
        cmap: matplotlib colour map of the fractions.
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure: fractions 0..1 (a class without ground-truth pixels is an empty grey row marked "n/a"),
        with a colour bar.
    """
    counts = to_numpy(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise UsageError(f"expected a square (K, K) matrix of counts, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise UsageError(f"expected integer pixel counts, got dtype {counts.dtype} (the normalisation is "
                         "done here)")
    if counts.size and counts.min() < 0:
        raise UsageError(f"counts must be non-negative, got a minimum of {counts.min()}")
    k = counts.shape[0]
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
    if len(names) != k:
        raise UsageError(f"{len(names)} class names for a {k}x{k} matrix")
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fractions = np.where(totals > 0, counts / totals, np.nan)
    fig, ax, shown = class_matrix(ax, fractions, names, cmap, annotate, "predicted", "ground truth")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="fraction of the ground-truth class's pixels")
    return fig
