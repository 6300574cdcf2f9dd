"""``evaluate``: score predicted meshes against a capture's scans and true meshes.

Usage::

    evaluate --pred DIR --data DIR --list LIST.json --out DIR [--template DIR]
             [--pred-units m|cm|mm] [--max-points K] [--seed S] [--regions face,scalp,neck]
             [--heatmaps K] [--heatmap-max-mm 3] [--curve-max-mm 5] [--allow-missing]
             [--compare RUN_A RUN_B ...]
    evaluate --compare RUN_A RUN_B ...

``--pred`` is any tree in the registrations layout, ``<subject>/<sequence>/<sequence>.<frame>.ply``
in ``--pred-units`` (metres by default, as registrations and true meshes are), so a capture's own
``gt_meshes/`` folder scores zero vertex error. Frames come from ``--list`` (a data list of the
capture ``--data``). Per frame:

* scan->mesh: the exact point-to-surface distance from every point of the frame's scan (in the
  capture's scan units; ``--max-points K`` keeps a seeded random subset of K points) to the
  predicted surface, in the world frame as predicted (NO alignment of any kind); each scan
  point is assigned to the template vertex nearest to it among the corners of its closest face,
  and counts in every region (``--regions``, from ``<data>/template/regions.npz`` or
  ``--template``) holding that vertex, see :mod:`tempeh.eval.metrics`;
* v2v: the per-vertex error to ``gt_meshes/`` when the frame has a true mesh, and its split
  into pose and shape (:func:`tempeh.eval.metrics.pose_split`: rotation and centroid error of
  the rigid fit to the true mesh, scale and residual of the similarity fit), reported per frame
  and as medians over frames;
* jitter: the mean norm of the second difference of the predicted vertices over consecutive
  listed frames of a sequence (frames ordered by number), when a sequence has >= 3 of them.

Outputs in ``--out``: ``metrics.json`` (statistics POOLED over all scan points of all frames;
see :mod:`tempeh.eval.report`), ``per_frame.csv``, ``cumulative_error.png`` and, for the
first ``--heatmaps`` frames, ``heatmaps/<subject>/<sequence>/<sequence>.<frame>.ply``: the scan
points (mm) coloured by distance, blue at 0 to red at >= ``--heatmap-max-mm``. A Markdown table
per region is printed. ``--compare`` prints a Markdown table comparing the ``metrics.json`` of
earlier ``--out`` folders (after this run's own, when ``--pred`` is given too).

A listed frame without a prediction is an error naming the expected file (nothing is
evaluated), unless ``--allow-missing`` (then it is counted and listed in ``metrics.json``).
Exit code: 0 ok, 1 a frame failed or data is missing/bad, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from tempeh.cli.common import parse_cli
from tempeh.errors import TempehDataError
from tempeh.eval.metrics import (REPORT_REGIONS, PoseSplit, cumulative_error_curve, pose_split,
                                 scan_to_mesh, second_differences, summary, v2v_error)
from tempeh.eval.plots import HEATMAP_MAX_MM, error_colors, plot_cumulative_error
from tempeh.eval.report import (compare_table, load_metrics, region_table, stats_columns,
                                write_csv, write_json)
from tempeh.io.layout import CaptureLayout, FrameId, frame_file, read_data_list
from tempeh.io.mesh import read_mesh, read_points, write_points
from tempeh.io.templates import load_template_dir
from tempeh.template import Template

logger = logging.getLogger(__name__)

__all__ = ["main", "pred_path", "evaluate", "compare"]


def pred_path(pred_root: Path, fid: FrameId) -> Path:
    """``<pred_root>/<subject>/<sequence>/<sequence>.<frame>.ply``, or the ``.obj`` of that name
    when only it exists (``register_sequence --format obj``); the ``.ply`` path when neither does."""
    ply, obj = frame_file(pred_root, fid, "ply"), frame_file(pred_root, fid, "obj")
    return obj if (obj.is_file() and not ply.is_file()) else ply


def _frame_key(frame: str):
    return (0, int(frame), frame) if frame.isdigit() else (1, 0, frame)


@dataclass
class _Frame:
    """What one evaluated frame contributes."""

    fid: FrameId
    pred: Path
    verts: np.ndarray
    region_dists: Dict[str, np.ndarray] = field(default_factory=dict)
    scan: Optional[Path] = None
    scan_points: int = 0
    v2v: Optional[np.ndarray] = None
    gt_verts: Optional[np.ndarray] = None
    pose: Optional[PoseSplit] = None


def _evaluate_frame(fid: FrameId, args, layout: CaptureLayout, template: Optional[Template],
                    regions: Sequence[str], heatmap: bool) -> _Frame:
    path = pred_path(args.pred, fid)
    verts, faces = read_mesh(path, units=args.pred_units)
    if template is not None and verts.shape[0] != template.num_verts:
        raise TempehDataError(path, f"prediction has {verts.shape[0]} vertices but the template "
                                    f"has {template.num_verts}")
    out = _Frame(fid, path, verts)
    scan = layout.find_scan(fid)
    gt = layout.gt_mesh_path(fid)
    if scan is None and not gt.is_file():
        raise TempehDataError(layout.root / "scans" / fid.subject / fid.sequence,
                              f"frame {fid}: no scan and no true mesh "
                              f"({gt}) to evaluate against")
    if scan is not None:
        pts = read_points(scan, units=layout.scan_units)
        if args.max_points and pts.shape[0] > args.max_points:
            rng = np.random.default_rng([args.seed, zlib.crc32(str(fid).encode())])
            pts = pts[np.sort(rng.choice(pts.shape[0], args.max_points, replace=False))]
        res = scan_to_mesh(pts, verts, faces, template.regions if template else None,
                           regions=regions)
        out.scan, out.scan_points, out.region_dists = scan, pts.shape[0], res.region_dists()
        if heatmap:
            hp = frame_file(args.out / "heatmaps", fid)
            write_points(hp, pts, units="mm", colors=error_colors(res.dist, args.heatmap_max_mm))
    if gt.is_file():
        gv, _ = read_mesh(gt, units=layout.mesh_units)
        if gv.shape != verts.shape:
            raise TempehDataError(path, f"prediction has {verts.shape[0]} vertices but the true "
                                        f"mesh {gt} has {gv.shape[0]}")
        out.v2v, out.gt_verts = v2v_error(verts, gv), gv
        try:
            out.pose = pose_split(verts, gv)
        except ValueError as err:  # a degenerate (e.g. collapsed) prediction: v2v still counts
            logger.warning("%s: no pose split (%s)", path, err)
    return out


def _jitter(done: List[_Frame]) -> Tuple[Optional[float], Optional[float], Dict[str, float]]:
    """Pooled jitter of predictions (and of true meshes where a whole sequence has them)."""
    by_seq: Dict[Tuple[str, str], List[_Frame]] = {}
    for fr in done:
        by_seq.setdefault((fr.fid.subject, fr.fid.sequence), []).append(fr)
    pred_parts, gt_parts, per_seq = [], [], {}
    for (s, q), frs in by_seq.items():
        if len(frs) < 3:
            continue
        frs = sorted(frs, key=lambda fr: _frame_key(fr.fid.frame))
        d = second_differences(np.stack([fr.verts for fr in frs]))
        pred_parts.append(d.reshape(-1))
        per_seq[f"{s}/{q}"] = float(d.mean())
        if all(fr.gt_verts is not None for fr in frs):
            gt_parts.append(second_differences(np.stack([fr.gt_verts for fr in frs])).reshape(-1))
    jit = float(np.concatenate(pred_parts).mean()) if pred_parts else None
    jit_gt = float(np.concatenate(gt_parts).mean()) if gt_parts else None
    return jit, jit_gt, per_seq


def _load_template(args, layout: CaptureLayout) -> Optional[Template]:
    tdir = args.template if args.template is not None else layout.template_dir
    if args.template is None and not tdir.is_dir():
        logger.warning("%s: no template folder; only the 'all' region is reported", tdir)
        return None
    return load_template_dir(tdir)


def evaluate(args) -> int:
    """Run an evaluation from parsed arguments (see the module docstring); returns the exit
    code (``args.wrote_metrics`` tells whether ``metrics.json`` was written)."""
    args.wrote_metrics = False
    try:
        layout = CaptureLayout(args.data)
        frames = read_data_list(args.list)
        template = _load_template(args, layout)
    except TempehDataError as err:
        print(err)
        return 1
    regions = [r for r in args.regions if template is not None and r in template.regions]
    lacking = [r for r in args.regions if r not in regions]
    if lacking and template is not None:
        logger.warning("template '%s' has no region(s) %s; those rows are omitted",
                       template.name, lacking)

    missing = [fid for fid in frames if not pred_path(args.pred, fid).is_file()]
    if missing and not args.allow_missing:
        for fid in missing:
            print(f"{pred_path(args.pred, fid)}: prediction missing for frame {fid}")
        print(f"{len(missing)} of {len(frames)} listed frames have no prediction in {args.pred} "
              "(pass --allow-missing to evaluate the others)")
        return 1
    missing_set = set(missing)

    done: List[_Frame] = []
    failed: List[Tuple[FrameId, str]] = []
    rows = []
    region_names = ["all"] + regions
    for fid in tqdm(frames, desc="evaluate", unit="frame", disable=None):
        row = {"subject": fid.subject, "sequence": fid.sequence, "frame": fid.frame}
        if fid in missing_set:
            rows.append({**row, "status": "missing", "pred": str(pred_path(args.pred, fid))})
            continue
        heat = args.heatmaps < 0 or len(done) < args.heatmaps
        try:
            fr = _evaluate_frame(fid, args, layout, template, regions, heat)
        except (TempehDataError, ValueError) as err:
            failed.append((fid, str(err)))
            rows.append({**row, "status": "failed", "pred": str(pred_path(args.pred, fid)),
                         "error": str(err)})
            continue
        done.append(fr)
        row.update(status="ok", pred=str(fr.pred), scan=str(fr.scan or ""),
                   scan_points=fr.scan_points)
        for r in region_names:
            row.update(stats_columns(f"s2m_{r}", summary(fr.region_dists[r])
                                     if fr.scan is not None else None))
        row.update(stats_columns("v2v", summary(fr.v2v) if fr.v2v is not None else None))
        if fr.pose is not None:
            row.update({f"pose_{k}": round(v, 6) for k, v in asdict(fr.pose).items()})
        rows.append(row)

    pooled = {r: np.concatenate([fr.region_dists[r] for fr in done if fr.scan is not None]
                                or [np.zeros(0)]) for r in region_names}
    metrics: dict = {"scan_to_mesh_mm": {r: summary(d) for r, d in pooled.items()}}
    with_gt = [fr for fr in done if fr.v2v is not None]
    if with_gt:
        metrics["v2v_gt_mm"] = summary(np.concatenate([fr.v2v for fr in with_gt]))
    with_pose = [fr.pose for fr in with_gt if fr.pose is not None]
    if with_pose:
        metrics["pose_split_median"] = {k: float(np.median([getattr(p, k) for p in with_pose]))
                                        for k in PoseSplit.__dataclass_fields__}
    jit, jit_gt, per_seq = _jitter(done)
    if jit is not None:
        metrics["jitter_mm"] = jit
        metrics["jitter_per_sequence_mm"] = per_seq
    if jit_gt is not None:
        metrics["jitter_gt_mm"] = jit_gt
    x, _ = cumulative_error_curve(np.zeros(0), args.curve_max_mm, args.curve_steps)
    curves = {r: cumulative_error_curve(d, args.curve_max_mm, args.curve_steps)
              for r, d in pooled.items()}
    metrics["cumulative_error"] = {"x_mm": x.tolist(),
                                   "fraction": {r: c[1].tolist() for r, c in curves.items()}}
    metrics["counts"] = {
        "frames_listed": len(frames), "frames_evaluated": len(done),
        "frames_missing": len(missing), "frames_failed": len(failed),
        "frames_with_scan": sum(fr.scan is not None for fr in done),
        "frames_with_gt": len(with_gt), "frames_with_pose_split": len(with_pose),
        "scan_points": int(pooled["all"].size),
    }
    metrics["frames"] = [str(fr.fid) for fr in done]
    metrics["missing"] = [str(f) for f in missing]
    metrics["failed"] = [{"frame": str(f), "error": e} for f, e in failed]
    metrics["settings"] = {
        "pred": str(args.pred), "pred_units": args.pred_units, "data": str(args.data),
        "list": str(args.list), "template": (template.name if template else None),
        "template_regions": {r: int(template.regions[r].size) for r in regions} if template else {},
        "max_points": args.max_points, "seed": args.seed, "alignment": "none",
        "pose_split": "diagnostic only: least-squares rigid and similarity fits of each "
                      "prediction to its true mesh; the scores above are unaligned",
        "statistics": "pooled over all scan points (vertices for v2v) of all evaluated frames; "
                      "std is the population std",
        "region_assignment": "nearest corner of the closest predicted face; overlapping "
                             "regions count a point in each",
    }

    out = args.out
    write_json(out / "metrics.json", metrics)
    args.wrote_metrics = True
    csv_cols = (["subject", "sequence", "frame", "status", "pred", "scan", "scan_points"]
                + [f"s2m_{r}_{k}" for r in region_names for k in ("median", "mean", "std", "count")]
                + [f"v2v_{k}" for k in ("median", "mean", "std", "count")]
                + [f"pose_{k}" for k in PoseSplit.__dataclass_fields__] + ["error"])
    write_csv(out / "per_frame.csv", rows, csv_cols)
    plot_cumulative_error(out / "cumulative_error.png",
                          {f"{r} (median {np.median(pooled[r]):.3f} mm)": c
                           for r, c in curves.items() if pooled[r].size})

    print(f"## Scan-to-mesh error ({len(done)} frames, {pooled['all'].size} scan points)\n")
    print(region_table(metrics))
    if with_pose:
        ps = metrics["pose_split_median"]
        print(f"\nvertex error split (medians over {len(with_pose)} frames): rotation "
              f"{ps['rotation_deg']:.2f} deg, centroid {ps['centroid_mm']:.2f} mm, scale "
              f"{ps['scale']:.4f}, residual after similarity {ps['residual_median_mm']:.2f} mm")
    if jit is not None:
        print(f"\njitter: {jit:.4f} mm" + (f" (true meshes: {jit_gt:.4f} mm)" if jit_gt is not None else ""))
    for fid in missing:
        print(f"{pred_path(args.pred, fid)}: prediction missing for frame {fid} (--allow-missing)")
    for fid, err in failed:
        print(f"frame {fid} failed: {err}")
    print(f"\nwrote {out / 'metrics.json'}, per_frame.csv, cumulative_error.png"
          + (f" and {min(len(done), args.heatmaps) if args.heatmaps >= 0 else len(done)} heat maps"
             if args.heatmaps else ""))
    return 1 if failed else 0


def compare(runs: Sequence[Path]) -> int:
    """Print a Markdown table comparing the ``metrics.json`` of evaluation folders."""
    loaded = []
    for r in runs:
        try:
            loaded.append((Path(r), load_metrics(r)))
        except TempehDataError as err:
            print(err)
            return 1
    names = [p.name or str(p) for p, _ in loaded]
    if len(set(names)) != len(names):
        names = [str(p) for p, _ in loaded]
    print(compare_table(list(zip(names, (m for _, m in loaded)))))
    return 0


def _regions(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one region name")
    return names


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", type=Path, default=None,
                   help="predictions: <subject>/<sequence>/<sequence>.<frame>.ply (or .obj)")
    p.add_argument("--data", type=Path, default=None, help="capture folder (scans, gt_meshes, template)")
    p.add_argument("--list", type=Path, default=None, help="data list JSON of the frames to evaluate")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--template", type=Path, default=None,
                   help="template folder with regions.npz (default: <data>/template)")
    p.add_argument("--pred-units", choices=("m", "cm", "mm"), default="m",
                   help="unit of the prediction files (default m)")
    p.add_argument("--max-points", type=int, default=0,
                   help="use at most K scan points per frame (seeded random subset; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-points subset")
    p.add_argument("--regions", type=_regions, default=list(REPORT_REGIONS),
                   help="comma-separated regions reported besides 'all' (default face,scalp,neck)")
    p.add_argument("--heatmaps", type=int, default=10,
                   help="write error heat-map PLYs for the first K frames (0 none, -1 all)")
    p.add_argument("--heatmap-max-mm", type=float, default=HEATMAP_MAX_MM,
                   help="distance shown red in heat maps (default 3 mm)")
    p.add_argument("--curve-max-mm", type=float, default=5.0,
                   help="x range of the cumulative error curve, mm")
    p.add_argument("--curve-steps", type=int, default=101, help="thresholds of the curve")
    p.add_argument("--allow-missing", action="store_true",
                   help="count frames without a prediction instead of failing")
    p.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RUN",
                   help="evaluation output folders whose metrics.json to compare")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = p.parse_args(argv)
    if args.pred is None and args.compare is None:
        p.error("give --pred/--data/--list/--out to evaluate, or --compare RUN ...")
    if args.pred is not None:
        lacking = [f"--{k}" for k in ("data", "list", "out") if getattr(args, k) is None]
        if lacking:
            p.error(f"--pred needs {', '.join(lacking)}")
    if args.max_points < 0:
        p.error("--max-points must be >= 0")
    if not args.heatmap_max_mm > 0 or not args.curve_max_mm > 0 or args.curve_steps < 2:
        p.error("--heatmap-max-mm and --curve-max-mm must be > 0, --curve-steps >= 2")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate and/or compare; returns the exit code (0 ok, 1 failures, 2 bad arguments)."""
    args, code = parse_cli(_parse_args, argv)
    if args is None:
        return code
    code = 0
    if args.pred is not None:
        code = evaluate(args)
    if args.compare is not None:
        runs = list(args.compare)
        if args.pred is not None and getattr(args, "wrote_metrics", False):
            runs = [args.out] + runs
        print()
        code = max(code, compare(runs))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
