"""Energy terms of scan fitting (all mm^2): robust data terms, ARAP, Laplacian, priors.

See :mod:`tempeh.fitting.nonrigid` for the stage energy and :mod:`tempeh.fitting.deform` for the
model whose parameters it constrains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch

from tempeh.geometry.mesh_ops import unique_edges
from tempeh.geometry.point_to_surface import point_triangle_distance_sq
from tempeh.losses import edge_loss, geman_mcclure
from tempeh.template import Template

if TYPE_CHECKING:  # pragma: no cover
    from tempeh.fitting.deform import DeformModel
    from tempeh.fitting.nonrigid import FitStage

__all__ = ["arap_energy", "edge_ops", "laplacian", "Match", "Reg", "data_weights",
           "group_regions", "stage_energy"]


def edge_ops(faces: np.ndarray, skin: np.ndarray, device, dtype):
    """Skin-skin edges ``(E, 2)`` and vertex degrees over them ``(N,)`` (>= 1)."""
    e = unique_edges(torch.as_tensor(faces))
    sk = torch.as_tensor(skin)
    e = e[sk[e[:, 0]] & sk[e[:, 1]]].to(device)
    deg = torch.zeros(len(skin), device=device, dtype=dtype)
    deg.index_add_(0, e.reshape(-1), torch.ones(e.numel(), device=device, dtype=dtype))
    return e, deg.clamp_min(1.0)


def laplacian(D: torch.Tensor, e: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
    """Uniform Laplacian ``D_i - mean_{j~i} D_j`` over the edges ``e``, ``(N, 3)``."""
    acc = torch.zeros_like(D)
    acc = acc.index_add(0, e[:, 0], D[e[:, 1]]).index_add(0, e[:, 1], D[e[:, 0]])
    return D - acc / deg[:, None]


def arap_energy(X: torch.Tensor, B: torch.Tensor, edges: torch.Tensor,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """As-rigid-as-possible energy of ``X`` relative to the rest shape ``B``.

    ``sum_{(i,j)} w_ij (|x_ij - R_i b_ij|^2 + |x_ji - R_j b_ji|^2) / (2 sum w)`` with
    ``x_ij = X_i - X_j``, ``b_ij = B_i - B_j`` and ``R_i`` the rotation that best maps the
    rest edges of vertex ``i`` onto the deformed ones (orthogonal Procrustes, batched SVD).
    The rotations are found without autograd: they minimise the energy, so by the envelope
    theorem the gradient w.r.t. ``X`` and ``B`` is exact with them held fixed.

    Args:
        X, B: ``(N, 3)`` mm. edges: ``(E, 2)`` int64. weights: ``(E,)`` (None: 1).
    Returns:
        Scalar, mm^2 (invariant to rotating any vertex neighbourhood rigidly).
    """
    i, j = edges[:, 0], edges[:, 1]
    w = torch.ones(len(edges), dtype=X.dtype, device=X.device) if weights is None else weights
    with torch.no_grad():
        xe = X[i] - X[j]
        be = B[i] - B[j]
        outer = w[:, None, None] * be[:, :, None] * xe[:, None, :]  # (E, 3, 3) b x^T
        S = torch.zeros(X.shape[0], 3, 3, dtype=X.dtype, device=X.device)
        S = S.index_add(0, i, outer).index_add(0, j, outer)  # b_ji x_ji^T = b_ij x_ij^T
        U, _, Vh = torch.linalg.svd(S)
        R = Vh.transpose(-1, -2) @ U.transpose(-1, -2)
        flip = torch.det(R) < 0
        if bool(flip.any()):
            Vf = Vh.transpose(-1, -2).clone()
            Vf[flip, :, 2] *= -1.0
            R = torch.where(flip[:, None, None], Vf @ U.transpose(-1, -2), R)
    xe = X[i] - X[j]
    be = B[i] - B[j]
    ri = (R[i] @ be[:, :, None])[..., 0]
    rj = (R[j] @ be[:, :, None])[..., 0]
    res = (xe - ri).square().sum(1) + (xe - rj).square().sum(1)
    return (w * res).sum() / (2.0 * w.sum())


def group_regions(group: str) -> Tuple[str, ...]:
    from tempeh.geometry.regions import WEIGHT_GROUPS

    if group not in WEIGHT_GROUPS:
        raise ValueError(f"FitConfig.edge_weights: unknown group '{group}' "
                         f"(known: {', '.join(WEIGHT_GROUPS)})")
    return WEIGHT_GROUPS[group]


@dataclass
class Match:
    """Correspondences of one round (fixed while L-BFGS runs)."""

    tri: torch.Tensor   # (Q, 3) vertex ids of the closest face of every scan point
    cov: torch.Tensor   # (C,) covered vertex ids
    q: torch.Tensor     # (C, 3) their nearest scan points, mm
    qn: torch.Tensor    # (C, 3) scan normals there
    w_pts: Optional[torch.Tensor]  # (Q,) data weight of every scan point (None: 1)
    w_cov: Optional[torch.Tensor]  # (C,) data weight of every covered vertex (None: 1)


def _wmean(x: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    return x.mean() if w is None else (w * x).sum() / w.sum().clamp_min(1e-12)


def data_weights(template: Template, groups: Dict[str, float], device, dtype
                  ) -> Optional[torch.Tensor]:
    """``(N,)`` per-vertex data weights of a stage, or None when all are 1."""
    present = {g: w for g, w in groups.items()
               if any(r in template.regions for r in group_regions(g))}
    if not present:
        return None
    from tempeh.geometry.regions import WEIGHT_GROUPS

    regions = {r: template.regions[r] for g in present for r in WEIGHT_GROUPS[g]
               if r in template.regions}
    w = torch.ones(template.num_verts, dtype=torch.float64)
    for g, val in present.items():  # only present regions (vertex_weights needs all or default)
        for r in WEIGHT_GROUPS[g]:
            if r in regions:
                w[torch.as_tensor(regions[r])] = float(val)
    return w.to(device=device, dtype=dtype)


@dataclass
class Reg:
    """Regulariser data (fixed for a fit)."""

    edges: torch.Tensor
    ew: torch.Tensor
    deg: torch.Tensor
    lap_w: torch.Tensor
    w_eye: float
    w_basis: float
    w_art: float = 0.0       # ridge on the jaw rotation
    w_upright: float = 0.0   # neck-base prior on the global rotation


def stage_energy(model: "DeformModel", st: "FitStage", scan_t: torch.Tensor, m: Match, reg: Reg
                 ) -> Dict[str, torch.Tensor]:
    """The stage energy terms (``loss_*``, each already weighted, mm^2).

    The scan->mesh distance is the exact distance to the closest face found at the start of
    the round (re-found every round)."""
    X, B = model.template_space()
    V = model.world(X)
    terms: Dict[str, torch.Tensor] = {}
    d2 = point_triangle_distance_sq(scan_t[0], V[m.tri[:, 0]], V[m.tri[:, 1]], V[m.tri[:, 2]])
    terms["loss_s2m"] = st.w_s2m * _wmean(geman_mcclure(d2, sigma=st.sigma_mm, kind="gm"), m.w_pts)
    if m.cov.numel():
        r = ((V[m.cov] - m.q) * m.qn).sum(1)
        terms["loss_m2s"] = st.w_m2s * _wmean(geman_mcclure(r * r, sigma=st.sigma_mm, kind="gm"),
                                              m.w_cov)
    if st.optimize_offsets:
        if st.w_arap > 0:
            terms["loss_arap"] = st.w_arap * arap_energy(X, B, reg.edges, reg.ew)
        if st.w_edge > 0:
            terms["loss_edge"] = st.w_edge * edge_loss(X[None], B[None], reg.edges, reg.ew)
        if st.w_tan > 0:
            Dn = (model.D * model.nT).sum(1, keepdim=True) * model.nT
            terms["loss_tan"] = st.w_tan * ((model.D - Dn) * model.skin_f).square().sum(1).mean()
        if st.w_lap > 0:
            L = laplacian(model.D * model.skin_f, reg.edges, reg.deg)
            terms["loss_lap"] = st.w_lap * (reg.lap_w[:, None] * L.square()).sum(1).mean()
    terms["loss_basis"] = reg.w_basis * model.coef.square().mean()
    if reg.w_art > 0:
        terms["loss_articulation"] = reg.w_art * model.jaw.square().sum()
    if reg.w_upright > 0 and model.H.shape[1]:
        eye3 = torch.eye(3, dtype=model.T.dtype, device=model.T.device)
        terms["loss_upright"] = (reg.w_upright * 0.5 * model.radius ** 2
                                 * (model.rotation() - eye3).square().sum())
    if model.eyes:
        off = X - model.T
        eye = [(model.eye_u[k] - off[ring].mean(0)).square().sum() + model.eye_a[k].square().sum()
               for k, (_, ring) in enumerate(model.eyes)]
        terms["loss_eye"] = reg.w_eye * torch.stack(eye).mean()
    return terms
