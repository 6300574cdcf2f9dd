"""Synthetic rig and renderer: silhouettes against an independent cv2.projectPoints rasteriser
(with lens distortion), speckle attached to the skin, rig sanity."""
import cv2
import numpy as np
import pytest
import torch
import trimesh

from tempeh.synth.render import (MARKING_ALBEDO, RenderConfig, first_hits, marking_albedo, render_mask,
                                 render_views, skin_texture)
from tempeh.synth.head import make_head_template
from tempeh.synth.rig import make_rig


def _head_like_mesh():
    """An ellipsoid about the size of a head with a nose-like bump (non-convex), mm."""
    ico = trimesh.creation.icosphere(subdivisions=4)
    v = np.asarray(ico.vertices) * np.array([80.0, 110.0, 95.0])
    nose = np.exp(-((v[:, 0] / 18) ** 2 + ((v[:, 1] - 0) / 25) ** 2)) * (v[:, 2] > 0)
    v[:, 2] += 25 * nose
    v[:, 1] -= 10
    return v, np.asarray(ico.faces, dtype=np.int64)


def _flame_mesh(flame_dir):
    m = trimesh.load(flame_dir / "sampling_template.obj", process=False)
    return np.asarray(m.vertices) * 1000.0, np.asarray(m.faces, dtype=np.int64)


def _raster_oracle(verts, faces, K, R, t, dist, W, H):
    """Naive pixel-centre rasteriser: a pixel is covered if its centre lies in the (straight-edged)
    image triangle of cv2.projectPoints'ed vertices. Used on a subdivided mesh so the curved
    images of the edges under distortion are well approximated."""
    rvec, _ = cv2.Rodrigues(R)
    uv, _ = cv2.projectPoints(verts.reshape(-1, 1, 3), rvec, t, K, dist)
    tri = uv.reshape(-1, 2)[faces]  # (F, 3, 2)
    out = np.zeros((H, W), bool)
    lo = np.ceil(tri.min(1)).astype(int)
    span = (np.floor(tri.max(1)).astype(int) - lo + 1).max(1)  # (F,)
    for k in np.unique(np.clip(span, 1, None)):
        sel = np.nonzero(np.clip(span, 1, None) == k)[0]
        ox, oy = np.meshgrid(np.arange(k), np.arange(k), indexing="xy")
        px = lo[sel, 0, None] + ox.ravel()[None]  # (f, k*k)
        py = lo[sel, 1, None] + oy.ravel()[None]
        a, b, c = tri[sel, 0], tri[sel, 1], tri[sel, 2]

        def edge(p, q):
            return (q[:, None, 0] - p[:, None, 0]) * (py - p[:, None, 1]) \
                - (q[:, None, 1] - p[:, None, 1]) * (px - p[:, None, 0])

        e0, e1, e2 = edge(a, b), edge(b, c), edge(c, a)
        inside = ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))
        inside &= (px >= 0) & (px < W) & (py >= 0) & (py < H)
        out[py[inside], px[inside]] = True
    return out


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("which", ["ellipsoid", "flame"])
def test_silhouette_matches_independent_rasteriser(which, request):
    if which == "flame":
        verts, faces = _flame_mesh(request.getfixturevalue("flame_dir"))
    else:
        verts, faces = _head_like_mesh()
    cams = make_rig(num_views=4, width=1600, height=1200, seed=3)
    assert torch.all(cams.dist[:, 0] < -0.05)  # real distortion is on
    cfg = RenderConfig(noise_sigma=0.0, background=0.0)
    imgs = render_views(verts, faces, cams, verts, np.random.default_rng(0), config=cfg,
                        downsample=8)
    assert imgs.shape == (4, 150, 200) and imgs.dtype == np.uint8
    mask = render_mask(verts, faces, cams, downsample=8)
    small = cams.resize(1 / 8).numpy()
    vs, fs = trimesh.remesh.subdivide(verts, faces)
    for i in range(4):
        ref = _raster_oracle(vs, fs, small["K"][i], small["R"][i], small["t"][i],
                             small["dist"][i], 200, 150)
        assert ref.sum() > 1500  # the head fills a good part of the frame (about 6 %)
        assert _iou(imgs[i] > 0, ref) >= 0.99, i
        assert _iou(mask[i], ref) >= 0.99, i
        # Without the distortion the oracle silhouette is measurably different.
        ref0 = _raster_oracle(vs, fs, small["K"][i], small["R"][i], small["t"][i],
                              np.zeros(5), 200, 150)
        assert _iou(ref0, ref) < _iou(mask[i], ref)


