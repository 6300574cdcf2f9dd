"""Grey-scale active-stereo-looking renders of a head mesh, through the lens distortion.

What an image shows (one per camera, uint8, ``(H, W)``):

* **Speckle attached to the skin.** A 3D solid value-noise texture (two octaves, ~``speckle_mm``
  cells, sharpened into blotches like a projected random-dot pattern) times a slowly varying
  albedo, evaluated at the hit point's *rest-pose* (template-space) position: the barycentric
  interpolation of ``rest_verts`` over the hit face. The pattern therefore moves and stretches
  with the skin, as paint would; it does not swim when the head moves.
* **Markings** (optional, ``vertex_albedo``, e.g. :func:`marking_albedo`): per-vertex
  reflectance factors for the regions a real head shows darker than skin (hair, eyes, lids, lips,
  nostrils), interpolated over the hit face; they carry the cues along the surface that a
  uniform speckle lacks.
* **Lambertian shading** with a point light near each camera (``light_offset_mm`` above it),
  plus an ambient term, using interpolated vertex normals of the posed mesh (two-sided).
* **Sensor noise** (Gaussian, ``noise_sigma`` grey levels) on a dark background.

Geometry is exact and distortion-aware: every pixel centre ``(u, v)`` is back-projected with
:meth:`Cameras.pixel_rays` (undistorting through the OpenCV model) and ray cast against the mesh
with Embree (all rays of all views in one call). The cameras are resized to the output
resolution FIRST (``Cameras.resize``, exact under the pixel-centre convention) and ray cast at the
low resolution: one ray per output pixel by default (``supersample=1``, aliasing of the speckle
is mild at the default sizes); ``supersample=s`` casts ``s x s`` rays per pixel (the cameras
resized to ``s`` times the output size) and box-averages them, which is the exact area average
under the same convention.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import trimesh

from tempeh.cameras import Cameras
from tempeh.geometry.mesh_ops import laplacian_smoothing_offsets

logger = logging.getLogger(__name__)

__all__ = ["RenderConfig", "render_views", "render_mask", "first_hits", "vertex_normals",
           "solid_noise", "skin_texture", "output_cameras", "MARKING_ALBEDO", "marking_albedo"]


@dataclass
class RenderConfig:
    """Look of the synthetic active-stereo images (grey levels are 0..255)."""

    downsample: int = 4
    """Output image = camera image size / downsample (1600x1200 -> 400x300 at 4)."""
    supersample: int = 1
    """Rays per output pixel along each axis; values > 1 box-average s x s sub-pixel rays."""
    speckle_mm: float = 2.0
    """Cell size of the finest speckle octave on the skin, mm (rest-pose space)."""
    speckle_contrast: float = 2.5
    """Sharpening of the speckle noise around its mean (1 = plain value noise)."""
    albedo: float = 200.0
    """Mean skin brightness under full light, grey levels."""
    albedo_variation: float = 0.15
    """Relative amplitude of the slow (25 mm) albedo variation."""
    ambient: float = 0.15
    """Ambient light fraction."""
    light_offset_mm: float = 150.0
    """Each view's point light sits this far above (world +y) its camera centre."""
    background: float = 8.0
    """Mean background grey level."""
    noise_sigma: float = 2.0
    """Std of the additive Gaussian sensor noise, grey levels (0 = noiseless)."""


