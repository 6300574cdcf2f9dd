"""Rigid + scale alignment of a template to a raw scan (the first step of scan fitting).

All functions are numpy, float64, millimetres. A similarity transform maps template space to
scan (world) space as ``x_world = s * R @ x + t`` (column vectors; with row vectors
``X @ (s R).T + t``), ``s > 0`` a scalar, ``R`` a proper rotation.

Three ways to get the transform, most to least informed:

* :func:`similarity_from_correspondences`: weighted Umeyama fit from known pairs (3D landmarks
  on the scan + template vertex ids, or a whole predicted mesh);
* :func:`robust_icp`: iterative closest points from a starting transform; every scan point
  (a KD-tree is not needed in this direction) is matched to its EXACT closest point on the
  transformed template surface (libigl AABB tree via :func:`tempeh.geometry.closest_points`),
  pairs are weighted by Geman-McClure weights ``(sigma^2 / (sigma^2 + d^2))^2`` and a trimmed
  quantile (outliers and scan parts the template lacks get no pull), then the similarity is
  re-solved; mesh->scan pairs (KD-tree on the scan, only vertices whose nearest scan point is
  close: holes do not pull) are added with a lower weight;
* :func:`global_align`: no prior at all; centroid alignment, then a coarse search over yaw
  (rotation about the template's up axis, y in the FLAME frame) and pitch, each candidate refined
  by a short :func:`robust_icp`; the candidate with the lowest robust cost wins, then a longer
  ICP polishes it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

__all__ = [
    "Similarity", "similarity_from_correspondences", "robust_icp", "global_align",
    "scan_to_surface_pairs", "gm_weights",
]


@dataclass
class Similarity:
    """``x_world = scale * R @ x_template + t`` (mm)."""

    scale: float
    """Isotropic scale, unitless (> 0)."""
    R: np.ndarray
    """(3, 3) rotation, det +1."""
    t: np.ndarray
    """(3,) translation, mm."""

    @staticmethod
    def identity() -> "Similarity":
        return Similarity(1.0, np.eye(3), np.zeros(3))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(..., 3)`` template-space points -> world, mm."""
        return self.scale * (np.asarray(x) @ self.R.T) + self.t

    def inverse_apply(self, y: np.ndarray) -> np.ndarray:
        """``(..., 3)`` world points -> template space, mm."""
        return ((np.asarray(y) - self.t) @ self.R) / self.scale

    def compose_left(self, other: "Similarity") -> "Similarity":
        """``other ∘ self``: first self, then other."""
        return Similarity(other.scale * self.scale, other.R @ self.R,
                          other.scale * (other.R @ self.t) + other.t)


