"""Local grids and surface-aware view fusion of the refinement stage (paper eqs. 1-3).

References are independent: explicit float64 loops / formulas, cv2.projectPoints for projection,
and feature maps that are linear functions of the pixel position (bilinear sampling reproduces
them exactly away from the border).
"""
import math

import cv2
import numpy as np
import pytest
import torch

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.models.local_fusion import (fuse_local, fusion_weights, local_grid_offsets, local_grids,
                                        softplus_floor)
from tempeh.models.volume import grid_offsets

BETA = 50.0


def _rig(eyes, width=64, height=48, f=600.0, dtype=torch.float64):
    """Cameras (1, V) at ``eyes`` (V, 3) mm looking at the origin, y up."""
    eyes = torch.as_tensor(eyes, dtype=dtype)
    V = eyes.shape[0]
    R = look_at_rotation(eyes, torch.zeros_like(eyes), torch.tensor([0.0, 1.0, 0.0], dtype=dtype))
    t = -(R @ eyes.unsqueeze(-1)).squeeze(-1)
    K = torch.tensor([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]], dtype=dtype)
    return Cameras.create(K.expand(1, V, 3, 3), R.unsqueeze(0), t.unsqueeze(0), width, height)


def _eye(deg, r=1000.0):
    """Camera position on a circle in the x-z plane, ``deg`` degrees from +z towards +x."""
    a = math.radians(deg)
    return [r * math.sin(a), 0.0, r * math.cos(a)]


def _softplus(x, beta=BETA):
    return np.log1p(np.exp(beta * x)) / beta


def _ref_weights(points, normals, vis, centers, valid):
    """Naive float64 eta: loops over (b, v, n, g)."""
    B, N, G, _ = points.shape
    V = centers.shape[1]
    out = np.zeros((B, V, N, G))
    for b in range(B):
        for v in range(V):
            for n in range(N):
                for g in range(G):
                    d = centers[b, v] - points[b, n, g]
                    cos = float(np.dot(normals[b, n], d / np.linalg.norm(d)))
                    out[b, v, n, g] = _softplus(float(vis[b, v, n]) * max(cos, 0.0)) * float(valid[b, v, n, g])
    return out


