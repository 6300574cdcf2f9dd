"""A procedural head template: cranium, face, nose, brow, eye sockets with separate eyeballs,
lips with an openable mouth slit, chin, jaw, ears and a neck ending in an open boundary loop.

Frame and scale follow FLAME (in millimetres): y up, the face looks towards +z, x towards the
subject's left; the head centre is near the origin; about 150 mm wide (ears excluded), about
230 mm from chin to crown, neck cut near y = -170 mm.

Construction (deterministic, no assets, no randomness):

1. A smooth implicit solid (smooth union of ellipsoids for cranium, jaw and chin, plus an
   elliptic neck cylinder) is sampled along rays from a centre point ``_CENTRE`` on a
   (theta, phi) grid: ``phi`` is the angle from +y (0 at the crown pole), ``theta`` the azimuth
   about y (0 towards +z, +pi/2 towards +x). The outermost crossing along each ray is found by
   marching and bisection.
2. Radial displacement fields, evaluated at the base surface points, add the features: brow
   ridge, nose, cheeks, lips, nostrils and the two ears. Around each eye the skin is then laid
   over the eyeball (0.6 mm above it) except in an almond aperture where it dips 2 mm below it,
   so the eyeball shows between the lids and closing the eye is a small push.
3. The grid is triangulated (a fan at the crown pole, mirror-symmetric quad diagonals); one grid
   row carries the mouth slit: its vertices strictly between the two corner columns are
   duplicated, the upper lip uses the originals and the lower lip the copies, so the slit is an
   open (zero-width) boundary joined only at the corners.
4. Two closed icospheres (radius 12 mm, their own vertices) are appended as the eyeballs.

Both resolutions come from the same generator: ``"low"`` about 1,300 vertices, ``"full"`` about
5,000. Azimuths are denser at the front of the head and grid rows are denser over the face.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import trimesh

from tempeh.template import Template

logger = logging.getLogger(__name__)

#: Ray origin for the star-shaped head surface, mm (on the neck axis, level with the ears).
_CENTRE = np.array([0.0, 0.0, -35.0])
#: Eyeball radius, mm.
EYEBALL_RADIUS = 12.0


@dataclass(frozen=True)
class _Resolution:
    """Sampling density of one resolution."""

    num_theta: int        # azimuth samples per row (even, for mirror symmetry)
    num_rows: int         # grid rows below the crown pole (pole excluded)
    eye_subdivisions: int  # icosphere subdivisions of each eyeball


_RESOLUTIONS: Dict[str, _Resolution] = {
    "low": _Resolution(num_theta=48, num_rows=25, eye_subdivisions=1),
    "full": _Resolution(num_theta=84, num_rows=56, eye_subdivisions=2),
}

# ---------------------------------------------------------------------------------------------
# base implicit solid
# ---------------------------------------------------------------------------------------------


def _ellipsoid_sdf(p: np.ndarray, centre, radii) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid. p: (..., 3) mm -> (...) mm."""
    radii = np.asarray(radii, dtype=np.float64)
    q = (p - np.asarray(centre, dtype=np.float64)) / radii
    return (np.linalg.norm(q, axis=-1) - 1.0) * radii.min()


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum of two signed distances with blend width ``k`` mm (log-sum-exp)."""
    m = np.minimum(a, b)
    return m - k * np.log(np.exp(-(a - m) / k) + np.exp(-(b - m) / k))


def _head_sdf(p: np.ndarray) -> np.ndarray:
    """Signed distance-like function of the base head solid (negative inside). p: (..., 3) mm."""
    cranium = _ellipsoid_sdf(p, (0.0, 30.0, -27.0), (74.0, 101.0, 88.0))
    jaw = _ellipsoid_sdf(p, (0.0, -38.0, -2.0), (57.0, 58.0, 56.0))
    chin = _ellipsoid_sdf(p, (0.0, -82.0, 33.0), (23.0, 18.0, 19.0))
    # elliptic neck cylinder about the vertical axis through _CENTRE, capped inside the head
    d = (p[..., [0, 2]] - _CENTRE[[0, 2]]) / np.array([50.0, 55.0])
    neck = (np.linalg.norm(d, axis=-1) - 1.0) * 50.0
    neck = np.maximum(np.maximum(neck, p[..., 1] + 10.0), -(p[..., 1] + 260.0))
    s = _smooth_union(cranium, jaw, 14.0)
    s = _smooth_union(s, chin, 8.0)
    return _smooth_union(s, neck, 18.0)


def _ray_dirs(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit ray directions. theta, phi: broadcastable angles, rad -> (..., 3)."""
    theta, phi = np.broadcast_arrays(theta, phi)
    sp = np.sin(phi)
    return np.stack([np.sin(theta) * sp, np.cos(phi), np.cos(theta) * sp], axis=-1)


