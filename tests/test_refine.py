"""Refinement model: chunking invariance, gradients, symmetric-grid identity, and overfitting one
synthetic frame (a textured sphere rendered analytically from 4 views)."""
import math

import numpy as np
import pytest
import torch
import trimesh

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.models.refine import RefineConfig, RefineModel, RefineOutput


def _rig(eyes, width=64, height=48, f=200.0, dtype=torch.float32):
    eyes = torch.as_tensor(eyes, dtype=torch.float64)
    V = eyes.shape[0]
    R = look_at_rotation(eyes, torch.zeros_like(eyes), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    t = -(R @ eyes.unsqueeze(-1)).squeeze(-1)
    K = torch.tensor([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    return Cameras.create(K.expand(1, V, 3, 3), R.unsqueeze(0), t.unsqueeze(0), width, height).to(dtype=dtype)


def _eye(yaw_deg, pitch_deg=0.0, r=600.0):
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    return [r * math.sin(a) * math.cos(b), r * math.sin(b), r * math.cos(a) * math.cos(b)]


def _texture(p):
    """Grey value of a world point (N, 3) mm on the sphere: smooth blobs, ~15 mm scale."""
    return 0.5 + 0.2 * np.sin(0.35 * p[:, 0] + 1.0) * np.cos(0.3 * p[:, 1]) + 0.2 * np.sin(0.25 * p[:, 2] + 0.4 * p[:, 1])


def _render_sphere(cams, radius):
    """(1, V, 1, H, W) images of a textured sphere at the origin (background 0.05)."""
    V = cams.batch_shape[1]
    H, W = int(cams.height[0, 0]), int(cams.width[0, 0])
    vv, uu = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    uv = torch.stack([uu, vv], -1).reshape(1, 1, -1, 2).expand(1, V, -1, -1)
    o, d = cams.to(dtype=torch.float64).pixel_rays(uv)  # (1,V,1,3), (1,V,P,3)
    o = o.expand_as(d).numpy()
    d = d.numpy()
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - radius ** 2
    disc = b * b - c
    hit = disc > 0
    tt = -b - np.sqrt(np.where(hit, disc, 0.0))
    p = o + tt[..., None] * d
    img = np.where(hit, _texture(p.reshape(-1, 3)).reshape(hit.shape), 0.05)
    return torch.from_numpy(img).float().reshape(1, V, 1, H, W)



@pytest.fixture(scope="module")
def scene():
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=60.0)  # 42 verts, outward CCW faces
    verts = torch.tensor(np.asarray(sphere.vertices), dtype=torch.float32)
    faces = torch.tensor(np.asarray(sphere.faces), dtype=torch.int64)
    cams = _rig([_eye(-50), _eye(0, 15), _eye(50), _eye(180, -10)])
    images = _render_sphere(cams, 60.0)
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(1, verts.shape[0], 3, generator=g) * 1.2).clamp(-2.5, 2.5)  # grid: +-3 mm
    return dict(verts=verts, faces=faces, cams=cams, images=images, coarse=verts.unsqueeze(0) + noise)


def test_config_validation_and_constructors():
    paper = RefineConfig.paper_scale()
    assert (paper.grid_side, paper.grid_spacing_mm, paper.feature_channels, paper.unet_levels) == (8, 2.0, 8, 3)
    assert paper.feature_blocks == (3, 4, 6, 3) and paper.unet_norm == "gn"
    assert RefineConfig.tiny().grid_side == 4
    with pytest.raises(ValueError):
        RefineConfig(unet_norm="bn")
    with pytest.raises(ValueError):
        RefineConfig(fusion_mode="mean")
    with pytest.raises(ValueError):
        RefineConfig(grid_side=6, unet_pools=2)


def test_zero_logits_return_the_coarse_mesh_exactly(scene):
    """Uniform softmax over the SYMMETRIC grid: zero offset, with and without rotations."""
    model = RefineModel(RefineConfig.tiny(), scene["verts"], scene["faces"]).double()
    with torch.no_grad():
        model.unet.head.weight.zero_()
        model.unet.head.bias.zero_()
    model.train()
    out = model(scene["images"].double(), scene["cams"], scene["coarse"], generator=torch.Generator().manual_seed(1))
    assert isinstance(out, RefineOutput)
    assert out.offsets.abs().max().item() < 1e-12
    torch.testing.assert_close(out.verts, scene["coarse"].double(), rtol=0, atol=1e-12)
    assert out.visibility.shape == (1, 4, 42) and out.visibility.dtype == torch.bool
    # the back camera (view 3) sees the back of the sphere, the front camera the front
    front = scene["verts"][:, 2] > 20
    assert out.visibility[0, 1, front].all() and not out.visibility[0, 3, front].any()


def test_chunked_equals_unchunked_outputs_and_gradients(scene):
    cfg_full = RefineConfig.tiny(chunk_size=None)
    torch.manual_seed(0)
    model = RefineModel(cfg_full, scene["verts"], scene["faces"]).double()
    images = scene["images"].double()
    results = []
    for chunk, ckpt in [(None, False), (5, False), (16, True)]:
        model.cfg.chunk_size, model.cfg.gradient_checkpointing = chunk, ckpt
        model.zero_grad()
        model.train()
        out = model(images, scene["cams"], scene["coarse"], generator=torch.Generator().manual_seed(3))
        target = scene["verts"].double().unsqueeze(0)
        ((out.verts - target) ** 2).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append((out.verts.detach(), grads))
    ref_v, ref_g = results[0]
    for v, g in results[1:]:
        torch.testing.assert_close(v, ref_v, rtol=1e-10, atol=1e-10)
        for k in ref_g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-8, atol=1e-10, msg=k)
    # the rotations matter (so the equality above is not trivial) and follow the generator
    model.cfg.chunk_size = None
    with torch.no_grad():
        a = model(images, scene["cams"], scene["coarse"], generator=torch.Generator().manual_seed(3)).verts
        b = model(images, scene["cams"], scene["coarse"], generator=torch.Generator().manual_seed(4)).verts
    torch.testing.assert_close(a, ref_v, rtol=1e-10, atol=1e-10)
    assert (a - b).abs().max().item() > 1e-6


