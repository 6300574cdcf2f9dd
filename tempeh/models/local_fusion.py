"""Per-vertex local sampling grids and surface-aware multi-view feature fusion (refinement stage).

TEMPEH paper section 3.2, eqs. 1-3. For every coarse vertex ``v`` a small cube of ``side^3``
points with ``spacing`` mm between neighbours is centred on ``v``; every point is projected into
every view, the view features are sampled there, and the views are fused into a weighted mean and
a weighted (biased) variance with the weights

    eta_i = Softplus_beta(delta_i * max(cos theta_i, 0)) * inside_i                     (eq. 3)

* ``delta_i`` in {0, 1}: TRUE visibility of the coarse vertex from camera i (occluded -> 0; the
  reference implementation maps occluded vertices to 0.5 through ``Sigmoid(100 vis)``: we do not).
* ``cos theta_i = <n, d_i>``: cosine between the (unit, outward) vertex normal ``n`` and the unit
  direction ``d_i = (o_i - p) / |o_i - p|`` from the grid point ``p`` TO the camera centre
  ``o_i``. Positive means the surface faces the camera; negative (back-facing) is clamped to 0.
* ``inside_i`` in {0, 1}: the point projects inside view i's image and lies in front of it
  (``valid`` from :func:`tempeh.models.volume.sample_views`). A view where the point leaves the
  image gets weight EXACTLY 0 (the reference gives it the Softplus floor).

Softplus floor: ``Softplus_beta(0) = ln(2) / beta`` (0.01386 for beta = 50). An occluded or
grazing (``cos <= 0``) view whose projection is inside the image therefore keeps this small
weight, as in the paper ("non-zero gradients w.r.t. features of all views"). A visible view
with ``cos theta = c > 0`` gets ``Softplus_beta(c) = c + ln(1 + exp(-beta c)) / beta >= c``.
The weights are normalised over views inside
:func:`tempeh.models.volume.weighted_mean_var`, so after normalisation a floor-weighted view
carries at most ``floor / (floor + sum of the other weights)`` of the fused feature.

Local grid layout (shared by :func:`local_grid_offsets`, :func:`local_grids`, :func:`fuse_local`
and the refinement soft-argmax) is the volume convention of :mod:`tempeh.models.volume`: row
``g = (i * side + j) * side + k`` of the ``(side^3, 3)`` offsets holds
``((i, j, k) - (side - 1) / 2) * spacing`` mm along the (x, y, z) axes of the local frame, so a
per-point tensor reshaped to ``(..., side, side, side)`` has volume axes ``(D, H, W)`` =
``(x, y, z)``. The offsets are SYMMETRIC about the vertex (the reference uses
``arange(-D/2, D/2)``, half a cell off), so a uniform probability over the grid gives a zero
offset. With a rotation ``R`` per vertex the local frame's axes are the columns of ``R``:
``point = v + R @ offset``.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras
from .volume import grid_offsets, sample_views, weighted_mean_var

logger = logging.getLogger(__name__)

__all__ = [
    "FUSION_MODES",
    "local_grid_offsets",
    "local_grids",
    "fusion_weights",
    "softplus_floor",
    "fuse_local",
]

#: ``"visibility_normal"``: eq. 3 weights (default); ``"naive"``: unweighted mean/variance over
#: the views in which the point is inside the image (ToFu-style, for the ablation).
FUSION_MODES = ("visibility_normal", "naive")


def softplus_floor(beta: float = 50.0) -> float:
    """``Softplus_beta(0) = ln(2) / beta``: the weight of an in-image occluded/grazing view."""
    return math.log(2.0) / beta


def local_grid_offsets(side: int = 8, spacing: float = 2.0, dtype: torch.dtype = torch.float32,
                       device=None) -> Tensor:
    """Offsets of a symmetric local cube about its centre.

    Args:
        side: points per axis (``d_r``; 8 in the paper).
        spacing: distance between neighbouring points, mm (2.0 in the paper).
    Returns:
        ``(side^3, 3)`` local frame, mm; row ``g = (i * side + j) * side + k`` holds
        ``((i, j, k) - (side - 1) / 2) * spacing`` (x along i, see the module docstring): the
        flattened :func:`tempeh.models.volume.grid_offsets`. The rows sum to zero.
    """
    if not spacing > 0:
        raise ValueError(f"local_grid_offsets: spacing must be > 0 mm, got {spacing}")
    return grid_offsets(side, spacing, dtype=torch.float64, device=device).reshape(-1, 3).to(dtype)


def local_grids(verts: Tensor, side: int = 8, spacing: float = 2.0,
                rotations: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One local cube per vertex.

    Args:
        verts: ``(B, N, 3)`` world, mm (cube centres: the coarse vertices).
        side, spacing: see :func:`local_grid_offsets`.
        rotations: optional ``(B, N, 3, 3)`` per-vertex rotations (training augmentation, e.g.
            from :func:`tempeh.geometry.rotations.random_rotations` with a generator); ``None``
            gives axis-aligned cubes.
    Returns:
        points: ``(B, N, G, 3)`` world, mm, with ``G = side^3``: ``verts + offsets``.
        offsets: ``(B, N, G, 3)`` world-frame displacements from the vertex, mm
            (``R @ d0`` per vertex; the base offsets broadcast when ``rotations`` is None).
    """
    if verts.ndim != 3 or verts.shape[-1] != 3:
        raise ValueError(f"local_grids: verts must be (B, N, 3), got {tuple(verts.shape)}")
    B, N, _ = verts.shape
    d0 = local_grid_offsets(side, spacing, dtype=verts.dtype, device=verts.device)  # (G, 3)
    G = d0.shape[0]
    if rotations is None:
        offsets = d0.expand(B, N, G, 3)
    else:
        if tuple(rotations.shape) != (B, N, 3, 3):
            raise ValueError(f"local_grids: rotations must be {(B, N, 3, 3)}, got {tuple(rotations.shape)}")
        offsets = torch.einsum("bnij,gj->bngi", rotations.to(verts.dtype), d0)
    return verts.unsqueeze(2) + offsets, offsets


