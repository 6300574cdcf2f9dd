"""``fit_scans``: fit the template to raw scans, frame by frame, and write registrations.

Usage::

    fit_scans --data CAPTURE --list LIST.json --out DIR [--init PRED_DIR] [--sequential]
              [--device auto|cpu|cuda] [--shard i/n] [--config FIT.yaml] [--set key=value ...]
              [--units m|mm] [--threads N] [--quiet] [-v]

Reads the template from ``CAPTURE/template/`` and each frame's scan from
``CAPTURE/scans/<subject>/<sequence>/<sequence>.<frame>.{ply,obj,npy}`` (units from the
capture's ``capture.json``, default mm), fits it with :func:`tempeh.fitting.fit_scan` and writes
``OUT/<subject>/<sequence>/<sequence>.<frame>.ply`` in the template topology (metres by
default, the data_specs registration layout), so the output folder can serve as the
``registrations/`` folder of a training capture.

* ``--init PRED_DIR``: initial meshes in the same layout (e.g. coarse-model predictions, in
  ``--init-units``); a frame without one falls back to the automatic alignment (the report says
  so).
* ``--sequential``: frames of a sequence are fitted in order (frame names sorted numerically
  when they are numbers) and each starts from the previous frame's fit (temporal
  initialisation); with ``--shard`` whole sequences are assigned to shards.
* ``--shard i/n`` (0 <= i < n): frame k of the de-duplicated list (or sequence k of the sorted
  sequences with ``--sequential``) belongs to shard ``k mod n``; n jobs with i = 0..n-1 cover
  every frame exactly once.
* Resumable: a frame whose output file exists is skipped (outputs are written atomically, so
  an existing file is complete).
* Report: ``OUT/fit_report.json`` (``fit_report.shard-i-of-n.json`` with ``--shard``),
  rewritten after every frame: one entry per frame with ``status`` (ok, skipped, failed),
  ``time_s``, ``s2m_median_mm``, ``init``, ``align`` and ``error``.

Exit status: 0 when every frame is done or skipped, 1 when a frame failed or the inputs are
unusable, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tempeh.io.layout import frame_file
from tempeh.cli.common import parse_cli
from tempeh.register import frame_sort_key, parse_shard
from tempeh.errors import ConfigError, TempehDataError

logger = logging.getLogger(__name__)

__all__ = ["main", "parse_shard", "shard_frames", "order_frames"]


def order_frames(frames: Sequence, sequential: bool) -> List:
    """De-duplicate (first occurrence wins). With ``sequential``, group by (subject, sequence)
    in sorted order and sort frames numerically inside each group; else keep list order."""
    seen = set()
    uniq = []
    for f in frames:
        if f not in seen:
            seen.add(f)
            uniq.append(f)
    if not sequential:
        return uniq
    return sorted(uniq, key=lambda f: (f.subject, f.sequence, frame_sort_key(f.frame)))


def shard_frames(frames: Sequence, index: int, count: int, sequential: bool) -> List:
    """The frames of shard ``index`` of ``count`` (see the module docstring); deterministic."""
    frames = order_frames(frames, sequential)
    if not sequential:
        return [f for k, f in enumerate(frames) if k % count == index]
    seqs = sorted({(f.subject, f.sequence) for f in frames})
    mine = {s for k, s in enumerate(seqs) if k % count == index}
    return [f for f in frames if (f.subject, f.sequence) in mine]


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fit_scans", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="capture folder (scans/, template/)")
    p.add_argument("--list", type=Path, required=True, help="JSON data list of frames to fit")
    p.add_argument("--out", type=Path, required=True, help="output folder for the registrations")
    p.add_argument("--init", type=Path, default=None,
                   help="folder of initial meshes <s>/<q>/<q>.<f>.ply (e.g. predictions)")
    p.add_argument("--init-units", choices=("m", "cm", "mm"), default="m",
                   help="units of the --init meshes (default m)")
    p.add_argument("--units", choices=("m", "cm", "mm"), default="m",
                   help="units of the written meshes (default m)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--shard", default="0/1", help="i/n: fit only shard i of n (default 0/1)")
    p.add_argument("--sequential", action="store_true",
                   help="fit sequences in frame order, each frame from the previous fit")
    p.add_argument("--config", type=Path, default=None, help="YAML file of FitConfig fields")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a top-level FitConfig field (YAML value), repeatable")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads during a fit (0: leave the default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _load_config(path: Optional[Path], overrides: Sequence[str], threads: int):
    import yaml

    from tempeh.fitting import fit_config_from_dict

    data: Dict = {}
    source = "<defaults>"
    if path is not None:
        if not path.is_file():
            raise TempehDataError(path, "fit config not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise TempehDataError(path, f"invalid YAML: {err}") from None
        if not isinstance(data, dict):
            raise TempehDataError(path, "a fit config must be a YAML mapping")
        source = str(path)
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
        key, val = text.split("=", 1)
        data[key.strip()] = yaml.safe_load(val)
    if threads:
        data["num_threads"] = int(threads)
    return fit_config_from_dict(data, source=source)


def _write_report(path: Path, header: Dict, entries: List[Dict]) -> None:
    from tempeh.io.mesh import atomic_write

    with atomic_write(path, "w") as fh:
        json.dump({**header, "frames": entries}, fh, indent=1, default=float)
        fh.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns 0 (all done), 1 (a frame failed / unusable input), 2 (args)."""
    args, code = parse_cli(_parse_args, argv, log_default=logging.INFO)
    if args is None:
        return code
    try:
        shard = parse_shard(args.shard)
        cfg = _load_config(args.config, args.overrides, args.threads)
    except (ValueError, ConfigError) as err:
        logger.error("%s", err)
        return 2
    try:
        return _run(args, cfg, shard)
    except TempehDataError as err:
        logger.error("%s", err)
        return 1


