"""Results of SeMask experiments (arXiv 2112.12782) as tables and plots.

- `plot_class_iou`: per-class IoU bars of one or several results;
- `results_table` / `ResultsTable` and `plot_results`: several runs grouped by setting, mean and spread over
  seeds, optionally with Student-t confidence intervals of the mean (`semask.viz.stats`);
- `paired_differences` / `PairedDifferences`: one setting minus another, seed by seed, with its interval;
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
from semask.viz.stats import check_level, mean_std_interval, t_quantile

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_class_iou", "t_quantile", "ResultsTable", "results_table", "PairedDifferences",
           "paired_differences", "plot_results", "plot_confusion"]


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------- several runs
@dataclass
class ResultsTable:
    """Runs grouped by setting: mean and spread over seeds (see `results_table`).

    Attributes:
        rows: one dict per setting, in first-appearance order: ``group_by`` (the setting), ``"n"`` (runs),
            ``"seeds"`` (their ``seed`` values, None where a run has none), per metric ``"{m}_mean"``,
            ``"{m}_std"`` (sample std, ddof 1; NaN for one value), ``"{m}_values"`` (the runs' values, None
            left out) and, with `ci`, ``"{m}_ci"`` (the half-width of the interval of the mean; NaN for one
            value), and per extra column its mean under the column's own name.
        metrics: the metric keys (fractions, shown in percent, except those in `plain`).
        columns: the extra numeric columns (shown as means).
        group_by: the key that names a setting.
        ci: the confidence level of the intervals (e.g. 0.95), or None for none.
        plain: the metrics shown as they are instead of in percent (entropies, pixels, ratios).
    """

    rows: list[dict[str, Any]]
    metrics: tuple[str, ...]
    columns: tuple[str, ...]
    group_by: str
    ci: Optional[float] = None
    plain: tuple[str, ...] = ()

    def scale(self, metric: str) -> float:
        """What a metric's values are multiplied by for display: 100 (fractions in percent) or 1 (`plain`)."""
        return 1.0 if metric in self.plain else 100.0

    def to_markdown(self, digits: int = 2) -> str:
        """A markdown table: setting, seeds, each metric as ``mean ± std`` (and ``[low, high]``, the interval of
        the mean, with `ci`) in percent or, for `plain` metrics, as they are with one more digit; "n/a" for a
        setting without values; each extra column."""
        level = "" if self.ci is None else f", mean ± std [{100 * self.ci:g}% CI]"
        header = [self.group_by, "seeds"] + [(m if m in self.plain else f"{m} (%)") + level for m in self.metrics]
        header += list(self.columns)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for row in self.rows:
            seeds = [s for s in row["seeds"] if s is not None]
            cells = [str(row[self.group_by]), f"{row['n']}" + (f" ({', '.join(map(str, seeds))})" if seeds else "")]
            for m in self.metrics:
                scale, places = self.scale(m), digits + (m in self.plain)
                mean, std, count = scale * row[f"{m}_mean"], scale * row[f"{m}_std"], len(row[f"{m}_values"])
                cell = "n/a" if count == 0 else f"{mean:.{places}f}"
                if count > 1:
                    cell += f" ± {std:.{places}f}"
                    if self.ci is not None:
                        half = scale * row[f"{m}_ci"]
                        cell += f" [{mean - half:.{places}f}, {mean + half:.{places}f}]"
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


def _check_runs(runs: Sequence[Mapping[str, Any]], group_by: str, keys: Sequence[str],
                optional: Sequence[str] = ()) -> None:
    """Every run a dict holding `group_by` and `keys`, each a number (None allowed for those in `optional`)."""
    if not runs:
        raise UsageError("no runs given")
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise UsageTypeError(f"run {i} is a {type(run).__name__}, expected a dict like "
                                 "{'setting': ..., 'seed': ..., 'mIoU': ...}")
        missing = [k for k in (group_by, *keys) if k not in run]
        if missing:
            raise UsageError(f"run {i} ({run.get(group_by, '?')}) lacks {missing}; it has {sorted(run)}")
        for key in keys:
            if not _is_number(run[key]) and not (run[key] is None and key in optional):
                raise UsageError(f"run {i} ({run[group_by]}) has a non-numeric {key!r}: {run[key]!r}")


