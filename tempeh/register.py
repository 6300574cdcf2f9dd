"""Sequence registration: frame planning, sharding, the per-frame inference loop, outputs and
the manifest (the library behind ``tools/register_sequence.py``).

Outputs under ``out``::

    <out>/<subject>/<sequence>/<sequence>.<frame>.<ext>     one mesh per frame (template topology,
                                                            ``units``; raw network output)
    <out>/<subject>/<sequence>/<sequence>.npz               the sequence: verts (T, N, 3) float32 in
                                                            ``units``, faces, frames, units, ...
    <out>/smoothed/<subject>/<sequence>/<sequence>.<frame>.<ext>   only with smoothing
    <out>/manifest.json  (or manifest.shard-<i>-of-<n>.json for a shard)

``tools/evaluate.py --pred <out>`` scores the raw meshes, ``--pred <out>/smoothed`` the smoothed.

**Resuming.** Every file is written atomically (temporary file + ``os.replace``), so a mesh
either exists complete or not at all. A frame whose mesh exists and reads back with the
template's vertex count is skipped ("done"); a missing or unreadable one is registered again.
A rerun after an interruption therefore completes the job. The manifest records the model,
units and format; rerunning into the same folder with another model or units is refused
unless ``overwrite``.

**Bad frames.** A frame whose images are missing or truncated, which lacks a view that other
frames of its sequence have, or whose sequence calibration is unreadable, is reported with the
file at fault, recorded as "failed" and skipped; the others go on.

**Sharding** (:func:`shard_frames`): ``n`` jobs with ``--shard i/n`` (``0 <= i < n``) cover every
planned frame exactly once. The plan (sorted frames) is cut into units, whole sequences first;
while there are fewer units than shards the largest unit is split into two contiguous halves;
units are then dealt largest first to the shard with the fewest frames so far (ties: the lower
shard index). Every shard computes the same assignment from the same plan, so the shards
partition it. A shard writes the NPZ (and smoothing) of every sequence it holds whole; a
sequence split over shards gets them from the ``merge`` step (:func:`merge_shards`), which also
joins the shard manifests into ``manifest.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import tempeh
from tempeh.errors import TempehDataError
from tempeh.io.layout import CaptureLayout, FrameId, frame_file, frame_id

logger = logging.getLogger(__name__)

__all__ = ["frame_sort_key", "plan_frames", "parse_shard", "shard_units", "shard_frames",
           "mesh_path", "sequence_npz_path", "smoothed_root", "manifest_name", "ModelInfo",
           "load_models", "RegisterOptions", "RegisterResult", "register", "finalize_sequence",
           "merge_shards", "SMOOTHED_DIR"]

PathLike = Union[str, os.PathLike]
SMOOTHED_DIR = "smoothed"
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


# ============================================================================ planning
def frame_sort_key(frame: str):
    """Numeric frames by number (``"2" < "10"``), then other names alphabetically."""
    return (0, int(frame), frame) if frame.isdigit() else (1, 0, frame)


def _sorted_frames(frames: Iterable[FrameId]) -> List[FrameId]:
    return sorted(set(frames), key=lambda f: (f.subject, f.sequence, frame_sort_key(f.frame)))


def plan_frames(layout: CaptureLayout, frames: Optional[Sequence] = None,
                sequences: Optional[Sequence[str]] = None, all_frames: bool = False) -> List[FrameId]:
    """The frames to register, sorted by (subject, sequence, frame number), duplicates removed.

    Exactly one source: ``frames`` (e.g. from a data list), ``sequences`` (``"SUBJECT/SEQUENCE"``:
    every frame folder of the sequence with at least one image) or ``all_frames`` (every frame
    of the capture, :meth:`CaptureLayout.discover_frames`).
    """
    given = sum(x is not None and x is not False for x in (frames, sequences, all_frames or None))
    if given != 1:
        raise ValueError("plan_frames: give exactly one of frames, sequences, all_frames")
    if frames is not None:
        return _sorted_frames(frame_id(f) for f in frames)
    if all_frames:
        out = layout.discover_frames()
        if not out:
            raise TempehDataError(layout.images_root, "no frames found (expected "
                                  "images/<subject>/<sequence>/<frame>/<sequence>.<frame>.<camera>.png)")
        return _sorted_frames(out)
    out: List[FrameId] = []
    for sq in sequences:
        parts = sq.strip("/").split("/")
        if len(parts) != 2:
            raise ValueError(f"--sequence {sq!r}: expected SUBJECT/SEQUENCE")
        frame_id((parts[0], parts[1], "0"))  # validates the names
        d = layout.images_root / parts[0] / parts[1]
        if not d.is_dir():
            raise TempehDataError(d, f"sequence {sq} not found")
        with os.scandir(d) as it:
            names = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        found = [FrameId(parts[0], parts[1], f) for f in names]
        found = [f for f in found if layout.frame_cameras(f)]
        if not found:
            raise TempehDataError(d, f"sequence {sq} has no frame folders with images")
        out += found
    return _sorted_frames(out)


def plan_hash(frames: Sequence[FrameId]) -> str:
    """16-hex SHA-256 of the plan (so shards and merge can check they agree)."""
    h = hashlib.sha256("\n".join(str(f) for f in frames).encode("utf-8"))
    return h.hexdigest()[:16]


# ============================================================================ sharding
def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n`` (ValueError otherwise). Indices are 0-based
    like the default SLURM array ``--array=0-(n-1)``."""
    m = _SHARD_RE.match(str(text))
    if not m:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N (0-based shard index)")
    return i, n


