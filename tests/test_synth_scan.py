"""Scan simulator and registration perturbation, checked with independent tools (libigl exact
closest points, cv2.projectPoints, a brute-force ray-triangle test, trimesh surface sampling)."""
import cv2
import igl
import numpy as np
import pytest
import trimesh

from tempeh.synth.head import make_head_template
from tempeh.synth.registration import RegistrationErrorConfig, perturb_registration
from tempeh.synth.render import vertex_normals
from tempeh.synth.rig import make_rig
from tempeh.synth.scan import ScanConfig, simulate_scan
from tempeh.template import Template


@pytest.fixture(scope="module")
def head():
    return make_head_template("low")


@pytest.fixture(scope="module")
def rig():
    return make_rig(num_views=6, width=400, height=300, seed=2)


def _blocked_naive(origins, dirs, verts, faces, max_t):
    """Brute-force float64 Moller-Trumbore: does the ray hit any triangle at 0 < t < max_t?"""
    tri = verts[faces]
    e1, e2, v0 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], tri[:, 0]
    out = np.zeros(len(origins), bool)
    for s in range(0, len(origins), 64):  # chunks of rays against all faces
        o, d = origins[s:s + 64, None], dirs[s:s + 64, None]
        p = np.cross(d, e2[None])
        det = (e1[None] * p).sum(-1)
        det = np.where(np.abs(det) < 1e-12, 1e-12, det)
        tv = o - v0[None]
        u = (tv * p).sum(-1) / det
        q = np.cross(tv, e1[None])
        v = (d * q).sum(-1) / det
        t = (e2[None] * q).sum(-1) / det
        hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0) & (t < max_t[s:s + 64, None])
        out[s:s + 64] = hit.any(1)
    return out


def _dist_to_surface(points, verts, faces):
    d2, _, _ = igl.point_mesh_squared_distance(points, verts, faces)
    return np.sqrt(d2)


def test_noise_and_outlier_rates(head, rig):
    sigma = 0.3
    s = simulate_scan(head.verts, head.faces, head.regions, rig, np.random.default_rng(0),
                      num_points=4000, noise_mm=sigma, outlier_rate=0.02)
    assert s.points.shape == (4000, 3) and s.is_outlier.sum() == 80
    d = _dist_to_surface(s.points, head.verts, head.faces)
    med = np.median(d[~s.is_outlier])
    # |N(0, sigma)| has median 0.6745 sigma.
    assert abs(med / (0.6745 * sigma) - 1) < 0.2, med
    assert d[~s.is_outlier].max() < 6 * sigma
    # Flagged outliers are off the surface; unflagged points far off are essentially absent.
    assert np.mean(d[s.is_outlier] > 0.8) > 0.85
    assert np.sum(d > 2.0) <= s.is_outlier.sum()
    # The inliers' clean points lie exactly on the surface.
    assert _dist_to_surface(s.clean_points[~s.is_outlier], head.verts, head.faces).max() < 1e-6


def test_noise_free_scan_lies_on_the_surface(head, rig):
    s = simulate_scan(head.verts, head.faces, head.regions, rig, np.random.default_rng(1),
                      num_points=1000, noise_mm=0.0, outlier_rate=0.0)
    assert not s.is_outlier.any()
    assert _dist_to_surface(s.points, head.verts, head.faces).max() < 1e-6


def test_holes_cover_their_rates_and_contain_no_points(head, rig):
    cfg = ScanConfig(hole_rate=0.08, scalp_hole_rate=0.3, num_points=3000)
    s = simulate_scan(head.verts, head.faces, head.regions, rig, np.random.default_rng(2), config=cfg)
    mesh = trimesh.Trimesh(head.verts, head.faces, process=False)
    probe, fidx = trimesh.sample.sample_surface(mesh, 40000, seed=7)
    d_hole = np.linalg.norm(probe[:, None] - s.hole_centers[None], axis=-1) <= s.hole_radii[None]
    cover = d_hole.any(1).mean()
    assert abs(cover / 0.08 - 1) < 0.2, cover
    scalp = np.isin(head.faces, head.regions["scalp"]).sum(1) >= 2
    on_scalp = scalp[fidx]
    d_sc = np.linalg.norm(probe[on_scalp, None] - s.scalp_hole_centers[None], axis=-1)
    sc_cover = (d_sc <= s.scalp_hole_radii[None]).any(1).mean()
    assert abs(sc_cover / 0.3 - 1) < 0.2, sc_cover
    inl = ~s.is_outlier
    clean = s.clean_points[inl]
    assert not (np.linalg.norm(clean[:, None] - s.hole_centers[None], axis=-1)
                <= s.hole_radii[None]).any()
    f = s.face_idx[inl]
    in_sc = scalp[f]
    assert not (np.linalg.norm(clean[in_sc, None] - s.scalp_hole_centers[None], axis=-1)
                <= s.scalp_hole_radii[None]).any()
    eye = np.zeros(len(head.faces), bool)
    for name in ("left_eyeball", "right_eyeball"):
        eye |= np.isin(head.faces, head.regions[name]).sum(1) >= 2
    assert eye.any() and not eye[f].any()
    fn = mesh.face_normals
    assert fn[f, 1].min() >= cfg.chin_normal_y


