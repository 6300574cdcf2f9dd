"""Mesh and point-cloud files (.ply ASCII/binary, .obj, .npy) with explicit units.

Every reader returns millimetres: ``units`` names the unit the FILE is in (FLAME-style meshes
and registrations are usually metres, 3dMD scans millimetres) and the reader scales by
:data:`UNIT_TO_MM`. Every writer takes millimetres and converts to ``units`` on disk.

Vertex order is kept exactly and no vertex is merged or dropped (the registration topology
depends on it). Polygons with more than three corners are fan-triangulated ``(0, i, i+1)``;
the reader logs how many. Writes are atomic: a temporary file in the target folder is
renamed over the target with :func:`os.replace`, so a crash never leaves a half-written mesh.

Bad input raises :class:`~tempeh.errors.TempehDataError` whose message starts with the file
(and, for text formats, the line): missing file, truncated or corrupt data, NaN/inf, wrong
shapes, face indices out of range.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from tempeh.errors import TempehDataError

logger = logging.getLogger(__name__)

__all__ = [
    "UNIT_TO_MM",
    "unit_scale",
    "atomic_write",
    "read_mesh",
    "write_mesh",
    "read_points",
    "write_points",
]

PathLike = Union[str, os.PathLike]

#: Multiply a file value in this unit by the factor to get millimetres.
UNIT_TO_MM: Dict[str, float] = {"m": 1000.0, "cm": 10.0, "mm": 1.0}

MESH_SUFFIXES = (".ply", ".obj")
POINT_SUFFIXES = (".ply", ".obj", ".npy")


def unit_scale(units: str) -> float:
    """Factor file-unit -> mm for ``units`` in ``{"m", "cm", "mm"}`` (ValueError otherwise)."""
    try:
        return UNIT_TO_MM[units]
    except (KeyError, TypeError):
        raise ValueError(f"unknown length unit {units!r}; expected one of "
                         f"{', '.join(UNIT_TO_MM)}") from None


# ---------------------------------------------------------------------------- atomic writes
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file beside ``path`` for writing; on success rename it over ``path``.

    Parent folders are created. On any exception the temporary file is removed and ``path``
    is left untouched. ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8). The file gets the usual
    permissions of a new file (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``,
    so outputs on a shared lab file system stay readable by colleagues.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- PLY parsing
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class _PlyElement:
    def __init__(self, name: str, count: int):
        self.name = name
        self.count = count
        # (name, dtype) for scalars; (name, count_dtype, item_dtype) for lists
        self.props: List[tuple] = []

    @property
    def has_list(self) -> bool:
        return any(len(p) == 3 for p in self.props)


def _parse_ply_header(fh, path: Path) -> Tuple[str, List[_PlyElement], int]:
    """Returns (format, elements, number of header lines)."""
    first = fh.readline()
    if first.strip() != b"ply":
        raise TempehDataError(path, "not a PLY file (first line is not 'ply')", line=1)
    fmt = None
    elements: List[_PlyElement] = []
    lineno = 1
    while True:
        raw = fh.readline()
        lineno += 1
        if not raw:
            raise TempehDataError(path, "truncated PLY header (no 'end_header')", line=lineno)
        words = raw.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        key = words[0]
        try:
            if key == "format":
                fmt = words[1]
                if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
                    raise TempehDataError(path, f"unknown PLY format '{fmt}'", line=lineno)
            elif key == "element":
                elements.append(_PlyElement(words[1], int(words[2])))
                if elements[-1].count < 0:
                    raise ValueError("negative count")
            elif key == "property":
                if not elements:
                    raise TempehDataError(path, "PLY property before any element", line=lineno)
                if words[1] == "list":
                    elements[-1].props.append((words[4], _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]))
                else:
                    elements[-1].props.append((words[2], _PLY_TYPES[words[1]]))
            elif key == "end_header":
                break
            else:
                raise TempehDataError(path, f"unexpected PLY header line '{raw.strip().decode()}'",
                                      line=lineno)
        except (IndexError, KeyError, ValueError) as err:
            if isinstance(err, TempehDataError):
                raise
            raise TempehDataError(path, f"malformed PLY header line '{raw.strip().decode()}'",
                                  line=lineno) from None
    if fmt is None:
        raise TempehDataError(path, "PLY header has no 'format' line")
    return fmt, elements, lineno


def _read_ply_binary_element(buf: memoryview, pos: int, el: _PlyElement, endian: str,
                             path: Path) -> Tuple[Dict[str, np.ndarray], int]:
    """Read one element block from a binary buffer. Returns ({prop: array}, new position).

    Scalar-only elements are one structured ``frombuffer``. Elements with lists take a fast
    path when every row has the same list length (always the case for triangle meshes);
    otherwise rows are walked one by one (mixed polygons, rare).
    """
    def trunc():
        return TempehDataError(path, f"truncated PLY file: element '{el.name}' "
                                     f"({el.count} rows) runs past the end of the file")

    if el.count == 0:
        return {p[0]: np.zeros((0,) if len(p) == 2 else (0, 0)) for p in el.props}, pos
    if not el.has_list:
        dt = np.dtype([(p[0], endian + p[1]) for p in el.props])
        nbytes = dt.itemsize * el.count
        if pos + nbytes > len(buf):
            raise trunc()
        arr = np.frombuffer(buf, dtype=dt, count=el.count, offset=pos)
        return {p[0]: arr[p[0]] for p in el.props}, pos + nbytes

    # fast path: read list lengths of the first row, assume constant, verify.
    fields = []
    off = pos
    for p in el.props:
        if len(p) == 2:
            fields.append((p[0], endian + p[1]))
            off += np.dtype(p[1]).itemsize
        else:
            cdt = np.dtype(endian + p[1])
            if off + cdt.itemsize > len(buf):
                raise trunc()
            n = int(np.frombuffer(buf, dtype=cdt, count=1, offset=off)[0])
            fields.append((p[0] + "#n", cdt))
            fields.append((p[0], endian + p[2], (n,)))
            off += cdt.itemsize + n * np.dtype(p[2]).itemsize
    dt = np.dtype(fields)
    nbytes = dt.itemsize * el.count
    if pos + nbytes <= len(buf):
        arr = np.frombuffer(buf, dtype=dt, count=el.count, offset=pos)
        ok = all(np.all(arr[p[0] + "#n"] == arr[p[0]].shape[1]) for p in el.props if len(p) == 3)
        if ok:
            return {p[0]: arr[p[0]] for p in el.props}, pos + nbytes
    # slow path: variable list lengths
    out: Dict[str, list] = {p[0]: [] for p in el.props}
    for _ in range(el.count):
        for p in el.props:
            if len(p) == 2:
                dt1 = np.dtype(endian + p[1])
                if pos + dt1.itemsize > len(buf):
                    raise trunc()
                out[p[0]].append(np.frombuffer(buf, dtype=dt1, count=1, offset=pos)[0])
                pos += dt1.itemsize
            else:
                cdt, idt = np.dtype(endian + p[1]), np.dtype(endian + p[2])
                if pos + cdt.itemsize > len(buf):
                    raise trunc()
                n = int(np.frombuffer(buf, dtype=cdt, count=1, offset=pos)[0])
                pos += cdt.itemsize
                if pos + n * idt.itemsize > len(buf):
                    raise trunc()
                out[p[0]].append(np.frombuffer(buf, dtype=idt, count=n, offset=pos))
                pos += n * idt.itemsize
    res = {}
    for p in el.props:
        res[p[0]] = np.asarray(out[p[0]]) if len(p) == 2 else out[p[0]]
    return res, pos


def _read_ply_ascii_element(lines: List[bytes], start: int, el: _PlyElement, path: Path,
                            header_lines: int) -> Tuple[Dict[str, np.ndarray], int]:
    """Read ``el.count`` rows (one per line) starting at ``lines[start]``."""
    rows = lines[start:start + el.count]
    if len(rows) < el.count:
        raise TempehDataError(path, f"truncated PLY file: element '{el.name}' has {len(rows)} of "
                                    f"{el.count} rows", line=header_lines + start + len(rows) + 1)
    if el.count == 0:
        return {p[0]: np.zeros((0,) if len(p) == 2 else (0, 0)) for p in el.props}, start
    first_line = header_lines + start + 1
    if not el.has_list:
        try:
            arr = np.array(b" ".join(rows).split(), dtype=np.float64)
        except ValueError:
            raise TempehDataError(path, f"non-numeric value in element '{el.name}'",
                                  line=first_line) from None
        if arr.size != el.count * len(el.props):
            lens = np.array([len(r.split()) for r in rows])
            bad = int(np.flatnonzero(lens != len(el.props))[0])
            raise TempehDataError(path, f"element '{el.name}' row has {lens[bad]} values, expected "
                                        f"{len(el.props)}", line=first_line + bad)
        arr = arr.reshape(el.count, len(el.props))
        return {p[0]: arr[:, i] for i, p in enumerate(el.props)}, start + el.count
    split = [r.split() for r in rows]
    lens = np.array([len(s) for s in split])
    res: Dict[str, object] = {}
    if np.all(lens == lens[0]):  # fast path: constant row length
        try:
            arr = np.array(split, dtype=np.float64)
        except ValueError:
            raise TempehDataError(path, f"non-numeric value in element '{el.name}'",
                                  line=first_line) from None
        col = 0
        for p in el.props:
            if len(p) == 2:
                res[p[0]] = arr[:, col]
                col += 1
            else:
                n = int(arr[0, col])
                if not np.all(arr[:, col] == n):
                    break
                res[p[0]] = arr[:, col + 1:col + 1 + n]
                col += 1 + n
        else:
            if col == arr.shape[1]:
                return res, start + el.count
    # slow path: variable list lengths
    res = {p[0]: [] for p in el.props}
    for i, toks in enumerate(split):
        col = 0
        try:
            for p in el.props:
                if len(p) == 2:
                    res[p[0]].append(float(toks[col]))
                    col += 1
                else:
                    n = int(toks[col])
                    vals = np.array(toks[col + 1:col + 1 + n], dtype=np.float64)
                    if vals.size != n:
                        raise ValueError
                    res[p[0]].append(vals)
                    col += 1 + n
        except (ValueError, IndexError):
            raise TempehDataError(path, f"malformed row in element '{el.name}'",
                                  line=first_line + i) from None
    for p in el.props:
        if len(p) == 2:
            res[p[0]] = np.asarray(res[p[0]])
    return res, start + el.count


def _read_ply(path: Path) -> Dict[str, Dict[str, object]]:
    """Parse a PLY file into {element: {property: array or list of arrays}}."""
    with open(path, "rb") as fh:
        fmt, elements, nhead = _parse_ply_header(fh, path)
        body = fh.read()
    data: Dict[str, Dict[str, object]] = {}
    if fmt == "ascii":
        lines = [ln for ln in body.splitlines() if ln.strip()]
        pos = 0
        for el in elements:
            data[el.name], pos = _read_ply_ascii_element(lines, pos, el, path, nhead)
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        buf = memoryview(body)
        pos = 0
        for el in elements:
            data[el.name], pos = _read_ply_binary_element(buf, pos, el, endian, path)
    return data


def _ply_vertices(path: Path, data) -> np.ndarray:
    v = data.get("vertex")
    if v is None or not all(k in v for k in ("x", "y", "z")):
        raise TempehDataError(path, "PLY file has no 'vertex' element with x, y, z properties")
    return np.stack([np.asarray(v[k], dtype=np.float64) for k in ("x", "y", "z")], axis=1)


def _triangulate(polys: List[np.ndarray]) -> np.ndarray:
    """Fan-triangulate a list of index arrays of varying length >= 3 -> (F, 3)."""
    lens = np.array([len(p) for p in polys])
    flat = np.concatenate(polys) if polys else np.zeros(0)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    ntri = np.maximum(lens - 2, 0)
    poly_of_tri = np.repeat(np.arange(len(polys)), ntri)
    k = np.arange(ntri.sum()) - np.repeat(np.cumsum(ntri) - ntri, ntri)  # 0..ntri-1 per poly
    s = starts[poly_of_tri]
    return np.stack([flat[s], flat[s + k + 1], flat[s + k + 2]], axis=1)


def _ply_faces(path: Path, data) -> np.ndarray:
    f = data.get("face")
    if f is None:
        return np.zeros((0, 3), dtype=np.int64)
    key = "vertex_indices" if "vertex_indices" in f else ("vertex_index" if "vertex_index" in f else None)
    if key is None:
        raise TempehDataError(path, "PLY 'face' element has no 'vertex_indices' list")
    faces = f[key]
    if isinstance(faces, np.ndarray):
        if faces.shape[0] and faces.shape[1] < 3:
            raise TempehDataError(path, f"PLY faces have {faces.shape[1]} corners (need >= 3)")
        if faces.shape[0] == 0 or faces.shape[1] == 3:
            return np.asarray(faces, dtype=np.int64).reshape(-1, 3)
        polys = list(np.asarray(faces, dtype=np.int64))
    else:
        polys = [np.asarray(p, dtype=np.int64) for p in faces]
    lens = np.array([len(p) for p in polys])
    if np.any(lens < 3):
        raise TempehDataError(path, f"PLY face {int(np.flatnonzero(lens < 3)[0])} has fewer than "
                                    "3 corners")
    logger.info("%s: fan-triangulated %d polygons with more than 3 corners",
                path, int((lens > 3).sum()))
    return _triangulate(polys)


# ---------------------------------------------------------------------------- OBJ parsing
def _read_obj(path: Path, want_faces: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Parse ``v`` and ``f`` records of an OBJ file (other records are ignored).

    Face corners may be ``i``, ``i/t``, ``i//n`` or ``i/t/n``, 1-based or negative (relative).
    """
    try:
        text = path.read_bytes()
    except OSError as err:
        raise TempehDataError(path, f"cannot read file: {err.strerror}") from None
    lines = text.splitlines()
    vrows: List[bytes] = []
    vlines: List[int] = []
    frows: List[bytes] = []
    flines: List[int] = []
    fnv: List[int] = []  # vertices defined before each face (for negative indices)
    for i, ln in enumerate(lines):
        if ln.startswith(b"v ") or ln.startswith(b"v\t"):
            vrows.append(ln)
            vlines.append(i + 1)
        elif want_faces and (ln.startswith(b"f ") or ln.startswith(b"f\t")):
            frows.append(ln)
            flines.append(i + 1)
            fnv.append(len(vrows))
    faces: List[np.ndarray] = []
    F = None
    if frows:
        # fast path: all triangles with positive indices
        toks = re.sub(rb"/[^\s]*", b"", b" ".join(r[1:] for r in frows)).split()
        if len(toks) == 3 * len(frows):
            try:
                F = np.array(toks, dtype=np.int64).reshape(-1, 3)
            except ValueError:
                F = None
            if F is not None and F.min() <= 0:
                F = None
            if F is not None:
                F = F - 1
        if F is None:
            for ln, lno, nv in zip(frows, flines, fnv):
                try:
                    idx = np.array([int(t.split(b"/")[0]) for t in ln.split()[1:]], dtype=np.int64)
                except ValueError:
                    raise TempehDataError(path, f"malformed face '{ln.decode(errors='replace')}'",
                                          line=lno) from None
                if idx.size < 3:
                    raise TempehDataError(path, "face with fewer than 3 corners", line=lno)
                if np.any(idx == 0):
                    raise TempehDataError(path, "face index 0 (OBJ indices are 1-based)", line=lno)
                faces.append(np.where(idx > 0, idx - 1, nv + idx))  # negative: relative
    verts = np.zeros((0, 3))
    if vrows:
        split = [r.split()[1:] for r in vrows]
        lens = np.array([len(s) for s in split])
        bad = np.flatnonzero(lens < 3)
        if bad.size:
            raise TempehDataError(path, "vertex with fewer than 3 coordinates", line=vlines[bad[0]])
        try:
            if np.all(lens == lens[0]):
                verts = np.array(split, dtype=np.float64)[:, :3]
            else:
                verts = np.array([s[:3] for s in split], dtype=np.float64)
        except ValueError:
            for j, s in enumerate(split):
                try:
                    [float(x) for x in s[:3]]
                except ValueError:
                    raise TempehDataError(path, "non-numeric vertex coordinate",
                                          line=vlines[j]) from None
            raise
    if F is not None:
        return verts, F
    if not faces:
        return verts, np.zeros((0, 3), dtype=np.int64)
    lens = np.array([len(f) for f in faces])
    if np.all(lens == 3):
        F = np.stack(faces)
    else:
        logger.info("%s: fan-triangulated %d polygons with more than 3 corners",
                    path, int((lens > 3).sum()))
        F = _triangulate(faces)
    return verts, F


