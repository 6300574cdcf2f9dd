"""Soft-argmax over a grid of world points, and the memory-efficient per-vertex head.

The coarse head maps the U-Net's last feature map ``(B, C, D, D, D)`` to one logit volume per
vertex, takes a softmax over the ``G = D**3`` grid points and returns the expected position
``sum_g p_ng * coords_g`` (world mm). The reference materialises the ``(B, N, G)`` logits, the
softmax AND the grid repeated per vertex ``(B, N, 3, G)`` (4-5 GiB per sample at N=5023, G=32^3)
and keeps them all for the backward pass. Here:

* the expectation is a batched matmul ``softmax(logits) @ coords`` (the grid is never repeated);
* the 1x1x1 conv is a matmul over channels, evaluated for ``chunk_size`` vertices at a time;
* in training each chunk runs under ``torch.utils.checkpoint`` (``use_reentrant=False``), so
  only the ``(B, chunk, 3)`` outputs are kept and the chunk's logits are recomputed in the
  backward pass: memory no longer grows with ``N x G``.

The default head (``mode="fused"``) goes one step further: the head is an attention, with the
vertices' weights as queries, the voxels' features as keys and the voxel coordinates as values
(scale 1), so it runs through ``torch.nn.functional.scaled_dot_product_attention``. torch's
fused kernels (flash attention on CPU; flash or memory-efficient on CUDA) work block by block
and never store the ``(B, N, G)`` logits or probabilities, neither forward nor backward. On the
demo's head (1292 vertices, 16^3 grid, batch 2, 2 CPU threads) forward + backward took 72 ms
instead of 146 ms, forward alone 20 ms instead of 65 ms. The chunked path stays as
``mode="chunked"`` (and as a reference in the tests).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from typing import Optional, Tuple

from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

logger = logging.getLogger(__name__)

__all__ = ["soft_argmax", "SoftArgmaxHead", "gaussian_log_prior", "HEAD_MODES"]

#: Evaluation modes of :class:`SoftArgmaxHead` (see its docstring).
HEAD_MODES = ("fused", "chunked", "naive")


def soft_argmax(logits: Tensor, coords: Tensor) -> Tensor:
    """Expected grid position under ``softmax(logits)``.

    Args:
        logits: ``(B, N, G)`` unnormalised scores, one distribution over ``G`` points per row.
        coords: ``(B, G, 3)`` the points' world coordinates, mm.
    Returns:
        ``(B, N, 3)`` world, mm: ``sum_g softmax(logits)[b, n, g] * coords[b, g]``.
    """
    if logits.dim() != 3 or coords.dim() != 3 or logits.shape[-1] != coords.shape[1]:
        raise ValueError(f"soft_argmax: logits {tuple(logits.shape)} and coords "
                         f"{tuple(coords.shape)} must be (B, N, G) and (B, G, 3)")
    return _Expectation.apply(torch.softmax(logits, dim=-1), coords.to(logits.dtype))


class _Expectation(torch.autograd.Function):
    """``probs (B, N, G) @ coords (B, G, 3)`` with a faster backward for ``coords``.

    Autograd's bmm backward forms ``probs^T @ grad`` with the large operand transposed and only 3
    output columns, a poor memory-access pattern (55 ms of a 450 ms demo training step);
    ``(grad^T @ probs)^T`` is the same product with the large operand read row by row (~17 ms).
    """

    @staticmethod
    def forward(ctx, probs: Tensor, coords: Tensor) -> Tensor:
        ctx.save_for_backward(probs, coords)
        return torch.bmm(probs, coords)

    @staticmethod
    def backward(ctx, grad: Tensor):
        probs, coords = ctx.saved_tensors
        g_probs = torch.bmm(grad, coords.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        g_coords = (torch.bmm(grad.transpose(1, 2), probs).transpose(1, 2)
                    if ctx.needs_input_grad[1] else None)
        return g_probs, g_coords


def _augment(feats: Tensor, weight: Tensor, bias: Tensor, prior_weight: Optional[Tensor] = None,
             prior_feats: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Operands of ONE matmul giving ``weight @ feats + bias (+ prior_weight @ prior_feats)``.

    ``feats (B, C, G)`` -> ``(B, C + 1 (+ K), G)`` (a row of ones, then the prior's rows);
    ``weight (N, C)`` -> ``(N, C + 1 (+ K))`` (the bias column, then the prior's columns). One
    ``bmm`` then writes the ``(B, n, G)`` logits contiguously: no separate bias/prior additions and
    no transposed matmul result to copy before the softmax (together ~35 % of the demo's coarse
    training step before this change).
    """
    B, _, G = feats.shape
    rows = [feats, feats.new_ones(B, 1, G)]
    cols = [weight, bias.unsqueeze(-1)]
    if prior_weight is not None:
        rows.append(prior_feats.to(feats.dtype).unsqueeze(0).expand(B, -1, -1))
        cols.append(prior_weight.to(weight.dtype))
    return torch.cat(rows, 1), torch.cat(cols, 1)


