"""One reference frame: tying prediction groups, time interpolation, recentring."""

from __future__ import annotations

import numpy as np
import pytest

from nidask.errors import InputError
from nidask.estimation.frames import (
    interleaved,
    interpolate_in_time,
    recentre,
    temporal_offsets,
    tie_frames,
)
from nidask.geometry import fov_center, rigid_matrix, rigid_params
from nidask.validation.phantom import phantom_affine, realistic_motion

SHAPE = (40, 40, 30)
AFFINE = phantom_affine(SHAPE)
CENTRE = fov_center(AFFINE, SHAPE)


def drifting_series(n=120, seed=0):
    """Smooth motion with jumps, and groups interleaved like an HCP acquisition."""
    truth = realistic_motion(n, np.random.default_rng(seed), 2.0, 2.0, CENTRE)
    groups = np.array([0 if i % 10 == 0 else 1 + i % 3 for i in range(n)])
    return truth, groups


def test_temporal_tie_recovers_group_offsets():
    truth, groups = drifting_series()
    offsets = {
        1: rigid_matrix([0.3, -0.2, 0.1, 0.004, 0.0, -0.003], CENTRE),
        2: rigid_matrix([-0.4, 0.1, 0.25, 0.0, 0.005, 0.002], CENTRE),
        3: rigid_matrix([0.1, 0.35, -0.3, -0.003, 0.002, 0.004], CENTRE),
    }
    # each group's estimates live in its own frame: estimate @ G_g = truth
    estimates = truth.copy()
    for g, offset in offsets.items():
        estimates[groups == g] = truth[groups == g] @ np.linalg.inv(offset)
    tied, info = tie_frames(estimates, groups, 0, AFFINE, SHAPE, method="temporal")
    assert info["method"] == "temporal"
    for i in range(len(truth)):
        error = rigid_params(np.linalg.inv(truth[i]) @ tied[i], center=CENTRE)
        assert np.abs(error[:3]).max() < 0.03 and np.abs(error[3:]).max() < np.radians(0.03)
    # the untied estimates were far off
    assert max(np.abs(rigid_params(o, center=CENTRE)[:3]).max() for o in offsets.values()) > 0.3


def test_temporal_error_is_large_for_unordered_motion_and_auto_can_fall_back():
    rng = np.random.default_rng(1)
    n = 60
    truth = np.stack(
        [rigid_matrix(np.r_[rng.uniform(-2, 2, 3), rng.uniform(-0.03, 0.03, 3)]) for _ in range(n)]
    )
    groups = np.arange(n) % 3
    _, error = temporal_offsets(truth, groups, 0, CENTRE)
    assert error[:3].max() > 0.1  # independent motion: time says little
    tied, info = tie_frames(truth, groups, 0, AFFINE, SHAPE, method="auto", fallback="none")
    assert info["method"] == "none"
    np.testing.assert_array_equal(tied, truth)
    with pytest.raises(InputError, match="needs the groups' images"):
        tie_frames(truth, groups, 0, AFFINE, SHAPE, method="auto")


def test_image_tie_recovers_a_known_offset(dwi_phantom):
    import nibabel as nb

    data = np.asanyarray(nb.load(dwi_phantom.image).dataobj).astype(np.float32)
    affine = dwi_phantom.affine
    shape = data.shape[:3]
    centre = fov_center(affine, shape)
    template = data[..., 0]
    known = rigid_matrix([0.6, -0.4, 0.3, 0.02, -0.01, 0.015], center=centre)
    from nidask.ops.resample import resample_volume

    moved = resample_volume(template, np.linalg.inv(affine) @ np.linalg.inv(known) @ affine)
    images = {0: template, 1: moved}
    groups = np.array([0, 0, 1, 1])
    estimates = np.tile(np.eye(4), (4, 1, 1))
    tied, info = tie_frames(
        estimates, groups, 0, affine, shape, method="image", images=images.__getitem__
    )
    assert info["method"] == "image"
    error = rigid_params(np.linalg.inv(known) @ tied[2], center=centre)
    assert np.abs(error[:3]).max() < 0.15, error


def test_interpolation_in_time_and_recentring():
    truth, groups = drifting_series(40)
    known = groups == 0
    filled = interpolate_in_time(truth, known, AFFINE, SHAPE)
    np.testing.assert_array_equal(filled[known], truth[known])
    middle = rigid_params(filled[5], center=CENTRE)
    ends = [rigid_params(truth[i], center=CENTRE) for i in (0, 10)]
    np.testing.assert_allclose(middle, (ends[0] + ends[1]) / 2, atol=1e-9)
    centred = recentre(truth, known, AFFINE, SHAPE)
    mean = np.mean([rigid_params(m, center=CENTRE) for m in centred[known]], axis=0)
    assert np.abs(mean).max() < 1e-3
    assert interleaved(groups, 0) and not interleaved(np.sort(groups), 0)
    assert not interleaved(groups, None)
