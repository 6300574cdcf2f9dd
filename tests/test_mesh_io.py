"""Mesh, point, image and template I/O: real numbers against independent readers
(trimesh, cv2, hand-written files) and every documented error naming its file."""
import json
import os

import cv2
import numpy as np
import pytest
import trimesh

from tempeh.errors import TempehDataError
from tempeh.io.images import image_size, read_gray, write_png
from tempeh.io.mesh import atomic_write, read_mesh, read_points, write_mesh, write_points
from tempeh.io.templates import load_regions, load_template, load_template_dir, save_template_dir


def _tet():
    v = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, 30.0]])
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    return v, f


# ------------------------------------------------------------------ meshes
def test_flame_obj_matches_trimesh(flame_dir):
    path = flame_dir / "sampling_template.obj"
    v, f = read_mesh(path, units="m")
    ref = trimesh.load(path, process=False, maintain_order=True)
    assert v.shape == (5023, 3) and f.shape == (9976, 3)
    assert v.dtype == np.float64 and f.dtype == np.int64
    np.testing.assert_allclose(v, np.asarray(ref.vertices) * 1000.0, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(f, ref.faces)
    # bounding box from TEMPEH-FACTS section 8 (metres -> mm)
    np.testing.assert_allclose(v[:, 0].max(), 107.7, atol=0.05)
    np.testing.assert_allclose(v[:, 1].min(), -190.3, atol=0.05)


@pytest.mark.parametrize("suffix,double,atol", [(".ply", False, 2e-5), (".ply", True, 1e-12),
                                                (".obj", False, 1e-6)])
def test_write_read_roundtrip_and_trimesh_agrees(tmp_path, rng, suffix, double, atol):
    v = rng.uniform(-120, 120, size=(57, 3))
    f = rng.integers(0, 57, size=(40, 3))
    colors = rng.integers(0, 256, size=(57, 3)).astype(np.uint8)
    p = tmp_path / f"m{suffix}"
    write_mesh(p, v, f, units="m", vertex_colors=colors, double=double)
    v2, f2 = read_mesh(p, units="m")
    np.testing.assert_allclose(v2, v, rtol=0, atol=atol)
    np.testing.assert_array_equal(f2, f)
    ref = trimesh.load(p, process=False, maintain_order=True)  # independent parser, metres
    np.testing.assert_allclose(np.asarray(ref.vertices) * 1000.0, v, rtol=0, atol=atol)
    np.testing.assert_array_equal(ref.faces, f)
    if suffix == ".ply":
        np.testing.assert_array_equal(np.asarray(ref.visual.vertex_colors)[:, :3], colors)
    # the unit argument scales: the same file read as mm is 1000x smaller
    v3, _ = read_mesh(p, units="mm")
    np.testing.assert_allclose(v3 * 1000.0, v2, rtol=1e-12)
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temp files left


def test_ascii_ply_extra_properties_and_quads(tmp_path):
    text = """ply
format ascii 1.0
comment hand-written
element vertex 5
property float nx
property float x
property float y
property float z
property uchar red
element face 2
property uchar flags
property list uchar int vertex_indices
element edge 1
property int vertex1
property int vertex2
end_header
9 0 0 0 1
9 1 0 0 2
9 1 1 0 3
9 0 1 0 4
9 0.5 0.5 1 5
0 4 0 1 2 3
7 3 0 1 4
0 1
"""
    p = tmp_path / "a.ply"
    p.write_text(text)
    v, f = read_mesh(p, units="mm")
    np.testing.assert_array_equal(v, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 1]])
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [0, 1, 4]])  # quad fan + triangle


@pytest.mark.parametrize("encoding", ["binary", "ascii"])
def test_reads_ply_written_by_trimesh(tmp_path, rng, encoding):
    v = rng.normal(size=(40, 3))
    f = rng.integers(0, 40, size=(25, 3))
    colors = rng.integers(0, 256, size=(40, 4)).astype(np.uint8)
    m = trimesh.Trimesh(v, f, vertex_colors=colors, process=False)
    p = tmp_path / "t.ply"
    p.write_bytes(trimesh.exchange.ply.export_ply(m, encoding=encoding))
    v2, f2 = read_mesh(p, units="m")
    np.testing.assert_allclose(v2, v * 1000.0, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(f2, f)


def test_binary_big_endian_ply_with_extra_properties(tmp_path, rng):
    v = rng.normal(size=(30, 3))
    f = rng.integers(0, 30, size=(12, 3))
    vt = np.empty(30, dtype=[("x", ">f8"), ("y", ">f8"), ("z", ">f8"), ("quality", ">f4")])
    vt["x"], vt["y"], vt["z"], vt["quality"] = v[:, 0], v[:, 1], v[:, 2], 0.5
    ft = np.empty(12, dtype=[("n", "u1"), ("i", ">u4", (3,))])
    ft["n"], ft["i"] = 3, f
    head = ("ply\nformat binary_big_endian 1.0\nelement vertex 30\nproperty double x\n"
            "property double y\nproperty double z\nproperty float quality\n"
            "element face 12\nproperty list uchar uint vertex_indices\nend_header\n")
    p = tmp_path / "be.ply"
    p.write_bytes(head.encode() + vt.tobytes() + ft.tobytes())
    v2, f2 = read_mesh(p, units="mm")
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(f2, f)
    ref = trimesh.load(p, process=False, maintain_order=True)  # independent parser
    np.testing.assert_array_equal(np.asarray(ref.vertices), v2)


def test_obj_with_texture_indices_and_negative_indices(tmp_path):
    p = tmp_path / "t.obj"
    p.write_text("# c\nv 0 0 0\nv 1 0 0\nv 1 1 0\nvt 0 0\nvn 0 0 1\nf 1/1/1 2/1/1 3/1/1\n"
                 "v 0 1 0\nf -4//1 -2//1 -1//1\n")
    v, f = read_mesh(p, units="mm")
    assert v.shape == (4, 3)
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3]])


