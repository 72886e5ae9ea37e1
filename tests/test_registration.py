"""Tests of nidask.estimation.registration: conventions, accuracy, determinism, registry."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import expit

from nidask.errors import InputError
from nidask.estimation.registration import (
    REGISTRATIONS,
    Registration,
    RigidRegistration,
    get_registration,
)
from nidask.geometry import (
    fov_center,
    framewise_displacement,
    motion_parameters,
    rigid_matrix,
    rigid_params,
)

SHAPE = (40, 40, 30)
NOISE = 0.02  # of the brightest tissue (intensity 1)
MAX_TRANSLATION_ERROR = 0.3  # mm
MAX_ROTATION_ERROR = 0.3  # degrees

# Ellipsoids in mm about the field-of-view centre: offset, radii, intensity, Euler angles.
ELLIPSOIDS = [
    ((0, 0, 0), (36, 40, 26), 1.0, (0.0, 0.0, 0.0)),  # head
    ((0, 0, 0), (31, 35, 22), -0.4, (0.0, 0.0, 0.0)),  # brain, darker than the scalp
    ((-10, 8, 3), (8, 14, 7), 0.8, (0.3, 0.1, 0.4)),
    ((12, 10, -4), (6, 10, 9), 0.6, (-0.2, 0.3, -0.5)),
    ((3, -18, 5), (12, 5, 6), -0.3, (0.1, -0.4, 0.2)),
    ((-6, -5, -10), (5, 5, 5), 0.5, (0.0, 0.0, 0.0)),
]


def oblique_affine() -> np.ndarray:
    """2.5 mm voxels, flipped x axis (LAS-like), oblique, origin far from the centre."""
    aff = np.eye(4)
    aff[:3, :3] = rigid_matrix([0, 0, 0, 0.12, -0.08, 0.2])[:3, :3] @ np.diag([-2.5, 2.5, 2.5])
    aff[:3, 3] = [60.0, -40.0, -25.0]
    return aff


def phantom_at(world: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Smooth anatomical-like intensity at world points (n, 3), defined analytically."""
    rel = world - center
    out = np.zeros(len(world))
    for offset, radii, value, angles in ELLIPSOIDS:
        rot = rigid_matrix([0, 0, 0, *angles])[:3, :3]
        local = (rel - offset) @ rot / np.asarray(radii, dtype=float)
        out += value * expit((1.0 - np.sqrt((local**2).sum(axis=1))) * 12.0)
    return out


def render(affine: np.ndarray, A: np.ndarray | None = None) -> np.ndarray:
    """The phantom on the grid; with ``A``, the image of a head that moved by ``A``.

    In the convention ``fixed(x) = moving(A @ x)``, so ``moving(y) = fixed(inv(A) @ y)``:
    evaluating the analytic phantom at ``inv(A) @ affine @ o`` avoids any resampling.
    """
    ijk = np.indices(SHAPE).reshape(3, -1).T.astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    if A is not None:
        inv = np.linalg.inv(A)
        world = world @ inv[:3, :3].T + inv[:3, 3]
    return phantom_at(world, fov_center(affine, SHAPE)).reshape(SHAPE).astype(np.float32)


