"""Training curves of SeMask runs (arXiv 2112.12782): loss terms, learning rate, validation mIoU and how the
semantic priors develop (each stage's prior mIoU and the decoder's, from the evaluation records).

`plot_training_log` draws one or several runs' ``log.jsonl`` (read by `semask.engine.rundir.read_training_log`);
`LiveTrainingPlot` is a `semask.engine.train` callback that redraws them in place in a notebook while a run goes
on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from semask.engine.rundir import LOG_FILE, read_training_log
from semask.errors import UsageError, UsageTypeError
from semask.viz.figures import figure_axes
from semask.viz.inputs import names_caller

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LogSource", "plot_training_log", "LiveTrainingPlot"]

LogSource = Union[str, os.PathLike, Sequence[Mapping[str, Any]]]
Runs = Union[LogSource, Mapping[str, LogSource], Sequence[Union[str, os.PathLike]]]
LOSS_TERMS = ("loss", "loss_decode", "loss_prior")  # drawn together in the "loss" panel, in this order
LOSS_STYLES = {"loss": "-", "loss_decode": "--", "loss_prior": ":"}
EVAL_FRACTIONS = ("mIoU", "mAcc", "aAcc")  # evaluation metrics stored as fractions, drawn in percent
DEFAULT_PANELS = ("loss", "lr", "mIoU")  # and "prior_mIoU" when the evaluation records have it
PRIOR_PANEL = "prior_mIoU"  # per stage (eval records' prior_mIoU list) and the decoder's (decoder_prior_mIoU)
PRIOR_STYLES = (":", "-.", "--", (0, (5, 1, 1, 1, 1, 1)))  # stage 1, 2, 3, 4 (more stages cycle)
PRIOR_MARKERS = ("v", "s", "^", "D")
Run = tuple[str, list[Mapping[str, Any]]]  # (label, records)


def _one_run(source: LogSource, label: Optional[str]) -> Run:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.parent.name if path.name == LOG_FILE else (path.name if path.is_dir() else path.stem)
        return label or name or str(path), read_training_log(path)
    if isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
        return label or "run", list(source)
    raise UsageTypeError(f"expected a log.jsonl path, a run directory or a list of record dicts, got "
                         f"{type(source).__name__}" + (f" for run {label!r}" if label else ""))


def _log_runs(runs: Runs) -> list[Run]:
    """(label, records) per run from any of the accepted forms of `plot_training_log`'s `runs`."""
    if isinstance(runs, Mapping):
        if "kind" in runs:
            raise UsageTypeError("got a single log record; pass a list of records, a path, or a mapping "
                                 "{label: run}")
        if not runs:
            raise UsageError("the mapping of runs is empty")
        return [_one_run(source, str(label)) for label, source in runs.items()]
    if isinstance(runs, Sequence) and not isinstance(runs, str) and runs and \
            all(isinstance(r, (str, os.PathLike)) for r in runs):
        return [_one_run(source, None) for source in runs]
    if isinstance(runs, Sequence) and not isinstance(runs, str) and not runs:
        raise UsageError("no runs given (an empty list)")
    return [_one_run(runs, None)]


def _check_records(label: str, records: Sequence[Mapping[str, Any]]) -> None:
    for i, record in enumerate(records):
        kind = record.get("kind")
        if kind is None:
            raise UsageError(f"record {i} of run {label!r} has no 'kind' (expected 'train' or 'eval'): "
                             f"{dict(record)}")
        needed = {"train": ("iter",), "eval": ("iter", "mIoU")}.get(kind, ())
        missing = [k for k in needed if k not in record]
        if missing:
            raise UsageError(f"{kind} record {i} of run {label!r} lacks {missing}: {dict(record)}")


def _has_priors(loaded: Sequence[Run]) -> bool:
    return any(r.get("kind") == "eval" and any(v is not None for v in (r.get(PRIOR_PANEL) or ()))
               for _, records in loaded for r in records)


def _default_panels(loaded: Sequence[Run]) -> tuple[str, ...]:
    """loss, lr and mIoU, and the priors' panel when some evaluation record holds a stage's prior mIoU."""
    return DEFAULT_PANELS + ((PRIOR_PANEL,) if _has_priors(loaded) else ())


