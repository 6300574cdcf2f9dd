"""Evaluation metrics on hand-built cases with known answers: a surface scored against itself is
0, a plane offset by 2 mm is 2 mm in every statistic, regions follow the documented rule,
cumulative curves and jitter match closed forms."""
import logging

import igl
import numpy as np
import pytest
import trimesh

from tempeh.eval.metrics import (ScanToMesh, cumulative_error_curve, jitter, pose_split,
                                 scan_to_mesh, second_differences, summary, v2v_error)
from tempeh.eval.plots import error_colors, plot_cumulative_error
from tempeh.io.templates import load_template


def grid_plane(n: int = 5, spacing: float = 25.0):
    """``n x n`` vertices on z = 0 (mm), row-major (vertex ``i * n + j`` at x = j, y = i),
    every square split along its (j, i)-(j+1, i+1) diagonal."""
    c = (np.arange(n) - (n - 1) / 2) * spacing
    xx, yy = np.meshgrid(c, c)
    verts = np.stack([xx.ravel(), yy.ravel(), np.zeros(n * n)], 1)
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    v00 = (i * n + j).ravel()
    v01, v10, v11 = v00 + 1, v00 + n, v00 + n + 1
    faces = np.concatenate([np.stack([v00, v01, v11], 1), np.stack([v00, v11, v10], 1)])
    return verts, faces


def test_surface_scored_against_itself_is_zero(rng):
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=90.0)
    verts, faces = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    # points on the surface: random barycentric combinations of random faces, plus the vertices
    fi = rng.integers(0, len(faces), 300)
    w = rng.dirichlet(np.ones(3), 300)
    on_surface = np.einsum("pk,pkd->pd", w, verts[faces[fi]])
    scan = np.concatenate([on_surface, verts])
    res = scan_to_mesh(scan, verts, faces)
    assert res.dist.shape == (scan.shape[0],)
    assert np.abs(res.dist).max() < 1e-9
    s = summary(res.dist)
    assert s["median"] < 1e-9 and s["mean"] < 1e-9 and s["count"] == scan.shape[0]
    assert list(res.region_masks) == ["all"] and res.region_masks["all"].all()


def test_distances_match_libigl_off_surface(rng):
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=80.0)
    verts, faces = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    scan = rng.normal(size=(200, 3)) * 60.0
    res = scan_to_mesh(scan, verts, faces)
    d2, _, _ = igl.point_mesh_squared_distance(scan, verts, faces.astype(np.int64))
    np.testing.assert_allclose(res.dist, np.sqrt(d2), atol=1e-9)


@pytest.mark.parametrize("side", [1.0, -1.0])
def test_plane_offset_by_2mm_is_2mm_everywhere(rng, side):
    verts, faces = grid_plane(5, 25.0)  # spans [-50, 50]^2
    xy = rng.uniform(-45.0, 45.0, size=(500, 2))
    scan = np.concatenate([xy, np.full((500, 1), side * 2.0)], 1)
    res = scan_to_mesh(scan, verts, faces)
    s = summary(res.dist)
    assert s["median"] == pytest.approx(2.0, abs=1e-12)
    assert s["mean"] == pytest.approx(2.0, abs=1e-12)
    assert s["std"] == pytest.approx(0.0, abs=1e-12)
    assert s["count"] == 500
    # the same by moving the mesh instead of the scan
    res2 = scan_to_mesh(np.concatenate([xy, np.zeros((500, 1))], 1), verts + [0, 0, 2.0], faces)
    np.testing.assert_allclose(res2.dist, 2.0, atol=1e-12)


def test_regions_hand_labelled():
    # 3 x 3 grid, spacing 10 mm: vertex k at x = (k % 3 - 1) * 10, y = (k // 3 - 1) * 10.
    verts, faces = grid_plane(3, 10.0)
    regions = {"face": [0, 1, 2], "scalp": [6, 7, 8], "neck": [2, 5, 8]}
    # points 1 mm above the surface, each nearest to a known vertex
    targets = np.array([0, 1, 2, 4, 5, 8, 6, 3])
    offset = np.array([[1.5, 0.5], [-1.0, 1.0], [-2.0, 2.0], [0.3, -0.2], [-1.0, 0.0],
                       [-2.0, -1.0], [1.0, -2.0], [0.5, 0.5]])
    scan = np.concatenate([verts[targets, :2] + offset, np.ones((len(targets), 1))], 1)
    res = scan_to_mesh(scan, verts, faces, regions)
    np.testing.assert_array_equal(res.nearest_vertex, targets)
    assert list(res.region_masks) == ["all", "face", "scalp", "neck"]
    expected = ["face", "face", "face+neck", "", "neck", "scalp+neck", "scalp", ""]
    assert res.region_of_point.tolist() == expected
    # overlapping points count in both regions
    per_region = {k: int(m.sum()) for k, m in res.region_masks.items()}
    assert per_region == {"all": 8, "face": 3, "scalp": 2, "neck": 3}
    np.testing.assert_allclose(res.dist, 1.0, atol=1e-12)
    np.testing.assert_array_equal(res.region_dists()["neck"], res.dist[[2, 4, 5]])


