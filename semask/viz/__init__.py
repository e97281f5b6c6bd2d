"""Pictures of semask (arXiv 2112.12782): label maps and overlays, plots of priors, attention, training logs and
results, and the Jupyter apps (explorer, comparison).

- `semask.viz.labels`: `colorize`, `overlay`, `save_label_map`, `denormalize`, `error_map`, `class_legend`;
- `semask.viz.panels`: `plot_segmentation`, `plot_samples`, `plot_evaluation_panel`;
- `semask.viz.stages`: `plot_stage_priors`, `plot_attention` and `stage_to_image`, the one mapping from a stage's
  feature grid to image pixels;
- `semask.viz.training`: `plot_training_log`, `LiveTrainingPlot`;
- `semask.viz.results`: `plot_class_iou`, `results_table` / `ResultsTable` (mean, spread and confidence interval
  over seeds), `paired_differences` / `PairedDifferences`, `plot_results`, `plot_confusion`;
- `semask.viz.analysis`: `analyse_image` / `ImageAnalysis`, one image through one model for the apps;
- `semask.viz.analysis_plots`: `plot_stage_analysis`, `plot_class_attention`, the plots of `semask.analyze`;
- `semask.viz.explorer`, `semask.viz.compare`: the ipywidgets apps `Explorer` and `compare` (the explorer's
  "all stages" figure and per-image measures in `semask.viz.explorer_figures`, its timeline of a run's snapshots
  in `semask.viz.timeline`);
- `semask.viz.page`: `save_page` / `page_source`, the explorer as one self-contained HTML page
  (`Explorer.save_html`, ``semask analyze --html``).

Importing semask.viz imports neither pyplot (no matplotlib backend is chosen) nor ipywidgets or ipympl; the plot
functions and the apps import them when called.
"""
from semask.viz.analysis import ImageAnalysis, analyse_image, semantic_gammas
from semask.viz.analysis_plots import plot_class_attention, plot_stage_analysis
from semask.viz.compare import Comparison, compare
from semask.viz.explorer import VIEWS, Explorer
from semask.viz.labels import (ERROR_CLASSES, ERROR_PALETTE, class_legend, colorize, default_palette, denormalize,
                               error_map, overlay, save_label_map)
from semask.viz.panels import plot_evaluation_panel, plot_samples, plot_segmentation
from semask.viz.results import (PairedDifferences, ResultsTable, paired_differences, plot_class_iou, plot_confusion,
                                plot_results, results_table)
from semask.viz.stages import plot_attention, plot_stage_priors, stage_to_image
from semask.viz.training import LiveTrainingPlot, plot_training_log

__all__ = [
    "default_palette",
    "colorize",
    "overlay",
    "save_label_map",
    "denormalize",
    "ERROR_CLASSES",
    "ERROR_PALETTE",
    "error_map",
    "class_legend",
    "plot_segmentation",
    "plot_samples",
    "plot_evaluation_panel",
    "plot_stage_priors",
    "plot_attention",
    "stage_to_image",
    "plot_training_log",
    "LiveTrainingPlot",
    "plot_class_iou",
    "ResultsTable",
    "results_table",
    "PairedDifferences",
    "paired_differences",
    "plot_results",
    "plot_confusion",
    "ImageAnalysis",
    "analyse_image",
    "semantic_gammas",
    "plot_stage_analysis",
    "plot_class_attention",
    "VIEWS",
    "Explorer",
    "Comparison",
    "compare",
]
