"""Datasets over capture folders, HDF5 cache, augmentation, view sampling and collation.

Typical training use::

    ds = CaptureDataset(cfg.data, cfg.data.train_list, stage="coarse", train=True)
    sampler = ViewBatchSampler(len(ds), ds.num_views, cfg.run.batch_size, cfg.data.min_views,
                               cfg.data.max_views, seed=cfg.run.seed)
    loader = make_loader(ds, sampler, cfg.data.num_workers)
    for batch in loader:          # Batch (None only if skip_bad_frames dropped a whole batch)
        batch = batch.to(device)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from tempeh.cameras import Cameras
from tempeh.data.dataset import CaptureDataset, Sample, load_views
from tempeh.data.sampler import SampleKey, ViewBatchSampler, eval_batches, sample_view_subset
from tempeh.io.layout import FrameId

logger = logging.getLogger(__name__)

__all__ = ["Batch", "collate", "make_loader", "CaptureDataset", "Sample", "load_views",
           "SampleKey", "ViewBatchSampler", "eval_batches", "sample_view_subset"]


@dataclass
class Batch:
    """Stacked samples (world mm).

    images: ``(B, V, 1, H, W)`` float32 in [0, 1].
    cameras: ``Cameras`` of batch shape ``(B, V)``, float32.
    scan: ``(B, P, 3)`` float32; scan_valid: ``(B, P)`` bool.
    registration: ``(B, N, 3)`` float32.
    gt_verts: ``(B, N, 3)`` or None; coarse_verts: ``(B, N, 3)`` or None.
    frames: the B frame ids; indices: ``(B,)`` int64 dataset indices.
    """

    images: Tensor
    cameras: Cameras
    scan: Tensor
    scan_valid: Tensor
    registration: Tensor
    gt_verts: Optional[Tensor]
    coarse_verts: Optional[Tensor]
    frames: List[FrameId]
    indices: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device=None, non_blocking: bool = False) -> "Batch":
        """Move every tensor (and the cameras) to ``device``."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(mv(self.images), self.cameras.to(device), mv(self.scan), mv(self.scan_valid),
                     mv(self.registration), mv(self.gt_verts), mv(self.coarse_verts),
                     list(self.frames), mv(self.indices))

    def pin_memory(self) -> "Batch":  # used by DataLoader(pin_memory=True)
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        c = self.cameras
        cams = Cameras(pin(c.K), pin(c.R), pin(c.t), pin(c.dist), pin(c.width), pin(c.height), c.names)
        return Batch(pin(self.images), cams, pin(self.scan), pin(self.scan_valid),
                     pin(self.registration), pin(self.gt_verts), pin(self.coarse_verts),
                     self.frames, pin(self.indices))


def collate(samples: Sequence[Optional[Sample]]) -> Optional[Batch]:
    """Stack samples into a :class:`Batch`; ``Cameras.stack`` gives ``(B, V)`` cameras.

    ``None`` entries (frames dropped at load time with ``skip_bad_frames``) are removed and
    counted in the log; an all-``None`` batch gives ``None``. Samples must share V, H, W, P and
    N (the batch sampler guarantees the views), else ValueError naming the frames.
    """
    good = [s for s in samples if s is not None]
    if len(good) < len(samples):
        logger.warning("collate: dropped %d bad sample(s) of %d", len(samples) - len(good), len(samples))
    if not good:
        return None
    first = good[0]
    for s in good[1:]:
        for what, a, b in (("images", s.images, first.images), ("scan", s.scan, first.scan),
                           ("registration", s.registration, first.registration)):
            if a.shape != b.shape:
                raise ValueError(f"collate: {what} of frame {s.frame} has shape {tuple(a.shape)}, "
                                 f"frame {first.frame} {tuple(b.shape)}")

    def opt(name: str) -> Optional[Tensor]:
        vals = [getattr(s, name) for s in good]
        if all(v is None for v in vals):
            return None
        if any(v is None for v in vals):
            raise ValueError(f"collate: {name} present for some samples only")
        return torch.stack(vals)

    return Batch(images=torch.stack([s.images for s in good]),
                 cameras=Cameras.stack([s.cameras for s in good]),
                 scan=torch.stack([s.scan for s in good]),
                 scan_valid=torch.stack([s.scan_valid for s in good]),
                 registration=torch.stack([s.registration for s in good]),
                 gt_verts=opt("gt_verts"), coarse_verts=opt("coarse_verts"),
                 frames=[s.frame for s in good],
                 indices=torch.tensor([s.index for s in good], dtype=torch.int64))


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode images; leave the cores to the model


def make_loader(dataset: CaptureDataset, batch_sampler, num_workers: int = 0,
                pin_memory: bool = False, persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batch_sampler`` (a :class:`ViewBatchSampler` or a list of key
    batches such as :func:`eval_batches`) with :func:`collate`. Randomness lives in the keys,
    so results do not depend on ``num_workers``."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0)
