"""The streaming NIfTI writer: data identical to nibabel's, a faithful header, any scheduler."""

from __future__ import annotations

import gzip
import math
import os
import subprocess
import sys
import zlib

import dask
import h5py
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import SHAPE3D, write_nifti
from nidask.io import nifti, store
from nidask.validation.phantom import phantom_affine

N = 7
TR = 2.5
DESCRIP = b"nidask writer test"
#: two volumes per chunk: four blocks, the last one short
CHUNK_VOLUMES = 2


def _chunked(itemsize: int = 2):
    return dask.config.set({"nidask.chunk-size": CHUNK_VOLUMES * math.prod(SHAPE3D) * itemsize})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An int16 series with TR, description, time units and odd geometry in its header."""
    directory = tmp_path_factory.mktemp("writer")
    rng = np.random.default_rng(3)
    data = rng.integers(-2000, 30000, size=(*SHAPE3D, N), dtype=np.int16)
    affine = phantom_affine(SHAPE3D, zooms=(2.0, 2.5, 3.0))
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # oblique-ish
    image = nb.Nifti1Image(data, affine)
    image.header["descrip"] = DESCRIP
    image.header.set_xyzt_units("mm", "msec")
    image.header["pixdim"][4] = TR
    image.header.set_dim_info(freq=0, phase=1, slice=2)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=4)
    path = os.fspath(directory / "series.nii")
    image.to_filename(path)
    return path, data, affine


def _data_section(path) -> bytes:
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    offset = int(np.frombuffer(raw[108:112], dtype="<f4")[0])
    return raw[offset:]


def _raw_header(path) -> nb.Nifti1Header:
    """The header exactly as stored in the file (``nb.load`` resets some fields)."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return nb.Nifti1Header.from_fileobj(f)


def _nibabel_file(tmp_path, array, affine, name) -> str:
    path = os.fspath(tmp_path / name)
    nb.Nifti1Image(array, affine).to_filename(path)
    return path


def _gzip_members(path) -> int:
    with open(path, "rb") as f:
        raw = f.read()
    count = 0
    while raw:
        decompressor = zlib.decompressobj(31)
        decompressor.decompress(raw)
        assert decompressor.eof
        raw = decompressor.unused_data
        count += 1
    return count


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_data_bytes_identical_to_nibabel(suffix, source, tmp_path):
    path, data, affine = source
    with _chunked():
        ds = nidask.load(path)
    assert ds.dataobj.numblocks[3] == 4
    out = tmp_path / f"out{suffix}"
    ds.to_nifti(out)
    reference = _nibabel_file(tmp_path, data, affine, f"ref{suffix}")
    assert _data_section(out) == _data_section(reference)
    assert len(_data_section(out)) == data.nbytes
    loaded = nb.load(out)
    assert loaded.get_data_dtype() == np.int16  # the source dtype, without motion
    assert loaded.shape == data.shape
    np.testing.assert_array_equal(np.asanyarray(loaded.dataobj), data)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_resampled_output_is_float32_like_nibabel(suffix, source, tmp_path):
    path, _, affine = source
    with _chunked():
        ds = nidask.load(path)
    shift = np.eye(4)
    shift[:3, 3] = (1.5, -2.0, 0.5)
    ds.set_transform(3, shift)
    ds.set_transform(6, np.linalg.inv(shift))
    expected = ds.resampled(order=3).dataobj.compute()
    assert expected.dtype == np.float32
    out = tmp_path / f"moved{suffix}"
    ds.to_nifti(out, order=3)
    reference = _nibabel_file(tmp_path, expected, affine, f"ref{suffix}")
    assert _data_section(out) == _data_section(reference)
    assert nb.load(out).get_data_dtype() == np.float32


