"""One training stage: model, data, losses, AdamW, schedule, AMP, validation, checkpoints.

::

    trainer = Trainer(cfg, "runs/exp1/coarse")      # resumes from checkpoints/last.pt if any
    result = trainer.train()                        # exactly cfg.run.iterations steps in total

Stage directory written by rank 0 (see also :mod:`tempeh.engine.stages`)::

    <stage_dir>/config.yaml           the fully resolved config (rewritten on resume if changed)
    <stage_dir>/template/             the template trained with (inference needs no capture)
    <stage_dir>/checkpoints/          step_XXXXXXXX.pt (newest run.keep_last_k) and last.pt
    <stage_dir>/logs/                 TensorBoard events (train/*, val/*, images)
    <stage_dir>/metrics.jsonl         one JSON object per log step ("train") and validation ("val")

What a step is: one optimiser update on one batch of ``run.batch_size`` samples per process.
``train()`` stops after exactly ``run.iterations`` updates (the reference ran to the end of an
epoch). A batch that :func:`tempeh.data.collate` returns as ``None`` (all its frames dropped
with ``data.skip_bad_frames``) is skipped and counted (``skipped_batches``); it consumes data
but no update.

Optimiser: AdamW (``optim.betas``, ``optim.weight_decay``) with two parameter groups for the
coarse model: ``base`` at ``optim.lr`` under the schedule (``constant | step | cosine``, after a
linear warm-up of ``optim.warmup_iterations``) and ``localizer`` at the FIXED
``optim.localizer_lr`` (as the reference's 1e-4 group). The refinement model has one
group. Gradient clipping: ``optim.grad_clip`` (global norm). Mixed precision: ``optim.amp`` on
CUDA only (fp16 autocast + GradScaler; ignored with a warning on CPU); losses are computed in
float32.

Initialisation: ``run.init_from`` (a stage directory or checkpoint file) loads model weights
only: the whole model from a checkpoint of the same network, or, for the refinement, the
feature net from a coarse checkpoint (as the paper does). It is ignored when resuming.

Exact resume: checkpoints hold the model, optimiser, GradScaler, schedule, data position
(sampler epoch and batch), the global RNG states and the model's random generator (per rank), so
a killed and resumed run ends with the same weights as an uninterrupted one (bitwise on CPU).

Validation (every ``run.val_interval`` steps and at the end): all views, no augmentation, eval
mode; scan->mesh point-to-surface distances of all valid scan points (median, mean, mm), vertex
error to the registration (mean, median, mm) and to the true mesh when the capture has
``gt_meshes/``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from tempeh.config import (TrainConfig, config_hash, config_to_dict, load_config,
                           resolve_edge_weights, resolve_vertex_weights, save_config,
                           validate_config)
from tempeh.engine import distributed as D
from tempeh.engine.checkpoint import (CHECKPOINT_FORMAT, CheckpointManager, capture_rng_state,
                                      find_checkpoint, load_checkpoint, restore_rng_state)
from tempeh.engine.logging import MetricWriter, projection_image
from tempeh.errors import ConfigError, TempehDataError
from tempeh.inference import build_model

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "lr_factor", "TrainResult"]

PathLike = Union[str, os.PathLike]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``optim.lr`` for the update with index ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup`` over ``optim.warmup_iterations`` steps, then
    ``constant`` (1), ``step`` (``step_gamma`` per milestone fraction of ``run.iterations``
    passed) or ``cosine`` (from 1 at the end of the warm-up to 0 at ``run.iterations``).
    """
    o, total = cfg.optim, max(1, cfg.run.iterations)
    warm = o.warmup_iterations
    f = 1.0
    if warm > 0 and step < warm:
        f = (step + 1) / warm
    if o.schedule == "step":
        passed = sum(1 for m in o.step_milestones if step >= m * total)
        f *= o.step_gamma ** passed
    elif o.schedule == "cosine":
        span = max(1, total - warm)
        t = min(max(step - warm, 0), span) / span
        f *= 0.5 * (1.0 + math.cos(math.pi * t))
    return f


class TrainResult(dict):
    """``{"step", "skipped_batches", "skipped_frames", "seconds", "val", "interrupted"}`` of a
    ``train()`` call (``skipped_frames``: training frames dropped by ``data.skip_bad_frames``)."""