def test_mesh_errors_name_the_file(tmp_path):
    v, f = _tet()
    good = write_mesh(tmp_path / "good.ply", v, f, units="mm")
    with pytest.raises(TempehDataError, match="missing.ply.*not found"):
        read_mesh(tmp_path / "missing.ply")
    trunc = tmp_path / "trunc.ply"
    trunc.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(TempehDataError, match="trunc.ply.*truncated"):
        read_mesh(trunc)
    nan = tmp_path / "nan.obj"
    nan.write_text("v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(TempehDataError, match="nan.obj.*NaN"):
        read_mesh(nan)
    oor = tmp_path / "oor.obj"
    oor.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n")
    with pytest.raises(TempehDataError, match="oor.obj.*out of range"):
        read_mesh(oor)
    bad = tmp_path / "bad.obj"
    bad.write_text("v 0 0 0\nv 1 zero 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(TempehDataError, match=r"bad.obj:2: non-numeric"):
        read_mesh(bad)
    noply = tmp_path / "noply.ply"
    noply.write_text("hello\n")
    with pytest.raises(TempehDataError, match="noply.ply:1: not a PLY"):
        read_mesh(noply)
    with pytest.raises(TempehDataError, match=r"x.stl.*unsupported"):
        read_mesh(tmp_path / "x.stl")
    pts_only = write_points(tmp_path / "pts.ply", v)
    with pytest.raises(TempehDataError, match="pts.ply.*no faces"):
        read_mesh(pts_only)
    with pytest.raises(ValueError, match="unknown length unit"):
        read_mesh(good, units="inch")
    with pytest.raises(ValueError, match="NaN"):
        write_mesh(tmp_path / "w.ply", np.full((4, 3), np.nan), f)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "keep.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as fh:
            fh.write("new, half written")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


# ------------------------------------------------------------------ points
def test_points_roundtrip_and_errors(tmp_path, rng):
    pts = rng.uniform(-100, 100, size=(200, 3))
    for name in ("s.npy", "s.ply"):
        write_points(tmp_path / name, pts, units="mm")
        np.testing.assert_allclose(read_points(tmp_path / name, units="mm"), pts, atol=1e-4)
    # metres on disk -> mm in memory
    np.save(tmp_path / "m.npy", pts / 1000.0)
    np.testing.assert_allclose(read_points(tmp_path / "m.npy", units="m"), pts, rtol=1e-12)
    # obj vertices
    v, f = _tet()
    write_mesh(tmp_path / "t.obj", v, f, units="mm")
    np.testing.assert_allclose(read_points(tmp_path / "t.obj"), v)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TempehDataError, match="obj.npy"):
        read_points(tmp_path / "obj.npy")
    np.save(tmp_path / "shape.npy", np.zeros((10, 2)))
    with pytest.raises(TempehDataError, match=r"shape.npy.*\(N, 3\)"):
        read_points(tmp_path / "shape.npy")
    bad = pts.copy()
    bad[17, 1] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(TempehDataError, match="inf.npy.*index 17"):
        read_points(tmp_path / "inf.npy")
    raw = (tmp_path / "s.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TempehDataError, match="cut.npy"):
        read_points(tmp_path / "cut.npy")


# ------------------------------------------------------------------ images
def test_read_gray_against_cv2(tmp_path, rng):
    gray = rng.integers(0, 256, size=(7, 11), dtype=np.uint8)
    write_png(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(read_gray(tmp_path / "g.png"), gray)
    assert image_size(tmp_path / "g.png") == (11, 7)
    bgr = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "c.png", bgr)
    np.testing.assert_array_equal(read_gray(tmp_path / "c.png"),
                                  cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    g16 = np.array([[0, 257, 65535], [128 * 257, 1000, 65535]], dtype=np.uint16)
    write_png(tmp_path / "d.png", g16)
    np.testing.assert_array_equal(read_gray(tmp_path / "d.png"), [[0, 1, 255], [128, 4, 255]])
    cv2.imwrite(str(tmp_path / "b.bmp"), gray)  # non-PNG: size by decoding
    assert image_size(tmp_path / "b.bmp") == (11, 7)
    np.testing.assert_array_equal(read_gray(tmp_path / "b.bmp"), gray)


def test_image_errors_name_the_file(tmp_path, rng):
    write_png(tmp_path / "g.png", rng.integers(0, 256, size=(40, 30), dtype=np.uint8))
    data = (tmp_path / "g.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(TempehDataError, match="trunc.png.*truncated"):
        read_gray(tmp_path / "trunc.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(TempehDataError, match="junk.jpg.*cannot decode"):
        read_gray(tmp_path / "junk.jpg")
    with pytest.raises(TempehDataError, match="junk.jpg.*cannot decode"):
        image_size(tmp_path / "junk.jpg")
    with pytest.raises(TempehDataError, match="nope.png.*not found"):
        read_gray(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="uint8 or uint16"):
        write_png(tmp_path / "f.png", np.zeros((3, 3), np.float32))


# ------------------------------------------------------------------ templates
FLAME_REGION_SIZES = {
    "face": 1787, "scalp": 371, "neck": 253, "left_ear": 588, "right_ear": 588,
    "left_eyeball": 546, "right_eyeball": 546, "left_eye_region": 261, "right_eye_region": 261,
    "lips": 222, "nostrils": 96, "boundary": 114,
}


def test_load_flame_template(flame_dir, tmp_path):
    tpl = load_template(flame_dir / "sampling_template.obj", flame_dir / "vertex_masks2.npz",
                        units="m", name="flame")
    assert tpl.num_verts == 5023 and tpl.num_faces == 9976 and tpl.name == "flame"
    assert {k: len(v) for k, v in tpl.regions.items()} == FLAME_REGION_SIZES
    assert "vertex_count" not in tpl.regions
    # eyeball centre near (+-31.6, 21.9, 25.4) mm (TEMPEH-FACTS section 8)
    c = tpl.verts[tpl.regions["left_eyeball"]].mean(0)
    assert abs(abs(c[0]) - 31.6) < 2 and abs(c[1] - 21.9) < 2 and abs(c[2] - 25.4) < 3
    # folder round trip keeps everything exactly
    save_template_dir(tmp_path / "tpl", tpl, units="m")
    back = load_template_dir(tmp_path / "tpl")
    np.testing.assert_allclose(back.verts, tpl.verts, atol=1e-9)
    np.testing.assert_array_equal(back.faces, tpl.faces)
    assert back.name == "flame"
    for k in FLAME_REGION_SIZES:
        np.testing.assert_array_equal(back.regions[k], tpl.regions[k])


def test_tiny_template_dir_and_errors(tmp_path):
    v, f = _tet()
    d = tmp_path / "template"
    d.mkdir()
    write_mesh(d / "template.obj", v, f, units="mm")
    np.savez(d / "regions.npz", face=np.array([2, 0, 1]), scalp=np.array([3], np.int32),
             vertex_count=np.int64(4))
    (d / "template.json").write_text(json.dumps({"name": "tet", "units": "mm"}))
    tpl = load_template_dir(d)
    assert tpl.name == "tet"
    np.testing.assert_array_equal(tpl.verts, v)
    np.testing.assert_array_equal(tpl.regions["face"], [0, 1, 2])
    assert tpl.regions["scalp"].dtype == np.int64
    # without template.json: metres by default
    (d / "template.json").unlink()
    np.testing.assert_allclose(load_template_dir(d).verts, v * 1000.0)
    np.savez(d / "regions.npz", face=np.array([0, 1]), vertex_count=np.int64(5))
    with pytest.raises(TempehDataError, match="regions.npz.*vertex_count.*4 vertices"):
        load_template_dir(d)
    np.savez(d / "regions.npz", face=np.array([0, 9]))
    with pytest.raises(TempehDataError, match="regions.npz.*'face'.*9 out of range"):
        load_template_dir(d)
    np.savez(d / "regions.npz", face=np.array([0.5, 1.0]))
    with pytest.raises(TempehDataError, match="regions.npz.*'face'.*integer"):
        load_regions(d / "regions.npz")
    (d / "template.json").write_text(json.dumps({"units": "furlong"}))
    with pytest.raises(TempehDataError, match="template.json.*units"):
        load_template_dir(d)
    with pytest.raises(TempehDataError, match="no template.obj or template.ply"):
        load_template_dir(tmp_path)


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    """Outputs are readable by the group/others as the umask allows (not mkstemp's 0600)."""
    import os
    from tempeh.io.mesh import atomic_write
    mask = os.umask(0)
    os.umask(mask)
    p = tmp_path / "a" / "out.txt"
    with atomic_write(p, "w") as fh:
        fh.write("x")
    assert p.read_text() == "x"
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)