def test_dtype_argument(source, tmp_path):
    path, data, affine = source
    with _chunked():
        ds = nidask.load(path)
    ds.to_nifti(tmp_path / "f.nii", dtype="float32")
    assert nb.load(tmp_path / "f.nii").get_data_dtype() == np.float32
    reference = _nibabel_file(tmp_path, data.astype(np.float32), affine, "ref.nii")
    assert _data_section(tmp_path / "f.nii") == _data_section(reference)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header(suffix, source, tmp_path):
    path, data, affine = source
    with _chunked():
        ds = nidask.load(path)
    out = tmp_path / f"out{suffix}"
    ds.to_nifti(out)
    header = _raw_header(out)
    np.testing.assert_allclose(header.get_sform(), affine, atol=1e-5)
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)
    assert int(header["sform_code"]) == 4 and int(header["qform_code"]) == 1
    assert header.get_xyzt_units() == ("mm", "msec")
    assert header.get_data_shape() == data.shape
    assert header.get_data_dtype() == np.int16
    np.testing.assert_allclose(header.get_zooms(), (2.5, 2.0, 3.0, TR))
    assert header["pixdim"][4] == TR
    assert header["descrip"].tobytes().rstrip(b"\0") == DESCRIP
    assert header.get_dim_info() == (0, 1, 2)
    assert int(header["vox_offset"]) == 352
    assert header.get_slope_inter() in ((None, None), (1.0, 0.0))  # data written as they are
    assert nb.load(out).header.get_slope_inter() == (None, None)


def test_units_mm_without_source_header(tmp_path):
    data = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    np.save(tmp_path / "series.npy", data)
    ds = nidask.load(tmp_path / "series.npy")
    ds.to_nifti(tmp_path / "out.nii")
    header = _raw_header(tmp_path / "out.nii")
    assert header.get_xyzt_units()[0] == "mm"
    assert header.get_data_dtype() == np.float32
    assert int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0
    np.testing.assert_array_equal(np.asanyarray(nb.load(tmp_path / "out.nii").dataobj), data)


def test_scaled_source_becomes_float32(tmp_path):
    data = np.arange(np.prod(SHAPE3D) * 3, dtype=np.int16).reshape(*SHAPE3D, 3) % 1000
    path = write_nifti(tmp_path / "scaled.nii", data, slope=0.5, inter=10.0, dtype=np.int16)
    ds = nidask.load(path)
    ds.to_nifti(tmp_path / "out.nii")
    image = nb.load(tmp_path / "out.nii")
    assert image.get_data_dtype() == np.float32
    # the source's scaling was applied once and is not stored again
    assert _raw_header(tmp_path / "out.nii").get_slope_inter() in ((None, None), (1.0, 0.0))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), data * 0.5 + 10.0)


WITHOUT_ISAL = """
import sys
sys.modules["isal"] = None  # as if isal were not installed: importing it fails
import nidask
from nidask.io import deflate
assert not deflate.ACCELERATED
with nidask.load(sys.argv[1]) as ds:
    ds.to_nifti(sys.argv[2])
with nidask.load(sys.argv[2]) as again:  # and read back through zlib
    again.to_nifti(sys.argv[3])
"""


