"""Calibration readers/writers: fixtures written by the test from known cameras, round trips,
the Tsai -> OpenCV distortion fit, and errors that name the file, key and line."""
import json

import cv2
import numpy as np
import pytest
import torch

from tempeh.cameras import Cameras, look_at_rotation
from tempeh.errors import TempehDataError
from tempeh.io.calibration import (
    read_calibration_dir,
    read_cameras_json,
    read_multiface_krt,
    read_nersemble_cameras,
    read_opencv_calibration,
    write_cameras_json,
    write_multiface_krt,
    write_nersemble_cameras,
    write_opencv_calibration,
)
from tempeh.io.tka import (
    camera_to_tka,
    parse_tka,
    read_tka,
    tka_to_cameras,
    tsai_to_opencv_radial,
    write_tka,
)

FIELDS = ("K", "R", "t", "dist", "width", "height")


def known_cameras(rng, V=3, W=1600, H=1200, distortion=True, names=None) -> tuple:
    """(V,) float64 cameras about 1 m from the origin; also returns the eyes (V, 3) mm."""
    dirs = rng.normal(size=(V, 3))
    dirs[:, 2] = np.abs(dirs[:, 2]) + 0.5
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    eyes = dirs * rng.uniform(900, 1100, size=(V, 1))
    up = np.array([0.0, 1.0, 0.0]) + rng.normal(scale=0.2, size=(V, 3))
    R = look_at_rotation(torch.from_numpy(eyes), torch.zeros(V, 3, dtype=torch.float64),
                         torch.from_numpy(up)).numpy()
    t = -np.einsum("vij,vj->vi", R, eyes)
    K = np.tile(np.eye(3), (V, 1, 1))
    K[:, 0, 0] = rng.uniform(2000, 2400, V)
    K[:, 1, 1] = K[:, 0, 0] * rng.uniform(0.99, 1.01, V)
    K[:, 0, 2] = W / 2 + rng.uniform(-20, 20, V)
    K[:, 1, 2] = H / 2 + rng.uniform(-20, 20, V)
    dist = np.zeros((V, 5))
    if distortion:
        dist[:, :2] = rng.uniform([-0.2, -0.1], [0.2, 0.1], size=(V, 2))
        dist[:, 2:4] = rng.uniform(-1e-3, 1e-3, size=(V, 2))
        dist[:, 4] = rng.uniform(-0.05, 0.05, V)
    names = names or [f"cam{i}" for i in range(V)]
    cams = Cameras.create(K, R, t, W, H, dist=dist, names=names, dtype=torch.float64)
    return cams, eyes


def assert_same_cameras(a: Cameras, b: Cameras, atol=1e-9):
    assert a.batch_shape == b.batch_shape
    assert a.names == b.names
    for f in FIELDS:
        np.testing.assert_allclose(getattr(a, f).numpy(), getattr(b, f).numpy(), rtol=0,
                                   atol=atol, err_msg=f)


# ----------------------------------------------------------------------------- cameras.json
@pytest.mark.parametrize("units", ["mm", "m"])
def test_cameras_json_round_trip(tmp_path, rng, units):
    cams, eyes = known_cameras(rng)
    p = tmp_path / "calib" / "cameras.json"
    write_cameras_json(p, cams, units=units)
    assert sorted(x.name for x in p.parent.iterdir()) == ["cameras.json"]  # no temp files left
    doc = json.loads(p.read_text())
    assert doc["format"] == "tempeh.cameras" and doc["version"] == 1 and doc["units"] == units
    assert doc["convention"] == "opencv_world_to_camera"
    assert doc["pixel_origin"] == "center_of_top_left_pixel"
    scale = 1000.0 if units == "m" else 1.0
    np.testing.assert_allclose(np.array([c["t"] for c in doc["cameras"]]) * scale,
                               cams.t.numpy(), atol=1e-9)
    back = read_cameras_json(p)
    assert back.dtype == torch.float64
    assert_same_cameras(back, cams, atol=1e-9 if units == "m" else 0)
    np.testing.assert_allclose(back.centers().numpy(), eyes, atol=1e-9)


