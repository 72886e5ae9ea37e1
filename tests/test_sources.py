"""Sources: values, chunking, tokens, header-only opening, small graphs, scaling, gzip cache."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil

import cloudpickle
import dask
import dask.array as da
import h5py
import nibabel as nb
import numpy as np
import pytest
from dask.base import tokenize

import nidask
from conftest import (
    SHAPE3D,
    SOURCE_KINDS,
    graph_sources,
    open_kind,
    record_reads,
    reference_data,
    write_bvec_bval,
    write_nifti,
)
from nidask.data.base import take_volumes
from nidask.io import deflate
from nidask.io.nifti import header_bytes, make_header
from nidask.io.sources import (
    GzipNiftiSource,
    HDF5Source,
    NiftiSource,
    NpySource,
    VolumeSelection,
    open_source,
    source_of,
)
from nidask.validation.phantom import phantom_affine

N = 10


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_values_match_library_read(kind, source_files, cache):
    path = source_files[kind]
    expected = reference_data(path, kind)
    source = open_kind(path, kind, cache)
    array = source.to_dask()
    assert isinstance(array, da.Array)
    assert array.shape == expected.shape == (*SHAPE3D, N)
    assert array.dtype == expected.dtype
    result = array.compute()
    assert result.dtype == expected.dtype
    np.testing.assert_array_equal(result, expected)
    # direct slicing of the source, as dask tasks do
    np.testing.assert_array_equal(source[:, :, :, 3:5], expected[..., 3:5])
    # a single volume through the lazy array
    np.testing.assert_array_equal(array[..., 7].compute(), expected[..., 7])


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_reads_only_the_volumes_asked_for(kind, source_files, cache, monkeypatch):
    """A volume, a slice or a selection reads its own volumes, not whole chunks."""
    path = source_files[kind]
    expected = reference_data(path, kind)
    source = open_kind(path, kind, cache)
    array = source.to_dask(per_chunk=5)
    reads = record_reads(monkeypatch, type(source))
    np.testing.assert_array_equal(array[..., 7].compute(), expected[..., 7])
    assert reads == [(7, 8)]
    reads.clear()
    np.testing.assert_array_equal(array[2:9, :, -1, 1:4].compute(), expected[2:9, :, -1, 1:4])
    assert reads == [(1, 4)]
    reads.clear()
    # a selection is a view of the file: its chunks read runs of consecutive volumes
    picked = take_volumes(array, [9, 1, 2, 3, 6])
    assert isinstance(source_of(picked), VolumeSelection) and picked.chunks[3] == (5,)
    np.testing.assert_array_equal(picked.compute(), expected[..., [9, 1, 2, 3, 6]])
    assert sorted(reads) == [(1, 4), (6, 7), (9, 10)]
    reads.clear()
    # a selection of a selection still reads the file once per run
    np.testing.assert_array_equal(take_volumes(picked, [2, 3])[..., 1].compute(), expected[..., 3])
    assert reads == [(3, 4)]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_open_source_dispatch(kind, source_files, cache):
    expected = {
        "nii": NiftiSource,
        "nii.gz": GzipNiftiSource,
        "h5v1": HDF5Source,
        "h5v2": HDF5Source,
        "npyC": NpySource,
        "npyF": NpySource,
    }[kind]
    source = open_source(source_files[kind], cache=cache)
    assert type(source) is expected
    np.testing.assert_array_equal(
        source.to_dask()[..., 2].compute(), reference_data(source_files[kind], kind)[..., 2]
    )


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_whole_volume_chunks_follow_config(kind, source_files, cache):
    source = open_kind(source_files[kind], kind, cache)
    volume_bytes = math.prod(SHAPE3D) * source.dtype.itemsize
    with dask.config.set({"nidask.chunk-size": 3 * volume_bytes + 1}):
        array = source.to_dask()
    assert array.chunks == ((SHAPE3D[0],), (SHAPE3D[1],), (SHAPE3D[2],), (3, 3, 3, 1))
    with dask.config.set({"nidask.chunk-size": "1KiB"}):  # smaller than one volume
        array = source.to_dask()
    assert array.chunks[3] == (1,) * N
    assert array.chunks[:3] == ((SHAPE3D[0],), (SHAPE3D[1],), (SHAPE3D[2],))
    with dask.config.set({"nidask.chunk-size": "64MiB"}):
        assert source.to_dask().chunks[3] == (N,)
    # a dataset opened under a config setting keeps that chunking
    with dask.config.set({"nidask.chunk-size": 4 * volume_bytes}):
        ds = nidask.load(source_files[kind])
    assert ds.dataobj.chunks[3] == (4, 4, 2)
    np.testing.assert_array_equal(ds.dataobj.compute(), reference_data(source_files[kind], kind))


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_tokens_deterministic_and_follow_the_file(kind, source_files, tmp_path, process_pool):
    suffix = ".nii.gz" if kind == "nii.gz" else os.path.splitext(source_files[kind])[1]
    path = str(tmp_path / f"copy{suffix}")
    shutil.copy(source_files[kind], path)
    cache = nidask.Cache(tmp_path / "cache")
    first = open_kind(path, kind, cache)

    def reopen():
        if kind == "nii.gz":  # the cache file is part of a gzip source's identity
            return GzipNiftiSource(path, first.data_path)
        return open_kind(path, kind, cache)

    second = reopen()
    assert tokenize(first) == tokenize(second)
    assert first.to_dask().name == second.to_dask().name
    # the same token in another process (no per-process salt)
    assert process_pool.submit(tokenize, first).result() == tokenize(first)

    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    touched = reopen()
    assert tokenize(touched) != tokenize(first)
    assert touched.to_dask().name != first.to_dask().name

    with open(path, "ab") as f:  # same mtime, different size
        f.write(b"\0" * 64)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    grown = reopen()
    assert tokenize(grown) != tokenize(touched)
    cache.close()


def _forbid(*_args, **_kwargs):
    raise AssertionError("data were read while opening")


def test_nifti_open_reads_header_only(source_files, monkeypatch):
    proxy = nb.arrayproxy.ArrayProxy
    with monkeypatch.context() as m:
        for name in ("__array__", "__getitem__", "get_unscaled"):
            m.setattr(proxy, name, _forbid)
        m.setattr(nb.Nifti1Image, "get_fdata", _forbid)
        source = NiftiSource(source_files["nii"])
        ds = nidask.load(source_files["nii"])
        array = source.to_dask()
    # the same objects read data once allowed to
    np.testing.assert_array_equal(array[..., 0].compute(), ds.dataobj[..., 0].compute())


def test_gzip_open_leaves_cache_empty_until_compute(source_files, cache):
    source = GzipNiftiSource(source_files["nii.gz"], cache.new_path(".nii"))
    array = source.to_dask()
    assert not os.path.exists(source.data_path)
    assert os.listdir(cache.path) == []
    pickle.dumps(array.__dask_graph__())  # building and shipping the graph reads nothing
    assert not os.path.exists(source.data_path)
    volume = array[..., 4].compute()
    assert os.path.exists(source.data_path)
    np.testing.assert_array_equal(volume, reference_data(source_files["nii.gz"], "nii.gz")[..., 4])
    # the dataset read path also defers decompression
    ds = nidask.load(source_files["nii.gz"])
    (gz,) = graph_sources(ds.dataobj)
    assert isinstance(gz, GzipNiftiSource)
    assert not os.path.exists(gz.data_path)
    ds.close()


@pytest.mark.parametrize("kind", ["h5v1", "h5v2"])
def test_hdf5_open_reads_no_data(kind, source_files, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(h5py.Dataset, "__getitem__", _forbid)
        m.setattr(h5py.Dataset, "read_direct", _forbid)
        m.setattr(h5py.Dataset, "__array__", _forbid)
        source = HDF5Source(source_files[kind], "/0/dataobj")
        array = source.to_dask()
    assert source.shape == (*SHAPE3D, N)
    np.testing.assert_array_equal(array.compute(), reference_data(source_files[kind], kind))


@pytest.mark.parametrize("kind", ["npyC", "npyF"])
def test_npy_open_reads_no_data(kind, source_files, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(np, "load", _forbid)
        m.setattr(np, "memmap", _forbid)
        m.setattr(np, "fromfile", _forbid)
        source = NpySource(source_files[kind])
        array = source.to_dask()
    assert source.fortran_order is (kind == "npyF")
    np.testing.assert_array_equal(array.compute(), reference_data(source_files[kind], kind))


# -- graph size for a large declared series --------------------------------------------
BIG = (256, 256, 128, 1000)  # 16.8 GB of int16, never written (sparse files)


def _sparse_nifti(path, shape=BIG, dtype="int16") -> str:
    header = make_header(shape, dtype, phantom_affine(shape[:3]))
    with open(path, "wb") as f:
        f.write(header_bytes(header))
        f.truncate(352 + math.prod(shape) * np.dtype(dtype).itemsize)
    return os.fspath(path)


def _sparse_npy(path, shape=BIG, dtype="int16") -> str:
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape, fortran_order=True)
    del mm  # np.lib.format sizes the file sparsely; nothing is written
    return os.fspath(path)


def _sparse_hdf5(path, shape=BIG, dtype="int16") -> str:
    with h5py.File(path, "w") as f:
        f.create_dataset("/0/dataobj", shape=shape, dtype=dtype, chunks=(*shape[:3], 1))
    return os.fspath(path)


def _header_only_gz(path, shape=BIG, dtype="int16") -> str:
    with gzip.open(path, "wb") as f:
        f.write(header_bytes(make_header(shape, dtype, phantom_affine(shape[:3]))))
    return os.fspath(path)


@pytest.mark.parametrize(
    "writer, name",
    [
        (_sparse_nifti, "big.nii"),
        (_header_only_gz, "big.nii.gz"),
        (_sparse_hdf5, "big.h5"),
        (_sparse_npy, "big.npy"),
    ],
)
def test_graph_pickles_small_for_large_series(writer, name, tmp_path):
    path = writer(tmp_path / name)
    cache = nidask.Cache(tmp_path / "cache")
    source = open_source(path, cache=cache)
    assert source.shape == BIG
    array = source.to_dask()
    assert array.nbytes > 16e9
    assert array.numblocks[3] > 200  # many chunks, so the size test means something
    assert len(pickle.dumps(dict(array.__dask_graph__()))) < 100_000
    assert len(pickle.dumps(array.__dask_graph__())) < 100_000
    assert len(cloudpickle.dumps(array)) < 100_000
    cache.close()


HCP = (145, 174, 145, 288)  # an HCP diffusion series, 2.1 GB of int16


def test_dwi_and_lofo_graphs_pickle_small_for_hcp_sized_series(tmp_path):
    path = _sparse_nifti(tmp_path / "hcp.nii", shape=HCP)
    n = HCP[3]
    bvals = np.where(np.arange(n) % 16 == 0, 0.0, 1000.0)
    bvecs = np.tile([1.0, 0.0, 0.0], (n, 1))
    bvec, bval = write_bvec_bval(tmp_path / "hcp", bvecs, bvals)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert len(dwi) == n - 18
    # b=0 removal (a deferred selection) and the lazy median stay small graphs
    assert len(cloudpickle.dumps(dwi.dataobj)) < 100_000
    assert len(cloudpickle.dumps(dwi.bzero)) < 100_000
    assert len(pickle.dumps(dict(dwi.dataobj.__dask_graph__()))) < 100_000
    train, _ = dwi.lofo(100)
    assert len(cloudpickle.dumps(train.dataobj)) < 100_000
    dwi.close()


# -- scaling ----------------------------------------------------------------------------
def _int_series(seed=0, shape=(*SHAPE3D, 4)):
    rng = np.random.default_rng(seed)
    return rng.integers(-2000, 30000, size=shape, dtype=np.int16)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_nifti_is_float32_and_scaled(suffix, tmp_path):
    data = _int_series()
    path = write_nifti(tmp_path / f"scaled{suffix}", data, slope=0.5, inter=40000.0)
    img = nb.load(path)
    assert img.get_data_dtype() == np.int16
    expected = np.asarray(img.dataobj).astype(np.float32)
    assert expected.max() > 40000  # beyond int16: a cast back to int16 would overflow
    ds = nidask.load(path)
    assert ds.dtype == np.float32
    result = ds.dataobj.compute()
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(result, (data * 0.5 + 40000).astype(np.float32))
    vol = ds[1][0].compute()
    assert vol.dtype == np.float32
    np.testing.assert_array_equal(vol, expected[..., 1])
    ds.close()


def test_scaled_nifti_slope_only(tmp_path):
    data = _int_series(1)
    path = write_nifti(tmp_path / "slope.nii", data, slope=0.25)
    ds = nidask.load(path)
    assert ds.dtype == np.float32
    np.testing.assert_array_equal(ds.dataobj.compute(), (data * 0.25).astype(np.float32))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_unscaled_int16_stays_int16(suffix, tmp_path):
    data = _int_series(2)
    path = write_nifti(tmp_path / f"plain{suffix}", data, slope=1.0, inter=0.0)
    ds = nidask.load(path)
    assert ds.dtype == np.int16
    result = ds.dataobj.compute()
    assert result.dtype == np.int16
    np.testing.assert_array_equal(result, data)
    ds.close()


# -- gzip decompressed once -------------------------------------------------------------
def test_gzip_decompressed_once(source_files, cache, monkeypatch):
    calls = []
    real_open = deflate.open_gzip

    def counting_open(path):
        calls.append(path)
        return real_open(path)

    source = GzipNiftiSource(source_files["nii.gz"], cache.new_path(".nii"))
    expected = reference_data(source_files["nii.gz"], "nii.gz")
    monkeypatch.setattr(deflate, "open_gzip", counting_open)
    per_volume = math.prod(SHAPE3D) * source.dtype.itemsize
    with dask.config.set({"nidask.chunk-size": per_volume}):
        array = source.to_dask()  # 10 chunks, read by parallel threads
    assert array.numblocks[3] == N
    np.testing.assert_array_equal(array.compute(scheduler="threads", num_workers=4), expected)
    assert len(calls) == 1
    first_mtime = os.stat(source.data_path).st_mtime_ns
    for i in range(N):  # a volume sweep: no re-decompression
        np.testing.assert_array_equal(array[..., i].compute(), expected[..., i])
    assert len(calls) == 1
    assert os.stat(source.data_path).st_mtime_ns == first_mtime
    assert sorted(os.listdir(cache.path)) == [os.path.basename(source.data_path)]
