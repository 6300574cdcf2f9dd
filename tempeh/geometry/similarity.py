"""Batched least-squares similarity fit (Umeyama) in torch.

The numpy counterpart for single meshes is
:func:`tempeh.fitting.rigid.similarity_from_correspondences`; this one works on batches inside the
networks (the coarse stage's box re-fitting) and keeps the dtype and device of its inputs.
"""
from __future__ import annotations

import logging
from typing import Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["fit_similarity"]


def fit_similarity(src: Tensor, dst: Tensor, with_scale: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """``s, R, t`` minimising ``sum_i |s R src_i + t - dst_i|^2`` per batch element.

    Args:
        src: ``(B, N, 3)`` points (any frame, any unit).
        dst: ``(B, N, 3)`` corresponding points (same unit), ``N >= 3`` not all collinear.
        with_scale: False fixes ``s = 1`` (rigid fit).
    Returns:
        ``s (B,)``, ``R (B, 3, 3)`` (a proper rotation, ``det = +1``), ``t (B, 3)`` in the unit of
        ``dst``; computed in float64, returned in ``dst``'s dtype. No gradient flows (the fit is
        a pose estimate used as input, not a training target).
    """
    if src.dim() != 3 or src.shape[-1] != 3 or dst.shape != src.shape:
        raise ValueError(f"fit_similarity: src and dst must both be (B, N, 3), got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    if src.shape[1] < 3:
        raise ValueError(f"fit_similarity: need N >= 3 points, got {src.shape[1]}")
    with torch.no_grad():
        a, b = src.detach().double(), dst.detach().double()
        ma, mb = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
        a0, b0 = a - ma, b - mb
        U, S, Vt = torch.linalg.svd(b0.transpose(1, 2) @ a0)  # cross-covariance dst^T src
        d = torch.sign(torch.linalg.det(U @ Vt))
        d = torch.where(d == 0, torch.ones_like(d), d)
        sign = torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1)  # (B, 3)
        R = U @ torch.diag_embed(sign) @ Vt
        if with_scale:
            var = (a0 ** 2).sum((1, 2))
            if bool((var <= 0).any()):
                raise ValueError("fit_similarity: src points coincide (zero spread)")
            s = (S * sign).sum(-1) / var
        else:
            s = torch.ones_like(d)
        t = mb.squeeze(1) - s[:, None] * (R @ ma.transpose(1, 2)).squeeze(-1)
    return s.to(dst.dtype), R.to(dst.dtype), t.to(dst.dtype)
