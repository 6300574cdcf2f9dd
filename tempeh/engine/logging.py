"""Metric writer: TensorBoard scalars/images plus a ``metrics.jsonl`` record file.

Only rank 0 writes (``enabled=False`` elsewhere makes every call a no-op). ``metrics.jsonl``
holds one JSON object per line, ``{"step": int, "split": "train" | "val", ...}``; on resume,
records after the resumed step (written by the interrupted run) are dropped, and TensorBoard
events after it are purged, so the logs describe exactly one history.

:func:`projection_image` draws mesh vertices projected into input views (predicted: green,
reference registration: red) for the TensorBoard image.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["MetricWriter", "projection_image"]

PathLike = Union[str, os.PathLike]


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricWriter:
    """TensorBoard (``log_dir``) + JSON-lines (``jsonl_path``) writer.

    Args:
        log_dir: TensorBoard event folder.
        jsonl_path: the ``metrics.jsonl`` file.
        enabled: False on non-zero ranks (every call does nothing).
        resume_step: drop records / events after this step (resumed run); None: fresh run
            (an existing ``metrics.jsonl`` is truncated).
    """

    def __init__(self, log_dir: PathLike, jsonl_path: PathLike, enabled: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.jsonl_path = Path(jsonl_path)
        self._tb = None
        if not enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_jsonl(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as err:  # noqa: BLE001 - tensorboard is optional at run time
            logger.warning("TensorBoard unavailable (%s): scalars go to %s only", err, self.jsonl_path)
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(str(log_dir), purge_step=resume_step)

    def _truncate_jsonl(self, resume_step: Optional[int]) -> None:
        p = self.jsonl_path
        if not p.exists():
            return
        keep = []
        if resume_step is not None:
            for line in p.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        keep.append(line)
                except (ValueError, AttributeError):
                    continue
        tmp = p.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, p)

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "train") -> None:
        """Log ``values`` as TensorBoard scalars ``<prefix>/<name>``."""
        if not self.enabled or self._tb is None:
            return
        for k, v in values.items():
            v = _plain(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def record(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """Append one JSON line ``{"step", "split", **values}`` (flushed)."""
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split}
        rec.update({k: _plain(v) for k, v in values.items()})
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def image(self, step: int, tag: str, img_hwc: np.ndarray) -> None:
        if not self.enabled or self._tb is None:
            return
        self._tb.add_image(tag, img_hwc, step, dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def projection_image(images: torch.Tensor, cameras, verts: torch.Tensor,
                     reference: Optional[torch.Tensor] = None, max_views: int = 4) -> np.ndarray:
    """Input views with projected vertices, side by side.

    Args:
        images: ``(V, 1, H, W)`` in [0, 1].
        cameras: ``(V,)`` cameras of these images.
        verts: ``(N, 3)`` predicted vertices, world mm (drawn green).
        reference: ``(N, 3)`` registration, world mm (drawn red, under the prediction).
        max_views: views shown.
    Returns:
        ``(H, k W, 3)`` uint8.
    """
    V = min(int(images.shape[0]), max_views)
    H, W = int(images.shape[-2]), int(images.shape[-1])
    tiles = []
    for v in range(V):
        g = (images[v, 0].detach().float().cpu().clamp(0, 1).numpy() * 255).astype(np.uint8)
        tile = np.repeat(g[:, :, None], 3, axis=2)
        cam = cameras[v:v + 1]
        for pts, color in ((reference, (255, 0, 0)), (verts, (0, 255, 0))):
            if pts is None:
                continue
            uv, z = cam.project(pts.detach().to(cam.K.dtype).cpu()[None])
            uv, z = uv[0].numpy(), z[0].numpy()
            u = np.round(uv[:, 0]).astype(np.int64)
            w = np.round(uv[:, 1]).astype(np.int64)
            ok = (z > 0) & (u >= 0) & (u < W) & (w >= 0) & (w < H)
            tile[w[ok], u[ok]] = color
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)
