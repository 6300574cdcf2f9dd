"""Variation model: identity, expressions, pose, eyeballs, sequences; on our head and on FLAME."""
import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from tempeh.synth.head import make_head_template
from tempeh.synth.variation import (EXPRESSIONS, FrameParams, VariationModel, VariationRanges)
from tempeh.template import Template


@pytest.fixture(scope="module")
def ours():
    return make_head_template("low")


def _load_flame(folder) -> Template:
    m = trimesh.load(folder / "sampling_template.obj", process=False)
    masks = np.load(folder / "vertex_masks2.npz", allow_pickle=False)
    regions = {k: masks[k] for k in masks.files if k != "vertex_count"}
    return Template(np.asarray(m.vertices) * 1000.0, np.asarray(m.faces), regions, "flame").validate()


@pytest.fixture(scope="module", params=["ours", "flame"])
def model(request, ours):
    if request.param == "ours":
        return request.param, VariationModel(ours)
    return request.param, VariationModel(_load_flame(request.getfixturevalue("flame_dir")))


def _edges(f):
    return np.unique(np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1), axis=0)


def _kabsch(a, b):
    """Best rigid map b ~ a @ R.T + t (naive SVD reference). Returns R, t, max residual."""
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    R = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    t = cb - ca @ R.T
    return R, t, np.linalg.norm(a @ R.T + t - b, axis=1).max()


