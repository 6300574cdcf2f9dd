"""Simulated multi-view-stereo scans of the TRUE head surface (points in world mm).

What a scan is, in order of construction (all vectorised, one Embree call for the visibility):

1. **Area-uniform samples** of the posed mesh (faces drawn by area, uniform barycentrics).
2. **Holes**, removed before anything else:
   * random round patches anywhere on the surface (geodesic disc ~ Euclidean ball of radius
     ``hole_radius_mm``) until they cover ``hole_rate`` of the total surface area;
   * hair-like patches restricted to the ``scalp`` region, larger, until they cover
     ``scalp_hole_rate`` of the scalp area;
   * the eyeballs (``left_eyeball``/``right_eyeball``; specular, never reconstructed);
   * downward-facing skin (world normal y < ``chin_normal_y``): under the chin, jaw and nose,
     which a rig at head height sees at grazing angles and in shadow.
3. **Visibility**: a sample is kept only if at least ``min_views`` cameras see it: inside the
   image (distortion-aware projection), facing the camera (cosine > ``min_cos``; stereo fails
   at grazing angles) and not occluded (ray from the sample towards the camera centre).
4. **Noise**: Gaussian offsets along the face normal, std ``noise_mm``.
5. **Outliers**: ``round(outlier_rate * num_points)`` points, a fraction ``outlier_cluster_fraction``
   of them in small clusters floating 1-8 mm off the visible surface (MVS mismatches), the rest
   uniform in the mesh bounding box grown by ``outlier_margin_mm``.

``num_points`` is the total (inliers + outliers); points are shuffled. A region "contains" a
sample when at least two of its face's three vertices are in the region.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from scipy.spatial import cKDTree

from tempeh.cameras import Cameras
from tempeh.synth.render import first_hits

logger = logging.getLogger(__name__)

__all__ = ["ScanConfig", "ScanResult", "simulate_scan", "sample_surface", "face_region_mask"]


@dataclass
class ScanConfig:
    """Settings of :func:`simulate_scan` (lengths in mm)."""

    num_points: int = 80000
    """Total number of scan points (inliers + outliers)."""
    noise_mm: float = 0.2
    """Std of the Gaussian noise along the surface normal."""
    outlier_rate: float = 0.01
    """Fraction of the points that are outliers."""
    outlier_cluster_fraction: float = 0.5
    """Fraction of the outliers clustered just off the surface (the rest: uniform in a box)."""
    outlier_margin_mm: float = 30.0
    """The uniform outliers fill the mesh bounding box grown by this margin."""
    hole_rate: float = 0.04
    """Fraction of the total surface area removed by random round patches."""
    hole_radius_mm: Tuple[float, float] = (3.0, 12.0)
    """Range of the radii of the random patches (uniform)."""
    scalp_hole_rate: float = 0.25
    """Fraction of the scalp area removed by hair-like patches."""
    scalp_hole_radius_mm: Tuple[float, float] = (10.0, 25.0)
    drop_eyeballs: bool = True
    """Remove the eyeball regions."""
    chin_normal_y: float = -0.75
    """Remove samples whose world normal has y below this (surfaces facing down); -1 disables."""
    min_views: int = 2
    """A point must be seen by at least this many cameras."""
    min_cos: float = 0.1
    """Cosine between normal and direction to the camera below which a camera does not count."""


@dataclass
class ScanResult:
    """A simulated scan. ``P`` points; arrays are float64 world mm unless stated."""

    points: np.ndarray
    """(P, 3) scan points (noisy inliers and outliers, shuffled)."""
    is_outlier: np.ndarray
    """(P,) bool."""
    clean_points: np.ndarray
    """(P, 3) the noise-free surface sample of each inlier (outliers: their own position)."""
    face_idx: np.ndarray
    """(P,) int64 face the inlier was sampled on; -1 for outliers."""
    num_views: np.ndarray
    """(P,) int64 number of cameras confirmed to see the inlier's surface sample (>= min_views;
    a lower bound: the most frontal cameras are checked first). 0 for outliers."""
    hole_centers: np.ndarray
    """(K, 3) centres of the random surface holes."""
    hole_radii: np.ndarray
    """(K,) radii of the random surface holes."""
    scalp_hole_centers: np.ndarray
    """(Ks, 3) centres of the hair-like scalp holes (they only remove scalp samples)."""
    scalp_hole_radii: np.ndarray
    stats: Dict[str, float] = field(default_factory=dict)
    """Fractions of the sampled area removed by each stage (for logs and manifests)."""


def face_region_mask(faces: np.ndarray, idx: np.ndarray, num_verts: int) -> np.ndarray:
    """``(F,)`` bool: faces with at least two of their three vertices in the index set."""
    m = np.zeros(num_verts, dtype=bool)
    m[np.asarray(idx, dtype=np.int64)] = True
    return m[faces].sum(1) >= 2


def sample_surface(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator,
                   face_weights: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-uniform surface samples.

    Args:
        verts: ``(N, 3)`` mm. faces: ``(F, 3)``. n: number of samples.
        face_weights: optional ``(F,)`` non-negative multipliers of the face areas (0 excludes).
    Returns:
        points ``(n, 3)``, face index ``(n,)`` int64, barycentrics ``(n, 3)``.
    """
    tri = verts[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    w = area if face_weights is None else area * face_weights
    if not np.any(w > 0):
        raise ValueError("sample_surface: the mesh (or the selected faces) has zero area")
    cdf = np.cumsum(w)
    f = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(faces) - 1)
    r1 = np.sqrt(rng.random(n))
    r2 = rng.random(n)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], -1)
    pts = (tri[f] * bary[:, :, None]).sum(1)
    return pts, f.astype(np.int64), bary


