"""The FaMoS-compatible capture folder layout, and data lists of frames.

Under a capture ``root`` (see ``data_specs/capture_layout.md``)::

    images/<subject>/<sequence>/<frame>/<sequence>.<frame>.<camera>.png
    calibrations/<subject>/<sequence>/            cameras.json, or one *.tka / *.yaml per camera
    scans/<subject>/<sequence>/<sequence>.<frame>.{ply,obj,npy}          mm (capture.json)
    registrations/<subject>/<sequence>/<sequence>.<frame>.ply            m  (FLAME convention)
    gt_meshes/<subject>/<sequence>/<sequence>.<frame>.ply                m  (synthetic truth)
    template/                                     template.obj|ply + regions.npz [+ template.json]
    data_lists/{train,val,test}.json              [[subject, sequence, frame], ...]
    capture.json                                  optional: {"units": {"scans": "mm", "meshes": "m"},
                                                             "image_ext": "png"}

A frame is named by a :class:`FrameId` of three strings (frames keep their zero padding,
e.g. ``"000032"``). Paths are built, never guessed: only :meth:`CaptureLayout.scan_path`
searches, over the documented suffix order ``ply, obj, npy``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from tempeh.io.jsonio import read_json
from tempeh.errors import TempehDataError
from tempeh.io.mesh import atomic_write, unit_scale

logger = logging.getLogger(__name__)

__all__ = [
    "FrameId",
    "frame_id",
    "CaptureLayout",
    "read_data_list",
    "write_data_list",
    "SCAN_SUFFIXES",
    "DEFAULT_MESH_UNITS",
    "DEFAULT_SCAN_UNITS",
]

PathLike = Union[str, os.PathLike]

#: Scan file suffixes searched by :meth:`CaptureLayout.scan_path`, in this order.
SCAN_SUFFIXES = ("ply", "obj", "npy")
DEFAULT_MESH_UNITS = "m"
DEFAULT_SCAN_UNITS = "mm"
_CAPTURE_JSON_KEYS = {"units", "image_ext", "name", "description"}


class FrameId(NamedTuple):
    """One capture frame: ``subject``, ``sequence`` and ``frame`` (all strings)."""

    subject: str
    sequence: str
    frame: str

    def __str__(self) -> str:
        return f"{self.subject}/{self.sequence}/{self.frame}"


def _check_name(value, what: str) -> Optional[str]:
    """Return an error message if ``value`` is not a usable path component, else None."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__} {value!r}"
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        return f"{what} {value!r} is not a valid folder/file name component"
    return None


def frame_id(fid) -> FrameId:
    """Validate and convert ``"SUBJECT/SEQUENCE/FRAME"`` or a 3-sequence of strings to a
    :class:`FrameId` (ValueError if a part is not a plain, non-empty file-name string)."""
    if isinstance(fid, FrameId):
        return fid
    if isinstance(fid, str):
        parts = fid.split("/")
        if len(parts) != 3:
            raise ValueError(f"frame id {fid!r} must be 'SUBJECT/SEQUENCE/FRAME'")
        fid = parts
    if len(fid) != 3:
        raise ValueError(f"frame id {fid!r} must have 3 parts (subject, sequence, frame)")
    fid = FrameId(*fid)
    for what, v in zip(FrameId._fields, fid):
        msg = _check_name(v, what)
        if msg:
            raise ValueError(f"frame id {tuple(fid)!r}: {msg}")
    return fid


def frame_file(root: PathLike, fid, ext: str = "ply") -> Path:
    """``<root>/<subject>/<sequence>/<sequence>.<frame>.<ext>``: the per-frame file of the
    registrations layout under any root (registrations, true meshes, predictions, caches)."""
    s, q, f = frame_id(fid)
    return Path(root) / s / q / f"{q}.{f}.{ext}"


