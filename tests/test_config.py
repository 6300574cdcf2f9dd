"""Typed configs: shipped files load and build models; errors name the key; round trips."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tempeh.config import (TrainConfig, config_hash, config_to_dict,
                           load_config, resolve_edge_weights, resolve_vertex_weights, save_config,
                           validate_config)
from tempeh.errors import ConfigError
from tempeh.geometry.regions import COARSE_EDGE_WEIGHTS, EYEBALLS_ONLY_VERTEX_WEIGHTS
from tempeh.models.coarse import CoarseConfig, CoarseModel
from tempeh.models.refine import RefineConfig, RefineModel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))  # incl. configs/demo_cpu/


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"base.yaml", "coarse_pretrain.yaml", "coarse.yaml", "refine.yaml", "paper.yaml",
            "demo_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_loads_and_validates(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    want = {"coarse": CoarseConfig, "refine": RefineConfig}[cfg.run.stage]
    assert type(cfg.model) is want
    validate_config(cfg)
    # round trip through the resolved file
    out = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_stage_settings_match_the_paper():
    pre = load_config(REPO / "configs/coarse_pretrain.yaml")
    assert (pre.run.iterations, pre.loss.v2v_weights, pre.loss.w_s2m, pre.loss.w_edge) == (300000, "all", 0, 0)
    co = load_config(REPO / "configs/coarse.yaml")
    assert co.run.iterations == 500000 and co.run.init_from == "runs/coarse_pretrain"
    assert resolve_vertex_weights(co.loss.v2v_weights) == EYEBALLS_ONLY_VERTEX_WEIGHTS
    assert (co.loss.w_s2m, co.loss.s2m_sigma_mm, co.loss.w_edge) == (10.0, 10.0, 1.0)
    assert resolve_edge_weights(co.loss.edge_weights) == COARSE_EDGE_WEIGHTS
    ref = load_config(REPO / "configs/refine.yaml")
    assert ref.run.stage == "refine" and ref.run.iterations == 150000
    assert (ref.loss.w_s2m, ref.loss.w_edge, ref.data.scan_points) == (10.0, 0.3, 15000)
    assert resolve_edge_weights(ref.loss.edge_weights)["lips"] == 10.0
    paper = load_config(REPO / "configs/paper.yaml")
    m = paper.model
    assert (m.num_verts, m.grid_side, m.grid_spacing_mm, m.feature_blocks) == (5023, 32, 25.0, (3, 4, 6, 3))
    assert (paper.run.batch_size, paper.data.max_views, paper.optim.lr, paper.optim.localizer_lr) == (2, 16, 1e-3, 1e-4)


def test_unknown_key_names_key_and_file(tmp_path):
    f = write(tmp_path / "a.yaml", "run:\n  iterations: 10\ndata:\n  augment:\n    scale_rnage: [1, 1]\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "data.augment.scale_rnage" in str(e.value) and str(f) in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key 'bogus'.*a2\.yaml"):
        load_config(write(tmp_path / "a2.yaml", "bogus: 1\n"))
    # a coarse-only model key under a refine stage
    with pytest.raises(ConfigError, match=r"model\.localizer_hidden"):
        load_config(None, ["run.stage=refine", "model.localizer_hidden=4"])


@pytest.mark.parametrize("text,key", [
    ("run:\n  iterations: ten\n", "run.iterations"),
    ("run:\n  iterations: 1.5\n", "run.iterations"),
    ("run:\n  batch_size: true\n", "run.batch_size"),
    ("data:\n  skip_bad_frames: 1\n", "data.skip_bad_frames"),
    ("data:\n  augment:\n    scale_range: [0.9]\n", "data.augment.scale_range"),
    ("data:\n  scan_points: null\n", "data.scan_points"),
    ("run:\n  stage: middle\n", "run.stage"),
    ("optim:\n  schedule: linear\n", "optim.schedule"),
    ("model:\n  feature_widths: [8, x]\n", "model.feature_widths"),
    ("loss:\n  v2v_weights: [1, 2]\n", "loss.v2v_weights"),
    ("loss:\n  v2v_weights: {eyebals: 1}\n", "loss.v2v_weights"),
    ("loss:\n  edge_weights: fancy\n", "loss.edge_weights"),
    ("data: 3\n", "data"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert msg.startswith(key + ":") or f"'{key}" in msg or f" {key}" in msg, msg
    assert str(f) in msg


def test_types_are_coerced(tmp_path):
    f = write(tmp_path / "c.yaml", "optim:\n  lr: 1e-4\n  grad_clip: 5\n"
                                    "data:\n  max_views: null\n  cameras: [a, b, c, d, e, f, g, h]\n"
                                    "  augment:\n    scale_range: [1, 1.2]\n"
                                    "model:\n  unet_widths: [8, 16, 16]\n")
    cfg = load_config(f)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # PyYAML reads 1e-4 as str
    assert cfg.optim.grad_clip == 5.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.data.max_views is None
    assert cfg.data.augment.scale_range == (1.0, 1.2)
    assert cfg.model.unet_widths == (8, 16, 16)
    assert cfg.data.cameras == list("abcdefgh")


def test_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", "run:\n  iterations: 10\n  name: x\n")
    cfg = load_config(base, ["run.iterations=20", "optim.lr=3e-4", "data.max_views=null",
                             "data.augment.brightness_sigma=0", "model.grid_side=4",
                             "loss.v2v_weights={eyeballs: 2.0}", "run.device=cpu",
                             "data.augment.enabled=false", "data.root=some/dir"])
    assert cfg.run.iterations == 20 and cfg.run.name == "x"
    assert cfg.optim.lr == 3e-4 and cfg.data.max_views is None
    assert cfg.data.augment.brightness_sigma == 0.0 and cfg.data.augment.enabled is False
    assert cfg.model.grid_side == 4 and cfg.data.root == "some/dir"
    assert resolve_vertex_weights(cfg.loss.v2v_weights)["eyeballs"] == 2.0
    assert resolve_vertex_weights(cfg.loss.v2v_weights)["face"] == 0.0
    # later overrides win; stage switch selects the model class
    assert load_config(None, ["run.iterations=1", "run.iterations=2"]).run.iterations == 2
    assert type(load_config(None, ["run.stage=refine"]).model) is RefineConfig
    assert load_config(None, ["loss.v2v_kind=dist"]).loss.v2v_kind == "dist"
    for bad, key in (("run.iterations", "run.iterations"), ("run.nope=1", "run.nope"),
                     ("run.iterations=[1]", "run.iterations"), ("=3", "bad key"),
                     ("loss.v2v_kind=l1", "loss.v2v_kind")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(base, [bad])


def test_inherit_is_relative_and_later_wins(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "run:\n  iterations: 5\n  batch_size: 3\nloss:\n  w_s2m: 2.0\n")
    write(tmp_path / "sub" / "mid.yaml", "inherit: ../root.yaml\nrun:\n  iterations: 6\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml",
                 "inherit: mid.yaml\nloss:\n  v2v_weights: {eyeballs: 1.0}\n")
    cfg = load_config(leaf)
    assert (cfg.run.iterations, cfg.run.batch_size, cfg.loss.w_s2m) == (6, 3, 2.0)
    assert cfg.loss.v2v_weights == {"eyeballs": 1.0}
    write(tmp_path / "c1.yaml", "inherit: c2.yaml\n")
    write(tmp_path / "c2.yaml", "inherit: c1.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c1.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(write(tmp_path / "m.yaml", "inherit: missing.yaml\n"))
    with pytest.raises(ConfigError, match=r"m2\.yaml:\d+: invalid YAML"):
        load_config(write(tmp_path / "m2.yaml", "run:\n  iterations: [1\n"))


def test_defaults_file_is_empty_config():
    assert load_config(None) == TrainConfig()


def test_hash_and_save_are_resolved(tmp_path):
    a = load_config(None, ["run.iterations=7"])
    b = load_config(None, ["run.iterations=7"])
    c = load_config(None, ["run.iterations=8"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    p = save_config(a, tmp_path / "run" / "config.yaml")
    text = p.read_text()
    for key in ("scale_range", "brightness_sigma", "localizer_lr", "keep_last_k", "grid_side"):
        assert key in text  # every field written, not only the differences
    assert load_config(p) == a


def test_validate_for_training_requires_paths():
    cfg = load_config(REPO / "configs/refine.yaml")
    with pytest.raises(ConfigError, match="data.root"):
        validate_config(cfg, for_training=True)
    cfg.data.root = "cap"
    with pytest.raises(ConfigError, match="coarse_cache_dir"):
        validate_config(cfg, for_training=True)
    cfg.data.coarse_cache_dir = "runs/coarse/pred"
    validate_config(cfg, for_training=True)
    with pytest.raises(ConfigError, match="data.max_views"):
        load_config(None, ["data.min_views=9", "data.max_views=4"])
    with pytest.raises(ConfigError, match="RefineConfig.unet_norm"):
        load_config(None, ["run.stage=refine", "model.unet_norm=bn"])


# ---------------------------------------------------------------------------- models
def _shrink(cfg) -> list:
    """Overrides that shrink the size fields a config leaves at the paper defaults to the
    model's tiny() values (fields the config sets itself, e.g. in demo_cpu.yaml, are kept)."""
    cls = type(cfg.model)
    tiny, default = cls.tiny(), cls()
    out = [] if cls is RefineConfig else ["model.grid_center_mm=[0, 0, 0]"]
    for f in dataclasses.fields(cls):
        v, d = getattr(tiny, f.name), getattr(default, f.name)
        if v != d and getattr(cfg.model, f.name) == d:
            out.append(f"model.{f.name}={json.dumps(list(v) if isinstance(v, tuple) else v)}")
    return out


