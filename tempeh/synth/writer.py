"""Write a complete synthetic capture folder (the layout of :mod:`tempeh.io.layout`).

One call of :func:`write_synthetic_capture` produces, under ``out``::

    capture.json                       units (scans mm, meshes m), image_ext png, name
    synthetic.json                     generator settings, seed, subjects, splits, per-frame counts
    template/                          the template and regions used (save_template_dir)
    calibrations/<s>/<q>/cameras.json  the rig at the IMAGE resolution (fixed per capture folder)
    images/<s>/<q>/<f>/<q>.<f>.<cam>.png       grey speckle renders (tempeh.synth.render)
    scans/<s>/<q>/<q>.<f>.ply          simulated MVS scan, mm (tempeh.synth.scan)
    registrations/<s>/<q>/<q>.<f>.ply  perturbed "automatic" registrations, m
    gt_meshes/<s>/<q>/<q>.<f>.ply      exact meshes, m
    synthetic/<s>/<q>/<q>.<f>.outliers.npy     (P,) bool: which scan points are outliers
    data_lists/{train,val,test}.json   split BY SUBJECT (disjoint)
    preview.png                        optional contact sheet

Determinism: every random draw comes from ``np.random.default_rng([seed, stream, ...ids])``, so a
frame's content depends only on (seed, subject, sequence, frame) and the settings -- not on the
number of workers or the order of work. Same seed and settings -> identical bytes.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from tempeh.cameras import Cameras
from tempeh.template import Template

logger = logging.getLogger(__name__)

__all__ = ["SyntheticConfig", "write_synthetic_capture", "split_subjects", "load_generator_template",
           "make_preview"]

# Random streams (first entries of the seed sequences).
_S_SUBJECT, _S_SEQUENCE, _S_RENDER, _S_SCAN, _S_REG, _S_SPLIT = 1, 2, 3, 4, 5, 6
#: Range of the per-subject hair reflectance (relative to skin) when markings are on.
_HAIR_TONES = (0.2, 0.7)


@dataclass
class SyntheticConfig:
    """Settings of a synthetic capture (all written to ``synthetic.json``)."""

    subjects: int = 3
    sequences_per_subject: int = 1
    frames_per_sequence: int = 4
    seed: int = 0
    views: int = 16
    """Number of cameras of the rig."""
    rig: str = "paper"
    """``paper`` (8 stereo pods, FaMoS names) or ``random`` (from the seed)."""
    width: int = 1600
    """Native image size of the rig; the images are written at ``width / image_downsample``."""
    height: int = 1200
    image_downsample: int = 4
    speckle_mm: float = 2.0
    """Cell size of the finest octave of the skin's speckle texture, mm (``RenderConfig.speckle_mm``).
    The 2 mm default suits 400x300 images of the paper rig (~2 mm per pixel at 1 m); at coarser
    images a finer pattern falls below the pixel and renders as view-dependent aliasing."""
    markings: float = 0.0
    """Strength in [0, 1] of the darker regions of a real head (hair with a tone drawn per subject,
    eyes, lids, lips, nostrils; :func:`tempeh.synth.render.marking_albedo`); 0: speckle only."""
    template: str = "low"
    """``low`` / ``full`` (procedural head) or a template folder (``template.ply|obj`` +
    ``regions.npz``)."""
    scan_points: int = 80000
    scan_noise_mm: float = 0.2
    outlier_rate: float = 0.01
    hole_rate: float = 0.04
    reg_tangential_mm: float = 0.7
    reg_normal_mm: float = 0.3
    translation_mm: float = 100.0
    """Max head translation per axis within the capture volume."""
    yaw_deg: float = 60.0
    pitch_deg: float = 30.0
    roll_deg: float = 15.0
    split: Tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Fractions of SUBJECTS for train / val / test (at least one each when subjects >= 3)."""
    preview: bool = False
    workers: int = 1

    def validate(self) -> "SyntheticConfig":
        for name in ("subjects", "sequences_per_subject", "frames_per_sequence", "views",
                     "image_downsample", "scan_points", "workers", "width", "height"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.width % self.image_downsample or self.height % self.image_downsample:
            raise ValueError(f"image size {self.width}x{self.height} is not divisible by "
                             f"--image-downsample {self.image_downsample}")
        if not float(self.speckle_mm) > 0:
            raise ValueError(f"--speckle-mm must be > 0, got {self.speckle_mm}")
        if not 0.0 <= float(self.markings) <= 1.0:
            raise ValueError(f"--markings must be in [0, 1], got {self.markings}")
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) <= 0:
            raise ValueError(f"split must be three non-negative fractions, got {self.split}")
        return self


