"""Tests of tempeh.geometry.mesh_ops against analytic cases and naive references."""
from collections import deque

import numpy as np
import pytest
import torch
import trimesh

from tempeh.geometry.mesh_ops import (face_normals, face_vertices, k_ring,
                                      laplacian_smoothing_offsets, mesh_laplacian_uniform,
                                      unique_edges, vertex_adjacency, vertex_normals)


def _icosphere(subdiv=2, radius=1.0):
    m = trimesh.creation.icosphere(subdivisions=subdiv, radius=radius)
    return np.asarray(m.vertices), np.asarray(m.faces, dtype=np.int64)


def _cube():
    m = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
    return np.asarray(m.vertices), np.asarray(m.faces, dtype=np.int64)


def _grid(nx, ny):
    """Planar (nx x ny) vertex grid in z=0, two CCW triangles per cell (normals +z)."""
    xs, ys = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64),
                         indexing="xy")
    verts = np.stack([xs.ravel(), ys.ravel(), np.zeros(nx * ny)], axis=1)
    i = np.arange(nx - 1)[None, :] + nx * np.arange(ny - 1)[:, None]
    i = i.ravel()
    f1 = np.stack([i, i + 1, i + 1 + nx], axis=1)
    f2 = np.stack([i, i + 1 + nx, i + nx], axis=1)
    return verts, np.concatenate([f1, f2]).astype(np.int64)


