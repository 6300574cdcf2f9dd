"""Tests for tempeh.geometry.rotations against scipy and analytic cases."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from tempeh.geometry.rotations import (
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_rot6d,
    quaternion_to_matrix,
    random_rotations,
    rot6d_to_matrix,
)


def _check_so3(R, atol=1e-6):
    eye = torch.eye(3, dtype=R.dtype).expand(R.shape)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=atol)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=atol)


def test_rot6d_gram_schmidt_rows_and_batch_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    R = rot6d_to_matrix(x)
    assert R.shape == (2, 3, 5, 3, 3)
    _check_so3(R, 1e-10)
    # Row 0 is the normalised first 3-vector; row 1 lies in span(a1, a2) (naive Gram-Schmidt).
    a1, a2 = x[..., :3].numpy(), x[..., 3:].numpy()
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - (b1 * a2).sum(-1, keepdims=True) * b1
    b2 /= np.linalg.norm(b2, axis=-1, keepdims=True)
    np.testing.assert_allclose(R[..., 0, :].numpy(), b1, atol=1e-12)
    np.testing.assert_allclose(R[..., 1, :].numpy(), b2, atol=1e-12)
    np.testing.assert_allclose(R[..., 2, :].numpy(), np.cross(b1, b2), atol=1e-12)


def test_rot6d_round_trip():
    R = torch.from_numpy(Rotation.random(50, random_state=1).as_matrix())
    x = matrix_to_rot6d(R)
    assert x.shape == (50, 6)
    np.testing.assert_allclose(x.numpy(), R[:, :2, :].reshape(50, 6).numpy())
    np.testing.assert_allclose(rot6d_to_matrix(x).numpy(), R.numpy(), atol=1e-12)
    # and 6D -> R -> 6D is a projection: idempotent after the first pass
    y = matrix_to_rot6d(rot6d_to_matrix(torch.randn(7, 6, dtype=torch.float64)))
    np.testing.assert_allclose(matrix_to_rot6d(rot6d_to_matrix(y)).numpy(), y.numpy(), atol=1e-12)


def test_rot6d_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rot6d_to_matrix, (x,))


def test_rot6d_bad_shape():
    with pytest.raises(ValueError):
        rot6d_to_matrix(torch.zeros(3, 5))


def test_axis_angle_against_scipy_and_at_zero():
    rng = np.random.default_rng(2)
    aa = rng.normal(size=(40, 3)) * rng.uniform(0, 3, size=(40, 1))
    aa[0] = 0.0
    aa[1] = [1e-5, -2e-5, 3e-6]  # tiny angle: Taylor branch
    R = axis_angle_to_matrix(torch.from_numpy(aa))
    np.testing.assert_allclose(R.numpy(), Rotation.from_rotvec(aa).as_matrix(), atol=1e-12)
    _check_so3(R, 1e-10)
    # finite, correct gradient at exactly zero: d(R)/d(aa_z)[1,0] = +1 (R ~ I + [aa]_x)
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    axis_angle_to_matrix(z)[1, 0].backward()
    np.testing.assert_allclose(z.grad.numpy(), [0.0, 0.0, 1.0])
    x = torch.tensor([[0.3, -0.2, 0.5], [1e-4, 2e-4, -1e-4]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (x,))


def test_quaternion_against_scipy():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(20, 4))
    R = quaternion_to_matrix(torch.from_numpy(q))
    # scipy is scalar-last (x, y, z, w)
    np.testing.assert_allclose(R.numpy(), Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix(), atol=1e-12)


def test_euler_against_scipy_and_directions():
    rng = np.random.default_rng(5)
    ypr = rng.uniform(-math.pi, math.pi, size=(30, 3))
    R = euler_to_matrix(*torch.from_numpy(ypr).unbind(-1))
    assert R.dtype == torch.float64 and R.shape == (30, 3, 3)
    np.testing.assert_allclose(R.numpy(), Rotation.from_euler("YXZ", ypr).as_matrix(), atol=1e-12)
    # documented directions: yaw turns +z towards +x, pitch turns +z towards -y, roll +x towards +y
    a = 0.3
    fz = euler_to_matrix(a, 0.0, 0.0).double() @ torch.tensor([0.0, 0, 1], dtype=torch.float64)
    assert fz[0] > 0.29 and abs(fz[1]) < 1e-6
    fz = euler_to_matrix(0.0, a, 0.0).double() @ torch.tensor([0.0, 0, 1], dtype=torch.float64)
    assert fz[1] < -0.29 and abs(fz[0]) < 1e-6
    fx = euler_to_matrix(0.0, 0.0, a).double() @ torch.tensor([1.0, 0, 0], dtype=torch.float64)
    assert fx[1] > 0.29 and abs(fx[2]) < 1e-6
    # broadcasting a scalar with a vector
    assert euler_to_matrix(torch.zeros(4), 0.1, 0.0).shape == (4, 3, 3)


def test_random_rotations_uniform_and_reproducible():
    g = torch.Generator().manual_seed(7)
    R = random_rotations(20000, generator=g, dtype=torch.float64)
    assert R.shape == (20000, 3, 3) and R.dtype == torch.float64
    _check_so3(R, 1e-10)
    # Haar measure: E[R] = 0 (std of each entry's mean ~ sqrt(1/3 / n) ~ 0.004)
    assert R.mean(0).abs().max() < 0.02
    # E[R_ij^2] = 1/3; trace distribution: E[tr R] = 0, E[tr R^2]... check angle density:
    # P(angle <= pi/2) = (theta - sin theta)/pi at pi/2 = (pi/2 - 1)/pi ~ 0.1817
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    angle = torch.arccos(((tr - 1) / 2).clamp(-1, 1))
    frac = (angle <= math.pi / 2).double().mean().item()
    assert abs(frac - (math.pi / 2 - 1) / math.pi) < 0.01
    np.testing.assert_allclose((R ** 2).mean(0).numpy(), np.full((3, 3), 1 / 3), atol=0.01)
    R2 = random_rotations(20000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    np.testing.assert_array_equal(R2.numpy(), R.numpy())
    R3 = random_rotations(20000, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert not torch.equal(R3, R)
    assert random_rotations(3).dtype == torch.float32
