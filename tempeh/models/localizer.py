"""Head localizer: a spatial transformer that shrinks, rotates and moves the coarse grid.

From the feature volume sampled on the initial grid it predicts, per sample, an anisotropic
scale ``s (B, 3)``, a rotation ``R (B, 3, 3)`` (6D, Gram-Schmidt on rows) and a translation
``t (B, 3)`` mm. The localised grid is (``d0`` the initial grid's local offsets, ``R_g`` its
rotation, ``o`` its centre; all in mm)::

    p = o + R_g (diag(s) R d0 + t)

so ``s``, ``R`` and ``t`` live in the frame of the (possibly randomly rotated) initial grid,
as in the reference. Bounds: ``s = max_scale * sigmoid(x)`` in ``(0, max_scale)`` per axis;
``t = max_translation_mm * tanh(x)``.

Initial output (the last Linear has zero weights and a bias chosen for it): identity rotation,
zero translation (the capture-volume centre) and ``s0 = init_extent_mm / ((D - 1) *
grid_spacing_mm)``, i.e. a head-sized cube of side ``init_extent_mm`` (default 310 mm, the
reference's 0.4 x 775 mm). The reference bounds ``s`` by 0.4 and starts at 0.399, deep in the
saturated part of its tanh; our default ``max_scale=0.5`` starts the sigmoid at 0.8 instead, so
the scale still receives gradient.

Optimiser: every parameter name starts with the module's attribute name (``localizer.`` in
:class:`~tempeh.models.coarse.CoarseModel`); ``Localizer.is_localizer = True`` and
:meth:`~tempeh.models.coarse.CoarseModel.param_groups` give it its own learning rate.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from tempeh.geometry.rotations import rot6d_to_matrix
from tempeh.models.unet3d import Conv3d, make_norm

logger = logging.getLogger(__name__)

__all__ = ["Localizer", "LocalizerOutput", "warp_grid", "similarity_box"]


@dataclass
class LocalizerOutput:
    """Localizer prediction (frame of the initial grid).

    scale: ``(B, 3)`` unitless multiplier of the initial grid offsets, in ``(0, max_scale)``.
    rotation: ``(B, 3, 3)`` rotation applied to the offsets before scaling.
    translation: ``(B, 3)`` mm, added after scaling.
    """

    scale: Tensor
    rotation: Tensor
    translation: Tensor


def warp_grid(base_offsets: Tensor, out: LocalizerOutput, center: Tensor,
              grid_rotation: Optional[Tensor] = None) -> Tensor:
    """Localised grid points ``p = center + R_g (diag(s) R d0 + t)``.

    Args:
        base_offsets: ``(D, D, D, 3)`` (or ``(B, D, D, D, 3)``) local offsets ``d0`` of the initial
            grid, mm (:func:`tempeh.models.volume.grid_offsets`).
        out: the localizer's output for ``B`` samples.
        center: ``(B, 3)`` world mm, the initial grid's centre ``o``.
        grid_rotation: ``(B, 3, 3)`` the initial grid's rotation ``R_g`` (None: identity).
    Returns:
        ``(B, D, D, D, 3)`` world, mm.
    """
    B = center.shape[0]
    M = out.scale.unsqueeze(-1) * out.rotation  # diag(s) @ R, (B, 3, 3)
    if grid_rotation is not None:
        M = grid_rotation @ M
        shift = (grid_rotation @ out.translation.unsqueeze(-1)).squeeze(-1)
    else:
        shift = out.translation
    d0 = base_offsets.to(M.dtype)
    if d0.dim() == 4:
        local = torch.einsum("dhwk,bjk->bdhwj", d0, M)
    else:
        local = torch.einsum("bdhwk,bjk->bdhwj", d0, M)
    return local + (shift + center).view(B, 1, 1, 1, 3)


def similarity_box(scale: Tensor, rotation: Tensor, translation: Tensor,
                   center: Tensor) -> LocalizerOutput:
    """The box of a similarity ``x -> scale R x + translation`` (world mm) in localizer terms, for
    an initial grid centred on ``center`` with identity rotation: ``warp_grid`` then maps offsets
    ``d`` to ``scale R d + translation``.

    Args:
        scale: ``(B,)`` unitless; rotation: ``(B, 3, 3)``; translation, center: ``(B, 3)`` mm.
    """
    B = scale.shape[0]
    return LocalizerOutput(scale.reshape(B, 1).expand(B, 3), rotation, translation - center)


class Localizer(nn.Module):
    """Spatial transformer over a coarse feature volume.

    Args:
        in_channels: channels of the input volume (``2 d_f``).
        hidden: channels of the conv levels.
        levels: number of ``Conv3d(k3) -> norm -> MaxPool(2) -> ReLU`` levels.
        fc: width of the hidden fully connected layer.
        max_scale: upper bound of each scale factor.
        max_translation_mm: bound of each translation component, mm.
        init_extent_mm: side of the initial localised cube, mm.
        grid_side: ``D`` of the input volume (must be divisible by ``2**levels``).
        grid_spacing_mm: spacing of the initial grid (defines what scale 1 means).
        norm: norm of the conv levels (``"bn"`` like the reference).
    Forward: ``volume (B, in_channels, D, D, D)`` -> :class:`LocalizerOutput`.
    """

    is_localizer = True

    def __init__(self, in_channels: int, hidden: int = 32, levels: int = 2, fc: int = 96,
                 max_scale: float = 0.5, max_translation_mm: float = 387.5,
                 init_extent_mm: float = 310.0, grid_side: int = 32,
                 grid_spacing_mm: float = 25.0, norm: str = "bn"):
        super().__init__()
        if grid_side % (2 ** levels):
            raise ValueError(f"Localizer: grid_side {grid_side} must be divisible by 2**{levels}")
        base_extent = (grid_side - 1) * grid_spacing_mm
        s0 = init_extent_mm / base_extent if base_extent > 0 else 1.0
        if not 0.0 < s0 < max_scale:
            raise ValueError(f"Localizer: init_extent_mm={init_extent_mm} gives scale {s0:.4f}, "
                             f"which must lie in (0, max_scale={max_scale})")
        self.max_scale, self.max_translation_mm = float(max_scale), float(max_translation_mm)
        self.init_scale = s0
        layers = []
        c = in_channels
        for _ in range(levels):
            layers += [Conv3d(c, hidden, 3, padding=1), make_norm(norm, hidden),
                       nn.MaxPool3d(2), nn.ReLU(inplace=True)]
            c = hidden
        self.features = nn.Sequential(*layers)
        side = grid_side // (2 ** levels)
        self.fc = nn.Sequential(nn.Linear(hidden * side ** 3, fc), nn.ReLU(inplace=True))
        self.out = nn.Linear(fc, 12)
        self.reset_output()

    def reset_output(self) -> None:
        """Zero weights and the bias of the documented initial box (see the module docstring)."""
        p = self.init_scale / self.max_scale
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.copy_(torch.tensor(
                [math.log(p / (1 - p))] * 3 + [1.0, 0, 0, 0, 1.0, 0] + [0.0] * 3))

    def forward(self, volume: Tensor) -> LocalizerOutput:
        """``volume (B, C, D, D, D)`` -> scale ``(B, 3)``, rotation ``(B, 3, 3)``, translation mm."""
        x = self.out(self.fc(self.features(volume).flatten(1)))
        scale = self.max_scale * torch.sigmoid(x[:, 0:3])
        rotation = rot6d_to_matrix(x[:, 3:9])
        translation = self.max_translation_mm * torch.tanh(x[:, 9:12])
        return LocalizerOutput(scale, rotation, translation)

    @staticmethod
    def warp_grid(base_offsets: Tensor, out: LocalizerOutput, center: Tensor,
                  grid_rotation: Optional[Tensor] = None) -> Tensor:
        """See :func:`warp_grid`."""
        return warp_grid(base_offsets, out, center, grid_rotation)
