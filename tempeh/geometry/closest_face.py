"""Exact closest-triangle query on CPU: a uniform grid over the mesh's triangles, in numba.

For every query point the index of the closest triangle of a mesh and the squared distance to
it (closest point ON the triangle), exact up to float64 rounding: the search stops only when a
provable lower bound on the distance of every unvisited triangle is no smaller than the best
distance found. It is the ``"grid"`` backend of
:func:`tempeh.geometry.point_to_surface.closest_faces` (the default on CPU).

Build (per call, because the vertices change at every training step; O(F + cells), serial;
phase 1 :func:`_grid_shape` sizes the grid, phase 2 :func:`_build_into` fills it):

1. Per triangle a record: bounding box, unit normal and plane offset, vertices, inverse squared
   edge lengths (:class:`TriangleGrid`). The grid spans the union of the bounding boxes
   (vertices used by no face are ignored).
2. Cell size ``h = cell_scale * mean edge length`` (``cell_scale`` defaults to
   :data:`DEFAULT_CELL_SCALE` = 1: on the FLAME template, 5.1 mm cells, 42 x 63 x 45 of them; the
   benchmark's points, within a few mm of the surface where vertices are dense, visit ~4.3
   cells each (~5 triangles per non-empty cell on average, far more in the dense eye and mouth
   regions); of 0.6, 0.7, 0.8 and 1.0, 1.0 was fastest, by 3-15 %). ``h`` grows by x1.5 while the grid would hold more than ``max(64 F, 4096)``
   cells or the triangles' bounding boxes would cover more than that many cells in total, so
   meshes with very uneven triangle sizes (a few huge triangles among tiny ones) or far-apart
   parts stay O(F) in memory. A mesh collapsed onto one point gets a single cell.
3. The triangles are sorted along the Morton (Z) curve of their centroid's cell (nearby in space
   = nearby in memory), and every triangle is registered in each cell of its bounding box
   (widened by ``1e-7 h`` against rounding) that its plane meets; CSR arrays ``cell_start``,
   ``cell_tris`` (int32).

Query (points sorted along the same Morton curve; ``num_threads`` Python threads run disjoint
ranges of them, the numba kernel releasing the GIL):

* Start at the cell holding the point, its coordinates clamped to the grid (so points outside
  the grid start at the nearest boundary cell), and visit Chebyshev shells of cells
  ``r = 0, 1, 2, ...`` around it. Before shell ``r`` the lower bound
  ``LB_r = min over axes a and sides s of dist(p, slab of cells at offset r on side s of a)``
  (with the exact distance of ``p`` to the grid along the other axes) bounds the distance of
  every cell in shells ``>= r``; the search stops when ``LB_r^2 >= best``. A far point (1e4 mm
  away) is therefore still exact; it may scan most of the grid (O(cells), still fast).
* A cell is skipped when its box is no closer than the best distance, and a triangle when the
  larger of its bounding-box and plane distances is no closer (the plane bound shrunk by a
  relative 1e-9 against rounding). The remaining triangles get the exact float64
  point-triangle distance: the minimum of the plane distance (when the projection falls inside)
  and the distances to the 3 closed edges, branch-free. Degenerate triangles
  (``|ab x ac|^2 <= eps |ab|^2 |ac|^2``, the criterion of
  :func:`tempeh.geometry.point_to_surface.point_triangle_distance_sq`) have only the 3 edges.
* The first triangle tried is the previous point's answer (the seed restarts every 64 points,
  so results do not depend on the thread count), then the own cell's triangle with the smallest
  lower bound: a tight first upper bound prunes most of the rest. The own cell's bounds are kept
  for its remaining triangles, and a per-point stamp skips triangles already tested in an
  earlier cell (a triangle is registered in ~5 cells; on the FLAME benchmark this halved the
  exact evaluations per point, 13 -> 6.5).
* Optionally (``with_closest``) the closest point on the winning triangle, from the same 4
  candidates: its barycentric weights and ``p - q``; ``point_to_surface`` differentiates with
  them instead of re-solving the point-triangle problem in torch, its backward scattering the
  gradients in numba (:func:`envelope_grads`; 2-4 ms less per 20k-point forward + backward
  than torch's gather/``index_add_``, in interleaved runs on the 2-core machine).
* Ties (equidistant triangles, e.g. a closest point on a shared edge) return one of them.

Buffers: :func:`closest_faces_grid` builds into per-thread work arrays kept between calls
(see :class:`_Buffers`: fresh multi-MB arrays cost ~900 page faults, ~3 ms, per build on the
development VM); :func:`build_triangle_grid` returns a grid with arrays of its own.

Cost: the first call in a fresh environment JIT-compiles the kernels (~30 s on the 2-core
development machine); ``cache=True`` stores the machine code in ``__pycache__`` beside this file
(or ``NUMBA_CACHE_DIR``), so later processes only load it (~1-3 s including ``import numba``).
The small per-triangle and per-cell helpers are inlined at numba IR level
(``inline="always"``): measured ~12 % less query time than leaving the calls to LLVM, for a
slower first compile. On the 2-core machine, 20k points within a few mm of the FLAME template
(9976 faces) cost ~1.2-1.4 us of CPU per point on one thread; build ~2 ms. The geometry
benchmark's query (incl. build, 2 threads) took 17-21 ms against libigl's 49-59 ms.

Threads: :mod:`tempeh.geometry._threads` (a plain Python pool, dynamically claimed ranges).
``numba.prange`` was measured to slow torch's CPU kernels in the same process (exact torch part
7 ms -> 230 ms: numba's OpenMP workers kept spinning).

Units: whatever the inputs use (mm in tempeh); ``dist_sq`` is in unit^2.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import NamedTuple, Optional, Tuple

import numpy as np

from tempeh.geometry._threads import default_threads, run_ranges

try:  # numba is a declared dependency; keep the module importable without it for clear errors
    from numba import njit

    NUMBA_AVAILABLE = True
except Exception:  # pragma: no cover - exercised only without numba
    NUMBA_AVAILABLE = False

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        if args and callable(args[0]):
            return args[0]
        return lambda f: f


logger = logging.getLogger(__name__)

__all__ = [
    "TriangleGrid",
    "build_triangle_grid",
    "query_triangle_grid",
    "closest_faces_grid",
    "envelope_grads",
    "DEFAULT_CELL_SCALE",
    "NUMBA_AVAILABLE",
]

#: Grid cell size in units of the mean edge length (see the module docstring).
DEFAULT_CELL_SCALE = 1.0

_REC = 24  # floats per triangle record
# The plane bound is shrunk by a relative 1e-9 so that rounding (unit normal, offset) can never
# make it exceed the true distance.
_PLANE_SAFETY = 1.0 - 1e-9
_CHUNK = 64  # points per parallel task; the previous answer seeds the next query


class TriangleGrid(NamedTuple):
    """A uniform grid over the bounding boxes of a mesh's triangles (from :func:`build_triangle_grid`).

    The triangles are stored in Morton (Z-curve) order of their centroid's cell, so triangles
    that are close in space are close in memory.

    Attributes:
        origin: ``(3,)`` float64, minimum corner of the grid (unit of the vertices).
        h: cell edge length (unit of the vertices).
        dims: ``(3,)`` int64 number of cells along x, y, z; cell ``(i, j, k)`` has linear index
            ``(i * dims[1] + j) * dims[2] + k`` and spans ``origin + [i, i + 1) * h`` etc.
        cell_start: ``(cells + 1,)`` int32 CSR offsets into ``cell_tris``.
        cell_tris: ``(entries,)`` int32 rows of ``rec`` registered in each cell.
        rec: ``(F, 24)`` float64 per triangle (sorted): bounding box ``min xyz, max xyz`` (0-5),
            unit normal (6-8) and plane offset ``n . a`` (9), vertices ``a, b, c`` (10-18),
            ``|ab x ac|`` (19; 0 for degenerate triangles, which are treated as their 3 edges and
            have normal 0), ``1 / |ab|^2, 1 / |ac|^2, 1 / |bc|^2`` (20-22; 0 for zero length), pad.
        face_id: ``(F,)`` int64 original face index of every row of ``rec``.
    """

    origin: np.ndarray
    h: float
    dims: np.ndarray
    cell_start: np.ndarray
    cell_tris: np.ndarray
    rec: np.ndarray
    face_id: np.ndarray


# ----------------------------------------------------------------------------- numba kernels


@njit(cache=True, nogil=True, inline="always")
def _segment_td2(qx, qy, qz, ex, ey, ez, inv_ee):
    """Closest point ``o + t e, t in [0, 1]`` of a segment to ``o + q``: ``(t, squared
    distance)``; ``inv_ee`` is ``1 / |e|^2`` (0 for a zero-length segment, which then is the
    point ``o``, ``t = 0``)."""
    t = min(max((qx * ex + qy * ey + qz * ez) * inv_ee, 0.0), 1.0)
    dx, dy, dz = qx - t * ex, qy - t * ey, qz - t * ez
    return t, dx * dx + dy * dy + dz * dz


@njit(cache=True, nogil=True, inline="always")
def _candidates(px, py, pz, rec, f):
    """The 4 candidates for the closest point of triangle ``rec[f]`` (see :class:`TriangleGrid`)
    to p, without branches (no mispredicted Voronoi-region branches):

    * ``d_in``: the squared plane distance when p's projection falls inside the triangle (signs
      of the 3 sub-triangle areas ``wa, wb, wc``, twice the areas along the unit normal, which
      divided by ``nlen`` are its barycentrics), else ``inf``; degenerate triangles
      (``nlen = 0`` in the record) have no interior candidate;
    * ``(t, d)`` for the closed edges ab, ac, bc (clamped parameters reach the vertex regions).

    Where regions meet the candidates agree. Records are indexed in place: a row view would
    cost reference-count updates per call.
    """
    ax, ay, az = rec[f, 10], rec[f, 11], rec[f, 12]
    bx, by, bz = rec[f, 13], rec[f, 14], rec[f, 15]
    nx, ny, nz, nlen = rec[f, 6], rec[f, 7], rec[f, 8], rec[f, 19]
    abx, aby, abz = bx - ax, by - ay, bz - az
    acx, acy, acz = rec[f, 16] - ax, rec[f, 17] - ay, rec[f, 18] - az
    apx, apy, apz = px - ax, py - ay, pz - az
    bpx, bpy, bpz = px - bx, py - by, pz - bz
    wc = (aby * apz - abz * apy) * nx + (abz * apx - abx * apz) * ny + (abx * apy - aby * apx) * nz
    wb = (apy * acz - apz * acy) * nx + (apz * acx - apx * acz) * ny + (apx * acy - apy * acx) * nz
    wa = nlen - wb - wc
    h = apx * nx + apy * ny + apz * nz
    d_in = h * h if (wa >= 0.0) & (wb >= 0.0) & (wc >= 0.0) & (nlen > 0.0) else np.inf
    t_ab, d_ab = _segment_td2(apx, apy, apz, abx, aby, abz, rec[f, 20])
    t_ac, d_ac = _segment_td2(apx, apy, apz, acx, acy, acz, rec[f, 21])
    t_bc, d_bc = _segment_td2(bpx, bpy, bpz, rec[f, 16] - bx, rec[f, 17] - by, rec[f, 18] - bz, rec[f, 22])
    return d_in, wa, wb, wc, nlen, t_ab, d_ab, t_ac, d_ac, t_bc, d_bc


@njit(cache=True, nogil=True, inline="always")
def _point_triangle_d2(px, py, pz, rec, f):
    """Exact squared distance from p to the triangle of record ``rec[f]``: the smallest of the
    4 candidates of :func:`_candidates`."""
    d_in, _, _, _, _, _, d_ab, _, d_ac, _, d_bc = _candidates(px, py, pz, rec, f)
    return min(min(d_in, d_ab), min(d_ac, d_bc))


@njit(cache=True, nogil=True)
def _write_closest(px, py, pz, rec, f, out_w, out_diff, n):
    """The closest point ``q`` of triangle ``rec[f]`` to p, the winner of the candidates of
    :func:`_candidates` (interior, edges ab, ac, bc): its barycentric weights (of the record's
    vertices a, b, c, i.e. the face's vertices in order) to ``out_w[n]`` and ``p - q`` to
    ``out_diff[n]``."""
    d_in, wa, wb, wc, nlen, t_ab, d_ab, t_ac, d_ac, t_bc, d_bc = _candidates(px, py, pz, rec, f)
    best = d_in
    if d_in < np.inf:  # finite only inside a non-degenerate triangle
        out_w[n, 0], out_w[n, 1], out_w[n, 2] = wa / nlen, wb / nlen, wc / nlen
    if d_ab < best:
        best = d_ab
        out_w[n, 0], out_w[n, 1], out_w[n, 2] = 1.0 - t_ab, t_ab, 0.0
    if d_ac < best:
        best = d_ac
        out_w[n, 0], out_w[n, 1], out_w[n, 2] = 1.0 - t_ac, 0.0, t_ac
    if d_bc < best:
        out_w[n, 0], out_w[n, 1], out_w[n, 2] = 0.0, 1.0 - t_bc, t_bc
    w0, w1, w2 = out_w[n, 0], out_w[n, 1], out_w[n, 2]
    out_diff[n, 0] = px - (w0 * rec[f, 10] + w1 * rec[f, 13] + w2 * rec[f, 16])
    out_diff[n, 1] = py - (w0 * rec[f, 11] + w1 * rec[f, 14] + w2 * rec[f, 17])
    out_diff[n, 2] = pz - (w0 * rec[f, 12] + w1 * rec[f, 15] + w2 * rec[f, 18])


@njit(cache=True, nogil=True)
def _write_record(verts, faces, fo, rec, m):
    """Fill ``rec[m]`` (see :class:`TriangleGrid`) with the record of face ``fo``."""
    for k in range(3):
        v = faces[fo, k]
        for d in range(3):
            rec[m, 10 + 3 * k + d] = verts[v, d]
    for d in range(3):
        rec[m, d] = min(rec[m, 10 + d], min(rec[m, 13 + d], rec[m, 16 + d]))
        rec[m, 3 + d] = max(rec[m, 10 + d], max(rec[m, 13 + d], rec[m, 16 + d]))
    ax, ay, az = rec[m, 10], rec[m, 11], rec[m, 12]
    abx, aby, abz = rec[m, 13] - ax, rec[m, 14] - ay, rec[m, 15] - az
    acx, acy, acz = rec[m, 16] - ax, rec[m, 17] - ay, rec[m, 18] - az
    bcx, bcy, bcz = rec[m, 16] - rec[m, 13], rec[m, 17] - rec[m, 14], rec[m, 18] - rec[m, 15]
    nx = aby * acz - abz * acy
    ny = abz * acx - abx * acz
    nz = abx * acy - aby * acx
    ab2 = abx * abx + aby * aby + abz * abz
    ac2 = acx * acx + acy * acy + acz * acz
    bc2 = bcx * bcx + bcy * bcy + bcz * bcz
    nn = nx * nx + ny * ny + nz * nz
    # same criterion as point_to_surface._point_triangle (sin^2 of the angle at a <= eps)
    if nn > 2.220446049250313e-16 * ab2 * ac2:
        nlen = math.sqrt(nn)
        nx, ny, nz = nx / nlen, ny / nlen, nz / nlen
    else:  # degenerate: no plane (bound 0), only the 3 edges
        nlen, nx, ny, nz = 0.0, 0.0, 0.0, 0.0
    rec[m, 6], rec[m, 7], rec[m, 8] = nx, ny, nz
    rec[m, 9] = nx * ax + ny * ay + nz * az
    rec[m, 19] = nlen
    rec[m, 20] = 1.0 / ab2 if ab2 > 0.0 else 0.0
    rec[m, 21] = 1.0 / ac2 if ac2 > 0.0 else 0.0
    rec[m, 22] = 1.0 / bc2 if bc2 > 0.0 else 0.0
    rec[m, 23] = 0.0


@njit(cache=True, nogil=True)
def _face_box(verts, faces, f, d):
    """Extent ``(min, max)`` of face ``f`` along axis ``d``."""
    x, y, z = verts[faces[f, 0], d], verts[faces[f, 1], d], verts[faces[f, 2], d]
    return min(x, min(y, z)), max(x, max(y, z))


@njit(cache=True, nogil=True)
def _dist3(verts, i, j):
    dx, dy, dz = verts[i, 0] - verts[j, 0], verts[i, 1] - verts[j, 1], verts[i, 2] - verts[j, 2]
    return math.sqrt(dx * dx + dy * dy + dz * dz)


@njit(cache=True, nogil=True, inline="always")
def _lower_bound(px, py, pz, rec, f):
    """Lower bound of the squared distance from p to the triangle of record ``rec[f]``: the larger
    of the squared distances to its bounding box and to its plane (branch-free)."""
    dx = max(max(rec[f, 0] - px, px - rec[f, 3]), 0.0)
    dy = max(max(rec[f, 1] - py, py - rec[f, 4]), 0.0)
    dz = max(max(rec[f, 2] - pz, pz - rec[f, 5]), 0.0)
    h = rec[f, 6] * px + rec[f, 7] * py + rec[f, 8] * pz - rec[f, 9]
    return max(dx * dx + dy * dy + dz * dz, h * h * _PLANE_SAFETY)


@njit(cache=True, nogil=True, inline="always")
def _clamped_cell(x, origin, h, n):
    i = int(math.floor((x - origin) / h))
    return min(max(i, 0), n - 1)


@njit(cache=True, nogil=True)
def _spread3(x):
    """Spread the low 21 bits of ``x`` to every third bit (for Morton codes)."""
    x &= 0x1FFFFF
    x = (x | (x << 32)) & 0x1F00000000FFFF
    x = (x | (x << 16)) & 0x1F0000FF0000FF
    x = (x | (x << 8)) & 0x100F00F00F00F00F
    x = (x | (x << 4)) & 0x10C30C30C30C30C3
    x = (x | (x << 2)) & 0x1249249249249249
    return x


@njit(cache=True, nogil=True)
def _morton(i, j, k):
    return (_spread3(np.int64(i)) << 2) | (_spread3(np.int64(j)) << 1) | _spread3(np.int64(k))


@njit(cache=True, nogil=True)
def _radix_argsort(keys, nbits, order, tmp):
    """Stable argsort of non-negative int64 ``keys`` < 2**nbits (LSD radix sort, 8-bit digits)
    into the caller's buffers ``order`` and ``tmp`` (same length as ``keys``); the permutation
    ends in ``order``."""
    n = keys.shape[0]
    for m in range(n):
        order[m] = m
    out = order
    count = np.empty(257, dtype=np.int64)
    shift = 0
    while shift < nbits:
        count[:] = 0
        for m in range(n):
            count[((keys[out[m]] >> shift) & 255) + 1] += 1
        for b in range(256):
            count[b + 1] += count[b]
        for m in range(n):
            d = (keys[out[m]] >> shift) & 255
            tmp[count[d]] = out[m]
            count[d] += 1
        out, tmp = tmp, out
        shift += 8
    if out is not order:
        order[:] = out


@njit(cache=True, nogil=True)
def _morton_order(xyz, origin, h, nx, ny, nz, nbits, keys, order, tmp):
    """Permutation (in ``order``) sorting the rows of ``xyz (n, 3)`` by the Morton code of their
    clamped cell; ``keys``, ``order``, ``tmp``: int64 buffers of length ``n``."""
    for m in range(xyz.shape[0]):
        keys[m] = _morton(_clamped_cell(xyz[m, 0], origin[0], h, nx),
                          _clamped_cell(xyz[m, 1], origin[1], h, ny),
                          _clamped_cell(xyz[m, 2], origin[2], h, nz))
    _radix_argsort(keys, nbits, order, tmp)


@njit(cache=True, nogil=True)
def _cell_range(lo, hi, origin, h, n):
    """Clamped cell indices [i0, i1] overlapped by the interval [lo, hi] (widened by 1e-7 h)."""
    pad = 1e-7 * h
    i0 = int(math.floor((lo - pad - origin) / h))
    i1 = int(math.floor((hi + pad - origin) / h))
    i0 = min(max(i0, 0), n - 1)
    i1 = min(max(i1, i0), n - 1)
    return i0, i1


@njit(cache=True, nogil=True)
def _plane_hits_cell(rec, f, origin, h, i, j, k):
    """Whether the plane of triangle ``f`` meets cell (i, j, k), widened by 1e-6 h (always true
    for degenerate triangles, whose normal is 0)."""
    cx = origin[0] + (i + 0.5) * h
    cy = origin[1] + (j + 0.5) * h
    cz = origin[2] + (k + 0.5) * h
    nx, ny, nz = rec[f, 6], rec[f, 7], rec[f, 8]
    reach = (0.5 + 1e-6) * h * (abs(nx) + abs(ny) + abs(nz)) + 1e-6 * h
    return abs(nx * cx + ny * cy + nz * cz - rec[f, 9]) <= reach


@njit(cache=True, nogil=True)
def _fill_cells(rec, origin, h, nx, ny, nz, cell_start, pair_cell, pair_tri, cell_tris):
    """CSR cell lists: triangle ``f`` goes into every cell of its (widened) bounding box that its
    plane meets. Writes ``cell_start (cells + 1,)`` and the first ``entries`` of ``cell_tris``;
    ``pair_cell``, ``pair_tri``, ``cell_tris`` hold at least the bounding boxes' cell count (the
    ``bound`` of :func:`_grid_shape`). Returns ``entries``."""
    F = rec.shape[0]
    ncell = nx * ny * nz
    cell_start[:] = 0
    # one pass collecting (cell, triangle) pairs, then a counting sort by cell
    total = 0
    for f in range(F):
        i0, i1 = _cell_range(rec[f, 0], rec[f, 3], origin[0], h, nx)
        j0, j1 = _cell_range(rec[f, 1], rec[f, 4], origin[1], h, ny)
        k0, k1 = _cell_range(rec[f, 2], rec[f, 5], origin[2], h, nz)
        for i in range(i0, i1 + 1):
            for j in range(j0, j1 + 1):
                base = (i * ny + j) * nz
                for k in range(k0, k1 + 1):
                    if _plane_hits_cell(rec, f, origin, h, i, j, k):
                        pair_cell[total] = base + k
                        pair_tri[total] = f
                        total += 1
    for e in range(total):
        cell_start[pair_cell[e] + 1] += 1
    for c in range(ncell):
        cell_start[c + 1] += cell_start[c]
    for e in range(total):  # stable: each cell's list stays in (Morton) triangle order
        c = pair_cell[e]
        cell_tris[cell_start[c]] = pair_tri[e]
        cell_start[c] += 1
    for c in range(ncell, 0, -1):  # undo the shift of the fill cursor
        cell_start[c] = cell_start[c - 1]
    cell_start[0] = 0
    return total


@njit(cache=True, nogil=True)
def _grid_shape(verts, faces, cell_scale, cap):
    """Build phase 1 (see the module docstring): ``(origin (3,), h, dims (3,), bound)``, where
    ``bound`` is the number of cells covered by the triangles' bounding boxes (the size of the
    fill buffers)."""
    F = faces.shape[0]
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    edge_sum = 0.0
    for f in range(F):
        for d in range(3):
            a, b = _face_box(verts, faces, f, d)
            lo[d] = min(lo[d], a)
            hi[d] = max(hi[d], b)
        edge_sum += (_dist3(verts, faces[f, 0], faces[f, 1]) + _dist3(verts, faces[f, 0], faces[f, 2])
                     + _dist3(verts, faces[f, 1], faces[f, 2]))
    mean_edge = edge_sum / (3.0 * F)
    size = max(hi[0] - lo[0], max(hi[1] - lo[1], hi[2] - lo[2]))
    dims = np.ones(3, dtype=np.int64)
    if size <= 0.0:  # every triangle collapsed onto one point: a single cell
        h = 1.0
    else:
        h = cell_scale * mean_edge if mean_edge > 0.0 else size
        h = max(h, size * 1e-6)  # bounded cell count per axis even for tiny triangles
    while True:
        ncell = 1
        for d in range(3):
            dims[d] = max(int(math.ceil((hi[d] - lo[d]) / h)), 1)
            ncell *= dims[d]
        if ncell <= cap:
            bound = 0
            for f in range(F):
                cells = 1
                for d in range(3):
                    a, b = _face_box(verts, faces, f, d)
                    i0, i1 = _cell_range(a, b, lo[d], h, dims[d])
                    cells *= i1 - i0 + 1
                bound += cells
            if bound <= cap:
                return lo, h, dims, bound
        h *= 1.5


@njit(cache=True, nogil=True)
def _build_into(verts, faces, origin, h, dims, rec, face_id, cen, keys, tmp, cell_start, pair_cell,
                pair_tri, cell_tris):
    """Build phase 2 into the caller's buffers: triangles in Morton order of their centroid's
    cell (``face_id``), their records, the cell lists. Returns the number of cell entries."""
    F = faces.shape[0]
    for f in range(F):
        for d in range(3):
            cen[f, d] = (verts[faces[f, 0], d] + verts[faces[f, 1], d] + verts[faces[f, 2], d]) / 3.0
    _morton_order(cen, origin, h, dims[0], dims[1], dims[2], _morton_bits(dims), keys, face_id, tmp)
    for m in range(F):
        _write_record(verts, faces, face_id[m], rec, m)
    return _fill_cells(rec, origin, h, dims[0], dims[1], dims[2], cell_start, pair_cell, pair_tri, cell_tris)


@njit(cache=True, nogil=True)
def _morton_bits(dims):
    """Number of bits of the Morton codes of a grid with ``dims`` cells (3 per level)."""
    m = max(dims[0], max(dims[1], dims[2]))
    bits = 1
    while (1 << bits) < m:
        bits += 1
    return 3 * bits


@njit(cache=True, nogil=True, inline="always")
def _axis_dist(p, origin, h, i):
    """Distance along one axis from coordinate p to the cell interval [origin + i h, origin + (i+1) h]."""
    lo = origin + i * h
    return max(max(lo - p, p - (lo + h)), 0.0)


@njit(cache=True, nogil=True, inline="always")
def _slab_d2(p, origin, h, i, n, other_d2):
    """Squared distance bound to the slab of cells at index ``i`` along one axis (``inf`` when
    ``i`` is outside ``[0, n)``): the axis distance squared plus ``other_d2``, the squared
    distance to the grid along the other two axes."""
    if i < 0 or i >= n:
        return np.inf
    d = _axis_dist(p, origin, h, i)
    return d * d + other_d2


@njit(cache=True, nogil=True, inline="always")
def _visit_cell(px, py, pz, c, cell_start, cell_tris, rec, best, best_f, stamp, qid):
    for e in range(cell_start[c], cell_start[c + 1]):
        f = cell_tris[e]
        if stamp[f] == qid:  # already tested for this point (registered in an earlier cell)
            continue
        stamp[f] = qid
        if _lower_bound(px, py, pz, rec, f) >= best:  # cheap test first
            continue
        d = _point_triangle_d2(px, py, pz, rec, f)
        if d < best or (d == best and f < best_f):
            best = d
            best_f = f
    return best, best_f


@njit(cache=True, nogil=True)
def _query_one(px, py, pz, seed_f, nx, ny, nz, ox, oy, oz, h, cell_start, cell_tris, rec, stamp, qid, lbs):
    """Closest record of one point (see the module docstring): ``(row, dist_sq)``.

    ``seed_f`` (or -1) is tested first: the answer of the previous point in Morton order, whose
    distance is a tight initial upper bound that lets the search skip most cells and triangles.
    ``stamp (F,)``: ``stamp[f] == qid`` marks a triangle already tested for this point (a
    triangle is registered in several cells; testing it once halves the exact evaluations).
    ``lbs``: scratch of at least the largest cell's triangle count.
    """
    ci = _clamped_cell(px, ox, h, nx)
    cj = _clamped_cell(py, oy, h, ny)
    ck = _clamped_cell(pz, oz, h, nz)
    # exact minimum distance to the grid along each axis (0 inside its extent)
    gx = max(max(ox - px, px - (ox + nx * h)), 0.0)
    gy = max(max(oy - py, py - (oy + ny * h)), 0.0)
    gz = max(max(oz - pz, pz - (oz + nz * h)), 0.0)
    gx2, gy2, gz2 = gx * gx, gy * gy, gz * gz
    rmax = max(max(ci, nx - 1 - ci), max(max(cj, ny - 1 - cj), max(ck, nz - 1 - ck)))
    best = np.inf
    best_f = -1
    if seed_f >= 0:
        best = _point_triangle_d2(px, py, pz, rec, seed_f)
        best_f = seed_f
        stamp[seed_f] = qid
    # the own cell (shell 0) first, its lower bounds kept in ``lbs``: the triangle with the
    # smallest bound is the likely answer and is evaluated first (a tight upper bound early)
    c = (ci * ny + cj) * nz + ck
    s0 = cell_start[c]
    lb_min = np.inf
    f_min = -1
    for e in range(s0, cell_start[c + 1]):
        f = cell_tris[e]
        lb = _lower_bound(px, py, pz, rec, f)
        lbs[e - s0] = lb
        if lb < lb_min:
            lb_min = lb
            f_min = f
    if f_min >= 0 and f_min != best_f and lb_min < best:
        stamp[f_min] = qid
        d = _point_triangle_d2(px, py, pz, rec, f_min)
        if d < best:
            best = d
            best_f = f_min
    for e in range(s0, cell_start[c + 1]):
        f = cell_tris[e]
        if stamp[f] == qid or lbs[e - s0] >= best:
            continue
        stamp[f] = qid
        d = _point_triangle_d2(px, py, pz, rec, f)
        if d < best or (d == best and f < best_f):
            best = d
            best_f = f
    for r in range(1, rmax + 1):
        # lower bound for every cell in shells >= r: such a cell is at offset >= r along some
        # axis, and the axis distances grow with the offset from the (clamped) cell
        lb = min(min(_slab_d2(px, ox, h, ci - r, nx, gy2 + gz2),
                      _slab_d2(px, ox, h, ci + r, nx, gy2 + gz2)),
                 min(min(_slab_d2(py, oy, h, cj - r, ny, gx2 + gz2),
                         _slab_d2(py, oy, h, cj + r, ny, gx2 + gz2)),
                     min(_slab_d2(pz, oz, h, ck - r, nz, gx2 + gy2),
                         _slab_d2(pz, oz, h, ck + r, nz, gx2 + gy2))))
        if lb >= best:
            break
        i0, i1 = max(ci - r, 0), min(ci + r, nx - 1)
        j0, j1 = max(cj - r, 0), min(cj + r, ny - 1)
        k0, k1 = max(ck - r, 0), min(ck + r, nz - 1)
        for i in range(i0, i1 + 1):
            dxi = _axis_dist(px, ox, h, i)
            dxi2 = dxi * dxi
            if dxi2 >= best:
                continue
            edge_i = (i == ci - r) or (i == ci + r)
            for j in range(j0, j1 + 1):
                dyj = _axis_dist(py, oy, h, j)
                dxy2 = dxi2 + dyj * dyj
                if dxy2 >= best:
                    continue
                base = (i * ny + j) * nz
                if edge_i or (j == cj - r) or (j == cj + r):
                    kstep = 1  # on a face of the shell: the whole k range
                else:
                    kstep = 2 * r  # inside: only the two caps k = ck -/+ r
                for k in range(ck - r, ck + r + 1, kstep):
                    if k < k0 or k > k1:
                        continue
                    c = base + k
                    if cell_start[c] == cell_start[c + 1]:
                        continue
                    dzk = _axis_dist(pz, oz, h, k)
                    if dxy2 + dzk * dzk >= best:
                        continue
                    best, best_f = _visit_cell(px, py, pz, c, cell_start, cell_tris, rec, best, best_f,
                                               stamp, qid)
    return best_f, best


@njit(cache=True, nogil=True)
def _query_range(points, order, start, stop, origin, h, dims, cell_start, cell_tris, rec, face_id,
                 out_f, out_d2, out_w, out_diff, stamp, lbs):
    """Answer the points ``order[start:stop]`` (serial; the GIL is released, so Python threads
    run disjoint ranges in parallel). The seed restarts every ``_CHUNK`` points, so the result
    does not depend on how the points are split into ranges (``start`` a multiple of
    ``_CHUNK``). ``out_w``, ``out_diff``: ``(P, 3)`` for the closest points' barycentric weights
    and ``p - q`` (:func:`_write_closest`), or ``(0, 3)`` for none. ``stamp``: ``(F,)`` int64, zero at the start of the query and used by one thread
    only (the ids ``m + 1`` are unique within a query); ``lbs``: scratch of the largest cell's
    triangle count (:func:`_max_cell`)."""
    with_closest = out_w.shape[0] > 0
    nx, ny, nz = dims[0], dims[1], dims[2]
    ox, oy, oz = origin[0], origin[1], origin[2]
    prev = -1
    for m in range(start, stop):
        if m % _CHUNK == 0:
            prev = -1
        n = order[m]
        prev, d2 = _query_one(points[n, 0], points[n, 1], points[n, 2], prev, nx, ny, nz,
                              ox, oy, oz, h, cell_start, cell_tris, rec, stamp, m + 1, lbs)
        out_f[n] = face_id[prev]
        out_d2[n] = d2
        if with_closest:
            _write_closest(points[n, 0], points[n, 1], points[n, 2], rec, prev, out_w, out_diff, n)


@njit(cache=True, nogil=True)
def _envelope_grads_kernel(grad, faces, face_idx, bary, diff, g_p, g_v):
    """Scatter of the envelope-theorem gradients of ``d2 = |p - q|^2`` (see
    :func:`envelope_grads`); ``g_v`` is accumulated into (zero it first)."""
    for n in range(grad.shape[0]):
        g = 2.0 * grad[n]
        f = face_idx[n]
        for d in range(3):
            gp = g * diff[n, d]
            g_p[n, d] = gp
            for k in range(3):
                g_v[faces[f, k], d] -= bary[n, k] * gp


@njit(cache=True, nogil=True)
def _max_cell(cell_start):
    """Largest number of triangles registered in one cell."""
    m = 0
    for c in range(cell_start.shape[0] - 1):
        m = max(m, cell_start[c + 1] - cell_start[c])
    return m


# ----------------------------------------------------------------------------- python API


def _require_numba() -> None:
    if not NUMBA_AVAILABLE:
        raise ValueError("the grid closest-face query needs numba (pip install numba); use backend='igl' or 'torch'")


def _as_mesh(verts: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    verts = np.ascontiguousarray(np.asarray(verts), dtype=np.float64)
    faces_in = np.asarray(faces)
    if verts.ndim != 2 or verts.shape[1] != 3 or verts.shape[0] == 0:
        raise ValueError(f"verts must be a non-empty (N, 3) array, got shape {verts.shape}")
    if faces_in.ndim != 2 or faces_in.shape[1] != 3 or faces_in.shape[0] == 0:
        raise ValueError(f"faces must be a non-empty (F, 3) array, got shape {faces_in.shape}")
    if not np.issubdtype(faces_in.dtype, np.integer):
        raise ValueError(f"faces must be integers, got {faces_in.dtype}")
    faces = np.ascontiguousarray(faces_in, dtype=np.int64)
    if faces.min() < 0 or faces.max() >= verts.shape[0]:
        raise ValueError(f"face indices out of range [0, {verts.shape[0]}): min {faces.min()}, max {faces.max()}")
    if not np.isfinite(verts).all():
        raise ValueError("verts contain NaN/inf")
    return verts, faces


class _Buffers:
    """Work arrays kept from call to call, grown on demand (``headroom``: extra fraction on growth).

    Fresh multi-megabyte numpy arrays are fresh pages: on the development VM a build with new
    arrays took ~900 page faults, ~3 ms, more than the build itself. The internal path
    (:func:`closest_faces_grid`, used by ``point_to_surface``) therefore reuses per-thread buffers
    (a few MB per thread for the FLAME template); :func:`build_triangle_grid` returns a grid in
    arrays of its own.
    """

    def __init__(self, headroom: float = 0.0):
        self._arrays = {}
        self._headroom = headroom

    def get(self, name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        n = int(np.prod(shape))
        dtype = np.dtype(dtype)
        a = self._arrays.get(name)
        if a is None or a.size < n or a.dtype != dtype:
            a = np.empty(n + int(n * self._headroom), dtype=dtype)
            self._arrays[name] = a
        return a[:n].reshape(shape)


class _ThreadBuffers(threading.local):
    def __init__(self):
        self.buffers = _Buffers(headroom=0.25)


_TLS = _ThreadBuffers()


def _check_cell_scale(cell_scale: float) -> None:
    if not (cell_scale > 0 and math.isfinite(cell_scale)):
        raise ValueError(f"cell_scale must be a positive number, got {cell_scale}")


def _build(verts: np.ndarray, faces: np.ndarray, cell_scale: float, bufs: _Buffers) -> TriangleGrid:
    """Build from validated float64 ``verts`` and int64 ``faces`` into ``bufs`` (the grid's
    arrays are views of them, valid until the next build with the same buffers)."""
    F = faces.shape[0]
    if 64 * F >= 2**31 - 1:  # int32 CSR offsets
        raise ValueError(f"mesh too large for the grid closest-face query (F = {F})")
    origin, h, dims, bound = _grid_shape(verts, faces, float(cell_scale), max(64 * F, 4096))
    ncell = int(np.prod(dims))
    rec = bufs.get("rec", (F, _REC), np.float64)
    face_id = bufs.get("face_id", (F,), np.int64)
    cell_start = bufs.get("cell_start", (ncell + 1,), np.int32)
    cell_tris = bufs.get("cell_tris", (bound,), np.int32)
    total = _build_into(verts, faces, origin, h, dims, rec, face_id, bufs.get("cen", (F, 3), np.float64),
                        bufs.get("keys", (F,), np.int64), bufs.get("tmp", (F,), np.int64), cell_start,
                        bufs.get("pair_cell", (bound,), np.int32), bufs.get("pair_tri", (bound,), np.int32),
                        cell_tris)
    return TriangleGrid(origin, float(h), dims, cell_start, cell_tris[:total], rec, face_id)


def build_triangle_grid(verts: np.ndarray, faces: np.ndarray, cell_scale: float = DEFAULT_CELL_SCALE) -> TriangleGrid:
    """Build the uniform grid over a mesh's triangles (see the module docstring).

    Args:
        verts: ``(N, 3)`` vertices (any float dtype; used as float64), unit mm (any).
        faces: ``(F, 3)`` integer vertex indices, ``F >= 1``; degenerate faces allowed.
        cell_scale: cell edge length in units of the mean triangle edge length (> 0).
    Returns:
        :class:`TriangleGrid` (arrays of its own).
    Raises:
        ValueError: bad shapes, empty mesh, out-of-range faces, NaN/inf vertices, no numba.
    """
    _require_numba()
    _check_cell_scale(cell_scale)
    verts, faces = _as_mesh(verts, faces)
    return _build(verts, faces, cell_scale, _Buffers())


def _as_points(points: np.ndarray) -> np.ndarray:
    points = np.ascontiguousarray(np.asarray(points), dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (P, 3), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN/inf")
    return points


def _query(grid: TriangleGrid, points: np.ndarray, num_threads: Optional[int], with_closest: bool):
    """Query validated float64 ``points``; scratch in this thread's buffers. Returns
    ``(face_idx, dist_sq)``, with ``with_closest`` also ``(bary, diff)``."""
    P = points.shape[0]
    rows = P if with_closest else 0
    out_f = np.empty(P, dtype=np.int64)
    out_d2 = np.empty(P, dtype=np.float64)
    out_w = np.empty((rows, 3), dtype=np.float64)
    out_diff = np.empty((rows, 3), dtype=np.float64)
    if P == 0:
        return (out_f, out_d2, out_w, out_diff) if with_closest else (out_f, out_d2)
    n_threads = default_threads() if num_threads is None else max(int(num_threads), 1)
    bufs = _TLS.buffers
    order = bufs.get("order", (P,), np.int64)
    _morton_order(points, grid.origin, grid.h, int(grid.dims[0]), int(grid.dims[1]), int(grid.dims[2]),
                  _morton_bits(grid.dims), bufs.get("keys", (P,), np.int64), order, bufs.get("tmp", (P,), np.int64))
    args = (grid.origin, grid.h, grid.dims, grid.cell_start, grid.cell_tris, grid.rec, grid.face_id,
            out_f, out_d2, out_w, out_diff)
    n_threads = max(1, min(n_threads, -(-P // _CHUNK)))
    F = grid.rec.shape[0]
    lbs_size = max(int(_max_cell(grid.cell_start)), 1)
    scratch = []
    for t in range(n_threads):
        stamp = bufs.get(f"stamp{t}", (F,), np.int64)
        stamp[:] = 0
        scratch.append((stamp, bufs.get(f"lbs{t}", (lbs_size,), np.float64)))
    # ranges start at multiples of _CHUNK, so the seeds (and the result) do not depend on the split
    run_ranges(lambda a, b, t: _query_range(points, order, a, b, *args, *scratch[t]), P, n_threads, align=_CHUNK)
    return (out_f, out_d2, out_w, out_diff) if with_closest else (out_f, out_d2)


def query_triangle_grid(
    grid: TriangleGrid, points: np.ndarray, num_threads: Optional[int] = None, with_closest: bool = False
):
    """Closest triangle of ``grid`` for every point, exact.

    Args:
        grid: from :func:`build_triangle_grid`.
        points: ``(P, 3)`` query points (any float dtype; used as float64), same unit as the mesh.
        num_threads: threads for this call (default: ``torch.get_num_threads()``): the points are
            split into ranges claimed by that many Python threads (the kernel releases the GIL).
        with_closest: also return the closest points.
    Returns:
        ``face_idx (P,)`` int64 and ``dist_sq (P,)`` float64 (unit^2); with ``with_closest`` also
        ``bary (P, 3)`` float64, the weights of the vertices ``faces[face_idx]`` (in the face's
        order; non-negative, summing to 1) of the closest point ``q`` ON the triangle, and
        ``diff (P, 3)`` float64, ``p - q``.
    Raises:
        ValueError: bad shape or NaN/inf points.
    """
    _require_numba()
    return _query(grid, _as_points(points), num_threads, with_closest)


def envelope_grads(grad: np.ndarray, faces: np.ndarray, face_idx: np.ndarray, bary: np.ndarray,
                   diff: np.ndarray, num_verts: int) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients of the squared distances ``d2 = |p - q|^2`` to the closest points ``q`` (from a
    ``with_closest`` query) by the envelope theorem: ``dd2/dp = 2 (p - q)`` and
    ``dd2/dv_k = -2 w_k (p - q)`` for the 3 vertices of the closest face (barycentric weights
    ``w``), chained with the incoming ``grad`` (serial numba scatter, float64).

    Args:
        grad: ``(P,)`` upstream gradient of every ``d2``.
        faces: ``(F, 3)`` int64; face_idx: ``(P,)`` int64; bary, diff: ``(P, 3)`` float64 (the query's).
        num_verts: N.
    Returns:
        ``g_points (P, 3)``, ``g_verts (N, 3)``, float64.
    """
    _require_numba()
    g_p = np.empty((grad.shape[0], 3), dtype=np.float64)
    g_v = np.zeros((num_verts, 3), dtype=np.float64)
    _envelope_grads_kernel(np.ascontiguousarray(grad), faces, face_idx, bary, diff, g_p, g_v)
    return g_p, g_v


def closest_faces_grid(
    points: np.ndarray,
    verts: np.ndarray,
    faces: np.ndarray,
    cell_scale: float = DEFAULT_CELL_SCALE,
    num_threads: Optional[int] = None,
    with_closest: bool = False,
):
    """Exact closest triangle for every point: build the grid (in this thread's reused
    buffers), then query it.

    Args:
        points: ``(P, 3)`` query points; verts: ``(N, 3)``; faces: ``(F, 3)`` integer (same unit, mm).
        cell_scale: grid cell size in mean edge lengths (see :func:`build_triangle_grid`).
        num_threads: threads for the query (default: ``torch.get_num_threads()``).
        with_closest: also return the closest points (see :func:`query_triangle_grid`); what
            ``point_to_surface`` differentiates with.
    Returns:
        ``face_idx (P,)`` int64, ``dist_sq (P,)`` float64 squared distance (mm^2) to the closest
        point ON that triangle (and ``bary, diff`` with ``with_closest``). Ties return one of the
        tied triangles.
    """
    _require_numba()
    _check_cell_scale(cell_scale)
    verts, faces = _as_mesh(verts, faces)
    points = _as_points(points)
    return _query(_build(verts, faces, cell_scale, _TLS.buffers), points, num_threads, with_closest)
