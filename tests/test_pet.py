"""PET: frame timing from BIDS sidecars and per-frame extras."""

from __future__ import annotations

import json

import dask.array as da
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import N_FRAMES, SHAPE3D, write_nifti, write_sidecar
from nidask import PET


@pytest.fixture
def series(tmp_path):
    data = np.random.default_rng(0).random((*SHAPE3D, 4), dtype=np.float32)
    return write_nifti(tmp_path / "pet.nii", data), data


def test_timing_from_starts_and_durations(tmp_path, series):
    path, data = series
    sidecar = write_sidecar(
        tmp_path / "pet.json", FrameTimesStart=[0, 10, 30, 60], FrameDuration=[10, 20, 30, 40]
    )
    pet = nidask.data.pet.from_nii(path, temporal_file=sidecar)
    assert isinstance(pet, PET)
    np.testing.assert_allclose(pet.midframe, [5, 20, 45, 80])
    assert pet.total_duration == pytest.approx(100.0)
    np.testing.assert_array_equal(pet.dataobj.compute(), data)


def test_timing_shifted_to_first_start(tmp_path, series):
    path, _ = series
    sidecar = write_sidecar(
        tmp_path / "pet.json", FrameTimesStart=[100, 110, 130, 160], FrameDuration=[10, 20, 30, 40]
    )
    pet = nidask.load(path, temporal_file=sidecar)
    np.testing.assert_allclose(pet.midframe, [5, 20, 45, 80])
    assert pet.total_duration == pytest.approx(100.0)


def test_timing_without_durations(tmp_path, series):
    path, _ = series
    sidecar = write_sidecar(tmp_path / "pet.json", FrameTimesStart=[0, 10, 30, 70])
    pet = nidask.load(path, temporal_file=sidecar)
    # each frame lasts until the next starts; the last as long as the one before
    np.testing.assert_allclose(pet.midframe, [5, 20, 50, 90])
    assert pet.total_duration == pytest.approx(110.0)
    assert pet.total_duration > pet.midframe[-1]


def test_phantom_timing_and_extras(pet_phantom):
    with open(pet_phantom.companions["temporal_file"]) as f:
        sidecar = json.load(f)
    start = np.asarray(sidecar["FrameTimesStart"])
    duration = np.asarray(sidecar["FrameDuration"])
    full = np.asanyarray(nb.load(pet_phantom.image).dataobj)
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    np.testing.assert_allclose(pet.midframe, start - start[0] + duration / 2)
    assert pet.total_duration == pytest.approx(start[-1] - start[0] + duration[-1])
    assert len(pet) == N_FRAMES
    assert pet.brainmask.shape == SHAPE3D

    volume, affine, midframe = pet[3]
    assert isinstance(volume, da.Array)
    assert affine is None
    assert midframe == pet.midframe[3]
    np.testing.assert_array_equal(volume.compute(), full[..., 3])

    volumes, affines, midframes = pet[1:4]
    np.testing.assert_array_equal(midframes, pet.midframe[1:4])
    np.testing.assert_array_equal(volumes.compute(), full[..., 1:4])

    shift = np.eye(4)
    shift[:3, 3] = [1.0, -2.0, 0.5]
    pet.set_transform(2, shift)
    mask = np.arange(N_FRAMES) % 2 == 0
    volumes, affines, midframes = pet[mask]
    assert affines.shape == (3, 4, 4)
    np.testing.assert_array_equal(affines[1], shift)
    np.testing.assert_array_equal(affines[0], np.eye(4))
    np.testing.assert_array_equal(midframes, pet.midframe[mask])
    np.testing.assert_array_equal(volumes.compute(), full[..., mask])


def test_pet_select_keeps_total_duration(pet_phantom):
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    subset = pet.select([0, 1, 2])
    assert type(subset) is PET
    assert subset.total_duration == pet.total_duration
    np.testing.assert_array_equal(subset.midframe, pet.midframe[:3])