def test_speckle_moves_with_the_skin():
    verts, faces = _head_like_mesh()
    cams = make_rig(num_views=4, width=320, height=240, seed=1)[1:3]
    cfg = RenderConfig(noise_sigma=0.0, speckle_mm=4.0, downsample=1)
    delta = np.array([5.0, -4.0, 3.0])
    img1 = render_views(verts, faces, cams, verts, np.random.default_rng(0), config=cfg)
    img2 = render_views(verts + delta, faces, cams, verts, np.random.default_rng(0), config=cfg)
    W, H = 320, 240
    vv, uu = np.meshgrid(np.arange(H, dtype=float), np.arange(W, dtype=float), indexing="ij")
    uv = torch.from_numpy(np.stack([uu, vv], -1).reshape(1, -1, 2)).expand(2, -1, -1)
    o, d = cams.pixel_rays(uv)
    o = o.expand_as(d).reshape(-1, 3).numpy()
    d = d.reshape(-1, 3).numpy()
    face, dist, _ = first_hits(verts, faces, o, d)
    # Keep pixels well inside the silhouette and facing the camera.
    n = np.cross(*(verts[faces[:, 1:]] - verts[faces[:, :1]]).transpose(1, 0, 2))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    ok = face >= 0
    ok[ok] &= np.einsum("ij,ij->i", n[face[ok]], -d[ok]) > 0.5
    X = o + np.where(ok, dist, 0)[:, None] * d
    corr_tracked, corr_static = [], []
    for v in range(2):
        sl = slice(v * H * W, (v + 1) * H * W)
        m = ok[sl]
        uv2, _ = cams[v : v + 1].project(torch.from_numpy(X[sl][m] + delta)[None])
        uv2 = uv2[0].numpy().astype(np.float32)
        a = img1[v].reshape(-1)[m].astype(float)
        b = cv2.remap(img2[v].astype(np.float32), uv2[:, :1], uv2[:, 1:], cv2.INTER_LINEAR)[:, 0]
        c = img2[v].reshape(-1)[m].astype(float)  # same pixel, head moved
        corr_tracked.append(np.corrcoef(a, b)[0, 1])
        corr_static.append(np.corrcoef(a, c)[0, 1])
    assert min(corr_tracked) > 0.9, corr_tracked
    assert max(corr_static) < 0.6, corr_static


def test_skin_texture_is_a_function_of_rest_position():
    rng = np.random.default_rng(0)
    p = rng.uniform(-100, 100, (5000, 3))
    a = skin_texture(p, seed=7)
    assert np.array_equal(a, skin_texture(p, seed=7))
    assert np.corrcoef(a, skin_texture(p, seed=8))[0, 1] < 0.2
    # Continuous: a 0.01 mm step changes the value very little compared with its spread.
    assert np.abs(skin_texture(p + 0.01, seed=7) - a).max() < 0.1 * a.std()


def test_speckle_cell_scales_the_pattern():
    # The texture is a function of position / cell size: doubling both (exact in binary floating
    # point) gives the same values; the slow albedo (fixed 25 mm cells) is switched off.
    p = np.random.default_rng(1).uniform(-100, 100, (4000, 3))
    fine = RenderConfig(speckle_mm=3.0, albedo_variation=0.0)
    coarse = RenderConfig(speckle_mm=6.0, albedo_variation=0.0)
    assert np.array_equal(skin_texture(p, seed=4, cfg=fine), skin_texture(2 * p, seed=4, cfg=coarse))
    assert np.corrcoef(skin_texture(p, seed=4, cfg=fine), skin_texture(p, seed=4, cfg=coarse))[0, 1] < 0.5


def test_marking_albedo_regions_and_smoothing():
    tpl = make_head_template("low")
    N, faces = tpl.num_verts, tpl.faces
    assert np.array_equal(marking_albedo(N, faces, tpl.regions, strength=0.0), np.ones(N))
    raw = marking_albedo(N, faces, tpl.regions, strength=1.0, hair=0.3, smooth_iterations=0)
    assert np.allclose(raw[tpl.regions["scalp"]], 0.3)
    assert np.allclose(raw[tpl.regions["lips"]], MARKING_ALBEDO["lips"])
    eyes = np.concatenate([tpl.regions["left_eyeball"], tpl.regions["right_eyeball"]])
    assert np.allclose(raw[eyes], MARKING_ALBEDO["left_eyeball"])
    neck_only = np.setdiff1d(tpl.regions["neck"], np.concatenate([tpl.regions[k] for k in MARKING_ALBEDO]))
    assert neck_only.size and np.all(raw[neck_only] == 1.0)
    half = marking_albedo(N, faces, tpl.regions, strength=0.5, hair=0.3, smooth_iterations=0)
    assert np.allclose(half[tpl.regions["scalp"]], 0.65)
    # One smoothing round against a naive loop: half the vertex's own value, half the mean over
    # its distinct edge neighbours.
    smooth = marking_albedo(N, faces, tpl.regions, strength=1.0, hair=0.3, smooth_iterations=1)
    ring = [set() for _ in range(N)]
    for f in faces.tolist():
        for k in range(3):
            ring[f[k]].update((f[(k + 1) % 3], f[(k + 2) % 3]))
    expect = np.array([0.5 * raw[i] + 0.5 * np.mean([raw[j] for j in ring[i]]) for i in range(N)])
    assert np.abs(smooth - raw).max() > 0.1
    assert np.allclose(smooth, expect, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="strength"):
        marking_albedo(N, faces, tpl.regions, strength=1.5)
    with pytest.raises(ValueError, match="hair"):
        marking_albedo(N, faces, tpl.regions, hair=0.0)


