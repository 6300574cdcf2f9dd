"""Benchmark of the refinement stage on CPU: forward time and peak memory, chunked vs unchunked.

Paper scale: 16 views of 400x300 grey images, 5023 vertices, 8^3 local grids x 2 mm, the
paper-size feature net (ResNet34) and refinement U-Net, random weights, batch 1, inference
(``torch.no_grad``, eval mode). Every setting runs in a FRESH subprocess, whose peak resident
memory (``ru_maxrss``) is the figure reported; ``rss_before_mb`` is the peak after building the
model and inputs, so ``peak_mb - rss_before_mb`` is what the forward pass added.

The mesh is a Fibonacci sphere of ``N`` points (radius 90 mm, convex-hull faces): the cost does
not depend on the topology, and no licensed asset is needed. Cameras: a 16-view arc at 1 m.

Run: ``python -m tempeh.bench.refine [--quick] [--train]`` prints JSON.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["run", "measure"]


def _fibonacci_sphere(n: int, radius: float):
    """``(n, 3)`` float64 points on a sphere (mm) and ``(F, 3)`` int64 outward faces."""
    import numpy as np
    from scipy.spatial import ConvexHull

    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5 ** 0.5) * i
    pts = radius * np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], 1)
    faces = ConvexHull(pts).simplices.astype(np.int64)
    # orient outwards: the normal must point away from the centre
    v0, v1, v2 = pts[faces[:, 0]], pts[faces[:, 1]], pts[faces[:, 2]]
    flip = (np.cross(v1 - v0, v2 - v0) * (v0 + v1 + v2)).sum(1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return pts, faces


def _arc_cameras(views: int, width: int, height: int):
    import torch

    from tempeh.cameras import Cameras, look_at_rotation

    yaw = torch.linspace(-80.0, 80.0, views, dtype=torch.float64) * math.pi / 180
    pitch = torch.where(torch.arange(views) % 2 == 0, 0.15, -0.15).to(torch.float64)
    eye = 1000.0 * torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch),
                                torch.cos(yaw) * torch.cos(pitch)], -1)
    R = look_at_rotation(eye, torch.zeros_like(eye), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    f = 2.25 * width  # a 200 mm head spans ~ 0.45 of the width at 1 m
    K = torch.tensor([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    return Cameras.create(K.expand(1, views, 3, 3), R[None], t[None], width, height).to(dtype=torch.float32)


def measure(num_verts: int = 5023, views: int = 16, width: int = 400, height: int = 300,
            chunk_size: Optional[int] = None, scale: str = "paper", train: bool = False,
            checkpointing: bool = False, threads: Optional[int] = None) -> dict:
    """One setting, in THIS process (call it in a fresh process for a clean peak).

    Returns a dict with ``forward_s`` (wall time of one forward, first call; with ``train``
    forward + backward in ``step_s``), ``forward_cpu_s`` / ``step_cpu_s`` (process CPU time, the
    better figure on a shared machine), ``peak_mb`` (``ru_maxrss``) and ``rss_before_mb``.
    """
    import torch

    from tempeh.models.refine import RefineConfig, RefineModel

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    verts, faces = _fibonacci_sphere(num_verts, 90.0)
    ctor = RefineConfig.paper_scale if scale == "paper" else RefineConfig.tiny
    cfg = ctor(chunk_size=chunk_size, gradient_checkpointing=checkpointing)
    model = RefineModel(cfg, verts, faces)
    cams = _arc_cameras(views, width, height)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, views, 1, height, width, generator=g)
    coarse = torch.from_numpy(verts).float()[None] + torch.randn(1, num_verts, 3, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"num_verts": num_verts, "views": views, "image": [width, height], "chunk_size": chunk_size,
           "scale": scale, "train": train, "checkpointing": checkpointing,
           "threads": torch.get_num_threads(), "rss_before_mb": round(before, 1)}
    if train:
        if checkpointing:  # the first checkpoint call imports torch._dynamo (seconds): not timed
            from torch.utils.checkpoint import checkpoint
            checkpoint(torch.square, torch.ones(1, requires_grad=True), use_reentrant=False)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        res = model(images, cams, coarse, generator=torch.Generator().manual_seed(1))
        t1, c1 = time.perf_counter(), time.process_time()
        res.verts.square().mean().backward()
        out["forward_s"], out["forward_cpu_s"] = round(t1 - t0, 3), round(c1 - c0, 3)
        out["step_s"] = round(time.perf_counter() - t0, 3)
        out["step_cpu_s"] = round(time.process_time() - c0, 3)
    else:
        model.eval()
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            res = model(images, cams, coarse)
            out["forward_s"] = round(time.perf_counter() - t0, 3)
            out["forward_cpu_s"] = round(time.process_time() - c0, 3)
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    out["mean_offset_mm"] = round(float(res.offsets.detach().norm(dim=-1).mean()), 4)
    return out


def _in_subprocess(**kw) -> dict:
    cmd = [sys.executable, "-m", "tempeh.bench.refine", "--worker", json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        return {**kw, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(full: dict, chunked: dict) -> dict:
    key = "step_cpu_s" if "step_cpu_s" in full else "forward_cpu_s"
    return {
        "memory_ratio": round(full["peak_mb"] / chunked["peak_mb"], 2),
        "added_memory_ratio": round((full["peak_mb"] - full["rss_before_mb"])
                                    / max(chunked["peak_mb"] - chunked["rss_before_mb"], 1e-6), 2),
        "cpu_time_ratio": round(chunked[key] / max(full[key], 1e-9), 2),
    }


def run(quick: bool = False, chunk_size: int = 512, train: bool = False) -> dict:
    """Chunked vs unchunked inference forward at paper scale (``quick``: 8 views of 200x150,
    1500 vertices). ``train`` adds a training step (forward + backward) comparison, unchunked
    vs chunked (64 vertices) with gradient checkpointing, at 1000 vertices and 8 views of 200x150 (an
    unchunked paper-scale training step needs more than 12 GiB).

    Returns ``{"forward": {"settings": [unchunked, chunked], "memory_ratio": unchunked peak /
    chunked peak, "added_memory_ratio": the same for the memory the pass added over the model
    and inputs, "cpu_time_ratio": chunked / unchunked CPU time (of the step for "train")},
    "train": {...}}``.
    """
    base = dict(num_verts=1500, views=8, width=200, height=150) if quick else {}
    out = {"quick": quick}
    groups = {"forward": [dict(base, chunk_size=None), dict(base, chunk_size=chunk_size)]}
    if train:
        tb = dict(num_verts=1000, views=8, width=200, height=150, train=True)
        groups["train"] = [dict(tb, chunk_size=None),
                           dict(tb, chunk_size=min(chunk_size, 64), checkpointing=True)]
    for name, settings in groups.items():
        results = [_in_subprocess(**s) for s in settings]
        out[name] = {"settings": results}
        if all("error" not in r for r in results):
            out[name].update(_ratios(*results))
    return out


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        print(json.dumps(measure(**json.loads(sys.argv[2]))))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv[1:], train="--train" in sys.argv[1:]), indent=2))