def _prior_series(label: str, records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{"stage i" | "decoder": [(iter, prior mIoU), ...]}`` of one run's evaluation records (None left out)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(records):
        if r.get("kind") != "eval" or r.get(PRIOR_PANEL) is None:
            continue
        stages = r[PRIOR_PANEL]
        if not isinstance(stages, (list, tuple)):
            raise UsageError(f"eval record {i} of run {label!r}: {PRIOR_PANEL} must be a list with one value per "
                             f"stage (None where a stage has no semantic layer), got {stages!r}")
        for s, value in enumerate(stages):
            if value is not None:
                series.setdefault(f"stage {s + 1}", []).append((r["iter"], value))
        if r.get("decoder_prior_mIoU") is not None:
            series.setdefault("decoder", []).append((r["iter"], r["decoder_prior_mIoU"]))
    return series


def _prior_style(name: str) -> dict[str, Any]:
    if name == "decoder":
        return {"linestyle": "-", "marker": "o", "linewidth": 2.0}
    s = int(name.split()[1]) - 1
    return {"linestyle": PRIOR_STYLES[s % len(PRIOR_STYLES)], "marker": PRIOR_MARKERS[s % len(PRIOR_MARKERS)],
            "linewidth": 1.2}


def _draw_priors(ax: "Axes", loaded: Sequence[Run], colours: Sequence[str]) -> list[str]:
    """Every run's prior mIoU per stage and of the decoder (percent); returns the series drawn, for the legend."""
    drawn: list[str] = []
    for (label, records), colour in zip(loaded, colours):
        series = _prior_series(label, records)
        for name in sorted(series, key=lambda n: (n == "decoder", n)):
            x, y = np.asarray(series[name], dtype=np.float64).T
            ax.plot(x, 100.0 * y, color=colour, markersize=4, label=f"{label}: {name} prior", **_prior_style(name))
            if name not in drawn:
                drawn.append(name)
    return sorted(drawn, key=lambda n: (n == "decoder", n))


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    if window <= 1 or values.size == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    starts = np.arange(1, values.size + 1) - counts
    return (csum[1:] - csum[starts]) / counts


def _draw_lines(ax: "Axes", panel: str, loaded: Sequence[Run], colours: Sequence[str], smooth: int) -> list[str]:
    """Every run's lines of a loss, evaluation-metric or training-key panel; returns the loss terms drawn."""
    drawn_terms: list[str] = []
    for (label, records), colour in zip(loaded, colours):
        if panel in EVAL_FRACTIONS:
            points = [(r["iter"], r[panel]) for r in records if r["kind"] == "eval" and r.get(panel) is not None]
            if points:
                x, y = np.asarray(points, dtype=np.float64).T
                ax.plot(x, 100.0 * y, marker="o", markersize=4, color=colour, label=f"{label}: {panel}")
            continue
        train = [r for r in records if r["kind"] == "train"]
        for key in (LOSS_TERMS if panel == "loss" else (panel,)):
            points = [(r["iter"], r[key]) for r in train if r.get(key) is not None]
            if not points:
                continue
            x, y = np.asarray(points, dtype=np.float64).T
            ax.plot(x, _moving_average(y, smooth), linestyle=LOSS_STYLES.get(key, "-"), color=colour,
                    linewidth=1.2, label=f"{label}: {key}")
            if key not in drawn_terms:
                drawn_terms.append(key)
    return drawn_terms


def _draw_panel(ax: "Axes", panel: str, loaded: Sequence[Run], colours: Sequence[str], smooth: int) -> list[Any]:
    """One panel: every run's lines of `panel`, labelled ``"{run}: {key}"``; "no ... in the log" when none.
    Returns the legend entries that name its line styles (loss terms, prior stages), for the caller to draw."""
    from matplotlib.lines import Line2D

    if panel == PRIOR_PANEL:
        drawn_terms = _draw_priors(ax, loaded, colours)
    else:
        drawn_terms = _draw_lines(ax, panel, loaded, colours, smooth)
    if not ax.lines:
        ax.text(0.5, 0.5, f"no {panel!r} in the log" if panel != "loss" else "no loss in the log",
                ha="center", va="center", transform=ax.transAxes, color="gray")
    ylabel = {"loss": "training loss", "lr": "learning rate", PRIOR_PANEL: "prior mIoU (%)"}.get(panel, panel)
    if panel in EVAL_FRACTIONS:
        ylabel = f"validation {panel} (%)"
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if panel == "loss" and len(drawn_terms) > 1:  # line styles name the loss terms
        return [Line2D([], [], color="black", linestyle=LOSS_STYLES[t], label=t) for t in drawn_terms]
    if panel == PRIOR_PANEL and drawn_terms:  # line styles and markers name the stages
        return [Line2D([], [], color="black", markersize=4, label=n, **_prior_style(n)) for n in drawn_terms]
    return []


@names_caller("plot_training_log")
def plot_training_log(runs: Runs, panels: Optional[Sequence[str]] = None, *, smooth: int = 1,
                      axes: Optional[Sequence["Axes"]] = None) -> "Figure":
    """Training curves of one or several runs against the iteration.

    Args:
        runs: one run — a ``log.jsonl`` path, a run directory holding one, or a list of record dicts — or
            several: a list of paths/directories (labelled by directory name), or a mapping ``{label: run}``
            of any of those. Runs are overlaid, one colour each.
        panels: what to draw, one axes each: ``"loss"`` (the loss terms present among loss, loss_decode and
            loss_prior, one line style each), ``"mIoU"`` / ``"mAcc"`` / ``"aAcc"`` (validation, in percent,
            from the evaluation lines), ``"prior_mIoU"`` (how the semantic priors develop: each stage's prior
            mIoU and the decoder's summed prior's, in percent, one line style and marker each, from the
            evaluation lines of ``eval.prior_metrics``) or any other numeric key of the training lines
            (``"lr"``, ``"grad_norm"``, ``"images_per_s"``, ``"peak_memory_mb"``, ...). Default: loss, lr and
            mIoU, and prior_mIoU when an evaluation line holds a stage's prior mIoU.
        smooth: trailing moving average over this many training lines (1 = raw values); evaluation points are
            never smoothed.
        axes: one axes per panel to draw into; a new figure when None.

    Returns:
        The figure. Each data line is labelled ``"{run}: {key}"``; a panel with no data says so.
    """
    from matplotlib.lines import Line2D

    if panels is not None and not panels:
        raise UsageError("no panels asked for")
    if smooth < 1:
        raise UsageError(f"smooth must be at least 1 (training lines averaged), got {smooth}")
    loaded = _log_runs(runs)
    for label, records in loaded:
        _check_records(label, records)
    panels = _default_panels(loaded) if panels is None else tuple(panels)
    fig, flat = figure_axes(axes, 1, len(panels))
    if axes is None:
        fig.set_size_inches(4.2 * len(panels), 3.2)
    colours = [f"C{i % 10}" for i in range(len(loaded))]
    styles = [_draw_panel(ax, panel, loaded, colours, smooth) for ax, panel in zip(flat, panels)]
    if len(loaded) > 1:  # colours name the runs, once for the figure, in the last panel's legend
        styles[-1] = [Line2D([], [], color=c, label=label) for (label, _), c in zip(loaded, colours)] + styles[-1]
    for ax, panel, handles in zip(flat, panels, styles):
        if handles:
            ax.legend(handles=handles, fontsize="small", loc="upper right" if panel == "loss" else "best",
                      ncol=2 if len(handles) > 5 else 1)  # runs and stages: two short columns
    if smooth > 1:
        fig.suptitle(f"training lines smoothed over {smooth} points", fontsize="small")
    return fig


class LiveTrainingPlot:
    """A `semask.engine.train` callback that redraws `plot_training_log` in place in a notebook while a run goes on.

        live = LiveTrainingPlot(every=5)
        result = semask.train(config, work_dir, callback=live)

    Args:
        panels, smooth: as for `plot_training_log` (by default the priors' panel joins once an evaluation has
            recorded them).
        every: redraw after every ``every``-th training line (and after every evaluation).
        show: how to show a figure; default: IPython's ``display`` with a display id, updated in place (outside
            IPython nothing is shown). Tests pass a function.

    Attributes:
        records: every record received so far (the run's history).
        draws: how many times the curves were drawn.
    """

    @names_caller("LiveTrainingPlot")
    def __init__(self, panels: Optional[Sequence[str]] = None, every: int = 1, smooth: int = 1,
                 show: Optional[Any] = None) -> None:
        if every < 1:
            raise UsageError(f"every must be at least 1, got {every}")
        self.panels = None if panels is None else tuple(panels)
        self.every, self.smooth, self.show = every, smooth, show
        self.records: list[dict[str, Any]] = []
        self.draws = 0
        self._handle: Any = None

    def __call__(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))
        trains = sum(r["kind"] == "train" for r in self.records)
        if record.get("kind") == "eval" or (record.get("kind") == "train" and trains % self.every == 0):
            self.redraw()

    def redraw(self) -> None:
        """Draw the curves of the records so far (replacing the previous drawing)."""
        import matplotlib.pyplot as plt

        if not any(r.get("kind") == "train" for r in self.records):
            return
        fig = plot_training_log(self.records, self.panels, smooth=self.smooth)
        self.draws += 1
        if self.show is not None:
            self.show(fig)
        else:
            try:
                from IPython.display import display
            except ImportError:  # not in IPython: the log file and the progress bar are the live view
                pass
            else:
                if self._handle is None:
                    self._handle = display(fig, display_id=True)
                else:
                    self._handle.update(fig)
        plt.close(fig)
