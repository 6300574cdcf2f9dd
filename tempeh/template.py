"""The registration template: a triangle mesh plus named vertex regions.

Any template works (our procedural head, FLAME, a lab's own); nothing assumes a vertex count.
Region names follow the FLAME ``vertex_masks2.npz`` convention (see ``data_specs/template.md``):
``face, scalp, neck, left_ear, right_ear, left_eyeball, right_eyeball, left_eye_region,
right_eye_region, lips, nostrils, boundary``. Regions may overlap; missing regions are allowed
(a loss that needs one says so by name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from tempeh.errors import TempehDataError

REGION_NAMES = (
    "face", "scalp", "neck", "left_ear", "right_ear", "left_eyeball", "right_eyeball",
    "left_eye_region", "right_eye_region", "lips", "nostrils", "boundary",
)


@dataclass
class Template:
    """A template mesh in millimetres with named vertex regions.

    Fields:
        verts: ``(N, 3)`` float64, template (neutral) vertex positions, mm.
        faces: ``(F, 3)`` int64 vertex indices, counter-clockwise seen from outside.
        regions: name -> sorted unique int64 vertex indices.
        name: a short identifier written into manifests.
    """

    verts: np.ndarray
    faces: np.ndarray
    regions: Dict[str, np.ndarray] = field(default_factory=dict)
    name: str = "template"

    @property
    def num_verts(self) -> int:
        return int(self.verts.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def region_mask(self, name: str) -> np.ndarray:
        """``(N,)`` bool mask of region ``name`` (KeyError naming the region if absent)."""
        if name not in self.regions:
            raise KeyError(f"template '{self.name}' has no region '{name}' "
                           f"(has: {', '.join(sorted(self.regions))})")
        m = np.zeros(self.num_verts, dtype=bool)
        m[self.regions[name]] = True
        return m

    def validate(self, source: Optional[str] = None) -> "Template":
        """Check shapes, dtypes, finiteness and index ranges; raise TempehDataError naming
        ``source`` (the file) and the offending region or field. Returns self."""
        src = source or self.name
        v = np.asarray(self.verts)
        f = np.asarray(self.faces)
        if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] < 3:
            raise TempehDataError(src, f"template vertices must be (N>=3, 3), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise TempehDataError(src, "template vertices contain NaN or inf")
        if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] < 1:
            raise TempehDataError(src, f"template faces must be (F>=1, 3) triangles, got {f.shape}")
        if not np.issubdtype(f.dtype, np.integer):
            raise TempehDataError(src, f"template faces must be integers, got {f.dtype}")
        if f.min() < 0 or f.max() >= v.shape[0]:
            raise TempehDataError(src, f"face index out of range [0, {v.shape[0]}): "
                                       f"min {f.min()}, max {f.max()}")
        for name, idx in self.regions.items():
            idx = np.asarray(idx)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise TempehDataError(src, f"region '{name}' must be a 1-D integer index array, "
                                           f"got dtype {idx.dtype} shape {idx.shape}")
            if idx.size and (idx.min() < 0 or idx.max() >= v.shape[0]):
                bad = idx[(idx < 0) | (idx >= v.shape[0])]
                raise TempehDataError(src, f"region '{name}' has vertex index {int(bad[0])} out of "
                                           f"range [0, {v.shape[0]})")
        self.verts = v.astype(np.float64)
        self.faces = f.astype(np.int64)
        self.regions = {k: np.unique(np.asarray(i, dtype=np.int64)) for k, i in self.regions.items()}
        return self
