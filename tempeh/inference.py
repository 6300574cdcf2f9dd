"""Loading trained stages and predicting meshes (used by the ``cache_coarse`` stage and by
sequence registration).

A trained stage directory (see :mod:`tempeh.engine.stages`) holds ``config.yaml`` (the resolved
training config), ``template/`` (the template the model was trained with) and
``checkpoints/last.pt``::

    model, cfg = load_stage_model("runs/exp1", "coarse", device="cpu")
    verts = predict_coarse(model, batch)                  # (B, N, 3) world mm
    refine, _ = load_stage_model("runs/exp1", "refine")
    verts = predict_refine(refine, batch, coarse_verts)   # (B, N, 3) world mm

Predictions use eval mode (no random grid rotations) and no gradient; ``batch`` is a
:class:`tempeh.data.Batch` (or anything with ``images`` and ``cameras``) whose images the cameras
describe exactly.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from tempeh.config import TrainConfig, load_config
from tempeh.errors import ConfigError, TempehDataError
from tempeh.template import Template

logger = logging.getLogger(__name__)

__all__ = ["build_model", "model_kind", "load_stage_model", "load_template_for",
           "predict_coarse", "predict_refine", "write_meshes"]

PathLike = Union[str, os.PathLike]


def model_kind(cfg: TrainConfig) -> str:
    """``"coarse"`` or ``"refine"`` (the network a config trains)."""
    return cfg.run.stage


def build_model(cfg: TrainConfig, template: Template) -> nn.Module:
    """The network of ``cfg.run.stage`` for ``template`` (vertex count checked)."""
    from tempeh.models.coarse import CoarseModel
    from tempeh.models.refine import RefineModel

    if cfg.run.stage == "coarse":
        if cfg.model.num_verts != template.num_verts:
            raise ConfigError(f"model.num_verts: {cfg.model.num_verts}, but the template "
                              f"'{template.name}' has {template.num_verts} vertices "
                              f"(set model.num_verts={template.num_verts})")
    try:
        if cfg.run.stage == "coarse":
            return CoarseModel(cfg.model, torch.as_tensor(template.verts, dtype=torch.float32))
        return RefineModel(cfg.model, torch.as_tensor(template.verts, dtype=torch.float32),
                           torch.as_tensor(template.faces, dtype=torch.int64))
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def load_template_for(stage_dir: PathLike, cfg: Optional[TrainConfig] = None) -> Template:
    """The template saved with a stage (``<stage_dir>/template``), else the capture's."""
    from tempeh.io.templates import load_template_dir

    tdir = Path(stage_dir) / "template"
    if tdir.is_dir():
        return load_template_dir(tdir)
    if cfg is not None and cfg.data.root is not None:
        from tempeh.io.layout import CaptureLayout

        return CaptureLayout(cfg.data.root).load_template()
    raise TempehDataError(tdir, "template folder not found")


def load_stage_model(run_dir: PathLike, stage: str, device: Union[str, torch.device] = "cpu",
                     checkpoint: Optional[PathLike] = None,
                     overrides: Sequence[str] = ()) -> Tuple[nn.Module, TrainConfig]:
    """Load a trained stage: ``(model in eval mode on device, resolved config)``.

    Args:
        run_dir: the run directory (``<run>``); the stage lives in ``<run>/<stage>``. A stage
            directory itself is accepted when ``stage`` is None-like ("").
        stage: ``coarse_pretrain``, ``coarse`` or ``refine``.
        device: where to put the model.
        checkpoint: a specific checkpoint file (default: ``checkpoints/last.pt``).
        overrides: ``key=value`` changes to the saved config before the model is built, for
            inference-time settings such as ``model.rebox_iterations`` (a change that alters the
            weights' shapes fails when they are loaded).
    Raises:
        TempehDataError naming the missing config or checkpoint; ConfigError naming a bad
        override.
    """
    from tempeh.engine.checkpoint import find_checkpoint, load_checkpoint

    sdir = Path(run_dir) / stage if stage else Path(run_dir)
    cfg_path = sdir / "config.yaml"
    if not cfg_path.is_file():
        raise TempehDataError(cfg_path, f"no resolved config of stage {stage!r} (was it trained?)")
    cfg = load_config(cfg_path, overrides)
    ckpt_path = Path(checkpoint) if checkpoint is not None else find_checkpoint(sdir)
    if ckpt_path is None:
        raise TempehDataError(sdir / "checkpoints" / "last.pt", f"no checkpoint of stage {stage!r}")
    template = load_template_for(sdir, cfg)
    model = build_model(cfg, template)
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise TempehDataError(ckpt_path, f"weights do not fit the config's model: "
                                         f"{str(err).splitlines()[0]}") from None
    model.to(device).eval()
    logger.info("loaded %s (step %s)", ckpt_path, ckpt.get("step"))
    return model, cfg


@torch.no_grad()
def predict_coarse(model: nn.Module, batch, amp: bool = False) -> torch.Tensor:
    """Coarse vertices ``(B, N, 3)`` world mm (eval mode, all views given, no gradient)."""
    dev = next(model.parameters()).device
    model.eval()
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp and dev.type == "cuda"):
        out = model(batch.images.to(dev), batch.cameras.to(dev))
    return out.verts.float()


@torch.no_grad()
def predict_refine(model: nn.Module, batch, coarse_verts: Optional[torch.Tensor] = None,
                   amp: bool = False) -> torch.Tensor:
    """Refined vertices ``(B, N, 3)`` world mm from ``coarse_verts`` (default
    ``batch.coarse_verts``). The images/cameras must be at the refinement's resolution."""
    dev = next(model.parameters()).device
    coarse = batch.coarse_verts if coarse_verts is None else coarse_verts
    if coarse is None:
        raise ValueError("predict_refine: no coarse vertices (pass coarse_verts or a batch "
                         "with coarse_verts)")
    model.eval()
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp and dev.type == "cuda"):
        out = model(batch.images.to(dev), batch.cameras.to(dev), coarse.to(dev))
    return out.verts.float()


def write_meshes(out_dir: PathLike, frames: Sequence, verts: torch.Tensor, faces,
                 units: str = "m") -> list:
    """Write ``(B, N, 3)`` mm meshes as ``<out>/<subject>/<sequence>/<sequence>.<frame>.ply``
    (the registrations layout) in ``units`` (metres by default). Returns the paths."""
    from tempeh.io.layout import frame_file
    from tempeh.io.mesh import write_mesh

    paths = []
    v = verts.detach().cpu().double().numpy()
    for i, fid in enumerate(frames):
        p = frame_file(out_dir, fid)
        write_mesh(p, v[i], faces, units=units)
        paths.append(p)
    return paths
