"""Optimisation-based scan fitting: register the template to raw scans (issue 9).

* :mod:`tempeh.fitting.rigid`: similarity alignment (Umeyama from correspondences, robust
  ICP with exact closest points, a global yaw/pitch search).
* :mod:`tempeh.fitting.nonrigid`: :func:`fit_scan`, the coarse-to-fine non-rigid fit
  (:class:`FitConfig`, :class:`FitStage`, :class:`FitResult`).
* :mod:`tempeh.fitting.deform`: the deformation model (smooth basis, jaw, neck articulation).
* :mod:`tempeh.fitting.energy`: the energy terms (robust data terms, ARAP, priors).

The command line tool is ``tools/fit_scans.py`` (:mod:`tempeh.cli.fit_scans`).
"""
from tempeh.fitting.deform import deformation_basis, jaw_weight, neck_weight
from tempeh.fitting.energy import arap_energy
from tempeh.fitting.nonrigid import (FitConfig, FitResult, FitStage, fit_config_from_dict, fit_scan,
                                     prepare_scan, resolve_device)
from tempeh.fitting.rigid import (Similarity, global_align, robust_icp,
                                  similarity_from_correspondences)

__all__ = [
    "FitConfig", "FitStage", "FitResult", "fit_scan", "fit_config_from_dict", "prepare_scan",
    "resolve_device", "arap_energy", "deformation_basis", "neck_weight", "jaw_weight",
    "Similarity", "global_align", "robust_icp", "similarity_from_correspondences",
]
