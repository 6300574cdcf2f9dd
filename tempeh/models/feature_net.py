"""2D feature network: U-Net with a ResNet (BasicBlock) encoder and an additive skip decoder.

Architecture (``blocks=(3, 4, 6, 3)``, ``widths=(64, 128, 256, 512)`` is ResNet34)::

    stem:   conv7x7 s2 -> norm -> ReLU                      (stride 2)   -> skip1 (1x1 conv)
    layer1: maxpool3x3 s2, blocks[0] BasicBlocks, widths[0]  (stride 4)   -> skip2
    layer2: blocks[1] BasicBlocks, widths[1], first stride 2 (stride 8)   -> skip3
    layer3: ...                                              (stride 16)  -> skip4
    layer4: ...                                              (stride 32)  -> skip5
    decoder: y = skip5; y = skip_k + up(y) for k = 4..1; out = up(y) to the input H x W

The skip heads are 1x1 convs to ``out_channels``; ``up`` is ``F.interpolate(size=...)`` to the
exact size of the finer map, so any ``H, W`` works (not only multiples of 32). The reference
uses nearest-neighbour upsampling; we default to bilinear (``upsample="nearest"`` restores it)
so features vary smoothly under sub-pixel sampling. No output activation.

Input normalisation: the input is ``(N, in_channels, H, W)`` in ``[0, 1]``; inside, it becomes
``(x - mean) / std`` with the ImageNet statistics: for 3 channels (0.485, 0.456, 0.406) /
(0.229, 0.224, 0.225); for 1 (grey) channel their averages 0.449 / 0.226; otherwise 0.5 / 0.25.

Encoder parameter names follow torchvision's ResNet (``encoder.conv1``, ``encoder.bn1``,
``encoder.layer1.0.conv1`` ...), so :meth:`FeatureNet2D.load_encoder_weights` can read a local
ImageNet ResNet state dict; nothing is ever downloaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tempeh.errors import TempehDataError
from tempeh.models.unet3d import make_norm

logger = logging.getLogger(__name__)

__all__ = ["FeatureNet2D", "BasicBlock2D", "ResNetEncoder"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY_MEAN = sum(_IMAGENET_MEAN) / 3.0
_GREY_STD = sum(_IMAGENET_STD) / 3.0


class BasicBlock2D(nn.Module):
    """ResNet BasicBlock: conv3 (stride) -> norm -> ReLU -> conv3 -> norm, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, cout, dims=2)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = make_norm(norm, cout, dims=2)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            make_norm(norm, cout, dims=2))

    def forward(self, x: Tensor) -> Tensor:
        # in-place ReLUs act on fresh conv/norm outputs that no backward needs (saves memory)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s, inplace=True)


