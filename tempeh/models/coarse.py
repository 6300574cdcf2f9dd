"""Coarse stage: images + cameras -> a mesh in template topology (paper section 3.1).

Pipeline (shapes for ``B`` samples, ``V`` views, grid side ``D``, ``d_f`` feature channels)::

    images (B, V, 1, H, W) --FeatureNet2D--> feats (B, V, d_f, H, W)
    initial grid (B, D, D, D, 3): symmetric cube about grid_center_mm, random SO(3) rotation in
        training (identity in eval) --sample_views + fuse_mean_var--> (B, 2 d_f, D, D, D)
    --Localizer--> s, R, t --warp_grid--> localised grid (B, D, D, D, 3)
    --sample_views + fuse_mean_var--> (B, 2 d_f, D, D, D) --UNet3D--> (B, F, D, D, D)
    --SoftArgmaxHead (softmax over the D^3 points, expectation of the localised grid)-->
    verts (B, N, 3) world mm
    [rebox_iterations > 0, eval: similarity fit of the template to verts -> new box -> fusion,
     U-Net and head again, k times]
    [tta_boxes > 0, eval: the mean of that prediction and those in tta_boxes jittered copies of
     its box]

Feature maps are at the input image resolution, so ``cameras`` must describe the images given.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from tempeh.cameras import Cameras
from tempeh.geometry.rotations import axis_angle_to_matrix, random_rotations
from tempeh.geometry.similarity import fit_similarity
from tempeh.models.feature_net import FeatureNetConfig
from tempeh.models.localizer import Localizer, LocalizerOutput, similarity_box, warp_grid
from tempeh.models.soft_argmax import HEAD_MODES, SoftArgmaxHead, gaussian_log_prior
from tempeh.models.unet3d import UNet3D
from tempeh.models.volume import FUSION_MODES, fuse_mean_var, grid_offsets, make_grid, sample_views

logger = logging.getLogger(__name__)

__all__ = ["CoarseConfig", "CoarseModel", "CoarseOutput"]


@dataclass
class CoarseConfig(FeatureNetConfig):
    """Coarse-stage network configuration (defaults = paper scale, synthetic world frame).
    The feature-net fields (``image_channels``, ``feature_*``) come from
    :class:`~tempeh.models.feature_net.FeatureNetConfig`."""

    num_verts: int = 5023
    """Number of template vertices ``N`` predicted (one soft-argmax channel each)."""
    grid_side: int = 32
    """Points per axis ``d_c`` of the coarse grid."""
    grid_spacing_mm: float = 25.0
    """Spacing of the initial grid, mm (32 x 25 mm covers a ~775 mm capture volume)."""
    grid_center_mm: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Capture-volume centre in world mm (synthetic frame; the paper uses (0, -50, 0) in the
    3dMD frame)."""
    fusion: str = "masked"
    """View fusion: "masked" (views that see the point, biased variance) or "paper" (all views,
    zeros outside, unbiased variance; ablation)."""
    random_grid_rotation: bool = True
    """Rotate the initial grid at random in training (identity in eval)."""
    grid_rotation_deg: Optional[float] = None
    """How ``random_grid_rotation`` draws: None (paper) uniformly over all rotations; a number:
    a rotation vector with independent N(0, deg^2) components, a small rotation about a random
    axis (beyond the paper: a pose augmentation the localizer can undo, also with the template
    prior; the images do not change, the feature cube is sampled in the rotated frame)."""
    localizer_hidden: int = 32
    """Channels of the localizer's conv levels."""
    localizer_levels: int = 2
    """Conv + max-pool levels of the localizer."""
    localizer_fc: int = 96
    """Hidden fully-connected width of the localizer."""
    localizer_max_scale: float = 0.5
    """Upper bound of each localizer scale factor (multiplier of the initial grid offsets)."""
    localizer_max_translation_mm: float = 387.5
    """Bound of each localizer translation component, mm."""
    localizer_init_extent_mm: float = 310.0
    """Side of the localised cube at initialisation, mm (head-sized)."""
    localizer_norm: str = "bn"
    """Norm of the localizer conv levels."""
    unet_levels: int = 5
    """Encoder/decoder levels of the 3D U-Net."""
    unet_widths: Tuple[int, ...] = (32, 64, 128, 128, 128, 128)
    """U-Net widths ``w_0..w_L``."""
    unet_back_widths: Tuple[int, ...] = (64, 128)
    """Widths of the 1x1 blocks after the U-Net (input channels of the head)."""
    unet_front_kernel: int = 7
    """Kernel of the U-Net's first conv."""
    unet_norm: str = "bn"
    """Norm of the U-Net blocks: bn | in | gn | none."""
    unet_bottleneck_norm: Optional[str] = "gn"
    """Norm at the U-Net's deepest resolution (GroupNorm works at batch 1; None = unet_norm)."""
    head_mode: str = "fused"
    """Soft-argmax head evaluation (:class:`~tempeh.models.soft_argmax.SoftArgmaxHead`):
    ``fused`` (one ``scaled_dot_product_attention`` call; nothing of size N x D^3 is stored,
    forward or backward), ``chunked`` (vertex chunks, below) or ``naive`` (all (B, N, D^3) logits
    at once; reference behaviour, benchmarks only). All give the same result."""
    head_chunk_size: int = 256
    """Vertices per chunk of the chunked head (256 x 32^3 floats = 32 MiB per buffer)."""
    head_checkpoint: bool = True
    """Checkpoint each chunk of the chunked head in training (memory does not grow with N x D^3)."""
    template_prior_sigma_mm: float = 0.0
    """0 (paper): every vertex starts at the grid centre. > 0: each vertex's logits get a Gaussian
    log-prior centred on its template position placed in the localised box (template bounding-box
    centre at the box centre, box axes = template axes, scaled with the box), with this standard
    deviation in mm at the initial box scale. The untrained model then predicts the template posed
    by the localizer, the localizer learns the head's pose from the vertex loss directly and the
    U-Net learns residuals. Needs the template (``CoarseModel(cfg, template_verts)``); keep
    ``random_grid_rotation`` off with it or small (``grid_rotation_deg``), else the localizer must
    also undo arbitrary rotations."""
    rebox_iterations: int = 0
    """0 (paper): one prediction in the localizer's box. k > 0 (beyond the paper; needs the template
    prior): in eval, fit the template (the prior's means) to the prediction by a similarity, put the
    grid and the prior in that box and predict again, k times. Each pass costs a fusion, a U-Net
    and a head; the feature net runs once."""
    box_jitter_prob: float = 0.0
    """Training, per sample: probability that the U-Net pass uses the box of the similarity fit of
    the template to the training registration, jittered as below, instead of the localizer's box,
    so the U-Net also learns the near-aligned boxes that ``rebox_iterations`` gives it. Needs the
    template prior and a registration (``pose_target``); frames without one keep the localizer's
    box. The localizer is trained as before, by ``loss.w_box``, which must then be > 0 (the
    training config checks it)."""
    box_jitter_rot_deg: float = 3.0
    """Standard deviation, degrees, of each axis-angle component of the jitter rotation."""
    box_jitter_trans_mm: float = 3.0
    """Standard deviation, mm, of each component of the jitter translation."""
    box_jitter_log_scale: float = 0.02
    """Standard deviation of the log of the jitter scale factor."""
    tta_boxes: int = 0
    """0: off. k > 0 (beyond the paper; needs the template prior): in eval, after the re-box
    passes, predict again in k copies of the final box jittered by the ``box_jitter_*`` spreads and
    average the k + 1 predictions (test-time augmentation). The jitters are fixed draws (seed 0) in
    +- pairs (so the jitter averages to zero for even k), the same for every sample, so a frame's
    result does not depend on its batch. Each costs a pass."""

    def __post_init__(self):
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"CoarseConfig.head_mode: {self.head_mode!r} not in {HEAD_MODES}")
        if self.rebox_iterations < 0:
            raise ValueError(f"CoarseConfig.rebox_iterations must be >= 0, got {self.rebox_iterations}")
        if not 0.0 <= self.box_jitter_prob <= 1.0:
            raise ValueError(f"CoarseConfig.box_jitter_prob must lie in [0, 1], got {self.box_jitter_prob}")
        if self.grid_rotation_deg is not None and not self.grid_rotation_deg >= 0:
            raise ValueError("CoarseConfig.grid_rotation_deg must be >= 0 or None, "
                             f"got {self.grid_rotation_deg}")
        if self.tta_boxes < 0:
            raise ValueError(f"CoarseConfig.tta_boxes must be >= 0, got {self.tta_boxes}")
        for k in ("box_jitter_rot_deg", "box_jitter_trans_mm", "box_jitter_log_scale"):
            if not getattr(self, k) >= 0:
                raise ValueError(f"CoarseConfig.{k} must be >= 0, got {getattr(self, k)}")
        if (self.rebox_iterations > 0 or self.box_jitter_prob > 0 or self.tta_boxes > 0) \
                and not self.template_prior_sigma_mm > 0:
            raise ValueError("CoarseConfig: rebox_iterations, box_jitter_prob and tta_boxes place the "
                             "template in the box; they need template_prior_sigma_mm > 0")

    @classmethod
    def paper_scale(cls, **overrides) -> "CoarseConfig":
        """The paper's sizes: ResNet34, 8 channels, 32^3 x 25 mm, 5-level U-Net, 5023 vertices."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "CoarseConfig":
        """A CPU-test size: tiny nets, 8^3 grid, 64 vertices."""
        base = dict(num_verts=64, feature_channels=4, feature_blocks=(1, 1, 1, 1),
                    feature_widths=(8, 8, 16, 16), feature_stem_width=8, grid_side=8,
                    grid_spacing_mm=100.0, localizer_hidden=8, localizer_levels=1,
                    localizer_fc=16, localizer_init_extent_mm=300.0, localizer_max_scale=0.6,
                    unet_levels=2, unet_widths=(8, 16, 16), unet_back_widths=(16,),
                    unet_front_kernel=3, head_chunk_size=32)
        base.update(overrides)
        return cls(**base)


@dataclass
class CoarseOutput:
    """Coarse-stage prediction.

    verts: ``(B, N, 3)`` world mm.
    localizer: the localizer's scale / rotation / translation (initial-grid frame).
    grid: ``(B, D, D, D, 3)`` the localised grid, world mm.
    initial_grid: ``(B, D, D, D, 3)`` the (possibly rotated) initial grid, world mm.
    grid_rotation: ``(B, 3, 3)`` rotation of the initial grid (identity in eval).
    template_posed: ``(B, N, 3)`` world mm, the template placed by the localizer alone (the prior
        means mapped through the box; what ``loss.w_box`` compares with the registration), or None
        without the template prior.
    """

    verts: Tensor
    localizer: LocalizerOutput
    grid: Tensor
    initial_grid: Tensor
    grid_rotation: Tensor
    template_posed: Optional[Tensor] = None


class CoarseModel(nn.Module):
    """Coarse stage network (see the module docstring).

    Args:
        cfg: the configuration (default: paper scale).
        template_verts: ``(N, 3)`` template vertices, world mm; required when
            ``cfg.template_prior_sigma_mm > 0`` (the prior is a non-persistent buffer: checkpoints
            do not carry it, the stage's saved template does).
    """

    def __init__(self, cfg: Optional[CoarseConfig] = None, template_verts: Optional[Tensor] = None):
        super().__init__()
        cfg = cfg if cfg is not None else CoarseConfig()
        if cfg.fusion not in FUSION_MODES:
            raise ValueError(f"CoarseConfig.fusion: unknown mode {cfg.fusion!r}; expected {FUSION_MODES}")
        self.cfg = cfg
        C2 = 2 * cfg.feature_channels
        self.feature_net = cfg.build_feature_net()
        self.localizer = Localizer(
            C2, hidden=cfg.localizer_hidden, levels=cfg.localizer_levels, fc=cfg.localizer_fc,
            max_scale=cfg.localizer_max_scale,
            max_translation_mm=cfg.localizer_max_translation_mm,
            init_extent_mm=cfg.localizer_init_extent_mm, grid_side=cfg.grid_side,
            grid_spacing_mm=cfg.grid_spacing_mm, norm=cfg.localizer_norm)
        self.unet = UNet3D(C2, 0, levels=cfg.unet_levels, widths=cfg.unet_widths,
                           front_kernel=cfg.unet_front_kernel, norm=cfg.unet_norm,
                           bottleneck_norm=cfg.unet_bottleneck_norm,
                           back_widths=cfg.unet_back_widths)
        self.head = SoftArgmaxHead(self.unet.out_features, cfg.num_verts, cfg.head_chunk_size,
                                   checkpoint=cfg.head_checkpoint, mode=cfg.head_mode)
        self.register_buffer("prior_weight", None, persistent=False)
        self.register_buffer("prior_feats", None, persistent=False)
        self.register_buffer("prior_means_mm", None, persistent=False)
        if cfg.template_prior_sigma_mm > 0:
            self._init_template_prior(template_verts)

    def _init_template_prior(self, template_verts: Optional[Tensor]) -> None:
        """Buffers of the template log-prior (see ``CoarseConfig.template_prior_sigma_mm``)."""
        cfg = self.cfg
        if template_verts is None:
            raise ValueError("CoarseModel: template_prior_sigma_mm > 0 needs template_verts (N, 3)")
        tv = torch.as_tensor(template_verts, dtype=torch.float64)
        if tv.shape != (cfg.num_verts, 3) or not torch.isfinite(tv).all():
            raise ValueError(f"CoarseModel: template_verts must be finite ({cfg.num_verts}, 3), "
                             f"got {tuple(tv.shape)}")
        voxel_mm = self.localizer.init_scale * cfg.grid_spacing_mm  # initial box voxel size
        centre = 0.5 * (tv.min(0).values + tv.max(0).values)
        means = (tv - centre) / voxel_mm
        sigma = cfg.template_prior_sigma_mm / voxel_mm
        half = (cfg.grid_side - 1) / 2.0
        reach = means.abs().max().item()
        if reach > half - 2.0 * sigma:
            logger.warning("template prior: the template reaches %.1f voxels from the box centre but "
                           "the box half-side is %.1f voxels and sigma %.2f voxels: raise "
                           "localizer_init_extent_mm so the prior is not truncated", reach, half, sigma)
        w, f = gaussian_log_prior(means, sigma, cfg.grid_side)
        self.prior_weight, self.prior_feats = w.float(), f.float()
        self.prior_means_mm = (means * cfg.grid_spacing_mm).float()  # initial-grid offsets, mm
        with torch.no_grad():  # start from the posed template; the U-Net learns residual logits
            self.head.weight.zero_()

    # ------------------------------------------------------------------ optimiser helpers
    def param_groups(self, lr: float, localizer_lr: float) -> List[Dict]:
        """Two optimiser groups: ``base`` (everything else, ``lr``) and ``localizer``
        (``localizer_lr``; training takes it from ``OptimConfig.localizer_lr``, the reference uses
        1e-4 against a base 1e-3)."""
        loc = [p for p in self.localizer.parameters()]
        ids = {id(p) for p in loc}
        base = [p for p in self.parameters() if id(p) not in ids]
        return [{"name": "base", "params": base, "lr": lr},
                {"name": "localizer", "params": loc, "lr": localizer_lr}]

    # ------------------------------------------------------------------ forward
    def _fused(self, feats: Tensor, cameras: Cameras, grid: Tensor) -> Tensor:
        """``grid (B, D, D, D, 3)`` -> fused volume ``(B, 2 d_f, D, D, D)``."""
        B, D = grid.shape[0], grid.shape[1]
        sampled, valid = sample_views(feats, cameras, grid.reshape(B, -1, 3))
        return fuse_mean_var(sampled, valid, self.cfg.fusion).reshape(B, -1, D, D, D)

    def _predict(self, feats: Tensor, cams: Cameras, center: Tensor, box: LocalizerOutput,
                 grid_rotation: Optional[Tensor], prior: Tuple[Tensor, ...]) -> Tuple[Tensor, Tensor]:
        """One pass in a given box: ``(verts (B, N, 3), grid (B, D, D, D, 3))`` world mm."""
        cfg = self.cfg
        offsets = grid_offsets(cfg.grid_side, cfg.grid_spacing_mm, dtype=feats.dtype, device=feats.device)
        grid = warp_grid(offsets, box, center, grid_rotation)
        return self.head(self.unet(self._fused(feats, cams, grid)), grid, *prior), grid

    def _template_box(self, target: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Similarity ``(s (B,), R (B, 3, 3), t (B, 3) mm)`` placing the template prior's means on
        ``target (B, N, 3)`` world mm (least squares)."""
        B = target.shape[0]
        q = self.prior_means_mm.to(dtype=target.dtype, device=target.device).expand(B, -1, -1)
        return fit_similarity(q, target)

    def _jitter_box(self, s: Tensor, R: Tensor, t: Tensor, noise: Tensor, center: Tensor) -> LocalizerOutput:
        """The similarity box ``(s (B,), R (B, 3, 3), t (B, 3) mm)`` jittered by standard-normal
        ``noise (B, 7)`` (rotation vector, log scale, translation) times the ``box_jitter_*``
        spreads: rotation ``dR @ R``, scale ``s * exp(.)``, translation ``t + .`` mm."""
        cfg, dtype = self.cfg, s.dtype
        dR = axis_angle_to_matrix(noise[:, 0:3] * math.radians(cfg.box_jitter_rot_deg)).to(dtype)
        s = s * torch.exp(noise[:, 3] * cfg.box_jitter_log_scale).to(dtype)
        t = t + (noise[:, 4:7] * cfg.box_jitter_trans_mm).to(dtype)
        return similarity_box(s, dR @ R, t, center)

    def _box_average(self, feats: Tensor, cams: Cameras, center: Tensor, verts: Tensor,
                     prior: Tuple[Tensor, ...]) -> Tensor:
        """Test-time augmentation (``cfg.tta_boxes``): the mean of ``verts (B, N, 3)`` and the
        predictions in ``tta_boxes`` jittered copies of the template's box on ``verts``."""
        K = self.cfg.tta_boxes
        half = torch.randn((K + 1) // 2, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        noise = torch.stack([half, -half], 1).reshape(-1, 7)[:K].to(device=verts.device)  # +-pairs
        s, R, t = self._template_box(verts)
        total = verts
        for k in range(K):  # one pass per box (K is a handful); the feature net ran once
            box = self._jitter_box(s, R, t, noise[k].expand(verts.shape[0], 7), center)
            total = total + self._predict(feats, cams, center, box, None, prior)[0]
        return total / (K + 1)

    def _jittered_boxes(self, loc: LocalizerOutput, R_g: Tensor, target: Tensor, center: Tensor,
                        generator: Optional[torch.Generator]) -> LocalizerOutput:
        """Per sample, with probability ``box_jitter_prob``: the template's similarity box on
        ``target``, jittered, expressed in the initial grid's frame ``R_g``; else ``loc``."""
        cfg = self.cfg
        B, dtype, device = target.shape[0], loc.scale.dtype, loc.scale.device
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(B, 7, generator=generator, dtype=torch.float64, device=gen_device).to(device)
        pick = torch.rand(B, generator=generator, dtype=torch.float64, device=gen_device).to(device)
        box = self._jitter_box(*self._template_box(target.detach().to(dtype)), noise, center)
        Rgt = R_g.transpose(1, 2)  # into the initial grid's frame: p = o + R_g (M d + t')
        use = (pick < cfg.box_jitter_prob)
        return LocalizerOutput(
            torch.where(use[:, None], box.scale, loc.scale),
            torch.where(use[:, None, None], Rgt @ box.rotation, loc.rotation),
            torch.where(use[:, None], (Rgt @ box.translation.unsqueeze(-1)).squeeze(-1), loc.translation))

    def forward(self, images: Tensor, cameras: Cameras,
                generator: Optional[torch.Generator] = None,
                pose_target: Optional[Tensor] = None) -> CoarseOutput:
        """Predict coarse vertices.

        Args:
            images: ``(B, V, image_channels, H, W)`` in [0, 1].
            cameras: :class:`Cameras` of batch shape ``(B, V)`` for these ``W x H`` images.
            generator: drives the random grid rotation and the box jitter in training
                (reproducible runs).
            pose_target: ``(B, N, 3)`` world mm, the training registrations; used only in training
                with ``box_jitter_prob > 0`` (ignored in eval).
        Returns:
            :class:`CoarseOutput`; ``verts (B, N, 3)`` world mm. ``localizer`` and
            ``template_posed`` are the localizer's box whatever pass produced ``verts``; ``grid``
            is the last pass's.
        """
        if images.dim() != 5:
            raise ValueError(f"CoarseModel: images must be (B, V, C, H, W), got {tuple(images.shape)}")
        B, V, Ci, H, W = images.shape
        cfg = self.cfg
        feats = self.feature_net(images.reshape(B * V, Ci, H, W)).reshape(B, V, -1, H, W)
        dtype, device = feats.dtype, feats.device
        cams = cameras.to(device=device, dtype=dtype)
        center = torch.tensor(cfg.grid_center_mm, dtype=dtype, device=device).expand(B, 3)
        if self.training and cfg.random_grid_rotation:
            R_g = random_rotations(B, generator=generator, dtype=dtype, device=device,
                                   sigma_deg=cfg.grid_rotation_deg)
        else:
            R_g = torch.eye(3, dtype=dtype, device=device).expand(B, 3, 3)
        grid0 = make_grid(cfg.grid_side, cfg.grid_spacing_mm, center, R_g)
        loc = self.localizer(self._fused(feats, cams, grid0))
        prior, posed = (), None
        if self.prior_weight is not None:
            prior = (self.prior_weight.to(dtype), self.prior_feats.to(dtype))
            # the prior means in initial-grid offset units, through the same box as the grid
            posed = warp_grid(self.prior_means_mm.to(dtype).view(1, 1, -1, 3), loc, center,
                              R_g).reshape(B, -1, 3)
        box = loc
        if self.training and cfg.box_jitter_prob > 0 and pose_target is not None:
            if pose_target.shape != (B, cfg.num_verts, 3):
                raise ValueError(f"CoarseModel: pose_target must be ({B}, {cfg.num_verts}, 3), "
                                 f"got {tuple(pose_target.shape)}")
            box = self._jittered_boxes(loc, R_g, pose_target.to(device), center, generator)
        verts, grid = self._predict(feats, cams, center, box, R_g, prior)
        if not self.training:
            for _ in range(cfg.rebox_iterations):
                verts, grid = self._predict(feats, cams, center,
                                            similarity_box(*self._template_box(verts), center),
                                            None, prior)
            if cfg.tta_boxes > 0:
                verts = self._box_average(feats, cams, center, verts, prior)
        return CoarseOutput(verts=verts, localizer=loc, grid=grid, initial_grid=grid0,
                            grid_rotation=R_g, template_posed=posed)
