"""Tests for tempeh.geometry.closest_face (the numba uniform-grid closest-triangle query) against
independent references: a naive float64 brute force over all (point, face) pairs (Ericson's
closest point on a triangle in numpy) and libigl's AABB tree."""
import numpy as np
import pytest
import torch
import trimesh

igl = pytest.importorskip("igl")
cf = pytest.importorskip("tempeh.geometry.closest_face")
if not cf.NUMBA_AVAILABLE:  # pragma: no cover
    pytest.skip("numba not installed", allow_module_level=True)

from tempeh.geometry.closest_face import (DEFAULT_CELL_SCALE, build_triangle_grid,  # noqa: E402
                                          closest_faces_grid, query_triangle_grid)
from tempeh.geometry.point_to_surface import closest_faces, point_to_surface  # noqa: E402


def closest_on_triangle(p, a, b, c):
    """Ericson, Real-Time Collision Detection 5.1.5 (Voronoi regions in order), numpy float64,
    broadcast over leading axes; non-degenerate triangles. An independent formulation: the grid
    kernel takes the minimum of plane and edge candidates instead."""
    dot = lambda u, v: (u * v).sum(-1)
    ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c
    d1, d2, d3, d4, d5, d6 = dot(ab, ap), dot(ac, ap), dot(ab, bp), dot(ac, bp), dot(ab, cp), dot(ac, cp)
    vc, vb, va = d1 * d4 - d3 * d2, d5 * d2 - d1 * d6, d3 * d6 - d5 * d4
    with np.errstate(divide="ignore", invalid="ignore"):
        q_ab = a + (d1 / (d1 - d3))[..., None] * ab
        q_ac = a + (d2 / (d2 - d6))[..., None] * ac
        q_bc = b + ((d4 - d3) / ((d4 - d3) + (d5 - d6)))[..., None] * (c - b)
        den = 1.0 / (va + vb + vc)
        q_in = a + (vb * den)[..., None] * ab + (vc * den)[..., None] * ac
    conds = [(d1 <= 0) & (d2 <= 0), (d3 >= 0) & (d4 <= d3), (vc <= 0) & (d1 >= 0) & (d3 <= 0),
             (d6 >= 0) & (d5 <= d6), (vb <= 0) & (d2 >= 0) & (d6 <= 0),
             (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)]
    shape = np.broadcast_shapes(p.shape, a.shape)
    choices = [np.broadcast_to(x, shape) for x in (a, b, q_ab, c, q_ac, q_bc)]
    return np.select([k[..., None] for k in conds], choices, default=np.broadcast_to(q_in, shape))


def brute_force(points, verts, faces, chunk=100):
    """Naive float64 reference over all (point, face) pairs: ``(dist_sq (P, F), min dist_sq (P,))``."""
    tri = verts[faces]
    out = []
    for s in range(0, len(points), chunk):
        p = points[s : s + chunk, None]
        q = closest_on_triangle(p, tri[None, :, 0], tri[None, :, 1], tri[None, :, 2])
        out.append(((q - p) ** 2).sum(-1))
    d2 = np.concatenate(out)
    return d2, d2.min(1)


def check_against_references(points, verts, faces, d2_bf=None, rtol_scale=1e-6):
    """Grid distances == brute force and == libigl (to 1e-6 of the mesh scale, in distance);
    the returned face attains the distance; indices equal libigl's where not tied."""
    fi, d2 = closest_faces_grid(points, verts, faces)
    scale = np.ptp(verts, axis=0).max()
    tol = rtol_scale * max(scale, 1e-300)
    sq, idx, _ = igl.point_mesh_squared_distance(points, verts, faces)
    np.testing.assert_allclose(np.sqrt(d2), np.sqrt(sq), rtol=1e-9, atol=tol)
    if d2_bf is not None:
        per_face, best = d2_bf
        np.testing.assert_allclose(np.sqrt(d2), np.sqrt(best), rtol=1e-9, atol=tol)
        # the returned face attains the minimum
        np.testing.assert_allclose(np.sqrt(per_face[np.arange(len(points)), fi]), np.sqrt(best), rtol=1e-9, atol=tol)
        # where the second-closest face is clearly farther, the index is unique and must agree
        part = np.sort(per_face, axis=1)
        untied = np.sqrt(part[:, 1]) - np.sqrt(part[:, 0]) > 1e-6 * scale
        assert untied.sum() > 0.3 * len(points)
        np.testing.assert_array_equal(fi[untied], per_face.argmin(1)[untied])
        np.testing.assert_array_equal(fi[untied], np.asarray(idx).reshape(-1)[untied])
    return fi, d2


