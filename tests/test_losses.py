"""Tests of tempeh.losses against naive float64 references and analytic cases."""
import math

import numpy as np
import pytest
import torch

from tempeh.geometry.mesh_ops import unique_edges
from tempeh.losses import (edge_loss, geman_mcclure, scan_to_mesh_distance, scan_to_mesh_loss,
                           total_loss, v2v_loss, weighted_terms)


def _plane(n=5, half=20.0):
    """Square (n x n vertices) in z = 0 spanning [-half, half]^2 mm, CCW triangles (normal +z)."""
    xs = np.linspace(-half, half, n)
    gx, gy = np.meshgrid(xs, xs, indexing="xy")
    verts = np.stack([gx.ravel(), gy.ravel(), np.zeros(n * n)], axis=1)
    i = (np.arange(n - 1)[None, :] + n * np.arange(n - 1)[:, None]).ravel()
    faces = np.concatenate([np.stack([i, i + 1, i + 1 + n], 1), np.stack([i, i + 1 + n, i + n], 1)])
    return torch.tensor(verts), torch.tensor(faces, dtype=torch.long)


def _sqrt_gm_ref(d, sigma):
    return math.sqrt(sigma ** 2 * d ** 2 / (sigma ** 2 + d ** 2) + 1e-16)


# ------------------------------------------------------------------------------------------ v2v

def test_v2v_matches_naive_and_respects_mask():
    g = torch.Generator().manual_seed(0)
    B, N = 2, 7
    pred = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    gt = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    ref = 0.0
    for b in range(B):
        for n in range(N):
            for c in range(3):
                ref += float(w[n]) ** 2 * float(pred[b, n, c] - gt[b, n, c]) ** 2
    assert math.isclose(v2v_loss(pred, gt, w).item(), ref / (B * N * 3), rel_tol=1e-12)
    wsum = float((w ** 2).sum())
    assert math.isclose(v2v_loss(pred, gt, w, normalize="weighted").item(),
                        ref / (B * 3 * wsum), rel_tol=1e-12)
    # zero-weight vertices do not matter
    pred2 = pred.clone()
    pred2[:, [0, 3]] += 100.0
    assert v2v_loss(pred2, gt, w).item() == pytest.approx(v2v_loss(pred, gt, w).item(), rel=1e-12)
    # no weights == all ones == plain MSE
    assert v2v_loss(pred, gt).item() == pytest.approx(((pred - gt) ** 2).mean().item(), rel=1e-12)
    # float32 weights broadcast to a float64 prediction
    assert v2v_loss(pred, gt, w.float()).dtype == torch.float64


