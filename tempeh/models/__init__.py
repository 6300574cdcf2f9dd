"""Networks of the coarse and refinement stages, built from pure functions in volume.py and
soft_argmax.py under thin modules."""
from tempeh.models.coarse import CoarseConfig, CoarseModel, CoarseOutput
from tempeh.models.feature_net import FeatureNet2D
from tempeh.models.local_fusion import fuse_local, fusion_weights, local_grids
from tempeh.models.localizer import Localizer, LocalizerOutput, warp_grid
from tempeh.models.refine import RefineConfig, RefineModel, RefineOutput
from tempeh.models.soft_argmax import SoftArgmaxHead, soft_argmax
from tempeh.models.unet3d import UNet3D, make_norm
from tempeh.models.volume import (fuse_mean_var, grid_offsets, make_grid, sample_views,
                                  weighted_mean_var)

__all__ = [
    "CoarseConfig", "CoarseModel", "CoarseOutput", "FeatureNet2D", "Localizer", "LocalizerOutput",
    "warp_grid", "SoftArgmaxHead", "soft_argmax", "UNet3D", "make_norm", "fuse_mean_var",
    "grid_offsets", "make_grid", "sample_views", "weighted_mean_var", "RefineConfig", "RefineModel",
    "RefineOutput", "fuse_local", "fusion_weights", "local_grids",
]
