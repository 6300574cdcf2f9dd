"""Tests of tempeh.geometry.regions: override order, ring extension, FLAME reference figures."""
from collections import Counter

import numpy as np
import pytest
import torch
import trimesh

from tempeh.geometry.mesh_ops import unique_edges
from tempeh.geometry.regions import (COARSE_EDGE_WEIGHTS, EYEBALLS_ONLY_VERTEX_WEIGHTS,
                                     PRETRAIN_VERTEX_WEIGHTS, REFINE_EDGE_WEIGHTS,
                                     edge_vertex_weights, edge_weights, vertex_weights)


@pytest.fixture(scope="module")
def flame(flame_dir):
    m = trimesh.load(flame_dir / "sampling_template.obj", process=False)
    with np.load(flame_dir / "vertex_masks2.npz", allow_pickle=False) as z:
        regions = {k: z[k] for k in z.files if k != "vertex_count"}
    return np.asarray(m.faces, dtype=np.int64), len(m.vertices), regions


def _path_faces(n):
    """Triangle strip over vertices 0..n-1: faces (i, i+1, i+2). Graph distance from 0 to j is
    ceil(j / 2)."""
    i = np.arange(n - 2)
    return np.stack([i, i + 1, i + 2], axis=1)


def test_flame_eyeballs_only_vertex_weights(flame):
    faces, n, regions = flame
    w = vertex_weights(regions, EYEBALLS_ONLY_VERTEX_WEIGHTS, n).numpy()
    nz = np.nonzero(w)[0]
    np.testing.assert_array_equal(nz, np.arange(3931, 5023))
    assert set(np.unique(w)) == {0.0, 1.0}
    # the 12 stray eye-region vertices inside the eyeball masks are zeroed by eye_region
    stray = np.setdiff1d(np.concatenate([regions["left_eyeball"], regions["right_eyeball"]]),
                         np.arange(3931, 5023))
    assert stray.size == 12 and np.all(w[stray] == 0)
    assert np.all(vertex_weights(regions, PRETRAIN_VERTEX_WEIGHTS, n).numpy() == 1.0)


def test_flame_coarse_edge_vertex_histogram(flame):
    faces, n, regions = flame
    w = edge_vertex_weights(regions, COARSE_EDGE_WEIGHTS, faces, n).numpy()
    hist = dict(Counter(w.tolist()))
    assert hist == {1.0: 558, 1.5: 110, 2.0: 917, 3.0: 1398, 5.0: 228, 10.0: 732, 50.0: 1080}
    e = unique_edges(faces)
    ew = edge_weights(torch.from_numpy(w), e)
    assert ew.shape == (14995,)
    np.testing.assert_allclose(ew.numpy(), 0.5 * (w[e[:, 0]] + w[e[:, 1]]))
    wr = edge_vertex_weights(regions, REFINE_EDGE_WEIGHTS, faces, n).numpy()
    lips = regions["lips"]
    bnd = regions["boundary"]
    assert np.all(wr[bnd] == 10.0)
    assert np.all(wr[np.setdiff1d(lips, bnd)] == 10.0)
    assert np.all(w[np.setdiff1d(lips, bnd)] == 3.0)


def test_vertex_weights_override_order_small():
    regions = {"face": np.array([0, 1, 2, 3]), "lips": np.array([2, 3]),
               "boundary": np.array([3, 4]), "left_ear": np.array([1]),
               "right_ear": np.array([5])}
    w = vertex_weights(regions, {"boundary": 7.0, "face": 2.0, "lips": 5.0, "ears": 3.0}, 7,
                       default=0.5)
    # order face < ears < lips < boundary regardless of dict order
    np.testing.assert_array_equal(w.numpy(), [2.0, 3.0, 5.0, 7.0, 7.0, 3.0, 0.5])
    # groups absent from `weights` are not assigned
    w = vertex_weights(regions, {"lips": 4.0}, 7)
    np.testing.assert_array_equal(w.numpy(), [1, 1, 4, 4, 1, 1, 1])
    assert vertex_weights(regions, {"lips": 4.0}, 7, dtype=torch.float64).dtype == torch.float64


