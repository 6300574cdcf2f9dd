"""The training pipeline: an ordered list of stages, each resumable (VHAP style).

Stages, in order::

    coarse_pretrain   coarse network, v2v on all vertices          (configs/coarse_pretrain.yaml)
    coarse            coarse network, initialised from coarse_pretrain;
                      v2v eyeballs + scan-to-mesh 10 + edge 1      (configs/coarse.yaml)
    cache_coarse      the coarse model (eval mode, all views, no augmentation) predicts every
                      frame of its train and val lists -> <run>/coarse_cache/ (PLY, metres,
                      registrations layout) + cache.json
    refine            refinement network, feature net initialised from coarse; reads
                      <run>/coarse_cache as data.coarse_cache_dir (a missing file is an error)
                                                                   (configs/refine.yaml)

Run directory::

    <run>/<stage>/config.yaml              resolved config of the stage
    <run>/<stage>/template/                template trained with
    <run>/<stage>/checkpoints/step_XXXXXXXX.pt, last.pt
    <run>/<stage>/logs/                    TensorBoard
    <run>/<stage>/metrics.jsonl            train / val records
    <run>/coarse_cache/<subject>/<sequence>/<sequence>.<frame>.ply, cache.json

Which config file a training stage uses (:func:`stage_config_files`):

* ``--config DIR`` (default: this repository's ``configs/``): ``DIR/<stage>.yaml``;
* ``--config STAGE=FILE`` (repeatable): that stage's file;
* ``--config FILE`` when exactly one training stage is selected: that stage's file.

Overrides ``key=value`` apply to every training stage, ``STAGE:key=value`` to one
(``refine:model.grid_side=4``). The pipeline itself sets, before the user's overrides,
``run.name=<stage>``, ``run.out_dir=<run>``, ``run.init_from`` (coarse: ``<run>/coarse_pretrain``;
refine: ``<run>/coarse``) and, for refine, ``data.coarse_cache_dir=<run>/coarse_cache``.

Every stage resumes from its ``last.pt``; a completed stage is skipped; the cache is rebuilt
only when the coarse checkpoint or the frame lists changed (``cache.json``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from tempeh.config import TrainConfig, load_config, validate_config
from tempeh.errors import ConfigError, TempehDataError

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "TRAIN_STAGES", "CACHE_DIR", "default_config_dir", "select_stages",
           "split_overrides", "stage_config_files", "stage_config", "stage_status",
           "cache_coarse", "run_pipeline"]

PathLike = Union[str, os.PathLike]

#: every stage, in pipeline order.
STAGES: Tuple[str, ...] = ("coarse_pretrain", "coarse", "cache_coarse", "refine")
#: stages that train a network (have a config file).
TRAIN_STAGES: Tuple[str, ...] = ("coarse_pretrain", "coarse", "refine")
#: name of the coarse-cache folder inside the run directory.
CACHE_DIR = "coarse_cache"
#: the network each training stage trains.
STAGE_KIND: Dict[str, str] = {"coarse_pretrain": "coarse", "coarse": "coarse", "refine": "refine"}


def default_config_dir() -> Path:
    """This repository's ``configs/`` folder (found relative to the package)."""
    return Path(__file__).resolve().parents[2] / "configs"


def select_stages(stages: Optional[str] = None, start: Optional[str] = None) -> List[str]:
    """``--stages a,b,c`` (kept in pipeline order) or ``--from STAGE`` (it and every later
    stage); neither: all stages."""
    if stages and start:
        raise ConfigError("give either --stages or --from, not both")
    if start:
        if start not in STAGES:
            raise ConfigError(f"--from: unknown stage {start!r} (stages: {', '.join(STAGES)})")
        return list(STAGES[STAGES.index(start):])
    if stages:
        names = [s.strip() for s in stages.split(",") if s.strip()]
        bad = [s for s in names if s not in STAGES]
        if bad:
            raise ConfigError(f"--stages: unknown stage(s) {bad} (stages: {', '.join(STAGES)})")
        return [s for s in STAGES if s in names]
    return list(STAGES)


