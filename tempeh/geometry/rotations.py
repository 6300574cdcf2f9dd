"""Rotation parameterisations: 6D (Gram-Schmidt), axis-angle, Euler angles, uniform sampling.

All functions are pure torch, accept any leading batch shape ``(...)`` and keep the dtype and
device of their inputs. Matrices act on column vectors: ``x' = R @ x``.

6D convention (as in the reference TEMPEH localizer): the 6 numbers are the first two ROWS of
``R``, ``x = (r00, r01, r02, r10, r11, r12)``. :func:`rot6d_to_matrix` orthonormalises them by
Gram-Schmidt: ``b1 = normalize(a1)``, ``b2 = normalize(a2 - <b1, a2> b1)``, ``b3 = b1 x b2``;
``b1, b2, b3`` are the rows of the result, so ``det R = +1``.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "rot6d_to_matrix",
    "matrix_to_rot6d",
    "random_rotations",
    "quaternion_to_matrix",
    "axis_angle_to_matrix",
    "euler_to_matrix",
]

_EPS = 1e-8


def _normalize(v: Tensor, eps: float = _EPS) -> Tensor:
    """``v / max(|v|, eps)`` along the last axis (NaN-free for a zero vector)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def rot6d_to_matrix(x: Tensor) -> Tensor:
    """6D representation -> rotation matrix by Gram-Schmidt (rows ``b1, b2, b3 = b1 x b2``).

    Args:
        x: ``(..., 6)``: the first two rows ``a1 = x[..., :3]``, ``a2 = x[..., 3:]`` of an
            (unnormalised) rotation matrix. ``a1`` and ``a2`` must not be parallel.
    Returns:
        ``(..., 3, 3)`` proper rotation matrices whose rows are ``b1, b2, b3``.
    """
    if x.shape[-1] != 6:
        raise ValueError(f"rot6d_to_matrix: expected last dimension 6, got shape {tuple(x.shape)}")
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = _normalize(a1)
    b2 = _normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def matrix_to_rot6d(R: Tensor) -> Tensor:
    """Rotation matrix -> 6D representation (its first two rows, flattened).

    Args:
        R: ``(..., 3, 3)`` rotation matrices.
    Returns:
        ``(..., 6)`` ``(r00, r01, r02, r10, r11, r12)``; ``rot6d_to_matrix`` inverts it exactly
        for proper rotations.
    """
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_rot6d: expected (..., 3, 3), got shape {tuple(R.shape)}")
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Unit quaternion ``(w, x, y, z)`` (scalar first) -> rotation matrix.

    Args:
        q: ``(..., 4)``; normalised internally (must be non-zero).
    Returns:
        ``(..., 3, 3)``.
    """
    if q.shape[-1] != 4:
        raise ValueError(f"quaternion_to_matrix: expected last dimension 4, got {tuple(q.shape)}")
    w, x, y, z = _normalize(q).unbind(-1)
    two = 2.0
    row0 = torch.stack([1 - two * (y * y + z * z), two * (x * y - z * w), two * (x * z + y * w)], -1)
    row1 = torch.stack([two * (x * y + z * w), 1 - two * (x * x + z * z), two * (y * z - x * w)], -1)
    row2 = torch.stack([two * (x * z - y * w), two * (y * z + x * w), 1 - two * (x * x + y * y)], -1)
    return torch.stack([row0, row1, row2], dim=-2)


def random_rotations(
    n: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    sigma_deg: Optional[float] = None,
) -> Tensor:
    """Random rotations: uniform (Haar measure) on SO(3), or small ones about random axes.

    Uniform (``sigma_deg`` None): a standard Gaussian 4-vector normalised to unit length is
    uniform on S^3, and the quaternion -> matrix map pushes that to the uniform distribution on
    SO(3). Small (``sigma_deg`` a number >= 0): ``exp([w]_x)`` with rotation vectors
    ``w ~ N(0, (sigma_deg in radians)^2 I)``.

    Args:
        n: number of rotations.
        generator: optional ``torch.Generator`` (on ``device``) for reproducibility.
        dtype, device: of the result. Sampling happens on the generator's device when one is given,
            in float64.
        sigma_deg: None (uniform) or the per-axis standard deviation of the rotation vector, deg.
    Returns:
        ``(n, 3, 3)``.
    """
    if n < 0:
        raise ValueError(f"random_rotations: n must be >= 0, got {n}")
    if sigma_deg is not None and not sigma_deg >= 0:
        raise ValueError(f"random_rotations: sigma_deg must be >= 0 or None, got {sigma_deg}")
    gen_device = generator.device if generator is not None else device
    if sigma_deg is not None:
        w = torch.randn(n, 3, generator=generator, dtype=torch.float64, device=gen_device)
        R = axis_angle_to_matrix(w * math.radians(sigma_deg))
        return R.to(dtype=dtype, device=device if device is not None else R.device)
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=gen_device)
    # A Gaussian 4-vector of norm < 1e-12 has probability ~0; resample-free guard anyway.
    q = torch.where(q.norm(dim=-1, keepdim=True) < 1e-12, torch.tensor([1.0, 0, 0, 0], dtype=q.dtype, device=q.device), q)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device if device is not None else q.device)


def axis_angle_to_matrix(aa: Tensor) -> Tensor:
    """Axis-angle (rotation vector) -> rotation matrix by Rodrigues' formula.

    ``R = I + A(theta) K + B(theta) K^2`` with ``K = [aa]_x`` (skew matrix of the unnormalised
    vector), ``A = sin(theta)/theta``, ``B = (1 - cos(theta))/theta^2``. Near ``theta = 0`` the
    Taylor series is used, so the value and gradient are exact and finite at zero.

    Args:
        aa: ``(..., 3)`` rotation vectors, radians (direction = axis, norm = angle).
    Returns:
        ``(..., 3, 3)``.
    """
    if aa.shape[-1] != 3:
        raise ValueError(f"axis_angle_to_matrix: expected last dimension 3, got {tuple(aa.shape)}")
    theta2 = (aa * aa).sum(-1)
    small = theta2 < 1e-6
    safe_t2 = torch.where(small, torch.ones_like(theta2), theta2)
    safe_t = safe_t2.sqrt()
    A = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(safe_t) / safe_t)
    B = torch.where(small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(safe_t)) / safe_t2)
    x, y, z = aa.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(K.shape)
    return eye + A[..., None, None] * K + B[..., None, None] * (K @ K)


def _axis_rotation(angle: Tensor, axis: int) -> Tensor:
    """Right-handed rotation by ``angle`` (radians) about world axis 0 (x), 1 (y) or 2 (z)."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == 0:
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == 1:
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def euler_to_matrix(yaw, pitch, roll) -> Tensor:
    """Head pose angles in the synthetic world frame (y up, subject faces +z, x to its left).

    ``R = R_y(yaw) @ R_x(pitch) @ R_z(roll)``: roll about the viewing axis z is applied first,
    then pitch about x, then yaw about the vertical y (i.e. intrinsic yaw-pitch-roll, as
    scipy's ``Rotation.from_euler("YXZ", [yaw, pitch, roll])``). All right-handed, radians:
    positive yaw turns the face (+z) towards +x, positive pitch turns it towards -y (down),
    positive roll turns +x towards +y.

    Args:
        yaw, pitch, roll: floats or tensors of broadcastable shapes ``(...)``, radians.
    Returns:
        ``(..., 3, 3)`` (dtype/device of the first tensor argument; float32 for plain floats).
    """
    ref = next((a for a in (yaw, pitch, roll) if isinstance(a, Tensor)), None)
    kw = dict(dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype(),
              device=ref.device if ref is not None else None)
    yaw, pitch, roll = torch.broadcast_tensors(*(torch.as_tensor(a, **kw) for a in (yaw, pitch, roll)))
    return _axis_rotation(yaw, 1) @ _axis_rotation(pitch, 0) @ _axis_rotation(roll, 2)
