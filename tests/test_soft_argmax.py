"""Soft-argmax and the chunked / checkpointed head against naive float64 references."""
import numpy as np
import pytest
import torch

from tempeh.models.soft_argmax import SoftArgmaxHead, soft_argmax
from tempeh.models.volume import make_grid



def test_one_hot_volume_returns_voxel_centre_exactly():
    D = 6
    center = torch.tensor([[12.0, -40.0, 7.5], [-100.0, 3.0, 250.0]])
    R = torch.linalg.qr(torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0)))[0]
    grid = make_grid(D, 25.0, center, R).reshape(2, -1, 3)  # float32, world mm
    G = D ** 3
    idx = torch.tensor([[0, 17, G - 1, 100], [5, 5, 200, 63]])
    logits = torch.zeros(2, 4, G)
    logits.scatter_(2, idx.unsqueeze(-1), 1e4)
    out = soft_argmax(logits, grid)
    ref = torch.gather(grid, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
    assert (out - ref).abs().max().item() < 1e-4


def test_soft_argmax_matches_naive_loop_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    B, N, G = 2, 3, 7
    logits = torch.randn(B, N, G, generator=g, dtype=torch.float64)
    coords = torch.randn(B, G, 3, generator=g, dtype=torch.float64) * 50
    out = soft_argmax(logits, coords)
    L, Cc = logits.numpy(), coords.numpy()
    for b in range(B):
        for n in range(N):
            p = np.exp(L[b, n] - L[b, n].max())
            p /= p.sum()
            np.testing.assert_allclose(out[b, n].numpy(), (p[:, None] * Cc[b]).sum(0), atol=1e-10)
    torch.autograd.gradcheck(soft_argmax, (logits.requires_grad_(), coords.requires_grad_()))


def _run(head, feats, coords):
    head.zero_grad()
    f = feats.clone().requires_grad_(True)
    c = coords.clone().requires_grad_(True)
    out = head(f, c)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * w).sum().backward()
    return out.detach(), f.grad, c.grad, head.weight.grad.clone(), head.bias.grad.clone()


@pytest.mark.parametrize("checkpoint", [True, False])
def test_chunked_equals_naive_outputs_and_gradients(checkpoint):
    g = torch.Generator().manual_seed(2)
    B, C, D, N = 2, 5, 3, 11  # distinct sizes; 11 vertices in chunks of 4 (last chunk partial)
    feats = torch.randn(B, C, D, D, D, generator=g, dtype=torch.float64)
    coords = torch.randn(B, D, D, D, 3, generator=g, dtype=torch.float64) * 30
    naive = SoftArgmaxHead(C, N, mode="naive").double()
    with torch.no_grad():
        naive.bias.copy_(torch.randn(N, generator=g, dtype=torch.float64))
    chunked = SoftArgmaxHead(C, N, chunk_size=4, checkpoint=checkpoint, mode="chunked").double()
    chunked.load_state_dict(naive.state_dict())
    ref = _run(naive, feats, coords)
    got = _run(chunked, feats, coords)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-11)
    # the naive head is the explicit 1x1x1 conv + softmax over the grid + expectation
    logits = torch.nn.functional.conv3d(feats, naive.weight.detach().view(N, C, 1, 1, 1),
                                        naive.bias.detach())
    p = torch.softmax(logits.flatten(2), -1)
    ref_xyz = (p.unsqueeze(-1) * coords.reshape(B, 1, -1, 3)).sum(2)
    np.testing.assert_allclose(ref[0].numpy(), ref_xyz.numpy(), atol=1e-10)


def test_head_eval_without_grad_and_shape_errors():
    head = SoftArgmaxHead(4, 9, chunk_size=2, mode="chunked")
    feats = torch.randn(1, 4, 2, 2, 2)
    coords = torch.randn(1, 2, 2, 2, 3)
    with torch.no_grad():
        out = head(feats, coords)
    assert out.shape == (1, 9, 3)
    with pytest.raises(ValueError, match="channels"):
        head(torch.randn(1, 3, 2, 2, 2), coords)
    with pytest.raises(ValueError, match="coordinates"):
        head(feats, torch.randn(1, 7, 3))


