"""Tests for tempeh.geometry.point_to_surface against an independent naive float64 reference
(Ericson's Voronoi-region closest point, over all faces), libigl and trimesh.proximity."""
import numpy as np
import pytest
import torch
import trimesh

from tempeh.geometry.point_to_surface import (
    closest_faces,
    closest_points,
    point_to_surface,
    point_triangle_distance_sq,
    safe_sqrt,
)


# ----------------------------------------------------------------------------- naive reference


def naive_closest_on_triangle(p, a, b, c):
    """Ericson, Real-Time Collision Detection 5.1.5, vectorised with numpy over broadcast arrays.

    Classifies p into the 7 Voronoi regions in order (A, B, edge AB, C, edge AC, edge BC,
    interior) and returns the closest point, float64. Non-degenerate triangles only.
    """
    p, a, b, c = np.broadcast_arrays(p, a, b, c)
    dot = lambda u, v: (u * v).sum(-1)
    ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c
    d1, d2 = dot(ab, ap), dot(ac, ap)
    d3, d4 = dot(ab, bp), dot(ac, bp)
    d5, d6 = dot(ab, cp), dot(ac, cp)
    vc = d1 * d4 - d3 * d2
    vb = d5 * d2 - d1 * d6
    va = d3 * d6 - d5 * d4
    with np.errstate(divide="ignore", invalid="ignore"):
        q_ab = a + (d1 / (d1 - d3))[..., None] * ab
        q_ac = a + (d2 / (d2 - d6))[..., None] * ac
        w_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        q_bc = b + w_bc[..., None] * (c - b)
        den = 1.0 / (va + vb + vc)
        q_in = a + (vb * den)[..., None] * ab + (vc * den)[..., None] * ac
    conds = [
        (d1 <= 0) & (d2 <= 0),
        (d3 >= 0) & (d4 <= d3),
        (vc <= 0) & (d1 >= 0) & (d3 <= 0),
        (d6 >= 0) & (d5 <= d6),
        (vb <= 0) & (d2 >= 0) & (d6 <= 0),
        (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0),
    ]
    choices = [a, b, q_ab, c, q_ac, q_bc]
    return np.select([k[..., None] for k in conds], choices, default=q_in)


def naive_point_mesh(points, verts, faces):
    """Brute force over all faces: (dist (P,), face (P,), closest (P,3)), float64 numpy."""
    tri = verts[faces]  # (F, 3, 3)
    q = naive_closest_on_triangle(points[:, None], tri[None, :, 0], tri[None, :, 1], tri[None, :, 2])
    d = np.linalg.norm(points[:, None] - q, axis=-1)  # (P, F)
    fi = d.argmin(1)
    return d[np.arange(len(points)), fi], fi, q[np.arange(len(points)), fi]


def _mesh(subdiv=2, seed=0, radius=100.0, bump=0.15):
    """A bumpy closed icosphere mesh, mm scale (convex when ``bump == 0``)."""
    m = trimesh.creation.icosphere(subdivisions=subdiv, radius=radius)
    rng = np.random.default_rng(seed)
    v = m.vertices * rng.uniform(1 - bump, 1 + bump, size=(len(m.vertices), 1))
    return v, np.asarray(m.faces, dtype=np.int64)


def _t(x):
    return torch.as_tensor(np.asarray(x))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", ["grid", "igl", "torch"])
def test_random_points_match_naive_igl_trimesh(backend):
    import igl

    v, f = _mesh(2, seed=1)
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(300, 3)) * 90.0
    d, fi = point_to_surface(_t(pts)[None], _t(v)[None], _t(f), backend=backend)
    d = d[0].numpy()
    d_ref, _, _ = naive_point_mesh(pts, v, f)
    np.testing.assert_allclose(d, d_ref, atol=1e-6)
    sq, _, _ = igl.point_mesh_squared_distance(pts, v, f)
    np.testing.assert_allclose(d, np.sqrt(sq), atol=1e-6)
    # trimesh's closest point on triangle, brute force over all (point, face) pairs (its
    # proximity.closest_point needs rtree, not installed here)
    tri = np.broadcast_to(v[f][None], (len(pts), len(f), 3, 3)).reshape(-1, 3, 3)
    q_tm = trimesh.triangles.closest_point(tri, np.repeat(pts, len(f), axis=0))
    d_tm = np.linalg.norm(q_tm - np.repeat(pts, len(f), axis=0), axis=-1).reshape(len(pts), len(f)).min(1)
    np.testing.assert_allclose(d, d_tm, atol=1e-4)
    # the returned face really attains the distance
    tri = v[f[fi[0].numpy()]]
    q = naive_closest_on_triangle(pts, tri[:, 0], tri[:, 1], tri[:, 2])
    np.testing.assert_allclose(np.linalg.norm(pts - q, axis=-1), d_ref, atol=1e-6)