class CaptureLayout:
    """Paths of one capture folder (nothing is read until asked).

    Args:
        root: the capture folder. ``root/capture.json`` (optional) may set
            ``{"units": {"scans": "mm"|"m"|"cm", "meshes": "m"|"mm"|"cm"}, "image_ext": "png"}``;
            defaults: scans mm, meshes (registrations, gt meshes) m, images png.
    """

    def __init__(self, root: PathLike):
        self.root = Path(root)
        self.mesh_units = DEFAULT_MESH_UNITS
        self.scan_units = DEFAULT_SCAN_UNITS
        self.image_ext = "png"
        self._camera_cache: Dict[Tuple[str, str], object] = {}
        cfg = self.root / "capture.json"
        if cfg.is_file():
            self._read_capture_json(cfg)

    def __repr__(self) -> str:
        return f"CaptureLayout({str(self.root)!r})"

    def _read_capture_json(self, path: Path) -> None:
        data = read_json(path, dict)
        unknown = set(data) - _CAPTURE_JSON_KEYS
        if unknown:
            raise TempehDataError(path, f"unknown key(s) {sorted(unknown)} "
                                        f"(allowed: {', '.join(sorted(_CAPTURE_JSON_KEYS))})")
        units = data.get("units", {})
        if not isinstance(units, dict):
            raise TempehDataError(path, "key 'units' must be an object {\"scans\": ..., \"meshes\": ...}")
        bad = set(units) - {"scans", "meshes"}
        if bad:
            raise TempehDataError(path, f"key 'units': unknown entries {sorted(bad)} "
                                        "(allowed: scans, meshes)")
        for key in ("scans", "meshes"):
            if key in units:
                try:
                    unit_scale(units[key])
                except ValueError as err:
                    raise TempehDataError(path, f"key 'units.{key}': {err}") from None
        self.scan_units = units.get("scans", self.scan_units)
        self.mesh_units = units.get("meshes", self.mesh_units)
        ext = data.get("image_ext", self.image_ext)
        if not isinstance(ext, str) or _check_name(ext, "image_ext") or ext.startswith("."):
            raise TempehDataError(path, f"key 'image_ext' must be a suffix without dot like "
                                        f"'png', got {ext!r}")
        self.image_ext = ext.lower()

    # ------------------------------------------------------------------ folders
    @property
    def images_root(self) -> Path:
        return self.root / "images"

    @property
    def template_dir(self) -> Path:
        return self.root / "template"

    def image_dir(self, fid) -> Path:
        """``images/<subject>/<sequence>/<frame>``."""
        s, q, f = frame_id(fid)
        return self.images_root / s / q / f

    def image_path(self, fid, camera: str, ext: Optional[str] = None) -> Path:
        """``images/<subject>/<sequence>/<frame>/<sequence>.<frame>.<camera>.<ext>``."""
        s, q, f = frame_id(fid)
        msg = _check_name(camera, "camera")
        if msg:
            raise ValueError(msg)
        return self.image_dir(fid) / f"{q}.{f}.{camera}.{ext or self.image_ext}"

    def calibration_dir(self, subject: str, sequence: str) -> Path:
        """``calibrations/<subject>/<sequence>`` (one calibration per sequence)."""
        for what, v in (("subject", subject), ("sequence", sequence)):
            msg = _check_name(v, what)
            if msg:
                raise ValueError(msg)
        return self.root / "calibrations" / subject / sequence

    def _per_frame(self, folder: str, fid, ext: str) -> Path:
        return frame_file(self.root / folder, fid, ext)

    def scan_path(self, fid, ext: Optional[str] = None) -> Path:
        """Scan of a frame, ``scans/<subject>/<sequence>/<sequence>.<frame>.<ext>``.

        With ``ext`` (for writing) the path is returned as is. Without, the first existing
        file over ``SCAN_SUFFIXES`` (ply, obj, npy) is returned; TempehDataError naming the
        expected paths if none exists (see :meth:`find_scan` for an optional lookup).
        """
        if ext is not None:
            if ext.lstrip(".") not in SCAN_SUFFIXES:
                raise ValueError(f"scan suffix must be one of {SCAN_SUFFIXES}, got {ext!r}")
            return self._per_frame("scans", fid, ext.lstrip("."))
        found = self.find_scan(fid)
        if found is None:
            base = self._per_frame("scans", fid, "{" + ",".join(SCAN_SUFFIXES) + "}")
            raise TempehDataError(base, "no scan for this frame")
        return found

    def find_scan(self, fid) -> Optional[Path]:
        """The existing scan file of a frame (first of ply, obj, npy), or None."""
        for ext in SCAN_SUFFIXES:
            p = self._per_frame("scans", fid, ext)
            if p.is_file():
                return p
        return None

    def registration_path(self, fid) -> Path:
        """``registrations/<subject>/<sequence>/<sequence>.<frame>.ply`` (in ``mesh_units``)."""
        return self._per_frame("registrations", fid, "ply")

    def gt_mesh_path(self, fid) -> Path:
        """``gt_meshes/<subject>/<sequence>/<sequence>.<frame>.ply`` (in ``mesh_units``)."""
        return self._per_frame("gt_meshes", fid, "ply")

    def data_list_path(self, split: str) -> Path:
        """``data_lists/<split>.json`` (split: train, val, test or any other plain name)."""
        msg = _check_name(split, "split")
        if msg:
            raise ValueError(msg)
        return self.root / "data_lists" / f"{split}.json"

    # ------------------------------------------------------------------ discovery and loading
    def frame_cameras(self, fid) -> List[str]:
        """Sorted camera names of a frame, from its image file names
        (``<sequence>.<frame>.<camera>.<image_ext>``); empty when the folder is missing."""
        s, q, f = frame_id(fid)
        d = self.image_dir(fid)
        if not d.is_dir():
            return []
        prefix, suffix = f"{q}.{f}.", f".{self.image_ext}"
        names = []
        with os.scandir(d) as it:
            for e in it:
                n = e.name
                if (n.startswith(prefix) and n.lower().endswith(suffix)
                        and len(n) > len(prefix) + len(suffix) and e.is_file()):
                    names.append(n[len(prefix):len(n) - len(suffix)])
        return sorted(names)

    def discover_frames(self) -> List[FrameId]:
        """Every ``images/<subject>/<sequence>/<frame>/`` folder holding at least one image
        named after its frame, sorted."""
        out: List[FrameId] = []
        root = self.images_root
        if not root.is_dir():
            return out

        def subdirs(p: Path) -> List[str]:
            with os.scandir(p) as it:
                return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))

        for s in subdirs(root):
            for q in subdirs(root / s):
                for f in subdirs(root / s / q):
                    fid = FrameId(s, q, f)
                    if self.frame_cameras(fid):
                        out.append(fid)
        return out

    def cameras_for(self, fid, cameras: Optional[Sequence[str]] = None):
        """Calibrated cameras of a frame's sequence -> :class:`~tempeh.cameras.Cameras`
        ``(V,)`` float64, mm (read once per sequence, then cached).

        Args:
            fid: the frame.
            cameras: optional camera names to select, in this order (TempehDataError naming
                the calibration folder if one is not calibrated).
        """
        from tempeh.io.calibration import read_calibration_dir  # lazy: optional at import

        s, q, _ = frame_id(fid)
        key = (s, q)
        if key not in self._camera_cache:
            self._camera_cache[key] = read_calibration_dir(self.calibration_dir(s, q))
        cams = self._camera_cache[key]
        if cameras is None:
            return cams
        names = list(cams.names or ())
        missing = [c for c in cameras if c not in names]
        if missing:
            raise TempehDataError(self.calibration_dir(s, q),
                                  f"camera(s) {missing} not calibrated (calibrated: {names})")
        import torch

        return cams[torch.tensor([names.index(c) for c in cameras], dtype=torch.long)]

    def load_template(self):
        """The capture's template (``template/``) -> :class:`~tempeh.template.Template`, mm."""
        from tempeh.io.templates import load_template_dir

        return load_template_dir(self.template_dir)


