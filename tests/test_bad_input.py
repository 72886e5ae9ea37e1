"""Bad input: every error is an InputError naming the offending file and the problem."""

from __future__ import annotations

import gzip
import os
import re
import shutil

import dask.array as da
import h5py
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import SHAPE3D, write_bvec_bval, write_hdf5_series, write_nifti, write_sidecar
from nidask import PET, BaseDataset, InputError
from nidask.io.nifti import header_bytes, make_header


def assert_names(excinfo, path, phrase: str) -> None:
    """The message names ``path`` (its file name at least) and matches ``phrase``."""
    message = str(excinfo.value)
    assert os.path.basename(os.fspath(path)) in message, message
    assert re.search(phrase, message, re.IGNORECASE), message


def _data(n: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=(*SHAPE3D, n), dtype=np.int16)


def _directions(n: int) -> np.ndarray:
    vectors = np.random.default_rng(1).normal(size=(n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def series(tmp_path):
    """A 10-volume NIfTI with 2 b=0 + 8 DW gradients (bvec, bval)."""
    path = write_nifti(tmp_path / "series.nii", _data())
    bvals = np.r_[0, 0, np.full(8, 1000.0)]
    bvecs = _directions(10)
    bvecs[:2] = 0
    bvec, bval = write_bvec_bval(tmp_path / "series", bvecs, bvals)
    return path, bvec, bval


# -- files ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opener",
    [
        lambda p: nidask.load(p),
        lambda p: nidask.data.dmri.from_nii(p, gradients_file=p),
        lambda p: nidask.data.pet.from_nii(p, temporal_file=p),
        lambda p: BaseDataset.from_filename(p),
    ],
    ids=["load", "dmri", "pet", "from_filename"],
)
def test_missing_file(tmp_path, opener):
    path = tmp_path / "nowhere" / "missing.nii"
    with pytest.raises(InputError) as excinfo:
        opener(path)
    assert_names(excinfo, path, "not found")
    assert str(path) in str(excinfo.value)


def test_missing_companion_file(series, tmp_path):
    path, bvec, _ = series
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, bvec_file=bvec, bval_file=tmp_path / "missing.bval")
    assert_names(excinfo, "missing.bval", "not found")


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.nii"
    if os.geteuid() == 0:
        # permissions do not bind root: a file whose bytes cannot be read as NIfTI
        path.write_bytes(b"this is not a NIfTI header" * 40)
        phrase = "not a readable NIfTI"
    else:
        write_nifti(path, _data(3))
        os.chmod(path, 0)
        phrase = "not readable|permission"
    try:
        with pytest.raises(InputError) as excinfo:
            nidask.load(path)
    finally:
        os.chmod(path, 0o644)
    assert_names(excinfo, path, phrase)


def test_permission_denied_message(tmp_path, monkeypatch):
    """The check behind chmod 000 (which root bypasses), with access denied by a stub."""
    path = write_nifti(tmp_path / "denied.nii", _data(3))
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: p != path and real_access(p, mode, **kw)
    )
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "not readable .*permission denied")


def test_directory_instead_of_file(tmp_path):
    path = tmp_path / "folder.nii"
    path.mkdir()
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "directory")


def test_unreadable_hdf5(tmp_path):
    path = tmp_path / "fake.h5"
    path.write_bytes(b"\x89HDF-but-not-really" * 20)
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "HDF5")


def test_unknown_file_type(tmp_path):
    path = tmp_path / "series.mgz"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "unknown file type")


@pytest.mark.parametrize("shape", [(16, 18), (16, 18, 12, 2, 3), (16, 18, 12, 1, 3)])
def test_not_4d(tmp_path, shape):
    path = write_nifti(tmp_path / "wrong.nii", np.zeros(shape, dtype=np.int16), np.eye(4))
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, r"4D|5D")
    assert str(shape) in str(excinfo.value)


def test_not_4d_hdf5(tmp_path):
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f.attrs["Format"], f.attrs["Version"] = "NFDH5", np.uint16(1)
        f.create_group("0").create_dataset("dataobj", data=np.zeros((5, 6)))
    with pytest.raises(InputError) as excinfo:
        nidask.load(tmp_path / "flat.h5")
    assert_names(excinfo, "flat.h5", "4D")


