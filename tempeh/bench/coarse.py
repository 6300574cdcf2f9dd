"""Coarse-stage benchmark at paper scale (not a test).

Configurations: 16 views of 200x150 (1/8 of 1600x1200), d_c = 32, 5023 vertices, ResNet34
feature net, 5-level U-Net, random weights; batch 1 and 2; four soft-argmax heads with the same
parameters (see :mod:`tempeh.bench.reference_arch`):

* ``efficient``: our default head (one fused attention call);
* ``chunked``: our earlier default (chunks of vertices, each checkpointed in training);
* ``matmul``: all ``(B, N, 32^3)`` logits at once, expectation by a batched matmul;
* ``reference``: the reference TEMPEH formulation (softmax, grid repeated per vertex to
  ``(B, N, 3, 32^3)``, product, sum): the "naive head" the memory target is measured against.

Each configuration runs in a fresh subprocess, so ``ru_maxrss`` is that configuration's peak
resident memory (process total: Python, torch, parameters, gradients and, in training, the AdamW
state). Figures per configuration: ``forward_s`` (eval, no grad), ``train_step_s`` (train mode,
forward + v2v MSE + backward + AdamW step), each the best of the repetitions (``*_first_s``: the
first call), their process CPU times ``*_cpu_s`` (steadier on a shared machine), ``peak_gib``
(whole process; on CUDA the allocator's peak), ``base_gib`` (after building the model and
inputs) and ``delta_gib = peak - base``; also the head alone (features ``(B, 128, 32^3)`` ->
verts, forward + backward, ``head_fwd_bwd_s``).

The reference-style training step at batch 2 is skipped on CPU: it needs about 15 GiB (the
benchmark keeps each configuration under about 12 GiB of a 24 GiB machine).

    python -m tempeh.bench.coarse [--quick] [--device cuda]
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

from tempeh.bench.reference_arch import REFERENCE_DOCUMENTED

logger = logging.getLogger(__name__)

__all__ = ["run", "markdown", "REFERENCE_DOCUMENTED"]

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


class _Meter:
    """Peak memory and timing on CPU (``ru_maxrss``) or CUDA (allocator peak, synchronised)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / _GIB if self.cuda else _rss_gib()

    def timed(self, res: Dict, key: str, fn, reps: int) -> None:
        """``res[key + "_s"]``: best wall time of ``reps`` calls (the first included: at
        ``reps = 1`` it holds one-time costs); ``_cpu_s``: that call's process CPU time;
        ``_first_s``: the first call's wall time."""
        runs = []
        for _ in range(reps):
            self.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            self.sync()
            runs.append((time.perf_counter() - t0, time.process_time() - c0))
        res[key + "_s"], res[key + "_cpu_s"] = min(runs)
        res[key + "_first_s"] = runs[0][0]


def _child(spec: Dict) -> Dict:
    """Run one configuration in this (fresh) process."""
    from tempeh.bench.reference_arch import HEAD_IMPL, ReferenceStyleHead, set_head_mode
    from tempeh.cameras import Cameras
    from tempeh.models.coarse import CoarseConfig, CoarseModel
    from tempeh.models.soft_argmax import SoftArgmaxHead

    torch.manual_seed(0)
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    dev = torch.device(spec.get("device", "cpu"))
    meter = _Meter(dev)
    B, V, W, H, N, mode = spec["B"], spec["V"], spec["W"], spec["H"], spec["N"], spec["head"]
    reps = int(spec.get("reps", 1))
    res: Dict = dict(spec, threads=torch.get_num_threads())
    if spec["what"] == "head":
        head = SoftArgmaxHead(128, N, chunk_size=spec["chunk"], mode=HEAD_IMPL[mode]).to(dev)
        if mode == "reference":
            head = ReferenceStyleHead(head)
        D = spec["D"]
        feats = torch.randn(B, 128, D, D, D, device=dev, requires_grad=True)
        coords = torch.randn(B, D, D, D, 3, device=dev) * 100
        res["base_gib"] = meter.peak_gib()
        meter.timed(res, "head_fwd_bwd", lambda: head(feats, coords).square().mean().backward(), reps)
    else:
        model = set_head_mode(CoarseModel(CoarseConfig.paper_scale(num_verts=N)), mode).to(dev)
        cams = Cameras.stack([_rig(V, W, H)] * B).to(device=dev)
        images = torch.rand(B, V, 1, H, W, device=dev)
        target = torch.randn(B, N, 3, device=dev) * 80
        res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        if spec["what"] == "forward":
            model.eval()
            res["base_gib"] = meter.peak_gib()
            with torch.no_grad():
                meter.timed(res, "forward", lambda: model(images, cams), reps)
        else:
            model.train()
            opt = torch.optim.AdamW(model.param_groups(1e-3, 1e-4))
            g = torch.Generator().manual_seed(0)

            def step():
                loss = (model(images, cams, generator=g).verts - target).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            res["base_gib"] = meter.peak_gib()
            meter.timed(res, "train_step", step, reps)
    res["peak_gib"] = meter.peak_gib()
    res["delta_gib"] = res["peak_gib"] - res["base_gib"]
    return res


