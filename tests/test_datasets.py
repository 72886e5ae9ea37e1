"""Datasets: indexing, shape, select/lofo, set_transform, equality, repr, load dispatch."""

from __future__ import annotations

import shutil

import dask.array as da
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import (
    N_B0,
    N_DIRECTIONS,
    N_FRAMES,
    SHAPE3D,
    graph_sources,
    record_reads,
    write_nifti,
)
from nidask import DWI, PET, BaseDataset
from nidask.io.sources import NiftiSource, VolumeSelection, source_of

N = N_B0 + N_DIRECTIONS


def _data(path) -> np.ndarray:
    return np.asanyarray(nb.load(path).dataobj)


@pytest.fixture
def base(dwi_phantom):
    ds = nidask.load(dwi_phantom.image)
    yield ds
    ds.close()


@pytest.fixture
def dwi(dwi_phantom):
    ds = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    yield ds
    ds.close()


@pytest.fixture
def pet(pet_phantom):
    ds = nidask.load(pet_phantom.image, **pet_phantom.companions)
    yield ds
    ds.close()


def _rigid(tx: float, angle_deg: float = 0.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    matrix = np.eye(4)
    matrix[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    matrix[0, 3] = tx
    return matrix


def _raising_array(shape=(*SHAPE3D, 4), dtype="float32") -> da.Array:
    def boom(block):
        raise RuntimeError("the data were computed")

    zeros = da.zeros(shape, chunks=(*shape[:3], 1), dtype=dtype)
    return da.map_blocks(boom, zeros, dtype=dtype)


# -- shape ------------------------------------------------------------------------------
def test_len_shape3d_size3d(base, dwi, pet):
    assert len(base) == N
    assert len(dwi) == N_DIRECTIONS
    assert len(pet) == N_FRAMES
    for ds in (base, dwi, pet):
        assert ds.shape3d == SHAPE3D
        assert ds.size3d == int(np.prod(SHAPE3D)) == 16 * 18 * 12
        assert ds.shape == (*SHAPE3D, len(ds))
        assert isinstance(ds.dataobj, da.Array)
        assert ds.dataobj.chunks[:3] == tuple((s,) for s in SHAPE3D)


# -- indexing ---------------------------------------------------------------------------
def test_base_indexing_int(base, dwi_phantom):
    full = _data(dwi_phantom.image)
    result = base[3]
    assert len(result) == 2
    volume, affine = result
    assert isinstance(volume, da.Array)
    assert volume.shape == SHAPE3D
    assert affine is None
    np.testing.assert_array_equal(volume.compute(), full[..., 3])
    np.testing.assert_array_equal(base[-1][0].compute(), full[..., -1])
    np.testing.assert_array_equal(base[np.int64(4)][0].compute(), full[..., 4])


@pytest.mark.parametrize(
    "index, positions",
    [
        (slice(2, 9, 3), [2, 5, 8]),
        (slice(None, None, -4), [9, 5, 1]),
        (np.arange(N) % 3 == 0, [0, 3, 6, 9]),
        (np.array([7, 1, 1, 0]), [7, 1, 1, 0]),
        ([4, -1], [4, 9]),
    ],
)
def test_base_indexing_collections(base, dwi_phantom, index, positions):
    full = _data(dwi_phantom.image)
    volumes, affines = base[index]
    assert isinstance(volumes, da.Array)
    assert volumes.shape == (*SHAPE3D, len(positions))
    assert affines is None
    np.testing.assert_array_equal(volumes.compute(), full[..., positions])
    motion = np.stack([_rigid(float(i)) for i in range(N)])
    moved = BaseDataset(dataobj=base.dataobj, affine=base.affine, motion_affines=motion)
    _, affines = moved[index]
    np.testing.assert_array_equal(affines, motion[positions])


def test_indexing_errors(base):
    with pytest.raises(IndexError):
        base[N]
    with pytest.raises(IndexError):
        base[-N - 1]
    with pytest.raises(IndexError):
        base[np.ones(N - 1, dtype=bool)]
    with pytest.raises(IndexError):
        base[np.array([0, N])]


def test_dwi_indexing_extras(dwi, dwi_phantom):
    full = _data(dwi_phantom.image)
    volume, affine, gradient = dwi[2]
    assert isinstance(volume, da.Array) and affine is None
    assert gradient.shape == (4,)
    np.testing.assert_array_equal(gradient, dwi.gradients[2])
    np.testing.assert_array_equal(volume.compute(), full[..., N_B0 + 2])
    mask = np.zeros(len(dwi), dtype=bool)
    mask[[0, 5, 7]] = True
    for index in (mask, np.array([0, 5, 7]), slice(0, 8, 5)):
        volumes, affines, gradients = dwi[index]
        expected = np.flatnonzero(mask) if not isinstance(index, slice) else [0, 5]
        assert affines is None
        np.testing.assert_array_equal(gradients, dwi.gradients[expected])
        np.testing.assert_array_equal(volumes.compute(), full[..., N_B0 + np.asarray(expected)])
    dwi.set_transform(5, _rigid(2.0))
    _, affine, _ = dwi[5]
    np.testing.assert_array_equal(affine, _rigid(2.0))


def test_pet_indexing_extras(pet, pet_phantom):
    full = _data(pet_phantom.image)
    volume, affine, midframe = result = pet[4]
    assert len(result) == 3
    assert affine is None and np.ndim(midframe) == 0
    assert midframe == pet.midframe[4]
    np.testing.assert_array_equal(volume.compute(), full[..., 4])
    volumes, _, midframes = pet[[5, 0]]
    np.testing.assert_array_equal(midframes, pet.midframe[[5, 0]])
    np.testing.assert_array_equal(volumes.compute(), full[..., [5, 0]])


# -- select and leave-one-out -----------------------------------------------------------
def test_select_keeps_type_and_fields(dwi, dwi_phantom):
    full = _data(dwi_phantom.image)
    dwi.set_transform(6, _rigid(1.5))
    subset = dwi.select([6, 2, 3])
    assert type(subset) is DWI
    assert len(subset) == 3
    np.testing.assert_array_equal(subset.gradients, dwi.gradients[[6, 2, 3]])
    np.testing.assert_array_equal(subset.original_index, dwi.original_index[[6, 2, 3]])
    np.testing.assert_array_equal(subset.motion_affines[0], _rigid(1.5))
    np.testing.assert_array_equal(subset.motion_affines[1], np.eye(4))
    np.testing.assert_array_equal(subset.dataobj.compute(), full[..., subset.original_index])
    assert subset.bzero is dwi.bzero
    # the parent is untouched
    assert len(dwi) == N_DIRECTIONS


def test_one_volume_of_a_dwi_reads_one_volume(dwi, dwi_phantom, monkeypatch):
    """``dwi[i]`` reads file volume ``original_index[i]`` only (not its whole chunk)."""
    reads = record_reads(monkeypatch, NiftiSource)
    volume = dwi[3][0].compute()
    file_volume = int(dwi.original_index[3])
    assert reads == [(file_volume, file_volume + 1)]
    np.testing.assert_array_equal(volume, _data(dwi_phantom.image)[..., file_volume])


@pytest.mark.parametrize("i", [0, 4, -1])
def test_lofo_dwi(dwi, dwi_phantom, i):
    full = _data(dwi_phantom.image)
    position = i % len(dwi)
    others = np.delete(np.arange(len(dwi)), position)
    train, test = dwi.lofo(i)
    assert type(train) is DWI
    assert len(train) == len(dwi) - 1
    np.testing.assert_array_equal(train.gradients, dwi.gradients[others])
    np.testing.assert_array_equal(train.original_index, dwi.original_index[others])
    assert position not in [list(dwi.original_index).index(o) for o in train.original_index]
    # the training graph is a view of the same file: nothing was copied or computed
    selection = source_of(train.dataobj)
    assert isinstance(selection, VolumeSelection)
    assert selection.base is source_of(dwi.dataobj).base
    np.testing.assert_array_equal(selection.positions, dwi.original_index[others])
    (source,) = graph_sources(train.dataobj)
    assert isinstance(source, NiftiSource) and source.path == dwi_phantom.image
    np.testing.assert_array_equal(train.dataobj.compute(), full[..., dwi.original_index[others]])
    volume, affine, gradient = test
    np.testing.assert_array_equal(volume.compute(), full[..., dwi.original_index[position]])
    np.testing.assert_array_equal(gradient, dwi.gradients[position])
    assert affine is None


def test_lofo_pet_midframe_follows(pet, pet_phantom):
    full = _data(pet_phantom.image)
    train, (volume, _, midframe) = pet.lofo(2)
    assert type(train) is PET
    np.testing.assert_array_equal(train.midframe, np.delete(pet.midframe, 2))
    assert train.total_duration == pet.total_duration
    assert midframe == pet.midframe[2]
    np.testing.assert_array_equal(train.dataobj.compute(), np.delete(full, 2, axis=-1))
    np.testing.assert_array_equal(volume.compute(), full[..., 2])


def test_lofo_folds_cover_every_volume(base):
    folds = list(base.lofo_folds())
    assert len(folds) == N
    for i, (train, _) in enumerate(folds):
        np.testing.assert_array_equal(train.original_index, np.delete(np.arange(N), i))


# -- motion -----------------------------------------------------------------------------
def test_set_transform_records_matrix(base):
    name = base.dataobj.name
    matrix = _rigid(3.0, 5.0)
    base.set_transform(4, matrix)
    assert base.motion_affines.shape == (N, 4, 4)
    np.testing.assert_allclose(base.motion_affines[4], matrix)
    for j in set(range(N)) - {4}:
        np.testing.assert_array_equal(base.motion_affines[j], np.eye(4))
    base.set_transform(-1, _rigid(-1.0))
    np.testing.assert_allclose(base.motion_affines[N - 1], _rigid(-1.0))
    np.testing.assert_allclose(base.motion_affines[4], matrix)
    assert base.dataobj.name == name  # no data touched
    np.testing.assert_allclose(base[4][1], matrix)
    with pytest.raises(nidask.InputError):
        base.set_transform(0, np.eye(3))
    with pytest.raises(nidask.InputError):
        base.set_transform(0, np.full((4, 4), np.nan))


# -- equality ---------------------------------------------------------------------------
def test_equality(dwi_phantom, tmp_path):
    full = _data(dwi_phantom.image)
    affine = nb.load(dwi_phantom.image).affine
    a = write_nifti(tmp_path / "a.nii", full, affine)
    copy = str(tmp_path / "copy.nii")
    shutil.copy(a, copy)
    changed = full.copy()
    changed[3, 4, 5, 7] += 1
    b = write_nifti(tmp_path / "b.nii", changed, affine)
    first, again, same_values, one_voxel = (nidask.load(p) for p in (a, a, copy, b))
    assert first == again
    assert first.dataobj.name != same_values.dataobj.name  # compared chunk by chunk
    assert first == same_values
    assert not (first == one_voxel)
    assert first != one_voxel

    shifted = first.affine.copy()
    shifted[0, 3] += 1
    assert first != BaseDataset(dataobj=first.dataobj, affine=shifted)
    masked = BaseDataset(
        dataobj=first.dataobj, affine=first.affine, brainmask=np.ones(SHAPE3D, bool)
    )
    assert first != masked
    moved = BaseDataset(dataobj=first.dataobj, affine=first.affine)
    assert moved == first
    moved.set_transform(1, _rigid(1.0))
    assert moved != first


def test_equality_of_modalities(dwi_phantom, pet_phantom, base):
    one = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    two = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    assert one == two
    gradients = two.gradients.copy()
    gradients[0, 3] = 2000
    assert one != DWI(dataobj=two.dataobj, affine=two.affine, gradients=gradients, bzero=two.bzero)
    assert one != DWI(dataobj=two.dataobj, affine=two.affine, gradients=two.gradients)  # no bzero
    assert one != base  # other type
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    later = PET(
        dataobj=pet.dataobj,
        affine=pet.affine,
        brainmask=pet.brainmask,
        midframe=pet.midframe + 1,
        total_duration=pet.total_duration + 1,
    )
    assert pet != later


def test_metadata_mismatch_answers_without_computing():
    a = BaseDataset(dataobj=_raising_array(), affine=np.eye(4))
    other = np.eye(4)
    other[0, 0] = 2
    b = BaseDataset(dataobj=_raising_array() + 0, affine=other)
    assert a.dataobj.name != b.dataobj.name
    assert a != b  # the affine differs: the data need not be read
    with pytest.raises(RuntimeError, match="computed"):
        a == BaseDataset(dataobj=b.dataobj, affine=np.eye(4))  # noqa: B015


def test_repr_never_computes():
    data = _raising_array()
    with pytest.raises(RuntimeError, match="computed"):
        data.compute()
    ds = BaseDataset(dataobj=data, affine=np.eye(4))
    text = repr(ds)
    assert "BaseDataset" in text
    assert "(16, 18, 12, 4)" in text
    assert "float32" in text
    assert "1 volume(s) x 4" in text
    str(ds)
    gradients = np.column_stack([np.eye(3)[[0, 1, 2, 0]], np.full(4, 1000.0)])
    gradients = np.vstack([gradients, [[0, 0, 1, 1000], [0, 1, 0, 1000]]])
    dwi = DWI(
        dataobj=_raising_array((*SHAPE3D, 6)),
        affine=np.eye(4),
        gradients=gradients,
        bzero=_raising_array((*SHAPE3D, 1))[..., 0],
    )
    text = repr(dwi)
    assert "DWI" in text and "b=1000:6" in text and "bzero=lazy" in text
    pet = PET(dataobj=data, affine=np.eye(4), midframe=[1.0, 3.0, 5.0, 7.0], total_duration=8.0)
    assert "frames=4" in repr(pet)


# -- load dispatch ----------------------------------------------------------------------
def test_load_nifti_dispatch(dwi_phantom, pet_phantom, tmp_path):
    base = nidask.load(dwi_phantom.image)
    assert type(base) is BaseDataset
    dwi = nidask.load(
        dwi_phantom.image,
        bvec_file=dwi_phantom.companions["bvec_file"],
        bval_file=dwi_phantom.companions["bval_file"],
    )
    assert type(dwi) is DWI and len(dwi) == N_DIRECTIONS
    table = np.column_stack(
        [
            np.loadtxt(dwi_phantom.companions["bvec_file"]).T,
            np.loadtxt(dwi_phantom.companions["bval_file"]),
        ]
    )
    np.savetxt(tmp_path / "grad.txt", table)
    assert type(nidask.load(dwi_phantom.image, gradients_file=tmp_path / "grad.txt")) is DWI
    pet = nidask.load(pet_phantom.image, temporal_file=pet_phantom.companions["temporal_file"])
    assert type(pet) is PET and len(pet) == N_FRAMES
    mask_file = pet_phantom.companions["brainmask_file"]
    masked = nidask.load(pet_phantom.image, brainmask_file=mask_file)
    assert type(masked) is BaseDataset and masked.brainmask.dtype == bool
    np.testing.assert_array_equal(masked.brainmask, _data(mask_file) != 0)
    np.save(tmp_path / "series.npy", _data(pet_phantom.image))
    from_npy = nidask.load(tmp_path / "series.npy")
    assert type(from_npy) is BaseDataset
    np.testing.assert_array_equal(from_npy.dataobj.compute(), _data(pet_phantom.image))


def test_load_nfdh5_dispatch_on_type(dwi_phantom, pet_phantom, tmp_path):
    datasets = {
        "base.h5": nidask.load(dwi_phantom.image),
        "dwi.h5": nidask.load(dwi_phantom.image, **dwi_phantom.companions),
        "pet.h5": nidask.load(pet_phantom.image, **pet_phantom.companions),
    }
    for name, ds in datasets.items():
        ds.to_filename(tmp_path / name)
        back = nidask.load(tmp_path / name)
        assert type(back) is type(ds), name
        assert back == ds
    with pytest.raises(nidask.InputError, match="PET"):
        DWI.from_filename(tmp_path / "pet.h5")
    assert type(PET.from_filename(tmp_path / "pet.h5")) is PET