def _aug_logits(feats_aug: Tensor, weight_aug: Tensor) -> Tensor:
    """``feats_aug (B, C', G)``, ``weight_aug (n, C')`` (from :func:`_augment`) -> contiguous
    logits ``(B, n, G)``."""
    return torch.bmm(weight_aug.unsqueeze(0).expand(feats_aug.shape[0], -1, -1), feats_aug)


def _chunk_soft_argmax(feats_aug: Tensor, coords: Tensor, weight_aug: Tensor) -> Tensor:
    """``feats_aug (B, C', G)``, ``coords (B, G, 3)``, ``weight_aug (n, C')`` -> ``(B, n, 3)``."""
    return soft_argmax(_aug_logits(feats_aug, weight_aug), coords)


def _fused_soft_argmax(feats_aug: Tensor, coords: Tensor, weight_aug: Tensor) -> Tensor:
    """:func:`_chunk_soft_argmax` as one fused attention call (see the module docstring).

    The fused kernels need one last dimension for queries, keys and values and contiguous
    inputs: queries and keys are zero-padded from ``C'`` and the 3 coordinates from 3 to the next
    multiple of 8 (CUDA's memory-efficient kernel prefers it), which changes no logit and no
    expected coordinate. Runs outside autocast, in the dtype of ``feats_aug`` (the expected
    positions are mm-accurate world coordinates).
    """
    B, Cp, _ = feats_aug.shape
    E = -(-max(Cp, 3) // 8) * 8
    dtype = feats_aug.dtype
    with torch.autocast(device_type=feats_aug.device.type, enabled=False):
        q = weight_aug.to(dtype).unsqueeze(0).expand(B, -1, -1)
        k = feats_aug.transpose(1, 2)
        v = F.pad(coords.to(dtype), (0, E - 3))
        if E > Cp:
            q, k = F.pad(q, (0, E - Cp)), F.pad(k, (0, E - Cp))
        out = F.scaled_dot_product_attention(q.contiguous().unsqueeze(1), k.contiguous().unsqueeze(1),
                                             v.contiguous().unsqueeze(1), scale=1.0)
    return out[:, 0, :, :3]


class SoftArgmaxHead(nn.Module):
    """1x1x1 conv to one logit volume per vertex + softmax over the grid + expectation.

    Args:
        in_channels: channels ``C`` of the input feature volume.
        num_verts: ``N`` output points (vertices).
        chunk_size: vertices per chunk (``mode="chunked"``).
        checkpoint: wrap each chunk in ``torch.utils.checkpoint`` when gradients are needed
            (``mode="chunked"``).
        mode: ``"fused"`` (default): one fused attention call for all vertices (module
            docstring; nothing of size ``N x G`` is stored); ``"chunked"``: vertex chunks;
            ``"naive"``: all ``(B, N, G)`` logits at once (reference memory behaviour, for
            comparisons and benchmarks). The mode may be changed on the module later.
    Parameters: ``weight (N, C)`` (Xavier-normal, like the reference's Conv3d), ``bias (N,)``
    (zero). The bias is kept for parity with the reference's Conv3d (state-dict mapping); a
    per-vertex constant does not change a softmax, so its gradient is exactly zero.
    """

    def __init__(self, in_channels: int, num_verts: int, chunk_size: int = 512,
                 checkpoint: bool = True, mode: str = "fused"):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"SoftArgmaxHead: chunk_size must be >= 1, got {chunk_size}")
        if mode not in HEAD_MODES:
            raise ValueError(f"SoftArgmaxHead: mode {mode!r} not in {HEAD_MODES}")
        self.in_channels, self.num_verts = int(in_channels), int(num_verts)
        self.chunk_size, self.checkpoint, self.mode = int(chunk_size), bool(checkpoint), mode
        self.weight = nn.Parameter(torch.empty(self.num_verts, self.in_channels))
        self.bias = nn.Parameter(torch.zeros(self.num_verts))
        nn.init.xavier_normal_(self.weight)

    def logits(self, feats: Tensor, prior_weight: Optional[Tensor] = None,
               prior_feats: Optional[Tensor] = None) -> Tensor:
        """All logits at once: ``feats (B, C, D, D, D)`` -> ``(B, N, G)`` (the naive path; the
        optional prior as in :meth:`forward`)."""
        return _aug_logits(*_augment(feats.flatten(2), self.weight, self.bias, prior_weight, prior_feats))

    def forward(self, feats: Tensor, coords: Tensor, prior_weight: Optional[Tensor] = None,
                prior_feats: Optional[Tensor] = None) -> Tensor:
        """Soft-argmax of every vertex.

        Args:
            feats: ``(B, C, D, H, W)`` (or ``(B, C, G)``) feature volume.
            coords: ``(B, D, H, W, 3)`` (or ``(B, G, 3)``) world mm of the same voxels, in the
                same ``(i, j, k)`` order (see :mod:`tempeh.models.volume`).
            prior_weight, prior_feats: optional fixed log-prior ``(N, K)`` and ``(K, G)``; the
                logits of vertex ``n`` become ``w_n . f_g + b_n + prior_weight[n] . prior_feats[:, g]``
                (e.g. :func:`gaussian_log_prior`). Both or neither.
        Returns:
            ``(B, N, 3)`` world, mm.
        """
        B, C = feats.shape[:2]
        if C != self.in_channels:
            raise ValueError(f"SoftArgmaxHead: expected {self.in_channels} channels, got {C}")
        f = feats.flatten(2)  # (B, C, G)
        xyz = coords.reshape(B, -1, 3)
        if xyz.shape[1] != f.shape[-1]:
            raise ValueError(f"SoftArgmaxHead: {f.shape[-1]} voxels but {xyz.shape[1]} coordinates")
        if (prior_weight is None) != (prior_feats is None):
            raise ValueError("SoftArgmaxHead: give both prior_weight and prior_feats, or neither")
        if prior_weight is not None and (prior_weight.shape[0] != self.num_verts
                                         or prior_feats.shape[-1] != f.shape[-1]
                                         or prior_weight.shape[1] != prior_feats.shape[0]):
            raise ValueError(f"SoftArgmaxHead: prior_weight {tuple(prior_weight.shape)} and prior_feats "
                             f"{tuple(prior_feats.shape)} must be (N={self.num_verts}, K) and "
                             f"(K, G={f.shape[-1]})")
        f_aug, w_aug = _augment(f, self.weight, self.bias, prior_weight, prior_feats)
        if self.mode == "naive":
            return _chunk_soft_argmax(f_aug, xyz, w_aug)
        if self.mode == "fused":
            return _fused_soft_argmax(f_aug, xyz, w_aug)
        use_ckpt = self.checkpoint and torch.is_grad_enabled() and (
            f.requires_grad or xyz.requires_grad or self.weight.requires_grad)
        outs = []
        for a in range(0, self.num_verts, self.chunk_size):
            w = w_aug[a:a + self.chunk_size]
            if use_ckpt:
                outs.append(_checkpoint(_chunk_soft_argmax, f_aug, xyz, w, use_reentrant=False))
            else:
                outs.append(_chunk_soft_argmax(f_aug, xyz, w))
        return torch.cat(outs, dim=1)


