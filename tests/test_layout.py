"""Capture layout paths, discovery, units from capture.json, cameras and data lists."""
import json

import numpy as np
import pytest
import torch

from tempeh.cameras import Cameras
from tempeh.errors import TempehDataError
from tempeh.io.calibration import write_cameras_json
from tempeh.io.images import write_png
from tempeh.io.layout import CaptureLayout, FrameId, frame_id, read_data_list, write_data_list
from tempeh.io.mesh import read_mesh, read_points, write_mesh, write_points
from tempeh.io.templates import save_template_dir
from tempeh.template import Template

FID = FrameId("FaMoS_180424_03335_TA", "high_smile", "000032")


def test_paths_follow_the_famos_layout(tmp_path):
    lay = CaptureLayout(tmp_path)
    s, q, f = FID
    assert lay.image_path(FID, "23_A") == tmp_path / "images" / s / q / f / f"{q}.{f}.23_A.png"
    assert lay.image_dir(FID) == tmp_path / "images" / s / q / f
    assert lay.calibration_dir(s, q) == tmp_path / "calibrations" / s / q
    assert lay.registration_path(FID) == tmp_path / "registrations" / s / q / f"{q}.{f}.ply"
    assert lay.gt_mesh_path(FID) == tmp_path / "gt_meshes" / s / q / f"{q}.{f}.ply"
    assert lay.scan_path(FID, ext="npy") == tmp_path / "scans" / s / q / f"{q}.{f}.npy"
    assert lay.template_dir == tmp_path / "template"
    assert lay.data_list_path("val") == tmp_path / "data_lists" / "val.json"
    assert (lay.mesh_units, lay.scan_units) == ("m", "mm")
    assert lay.image_path("a/b/c", "x", ext="bmp").name == "b.c.x.bmp"
    for bad in ("a/b", "a/../c", ("a", "b", 3), ("a", "", "c")):
        with pytest.raises(ValueError):
            frame_id(bad)
    with pytest.raises(ValueError):
        lay.data_list_path("../train")


def test_scan_lookup_order_and_missing(tmp_path, rng):
    lay = CaptureLayout(tmp_path)
    with pytest.raises(TempehDataError, match=r"high_smile.000032.\{ply,obj,npy\}.*no scan"):
        lay.scan_path(FID)
    assert lay.find_scan(FID) is None
    pts = rng.normal(size=(20, 3)) * 50
    write_points(lay.scan_path(FID, ext="npy"), pts)
    assert lay.scan_path(FID).suffix == ".npy"
    write_points(lay.scan_path(FID, ext="ply"), pts)
    assert lay.scan_path(FID).suffix == ".ply"  # documented order: ply, obj, npy
    np.testing.assert_allclose(read_points(lay.scan_path(FID), lay.scan_units), pts, atol=1e-4)
    with pytest.raises(ValueError):
        lay.scan_path(FID, ext="stl")


def test_capture_json_units(tmp_path):
    (tmp_path / "capture.json").write_text(json.dumps(
        {"units": {"scans": "m", "meshes": "mm"}, "image_ext": "jpg"}))
    lay = CaptureLayout(tmp_path)
    assert (lay.scan_units, lay.mesh_units, lay.image_ext) == ("m", "mm", "jpg")
    assert lay.image_path(FID, "c").suffix == ".jpg"
    v = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    write_mesh(lay.registration_path(FID), v, [[0, 1, 2]], units=lay.mesh_units)
    np.testing.assert_allclose(read_mesh(lay.registration_path(FID), lay.mesh_units)[0], v,
                               atol=1e-5)
    (tmp_path / "capture.json").write_text(json.dumps({"units": {"scans": "inch"}}))
    with pytest.raises(TempehDataError, match=r"capture.json.*units.scans"):
        CaptureLayout(tmp_path)
    (tmp_path / "capture.json").write_text(json.dumps({"unit": "m"}))
    with pytest.raises(TempehDataError, match=r"capture.json.*unknown key.*'unit'"):
        CaptureLayout(tmp_path)
    (tmp_path / "capture.json").write_text("{\n  \"units\": \n")
    with pytest.raises(TempehDataError, match=r"capture.json:3: invalid JSON"):
        CaptureLayout(tmp_path)