def test_affine_not_finite(tmp_path):
    header = make_header((*SHAPE3D, 3), "int16", np.eye(4))
    header.set_qform(None, code=0)
    header["srow_x"] = [np.nan, 0, 0, 0]
    path = tmp_path / "nan_affine.nii"
    path.write_bytes(header_bytes(header) + _data(3).tobytes(order="F"))
    assert np.isnan(nb.load(path).affine).any()
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "affine.*non-finite")


def test_affine_not_4x4_direct():
    data = da.zeros((*SHAPE3D, 3), chunks=(*SHAPE3D, 1))
    with pytest.raises(InputError, match=r"4x4.*\(3, 3\)"):
        BaseDataset(dataobj=data, affine=np.eye(3))
    affine = np.eye(4)
    affine[1, 2] = np.inf
    with pytest.raises(InputError, match="non-finite"):
        BaseDataset(dataobj=data, affine=affine)


def test_affine_not_4x4_in_file(tmp_path):
    path = write_hdf5_series(tmp_path / "affine.h5", _data(3))
    with h5py.File(path, "r+") as f:
        del f["0/affine"]
        f["0"].create_dataset("affine", data=np.eye(3))
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "4x4")


def test_nifti_shorter_than_header(tmp_path):
    path = write_nifti(tmp_path / "short.nii", _data(4))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "shorter than its header")


def test_gzip_nifti_shorter_than_header(tmp_path):
    plain = write_nifti(tmp_path / "plain.nii", _data(4))
    with open(plain, "rb") as f:
        content = f.read()
    path = tmp_path / "short.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(content[:-1000])
    ds = nidask.load(path)  # headers only: the problem shows when data are read
    with pytest.raises(InputError) as excinfo:
        ds.dataobj.compute()
    assert_names(excinfo, path, "shorter than its header|truncated")
    assert [n for n in os.listdir(ds.cache.path) if n.endswith(".part")] == []
    ds.close()


def test_gzip_stream_truncated(tmp_path):
    plain = write_nifti(tmp_path / "plain.nii", _data(4))
    shutil.copyfileobj(open(plain, "rb"), gzip.open(tmp_path / "ok.nii.gz", "wb"))
    blob = (tmp_path / "ok.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(blob[: len(blob) // 2])
    ds = nidask.load(path)
    with pytest.raises(InputError) as excinfo:
        ds.dataobj.compute()
    assert_names(excinfo, path, "truncated|corrupt")
    ds.close()


# -- NFDH5 ------------------------------------------------------------------------------
def test_hdf5_without_dataobj(tmp_path):
    path = write_hdf5_series(tmp_path / "nodata.h5", _data(3))
    with h5py.File(path, "r+") as f:
        del f["0/dataobj"]
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "no /0/dataobj")


def test_hdf5_without_group(tmp_path):
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.attrs["Format"], f.attrs["Version"] = "NFDH5", np.uint16(1)
    with pytest.raises(InputError) as excinfo:
        nidask.load(tmp_path / "empty.h5")
    assert_names(excinfo, "empty.h5", "no group /0|no /0/dataobj")


@pytest.mark.parametrize("fmt", ["HDF5-something", None])
def test_hdf5_unknown_format(tmp_path, fmt):
    path = write_hdf5_series(tmp_path / "format.h5", _data(3))
    with h5py.File(path, "r+") as f:
        if fmt is None:
            del f.attrs["Format"]
        else:
            f.attrs["Format"] = fmt
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "unknown Format")


@pytest.mark.parametrize("version", [np.uint16(7), "one", None])
def test_hdf5_unknown_version(tmp_path, version):
    path = write_hdf5_series(tmp_path / "version.h5", _data(3))
    with h5py.File(path, "r+") as f:
        if version is None:
            del f.attrs["Version"]
        else:
            f.attrs["Version"] = version
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "unknown .*Version")


def test_hdf5_unknown_type(tmp_path):
    path = write_hdf5_series(tmp_path / "type.h5", _data(3))
    with h5py.File(path, "r+") as f:
        f["0"].attrs["Type"] = "fmri"
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "unknown dataset Type")


