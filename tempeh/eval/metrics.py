"""Evaluation metrics: scan->mesh distance per head region, summaries, cumulative error
curves, vertex error to a true mesh (and its pose / shape split) and temporal jitter.

All inputs and outputs are millimetres in one world frame; no alignment of any kind (rigid,
similarity, landmark) is applied: a prediction is scored where it was predicted. The one fit is
in :func:`pose_split`, a diagnostic that splits an (unaligned) vertex error into pose and shape.

**Scan->mesh distance** (the paper's reconstruction error, Sec. 4 "Quantitative evaluation"):
for every scan point ``p`` the exact unsigned Euclidean distance to the closest point ON the
predicted triangle mesh (point-to-triangle, not point-to-vertex), from
:func:`tempeh.geometry.point_to_surface`. It is measured from the scan to the mesh only, so
predicted surface where the scan has holes is not penalised, and a mesh that is too small is.

**Region of a scan point.** Regions are named sets of TEMPLATE vertex indices (e.g. FLAME's
``face``, ``scalp``, ``neck``); the predicted mesh has the template topology. A scan point is
assigned to ONE template vertex, ``nearest_vertex``: of the three corners of its closest face
(the face returned by the exact closest-point query), the corner with the smallest Euclidean
distance to the scan point (ties: the first corner in the face's vertex order). On ties between
equidistant faces (a closest point on a shared edge or vertex) the query may return any of them.
The point then belongs to EVERY region that contains ``nearest_vertex``: regions may overlap
(FLAME's ``face`` and ``lips`` do), and a point in an overlap counts in each of those regions'
statistics; a point whose vertex is in no region counts only in ``all``. ``all`` is every scan
point (the paper's "complete head").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from tempeh.geometry import point_to_surface

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_REGIONS",
    "ScanToMesh",
    "scan_to_mesh",
    "summary",
    "cumulative_error_curve",
    "v2v_error",
    "PoseSplit",
    "pose_split",
    "jitter",
    "second_differences",
]

#: Regions reported besides ``all``, in this order (the paper's Table 1: face, scalp, neck).
REPORT_REGIONS: Tuple[str, ...] = ("face", "scalp", "neck")


@dataclass
class ScanToMesh:
    """Result of :func:`scan_to_mesh` for one scan of ``P`` points.

    Fields:
        dist: ``(P,)`` float64, mm: exact distance from each scan point to the predicted surface.
        face_idx: ``(P,)`` int64: the closest face of each scan point.
        nearest_vertex: ``(P,)`` int64: the template vertex the point is assigned to (the
            nearest corner of its closest face, see the module docstring).
        region_masks: region name -> ``(P,)`` bool, the points in that region; always holds
            ``"all"`` (every point) first, then the reported regions the template has.
    """

    dist: np.ndarray
    face_idx: np.ndarray
    nearest_vertex: np.ndarray
    region_masks: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def region_of_point(self) -> np.ndarray:
        """``(P,)`` str label per point: the names of the reported regions (``all`` excluded)
        holding it, joined by ``"+"`` in report order (``"face+neck"`` for an overlap), or
        ``""`` when it is in none of them."""
        names = [n for n in self.region_masks if n != "all"]
        labels = np.full(self.dist.shape[0], "", dtype=object)
        for n in names:
            m = self.region_masks[n]
            labels[m] = np.where(labels[m] == "", n, labels[m] + "+" + n)
        return labels.astype(str)

    def region_dists(self) -> Dict[str, np.ndarray]:
        """Region name -> ``(P_region,)`` distances, mm (``all`` first)."""
        return {n: self.dist[m] for n, m in self.region_masks.items()}


def _as_points(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must be (K, 3) mm, got shape {a.shape}")
    return a


def scan_to_mesh(scan, verts, faces, vertex_regions: Optional[Mapping[str, Sequence[int]]] = None,
                 regions: Sequence[str] = REPORT_REGIONS, backend: str = "auto") -> ScanToMesh:
    """Exact scan->mesh point-to-surface distance with per-point head regions.

    Args:
        scan: ``(P, 3)`` scan points, world, mm (P >= 1).
        verts: ``(N, 3)`` predicted mesh vertices in the template topology, world, mm.
        faces: ``(F, 3)`` integer vertex indices of the template.
        vertex_regions: region name -> template vertex indices (e.g. ``Template.regions``);
            None: only ``all`` is reported.
        regions: names reported besides ``all``; a name the template lacks is omitted (logged
            once per call at INFO level).
        backend: closest-face backend of :func:`tempeh.geometry.point_to_surface`.
    Returns:
        :class:`ScanToMesh`. Regions are assigned as in the module docstring: the nearest of the
        three corners of the closest face decides; overlapping regions count the point in each.
    Raises:
        ValueError: bad shapes, empty scan, NaN/inf, face or region indices out of range.
    """
    p = _as_points(scan, "scan")
    v = _as_points(verts, "verts")
    f = np.asarray(faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else faces)
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"faces must be (F, 3) integers, got {f.dtype} {f.shape}")
    pt = torch.from_numpy(p)[None]
    vt = torch.from_numpy(v)[None]
    ft = torch.from_numpy(f.astype(np.int64))
    with torch.no_grad():
        dist, face_idx = point_to_surface(pt, vt, ft, backend=backend)
    dist = dist[0].numpy()
    face_idx = face_idx[0].numpy()
    corners = f[face_idx].astype(np.int64)  # (P, 3)
    d2 = ((v[corners] - p[:, None, :]) ** 2).sum(-1)  # (P, 3)
    nearest = corners[np.arange(p.shape[0]), d2.argmin(1)]

    masks: Dict[str, np.ndarray] = {"all": np.ones(p.shape[0], dtype=bool)}
    vertex_regions = vertex_regions or {}
    missing = [r for r in regions if r not in vertex_regions]
    if missing:
        logger.info("template has no region(s) %s; those rows are omitted", missing)
    for name in regions:
        if name not in vertex_regions:
            continue
        idx = np.asarray(vertex_regions[name], dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= v.shape[0]):
            raise ValueError(f"region '{name}' has vertex indices outside [0, {v.shape[0]})")
        in_region = np.zeros(v.shape[0], dtype=bool)
        in_region[idx] = True
        masks[name] = in_region[nearest]
    return ScanToMesh(dist=dist, face_idx=face_idx, nearest_vertex=nearest, region_masks=masks)


def summary(dists) -> Dict[str, float]:
    """``{"median", "mean", "std", "count"}`` of distances (mm).

    ``std`` is the population standard deviation (ddof 0). With no values, median/mean/std are
    NaN and count is 0. NaN inputs are an error (never silently dropped).
    """
    d = np.asarray(dists, dtype=np.float64).reshape(-1)
    if d.size and not np.all(np.isfinite(d)):
        raise ValueError("summary: distances contain NaN or inf")
    if d.size == 0:
        return {"median": float("nan"), "mean": float("nan"), "std": float("nan"), "count": 0}
    return {"median": float(np.median(d)), "mean": float(d.mean()), "std": float(d.std()),
            "count": int(d.size)}


def cumulative_error_curve(dists, max_mm: float = 5.0, steps: int = 101
                           ) -> Tuple[np.ndarray, np.ndarray]:
    """Cumulative error curve: the fraction of values ``<= x`` for ``x`` on a grid.

    Args:
        dists: ``(P,)`` distances, mm.
        max_mm: the largest threshold (the grid is ``linspace(0, max_mm, steps)``).
        steps: number of thresholds (>= 2).
    Returns:
        ``x (steps,)`` mm and ``frac (steps,)`` in [0, 1], non-decreasing (all 0 when empty).
    """
    if steps < 2 or not max_mm > 0:
        raise ValueError(f"cumulative_error_curve needs steps >= 2 and max_mm > 0, got {steps}, {max_mm}")
    d = np.sort(np.asarray(dists, dtype=np.float64).reshape(-1))
    x = np.linspace(0.0, float(max_mm), int(steps))
    if d.size == 0:
        return x, np.zeros_like(x)
    frac = np.searchsorted(d, x, side="right") / d.size
    return x, frac


def v2v_error(pred, gt) -> np.ndarray:
    """Per-vertex Euclidean error to the true mesh: ``(N,)`` mm.

    Args:
        pred: ``(N, 3)`` predicted vertices, mm; gt: ``(N, 3)`` true vertices in the same
            topology and frame, mm.
    """
    a, b = _as_points(pred, "pred"), _as_points(gt, "gt")
    if a.shape != b.shape:
        raise ValueError(f"v2v_error: pred {a.shape} and gt {b.shape} differ in vertex count")
    return np.linalg.norm(a - b, axis=1)


@dataclass
class PoseSplit:
    """A prediction's difference from the true mesh, split into pose and shape (one frame).

    rotation_deg: angle of the rotation of the least-squares rigid fit prediction -> truth, deg.
    centroid_mm: distance between the vertex centroids, mm.
    scale: isotropic scale of the least-squares similarity fit prediction -> truth (1 = same size).
    residual_median_mm: median per-vertex error after that similarity fit, mm: the shape error
        that no pose or size change removes.
    """

    rotation_deg: float
    centroid_mm: float
    scale: float
    residual_median_mm: float


def pose_split(pred, gt) -> PoseSplit:
    """Split the vertex error of ``pred`` against ``gt`` into pose and shape (:class:`PoseSplit`).

    Args:
        pred: ``(N, 3)`` predicted vertices, mm; gt: ``(N, 3)`` true vertices in the same
            topology and frame, mm (N >= 3, not collinear).
    """
    from tempeh.fitting.rigid import similarity_from_correspondences

    a, b = _as_points(pred, "pred"), _as_points(gt, "gt")
    if a.shape != b.shape:
        raise ValueError(f"pose_split: pred {a.shape} and gt {b.shape} differ in vertex count")
    # one fit: the least-squares rotation does not depend on whether the scale is estimated
    sim = similarity_from_correspondences(a, b, with_scale=True)
    R = sim.R
    # angle from atan2(sin, cos): accurate near 0 and 180 deg, where arccos of the trace is not
    sin = 0.5 * np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    cos = 0.5 * (np.trace(R) - 1.0)
    res = np.linalg.norm(sim.apply(a) - b, axis=1)
    return PoseSplit(rotation_deg=float(np.degrees(np.arctan2(sin, cos))),
                     centroid_mm=float(np.linalg.norm(a.mean(0) - b.mean(0))),
                     scale=float(sim.scale), residual_median_mm=float(np.median(res)))


def second_differences(seq) -> np.ndarray:
    """``(T-2, N)`` norms ``|x[t+1] - 2 x[t] + x[t-1]|`` (mm) of a ``(T, N, 3)`` sequence."""
    s = np.asarray(seq.detach().cpu().numpy() if isinstance(seq, torch.Tensor) else seq,
                   dtype=np.float64)
    if s.ndim != 3 or s.shape[2] != 3:
        raise ValueError(f"sequence must be (T, N, 3) mm, got shape {s.shape}")
    if s.shape[0] < 3:
        raise ValueError(f"jitter needs at least 3 frames, got {s.shape[0]}")
    return np.linalg.norm(s[2:] - 2.0 * s[1:-1] + s[:-2], axis=2)


def jitter(seq) -> float:
    """Temporal jitter of a mesh sequence, mm.

    The mean, over the interior frames ``t = 1 .. T-2`` and all vertices, of the norm of the
    discrete second difference ``x[t+1] - 2 x[t] + x[t-1]`` (an acceleration in mm per
    frame^2, i.e. per-frame-step units; divide by ``dt^2`` for mm/s^2). It is 0 for vertices
    at rest or moving at constant velocity, and ``4 A`` for an oscillation ``A (-1)^t``.

    Args:
        seq: ``(T, N, 3)`` vertices of consecutive frames, mm; T >= 3.
    """
    return float(second_differences(seq).mean())