# ---------------------------------------------------------------------------- data lists
def read_data_list(path: PathLike) -> List[FrameId]:
    """Read a JSON data list: ``[[subject, sequence, frame], ...]`` of strings.

    Frames must be strings (``"000032"``, so zero padding survives). Errors name the file and
    the entry index. An empty list is allowed (a warning is logged); duplicates are kept and
    logged.
    """
    path = Path(path)
    if not path.is_file():
        raise TempehDataError(path, "data list not found")
    data = read_json(path, list, "a data list must be a JSON list of [subject, sequence, frame]")
    out: List[FrameId] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, list) or len(entry) != 3:
            raise TempehDataError(path, f"entry {i}: expected [subject, sequence, frame], "
                                        f"got {entry!r}")
        for what, v in zip(FrameId._fields, entry):
            msg = _check_name(v, what)
            if msg:
                hint = " (quote frame numbers: \"000032\")" if what == "frame" and isinstance(v, int) else ""
                raise TempehDataError(path, f"entry {i}: {msg}{hint}")
        out.append(FrameId(*entry))
    if not out:
        logger.warning("%s: data list is empty", path)
    if len(set(out)) != len(out):
        logger.warning("%s: %d duplicate entries", path, len(out) - len(set(out)))
    return out


def write_data_list(path: PathLike, frames: Iterable) -> Path:
    """Write frames (FrameId or 3-sequences of strings) as a JSON data list, one entry per
    line, atomically. Returns ``Path(path)``."""
    path = Path(path)
    rows = [list(frame_id(f)) for f in frames]
    text = "[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + ("\n" if rows else "") + "]\n"
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return path