def _check_mode(mode: str) -> None:
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {FUSION_MODES}")


def fusion_weights(points: Tensor, normals: Tensor, vis: Tensor, cameras: Cameras, valid: Tensor,
                   beta: float = 50.0, mode: str = "visibility_normal") -> Tensor:
    """Per-view fusion weights ``eta`` of eq. 3 (unnormalised; see the module docstring).

    Args:
        points: ``(B, N, G, 3)`` world, mm: local grid points of N vertices.
        normals: ``(B, N, 3)`` unit outward vertex normals (world), shared by a vertex's points.
        vis: ``(B, V, N)`` bool: vertex visible from view (``delta``); ignored by ``"naive"``.
        cameras: ``(B, V)`` cameras.
        valid: ``(B, V, N*G)`` or ``(B, V, N, G)`` bool: point projects inside the image and
            lies in front of the camera.
        beta: Softplus sharpness (50 in the paper); floor ``ln(2) / beta``.
        mode: ``"visibility_normal"`` (eq. 3) or ``"naive"`` (``eta = valid``).
    Returns:
        ``(B, V, N, G)`` weights ``>= 0`` in the dtype of ``points``; exactly 0 where not valid.
    """
    _check_mode(mode)
    if points.ndim != 4 or points.shape[-1] != 3:
        raise ValueError(f"fusion_weights: points must be (B, N, G, 3), got {tuple(points.shape)}")
    B, N, G, _ = points.shape
    V = cameras.batch_shape[-1]
    if cameras.batch_shape != (B, V):
        raise ValueError(f"fusion_weights: cameras must have batch shape (B, V) = ({B}, V), "
                         f"got {cameras.batch_shape}")
    if valid.shape == (B, V, N * G):
        valid = valid.view(B, V, N, G)
    elif tuple(valid.shape) != (B, V, N, G):
        raise ValueError(f"fusion_weights: valid must be {(B, V, N * G)} or {(B, V, N, G)}, "
                         f"got {tuple(valid.shape)}")
    inside = valid.to(points.dtype)
    if mode == "naive":
        return inside
    if tuple(vis.shape) != (B, V, N):
        raise ValueError(f"fusion_weights: vis must be {(B, V, N)}, got {tuple(vis.shape)}")
    if tuple(normals.shape) != (B, N, 3):
        raise ValueError(f"fusion_weights: normals must be {(B, N, 3)}, got {tuple(normals.shape)}")
    # cos = <n, o - p> / |o - p| without a (B, V, N, G, 3) tensor:
    #   <n, o - p> = <n, o> - <n, p>;  |o - p|^2 = |o|^2 - 2 <o, p> + |p|^2.
    o = cameras.centers().to(points.dtype)  # (B, V, 3)
    p = points.reshape(B, N * G, 3)
    n_dot_o = torch.einsum("bnk,bvk->bvn", normals, o).unsqueeze(-1)  # (B, V, N, 1)
    n_dot_p = (points * normals.unsqueeze(2)).sum(-1).unsqueeze(1)  # (B, 1, N, G)
    o_dot_p = torch.bmm(o, p.transpose(1, 2)).view(B, V, N, G)
    dist2 = (o * o).sum(-1)[..., None, None] - 2 * o_dot_p + (points * points).sum(-1).unsqueeze(1)
    cos = (n_dot_o - n_dot_p) / dist2.clamp_min(1e-12).sqrt()
    delta = vis.to(points.dtype).unsqueeze(-1)  # (B, V, N, 1)
    eta = F.softplus(delta * cos.clamp_min(0.0), beta=beta)
    return eta * inside