def random_motion(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    params = np.r_[rng.uniform(-3, 3, 3), np.radians(rng.uniform(-3, 3, 3))]
    return rigid_matrix(params, center=center)


def errors(estimate: np.ndarray, truth: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    """Worst translation (mm) and rotation (degrees) error, about the FOV centre."""
    diff = motion_parameters(estimate, affine, SHAPE) - motion_parameters(truth, affine, SHAPE)
    return float(np.abs(diff[:3]).max()), float(np.abs(diff[3:]).max())


@pytest.fixture(scope="module")
def affine() -> np.ndarray:
    return oblique_affine()


@pytest.fixture(scope="module")
def fixed(affine) -> np.ndarray:
    return render(affine)


@pytest.fixture(scope="module")
def registration() -> RigidRegistration:
    return RigidRegistration()


# ---------------------------------------------------------------------- parameters


def test_rigid_matrix_params_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        params = np.r_[rng.uniform(-20, 20, 3), rng.uniform(-1.2, 1.2, 3)]
        center = rng.uniform(-50, 50, 3)
        for c in (None, center):
            A = rigid_matrix(params, center=c)
            assert A.shape == (4, 4) and A.dtype == np.float64
            np.testing.assert_allclose(A[:3, :3].T @ A[:3, :3], np.eye(3), atol=1e-12)
            np.testing.assert_allclose(np.linalg.det(A[:3, :3]), 1.0)
            np.testing.assert_allclose(rigid_params(A, center=c), params, atol=1e-10)
        # the same matrix described about another centre
        A = rigid_matrix(params, center=center)
        np.testing.assert_allclose(rigid_matrix(rigid_params(A)), A, atol=1e-10)


def test_rigid_matrix_convention():
    center = np.array([10.0, -5.0, 3.0])
    A = rigid_matrix([1.0, 2.0, 3.0, 0.0, 0.0, np.pi / 2], center=center)
    # the centre only translates; t is the displacement of the centre
    np.testing.assert_allclose(A @ np.r_[center, 1], np.r_[center + [1, 2, 3], 1])
    # positive rz turns +x into +y (right-handed, about the centre)
    np.testing.assert_allclose(A[:3, :3] @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)
    # composition order R = Rz @ Ry @ Rx
    rx, ry, rz = (rigid_matrix([0, 0, 0, *a])[:3, :3] for a in np.eye(3) * 0.3)
    R = rigid_matrix([0, 0, 0, 0.3, 0.3, 0.3])[:3, :3]
    np.testing.assert_allclose(R, rz @ ry @ rx, atol=1e-12)


def test_rigid_params_projects_non_rigid():
    A = rigid_matrix([1, 2, 3, 0.1, -0.2, 0.05])
    A_scaled = A.copy()
    A_scaled[:3, :3] *= 1.01
    np.testing.assert_allclose(rigid_params(A_scaled)[3:], rigid_params(A)[3:], atol=1e-9)
    with pytest.raises(InputError):
        rigid_params(np.eye(3))
    with pytest.raises(InputError):
        rigid_matrix([1, 2, 3])


def test_motion_parameters_about_fov_center(affine):
    center = fov_center(affine, SHAPE)
    params = [1.0, -2.0, 0.5, 0.02, -0.01, 0.03]
    A = rigid_matrix(params, center=center)
    reported = motion_parameters(A, affine, SHAPE)
    np.testing.assert_allclose(reported[:3], params[:3], atol=1e-10)
    np.testing.assert_allclose(reported[3:], np.degrees(params[3:]), atol=1e-10)
    # without a shape the world origin is the centre
    np.testing.assert_allclose(motion_parameters(A, affine)[:3], A[:3, 3], atol=1e-10)


def test_fov_center(affine):
    center = fov_center(affine, SHAPE)
    np.testing.assert_allclose(center, affine[:3, :3] @ [19.5, 19.5, 14.5] + affine[:3, 3])


def test_framewise_displacement_known_case():
    mats = np.stack(
        [
            np.eye(4),
            rigid_matrix([1.0, 0, 0, 0, 0, 0]),  # 1 mm
            rigid_matrix([1.0, 0, 0, 0.01, 0, 0]),  # + 0.01 rad * 50 mm = 0.5 mm
            rigid_matrix([0.0, -2.0, 0, 0.01, 0, -0.02]),  # 1 + 2 + 0.02 * 50 = 4 mm
        ]
    )
    np.testing.assert_allclose(framewise_displacement(mats), [0.0, 1.0, 0.5, 4.0], atol=1e-12)
    np.testing.assert_allclose(framewise_displacement(mats, radius=80.0)[2], 0.8, atol=1e-12)
    assert framewise_displacement(np.eye(4)[None]).tolist() == [0.0]
    assert framewise_displacement(np.zeros((0, 4, 4))).shape == (0,)
    # about another centre, rotations are unchanged and translations follow the centre
    center = np.array([0.0, 0.0, 100.0])
    mats_c = np.stack([np.eye(4), rigid_matrix([0, 0, 0, 0.01, 0, 0], center=center)])
    np.testing.assert_allclose(framewise_displacement(mats_c, center=center), [0.0, 0.5])
    with pytest.raises(InputError):
        framewise_displacement(np.eye(4))


# ---------------------------------------------------------------------- the phantom


def test_phantom_follows_the_motion_convention(affine, fixed):
    """Resampling moving at inv(affine) @ A @ affine @ o gives fixed back (docs/concepts.md)."""
    A = rigid_matrix([2.5, -1.5, 2.0, 0.04, -0.03, 0.05], center=fov_center(affine, SHAPE))
    moving = render(affine, A)
    M = np.linalg.inv(affine) @ A @ affine
    back = ndimage.affine_transform(moving, M[:3, :3], offset=M[:3, 3], order=3)
    M_wrong = np.linalg.inv(affine) @ np.linalg.inv(A) @ affine
    wrong = ndimage.affine_transform(moving, M_wrong[:3, :3], offset=M_wrong[:3, 3], order=3)
    err = np.abs(back - fixed).mean()
    assert err < 0.1 * np.abs(moving - fixed).mean()
    assert err < 0.1 * np.abs(wrong - fixed).mean()


# ---------------------------------------------------------------------- registration


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_recovers_known_motion(seed, affine, fixed, registration):
    rng = np.random.default_rng(seed)
    A = random_motion(rng, fov_center(affine, SHAPE))
    moving = render(affine, A) + rng.normal(0, NOISE, SHAPE).astype(np.float32)
    estimate = registration(fixed, moving, affine)
    assert estimate.shape == (4, 4) and estimate.dtype == np.float64
    dt, dr = errors(estimate, A, affine)
    assert dt < MAX_TRANSLATION_ERROR, dt
    assert dr < MAX_ROTATION_ERROR, dr


def test_identity_when_fixed_equals_moving(affine, fixed, registration):
    np.testing.assert_allclose(registration(fixed, fixed, affine), np.eye(4), atol=1e-6)


def test_deterministic_and_picklable(affine, fixed, registration):
    rng = np.random.default_rng(7)
    moving = render(affine, random_motion(rng, fov_center(affine, SHAPE)))
    moving += rng.normal(0, NOISE, SHAPE).astype(np.float32)
    first = registration(fixed, moving, affine)
    again = registration(fixed.copy(), moving.copy(), affine.copy())
    clone = pickle.loads(pickle.dumps(registration))
    assert clone == registration
    assert np.array_equal(first, again)
    assert np.array_equal(first, clone(fixed, moving, affine))


def test_mask_restricts_the_metric(affine, fixed, registration):
    rng = np.random.default_rng(11)
    A = random_motion(rng, fov_center(affine, SHAPE))
    moving = render(affine, A) + rng.normal(0, NOISE, SHAPE).astype(np.float32)
    # corrupt the top slabs of the moving image (e.g. a signal dropout + artefact)
    moving[:, :, 21:] = rng.uniform(0, 2, (SHAPE[0], SHAPE[1], SHAPE[2] - 21))
    mask = fixed > 0.05
    mask[:, :, 17:] = False
    estimate = registration(fixed, moving, affine, mask=mask)
    dt, dr = errors(estimate, A, affine)
    assert dt < MAX_TRANSLATION_ERROR and dr < MAX_ROTATION_ERROR, (dt, dr)
    unmasked = registration(fixed, moving, affine)
    assert not np.allclose(unmasked, estimate)  # the mask was used


def test_mask_validation(affine, fixed, registration):
    with pytest.raises(InputError, match="mask shape"):
        registration(fixed, fixed, affine, mask=np.ones((4, 4, 4), bool))
    with pytest.raises(InputError, match="empty"):
        registration(fixed, fixed, affine, mask=np.zeros(SHAPE, bool))
    with pytest.raises(InputError, match="same shape"):
        registration(fixed, fixed[:-1], affine)
    with pytest.raises(InputError, match="affine"):
        registration(fixed, fixed, np.zeros((4, 4)))
    with pytest.raises(InputError, match="constant"):
        registration(np.ones(SHAPE), fixed, affine)


def test_init_starts_near_a_large_motion(affine, fixed, registration):
    center = fov_center(affine, SHAPE)
    A = rigid_matrix([9.0, -7.0, 4.0, 0.1, 0.0, -0.08], center=center)
    rng = np.random.default_rng(5)
    moving = render(affine, A) + rng.normal(0, NOISE, SHAPE).astype(np.float32)
    init = rigid_matrix([8.0, -6.0, 3.5, 0.09, 0.01, -0.07], center=center)
    dt, dr = errors(registration(fixed, moving, affine, init=init), A, affine)
    assert dt < MAX_TRANSLATION_ERROR and dr < MAX_ROTATION_ERROR, (dt, dr)
    # an exact init stays near (trilinear interpolation leaves a bias of ~0.05 degrees)
    exact = render(affine, A)
    dt, dr = errors(registration(fixed, exact, affine, init=A), A, affine)
    assert dt < 0.1 and dr < 0.15, (dt, dr)


def test_mutual_information(affine, fixed):
    rng = np.random.default_rng(3)
    A = random_motion(rng, fov_center(affine, SHAPE))
    # a different, non-linear contrast: MI should not care
    moving = np.sqrt(np.clip(render(affine, A), 0, None))
    moving += rng.normal(0, NOISE, SHAPE).astype(np.float32)
    dt, dr = errors(RigidRegistration(metric="mi")(fixed, moving, affine), A, affine)
    assert dt < MAX_TRANSLATION_ERROR and dr < MAX_ROTATION_ERROR, (dt, dr)


def test_invalid_options():
    with pytest.raises(InputError, match="metric"):
        RigidRegistration(metric="ssd")
    with pytest.raises(InputError):
        RigidRegistration(shrink=(2, 1), smoothing=(1.0,))
    with pytest.raises(InputError):
        RigidRegistration(shrink=(0,), smoothing=(0.0,))


# ---------------------------------------------------------------------- registry


def test_get_registration():
    assert REGISTRATIONS["rigid"] is RigidRegistration
    assert get_registration("rigid") == RigidRegistration()
    assert get_registration("rigid", metric="mi").metric == "mi"
    instance = RigidRegistration(shrink=(1,), smoothing=(0.0,))
    assert get_registration(instance) is instance
    assert get_registration(RigidRegistration, maxiter=5).maxiter == 5
    assert isinstance(instance, Registration)

    def identity(fixed, moving, affine, mask=None, init=None):
        return np.eye(4)

    assert get_registration(identity) is identity
    with pytest.raises(InputError, match="unknown registration 'ants'.*rigid"):
        get_registration("ants")
    with pytest.raises(InputError, match="callable"):
        get_registration(42)
    with pytest.raises(InputError, match="options"):
        get_registration(identity, metric="mi")