def test_gradients_reach_every_parameter_not_the_coarse_mesh(scene):
    torch.manual_seed(1)
    model = RefineModel(RefineConfig.tiny(chunk_size=16, gradient_checkpointing=True),
                        scene["verts"], scene["faces"])
    model.train()
    coarse = scene["coarse"].clone().requires_grad_(True)
    out = model(scene["images"], scene["cams"], coarse, generator=torch.Generator().manual_seed(0))
    ((out.verts - scene["verts"]) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max().item() > 0, name
    assert coarse.grad is None  # coarse vertices are detached inputs


def test_naive_fusion_and_no_embedding_run(scene):
    cfg = RefineConfig.tiny(fusion_mode="naive", template_embedding=False)
    model = RefineModel(cfg, scene["verts"], scene["faces"]).eval()
    with torch.no_grad():
        out = model(scene["images"], scene["cams"], scene["coarse"])
    assert out.verts.shape == (1, 42, 3) and torch.isfinite(out.verts).all()
    assert model.unet.front[0][0].in_channels == 2 * cfg.feature_channels
    with pytest.raises(ValueError):
        model(scene["images"][:, :3], scene["cams"], scene["coarse"])
    with pytest.raises(ValueError):
        model(scene["images"], scene["cams"], scene["coarse"][:, :40])


def test_overfits_one_frame(scene):
    """Training on one frame from a perturbed coarse mesh cuts the vertex error >= 5x."""
    torch.manual_seed(0)
    cfg = RefineConfig.tiny(feature_norm="gn", random_rotation=False, chunk_size=None)
    model = RefineModel(cfg, scene["verts"], scene["faces"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = scene["verts"].unsqueeze(0)
    err0 = (scene["coarse"] - target).norm(dim=-1).mean().item()
    model.train()
    for _ in range(80):
        opt.zero_grad()
        out = model(scene["images"], scene["cams"], scene["coarse"])
        loss = ((out.verts - target) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        err = (model(scene["images"], scene["cams"], scene["coarse"]).verts - target).norm(dim=-1).mean().item()
    assert err0 > 1.5
    assert err < err0 / 5, (err0, err)
