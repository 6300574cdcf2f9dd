"""make_synthetic end to end: a tiny capture is valid (check_capture), byte-reproducible from its
seed, split by subject, and consistent with its own calibration."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tempeh.cli.make_synthetic import main
from tempeh.io.calibration import read_calibration_dir
from tempeh.io.images import read_gray
from tempeh.io.layout import CaptureLayout, read_data_list
from tempeh.io.mesh import read_mesh, read_points
from tempeh.synth.writer import split_subjects

TINY = ["--subjects", "3", "--frames-per-sequence", "1", "--views", "4", "--image-downsample", "16",
        "--scan-points", "400", "--template", "low", "--quiet"]


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    a, b, c = base / "a", base / "b", base / "c"
    assert main(["--out", str(a), "--seed", "5", "--preview"] + TINY) == 0
    assert main(["--out", str(b), "--seed", "5", "--preview"] + TINY) == 0
    assert main(["--out", str(c), "--seed", "6"] + TINY) == 0
    return a, b, c


def test_same_seed_same_bytes(captures):
    a, b, _ = captures
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) > 30 and ha == hb


def test_different_seed_different_subjects(captures):
    a, _, c = captures
    la, lc = CaptureLayout(a), CaptureLayout(c)
    fid = ("subject_000", "sequence_00", "000000")
    va, _ = read_mesh(la.gt_mesh_path(fid), units=la.mesh_units)
    vc, _ = read_mesh(lc.gt_mesh_path(fid), units=lc.mesh_units)
    assert va.shape == vc.shape and np.abs(va - vc).max() > 1.0


def test_capture_is_valid_and_complete(captures):
    a = captures[0]
    check = pytest.importorskip("tempeh.cli.check_capture")
    assert check.main([str(a)]) == 0
    assert (a / "preview.png").is_file() and read_gray(a / "preview.png").shape[0] > 0
    meta = json.loads((a / "synthetic.json").read_text())
    assert meta["seed"] == 5 and meta["settings"]["views"] == 4
    assert json.loads((a / "capture.json").read_text())["units"] == {"scans": "mm", "meshes": "m"}
    # Splits: disjoint by subject, together all subjects, one each for 3 subjects.
    lay = CaptureLayout(a)
    subj = {s: {f.subject for f in read_data_list(lay.data_list_path(s))} for s in ("train", "val", "test")}
    assert all(len(v) == 1 for v in subj.values())
    assert set.union(*subj.values()) == {"subject_000", "subject_001", "subject_002"}
    tmpl = lay.load_template()
    assert tmpl.num_verts > 1000 and "lips" in tmpl.regions


def test_files_agree_with_each_other(captures):
    """Scan and true mesh are in the same frame and units; the images show the head where the
    written calibration projects the true mesh; registrations are close to the truth."""
    import igl

    a = captures[0]
    lay = CaptureLayout(a)
    fid = lay.discover_frames()[0]
    v, f = read_mesh(lay.gt_mesh_path(fid), units=lay.mesh_units)
    reg, _ = read_mesh(lay.registration_path(fid), units=lay.mesh_units)
    pts = read_points(lay.scan_path(fid), units=lay.scan_units)
    out = np.load(a / "synthetic" / fid.subject / fid.sequence / f"{fid.sequence}.{fid.frame}.outliers.npy")
    assert pts.shape == (400, 3) and out.shape == (400,) and out.sum() == 4
    d = np.sqrt(igl.point_mesh_squared_distance(pts[~out], v, f.astype(np.int64))[0])
    assert np.median(d) < 0.3  # float32 metres -> mm round trip plus 0.2 mm noise
    err = np.linalg.norm(reg - v, axis=-1)
    assert 0.2 < np.sqrt(np.mean(err ** 2)) < 3.0
    cams = read_calibration_dir(lay.calibration_dir(fid.subject, fid.sequence))
    assert cams.width.tolist() == [100] * 4 and cams.height.tolist() == [75] * 4
    uv, depth = cams.project(torch.from_numpy(v)[None].expand(4, -1, -1))
    for i, name in enumerate(cams.names):
        img = read_gray(lay.image_path(fid, name))
        ok = cams[i : i + 1].in_image(uv[i : i + 1], depth[i : i + 1])[0].numpy()
        u = np.rint(uv[i, ok].numpy()).astype(int)
        # Projected surface vertices land on lit pixels far more often than the background.
        on = img[u[:, 1], u[:, 0]].astype(float)
        assert np.mean(on > 25) > 0.6 and np.mean(img > 25) < 0.5


@pytest.mark.parametrize("flag,key,value,default,bad", [("--speckle-mm", "speckle_mm", 6.0, 2.0, "0"),
                                                        ("--markings", "markings", 1.0, 0.0, "1.5")])
def test_texture_options_change_only_the_images(captures, tmp_path, flag, key, value, default, bad):
    a = captures[0]
    d = tmp_path / "d"
    assert main(["--out", str(d), "--seed", "5", flag, str(value)] + TINY) == 0
    assert json.loads((d / "synthetic.json").read_text())["settings"][key] == value
    assert json.loads((a / "synthetic.json").read_text())["settings"][key] == default
    ha, hd = _hashes(a), _hashes(d)
    images = sorted(k for k in hd if k.startswith("images/"))
    assert images and all(ha[k] != hd[k] for k in images)
    for k in hd:
        if k.startswith(("scans/", "gt_meshes/", "registrations/", "calibrations/")):
            assert ha[k] == hd[k], k
    if key == "markings":  # markings only darken: every view sums to less than without them
        for k in images:
            assert read_gray(d / k).astype(float).sum() < read_gray(a / k).astype(float).sum(), k
    assert main(["--out", str(tmp_path / "e"), flag, bad] + TINY) == 1


def test_split_subjects_rules():
    for n in range(1, 12):
        s = split_subjects(n, (0.6, 0.2, 0.2), seed=3)
        allv = s["train"] + s["val"] + s["test"]
        assert sorted(allv) == list(range(n))
        if n >= 3:
            assert all(len(v) >= 1 for v in s.values())
    assert split_subjects(10, seed=1)["train"].__len__() == 6


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    assert main(["--out", str(tmp_path)] + TINY) == 1
    assert main(["--out", str(tmp_path / "new"), "--subjects", "0"]) == 1