def _train_step(model_cfg) -> None:
    import trimesh

    from tempeh.bench.data import tiny_rig

    torch.manual_seed(0)
    B, V, W, H = 2, 2, 24, 18
    cams = tiny_rig(V, W, H, distance_mm=500.0).to(dtype=torch.float32)
    cams = type(cams).stack([cams] * B)
    images = torch.rand(B, V, 1, H, W)
    gen = torch.Generator().manual_seed(0)
    if isinstance(model_cfg, CoarseConfig):
        # a template (only used by configs with the template prior) inside the initial box
        tv = (torch.rand(model_cfg.num_verts, 3, generator=gen) - 0.5) * 100.0
        model = CoarseModel(model_cfg, tv).train()
        verts = model(images, cams, generator=gen).verts
        assert verts.shape == (B, model_cfg.num_verts, 3)
    else:
        ico = trimesh.creation.icosphere(subdivisions=1, radius=80.0)
        model = RefineModel(model_cfg, np.asarray(ico.vertices), np.asarray(ico.faces)).train()
        coarse = torch.as_tensor(np.asarray(ico.vertices), dtype=torch.float32).expand(B, -1, -1)
        verts = model(images, cams, coarse + 0.5, generator=gen).verts
        assert verts.shape == coarse.shape
    verts.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_every_config_builds_a_model_that_trains_at_tiny_size():
    """Every shipped config, shrunk by overrides, builds its stage's model; one forward and
    backward pass per distinct shrunk model config (several configs share one)."""
    done = set()
    for path in CONFIGS:
        cfg = load_config(path)
        cfg = load_config(path, _shrink(cfg))
        key = json.dumps(config_to_dict(cfg.model), sort_keys=True)
        if key not in done:
            done.add(key)
            _train_step(cfg.model)
    assert len(done) >= 3  # coarse (paper-size configs shrunk), demo_cpu, refine


def test_retired_key_in_an_old_resolved_config_warns_and_is_ignored(tmp_path, caplog):
    f = write(tmp_path / "old.yaml", "model:\n  localizer_lr_scale: 0.1\n  localizer_hidden: 4\n")
    with caplog.at_level("WARNING", logger="tempeh.config"):
        cfg = load_config(f)
    assert cfg.model.localizer_hidden == 4
    assert not hasattr(cfg.model, "localizer_lr_scale")
    assert any("localizer_lr_scale" in r.getMessage() and "old.yaml" in r.getMessage()
               for r in caplog.records)
