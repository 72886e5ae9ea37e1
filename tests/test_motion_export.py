"""Resampled export end to end: set_transform, resampled(), to_nifti (+ .bval/.bvec, X5), NFDH5.

Motion convention (docs/concepts.md, "Motion matrices"): ``A`` maps reference RAS to
moving RAS; output voxel ``o`` samples the input at ``inv(affine) @ A @ affine @ o``.
Expected values here are computed independently from that formula with
:func:`nidask.ops.resample.resample_volume` and numpy, never from the code path under
test.
"""

from __future__ import annotations

import math
import os
import re

import attrs
import dask
import dask.array as da
import h5py
import nibabel as nb
import nitransforms as nt
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import nidask
from conftest import N_B0, N_DIRECTIONS, N_FRAMES, SHAPE3D
from nidask import DWI, PET, BaseDataset
from nidask.geometry import fsl_to_ras
from nidask.ops.resample import resample_volume
from nidask.validation import phantom

KINDS = ("base", "dwi", "pet")
N_FILE = N_B0 + N_DIRECTIONS
#: Lengths of each kind's series (a DWI drops its b=0 volumes).
LENGTHS = {"base": N_FILE, "dwi": N_DIRECTIONS, "pet": N_FRAMES}


# -- helpers ----------------------------------------------------------------------------
def _rigid(translation, degrees, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Rotation (xyz Euler, degrees) about ``centre`` followed by a translation (mm)."""
    rotation = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    centre = np.asarray(centre, dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre + np.asarray(translation, dtype=float)
    return matrix


def _motions(n: int, seed: int = 0, skip=()) -> dict[int, np.ndarray]:
    """Rigid matrices (up to 3 mm, 4 degrees) for every volume but those in ``skip``."""
    rng = np.random.default_rng(seed)
    return {
        i: _rigid(rng.uniform(-3, 3, 3), rng.uniform(-4, 4, 3)) for i in range(n) if i not in skip
    }


def _open(kind: str, dwi_phantom, pet_phantom):
    """A dataset of ``kind`` with 3 volumes per chunk (several blocks per series)."""
    volume_bytes = math.prod(SHAPE3D) * 2  # int16 DWI; the float32 PET gets 1-2 per chunk
    with dask.config.set({"nidask.chunk-size": 3 * volume_bytes}):
        if kind == "base":
            return nidask.load(dwi_phantom.image)
        if kind == "dwi":
            return nidask.load(dwi_phantom.image, **dwi_phantom.companions)
        return nidask.load(pet_phantom.image, **pet_phantom.companions)


@pytest.fixture(params=KINDS)
def dataset(request, dwi_phantom, pet_phantom):
    ds = _open(request.param, dwi_phantom, pet_phantom)
    assert ds.dataobj.numblocks[3] > 1
    yield ds
    ds.close()


@pytest.fixture
def moved_dwi(dwi_phantom):
    """The phantom DWI with every volume's true motion set (by file position)."""
    ds = _open("dwi", dwi_phantom, None)
    for k, position in enumerate(ds.original_index):
        ds.set_transform(k, dwi_phantom.motion[position])
    yield ds
    ds.close()


def _poisoned(ds):
    """``ds`` whose data (and DWI bzero) raise as soon as anything is computed."""

    def boom(block):
        raise RuntimeError("poison: data were computed")

    changes = {"dataobj": ds.dataobj.map_blocks(boom, dtype=ds.dtype)}
    if isinstance(ds, DWI):
        changes["bzero"] = da.zeros(ds.shape3d, dtype=np.float32).map_blocks(
            boom, dtype=np.float32
        )
    return attrs.evolve(ds, **changes)


def _expected_volumes(data: np.ndarray, affine, motions: np.ndarray, order: int):
    """Each volume resampled with ``inv(affine) @ A @ affine`` by resample_volume."""
    out = np.empty(data.shape, dtype=np.float32)
    for i in range(data.shape[-1]):
        voxel = np.linalg.inv(affine) @ motions[i] @ affine
        out[..., i] = resample_volume(data[..., i], voxel, order=order)
    return out


def _expected_bvecs(bvecs, motions) -> np.ndarray:
    """RAS directions turned by each rigid motion's inverse: ``inv(A)[:3, :3] @ b``."""
    return np.array([np.linalg.inv(A)[:3, :3] @ b for A, b in zip(motions, bvecs, strict=True)])


def _stack(n: int, motions: dict[int, np.ndarray]) -> np.ndarray:
    stack = np.tile(np.eye(4), (n, 1, 1))
    for i, matrix in motions.items():
        stack[i] = matrix
    return stack


def _read_nifti(path) -> tuple[np.ndarray, nb.Nifti1Image]:
    image = nb.load(path)
    return np.asanyarray(image.dataobj), image


# -- set_transform ----------------------------------------------------------------------
def test_set_transform_records_and_touches_no_data(dataset):
    """Matrices land where asked (identity elsewhere) without computing anything."""
    n = len(dataset)
    assert n == LENGTHS[{BaseDataset: "base", DWI: "dwi", PET: "pet"}[type(dataset)]]
    ds = _poisoned(dataset)
    name = ds.dataobj.name
    assert ds.motion_affines is None
    motions = _motions(n, seed=1, skip={0, n - 2})
    for i, matrix in motions.items():
        ds.set_transform(i if i % 2 else i - n, matrix)  # negative indices too
    assert ds.dataobj.name == name
    assert isinstance(ds.motion_affines, np.ndarray)
    assert ds.motion_affines.dtype == np.float64  # a plain float stack, not objects
    assert ds.motion_affines.shape == (n, 4, 4)
    np.testing.assert_array_equal(ds.motion_affines, _stack(n, motions))
    assert ds[1][1] is not None
    np.testing.assert_array_equal(ds[1][1], motions[1])
    # a later call overwrites one volume only
    ds.set_transform(1, np.eye(4))
    np.testing.assert_array_equal(ds.motion_affines[1], np.eye(4))
    np.testing.assert_array_equal(ds.motion_affines[3], motions[3])

    # resampling is deferred too: building it computes nothing ...
    resampled = ds.resampled(order=1)
    assert type(resampled) is type(ds)
    assert ds.dataobj.name == name
    # ... but the poison is really in the graph
    with pytest.raises(RuntimeError, match="poison"):
        resampled.dataobj.compute()


@pytest.mark.parametrize(
    "matrix",
    [
        pytest.param(np.eye(3), id="3x3"),
        pytest.param(np.eye(4)[:3], id="3x4"),
        pytest.param(np.eye(5), id="5x5"),
        pytest.param(np.where(np.eye(4) == 1, np.nan, 0.0), id="nan"),
        pytest.param(_rigid([np.inf, 0, 0], [0, 0, 0]), id="inf"),
        pytest.param(np.diag([1.0, 1.0, 0.0, 1.0]), id="singular"),
        pytest.param(np.diag([1.0, 1.0, 1e-14, 1.0]), id="nearly-singular"),
        pytest.param(np.zeros((4, 4)), id="zeros"),
        pytest.param([["a"] * 4] * 4, id="text"),
    ],
)
def test_set_transform_rejects_bad_matrices(dataset, matrix):
    with pytest.raises(nidask.InputError):
        dataset.set_transform(0, matrix)
    assert dataset.motion_affines is None  # nothing recorded
    dataset.set_transform(1, _rigid([1, 0, 0], [0, 0, 5]))
    before = dataset.motion_affines.copy()
    with pytest.raises(nidask.InputError):
        dataset.set_transform(0, matrix)
    np.testing.assert_array_equal(dataset.motion_affines, before)


def test_set_transform_rejects_bad_indices(dataset):
    n = len(dataset)
    for index in (n, n + 5, -n - 1, 1.0, True, slice(0, 2), [0, 1]):
        with pytest.raises(nidask.InputError):
            dataset.set_transform(index, np.eye(4))
        assert dataset.motion_affines is None
    dataset.set_transform(-n, _rigid([0, 2, 0], [0, 0, 0]))  # the first volume
    np.testing.assert_array_equal(dataset.motion_affines[0], _rigid([0, 2, 0], [0, 0, 0]))


@pytest.mark.parametrize("order", [-1, 6, 3.0, "3", None])
def test_resampled_rejects_bad_order(dataset, order, tmp_path):
    dataset.set_transform(0, _rigid([1, 0, 0], [0, 0, 0]))
    with pytest.raises(nidask.InputError):
        dataset.resampled(order=order)
    with pytest.raises(nidask.InputError):
        dataset.to_nifti(tmp_path / "out.nii", order=order, write_hmxfms=True)
    assert os.listdir(tmp_path) == []  # refused before anything was written


# -- resampled() ------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1, 3])
def test_resampled_matches_resample_volume(dataset, order):
    n = len(dataset)
    motions = _motions(n, seed=order, skip={2})  # volume 2 keeps the identity
    for i, matrix in motions.items():
        dataset.set_transform(i, matrix)
    stack = _stack(n, motions)
    original = dataset.dataobj.compute()
    result = dataset.resampled(order=order)

    assert type(result) is type(dataset)
    assert result.motion_affines is None
    out = result.dataobj
    assert out.dtype == np.float32
    assert out.chunks == dataset.dataobj.chunks
    # one resampling task per block of volumes, nothing else in that layer
    assert len(out.dask.layers[out.name]) == out.numblocks[3]
    np.testing.assert_array_equal(result.original_index, dataset.original_index)
    np.testing.assert_array_equal(result.affine, dataset.affine)

    values = out.compute()
    assert values.dtype == np.float32
    expected = _expected_volumes(original, dataset.affine, stack, order)
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-3)
    # the matrices mattered: moved volumes differ from the originals
    for i in motions:
        assert np.abs(values[..., i] - original[..., i]).max() > 0.05 * np.abs(original).max()

    if isinstance(dataset, DWI):
        np.testing.assert_allclose(result.bvecs, _expected_bvecs(dataset.bvecs, stack), atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(result.bvecs, axis=1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(result.bvals, dataset.bvals)
        np.testing.assert_array_equal(result.bvecs[2], dataset.bvecs[2])  # identity
        assert not np.allclose(result.bvecs, dataset.bvecs, atol=1e-3)
        assert result.bzero is dataset.bzero  # stays in the reference space
    if isinstance(dataset, PET):
        np.testing.assert_array_equal(result.midframe, dataset.midframe)
        assert result.total_duration == dataset.total_duration


def test_resampled_with_known_phantom_motion_recovers_motion_free_volumes(tmp_path):
    """Volumes written after known motion come back onto the motion-free twin."""
    shape, seed = (28, 30, 22), 7
    kwargs = {"shape3d": shape, "n_b0": 2, "n_directions": 6, "seed": seed, "noise": 0.002}
    # b=0 volumes stay put; the signal ignores how the moved head sees the gradient,
    # no coil bias stays behind in the scanner, and the phantom moves on the acquisition
    # grid (no partial-volume averaging): only resampling separates the
    # corrected volumes from their motion-free twins
    kwargs.update(move_b0=False, head_frame_gradients=False, bias=0.0, supersample=1)
    (tmp_path / "moved").mkdir()
    (tmp_path / "still").mkdir()
    moved = phantom.make_dwi(tmp_path / "moved", **kwargs)
    still = phantom.make_dwi(tmp_path / "still", max_mm=0.0, max_deg=0.0, **kwargs)
    np.testing.assert_allclose(still.motion, np.tile(np.eye(4), (8, 1, 1)), atol=1e-12)
    assert not np.allclose(moved.motion[2:], np.eye(4), atol=1e-3)
    moved_data, _ = _read_nifti(moved.image)
    still_data, _ = _read_nifti(still.image)
    # the random draws stay aligned: the b=0 volumes (drawn after the motion
    # parameters, never moved) are bit-identical in both files
    np.testing.assert_array_equal(moved_data[..., :2], still_data[..., :2])

    dwi = nidask.load(moved.image, **moved.companions)
    np.testing.assert_array_equal(dwi.original_index, np.arange(2, 8))
    for k, position in enumerate(dwi.original_index):
        dwi.set_transform(k, moved.motion[position])  # Phantom.motion: file positions
    corrected = dwi.resampled(order=3).dataobj.compute()
    dwi.close()

    inner = (slice(4, -4), slice(4, -4), slice(4, -4))
    for k, position in enumerate(dwi.original_index):
        truth = still_data[..., position][inner].astype(float)
        before = np.abs(moved_data[..., position][inner] - truth).mean()
        after = np.abs(corrected[..., k][inner] - truth).mean()
        assert before > 20  # the volume really moved
        # tissue edges half a voxel wide: moving and interpolating back leaves some
        assert after < 0.5 * before, (position, before, after)
        assert after < 0.12 * np.abs(truth).mean(), (position, after)


# -- to_nifti ---------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_to_nifti_streams_resampled_with_sidecars_and_x5(dataset, ext, tmp_path, inputs_unchanged):
    n = len(dataset)
    motions = _motions(n, seed=3, skip={1})
    for i, matrix in motions.items():
        dataset.set_transform(i, matrix)
    expected = dataset.resampled(order=3)
    out = tmp_path / f"moco{ext}"
    inputs_unchanged(os.path.dirname(dataset.inputs[0]))
    # the volumes of the dataset only (a DWI's b=0 volumes: see the whole-series test)
    dataset.to_nifti(out, order=3, write_hmxfms=True, b0_volumes=False)

    stem = str(tmp_path / "moco")
    names = {"moco" + ext, "moco.x5"}
    if isinstance(dataset, DWI):
        names |= {"moco.bval", "moco.bvec"}
    assert set(os.listdir(tmp_path)) == names  # no temporaries, no stray files

    data, image = _read_nifti(out)
    assert image.get_data_dtype() == np.float32
    assert image.header.get_slope_inter() in ((None, None), (1.0, 0.0))
    assert data.shape == dataset.shape
    np.testing.assert_allclose(image.affine, dataset.affine, atol=1e-5)
    np.testing.assert_array_equal(data, expected.dataobj.compute())

    # one X5 holding every volume's transform
    xfm = nt.linear.load(f"{stem}.x5", fmt="X5")
    assert xfm.matrix.shape == (n, 4, 4)
    np.testing.assert_allclose(xfm.matrix, _stack(n, motions), atol=1e-12)

    if isinstance(dataset, DWI):
        with open(f"{stem}.bval") as f:
            bval_text = f.read().split()
        with open(f"{stem}.bvec") as f:
            bvec_rows = [row.split() for row in f.read().strip().splitlines()]
        assert len(bval_text) == n and all(re.fullmatch(r"-?\d+\.\d{2}", v) for v in bval_text)
        assert [len(row) for row in bvec_rows] == [n, n, n]
        assert all(re.fullmatch(r"-?\d\.\d{6}", v) for row in bvec_rows for v in row)
        np.testing.assert_allclose(np.array(bval_text, float), dataset.bvals, atol=0.005)
        bvecs = fsl_to_ras(np.array(bvec_rows, dtype=float).T, dataset.affine)
        np.testing.assert_allclose(bvecs, expected.bvecs, atol=5e-6)
        np.testing.assert_allclose(
            bvecs, _expected_bvecs(dataset.bvecs, _stack(n, motions)), atol=5e-6
        )


def test_to_nifti_writes_the_whole_series_in_file_order(moved_dwi, dwi_phantom, tmp_path):
    """b=0 volumes are written where they were, each corrected with its own matrix."""
    b0_motion = _motions(len(moved_dwi.b0_index), seed=5)
    for k, matrix in b0_motion.items():
        moved_dwi.b0_motion_affines = (
            np.tile(np.eye(4), (len(moved_dwi.b0_index), 1, 1))
            if moved_dwi.b0_motion_affines is None
            else moved_dwi.b0_motion_affines
        )
        moved_dwi.b0_motion_affines[k] = matrix
    out = tmp_path / "dwi.nii"
    moved_dwi.to_nifti(out, order=1, write_hmxfms=True)
    data, _ = _read_nifti(out)
    n_file = len(moved_dwi) + len(moved_dwi.b0_index)
    assert data.shape == (*SHAPE3D, n_file)
    source = np.asanyarray(nb.load(dwi_phantom.image).dataobj)
    affine = moved_dwi.affine
    for position in range(n_file):
        if position in moved_dwi.b0_index:
            matrix = b0_motion[int(np.flatnonzero(moved_dwi.b0_index == position)[0])]
        else:
            matrix = moved_dwi.motion_affines[
                int(np.flatnonzero(moved_dwi.original_index == position)[0])
            ]
        expected = resample_volume(
            source[..., position], np.linalg.inv(affine) @ matrix @ affine, order=1
        )
        np.testing.assert_allclose(data[..., position], expected, rtol=1e-5, atol=1e-3)
    bvals = np.loadtxt(tmp_path / "dwi.bval", ndmin=1)
    bvecs = np.loadtxt(tmp_path / "dwi.bvec", ndmin=2)
    assert bvals.shape == (n_file,) and bvecs.shape == (3, n_file)
    assert np.all(bvals[moved_dwi.b0_index] == 0) and not np.any(bvecs[:, moved_dwi.b0_index])
    np.testing.assert_allclose(bvals[moved_dwi.original_index], moved_dwi.bvals, atol=0.005)
    xfm = nt.linear.load(str(tmp_path / "dwi.x5"), fmt="X5")
    assert xfm.matrix.shape == (n_file, 4, 4)
    np.testing.assert_allclose(xfm.matrix[moved_dwi.b0_index], np.stack(list(b0_motion.values())))


def test_to_nifti_insert_b0(moved_dwi, tmp_path):
    n = len(moved_dwi)
    out = tmp_path / "dwi.nii"
    moved_dwi.to_nifti(out, order=1, insert_b0=True)
    data, image = _read_nifti(out)
    assert image.get_data_dtype() == np.float32
    assert data.shape == (*SHAPE3D, n + 1)
    bzero = moved_dwi.bzero.compute()
    np.testing.assert_array_equal(data[..., 0], bzero.astype(np.float32))
    np.testing.assert_array_equal(data[..., 1:], moved_dwi.resampled(order=1).dataobj.compute())
    bvals = np.loadtxt(tmp_path / "dwi.bval", ndmin=1)
    bvecs = np.loadtxt(tmp_path / "dwi.bvec", ndmin=2)
    assert bvals.shape == (n + 1,) and bvecs.shape == (3, n + 1)
    assert bvals[0] == 0 and not np.any(bvecs[:, 0])
    np.testing.assert_allclose(bvals[1:], moved_dwi.bvals, atol=0.005)
    np.testing.assert_allclose(
        fsl_to_ras(bvecs[:, 1:].T, moved_dwi.affine),
        _expected_bvecs(moved_dwi.bvecs, moved_dwi.motion_affines),
        atol=5e-6,
    )
    with open(tmp_path / "dwi.bval") as f:
        assert f.read().split()[0] == "0.00"


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_to_nifti_failure_leaves_no_output(moved_dwi, ext, tmp_path):
    """A NIfTI write that fails mid-way leaves no image, sidecar, X5 or temporary."""
    last = moved_dwi.dataobj.numblocks[3] - 1

    def fail_last_block(block, block_info=None):
        if block_info[0]["chunk-location"][3] == last:
            raise RuntimeError("disk on fire")
        return block

    broken = attrs.evolve(
        moved_dwi,
        dataobj=moved_dwi.dataobj.map_blocks(fail_last_block, dtype=moved_dwi.dtype),
        bzero=moved_dwi.bzero.compute(),
    )
    out = tmp_path / f"moco{ext}"
    with dask.config.set(scheduler="synchronous"):  # earlier blocks are written first
        with pytest.raises(RuntimeError, match="disk on fire"):
            broken.to_nifti(out, order=1, write_hmxfms=True, insert_b0=True)
    assert os.listdir(tmp_path) == []
    # the same call without the failure writes all four files
    moved_dwi.to_nifti(out, order=1, write_hmxfms=True, insert_b0=True)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["moco" + ext, "moco.bval", "moco.bvec", "moco.x5"]
    )


# -- NFDH5 ------------------------------------------------------------------------------
def test_nfdh5_roundtrip_resamples_identically(dataset, tmp_path):
    n = len(dataset)
    motions = _motions(n, seed=5, skip={0})
    for i, matrix in motions.items():
        dataset.set_transform(i, matrix)
    path = tmp_path / "moved.h5"
    dataset.to_filename(path)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["0/motion_affines"][()], _stack(n, motions))
    back = nidask.load(path)
    try:
        assert type(back) is type(dataset)
        np.testing.assert_array_equal(back.motion_affines, dataset.motion_affines)
        ours, theirs = dataset.resampled(order=3), back.resampled(order=3)
        np.testing.assert_array_equal(theirs.dataobj.compute(), ours.dataobj.compute())
        if isinstance(dataset, DWI):
            np.testing.assert_array_equal(theirs.gradients, ours.gradients)
            np.testing.assert_array_equal(theirs.bzero, ours.bzero.compute())
        # the exported images hold the same voxels (headers may differ: the NIfTI
        # header template of the source does not travel through NFDH5)
        back.to_nifti(tmp_path / "back.nii", order=3)
        dataset.to_nifti(tmp_path / "ours.nii", order=3)
        np.testing.assert_array_equal(
            _read_nifti(tmp_path / "back.nii")[0], _read_nifti(tmp_path / "ours.nii")[0]
        )
    finally:
        back.close()


