"""tools/visualize.py: overlay positions against cv2.projectPoints; overlay grid and turntable."""
import cv2
import numpy as np
import pytest

from tempeh.cli.visualize import draw_overlay, main, project_vertices, turntable
from tempeh.io.images import read_gray
from tempeh.io.layout import CaptureLayout


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    from tempeh.bench.data import write_tiny_capture

    return write_tiny_capture(tmp_path_factory.mktemp("vis") / "cap", num_frames=1, num_views=3,
                              width=64, height=48, scan_points=10)


def _mesh(capture):
    from tempeh.io.mesh import read_mesh

    return read_mesh(CaptureLayout(capture).registration_path(("subj1", "seqA", "000000")), units="m")


def test_overlay_pixels_are_cv2_projections(capture):
    from tempeh.data.dataset import load_views

    L = CaptureLayout(capture)
    fid = ("subj1", "seqA", "000000")
    names = L.frame_cameras(fid)
    imgs, cams = load_views(L, fid, names, 1.0, rotate_portrait=False)
    verts, _ = _mesh(capture)
    uv, z = project_vertices(verts, cams)
    c = cams.numpy()
    assert np.any(c["dist"] != 0)  # the rig has lens distortion
    for v in range(len(names)):
        rvec, _ = cv2.Rodrigues(c["R"][v])
        ref, _ = cv2.projectPoints(verts.reshape(-1, 1, 3), rvec, c["t"][v], c["K"][v], c["dist"][v])
        ref = ref.reshape(-1, 2)
        assert np.abs(uv[v] - ref).max() < 1e-3
        # drawn on a black image, the vertex pixels are exactly the rounded cv2 projections
        black = np.zeros_like(imgs[v])
        drawn = draw_overlay(black, uv[v], z[v], edges=None, radius=0)
        got = {(int(x), int(y)) for y, x in zip(*np.nonzero(drawn.any(-1)))}
        px = np.round(ref).astype(int)
        H, W = black.shape
        inside = (px[:, 0] >= 0) & (px[:, 0] < W) & (px[:, 1] >= 0) & (px[:, 1] < H)
        assert inside.sum() > 50
        assert got == {(int(a), int(b)) for a, b in px[inside]}


def test_cli_overlay_and_turntable(capture, tmp_path):
    from tempeh.io.mesh import write_mesh

    verts, faces = _mesh(capture)
    mesh = tmp_path / "pred.ply"
    write_mesh(mesh, verts, faces, units="m")
    out, tt = tmp_path / "ov.png", tmp_path / "tt.png"
    assert main(["--data", str(capture), "--frame", "subj1/seqA/000000", "--mesh", str(mesh),
                 "--out", str(out), "--turntable", str(tt), "--azimuths", "4", "--size", "32"]) == 0
    grid = cv2.imread(str(out))
    assert grid.shape == (2 * 48 + 3 * 4, 2 * 64 + 3 * 4, 3)  # 3 views in a 2x2 grid, 4 px gaps
    assert (grid[..., 1] > grid[..., 0] + 50).sum() > 100  # green wireframe drawn
    strip = read_gray(tt)
    assert strip.shape == (32, 4 * 32)
    for k in range(4):  # the sphere is centred in every view; corners are background
        view = strip[:, 32 * k:32 * (k + 1)]
        assert view[16, 16] > 100 and view[0, 0] == 0
    assert main(["--data", str(capture), "--frame", "subj1/seqA/000000", "--mesh",
                 str(tmp_path / "missing.ply"), "--out", str(out)]) == 1
    assert main(["--data", str(capture), "--frame", "bad", "--mesh", str(mesh), "--out", str(out)]) == 2


def test_turntable_shading_faces_the_camera():
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=3, radius=50.0)
    img = turntable(np.asarray(s.vertices), np.asarray(s.faces), azimuths=2, size=48)
    # head-light shading: brightest in the middle of the disc, darker at the silhouette
    assert img[24, 24] > img[24, 8] > 0
