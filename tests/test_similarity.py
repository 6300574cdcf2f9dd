"""Batched torch similarity fit: exact recovery of known transforms (scipy's Rotation as the
reference), a proper rotation for mirrored data, the rigid variant, and agreement with the numpy
fit of tempeh.fitting.rigid on noisy data."""
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from tempeh.fitting.rigid import similarity_from_correspondences
from tempeh.geometry.similarity import fit_similarity


def test_recovers_known_similarities():
    rng = np.random.default_rng(0)
    B, N = 4, 50
    src = rng.normal(size=(B, N, 3)) * [80.0, 100.0, 60.0]
    R = Rotation.random(B, random_state=1).as_matrix()
    s = np.array([0.5, 1.0, 1.3, 2.0])
    t = rng.normal(size=(B, 3)) * 200.0
    dst = s[:, None, None] * np.einsum("bij,bnj->bni", R, src) + t[:, None]
    fs, fR, ft = fit_similarity(torch.from_numpy(src), torch.from_numpy(dst))
    np.testing.assert_allclose(fs.numpy(), s, rtol=1e-10)
    np.testing.assert_allclose(fR.numpy(), R, atol=1e-10)
    np.testing.assert_allclose(ft.numpy(), t, atol=1e-8)
    # float32 in, float32 out (computed in float64)
    fs32, _, _ = fit_similarity(torch.from_numpy(src).float(), torch.from_numpy(dst).float())
    assert fs32.dtype == torch.float32
    np.testing.assert_allclose(fs32.numpy(), s, rtol=1e-5)
    # rigid: s = 1 and the rotation of a scaled copy is still found
    _, rR, _ = fit_similarity(torch.from_numpy(src), torch.from_numpy(dst), with_scale=False)
    np.testing.assert_allclose(rR.numpy(), R, atol=1e-10)


def test_mirrored_data_gives_a_proper_rotation_and_matches_numpy_on_noise():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(1, 40, 3)) * 50.0
    mirrored = src * [-1.0, 1.0, 1.0]
    _, R, _ = fit_similarity(torch.from_numpy(src), torch.from_numpy(mirrored))
    assert abs(float(torch.linalg.det(R[0])) - 1.0) < 1e-12
    dst = 1.1 * src @ Rotation.from_euler("yxz", [30, -10, 5], degrees=True).as_matrix().T + 7.0
    dst = dst + rng.normal(size=dst.shape) * 5.0
    fs, fR, ft = fit_similarity(torch.from_numpy(src), torch.from_numpy(dst))
    ref = similarity_from_correspondences(src[0], dst[0])
    np.testing.assert_allclose(fs.numpy()[0], ref.scale, rtol=1e-10)
    np.testing.assert_allclose(fR.numpy()[0], ref.R, atol=1e-10)
    np.testing.assert_allclose(ft.numpy()[0], ref.t, atol=1e-8)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        fit_similarity(torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="N >= 3"):
        fit_similarity(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="zero spread"):
        fit_similarity(torch.ones(1, 5, 3), torch.rand(1, 5, 3))
