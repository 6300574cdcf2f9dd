"""Optimisation-based non-rigid fitting of the template to one raw scan (issue 9).

Model: :mod:`tempeh.fitting.deform` (template + smooth radial basis + jaw rotation + free
offsets, rigid eyeballs, per-axis scale, a neck articulation that turns the head relative to the
neck base, global rigid transform). The initial similarity (:mod:`tempeh.fitting.rigid`, from an
initial mesh, landmarks or a global search) starts in the neck articulation: the neck base is
upright in the rig frame (prior ``w_upright``) and the head keeps the found pose.

Energy of a stage (all terms mm^2, means over their elements)::

    E = w_s2m  mean_p  GM_sigma(d(scan_p, surface(V))^2)        exact point-to-triangle distance
      + w_m2s  mean_{i covered}  GM_sigma(((V_i - q_i) . n_i)^2)  point-to-plane to the scan
      + w_arap ARAP(X, B)  (region-weighted edges; rotation-invariant: head pose and jaw)
      + w_lap  mean_i  w_i |L D|_i^2  (uniform Laplacian of the free offsets: bending)
      + w_tan  mean_i |D_i - (D_i . n_i) n_i|^2   (optional tangential penalty)
      + w_edge edge_loss(X, B)  (optional, edge vectors)
      + w_basis mean_k c_k^2 + w_eye mean_k (|w_k - mean offset of the eyelid ring|^2 + |a_k|^2)
      + w_articulation |jaw|^2 + w_upright radius^2 |R_global - I|_F^2 / 2

``GM_sigma`` is :func:`tempeh.losses.geman_mcclure` (kind ``"gm"``). The scan->mesh term uses
the exact closest face of every (filtered) scan point, re-found every round. A vertex is
*covered* when its nearest scan point (KD-tree) lies within ``m2s_max_mm`` and the scan normal
there (local PCA) agrees with the vertex normal (``|cos| >= m2s_min_cos``): vertices over holes
get no mesh->scan pull, only the regularisers. Eyeballs move only rigidly; MVS scanners do not
see them, so their translation follows the skin around them. Isolated scan points (mean
distance to their neighbours far above the median) are dropped before fitting and counted in
the stats.

Note: where the scan has no geometric feature, the position of vertices ALONG the surface is
not observable; it is decided by the priors (the radial basis, ARAP, the jaw, the neck base
prior: a neck turning about its own axis looks the same). That sliding, not the
surface fit (scan->mesh median ~0.2 mm at 0.2 mm noise), dominates the vertex error.

Schedule: :class:`FitConfig.stages` (coarse to fine: decreasing regularisation and robust
scale); each stage runs ``outer`` rounds of (re-match mesh->scan, recompute coverage,
``inner`` L-BFGS iterations). Everything runs on the input ``device``; the KD-tree and
libigl closest-face query run on the CPU.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from scipy.spatial import cKDTree

from tempeh.fitting.deform import (DeformModel, deformation_basis, farthest_point_sampling,
                                   jaw_weight, neck_weight)
from tempeh.fitting.energy import (Match, Reg, arap_energy, data_weights, edge_ops,
                                   group_regions, stage_energy)
from tempeh.fitting.rigid import Similarity, global_align, robust_icp, similarity_from_correspondences
from tempeh.geometry.mesh_ops import vertex_normals
from tempeh.geometry.point_to_surface import closest_faces, point_to_surface
from tempeh.geometry.regions import edge_vertex_weights, edge_weights as edge_weights_fn
from tempeh.template import Template

logger = logging.getLogger(__name__)

__all__ = ["FitStage", "FitConfig", "FitResult", "fit_scan", "fit_config_from_dict", "prepare_scan",
           "resolve_device", "arap_energy", "deformation_basis", "farthest_point_sampling",
           "EYEBALL_REGIONS"]

EYEBALL_REGIONS = ("left_eyeball", "right_eyeball")


@dataclass
class FitStage:
    """One stage of the coarse-to-fine schedule (weights are unitless multipliers of mm^2
    terms)."""

    sigma_mm: float
    """Geman-McClure scale of the scan->mesh and mesh->scan terms, mm."""
    w_arap: float = 1.0
    """Weight of the as-rigid-as-possible regulariser of the deformed shape against the base
    shape (template + smooth basis offsets)."""
    w_lap: float = 10.0
    """Weight of the Laplacian (bending) regulariser of the free offsets."""
    w_edge: float = 0.0
    """Weight of the edge-vector regulariser (:func:`tempeh.losses.edge_loss`) against the
    base shape (not rotation invariant; 0 disables)."""
    w_tan: float = 0.0
    """Weight of a penalty on the TANGENTIAL part of the free offsets (along the surface:
    what the scan cannot observe), ``mean |D - (D.n) n|^2`` with template normals ``n``."""
    w_s2m: float = 1.0
    """Weight of the robust scan->mesh point-to-surface term."""
    w_m2s: float = 0.5
    """Weight of the robust mesh->scan point-to-plane term over covered vertices."""
    m2s_max_mm: float = 5.0
    """A vertex is covered when its nearest scan point is closer than this, mm."""
    outer: int = 3
    """Rounds of (re-match, coverage, L-BFGS)."""
    inner: int = 25
    """L-BFGS iterations per round."""
    data_region_weights: Dict[str, float] = field(default_factory=dict)
    """Region group -> weight of the data terms of scan points matched to (and vertices in)
    that region (others 1); e.g. a low neck weight in the rigid stage, since the neck bends
    with the head pose. Groups absent from the template are skipped."""
    optimize_offsets: bool = True
    """Optimise the free per-vertex offsets (False: global rigid + scale, the smooth basis and
    the eyeballs only)."""
    optimize_basis: bool = True
    """Optimise the smooth basis coefficients (False in a pose stage: global similarity, neck,
    jaw and eyeballs only, so the basis does not absorb an open jaw or a head turn)."""


def _default_stages() -> List[FitStage]:
    return [
        FitStage(sigma_mm=10.0, m2s_max_mm=10.0, outer=5, inner=20, optimize_offsets=False,
                 data_region_weights={"neck": 0.1, "boundary": 0.1}),
        FitStage(sigma_mm=5.0, w_arap=10.0, w_lap=100.0, m2s_max_mm=8.0, outer=3, inner=20),
        FitStage(sigma_mm=2.5, w_arap=3.0, w_lap=30.0, m2s_max_mm=5.0, outer=3, inner=25),
        FitStage(sigma_mm=1.5, w_arap=1.0, w_lap=10.0, m2s_max_mm=3.0, outer=3, inner=25),
    ]


@dataclass
class FitConfig:
    """Settings of :func:`fit_scan`. Lengths in mm."""

    stages: List[FitStage] = field(default_factory=_default_stages)
    """The coarse-to-fine schedule, run in order."""
    max_scan_points: int = 20000
    """Random subsample of larger scans (seeded by ``seed``), for speed."""
    outlier_knn: int = 8
    """Neighbours of the isolated-point filter and of the scan normals."""
    outlier_factor: float = 4.0
    """Points whose mean distance to their ``outlier_knn`` neighbours exceeds this multiple of
    the median of that statistic are dropped as isolated outliers (<= 0 disables)."""
    m2s_min_cos: float = 0.7
    """Minimum ``|cos|`` between vertex normal and scan normal for a covered vertex."""
    edge_weights: Dict[str, float] = field(default_factory=lambda: {
        "face": 1.0, "ears": 1.0, "eye_region": 2.0, "lips": 1.0, "neck": 1.0, "nostrils": 2.0,
        "scalp": 1.0, "boundary": 2.0})
    """Region group -> weight of the edge regulariser (see :mod:`tempeh.geometry.regions`;
    groups absent from the template are skipped)."""
    basis_spacing_mm: float = 30.0
    """Spacing of the centres of the smooth displacement basis, template mm."""
    basis_width_mm: float = 50.0
    """Std of each Gaussian basis bump, mm."""
    basis_direction: str = "radial"
    """Displacement direction of the basis: ``"radial"`` (from the head centre, the midpoint
    of the ears) or ``"normal"`` (template vertex normals)."""
    w_basis: float = 1e-3
    """Ridge weight on the basis coefficients (mm^2), keeps unseen parts near the template."""
    w_eye: float = 10.0
    """Weight of the eyeball prior (translation follows the eyelid ring, small rotation)."""
    eye_ring_factor: float = 1.6
    """Eyelid ring of an eyeball: skin vertices within this multiple of its radius from its
    centre (template space)."""
    align_yaws: Tuple[float, ...] = (-90.0, -60.0, -30.0, 0.0, 30.0, 60.0, 90.0)
    """Yaw candidates of the global search (degrees), used without init mesh or landmarks."""
    align_pitches: Tuple[float, ...] = (-20.0, 0.0, 20.0)
    """Pitch candidates of the global search (degrees)."""
    landmark_icp_iterations: int = 15
    """Robust ICP iterations after a landmark alignment (0: trust the landmarks)."""
    init_skip_stages: int = 1
    """Stages skipped when an initial mesh is given (it is already close)."""
    history_size: int = 20
    """L-BFGS memory."""
    num_threads: int = 0
    """torch intra-op threads during the fit (restored afterwards); 0 keeps the current
    setting. 1 is fastest for small templates on a busy machine."""
    dtype: str = "float64"
    """Optimisation dtype, ``"float64"`` or ``"float32"``."""
    seed: int = 0
    """Seeds the scan subsample and the alignment search."""
    neck_bands: int = 3
    """Bands of the neck articulation (:func:`tempeh.fitting.deform.neck_weight`): the head
    turns relative to the neck base with a bend profile of this many pieces; 0 disables."""
    jaw: bool = True
    """Fit a jaw rotation (:func:`tempeh.fitting.deform.jaw_weight`; needs a mouth slit)."""
    w_articulation: float = 1e-4
    """Ridge weight on the jaw rotation parameters (mm^2 units, see the model)."""
    w_upright: float = 1e-2
    """Weight of the neck-base prior ``radius^2 |R_global - I|_F^2 / 2`` (mm^2): the subject's
    torso faces the rig front (template frame: y up, face towards +z, the assumption the global
    search also makes), so a head turn goes into the neck articulation; the scan cannot tell
    (a neck is close to a cylinder about its own axis). With it, the initial rotation starts
    in the articulation. 0 disables (and keeps the initial rotation global); not used with an
    initial mesh (its pose is kept as given)."""


@dataclass
class FitResult:
    """Output of :func:`fit_scan`."""

    verts: np.ndarray
    """(N, 3) float64 fitted vertices, world (scan frame), mm, template topology."""
    stats: Dict[str, object]
    """Diagnostics: ``align`` (method), ``scan_points``, ``filtered_points``,
    ``s2m_median_mm`` / ``s2m_mean_mm`` (final scan->mesh distances of the kept points),
    ``covered_fraction``, ``scale_axes``, ``neck_rotation_deg`` (per band, the head turn
    relative to the neck base in the last one), ``jaw_rotation_deg``, ``time_s``, per-stage
    ``stages`` entries."""
    transform: Similarity
    """The initial similarity (template -> scan) found by the alignment step."""


def resolve_device(device=None) -> torch.device:
    """``None | "auto" | "cpu" | "cuda" | torch.device`` -> a torch.device (auto: CUDA when
    available)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------- scan prep
