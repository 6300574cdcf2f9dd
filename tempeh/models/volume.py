"""Sampling grids, multi-view feature sampling and view fusion (pure functions).

Volume convention (coarse cube and refinement cubes alike)
-----------------------------------------------------------
A grid of side ``D`` is stored as world points ``grid: (B, D, D, D, 3)`` in mm, and a feature
volume over it as ``(B, C, D, D, D)``; both use the SAME index order ``(i, j, k)`` = the
``(D, H, W)`` axes of a ``Conv3d`` volume. With ``meshgrid(indexing="ij")``:

* axis ``i`` (the ``D`` axis, first spatial) runs along the grid's local **x**,
* axis ``j`` (``H``) along local **y**,
* axis ``k`` (``W``) along local **z**;

so ``grid[..., 0]`` (x) varies along the first spatial axis, as in the reference.

World <-> grid mapping (``c = (D - 1) / 2``, ``s`` = voxel size / spacing in mm, ``R`` the grid
rotation, ``o`` the centre)::

    offset(i, j, k) = s * (i - c, j - c, k - c)             # local frame, mm
    world(i, j, k)  = o + R @ offset(i, j, k)
    (i, j, k)       = R^T (world - o) / s + c               # inverse (continuous)

The grid is SYMMETRIC about its centre: for ``D = 32, s = 25`` the offsets run from -387.5 to
+387.5 mm (the reference uses ``arange(-D//2, D//2) * s``, half a cell off centre). Voxel
``(i, j, k)`` is the point itself: there are no "voxel corners" anywhere in tempeh.

A flattened point index ``p = (i * D + j) * D + k`` matches ``grid.reshape(B, D**3, 3)`` and
``volume.reshape(B, C, D**3)``.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tempeh.cameras import Cameras, pixels_to_grid

logger = logging.getLogger(__name__)

__all__ = [
    "grid_offsets",
    "make_grid",
    "sample_views",
    "weighted_mean_var",
    "fuse_mean_var",
    "FUSION_MODES",
]

FUSION_MODES = ("masked", "paper")


def grid_offsets(side: int, spacing: float, dtype: torch.dtype = torch.float32,
                 device=None) -> Tensor:
    """Symmetric local offsets of a cubic grid.

    Args:
        side: ``D`` points per axis (>= 1).
        spacing: voxel size in mm.
    Returns:
        ``(D, D, D, 3)`` local-frame offsets in mm, ``offsets[i, j, k] = spacing * (i - c, j - c,
        k - c)`` with ``c = (D - 1) / 2`` (axis ``i`` is x, see the module docstring).
    """
    if int(side) < 1:
        raise ValueError(f"grid side must be >= 1, got {side}")
    side = int(side)
    r = (torch.arange(side, dtype=dtype, device=device) - (side - 1) / 2.0) * float(spacing)
    gx, gy, gz = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([gx, gy, gz], dim=-1)


def make_grid(side: int, spacing: float, center: Tensor, rotation: Optional[Tensor] = None) -> Tensor:
    """World points of a (possibly rotated) cubic grid, symmetric about ``center``.

    Args:
        side: ``D`` points per axis.
        spacing: voxel size, mm.
        center: ``(B, 3)`` world, mm.
        rotation: ``(B, 3, 3)`` local->world rotation of the offsets, or None (identity).
    Returns:
        ``(B, D, D, D, 3)`` world, mm: ``center + rotation @ offset(i, j, k)``.
    """
    if center.dim() != 2 or center.shape[-1] != 3:
        raise ValueError(f"make_grid: center must be (B, 3), got {tuple(center.shape)}")
    off = grid_offsets(side, spacing, dtype=center.dtype, device=center.device)  # (D,D,D,3)
    B = center.shape[0]
    if rotation is None:
        pts = off.unsqueeze(0).expand(B, -1, -1, -1, -1)
    else:
        if tuple(rotation.shape) != (B, 3, 3):
            raise ValueError(f"make_grid: rotation must be ({B}, 3, 3), got {tuple(rotation.shape)}")
        # row-vector form: offset @ R^T == (R @ offset^T)^T
        pts = torch.einsum("dhwk,bjk->bdhwj", off, rotation.to(center.dtype))
    return pts + center.view(B, 1, 1, 1, 3)


def sample_views(feats: Tensor, cameras: Cameras, points: Tensor) -> Tuple[Tensor, Tensor]:
    """Bilinearly sample every view's feature map at the projections of world points.

    All ``B * V`` views are sampled in one ``grid_sample`` call. Projection includes the lens
    distortion; pixels map to ``grid_sample`` coordinates only via
    :func:`tempeh.cameras.pixels_to_grid` (``align_corners=False``, zero padding).

    Args:
        feats: ``(B, V, C, h, w)`` feature maps.
        cameras: :class:`Cameras` of batch shape ``(B, V)`` whose ``width``/``height`` equal
            ``w``/``h`` (i.e. cameras already resized to the feature-map resolution).
        points: ``(B, P, 3)`` world, mm.
    Returns:
        sampled: ``(B, V, P, C)``; exactly 0 where ``valid`` is False.
        valid: ``(B, V, P)`` bool: the point is in front of the camera (depth > 0) and projects
            inside the image ``[-0.5, w - 0.5) x [-0.5, h - 0.5)``.
    """
    if feats.dim() != 5:
        raise ValueError(f"sample_views: feats must be (B, V, C, h, w), got {tuple(feats.shape)}")
    B, V, C, h, w = feats.shape
    if cameras.batch_shape != (B, V):
        raise ValueError(f"sample_views: cameras have batch shape {cameras.batch_shape}, "
                         f"feature maps are ({B}, {V})")
    if points.dim() != 3 or points.shape[0] != B or points.shape[-1] != 3:
        raise ValueError(f"sample_views: points must be ({B}, P, 3), got {tuple(points.shape)}")
    if not (bool((cameras.width == w).all()) and bool((cameras.height == h).all())):
        raise ValueError(
            f"sample_views: camera image sizes {cameras.width.unique().tolist()}x"
            f"{cameras.height.unique().tolist()} differ from the feature maps {w}x{h}; "
            "resize the cameras to the feature-map resolution first (Cameras.resize)")
    P = points.shape[1]
    # Points ~1 m from the cameras need at least float32 to project to sub-pixel accuracy, so
    # projection and sampling run outside autocast (fp16 would cost ~0.5 px at 400 px).
    dtype = torch.promote_types(points.dtype, torch.float32)
    with torch.autocast(device_type=feats.device.type, enabled=False):
        cams = cameras.to(dtype=dtype)
        uv, depth = cams.project(points.to(dtype).unsqueeze(1))  # (B,V,P,2), (B,V,P)
        valid = cams.in_image(uv, depth)
        g = pixels_to_grid(uv, w, h)
        # Points behind the camera project to meaningless (possibly huge) coordinates: send
        # every invalid point far outside [-1, 1] so grid_sample returns exact zeros for it.
        g = torch.where(valid.unsqueeze(-1), g, torch.full_like(g, -4.0))
        fdtype = torch.promote_types(feats.dtype, torch.float32)
        out = F.grid_sample(feats.reshape(B * V, C, h, w).to(fdtype),
                            g.reshape(B * V, 1, P, 2).to(fdtype),
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = out.reshape(B, V, C, P).permute(0, 1, 3, 2)
    return sampled, valid


def weighted_mean_var(sampled: Tensor, weights: Tensor, unbiased: bool = False,
                      eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """Weighted mean and variance over views.

    The weights are normalised over views per point, ``w_v' = w_v / sum_v w_v``, so views with
    zero weight are excluded. ``mean = sum_v w_v' f_v`` and the biased ``var = sum_v w_v'
    (f_v - mean)^2`` (computed around the mean, never negative). With ``unbiased=True`` the
    variance is divided by ``1 - sum_v w_v'^2`` (reliability weights), which for equal weights is
    the usual ``V / (V - 1)`` correction; points with a single contributing view then get var 0.
    Points whose weights sum to ``<= eps`` get mean 0 and var 0.

    Args:
        sampled: ``(B, V, P, C)`` per-view features.
        weights: ``(B, V, P)`` non-negative weights (bool is accepted).
    Returns:
        mean: ``(B, P, C)``; var: ``(B, P, C)``.
    """
    if weights.shape != sampled.shape[:3]:
        raise ValueError(f"weighted_mean_var: weights {tuple(weights.shape)} do not match "
                         f"sampled {tuple(sampled.shape)}")
    w = weights.to(sampled.dtype)
    total = w.sum(dim=1, keepdim=True)  # (B,1,P)
    has = total > eps
    wn = torch.where(has, w / torch.where(has, total, torch.ones_like(total)), torch.zeros_like(w))
    wn = wn.unsqueeze(-1)  # (B,V,P,1)
    mean = (wn * sampled).sum(dim=1)  # (B,P,C)
    var = (wn * (sampled - mean.unsqueeze(1)).square()).sum(dim=1)
    if unbiased:
        denom = 1.0 - wn.square().sum(dim=1)  # (B,P,1)
        ok = denom > 1e-6
        var = torch.where(ok, var / torch.where(ok, denom, torch.ones_like(denom)),
                          torch.zeros_like(var))
    return mean, var


def fuse_mean_var(sampled: Tensor, valid: Tensor, mode: str = "masked") -> Tensor:
    """Coarse-stage view fusion: per-point mean and variance over views, concatenated.

    Modes:
        ``"masked"`` (default): only the views that see the point (``valid``) contribute; biased
            variance. A point seen by no view gets zeros.
        ``"paper"``: like the reference code (ablation): every view contributes, views where the
            point is outside the image contribute zeros (``sampled`` is 0 there), and the
            variance is the UNBIASED one (divided by ``V - 1``).

    Args:
        sampled: ``(B, V, P, C)`` from :func:`sample_views`.
        valid: ``(B, V, P)`` bool.
    Returns:
        ``(B, 2C, P)``: channels ``[mean (C), var (C)]``. Reshape to ``(B, 2C, D, D, D)`` for a
        grid's points in flattened ``(i, j, k)`` order.
    """
    if mode == "masked":
        mean, var = weighted_mean_var(sampled, valid, unbiased=False)
    elif mode == "paper":
        ones = torch.ones(sampled.shape[:3], dtype=sampled.dtype, device=sampled.device)
        mean, var = weighted_mean_var(sampled, ones, unbiased=True)
    else:
        raise ValueError(f"fuse_mean_var: unknown mode {mode!r}; expected one of {FUSION_MODES}")
    return torch.cat([mean, var], dim=-1).transpose(1, 2)
