"""DDP: a 2-process gloo run on CPU under torchrun (through tools/train.py) keeps the replicas
identical and matches a single-process run with the same global batch.

The tiny config has no BatchNorm (GroupNorm / no norm), so per-rank batches give the same
gradients as one big batch; random grid rotations are off because each rank draws its own.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tempeh.config import load_config
from tempeh.engine.checkpoint import load_checkpoint
from tempeh.engine.trainer import Trainer
from test_trainer import capture, cfg_dir  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def test_two_process_gloo_matches_single_process(capture, cfg_dir, tmp_path):  # noqa: F811
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools" / "train.py"), "--run-dir", str(run), "--config", str(cfg_dir),
           "--stages", "coarse_pretrain", f"data.root={capture}", "run.batch_size=1",
           "run.iterations=3", "run.checkpoint_interval=2", "run.val_interval=3",
           "model.random_grid_rotation=false", "optim.lr=0.001"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sdir = run / "coarse_pretrain"
    replicas = json.loads((sdir / "logs" / "replicas.json").read_text())
    assert replicas["step"] == 3 and len(replicas["digests"]) == 2
    assert replicas["digests"][0] == replicas["digests"][1]  # identical parameters on both ranks
    ddp = load_checkpoint(sdir / "checkpoints" / "last.pt")
    assert ddp["step"] == 3 and len(ddp["generators"]) == 2

    # the same global batch (2 frames per step) in one process
    cfg = load_config(sdir / "config.yaml")
    cfg.run.batch_size = 2
    single = Trainer(cfg, tmp_path / "single")
    res = single.train()
    single.close()
    # parameters agree (measured: <= 1e-6), except entries without a real gradient: the head
    # bias (the softmax over the grid is shift invariant, so its gradient is float noise
    # < 1e-8) takes Adam steps of noise, at most 3 steps x lr per run.
    lr, off, total = 1e-3, 0, 0
    for name, p in single.model.named_parameters():
        v, r = ddp["model"][name], p.detach()
        bad = ~torch.isclose(v, r, rtol=1e-4, atol=1e-5)
        no_grad = single.optimizer.state[p]["exp_avg_sq"].sqrt() < 1e-7
        assert bool((no_grad | ~bad).all()), f"{name}: max diff {(v - r)[bad].abs().max().item():.3g}"
        assert (v - r).abs().max().item() <= 2 * 3 * lr * 1.01, name
        off += int(bad.sum())
        total += v.numel()
    assert off <= 0.01 * total, (off, total)
    # distributed validation gathers every rank's frames
    val = [json.loads(x) for x in (sdir / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["split"] == "val"]
    assert val[-1]["frames"] == res["val"]["frames"] == 1
    assert abs(val[-1]["reg_v2v_mean_mm"] - res["val"]["reg_v2v_mean_mm"]) < 1e-2


def test_exit_process_flushes_and_keeps_the_code(monkeypatch):
    """A torchrun worker leaves with os._exit after flushing (no interpreter finalisation); a
    single process raises SystemExit. Both keep the exit code and the buffered output."""
    from tempeh.engine.distributed import exit_process

    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr, level=logging.INFO); "
            "from tempeh.engine.distributed import exit_process; print('done', end=''); "
            "logging.getLogger('x').info('logged'); exit_process(3)")
    for world in ("1", "2"):
        env = dict(os.environ, WORLD_SIZE=world, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3, (world, proc.stderr)
        assert proc.stdout == "done" and "logged" in proc.stderr, (world, proc.stdout, proc.stderr)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        exit_process(4)
    assert exc.value.code == 4
