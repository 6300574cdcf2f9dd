"""Camera calibration readers and writers: every function returns a NEW :class:`Cameras`.

All readers return float64 cameras with batch shape ``(V,)`` and ``names``, in tempeh's one
convention (see :mod:`tempeh.cameras`): OpenCV world->camera ``X_cam = R X + t``, translation in
millimetres, pixel origin at the centre of the top-left pixel, distortion ``(k1, k2, p1, p2, k3)``.
Units are converted to mm at this boundary. Bad input raises :class:`TempehDataError` naming the
file and the key (or 1-based line for text formats).

Formats:

* ``cameras.json`` (tempeh's own)::

      {"format": "tempeh.cameras", "version": 1, "units": "mm" | "m",
       "convention": "opencv_world_to_camera", "pixel_origin": "center_of_top_left_pixel",
       "cameras": [{"name", "width", "height", "K": 3x3, "R": 3x3, "t": [3],
                    "dist": [k1, k2, p1, p2, k3]}, ...]}

* OpenCV ``cv2.FileStorage`` YAML/JSON, one camera per file. Keys (first found wins):
  intrinsics ``K | camera_matrix | cameraMatrix``; distortion ``D | dist_coeffs | distCoeffs |
  distortion_coefficients`` (4, 5 or more values; entries past the 5th must be zero); rotation
  ``R`` (3x3) or ``rvec | r`` (Rodrigues); translation ``T | t | tvec``; image size
  ``image_width`` + ``image_height`` or ``image_size | imageSize`` ``[w, h]``; optional
  ``units`` (``mm`` default, or ``m``) and ``name``.
* NeRSemble ``calibration/camera_params.json``: ``world_2_cam`` {serial: 4x4 w2c, OpenCV axes},
  ``intrinsics`` one shared 3x3 or {serial: 3x3}; no distortion; no image size (pass
  ``image_size``; full-resolution v2 images are 3208x2200) unless ``width``/``height`` keys exist.
  Units are not documented by the dataset: the default ``units="m"`` multiplies by 1000.
* Multiface ``KRT`` text: blocks of camera name, 3 lines of K, 1 line of distortion
  (taken as OpenCV order), 3 lines of ``[R | t]`` (w2c, mm), blank line. No image size (pass
  ``image_size``: one ``(w, h)`` for all cameras or a ``{name: (w, h)}`` dict).
* A calibration folder (:func:`read_calibration_dir`): ``cameras.json`` if present, else one file
  per camera (3dMD ``*.tka`` or OpenCV ``*.yaml`` / ``*.yml``), names = file stems, sorted.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from tempeh.cameras import Cameras
from tempeh.errors import TempehDataError

logger = logging.getLogger(__name__)

__all__ = [
    "UNIT_TO_MM",
    "CAMERAS_JSON",
    "read_cameras_json",
    "write_cameras_json",
    "read_opencv_calibration",
    "write_opencv_calibration",
    "read_nersemble_cameras",
    "write_nersemble_cameras",
    "read_multiface_krt",
    "write_multiface_krt",
    "read_calibration_dir",
    "validate_rotation",
]

PathLike = Union[str, os.PathLike]
ImageSize = Union[Tuple[int, int], Mapping[str, Tuple[int, int]], None]

UNIT_TO_MM = {"mm": 1.0, "m": 1000.0}
"""Millimetres per file unit."""

CAMERAS_JSON = "cameras.json"
_FORMAT = "tempeh.cameras"
_VERSION = 1
_CONVENTION = "opencv_world_to_camera"
_PIXEL_ORIGIN = "center_of_top_left_pixel"
ROTATION_TOL = 1e-4
"""Max abs deviation of ``R R^T`` from identity and of ``det R`` from +1 accepted in files
(text calibrations carry ~6-7 significant digits)."""


# ---------------------------------------------------------------------------------- helpers
def _unit_scale(units, path, key: str = "units", line: Optional[int] = None) -> float:
    if units not in UNIT_TO_MM:
        raise TempehDataError(path, f"'{key}' must be one of {sorted(UNIT_TO_MM)}, got {units!r}",
                              line=line)
    return UNIT_TO_MM[units]


def _atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`tempeh.io.mesh.atomic_write`)."""
    from tempeh.io.mesh import atomic_write

    with atomic_write(path, "w") as fh:
        fh.write(text)


