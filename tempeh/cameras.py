"""Batched pinhole cameras with OpenCV distortion: the one camera convention of tempeh.

Convention (the same everywhere in the code base, see ``data_specs/cameras.md``):

* World -> camera: ``X_cam = R @ X_world + t`` (column vectors). x right, y down, z forward.
  Camera centre ``C = -R^T t``; viewing direction (optical axis in world) ``R^T (0, 0, 1)``.
* Units: millimetres for ``t`` and every 3D point.
* Intrinsics ``K`` (3x3): ``[u, v, 1]^T = K [x_d, y_d, 1]^T`` with the distorted normalised
  coordinates ``(x_d, y_d)``. The full matrix is used, so a skew term is honoured.
* Distortion: OpenCV order ``(k1, k2, p1, p2, k3)``; zeros mean an ideal pinhole::

      x, y = X/Z, Y/Z;  r2 = x^2 + y^2
      radial = 1 + k1 r2 + k2 r2^2 + k3 r2^3
      x_d = x radial + 2 p1 x y + p2 (r2 + 2 x^2)
      y_d = y radial + p1 (r2 + 2 y^2) + 2 p2 x y

* Pixels: ``(u, v)`` with u along the width (column) and v along the height (row). The origin
  is the CENTRE of the top-left pixel, so pixel centres have integer coordinates and the image
  covers ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
* ``grid_sample`` with ``align_corners=False`` is reached only through :func:`pixels_to_grid`.

A :class:`Cameras` holds any batch shape ``S`` (usually ``(V,)`` or ``(B, V)``); every field
has that leading shape. All methods are pure: they return new objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "Cameras",
    "distort_normalized",
    "undistort_normalized",
    "pixels_to_grid",
    "look_at_rotation",
]


def _distort_components(x: Tensor, y: Tensor, dist: Tensor) -> Tuple[Tensor, Tensor]:
    """OpenCV distortion of ``x, y`` (``(*S, P)`` normalised) with ``dist`` ``(*S, 5)``."""
    k1, k2, p1, p2, k3 = [dist[..., i : i + 1] for i in range(5)]  # each (*S, 1)
    xx, yy, xy = x * x, y * y, x * y
    r2 = xx + yy
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * xy + p2 * (r2 + 2 * xx)
    yd = y * radial + p1 * (r2 + 2 * yy) + 2 * p2 * xy
    return xd, yd


def distort_normalized(xy: Tensor, dist: Tensor) -> Tensor:
    """Apply OpenCV distortion to normalised image coordinates.

    Args:
        xy: ``(*S, P, 2)`` undistorted normalised coordinates ``(X/Z, Y/Z)``.
        dist: ``(*S, 5)`` coefficients ``(k1, k2, p1, p2, k3)``.
    Returns:
        ``(*S, P, 2)`` distorted normalised coordinates.
    """
    xd, yd = _distort_components(xy[..., 0], xy[..., 1], dist)
    return torch.stack([xd, yd], dim=-1)


def undistort_normalized(xy_d: Tensor, dist: Tensor, iterations: int = 20) -> Tensor:
    """Invert :func:`distort_normalized` by Newton iterations on the exact model.

    Converges to machine precision in a few steps for the moderate distortion of capture
    lenses (monotonic radial profile over the image); stops early once every step is at
    rounding level (at most ``iterations`` steps). Not differentiable by design.

    Args:
        xy_d: ``(*S, P, 2)`` distorted normalised coordinates.
        dist: ``(*S, 5)`` coefficients ``(k1, k2, p1, p2, k3)``.
    Returns:
        ``(*S, P, 2)`` undistorted normalised coordinates.
    """
    with torch.no_grad():
        k1, k2, p1, p2, k3 = [dist[..., i : i + 1] for i in range(5)]
        xt, yt = xy_d[..., 0].contiguous(), xy_d[..., 1].contiguous()
        x, y = xt.clone(), yt.clone()
        tol = 4 * torch.finfo(xy_d.dtype).eps
        for _ in range(iterations):
            xx, yy, xy = x * x, y * y, x * y
            r2 = xx + yy
            radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
            dradial = k1 + r2 * (2 * k2 + 3 * k3 * r2)  # d radial / d r2
            fx = x * radial + 2 * p1 * xy + p2 * (r2 + 2 * xx) - xt
            fy = y * radial + p1 * (r2 + 2 * yy) + 2 * p2 * xy - yt
            # Jacobian of the distortion map.
            j00 = radial + 2 * xx * dradial + 2 * p1 * y + 6 * p2 * x
            j01 = 2 * xy * dradial + 2 * p1 * x + 2 * p2 * y  # = j10
            j11 = radial + 2 * yy * dradial + 6 * p1 * y + 2 * p2 * x
            det = j00 * j11 - j01 * j01
            det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
            dx = (j11 * fx - j01 * fy) / det
            dy = (j00 * fy - j01 * fx) / det
            x = x - dx
            y = y - dy
            # stop once every Newton step is at rounding level (relative to the coordinate)
            step = torch.maximum(dx.abs(), dy.abs()) / (1 + torch.maximum(x.abs(), y.abs()))
            if step.numel() == 0 or float(step.max()) <= tol:
                break
        return torch.stack([x, y], dim=-1)


def pixels_to_grid(uv: Tensor, width: Union[int, Tensor], height: Union[int, Tensor]) -> Tensor:
    """Map pixel coordinates to ``F.grid_sample`` coordinates for ``align_corners=False``.

    With the pixel origin at the centre of the top-left pixel, pixel ``u`` maps to
    ``x = (2u + 1) / W - 1`` (so ``u = -0.5`` -> -1 and ``u = W - 0.5`` -> +1), likewise v with H.
    This is the only place in tempeh where that mapping is written.

    Args:
        uv: ``(..., 2)`` pixels.
        width, height: image size in pixels (ints, or tensors broadcastable to ``uv[..., 0]``).
    Returns:
        ``(..., 2)`` normalised coordinates for ``grid_sample(..., align_corners=False)``.
    """
    w = torch.as_tensor(width, dtype=uv.dtype, device=uv.device)
    h = torch.as_tensor(height, dtype=uv.dtype, device=uv.device)
    return torch.stack([(2 * uv[..., 0] + 1) / w - 1, (2 * uv[..., 1] + 1) / h - 1], dim=-1)


def _as_float(x, dtype=None, device=None) -> Tensor:
    t = torch.as_tensor(x, device=device)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t.to(dtype) if dtype is not None else t


@dataclass(frozen=True)
class Cameras:
    """A batch of calibrated cameras (OpenCV model, world->camera, millimetres).

    Fields (``S`` is the batch shape, e.g. ``(V,)`` or ``(B, V)``):
        K: ``(*S, 3, 3)`` intrinsics in pixels.
        R: ``(*S, 3, 3)`` world->camera rotation.
        t: ``(*S, 3)`` world->camera translation, mm.
        dist: ``(*S, 5)`` distortion ``(k1, k2, p1, p2, k3)``.
        width, height: ``(*S,)`` int64 image size in pixels.
        names: optional camera names, one per entry of the LAST batch axis (views).
    """

    K: Tensor
    R: Tensor
    t: Tensor
    dist: Tensor
    width: Tensor
    height: Tensor
    names: Optional[Tuple[str, ...]] = field(default=None)

    def __post_init__(self):
        S = tuple(self.K.shape[:-2])
        checks = {
            "K": (self.K, S + (3, 3)),
            "R": (self.R, S + (3, 3)),
            "t": (self.t, S + (3,)),
            "dist": (self.dist, S + (5,)),
            "width": (self.width, S),
            "height": (self.height, S),
        }
        for name, (value, shape) in checks.items():
            if tuple(value.shape) != shape:
                raise ValueError(f"Cameras.{name} has shape {tuple(value.shape)}, expected {shape}")
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
            if len(S) == 0 or len(self.names) != S[-1]:
                raise ValueError(f"Cameras.names has {len(self.names)} entries for batch shape {S}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        K,
        R,
        t,
        width,
        height,
        dist=None,
        names: Optional[Sequence[str]] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> "Cameras":
        """Build from array-likes, broadcasting ``width``/``height`` and defaulting ``dist`` to 0."""
        K = _as_float(K, dtype, device)
        dtype = K.dtype
        device = K.device
        R = _as_float(R, dtype, device)
        t = _as_float(t, dtype, device)
        S = tuple(K.shape[:-2])
        if dist is None:
            dist = torch.zeros(S + (5,), dtype=dtype, device=device)
        dist = _as_float(dist, dtype, device)
        if dist.shape[-1] < 5:  # (k1, k2) or (k1, k2, p1, p2) are padded with zeros
            pad = torch.zeros(dist.shape[:-1] + (5 - dist.shape[-1],), dtype=dtype, device=device)
            dist = torch.cat([dist, pad], dim=-1)
        width = torch.as_tensor(width, dtype=torch.int64, device=device).expand(S).clone()
        height = torch.as_tensor(height, dtype=torch.int64, device=device).expand(S).clone()
        return cls(K, R, t, dist, width, height, tuple(names) if names is not None else None)

    @property
    def batch_shape(self) -> Tuple[int, ...]:
        return tuple(self.K.shape[:-2])

    @property
    def dtype(self) -> torch.dtype:
        return self.K.dtype

    @property
    def device(self) -> torch.device:
        return self.K.device

    def __len__(self) -> int:
        return self.batch_shape[0]

    def _replace(self, **kw) -> "Cameras":
        d = dict(K=self.K, R=self.R, t=self.t, dist=self.dist, width=self.width,
                 height=self.height, names=self.names)
        d.update(kw)
        return Cameras(**d)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Cameras":
        """Move to a device and/or cast the float fields to ``dtype``."""
        f = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        return self._replace(K=f(self.K), R=f(self.R), t=f(self.t), dist=f(self.dist),
                             width=self.width.to(device), height=self.height.to(device))

    def __getitem__(self, idx) -> "Cameras":
        """Index the batch axes like a tensor.

        Names follow when the result's last axis is still the view axis with the same views in
        every row (e.g. ``cams[b]``, ``cams[:, [2, 0]]``); otherwise (``cams[:, v]``,
        per-row view choices, a scalar) the result has no names.
        """
        K = self.K[idx]
        names = self.names
        if names is not None:
            S = self.batch_shape
            lead = 1
            for s in S[:-1]:
                lead *= s
            view = torch.arange(S[-1]).expand(S)[idx]
            row = torch.arange(lead).reshape(S[:-1] + (1,)).expand(S)[idx]
            names = None
            if view.dim() > 0 and view.numel() > 0:
                view = view.reshape(-1, view.shape[-1])
                row = row.reshape(-1, row.shape[-1])
                if bool((row == row[:, :1]).all()) and bool((view == view[:1]).all()):
                    names = tuple(self.names[i] for i in view[0].tolist())
            elif view.dim() > 0:  # empty selection along some axis
                names = tuple() if view.shape[-1] == 0 else None
        return Cameras(K, self.R[idx], self.t[idx], self.dist[idx], self.width[idx],
                       self.height[idx], names)

    @staticmethod
    def stack(cams: Sequence["Cameras"], dim: int = 0) -> "Cameras":
        """Stack cameras with equal batch shapes along a new axis ``dim`` (e.g. batch B)."""
        if len(cams) == 0:
            raise ValueError("Cameras.stack needs at least one Cameras")
        nd = len(cams[0].batch_shape)
        d = dim if dim >= 0 else dim + nd + 1
        # A new axis in front keeps the view axis last (names kept); a new last axis replaces it.
        names = cams[0].names if d < nd else None
        return Cameras(*(torch.stack([getattr(c, f) for c in cams], dim=d)
                         for f in ("K", "R", "t", "dist", "width", "height")), names=names)

    @staticmethod
    def cat(cams: Sequence["Cameras"]) -> "Cameras":
        """Concatenate along the view axis (the last batch axis)."""
        if len(cams) == 0:
            raise ValueError("Cameras.cat needs at least one Cameras")
        names = None
        if all(c.names is not None for c in cams):
            names = tuple(n for c in cams for n in c.names)
        nd = len(cams[0].batch_shape)
        return Cameras(
            torch.cat([c.K for c in cams], dim=nd - 1), torch.cat([c.R for c in cams], dim=nd - 1),
            torch.cat([c.t for c in cams], dim=nd - 1), torch.cat([c.dist for c in cams], dim=nd - 1),
            torch.cat([c.width for c in cams], dim=nd - 1),
            torch.cat([c.height for c in cams], dim=nd - 1), names)

    # ------------------------------------------------------------------ geometry
    def centers(self) -> Tensor:
        """Camera centres ``C = -R^T t``: ``(*S, 3)`` world, mm."""
        return -(self.R.transpose(-1, -2) @ self.t.unsqueeze(-1)).squeeze(-1)

    def view_dirs(self) -> Tensor:
        """Optical axes in world coordinates ``R^T (0, 0, 1)``: ``(*S, 3)``, unit length."""
        return self.R[..., 2, :]

    def world_to_camera(self, points: Tensor) -> Tensor:
        """``(*S, P, 3)`` world mm -> ``(*S, P, 3)`` camera frame mm (broadcasts over ``S``)."""
        # einsum folds the views into one GEMM when points broadcast over them (~10x faster
        # on CPU than a broadcast matmul of many (P, 3) x (3, 3) products).
        return torch.einsum("...ij,...pj->...pi", self.R, points) + self.t.unsqueeze(-2)

    def project(self, points: Tensor, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
        """Project world points to pixels with distortion.

        Args:
            points: ``(*S', P, 3)`` world, mm, where ``S'`` broadcasts with the camera batch
                shape (e.g. points ``(B, 1, P, 3)`` against cameras ``(B, V)``).
        Returns:
            uv: ``(*S, P, 2)`` pixels (origin at the centre of the top-left pixel).
            depth: ``(*S, P)`` camera-frame z in mm. Points with ``depth <= 0`` are behind the
                camera; their ``uv`` is finite but meaningless (callers mask them).
        """
        # camera coordinates as (*S, 3, P) so that x, y, z are contiguous rows
        xc = torch.einsum("...ij,...pj->...ip", self.R, points) + self.t.unsqueeze(-1)
        x, y, z = xc.unbind(-2)
        zs = torch.where(z.abs() < eps, torch.full_like(z, eps), z)
        inv_z = 1.0 / zs
        x = x * inv_z
        y = y * inv_z
        dist = self.dist
        if torch.any(dist != 0):
            x, y = _distort_components(x, y, dist)
        K = self.K
        u = K[..., 0, 0:1] * x + K[..., 0, 1:2] * y + K[..., 0, 2:3]
        v = K[..., 1, 0:1] * x + K[..., 1, 1:2] * y + K[..., 1, 2:3]
        return torch.stack([u, v], dim=-1), z

    def pixel_rays(self, uv: Tensor) -> Tuple[Tensor, Tensor]:
        """Back-project pixels (through the lens distortion) to world rays.

        Args:
            uv: ``(*S, P, 2)`` pixels.
        Returns:
            origins: ``(*S, 1, 3)`` camera centres, world mm (broadcast over P).
            dirs: ``(*S, P, 3)`` unit ray directions in world coordinates.
        """
        Kinv = torch.linalg.inv(self.K)
        u, v = uv[..., 0], uv[..., 1]
        xy_d = torch.stack([Kinv[..., 0, 0:1] * u + Kinv[..., 0, 1:2] * v + Kinv[..., 0, 2:3],
                            Kinv[..., 1, 0:1] * u + Kinv[..., 1, 1:2] * v + Kinv[..., 1, 2:3]],
                           dim=-1)
        xy = undistort_normalized(xy_d, self.dist) if torch.any(self.dist != 0) else xy_d
        d_cam = torch.cat([xy, torch.ones_like(xy[..., :1])], -1)
        d_world = torch.einsum("...ji,...pj->...pi", self.R, d_cam)  # R^T d
        d_world = d_world / d_world.norm(dim=-1, keepdim=True)
        return self.centers().unsqueeze(-2), d_world

    def in_image(self, uv: Tensor, depth: Optional[Tensor] = None) -> Tensor:
        """``(*S, P)`` bool: pixel inside ``[-0.5, W-0.5) x [-0.5, H-0.5)`` (and in front)."""
        w = self.width.to(uv.dtype).unsqueeze(-1)
        h = self.height.to(uv.dtype).unsqueeze(-1)
        ok = (uv[..., 0] >= -0.5) & (uv[..., 0] < w - 0.5) & (uv[..., 1] >= -0.5) & (uv[..., 1] < h - 0.5)
        if depth is not None:
            ok = ok & (depth > 0)
        return ok

    # ------------------------------------------------------------------ image operations
    def resize(self, scale: Union[float, Tuple[float, float], None] = None,
               size: Optional[Tuple[int, int]] = None) -> "Cameras":
        """Cameras for a resized image; exact under the pixel-centre convention.

        Either ``scale`` (uniform ``s`` or ``(sx, sy)``; the new size is ``round(W*sx)``) or
        ``size=(new_w, new_h)`` (then ``sx = new_w / W``, ``sy = new_h / H`` per camera).
        ``fx' = fx*sx``, ``cx' = (cx + 0.5)*sx - 0.5`` (same for y). Distortion is unchanged:
        it acts on normalised coordinates, not on pixels.
        """
        if (scale is None) == (size is None):
            raise ValueError("Cameras.resize takes exactly one of scale= or size=")
        W = self.width.to(self.dtype)
        H = self.height.to(self.dtype)
        if size is not None:
            new_w = torch.full_like(self.width, int(size[0]))
            new_h = torch.full_like(self.height, int(size[1]))
            sx, sy = new_w.to(self.dtype) / W, new_h.to(self.dtype) / H
        else:
            sxf, syf = (scale, scale) if isinstance(scale, (int, float)) else scale
            new_w = torch.round(W * sxf).to(torch.int64)
            new_h = torch.round(H * syf).to(torch.int64)
            sx = torch.full_like(W, float(sxf))
            sy = torch.full_like(H, float(syf))
        A = torch.zeros(self.batch_shape + (3, 3), dtype=self.dtype, device=self.device)
        A[..., 0, 0] = sx
        A[..., 0, 2] = 0.5 * sx - 0.5
        A[..., 1, 1] = sy
        A[..., 1, 2] = 0.5 * sy - 0.5
        A[..., 2, 2] = 1
        return self._replace(K=A @ self.K, width=new_w, height=new_h)

    def crop(self, x0, y0, width: int, height: int) -> "Cameras":
        """Cameras for the crop ``image[y0:y0+height, x0:x0+width]`` (offsets may be negative
        for padding, and may be per-camera tensors of shape ``S``)."""
        x0 = torch.as_tensor(x0, dtype=self.dtype, device=self.device)
        y0 = torch.as_tensor(y0, dtype=self.dtype, device=self.device)
        K = self.K.clone()
        K[..., 0, 2] = K[..., 0, 2] - x0
        K[..., 1, 2] = K[..., 1, 2] - y0
        return self._replace(K=K, width=torch.full_like(self.width, int(width)),
                             height=torch.full_like(self.height, int(height)))

    def rotate90(self, k: int = 1) -> "Cameras":
        """Cameras for the image rotated by ``k`` x 90 degrees counter-clockwise, i.e. for
        ``np.rot90(image, k)`` / ``torch.rot90(image, k, dims=(-2, -1))``.

        Pixel ``(u, v)`` of a ``W x H`` image goes to ``(v, W - 1 - u)``. The camera frame is
        rotated about its optical axis so the model stays an OpenCV camera: ``R' = Rz R``,
        ``t' = Rz t``, ``K' = M K Rz^T``; radial terms are unchanged and the tangential terms
        rotate with the frame (``p1' = -p2``, ``p2' = p1``).
        """
        cam = self
        for _ in range(k % 4):
            cam = cam._rotate90_once()
        return cam

    def _rotate90_once(self) -> "Cameras":
        dt, dev = self.dtype, self.device
        Rz = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=dt, device=dev)
        M = torch.zeros(self.batch_shape + (3, 3), dtype=dt, device=dev)
        M[..., 0, 1] = 1
        M[..., 1, 0] = -1
        M[..., 1, 2] = self.width.to(dt) - 1
        M[..., 2, 2] = 1
        K = M @ self.K @ Rz.T
        d = self.dist
        dist = torch.stack([d[..., 0], d[..., 1], -d[..., 3], d[..., 2], d[..., 4]], dim=-1)
        return self._replace(K=K, R=Rz @ self.R, t=self.t @ Rz.T, dist=dist,
                             width=self.height.clone(), height=self.width.clone())

    # ------------------------------------------------------------------ numpy interop
    def numpy(self) -> dict:
        """Plain float64 numpy arrays (for writers and OpenCV)."""
        return {
            "K": self.K.detach().cpu().double().numpy(),
            "R": self.R.detach().cpu().double().numpy(),
            "t": self.t.detach().cpu().double().numpy(),
            "dist": self.dist.detach().cpu().double().numpy(),
            "width": self.width.cpu().numpy(),
            "height": self.height.cpu().numpy(),
            "names": list(self.names) if self.names is not None else None,
        }


def look_at_rotation(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """World->camera rotation for a camera at ``eye`` looking at ``target`` (OpenCV axes).

    ``up`` is the world direction that should appear UP in the image (camera -y).
    Shapes ``(..., 3)`` -> ``(..., 3, 3)``.
    """
    z = target - eye
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(z, up.expand_as(z))
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    y = torch.linalg.cross(z, x)
    return torch.stack([x, y, z], dim=-2)