def test_cameras_json_hand_written_metres(tmp_path):
    doc = {"format": "tempeh.cameras", "version": 1, "units": "m",
           "convention": "opencv_world_to_camera", "pixel_origin": "center_of_top_left_pixel",
           "cameras": [{"name": "front", "width": 64, "height": 48,
                        "K": [[100, 0, 31.5], [0, 100, 23.5], [0, 0, 1]],
                        "R": [[1, 0, 0], [0, -1, 0], [0, 0, -1]], "t": [0.0, 0.0, 1.0],
                        "dist": [0.1, 0, 0, 0, 0]}]}
    p = tmp_path / "cameras.json"
    p.write_text(json.dumps(doc))
    cams = read_cameras_json(p)
    assert cams.names == ("front",) and cams.width.tolist() == [64]
    np.testing.assert_allclose(cams.centers().numpy(), [[0, 0, 1000.0]])  # C = -R^T t, mm
    uv, depth = cams.project(torch.tensor([[[0.0, 0.0, 0.0]]], dtype=torch.float64))
    np.testing.assert_allclose(uv.numpy(), [[[31.5, 23.5]]])
    np.testing.assert_allclose(depth.numpy(), [[1000.0]])


def _doc_one(**over):
    cam = {"name": "a", "width": 8, "height": 6, "K": [[10, 0, 4], [0, 10, 3], [0, 0, 1]],
           "R": np.eye(3).tolist(), "t": [0, 0, 100], "dist": [0, 0, 0, 0, 0]}
    cam.update(over)
    return {"format": "tempeh.cameras", "version": 1, "units": "mm", "cameras": [cam]}


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["cameras"][0].pop("K"), "cameras\\[0\\].K"),
    (lambda d: d.pop("units"), "'units'"),
    (lambda d: d.update(units="cm"), "units"),
    (lambda d: d["cameras"][0].update(t=[0, 0]), "cameras\\[0\\].t' has shape"),
    (lambda d: d["cameras"][0].update(t=[0, "x", 1]), "numbers only"),
    (lambda d: d["cameras"][0].update(t=[0, float("nan"), 1]), "non-finite"),
    (lambda d: d["cameras"][0].update(R=(np.eye(3) * 1.01).tolist()), "not a rotation"),
    (lambda d: d["cameras"][0].update(R=np.diag([1.0, 1, -1]).tolist()), "det = -1"),
    (lambda d: d["cameras"][0].update(width=0), "positive"),
    (lambda d: d["cameras"][0].update(dist=[0, 0, 0, 0]), "dist' has shape"),
    (lambda d: d["cameras"].append(dict(d["cameras"][0])), "duplicate camera names"),
    (lambda d: d.update(format="other"), "format"),
])
def test_cameras_json_errors(tmp_path, mutate, match):
    d = _doc_one()
    mutate(d)
    p = tmp_path / "cameras.json"
    p.write_text(json.dumps(d))
    with pytest.raises(TempehDataError, match=match) as ei:
        read_cameras_json(p)
    assert str(ei.value).startswith(str(p))


def test_cameras_json_syntax_error_has_line(tmp_path):
    p = tmp_path / "cameras.json"
    p.write_text('{\n "format": "tempeh.cameras",\n "version": 1,,\n}\n')
    with pytest.raises(TempehDataError) as ei:
        read_cameras_json(p)
    assert ei.value.line == 3


# ----------------------------------------------------------------------------- OpenCV
@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_opencv_round_trip(tmp_path, rng, ext):
    cams, _ = known_cameras(rng, V=1, names=["23_A"])
    p = tmp_path / f"cam.{ext}"
    write_opencv_calibration(p, cams)
    back = read_opencv_calibration(p)
    assert_same_cameras(back, cams, atol=1e-12)
    # the file is plain OpenCV: cv2 reads it back by itself
    fs = cv2.FileStorage(str(p), cv2.FILE_STORAGE_READ)
    np.testing.assert_allclose(fs.getNode("K").mat(), cams.K[0].numpy(), atol=1e-12)
    np.testing.assert_allclose(fs.getNode("T").mat().ravel(), cams.t[0].numpy(), atol=1e-9)
    fs.release()