def _has_non_number(v) -> bool:
    """True if a (nested) value holds a bool, string, None or mapping instead of a number."""
    if isinstance(v, (list, tuple)):
        return any(_has_non_number(x) for x in v)
    if isinstance(v, np.ndarray):
        return v.dtype.kind not in "iuf"
    return isinstance(v, (bool, np.bool_, str, bytes, dict)) or v is None


def _float_array(value, shape: Tuple[int, ...], path, key: str,
                 line: Optional[int] = None) -> np.ndarray:
    """Parse a (nested) list of numbers into a finite float64 array of exactly ``shape``."""
    if _has_non_number(value):
        raise TempehDataError(path, f"'{key}' must contain numbers only, got {value!r}", line=line)
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TempehDataError(path, f"'{key}' is not a numeric array of shape {shape}: {exc}",
                              line=line) from None
    if arr.shape != tuple(shape):
        raise TempehDataError(path, f"'{key}' has shape {arr.shape}, expected {tuple(shape)}",
                              line=line)
    if not np.all(np.isfinite(arr)):
        raise TempehDataError(path, f"'{key}' has non-finite values: {arr.tolist()}", line=line)
    return arr


def validate_rotation(R: np.ndarray, path, key: str = "R", line: Optional[int] = None,
                      tol: float = ROTATION_TOL) -> np.ndarray:
    """Check that ``R`` (3, 3) is a proper rotation (orthonormal, det +1) within ``tol``."""
    err = float(np.abs(R @ R.T - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if err > tol or abs(det - 1.0) > tol:
        raise TempehDataError(
            path, f"'{key}' is not a rotation: max|R R^T - I| = {err:.3g}, det = {det:.6g} "
            f"(tolerance {tol:g}; a reflection has det -1)", line=line)
    return R


def _validate_intrinsics(K: np.ndarray, path, key: str = "K", line: Optional[int] = None):
    if abs(K[2, 0]) > 1e-9 or abs(K[2, 1]) > 1e-9 or abs(K[2, 2] - 1.0) > 1e-9:
        raise TempehDataError(path, f"'{key}' last row must be [0, 0, 1], got {K[2].tolist()}",
                              line=line)
    if abs(K[1, 0]) > 1e-9:
        raise TempehDataError(path, f"'{key}'[1][0] must be 0, got {K[1, 0]}", line=line)
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise TempehDataError(path, f"'{key}' focal lengths must be positive, got "
                              f"fx={K[0, 0]}, fy={K[1, 1]}", line=line)
    return K


def _dist5(value, path, key: str, line: Optional[int] = None) -> np.ndarray:
    """Distortion as 5 OpenCV coefficients; 4 are padded with k3 = 0; extra ones must be 0."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]  # a 1xN sequence
    if not isinstance(value, (list, tuple)):
        raise TempehDataError(path, f"'{key}' must be a list of coefficients, got {value!r}",
                              line=line)
    arr = _float_array(list(value), (len(value),), path, key, line)
    if arr.size < 4:
        raise TempehDataError(path, f"'{key}' needs at least 4 coefficients (k1, k2, p1, p2), "
                              f"got {arr.size}", line=line)
    if arr.size > 5 and np.any(arr[5:] != 0):
        raise TempehDataError(path, f"'{key}' has {arr.size} coefficients with non-zero terms "
                              "past k3 (rational/thin-prism models are not supported)", line=line)
    out = np.zeros(5)
    out[: min(5, arr.size)] = arr[:5]
    return out


def _image_size(width, height, path, key: str = "width/height",
                line: Optional[int] = None) -> Tuple[int, int]:
    vals = []
    for v in (width, height):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TempehDataError(path, f"'{key}' must be integers, got {width!r} x {height!r}",
                                  line=line)
        if not math.isfinite(float(v)) or float(v) != int(v) or int(v) <= 0:
            raise TempehDataError(path, f"'{key}' must be positive integers, got "
                                  f"{width!r} x {height!r}", line=line)
        vals.append(int(v))
    return vals[0], vals[1]


def _size_for(image_size: ImageSize, name: str, path, fmt: str) -> Tuple[int, int]:
    if image_size is None:
        raise TempehDataError(path, f"{fmt} files carry no image size: pass image_size=(width, "
                              "height) (or a {name: (width, height)} dict)")
    if isinstance(image_size, Mapping):
        if name not in image_size:
            raise TempehDataError(path, f"image_size has no entry for camera '{name}'")
        w, h = image_size[name]
    else:
        w, h = image_size
    return _image_size(w, h, path, key=f"image_size[{name}]")


def _make_cameras(records: Sequence[dict]) -> Cameras:
    """Stack validated per-camera dicts (K, R, t mm, dist, width, height, name) -> (V,) float64."""
    names = [r["name"] for r in records]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate camera names: {dup}")
    return Cameras.create(
        K=np.stack([r["K"] for r in records]), R=np.stack([r["R"] for r in records]),
        t=np.stack([r["t"] for r in records]), dist=np.stack([r["dist"] for r in records]),
        width=np.array([r["width"] for r in records]),
        height=np.array([r["height"] for r in records]), names=names, dtype=torch.float64)


def _records(cams: Cameras, who: str) -> List[dict]:
    """Per-camera float64 dicts of a ``(V,)`` Cameras (names default to ``cam00``, ...)."""
    if len(cams.batch_shape) != 1:
        raise ValueError(f"{who} writes cameras with batch shape (V,), got {cams.batch_shape}")
    a = cams.numpy()
    V = cams.batch_shape[0]
    names = a["names"] if a["names"] is not None else [f"cam{i:02d}" for i in range(V)]
    if len(set(names)) != len(names):
        raise ValueError(f"{who}: camera names must be unique, got {names}")
    return [dict(name=str(names[i]), K=a["K"][i], R=a["R"][i], t=a["t"][i], dist=a["dist"][i],
                 width=int(a["width"][i]), height=int(a["height"][i])) for i in range(V)]


def _require(d: Mapping, key: str, path, where: str = ""):
    if not isinstance(d, Mapping):
        raise TempehDataError(path, f"'{where or 'top level'}' must be an object")
    if key not in d:
        raise TempehDataError(path, f"missing key '{where + '.' if where else ''}{key}'")
    return d[key]


def _load_json(path) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TempehDataError(path, f"cannot read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TempehDataError(path, f"invalid JSON: {exc.msg} (column {exc.colno})",
                              line=exc.lineno) from None


def _round(x: np.ndarray) -> list:
    """Exact float64 lists for JSON (``repr`` round-trips)."""
    return np.asarray(x, dtype=np.float64).tolist()


# ---------------------------------------------------------------------------------- cameras.json
def read_cameras_json(path: PathLike) -> Cameras:
    """Read tempeh's ``cameras.json``; ``t`` is converted to mm. Returns ``(V,)`` float64."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise TempehDataError(path, "top level must be a JSON object")
    fmt = _require(data, "format", path)
    if fmt != _FORMAT:
        raise TempehDataError(path, f"'format' must be '{_FORMAT}', got {fmt!r}")
    version = _require(data, "version", path)
    if version != _VERSION:
        raise TempehDataError(path, f"unsupported 'version' {version!r} (this reader: {_VERSION})")
    scale = _unit_scale(_require(data, "units", path), path)
    conv = data.get("convention", _CONVENTION)
    if conv != _CONVENTION:
        raise TempehDataError(path, f"'convention' must be '{_CONVENTION}', got {conv!r}")
    origin = data.get("pixel_origin", _PIXEL_ORIGIN)
    if origin != _PIXEL_ORIGIN:
        raise TempehDataError(path, f"'pixel_origin' must be '{_PIXEL_ORIGIN}', got {origin!r}")
    cams = _require(data, "cameras", path)
    if not isinstance(cams, list) or len(cams) == 0:
        raise TempehDataError(path, "'cameras' must be a non-empty list")
    records = []
    for i, c in enumerate(cams):
        w = f"cameras[{i}]"
        name = _require(c, "name", path, w)
        if not isinstance(name, str) or not name:
            raise TempehDataError(path, f"'{w}.name' must be a non-empty string, got {name!r}")
        width, height = _image_size(_require(c, "width", path, w), _require(c, "height", path, w),
                                    path, key=f"{w}.width/height")
        K = _validate_intrinsics(_float_array(_require(c, "K", path, w), (3, 3), path, f"{w}.K"),
                                 path, f"{w}.K")
        R = validate_rotation(_float_array(_require(c, "R", path, w), (3, 3), path, f"{w}.R"),
                              path, f"{w}.R")
        t = _float_array(_require(c, "t", path, w), (3,), path, f"{w}.t") * scale
        dist = _float_array(_require(c, "dist", path, w), (5,), path, f"{w}.dist")
        records.append(dict(name=name, K=K, R=R, t=t, dist=dist, width=width, height=height))
    try:
        return _make_cameras(records)
    except ValueError as exc:
        raise TempehDataError(path, str(exc)) from None


def write_cameras_json(path: PathLike, cams: Cameras, units: str = "mm") -> None:
    """Write ``(V,)`` cameras to tempeh's ``cameras.json`` (atomically); ``t`` in ``units``.

    Cameras without names get ``cam00``, ``cam01``, ...
    """
    if units not in UNIT_TO_MM:
        raise ValueError(f"units must be one of {sorted(UNIT_TO_MM)}, got {units!r}")
    scale = UNIT_TO_MM[units]
    out = []
    for r in _records(cams, "write_cameras_json"):
        out.append({"name": r["name"], "width": r["width"], "height": r["height"],
                    "K": _round(r["K"]), "R": _round(r["R"]), "t": _round(r["t"] / scale),
                    "dist": _round(r["dist"])})
    head = {"format": _FORMAT, "version": _VERSION, "units": units, "convention": _CONVENTION,
            "pixel_origin": _PIXEL_ORIGIN}
    # one camera per line keeps the file readable and diff-friendly
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append(' "cameras": [')
    lines.append(",\n".join("  " + json.dumps(c, allow_nan=False) for c in out))
    lines += [" ]", "}"]
    _atomic_write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------- OpenCV
_CV_K = ("K", "camera_matrix", "cameraMatrix")
_CV_D = ("D", "dist_coeffs", "distCoeffs", "distortion_coefficients")
_CV_R = ("R",)
_CV_RVEC = ("rvec", "r")
_CV_T = ("T", "t", "tvec")
_CV_SIZE = ("image_size", "imageSize")


def _fs_value(node):
    """A cv2.FileNode as a numpy array, a float, or a str (None when empty)."""
    if node.empty() or node.isNone():
        return None
    if node.isString():
        return node.string()
    if node.isInt() or node.isReal():
        return node.real()
    if node.isSeq():
        vals = []
        for i in range(node.size()):
            v = _fs_value(node.at(i))
            vals.append(v.tolist() if isinstance(v, np.ndarray) else v)
        return vals
    if node.isMap():
        m = node.mat()
        return None if m is None else np.asarray(m, dtype=np.float64)
    return None


def _fs_get(fs, keys: Sequence[str]):
    for k in keys:
        v = _fs_value(fs.getNode(k))
        if v is not None:
            return k, v
    return None, None


def read_opencv_calibration(path: PathLike, name: Optional[str] = None,
                            image_size: Optional[Tuple[int, int]] = None) -> Cameras:
    """Read one camera from an OpenCV ``FileStorage`` YAML/JSON file (keys: module docstring).

    ``name`` defaults to the file's ``name`` key, else the file stem. ``image_size=(w, h)`` is
    needed only when the file has no size. Returns ``(1,)`` float64 cameras, ``t`` in mm.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise TempehDataError(path, "calibration file not found")
    try:
        fs = cv2.FileStorage(str(path), cv2.FILE_STORAGE_READ)
    except (cv2.error, SystemError) as exc:  # the binding wraps cv2.error in a SystemError
        cause = exc.__cause__ if isinstance(exc, SystemError) and exc.__cause__ else exc
        text = " ".join(str(cause).split())
        m = re.search(r"\((\d+)\): ([^']*)", text)
        raise TempehDataError(path, "not a readable OpenCV FileStorage file: "
                              + (m.group(2) if m else text),
                              line=int(m.group(1)) if m else None) from None
    try:
        if not fs.isOpened():
            raise TempehDataError(path, "not a readable OpenCV FileStorage file")
        kK, K = _fs_get(fs, _CV_K)
        if K is None:
            raise TempehDataError(path, f"missing key '{_CV_K[0]}' (or {', '.join(_CV_K[1:])})")
        K = _validate_intrinsics(_float_array(K if not isinstance(K, np.ndarray) else K.tolist(),
                                              (3, 3), path, kK), path, kK)
        kD, D = _fs_get(fs, _CV_D)
        if D is None:
            raise TempehDataError(path, f"missing key '{_CV_D[0]}' (or {', '.join(_CV_D[1:])})")
        dist = _dist5(D, path, kD)
        kR, R = _fs_get(fs, _CV_R)
        if R is not None:
            R = _float_array(np.asarray(R).tolist(), (3, 3), path, kR)
        else:
            kR, rvec = _fs_get(fs, _CV_RVEC)
            if rvec is None:
                raise TempehDataError(path, "missing key 'R' (3x3) or 'rvec' (Rodrigues)")
            rvec = _float_array(np.asarray(rvec).reshape(-1).tolist(), (3,), path, kR)
            R = cv2.Rodrigues(rvec.reshape(3, 1))[0]
        R = validate_rotation(R, path, kR)
        kT, T = _fs_get(fs, _CV_T)
        if T is None:
            raise TempehDataError(path, f"missing key '{_CV_T[0]}' (or {', '.join(_CV_T[1:])})")
        T = _float_array(np.asarray(T).reshape(-1).tolist(), (3,), path, kT)
        units = _fs_value(fs.getNode("units"))
        scale = _unit_scale("mm" if units is None else units, path)
        w = _fs_value(fs.getNode("image_width"))
        h = _fs_value(fs.getNode("image_height"))
        if w is None or h is None:
            kS, size = _fs_get(fs, _CV_SIZE)
            if size is not None:
                size = np.asarray(size).reshape(-1).tolist()
                if len(size) != 2:
                    raise TempehDataError(path, f"'{kS}' must be [width, height], got {size}")
                w, h = size
            elif image_size is not None:
                w, h = image_size
            else:
                raise TempehDataError(path, "missing key 'image_width'/'image_height' (or "
                                      "'image_size'); pass image_size=(width, height)")
        width, height = _image_size(w, h, path, key="image_width/image_height")
        file_name = _fs_value(fs.getNode("name"))
    finally:
        fs.release()
    cam_name = name or (file_name if isinstance(file_name, str) and file_name else path.stem)
    return _make_cameras([dict(name=cam_name, K=K, R=R, t=T * scale, dist=dist, width=width,
                               height=height)])


def write_opencv_calibration(path: PathLike, cams: Cameras, units: str = "mm") -> None:
    """Write ONE camera (batch shape ``(1,)``) as OpenCV ``FileStorage``; the extension picks
    the format (``.json`` -> JSON, else YAML). Keys: ``name, image_width, image_height, K, D
    (1x5), R, T (3x1), units``. Written atomically."""
    import cv2

    if units not in UNIT_TO_MM:
        raise ValueError(f"units must be one of {sorted(UNIT_TO_MM)}, got {units!r}")
    recs = _records(cams, "write_opencv_calibration")
    if len(recs) != 1:
        raise ValueError(f"write_opencv_calibration writes one camera, got {len(recs)}")
    r = recs[0]
    path = Path(path)
    flags = cv2.FILE_STORAGE_WRITE | cv2.FILE_STORAGE_MEMORY
    flags |= cv2.FILE_STORAGE_FORMAT_JSON if path.suffix.lower() == ".json" \
        else cv2.FILE_STORAGE_FORMAT_YAML
    fs = cv2.FileStorage(path.name, flags)
    fs.write("name", r["name"])
    fs.write("image_width", r["width"])
    fs.write("image_height", r["height"])
    fs.write("K", r["K"])
    fs.write("D", r["dist"].reshape(1, 5))
    fs.write("R", r["R"])
    fs.write("T", (r["t"] / UNIT_TO_MM[units]).reshape(3, 1))
    fs.write("units", units)
    _atomic_write_text(path, fs.releaseAndGetString())


# ---------------------------------------------------------------------------------- NeRSemble
def read_nersemble_cameras(path: PathLike, image_size: ImageSize = None,
                           units: str = "m") -> Cameras:
    """Read NeRSemble ``camera_params.json`` (``world_2_cam`` 4x4 w2c per serial, OpenCV axes).

    Args:
        image_size: ``(w, h)`` or ``{serial: (w, h)}``; required unless the file has
            ``width``/``height`` keys (NeRSemble v2 full resolution: ``(3208, 2200)``).
        units: world unit of the file (``"m"`` -> x1000, ``"mm"``). NeRSemble does not document
            it; check the scale of your data.
    Returns:
        ``(V,)`` float64 cameras named by serial, sorted; distortion zero.
    """
    scale = _unit_scale(units, path, key="units argument")
    data = _load_json(path)
    if not isinstance(data, dict):
        raise TempehDataError(path, "top level must be a JSON object")
    w2c = _require(data, "world_2_cam", path)
    intr = _require(data, "intrinsics", path)
    if not isinstance(w2c, dict) or not w2c:
        raise TempehDataError(path, "'world_2_cam' must be a non-empty {serial: 4x4} object")
    shared_K = None
    if not isinstance(intr, dict):
        shared_K = _validate_intrinsics(_float_array(intr, (3, 3), path, "intrinsics"), path,
                                        "intrinsics")
    size = image_size
    if size is None and "width" in data and "height" in data:
        size = _image_size(data["width"], data["height"], path, key="width/height")
    records = []
    for serial in sorted(w2c):
        M = _float_array(w2c[serial], (4, 4), path, f"world_2_cam.{serial}")
        if np.abs(M[3] - np.array([0, 0, 0, 1.0])).max() > 1e-9:
            raise TempehDataError(path, f"'world_2_cam.{serial}' last row must be [0, 0, 0, 1]")
        R = validate_rotation(M[:3, :3], path, f"world_2_cam.{serial}")
        if shared_K is None:
            K = _validate_intrinsics(_float_array(_require(intr, serial, path, "intrinsics"),
                                                  (3, 3), path, f"intrinsics.{serial}"),
                                     path, f"intrinsics.{serial}")
        else:
            K = shared_K
        w, h = _size_for(size, serial, path, "NeRSemble camera_params.json")
        records.append(dict(name=str(serial), K=K, R=R, t=M[:3, 3] * scale, dist=np.zeros(5),
                            width=w, height=h))
    return _make_cameras(records)


def write_nersemble_cameras(path: PathLike, cams: Cameras, units: str = "m") -> None:
    """Write ``(V,)`` undistorted cameras as NeRSemble ``camera_params.json`` (atomically).

    One shared ``intrinsics`` when all K are equal, else per serial. The image size is not
    stored (as in the dataset). Raises ValueError for non-zero distortion.
    """
    if units not in UNIT_TO_MM:
        raise ValueError(f"units must be one of {sorted(UNIT_TO_MM)}, got {units!r}")
    recs = _records(cams, "write_nersemble_cameras")
    if any(np.any(r["dist"] != 0) for r in recs):
        raise ValueError("NeRSemble camera_params.json has no distortion; undistort first")
    w2c = {}
    for r in recs:
        M = np.eye(4)
        M[:3, :3] = r["R"]
        M[:3, 3] = r["t"] / UNIT_TO_MM[units]
        w2c[r["name"]] = _round(M)
    Ks = [r["K"] for r in recs]
    same = all(np.array_equal(Ks[0], K) for K in Ks)
    intr = _round(Ks[0]) if same else {r["name"]: _round(r["K"]) for r in recs}
    _atomic_write_text(path, json.dumps({"world_2_cam": w2c, "intrinsics": intr}, indent=1) + "\n")


# ---------------------------------------------------------------------------------- Multiface
def _parse_numbers(text: str, n: int, path, line: int, what: str) -> List[float]:
    toks = text.split()
    if len(toks) != n:
        raise TempehDataError(path, f"{what}: expected {n} numbers, found {len(toks)} "
                              f"in {text.strip()!r}", line=line)
    try:
        vals = [float(x) for x in toks]
    except ValueError:
        raise TempehDataError(path, f"{what}: non-numeric value in {text.strip()!r}",
                              line=line) from None
    if not all(math.isfinite(v) for v in vals):
        raise TempehDataError(path, f"{what}: non-finite value in {text.strip()!r}", line=line)
    return vals


def read_multiface_krt(path: PathLike, image_size: ImageSize = None,
                       units: str = "mm") -> Cameras:
    """Read a Multiface / Ava-256 legacy ``KRT`` text file (w2c ``[R | t]``, mm).

    Each block: name; 3 rows of K; one row of 4-5 distortion values (OpenCV order); 3 rows of
    ``[R | t]``; blank lines between blocks are optional. ``image_size`` is required (the file
    has none): ``(w, h)`` for all cameras or ``{name: (w, h)}``. Cameras keep file order.
    """
    scale = _unit_scale(units, path, key="units argument")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TempehDataError(path, f"cannot read: {exc}") from None
    rows = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not rows:
        raise TempehDataError(path, "empty KRT file")
    records = []
    for b in range(0, len(rows), 8):
        block = rows[b: b + 8]
        name_line, name = block[0]
        name = name.strip()
        if len(block) < 8:
            last = block[-1][0]
            raise TempehDataError(path, f"truncated block for camera '{name}': expected 8 "
                                  f"non-empty lines, found {len(block)}", line=last + 1)
        K = np.array([_parse_numbers(block[1 + i][1], 3, path, block[1 + i][0], f"'{name}' K")
                      for i in range(3)])
        dl, dtext = block[4]
        dvals = dtext.split()
        if len(dvals) not in (4, 5):
            raise TempehDataError(path, f"'{name}' distortion: expected 4 or 5 numbers, found "
                                  f"{len(dvals)}", line=dl)
        dist = _dist5(_parse_numbers(dtext, len(dvals), path, dl, f"'{name}' distortion"),
                      path, f"{name}.distortion", dl)
        RT = np.array([_parse_numbers(block[5 + i][1], 4, path, block[5 + i][0],
                                      f"'{name}' [R|t]") for i in range(3)])
        _validate_intrinsics(K, path, f"{name}.K", line=block[1][0])
        R = validate_rotation(RT[:, :3], path, f"{name}.R", line=block[5][0])
        w, h = _size_for(image_size, name, path, "Multiface KRT")
        records.append(dict(name=name, K=K, R=R, t=RT[:, 3] * scale, dist=dist, width=w,
                            height=h))
    try:
        return _make_cameras(records)
    except ValueError as exc:
        raise TempehDataError(path, str(exc)) from None


def write_multiface_krt(path: PathLike, cams: Cameras, units: str = "mm") -> None:
    """Write ``(V,)`` cameras as a Multiface ``KRT`` text file (atomically; no image size)."""
    if units not in UNIT_TO_MM:
        raise ValueError(f"units must be one of {sorted(UNIT_TO_MM)}, got {units!r}")
    out = []
    for r in _records(cams, "write_multiface_krt"):
        if any(c.isspace() for c in r["name"]):
            raise ValueError(f"KRT camera names cannot contain spaces: {r['name']!r}")
        out.append(r["name"])
        out += [" ".join(repr(float(x)) for x in row) for row in r["K"]]
        out.append(" ".join(repr(float(x)) for x in r["dist"]))
        RT = np.concatenate([r["R"], (r["t"] / UNIT_TO_MM[units])[:, None]], axis=1)
        out += [" ".join(repr(float(x)) for x in row) for row in RT]
        out.append("")
    _atomic_write_text(path, "\n".join(out) + "\n")


# ---------------------------------------------------------------------------------- folders
_PER_CAMERA_SUFFIXES = {".tka": "tka", ".yaml": "opencv", ".yml": "opencv"}


def read_calibration_dir(path: PathLike) -> Cameras:
    """Read a capture's calibration folder -> ``(V,)`` float64 cameras, mm.

    ``cameras.json`` wins when present; otherwise every ``*.tka`` (3dMD) or ``*.yaml``/``*.yml``
    (OpenCV) file is one camera, named by its file stem and ordered by sorted stem. Hidden
    files (``.*``) are ignored. Mixing tka and OpenCV files, duplicate stems, or a folder
    without calibration files raise :class:`TempehDataError`.
    """
    path = Path(path)
    if not path.is_dir():
        raise TempehDataError(path, "calibration folder not found")
    cj = path / CAMERAS_JSON
    if cj.is_file():
        return read_cameras_json(cj)
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in _PER_CAMERA_SUFFIXES)
    if not files:
        raise TempehDataError(path, f"no calibration found: expected '{CAMERAS_JSON}' or "
                              "per-camera *.tka / *.yaml / *.yml files")
    kinds = {_PER_CAMERA_SUFFIXES[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise TempehDataError(path, "mixed calibration formats (both .tka and OpenCV YAML "
                              "files); keep one kind per folder")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise TempehDataError(path, f"several calibration files per camera: {dup}")
    order = sorted(range(len(files)), key=lambda i: stems[i])
    if kinds == {"tka"}:
        from tempeh.io.tka import read_tka
        cams = [read_tka(files[i]) for i in order]
    else:
        cams = [read_opencv_calibration(files[i], name=stems[i]) for i in order]
    logger.debug("read %d cameras from %s", len(cams), path)
    return Cameras.cat(cams)
