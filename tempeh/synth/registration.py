"""Reference registrations with the errors of an automatic registration pipeline.

The synthetic studio knows the true mesh of every frame; real training data only has
registrations that slide along the surface and float a little off it. :func:`perturb_registration`
adds such errors to the true vertices:

* **tangential sliding**: a smooth random 3D vector field (random Fourier features of a
  Gaussian-kernel random field with length scale ``length_scale_mm``) projected onto each
  vertex's tangent plane; RMS ``tangential_mm`` (default 0.7 mm) over the vertices outside the
  detail regions;
* **normal offsets**: an independent smooth scalar field along the vertex normals; RMS
  ``normal_mm`` (default 0.3 mm) outside the detail regions;
* **larger errors around lips and eyes**: both fields are multiplied by a gain that is
  ``detail_gain`` (default 2) on ``lips``, ``left_eye_region`` and ``right_eye_region`` and blends
  smoothly to 1 within ``blend_mm`` (15 mm, Euclidean) of them.

The exact magnitudes: the unit-variance fields are rescaled so that, over the vertices whose gain
is exactly 1, the RMS tangential length is ``tangential_mm`` and the RMS normal offset is
``normal_mm``. Smoothness: the displacement changes by about ``magnitude / length_scale`` per mm
along the surface (0.02 at the defaults), so neighbouring vertices move together.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.spatial import cKDTree

from tempeh.synth.render import vertex_normals

logger = logging.getLogger(__name__)

__all__ = ["RegistrationErrorConfig", "perturb_registration", "smooth_random_field"]


@dataclass
class RegistrationErrorConfig:
    """Magnitudes of the registration errors (mm)."""

    tangential_mm: float = 0.7
    """RMS tangential sliding outside the detail regions."""
    normal_mm: float = 0.3
    """RMS offset along the normal outside the detail regions."""
    detail_gain: float = 2.0
    """Multiplier of both errors on the detail regions."""
    detail_regions: Sequence[str] = ("lips", "left_eye_region", "right_eye_region")
    """Regions with larger errors (missing names are ignored)."""
    length_scale_mm: float = 35.0
    """Correlation length of the random fields."""
    blend_mm: float = 15.0
    """Distance from the detail regions over which the gain blends (smoothstep) to 1."""
    num_features: int = 64
    """Random Fourier features per field."""
    normal_smoothing: int = 3
    """Neighbour-averaging passes over the vertex normals that define "tangential" and "normal"
    (keeps the displacement smooth across creases such as ear folds and eyelids)."""


def smooth_random_field(points: np.ndarray, channels: int, length_scale_mm: float,
                        rng: np.random.Generator, num_features: int = 64) -> np.ndarray:
    """A smooth zero-mean random field with unit variance per channel (random Fourier features
    of the Gaussian kernel ``exp(-|x - y|^2 / (2 l^2))``).

    Args:
        points: ``(P, 3)`` positions, mm. channels: output channels.
    Returns:
        ``(P, channels)`` field values.
    """
    w = rng.normal(0.0, 1.0 / length_scale_mm, (num_features, 3))
    phase = rng.uniform(0.0, 2 * np.pi, num_features)
    amp = rng.normal(0.0, 1.0, (num_features, channels))
    return np.sqrt(2.0 / num_features) * np.cos(points @ w.T + phase) @ amp


def _adjacency(faces: np.ndarray, n: int):
    """Vertex adjacency (CSR, 0/1) and degrees ``(N,)`` of a triangle mesh."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adj = coo_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])),
                     shape=(n, n)).tocsr()
    adj.data[:] = 1.0  # duplicate edges count once
    return adj, np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1.0)


def _region_gain(verts: np.ndarray, regions: Dict[str, np.ndarray],
                 cfg: RegistrationErrorConfig) -> np.ndarray:
    """``(N,)`` gain: ``detail_gain`` on the detail regions, 1 beyond ``blend_mm`` from them,
    a smoothstep of the Euclidean distance in between."""
    idx = [np.asarray(regions[r], dtype=np.int64) for r in cfg.detail_regions if r in regions]
    idx = np.unique(np.concatenate(idx)) if idx else np.zeros(0, np.int64)
    if idx.size == 0:
        return np.ones(len(verts))
    d, _ = cKDTree(verts[idx]).query(verts)
    x = np.clip(1.0 - d / max(cfg.blend_mm, 1e-9), 0.0, 1.0)
    return 1.0 + (cfg.detail_gain - 1.0) * x * x * (3 - 2 * x)


def perturb_registration(verts: np.ndarray, faces: np.ndarray, regions: Dict[str, np.ndarray],
                         rng: np.random.Generator,
                         config: Optional[RegistrationErrorConfig] = None,
                         tangential_mm: Optional[float] = None,
                         normal_mm: Optional[float] = None) -> np.ndarray:
    """The true mesh perturbed like an automatic registration (see the module docstring).

    Args:
        verts: ``(N, 3)`` true vertices, world, mm. faces: ``(F, 3)``.
        regions: template regions (name -> vertex indices).
        rng: draws the random fields.
        tangential_mm, normal_mm: override the config magnitudes.
    Returns:
        ``(N, 3)`` float64 perturbed vertices, world, mm.
    """
    cfg = config or RegistrationErrorConfig()
    tan_mm = float(cfg.tangential_mm if tangential_mm is None else tangential_mm)
    nor_mm = float(cfg.normal_mm if normal_mm is None else normal_mm)
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    n = len(verts)
    adj, deg = _adjacency(faces, n)
    normals = vertex_normals(verts, faces)
    for _ in range(cfg.normal_smoothing):
        normals = normals + (adj @ normals) / deg[:, None]
        normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    gain = _region_gain(verts, regions, cfg)
    base = gain == 1.0
    if not base.any():
        base = np.ones(n, bool)
    field = smooth_random_field(verts, 4, cfg.length_scale_mm, rng, cfg.num_features)
    tan = field[:, :3] - (field[:, :3] * normals).sum(-1, keepdims=True) * normals
    nor = field[:, 3]
    tan_rms = np.sqrt((tan[base] ** 2).sum(-1).mean())
    nor_rms = np.sqrt((nor[base] ** 2).mean())
    tan = tan * (tan_mm / max(tan_rms, 1e-12))
    nor = nor * (nor_mm / max(nor_rms, 1e-12))
    return verts + gain[:, None] * (tan + nor[:, None] * normals)
