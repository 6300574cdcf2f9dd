"""The demo orchestration (tools/demo.py, tempeh.cli.demo) at a tiny scale: every phase runs and
writes its outputs into the one folder; a rerun reuses the data and the trained stages; a changed
refinement setting retrains the refinement only; bad arguments exit with 2."""
import json
from pathlib import Path

import torch

from tempeh.cli.demo import main
from tempeh.config import load_config
from tempeh.engine.stages import default_config_dir

TINY = ["--subjects", "3", "--sequences-per-subject", "1", "--frames-per-sequence", "2",
        "--views", "4", "--image-downsample", "16", "--scan-points", "1500",
        "--iterations-scale", "0.004", "--overlays", "1", "--workers", "1", "-q"]


def _step(stage_dir: Path) -> int:
    return torch.load(stage_dir / "checkpoints" / "last.pt", weights_only=True)["step"]


def test_demo_configs_resolve_and_chain():
    cdir = default_config_dir() / "demo_cpu"
    pre, coarse, refine = (load_config(cdir / f"{s}.yaml") for s in ("coarse_pretrain", "coarse", "refine"))
    assert pre.run.stage == coarse.run.stage == "coarse" and refine.run.stage == "refine"
    assert pre.loss.w_s2m == 0 and pre.loss.v2v_weights == "all"
    # phase 2 keeps v2v on all vertices (the synthetic registrations are exact), so no edge term
    assert coarse.loss.w_s2m == 10.0 and coarse.loss.v2v_weights == "all" and coarse.loss.w_edge == 0.0
    # both coarse phases use the template prior and the localizer loss, without grid rotation
    for c in (pre, coarse):
        assert c.model.template_prior_sigma_mm > 0 and c.loss.w_box > 0
        assert not c.model.random_grid_rotation
    assert refine.loss.w_s2m == 10.0 and refine.loss.v2v_weights == "all" and refine.loss.w_edge == 0.0
    # the refinement's feature net is initialised from the coarse one: same shapes
    for k in ("feature_channels", "feature_blocks", "feature_widths", "feature_stem_width"):
        assert getattr(coarse.model, k) == getattr(refine.model, k)
    assert pre.model.num_verts == 1292 and pre.run.device == "cpu"


def test_demo_end_to_end_then_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out)] + TINY) == 0
    printed = capsys.readouterr().out
    assert "| region |" in printed and "| face |" in printed and "v2v to gt" in printed
    s = json.loads((out / "summary.json").read_text())
    assert set(s["phases"]) == {"data", "train", "register", "evaluate", "visualize"}
    assert not any(t["reused"] for t in s["phases"].values())
    assert all(t["wall_s"] >= 0 and t["cpu_s"] >= 0 for t in s["phases"].values())
    assert s["headline"]["scan_to_mesh_median_mm"] > 0 and s["headline"]["v2v_gt_median_mm"] > 0
    assert (out / "eval" / "metrics.json").is_file() and (out / "eval" / "cumulative_error.png").is_file()
    assert list((out / "eval").rglob("*.ply")), "heat-map PLYs"
    assert len(list((out / "overlays").glob("*.png"))) == 2  # overlay grid + turntable
    test_frames = json.loads((out / "data" / "data_lists" / "test.json").read_text())
    train_subjects = {f[0] for f in json.loads((out / "data" / "data_lists" / "train.json").read_text())}
    assert not train_subjects & {f[0] for f in test_frames}  # held-out subjects
    assert len(list((out / "pred").rglob("*.ply"))) == len(test_frames)
    steps = {st: _step(out / "run" / st) for st in ("coarse_pretrain", "coarse", "refine")}
    ck = out / "run" / "coarse" / "checkpoints" / "last.pt"
    mtime = ck.stat().st_mtime_ns

    # a rerun with the same inputs reuses the data, the training and the registration
    assert main(["--out", str(out)] + TINY) == 0
    s2 = json.loads((out / "summary.json").read_text())
    assert all(s2["phases"][p]["reused"] for p in ("data", "train", "register", "evaluate"))
    assert "| region |" in capsys.readouterr().out

    # a changed refinement setting retrains the refinement only, also after an interruption
    # (no stamps of the training phase): completed stages with unchanged configs are kept
    stamps = json.loads((out / "stamps.json").read_text())
    (out / "stamps.json").write_text(json.dumps({k: v for k, v in stamps.items()
                                                 if not k.startswith("train:")}))
    assert main(["--out", str(out)] + TINY + ["--set", "refine:optim.lr=0.002"]) == 0
    s3 = json.loads((out / "summary.json").read_text())
    assert s3["phases"]["data"]["reused"] and not s3["phases"]["train"]["reused"]
    assert not s3["phases"]["register"]["reused"]
    assert ck.stat().st_mtime_ns == mtime
    assert _step(out / "run" / "refine") == steps["refine"]
    assert load_config(out / "run" / "refine" / "config.yaml").optim.lr == 0.002


def test_demo_bad_arguments(tmp_path):
    assert main(["--out", str(tmp_path / "x"), "--subjects", "2"]) == 2
    assert main(["--out", str(tmp_path / "x"), "--iterations-scale", "0"]) == 2
