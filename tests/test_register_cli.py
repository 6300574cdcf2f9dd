"""tools/register_sequence.py end to end on a tiny capture with a randomly initialised tiny run:
outputs and manifest, resume after an interruption, bad frames, shards + merge, smoothing."""
import json
import shutil

import numpy as np
import pytest

from tempeh.cli.register_sequence import main
from tempeh.io.layout import CaptureLayout, FrameId
from tempeh.io.mesh import read_mesh
from tempeh.register import mesh_path, sequence_npz_path

FRAMES = 4
SEQS = ("seqA", "seqB")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tempeh.bench.register import tiny_register_setup

    return tiny_register_setup(tmp_path_factory.mktemp("reg"), num_frames=FRAMES, num_views=2,
                               sequences=SEQS)


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    """One uninterrupted run of every frame (the reference for the other tests)."""
    cap, run, _ = setup
    out = tmp_path_factory.mktemp("full") / "out"
    code = main(["--model", str(run), "--data", str(cap), "--all", "--out", str(out),
                 "--workers", "0", "--batch-size", "2", "-q"])
    return code, out


def _all_frames():
    return [FrameId("subj1", q, f"{i:06d}") for q in SEQS for i in range(FRAMES)]


def _args(cap, run, out, *extra):
    return ["--model", str(run), "--data", str(cap), "--all", "--out", str(out), "--workers", "0",
            "-q", *extra]


