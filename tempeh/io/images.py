"""Capture images: grey-scale reading, atomic PNG writing, cheap size queries.

Capture images are read as 8-bit grey ``(H, W)`` arrays (rows = v, columns = u, the pixel
convention of :mod:`tempeh.cameras`). 16-bit images are scaled to 8 bits (``round(x/257)``),
colour images converted with OpenCV's BGR->grey weights. ``cv2.imread`` returns ``None`` for
an unreadable file instead of raising; this module detects that and raises
:class:`~tempeh.errors.TempehDataError` naming the file. A PNG is also checked for its final
``IEND`` chunk, because a truncated PNG may otherwise decode into a partly black image.
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Tuple, Union

import cv2
import numpy as np

from tempeh.errors import TempehDataError
from tempeh.io.mesh import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "read_gray", "write_png", "image_size", "check_png_complete"]

PathLike = Union[str, os.PathLike]

#: Image file suffixes a capture may use (lower case, with the dot).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TempehDataError(path, "image file not found")
    return path


def check_png_complete(path: PathLike) -> None:
    """Raise TempehDataError unless ``path`` starts with the PNG signature and ends with the
    ``IEND`` chunk (reads 8 + 12 bytes; catches truncated downloads and copies)."""
    path = _existing(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head != _PNG_SIG:
            raise TempehDataError(path, "not a PNG file (bad signature)")
        if size < 8 + 25 + 12:
            raise TempehDataError(path, f"truncated PNG file ({size} bytes)")
        fh.seek(size - 12)
        if fh.read(12) != _PNG_IEND:
            raise TempehDataError(path, "truncated or corrupt PNG file (no IEND chunk at the end)")


def read_gray(path: PathLike) -> np.ndarray:
    """Read an image as grey-scale.

    Args:
        path: PNG, JPEG, BMP or TIFF file; 8- or 16-bit; grey, BGR or BGRA.
    Returns:
        ``(H, W)`` uint8 array (row = v, column = u).
    Raises:
        TempehDataError naming the file when it is missing, truncated or cannot be decoded,
        or has an unsupported sample type (e.g. float).
    """
    path = _existing(path)
    if path.suffix.lower() == ".png":
        check_png_complete(path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise TempehDataError(path, "cannot decode image (corrupt, truncated or unsupported format)")
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise TempehDataError(path, f"unsupported image sample type {img.dtype} (need 8 or 16 bit)")
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        else:
            raise TempehDataError(path, f"unsupported channel count {img.shape[2]}")
    if img.ndim != 2 or img.size == 0:
        raise TempehDataError(path, f"unexpected decoded image shape {img.shape}")
    return np.ascontiguousarray(img)


def write_png(path: PathLike, img: np.ndarray) -> Path:
    """Write ``img`` (``(H, W)`` grey or ``(H, W, 3|4)`` BGR[A], uint8 or uint16) as PNG,
    atomically (temporary file + rename; parent folders are created). Returns ``Path(path)``."""
    path = Path(path)
    img = np.asarray(img)
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: write_png needs uint8 or uint16 pixels, got {img.dtype}")
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4))) or img.size == 0:
        raise ValueError(f"{path}: write_png needs (H, W) or (H, W, 1|3|4), got {img.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    with atomic_write(path, "wb") as fh:
        fh.write(buf.tobytes())
    return path


def image_size(path: PathLike) -> Tuple[int, int]:
    """``(W, H)`` of an image. PNG: read from the IHDR header (24 bytes, no decoding; the
    file's completeness is NOT checked, use :func:`check_png_complete`); other formats are
    decoded. Raises TempehDataError naming the file when missing or unreadable."""
    path = _existing(path)
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] == _PNG_SIG:
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise TempehDataError(path, "corrupt PNG header (no IHDR chunk)")
        w, h = struct.unpack(">II", head[16:24])
        if w == 0 or h == 0:
            raise TempehDataError(path, f"PNG header gives an empty image {w}x{h}")
        return int(w), int(h)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise TempehDataError(path, "cannot decode image (corrupt, truncated or unsupported format)")
    return int(img.shape[1]), int(img.shape[0])