# ----------------------------------------------------------------------------- ray casting
def first_hits(verts: np.ndarray, faces: np.ndarray, origins: np.ndarray,
               dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First intersection of rays with a triangle mesh (Embree), refined in float64.

    Args:
        verts: ``(N, 3)`` world, mm. faces: ``(F, 3)`` int.
        origins: ``(R, 3)`` world, mm. dirs: ``(R, 3)`` directions (any length > 0).
    Returns:
        face: ``(R,)`` int64 face index, -1 where the ray misses.
        dist: ``(R,)`` float64 distance along the unit direction, mm (inf on a miss).
        bary: ``(R, 3)`` float64 barycentric coordinates of the hit in its face (0 on a miss),
            recomputed in float64 (Embree works in float32) and clipped into the triangle.
    """
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    origins = np.asarray(origins, dtype=np.float64)
    dirs = np.asarray(dirs, dtype=np.float64)
    dirs = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    R = len(origins)
    face = np.full(R, -1, dtype=np.int64)
    dist = np.full(R, np.inf)
    bary = np.zeros((R, 3))
    if R == 0:
        return face, dist, bary
    if not trimesh.ray.has_embree:  # pragma: no cover - embreex is a dependency on x86_64
        raise RuntimeError("tempeh.synth.render needs Embree ray casting (pip install embreex)")
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    mesh = trimesh.Trimesh(verts, faces, process=False, validate=False)
    face = np.asarray(RayMeshIntersector(mesh).intersects_first(origins, dirs), dtype=np.int64)
    hit = np.nonzero(face >= 0)[0]
    tri = verts[faces[face[hit]]]  # (h, 3, 3)
    o, d = origins[hit], dirs[hit]
    # Moller-Trumbore in float64 on the face Embree reported.
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    pvec = np.cross(d, e2)
    det = np.einsum("ij,ij->i", e1, pvec)
    det = np.where(np.abs(det) < 1e-30, 1e-30, det)
    tvec = o - tri[:, 0]
    b1 = np.einsum("ij,ij->i", tvec, pvec) / det
    qvec = np.cross(tvec, e1)
    b2 = np.einsum("ij,ij->i", d, qvec) / det
    tt = np.einsum("ij,ij->i", e2, qvec) / det
    b = np.stack([1 - b1 - b2, b1, b2], -1)
    b = np.clip(b, 0, None)
    b /= b.sum(-1, keepdims=True)
    dist[hit] = tt
    bary[hit] = b
    return face, dist, bary


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals: ``(N, 3)`` (zero-area neighbourhoods give +z)."""
    tri = verts[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    vn = np.zeros_like(verts, dtype=np.float64)
    for k in range(3):  # three corners, vectorised over faces
        np.add.at(vn, faces[:, k], fn)
    n = np.linalg.norm(vn, axis=-1, keepdims=True)
    out = np.where(n > 0, vn / np.maximum(n, 1e-300), np.array([0.0, 0.0, 1.0]))
    return out


# ----------------------------------------------------------------------------- texture
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)


def _mix01(h: np.ndarray) -> np.ndarray:
    """Finalise uint64 hashes (murmur3 fmix64, in place) into floats in [0, 1)."""
    h ^= h >> np.uint64(33)
    h *= _M1
    h ^= h >> np.uint64(33)
    h *= _M2
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def solid_noise(points: np.ndarray, cell_mm: float, seed: int) -> np.ndarray:
    """3D value noise in [0, 1]: hashed lattice values, smoothstep-trilinear between them.

    Args:
        points: ``(P, 3)`` positions, mm (any frame; we use the rest pose).
        cell_mm: lattice spacing, mm. seed: selects an independent noise field.
    Returns:
        ``(P,)`` float64, continuous in the position, mean ~0.5.
    """
    q = np.asarray(points, dtype=np.float64) / cell_mm
    base = np.floor(q)
    f = q - base
    w1 = f * f * (3 - 2 * f)  # smoothstep weight of the upper corner, per axis (P, 3)
    w0 = 1 - w1
    i0 = base.astype(np.int64)
    # Hash each axis once per corner offset; corners combine them with XOR.
    mult = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F),
            np.uint64(0x165667B19E3779F9))
    hx = [[(i0[:, a] + o).astype(np.uint64) * mult[a] for o in (0, 1)] for a in range(3)]
    s0 = np.uint64((int(seed) * 0x27D4EB2F165667C5) & 0xFFFFFFFFFFFFFFFF)
    out = np.zeros(len(q))
    for corner in range(8):  # the 8 lattice corners of every point at once
        cx, cy, cz = (corner >> 2) & 1, (corner >> 1) & 1, corner & 1
        val = _mix01(hx[0][cx] ^ hx[1][cy] ^ hx[2][cz] ^ s0)
        wt = (w1[:, 0] if cx else w0[:, 0]) * (w1[:, 1] if cy else w0[:, 1]) \
            * (w1[:, 2] if cz else w0[:, 2])
        out += wt * val
    return out