def test_v2v_dist_matches_naive_float64():
    """kind="dist": the weighted mean Euclidean vertex distance, against a naive loop."""
    g = torch.Generator().manual_seed(2)
    B, N = 2, 6
    pred = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 10.0
    gt = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 10.0
    w = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    total = 0.0
    for b in range(B):
        for n in range(N):
            d2 = sum(float(pred[b, n, c] - gt[b, n, c]) ** 2 for c in range(3))
            total += abs(float(w[n])) * math.sqrt(d2 + 1e-8)
    assert math.isclose(v2v_loss(pred, gt, w, kind="dist").item(), total / (B * N), rel_tol=1e-12)
    wsum = float(w.abs().sum())
    assert math.isclose(v2v_loss(pred, gt, w, normalize="weighted", kind="dist").item(),
                        total / (B * wsum), rel_tol=1e-12)
    # analytic case: every vertex 3-4-0 mm off -> 5 mm; its gradient has unit length per vertex
    p = gt.clone() + torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    p.requires_grad_(True)
    loss = v2v_loss(p, gt, kind="dist", eps=0.0)
    assert loss.item() == pytest.approx(5.0, rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(p.grad.norm(dim=-1).numpy() * (B * N), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        v2v_loss(pred, gt, kind="l1")


def test_v2v_gradcheck_and_errors():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gt = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: v2v_loss(p, gt, w), (pred,))
    with pytest.raises(ValueError, match="vertex_weights"):
        v2v_loss(pred, gt, torch.ones(4))
    with pytest.raises(ValueError, match="gt shape"):
        v2v_loss(pred, gt[:, :4])
    with pytest.raises(ValueError, match="normalize"):
        v2v_loss(pred, gt, normalize="sum")
    with pytest.raises(ValueError, match="non-zero weight"):
        v2v_loss(pred, gt, torch.zeros(5), normalize="weighted")


# ------------------------------------------------------------------------------- robust penalty

def test_geman_mcclure_values_and_limits():
    sigma = 10.0
    d = torch.tensor([0.0, 1e-3, 1.0, 10.0, 25.0, 1e6], dtype=torch.float64)
    rho = geman_mcclure(d ** 2, sigma)
    ref = [_sqrt_gm_ref(x, sigma) for x in d.tolist()]
    np.testing.assert_allclose(rho.numpy(), ref, rtol=1e-12)
    assert rho[3].item() == pytest.approx(sigma / math.sqrt(2), rel=1e-12)  # d = sigma
    assert rho[1].item() == pytest.approx(1e-3, rel=1e-6)                   # ~ d for small d
    assert rho[-1].item() == pytest.approx(sigma, rel=1e-9)                 # saturates at sigma
    assert rho[0].item() == pytest.approx(1e-8)                             # sqrt(eps)
    gm = geman_mcclure(d ** 2, sigma, kind="gm")
    np.testing.assert_allclose(gm.numpy(), (sigma ** 2 * d ** 2 / (sigma ** 2 + d ** 2)).numpy())
    assert gm[3].item() == pytest.approx(sigma ** 2 / 2)
    assert gm[-1].item() == pytest.approx(sigma ** 2, rel=1e-9)
    assert gm[1].item() == pytest.approx(1e-6, rel=1e-6)                   # ~ d^2
    assert geman_mcclure(d ** 2, kind="l2").equal(d ** 2)
    np.testing.assert_allclose(geman_mcclure(d ** 2, kind="l1").numpy(),
                               np.sqrt(d.numpy() ** 2 + 1e-16))
    with pytest.raises(ValueError, match="sigma"):
        geman_mcclure(d, 0.0)
    with pytest.raises(ValueError, match="unknown kind"):
        geman_mcclure(d, kind="huber")


def test_geman_mcclure_gradient_finite_at_zero():
    for kind in ("sqrt_gm", "gm", "l1"):
        x = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
        geman_mcclure((x ** 2).sum(-1), 10.0, kind=kind).sum().backward()
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad, torch.zeros_like(x))
    # sqrt_gm derivative w.r.t. d is sigma^3 / (sigma^2 + d^2)^(3/2) (1 at d = 0)
    d = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64, requires_grad=True)
    geman_mcclure(d ** 2, 10.0).sum().backward()
    np.testing.assert_allclose(d.grad.numpy(), 1e3 / (100 + d.detach().numpy() ** 2) ** 1.5,
                               rtol=1e-7)


# --------------------------------------------------------------------------------- scan to mesh

