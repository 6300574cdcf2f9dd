"""Temporal smoothing: analytic properties of the Gaussian filter over vertex trajectories."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from tempeh.eval.metrics import jitter
from tempeh.smoothing import expected_noise_jitter_ratio, gaussian_weights, smooth_sequence


def _linear(T=40, N=7, seed=0):
    rng = np.random.default_rng(seed)
    x0, vel = rng.normal(0, 50, (N, 3)), rng.normal(0, 2, (N, 3))
    return x0[None] + np.arange(T)[:, None, None] * vel[None]


def test_weights_normalised_and_symmetric():
    w = gaussian_weights(1.5)
    assert w.size == 2 * 6 + 1 and abs(w.sum() - 1) < 1e-12 and np.allclose(w, w[::-1])
    assert np.array_equal(gaussian_weights(0.0), [1.0])
    with pytest.raises(ValueError):
        gaussian_weights(-1.0)


def test_constant_velocity_unchanged_away_from_the_ends():
    x = _linear()
    sigma = 1.5
    r = gaussian_weights(sigma).size // 2
    y = smooth_sequence(x, sigma)  # reflect
    assert np.abs(y[r:-r] - x[r:-r]).max() < 1e-9
    assert np.abs(y[0] - x[0]).max() > 0.1  # the even reflection bends motion at the ends
    y_odd = smooth_sequence(x, sigma, mode="odd")  # point reflection keeps it everywhere
    assert np.abs(y_odd - x).max() < 1e-9


def test_matches_scipy_reflect():
    x = np.random.default_rng(1).normal(size=(9, 4, 3))
    for sigma in (1.0, 1.5, 5.0):  # 5.0: the kernel is longer than the sequence
        ref = gaussian_filter1d(x, sigma, axis=0, mode="reflect", truncate=4.0)
        assert np.abs(smooth_sequence(x, sigma) - ref).max() < 1e-12


def test_noise_jitter_drops_by_the_expected_factor():
    rng = np.random.default_rng(2)
    T, N, sigma = 400, 500, 1.0
    noise = rng.normal(0, 0.5, (T, N, 3))
    x = _linear(T, N) + noise
    y = smooth_sequence(x, sigma)
    r = gaussian_weights(sigma).size // 2
    # interior frames only (the ends follow the reflection); the linear motion adds no jitter
    before = jitter(x[r:-r])
    after = jitter(y[r:-r])
    want = expected_noise_jitter_ratio(sigma)
    assert 0.05 < want < 0.3
    assert abs(after / before - want) / want < 0.03
    assert jitter(y) < jitter(x)


def test_identity_cases_and_vertex_weights():
    x = np.random.default_rng(3).normal(size=(5, 6, 3))
    assert np.array_equal(smooth_sequence(x, 0.0), x)
    assert np.array_equal(smooth_sequence(x[:1], 2.0), x[:1])
    w = np.zeros(6)
    w[:3] = 1.0
    y = smooth_sequence(x, 1.0, vertex_weights=w)
    assert np.array_equal(y[:, 3:], x[:, 3:])
    assert np.allclose(y[:, :3], smooth_sequence(x, 1.0)[:, :3])
    with pytest.raises(ValueError):
        smooth_sequence(x, 1.0, mode="wrap")