def test_opencv_fixture_alternative_keys(tmp_path, rng):
    """A file written with cv2 itself (camera_matrix, 4 dist coeffs, rvec, tvec in metres,
    image_size) reads as the known camera and projects like cv2.projectPoints."""
    cams, _ = known_cameras(rng, V=1)
    a = cams.numpy()
    rvec = cv2.Rodrigues(a["R"][0])[0]
    dist4 = a["dist"][0][:4]
    p = tmp_path / "left.yml"
    fs = cv2.FileStorage(str(p), cv2.FILE_STORAGE_WRITE)
    fs.write("camera_matrix", a["K"][0])
    fs.write("dist_coeffs", dist4.reshape(1, 4))
    fs.write("rvec", rvec)
    fs.write("tvec", a["t"][0].reshape(3, 1) / 1000.0)
    fs.write("image_size", np.array([1600, 1200], dtype=np.int32))
    fs.write("units", "m")
    fs.release()
    got = read_opencv_calibration(p)
    assert got.names == ("left",)
    np.testing.assert_allclose(got.K.numpy(), a["K"], atol=1e-12)
    np.testing.assert_allclose(got.R.numpy(), a["R"], atol=1e-12)
    np.testing.assert_allclose(got.t.numpy(), a["t"], atol=1e-9)
    np.testing.assert_allclose(got.dist.numpy()[0], list(dist4) + [0.0], atol=0)
    pts = rng.uniform(-150, 150, size=(20, 3))
    ref = cv2.projectPoints(pts, rvec, a["t"][0], a["K"][0], dist4)[0].reshape(-1, 2)
    uv, _ = got.project(torch.from_numpy(pts))
    assert np.abs(uv[0].numpy() - ref).max() < 1e-3


def test_opencv_errors(tmp_path):
    p = tmp_path / "cam.yaml"
    p.write_text("%YAML:1.0\n---\nK: [[500, 0, 32], [0, 500, 24], [0, 0, 1]]\n"
                 "D: [0, 0, 0, 0, 0]\nR: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]\n")
    with pytest.raises(TempehDataError, match="missing key 'T'"):
        read_opencv_calibration(p)
    p.write_text(p.read_text() + "T: [0, 0, 500]\n")
    with pytest.raises(TempehDataError, match="image_width"):
        read_opencv_calibration(p)
    cams = read_opencv_calibration(p, image_size=(64, 48))
    assert cams.width.tolist() == [64] and cams.height.tolist() == [48]
    p.write_text("%YAML:1.0\n---\nK: [1, 2\nT: [\n")
    with pytest.raises(TempehDataError) as ei:
        read_opencv_calibration(p)
    assert ei.value.line is not None
    p.write_text("%YAML:1.0\n---\nK: [[500, 0, 32], [0, 500, 24], [0, 0, 1]]\nD: [0, 0, 0, 0, 0]\n"
                 "R: [[1, 0, 0], [0, 1, 0], [0, 0, 2]]\nT: [0, 0, 1]\nimage_size: [64, 48]\n")
    with pytest.raises(TempehDataError, match="not a rotation"):
        read_opencv_calibration(p)


