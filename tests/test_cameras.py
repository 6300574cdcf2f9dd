"""Cameras against OpenCV (projectPoints, undistortPoints, resize) and real image operations."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tempeh.cameras import Cameras, look_at_rotation, pixels_to_grid


# ----------------------------------------------------------------------------- fixtures
def random_rig(rng: np.random.Generator, shape=(4,), W=160, H=120, distortion=True,
               names=True):
    """Cameras ~1 m from the origin looking at a point near it, random roll and intrinsics.

    Returns (cams float64, eyes (*shape, 3), targets (*shape, 3))."""
    n = int(np.prod(shape))
    dirs = rng.normal(size=(n, 3))
    dirs[:, 2] = np.abs(dirs[:, 2]) + 0.5  # front hemisphere (+z), like the synthetic rig
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    eyes = dirs * rng.uniform(800, 1200, size=(n, 1))
    targets = rng.uniform(-30, 30, size=(n, 3))
    ups = np.array([0.0, 1.0, 0.0]) + rng.normal(scale=0.3, size=(n, 3))
    R = look_at_rotation(torch.from_numpy(eyes), torch.from_numpy(targets),
                         torch.from_numpy(ups)).numpy()
    t = -np.einsum("nij,nj->ni", R, eyes)
    f = rng.uniform(0.9, 1.3, size=n) * W
    K = np.zeros((n, 3, 3))
    K[:, 0, 0] = f
    K[:, 1, 1] = f * rng.uniform(0.97, 1.03, size=n)
    K[:, 0, 2] = W / 2 - 0.5 + rng.uniform(-5, 5, size=n)
    K[:, 1, 2] = H / 2 - 0.5 + rng.uniform(-5, 5, size=n)
    K[:, 2, 2] = 1
    dist = np.zeros((n, 5))
    if distortion:
        dist[:, 0] = rng.uniform(-0.25, 0.25, size=n)
        dist[:, 1] = rng.uniform(-0.1, 0.1, size=n)
        dist[:, 2:4] = rng.uniform(-0.003, 0.003, size=(n, 2))
        dist[:, 4] = rng.uniform(-0.05, 0.05, size=n)
    rs = lambda a: a.reshape(tuple(shape) + a.shape[1:])  # noqa: E731
    cams = Cameras.create(rs(K), rs(R), rs(t), W, H, dist=rs(dist),
                          names=[f"c{i}" for i in range(shape[-1])] if names else None,
                          dtype=torch.float64)
    return cams, rs(eyes), rs(targets)


def head_points(rng, P=50, half=300.0):
    """World points in a box around the origin, mm (they cover most of the image)."""
    return rng.uniform(-half, half, size=(P, 3))


def cv2_project(cams: Cameras, pts: np.ndarray) -> np.ndarray:
    """Oracle: cv2.projectPoints per camera of a (V,) batch -> (V, P, 2)."""
    a = cams.numpy()
    out = []
    for i in range(cams.batch_shape[0]):
        rvec = cv2.Rodrigues(a["R"][i])[0]
        uv, _ = cv2.projectPoints(pts.reshape(-1, 1, 3), rvec, a["t"][i], a["K"][i], a["dist"][i])
        out.append(uv.reshape(-1, 2))
    return np.stack(out)


# ----------------------------------------------------------------------------- projection
def test_project_matches_cv2_float64(rng):
    cams, _, _ = random_rig(rng, (5,))
    pts = head_points(rng)
    uv, depth = cams.project(torch.from_numpy(pts))
    ref = cv2_project(cams, pts)
    assert uv.shape == (5, 50, 2) and depth.shape == (5, 50)
    assert np.abs(uv.numpy() - ref).max() < 1e-3
    # depth is the camera-frame z
    a = cams.numpy()
    z = np.einsum("vij,pj->vpi", a["R"], pts)[..., 2] + a["t"][:, None, 2]
    np.testing.assert_allclose(depth.numpy(), z, rtol=0, atol=1e-9)
    # the distortion really is active (otherwise the test proves little)
    und, _ = cams._replace(dist=torch.zeros_like(cams.dist)).project(torch.from_numpy(pts))
    assert (und - uv).abs().max() > 2.0


def test_project_matches_cv2_float32_batched(rng):
    B, V = 2, 3
    cams, _, _ = random_rig(rng, (B, V))
    pts = np.stack([head_points(rng, 40) for _ in range(B)])  # (B, P, 3)
    cams32 = cams.to(dtype=torch.float32)
    uv, depth = cams32.project(torch.from_numpy(pts).float()[:, None])  # (B, 1, P, 3)
    assert uv.dtype == torch.float32 and uv.shape == (B, V, 40, 2)
    for b in range(B):
        ref = cv2_project(cams[b], pts[b])
        assert np.abs(uv[b].double().numpy() - ref).max() < 1e-3
    uv64, _ = cams.project(torch.from_numpy(pts)[:, None])
    assert (uv64 - uv.double()).abs().max() < 1e-3


def test_project_gradcheck(rng):
    cams, _, _ = random_rig(rng, (2, 2), names=False)
    pts = torch.from_numpy(head_points(rng, 3)).reshape(1, 1, 3, 3).expand(2, 1, 3, 3)
    pts = pts.clone().requires_grad_(True)
    K = cams.K.clone().requires_grad_(True)
    dist = cams.dist.clone().requires_grad_(True)

    def f(p, K, d):
        return cams._replace(K=K, dist=d).project(p)[0]
    assert torch.autograd.gradcheck(f, (pts, K, dist))


def test_project_skew_analytic():
    K = np.array([[500.0, 3.0, 60.0], [0.0, 480.0, 40.0], [0.0, 0.0, 1.0]])
    cams = Cameras.create(K[None], np.eye(3)[None], np.zeros((1, 3)), 128, 96,
                          dtype=torch.float64)
    p = torch.tensor([[[10.0, -5.0, 200.0]]], dtype=torch.float64)
    uv, _ = cams.project(p)
    x, y = 10 / 200, -5 / 200
    np.testing.assert_allclose(uv[0, 0].numpy(), [500 * x + 3 * y + 60, 480 * y + 40], atol=1e-12)


def test_worked_example_of_data_specs():
    """The hand-computed example in data_specs/cameras.md (also checked with cv2 there)."""
    R = np.array([[0.8, 0.0, -0.6], [0.0, -1.0, 0.0], [-0.6, 0.0, -0.8]])
    C = np.array([600.0, 0.0, 800.0])
    K = np.array([[2400, 0, 799.5], [0, 2400, 599.5], [0, 0, 1.0]])
    dist = np.array([-0.12, 0.08, 0.0005, -0.0003, 0])
    cams = Cameras.create(K[None], R[None], (-R @ C)[None], 1600, 1200, dist=dist[None],
                          dtype=torch.float64)
    np.testing.assert_allclose(cams.t.numpy(), [[0, 0, 1000]], atol=1e-12)
    uv, depth = cams.project(torch.tensor([[[30.0, 20.0, 50.0]]], dtype=torch.float64))
    np.testing.assert_allclose(uv[0, 0].numpy(), [784.214189, 548.549066], atol=1e-6)
    np.testing.assert_allclose(depth.numpy(), [[942.0]], atol=1e-12)
    ref = cv2.projectPoints(np.array([[30.0, 20.0, 50.0]]), cv2.Rodrigues(R)[0], -R @ C, K,
                            dist)[0]
    np.testing.assert_allclose(uv[0, 0].numpy(), ref.ravel(), atol=1e-9)


def test_centers_and_view_dirs(rng):
    cams, eyes, targets = random_rig(rng, (2, 3))
    np.testing.assert_allclose(cams.centers().numpy(), eyes, atol=1e-9)
    d = targets - eyes
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    np.testing.assert_allclose(cams.view_dirs().numpy(), d, atol=1e-12)
    # a point on the optical axis projects to the principal point (distortion vanishes there)
    on_axis = torch.from_numpy(eyes + 500 * d)[..., None, :]
    uv, depth = cams.project(on_axis)
    np.testing.assert_allclose(uv[..., 0, :].numpy(), cams.K[..., :2, 2].numpy(), atol=1e-9)
    np.testing.assert_allclose(depth[..., 0].numpy(), 500, atol=1e-9)


def test_pixel_rays_invert_projection_and_match_cv2(rng):
    cams, _, _ = random_rig(rng, (3,))
    uv = torch.from_numpy(np.stack([rng.uniform([-0.5, -0.5], [159.5, 119.5], size=(30, 2))
                                    for _ in range(3)]))
    o, d = cams.pixel_rays(uv)
    assert o.shape == (3, 1, 3) and d.shape == (3, 30, 3)
    np.testing.assert_allclose(d.norm(dim=-1).numpy(), 1, atol=1e-12)
    pts = o + d * torch.from_numpy(rng.uniform(300, 1500, size=(3, 30, 1)))
    uv2, depth = cams.project(pts)
    assert (depth > 0).all()
    assert (uv2 - uv).abs().max() < 1e-6
    # independent oracle: cv2.undistortPoints (iterated to convergence), rotated to world
    a = cams.numpy()
    crit = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 200, 1e-15)
    for i in range(3):
        xy = cv2.undistortPoints(uv[i].numpy().reshape(-1, 1, 2), a["K"][i], a["dist"][i],
                                 criteria=crit).reshape(-1, 2)
        dc = np.concatenate([xy, np.ones((30, 1))], 1)
        dw = dc @ a["R"][i]
        dw /= np.linalg.norm(dw, axis=1, keepdims=True)
        assert np.abs(dw - d[i].numpy()).max() < 1e-7


def test_in_image():
    cams = Cameras.create(np.eye(3)[None], np.eye(3)[None], np.zeros((1, 3)), 4, 3)
    uv = torch.tensor([[[-0.5, -0.5], [3.49, 2.49], [3.5, 0.0], [0.0, 2.5], [-0.51, 0.0]]])
    depth = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    assert cams.in_image(uv).tolist() == [[True, True, False, False, False]]
    depth[0, 0] = -1
    assert cams.in_image(uv, depth).tolist() == [[False, True, False, False, False]]


# ----------------------------------------------------------------------------- image operations
def blob_image(uv: np.ndarray, W: int, H: int, sigma: float = 3.0) -> np.ndarray:
    """float64 image with a Gaussian blob centred on every (sub-pixel) uv, pixel-centre origin."""
    u = np.arange(W)[None, None, :]
    v = np.arange(H)[None, :, None]
    img = np.exp(-((u - uv[:, 0, None, None]) ** 2 + (v - uv[:, 1, None, None]) ** 2)
                 / (2 * sigma ** 2)).sum(0)
    return img


def blob_centroid(img: np.ndarray, guess: np.ndarray, radius: int) -> np.ndarray:
    """Intensity centroid (pixel-centre coordinates) in a window around ``guess``."""
    u0, v0 = int(round(guess[0])), int(round(guess[1]))
    win = img[v0 - radius: v0 + radius + 1, u0 - radius: u0 + radius + 1]
    assert win.shape == (2 * radius + 1, 2 * radius + 1), "blob too close to the border"
    vv, uu = np.mgrid[v0 - radius: v0 + radius + 1, u0 - radius: u0 + radius + 1]
    s = win.sum()
    return np.array([(win * uu).sum() / s, (win * vv).sum() / s])


def _feature_setup(rng, W=160, H=120):
    """One camera with distortion and 3 world points whose projections are well separated."""
    while True:
        cams, _, _ = random_rig(rng, (1,), W=W, H=H)
        pts = head_points(rng, 3)
        uv, _ = cams.project(torch.from_numpy(pts))
        uv = uv[0].numpy()
        margin = 22
        inside = ((uv[:, 0] > margin) & (uv[:, 0] < W - 1 - margin) & (uv[:, 1] > margin)
                  & (uv[:, 1] < H - 1 - margin)).all()
        sep = np.linalg.norm(uv[:, None] - uv[None], axis=-1) + np.eye(3) * 1e3
        if inside and sep.min() > 50:
            return cams, pts, uv


def _check_features(cams2: Cameras, img2: np.ndarray, pts: np.ndarray, radius: int, tol: float):
    assert img2.shape == (int(cams2.height[0]), int(cams2.width[0]))
    uv2, _ = cams2.project(torch.from_numpy(pts))
    for p in uv2[0].numpy():
        c = blob_centroid(img2, p, radius)
        assert np.abs(c - p).max() < tol, (c, p)


@pytest.mark.parametrize("op", ["down_area", "up_linear", "size_area", "crop"])
def test_resize_and_crop_commute_with_projection(rng, op):
    W, H = 160, 120
    cams, pts, uv = _feature_setup(rng, W, H)
    img = blob_image(uv, W, H, sigma=3.0)
    # the blob centroid is exact in the original image (sanity of the measuring tool)
    for p in uv:
        assert np.abs(blob_centroid(img, p, 12) - p).max() < 1e-3
    if op == "down_area":
        img2 = cv2.resize(img, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
        cams2, radius, tol = cams.resize(0.5), 6, 0.02
    elif op == "up_linear":
        img2 = cv2.resize(img, (W * 2, H * 2), interpolation=cv2.INTER_LINEAR)
        cams2, radius, tol = cams.resize(2.0), 24, 0.02
    elif op == "size_area":  # anisotropic exact factors through size=
        img2 = cv2.resize(img, (W // 2, H), interpolation=cv2.INTER_AREA)
        cams2, radius, tol = cams.resize(size=(W // 2, H)), 12, 0.02
    else:
        x0, y0, w, h = 17, 9, 120, 100
        img2 = img[y0: y0 + h, x0: x0 + w]
        cams2, radius, tol = cams.crop(x0, y0, w, h), 12, 1e-3
    _check_features(cams2, img2, pts, radius, tol)


@pytest.mark.parametrize("k", [1, 2, 3, -1])
def test_rotate90_commutes_with_projection(rng, k):
    W, H = 160, 120
    cams, pts, uv = _feature_setup(rng, W, H)
    img = blob_image(uv, W, H)
    img2 = np.ascontiguousarray(np.rot90(img, k))
    cams2 = cams.rotate90(k)
    _check_features(cams2, img2, pts, 12, 1e-3)
    # still a proper OpenCV camera: R orthonormal with det +1, the same centre and K upper-left
    R = cams2.R[0].numpy()
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert abs(np.linalg.det(R) - 1) < 1e-12
    np.testing.assert_allclose(cams2.centers().numpy(), cams.centers().numpy(), atol=1e-9)
    # and it agrees with cv2.projectPoints (rotated tangential terms included)
    np.testing.assert_allclose(cams2.project(torch.from_numpy(pts))[0][0].numpy(),
                               cv2_project(cams2, pts)[0], atol=1e-3)


def test_rotate90_portrait_round_trip(rng):
    W, H = 120, 160  # portrait
    cams, pts, uv = _feature_setup(rng, W, H)
    img = blob_image(uv, W, H)
    land = np.ascontiguousarray(np.rot90(img, 1))
    cams_l = cams.rotate90(1)
    assert land.shape == (120, 160)
    assert (int(cams_l.width[0]), int(cams_l.height[0])) == (160, 120)
    _check_features(cams_l, land, pts, 12, 1e-3)
    back = cams_l.rotate90(-1)
    np.testing.assert_array_equal(np.rot90(land, -1), img)
    for f in ("K", "R", "t", "dist"):
        np.testing.assert_allclose(getattr(back, f).numpy(), getattr(cams, f).numpy(),
                                   atol=1e-12, err_msg=f)
    assert back.width.tolist() == [W] and back.height.tolist() == [H]
    four = cams.rotate90(4)
    np.testing.assert_allclose(four.K.numpy(), cams.K.numpy(), atol=1e-12)


def test_resize_formula_and_distortion_unchanged(rng):
    cams, _, _ = random_rig(rng, (2,), W=160, H=120)
    r = cams.resize(0.25)
    K, K2 = cams.K.numpy(), r.K.numpy()
    np.testing.assert_allclose(K2[:, 0, 0], K[:, 0, 0] * 0.25)
    np.testing.assert_allclose(K2[:, 0, 2], (K[:, 0, 2] + 0.5) * 0.25 - 0.5)
    np.testing.assert_allclose(K2[:, 1, 2], (K[:, 1, 2] + 0.5) * 0.25 - 0.5)
    assert r.width.tolist() == [40, 40] and r.height.tolist() == [30, 30]
    assert torch.equal(r.dist, cams.dist)
    with pytest.raises(ValueError):
        cams.resize()
    with pytest.raises(ValueError):
        cams.resize(0.5, size=(80, 60))


# ----------------------------------------------------------------------------- grid_sample
def test_pixels_to_grid_direct_read():
    g = torch.Generator().manual_seed(0)
    C, H, W = 2, 5, 7
    img = torch.rand(1, C, H, W, generator=g, dtype=torch.float64)
    vv, uu = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    uv = torch.stack([uu, vv], -1).reshape(1, -1, 1, 2).double()
    for mode in ("bilinear", "nearest"):
        out = F.grid_sample(img, pixels_to_grid(uv, W, H), mode=mode, align_corners=False)
        np.testing.assert_allclose(out[0, :, :, 0].numpy(), img[0].reshape(C, -1).numpy(),
                                   atol=1e-12)
    # halfway between pixel centres (3, 2) and (4, 2): the mean; corner (-0.5, -0.5) -> (-1, -1)
    q = torch.tensor([[[[3.5, 2.0]]]], dtype=torch.float64)
    out = F.grid_sample(img, pixels_to_grid(q, W, H), align_corners=False)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), img[0, :, 2, 3:5].mean(-1).numpy(),
                               atol=1e-12)
    np.testing.assert_allclose(pixels_to_grid(torch.tensor([-0.5, -0.5]), W, H).numpy(), [-1, -1])
    np.testing.assert_allclose(pixels_to_grid(torch.tensor([W - 0.5, H - 0.5]), W, H).numpy(),
                               [1, 1])
    # per-camera sizes as tensors broadcast over points
    uvb = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])
    gb = pixels_to_grid(uvb, torch.tensor([[4], [8]]), torch.tensor([[2], [4]]))
    np.testing.assert_allclose(gb.numpy(), [[[-0.25, 0.5]], [[-0.625, -0.25]]])


# ----------------------------------------------------------------------------- structure
def test_indexing_stack_cat_to(rng):
    cams, _, _ = random_rig(rng, (2, 3))
    assert cams.batch_shape == (2, 3) and len(cams) == 2
    c1 = cams[1]
    assert c1.batch_shape == (3,) and c1.names == ("c0", "c1", "c2")
    assert torch.equal(c1.K, cams.K[1])
    sel = cams[:, [2, 0]]
    assert sel.names == ("c2", "c0") and torch.equal(sel.R, cams.R[:, [2, 0]])
    assert cams[0, 1].batch_shape == () and cams[0, 1].names is None
    col = cams[:, 1]  # the view axis is gone: (B,) has no view names
    assert col.batch_shape == (2,) and col.names is None
    assert cams[0][torch.tensor([True, False, True])].names == ("c0", "c2")
    st = Cameras.stack([cams[0], cams[1]])
    for f in ("K", "R", "t", "dist", "width", "height"):
        assert torch.equal(getattr(st, f), getattr(cams, f))
    assert st.names == cams.names
    assert Cameras.stack([cams[0], cams[1]], dim=-1).names is None
    cat = Cameras.cat([cams[:, :1], cams[:, 1:]])
    assert cat.names == cams.names and torch.equal(cat.t, cams.t)
    cat1 = Cameras.cat([cams[0], cams[1]])
    assert cat1.batch_shape == (6,) and cat1.names == cams.names * 2
    c32 = cams.to(dtype=torch.float32)
    assert c32.K.dtype == c32.R.dtype == c32.t.dtype == c32.dist.dtype == torch.float32
    assert c32.width.dtype == torch.int64 and c32.names == cams.names
    assert cams.to("cpu").device.type == "cpu"
    with pytest.raises(ValueError):
        Cameras.stack([])
    with pytest.raises(ValueError):
        Cameras.cat([])


def test_bad_shapes_raise():
    K = torch.eye(3).expand(2, 3, 3)
    R = torch.eye(3).expand(2, 3, 3)
    t = torch.zeros(2, 3)
    d = torch.zeros(2, 5)
    w = torch.full((2,), 8)
    Cameras(K, R, t, d, w, w)
    with pytest.raises(ValueError, match="R"):
        Cameras(K, torch.eye(3).expand(3, 3, 3), t, d, w, w)
    with pytest.raises(ValueError, match="t"):
        Cameras(K, R, torch.zeros(2, 4), d, w, w)
    with pytest.raises(ValueError, match="dist"):
        Cameras(K, R, t, torch.zeros(2, 4), w, w)
    with pytest.raises(ValueError, match="width"):
        Cameras(K, R, t, d, torch.full((3,), 8), w)
    with pytest.raises(ValueError, match="names"):
        Cameras(K, R, t, d, w, w, names=("a", "b", "c"))
    with pytest.raises(ValueError):
        Cameras.create(torch.eye(3)[None], torch.eye(3)[None], torch.zeros(1, 2), 4, 4)
    # (k1, k2) distortion is padded to 5 coefficients
    c = Cameras.create(K, R, t, 8, 8, dist=torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    np.testing.assert_allclose(c.dist.numpy(), [[0.1, 0.2, 0, 0, 0], [0.3, 0.4, 0, 0, 0]])