def shard_units(frames: Sequence[FrameId], count: int) -> List[List[FrameId]]:
    """Cut the sorted plan into units (module docstring): whole sequences, the largest split
    into contiguous halves while there are fewer units than ``count``."""
    units: List[List[FrameId]] = []
    for f in frames:
        if units and units[-1][0][:2] == f[:2]:
            units[-1].append(f)
        else:
            units.append([f])
    while 0 < len(units) < count:
        big = max(range(len(units)), key=lambda k: (len(units[k]), -k))
        u = units[big]
        if len(u) < 2:
            break
        h = (len(u) + 1) // 2
        units[big:big + 1] = [u[:h], u[h:]]
    return units


def shard_frames(frames: Sequence[FrameId], index: int, count: int) -> List[FrameId]:
    """Frames of shard ``index`` of ``count`` (in plan order); the shards partition ``frames``."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    if count == 1:
        return list(frames)
    units = shard_units(frames, count)
    load = [0] * count
    mine: set = set()
    for k in sorted(range(len(units)), key=lambda k: (-len(units[k]), k)):
        s = min(range(count), key=lambda j: (load[j], j))
        load[s] += len(units[k])
        if s == index:
            mine.update(units[k])
    return [f for f in frames if f in mine]


# ============================================================================ paths
#: ``<out>/<subject>/<sequence>/<sequence>.<frame>.<ext>`` (the registrations layout).
mesh_path = frame_file


def sequence_npz_path(out: PathLike, subject: str, sequence: str) -> Path:
    """``<out>/<subject>/<sequence>/<sequence>.npz``."""
    return Path(out) / subject / sequence / f"{sequence}.npz"


def smoothed_root(out: PathLike) -> Path:
    """``<out>/smoothed``: the tree of smoothed meshes (same layout)."""
    return Path(out) / SMOOTHED_DIR


def manifest_name(shard: Optional[Tuple[int, int]] = None) -> str:
    """``manifest.json``, or ``manifest.shard-<i>-of-<n>.json`` for a shard of n > 1."""
    if shard is None or shard[1] == 1:
        return "manifest.json"
    return f"manifest.shard-{shard[0]}-of-{shard[1]}.json"


# ============================================================================ model
@dataclass
class ModelInfo:
    """The loaded networks and what the manifest says about them."""

    coarse: torch.nn.Module
    coarse_cfg: object
    refine: Optional[torch.nn.Module]
    refine_cfg: Optional[object]
    faces: np.ndarray
    num_verts: int
    record: dict


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _stage_record(run_dir: Path, stage: str, cfg) -> dict:
    from tempeh.config import config_hash
    from tempeh.engine.checkpoint import find_checkpoint

    ck = find_checkpoint(run_dir / stage)
    return {"stage": stage, "config_hash": config_hash(cfg), "checkpoint": str(ck),
            "checkpoint_sha256": _file_sha256(ck) if ck is not None else None}


def load_models(run_dir: PathLike, device: torch.device, coarse_only: bool = False,
                coarse_stage: str = "coarse", refine_stage: str = "refine",
                rebox_iterations: Optional[int] = None) -> ModelInfo:
    """Load the coarse (and refinement) stage of a run with :func:`tempeh.inference.load_stage_model`.

    A missing stage is a TempehDataError naming it (no fallback: ``coarse_only`` must be
    asked for explicitly). ``rebox_iterations`` (None: the trained config's) sets the coarse
    stage's re-box passes (``model.rebox_iterations``); the stage record and the model id then
    name it, so outputs of the two settings are not mixed in one folder.
    """
    from tempeh.inference import load_stage_model, load_template_for

    run_dir = Path(run_dir)
    for st in [coarse_stage] + ([] if coarse_only else [refine_stage]):
        if not (run_dir / st / "config.yaml").is_file():
            have = sorted(p.name for p in run_dir.iterdir() if (p / "config.yaml").is_file()) \
                if run_dir.is_dir() else []
            hint = " (pass --coarse-only to register with the coarse stage alone)" \
                if st == refine_stage else ""
            raise TempehDataError(run_dir / st, f"stage {st!r} not found in the run "
                                  f"(trained stages here: {', '.join(have) or 'none'}){hint}")
    # a negative count is a ConfigError naming model.rebox_iterations (CoarseConfig checks it)
    overrides = [] if rebox_iterations is None else [f"model.rebox_iterations={int(rebox_iterations)}"]
    coarse, ccfg = load_stage_model(run_dir, coarse_stage, device=device, overrides=overrides)
    template = load_template_for(run_dir / coarse_stage, ccfg)
    record = {"run_dir": str(run_dir), "stages": {"coarse": _stage_record(run_dir, coarse_stage, ccfg)}}
    if overrides:
        record["stages"]["coarse"]["overrides"] = overrides
    refine = rcfg = None
    if not coarse_only:
        refine, rcfg = load_stage_model(run_dir, refine_stage, device=device)
        rt = load_template_for(run_dir / refine_stage, rcfg)
        if rt.num_verts != template.num_verts:
            raise TempehDataError(run_dir / refine_stage / "template",
                                  f"refinement template has {rt.num_verts} vertices, the coarse "
                                  f"stage's {template.num_verts}")
        record["stages"]["refine"] = _stage_record(run_dir, refine_stage, rcfg)
    key = json.dumps(record["stages"], sort_keys=True)
    record["model_id"] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return ModelInfo(coarse, ccfg, refine, rcfg, np.asarray(template.faces, dtype=np.int64),
                     template.num_verts, record)


# ============================================================================ loading inputs
@dataclass(frozen=True)
class _InputSpec:
    """How a stage wants its views: camera names (None: the sequence's), downsampling, rotation."""

    cameras: Optional[Tuple[str, ...]]
    downsample: float
    rotate_portrait: bool


def _spec(cfg) -> _InputSpec:
    d = cfg.data
    return _InputSpec(tuple(d.cameras) if d.cameras else None, float(d.image_downsample),
                      bool(d.rotate_portrait))


class _FrameInputs(torch.utils.data.Dataset):
    """Loads the views of one frame for every input spec; errors are returned, not raised
    (so a bad frame in a DataLoader worker does not end the run)."""

    def __init__(self, root: Path, frames: Sequence[FrameId], names: Sequence[Tuple[str, ...]],
                 specs: Sequence[_InputSpec]):
        self.root, self.frames, self.names, self.specs = root, list(frames), list(names), list(specs)
        self.layout: Optional[CaptureLayout] = None

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict:
        from tempeh.data.dataset import load_views

        if self.layout is None:
            self.layout = CaptureLayout(self.root)
        fid = self.frames[i]
        t0 = time.perf_counter()
        views = []
        try:
            cache: Dict[_InputSpec, tuple] = {}
            for spec in self.specs:
                names = spec.cameras or self.names[i]
                key = _InputSpec(tuple(names), spec.downsample, spec.rotate_portrait)
                if key not in cache:
                    imgs, cams = load_views(self.layout, fid, names, spec.downsample,
                                            spec.rotate_portrait)
                    # exactly what CaptureDataset gives a network (float32 in [0, 1], (V,1,H,W))
                    cache[key] = (torch.from_numpy(imgs.astype(np.float32) / np.float32(255.0))[:, None],
                                  cams.to(dtype=torch.float32))
                views.append(cache[key])
            err = None
        except (TempehDataError, OSError, ValueError) as e:  # the file at fault is named
            err = str(e)
        return {"index": i, "fid": fid, "views": views, "error": err,
                "load_s": time.perf_counter() - t0}


class _Views:
    """What :func:`tempeh.inference.predict_coarse` / ``predict_refine`` need from a batch."""

    def __init__(self, images, cameras, coarse_verts=None):
        self.images, self.cameras, self.coarse_verts = images, cameras, coarse_verts


def _expected_cameras(layout: CaptureLayout, frames: Sequence[FrameId]) -> Dict[Tuple[str, str], Tuple[str, ...]]:
    """Sequence -> the union of the cameras its planned frames have images of."""
    out: Dict[Tuple[str, str], set] = {}
    for f in frames:
        out.setdefault(f[:2], set()).update(layout.frame_cameras(f))
    return {k: tuple(sorted(v)) for k, v in out.items()}


# ============================================================================ outputs
def _mesh_ok(path: Path, units: str, num_verts: int) -> bool:
    from tempeh.io.mesh import read_mesh

    if not path.is_file():
        return False
    try:
        v, f = read_mesh(path, units=units)
    except (TempehDataError, ValueError, OSError) as err:
        logger.warning("%s: existing output unreadable, registering the frame again (%s)", path, err)
        return False
    if v.shape[0] != num_verts or not np.all(np.isfinite(v)):
        logger.warning("%s: existing output has %d vertices (template %d) or non-finite values; "
                       "registering the frame again", path, v.shape[0], num_verts)
        return False
    return True


def _jitter_or_none(verts_mm: np.ndarray) -> Optional[float]:
    from tempeh.eval.metrics import jitter

    return jitter(verts_mm) if verts_mm.shape[0] >= 3 else None


def finalize_sequence(out: PathLike, subject: str, sequence: str, frames: Sequence[str],
                      failed: Sequence[str] = (), ext: str = "ply", units: str = "m",
                      smooth_sigma: float = 0.0, smooth_mode: str = "reflect") -> dict:
    """Write the sequence NPZ from the per-frame meshes on disk (and, with ``smooth_sigma`` > 0,
    the smoothed meshes under ``<out>/smoothed``).

    Args:
        frames: the registered frames of the sequence, in order (failed frames left out; the
            NPZ lists them in ``failed_frames`` and smoothing runs over the remaining frames).
    Returns:
        ``{"frames", "npz", "jitter_mm", "jitter_smoothed_mm", "failed_frames"}``.
    NPZ keys: ``verts`` (T, N, 3) float32 in ``units``; ``faces`` (F, 3) int32; ``frames`` (T,)
    str; ``units``, ``subject``, ``sequence`` str; ``failed_frames`` str array; with smoothing
    also ``verts_smoothed`` and ``smooth_sigma_frames``, ``smooth_mode``.
    """
    from tempeh.io.mesh import atomic_write, read_mesh, unit_scale, write_mesh
    from tempeh.smoothing import smooth_sequence

    out = Path(out)
    frames = sorted(frames, key=frame_sort_key)
    verts, faces = [], None
    for f in frames:
        v, fc = read_mesh(mesh_path(out, FrameId(subject, sequence, f), ext), units=units)
        verts.append(v)
        faces = fc if faces is None else faces
    rec = {"frames": len(frames), "npz": None, "jitter_mm": None, "jitter_smoothed_mm": None,
           "failed_frames": list(failed)}
    if not frames:
        return rec
    seq = np.stack(verts)  # (T, N, 3) mm
    rec["jitter_mm"] = _jitter_or_none(seq)
    scale = unit_scale(units)
    arrays = {"verts": (seq / scale).astype(np.float32), "faces": faces.astype(np.int32),
              "frames": np.array(frames, dtype=str), "units": np.array(units),
              "subject": np.array(subject), "sequence": np.array(sequence),
              "failed_frames": np.array(list(failed), dtype=str).reshape(-1)}
    if smooth_sigma > 0:
        sm = smooth_sequence(seq, smooth_sigma, mode=smooth_mode)
        rec["jitter_smoothed_mm"] = _jitter_or_none(sm)
        for f, v in zip(frames, sm):
            write_mesh(mesh_path(smoothed_root(out), FrameId(subject, sequence, f), ext), v, faces,
                       units=units)
        arrays.update(verts_smoothed=(sm / scale).astype(np.float32),
                      smooth_sigma_frames=np.array(float(smooth_sigma)),
                      smooth_mode=np.array(smooth_mode))
    p = sequence_npz_path(out, subject, sequence)
    with atomic_write(p, "wb") as fh:
        np.savez(fh, **arrays)
    rec["npz"] = str(p)
    return rec


def _write_json(path: Path, data: dict) -> None:
    from tempeh.io.mesh import atomic_write

    with atomic_write(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


# ============================================================================ the loop
@dataclass
class RegisterOptions:
    """Settings of one :func:`register` call (see ``tools/register_sequence.py --help``)."""

    units: str = "m"
    fmt: str = "ply"
    batch_size: int = 1
    shard: Tuple[int, int] = (0, 1)
    smooth_sigma: float = 0.0
    smooth_mode: str = "reflect"
    workers: int = 0
    max_frames: Optional[int] = None
    overwrite: bool = False
    amp: bool = False


@dataclass
class RegisterResult:
    """Counts of a run and where its manifest is."""

    manifest: Path
    planned: int = 0
    ok: int = 0
    done_before: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    pending: int = 0
    seconds: float = 0.0
    frames_per_s: float = 0.0
    sequences: Dict[str, dict] = field(default_factory=dict)
    interrupted: bool = False


def _check_previous(path: Path, model_id: str, units: str, fmt: str, overwrite: bool) -> None:
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s: previous manifest unreadable; it will be replaced", path)
        return
    prev = (old.get("model", {}).get("model_id"), old.get("units"), old.get("format"))
    if prev != (model_id, units, fmt):
        raise TempehDataError(path, f"this folder holds a run with model {prev[0]}, units "
                                    f"{prev[1]}, format {prev[2]}; now model {model_id}, units "
                                    f"{units}, format {fmt}. Use another --out, or --overwrite "
                                    "to register every frame again")


def register(data: PathLike, frames: Sequence[FrameId], out: PathLike, models: ModelInfo,
             device: torch.device, opts: RegisterOptions,
             should_stop: Optional[Callable[[], bool]] = None, progress: bool = True) -> RegisterResult:
    """Register the shard's share of ``frames`` (the whole plan) into ``out``.

    Writes per-frame meshes, the NPZ (+ smoothing) of each sequence this shard holds whole
    once all its frames are registered or failed, and the manifest (also rewritten every
    ~30 s and on any exit, so an interrupted run leaves an up-to-date record).
    ``should_stop()`` is polled between batches (e.g. set by SIGTERM).
    """
    from tqdm import tqdm

    from tempeh.inference import predict_coarse, predict_refine
    from tempeh.io.mesh import write_mesh

    t_start = time.perf_counter()
    out = Path(out)
    layout = CaptureLayout(data)
    i_shard, n_shard = opts.shard
    mine = shard_frames(frames, i_shard, n_shard)
    mine_set = set(mine)
    man_path = out / manifest_name(opts.shard)
    _check_previous(man_path, models.record["model_id"], opts.units, opts.fmt, opts.overwrite)
    if opts.smooth_sigma > 0 and any(f.subject == SMOOTHED_DIR for f in frames):
        raise TempehDataError(out / SMOOTHED_DIR, f"a subject is named {SMOOTHED_DIR!r}, which is "
                              "the folder of smoothed meshes; register without --smooth or "
                              "into a capture without that subject name")
    out.mkdir(parents=True, exist_ok=True)

    # sequences: which this shard holds whole
    seq_all: Dict[Tuple[str, str], List[FrameId]] = {}
    for f in frames:
        seq_all.setdefault(f[:2], []).append(f)
    whole = {k for k, fs in seq_all.items() if all(f in mine_set for f in fs)}

    status: Dict[FrameId, dict] = {f: {"frame": str(f), "status": "pending"} for f in mine}
    todo: List[FrameId] = []
    for f in mine:
        p = mesh_path(out, f, opts.fmt)
        if not opts.overwrite and _mesh_ok(p, opts.units, models.num_verts):
            status[f].update(status="done", path=str(p))
        else:
            todo.append(f)
    res = RegisterResult(manifest=man_path, planned=len(mine),
                         done_before=sum(s["status"] == "done" for s in status.values()))
    if opts.max_frames is not None:
        todo = todo[:max(0, opts.max_frames)]

    specs = [_spec(models.coarse_cfg)] + ([_spec(models.refine_cfg)] if models.refine is not None else [])
    expected = _expected_cameras(layout, todo) if todo else {}
    # frames lacking a camera the rest of their sequence has are bad (a missing view)
    names, load_list = [], []
    for f in todo:
        exp = expected[f[:2]]
        have = set(layout.frame_cameras(f))
        if not have:
            status[f].update(status="failed", error=f"{layout.image_dir(f)}: no images of frame "
                             f"{f} (expected <sequence>.<frame>.<camera>.{layout.image_ext})")
            continue
        need = set(exp)
        for sp in specs:
            if sp.cameras:
                need = set(sp.cameras)
        missing = sorted(need - have)
        if missing:
            p = layout.image_path(f, missing[0])
            status[f].update(status="failed", error=f"{p}: image of camera(s) {missing} missing "
                                                      "(other frames of the sequence have them)")
            continue
        names.append(exp)
        load_list.append(f)

    record = {
        "tool": "register_sequence", "tempeh_version": tempeh.__version__,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "host": platform.node(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "model": models.record, "data": str(data), "out": str(out), "units": opts.units,
        "format": opts.fmt, "batch_size": opts.batch_size, "coarse_only": models.refine is None,
        "shard": list(opts.shard), "plan": {"frames": len(frames), "plan_hash": plan_hash(frames),
                                            "shard_frames": len(mine),
                                            "sequences_whole": len(whole),
                                            "sequences_split": len({f[:2] for f in mine}) - len(whole)},
        "smoothing": ({"sigma_frames": opts.smooth_sigma, "mode": opts.smooth_mode}
                      if opts.smooth_sigma > 0 else None),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

    def write_manifest(final: bool = False) -> None:
        fr = [status[f] for f in mine]
        counts = {k: sum(s["status"] == k for s in fr) for k in ("ok", "done", "failed", "pending")}
        elapsed = time.perf_counter() - t_start
        record.update(updated=time.strftime("%Y-%m-%dT%H:%M:%S"), complete=counts["pending"] == 0,
                      summary={**counts, "seconds": round(elapsed, 3),
                               "frames_per_s": round(counts["ok"] / elapsed, 4) if elapsed > 0 else None},
                      sequences=res.sequences, frames=fr)
        _write_json(man_path, record)

    def finalize_ready() -> None:
        for key in sorted(whole):
            name = f"{key[0]}/{key[1]}"
            if name in res.sequences:
                continue
            st = [status[f] for f in seq_all[key]]
            if any(s["status"] == "pending" for s in st):
                continue
            good = [f.frame for f in seq_all[key] if status[f]["status"] in ("ok", "done")]
            bad = [f.frame for f in seq_all[key] if status[f]["status"] == "failed"]
            try:
                res.sequences[name] = finalize_sequence(out, key[0], key[1], good, bad, opts.fmt,
                                                        opts.units, opts.smooth_sigma,
                                                        opts.smooth_mode)
            except TempehDataError as err:  # a mesh vanished or was damaged meanwhile
                logger.error("sequence %s: %s", name, err)
                res.sequences[name] = {"error": str(err)}

    last_write = time.perf_counter()
    n_ok = 0
    try:
        finalize_ready()  # sequences already complete (a rerun after completion)
        ds = _FrameInputs(layout.root, load_list, names, specs)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False,
                                             num_workers=opts.workers,
                                             collate_fn=_identity,
                                             worker_init_fn=_worker_init if opts.workers else None)
        bar = tqdm(total=len(todo), desc=f"register{'' if n_shard == 1 else f' {i_shard}/{n_shard}'}",
                   unit="frame", disable=not progress, dynamic_ncols=True)
        bar.update(len(todo) - len(load_list))
        pending: List[dict] = []

        def run_batch(items: List[dict]) -> None:
            nonlocal n_ok
            t0 = time.perf_counter()
            stack = lambda k: (torch.stack([it["views"][k][0] for it in items]),  # noqa: E731
                               _stack_cams([it["views"][k][1] for it in items]))
            imgs, cams = stack(0)
            verts = predict_coarse(models.coarse, _Views(imgs, cams), amp=opts.amp)
            if models.refine is not None:
                imgs_r, cams_r = stack(1)
                verts = predict_refine(models.refine, _Views(imgs_r, cams_r), verts, amp=opts.amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            v = verts.detach().cpu().double().numpy()
            t_pred = (time.perf_counter() - t0) / len(items)
            for it, vi in zip(items, v):
                f = it["fid"]
                if not np.all(np.isfinite(vi)):
                    status[f].update(status="failed", error="prediction is not finite")
                    continue
                t1 = time.perf_counter()
                p = write_mesh(mesh_path(out, f, opts.fmt), vi, models.faces, units=opts.units)
                status[f].update(status="ok", path=str(p), load_s=round(it["load_s"], 4),
                                 predict_s=round(t_pred, 4),
                                 write_s=round(time.perf_counter() - t1, 4))
                n_ok += 1

        def flush() -> None:
            if pending:
                run_batch(pending)
                bar.update(len(pending))
                pending.clear()

        def shape_key(it):
            return tuple((tuple(im.shape), cm.names) for im, cm in it["views"])

        for item in loader:
            f = item["fid"]
            if item["error"] is not None:
                status[f].update(status="failed", error=item["error"])
                logger.warning("frame %s failed: %s", f, item["error"])
                bar.update(1)
            else:
                if pending and shape_key(pending[0]) != shape_key(item):
                    flush()
                pending.append(item)
                if len(pending) >= opts.batch_size:
                    flush()
            bar.set_postfix(failed=sum(s["status"] == "failed" for s in status.values()))
            if time.perf_counter() - last_write > 30:
                finalize_ready()
                write_manifest()
                last_write = time.perf_counter()
            if should_stop is not None and should_stop():
                res.interrupted = True
                break
        if not res.interrupted:
            flush()
        bar.close()
        finalize_ready()
    except KeyboardInterrupt:
        res.interrupted = True
    finally:
        write_manifest(final=True)
    res.ok = n_ok
    res.failed = [(s["frame"], s.get("error", "")) for s in status.values() if s["status"] == "failed"]
    res.pending = sum(s["status"] == "pending" for s in status.values())
    res.seconds = time.perf_counter() - t_start
    res.frames_per_s = n_ok / res.seconds if res.seconds > 0 else 0.0
    return res


def _identity(x):
    return x


def _worker_init(worker_id: int) -> None:  # noqa: ARG001
    """Loader workers decode images on one thread each and ignore SIGTERM: a scheduler's
    pre-emption signal is handled by the main process, which finishes the batch, writes the
    manifest and then shuts the workers down."""
    import signal

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stack_cams(cams):
    from tempeh.cameras import Cameras

    return Cameras.stack(cams)


# ============================================================================ merge
def merge_shards(out: PathLike, smooth_sigma: Optional[float] = None,
                 smooth_mode: Optional[str] = None) -> Tuple[dict, List[str]]:
    """Join ``manifest.shard-<i>-of-<n>.json`` into ``manifest.json`` and write every
    sequence's NPZ (+ smoothing: ``smooth_sigma`` or the shards' setting).

    Returns ``(manifest, problems)``; problems name missing shards, shards that planned other
    frames or used another model, and frames that are still pending or failed.
    """
    out = Path(out)
    found = {}
    for p in sorted(out.glob("manifest.shard-*-of-*.json")):
        m = re.match(r"manifest\.shard-(\d+)-of-(\d+)\.json$", p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise TempehDataError(out, "no shard manifests (manifest.shard-<i>-of-<n>.json) to merge")
    if len(found) > 1:
        raise TempehDataError(out, f"shard manifests of different shard counts {sorted(found)}; "
                                   "remove the stale ones")
    n, paths = next(iter(found.items()))
    problems: List[str] = [f"{out / manifest_name((i, n))}: shard {i}/{n} has no manifest "
                           "(not run yet?)" for i in range(n) if i not in paths]
    mans = {i: json.loads(p.read_text(encoding="utf-8")) for i, p in sorted(paths.items())}
    first = next(iter(mans.values()))
    for i, m in mans.items():
        for what, get in (("plan", lambda x: x["plan"]["plan_hash"]),
                          ("model", lambda x: x["model"]["model_id"]), ("units", lambda x: x["units"]),
                          ("format", lambda x: x["format"])):
            if get(m) != get(first):
                problems.append(f"{paths[i]}: {what} differs from shard "
                                f"{next(iter(mans))} ({get(m)} vs {get(first)})")
    frames = [r for m in mans.values() for r in m["frames"]]
    units, fmt = first["units"], first["format"]
    sm = first.get("smoothing") or {}
    sigma = smooth_sigma if smooth_sigma is not None else float(sm.get("sigma_frames", 0.0))
    mode = smooth_mode or sm.get("mode", "reflect")
    by_seq: Dict[Tuple[str, str], List[dict]] = {}
    for r in frames:
        fid = frame_id(r["frame"])
        by_seq.setdefault(fid[:2], []).append(r)
    sequences = {}
    for (s, q), rs in sorted(by_seq.items()):
        good = [frame_id(r["frame"]).frame for r in rs if r["status"] in ("ok", "done")]
        bad = [frame_id(r["frame"]).frame for r in rs if r["status"] == "failed"]
        pend = [r["frame"] for r in rs if r["status"] == "pending"]
        if pend:
            problems.append(f"sequence {s}/{q}: {len(pend)} frame(s) pending (first {pend[0]}); "
                            "rerun that shard")
            continue
        sequences[f"{s}/{q}"] = finalize_sequence(out, s, q, good, bad, fmt, units, sigma, mode)
    counts = {k: sum(r["status"] == k for r in frames) for k in ("ok", "done", "failed", "pending")}
    planned = first["plan"]["frames"]
    if len(frames) != planned:
        problems.append(f"shard manifests list {len(frames)} frames, the plan {planned}")
    merged = {k: v for k, v in first.items() if k not in ("frames", "sequences", "summary", "shard")}
    merged.update(shard=None, merged_from=[str(p) for p in paths.values()],
                  smoothing=({"sigma_frames": sigma, "mode": mode} if sigma > 0 else None),
                  summary={**counts, "seconds": sum(m["summary"]["seconds"] for m in mans.values())},
                  complete=not problems and counts["pending"] == 0,
                  sequences=sequences, frames=sorted(frames, key=lambda r: r["frame"]))
    _write_json(out / "manifest.json", merged)
    problems += [f"frame {r['frame']} failed: {r.get('error', '')}" for r in frames
                 if r["status"] == "failed"]
    return merged, problems