# ----------------------------------------------------------------------------- NeRSemble
def test_nersemble_fixture_and_round_trip(tmp_path, rng):
    cams, eyes = known_cameras(rng, V=3, W=3208, H=2200, distortion=False,
                               names=["220700191", "221501007", "222200036"])
    cams = cams._replace(K=cams.K[:1].expand(3, 3, 3).clone())  # one shared intrinsics
    a = cams.numpy()
    w2c = {}
    for i, n in enumerate(a["names"]):
        M = np.eye(4)
        M[:3, :3] = a["R"][i]
        M[:3, 3] = a["t"][i] / 1000.0  # metres
        w2c[n] = M.tolist()
    p = tmp_path / "camera_params.json"
    p.write_text(json.dumps({"world_2_cam": w2c, "intrinsics": a["K"][0].tolist()}))
    with pytest.raises(TempehDataError, match="image_size"):
        read_nersemble_cameras(p)
    got = read_nersemble_cameras(p, image_size=(3208, 2200))
    assert_same_cameras(got, cams, atol=1e-9)
    np.testing.assert_allclose(got.centers().numpy(), eyes, atol=1e-9)  # w2c, not c2w
    # writer -> reader; per-serial intrinsics when they differ
    cams2 = cams._replace(K=cams.K * torch.tensor([1.0, 1.1, 0.9], dtype=torch.float64)
                          .view(3, 1, 1) + torch.diag(torch.tensor([0, 0, 1.0])).double()
                          * torch.tensor([0.0, -0.1, 0.1], dtype=torch.float64).view(3, 1, 1))
    q = tmp_path / "out" / "camera_params.json"
    write_nersemble_cameras(q, cams2)
    doc = json.loads(q.read_text())
    assert isinstance(doc["intrinsics"], dict) and set(doc["intrinsics"]) == set(a["names"])
    assert_same_cameras(read_nersemble_cameras(q, image_size=(3208, 2200)), cams2, atol=1e-9)
    with pytest.raises(ValueError, match="distortion"):
        write_nersemble_cameras(q, known_cameras(rng, V=2)[0])


def test_nersemble_errors(tmp_path):
    p = tmp_path / "camera_params.json"
    p.write_text(json.dumps({"intrinsics": np.eye(3).tolist()}))
    with pytest.raises(TempehDataError, match="'world_2_cam'"):
        read_nersemble_cameras(p, image_size=(8, 6))
    M = np.eye(4)
    M[3, 3] = 2
    p.write_text(json.dumps({"world_2_cam": {"a": M.tolist()}, "intrinsics": np.eye(3).tolist()}))
    with pytest.raises(TempehDataError, match="last row"):
        read_nersemble_cameras(p, image_size=(8, 6))
    p.write_text(json.dumps({"world_2_cam": {"a": np.eye(4).tolist()},
                             "intrinsics": {"b": np.eye(3).tolist()}}))
    with pytest.raises(TempehDataError, match="intrinsics.a"):
        read_nersemble_cameras(p, image_size=(8, 6))


# ----------------------------------------------------------------------------- Multiface KRT
def _krt_text(cams: Cameras) -> str:
    """The KRT layout as documented (name, K rows, distortion, [R|t] rows, blank line)."""
    a = cams.numpy()
    out = []
    for i, n in enumerate(a["names"]):
        out.append(n)
        out += [" ".join(f"{v:.17g}" for v in row) for row in a["K"][i]]
        out.append(" ".join(f"{v:.17g}" for v in a["dist"][i]))
        RT = np.concatenate([a["R"][i], a["t"][i][:, None]], 1)
        out += [" ".join(f"{v:.17g}" for v in row) for row in RT]
        out.append("")
    return "\n".join(out) + "\n"


def test_multiface_krt_fixture_and_round_trip(tmp_path, rng):
    cams, eyes = known_cameras(rng, V=3, W=1334, H=2048, names=["400002", "400004", "400007"])
    p = tmp_path / "KRT"
    p.write_text(_krt_text(cams))
    with pytest.raises(TempehDataError, match="image_size"):
        read_multiface_krt(p)
    got = read_multiface_krt(p, image_size=(1334, 2048))
    assert_same_cameras(got, cams, atol=1e-12)
    np.testing.assert_allclose(got.centers().numpy(), eyes, atol=1e-9)
    sizes = {"400002": (1334, 2048), "400004": (2048, 1334), "400007": (667, 1024)}
    got2 = read_multiface_krt(p, image_size=sizes)
    assert got2.width.tolist() == [1334, 2048, 667]
    q = tmp_path / "KRT_out"
    write_multiface_krt(q, cams)
    assert_same_cameras(read_multiface_krt(q, image_size=(1334, 2048)), cams, atol=0)


