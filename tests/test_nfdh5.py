"""NFDH5: lazy round trips, v2 layout, on-disk layout and attributes, atomic writes."""

from __future__ import annotations

import contextlib
import os

import dask
import dask.array as da
import h5py
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import N_B0, N_DIRECTIONS, SHAPE3D, graph_sources, write_hdf5_series
from nidask import DWI, PET, BaseDataset
from nidask.geometry import ras_to_fsl
from nidask.io.sources import HDF5Source


def _rigid(tx: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = [tx, -tx / 2, 1.0]
    return matrix


def _assert_lazy_hdf5(ds, path):
    assert isinstance(ds.dataobj, da.Array)
    sources = graph_sources(ds.dataobj)
    assert len(sources) == 1
    assert isinstance(sources[0], HDF5Source)
    assert sources[0].path == os.path.abspath(path)
    assert sources[0].key == "/0/dataobj"


@contextlib.contextmanager
def dataobj_not_read():
    """Within the context, reading /0/dataobj through h5py raises."""
    original = h5py.Dataset.__getitem__

    def guarded(self, key):
        if self.name == "/0/dataobj":
            raise AssertionError("dataobj was read while opening")
        return original(self, key)

    h5py.Dataset.__getitem__ = guarded
    try:
        yield
    finally:
        h5py.Dataset.__getitem__ = original


def _roundtrip(ds, path):
    ds.to_filename(path)
    with dataobj_not_read():
        back = type(ds).from_filename(path)
    _assert_lazy_hdf5(back, path)
    return back


def test_roundtrip_base(dwi_phantom, tmp_path):
    ds = nidask.load(dwi_phantom.image, brainmask_file=dwi_phantom.companions["brainmask_file"])
    ds.set_transform(3, _rigid(2.0))
    back = _roundtrip(ds, tmp_path / "base.h5")
    assert type(back) is BaseDataset
    assert back == ds
    np.testing.assert_array_equal(back.affine, ds.affine)
    np.testing.assert_array_equal(back.brainmask, ds.brainmask)
    np.testing.assert_array_equal(back.motion_affines, ds.motion_affines)
    np.testing.assert_array_equal(back.original_index, np.arange(len(ds)))
    assert back.dtype == ds.dtype
    np.testing.assert_array_equal(
        back.dataobj.compute(), np.asanyarray(nb.load(dwi_phantom.image).dataobj)
    )


def test_roundtrip_dwi(dwi_phantom, tmp_path):
    dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    back = _roundtrip(dwi, tmp_path / "dwi.h5")
    assert type(back) is DWI
    assert back == dwi
    assert len(back) == N_DIRECTIONS
    np.testing.assert_array_equal(back.gradients, dwi.gradients)
    np.testing.assert_array_equal(back.original_index, np.arange(N_B0, N_B0 + N_DIRECTIONS))
    np.testing.assert_array_equal(np.asarray(back.bzero), dwi.bzero.compute())
    np.testing.assert_array_equal(back.dataobj.compute(), dwi.dataobj.compute())


def test_roundtrip_pet(pet_phantom, tmp_path):
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    back = _roundtrip(pet, tmp_path / "pet.h5")
    assert type(back) is PET
    assert back == pet
    np.testing.assert_array_equal(back.midframe, pet.midframe)
    assert back.total_duration == pet.total_duration
    np.testing.assert_array_equal(back.dataobj.compute(), pet.dataobj.compute())


def test_roundtrip_compressed(pet_phantom, tmp_path):
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    pet.to_filename(tmp_path / "pet.h5", compression="gzip")
    with h5py.File(tmp_path / "pet.h5") as f:
        assert f["0/dataobj"].compression == "gzip"
        assert f["0/dataobj"].chunks == (*SHAPE3D, 1)
    assert nidask.load(tmp_path / "pet.h5") == pet


def test_v2_layout_reads_lazily(tmp_path):
    data = np.random.default_rng(1).random((*SHAPE3D, 7), dtype=np.float32)
    path = write_hdf5_series(tmp_path / "v2.h5", data, volume_major=True)
    with h5py.File(path) as f:
        assert f["0/dataobj"].shape == (7, *SHAPE3D)
        assert f["0/dataobj"].attrs["volume_axis"] == 0
    with dataobj_not_read():
        ds = nidask.load(path)
    _assert_lazy_hdf5(ds, path)
    assert type(ds) is BaseDataset
    assert ds.shape == (*SHAPE3D, 7)
    assert graph_sources(ds.dataobj)[0].volume_major
    np.testing.assert_array_equal(ds.dataobj.compute(), data)
    np.testing.assert_array_equal(ds[5][0].compute(), data[..., 5])
    np.testing.assert_array_equal(ds[[6, 1]][0].compute(), data[..., [6, 1]])
    # and it writes back as v1 with the same content
    ds.to_filename(tmp_path / "v1.h5")
    with h5py.File(tmp_path / "v1.h5") as f:
        assert f["0/dataobj"].shape == (*SHAPE3D, 7)
        np.testing.assert_array_equal(f["0/dataobj"][()], data)


def test_nifreeze_style_dwi_with_b0_rows(tmp_path):
    """A DWI file holding its b=0 volumes: they leave dataobj and make the bzero."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 1000, size=(*SHAPE3D, 9), dtype=np.int16)
    gradients = np.zeros((9, 4))
    gradients[3:, :3] = np.eye(3)[np.arange(6) % 3]
    gradients[3:, 3] = 1000
    gradients[[0, 1, 2], 3] = [0, 5, 0]
    with h5py.File(tmp_path / "nf.h5", "w") as f:
        f.attrs["Format"] = "NFDH5"
        f.attrs["Version"] = np.uint16(1)
        f.attrs["Type"] = "dmri"
        root = f.create_group("0")
        root.attrs["Type"] = "base dataset"
        root.create_dataset("dataobj", data=data)
        root.create_dataset("affine", data=np.eye(4))
        root.create_dataset("gradients", data=gradients)
    dwi = nidask.load(tmp_path / "nf.h5")
    assert type(dwi) is DWI
    assert len(dwi) == 6
    np.testing.assert_array_equal(dwi.original_index, np.arange(3, 9))
    np.testing.assert_array_equal(dwi.dataobj.compute(), data[..., 3:])
    np.testing.assert_array_equal(
        dwi.bzero.compute(), np.median(data[..., :3], axis=-1).astype(np.float32)
    )


def test_info_reports_the_layout_the_reader_takes(tmp_path):
    """``volume_axis=-1`` marks the (X, Y, Z, N) layout: ``load`` and ``info`` agree."""
    from nidask.cli.info import describe

    data = np.random.default_rng(2).random((*SHAPE3D, 3), dtype=np.float32)
    path = write_hdf5_series(tmp_path / "last.h5", data)
    with h5py.File(path, "a") as f:
        f["0/dataobj"].attrs["volume_axis"] = -1
    with nidask.load(path) as ds:
        assert ds.shape == (*SHAPE3D, 3)
        np.testing.assert_array_equal(ds.dataobj.compute(), data)
        assert describe(ds, str(path))["layout"] == "(X, Y, Z, N)"
    major = write_hdf5_series(tmp_path / "major.h5", data, volume_major=True)
    with nidask.load(major) as ds:
        assert describe(ds, str(major))["layout"] == "(N, X, Y, Z)"


def test_written_layout_and_attributes(dwi_phantom, pet_phantom, tmp_path):
    base = nidask.load(dwi_phantom.image)
    dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    expected = {
        "base": (base, "NFDH5", "base dataset", None),
        "dwi": (dwi, "NFDH5", "dmri", "dmri"),
        "pet": (pet, "EMC/PET", "pet", None),
    }
    for name, (ds, fmt, kind, file_type) in expected.items():
        path = tmp_path / f"{name}.h5"
        ds.to_filename(path)
        with h5py.File(path, "r") as f:
            assert f.attrs["Format"] == fmt
            version = f.attrs["Version"]
            assert version == 1 and np.asarray(version).dtype == np.uint16
            assert f["0"].attrs["Type"] == kind
            if file_type is None:
                assert "Type" not in f.attrs
            else:
                assert f.attrs["Type"] == file_type
            dset = f["0/dataobj"]
            assert dset.shape == ds.shape  # v1 logical layout (X, Y, Z, N)
            assert dset.chunks == (*SHAPE3D, 1)  # one whole volume per HDF5 chunk
            assert "volume_axis" not in dset.attrs
            assert dset.dtype == ds.dtype
            np.testing.assert_array_equal(f["0/affine"][()], ds.affine)
            if name == "dwi":
                # nifreeze's frame: FSL's numbers along the voxel axes (x negated here)
                stored = f["0/gradients"][()]
                np.testing.assert_array_equal(stored[:, 3], dwi.gradients[:, 3])
                np.testing.assert_allclose(
                    stored[:, :3], ras_to_fsl(dwi.gradients[:, :3], dwi.affine), atol=1e-15
                )
                np.testing.assert_allclose(stored[:, 0], -dwi.gradients[:, 0], atol=1e-15)
                np.testing.assert_array_equal(f["0/bzero"][()], dwi.bzero.compute())
            if name == "pet":
                np.testing.assert_array_equal(f["0/midframe"][()], pet.midframe)
                assert f["0/total_duration"][()] == pet.total_duration
        assert sorted(os.listdir(tmp_path)) == sorted(
            f"{n}.h5" for n in list(expected)[: list(expected).index(name) + 1]
        )


@pytest.mark.parametrize("scheduler", ["processes", "distributed"])
def test_write_on_process_schedulers(scheduler, pet_phantom, tmp_path, process_pool, request):
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    volume_bytes = int(np.prod(SHAPE3D)) * 4
    with dask.config.set({"nidask.chunk-size": 2 * volume_bytes}):
        chunked = nidask.load(pet_phantom.image, **pet_phantom.companions)
    assert chunked.dataobj.numblocks[3] == 3
    if scheduler == "processes":
        with dask.config.set(scheduler="processes", pool=process_pool):
            chunked.to_filename(tmp_path / "out.h5")
    else:
        client = request.getfixturevalue("local_cluster")
        with dask.config.set(scheduler=client):
            chunked.to_filename(tmp_path / "out.h5")
    with h5py.File(tmp_path / "out.h5") as f:
        written = f["0/dataobj"][()]
    assert np.abs(written).max() > 0  # not silently left as zeros
    np.testing.assert_array_equal(written, pet.dataobj.compute())


def _failing_dataset() -> BaseDataset:
    def second_block_fails(block, block_info=None):
        if block_info[0]["chunk-location"][3] == 1:
            raise RuntimeError("task failed mid-write")
        return block

    data = da.ones((*SHAPE3D, 4), chunks=(*SHAPE3D, 1), dtype="float32")
    failing = data.map_blocks(second_block_fails, dtype="float32")
    return BaseDataset(dataobj=failing, affine=np.eye(4))


def test_write_is_atomic(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ds = _failing_dataset()
    with pytest.raises(RuntimeError, match="mid-write"):
        ds.to_filename(out / "series.h5")
    assert not (out / "series.h5").exists()
    assert os.listdir(out) == []  # no temporary file left behind


def test_failed_write_keeps_existing_file(tmp_path):
    target = tmp_path / "series.h5"
    target.write_bytes(b"previous content")
    with pytest.raises(RuntimeError, match="mid-write"):
        _failing_dataset().to_filename(target)
    assert target.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["series.h5"]


def test_write_refuses_to_replace_its_input(tmp_path, pet_phantom):
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    pet.to_filename(tmp_path / "pet.h5")
    back = nidask.load(tmp_path / "pet.h5")
    before = (tmp_path / "pet.h5").read_bytes()
    with pytest.raises(nidask.OutputError, match="input"):
        back.to_filename(tmp_path / "pet.h5")
    assert (tmp_path / "pet.h5").read_bytes() == before
    assert back == pet
