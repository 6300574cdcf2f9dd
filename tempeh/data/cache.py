"""HDF5 cache of a capture's frames: one file instead of ~20 small files per frame.

Layout of the file (``format = "tempeh-capture-cache"``, ``version = 1``; root attributes also
hold ``image_downsample``, ``rotate_portrait``, ``source_root``, ``has_gt``)::

    frames/<subject>/<sequence>/<frame>/
        images         (V, H, W) uint8, one chunk per frame (optional lzf)
        camera_names   (V,) utf-8 strings
        K (V,3,3) R (V,3,3) t (V,3) dist (V,5) float64 (t in mm); width, height (V,) int64
        scan           (P, 3) float32 mm (every point of the scan file)
        registration   (N, 3) float32 mm
        gt             (N, 3) float32 mm (only when the capture has gt_meshes/)

Images and cameras are stored exactly as :func:`tempeh.data.dataset.load_views` returns them
for the cache's ``image_downsample`` (8-bit, after the stored-size camera adjustment), and
points as the float32 the dataset would make, so a dataset reading the cache returns samples
byte-identical to the PNG path (tested). Coarse-stage caches of the refinement are NOT stored
(they belong to a run, not to the capture).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from tempeh.cameras import Cameras
from tempeh.errors import TempehDataError
from tempeh.io.layout import CaptureLayout, FrameId, frame_id
from tempeh.io.mesh import read_mesh, read_points

logger = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "CaptureCache", "build_cache", "frame_group"]

PathLike = Union[str, os.PathLike]
CACHE_FORMAT = "tempeh-capture-cache"
CACHE_VERSION = 1


def frame_group(fid) -> str:
    """HDF5 group of a frame: ``frames/<subject>/<sequence>/<frame>``."""
    s, q, f = frame_id(fid)
    return f"frames/{s}/{q}/{f}"


def build_cache(root: PathLike, frames: Iterable, out: PathLike, image_downsample: float = 1.0,
                compression: Optional[str] = "lzf", cameras: Optional[Sequence[str]] = None,
                progress: bool = False, rotate_portrait: bool = True) -> Path:
    """Write the HDF5 cache of ``frames`` of the capture at ``root`` to ``out`` (atomically:
    a temporary file renamed at the end; duplicates in ``frames`` are stored once).

    Args:
        root: capture folder.
        frames: frames to store (FrameId / "s/q/f" / 3-lists).
        out: the ``.h5`` file.
        image_downsample: as ``DataConfig.image_downsample`` (must match when reading).
        compression: ``"lzf"``, ``"gzip"`` or None for the image stacks.
        cameras: camera names to store (default: every camera with an image in the frame).
        rotate_portrait: as ``DataConfig.rotate_portrait`` (must match when reading).
    Returns:
        ``Path(out)``. Raises TempehDataError naming the first bad file.
    """
    import h5py

    from tempeh.data.dataset import load_views

    layout = CaptureLayout(root)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    has_gt = (layout.root / "gt_meshes").is_dir()
    seen, todo = set(), []
    for f in frames:
        fid = frame_id(f)
        if fid not in seen:
            seen.add(fid)
            todo.append(fid)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    it = todo
    if progress:
        from tqdm import tqdm
        it = tqdm(todo, desc="build_cache", unit="frame")
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = CACHE_FORMAT
            h5.attrs["version"] = CACHE_VERSION
            h5.attrs["image_downsample"] = float(image_downsample)
            h5.attrs["source_root"] = str(layout.root)
            h5.attrs["has_gt"] = bool(has_gt)
            h5.attrs["rotate_portrait"] = bool(rotate_portrait)
            for fid in it:
                names = list(cameras) if cameras is not None else layout.frame_cameras(fid)
                if not names:
                    raise TempehDataError(layout.image_dir(fid), f"no images for frame {fid}")
                imgs, cams = load_views(layout, fid, names, image_downsample, rotate_portrait)
                g = h5.create_group(frame_group(fid))
                g.create_dataset("images", data=imgs, chunks=imgs.shape, compression=compression)
                g.create_dataset("camera_names", data=np.array(names, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
                c = cams.numpy()
                for k in ("K", "R", "t", "dist"):
                    g.create_dataset(k, data=c[k].astype(np.float64))
                g.create_dataset("width", data=c["width"].astype(np.int64))
                g.create_dataset("height", data=c["height"].astype(np.int64))
                scan = read_points(layout.scan_path(fid), units=layout.scan_units)
                g.create_dataset("scan", data=scan.astype(np.float32))
                reg = read_mesh(layout.registration_path(fid), units=layout.mesh_units)[0]
                g.create_dataset("registration", data=reg.astype(np.float32))
                if has_gt:
                    gt = read_mesh(layout.gt_mesh_path(fid), units=layout.mesh_units)[0]
                    g.create_dataset("gt", data=gt.astype(np.float32))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %d frames to %s", len(todo), out)
    return out


class CaptureCache:
    """Read access to a cache written by :func:`build_cache` (opened read-only)."""

    def __init__(self, path: PathLike):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise TempehDataError(self.path, "HDF5 cache not found (build it with tools/build_cache.py)")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise TempehDataError(self.path, f"cannot open as HDF5: {err}") from None
        a = self.h5.attrs
        if a.get("format") != CACHE_FORMAT:
            raise TempehDataError(self.path, f"not a tempeh capture cache (format "
                                             f"{a.get('format')!r})")
        if int(a.get("version", -1)) != CACHE_VERSION:
            raise TempehDataError(self.path, f"unsupported cache version {a.get('version')!r} "
                                             f"(this reader: {CACHE_VERSION})")
        self.image_downsample = float(a["image_downsample"])
        self.has_gt = bool(a["has_gt"])
        self.rotate_portrait = bool(a["rotate_portrait"])

    def close(self) -> None:
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def frames(self) -> List[FrameId]:
        """Every frame in the cache, sorted."""
        out = []
        root = self.h5.get("frames")
        if root is None:
            return out
        for s in sorted(root):
            for q in sorted(root[s]):
                out.extend(FrameId(s, q, f) for f in sorted(root[s][q]))
        return out

    def _group(self, fid):
        key = frame_group(fid)
        if key not in self.h5:
            raise TempehDataError(self.path, f"frame {frame_id(fid)} is not in the cache")
        return self.h5[key]

    def check_frame(self, fid) -> None:
        """TempehDataError naming the cache when the frame or one of its arrays is missing."""
        g = self._group(fid)
        need = ["images", "camera_names", "K", "R", "t", "dist", "width", "height", "scan",
                "registration"] + (["gt"] if self.has_gt else [])
        missing = [k for k in need if k not in g]
        if missing:
            raise TempehDataError(self.path, f"frame {frame_id(fid)}: missing {missing}")

    def camera_names(self, fid) -> List[str]:
        g = self._group(fid)
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in g["camera_names"][()]]

    def read_views(self, fid, names: Sequence[str]) -> Tuple[np.ndarray, Cameras]:
        """``(V, H, W)`` uint8 images and ``(V,)`` float64 cameras of ``names`` (in that order)."""
        g = self._group(fid)
        all_names = self.camera_names(fid)
        try:
            idx = [all_names.index(n) for n in names]
        except ValueError:
            missing = [n for n in names if n not in all_names]
            raise TempehDataError(self.path, f"frame {frame_id(fid)}: no camera(s) {missing}") from None
        # the stack is one chunk, so reading it whole costs the same as reading a subset
        imgs = g["images"][()][idx]
        cams = Cameras.create(g["K"][()][idx], g["R"][()][idx], g["t"][()][idx],
                              g["width"][()][idx], g["height"][()][idx], dist=g["dist"][()][idx],
                              names=list(names), dtype=None)
        return np.ascontiguousarray(imgs), cams

    def read_scan(self, fid) -> np.ndarray:
        """``(P, 3)`` float32 mm."""
        return self._group(fid)["scan"][()]

    def read_registration(self, fid) -> np.ndarray:
        """``(N, 3)`` float32 mm."""
        return self._group(fid)["registration"][()]

    def read_gt(self, fid) -> Optional[np.ndarray]:
        """``(N, 3)`` float32 mm, or None when the cache has no ground truth."""
        g = self._group(fid)
        return g["gt"][()] if "gt" in g else None
