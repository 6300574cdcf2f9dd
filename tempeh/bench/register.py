"""Throughput (frames/s) and peak memory of ``register_sequence`` (not a test).

Two settings, random weights (timing does not depend on them), each in a FRESH subprocess whose
peak resident memory (``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``) is
reported:

* ``demo``: the networks ``make demo`` trains, ``configs/demo_cpu/coarse.yaml`` +
  ``configs/demo_cpu/refine.yaml`` (1292 vertices, 8 views of 200x150 stored; coarse at 100x75,
  refinement at 200x150), coarse + refinement;
* ``paper``: ``configs/paper.yaml`` + ``configs/refine.yaml`` (5023 vertices, 16 views of
  400x300 stored; coarse at 200x150, refinement at 400x300), coarse + refinement.

Inputs: :func:`tempeh.bench.data.write_tiny_capture` (random-texture images, an arc rig), a
Fibonacci-sphere template of the model's vertex count (cost does not depend on topology), a run
directory written by :func:`write_random_run`. ``frames_per_s`` counts registered frames over
the wall time of the registration loop (image loading, both networks, mesh writing, NPZ), after
the models are loaded.

Run: ``python -m tempeh.bench.register [--quick] [--device cpu]`` prints JSON.
:func:`write_random_run`, :func:`tiny_configs` and :func:`tiny_register_setup` are also used by the
register tests.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger(__name__)

__all__ = ["write_random_run", "tiny_configs", "tiny_register_setup", "measure", "run"]

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_configs(num_verts: int, views: int = 2, downsample: float = 1.0) -> Dict[str, dict]:
    """Differences-from-defaults of a tiny coarse and refinement stage (CPU tests)."""
    data = {"min_views": min(2, views), "max_views": views, "num_workers": 0,
            "image_downsample": downsample, "scan_points": 100}
    coarse = {"run": {"name": "coarse", "stage": "coarse", "device": "cpu"}, "data": data,
              "model": {"num_verts": num_verts, "feature_channels": 4, "feature_blocks": [1, 1, 1, 1],
                        "feature_widths": [8, 8, 8, 8], "feature_stem_width": 8, "feature_norm": "gn",
                        "grid_side": 8, "grid_spacing_mm": 60.0, "localizer_hidden": 8,
                        "localizer_levels": 1, "localizer_fc": 16, "localizer_init_extent_mm": 300.0,
                        "localizer_max_scale": 0.9, "localizer_norm": "none", "unet_levels": 2,
                        "unet_widths": [8, 8, 8], "unet_back_widths": [8], "unet_front_kernel": 3,
                        "unet_norm": "gn", "head_chunk_size": num_verts}}
    refine = {"run": {"name": "refine", "stage": "refine", "device": "cpu"}, "data": data,
              "model": {"feature_channels": 4, "feature_blocks": [1, 1, 1, 1],
                        "feature_widths": [8, 8, 8, 8], "feature_stem_width": 8, "feature_norm": "gn",
                        "grid_side": 4, "grid_spacing_mm": 2.0, "unet_levels": 1, "unet_pools": 1,
                        "unet_widths": [8, 8], "unet_front_width": 8, "unet_front_kernel": 3,
                        "unet_back_widths": [8], "chunk_size": num_verts}}
    return {"coarse": coarse, "refine": refine}


def write_random_run(run_dir, template, stages: Dict[str, object], seed: int = 0) -> Path:
    """A run directory of randomly initialised stages, in the trainer's layout.

    Args:
        run_dir: the run folder to write (``<run>/<stage>/{config.yaml, template/,
            checkpoints/last.pt}``).
        template: :class:`~tempeh.template.Template` the networks predict.
        stages: stage folder name -> a :class:`~tempeh.config.TrainConfig`, a config file path
            or a mapping of differences (see :func:`tiny_configs`).
        seed: initialisation seed (stage k uses ``seed + k``).
    """
    import torch

    from tempeh.config import TrainConfig, config_from_dict, load_config, save_config
    from tempeh.engine.checkpoint import save_checkpoint
    from tempeh.inference import build_model
    from tempeh.io.templates import save_template_dir

    run_dir = Path(run_dir)
    for k, (name, spec) in enumerate(stages.items()):
        if isinstance(spec, TrainConfig):
            cfg = spec
        elif isinstance(spec, (str, os.PathLike)):
            cfg = load_config(spec)
        else:
            cfg = config_from_dict(spec)
        torch.manual_seed(seed + k)
        model = build_model(cfg, template)
        sdir = run_dir / name
        save_config(cfg, sdir / "config.yaml")
        if not (sdir / "template" / "template.ply").is_file():
            save_template_dir(sdir / "template", template, units="m")
        save_checkpoint({"format": 1, "kind": cfg.run.stage, "stage": name, "step": 0,
                         "model": model.state_dict()}, sdir / "checkpoints" / "last.pt")
    return run_dir


def tiny_register_setup(root, num_frames: int = 4, num_views: int = 2,
                        sequences=("seqA", "seqB"), refine: bool = True, seed: int = 0):
    """A tiny capture (48x36 images, sphere registrations) and a random tiny run for it.

    Returns ``(capture_dir, run_dir, template)``; the template (a 162-vertex icosphere of
    radius 90 mm) is also written to ``<capture>/template``.
    """
    import numpy as np
    import trimesh

    from tempeh.bench.data import write_tiny_capture
    from tempeh.io.templates import save_template_dir
    from tempeh.template import Template

    root = Path(root)
    cap = write_tiny_capture(root / "capture", num_frames=num_frames, num_views=num_views,
                             width=48, height=36, scan_points=50, sequences=tuple(sequences),
                             seed=seed)
    s = trimesh.creation.icosphere(subdivisions=2, radius=90.0)
    template = Template(np.asarray(s.vertices), np.asarray(s.faces), {}, "tiny_sphere")
    save_template_dir(cap / "template", template, units="m")
    cfgs = tiny_configs(template.num_verts, views=num_views)
    stages = {"coarse": cfgs["coarse"]}
    if refine:
        stages["refine"] = cfgs["refine"]
    run = write_random_run(root / "run", template, stages, seed=seed)
    return cap, run, template


def _sphere_template(num_verts: int):
    from tempeh.bench.refine import _fibonacci_sphere
    from tempeh.template import Template

    v, f = _fibonacci_sphere(num_verts, 90.0)
    return Template(v, f, {}, f"sphere{num_verts}")


def measure(setting: str = "demo", frames: int = 6, device: str = "cpu",
            threads: Optional[int] = None) -> dict:
    """One setting in THIS process (call it in a fresh process for a clean peak)."""
    import torch

    from tempeh.bench.data import write_tiny_capture
    from tempeh.cli.register_sequence import main as register_main
    from tempeh.config import load_config

    if threads:
        torch.set_num_threads(int(threads))
    if setting == "demo":
        ccfg = load_config(REPO_CONFIGS / "demo_cpu" / "coarse.yaml")
        rcfg = load_config(REPO_CONFIGS / "demo_cpu" / "refine.yaml")
        views, (width, height) = 8, (200, 150)
    elif setting == "paper":
        ccfg = load_config(REPO_CONFIGS / "paper.yaml")
        rcfg = load_config(REPO_CONFIGS / "refine.yaml", ["data.image_downsample=1"])
        views, (width, height) = 16, (400, 300)
    else:
        raise ValueError(f"unknown setting {setting!r} (demo, paper)")
    n = ccfg.model.num_verts
    stages = {"coarse": ccfg, "refine": rcfg}
    out = {"setting": setting, "num_verts": n, "views": views, "stored_image": [width, height],
           "coarse_downsample": ccfg.data.image_downsample,
           "refine": True, "frames": frames, "device": device,
           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cap = write_tiny_capture(tmp / "cap", num_frames=frames, num_views=views, width=width,
                                 height=height, scan_points=10)
        write_random_run(tmp / "run", _sphere_template(n), stages)
        out["rss_before_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
        t0 = time.perf_counter()
        code = register_main(["--model", str(tmp / "run"), "--data", str(cap), "--all", "--out",
                              str(tmp / "out"), "--device", device, "--workers", "1", "-q"])
        out["wall_s_with_model_loading"] = round(time.perf_counter() - t0, 3)
        man = json.loads((tmp / "out" / "manifest.json").read_text())
    out["exit_code"] = code
    s = man["summary"]
    out["frames_per_s"] = s["frames_per_s"]
    out["loop_s"] = s["seconds"]
    pred = sorted(r["predict_s"] for r in man["frames"] if "predict_s" in r)
    out["predict_s_median"] = pred[len(pred) // 2] if pred else None
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def _in_subprocess(**kw) -> dict:
    cmd = [sys.executable, "-m", "tempeh.bench.register", "--worker", json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        return {**kw, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Demo setting (quick: 4 frames; full: 8) and, unless ``quick``, paper scale (2 frames;
    minutes on a 2-core CPU: the refinement forward dominates)."""
    res = {"demo": _in_subprocess(setting="demo", frames=4 if quick else 8, device=device)}
    if not quick:
        res["paper"] = _in_subprocess(setting="paper", frames=2, device=device)
    return res


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(**json.loads(a.worker))))
    else:
        print(json.dumps(run(quick=a.quick, device=a.device), indent=2))