def fuse_local(feats: Tensor, cameras: Cameras, verts: Tensor, normals: Optional[Tensor],
               vis: Optional[Tensor], side: int = 8, spacing: float = 2.0,
               rotations: Optional[Tensor] = None, mode: str = "visibility_normal",
               beta: float = 50.0, chunk_size: int = 512) -> Tensor:
    """Fused local feature cubes (weighted mean and variance over views) for every vertex.

    Vertices are processed in chunks of ``chunk_size`` so that the per-view sample tensor is
    at most ``(B, V, chunk_size * side^3, C)``; the result is identical for any chunk size.

    Args:
        feats: ``(B, V, C, h, w)`` per-view feature maps (pixel grid of the cameras' images).
        cameras: ``(B, V)`` cameras of the images the features were computed from.
        verts: ``(B, N, 3)`` world, mm: cube centres (coarse vertices).
        normals: ``(B, N, 3)`` unit vertex normals (unused, may be None, for ``"naive"``).
        vis: ``(B, V, N)`` bool vertex visibility (unused, may be None, for ``"naive"``).
        side, spacing: local grid, see :func:`local_grid_offsets`.
        rotations: optional ``(B, N, 3, 3)`` per-vertex grid rotations.
        mode: ``"visibility_normal"`` or ``"naive"``, see :func:`fusion_weights`.
        beta: Softplus sharpness.
        chunk_size: vertices per chunk (> 0).
    Returns:
        ``(B * N, 2C, side, side, side)``: channels ``[mean (C), variance (C)]``; row
        ``b * N + n``; volume axes ``(x, y, z)`` of the local frame (module docstring). Points
        outside every image get zero weights everywhere (handled by ``weighted_mean_var``).
        Runs with autocast disabled, in float32 for half-precision inputs (see the code).
    """
    _check_mode(mode)
    if chunk_size < 1:
        raise ValueError(f"fuse_local: chunk_size must be >= 1, got {chunk_size}")
    if feats.ndim != 5:
        raise ValueError(f"fuse_local: feats must be (B, V, C, h, w), got {tuple(feats.shape)}")
    B, V, C = feats.shape[:3]
    if verts.ndim != 3 or verts.shape[0] != B or verts.shape[-1] != 3:
        raise ValueError(f"fuse_local: verts must be ({B}, N, 3), got {tuple(verts.shape)}")
    N = verts.shape[1]
    G = side ** 3
    # Projection of points ~1 m from the cameras needs float32 at least: under autocast
    # (float16/bfloat16) the matmuls would lose millimetres, so the sampling and the weights
    # always run in (at least) float32, whatever the caller's autocast state.
    with torch.autocast(device_type=feats.device.type, enabled=False):
        feats, verts = _at_least_float32(feats), _at_least_float32(verts)
        normals = _at_least_float32(normals) if normals is not None else None
        rotations = _at_least_float32(rotations) if rotations is not None else None
        return _fuse_chunks(feats, cameras, verts, normals, vis, side, spacing, rotations, mode, beta,
                            chunk_size, B, V, C, N, G)


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _fuse_chunks(feats, cameras, verts, normals, vis, side, spacing, rotations, mode, beta,
                 chunk_size, B, V, C, N, G) -> Tensor:
    """The vertex-chunk loop of :func:`fuse_local` (same arguments, validated)."""
    out = []
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        n = e - s
        rot = rotations[:, s:e] if rotations is not None else None
        points, _ = local_grids(verts[:, s:e], side, spacing, rot)  # (B, n, G, 3)
        sampled, valid = sample_views(feats, cameras, points.reshape(B, n * G, 3))
        w = fusion_weights(
            points, normals[:, s:e] if normals is not None else None,
            vis[:, :, s:e] if vis is not None else None, cameras, valid, beta=beta, mode=mode)
        mean, var = weighted_mean_var(sampled, w.reshape(B, V, n * G), unbiased=False)
        fused = torch.cat([mean, var], dim=-1).view(B, n, G, 2 * C)
        out.append(fused.permute(0, 1, 3, 2))  # (B, n, 2C, G)
    cubes = out[0] if len(out) == 1 else torch.cat(out, dim=1)
    return cubes.reshape(B * N, 2 * C, side, side, side)
