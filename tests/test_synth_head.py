"""Procedural head template: sizes, topology, orientation, regions, symmetry."""
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from tempeh.synth.head import EYEBALL_RADIUS, make_head_template
from tempeh.template import REGION_NAMES


@pytest.fixture(scope="module", params=["low", "full"])
def head(request):
    return request.param, make_head_template(request.param)


def _edge_face_counts(faces):
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0, return_counts=True)


def _signed_volume(v, f):
    """Naive divergence-theorem volume of a closed, consistently oriented triangle mesh."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def test_vertex_counts_and_scale(head):
    res, t = head
    lo, hi = {"low": (1000, 1500), "full": (4500, 5500)}[res]
    assert lo <= t.num_verts <= hi
    t.validate()
    v = t.verts
    skin = np.setdiff1d(np.arange(t.num_verts), np.r_[t.regions["left_ear"], t.regions["right_ear"]])
    width = np.ptp(v[skin, 0])
    assert 130.0 < width < 175.0
    crown, chin = v[:, 1].max(), v[t.regions["face"], 1].min()
    assert 210.0 < crown - chin < 250.0
    # head centre (between the ears) near the origin; face towards +z; neck cut low
    ears = 0.5 * (v[t.regions["left_ear"]].mean(0) + v[t.regions["right_ear"]].mean(0))
    assert np.linalg.norm(ears) < 60.0
    assert v[t.regions["nostrils"], 2].mean() > 40.0 and v[t.regions["scalp"], 2].min() < -90.0
    assert v[t.regions["boundary"], 1].max() < -150.0


def test_deterministic():
    a, b = make_head_template("low"), make_head_template("low")
    np.testing.assert_array_equal(a.verts, b.verts)
    np.testing.assert_array_equal(a.faces, b.faces)
    for k in a.regions:
        np.testing.assert_array_equal(a.regions[k], b.regions[k])


def test_regions(head):
    _, t = head
    for name in REGION_NAMES:
        assert name in t.regions and t.regions[name].size > 0, name
    eyes = np.r_[t.regions["left_eyeball"], t.regions["right_eyeball"]]
    assert np.intersect1d(t.regions["left_eyeball"], t.regions["right_eyeball"]).size == 0
    for name in ("face", "scalp", "neck", "lips", "left_eye_region", "right_eye_region", "boundary"):
        assert np.intersect1d(eyes, t.regions[name]).size == 0, name
    assert np.intersect1d(t.regions["face"], t.regions["scalp"]).size == 0
    assert np.intersect1d(t.regions["left_ear"], t.regions["right_ear"]).size == 0
    v = t.verts
    # "left" is the subject's left = +x
    for side, sign in (("left", 1.0), ("right", -1.0)):
        for kind in ("ear", "eyeball", "eye_region"):
            assert np.all(sign * v[t.regions[f"{side}_{kind}"], 0] > 0.0), (side, kind)
    # ears protrude sideways beyond the rest of the head
    not_ear = np.setdiff1d(np.arange(t.num_verts), np.r_[t.regions["left_ear"], t.regions["right_ear"]])
    assert v[t.regions["left_ear"], 0].max() > v[not_ear, 0].max() + 8.0


def test_mesh_hygiene(head):
    _, t = head
    v, f = t.verts, t.faces
    assert np.unique(f).size == t.num_verts                     # every vertex used
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    assert area.min() > 0.05                                    # no degenerate triangles (mm^2)
    assert np.unique(np.sort(f, axis=1), axis=0).shape[0] == f.shape[0]
    _, counts = _edge_face_counts(f)
    assert counts.max() == 2                                    # manifold edges


def test_eyeballs_closed_outward_separate(head):
    _, t = head
    f = t.faces
    for name in ("left_eyeball", "right_eyeball"):
        idx = t.regions[name]
        inside = np.isin(f, idx)
        # a separate component: its faces use only its own vertices
        assert np.all(inside.all(1) | ~inside.any(1))
        ef = f[inside.all(1)]
        _, counts = _edge_face_counts(ef)
        assert np.all(counts == 2)                              # closed
        c = t.verts[idx].mean(0)
        r = np.linalg.norm(t.verts[idx] - c, axis=1)
        np.testing.assert_allclose(r, EYEBALL_RADIUS, atol=1e-9)
        vol = _signed_volume(t.verts - c, ef)
        assert vol > 0.0                                        # outward (CCW from outside)
        assert abs(vol - 4.0 / 3.0 * np.pi * EYEBALL_RADIUS ** 3) < 0.25 * vol


def test_cranium_normals_point_outwards(head):
    _, t = head
    v, f = t.verts, t.faces
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    centre = np.array([0.0, 0.0, -30.0])
    sc = t.regions["scalp"]
    cranium = np.isin(f, sc[v[sc, 1] > 20.0]).all(1)
    assert cranium.sum() > 50
    dots = np.einsum("ij,ij->i", n[cranium], v[f[cranium]].mean(1) - centre)
    assert np.all(dots > 0.0)


def test_open_boundaries_are_neck_loop_and_mouth_slit(head):
    _, t = head
    v, f = t.verts, t.faces
    edges, counts = _edge_face_counts(f)
    b = edges[counts == 1]
    g = coo_matrix((np.ones(len(b)), (b[:, 0], b[:, 1])), shape=(t.num_verts,) * 2)
    _, lab = connected_components(g, directed=False)
    bv = np.unique(b)
    comps = [bv[lab[bv] == k] for k in np.unique(lab[bv])]
    assert len(comps) == 2
    neck = [c for c in comps if np.isin(c, t.regions["boundary"]).all()]
    assert len(neck) == 1
    np.testing.assert_array_equal(np.sort(neck[0]), t.regions["boundary"])
    # a simple loop: every boundary vertex has exactly two boundary edges
    deg = np.bincount(b.ravel(), minlength=t.num_verts)
    assert np.all(deg[bv] == 2)
    # the other opening is the mouth slit: inside the lips, zero width, upper and lower rows are
    # different vertices that coincide in space except the two shared corners
    slit = [c for c in comps if c is not neck[0]][0]
    assert np.isin(slit, t.regions["lips"]).all()
    d, j = cKDTree(v[slit]).query(v[slit], k=2)
    twins = d[:, 1] < 1e-9
    assert twins.sum() == slit.size - 2
    assert np.ptp(v[slit, 0]) > 35.0


def test_left_right_symmetric(head):
    _, t = head
    mirrored = t.verts * np.array([-1.0, 1.0, 1.0])
    d, j = cKDTree(t.verts).query(mirrored)
    assert d.max() < 1e-6
    # regions mirror too (compared by position: the mouth slit has coincident twins)
    pairs = [("left_ear", "right_ear"), ("left_eyeball", "right_eyeball"),
             ("left_eye_region", "right_eye_region")]
    pairs += [(n, n) for n in ("face", "lips", "nostrils", "boundary", "scalp", "neck")]
    for a, b in pairs:
        assert t.regions[a].size == t.regions[b].size, (a, b)
        d, _ = cKDTree(t.verts[t.regions[b]]).query(mirrored[t.regions[a]])
        assert d.max() < 1e-6, (a, b)


def test_bad_resolution():
    with pytest.raises(ValueError, match="resolution"):
        make_head_template("medium")