def skin_texture(rest_points: np.ndarray, seed: int, cfg: Optional[RenderConfig] = None) -> np.ndarray:
    """Skin reflectance at rest-pose positions: ``(P, 3)`` mm -> ``(P,)`` in [0, ~1.2].

    Speckle (two octaves of :func:`solid_noise` at ``speckle_mm`` and twice that, sharpened by
    ``speckle_contrast``) times a slow 25 mm albedo variation.
    """
    cfg = cfg or RenderConfig()
    n = 0.65 * solid_noise(rest_points, cfg.speckle_mm, seed) \
        + 0.35 * solid_noise(rest_points, 2.0 * cfg.speckle_mm, seed + 1)
    speck = np.clip(0.5 + cfg.speckle_contrast * (n - 0.5), 0.1, 1.0)
    slow = 1 + cfg.albedo_variation * (2 * solid_noise(rest_points, 25.0, seed + 2) - 1)
    return speck * slow


#: Relative reflectance of the template regions that are darker than skin on a real head (hair on
#: the scalp, iris/pupil, lashes and lids, lips, nostrils), used by :func:`marking_albedo`. The
#: scalp's value is a default: the generator draws a hair tone per subject.
MARKING_ALBEDO = {"scalp": 0.4, "left_eyeball": 0.2, "right_eyeball": 0.2, "left_eye_region": 0.6,
                  "right_eye_region": 0.6, "lips": 0.5, "nostrils": 0.4}