def prepare_scan(scan: np.ndarray, cfg: FitConfig) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """Subsample, drop isolated outliers and estimate unoriented normals.

    Args:
        scan: ``(P, 3)`` world mm.
    Returns:
        ``points (Q, 3)`` mm, ``normals (Q, 3)`` unit (sign arbitrary), counts dict
        (``scan_points``, ``filtered_points``).
    Raises:
        ValueError: non-finite points or fewer than ``outlier_knn + 1`` points.
    """
    pts = np.asarray(scan, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"scan must be (P, 3), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"scan has {int((~np.isfinite(pts).all(1)).sum())} non-finite points")
    k = int(cfg.outlier_knn)
    if len(pts) < max(k + 1, 10):
        raise ValueError(f"scan has only {len(pts)} points")
    n_in = len(pts)
    if len(pts) > cfg.max_scan_points:
        rng = np.random.default_rng(cfg.seed)
        pts = pts[np.sort(rng.choice(len(pts), cfg.max_scan_points, replace=False))]
    tree = cKDTree(pts)
    dist, nb = tree.query(pts, k=k + 1)
    if cfg.outlier_factor > 0:
        md = dist[:, 1:].mean(1)
        keep = md <= cfg.outlier_factor * np.median(md)
    else:
        keep = np.ones(len(pts), bool)
    nbp = pts[nb]  # (Q, k+1, 3), the point itself included
    cen = nbp - nbp.mean(1, keepdims=True)
    cov = np.einsum("qki,qkj->qij", cen, cen)
    _, vecs = np.linalg.eigh(cov)
    normals = vecs[:, :, 0]
    counts = {"scan_points": int(n_in), "used_points": int(keep.sum()),
              "filtered_points": int((~keep).sum())}
    return pts[keep], normals[keep], counts


# ------------------------------------------------------------------------------- alignment
def _initial_transform(scan: np.ndarray, template: Template, cfg: FitConfig,
                       init_verts: Optional[np.ndarray], landmarks, skin: np.ndarray
                       ) -> Tuple[Similarity, str, float]:
    tv = template.verts
    if init_verts is not None:
        T = similarity_from_correspondences(tv[skin], init_verts[skin])
        return T, "init_mesh", float("nan")
    sub = scan
    if len(sub) > 4000:
        sub = sub[np.random.default_rng(cfg.seed).choice(len(sub), 4000, replace=False)]
    if landmarks is not None:
        pts, ids = landmarks
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(pts) != len(ids) or len(ids) < 3:
            raise ValueError(f"landmarks: need >= 3 points with matching vertex ids, got "
                             f"{len(pts)} points and {len(ids)} ids")
        if ids.min() < 0 or ids.max() >= template.num_verts:
            raise ValueError(f"landmarks: vertex id out of range [0, {template.num_verts})")
        T = similarity_from_correspondences(tv[ids], pts)
        cost = float("nan")
        if cfg.landmark_icp_iterations > 0:
            T, cost = robust_icp(sub, tv, template.faces, T, iterations=cfg.landmark_icp_iterations,
                                 sigma=(8.0, 3.0), trim=0.9, vertex_mask=skin)
        return T, "landmarks", cost
    T, cost = global_align(sub, tv, template.faces, yaws=cfg.align_yaws,
                           pitches=cfg.align_pitches, vertex_mask=skin,
                           rng=np.random.default_rng(cfg.seed))
    return T, "global_search", cost


def _eyeballs(template: Template, cfg: FitConfig) -> List[Tuple[np.ndarray, np.ndarray]]:
    """[(eyeball vertex ids, eyelid-ring skin vertex ids)] for the eyeballs the template has."""
    out = []
    eye_all = np.zeros(template.num_verts, bool)
    for name in EYEBALL_REGIONS:
        if name in template.regions:
            eye_all[template.regions[name]] = True
    for name in EYEBALL_REGIONS:
        idx = template.regions.get(name)
        if idx is None or len(idx) < 3:
            continue
        c = template.verts[idx].mean(0)
        rad = np.linalg.norm(template.verts[idx] - c, axis=1).max()
        d = np.linalg.norm(template.verts - c, axis=1)
        ring = np.nonzero((d <= cfg.eye_ring_factor * rad) & ~eye_all)[0]
        if len(ring) == 0:
            ring = np.argsort(np.where(eye_all, np.inf, d))[:8]
        out.append((np.asarray(idx, np.int64), ring.astype(np.int64)))
    return out


def fit_scan(scan: np.ndarray, template: Template, cfg: Optional[FitConfig] = None,
             init_verts: Optional[np.ndarray] = None,
             landmarks: Optional[Tuple[np.ndarray, np.ndarray]] = None,
             device=None) -> FitResult:
    """Fit the template to one raw scan (noisy points, holes, outliers).

    Args:
        scan: ``(P, 3)`` scan points, world mm.
        template: the registration template (mm, with regions; eyeballs optional).
        cfg: settings (default :class:`FitConfig`).
        init_verts: ``(N, 3)`` world mm initial mesh in template topology (a coarse-model
            prediction or the previous frame's fit); the alignment is taken from it and the
            first ``cfg.init_skip_stages`` stages are skipped.
        landmarks: ``(points (K, 3) world mm, template vertex ids (K,))``, K >= 3, used for the
            alignment when no ``init_verts`` is given.
        device: ``None | "auto" | "cpu" | "cuda"`` (default: CPU unless CUDA is available).
    Returns:
        :class:`FitResult` (verts ``(N, 3)`` world mm).
    Raises:
        ValueError: bad shapes, non-finite input, too few points or landmarks.
    """
    cfg = cfg or FitConfig()
    if cfg.num_threads and cfg.num_threads > 0:
        prev = torch.get_num_threads()
        torch.set_num_threads(int(cfg.num_threads))
        try:
            return _fit(scan, template, cfg, init_verts, landmarks, device)
        finally:
            torch.set_num_threads(prev)
    return _fit(scan, template, cfg, init_verts, landmarks, device)


def _fit(scan, template: Template, cfg: FitConfig, init_verts, landmarks, device) -> FitResult:
    t_start = time.perf_counter()
    dev = resolve_device(device)
    if cfg.dtype not in ("float64", "float32"):
        raise ValueError(f"FitConfig.dtype must be 'float64' or 'float32', got {cfg.dtype!r}")
    if not cfg.stages:
        raise ValueError("FitConfig.stages is empty")
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    N = template.num_verts
    if init_verts is not None:
        init_verts = np.asarray(init_verts, dtype=np.float64)
        if init_verts.shape != (N, 3) or not np.all(np.isfinite(init_verts)):
            raise ValueError(f"init_verts must be finite ({N}, 3), got {init_verts.shape}")
    pts, nrm, counts = prepare_scan(scan, cfg)
    eyes = _eyeballs(template, cfg)
    skin_np = np.ones(N, bool)
    for e, _ in eyes:
        skin_np[e] = False
    T0, how, align_cost = _initial_transform(pts, template, cfg, init_verts, landmarks, skin_np)
    phi, u = deformation_basis(template, skin_np, cfg)
    neck = neck_weight(template, cfg.neck_bands)
    jaw = jaw_weight(template) if cfg.jaw else None
    model = DeformModel(template, T0, eyes, phi, u, dev, dtype, init_verts, neck, jaw,
                        split_pose=cfg.w_upright > 0)

    faces_t = torch.as_tensor(template.faces, device=dev, dtype=torch.long)
    scan_t = torch.as_tensor(pts, device=dev, dtype=dtype)[None]
    tree = cKDTree(pts)
    edges, deg = edge_ops(template.faces, skin_np, dev, dtype)
    ew_groups = {g: w for g, w in cfg.edge_weights.items()
                 if all(r in template.regions for r in group_regions(g))}
    vw = edge_vertex_weights(template.regions, ew_groups, template.faces, N, dtype=torch.float64)
    reg = Reg(edges=edges, ew=edge_weights_fn(vw, edges.cpu()).to(device=dev, dtype=dtype),
               deg=deg, lap_w=vw.to(device=dev, dtype=dtype), w_eye=cfg.w_eye,
               w_basis=cfg.w_basis, w_art=cfg.w_articulation,
              w_upright=cfg.w_upright if init_verts is None else 0.0)

    stages = list(cfg.stages)
    if init_verts is not None:
        stages = stages[min(cfg.init_skip_stages, len(stages) - 1):]
    stage_stats = []
    covered_frac = 0.0
    for si, st in enumerate(stages):
        t0 = time.perf_counter()
        params = model.params(st.optimize_offsets, basis=st.optimize_basis)
        dw = data_weights(template, st.data_region_weights, dev, dtype)
        for p in params:
            p.requires_grad_(True)
        for _ in range(st.outer):
            # re-match: mesh->scan nearest points and coverage, scan->mesh closest faces
            with torch.no_grad():
                V = model.world(model.template_space()[0])
                vn = vertex_normals(V[None], faces_t)[0]
                fidx = closest_faces(scan_t, V[None], faces_t)[0]
            dn, jn = tree.query(V.cpu().numpy())
            cos = np.abs((vn.cpu().numpy() * nrm[jn]).sum(1))
            cov = (dn < st.m2s_max_mm) & (cos >= cfg.m2s_min_cos) & skin_np
            covered_frac = float(cov[skin_np].mean())
            tri = faces_t[fidx]
            match = Match(tri=tri, cov=torch.as_tensor(np.nonzero(cov)[0], device=dev),
                           q=torch.as_tensor(pts[jn[cov]], device=dev, dtype=dtype),
                           qn=torch.as_tensor(nrm[jn[cov]], device=dev, dtype=dtype),
                           w_pts=None, w_cov=None)
            if dw is not None:
                match.w_pts = dw[tri].mean(1)
                match.w_cov = dw[match.cov]
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=st.inner,
                                    history_size=cfg.history_size, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-9, tolerance_change=1e-12)

            def closure():
                opt.zero_grad()
                loss = sum(stage_energy(model, st, scan_t, match, reg).values())
                loss.backward()
                return loss

            opt.step(closure)
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            terms = stage_energy(model, st, scan_t, match, reg)
        stage_stats.append({"stage": si, "time_s": time.perf_counter() - t0,
                            "covered_fraction": covered_frac,
                            **{k: float(v) for k, v in terms.items()}})
        logger.debug("stage %d: %s", si, stage_stats[-1])

    with torch.no_grad():
        V = model.world(model.template_space()[0])
        d, _ = point_to_surface(scan_t, V[None], faces_t)
    d = d[0].cpu().numpy()
    verts = V.cpu().numpy().astype(np.float64)
    stats = {"align": how, "align_cost": align_cost, **counts,
             "s2m_median_mm": float(np.median(d)), "s2m_mean_mm": float(np.mean(d)),
             "covered_fraction": covered_frac, "basis_size": int(phi.shape[1]),
             "scale_axes": model.scale_axes().cpu().tolist(),
             "neck_rotation_deg": [math.degrees(float(r.norm()) / model.radius)
                                   for r in model.rho.cpu()],
             "jaw_rotation_deg": math.degrees(float(model.jaw.norm()) / model.radius),
             "stages": stage_stats, "time_s": time.perf_counter() - t_start,
             "device": str(dev)}
    return FitResult(verts=verts, stats=stats, transform=T0)


