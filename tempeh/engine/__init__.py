"""Training engine: stages, trainer, checkpoints, metric writer, distributed helpers.

Run layout (one directory per run, one sub-directory per stage)::

    <run>/coarse_pretrain/{config.yaml, template/, checkpoints/{step_XXXXXXXX.pt, last.pt},
                           logs/ (TensorBoard), metrics.jsonl}
    <run>/coarse/...            same layout
    <run>/coarse_cache/<subject>/<sequence>/<sequence>.<frame>.ply   (metres) + cache.json
    <run>/refine/...            same layout

See :mod:`tempeh.engine.stages` for the stage list and :mod:`tempeh.engine.trainer` for one stage.
"""
from tempeh.engine.checkpoint import (CheckpointManager, capture_rng_state, find_checkpoint,
                                      load_checkpoint, restore_rng_state, save_checkpoint)
from tempeh.engine.distributed import DistInfo, init_distributed, resolve_device
from tempeh.engine.trainer import Trainer, TrainResult, lr_factor

__all__ = ["Trainer", "TrainResult", "lr_factor", "CheckpointManager", "save_checkpoint",
           "load_checkpoint", "find_checkpoint", "capture_rng_state", "restore_rng_state",
           "DistInfo", "init_distributed", "resolve_device"]