@names_caller("results_table")
def results_table(runs: Sequence[Mapping[str, Any]], *, group_by: str = "setting",
                  metrics: Sequence[str] = ("mIoU",), columns: Sequence[str] = (), ci: Optional[float] = None,
                  plain: Sequence[str] = ()) -> ResultsTable:
    """Group runs by setting and summarise each metric over the seeds.

    Args:
        runs: one flat dict per run, e.g. ``{"setting": "SeMask", "seed": 0, "mIoU": 0.612, "params": 2.9e6,
            "train_sec": 431.0}``; metric values are fractions (0..1) as `SegmentationMetric.compute()` gives.
            A metric may be None for a run that does not have it (the prior of a model without semantic layers):
            it is left out of its setting's summary.
        group_by: the key whose value names a run's setting (rows keep the order settings first appear in).
        metrics: keys summarised as mean and sample standard deviation over the runs of a setting.
        columns: further numeric keys reported as their mean (e.g. ``"params"``, ``"train_sec"``).
        ci: also the confidence interval of each mean at this level (e.g. 0.95): Student's t with n - 1 degrees
            of freedom, mean ± t(1 - (1 - ci) / 2, n - 1) std / sqrt(n) (`t_quantile`); None for none.
        plain: the metrics that are not fractions (entropies, distances, ratios): shown as they are.

    Returns:
        A `ResultsTable` (``.rows`` list of dicts, ``.to_markdown()``; Jupyter shows it as a table).

    Raises:
        UsageError: no runs, a run without the `group_by` key, a metric or a column (named in the message), a
            level outside (0, 1), or `plain` naming something that is not a metric.
    """
    metrics, columns, plain, ci = tuple(metrics), tuple(columns), tuple(plain), check_level(ci)
    unknown = [m for m in plain if m not in metrics]
    if unknown:
        raise UsageError(f"plain names {unknown}, which are not among the metrics {list(metrics)}")
    _check_runs(runs, group_by, (*metrics, *columns), optional=metrics)
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run[group_by], []).append(run)
    rows = []
    for setting, members in groups.items():
        row: dict[str, Any] = {group_by: setting, "n": len(members), "seeds": [r.get("seed") for r in members]}
        for m in metrics:
            values = np.asarray([float(r[m]) for r in members if r[m] is not None])
            row[f"{m}_values"] = values.tolist()
            row[f"{m}_mean"], row[f"{m}_std"], half = mean_std_interval(values, ci)
            if ci is not None:
                row[f"{m}_ci"] = half
        for c in columns:
            row[c] = float(np.mean([float(r[c]) for r in members]))
        rows.append(row)
    return ResultsTable(rows=rows, metrics=metrics, columns=columns, group_by=group_by, ci=ci, plain=plain)


