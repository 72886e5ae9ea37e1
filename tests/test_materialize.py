"""``ds.materialize()``: a volume-contiguous ``.npy`` memmap, the same on every scheduler."""

from __future__ import annotations

import math
import os

import dask
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import N_B0, N_DIRECTIONS, N_FRAMES, SHAPE3D
from nidask import DWI, PET

SCHEDULERS = ("threads", "processes", "distributed")
#: three volumes per chunk: several blocks (and tasks) for every phantom
CHUNK_VOLUMES = 3


def _data(path) -> np.ndarray:
    return np.asanyarray(nb.load(path).dataobj)


def _chunked():
    return dask.config.set({"nidask.chunk-size": CHUNK_VOLUMES * math.prod(SHAPE3D) * 2})


def _npy_header(path) -> tuple[tuple, bool, np.dtype, int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
        return shape, fortran, dtype, f.tell()


@pytest.fixture
def scheduler_config(process_pool, request):
    """``scheduler_config(name)``: a dask config context running on that scheduler."""

    def config(name):
        if name == "threads":
            return dask.config.set(scheduler="threads")
        if name == "processes":
            return dask.config.set(scheduler="processes", pool=process_pool)
        return dask.config.set(scheduler=request.getfixturevalue("local_cluster"))

    return config


def _check_volume_contiguous(path, memmap, expected):
    shape, fortran, dtype, offset = _npy_header(path)
    assert fortran is True
    assert shape == expected.shape and dtype == expected.dtype
    assert os.path.getsize(path) == offset + expected.nbytes
    assert isinstance(memmap, np.memmap)
    assert memmap.flags.f_contiguous and not memmap.flags.writeable
    volume_bytes = math.prod(expected.shape[:3]) * expected.dtype.itemsize
    for i in range(expected.shape[3]):
        volume = memmap[..., i]
        assert volume.flags.f_contiguous  # one contiguous block of the file
        assert volume.ctypes.data - memmap.ctypes.data == i * volume_bytes
    # the bytes on disk, volume after volume, are the volumes in Fortran order
    with open(path, "rb") as f:
        f.seek(offset + 2 * volume_bytes)
        raw = np.frombuffer(f.read(volume_bytes), dtype=expected.dtype)
    np.testing.assert_array_equal(raw, expected[..., 2].ravel(order="F"))


def test_materialize_into_cache(dwi_phantom):
    full = _data(dwi_phantom.image)
    with _chunked():
        ds = nidask.load(dwi_phantom.image)
    with ds:
        m = ds.materialize()
        assert type(m) is nidask.BaseDataset
        assert m.memmap_path.endswith(".npy") and ds.cache.owns(m.memmap_path)
        memmap = m.memmap
        _check_volume_contiguous(m.memmap_path, memmap, full)
        np.testing.assert_array_equal(memmap, full)
        # the new dataset reads the file, not the source
        assert m.dataobj.compute().dtype == full.dtype
        np.testing.assert_array_equal(m.dataobj.compute(), full)
        np.testing.assert_array_equal(m[4][0].compute(), full[..., 4])
        del memmap


def test_materialize_to_path_and_mask_indexing(dwi_phantom, tmp_path):
    full = _data(dwi_phantom.image)
    mask = _data(dwi_phantom.companions["brainmask_file"]) != 0
    path = tmp_path / "series.npy"
    with _chunked():
        mask_file = dwi_phantom.companions["brainmask_file"]
        ds = nidask.load(dwi_phantom.image, brainmask_file=mask_file)
    with ds:
        m = ds.materialize(path=path)
        assert m.memmap_path == os.fspath(path)
        assert not ds.cache.owns(path)
        memmap = m.memmap
        _check_volume_contiguous(path, memmap, full)
        np.testing.assert_array_equal(m.brainmask, mask)
        voxels = memmap[m.brainmask, :]  # numpy code works on the memmap unchanged
        assert voxels.shape == (mask.sum(), full.shape[3])
        np.testing.assert_array_equal(voxels, full[mask, :])
        assert isinstance(memmap.reshape(-1, full.shape[3]), np.ndarray)
        np.testing.assert_array_equal(np.load(path), full)
        del memmap, voxels


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_identical_files_on_every_scheduler(scheduler, dwi_phantom, tmp_path, scheduler_config):
    full = _data(dwi_phantom.image)
    with _chunked():
        ds = nidask.load(dwi_phantom.image)
    assert ds.dataobj.numblocks[3] == 4
    reference = tmp_path / "threads.npy"
    with dask.config.set(scheduler="sync"):
        ds.materialize(path=reference)
    path = tmp_path / f"{scheduler}.npy"
    with scheduler_config(scheduler):
        m = ds.materialize(path=path)
        cached = ds.materialize()  # into the owned cache, from the same scheduler
    assert np.abs(full).max() > 0
    # a pickled np.memmap target would leave zeros; path targets write the real file
    assert path.read_bytes() == reference.read_bytes()
    with open(cached.memmap_path, "rb") as f:
        assert f.read() == reference.read_bytes()
    np.testing.assert_array_equal(m.memmap, full)
    ds.close()
    assert not os.path.exists(cached.memmap_path) and path.exists()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_dwi_metadata_kept(scheduler, dwi_phantom, scheduler_config):
    full = _data(dwi_phantom.image)
    bvals = np.loadtxt(dwi_phantom.companions["bval_file"])
    is_b0 = bvals <= 50
    with _chunked():
        dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    with dwi, scheduler_config(scheduler):
        m = dwi.materialize()
        assert type(m) is DWI and len(m) == N_DIRECTIONS
        np.testing.assert_array_equal(m.gradients, dwi.gradients)
        np.testing.assert_array_equal(m.bvals, bvals[~is_b0])
        np.testing.assert_array_equal(m.original_index, np.arange(N_B0, N_B0 + N_DIRECTIONS))
        np.testing.assert_array_equal(m.brainmask, dwi.brainmask)
        np.testing.assert_array_equal(m.affine, dwi.affine)
        # the lazy b=0 median is computed once, not left pointing at the source graph
        assert isinstance(m.bzero, np.ndarray) and m.bzero.dtype == np.float32
        np.testing.assert_array_equal(m.bzero, np.median(full[..., is_b0], axis=-1))
        np.testing.assert_array_equal(m.memmap, full[..., ~is_b0])
        assert m == dwi
        train, (volume, _, gradient) = m.lofo(1)
        np.testing.assert_array_equal(gradient, dwi.gradients[1])
        np.testing.assert_array_equal(volume.compute(), full[..., N_B0 + 1])


def test_pet_metadata_kept(pet_phantom, tmp_path):
    full = _data(pet_phantom.image)
    with _chunked():
        pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    with pet:
        m = pet.materialize(path=tmp_path / "pet.npy")
        assert type(m) is PET and len(m) == N_FRAMES
        np.testing.assert_array_equal(m.midframe, pet.midframe)
        assert m.total_duration == pet.total_duration
        np.testing.assert_array_equal(m.brainmask, pet.brainmask)
        assert m.memmap.dtype == np.float32
        np.testing.assert_array_equal(m.memmap, full)
        assert m == pet
        _, (_, _, midframe) = m.lofo(2)
        assert midframe == pet.midframe[2]


def test_materialize_lofo_training_set(dwi_phantom, scheduler_config):
    full = _data(dwi_phantom.image)
    dw = np.flatnonzero(np.loadtxt(dwi_phantom.companions["bval_file"]) > 50)
    with _chunked():
        dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    with dwi, scheduler_config("distributed"):
        train, _ = dwi.lofo(4)
        m = train.materialize()
        assert type(m) is DWI and len(m) == N_DIRECTIONS - 1
        kept = np.delete(dw, 4)
        _check_volume_contiguous(m.memmap_path, m.memmap, full[..., kept])
        np.testing.assert_array_equal(m.memmap, full[..., kept])
        np.testing.assert_array_equal(m.original_index, kept)
        np.testing.assert_array_equal(m.gradients, np.delete(dwi.gradients, 4, axis=0))
        assert m.cache is dwi.cache  # one cache per lineage


def _shift(mm: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = (mm, -0.5 * mm, 0.25 * mm)
    return matrix


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_materialize_resampled(scheduler, dwi_phantom, tmp_path, scheduler_config):
    with _chunked():
        dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    with dwi:
        dwi.set_transform(1, _shift(2.5))
        dwi.set_transform(6, _shift(-1.0))
        resampled = dwi.resampled(order=1)
        expected = resampled.dataobj.compute(scheduler="sync")
        assert not np.array_equal(expected[..., 1], _data(dwi_phantom.image)[..., N_B0 + 1])
        with scheduler_config(scheduler):
            m = resampled.materialize(path=tmp_path / "moved.npy")
        assert type(m) is DWI and m.motion_affines is None
        assert m.memmap.dtype == np.float32
        np.testing.assert_array_equal(m.memmap, expected)
        # b-vectors rotated with the motion (here pure shifts: unchanged)
        np.testing.assert_allclose(m.gradients, dwi.gradients)
        # the motion matrices are applied to volumes 1 and 6 only
        unmoved = np.delete(np.arange(N_DIRECTIONS), [1, 6])
        np.testing.assert_array_equal(
            m.memmap[..., unmoved], _data(dwi_phantom.image)[..., N_B0 + unmoved]
        )


def test_materialized_dataset_exports(dwi_phantom, tmp_path):
    full = _data(dwi_phantom.image)
    with _chunked():
        ds = nidask.load(dwi_phantom.image)
    with ds:
        m = ds.materialize()
        m.to_nifti(tmp_path / "out.nii")
        np.testing.assert_array_equal(_data(tmp_path / "out.nii"), full)
        again = m.materialize(path=tmp_path / "again.npy")
        np.testing.assert_array_equal(again.memmap, full)