# -- gradients --------------------------------------------------------------------------
def test_bvec_bval_count_differs_from_volumes(series, tmp_path):
    path, _, _ = series
    bvec, bval = write_bvec_bval(tmp_path / "nine", _directions(9), np.full(9, 1000.0))
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert_names(excinfo, bvec, "9 entries.*10 volumes")


def test_bvec_and_bval_disagree(series, tmp_path):
    path, bvec, _ = series
    bval = tmp_path / "eleven.bval"
    np.savetxt(bval, np.full((1, 11), 1000.0))
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert_names(excinfo, bvec, "10 b-vectors but 11 b-values")
    assert "eleven.bval" in str(excinfo.value)


def test_gradients_file_count_mismatch(series, tmp_path):
    path, _, _ = series
    table = np.column_stack([_directions(12), np.full(12, 1000.0)])
    np.savetxt(tmp_path / "grad.txt", table)
    with pytest.raises(InputError) as excinfo:
        nidask.data.dmri.from_nii(path, gradients_file=tmp_path / "grad.txt")
    assert_names(excinfo, "grad.txt", "12 entries.*10 volumes")


def test_gradients_file_wrong_columns(series, tmp_path):
    path, _, _ = series
    np.savetxt(tmp_path / "grad.txt", np.ones((10, 5)))
    with pytest.raises(InputError) as excinfo:
        nidask.data.dmri.from_nii(path, gradients_file=tmp_path / "grad.txt")
    assert_names(excinfo, "grad.txt", r"\(N, 4\)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["bvec", "bval"])
def test_nan_or_infinite_gradients(series, tmp_path, bad, where):
    path, _, _ = series
    bvecs, bvals = _directions(10), np.full(10, 1000.0)
    if where == "bvec":
        bvecs[4, 1] = bad
    else:
        bvals[4] = bad
    bvec, bval = write_bvec_bval(tmp_path / "bad", bvecs, bvals)
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert_names(excinfo, f"bad.{where}", "NaN or infinite")


def test_nan_in_gradients_file(series, tmp_path):
    path, _, _ = series
    table = np.column_stack([_directions(10), np.full(10, 1000.0)])
    table[2, 0] = np.nan
    np.savetxt(tmp_path / "grad.txt", table)
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, gradients_file=tmp_path / "grad.txt")
    assert_names(excinfo, "grad.txt", "NaN or infinite")


def test_unparsable_bval(series, tmp_path):
    path, bvec, _ = series
    bval = tmp_path / "words.bval"
    bval.write_text("zero thousand\n")
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert_names(excinfo, bval, "cannot parse")


def test_fewer_than_six_diffusion_volumes(tmp_path):
    path = write_nifti(tmp_path / "few.nii", _data(8))
    bvals = np.r_[0, 0, 0, np.full(5, 1000.0)]
    bvec, bval = write_bvec_bval(tmp_path / "few", _directions(8), bvals)
    # loadable (for conversion and export); estimation refuses it, naming the model
    dataset = nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert len(dataset) == 5
    with pytest.raises(InputError) as excinfo:
        nidask.Estimator(model="average", progress=False).run(dataset)
    assert_names(
        excinfo, path, "AverageModel needs at least 6 diffusion-weighted volumes, found 5"
    )


def test_brainmask_shape_mismatch(series, tmp_path):
    path, bvec, bval = series
    mask = write_nifti(tmp_path / "mask.nii", np.ones((16, 18, 11), dtype=np.uint8))
    for kwargs in ({}, {"bvec_file": bvec, "bval_file": bval}):
        with pytest.raises(InputError) as excinfo:
            nidask.load(path, brainmask_file=mask, **kwargs)
        assert_names(excinfo, mask, r"brain mask shape \(16, 18, 11\) differs")


def test_brainmask_4d(series, tmp_path):
    path, _, _ = series
    mask = write_nifti(tmp_path / "mask4d.nii", np.ones((*SHAPE3D, 2), dtype=np.uint8))
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, brainmask_file=mask)
    assert_names(excinfo, mask, "brain mask")


def test_b0_file_shape_mismatch(series, tmp_path):
    path, bvec, bval = series
    b0 = write_nifti(tmp_path / "b0.nii", np.ones((15, 18, 12), dtype=np.float32))
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, bvec_file=bvec, bval_file=bval, b0_file=b0)
    assert_names(excinfo, b0, r"b=0 file shape \(15, 18, 12\) differs")