def test_multiface_krt_errors(tmp_path, rng):
    cams, _ = known_cameras(rng, V=2, names=["a", "b"])
    lines = _krt_text(cams).splitlines()
    p = tmp_path / "KRT"
    p.write_text("\n".join(lines[:-2]) + "\n")  # second block loses its last [R|t] row
    with pytest.raises(TempehDataError, match="truncated block for camera 'b'") as ei:
        read_multiface_krt(p, image_size=(16, 12))
    assert ei.value.line == 17
    bad = list(lines)
    bad[2] = "0 abc 1"
    p.write_text("\n".join(bad) + "\n")
    with pytest.raises(TempehDataError, match="non-numeric") as ei:
        read_multiface_krt(p, image_size=(16, 12))
    assert ei.value.line == 3
    bad = list(lines)
    bad[6] = "1 0 0"
    p.write_text("\n".join(bad) + "\n")
    with pytest.raises(TempehDataError, match="expected 4 numbers") as ei:
        read_multiface_krt(p, image_size=(16, 12))
    assert ei.value.line == 7


# ----------------------------------------------------------------------------- 3dMD .tka
TKA_REC = dict(center=(312.5, 180.25, 905.0), f=16.0, kappa1=-4.0e-4, kappa2=1.5e-6,
               pixel=(0.0074, 0.0075), pp=(806.25, 598.5), size=(1600, 1200))


def _tka_rotation():
    eye = torch.tensor(TKA_REC["center"], dtype=torch.float64)
    return look_at_rotation(eye, torch.zeros(3, dtype=torch.float64),
                            torch.tensor([0.1, 1.0, 0.0], dtype=torch.float64)).numpy()


def _tka_text(R, eol="\n", labels=True) -> str:
    """A .tka file following the documented positional layout (TEMPEH-FACTS 2.2)."""
    r = TKA_REC
    lab = (lambda s: s) if labels else (lambda s: "")
    rows = [" ".join(f"{v:.17g}" for v in row) + " " for row in R]
    lines = ["3dMD calibration test fixture"] + rows + [
        lab("X: ") + f"{r['center'][0]}", lab("Y: ") + f"{r['center'][1]}",
        lab("Z: ") + f"{r['center'][2]}", lab("f: ") + f"{r['f']}", lab("K: ") + f"{r['kappa1']}",
        lab("K2: ") + f"{r['kappa2']}", lab("S: ") + "1.0", lab("x: ") + f"{r['pixel'][0]}",
        lab("y: ") + f"{r['pixel'][1]}", lab("a: ") + f"{r['pp'][0]}",
        lab("b: ") + f"{r['pp'][1]}", lab("is: ") + f"{r['size'][0]} {r['size'][1]}",
        lab("c: ") + "0.0"]
    return eol.join(lines) + eol


def tsai_undistort_px(uv: np.ndarray) -> np.ndarray:
    """Independent Tsai model on pixels: sensor mm -> (1 + k1 r^2 + k2 r^4) -> pixels."""
    r = TKA_REC
    X = (uv[:, 0] - r["pp"][0]) * r["pixel"][0]
    Y = (uv[:, 1] - r["pp"][1]) * r["pixel"][1]
    r2 = X * X + Y * Y
    s = 1 + r["kappa1"] * r2 + r["kappa2"] * r2 * r2
    return np.stack([r["pp"][0] + X * s / r["pixel"][0], r["pp"][1] + Y * s / r["pixel"][1]], 1)


@pytest.mark.parametrize("eol, labels", [("\n", True), ("\r\n", True), ("\n", False)])
def test_tka_fixture_reads_known_camera(tmp_path, eol, labels):
    R = _tka_rotation()
    p = tmp_path / "26_B.tka"
    p.write_bytes(_tka_text(R, eol, labels).encode())
    cams = read_tka(p)
    r = TKA_REC
    assert cams.names == ("26_B",) and cams.batch_shape == (1,)
    assert cams.width.tolist() == [1600] and cams.height.tolist() == [1200]
    K = np.array([[r["f"] / r["pixel"][0], 0, r["pp"][0]], [0, r["f"] / r["pixel"][1], r["pp"][1]],
                  [0, 0, 1]])
    np.testing.assert_allclose(cams.K[0].numpy(), K, rtol=1e-15)
    np.testing.assert_allclose(cams.R[0].numpy(), R, atol=1e-15)
    np.testing.assert_allclose(cams.t[0].numpy(), -R @ np.array(r["center"]), atol=1e-9)
    np.testing.assert_allclose(cams.centers()[0].numpy(), r["center"], atol=1e-9)
    assert cams.dist[0, 2:].abs().max() == 0  # no tangential terms in the tka model
    rec = parse_tka(p)
    assert rec.header == "3dMD calibration test fixture" and rec.s == 1.0 and rec.c == 0.0


