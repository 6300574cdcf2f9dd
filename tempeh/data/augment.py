"""Image augmentation and downsampling that keep the cameras EXACT (pure functions).

Pixel convention (``tempeh.cameras``): the origin is the centre of the top-left pixel. Zooming
by ``s`` maps pixel ``u`` to ``s (u + 0.5) - 0.5`` (:meth:`Cameras.resize`); cropping at
``x0`` maps ``u`` to ``u - x0`` (:meth:`Cameras.crop`). :func:`scale_crop` warps the image with
exactly that affine map (one ``cv2.warpAffine``, bilinear, zeros outside), so a world point
projected with the returned camera lands on the same image feature (tested to < 0.1 px).

Brightness: ONE factor ``1 + sigma N(0, 1)`` per grey image, then clipped to [0, 1] (the
reference draws three per-channel factors on an RGB copy of the grey image, tinting it).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Tuple

import cv2
import numpy as np
import torch

from tempeh.cameras import Cameras

logger = logging.getLogger(__name__)

__all__ = ["sample_scale_crop", "scale_crop_matrix", "scale_crop_image",
           "scale_crop", "zoom_crop_cameras", "sample_brightness", "apply_brightness", "downsample_size",
           "downsample_image", "downsample"]


def sample_scale_crop(rng: np.random.Generator, width: int, height: int,
                      scale_range: Tuple[float, float]) -> Tuple[float, float, float]:
    """Draw ``(s, x0, y0)``: ``s ~ U(scale_range)``; the crop of the original size is placed
    uniformly at random over the zoomed image (zoom-in, ``x0 in [0, W s - W]``) or the zoomed
    image uniformly within the frame (zoom-out, ``x0 in [W s - W, 0]``, padding). The expected
    crop is centred. Draws exactly three uniforms from ``rng``.
    """
    lo, hi = scale_range
    u = rng.random(3)
    s = float(lo + (hi - lo) * u[0])
    dx = width * s - width
    dy = height * s - height
    x0 = float(min(dx, 0.0) + abs(dx) * u[1])
    y0 = float(min(dy, 0.0) + abs(dy) * u[2])
    return s, x0, y0


def scale_crop_matrix(s: float, x0: float, y0: float) -> np.ndarray:
    """The ``(2, 3)`` affine map new_pixel = A @ [u, v, 1]: ``u' = s (u + 0.5) - 0.5 - x0``."""
    c = 0.5 * s - 0.5
    return np.array([[s, 0.0, c - x0], [0.0, s, c - y0]], dtype=np.float64)


def scale_crop_image(img: np.ndarray, s: float, x0: float, y0: float) -> np.ndarray:
    """Zoom-and-crop one image to its own size.

    Args:
        img: ``(H, W)`` float32 (or uint8) image.
        s, x0, y0: see :func:`sample_scale_crop`.
    Returns:
        ``(H, W)`` image of the same dtype; bilinear; zeros where the zoomed image does not
        cover the frame.
    """
    H, W = img.shape[:2]
    if s == 1.0 and x0 == 0.0 and y0 == 0.0:
        return img.copy()
    return cv2.warpAffine(img, scale_crop_matrix(s, x0, y0), (W, H), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def scale_crop(images: np.ndarray, cams: Cameras, params: np.ndarray) -> Tuple[np.ndarray, Cameras]:
    """Zoom-and-crop every view, with the exact camera update.

    Args:
        images: ``(V, H, W)`` float32 in [0, 1].
        cams: ``(V,)`` cameras of ``images`` (width W, height H).
        params: ``(V, 3)`` rows ``(s, x0, y0)``.
    Returns:
        images ``(V, H, W)`` float32 and cameras ``(V,)`` with
        ``K' = crop(resize(K, s), x0, y0)`` and the same size ``W x H``.
    """
    V, H, W = images.shape
    params = np.asarray(params, dtype=np.float64).reshape(V, 3)
    out = np.empty_like(images)
    for v in range(V):
        out[v] = scale_crop_image(images[v], *params[v])
    return out, zoom_crop_cameras(cams, params[:, 0], params[:, 1], params[:, 2], W, H)


def zoom_crop_cameras(cams: Cameras, s, x0, y0, width: int, height: int) -> Cameras:
    """Per-view ``cams[v].resize(scale=s[v]).crop(x0[v], y0[v], width, height)`` in one go.

    ``s, x0, y0``: ``(V,)``. The zoom is the K update of :meth:`Cameras.resize`
    (``fx' = s fx``, ``cx' = s (cx + 0.5) - 0.5``; tested equal to it), the crop is
    :meth:`Cameras.crop` with per-camera offsets.
    """
    dt, dev = cams.dtype, cams.device
    s = torch.as_tensor(np.asarray(s, dtype=np.float64), dtype=dt, device=dev)
    A = torch.zeros(cams.batch_shape + (3, 3), dtype=dt, device=dev)
    A[..., 0, 0] = s
    A[..., 1, 1] = s
    A[..., 0, 2] = 0.5 * s - 0.5
    A[..., 1, 2] = 0.5 * s - 0.5
    A[..., 2, 2] = 1
    zoomed = dataclasses.replace(cams, K=A @ cams.K)
    return zoomed.crop(torch.as_tensor(np.asarray(x0, dtype=np.float64), dtype=dt, device=dev),
                       torch.as_tensor(np.asarray(y0, dtype=np.float64), dtype=dt, device=dev),
                       width, height)


def sample_brightness(rng: np.random.Generator, num_views: int, sigma: float) -> np.ndarray:
    """``(V,)`` brightness factors ``1 + sigma N(0, 1)`` (draws V normals even if sigma is 0)."""
    return 1.0 + sigma * rng.standard_normal(num_views)


def apply_brightness(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``(V, H, W)`` float images times ``(V,)`` factors, clipped to [0, 1] (float32)."""
    f = np.asarray(factors, dtype=np.float32).reshape(-1, *([1] * (images.ndim - 1)))
    return np.clip(images * f, 0.0, 1.0).astype(np.float32, copy=False)


def downsample_size(width: int, height: int, factor: float) -> Tuple[int, int]:
    """``(round(W / k), round(H / k))``, at least 1x1."""
    return max(1, int(round(width / factor))), max(1, int(round(height / factor)))


def downsample_image(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize an 8-bit ``(H, W)`` image to ``size = (w, h)``: INTER_AREA when shrinking,
    INTER_LINEAR when enlarging (both consistent with the pixel-centre convention)."""
    w, h = size
    if (img.shape[1], img.shape[0]) == (w, h):
        return img
    interp = cv2.INTER_AREA if (w <= img.shape[1] and h <= img.shape[0]) else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def downsample(images: np.ndarray, cams: Cameras, factor: float) -> Tuple[np.ndarray, Cameras]:
    """Downsample ``(V, H, W)`` uint8 images by ``factor`` and update the ``(V,)`` cameras
    exactly (``Cameras.resize(size=...)``: ``sx = w / W``, ``sy = h / H``)."""
    if factor == 1:
        return images, cams
    V, H, W = images.shape
    size = downsample_size(W, H, factor)
    out = np.stack([downsample_image(images[v], size) for v in range(V)])
    return out, cams.resize(size=size)