class ResNetEncoder(nn.Module):
    """ResNet trunk without avgpool/fc; returns the stem and the four layer outputs."""

    def __init__(self, in_channels: int, blocks: Sequence[int], widths: Sequence[int],
                 stem_width: int, norm: str):
        super().__init__()
        if len(blocks) != 4 or len(widths) != 4:
            raise ValueError(f"ResNetEncoder needs 4 blocks and 4 widths, got {blocks}, {widths}")
        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, stem_width, dims=2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = stem_width
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = [BasicBlock2D(cin, w, stride=1 if i == 0 else 2, norm=norm)]
            layers += [BasicBlock2D(w, w, norm=norm) for _ in range(int(n) - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = w

    def forward(self, x: Tensor) -> List[Tensor]:
        s1 = F.relu(self.bn1(self.conv1(x)), inplace=True)
        s2 = self.layer1(self.maxpool(s1))
        s3 = self.layer2(s2)
        s4 = self.layer3(s3)
        s5 = self.layer4(s4)
        return [s1, s2, s3, s4, s5]


class FeatureNet2D(nn.Module):
    """Shared per-view feature extractor (see the module docstring).

    Args:
        in_channels: image channels (1 for grey-scale stereo images).
        out_channels: feature channels ``d_f`` (8 in the paper).
        blocks: BasicBlocks per layer ((3, 4, 6, 3) = ResNet34).
        widths: channels of layer1..4.
        stem_width: channels of the 7x7 stem.
        norm: ``"bn" | "in" | "gn" | "none"`` in the encoder.
        upsample: ``"bilinear"`` (default) or ``"nearest"`` (reference) decoder upsampling.
    Forward: ``(N, in_channels, H, W)`` in [0, 1] -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 8,
                 blocks: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (64, 128, 256, 512),
                 stem_width: int = 64, norm: str = "bn", upsample: str = "bilinear"):
        super().__init__()
        if upsample not in ("bilinear", "nearest"):
            raise ValueError(f"FeatureNet2D: upsample must be 'bilinear' or 'nearest', got {upsample!r}")
        self.in_channels, self.out_channels, self.upsample = in_channels, out_channels, upsample
        self.encoder = ResNetEncoder(in_channels, blocks, widths, stem_width, norm)
        self.skips = nn.ModuleList(nn.Conv2d(c, out_channels, 1)
                                   for c in (stem_width, *[int(w) for w in widths]))
        if in_channels == 3:
            mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        elif in_channels == 1:
            mean, std = (_GREY_MEAN,), (_GREY_STD,)
        else:
            mean, std = (0.5,) * in_channels, (0.25,) * in_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _up(self, x: Tensor, size) -> Tensor:
        if self.upsample == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        """``images: (N, in_channels, H, W)`` in [0, 1] -> features ``(N, out_channels, H, W)``."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"FeatureNet2D expects (N, {self.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        feats = self.encoder(x)
        y = self.skips[4](feats[4])
        for k in (3, 2, 1, 0):
            s = self.skips[k](feats[k])
            y = s + self._up(y, s.shape[-2:])
        return self._up(y, (H, W))

    def load_encoder_weights(self, path: Union[str, Path], strict_shapes: bool = True) -> List[str]:
        """Load encoder weights from a local state-dict file (never downloads).

        Accepts a torchvision-style ResNet state dict (``conv1.weight``, ``bn1.*``,
        ``layerK.I.*``; ``fc.*`` is ignored), optionally wrapped as ``{"state_dict": ...}`` or
        ``{"model": ...}`` and/or with a ``module.`` or ``encoder.`` prefix. An RGB stem
        (``conv1.weight`` with 3 input channels) loaded into a grey model is folded to one
        channel as ``sum_c W_c * std_grey / std_c``, which reproduces the RGB net on a grey image
        replicated to 3 channels up to the constant mean term.

        Returns:
            the encoder parameter/buffer names that were loaded.
        Raises:
            TempehDataError: unreadable file, missing keys or shape mismatches (named).
        """
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is a data error here
            raise TempehDataError(path, f"cannot read encoder weights: {e}") from e
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        if not isinstance(state, dict):
            raise TempehDataError(path, f"expected a state dict, got {type(state).__name__}")
        src = {}
        for k, v in state.items():
            for prefix in ("module.", "encoder.", "feature_net.encoder."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
            if not k.startswith("fc."):
                src[k] = v
        target = self.encoder.state_dict()
        missing = [k for k in target if k not in src and not k.endswith("num_batches_tracked")]
        if missing:
            raise TempehDataError(path, f"missing {len(missing)} encoder keys, e.g. {missing[:5]}")
        new = {}
        for k, t in target.items():
            if k not in src:
                new[k] = t
                continue
            v = src[k]
            if not isinstance(v, torch.Tensor):
                raise TempehDataError(path, f"key {k!r} is not a tensor")
            if k == "conv1.weight" and v.shape[1] == 3 and t.shape[1] == 1:
                std = torch.tensor(_IMAGENET_STD, dtype=v.dtype).view(1, 3, 1, 1)
                v = (v * (_GREY_STD / std)).sum(dim=1, keepdim=True)
            if v.shape != t.shape:
                if strict_shapes:
                    raise TempehDataError(path, f"key {k!r} has shape {tuple(v.shape)}, the model "
                                                f"expects {tuple(t.shape)}")
                new[k] = t
                continue
            new[k] = v.to(t.dtype)
        unused = sorted(set(src) - set(target))
        if unused:
            logger.warning("%s: %d keys not used by the encoder, e.g. %s", path, len(unused), unused[:5])
        self.encoder.load_state_dict(new)
        return list(new)


@dataclass
class FeatureNetConfig:
    """Settings of the 2D feature net, shared (as flat ``model.*`` keys) by the coarse and the
    refinement configs, which inherit these fields."""

    image_channels: int = 1
    """Input image channels (1: grey-scale stereo images in [0, 1])."""
    feature_channels: int = 8
    """Feature channels ``d_f`` of the 2D feature net; a fused volume has ``2 * d_f`` channels."""
    feature_blocks: Tuple[int, ...] = (3, 4, 6, 3)
    """BasicBlocks per ResNet layer ((3, 4, 6, 3) = ResNet34)."""
    feature_widths: Tuple[int, ...] = (64, 128, 256, 512)
    """Channels of ResNet layers 1..4."""
    feature_stem_width: int = 64
    """Channels of the ResNet stem."""
    feature_norm: str = "bn"
    """Norm of the 2D encoder (``bn | in | gn | none``); it sees all ``B*V`` images at once, so
    BatchNorm is fine here."""
    feature_upsample: str = "bilinear"
    """Decoder upsampling (``bilinear``, or ``nearest`` like the reference)."""

    def build_feature_net(self) -> "FeatureNet2D":
        """The :class:`FeatureNet2D` these settings describe."""
        return FeatureNet2D(self.image_channels, self.feature_channels, self.feature_blocks,
                            self.feature_widths, self.feature_stem_width, norm=self.feature_norm,
                            upsample=self.feature_upsample)