def _run(args, cfg, shard: Tuple[int, int]) -> int:
    from tqdm import tqdm

    from tempeh.fitting import fit_scan, resolve_device
    from tempeh.io.layout import CaptureLayout, read_data_list
    from tempeh.io.mesh import read_mesh, read_points, write_mesh

    layout = CaptureLayout(args.data)
    template = layout.load_template()
    frames = shard_frames(read_data_list(args.list), shard[0], shard[1], args.sequential)
    device = resolve_device(args.device)
    if args.device == "cuda" and device.type != "cuda":
        raise TempehDataError(None, "--device cuda requested but CUDA is not available")
    name = "fit_report.json" if shard == (0, 1) else f"fit_report.shard-{shard[0]}-of-{shard[1]}.json"
    report = args.out / name
    header = {"data": str(args.data), "list": str(args.list), "shard": f"{shard[0]}/{shard[1]}",
              "sequential": bool(args.sequential), "device": str(device),
              "template": template.name, "num_frames": len(frames)}
    logger.info("fit_scans: %d frame(s) in shard %d/%d on %s", len(frames), shard[0], shard[1],
                device)
    entries: List[Dict] = []
    failed = 0
    prev: Dict[Tuple[str, str], Optional[np.ndarray]] = {}
    for fid in tqdm(frames, desc="fit_scans", unit="frame", disable=args.quiet):
        out = frame_file(args.out, fid)
        entry: Dict = {"subject": fid.subject, "sequence": fid.sequence, "frame": fid.frame,
                       "output": str(out)}
        seq = (fid.subject, fid.sequence)
        t0 = time.perf_counter()
        if out.is_file():
            entry.update(status="skipped", time_s=0.0)
            if args.sequential:
                try:
                    prev[seq] = read_mesh(out, units=args.units)[0]
                except TempehDataError as err:
                    logger.warning("cannot reuse %s as the next frame's start: %s", out, err)
                    prev[seq] = None
            entries.append(entry)
            _write_report(report, header, entries)
            continue
        try:
            scan_file = layout.scan_path(fid)
            scan = read_points(scan_file, units=layout.scan_units)
            init, init_how = None, "none"
            if args.sequential and prev.get(seq) is not None:
                init, init_how = prev[seq], "previous_frame"
            elif args.init is not None:
                ip = frame_file(args.init, fid)
                if ip.is_file():
                    init, init_how = read_mesh(ip, units=args.init_units)[0], "init_dir"
                    if init.shape != template.verts.shape:
                        raise TempehDataError(ip, f"initial mesh has {len(init)} vertices, the "
                                                  f"template {template.num_verts}")
                else:
                    init_how = "init_missing"
                    logger.warning("%s: no initial mesh %s; aligning from scratch", fid, ip)
            try:
                res = fit_scan(scan, template, cfg, init_verts=init, device=device)
            except ValueError as err:
                raise TempehDataError(scan_file, f"cannot fit: {err}") from None
            write_mesh(out, res.verts, template.faces, units=args.units)
            prev[seq] = res.verts
            entry.update(status="ok", time_s=time.perf_counter() - t0, init=init_how,
                         align=res.stats["align"], s2m_median_mm=res.stats["s2m_median_mm"],
                         s2m_mean_mm=res.stats["s2m_mean_mm"],
                         scan_points=res.stats["scan_points"],
                         filtered_points=res.stats["filtered_points"],
                         covered_fraction=res.stats["covered_fraction"], scan=str(scan_file))
        except Exception as err:  # a bad frame is reported; the others go on
            failed += 1
            prev[seq] = None
            logger.error("%s: %s", fid, err)
            logger.debug("traceback", exc_info=True)
            entry.update(status="failed", time_s=time.perf_counter() - t0,
                         error=f"{type(err).__name__}: {err}")
        entries.append(entry)
        _write_report(report, header, entries)
    if not frames:
        _write_report(report, header, entries)
    done = sum(e["status"] == "ok" for e in entries)
    skipped = sum(e["status"] == "skipped" for e in entries)
    logger.info("fit_scans: %d fitted, %d skipped, %d failed; report %s", done, skipped, failed,
                report)
    return 1 if failed else 0