def test_vertex_albedo_scales_the_reflectance():
    v, f = _head_like_mesh()
    cams = make_rig("paper", num_views=2)
    cfg = RenderConfig(noise_sigma=0.0, background=0.0, albedo=100.0)
    rng = np.random.default_rng(0)
    plain = render_views(v, f, cams, v, rng, config=cfg, downsample=16).astype(float)
    dim = render_views(v, f, cams, v, rng, config=cfg, downsample=16,
                       vertex_albedo=np.full(len(v), 0.5)).astype(float)
    on = plain > 0
    assert on.sum() > 200
    assert np.abs(dim[on] - 0.5 * plain[on]).max() <= 1.0  # uint8 rounding of both images
    # A dark half (x > 0) darkens only the pixels on that half.
    side = np.where(v[:, 0] > 0, 0.25, 1.0)
    split = render_views(v, f, cams, v, rng, config=cfg, downsample=16, vertex_albedo=side).astype(float)
    ratio = split[on & (plain > 40)] / plain[on & (plain > 40)]
    assert np.mean(ratio < 0.35) > 0.3 and np.mean(ratio > 0.95) > 0.3
    with pytest.raises(ValueError, match="vertex_albedo"):
        render_views(v, f, cams, v, rng, config=cfg, downsample=16, vertex_albedo=np.ones(3))


def test_paper_rig_layout():
    cams = make_rig()
    assert len(cams) == 16 and cams.names[0] == "23_A" and cams.names[-1] == "30_B"
    assert cams.width.tolist() == [1600] * 16 and cams.height.tolist() == [1200] * 16
    C = cams.centers().numpy()
    target = np.array([0.0, -30.0, -10.0])
    dist = np.linalg.norm(C - target, axis=-1)
    assert np.all((dist > 900) & (dist < 1100))
    az = np.degrees(np.arctan2(C[:, 0], C[:, 2]))
    assert az.min() < -70 and az.max() > 70 and np.all(C[:, 2] > -200)
    base = np.linalg.norm(C[0::2] - C[1::2], axis=-1)  # A/B stereo baselines
    assert np.all((base > 90) & (base < 150))
    fx = cams.K[:, 0, 0].numpy()
    assert np.all((fx > 1900) & (fx < 2100))
    # The head above the neck stays inside every view when the studio moves it by its full
    # +-100 mm along any axis.
    head = make_head_template("low").verts
    head = head[head[:, 1] > -120]
    shifts = np.concatenate([np.eye(3) * 100, -np.eye(3) * 100])
    pts = torch.from_numpy((head[None] + shifts[:, None]).reshape(-1, 3))
    uv, depth = cams.project(pts[None].expand(16, -1, -1))
    assert bool(cams.in_image(uv, depth).all())
    # Every camera sees the head centre near the image centre, in front of it.
    uv, depth = cams.project(torch.zeros(1, 3, dtype=torch.float64))
    assert torch.all(depth > 0) and torch.all((uv[:, 0, 0] - 800).abs() < 250)
    assert not torch.equal(make_rig(seed=1).K, cams.K)  # seed jitters the intrinsics


def test_random_rig_varies_with_seed():
    a, b = make_rig("random", seed=0), make_rig("random", seed=5)
    assert len(a) != len(b) or not torch.allclose(a.R, b.R)
    uv, depth = a.project(torch.zeros(1, 3, dtype=torch.float64))
    assert torch.all(depth > 0) and bool(a.in_image(uv, depth).all())
    assert len(make_rig("random", num_views=7, seed=2)) == 7
    with pytest.raises(ValueError):
        make_rig("dome")


def test_supersampling_is_an_area_average():
    verts, faces = _head_like_mesh()
    cams = make_rig(num_views=2, width=1600, height=1200, seed=4)
    flat = dict(noise_sigma=0.0, background=0.0, speckle_contrast=0.0, albedo_variation=0.0)
    one = render_views(verts, faces, cams, verts, np.random.default_rng(0), downsample=16,
                       config=RenderConfig(**flat)).astype(float)
    ss = render_views(verts, faces, cams, verts, np.random.default_rng(0), downsample=16,
                      config=RenderConfig(supersample=3, **flat)).astype(float)
    again = render_views(verts, faces, cams, verts, np.random.default_rng(0), downsample=16,
                        config=RenderConfig(**flat)).astype(float)
    assert ss.shape == one.shape == (2, 75, 100) and np.array_equal(one, again)
    # Same total light (coverage) within 2 %, and soft edges: partial-coverage pixels appear.
    assert abs(ss.sum() / one.sum() - 1) < 0.02
    edge = (ss > 0) & (ss < 0.5 * ss.max()) & (one == 0)
    assert edge.sum() > 20
