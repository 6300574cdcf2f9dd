"""Synthetic multi-view camera rigs (OpenCV cameras, world mm) for the synthetic studio.

World frame (FLAME-like): y up, the subject faces +z, x towards the subject's left, head centre
near the origin. Cameras sit about 1 m from the capture-volume centre on the front and sides
(azimuth measured about the y axis from +z, positive towards +x) and look at that centre.

``kind="paper"`` imitates the 3dMD-style rig used for FaMoS/TEMPEH: 8 pods of 2 grey-scale
stereo cameras (``A`` above ``B``, ~120 mm vertical baseline, converging on the centre), pods
spread over azimuth -80..+80 deg with alternating elevation, 1600x1200 pixels, a 16 mm-class
lens (fx ~ 2000 px: at 1 m the image covers about +-400 x +-300 mm, so a 230 mm head spans about
460 px of the 1200 rows and stays fully in every view when moved 100 mm along any axis; at the
corners of the +-100 mm cube a few views clip part of it, as real rigs do), principal point near
the image centre and a mild barrel distortion (k1 ~ -0.1, k2 ~ 0.1, small tangential terms).
Camera names follow FaMoS: ``23_A, 23_B, 24_A, ... 30_B``.

``kind="random"`` draws the count (when ``num_views`` is None), the layout and the intrinsics
from the seed, for cross-rig tests.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tempeh.cameras import Cameras, look_at_rotation

logger = logging.getLogger(__name__)

__all__ = ["RigConfig", "make_rig", "pod_camera_names"]

RIG_KINDS = ("paper", "random")


@dataclass
class RigConfig:
    """Layout of a ``kind="paper"`` rig (all angles in degrees, lengths in mm)."""

    target_mm: tuple = (0.0, -30.0, -10.0)
    """Capture-volume centre every camera looks at, world mm."""
    azimuth_max_deg: float = 80.0
    """Pods are spread evenly over [-a, +a] (a shrinks for 2-3 pods so they stay frontal)."""
    elevation_high_deg: float = 14.0
    """Elevation of even-numbered pods (odd pods use ``elevation_low_deg``)."""
    elevation_low_deg: float = -8.0
    baseline_mm: float = 120.0
    """Distance between the A and B camera of a pod (vertical, A above B)."""
    focal_px: float = 2000.0
    """Nominal focal length at the nominal image size 1600x1200 (scaled with the width)."""
    dist: tuple = (-0.1, 0.1, 2e-4, -1.5e-4, 0.0)
    """Nominal OpenCV distortion (k1, k2, p1, p2, k3)."""
    jitter: float = 1.0
    """Scale of the per-camera manufacturing jitter (0 = ideal, identical cameras)."""
    first_pod: int = 23
    """Number of the first pod in the camera names (FaMoS style)."""


def pod_camera_names(num_views: int, first_pod: int = 23) -> list:
    """FaMoS-style names ``['23_A', '23_B', '24_A', ...]`` for ``num_views`` cameras."""
    return [f"{first_pod + i // 2}_{'AB'[i % 2]}" for i in range(num_views)]


def _pod_eyes(az_deg: np.ndarray, el_deg: np.ndarray, dist_mm: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pod positions: ``(P, 3)`` world mm at the given azimuth/elevation/distance around target."""
    az, el = np.deg2rad(az_deg), np.deg2rad(el_deg)
    d = np.stack([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)], axis=-1)
    return target[None] + dist_mm[:, None] * d


def _stereo_eyes(pod_eyes: np.ndarray, target: np.ndarray, baseline: np.ndarray,
                 num_views: int) -> np.ndarray:
    """Place camera A above and B below each pod centre (offset along the pod's image-up
    direction when it faces ``target``). Returns eyes ``(V, 3)`` world mm (float64)."""
    up = np.array([0.0, 1.0, 0.0])
    fwd = target[None] - pod_eyes
    fwd /= np.linalg.norm(fwd, axis=-1, keepdims=True)
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    pod_up = np.cross(right, fwd)  # image-up direction of the pod
    offs = np.stack([pod_up * (0.5 * baseline[:, None]), -pod_up * (0.5 * baseline[:, None])], 1)
    return (pod_eyes[:, None] + offs).reshape(-1, 3)[:num_views]


def make_rig(kind: str = "paper", num_views: Optional[int] = None, width: int = 1600,
             height: int = 1200, distance_mm: float = 1000.0, seed: int = 0,
             config: Optional[RigConfig] = None) -> Cameras:
    """Build a synthetic camera rig.

    Args:
        kind: ``"paper"`` (8 stereo pods, front and sides; see module docstring) or ``"random"``.
        num_views: number of cameras. None -> 16 for ``"paper"``, a random 3..12 for ``"random"``.
            For ``"paper"`` the cameras come in A/B pairs; ``ceil(num_views / 2)`` pods are spread
            over the azimuth range and the last B camera is dropped for odd counts.
        width, height: image size in pixels; intrinsics scale with ``width / 1600``.
        distance_mm: nominal distance of the pods from the capture-volume centre, mm.
        seed: seeds the per-camera jitter (paper) or the whole rig (random).
        config: layout of the paper rig (defaults to :class:`RigConfig`).
    Returns:
        ``Cameras`` of batch shape ``(V,)``, float64, world->camera mm, distortion non-zero.
    """
    if kind not in RIG_KINDS:
        raise ValueError(f"make_rig: unknown kind {kind!r}, expected one of {RIG_KINDS}")
    if num_views is not None and int(num_views) < 1:
        raise ValueError(f"make_rig: num_views must be >= 1, got {num_views}")
    if width < 2 or height < 2:
        raise ValueError(f"make_rig: image size must be at least 2x2, got {width}x{height}")
    cfg = config or RigConfig()
    rng = np.random.default_rng(seed)
    if kind == "paper":
        return _paper_rig(16 if num_views is None else int(num_views), width, height,
                          float(distance_mm), rng, cfg)
    return _random_rig(num_views, width, height, float(distance_mm), rng)


