"""Evaluation: scan->mesh distance per head region, summaries, cumulative error curves, vertex
error to true meshes, jitter (:mod:`tempeh.eval.metrics`); reports (:mod:`tempeh.eval.report`)
and plots / heat-map colours (:mod:`tempeh.eval.plots`). The command is
:mod:`tempeh.cli.evaluate`."""
from tempeh.eval.metrics import (REPORT_REGIONS, ScanToMesh, cumulative_error_curve, jitter,
                                 scan_to_mesh, second_differences, summary, v2v_error)
from tempeh.eval.plots import HEATMAP_MAX_MM, error_colors, plot_cumulative_error

__all__ = [
    "REPORT_REGIONS", "ScanToMesh", "scan_to_mesh", "summary", "cumulative_error_curve",
    "v2v_error", "jitter", "second_differences", "HEATMAP_MAX_MM", "error_colors",
    "plot_cumulative_error",
]
