"""Coarse-stage benchmark at paper scale on CPU (not a test).

Configurations: 16 views of 200x150 (1/8 of 1600x1200), d_c = 32, 5023 vertices, ResNet34
feature net, 5-level U-Net; batch 1 and 2; the memory-efficient (chunked + checkpointed) head vs
the naive head (all (B, N, 32^3) logits at once, expectation by a matmul). The head alone is also
run in the reference formulation (softmax, then the grid repeated per vertex to (B, N, 3, G),
an element-wise product and a sum over G). Each configuration runs in a fresh subprocess, so
``ru_maxrss`` is that configuration's peak resident memory (process total, including Python,
torch, parameters, gradients and at the first step the AdamW state).

Figures per configuration: ``forward_s`` (eval, no grad), ``train_step_s`` (train mode, forward +
v2v MSE + backward + AdamW step), ``peak_rss_gib`` (whole process), ``base_rss_gib`` (after
building the model and inputs) and ``delta_gib = peak - base``; also the head alone (features
(B, 128, 32^3) -> verts, forward + backward).

    python -m tempeh.bench.coarse [--quick]
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)

__all__ = ["run"]

_GIB = 1024.0 ** 3


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 / _GIB  # Linux: KiB


def _rig(V: int, W: int, H: int):
    from tempeh.cameras import Cameras, look_at_rotation
    az = torch.linspace(-1.2, 1.2, V)
    el = 0.15 * torch.sin(torch.arange(V, dtype=torch.float32))
    eye = 1000 * torch.stack([torch.sin(az) * torch.cos(el), torch.sin(el), torch.cos(az) * torch.cos(el)], -1)
    R = look_at_rotation(eye, torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]))
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    f = 2.2 * W
    K = torch.tensor([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]]).expand(V, 3, 3)
    return Cameras.create(K, R, t, W, H)


def _reference_style_head(head, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The reference formulation of the soft-argmax (for memory comparison only): softmax over
    the grid, the grid coordinates repeated per vertex, an element-wise product, a sum."""
    B = feats.shape[0]
    prob = torch.softmax(head.logits(feats), dim=-1)  # (B, N, G)
    grid = coords.reshape(B, -1, 3).transpose(1, 2)  # (B, 3, G)
    rep = grid.unsqueeze(1).repeat(1, head.num_verts, 1, 1)  # (B, N, 3, G)
    return (prob.unsqueeze(2) * rep).sum(-1)  # (B, N, 3)


def _child(spec: Dict) -> Dict:
    """Run one configuration in this (fresh) process."""
    from tempeh.cameras import Cameras
    from tempeh.models.coarse import CoarseConfig, CoarseModel
    from tempeh.models.soft_argmax import SoftArgmaxHead

    torch.manual_seed(0)
    torch.set_num_threads(int(spec.get("threads", 2)))
    B, V, W, H, N = spec["B"], spec["V"], spec["W"], spec["H"], spec["N"]
    reps = int(spec.get("reps", 1))
    res: Dict = dict(spec)
    if spec["what"] == "head":
        head = SoftArgmaxHead(128, N, chunk_size=spec["chunk"], naive=spec["naive"])
        D = spec["D"]
        feats = torch.randn(B, 128, D, D, D, requires_grad=True)
        coords = torch.randn(B, D, D, D, 3) * 100
        fn = (lambda: _reference_style_head(head, feats, coords)) if spec.get("reference") else (
            lambda: head(feats, coords))
        res["base_rss_gib"] = _rss_gib()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn().square().mean().backward()
        res["head_fwd_bwd_s"] = (time.perf_counter() - t0) / reps
    else:
        cfg = CoarseConfig.paper_scale(num_verts=N, head_naive=spec["naive"])
        model = CoarseModel(cfg)
        cams = Cameras.stack([_rig(V, W, H)] * B)
        images = torch.rand(B, V, 1, H, W)
        target = torch.randn(B, N, 3) * 80
        res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        if spec["what"] == "forward":
            model.eval()
            res["base_rss_gib"] = _rss_gib()
            with torch.no_grad():
                t0 = time.perf_counter()
                for _ in range(reps):
                    model(images, cams)
                res["forward_s"] = (time.perf_counter() - t0) / reps
        else:
            model.train()
            opt = torch.optim.AdamW(model.param_groups(1e-3))
            g = torch.Generator().manual_seed(0)
            res["base_rss_gib"] = _rss_gib()
            t0 = time.perf_counter()
            for _ in range(reps):
                loss = (model(images, cams, generator=g).verts - target).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            res["train_step_s"] = (time.perf_counter() - t0) / reps
    res["peak_rss_gib"] = _rss_gib()
    res["delta_gib"] = res["peak_rss_gib"] - res["base_rss_gib"]
    return res


def _spawn(spec: Dict) -> Dict:
    cmd = [sys.executable, "-m", "tempeh.bench.coarse", "--child", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec.get("threads", 2)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return dict(spec, error=out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> Dict:
    """Measure the configurations (``quick``: one repetition; forward at batch 1 only).

    Returns:
        ``{"configs": [per-configuration dicts], "summary": {...ratios...}}``.
    """
    from tempeh.models.coarse import CoarseConfig
    chunk = CoarseConfig().head_chunk_size
    base = dict(V=16, W=200, H=150, N=5023, D=32, chunk=chunk, reps=1 if quick else 2)
    batches = [1, 2]
    specs: List[Dict] = []
    for naive, ref in ((False, False), (True, False), (True, True)):
        specs.append(dict(base, what="head", B=1, naive=naive, reference=ref))
    for B in batches:
        for what in ("forward", "train"):
            if quick and what == "forward" and B > 1:
                continue
            for naive in (False, True):
                specs.append(dict(base, what=what, B=B, naive=naive))
    results = []
    for s in specs:
        r = _spawn(s)
        logger.info("%s", r)
        results.append(r)
    summary: Dict = {}
    for B in batches:
        for what in ("head", "forward", "train"):
            sel = [r for r in results if r["what"] == what and r["B"] == B and "error" not in r]
            eff = [r for r in sel if not r["naive"]]
            nai = [r for r in sel if r["naive"] and not r.get("reference")]
            ref = [r for r in sel if r.get("reference")]
            if eff and ref:
                summary[f"{what}_B{B}_peak_ratio_vs_reference_style"] = (
                    eff[0]["peak_rss_gib"] / ref[0]["peak_rss_gib"])
            if eff and nai:
                summary[f"{what}_B{B}_peak_ratio"] = eff[0]["peak_rss_gib"] / nai[0]["peak_rss_gib"]
                summary[f"{what}_B{B}_delta_ratio"] = eff[0]["delta_gib"] / max(nai[0]["delta_gib"], 1e-9)
    return {"configs": results, "summary": summary}


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        logging.basicConfig(level=logging.INFO)
        print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