def test_gaussian_log_prior_equals_naive_density_and_centres_uniform_logits():
    from tempeh.models.soft_argmax import gaussian_log_prior
    from tempeh.models.volume import grid_offsets

    g = torch.Generator().manual_seed(5)
    D, N, sigma = 9, 6, 1.3
    means = (torch.rand(N, 3, generator=g, dtype=torch.float64) - 0.5) * 3.0  # well inside
    w, f = gaussian_log_prior(means, sigma, D)
    u = grid_offsets(D, 1.0, dtype=torch.float64).reshape(-1, 3)  # voxel index offsets
    naive = -((u[None] - means[:, None]) ** 2).sum(-1) / (2 * sigma ** 2)  # (N, G)
    got = w @ f
    # equal up to a per-vertex constant (-|mu|^2 / 2 s^2), which a softmax ignores
    diff = got - naive
    np.testing.assert_allclose(diff.numpy(), diff[:, :1].expand_as(diff).numpy(), atol=1e-10)
    np.testing.assert_allclose(diff[:, 0].numpy(), ((means ** 2).sum(-1) / (2 * sigma ** 2)).numpy(),
                               atol=1e-10)
    # a head with zero weights then returns the prior means (grid coordinates = u * spacing)
    head = SoftArgmaxHead(3, N, chunk_size=4, mode="chunked").double()
    with torch.no_grad():
        head.weight.zero_()
    feats = torch.randn(2, 3, D, D, D, generator=g, dtype=torch.float64)
    spacing = 7.0
    coords = (u * spacing).reshape(1, D, D, D, 3).expand(2, -1, -1, -1, -1)
    out = head(feats, coords, w, f)
    discrete = torch.softmax(naive, -1) @ (u * spacing)  # exact expectation of the naive density
    np.testing.assert_allclose(out.detach().numpy(), discrete[None].expand(2, -1, -1).numpy(), atol=1e-9)
    # ... which is the prior mean up to the documented truncation (means >= 2 sigma inside)
    assert float((discrete - means * spacing).abs().max()) < 0.02 * spacing
    with pytest.raises(ValueError, match="both"):
        head(feats, coords, w, None)
    with pytest.raises(ValueError, match="prior_weight"):
        head(feats, coords, w[:2], f)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_log_prior(means, 0.0, D)


def test_prior_chunked_equals_naive_with_gradients():
    from tempeh.models.soft_argmax import gaussian_log_prior

    g = torch.Generator().manual_seed(6)
    B, C, D, N = 2, 4, 4, 7
    feats = torch.randn(B, C, D, D, D, generator=g, dtype=torch.float64)
    coords = torch.randn(B, D, D, D, 3, generator=g, dtype=torch.float64) * 30
    w, f = gaussian_log_prior(torch.randn(N, 3, generator=g, dtype=torch.float64), 0.9, D)
    naive = SoftArgmaxHead(C, N, mode="naive").double()
    chunked = SoftArgmaxHead(C, N, chunk_size=3, checkpoint=True, mode="chunked").double()
    chunked.load_state_dict(naive.state_dict())
    outs = []
    for head in (naive, chunked):
        fe = feats.clone().requires_grad_(True)
        out = head(fe, coords, w, f)
        out.square().sum().backward()
        outs.append((out.detach(), fe.grad, head.weight.grad))
    # the explicit formula: softmax(W f + b + prior) expectation
    logits = (naive.weight.detach() @ feats.flatten(2)) + (w @ f)
    ref = torch.softmax(logits, -1) @ coords.reshape(B, -1, 3)
    np.testing.assert_allclose(outs[0][0].numpy(), ref.numpy(), atol=1e-10)
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-10)


@pytest.mark.parametrize("with_prior", [False, True])
def test_fused_head_equals_naive_outputs_and_gradients(with_prior):
    """The fused attention head (default in CoarseModel) against the explicit all-logits head,
    float64, incl. the log-prior; also with fewer than 3 channels (queries/keys padded)."""
    for C in (5, 1):
        B, N, D = 2, 7, 4
        g = torch.Generator().manual_seed(C)
        naive = SoftArgmaxHead(C, N, mode="naive").double()
        fused = SoftArgmaxHead(C, N).double()  # the default mode
        with torch.no_grad():
            naive.bias.copy_(torch.randn(N, generator=g, dtype=torch.float64))
        fused.load_state_dict(naive.state_dict())
        feats = torch.randn(B, C, D, D, D, generator=g, dtype=torch.float64)
        coords = torch.randn(B, D, D, D, 3, generator=g, dtype=torch.float64) * 50
        prior = (torch.randn(N, 4, generator=g, dtype=torch.float64),
                 torch.randn(4, D ** 3, generator=g, dtype=torch.float64)) if with_prior else (None, None)
        outs, grads = [], []
        for head in (naive, fused):
            f = feats.clone().requires_grad_(True)
            x = coords.clone().requires_grad_(True)
            out = head(f, x, *prior)
            (out * torch.linspace(-1, 1, 3, dtype=torch.float64)).sum().backward()
            outs.append(out.detach())
            grads.append((f.grad, x.grad, head.weight.grad))
        np.testing.assert_allclose(outs[1].numpy(), outs[0].numpy(), atol=1e-10)
        for a, b in zip(grads[0], grads[1]):
            np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-10)
    assert fused.mode == "fused"
    with pytest.raises(ValueError, match="mode"):
        SoftArgmaxHead(3, 2, mode="both")
