"""The evaluate command on a tiny hand-built capture folder: a flat 'head' (a grid plane) moving
at constant velocity over 3 frames, scans with known normal noise, true meshes; predictions
equal to the truth score v2v 0 and the known noise, predictions offset by 2 mm along the normal
score 2 mm; outputs, tables, missing files and --compare are checked."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tempeh.cli.evaluate import main
from tempeh.eval.metrics import summary
from tempeh.io.layout import CaptureLayout, FrameId, write_data_list
from tempeh.io.mesh import read_points, write_mesh, write_points
from tempeh.io.templates import save_template_dir
from tempeh.template import Template

N = 5
SPACING = 25.0  # mm; the plane spans [-50, 50]^2
FRAMES = [FrameId("subjA", "smile", f"{i:06d}") for i in range(3)]
VEL = np.array([1.0, 0.5, 3.0])  # mm per frame


def _plane():
    c = (np.arange(N) - (N - 1) / 2) * SPACING
    xx, yy = np.meshgrid(c, c)
    verts = np.stack([xx.ravel(), yy.ravel(), np.zeros(N * N)], 1)
    i, j = np.meshgrid(np.arange(N - 1), np.arange(N - 1), indexing="ij")
    v00 = (i * N + j).ravel()
    faces = np.concatenate([np.stack([v00, v00 + 1, v00 + N + 1], 1),
                            np.stack([v00, v00 + N + 1, v00 + N], 1)])
    return verts, faces


# regions by grid column: face = columns 0-1, scalp = columns 3-4, neck = column 2 and row 0
_COL = np.arange(N * N) % N
REGIONS = {"face": np.flatnonzero(_COL <= 1), "scalp": np.flatnonzero(_COL >= 3),
           "neck": np.unique(np.concatenate([np.flatnonzero(_COL == 2), np.arange(N)]))}


def _make_capture(root: Path, rng, noise: float, regions=REGIONS, points: int = 300):
    """Capture with 3 frames; returns the layout and per-frame scan noise (signed, mm)."""
    lay = CaptureLayout(root)
    verts, faces = _plane()
    save_template_dir(lay.template_dir, Template(verts, faces, dict(regions), "plane"))
    noises = {}
    for t, fid in enumerate(FRAMES):
        v = verts + t * VEL
        write_mesh(lay.gt_mesh_path(fid), v, faces, units="m")
        xy = rng.uniform(-45.0, 45.0, size=(points, 2))
        d = noise * rng.standard_normal(points)
        pts = np.concatenate([xy, d[:, None]], 1) + t * VEL
        write_points(lay.scan_path(fid, ext="npy"), pts)
        noises[fid] = d
    write_data_list(lay.data_list_path("test"), FRAMES)
    return lay


def _write_preds(root: Path, lay: CaptureLayout, offset=(0.0, 0.0, 0.0), units="m", ext="ply"):
    verts, faces = _plane()
    for t, fid in enumerate(FRAMES):
        p = root / fid.subject / fid.sequence / f"{fid.sequence}.{fid.frame}.{ext}"
        write_mesh(p, verts + t * VEL + np.asarray(offset), faces, units=units)
    return root


def _expected_regions(lay: CaptureLayout):
    """Per-region |scan z - plane z| pooled over frames, regions by the brute-force nearest
    template vertex (an independent reference: above a regular grid the nearest corner of the
    closest face is the nearest vertex)."""
    verts, _ = _plane()
    out = {k: [] for k in ("all", "face", "scalp", "neck")}
    for t, fid in enumerate(FRAMES):
        pts = read_points(lay.scan_path(fid), units="mm") - t * VEL
        d = np.abs(pts[:, 2])
        nearest = ((pts[:, None, :2] - verts[None, :, :2]) ** 2).sum(-1).argmin(1)
        out["all"].append(d)
        for k, idx in REGIONS.items():
            out[k].append(d[np.isin(nearest, idx)])
    return {k: np.concatenate(v) for k, v in out.items()}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def _table_rows(text: str):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] not in ("region", "---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    return _make_capture(root, np.random.default_rng(7), noise=0.4)


def test_prediction_equal_to_truth(capture, tmp_path, capsys):
    lay = capture
    pred = _write_preds(tmp_path / "pred", lay)
    out = tmp_path / "eval"
    code, text = _run(capsys, "--pred", pred, "--data", lay.root, "--list",
                      lay.data_list_path("test"), "--out", out, "--heatmaps", 1)
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    for key in ("all", "face", "scalp", "neck"):
        for stat in ("median", "mean", "std", "count"):
            assert stat in m["scan_to_mesh_mm"][key]
    assert m["v2v_gt_mm"]["median"] == pytest.approx(0.0, abs=1e-6)
    assert m["v2v_gt_mm"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["v2v_gt_mm"]["count"] == 3 * N * N
    assert m["jitter_mm"] == pytest.approx(0.0, abs=1e-5)
    assert m["jitter_gt_mm"] == pytest.approx(0.0, abs=1e-5)
    ps = m["pose_split_median"]
    assert ps["rotation_deg"] == pytest.approx(0.0, abs=1e-3)
    assert ps["centroid_mm"] == pytest.approx(0.0, abs=1e-6)
    assert ps["scale"] == pytest.approx(1.0, abs=1e-9)
    assert ps["residual_median_mm"] == pytest.approx(0.0, abs=1e-6)
    assert m["counts"]["frames_with_pose_split"] == 3
    want = _expected_regions(lay)
    for key, d in want.items():
        got, ref = m["scan_to_mesh_mm"][key], summary(d)
        assert got["count"] == ref["count"] > 0
        for stat in ("median", "mean", "std"):
            assert got[stat] == pytest.approx(ref[stat], abs=1e-5), (key, stat)
    assert m["counts"]["frames_evaluated"] == 3 and m["counts"]["scan_points"] == 900
    assert m["frames"] == [str(f) for f in FRAMES]
    # per-frame CSV
    with open(out / "per_frame.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["frame"] for r in rows] == [f.frame for f in FRAMES]
    assert all(r["status"] == "ok" for r in rows)
    assert float(rows[0]["v2v_median"]) == pytest.approx(0.0, abs=1e-6)
    # plot and one heat map (scan points, mm, coloured)
    assert (out / "cumulative_error.png").read_bytes()[:4] == b"\x89PNG"
    heat = out / "heatmaps" / "subjA" / "smile" / "smile.000000.ply"
    assert heat.is_file() and b"property uchar red" in heat.read_bytes()[:400]
    assert not (out / "heatmaps" / "subjA" / "smile" / "smile.000001.ply").exists()
    np.testing.assert_allclose(read_points(heat), read_points(lay.scan_path(FRAMES[0])), atol=1e-4)
    # printed table == metrics.json
    rows = _table_rows(text)
    assert set(rows) == {"all", "face", "scalp", "neck", "v2v to gt"}
    for key in ("all", "face", "scalp", "neck"):
        s = m["scan_to_mesh_mm"][key]
        assert [float(c) for c in rows[key][:3]] == pytest.approx(
            [s["median"], s["mean"], s["std"]], abs=6e-4)
        assert int(rows[key][3]) == s["count"]


@pytest.mark.parametrize("ext", ["ply", "obj"])
def test_prediction_offset_2mm_along_normal(tmp_path, capsys, ext):
    lay = _make_capture(tmp_path / "cap", np.random.default_rng(3), noise=0.0)
    pred = _write_preds(tmp_path / "pred", lay, offset=(0.0, 0.0, 2.0), units="mm", ext=ext)
    out = tmp_path / "eval"
    code, text = _run(capsys, "--pred", pred, "--data", lay.root, "--list",
                      lay.data_list_path("test"), "--out", out, "--pred-units", "mm")
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    for key in ("all", "face", "scalp", "neck"):
        s = m["scan_to_mesh_mm"][key]
        assert s["median"] == pytest.approx(2.0, abs=1e-4)
        assert s["mean"] == pytest.approx(2.0, abs=1e-4)
        assert s["std"] == pytest.approx(0.0, abs=1e-4)
    assert m["v2v_gt_mm"]["median"] == pytest.approx(2.0, abs=1e-4)
    assert m["v2v_gt_mm"]["std"] == pytest.approx(0.0, abs=1e-4)


def test_template_without_neck_and_max_points(tmp_path, capsys):
    regions = {k: v for k, v in REGIONS.items() if k != "neck"}
    lay = _make_capture(tmp_path / "cap", np.random.default_rng(5), noise=0.2, regions=regions)
    pred = _write_preds(tmp_path / "pred", lay)
    out = tmp_path / "eval"
    code, text = _run(capsys, "--pred", pred, "--data", lay.root, "--list",
                      lay.data_list_path("test"), "--out", out, "--max-points", 50,
                      "--heatmaps", 0)
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["scan_to_mesh_mm"]) == ["all", "face", "scalp"]
    assert m["scan_to_mesh_mm"]["all"]["count"] == 150
    assert "neck" not in _table_rows(text)
    assert not (out / "heatmaps").exists()


def test_missing_prediction(capture, tmp_path, capsys):
    lay = capture
    pred = _write_preds(tmp_path / "pred", lay)
    gone = pred / "subjA" / "smile" / "smile.000001.ply"
    gone.unlink()
    args = ["--pred", pred, "--data", lay.root, "--list", lay.data_list_path("test")]
    code, text = _run(capsys, *args, "--out", tmp_path / "eval")
    assert code != 0
    assert str(gone) in text
    assert not (tmp_path / "eval" / "metrics.json").exists()
    code, text = _run(capsys, *args, "--out", tmp_path / "eval2", "--allow-missing")
    assert code == 0, text
    m = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert m["counts"]["frames_missing"] == 1 and m["missing"] == [str(FRAMES[1])]
    assert m["counts"]["frames_evaluated"] == 2
    assert "jitter_mm" not in m  # only 2 frames of the sequence remain


def test_bad_prediction_fails_naming_file(capture, tmp_path, capsys):
    lay = capture
    pred = _write_preds(tmp_path / "pred", lay)
    bad = pred / "subjA" / "smile" / "smile.000002.ply"
    write_mesh(bad, np.zeros((4, 3)), np.array([[0, 1, 2], [0, 2, 3]]), units="m")
    code, text = _run(capsys, "--pred", pred, "--data", lay.root, "--list",
                      lay.data_list_path("test"), "--out", tmp_path / "eval")
    assert code == 1
    assert str(bad) in text and "4 vertices" in text
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["counts"]["frames_failed"] == 1 and m["counts"]["frames_evaluated"] == 2


def test_frame_without_scan_uses_truth_only(tmp_path, capsys):
    lay = _make_capture(tmp_path / "cap", np.random.default_rng(9), noise=0.1)
    lay.scan_path(FRAMES[2]).unlink()
    pred = _write_preds(tmp_path / "pred", lay)
    args = ["--pred", pred, "--data", lay.root, "--list", lay.data_list_path("test")]
    code, text = _run(capsys, *args, "--out", tmp_path / "eval")
    assert code == 0, text
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["counts"]["frames_with_scan"] == 2 and m["counts"]["frames_with_gt"] == 3
    assert m["scan_to_mesh_mm"]["all"]["count"] == 600 and m["v2v_gt_mm"]["count"] == 3 * N * N
    # with neither scan nor true mesh the frame fails, naming what is missing
    lay.gt_mesh_path(FRAMES[2]).unlink()
    code, text = _run(capsys, *args, "--out", tmp_path / "eval2")
    assert code == 1 and "no scan and no true mesh" in text and str(FRAMES[2]) in text


def test_compare_prints_both_runs(capture, tmp_path, capsys):
    lay = capture
    base = ["--data", lay.root, "--list", lay.data_list_path("test"), "--heatmaps", 0]
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    assert _run(capsys, "--pred", _write_preds(tmp_path / "pa", lay), "--out", run_a, *base)[0] == 0
    assert _run(capsys, "--pred", _write_preds(tmp_path / "pb", lay, offset=(0, 0, 1.0)),
                "--out", run_b, *base)[0] == 0
    code, text = _run(capsys, "--compare", run_a, run_b)
    assert code == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["run", "all median", "all mean", "all std"]
    assert "neck median" in header and "v2v median" in header and "jitter" in header
    body = {ln.strip("|").split("|")[0].strip(): [c.strip() for c in ln.strip("|").split("|")]
            for ln in lines[2:]}
    assert set(body) == {"run_a", "run_b"}
    for name, run in (("run_a", run_a), ("run_b", run_b)):
        m = json.loads((run / "metrics.json").read_text())
        col = header.index("v2v median")
        assert float(body[name][col]) == pytest.approx(m["v2v_gt_mm"]["median"], abs=6e-4)
        col = header.index("face mean")
        assert float(body[name][col]) == pytest.approx(m["scan_to_mesh_mm"]["face"]["mean"], abs=6e-4)
    assert float(body["run_b"][header.index("v2v median")]) == pytest.approx(1.0, abs=1e-3)
    # a folder without metrics.json is an error naming it
    code, text = _run(capsys, "--compare", run_a, tmp_path / "nothing")
    assert code == 1 and "nothing" in text


def test_bad_arguments(capsys):
    assert main([]) == 2
    assert main(["--pred", "x"]) == 2
