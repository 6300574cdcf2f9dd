"""Tests for tempeh.geometry.visibility: analytic sphere and occluder cases, and a random scene
against a naive float64 Moller-Trumbore depth test with cv2.projectPoints as the image test."""
import cv2
import numpy as np
import pytest
import torch
import trimesh

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.geometry.visibility import occluded_segments, raycast_first_hit, visibility

BACKENDS = ["embree", "torch"]


def _cams(eyes, f=2000.0, size=(800, 600), dist=None, target=(0.0, 0.0, 0.0)):
    """(V,) cameras looking at ``target`` from ``eyes (V, 3)`` mm, y up in the image."""
    eyes = torch.as_tensor(np.asarray(eyes, dtype=np.float64))
    tgt = torch.as_tensor(np.asarray(target, dtype=np.float64)).expand_as(eyes)
    R = look_at_rotation(eyes, tgt, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    t = -(R @ eyes[..., None])[..., 0]
    W, H = size
    K = torch.tensor([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]], dtype=torch.float64).expand(len(eyes), 3, 3)
    return Cameras.create(K, R, t, W, H, dist=dist)


def naive_first_hit(o, d, tri, slack=0.0):
    """Float64 Moller-Trumbore over all triangles: smallest t >= 0 per ray (inf if none).
    ``o, d (R, 3)``, ``tri (F, 3, 3)``; barycentric bounds widened by ``slack``."""
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    e1, e2 = v1 - v0, v2 - v0
    p = np.cross(d[:, None], e2[None])
    det = (e1[None] * p).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / det
        s = o[:, None] - v0[None]
        u = (s * p).sum(-1) * inv
        q = np.cross(s, e1[None])
        v = (d[:, None] * q).sum(-1) * inv
        t = (e2[None] * q).sum(-1) * inv
    hit = (np.abs(det) > 1e-14) & (u >= -slack) & (v >= -slack) & (u + v <= 1 + slack) & (t >= 0)
    return np.where(hit, t, np.inf).min(-1)


def _sphere_setup():
    m = trimesh.creation.icosphere(subdivisions=3, radius=100.0)
    return torch.tensor(m.vertices)[None], torch.tensor(m.faces)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sphere_front_half_visible(backend):
    verts, faces = _sphere_setup()
    D = 1000.0
    cams = _cams([[0.0, 0.0, D], [D, 0.0, 0.0]])[None]
    vis = visibility(verts, faces, cams, backend=backend)
    assert vis.shape == (1, 2, verts.shape[1]) and vis.dtype == torch.bool
    X = verts[0].numpy()
    # a point of the sphere is visible from C iff X . C > R^2 (tangent cone); the polytope
    # is inscribed, so allow a band of 5 mm around the tangent plane
    for k, axis in enumerate([2, 0]):
        s = X[:, axis] * D - 100.0**2  # X . C - R^2 in mm^2, divided by D below
        margin = s / D
        sure_vis, sure_hid = margin > 5.0, margin < -5.0
        assert sure_vis.sum() > 250 and sure_hid.sum() > 250
        assert vis[0, k].numpy()[sure_vis].all()
        assert not vis[0, k].numpy()[sure_hid].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_occluder_hides_part_of_a_sheet(backend):
    # sheet: grid in the plane z = 0, x, y in [-95, 95] (offset so no vertex is on the shadow edge)
    g = np.linspace(-95.0, 95.0, 20) + 0.37
    xx, yy = np.meshgrid(g, g, indexing="ij")
    sheet = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], -1)
    idx = np.arange(xx.size).reshape(20, 20)
    q = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 4)
    sf = np.concatenate([q[:, [0, 1, 2]], q[:, [0, 2, 3]]])
    # occluder: square at z = 100 covering x in [-100, 0], y in [-100, 100]
    occ = np.array([[-100.0, -100, 100], [0, -100, 100], [0, 100, 100], [-100, 100, 100]])
    of = np.array([[0, 1, 2], [0, 2, 3]]) + len(sheet)
    verts = torch.tensor(np.concatenate([sheet, occ]))[None]
    faces = torch.tensor(np.concatenate([sf, of]))
    cams = _cams([[0.0, 0.0, 1000.0]])[None]
    vis = visibility(verts, faces, cams, backend=backend)[0, 0].numpy()
    # shadow of the occluder on z = 0 seen from (0, 0, 1000): x' = 0.9 x in [-100, 0]
    shadow = (0.9 * sheet[:, 0] >= -100) & (0.9 * sheet[:, 0] <= 0) & (np.abs(0.9 * sheet[:, 1]) <= 100)
    assert shadow.sum() > 100 and (~shadow).sum() > 100
    np.testing.assert_array_equal(vis[: len(sheet)], ~shadow)
    assert vis[len(sheet):].all()  # the occluder's own corners are visible
    # from behind, the occluder is behind the sheet: every sheet vertex is visible and the
    # occluder's corners are hidden (their rays cross z = 0 at |x|, |y| <= 90.9, on the sheet)
    vis_back = visibility(verts, faces, _cams([[0.0, 0.0, -1000.0]])[None], backend=backend)[0, 0].numpy()
    assert vis_back[: len(sheet)].all()
    assert not vis_back[len(sheet):].any()


