"""Topology and differential helpers for triangle meshes in a fixed template topology.

All functions are vectorised (no Python loops over vertices, faces or the batch) and work for any
template size. Vertex positions are batched ``(B, N, 3)`` tensors in any frame and unit (the
code base uses world millimetres); faces are ``(F, 3)`` int64 vertex indices shared by the batch,
counter-clockwise seen from outside, so normals point outwards.

Connectivity helpers (``unique_edges``, ``vertex_adjacency``, ``k_ring``) accept faces as a
``torch.Tensor`` or ``numpy`` array and return torch tensors on the faces' device.
"""
from __future__ import annotations

import logging
from typing import Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = [
    "face_vertices", "face_normals", "vertex_normals", "unique_edges", "vertex_adjacency", "k_ring",
    "mesh_laplacian_uniform", "laplacian_smoothing_offsets",
]


def _as_faces(faces: ArrayLike, device=None) -> torch.Tensor:
    """``faces`` as an ``(F, 3)`` int64 tensor; ValueError on a bad shape or dtype."""
    if isinstance(faces, np.ndarray):
        if not np.issubdtype(faces.dtype, np.integer):
            raise ValueError(f"faces must be integer indices, got dtype {faces.dtype}")
        faces = torch.from_numpy(np.ascontiguousarray(faces, dtype=np.int64))
    elif not isinstance(faces, torch.Tensor):
        raise ValueError(f"faces must be a torch.Tensor or numpy array, got {type(faces).__name__}")
    if faces.dtype.is_floating_point or faces.dtype == torch.bool or faces.is_complex():
        raise ValueError(f"faces must be integer indices, got dtype {faces.dtype}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    faces = faces.long()
    if device is not None:
        faces = faces.to(device)
    return faces


def _check_verts(verts: torch.Tensor, faces: torch.Tensor) -> None:
    if not isinstance(verts, torch.Tensor) or verts.ndim != 3 or verts.shape[-1] != 3:
        shape = tuple(verts.shape) if isinstance(verts, torch.Tensor) else type(verts).__name__
        raise ValueError(f"verts must be a (B, N, 3) tensor, got {shape}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= verts.shape[1]):
        raise ValueError(f"face index out of range [0, {verts.shape[1]}): "
                         f"min {int(faces.min())}, max {int(faces.max())}")


def _flat_face_index(faces: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """``(B*F*3,)`` indices ``b * N + faces[f, k]`` into a ``(B*N, ...)`` flattened batch."""
    offs = (torch.arange(B, device=faces.device) * N).view(B, 1)
    return (faces.reshape(1, -1) + offs).reshape(-1)


def face_vertices(verts: torch.Tensor, faces: ArrayLike) -> torch.Tensor:
    """Corner positions of every face.

    Args:
        verts: ``(B, N, 3)`` vertex positions (any frame/unit).
        faces: ``(F, 3)`` int64 vertex indices.

    Returns:
        ``(B, F, 3, 3)``: ``[b, f, k]`` is vertex ``faces[f, k]`` of batch element b. Gathered
        with one ``index_select`` over the flattened batch (whose backward is a fast
        ``index_add``).
    """
    faces = _as_faces(faces, verts.device)
    _check_verts(verts, faces)
    B, N, _ = verts.shape
    flat = verts.reshape(B * N, 3).index_select(0, _flat_face_index(faces, B, N))
    return flat.view(B, faces.shape[0], 3, 3)


def face_normals(verts: torch.Tensor, faces: ArrayLike, normalize: bool = True,
                 eps: float = 1e-12) -> torch.Tensor:
    """Per-face normals ``(v1 - v0) x (v2 - v0)``.

    Args:
        verts: ``(B, N, 3)`` vertex positions (any frame/unit, e.g. world mm).
        faces: ``(F, 3)`` int64 vertex indices, counter-clockwise seen from outside.
        normalize: if True return unit normals (degenerate faces give a zero vector, not NaN);
            if False return the raw cross product, whose length is twice the face area
            (``unit**2``), i.e. the area-weighted normal.
        eps: length below which a face counts as degenerate when normalising.

    Returns:
        ``(B, F, 3)`` normals in the frame of ``verts``.
    """
    v0, v1, v2 = face_vertices(verts, faces).unbind(2)
    n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    if normalize:
        n = n / n.norm(dim=-1, keepdim=True).clamp_min(eps)
    return n


def vertex_normals(verts: torch.Tensor, faces: ArrayLike, eps: float = 1e-12) -> torch.Tensor:
    """Unit, area-weighted vertex normals.

    Each vertex normal is the normalised sum of the unnormalised cross products of its incident
    faces (so larger faces count more), accumulated with one ``index_add`` over the flattened
    batch. Vertices referenced by no face (or whose faces cancel) get a zero vector, not NaN.

    Args:
        verts: ``(B, N, 3)`` vertex positions (any frame/unit, e.g. world mm).
        faces: ``(F, 3)`` int64 vertex indices, counter-clockwise seen from outside.

    Returns:
        ``(B, N, 3)`` unit normals in the frame of ``verts``.
    """
    faces = _as_faces(faces, verts.device)
    B, N, _ = verts.shape
    fn = face_normals(verts, faces, normalize=False)  # (B, F, 3)
    F = faces.shape[0]
    src = fn.unsqueeze(2).expand(B, F, 3, 3).reshape(B * F * 3, 3)
    acc = torch.zeros(B * N, 3, dtype=verts.dtype, device=verts.device)
    acc = acc.index_add(0, _flat_face_index(faces, B, N), src).view(B, N, 3)
    return acc / acc.norm(dim=-1, keepdim=True).clamp_min(eps)


def unique_edges(faces: ArrayLike) -> torch.Tensor:
    """Unique undirected edges of a triangle mesh.

    Args:
        faces: ``(F, 3)`` vertex indices.

    Returns:
        ``(E, 2)`` int64, each row ``(i, j)`` with ``i < j``, rows sorted lexicographically.
        For a closed manifold mesh ``V - E + F = 2 - 2g``; the FLAME template has 14,995 edges.
    """
    faces = _as_faces(faces)
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=0)
    e = torch.sort(e, dim=1).values
    e = e[e[:, 0] != e[:, 1]]  # degenerate faces repeating a vertex contribute no self-loops
    if not e.numel():
        return e.reshape(0, 2)
    n = int(e.max()) + 1
    key = torch.unique(e[:, 0] * n + e[:, 1])  # sorted 1-D keys: lexicographic row order
    return torch.stack([key // n, key % n], dim=1)


def vertex_adjacency(faces: ArrayLike, num_verts: int) -> torch.Tensor:
    """Symmetric vertex adjacency matrix of the mesh graph.

    Args:
        faces: ``(F, 3)`` vertex indices.
        num_verts: N, the number of vertices (isolated vertices have empty rows).

    Returns:
        ``(N, N)`` coalesced sparse COO float32 tensor with 1 at ``(i, j)`` iff an edge joins
        i and j (no self-loops). Its ``indices()`` are sorted by row, so they are the neighbour
        lists; ``.to_sparse_csr()`` gives CSR.
    """
    faces = _as_faces(faces)
    if faces.numel() and int(faces.max()) >= num_verts:
        raise ValueError(f"face index {int(faces.max())} out of range for num_verts={num_verts}")
    e = unique_edges(faces)
    both = torch.cat([e, e.flip(1)], dim=0)
    vals = torch.ones(both.shape[0], dtype=torch.float32, device=faces.device)
    return torch.sparse_coo_tensor(both.t(), vals, (num_verts, num_verts),
                                   check_invariants=False).coalesce()


def k_ring(faces: ArrayLike, seeds: ArrayLike, k: int, num_verts: int) -> torch.Tensor:
    """Vertices within ``k`` edges of the seed set (the seeds included).

    Args:
        faces: ``(F, 3)`` vertex indices.
        seeds: int vertex indices ``(S,)`` or a ``(N,)`` bool mask.
        k: ring size, ``k >= 0`` (0 returns the seeds).
        num_verts: N.

    Returns:
        ``(N,)`` bool mask on the faces' device.
    """
    faces = _as_faces(faces)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    dev = faces.device
    if isinstance(seeds, np.ndarray):
        seeds = torch.from_numpy(np.ascontiguousarray(seeds))
    seeds = torch.as_tensor(seeds, device=dev)
    if seeds.dtype == torch.bool:
        if seeds.shape != (num_verts,):
            raise ValueError(f"bool seed mask must have shape ({num_verts},), "
                             f"got {tuple(seeds.shape)}")
        mask = seeds.clone()
    else:
        seeds = seeds.reshape(-1).long()
        if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= num_verts):
            raise ValueError(f"seed index out of range [0, {num_verts}): "
                             f"min {int(seeds.min())}, max {int(seeds.max())}")
        mask = torch.zeros(num_verts, dtype=torch.bool, device=dev)
        mask[seeds] = True
    if k == 0 or not faces.numel():
        return mask
    e = unique_edges(faces)
    src = torch.cat([e[:, 0], e[:, 1]])
    dst = torch.cat([e[:, 1], e[:, 0]])
    for _ in range(k):  # loop over rings (k is small), vectorised over edges
        new = mask.clone()
        new[dst[mask[src]]] = True
        if torch.equal(new, mask):
            break
        mask = new
    return mask


def mesh_laplacian_uniform(faces: ArrayLike, num_verts: int) -> torch.Tensor:
    """Uniform (umbrella) graph Laplacian ``L = I - D^-1 A`` as a sparse COO tensor.

    ``(L @ x)_i = x_i - mean_{j in N(i)} x_j``: zero for constant fields; for a vertex position
    field it is the offset of each vertex from the centroid of its neighbours. Isolated vertices
    get a zero row.

    Args:
        faces: ``(F, 3)`` vertex indices.
        num_verts: N.

    Returns:
        ``(N, N)`` sparse COO float32 tensor (coalesced).
    """
    faces = _as_faces(faces)
    e = unique_edges(faces)
    src = torch.cat([e[:, 0], e[:, 1]])
    dst = torch.cat([e[:, 1], e[:, 0]])
    deg = torch.zeros(num_verts, dtype=torch.float32, device=faces.device)
    deg.index_add_(0, src, torch.ones_like(src, dtype=torch.float32))
    has = deg > 0
    diag = torch.arange(num_verts, device=faces.device)[has]
    rows = torch.cat([src, diag])
    cols = torch.cat([dst, diag])
    vals = torch.cat([-1.0 / deg[src], torch.ones(diag.shape[0], device=faces.device)])
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (num_verts, num_verts),
                                   check_invariants=False).coalesce()


def laplacian_smoothing_offsets(verts: torch.Tensor, faces: ArrayLike) -> torch.Tensor:
    """Uniform Laplacian coordinates ``x_i - mean_{j in N(i)} x_j`` of a batch of meshes.

    Args:
        verts: ``(B, N, 3)`` vertex positions (any unit).
        faces: ``(F, 3)`` vertex indices.

    Returns:
        ``(B, N, 3)`` in the unit of ``verts`` (zero for isolated vertices).
    """
    faces = _as_faces(faces, verts.device)
    _check_verts(verts, faces)
    B, N, _ = verts.shape
    e = unique_edges(faces)
    src = torch.cat([e[:, 0], e[:, 1]])
    dst = torch.cat([e[:, 1], e[:, 0]])
    deg = torch.zeros(N, dtype=verts.dtype, device=verts.device)
    deg.index_add_(0, src, torch.ones_like(src, dtype=verts.dtype))
    nsum = torch.zeros_like(verts).index_add(1, src, verts[:, dst])
    mean = nsum / deg.clamp_min(1).view(1, N, 1)
    return torch.where((deg > 0).view(1, N, 1), verts - mean, torch.zeros_like(verts))
