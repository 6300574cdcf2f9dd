"""Per-view vertex visibility by ray casting, and a first-hit ray caster.

A vertex ``X`` of mesh ``b`` is visible in view ``v`` when

1. it projects inside the image (``Cameras.project`` with lens distortion, then
   ``Cameras.in_image``: ``u in [-0.5, W - 0.5)``, ``v in [-0.5, H - 0.5)``),
2. it is in front of the camera (camera-frame depth > 0), and
3. nothing occludes it: the segment from ``X + tol * d`` to ``C - tol * d`` (``C`` the camera
   centre, ``d = (C - X) / |C - X|``) hits no triangle of the mesh. Equivalently, the first hit
   of the ray cast from the camera towards ``X`` is no closer to the camera than
   ``|C - X| - tol``. The tolerance ``tol`` (mm) defaults to ``rel_tol`` (1e-3) times the
   diagonal of the mesh's bounding box (0.3 mm for a head); it keeps a vertex from being
   hidden by its own incident triangles.

Backends (``backend=``):

* ``"embree"``: Intel Embree (CPU, float32 inside; vertices are centred first, so the precision
  is about 1e-7 of the mesh size plus camera distance, far below ``tol``): an occlusion query
  with a per-ray maximum distance for all rays of all views of one mesh. Occlusion calls the
  Embree 4 library bundled with ``embreex`` directly, on all torch threads
  (:mod:`tempeh.geometry.embree_rays`; scene + 80k rays on the FLAME benchmark ~11 ms on 2
  threads, against ~40 ms through embreex's API, which holds the GIL); when that library cannot
  be loaded, and for first hits, it goes through ``embreex`` (the engine behind
  ``trimesh.ray.has_embree``).
* ``"torch"``: chunked brute-force Moller-Trumbore ray-triangle tests in torch on the device of
  the inputs (the GPU path; usable on CPU for testing, but O(rays x faces)).
* ``"auto"``: ``"torch"`` for CUDA inputs, ``"embree"`` on CPU when available, else ``"torch"``
  with a logged warning (trimesh's pure-python ray intersector needs ``rtree`` and is not used).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from tempeh.cameras import Cameras

logger = logging.getLogger(__name__)

__all__ = ["visibility", "raycast_first_hit", "occluded_segments", "embree_available"]

_BACKENDS = ("auto", "embree", "torch")


def embree_available() -> bool:
    """True when the Embree ray engine (``embreex``) can be imported."""
    try:
        from embreex import rtcore_scene  # noqa: F401
        from embreex.mesh_construction import TriangleMesh  # noqa: F401
    except Exception:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown visibility backend {backend!r}; choose one of {_BACKENDS}")
    if backend == "embree" and not embree_available():
        raise ValueError("backend='embree' needs embreex (pip install embreex); use 'auto' or 'torch'")
    if backend == "auto":
        if device.type == "cuda":
            return "torch"
        if embree_available():
            return "embree"
        logger.warning("Embree (embreex) not available: visibility falls back to the slow brute-force torch backend")
        return "torch"
    return backend


# ----------------------------------------------------------------------------- embree


class _EmbreeMesh:
    """An Embree scene of one triangle mesh, translated to its bounding-box centre (float32)."""

    def __init__(self, verts: np.ndarray, faces: np.ndarray):
        from embreex import rtcore_scene
        from embreex.mesh_construction import TriangleMesh

        verts = np.asarray(verts, dtype=np.float64)
        self.origin = 0.5 * (verts.min(0) + verts.max(0))
        self.scene = rtcore_scene.EmbreeScene()
        TriangleMesh(
            scene=self.scene,
            vertices=np.ascontiguousarray(verts - self.origin, dtype=np.float32),
            indices=np.ascontiguousarray(faces, dtype=np.int32),
        )

    def _rays(self, origins: np.ndarray, dirs: np.ndarray):
        o = np.ascontiguousarray(np.asarray(origins, dtype=np.float64) - self.origin, dtype=np.float32)
        d = np.ascontiguousarray(dirs, dtype=np.float32)
        return o, d

    def occluded(self, origins: np.ndarray, dirs: np.ndarray, max_dist: np.ndarray) -> np.ndarray:
        """Any hit with ``0 <= t <= max_dist`` (dirs unit length): ``(R,)`` bool."""
        o, d = self._rays(origins, dirs)
        tfar = np.ascontiguousarray(max_dist, dtype=np.float32)
        res = self.scene.run(o, d, dists=tfar, query="OCCLUDED")  # 0 = occluded, -1 = free
        return np.asarray(res) != -1

    def first_hit(self, origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        o, d = self._rays(origins, dirs)
        out = self.scene.run(o, d, output=1)
        face = np.asarray(out["primID"], dtype=np.int64)
        dist = np.where(face >= 0, np.asarray(out["tfar"], dtype=np.float64), np.inf)
        return dist, np.where(face >= 0, face, -1)


def _occluder(verts: np.ndarray, faces: np.ndarray):
    """An occlusion-query scene: Embree called directly (multi-threaded, :mod:`embree_rays`) when
    its library loads, else embreex's API."""
    from tempeh.geometry import embree_rays

    if embree_rays.available():
        return embree_rays.EmbreeOccluder(verts, faces)
    return _EmbreeMesh(verts, faces)