def test_tka_distortion_undone_by_tsai(tmp_path):
    """A point distorted by our fitted OpenCV model is undone by the Tsai model over the image."""
    p = tmp_path / "23_A.tka"
    p.write_text(_tka_text(_tka_rotation()))
    rec = parse_tka(p)
    cams, residual = tka_to_cameras(rec, "23_A")
    W, H = TKA_REC["size"]
    # pixels over the whole image (corners included) -> world points on their rays
    uu, vv = np.meshgrid(np.linspace(-0.5, W - 0.5, 41), np.linspace(-0.5, H - 0.5, 31))
    uv = torch.from_numpy(np.stack([uu.ravel(), vv.ravel()], 1))[None]
    o, d = cams.pixel_rays(uv)
    pts = o + 950.0 * d
    uv_d, _ = cams.project(pts)  # our model: distorted pixels
    uv_u, _ = cams._replace(dist=torch.zeros_like(cams.dist)).project(pts)  # ideal pinhole
    err = np.abs(tsai_undistort_px(uv_d[0].numpy()) - uv_u[0].numpy()).max()
    shift = (uv_d - uv_u).abs().max().item()
    assert shift > 5.0  # the lens really distorts (several pixels at the corners)
    assert err < 0.05
    assert residual < 0.05 and err <= residual * 1.05 + 1e-4  # the reported residual bounds it
    # resizing is Cameras.resize: distortion unchanged, same fitted coefficients at any size
    small = cams.resize(0.25)
    assert torch.equal(small.dist, cams.dist)


def test_tsai_fit_uses_unresized_focal_length():
    r = TKA_REC
    k1, k2, res = tsai_to_opencv_radial(r["kappa1"], r["kappa2"], r["f"], r["pixel"], r["pp"],
                                        r["size"])
    # first-order inverse of x_u = x_d (1 + K1 r^2): k1 ~ -K1 with K1 = kappa1 f^2
    assert abs(k1 + r["kappa1"] * r["f"] ** 2) < 0.05 * abs(r["kappa1"] * r["f"] ** 2)
    # the reference divides f by the resize factor (4 for refinement): 16x weaker k1
    k1_bug, _, _ = tsai_to_opencv_radial(r["kappa1"], r["kappa2"], r["f"] / 4,
                                         (r["pixel"][0] / 4, r["pixel"][1] / 4), r["pp"],
                                         r["size"])
    assert abs(k1_bug) < abs(k1) / 10
    # no distortion -> exactly zero
    assert tsai_to_opencv_radial(0.0, 0.0, 16.0, (0.0074, 0.0074), (800, 600), (1600, 1200)) \
        == (0.0, 0.0, 0.0)


def test_tka_writer_round_trip(tmp_path, rng):
    cams, _ = known_cameras(rng, V=1, names=["27_A"])
    cams = cams._replace(dist=torch.tensor([[-0.08, 0.02, 0.0, 0.0, 0.0]], dtype=torch.float64))
    rec, res_w = camera_to_tka(cams)
    p = tmp_path / "27_A.tka"
    write_tka(p, rec)
    assert len(p.read_text().splitlines()) == 17
    back = read_tka(p)
    for f in ("K", "R", "t", "width", "height"):
        np.testing.assert_allclose(getattr(back, f).numpy(), getattr(cams, f).numpy(),
                                   atol=1e-9, err_msg=f)
    assert back.names == ("27_A",)
    # two fits (OpenCV -> Tsai -> OpenCV): projections agree over the image
    o, d = cams.pixel_rays(torch.from_numpy(rng.uniform([-0.5, -0.5], [1599.5, 1199.5],
                                                        size=(1, 200, 2))))
    pts = o + 900 * d
    assert (back.project(pts)[0] - cams.project(pts)[0]).abs().max() < 0.05
    assert res_w < 0.05
    rec2 = parse_tka(p)
    np.testing.assert_allclose(rec2.center, rec.center, atol=0)
    assert rec2.kappa1 == rec.kappa1 and rec2.pixel_size == rec.pixel_size
    with pytest.raises(ValueError, match="tangential"):
        camera_to_tka(cams._replace(dist=torch.tensor([[0, 0, 1e-3, 0, 0.0]]).double()))


