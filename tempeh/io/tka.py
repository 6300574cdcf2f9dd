"""3dMD ``.tka`` camera calibration: reader, writer, and the Tsai -> OpenCV distortion fit.

File layout (positional, one value per line; 0-based line index, see TEMPEH-FACTS 2.2)::

    0      header (free text, kept)
    1-3    rows of the 3x3 world->camera rotation R (3 numbers each)
    4-6    X, Y, Z: camera CENTRE in world coordinates, mm
    7      f: focal length, physical units (mm)
    8      K: Tsai kappa1 (undistortion, 1/mm^2, on sensor-plane coordinates)
    9      K2: Tsai kappa2 (1/mm^4)
    10     S: kept, unused
    11-12  x, y: effective pixel size (mm / pixel)
    13-14  a, b: principal point, pixels
    15     image width and height, pixels
    16     c: kept, unused

Value lines may carry a leading label (``X: 12.5``, ``K2 = 1e-5``, ``f 8.0``); it is ignored.
The principal point ``(a, b)`` is used as is (like the reference code) in tempeh's pixel
convention (origin at the centre of the top-left pixel). Errors give the 1-based line number.

Camera model: ``K = [[f/x, 0, a], [0, f/y, b], [0, 0, 1]]``, ``R`` as stored, ``t = -R C`` (mm).

Distortion. Tsai's model undistorts sensor coordinates: ``X_u = X_d (1 + kappa1 r_d^2 +
kappa2 r_d^4)`` with ``r_d`` in mm. Divided by the PHYSICAL focal length ``f`` this becomes
``x_u = x_d (1 + K1 r_d^2 + K2 r_d^4)`` on normalised coordinates with ``K1 = kappa1 f^2``,
``K2 = kappa2 f^4``. OpenCV wants the forward map ``x_d = x_u (1 + k1 r_u^2 + k2 r_u^4)``;
:func:`tsai_to_opencv_radial` fits ``(k1, k2)`` by linear least squares on the radial pixel
error, sampling the distorted radius uniformly on ``(0, r_max]`` where ``r_max`` is the largest
normalised distance from the principal point to an image corner (pixel-edge corners ``(-0.5,
-0.5)`` ... ``(W - 0.5, H - 0.5)``): exactly the radii that occur in the image. We use the
camera's own (un-resized) ``f``; the reference code divides ``f`` by the image resize factor
first, which shrinks the distortion by ``rf^2`` / ``rf^4`` (a bug). Resizing a tka camera is
then just :meth:`Cameras.resize` (distortion does not change with image size). The fit
residual (max radial error over the sampled radii, in pixels of the full-size image, using
``max(fx, fy)``) is returned and logged; it is ~1e-3 px for ordinary lenses.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from tempeh.cameras import Cameras
from tempeh.errors import TempehDataError
from tempeh.io.calibration import _atomic_write_text, validate_rotation

logger = logging.getLogger(__name__)

__all__ = [
    "TkaRecord",
    "parse_tka",
    "format_tka",
    "write_tka",
    "read_tka",
    "tka_to_cameras",
    "camera_to_tka",
    "tsai_to_opencv_radial",
    "opencv_to_tsai_radial",
    "FIT_SAMPLES",
    "FIT_WARN_PX",
]

PathLike = Union[str, os.PathLike]
FIT_SAMPLES = 256
"""Number of radii in the distortion fits."""
FIT_WARN_PX = 0.05
"""A fit residual above this (pixels) is logged as a warning."""
_NUM_LINES = 17
_FIELDS = ["header", "R row 1", "R row 2", "R row 3", "X (centre)", "Y (centre)", "Z (centre)",
           "f (focal length)", "K (Tsai kappa1)", "K2 (Tsai kappa2)", "S", "x (pixel size)",
           "y (pixel size)", "a (principal point)", "b (principal point)",
           "image width height", "c"]
_LABEL = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*[:=]?")


@dataclass(frozen=True)
class TkaRecord:
    """The raw contents of a ``.tka`` file (units as in the file: mm, pixels).

    Fields:
        rotation: ``(3, 3)`` world->camera rotation.
        center: ``(3,)`` camera centre, world, mm.
        focal_length: physical focal length ``f``, mm.
        kappa1, kappa2: Tsai undistortion terms, 1/mm^2 and 1/mm^4.
        pixel_size: ``(x, y)`` effective pixel size, mm.
        principal_point: ``(a, b)`` pixels.
        width, height: image size, pixels.
        s, c: stored values the camera model does not use (kept for round trips).
        header: line 0.
    """

    rotation: np.ndarray
    center: np.ndarray
    focal_length: float
    kappa1: float
    kappa2: float
    pixel_size: Tuple[float, float]
    principal_point: Tuple[float, float]
    width: int
    height: int
    s: float = 1.0
    c: float = 0.0
    header: str = "3dMD camera calibration (tka, written by tempeh)"

    @property
    def fx(self) -> float:
        return self.focal_length / self.pixel_size[0]

    @property
    def fy(self) -> float:
        return self.focal_length / self.pixel_size[1]


# ---------------------------------------------------------------------------------- parsing
def _numbers(lines: List[str], idx: int, n: int, path) -> List[float]:
    field = _FIELDS[idx]
    if idx >= len(lines):
        raise TempehDataError(path, f"truncated file: missing line for '{field}' (a .tka file "
                              f"has {_NUM_LINES} lines, this one {len(lines)})", line=idx + 1)
    text = lines[idx]
    toks = text.split()
    try:
        vals = [float(x) for x in toks]
    except ValueError:
        vals = None
    if vals is None or len(vals) != n:
        m = _LABEL.match(text)
        if m:
            toks = text[m.end():].split()
        if len(toks) != n:
            raise TempehDataError(path, f"'{field}': expected {n} number(s), got {text.strip()!r}",
                                  line=idx + 1)
        try:
            vals = [float(x) for x in toks]
        except ValueError:
            raise TempehDataError(path, f"'{field}': non-numeric value in {text.strip()!r}",
                                  line=idx + 1) from None
    if not all(math.isfinite(v) for v in vals):
        raise TempehDataError(path, f"'{field}': non-finite value in {text.strip()!r}",
                              line=idx + 1)
    return vals


def parse_tka(path: PathLike) -> TkaRecord:
    """Parse a ``.tka`` file into a :class:`TkaRecord` (no unit conversion, no fitting)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TempehDataError(path, f"cannot read .tka file: {exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > _NUM_LINES:
        logger.warning("%s: %d lines after the %d of the .tka layout are ignored", path,
                       len(lines) - _NUM_LINES, _NUM_LINES)
    if not lines:
        raise TempehDataError(path, "empty .tka file", line=1)
    R = np.array([_numbers(lines, i, 3, path) for i in (1, 2, 3)])
    C = np.array([_numbers(lines, i, 1, path)[0] for i in (4, 5, 6)])
    f, k1, k2, s, px, py, a, b = (_numbers(lines, i, 1, path)[0] for i in range(7, 15))
    w, h = _numbers(lines, 15, 2, path)
    c = _numbers(lines, 16, 1, path)[0]
    validate_rotation(R, path, "R (lines 2-4)", line=2)
    if f <= 0:
        raise TempehDataError(path, f"focal length must be positive, got {f}", line=8)
    for val, ln in ((px, 12), (py, 13)):
        if val <= 0:
            raise TempehDataError(path, f"pixel size must be positive, got {val}", line=ln)
    if w != int(w) or h != int(h) or w <= 0 or h <= 0:
        raise TempehDataError(path, f"image size must be positive integers, got {w} x {h}",
                              line=16)
    return TkaRecord(rotation=R, center=C, focal_length=f, kappa1=k1, kappa2=k2,
                     pixel_size=(px, py), principal_point=(a, b), width=int(w), height=int(h),
                     s=s, c=c, header=lines[0].rstrip("\r\n"))


def format_tka(rec: TkaRecord) -> str:
    """The text of a ``.tka`` file. Labels have the fixed widths the reference parser expects
    (``"X: "``; ``"K2: "`` and the image-size ``"WH: "`` have 4 characters); rotation rows end
    with a space; numbers are written with ``repr`` (exact float64 round trip)."""
    r = lambda v: repr(float(v))  # noqa: E731
    header = rec.header.replace("\n", " ").replace("\r", " ")
    rows = [" ".join(r(v) for v in row) + " " for row in np.asarray(rec.rotation, dtype=float)]
    C = np.asarray(rec.center, dtype=float)
    body = [header] + rows + [
        f"X: {r(C[0])}", f"Y: {r(C[1])}", f"Z: {r(C[2])}", f"f: {r(rec.focal_length)}",
        f"K: {r(rec.kappa1)}", f"K2: {r(rec.kappa2)}", f"S: {r(rec.s)}",
        f"x: {r(rec.pixel_size[0])}", f"y: {r(rec.pixel_size[1])}",
        f"a: {r(rec.principal_point[0])}", f"b: {r(rec.principal_point[1])}",
        f"WH: {int(rec.width)} {int(rec.height)}", f"c: {r(rec.c)}"]
    return "\n".join(body) + "\n"


def write_tka(path: PathLike, rec: TkaRecord) -> None:
    """Write a :class:`TkaRecord` as a ``.tka`` file (atomically)."""
    _atomic_write_text(path, format_tka(rec))


# ---------------------------------------------------------------------------------- distortion
def _max_corner_radius(fx, fy, cx, cy, width, height) -> float:
    """Largest normalised distance from the principal point to an image corner (pixel edges)."""
    us = np.array([-0.5, width - 0.5])
    vs = np.array([-0.5, height - 0.5])
    du = ((us - cx) / fx)[:, None]
    dv = ((vs - cy) / fy)[None, :]
    return float(np.sqrt(du * du + dv * dv).max())


def _lstsq2(r: np.ndarray, target: np.ndarray) -> Tuple[float, float]:
    """Least-squares ``(a, b)`` of ``a r^3 + b r^5 ≈ target`` (columns scaled)."""
    A = np.stack([r ** 3, r ** 5], axis=1)
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    sol = np.linalg.lstsq(A / scale, target, rcond=None)[0] / scale
    return float(sol[0]), float(sol[1])


def tsai_to_opencv_radial(kappa1: float, kappa2: float, focal_length: float,
                          pixel_size: Tuple[float, float], principal_point: Tuple[float, float],
                          image_size: Tuple[int, int], samples: int = FIT_SAMPLES
                          ) -> Tuple[float, float, float]:
    """Fit OpenCV forward radial ``(k1, k2)`` to Tsai undistortion ``(kappa1, kappa2)``.

    Args:
        kappa1, kappa2: Tsai terms (1/mm^2, 1/mm^4) on sensor coordinates.
        focal_length: physical ``f`` (mm) of the camera as calibrated (NOT divided by any
            image resize factor).
        pixel_size: ``(x, y)`` mm per pixel; principal_point: ``(a, b)`` pixels;
        image_size: ``(width, height)`` pixels (defines the fitted radius range).
    Returns:
        ``(k1, k2, residual_px)``: coefficients for ``x_d = x_u (1 + k1 r_u^2 + k2 r_u^4)`` and
        the max radial error of the fit over ``r_d in (0, r_max]``, in pixels.
    Raises:
        ValueError: if the Tsai map is not monotonic over the image (meaningless lens model).
    """
    f = float(focal_length)
    fx, fy = f / pixel_size[0], f / pixel_size[1]
    K1, K2 = kappa1 * f ** 2, kappa2 * f ** 4
    r_max = _max_corner_radius(fx, fy, principal_point[0], principal_point[1], *image_size)
    r_d = np.linspace(0.0, r_max, samples + 1)[1:]
    if np.any(1 + 3 * K1 * r_d ** 2 + 5 * K2 * r_d ** 4 <= 0):
        raise ValueError(f"Tsai distortion (kappa1={kappa1}, kappa2={kappa2}) folds over "
                         "inside the image")
    r_u = r_d * (1 + K1 * r_d ** 2 + K2 * r_d ** 4)
    k1, k2 = _lstsq2(r_u, r_d - r_u)
    pred = r_u * (1 + k1 * r_u ** 2 + k2 * r_u ** 4)
    residual = float(np.abs(pred - r_d).max() * max(fx, fy))
    return k1, k2, residual


def opencv_to_tsai_radial(k1: float, k2: float, focal_length: float,
                          pixel_size: Tuple[float, float], principal_point: Tuple[float, float],
                          image_size: Tuple[int, int], k3: float = 0.0,
                          samples: int = FIT_SAMPLES) -> Tuple[float, float, float]:
    """Inverse of :func:`tsai_to_opencv_radial` (for writing tka files from OpenCV cameras).

    Fits ``x_u = x_d (1 + K1 r_d^2 + K2 r_d^4)`` to the exact inverse of the OpenCV radial
    model over the distorted radii in the image; returns ``(kappa1, kappa2, residual_px)``
    with ``kappa1 = K1 / f^2``, ``kappa2 = K2 / f^4``.
    """
    f = float(focal_length)
    fx, fy = f / pixel_size[0], f / pixel_size[1]
    r_max = _max_corner_radius(fx, fy, principal_point[0], principal_point[1], *image_size)
    r_d = np.linspace(0.0, r_max, samples + 1)[1:]
    r_u = r_d.copy()  # Newton on g(r_u) = r_u (1 + k1 r^2 + k2 r^4 + k3 r^6) - r_d
    for _ in range(50):
        r2 = r_u * r_u
        g = r_u * (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) - r_d
        dg = 1 + r2 * (3 * k1 + r2 * (5 * k2 + 7 * k3 * r2))
        if np.any(dg <= 0):
            raise ValueError(f"OpenCV radial distortion (k1={k1}, k2={k2}, k3={k3}) is not "
                             "invertible over the image")
        r_u = r_u - g / dg
    K1, K2 = _lstsq2(r_d, r_u - r_d)
    pred = r_d * (1 + K1 * r_d ** 2 + K2 * r_d ** 4)
    residual = float(np.abs(pred - r_u).max() * max(fx, fy))
    return K1 / f ** 2, K2 / f ** 4, residual


# ---------------------------------------------------------------------------------- cameras
def tka_to_cameras(rec: TkaRecord, name: str, path: Optional[PathLike] = None
                   ) -> Tuple[Cameras, float]:
    """Convert a record to ``(1,)`` float64 :class:`Cameras` (mm) and the fit residual (px)."""
    try:
        k1, k2, res = tsai_to_opencv_radial(rec.kappa1, rec.kappa2, rec.focal_length,
                                            rec.pixel_size, rec.principal_point,
                                            (rec.width, rec.height))
    except ValueError as exc:
        raise TempehDataError(path, str(exc), line=9) from None
    if res > FIT_WARN_PX:
        logger.warning("%s: Tsai->OpenCV distortion fit residual %.3g px", path or name, res)
    else:
        logger.debug("%s: Tsai->OpenCV distortion fit residual %.3g px", path or name, res)
    R = np.asarray(rec.rotation, dtype=np.float64)
    K = np.array([[rec.fx, 0.0, rec.principal_point[0]],
                  [0.0, rec.fy, rec.principal_point[1]],
                  [0.0, 0.0, 1.0]])
    t = -R @ np.asarray(rec.center, dtype=np.float64)
    cams = Cameras.create(K[None], R[None], t[None], width=[rec.width], height=[rec.height],
                          dist=np.array([[k1, k2, 0.0, 0.0, 0.0]]), names=[name],
                          dtype=torch.float64)
    return cams, res


def read_tka(path: PathLike, name: Optional[str] = None) -> Cameras:
    """Read a 3dMD ``.tka`` file -> ``(1,)`` float64 :class:`Cameras` (mm, full image size),
    named by the file stem unless ``name`` is given. Resize with :meth:`Cameras.resize`."""
    path = Path(path)
    cams, _ = tka_to_cameras(parse_tka(path), name or path.stem, path)
    return cams


def camera_to_tka(cams: Cameras, pixel_size: float = 0.00345, s: float = 1.0, c: float = 0.0,
                  header: Optional[str] = None) -> Tuple[TkaRecord, float]:
    """Express ONE camera (batch ``(1,)`` or ``()``) as a :class:`TkaRecord`.

    ``pixel_size`` (mm) is the horizontal pixel size the file will state (tka stores physical
    units; any value gives the same camera): ``f = fx * x``, ``y = f / fy``. The radial terms
    are converted with :func:`opencv_to_tsai_radial`; skew and tangential terms must be zero.
    Returns the record and the distortion fit residual in pixels.
    """
    if int(np.prod(cams.batch_shape)) != 1:
        raise ValueError(f"camera_to_tka converts one camera, got batch {cams.batch_shape}")
    a = cams.numpy()
    K, R = a["K"].reshape(3, 3), a["R"].reshape(3, 3)
    t, d = a["t"].reshape(3), a["dist"].reshape(5)
    if K[0, 1] != 0:
        raise ValueError("a .tka camera has no skew (K[0, 1] must be 0)")
    if d[2] != 0 or d[3] != 0:
        raise ValueError("a .tka camera has no tangential distortion (p1 = p2 = 0)")
    width, height = int(a["width"].reshape(-1)[0]), int(a["height"].reshape(-1)[0])
    f = float(K[0, 0]) * pixel_size
    pix = (float(pixel_size), f / float(K[1, 1]))
    pp = (float(K[0, 2]), float(K[1, 2]))
    kappa1, kappa2, res = opencv_to_tsai_radial(float(d[0]), float(d[1]), f, pix, pp,
                                                (width, height), k3=float(d[4]))
    rec = TkaRecord(rotation=R.copy(), center=-R.T @ t, focal_length=f, kappa1=kappa1,
                    kappa2=kappa2, pixel_size=pix, principal_point=pp, width=width,
                    height=height, s=s, c=c)
    if header is not None:
        rec = replace(rec, header=header)
    return rec, res
