"""Subject identity, expression and head-pose variation for any head template with named regions.

Works on the procedural head (:func:`tempeh.synth.head.make_head_template`) and on FLAME-topology
templates alike: every field is built from region geometry (region centroids, the mouth opening,
the neck boundary loop), never from vertex indices or counts. Frame: FLAME-like world, mm, y up,
the face towards +z, x towards the subject's left.

Required regions: ``face, lips, left_ear, right_ear, left_eye_region, right_eye_region,
boundary``; ``left_eyeball``/``right_eyeball`` are optional (kept rigid when present; only mask
components mostly inside the mask count, so stray eyelid vertices in a mask stay skin).

Order of operations in :meth:`VariationModel.apply` (all numpy float64, vectorised):

1. identity: per-axis scale about the head centre (midpoint of the ear centroids) and a sum of
   random Gaussian RBF bumps along the radial direction from the head centre; eyeballs are only
   translated (by the identity map of their centre plus the mean bump of their eye region);
2. expressions (see :data:`EXPRESSIONS` and :class:`VariationRanges` for units and ranges);
3. gaze: each eyeball rotates about its own centre;
4. head pose: rotation ``R = R_y(yaw) @ R_x(pitch) @ R_z(roll)`` about the neck pivot, blended
   per vertex (axis-angle scaled by a weight that is 0 on the neck boundary loop and 1 on the
   face, scalp, ears and eyes), then the translation is added to EVERY vertex (it places the
   subject in the capture volume; the neck base moves with it).

Angle conventions: yaw > 0 turns the face from +z towards +x (the subject's left); pitch > 0
nods the face down (towards -y); roll > 0 rotates about +z (right-hand rule, the top of the head
towards -x). Gaze ``(yaw, pitch)`` degrees: yaw like the head, pitch > 0 looks up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree

from tempeh.template import Template

logger = logging.getLogger(__name__)

#: Expression controls, in the order used by sequences. Units and default ranges:
#: ``jaw_open``: chin displacement, mm, [0, 25] (rotation about a jaw axis below the ears);
#: ``smile``: mouth corners up 5 mm / back 3 mm at 1, [-0.5, 1];
#: ``pucker``: lips forward 7 mm and pulled 35 % towards the midline at 1, [0, 1];
#: ``brow_raise``: brows up 6 mm at 1, [-0.5, 1];
#: ``eye_close``: upper eyelids down 5 mm and over the eyeball front at 1 (both eyes), [0, 1];
#: ``cheek_puff``: cheeks out 6 mm along the normal at 1, [0, 1].
EXPRESSIONS: Tuple[str, ...] = ("jaw_open", "smile", "pucker", "brow_raise", "eye_close", "cheek_puff")

_REQUIRED = ("face", "lips", "left_ear", "right_ear", "left_eye_region", "right_eye_region", "boundary")
#: Reference ear-to-ear distance (FLAME), mm: every length below is scaled by size / this.
_REF_SIZE = 156.0


@dataclass
class VariationRanges:
    """Ranges of the per-frame parameters of :meth:`VariationModel.sample_sequence`."""

    expression: Dict[str, Tuple[float, float]] = field(default_factory=lambda: {
        "jaw_open": (0.0, 25.0), "smile": (-0.5, 1.0), "pucker": (0.0, 1.0),
        "brow_raise": (-0.5, 1.0), "eye_close": (0.0, 1.0), "cheek_puff": (0.0, 1.0)})
    """expression name -> (min, max); units as in :data:`EXPRESSIONS`."""
    expression_probability: float = 0.5
    """chance that an expression is active at a keyframe (else it is 0, clipped into range)."""
    yaw: Tuple[float, float] = (-60.0, 60.0)
    """degrees."""
    pitch: Tuple[float, float] = (-30.0, 30.0)
    """degrees."""
    roll: Tuple[float, float] = (-15.0, 15.0)
    """degrees."""
    translation: float = 100.0
    """max absolute translation per axis, mm."""
    gaze: float = 15.0
    """max absolute gaze yaw / pitch, degrees."""
    key_interval: int = 12
    """frames between random keyframes (monotone cubic interpolation in between)."""


@dataclass
class SubjectParams:
    """Identity of one synthetic subject."""

    scale: np.ndarray
    """(3,) per-axis scale factors about the head centre (about 1 +- 0.08)."""
    bump_centres: np.ndarray
    """(K, 3) RBF centres on the template surface, mm."""
    bump_widths: np.ndarray
    """(K,) Gaussian sigmas, mm."""
    bump_amplitudes: np.ndarray
    """(K,) radial displacement amplitudes, mm."""


@dataclass
class FrameParams:
    """Expression and pose of one frame."""

    expression: Dict[str, float] = field(default_factory=dict)
    """name -> value (missing names are 0); units as in :data:`EXPRESSIONS`."""
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    """(3,) world translation, mm."""
    gaze: np.ndarray = field(default_factory=lambda: np.zeros(2))
    """(2,) eyeball (yaw, pitch), degrees."""


# ---------------------------------------------------------------------------------------------
# small numeric helpers
# ---------------------------------------------------------------------------------------------


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ramp(t: np.ndarray, a: float = 0.2) -> np.ndarray:
    """C1 ramp 0 -> 1 on [0, 1]: quadratic ease over [0, a] and [1 - a, 1], linear in between
    (max slope 1 / (1 - a), gentler than smoothstep's 1.5)."""
    t = np.clip(t, 0.0, 1.0)
    m = 1.0 / (1.0 - a)
    lo = 0.5 * m / a * t * t
    hi = 1.0 - 0.5 * m / a * (1.0 - t) ** 2
    return np.where(t < a, lo, np.where(t > 1.0 - a, hi, m * (t - 0.5 * a)))


def _wendland(r: np.ndarray) -> np.ndarray:
    """Compactly supported C2 kernel: 1 at r = 0, 0 for r >= 1."""
    r = np.clip(r, 0.0, 1.0)
    return (1.0 - r) ** 4 * (4.0 * r + 1.0)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``R = R_y(yaw) @ R_x(pitch) @ R_z(roll)`` (degrees, column vectors). (3, 3)."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    Ry = np.array([[np.cos(y), 0.0, np.sin(y)], [0.0, 1.0, 0.0], [-np.sin(y), 0.0, np.cos(y)]])
    Rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(p), -np.sin(p)], [0.0, np.sin(p), np.cos(p)]])
    Rz = np.array([[np.cos(r), -np.sin(r), 0.0], [np.sin(r), np.cos(r), 0.0], [0.0, 0.0, 1.0]])
    return Ry @ Rx @ Rz