@pytest.mark.parametrize("edit, line, match", [
    (lambda L: L[:10], 11, "truncated"),
    (lambda L: L[:8] + ["K: abc"] + L[9:], 9, "non-numeric"),
    (lambda L: L[:7] + ["f: nan"] + L[8:], 8, "non-finite"),
    (lambda L: L[:2] + ["0.5 0.5"] + L[3:], 3, "expected 3"),
    (lambda L: L[:15] + ["is: 1600"] + L[16:], 16, "expected 2"),
    (lambda L: L[:15] + ["is: 1600.5 1200"] + L[16:], 16, "integers"),
    (lambda L: L[:1] + ["2 0 0 "] + L[2:], 2, "not a rotation"),
    (lambda L: L[:11] + ["x: -0.0074"] + L[12:], 12, "pixel size"),
])
def test_tka_errors_name_the_line(tmp_path, edit, line, match):
    lines = _tka_text(_tka_rotation()).splitlines()
    p = tmp_path / "bad.tka"
    p.write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(TempehDataError, match=match) as ei:
        read_tka(p)
    assert ei.value.line == line
    assert str(ei.value).startswith(f"{p}:{line}: ")


# ----------------------------------------------------------------------------- folders
def test_read_calibration_dir_tka_sorted(tmp_path, rng):
    R = _tka_rotation()
    for n in ["30_B", "23_A", "24_A"]:
        (tmp_path / f"{n}.tka").write_text(_tka_text(R))
    (tmp_path / "notes.txt").write_text("not a calibration")
    cams = read_calibration_dir(tmp_path)
    assert cams.names == ("23_A", "24_A", "30_B") and cams.batch_shape == (3,)
    assert_same_cameras(cams[1:2], read_tka(tmp_path / "24_A.tka"), atol=0)


def test_read_calibration_dir_opencv_and_cameras_json(tmp_path, rng):
    cams, _ = known_cameras(rng, V=3, names=["b", "a", "c"])
    for i in range(3):
        write_opencv_calibration(tmp_path / f"{cams.names[i]}.yaml", cams[i:i + 1])
    got = read_calibration_dir(tmp_path)
    assert got.names == ("a", "b", "c")
    assert_same_cameras(got, cams[[1, 0, 2]], atol=1e-12)
    # cameras.json wins over per-camera files, keeping its own order
    write_cameras_json(tmp_path / "cameras.json", cams)
    assert read_calibration_dir(tmp_path).names == ("b", "a", "c")


def test_read_calibration_dir_errors(tmp_path, rng):
    with pytest.raises(TempehDataError, match="not found"):
        read_calibration_dir(tmp_path / "missing")
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(TempehDataError, match="no calibration") as ei:
        read_calibration_dir(tmp_path)
    assert ei.value.path == tmp_path
    (tmp_path / "23_A.tka").write_text(_tka_text(_tka_rotation()))
    cams, _ = known_cameras(rng, V=1)
    write_opencv_calibration(tmp_path / "24_A.yaml", cams)
    with pytest.raises(TempehDataError, match="mixed"):
        read_calibration_dir(tmp_path)
    (tmp_path / "24_A.yaml").unlink()
    (tmp_path / "23_A.tka").write_text("header\n1 0 0 \n")
    with pytest.raises(TempehDataError) as ei:
        read_calibration_dir(tmp_path)
    assert ei.value.path == tmp_path / "23_A.tka" and ei.value.line == 3
