"""Accuracy and speed of optimisation-based scan fitting (:func:`tempeh.fitting.fit_scan`).

Held-out synthetic frames (seeds disjoint from any test): a random subject (identity scale and
bumps), a random frame of :meth:`VariationModel.sample_sequence` (expression, gaze, head pose
within the default ranges, translation), and an MVS-like scan of the true mesh from the
16-camera paper rig (:func:`tempeh.synth.scan.simulate_scan`: 0.2 mm noise, holes, hair
patches, no eyeballs, no under-chin, 1 % outliers). Each frame is fitted from the NEUTRAL
template twice:

* ``landmarks``: rough rigid alignment from 8 face landmarks with 3 mm noise, then the fit;
* ``auto``: no prior at all (global yaw/pitch search + robust ICP), then the fit.

Figures: median over frames of the per-frame median vertex error to the true mesh, per region
(``face``, ``scalp``, ``neck``, ``lips``, ``all``), mm; the per-frame face medians (to see the
spread); the final scan->mesh median (mm); seconds per frame. Not a test: the numbers depend
on the machine and its load (the 2-core development machine is shared).
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List

import numpy as np
import torch

logger = logging.getLogger(__name__)

REGIONS = ("face", "scalp", "neck", "lips")


def _frame(vm, template, cams, seed: int, points: int):
    from tempeh.synth.scan import simulate_scan

    rng = np.random.default_rng(10_000 + seed)
    subject = vm.sample_subject(rng)
    frame = vm.sample_sequence(rng, 1)[0]
    truth = vm.apply(subject, frame)
    scan = simulate_scan(truth, template.faces, template.regions, cams, rng, num_points=points)
    face = template.regions["face"]
    ids = rng.choice(face, 8, replace=False)
    landmarks = (truth[ids] + rng.normal(0, 3.0, (8, 3)), ids)
    return truth, scan.points, landmarks, frame


def _errors(template, truth, verts) -> Dict[str, float]:
    e = np.linalg.norm(verts - truth, axis=1)
    out = {"all": float(np.median(e))}
    for r in REGIONS:
        if r in template.regions:
            out[r] = float(np.median(e[template.regions[r]]))
    return out


def run(quick: bool = False) -> dict:
    """Fit ``quick ? 3 : 20`` held-out frames (low head, 10k-point scans); returns the
    figures described in the module docstring."""
    from tempeh.fitting import FitConfig, fit_scan
    from tempeh.synth.head import make_head_template
    from tempeh.synth.rig import make_rig
    from tempeh.synth.variation import VariationModel

    n, points = (3, 10000) if quick else (20, 10000)
    template = make_head_template("low")
    vm = VariationModel(template)
    cams = make_rig("paper", 16, 400, 300)
    cfg = FitConfig(num_threads=1)
    per: Dict[str, List[Dict[str, float]]] = {"landmarks": [], "auto": []}
    for seed in range(n):
        truth, scan, landmarks, frame = _frame(vm, template, cams, seed, points)
        for mode in per:
            t0 = time.perf_counter()
            res = fit_scan(scan, template, cfg, landmarks=landmarks if mode == "landmarks" else None,
                           device="cpu")
            row = _errors(template, truth, res.verts)
            row.update(time_s=time.perf_counter() - t0, s2m_median_mm=res.stats["s2m_median_mm"],
                       yaw=frame.yaw, jaw_open=frame.expression.get("jaw_open", 0.0))
            per[mode].append(row)
            logger.info("frame %d %s: face %.2f all %.2f (%.1f s)", seed, mode, row["face"],
                        row["all"], row["time_s"])
    out: Dict[str, object] = {"frames": n, "scan_points": points,
                              "template_vertices": template.num_verts,
                              "torch_threads": 1, "quick": quick}
    for mode, rows in per.items():
        keys = [k for k in rows[0] if k not in ("yaw", "jaw_open")]
        out[mode] = {f"median_{k}": float(np.median([r[k] for r in rows])) for k in keys}
        out[mode]["face_per_frame"] = [round(r["face"], 3) for r in rows]
        out[mode]["frames_face_le_1mm"] = int(sum(r["face"] <= 1.0 for r in rows))
    return out


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
