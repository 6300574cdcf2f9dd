"""Optional temporal smoothing of a registered mesh sequence (off by default).

TEMPEH registers every frame independently, so consecutive meshes jitter a little. This module
low-passes every vertex trajectory over time with a normalised, sampled Gaussian::

    y[t] = sum_{k=-r..r} w_k x[t + k],     w_k = exp(-k^2 / (2 sigma^2)) / Z,   r = ceil(truncate * sigma)

``sigma`` is in FRAMES (not seconds). Samples outside ``0 .. T-1`` come from reflection:

* ``"reflect"`` (default; even, half-sample symmetric like ``scipy.ndimage`` ``reflect``):
  ``x[-1] = x[0], x[-2] = x[1], ...``. The end frames are smoothed too, but a moving vertex
  is pulled towards "at rest" within about ``r`` frames of either end.
* ``"odd"`` (point reflection through the end sample): ``x[-k] = 2 x[0] - x[k]``. Motion at
  constant velocity is reproduced exactly up to the ends, and the end frames themselves are
  NOT smoothed (``y[0] = x[0]``).

Trade-off (document it to users; see ``USER-NEEDS.md`` E1, E5): the filter is linear and
symmetric, so it leaves constant-velocity motion unchanged (away from the ends for
``reflect``) and adds no delay, but it attenuates everything faster than about ``1 / sigma``
frames: white per-frame noise of std ``s`` drops to ``s * sqrt(sum w_k^2)`` and the jitter
(:func:`tempeh.eval.metrics.jitter`, mean norm of the second difference) by the factor
:func:`expected_noise_jitter_ratio`; a fast expression (a blink, a lip closure lasting a few
frames) is flattened and smeared over about ``+-2 sigma`` frames. ``sigma`` of 0.5 .. 1 frame
removes most frame-to-frame noise at 60 fps while keeping visemes; larger values lag visibly.
Report the jitter before and after next to accuracy so the trade-off is visible.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MODES", "gaussian_weights", "smooth_sequence", "expected_noise_jitter_ratio"]

#: edge handling modes of :func:`smooth_sequence`.
MODES = ("reflect", "odd")


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised sampled Gaussian ``(2r + 1,)`` float64, ``r = ceil(truncate * sigma)``
    (``[1.0]`` for ``sigma == 0``)."""
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0 (frames), got {sigma!r}")
    if not truncate > 0:
        raise ValueError(f"truncate must be > 0, got {truncate!r}")
    if sigma == 0:
        return np.ones(1)
    r = max(1, int(math.ceil(truncate * sigma)))
    k = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    return w / w.sum()


def smooth_sequence(verts, sigma: float, mode: str = "reflect", truncate: float = 4.0,
                    vertex_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Gaussian smoothing of vertex trajectories over time (module docstring).

    Args:
        verts: ``(T, N, 3)`` vertices of consecutive frames (any unit; returned in the same).
        sigma: Gaussian standard deviation in frames; 0 returns a copy.
        mode: edge handling, ``"reflect"`` (even) or ``"odd"`` (point reflection).
        truncate: kernel radius in sigmas.
        vertex_weights: optional ``(N,)`` in [0, 1]: per-vertex blend between the input (0)
            and the smoothed trajectory (1), e.g. a region mask that leaves the lips alone.
    Returns:
        ``(T, N, 3)`` float64.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    x = np.asarray(verts, dtype=np.float64)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"verts must be (T, N, 3), got {x.shape}")
    T = x.shape[0]
    w = gaussian_weights(sigma, truncate)
    if T < 2 or w.size == 1:
        return x.copy()
    r = w.size // 2
    # np.pad reflects repeatedly when r > T - 1, which is what an infinite reflection gives
    # (even: numpy "symmetric" = the edge sample repeated; odd: numpy "reflect" + "odd" =
    # 2 x[0] - x[k] about the edge sample)
    if mode == "odd":
        pad = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect", reflect_type="odd")
    else:
        pad = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="symmetric")
    y = np.zeros_like(x)
    for k, wk in enumerate(w):  # 2r+1 taps, each vectorised over (T, N, 3)
        y += wk * pad[k:k + T]
    if vertex_weights is not None:
        a = np.asarray(vertex_weights, dtype=np.float64).reshape(1, -1, 1)
        if a.shape[1] != x.shape[1]:
            raise ValueError(f"vertex_weights has {a.shape[1]} entries for {x.shape[1]} vertices")
        y = x + np.clip(a, 0.0, 1.0) * (y - x)
    return y


def expected_noise_jitter_ratio(sigma: float, truncate: float = 4.0) -> float:
    """Jitter after / before smoothing for i.i.d. Gaussian per-frame noise (interior frames).

    The second difference of white noise of std ``s`` has std ``s sqrt(6)`` per coordinate;
    after the filter it is ``s * ||D w||`` with ``D w`` the kernel convolved with
    ``[1, -2, 1]``. The norm of a 3-D Gaussian vector scales with its std, so the jitter
    ratio is ``||D w|| / sqrt(6)``.
    """
    w = gaussian_weights(sigma, truncate)
    d = np.convolve(w, [1.0, -2.0, 1.0])
    return float(np.sqrt((d ** 2).sum() / 6.0))