def _eyeball(t: Template, name: str) -> np.ndarray:
    """Vertices of the mesh components (other than the face's) that the eyeball mask touches
    (FLAME's masks also hold a few eyelid vertices and miss a few eyeball vertices)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    e = _edges(t.faces)
    n = t.num_verts
    _, comp = connected_components(coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)))
    idx = t.regions[name]
    face_comp = np.bincount(comp).argmax()
    comps = np.setdiff1d(np.unique(comp[idx]), [face_comp])
    return np.nonzero(np.isin(comp, comps))[0]


def _rigid_part(t: Template) -> np.ndarray:
    """Cranium, ears and eyeballs: vertices no expression may move."""
    v = t.verts
    sc = t.regions["scalp"]
    idx = [sc[v[sc, 1] > 20.0], t.regions["left_ear"], t.regions["right_ear"]]
    idx += [_eyeball(t, k) for k in ("left_eyeball", "right_eyeball") if k in t.regions]
    return np.unique(np.concatenate(idx))


def _chin(t: Template) -> int:
    f = t.regions["face"]
    mid = f[np.abs(t.verts[f, 0]) < 12.0]
    return int(mid[np.argmin(t.verts[mid, 1])])


def test_jaw_open_moves_chin_by_request_and_keeps_cranium(model):
    _, m = model
    t = m.template
    subj = m.sample_subject(np.random.default_rng(3))
    base = m.apply(subj, FrameParams())
    for amount in (8.0, 20.0):
        out = m.apply(subj, FrameParams(expression={"jaw_open": amount}))
        d = np.linalg.norm(out - base, axis=1)
        assert abs(d[_chin(t)] - amount) < 0.5
        assert d[_rigid_part(t)].max() < 0.05
        assert d[t.regions["boundary"]].max() < 0.05
        # the chin goes down and back
        assert out[_chin(t), 1] < base[_chin(t), 1] - 0.5 * amount
    # the lower lip follows, the nose stays
    lips = t.regions["lips"]
    low_lip = lips[t.verts[lips, 1] < t.verts[lips, 1].mean() - 6.0]
    assert d[low_lip].max() > 10.0
    assert d[t.regions["nostrils"]].max() < 0.5


def test_jaw_opens_our_mouth_slit(ours):
    m = VariationModel(ours)
    subj = m.sample_subject(np.random.default_rng(0))
    out = m.apply(subj, FrameParams(expression={"jaw_open": 20.0}))
    base = m.apply_identity(subj)
    # twins: coincident slit vertices before, apart after
    from scipy.spatial import cKDTree
    lips = ours.regions["lips"]
    d, j = cKDTree(base[lips]).query(base[lips], k=2)
    twin = d[:, 1] < 1e-9
    a, b = lips[twin], lips[j[twin, 1]]
    gap = np.linalg.norm(out[a] - out[b], axis=1)
    assert gap.max() > 10.0


@pytest.mark.parametrize("name,region", [("smile", "lips"), ("pucker", "lips"),
                                         ("brow_raise", "face"), ("eye_close", "left_eye_region"),
                                         ("cheek_puff", "face")])
def test_expression_moves_its_region_only(model, name, region):
    _, m = model
    t = m.template
    subj = m.sample_subject(np.random.default_rng(4))
    base = m.apply(subj, FrameParams())
    out = m.apply(subj, FrameParams(expression={name: 1.0}))
    d = np.linalg.norm(out - base, axis=1)
    assert d[t.regions[region]].max() > 2.5
    far = np.r_[t.regions["scalp"][t.verts[t.regions["scalp"], 1] > 60.0],
                t.regions["left_ear"], t.regions["right_ear"], t.regions["boundary"]]
    assert d[far].max() < 0.5
    for eye in ("left_eyeball", "right_eyeball"):
        assert d[_eyeball(t, eye)].max() < 1e-9


def test_pose_is_rigid_on_cranium_and_blended_at_neck(model):
    _, m = model
    t = m.template
    subj = m.sample_subject(np.random.default_rng(5))
    base = m.apply(subj, FrameParams())
    yaw, pitch, roll = 40.0, -20.0, 10.0
    out = m.apply(subj, FrameParams(yaw=yaw, pitch=pitch, roll=roll))
    rigid = _rigid_part(t)
    R, tr, res = _kabsch(base[rigid], out[rigid])
    assert res < 0.1
    R_ref = Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_matrix()
    np.testing.assert_allclose(R, R_ref, atol=1e-6)
    moved = np.linalg.norm(out[rigid] - base[rigid], axis=1).mean()
    bnd = np.linalg.norm(out[t.regions["boundary"]] - base[t.regions["boundary"]], axis=1).max()
    assert moved > 30.0 and bnd < 0.05 * moved
    # translation moves every vertex by exactly t
    shift = np.array([30.0, -50.0, 90.0])
    out_t = m.apply(subj, FrameParams(yaw=yaw, pitch=pitch, roll=roll, translation=shift))
    np.testing.assert_allclose(out_t - out, np.broadcast_to(shift, out.shape), atol=1e-9)
    # yaw > 0 turns the face towards +x
    nose = t.regions["nostrils"]
    turned = m.apply(subj, FrameParams(yaw=30.0))
    assert turned[nose, 0].mean() > base[nose, 0].mean() + 20.0


def test_eyeballs_rigid_with_gaze(model):
    _, m = model
    t = m.template
    subj = m.sample_subject(np.random.default_rng(6))
    frame = FrameParams(expression={"eye_close": 0.7, "brow_raise": 1.0, "jaw_open": 10.0},
                        yaw=-25.0, pitch=12.0, roll=5.0, translation=np.array([5.0, 1.0, -3.0]),
                        gaze=np.array([10.0, -8.0]))
    out = m.apply(subj, frame)
    for eye in ("left_eyeball", "right_eyeball"):
        idx = _eyeball(t, eye)
        assert idx.size > 20
        d0 = np.linalg.norm(t.verts[idx][:, None] - t.verts[idx][None], axis=-1)
        d1 = np.linalg.norm(out[idx][:, None] - out[idx][None], axis=-1)
        np.testing.assert_allclose(d1, d0, atol=1e-6)
    # gaze rotates each eyeball about its own centre
    no_gaze = m.apply(subj, FrameParams(**{**frame.__dict__, "gaze": np.zeros(2)}))
    idx = _eyeball(t, "left_eyeball")
    np.testing.assert_allclose(out[idx].mean(0), no_gaze[idx].mean(0), atol=1e-3)
    assert np.abs(out[idx] - no_gaze[idx]).max() > 1.0


def test_identity_seeds_and_scale(model):
    _, m = model
    a = m.apply(m.sample_subject(np.random.default_rng(7)), FrameParams())
    b = m.apply(m.sample_subject(np.random.default_rng(7)), FrameParams())
    c = m.apply(m.sample_subject(np.random.default_rng(8)), FrameParams())
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 2.0
    ratio = np.ptp(a, axis=0) / np.ptp(m.template.verts, axis=0)
    assert np.all((ratio > 0.85) & (ratio < 1.15))
    assert np.all(np.isfinite(a))


def test_sequence_smooth_deterministic_in_range(model):
    _, m = model
    ranges = VariationRanges()
    seq = m.sample_sequence(np.random.default_rng(9), 40, ranges)
    seq2 = m.sample_sequence(np.random.default_rng(9), 40, ranges)
    assert len(seq) == 40
    assert [s.expression for s in seq] == [s.expression for s in seq2]
    curves = {n: np.array([s.expression[n] for s in seq]) for n in EXPRESSIONS}
    curves.update({n: np.array([getattr(s, n) for s in seq]) for n in ("yaw", "pitch", "roll")})
    widths = {n: np.ptp(ranges.expression[n]) for n in EXPRESSIONS}
    widths.update({"yaw": 120.0, "pitch": 60.0, "roll": 30.0})
    for n, c in curves.items():
        lo, hi = ranges.expression[n] if n in EXPRESSIONS else getattr(ranges, n)
        assert c.min() >= lo - 1e-9 and c.max() <= hi + 1e-9, n
        assert np.abs(np.diff(c, 2)).max() < 0.1 * widths[n], n
    tr = np.stack([s.translation for s in seq])
    assert np.abs(tr).max() <= 100.0 + 1e-9 and np.abs(np.diff(tr, 2, axis=0)).max() < 20.0
    assert np.ptp(curves["yaw"]) > 10.0                        # it actually moves
    subj = m.sample_subject(np.random.default_rng(10))
    verts = m.apply_sequence(subj, seq[:6])
    assert verts.shape == (6, m.template.num_verts, 3) and verts.dtype == np.float64
    np.testing.assert_array_equal(verts[3], m.apply(subj, seq[3]))
    assert np.all(np.isfinite(verts))


def test_edges_do_not_overstretch(model):
    name, m = model
    t = m.template
    e = _edges(t.faces)
    subj = m.sample_subject(np.random.default_rng(11))
    base = m.apply_identity(subj)
    l0 = np.linalg.norm(base[e[:, 0]] - base[e[:, 1]], axis=1)
    # FLAME has sub-millimetre edges at the mouth corners and lid margins, where opening the
    # mouth / closing the eyes by several mm necessarily stretches them: judge edges >= 1.5 mm;
    # edges touching the rim of the mouth opening (whose corners must tear open) are not judged
    ec = np.concatenate([t.faces[:, [0, 1]], t.faces[:, [1, 2]], t.faces[:, [2, 0]]])
    u, cnt = np.unique(np.sort(ec, axis=1), axis=0, return_counts=True)
    rim = np.setdiff1d(np.unique(u[cnt == 1]), t.regions["boundary"])
    keep = (l0 >= (1.5 if name == "flame" else 0.0)) & ~np.isin(e, rim).any(1)
    frames = [FrameParams(expression={n: (25.0 if n == "jaw_open" else 1.0)}) for n in EXPRESSIONS]
    frames += [FrameParams(expression={"smile": -0.5, "brow_raise": -0.5}),
               FrameParams(yaw=60.0), FrameParams(yaw=-60.0), FrameParams(pitch=30.0),
               FrameParams(pitch=-30.0), FrameParams(roll=15.0),
               FrameParams(expression={"jaw_open": 15.0, "smile": 0.5}, yaw=-45.0, pitch=-20.0,
                           roll=10.0, gaze=np.array([15.0, 15.0]))]
    for fr in frames:
        out = m.apply(subj, fr)
        assert np.all(np.isfinite(out))
        r = np.linalg.norm(out[e[:, 0]] - out[e[:, 1]], axis=1)[keep] / l0[keep]
        # FLAME: closing the eye pushes its lid-margin vertices (shallow and deep ones side by
        # side, 1-2 mm apart) over the eyeball; those edges reach ~2.1x
        assert r.max() < (2.25 if name == "flame" else 2.1), (fr, r.max())


def test_rejects_templates_without_regions(ours):
    bad = Template(ours.verts, ours.faces, {k: v for k, v in ours.regions.items() if k != "lips"})
    with pytest.raises(ValueError, match="lips"):
        VariationModel(bad)
    with pytest.raises(ValueError, match="unknown expression"):
        VariationModel(ours).apply(VariationModel(ours).sample_subject(np.random.default_rng(0)),
                                   FrameParams(expression={"frown": 1.0}))
