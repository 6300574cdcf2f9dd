"""V2V-style 3D U-Net (Basic / Res / Pool / Upsample blocks, additive skips).

Layout for ``levels = L`` and ``widths = (w_0, ..., w_L)`` (input side ``D``, divisible by
``2**pools``)::

    front:   Basic(in -> front_width, k=front_kernel) -> Res(front_width -> w_0) -> Res(w_0) x2
    level l: skip_l = Res(w_l) at the current side; Pool(2) (levels l < pools only);
             enc_l = Res(w_l -> w_{l+1})
    mid:     Res(w_L)
    level l (reverse): Res(w_{l+1}) -> Upsample(w_{l+1} -> w_l) (ConvTranspose k2 s2) for pooled
             levels, Basic(w_{l+1} -> w_l, k=1) (or nothing when equal) otherwise; + skip_l
    back:    Res(w_0) -> Basic(w_0 -> back_widths[0], k=1) -> ... -> Conv1x1(-> out_channels)

The coarse reference (``levels=5``, ``widths=(32, 64, 128, 128, 128, 128)``, ``back_widths=(64,
128)``) pools a 32^3 volume down to 1^3. BatchNorm there has a single value per channel at batch
1 and the reference crashes in training; InstanceNorm cannot normalise one voxel either. We
therefore normalise every block that runs at the deepest resolution (the last encoder block,
the mid block and the decoder blocks before the first upsampling) with ``bottleneck_norm`` (GroupNorm by default),
which normalises over channel groups and works at any batch size and spatial size. Set
``bottleneck_norm=None`` to use ``norm`` everywhere (reference behaviour).

``out_channels = 0`` skips the final 1x1 conv and returns the last feature map of
``back_widths[-1]`` channels (``self.out_features``), e.g. for the chunked soft-argmax head.

Weights: Xavier-normal for every Conv3d / ConvTranspose3d, zero bias (like the reference).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["UNet3D", "Conv3d", "make_norm", "NORM_KINDS", "Basic3DBlock", "Res3DBlock", "Upsample3DBlock"]

NORM_KINDS = ("bn", "in", "gn", "none")


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` <= ``max_groups`` leaving >= 2 channels per group (so a
    single voxel can still be normalised)."""
    g = max(1, min(max_groups, channels // 2))
    while channels % g:
        g -= 1
    return g


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that keeps small batch-1 float32 CPU inputs on oneDNN.

    PyTorch's CPU dispatch sends a 3D convolution whose input has batch 1 and
    ``C * D * H <= 20480`` to its reference ``slow_conv3d`` kernel: every conv of the demo's
    coarse U-Net at inference (batch 1, 16^3 and 8^3 cubes). Measured on the 2-core machine
    (torch 2.13): 16 -> 16 channels, k3, 16^3: 5.5 ms there, 0.82 ms through
    ``torch.mkldnn_convolution``. This class calls the oneDNN kernel directly in that case (same
    result to float32 rounding, differentiable); anything else goes through ``nn.Conv3d``. The
    parameters and state-dict keys are those of ``nn.Conv3d``.
    """

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if (x.dim() == 5 and x.shape[0] == 1 and x.device.type == "cpu"
                and x.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and not torch.is_autocast_enabled("cpu")):
            return torch.mkldnn_convolution(x.contiguous(), weight, bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


def make_norm(kind: Optional[str], channels: int, dims: int = 3) -> nn.Module:
    """Normalisation layer: ``"bn"`` BatchNorm, ``"in"`` InstanceNorm (affine), ``"gn"``
    GroupNorm (up to 8 groups, >= 2 channels each), ``"none"``/None identity. ``dims`` is 2 or 3."""
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "bn":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "in":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if kind == "gn":
        return nn.GroupNorm(_groups(channels), channels)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_KINDS}")


class Basic3DBlock(nn.Sequential):
    """Conv3d(k, same padding) -> norm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: str = "bn"):
        super().__init__(Conv3d(cin, cout, kernel, padding=(kernel - 1) // 2),
                         make_norm(norm, cout), nn.ReLU(inplace=True))


class Res3DBlock(nn.Module):
    """[Conv3 -> norm -> ReLU -> Conv3 -> norm] + skip (identity or Conv1 -> norm), then ReLU."""

    def __init__(self, cin: int, cout: int, norm: str = "bn"):
        super().__init__()
        self.res = nn.Sequential(
            Conv3d(cin, cout, 3, padding=1), make_norm(norm, cout), nn.ReLU(inplace=True),
            Conv3d(cout, cout, 3, padding=1), make_norm(norm, cout))
        self.skip = (nn.Identity() if cin == cout else
                     nn.Sequential(Conv3d(cin, cout, 1), make_norm(norm, cout)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu_(self.res(x) + self.skip(x))


class Upsample3DBlock(nn.Sequential):
    """ConvTranspose3d(k=2, s=2) -> norm -> ReLU (doubles the side)."""

    def __init__(self, cin: int, cout: int, norm: str = "bn"):
        super().__init__(nn.ConvTranspose3d(cin, cout, 2, stride=2), make_norm(norm, cout),
                         nn.ReLU(inplace=True))


class UNet3D(nn.Module):
    """V2V 3D U-Net (see the module docstring for the layout).

    Args:
        in_channels: input channels.
        out_channels: output channels of the final 1x1 conv; 0 returns the last feature map.
        levels: encoder/decoder levels ``L``.
        widths: ``L + 1`` channel widths ``w_0..w_L``.
        front_kernel: kernel of the first Basic block (7 in the reference).
        norm: ``"bn" | "in" | "gn" | "none"`` for all blocks above the bottleneck.
        bottleneck_norm: norm of the blocks at the deepest resolution (None: same as ``norm``).
        front_width: width of the first Basic block (default ``w_0 // 2``, 16 in the reference).
        back_widths: widths of the 1x1 Basic blocks of the back end ((64, 128) coarse, (32, 32)
            refinement).
        pools: how many of the levels pool (default all ``L``; the refinement reference uses
            ``levels=3, pools=2``). The input side must be divisible by ``2**pools``.
    Input ``(B, in_channels, D, H, W)``; output ``(B, out_channels or back_widths[-1], D, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, levels: int = 5,
                 widths: Sequence[int] = (32, 64, 128, 128, 128, 128), front_kernel: int = 7,
                 norm: str = "bn", bottleneck_norm: Optional[str] = "gn",
                 front_width: Optional[int] = None, back_widths: Sequence[int] = (64, 128),
                 pools: Optional[int] = None):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < levels + 1:
            raise ValueError(f"UNet3D: {levels} levels need {levels + 1} widths, got {widths}")
        widths = widths[: levels + 1]
        pools = levels if pools is None else int(pools)
        if not 0 <= pools <= levels:
            raise ValueError(f"UNet3D: pools={pools} must be in [0, {levels}]")
        if norm not in NORM_KINDS:
            raise ValueError(f"UNet3D: unknown norm {norm!r}; expected one of {NORM_KINDS}")
        bnorm = norm if bottleneck_norm is None else bottleneck_norm
        self.levels, self.pools, self.widths = levels, pools, widths
        fw = front_width if front_width is not None else max(widths[0] // 2, 1)
        w0 = widths[0]

        def deep(l: int, skip: bool = False) -> str:
            """Norm of a block of level ``l``: ``bnorm`` when it runs at the deepest side."""
            at_deepest = pools > 0 and (l >= pools if skip else l >= pools - 1)
            return bnorm if at_deepest else norm

        self.front = nn.Sequential(
            Basic3DBlock(in_channels, fw, front_kernel, norm), Res3DBlock(fw, w0, norm),
            Res3DBlock(w0, w0, norm), Res3DBlock(w0, w0, norm))
        self.skips = nn.ModuleList(Res3DBlock(widths[l], widths[l], deep(l, skip=True))
                                   for l in range(levels))
        self.pool = nn.MaxPool3d(2)
        self.enc = nn.ModuleList(Res3DBlock(widths[l], widths[l + 1], deep(l)) for l in range(levels))
        self.mid = Res3DBlock(widths[levels], widths[levels], bnorm if pools > 0 else norm)
        self.dec_res = nn.ModuleList(Res3DBlock(widths[l + 1], widths[l + 1], deep(l))
                                     for l in range(levels))
        ups = []
        for l in range(levels):
            if l < pools:
                ups.append(Upsample3DBlock(widths[l + 1], widths[l], norm))
            elif widths[l + 1] != widths[l]:
                ups.append(Basic3DBlock(widths[l + 1], widths[l], 1, deep(l, skip=True)))
            else:
                ups.append(nn.Identity())
        self.ups = nn.ModuleList(ups)
        back = [Res3DBlock(w0, w0, norm)]
        c = w0
        for bw in back_widths:
            back.append(Basic3DBlock(c, int(bw), 1, norm))
            c = int(bw)
        self.back = nn.Sequential(*back)
        self.out_features = c
        self.head = Conv3d(c, out_channels, 1) if out_channels > 0 else None
        self.out_channels = out_channels if out_channels > 0 else c
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal conv weights, zero biases (norm layers keep their defaults)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, D, H, W)`` -> ``(B, self.out_channels, D, H, W)``."""
        div = 2 ** self.pools
        if any(s % div for s in x.shape[2:]):
            raise ValueError(f"UNet3D: spatial size {tuple(x.shape[2:])} must be divisible by {div}")
        x = self.front(x)
        skips = []
        for l in range(self.levels):
            skips.append(self.skips[l](x))
            if l < self.pools:
                x = self.pool(x)
            x = self.enc[l](x)
        x = self.mid(x)
        for l in reversed(range(self.levels)):
            x = self.ups[l](self.dec_res[l](x)) + skips[l]
        x = self.back(x)
        return self.head(x) if self.head is not None else x
