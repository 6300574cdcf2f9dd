"""Trainer: a tiny end-to-end training on CPU lowers the held-out error; schedules; logging.

The helpers here (tiny capture with a 162-vertex sphere template, tiny stage configs) are also
imported by test_resume, test_ddp and test_stages.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tempeh.config import load_config
from tempeh.engine.stages import stage_config
from tempeh.engine.trainer import Trainer, lr_factor

COARSE_MODEL = """model: {num_verts: 162, feature_channels: 4, feature_blocks: [1, 1, 1, 1],
  feature_widths: [8, 8, 8, 8], feature_stem_width: 8, feature_norm: gn, grid_side: 8,
  grid_spacing_mm: 60.0, localizer_hidden: 8, localizer_levels: 1, localizer_fc: 16,
  localizer_init_extent_mm: 300.0, localizer_max_scale: 0.9, localizer_norm: none,
  unet_levels: 2, unet_widths: [8, 8, 8], unet_back_widths: [8], unet_front_kernel: 3,
  unet_norm: gn, head_chunk_size: 162}
"""
REFINE_MODEL = """model: {feature_channels: 4, feature_blocks: [1, 1, 1, 1], feature_widths: [8, 8, 8, 8],
  feature_stem_width: 8, feature_norm: gn, grid_side: 4, grid_spacing_mm: 2.0, unet_levels: 1,
  unet_pools: 1, unet_widths: [8, 8], unet_front_width: 8, unet_front_kernel: 3,
  unet_back_widths: [8], chunk_size: 162}