def _assert_refused(path, n_wrong, cls, tmp_path):
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(nidask.InputError) as info:
        nidask.load(path)
    assert info.value.path == path
    assert path in str(info.value) and "motion_affines" in str(info.value)
    assert str(n_wrong) in str(info.value)
    with pytest.raises(nidask.InputError):
        cls.from_filename(path)
    assert sorted(os.listdir(tmp_path)) == listing  # nothing written beside it


def _replace_motion(path, stack) -> None:
    with h5py.File(path, "a") as f:
        del f["0/motion_affines"]
        f["0"].create_dataset("motion_affines", data=stack)


@pytest.mark.parametrize("delta", [-1, 1])
def test_nfdh5_wrong_motion_length_is_refused(dataset, delta, tmp_path, inputs_unchanged):
    path = str(tmp_path / "files" / "bad.h5")
    os.mkdir(os.path.dirname(path))
    dataset.set_transform(0, _rigid([1, 0, 0], [0, 0, 3]))
    dataset.to_filename(path)
    stack = dataset.motion_affines
    # the file with a right-length edit loads: the length alone is the fault
    _replace_motion(path, stack[::-1])
    nidask.load(path).close()
    _replace_motion(path, np.concatenate([stack, stack[:1]]) if delta > 0 else stack[:-1])
    inputs_unchanged(os.path.dirname(path))
    _assert_refused(path, len(dataset) + delta, type(dataset), tmp_path)