def _matrix_to_rotvec(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) axis * angle (angle < pi)."""
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    s = np.linalg.norm(w)
    if s < 1e-12:
        return np.zeros(3)
    return w / s * angle


def _rotate_rodrigues(p: np.ndarray, rotvec: np.ndarray) -> np.ndarray:
    """Rotate points p (P, 3) by per-point rotation vectors (P, 3) (or one (3,)) about the origin."""
    rotvec = np.broadcast_to(rotvec, p.shape)
    angle = np.linalg.norm(rotvec, axis=-1, keepdims=True)
    k = np.divide(rotvec, angle, out=np.zeros_like(rotvec), where=angle > 1e-15)
    c, s = np.cos(angle), np.sin(angle)
    kxp = np.cross(k, p)
    kdp = (k * p).sum(-1, keepdims=True)
    return p * c + kxp * s + k * kdp * (1.0 - c)


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (N, 3), unit; coincident vertices share their normal."""
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    np.add.at(n, f.ravel(), np.repeat(fn, 3, axis=0))
    _, inv = np.unique(np.round(v, 6), axis=0, return_inverse=True)
    inv = inv.ravel()
    welded = np.zeros((inv.max() + 1, 3))
    np.add.at(welded, inv, n)
    n = welded[inv]
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _edges(f: np.ndarray) -> np.ndarray:
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0)


