"""Batch sampler with one random view subset per batch, deterministic from ``(seed, epoch)``.

Every batch is a list of keys ``(index, views, aug_seed)`` for
:meth:`tempeh.data.CaptureDataset.__getitem__`: all samples of a batch share the same view
subset (so images stack to ``(B, V, 1, H, W)``), each sample has its own augmentation seed.

The order of an epoch is a pure function of ``(seed, epoch)``: resuming at global step ``i``
(``set_position(i)`` or ``load_state_dict``) reproduces exactly the batches an uninterrupted
run would have seen. Distributed training (``rank``/``world_size``): the epoch's permutation is
cut into global batches of ``batch_size * world_size`` frames; rank ``r`` takes slice ``r`` of
each, and all ranks of a step use the same view subset (balanced work).
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["SampleKey", "ViewBatchSampler", "sample_view_subset", "eval_batches"]

#: ``(frame index, view indices (sorted tuple), augmentation seed or None)``.
SampleKey = Tuple[int, Tuple[int, ...], Optional[int]]

_SEED_MASK = (1 << 63) - 1


def sample_view_subset(rng: np.random.Generator, num_views: int, min_views: int,
                       max_views: Optional[int]) -> Tuple[int, ...]:
    """A sorted random subset of ``range(num_views)`` of size ``V ~ U{min, max}`` (inclusive,
    both clipped to ``num_views``)."""
    hi = num_views if max_views is None else min(max_views, num_views)
    lo = min(min_views, hi)
    V = int(rng.integers(lo, hi + 1))
    return tuple(sorted(int(i) for i in rng.choice(num_views, size=V, replace=False)))


class ViewBatchSampler:
    """Training batches of ``(index, views, aug_seed)`` keys (see the module docstring).

    Args:
        num_frames: dataset length.
        num_views: views available in every frame (``CaptureDataset.num_views``).
        batch_size: samples per batch and rank.
        min_views, max_views: view-subset size range (max None: all views).
        seed: run seed.
        rank, world_size: this process's share (DistributedSampler-style).
        shuffle: permute frames each epoch (False: dataset order).
        drop_last: drop the last incomplete global batch (True keeps every batch full and
            every rank in step); False pads the last global batch by wrapping around.
    """

    def __init__(self, num_frames: int, num_views: int, batch_size: int, min_views: int = 8,
                 max_views: Optional[int] = 16, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True):
        if num_frames < 1:
            raise ValueError("ViewBatchSampler: the dataset is empty")
        if num_views < 1:
            raise ValueError(f"ViewBatchSampler: num_views must be >= 1, got {num_views}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ViewBatchSampler: rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"ViewBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.num_frames = int(num_frames)
        self.num_views = int(num_views)
        self.batch_size = int(batch_size)
        self.min_views = int(min_views)
        self.max_views = max_views
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_step = 0
        if self.drop_last and len(self) == 0:
            raise ValueError(f"ViewBatchSampler: {num_frames} frames give no full batch of "
                             f"{batch_size} x {world_size} ranks (use drop_last=False)")

    # ------------------------------------------------------------------ sizes and position
    def __len__(self) -> int:
        """Batches per epoch (per rank)."""
        g = self.batch_size * self.world_size
        return self.num_frames // g if self.drop_last else -(-self.num_frames // g)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_step`` (next ``__iter__`` only)."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} not in [0, {len(self)}]")
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def set_position(self, iteration: int) -> Tuple[int, int]:
        """Position at global step ``iteration`` (steps done so far); returns ``(epoch, step)``."""
        epoch, step = divmod(int(iteration), len(self))
        self.set_epoch(epoch, step)
        return epoch, step

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start_step": self.start_step,
                "num_frames": self.num_frames, "num_views": self.num_views,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` (the dataset must be the same)."""
        for k in ("seed", "num_frames", "num_views", "batch_size", "world_size"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(f"ViewBatchSampler.load_state_dict: {k} was {state[k]}, "
                                 f"now {getattr(self, k)} (a different dataset or run setup)")
        self.set_epoch(int(state["epoch"]), int(state["start_step"]))

    # ------------------------------------------------------------------ batches
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed & _SEED_MASK, *keys]))

    def epoch_batches(self, epoch: int) -> List[List[SampleKey]]:
        """All batches of ``epoch`` for this rank (pure function of seed, epoch and setup)."""
        n, g = self.num_frames, self.batch_size * self.world_size
        order = self._rng(0, epoch).permutation(n) if self.shuffle else np.arange(n)
        n_global = len(self)
        need = n_global * g
        if need > n:
            order = np.concatenate([order, np.resize(order, need - n)])
        batches = []
        for b in range(n_global):
            rng = self._rng(1, epoch, b)
            views = sample_view_subset(rng, self.num_views, self.min_views, self.max_views)
            seeds = rng.integers(0, 2 ** 62, size=g)
            lo = b * g + self.rank * self.batch_size
            batches.append([(int(order[lo + i]), views, int(seeds[self.rank * self.batch_size + i]))
                            for i in range(self.batch_size)])
        return batches

    def __iter__(self) -> Iterator[List[SampleKey]]:
        epoch, start = self.epoch, self.start_step
        self.start_step = 0  # the next epoch (after set_epoch) starts at its beginning
        yield from self.epoch_batches(epoch)[start:]


def eval_batches(num_frames: int, batch_size: int, num_views: int, rank: int = 0,
                 world_size: int = 1) -> List[List[SampleKey]]:
    """Evaluation batches: frames in order (rank ``r`` takes frames ``r, r + world, ...``),
    ALL views, no augmentation (aug_seed None); the last batch may be smaller."""
    idx = list(range(rank, num_frames, world_size))
    views = tuple(range(num_views))
    return [[(i, views, None) for i in idx[b:b + batch_size]] for b in range(0, len(idx), batch_size)]