def _nifreeze_style_dwi(path, dwi_phantom, n_motion) -> None:
    """A DWI NFDH5 file still holding its b=0 volumes (as nifreeze may write)."""
    data, image = _read_nifti(dwi_phantom.image)
    bvecs = np.loadtxt(dwi_phantom.companions["bvec_file"]).T
    gradients = np.column_stack([bvecs, np.loadtxt(dwi_phantom.companions["bval_file"])])
    with h5py.File(path, "w") as f:
        f.attrs["Format"] = "NFDH5"
        f.attrs["Version"] = np.uint16(1)
        f.attrs["Type"] = "dmri"
        root = f.create_group("0")
        root.attrs["Type"] = "base dataset"
        root.create_dataset("dataobj", data=data, chunks=(*SHAPE3D, 1))
        root.create_dataset("affine", data=image.affine)
        root.create_dataset("gradients", data=gradients)
        root.create_dataset("motion_affines", data=np.tile(np.eye(4), (n_motion, 1, 1)))


@pytest.mark.parametrize("delta", [-1, 1])
def test_nfdh5_dwi_with_b0_wrong_motion_length_is_refused(
    delta, tmp_path, dwi_phantom, inputs_unchanged
):
    """The per-file-volume motion stack is checked before the b=0 volumes are dropped."""
    path = str(tmp_path / "files" / "bad.h5")
    os.mkdir(os.path.dirname(path))
    _nifreeze_style_dwi(path, dwi_phantom, N_FILE)
    right = nidask.load(path)
    assert type(right) is DWI and len(right) == N_DIRECTIONS
    assert right.motion_affines.shape == (N_DIRECTIONS, 4, 4)
    right.close()
    _nifreeze_style_dwi(path, dwi_phantom, N_FILE + delta)
    inputs_unchanged(os.path.dirname(path))
    _assert_refused(path, N_FILE + delta, DWI, tmp_path)


