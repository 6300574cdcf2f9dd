"""Speed of the synthetic studio: one frame = 16 views at 400x300 + an 80k-point scan + a
perturbed registration, on the procedural ``full`` head (about 5k vertices).

Figures (seconds, median of the timed repeats unless noted):
``rays_cold_s`` (first render of a rig: undistorting every pixel ray, cached afterwards),
``render_s``, ``scan_s``, ``registration_s``, ``frame_s`` (their sum, warm) and
``frames_per_s``. Not a test: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch


def run(quick: bool = False) -> dict:
    from tempeh.synth.head import make_head_template
    from tempeh.synth.registration import perturb_registration
    from tempeh.synth.render import render_views
    from tempeh.synth.rig import make_rig
    from tempeh.synth.scan import simulate_scan
    from tempeh.synth.variation import VariationModel

    views, ds, points, repeats = (4, 8, 10000, 1) if quick else (16, 4, 80000, 3)
    t = make_head_template("low" if quick else "full")
    vm = VariationModel(t)
    rng = np.random.default_rng(0)
    subj = vm.sample_subject(rng)
    frames = vm.sample_sequence(rng, repeats + 1)
    rig = make_rig(num_views=views, seed=0)

    t0 = time.perf_counter()
    render_views(vm.apply(subj, frames[0]), t.faces, rig, t.verts, rng, downsample=ds)
    rays_cold = time.perf_counter() - t0

    times = {"render_s": [], "scan_s": [], "registration_s": []}
    for fr in frames[1:]:
        v = vm.apply(subj, fr)
        t0 = time.perf_counter()
        render_views(v, t.faces, rig, t.verts, rng, downsample=ds)
        t1 = time.perf_counter()
        simulate_scan(v, t.faces, t.regions, rig, rng, num_points=points)
        t2 = time.perf_counter()
        perturb_registration(v, t.faces, t.regions, rng)
        t3 = time.perf_counter()
        times["render_s"].append(t1 - t0)
        times["scan_s"].append(t2 - t1)
        times["registration_s"].append(t3 - t2)
    out = {k: float(np.median(v)) for k, v in times.items()}
    out["frame_s"] = sum(out.values())
    out["frames_per_s"] = 1.0 / out["frame_s"]
    out.update(rays_cold_s=rays_cold, views=views,
               image_size=[int(1600 // ds), int(1200 // ds)], scan_points=points,
               template_vertices=t.num_verts, torch_threads=torch.get_num_threads(),
               quick=quick)
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