# ----------------------------------------------------------------------------- names and seeds
def subject_name(i: int) -> str:
    return f"subject_{i:03d}"


def sequence_name(j: int) -> str:
    return f"sequence_{j:02d}"


def frame_name(k: int) -> str:
    return f"{k:06d}"


def _rng(seed: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [int(i) for i in ids])


def split_subjects(num_subjects: int, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> Dict[str, List[int]]:
    """Disjoint train/val/test subject indices (shuffled by ``seed``).

    With ``num_subjects >= 3`` every split with a positive fraction gets at least one subject;
    with 2 subjects: train and val; with 1: train only.
    """
    order = _rng(seed, _S_SPLIT).permutation(num_subjects).tolist()
    f = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    n = num_subjects
    if n >= 3:
        n_val = max(1, int(round(f[1] * n))) if f[1] > 0 else 0
        n_test = max(1, int(round(f[2] * n))) if f[2] > 0 else 0
        n_train = n - n_val - n_test
        if n_train < 1:  # tiny n with large val/test fractions
            n_train, n_val, n_test = 1, (n - 1) - (n - 1) // 2, (n - 1) // 2
    elif n == 2:
        n_train, n_val, n_test = 1, 1, 0
    else:
        n_train, n_val, n_test = n, 0, 0
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:n_train + n_val + n_test])}


@functools.lru_cache(maxsize=4)
def _builtin_template(resolution: str) -> Template:
    from tempeh.synth.head import make_head_template

    return make_head_template(resolution)


def load_generator_template(spec: str) -> Template:
    """``low``/``full`` (procedural head, cached per process) or a template folder path."""
    if spec in ("low", "full"):
        return _builtin_template(spec)
    from tempeh.io.templates import load_template_dir

    return load_template_dir(spec)


# ----------------------------------------------------------------------------- per-frame work
class _FrameWorker:
    """Everything needed to produce a frame, built once per process."""

    def __init__(self, cfg: SyntheticConfig):
        from tempeh.synth.rig import make_rig
        from tempeh.synth.variation import VariationModel, VariationRanges

        self.cfg = cfg
        self.template = load_generator_template(cfg.template)
        self.model = VariationModel(self.template)
        self.ranges = VariationRanges(yaw=(-cfg.yaw_deg, cfg.yaw_deg),
                                      pitch=(-cfg.pitch_deg, cfg.pitch_deg),
                                      roll=(-cfg.roll_deg, cfg.roll_deg),
                                      translation=cfg.translation_mm)
        self.rig = make_rig(cfg.rig, num_views=cfg.views, width=cfg.width, height=cfg.height,
                            seed=cfg.seed)

    @functools.lru_cache(maxsize=8)
    def _subject(self, i: int):
        return self.model.sample_subject(_rng(self.cfg.seed, _S_SUBJECT, i))

    @functools.lru_cache(maxsize=8)
    def _sequence(self, i: int, j: int):
        return self.model.sample_sequence(_rng(self.cfg.seed, _S_SEQUENCE, i, j),
                                          self.cfg.frames_per_sequence, self.ranges)

    def frame(self, i: int, j: int, k: int) -> dict:
        """Generate (not write) one frame: images, scan, registration, true mesh."""
        from tempeh.synth.registration import RegistrationErrorConfig, perturb_registration
        from tempeh.synth.render import RenderConfig, marking_albedo, render_views
        from tempeh.synth.scan import simulate_scan

        cfg, t = self.cfg, self.template
        subject = self._subject(i)
        verts = self.model.apply(subject, self._sequence(i, j)[k])
        texture_seed = int(_rng(cfg.seed, _S_SUBJECT, i, 1).integers(0, 2**31 - 1))
        albedo = None
        if cfg.markings > 0:
            hair = float(_rng(cfg.seed, _S_SUBJECT, i, 2).uniform(*_HAIR_TONES))
            albedo = marking_albedo(t.num_verts, t.faces, t.regions, cfg.markings, hair=hair)
        images = render_views(verts, t.faces, self.rig, t.verts, _rng(cfg.seed, _S_RENDER, i, j, k),
                              texture_seed=texture_seed, downsample=cfg.image_downsample,
                              config=RenderConfig(speckle_mm=cfg.speckle_mm), vertex_albedo=albedo)
        scan = simulate_scan(verts, t.faces, t.regions, self.rig, _rng(cfg.seed, _S_SCAN, i, j, k),
                             num_points=cfg.scan_points, noise_mm=cfg.scan_noise_mm,
                             outlier_rate=cfg.outlier_rate, hole_rate=cfg.hole_rate)
        reg = perturb_registration(verts, t.faces, t.regions, _rng(cfg.seed, _S_REG, i, j, k),
                                   RegistrationErrorConfig(tangential_mm=cfg.reg_tangential_mm,
                                                           normal_mm=cfg.reg_normal_mm))
        return {"verts": verts, "images": images, "scan": scan, "registration": reg}

    def write_frame(self, root: str, i: int, j: int, k: int) -> dict:
        from tempeh.io.images import write_png
        from tempeh.io.layout import CaptureLayout, FrameId, frame_file
        from tempeh.io.mesh import write_mesh, write_points

        out = self.frame(i, j, k)
        layout = CaptureLayout(root)
        fid = FrameId(subject_name(i), sequence_name(j), frame_name(k))
        for name, img in zip(self.rig.names, out["images"]):
            write_png(layout.image_path(fid, name), img)
        scan = out["scan"]
        write_points(layout.scan_path(fid, ext="ply"), scan.points, units="mm")
        write_mesh(layout.registration_path(fid), out["registration"], self.template.faces, units="m")
        write_mesh(layout.gt_mesh_path(fid), out["verts"], self.template.faces, units="m")
        extra = frame_file(Path(root) / "synthetic", fid, "outliers.npy")
        extra.parent.mkdir(parents=True, exist_ok=True)
        np.save(extra, scan.is_outlier, allow_pickle=False)
        return {"frame": list(fid), "scan_points": int(len(scan.points)),
                "scan_outliers": int(scan.is_outlier.sum())}