def test_region_rule_against_brute_force_nearest_vertex(rng):
    # Above a regular grid the nearest corner of the closest face is the globally nearest
    # vertex (for points that project inside the grid): an independent reference.
    verts, faces = grid_plane(6, 7.0)
    scan = np.concatenate([rng.uniform(-17.0, 17.0, (400, 2)), rng.uniform(-3, 3, (400, 1))], 1)
    regions = {"face": np.arange(0, 12), "scalp": np.arange(10, 30), "neck": np.arange(30, 36)}
    res = scan_to_mesh(scan, verts, faces, regions)
    brute = ((scan[:, None, :] - verts[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(res.nearest_vertex, brute)
    for name, idx in regions.items():
        np.testing.assert_array_equal(res.region_masks[name], np.isin(brute, idx))
    np.testing.assert_allclose(res.dist, np.abs(scan[:, 2]), atol=1e-12)


def test_missing_region_is_omitted_and_logged(caplog):
    verts, faces = grid_plane(3, 10.0)
    with caplog.at_level(logging.INFO, logger="tempeh.eval.metrics"):
        res = scan_to_mesh(np.array([[0.0, 0.0, 1.0]]), verts, faces, {"face": [4]})
    assert list(res.region_masks) == ["all", "face"]
    assert "neck" in caplog.text and "scalp" in caplog.text


def test_scan_to_mesh_rejects_bad_input():
    verts, faces = grid_plane(3, 10.0)
    with pytest.raises(ValueError, match="scan"):
        scan_to_mesh(np.zeros((4, 2)), verts, faces)
    with pytest.raises(ValueError, match="NaN"):
        scan_to_mesh(np.array([[np.nan, 0, 0]]), verts, faces)
    with pytest.raises(ValueError, match="region 'face'"):
        scan_to_mesh(np.zeros((1, 3)), verts, faces, {"face": [99]})


def test_flame_template_vertices_fall_in_their_own_regions(flame_dir):
    tpl = load_template(flame_dir / "sampling_template.obj", flame_dir / "vertex_masks2.npz")
    res = scan_to_mesh(tpl.verts, tpl.verts, tpl.faces, tpl.regions)
    assert res.dist.max() < 1e-9
    np.testing.assert_array_equal(res.nearest_vertex, np.arange(tpl.num_verts))
    for name in ("face", "scalp", "neck"):
        assert res.region_masks[name].sum() == tpl.regions[name].size


def test_summary_values_and_empty():
    s = summary([1.0, 2.0, 4.0, 9.0])
    assert s == {"median": 3.0, "mean": 4.0, "std": pytest.approx(np.sqrt(9.5)), "count": 4}
    e = summary([])
    assert e["count"] == 0 and np.isnan(e["median"]) and np.isnan(e["mean"])
    with pytest.raises(ValueError, match="NaN"):
        summary([1.0, np.nan])


def test_cumulative_error_curve_is_exact():
    x, frac = cumulative_error_curve([0.5, 1.0, 2.0, 3.0], max_mm=4.0, steps=5)
    np.testing.assert_array_equal(x, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(frac, [0.0, 0.5, 0.75, 1.0, 1.0])
    x, frac = cumulative_error_curve([], max_mm=1.0, steps=3)
    np.testing.assert_array_equal(frac, 0.0)
    with pytest.raises(ValueError):
        cumulative_error_curve([1.0], steps=1)


def test_v2v_error(rng):
    gt = rng.normal(size=(7, 3))
    off = rng.normal(size=(7, 3))
    np.testing.assert_allclose(v2v_error(gt + off, gt), np.linalg.norm(off, axis=1), atol=1e-12)
    with pytest.raises(ValueError, match="vertex count"):
        v2v_error(gt, gt[:5])


def test_pose_split_analytic(rng):
    """A known similarity of a shape plus a known residual; rotation from scipy's Rotation."""
    from scipy.spatial.transform import Rotation

    gt = rng.normal(0.0, 60.0, size=(500, 3)) + np.array([10.0, -40.0, 900.0])
    rot = Rotation.from_rotvec(np.radians(7.5) * np.array([0.3, 0.9, -0.2]) / np.linalg.norm([0.3, 0.9, -0.2]))
    c = gt.mean(0)
    t = np.array([3.0, -4.0, 12.0])
    # pred = rotate gt about its centroid, then translate: the rigid fit pred -> gt undoes it
    pred = (gt - c) @ rot.as_matrix().T + c + t
    ps = pose_split(pred, gt)
    assert ps.rotation_deg == pytest.approx(rot.magnitude() * 180 / np.pi, abs=1e-9)
    assert ps.rotation_deg == pytest.approx(7.5, abs=1e-9)
    assert ps.centroid_mm == pytest.approx(13.0, abs=1e-9)  # |(3, -4, 12)|
    assert ps.scale == pytest.approx(1.0, abs=1e-12)
    assert ps.residual_median_mm == pytest.approx(0.0, abs=1e-9)
    # a prediction 10 % too small about its centroid: scale 1.1 restores it, no rotation
    ps = pose_split((gt - c) / 1.1 + c, gt)
    assert ps.scale == pytest.approx(1.1, rel=1e-12)
    assert ps.rotation_deg == pytest.approx(0.0, abs=1e-6)
    assert ps.centroid_mm == pytest.approx(0.0, abs=1e-9)
    # everything at once, against an independent fit: scipy's align_vectors (Kabsch) on the
    # centred points, the least-squares scale, the median residual in float64
    noisy = (gt - c) @ rot.as_matrix().T / 1.05 + c + t + rng.normal(0.0, 2.0, size=gt.shape)
    ps = pose_split(noisy, gt)
    a0, b0 = noisy - noisy.mean(0), gt - gt.mean(0)
    ref_rot, _ = Rotation.align_vectors(b0, a0)
    ra0 = ref_rot.apply(a0)
    s_ref = (ra0 * b0).sum() / (a0 * a0).sum()
    res_ref = np.median(np.linalg.norm(s_ref * ra0 + gt.mean(0) - gt, axis=1))
    assert ps.rotation_deg == pytest.approx(np.degrees(ref_rot.magnitude()), abs=1e-8)
    assert ps.scale == pytest.approx(s_ref, rel=1e-10)
    assert ps.residual_median_mm == pytest.approx(res_ref, rel=1e-10)
    assert ps.centroid_mm == pytest.approx(np.linalg.norm(noisy.mean(0) - gt.mean(0)), abs=1e-9)
    assert ps.residual_median_mm > 1.0  # the noise (sigma 2 mm) is not fitted away
    with pytest.raises(ValueError, match="vertex count"):
        pose_split(gt, gt[:10])
    with pytest.raises(ValueError):
        pose_split(np.zeros((10, 3)), gt[:10])  # collapsed prediction

def test_jitter_constant_velocity_is_zero(rng):
    x0, vel = rng.normal(size=(4, 3)) * 50, rng.normal(size=(4, 3))
    seq = x0[None] + np.arange(6)[:, None, None] * vel[None]
    assert jitter(seq) == pytest.approx(0.0, abs=1e-12)


def test_jitter_of_known_oscillations():
    T, A = 7, np.array([0.5, 2.0, 3.0])
    d = np.array([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0, 1.0]])  # unit directions
    # x_t = A (-1)^t d: second difference has norm 4 A at every interior frame
    sign = (-1.0) ** np.arange(T)
    seq = 10.0 + sign[:, None, None] * (A[:, None] * d)[None]
    np.testing.assert_allclose(second_differences(seq), np.broadcast_to(4 * A, (T - 2, 3)))
    assert jitter(seq) == pytest.approx(4 * A.mean())
    # x_t = A sin(w t) d: |x[t+1] - 2x[t] + x[t-1]| = 4 A sin^2(w/2) |sin(w t)|
    w, t = 0.3, np.arange(T)
    seq = np.sin(w * t)[:, None, None] * (A[:, None] * d)[None]
    want = 4 * A.mean() * np.sin(w / 2) ** 2 * np.abs(np.sin(w * t[1:-1])).mean()
    assert jitter(seq) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="3 frames"):
        jitter(seq[:2])


def test_error_colors_and_plot(tmp_path):
    c = error_colors([0.0, 1.5, 3.0, 10.0], max_mm=3.0)
    assert c.dtype == np.uint8
    np.testing.assert_array_equal(c, [[0, 0, 255], [0, 255, 0], [255, 0, 0], [255, 0, 0]])
    path = plot_cumulative_error(tmp_path / "ced.png",
                                 {"all": cumulative_error_curve([0.1, 0.2, 1.0])})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scan_to_mesh_result_type():
    verts, faces = grid_plane(3, 10.0)
    res = scan_to_mesh(np.array([[0.0, 0.0, 0.5]]), verts, faces)
    assert isinstance(res, ScanToMesh)
    assert res.face_idx.dtype == np.int64 and res.nearest_vertex.dtype == np.int64
