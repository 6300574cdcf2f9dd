"""Speed of camera projection, back-projection and calibration reading (not a test).

``python -m tempeh.bench.cameras [--quick]`` prints a JSON dict of measured figures.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tempeh.cameras import Cameras, look_at_rotation

logger = logging.getLogger(__name__)


def _rig(V: int, gen: np.random.Generator, dtype=torch.float32) -> Cameras:
    """``(V,)`` cameras on a 1 m arc in front of the origin, 1600x1200, with distortion."""
    ang = np.linspace(-1.2, 1.2, V)
    eyes = np.stack([1000 * np.sin(ang), gen.uniform(-100, 100, V), 1000 * np.cos(ang)], 1)
    R = look_at_rotation(torch.from_numpy(eyes), torch.zeros(V, 3, dtype=torch.float64),
                         torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).numpy()
    t = -np.einsum("vij,vj->vi", R, eyes)
    K = np.tile(np.array([[2400.0, 0, 799.5], [0, 2400.0, 599.5], [0, 0, 1]]), (V, 1, 1))
    dist = np.tile(np.array([-0.12, 0.08, 5e-4, -3e-4, 0.0]), (V, 1))
    names = [f"{23 + i // 2}_{'AB'[i % 2]}" for i in range(V)]
    return Cameras.create(K, R, t, 1600, 1200, dist=dist, names=names).to(dtype=dtype)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False) -> dict:
    """Measure (best of a few runs, seconds -> ms):

    * ``project_ms``: B=2 x V=16 cameras x N=5023 points, float32, with distortion;
    * ``pixel_rays_ms``: the same number of pixels back-projected (Newton undistortion);
    * ``read_tka_dir_ms``: reading a folder of 16 ``.tka`` files (incl. the distortion fits);
    * ``read_cameras_json_ms``: reading the same 16 cameras from ``cameras.json``.
    """
    from tempeh.io.calibration import read_calibration_dir, write_cameras_json
    from tempeh.io.tka import camera_to_tka, write_tka

    gen = np.random.default_rng(0)
    V, N, B = 16, (1000 if quick else 5023), 2
    repeats = 2 if quick else 5
    cams = Cameras.stack([_rig(V, gen)] * B)
    pts = torch.from_numpy(gen.uniform(-120, 120, size=(B, 1, N, 3))).float()
    out = {"views": V, "points": N, "batch": B, "threads": torch.get_num_threads()}
    with torch.no_grad():
        out["project_ms"] = 1e3 * _time(lambda: cams.project(pts), repeats)
        uv, _ = cams.project(pts)
        out["pixel_rays_ms"] = 1e3 * _time(lambda: cams.pixel_rays(uv), repeats)
    cams64 = _rig(V, gen, torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        tka_dir = Path(tmp) / "tka"
        tka_dir.mkdir()
        for i in range(V):
            rec, _ = camera_to_tka(cams64[i:i + 1]._replace(
                dist=torch.tensor([[-0.12, 0.08, 0, 0, 0]], dtype=torch.float64)))
            write_tka(tka_dir / f"{cams64.names[i]}.tka", rec)
        json_dir = Path(tmp) / "json"
        write_cameras_json(json_dir / "cameras.json", cams64)
        out["read_tka_dir_ms"] = 1e3 * _time(lambda: read_calibration_dir(tka_dir), repeats)
        out["read_cameras_json_ms"] = 1e3 * _time(lambda: read_calibration_dir(json_dir), repeats)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=1))
