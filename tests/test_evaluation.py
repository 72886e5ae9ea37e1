"""Recovered-vs-true motion errors (nidask.evaluation, also nidask.phantom.motion_errors)."""

from __future__ import annotations

import numpy as np
import pytest

from nidask import phantom
from nidask.errors import InputError
from nidask.evaluation import motion_errors, rotation_angle
from nidask.geometry import fov_center, rigid_matrix

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