# -- schedulers -------------------------------------------------------------------------
def test_threads_and_process_cluster_write_identical_files(moved_dwi, tmp_path, local_cluster):
    from distributed import get_task_stream

    outputs = {}
    for scheduler in ("threads", "cluster"):
        directory = tmp_path / scheduler
        directory.mkdir()
        config = {"scheduler": "threads" if scheduler == "threads" else local_cluster}
        with dask.config.set(config), get_task_stream(local_cluster) as stream:
            for ext in (".nii", ".nii.gz"):
                moved_dwi.to_nifti(directory / f"moco{ext}", order=3, write_hmxfms=True)
        ran_on_cluster = len(stream.data) > 0
        assert ran_on_cluster == (scheduler == "cluster")
        outputs[scheduler] = directory
    for name in ("moco.nii", "moco.nii.gz", "moco.bval", "moco.bvec"):
        with open(outputs["threads"] / name, "rb") as a:
            with open(outputs["cluster"] / name, "rb") as b:
                assert a.read() == b.read(), name
    np.testing.assert_array_equal(
        nt.linear.load(str(outputs["cluster"] / "moco.x5"), fmt="X5").matrix,
        nt.linear.load(str(outputs["threads"] / "moco.x5"), fmt="X5").matrix,
    )
    data, _ = _read_nifti(outputs["cluster"] / "moco.nii.gz")
    whole = moved_dwi.whole_series()  # b=0 volumes included, in file order
    np.testing.assert_array_equal(data, whole.resampled(order=3).dataobj.compute())
