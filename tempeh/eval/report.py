"""Evaluation reports: ``metrics.json``, ``per_frame.csv`` and Markdown tables.

``metrics.json`` (written by ``tempeh.cli.evaluate``) holds, with every distance in mm:

* ``scan_to_mesh_mm.<region>.{median, mean, std, count}`` for ``all`` and each of ``face``,
  ``scalp``, ``neck`` the template has: statistics over ALL scan points of all evaluated frames
  POOLED together (not a mean of per-frame medians); ``std`` is the population std;
* ``v2v_gt_mm.{median, mean, std, count}`` (pooled over all vertices of the frames that have a
  true mesh) when any frame has one;
* ``jitter_mm`` (and ``jitter_gt_mm``) when some sequence has >= 3 evaluated frames;
* ``counts``, ``frames`` (evaluated frames ``"subject/sequence/frame"``), ``missing``,
  ``failed`` and ``settings``.

A statistic with no values is written as ``null`` (JSON has no NaN) and printed as ``-``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tempeh.io.jsonio import read_json
from tempeh.errors import TempehDataError
from tempeh.io.mesh import atomic_write

__all__ = [
    "DECIMALS",
    "STATS",
    "clean_json",
    "write_json",
    "load_metrics",
    "region_table",
    "compare_table",
    "write_csv",
    "fmt",
    "stats_columns",
]

PathLike = Union[str, os.PathLike]

#: Decimals of millimetre values in printed tables.
DECIMALS = 3
STATS = ("median", "mean", "std")


def fmt(value, decimals: int = DECIMALS) -> str:
    """A table cell: ``value`` with ``decimals`` decimals, ``-`` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{decimals}f}"


def clean_json(obj):
    """Replace NaN/inf floats by None (recursively) so the result is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def write_json(path: PathLike, obj) -> Path:
    """Write ``obj`` as strict, indented JSON atomically."""
    path = Path(path)
    with atomic_write(path, "w") as fh:
        json.dump(clean_json(obj), fh, indent=2, allow_nan=False)
        fh.write("\n")
    return path


def load_metrics(run: PathLike) -> dict:
    """Read ``<run>/metrics.json`` (``run`` may also be the file itself)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise TempehDataError(path, "metrics.json not found (is this an evaluate --out folder?)")
    data = read_json(path, object)
    if not isinstance(data, dict) or not isinstance(data.get("scan_to_mesh_mm", {}), dict):
        raise TempehDataError(path, "not an evaluation metrics.json (no 'scan_to_mesh_mm' object)")
    return data


def _md(rows: Sequence[Sequence[str]]) -> str:
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def region_table(metrics: Mapping) -> str:
    """Markdown table of one evaluation: a row per region of ``scan_to_mesh_mm`` (``all``
    first), then a ``v2v to gt`` row when present. Columns: median, mean, std (mm), count."""
    rows = [["region", "median [mm]", "mean [mm]", "std [mm]", "count"]]
    for name, s in metrics.get("scan_to_mesh_mm", {}).items():
        rows.append([name] + [fmt(s.get(k)) for k in STATS] + [fmt(s.get("count"))])
    v2v = metrics.get("v2v_gt_mm")
    if v2v:
        rows.append(["v2v to gt"] + [fmt(v2v.get(k)) for k in STATS] + [fmt(v2v.get("count"))])
    return _md(rows)


def compare_table(runs: Sequence[Tuple[str, Mapping]]) -> str:
    """Markdown table comparing evaluations: a row per ``(name, metrics)``; columns are
    ``<region> median/mean/std`` for every region any run has (``all, face, scalp, neck``
    order first), then ``v2v median/mean`` and ``jitter`` when any run has them (``-`` where a
    run lacks a value). All values mm."""
    regions: List[str] = []
    for _, m in runs:
        for r in m.get("scan_to_mesh_mm", {}):
            if r not in regions:
                regions.append(r)
    order = ["all", "face", "scalp", "neck"]
    seen = list(regions)
    regions = sorted(seen, key=lambda r: (order.index(r) if r in order else len(order), seen.index(r)))
    has_v2v = any(m.get("v2v_gt_mm") for _, m in runs)
    has_jit = any(m.get("jitter_mm") is not None for _, m in runs)
    header = ["run"] + [f"{r} {s}" for r in regions for s in STATS]
    header += ["v2v median", "v2v mean"] if has_v2v else []
    header += ["jitter"] if has_jit else []
    rows = [header]
    for name, m in runs:
        s2m = m.get("scan_to_mesh_mm", {})
        row = [name] + [fmt(s2m.get(r, {}).get(s)) for r in regions for s in STATS]
        if has_v2v:
            v = m.get("v2v_gt_mm") or {}
            row += [fmt(v.get("median")), fmt(v.get("mean"))]
        if has_jit:
            row.append(fmt(m.get("jitter_mm")))
        rows.append(row)
    return _md(rows)


def write_csv(path: PathLike, rows: Sequence[Mapping[str, object]],
              columns: Optional[Sequence[str]] = None) -> Path:
    """Write dict rows as CSV atomically (columns: ``columns`` or the union in first-seen
    order; NaN/None cells are empty)."""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in r.items()})
    path = Path(path)
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())
    return path


def stats_columns(prefix: str, s: Optional[Mapping]) -> Dict[str, object]:
    """``{prefix_median, prefix_mean, prefix_std, prefix_count}`` of a summary (empty when
    ``s`` is None)."""
    s = s or {}
    return {f"{prefix}_{k}": s.get(k) for k in (*STATS, "count")}