# ----------------------------------------------------------------------------- torch brute force


def _ray_triangle_t(o: Tensor, d: Tensor, v0: Tensor, e1: Tensor, e2: Tensor) -> Tensor:
    """Moller-Trumbore, double-sided. ``o, d (R,1,3)``, ``v0, e1, e2 (1,F,3)`` -> ``t (R,F)``,
    ``inf`` where the ray's line misses the triangle (t may be negative).

    The barycentric bounds are widened by ``1000 * eps(dtype)`` (2e-13 in float64, 1e-4 in
    float32, relative to the triangle) so that a ray through a shared edge or vertex cannot slip
    between the two triangles by rounding (watertightness)."""
    o, d, v0, e1, e2 = (x.unbind(-1) for x in (o, d, v0, e1, e2))  # component-wise, broadcast (R, F)
    cross = lambda u, v: (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])  # noqa: E731
    dot = lambda u, v: u[0] * v[0] + u[1] * v[1] + u[2] * v[2]  # noqa: E731
    pvec = cross(d, e2)
    det = dot(e1, pvec)
    ok = det.abs() > 1e-12 * (dot(e1, e1) * dot(e2, e2)).sqrt()
    inv = 1.0 / torch.where(ok, det, torch.ones_like(det))
    tvec = (o[0] - v0[0], o[1] - v0[1], o[2] - v0[2])
    u = dot(tvec, pvec) * inv
    qvec = cross(tvec, e1)
    v = dot(d, qvec) * inv
    t = dot(e2, qvec) * inv
    slack = 1000 * torch.finfo(t.dtype).eps
    hit = ok & (u >= -slack) & (v >= -slack) & (u + v <= 1 + slack)
    return torch.where(hit, t, torch.full_like(t, float("inf")))