def _spawn(spec: Dict, timeout: Optional[float] = None) -> Dict:
    cmd = [sys.executable, "-m", "tempeh.bench.coarse", "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout} s")
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        return dict(spec, error=f"exit code {out.returncode}" + (f": {tail}" if tail else
                                                                 " (killed: out of memory?)"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _specs(quick: bool, device: str, max_gib: float) -> List[Dict]:
    from tempeh.bench.reference_arch import HEAD_MODES
    from tempeh.models.coarse import CoarseConfig
    base = dict(V=16, W=200, H=150, N=5023, D=32, chunk=CoarseConfig().head_chunk_size,
                reps=1 if quick else 2, device=device)
    specs: List[Dict] = [dict(base, what="head", B=1, head=m) for m in HEAD_MODES]
    for what in ("forward", "train"):
        for B in (1, 2):
            if quick and what == "forward" and B > 1:
                continue
            for m in HEAD_MODES:
                s = dict(base, what=what, B=B, head=m)
                # the reference-style head in training: ~7.4 GiB per sample for the head alone
                if device == "cpu" and m == "reference" and what == "train" and 7.4 * B + 2 > max_gib:
                    s["skipped"] = (f"needs about {7.4 * B + 2:.0f} GiB, over the {max_gib:g} GiB "
                                    "per-configuration budget of this benchmark")
                specs.append(s)
    return specs


def run(quick: bool = False, device: str = "cpu", max_gib: float = 12.0) -> Dict:
    """Measure every configuration (``quick``: one repetition, forward at batch 1 only).

    Args:
        device: "cpu" or "cuda" (peak memory is then the CUDA allocator's peak).
        max_gib: configurations expected to need more memory are skipped (recorded as such).
    Returns:
        ``{"configs": [...], "summary": {ratios}, "reference_documented": {...}}``; ratios are
        ``efficient / reference`` and ``efficient / matmul`` of the peak and of the added memory;
        ``train_target_met``: the efficient training step's peak <= 35 % of the reference-style
        head's (batch 1; batch 2 when measured).
    """
    results = []
    for s in _specs(quick, device, max_gib):
        r = dict(s) if "skipped" in s else _spawn(s)
        logger.info("%s", r)
        results.append(r)
    summary: Dict = {}
    for what in ("head", "forward", "train"):
        for B in (1, 2):
            sel = {r["head"]: r for r in results
                   if r["what"] == what and r["B"] == B and "error" not in r and "skipped" not in r}
            eff = sel.get("efficient")
            for other in ("reference", "matmul"):
                if eff and other in sel:
                    o = sel[other]
                    summary[f"{what}_B{B}_peak_ratio_vs_{other}"] = eff["peak_gib"] / o["peak_gib"]
                    summary[f"{what}_B{B}_delta_ratio_vs_{other}"] = (
                        eff["delta_gib"] / max(o["delta_gib"], 1e-9))
    met = [summary[k] <= 0.35 for k in ("train_B1_peak_ratio_vs_reference", "train_B2_peak_ratio_vs_reference")
           if k in summary]
    summary["train_target"] = "efficient training-step peak <= 35 % of the reference-style head's"
    summary["train_target_met"] = all(met) if met else None
    return {"device": device, "quick": quick, "configs": results, "summary": summary,
            "reference_documented": REFERENCE_DOCUMENTED}


def _fmt(x, nd=2) -> str:
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown(res: Dict) -> str:
    """Markdown tables of a :func:`run` result (used by ``python -m tempeh.bench``)."""
    mem = "peak GPU alloc (GiB)" if res.get("device") == "cuda" else "peak RSS (GiB)"
    lines = [f"| stage | batch | head | time (s) | CPU time (s) | {mem} | added (GiB) | "
             "peak vs reference-style head (%) | note |", "|" + "---|" * 9]
    peaks = {(r["what"], r["B"]): r["peak_gib"] for r in res["configs"]
             if r["head"] == "reference" and "peak_gib" in r}
    names = {"head": "head alone, fwd+bwd", "forward": "forward (eval)", "train": "training step"}
    for r in res["configs"]:
        t_key = {"head": "head_fwd_bwd", "forward": "forward", "train": "train_step"}[r["what"]]
        ref = peaks.get((r["what"], r["B"]))
        pct = 100 * r["peak_gib"] / ref if ref and "peak_gib" in r else None
        note = r.get("skipped") or r.get("error") or ""
        lines.append(f"| {names[r['what']]} | {r['B']} | {r['head']} | {_fmt(r.get(t_key + '_s'))} | "
                     f"{_fmt(r.get(t_key + '_cpu_s'))} | {_fmt(r.get('peak_gib'))} | "
                     f"{_fmt(r.get('delta_gib'))} | {_fmt(pct, 0)} | {note} |")
    s = res.get("summary", {})
    met = s.get("train_target_met")
    lines += ["", f"Target: {s.get('train_target', '')}: "
              + ("met" if met else "NOT met" if met is False else "not measured") + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        logging.basicConfig(level=logging.INFO)
        dev = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
        print(json.dumps(run(quick="--quick" in sys.argv, device=dev), indent=1))
