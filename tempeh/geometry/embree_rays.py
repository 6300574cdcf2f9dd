"""Occlusion rays against a triangle mesh with Intel Embree 4, called directly and multi-threaded.

``embreex`` (the Embree binding behind ``trimesh.ray.has_embree``) holds the GIL while it traces
and builds scenes slowly: on the 5023-vertex FLAME template, constructing its scene took ~7.5
ms, a first query ~10 ms more than a repeated one (the BVH build), and 80k occlusion rays ~20 ms
on one core. This module
loads the Embree 4 library that the embreex wheel ships (``embreex.libs/libembree4*``) with
``ctypes``, builds the scene from shared float32 buffers (~2 ms) and traces the rays from a numba
kernel that releases the GIL, on the shared geometry thread pool (~9 ms on 2 cores). When the
library cannot be found or loaded, :func:`available` is False and
:mod:`tempeh.geometry.visibility` uses embreex's own API instead.

A ray ``o + t d`` (``d`` unit length) is occluded when it hits any triangle (double-sided) with
``0 <= t <= max_dist`` (``rtcOccluded1``: Embree then sets ``tfar`` to ``-inf``). Embree
computes in float32: the vertices and ray origins are shifted by the mesh's bounding-box centre
first, so the precision is ~1e-7 of the mesh size plus the ray length (far below visibility's
0.3 mm tolerance for a head).

The Embree device is created once per process (again after a fork: its threads do not survive
one); each :class:`EmbreeOccluder` owns one scene and releases it when garbage-collected.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os
import threading
from typing import Optional

import numpy as np

from tempeh.geometry._threads import default_threads, run_ranges

logger = logging.getLogger(__name__)

__all__ = ["available", "EmbreeOccluder"]

# Embree 4 enum values (rtcore_common.h / rtcore_buffer.h / rtcore_geometry.h)
_GEOMETRY_TYPE_TRIANGLE = 0
_BUFFER_TYPE_INDEX = 0
_BUFFER_TYPE_VERTEX = 1
_FORMAT_UINT3 = 0x5003
_FORMAT_FLOAT3 = 0x9003
_RAY_FLOATS = 12  # RTCRay: org xyz, tnear, dir xyz, time, tfar, mask, id, flags (48 bytes)

_LOCK = threading.Lock()
_STATE = {"tried": False, "lib": None, "kernel": None, "device": None, "pid": None}


def _library_path() -> Optional[str]:
    spec = importlib.util.find_spec("embreex")
    if spec is None or spec.origin is None:
        return None
    pkg = os.path.dirname(spec.origin)
    for folder in (os.path.join(pkg, "..", "embreex.libs"), os.path.join(pkg, "..", "embreex.dylibs"), pkg):
        hits = sorted(glob.glob(os.path.join(folder, "libembree4*")))
        if hits:
            return os.path.abspath(hits[0])
    return None


def _bind(lib: ctypes.CDLL) -> None:
    """Prototypes (pointers and handles as 64-bit integers)."""
    u64, i32, u32, size = ctypes.c_uint64, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
    protos = {
        "rtcNewDevice": (u64, [ctypes.c_char_p]),
        "rtcGetDeviceError": (i32, [u64]),
        "rtcNewScene": (u64, [u64]),
        "rtcNewGeometry": (u64, [u64, i32]),
        "rtcSetSharedGeometryBuffer": (None, [u64, i32, u32, i32, u64, size, size, size]),
        "rtcCommitGeometry": (None, [u64]),
        "rtcAttachGeometry": (u32, [u64, u64]),
        "rtcReleaseGeometry": (None, [u64]),
        "rtcCommitScene": (None, [u64]),
        "rtcReleaseScene": (None, [u64]),
        "rtcOccluded1": (None, [u64, u64, u64]),
    }
    for name, (res, args) in protos.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args


def _make_kernel(occluded1):
    from numba import njit

    @njit(nogil=True)
    def kernel(scene, org, dirs, tfar, out, start, stop, rayf, rayu):
        """Rays ``start:stop``: ``out[r] = occluded``; ``rayf``/``rayu``: one 16-byte aligned
        RTCRay as float32 and uint32 views of the same memory (per worker)."""
        addr = rayf.ctypes.data
        for r in range(start, stop):
            rayf[0], rayf[1], rayf[2], rayf[3] = org[r, 0], org[r, 1], org[r, 2], 0.0
            rayf[4], rayf[5], rayf[6], rayf[7] = dirs[r, 0], dirs[r, 1], dirs[r, 2], 0.0
            rayf[8] = tfar[r]
            rayu[9], rayu[10], rayu[11] = 0xFFFFFFFF, 0, 0  # mask, id, flags
            occluded1(scene, addr, 0)
            out[r] = rayf[8] < 0.0  # -inf after a hit
    return kernel


def _load() -> bool:
    """Load the library and compile the kernel once per process (thread-safe)."""
    with _LOCK:
        if not _STATE["tried"]:
            _STATE["tried"] = True
            try:
                path = _library_path()
                if path is None:
                    raise OSError("no libembree4 beside the embreex package")
                lib = ctypes.CDLL(path)
                _bind(lib)
                _STATE["kernel"] = _make_kernel(lib.rtcOccluded1)
                _STATE["lib"] = lib
                logger.debug("Embree 4 loaded from %s", path)
            except Exception as exc:  # missing embreex/numba, another Embree major version
                logger.info("direct Embree path unavailable (%s); visibility uses embreex's API", exc)
        return _STATE["lib"] is not None


def available() -> bool:
    """True when the bundled Embree 4 library and numba are usable."""
    return _load()


def _device(lib) -> int:
    with _LOCK:
        if _STATE["device"] is None or _STATE["pid"] != os.getpid():
            dev = lib.rtcNewDevice(None)
            if not dev:
                raise RuntimeError("Embree: rtcNewDevice failed")
            _STATE["device"], _STATE["pid"] = dev, os.getpid()
        return _STATE["device"]


def _aligned_ray() -> np.ndarray:
    buf = np.zeros(_RAY_FLOATS + 16, dtype=np.float32)
    off = (-buf.ctypes.data % 64) // 4
    return buf[off: off + _RAY_FLOATS]


class EmbreeOccluder:
    """One Embree scene of a triangle mesh for occlusion queries.

    Args:
        verts: ``(N, 3)`` vertices (mm; float64 recommended), validated by the caller (finite).
        faces: ``(F, 3)`` integer vertex indices in ``[0, N)``, validated by the caller.
    """

    def __init__(self, verts: np.ndarray, faces: np.ndarray):
        if not _load():
            raise RuntimeError("Embree 4 (bundled with embreex) is not available")
        lib = _STATE["lib"]
        self._lib = lib
        verts = np.asarray(verts, dtype=np.float64)
        self.origin = 0.5 * (verts.min(0) + verts.max(0))
        # shared buffers must outlive the scene; Embree reads vertices with 16-byte loads, so the
        # vertex buffer gets one float of padding
        self._v = np.zeros(verts.shape[0] * 3 + 1, dtype=np.float32)
        self._v[:-1] = (verts - self.origin).ravel()
        self._f = np.ascontiguousarray(faces, dtype=np.uint32)
        dev = _device(lib)
        self._scene = 0
        scene = lib.rtcNewScene(dev)
        geom = lib.rtcNewGeometry(dev, _GEOMETRY_TYPE_TRIANGLE)
        lib.rtcSetSharedGeometryBuffer(geom, _BUFFER_TYPE_VERTEX, 0, _FORMAT_FLOAT3, self._v.ctypes.data, 0, 12,
                                       verts.shape[0])
        lib.rtcSetSharedGeometryBuffer(geom, _BUFFER_TYPE_INDEX, 0, _FORMAT_UINT3, self._f.ctypes.data, 0, 12,
                                       self._f.shape[0])
        lib.rtcCommitGeometry(geom)
        lib.rtcAttachGeometry(scene, geom)
        lib.rtcReleaseGeometry(geom)
        lib.rtcCommitScene(scene)
        self._scene = scene
        err = lib.rtcGetDeviceError(dev)
        if err != 0:
            raise RuntimeError(f"Embree: building the scene failed (RTCError {err})")

    def occluded(self, origins: np.ndarray, dirs: np.ndarray, max_dist: np.ndarray,
                 num_threads: Optional[int] = None) -> np.ndarray:
        """Any hit with ``0 <= t <= max_dist``: ``(R,)`` bool.

        Args:
            origins: ``(R, 3)`` mm, same frame as the mesh; dirs: ``(R, 3)`` unit directions;
            max_dist: ``(R,)`` mm, >= 0.
            num_threads: worker threads (default: ``torch.get_num_threads()``).
        """
        org = np.ascontiguousarray(np.asarray(origins, dtype=np.float64) - self.origin, dtype=np.float32)
        d = np.ascontiguousarray(dirs, dtype=np.float32)
        tfar = np.ascontiguousarray(max_dist, dtype=np.float32)
        out = np.zeros(org.shape[0], dtype=np.bool_)
        n_threads = default_threads() if num_threads is None else max(int(num_threads), 1)
        rays = [_aligned_ray() for _ in range(max(1, min(n_threads, org.shape[0])))]
        kernel = _STATE["kernel"]
        run_ranges(lambda a, b, t: kernel(self._scene, org, d, tfar, out, a, b, rays[t], rays[t].view(np.uint32)),
                   org.shape[0], n_threads, align=256)
        return out

    def __del__(self):
        if getattr(self, "_scene", 0):
            self._lib.rtcReleaseScene(self._scene)
            self._scene = 0