def test_every_scan_point_is_seen_by_two_cameras(head, rig):
    s = simulate_scan(head.verts, head.faces, head.regions, rig, np.random.default_rng(3),
                      num_points=300, outlier_rate=0.0, noise_mm=0.0)
    pts = s.clean_points
    mesh = trimesh.Trimesh(head.verts, head.faces, process=False)
    c = rig.numpy()
    seen = np.zeros(len(pts), int)
    for v in range(len(rig)):
        rvec, _ = cv2.Rodrigues(c["R"][v])
        uv, _ = cv2.projectPoints(pts.reshape(-1, 1, 3), rvec, c["t"][v], c["K"][v], c["dist"][v])
        uv = uv.reshape(-1, 2)
        inside = (uv[:, 0] >= -0.5) & (uv[:, 0] < 399.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < 299.5)
        C = -c["R"][v].T @ c["t"][v]
        d = C[None] - pts
        dist = np.linalg.norm(d, axis=-1)
        d /= dist[:, None]
        blocked = _blocked_naive(pts + 1e-2 * d, d, head.verts, head.faces, dist)
        seen += inside & ~blocked
    assert seen.min() >= 2, np.sort(seen)[:10]
    # The rig covers the front and sides: the back of the head (facing -z) is never scanned.
    fn = mesh.face_normals[s.face_idx]
    assert fn[:, 2].min() > -0.99


def test_scan_needs_visible_surface(head):
    far = make_rig(num_views=2, width=40, height=30, seed=0)
    moved = head.verts + np.array([0.0, 0.0, 5000.0])  # behind the cameras
    with pytest.raises(ValueError, match="no surface sample"):
        simulate_scan(moved, head.faces, head.regions, far, np.random.default_rng(0), num_points=50)


def _tangent_normal(disp, verts, faces):
    n = vertex_normals(verts, faces)
    nor = (disp * n).sum(-1)
    tan = np.linalg.norm(disp - nor[:, None] * n, axis=-1)
    return tan, nor


@pytest.mark.parametrize("which", ["procedural", "flame"])
def test_registration_error_magnitudes(which, request):
    if which == "flame":
        d = request.getfixturevalue("flame_dir")
        m = trimesh.load(d / "sampling_template.obj", process=False)
        z = np.load(d / "vertex_masks2.npz", allow_pickle=False)
        t = Template(np.asarray(m.vertices) * 1000, np.asarray(m.faces),
                     {k: z[k] for k in z.files if z[k].ndim == 1})
    else:
        t = request.getfixturevalue("head")
    cfg = RegistrationErrorConfig(tangential_mm=0.8, normal_mm=0.3, detail_gain=2.0)
    detail = np.zeros(t.num_verts, bool)
    for name in cfg.detail_regions:
        detail[t.regions[name]] = True
    # The gain's blend zone: within blend_mm of a detail vertex (brute force distances).
    dd = np.linalg.norm(t.verts[:, None] - t.verts[detail][None], axis=-1).min(1)
    near = dd <= cfg.blend_mm
    tans, nors, tans_d, nors_d = [], [], [], []
    for seed in range(4):
        out = perturb_registration(t.verts, t.faces, t.regions, np.random.default_rng(seed), cfg)
        disp = out - t.verts
        tan, nor = _tangent_normal(disp, t.verts, t.faces)
        tans.append(np.sqrt(np.mean(tan[~near] ** 2)))
        nors.append(np.sqrt(np.mean(nor[~near] ** 2)))
        tans_d.append(np.sqrt(np.mean(tan[detail] ** 2)))
        nors_d.append(np.sqrt(np.mean(nor[detail] ** 2)))
        # Smooth over the surface: per-edge change of the displacement is small per mm.
        a, b = t.faces[:, 0], t.faces[:, 1]
        grad = np.linalg.norm(disp[a] - disp[b], axis=-1) / np.linalg.norm(t.verts[a] - t.verts[b], axis=-1)
        # (i.i.d. vertex noise of this size gives a median of ~0.3 on these meshes; normal
        # offsets on sharp folds such as FLAME's ears give the tail).
        assert np.median(grad) < 0.08 and np.percentile(grad, 90) < 0.25, grad
    assert abs(np.mean(tans) / 0.8 - 1) < 0.1, tans
    assert abs(np.mean(nors) / 0.3 - 1) < 0.1, nors
    # Around lips and eyes the errors are about twice as large.
    assert 1.4 < np.mean(tans_d) / np.mean(tans) < 2.8, (tans_d, tans)
    assert 1.4 < np.mean(nors_d) / np.mean(nors) < 2.8, (nors_d, nors)
    # Different seeds give different errors, same seed the same.
    o1 = perturb_registration(t.verts, t.faces, t.regions, np.random.default_rng(9), cfg)
    assert np.array_equal(o1, perturb_registration(t.verts, t.faces, t.regions,
                                                   np.random.default_rng(9), cfg))