def test_triangle_soup_float32_and_squared():
    rng = np.random.default_rng(3)
    v = rng.uniform(-50, 50, size=(60, 3))
    f = rng.integers(0, 60, size=(40, 3))
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    pts = rng.uniform(-60, 60, size=(2, 150, 3))
    verts = np.stack([v, v + rng.normal(size=v.shape)])
    d2, _ = point_to_surface(_t(pts), _t(verts), _t(f), squared=True, backend="torch")
    for b in range(2):
        ref, _, _ = naive_point_mesh(pts[b], verts[b], f)
        np.testing.assert_allclose(d2[b].numpy(), ref**2, rtol=1e-9, atol=1e-8)
    d32, _ = point_to_surface(_t(pts).float(), _t(verts).float(), _t(f))
    assert d32.dtype == torch.float32
    np.testing.assert_allclose(d32.numpy(), np.sqrt(d2.numpy()), atol=2e-4)


def test_constructed_edge_vertex_and_surface_points():
    v, f = _mesh(1, seed=4, bump=0.0)  # convex: the constructed regions are guaranteed
    tm = trimesh.Trimesh(v, f, process=False)
    rng = np.random.default_rng(5)
    # on-surface points: random barycentric combos of random faces
    fsel = rng.integers(0, len(f), 40)
    w = rng.dirichlet([1, 1, 1], size=40)
    on = (v[f[fsel]] * w[..., None]).sum(1)
    # vertex region: pushed radially outward (inside the normal cone of an inscribed polytope's vertex)
    vsel = rng.choice(len(v), 20, replace=False)
    near_v = v[vsel] * 1.07
    # edge region: edge midpoint pushed along the mean of the two adjacent face normals
    edges = tm.face_adjacency_edges[:20]
    en = tm.face_normals[tm.face_adjacency[:20]].sum(1)
    en /= np.linalg.norm(en, axis=1, keepdims=True)
    near_e = v[edges].mean(1) + 5.0 * en
    pts = np.concatenate([on, near_v, near_e])
    d, fi = point_to_surface(_t(pts)[None], _t(v)[None], _t(f))
    ref, _, q_ref = naive_point_mesh(pts, v, f)
    np.testing.assert_allclose(d[0].numpy(), ref, atol=1e-9)
    assert np.abs(d[0, :40].numpy()).max() < 1e-9
    # the constructed points really are in the intended regions (the reference closest point is
    # the vertex / on the edge), and closest_points agrees with the reference closest point
    np.testing.assert_allclose(q_ref[40:60], v[vsel], atol=1e-9)
    c, fi2, bary = closest_points(_t(pts)[None], _t(v)[None], _t(f))
    np.testing.assert_allclose(c[0].numpy(), q_ref, atol=1e-8)
    bary = bary[0].numpy()
    assert (bary >= 0).all() and np.allclose(bary.sum(-1), 1)
    assert ((bary[40:60] > 1 - 1e-12).sum(-1) == 1).all()  # vertex: one weight 1
    assert ((bary[60:] < 1e-12).sum(-1) >= 1).all()  # edge: one weight 0
    recon = (v[f[fi2[0].numpy()]] * bary[..., None]).sum(1)
    np.testing.assert_allclose(recon, c[0].numpy(), atol=1e-9)
    # gradient w.r.t. the point is the unit vector away from the closest point (off-surface ones)
    p = _t(pts[40:])[None].clone().requires_grad_(True)
    dd, _ = point_to_surface(p, _t(v)[None], _t(f))
    dd.sum().backward()
    u = (pts[40:] - q_ref[40:]) / ref[40:, None]
    np.testing.assert_allclose(p.grad[0].numpy(), u, atol=1e-7)