def _random_scene(seed):
    rng = np.random.default_rng(seed)
    parts_v, parts_f, n = [], [], 0
    for _ in range(4):
        m = trimesh.creation.icosphere(subdivisions=1, radius=rng.uniform(30, 60))
        v = m.vertices * rng.uniform(0.8, 1.2, size=(len(m.vertices), 1)) + rng.uniform(-90, 90, size=3)
        parts_v.append(v)
        parts_f.append(m.faces + n)
        n += len(v)
    return np.concatenate(parts_v), np.concatenate(parts_f).astype(np.int64)


def _reference_visibility(verts, faces, cams_np, tol):
    """In image by cv2.projectPoints, in front, and first hit from the camera >= L - tol.

    Returns (visible, ambiguous) bool (V, N); ambiguous where widening/narrowing the triangles
    by 1e-6 or moving the threshold by tol/2 changes the answer."""
    tri = verts[faces]
    V = len(cams_np["K"])
    vis = np.zeros((V, len(verts)), bool)
    amb = np.zeros((V, len(verts)), bool)
    for k in range(V):  # loop over a handful of views in the reference only
        R, t, K = cams_np["R"][k], cams_np["t"][k], cams_np["K"][k]
        uv, _ = cv2.projectPoints(verts, cv2.Rodrigues(R)[0], t, K, cams_np["dist"][k])
        uv = uv[:, 0]
        W, H = cams_np["width"][k], cams_np["height"][k]
        inside = (uv[:, 0] >= -0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < H - 0.5)
        depth = (verts @ R.T + t)[:, 2]
        C = -R.T @ t
        d = verts - C
        L = np.linalg.norm(d, axis=-1)
        d = d / L[:, None]
        o = np.broadcast_to(C, verts.shape)
        hits = [naive_first_hit(o, d, tri, s) for s in (-1e-6, 0.0, 1e-6)]
        dec = [h >= L - tol for h in hits] + [hits[1] >= L - tol * f for f in (0.5, 1.5)]
        ok = inside & (depth > 0)
        vis[k] = ok & dec[1]
        border = np.minimum(np.abs(uv[:, 0] + 0.5), np.abs(uv[:, 0] - W + 0.5)) < 1e-3
        border |= np.minimum(np.abs(uv[:, 1] + 0.5), np.abs(uv[:, 1] - H + 0.5)) < 1e-3
        amb[k] = border | (ok & ~np.all(np.stack(dec) == dec[1], axis=0))
    return vis, amb


