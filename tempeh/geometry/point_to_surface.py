"""Exact point-to-triangle-mesh distance, differentiable w.r.t. the points and the vertices.

Two steps:

1. A fast, non-differentiable query finds, for every point, the index of the closest triangle
   (``backend``):

   * ``"grid"``: tempeh's own exact uniform-grid query compiled with numba
     (:mod:`tempeh.geometry.closest_face`), float64, CPU, the grid rebuilt per call (the
     vertices change every step), ~3x less CPU than libigl on the FLAME template. It runs on
     ``torch.get_num_threads()`` threads. The first call in a fresh environment JIT-compiles it
     (~30 s, once: the machine code is cached in ``__pycache__``; later processes load it in
     ~1-3 s including ``import numba``).
   * ``"igl"``: libigl's AABB tree in float64 on CPU.
   * ``"torch"``: a chunked brute-force torch query that runs on any device.
   * ``"kaolin"``: NVIDIA kaolin when it is importable and the inputs are on CUDA (optional).

   ``"auto"`` picks kaolin -> torch on CUDA and grid -> igl -> torch on CPU (grid when numba
   imports). CUDA inputs with a CPU backend are copied to the CPU for the query only.
2. :func:`point_triangle_distance_sq` evaluates the exact squared distance to that triangle in
   torch, so gradients flow to the points and to the three vertices of the chosen face (exact
   first derivatives via the envelope theorem, see its docstring). The ``"grid"`` query also
   returns the closest point (barycentric weights and ``p - q``, float64), and
   ``point_to_surface`` then returns its distance with the same envelope-theorem gradients from a
   small autograd Function (first derivatives only) instead of re-solving in torch.

The distance is the unsigned Euclidean distance to the closest point ON the triangle (not its
plane). Which of the 7 Voronoi regions holds the closest point (interior, one of 3 edges, one of
3 vertices) is resolved by taking the minimum of 4 exact candidates: the squared distance to the
plane when the projection falls inside the triangle, and the squared distances to the 3 closed
segments (the clamped segment parameter reaches the vertex regions). Where two regions meet the
candidates agree, so the distance is continuous and its gradient w.r.t. the point is the unit
vector ``(p - q) / |p - q|`` from the closest point ``q``.

Units: whatever the inputs use (mm in tempeh); ``dist`` has the unit of the coordinates,
``squared=True`` gives its square.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "point_triangle_distance_sq",
    "point_to_surface",
    "closest_points",
    "closest_faces",
    "safe_sqrt",
]

_BACKENDS = ("auto", "grid", "igl", "torch", "kaolin")


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at ``x == 0`` is 0 instead of inf/NaN.

    For ``x > 0`` value and gradient are exactly those of ``torch.sqrt``; at 0 the value is 0 and
    the gradient is 0 (a valid subgradient of the distance at a point on the surface). Twice
    differentiable (built from ``torch.where``, no custom Function).
    """
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).sum(-1)


# Component-wise 3-vectors (tuples of 3 tensors): elementwise kernels on contiguous arrays are
# several times faster than reductions over a trailing axis of size 3.
def _sub(u, v):
    return (u[0] - v[0], u[1] - v[1], u[2] - v[2])


def _cdot(u, v):
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _ccross(u, v):
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _segment(op, e):
    """Closest point on segment ``o + t e, t in [0, 1]`` to ``p`` given ``op = p - o``.

    Returns ``(t, d2)``; a zero-length segment gives ``t = 0`` with finite gradients.
    """
    ee = _cdot(e, e)
    t = (_cdot(op, e) / torch.where(ee > 0, ee, torch.ones_like(ee))).clamp(0.0, 1.0)
    diff = (op[0] - t * e[0], op[1] - t * e[1], op[2] - t * e[2])
    return t, _cdot(diff, diff)