@dataclass
class PairedDifferences:
    """Settings compared with baselines seed by seed (see `paired_differences`).

    Attributes:
        rows: one dict per comparison: ``"setting"``, ``"baseline"``, ``"seeds"`` (the paired seeds, sorted),
            ``"differences"`` (setting minus baseline, per seed), ``"n"``, ``"mean"``, ``"std"`` (ddof 1),
            ``"ci"`` (the half-width of the interval of the mean difference), ``"low"`` and ``"high"``; NaN where
            undefined (one pair).
        metric: the metric compared (a fraction unless `plain`).
        ci: the confidence level.
        plain: whether the metric is shown as it is instead of in percentage points.
    """

    rows: list[dict[str, Any]]
    metric: str
    ci: float
    plain: bool = False

    def to_markdown(self, digits: int = 2) -> str:
        """A markdown table: comparison, seeds, the difference per seed, mean ± std and the interval (percentage
        points for a fraction)."""
        scale, places = (1.0, digits + 1) if self.plain else (100.0, digits)
        unit = "" if self.plain else " (points)"
        header = ["comparison", "seeds", f"{self.metric} difference per seed{unit}", f"mean ± std{unit}",
                  f"{100 * self.ci:g}% CI{unit}"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for row in self.rows:
            mean, std, low, high = (scale * row[k] for k in ("mean", "std", "low", "high"))
            per_seed = " / ".join(f"{scale * d:+.{places}f}" for d in row["differences"])
            spread = f" ± {std:.{places}f}" if row["n"] > 1 else ""
            interval = f"[{low:+.{places}f}, {high:+.{places}f}]" if row["n"] > 1 else "n/a"
            lines.append(f"| {row['setting']} − {row['baseline']} | {row['n']} ({', '.join(map(str, row['seeds']))})"
                         f" | {per_seed} | {mean:+.{places}f}{spread} | {interval} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _by_seed(runs: Sequence[Mapping[str, Any]], group_by: str, setting: Any, metric: str) -> dict[Any, float]:
    """{seed: metric} of one setting's runs; every run needs a seed of its own."""
    members = [r for r in runs if r[group_by] == setting]
    if not members:
        settings = list(dict.fromkeys(r[group_by] for r in runs))
        raise UsageError(f"no runs of {setting!r}; the settings are {settings}")
    values: dict[Any, float] = {}
    for run in members:
        seed = run.get("seed")
        if seed is None or seed in values:
            raise UsageError(f"the runs of {setting!r} need one distinct 'seed' each to be paired, got seeds "
                             f"{[r.get('seed') for r in members]}")
        values[seed] = float(run[metric])
    return values


@names_caller("paired_differences")
def paired_differences(runs: Sequence[Mapping[str, Any]], comparisons: Sequence[tuple[Any, Any]], *,
                       metric: str = "mIoU", group_by: str = "setting", ci: float = 0.95,
                       plain: bool = False) -> PairedDifferences:
    """Each setting minus its baseline, seed by seed, and the Student-t interval of the mean difference.

    Runs with the same seed share their initialisation, data order and augmentation, so the difference within a
    seed removes much of what varies between seeds: its interval is often far narrower than the two settings'
    own intervals suggest (and it is the test of "does A beat B": the interval excludes 0).

    Args:
        runs: one flat dict per run with `group_by`, ``"seed"`` and `metric` (as for `results_table`).
        comparisons: ``[(setting, baseline), ...]``, e.g. ``[("SeMask", "plain Swin")]``.
        metric: the metric compared (a fraction, shown in percentage points, unless `plain`).
        group_by: the key that names a run's setting.
        ci: the confidence level of the interval.
        plain: the metric is not a fraction: differences shown as they are.

    Returns:
        A `PairedDifferences` (``.rows``, ``.to_markdown()``; Jupyter shows it as a table).

    Raises:
        UsageError: no runs, a run without its keys or with a non-numeric metric, a setting without runs, runs of
            a setting without distinct seeds, or seeds that one of the two settings lacks (named).
    """
    ci = check_level(ci)
    if ci is None:
        raise UsageError("ci must be a confidence level in (0, 1) such as 0.95, got None")
    _check_runs(runs, group_by, (metric,))
    rows = []
    for pair in comparisons:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise UsageTypeError(f"a comparison is a (setting, baseline) pair, got {pair!r}")
        setting, baseline = pair
        a, b = _by_seed(runs, group_by, setting, metric), _by_seed(runs, group_by, baseline, metric)
        if set(a) != set(b):
            raise UsageError(f"{setting!r} and {baseline!r} must have the same seeds to be paired: only "
                             f"{setting!r} has {sorted(set(a) - set(b), key=str)}, only {baseline!r} has "
                             f"{sorted(set(b) - set(a), key=str)}")
        seeds = sorted(a, key=lambda s: (str(type(s)), s))
        differences = np.asarray([a[s] - b[s] for s in seeds])
        mean, std, half = mean_std_interval(differences, ci)
        rows.append({"setting": setting, "baseline": baseline, "seeds": seeds, "differences": differences.tolist(),
                     "n": len(seeds), "mean": mean, "std": std, "ci": half, "low": mean - half,
                     "high": mean + half})
    return PairedDifferences(rows=rows, metric=metric, ci=ci, plain=plain)


@names_caller("plot_results")
def plot_results(results: Union[ResultsTable, Sequence[Mapping[str, Any]]], metric: str = "mIoU", *,
                 group_by: str = "setting", ci: Optional[float] = None, show_runs: bool = True,
                 ax: Optional["Axes"] = None) -> "Figure":
    """One bar per setting: the mean of `metric` over its runs, the standard deviation (or the confidence
    interval of the mean) as error bar.

    Args:
        results: a `ResultsTable`, or the runs themselves (grouped with `results_table(runs, group_by=..., ci=...)`).
        metric: a metric of the table (a fraction, drawn in percent, unless the table shows it `plain`).
        group_by: the setting key when `results` are runs.
        ci: when grouping runs, draw the interval of the mean at this level instead of the standard deviation;
            a table's own level (`results_table(..., ci=...)`) is used as it is.
        show_runs: also draw each run's value as a dot.
        ax: axes to draw into; a new figure when None.

    Returns:
        The figure (bars in setting order; settings with one run have no error bar).

    Raises:
        UsageError: a metric the table lacks, or a `ci` other than the given table's.
    """
    if isinstance(results, ResultsTable):
        if ci is not None and check_level(ci) != results.ci:
            raise UsageError(f"ci={ci!r} differs from the table's level {results.ci!r}; set it in results_table")
        table = results
    else:
        table = results_table(results, group_by=group_by, metrics=(metric,), ci=ci)
    if metric not in table.metrics:
        raise UsageError(f"{metric!r} is not a metric of this table; it has {list(table.metrics)}")
    fig, ax = single_axes(ax, (max(4.0, 1.1 * len(table.rows) + 1.5), 3.6))
    scale, percent = table.scale(metric), metric not in table.plain
    names = [str(r[table.group_by]) for r in table.rows]
    means = np.asarray([scale * r[f"{metric}_mean"] for r in table.rows])
    spread_key = f"{metric}_ci" if table.ci is not None else f"{metric}_std"
    errors = np.asarray([scale * r[spread_key] for r in table.rows])
    x = np.arange(len(names))
    colours = [f"C{i % 10}" for i in range(len(names))]
    ax.bar(x, means, color=colours, alpha=0.8, width=0.6)
    spread = ~np.isnan(errors)
    if spread.any():
        ax.errorbar(x[spread], means[spread], yerr=errors[spread], fmt="none", ecolor="black", capsize=5,
                    linewidth=1.2)
    if show_runs:
        for xi, row in zip(x, table.rows):
            values = scale * np.asarray(row[f"{metric}_values"])
            ax.plot(np.full(values.size, xi, dtype=float), values, linestyle="none", marker="o", markersize=4,
                    color="black", alpha=0.7)
    for xi, m, e in zip(x, means, errors):  # the value above the error bar
        ax.annotate(f"{m:.1f}" + (f" ± {e:.1f}" if not np.isnan(e) else ""), (xi, m + np.nan_to_num(e)),
                    xytext=(0, 5), textcoords="offset points", ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(f"{metric} (%)" if percent else metric)
    top = float(np.nanmax(means + np.nan_to_num(errors))) * 1.2
    ax.set_ylim(0, min(100.0, max(top, 1.0)) if percent else max(top, 1e-9))
    ax.grid(True, axis="y", alpha=0.3)
    n = sorted({r["n"] for r in table.rows})
    what = "std" if table.ci is None else f"{100 * table.ci:g}% CI of the mean"
    ax.set_title(f"{metric}: mean ± {what} over {'/'.join(map(str, n))} runs per setting", fontsize="medium")
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