# -- PET --------------------------------------------------------------------------------
@pytest.fixture
def pet_series(tmp_path):
    data = np.random.default_rng(0).random((*SHAPE3D, 4), dtype=np.float32)
    return write_nifti(tmp_path / "pet.nii", data)


def test_pet_sidecar_without_frame_times(pet_series, tmp_path):
    sidecar = write_sidecar(tmp_path / "pet.json", FrameDuration=[10, 10, 10, 10])
    with pytest.raises(InputError) as excinfo:
        nidask.load(pet_series, temporal_file=sidecar)
    assert_names(excinfo, sidecar, "no FrameTimesStart")


def test_pet_sidecar_not_json(pet_series, tmp_path):
    sidecar = tmp_path / "pet.json"
    sidecar.write_text("{FrameTimesStart: [0, 1")
    with pytest.raises(InputError) as excinfo:
        nidask.load(pet_series, temporal_file=sidecar)
    assert_names(excinfo, sidecar, "not a valid JSON")


@pytest.mark.parametrize(
    "fields",
    [
        {"FrameTimesStart": [0, 10, 20]},
        {"FrameTimesStart": [0, 10, 20, 30, 40], "FrameDuration": [10] * 5},
    ],
)
def test_pet_timing_wrong_frame_count(pet_series, tmp_path, fields):
    sidecar = write_sidecar(tmp_path / "pet.json", **fields)
    with pytest.raises(InputError) as excinfo:
        nidask.load(pet_series, temporal_file=sidecar)
    count = len(fields["FrameTimesStart"])
    assert_names(excinfo, sidecar, f"{count} frames but the series has 4")


def test_pet_durations_count_differs(pet_series, tmp_path):
    sidecar = write_sidecar(
        tmp_path / "pet.json", FrameTimesStart=[0, 10, 20, 30], FrameDuration=[10, 10, 10]
    )
    with pytest.raises(InputError) as excinfo:
        nidask.load(pet_series, temporal_file=sidecar)
    assert_names(excinfo, sidecar, "FrameDuration has 3 entries")


@pytest.mark.parametrize("starts", [[0, 10, 10, 30], [0, 20, 10, 30]])
def test_pet_non_increasing_starts(pet_series, tmp_path, starts):
    sidecar = write_sidecar(tmp_path / "pet.json", FrameTimesStart=starts)
    with pytest.raises(InputError) as excinfo:
        nidask.load(pet_series, temporal_file=sidecar)
    assert_names(excinfo, sidecar, "strictly increasing")


@pytest.mark.parametrize(
    "durations, phrase",
    [([10, 10, 10, 0], "positive"), ([10, 10, 10, -5], "positive"), ([10, 25, 10, 10], "overlap")],
)
def test_pet_inconsistent_durations(pet_series, tmp_path, durations, phrase):
    sidecar = write_sidecar(
        tmp_path / "pet.json", FrameTimesStart=[0, 10, 20, 30], FrameDuration=durations
    )
    with pytest.raises(InputError) as excinfo:
        nidask.load(pet_series, temporal_file=sidecar)
    assert_names(excinfo, sidecar, phrase)


def test_pet_total_duration_not_after_last_midframe(tmp_path):
    data = da.zeros((*SHAPE3D, 3), chunks=(*SHAPE3D, 1))
    with pytest.raises(InputError, match="total_duration .* must exceed the last midframe"):
        PET(dataobj=data, affine=np.eye(4), midframe=[5, 15, 25], total_duration=25)
    # the same inconsistency in a file names the file
    path = tmp_path / "pet.h5"
    PET(dataobj=data, affine=np.eye(4), midframe=[5, 15, 25], total_duration=30).to_filename(path)
    with h5py.File(path, "r+") as f:
        f["0/total_duration"][()] = 20.0
    with pytest.raises(InputError) as excinfo:
        nidask.load(path)
    assert_names(excinfo, path, "must exceed the last midframe")


def test_pet_without_temporal_file(pet_series):
    with pytest.raises(InputError) as excinfo:
        nidask.data.pet.from_nii(pet_series)
    assert_names(excinfo, pet_series, "temporal_file")
