"""Coarse stage: localizer start box and warp, U-Net at batch 1, gradients, forward modes, and
overfitting one synthetic frame rendered from a textured sphere."""
import numpy as np
import pytest
import torch

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.geometry.rotations import random_rotations
from tempeh.models.coarse import CoarseConfig, CoarseModel
from tempeh.models.localizer import Localizer, LocalizerOutput, warp_grid
from tempeh.models.unet3d import Conv3d, UNet3D
from tempeh.models.volume import grid_offsets, make_grid

F64 = torch.float64


def rig(V, W, H, f):
    az = torch.linspace(-0.8, 0.8, V, dtype=F64)
    eye = 1000 * torch.stack([torch.sin(az), 0.1 * torch.ones(V, dtype=F64), torch.cos(az)], -1)
    R = look_at_rotation(eye, torch.zeros(3, dtype=F64), torch.tensor([0, 1.0, 0], dtype=F64))
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    K = torch.tensor([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]], dtype=F64).expand(V, 3, 3)
    dist = torch.tensor([-0.05, 0.01, 0, 0, 0], dtype=F64).expand(V, 5)
    return Cameras.create(K, R, t, W, H, dist=dist)


def render_sphere(cams, center, radius):
    """Grey images (V, 1, H, W) of a procedurally textured sphere over a flat background."""
    V, W, H = cams.batch_shape[0], int(cams.width[0]), int(cams.height[0])
    vs, us = torch.meshgrid(torch.arange(H, dtype=F64), torch.arange(W, dtype=F64), indexing="ij")
    uv = torch.stack([us, vs], -1).reshape(1, -1, 2).expand(V, -1, -1)
    o, d = cams.pixel_rays(uv)
    oc = o - center
    b = (d * oc).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - radius ** 2)
    lam = -b - torch.sqrt(disc.clamp_min(0))
    X = o + d * lam.unsqueeze(-1) - center
    tex = 0.5 + 0.4 * torch.sin(X[..., 0] / 15) * torch.sin(X[..., 1] / 20 + 1) * torch.cos(X[..., 2] / 25)
    img = torch.where(disc > 0, tex, torch.full_like(tex, 0.1))
    return img.reshape(V, 1, H, W).float()



@pytest.fixture(scope="module")
def scene():
    V, H, W = 4, 48, 64
    cams = rig(V, W, H, 150.0)
    c = torch.tensor([10.0, -20.0, 5.0], dtype=F64)
    imgs = render_sphere(cams, c, 110.0)
    return imgs, cams.to(dtype=torch.float32), c.float()


def batch_of(scene, B):
    imgs, cams, _ = scene
    return imgs[None].expand(B, -1, -1, -1, -1).contiguous(), Cameras.stack([cams] * B)