def test_regions_of_single_triangle_and_gradcheck():
    a = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64)
    c = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    # analytic cases: interior (height), edge ab (below), vertex a, vertex b, hypotenuse bc
    p = torch.tensor(
        [[1.0, 1.0, 2.0], [2.0, -1.5, 0.5], [-1.0, -2.0, 0.0], [6.0, -1.0, 1.0], [4.0, 3.0, 0.0]],
        dtype=torch.float64,
    )
    d2 = point_triangle_distance_sq(p, a, b, c)
    # bc: line 3x + 4y = 12; (4,3): (12+12-12)/5 = 2.4 and its foot lies inside the segment
    expect = torch.tensor([4.0, 1.5**2 + 0.25, 5.0, 4 + 1 + 1, 2.4**2], dtype=torch.float64)
    np.testing.assert_allclose(d2.numpy(), expect.numpy(), atol=1e-12)
    # gradcheck in float64 w.r.t. points and all vertices, points inside each region
    g = torch.Generator().manual_seed(0)
    P = torch.tensor(
        [[1.0, 0.7, 1.3], [2.1, -1.3, 0.4], [-1.2, -0.9, 0.3], [5.1, -0.8, 0.9], [3.1, 2.6, -0.7], [-0.8, 3.9, 0.2], [-1.1, 1.4, 0.6]],
        dtype=torch.float64,
    )
    A = (a + 0.01 * torch.randn(7, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    Bv = (b + 0.01 * torch.randn(7, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    C = (c + 0.01 * torch.randn(7, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    P.requires_grad_(True)
    assert torch.autograd.gradcheck(point_triangle_distance_sq, (P, A, Bv, C), fast_mode=True)
    f = lambda *x: safe_sqrt(point_triangle_distance_sq(*x))
    assert torch.autograd.gradcheck(f, (P, A, Bv, C), fast_mode=True)


@pytest.mark.parametrize("backend", ["torch", "grid"])
def test_point_to_surface_gradcheck_mesh(backend):
    """float64 gradcheck w.r.t. points and vertices; the grid backend differentiates with the
    query's own barycentrics (numba), the others with barycentrics re-solved in torch."""
    v, f = _mesh(0, seed=6, radius=10.0)  # 12 verts, 20 faces
    rng = np.random.default_rng(7)
    pts = rng.normal(size=(2, 5, 3)) * 9.0
    verts = np.stack([v, v * 1.1])
    P = _t(pts).requires_grad_(True)
    V = _t(verts).requires_grad_(True)
    fn = lambda p, vv: point_to_surface(p, vv, _t(f), backend=backend)[0]
    assert torch.autograd.gradcheck(fn, (P, V), fast_mode=True)
    assert torch.autograd.gradcheck(fn, (P, V), fast_mode=False)
    # the same gradients as differentiating the torch point-triangle distance (float64)
    grads = []
    for be in (backend, "torch"):
        p, vv = P.detach().clone().requires_grad_(True), V.detach().clone().requires_grad_(True)
        (point_to_surface(p, vv, _t(f), backend=be)[0] * torch.linspace(0.5, 2.0, 5, dtype=torch.float64)).sum().backward()
        grads.append((p.grad, vv.grad))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-10)
    # the igl query picks the same faces (up to ties), so it yields the same distances
    d_igl, _ = point_to_surface(P, V, _t(f), backend="igl")
    np.testing.assert_allclose(d_igl.detach().numpy(), fn(P, V).detach().numpy(), atol=1e-12)
    # float32, gradient w.r.t. one input only (points fixed, as for a scan): same as torch
    g32 = []
    for be in (backend, "torch"):
        vv = V.detach().float().requires_grad_(True)
        point_to_surface(P.detach().float(), vv, _t(f), backend=be)[0].sum().backward()
        assert vv.grad.dtype == torch.float32
        g32.append(vv.grad)
    np.testing.assert_allclose(g32[0].numpy(), g32[1].numpy(), atol=1e-5)


def test_degenerate_triangles_and_on_surface_finite_gradients():
    # zero-area: collinear triangle and a triangle collapsed to a point
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 4.0]], dtype=torch.float64, requires_grad=True)
    d = safe_sqrt(point_triangle_distance_sq(p, a, b, c))
    np.testing.assert_allclose(d.detach().numpy(), [4.0, 3.0], atol=1e-12)
    d.sum().backward()
    for t in (p, a, b, c):
        assert torch.isfinite(t.grad).all()
    np.testing.assert_allclose(p.grad.numpy(), [[0, 1, 0], [0, 0, 1]], atol=1e-12)
    # points exactly on the surface (a vertex, an edge, the interior, and on a degenerate triangle)
    v = torch.tensor([[0.0, 0, 0], [4, 0, 0], [0, 3, 0], [9, 9, 9]], dtype=torch.float64)[None].requires_grad_(True)
    f = torch.tensor([[0, 1, 2], [3, 3, 3]])
    pts = torch.tensor([[0.0, 0, 0], [2, 0, 0], [1, 1, 0], [9, 9, 9]], dtype=torch.float64)[None].requires_grad_(True)
    for backend in ("grid", "igl", "torch"):
        for sq in (False, True):
            d, fi = point_to_surface(pts, v, f, squared=sq, backend=backend)
            assert d.abs().max() == 0
            gp, gv = torch.autograd.grad(d.sum(), (pts, v))
            assert torch.isfinite(gp).all() and torch.isfinite(gv).all()
    # a whole degenerate face in a mesh: distance to the segment it collapses to
    v2 = _t(np.array([[0.0, 0, 0], [10, 0, 0], [20, 0, 0]]))[None]
    d, _ = point_to_surface(_t(np.array([[[25.0, 0, 0], [5, 3, 4]]])), v2, torch.tensor([[0, 1, 2]]), backend="torch")
    np.testing.assert_allclose(d[0].numpy(), [5.0, 5.0], atol=1e-12)


def test_flame_template(flame_dir):
    m = trimesh.load(flame_dir / "sampling_template.obj", process=False, force="mesh")
    v = np.asarray(m.vertices, dtype=np.float64) * 1000.0  # metres -> mm
    f = np.asarray(m.faces, dtype=np.int64)
    assert len(v) == 5023
    rng = np.random.default_rng(8)
    idx = rng.integers(0, len(v), 30)
    pts = v[idx] + rng.normal(size=(30, 3)) * 5.0
    P = _t(pts)[None].float().requires_grad_(True)
    V = _t(v)[None].float().requires_grad_(True)
    d, fi = point_to_surface(P, V, _t(f))
    ref, _, _ = naive_point_mesh(pts, v, f)
    np.testing.assert_allclose(d[0].detach().numpy(), ref, atol=1e-4)
    d_t, _ = point_to_surface(_t(pts)[None], _t(v)[None], _t(f), backend="torch")
    np.testing.assert_allclose(d_t[0].numpy(), ref, atol=1e-9)
    d.sum().backward()
    assert torch.isfinite(P.grad).all() and torch.isfinite(V.grad).all()
    np.testing.assert_allclose(P.grad.norm(dim=-1).numpy(), 1.0, atol=1e-3)


def test_bad_inputs():
    v = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]])
    f = torch.tensor([[0, 1, 2]])
    p = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="empty"):
        point_to_surface(torch.zeros(1, 0, 3), v, f)
    with pytest.raises(ValueError, match="NaN"):
        point_to_surface(torch.tensor([[[0.0, float("nan"), 0]]]), v, f)
    with pytest.raises(ValueError, match="verts contain NaN"):
        point_to_surface(p, v.clone().index_fill_(1, torch.tensor([1]), float("inf")), f)
    with pytest.raises(ValueError, match="out of range"):
        point_to_surface(p, v, torch.tensor([[0, 1, 3]]))
    with pytest.raises(ValueError, match="out of range"):
        point_to_surface(p, v, torch.tensor([[0, -1, 2]]))
    with pytest.raises(ValueError, match="faces must be"):
        point_to_surface(p, v, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        point_to_surface(p, v, f.float())
    with pytest.raises(ValueError, match="batch"):
        point_to_surface(torch.zeros(2, 4, 3), v, f)
    with pytest.raises(ValueError, match="points must be"):
        point_to_surface(torch.zeros(4, 3), v, f)
    with pytest.raises(ValueError, match="backend"):
        point_to_surface(p, v, f, backend="nope")
    with pytest.raises(ValueError, match="kaolin"):
        closest_faces(p, v, f, backend="kaolin")  # CPU inputs
