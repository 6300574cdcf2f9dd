"""``check_capture``: validate a capture folder before training or registration.

Usage::

    check_capture DIR [--list LIST.json] [--frame SUBJECT/SEQUENCE/FRAME]
                      [--mesh FILE | --scan FILE] [--units m|cm|mm] [--out DIR] [--decode]
                      [--skip-geometry]

For every frame (from ``--frame``, ``--list``, or every image folder of the capture) it checks:

* calibration: the sequence's calibration folder reads; every camera is finite, has a proper
  rotation (orthonormal, det +1), positive focal lengths, a principal point inside the image,
  and sees the capture volume (the centre of the frame geometry -- scan, registration or true
  mesh of the first frame of the sequence that has one, else the template, else the world
  origin -- lies in front of the camera and projects into the image; at least half of the
  geometry points do);
* images: every calibrated camera has its image and every image has a calibration; each
  image's size (PNG header) matches its calibration; PNGs end with their IEND chunk
  (``--decode`` fully decodes every image instead);
* geometry: registrations, true meshes and scans, when present, load (in the units of
  ``capture.json``) and registrations/true meshes have the template's vertex count.

Every problem is printed as ``<file>: <what is wrong>``; the exit code is 1 when there is any
problem, 0 otherwise (2 for bad arguments). With ``--out``, per-view overlay PNGs of the
``--mesh``/``--scan`` points (else the frame's registration, true mesh or scan) projected onto
the grey images of one frame (``--frame``, else the first checked) are written, so a person
can see whether calibration and geometry agree.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from tempeh.cli.common import parse_cli
from tempeh.cameras import Cameras
from tempeh.errors import TempehDataError
from tempeh.io.images import check_png_complete, image_size, read_gray, write_png
from tempeh.io.layout import CaptureLayout, FrameId, frame_id, read_data_list
from tempeh.io.mesh import read_mesh, read_points

logger = logging.getLogger(__name__)

ROTATION_TOL = 1e-4
MIN_VISIBLE_FRACTION = 0.5
MAX_VOLUME_POINTS = 4096
#: Plausible bounding-box diagonal of a head mesh or scan, mm (a head is about 300 mm).
SIZE_RANGE_MM = (20.0, 2000.0)


@dataclass
class Report:
    """Problems found, each a ``<file>: <message>`` line (kept in order, deduplicated)."""

    lines: List[str] = field(default_factory=list)

    def add(self, path, message: str) -> None:
        self.add_line(f"{path}: {message}")

    def add_error(self, err: Exception) -> None:
        self.add_line(str(err))

    def add_line(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)
            logger.debug("problem: %s", line)

    @property
    def ok(self) -> bool:
        return not self.lines


def _calib_file(calib_dir: Path, name: str) -> Path:
    """The file that holds camera ``name``: cameras.json, else ``<name>.*``, else the folder."""
    if (calib_dir / "cameras.json").is_file():
        return calib_dir / "cameras.json"
    for p in sorted(calib_dir.glob(f"{name}.*")):
        return p
    return calib_dir


def check_cameras(cams: Cameras, calib_dir: Path, report: Report) -> np.ndarray:
    """Static sanity of ``(V,)`` cameras. Returns ``(V,)`` bool: camera usable for projection."""
    a = cams.numpy()
    V = a["K"].shape[0]
    names = a["names"] or [f"cam{i:02d}" for i in range(V)]
    ok = np.ones(V, dtype=bool)
    finite = np.stack([np.isfinite(a[k]).reshape(V, -1).all(1) for k in ("K", "R", "t", "dist")]).all(0)
    R = a["R"]
    orth = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).reshape(V, -1).max(1)
    det = np.linalg.det(np.where(np.isfinite(R), R, 0.0))
    fx, fy = a["K"][:, 0, 0], a["K"][:, 1, 1]
    cx, cy = a["K"][:, 0, 2], a["K"][:, 1, 2]
    W, H = a["width"].astype(np.float64), a["height"].astype(np.float64)
    for i in range(V):  # per-camera report lines (V is small)
        where = f"camera '{names[i]}'"
        f = _calib_file(calib_dir, names[i])
        if not finite[i]:
            report.add(f, f"{where}: calibration has NaN or inf values")
            ok[i] = False
            continue
        if orth[i] > ROTATION_TOL or abs(det[i] - 1) > ROTATION_TOL:
            report.add(f, f"{where}: R is not a rotation (max|R R^T - I| = {orth[i]:.3g}, "
                          f"det = {det[i]:.4g})")
            ok[i] = False
        if not (fx[i] > 0 and fy[i] > 0):
            report.add(f, f"{where}: focal lengths must be positive (fx={fx[i]:g}, fy={fy[i]:g})")
            ok[i] = False
        if not (-0.5 <= cx[i] <= W[i] - 0.5 and -0.5 <= cy[i] <= H[i] - 0.5):
            report.add(f, f"{where}: principal point ({cx[i]:.1f}, {cy[i]:.1f}) lies outside the "
                          f"{int(W[i])}x{int(H[i])} image")
    return ok


def check_volume(cams: Cameras, usable: np.ndarray, calib_dir: Path, points: np.ndarray,
                 source: str, report: Report) -> None:
    """Every usable camera must see the capture volume.

    Args:
        points: ``(P, 3)`` world, mm: the geometry standing for the capture volume.
        source: what the points are (for the message), e.g. a file name or "the world origin".
    """
    idx = np.flatnonzero(usable)
    if idx.size == 0:
        return
    c = cams[torch.as_tensor(idx)].to(dtype=torch.float64)
    centre = 0.5 * (points.min(0) + points.max(0))
    if points.shape[0] > MAX_VOLUME_POINTS:
        points = points[np.linspace(0, points.shape[0] - 1, MAX_VOLUME_POINTS).astype(np.int64)]
    pts = torch.as_tensor(np.concatenate([centre[None], points]), dtype=torch.float64)
    uv, depth = c.project(pts.expand(len(idx), -1, -1))
    inside = c.in_image(uv, depth).numpy()  # (V', 1 + P)
    d = depth.numpy()
    uvn = uv.numpy()
    names = cams.names or [f"cam{i:02d}" for i in range(len(usable))]
    for j, i in enumerate(idx):
        where = f"camera '{names[i]}'"
        f = _calib_file(calib_dir, names[i])
        if d[j, 0] <= 0:
            report.add(f, f"{where} looks away from the capture volume: the centre of {source} is "
                          f"behind the camera (depth {d[j, 0]:.0f} mm)")
        elif not inside[j, 0]:
            report.add(f, f"{where}: the centre of {source} projects to ({uvn[j, 0, 0]:.0f}, "
                          f"{uvn[j, 0, 1]:.0f}), outside the {int(c.width[j])}x{int(c.height[j])} "
                          "image")
        elif points.shape[0] > 1 and inside[j, 1:].mean() < MIN_VISIBLE_FRACTION:
            report.add(f, f"{where}: only {100 * inside[j, 1:].mean():.0f}% of the points of "
                          f"{source} project into the image")


def _load_geometry(layout: CaptureLayout, fid: FrameId, report: Report, template_nv: Optional[int],
                   skip: bool) -> Optional[Tuple[np.ndarray, str]]:
    """Check registration / true mesh / scan of a frame; return (points mm, source) or None."""
    found = None
    for kind, path in (("registration", layout.registration_path(fid)),
                       ("true mesh", layout.gt_mesh_path(fid))):
        if not path.is_file():
            continue
        if skip:
            continue
        try:
            v, _ = read_mesh(path, units=layout.mesh_units)
        except TempehDataError as err:
            report.add_error(err)
            continue
        if template_nv is not None and v.shape[0] != template_nv:
            report.add(path, f"{kind} has {v.shape[0]} vertices but the template has {template_nv}")
        if _check_size(path, v, kind, "meshes", layout.mesh_units, report):
            found = found or (v, path.name)
    scan = layout.find_scan(fid)
    if scan is not None and not skip:
        try:
            pts = read_points(scan, units=layout.scan_units)
            if _check_size(scan, pts, "scan", "scans", layout.scan_units, report):
                found = found or (pts, scan.name)
        except TempehDataError as err:
            report.add_error(err)
    return found


def _check_size(path: Path, pts: np.ndarray, kind: str, key: str, units: str,
                report: Report) -> bool:
    """Report geometry whose bounding-box diagonal is implausible for a head (unit mistake).
    Returns True when the size is plausible (the geometry may stand for the capture volume)."""
    diag = float(np.linalg.norm(pts.max(0) - pts.min(0)))
    lo, hi = SIZE_RANGE_MM
    if not lo <= diag <= hi:
        report.add(path, f"{kind} bounding box diagonal is {diag:.4g} mm when read in '{units}' "
                         f"(a head is about 300 mm): wrong units? (set capture.json "
                         f"{{\"units\": {{\"{key}\": ...}}}})")
        return False
    return True


def check_frame_images(layout: CaptureLayout, fid: FrameId, cams: Optional[Cameras],
                       report: Report, decode: bool = False) -> None:
    """Images of one frame against the calibrated cameras (``cams`` None: calibration failed)."""
    present = layout.frame_cameras(fid)
    if not present:
        report.add(layout.image_dir(fid), f"no images for frame {fid} "
                                          f"(expected {fid.sequence}.{fid.frame}.<camera>.{layout.image_ext})")
    if cams is None:
        return
    names = list(cams.names or [])
    for n in names:
        if n not in present:
            report.add(layout.image_path(fid, n), "image missing for calibrated camera "
                                                  f"'{n}'")
    for n in present:
        if n not in names:
            report.add(layout.image_path(fid, n), f"image has no calibration (camera '{n}' is not "
                                                  f"in {layout.calibration_dir(fid.subject, fid.sequence)})")
    for i, n in enumerate(names):
        if n not in present:
            continue
        path = layout.image_path(fid, n)
        try:
            if decode:
                img = read_gray(path)
                w, h = img.shape[1], img.shape[0]
            else:
                if path.suffix.lower() == ".png":
                    check_png_complete(path)
                w, h = image_size(path)
        except TempehDataError as err:
            report.add_error(err)
            continue
        cw, ch = int(cams.width[i]), int(cams.height[i])
        if (w, h) != (cw, ch):
            hint = " (rotated by 90 degrees?)" if (h, w) == (cw, ch) else ""
            report.add(path, f"image is {w}x{h} but the calibration of camera '{n}' says "
                             f"{cw}x{ch}{hint}")


def render_overlays(layout: CaptureLayout, fid: FrameId, cams: Cameras, points: np.ndarray,
                    out_dir: Path, report: Report) -> List[Path]:
    """Write ``<out>/<subject>.<sequence>.<frame>.<camera>.png``: the grey image with the
    ``(P, 3)`` world-mm ``points`` projected on it, coloured by depth (near red, far yellow)."""
    written = []
    names = list(cams.names or [])
    pts = torch.as_tensor(points, dtype=torch.float64)
    uv, depth = cams.to(dtype=torch.float64).project(pts.expand(len(names), -1, -1))
    inside = cams.in_image(uv, depth).numpy()
    uv, depth = uv.numpy(), depth.numpy()
    for i, n in enumerate(names):
        path = layout.image_path(fid, n)
        try:
            gray = read_gray(path)
        except TempehDataError as err:
            report.add_error(err)
            continue
        if gray.shape != (int(cams.height[i]), int(cams.width[i])):
            gray = cv2.resize(gray, (int(cams.width[i]), int(cams.height[i])))
        img = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        m = inside[i]
        if m.any():
            u = np.rint(uv[i, m, 0]).astype(np.int64)
            v = np.rint(uv[i, m, 1]).astype(np.int64)
            d = depth[i, m]
            s = (d - d.min()) / max(float(d.max() - d.min()), 1e-9)
            colour = np.stack([np.zeros_like(s), 255 * s, np.full_like(s, 255.0)], 1)  # BGR
            img[v, u] = colour.astype(np.uint8)
        written.append(write_png(out_dir / f"{fid.subject}.{fid.sequence}.{fid.frame}.{n}.png", img))
    return written


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="check_capture", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("capture", type=Path, help="capture folder (see data_specs/capture_layout.md)")
    p.add_argument("--list", type=Path, default=None, help="data list JSON of frames to check")
    p.add_argument("--frame", type=str, default=None, help="check one frame SUBJECT/SEQUENCE/FRAME")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mesh", type=Path, default=None, help="mesh to overlay (units: --units, "
                                                           "default the capture's mesh units)")
    g.add_argument("--scan", type=Path, default=None, help="scan/points to overlay (units: "
                                                           "--units, default the capture's scan units)")
    p.add_argument("--units", choices=("m", "cm", "mm"), default=None,
                   help="units of the --mesh/--scan file")
    p.add_argument("--out", type=Path, default=None, help="folder for overlay PNGs")
    p.add_argument("--decode", action="store_true", help="fully decode every image")
    p.add_argument("--skip-geometry", action="store_true",
                   help="do not load registrations, true meshes and scans")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check; returns the exit code (0 ok, 1 problems, 2 bad arguments)."""
    args, code = parse_cli(_parse_args, argv)
    if args is None:
        return code
    report = Report()
    if not args.capture.is_dir():
        print(f"{args.capture}: capture folder not found")
        return 1
    try:
        layout = CaptureLayout(args.capture)
    except TempehDataError as err:
        print(err)
        return 1

    # ---- frames to check
    try:
        if args.frame is not None:
            try:
                frames = [frame_id(args.frame)]
            except ValueError as err:
                print(f"--frame: {err}")
                return 2
        elif args.list is not None:
            frames = read_data_list(args.list)
        else:
            frames = layout.discover_frames()
    except TempehDataError as err:
        print(err)
        return 1
    if not frames:
        report.add(layout.images_root, "no frames found (expected images/<subject>/<sequence>/"
                                       "<frame>/<sequence>.<frame>.<camera>.png)")

    # ---- template (optional)
    template_nv = None
    if layout.template_dir.is_dir():
        try:
            tpl = layout.load_template()
            template_nv = tpl.num_verts
            template_pts = tpl.verts
        except TempehDataError as err:
            report.add_error(err)
            template_pts = None
    else:
        template_pts = None
        logger.info("%s: no template folder; registrations are not checked against it",
                    layout.template_dir)

    # ---- frames, grouped by sequence (one calibration per sequence)
    by_seq: Dict[Tuple[str, str], List[FrameId]] = {}
    for fid in frames:
        by_seq.setdefault((fid.subject, fid.sequence), []).append(fid)
    cams_of: Dict[Tuple[str, str], Optional[Cameras]] = {}
    geometry_of: Dict[FrameId, Optional[Tuple[np.ndarray, str]]] = {}
    n_images = 0
    for (s, q), fids in by_seq.items():
        calib_dir = layout.calibration_dir(s, q)
        try:
            cams = layout.cameras_for(fids[0])
        except TempehDataError as err:
            report.add_error(err)
            cams = None
        cams_of[(s, q)] = cams
        volume = None
        for fid in fids:
            check_frame_images(layout, fid, cams, report, decode=args.decode)
            n_images += len(layout.frame_cameras(fid))
            geom = _load_geometry(layout, fid, report, template_nv, args.skip_geometry)
            geometry_of[fid] = geom
            if volume is None and geom is not None:
                volume = (geom[0], f"{geom[1]} ({fid})")
        if cams is None:
            continue
        usable = check_cameras(cams, calib_dir, report)
        if volume is None:
            volume = ((template_pts, "the template") if template_pts is not None
                      else (np.zeros((1, 3)), "the world origin"))
        check_volume(cams, usable, calib_dir, volume[0], volume[1], report)

    # ---- overlays
    if args.out is not None and frames:
        fid = frames[0]
        cams = cams_of.get((fid.subject, fid.sequence))
        pts, source = None, None
        try:
            if args.mesh is not None:
                pts = read_mesh(args.mesh, units=args.units or layout.mesh_units)[0]
                source = args.mesh
            elif args.scan is not None:
                pts = read_points(args.scan, units=args.units or layout.scan_units)
                source = args.scan
            elif geometry_of.get(fid) is not None:
                pts, source = geometry_of[fid]
        except TempehDataError as err:
            report.add_error(err)
        if cams is None:
            report.add(args.out, f"no overlays: the calibration of {fid} could not be read")
        elif pts is None:
            report.add(args.out, f"no overlays: no --mesh/--scan given and frame {fid} has no "
                                 "registration, true mesh or scan")
        else:
            written = render_overlays(layout, fid, cams, pts, args.out, report)
            print(f"wrote {len(written)} overlay images of {source} for {fid} to {args.out}")
    elif (args.mesh is not None or args.scan is not None) and args.out is None:
        print("note: --mesh/--scan only draw overlays; pass --out DIR to write them")

    # ---- report
    for line in report.lines:
        print(line)
    print(f"checked {len(frames)} frames, {n_images} images, {len(by_seq)} calibrations: "
          + ("OK" if report.ok else f"{len(report.lines)} problem(s)"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