def bumpy_sphere(subdiv=2, seed=0, radius=100.0, bump=0.15):
    m = trimesh.creation.icosphere(subdivisions=subdiv, radius=radius)
    rng = np.random.default_rng(seed)
    return m.vertices * rng.uniform(1 - bump, 1 + bump, size=(len(m.vertices), 1)), np.asarray(m.faces, np.int64)


# ----------------------------------------------------------------------------- against references


@pytest.mark.parametrize("seed", [0, 1])
def test_random_triangle_soup(seed):
    rng = np.random.default_rng(seed)
    v = rng.uniform(-50, 50, size=(300, 3))
    f = rng.integers(0, 300, size=(400, 3))
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    # also many small triangles: mixed sizes
    small = rng.uniform(-40, 40, size=(300, 1, 3)) + rng.normal(size=(300, 3, 3))
    v2 = np.concatenate([v, small.reshape(-1, 3)])
    f2 = np.concatenate([f, 300 + np.arange(900).reshape(300, 3)])
    pts = rng.uniform(-70, 70, size=(400, 3))
    check_against_references(pts, v2, f2, brute_force(pts, v2, f2))


def test_sphere_inside_outside_and_on_surface():
    v, f = bumpy_sphere(3, seed=2, bump=0.0)
    rng = np.random.default_rng(3)
    dirs = rng.normal(size=(300, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radii = rng.uniform(0.0, 180.0, size=(300, 1))
    fs = rng.integers(0, len(f), 60)
    on = (v[f[fs]] * rng.dirichlet([1, 1, 1], 60)[..., None]).sum(1)
    pts = np.concatenate([dirs * radii, on])
    fi, d2 = check_against_references(pts, v, f, brute_force(pts, v, f))
    assert np.sqrt(d2[-60:]).max() < 1e-9


def test_near_vertices_and_edges_and_far_points():
    v, f = bumpy_sphere(2, seed=4)
    tm = trimesh.Trimesh(v, f, process=False)
    rng = np.random.default_rng(5)
    e = tm.edges_unique[rng.integers(0, len(tm.edges_unique), 100)]
    t = rng.uniform(0, 1, (100, 1))
    near_e = v[e[:, 0]] * t + v[e[:, 1]] * (1 - t) + rng.normal(size=(100, 3)) * 1e-3
    near_v = v[rng.integers(0, len(v), 100)] + rng.normal(size=(100, 3)) * 1e-4
    exact_v = v[rng.integers(0, len(v), 20)]
    dirs = rng.normal(size=(40, 3))
    far = 1e4 * dirs / np.linalg.norm(dirs, axis=1, keepdims=True) + rng.normal(size=(40, 3)) * 1e3
    pts = np.concatenate([near_e, near_v, exact_v, far])
    bf = brute_force(pts, v, f)
    fi, d2 = closest_faces_grid(pts, v, f)
    sq, _, _ = igl.point_mesh_squared_distance(pts, v, f)
    np.testing.assert_allclose(np.sqrt(d2), np.sqrt(bf[1]), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(d2), np.sqrt(sq), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(bf[0][np.arange(len(pts)), fi], bf[1], rtol=1e-12, atol=1e-12)
    assert np.sqrt(d2[-40:]).min() > 5e3  # the far points really are far


def test_flame_template(flame_dir):
    m = trimesh.load(flame_dir / "sampling_template.obj", process=False, force="mesh")
    v = np.asarray(m.vertices, dtype=np.float64) * 1000.0
    f = np.asarray(m.faces, dtype=np.int64)
    rng = np.random.default_rng(6)
    pts = v[rng.integers(0, len(v), 5000)] + rng.normal(size=(5000, 3)) * 3.0
    fi, d2 = check_against_references(pts, v, f)  # libigl on all 5000 points
    sub = rng.choice(5000, 150, replace=False)
    bf = brute_force(pts[sub], v, f)
    np.testing.assert_allclose(np.sqrt(d2[sub]), np.sqrt(bf[1]), rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(bf[0][np.arange(150), fi[sub]], bf[1], rtol=1e-9, atol=1e-12)
    # far points and other cell sizes give the same distances
    far = v.mean(0) + rng.normal(size=(20, 3)) * 1e4
    for cs in (0.3, DEFAULT_CELL_SCALE, 4.0):
        fi2, d22 = closest_faces_grid(np.concatenate([pts[:500], far]), v, f, cell_scale=cs)
        sq, _, _ = igl.point_mesh_squared_distance(np.concatenate([pts[:500], far]), v, f)
        np.testing.assert_allclose(np.sqrt(d22), np.sqrt(sq), rtol=1e-12, atol=1e-7)


# ----------------------------------------------------------------------------- special meshes


def test_degenerate_triangles():
    # a collinear triangle, a triangle collapsed to a point, a needle and a regular triangle
    v = np.array(
        [[0.0, 0, 0], [10, 0, 0], [20, 0, 0],  # collinear along x
         [5, 5, 5],  # collapsed point
         [0, 0, 10], [0, 30, 10], [0, 30 + 1e-12, 10],  # needle (zero width)
         [50, 0, 0], [60, 0, 0], [50, 10, 0]],  # regular
    )
    f = np.array([[0, 1, 2], [3, 3, 3], [4, 5, 6], [7, 8, 9]])
    pts = np.array([[25.0, 0, 0], [5, 3, -4], [5, 5, 7], [1, 15, 10], [55, 2, 3], [-3, -4, 0]])
    # analytic: the segment x in [0, 20]; the point (5,5,5); the segment x=0,z=10,y in [0, 30];
    # the regular triangle (height 3 above its interior point (55, 2, 0))
    expect = np.array([5.0, 5.0, 2.0, 1.0, 3.0, 5.0])
    fi, d2 = closest_faces_grid(pts, v, f)
    np.testing.assert_allclose(np.sqrt(d2), expect, atol=1e-12)
    np.testing.assert_array_equal(fi, [0, 0, 1, 2, 3, 0])
    # a mesh made only of collapsed triangles (zero-size grid) and a single triangle
    fi, d2 = closest_faces_grid(pts, np.array([[1.0, 2, 3]]), np.array([[0, 0, 0], [0, 0, 0]]))
    np.testing.assert_allclose(d2, ((pts - [1, 2, 3]) ** 2).sum(1), rtol=1e-15)
    one = v[7:10]
    fi, d2 = closest_faces_grid(pts, one, np.array([[0, 1, 2]]))
    sq, _, _ = igl.point_mesh_squared_distance(pts, one, np.array([[0, 1, 2]]))
    np.testing.assert_allclose(d2, sq, rtol=1e-12)
    assert (fi == 0).all()


@pytest.mark.parametrize("scale", [1e-3, 1e5])
def test_tiny_and_huge_meshes_and_uneven_triangles(scale):
    v, f = bumpy_sphere(2, seed=7, radius=1.0)
    # one huge triangle among small ones (uneven sizes; the grid must coarsen, not blow up)
    v = np.concatenate([v, [[-50.0, -50, 3], [50, -50, 3], [0, 60, 3]]]) * scale
    f = np.concatenate([f, [[len(v) - 3, len(v) - 2, len(v) - 1]]])
    rng = np.random.default_rng(8)
    pts = rng.normal(size=(300, 3)) * 2.0 * scale
    grid = build_triangle_grid(v, f)
    assert np.prod(grid.dims) <= max(64 * len(f), 4096) and len(grid.cell_tris) <= max(64 * len(f), 4096)
    check_against_references(pts, v, f, brute_force(pts, v, f))


def test_threads_dtypes_and_repeat_queries_are_consistent():
    v, f = bumpy_sphere(3, seed=9)
    rng = np.random.default_rng(10)
    pts = rng.normal(size=(3000, 3)) * 80.0
    grid = build_triangle_grid(v, f)
    f1, d1 = query_triangle_grid(grid, pts, num_threads=1)
    f3, d3 = query_triangle_grid(grid, pts, num_threads=3)
    np.testing.assert_array_equal(f1, f3)
    np.testing.assert_array_equal(d1, d3)
    f32, d32 = closest_faces_grid(pts.astype(np.float32), v.astype(np.float32), f.astype(np.int32))
    p64, v64 = pts.astype(np.float32).astype(np.float64), v.astype(np.float32).astype(np.float64)
    sq, _, _ = igl.point_mesh_squared_distance(p64, v64, f)
    np.testing.assert_allclose(d32, sq, rtol=1e-9, atol=1e-9)
    # empty query
    fe, de = query_triangle_grid(grid, np.zeros((0, 3)))
    assert fe.shape == (0,) and de.shape == (0,)


def test_closest_points_match_brute_force_incl_edges_and_vertices():
    v, f = bumpy_sphere(2, seed=21)
    rng = np.random.default_rng(22)
    tri = v[f]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    k = rng.integers(0, len(f), 200)
    pts = np.concatenate([
        v[rng.integers(0, len(v), 200)] + rng.normal(size=(200, 3)) * 0.5,  # near vertices
        0.5 * (tri[k, 0] + tri[k, 1]) + rng.normal(size=(200, 3)) * 0.5,  # near edge midpoints
        tri[k].mean(1) + n[k] * rng.uniform(-3, 3, (200, 1)),  # above triangle interiors
        rng.normal(size=(200, 3)) * 150.0,  # far, inside and outside
    ])
    fi, d2, w, diff = closest_faces_grid(pts, v, f, with_closest=True)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    q = (w[:, :, None] * v[f[fi]]).sum(1)
    q_ref = closest_on_triangle(pts, *v[f[fi]].transpose(1, 0, 2))
    np.testing.assert_allclose(q, q_ref, atol=1e-9 * np.ptp(v))
    np.testing.assert_allclose(diff, pts - q_ref, atol=1e-9 * np.ptp(v))
    np.testing.assert_allclose(((pts - q) ** 2).sum(1), d2, rtol=1e-9, atol=1e-9)
    # the query-only entry point gives the same closest points
    for a, b in zip(query_triangle_grid(build_triangle_grid(v, f), pts, with_closest=True), (fi, d2, w, diff)):
        np.testing.assert_array_equal(a, b)


def test_reused_buffers_across_meshes_and_owned_grids():
    """The internal path reuses per-thread buffers: alternating meshes of different sizes gives
    the same answers, and a grid from build_triangle_grid is not overwritten by later calls."""
    small, big = bumpy_sphere(1, seed=23), bumpy_sphere(3, seed=24)
    rng = np.random.default_rng(25)
    pts = rng.normal(size=(500, 3)) * 90.0
    grid_small = build_triangle_grid(*small)
    ref_small = query_triangle_grid(grid_small, pts)
    ref_big = closest_faces_grid(pts, *big)
    for _ in range(2):
        for (fi, d2), ref in ((closest_faces_grid(pts, *small), ref_small), (closest_faces_grid(pts, *big), ref_big)):
            np.testing.assert_array_equal(fi, ref[0])
            np.testing.assert_array_equal(d2, ref[1])
    again = query_triangle_grid(grid_small, pts)
    np.testing.assert_array_equal(again[0], ref_small[0])
    np.testing.assert_array_equal(again[1], ref_small[1])


# ----------------------------------------------------------------------------- point_to_surface backend


def test_point_to_surface_grid_backend_batch_and_auto():
    v, f = bumpy_sphere(2, seed=11)
    rng = np.random.default_rng(12)
    verts = np.stack([v, v * 1.1 + 2.0])
    pts = rng.normal(size=(2, 200, 3)) * 90.0
    P = torch.tensor(pts, requires_grad=True)
    V = torch.tensor(verts, requires_grad=True)
    F = torch.tensor(f)
    d_grid, fi_grid = point_to_surface(P, V, F, backend="grid")
    d_igl, _ = point_to_surface(P, V, F, backend="igl")
    d_auto, _ = point_to_surface(P, V, F)
    np.testing.assert_allclose(d_grid.detach().numpy(), d_igl.detach().numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(d_auto.detach().numpy(), d_grid.detach().numpy(), rtol=0, atol=0)
    for b in range(2):
        _, best = brute_force(pts[b], verts[b], f)
        np.testing.assert_allclose(d_grid[b].detach().numpy(), np.sqrt(best), rtol=1e-12, atol=1e-9)
    d_grid.sum().backward()
    assert torch.isfinite(P.grad).all() and torch.isfinite(V.grad).all()
    # float32 inputs
    d32, _ = point_to_surface(P.detach().float(), V.detach().float(), F, backend="grid")
    assert d32.dtype == torch.float32
    np.testing.assert_allclose(d32.numpy(), d_grid.detach().numpy(), atol=1e-3)
    fi = closest_faces(P.detach(), V.detach(), F, backend="grid")
    assert fi.dtype == torch.int64 and fi.shape == (2, 200)


def test_bad_inputs():
    v = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    f = np.array([[0, 1, 2]])
    p = np.zeros((4, 3))
    with pytest.raises(ValueError, match="out of range"):
        closest_faces_grid(p, v, np.array([[0, 1, 3]]))
    with pytest.raises(ValueError, match="integers"):
        closest_faces_grid(p, v, f.astype(float))
    with pytest.raises(ValueError, match="non-empty"):
        closest_faces_grid(p, v, np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        closest_faces_grid(p, np.array([[0.0, 0, 0], [1, np.nan, 0], [0, 1, 0]]), f)
    with pytest.raises(ValueError, match="NaN"):
        closest_faces_grid(np.array([[np.inf, 0, 0]]), v, f)
    with pytest.raises(ValueError, match="points must be"):
        closest_faces_grid(np.zeros((4, 2)), v, f)
    with pytest.raises(ValueError, match="cell_scale"):
        closest_faces_grid(p, v, f, cell_scale=0.0)
