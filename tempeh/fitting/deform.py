"""The deformation model of scan fitting: template space, smooth bases, articulation.

Model (template space ``X``, world ``V``, both mm)::

    B_i = J(T_i + (sum_k phi_ik c_k) u_i)              base shape: template + smooth basis, jaw
    X_i = B_i + D_i                                   skin vertices (free offsets D)
    X_e = R(a_k) (T_e - e_k) + e_k + w_k              eyeball k: a rigid transform (a_k, w_k)
    Y_i = R(h_i rho) (S X_i - S p) + S p              neck articulation, S = s0 diag(exp(sigma))
    V_i = R0 R(omega) Y_i + t0 + tau                  global rigid

``T`` is the template, ``phi`` Gaussian bumps on a farthest-point subset of the skin
(:func:`deformation_basis`; ``u`` radial from the head centre by default), ``e_k`` the template
eyeball centres, ``(s0, R0, t0)`` the initial similarity (:mod:`tempeh.fitting.rigid`).

* Neck articulation: the head (face, scalp, ears, eyes) turns by the rotation vector ``rho``
  relative to the neck base about a pivot ``p`` on the neck axis; the per-vertex weight ``h``
  (:func:`neck_weight`, from the template alone) is 0 on the neck's boundary loop and 1 on the
  head, so a head turn bends the neck instead of dragging its base (which a global rotation
  plus ARAP cannot express).
* Jaw: ``J(x) = x + g (R(theta) (x - q) + q - x)``, a rotation of the lower face about a pivot
  ``q`` below the ears with a weight ``g`` from the mouth slit (:func:`jaw_weight`); it lives
  in the base shape, so ARAP does not resist an open mouth.

Rotation and log-scale parameters are stored multiplied by the template radius (one unit
moves the surface by about 1 mm, like an offset), which keeps the problem well scaled for
L-BFGS.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree

from tempeh.fitting.rigid import Similarity, similarity_from_correspondences
from tempeh.geometry.mesh_ops import vertex_normals
from tempeh.geometry.rotations import axis_angle_to_matrix
from tempeh.template import Template

logger = logging.getLogger(__name__)

__all__ = ["farthest_point_sampling", "head_centre", "deformation_basis", "neck_weight",
           "jaw_weight", "DeformModel"]

#: regions that move rigidly with the head (weight 1 of the neck articulation)
HEAD_REGIONS = ("face", "scalp", "left_ear", "right_ear", "left_eye_region", "right_eye_region",
                "left_eyeball", "right_eyeball", "lips", "nostrils")


def farthest_point_sampling(points: np.ndarray, spacing: float) -> np.ndarray:
    """Indices of a greedy farthest-point subset of ``points (M, 3)`` whose every point lies
    within ``spacing`` (mm) of a chosen one; starts at the point nearest the centroid."""
    pts = np.asarray(points, dtype=np.float64)
    first = int(np.argmin(((pts - pts.mean(0)) ** 2).sum(1)))
    chosen = [first]
    d = np.linalg.norm(pts - pts[first], axis=1)
    while d.max() > spacing:  # one vectorised update per chosen centre
        k = int(np.argmax(d))
        chosen.append(k)
        d = np.minimum(d, np.linalg.norm(pts - pts[k], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def head_centre(template: Template) -> np.ndarray:
    """``(3,)`` template-space head centre, mm: the midpoint of the ear centroids when the
    template has both ear regions, else the centre of the bounding box."""
    if all(len(template.regions.get(r, ())) for r in ("left_ear", "right_ear")):
        return 0.5 * (template.verts[template.regions["left_ear"]].mean(0)
                      + template.verts[template.regions["right_ear"]].mean(0))
    return 0.5 * (template.verts.min(0) + template.verts.max(0))


def deformation_basis(template: Template, skin: np.ndarray, cfg
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Smooth low-dimensional displacement basis of the coarse stages.

    ``K`` Gaussian bumps (std ``cfg.basis_width_mm``) centred on a farthest-point subset of the
    skin vertices (spacing ``cfg.basis_spacing_mm``), each displacing vertex ``i`` along the
    direction ``u_i``: from the head centre (``cfg.basis_direction = "radial"``) or the
    template vertex normal (``"normal"``). Bumps are Euclidean (they cross the mouth slit, so
    the lips move together) and the eyeballs are excluded (they move rigidly).

    Returns:
        ``phi (N, K)`` unitless weights (0 on eyeballs), ``u (N, 3)`` unit directions.
    """
    T = template.verts
    c = farthest_point_sampling(T[skin], cfg.basis_spacing_mm)
    centres = T[skin][c]
    d2 = ((T[:, None, :] - centres[None]) ** 2).sum(-1)
    phi = np.exp(-0.5 * d2 / cfg.basis_width_mm ** 2) * skin[:, None]
    if cfg.basis_direction == "radial":
        u = T - head_centre(template)
    elif cfg.basis_direction == "normal":
        u = vertex_normals(torch.as_tensor(T)[None], torch.as_tensor(template.faces))[0].numpy()
    else:
        raise ValueError(f"FitConfig.basis_direction must be 'radial' or 'normal', "
                         f"got {cfg.basis_direction!r}")
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return phi, u


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def neck_weight(template: Template, bands: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Blend weights of the neck articulation, from the template alone.

    Every vertex gets a normalised neck coordinate ``t = d_b / (d_b + d_h)`` (``d_b``: distance
    to the neck boundary loop, region ``boundary``; ``d_h``: distance to the nearest head vertex,
    :data:`HEAD_REGIONS`): 0 on the loop, 1 on the head. ``bands`` piecewise-linear hat
    functions of ``t`` (knots at ``k / bands``; the knot at 0 is fixed, so the loop stays put)
    let the fit choose how the bend spreads along the neck; the last one is 1 on the head.

    Returns:
        ``H (N, bands)`` weights in [0, 1] (rows sum to ``<= 1``), ``pivot (3,)`` template mm:
        on the neck axis (boundary-loop centroid in x, z) at the height of the lowest face
        vertex. Empty ``H (N, 0)`` when the template lacks a ``boundary`` region or head regions.
    """
    v = np.asarray(template.verts, dtype=np.float64)
    n = len(v)
    bnd = template.regions.get("boundary")
    head = np.zeros(n, bool)
    for r in HEAD_REGIONS:
        if r in template.regions:
            head[np.asarray(template.regions[r], np.int64)] = True
    if bnd is None or len(bnd) == 0 or not head.any() or bands < 1:
        return np.zeros((n, 0)), v.mean(0)
    d_b = cKDTree(v[bnd]).query(v)[0]
    d_h = cKDTree(v[head]).query(v)[0]
    t = d_b / np.maximum(d_b + d_h, 1e-9)
    t[head] = 1.0
    knots = np.arange(1, bands + 1) / bands
    H = np.clip(1.0 - np.abs(t[:, None] - knots[None]) * bands, 0.0, 1.0)
    bc = v[bnd].mean(0)
    low = v[template.regions["face"], 1].min() if "face" in template.regions else v[head, 1].min()
    return H, np.array([bc[0], low, bc[2]])


def _mouth_loop(template: Template) -> Optional[np.ndarray]:
    """Vertex ids of the open boundary nearest the lips (the mouth slit), or None."""
    f = np.asarray(template.faces, np.int64)
    v = template.verts
    if "lips" not in template.regions:
        return None
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    u, c = np.unique(e, axis=0, return_counts=True)
    b = u[c == 1]
    if not len(b):
        return None
    n = len(v)
    _, lab = connected_components(coo_matrix((np.ones(len(b)), (b[:, 0], b[:, 1])), shape=(n, n)),
                                  directed=False)
    lips_c = v[template.regions["lips"]].mean(0)
    neck = set(np.asarray(template.regions.get("boundary", []), np.int64).tolist())
    best, out = np.inf, None
    bv = np.unique(b)
    for k in np.unique(lab[bv]):
        lp = bv[lab[bv] == k]
        if len(neck.intersection(lp.tolist())) > len(lp) // 2:
            continue
        d = np.linalg.norm(v[lp].mean(0) - lips_c)
        if d < best:
            best, out = d, lp
    size = np.ptp(v, axis=0).max()
    return out if best < 0.15 * size else None


def jaw_weight(template: Template) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Weight and pivot of the jaw rotation, from the template's mouth slit and regions.

    The lower and upper lip edges of the mouth slit (an open boundary near the lips; the side
    of a slit vertex is where its faces lie) seed two geodesic distance fields ``d_lo, d_up``
    over the mesh graph; the weight is ``smoothstep((d_up - d_lo) / (2 a) + 1/2)`` (1 on the
    lower lip and chin, 0 on the upper lip and nose; ``a`` = 10 % of the ear distance), faded
    out above the mouth line, behind the pivot and down the neck (by the neck coordinate).

    Returns:
        ``(g (N,) in [0, 1], pivot (3,) template mm)`` (pivot: between the ear centroids,
        lowered and moved forward by 10 % of the ear distance), or None without a mouth slit
        or ear regions.
    """
    v = np.asarray(template.verts, dtype=np.float64)
    f = np.asarray(template.faces, np.int64)
    loop = _mouth_loop(template)
    if loop is None or not all(r in template.regions for r in ("left_ear", "right_ear")):
        return None
    n = len(v)
    size = float(np.linalg.norm(v[template.regions["left_ear"]].mean(0)
                                - v[template.regions["right_ear"]].mean(0)))
    a = 0.1 * size
    fy = np.zeros(n)
    cnt = np.zeros(n)
    np.add.at(fy, f.ravel(), np.repeat(v[f].mean(1)[:, 1], 3))
    np.add.at(cnt, f.ravel(), 1.0)
    side = fy[loop] / np.maximum(cnt[loop], 1.0) - v[loop, 1]
    cx = v[loop, 0].mean()
    inner = np.abs(v[loop, 0] - cx) < 0.85 * np.abs(v[loop, 0] - cx).max()
    lower, upper = loop[inner & (side < 0)], loop[inner & (side > 0)]
    if not len(lower) or not len(upper):
        return None
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    e = np.unique(e, axis=0)
    g = coo_matrix((np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1), (e[:, 0], e[:, 1])),
                   shape=(n, n)).tocsr()
    d_up = dijkstra(g, directed=False, indices=upper, min_only=True)
    d_lo = dijkstra(g, directed=False, indices=lower, min_only=True)
    ok = np.isfinite(d_up) & np.isfinite(d_lo)
    diff = np.full(n, -np.inf)
    diff[ok] = d_up[ok] - d_lo[ok]
    w = _smoothstep(diff / (2 * a) + 0.5)
    centre = head_centre(template)
    pivot = centre + np.array([0.0, -0.1, 0.1]) * size
    y_mouth = v[loop, 1].mean()
    w *= _smoothstep((y_mouth + 0.1 * size - v[:, 1]) / (0.1 * size))   # nose and above: 0
    w *= _smoothstep((v[:, 2] - pivot[2]) / (0.2 * size))                # behind the pivot: 0
    H, _ = neck_weight(template, 1)
    if H.shape[1]:
        w *= _smoothstep(2.0 * H[:, 0])                                  # neck base: 0
    return w, pivot


