"""Grid construction, multi-view sampling and fusion against independent references
(cv2.projectPoints + a numpy bilinear read, analytic world functions, naive float64 loops)."""
import cv2
import numpy as np
import pytest
import torch

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.models.volume import (fuse_mean_var, grid_offsets, make_grid, sample_views,
                                  weighted_mean_var)



def make_rig(V, W, H, f, dist=None, radius=1000.0, dtype=torch.float64, seed=0):
    """V cameras on the front half of a sphere around the origin, looking at the origin."""
    g = np.random.default_rng(seed)
    az = np.linspace(-1.0, 1.0, V) + g.uniform(-0.1, 0.1, V)
    el = g.uniform(-0.25, 0.25, V)
    eye = radius * np.stack([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)], -1)
    eye = torch.tensor(eye, dtype=dtype)
    R = look_at_rotation(eye, torch.zeros(3, dtype=dtype), torch.tensor([0.0, 1.0, 0.0], dtype=dtype))
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    K = torch.tensor([[f, 0.0, (W - 1) / 2 + 1.3], [0.0, f * 1.02, (H - 1) / 2 - 0.7], [0, 0, 1]],
                     dtype=dtype).expand(V, 3, 3)
    if dist is not None:
        dist = torch.tensor(dist, dtype=dtype).expand(V, 5)
    return Cameras.create(K, R, t, W, H, dist=dist)


DIST = [-0.12, 0.05, 0.001, -0.002, 0.01]