def _point_triangle(p: Tensor, a: Tensor, b: Tensor, c: Tensor, with_bary: bool):
    """Shared core: exact squared distance, the winning region and (optionally) barycentrics.

    ``p, a, b, c``: ``(..., 3)`` broadcastable. Region ids: 0 interior, 1 edge ab, 2 edge bc,
    3 edge ca (the vertex regions are the clamped ends of the edges).
    """
    p, a, b, c = (x.unbind(-1) for x in (p, a, b, c))
    ab, ac, bc, ca = _sub(b, a), _sub(c, a), _sub(c, b), _sub(a, c)
    ap, bp, cp = _sub(p, a), _sub(p, b), _sub(p, c)
    n = _ccross(ab, ac)
    nn = _cdot(n, n)
    # Degenerate (zero or near-zero area): sin^2(angle at a) <= eps. Then only the 3 segments
    # are candidates (the sliver's interior is within ~sqrt(eps) * edge length of them).
    eps = torch.finfo(nn.dtype).eps
    valid = nn > eps * _cdot(ab, ab) * _cdot(ac, ac)
    nn_safe = torch.where(valid, nn, torch.ones_like(nn))

    grad_ctx = torch.enable_grad() if with_bary else torch.no_grad()
    with grad_ctx:
        # Unnormalised barycentrics of the projection of p (n-components cancel in the triple products).
        wa = _cdot(_ccross(bc, bp), n)
        wb = _cdot(_ccross(ca, cp), n)
        wc = _cdot(_ccross(ab, ap), n)
    inside = valid & (wa >= 0) & (wb >= 0) & (wc >= 0)

    h = _cdot(ap, n)
    d2_in = torch.where(inside, h * h / nn_safe, torch.full_like(h, float("inf")))
    t_ab, d2_ab = _segment(ap, ab)
    t_bc, d2_bc = _segment(bp, bc)
    t_ca, d2_ca = _segment(cp, ca)
    d2_all = torch.stack(torch.broadcast_tensors(d2_in, d2_ab, d2_bc, d2_ca), dim=-1)
    d2, region = d2_all.min(dim=-1)
    if not with_bary:
        return d2, region, None

    shape = d2.shape
    zero = torch.zeros(shape, dtype=d2.dtype, device=d2.device)
    inv = 1.0 / nn_safe
    cands = torch.stack(
        [
            torch.stack(torch.broadcast_tensors(wa * inv, wb * inv, wc * inv), -1),
            torch.stack(torch.broadcast_tensors(1 - t_ab, t_ab, zero), -1),
            torch.stack(torch.broadcast_tensors(zero, 1 - t_bc, t_bc), -1),
            torch.stack(torch.broadcast_tensors(t_ca, zero, 1 - t_ca), -1),
        ],
        dim=-2,
    )  # (..., 4, 3)
    bary = torch.gather(cands, -2, region[..., None, None].expand(*shape, 1, 3)).squeeze(-2)
    return d2, region, bary