_WORKER: Optional[_FrameWorker] = None


def _init_worker(cfg_dict: dict) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _FrameWorker(SyntheticConfig(**cfg_dict))


def _run_task(args) -> dict:
    return _WORKER.write_frame(*args)


# ----------------------------------------------------------------------------- preview
def _draw_points(img: np.ndarray, uv: np.ndarray, depth: np.ndarray, color_by_depth=True) -> None:
    """Draw projected points (in place) coloured near red -> far yellow."""
    if len(uv) == 0:
        return
    s = (depth - depth.min()) / max(float(np.ptp(depth)), 1e-9)
    colour = np.stack([np.zeros_like(s), 255 * s, np.full_like(s, 255.0)], 1).astype(np.uint8)
    u = np.clip(np.rint(uv[:, 0]).astype(np.int64), 0, img.shape[1] - 1)
    v = np.clip(np.rint(uv[:, 1]).astype(np.int64), 0, img.shape[0] - 1)
    order = np.argsort(-depth)  # near points drawn last
    img[v[order], u[order]] = colour[order]


def make_preview(images: np.ndarray, cams: Cameras, scan_points: np.ndarray, is_outlier: np.ndarray,
                 registration: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Contact sheet (BGR uint8): every view of one frame, then the scan points projected into
    the most frontal view and a shaded render of the registration from that view.

    Args:
        images: ``(V, H, W)`` uint8. cams: their ``(V,)`` cameras. scan_points: ``(P, 3)`` mm.
        is_outlier: ``(P,)`` bool (outliers drawn in magenta). registration: ``(N, 3)`` mm.
    """
    V, H, W = images.shape
    c64 = cams.to(dtype=torch.float64)
    front = int(torch.argmax(c64.centers()[:, 2]))
    base = cv2.cvtColor(images[front], cv2.COLOR_GRAY2BGR)
    scan_img = (base // 3).copy()
    uv, d = c64[front : front + 1].project(torch.from_numpy(scan_points)[None])
    uv, d = uv[0].numpy(), d[0].numpy()
    ok = (d > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
    _draw_points(scan_img, uv[ok & ~is_outlier], d[ok & ~is_outlier])
    if (ok & is_outlier).any():
        uo = np.rint(uv[ok & is_outlier]).astype(np.int64)
        scan_img[uo[:, 1], uo[:, 0]] = (255, 0, 255)
    # The registration: a plain shaded render (no speckle, no noise), tinted green.
    from tempeh.synth.render import RenderConfig, render_views

    shade = render_views(registration, faces, cams[front : front + 1], registration,
                         np.random.default_rng(0), downsample=1,
                         config=RenderConfig(speckle_contrast=0.0, albedo_variation=0.0,
                                             noise_sigma=0.0, background=0.0))[0]
    reg_img = np.stack([shade // 2, shade, shade // 2], -1).astype(np.uint8)
    tiles = [cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) for im in images] + [scan_img, reg_img]
    names = list(cams.names or [f"cam{i:02d}" for i in range(V)]) + ["scan", "registration"]
    for im, n in zip(tiles, names):
        cv2.putText(im, n, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
    cols = int(math.ceil(math.sqrt(len(tiles) * 4 / 3)))
    rows = int(math.ceil(len(tiles) / cols))
    tiles += [np.zeros_like(tiles[0])] * (rows * cols - len(tiles))
    return np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)


# ----------------------------------------------------------------------------- the capture
def write_synthetic_capture(out, config: Optional[SyntheticConfig] = None,
                            overwrite: bool = False, progress: bool = True) -> Path:
    """Generate and write a synthetic capture folder (see the module docstring).

    Args:
        out: the capture folder; must be absent or empty unless ``overwrite``.
        config: settings (``SyntheticConfig()`` by default).
        progress: show a tqdm progress bar over frames.
    Returns:
        ``Path(out)``.
    """
    from tqdm import tqdm

    from tempeh.io.calibration import write_cameras_json
    from tempeh.io.images import write_png
    from tempeh.io.layout import CaptureLayout, FrameId, write_data_list
    from tempeh.io.mesh import atomic_write
    from tempeh.io.templates import save_template_dir
    from tempeh.synth.render import output_cameras

    cfg = (config or SyntheticConfig()).validate()
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root}: output folder is not empty (use --overwrite)")
    root.mkdir(parents=True, exist_ok=True)
    worker = _FrameWorker(cfg)
    template = worker.template
    layout = CaptureLayout(root)

    # Capture-level files first, so a partial capture is still self-describing.
    with atomic_write(root / "capture.json", "w") as fh:
        json.dump({"name": f"tempeh-synthetic-seed{cfg.seed}",
                   "description": "synthetic capture written by tempeh.synth (make_synthetic)",
                   "units": {"scans": "mm", "meshes": "m"}, "image_ext": "png"}, fh, indent=2)
        fh.write("\n")
    tdir = layout.template_dir
    for stale in ("template.ply", "regions.npz", "template.json"):
        if (tdir / stale).exists() and overwrite:
            (tdir / stale).unlink()
    save_template_dir(tdir, template, units="m")
    img_cams = output_cameras(worker.rig, cfg.image_downsample)
    tasks = []
    for i in range(cfg.subjects):
        for j in range(cfg.sequences_per_subject):
            write_cameras_json(layout.calibration_dir(subject_name(i), sequence_name(j)) / "cameras.json",
                               img_cams, units="mm")
            tasks += [(str(root), i, j, k) for k in range(cfg.frames_per_sequence)]

    results: List[dict] = []
    bar = tqdm(total=len(tasks), desc="make_synthetic", unit="frame", disable=not progress)
    if cfg.workers > 1 and len(tasks) > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(cfg.workers, len(tasks)), initializer=_init_worker,
                      initargs=(asdict(cfg),)) as pool:
            for r in pool.imap(_run_task, tasks):
                results.append(r)
                bar.update(1)
    else:
        for task in tasks:
            results.append(worker.write_frame(*task))
            bar.update(1)
    bar.close()

    splits = split_subjects(cfg.subjects, cfg.split, cfg.seed)
    for split, subj in splits.items():
        frames = [FrameId(subject_name(i), sequence_name(j), frame_name(k))
                  for i in subj for j in range(cfg.sequences_per_subject)
                  for k in range(cfg.frames_per_sequence)]
        write_data_list(layout.data_list_path(split), frames)

    meta = {
        "generator": "tempeh.synth.writer", "format_version": 1, "seed": cfg.seed,
        "settings": asdict(cfg), "template": template.name,
        "template_vertices": template.num_verts,
        "cameras": list(worker.rig.names), "image_size": [int(img_cams.width[0]), int(img_cams.height[0])],
        "splits": {k: [subject_name(i) for i in v] for k, v in splits.items()},
        "frames": results,
    }
    meta["settings"]["split"] = list(cfg.split)
    del meta["settings"]["workers"]  # does not change a byte of the output
    meta["settings"]["template"] = cfg.template if cfg.template in ("low", "full") else template.name
    with atomic_write(root / "synthetic.json", "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")

    if cfg.preview:
        fr = worker.frame(0, 0, 0)
        sheet = make_preview(fr["images"], img_cams, fr["scan"].points, fr["scan"].is_outlier,
                             fr["registration"], template.faces)
        write_png(root / "preview.png", sheet)
    logger.info("wrote %d frames to %s", len(tasks), root)
    return root