def test_random_scene_against_naive_depth_test_batch2():
    scenes = [_random_scene(1), _random_scene(2)]
    # the two scenes share the vertex count (same construction), so they can be batched
    verts = torch.tensor(np.stack([s[0] for s in scenes]))
    faces = torch.tensor(scenes[0][1])
    assert np.array_equal(scenes[0][1], scenes[1][1])
    rng = np.random.default_rng(3)
    cams = []
    for b in range(2):
        ang = rng.uniform(-1.2, 1.2, size=4)
        eyes = np.stack([600 * np.sin(ang), rng.uniform(-100, 100, 4), 600 * np.cos(ang)], -1)
        dist = torch.tensor([[-0.1, 0.02, 0.001, -0.001, 0.0]] * 4, dtype=torch.float64)
        cams.append(_cams(eyes, f=700.0, size=(320, 240), dist=dist))
    cams = Cameras.stack(cams)
    assert cams.batch_shape == (2, 4)
    tol = 0.5
    out = {be: visibility(verts, faces, cams, backend=be, tol=tol).numpy() for be in BACKENDS}
    for b in range(2):
        c_np = {k: v[b] for k, v in cams.numpy().items() if k != "names"}
        ref, amb = _reference_visibility(scenes[b][0], scenes[b][1], c_np, tol)
        assert amb.mean() < 0.02
        assert 0.15 < ref.mean() < 0.85  # a real mix of visible / hidden / outside
        uv, depth = cams[b].project(verts[b][None])
        in_img = cams[b].in_image(uv, depth).numpy()
        assert (~in_img).any()  # some vertices fall outside the image
        assert (in_img & ~ref).mean() > 0.2  # and many inside it are occluded
        for be in BACKENDS:
            np.testing.assert_array_equal(out[be][b][~amb], ref[~amb], err_msg=f"backend {be}, batch {b}")
        # batched == one mesh at a time
        single = visibility(verts[b : b + 1], faces, cams[b : b + 1], tol=tol).numpy()[0]
        np.testing.assert_array_equal(single, out["embree"][b])