def test_localizer_starts_at_documented_box(scene):
    cfg = CoarseConfig.tiny(grid_center_mm=(0.0, -50.0, 20.0))
    torch.manual_seed(0)
    model = CoarseModel(cfg).eval()
    imgs, cams = batch_of(scene, 2)
    with torch.no_grad():
        out = model(imgs, cams)
    s0 = cfg.localizer_init_extent_mm / ((cfg.grid_side - 1) * cfg.grid_spacing_mm)
    torch.testing.assert_close(out.localizer.scale, torch.full((2, 3), s0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.localizer.rotation, torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.localizer.translation, torch.zeros(2, 3), atol=1e-6, rtol=0)
    center = torch.tensor([cfg.grid_center_mm] * 2)
    box = make_grid(cfg.grid_side, cfg.localizer_init_extent_mm / (cfg.grid_side - 1), center)
    torch.testing.assert_close(out.grid, box, atol=1e-3, rtol=0)
    extent = (out.grid[:, -1, -1, -1] - out.grid[:, 0, 0, 0])
    torch.testing.assert_close(extent, torch.full((2, 3), cfg.localizer_init_extent_mm), atol=1e-3, rtol=0)
    # paper defaults: a 310 mm head box inside the 775 mm capture cube
    loc = Localizer(16)
    assert abs(loc.init_scale * 31 * 25.0 - 310.0) < 1e-9


def test_warp_grid_matches_naive_formula():
    g = torch.Generator().manual_seed(3)
    B, D = 2, 3
    from tempeh.geometry.rotations import random_rotations
    out = LocalizerOutput(torch.rand(B, 3, generator=g, dtype=F64),
                          random_rotations(B, generator=g, dtype=F64),
                          torch.randn(B, 3, generator=g, dtype=F64) * 50)
    Rg = random_rotations(B, generator=g, dtype=F64)
    center = torch.randn(B, 3, generator=g, dtype=F64) * 20
    d0 = grid_offsets(D, 25.0, dtype=F64)
    p = warp_grid(d0, out, center, Rg)
    for b in range(B):
        for idx in [(0, 0, 0), (2, 1, 0), (1, 2, 2)]:
            x = d0[idx].numpy()
            ref = center[b].numpy() + Rg[b].numpy() @ (
                out.scale[b].numpy() * (out.rotation[b].numpy() @ x) + out.translation[b].numpy())
            np.testing.assert_allclose(p[b][idx].numpy(), ref, atol=1e-10)


def test_conv3d_batch1_runs_on_onednn_and_matches_float64_reference():
    """Batch-1 CPU float32 input below PyTorch's size threshold: the oneDNN kernel runs (not
    slow_conv3d), and the value and gradients match a float64 F.conv3d."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    conv = Conv3d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, 8, 8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = conv(x)
    names = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in names and "aten::slow_conv3d_forward" not in names, names
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias))
    y64 = torch.nn.functional.conv3d(x64, w64, b64, padding=1)
    rx, rw, rb = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-4)
    for a, b in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-4)
    # batch 2 takes nn.Conv3d's own path: the same module, the same numbers per sample
    y2 = conv(torch.cat([x, x]).detach())
    torch.testing.assert_close(y2[1:], y.detach(), atol=1e-5, rtol=1e-5)


def test_unet3d_batch1_training_through_1cube_bottleneck():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, 16, 16)
    kw = dict(levels=4, widths=(4, 4, 8, 8, 8), front_kernel=3, back_widths=(4,))
    net = UNet3D(2, 3, norm="bn", **kw).train()  # default bottleneck_norm="gn"
    y = net(x)
    assert y.shape == (1, 3, 16, 16, 16) and torch.isfinite(y).all()
    y.mean().backward()
    net_in = UNet3D(2, 0, norm="in", **kw).train()
    assert net_in(x).shape == (1, 4, 16, 16, 16)
    # the reference behaviour (BatchNorm everywhere) cannot train at batch 1 over a 1^3 bottleneck
    ref = UNet3D(2, 3, norm="bn", bottleneck_norm=None, **kw).train()
    with pytest.raises(ValueError, match="more than 1 value"):
        ref(x)


def test_gradients_reach_every_parameter(scene):
    torch.manual_seed(0)
    model = CoarseModel(CoarseConfig.tiny()).train()
    imgs, cams = batch_of(scene, 2)
    out = model(imgs, cams, generator=torch.Generator().manual_seed(1))
    (out.verts - scene[2]).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    for part in (model.feature_net, model.unet, model.head, model.localizer.out):
        assert any(float(p.grad.abs().sum()) > 0 for p in part.parameters())
    groups = model.param_groups(1e-3, 1e-4)
    assert [g["name"] for g in groups] == ["base", "localizer"]
    assert groups[1]["lr"] == pytest.approx(1e-4)
    n_loc = sum(p.numel() for p in model.localizer.parameters())
    assert sum(p.numel() for p in groups[1]["params"]) == n_loc
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("train,fusion", [(False, "masked"), (True, "masked"), (True, "paper")])
def test_forward_modes(scene, B, train, fusion):
    torch.manual_seed(0)
    model = CoarseModel(CoarseConfig.tiny(fusion=fusion)).train(train)
    imgs, cams = batch_of(scene, B)
    with torch.no_grad():
        out = model(imgs, cams, generator=torch.Generator().manual_seed(2))
    assert out.verts.shape == (B, 64, 3) and torch.isfinite(out.verts).all()
    assert out.grid.shape == (B, 8, 8, 8, 3)
    # soft-argmax is a convex combination of the localised grid points
    lo = out.grid.reshape(B, -1, 3).min(1).values.unsqueeze(1)
    hi = out.grid.reshape(B, -1, 3).max(1).values.unsqueeze(1)
    assert bool(((out.verts >= lo - 1e-3) & (out.verts <= hi + 1e-3)).all())
    if not train:
        torch.testing.assert_close(out.grid_rotation, torch.eye(3).expand(B, 3, 3))


def test_random_grid_rotation_is_generator_driven(scene):
    torch.manual_seed(0)
    model = CoarseModel(CoarseConfig.tiny()).train()
    imgs, cams = batch_of(scene, 2)
    with torch.no_grad():
        a = model(imgs, cams, generator=torch.Generator().manual_seed(5))
        b = model(imgs, cams, generator=torch.Generator().manual_seed(5))
        c = model(imgs, cams, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a.grid_rotation, b.grid_rotation, atol=0, rtol=0)
    assert (a.grid_rotation - c.grid_rotation).abs().max() > 1e-3
    assert (a.grid_rotation[0] - a.grid_rotation[1]).abs().max() > 1e-3  # one per sample
    cfg = model.cfg
    ref = make_grid(cfg.grid_side, cfg.grid_spacing_mm, torch.zeros(2, 3), a.grid_rotation)
    torch.testing.assert_close(a.initial_grid, ref)
    eye = torch.eye(3).expand(2, 3, 3)
    torch.testing.assert_close(a.grid_rotation @ a.grid_rotation.transpose(1, 2), eye, atol=1e-5, rtol=0)


def test_small_grid_rotations_are_gaussian_rotation_vectors(scene):
    """random_rotations(sigma_deg=d): R = exp([w]_x) with w ~ N(0, d^2 I) (scipy's rotation vectors
    of the same draws as reference); with grid_rotation_deg = d the model uses exactly these in
    training, identity in eval."""
    from scipy.spatial.transform import Rotation
    R = random_rotations(4000, torch.Generator().manual_seed(3), torch.float64, sigma_deg=10.0)
    w = torch.randn(4000, 3, generator=torch.Generator().manual_seed(3), dtype=F64).numpy()
    ref = Rotation.from_rotvec(np.radians(10.0) * w).as_matrix()
    np.testing.assert_allclose(R.numpy(), ref, atol=1e-12)
    angle = np.degrees(Rotation.from_matrix(R.numpy()).magnitude())
    # |w| / d is chi-distributed with 3 degrees of freedom: median 1.538
    assert abs(np.median(angle) / 10.0 - 1.538) < 0.05, np.median(angle)
    model = CoarseModel(CoarseConfig.tiny(grid_rotation_deg=5.0)).train()
    imgs, cams = batch_of(scene, 2)
    with torch.no_grad():
        out = model(imgs, cams, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(out.grid_rotation,
                                   random_rotations(2, torch.Generator().manual_seed(7), sigma_deg=5.0))
        assert float((out.grid_rotation - torch.eye(3)).abs().max()) > 1e-3
        model.eval()
        torch.testing.assert_close(model(imgs, cams).grid_rotation, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="grid_rotation_deg"):
        CoarseConfig.tiny(grid_rotation_deg=-1.0)
    with pytest.raises(ValueError, match="sigma_deg"):
        random_rotations(2, sigma_deg=-1.0)


def test_overfits_one_synthetic_frame(scene):
    """Fixed grid (no random rotation), 4 views 48x64: v2v MSE drops >= 10x in 60 Adam steps."""
    torch.manual_seed(0)
    imgs, cams = batch_of(scene, 1)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 64, 3, generator=g)
    target = 90 * target / target.norm(dim=-1, keepdim=True) + scene[2]
    model = CoarseModel(CoarseConfig.tiny(random_grid_rotation=False)).train()
    opt = torch.optim.Adam(model.param_groups(1e-2, 1e-3))
    losses = []
    for _ in range(60):
        loss = (model(imgs, cams).verts - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert min(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])


def test_template_prior_places_the_template_in_the_initial_box(scene):
    """With zero head weights the untrained model predicts the template, its bounding-box centre
    at the grid centre; the localizer then moves it rigidly."""
    g = torch.Generator().manual_seed(3)
    N = 40
    tv = (torch.rand(N, 3, generator=g) - 0.5) * torch.tensor([100.0, 120.0, 90.0])
    cfg = CoarseConfig.tiny(num_verts=N, grid_spacing_mm=60.0, localizer_init_extent_mm=330.0,
                            localizer_max_scale=0.95,
                            template_prior_sigma_mm=28.0, random_grid_rotation=False,
                            grid_center_mm=(5.0, -10.0, 20.0))
    model = CoarseModel(cfg, tv).eval()
    with torch.no_grad():
        model.head.weight.zero_()
    imgs, cams = batch_of(scene, 1)
    out = model(imgs, cams)
    centre = 0.5 * (tv.min(0).values + tv.max(0).values)
    expect = tv - centre + torch.tensor(cfg.grid_center_mm)
    err = (out.verts[0] - expect).detach().norm(dim=-1)
    assert float(err.max()) < 1.0, float(err.max())  # mm; truncation/discretisation only
    # move the localizer's translation: the template follows exactly
    with torch.no_grad():
        model.localizer.out.bias[9:12] = torch.atanh(torch.tensor([10.0, -5.0, 2.0]) / 387.5)
    out2 = model(imgs, cams)
    np.testing.assert_allclose((out2.verts - out.verts)[0].detach().numpy(),
                               np.tile([10.0, -5.0, 2.0], (N, 1)), atol=2e-3)
    # the prior needs the template, of the right size
    with pytest.raises(ValueError, match="template_verts"):
        CoarseModel(cfg)
    with pytest.raises(ValueError, match="template_verts"):
        CoarseModel(cfg, tv[:5])
    # without the prior nothing changes: no buffers, same state-dict keys
    plain = CoarseModel(CoarseConfig.tiny(num_verts=N))
    assert set(plain.state_dict()) == set(model.state_dict())


def _posed_template_model(N, **overrides):
    """An untrained model with the template prior and zero head weights: it predicts the template
    placed in whatever box its grid has (see the test above)."""
    g = torch.Generator().manual_seed(5)
    tv = (torch.rand(N, 3, generator=g) - 0.5) * torch.tensor([100.0, 120.0, 90.0])
    base = dict(num_verts=N, grid_spacing_mm=60.0, localizer_init_extent_mm=330.0,
                localizer_max_scale=0.95, template_prior_sigma_mm=28.0, random_grid_rotation=False,
                grid_center_mm=(5.0, -10.0, 20.0))
    base.update(overrides)
    model = CoarseModel(CoarseConfig.tiny(**base), tv)
    with torch.no_grad():
        model.head.weight.zero_()
    return model, tv.double()


def test_rebox_predicts_again_in_the_similarity_box_of_the_first_prediction(scene):
    """A localizer box with anisotropic scale and a rotation poses the template anisotropically;
    one re-box pass puts the template in the least-squares similarity box of that prediction
    (reference: the numpy Umeyama fit of the template to it)."""
    from tempeh.fitting.rigid import similarity_from_correspondences
    N = 40
    model, tv = _posed_template_model(N)
    model.eval()
    with torch.no_grad():
        p = torch.tensor([0.62, 0.75, 0.70]) / 0.95
        model.localizer.out.bias[0:3] = torch.log(p / (1 - p))
        c, s_ = np.cos(0.3), np.sin(0.3)
        model.localizer.out.bias[3:9] = torch.tensor([c, 0, s_, 0, 1.0, 0])  # rows of R_y(0.3)
        model.localizer.out.bias[9:12] = torch.atanh(torch.tensor([12.0, -6.0, 3.0]) / 387.5)
    imgs, cams = batch_of(scene, 1)
    with torch.no_grad():
        first = model(imgs, cams).verts[0].double().numpy()
        model.cfg.rebox_iterations = 1
        second = model(imgs, cams).verts[0].double().numpy()
    sim = similarity_from_correspondences(tv.numpy(), first)
    expect = sim.apply(tv.numpy())
    assert np.abs(first - expect).max() > 5.0  # the first box is not a similarity of the template
    np.testing.assert_allclose(second, expect, atol=1.0)  # mm; prior discretisation only


def test_tta_boxes_average_the_prediction_with_jittered_boxes(scene):
    """Without jitter every extra box is the template's similarity box on the last prediction, so
    the TTA mean is (pass r + k x pass r+1) / (k + 1), with the passes taken from separate runs
    with r and r + 1 re-box passes. With jitter: fixed draws, independent of the batch."""
    N = 40
    model, _ = _posed_template_model(N, box_jitter_rot_deg=0.0, box_jitter_trans_mm=0.0,
                                     box_jitter_log_scale=0.0)
    with torch.no_grad():  # a non-trivial head: predictions are not similarities of the template
        model.head.weight.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
    model.eval()
    imgs, cams = batch_of(scene, 2)
    imgs[1] = imgs[1].flip(-1)  # a different second frame
    with torch.no_grad():
        model.cfg.rebox_iterations = 1
        r1 = model(imgs, cams).verts.double()
        model.cfg.rebox_iterations = 2
        r2 = model(imgs, cams).verts.double()
        assert float((r2 - r1).norm(dim=-1).mean()) > 0.5
        model.cfg.rebox_iterations, model.cfg.tta_boxes = 1, 3
        tta = model(imgs, cams).verts.double()
        torch.testing.assert_close(tta, (r1 + 3 * r2) / 4, atol=1e-3, rtol=0)
        model.cfg.box_jitter_rot_deg, model.cfg.box_jitter_trans_mm = 3.0, 3.0
        model.cfg.box_jitter_log_scale = 0.02
        jit = model(imgs, cams).verts
        assert float((jit.double() - tta).norm(dim=-1).mean()) > 0.05
        torch.testing.assert_close(model(imgs, cams).verts, jit)  # fixed draws
        torch.testing.assert_close(model(imgs[1:], cams[1:]).verts, jit[1:], atol=1e-4, rtol=0)
        model.train()  # training ignores it: one pass in the localizer's box
        model.cfg.rebox_iterations = 0
        t_on = model(imgs, cams, generator=torch.Generator().manual_seed(0)).verts
        model.cfg.tta_boxes = 0
        torch.testing.assert_close(model(imgs, cams, generator=torch.Generator().manual_seed(0)).verts, t_on)
    with pytest.raises(ValueError, match="tta_boxes"):
        CoarseConfig.tiny(tta_boxes=-1, template_prior_sigma_mm=10.0)
    with pytest.raises(ValueError, match="template_prior_sigma_mm"):
        CoarseConfig.tiny(tta_boxes=2)


def test_box_jitter_trains_the_unet_in_the_template_box_of_the_target(scene):
    """Training with box_jitter_prob = 1 and no jitter: the grid (with random grid rotation on) is
    the template's similarity box on the target, so the untrained model predicts the target when
    it is a similarity of the template; with jitter the box moves reproducibly per generator."""
    from scipy.spatial.transform import Rotation
    N = 40
    model, tv = _posed_template_model(N, random_grid_rotation=True, box_jitter_prob=1.0,
                                      box_jitter_rot_deg=0.0, box_jitter_trans_mm=0.0,
                                      box_jitter_log_scale=0.0)
    model.train()
    R = torch.from_numpy(Rotation.from_euler("yxz", [25, -10, 8], degrees=True).as_matrix())
    target = (1.1 * tv @ R.T + torch.tensor([15.0, -30.0, 10.0], dtype=F64)).float()[None].expand(2, -1, -1)
    imgs, cams = batch_of(scene, 2)
    with torch.no_grad():
        out = model(imgs, cams, generator=torch.Generator().manual_seed(0), pose_target=target)
        assert float((out.grid_rotation[0] - torch.eye(3)).abs().max()) > 0.1  # a rotated grid0
        np.testing.assert_allclose(out.verts.numpy(), target.numpy(), atol=1.2)  # 1.1 x prior error
        plain = model(imgs, cams, generator=torch.Generator().manual_seed(0))
        assert float((plain.verts - target).norm(dim=-1).median()) > 10.0  # localizer's box
        model.cfg.box_jitter_rot_deg, model.cfg.box_jitter_trans_mm = 3.0, 3.0
        a = model(imgs, cams, generator=torch.Generator().manual_seed(1), pose_target=target).verts
        b = model(imgs, cams, generator=torch.Generator().manual_seed(1), pose_target=target).verts
        torch.testing.assert_close(a, b)
        shift = (a - target).norm(dim=-1).mean(-1)
        assert bool((shift > 1.0).all()) and bool((shift < 25.0).all()), shift
        model.cfg.box_jitter_prob = 0.0  # never: the localizer's box, as without a target
        c = model(imgs, cams, generator=torch.Generator().manual_seed(0), pose_target=target).verts
        torch.testing.assert_close(c, plain.verts)
        model.eval()  # eval ignores the target
        torch.testing.assert_close(model(imgs, cams, pose_target=target).verts, model(imgs, cams).verts)
    with pytest.raises(ValueError, match="template_prior_sigma_mm"):
        CoarseConfig.tiny(rebox_iterations=1)
    with pytest.raises(ValueError, match="box_jitter_prob"):
        CoarseConfig.tiny(box_jitter_prob=1.5, template_prior_sigma_mm=10.0)