def split_overrides(overrides: Sequence[str]) -> Dict[str, List[str]]:
    """``key=value`` -> every training stage; ``STAGE:key=value`` -> that stage only.
    Returns stage -> its overrides in the given order."""
    out: Dict[str, List[str]] = {s: [] for s in TRAIN_STAGES}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected KEY=VALUE or STAGE:KEY=VALUE")
        key, value = o.split("=", 1)
        if ":" in key:
            stage, key = key.split(":", 1)
            if stage not in TRAIN_STAGES:
                raise ConfigError(f"override {o!r}: unknown training stage {stage!r} "
                                  f"({', '.join(TRAIN_STAGES)})")
            out[stage].append(f"{key}={value}")
        else:
            for s in TRAIN_STAGES:
                out[s].append(o)
    return out


def stage_config_files(configs: Sequence[str], selected: Sequence[str]) -> Dict[str, Path]:
    """Training stage -> config file, from the ``--config`` arguments (module docstring)."""
    train_sel = [s for s in selected if s in TRAIN_STAGES]
    base_dir: Optional[Path] = None
    explicit: Dict[str, Path] = {}
    single: Optional[Path] = None
    for c in configs or ():
        stage, sep, path = c.partition("=")
        if sep and stage in TRAIN_STAGES:
            explicit[stage] = Path(path)
        elif sep:
            raise ConfigError(f"--config {c}: unknown stage {stage!r} ({', '.join(TRAIN_STAGES)})")
        elif Path(c).is_dir():
            base_dir = Path(c)
        else:
            if single is not None:
                raise ConfigError("--config FILE given twice; use --config STAGE=FILE per stage "
                                  "or --config DIR")
            single = Path(c)
    if single is not None:
        if len(train_sel) != 1:
            raise ConfigError(f"--config {single}: a single config file needs exactly one training "
                              f"stage (selected: {', '.join(train_sel) or 'none'}); use "
                              "--config STAGE=FILE per stage or --config DIR with <stage>.yaml files")
        explicit.setdefault(train_sel[0], single)
    base_dir = base_dir or default_config_dir()
    return {s: explicit.get(s, base_dir / f"{s}.yaml") for s in TRAIN_STAGES}


def _pipeline_overrides(stage: str, run_dir: Path) -> List[str]:
    def q(p: Path) -> str:
        return json.dumps(str(p))  # a YAML-safe quoted string

    o = [f"run.name={stage}", f"run.out_dir={q(run_dir)}"]
    if stage == "coarse":
        o.append(f"run.init_from={q(run_dir / 'coarse_pretrain')}")
    elif stage == "coarse_pretrain":
        o.append("run.init_from=null")
    elif stage == "refine":
        o += [f"run.init_from={q(run_dir / 'coarse')}",
              f"data.coarse_cache_dir={q(run_dir / CACHE_DIR)}"]
    return o


def stage_config(stage: str, file: PathLike, run_dir: PathLike, overrides: Sequence[str] = ()
                 ) -> TrainConfig:
    """The resolved config of a training stage: ``file`` + pipeline settings + overrides."""
    cfg = load_config(file, _pipeline_overrides(stage, Path(run_dir)) + list(overrides))
    if cfg.run.stage != STAGE_KIND[stage]:
        raise ConfigError(f"run.stage: {file} trains the {cfg.run.stage} network, but stage "
                          f"{stage!r} needs {STAGE_KIND[stage]!r} (wrong config for this stage?)")
    return cfg


def stage_status(stage_dir: PathLike, iterations: int) -> Tuple[int, bool]:
    """``(step of the last checkpoint or 0, complete?)``."""
    from tempeh.engine.checkpoint import find_checkpoint, load_checkpoint

    ck = find_checkpoint(Path(stage_dir) / "checkpoints")
    if ck is None:
        return 0, False
    step = int(load_checkpoint(ck).get("step", 0))
    return step, step >= iterations