def point_triangle_distance_sq(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Exact squared distance from points to triangles (closest point ON the triangle).

    Handles all 7 Voronoi regions (interior, 3 edges, 3 vertices) and degenerate triangles
    (zero area: the distance to the segment/point they collapse to).

    Gradients: the closest point ``q = wa a + wb b + wc c`` is found without autograd, then
    ``d2 = |p - q|^2`` is differentiated with the barycentric weights held constant. By
    Danskin's (envelope) theorem this gives the EXACT first derivatives of the minimum distance
    (the closest point of a triangle is unique): ``d d2 / dp = 2 (p - q)`` and
    ``d d2 / da = -2 wa (p - q)`` etc. They are finite everywhere, including zero-area triangles
    and points on the surface (``d2 = 0``, gradient 0). Second derivatives treat the weights as
    constants (not the exact Hessian).

    Args:
        p: ``(..., 3)`` points.
        a, b, c: ``(..., 3)`` triangle vertices (broadcastable with ``p``), same unit as ``p``.
    Returns:
        ``(...)`` squared distances (unit^2).
    """
    with torch.no_grad():
        _, _, w = _point_triangle(p.detach(), a.detach(), b.detach(), c.detach(), with_bary=True)
    diff = p - (w[..., 0:1] * a + w[..., 1:2] * b + w[..., 2:3] * c)
    return _dot(diff, diff)


# ----------------------------------------------------------------------------- validation


def _check_inputs(points: Tensor, verts: Tensor, faces: Tensor, where: str) -> None:
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"{where}: points must be (B, P, 3), got shape {tuple(points.shape)}")
    if verts.ndim != 3 or verts.shape[-1] != 3:
        raise ValueError(f"{where}: verts must be (B, N, 3), got shape {tuple(verts.shape)}")
    if points.shape[0] != verts.shape[0]:
        raise ValueError(f"{where}: batch sizes differ: points {points.shape[0]} vs verts {verts.shape[0]}")
    if points.shape[1] == 0:
        raise ValueError(f"{where}: empty point set (P = 0)")
    if verts.shape[1] == 0:
        raise ValueError(f"{where}: mesh has no vertices (N = 0)")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"{where}: faces must be (F, 3), got shape {tuple(faces.shape)}")
    if faces.shape[0] == 0:
        raise ValueError(f"{where}: mesh has no faces (F = 0)")
    if faces.dtype.is_floating_point or faces.dtype == torch.bool:
        raise ValueError(f"{where}: faces must be an integer tensor, got {faces.dtype}")
    if not points.dtype.is_floating_point or points.dtype != verts.dtype:
        raise ValueError(f"{where}: points and verts must share a floating dtype, got {points.dtype}, {verts.dtype}")
    on_cpu = (points.device.type == verts.device.type == faces.device.type == "cpu"
              and points.dtype in (torch.float32, torch.float64))
    # On CPU the reductions run in numpy: a torch parallel op here leaves torch's OpenMP workers
    # spinning while the (threaded) closest-face query starts, which cost ~5 ms per call.
    fs = faces.detach().numpy() if on_cpu else faces
    fmin, fmax = int(fs.min()), int(fs.max())
    if fmin < 0 or fmax >= verts.shape[1]:
        raise ValueError(f"{where}: face indices out of range [0, {verts.shape[1]}): min {fmin}, max {fmax}")
    for name, x, item in (("points", points, "point"), ("verts", verts, "vertex")):
        # cheap test first: the sum is finite unless some entry is NaN/inf (or it overflows)
        total = x.detach().numpy().sum(dtype=np.float64) if on_cpu else x.detach().sum(dtype=torch.float64)
        if not bool(np.isfinite(float(total))):
            nonfinite = (~torch.isfinite(x.detach())).any(-1)
            if bool(nonfinite.any()):
                bad = nonfinite.nonzero()[0].tolist()
                raise ValueError(f"{where}: {name} contain NaN/inf (first at batch {bad[0]}, {item} {bad[1]})")


# ----------------------------------------------------------------------------- closest-face query


def _kaolin_available() -> bool:
    try:
        import kaolin.metrics.trianglemesh  # noqa: F401
    except Exception:  # pragma: no cover - optional dependency
        return False
    return True


def _igl_available() -> bool:
    try:
        import igl  # noqa: F401
    except Exception:  # pragma: no cover
        return False
    return hasattr(igl, "point_mesh_squared_distance")


def _grid_available() -> bool:
    try:
        from tempeh.geometry.closest_face import NUMBA_AVAILABLE
    except Exception:  # pragma: no cover
        return False
    return NUMBA_AVAILABLE


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown point_to_surface backend {backend!r}; choose one of {_BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            return "kaolin" if _kaolin_available() else "torch"
        if _grid_available():
            return "grid"
        return "igl" if _igl_available() else "torch"
    if backend == "kaolin" and (device.type != "cuda" or not _kaolin_available()):
        raise ValueError("backend='kaolin' needs kaolin installed and CUDA inputs; use 'auto' or 'torch'")
    if backend == "igl" and not _igl_available():
        raise ValueError("backend='igl' needs libigl (import igl); use 'auto' or 'torch'")
    if backend == "grid" and not _grid_available():
        raise ValueError("backend='grid' needs numba (import numba); use 'auto' or 'torch'")
    return backend


def _numpy64(x: Tensor) -> np.ndarray:
    """``x`` as a float64 numpy array, converted by numpy (see the note in ``_check_inputs``)."""
    x = x.detach().cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.double()
    return x.numpy().astype(np.float64)


def _closest_faces_grid(points: Tensor, verts: Tensor, faces: Tensor, with_closest: bool = False):
    """``face_idx (B, P) int64`` from the numba grid, and with ``with_closest`` also the query's
    numpy arrays ``(faces (F, 3) int64, face_idx (B, P), dist_sq (B, P), bary (B, P, 3),
    diff (B, P, 3))``, float64 (``diff = p - q`` for the closest point ``q``), else None."""
    from tempeh.geometry.closest_face import closest_faces_grid

    f = np.ascontiguousarray(faces.detach().cpu().numpy(), dtype=np.int64)
    n_threads = torch.get_num_threads()
    res = [closest_faces_grid(p, v, f, num_threads=n_threads, with_closest=with_closest)
           for p, v in zip(_numpy64(points), _numpy64(verts))]
    # B = 1 (the common case) needs no stacking copy
    arrays = [r[0][None] if len(res) == 1 else np.stack(r) for r in zip(*res)]
    face_idx = torch.from_numpy(arrays[0]).to(points.device)
    if not with_closest:
        return face_idx, None
    return face_idx, (f, *arrays)


class _GridDistSq(torch.autograd.Function):
    """Squared distances from the grid query (float64 closest points), with the exact first
    derivatives of the envelope theorem: ``d d2 / dp = 2 (p - q)``, ``d d2 / dv_k = -2 w_k (p - q)``
    for the 3 vertices of the closest face (weights ``w``), scattered by a numba kernel
    (:func:`tempeh.geometry.closest_face.envelope_grads`). The same values and first derivatives
    as :func:`point_triangle_distance_sq`, without re-solving the closest point in torch and
    without torch gather/scatter ops on the CPU. First order only (``once_differentiable``).
    ``query``: the numpy tuple of :func:`_closest_faces_grid`."""

    @staticmethod
    def forward(ctx, points, verts, query):
        ctx.query = query
        ctx.num_verts = verts.shape[1]
        ctx.dtypes = (points.dtype, verts.dtype)
        return torch.from_numpy(query[2]).to(device=points.device, dtype=points.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from tempeh.geometry.closest_face import envelope_grads

        faces, face_idx, _, bary, diff = ctx.query
        g = grad.detach().cpu().numpy()
        out = [envelope_grads(g[b], faces, face_idx[b], bary[b], diff[b], ctx.num_verts) for b in range(g.shape[0])]
        g_p = g_v = None
        if ctx.needs_input_grad[0]:
            g_p = torch.from_numpy(np.stack([o[0] for o in out])).to(device=grad.device, dtype=ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            g_v = torch.from_numpy(np.stack([o[1] for o in out])).to(device=grad.device, dtype=ctx.dtypes[1])
        return g_p, g_v, None


def _closest_faces_igl(points: Tensor, verts: Tensor, faces: Tensor) -> Tensor:
    import igl

    f = np.ascontiguousarray(faces.detach().cpu().numpy().astype(np.int64))
    out = []
    for p, v in zip(_numpy64(points), _numpy64(verts)):
        _, idx, _ = igl.point_mesh_squared_distance(np.ascontiguousarray(p), np.ascontiguousarray(v), f)
        out.append(np.asarray(idx, dtype=np.int64).reshape(-1))
    return torch.from_numpy(np.stack(out)).to(points.device)


def _closest_faces_torch(points: Tensor, verts: Tensor, faces: Tensor, max_elems: Optional[int] = None) -> Tensor:
    """Brute force over all faces, chunked over points so a chunk holds <= ``max_elems`` pairs
    (default ~8M on CUDA, 1M on CPU)."""
    if max_elems is None:
        max_elems = 1 << 23 if points.device.type == "cuda" else 1 << 20
    B, P, _ = points.shape
    F = faces.shape[0]
    chunk = max(1, max_elems // F)
    out = torch.empty(B, P, dtype=torch.long, device=points.device)
    with torch.no_grad():
        for bi in range(B):
            tri = verts[bi][faces]  # (F, 3, 3)
            a, b, c = tri[None, :, 0], tri[None, :, 1], tri[None, :, 2]
            for s in range(0, P, chunk):
                p = points[bi, s : s + chunk, None, :]  # (chunk, 1, 3)
                d2 = _point_triangle(p, a, b, c, with_bary=False)[0]  # (chunk, F)
                out[bi, s : s + chunk] = d2.argmin(dim=-1)
    return out


def _closest_faces_kaolin(points: Tensor, verts: Tensor, faces: Tensor) -> Tensor:  # pragma: no cover - CUDA only
    from kaolin.metrics.trianglemesh import point_to_mesh_distance

    with torch.no_grad():
        face_vertices = verts.float()[:, faces]  # (B, F, 3, 3)
        _, idx, _ = point_to_mesh_distance(points.float().contiguous(), face_vertices.contiguous())
    return idx.long()


def _closest(points: Tensor, verts: Tensor, faces: Tensor, backend: str, with_closest: bool):
    """Validated query: ``(face_idx (B, P), closest)``; ``closest`` is the grid's
    numpy tuple of :func:`_closest_faces_grid` when asked for and the backend is the grid, else
    None."""
    _check_inputs(points, verts, faces, "closest_faces")
    faces = faces.long()
    name = _resolve_backend(backend, points.device)
    if name == "grid":
        return _closest_faces_grid(points, verts, faces, with_closest)
    if name == "igl":
        return _closest_faces_igl(points, verts, faces), None
    if name == "kaolin":
        return _closest_faces_kaolin(points, verts, faces), None
    return _closest_faces_torch(points, verts, faces), None


def closest_faces(points: Tensor, verts: Tensor, faces: Tensor, backend: str = "auto") -> Tensor:
    """Index of the closest triangle for every point (non-differentiable query).

    Args:
        points: ``(B, P, 3)``; verts: ``(B, N, 3)``; faces: ``(F, 3)`` integer.
        backend: ``"auto" | "grid" | "igl" | "torch" | "kaolin"`` (see module docstring).
    Returns:
        ``(B, P)`` int64 face indices on the device of ``points``. On ties (equidistant faces,
        e.g. a closest point on a shared edge) any of the tied faces may be returned.
    """
    return _closest(points, verts, faces, backend, with_closest=False)[0]


# ----------------------------------------------------------------------------- public API


def _gather_triangles(verts: Tensor, faces: Tensor, face_idx: Tensor):
    """``verts (B,N,3)``, ``faces (F,3)``, ``face_idx (B,P)`` -> a, b, c each ``(B,P,3)``."""
    vidx = faces[face_idx]  # (B, P, 3)
    B, P, _ = vidx.shape
    tri = torch.gather(verts, 1, vidx.reshape(B, P * 3, 1).expand(B, P * 3, 3)).reshape(B, P, 3, 3)
    return tri.unbind(-2)


def point_to_surface(
    points: Tensor,
    verts: Tensor,
    faces: Tensor,
    squared: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Exact unsigned distance from each point to a triangle mesh.

    Args:
        points: ``(B, P, 3)`` query points, mm (any unit shared with ``verts``).
        verts: ``(B, N, 3)`` mesh vertices, same frame and unit.
        faces: ``(F, 3)`` integer vertex indices shared by the batch.
        squared: return the squared distance (mm^2) instead of the distance.
        backend: closest-face query backend, ``"auto" | "grid" | "igl" | "torch" | "kaolin"``.
    Returns:
        ``dist (B, P)``: distance in mm to the closest point ON the surface (or its square),
        differentiable w.r.t. ``points`` and ``verts``. ``dist = safe_sqrt(d2)``: exactly
        ``sqrt(d2)``, whose gradient is 0 (not NaN) for points lying on the surface.
        ``face_idx (B, P)`` int64: index of the closest face.
    Raises:
        ValueError: empty point set, NaN/inf coordinates, bad shapes or out-of-range faces.
    """
    face_idx, closest = _closest(points, verts, faces, backend, with_closest=True)
    if closest is None:
        a, b, c = _gather_triangles(verts, faces.long(), face_idx)
        d2 = point_triangle_distance_sq(points, a, b, c)
    else:  # the grid's float64 closest points: values and envelope gradients without a torch re-solve
        d2 = _GridDistSq.apply(points, verts, closest)
    return (d2 if squared else safe_sqrt(d2)), face_idx


def closest_points(
    points: Tensor, verts: Tensor, faces: Tensor, backend: str = "auto"
) -> Tuple[Tensor, Tensor, Tensor]:
    """Closest point on the mesh surface for each query point (for evaluation and tools).

    Args:
        points: ``(B, P, 3)``; verts: ``(B, N, 3)``; faces: ``(F, 3)`` integer (same unit, mm).
        backend: closest-face query backend (see :func:`point_to_surface`).
    Returns:
        ``closest (B, P, 3)`` mm, ``face_idx (B, P)`` int64 and ``barycentric (B, P, 3)``: the
        weights of the face's vertices ``faces[face_idx]`` (non-negative, summing to 1), so
        ``closest = sum_k bary[..., k] * verts[faces[face_idx, k]]``. A closest point on an edge
        has one zero weight, on a vertex two. Differentiable w.r.t. points and verts.
    """
    face_idx = closest_faces(points, verts, faces, backend=backend)
    a, b, c = _gather_triangles(verts, faces.long(), face_idx)
    _, _, bary = _point_triangle(points, a, b, c, with_bary=True)
    closest = bary[..., 0:1] * a + bary[..., 1:2] * b + bary[..., 2:3] * c
    return closest, face_idx, bary
