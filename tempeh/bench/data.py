"""Data-loading speed: PNG capture folder vs HDF5 cache (not a test).

``python -m tempeh.bench.data [--quick]`` prints a JSON dict of measured figures.
:func:`write_tiny_capture` (also used by the data tests) writes a small, valid capture folder
with the io writers: textured random images, one cameras.json per sequence, sphere-like
registrations (metres), scans (mm, .npy) and optionally gt meshes.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from tempeh.cameras import Cameras, look_at_rotation

logger = logging.getLogger(__name__)

__all__ = ["write_tiny_capture", "tiny_rig", "run"]


def tiny_rig(num_views: int, width: int, height: int, distance_mm: float = 800.0) -> Cameras:
    """``(V,)`` float64 cameras on an arc around the origin, looking at it, mild distortion."""
    ang = np.linspace(-1.0, 1.0, num_views)
    eyes = np.stack([distance_mm * np.sin(ang), 50.0 * np.cos(3 * ang), distance_mm * np.cos(ang)], 1)
    R = look_at_rotation(torch.from_numpy(eyes), torch.zeros(num_views, 3, dtype=torch.float64),
                         torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)).numpy()
    t = -np.einsum("vij,vj->vi", R, eyes)
    f = 2.0 * width
    K = np.tile(np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]]),
                (num_views, 1, 1))
    dist = np.tile(np.array([-0.05, 0.01, 0.0, 0.0, 0.0]), (num_views, 1))
    names = [f"{23 + i // 2}_{'AB'[i % 2]}" for i in range(num_views)]
    return Cameras.create(K, R, t, width, height, dist=dist, names=names, dtype=torch.float64)


def write_tiny_capture(root, num_frames: int = 4, num_views: int = 4, width: int = 48,
                       height: int = 36, scan_points: int = 300, sequences: Sequence[str] = ("seqA",),
                       subject: str = "subj1", with_gt: bool = False, seed: int = 0,
                       splits: Optional[dict] = None) -> Path:
    """Write a small capture folder in the tempeh layout and return ``Path(root)``.

    Frames ``000000..`` of every sequence; ``data_lists/all.json`` lists every frame and, by
    default, ``train.json`` all but the last frame, ``val.json`` the last one.
    Registrations: a 162-vertex sphere (radius ~90 mm) per frame, in metres.
    """
    import trimesh

    from tempeh.io.calibration import write_cameras_json
    from tempeh.io.images import write_png
    from tempeh.io.layout import CaptureLayout, write_data_list
    from tempeh.io.mesh import write_mesh, write_points

    root = Path(root)
    rng = np.random.default_rng(seed)
    L = CaptureLayout(root)
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=90.0)
    verts0, faces = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    cams = tiny_rig(num_views, width, height)
    frames = []
    yy, xx = np.mgrid[0:height, 0:width]
    for q in sequences:
        write_cameras_json(L.calibration_dir(subject, q) / "cameras.json", cams)
        for i in range(num_frames):
            fid = (subject, q, f"{i:06d}")
            frames.append(fid)
            for v, name in enumerate(cams.names):
                phase = rng.uniform(0, 2 * np.pi, 2)
                base = 110 + 60 * np.sin(xx * 0.35 + phase[0]) * np.cos(yy * 0.27 + phase[1])
                img = np.clip(base + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8)
                write_png(L.image_path(fid, name), img)
            verts = verts0 * (1 + 0.05 * rng.standard_normal()) + rng.normal(0, 1.0, verts0.shape)
            write_mesh(L.registration_path(fid), verts, faces, units="m")
            if with_gt:
                write_mesh(L.gt_mesh_path(fid), verts + rng.normal(0, 0.2, verts.shape), faces, units="m")
            d = rng.standard_normal((scan_points, 3))
            pts = 90.0 * d / np.linalg.norm(d, axis=1, keepdims=True) + rng.normal(0, 0.5, (scan_points, 3))
            write_points(L.scan_path(fid, "npy"), pts, units="mm")
    splits = splits if splits is not None else {"all": frames, "train": frames[:-1], "val": frames[-1:]}
    for name, fr in splits.items():
        write_data_list(L.data_list_path(name), fr)
    return root


def _frames_per_s(ds, keys, repeats: int) -> float:
    ds[keys[0]]  # warm-up (opens the cache, fills the calibration cache)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in keys:
            ds[k]
        best = max(best, len(keys) / (time.perf_counter() - t0))
    return best


def run(quick: bool = False) -> dict:
    """Frames/s of ``CaptureDataset`` from PNG vs from the HDF5 cache (one process, no workers).

    Full: 16 views of 400x300 (the paper's stored size), 12 frames, 20000 scan points;
    quick: 8 views of 200x150, 6 frames.
    """
    from tempeh.config import DataConfig
    from tempeh.data.cache import build_cache
    from tempeh.data.dataset import CaptureDataset

    V, W, H, F = (8, 200, 150, 6) if quick else (16, 400, 300, 12)
    P = 20000
    out = {"views": V, "width": W, "height": H, "frames": F, "scan_points": P}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny_capture(Path(tmp) / "cap", num_frames=F, num_views=V, width=W,
                                  height=H, scan_points=2 * P)
        t0 = time.perf_counter()
        h5 = build_cache(root, json.loads((root / "data_lists/all.json").read_text()),
                         Path(tmp) / "cache.h5")
        out["build_cache_s"] = time.perf_counter() - t0
        out["cache_mb"] = h5.stat().st_size / 2 ** 20
        cfg = DataConfig(root=str(root), min_views=1, max_views=None, scan_points=P, num_workers=0)
        keys = [(i, tuple(range(V)), 1000 + i) for i in range(F)]
        ds_png = CaptureDataset(cfg, "data_lists/all.json", train=True)
        out["png_frames_per_s"] = _frames_per_s(ds_png, keys, 2 if quick else 3)
        cfg_h5 = DataConfig(root=str(root), min_views=1, max_views=None, scan_points=P,
                            num_workers=0, use_cache=str(h5))
        ds_h5 = CaptureDataset(cfg_h5, "data_lists/all.json", train=True)
        out["hdf5_frames_per_s"] = _frames_per_s(ds_h5, keys, 2 if quick else 3)
        ds_h5._cache.close()
    out["hdf5_speedup"] = out["hdf5_frames_per_s"] / out["png_frames_per_s"]
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
