"""Training losses: pure functions returning scalar tensors, plus the ``loss_*`` total convention.

Units: every 3D input is in millimetres, so squared-difference losses are in mm^2 and the
robust scan-to-mesh loss is in mm (``kind="sqrt_gm"``). Each function documents its exact
normalisation; the defaults follow the reference TEMPEH implementation (TEMPEH-FACTS 6).

Loss dictionaries follow the mmengine convention: a model returns ``{"loss_v2v": ...,
"loss_s2m": ..., "loss_edge": ..., "metric_...": ...}`` and only keys starting with ``loss_``
are weighted and summed by :func:`total_loss`; other keys are for logging.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "LossTerms", "ROBUST_KINDS", "V2V_KINDS", "v2v_loss", "geman_mcclure", "scan_to_mesh_distances",
    "scan_to_mesh_loss", "scan_to_mesh_distance", "edge_loss", "total_loss", "weighted_terms",
]

#: A loss dictionary: name -> scalar tensor. Only ``loss_*`` keys enter the total.
LossTerms = Dict[str, torch.Tensor]

#: the robust penalties accepted by :func:`geman_mcclure`.
ROBUST_KINDS = ("sqrt_gm", "gm", "l1", "l2")


def _check_pair(pred: torch.Tensor, gt: torch.Tensor, name: str) -> None:
    if not isinstance(pred, torch.Tensor) or not isinstance(gt, torch.Tensor):
        raise ValueError(f"{name}: pred and gt must be tensors")
    if pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"{name}: pred must be (B, N, 3), got {tuple(pred.shape)}")
    if gt.shape != pred.shape:
        raise ValueError(f"{name}: gt shape {tuple(gt.shape)} != pred shape {tuple(pred.shape)}")


def _weights(w: Optional[torch.Tensor], n: int, like: torch.Tensor, name: str,
             what: str) -> Optional[torch.Tensor]:
    if w is None:
        return None
    w = torch.as_tensor(w)
    if w.shape != (n,):
        raise ValueError(f"{name}: {what} must be ({n},), got {tuple(w.shape)}")
    return w.to(device=like.device, dtype=like.dtype)


V2V_KINDS = ("mse", "dist")


def v2v_loss(pred: torch.Tensor, gt: torch.Tensor, vertex_weights: Optional[torch.Tensor] = None,
             normalize: str = "all", kind: str = "mse", eps: float = 1e-8) -> torch.Tensor:
    """Weighted vertex-to-vertex error (``kind="mse"``: TEMPEH ``PointToPointLoss``).

    With per-vertex weights ``w`` and ``d = pred - gt``, ``kind="mse"`` (reference, default):

    * ``normalize="all"`` (reference, default): ``sum_{b,n,c} w_n^2 d_{bnc}^2 / (B * N * 3)``,
      i.e. ``MSE(w * pred, w * gt)``. The denominator counts zero-weight vertices too, so the
      value shrinks as the weighted set gets smaller (eyeballs only: 1092 of 5023 vertices).
    * ``normalize="weighted"``: ``sum w_n^2 d^2 / (B * 3 * sum_n w_n^2)``, a proper weighted
      mean (the per-coordinate MSE over the weighted vertices when weights are 0/1).

    ``kind="dist"`` (not in the paper): the mean Euclidean distance ``|w_n| sqrt(|d_bn|^2 + eps)``
    over ``B * N`` vertices (``"all"``) or divided by ``B * sum_n |w_n|`` (``"weighted"``). Its
    gradient has unit length per vertex whatever the error, so far-off vertices do not dominate
    the way they do under the square.

    Args:
        pred: ``(B, N, 3)`` predicted vertices, world mm.
        gt: ``(B, N, 3)`` ground-truth (registration) vertices, world mm.
        vertex_weights: ``(N,)`` unitless weights (``regions.vertex_weights``); None means 1.
        normalize: ``"all"`` or ``"weighted"``.
        kind: ``"mse"`` or ``"dist"``.
        eps: mm^2 under the square root of ``"dist"`` (a finite gradient at d = 0).

    Returns:
        Scalar tensor, mm^2 (``"mse"``) or mm (``"dist"``).
    """
    _check_pair(pred, gt, "v2v_loss")
    if kind not in V2V_KINDS:
        raise ValueError(f"v2v_loss: kind must be one of {V2V_KINDS}, got {kind!r}")
    if normalize not in ("all", "weighted"):
        raise ValueError(f"v2v_loss: normalize must be 'all' or 'weighted', got {normalize!r}")
    B, N, _ = pred.shape
    w = _weights(vertex_weights, N, pred, "v2v_loss", "vertex_weights")
    d2 = (pred - gt).square().sum(-1)  # (B, N) mm^2
    # per-vertex penalty and the power of its weight: w^2 d^2 / 3 (per coordinate) or |w| |d|
    per, wk = (d2 / 3.0, None if w is None else w.square()) if kind == "mse" else \
        (torch.sqrt(d2 + eps), None if w is None else w.abs())
    if wk is not None:
        per = per * wk.view(1, N)
    if normalize == "all":
        return per.mean()
    denom = (wk.sum() if wk is not None else pred.new_tensor(float(N))) * B
    if float(denom) <= 0:
        raise ValueError("v2v_loss: normalize='weighted' needs at least one non-zero weight")
    return per.sum() / denom


def geman_mcclure(d_sq: torch.Tensor, sigma: float = 10.0, kind: str = "sqrt_gm",
                  eps: float = 1e-16) -> torch.Tensor:
    """Robust penalty of squared distances, elementwise.

    ``kind``:

    * ``"sqrt_gm"`` (reference, default): ``rho = sqrt(sigma^2 d^2 / (sigma^2 + d^2) + eps)``, the
      square root of Geman-McClure on the squared distance. ``rho ~ d`` for ``d << sigma``
      (unit: mm) and ``rho -> sigma`` as ``d -> inf``.
    * ``"gm"``: ``rho = sigma^2 d^2 / (sigma^2 + d^2)``; ``~ d^2`` for small d, ``-> sigma^2``
      (unit: mm^2).
    * ``"l1"``: ``rho = sqrt(d^2 + eps)`` (plain distance, mm).
    * ``"l2"``: ``rho = d^2`` (the reference's behaviour when ``gmo_sigma <= 1e-8``, mm^2).

    ``eps`` (1e-16 mm^2 as in the reference) keeps the square root differentiable at ``d = 0``:
    the gradient with respect to the point coordinates is finite (0 at exactly d = 0), and
    ``rho(0) = sqrt(eps)`` = 1e-8 mm instead of 0.

    Args:
        d_sq: squared distances, any shape, mm^2, ``>= 0``.
        sigma: scale in mm (> 0 for the Geman-McClure kinds); the reference uses 10 mm.

    Returns:
        Tensor of ``d_sq``'s shape (mm for sqrt_gm / l1, mm^2 for gm / l2).
    """
    if kind in ("sqrt_gm", "gm"):
        if not sigma > 0:
            raise ValueError(f"geman_mcclure: sigma must be > 0 for kind={kind!r}, got {sigma}")
        s2 = float(sigma) ** 2
        gm = s2 * d_sq / (s2 + d_sq)
        return torch.sqrt(gm + eps) if kind == "sqrt_gm" else gm
    if kind == "l1":
        return torch.sqrt(d_sq + eps)
    if kind == "l2":
        return d_sq
    raise ValueError(f"geman_mcclure: unknown kind {kind!r} "
                     f"(choose from {', '.join(ROBUST_KINDS)})")


def _check_scan(scan: torch.Tensor, verts: torch.Tensor, scan_valid: Optional[torch.Tensor],
                name: str) -> torch.Tensor:
    """Validate inputs; return the ``(B, P)`` bool validity mask."""
    if scan.ndim != 3 or scan.shape[-1] != 3:
        raise ValueError(f"{name}: scan must be (B, P, 3), got {tuple(scan.shape)}")
    if verts.ndim != 3 or verts.shape[-1] != 3:
        raise ValueError(f"{name}: verts must be (B, N, 3), got {tuple(verts.shape)}")
    if scan.shape[0] != verts.shape[0]:
        raise ValueError(f"{name}: scan batch {scan.shape[0]} != verts batch {verts.shape[0]}")
    B, P, _ = scan.shape
    if P == 0:
        raise ValueError(f"{name}: the scan is empty (0 points)")
    if scan_valid is None:
        valid = torch.ones(B, P, dtype=torch.bool, device=scan.device)
    else:
        valid = torch.as_tensor(scan_valid, device=scan.device)
        if valid.dtype != torch.bool or valid.shape != (B, P):
            raise ValueError(f"{name}: scan_valid must be a ({B}, {P}) bool tensor, "
                             f"got {valid.dtype} {tuple(valid.shape)}")
    counts = valid.sum(dim=1)
    if bool((counts == 0).any()):
        b = int(torch.nonzero(counts == 0)[0, 0])
        raise ValueError(f"{name}: scan {b} of the batch has no valid points")
    bad = valid & ~torch.isfinite(scan).all(dim=-1)
    if bool(bad.any()):
        b, p = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{name}: scan {b} point {p} is marked valid but is not finite")
    return valid


def scan_to_mesh_distances(scan: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor,
                           scan_valid: Optional[torch.Tensor] = None, squared: bool = False,
                           backend: str = "auto") -> torch.Tensor:
    """Exact unsigned distance from every scan point to the predicted surface.

    Uses ``tempeh.geometry.point_to_surface`` (closest point ON the closest triangle, unlike the
    reference's unclamped point-to-plane distance). Invalid points are replaced by the origin
    before the query (so NaN padding cannot poison values or gradients) and get distance 0.

    Args:
        scan: ``(B, P, 3)`` scan points, world mm (cast to ``verts.dtype``).
        verts: ``(B, N, 3)`` predicted vertices, world mm.
        faces: ``(F, 3)`` int64 template faces.
        scan_valid: ``(B, P)`` bool, True for real points; None means all valid.
        squared: return squared distances (mm^2).
        backend: closest-face query backend of ``point_to_surface``.

    Returns:
        ``(B, P)`` distances in mm (mm^2 if ``squared``), 0 where invalid, differentiable
        w.r.t. ``verts``.
    """
    from tempeh.geometry.point_to_surface import point_to_surface

    valid = _check_scan(scan, verts, scan_valid, "scan_to_mesh_distances")
    pts = torch.where(valid.unsqueeze(-1), scan, torch.zeros_like(scan)).to(verts.dtype)
    faces = torch.as_tensor(faces, device=verts.device).long()
    dist, _ = point_to_surface(pts, verts, faces, squared=squared, backend=backend)
    return torch.where(valid, dist, torch.zeros_like(dist))


def _valid_mean(values: torch.Tensor, scan_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the valid points of each scan, then over the batch (values 0 where invalid)."""
    if scan_valid is None:
        return values.mean(dim=1).mean()
    valid = torch.as_tensor(scan_valid, device=values.device)
    values = torch.where(valid, values, torch.zeros_like(values))
    return (values.sum(dim=1) / valid.sum(dim=1).to(values.dtype)).mean()


def scan_to_mesh_loss(scan: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor,
                      sigma: float = 10.0, kind: str = "sqrt_gm",
                      scan_valid: Optional[torch.Tensor] = None,
                      backend: str = "auto") -> torch.Tensor:
    """Robust scan -> predicted-mesh point-to-surface loss (TEMPEH ``PointToSurfaceLoss``).

    ``rho(d^2)`` of the exact point-to-surface distance ``d`` of each valid scan point (see
    :func:`geman_mcclure` for ``kind``; the reference is ``sqrt_gm`` with sigma = 10 mm),
    averaged over the valid points of each scan, then over the batch (so every scan counts
    equally whatever its number of valid points).

    Args:
        scan: ``(B, P, 3)`` scan points, world mm.
        verts: ``(B, N, 3)`` predicted vertices, world mm.
        faces: ``(F, 3)`` int64 template faces.
        sigma: robust scale, mm.
        kind: robust penalty, one of :data:`ROBUST_KINDS`.
        scan_valid: ``(B, P)`` bool (padding False); None means all valid.
        backend: closest-face query backend of ``point_to_surface``.

    Returns:
        Scalar tensor, mm for ``sqrt_gm`` / ``l1``, mm^2 for ``gm`` / ``l2``.

    Raises:
        ValueError: an empty scan, a scan without valid points, non-finite valid points,
            mismatched shapes, an unknown ``kind``.
    """
    if kind not in ROBUST_KINDS:
        raise ValueError(f"scan_to_mesh_loss: unknown kind {kind!r} "
                         f"(choose from {', '.join(ROBUST_KINDS)})")
    d_sq = scan_to_mesh_distances(scan, verts, faces, scan_valid, squared=True, backend=backend)
    return _valid_mean(geman_mcclure(d_sq, sigma=sigma, kind=kind), scan_valid)


@torch.no_grad()
def scan_to_mesh_distance(scan: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor,
                          scan_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Non-robust mean point-to-surface distance (a logged metric, no gradient).

    Mean over the valid points of each scan, then over the batch. Returns a scalar in mm.
    """
    return _valid_mean(scan_to_mesh_distances(scan, verts, faces, scan_valid), scan_valid)


def edge_loss(pred: torch.Tensor, gt: torch.Tensor, edges: torch.Tensor,
              edge_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted squared error of EDGE VECTORS (TEMPEH ``EdgeLoss``).

    With ``e = v_j - v_i`` for every edge ``(i, j)`` and ``d = e_pred - e_gt``:
    ``sum_{b,k,c} w_k^2 d_{bkc}^2 / (B * E * 3)``, i.e. ``MSE(w * e_pred, w * e_gt)``. It compares
    edge vectors (not lengths) to the registration, so it is invariant to a common translation
    of ``pred`` but not to rotation.

    Args:
        pred: ``(B, N, 3)`` predicted vertices, world mm.
        gt: ``(B, N, 3)`` registration vertices, world mm.
        edges: ``(E, 2)`` int64 vertex pairs (``mesh_ops.unique_edges``).
        edge_weights: ``(E,)`` unitless (``regions.edge_weights``); None means 1.

    Returns:
        Scalar tensor, mm^2.
    """
    _check_pair(pred, gt, "edge_loss")
    edges = torch.as_tensor(edges, device=pred.device)
    if edges.ndim != 2 or edges.shape[1] != 2 or edges.shape[0] == 0:
        raise ValueError(f"edge_loss: edges must be (E>0, 2), got {tuple(edges.shape)}")
    edges = edges.long()
    N = pred.shape[1]
    if int(edges.min()) < 0 or int(edges.max()) >= N:
        raise ValueError(f"edge_loss: edge index out of range [0, {N})")
    w = _weights(edge_weights, edges.shape[0], pred, "edge_loss", "edge_weights")
    diff = pred - gt  # edge-vector difference = difference of per-vertex differences
    d = diff[:, edges[:, 1]] - diff[:, edges[:, 0]]  # (B, E, 3)
    sq = d.square()
    if w is not None:
        sq = sq * w.square().view(1, -1, 1)
    return sq.mean()


def _check_loss_weights(terms: Mapping[str, torch.Tensor],
                        weights: Optional[Mapping[str, float]]) -> Dict[str, float]:
    weights = dict(weights or {})
    for key, val in weights.items():
        if not key.startswith("loss_"):
            raise ValueError(f"loss weight key '{key}' must start with 'loss_'")
        if key not in terms and float(val) != 0.0:
            raise ValueError(f"loss weight '{key}' = {val} has no matching term "
                             f"(terms: {', '.join(sorted(terms))})")
    return weights


def weighted_terms(terms: Mapping[str, torch.Tensor],
                   weights: Optional[Mapping[str, float]] = None) -> LossTerms:
    """The ``loss_*`` terms multiplied by their weights (default 1), for logging.

    Non-``loss_`` keys are dropped. Raises ValueError for a non-scalar term, a weight key that
    does not start with ``loss_``, or a non-zero weight without a term.
    """
    weights = _check_loss_weights(terms, weights)
    out: LossTerms = {}
    for key, val in terms.items():
        if not key.startswith("loss_"):
            continue
        if not isinstance(val, torch.Tensor) or val.numel() != 1:
            raise ValueError(f"loss term '{key}' must be a scalar tensor")
        out[key] = float(weights.get(key, 1.0)) * val.reshape(())
    return out


def total_loss(terms: Mapping[str, torch.Tensor],
               weights: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    """Sum of ``weights[key] * terms[key]`` over the ``loss_*`` keys (mmengine convention).

    Keys without the ``loss_`` prefix (metrics, ``pred_*``) are ignored; a ``loss_*`` key
    missing from ``weights`` has weight 1. Raises ValueError when there is no ``loss_*`` term.
    """
    wt = weighted_terms(terms, weights)
    if not wt:
        raise ValueError(f"total_loss: no 'loss_*' terms among {', '.join(sorted(terms)) or '{}'}")
    vals = list(wt.values())
    out = vals[0]
    for v in vals[1:]:  # a handful of terms
        out = out + v
    return out