# --------------------------------------------------------------------------------- grids
def test_grid_offsets_symmetric_and_x_first():
    off = grid_offsets(4, 2.5, dtype=torch.float64)
    assert off.shape == (4, 4, 4, 3)
    np.testing.assert_allclose(off.reshape(-1, 3).mean(0).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(off[0, 0, 0].numpy(), [-3.75, -3.75, -3.75])
    np.testing.assert_allclose(off[3, 0, 0].numpy(), [3.75, -3.75, -3.75])  # axis i is x
    np.testing.assert_allclose(off[0, 3, 0].numpy(), [-3.75, 3.75, -3.75])  # axis j is y
    np.testing.assert_allclose(off[0, 0, 3].numpy(), [-3.75, -3.75, 3.75])  # axis k is z


def test_make_grid_matches_naive_loop():
    from scipy.spatial.transform import Rotation
    D, s = 3, 7.0
    center = torch.tensor([[10.0, -5.0, 2.0], [0.0, 1.0, -3.0]], dtype=torch.float64)
    R = torch.tensor(Rotation.random(2, random_state=3).as_matrix())
    grid = make_grid(D, s, center, R)
    assert grid.shape == (2, D, D, D, 3)
    for b in range(2):
        for i in range(D):
            for j in range(D):
                for k in range(D):
                    off = s * (np.array([i, j, k]) - (D - 1) / 2)
                    ref = center[b].numpy() + R[b].numpy() @ off
                    np.testing.assert_allclose(grid[b, i, j, k].numpy(), ref, atol=1e-12)
    # identity rotation: centre is the mean, the grid spans (D-1)*s
    g0 = make_grid(D, s, center, None)
    np.testing.assert_allclose(g0.reshape(2, -1, 3).mean(1).numpy(), center.numpy(), atol=1e-12)
    np.testing.assert_allclose((g0[:, -1, -1, -1] - g0[:, 0, 0, 0]).numpy(), (D - 1) * s, atol=1e-12)


# --------------------------------------------------------------------------------- sampling
def _bilinear_zero_pad(img, u, v):
    """img (C, h, w); pixel-centre convention, zero outside."""
    C, h, w = img.shape
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    out = np.zeros(C)
    for dv in (0, 1):
        for du in (0, 1):
            x, y = u0 + du, v0 + dv
            wt = (1 - abs(u - x)) * (1 - abs(v - y))
            if 0 <= x < w and 0 <= y < h:
                out += wt * img[:, y, x]
    return out


def test_sample_views_matches_cv2_projection_and_bilinear_read():
    B, V, C, h, w, P = 2, 3, 4, 23, 31, 40
    cams = Cameras.stack([make_rig(V, w, h, 30.0, dist=DIST, seed=s) for s in (0, 1)])
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(B, V, C, h, w, generator=g, dtype=torch.float64)
    pts = (torch.rand(B, P, 3, generator=g, dtype=torch.float64) - 0.5) * 500
    sampled, valid = sample_views(feats, cams, pts)
    assert sampled.shape == (B, V, P, C) and valid.shape == (B, V, P)
    assert valid.any() and (~valid).any()
    cn = cams.numpy()
    for b in range(B):
        for v in range(V):
            rvec, _ = cv2.Rodrigues(cn["R"][b, v])
            uv, _ = cv2.projectPoints(pts[b].numpy(), rvec, cn["t"][b, v], cn["K"][b, v], cn["dist"][b, v])
            uv = uv.reshape(-1, 2)
            for p in range(P):
                u, vv = uv[p]
                inside = -0.5 <= u < w - 0.5 and -0.5 <= vv < h - 0.5
                assert bool(valid[b, v, p]) == inside
                ref = _bilinear_zero_pad(feats[b, v].numpy(), u, vv) if inside else np.zeros(C)
                np.testing.assert_allclose(sampled[b, v, p].numpy(), ref, atol=1e-9)


def test_sample_views_direct_pixel_read_through_distortion():
    V, C, h, w = 3, 2, 12, 17
    cams = make_rig(V, w, h, 20.0, dist=DIST)[None]
    feats = torch.rand(1, V, C, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # back-project integer pixel centres of view 0 to depth 900 mm, then sample in all views
    us, vs = np.meshgrid(np.arange(2, w - 2), np.arange(2, h - 2))
    uv = torch.tensor(np.stack([us.ravel(), vs.ravel()], -1), dtype=torch.float64)
    o, d = cams[0, 0].pixel_rays(uv)
    depth_dir = d @ cams.R[0, 0, 2]  # camera z per unit ray length
    pts = o + d * (900.0 / depth_dir).unsqueeze(-1)
    sampled, valid = sample_views(feats, cams, pts[None])
    assert bool(valid[0, 0].all())
    ref = feats[0, 0][:, vs.ravel(), us.ravel()].T
    np.testing.assert_allclose(sampled[0, 0].numpy(), ref.numpy(), atol=1e-7)


def test_sample_views_reproduces_world_function_on_a_plane():
    """Each view 'renders' f(X) = A X + b of the point X where its pixel ray meets the plane
    z = 0; sampling the grid of points on that plane must give f back in every view."""
    V, h, w = 4, 90, 120
    cams = make_rig(V, w, h, 110.0, dist=[-0.08, 0.02, 0.0005, 0.0005, 0.0])[None]
    A = torch.tensor([[0.004, 0.001, 0.0], [-0.002, 0.003, 0.0], [0.001, 0.001, 0.0]],
                     dtype=torch.float64)
    b = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    vs, us = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    uv = torch.stack([us, vs], -1).reshape(1, 1, -1, 2).expand(1, V, -1, -1)
    o, d = cams.pixel_rays(uv)  # (1,V,1,3), (1,V,hw,3)
    lam = -o[..., 2] / d[..., 2]
    X = o + d * lam.unsqueeze(-1)  # on z = 0
    feats = (X @ A.T + b).reshape(1, V, h, w, 3).permute(0, 1, 4, 2, 3).contiguous()
    # points of a symmetric grid on the plane z = 0, inside the central region every view sees
    side = 9
    off = grid_offsets(side, 25.0, dtype=torch.float64)[:, :, side // 2]  # (D, D, 3), z = 0
    pts = off.reshape(1, -1, 3)
    sampled, valid = sample_views(feats, cams, pts)
    assert bool(valid.all())
    ref = (pts @ A.T + b)[:, None].expand(1, V, -1, -1)
    err = (sampled - ref).abs().max().item()
    span = (ref.max() - ref.min()).item()
    assert err < 2e-3 * span, (err, span)


def test_sample_views_behind_camera_and_size_check():
    V, h, w = 2, 10, 14
    cams = make_rig(V, w, h, 15.0)[None]
    feats = torch.ones(1, V, 1, h, w, dtype=torch.float64)
    centre = cams.centers()[0, 0]
    behind = centre + 300.0 * (centre / centre.norm())  # beyond the camera, away from the scene
    sampled, valid = sample_views(feats, cams, behind.view(1, 1, 3))
    assert not bool(valid[0, 0, 0])
    assert float(sampled[0, 0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="feature-map resolution"):
        sample_views(torch.ones(1, V, 1, h + 1, w, dtype=torch.float64), cams,
                     torch.zeros(1, 1, 3, dtype=torch.float64))


def test_sample_views_gradcheck_points():
    V, C, h, w = 2, 3, 9, 11
    cams = make_rig(V, w, h, 12.0, dist=DIST)[None]
    g = torch.Generator().manual_seed(5)
    feats = torch.rand(1, V, C, h, w, generator=g, dtype=torch.float64)
    pts = ((torch.rand(1, 5, 3, generator=g, dtype=torch.float64) - 0.5) * 200).requires_grad_(True)
    torch.autograd.gradcheck(lambda p: sample_views(feats, cams, p)[0], (pts,), eps=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- fusion
def _naive_weighted(sampled, weights, unbiased):
    B, V, P, C = sampled.shape
    mean = np.zeros((B, P, C))
    var = np.zeros((B, P, C))
    for b in range(B):
        for p in range(P):
            w = weights[b, :, p].astype(np.float64)
            if w.sum() <= 1e-8:
                continue
            w = w / w.sum()
            f = sampled[b, :, p, :]
            m = (w[:, None] * f).sum(0)
            vv = (w[:, None] * (f - m) ** 2).sum(0)
            if unbiased:
                den = 1 - (w ** 2).sum()
                vv = vv / den if den > 1e-6 else np.zeros(C)
            mean[b, p], var[b, p] = m, vv
    return mean, var


@pytest.mark.parametrize("unbiased", [False, True])
def test_weighted_mean_var_matches_naive(unbiased):
    rng = np.random.default_rng(2)
    B, V, P, C = 2, 5, 7, 3
    sampled = rng.normal(size=(B, V, P, C))
    weights = rng.uniform(0, 1, size=(B, V, P))
    weights[rng.uniform(size=weights.shape) < 0.3] = 0.0
    weights[0, :, 2] = 0.0  # a point no view sees
    weights[1, :, 4] = 0.0
    weights[1, 3, 4] = 0.7  # a point one view sees
    mean, var = weighted_mean_var(torch.tensor(sampled), torch.tensor(weights), unbiased=unbiased)
    m_ref, v_ref = _naive_weighted(sampled, weights, unbiased)
    np.testing.assert_allclose(mean.numpy(), m_ref, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), v_ref, atol=1e-12)
    assert float(mean[0, 2].abs().sum()) == 0.0 and float(var[0, 2].abs().sum()) == 0.0


def test_fuse_mean_var_masked_excludes_outside_views_paper_matches_torch_var():
    rng = np.random.default_rng(3)
    B, V, P, C = 1, 4, 6, 2
    sampled = torch.tensor(rng.normal(size=(B, V, P, C)))
    valid = torch.ones(B, V, P, dtype=torch.bool)
    valid[0, 1, :3] = False
    sampled[0, 1, :3] = 0.0  # sample_views returns zeros where invalid
    fused = fuse_mean_var(sampled, valid, "masked")
    assert fused.shape == (B, 2 * C, P)
    keep = [0, 2, 3]
    np.testing.assert_allclose(fused[0, :C, 0].numpy(), sampled[0, keep, 0].mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(fused[0, C:, 0].numpy(),
                               sampled[0, keep, 0].var(0, unbiased=False).numpy(), atol=1e-12)
    np.testing.assert_allclose(fused[0, :C, 5].numpy(), sampled[0, :, 5].mean(0).numpy(), atol=1e-12)
    paper = fuse_mean_var(sampled, valid, "paper")
    np.testing.assert_allclose(paper[0, :C].numpy(), sampled[0].mean(0).T.numpy(), atol=1e-12)
    np.testing.assert_allclose(paper[0, C:].numpy(), sampled[0].var(0, unbiased=True).T.numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="unknown mode"):
        fuse_mean_var(sampled, valid, "median")