def _paper_rig(V: int, W: int, H: int, distance: float, rng: np.random.Generator,
               cfg: RigConfig) -> Cameras:
    P = math.ceil(V / 2)
    j = cfg.jitter
    a_max = min(cfg.azimuth_max_deg, 30.0 * (P - 1))
    az = np.linspace(-a_max, a_max, P) if P > 1 else np.zeros(1)
    el = np.where(np.arange(P) % 2 == 0, cfg.elevation_high_deg, cfg.elevation_low_deg)
    az = az + j * rng.uniform(-3, 3, P)
    el = el + j * rng.uniform(-3, 3, P)
    dist = distance * (1 + j * rng.uniform(-0.05, 0.05, P))
    target = np.asarray(cfg.target_mm, dtype=np.float64)
    eyes = _stereo_eyes(_pod_eyes(az, el, dist, target), target,
                              cfg.baseline_mm * (1 + j * rng.uniform(-0.1, 0.1, P)), V)
    # Each camera aims at a point near the centre (real rigs are not perfectly converged).
    aim = target[None] + j * rng.normal(0, 10.0, (V, 3))
    R = look_at_rotation(torch.from_numpy(eyes), torch.from_numpy(aim),
                         torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).numpy()
    s = W / 1600.0
    f = cfg.focal_px * s * (1 + j * rng.uniform(-0.02, 0.02, V))
    aspect = 1 + j * rng.uniform(-0.002, 0.002, V)
    cx = (W - 1) / 2 + j * rng.uniform(-0.015, 0.015, V) * W
    cy = (H - 1) / 2 + j * rng.uniform(-0.015, 0.015, V) * H
    d0 = np.asarray(cfg.dist, dtype=np.float64)
    dist_c = d0[None] * (1 + j * rng.uniform(-0.15, 0.15, (V, 5)))
    return _build(eyes, R, f, f * aspect, cx, cy, dist_c, W, H, pod_camera_names(V, cfg.first_pod))


def _random_rig(num_views: Optional[int], W: int, H: int, distance: float,
                rng: np.random.Generator) -> Cameras:
    V = int(rng.integers(3, 13)) if num_views is None else int(num_views)
    target = np.array([0.0, -30.0, -10.0]) + rng.normal(0, 15.0, 3)
    a_max = rng.uniform(40, 100)
    az = np.sort(rng.uniform(-a_max, a_max, V))
    el = rng.uniform(-25, 30, V)
    dist = distance * rng.uniform(0.75, 1.35, V)
    eyes = _pod_eyes(az, el, dist, target)
    aim = target[None] + rng.normal(0, 15.0, (V, 3))
    up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    R = look_at_rotation(torch.from_numpy(eyes), torch.from_numpy(aim), up).numpy()
    # Random roll about the optical axis (some labs mount cameras tilted or in portrait).
    roll = np.deg2rad(rng.uniform(-8, 8, V))
    c, s_ = np.cos(roll), np.sin(roll)
    Rz = np.zeros((V, 3, 3))
    Rz[:, 0, 0], Rz[:, 0, 1], Rz[:, 1, 0], Rz[:, 1, 1], Rz[:, 2, 2] = c, -s_, s_, c, 1
    R = Rz @ R
    # Focal length such that a ~300 mm tall object fills 55-90 % of the shorter image side.
    fill = rng.uniform(0.55, 0.9, V)
    f = fill * min(W, H) * dist / 300.0
    aspect = 1 + rng.uniform(-0.003, 0.003, V)
    cx = (W - 1) / 2 + rng.uniform(-0.03, 0.03, V) * W
    cy = (H - 1) / 2 + rng.uniform(-0.03, 0.03, V) * H
    dist_c = np.stack([rng.uniform(-0.25, 0.05, V), rng.uniform(-0.05, 0.2, V),
                       rng.uniform(-1e-3, 1e-3, V), rng.uniform(-1e-3, 1e-3, V),
                       np.zeros(V)], axis=-1)
    names = [f"cam{i:02d}" for i in range(V)]
    return _build(eyes, R, f, f * aspect, cx, cy, dist_c, W, H, names)


def _build(eyes, R, fx, fy, cx, cy, dist, W, H, names) -> Cameras:
    V = len(eyes)
    K = np.zeros((V, 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = fx, fy, cx, cy, 1.0
    t = -np.einsum("vij,vj->vi", R, eyes)
    cams = Cameras.create(K, R, t, W, H, dist=dist, names=names, dtype=torch.float64)
    logger.debug("rig: %d cameras %dx%d", V, W, H)
    return cams