def test_gzip_without_isal_writes_and_reads_the_same_series(source, tmp_path):
    """zlib serves where ISA-L is missing: the same decompressed bytes either way."""
    from nidask.io import deflate

    assert deflate.ACCELERATED  # a dependency: the suite runs with it
    path, data, _ = source
    script = tmp_path / "child.py"
    script.write_text(WITHOUT_ISAL)
    zlib_gz, zlib_nii = tmp_path / "zlib.nii.gz", tmp_path / "zlib.nii"
    child = subprocess.run(
        [sys.executable, str(script), path, str(zlib_gz), str(zlib_nii)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    with nidask.load(path) as ds:
        ds.to_nifti(tmp_path / "isal.nii.gz")
    with gzip.open(tmp_path / "isal.nii.gz", "rb") as a, gzip.open(zlib_gz, "rb") as b:
        assert a.read() == b.read()
    np.testing.assert_array_equal(np.asanyarray(nb.load(zlib_nii).dataobj), data)


def test_gzip_output_is_multi_member_and_readable(source, tmp_path):
    path, data, _ = source
    with _chunked():
        ds = nidask.load(path)
    out = tmp_path / "out.nii.gz"
    ds.to_nifti(out)
    # one member for the header, one per block of volumes
    assert _gzip_members(out) == 1 + ds.dataobj.numblocks[3]
    with gzip.open(out, "rb") as f:
        raw = f.read()
    assert len(raw) == 352 + data.nbytes
    assert raw[344:348] == b"n+1\0"
    np.testing.assert_array_equal(
        np.frombuffer(raw[352:], dtype=np.int16).reshape(data.shape, order="F"), data
    )
    np.testing.assert_array_equal(np.asanyarray(nb.load(out).dataobj), data)
    # and nidask reads its own output back (decompressed once into the cache)
    with nidask.load(out) as again:
        np.testing.assert_array_equal(again.dataobj.compute(), data)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_same_file_on_threads_and_cluster(suffix, dwi_phantom, tmp_path, local_cluster):
    with _chunked():
        dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    shift = np.eye(4)
    shift[:3, 3] = (0.7, 0.0, -1.2)
    dwi.set_transform(2, shift)
    with dask.config.set(scheduler="threads"):
        dwi.to_nifti(tmp_path / f"threads{suffix}")
    with dask.config.set(scheduler=local_cluster):
        dwi.to_nifti(tmp_path / f"cluster{suffix}")
    threads = (tmp_path / f"threads{suffix}").read_bytes()
    assert threads == (tmp_path / f"cluster{suffix}").read_bytes()
    for sidecar in (".bval", ".bvec"):
        assert (tmp_path / f"threads{sidecar}").read_text() == (
            tmp_path / f"cluster{sidecar}"
        ).read_text()
    moved = np.asanyarray(nb.load(tmp_path / f"cluster{suffix}").dataobj)
    # the whole series: the b=0 volumes are written too, in their file positions
    np.testing.assert_array_equal(moved, dwi.whole_series().resampled().dataobj.compute())
    assert np.abs(moved).max() > 0
    dwi.close()


def _counting_target(monkeypatch, cls):
    """Record the shape of every block written through ``cls.__setitem__``."""
    blocks = []
    original = cls.__setitem__

    def spy(self, key, value):
        blocks.append(np.shape(value))
        original(self, key, value)

    monkeypatch.setattr(cls, "__setitem__", spy)
    return blocks


def test_nifti_is_written_block_by_block(source, tmp_path, monkeypatch):
    path, data, affine = source
    blocks = _counting_target(monkeypatch, store.VolumeFileTarget)
    with _chunked(), dask.config.set(scheduler="threads"):
        computed = nidask.load(path)
        computed.dataobj = computed.dataobj * np.int16(1)  # a graph, not the file itself
        computed.to_nifti(tmp_path / "out.nii")
    assert sorted(b[3] for b in blocks) == [1, 2, 2, 2]
    assert all(b[:3] == SHAPE3D for b in blocks)
    reference = _nibabel_file(tmp_path, data, affine, "ref.nii")
    assert _data_section(tmp_path / "out.nii") == _data_section(reference)


def _counting_copies(monkeypatch) -> list[int]:
    """Record the byte count of every file-to-file copy."""
    counts = []
    original = store.copy_range

    def spy(src, dst, src_offset, dst_offset, count):
        counts.append(count)
        original(src, dst, src_offset, dst_offset, count)

    monkeypatch.setattr(store, "copy_range", spy)
    return counts


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "pread-pwrite"])
def test_unchanged_volumes_are_copied_file_to_file(source, tmp_path, monkeypatch, kernel):
    """An unscaled .nii (or a selection of its volumes) is copied without a read into memory,
    with the same bytes as nibabel writes; without copy_file_range, by pread/pwrite."""
    path, data, affine = source
    if not kernel:

        def unsupported(*args):
            raise OSError(18, "Invalid cross-device link")  # EXDEV

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    blocks = _counting_target(monkeypatch, store.VolumeFileTarget)
    copies = _counting_copies(monkeypatch)
    volume_bytes = math.prod(SHAPE3D) * 2
    with _chunked(), dask.config.set(scheduler="threads"):
        ds = nidask.load(path)
        ds.to_nifti(tmp_path / "out.nii")
        picked = ds.select([6, 0, 1, 2])
        picked.materialize(tmp_path / "picked.npy")
    assert blocks == []  # nothing went through memory
    # the export's chunks (2, 2, 2, 1 volumes), then the runs [6], [0] and [1, 2]
    assert sorted(copies) == [volume_bytes * n for n in (1, 1, 1, 2, 2, 2, 2)]
    reference = _nibabel_file(tmp_path, data, affine, "ref.nii")
    assert _data_section(tmp_path / "out.nii") == _data_section(reference)
    np.testing.assert_array_equal(np.load(tmp_path / "picked.npy"), data[..., [6, 0, 1, 2]])
    ds.close()