def _base_radius(dirs: np.ndarray, r_max: float = 320.0, step: float = 2.0) -> np.ndarray:
    """Outermost crossing of the base solid along rays from ``_CENTRE``.

    dirs: (P, 3) unit directions -> (P,) radius, mm. Marches inwards from ``r_max`` and bisects
    the first bracket to 1e-6 mm.
    """
    radii = np.arange(r_max, 0.0, -step)                                   # (S,) decreasing
    pts = _CENTRE + radii[None, :, None] * dirs[:, None, :]                # (P, S, 3)
    inside = _head_sdf(pts) < 0.0                                          # (P, S)
    if not inside.any(axis=1).all():
        raise RuntimeError("procedural head: a ray missed the base solid")
    first = inside.argmax(axis=1)                                          # first inside sample
    if (first == 0).any():
        raise RuntimeError("procedural head: base solid exceeds the ray-march radius")
    lo = radii[first]            # inside
    hi = radii[first - 1]        # outside
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        ins = _head_sdf(_CENTRE + mid[:, None] * dirs) < 0.0
        lo = np.where(ins, mid, lo)
        hi = np.where(ins, hi, mid)
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# features: radial displacements evaluated at base-surface points q (..., 3) mm
# ---------------------------------------------------------------------------------------------


def _gauss(x: np.ndarray) -> np.ndarray:
    return np.exp(-x * x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


#: Nominal feature positions (mm, world).
_EYE_XY = (33.0, 24.0)        # eye centre (+-x, y)
_EAR_YZ = (-2.0, -52.0)       # ear centre (y, z)
_MOUTH_HALF_WIDTH = 24.0      # mouth corners at x = +-this, mm
_NOSTRIL_XY = (8.5, -16.0)


def _front_gate(q: np.ndarray) -> np.ndarray:
    """Smooth weight ~1 on the front of the head (z > 20 mm), ~0 on the sides/back."""
    return _sigmoid((q[..., 2] - 15.0) / 4.0)


def _ear_weight(q: np.ndarray, side: float) -> Tuple[np.ndarray, np.ndarray]:
    """Ear footprint on the side ``side`` (+1 left, -1 right): (plateau weight, elliptic dist)."""
    y = q[..., 1] - _EAR_YZ[0]
    z = q[..., 2] - _EAR_YZ[1]
    tilt = np.deg2rad(15.0)                         # ear leans backwards at the top
    yy = np.cos(tilt) * y + np.sin(tilt) * z
    zz = -np.sin(tilt) * y + np.cos(tilt) * z
    e = np.sqrt((yy / 31.0) ** 2 + (zz / 17.0) ** 2)
    gate = _sigmoid((side * q[..., 0] - 30.0) / 4.0)
    return _sigmoid((0.9 - e) / 0.07) * gate, e


def _feature_displacement(q: np.ndarray, phi: np.ndarray,
                          phi_mouth: float, y_mouth: float) -> np.ndarray:
    """Radial displacement (mm) of the features at base-surface points ``q`` (..., 3)."""
    x, y = q[..., 0], q[..., 1]
    ax = np.abs(x)
    front = _front_gate(q)
    d = np.zeros(q.shape[:-1])
    # brow ridge: a horizontal band above the eyes
    d += 5.0 * _gauss((y - 42.0) / 7.0) * _sigmoid((52.0 - ax) / 5.0) * front
    # nose: ridge from the bridge (y~28) to the tip (y~-8), flat-topped across x
    t = np.clip((28.0 - y) / 36.0, 0.0, None)                  # 0 at bridge, 1 at tip
    height = (4.0 + 20.0 * t ** 1.6) * _sigmoid((y + 12.0) / 2.5) * _sigmoid((40.0 - y) / 4.0)
    half_w = 6.0 + 9.0 * np.clip(t, 0.0, 1.2)
    d += height * np.exp(-(x / half_w) ** 4) * front
    # nose base/alae widen just above the nostrils
    d += 7.0 * np.exp(-((ax - 11.0) / 5.0) ** 2 - ((y + 11.0) / 5.0) ** 2) * front
    # nostrils: small pits under the tip
    d -= 2.0 * np.exp(-((ax - _NOSTRIL_XY[0]) / 3.0) ** 2 - ((y - _NOSTRIL_XY[1]) / 2.5) ** 2) * front
    # cheeks
    d += 5.0 * np.exp(-((ax - 44.0) / 18.0) ** 2 - ((y + 12.0) / 16.0) ** 2) * front
    # lips: upper and lower rolls either side of the mouth row, and a groove at the slit
    lip_x = np.exp(-(x / (_MOUTH_HALF_WIDTH - 2.0)) ** 4)
    d += 4.0 * np.exp(-((y - y_mouth - 4.0) / 4.5) ** 2) * lip_x * front
    d += 5.0 * np.exp(-((y - y_mouth + 5.5) / 5.0) ** 2) * np.exp(-(x / (_MOUTH_HALF_WIDTH - 5.0)) ** 4) * front
    d -= 1.5 * _gauss((phi - phi_mouth) / np.deg2rad(1.2)) * lip_x * front
    # ears: plateau shells with a concha hollow, on the sides
    for s in (1.0, -1.0):
        w, e = _ear_weight(q, s)
        d += w * (20.0 - 8.0 * np.exp(-(e / 0.45) ** 2))
    return d


# ---------------------------------------------------------------------------------------------
# sampling grid
# ---------------------------------------------------------------------------------------------


def _theta_samples(num_theta: int) -> np.ndarray:
    """(M,) azimuths, rad, mirror-symmetric (theta_{M-j} = -theta_j), denser at the front."""
    u = 2.0 * np.pi * np.arange(num_theta) / num_theta
    u = np.where(u > np.pi, u - 2.0 * np.pi, u)
    return u - 0.5 * np.sin(u)


def _phi_rows(num_rows: int) -> Tuple[np.ndarray, int, float]:
    """Row angles (num_rows,) rad excluding the crown pole, the mouth row index, and phi_max.

    Rows are spaced by arc length along the mean base meridian, weighted x1.8 over the face band,
    with one row exactly at the mouth and the last row where the neck reaches y = -170 mm.
    """
    phi = np.linspace(0.0, np.deg2rad(172.0), 1401)
    thetas = np.deg2rad(np.array([0.0, 30.0, 60.0, 90.0, 135.0, 180.0]))
    pts = []
    for th in thetas:
        dirs = _ray_dirs(np.full_like(phi, th), phi).reshape(-1, 3)
        pts.append(_CENTRE + _base_radius(dirs)[:, None] * dirs)
    pts = np.stack(pts)                                              # (K, P, 3)
    mean_y = pts[..., 1].mean(axis=0)
    last = int(np.argmax(mean_y < -170.0))
    phi, pts = phi[: last + 1], pts[:, : last + 1]
    seg = np.linalg.norm(np.diff(pts, axis=1), axis=-1).mean(axis=0)  # (P-1,)
    mid = 0.5 * (phi[1:] + phi[:-1])
    face_band = _sigmoid((mid - np.deg2rad(45.0)) / 0.06) * _sigmoid((np.deg2rad(138.0) - mid) / 0.06)
    arc = np.concatenate([[0.0], np.cumsum(seg * (1.0 + 1.5 * face_band))])
    # mouth row: the base front meridian at y_mouth
    front = pts[0]
    y_mouth_nominal = -47.0
    i_m = int(np.argmin(np.abs(front[:, 1] - y_mouth_nominal)))
    s_m, s_end = arc[i_m], arc[-1]
    n_above = int(round(num_rows * s_m / s_end))
    rows_arc = np.concatenate([np.linspace(0.0, s_m, n_above + 1)[1:],
                               np.linspace(s_m, s_end, num_rows - n_above + 1)[1:]])
    rows = np.interp(rows_arc, arc, phi)
    rows[n_above - 1] = phi[i_m]
    return rows, n_above - 1, float(phi[-1])


# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------


def _grid_faces(num_rows: int, num_theta: int, theta: np.ndarray, mouth_row: int,
                slit_cols: np.ndarray, slit_ids: np.ndarray) -> np.ndarray:
    """Faces of the pole + grid surface, CCW seen from outside. Vertex 0 is the pole, grid vertex
    (i, j) (row i in [0, num_rows), column j) is ``1 + i * num_theta + j``; ``slit_cols`` of row
    ``mouth_row`` are replaced by ``slit_ids`` in the band below that row."""
    M = num_theta
    j = np.arange(M)
    jn = (j + 1) % M
    fan = np.stack([np.zeros(M, np.int64), 1 + j, 1 + jn], axis=1)
    i = np.arange(num_rows - 1)[:, None]
    a = 1 + i * M + j[None]          # top-left
    b = 1 + i * M + jn[None]         # top-right
    c = 1 + (i + 1) * M + jn[None]   # bottom-right
    d = 1 + (i + 1) * M + j[None]    # bottom-left
    # lower lip: in the band under the mouth row use the duplicated slit vertices
    remap = np.arange(1 + num_rows * M)
    remap[1 + mouth_row * M + slit_cols] = slit_ids
    a[mouth_row] = remap[a[mouth_row]]
    b[mouth_row] = remap[b[mouth_row]]
    # mirror-symmetric diagonals: cell centred at x >= 0 uses a-c, x < 0 uses b-d
    mid = theta + 0.5 * np.angle(np.exp(1j * (theta[jn] - theta)))
    pos = np.broadcast_to((np.sin(mid) >= 0.0)[None], a.shape)
    t1 = np.where(pos[..., None], np.stack([a, d, c], -1), np.stack([a, d, b], -1))
    t2 = np.where(pos[..., None], np.stack([a, c, b], -1), np.stack([b, d, c], -1))
    quads = np.concatenate([t1.reshape(-1, 3), t2.reshape(-1, 3)])
    return np.concatenate([fan, quads]).astype(np.int64)


def make_head_template(resolution: str = "low") -> Template:
    """Build the procedural head template.

    Args:
        resolution: ``"low"`` (about 1,300 vertices) or ``"full"`` (about 5,000 vertices).

    Returns:
        A validated :class:`~tempeh.template.Template` in mm (world, FLAME-like frame) with every
        region of :data:`tempeh.template.REGION_NAMES`. Faces are CCW seen from outside. The only
        open boundaries are the neck loop (region ``boundary``) and the zero-width mouth slit.
    """
    if resolution not in _RESOLUTIONS:
        raise ValueError(f"resolution must be one of {sorted(_RESOLUTIONS)}, got {resolution!r}")
    res = _RESOLUTIONS[resolution]
    M, R = res.num_theta, res.num_rows
    theta = _theta_samples(M)
    phi_rows, mouth_row, _ = _phi_rows(R)

    # base surface on the grid, plus the pole
    th_g, ph_g = np.meshgrid(theta, phi_rows)                       # (R, M)
    dirs = np.concatenate([[[0.0, 1.0, 0.0]], _ray_dirs(th_g, ph_g).reshape(-1, 3)])
    ph_all = np.concatenate([[0.0], ph_g.ravel()])
    r0 = _base_radius(dirs)
    q = _CENTRE + r0[:, None] * dirs                                 # base points (1+R*M, 3)
    phi_m = float(phi_rows[mouth_row])
    y_mouth = float(q[1 + mouth_row * M + 0, 1])                     # front column j = 0
    disp = _feature_displacement(q, ph_all, phi_m, y_mouth)
    verts = _CENTRE + (r0 + disp)[:, None] * dirs
    eye_centres = _eye_centres()
    verts = _wrap_eyelids(verts, eye_centres)

    # mouth slit: columns of the mouth row strictly between the corners
    row_m = verts[1 + mouth_row * M: 1 + (mouth_row + 1) * M]
    front_cols = np.nonzero(row_m[:, 2] > 0.0)[0]
    corner = front_cols[np.argmin(np.abs(row_m[front_cols, 0] - _MOUTH_HALF_WIDTH))]
    slit_mask = (np.abs(row_m[:, 0]) < row_m[corner, 0] - 1e-6) & (row_m[:, 2] > 0.0)
    slit_cols = np.nonzero(slit_mask)[0]
    n_grid = verts.shape[0]
    slit_ids = n_grid + np.arange(slit_cols.size)
    verts = np.concatenate([verts, verts[1 + mouth_row * M + slit_cols]])
    faces = _grid_faces(R, M, theta, mouth_row, slit_cols, slit_ids)
    n_head = verts.shape[0]

    # eyeballs: closed icospheres under the eyelids
    sphere = trimesh.creation.icosphere(subdivisions=res.eye_subdivisions, radius=EYEBALL_RADIUS)
    sv, sf = np.asarray(sphere.vertices, np.float64), np.asarray(sphere.faces, np.int64)
    eye_ids = {}
    for name, centre in (("left_eyeball", eye_centres[0]), ("right_eyeball", eye_centres[1])):
        base = verts.shape[0]
        verts = np.concatenate([verts, sv + centre])
        faces = np.concatenate([faces, sf + base])
        eye_ids[name] = base + np.arange(sv.shape[0])

    regions = _regions(verts[:n_head], q, n_grid, slit_cols, mouth_row, M, R, eye_centres)
    regions.update(eye_ids)
    tpl = Template(verts=verts, faces=faces, regions=regions, name=f"procedural_head_{resolution}")
    logger.debug("procedural head %s: %d vertices, %d faces", resolution, tpl.num_verts, tpl.num_faces)
    return tpl.validate()


def _wrap_eyelids(verts: np.ndarray, eye_centres: np.ndarray) -> np.ndarray:
    """Eyelids: over each eyeball's disk (image x, y) the skin hugs the eyeball 0.6 mm above
    its surface, except inside an almond aperture where it dips 2 mm below it (the eyeball
    shows); blended into the face by the distance from the eye axis. verts: (P, 3) mm."""
    out = verts.copy()
    R = EYEBALL_RADIUS
    for c in eye_centres:
        dx, dy = out[:, 0] - c[0], out[:, 1] - c[1]
        r_xy = np.sqrt(dx * dx + dy * dy)
        front = out[:, 2] > c[2]
        zs = c[2] + np.sqrt(np.maximum(R * R - r_xy * r_xy, 0.0))
        # almond aperture: half-width 0.85 R, half-height 0.42 R, upper lid higher than lower
        e = np.sqrt((dx / (0.85 * R)) ** 2 + (dy / (0.42 * R)) ** 2)
        aperture = _sigmoid((1.0 - e) / 0.08)
        target = zs + 0.6 - 2.6 * aperture
        b = np.where(front, 1.0 - np.clip((r_xy - 0.7 * R) / (0.3 * R), 0.0, 1.0), 0.0)
        b = b * b * (3.0 - 2.0 * b)
        out[:, 2] = (1.0 - b) * out[:, 2] + b * target
    return out


def _eye_centres() -> np.ndarray:
    """(2, 3) eyeball centres (left = +x first), mm: behind the pre-socket surface so that the
    eyeball front stands 1.5 mm proud of it."""
    out = []
    for s in (1.0, -1.0):
        p = np.array([s * _EYE_XY[0], _EYE_XY[1], 40.0])
        for _ in range(8):   # find the base-surface point with the nominal (x, y)
            dirs = (p - _CENTRE) / np.linalg.norm(p - _CENTRE)
            surf = _CENTRE + _base_radius(dirs[None])[0] * dirs
            p = np.array([s * _EYE_XY[0], _EYE_XY[1], surf[2]])
        out.append(p - np.array([0.0, 0.0, EYEBALL_RADIUS - 1.5]))
    return np.stack(out)


def _regions(verts: np.ndarray, q: np.ndarray, n_grid: int, slit_cols: np.ndarray,
             mouth_row: int, M: int, R: int, eye_centres: np.ndarray) -> Dict[str, np.ndarray]:
    """Named vertex regions of the head surface (eyeballs are added by the caller)."""
    n = verts.shape[0]
    # base points of the slit copies are those of their originals
    qq = np.concatenate([q, q[1 + mouth_row * M + slit_cols]])
    x, y, z = qq[:, 0], qq[:, 1], qq[:, 2]
    ax = np.abs(x)
    ids = np.arange(n)
    ear_l = _ear_weight(qq, 1.0)[0] > 0.1
    ear_r = _ear_weight(qq, -1.0)[0] > 0.1
    # face: front of the head from the chin to the hairline, between the temples
    hairline = 80.0 - 0.8 * np.clip(30.0 - z, 0.0, None)          # lower towards the temples
    face = (z > -38.0) & (y > -110.0) & (y < hairline) & ~ear_l & ~ear_r
    neck_cut = -70.0 - 0.5 * np.clip(z + 35.0, 0.0, None)   # rises towards the back of the head
    under_jaw = (y < -95.0) & (z < 25.0) & (y < -95.0 - 0.6 * (25.0 - z))
    face = face & ~under_jaw
    neck = ((y < neck_cut) | under_jaw) & ~face
    scalp = ~face & ~neck & ~ear_l & ~ear_r
    boundary = 1 + (R - 1) * M + np.arange(M)
    eye_l = face & (((x - eye_centres[0, 0]) / 17.0) ** 2 + ((y - eye_centres[0, 1]) / 11.0) ** 2 < 1.0)
    eye_r = face & (((x - eye_centres[1, 0]) / 17.0) ** 2 + ((y - eye_centres[1, 1]) / 11.0) ** 2 < 1.0)
    row_y = q[1 + mouth_row * M, 1]
    lips = face & ((x / (_MOUTH_HALF_WIDTH + 4.0)) ** 2 + ((y - row_y) / 14.0) ** 2 < 1.0)
    nostrils = face & ((((ax - _NOSTRIL_XY[0]) / 8.0) ** 2 + ((y - _NOSTRIL_XY[1]) / 7.0) ** 2) < 1.0)
    return {
        "face": ids[face], "scalp": ids[scalp], "neck": ids[neck],
        "left_ear": ids[ear_l], "right_ear": ids[ear_r],
        "left_eye_region": ids[eye_l], "right_eye_region": ids[eye_r],
        "lips": ids[lips], "nostrils": ids[nostrils], "boundary": boundary.astype(np.int64),
    }
