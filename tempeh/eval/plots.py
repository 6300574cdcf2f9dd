"""Plots and colour maps of evaluation results (matplotlib with the Agg canvas, no display).

* :func:`error_colors` maps distances to RGB for error heat maps: blue at 0 mm through cyan,
  green and yellow to pure red at ``>= max_mm`` (3 mm by default, as in the paper's figures).
* :func:`plot_cumulative_error` draws cumulative error curves (x: error in mm, y: fraction of
  scan points with at most that error) into a PNG.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Mapping, Tuple, Union

import numpy as np

from tempeh.io.mesh import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["HEATMAP_MAX_MM", "error_colors", "plot_cumulative_error"]

PathLike = Union[str, os.PathLike]

#: Distance shown as pure red in heat maps, mm (paper: "red means >= 3 millimeter").
HEATMAP_MAX_MM = 3.0

# Colour ramp stops (t in [0, 1] -> RGB in [0, 1]): blue, cyan, green, yellow, red.
_RAMP_T = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_RGB = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0],
                      [1.0, 0.0, 0.0]])


def error_colors(dist, max_mm: float = HEATMAP_MAX_MM) -> np.ndarray:
    """Heat-map colours of distances.

    Args:
        dist: ``(P,)`` distances, mm (>= 0).
        max_mm: distance at and above which the colour is pure red ``(255, 0, 0)``.
    Returns:
        ``(P, 3)`` uint8 RGB; 0 mm is pure blue ``(0, 0, 255)``, linear in between over the
        stops blue, cyan, green, yellow, red (equally spaced).
    """
    if not max_mm > 0:
        raise ValueError(f"max_mm must be > 0, got {max_mm}")
    t = np.clip(np.asarray(dist, dtype=np.float64).reshape(-1) / float(max_mm), 0.0, 1.0)
    rgb = np.stack([np.interp(t, _RAMP_T, _RAMP_RGB[:, k]) for k in range(3)], axis=1)
    return np.round(rgb * 255.0).astype(np.uint8)


def plot_cumulative_error(path: PathLike, curves: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                          title: str = "Scan-to-mesh cumulative error") -> Path:
    """Write a PNG of cumulative error curves (atomically).

    Args:
        path: output ``.png``.
        curves: label -> ``(x (S,) mm, frac (S,) in [0, 1])`` as from
            :func:`tempeh.eval.metrics.cumulative_error_curve`.
        title: figure title.
    Returns:
        ``Path(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (x, frac) in curves.items():
        style = {"color": "black", "linewidth": 2.0} if label.split(" ")[0] == "all" else {}
        ax.plot(np.asarray(x), 100.0 * np.asarray(frac), label=label, **style)
    ax.set_xlabel("error [mm]")
    ax.set_ylabel("scan points with error <= x [%]")
    ax.set_ylim(0.0, 100.0)
    ax.set_xlim(left=0.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if curves:
        ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path
