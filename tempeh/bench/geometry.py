"""Benchmark: exact point-to-surface (forward + backward) and per-view visibility on CPU.

Targets on the 2-core development machine: point_to_surface fwd+bwd for 20k points against a
5k-vertex mesh <= 30 ms; visibility for 16 views x 5k vertices <= 50 ms.

Uses the FLAME-topology template from ``../shared/assets/flame_topology`` beside the repository
when present (metres -> mm), else a UV sphere of radius 100 mm with ~5k vertices.

``p2s_*`` figures use the ``"auto"`` closest-face backend (``p2s_backend``: ``"grid"``, the
numba uniform grid, on CPU) and, for comparison, libigl's AABB tree (``*_igl``); ``query_only``
is the non-differentiable closest-face query alone and ``exact_torch`` the differentiable part
alone. ``--threads=N`` sets torch's intra-op threads, which the grid query also uses.

Run: ``python -m tempeh.bench.geometry [--quick] [--threads=N]`` (prints JSON).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.geometry.point_to_surface import (_gather_triangles, _grid_available, _igl_available,
                                              _resolve_backend, closest_faces, point_to_surface,
                                              point_triangle_distance_sq, safe_sqrt)
from tempeh.geometry.visibility import visibility

logger = logging.getLogger(__name__)

_FLAME_OBJ = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "flame_topology" / "sampling_template.obj"


def _mesh(template: Optional[Path] = None):
    """(verts (N,3) float64 mm, faces (F,3) int64, name)."""
    import trimesh

    path = Path(template) if template is not None else _FLAME_OBJ
    if path.exists():
        m = trimesh.load(path, process=False, force="mesh")
        v = np.asarray(m.vertices, dtype=np.float64)
        if np.abs(v).max() < 10.0:  # metres
            v = v * 1000.0
        return v, np.asarray(m.faces, dtype=np.int64), path.name
    m = trimesh.creation.uv_sphere(radius=100.0, count=[50, 102])
    return np.asarray(m.vertices), np.asarray(m.faces, dtype=np.int64), f"uv_sphere({len(m.vertices)} verts)"


def _time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts = np.asarray(ts) * 1e3
    return {"median_ms": float(np.median(ts)), "min_ms": float(ts.min()), "repeats": repeats}


def _ring_cameras(n_views: int, center: np.ndarray, dist_mm: float = 1000.0) -> Cameras:
    """``n_views`` cameras on two rings (front and sides) looking at ``center``, 1600x1200 px."""
    ang = np.linspace(-1.4, 1.4, n_views)
    h = np.where(np.arange(n_views) % 2 == 0, 80.0, -80.0)
    eyes = np.stack([dist_mm * np.sin(ang), h, dist_mm * np.cos(ang)], -1) + center
    eyes_t = torch.tensor(eyes)
    target = torch.tensor(center).expand_as(eyes_t)
    R = look_at_rotation(eyes_t, target, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    t = -(R @ eyes_t[..., None])[..., 0]
    K = torch.tensor([[4000.0, 0, 799.5], [0, 4000.0, 599.5], [0, 0, 1]], dtype=torch.float64).expand(n_views, 3, 3)
    return Cameras.create(K, R, t, 1600, 1200)


def run(quick: bool = False, template: Optional[Path] = None, threads: Optional[int] = None) -> dict:
    """Measure the figures; ``quick`` uses fewer repeats; ``threads`` sets torch's intra-op
    threads for the run (restored afterwards). Returns a JSON-able dict."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(quick, template)
    finally:
        torch.set_num_threads(old_threads)


def _run(quick: bool, template: Optional[Path]) -> dict:
    v, f, name = _mesh(template)
    rng = np.random.default_rng(0)
    repeats = 3 if quick else 50  # each figure costs <= ~0.1 s; many repeats steady the median on a shared VM
    out = {"mesh": name, "n_verts": int(len(v)), "n_faces": int(len(f)), "torch_threads": torch.get_num_threads()}

    # --- point-to-surface: 20k points near the surface, float32 grads w.r.t. verts and points
    P = 20000
    base = v[rng.integers(0, len(v), P)] + rng.normal(size=(P, 3)) * 3.0
    verts = torch.tensor(v, dtype=torch.float32)[None].requires_grad_(True)
    pts = torch.tensor(base, dtype=torch.float32)[None].requires_grad_(True)
    faces = torch.tensor(f)

    def p2s(backend: str = "auto"):
        d, _ = point_to_surface(pts, verts, faces, backend=backend)
        d.mean().backward()

    out["p2s_backend"] = _resolve_backend("auto", pts.device)
    closest_faces(pts.detach(), verts.detach(), faces)  # one-off JIT compile / cache load of "grid"
    out["p2s_fwd_bwd_20k"] = _time(p2s, repeats)
    out["p2s_query_only_20k"] = _time(lambda: closest_faces(pts.detach(), verts.detach(), faces), repeats)
    if _igl_available():
        out["p2s_fwd_bwd_20k_igl"] = _time(lambda: p2s("igl"), repeats)
        out["p2s_query_only_20k_igl"] = _time(
            lambda: closest_faces(pts.detach(), verts.detach(), faces, backend="igl"), repeats)
    if _grid_available():
        from tempeh.geometry.closest_face import build_triangle_grid

        v32 = verts.detach()[0].double().numpy()
        out["p2s_grid_build_only"] = _time(lambda: build_triangle_grid(v32, f), repeats)
    fidx = closest_faces(pts.detach(), verts.detach(), faces)

    def exact_only():
        a, b, c = _gather_triangles(verts, faces, fidx)
        safe_sqrt(point_triangle_distance_sq(pts, a, b, c)).mean().backward()

    out["p2s_exact_torch_fwd_bwd_20k_given_faces"] = _time(exact_only, repeats)
    out["p2s_target_ms"] = 30.0

    # --- visibility: 16 views x all vertices
    center = 0.5 * (v.min(0) + v.max(0))
    cams = _ring_cameras(16, center)[None]
    vt = torch.tensor(v)[None]
    vis = visibility(vt, faces, cams)
    out["vis_fraction"] = float(vis.float().mean())
    out["visibility_16views"] = _time(lambda: visibility(vt, faces, cams), repeats)
    out["visibility_target_ms"] = 50.0
    m = np.random.default_rng(1).random((300, 300))
    out["calibration_numpy_matmul300"] = _time(lambda: m @ m, repeats)
    out["note"] = "measured on a shared CPU (other jobs running): figures are noisy upper bounds"
    return out


if __name__ == "__main__":
    n_threads = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--threads=")), None)
    print(json.dumps(run(quick="--quick" in sys.argv, threads=n_threads), indent=2))