def _bfs_ring(num_verts, edges, seeds, k):
    adj = [[] for _ in range(num_verts)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    dist = np.full(num_verts, -1)
    q = deque()
    for s in seeds:
        dist[s] = 0
        q.append(s)
    while q:
        u = q.popleft()
        for w in adj[u]:
            if dist[w] < 0:
                dist[w] = dist[u] + 1
                q.append(w)
    return (dist >= 0) & (dist <= k)


def test_face_normals_tetrahedron_analytic():
    v = torch.tensor([[[0., 0, 0], [2, 0, 0], [0, 3, 0], [0, 0, 4]]], dtype=torch.float64)
    f = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    raw = face_normals(v, f, normalize=False)[0]
    # (v1-v0) x (v2-v0), by hand
    assert torch.allclose(raw[0], torch.tensor([0., 0, -6], dtype=torch.float64))
    assert torch.allclose(raw[1], torch.tensor([0., -8, 0], dtype=torch.float64))
    assert torch.allclose(raw[2], torch.tensor([-12., 0, 0], dtype=torch.float64))
    assert torch.allclose(raw[3], torch.tensor([12., 8, 6], dtype=torch.float64))
    unit = face_normals(v, f)[0]
    assert torch.allclose(unit[3], torch.tensor([12., 8, 6], dtype=torch.float64) / np.sqrt(244))
    # area = |raw| / 2 for the slanted face
    assert np.isclose(raw[3].norm().item() / 2, np.sqrt(244) / 2)


def test_vertex_normals_sphere_radial_and_batched():
    v, f = _icosphere(3, radius=50.0)
    rot = trimesh.transformations.rotation_matrix(0.7, [1, 2, 3])[:3, :3]
    vb = torch.tensor(np.stack([v, v @ rot.T + [5.0, -3.0, 2.0]]), dtype=torch.float64)
    n = vertex_normals(vb, torch.from_numpy(f))
    assert n.shape == (2, len(v), 3)
    assert torch.allclose(n.norm(dim=-1), torch.ones(2, len(v), dtype=torch.float64))
    radial = torch.tensor(v / np.linalg.norm(v, axis=1, keepdims=True))
    cos0 = (n[0] * radial).sum(-1)
    cos1 = (n[1] * (radial @ torch.tensor(rot.T))).sum(-1)
    assert cos0.min() > 0.999 and cos1.min() > 0.999


def test_vertex_normals_match_naive_area_weighted():
    v, f = _icosphere(1)
    rng = np.random.default_rng(3)
    v = v + rng.normal(scale=0.1, size=v.shape)
    ref = np.zeros_like(v)
    for a, b, c in f:  # naive float64 reference
        cr = np.cross(v[b] - v[a], v[c] - v[a])
        ref[a] += cr
        ref[b] += cr
        ref[c] += cr
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    n = vertex_normals(torch.tensor(v[None]), f)[0].numpy()
    np.testing.assert_allclose(n, ref, atol=1e-12)


def test_face_vertices_and_normals_gradcheck():
    v, f = _icosphere(0)  # 12 vertices, 20 faces
    g = torch.Generator().manual_seed(7)
    vb = torch.tensor(np.stack([v, 2 * v]), dtype=torch.float64)
    vb = (vb + 0.05 * torch.randn(vb.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    ft = torch.from_numpy(f)
    assert torch.equal(face_vertices(vb, ft), vb[:, ft])
    assert torch.autograd.gradcheck(lambda x: vertex_normals(x, ft), (vb,))


def test_cube_normals_are_axis_aligned():
    v, f = _cube()
    fn = face_normals(torch.tensor(v[None]), f)[0].numpy()
    centres = v[f].mean(axis=1)
    expected = np.zeros_like(centres)
    ax = np.argmax(np.abs(centres), axis=1)
    expected[np.arange(len(f)), ax] = np.sign(centres[np.arange(len(f)), ax])
    np.testing.assert_allclose(fn, expected, atol=1e-12)
    # vertex normals at cube corners point along the diagonal (equal area per axis pair)
    vn = vertex_normals(torch.tensor(v[None]), f)[0].numpy()
    assert np.all(np.sign(vn) == np.sign(v))


def test_degenerate_and_isolated_give_zero_not_nan():
    v = torch.tensor([[[0., 0, 0], [1, 0, 0], [2, 0, 0], [5, 5, 5]]])
    f = torch.tensor([[0, 1, 2]])
    assert torch.equal(face_normals(v, f), torch.zeros(1, 1, 3))
    vn = vertex_normals(v, f)
    assert torch.isfinite(vn).all() and torch.equal(vn[0, 3], torch.zeros(3))


def test_unique_edges_euler_and_order():
    for v, f, chi in [(*_icosphere(2), 2), (*_cube(), 2)]:
        e = unique_edges(torch.from_numpy(f))
        assert len(v) - e.shape[0] + len(f) == chi
        assert (e[:, 0] < e[:, 1]).all()
        key = e[:, 0] * len(v) + e[:, 1]
        assert (key[1:] > key[:-1]).all()  # sorted rows, no duplicates
    v, f = _grid(5, 4)
    e = unique_edges(f)
    # grid: horizontal 4*4 + vertical 5*3 + diagonals 4*3
    assert e.shape == (16 + 15 + 12, 2)
    assert len(v) - e.shape[0] + len(f) == 1  # disc
    ref = {tuple(sorted(p)) for t in f for p in [(t[0], t[1]), (t[1], t[2]), (t[2], t[0])]}
    assert {tuple(r) for r in e.tolist()} == ref


def test_unique_edges_flame(flame_dir):
    m = trimesh.load(flame_dir / "sampling_template.obj", process=False)
    assert unique_edges(np.asarray(m.faces)).shape == (14995, 2)


def test_vertex_adjacency_and_k_ring_grid_vs_bfs():
    v, f = _grid(7, 6)
    n = len(v)
    e = unique_edges(f).numpy()
    A = vertex_adjacency(f, n + 2).to_dense().numpy()  # two isolated vertices
    ref = np.zeros((n + 2, n + 2))
    ref[e[:, 0], e[:, 1]] = 1
    ref[e[:, 1], e[:, 0]] = 1
    np.testing.assert_array_equal(A, ref)
    for seeds, k in [([0], 0), ([0], 1), ([0], 2), ([20, 41], 2), ([3], 5), ([10, 11, 30], 20)]:
        got = k_ring(f, np.array(seeds), k, n).numpy()
        np.testing.assert_array_equal(got, _bfs_ring(n, e, seeds, k))
        mask = np.zeros(n, bool)
        mask[seeds] = True
        np.testing.assert_array_equal(k_ring(torch.from_numpy(f), torch.from_numpy(mask), k, n)
                                      .numpy(), got)


def test_k_ring_path_graph():
    # a chain of triangles sharing one vertex: 0-{1,2} | 2-{3,4} | 4-{5,6}; vertex 7 isolated
    f = np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    expect = {0: [1, 0, 0, 0, 0, 0, 0, 0], 1: [1, 1, 1, 0, 0, 0, 0, 0],
              2: [1, 1, 1, 1, 1, 0, 0, 0], 3: [1, 1, 1, 1, 1, 1, 1, 0],
              9: [1, 1, 1, 1, 1, 1, 1, 0]}
    for k, ref in expect.items():
        np.testing.assert_array_equal(k_ring(f, [0], k, 8).numpy(), np.array(ref, bool))
    with pytest.raises(ValueError, match="out of range"):
        k_ring(f, [9], 1, 8)
    with pytest.raises(ValueError, match="k must be"):
        k_ring(f, [0], -1, 8)


def test_uniform_laplacian():
    v, f = _grid(4, 4)
    L = mesh_laplacian_uniform(f, len(v)).to_dense().double()
    np.testing.assert_allclose(L.sum(1).numpy(), 0, atol=1e-6)  # constants in kernel
    x = torch.tensor(v)
    # interior vertex 5 of a regular grid with diagonals: neighbours symmetric -> offset 0
    lx = L @ x
    assert torch.allclose(lx[5], torch.zeros(3, dtype=torch.float64), atol=1e-6)
    off = laplacian_smoothing_offsets(x[None], f)[0]
    assert torch.allclose(off, lx, atol=1e-6)
    # corner vertex 0: neighbours 1 (1,0), 4 (0,1), 5 (1,1) -> mean (2/3, 2/3) -> offset -(2/3)
    assert torch.allclose(off[0], torch.tensor([-2 / 3, -2 / 3, 0], dtype=torch.float64))


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(F, 3\)"):
        unique_edges(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        unique_edges(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="out of range"):
        vertex_normals(torch.zeros(1, 3, 3), torch.tensor([[0, 1, 3]]))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        face_normals(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]))