def test_scan_to_mesh_loss_plane_analytic():
    verts, faces = _plane()
    g = torch.Generator().manual_seed(2)
    P = 40
    xy = (torch.rand(1, P, 2, generator=g, dtype=torch.float64) - 0.5) * 30.0  # inside
    h = torch.linspace(-30.0, 30.0, P, dtype=torch.float64).view(1, P, 1) + 0.01
    scan = torch.cat([xy, h], dim=-1)
    v = verts[None].clone().requires_grad_(True)
    for kind, sigma in [("sqrt_gm", 10.0), ("gm", 5.0), ("l1", 10.0), ("l2", 10.0)]:
        loss = scan_to_mesh_loss(scan, v, faces, sigma=sigma, kind=kind)
        ref = geman_mcclure(h.view(-1) ** 2, sigma, kind=kind).mean()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-10), kind
    # gradient: lifting the whole plane by t changes d_p = |h_p - t|, so
    # dL/dt = mean_p -sign(h_p) sigma^3 / (sigma^2 + h_p^2)^(3/2) = sum of z-grads of all verts
    loss = scan_to_mesh_loss(scan, v, faces)
    loss.backward()
    hh = h.view(-1).numpy()
    dldt = np.mean(-np.sign(hh) * 1e3 / (100 + hh ** 2) ** 1.5)
    assert torch.isfinite(v.grad).all()
    assert v.grad[0, :, 2].sum().item() == pytest.approx(dldt, rel=1e-8)
    np.testing.assert_allclose(v.grad[0, :, :2].numpy(), 0, atol=1e-12)
    # the non-robust metric is the mean |h|
    assert scan_to_mesh_distance(scan, v, faces).item() == pytest.approx(np.abs(hh).mean())


def test_scan_to_mesh_loss_valid_mask_and_batch_mean():
    verts, faces = _plane()
    vb = torch.stack([verts, verts + torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)])
    scan = torch.zeros(2, 4, 3, dtype=torch.float64)
    scan[..., 2] = torch.tensor([[1.0, 3.0, 5.0, 7.0], [1.0, 3.0, 5.0, 7.0]])
    valid = torch.tensor([[True, True, False, False], [True, True, True, False]])
    scan[0, 2] = float("nan")  # invalid padding may be NaN
    loss = scan_to_mesh_loss(scan, vb, faces, kind="l1", scan_valid=valid)
    # batch 0: |1|, |3| -> 2; batch 1 (plane at z=2): 1, 1, 3 -> 5/3; mean over batch
    assert loss.item() == pytest.approx((2.0 + 5.0 / 3.0) / 2, rel=1e-7)
    vb.requires_grad_(True)
    scan_to_mesh_loss(scan, vb, faces, scan_valid=valid).backward()
    assert torch.isfinite(vb.grad).all()


def test_scan_to_mesh_gradcheck():
    verts, faces = _plane(n=3, half=10.0)
    g = torch.Generator().manual_seed(3)
    verts = verts + 0.3 * torch.randn(verts.shape, generator=g, dtype=torch.float64)
    scan = torch.cat([(torch.rand(1, 6, 2, generator=g, dtype=torch.float64) - 0.5) * 12,
                      torch.randn(1, 6, 1, generator=g, dtype=torch.float64) * 8], -1)
    v = verts[None].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: scan_to_mesh_loss(scan, x, faces), (v,))


