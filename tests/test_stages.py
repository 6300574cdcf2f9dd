"""The stage pipeline through the CLI: pretrain -> coarse -> cache_coarse -> refine, resuming
with --from, a missing coarse-cache file, config selection, and bad input data."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tempeh.cli.train import main
from tempeh.config import load_config
from tempeh.engine.stages import select_stages, split_overrides, stage_config_files
from tempeh.engine.trainer import Trainer
from tempeh.errors import ConfigError, TempehDataError
from test_trainer import capture, cfg_dir, tiny_config  # noqa: F401 (fixtures)


def _ckpt_step(stage_dir: Path) -> int:
    return torch.load(stage_dir / "checkpoints" / "last.pt", weights_only=True)["step"]


def test_pipeline_runs_every_stage_then_resumes_from_refine(capture, cfg_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), "--config", str(cfg_dir), f"data.root={capture}"]) == 0
    for s, n in (("coarse_pretrain", 4), ("coarse", 4), ("refine", 3)):
        assert _ckpt_step(run / s) == n
        cfg = load_config(run / s / "config.yaml")
        assert cfg.run.name == s and Path(cfg.run.out_dir) == run
    assert load_config(run / "coarse" / "config.yaml").run.init_from == str(run / "coarse_pretrain")
    rcfg = load_config(run / "refine" / "config.yaml")
    assert rcfg.run.init_from == str(run / "coarse")
    assert rcfg.data.coarse_cache_dir == str(run / "coarse_cache")
    assert rcfg.loss.w_edge == 0.3 and rcfg.data.scan_points == 200

    # the cache: every train + val frame, metres, equal to the coarse model's eval prediction
    from tempeh.data import CaptureDataset, collate
    from tempeh.io.mesh import read_mesh
    from tempeh.inference import load_stage_model, predict_coarse, predict_refine

    manifest = json.loads((run / "coarse_cache" / "cache.json").read_text())
    assert manifest["frames"] == 6 and manifest["checkpoint_step"] == 4
    plys = sorted((run / "coarse_cache").rglob("*.ply"))
    assert len(plys) == 6
    model, ccfg = load_stage_model(run, "coarse")
    ds = CaptureDataset(ccfg.data, ccfg.data.val_list, stage="coarse", train=False)
    verts = predict_coarse(model, collate([ds[0]]))[0].numpy()
    fid = ds.frames[0]
    path = run / "coarse_cache" / fid[0] / fid[1] / f"{fid[1]}.{fid[2]}.ply"
    cached, faces = read_mesh(path, units="m")  # -> mm
    assert cached.shape == (162, 3) and faces.shape[0] == 320
    np.testing.assert_allclose(cached, verts, atol=1e-3)  # float32 metres in the file
    assert 0.01 < np.abs(read_mesh(path, units="mm")[0]).max() < 1.0  # the file holds metres
    refine, _ = load_stage_model(run, "refine")
    rds = CaptureDataset(rcfg.data, rcfg.data.val_list, stage="refine", train=False)
    rb = collate([rds[0]])
    np.testing.assert_allclose(rb.coarse_verts[0].numpy(), cached, atol=1e-4)
    refined = predict_refine(refine, rb)
    assert refined.shape == (1, 162, 3)
    # the refinement moves each vertex by less than its local grid's reach (4 x 2 mm grid)
    assert float((refined - rb.coarse_verts).abs().max()) <= 4.0

    # a fresh refinement starts from the coarse stage's feature net (as the paper does)
    fresh = Trainer(tiny_config(capture, cfg_dir, run, stage="refine"), tmp_path / "fresh_refine")
    coarse_sd = torch.load(run / "coarse" / "checkpoints" / "last.pt", weights_only=True)["model"]
    fn = {k: v for k, v in fresh.model.state_dict().items() if k.startswith("feature_net.")}
    assert fn and all(torch.equal(v, coarse_sd[k]) for k, v in fn.items())
    fresh.close()

    # --from refine resumes the existing run: only refine trains (3 -> 5), the rest is untouched
    mtimes = {s: (run / s / "checkpoints" / "last.pt").stat().st_mtime_ns for s in ("coarse_pretrain", "coarse")}
    cache_mtime = (run / "coarse_cache" / "cache.json").stat().st_mtime_ns
    assert main(["--run-dir", str(run), "--config", str(cfg_dir), "--from", "refine",
                 f"data.root={capture}", "refine:run.iterations=5"]) == 0
    assert _ckpt_step(run / "refine") == 5
    assert {s: (run / s / "checkpoints" / "last.pt").stat().st_mtime_ns for s in mtimes} == mtimes
    assert (run / "coarse_cache" / "cache.json").stat().st_mtime_ns == cache_mtime
    val = [json.loads(x) for x in (run / "refine" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val if r["split"] == "train"] == [2, 3, 4, 5]

    # running everything again skips the complete stages and the up-to-date cache
    assert main(["--run-dir", str(run), "--config", str(cfg_dir), f"data.root={capture}",
                 "refine:run.iterations=5"]) == 0
    assert "coarse_pretrain: skipped (complete)" in capsys.readouterr().out

    # a missing coarse-cache file is an error naming it (never a fallback to the registration)
    plys[0].unlink()
    capsys.readouterr()
    assert main(["--run-dir", str(run), "--config", str(cfg_dir), "--from", "refine",
                 f"data.root={capture}", "refine:run.iterations=6"]) == 1
    err = capsys.readouterr().err
    assert str(plys[0]) in err and "cached coarse mesh" in err
    assert _ckpt_step(run / "refine") == 5


def test_stage_selection_and_config_files(tmp_path):
    assert select_stages() == ["coarse_pretrain", "coarse", "cache_coarse", "refine"]
    assert select_stages(start="cache_coarse") == ["cache_coarse", "refine"]
    assert select_stages("refine,coarse") == ["coarse", "refine"]
    with pytest.raises(ConfigError, match="unknown stage"):
        select_stages("coarse,fine")
    ov = split_overrides(["run.iterations=9", "refine:data.scan_points=5", "coarse:optim.lr=1e-4"])
    assert ov["refine"] == ["run.iterations=9", "data.scan_points=5"]
    assert ov["coarse"] == ["run.iterations=9", "optim.lr=1e-4"]
    with pytest.raises(ConfigError, match="unknown training stage"):
        split_overrides(["cache_coarse:run.iterations=1"])
    files = stage_config_files([], ["coarse_pretrain", "coarse"])
    assert files["coarse"].name == "coarse.yaml" and files["coarse"].is_file()  # repo configs/
    f = tmp_path / "mine.yaml"
    assert stage_config_files([str(f)], ["coarse"])["coarse"] == f
    assert stage_config_files([f"refine={f}"], list(select_stages()))["refine"] == f
    with pytest.raises(ConfigError, match="exactly one training stage"):
        stage_config_files([str(f)], ["coarse_pretrain", "coarse"])


def test_wrong_config_for_a_stage_and_bad_arguments(capture, cfg_dir, tmp_path, capsys):  # noqa: F811
    # the refine file given to a coarse stage
    assert main(["--run-dir", str(tmp_path / "r"), "--stages", "coarse",
                 "--config", str(cfg_dir / "refine.yaml"), f"data.root={capture}"]) == 1
    assert "run.stage" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path / "r"), "--config", str(cfg_dir), "--stages", "coarse",
                 f"data.root={capture}", "run.iterationz=3"]) == 1
    assert "run.iterationz" in capsys.readouterr().err
    # coarse needs the pretraining's weights
    assert main(["--run-dir", str(tmp_path / "r"), "--config", str(cfg_dir), "--stages", "coarse",
                 f"data.root={capture}"]) == 1
    assert "coarse_pretrain" in capsys.readouterr().err
    assert main(["--stages", "coarse"]) == 2  # no --run-dir


@pytest.fixture
def bad_capture(capture, tmp_path):  # noqa: F811
    return Path(shutil.copytree(capture, tmp_path / "bad"))


def test_missing_scan_is_named_before_training(bad_capture, cfg_dir, tmp_path, capsys):  # noqa: F811
    scan = bad_capture / "scans" / "subj1" / "seqA" / "seqA.000002.npy"
    scan.unlink()
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), "--config", str(cfg_dir), "--stages", "coarse_pretrain",
                 f"data.root={bad_capture}"]) == 1
    err = capsys.readouterr().err
    assert "seqA.000002" in err and "scan" in err
    assert not (run / "coarse_pretrain" / "checkpoints").exists()


def test_bad_frames_are_named_or_skipped(bad_capture, cfg_dir, tmp_path):  # noqa: F811
    root = bad_capture
    reg = root / "registrations" / "subj1" / "seqA" / "seqA.000001.ply"
    reg.unlink()
    with pytest.raises(TempehDataError, match=str(reg)):
        Trainer(tiny_config(root, cfg_dir, tmp_path), tmp_path / "a")

    # a data list naming frames that do not exist
    (root / "data_lists" / "ghost.json").write_text(json.dumps([["subj1", "seqA", "000099"]]))
    with pytest.raises(TempehDataError, match="000099"):
        Trainer(tiny_config(root, cfg_dir, tmp_path, overrides=["data.train_list=data_lists/ghost.json"]),
                tmp_path / "b")

    # an image that is not a PNG at all
    img = sorted((root / "images" / "subj1" / "seqA" / "000003").glob("*.png"))[0]
    img.write_bytes(b"this is not an image")
    (root / "data_lists" / "some.json").write_text(json.dumps([["subj1", "seqA", "000003"]]))
    with pytest.raises(TempehDataError, match=str(img)):
        Trainer(tiny_config(root, cfg_dir, tmp_path, overrides=["data.train_list=data_lists/some.json"]),
                tmp_path / "c")

    # with data.skip_bad_frames: frames 1 (no registration) and 3 (bad PNG) are dropped up front;
    # frame 4's image only fails when decoded: its batch (batch size 1) is skipped and counted
    late = sorted((root / "images" / "subj1" / "seqA" / "000004").glob("*.png"))[0]
    b = bytearray(late.read_bytes())
    for i in range(60, len(b) - 20):
        b[i] ^= 0x5A  # header and end intact, compressed data garbage
    late.write_bytes(bytes(b))
    cfg = tiny_config(root, cfg_dir, tmp_path, overrides=[
        "data.skip_bad_frames=true", "run.batch_size=1", "run.iterations=6", "run.val_interval=0"])
    tr = Trainer(cfg, tmp_path / "d")
    assert len(tr.train_set) == 3 and len(tr.train_set.skipped) == 2  # frames 0, 2, 4 remain
    res = tr.train()
    tr.close()
    assert res["step"] == 6 and res["skipped_batches"] >= 1 and res["skipped_frames"] == 2
    assert tr.batches_seen == res["step"] + res["skipped_batches"]