# ----------------------------------------------------------------------------- grids
def test_local_grid_offsets_symmetric_and_ordered():
    side, spacing = 5, 1.5
    d = local_grid_offsets(side, spacing, dtype=torch.float64)
    assert d.shape == (side ** 3, 3)
    # symmetric about the vertex: the rows sum to zero and the extremes are +-(side-1)/2*spacing
    assert torch.allclose(d.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert d.min().item() == pytest.approx(-3.0) and d.max().item() == pytest.approx(3.0)
    # flattened order: row (i*side + j)*side + k is ((i, j, k) - 2) * spacing, x along i
    for i, j, k in [(0, 0, 0), (4, 0, 0), (0, 3, 1), (2, 1, 4)]:
        g = (i * side + j) * side + k
        assert d[g].tolist() == pytest.approx([(i - 2) * spacing, (j - 2) * spacing, (k - 2) * spacing])
    # same convention as the coarse volume grid
    assert torch.equal(d, grid_offsets(side, spacing, dtype=torch.float64).reshape(-1, 3))
    # even side: no point at the vertex, half-cell symmetric
    d8 = local_grid_offsets(8, 2.0)
    assert sorted(set(d8[:, 0].tolist())) == [-7.0, -5.0, -3.0, -1.0, 1.0, 3.0, 5.0, 7.0]
    with pytest.raises(ValueError):
        local_grid_offsets(0, 2.0)
    with pytest.raises(ValueError):
        local_grid_offsets(4, 0.0)


def test_local_grids_rotated_matches_naive():
    g = torch.Generator().manual_seed(0)
    B, N, side, spacing = 2, 3, 3, 2.0
    verts = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 50
    rots = torch.linalg.qr(torch.randn(B, N, 3, 3, generator=g, dtype=torch.float64))[0]
    pts, offs = local_grids(verts, side, spacing, rots)
    d0 = local_grid_offsets(side, spacing, dtype=torch.float64).numpy()
    assert pts.shape == (B, N, side ** 3, 3) and offs.shape == pts.shape
    for b in range(B):
        for n in range(N):
            for k in range(side ** 3):
                ref = rots[b, n].numpy() @ d0[k]
                np.testing.assert_allclose(offs[b, n, k].numpy(), ref, atol=1e-12)
                np.testing.assert_allclose(pts[b, n, k].numpy(), verts[b, n].numpy() + ref, atol=1e-12)
    pts0, offs0 = local_grids(verts, side, spacing, None)
    assert torch.allclose(pts0 - verts.unsqueeze(2), torch.from_numpy(d0).expand(B, N, -1, -1))


# ----------------------------------------------------------------------------- weights
def test_fusion_weights_match_naive_reference():
    g = torch.Generator().manual_seed(1)
    B, N, side = 2, 4, 2
    eyes = [_eye(-60), _eye(0), _eye(45), _eye(170)]
    cams1 = _rig(eyes)
    cams = Cameras.stack([cams1[0], cams1[0]], dim=0)  # (B=2, V=4)
    V = 4
    verts = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 30
    normals = torch.nn.functional.normalize(torch.randn(B, N, 3, generator=g, dtype=torch.float64), dim=-1)
    pts, _ = local_grids(verts, side, 3.0)
    G = side ** 3
    vis = torch.rand(B, V, N, generator=g) > 0.3
    valid = torch.rand(B, V, N, G, generator=g) > 0.2
    eta = fusion_weights(pts, normals, vis, cams, valid.reshape(B, V, N * G), beta=BETA)
    ref = _ref_weights(pts.numpy(), normals.numpy(), vis.numpy(), cams.centers().numpy(), valid.numpy())
    assert eta.shape == (B, V, N, G)
    np.testing.assert_allclose(eta.numpy(), ref, rtol=1e-9, atol=1e-12)
    # float32 inputs agree closely too (the |o - p| expansion is well conditioned at 1 m)
    eta32 = fusion_weights(pts.float(), normals.float(), vis, cams.to(dtype=torch.float32), valid)
    np.testing.assert_allclose(eta32.double().numpy(), ref, rtol=2e-4, atol=1e-6)
    # naive mode: the in-image mask
    assert torch.equal(fusion_weights(pts, normals, vis, cams, valid, mode="naive"), valid.double())
    with pytest.raises(ValueError):
        fusion_weights(pts, normals, vis, cams, valid, mode="bogus")


def test_head_on_view_dominates_grazing_and_back_facing_gets_floor():
    # one vertex at the origin facing +z; head-on camera on +z, grazing at 80 deg, behind at 180
    cams = _rig([_eye(0), _eye(80), _eye(180)])
    verts = torch.zeros(1, 1, 3, dtype=torch.float64)
    normals = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    pts, _ = local_grids(verts, 1, 1.0)  # the vertex itself
    vis = torch.ones(1, 3, 1, dtype=torch.bool)
    valid = torch.ones(1, 3, 1, dtype=torch.bool)
    eta = fusion_weights(pts, normals, vis, cams, valid)[0, :, 0, 0]
    c80 = math.cos(math.radians(80))
    assert eta[0].item() == pytest.approx(_softplus(1.0), rel=1e-12)
    assert eta[1].item() == pytest.approx(_softplus(c80), rel=1e-9)
    assert eta[2].item() == pytest.approx(math.log(2) / BETA, rel=1e-12)  # back-facing: floor
    ratio = (eta[0] / eta[1]).item()
    assert ratio > 5.0  # ~1 / cos(80 deg) = 5.76
    assert ratio == pytest.approx(_softplus(1.0) / _softplus(c80), rel=1e-9)
    assert softplus_floor(BETA) == pytest.approx(0.013862943611198906)


# ----------------------------------------------------------------------------- fused features
def _linear_feats(cams, C=3):
    """(B, V, C, h, w) maps: channel 0 = u, 1 = v, 2 = 0.01 u v + view index (per view)."""
    B, V = cams.batch_shape
    h, w = int(cams.height[0, 0]), int(cams.width[0, 0])
    vv, uu = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    f = torch.stack([uu, vv, 0.0 * uu], 0).expand(B, V, C, h, w).clone()
    f[:, :, 2] = 7.0 * torch.arange(V, dtype=torch.float64).view(1, V, 1, 1)
    return f


def _cv2_uv(cams, b, v, pts):
    c = cams.numpy()
    rvec, _ = cv2.Rodrigues(c["R"][b, v])
    uv, _ = cv2.projectPoints(pts.reshape(-1, 1, 3), rvec, c["t"][b, v], c["K"][b, v], c["dist"][b, v])
    return uv.reshape(-1, 2)


def test_fuse_local_matches_cv2_reference_and_chunking_is_exact():
    eyes = [_eye(-40), _eye(0), _eye(35), _eye(175)]
    cams = _rig(eyes)
    V, C, side, spacing = 4, 3, 3, 2.0
    g = torch.Generator().manual_seed(2)
    N = 5
    verts = (torch.rand(1, N, 3, generator=g, dtype=torch.float64) - 0.5) * 20
    normals = torch.nn.functional.normalize(
        torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64) + 0.3 * torch.randn(1, N, 3, generator=g,
                                                                              dtype=torch.float64), dim=-1)
    vis = torch.ones(1, V, N, dtype=torch.bool)
    vis[0, 3] = False  # the camera behind the head
    vis[0, 2, 1] = False
    feats = _linear_feats(cams, C)
    out = fuse_local(feats, cams, verts, normals, vis, side, spacing, chunk_size=2)
    G = side ** 3
    assert out.shape == (N, 2 * C, side, side, side)
    pts, _ = local_grids(verts, side, spacing)
    valid = np.ones((1, V, N, G), dtype=bool)
    w = _ref_weights(pts.numpy(), normals.numpy(), vis.numpy(), cams.centers().numpy(), valid)[0]  # (V, N, G)
    fv = np.zeros((V, N * G, C))
    for v in range(V):
        uv = _cv2_uv(cams, 0, v, pts[0].reshape(-1, 3).numpy())
        assert (uv > 1).all() and (uv[:, 0] < 62).all() and (uv[:, 1] < 46).all()
        fv[v, :, 0], fv[v, :, 1], fv[v, :, 2] = uv[:, 0], uv[:, 1], 7.0 * v
    wn = w.reshape(V, N * G) / w.reshape(V, N * G).sum(0, keepdims=True)
    mean = (wn[..., None] * fv).sum(0)
    var = (wn[..., None] * (fv - mean) ** 2).sum(0)
    ref = np.concatenate([mean, var], -1).reshape(N, G, 2 * C).transpose(0, 2, 1).reshape(out.shape)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-7, atol=1e-6)
    # vertex chunking changes nothing, bit for bit
    for cs in (1, 3, 100):
        assert torch.equal(fuse_local(feats, cams, verts, normals, vis, side, spacing, chunk_size=cs), out)
    # naive mode: plain mean / biased variance over the (all in-image) views
    naive = fuse_local(feats, cams, verts, None, None, side, spacing, mode="naive")
    ref_n = np.concatenate([fv.mean(0), fv.var(0)], -1).reshape(N, G, 2 * C).transpose(0, 2, 1)
    np.testing.assert_allclose(naive.numpy(), ref_n.reshape(out.shape), rtol=1e-7, atol=1e-6)


