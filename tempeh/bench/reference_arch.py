"""The reference TEMPEH formulation of the coarse soft-argmax head, for benchmarks only.

NOT part of the library: it exists so that the coarse benchmark can compare our head with the
head the reference implementation runs (TEMPEH-FACTS sections 4.2 and 4.4): all ``(B, N, G)``
logits at once, a softmax over the grid, the warped grid REPEATED per vertex to
``(B, N, 3, G)`` (1.84 GiB per sample at N = 5023, G = 32^3, fp32), an element-wise product and
a sum over the grid. Numerically it equals :func:`tempeh.models.soft_argmax.soft_argmax`
(tests/test_bench_runner.py checks it), so the comparison is about time and memory only.

Head modes of the benchmark (``HEAD_MODES``):

* ``efficient``: our default head (one fused attention call, ``SoftArgmaxHead(mode="fused")``);
* ``chunked``: our earlier default (chunks of vertices, each checkpointed in training);
* ``matmul``: all logits at once, expectation by a batched matmul (``SoftArgmaxHead(mode="naive")``);
* ``reference``: the reference formulation above (:class:`ReferenceStyleHead`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["HEAD_MODES", "HEAD_IMPL", "REFERENCE_DOCUMENTED", "reference_style_soft_argmax", "ReferenceStyleHead",
           "set_head_mode"]

HEAD_MODES = ("efficient", "chunked", "matmul", "reference")
#: SoftArgmaxHead.mode of each benchmark head mode ("reference" wraps the head instead)
HEAD_IMPL = {"efficient": "fused", "chunked": "chunked", "matmul": "naive", "reference": "fused"}

# The reference TEMPEH networks timed on the 2-core development CPU at paper scale with random
# weights (DESIGN.md section 6; 16 views, 5023 vertices; wall time, peak memory). NOT measured by
# the benchmarks: shown beside our figures only, to compare like with like.
REFERENCE_DOCUMENTED = {
    "source": "documented in DESIGN.md section 6 (reference TEMPEH, random weights, paper scale, "
              "same 2-core machine type); not measured by this run",
    "coarse_forward_B1": {"s": 3.8, "gib": 3.6},
    "coarse_forward_B2": {"s": 7.3, "gib": 6.8},
    "coarse_train_step_B2": {"s": 26.0, "gib": 16.5},
    "coarse_train_step_B1": {"note": "crashes (BatchNorm over the 1x1x1 bottleneck)"},
    "refine_forward_B1": {"s": 30.0, "gib": 6.2},
}


def reference_style_soft_argmax(logits: Tensor, coords: Tensor) -> Tensor:
    """The reference's soft-argmax: ``logits (B, N, G)``, ``coords (B, G, 3)`` world mm ->
    ``(B, N, 3)``; softmax, grid repeated per vertex ``(B, N, 3, G)``, product, sum over G."""
    B, N, G = logits.shape
    prob = torch.softmax(logits, dim=-1)  # (B, N, G)
    grid = coords.reshape(B, G, 3).transpose(1, 2)  # (B, 3, G)
    rep = grid.unsqueeze(1).repeat(1, N, 1, 1)  # (B, N, 3, G): materialised, as in the reference
    return (prob.unsqueeze(2) * rep).sum(-1)


class ReferenceStyleHead(nn.Module):
    """Wraps a :class:`~tempeh.models.soft_argmax.SoftArgmaxHead` (same parameters) and runs the
    reference formulation. ``forward(feats (B, C, D, H, W), coords (B, D, H, W, 3))``."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.inner = head
        self.num_verts = head.num_verts

    def forward(self, feats: Tensor, coords: Tensor) -> Tensor:
        B = feats.shape[0]
        return reference_style_soft_argmax(self.inner.logits(feats), coords.reshape(B, -1, 3))


def set_head_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch ``model.head`` (a CoarseModel's SoftArgmaxHead) to ``mode`` in ``HEAD_MODES``;
    returns ``model``. The parameters are shared, so all modes give the same output."""
    if mode not in HEAD_MODES:
        raise ValueError(f"head mode {mode!r}: expected one of {HEAD_MODES}")
    head = model.head.inner if isinstance(model.head, ReferenceStyleHead) else model.head
    head.mode = HEAD_IMPL[mode]
    model.head = ReferenceStyleHead(head) if mode == "reference" else head
    return model
