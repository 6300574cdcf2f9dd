"""``visualize``: headless overlays of a mesh on the input views, and a turntable strip.

Usage::

    visualize --data DIR --frame SUBJECT/SEQUENCE/FRAME --mesh FILE [--units m] --out FILE.png
              [--turntable FILE.png] [--mode wire|points] [--all-edges] [--downsample K]
              [--cameras A,B,...] [--azimuths 8] [--size 256] [--up +y]

Overlay: every view of the frame (grey image as stored, cameras adapted to the stored size by
:func:`tempeh.data.load_views`), the mesh projected with :meth:`Cameras.project` (OpenCV model
with distortion) and drawn with OpenCV: a wireframe of the faces turned towards the camera
(``--all-edges``: every edge) or the vertices. Views are tiled in a grid labelled with the camera
names. No display is needed.

Turntable: ``--azimuths`` shaded renders (ray cast with Embree, head-light Lambert shading) from
cameras circling the mesh centre about ``--up`` (the world axis that is up; FLAME-like captures:
``+y``), the first looking along ``-z`` at the face (camera on the +z side), side by side.

Exit code: 0 ok, 1 unreadable mesh / capture data, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from tempeh.cli.common import parse_cli
from tempeh.cameras import Cameras, look_at_rotation
from tempeh.errors import TempehDataError

logger = logging.getLogger(__name__)

__all__ = ["main", "project_vertices", "front_edges", "draw_overlay", "tile", "turntable"]

WIRE_BGR = (60, 255, 60)
POINT_BGR = (40, 200, 255)


# ============================================================================ overlay
def project_vertices(verts_mm: np.ndarray, cameras: Cameras) -> Tuple[np.ndarray, np.ndarray]:
    """``(N, 3)`` world mm -> uv ``(V, N, 2)`` pixels and depth ``(V, N)`` mm (float64)."""
    cams = cameras.to(dtype=torch.float64)
    uv, z = cams.project(torch.as_tensor(np.asarray(verts_mm), dtype=torch.float64).expand(
        *cams.batch_shape, -1, -1))
    return uv.numpy(), z.numpy()


def front_edges(verts_mm: np.ndarray, faces: np.ndarray, center_mm: np.ndarray) -> np.ndarray:
    """Unique edges ``(E, 2)`` of the faces whose normal points towards a camera at
    ``center_mm`` (back-face culling; occlusion by other parts is not tested)."""
    tri = verts_mm[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    front = np.einsum("fi,fi->f", n, center_mm[None] - tri.mean(1)) > 0
    f = faces[front]
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0) if len(e) else e.reshape(0, 2)


def draw_overlay(gray: np.ndarray, uv: np.ndarray, depth: np.ndarray,
                 edges: Optional[np.ndarray] = None, radius: int = 0) -> np.ndarray:
    """Draw a projected mesh on a grey image.

    Args:
        gray: ``(H, W)`` uint8.
        uv: ``(N, 2)`` pixels (origin at the centre of the top-left pixel), depth ``(N,)``.
        edges: ``(E, 2)`` vertex pairs drawn as anti-aliased lines (sub-pixel exact end points);
            None: the vertices are drawn, at ``(round(u), round(v))`` (one pixel for
            ``radius`` 0, else a filled disc).
    Returns:
        ``(H, W, 3)`` uint8 BGR.
    """
    img = cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2BGR)
    H, W = gray.shape
    ok = (depth > 0) & np.all(np.isfinite(uv), -1)
    if edges is None:
        pix = np.round(uv).astype(np.int64)
        ok &= (pix[:, 0] >= 0) & (pix[:, 0] < W) & (pix[:, 1] >= 0) & (pix[:, 1] < H)
        if radius <= 0:
            img[pix[ok, 1], pix[ok, 0]] = POINT_BGR
        else:
            for u, v in pix[ok]:
                cv2.circle(img, (int(u), int(v)), int(radius), POINT_BGR, -1, cv2.LINE_AA)
        return img
    shift = 4  # sub-pixel line end points (1/16 px)
    e = edges[ok[edges[:, 0]] & ok[edges[:, 1]]]
    fixed = np.round(uv * (1 << shift)).astype(np.int64)
    lim = 4 * (W + H) << shift  # cv2 clips lines, but keeps int coordinates sane
    fixed = np.clip(fixed, -lim, lim)
    pts = np.stack([fixed[e[:, 0]], fixed[e[:, 1]]], 1).astype(np.int32)  # (E, 2, 2)
    cv2.polylines(img, list(pts), False, WIRE_BGR, 1, cv2.LINE_AA, shift)
    return img


def tile(images: Sequence[np.ndarray], labels: Sequence[str] = (), cols: Optional[int] = None,
         pad: int = 4) -> np.ndarray:
    """Tile ``(H, W, 3)`` images (same size) in a grid (row-major), labels at the top left."""
    n = len(images)
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    H, W = images[0].shape[:2]
    out = np.zeros((rows * H + (rows + 1) * pad, cols * W + (cols + 1) * pad, 3), np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[y:y + H, x:x + W] = im
        if k < len(labels):
            scale = max(0.35, H / 600.0)
            cv2.putText(out, str(labels[k]), (x + 4, y + int(18 * scale / 0.5)),
                        cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


# ============================================================================ turntable
_AXES = {"+x": (1, 0, 0), "-x": (-1, 0, 0), "+y": (0, 1, 0), "-y": (0, -1, 0),
         "+z": (0, 0, 1), "-z": (0, 0, -1)}


def turntable_cameras(verts_mm: np.ndarray, azimuths: int = 8, size: int = 256,
                      up: str = "+y") -> Cameras:
    """``(K,)`` float64 square cameras circling the mesh centre about ``up``, framing it."""
    u = np.asarray(_AXES[up], dtype=np.float64)
    center = 0.5 * (verts_mm.min(0) + verts_mm.max(0))
    radius = float(np.linalg.norm(verts_mm - center, axis=1).max()) or 1.0
    dist = 3.0 * radius
    front = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    front = front - u * (front @ u)
    front /= np.linalg.norm(front)
    side = np.cross(u, front)
    a = np.linspace(0.0, 2 * math.pi, azimuths, endpoint=False)
    eyes = center + dist * (np.cos(a)[:, None] * front + np.sin(a)[:, None] * side)
    R = look_at_rotation(torch.from_numpy(eyes), torch.from_numpy(center).expand(azimuths, 3),
                         torch.from_numpy(u)).numpy()
    t = -np.einsum("kij,kj->ki", R, eyes)
    f = 0.45 * size * dist / (radius * 1.05)  # the bounding sphere fills ~90% of the frame
    K = np.array([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1]])
    return Cameras.create(np.tile(K, (azimuths, 1, 1)), R, t, size, size,
                          names=[f"az{int(round(math.degrees(x)))}" for x in a], dtype=torch.float64)


def turntable(verts_mm: np.ndarray, faces: np.ndarray, azimuths: int = 8, size: int = 256,
              up: str = "+y") -> np.ndarray:
    """Shaded renders from ``azimuths`` directions side by side: ``(size, azimuths * size)``
    uint8 (head-light Lambert shading of the face normals, black background)."""
    from tempeh.synth.render import first_hits

    cams = turntable_cameras(verts_mm, azimuths, size, up)
    vv, uu = np.mgrid[0:size, 0:size]
    uv = torch.from_numpy(np.stack([uu.ravel(), vv.ravel()], -1).astype(np.float64))
    o, d = cams.pixel_rays(uv.expand(azimuths, -1, -1))
    o = o.expand_as(d).reshape(-1, 3).numpy()
    d = d.reshape(-1, 3).numpy()
    face, _, _ = first_hits(verts_mm, faces, o, d)
    tri = verts_mm[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    shade = np.zeros(len(face))
    hit = face >= 0
    shade[hit] = np.abs(np.einsum("ri,ri->r", fn[face[hit]], d[hit]))
    img = np.where(hit, 40 + 215 * shade ** 0.8, 0).astype(np.uint8).reshape(azimuths, size, size)
    return np.concatenate(list(img), axis=1)


# ============================================================================ CLI
def _parse_args(argv):
    p = argparse.ArgumentParser(prog="visualize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="capture folder")
    p.add_argument("--frame", required=True, help="SUBJECT/SEQUENCE/FRAME")
    p.add_argument("--mesh", type=Path, required=True, help="mesh (.ply / .obj) in template topology")
    p.add_argument("--units", choices=("m", "cm", "mm"), default="m", help="unit of --mesh")
    p.add_argument("--out", type=Path, required=True, help="overlay grid PNG")
    p.add_argument("--turntable", type=Path, default=None, help="also write a turntable strip PNG")
    p.add_argument("--mode", choices=("wire", "points"), default="wire")
    p.add_argument("--all-edges", action="store_true", help="wireframe without back-face culling")
    p.add_argument("--point-radius", type=int, default=1, help="vertex disc radius (points mode)")
    p.add_argument("--downsample", type=float, default=1.0, help="shrink the views by K")
    p.add_argument("--cameras", default=None, help="comma-separated camera names (default: all)")
    p.add_argument("--azimuths", type=int, default=8, help="turntable views")
    p.add_argument("--size", type=int, default=256, help="turntable view size, pixels")
    p.add_argument("--up", choices=sorted(_AXES), default="+y", help="world up axis (turntable)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.azimuths < 1 or args.size < 8 or not args.downsample > 0:
        p.error("--azimuths >= 1, --size >= 8 and --downsample > 0 required")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the overlay grid (and turntable); returns 0 ok, 1 bad data, 2 bad arguments."""
    args, code = parse_cli(_parse_args, argv)
    if args is None:
        return code
    from tempeh.data.dataset import load_views
    from tempeh.io.images import write_png
    from tempeh.io.layout import CaptureLayout, frame_id
    from tempeh.io.mesh import read_mesh

    try:
        fid = frame_id(args.frame)
    except ValueError as err:
        print(f"visualize: --frame: {err}")
        return 2
    try:
        verts, faces = read_mesh(args.mesh, units=args.units)
        layout = CaptureLayout(args.data)
        names = ([c.strip() for c in args.cameras.split(",") if c.strip()] if args.cameras
                 else layout.frame_cameras(fid))
        if not names:
            raise TempehDataError(layout.image_dir(fid), f"no images of frame {fid}")
        imgs, cams = load_views(layout, fid, names, args.downsample, rotate_portrait=False)
    except TempehDataError as err:
        print(f"visualize: {err}")
        return 1
    uv, z = project_vertices(verts, cams)
    centers = cams.centers().to(torch.float64).numpy()
    tiles: List[np.ndarray] = []
    for v in range(len(names)):
        edges = None
        if args.mode == "wire":
            edges = (np.unique(np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]],
                                                       faces[:, [2, 0]]]), 1), axis=0)
                     if args.all_edges else front_edges(verts, faces, centers[v]))
        tiles.append(draw_overlay(imgs[v], uv[v], z[v], edges,
                                  radius=args.point_radius if edges is None else 0))
    write_png(args.out, tile(tiles, names))
    print(f"wrote {args.out} ({len(names)} views)")
    if args.turntable is not None:
        write_png(args.turntable, turntable(verts, faces, args.azimuths, args.size, args.up))
        print(f"wrote {args.turntable} ({args.azimuths} azimuths)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