def gaussian_log_prior(means: Tensor, sigma: float, side: int) -> Tuple[Tensor, Tensor]:
    """An isotropic Gaussian log-prior per vertex over a ``side^3`` grid, in grid units.

    ``log p_n(g) = -|u_g - mu_n|^2 / (2 sigma^2) + const`` with ``u_g = (i, j, k) - (side - 1) / 2``
    the voxel's index offset from the grid centre (same ``(i, j, k)`` order as
    :func:`tempeh.models.volume.grid_offsets`). Expanded, ``-|u|^2/(2s^2) + u . mu_n / s^2`` is
    linear in the 4 fixed features ``(u_x, u_y, u_z, |u|^2)``, so the prior costs one extra
    ``(N, 4) @ (4, G)`` product per chunk and no ``(N, G)`` tensor beyond the chunk's logits.
    With uniform network logits the soft-argmax then returns ``mu_n`` (up to truncation at the grid
    border, negligible for means more than ~2 sigma inside it, and the discretisation, negligible
    for sigma >= ~0.6 voxel).

    Args:
        means: ``(N, 3)`` prior centres in grid units (voxel index offsets from the centre).
        sigma: standard deviation in grid units (> 0).
        side: ``D``.
    Returns:
        ``prior_weight (N, 4)``, ``prior_feats (4, D^3)`` for :meth:`SoftArgmaxHead.forward`.
    """
    if not sigma > 0:
        raise ValueError(f"gaussian_log_prior: sigma must be > 0, got {sigma}")
    if means.dim() != 2 or means.shape[-1] != 3:
        raise ValueError(f"gaussian_log_prior: means must be (N, 3), got {tuple(means.shape)}")
    c = (side - 1) / 2.0
    r = torch.arange(side, dtype=means.dtype, device=means.device) - c
    u = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)  # (G, 3)
    feats = torch.cat([u, (u * u).sum(-1, keepdim=True)], -1).t().contiguous()  # (4, G)
    s2 = float(sigma) ** 2
    weight = torch.cat([means / s2, torch.full_like(means[:, :1], -0.5 / s2)], -1)  # (N, 4)
    return weight, feats
