"""Recovered-vs-true motion errors (nidask.validation.evaluation and phantom.motion_errors)."""

from __future__ import annotations

import numpy as np
import pytest

from nidask.errors import InputError
from nidask.estimation.registration import RigidRegistration
from nidask.geometry import fov_center, rigid_matrix, rigid_params
from nidask.validation import phantom
from nidask.validation.evaluation import (
    bound_errors,
    motion_errors,
    registration_bound,
    rotation_angle,
)

SHAPE = (20, 22, 16)
AFFINE = phantom.phantom_affine(SHAPE)
CENTRE = fov_center(AFFINE, SHAPE)


def _true(n=8, seed=0):
    rng = np.random.default_rng(seed)
    params = np.column_stack([rng.uniform(-3, 3, (n, 3)), np.radians(rng.uniform(-3, 3, (n, 3)))])
    return np.stack([rigid_matrix(p, center=CENTRE) for p in params])


def test_common_frame_offset_is_removed():
    true = _true()
    offset = rigid_matrix([0.7, -0.4, 0.2, 0.01, -0.02, 0.015], center=CENTRE)
    errors = motion_errors(true @ offset, true, AFFINE, SHAPE)
    assert errors is not None and phantom.motion_errors is motion_errors
    np.testing.assert_allclose(errors["offset"], offset, atol=1e-9)
    np.testing.assert_allclose(errors["offset_parameters"][:3], [0.7, -0.4, 0.2], atol=1e-9)
    assert errors["translation_mm_max"] < 1e-9 and errors["rotation_deg_max"] < 1e-6
    # without alignment the offset itself is the error
    raw = motion_errors(true @ offset, true, AFFINE, SHAPE, align=False)
    assert raw["translation_mm_median"] == pytest.approx(np.linalg.norm([0.7, -0.4, 0.2]))


def test_one_bad_volume_is_reported_and_does_not_move_the_offset():
    true = _true(9)
    estimated = true.copy()
    bump = rigid_matrix([1.5, 0.0, 2.0, 0.0, 0.0, np.radians(2.0)], center=CENTRE)
    estimated[4] = true[4] @ bump
    errors = motion_errors(estimated, true, AFFINE, SHAPE)
    assert errors["worst_volume"] == 4
    assert errors["translation_mm"][4] == pytest.approx(2.5)  # the centre moved by (1.5, 0, 2)
    assert errors["rotation_deg"][4] == pytest.approx(2.0)
    assert errors["translation_mm_median"] < 1e-9  # the median offset ignored the outlier
    assert errors["translation_mm_max"] == pytest.approx(2.5)
    assert errors["rotation_deg_max"] == pytest.approx(2.0)


def test_rotation_angle_and_bad_input():
    assert rotation_angle(rigid_matrix([0, 0, 0, np.radians(5), 0, 0])) == pytest.approx(5)
    with pytest.raises(InputError, match="original_index"):
        motion_errors(_true(5), _true(6), AFFINE, SHAPE)
    with pytest.raises(InputError, match="stack"):
        motion_errors(np.eye(4), np.eye(4), AFFINE, SHAPE)


def _smooth_head(seed=3, shape=(28, 30, 26), zooms=(3.0, 3.0, 3.0)):
    from scipy import ndimage

    labels = phantom.anatomy(shape, np.random.default_rng(seed))
    volume = ndimage.gaussian_filter(labels.astype(float), 1.0) * 100
    return volume, phantom.phantom_affine(shape, zooms), labels > 0


def test_registration_bound_matches_the_spread_of_real_registrations():
    volume, affine, mask = _smooth_head()
    sigma = 4.0
    covariance = registration_bound(volume, affine, sigma, mask)
    rng = np.random.default_rng(0)
    centre = fov_center(affine, volume.shape)
    register = RigidRegistration()
    estimates = np.array(
        [
            rigid_params(
                register(volume, volume + rng.normal(0, sigma, volume.shape), affine, mask=mask),
                center=centre,
            )
            for _ in range(30)
        ]
    )
    # no unbiased registration beats the bound; one to the noise-free image nears it
    spread = np.mean(estimates**2, axis=0)
    bound = np.diag(covariance)
    for part in (slice(0, 3), slice(3, 6)):
        ratio = np.sqrt(spread[part].sum() / bound[part].sum())
        assert 0.6 < ratio < 2.0, ratio
    # halving the noise halves the bound; the voxel size enters through the affine
    half = registration_bound(volume, affine, sigma / 2, mask)
    np.testing.assert_allclose(half, covariance / 4, rtol=1e-9)
    coarse = registration_bound(volume, affine @ np.diag([2.0, 2, 2, 1]), sigma, mask)
    np.testing.assert_allclose(np.diag(coarse)[:3], 4 * bound[:3], rtol=1e-6)


def test_bound_errors_summarise_draws_like_motion_errors():
    covariance = np.diag([0.01**2] * 3 + [np.radians(0.1) ** 2] * 3)
    summary = bound_errors(np.repeat(covariance[None], 50, axis=0), draws=400)
    # |error| of an isotropic 3D Gaussian has median 1.538 sigma
    assert summary["translation_mm_median"] == pytest.approx(0.01538, rel=0.05)
    assert summary["rotation_deg_median"] == pytest.approx(0.1538, rel=0.05)
    assert summary["translation_mm_max"] > 2 * summary["translation_mm_median"]


def test_registration_bound_refuses_bad_input():
    volume, affine, mask = _smooth_head()
    with pytest.raises(InputError, match="sigma"):
        registration_bound(volume, affine, 0.0)
    with pytest.raises(InputError, match="mask shape"):
        registration_bound(volume, affine, 1.0, mask[:-1])
    with pytest.raises(InputError, match="covariances"):
        bound_errors(np.eye(6))