def _face_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-300)


def _in_balls(points: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``(P,)`` bool: inside (distance <= radius) any of the balls ``(K, 3)``/``(K,)``."""
    out = np.zeros(len(points), dtype=bool)
    if len(centers) == 0 or len(points) == 0:
        return out
    hits = cKDTree(points).query_ball_point(centers, radii)  # one small query per ball
    idx = np.concatenate([np.asarray(h, dtype=np.int64) for h in hits])
    out[idx] = True
    return out


def _grow_patches(probe: np.ndarray, target: float, radius_range, rng: np.random.Generator,
                  max_patches: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """Add random balls centred on probe points until they cover ``target`` of the probes.

    ``probe``: ``(Q, 3)`` area-uniform samples of the surface the rate refers to. Balls are drawn
    in batches; the first ``k`` balls reaching the target are returned (centres, radii).
    """
    if target <= 0 or len(probe) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    if target >= 1:
        raise ValueError(f"hole rate must be < 1, got {target}")
    covered_by = np.full(len(probe), np.iinfo(np.int64).max)
    centers, radii = [], []
    batch = 16
    while sum(len(c) for c in centers) < max_patches:
        c = probe[rng.integers(0, len(probe), batch)]
        r = rng.uniform(radius_range[0], radius_range[1], batch)
        base = sum(len(x) for x in centers)
        d2 = ((probe[:, None, :] - c[None]) ** 2).sum(-1) <= r[None] ** 2  # (Q, batch)
        first = np.where(d2.any(1), base + np.argmax(d2, axis=1), np.iinfo(np.int64).max)
        covered_by = np.minimum(covered_by, first)
        centers.append(c)
        radii.append(r)
        counts = np.bincount(covered_by[covered_by < base + batch], minlength=base + batch)
        frac = np.cumsum(counts) / len(probe)
        reach = np.nonzero(frac >= target)[0]
        if reach.size:
            k = int(reach[0]) + 1
            return np.concatenate(centers)[:k], np.concatenate(radii)[:k]
    raise ValueError(f"could not cover {target:.3f} of the surface with {max_patches} patches")


def _seen_pairs(points: np.ndarray, cams: Cameras, C: np.ndarray, vi: np.ndarray, pi: np.ndarray,
                dist: np.ndarray, verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``(M,)`` bool for (camera ``vi``, point ``pi``) pairs: inside the image (distortion-aware
    projection) and unoccluded (a ray from the point, nudged 1e-3 mm towards the camera, hits
    nothing before the camera centre). One Embree call for all pairs."""
    if len(vi) == 0:
        return np.zeros(0, bool)
    vt = torch.from_numpy(vi)
    pair_cams = Cameras(cams.K[vt], cams.R[vt], cams.t[vt], cams.dist[vt], cams.width[vt],
                        cams.height[vt])  # one camera per pair (no names: fast)
    uv, depth = pair_cams.project(torch.from_numpy(points[pi])[:, None, :])
    seen = pair_cams.in_image(uv, depth)[:, 0].numpy()
    d = (C[vi] - points[pi]) / dist[:, None]
    face, t, _ = first_hits(verts, faces, points[pi] + 1e-3 * d, d)
    return seen & ((face < 0) | (t >= dist - 1e-3))


def _visible_counts(points: np.ndarray, normals: np.ndarray, cameras: Cameras, min_cos: float,
                    verts: np.ndarray, faces: np.ndarray, need: int) -> np.ndarray:
    """``(P,)`` number of cameras confirmed to see each surface point.

    A camera sees a point when the point faces it (cosine between the normal and the direction
    to the camera centre above ``min_cos``), projects into its image and is not occluded. To
    save work, the ``need + 1`` most frontal cameras of every point are checked first and the
    others only for points that still have fewer than ``need``; so a count ``>= need`` is a
    lower bound and a count ``< need`` is exact.
    """
    cams = cameras.to(dtype=torch.float64)
    C = cams.centers().numpy()  # (V, 3)
    V, P = len(C), len(points)
    dist = np.sqrt(((C[:, None, :] - points[None]) ** 2).sum(-1))  # (V, P)
    cos = (C @ normals.T - np.einsum("pk,pk->p", points, normals)[None]) / dist  # n.(C - p)/|C - p|
    facing = cos > min_cos
    k = min(V, need + 1)
    first = np.zeros((V, P), bool)
    top = np.argpartition(-cos, k - 1, axis=0)[:k] if k < V else np.arange(V)[:, None].repeat(P, 1)
    first[top, np.arange(P)[None]] = True
    counts = np.zeros(P, np.int64)
    for sel in (facing & first, None):  # pass 1: most frontal cameras; pass 2: the rest
        if sel is None:
            sel = facing & ~first & (counts < need)[None]
        vi, pi = np.nonzero(sel)
        ok = _seen_pairs(points, cams, C, vi, pi, dist[vi, pi], verts, faces)
        counts += np.bincount(pi[ok], minlength=P)
    return counts


def simulate_scan(verts: np.ndarray, faces: np.ndarray, regions: Dict[str, np.ndarray],
                  cameras: Cameras, rng: np.random.Generator, num_points: Optional[int] = None,
                  noise_mm: Optional[float] = None, outlier_rate: Optional[float] = None,
                  hole_rate: Optional[float] = None,
                  config: Optional[ScanConfig] = None) -> ScanResult:
    """Simulate an MVS scan of the mesh ``verts/faces`` seen by ``cameras``.

    Args:
        verts: ``(N, 3)`` posed true surface, world, mm. faces: ``(F, 3)`` int.
        regions: template regions (name -> vertex indices); ``scalp`` and the eyeballs are used
            when present.
        cameras: ``(V,)`` the rig (any image size; projection includes distortion).
        rng: all randomness (samples, holes, noise, outliers).
        num_points, noise_mm, outlier_rate, hole_rate: override the ``config`` fields.
    Returns:
        :class:`ScanResult` with exactly ``num_points`` points, unless fewer surface samples
        are visible (then a warning is logged); raises ``ValueError`` if none is visible.
    """
    cfg = config or ScanConfig()
    n_total = int(cfg.num_points if num_points is None else num_points)
    noise = float(cfg.noise_mm if noise_mm is None else noise_mm)
    o_rate = float(cfg.outlier_rate if outlier_rate is None else outlier_rate)
    h_rate = float(cfg.hole_rate if hole_rate is None else hole_rate)
    if n_total < 1 or not (0 <= o_rate < 1) or noise < 0:
        raise ValueError(f"simulate_scan: bad settings num_points={n_total} "
                         f"outlier_rate={o_rate} noise_mm={noise}")
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    N = len(verts)
    fn = _face_normals(verts, faces)
    n_out = int(round(o_rate * n_total))
    n_in = n_total - n_out

    # Holes: random patches (rate of the total area), hair patches (rate of the scalp area).
    probe, _, _ = sample_surface(verts, faces, 20000, rng)
    hole_c, hole_r = _grow_patches(probe, h_rate, cfg.hole_radius_mm, rng)
    scalp_faces = (face_region_mask(faces, regions["scalp"], N) if "scalp" in regions
                   else np.zeros(len(faces), bool))
    if scalp_faces.any() and cfg.scalp_hole_rate > 0:
        sprobe, _, _ = sample_surface(verts, faces, 8000, rng, face_weights=scalp_faces.astype(float))
        scalp_c, scalp_r = _grow_patches(sprobe, cfg.scalp_hole_rate, cfg.scalp_hole_radius_mm, rng)
    else:
        scalp_c, scalp_r = np.zeros((0, 3)), np.zeros(0)
    dropped_faces = np.zeros(len(faces), bool)
    if cfg.drop_eyeballs:
        for name in ("left_eyeball", "right_eyeball"):
            if name in regions:
                dropped_faces |= face_region_mask(faces, regions[name], N)
    dropped_faces |= fn[:, 1] < cfg.chin_normal_y

    kept_p, kept_f, kept_nv = [], [], []
    have, drawn = 0, 0
    stats = {"hole": 0.0, "scalp": 0.0, "fixed": 0.0, "unseen": 0.0}
    batch = max(int(1.4 * n_in), 1000)
    for _ in range(8):  # draw until enough samples survive (usually one or two rounds)
        p, f, _ = sample_surface(verts, faces, batch, rng)
        drawn += batch
        m_fixed = dropped_faces[f]
        m_hole = _in_balls(p, hole_c, hole_r)
        m_scalp = scalp_faces[f] & _in_balls(p, scalp_c, scalp_r)
        keep = ~(m_fixed | m_hole | m_scalp)
        stats["fixed"] += m_fixed.sum()
        stats["hole"] += m_hole.sum()
        stats["scalp"] += (m_scalp & ~m_hole).sum()
        p, f = p[keep], f[keep]
        nv = _visible_counts(p, fn[f], cameras, cfg.min_cos, verts, faces, cfg.min_views)
        vis = nv >= cfg.min_views
        stats["unseen"] += (~vis).sum()
        kept_p.append(p[vis])
        kept_f.append(f[vis])
        kept_nv.append(nv[vis])
        have += int(vis.sum())
        if have >= n_in:
            break
        rate = max(have / drawn, 0.02)  # survival rate so far
        batch = int(min(max(1.2 * (n_in - have) / rate, 1000), 4_000_000))
    clean = np.concatenate(kept_p)[:n_in]
    fidx = np.concatenate(kept_f)[:n_in]
    nviews = np.concatenate(kept_nv)[:n_in]
    if len(clean) == 0:
        raise ValueError("simulate_scan: no surface sample is seen by "
                         f">= {cfg.min_views} cameras (is the mesh inside the camera views?)")
    if len(clean) < n_in:
        logger.warning("simulate_scan: only %d of %d requested inliers are visible", len(clean), n_in)
        n_out = int(round(o_rate * len(clean) / (1 - o_rate)))
    stats = {k: float(v) / drawn for k, v in stats.items()}
    noisy = clean + rng.normal(0.0, noise, (len(clean), 1)) * fn[fidx]

    outliers = _outliers(n_out, cfg, verts, clean, fn[fidx], rng)
    pts = np.concatenate([noisy, outliers])
    is_out = np.r_[np.zeros(len(noisy), bool), np.ones(len(outliers), bool)]
    order = rng.permutation(len(pts))
    return ScanResult(
        points=pts[order], is_outlier=is_out[order],
        clean_points=np.concatenate([clean, outliers])[order],
        face_idx=np.r_[fidx, np.full(len(outliers), -1, np.int64)][order],
        num_views=np.r_[nviews, np.zeros(len(outliers), np.int64)][order],
        hole_centers=hole_c, hole_radii=hole_r, scalp_hole_centers=scalp_c,
        scalp_hole_radii=scalp_r, stats=stats)


def _outliers(n: int, cfg: ScanConfig, verts: np.ndarray, surf: np.ndarray, normals: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """``(n, 3)`` outliers: clusters 1-8 mm off the visible surface plus box-uniform points."""
    n_cl = int(round(cfg.outlier_cluster_fraction * n)) if len(surf) else 0
    n_box = n - n_cl
    lo = verts.min(0) - cfg.outlier_margin_mm
    hi = verts.max(0) + cfg.outlier_margin_mm
    box = rng.uniform(lo, hi, (n_box, 3))
    if n_cl == 0:
        return box
    k = max(1, n_cl // 25)  # ~25 points per cluster
    seeds = rng.integers(0, len(surf), k)
    which = rng.integers(0, k, n_cl)
    off = rng.uniform(1.0, 8.0, k)[which]
    cl = surf[seeds][which] + off[:, None] * normals[seeds][which] + rng.normal(0, 1.5, (n_cl, 3))
    return np.concatenate([cl, box])