def test_occluded_view_image_change_is_bounded_by_softplus_floor():
    """Changing the image of a view that cannot see the vertex moves the fused feature by at
    most the normalised Softplus floor times the change (mean), resp. 4 * max|f| times that
    (variance): derived from var = sum w f^2 - mean^2."""
    cams = _rig([_eye(-30), _eye(0), _eye(30), _eye(15)])  # view 3 sees the face but is occluded
    V, side, spacing, C = 4, 4, 2.0, 2
    verts = torch.tensor([[[0.0, 0.0, 0.0], [8.0, -5.0, 3.0]]], dtype=torch.float64)
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.2, 0.0, 0.98]]], dtype=torch.float64)
    normals = torch.nn.functional.normalize(normals, dim=-1)
    vis = torch.ones(1, V, 2, dtype=torch.bool)
    vis[0, 3, 0] = False  # vertex 0 is occluded in view 3 (vertex 1 is not)
    g = torch.Generator().manual_seed(3)
    feats = torch.rand(1, V, C, 48, 64, generator=g, dtype=torch.float64)
    feats2 = feats.clone()
    feats2[0, 3] = torch.rand(C, 48, 64, generator=g, dtype=torch.float64) * 5.0  # replace view 3
    a = fuse_local(feats, cams, verts, normals, vis, side, spacing)
    b = fuse_local(feats2, cams, verts, normals, vis, side, spacing)
    pts, _ = local_grids(verts, side, spacing)
    G = side ** 3
    w = _ref_weights(pts.numpy(), normals.numpy(), vis.numpy(), cams.centers().numpy(),
                     np.ones((1, V, 2, G), dtype=bool))[0]
    floor = math.log(2) / BETA
    assert np.allclose(w[3, 0], floor)
    w_occ = (floor / w[:, 0].sum(0)).max()  # normalised weight of the occluded view, worst point
    assert w_occ < 0.006  # three visible views: ~ floor / 3
    dmax = (feats2 - feats).abs().max().item()
    M = max(feats.abs().max().item(), feats2.abs().max().item())
    dmean = (b[0, :C] - a[0, :C]).abs().max().item()
    dvar = (b[0, C:] - a[0, C:]).abs().max().item()
    assert 0 < dmean <= w_occ * dmax * (1 + 1e-9)
    assert dvar <= 4 * M * w_occ * dmax * (1 + 1e-9)
    # vertex 1, visible in view 3, does change by much more than that bound: the test can fail
    assert (b[1, :C] - a[1, :C]).abs().max().item() > 20 * w_occ * dmax