class _Predictor(nn.Module):
    """Returns the vertices as one tensor (DDP-friendly); holds the stage's model. With
    ``with_posed`` (coarse stage, ``loss.w_box > 0``) the localizer's posed template is
    appended along the vertex axis: ``(B, 2N, 3)``."""

    def __init__(self, model: nn.Module, kind: str, with_posed: bool = False):
        super().__init__()
        self.model = model
        self.kind = kind
        self.with_posed = with_posed

    def forward(self, images, cameras, coarse_verts=None, generator=None, pose_target=None):
        if self.kind == "coarse":
            out = self.model(images, cameras, generator=generator, pose_target=pose_target)
            if self.with_posed:
                return torch.cat([out.verts, out.template_posed], dim=1)
            return out.verts
        return self.model(images, cameras, coarse_verts, generator=generator).verts


def _config_diff(a: dict, b: dict, prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


class Trainer:
    """Trains one stage (see the module docstring).

    Args:
        cfg: the resolved config (validated here with ``for_training=True``).
        run_dir: the STAGE directory; default ``run.out_dir / run.name``.
        device: overrides ``run.device`` (``"cpu"``, ``"cuda:1"``, a torch.device).
        resume: continue from ``<run_dir>/checkpoints/last.pt`` when it exists.
        dist_info: distributed setup; default :func:`tempeh.engine.distributed.init_distributed`.
    Raises:
        ConfigError / TempehDataError naming the key or file at fault, before any training
        (every listed frame is checked by the datasets).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Optional[PathLike] = None,
                 device: Union[str, torch.device, None] = None, resume: bool = True,
                 dist_info: Optional[D.DistInfo] = None):
        validate_config(cfg, for_training=True)
        l = cfg.loss
        if l.w_v2v <= 0 and l.w_s2m <= 0 and l.w_edge <= 0:
            raise ConfigError("loss: every weight (w_v2v, w_s2m, w_edge) is 0; nothing to train")
        self.cfg = cfg
        self.kind = cfg.run.stage
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run.out_dir) / cfg.run.name
        self.dist = dist_info if dist_info is not None else D.init_distributed(cfg.run.device)
        self.is_main = self.dist.is_main
        self.device = (torch.device(device) if device is not None
                       else D.resolve_device(cfg.run.device, self.dist.local_rank))
        self.amp = bool(cfg.optim.amp and self.device.type == "cuda")
        if cfg.optim.amp and not self.amp:
            logger.warning("optim.amp is set but the device is %s: mixed precision is CUDA only, "
                           "training in float32", self.device)

        seed = cfg.run.seed
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)

        # ---- template and data (every listed frame is checked here, before training)
        from tempeh.data import CaptureDataset, ViewBatchSampler, make_loader
        from tempeh.io.layout import CaptureLayout

        self.template = CaptureLayout(cfg.data.root).load_template()
        N = self.template.num_verts
        self.train_set = CaptureDataset(cfg.data, cfg.data.train_list, stage=self.kind, train=True,
                                        template_num_verts=N)
        self.val_set = None
        if cfg.data.val_list is not None and cfg.run.val_interval > 0:
            self.val_set = CaptureDataset(cfg.data, cfg.data.val_list, stage=self.kind, train=False,
                                          template_num_verts=N)
        self.sampler = ViewBatchSampler(len(self.train_set), self.train_set.num_views,
                                        cfg.run.batch_size, cfg.data.min_views, cfg.data.max_views,
                                        seed=seed, rank=self.dist.rank,
                                        world_size=self.dist.world_size)
        self.loader = make_loader(self.train_set, self.sampler, cfg.data.num_workers,
                                  pin_memory=self.device.type == "cuda")

        # ---- model
        self.model = build_model(cfg, self.template).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + 1_000_003 * (self.dist.rank + 1))

        # ---- losses (region weights resolved from the template)
        from tempeh.geometry.mesh_ops import unique_edges
        from tempeh.geometry.regions import edge_vertex_weights, edge_weights, vertex_weights

        faces_cpu = torch.as_tensor(self.template.faces, dtype=torch.int64)
        self.faces = faces_cpu.to(self.device)
        self.loss_weights = {"loss_v2v": l.w_v2v, "loss_s2m": l.w_s2m, "loss_edge": l.w_edge,
                             "loss_box": l.w_box}
        self.v2v_weights = None
        self.edges = self.edge_weights = None
        try:
            if l.w_v2v > 0:
                self.v2v_weights = vertex_weights(self.template.regions,
                                                  resolve_vertex_weights(l.v2v_weights), N).to(self.device)
            if l.w_edge > 0:
                self.edges = unique_edges(faces_cpu).to(self.device)
                vw = edge_vertex_weights(self.template.regions, resolve_edge_weights(l.edge_weights),
                                         faces_cpu, N)
                self.edge_weights = edge_weights(vw, self.edges.cpu()).to(self.device)
        except ValueError as err:
            raise ConfigError(f"loss: region weights do not fit the template "
                              f"'{self.template.name}': {err}") from None

        # ---- bookkeeping
        self.step = 0
        self.batches_seen = 0
        self.skipped_batches = 0
        self.last_val: Dict[str, Any] = {}
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.run.keep_last_k)
        resume_from = find_checkpoint(self.ckpt.directory) if resume else None
        if resume_from is None and cfg.run.init_from:
            self._init_from(cfg.run.init_from)

        # ---- distributed wrapper (after weights are final, before the optimiser state is used)
        self.predictor = _Predictor(self.model, self.kind, with_posed=cfg.loss.w_box > 0)
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                  for m in self.model.modules()):
                self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor)
                self.model = self.predictor.model
                logger.info("DDP on CUDA: BatchNorm layers converted to SyncBatchNorm")
            self.ddp = DDP(self.predictor, device_ids=[self.device.index] if self.device.type == "cuda"
                           else None)

        # ---- optimiser, AMP
        o = cfg.optim
        if self.kind == "coarse":
            groups = self.model.param_groups(o.lr, localizer_lr=o.localizer_lr)
        else:
            groups = [{"name": "base", "params": list(self.model.parameters()), "lr": o.lr}]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        if resume_from is not None:
            self._resume(resume_from)
        self._prepare_run_dir()
        self.writer = MetricWriter(self.run_dir / "logs", self.run_dir / "metrics.jsonl",
                                   enabled=self.is_main,
                                   resume_step=self.step if resume_from is not None else None)
        self._stop = False
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.is_main:
            logger.info("stage %s (%s model, %.2fM parameters) on %s%s: %d train / %s val frames, "
                        "%d views, step %d of %d", self.run_dir.name, self.kind, n_params / 1e6,
                        self.device, f" x{self.dist.world_size}" if self.dist.enabled else "",
                        len(self.train_set), len(self.val_set) if self.val_set else 0,
                        self.train_set.num_views, self.step, cfg.run.iterations)

    # ================================================================== setup helpers
    def _prepare_run_dir(self) -> None:
        if not self.is_main:
            D.barrier()
            return
        from tempeh.io.templates import save_template_dir

        self.run_dir.mkdir(parents=True, exist_ok=True)
        cpath = self.run_dir / "config.yaml"
        if cpath.is_file():
            try:
                old = config_to_dict(load_config(cpath))
                diff = _config_diff(old, config_to_dict(self.cfg))
            except (ConfigError, OSError) as err:
                diff = [f"(previous config unreadable: {err})"]
            if diff:
                logger.warning("config of %s changed since the last run (%d keys): %s",
                               self.run_dir, len(diff), "; ".join(diff[:8]))
        save_config(self.cfg, cpath)
        tdir = self.run_dir / "template"
        if not (tdir / "template.ply").is_file():
            save_template_dir(tdir, self.template, units="m")
        D.barrier()

    def _init_from(self, src: PathLike) -> None:
        """Load model weights from a previous stage (module docstring)."""
        path = find_checkpoint(src)
        if path is None:
            raise TempehDataError(src, "run.init_from: no checkpoint here (expected a stage "
                                       "directory with checkpoints/last.pt, or a .pt file)")
        state = load_checkpoint(path, map_location="cpu")
        src_kind = state.get("kind", "coarse")
        sd = state["model"]
        own = self.model.state_dict()
        if self.kind == "refine" and src_kind == "coarse":
            sd = {k: v for k, v in sd.items() if k.startswith("feature_net.")}
            what = "the feature net"
        elif src_kind == self.kind:
            what = "all weights"
        else:
            raise TempehDataError(path, f"run.init_from: a {src_kind} checkpoint cannot initialise "
                                        f"a {self.kind} model")
        missing = sorted(k for k in own if k.startswith("feature_net.") and k not in sd) \
            if self.kind != src_kind else sorted(set(own) - set(sd))
        bad = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        unexpected = sorted(set(sd) - set(own))
        if missing or bad or unexpected:
            k = (missing or bad or unexpected)[0]
            why = "missing" if missing else ("has another shape" if bad else "unexpected")
            raise TempehDataError(path, f"run.init_from: weight {k!r} {why} (the "
                                        f"{'feature-net' if self.kind != src_kind else 'model'} "
                                        "settings must match the source stage)")
        self.model.load_state_dict(sd, strict=self.kind == src_kind)
        logger.info("initialised %s from %s (step %s)", what, path, state.get("step"))

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location="cpu")
        if state.get("kind") != self.kind:
            raise TempehDataError(path, f"checkpoint of a {state.get('kind')} model, this stage "
                                        f"trains a {self.kind} model")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise TempehDataError(path, f"cannot resume: the checkpoint does not fit the config "
                                        f"({str(err).splitlines()[0]})") from None
        o = self.cfg.optim
        for g in self.optimizer.param_groups:  # hyper-parameters follow the (possibly edited) config
            g["weight_decay"], g["betas"] = o.weight_decay, tuple(o.betas)
            if g.get("name") == "localizer":
                g["lr"] = o.localizer_lr
        if self.amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise TempehDataError(path, f"cannot resume: {err} (the training list or batch "
                                        "settings changed)") from None
        self.step = int(state["step"])
        self.batches_seen = int(state["batches_seen"])
        self.skipped_batches = int(state.get("skipped_batches", 0))
        restore_rng_state(state["rng"])
        gens = state.get("generators") or []
        if len(gens) == self.dist.world_size:
            self.generator.set_state(gens[self.dist.rank])
        elif gens:
            logger.warning("checkpoint was written by %d processes, now %d: the model's random "
                           "generator restarts from rank 0's state", len(gens), self.dist.world_size)
            self.generator.set_state(gens[0])
        if state.get("config_hash") != config_hash(self.cfg):
            logger.info("resuming with a changed config (see config.yaml)")
        logger.info("resumed from %s at step %d", path, self.step)

    # ================================================================== state
    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint dict (tensors and plain values only)."""
        epoch, pos = divmod(self.batches_seen, len(self.sampler))
        sampler = dict(self.sampler.state_dict(), epoch=epoch, start_step=pos)
        gens = D.all_gather_objects(self.generator.get_state().cpu())
        return {"format": CHECKPOINT_FORMAT, "kind": self.kind, "stage": self.run_dir.name,
                "step": self.step, "batches_seen": self.batches_seen,
                "skipped_batches": self.skipped_batches,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "schedule": {"schedule": self.cfg.optim.schedule, "lr": self.cfg.optim.lr,
                             "factor": lr_factor(self.step, self.cfg)},
                "sampler": sampler, "rng": capture_rng_state(), "generators": gens,
                "config_hash": config_hash(self.cfg)}

    def save_checkpoint(self) -> Optional[Path]:
        """Write a checkpoint of the current step (rank 0; every rank must call it)."""
        state = self.state_dict()  # collective (generator states)
        path = self.ckpt.save(state, self.step) if self.is_main else None
        if self.dist.enabled:
            digests = D.all_gather_objects(D.param_digest(self.model))
            if self.is_main:
                import json

                (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
                (self.run_dir / "logs" / "replicas.json").write_text(
                    json.dumps({"step": self.step, "digests": digests}) + "\n")
                if len(set(digests)) != 1:
                    logger.error("replicas differ at step %d: %s", self.step, digests)
        D.barrier()
        return path

    # ================================================================== steps
    def _set_lr(self) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.step, self.cfg)
        for g in self.optimizer.param_groups:
            if g.get("name", "base") == "base":
                g["lr"] = lr
        return lr

    def loss_terms(self, pred: torch.Tensor, batch,
                   posed: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Unweighted ``loss_*`` terms of one batch (float32); ``posed``: the localizer's posed
        template (``loss_box``)."""
        from tempeh.losses import edge_loss, scan_to_mesh_loss, v2v_loss

        l = self.cfg.loss
        terms: Dict[str, torch.Tensor] = {}
        if l.w_v2v > 0:
            terms["loss_v2v"] = v2v_loss(pred, batch.registration, self.v2v_weights,
                                         kind=l.v2v_kind)
        if l.w_s2m > 0:
            terms["loss_s2m"] = scan_to_mesh_loss(batch.scan, pred, self.faces, sigma=l.s2m_sigma_mm,
                                                  kind=l.s2m_kind, scan_valid=batch.scan_valid)
        if l.w_edge > 0:
            terms["loss_edge"] = edge_loss(pred, batch.registration, self.edges, self.edge_weights)
        if l.w_box > 0:
            if posed is None:  # validate_config requires the template prior; never skip silently
                raise ValueError("loss.w_box > 0 but the model returned no posed template")
            terms["loss_box"] = v2v_loss(posed, batch.registration, kind=l.v2v_kind)
        return terms

    def _forward(self, batch, train: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(verts (B, N, 3), posed template (B, N, 3) or None)``, float32 mm."""
        net = (self.ddp if (train and self.ddp is not None) else self.predictor)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
            out = net(batch.images, batch.cameras, batch.coarse_verts if self.kind == "refine" else None,
                      generator=self.generator if train else None,
                      pose_target=batch.registration if (train and self.kind == "coarse") else None)
        out = out.float()
        if self.predictor.with_posed:
            n = out.shape[1] // 2
            return out[:, :n], out[:, n:]
        return out, None

    def _train_step(self, batch) -> Dict[str, Any]:
        """One optimiser update; returns detached statistics."""
        from tempeh.losses import total_loss, weighted_terms

        self.model.train()
        batch = batch.to(self.device, non_blocking=True)
        lr = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        pred, posed = self._forward(batch, train=True)
        terms = self.loss_terms(pred, batch, posed)
        loss = total_loss(terms, self.loss_weights)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"non-finite loss at step {self.step + 1} (frames "
                                     f"{[str(f) for f in batch.frames]}): "
                                     f"{ {k: float(v) for k, v in terms.items()} }")
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stats = {"loss": loss.detach(), "lr": lr, "pred": pred.detach(), "batch": batch}
        stats.update({k: v.detach() for k, v in weighted_terms(terms, self.loss_weights).items()})
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm.detach()
        return stats

    # ================================================================== loop
    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002
        if self._stop:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        logger.warning("signal %d: saving a checkpoint after this step and stopping (send it "
                       "again to stop at once)", signum)
        self._stop = True

    def train(self) -> TrainResult:
        """Run until ``run.iterations`` updates in total (resuming where the checkpoint left
        off); writes a final checkpoint. SIGTERM/SIGINT stop after the current step with a
        checkpoint (``interrupted`` True)."""
        cfg = self.cfg
        total = cfg.run.iterations
        t_start = time.perf_counter()
        if self.step >= total:
            logger.info("stage %s is complete (step %d of %d)", self.run_dir.name, self.step, total)
            return TrainResult(step=self.step, skipped_batches=self.skipped_batches,
                               skipped_frames=len(self.train_set.skipped), seconds=0.0,
                               val=self.last_val, interrupted=False)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._request_stop)
        bar = tqdm(total=total, initial=self.step, desc=self.run_dir.name, unit="it",
                   dynamic_ncols=True, disable=not self.is_main)
        win_t, win_steps = time.perf_counter(), 0
        interrupted = False
        from contextlib import nullcontext

        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm() if self.is_main else nullcontext()
        try:
            redirect.__enter__()
            while self.step < total and not interrupted:
                self.sampler.set_position(self.batches_seen)
                steps_before = self.step
                for batch in self.loader:
                    self.batches_seen += 1
                    if D.any_rank(batch is None, self.device):
                        self.skipped_batches += 1
                        logger.warning("skipped a batch without usable frames (%d so far)",
                                       self.skipped_batches)
                        continue
                    stats = self._train_step(batch)
                    self.step += 1
                    win_steps += 1
                    bar.update(1)
                    s = self.step
                    if cfg.run.log_interval and (s % cfg.run.log_interval == 0 or s == total):
                        now = time.perf_counter()
                        self._log_train(stats, win_steps / max(now - win_t, 1e-9), bar)
                        win_t, win_steps = now, 0
                    if self.val_set is not None and (s % cfg.run.val_interval == 0 or s == total):
                        self.validate()
                    stop = D.any_rank(self._stop, self.device) if self.dist.enabled else self._stop
                    if stop or (cfg.run.checkpoint_interval and s % cfg.run.checkpoint_interval == 0) \
                            or s == total:
                        self.save_checkpoint()
                    if stop:
                        interrupted = True
                        break
                    if s >= total:
                        break
                else:
                    if self.step == steps_before:
                        raise TempehDataError(self.train_set.list_path,
                                              "a whole epoch gave no usable batch")
        finally:
            redirect.__exit__(None, None, None)
            bar.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.writer.flush()
        secs = time.perf_counter() - t_start
        if self.is_main:
            logger.info("stage %s: step %d of %d in %.1f s (%d skipped batches)%s",
                        self.run_dir.name, self.step, total, secs, self.skipped_batches,
                        " (interrupted)" if interrupted else "")
        return TrainResult(step=self.step, skipped_batches=self.skipped_batches,
                           skipped_frames=len(self.train_set.skipped), seconds=secs,
                           val=self.last_val, interrupted=interrupted)

    def _log_train(self, stats: Dict[str, Any], it_per_s: float, bar) -> None:
        from tempeh.losses import scan_to_mesh_distance

        b = stats["batch"]
        s2m = scan_to_mesh_distance(b.scan, stats["pred"], self.faces, b.scan_valid)
        keys = ["loss"] + sorted(k for k in stats if k.startswith("loss_"))
        vals = torch.stack([stats[k].float().reshape(()) for k in keys] + [s2m.float().reshape(())])
        D.all_reduce_sum(vals)
        vals = (vals / self.dist.world_size).tolist()
        rec = dict(zip(keys, vals))
        rec["s2m_mm"] = vals[-1]
        rec["lr"] = stats["lr"]
        if "grad_norm" in stats:
            rec["grad_norm"] = float(stats["grad_norm"])
        rec["it_per_s"] = it_per_s
        rec["samples_per_s"] = it_per_s * self.cfg.run.batch_size * self.dist.world_size
        rec["skipped_batches"] = self.skipped_batches
        rec["skipped_frames"] = len(self.train_set.skipped)
        if self.amp:
            rec["amp_scale"] = float(self.scaler.get_scale())
        if self.is_main:
            self.writer.scalars(self.step, rec, "train")
            self.writer.record(self.step, "train", rec)
            bar.set_postfix(loss=f"{rec['loss']:.3g}", s2m=f"{rec['s2m_mm']:.2f}mm", refresh=False)

    # ================================================================== validation
    @torch.no_grad()
    def validate(self, log: bool = True) -> Dict[str, Any]:
        """Validation metrics (module docstring); recorded in ``metrics.jsonl`` when ``log``."""
        from tempeh.data import eval_batches, make_loader
        from tempeh.losses import scan_to_mesh_distances

        if self.val_set is None:
            return {}
        ds = self.val_set
        batches = eval_batches(len(ds), self.cfg.run.batch_size, ds.num_views, self.dist.rank,
                               self.dist.world_size)
        loader = make_loader(ds, batches, self.cfg.data.num_workers)
        was_training = self.model.training
        self.model.eval()
        s2m: List[np.ndarray] = []
        reg: List[np.ndarray] = []
        gt: List[np.ndarray] = []
        image = None
        t0 = time.perf_counter()
        for batch in loader:
            if batch is None:
                continue
            batch = batch.to(self.device)
            pred, _ = self._forward(batch, train=False)
            d = scan_to_mesh_distances(batch.scan, pred, self.faces, batch.scan_valid)
            for i in range(len(batch)):
                s2m.append(d[i][batch.scan_valid[i]].cpu().double().numpy())
            reg.append((pred - batch.registration).norm(dim=-1).cpu().double().numpy().reshape(-1))
            if batch.gt_verts is not None:
                gt.append((pred - batch.gt_verts).norm(dim=-1).cpu().double().numpy().reshape(-1))
            if image is None and self.is_main and log:
                image = projection_image(batch.images[0], batch.cameras[0], pred[0],
                                         batch.registration[0])
        self.model.train(was_training)
        parts = D.all_gather_objects((s2m, reg, gt))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        s2m_all = cat([a for p in parts for a in p[0]])
        reg_all = cat([a for p in parts for a in p[1]])
        gt_all = cat([a for p in parts for a in p[2]])
        res: Dict[str, Any] = {"frames": int(sum(len(p[0]) for p in parts))}
        if s2m_all.size:
            res.update(s2m_median_mm=float(np.median(s2m_all)), s2m_mean_mm=float(s2m_all.mean()))
        if reg_all.size:
            res.update(reg_v2v_mean_mm=float(reg_all.mean()), reg_v2v_median_mm=float(np.median(reg_all)))
        if gt_all.size:
            res.update(gt_v2v_mean_mm=float(gt_all.mean()), gt_v2v_median_mm=float(np.median(gt_all)))
        res["seconds"] = time.perf_counter() - t0
        self.last_val = res
        if log and self.is_main:
            self.writer.scalars(self.step, res, "val")
            self.writer.record(self.step, "val", res)
            if image is not None:
                self.writer.image(self.step, "val/projection", image)
            logger.info("validation at step %d: %s", self.step,
                        ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in res.items()))
        return res

    def close(self) -> None:
        self.writer.close()
