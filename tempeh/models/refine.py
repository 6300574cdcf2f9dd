"""Refinement stage: per-vertex local feature cubes -> 3D U-Net -> expected offset (paper 3.2).

Data flow for a batch (``B`` heads, ``V`` views, ``N`` template vertices)::

    images (B, V, 1, H, W) --FeatureNet2D--> feats (B, V, C, H, W)
    coarse (B, N, 3) mm (detached) --> vertex normals (B, N, 3) + visibility (B, V, N) (no grad)
    per chunk of vertices (n of N):
        local grids  (B, n, side^3, 3) mm, randomly rotated per vertex in training
        fuse_local   (B*n, 2C, side, side, side)   visibility/normal-weighted mean + variance
        + template   (B*n, 3, side, side, side)    template vertex position in cm (optional)
        UNet3D       (B*n, 1, side, side, side)    logits
        softmax over the side^3 points, expected offset = sum p * (R d0)   (B, n, 3) mm
    verts = coarse + offsets

The coarse vertices are inputs, not variables: they are detached, as in the reference (the
coarse model is trained separately and its outputs are cached), so no gradient flows into them.

Chunking and norms: the vertices are processed ``chunk_size`` at a time (the per-view sample
tensor and the U-Net activations then scale with the chunk, not with N), optionally with
``torch.utils.checkpoint`` per chunk (activations recomputed in the backward pass). For the
result to be independent of the chunk size, no layer may mix different vertices: BatchNorm
over the ``B*N`` cubes would (its batch statistics depend on which cubes share a chunk, and
the reference normalises over all 5023 cubes at once), so the U-Net uses GroupNorm (default),
InstanceNorm or no norm, all of which normalise each cube on its own. The 2D feature net runs on
the full ``B*V`` images before chunking, so its BatchNorm is unaffected.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..cameras import Cameras
from ..geometry.mesh_ops import vertex_normals
from ..geometry.rotations import random_rotations
from ..geometry.visibility import visibility
from .feature_net import FeatureNetConfig
from .local_fusion import FUSION_MODES, fuse_local, local_grids
from .soft_argmax import soft_argmax
from .unet3d import UNet3D

logger = logging.getLogger(__name__)

__all__ = ["RefineConfig", "RefineOutput", "RefineModel"]


@dataclass
class RefineConfig(FeatureNetConfig):
    """Refinement-stage model settings (defaults: the paper / reference values)."""

    grid_side: int = 8
    """Points per axis of each vertex's local grid (``d_r``); must be divisible by ``2**unet_pools``."""
    grid_spacing_mm: float = 2.0
    """Distance between neighbouring local grid points, mm. The grid spans
    ``+-(grid_side - 1) / 2 * grid_spacing_mm`` about the coarse vertex (+-7 mm by default),
    which bounds the correction per axis."""
    unet_levels: int = 3
    """Encoder/decoder levels of the 3D U-Net (3 in the reference refinement V2V)."""
    unet_pools: int = 2
    """How many levels pool (8^3 -> 4^3 -> 2^3 in the reference; the third level stays at 2^3)."""
    unet_widths: Tuple[int, ...] = (32, 64, 128, 128)
    """``unet_levels + 1`` channel widths of the U-Net."""
    unet_front_width: int = 16
    """Width of the U-Net's first (``unet_front_kernel``^3) conv block."""
    unet_front_kernel: int = 7
    """Kernel of the U-Net's first conv (7 in the reference)."""
    unet_back_widths: Tuple[int, ...] = (32, 32)
    """Widths of the 1x1 conv blocks before the 1-channel output conv."""
    unet_norm: str = "gn"
    """U-Net norm: ``gn`` (default), ``in`` or ``none``. ``bn`` is rejected: it mixes vertices,
    so chunked and unchunked results would differ (module docstring)."""
    head_init_gain: float = 0.01
    """Scale of the output conv's Xavier-initialised weights. Small logits give a near-uniform
    softmax over the symmetric grid, so the untrained refinement returns ~ the coarse mesh."""
    template_embedding: bool = True
    """Append the template vertex position as 3 constant channels per cube (the paper's vertex
    identifier ``v``); off: the cube has only the ``2 * d_f`` fused channels."""
    template_embedding_scale: float = 0.1
    """Unit of the template embedding per mm: 0.1 gives centimetres (as the paper/brief state;
    the reference code's factor on its mm template is reported as 0.01)."""
    fusion_mode: str = "visibility_normal"
    """View fusion: ``visibility_normal`` (eq. 3) or ``naive`` (masked mean/var, ablation)."""
    softplus_beta: float = 50.0
    """Sharpness of the Softplus in eq. 3; in-image occluded/grazing views get ``ln 2 / beta``."""
    chunk_size: Optional[int] = 512
    """Vertices per chunk through sampling, fusion and the U-Net (None: all at once). The
    result does not depend on it; the peak memory does. Paper scale on CPU (16 views of
    400x300): inference peaks at ~1.2 GiB with 512 (4.8 GiB unchunked); a training step with
    checkpointing needs ~4 MiB per chunk vertex on top of the feature net (use ~64 there)."""
    gradient_checkpointing: bool = False
    """Recompute each chunk's activations in the backward pass (``use_reentrant=False``)."""
    random_rotation: bool = True
    """Rotate every vertex's local grid by an independent uniform random rotation in training."""

    def __post_init__(self):
        if self.fusion_mode not in FUSION_MODES:
            raise ValueError(f"RefineConfig.fusion_mode: {self.fusion_mode!r} not in {FUSION_MODES}")
        if self.unet_norm == "bn":
            raise ValueError("RefineConfig.unet_norm='bn' is not supported: BatchNorm statistics "
                             "would mix vertices and depend on the chunk size; use gn, in or none")
        if self.grid_side % (2 ** self.unet_pools):
            raise ValueError(f"RefineConfig.grid_side={self.grid_side} must be divisible by "
                             f"2**unet_pools={2 ** self.unet_pools}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"RefineConfig.chunk_size must be >= 1 or None, got {self.chunk_size}")
        if len(self.unet_widths) < self.unet_levels + 1:
            raise ValueError(f"RefineConfig.unet_widths needs {self.unet_levels + 1} entries, "
                             f"got {self.unet_widths}")

    @classmethod
    def paper_scale(cls, **overrides) -> "RefineConfig":
        """The paper's refinement network (ResNet34 features, 8^3 x 2 mm grids, 3-level V2V)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "RefineConfig":
        """A ~40k-parameter model for tests and CPU smoke runs (4^3 x 2 mm grids, 1-level U-Net)."""
        kw = dict(grid_side=4, grid_spacing_mm=2.0, feature_channels=4, feature_blocks=(1, 1, 1, 1),
                  feature_widths=(8, 8, 16, 16), feature_stem_width=8, unet_levels=1, unet_pools=1,
                  unet_widths=(8, 8), unet_front_width=8, unet_front_kernel=3,
                  unet_back_widths=(8,), chunk_size=64)
        kw.update(overrides)
        return cls(**kw)


@dataclass
class RefineOutput:
    """Refinement results.

    Fields:
        verts: ``(B, N, 3)`` world, mm: refined vertices (``coarse + offsets``).
        offsets: ``(B, N, 3)`` world, mm: expected offsets from the coarse vertices.
        visibility: ``(B, V, N)`` bool: coarse-vertex visibility per view (no grad).
        normals: ``(B, N, 3)`` unit vertex normals of the coarse mesh (no grad).
    """

    verts: Tensor
    offsets: Tensor
    visibility: Tensor
    normals: Tensor


class RefineModel(nn.Module):
    """Refinement stage (see the module docstring).

    Args:
        cfg: :class:`RefineConfig`.
        template_verts: ``(N, 3)`` template vertices, mm (used for the embedding).
        faces: ``(F, 3)`` int64 template faces (normals and visibility of the coarse mesh).
    """

    def __init__(self, cfg: RefineConfig, template_verts, faces):
        super().__init__()
        self.cfg = cfg
        tv = torch.as_tensor(template_verts, dtype=torch.float32)
        if tv.ndim != 2 or tv.shape[1] != 3:
            raise ValueError(f"RefineModel: template_verts must be (N, 3), got {tuple(tv.shape)}")
        fc = torch.as_tensor(faces)
        if fc.ndim != 2 or fc.shape[1] != 3 or fc.is_floating_point():
            raise ValueError(f"RefineModel: faces must be (F, 3) integer, got {tuple(fc.shape)} {fc.dtype}")
        if fc.numel() and (int(fc.min()) < 0 or int(fc.max()) >= tv.shape[0]):
            raise ValueError(f"RefineModel: face indices out of range [0, {tv.shape[0]})")
        self.register_buffer("template_verts", tv, persistent=False)
        self.register_buffer("faces", fc.long(), persistent=False)
        self.feature_net = cfg.build_feature_net()
        in_ch = 2 * cfg.feature_channels + (3 if cfg.template_embedding else 0)
        self.unet = UNet3D(in_ch, 1, levels=cfg.unet_levels, widths=cfg.unet_widths,
                           front_kernel=cfg.unet_front_kernel, norm=cfg.unet_norm,
                           bottleneck_norm=cfg.unet_norm, front_width=cfg.unet_front_width,
                           back_widths=cfg.unet_back_widths, pools=cfg.unet_pools)
        with torch.no_grad():
            self.unet.head.weight.mul_(cfg.head_init_gain)

    @property
    def num_verts(self) -> int:
        return int(self.template_verts.shape[0])

    def _chunk_offsets(self, feats: Tensor, cameras: Cameras, verts: Tensor, normals: Tensor,
                       vis: Tensor, rotations: Optional[Tensor], embed: Optional[Tensor]) -> Tensor:
        """Expected offsets ``(B, n, 3)`` mm for one chunk of ``n`` vertices.

        ``verts, normals: (B, n, 3)``; ``vis: (B, V, n)``; ``rotations: (B, n, 3, 3)`` or None;
        ``embed: (n, 3)`` scaled template positions or None.
        """
        cfg = self.cfg
        B, n, _ = verts.shape
        side = cfg.grid_side
        cubes = fuse_local(feats, cameras, verts, normals, vis, side, cfg.grid_spacing_mm, rotations,
                           mode=cfg.fusion_mode, beta=cfg.softplus_beta, chunk_size=n)
        if embed is not None:
            e = embed.to(cubes.dtype).view(1, n, 3, 1, 1, 1).expand(B, n, 3, side, side, side)
            cubes = torch.cat([cubes, e.reshape(B * n, 3, side, side, side)], dim=1)
        logits = self.unet(cubes).reshape(B * n, 1, side ** 3)
        # the expectation runs in float32 even under autocast (offsets are mm-accurate)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            _, offsets = local_grids(verts, side, cfg.grid_spacing_mm, rotations)  # (B, n, G, 3)
            logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            return soft_argmax(logits, offsets.reshape(B * n, side ** 3, 3)).view(B, n, 3)

    def forward(self, images: Tensor, cameras: Cameras, coarse_verts: Tensor,
                generator: Optional[torch.Generator] = None) -> RefineOutput:
        """Refine coarse meshes.

        Args:
            images: ``(B, V, image_channels, H, W)`` images in [0, 1] (grey: 1 channel).
            cameras: ``(B, V)`` cameras of exactly these images (width ``W``, height ``H``).
            coarse_verts: ``(B, N, 3)`` world, mm, in the template topology (detached).
            generator: optional ``torch.Generator`` for the per-vertex grid rotations (used only
                in training mode with ``cfg.random_rotation``).
        Returns:
            :class:`RefineOutput`.
        """
        cfg = self.cfg
        if images.ndim != 5 or images.shape[2] != cfg.image_channels:
            raise ValueError(f"RefineModel: images must be (B, V, {cfg.image_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        B, V, Ci, H, W = images.shape
        if cameras.batch_shape != (B, V):
            raise ValueError(f"RefineModel: cameras have batch shape {cameras.batch_shape}, "
                             f"images are ({B}, {V})")
        if not (bool((cameras.width == W).all()) and bool((cameras.height == H).all())):
            raise ValueError(f"RefineModel: camera image sizes differ from the images ({W}x{H}); "
                             "resize the cameras with the images (Cameras.resize)")
        N = self.num_verts
        if coarse_verts.shape != (B, N, 3):
            raise ValueError(f"RefineModel: coarse_verts must be ({B}, {N}, 3), "
                             f"got {tuple(coarse_verts.shape)}")
        dtype = self.template_verts.dtype
        coarse = coarse_verts.detach().to(dtype)
        cams = cameras.to(dtype=dtype)

        feats = self.feature_net(images.reshape(B * V, Ci, H, W).to(dtype))
        feats = feats.reshape(B, V, feats.shape[1], H, W)
        with torch.no_grad():
            normals = vertex_normals(coarse, self.faces)
            vis = visibility(coarse, self.faces, cams)
        rotations = None
        if self.training and cfg.random_rotation:
            rotations = random_rotations(B * N, generator=generator, dtype=dtype,
                                         device=coarse.device).view(B, N, 3, 3)
        embed = (self.template_verts * cfg.template_embedding_scale) if cfg.template_embedding else None

        chunk = N if cfg.chunk_size is None else min(cfg.chunk_size, N)
        use_ckpt = cfg.gradient_checkpointing and torch.is_grad_enabled()
        parts = []
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            args = (feats, coarse[:, s:e], normals[:, s:e], vis[:, :, s:e],
                    rotations[:, s:e] if rotations is not None else None,
                    embed[s:e] if embed is not None else None)
            if use_ckpt:
                fn = lambda f, v, nr, vs, r, em: self._chunk_offsets(f, cams, v, nr, vs, r, em)  # noqa: E731
                parts.append(checkpoint(fn, *args, use_reentrant=False))
            else:
                parts.append(self._chunk_offsets(args[0], cams, *args[1:]))
        offsets = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return RefineOutput(verts=coarse + offsets, offsets=offsets, visibility=vis, normals=normals)