def test_scaled_or_converted_volumes_are_computed(tmp_path, monkeypatch):
    """Scaled data (float32 values from int16 bytes) cannot be copied byte for byte."""
    data = np.arange(math.prod(SHAPE3D) * 3, dtype=np.int16).reshape(*SHAPE3D, 3)
    path = write_nifti(tmp_path / "scaled.nii", data, slope=0.5, inter=1.0)
    copies = _counting_copies(monkeypatch)
    with nidask.load(path) as ds:
        ds.to_nifti(tmp_path / "out.nii")
        ds.materialize(tmp_path / "as_int.npy").to_nifti(tmp_path / "as_float64.nii", dtype="f8")
    assert copies == []
    expected = data * np.float32(0.5) + np.float32(1.0)
    np.testing.assert_array_equal(nb.load(tmp_path / "out.nii").get_fdata(), expected)
    np.testing.assert_array_equal(nb.load(tmp_path / "as_float64.nii").get_fdata(), expected)


def test_to_filename_uses_the_same_machinery(source, tmp_path, monkeypatch, local_cluster):
    path, data, affine = source
    blocks = _counting_target(monkeypatch, store.HDF5Target)
    with _chunked():
        ds = nidask.load(path)
    with dask.config.set(scheduler="threads"):
        ds.to_filename(tmp_path / "threads.h5")
    # streamed: one whole-volume block per task, never the whole series at once
    assert sorted(b[3] for b in blocks) == [1, 2, 2, 2]
    with dask.config.set(scheduler=local_cluster):
        ds.to_filename(tmp_path / "cluster.h5")
    for name in ("threads.h5", "cluster.h5"):
        with h5py.File(tmp_path / name, "r") as f:
            dset = f["0/dataobj"]
            assert dset.chunks == (*SHAPE3D, 1) and dset.dtype == np.int16
            np.testing.assert_array_equal(dset[()], data)
            np.testing.assert_allclose(f["0/affine"][()], affine)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    back = nidask.load(tmp_path / "cluster.h5")
    back.to_nifti(tmp_path / "back.nii")
    reference = _nibabel_file(tmp_path, data, affine, "ref.nii")
    assert _data_section(tmp_path / "back.nii") == _data_section(reference)


def test_buffering_writers_take_small_blocks(source, tmp_path, monkeypatch):
    """HDF5 and gzip writers hold a copy of their block: blocks are a quarter budget."""
    path, data, _ = source
    h5_blocks = _counting_target(monkeypatch, store.HDF5Target)
    gz_blocks = _counting_target(monkeypatch, nifti.GzipMemberTarget)
    with _chunked(), dask.config.set(scheduler="threads"):
        ds = nidask.load(path)
        assert set(ds.dataobj.chunks[3]) <= {1, CHUNK_VOLUMES}
        ds.to_filename(tmp_path / "out.h5")
        ds.to_nifti(tmp_path / "out.nii.gz")
    assert [b[3] for b in h5_blocks] == [1] * N
    assert [b[3] for b in gz_blocks] == [1] * N
    np.testing.assert_array_equal(np.asanyarray(nb.load(tmp_path / "out.nii.gz").dataobj), data)
    with nidask.load(tmp_path / "out.h5") as back:
        np.testing.assert_array_equal(back.dataobj.compute(), data)
    ds.close()
