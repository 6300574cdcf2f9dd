"""check_capture on a tiny capture folder: a good folder passes; each breakage fails with a
report line naming the file at fault; overlays land where cv2.projectPoints says."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.cli.check_capture import main
from tempeh.io.calibration import write_cameras_json
from tempeh.io.images import read_gray, write_png
from tempeh.io.layout import CaptureLayout, FrameId, write_data_list
from tempeh.io.mesh import write_mesh, write_points
from tempeh.io.templates import save_template_dir
from tempeh.template import Template

W, H = 64, 48
FID = FrameId("subjA", "smile", "000001")
NAMES = ("23_A", "23_B", "24_A", "24_B")


def _cameras() -> Cameras:
    az = np.deg2rad([-40.0, -30.0, 30.0, 40.0])
    eyes = torch.tensor(np.stack([1000 * np.sin(az), np.full(4, 50.0), 1000 * np.cos(az)], 1))
    R = look_at_rotation(eyes, torch.zeros(3, dtype=torch.float64),
                         torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    t = -(R @ eyes.unsqueeze(-1)).squeeze(-1)
    K = torch.tensor([[300.0, 0, 31.5], [0, 300.0, 23.5], [0, 0, 1]], dtype=torch.float64)
    dist = torch.tensor([0.05, -0.01, 0.001, 0.0, 0.0], dtype=torch.float64)
    return Cameras.create(K.expand(4, 3, 3), R, t, W, H, dist=dist.expand(4, 5), names=NAMES)


def _tet_mm():
    v = np.array([[-40.0, -40, -30], [40, -40, -30], [0, 50, -30], [0, 0, 60]])
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    return v, f


def _make_capture(root: Path, rng) -> CaptureLayout:
    lay = CaptureLayout(root)
    cams = _cameras()
    write_cameras_json(lay.calibration_dir(FID.subject, FID.sequence) / "cameras.json", cams)
    for n in NAMES:
        write_png(lay.image_path(FID, n), rng.integers(60, 200, size=(H, W), dtype=np.uint8))
    v, f = _tet_mm()
    write_mesh(lay.registration_path(FID), v, f, units="m")
    write_points(lay.scan_path(FID, ext="npy"), v + 1.0)
    save_template_dir(lay.template_dir, Template(v, f, {"face": np.array([0, 1])}, "tet"))
    write_data_list(lay.data_list_path("train"), [FID])
    return lay


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


@pytest.fixture
def capture(tmp_path, rng):
    return _make_capture(tmp_path / "cap", rng)


def test_good_capture_passes(capture, capsys):
    code, out = _run(capsys, capture.root)
    assert code == 0, out
    assert "checked 1 frames, 4 images, 1 calibrations: OK" in out
    code, out = _run(capsys, capture.root, "--list", capture.data_list_path("train"), "--decode")
    assert code == 0, out


def _set_camera(path: Path, i: int, key: str, value):
    doc = json.loads(path.read_text())
    doc["cameras"][i][key] = value
    path.write_text(json.dumps(doc))  # json writes NaN as the (non-standard) token NaN


def test_breakages_are_reported_with_the_file(capture, capsys, tmp_path):
    lay = capture
    cj = lay.calibration_dir(FID.subject, FID.sequence) / "cameras.json"
    good_json = cj.read_text()

    # missing image of a calibrated camera
    img = lay.image_path(FID, "23_B")
    data = img.read_bytes()
    img.unlink()
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{img}: image missing for calibrated camera '23_B'" in out
    # truncated PNG
    img.write_bytes(data[: len(data) - 40])
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{img}: truncated or corrupt PNG" in out
    # wrong image size
    write_png(img, np.zeros((H, W + 2), np.uint8))
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{img}: image is {W + 2}x{H} but the calibration of camera '23_B' " \
                          f"says {W}x{H}" in out
    img.write_bytes(data)
    assert _run(capsys, lay.root)[0] == 0
    # an image without calibration
    extra = lay.image_path(FID, "99_C")
    write_png(extra, np.zeros((H, W), np.uint8))
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{extra}: image has no calibration" in out
    extra.unlink()
    # non-finite calibration
    _set_camera(cj, 2, "t", [0.0, float("nan"), 1000.0])
    code, out = _run(capsys, lay.root)
    assert code == 1 and str(cj) in out and "non-finite" in out
    # camera looking away from the volume: rotate camera 1 by 180 degrees about its y axis
    cams = _cameras()
    R = cams.R[1].numpy().copy()
    R_away = np.diag([-1.0, 1.0, -1.0]) @ R
    cj.write_text(good_json)
    _set_camera(cj, 1, "R", R_away.tolist())
    _set_camera(cj, 1, "t", (-(R_away @ cams.centers()[1].numpy())).tolist())
    code, out = _run(capsys, lay.root)
    assert code == 1
    assert f"{cj}: camera '23_B' looks away from the capture volume" in out
    assert out.count("looks away") == 1
    # principal point outside the image
    cj.write_text(good_json)
    _set_camera(cj, 0, "K", [[300.0, 0, 500.0], [0, 300.0, 23.5], [0, 0, 1]])
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{cj}: camera '23_A': principal point (500.0, 23.5)" in out
    cj.write_text(good_json)
    # corrupt registration and a registration with the wrong vertex count
    reg = lay.registration_path(FID)
    reg_bytes = reg.read_bytes()
    reg.write_bytes(reg_bytes[:-5])
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{reg}: truncated PLY" in out
    v, f = _tet_mm()
    write_mesh(reg, np.concatenate([v, v[:1]]), f)
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{reg}: registration has 5 vertices but the template has 4" in out
    # a registration written in mm where the capture declares metres
    write_mesh(reg, v, f, units="mm")
    code, out = _run(capsys, lay.root)
    assert code == 1 and f"{reg}: registration bounding box diagonal is 1.503e+05 mm" in out
    assert "wrong units" in out and "looks away" not in out  # not used as the volume
    reg.write_bytes(reg_bytes)
    # a data list naming a frame that has no images
    bad_list = tmp_path / "list.json"
    bad_list.write_text(json.dumps([list(FID), ["subjA", "smile", "000002"]]))
    code, out = _run(capsys, lay.root, "--list", bad_list)
    assert code == 1 and "no images for frame subjA/smile/000002" in out
    bad_list.write_text(json.dumps([["subjA", "smile", 2]]))
    code, out = _run(capsys, lay.root, "--list", bad_list)
    assert code == 1 and f"{bad_list}: entry 0: frame must be a string" in out
    assert _run(capsys, lay.root)[0] == 0


def test_overlays_match_cv2_projection(capture, capsys, tmp_path):
    lay = capture
    out_dir = tmp_path / "overlays"
    v, f = _tet_mm()
    mesh = tmp_path / "probe.obj"
    write_mesh(mesh, v, f, units="mm")
    code, out = _run(capsys, lay.root, "--frame", str(FID), "--mesh", mesh, "--units", "mm",
                     "--out", out_dir)
    assert code == 0, out
    files = sorted(out_dir.glob("*.png"))
    assert [p.name for p in files] == [f"subjA.smile.000001.{n}.png" for n in NAMES]
    cams = _cameras().numpy()
    for i, n in enumerate(NAMES):
        ov = cv2.imread(str(out_dir / f"subjA.smile.000001.{n}.png"), cv2.IMREAD_COLOR)
        rvec, _ = cv2.Rodrigues(cams["R"][i])
        uv, _ = cv2.projectPoints(v, rvec, cams["t"][i], cams["K"][i], cams["dist"][i])
        uv = np.rint(uv.reshape(-1, 2)).astype(int)
        assert ((uv >= 0) & (uv < [W, H])).all()
        marked = ov[uv[:, 1], uv[:, 0]]
        assert (marked[:, 2] == 255).all() and (marked[:, 0] == 0).all()  # drawn (red channel)
        # elsewhere the overlay is the grey image
        gray = read_gray(lay.image_path(FID, n))
        mask = np.ones((H, W), bool)
        mask[uv[:, 1], uv[:, 0]] = False
        np.testing.assert_array_equal(ov[mask][:, 0], gray[mask])
    # without --mesh the frame's own registration is drawn
    code, out = _run(capsys, lay.root, "--out", tmp_path / "o2")
    assert code == 0 and "wrote 4 overlay images of smile.000001.ply for subjA/smile/000001" in out
    assert len(list((tmp_path / "o2").glob("*.png"))) == 4