"""
DATA = "data: {min_views: 2, max_views: 4, scan_points: 200, num_workers: 0}\n"



def make_capture(root, num_frames: int = 6, num_views: int = 4, seed: int = 0) -> Path:
    """A tiny capture (48x36 images, spheres of ~90 mm, gt meshes) with a 162-vertex
    template whose 12 regions are bands along y (every loss preset finds its regions)."""
    import trimesh

    from tempeh.bench.data import write_tiny_capture
    from tempeh.io.templates import save_template_dir
    from tempeh.template import REGION_NAMES, Template

    root = write_tiny_capture(root, num_frames=num_frames, num_views=num_views, width=48,
                              height=36, scan_points=400, with_gt=True, seed=seed)
    s = trimesh.creation.icosphere(subdivisions=2, radius=90.0)
    v = np.asarray(s.vertices)
    bands = np.array_split(np.argsort(v[:, 1]), len(REGION_NAMES))
    regions = {n: np.sort(b) for n, b in zip(REGION_NAMES, bands)}
    save_template_dir(Path(root) / "template",
                      Template(v, np.asarray(s.faces), regions, "tiny_sphere"), units="m")
    return Path(root)


def write_configs(cfg_dir, pre_iters: int = 4, coarse_iters: int = 4, refine_iters: int = 3) -> Path:
    """Tiny ``coarse_pretrain.yaml``, ``coarse.yaml``, ``refine.yaml`` in ``cfg_dir``."""
    d = Path(cfg_dir)
    d.mkdir(parents=True, exist_ok=True)
    run = ("run: {{stage: {st}, iterations: {it}, batch_size: 2, log_interval: 2, val_interval: {it},"
           " checkpoint_interval: 2, keep_last_k: 2, device: cpu}}\n")
    (d / "coarse_pretrain.yaml").write_text(
        run.format(st="coarse", it=pre_iters) + DATA
        + "loss: {w_v2v: 1.0, v2v_weights: all, w_s2m: 0.0, w_edge: 0.0}\n"
        + "optim: {lr: 0.01, grad_clip: 10.0}\n" + COARSE_MODEL)
    (d / "coarse.yaml").write_text(
        "inherit: coarse_pretrain.yaml\n"
        + f"run: {{iterations: {coarse_iters}, val_interval: {coarse_iters}}}\n"
        + "loss: {v2v_weights: eyeballs, w_s2m: 10.0, w_edge: 1.0, edge_weights: coarse}\n")
    (d / "refine.yaml").write_text(
        run.format(st="refine", it=refine_iters) + DATA
        + "loss: {w_v2v: 1.0, v2v_weights: eyeballs, w_s2m: 10.0, w_edge: 0.3, edge_weights: refine}\n"
        + REFINE_MODEL)
    return d


def tiny_config(capture, cfg_dir, run_dir, stage: str = "coarse_pretrain", overrides=()):
    """Resolved config of a stage of the tiny pipeline (``data.root`` = ``capture``)."""
    return stage_config(stage, Path(cfg_dir) / f"{stage}.yaml", run_dir,
                        [f"data.root={capture}"] + list(overrides))


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return make_capture(tmp_path_factory.mktemp("cap"))


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory):
    return write_configs(tmp_path_factory.mktemp("cfg"))


def test_tiny_training_lowers_heldout_error(capture, cfg_dir, tmp_path):
    """40 steps of coarse pretraining on 5 frames: the held-out frame's vertex error to the
    registration and to the true mesh, and its scan->mesh distance, drop by a clear margin."""
    cfg = tiny_config(capture, cfg_dir, tmp_path, overrides=[
        "run.iterations=40", "run.log_interval=10", "run.val_interval=20",
        "run.checkpoint_interval=20", "optim.lr=0.02"])
    tr = Trainer(cfg, tmp_path / "coarse_pretrain")
    before = tr.validate(log=False)
    res = tr.train()
    after = res["val"]
    tr.close()
    assert res["step"] == 40 and not res["interrupted"]
    assert after["frames"] == before["frames"] == 1
    # measured: vertex errors 89.3 -> 70.1 mm, scan->mesh median 83.4 -> 75.6 mm
    assert after["reg_v2v_mean_mm"] < before["reg_v2v_mean_mm"] - 12.0, (before, after)
    assert after["gt_v2v_mean_mm"] < before["gt_v2v_mean_mm"] - 12.0, (before, after)
    assert after["s2m_median_mm"] < before["s2m_median_mm"] - 4.0, (before, after)

    sdir = tmp_path / "coarse_pretrain"
    # resolved config, template, checkpoints, TensorBoard, metrics
    assert load_config(sdir / "config.yaml") == cfg
    assert (sdir / "template" / "template.ply").is_file()
    assert sorted(p.name for p in (sdir / "checkpoints").iterdir()) == \
        ["last.pt", "step_00000020.pt", "step_00000040.pt"]
    assert any((sdir / "logs").glob("events.out.tfevents.*"))
    recs = [json.loads(x) for x in (sdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert [r["step"] for r in val] == [20, 40]
    for k in ("loss", "loss_v2v", "s2m_mm", "lr", "it_per_s", "samples_per_s", "grad_norm"):
        assert np.isfinite(train[-1][k]), k
    assert val[-1]["reg_v2v_mean_mm"] == pytest.approx(after["reg_v2v_mean_mm"])
    # stopping exactly at run.iterations (no overshoot to the epoch end): 5 frames / batch 2
    # = 2 batches per epoch, 40 steps = 20 epochs exactly; the data position matches
    assert tr.batches_seen == 40


def test_lr_schedules(capture, cfg_dir, tmp_path):
    cfg = tiny_config(capture, cfg_dir, tmp_path, overrides=["run.iterations=100"])
    assert [lr_factor(s, cfg) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    cfg.optim.schedule = "step"
    assert [lr_factor(s, cfg) for s in (0, 19, 20, 40, 79, 80)] == [1, 1, 0.5, 0.25, 0.125, 0.0625]
    cfg.optim.schedule = "cosine"
    cfg.optim.warmup_iterations = 10
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)


def test_two_param_groups_and_amp_off_on_cpu(capture, cfg_dir, tmp_path, caplog):
    cfg = tiny_config(capture, cfg_dir, tmp_path, overrides=[
        "optim.amp=true", "optim.lr=0.002", "optim.localizer_lr=0.0003", "run.val_interval=0"])
    with caplog.at_level("WARNING"):
        tr = Trainer(cfg, tmp_path / "s")
    assert "mixed precision is CUDA only" in caplog.text
    assert not tr.amp and not tr.scaler.is_enabled()
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert groups["base"]["lr"] == 0.002 and groups["localizer"]["lr"] == 0.0003
    loc = {id(p) for p in tr.model.localizer.parameters()}
    assert {id(p) for p in groups["localizer"]["params"]} == loc
    assert not loc & {id(p) for p in groups["base"]["params"]}
    tr.close()


def test_projection_image():
    from tempeh.bench.data import tiny_rig
    from tempeh.engine.logging import projection_image

    cams = tiny_rig(3, 40, 30)
    img = projection_image(torch.zeros(3, 1, 30, 40), cams, torch.zeros(1, 3),
                           torch.tensor([[1000.0, 0.0, 0.0]]))
    assert img.shape == (30, 120, 3) and img.dtype == np.uint8
    # the origin projects to the principal point (cx, cy) = (19.5, 14.5) in green
    assert tuple(img[14:16, 19:21].reshape(-1, 3).max(0)) == (0, 255, 0)


def test_localizer_box_loss_is_v2v_of_the_posed_template(capture, cfg_dir, tmp_path):
    """loss.w_box trains the localizer on the v2v error of the template it poses; it needs the
    template prior."""
    from tempeh.errors import ConfigError
    from tempeh.losses import v2v_loss

    with pytest.raises(ConfigError, match="loss.w_box"):
        Trainer(tiny_config(capture, cfg_dir, tmp_path, overrides=["loss.w_box=1.0"]), tmp_path / "a")
    cfg = tiny_config(capture, cfg_dir, tmp_path, overrides=[
        "loss.w_box=0.5", "model.template_prior_sigma_mm=40", "model.random_grid_rotation=false",
        "run.val_interval=0", "run.iterations=2"])
    tr = Trainer(cfg, tmp_path / "b")
    batch = next(iter(tr.loader))
    tr.model.eval()  # deterministic forward to compare with the model's own output
    pred, posed = tr._forward(batch, train=False)
    out = tr.model(batch.images, batch.cameras)
    torch.testing.assert_close(pred, out.verts)
    torch.testing.assert_close(posed, out.template_posed)
    terms = tr.loss_terms(pred, batch, posed)
    torch.testing.assert_close(terms["loss_box"], v2v_loss(out.template_posed, batch.registration))
    with pytest.raises(ValueError, match="posed template"):  # never skipped silently
        tr.loss_terms(pred, batch, None)
    # the posed template is the template moved by the localizer's box (identity rotation at init)
    tv = torch.as_tensor(tr.template.verts, dtype=torch.float32)
    centre = 0.5 * (tv.min(0).values + tv.max(0).values)
    s = out.localizer.scale[0] / tr.model.localizer.init_scale
    expect = (tv - centre) * s + out.localizer.translation[0] + torch.tensor(cfg.model.grid_center_mm)
    torch.testing.assert_close(posed[0], expect, atol=1e-3, rtol=1e-4)
    stats = tr._train_step(batch)
    assert float(stats["loss_box"]) > 0 and "loss_box" in tr.loss_weights
    tr.close()


def test_box_jitter_gets_the_registrations_from_the_trainer(capture, cfg_dir, tmp_path):
    """With model.box_jitter_prob = 1 the training forward puts the grid in the template's box on
    each frame's registration: the trainer's forward equals the model's with pose_target given, and
    differs from the model's without it (the localizer's box)."""
    from tempeh.errors import ConfigError

    ov = ["model.template_prior_sigma_mm=40", "model.random_grid_rotation=false",
          "model.box_jitter_prob=1.0", "run.val_interval=0", "run.iterations=2"]
    with pytest.raises(ConfigError, match="loss.w_box > 0"):  # the localizer would get no gradient
        tiny_config(capture, cfg_dir, tmp_path, overrides=ov)
    cfg = tiny_config(capture, cfg_dir, tmp_path, overrides=ov + ["loss.w_box=0.5"])
    tr = Trainer(cfg, tmp_path / "b")
    batch = next(iter(tr.loader)).to(tr.device)
    tr.model.train()
    state = tr.generator.get_state()
    with torch.no_grad():
        pred, _ = tr._forward(batch, train=True)
        tr.generator.set_state(state)
        given = tr.model(batch.images, batch.cameras, generator=tr.generator,
                         pose_target=batch.registration).verts
        tr.generator.set_state(state)
        without = tr.model(batch.images, batch.cameras, generator=tr.generator).verts
    torch.testing.assert_close(pred, given)
    assert float((pred - without).abs().max()) > 1.0
    tr.close()