def test_scan_to_mesh_errors():
    verts, faces = _plane(n=3)
    v = verts[None]
    with pytest.raises(ValueError, match="empty"):
        scan_to_mesh_loss(torch.zeros(1, 0, 3, dtype=torch.float64), v, faces)
    with pytest.raises(ValueError, match="scan 0 of the batch has no valid points"):
        scan_to_mesh_loss(torch.zeros(1, 3, 3, dtype=torch.float64), v, faces,
                          scan_valid=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch"):
        scan_to_mesh_loss(torch.zeros(2, 3, 3, dtype=torch.float64), v, faces)
    bad = torch.zeros(1, 3, 3, dtype=torch.float64)
    bad[0, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="point 1 is marked valid but is not finite"):
        scan_to_mesh_loss(bad, v, faces)
    with pytest.raises(ValueError, match="scan_valid"):
        scan_to_mesh_loss(bad, v, faces, scan_valid=torch.ones(1, 3))
    with pytest.raises(ValueError, match="unknown kind"):
        scan_to_mesh_loss(bad, v, faces, kind="cauchy")


# ----------------------------------------------------------------------------------------- edge

def _naive_edge_loss(pred, gt, edges, w):
    B, E = pred.shape[0], len(edges)
    tot = 0.0
    for b in range(B):
        for k, (i, j) in enumerate(edges):
            for c in range(3):
                ep = float(pred[b, i, c] - pred[b, j, c])
                eg = float(gt[b, i, c] - gt[b, j, c])
                tot += float(w[k]) ** 2 * (ep - eg) ** 2
    return tot / (B * E * 3)


def test_edge_loss_identity_translation_and_naive():
    verts, faces = _plane(n=4)
    edges = unique_edges(faces)
    E = edges.shape[0]
    g = torch.Generator().manual_seed(4)
    gt = (verts[None] + torch.randn(2, 16, 3, generator=g, dtype=torch.float64)).clone()
    w = torch.rand(E, generator=g, dtype=torch.float64) * 3
    assert edge_loss(gt, gt, edges, w).item() == 0.0
    moved = gt + torch.tensor([5.0, -2.0, 7.0], dtype=torch.float64)
    assert edge_loss(moved, gt, edges, w).item() == pytest.approx(0.0, abs=1e-20)
    pred = gt + torch.randn(2, 16, 3, generator=g, dtype=torch.float64)
    assert edge_loss(pred, gt, edges, w).item() == pytest.approx(
        _naive_edge_loss(pred, gt, edges.tolist(), w), rel=1e-12)
    # a single vertex moved by delta: each incident edge contributes w^2 delta^2
    delta = 0.7
    pred = gt.clone()
    pred[:, 5, 1] += delta
    inc = ((edges[:, 0] == 5) | (edges[:, 1] == 5))
    expect = float((w[inc] ** 2).sum()) * delta ** 2 * 2 / (2 * E * 3)
    assert edge_loss(pred, gt, edges, w).item() == pytest.approx(expect, rel=1e-12)
    # uniform scale s: edge differences are (s - 1) * gt edge vectors
    s = 1.3
    eg = gt[:, edges[:, 0]] - gt[:, edges[:, 1]]
    expect = (s - 1) ** 2 * float((w.view(1, E, 1) ** 2 * eg ** 2).mean())
    assert edge_loss(s * gt, gt, edges, w).item() == pytest.approx(expect, rel=1e-12)
    # no weights == unit weights
    assert edge_loss(s * gt, gt, edges).item() == pytest.approx(
        edge_loss(s * gt, gt, edges, torch.ones(E)).item(), rel=1e-12)


def test_edge_loss_gradcheck_and_errors():
    verts, faces = _plane(n=3)
    edges = unique_edges(faces)
    g = torch.Generator().manual_seed(5)
    gt = verts[None].clone()
    pred = (gt + torch.randn(gt.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    w = torch.rand(edges.shape[0], generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: edge_loss(p, gt, edges, w), (pred,))
    with pytest.raises(ValueError, match="edge_weights"):
        edge_loss(pred, gt, edges, w[:-1])
    with pytest.raises(ValueError, match="out of range"):
        edge_loss(pred, gt, torch.tensor([[0, 9]]))
    with pytest.raises(ValueError, match=r"\(E>0, 2\)"):
        edge_loss(pred, gt, torch.zeros(0, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------- total

def test_total_loss_only_loss_keys():
    terms = {"loss_v2v": torch.tensor(2.0), "loss_edge": torch.tensor(3.0),
             "metric_s2m_mm": torch.tensor(100.0), "pred_verts": torch.zeros(2, 3)}
    assert total_loss(terms).item() == pytest.approx(5.0)
    assert total_loss(terms, {"loss_edge": 0.3, "loss_s2m": 0.0}).item() == pytest.approx(2.9)
    wt = weighted_terms(terms, {"loss_v2v": 10.0})
    assert set(wt) == {"loss_v2v", "loss_edge"} and wt["loss_v2v"].item() == 20.0
    with pytest.raises(ValueError, match="loss_s2m"):
        total_loss(terms, {"loss_s2m": 10.0})
    with pytest.raises(ValueError, match="'v2v'"):
        total_loss(terms, {"v2v": 1.0})
    with pytest.raises(ValueError, match="no 'loss_"):
        total_loss({"metric": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="scalar"):
        total_loss({"loss_x": torch.ones(3)})