def test_view_outside_image_has_exactly_zero_weight():
    # view 2 is a narrow-field camera: part of the cube projects outside its image
    cams = _rig([_eye(-20), _eye(20), _eye(0)], width=64, height=48)
    K = cams.K.clone()
    K[0, 2, 0, 0] = K[0, 2, 1, 1] = 12000.0  # 20x zoom: +-7 mm -> +-84 px at 1 m
    cams = Cameras.create(K, cams.R, cams.t, 64, 48)
    side, spacing, C, V = 4, 4.0, 2, 3
    verts = torch.zeros(1, 1, 3, dtype=torch.float64)
    normals = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    vis = torch.ones(1, V, 1, dtype=torch.bool)
    pts, _ = local_grids(verts, side, spacing)
    uv = _cv2_uv(cams, 0, 2, pts[0, 0].numpy())
    outside = (uv[:, 0] < -0.5) | (uv[:, 0] >= 63.5) | (uv[:, 1] < -0.5) | (uv[:, 1] >= 47.5)
    assert outside.any() and (~outside).any()
    from tempeh.models.volume import sample_views
    g = torch.Generator().manual_seed(4)
    feats = torch.rand(1, V, C, 48, 64, generator=g, dtype=torch.float64) + 1.0
    _, valid = sample_views(feats, cams, pts.reshape(1, -1, 3))
    eta = fusion_weights(pts, normals, vis, cams, valid)
    np.testing.assert_array_equal(eta[0, 2, 0].numpy() == 0.0, outside)
    assert (eta[0, :2] > 0.5).all()
    # the fused mean at those points is exactly the weighted mean of the two other views
    out = fuse_local(feats, cams, verts, normals, vis, side, spacing).reshape(2 * C, -1)
    fused_other = fuse_local(feats[:, :2], cams[:, :2], verts, normals, vis[:, :2], side, spacing)
    fused_other = fused_other.reshape(2 * C, -1)
    idx = torch.from_numpy(outside)
    torch.testing.assert_close(out[:, idx], fused_other[:, idx], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, ~idx], fused_other[:, ~idx])


def test_fuse_local_batch_order_and_rotations():
    """Rows are b-major (b * N + n) and rotated grids fuse at the rotated points."""
    cams1 = _rig([_eye(-30), _eye(10), _eye(40)])
    cams = Cameras.stack([cams1[0], cams1[0]], dim=0)  # (2, 3)
    g = torch.Generator().manual_seed(5)
    B, N, side, spacing = 2, 3, 2, 3.0
    verts = (torch.rand(B, N, 3, generator=g, dtype=torch.float64) - 0.5) * 20
    normals = torch.nn.functional.normalize(torch.randn(B, N, 3, generator=g, dtype=torch.float64), dim=-1)
    vis = torch.rand(B, 3, N, generator=g) > 0.3
    rots = torch.linalg.qr(torch.randn(B, N, 3, 3, generator=g, dtype=torch.float64))[0]
    feats = torch.rand(B, 3, 2, 48, 64, generator=g, dtype=torch.float64)
    out = fuse_local(feats, cams, verts, normals, vis, side, spacing, rots, chunk_size=2)
    for b in range(B):
        one = fuse_local(feats[b:b + 1], cams[b:b + 1], verts[b:b + 1], normals[b:b + 1], vis[b:b + 1],
                         side, spacing, rots[b:b + 1])
        torch.testing.assert_close(out[b * N:(b + 1) * N], one, rtol=1e-12, atol=1e-12)
    # R_z(180 deg) maps offset (x, y, z) to (-x, -y, z): volume index (i, j, k) -> (1 - i, 1 - j, k)
    Rz = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)).expand(B, N, 3, 3)
    a = fuse_local(feats, cams, verts, normals, vis, side, spacing, Rz)
    b0 = fuse_local(feats, cams, verts, normals, vis, side, spacing, None)
    torch.testing.assert_close(a, b0.flip(2, 3), rtol=1e-12, atol=1e-12)


def test_fuse_local_ignores_autocast():
    """Under bfloat16 autocast the sampling/weights still run in float32 (mm-accurate)."""
    cams = _rig([_eye(-30), _eye(10), _eye(40)]).to(dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    verts = (torch.rand(1, 4, 3, generator=g) - 0.5) * 20
    normals = torch.nn.functional.normalize(torch.randn(1, 4, 3, generator=g), dim=-1)
    vis = torch.ones(1, 3, 4, dtype=torch.bool)
    feats = torch.rand(1, 3, 2, 48, 64, generator=g)
    ref = fuse_local(feats, cams, verts, normals, vis, 2, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuse_local(feats, cams, verts, normals, vis, 2, 2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