def test_direct_embree_matches_embreex_api_and_naive(monkeypatch):
    """The embree backend calls the Embree 4 library bundled with embreex directly (threaded);
    it must give embreex's own answers and the naive float64 test's, for any thread count."""
    pytest.importorskip("embreex")
    from tempeh.geometry import embree_rays

    assert embree_rays.available()  # the wheel bundles the library: the fast path must load
    v, f = _random_scene(4)
    rng = np.random.default_rng(5)
    starts = v[rng.integers(0, len(v), 3000)]
    ends = rng.normal(size=(3000, 3)) * 400.0
    seg = ends - starts
    length = np.linalg.norm(seg, axis=1)
    d = seg / length[:, None]
    tol = 0.5
    o, reach = starts + tol * d, length - 2 * tol
    naive = naive_first_hit(o, d, v[f]) <= reach
    occ = embree_rays.EmbreeOccluder(v, f)
    outs = [occ.occluded(o, d, reach, num_threads=n) for n in (1, 3)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert 0.2 < naive.mean() < 0.8
    # float32 inside Embree: rays grazing an edge within rounding may differ from float64
    amb = (naive_first_hit(o, d, v[f], slack=1e-4) <= reach) != (naive_first_hit(o, d, v[f], slack=-1e-4) <= reach)
    assert amb.mean() < 0.02
    np.testing.assert_array_equal(outs[0][~amb], naive[~amb])
    st, en, vt, ft = (torch.tensor(x) for x in (starts, ends, v, f))
    direct = occluded_segments(st, en, vt, ft, tol=tol, backend="embree").numpy()
    from tempeh.geometry.visibility import _EmbreeMesh, _occluder

    assert isinstance(_occluder(v, f), embree_rays.EmbreeOccluder)
    monkeypatch.setattr(embree_rays, "available", lambda: False)  # as without the bundled library
    assert isinstance(_occluder(v, f), _EmbreeMesh)
    via_embreex = occluded_segments(st, en, vt, ft, tol=tol, backend="embree").numpy()
    np.testing.assert_array_equal(direct, outs[0])
    np.testing.assert_array_equal(direct[~amb], via_embreex[~amb])


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_image_and_behind_camera(backend):
    verts, faces = _sphere_setup()
    # narrow image: only a central strip of the sphere projects inside
    cams = _cams([[0.0, 0.0, 1000.0]], f=2000.0, size=(100, 600))
    # a camera inside... behind: looking away from the sphere (target on the far side of the eye)
    away = _cams([[0.0, 0.0, 1000.0]], target=(0.0, 0.0, 2000.0))
    vis = visibility(verts, faces, Cameras.cat([cams, away])[None], backend=backend)[0].numpy()
    X = verts[0].numpy()
    u = 2000.0 * X[:, 0] / (1000.0 - X[:, 2]) + 49.5  # pinhole, camera looks along -z
    outside = (u < -0.5 - 1e-6) | (u >= 99.5 + 1e-6)
    assert outside.sum() > 100
    assert not vis[0][outside].any()
    front = X[:, 2] > 20.0
    assert vis[0][front & ~outside & (np.abs(u - 49.5) < 45)].all()
    assert not vis[1].any()  # every vertex is behind the second camera


@pytest.mark.parametrize("backend", BACKENDS)
def test_raycast_first_hit_against_naive(backend):
    v, f = _random_scene(4)
    rng = np.random.default_rng(5)
    o = rng.normal(size=(200, 3)) * 50 + np.array([0.0, 0.0, 500.0])
    target = v[rng.integers(0, len(v), 200)] + rng.normal(size=(200, 3)) * 10.0
    d = target - o
    d[:10] = -d[:10]  # some rays point away from everything: no hit
    dist, face = raycast_first_hit(o, d * 3.0, v, f, backend=backend)  # unnormalised dirs
    du = d / np.linalg.norm(d, axis=-1, keepdims=True)
    ref = naive_first_hit(o, du, v[f])
    assert np.isinf(ref).sum() >= 10 and np.isfinite(ref).sum() > 100
    np.testing.assert_array_equal(np.isinf(dist), np.isinf(ref))
    hit = np.isfinite(ref)
    np.testing.assert_allclose(dist[hit], ref[hit], atol=1e-3)
    assert (face[~hit] == -1).all() and (face[hit] >= 0).all()
    # the reported face is really hit at the reported distance
    tri = v[f[face[hit]]]  # (H, 3, 3): test each ray against its own face
    per = np.array([naive_first_hit(o[hit][i : i + 1], du[hit][i : i + 1], tri[i : i + 1], 1e-6)[0] for i in range(len(tri))])
    np.testing.assert_allclose(per, ref[hit], atol=1e-3)


def test_occluded_segments_and_bad_inputs():
    verts, faces = _sphere_setup()
    starts = torch.tensor([[0.0, 0.0, -500.0], [0.0, 0.0, -500.0], [200.0, 0, 0]], dtype=torch.float64)
    ends = torch.tensor([[0.0, 0.0, 500.0], [0.0, 0.0, -150.0], [200.0, 0, 50]], dtype=torch.float64)
    for be in BACKENDS:
        np.testing.assert_array_equal(occluded_segments(starts, ends, verts[0], faces, backend=be).numpy(), [True, False, False])
    cams = _cams([[0.0, 0.0, 1000.0]])[None]
    with pytest.raises(ValueError, match="out of range"):
        visibility(verts, faces.clone().fill_(verts.shape[1]), cams)
    with pytest.raises(ValueError, match="NaN"):
        visibility(verts.clone().fill_(float("nan")), faces, cams)
    with pytest.raises(ValueError, match="batch shape"):
        visibility(verts, faces, _cams([[0.0, 0.0, 1000.0]]))
    with pytest.raises(ValueError, match="backend"):
        visibility(verts, faces, cams, backend="optix")
    with pytest.raises(ValueError, match="zero-length"):
        raycast_first_hit(np.zeros((1, 3)), np.zeros((1, 3)), verts[0], faces)