class DeformModel:
    """Holds the fit's parameters and builds ``X`` (template space) and ``V`` (world), see the
    module docstring. All tensors on one device and dtype."""

    def __init__(self, template: Template, T0: Similarity, eyes, phi: np.ndarray, u: np.ndarray,
                 device, dtype, init_verts: Optional[np.ndarray],
                 neck: Tuple[np.ndarray, np.ndarray],
                 jaw: Optional[Tuple[np.ndarray, np.ndarray]], split_pose: bool = False):
        """``eyes``: [(eyeball ids, eyelid-ring ids)]; ``phi, u``: :func:`deformation_basis`;
        ``neck``: :func:`neck_weight`; ``jaw``: :func:`jaw_weight` or None; ``init_verts``:
        ``(N, 3)`` world mm initial mesh (sets basis, offsets, eyes); ``split_pose``: start the
        initial rotation in the neck articulation (see :meth:`_split_pose`)."""
        kw = dict(device=device, dtype=dtype)
        self.T = torch.as_tensor(template.verts, **kw)
        N = template.num_verts
        self.radius = float(np.sqrt(((template.verts - template.verts.mean(0)) ** 2).sum(1).mean()))
        self.eyes = [(torch.as_tensor(e, device=device), torch.as_tensor(r, device=device))
                     for e, r in eyes]
        self.centres = [self.T[e].mean(0) for e, _ in self.eyes]
        skin = torch.ones(N, dtype=torch.bool, device=device)
        for e, _ in self.eyes:
            skin[e] = False
        self.skin = skin
        self.skin_f = skin.to(dtype)[:, None]
        self.nT = vertex_normals(self.T[None], torch.as_tensor(template.faces, device=device))[0]
        self.phi = torch.as_tensor(phi, **kw)
        self.u = torch.as_tensor(u, **kw)
        self.R0 = torch.as_tensor(T0.R, **kw)
        self.s0 = float(T0.scale)
        self.t0 = torch.as_tensor(T0.t, **kw)
        self.coef = torch.zeros(phi.shape[1], **kw)
        self.D = torch.zeros(N, 3, **kw)
        self.omega = torch.zeros(3, **kw)
        self.logs = torch.zeros(3, **kw)
        self.tau = torch.zeros(3, **kw)
        self.eye_a = torch.zeros(len(self.eyes), 3, **kw)
        self.eye_u = torch.zeros(len(self.eyes), 3, **kw)
        self.H = torch.as_tensor(neck[0], **kw)              # (N, K) neck band weights
        self.neck_pivot = torch.as_tensor(neck[1], **kw)
        self.rho = torch.zeros(self.H.shape[1], 3, **kw)     # rotation vector per band (x radius)
        self.jaw_w = None if jaw is None else torch.as_tensor(jaw[0], **kw)
        self.jaw_pivot = None if jaw is None else torch.as_tensor(jaw[1], **kw)
        self.jaw = torch.zeros(3, **kw)                      # jaw rotation vector (x radius)
        if init_verts is not None:
            self._from_mesh(template, T0, init_verts, kw)
        elif split_pose and self.H.shape[1]:
            self._split_pose(T0, kw)

    def _split_pose(self, T0: Similarity, kw) -> None:
        """Move the initial rotation ``R0`` from the global transform into the neck
        articulation (the neck base upright in the world frame, the head keeping its pose):
        band ``k`` starts at ``knot_k * rotvec(R0)``, ``R0 <- I`` and ``t0`` compensates."""
        K = self.H.shape[1]
        r0 = torch.as_tensor(_matrix_to_axis_angle(T0.R), **kw)
        knots = torch.arange(1, K + 1, **kw) / K
        self.rho = knots[:, None] * r0[None] * self.radius
        p = self.neck_pivot * self.s0
        self.t0 = self.t0 + self.R0 @ p - p
        self.R0 = torch.eye(3, **kw)

    def _from_mesh(self, template: Template, T0: Similarity, init_verts: np.ndarray, kw) -> None:
        """Set the basis coefficients (ridge least squares of the offsets along ``u``), the
        free offsets (the remainder) and the eyeball transforms from an initial mesh."""
        X = T0.inverse_apply(init_verts)
        off = (X - template.verts) * self.skin_f.cpu().numpy()
        phi = self.phi.cpu().numpy()
        along = (off * self.u.cpu().numpy()).sum(1)
        A = phi.T @ phi + 1e-3 * np.eye(phi.shape[1])
        coef = np.linalg.solve(A, phi.T @ along)
        self.coef = torch.as_tensor(coef, **kw)
        self.D = torch.as_tensor(off, **kw) - self.basis_offsets()
        for k, (e, _) in enumerate(self.eyes):
            ei = e.cpu().numpy()
            S = similarity_from_correspondences(template.verts[ei], X[ei], with_scale=False)
            c = self.centres[k].cpu().numpy()
            self.eye_a[k] = torch.as_tensor(_matrix_to_axis_angle(S.R) * self.radius, **kw)
            self.eye_u[k] = torch.as_tensor(S.apply(c) - c, **kw)

    def params(self, offsets: bool, basis: bool = True, articulation: bool = True
               ) -> List[torch.Tensor]:
        """The tensors to optimise (global, eyes, [basis], [neck + jaw], [free offsets])."""
        ps = [self.omega, self.logs, self.tau, self.eye_a, self.eye_u]
        if basis:
            ps.append(self.coef)
        if articulation:
            ps += [p for p, on in ((self.rho, self.H.shape[1] > 0),
                                   (self.jaw, self.jaw_w is not None)) if on]
        return ps + [self.D] if offsets else ps

    def basis_offsets(self) -> torch.Tensor:
        """``(N, 3)`` smooth offsets of the basis, template space mm (0 on eyeballs)."""
        return (self.phi @ self.coef)[:, None] * self.u

    def template_space(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(X, B)``: the deformed vertices and the base shape (template + basis offsets,
        jaw), both ``(N, 3)`` template space mm; eyeballs placed by their rigid transforms."""
        B = self.T + self.basis_offsets()
        if self.jaw_w is not None:
            Rj = axis_angle_to_matrix(self.jaw / self.radius)
            rel = B - self.jaw_pivot
            B = B + self.jaw_w[:, None] * (rel @ Rj.T - rel)
        X = B + self.D * self.skin_f
        for k, (e, _) in enumerate(self.eyes):
            R = axis_angle_to_matrix(self.eye_a[k] / self.radius)
            c = self.centres[k]
            X = X.index_copy(0, e, (self.T[e] - c) @ R.T + c + self.eye_u[k])
        return X, B

    def rotation(self) -> torch.Tensor:
        return self.R0 @ axis_angle_to_matrix(self.omega / self.radius)

    def scale_axes(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.logs / self.radius)

    def world(self, X: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` V, world mm (scale, neck articulation, global rigid)."""
        S = self.scale_axes()
        Y = X * S
        if self.H.shape[1]:
            p = self.neck_pivot * S
            Rv = axis_angle_to_matrix(self.H @ (self.rho / self.radius))   # (N, 3, 3)
            Y = (Rv @ (Y - p)[:, :, None])[..., 0] + p
        return Y @ self.rotation().T + self.t0 + self.tau


def _matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    ang = math.acos(cos)
    if ang < 1e-8:
        return np.zeros(3)
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if ang > math.pi - 1e-6:  # near pi: from the symmetric part
        M = (R + np.eye(3)) / 2.0
        axis = np.sqrt(np.clip(np.diag(M), 0.0, None))
        i = int(np.argmax(axis))
        axis = M[:, i] / max(axis[i], 1e-12)
        return axis / np.linalg.norm(axis) * ang
    return w / (2.0 * math.sin(ang)) * ang