def _boundary_loops(f: np.ndarray, n: int) -> List[np.ndarray]:
    """Vertex index sets of the open-boundary components (edges used by exactly one face)."""
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    u, c = np.unique(e, axis=0, return_counts=True)
    b = u[c == 1]
    if b.size == 0:
        return []
    g = coo_matrix((np.ones(len(b)), (b[:, 0], b[:, 1])), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    bv = np.unique(b)
    return [bv[lab[bv] == k] for k in np.unique(lab[bv])]


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


class VariationModel:
    """Identity, expression, gaze and pose variation of a head template.

    Args:
        template: a :class:`Template` in mm with the regions listed in the module docstring.
    """

    #: graph-smoothing iterations of the jaw weight
    smoothing_iterations = 30

    def __init__(self, template: Template):
        missing = [r for r in _REQUIRED if r not in template.regions or len(template.regions[r]) == 0]
        if missing:
            raise ValueError(f"VariationModel: template '{template.name}' lacks region(s) "
                             f"{', '.join(missing)} (needs {', '.join(_REQUIRED)})")
        self.template = template
        v = np.asarray(template.verts, dtype=np.float64)
        f = np.asarray(template.faces, dtype=np.int64)
        self.verts0 = v
        n = v.shape[0]
        reg = {k: np.asarray(i, dtype=np.int64) for k, i in template.regions.items()}
        cen = {k: v[i].mean(axis=0) for k, i in reg.items() if len(i)}

        # eyeballs (rigid): the connected mesh components that lie (mostly) inside an eyeball
        # mask; stray mask vertices on the skin (FLAME's masks hold a few eyelid vertices) stay
        # deformable skin
        e_all = _edges(f)
        _, comp = connected_components(
            coo_matrix((np.ones(len(e_all)), (e_all[:, 0], e_all[:, 1])), shape=(n, n)), directed=False)
        self.eyeballs: List[np.ndarray] = []
        self.eyeball_names: List[str] = []
        for name in ("left_eyeball", "right_eyeball"):
            if name not in reg or not len(reg[name]):
                continue
            inmask = np.zeros(n, bool)
            inmask[reg[name]] = True
            frac = np.bincount(comp, weights=inmask) / np.bincount(comp)
            # whole components: FLAME's eyeballs also hold a few vertices missing from the mask
            rigid = np.nonzero(frac[comp] > 0.9)[0]
            if rigid.size:
                self.eyeballs.append(rigid)
                self.eyeball_names.append(name)
        self.eye_mask = np.zeros(n, bool)
        for i in self.eyeballs:
            self.eye_mask[i] = True
        skin = ~self.eye_mask

        ear_l, ear_r = cen["left_ear"], cen["right_ear"]
        self.size = float(np.linalg.norm(ear_l - ear_r))
        k = self.size / _REF_SIZE
        self.k = k
        self.centre = 0.5 * (ear_l + ear_r)                               # head centre, mm
        self.radial = v - self.centre
        self.radial /= np.maximum(np.linalg.norm(self.radial, axis=1, keepdims=True), 1e-9)
        normals = _vertex_normals(v, f)
        lips_c = cen["lips"]
        eye_c = [cen["left_eye_region"], cen["right_eye_region"]]
        face_idx = reg["face"]

        # ----- jaw: rotation about an x axis through a pivot below/in front of the ears -----
        self.jaw_pivot = self.centre + np.array([0.0, -13.0, 16.0]) * k
        near_mid = face_idx[np.abs(v[face_idx, 0] - lips_c[0]) < 12.0 * k]
        self.chin_index = int(near_mid[np.argmin(v[near_mid, 1])])
        w_mouth = self._lower_face_score(v, f, reg, lips_c)
        w_front = _smoothstep((v[:, 2] - self.jaw_pivot[2]) / (32.0 * k))
        y_chin = v[self.chin_index, 1]
        w_neck = _smoothstep((v[:, 1] - (y_chin - 40.0 * k)) / (32.0 * k))
        self.w_jaw = np.where(skin, w_mouth * w_front * w_neck, 0.0)
        self.chin_lever = float(np.linalg.norm((v[self.chin_index] - self.jaw_pivot)[1:]))

        # ----- linear expression bases: (N, 3) displacement at control value 1 -----
        self.basis: Dict[str, np.ndarray] = {}
        # smile: mouth corners up/back (and slightly outwards)
        lips_i = reg["lips"]
        half_w = float(np.max(np.abs(v[lips_i, 0] - lips_c[0])))
        corners = []
        for s in (1.0, -1.0):
            cand = lips_i[np.argsort(-s * (v[lips_i, 0] - lips_c[0]))[:3]]
            corners.append(v[cand].mean(axis=0))
        b = np.zeros((n, 3))
        for s, c in zip((1.0, -1.0), corners):
            w = _wendland(np.linalg.norm(v - c, axis=1) / (28.0 * k))
            b += w[:, None] * np.array([1.5 * s, 5.0, -3.0]) * k
        self.basis["smile"] = b
        # pucker: lips forward and towards the midline
        d = (v - lips_c) / (np.array([half_w + 8.0 * k, 22.0 * k, 25.0 * k]))
        w = _wendland(np.linalg.norm(d, axis=1))
        b = np.zeros((n, 3))
        b[:, 0] = -0.35 * (v[:, 0] - lips_c[0])
        b[:, 2] = 7.0 * k
        self.basis["pucker"] = b * w[:, None]
        # brow raise: above each eye region
        b = np.zeros((n, 3))
        for c in eye_c:
            d = (v - (c + np.array([0.0, 16.0, 0.0]) * k)) / (np.array([32.0, 26.0, 25.0]) * k)
            b[:, 1] += 6.0 * k * _wendland(np.linalg.norm(d, axis=1))
        self.basis["brow_raise"] = b
        # eye close: upper lid down (lower lid slightly up), then (in apply) everything over the
        # eyeball disk is pushed onto the eyeball front; footprints are in the image (x, y) plane
        b = np.zeros((n, 3))
        self.eye_support = []
        for i, c in enumerate(eye_c):
            if len(self.eyeballs) == 2:
                c = v[self.eyeballs[i]].mean(axis=0)
                rad = float(np.linalg.norm(v[self.eyeballs[i]] - c, axis=1).mean())
            else:
                rad = 12.0 * k
            d = (v[:, :2] - c[:2]) / (np.array([22.0, 16.0]) * k)
            gate = _smoothstep((v[:, 2] - c[2] + 0.5 * rad) / (0.5 * rad))
            sup = _wendland(np.linalg.norm(d, axis=1)) * gate
            upper = _smoothstep((v[:, 1] - c[1] + 5.0 * k) / (10.0 * k))
            b[:, 1] += sup * (-5.0 * k * upper + 1.0 * k * (1.0 - upper))
            r_xy = np.linalg.norm(v[:, :2] - c[:2], axis=1)
            push = _smoothstep((1.5 * rad - r_xy) / (0.5 * rad)) * gate
            self.eye_support.append(np.where(skin, push, 0.0))
        self.basis["eye_close"] = b
        # cheek puff: along the normal at the cheeks
        b = np.zeros((n, 3))
        for s in (1.0, -1.0):
            ear = ear_l if s > 0 else ear_r
            target = np.array([lips_c[0] + 0.5 * (ear[0] - lips_c[0]),
                               0.5 * (lips_c[1] + 0.5 * (eye_c[0][1] + eye_c[1][1])) - 5.0 * k])
            fi = face_idx[np.argmin(np.linalg.norm(v[face_idx, :2] - target, axis=1))]
            w = _wendland(np.linalg.norm(v - v[fi], axis=1) / (30.0 * k))
            b += w[:, None] * normals * 6.0 * k
        self.basis["cheek_puff"] = b
        for name in self.basis:
            self.basis[name][~skin] = 0.0

        # ----- pose: weight 0 on the neck boundary loop, 1 on face/scalp/ears/eyes -----
        bnd = reg["boundary"]
        dist = cKDTree(v[bnd]).query(v)[0]
        keep = np.zeros(n, bool)
        for name in ("face", "scalp", "left_ear", "right_ear", "left_eye_region", "right_eye_region",
                     "left_eyeball", "right_eyeball", "lips", "nostrils"):
            if name in reg:
                keep[reg[name]] = True
        d1 = float(dist[keep].min())
        if d1 < 10.0 * k:
            raise ValueError(f"VariationModel: template '{template.name}': the face/scalp come within "
                             f"{d1:.1f} mm of the boundary loop; cannot blend the neck")
        # normalised position between the boundary loop (0) and the nearest rigid vertex (1):
        # uses the full neck length on every side (the front of the neck is shorter than the back)
        d_keep = cKDTree(v[keep]).query(v)[0]
        self.w_pose = _ramp(dist / np.maximum(dist + d_keep, 1e-9))
        self.w_pose[self.eye_mask] = 1.0
        # pivot on the neck axis (boundary-loop centroid in x, z) at chin height: keeps the
        # displacement of the neck front small for pitch and of the neck sides small for yaw
        bc = v[bnd].mean(axis=0)
        self.pose_pivot = np.array([bc[0], v[self.chin_index, 1], bc[2]])

    # -----------------------------------------------------------------------------------------
    def _lower_face_score(self, v: np.ndarray, f: np.ndarray, reg: Dict[str, np.ndarray],
                          lips_c: np.ndarray) -> np.ndarray:
        """(N,) weight in [0, 1]: 1 below the mouth (lower lip, chin), 0 above (upper lip, nose).

        With a mouth opening (a boundary loop near the lips centroid) the weight comes from
        graph distances to the loop's upper and lower chains, so lips that touch or share
        positions are separated by topology; without one it falls back to height."""
        k = self.k
        loops = _boundary_loops(f, v.shape[0])
        bset = set(np.asarray(reg["boundary"]).tolist())
        mouth = None
        best = np.inf
        for lp in loops:
            if len(bset.intersection(lp.tolist())) > len(lp) // 2:
                continue
            dc = np.linalg.norm(v[lp].mean(axis=0) - lips_c)
            if dc < best and dc < 25.0 * k:
                best, mouth = dc, lp
        if mouth is None:
            logger.info("template has no mouth opening: jaw weight from height only")
            return _smoothstep((lips_c[1] - v[:, 1]) / (16.0 * k) + 0.5)
        # mid-line of the mouth opening: y = a + b x^2 (least squares)
        x = v[mouth, 0] - lips_c[0]
        A = np.stack([np.ones_like(x), x * x], axis=1)
        coef = np.linalg.lstsq(A, v[mouth, 1], rcond=None)[0]
        rel = v[mouth, 1] - A @ coef
        # degenerate (zero-width) slit: decide by the side of the incident faces
        fc_y = np.zeros(v.shape[0])
        cnt = np.zeros(v.shape[0])
        np.add.at(fc_y, f.ravel(), np.repeat(v[f].mean(axis=1)[:, 1], 3))
        np.add.at(cnt, f.ravel(), 1.0)
        side = fc_y[mouth] / np.maximum(cnt[mouth], 1.0) - v[mouth, 1]
        rel = np.where(np.abs(rel) > 0.5, rel, side)
        inner = np.abs(x) < 0.85 * np.abs(x).max()
        upper, lower = mouth[inner & (rel > 0)], mouth[inner & (rel < 0)]
        if upper.size == 0 or lower.size == 0:
            raise ValueError(f"template '{self.template.name}': cannot split the mouth opening "
                             "into upper and lower lips")
        e = _edges(f)
        lens = np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1)
        g = coo_matrix((lens, (e[:, 0], e[:, 1])), shape=(v.shape[0],) * 2).tocsr()
        d_up = dijkstra(g, directed=False, indices=upper, min_only=True)
        d_low = dijkstra(g, directed=False, indices=lower, min_only=True)
        ok = np.isfinite(d_up) & np.isfinite(d_low)
        diff = np.zeros(v.shape[0])
        diff[ok] = d_up[ok] - d_low[ok]
        a = 15.0 * k
        w = _smoothstep((diff + a) / (2.0 * a))
        # away from the opening the distance difference degenerates (paths meet at the corners):
        # blend to a height rule (1 well below the mouth line, 0 above it) with the distance
        # from the opening
        y_line = coef[0] + coef[1] * (v[:, 0] - lips_c[0]) ** 2
        w_far = _smoothstep((y_line - v[:, 1] + 5.0 * k) / (25.0 * k))
        d_loop = cKDTree(v[mouth]).query(v)[0]
        beta = _smoothstep((d_loop - 8.0 * k) / (20.0 * k))
        w = (1.0 - beta) * w + beta * w_far
        # relax the weight on the mesh graph (the slit's two sides are not neighbours, so they
        # stay apart); this spreads the transition around the mouth corners
        adj = coo_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])),
                         shape=(v.shape[0],) * 2).tocsr()
        deg = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1.0)
        for _ in range(self.smoothing_iterations):
            w = 0.5 * w + 0.5 * (adj @ w) / deg
        return w * _smoothstep((y_line + 20.0 * k - v[:, 1]) / (12.0 * k))   # nose and above: 0

    # -----------------------------------------------------------------------------------------
    def sample_subject(self, rng: np.random.Generator, num_bumps: int = 16) -> SubjectParams:
        """Random identity: scale 1 +- 8 % per axis, ``num_bumps`` RBF bumps of up to +-6 mm."""
        skin = np.nonzero(~self.eye_mask)[0]
        scale = 1.0 + rng.uniform(-0.08, 0.08, size=3)
        centres = self.verts0[skin[rng.integers(0, skin.size, size=num_bumps)]]
        widths = rng.uniform(25.0, 50.0, size=num_bumps) * self.k
        amps = np.clip(rng.normal(0.0, 2.5, size=num_bumps), -6.0, 6.0) * self.k
        return SubjectParams(scale=scale, bump_centres=centres, bump_widths=widths,
                             bump_amplitudes=amps)

    def neutral_frame(self) -> FrameParams:
        """All expressions 0, no pose, no gaze."""
        return FrameParams(expression={e: 0.0 for e in EXPRESSIONS})

    def sample_sequence(self, rng: np.random.Generator, num_frames: int,
                        ranges: Optional[VariationRanges] = None) -> List[FrameParams]:
        """Smooth random trajectories of expression, pose and gaze over ``num_frames`` frames.

        Random keyframes every ``ranges.key_interval`` frames (covering the clip) are joined
        by monotone cubic (PCHIP) interpolation, which never leaves the ranges."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        r = ranges or VariationRanges()
        unknown = set(r.expression) - set(EXPRESSIONS)
        if unknown:
            raise ValueError(f"VariationRanges.expression: unknown expression(s) {sorted(unknown)} "
                             f"(known: {', '.join(EXPRESSIONS)})")
        step = max(1, int(r.key_interval))
        # evenly spaced keys covering the clip (the last one at or beyond the last frame, so
        # no short end segment forces a sharp bend)
        keys = np.arange(0, num_frames - 1 + step, step)
        K = keys.size
        t = np.arange(num_frames)

        def curve(values: np.ndarray) -> np.ndarray:
            if K == 1:
                return np.full(num_frames, values[0])
            return PchipInterpolator(keys, values)(t)

        expr = {}
        for name in EXPRESSIONS:
            lo, hi = r.expression.get(name, (0.0, 0.0))
            vals = rng.uniform(lo, hi, size=K)
            active = rng.random(K) < r.expression_probability
            vals = np.where(active, vals, np.clip(0.0, lo, hi))
            expr[name] = curve(vals)
        pose = {name: curve(rng.uniform(*getattr(r, name), size=K)) for name in ("yaw", "pitch", "roll")}
        trans = np.stack([curve(rng.uniform(-r.translation, r.translation, size=K)) for _ in range(3)], 1)
        gaze = np.stack([curve(rng.uniform(-r.gaze, r.gaze, size=K)) for _ in range(2)], 1)
        return [FrameParams(expression={n: float(expr[n][i]) for n in EXPRESSIONS},
                            yaw=float(pose["yaw"][i]), pitch=float(pose["pitch"][i]),
                            roll=float(pose["roll"][i]), translation=trans[i].copy(),
                            gaze=gaze[i].copy()) for i in range(num_frames)]

    # -----------------------------------------------------------------------------------------
    def apply_identity(self, subject: SubjectParams) -> np.ndarray:
        """Neutral vertices of ``subject``: (N, 3) float64 world, mm."""
        v0 = self.verts0
        scale = np.asarray(subject.scale, dtype=np.float64).reshape(3)
        v = self.centre + (v0 - self.centre) * scale
        c = np.asarray(subject.bump_centres, dtype=np.float64).reshape(-1, 3)
        if c.shape[0]:
            d2 = ((v0[:, None, :] - c[None]) ** 2).sum(-1)                 # (N, K)
            amp = (np.exp(-0.5 * d2 / np.asarray(subject.bump_widths)[None] ** 2)
                   * np.asarray(subject.bump_amplitudes)[None]).sum(1)      # (N,)
        else:
            amp = np.zeros(v0.shape[0])
        disp = amp[:, None] * self.radial
        out = v + np.where(self.eye_mask[:, None], 0.0, disp)
        # eyeballs: rigid translation = scaled centre + mean bump of the matching eye region
        for idx, name in zip(self.eyeballs, self.eyeball_names):
            region = name.replace("eyeball", "eye_region")
            c0 = v0[idx].mean(axis=0)
            reg = self.template.regions.get(region)
            shift = disp[reg].mean(axis=0) if reg is not None and len(reg) else np.zeros(3)
            out[idx] = v0[idx] - c0 + self.centre + (c0 - self.centre) * scale + shift
        return out

    def _expression(self, v: np.ndarray, subject: SubjectParams, frame: FrameParams) -> np.ndarray:
        """Apply the expressions of ``frame`` to identity vertices ``v`` (N, 3)."""
        e = frame.expression or {}
        unknown = set(e) - set(EXPRESSIONS)
        if unknown:
            raise ValueError(f"FrameParams.expression: unknown expression(s) {sorted(unknown)} "
                             f"(known: {', '.join(EXPRESSIONS)})")
        scale = np.asarray(subject.scale, dtype=np.float64).reshape(3)
        out = v.copy()
        for name, b in self.basis.items():
            val = float(e.get(name, 0.0))
            if val != 0.0:
                out += val * b * scale
        closure = float(e.get("eye_close", 0.0))
        if closure > 0.0 and self.eyeballs:
            for idx, sup in zip(self.eyeballs, self.eye_support):
                c = v[idx].mean(axis=0)
                rad = np.linalg.norm(v[idx] - c, axis=1).mean()
                dxy2 = ((out[:, :2] - c[:2]) ** 2).sum(1)
                zs = c[2] + np.sqrt(np.maximum(rad * rad - dxy2, 0.0)) + 0.8 * self.k
                inside = dxy2 < rad * rad
                gap = zs - out[:, 2]
                # lids sitting just behind the eyeball front come over it; deeper folds (inside
                # the socket) stay where they are
                depth_w = _smoothstep((7.0 * self.k - gap) / (4.0 * self.k))
                push = np.where(inside, np.maximum(gap, 0.0) * depth_w, 0.0)
                out[:, 2] += min(closure, 1.0) * sup * push
        jaw = float(e.get("jaw_open", 0.0))
        if jaw != 0.0:
            pivot = self.centre + (self.jaw_pivot - self.centre) * scale
            chin = v[self.chin_index]
            lever = float(np.linalg.norm((chin - pivot)[1:]))
            w_c = self.w_jaw[self.chin_index]
            ratio = np.clip(jaw / (2.0 * lever * max(w_c, 1e-6)), -1.0, 1.0)
            angle = 2.0 * np.arcsin(ratio)         # chin moves by exactly `jaw` mm
            # the weight blends the displacement linearly (exact rigid rotation where w = 1)
            rotated = _rotate_rodrigues(out - pivot, np.array([angle, 0.0, 0.0])) + pivot
            out = out + self.w_jaw[:, None] * (rotated - out)
        return out

    def apply(self, subject: SubjectParams, frame: FrameParams) -> np.ndarray:
        """Vertices of ``subject`` in ``frame``: (N, 3) float64 world, mm."""
        v = self.apply_identity(subject)
        out = self._expression(v, subject, frame)
        # gaze: rotate each eyeball about its own centre
        gaze = np.asarray(frame.gaze, dtype=np.float64).reshape(2)
        if np.any(gaze != 0.0):
            Rg = rotation_matrix(gaze[0], -gaze[1], 0.0)
            for idx in self.eyeballs:
                c = out[idx].mean(axis=0)
                out[idx] = (out[idx] - c) @ Rg.T + c
        # pose: per-vertex scaled axis-angle about the neck pivot, then translation
        R = rotation_matrix(frame.yaw, frame.pitch, frame.roll)
        rotvec = _matrix_to_rotvec(R)
        scale = np.asarray(subject.scale, dtype=np.float64).reshape(3)
        pivot = self.centre + (self.pose_pivot - self.centre) * scale
        if np.any(rotvec != 0.0):
            out = _rotate_rodrigues(out - pivot, self.w_pose[:, None] * rotvec[None]) + pivot
        return out + np.asarray(frame.translation, dtype=np.float64).reshape(1, 3)

    def apply_sequence(self, subject: SubjectParams, frames: Sequence[FrameParams]) -> np.ndarray:
        """(T, N, 3) float64 world mm: :meth:`apply` for every frame."""
        return np.stack([self.apply(subject, fr) for fr in frames])