def _torch_chunks(origins: Tensor, dirs: Tensor, verts: Tensor, faces: Tensor, max_elems: int):
    tri = verts[faces]  # (F, 3, 3)
    v0 = tri[None, :, 0]
    e1 = (tri[:, 1] - tri[:, 0])[None]
    e2 = (tri[:, 2] - tri[:, 0])[None]
    chunk = max(1, max_elems // faces.shape[0])
    for s in range(0, origins.shape[0], chunk):
        yield s, _ray_triangle_t(origins[s : s + chunk, None], dirs[s : s + chunk, None], v0, e1, e2)


def _max_elems(device: torch.device) -> int:
    """Ray x face pairs per chunk: ~16M on CUDA (about 1 GiB of temporaries), 2M on CPU."""
    return 1 << 24 if device.type == "cuda" else 1 << 21


def _occluded_torch(origins, dirs, max_dist, verts, faces, max_elems: Optional[int] = None) -> Tensor:
    max_elems = max_elems or _max_elems(origins.device)
    out = torch.zeros(origins.shape[0], dtype=torch.bool, device=origins.device)
    for s, t in _torch_chunks(origins, dirs, verts, faces, max_elems):
        m = max_dist[s : s + t.shape[0], None]
        out[s : s + t.shape[0]] = ((t >= 0) & (t <= m)).any(-1)
    return out


def _first_hit_torch(origins, dirs, verts, faces, max_elems: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    max_elems = max_elems or _max_elems(origins.device)
    dist = torch.full((origins.shape[0],), float("inf"), dtype=origins.dtype, device=origins.device)
    face = torch.full((origins.shape[0],), -1, dtype=torch.long, device=origins.device)
    for s, t in _torch_chunks(origins, dirs, verts, faces, max_elems):
        t = torch.where(t >= 0, t, torch.full_like(t, float("inf")))
        tmin, fi = t.min(-1)
        dist[s : s + t.shape[0]] = tmin
        face[s : s + t.shape[0]] = torch.where(torch.isfinite(tmin), fi, torch.full_like(fi, -1))
    return dist, face


# ----------------------------------------------------------------------------- validation


def _check_mesh(verts, faces, where: str, batched: bool) -> None:
    want = "(B, N, 3)" if batched else "(N, 3)"
    if verts.ndim != (3 if batched else 2) or verts.shape[-1] != 3:
        raise ValueError(f"{where}: verts must be {want}, got shape {tuple(verts.shape)}")
    if verts.shape[-2] == 0:
        raise ValueError(f"{where}: mesh has no vertices")
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"{where}: faces must be a non-empty (F, 3) array, got shape {tuple(faces.shape)}")
    if faces.dtype.is_floating_point if isinstance(faces, Tensor) else np.issubdtype(faces.dtype, np.floating):
        raise ValueError(f"{where}: faces must be integers, got {faces.dtype}")
    n = verts.shape[-2]
    if int(faces.min()) < 0 or int(faces.max()) >= n:
        raise ValueError(f"{where}: face indices out of range [0, {n}): min {int(faces.min())}, max {int(faces.max())}")
    finite = bool(torch.isfinite(verts).all()) if isinstance(verts, Tensor) else bool(np.isfinite(verts).all())
    if not finite:
        raise ValueError(f"{where}: verts contain NaN/inf")


# ----------------------------------------------------------------------------- public API


def occluded_segments(
    starts: Tensor, ends: Tensor, verts: Tensor, faces: Tensor, tol: float = 0.0, backend: str = "auto"
) -> Tensor:
    """Whether the segment from each start to its end crosses the mesh (end points excluded by ``tol``).

    Args:
        starts, ends: ``(R, 3)`` world, mm.
        verts: ``(N, 3)`` world, mm; faces: ``(F, 3)`` integer.
        tol: length in mm cut from both ends of every segment before testing.
        backend: ``"auto" | "embree" | "torch"``.
    Returns:
        ``(R,)`` bool on the device of ``starts``: True when some triangle is hit strictly inside
        the shortened segment. Segments shorter than ``2 tol`` are never occluded.
    """
    _check_mesh(verts, faces, "occluded_segments", batched=False)
    name = _resolve_backend(backend, starts.device)
    with torch.no_grad():
        seg = ends - starts
        length = seg.norm(dim=-1)
        d = seg / length.clamp_min(1e-12).unsqueeze(-1)
        origins = starts + tol * d
        max_dist = length - 2 * tol
        live = max_dist > 0
        out = torch.zeros(starts.shape[0], dtype=torch.bool, device=starts.device)
        if not bool(live.any()):
            return out
        if name == "embree":
            mesh = _occluder(verts.detach().cpu().double().numpy(), faces.detach().cpu().numpy())
            occ = mesh.occluded(
                origins[live].cpu().double().numpy(), d[live].cpu().double().numpy(), max_dist[live].cpu().double().numpy()
            )
            out[live] = torch.from_numpy(occ).to(out.device)
        else:
            out[live] = _occluded_torch(origins[live], d[live], max_dist[live], verts.to(origins.dtype), faces.long())
        return out


def visibility(
    verts: Tensor,
    faces: Tensor,
    cameras: Cameras,
    backend: str = "auto",
    tol: Optional[float] = None,
    rel_tol: float = 1e-3,
) -> Tensor:
    """Per-view visibility of every vertex (in image, in front, not occluded).

    Args:
        verts: ``(B, N, 3)`` world, mm.
        faces: ``(F, 3)`` integer vertex indices shared by the batch.
        cameras: :class:`~tempeh.cameras.Cameras` with batch shape ``(B, V)``.
        backend: ``"auto" | "embree" | "torch"`` (see the module docstring).
        tol: occlusion tolerance in mm; ``None`` means ``rel_tol`` x the bounding-box diagonal
            of each mesh.
        rel_tol: relative tolerance used when ``tol`` is None.
    Returns:
        ``(B, V, N)`` bool on the device of ``verts``. Not differentiable.
    """
    _check_mesh(verts, faces, "visibility", batched=True)
    B, N, _ = verts.shape
    if len(cameras.batch_shape) != 2 or cameras.batch_shape[0] != B:
        raise ValueError(f"visibility: cameras must have batch shape (B={B}, V), got {cameras.batch_shape}")
    name = _resolve_backend(backend, verts.device)
    faces = faces.long().to(verts.device)
    with torch.no_grad():
        cams = cameras.to(device=verts.device, dtype=verts.dtype)
        uv, depth = cams.project(verts.detach()[:, None])  # (B, V, N, 2), (B, V, N)
        vis = cams.in_image(uv, depth)  # (B, V, N)
        centers = cams.centers()  # (B, V, 3)
        for b in range(B):
            vb = verts[b].detach()
            t = float(tol) if tol is not None else rel_tol * float((vb.max(0).values - vb.min(0).values).norm())
            vi, ni = vis[b].nonzero(as_tuple=True)
            if vi.numel() == 0:
                continue
            occ = occluded_segments(vb[ni], centers[b, vi], vb, faces, tol=t, backend=name)
            vis[b, vi, ni] = ~occ
    return vis


def raycast_first_hit(origins, dirs, verts, faces, backend: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """First intersection of rays with a triangle mesh (double-sided triangles).

    Args:
        origins: ``(R, 3)`` world, mm (numpy or torch).
        dirs: ``(R, 3)`` directions (normalised internally; must be non-zero).
        verts: ``(N, 3)`` world, mm; faces: ``(F, 3)`` integer.
        backend: ``"auto" | "embree" | "torch"``; ``"auto"`` is Embree when available.
    Returns:
        ``hit_dist (R,)`` float64: Euclidean distance in mm from the origin to the first hit with
        ``t >= 0`` (``inf`` where the ray hits nothing), and ``face_idx (R,)`` int64 (``-1`` where
        no hit). Embree computes in float32 (about 1e-4 mm at metre scale).
    """
    o = np.asarray(origins.detach().cpu() if isinstance(origins, Tensor) else origins, dtype=np.float64)
    d = np.asarray(dirs.detach().cpu() if isinstance(dirs, Tensor) else dirs, dtype=np.float64)
    v = np.asarray(verts.detach().cpu() if isinstance(verts, Tensor) else verts, dtype=np.float64)
    f = np.asarray(faces.detach().cpu() if isinstance(faces, Tensor) else faces)
    if o.ndim != 2 or o.shape[-1] != 3 or o.shape != d.shape:
        raise ValueError(f"raycast_first_hit: origins and dirs must both be (R, 3), got {o.shape} and {d.shape}")
    _check_mesh(v, f, "raycast_first_hit", batched=False)
    if not (np.isfinite(o).all() and np.isfinite(d).all()):
        raise ValueError("raycast_first_hit: origins/dirs contain NaN/inf")
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"raycast_first_hit: zero-length direction at ray {int(np.argmax(norm[:, 0] == 0))}")
    d = d / norm
    if o.shape[0] == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    name = _resolve_backend(backend, torch.device("cpu"))
    if name == "embree":
        return _EmbreeMesh(v, f).first_hit(o, d)
    dist, face = _first_hit_torch(torch.from_numpy(o), torch.from_numpy(d), torch.from_numpy(v), torch.from_numpy(f).long())
    return dist.numpy(), face.numpy()