def test_edge_vertex_weights_ring_half_and_order():
    n = 12
    faces = _path_faces(n)  # distance from v to u = ceil(|u - v| / 2)
    regions = {"lips": np.array([0]), "boundary": np.array([11]), "face": np.arange(n),
               "neck": np.array([5])}
    # lips 3-ring of {0}: vertices 1..6 (distance <= 3) get 4/2; boundary 1-ring of {11}: 9, 10
    w = edge_vertex_weights(regions, {"face": 1.5, "lips": 4.0, "neck": 9.0, "boundary": 6.0},
                            faces, n).numpy()
    expect = np.array([4, 2, 2, 2, 2, 9, 2, 1.5, 1.5, 3, 3, 6], dtype=np.float64)
    np.testing.assert_array_equal(w, expect)
    # a later ring overrides an earlier region, even downwards: the boundary 1-ring of {4} is
    # {2, 3, 5, 6}, so lips vertex 2 drops from 8 to 2 / 2
    regions2 = {"lips": np.array([2]), "boundary": np.array([4])}
    w2 = edge_vertex_weights(regions2, {"lips": 8.0, "boundary": 2.0}, faces, n,
                             rings={"lips": 0, "boundary": 1}).numpy()
    np.testing.assert_array_equal(w2, [1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1])
    # torch faces work; groups missing from `rings` get no ring (lips: no ring here either)
    w3 = edge_vertex_weights(regions2, {"lips": 8.0, "boundary": 2.0}, torch.from_numpy(faces),
                             n, rings={"boundary": 1}).numpy()
    np.testing.assert_array_equal(w3, [1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1])


def test_edge_weights_mean():
    vw = torch.tensor([1.0, 3.0, 10.0])
    e = torch.tensor([[0, 1], [1, 2], [0, 2]])
    np.testing.assert_allclose(edge_weights(vw, e).numpy(), [2.0, 6.5, 5.5])
    with pytest.raises(ValueError, match="out of range"):
        edge_weights(vw, torch.tensor([[0, 3]]))


def test_errors_name_the_key():
    regions = {"face": np.array([0, 1])}
    with pytest.raises(ValueError, match="'eyes'"):
        vertex_weights(regions, {"eyes": 1.0}, 3)
    with pytest.raises(ValueError, match="'left_ear'"):
        vertex_weights(regions, {"ears": 2.0}, 3)
    # a missing group with the default weight changes nothing and is accepted
    np.testing.assert_array_equal(vertex_weights(regions, {"ears": 1.0, "face": 0.0}, 3).numpy(),
                                  [0, 0, 1])
    # ... and its present regions are still assigned (override order kept)
    half = {"face": np.array([0, 1]), "left_ear": np.array([1])}
    np.testing.assert_array_equal(vertex_weights(half, {"ears": 1.0, "face": 0.0}, 3).numpy(),
                                  [0, 1, 1])
    with pytest.raises(ValueError, match="'right_ear'"):
        vertex_weights(half, {"ears": 2.0}, 3)
    with pytest.raises(ValueError, match="'lips'"):
        edge_vertex_weights(regions, {"lips": 3.0}, np.array([[0, 1, 2]]), 3)
    with pytest.raises(ValueError, match="'face'.*out of range"):
        vertex_weights({"face": np.array([0, 5])}, {"face": 2.0}, 3)
    with pytest.raises(ValueError, match="'face'"):
        vertex_weights(regions, {"face": -1.0}, 3)
    with pytest.raises(ValueError, match="ring group 'ear'"):
        edge_vertex_weights(regions, {"face": 1.0}, np.array([[0, 1, 2]]), 3, rings={"ear": 1})