# ---------------------------------------------------------------------------- checks
def _check_file(path: PathLike, suffixes: Tuple[str, ...]) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise TempehDataError(path, f"unsupported file type '{path.suffix}' "
                                    f"(expected one of {', '.join(suffixes)})")
    if not path.is_file():
        raise TempehDataError(path, "file not found")
    return path


def _check_verts(path: Path, verts: np.ndarray, what: str = "vertices") -> None:
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise TempehDataError(path, f"{what} must be (N, 3), got shape {verts.shape}")
    if verts.shape[0] == 0:
        raise TempehDataError(path, f"file has no {what}")
    finite = np.isfinite(verts).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise TempehDataError(path, f"{len(bad)} {what} contain NaN or inf (first: index {bad[0]})")


def _check_faces(path: Path, faces: np.ndarray, num_verts: int) -> None:
    if faces.size and (faces.min() < 0 or faces.max() >= num_verts):
        bad = np.flatnonzero(((faces < 0) | (faces >= num_verts)).any(axis=1))[0]
        raise TempehDataError(path, f"face {bad} has vertex index {faces[bad].tolist()} out of "
                                    f"range [0, {num_verts})")


# ---------------------------------------------------------------------------- public API
def read_mesh(path: PathLike, units: str = "m") -> Tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh from .ply (ASCII or binary, extra vertex properties allowed) or .obj.

    Args:
        path: the mesh file.
        units: unit of the coordinates in the FILE (``"m"``, ``"cm"`` or ``"mm"``).
    Returns:
        verts: ``(N, 3)`` float64, mm, in file order (nothing merged or dropped).
        faces: ``(F, 3)`` int64 vertex indices (``F >= 1``).
    Raises:
        TempehDataError naming the file for a missing, truncated or corrupt file, NaN/inf
        coordinates, a file without faces, or a face index out of range.
    """
    scale = unit_scale(units)
    path = _check_file(path, MESH_SUFFIXES)
    if path.suffix.lower() == ".ply":
        data = _read_ply(path)
        verts = _ply_vertices(path, data)
        faces = _ply_faces(path, data)
    else:
        verts, faces = _read_obj(path)
    _check_verts(path, verts)
    if faces.shape[0] == 0:
        raise TempehDataError(path, "mesh has no faces (use read_points for point clouds)")
    _check_faces(path, faces, verts.shape[0])
    return verts * scale, faces.astype(np.int64)


def read_points(path: PathLike, units: str = "mm") -> np.ndarray:
    """Read a scan as points: .ply vertices (faces ignored), .obj ``v`` records, or .npy.

    Args:
        path: ``.ply``, ``.obj`` or ``.npy`` (an ``(P, 3)`` numeric array, loaded with
            ``allow_pickle=False``).
        units: unit of the coordinates in the FILE (scans are usually ``"mm"``).
    Returns:
        ``(P, 3)`` float64 points, mm (``P >= 1``).
    """
    scale = unit_scale(units)
    path = _check_file(path, POINT_SUFFIXES)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as err:  # pickled object arrays, bad header, truncated data
            raise TempehDataError(path, f"cannot load .npy: {err}") from None
        except (OSError, EOFError) as err:
            raise TempehDataError(path, f"cannot read .npy: {err}") from None
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TempehDataError(path, f"points must be numeric, got dtype {arr.dtype}")
        pts = np.asarray(arr, dtype=np.float64)
    elif suffix == ".ply":
        pts = _ply_vertices(path, _read_ply(path))
    else:
        pts, _ = _read_obj(path, want_faces=False)
    _check_verts(path, pts, what="points")
    return pts * scale


def _colors_u8(colors, n: int, what: str) -> Optional[np.ndarray]:
    if colors is None:
        return None
    c = np.asarray(colors)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] not in (3, 4):
        raise ValueError(f"{what} must be (N, 3) or (N, 4) for N={n}, got {c.shape}")
    if np.issubdtype(c.dtype, np.floating):
        if not np.all(np.isfinite(c)) or c.min() < 0 or c.max() > 1:
            raise ValueError(f"float {what} must be finite and in [0, 1]")
        c = np.round(c * 255.0)
    elif c.min() < 0 or c.max() > 255:
        raise ValueError(f"integer {what} must be in [0, 255]")
    return c.astype(np.uint8)


def _ply_bytes(verts_file: np.ndarray, faces: Optional[np.ndarray],
               colors: Optional[np.ndarray], dtype: str) -> bytes:
    """Binary little-endian PLY: x, y, z (float or double) [, red, green, blue[, alpha]]."""
    ptype = {"f4": "float", "f8": "double"}[dtype]
    n = verts_file.shape[0]
    header = ["ply", "format binary_little_endian 1.0", "comment written by tempeh",
              f"element vertex {n}", f"property {ptype} x", f"property {ptype} y",
              f"property {ptype} z"]
    fields = [("x", "<" + dtype), ("y", "<" + dtype), ("z", "<" + dtype)]
    if colors is not None:
        names = ("red", "green", "blue", "alpha")[:colors.shape[1]]
        header += [f"property uchar {c}" for c in names]
        fields += [(c, "u1") for c in names]
    if faces is not None:
        header += [f"element face {faces.shape[0]}", "property list uchar int vertex_indices"]
    header.append("end_header")
    vt = np.empty(n, dtype=np.dtype(fields))
    for i, k in enumerate("xyz"):
        vt[k] = verts_file[:, i]
    if colors is not None:
        for i, c in enumerate(("red", "green", "blue", "alpha")[:colors.shape[1]]):
            vt[c] = colors[:, i]
    parts = [("\n".join(header) + "\n").encode("ascii"), vt.tobytes()]
    if faces is not None:
        ft = np.empty(faces.shape[0], dtype=np.dtype([("n", "u1"), ("idx", "<i4", (3,))]))
        ft["n"] = 3
        ft["idx"] = faces
        parts.append(ft.tobytes())
    return b"".join(parts)


def _validate_for_write(verts_mm, faces) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    v = np.asarray(verts_mm, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be (N, 3) mm, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("vertices contain NaN or inf; refusing to write")
    f = None
    if faces is not None:
        f = np.asarray(faces)
        if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
            raise ValueError(f"faces must be (F, 3) integers, got {f.dtype} {f.shape}")
        if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
            raise ValueError(f"face index out of range [0, {v.shape[0]})")
        f = f.astype(np.int64)
    return v, f


def write_mesh(path: PathLike, verts_mm, faces, units: str = "m", vertex_colors=None,
               double: bool = False) -> Path:
    """Write a triangle mesh atomically; the format follows the suffix.

    Args:
        path: ``.ply`` (binary little-endian) or ``.obj`` (ASCII, ``v x y z [r g b]`` with
            colours as floats in [0, 1]). Parent folders are created.
        verts_mm: ``(N, 3)`` vertices, mm.
        faces: ``(F, 3)`` int vertex indices (0-based).
        units: unit written to the FILE (``"m"`` for FLAME-style registrations).
        vertex_colors: optional ``(N, 3|4)`` uint8, or float in [0, 1].
        double: write PLY coordinates as float64 instead of float32.
    Returns:
        ``Path(path)``.
    """
    path = Path(path)
    scale = unit_scale(units)
    v, f = _validate_for_write(verts_mm, faces)
    if f is None:
        raise ValueError("write_mesh needs faces; use write_points for point clouds")
    colors = _colors_u8(vertex_colors, v.shape[0], "vertex_colors")
    vf = v / scale
    suffix = path.suffix.lower()
    if suffix == ".ply":
        data = _ply_bytes(vf, f, colors, "f8" if double else "f4")
    elif suffix == ".obj":
        buf = io.BytesIO()
        buf.write(b"# written by tempeh, units: " + units.encode() + b"\n")
        if colors is None:
            np.savetxt(buf, vf, fmt="v %.10g %.10g %.10g")
        else:
            np.savetxt(buf, np.concatenate([vf, colors[:, :3] / 255.0], 1),
                       fmt="v %.10g %.10g %.10g %.6g %.6g %.6g")
        np.savetxt(buf, f + 1, fmt="f %d %d %d")
        data = buf.getvalue()
    else:
        raise ValueError(f"{path}: unsupported mesh suffix '{path.suffix}' (use .ply or .obj)")
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return path


def write_points(path: PathLike, pts_mm, units: str = "mm", colors=None) -> Path:
    """Write a point cloud atomically: ``.ply`` (binary, vertices only, float32, optional
    colours) or ``.npy`` (``(P, 3)`` float32). ``pts_mm``: ``(P, 3)`` mm; ``units`` is the
    unit written to the FILE. Returns ``Path(path)``."""
    path = Path(path)
    scale = unit_scale(units)
    v, _ = _validate_for_write(pts_mm, None)
    pf = v / scale
    suffix = path.suffix.lower()
    if suffix == ".ply":
        data = _ply_bytes(pf, None, _colors_u8(colors, v.shape[0], "colors"), "f4")
    elif suffix == ".npy":
        if colors is not None:
            raise ValueError(".npy point files hold (P, 3) coordinates only; colors need .ply")
        buf = io.BytesIO()
        np.save(buf, pf.astype(np.float32), allow_pickle=False)
        data = buf.getvalue()
    else:
        raise ValueError(f"{path}: unsupported point-cloud suffix '{path.suffix}' (use .ply or .npy)")
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return path