def fit_config_from_dict(data: dict, source: str = "<dict>") -> FitConfig:
    """Build a :class:`FitConfig` from plain data (YAML/JSON): the given keys override the
    defaults; ``stages`` (if given) is a list of :class:`FitStage` mappings that REPLACES the
    default schedule. Unknown keys and wrong types raise ConfigError naming the key and
    ``source``."""
    import dataclasses

    from tempeh.errors import ConfigError

    def build(cls, d, prefix):
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: '{prefix or 'config'}' must be a mapping, got {d!r}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
                              f"(known: {', '.join(names)})")
        kw = {}
        defaults = cls(sigma_mm=1.0) if cls is FitStage else cls()
        for k, v in d.items():
            if k == "stages" and cls is FitConfig:
                if not isinstance(v, list) or not v:
                    raise ConfigError(f"{source}: 'stages' must be a non-empty list of mappings")
                kw[k] = [build(FitStage, s, f"stages[{i}].") for i, s in enumerate(v)]
                continue
            ref = getattr(defaults, k)
            kw[k] = _coerce(v, ref, prefix + k, source)
        try:
            return cls(**kw)
        except TypeError as err:
            raise ConfigError(f"{source}: {prefix or 'config'}: {err}") from None

    return build(FitConfig, data or {}, "")


def _coerce(v, ref, key: str, source: str):
    from tempeh.errors import ConfigError

    bad = ConfigError(f"{source}: key '{key}' expects {type(ref).__name__}, got {v!r}")
    if isinstance(ref, bool):
        if not isinstance(v, bool):
            raise bad
        return v
    if isinstance(ref, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
        return v
    if isinstance(ref, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        return float(v)
    if isinstance(ref, str):
        if not isinstance(v, str):
            raise bad
        return v
    if isinstance(ref, tuple):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) for x in v):
            raise bad
        return tuple(float(x) for x in v)
    if isinstance(ref, dict):
        if not isinstance(v, dict) or not all(isinstance(x, (int, float)) for x in v.values()):
            raise bad
        return {str(a): float(b) for a, b in v.items()}
    raise bad