# ============================================================================ cache_coarse
def cache_coarse(run_dir: PathLike, device: Union[str, torch.device, None] = None,
                 batch_size: Optional[int] = None) -> Path:
    """Predict the coarse mesh of every frame of the coarse stage's train and val lists.

    Eval mode, all views, no augmentation; written as ``<run>/coarse_cache/<s>/<q>/<q>.<f>.ply``
    in metres with the template's faces, plus ``cache.json`` (checkpoint step, config hash,
    frame count). Skipped when ``cache.json`` matches the current checkpoint and lists.
    Under torchrun each rank predicts its share of the frames.
    """
    from tempeh.config import config_hash
    from tempeh.data import CaptureDataset, eval_batches, make_loader
    from tempeh.engine import distributed as D
    from tempeh.engine.checkpoint import find_checkpoint, load_checkpoint
    from tempeh.inference import load_stage_model, load_template_for, predict_coarse, write_meshes

    run_dir = Path(run_dir)
    sdir = run_dir / "coarse"
    out = run_dir / CACHE_DIR
    ck = find_checkpoint(sdir / "checkpoints")
    if ck is None:
        raise TempehDataError(sdir / "checkpoints" / "last.pt",
                              "cache_coarse needs a trained coarse stage (run stage 'coarse' first)")
    cfg = load_config(sdir / "config.yaml")
    info = D.init_distributed(cfg.run.device if device is None else str(device))
    dev = torch.device(device) if device is not None and str(device) not in ("auto", "cuda") \
        else D.resolve_device(device or cfg.run.device, info.local_rank)
    lists = [x for x in (cfg.data.train_list, cfg.data.val_list) if x is not None]
    step = int(load_checkpoint(ck).get("step", -1))
    manifest = {"checkpoint_step": step, "config_hash": config_hash(cfg), "root": cfg.data.root,
                "lists": lists}
    mpath = out / "cache.json"
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
            if all(old.get(k) == v for k, v in manifest.items()):
                logger.info("coarse cache %s is up to date (step %d)", out, step)
                return out
        except (OSError, ValueError):
            pass
    model, cfg = load_stage_model(run_dir, "coarse", device=dev)
    template = load_template_for(sdir, cfg)
    amp = bool(cfg.optim.amp and dev.type == "cuda")
    bs = batch_size or cfg.run.batch_size
    n_frames = 0
    from tqdm import tqdm

    for lst in lists:
        ds = CaptureDataset(cfg.data, lst, stage="coarse", train=False,
                            template_num_verts=template.num_verts)
        batches = eval_batches(len(ds), bs, ds.num_views, info.rank, info.world_size)
        loader = make_loader(ds, batches, cfg.data.num_workers)
        for batch in tqdm(loader, desc=f"cache_coarse {Path(lst).stem}", unit="batch",
                          disable=not info.is_main, dynamic_ncols=True):
            if batch is None:
                continue
            verts = predict_coarse(model, batch, amp=amp)
            write_meshes(out, batch.frames, verts, template.faces, units="m")
            n_frames += len(batch)
    total = sum(D.all_gather_objects(n_frames))
    D.barrier()
    if info.is_main:
        from tempeh.io.mesh import atomic_write

        manifest["frames"] = int(total)
        with atomic_write(mpath, "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.write("\n")
        logger.info("cached %d coarse meshes in %s", total, out)
    D.barrier()
    return out


# ============================================================================ pipeline
def run_pipeline(run_dir: PathLike, stages: Sequence[str], configs: Sequence[str] = (),
                 overrides: Sequence[str] = (), device: Optional[str] = None) -> Dict[str, dict]:
    """Run ``stages`` in pipeline order; returns stage -> result summary.

    Every selected training stage's config is resolved (and its data checked by the trainer)
    when the stage starts; configs of all selected stages are resolved up front so a typo fails
    before hours of training.
    """
    from tempeh.engine.trainer import Trainer

    run_dir = Path(run_dir)
    files = stage_config_files(configs, stages)
    per_stage = split_overrides(overrides)
    cfgs: Dict[str, TrainConfig] = {}
    for s in stages:
        if s in TRAIN_STAGES:
            cfg = stage_config(s, files[s], run_dir, per_stage[s])
            if device is not None:
                cfg.run.device = device
            cfgs[s] = validate_config(cfg, for_training=True)
    results: Dict[str, dict] = {}
    for s in stages:
        logger.info("=== stage %s", s)
        if s == "cache_coarse":
            out = cache_coarse(run_dir, device=device)
            results[s] = {"cache_dir": str(out)}
            continue
        cfg = cfgs[s]
        step, done = stage_status(run_dir / s, cfg.run.iterations)
        if done:
            logger.info("stage %s complete (step %d of %d): skipped", s, step, cfg.run.iterations)
            results[s] = {"step": step, "skipped": True}
            continue
        trainer = Trainer(cfg, run_dir / s)
        try:
            res = trainer.train()
        finally:
            trainer.close()
        results[s] = dict(res)
        if res.get("interrupted"):
            logger.warning("stage %s interrupted at step %d; rerun the same command to resume", s,
                           res["step"])
            break
        del trainer
    return results
