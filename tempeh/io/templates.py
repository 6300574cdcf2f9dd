"""Load and save registration templates: a triangle mesh + an NPZ of named vertex regions.

Files (see ``data_specs/template.md``):

* mesh: ``.obj`` or ``.ply``, in ``units`` (FLAME-style templates are metres);
* regions: ``.npz`` whose 1-D integer arrays are named vertex-index lists (``face``,
  ``scalp``, ...); 0-d integer scalars are metadata and are CHECKED, not loaded as regions:
  ``vertex_count`` must equal the mesh's vertex count. Loaded with ``allow_pickle=False``.
* a template folder holds ``template.obj`` or ``template.ply``, ``regions.npz`` (optional) and
  an optional ``template.json`` ``{"name": str, "units": "m"|"cm"|"mm"}``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from tempeh.io.jsonio import read_json
from tempeh.errors import TempehDataError
from tempeh.io.mesh import atomic_write, read_mesh, unit_scale, write_mesh
from tempeh.template import Template

logger = logging.getLogger(__name__)

__all__ = ["load_regions", "load_template", "load_template_dir", "save_template_dir"]

PathLike = Union[str, os.PathLike]

#: Scalar metadata keys allowed in a regions NPZ, and what each is checked against.
_REGION_META_KEYS = ("vertex_count",)


def load_regions(path: PathLike, num_verts: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Read a regions NPZ.

    Args:
        path: ``.npz`` of named 1-D integer vertex-index arrays (plus optional scalar
            ``vertex_count``).
        num_verts: when given, ``vertex_count`` (if present) must equal it.
    Returns:
        name -> int64 index array (ranges are checked later by ``Template.validate``).
    """
    path = Path(path)
    if not path.is_file():
        raise TempehDataError(path, "regions file not found")
    regions: Dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                arr = data[key]
                if arr.ndim == 0:
                    if key not in _REGION_META_KEYS:
                        raise TempehDataError(path, f"key '{key}': scalar value is not a region "
                                                    f"(known scalar keys: {', '.join(_REGION_META_KEYS)})")
                    if not np.issubdtype(arr.dtype, np.integer):
                        raise TempehDataError(path, f"key '{key}' must be an integer, got {arr.dtype}")
                    if num_verts is not None and int(arr) != num_verts:
                        raise TempehDataError(path, f"key 'vertex_count' is {int(arr)} but the "
                                                    f"template mesh has {num_verts} vertices")
                    continue
                if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                    raise TempehDataError(path, f"region '{key}' must be a 1-D integer vertex-index "
                                                f"array, got dtype {arr.dtype} shape {arr.shape}")
                regions[key] = arr.astype(np.int64)
    except TempehDataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise TempehDataError(path, f"cannot read regions NPZ: {err}") from None
    return regions


def load_template(mesh_path: PathLike, regions_path: Optional[PathLike] = None, units: str = "m",
                  name: Optional[str] = None) -> Template:
    """Load a template mesh (in ``units``; returned in mm) and optional regions NPZ.

    Returns a validated :class:`~tempeh.template.Template` (verts ``(N, 3)`` float64 mm,
    faces ``(F, 3)`` int64). ``name`` defaults to the mesh file's stem.
    """
    mesh_path = Path(mesh_path)
    verts, faces = read_mesh(mesh_path, units=units)
    regions: Dict[str, np.ndarray] = {}
    if regions_path is not None:
        regions = load_regions(regions_path, num_verts=verts.shape[0])
        Template(verts, faces, regions, name or mesh_path.stem).validate(source=str(regions_path))
    tpl = Template(verts, faces, regions, name or mesh_path.stem)
    return tpl.validate(source=str(mesh_path))


def _read_template_json(path: Path) -> dict:
    meta = read_json(path, dict, "must hold a JSON object {\"name\": ..., \"units\": ...}")
    unknown = set(meta) - {"name", "units"}
    if unknown:
        raise TempehDataError(path, f"unknown key(s) {sorted(unknown)} (allowed: name, units)")
    if "name" in meta and not isinstance(meta["name"], str):
        raise TempehDataError(path, "key 'name' must be a string")
    if "units" in meta:
        try:
            unit_scale(meta["units"])
        except ValueError as err:
            raise TempehDataError(path, f"key 'units': {err}") from None
    return meta


def load_template_dir(directory: PathLike) -> Template:
    """Load ``template.obj`` or ``template.ply`` (exactly one), ``regions.npz`` (optional) and
    ``template.json`` (optional: ``name``, ``units``; default units ``"m"``, name = folder name)
    from ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TempehDataError(directory, "template folder not found")
    meshes = [directory / n for n in ("template.obj", "template.ply") if (directory / n).is_file()]
    if not meshes:
        raise TempehDataError(directory, "no template.obj or template.ply in the template folder")
    if len(meshes) > 1:
        raise TempehDataError(directory, "both template.obj and template.ply exist; keep one")
    meta = {}
    if (directory / "template.json").is_file():
        meta = _read_template_json(directory / "template.json")
    regions = directory / "regions.npz"
    return load_template(meshes[0], regions if regions.is_file() else None,
                         units=meta.get("units", "m"), name=meta.get("name", directory.name))


def save_template_dir(directory: PathLike, template: Template, units: str = "m") -> Path:
    """Write ``template.ply`` (float64 coordinates in ``units``), ``regions.npz`` (with
    ``vertex_count``) and ``template.json`` into ``directory`` (created). Atomic per file."""
    directory = Path(directory)
    unit_scale(units)
    template.validate(source=template.name)
    directory.mkdir(parents=True, exist_ok=True)
    stale = directory / "template.obj"
    if stale.exists():
        raise TempehDataError(stale, "a template.obj already exists here; remove it first so "
                                     "the folder holds exactly one template mesh")
    write_mesh(directory / "template.ply", template.verts, template.faces, units=units, double=True)
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in template.regions.items()}
    arrays["vertex_count"] = np.asarray(template.num_verts, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_write(directory / "regions.npz", "wb") as fh:
        fh.write(buf.getvalue())
    with atomic_write(directory / "template.json", "w") as fh:
        json.dump({"name": template.name, "units": units}, fh, indent=2)
        fh.write("\n")
    return directory
