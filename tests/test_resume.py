"""Checkpoints and exact resume: a killed and resumed run ends bitwise equal to an
uninterrupted one (CPU), checkpoints are atomic, keep-last-k, and load with weights_only."""
import json

import pytest
import torch

from tempeh.engine import checkpoint as C
from tempeh.engine.trainer import Trainer
from test_trainer import capture, cfg_dir, tiny_config  # noqa: F401 (fixtures)

# coarse phase 2 losses (v2v eyeballs + s2m + edge), augmentation and random grid rotations on,
# warm-up + cosine schedule, clipping: every piece of state that resume must restore
OVERRIDES = ["run.iterations=7", "run.checkpoint_interval=3", "run.val_interval=0",
             "run.log_interval=2", "optim.schedule=cosine", "optim.warmup_iterations=2",
             "optim.grad_clip=1.0"]


class Killed(RuntimeError):
    pass


def _state(tr):
    return tr.model.state_dict(), tr.optimizer.state_dict()


def _assert_bitwise_equal(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"model {k} differs"
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), f"optimizer state {i}.{k} differs"


def test_kill_and_resume_is_bitwise_identical(capture, cfg_dir, tmp_path):  # noqa: F811
    cfg = tiny_config(capture, cfg_dir, tmp_path, stage="coarse", overrides=OVERRIDES)
    cfg.run.init_from = None

    straight = Trainer(cfg, tmp_path / "straight")
    assert straight.train()["step"] == 7
    ref = _state(straight)
    straight.close()

    # run 2: killed during step 5 (after the checkpoint of step 3), like a crash or kill -9
    run = tmp_path / "killed"
    tr = Trainer(cfg, run)
    step_fn = tr._train_step

    def dying_step(batch):
        if tr.step == 4:
            raise Killed("simulated kill")
        return step_fn(batch)

    tr._train_step = dying_step
    with pytest.raises(Killed):
        tr.train()
    tr.close()
    assert C.load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    # lines the killed run logged after step 3 are dropped on resume
    del tr
    torch.manual_seed(12345)  # the resumed run must not depend on the global RNG state left here

    resumed = Trainer(cfg, run)
    assert resumed.step == 3 and resumed.batches_seen == 3
    res = resumed.train()
    assert res["step"] == 7
    _assert_bitwise_equal(_state(resumed), ref)
    resumed.close()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 7]  # one history: no duplicate of step 4 from the killed run

    # a complete stage does nothing when trained again
    again = Trainer(cfg, run)
    assert again.train()["step"] == 7
    _assert_bitwise_equal(_state(again), ref)
    again.close()


def test_checkpoints_keep_last_k_and_load_weights_only(capture, cfg_dir, tmp_path):  # noqa: F811
    cfg = tiny_config(capture, cfg_dir, tmp_path, overrides=[
        "run.iterations=5", "run.checkpoint_interval=1", "run.keep_last_k=2", "run.val_interval=0"])
    tr = Trainer(cfg, tmp_path / "s")
    tr.train()
    ck = tmp_path / "s" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "step_00000004.pt", "step_00000005.pt"]
    state = torch.load(ck / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 5 and state["kind"] == "coarse"
    assert state["sampler"]["epoch"] == 2 and state["sampler"]["start_step"] == 1  # 2 batches/epoch
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert all(torch.equal(state["model"][k], v) for k, v in tr.model.state_dict().items())
    assert C.find_checkpoint(tmp_path / "s") == ck / "last.pt"

    # a save that dies half-way leaves the previous checkpoint and no temporary file
    def boom(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    orig = torch.save
    torch.save = boom
    try:
        with pytest.raises(OSError):
            tr.ckpt.save(tr.state_dict(), 6)
    finally:
        torch.save = orig
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "step_00000004.pt", "step_00000005.pt"]
    assert C.load_checkpoint(ck / "last.pt")["step"] == 5
    tr.close()

    # an unreadable checkpoint is an error naming the file
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        C.load_checkpoint(bad)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = C.capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    C.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_sigterm_checkpoints_and_stops(capture, cfg_dir, tmp_path):  # noqa: F811
    """SIGTERM (SLURM preemption, kill): the current step finishes, a checkpoint is written,
    train() returns interrupted; the next Trainer continues from there."""
    import os
    import signal

    cfg = tiny_config(capture, cfg_dir, tmp_path, overrides=[
        "run.iterations=4", "run.checkpoint_interval=100", "run.val_interval=0"])
    tr = Trainer(cfg, tmp_path / "s")
    step_fn = tr._train_step

    def step_then_term(batch):
        out = step_fn(batch)
        if tr.step == 1:  # during the 2nd step
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    tr._train_step = step_then_term
    res = tr.train()
    tr.close()
    assert res["interrupted"] and res["step"] == 2
    assert C.load_checkpoint(tmp_path / "s" / "checkpoints" / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    again = Trainer(cfg, tmp_path / "s")
    assert again.train()["step"] == 4
    again.close()
