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
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

logger = logging.getLogger(__name__)

__all__ = ["soft_argmax", "SoftArgmaxHead"]


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
    return torch.bmm(torch.softmax(logits, dim=-1), coords.to(logits.dtype))


def _chunk_soft_argmax(feats: Tensor, coords: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``feats (B, C, G)``, ``coords (B, G, 3)``, ``weight (n, C)``, ``bias (n,)`` -> ``(B, n, 3)``."""
    logits = torch.matmul(weight, feats) + bias.unsqueeze(-1)  # (B, n, G)
    return soft_argmax(logits, coords)


class SoftArgmaxHead(nn.Module):
    """1x1x1 conv to one logit volume per vertex + softmax over the grid + expectation.

    Args:
        in_channels: channels ``C`` of the input feature volume.
        num_verts: ``N`` output points (vertices).
        chunk_size: vertices per chunk.
        checkpoint: wrap each chunk in ``torch.utils.checkpoint`` when gradients are needed.
        naive: compute all ``(B, N, G)`` logits at once (reference memory behaviour; for
            comparisons and benchmarks).
    Parameters: ``weight (N, C)`` (Xavier-normal, like the reference's Conv3d), ``bias (N,)``
    (zero). The bias is kept for parity with the reference's Conv3d (state-dict mapping); a
    per-vertex constant does not change a softmax, so its gradient is exactly zero.
    """

    def __init__(self, in_channels: int, num_verts: int, chunk_size: int = 512,
                 checkpoint: bool = True, naive: bool = False):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"SoftArgmaxHead: chunk_size must be >= 1, got {chunk_size}")
        self.in_channels, self.num_verts = int(in_channels), int(num_verts)
        self.chunk_size, self.checkpoint, self.naive = int(chunk_size), bool(checkpoint), bool(naive)
        self.weight = nn.Parameter(torch.empty(self.num_verts, self.in_channels))
        self.bias = nn.Parameter(torch.zeros(self.num_verts))
        nn.init.xavier_normal_(self.weight)

    def logits(self, feats: Tensor) -> Tensor:
        """All logits at once: ``feats (B, C, D, D, D)`` -> ``(B, N, G)`` (the naive path)."""
        f = feats.flatten(2)
        return torch.matmul(self.weight, f) + self.bias.unsqueeze(-1)

    def forward(self, feats: Tensor, coords: Tensor) -> Tensor:
        """Soft-argmax of every vertex.

        Args:
            feats: ``(B, C, D, H, W)`` (or ``(B, C, G)``) feature volume.
            coords: ``(B, D, H, W, 3)`` (or ``(B, G, 3)``) world mm of the same voxels, in the
                same ``(i, j, k)`` order (see :mod:`tempeh.models.volume`).
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
        if self.naive:
            return _chunk_soft_argmax(f, xyz, self.weight, self.bias)
        use_ckpt = self.checkpoint and torch.is_grad_enabled() and (
            f.requires_grad or xyz.requires_grad or self.weight.requires_grad)
        outs = []
        for a in range(0, self.num_verts, self.chunk_size):
            w, b = self.weight[a:a + self.chunk_size], self.bias[a:a + self.chunk_size]
            if use_ckpt:
                outs.append(_checkpoint(_chunk_soft_argmax, f, xyz, w, b, use_reentrant=False))
            else:
                outs.append(_chunk_soft_argmax(f, xyz, w, b))
        return torch.cat(outs, dim=1)