def marking_albedo(num_verts: int, faces: np.ndarray, regions: dict, strength: float = 1.0,
                   hair: Optional[float] = None, smooth_iterations: int = 1) -> np.ndarray:
    """Per-vertex reflectance factors of the facial markings (hair, eyes, lips, nostrils).

    Real heads are not uniformly speckled: hair, eyes, lids, lips and nostrils are darker than
    the skin and are what a camera uses to tell where along the surface it looks. The factors
    (:data:`MARKING_ALBEDO`, the scalp's replaced by ``hair`` when given) are blended with 1 by
    ``strength`` (0: no markings, all ones; 1: the table's values), vertices in several regions
    take the darkest, then ``smooth_iterations`` rounds of uniform smoothing over the mesh graph
    (``a - L(a) / 2``, :func:`tempeh.geometry.mesh_ops.laplacian_smoothing_offsets`: each vertex
    becomes the mean of its own value and its one-ring's mean) soften the region borders. Regions
    missing from ``regions`` are skipped.

    Args:
        num_verts: ``N``. faces: ``(F, 3)`` int. regions: name -> vertex indices.
        strength: in [0, 1]. hair: the scalp's factor in (0, 1], or None for the table's.
    Returns:
        ``(N,)`` float64 in (0, 1], multiplied into the skin texture at the hit points
        (barycentric interpolation, :func:`render_views` ``vertex_albedo``).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"marking strength must be in [0, 1], got {strength}")
    if hair is not None and not 0.0 < float(hair) <= 1.0:
        raise ValueError(f"hair reflectance must be in (0, 1], got {hair}")
    table = dict(MARKING_ALBEDO)
    if hair is not None:
        table["scalp"] = float(hair)
    a = np.ones(int(num_verts))
    for name, value in table.items():
        if name in regions:
            ids = np.asarray(regions[name], dtype=np.int64)
            a[ids] = np.minimum(a[ids], 1.0 - float(strength) * (1.0 - value))
    faces = np.asarray(faces, dtype=np.int64)
    for _ in range(int(smooth_iterations)):  # a - L(a) / 2
        field = torch.from_numpy(a).view(1, -1, 1).expand(1, -1, 3)  # scalar as a (1, N, 3) field
        a = a - 0.5 * laplacian_smoothing_offsets(field, faces)[0, :, 0].numpy()  # isolated: kept
    return a


# ----------------------------------------------------------------------------- rendering
def output_cameras(cameras: Cameras, downsample: int = 4) -> Cameras:
    """Cameras of the rendered images: ``cameras`` resized by ``1 / downsample`` (exact)."""
    if int(downsample) < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    return cameras if int(downsample) == 1 else cameras.resize(1.0 / int(downsample))


_RAY_CACHE: "OrderedDict[bytes, tuple]" = OrderedDict()
_RAY_CACHE_SIZE = 2


def _camera_key(cameras: Cameras) -> bytes:
    c = cameras.numpy()
    return b"".join(np.ascontiguousarray(c[k]).tobytes()
                    for k in ("K", "R", "t", "dist", "width", "height"))


def _pixel_rays(cameras: Cameras) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """World rays through every pixel centre of every view (all views share one size).

    Undistorting every pixel is the costly part, and a rig is fixed over a capture, so the
    last few results are cached by camera content (read-only arrays).

    Returns origins ``(V*H*W, 3)``, dirs ``(V*H*W, 3)`` (float64, row-major per view), H, W.
    """
    key = _camera_key(cameras)
    if key in _RAY_CACHE:
        _RAY_CACHE.move_to_end(key)
        return _RAY_CACHE[key]
    out = _compute_pixel_rays(cameras)
    for a in out[:2]:
        a.setflags(write=False)
    _RAY_CACHE[key] = out
    while len(_RAY_CACHE) > _RAY_CACHE_SIZE:
        _RAY_CACHE.popitem(last=False)
    return out


def _compute_pixel_rays(cameras: Cameras) -> Tuple[np.ndarray, np.ndarray, int, int]:
    W, H = int(cameras.width[0]), int(cameras.height[0])
    if bool((cameras.width != W).any()) or bool((cameras.height != H).any()):
        raise ValueError("render: all views must have the same image size, got widths "
                         f"{cameras.width.tolist()} heights {cameras.height.tolist()}")
    cams = cameras.to(dtype=torch.float64)
    vv, uu = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing="ij")
    uv = torch.stack([uu, vv], -1).reshape(1, -1, 2).expand(len(cams), -1, -1)
    o, d = cams.pixel_rays(uv)  # (V,1,3), (V,P,3)
    o = o.expand_as(d)
    return (np.ascontiguousarray(o.reshape(-1, 3).numpy()),
            np.ascontiguousarray(d.reshape(-1, 3).numpy()), H, W)


def _candidate_rays(verts: np.ndarray, cameras: Cameras, H: int, W: int,
                    margin_px: float = 3.0) -> np.ndarray:
    """Flat indices into the ``(V*H*W)`` pixel rays that can hit the mesh: the pixels inside
    each view's bounding box of the projected (distorted) vertices, plus a margin. Falls back
    to every pixel of a view where some vertex is behind (or nearly at) the camera."""
    uv, depth = cameras.project(torch.from_numpy(verts).to(cameras.dtype))  # (V, N, 2), (V, N)
    uv, depth = uv.double().numpy(), depth.double().numpy()
    lo = uv.min(1) - margin_px  # (V, 2)
    hi = uv.max(1) + margin_px
    behind = (depth <= 1e-6).any(1)
    lo[behind] = -np.inf
    hi[behind] = np.inf
    u = np.arange(W)
    v = np.arange(H)
    mu = (u[None] >= lo[:, :1]) & (u[None] <= hi[:, :1])  # (V, W)
    mv = (v[None] >= lo[:, 1:]) & (v[None] <= hi[:, 1:])  # (V, H)
    return np.flatnonzero(mv[:, :, None] & mu[:, None, :])


def _cast(verts, faces, cameras: Cameras):
    """Cast the pixel-centre rays of ``cameras`` (culled to the mesh's projected bounding
    boxes). Returns (flat ray index of each hit, face, dist, bary, origins, dirs, H, W)."""
    origins, dirs, H, W = _pixel_rays(cameras)
    cand = _candidate_rays(verts, cameras, H, W)
    face, dist, bary = first_hits(verts, faces, origins[cand], dirs[cand])
    ok = face >= 0
    return cand[ok], face[ok], dist[ok], bary[ok], origins, dirs, H, W


def _check_mesh(verts, faces, name="verts"):
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3), got {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.size == 0:
        raise ValueError(f"faces must be (F, 3), got {faces.shape}")
    if faces.min() < 0 or faces.max() >= len(verts):
        raise ValueError(f"faces index outside [0, {len(verts)})")
    if not np.all(np.isfinite(verts)):
        raise ValueError(f"{name} contain NaN or inf")
    return verts, faces


def render_views(verts: np.ndarray, faces: np.ndarray, cameras: Cameras, rest_verts: np.ndarray,
                 rng: np.random.Generator, texture_seed: int = 0,
                 config: Optional[RenderConfig] = None, downsample: Optional[int] = None,
                 vertex_albedo: Optional[np.ndarray] = None) -> np.ndarray:
    """Render grey-scale speckle images of a posed mesh in every view.

    Args:
        verts: ``(N, 3)`` posed vertices, world, mm.
        faces: ``(F, 3)`` int triangles (counter-clockwise seen from outside).
        cameras: ``(V,)`` cameras at their native image size (all views the same size).
        rest_verts: ``(N, 3)`` rest-pose (template-space) vertices, mm: the texture coordinates.
        rng: draws the sensor noise only (the texture is fixed by ``texture_seed``).
        texture_seed: selects the skin texture; keep it fixed per subject across frames.
        config: look of the images; ``downsample`` overrides ``config.downsample``.
        vertex_albedo: optional ``(N,)`` reflectance factors (e.g. :func:`marking_albedo`),
            interpolated barycentrically over the hit faces and multiplied into the skin texture.
    Returns:
        ``(V, H', W')`` uint8 with ``H' = round(H / downsample)`` etc.; the matching cameras are
        :func:`output_cameras` ``(cameras, downsample)``.
    """
    cfg = config or RenderConfig()
    ds = int(cfg.downsample if downsample is None else downsample)
    ss = int(cfg.supersample)
    if ss < 1:
        raise ValueError(f"supersample must be >= 1, got {ss}")
    verts, faces = _check_mesh(verts, faces)
    rest = np.asarray(rest_verts, dtype=np.float64)
    if rest.shape != verts.shape:
        raise ValueError(f"rest_verts shape {rest.shape} differs from verts shape {verts.shape}")
    out_cams = output_cameras(cameras, ds)
    ray_cams = out_cams if ss == 1 else out_cams.resize(float(ss))
    V = len(cameras)
    hit, face, dist, bary, origins, dirs, H, W = _cast(verts, faces, ray_cams)
    f_hit = faces[face]  # (h, 3)
    b = bary[:, :, None]
    rest_p = (rest[f_hit] * b).sum(1)
    normals = vertex_normals(verts, faces)
    n = (normals[f_hit] * b).sum(1)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    d_hit = dirs[hit]
    p = origins[hit] + dist[:, None] * d_hit
    lights = out_cams.centers().double().numpy() + np.array([0.0, cfg.light_offset_mm, 0.0])
    view = hit // (H * W)
    ldir = lights[view] - p
    ldir /= np.linalg.norm(ldir, axis=-1, keepdims=True)
    # Two-sided: a ray always sees the side facing it, so orient n towards the viewer.
    n = np.where((np.einsum("ij,ij->i", n, d_hit) > 0)[:, None], -n, n)
    lam = np.clip(np.einsum("ij,ij->i", n, ldir), 0.0, None)
    shade = cfg.ambient + (1 - cfg.ambient) * lam
    img = np.full(V * H * W, cfg.background, dtype=np.float64)
    refl = skin_texture(rest_p, texture_seed, cfg)
    if vertex_albedo is not None:
        va = np.asarray(vertex_albedo, dtype=np.float64)
        if va.shape != (len(verts),):
            raise ValueError(f"vertex_albedo must be ({len(verts)},), got {va.shape}")
        refl = refl * (va[f_hit] * bary).sum(1)
    img[hit] = cfg.albedo * shade * refl
    img = img.reshape(V, H, W)
    if ss > 1:
        img = img.reshape(V, H // ss, ss, W // ss, ss).mean(axis=(2, 4))
    if cfg.noise_sigma > 0:
        img = img + rng.normal(0.0, cfg.noise_sigma, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_mask(verts: np.ndarray, faces: np.ndarray, cameras: Cameras,
                downsample: int = 4) -> np.ndarray:
    """``(V, H', W')`` bool: pixel centre rays (through the distortion) that hit the mesh.

    ``cameras`` are resized by ``1 / downsample`` first, exactly like :func:`render_views` (same
    default, so the mask matches its images pixel for pixel; pass 1 for cameras that are
    already at the wanted resolution).
    """
    verts, faces = _check_mesh(verts, faces)
    hit, _, _, _, _, _, H, W = _cast(verts, faces, output_cameras(cameras, downsample))
    mask = np.zeros(len(cameras) * H * W, dtype=bool)
    mask[hit] = True
    return mask.reshape(len(cameras), H, W)
