"""fit_scans CLI: layout of the outputs, shards, resume, bad frames (tiny hand-built capture)."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tempeh.cli.fit_scans import main, order_frames, parse_shard, shard_frames
from tempeh.io.layout import CaptureLayout, FrameId, write_data_list
from tempeh.io.mesh import read_mesh, write_points
from tempeh.io.templates import save_template_dir
from tempeh.synth.head import make_head_template
from tempeh.synth.scan import sample_surface

# a very short schedule: these tests check the tool, not the fit quality
FAST = {
    "max_scan_points": 1500, "num_threads": 1, "align_yaws": [0.0], "align_pitches": [0.0],
    "stages": [
        {"sigma_mm": 10.0, "outer": 1, "inner": 4, "optimize_offsets": False},
        {"sigma_mm": 3.0, "w_arap": 3.0, "w_lap": 30.0, "outer": 1, "inner": 4},
    ],
}


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """template/ + scans for s1/seqA/{000000,000001,000002} and s2/seqB/000007 (mm, .npy and
    .ply), a data list, and a fast fit config."""
    root = tmp_path_factory.mktemp("capture")
    tpl = make_head_template("low")
    save_template_dir(root / "template", tpl)
    layout = CaptureLayout(root)
    rng = np.random.default_rng(7)
    frames = [FrameId("s1", "seqA", f"{i:06d}") for i in range(3)] + [FrameId("s2", "seqB", "000007")]
    for k, fid in enumerate(frames):
        v = tpl.verts * (1.0 + 0.01 * k) + np.array([5.0 * k, 0.0, 0.0])
        pts, _, _ = sample_surface(v, tpl.faces, 1500, rng)
        pts = pts + rng.normal(0, 0.2, pts.shape)
        ext = "npy" if k % 2 == 0 else "ply"
        path = layout.scan_path(fid, ext=ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        if ext == "npy":
            np.save(path, pts)
        else:
            write_points(path, pts, units="mm")
    write_data_list(root / "data_lists" / "all.json", frames)
    cfg = root / "fast.yaml"
    cfg.write_text(yaml.safe_dump(FAST))
    return root, frames, tpl


def _args(root, out, *extra):
    return ["--data", str(root), "--list", str(root / "data_lists" / "all.json"), "--out", str(out),
            "--config", str(root / "fast.yaml"), "--device", "cpu", "--quiet", *extra]


def _report(out, name="fit_report.json"):
    return json.loads((Path(out) / name).read_text())


def test_parse_shard_and_partition():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    frames = [FrameId(f"s{k % 3}", f"q{k % 2}", f"{k:06d}") for k in range(11)]
    frames = frames + frames[:2]  # duplicates are fitted once
    for sequential in (False, True):
        parts = [shard_frames(frames, i, 4, sequential) for i in range(4)]
        flat = [f for p in parts for f in p]
        assert sorted(flat) == sorted(set(frames))  # every frame exactly once
        assert len(flat) == len(set(flat))
        assert parts == [shard_frames(frames, i, 4, sequential) for i in range(4)]  # stable
        if sequential:  # a sequence never straddles shards
            owners = {}
            for i, p in enumerate(parts):
                for f in p:
                    assert owners.setdefault((f.subject, f.sequence), i) == i
    seq = order_frames([FrameId("a", "q", "10"), FrameId("a", "q", "9")], sequential=True)
    assert [f.frame for f in seq] == ["9", "10"]  # numeric order


def test_fit_scans_writes_layout_and_resumes(capture, tmp_path):
    root, frames, tpl = capture
    out = tmp_path / "regs"
    assert main(_args(root, out)) == 0
    rep = _report(out)
    assert [e["status"] for e in rep["frames"]] == ["ok"] * 4
    for fid in frames:
        path = out / fid.subject / fid.sequence / f"{fid.sequence}.{fid.frame}.ply"
        v, f = read_mesh(path, units="m")  # metres on disk
        assert v.shape == tpl.verts.shape and np.array_equal(f, tpl.faces)
        assert np.all(np.isfinite(v))
    for e in rep["frames"]:
        assert e["time_s"] > 0 and e["s2m_median_mm"] < 5.0
    # the fit lands on the scan (the mesh is in mm internally, metres on disk)
    v0, _ = read_mesh(out / "s1" / "seqA" / "seqA.000000.ply", units="m")
    assert np.median(np.linalg.norm(v0 - tpl.verts, axis=1)) < 5.0

    # resume: finished frames are skipped, a deleted one is redone
    target = out / "s1" / "seqA" / "seqA.000001.ply"
    target.unlink()
    before = (out / "s2" / "seqB" / "seqB.000007.ply").stat().st_mtime_ns
    assert main(_args(root, out)) == 0
    rep = _report(out)
    status = {e["frame"]: e["status"] for e in rep["frames"]}
    assert status == {"000000": "skipped", "000001": "ok", "000002": "skipped", "000007": "skipped"}
    assert target.is_file()
    assert (out / "s2" / "seqB" / "seqB.000007.ply").stat().st_mtime_ns == before


def test_shards_cover_frames_and_sequential(capture, tmp_path):
    root, frames, _ = capture
    out = tmp_path / "sharded"
    codes = [main(_args(root, out, "--shard", f"{i}/2", "--sequential")) for i in range(2)]
    assert codes == [0, 0]
    seen = []
    for i in range(2):
        rep = _report(out, f"fit_report.shard-{i}-of-2.json")
        seen += [(e["subject"], e["sequence"], e["frame"]) for e in rep["frames"]]
        inits = [e["init"] for e in rep["frames"]]
        if len(inits) == 3:  # seqA: the later frames start from the previous fit
            assert inits == ["none", "previous_frame", "previous_frame"]
    assert sorted(seen) == sorted(tuple(f) for f in frames)
    assert len(list(out.rglob("*.ply"))) == 4


def test_bad_scan_is_reported_others_done(capture, tmp_path):
    root, frames, _ = capture
    # a copy of the capture with one corrupt scan (truncated PLY) and one missing scan
    import shutil

    bad_root = tmp_path / "cap"
    shutil.copytree(root, bad_root)
    layout = CaptureLayout(bad_root)
    corrupt = layout.find_scan(frames[1])
    corrupt.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 100\n"
                        b"property float x\nproperty float y\nproperty float z\nend_header\n\x00\x01")
    layout.find_scan(frames[3]).unlink()
    out = tmp_path / "out"
    code = main(_args(bad_root, out))
    assert code == 1
    rep = _report(out)
    status = {e["frame"]: e for e in rep["frames"]}
    assert status["000001"]["status"] == "failed" and str(corrupt) in status["000001"]["error"]
    assert status["000007"]["status"] == "failed" and "no scan" in status["000007"]["error"]
    assert status["000000"]["status"] == "ok" and status["000002"]["status"] == "ok"
    assert (out / "s1" / "seqA" / "seqA.000002.ply").is_file()
    assert not (out / "s1" / "seqA" / "seqA.000001.ply").exists()


def test_bad_arguments(capture, tmp_path):
    root, _, _ = capture
    assert main(_args(root, tmp_path / "o", "--shard", "3/2")) == 2
    assert main(_args(root, tmp_path / "o", "--set", "no_such_key=1")) == 2
    assert main(["--data", str(tmp_path / "missing"), "--list", str(tmp_path / "x.json"),
                 "--out", str(tmp_path / "o")]) == 1