def _tiny_cams(names):
    V = len(names)
    K = torch.tensor([[50.0, 0, 15.5], [0, 50.0, 11.5], [0, 0, 1]]).expand(V, 3, 3)
    R = torch.eye(3).expand(V, 3, 3)
    t = torch.stack([torch.tensor([10.0 * i, 0.0, 1000.0]) for i in range(V)])
    return Cameras.create(K, R, t, 32, 24, names=names, dtype=torch.float64)


def test_discovery_cameras_and_template(tmp_path, rng):
    lay = CaptureLayout(tmp_path)
    frames = [FrameId("s2", "q", "000003"), FrameId("s1", "q", "000010"),
              FrameId("s1", "q", "000002")]
    for fid in frames:
        for cam in ("24_B", "23_A", "23_B"):
            write_png(lay.image_path(fid, cam), np.zeros((24, 32), np.uint8))
    (lay.image_dir(frames[0]) / "notes.txt").write_text("x")  # ignored
    (lay.image_dir(FrameId("s1", "q", "000009"))).mkdir(parents=True)  # empty: not a frame
    write_png(lay.image_dir(FrameId("s1", "q", "000011")) / "other.000011.23_A.png",
              np.zeros((2, 2), np.uint8))  # images of another sequence's name: not a frame
    assert lay.discover_frames() == sorted(frames)
    assert lay.frame_cameras(frames[0]) == ["23_A", "23_B", "24_B"]
    assert lay.frame_cameras(FrameId("s9", "q", "1")) == []

    cams = _tiny_cams(["23_A", "23_B", "24_B"])
    write_cameras_json(lay.calibration_dir("s1", "q") / "cameras.json", cams)
    got = lay.cameras_for(frames[1])
    assert got.names == ("23_A", "23_B", "24_B")
    np.testing.assert_allclose(got.t.numpy(), cams.t.numpy(), atol=1e-9)
    sel = lay.cameras_for(frames[1], cameras=["24_B", "23_A"])
    assert sel.names == ("24_B", "23_A")
    np.testing.assert_allclose(sel.t.numpy(), cams.t[[2, 0]].numpy(), atol=1e-9)
    with pytest.raises(TempehDataError, match=r"calibrations/s1/q.*'99_C'"):
        lay.cameras_for(frames[1], cameras=["99_C"])
    with pytest.raises(TempehDataError, match=r"calibrations/s2/q.*not found"):
        lay.cameras_for(frames[0])

    v = rng.normal(size=(6, 3)) * 50
    save_template_dir(lay.template_dir, Template(v, np.array([[0, 1, 2], [3, 4, 5]]),
                                                 {"face": np.array([0, 1])}, "tiny"))
    tpl = lay.load_template()
    assert tpl.name == "tiny" and tpl.num_verts == 6
    np.testing.assert_allclose(tpl.verts, v, atol=1e-9)


def test_data_list_roundtrip_and_errors(tmp_path, caplog):
    frames = [FID, FrameId("s", "q", "000001")]
    p = write_data_list(tmp_path / "lists" / "train.json", frames)
    raw = json.loads(p.read_text())
    assert raw == [list(FID), ["s", "q", "000001"]]
    back = read_data_list(p)
    assert back == frames and all(isinstance(f, FrameId) for f in back)

    def bad(content, pattern):
        q = tmp_path / "bad.json"
        q.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(TempehDataError, match=pattern):
            read_data_list(q)

    bad([["s", "q", "1"], ["s", "q", 32]], r"bad.json: entry 1: frame must be a string.*000032")
    bad([["s", "q"]], r"bad.json: entry 0: expected \[subject, sequence, frame\]")
    bad({"frames": []}, r"bad.json: a data list must be a JSON list")
    bad([["s", "..", "1"]], r"bad.json: entry 0: sequence '..'")
    bad('[["s", "q", "1"],\n ["s", "q" "2"]]', r"bad.json:2: invalid JSON")
    with pytest.raises(TempehDataError, match="nope.json: data list not found"):
        read_data_list(tmp_path / "nope.json")
    empty = write_data_list(tmp_path / "empty.json", [])
    assert read_data_list(empty) == []
    assert "empty" in caplog.text