def similarity_from_correspondences(src: np.ndarray, dst: np.ndarray,
                                    weights: Optional[np.ndarray] = None,
                                    with_scale: bool = True) -> Similarity:
    """Weighted least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991).

    Args:
        src: ``(K, 3)`` template-space points, mm.
        dst: ``(K, 3)`` corresponding world points, mm.
        weights: ``(K,)`` non-negative weights (None: all 1); at least 3 non-zero.
        with_scale: estimate ``s`` (else ``s = 1``).
    Returns:
        :class:`Similarity` minimising ``sum_k w_k |s R src_k + t - dst_k|^2``.
    Raises:
        ValueError: shape mismatch, fewer than 3 weighted pairs, or degenerate (collinear) input.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(f"similarity: src {src.shape} and dst {dst.shape} must both be (K, 3)")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != src.shape[0] or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("similarity: weights must be (K,) finite and >= 0")
    if np.count_nonzero(w) < 3:
        raise ValueError(f"similarity: need >= 3 weighted correspondences, got {np.count_nonzero(w)}")
    w = w / w.sum()
    mu_s = w @ src
    mu_d = w @ dst
    xs = src - mu_s
    xd = dst - mu_d
    cov = (xd * w[:, None]).T @ xs  # (3, 3) sum w d s^T
    U, S, Vt = np.linalg.svd(cov)
    if S[1] <= 1e-9 * max(S[0], 1e-300):
        raise ValueError("similarity: correspondences are degenerate (collinear or coincident)")
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    var_s = float(w @ (xs * xs).sum(1))
    s = float((S * np.diag(D)).sum() / var_s) if with_scale else 1.0
    if not s > 0:
        raise ValueError("similarity: estimated scale is not positive (bad correspondences)")
    t = mu_d - s * R @ mu_s
    return Similarity(s, R, t)


def gm_weights(d: np.ndarray, sigma: float) -> np.ndarray:
    """Geman-McClure IRLS weights ``(sigma^2 / (sigma^2 + d^2))^2`` of distances ``d`` (mm)."""
    s2 = float(sigma) ** 2
    return (s2 / (s2 + np.asarray(d) ** 2)) ** 2


def scan_to_surface_pairs(scan: np.ndarray, verts: np.ndarray, faces: np.ndarray
                          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact closest surface point of every scan point.

    Args:
        scan: ``(P, 3)`` world mm. verts: ``(N, 3)`` world mm. faces: ``(F, 3)``.
    Returns:
        ``dist (P,)`` mm, ``face_idx (P,)`` int64, ``bary (P, 3)`` barycentric weights of the
        closest point on ``faces[face_idx]``.
    """
    scan = np.ascontiguousarray(scan, dtype=np.float64)
    verts = np.ascontiguousarray(verts, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    try:
        import igl
    except ImportError:  # pragma: no cover - libigl is a dependency; torch fallback
        igl = None
    if igl is None:  # pragma: no cover
        from tempeh.geometry.point_to_surface import closest_points

        with torch.no_grad():
            q, fi, bary = closest_points(torch.from_numpy(scan)[None], torch.from_numpy(verts)[None],
                                         torch.from_numpy(faces))
        return np.linalg.norm(scan - q[0].numpy(), axis=1), fi[0].numpy(), bary[0].numpy()
    d2, fi, q = igl.point_mesh_squared_distance(scan, verts, faces)
    fi = np.asarray(fi, dtype=np.int64).reshape(-1)
    return np.sqrt(np.maximum(d2, 0.0)), fi, _barycentric(q, verts[faces[fi]])


def _barycentric(q: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """``(P, 3)`` barycentric weights of points ``q (P, 3)`` lying on triangles ``tri (P, 3, 3)``
    (clipped to the triangle, summing to 1; degenerate triangles give the nearest corner)."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1, v2 = b - a, c - a, q - a
    d00 = np.einsum("ij,ij->i", v0, v0)
    d01 = np.einsum("ij,ij->i", v0, v1)
    d11 = np.einsum("ij,ij->i", v1, v1)
    d20 = np.einsum("ij,ij->i", v2, v0)
    d21 = np.einsum("ij,ij->i", v2, v1)
    den = d00 * d11 - d01 * d01
    ok = den > 1e-12 * np.maximum(d00 * d11, 1e-300)
    den = np.where(ok, den, 1.0)
    wb = np.where(ok, (d11 * d20 - d01 * d21) / den, 0.0)
    wc = np.where(ok, (d00 * d21 - d01 * d20) / den, 0.0)
    w = np.clip(np.stack([1.0 - wb - wc, wb, wc], 1), 0.0, None)
    return w / w.sum(1, keepdims=True)


def _face_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    n = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    fn = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    vn = np.zeros_like(verts)
    for k in range(3):  # three scatter-adds (corners), vectorised over faces
        np.add.at(vn, faces[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-300)


def _point_to_plane_step(q: np.ndarray, p: np.ndarray, n: np.ndarray, w: np.ndarray,
                         centre: np.ndarray, with_scale: bool) -> Similarity:
    """One Gauss-Newton step of ``min sum w ((A(q) - p) . n)^2`` over a small similarity ``A``
    about ``centre``: ``A(x) = x + omega x (x - c) + eps (x - c) + tau`` (linearised), returned
    as an exact similarity (rotation by ``|omega|``, scale ``exp(eps)``)."""
    x = q - centre
    J = np.concatenate([np.cross(x, n), (x * n).sum(1, keepdims=True), n], 1)  # (K, 7)
    if not with_scale:
        J = np.delete(J, 3, axis=1)
    r = ((q - p) * n).sum(1)
    A = (J * w[:, None]).T @ J + 1e-9 * np.eye(J.shape[1])
    b = -(J * w[:, None]).T @ r
    sol = np.linalg.solve(A, b)
    omega = sol[:3]
    eps = sol[3] if with_scale else 0.0
    tau = sol[-3:]
    ang = float(np.linalg.norm(omega))
    if ang > 1e-12:
        k = omega / ang
        K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        R = np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K
    else:
        R = np.eye(3)
    sc = float(np.exp(eps))
    return Similarity(sc, R, centre + tau - sc * R @ centre)


def robust_icp(scan: np.ndarray, tverts: np.ndarray, faces: np.ndarray, init: Similarity,
               iterations: int = 20, sigma: Tuple[float, float] = (20.0, 4.0),
               trim: float = 0.9, with_scale: bool = True, vertex_mask: Optional[np.ndarray] = None,
               scan_tree: Optional[cKDTree] = None, m2s_weight: float = 0.1,
               m2s_max_mm: float = 10.0, tol: float = 1e-4) -> Tuple[Similarity, float]:
    """Robust point-to-plane similarity ICP of the template surface onto a scan.

    Every iteration matches each scan point to its EXACT closest point on the transformed
    template surface (libigl AABB tree) and takes one Gauss-Newton step of the robust
    point-to-plane energy (plane of the matched face) over a small similarity; mesh->scan
    pairs (each allowed vertex to its nearest scan point, KD-tree; only within ``m2s_max_mm``,
    so holes do not pull; plane of the vertex normal) are added with relative weight
    ``m2s_weight``. Pair weights are Geman-McClure IRLS weights times a trimming mask.

    Args:
        scan: ``(P, 3)`` scan points, world mm (subsample large scans first).
        tverts: ``(N, 3)`` template vertices, template space mm. faces: ``(F, 3)``.
        init: starting transform.
        iterations: maximum number of re-matching iterations.
        sigma: Geman-McClure scale (mm) at the first and the last iteration (geometric decay).
        trim: only the closest ``trim`` fraction of the scan points get weight (0 < trim <= 1).
        with_scale: estimate the scale.
        vertex_mask: ``(N,)`` bool, vertices that may be matched mesh->scan (None: all).
        scan_tree: ``cKDTree`` of ``scan`` (built when None).
        m2s_weight: total weight of the mesh->scan pairs relative to the scan->mesh pairs.
        m2s_max_mm: mesh->scan pairs farther than this are ignored (holes).
        tol: stop when an update moves the template by less than this (mm, RMS).
    Returns:
        ``(transform, cost)``: the final transform and its robust mean scan->mesh cost
        ``mean(sigma_end^2 d^2 / (sigma_end^2 + d^2))`` over all scan points (mm^2; lower is
        better, comparable between candidates on the same scan).
    """
    scan = np.asarray(scan, dtype=np.float64)
    tverts = np.asarray(tverts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    tree = scan_tree if scan_tree is not None else cKDTree(scan)
    vm = np.ones(len(tverts), bool) if vertex_mask is None else np.asarray(vertex_mask, bool)
    T = init
    sig = np.geomspace(sigma[0], sigma[1], max(iterations, 1))
    for it in range(iterations):
        world = T.apply(tverts)
        d, fi, bary = scan_to_surface_pairs(scan, world, faces)
        q = (world[faces[fi]] * bary[:, :, None]).sum(1)
        n = _face_normals(world, faces)[fi]
        w = gm_weights(d, sig[it])
        if trim < 1.0:
            w[d > np.quantile(d, trim)] = 0.0
        p = scan
        if m2s_weight > 0:
            dn, jn = tree.query(world[vm])
            wm = gm_weights(dn, sig[it]) * (dn < m2s_max_mm)
            if wm.sum() > 0:
                wm *= m2s_weight * w.sum() / wm.sum()
                q = np.concatenate([q, world[vm]])
                p = np.concatenate([scan, scan[jn]])
                n = np.concatenate([n, _vertex_normals(world, faces)[vm]])
                w = np.concatenate([w, wm])
        if np.count_nonzero(w) < 7:
            logger.debug("robust_icp: too few weighted pairs at iteration %d", it)
            break
        step = _point_to_plane_step(q, p, n, w, world.mean(0), with_scale)
        T_new = T.compose_left(step)
        move = np.sqrt(np.mean(np.sum((T_new.apply(tverts) - world) ** 2, axis=1)))
        T = T_new
        if move < tol:
            break
    d, _, _ = scan_to_surface_pairs(scan, T.apply(tverts), faces)
    s2 = float(sigma[1]) ** 2
    cost = float(np.mean(s2 * d * d / (s2 + d * d)))
    return T, cost


def _rot_y(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def global_align(scan: np.ndarray, tverts: np.ndarray, faces: np.ndarray,
                 yaws: Sequence[float] = (-90.0, -60.0, -30.0, 0.0, 30.0, 60.0, 90.0),
                 pitches: Sequence[float] = (-20.0, 0.0, 20.0), max_points: int = 3000,
                 search_iterations: int = 8, final_iterations: int = 30,
                 vertex_mask: Optional[np.ndarray] = None,
                 rng: Optional[np.random.Generator] = None) -> Tuple[Similarity, float]:
    """Similarity alignment without any prior (coarse yaw/pitch search + robust ICP).

    Every candidate rotation ``R_y(yaw) R_x(pitch)`` about the template centroid is placed on the
    scan centroid, refined by a short :func:`robust_icp` on at most ``max_points`` scan points,
    and the lowest-cost candidate is polished by a longer ICP. Assumes the scan is roughly
    upright in the template's frame (FLAME: y up, face towards +z) as capture rigs are; the
    search covers +-90 degrees of yaw and +-20 degrees of pitch by default.

    Args:
        scan: ``(P, 3)`` world mm. tverts: ``(N, 3)`` template mm. faces: ``(F, 3)``.
        rng: draws the scan subsample (default: seed 0, deterministic).
    Returns:
        ``(transform, cost)`` as :func:`robust_icp`.
    """
    scan = np.asarray(scan, dtype=np.float64)
    tverts = np.asarray(tverts, dtype=np.float64)
    rng = rng if rng is not None else np.random.default_rng(0)
    sub = scan if len(scan) <= max_points else scan[rng.choice(len(scan), max_points, replace=False)]
    tree = cKDTree(sub)
    c_scan = np.median(sub, axis=0)
    c_tpl = tverts.mean(0)
    best: Optional[Tuple[Similarity, float]] = None
    for yaw in yaws:
        for pitch in pitches:
            R = _rot_y(yaw) @ _rot_x(pitch)
            init = Similarity(1.0, R, c_scan - R @ c_tpl)
            T, cost = robust_icp(sub, tverts, faces, init, iterations=search_iterations,
                                 sigma=(30.0, 10.0), trim=0.8, with_scale=False,
                                 vertex_mask=vertex_mask, scan_tree=tree)
            logger.debug("global_align: yaw %+.0f pitch %+.0f cost %.2f", yaw, pitch, cost)
            if best is None or cost < best[1]:
                best = (T, cost)
    assert best is not None
    return robust_icp(sub, tverts, faces, best[0], iterations=final_iterations,
                      sigma=(10.0, 3.0), trim=0.9, with_scale=True, vertex_mask=vertex_mask,
                      scan_tree=tree)