def test_full_run_writes_meshes_npz_and_manifest(setup, full_run, capsys, tmp_path):
    cap, run, template = setup
    code, out = full_run
    assert code == 0
    for fid in _all_frames():
        v, f = read_mesh(mesh_path(out, fid), units="m")
        assert v.shape == (template.num_verts, 3) and np.array_equal(f, template.faces)
        assert np.all(np.isfinite(v))
    with np.load(sequence_npz_path(out, "subj1", "seqA")) as z:
        assert z["verts"].shape == (FRAMES, template.num_verts, 3)
        assert list(z["frames"]) == [f"{i:06d}" for i in range(FRAMES)] and str(z["units"]) == "m"
        v0, _ = read_mesh(mesh_path(out, _all_frames()[0]), units="m")
        assert np.allclose(z["verts"][0] * 1000.0, v0, atol=1e-3)
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["summary"]["ok"] == len(_all_frames())
    assert set(man["model"]["stages"]) == {"coarse", "refine"}
    assert all(len(s["config_hash"]) == 16 for s in man["model"]["stages"].values())
    assert man["device"] == "cpu" and man["tempeh_version"] and man["units"] == "m"
    assert all(r["status"] == "ok" and r["predict_s"] >= 0 for r in man["frames"])
    assert man["sequences"]["subj1/seqA"]["jitter_mm"] > 0

    # the outputs are what tools/evaluate.py scores
    from tempeh.cli.evaluate import main as evaluate_main

    assert evaluate_main(["--pred", str(out), "--data", str(cap), "--list",
                          str(cap / "data_lists" / "all.json"), "--out", str(tmp_path / "ev"),
                          "--heatmaps", "0"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["counts"]["frames_evaluated"] == 8

    # a finished job rerun does nothing and says so
    capsys.readouterr()
    assert main(_args(cap, run, out)) == 0
    assert "0 registered" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_result(setup, full_run, tmp_path):
    cap, run, template = setup
    _, ref = full_run
    out = tmp_path / "out"
    assert main(_args(cap, run, out, "--max-frames", "3", "--batch-size", "2")) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["summary"]["ok"] == 3 and man["summary"]["pending"] == 5 and not man["complete"]
    assert not sequence_npz_path(out, "subj1", "seqA").exists()  # sequence not complete yet
    # a damaged output (truncated by hand) and a stray temporary file of a killed write
    written = [mesh_path(out, f) for f in _all_frames() if mesh_path(out, f).exists()]
    assert len(written) == 3
    data = written[1].read_bytes()
    written[1].write_bytes(data[: len(data) // 2])
    (written[0].parent / f".{written[0].name}.abc.tmp").write_bytes(b"partial")
    assert main(_args(cap, run, out, "--batch-size", "2")) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["summary"]["done"] == 2 and man["summary"]["ok"] == 6
    for fid in _all_frames():  # every output loads and equals the uninterrupted run
        v, _ = read_mesh(mesh_path(out, fid), units="m")
        r, _ = read_mesh(mesh_path(ref, fid), units="m")
        assert np.allclose(v, r, atol=1e-3)
    with np.load(sequence_npz_path(out, "subj1", "seqB")) as z:
        assert z["verts"].shape[0] == FRAMES


def test_broken_frames_are_reported_and_skipped(setup, tmp_path, capsys):
    cap0, run, _ = setup
    cap = tmp_path / "cap"
    shutil.copytree(cap0, cap)
    L = CaptureLayout(cap)
    bad_png = L.image_path(("subj1", "seqA", "000001"), "23_A")
    bad_png.write_bytes(bad_png.read_bytes()[:60])  # truncated PNG
    missing = L.image_path(("subj1", "seqA", "000002"), "23_B")
    missing.unlink()  # a missing view
    calib = L.calibration_dir("subj1", "seqB") / "cameras.json"
    calib.write_text("{ not json")  # unreadable calibration: the whole sequence
    out = tmp_path / "out"
    code = main(_args(cap, run, out))
    text = capsys.readouterr().out
    assert code == 1
    assert "2 registered" in text and "6 failed" in text
    assert str(bad_png) in text and str(missing) in text and str(calib) in text
    for fid in _all_frames():
        ok = fid.sequence == "seqA" and fid.frame in ("000000", "000003")
        assert mesh_path(out, fid).exists() == ok
    man = json.loads((out / "manifest.json").read_text())
    st = {r["frame"]: r for r in man["frames"]}
    assert st["subj1/seqA/000001"]["status"] == "failed" and "PNG" in st["subj1/seqA/000001"]["error"]
    assert man["summary"]["failed"] == 6
    with np.load(sequence_npz_path(out, "subj1", "seqA")) as z:  # the good frames of seqA
        assert list(z["frames"]) == ["000000", "000003"]
        assert sorted(z["failed_frames"]) == ["000001", "000002"]


def test_shards_then_merge_with_smoothing(setup, full_run, tmp_path, capsys):
    cap, run, template = setup
    _, ref = full_run
    out = tmp_path / "out"
    n = 3
    for i in range(n):
        assert main(_args(cap, run, out, "--shard", f"{i}/{n}", "--smooth", "1.0")) == 0
    seen = []
    for i in range(n):
        man = json.loads((out / f"manifest.shard-{i}-of-{n}.json").read_text())
        seen += [r["frame"] for r in man["frames"]]
        assert man["shard"] == [i, n]
    assert sorted(seen) == sorted(str(f) for f in _all_frames()) and len(seen) == len(set(seen))
    assert not (out / "manifest.json").exists()
    capsys.readouterr()
    assert main(["--merge", "--out", str(out)]) == 0
    assert "jitter" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["smoothing"]["sigma_frames"] == 1.0
    for q in SEQS:
        rec = man["sequences"][f"subj1/{q}"]
        assert rec["jitter_smoothed_mm"] < rec["jitter_mm"]
        with np.load(sequence_npz_path(out, "subj1", q)) as z:
            assert z["verts"].shape == z["verts_smoothed"].shape == (FRAMES, template.num_verts, 3)
    for fid in _all_frames():  # same meshes as the single-job run; smoothed tree complete
        v, _ = read_mesh(mesh_path(out, fid), units="m")
        r, _ = read_mesh(mesh_path(ref, fid), units="m")
        assert np.allclose(v, r, atol=1e-3)
        assert mesh_path(out / "smoothed", fid).exists()


def test_arguments_units_and_stages(setup, full_run, tmp_path, capsys):
    cap, run, template = setup
    _, out = full_run
    assert main(_args(cap, run, tmp_path / "o", "--shard", "3/3")) == 2
    assert main(["--model", str(run), "--out", str(tmp_path / "o")]) == 2
    # another unit into the same folder is refused (the skipped frames would be in metres)
    assert main(_args(cap, run, out, "--units", "mm")) == 1
    assert "--overwrite" in capsys.readouterr().out
    # a run without a refinement stage: an error with a hint, or --coarse-only
    run2 = tmp_path / "run2"
    shutil.copytree(run / "coarse", run2 / "coarse")
    assert main(["--model", str(run2), "--data", str(cap), "--sequence", "subj1/seqB", "--out",
                 str(tmp_path / "o2"), "-q"]) == 1
    assert "--coarse-only" in capsys.readouterr().out
    o3 = tmp_path / "o3"
    assert main(["--model", str(run2), "--data", str(cap), "--sequence", "subj1/seqB", "--out",
                 str(o3), "--coarse-only", "--units", "mm", "--format", "obj", "--workers", "1",
                 "-q"]) == 0
    v, _ = read_mesh(mesh_path(o3, FrameId("subj1", "seqB", "000000"), "obj"), units="mm")
    assert v.shape == (template.num_verts, 3)
    assert not mesh_path(o3, FrameId("subj1", "seqA", "000000"), "obj").exists()


def test_stop_request_leaves_a_resumable_record(setup, tmp_path):
    """A scheduler's SIGTERM sets should_stop: the loop ends after the current batch, the
    manifest lists the rest as pending, and a rerun completes."""
    import torch as _torch

    from tempeh.io.layout import CaptureLayout as _L
    from tempeh.register import RegisterOptions, load_models, plan_frames, register

    cap, run, _ = setup
    models = load_models(run, _torch.device("cpu"))
    frames = plan_frames(_L(cap), all_frames=True)
    out = tmp_path / "out"
    res = register(cap, frames, out, models, _torch.device("cpu"), RegisterOptions(),
                   should_stop=lambda: True, progress=False)
    assert res.interrupted and res.ok == 1 and res.pending == len(frames) - 1
    man = json.loads((out / "manifest.json").read_text())
    assert man["summary"]["pending"] == len(frames) - 1 and not man["complete"]
    res = register(cap, frames, out, models, _torch.device("cpu"), RegisterOptions(), progress=False)
    assert not res.interrupted and res.ok == len(frames) - 1 and res.done_before == 1


def test_list_with_a_frame_that_does_not_exist(setup, tmp_path, capsys):
    from tempeh.io.layout import write_data_list

    cap, run, _ = setup
    lst = write_data_list(tmp_path / "list.json", [("subj1", "seqA", "000003"),
                                                   ("subj1", "seqA", "000099")])
    out = tmp_path / "out"
    assert main(["--model", str(run), "--data", str(cap), "--list", str(lst), "--out", str(out),
                 "--workers", "0", "-q"]) == 1
    text = capsys.readouterr().out
    assert "1 registered" in text and "FAILED subj1/seqA/000099" in text and "no images" in text
    assert mesh_path(out, FrameId("subj1", "seqA", "000003")).exists()


def test_rebox_override_equals_the_trained_setting(setup, tmp_path, capsys):
    """``--rebox K`` registers with K re-box passes: the meshes equal those of a run trained with
    ``model.rebox_iterations: K`` (same weights), differ from the run's own setting (0 here), and
    the manifest names the override. A coarse stage without the template prior refuses K > 0."""
    from tempeh.bench.register import tiny_configs, write_random_run

    cap, run, template = setup
    assert main(_args(cap, run, tmp_path / "bad", "--rebox", "-1")) == 2
    assert main(_args(cap, run, tmp_path / "bad", "--coarse-only", "--rebox", "2")) == 1
    assert "template_prior_sigma_mm" in capsys.readouterr().out

    def prior_run(name, rebox):
        cfg = tiny_configs(template.num_verts)["coarse"]
        cfg["model"].update(template_prior_sigma_mm=40.0, rebox_iterations=rebox)
        return write_random_run(tmp_path / name, template, {"coarse": cfg}, seed=3)

    run0, run2 = prior_run("run0", 0), prior_run("run2", 2)
    seq = ["--sequence", "subj1/seqA", "--coarse-only"]
    outs = {}
    for key, r, extra in (("override", run0, ["--rebox", "2"]), ("trained", run2, []),
                          ("none", run0, [])):
        outs[key] = tmp_path / f"o_{key}"
        assert main(["--model", str(r), "--data", str(cap), "--out", str(outs[key]),
                     "--workers", "0", "-q", *seq, *extra]) == 0
    for i in range(FRAMES):
        fid = FrameId("subj1", "seqA", f"{i:06d}")
        v_over, _ = read_mesh(mesh_path(outs["override"], fid), units="m")
        v_trained, _ = read_mesh(mesh_path(outs["trained"], fid), units="m")
        v_none, _ = read_mesh(mesh_path(outs["none"], fid), units="m")
        assert np.allclose(v_over, v_trained, atol=1e-4)  # mm
        assert np.abs(v_over - v_none).max() > 0.1  # mm: the passes moved the mesh
    man = json.loads((outs["override"] / "manifest.json").read_text())
    assert man["model"]["stages"]["coarse"]["overrides"] == ["model.rebox_iterations=2"]
    plain = json.loads((outs["none"] / "manifest.json").read_text())
    assert "overrides" not in plain["model"]["stages"]["coarse"]
    assert man["model"]["model_id"] != plain["model"]["model_id"]
